//! The shared inbox's driver: which conversations this replica holds, per consumer group, and
//! getting their events from PostgreSQL into the inbox's queues.
//!
//! Owns the claims' life on this replica: taking conversations that have events and that a
//! stream here can take (at most as many per group as its streams' credits), loading them,
//! reading what is new in them (woken by this replica's appends, other replicas' `NOTIFY
//! cg_inbox`, and a slow poll), renewing the claims, forgetting the ones that lapsed or were
//! lost, and giving up a conversation once it is empty or no stream here matches it any more.
//! The queues, credits, deadlines and order inside a held conversation stay `inbox.rs`'s, the
//! SQL `pg.rs`'s.
//!
//! Order across replicas: only the holder hands a conversation's events out, in commit order;
//! a new holder starts from the first event not acked. A holder that stops renewing (killed,
//! paused, cut off) stops handing out when its lease lapses by its own clock, before the
//! database's expiry lets another replica take over, and the new holder flags what may have
//! been out (`redelivered`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use super::super::pg::{Filter, PgInbox, Row, held_until};
use super::super::store::{DEFAULT_GROUP, StoredEvent};
use super::{Backend, Inbox, InboxSettings, ReceiveError, Shared, State};
use crate::metrics::Metrics;
use crate::storage::notify::Wake;

/// A conversation this replica holds for a group.
#[derive(Debug, Clone, Copy)]
pub(super) struct Claim {
    /// Every delivery of it up to here is loaded (the feed skips them); `NOT_LOADED` until
    /// its first load.
    pub loaded_seq: i64,
    /// Its last holder's lease ran out (it did not give it up): until loaded.
    pub taken_over: bool,
    /// Handed out only before this (the claim's lease, less a margin, by this clock).
    pub until: Instant,
}

/// The claims' timings (`outbox.postgres`'s: one lease for delivery and receiving).
#[derive(Debug, Clone, Copy)]
pub struct ClaimSettings {
    pub lease: Duration,
    pub renew_every: Duration,
    pub poll_every: Duration,
}

/// Conversations one claim round takes at most, per group.
const MAX_CLAIM_BATCH: usize = 256;

/// Upkeep of the shared tables (retention, idle groups, dedupe keys) at most this often.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The shared inbox is recounted this often, for its bounds and the pending gauge.
const RECOUNT_EVERY: Duration = Duration::from_secs(1);

/// Claim rounds at most this often while nothing new was stored (acks free credit often).
const CLAIM_GAP: Duration = Duration::from_millis(10);

type Key = (Arc<str>, Arc<str>);

/// `Claim::loaded_seq` of a claim whose events are not loaded yet.
const NOT_LOADED: i64 = i64::MIN;

/// The conversations this replica holds, by (group, conversation).
pub(super) type Claims = HashMap<Key, Claim>;

/// A claim to give up: group, conversation, and whether with what is left in it.
type Release = (Arc<str>, Arc<str>, bool);

/// Attempts to record before a release: group, event id, attempts.
type Attempts = Vec<(Arc<str>, u64, u32)>;

impl Inbox {
    /// The inbox shared with the other replicas on `pg`'s database: events are stored there,
    /// and this replica hands out the conversations it claims. `wakes` hears the other
    /// replicas' appends, `answers` their bots' answers to calls waiting here.
    pub fn open_shared(
        pg: Arc<PgInbox>,
        wakes: broadcast::Receiver<Wake>,
        answers: broadcast::Receiver<Wake>,
        claims: ClaimSettings,
        settings: InboxSettings,
        metrics: Arc<Metrics>,
    ) -> Inbox {
        let state = State {
            claims: Some(HashMap::new()),
            ..State::default()
        };
        let shared = Arc::new(Shared {
            state: std::sync::Mutex::new(state),
            store: std::sync::OnceLock::new(),
            settings,
            metrics,
            changed: tokio::sync::Notify::new(),
        });
        let _ = shared.store.set(Backend::Shared(pg.clone()));
        shared
            .lock()
            .groups
            .entry(Arc::from(DEFAULT_GROUP))
            .or_default();
        tokio::spawn(super::replies::write_answers(
            Arc::downgrade(&shared),
            pg.clone(),
            answers,
        ));
        tokio::spawn(drive(Arc::downgrade(&shared), pg, wakes, claims));
        let inbox = Inbox { shared };
        inbox.start_timers();
        inbox
    }

