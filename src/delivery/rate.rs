//! Rate limits: the channels' rate scopes (`ScopeLimiter`: budgets applied before a send, pauses
//! set by a channel's 429, widened when 429s repeat across the narrower scopes of a wider one).
//! The API's per-caller limit has its own bounded buckets (`api::auth`).
//!
//! Owns the arithmetic only: which scopes a request counts against, and their budgets, come
//! from the channel (`channels::RateScopes`). Callers get a wait to sleep *outside* any lock, so
//! a conversation waiting on a paused scope holds nothing another conversation needs.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::channels::{Budget, RateScopes};

/// Above this many scopes, idle ones are dropped so memory follows active scopes.
const PRUNE_ABOVE: usize = 4096;
/// A wider scope is paused once this many distinct narrower scopes under it were refused...
const WIDEN_AFTER_DISTINCT: usize = 3;
/// ...within one window of this length...
const WIDEN_WINDOW: Duration = Duration::from_secs(10);
/// ...and the refusals were at least this share of the requests sent under it in the window.
/// One host answering a few conversations' 429s among many successes is throttling those
/// conversations (Teams limits each bot's conversation); one answering most requests with 429
/// is throttling all of them.
const WIDEN_SHARE: f64 = 0.5;

/// The channels' rate scopes. A request names its scopes narrowest first (`RateScopes`); a
/// send takes a token of every budget of every scope, and waits for the slowest of them and for
/// any pause. A 429 pauses the narrowest scope only: a Teams conversation over its budget must
/// not stop every other conversation of the host (it did: with 10% of answers 429s with
/// Retry-After 1 s and 20% 500s, 1,000 conversations × 10 messages went at 326 msg/s through
/// the test fake, against 1,000-1,350 now and 13,000 without faults). A wider scope is paused
/// only when 429s repeat across its narrower scopes (see `WIDEN_*`).
pub struct ScopeLimiter {
    inner: Mutex<Scopes>,
}

struct Scopes {
    map: HashMap<Arc<str>, ScopeState>,
    /// Pruned when the map grows past this; then set to twice what is left, so a map of
    /// active scopes is not scanned on every send.
    prune_at: usize,
    hasher: RandomState,
}

struct ScopeState {
    /// Tokens of each budget, in the channel's order; may go negative: each reservation takes
    /// a token now and waits for the deficit.
    tokens: Vec<f64>,
    last: Instant,
    /// When every bucket is full again if nothing more is taken (then a fresh state equals it).
    full_at: Instant,
    paused_until: Option<Instant>,
    /// For a scope that has narrower ones: what was sent and refused under it lately.
    strikes: Option<Box<Strikes>>,
}

struct Strikes {
    since: Instant,
    sent: u32,
    refused: u32,
    /// Hashes of the narrowest scopes refused in the window, up to `WIDEN_AFTER_DISTINCT`.
    distinct: Vec<u64>,
}

impl Strikes {
    fn new(now: Instant) -> Self {
        Self {
            since: now,
            sent: 0,
            refused: 0,
            distinct: Vec::new(),
        }
    }

    fn roll(&mut self, now: Instant) {
        if now.saturating_duration_since(self.since) >= WIDEN_WINDOW {
            *self = Self::new(now);
        }
    }
}

impl ScopeState {
    fn new(budgets: &[Budget], now: Instant) -> Self {
        Self {
            tokens: budgets.iter().map(|b| f64::from(b.burst.max(1))).collect(),
            last: now,
            full_at: now,
            paused_until: None,
            strikes: None,
        }
    }

    fn pause_left(&self, now: Instant) -> Duration {
        self.paused_until
            .map(|p| p.saturating_duration_since(now))
            .unwrap_or_default()
    }

