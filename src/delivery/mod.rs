//! The ordering engine: one worker per active conversation, strictly in sequence.
//!
//! Owns sequencing, batching, typing keep-alive, retries in place and the global concurrency
//! limit. It sees native requests as opaque values handed to `channels`; it must not build or
//! read any channel's JSON, nor know about gRPC.
//!
//! A conversation's worker is created on its first message and evicts itself after an idle
//! period. Senders enqueue while holding the registry shard's lock and the worker decides its
//! eviction under that same lock, so a message can never land in a queue nobody reads.

pub mod rate;
pub mod retry;
mod shared;
mod stream;

pub use shared::Cluster;

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::FutureExt;
use std::panic::AssertUnwindSafe;
use tokio::sync::{Notify, Semaphore, broadcast, oneshot};

pub use stream::{StreamEvent, StreamFeed, StreamMode, render as stream_render};
use tracing::Instrument;

use crate::bounded::later_tokio;
use crate::channels::{
    ChannelError, Channels, FailureKind, NativeReceipt, NativeRequest, Rendered,
};
use crate::config::DeliveryConfig;
use crate::metrics::Metrics;
use crate::model::{Address, Message, ProactiveOptions};
use crate::outbox::{
    Change, DeliveryState, Durable, Fence, IdempotencyRecord, Operation, Outcome, StateRecord,
    Store, StoredMessage, now_ms,
};

const SHARDS: usize = 64;

/// (channel id, bot id, conversation id); a proactive start without a conversation is keyed by
/// the user until the channel names the new conversation.
///
/// Held as one string, `channel/bot/conversation` (the conversation's label in logs and in the
/// outbox), with the lengths of the first two parts: an id may contain '/', and the lengths
/// keep two conversations from sharing a key. Every Send builds one to find its line, so it is
/// one allocation rather than three, and the label is not formatted again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConversationKey {
    label: String,
    channel_len: usize,
    bot_len: usize,
}

impl ConversationKey {
    pub fn of(addr: &Address) -> Self {
        let (prefix, conversation) = match addr.conversation_id() {
            Some(id) => ("", id),
            None => ("user:", addr.user_id()),
        };
        Self::new(&addr.channel_id, addr.bot_id(), prefix, conversation)
    }

    fn new(channel_id: &str, bot_id: &str, prefix: &str, conversation: &str) -> Self {
        let mut label = String::with_capacity(
            channel_id.len() + bot_id.len() + prefix.len() + conversation.len() + 2,
        );
        for part in [channel_id, "/", bot_id, "/", prefix, conversation] {
            label.push_str(part);
        }
        Self {
            label,
            channel_len: channel_id.len(),
            bot_len: bot_id.len(),
        }
    }

    pub fn channel_id(&self) -> &str {
        self.label.get(..self.channel_len).unwrap_or_default()
    }

    pub fn bot_id(&self) -> &str {
        let start = self.channel_len + 1;
        self.label
            .get(start..start + self.bot_len)
            .unwrap_or_default()
    }

    pub fn conversation(&self) -> &str {
        let start = self.channel_len + self.bot_len + 2;
        self.label.get(start..).unwrap_or_default()
    }

    /// `channel/bot/conversation`.
    pub fn label(&self) -> &str {
        &self.label
    }
}

/// One accepted message on its way.
struct Item {
    id: u64,
    /// Shared with the outbox's copy of the message until both are done with it.
    message: Arc<Message>,
    rendered: Rendered,
    proactive: Option<Arc<ProactiveOptions>>,
    accepted_at: Instant,
    /// Resolves once the message is in the outbox; nothing is sent before.
    durable: Durable,
    /// A previous run may already have sent it (it was being delivered at a crash).
    possible_duplicate: bool,
    /// Set once the outbox was told it is being delivered, ahead of the worker: at append when
    /// it is next in line (see `enqueue`), or while the message before it was on its way (see
    /// `Worker::premark_next`). Resolves when that mark is durable.
    delivering: Option<Durable>,
    /// Typing indicators are not kept in the outbox.
    ephemeral: bool,
    traceparent: Option<String>,
    done: Option<oneshot::Sender<Outcome>>,
    /// Its request bodies were dropped while it waited far back in its line (`SHED_AFTER`); it
    /// is rendered again when its turn comes.
    shed: bool,
    /// Replicas sharing a database: the partition lease it is delivered under. Its state
    /// writes are fenced by it, and it leaves memory undelivered once the lease is gone.
    fence: Option<Fence>,
    /// Which of this replica's takes of the partition it was read in (`Cluster::tenure`): after
    /// a lapse the partition is read again, and what the earlier take put in line goes.
    tenure: u64,
    /// Left undelivered because its partition moved to another replica.
    handed_over: bool,
    /// Its mark, taken back as it was handed over: its partition is drained once written.
    taken_back: Option<Durable>,
    /// An update or delete of a message sent before: its requests are planned when its turn
    /// comes, from the target's receipts then (`Worker::plan_operation`).
    op: Option<Operation>,
}

/// A message with this many ahead of it in its conversation keeps its requests without their
/// bodies until its turn. A rendered body is a JSON tree several times the size of the message
/// (about 2.5 KB for a short text), and a backlog would hold one per message: rendering again
/// costs a few microseconds per message once a backlog forms, and nothing before.
const SHED_AFTER: usize = 32;

/// Replicas: the longest wait for a shared rate scope a message waits through still marked
/// delivering. Pacing waits are usually this short; a kill during one flags the message (one
/// per conversation at most). Longer waits take the mark back, so a pause of seconds flags
/// nothing.
const HOLD_MARK_FOR: Duration = Duration::from_secs(1);

/// Whether a message marked for its call is still this replica's to send.
enum Held {
    Here,
    /// Its partition moved on: it was given up here, with the write taking its mark back.
    GaveUp(Option<Durable>),
}

impl Item {
    fn shed_bodies(&mut self) {
        if self.ephemeral || self.rendered.requests.is_empty() {
            return;
        }
        self.rendered.drop_bodies();
        self.shed = true;
    }
}

enum Job {
    /// Messages delivered back to back; `flush` skips the auto-batch window.
    Deliver { items: Vec<Item>, flush: bool },
    /// A StreamReply: holds the line until its events end (`stream.rs`).
    Stream { item: Box<Item>, feed: StreamFeed },
    Typing {
        item: Box<Item>,
        keep_alive: Option<Duration>,
    },
    Proactive {
        address: Box<Address>,
        options: Arc<ProactiveOptions>,
        items: Vec<Item>,
        created: Option<oneshot::Sender<Result<Address, ChannelError>>>,
    },
}

impl Job {
    fn items(&self) -> Vec<&Item> {
        match self {
            Job::Deliver { items, .. } | Job::Proactive { items, .. } => items.iter().collect(),
            Job::Typing { item, .. } | Job::Stream { item, .. } => vec![item.as_ref()],
        }
    }

    fn items_mut(&mut self) -> Vec<&mut Item> {
        match self {
            Job::Deliver { items, .. } | Job::Proactive { items, .. } => items.iter_mut().collect(),
            Job::Typing { item, .. } | Job::Stream { item, .. } => vec![item.as_mut()],
        }
    }
}

/// Resolves to the new address once a proactive start created its conversation.
pub type Created = oneshot::Receiver<Result<Address, ChannelError>>;

/// What the caller gets back for each accepted message.
pub struct Ticket {
    pub id: u64,
    /// Resolves when the message reaches a final state (only when asked for).
    pub outcome: Option<oneshot::Receiver<Outcome>>,
}

/// Accepted messages; `durable` resolves once they are in the outbox.
pub struct Accepted {
    pub tickets: Vec<Ticket>,
    pub durable: Durable,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the gateway is shutting down")]
    ShuttingDown,
    #[error("{bound} ({limit}) reached: {pending} messages not yet delivered")]
    Backpressure {
        bound: &'static str,
        limit: usize,
        pending: usize,
    },
    #[error("message {0} is not in the outbox (unknown or compacted)")]
    NotFound(u64),
    #[error("message {0} is not failed: only failed or expired messages can be redelivered")]
    NotFailed(u64),
    /// A change (an update, a delete, a stream) is not put back in line: behind later changes
    /// of its message it would show an older version again.
    #[error(
        "message {0} is a {1}, not a message: changes are not redelivered (behind later ones \
         they could show an older version again); make a new one"
    )]
    NotRedeliverable(u64, &'static str),
    /// A StreamReply reached a replica that does not deliver its conversation.
    #[error(
        "this replica does not deliver this conversation now, and a streamed reply's text lives \
         in the process that takes it: stream through another replica, or send the final \
         message with Send"
    )]
    NotHere,
    #[error(transparent)]
    Store(crate::outbox::StoreError),
}

/// A change of a message's state, for watchers.
#[derive(Debug, Clone)]
pub struct DeliveryEvent {
    pub id: u64,
    pub channel_id: String,
    pub bot_id: String,
    pub conversation_id: String,
    pub outcome: Outcome,
}

/// One conversation's line, shared by its senders and its worker. Deliberately small: an active
/// conversation should cost hundreds of bytes, and an empty `VecDeque` allocates nothing.
struct Line {
    /// Pushed only under the registry shard's lock, so the worker's eviction check (made under
    /// that lock) sees every job.
    jobs: Mutex<VecDeque<Box<Job>>>,
    /// Wakes the worker; a notification sent while it is busy is kept for its next wait.
    ready: Notify,
    /// Messages queued or in delivery for this conversation (backpressure).
    queued: AtomicUsize,
    /// Wakes a Send waiting for room (`delivery.max_wait_for_room`) when a message leaves.
    room: Notify,
    /// Cleared when the worker ends (evicted, or panicked): a sender then starts a new one.
    alive: AtomicBool,
}

impl Line {
    fn new(queued: usize) -> Self {
        Self {
            jobs: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            queued: AtomicUsize::new(queued),
            room: Notify::new(),
            alive: AtomicBool::new(true),
        }
    }

    fn jobs(&self) -> MutexGuard<'_, VecDeque<Box<Job>>> {
        // Push and pop are single steps: a panic cannot leave the queue half changed.
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, job: Box<Job>) {
        self.jobs().push_back(job);
        self.ready.notify_one();
    }

    fn pop(&self) -> Option<Job> {
        self.jobs().pop_front().map(|j| *j)
    }

    /// `n` messages left this line (finished, or moved to another line).
    fn left(&self, n: usize, waits: bool) {
        self.queued.fetch_sub(n, Ordering::SeqCst);
        if waits {
            // One waiter per freed slot; a permit kept when nobody waits only costs the next
            // waiter a second look at the line.
            for _ in 0..n {
                self.room.notify_one();
            }
        }
    }
}

/// A new job, accepted at once or waiting for room in its conversation's line.
enum Submitted {
    Accepted(Accepted),
    // Boxed: the wait is the rare path, and every Send's future holds this value.
    Waiting(std::pin::Pin<Box<dyn Future<Output = Result<Accepted, SubmitError>> + Send>>),
}

impl Submitted {
    async fn accepted(self) -> Result<Accepted, SubmitError> {
        match self {
            Submitted::Accepted(accepted) => Ok(accepted),
            Submitted::Waiting(wait) => wait.await,
        }
    }
}

/// What `enqueue` did with a job.
enum Enqueued {
    Done(Accepted),
    /// The conversation's line is full and Sends wait for room: the job comes back, with the
    /// line to wait on.
    Full(Box<Waiting>),
}

struct Waiting {
    job: Job,
    admission: Admission,
    outcome_rxs: Vec<Option<oneshot::Receiver<Outcome>>>,
    line: Arc<Line>,
}