    /// Gives every conversation this replica holds back at once (what was out comes again,
    /// flagged, from whichever replica takes it), after the acks queued before are written.
    /// For a replica shutting down: the others need not wait for its leases to run out.
    pub async fn release_all(&self) {
        let Backend::Shared(pg) = self.shared.store() else {
            return;
        };
        let (keys, attempts) = {
            let mut st = self.shared.lock();
            let keys: Vec<Key> = st
                .claims
                .as_ref()
                .map(|c| c.keys().cloned().collect())
                .unwrap_or_default();
            let mut attempts = Vec::new();
            for (g, c) in &keys {
                attempts.extend(
                    st.forget_conv(g, c)
                        .into_iter()
                        .map(|(id, n)| (g.clone(), id, n)),
                );
            }
            if let Some(c) = st.claims.as_mut() {
                c.clear();
            }
            (keys, attempts)
        };
        for (g, id, n) in attempts {
            pg.attempt(g, id, n);
        }
        let n = keys.len();
        pg.release(keys.into_iter().map(|(g, c)| (g, c, true)).collect())
            .await;
        pg.flush().await;
        if n > 0 {
            tracing::info!(conversations = n, "inbox conversations released");
        }
    }
}

impl State {
    /// Drops a conversation of `group` from this replica's queues, without acking anything
    /// (its holder is, or will be, another replica); the attempts made of what it held.
    pub(super) fn forget_conv(&mut self, group: &Arc<str>, key: &Arc<str>) -> Vec<(u64, u32)> {
        // Whatever a stream has out of it is no longer its to ack.
        self.requeue(group, key);
        let Some(g) = self.groups.get_mut(group) else {
            return Vec::new();
        };
        let Some(conv) = g.convs.remove(key) else {
            return Vec::new();
        };
        let mut attempts = Vec::new();
        for id in conv.pending.iter().chain(&conv.in_flight) {
            if let Some(n) = g.attempts.remove(id).filter(|n| *n > 0) {
                attempts.push((*id, n));
            }
            if let Some(e) = self.events.get_mut(id) {
                e.holders = e.holders.saturating_sub(1);
                if e.holders == 0
                    && let Some(e) = self.events.remove(id)
                {
                    self.bytes = self.bytes.saturating_sub(e.body.len());
                    if let Some(slot) = e.reply {
                        // Still ours to answer if it comes back here.
                        self.replies.insert(*id, slot);
                    }
                }
            }
        }
        attempts
    }

    /// Adds loaded or newly read deliveries of conversations this replica holds, skipping
    /// what was loaded before. `taken_over`: conversations whose last holder's lease ran out;
    /// any of their events may have reached a bot already.
    fn add_rows(&mut self, rows: Vec<Row>, taken_over: &HashSet<Key>) -> Vec<Arc<str>> {
        let mut groups: Vec<Arc<str>> = Vec::new();
        for r in rows {
            let key = (r.group.clone(), r.conversation.clone());
            let Some(claim) = self.claims.as_mut().and_then(|c| c.get_mut(&key)) else {
                continue;
            };
            if r.seq <= claim.loaded_seq {
                continue;
            }
            claim.loaded_seq = r.seq;
            let mut attempts = r.attempts;
            if taken_over.contains(&key) {
                // Its acks and attempt counts are written after the fact, so any of its
                // events may have reached a bot: each says so, as after a restart.
                attempts = attempts.max(1);
            }
            let reply = self.replies.remove(&r.id);
            let id = r.id;
            let reply_by_ms = r.reply_by_ms;
            let reply_replica = r.reply_replica;
            self.add_event(StoredEvent {
                id,
                channel: r.channel,
                bot_id: r.bot_id,
                conversation: r.conversation,
                received_at_ms: r.received_at_ms,
                body: r.body,
                message: None,
                groups: vec![(r.group.clone(), attempts)],
                reply,
            });
            if let Some(e) = self.events.get_mut(&id) {
                e.reply_by_ms = reply_by_ms;
                e.reply_replica = reply_replica;
            }
            if !groups.contains(&r.group) {
                groups.push(r.group);
            }
        }
        groups
    }