    /// Refills every bucket up to `now` (a scope whose budgets changed starts full).
    fn refill(&mut self, budgets: &[Budget], now: Instant) {
        if self.tokens.len() != budgets.len() {
            self.tokens = budgets.iter().map(|b| f64::from(b.burst.max(1))).collect();
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        for (t, b) in self.tokens.iter_mut().zip(budgets) {
            if quota(b) {
                *t = (*t + elapsed * b.per_second).min(f64::from(b.burst.max(1)));
            }
        }
        self.last = self.last.max(now);
    }

    /// Takes a token of every budget; the wait until the last of them is there.
    fn take(&mut self, budgets: &[Budget], now: Instant) -> Duration {
        self.refill(budgets, now);
        let mut wait = Duration::ZERO;
        let mut refilled_in = Duration::ZERO;
        for (t, b) in self.tokens.iter_mut().zip(budgets) {
            if !quota(b) {
                continue;
            }
            *t -= 1.0;
            let secs = |tokens: f64| {
                Duration::try_from_secs_f64(tokens / b.per_second).unwrap_or(Duration::MAX)
            };
            if *t < 0.0 {
                wait = wait.max(secs(-*t));
            }
            refilled_in = refilled_in.max(secs(f64::from(b.burst.max(1)) - *t));
        }
        // Bounded by a day: a far-off instant cannot be represented everywhere.
        let refilled_in = refilled_in.min(Duration::from_secs(86_400));
        self.full_at = now.checked_add(refilled_in).unwrap_or(now);
        wait
    }

    /// Nothing here that a fresh state would not have: full buckets, no pause, no strikes.
    fn idle(&self, now: Instant) -> bool {
        self.full_at <= now
            && self.paused_until.is_none_or(|p| p <= now)
            && self
                .strikes
                .as_ref()
                .is_none_or(|s| now.saturating_duration_since(s.since) >= WIDEN_WINDOW)
    }
}

/// A budget with a usable rate; any other is ignored (no quota).
fn quota(b: &Budget) -> bool {
    b.per_second.is_finite() && b.per_second > 0.0
}

impl Default for ScopeLimiter {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Scopes {
                map: HashMap::new(),
                prune_at: PRUNE_ABOVE,
                hasher: RandomState::new(),
            }),
        }
    }
}

impl ScopeLimiter {
    fn scopes(&self) -> std::sync::MutexGuard<'_, Scopes> {
        // Every change is a plain assignment: a panic elsewhere leaves nothing half done.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a token of every budget of every scope of a request about to be sent, and says how
    /// long to wait before sending it (budgets and pauses together).
    pub fn reserve(&self, scopes: &RateScopes, now: Instant) -> Duration {
        let mut s = self.scopes();
        s.prune(now);
        let mut wait = Duration::ZERO;
        for (i, level) in scopes.levels().iter().enumerate() {
            let wide = i > 0;
            if level.budgets.is_empty() && !wide {
                // No budget and nothing to count: a scope never paused needs no state.
                if let Some(st) = s.map.get(&*level.key) {
                    wait = wait.max(st.pause_left(now));
                }
                continue;
            }
            let st = s
                .map
                .entry(level.key.clone())
                .or_insert_with(|| ScopeState::new(&level.budgets, now));
            wait = wait
                .max(st.pause_left(now))
                .max(st.take(&level.budgets, now));
            if wide {
                let strikes = st
                    .strikes
                    .get_or_insert_with(|| Box::new(Strikes::new(now)));
                strikes.roll(now);
                strikes.sent = strikes.sent.saturating_add(1);
            }
        }
        wait
    }

    /// How long the request's scopes stay paused from `now` (no token taken): checked again
    /// after a wait, since a wider scope may have been paused meanwhile.
    pub fn paused(&self, scopes: &RateScopes, now: Instant) -> Duration {
        let s = self.scopes();
        scopes
            .levels()
            .iter()
            .filter_map(|l| s.map.get(&*l.key))
            .map(|st| st.pause_left(now))
            .max()
            .unwrap_or_default()
    }

