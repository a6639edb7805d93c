//! Rate limits per scope (a Slack channel, a Facebook page, a Bot Framework host), shared by
//! every conversation in the scope: a token bucket, plus pauses set by a channel's 429.
//!
//! Callers get a wait to sleep *outside* any lock, so a conversation waiting on a paused scope
//! holds nothing another conversation needs.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::channels::RateLimit;

struct Bucket {
    /// May go negative: each reservation takes a token now and waits for the deficit.
    tokens: f64,
    last: Instant,
    paused_until: Option<Instant>,
}

#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// Above this many scopes, idle full buckets are dropped so memory follows active scopes.
const PRUNE_ABOVE: usize = 4096;

impl RateLimiter {
    /// Takes one token of `limit.scope` and says how long to wait before using it.
    /// `per_second <= 0` means no quota: only pauses apply.
    pub fn reserve(&self, limit: &RateLimit, now: Instant) -> Duration {
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > PRUNE_ABOVE {
            map.retain(|_, b| b.tokens < 0.0 || b.paused_until.is_some_and(|p| p > now));
        }
        let pause_of = |b: &Bucket| {
            b.paused_until
                .filter(|p| *p > now)
                .map(|p| p - now)
                .unwrap_or_default()
        };
        if limit.per_second <= 0.0 || !limit.per_second.is_finite() {
            // No quota: only a pause applies, and a scope never paused needs no bucket (nor
            // its key copied for every message, as the Bot Framework's scopes were).
            return map
                .get(limit.scope.as_str())
                .map(pause_of)
                .unwrap_or_default();
        }
        let burst = f64::from(limit.burst.max(1));
        let b = map.entry(limit.scope.clone()).or_insert(Bucket {
            tokens: burst,
            last: now,
            paused_until: None,
        });
        let pause = pause_of(b);
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * limit.per_second).min(burst);
        b.last = now;
        b.tokens -= 1.0;
        let wait = if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / limit.per_second)
        };
        wait.max(pause)
    }

    /// Takes a token only if one is available now (for refusing rather than waiting).
    pub fn try_take(&self, limit: &RateLimit, now: Instant) -> bool {
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let burst = f64::from(limit.burst.max(1));
        let b = map.entry(limit.scope.clone()).or_insert(Bucket {
            tokens: burst,
            last: now,
            paused_until: None,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * limit.per_second).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Pauses the whole scope until `until` (a channel's 429 with Retry-After).
    pub fn pause(&self, scope: &str, until: Instant) {
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = map.entry(scope.to_string()).or_insert(Bucket {
            tokens: 0.0,
            last: Instant::now(),
            paused_until: None,
        });
        b.paused_until = Some(b.paused_until.map_or(until, |p| p.max(until)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(per_second: f64, burst: u32) -> RateLimit {
        RateLimit {
            scope: "s".into(),
            per_second,
            burst,
        }
    }

    #[test]
    fn burst_then_spaced_by_rate() {
        let r = RateLimiter::default();
        let t0 = Instant::now();
        let l = limit(1.0, 3);
        let waits: Vec<Duration> = (0..5).map(|_| r.reserve(&l, t0)).collect();
        assert_eq!(&waits[..3], &[Duration::ZERO; 3]);
        assert_eq!(waits[3], Duration::from_secs(1));
        assert_eq!(waits[4], Duration::from_secs(2));
        // Two seconds later the deficit is paid back; the next waits one more second.
        assert_eq!(
            r.reserve(&l, t0 + Duration::from_secs(2)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn pause_holds_the_whole_scope_even_without_quota() {
        let r = RateLimiter::default();
        let t0 = Instant::now();
        let unlimited = limit(0.0, 0);
        assert_eq!(r.reserve(&unlimited, t0), Duration::ZERO);
        r.pause("s", t0 + Duration::from_secs(5));
        assert_eq!(
            r.reserve(&unlimited, t0 + Duration::from_secs(1)),
            Duration::from_secs(4)
        );
        assert_eq!(
            r.reserve(&unlimited, t0 + Duration::from_secs(6)),
            Duration::ZERO
        );
    }

    #[test]
    fn scopes_are_independent() {
        let r = RateLimiter::default();
        let t0 = Instant::now();
        let a = limit(1.0, 1);
        let b = RateLimit {
            scope: "other".into(),
            ..limit(1.0, 1)
        };
        assert_eq!(r.reserve(&a, t0), Duration::ZERO);
        assert_eq!(r.reserve(&b, t0), Duration::ZERO);
        assert_eq!(r.reserve(&a, t0), Duration::from_secs(1));
    }
}