    /// Per group with streams here: what to claim (each distinct stream filter with credit) and
    /// how many more conversations this replica may hold for it (its streams' credits).
    fn wants(&self) -> Vec<(Arc<str>, Vec<Filter>, usize)> {
        let Some(claims) = &self.claims else {
            return Vec::new();
        };
        if self.closed {
            return Vec::new();
        }
        let mut held: HashMap<&Arc<str>, usize> = HashMap::new();
        for (g, _) in claims.keys() {
            *held.entry(g).or_insert(0) += 1;
        }
        let mut out = Vec::new();
        for (name, g) in &self.groups {
            let mut capacity = 0usize;
            let mut filters: Vec<Filter> = Vec::new();
            for s in g.streams.iter().filter_map(|id| self.streams.get(id)) {
                capacity = capacity.saturating_add(s.max_in_flight);
                if !s.has_credit() {
                    continue;
                }
                let bots = match (&s.allowed, s.bot_ids.is_empty()) {
                    (None, true) => None,
                    (Some(a), true) => Some(a.clone()),
                    (None, false) => Some(s.bot_ids.clone()),
                    (Some(a), false) => Some(
                        s.bot_ids
                            .iter()
                            .filter(|b| a.contains(b))
                            .cloned()
                            .collect(),
                    ),
                };
                if bots.as_ref().is_some_and(Vec::is_empty) {
                    continue;
                }
                let channels = (!s.channel_ids.is_empty()).then(|| s.channel_ids.clone());
                let f = Filter { bots, channels };
                if !filters.contains(&f) {
                    filters.push(f);
                }
            }
            let free = capacity
                .saturating_sub(held.get(name).copied().unwrap_or(0))
                .min(MAX_CLAIM_BATCH);
            if free > 0 && !filters.is_empty() {
                out.push((name.clone(), filters, free));
            }
        }
        out
    }

    /// Claims to give up now: `(group, conversation, force)`. Empty conversations go only if
    /// nothing came meanwhile (`force` false); ones no stream here matches go with what is
    /// left, after their attempts are written (returned with them); lapsed ones are forgotten.
    fn releasable(&mut self, now: Instant) -> (Vec<Release>, Attempts) {
        let Some(claims) = &self.claims else {
            return (Vec::new(), Vec::new());
        };
        let mut release = Vec::new();
        let mut forget: Vec<(Key, bool)> = Vec::new();
        for ((g, c), claim) in claims {
            let group = self.groups.get(g);
            let conv = group.and_then(|gr| gr.convs.get(c));
            if claim.loaded_seq == NOT_LOADED && claim.until > now {
                // Its load comes (again) in the driver's next turn.
                continue;
            }
            if claim.until <= now {
                // Lapsed: another replica may hold it already. Give the row up if it is still
                // ours (and let the next holder take it at once).
                forget.push(((g.clone(), c.clone()), true));
                continue;
            }
            match conv {
                None => release.push((g.clone(), c.clone(), false)),
                Some(cv) if cv.pending.is_empty() && cv.in_flight.is_empty() => {
                    release.push((g.clone(), c.clone(), false))
                }
                Some(cv) => {
                    let matched = group.is_some_and(|gr| {
                        gr.streams
                            .iter()
                            .any(|id| self.streams.get(id).is_some_and(|s| s.matches(cv)))
                    });
                    if !matched {
                        forget.push(((g.clone(), c.clone()), true));
                    }
                }
            }
        }
        let mut attempts = Vec::new();
        for ((g, c), force) in forget {
            for (id, n) in self.forget_conv(&g, &c) {
                attempts.push((g.clone(), id, n));
            }
            if let Some(cl) = self.claims.as_mut() {
                cl.remove(&(g.clone(), c.clone()));
            }
            release.push((g, c, force));
        }
        (release, attempts)
    }
}