struct Entry {
    line: Arc<Line>,
}

struct Inner {
    shards: Vec<Mutex<HashMap<ConversationKey, Entry>>>,
    channels: Arc<Channels>,
    store: Arc<dyn Store>,
    config: DeliveryConfig,
    permits: Semaphore,
    rates: rate::ScopeLimiter,
    accepting: AtomicBool,
    workers: AtomicUsize,
    /// Accepted messages not yet in a final state (typing included), for draining and bounds.
    undelivered: AtomicUsize,
    drained: Notify,
    next_id: AtomicU64,
    events: broadcast::Sender<DeliveryEvent>,
    metrics: Arc<Metrics>,
    /// Set when replicas share the outbox (`Dispatcher::share`).
    cluster: std::sync::OnceLock<Arc<Cluster>>,
}

/// Handle to the ordering engine; cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

/// A message ready to accept: validated, rendered, with its warnings.
pub struct Submission {
    pub message: Message,
    pub rendered: Rendered,
    /// The caller's W3C `traceparent`, carried into the delivery span.
    pub traceparent: Option<String>,
    /// Set for UpdateMessage and DeleteMessage.
    pub op: Option<Operation>,
}

impl Dispatcher {
    pub fn new(
        channels: Arc<Channels>,
        store: Arc<dyn Store>,
        config: DeliveryConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                channels,
                next_id: AtomicU64::new(store.next_id()),
                store,
                permits: Semaphore::new(config.max_concurrency),
                rates: rate::ScopeLimiter::default(),
                config,
                accepting: AtomicBool::new(true),
                workers: AtomicUsize::new(0),
                undelivered: AtomicUsize::new(0),
                drained: Notify::new(),
                events,
                metrics,
                cluster: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Delivers only what this replica's partitions hold, read from the shared outbox (see
    /// `shared.rs`); every Send is stored first and delivered by its partition's owner. Called
    /// once, before serving.
    pub fn share(
        &self,
        cluster: Arc<Cluster>,
        wakes: broadcast::Receiver<crate::storage::notify::Wake>,
    ) {
        if self.inner.cluster.set(cluster.clone()).is_err() {
            return;
        }
        let lines: Arc<dyn shared::Lines> = Arc::new(Feeder(self.inner.clone()));
        tokio::spawn(shared::run_feed(cluster, lines, wakes));
    }

    pub fn channels(&self) -> &Channels {
        &self.inner.channels
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// State changes of every message from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<DeliveryEvent> {
        self.inner.events.subscribe()
    }

    /// Conversation workers alive now.
    pub fn active_workers(&self) -> usize {
        self.inner.workers.load(Ordering::Relaxed)
    }

    /// Messages accepted and not yet finished.
    pub fn undelivered(&self) -> usize {
        self.inner.undelivered.load(Ordering::Relaxed)
    }

    /// Accepts messages for one conversation (the caller checked they share it), delivered
    /// contiguously in this order. `flush` bypasses the auto-batch window (SendBatch).
    ///
    /// Accepted (or refused) when called; the future only waits for room in the line, when
    /// `delivery.max_wait_for_room` allows it. Not an `async fn`: every Send's future holds this
    /// one, and it should not carry the messages and the job while it waits.
    pub fn submit(
        &self,
        messages: Vec<Submission>,
        flush: bool,
        want_outcome: bool,
        idempotency_key: Option<String>,
    ) -> impl Future<Output = Result<Accepted, SubmitError>> + Send + 'static {
        let submitted = match messages.first() {
            None => Ok(Submitted::Accepted(Accepted {
                tickets: Vec::new(),
                durable: Durable::ready(),
            })),
            Some(first) => {
                let key = ConversationKey::of(&first.message.address);
                let (items, rxs) = new_items(messages, None, want_outcome);
                self.inner.admit(
                    &key,
                    Job::Deliver { items, flush },
                    Admission::New(idempotency_key),
                    rxs,
                )
            }
        };
        async move { submitted?.accepted().await }
    }

    /// Accepts a StreamReply: stored, then in its conversation's line, where it holds the line
    /// while its events come (`stream.rs`). On replicas sharing a database only the one that
    /// delivers the conversation takes it (its text comes to this process): elsewhere
    /// `SubmitError::NotHere`, before anything is stored.
    pub fn submit_stream(
        &self,
        submission: Submission,
        feed: StreamFeed,
    ) -> impl Future<Output = Result<Accepted, SubmitError>> + Send + 'static {
        let key = ConversationKey::of(&submission.message.address);
        let (mut items, rxs) = new_items(vec![submission], None, true);
        let submitted = match items.pop() {
            Some(item) => self.inner.admit(
                &key,
                Job::Stream {
                    item: Box::new(item),
                    feed,
                },
                Admission::New(None),
                rxs,
            ),
            None => Ok(Submitted::Accepted(Accepted {
                tickets: Vec::new(),
                durable: Durable::ready(),
            })),
        };
        async move { submitted?.accepted().await }
    }

    /// `delivery.stream_idle_timeout`.
    pub fn stream_idle_timeout(&self) -> Duration {
        self.inner.config.stream_idle_timeout
    }

    /// Accepts a typing indicator in line with the conversation's messages.
    pub async fn submit_typing(
        &self,
        submission: Submission,
        keep_alive: Option<Duration>,
    ) -> Result<(), SubmitError> {
        let key = ConversationKey::of(&submission.message.address);
        if let Some(cluster) = self.inner.cluster.get() {
            if !self.inner.accepting.load(Ordering::SeqCst) {
                return Err(SubmitError::ShuttingDown);
            }
            if cluster.fence_for(key.label()).is_some() {
                // Behind every Send answered before it, once they are read back.
                cluster
                    .caught_up(
                        Duration::from_secs(2),
                        Cluster::conversation_hash(key.label()),
                    )
                    .await;
            } else {
                // Another replica delivers this conversation, and typing is not stored: it
                // goes from here at once, outside the conversation's line.
                let (inner, rendered) = (self.inner.clone(), submission.rendered);
                tokio::spawn(async move {
                    for req in &rendered.requests {
                        if let Err(e) = inner.channels.execute(key.channel_id(), req).await {
                            tracing::warn!(error = %e, "typing indicator not delivered");
                        }
                    }
                });
                return Ok(());
            }
        }
        let (mut items, _) = new_items(vec![submission], None, false);
        let Some(mut item) = items.pop() else {
            return Ok(());
        };
        item.ephemeral = true;
        self.inner
            .admit(
                &key,
                Job::Typing {
                    item: Box::new(item),
                    keep_alive,
                },
                Admission::New(None),
                Vec::new(),
            )?
            .accepted()
            .await
            .map(|_| ())
    }

    /// Starts a conversation, then delivers `messages` to it. The receiver yields the new
    /// address once the channel created it and the messages are queued on it, so a Send to the
    /// new address made after that can never overtake them.
    pub async fn submit_proactive(
        &self,
        address: Address,
        options: ProactiveOptions,
        messages: Vec<Submission>,
        want_outcome: bool,
        idempotency_key: Option<String>,
    ) -> Result<(Accepted, Created), SubmitError> {
        let key = ConversationKey::of(&address);
        let options = Arc::new(options);
        let (items, rxs) = new_items(messages, Some(&options), want_outcome);
        let (tx, rx) = oneshot::channel();
        let accepted = self
            .inner
            .admit(
                &key,
                Job::Proactive {
                    address: Box::new(address),
                    options,
                    items,
                    created: Some(tx),
                },
                Admission::New(idempotency_key),
                rxs,
            )?
            .accepted()
            .await?;
        Ok((accepted, rx))
    }

    /// Puts every unfinished message of the outbox back in line, per conversation in acceptance
    /// order. Called once at start, before serving. Returns how many were resumed.
    pub async fn resume(&self) -> Result<usize, crate::outbox::StoreError> {
        if self.inner.cluster.get().is_some() {
            // Each partition's unfinished messages are read when its lease is taken.
            return Ok(0);
        }
        let pending = self.inner.store.pending().await?;
        let n = pending.len();
        // Consecutive messages of one conversation (and one proactive start) form one job.
        let mut groups: Vec<(ConversationKey, bool, Vec<StoredMessage>)> = Vec::new();
        for m in pending {
            let key = ConversationKey::of(&m.message.address);
            let starts = m.proactive.is_some() && m.message.address.conversation_id().is_none();
            match groups.iter_mut().rev().find(|(k, _, _)| *k == key) {
                Some((_, s, list)) if *s == starts => list.push(m),
                _ => groups.push((key, starts, vec![m])),
            }
        }
        for (key, starts, list) in groups {
            self.requeue(key, starts, list);
        }
        if n > 0 {
            tracing::info!(messages = n, "resumed undelivered messages from the outbox");
        }
        Ok(n)
    }

    /// Puts failed or expired messages back in line at the end of their conversations.
    pub async fn redeliver(&self, ids: &[u64]) -> Result<(), SubmitError> {
        let mut found = Vec::with_capacity(ids.len());
        for &id in ids {
            let m = self
                .inner
                .store
                .get(id)
                .await
                .map_err(SubmitError::Store)?
                .ok_or(SubmitError::NotFound(id))?;
            if !matches!(
                m.record.state,
                DeliveryState::Failed | DeliveryState::Expired
            ) {
                return Err(SubmitError::NotFailed(id));
            }
            if let Some(op) = m.op {
                return Err(SubmitError::NotRedeliverable(id, op.verb()));
            }
            found.push(m);
        }
        if self.inner.cluster.get().is_some() {
            // Numbered again in the shared outbox: their partitions' owners read them as new.
            for m in &found {
                self.inner
                    .store
                    .update(m.id, Change::Requeued)
                    .await
                    .map_err(SubmitError::Store)?;
            }
            return Ok(());
        }
        for mut m in found {
            // Not awaited: the requeued item is delivered from memory either way.
            drop(self.inner.store.update(m.id, Change::Requeued));
            m.record.state = DeliveryState::Accepted;
            let key = ConversationKey::of(&m.message.address);
            let starts = m.proactive.is_some() && m.message.address.conversation_id().is_none();
            self.requeue(key, starts, vec![m]);
        }
        Ok(())
    }

    fn requeue(&self, key: ConversationKey, starts: bool, list: Vec<StoredMessage>) {
        self.inner.requeue(key, starts, list, None);
    }
}

/// Puts what the shared outbox's feed read in line.
struct Feeder(Arc<Inner>);

impl shared::Lines for Feeder {
    fn feed(&self, fence: Fence, tenure: u64, messages: Vec<StoredMessage>) {
        let Some(cluster) = self.0.cluster.get() else {
            return;
        };
        // Consecutive messages of one proactive start form one job, as in `resume`. A Send of
        // this replica was read without its body: its parked form has the message.
        let mut groups: Vec<(bool, ConversationKey, Vec<StoredMessage>)> = Vec::new();
        for m in messages {
            let (message, proactive) = match cluster.parked_message(m.id) {
                Some(parked) => parked,
                None => (m.message.clone(), m.proactive.is_some()),
            };
            let starts = proactive && message.address.conversation_id().is_none();
            match groups.last_mut() {
                Some((s, _, list)) if *s == starts => list.push(m),
                _ => groups.push((starts, ConversationKey::of(&message.address), vec![m])),
            }
        }
        for (starts, key, list) in groups {
            self.0.requeue(key, starts, list, Some((fence, tenure)));
        }
    }
}

