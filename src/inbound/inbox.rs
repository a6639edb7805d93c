//! The inbox: received events between the webhook's 2xx and the bots' acks.
//!
//! Owns who gets which event when: consumer groups (each gets every event stored after it was
//! created; the `default` group always exists), the streams of a group sharing its load, per
//! conversation order (the next event of a conversation goes out only once the previous one was
//! acked, or `per_conversation` of them), one stream holding a conversation at a time, credits
//! (`max_in_flight` per stream), the ack deadline, redelivery after a nack, a missed deadline or a
//! stream that ended, retention and the bound on what is kept (past it the sink says `Full`, and
//! the channel is answered 503 to retry later). Durability is `store.rs`'s; the wire (gRPC,
//! HTTP) is not known here.
//!
//! All of it is one state behind one mutex: every operation is a few map lookups, and the store's
//! writer hands committed events in under it, in id order, so a conversation's queue is always in
//! the order its events were stored.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::listener::Answering;
use super::listener::{Sink, SinkError};
use super::pg::PgInbox;
use super::store::{Committed, DEFAULT_GROUP, InboxStore, NewEvent, ReplySlot, StoredEvent};
use crate::channels::channel::InboundEvent;
use crate::channels::channel::Reply;
use crate::metrics::Metrics;
use crate::model::Message;

mod claims;
mod replies;
pub use claims::ClaimSettings;

/// The inbox's bounds and timings (the `[inbound]` section).
#[derive(Debug, Clone)]
pub struct InboxSettings {
    /// An event not acked within this is delivered again.
    pub ack_deadline: Duration,
    /// Events of one conversation out at once (1: strictly one after the other).
    pub per_conversation: usize,
    /// An event no group acked within this is dropped (and counted as expired).
    pub retention: Duration,
    /// How long a channel retry of a stored event is recognised.
    pub dedupe_window: Duration,
    /// Most events kept; past it the channel is told to retry later.
    pub max_events: usize,
    /// Most bytes of events kept (their stored JSON).
    pub max_bytes: usize,
    /// Receive streams open at once.
    pub max_streams: usize,
    /// The largest `max_in_flight` a stream may ask for.
    pub max_in_flight: usize,
    /// A consumer group (other than `default`) with no stream for this long is removed, and
    /// the events kept for it released: a group used once (`listen --group`) must not hold
    /// every later event, and fill the inbox, until the retention.
    pub group_idle: Duration,
}

impl Default for InboxSettings {
    fn default() -> Self {
        Self {
            ack_deadline: Duration::from_secs(30),
            per_conversation: 1,
            retention: Duration::from_secs(24 * 3600),
            dedupe_window: Duration::from_secs(24 * 3600),
            max_events: 100_000,
            max_bytes: 256 << 20,
            max_streams: 256,
            max_in_flight: 1000,
            group_idle: Duration::from_secs(3600),
        }
    }
}

/// One event handed to a stream.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub event_id: u64,
    /// 1 for the first delivery to this group.
    pub attempt: u32,
    /// It may have reached a bot of this group before (an earlier attempt, or a restart while
    /// it was out).
    pub redelivered: bool,
    pub channel: String,
    pub received_at_ms: u64,
    /// The message as stored (JSON); `message()` decodes it.
    pub body: Bytes,
    /// Already decoded, when it goes out as soon as it was stored.
    pub decoded: Option<Arc<Message>>,
    /// The channel waits for the bot's answer (`Receiver::respond`) until then (Unix ms).
    pub reply_by_ms: Option<u64>,
}

impl Delivered {
    /// The event as a bot receives it. An error only for a damaged inbox file.
    pub fn message(&self) -> Result<Arc<Message>, serde_json::Error> {
        match &self.decoded {
            Some(m) => Ok(m.clone()),
            None => serde_json::from_slice(&self.body).map(Arc::new),
        }
    }
}

/// What a stream asks for. Empty lists match everything the caller may see.
#[derive(Debug, Clone, Default)]
pub struct Subscription {
    /// Consumer group; empty is `default`.
    pub group: String,
    pub bot_ids: Vec<String>,
    pub channel_ids: Vec<String>,
    /// Events out to this stream at once; 0 takes 16.
    pub max_in_flight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiveError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("too many Receive streams are open ({0}); close one or raise inbound.max_streams")]
    TooManyStreams(usize),
    #[error(
        "too many consumer groups ({0}): every event is kept once per group; reuse a group, or \
         wait for an unused one to be removed (inbound.group_idle)"
    )]
    TooManyGroups(usize),
    #[error("{0}")]
    Storage(String),
}

/// The answer to an ack or nack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Done,
    /// The event is not out to this stream (already acked, redelivered after its deadline, or
    /// never sent here): nothing changed.
    NotHeld,
}

/// The inbox. Cheap to clone.
#[derive(Clone)]
pub struct Inbox {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    store: OnceLock<Backend>,
    settings: InboxSettings,
    metrics: Arc<Metrics>,
    /// Shared inbox only: wakes the claims driver after a change here (a stream came or went,
    /// an ack freed credit or emptied a conversation).
    changed: tokio::sync::Notify,
}

/// Where the inbox keeps its events: a SQLite file of this process, or PostgreSQL shared with
/// the other replicas (`claims` then decides which conversations this replica hands out).
enum Backend {
    Local(InboxStore),
    Shared(Arc<PgInbox>),
}

impl Backend {
    fn ack(&self, group: Arc<str>, id: u64, last: bool) {
        match self {
            Backend::Local(s) => s.ack(group, id, last),
            Backend::Shared(p) => p.ack(group, id),
        }
    }

    fn attempt(&self, group: Arc<str>, id: u64, attempts: u32) {
        match self {
            Backend::Local(s) => s.attempt(group, id, attempts),
            Backend::Shared(p) => p.attempt(group, id, attempts),
        }
    }

    /// The shared inbox removes idle groups and old keys in its own upkeep (`PgInbox::sweep`).
    fn remove_group(&self, name: Arc<str>) {
        if let Backend::Local(s) = self {
            s.remove_group(name);
        }
    }

    fn forget_keys(&self, before_ms: u64) {
        if let Backend::Local(s) = self {
            s.forget_keys(before_ms);
        }
    }
}

struct Entry {
    channel: String,
    /// Shared inbox: until when the channel waits for the bot's answer, when the call waits on
    /// whichever replica stored the event (`reply` is set only on that one).
    reply_by_ms: Option<u64>,
    /// Shared inbox: that replica.
    reply_replica: Option<Arc<str>>,
    received_at_ms: u64,
    body: Bytes,
    /// Set only while a commit hands new events out (`Shared::committed`).
    decoded: Option<Arc<Message>>,
    /// Groups that have not acked it.
    holders: u32,
    /// Where the bot's answer goes while the channel waits for it.
    reply: Option<ReplySlot>,
}