/// The driver's loop: one task per replica; see the module doc.
async fn drive(
    weak: Weak<Shared>,
    pg: Arc<PgInbox>,
    mut wakes: broadcast::Receiver<Wake>,
    cfg: ClaimSettings,
) {
    let mut cursor = 0i64;
    let start = Instant::now();
    let mut next_renew = start;
    let mut next_poll = start;
    let mut next_sweep = start;
    let mut next_recount = start;
    let mut last_claim: Option<Instant> = None;
    let mut read = true;
    let mut claim = true;
    let mut listening = true;
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(shared) = weak.upgrade() else { return };
        let now = Instant::now();
        if now >= next_poll {
            read = true;
            claim = true;
            next_poll = now.checked_add(cfg.poll_every).unwrap_or(now);
        }
        let turn = turn(
            &shared,
            &pg,
            &cfg,
            &mut cursor,
            &mut next_renew,
            &mut read,
            &mut claim,
            &mut last_claim,
        )
        .await;
        if Instant::now() >= next_recount {
            next_recount = Instant::now().checked_add(RECOUNT_EVERY).unwrap_or(now);
            if let Ok((events, _)) = pg.recount().await {
                shared
                    .metrics
                    .inbound_pending
                    .set(events.min(i64::MAX as u64) as i64);
            }
        }
        if Instant::now() >= next_sweep {
            let s = &shared.settings;
            let every = SWEEP_EVERY
                .min(s.group_idle / 4)
                .max(Duration::from_secs(1));
            next_sweep = Instant::now().checked_add(every).unwrap_or(now);
            sweep(&shared, &pg).await;
        }
        let held = shared.lock().claims.as_ref().map_or(0, |c| c.len());
        shared.metrics.inbox_claims.set(held as i64);
        let failed = turn.is_err();
        if let Err(e) = turn {
            tracing::warn!(error = %e, "shared inbox: database call failed; trying again");
        }
        drop(shared);
        let mut wake_at = next_renew.min(next_poll).min(next_sweep).min(next_recount);
        if failed {
            wake_at = wake_at.min(Instant::now().checked_add(backoff).unwrap_or(now));
            backoff = (backoff * 2).min(Duration::from_secs(2));
        } else {
            backoff = Duration::from_millis(50);
        }
        // A claim round held back by `CLAIM_GAP` comes when the gap is over.
        if claim && let Some(at) = last_claim.and_then(|t| t.checked_add(CLAIM_GAP)) {
            wake_at = wake_at.min(at.max(Instant::now()));
        }
        let Some(shared) = weak.upgrade() else { return };
        tokio::select! {
            _ = pg.stored.notified() => {
                read = true;
                claim = true;
            }
            w = wakes.recv(), if listening => match w {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    read = true;
                    claim = true;
                }
                // No listener any more: the poll alone finds other replicas' events.
                Err(broadcast::error::RecvError::Closed) => listening = false,
            },
            _ = shared.changed.notified() => claim = true,
            _ = tokio::time::sleep_until(wake_at.into()) => {}
        }
    }
}

/// One turn of the driver: renew when due, give up what should go, read what is new, claim
/// what a stream here can take.
#[allow(clippy::too_many_arguments)]
async fn turn(
    shared: &Arc<Shared>,
    pg: &PgInbox,
    cfg: &ClaimSettings,
    cursor: &mut i64,
    next_renew: &mut Instant,
    read: &mut bool,
    claim: &mut bool,
    last_claim: &mut Option<Instant>,
) -> Result<(), ReceiveError> {
    let storage = |e: super::super::store::InboxStoreError| ReceiveError::Storage(e.to_string());
    let now = Instant::now();
    if now >= *next_renew {
        *next_renew = now.checked_add(cfg.renew_every).unwrap_or(now);
        let held: Vec<Key> = {
            let st = shared.lock();
            st.claims
                .as_ref()
                .map(|c| c.keys().cloned().collect())
                .unwrap_or_default()
        };
        if !held.is_empty() {
            let sent = Instant::now();
            let kept = pg.renew(&held, cfg.lease).await.map_err(storage)?;
            let until = held_until(sent, cfg.lease);
            let mut st = shared.lock();
            let mut lost = 0usize;
            for k in &held {
                if kept.contains(k) {
                    if let Some(c) = st.claims.as_mut().and_then(|c| c.get_mut(k)) {
                        c.until = c.until.max(until);
                    }
                } else if st.claims.as_mut().and_then(|c| c.remove(k)).is_some() {
                    // Another replica holds it now: nothing of it is ours to write.
                    st.forget_conv(&k.0, &k.1);
                    lost += 1;
                }
            }
            drop(st);
            if lost > 0 {
                shared.metrics.inbox_claim_losses.inc_by(lost as u64);
                tracing::warn!(
                    conversations = lost,
                    "inbox claims lost (their lease ran out); another replica holds them"
                );
            }
        }
    }
    // Give up what should go, then wait for the database's word before reading again, so a
    // conversation is never read into this replica after another took it.
    let (release, attempts) = shared.lock().releasable(Instant::now());
    if !release.is_empty() {
        for (g, id, n) in attempts {
            pg.attempt(g, id, n);
        }
        let keys: Vec<Release> = release.clone();
        let done = pg.release(keys).await;
        let mut st = shared.lock();
        let mut freed = false;
        let mut kept = false;
        for ((g, c, force), gone) in release.into_iter().zip(done) {
            if force {
                freed = true;
                continue;
            }
            if gone {
                if let Some(cl) = st.claims.as_mut() {
                    cl.remove(&(g, c));
                }
                freed = true;
            } else {
                // Kept: an event came meanwhile (or the claim is another replica's now, which
                // the next renewal tells); the feed reads it, after `loaded_seq`.
                kept = true;
            }
        }
        if kept {
            *read = true;
        }
        if freed {
            *claim = true;
        }
        drop(st);
        shared.flush_attempts();
    }
    if *read {
        *read = false;
        loop {
            let (rows, next) = pg.feed(*cursor).await.map_err(storage)?;
            let full = rows.len() as i64 >= super::super::pg::READ_LIMIT;
            *cursor = next;
            if !rows.is_empty() {
                let mut st = shared.lock();
                let groups = st.add_rows(rows, &HashSet::new());
                for g in &groups {
                    st.pump(g, &shared.settings);
                }
                drop(st);
                shared.flush_attempts();
            }
            if !full {
                break;
            }
        }
    }
    let due = last_claim.is_none_or(|t| t.elapsed() >= CLAIM_GAP);
    if *claim && due {
        *claim = false;
        *last_claim = Some(Instant::now());
        let wants = shared.lock().wants();
        for (group, filters, mut free) in wants {
            let mut taken: Vec<super::super::pg::Claimed> = Vec::new();
            for f in filters {
                if free == 0 {
                    break;
                }
                let sent = Instant::now();
                let got = pg
                    .claim(&group, &f, free, cfg.lease)
                    .await
                    .map_err(storage)?;
                if got.len() >= free {
                    // There may be more for this replica once it has room.
                    *claim = true;
                }
                free = free.saturating_sub(got.len());
                let until = held_until(sent, cfg.lease);
                let mut st = shared.lock();
                if let Some(c) = st.claims.as_mut() {
                    for cl in &got {
                        c.insert(
                            (group.clone(), cl.conversation.clone()),
                            Claim {
                                loaded_seq: NOT_LOADED,
                                taken_over: cl.taken_over,
                                until,
                            },
                        );
                    }
                }
                drop(st);
                taken.extend(got);
            }
            if !taken.is_empty() {
                tracing::debug!(group = %crate::bounded::for_log(&group), conversations = taken.len(), "inbox conversations claimed");
            }
        }
    }
    load_claimed(shared, pg).await
}