impl Inner {
    /// Puts stored messages back in line: at a restart, a redelivery, or (replicas sharing a
    /// database, `fence` set) as the partition's owner reads them; a Send of this replica read
    /// back takes its parked form (rendered, with its waiting caller).
    fn requeue(
        self: &Arc<Self>,
        key: ConversationKey,
        starts: bool,
        list: Vec<StoredMessage>,
        fenced: Option<(Fence, u64)>,
    ) {
        let fence = fenced.map(|f| f.0);
        let tenure = fenced.map_or(0, |f| f.1);
        let cluster = self.cluster.get().filter(|_| fence.is_some());
        let mut items = Vec::with_capacity(list.len());
        let mut options = None;
        let mut address = None;
        let mut created = None;
        for m in list {
            if let Some(parked) = cluster.and_then(|c| c.unpark(m.id)) {
                let mut item = parked.item;
                // Marked at its append (`enqueue_shared`): the mark read back is that one only
                // under the fence it was made with, which no other replica's take shares (a
                // take has an epoch of its own, and every attempt is preceded by its taker's
                // fenced mark). Then nothing was attempted yet. Otherwise the row says what
                // happened (`accepted`: the mark did not hold) and the item is marked again
                // before it goes.
                let own_mark = item.delivering.is_some()
                    && item.fence.is_some()
                    && item.fence == fence
                    && m.record.state == DeliveryState::Delivering;
                if !own_mark {
                    item.delivering = None;
                    item.possible_duplicate |= m.record.state == DeliveryState::Delivering;
                }
                item.possible_duplicate |= m.record.possible_duplicate;
                item.fence = fence;
                item.tenure = tenure;
                if let Some(feed) = parked.stream {
                    // A stream holds the line by itself: what came before it goes first.
                    let before = std::mem::take(&mut items);
                    if !before.is_empty() {
                        self.requeue_job(
                            &key,
                            Job::Deliver {
                                items: before,
                                flush: true,
                            },
                            cluster,
                            fence,
                        );
                    }
                    self.requeue_job(
                        &key,
                        Job::Stream {
                            item: Box::new(item),
                            feed,
                        },
                        cluster,
                        fence,
                    );
                    continue;
                }
                created = created.or(parked.created);
                options = options.or(item.proactive.clone());
                address.get_or_insert_with(|| item.message.address.clone());
                items.push(item);
                continue;
            }
            let rendered = match m.op {
                // Planned when its turn comes, from its target's receipts then.
                Some(_) => Ok(Rendered::default()),
                None => self
                    .channels
                    .render_send(&m.message, m.proactive.as_deref()),
            };
            let (rendered, render_error) = match rendered {
                Ok(r) => (r, None),
                // A proactive start renders again once its conversation exists.
                Err(_) if starts => (Rendered::default(), None),
                Err(e) => (Rendered::default(), Some(e.to_string())),
            };
            options = options.or(m.proactive.clone());
            address.get_or_insert_with(|| m.message.address.clone());
            let item = Item {
                id: m.id,
                message: m.message,
                rendered,
                proactive: m.proactive,
                accepted_at: Instant::now(),
                durable: Durable::ready(),
                possible_duplicate: m.record.state == DeliveryState::Delivering
                    || m.record.possible_duplicate,
                delivering: None,
                ephemeral: false,
                traceparent: None,
                done: None,
                shed: false,
                fence,
                tenure,
                handed_over: false,
                taken_back: None,
                op: m.op,
            };
            match render_error {
                Some(reason) => {
                    self.undelivered.fetch_add(1, Ordering::SeqCst);
                    let err = ChannelError {
                        code: Some("render".into()),
                        ..ChannelError::new(key.channel_id(), FailureKind::Permanent, reason)
                    };
                    self.finish(item, failed(err, 0), None);
                }
                None => items.push(item),
            }
        }
        if items.is_empty() {
            return;
        }
        // A parked SendProactive still waits for its new address: it goes the proactive way
        // even on a channel that needs no conversation created (that way answers at once).
        let proactive = starts || created.is_some();
        let job = match (proactive, address) {
            (true, Some(address)) => Job::Proactive {
                address: Box::new(address),
                options: options.unwrap_or_default(),
                items,
                created,
            },
            _ => Job::Deliver { items, flush: true },
        };
        self.requeue_job(&key, job, cluster, fence);
    }

    /// Puts a job of messages already in the outbox in its line, counted in its partition.
    fn requeue_job(
        self: &Arc<Self>,
        key: &ConversationKey,
        job: Job,
        cluster: Option<&Arc<Cluster>>,
        fence: Option<Fence>,
    ) {
        if let (Some(c), Some(f)) = (cluster, fence) {
            c.entered(f.partition, items_in(&job));
        }
        if let Err(e) = self.enqueue(key, job, Admission::Existing, Vec::new()) {
            tracing::error!(error = %e, "cannot requeue messages");
        }
    }
}

/// A ticket per accepted id, with its outcome's receiver when the caller waits for one.
fn tickets_for(ids: &[u64], rxs: Vec<Option<oneshot::Receiver<Outcome>>>) -> Vec<Ticket> {
    ids.iter()
        .zip(rxs.into_iter().chain(std::iter::repeat_with(|| None)))
        .map(|(&id, outcome)| Ticket { id, outcome })
        .collect()
}

/// What an idempotency key keeps of an acceptance.
fn idem_record(key: String, now: u64, ids: &[u64]) -> (String, IdempotencyRecord) {
    (
        key,
        IdempotencyRecord {
            created_at_ms: now,
            message_ids: ids.to_vec(),
        },
    )
}

fn items_in(job: &Job) -> usize {
    job.items().len()
}

impl Dispatcher {
    /// Stops accepting and waits until every accepted message is finished, or `grace` passes.
    /// Returns how many were left undelivered.
    pub async fn shutdown(&self, grace: Duration) -> usize {
        self.inner.accepting.store(false, Ordering::SeqCst);
        // Sends waiting for room are answered now (UNAVAILABLE, as any Send from here on)
        // rather than holding their calls open through the drain.
        if self.inner.waits_for_room() {
            for shard in &self.inner.shards {
                let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
                for entry in shard.values() {
                    entry.line.room.notify_waiters();
                }
            }
        }
        let deadline = later_tokio(tokio::time::Instant::now(), grace);
        loop {
            let notified = self.inner.drained.notified();
            let left = self.undelivered();
            if left == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.undelivered();
            }
        }
    }
}

fn new_items(
    messages: Vec<Submission>,
    proactive: Option<&Arc<ProactiveOptions>>,
    want_outcome: bool,
) -> (Vec<Item>, Vec<Option<oneshot::Receiver<Outcome>>>) {
    let now = Instant::now();
    // Exact capacities: an `Item` waits in its line as long as its conversation's backlog, and
    // collecting one Send through `unzip` reserved room for four (~800 bytes more per message).
    let mut items = Vec::with_capacity(messages.len());
    let mut rxs = Vec::with_capacity(messages.len());
    for s in messages {
        let (tx, rx) = if want_outcome {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        items.push(Item {
            id: 0,
            message: Arc::new(s.message),
            rendered: s.rendered,
            proactive: proactive.cloned(),
            accepted_at: now,
            durable: Durable::ready(),
            possible_duplicate: false,
            delivering: None,
            ephemeral: false,
            traceparent: s.traceparent,
            done: tx,
            shed: false,
            fence: None,
            tenure: 0,
            handed_over: false,
            taken_back: None,
            op: s.op,
        });
        rxs.push(rx);
    }
    (items, rxs)
}

/// A panic's message for the log: bounded, and without control characters (it may quote input).
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    crate::bounded::for_log(text).into_owned()
}

/// The message after the one being delivered: the next of its job, or the first of the next
/// job in the line.
enum Next<'a> {
    Item(&'a mut Item),
    Queued,
}

/// The next message, and its id once `Worker::premark_next` marked it.
struct NextMark<'a> {
    next: Next<'a>,
    marked: Option<u64>,
}

/// Where a message's delivering mark stands (see `Worker::attempt_all`).
enum Mark {
    /// Not issued, or taken back: the outbox holds it as waiting.
    None,
    /// Issued, maybe not durable yet.
    Issued(Durable),
    /// Durable.
    Durable,
}

/// The outbox could not record the message or its mark: nothing was sent.
fn outbox_failed(mut out: Outcome, e: crate::outbox::StoreError) -> Outcome {
    out.state = DeliveryState::Failed;
    out.error = Some(ChannelError {
        code: Some("outbox".into()),
        ..ChannelError::new("gateway", FailureKind::Permanent, e.to_string())
    });
    out
}

fn failed(error: ChannelError, attempts: u32) -> Outcome {
    Outcome {
        state: DeliveryState::Failed,
        receipts: Vec::new(),
        error: Some(error),
        attempts,
        possible_duplicate: false,
    }
}

/// How a job enters a queue.
enum Admission {
    /// Newly accepted: gets ids, goes to the outbox, counts against the bounds.
    New(Option<String>),
    /// Already in the outbox (resume, redelivery, a proactive start moving to its conversation).
    Existing,
}

impl Inner {
    fn conversation_full(&self, pending: usize) -> SubmitError {
        SubmitError::Backpressure {
            bound: "delivery.max_pending_per_conversation",
            limit: self.config.max_pending_per_conversation,
            pending,
        }
    }

    /// `delivery.max_pending_total` for `n` more messages.
    fn check_total(&self, n: usize) -> Result<(), SubmitError> {
        let total = self.undelivered.load(Ordering::SeqCst);
        if total + n > self.config.max_pending_total {
            return Err(SubmitError::Backpressure {
                bound: "delivery.max_pending_total",
                limit: self.config.max_pending_total,
                pending: total,
            });
        }
        Ok(())
    }

    fn waits_for_room(&self) -> bool {
        !self.config.max_wait_for_room.is_zero()
    }