#[derive(Default)]
struct Conv {
    channel: String,
    bot_id: String,
    pending: VecDeque<u64>,
    in_flight: VecDeque<u64>,
    holder: Option<u64>,
    queued: bool,
}

struct Group {
    /// Since when it has had no stream (meaningful while `streams` is empty).
    idle_since: Instant,
    convs: HashMap<Arc<str>, Conv>,
    /// Conversations with a next event that may go out now.
    ready: VecDeque<Arc<str>>,
    /// Conversations whose matching streams are all out of credit.
    starved: Vec<Arc<str>>,
    /// Conversations no stream of the group matches (until one joins).
    unmatched: Vec<Arc<str>>,
    streams: Vec<u64>,
    /// Where the next round-robin pick starts.
    rr: usize,
    /// Attempts so far per event of this group (from the store after a restart).
    attempts: HashMap<u64, u32>,
}

impl Default for Group {
    fn default() -> Self {
        Self {
            idle_since: Instant::now(),
            convs: HashMap::new(),
            ready: VecDeque::new(),
            starved: Vec::new(),
            unmatched: Vec::new(),
            streams: Vec::new(),
            rr: 0,
            attempts: HashMap::new(),
        }
    }
}

struct StreamState {
    group: Arc<str>,
    bot_ids: Vec<String>,
    channel_ids: Vec<String>,
    /// Bots the caller may see (`None`: any).
    allowed: Option<Vec<String>>,
    max_in_flight: usize,
    /// Event id → its conversation and ack deadline.
    in_flight: HashMap<u64, (Arc<str>, Instant)>,
    tx: mpsc::UnboundedSender<Delivered>,
}

impl StreamState {
    fn matches(&self, c: &Conv) -> bool {
        (self.bot_ids.is_empty() || self.bot_ids.contains(&c.bot_id))
            && (self.channel_ids.is_empty() || self.channel_ids.contains(&c.channel))
            && self.allowed.as_ref().is_none_or(|a| a.contains(&c.bot_id))
    }

    fn has_credit(&self) -> bool {
        self.in_flight.len() < self.max_in_flight
    }
}

#[derive(Default)]
struct State {
    events: HashMap<u64, Entry>,
    groups: HashMap<Arc<str>, Group>,
    streams: HashMap<u64, StreamState>,
    next_stream: u64,
    bytes: usize,
    /// Events and bytes of appends on their way to the store, counted against the bounds.
    reserved: usize,
    reserved_bytes: usize,
    /// Attempt counts to record (written after the lock is released).
    attempts_to_write: Vec<(Arc<str>, u64, u32)>,
    /// Shutting down: streams were ended and no new one opens.
    closed: bool,
    /// Shared inbox only: the conversations this replica holds, per group (`claims`).
    claims: Option<claims::Claims>,
    /// Shared inbox only: answers channels wait for, of events stored here and not loaded yet.
    replies: HashMap<u64, ReplySlot>,
}