/// Loads the conversations claimed and not loaded yet (just claimed, or a load that failed),
/// and hands out what may go.
async fn load_claimed(shared: &Arc<Shared>, pg: &PgInbox) -> Result<(), ReceiveError> {
    let storage = |e: super::super::store::InboxStoreError| ReceiveError::Storage(e.to_string());
    let mut todo: HashMap<Arc<str>, Vec<Arc<str>>> = HashMap::new();
    let mut over: HashSet<Key> = HashSet::new();
    {
        let st = shared.lock();
        for ((g, c), claim) in st.claims.iter().flatten() {
            if claim.loaded_seq == NOT_LOADED {
                todo.entry(g.clone()).or_default().push(c.clone());
                if claim.taken_over {
                    over.insert((g.clone(), c.clone()));
                }
            }
        }
    }
    for (group, convs) in todo {
        for chunk in convs.chunks(64) {
            let (rows, head) = pg.load(&group, chunk).await.map_err(storage)?;
            let mut st = shared.lock();
            st.add_rows(rows, &over);
            if let Some(c) = st.claims.as_mut() {
                for conv in chunk {
                    if let Some(cl) = c.get_mut(&(group.clone(), conv.clone())) {
                        cl.loaded_seq = cl.loaded_seq.max(head);
                        cl.taken_over = false;
                    }
                }
            }
            st.pump(&group, &shared.settings);
            drop(st);
            shared.flush_attempts();
        }
    }
    Ok(())
}

/// The shared tables' upkeep, and marking this replica's groups as in use.
async fn sweep(shared: &Arc<Shared>, pg: &PgInbox) {
    let s = &shared.settings;
    let now = crate::outbox::now_ms();
    let cut = |d: Duration| now.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let seen: Vec<Arc<str>> = {
        let st = shared.lock();
        st.groups
            .iter()
            .filter(|(_, g)| !g.streams.is_empty())
            .map(|(n, _)| n.clone())
            .collect()
    };
    match pg
        .sweep(
            cut(s.retention),
            cut(s.dedupe_window),
            cut(s.group_idle),
            &seen,
        )
        .await
    {
        Ok(swept) => {
            for (channel, n) in &swept.expired {
                shared.metrics.inbound_events(channel, "expired", *n);
            }
            if swept.groups_removed > 0 {
                tracing::info!(
                    groups = swept.groups_removed,
                    "idle consumer groups removed"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "shared inbox upkeep failed; trying again later"),
    }
}