    fn shard(&self, key: &ConversationKey) -> MutexGuard<'_, HashMap<ConversationKey, Entry>> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let idx = (h.finish() as usize) % self.shards.len();
        // The map stays consistent across a panic (insert/remove are single steps).
        self.shards[idx].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enqueue(
        self: &Arc<Self>,
        key: &ConversationKey,
        mut job: Job,
        admission: Admission,
        outcome_rxs: Vec<Option<oneshot::Receiver<Outcome>>>,
    ) -> Result<Enqueued, SubmitError> {
        let fresh = matches!(admission, Admission::New(_));
        if fresh && !self.accepting.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        if let (Admission::New(idem), Some(cluster)) = (&admission, self.cluster.get())
            && !matches!(job, Job::Typing { .. })
        {
            let idem = idem.clone();
            return self.enqueue_shared(cluster, key, job, idem, outcome_rxs);
        }
        let n = job.items().len();
        let mut shard = self.shard(key);
        // Looked up once: the entry cannot change while the shard's lock is held, and each
        // lookup hashes the whole key.
        let existing = shard.get(key).map(|e| e.line.clone());
        if fresh {
            let in_conversation = existing
                .as_ref()
                .map_or(0, |line| line.queued.load(Ordering::SeqCst));
            if in_conversation + n > self.config.max_pending_per_conversation {
                // Only a job that could ever fit waits, and only on a line with a worker:
                // its finished messages are what make room.
                if let Some(line) = existing.filter(|line| {
                    self.waits_for_room()
                        && n <= self.config.max_pending_per_conversation
                        && line.alive.load(Ordering::SeqCst)
                }) {
                    return Ok(Enqueued::Full(Box::new(Waiting {
                        job,
                        admission,
                        outcome_rxs,
                        line,
                    })));
                }
                return Err(self.conversation_full(in_conversation));
            }
            self.check_total(n)?;
        }
        // Ids and the outbox append happen under the shard lock: acceptance order is both
        // delivery order and the order a restart resumes in.
        let mut durable = Durable::ready();
        let mut ids = Vec::with_capacity(n);
        if let Admission::New(idem) = admission {
            let label = key.label();
            let now = now_ms();
            let mut stored = Vec::with_capacity(n);
            // When nothing is queued or in delivery for this conversation, the first message
            // goes out next: it is appended already marked as being delivered, which saves the
            // worker a second durable write before its call. A crash in between only flags it as
            // a possible duplicate; if it has to wait instead (a rate scope), the worker takes
            // the mark back.
            let mut head = matches!(job, Job::Deliver { .. })
                && existing
                    .as_ref()
                    .is_none_or(|line| line.queued.load(Ordering::SeqCst) == 0);
            for item in job.items_mut() {
                item.id = self.next_id.fetch_add(1, Ordering::SeqCst);
                ids.push(item.id);
                if item.ephemeral {
                    continue;
                }
                let state = if head && !item.rendered.requests.is_empty() {
                    // Durable with the append itself, which `durable` already stands for.
                    item.delivering = Some(Durable::ready());
                    DeliveryState::Delivering
                } else {
                    DeliveryState::Accepted
                };
                head = false;
                stored.push(StoredMessage {
                    id: item.id,
                    conversation: label.to_string(),
                    message: item.message.clone(),
                    proactive: item.proactive.clone(),
                    accepted_at_ms: now,
                    record: StateRecord::new(state, now),
                    warnings: item.rendered.warnings.clone(),
                    op: item.op,
                });
            }
            let idem = idem.map(|k| idem_record(k, now, &ids));
            if !stored.is_empty() {
                self.metrics.accepted(key.channel_id(), stored.len() as u64);
            }
            if !stored.is_empty() || idem.is_some() {
                durable = self.store.append(stored, idem);
                for item in job.items_mut() {
                    item.durable = durable.clone();
                }
            }
        } else {
            ids = job.items().iter().map(|i| i.id).collect();
        }
        if let Job::Deliver { items, .. } = &mut job {
            let ahead = existing
                .as_ref()
                .map_or(0, |line| line.queued.load(Ordering::SeqCst));
            for item in items.iter_mut().skip(SHED_AFTER.saturating_sub(ahead)) {
                item.shed_bodies();
            }
        }
        self.undelivered.fetch_add(n, Ordering::SeqCst);
        let tickets = tickets_for(&ids, outcome_rxs);
        // A worker that ended without deregistering (it panicked) leaves its line behind:
        // its jobs move to a new worker, so nothing accepted is lost.
        let mut leftover = VecDeque::new();
        let mut carried = 0;
        if let Some(line) = &existing {
            line.queued.fetch_add(n, Ordering::SeqCst);
            if line.alive.load(Ordering::SeqCst) {
                line.push(Box::new(job));
                return Ok(Enqueued::Done(Accepted { tickets, durable }));
            }
            leftover = std::mem::take(&mut *line.jobs());
            carried = leftover.iter().map(|j| j.items().len()).sum();
        }
        let line = Arc::new(Line::new(n + carried));
        {
            let mut jobs = line.jobs();
            *jobs = leftover;
            jobs.push_back(Box::new(job));
        }
        shard.insert(key.clone(), Entry { line: line.clone() });
        drop(shard);
        // Its ids come from the request: shown without control characters.
        let span = tracing::info_span!("conversation", key = %crate::bounded::for_log(key.label()));
        tokio::spawn(
            Worker::new(self.clone(), key.clone(), line)
                .run()
                .instrument(span),
        );
        Ok(Enqueued::Done(Accepted { tickets, durable }))
    }

    /// A new job when replicas share the outbox: stored, and delivered by the replica holding
    /// its partition once that one reads it back; parked here meanwhile when that is this
    /// replica. The answer comes after the commit, as on one replica.
    fn enqueue_shared(
        self: &Arc<Self>,
        cluster: &Arc<Cluster>,
        key: &ConversationKey,
        mut job: Job,
        idem: Option<String>,
        outcome_rxs: Vec<Option<oneshot::Receiver<Outcome>>>,
    ) -> Result<Enqueued, SubmitError> {
        let n = job.items().len();
        let in_conversation = self
            .shard(key)
            .get(key)
            .map_or(0, |e| e.line.queued.load(Ordering::SeqCst));
        if in_conversation + n > self.config.max_pending_per_conversation {
            return Err(self.conversation_full(in_conversation));
        }
        // Sends parked here until they are read back count too: a slow feed must not let them
        // pile up in memory past the bound.
        self.check_total(n + cluster.parked_len())?;
        let label = key.label();
        let now = now_ms();
        let fence = cluster.fence_for(label);
        let here = fence.is_some();
        // A stream's text comes to this process: only the conversation's deliverer can show it.
        if !here && matches!(job, Job::Stream { .. }) {
            return Err(SubmitError::NotHere);
        }
        let partition = crate::storage::lease::partition_of(label);
        let conversation_hash = Cluster::conversation_hash(label);
        // As on one replica, the first message to an idle conversation goes out next, so the
        // partition's owner appends it already marked as being delivered, saving a fenced write
        // before its call. The mark is fenced like that write (`PostgresStore::append_fenced`):
        // stored only while this replica holds the partition at `fence`, with that epoch, so a
        // message read back as `delivering` under another epoch, or not parked here, may have
        // been attempted and is flagged (`requeue`). Another replica's Send is marked by the
        // owner when it reads it back.
        let mut head = here
            && matches!(job, Job::Deliver { .. })
            && in_conversation == 0
            && !cluster.conversation_parked(conversation_hash);
        let mut ids = Vec::with_capacity(n);
        let mut stored = Vec::with_capacity(n);
        for item in job.items_mut() {
            item.id = self.next_id.fetch_add(1, Ordering::SeqCst);
            ids.push(item.id);
            let state = if head && !item.ephemeral && !item.rendered.requests.is_empty() {
                // Durable with the append, which `durable` stands for; the fence it was made
                // under is compared with the one it is read back under (`requeue`).
                item.delivering = Some(Durable::ready());
                item.fence = fence;
                DeliveryState::Delivering
            } else {
                DeliveryState::Accepted
            };
            head = false;
            stored.push(StoredMessage {
                id: item.id,
                conversation: label.to_string(),
                message: item.message.clone(),
                proactive: item.proactive.clone(),
                accepted_at_ms: now,
                record: StateRecord::new(state, now),
                warnings: item.rendered.warnings.clone(),
                op: item.op,
            });
        }
        let idem = idem.map(|k| idem_record(k, now, &ids));
        self.metrics.accepted(key.channel_id(), stored.len() as u64);
        let durable = cluster.store.append_fenced(stored, idem, fence);
        let tickets = tickets_for(&ids, outcome_rxs);
        let mut stream = None;
        let (items, mut created) = match job {
            Job::Deliver { items, .. } => (items, None),
            Job::Proactive { items, created, .. } => (items, created),
            Job::Typing { item, .. } => (vec![*item], None),
            // Parked with its events: read back, it goes in line as a stream (`requeue`).
            Job::Stream { item, feed } => {
                stream = Some(feed);
                (vec![*item], None)
            }
        };
        let at = Instant::now();
        for mut item in items {
            if here {
                item.durable = durable.clone();
                let id = item.id;
                cluster.park(
                    id,
                    shared::Parked {
                        item,
                        partition,
                        conversation: conversation_hash,
                        created: created.take(),
                        stream: stream.take(),
                        at,
                    },
                );
            } else if let Some(done) = item.done.take() {
                shared::watch_remote(cluster.store.clone(), item.id, done);
            }
        }
        if let Some(created) = created {
            // Another replica starts the conversation: its address is not known here.
            let _ = created.send(Err(ChannelError::new(
                key.channel_id(),
                FailureKind::Retryable,
                "the conversation is being started by another replica; its address is not \
                 known to this one",
            )));
        }
        Ok(Enqueued::Done(Accepted { tickets, durable }))
    }

    /// `enqueue` for a new job: when its conversation's line is full and Sends may wait
    /// (`delivery.max_wait_for_room`), waits for room rather than refusing at once. The caller's
    /// call stays open meanwhile, which slows a bot to its channel's pace instead of letting
    /// its backlog grow; the call's own deadline still ends the wait.
    fn admit(
        self: &Arc<Self>,
        key: &ConversationKey,
        job: Job,
        admission: Admission,
        outcome_rxs: Vec<Option<oneshot::Receiver<Outcome>>>,
    ) -> Result<Submitted, SubmitError> {
        Ok(match self.enqueue(key, job, admission, outcome_rxs)? {
            Enqueued::Done(accepted) => Submitted::Accepted(accepted),
            Enqueued::Full(waiting) => {
                let (inner, key) = (self.clone(), key.clone());
                Submitted::Waiting(Box::pin(
                    async move { inner.wait_for_room(&key, waiting).await },
                ))
            }
        })
    }

    async fn wait_for_room(
        self: &Arc<Self>,
        key: &ConversationKey,
        mut waiting: Box<Waiting>,
    ) -> Result<Accepted, SubmitError> {
        let limit = self.config.max_pending_per_conversation;
        let until = later_tokio(tokio::time::Instant::now(), self.config.max_wait_for_room);
        let started = Instant::now();
        let mut waited = false;
        loop {
            let n = waiting.job.items().len();
            let line = waiting.line.clone();
            let room = line.room.notified();
            tokio::pin!(room);
            // Registered before the second look, so a message leaving in between still wakes
            // this wait.
            room.as_mut().enable();
            // `accepting` is read after registering, and shutdown clears it before it wakes
            // every waiter: one of the two sees the other.
            let full = line.queued.load(Ordering::SeqCst) + n > limit;
            let wait =
                full && line.alive.load(Ordering::SeqCst) && self.accepting.load(Ordering::SeqCst);
            waited |= wait;
            if wait && tokio::time::timeout_at(until, room).await.is_err() {
                let pending = line.queued.load(Ordering::SeqCst);
                tracing::debug!(
                    conversation = %crate::bounded::for_log(key.label()),
                    pending,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "no room in the conversation's line within delivery.max_wait_for_room"
                );
                return Err(self.conversation_full(pending));
            }
            let Waiting {
                mut job,
                admission,
                outcome_rxs,
                ..
            } = *waiting;
            // Accepted from now: the delivery latency and `max_retry_age` count from here.
            let now = Instant::now();
            for item in job.items_mut() {
                item.accepted_at = now;
            }
            match self.enqueue(key, job, admission, outcome_rxs) {
                Ok(Enqueued::Done(accepted)) => {
                    if waited {
                        self.metrics
                            .waited_for_room(key.channel_id(), started.elapsed());
                    }
                    return Ok(accepted);
                }
                // Another Send took the room first: wait for the next.
                Ok(Enqueued::Full(again)) => waiting = again,
                Err(e) => {
                    // The room this wait was woken for goes to the next waiter.
                    line.room.notify_one();
                    return Err(e);
                }
            }
        }
    }