impl Inbox {
    /// Opens the inbox in `data_dir` (`None`: in memory, lost on restart) and starts its timers
    /// (ack deadlines, retention, the dedupe window) on the current runtime.
    pub fn open(
        data_dir: Option<&Path>,
        settings: InboxSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ReceiveError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            store: OnceLock::new(),
            settings,
            metrics,
            changed: tokio::sync::Notify::new(),
        });
        let hook = Arc::downgrade(&shared);
        let path = data_dir.map(|d| d.join("inbox.sqlite3"));
        if let Some(d) = data_dir {
            std::fs::create_dir_all(d).map_err(|e| {
                ReceiveError::Storage(format!("cannot create {}: {e}", d.display()))
            })?;
        }
        let opened = InboxStore::open(
            path.as_deref(),
            Box::new(move |c| {
                if let Some(s) = hook.upgrade() {
                    s.committed(c);
                }
            }),
        )
        .map_err(|e| ReceiveError::Storage(e.to_string()))?;
        let _ = shared.store.set(Backend::Local(opened.store));
        {
            let mut st = shared.lock();
            for g in opened.groups {
                st.groups.entry(g).or_default();
            }
            let restored = opened.events.len();
            for e in opened.events {
                // Whatever was out when the gateway stopped may have reached a bot: the next
                // delivery says so.
                let groups: Vec<(Arc<str>, u32)> = e
                    .groups
                    .iter()
                    .map(|(g, a)| (g.clone(), (*a).max(1)))
                    .collect();
                st.add_event(StoredEvent { groups, ..e });
            }
            st.note_pending(&shared);
            if restored > 0 {
                tracing::info!(events = restored, "inbox events restored");
            }
        }
        let inbox = Inbox { shared };
        inbox.start_timers();
        Ok(inbox)
    }

    fn start_timers(&self) {
        let weak: Weak<Shared> = Arc::downgrade(&self.shared);
        let s = &self.shared.settings;
        let tick = (s.ack_deadline / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        tokio::spawn(async move {
            let mut every = tokio::time::interval(tick);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_keys = Instant::now();
            loop {
                every.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                shared.sweep(Instant::now());
                if last_keys.elapsed() >= Duration::from_secs(60) {
                    last_keys = Instant::now();
                    let cutoff = crate::outbox::now_ms()
                        .saturating_sub(shared.settings.dedupe_window.as_millis() as u64);
                    shared.store().forget_keys(cutoff);
                }
            }
        });
    }

    /// Opens a stream for `sub`. `allowed` is the bots the caller may see (`None`: any); a bot
    /// named in the subscription must be one of them.
    pub async fn subscribe(
        &self,
        sub: Subscription,
        allowed: Option<Vec<String>>,
    ) -> Result<Receiver, ReceiveError> {
        let group = match sub.group.as_str() {
            "" => DEFAULT_GROUP.to_string(),
            g => g.to_string(),
        };
        if group.len() > 64
            || !group
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(ReceiveError::Invalid {
                field: "subscribe.group",
                reason: "must be 1 to 64 of A-Z a-z 0-9 . _ -".into(),
            });
        }
        let s = &self.shared.settings;
        let max_in_flight = match sub.max_in_flight as usize {
            0 => 16.min(s.max_in_flight),
            n if n > s.max_in_flight => {
                return Err(ReceiveError::Invalid {
                    field: "subscribe.max_in_flight",
                    reason: format!("at most {} (inbound.max_in_flight)", s.max_in_flight),
                });
            }
            n => n,
        };
        for (field, list) in [
            ("subscribe.bot_ids", &sub.bot_ids),
            ("subscribe.channel_ids", &sub.channel_ids),
        ] {
            if list.len() > 100 || list.iter().any(|x| x.is_empty() || x.len() > 256) {
                return Err(ReceiveError::Invalid {
                    field,
                    reason: "at most 100 ids, each 1 to 256 bytes".into(),
                });
            }
        }
        let group: Arc<str> = Arc::from(group);
        let (known, groups) = {
            let st = self.shared.lock();
            (st.groups.contains_key(&group), st.groups.len())
        };
        let storage = |e: super::store::InboxStoreError| ReceiveError::Storage(e.to_string());
        match self.shared.store() {
            Backend::Local(store) if !known => {
                // Each group keeps its own copy of every later event: their number bounds the
                // writes and memory each event costs.
                if groups >= MAX_GROUPS {
                    return Err(ReceiveError::TooManyGroups(MAX_GROUPS));
                }
                store.add_group(group.clone()).await.map_err(storage)?;
            }
            Backend::Local(_) => {}
            // Groups are the database's: another replica may have made (or removed) it.
            Backend::Shared(pg) => {
                let (exists, groups) = pg.groups(&group).await.map_err(storage)?;
                if !exists && groups >= MAX_GROUPS {
                    return Err(ReceiveError::TooManyGroups(MAX_GROUPS));
                }
                pg.add_group(&group).await.map_err(storage)?;
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let id = {
            let mut st = self.shared.lock();
            if st.closed {
                return Err(ReceiveError::Storage("the gateway is shutting down".into()));
            }
            if st.streams.len() >= s.max_streams {
                return Err(ReceiveError::TooManyStreams(s.max_streams));
            }
            st.next_stream += 1;
            let id = st.next_stream;
            st.streams.insert(
                id,
                StreamState {
                    group: group.clone(),
                    bot_ids: sub.bot_ids,
                    channel_ids: sub.channel_ids,
                    allowed,
                    max_in_flight,
                    in_flight: HashMap::new(),
                    tx,
                },
            );
            let g = st.groups.entry(group.clone()).or_default();
            g.streams.push(id);
            // A new stream may match what waited for one.
            let waiting: Vec<Arc<str>> = g.unmatched.drain(..).chain(g.starved.drain(..)).collect();
            st.unpark(&group, waiting);
            st.pump(&group, &self.shared.settings);
            id
        };
        self.shared.metrics.receivers.inc();
        self.shared.flush_attempts();
        Ok(Receiver {
            id,
            max_in_flight,
            shared: self.shared.clone(),
            rx,
        })
    }

    /// Events kept and not acked by every group (in the shared inbox: by its last count).
    pub fn pending(&self) -> usize {
        match self.shared.store() {
            Backend::Shared(pg) => pg.counts().0 as usize,
            Backend::Local(_) => self.shared.lock().events.len(),
        }
    }

    /// Ends every Receive stream (what they had not acked goes back in line, and comes again
    /// flagged after the restart) and opens no new one: a gRPC server shutting down waits for
    /// its streams to end.
    pub fn close_streams(&self) {
        {
            let mut st = self.shared.lock();
            st.closed = true;
            let ids: Vec<u64> = st.streams.keys().copied().collect();
            for id in ids {
                st.remove_stream(id, &self.shared);
            }
        }
        self.shared.flush_attempts();
    }

    /// Stops the writer once what is queued is on disk.
    pub fn shutdown(&self) {
        if let Backend::Local(store) = self.shared.store() {
            store.shutdown();
        }
    }
}

/// One open stream: events arrive on `rx`; dropping it gives back what it held.
pub struct Receiver {
    id: u64,
    max_in_flight: usize,
    shared: Arc<Shared>,
    pub rx: mpsc::UnboundedReceiver<Delivered>,
}

impl Receiver {
    /// The credits in force.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    pub fn ack(&self, event_id: u64) -> Settled {
        let r = self.shared.lock().ack(self.id, event_id, &self.shared);
        self.shared.flush_attempts();
        r
    }

    /// Hands the bot's answer to the channel call waiting on `event_id` (out to this stream);
    /// resolves with whether it was written into the channel's answer. An error when the
    /// channel does not wait (any more) for this event.
    pub fn respond(
        &self,
        event_id: u64,
        reply: Reply,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), String>>, &'static str> {
        let slot = {
            let mut st = self.shared.lock();
            if !st
                .streams
                .get(&self.id)
                .is_some_and(|s| s.in_flight.contains_key(&event_id))
            {
                return Err("the event is not out to this stream (acked, redelivered, or unknown)");
            }
            let local = match st.events.get_mut(&event_id).and_then(|e| e.reply.take()) {
                Some(slot) => Some(slot),
                None => st.replies.remove(&event_id),
            };
            match local {
                Some(slot) => slot,
                None => {
                    // Shared inbox: the call may wait on the replica that stored the event.
                    let elsewhere = st.events.get_mut(&event_id).and_then(|e| {
                        let by_ms = e.reply_by_ms.take()?;
                        Some((by_ms, e.reply_replica.take()?))
                    });
                    let (Some((by_ms, replica)), Backend::Shared(pg)) =
                        (elsewhere, self.shared.store())
                    else {
                        return Err(
                            "the channel does not wait for an answer to this event, or it has one",
                        );
                    };
                    if crate::outbox::now_ms() > by_ms {
                        return Err("late: the channel was given the neutral answer");
                    }
                    return Ok(replies::answer_elsewhere(
                        pg.clone(),
                        event_id,
                        replica,
                        by_ms,
                        reply,
                    ));
                }
            }
        };
        if crate::outbox::now_ms() > slot.by_ms {
            return Err("late: the channel was given the neutral answer");
        }
        let (used, rx) = tokio::sync::oneshot::channel();
        slot.tx
            .send(Answering { reply, used })
            .map_err(|_| "late: the channel was given the neutral answer")?;
        Ok(rx)
    }

    /// Gives an event back at once: it (and any later event of its conversation out to this
    /// stream) is delivered again, in order.
    pub fn nack(&self, event_id: u64) -> Settled {
        let r = {
            let mut st = self.shared.lock();
            match st
                .streams
                .get(&self.id)
                .and_then(|s| s.in_flight.get(&event_id))
            {
                Some((conv, _)) => {
                    let conv = conv.clone();
                    let group = st.streams[&self.id].group.clone();
                    let n = st.requeue(&group, &conv);
                    st.count_redelivered(&self.shared, &group, &conv, n);
                    st.pump(&group, &self.shared.settings);
                    Settled::Done
                }
                None => Settled::NotHeld,
            }
        };
        self.shared.flush_attempts();
        r
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shared.lock().remove_stream(self.id, &self.shared);
        self.shared.metrics.receivers.dec();
        self.shared.flush_attempts();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change is a few map edits that cannot be left half done by a panic elsewhere:
        // recover the guard rather than stop receiving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn store(&self) -> &Backend {
        // Set in `open` before the inbox is handed out.
        self.store
            .get()
            .unwrap_or_else(|| unreachable!("inbox store set at open"))
    }

    fn committed(&self, c: Committed) {
        {
            let mut st = self.lock();
            match c {
                Committed::Events(events) => {
                    let mut groups: Vec<Arc<str>> = Vec::new();
                    let ids: Vec<u64> = events.iter().map(|e| e.id).collect();
                    for e in events {
                        self.metrics.inbound_events(&e.channel, "stored", 1);
                        for (g, _) in &e.groups {
                            if !groups.contains(g) {
                                groups.push(g.clone());
                            }
                        }
                        st.add_event(e);
                    }
                    for g in groups {
                        st.pump(&g, &self.settings);
                    }
                    // What did not go out at once waits as its JSON alone.
                    for id in ids {
                        if let Some(e) = st.events.get_mut(&id) {
                            e.decoded = None;
                        }
                    }
                }
                Committed::Group(g) => {
                    st.groups.entry(g).or_default();
                }
            }
            st.note_pending(self);
        }
        self.flush_attempts();
    }

    /// Writes the attempt counts queued under the lock; in the shared inbox, also wakes the
    /// claims driver (every caller has just changed streams, credits or conversations).
    fn flush_attempts(&self) {
        let writes = std::mem::take(&mut self.lock().attempts_to_write);
        if let Some(store) = self.store.get() {
            for (g, id, a) in writes {
                store.attempt(g, id, a);
            }
            if matches!(store, Backend::Shared(_)) {
                self.changed.notify_one();
            }
        }
    }

    /// Redelivers what missed its ack deadline and drops what outlived the retention.
    fn sweep(&self, now: Instant) {
        {
            let mut st = self.lock();
            let expired: Vec<(Arc<str>, Arc<str>)> = st
                .streams
                .values()
                .flat_map(|s| {
                    s.in_flight
                        .values()
                        .filter(|(_, d)| *d <= now)
                        .map(|(c, _)| (s.group.clone(), c.clone()))
                })
                .collect();
            let mut groups = Vec::new();
            for (g, c) in expired {
                let n = st.requeue(&g, &c);
                st.count_redelivered(self, &g, &c, n);
                if !groups.contains(&g) {
                    groups.push(g);
                }
            }
            for g in &groups {
                st.pump(g, &self.settings);
            }
            let cutoff =
                crate::outbox::now_ms().saturating_sub(self.settings.retention.as_millis() as u64);
            st.expire(cutoff, self);
            st.remove_idle_groups(now, self);
            st.note_pending(self);
        }
        self.flush_attempts();
    }
}