    /// A channel answered 429 to a request of these scopes: pauses the narrowest for `pause`,
    /// and any wider one where refusals now repeat across narrower scopes. Returns the widest
    /// key paused.
    pub fn limited(&self, scopes: &RateScopes, pause: Duration, now: Instant) -> Option<Arc<str>> {
        let levels = scopes.levels();
        let narrow = levels.first()?;
        let until = now.checked_add(pause)?;
        let mut s = self.scopes();
        let narrow_hash = s.hasher.hash_one(&*narrow.key);
        let pause_until = |st: &mut ScopeState| {
            st.paused_until = Some(st.paused_until.map_or(until, |p| p.max(until)));
        };
        let st = s
            .map
            .entry(narrow.key.clone())
            .or_insert_with(|| ScopeState::new(&narrow.budgets, now));
        pause_until(st);
        let mut widest = narrow.key.clone();
        for level in &levels[1..] {
            let st = s
                .map
                .entry(level.key.clone())
                .or_insert_with(|| ScopeState::new(&level.budgets, now));
            let strikes = st
                .strikes
                .get_or_insert_with(|| Box::new(Strikes::new(now)));
            strikes.roll(now);
            strikes.refused = strikes.refused.saturating_add(1);
            if strikes.distinct.len() < WIDEN_AFTER_DISTINCT
                && !strikes.distinct.contains(&narrow_hash)
            {
                strikes.distinct.push(narrow_hash);
            }
            let repeated = strikes.distinct.len() >= WIDEN_AFTER_DISTINCT
                && f64::from(strikes.refused) >= WIDEN_SHARE * f64::from(strikes.sent.max(1));
            if repeated {
                **strikes = Strikes::new(now);
                pause_until(st);
                widest = level.key.clone();
            }
        }
        Some(widest)
    }
}