    /// Records the outcome and tells whoever waits; the final state's write, for a caller that
    /// must not go on before it is durable.
    fn finish(&self, item: Item, mut outcome: Outcome, line: Option<&Line>) -> Option<Durable> {
        outcome.possible_duplicate |= item.possible_duplicate;
        // What the channel answered is kept and echoed from here on: bounded first.
        if let Some(e) = &mut outcome.error {
            e.bound();
        }
        for r in &mut outcome.receipts {
            r.bound();
        }
        let mut final_write = None;
        let mut written_final = None;
        let for_caller = if item.ephemeral {
            Some(outcome)
        } else {
            let addr = &item.message.address;
            let (label, latency) = match outcome.state {
                DeliveryState::Delivered => ("delivered", Some(item.accepted_at.elapsed())),
                DeliveryState::Expired => ("expired", None),
                _ => ("failed", None),
            };
            // Built only when someone watches: most gateways have no watcher.
            let event = (self.events.receiver_count() > 0).then(|| DeliveryEvent {
                id: item.id,
                channel_id: addr.channel_id.clone(),
                bot_id: addr.bot_id().to_string(),
                conversation_id: addr.conversation_id().unwrap_or_default().to_string(),
                outcome: outcome.clone(),
            });
            // Most callers do not wait for the outcome: then it moves into the outbox.
            let kept = item.done.is_some().then(|| outcome.clone());
            // Recorded before anyone hears of it, so a status asked on hearing is final. Not
            // awaited: a lost final state only means a flagged redelivery after a crash.
            self.metrics
                .finished(&addr.channel_id, label, outcome.error.as_ref(), latency);
            // Replicas: the partition is not drained (handed over) before its final states
            // are in the database, or the next owner would deliver the message again.
            // Not waited for (a failed commit keeps it for the next), but a partition being
            // handed over waits for it.
            let written = if item.op.is_some() {
                // A change's worker waits for this write (`Worker::deliver`): it must resolve
                // when the commit is done, which `record_fenced` promises only on replicas.
                self.store
                    .update_fenced(item.id, Change::Finished(outcome), item.fence)
            } else {
                self.store
                    .record_fenced(item.id, Change::Finished(outcome), item.fence)
            };
            if item.fence.is_some() && self.cluster.get().is_some() {
                final_write = Some(written.clone());
            }
            written_final = Some(written);
            if let Some(event) = event {
                let _ = self.events.send(event);
            }
            kept
        };
        if let (Some(tx), Some(outcome)) = (item.done, for_caller) {
            // The caller may have stopped waiting; the outcome stays in the store.
            let _ = tx.send(outcome);
        }
        self.left(item.fence, line, final_write);
        written_final
    }

    /// A message leaves memory undelivered: its partition moved to another replica, which
    /// delivers it from the outbox (nothing is written here). A caller waiting for its outcome
    /// reads it from the outbox.
    fn hand_over(&self, mut item: Item, line: Option<&Line>) {
        if let (Some(done), Some(cluster)) = (item.done.take(), self.cluster.get()) {
            shared::watch_remote(cluster.store.clone(), item.id, done);
        }
        tracing::debug!(
            message_id = item.id,
            "handed over: its partition moved to another replica"
        );
        let taken_back = item.taken_back.take();
        self.left(item.fence, line, taken_back);
    }

    /// A message left memory; a partition's count drops once `final_write` (its final state)
    /// is in the database.
    fn left(&self, fence: Option<Fence>, line: Option<&Line>, final_write: Option<Durable>) {
        // The total first: a Send woken by `left` must not then be refused by a count that
        // still holds this message.
        if self.undelivered.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.drained.notify_waiters();
        }
        if let Some(line) = line {
            line.left(1, self.waits_for_room());
        }
        if let (Some(f), Some(cluster)) = (fence, self.cluster.get()) {
            match final_write {
                Some(durable) => {
                    let cluster = cluster.clone();
                    tokio::spawn(async move {
                        // Fenced out or failed: either way nothing more is waited for.
                        let _ = durable.await;
                        cluster.left(f.partition);
                    });
                }
                None => cluster.left(f.partition),
            }
        }
    }

    /// Whether `item` may still be delivered here (always, with one replica).
    fn holds(&self, item: &Item) -> bool {
        match (item.fence, self.cluster.get()) {
            (Some(f), Some(c)) => {
                let holds = c.holds(f, item.tenure);
                if !holds {
                    // Whatever else of this take is in line goes too, and the partition is
                    // read again if it is still (or again) this replica's.
                    c.invalidate(f.partition, item.tenure);
                }
                holds
            }
            _ => true,
        }
    }
}

struct TypingKeepAlive {
    item_requests: Rendered,
    until: tokio::time::Instant,
    next: tokio::time::Instant,
    interval: Duration,
}

struct Worker {
    inner: Arc<Inner>,
    key: ConversationKey,
    line: Arc<Line>,
    backlog: VecDeque<Job>,
    /// Boxed: rare, and every active conversation's worker holds the field.
    typing: Option<Box<TypingKeepAlive>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Also on a panic: the next sender then replaces this worker.
        self.line.alive.store(false, Ordering::SeqCst);
        self.inner.workers.fetch_sub(1, Ordering::Relaxed);
        // Sends waiting on this line look again rather than wait out their time.
        self.line.room.notify_waiters();
    }
}

impl Worker {
    /// Counted in `Inner::workers` from here until it is dropped (however it ends).
    fn new(inner: Arc<Inner>, key: ConversationKey, line: Arc<Line>) -> Self {
        inner.workers.fetch_add(1, Ordering::Relaxed);
        Self {
            inner,
            key,
            line,
            backlog: VecDeque::new(),
            typing: None,
        }
    }

    fn finish(&self, item: Item, outcome: Outcome) -> Option<Durable> {
        self.inner.finish(item, outcome, Some(&self.line))
    }

    /// Not an `async fn`: one of those keeps its by-value argument twice in its state (the
    /// argument and the body's binding), and every active conversation holds this future.
    fn run(self) -> impl Future<Output = ()> + Send {
        let mut worker = self;
        async move {
            loop {
                // Boxed, and made outside this future: it then holds neither the job nor what
                // handling it needs, only the idle wait.
                let handling = match worker.next_job().await {
                    Some(job) => worker.handling(job),
                    None => break,
                };
                // The messages of a job are each guarded where they are handled (`deliver`,
                // typing, a proactive start); this keeps the worker, and with it the rest of
                // its line, going if something between them panics.
                if let Err(panic) = AssertUnwindSafe(handling).catch_unwind().await {
                    tracing::error!(panic = %panic_text(&panic), "conversation worker recovered from a panic");
                }
            }
        }
    }