impl State {
    /// A stream is gone: what it held goes back in line, in order, and its sender is dropped
    /// (which ends the stream if it is still open).
    fn remove_stream(&mut self, id: u64, shared: &Shared) {
        let Some(s) = self.streams.remove(&id) else {
            return;
        };
        let group = s.group.clone();
        let mut convs: Vec<Arc<str>> = s.in_flight.into_values().map(|(c, _)| c).collect();
        convs.sort();
        convs.dedup();
        if let Some(g) = self.groups.get_mut(&group) {
            g.streams.retain(|x| *x != id);
            if g.streams.is_empty() {
                g.idle_since = Instant::now();
            }
        }
        for c in convs {
            let n = self.requeue(&group, &c);
            self.count_redelivered(shared, &group, &c, n);
        }
        self.pump(&group, &shared.settings);
    }

    fn add_event(&mut self, e: StoredEvent) {
        for (g, attempts) in &e.groups {
            let group = self.groups.entry(g.clone()).or_default();
            if *attempts > 0 {
                group.attempts.insert(e.id, *attempts);
            }
            let conv = group
                .convs
                .entry(e.conversation.clone())
                .or_insert_with(|| Conv {
                    channel: e.channel.clone(),
                    bot_id: e.bot_id.clone(),
                    ..Conv::default()
                });
            conv.pending.push_back(e.id);
            self.ready(g, e.conversation.clone());
        }
        let holders = e.groups.len() as u32;
        match self.events.entry(e.id) {
            // The shared inbox loads an event once per group that claims its conversation.
            std::collections::hash_map::Entry::Occupied(mut o) => {
                let entry = o.get_mut();
                entry.holders = entry.holders.saturating_add(holders);
                if entry.reply.is_none() {
                    entry.reply = e.reply;
                }
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                self.bytes = self.bytes.saturating_add(e.body.len());
                v.insert(Entry {
                    channel: e.channel,
                    reply_by_ms: None,
                    reply_replica: None,
                    received_at_ms: e.received_at_ms,
                    body: e.body,
                    decoded: e.message,
                    holders,
                    reply: e.reply,
                });
            }
        }
    }

    /// The pending gauge, for the inbox of this process (the shared inbox's is its count, set
    /// by the claims driver).
    fn note_pending(&self, shared: &Shared) {
        if self.claims.is_none() {
            shared.metrics.inbound_pending.set(self.events.len() as i64);
        }
    }

    /// Puts a conversation in its group's ready line if its next event may go out.
    fn ready(&mut self, group: &Arc<str>, key: Arc<str>) {
        let Some(g) = self.groups.get_mut(group) else {
            return;
        };
        let Some(c) = g.convs.get_mut(&key) else {
            return;
        };
        if !c.queued && !c.pending.is_empty() {
            c.queued = true;
            g.ready.push_back(key);
        }
    }

