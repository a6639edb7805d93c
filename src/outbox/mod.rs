//! The outbox: accepted messages and their delivery records, behind a trait with durable
//! backends (SQLite with group commit, `sqlite`; PostgreSQL, `postgres`) and an in-memory one.
//!
//! Owns what must survive a restart: each accepted message with its conversation and sequence,
//! its state, attempts, receipts and last error, and idempotency keys. Knows nothing of gRPC
//! or any channel's JSON; never decides ordering (the dispatcher does).

mod codec;
mod durable;
mod overlay;
mod postgres;
mod sqlite;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub(crate) use durable::Commits;
pub use durable::Durable;
#[doc(hidden)]
pub use postgres::planned_once;
pub use postgres::{Feed, PostgresStore};
pub use sqlite::SqliteStore;

use crate::channels::{ChannelError, NativeReceipt};
use crate::model::{Message, ProactiveOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    Accepted,
    Delivering,
    Delivered,
    Failed,
    Expired,
}

impl DeliveryState {
    /// The word the API and the stores use for it.
    pub fn word(self) -> &'static str {
        codec::state_word(self)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Delivered | Self::Failed | Self::Expired)
    }
}

/// What happened to one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub state: DeliveryState,
    pub receipts: Vec<NativeReceipt>,
    pub error: Option<ChannelError>,
    pub attempts: u32,
    pub possible_duplicate: bool,
}

/// One accepted message as kept in the outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Global acceptance sequence: within a conversation, delivery order.
    pub id: u64,
    /// `channel/bot/conversation`, as the dispatcher keys it.
    pub conversation: String,
    /// Shared with the dispatcher's copy: appending a message does not copy it.
    pub message: Arc<Message>,
    /// Set for SendProactive; with no conversation in the address, one is started first.
    /// Shared by every message of one proactive start: its options (a topic, members) are
    /// held once in memory, however many messages the start carries.
    pub proactive: Option<Arc<ProactiveOptions>>,
    /// Unix milliseconds.
    pub accepted_at_ms: u64,
    /// Where its delivery stands: the part that changes on every attempt.
    #[serde(flatten)]
    pub record: StateRecord,
    /// Adaptations made when it was rendered at acceptance.
    #[serde(default)]
    pub warnings: Vec<crate::model::Warning>,
    /// Set when this is not a message to send but a change of one sent before (UpdateMessage,
    /// DeleteMessage): it waits in the same line, behind the message it changes.
    #[serde(default)]
    pub op: Option<Operation>,
}

/// A change of a message sent before, by the gateway's id of that message (its `target`).
/// An update carries the new message in its record; a delete only the target's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Operation {
    Update {
        target: u64,
    },
    Delete {
        target: u64,
    },
    /// A StreamReply: its text arrives while it holds the line. Not resumed after a crash (its
    /// text is gone with the process): it is finished with what it showed then.
    Stream,
}

impl Operation {
    /// The message an update or delete changes.
    pub fn target(self) -> Option<u64> {
        match self {
            Operation::Update { target } | Operation::Delete { target } => Some(target),
            Operation::Stream => None,
        }
    }

    /// The RPC's word for it, in errors and logs.
    pub fn verb(self) -> &'static str {
        match self {
            Operation::Update { .. } => "update",
            Operation::Delete { .. } => "delete",
            Operation::Stream => "stream",
        }
    }
}

impl StoredMessage {
    pub fn outcome(&self) -> Outcome {
        let r = &self.record;
        Outcome {
            state: r.state,
            receipts: r.receipts.clone(),
            error: r.error.clone(),
            attempts: r.attempts,
            possible_duplicate: r.possible_duplicate,
        }
    }
}

/// A change to a stored message.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// About to call the channel (from now on a crash may leave a duplicate).
    Delivering { attempts: u32 },
    /// Back to waiting before a call (a rate scope, a 429's Retry-After) with no call of it
    /// that may have reached the channel: a crash now does not flag it.
    Waiting { attempts: u32 },
    /// The final outcome. It replaces the whole state: its `possible_duplicate` is the message's
    /// whole flag (the dispatcher folds in what the record said before), so a backend never
    /// needs to read the previous state to record it.
    Finished(Outcome),
    /// A proactive start created its conversation: the message now belongs to it.
    Moved {
        conversation: String,
        message: Arc<Message>,
    },
    /// Redeliver: back in line as accepted.
    Requeued,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("outbox storage: {0}")]
    Storage(String),
    #[error("outbox is closed")]
    Closed,
    /// Another replica's acceptance with the same idempotency key committed first: nothing of
    /// this one was stored, and the caller is answered from the first.
    #[error("the idempotency key was taken by another replica's acceptance")]
    KeyTaken,
    /// A fenced write made after this replica lost the message's partition: nothing changed.
    #[error("the message's partition is no longer held by this replica")]
    Fenced,
}