impl Scopes {
    /// Drops scopes a fresh state would equal (full buckets, no pause, no recent strikes).
    fn prune(&mut self, now: Instant) {
        if self.map.len() <= self.prune_at {
            return;
        }
        self.map.retain(|_, st| !st.idle(now));
        self.prune_at = (self.map.len() * 2).max(PRUNE_ABOVE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::RateScope;
    use crate::channels::botframework::render::TEAMS_PER_CONVERSATION;

    const HOST: &str = "botframework:smba.trafficmanager.net";

    /// A Bot Framework-like request: its conversation, then the host.
    fn conversation(id: &str, budgets: &'static [Budget]) -> RateScopes {
        RateScopes(vec![
            RateScope::new(format!("{HOST}/bot/c/{id}"), budgets),
            RateScope::new(HOST, &[]),
        ])
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_budget_lets_its_burst_through_then_spaces_by_its_rate() {
        const B: &[Budget] = &[Budget {
            per_second: 1.0,
            burst: 3,
        }];
        let r = ScopeLimiter::default();
        let t0 = Instant::now();
        let c = conversation("a", B);
        let waits: Vec<Duration> = (0..5).map(|_| r.reserve(&c, t0)).collect();
        assert_eq!(&waits[..3], &[Duration::ZERO; 3]);
        assert_eq!(waits[3], Duration::from_secs(1));
        assert_eq!(waits[4], Duration::from_secs(2));
        // Two seconds later the deficit is paid back; the next waits one more second.
        assert_eq!(r.reserve(&c, t0 + ms(2000)), Duration::from_secs(1));
        // Another conversation has its own budget.
        assert_eq!(r.reserve(&conversation("b", B), t0), Duration::ZERO);
    }

    /// Teams' per-conversation budgets, applied before sending: a conversation sending as fast
    /// as the limiter lets it never has more than the documented count in any window. Before,
    /// a Bot Framework conversation had no budget: every message went at once.
    #[test]
    fn a_teams_conversation_stays_within_every_documented_window() {
        let r = ScopeLimiter::default();
        let t0 = Instant::now();
        let c = conversation("a", TEAMS_PER_CONVERSATION);
        // A worker sends as soon as the limiter allows (virtual clock): 2,500 sends.
        let mut now = t0;
        let mut sent = Vec::new();
        for _ in 0..2500 {
            now += r.reserve(&c, now);
            sent.push(now);
        }
        for (count, window) in [(7, 1), (8, 2), (60, 30), (1800, 3600)] {
            let window = Duration::from_secs(window);
            let most = (0..sent.len())
                .map(|i| {
                    sent[i..]
                        .iter()
                        .take_while(|t| t.duration_since(sent[i]) < window)
                        .count()
                })
                .max()
                .unwrap_or(0);
            assert!(
                most <= count,
                "{most} sends within {window:?}, documented at most {count}"
            );
        }
        // And it is not needlessly slow: a few at once, then about two a second.
        assert_eq!(sent.iter().filter(|t| **t == t0).count(), 4);
        let first_ten = sent[9].duration_since(t0);
        assert!(first_ten <= ms(3100), "{first_ten:?} for ten sends");
    }

    /// A 429 for one conversation pauses that conversation, not the host's others (it paused
    /// the whole host before).
    #[test]
    fn a_429_pauses_only_its_conversation() {
        let r = ScopeLimiter::default();
        let t0 = Instant::now();
        let (a, b) = (conversation("a", &[]), conversation("b", &[]));
        assert_eq!(r.reserve(&a, t0), Duration::ZERO);
        assert_eq!(r.reserve(&b, t0), Duration::ZERO);
        let paused = r.limited(&a, ms(2000), t0);
        assert_eq!(paused.as_deref(), Some(&*a.levels()[0].key));
        assert_eq!(r.reserve(&a, t0 + ms(500)), ms(1500));
        assert_eq!(r.paused(&a, t0 + ms(500)), ms(1500));
        assert_eq!(r.reserve(&b, t0 + ms(500)), Duration::ZERO);
        assert_eq!(r.reserve(&a, t0 + ms(2000)), Duration::ZERO);
    }

    /// 429s for several of the host's conversations, making up most of what it answered: the
    /// host is throttling them all, so the host is paused, for conversations not refused yet too.
    #[test]
    fn repeated_429s_across_conversations_pause_the_host() {
        let r = ScopeLimiter::default();
        let t0 = Instant::now();
        let convs: Vec<RateScopes> = (0..4).map(|i| conversation(&i.to_string(), &[])).collect();
        for c in &convs {
            assert_eq!(r.reserve(c, t0), Duration::ZERO);
        }
        assert_eq!(
            r.limited(&convs[0], ms(1000), t0).as_deref(),
            Some(&*convs[0].levels()[0].key)
        );
        // The same conversation again does not count twice.
        r.limited(&convs[0], ms(1000), t0);
        r.limited(&convs[1], ms(1000), t0);
        assert_eq!(
            r.reserve(&convs[3], t0),
            Duration::ZERO,
            "two are not yet a pattern"
        );
        let widest = r.limited(&convs[2], ms(1000), t0 + ms(10));
        assert_eq!(widest.as_deref(), Some(HOST));
        // Conversation 3 got no 429 but waits out the host's pause.
        assert_eq!(r.reserve(&convs[3], t0 + ms(10)), ms(1000));
        assert_eq!(r.reserve(&conversation("new", &[]), t0 + ms(510)), ms(500));
        assert_eq!(r.reserve(&convs[3], t0 + ms(1010)), Duration::ZERO);
    }

    /// The chaos run's pattern: one answer in ten a 429, spread over many conversations. That is
    /// each conversation's own limit, never the host's: the host is never paused.
    #[test]
    fn scattered_429s_among_successes_leave_the_host_open() {
        let r = ScopeLimiter::default();
        let t0 = Instant::now();
        for i in 0..1000u64 {
            let now = t0 + ms(i);
            let c = conversation(&i.to_string(), &[]);
            assert_eq!(r.reserve(&c, now), Duration::ZERO, "send {i} waited");
            if i % 10 == 0 {
                assert_eq!(
                    r.limited(&c, ms(1000), now).as_deref(),
                    Some(&*c.levels()[0].key)
                );
            }
        }
    }

    /// Scopes whose state a fresh one would equal are dropped once there are many, so memory
    /// follows the active scopes; a paused one is kept.
    #[test]
    fn idle_scopes_are_dropped() {
        const B: &[Budget] = &[Budget {
            per_second: 10.0,
            burst: 1,
        }];
        let r = ScopeLimiter::default();
        let t0 = Instant::now();
        let paused = conversation("paused", &[]);
        r.limited(&paused, Duration::from_secs(3600), t0);
        for i in 0..3 * PRUNE_ABOVE {
            r.reserve(&conversation(&i.to_string(), B), t0 + ms(i as u64));
        }
        let n = r.scopes().map.len();
        assert!(n <= PRUNE_ABOVE + 2, "{n} scopes kept");
        assert!(r.paused(&paused, t0 + ms(20_000)) > Duration::ZERO);
    }
}