    /// Hands out what can go out in `group` now.
    fn pump(&mut self, group: &Arc<str>, settings: &InboxSettings) {
        let Some(g) = self.groups.get_mut(group) else {
            return;
        };
        let streams = &mut self.streams;
        let now = Instant::now();
        while !g.ready.is_empty() {
            if !g
                .streams
                .iter()
                .any(|s| streams.get(s).is_some_and(|s| s.has_credit()))
            {
                break;
            }
            let Some(key) = g.ready.pop_front() else {
                break;
            };
            let Some(conv) = g.convs.get_mut(&key) else {
                continue;
            };
            conv.queued = false;
            if conv.pending.is_empty() {
                if conv.in_flight.is_empty() {
                    g.convs.remove(&key);
                }
                continue;
            }
            // Shared inbox: only while this replica's claim runs (the driver forgets the
            // conversation when it lapses; until then it waits here).
            if let Some(claims) = &self.claims
                && claims
                    .get(&(group.clone(), key.clone()))
                    .is_none_or(|c| c.until <= now)
            {
                continue;
            }
            if conv.in_flight.len() >= settings.per_conversation {
                // Back in line when an ack frees it.
                continue;
            }
            let pick = match conv.holder {
                Some(h) => match streams.get(&h) {
                    Some(s) if s.has_credit() => Some(h),
                    _ => None,
                },
                None => {
                    let n = g.streams.len();
                    (0..n).map(|i| g.streams[(g.rr + i) % n]).find(|id| {
                        streams
                            .get(id)
                            .is_some_and(|s| s.has_credit() && s.matches(conv))
                    })
                }
            };
            let Some(sid) = pick else {
                let matched = g
                    .streams
                    .iter()
                    .any(|id| streams.get(id).is_some_and(|s| s.matches(conv)));
                conv.queued = true;
                if matched {
                    g.starved.push(key);
                } else {
                    g.unmatched.push(key);
                }
                continue;
            };
            g.rr = g.rr.wrapping_add(1);
            let Some(id) = conv.pending.pop_front() else {
                continue;
            };
            let Some(entry) = self.events.get(&id) else {
                // Expired or acked under another path: nothing to send.
                g.ready.push_back(key.clone());
                conv.queued = true;
                continue;
            };
            let attempts = g.attempts.entry(id).or_insert(0);
            *attempts = attempts.saturating_add(1);
            let attempt = *attempts;
            if attempt > 1 {
                self.attempts_to_write.push((group.clone(), id, attempt));
            }
            let Some(s) = streams.get_mut(&sid) else {
                continue;
            };
            let deadline = now
                .checked_add(settings.ack_deadline)
                .unwrap_or(now + Duration::from_secs(24 * 3600));
            s.in_flight.insert(id, (key.clone(), deadline));
            conv.in_flight.push_back(id);
            conv.holder = Some(sid);
            let _ = s.tx.send(Delivered {
                event_id: id,
                attempt,
                redelivered: attempt > 1,
                channel: entry.channel.clone(),
                received_at_ms: entry.received_at_ms,
                body: entry.body.clone(),
                decoded: entry.decoded.clone(),
                reply_by_ms: match &entry.reply {
                    Some(r) => (!r.tx.is_closed()).then_some(r.by_ms),
                    None => entry.reply_by_ms,
                },
            });
            if !conv.pending.is_empty() && conv.in_flight.len() < settings.per_conversation {
                conv.queued = true;
                g.ready.push_back(key);
            }
        }
    }

    /// Puts every event of `conv` out in `group` back at the head of its line, in order;
    /// returns how many.
    fn requeue(&mut self, group: &Arc<str>, key: &Arc<str>) -> usize {
        let Some(g) = self.groups.get_mut(group) else {
            return 0;
        };
        let Some(c) = g.convs.get_mut(key) else {
            return 0;
        };
        let n = c.in_flight.len();
        if let Some(h) = c.holder.take()
            && let Some(s) = self.streams.get_mut(&h)
        {
            for id in &c.in_flight {
                s.in_flight.remove(id);
            }
        }
        while let Some(id) = c.in_flight.pop_back() {
            c.pending.push_front(id);
        }
        // Credit came back to the holder: whatever starved may go now.
        let starved: Vec<Arc<str>> = g.starved.drain(..).collect();
        self.unpark(group, starved);
        self.ready(group, key.clone());
        n
    }

    /// Puts parked conversations (starved or unmatched) back in the ready line.
    fn unpark(&mut self, group: &Arc<str>, keys: Vec<Arc<str>>) {
        if let Some(g) = self.groups.get_mut(group) {
            for k in &keys {
                if let Some(c) = g.convs.get_mut(k) {
                    c.queued = false;
                }
            }
        }
        for k in keys {
            self.ready(group, k);
        }
    }

    fn count_redelivered(&self, shared: &Shared, group: &Arc<str>, key: &Arc<str>, n: usize) {
        if n > 0
            && let Some(c) = self.groups.get(group).and_then(|g| g.convs.get(key))
        {
            shared
                .metrics
                .inbound_events(&c.channel, "redelivered", n as u64);
        }
    }

    fn ack(&mut self, stream: u64, id: u64, shared: &Shared) -> Settled {
        let Some(s) = self.streams.get_mut(&stream) else {
            return Settled::NotHeld;
        };
        let Some((key, _)) = s.in_flight.remove(&id) else {
            return Settled::NotHeld;
        };
        let group = s.group.clone();
        if let Some(g) = self.groups.get_mut(&group) {
            g.attempts.remove(&id);
            if let Some(c) = g.convs.get_mut(&key) {
                c.in_flight.retain(|x| *x != id);
                if c.in_flight.is_empty() {
                    c.holder = None;
                }
            }
            // This stream has credit again: what starved may go.
            let starved: Vec<Arc<str>> = g.starved.drain(..).collect();
            self.unpark(&group, starved);
        }
        self.release(&group, id, shared);
        self.ready(&group, key.clone());
        if let Some(g) = self.groups.get_mut(&group)
            && let Some(c) = g.convs.get(&key)
            && c.pending.is_empty()
            && c.in_flight.is_empty()
            && !c.queued
        {
            g.convs.remove(&key);
        }
        self.pump(&group, &shared.settings);
        self.note_pending(shared);
        Settled::Done
    }

    /// `group` is done with event `id` (acked or expired).
    fn release(&mut self, group: &Arc<str>, id: u64, shared: &Shared) {
        let last = match self.events.get_mut(&id) {
            Some(e) => {
                e.holders = e.holders.saturating_sub(1);
                e.holders == 0
            }
            None => return,
        };
        if last && let Some(e) = self.events.remove(&id) {
            self.bytes = self.bytes.saturating_sub(e.body.len());
        }
        shared.store().ack(group.clone(), id, last);
    }

    /// Drops waiting events received before `cutoff_ms` (out to a stream, they stay until
    /// acked or redelivered).
    fn expire(&mut self, cutoff_ms: u64, shared: &Shared) {
        let mut dropped: Vec<(Arc<str>, u64)> = Vec::new();
        for (gname, g) in self.groups.iter_mut() {
            for c in g.convs.values_mut() {
                // Only the head of a line can go: a later event never leaves before an earlier.
                while let Some(&id) = c.pending.front() {
                    match self.events.get(&id) {
                        Some(e) if e.received_at_ms < cutoff_ms => {
                            c.pending.pop_front();
                            g.attempts.remove(&id);
                            dropped.push((gname.clone(), id));
                        }
                        Some(_) => break,
                        None => {
                            c.pending.pop_front();
                        }
                    }
                }
            }
            g.convs
                .retain(|_, c| c.queued || !c.pending.is_empty() || !c.in_flight.is_empty());
        }
        for (g, id) in dropped {
            if let Some(e) = self.events.get(&id) {
                shared.metrics.inbound_events(&e.channel, "expired", 1);
            }
            self.release(&g, id, shared);
        }
    }