/// A state write's fence: it changes the row only while this replica holds `partition` at
/// `epoch` with its lease running (see `crate::storage::lease::FENCE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub partition: u32,
    pub epoch: i64,
}

/// What an idempotency key accepted the first time: its messages, whose current records make
/// the answer to a retry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub created_at_ms: u64,
    pub message_ids: Vec<u64>,
}

pub trait Store: Send + Sync + 'static {
    /// Appends accepted messages, with the idempotency key that accepted them, atomically.
    /// Called under the conversation's lock: must not block; the returned future resolves once
    /// they are on disk.
    fn append(
        &self,
        messages: Vec<StoredMessage>,
        idempotency: Option<(String, IdempotencyRecord)>,
    ) -> Durable;
    /// Records a change; the future resolves once it is on disk.
    fn update(&self, id: u64, change: Change) -> Durable;
    /// Records a change nobody waits for (a final outcome: losing it in a crash only means a
    /// flagged redelivery). A store may then skip building the acknowledgement.
    fn record(&self, id: u64, change: Change) {
        drop(self.update(id, change));
    }
    /// `update` under a fence: resolves with [`StoreError::Fenced`] when the partition moved
    /// on. Only a store shared by replicas fences; the others write as `update` does.
    fn update_fenced(&self, id: u64, change: Change, fence: Option<Fence>) -> Durable {
        let _ = fence;
        self.update(id, change)
    }
    /// `record` under a fence: a stale write is dropped. Nobody has to wait (a failed commit
    /// keeps the change for the next, as `record` does), but one may: the future resolves when
    /// the commit that first carried it is done (with its error, if it failed).
    fn record_fenced(&self, id: u64, change: Change, fence: Option<Fence>) -> Durable {
        let _ = fence;
        self.record(id, change);
        Durable::ready()
    }
    /// Reads are futures so an engine across the network (PostgreSQL) fits the same seam, and
    /// they return their errors: a store that cannot answer is not a message that is unknown.
    fn get(&self, id: u64) -> BoxFuture<'_, Result<Option<StoredMessage>, StoreError>>;
    /// Messages not finished, in acceptance order (for resuming after a restart).
    fn pending(&self) -> BoxFuture<'_, Result<Vec<StoredMessage>, StoreError>>;
    /// Failed and expired messages, newest last, starting after `after_id`.
    fn failed(
        &self,
        after_id: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredMessage>, StoreError>>;
    /// The smallest id never used.
    fn next_id(&self) -> u64;
    fn idempotency_get<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<IdempotencyRecord>, StoreError>>;
    /// Why the store stopped taking writes, once it did (a failed write leaves what is on disk
    /// unknown, so nothing more is acknowledged until a restart).
    fn failure(&self) -> Option<String> {
        None
    }
    /// Whether a [`Store::failure`] ends on its own: an engine across the network (PostgreSQL)
    /// that is unreachable for a while, rather than a local write that failed for good (SQLite).
    /// While it lasts the gateway is not ready; once `failure()` is `None` again, it is.
    fn transient(&self) -> bool {
        false
    }
    /// The writer's commit counts, for a store that commits (not the in-memory one).
    fn commit_stats(&self) -> Option<Arc<CommitStats>> {
        None
    }
    /// Drops delivered messages finished before `cutoff_ms` and idempotency keys created before
    /// `idem_cutoff_ms`; returns how many messages went.
    fn compact(&self, cutoff_ms: u64, idem_cutoff_ms: u64) -> BoxFuture<'_, usize>;
}

/// What a durable store's writer did: commits, the changes they carried, their time, and the
/// ones that failed. Counted by the writer, read by the metrics at each scrape.
#[derive(Debug)]
pub struct CommitStats {
    pub commits: std::sync::atomic::AtomicU64,
    /// Changes the commits carried (a message appended, a state changed, a key); SQLite counts
    /// the changes of one message folded into one row once.
    pub rows: std::sync::atomic::AtomicU64,
    /// How long each commit took, failed ones included.
    pub seconds: prometheus_client::metrics::histogram::Histogram,
    pub failures: std::sync::atomic::AtomicU64,
}

impl Default for CommitStats {
    fn default() -> Self {
        Self {
            commits: Default::default(),
            rows: Default::default(),
            // 0.1 ms .. ~3.3 s: an fsync on a fast disk up to a database far away or stalled.
            seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 16),
            ),
            failures: Default::default(),
        }
    }
}