    fn handling(&mut self, job: Job) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.handle(job))
    }

    async fn handle(&mut self, job: Job) {
        match job {
            Job::Deliver { items, flush } => {
                self.typing = None;
                let items = if flush || self.inner.config.auto_batch_delay.is_zero() {
                    items
                } else {
                    self.gather_auto_batch(items).await
                };
                let mut items = items.into_iter().peekable();
                while let Some(item) = items.next() {
                    let next = match items.peek_mut() {
                        Some(next) => Next::Item(next),
                        None => Next::Queued,
                    };
                    self.deliver(item, next).await;
                }
            }
            Job::Stream { item, feed } => {
                self.typing = None;
                let stream = Box::pin(self.stream(*item, feed));
                if let Err(panic) = AssertUnwindSafe(stream).catch_unwind().await {
                    tracing::error!(panic = %panic_text(&panic), "a stream's delivery panicked");
                }
            }
            Job::Typing { item, keep_alive } => {
                let requests = item.rendered.clone();
                // Boxed, like the proactive path below: `handle`'s future is as large as its
                // largest path, and it is built and moved for every job.
                let typing = Box::pin(self.send_typing(&requests));
                if let Err(panic) = AssertUnwindSafe(typing).catch_unwind().await {
                    tracing::error!(panic = %panic_text(&panic), "typing indicator panicked");
                }
                self.finish(
                    *item,
                    Outcome {
                        state: DeliveryState::Delivered,
                        receipts: Vec::new(),
                        error: None,
                        attempts: 1,
                        possible_duplicate: false,
                    },
                );
                // A channel without a typing indicator renders nothing: nothing to repeat.
                let repeatable = !requests.requests.is_empty();
                self.typing = keep_alive.filter(|d| !d.is_zero() && repeatable).map(|d| {
                    let interval = self.inner.channels.typing_interval(self.key.channel_id());
                    let now = tokio::time::Instant::now();
                    Box::new(TypingKeepAlive {
                        item_requests: requests,
                        until: later_tokio(now, d),
                        next: later_tokio(now, interval),
                        interval,
                    })
                });
            }
            Job::Proactive {
                address,
                options,
                items,
                created,
            } => {
                Box::pin(self.proactive(*address, options, items, created)).await;
            }
        }
    }

    /// The next job, repeating typing while idle; `None` once the worker evicted itself.
    async fn next_job(&mut self) -> Option<Job> {
        if let Some(job) = self.backlog.pop_front() {
            return Some(job);
        }
        let mut idle_deadline =
            later_tokio(tokio::time::Instant::now(), self.inner.config.idle_timeout);
        loop {
            if let Some(job) = self.line.pop() {
                return Some(job);
            }
            let wake = match &self.typing {
                Some(t) => t.next.min(t.until),
                None => idle_deadline,
            };
            tokio::select! {
                biased;
                _ = self.line.ready.notified() => continue,
                _ = tokio::time::sleep_until(wake) => {}
            }
            let now = tokio::time::Instant::now();
            if let Some(t) = &mut self.typing {
                if now >= t.until {
                    self.typing = None;
                    idle_deadline = later_tokio(now, self.inner.config.idle_timeout);
                } else if now >= t.next {
                    t.next = later_tokio(now, t.interval);
                    // Boxed with its requests: the idle wait must not carry a channel call's
                    // state.
                    let requests = t.item_requests.clone();
                    // Between jobs, outside `run`'s guard: a panic here must not end the worker.
                    let again = AssertUnwindSafe(self.typing_again(requests)).catch_unwind();
                    if let Err(panic) = again.await {
                        tracing::error!(panic = %panic_text(&panic), "typing indicator panicked");
                    }
                }
                continue;
            }
            if now >= idle_deadline {
                let mut shard = self.inner.shard(&self.key);
                // Decided under the lock senders hold while enqueuing: nothing can slip in.
                if self.line.jobs().is_empty() {
                    shard.remove(&self.key);
                    tracing::debug!("conversation worker evicted after idle period");
                    return None;
                }
            }
        }
    }

    /// Marks the message after the one whose call is starting as being delivered, without
    /// waiting: its durable write then overlaps the current call instead of adding a commit
    /// between calls. A crash during the current call flags at most this one message more as a
    /// possible duplicate; if the current call fails, the mark is taken back (`unmark_next`),
    /// so a message waiting behind a retry is not flagged.
    fn premark_next(&self, next: &mut NextMark<'_>) {
        if next.marked.is_some() {
            return;
        }
        next.marked = match &mut next.next {
            Next::Item(item) => self.premark(item),
            Next::Queued => {
                let mut jobs = self.line.jobs();
                match jobs.front_mut().map(|j| j.as_mut()) {
                    Some(Job::Deliver { items, .. }) => {
                        items.first_mut().and_then(|item| self.premark(item))
                    }
                    _ => None,
                }
            }
        };
    }

    /// Issues the mark of `next` unless it has one or sends nothing; its id when issued.
    fn premark(&self, next: &mut Item) -> Option<u64> {
        if next.ephemeral || next.delivering.is_some() || next.rendered.requests.is_empty() {
            return None;
        }
        next.delivering = Some(self.inner.store.update_fenced(
            next.id,
            Change::Delivering { attempts: 0 },
            next.fence,
        ));
        Some(next.id)
    }

    /// The current message waits (to retry, or for a rate scope): the next one, marked ahead
    /// by `premark_next`, is not about to go out after all.
    fn unmark_next(&self, next: &mut NextMark<'_>) {
        let Some(id) = next.marked.take() else {
            return;
        };
        let unmark = |item: &mut Item| {
            if item.id == id {
                self.take_back_ahead(item);
            }
        };
        match &mut next.next {
            Next::Item(item) => unmark(item),
            Next::Queued => {
                if let Some(Job::Deliver { items, .. }) =
                    self.line.jobs().front_mut().map(|j| j.as_mut())
                    && let Some(item) = items.first_mut()
                {
                    unmark(item);
                }
            }
        }
    }

    /// A mark written ahead of a call not made yet (at append, or by `premark`) is taken back:
    /// the message is not about to go out after all. The write, not waited for.
    fn take_back_ahead(&self, item: &mut Item) -> Durable {
        item.delivering = None;
        self.inner
            .store
            .record_fenced(item.id, Change::Waiting { attempts: 0 }, item.fence)
    }

    /// v3 autoBatchDelay: consecutive Sends within the window go out back to back.
    async fn gather_auto_batch(&mut self, mut items: Vec<Item>) -> Vec<Item> {
        let deadline = later_tokio(
            tokio::time::Instant::now(),
            self.inner.config.auto_batch_delay,
        );
        loop {
            match self.line.pop() {
                Some(Job::Deliver {
                    items: more,
                    flush: false,
                }) => items.extend(more),
                Some(other) => {
                    self.backlog.push_back(other);
                    return items;
                }
                None => tokio::select! {
                    biased;
                    _ = self.line.ready.notified() => {}
                    _ = tokio::time::sleep_until(deadline) => return items,
                },
            }
        }
    }

    fn typing_again(
        &self,
        requests: Rendered,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move { self.send_typing(&requests).await })
    }

    async fn send_typing(&self, rendered: &Rendered) {
        #[cfg(test)]
        if self.key.conversation() == tests::PANIC_TEXT {
            panic!("a test's panic while sending typing");
        }
        for req in &rendered.requests {
            let wait = self
                .inner
                .rates
                .reserve(&req.rate, std::time::Instant::now());
            self.wait_for_scopes(req, wait).await;
            // Typing is ephemeral: one attempt, a failure only logged.
            if let Err(e) = self.execute(req).await {
                tracing::warn!(error = %e, "typing indicator not delivered");
            }
        }
    }

    /// Sleeps `wait` (outside any lock), then for as long as a scope of the request stays
    /// paused: a wider scope may have been paused meanwhile.
    async fn wait_for_scopes(&self, req: &NativeRequest, mut wait: Duration) {
        while !wait.is_zero() {
            tracing::debug!(wait_ms = wait.as_millis() as u64, "waiting for rate scope");
            tokio::time::sleep(wait).await;
            wait = self
                .inner
                .rates
                .paused(&req.rate, std::time::Instant::now());
        }
    }

    /// The message is about to be sent: its delivering mark must be durable first. Issued
    /// here when nothing issued it ahead (or a wait took it back).
    async fn mark(
        &self,
        item: &Item,
        out: &Outcome,
        mark: &mut Mark,
    ) -> Result<(), crate::outbox::StoreError> {
        let pending = match std::mem::replace(mark, Mark::Durable) {
            Mark::Durable => return Ok(()),
            Mark::Issued(d) => d,
            Mark::None => self.inner.store.update_fenced(
                item.id,
                Change::Delivering {
                    attempts: out.attempts,
                },
                item.fence,
            ),
        };
        pending.await
    }

    /// `mark`, waiting out an outage of a store that recovers (`Store::transient`: PostgreSQL
    /// unreachable for a while): the message is accepted and must not fail for it. It waits
    /// with backoff, holding its conversation's line as any wait does, until the mark is
    /// written, the message expires or the gateway stops. A local store's failure is for good:
    /// it fails the message at once, as before.
    async fn mark_or_wait(
        &self,
        item: &Item,
        out: &Outcome,
        mark: &mut Mark,
    ) -> Result<(), crate::outbox::StoreError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let e = match self.mark(item, out, mark).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if !self.inner.store.transient()
                || e == crate::outbox::StoreError::Fenced
                || Self::expired(item)
                || !self.inner.accepting.load(Ordering::SeqCst)
            {
                return Err(e);
            }
            tracing::warn!(message_id = %item.id, error = %e, "outbox unreachable: the message waits for it");
            *mark = Mark::None;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Whether the message is still this replica's to send (its lease holds), with its mark
    /// made durable first if `marks`; if not, it is given up here.
    async fn held(
        &self,
        item: &Item,
        out: &Outcome,
        mark: &mut Mark,
        next: &mut NextMark<'_>,
        marks: bool,
    ) -> Result<Held, crate::outbox::StoreError> {
        if !self.inner.holds(item) {
            return Ok(Held::GaveUp(self.give_up_here(item, out, mark, next)));
        }
        if !marks {
            return Ok(Held::Here);
        }
        match self.mark_or_wait(item, out, mark).await {
            Ok(()) => {}
            Err(crate::outbox::StoreError::Fenced) => {
                // Refused: there is no mark to take back.
                *mark = Mark::None;
                return Ok(Held::GaveUp(self.give_up_here(item, out, mark, next)));
            }
            Err(e) => return Err(e),
        }
        // The wait for the mark may have outlasted the lease here.
        if !self.inner.holds(item) {
            return Ok(Held::GaveUp(self.give_up_here(item, out, mark, next)));
        }
        Ok(Held::Here)
    }

    /// Replicas: the message is to leave memory undelivered, its partition gone to another
    /// replica. Its mark and the next message's early mark are taken back (unless a call may
    /// have reached the channel), so the next owner does not flag messages no call reached;
    /// returns the take-back's write, which a partition being handed over waits for before it
    /// counts as drained (`hand_over`).
    fn give_up_here(
        &self,
        item: &Item,
        out: &Outcome,
        mark: &mut Mark,
        next: &mut NextMark<'_>,
    ) -> Option<Durable> {
        self.unmark_next(next);
        self.unmark(item, out, mark)
    }

    /// The message waits before its next call: unless a call of it may already have reached
    /// the channel, the outbox hears it is not being sent, without waiting (a lost update only
    /// leaves the message flagged, as before). The write, if one was made.
    fn unmark(&self, item: &Item, out: &Outcome, mark: &mut Mark) -> Option<Durable> {
        let sent_maybe =
            item.possible_duplicate || out.possible_duplicate || !out.receipts.is_empty();
        if sent_maybe || matches!(mark, Mark::None) {
            return None;
        }
        *mark = Mark::None;
        Some(self.inner.store.record_fenced(
            item.id,
            Change::Waiting {
                attempts: out.attempts,
            },
            item.fence,
        ))
    }

    /// One call: take a global permit, call the channel; a 429 pauses the request's narrowest
    /// rate scope (and a wider one where 429s repeat across its narrower scopes). The caller
    /// waited for the request's scopes.
    async fn execute(&self, req: &NativeRequest) -> Result<NativeReceipt, ChannelError> {
        let result = {
            let _permit = self.inner.permits.acquire().await;
            let started = Instant::now();
            let r = self
                .inner
                .channels
                .execute(self.key.channel_id(), req)
                .await;
            self.inner
                .metrics
                .request(self.key.channel_id(), r.is_ok(), started.elapsed());
            r
        };
        if let Err(e) = &result
            && e.http_status == Some(429)
        {
            let pause = e.retry_after.unwrap_or(self.inner.config.base_retry_delay);
            let pause = pause.min(self.inner.config.max_retry_delay);
            let paused = self
                .inner
                .rates
                .limited(&req.rate, pause, std::time::Instant::now());
            if let Some(scope) = paused {
                tracing::warn!(scope = %crate::bounded::for_log(&scope), pause_ms = pause.as_millis() as u64, "rate limited: pausing the scope");
                // A scope wider than the conversation spans other replicas' conversations.
                let narrow = req.rate.levels().first().map(|l| &l.key);
                if let Some(cluster) = self.inner.cluster.get()
                    && narrow != Some(&scope)
                {
                    cluster.pause_shared(&scope, pause);
                }
            }
            self.inner.metrics.rate_limit_pause(self.key.channel_id());
        }
        result
    }

    /// Sleeps `wait`, or less if the message's partition moves to another replica meanwhile
    /// (a handover must not wait out a retry's backoff).
    async fn pause(&self, item: &Item, wait: Duration) {
        match (item.fence, self.inner.cluster.get()) {
            (Some(fence), Some(cluster)) => tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cluster.moving(fence) => {}
            },
            _ => tokio::time::sleep(wait).await,
        }
    }

    fn expired(item: &Item) -> bool {
        item.message
            .expiration
            .is_some_and(|exp| exp <= time::OffsetDateTime::now_utc())
    }

    /// A message that can no longer be rendered (its channel's configuration changed since).
    fn render_failure(&self, e: &impl std::fmt::Display) -> ChannelError {
        ChannelError {
            code: Some("render".into()),
            ..ChannelError::new(self.key.channel_id(), FailureKind::Permanent, e.to_string())
        }
    }

    /// The requests of an update or delete, against what its target became on the channel
    /// (its receipts now: a change before this one may have changed them), and the target.
    async fn plan_operation(
        &self,
        item: &Item,
        op: Operation,
    ) -> Result<(crate::channels::update::Plan, StoredMessage), ChannelError> {
        let verb = op.verb();
        let gone = |why: String| ChannelError {
            code: Some("not_found".into()),
            ..ChannelError::new("gateway", FailureKind::Permanent, why)
        };
        let Some(target_id) = op.target() else {
            return Err(gone(format!("a {verb} changes no message sent before")));
        };
        let target = match self.inner.store.get(target_id).await {
            Ok(Some(t)) => t,
            Ok(None) => {
                return Err(gone(format!(
                    "message {target_id} is no longer in the outbox (kept for outbox.retention \
                     after delivery): nothing to {verb}"
                )));
            }
            Err(e) => {
                return Err(ChannelError {
                    code: Some("outbox".into()),
                    ..ChannelError::new("gateway", FailureKind::Permanent, e.to_string())
                });
            }
        };
        let receipts = &target.record.receipts;
        if receipts.is_empty() && matches!(op, Operation::Delete { .. }) {
            // Nothing left: a delete carried out again after a crash (its first run removed
            // the native messages and recorded so) is done.
            return Ok((crate::channels::update::Plan::default(), target));
        }
        if receipts.is_empty() {
            return Err(gone(format!(
                "message {} has no native message to {verb} (it ended {:?} with none sent{})",
                target.id,
                target.record.state,
                if op == (Operation::Delete { target: target.id }) {
                    ", or was deleted already"
                } else {
                    ""
                }
            )));
        }
        let plan = match op {
            Operation::Update { .. } => self.inner.channels.render_update(&item.message, receipts),
            Operation::Delete { .. } => self
                .inner
                .channels
                .render_delete(&target.message.address, receipts),
            Operation::Stream => return Err(gone("a stream changes no message".into())),
        }
        .map_err(|e| self.render_failure(&e))?;
        Ok((plan, target))
    }

    /// Records what the target became once an update or delete was carried out (in part, if
    /// it failed on the way), so the next change of it plans against that.
    async fn settle_target(
        &self,
        item: &Item,
        steps: &[crate::channels::update::Step],
        target: StoredMessage,
        outcome: &Outcome,
    ) {
        let before = &target.record.receipts;
        let after = crate::channels::update::receipts_after(before, steps, &outcome.receipts);
        if after == *before {
            return;
        }
        let mut settled = target.outcome();
        settled.receipts = after;
        let wrote = self
            .inner
            .store
            .record_fenced(target.id, Change::Finished(settled), item.fence)
            .await;
        if let Err(e) = wrote {
            tracing::warn!(message_id = target.id, change_id = item.id, error = %e, "the changed message's new receipts were not recorded");
        }
    }

    /// Delivers one message and records its outcome. A panic while handling it (a bug in the
    /// gateway or in a channel's code) fails this message with an internal error instead of
    /// ending the worker: the messages behind it in the line go on.
    async fn deliver(&self, mut item: Item, next: Next<'_>) {
        if !self.inner.holds(&item) {
            // Never attempted here: a mark written ahead (at append, or during the call
            // before) is taken back, or the next owner would flag a message no call reached.
            if item.delivering.is_some() && !item.possible_duplicate {
                item.taken_back = Some(self.take_back_ahead(&mut item));
            }
            return self.inner.hand_over(item, Some(&self.line));
        }
        let outcome = match AssertUnwindSafe(self.deliver_outcome(&mut item, next))
            .catch_unwind()
            .await
        {
            Ok(outcome) => outcome,
            Err(panic) => {
                tracing::error!(message_id = item.id, panic = %panic_text(&panic), "delivering the message panicked; it fails with an internal error");
                failed(self.internal_failure(), 0)
            }
        };
        if item.handed_over {
            return self.inner.hand_over(item, Some(&self.line));
        }
        let change = item.op.is_some();
        let written = self.finish(item, outcome);
        // A change of a message goes on only once its final state is durable: after a crash
        // an update already carried out and not yet recorded would be carried out again, and,
        // sent again after the next one, would show the older version once more. (A Send
        // does not wait: a resent message is only a flagged duplicate.)
        if change && let Some(w) = written {
            let _ = w.await;
        }
    }

    /// The outcome a panic gives the message being handled.
    fn internal_failure(&self) -> ChannelError {
        ChannelError {
            code: Some("internal".into()),
            ..ChannelError::new(
                self.key.channel_id(),
                FailureKind::Permanent,
                "the gateway failed while handling this message (an internal error, logged); \
                 it was not delivered by this attempt and may be redelivered",
            )
        }
    }

    async fn deliver_outcome(&self, item: &mut Item, next: Next<'_>) -> Outcome {
        #[cfg(test)]
        if item.message.text.as_deref() == Some(tests::PANIC_TEXT) {
            panic!("a test's panic while delivering");
        }
        if item.op == Some(Operation::Stream) {
            return self.interrupted_stream(item).await;
        }
        let mut planned = None;
        if let Some(op) = item.op {
            match self.plan_operation(item, op).await {
                Ok((plan, target)) => {
                    item.rendered.requests = plan.rendered.requests;
                    item.shed = false;
                    planned = Some((plan.steps, target));
                }
                Err(e) => return failed(e, 0),
            }
        } else if item.shed {
            match self
                .inner
                .channels
                .render_send(&item.message, item.proactive.as_deref())
            {
                Ok(r) => {
                    item.rendered.requests = r.requests;
                    item.shed = false;
                }
                Err(e) => return failed(self.render_failure(&e), 0),
            }
        }
        // The caller's trace continues here: its trace id and parent span on every line.
        let (trace_id, parent_id) = item
            .traceparent
            .as_deref()
            .and_then(|t| {
                let mut p = t.split('-').skip(1);
                Some((p.next()?.to_string(), p.next()?.to_string()))
            })
            .unwrap_or_default();
        let span = tracing::info_span!("deliver", message_id = item.id, trace_id = %trace_id, parent_span_id = %parent_id);
        #[cfg(feature = "otlp")]
        if let Some(tp) = &item.traceparent {
            use opentelemetry::propagation::TextMapPropagator;
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let carrier: HashMap<String, String> = [("traceparent".to_string(), tp.clone())].into();
            let cx =
                opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
            let _ = span.set_parent(cx);
        }
        let outcome = self.attempt_all(item, next).instrument(span.clone()).await;
        if item.handed_over {
            return outcome;
        }
        if let Some((steps, target)) = planned {
            self.settle_target(item, &steps, target, &outcome).await;
        }
        let _entered = span.enter();
        match outcome.state {
            DeliveryState::Delivered => {
                tracing::debug!(message_id = %item.id, attempts = outcome.attempts, "delivered")
            }
            state => tracing::warn!(
                message_id = %item.id,
                ?state,
                attempts = outcome.attempts,
                error = %outcome.error.as_ref().map(|e| e.to_string()).unwrap_or_default(),
                "message not delivered"
            ),
        }
        outcome
    }

    /// Every request of the message in order, each retried in place until it succeeds or gives up.
    async fn attempt_all(&self, item: &mut Item, next: Next<'_>) -> Outcome {
        let cfg = &self.inner.config;
        let mut out = Outcome {
            state: DeliveryState::Delivering,
            receipts: Vec::new(),
            error: None,
            attempts: 0,
            possible_duplicate: false,
        };
        // Nothing goes out before it is in the outbox.
        if let Err(e) = item.durable.clone().await {
            return outbox_failed(out, e);
        }
        // Nor before the outbox knows it may go out: after a crash a message marked delivering
        // is resent flagged as a possible duplicate. The mark is usually issued ahead (at
        // append, or during the call before) so its write overlaps other work; it is taken
        // back while the message waits (a rate scope, a 429's Retry-After), so the flag only
        // marks messages a call may really have reached (a kill during 1,000 conversations
        // with 10% 429s flagged 20% of messages before, 0.6% now, for 0.1% sent twice).
        let marks = !item.ephemeral && !item.rendered.requests.is_empty();
        let mut mark = match &item.delivering {
            Some(d) if marks => Mark::Issued(d.clone()),
            _ => Mark::None,
        };
        let mut next = NextMark { next, marked: None };
        for req in &item.rendered.requests {
            let mut attempt = 0u32;
            let mut ambiguous = 0u32;
            loop {
                if Self::expired(item) {
                    out.state = DeliveryState::Expired;
                    out.error = Some(ChannelError {
                        code: Some("expired".into()),
                        ..ChannelError::new(
                            "gateway",
                            FailureKind::Permanent,
                            "the message expired before it could be delivered",
                        )
                    });
                    return out;
                }
                let wait = self
                    .inner
                    .rates
                    .reserve(&req.rate, std::time::Instant::now());
                if !wait.is_zero() {
                    self.unmark(item, &out, &mut mark);
                    self.unmark_next(&mut next);
                    self.wait_for_scopes(req, wait).await;
                }
                // Replicas: the partition may have moved on during a wait; its new owner
                // delivers the message.
                let mut held = self.held(item, &out, &mut mark, &mut next, marks).await;
                // Replicas: the scopes wider than a conversation are reserved in the database
                // last, once the mark is durable, so the call follows its slot by no more than
                // the round trip. Reserved before the mark, the calls of a burst waited for
                // their marks' commits, slow while many Sends were being accepted, and reached
                // the channel late; the paced calls after them came on time, and 51 calls of a
                // 50-a-second budget landed in one second. A short wait keeps the mark (a kill
                // in it flags the message); a long one (a 429's pause, a deep backlog) takes it
                // back as above, and the call then follows its slot by a mark's commit.
                if let (Ok(Held::Here), Some(cluster)) = (&held, self.inner.cluster.get()) {
                    let wait = cluster.reserve_shared(&req.rate).await;
                    // A local scope paused by a 429 would stretch the wait past the bound.
                    let keep = wait <= HOLD_MARK_FOR
                        && self
                            .inner
                            .rates
                            .paused(&req.rate, std::time::Instant::now())
                            .is_zero();
                    if !wait.is_zero() {
                        if !keep {
                            self.unmark(item, &out, &mut mark);
                        }
                        self.unmark_next(&mut next);
                        self.wait_for_scopes(req, wait).await;
                    }
                    // The reservation's round trip (a pool, a row lock, an outage) or the wait
                    // may have outlasted the lease.
                    held = self
                        .held(item, &out, &mut mark, &mut next, marks && !keep)
                        .await;
                }
                match held {
                    Ok(Held::Here) => {}
                    Ok(Held::GaveUp(taken_back)) => {
                        item.taken_back = taken_back;
                        item.handed_over = true;
                        return out;
                    }
                    Err(e) => return outbox_failed(out, e),
                }
                self.premark_next(&mut next);
                attempt += 1;
                out.attempts += 1;
                let result = match (item.fence, self.inner.cluster.get()) {
                    // The call must not outlive the lease: the next owner may send the next
                    // message once it ran out. Abandoned, it may have reached the channel.
                    (Some(fence), Some(cluster)) => tokio::select! {
                        r = self.execute(req) => r,
                        _ = cluster.lost(fence) => Err(ChannelError::new(
                            self.key.channel_id(),
                            FailureKind::Ambiguous,
                            "the call was abandoned: this replica's lease on the conversation ran out",
                        )),
                    },
                    _ => self.execute(req).await,
                };
                let err = match result {
                    Ok(receipt) => {
                        out.receipts.push(receipt);
                        break;
                    }
                    Err(e) => e,
                };
                let retry = attempt < cfg.max_attempts
                    && item.accepted_at.elapsed() < cfg.max_retry_age
                    && match err.kind {
                        FailureKind::Permanent => false,
                        FailureKind::Retryable => true,
                        FailureKind::Ambiguous => {
                            out.possible_duplicate = true;
                            ambiguous += 1;
                            ambiguous <= cfg.max_ambiguous_retries
                        }
                    };
                if !retry {
                    out.state = DeliveryState::Failed;
                    out.error = Some(err);
                    return out;
                }
                self.unmark_next(&mut next);
                let wait = retry::backoff(
                    attempt,
                    cfg.base_retry_delay,
                    cfg.max_retry_delay,
                    err.retry_after,
                    rand::random::<f64>(),
                );
                tracing::info!(
                    message_id = %item.id,
                    attempt,
                    wait_ms = wait.as_millis() as u64,
                    error = %err,
                    "retrying at the head of the conversation"
                );
                self.inner.metrics.retried(self.key.channel_id());
                if err.http_status == Some(429) {
                    // Refused unprocessed: waiting out Retry-After, it has not been sent.
                    self.unmark(item, &out, &mut mark);
                }
                self.pause(item, wait).await;
            }
        }
        out.state = DeliveryState::Delivered;
        out
    }

    async fn proactive(
        &self,
        address: Address,
        options: Arc<ProactiveOptions>,
        items: Vec<Item>,
        created: Option<oneshot::Sender<Result<Address, ChannelError>>>,
    ) {
        let cfg = &self.inner.config;
        let mut ready = Ok(());
        for item in &items {
            ready = ready.and(item.durable.clone().await);
        }
        let mut attempt = 0u32;
        let result = loop {
            if let Err(e) = &ready {
                break Err(ChannelError {
                    code: Some("outbox".into()),
                    ..ChannelError::new("gateway", FailureKind::Permanent, e.to_string())
                });
            }
            attempt += 1;
            let r = {
                let _permit = self.inner.permits.acquire().await;
                let create = self.inner.channels.create_conversation(&address, &options);
                match AssertUnwindSafe(create).catch_unwind().await {
                    Ok(r) => r,
                    Err(panic) => {
                        tracing::error!(panic = %panic_text(&panic), "starting a conversation panicked; its messages fail with an internal error");
                        Err(self.internal_failure())
                    }
                }
            };
            match r {
                // Every later message of the conversation is keyed and stored by this id.
                Ok(a)
                    if a.conversation_id().map_or(0, str::len)
                        > crate::channels::MAX_NATIVE_ID_CHARS =>
                {
                    break Err(ChannelError {
                        code: Some("invalid_answer".into()),
                        ..ChannelError::new(
                            self.key.channel_id(),
                            FailureKind::Permanent,
                            format!(
                                "the channel named a conversation id of {} bytes",
                                a.conversation_id().map_or(0, str::len)
                            ),
                        )
                    });
                }
                Ok(a) => break Ok(a),
                // Only a clearly retryable refusal is retried: a repeated create could start two conversations.
                Err(e) if e.kind == FailureKind::Retryable && attempt < cfg.max_attempts => {
                    let wait = retry::backoff(
                        attempt,
                        cfg.base_retry_delay,
                        cfg.max_retry_delay,
                        e.retry_after,
                        rand::random(),
                    );
                    tracing::info!(attempt, error = %e, "retrying conversation creation");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok(new_address) => {
                let key = ConversationKey::of(&new_address);
                let label = key.label();
                let mut ready = Vec::with_capacity(items.len());
                for mut item in items {
                    Arc::make_mut(&mut item.message).address = new_address.clone();
                    // The outbox must know the conversation exists before anything else
                    // happens, or a restart would start a second one.
                    let moved = self
                        .inner
                        .store
                        .update(
                            item.id,
                            Change::Moved {
                                conversation: label.to_string(),
                                message: item.message.clone(),
                            },
                        )
                        .await;
                    if let Err(e) = moved {
                        tracing::error!(error = %e, message_id = item.id, "outbox update failed");
                    }
                    let render = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        self.inner
                            .channels
                            .render_send(&item.message, item.proactive.as_deref())
                    }));
                    match render {
                        Ok(Ok(r)) => {
                            item.rendered = r;
                            ready.push(item);
                        }
                        Ok(Err(e)) => {
                            let err = self.render_failure(&e);
                            self.fail(item, err, 0);
                        }
                        Err(panic) => {
                            tracing::error!(message_id = item.id, panic = %panic_text(&panic), "rendering a proactive message panicked");
                            let err = self.internal_failure();
                            self.fail(item, err, 0);
                        }
                    }
                }
                if !ready.is_empty() {
                    // They leave this queue for the new conversation's, where they count again.
                    let n = ready.len();
                    self.line.left(n, self.inner.waits_for_room());
                    self.inner.undelivered.fetch_sub(n, Ordering::SeqCst);
                    let job = Job::Deliver {
                        items: ready,
                        flush: true,
                    };
                    if let Err(e) = self
                        .inner
                        .enqueue(&key, job, Admission::Existing, Vec::new())
                    {
                        tracing::error!(error = %e, "proactive messages not queued");
                    }
                }
                if let Some(tx) = created {
                    let _ = tx.send(Ok(new_address));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "conversation not created");
                for item in items {
                    self.fail(item, e.clone(), attempt);
                }
                if let Some(tx) = created {
                    let _ = tx.send(Err(e));
                }
            }
        }
    }

    fn fail(&self, item: Item, error: ChannelError, attempts: u32) {
        self.finish(item, failed(error, attempts));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// A dispatcher on `config` with an in-memory outbox, its channels and its store.
    fn dispatcher(config: &Config) -> (Arc<Channels>, Arc<dyn Store>, Dispatcher) {
        let channels = Arc::new(Channels::from_config(config).expect("channels"));
        let store: Arc<dyn Store> = Arc::new(crate::outbox::MemoryStore::new());
        let d = Dispatcher::new(
            channels.clone(),
            store.clone(),
            config.delivery.clone(),
            Arc::new(Metrics::new()),
        );
        (channels, store, d)
    }

    /// The text of a message whose delivery panics (see `deliver_outcome`), and the
    /// conversation whose typing indicators panic (see `send_typing`).
    pub(super) const PANIC_TEXT: &str = "panic while delivering this";

    fn webchat_message(channels: &Channels, conversation: &str, text: &str) -> Submission {
        let mut m = Message::default();
        m.address.channel_id = "webchat".into();
        m.address.bot = Some(crate::model::Identity {
            id: "bot".into(),
            ..Default::default()
        });
        m.address.conversation = Some(crate::model::Conversation {
            id: conversation.into(),
            ..Default::default()
        });
        m.address.service_url = Some("http://127.0.0.1:9/".into());
        m.text = (!text.is_empty()).then(|| text.into());
        if text.is_empty() {
            m.kind = crate::model::MessageType::Typing;
        }
        let rendered = channels.render_send(&m, None).expect("rendered");
        Submission {
            message: m,
            rendered,
            traceparent: None,
            op: None,
        }
    }

    /// A typing indicator kept alive between jobs, outside the worker's guard for jobs: its
    /// panic must neither end the worker nor leave it counted twice once replaced.
    #[tokio::test]
    async fn a_panic_while_typing_is_kept_alive_leaves_one_worker_that_goes_on() {
        let mut config = Config::default();
        config.channels.botframework.typing_interval = Duration::from_millis(50);
        let (channels, _, d) = dispatcher(&config);
        d.submit_typing(
            webchat_message(&channels, PANIC_TEXT, ""),
            Some(Duration::from_secs(10)),
        )
        .await
        .unwrap();
        // Several repeats, each panicking.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut accepted = d
            .submit(
                vec![webchat_message(&channels, PANIC_TEXT, "after")],
                false,
                true,
                None,
            )
            .await
            .unwrap();
        let rx = accepted.tickets[0].outcome.take().expect("an outcome");
        tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .expect("the message after the panics gets its outcome")
            .expect("outcome sent");
        assert_eq!(d.active_workers(), 1);
    }

    /// A panic while one message is handled fails that message with an internal error; the
    /// messages behind it in its line are still handled, and nothing stays undelivered.
    #[tokio::test]
    async fn a_panic_fails_the_message_being_handled_and_the_line_goes_on() {
        let config = Config::default();
        let (channels, store, d) = dispatcher(&config);
        let message = |text: &str| webchat_message(&channels, "c1", text);
        let first = d
            .submit(vec![message("before")], false, true, None)
            .await
            .unwrap();
        let panicking = d
            .submit(vec![message(PANIC_TEXT)], false, true, None)
            .await
            .unwrap();
        let after = d
            .submit(vec![message("after"), message("after 2")], true, true, None)
            .await
            .unwrap();
        let mut outcomes = Vec::new();
        for accepted in [first, panicking, after] {
            for ticket in accepted.tickets {
                let rx = ticket.outcome.expect("an outcome was asked for");
                let outcome = tokio::time::timeout(Duration::from_secs(30), rx)
                    .await
                    .expect("every message gets its outcome")
                    .expect("outcome sent");
                outcomes.push((ticket.id, outcome));
            }
        }
        let (id, panicked) = &outcomes[1];
        let error = panicked.error.as_ref().expect("an error");
        assert_eq!(panicked.state, DeliveryState::Failed);
        assert_eq!(error.code.as_deref(), Some("internal"), "{error}");
        assert_eq!(
            store.get(*id).await.unwrap().map(|m| m.record.state),
            Some(DeliveryState::Failed)
        );
        // The others reached their own ends (this conversation has no credentials configured,
        // so the channel refuses them), not the panic's.
        for (id, o) in [&outcomes[0], &outcomes[2], &outcomes[3]] {
            let code = o.error.as_ref().and_then(|e| e.code.as_deref());
            assert_ne!(code, Some("internal"), "message {id}: {o:?}");
            assert_ne!(o.state, DeliveryState::Delivering);
        }
        assert_eq!(d.undelivered(), 0);
    }

    /// A worker for one webchat conversation of a dispatcher on the default configuration,
    /// never started, and the dispatcher's channels.
    fn idle_worker() -> (Arc<Channels>, Worker) {
        let config = Config::default();
        let (channels, _, d) = dispatcher(&config);
        let key = ConversationKey::new("webchat", "bot", "", "c1");
        let worker = Worker::new(d.inner.clone(), key, Arc::new(Line::new(0)));
        (channels, worker)
    }

    /// Ids may contain '/': the label alone would make these two conversations one line, and
    /// one conversation's messages could then wait behind the other's.
    #[test]
    fn keys_with_slashes_in_their_ids_stay_apart() {
        let a = ConversationKey::new("webchat", "a/b", "", "c");
        let b = ConversationKey::new("webchat", "a", "", "b/c");
        assert_eq!(a.label(), b.label());
        assert_ne!(a, b);
        assert_eq!(
            (a.channel_id(), a.bot_id(), a.conversation()),
            ("webchat", "a/b", "c")
        );
        assert_eq!(
            (b.channel_id(), b.bot_id(), b.conversation()),
            ("webchat", "a", "b/c")
        );
        let mut addr = Address {
            channel_id: "slack".into(),
            ..Default::default()
        };
        addr.user = Some(crate::model::Identity {
            id: "U1".into(),
            ..Default::default()
        });
        let by_user = ConversationKey::of(&addr);
        assert_eq!(by_user.conversation(), "user:U1");
        assert_eq!(by_user.channel_id(), "slack");
    }

    /// An accepted message waits in its line for as long as its conversation's backlog: its
    /// job must not carry room for more items than it has (one Send is one item).
    #[test]
    fn a_job_holds_no_spare_room_for_items() {
        let submission = || Submission {
            message: Message::default(),
            rendered: crate::channels::Rendered::default(),
            traceparent: None,
            op: None,
        };
        for n in [1, 3] {
            let (items, rxs) = new_items((0..n).map(|_| submission()).collect(), None, true);
            assert_eq!((items.len(), items.capacity()), (n, n));
            assert_eq!((rxs.len(), rxs.capacity()), (n, n));
        }
    }

    /// What an active conversation holds while idle: its registry entry, its line and its
    /// worker's task. Bounded so a change that bloats them fails here, not in a benchmark.
    #[tokio::test]
    async fn an_idle_conversation_stays_small() {
        let (_, worker) = idle_worker();
        let run = worker.run();
        let sizes = [
            ("worker future", std::mem::size_of_val(&run)),
            ("line", std::mem::size_of::<Line>()),
            ("entry", std::mem::size_of::<(ConversationKey, Entry)>()),
        ];
        eprintln!("{sizes:?}");
        // 344 bytes now; 744 before `run` stopped holding its worker twice, the job and the
        // typing keep-alive inline (RSS per active conversation at 100k: 1.6 -> 1.1 KB).
        assert!(sizes[0].1 <= 400, "{sizes:?}");
        assert!(sizes[1].1 <= 256, "{sizes:?}");
    }

    /// A job's future is built and moved for every message, and each level of the call down
    /// to the HTTP transport moves its callee's future by value: its size is memory written
    /// per message. Rare paths (a token refresh, a new connection, typing, proactive) are
    /// boxed so they do not count; a change that inlines one again fails here.
    #[tokio::test]
    async fn a_delivery_job_future_stays_small() {
        let (channels, mut worker) = idle_worker();
        let req = NativeRequest {
            method: crate::channels::HttpMethod::Post,
            url: "http://127.0.0.1:1/v3/conversations/c1/activities".into(),
            body: crate::channels::Body::default(),
            credential: "bot".into(),
            rate: Default::default(),
        };
        let call = std::mem::size_of_val(&channels.execute("webchat", &req));
        let job = std::mem::size_of_val(&worker.handle(Job::Deliver {
            items: Vec::new(),
            flush: true,
        }));
        eprintln!("channel call {call} B, job {job} B");
        assert!(call <= 3072, "channel call future {call} B");
        assert!(job <= 5120, "job future {job} B");
    }
}