    /// Removes groups other than `default` that have had no stream for `group_idle`,
    /// releasing what was kept for them.
    fn remove_idle_groups(&mut self, now: Instant, shared: &Shared) {
        let idle: Vec<Arc<str>> = self
            .groups
            .iter()
            .filter(|(name, g)| {
                &***name != DEFAULT_GROUP
                    && g.streams.is_empty()
                    && now.saturating_duration_since(g.idle_since) >= shared.settings.group_idle
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in idle {
            if self.claims.is_some() {
                // Shared inbox: the group's events are the database's, and streams on other
                // replicas may still read them (its upkeep removes a group no replica used);
                // here only the empty queues go.
                if self.groups.get(&name).is_some_and(|g| g.convs.is_empty()) {
                    self.groups.remove(&name);
                }
                continue;
            }
            let Some(g) = self.groups.remove(&name) else {
                continue;
            };
            let ids: Vec<u64> = g
                .convs
                .into_values()
                .flat_map(|c| c.pending.into_iter().chain(c.in_flight))
                .collect();
            tracing::info!(group = %crate::bounded::for_log(&name), released = ids.len(), "consumer group idle; removed");
            for id in ids {
                self.release(&name, id, shared);
            }
            shared.store().remove_group(name);
        }
    }

    /// Whether `n` more events of `bytes` fit, with `held` (events, bytes) kept already.
    fn has_room(
        &self,
        settings: &InboxSettings,
        held: (usize, usize),
        n: usize,
        bytes: usize,
    ) -> bool {
        held.0.saturating_add(self.reserved).saturating_add(n) <= settings.max_events
            && held
                .1
                .saturating_add(self.reserved_bytes)
                .saturating_add(bytes)
                <= settings.max_bytes
    }
}

/// Consumer groups at once, `default` included.
pub const MAX_GROUPS: usize = 32;

/// How long a channel is asked to wait when the inbox is full.
const FULL_RETRY_AFTER: Duration = Duration::from_secs(5);

impl Inbox {
    /// Stores events (the first one with `reply`, when given); how many were new.
    async fn store_events(
        &self,
        channel: &str,
        events: Vec<InboundEvent>,
        mut reply: Option<ReplySlot>,
    ) -> Result<usize, SinkError> {
        let received_at_ms = crate::outbox::now_ms();
        let mut new = Vec::with_capacity(events.len());
        for e in events {
            let body = serde_json::to_vec(&e.message)
                .map_err(|err| SinkError::Failed(format!("cannot encode an event: {err}")))?;
            let a = &e.message.address;
            let conversation = format!(
                "{}/{}/{}",
                a.channel_id,
                a.bot_id(),
                a.conversation_id().unwrap_or("")
            );
            let bot_id = a.bot_id().to_string();
            new.push(NewEvent {
                channel: channel.to_string(),
                bot_id,
                conversation: Arc::from(conversation),
                dedupe_key: e.dedupe_key,
                received_at_ms,
                body,
                message: Arc::new(e.message),
                reply: reply.take(),
            });
        }
        let n = new.len();
        let bytes: usize = new.iter().map(|e| e.body.len()).sum();
        {
            let mut st = self.shared.lock();
            let held = match self.shared.store() {
                Backend::Shared(pg) => {
                    let (e, b) = pg.counts();
                    (
                        usize::try_from(e).unwrap_or(usize::MAX),
                        usize::try_from(b).unwrap_or(usize::MAX),
                    )
                }
                Backend::Local(_) => (st.events.len(), st.bytes),
            };
            if !st.has_room(&self.shared.settings, held, n, bytes) {
                return Err(SinkError::Full {
                    retry_after: FULL_RETRY_AFTER,
                });
            }
            st.reserved += n;
            st.reserved_bytes += bytes;
        }
        let result = match self.shared.store() {
            Backend::Local(store) => store.append(new).await,
            Backend::Shared(pg) => self.append_shared(pg, channel, new).await,
        };
        {
            let mut st = self.shared.lock();
            st.reserved = st.reserved.saturating_sub(n);
            st.reserved_bytes = st.reserved_bytes.saturating_sub(bytes);
        }
        match result {
            Ok(stored) => {
                self.shared.metrics.inbound_events(
                    channel,
                    "duplicate",
                    (n - stored.min(n)) as u64,
                );
                Ok(stored)
            }
            Err(e) => Err(SinkError::Failed(e.to_string())),
        }
    }
}

impl Inbox {
    /// Stores events in the shared inbox. Nothing is handed out here: the claims driver reads
    /// them back, on whichever replica holds their conversations. The channel's waiting call
    /// stays here, until the event is loaded (here) or answered.
    async fn append_shared(
        &self,
        pg: &PgInbox,
        channel: &str,
        mut new: Vec<NewEvent>,
    ) -> Result<usize, super::store::InboxStoreError> {
        let slots: Vec<Option<ReplySlot>> = new.iter_mut().map(|e| e.reply.take()).collect();
        let by: Vec<Option<u64>> = slots.iter().map(|s| s.as_ref().map(|s| s.by_ms)).collect();
        let ids = pg.append(&new, &by).await?;
        let stored = ids.iter().flatten().count();
        self.shared
            .metrics
            .inbound_events(channel, "stored", stored as u64);
        let mut st = self.shared.lock();
        for (id, slot) in ids.into_iter().zip(slots) {
            if let (Some(id), Some(slot)) = (id, slot) {
                // Loaded here already: the slot goes with the event.
                match st.events.get_mut(&id) {
                    Some(e) => e.reply = Some(slot),
                    None => {
                        st.replies.insert(id, slot);
                    }
                }
            }
        }
        Ok(stored)
    }
}

impl Sink for Inbox {
    fn append<'a>(
        &'a self,
        channel: &'a str,
        events: Vec<InboundEvent>,
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move { self.store_events(channel, events, None).await.map(|_| ()) })
    }