impl CommitStats {
    pub fn record(&self, rows: usize, took: std::time::Duration, ok: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if ok {
            self.commits.fetch_add(1, Relaxed);
            self.rows.fetch_add(rows as u64, Relaxed);
        } else {
            self.failures.fetch_add(1, Relaxed);
        }
        self.seconds.observe(took.as_secs_f64());
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// The part of a record that changes on every attempt; the durable store keeps it apart from
/// the message body so a state change never has to read or rewrite the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    pub state: DeliveryState,
    pub attempts: u32,
    pub receipts: Vec<NativeReceipt>,
    pub error: Option<ChannelError>,
    pub possible_duplicate: bool,
    pub updated_at_ms: u64,
}

impl StateRecord {
    /// A message just accepted (or, `Delivering`, accepted as next in its line).
    pub fn new(state: DeliveryState, at_ms: u64) -> Self {
        Self {
            state,
            attempts: 0,
            receipts: Vec::new(),
            error: None,
            possible_duplicate: false,
            updated_at_ms: at_ms,
        }
    }
}

/// Applies a change that touches only the state (every change but `Moved`, which is ignored
/// here): shared by both backends so they cannot drift.
pub(crate) fn apply_state(s: &mut StateRecord, change: Change) {
    s.updated_at_ms = now_ms();
    match change {
        Change::Delivering { attempts } => {
            s.state = DeliveryState::Delivering;
            s.attempts = attempts;
        }
        Change::Waiting { attempts } => {
            s.state = DeliveryState::Accepted;
            s.attempts = attempts;
        }
        Change::Finished(o) => {
            s.state = o.state;
            s.attempts = o.attempts;
            s.receipts = o.receipts;
            s.error = o.error;
            s.possible_duplicate = o.possible_duplicate;
        }
        Change::Requeued => {
            s.state = DeliveryState::Accepted;
            s.error = None;
        }
        Change::Moved { .. } => {}
    }
}

/// Applies any change to a whole record.
pub(crate) fn apply(m: &mut StoredMessage, change: Change) {
    match change {
        Change::Moved {
            conversation,
            message,
        } => {
            m.record.updated_at_ms = now_ms();
            m.conversation = conversation;
            m.message = message;
        }
        other => apply_state(&mut m.record, other),
    }
}

/// Loses everything on a crash; kept for tests, benchmarks and deployments that accept that.
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

#[derive(Default)]
struct MemoryInner {
    messages: BTreeMap<u64, StoredMessage>,
    idempotency: HashMap<String, IdempotencyRecord>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(MemoryInner::default()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut MemoryInner) -> T) -> T {
        // Each update is a single assignment, so a panic elsewhere cannot leave a half-written
        // record: recover the guard rather than poison the gateway.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }
}

impl Store for MemoryStore {
    fn append(
        &self,
        messages: Vec<StoredMessage>,
        idempotency: Option<(String, IdempotencyRecord)>,
    ) -> Durable {
        self.with(|s| {
            for m in messages {
                s.messages.insert(m.id, m);
            }
            if let Some((k, r)) = idempotency {
                s.idempotency.insert(k, r);
            }
        });
        Durable::ready()
    }

    fn update(&self, id: u64, change: Change) -> Durable {
        self.with(|s| {
            if let Some(m) = s.messages.get_mut(&id) {
                apply(m, change);
            }
        });
        Durable::ready()
    }

    fn get(&self, id: u64) -> BoxFuture<'_, Result<Option<StoredMessage>, StoreError>> {
        let found = self.with(|s| s.messages.get(&id).cloned());
        Box::pin(std::future::ready(Ok(found)))
    }

    fn pending(&self) -> BoxFuture<'_, Result<Vec<StoredMessage>, StoreError>> {
        let found = self.with(|s| {
            s.messages
                .values()
                .filter(|m| !m.record.state.is_terminal())
                .cloned()
                .collect()
        });
        Box::pin(std::future::ready(Ok(found)))
    }

    fn failed(
        &self,
        after_id: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredMessage>, StoreError>> {
        let found = self.with(|s| {
            s.messages
                .range(after_id.saturating_add(1)..)
                .map(|(_, m)| m)
                .filter(|m| {
                    matches!(
                        m.record.state,
                        DeliveryState::Failed | DeliveryState::Expired
                    )
                })
                .take(limit)
                .cloned()
                .collect()
        });
        Box::pin(std::future::ready(Ok(found)))
    }

    fn next_id(&self) -> u64 {
        // Ids from a time base: a restarted in-memory gateway does not reuse an id a bot may hold.
        let floor = now_ms().saturating_mul(1000);
        self.with(|s| {
            s.messages
                .keys()
                .next_back()
                .map_or(floor, |k| (k + 1).max(floor))
        })
    }

    fn idempotency_get<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<IdempotencyRecord>, StoreError>> {
        let found = self.with(|s| s.idempotency.get(key).cloned());
        Box::pin(std::future::ready(Ok(found)))
    }

    fn compact(&self, cutoff_ms: u64, idem_cutoff_ms: u64) -> BoxFuture<'_, usize> {
        let n = self.with(|s| {
            let before = s.messages.len();
            s.messages.retain(|_, m| {
                let r = &m.record;
                !(r.state == DeliveryState::Delivered && r.updated_at_ms < cutoff_ms)
            });
            s.idempotency
                .retain(|_, r| r.created_at_ms >= idem_cutoff_ms);
            before - s.messages.len()
        });
        Box::pin(std::future::ready(n))
    }
}