    fn append_awaiting<'a>(
        &'a self,
        channel: &'a str,
        event: InboundEvent,
        reply_by_ms: u64,
    ) -> BoxFuture<'a, Result<Option<tokio::sync::oneshot::Receiver<Answering>>, SinkError>> {
        Box::pin(async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let slot = ReplySlot {
                tx,
                by_ms: reply_by_ms,
            };
            let stored = self.store_events(channel, vec![event], Some(slot)).await?;
            // A retry of a stored event: its first call is the one a bot answers.
            Ok((stored == 1).then_some(rx))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Address, Conversation, Identity};

    fn event(bot: &str, conv: &str, key: &str, text: &str) -> InboundEvent {
        let message = Message {
            address: Address {
                channel_id: "slack".into(),
                bot: Some(Identity {
                    id: bot.into(),
                    ..Default::default()
                }),
                conversation: Some(Conversation {
                    id: conv.into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            text: Some(text.into()),
            ..Default::default()
        };
        InboundEvent {
            dedupe_key: key.into(),
            message,
        }
    }

    fn settings() -> InboxSettings {
        InboxSettings {
            ack_deadline: Duration::from_millis(200),
            ..InboxSettings::default()
        }
    }

    fn open(dir: Option<&Path>, s: InboxSettings) -> Inbox {
        Inbox::open(dir, s, Arc::new(Metrics::new())).expect("open")
    }

    async fn next(r: &mut Receiver) -> Delivered {
        tokio::time::timeout(Duration::from_secs(5), r.rx.recv())
            .await
            .expect("an event in time")
            .expect("stream open")
    }

    async fn nothing(r: &mut Receiver, ms: u64) {
        let got = tokio::time::timeout(Duration::from_millis(ms), r.rx.recv()).await;
        assert!(
            got.is_err(),
            "expected nothing, got {:?}",
            got.ok()
                .flatten()
                .map(|d| d.message().unwrap().text.clone())
        );
    }

    fn text(d: &Delivered) -> String {
        d.message()
            .expect("decodes")
            .text
            .clone()
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn one_conversation_goes_one_event_at_a_time_and_others_do_not_wait() {
        let inbox = open(None, settings());
        let batch = vec![
            event("B", "c1", "k1", "c1-a"),
            event("B", "c1", "k2", "c1-b"),
            event("B", "c2", "k3", "c2-a"),
        ];
        inbox.append("slack", batch).await.expect("stored");
        let mut r = inbox
            .subscribe(Subscription::default(), None)
            .await
            .expect("subscribe");
        let a = next(&mut r).await;
        let b = next(&mut r).await;
        let mut got = vec![text(&a).to_string(), text(&b).to_string()];
        got.sort();
        assert_eq!(got, ["c1-a", "c2-a"]);
        nothing(&mut r, 50).await;
        let first = if text(&a) == "c1-a" { &a } else { &b };
        assert_eq!(r.ack(first.event_id), Settled::Done);
        let c = next(&mut r).await;
        assert_eq!(text(&c), "c1-b");
        assert_eq!((c.attempt, c.redelivered), (1, false));
        assert_eq!(
            r.ack(first.event_id),
            Settled::NotHeld,
            "a second ack changes nothing"
        );
    }

    #[tokio::test]
    async fn a_channel_retry_is_stored_once_even_after_a_restart() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let inbox = open(Some(dir.path()), settings());
            inbox
                .append("slack", vec![event("B", "c1", "Ev1", "one")])
                .await
                .expect("stored");
            inbox
                .append("slack", vec![event("B", "c1", "Ev1", "one again")])
                .await
                .expect("ok");
            assert_eq!(inbox.pending(), 1);
            inbox.shutdown();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let inbox = open(Some(dir.path()), settings());
        assert_eq!(inbox.pending(), 1, "kept across the restart");
        inbox
            .append(
                "slack",
                vec![event("B", "c1", "Ev1", "retry after restart")],
            )
            .await
            .expect("ok");
        // Another channel may reuse the key: keys are per channel.
        inbox
            .append("telegram", vec![event("B", "c9", "Ev1", "other channel")])
            .await
            .expect("ok");
        assert_eq!(inbox.pending(), 2);
        let mut r = inbox
            .subscribe(Subscription::default(), None)
            .await
            .expect("subscribe");
        let d = next(&mut r).await;
        assert_eq!(text(&d), "one");
        assert!(
            d.redelivered,
            "restored events may have reached a bot before the restart"
        );
    }

    #[tokio::test]
    async fn acked_events_do_not_come_back_after_a_restart_and_unacked_ones_do() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let inbox = open(Some(dir.path()), settings());
            inbox
                .append(
                    "slack",
                    vec![
                        event("B", "c1", "1", "acked"),
                        event("B", "c1", "2", "not acked"),
                    ],
                )
                .await
                .expect("stored");
            let mut r = inbox
                .subscribe(Subscription::default(), None)
                .await
                .expect("subscribe");
            let d = next(&mut r).await;
            assert_eq!(text(&d), "acked");
            r.ack(d.event_id);
            let d = next(&mut r).await;
            assert_eq!(text(&d), "not acked");
            inbox.shutdown();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let inbox = open(Some(dir.path()), settings());
        let mut r = inbox
            .subscribe(Subscription::default(), None)
            .await
            .expect("subscribe");
        let d = next(&mut r).await;
        assert_eq!(text(&d), "not acked");
        assert!(d.redelivered);
        nothing(&mut r, 50).await;
    }

    #[tokio::test]
    async fn a_missed_ack_deadline_and_a_nack_redeliver_in_order() {
        let inbox = open(None, settings());
        inbox
            .append(
                "slack",
                vec![
                    event("B", "c1", "1", "first"),
                    event("B", "c1", "2", "second"),
                ],
            )
            .await
            .expect("stored");
        let mut r = inbox
            .subscribe(Subscription::default(), None)
            .await
            .expect("subscribe");
        let d = next(&mut r).await;
        assert_eq!((text(&d).as_str(), d.attempt), ("first", 1));
        // No ack: after the deadline it comes again, before the next one.
        let again = next(&mut r).await;
        assert_eq!(
            (text(&again).as_str(), again.attempt, again.redelivered),
            ("first", 2, true)
        );
        assert_eq!(
            r.ack(d.event_id),
            Settled::Done,
            "the same stream may ack its redelivery"
        );
        let second = next(&mut r).await;
        assert_eq!(text(&second), "second");
        assert_eq!(r.nack(second.event_id), Settled::Done);
        let third = next(&mut r).await;
        assert_eq!((text(&third).as_str(), third.attempt), ("second", 2));
    }

    #[tokio::test]
    async fn streams_of_one_group_never_hold_one_conversation_at_once() {
        let inbox = open(None, settings());
        let mut a = inbox
            .subscribe(Subscription::default(), None)
            .await
            .expect("a");
        let mut b = inbox
            .subscribe(Subscription::default(), None)
            .await
            .expect("b");
        let batch: Vec<InboundEvent> = (0..4)
            .flat_map(|i| {
                [
                    event("B", "c1", &format!("x{i}"), &format!("c1-{i}")),
                    event("B", "c2", &format!("y{i}"), &format!("c2-{i}")),
                ]
            })
            .collect();
        inbox.append("slack", batch).await.expect("stored");
        let da = next(&mut a).await;
        let db = next(&mut b).await;
        let conv = |d: &Delivered| text(d)[..2].to_string();
        assert_ne!(
            conv(&da),
            conv(&db),
            "each stream holds its own conversation"
        );
        nothing(&mut a, 30).await;
        nothing(&mut b, 30).await;
        // Stream a goes away unacked: its conversation moves to b, in order, flagged.
        let held_by_a = conv(&da);
        drop(a);
        b.ack(db.event_id);
        let mut seen = Vec::new();
        for _ in 0..2 {
            let d = next(&mut b).await;
            seen.push((text(&d).to_string(), d.redelivered));
            b.ack(d.event_id);
        }
        assert!(seen.contains(&(format!("{held_by_a}-0"), true)), "{seen:?}");
    }

    #[tokio::test]
    async fn each_group_gets_every_event_and_a_caller_sees_only_its_bots() {
        let inbox = open(None, settings());
        let mut other = inbox
            .subscribe(
                Subscription {
                    group: "audit".into(),
                    ..Default::default()
                },
                None,
            )
            .await
            .expect("audit");
        let mut only_a = inbox
            .subscribe(Subscription::default(), Some(vec!["A".into()]))
            .await
            .expect("default");
        inbox
            .append(
                "slack",
                vec![
                    event("A", "c1", "1", "for A"),
                    event("Z", "c2", "2", "for Z"),
                ],
            )
            .await
            .expect("stored");
        let d = next(&mut only_a).await;
        assert_eq!(text(&d), "for A");
        nothing(&mut only_a, 50).await;
        let mut audit = vec![
            text(&next(&mut other).await).to_string(),
            text(&next(&mut other).await).to_string(),
        ];
        audit.sort();
        assert_eq!(audit, ["for A", "for Z"]);
        // Z's event waits in the default group for a stream that may see it.
        let mut z = inbox
            .subscribe(
                Subscription {
                    bot_ids: vec!["Z".into()],
                    ..Default::default()
                },
                None,
            )
            .await
            .expect("z");
        assert_eq!(text(&next(&mut z).await), "for Z");
    }

    #[tokio::test]
    async fn a_full_inbox_asks_the_channel_to_retry() {
        let inbox = open(
            None,
            InboxSettings {
                max_events: 2,
                ..settings()
            },
        );
        inbox
            .append(
                "slack",
                vec![event("B", "c1", "1", "a"), event("B", "c1", "2", "b")],
            )
            .await
            .expect("room");
        let full = inbox
            .append("slack", vec![event("B", "c1", "3", "c")])
            .await;
        assert!(matches!(full, Err(SinkError::Full { .. })), "{full:?}");
        let mut r = inbox
            .subscribe(Subscription::default(), None)
            .await
            .expect("subscribe");
        let d = next(&mut r).await;
        r.ack(d.event_id);
        inbox
            .append("slack", vec![event("B", "c1", "3", "c")])
            .await
            .expect("room again");
    }

    #[tokio::test]
    async fn events_past_the_retention_expire() {
        let inbox = open(
            None,
            InboxSettings {
                retention: Duration::from_millis(100),
                ..settings()
            },
        );
        inbox
            .append("slack", vec![event("B", "c1", "1", "old")])
            .await
            .expect("stored");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(inbox.pending(), 0);
        let mut r = inbox
            .subscribe(Subscription::default(), None)
            .await
            .expect("subscribe");
        nothing(&mut r, 50).await;
    }

    #[tokio::test]
    async fn an_idle_group_is_removed_and_holds_nothing_back() {
        let inbox = open(
            None,
            InboxSettings {
                group_idle: Duration::from_millis(100),
                ..settings()
            },
        );
        let watch = inbox
            .subscribe(
                Subscription {
                    group: "watch".into(),
                    ..Default::default()
                },
                None,
            )
            .await
            .expect("watch");
        drop(watch);
        inbox
            .append("slack", vec![event("B", "c1", "1", "kept for both")])
            .await
            .expect("stored");
        let mut r = inbox
            .subscribe(Subscription::default(), None)
            .await
            .expect("default");
        let d = next(&mut r).await;
        r.ack(d.event_id);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(inbox.pending(), 1, "still kept for the watch group");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(inbox.pending(), 0, "released with the idle group");
        inbox
            .append("slack", vec![event("B", "c1", "2", "default only")])
            .await
            .expect("stored");
        let d = next(&mut r).await;
        r.ack(d.event_id);
        assert_eq!(inbox.pending(), 0, "no copy kept for the removed group");
    }

    #[tokio::test]
    async fn consumer_groups_are_bounded() {
        let inbox = open(None, settings());
        let mut kept = Vec::new();
        // `default` exists already.
        for i in 1..MAX_GROUPS {
            let sub = Subscription {
                group: format!("g{i}"),
                ..Default::default()
            };
            kept.push(inbox.subscribe(sub, None).await.expect("room for it"));
        }
        let one_more = Subscription {
            group: "one-more".into(),
            ..Default::default()
        };
        let e = inbox.subscribe(one_more, None).await.err();
        assert_eq!(e, Some(ReceiveError::TooManyGroups(MAX_GROUPS)));
        // A group that exists is always joined.
        let again = Subscription {
            group: "g1".into(),
            ..Default::default()
        };
        inbox
            .subscribe(again, None)
            .await
            .expect("an existing group");
    }

    #[tokio::test]
    async fn a_bad_subscription_names_its_field() {
        let inbox = open(None, settings());
        let e = inbox
            .subscribe(
                Subscription {
                    group: "no spaces".into(),
                    ..Default::default()
                },
                None,
            )
            .await
            .err();
        assert!(
            matches!(
                e,
                Some(ReceiveError::Invalid {
                    field: "subscribe.group",
                    ..
                })
            ),
            "{e:?}"
        );
        let e = inbox
            .subscribe(
                Subscription {
                    max_in_flight: 1_000_000,
                    ..Default::default()
                },
                None,
            )
            .await
            .err();
        assert!(
            matches!(
                e,
                Some(ReceiveError::Invalid {
                    field: "subscribe.max_in_flight",
                    ..
                })
            ),
            "{e:?}"
        );
    }
}
