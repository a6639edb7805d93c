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

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tracing::Instrument;

use crate::channels::{
    ChannelError, Channels, FailureKind, NativeReceipt, NativeRequest, Rendered,
};
use crate::config::DeliveryConfig;
use crate::model::{Address, Message, ProactiveOptions};
use crate::outbox::{DeliveryState, Outcome, Record, Store};

const SHARDS: usize = 64;

/// (channel id, bot id, conversation id); a proactive start without a conversation is keyed by
/// the user until the channel names the new conversation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConversationKey {
    pub channel_id: String,
    pub bot_id: String,
    pub conversation: String,
}

impl ConversationKey {
    pub fn of(addr: &Address) -> Self {
        let conversation = match addr.conversation_id() {
            Some(id) => id.to_string(),
            None => format!("user:{}", addr.user_id()),
        };
        Self {
            channel_id: addr.channel_id.clone(),
            bot_id: addr.bot_id().to_string(),
            conversation,
        }
    }

    fn label(&self) -> String {
        format!("{}/{}/{}", self.channel_id, self.bot_id, self.conversation)
    }
}

/// One accepted message on its way.
struct Item {
    id: String,
    message: Message,
    rendered: Rendered,
    accepted_at: Instant,
    done: Option<oneshot::Sender<Outcome>>,
}

enum Job {
    /// Messages delivered back to back; `flush` skips the auto-batch window.
    Deliver { items: Vec<Item>, flush: bool },
    Typing {
        item: Box<Item>,
        keep_alive: Option<Duration>,
    },
    Proactive {
        address: Box<Address>,
        options: ProactiveOptions,
        items: Vec<Item>,
        created: oneshot::Sender<Result<Address, ChannelError>>,
    },
}

impl Job {
    fn len(&self) -> usize {
        match self {
            Job::Deliver { items, .. } | Job::Proactive { items, .. } => items.len(),
            Job::Typing { .. } => 1,
        }
    }
}

/// Resolves to the new address once a proactive start created its conversation.
pub type Created = oneshot::Receiver<Result<Address, ChannelError>>;

/// What the caller gets back for each accepted message.
pub struct Ticket {
    pub id: String,
    /// Resolves when the message reaches a final state (only when asked for).
    pub outcome: Option<oneshot::Receiver<Outcome>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

struct Inner {
    shards: Vec<Mutex<HashMap<ConversationKey, mpsc::UnboundedSender<Job>>>>,
    channels: Arc<Channels>,
    store: Arc<dyn Store>,
    config: DeliveryConfig,
    permits: Semaphore,
    rates: rate::RateLimiter,
    accepting: AtomicBool,
    workers: AtomicUsize,
    /// Accepted messages not yet in a final state (typing included), for draining.
    undelivered: AtomicUsize,
    drained: Notify,
    next_id: AtomicU64,
    id_prefix: String,
    next_seq: AtomicU64,
}

/// Handle to the ordering engine; cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

impl Dispatcher {
    pub fn new(channels: Arc<Channels>, store: Arc<dyn Store>, config: DeliveryConfig) -> Self {
        let nonce = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default()
            ^ rand::random::<u64>();
        Self {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                channels,
                store,
                permits: Semaphore::new(config.max_concurrency),
                rates: rate::RateLimiter::default(),
                config,
                accepting: AtomicBool::new(true),
                workers: AtomicUsize::new(0),
                undelivered: AtomicUsize::new(0),
                drained: Notify::new(),
                next_id: AtomicU64::new(1),
                id_prefix: format!("{nonce:016x}"),
                next_seq: AtomicU64::new(1),
            }),
        }
    }

    pub fn channels(&self) -> &Channels {
        &self.inner.channels
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
    pub fn submit(
        &self,
        messages: Vec<(Message, Rendered)>,
        flush: bool,
        want_outcome: bool,
    ) -> Result<Vec<Ticket>, SubmitError> {
        let Some(first) = messages.first() else {
            return Ok(Vec::new());
        };
        let key = ConversationKey::of(&first.0.address);
        let (items, tickets) = self.inner.items(messages, want_outcome);
        self.inner.enqueue(&key, Job::Deliver { items, flush })?;
        Ok(tickets)
    }

    /// Accepts a typing indicator in line with the conversation's messages.
    pub fn submit_typing(
        &self,
        message: Message,
        rendered: Rendered,
        keep_alive: Option<Duration>,
    ) -> Result<(), SubmitError> {
        let key = ConversationKey::of(&message.address);
        let (mut items, _) = self.inner.items(vec![(message, rendered)], false);
        let item = items.pop().ok_or(SubmitError::ShuttingDown)?;
        self.inner.enqueue(
            &key,
            Job::Typing {
                item: Box::new(item),
                keep_alive,
            },
        )
    }

    /// Starts a conversation, then delivers `messages` to it. The receiver yields the new
    /// address once the channel created it and the messages are queued on it, so a Send to the
    /// new address made after that can never overtake them.
    pub fn submit_proactive(
        &self,
        address: Address,
        options: ProactiveOptions,
        messages: Vec<(Message, Rendered)>,
        want_outcome: bool,
    ) -> Result<(Vec<Ticket>, Created), SubmitError> {
        let key = ConversationKey::of(&address);
        let (items, tickets) = self.inner.items(messages, want_outcome);
        let (tx, rx) = oneshot::channel();
        self.inner.enqueue(
            &key,
            Job::Proactive {
                address: Box::new(address),
                options,
                items,
                created: tx,
            },
        )?;
        Ok((tickets, rx))
    }

    /// Stops accepting and waits until every accepted message is finished, or `grace` passes.
    /// Returns how many were left undelivered.
    pub async fn shutdown(&self, grace: Duration) -> usize {
        self.inner.accepting.store(false, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + grace;
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

impl Inner {
    fn shard(
        &self,
        key: &ConversationKey,
    ) -> MutexGuard<'_, HashMap<ConversationKey, mpsc::UnboundedSender<Job>>> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let idx = (h.finish() as usize) % self.shards.len();
        // The map stays consistent across a panic (insert/remove are single steps).
        self.shards[idx].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n:010}", self.id_prefix)
    }

    fn items(
        &self,
        messages: Vec<(Message, Rendered)>,
        want_outcome: bool,
    ) -> (Vec<Item>, Vec<Ticket>) {
        let now = Instant::now();
        messages
            .into_iter()
            .map(|(message, rendered)| {
                let id = self.new_id();
                let (tx, rx) = if want_outcome {
                    let (tx, rx) = oneshot::channel();
                    (Some(tx), Some(rx))
                } else {
                    (None, None)
                };
                (
                    Item {
                        id: id.clone(),
                        message,
                        rendered,
                        accepted_at: now,
                        done: tx,
                    },
                    Ticket { id, outcome: rx },
                )
            })
            .unzip()
    }

    fn enqueue(self: &Arc<Self>, key: &ConversationKey, job: Job) -> Result<(), SubmitError> {
        self.enqueue_as(key, job, false)
    }

    /// `requeue` is for items already accepted (a proactive start moving to its new
    /// conversation): allowed during shutdown, because the gateway owes them delivery.
    fn enqueue_as(
        self: &Arc<Self>,
        key: &ConversationKey,
        job: Job,
        requeue: bool,
    ) -> Result<(), SubmitError> {
        if !requeue && !self.accepting.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let mut shard = self.shard(key);
        // Sequence and record under the shard lock: acceptance order is delivery order.
        let label = key.label();
        let ids: Vec<&Item> = match &job {
            Job::Deliver { items, .. } | Job::Proactive { items, .. } => items.iter().collect(),
            Job::Typing { item, .. } => vec![item.as_ref()],
        };
        for item in ids {
            self.store.accepted(Record {
                id: item.id.clone(),
                conversation: label.clone(),
                seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
                accepted_at: SystemTime::now(),
                state: DeliveryState::Accepted,
                outcome: None,
            });
        }
        self.undelivered.fetch_add(job.len(), Ordering::SeqCst);
        let job = match shard.get(key) {
            Some(tx) => match tx.send(job) {
                Ok(()) => return Ok(()),
                // The worker is gone without deregistering (it panicked): replace it.
                Err(mpsc::error::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        // A fresh channel with its receiver in hand cannot refuse the job.
        let _ = tx.send(job);
        shard.insert(key.clone(), tx);
        drop(shard);
        self.workers.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("conversation", key = %label);
        tokio::spawn(
            Worker::new(self.clone(), key.clone(), rx)
                .run()
                .instrument(span),
        );
        Ok(())
    }

    fn finish(&self, item: Item, outcome: Outcome) {
        self.store.finished(&item.id, outcome.clone());
        if let Some(tx) = item.done {
            // The caller may have stopped waiting; the outcome stays in the store.
            let _ = tx.send(outcome);
        }
        self.finished_one();
    }

    fn finished_one(&self) {
        if self.undelivered.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.drained.notify_waiters();
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
    rx: mpsc::UnboundedReceiver<Job>,
    backlog: VecDeque<Job>,
    typing: Option<TypingKeepAlive>,
}

impl Worker {
    fn new(inner: Arc<Inner>, key: ConversationKey, rx: mpsc::UnboundedReceiver<Job>) -> Self {
        Self {
            inner,
            key,
            rx,
            backlog: VecDeque::new(),
            typing: None,
        }
    }

    async fn run(mut self) {
        while let Some(job) = self.next_job().await {
            match job {
                Job::Deliver { items, flush } => {
                    self.typing = None;
                    let items = if flush || self.inner.config.auto_batch_delay.is_zero() {
                        items
                    } else {
                        self.gather_auto_batch(items).await
                    };
                    for item in items {
                        self.deliver(item).await;
                    }
                }
                Job::Typing { item, keep_alive } => {
                    let requests = item.rendered.clone();
                    self.send_typing(&requests).await;
                    self.inner.finish(
                        *item,
                        Outcome {
                            state: DeliveryState::Delivered,
                            receipts: Vec::new(),
                            error: None,
                            attempts: 1,
                            possible_duplicate: false,
                        },
                    );
                    self.typing = keep_alive.filter(|d| !d.is_zero()).map(|d| {
                        let interval = self.inner.channels.typing_interval(&self.key.channel_id);
                        let now = tokio::time::Instant::now();
                        TypingKeepAlive {
                            item_requests: requests,
                            until: now + d,
                            next: now + interval,
                            interval,
                        }
                    });
                }
                Job::Proactive {
                    address,
                    options,
                    items,
                    created,
                } => self.proactive(*address, options, items, created).await,
            }
        }
        self.inner.workers.fetch_sub(1, Ordering::Relaxed);
    }

    /// The next job, repeating typing while idle; `None` once the worker evicted itself.
    async fn next_job(&mut self) -> Option<Job> {
        if let Some(job) = self.backlog.pop_front() {
            return Some(job);
        }
        let mut idle_deadline = tokio::time::Instant::now() + self.inner.config.idle_timeout;
        loop {
            let wake = match &self.typing {
                Some(t) => t.next.min(t.until),
                None => idle_deadline,
            };
            tokio::select! {
                biased;
                job = self.rx.recv() => return job,
                _ = tokio::time::sleep_until(wake) => {}
            }
            let now = tokio::time::Instant::now();
            if let Some(t) = &mut self.typing {
                if now >= t.until {
                    self.typing = None;
                    idle_deadline = now + self.inner.config.idle_timeout;
                } else if now >= t.next {
                    t.next = now + t.interval;
                    let requests = t.item_requests.clone();
                    self.send_typing(&requests).await;
                }
                continue;
            }
            if now >= idle_deadline {
                let mut shard = self.inner.shard(&self.key);
                // Decided under the lock senders hold while enqueuing: nothing can slip in.
                if self.rx.is_empty() {
                    shard.remove(&self.key);
                    tracing::debug!("conversation worker evicted after idle period");
                    return None;
                }
            }
        }
    }

    /// v3 autoBatchDelay: consecutive Sends within the window go out back to back.
    async fn gather_auto_batch(&mut self, mut items: Vec<Item>) -> Vec<Item> {
        let deadline = tokio::time::Instant::now() + self.inner.config.auto_batch_delay;
        loop {
            tokio::select! {
                biased;
                job = self.rx.recv() => match job {
                    Some(Job::Deliver { items: more, flush: false }) => items.extend(more),
                    Some(other) => { self.backlog.push_back(other); return items; }
                    None => return items,
                },
                _ = tokio::time::sleep_until(deadline) => return items,
            }
        }
    }

    async fn send_typing(&self, rendered: &Rendered) {
        for req in &rendered.requests {
            // Typing is ephemeral: one attempt, a failure only logged.
            if let Err(e) = self.execute(req).await {
                tracing::warn!(error = %e, "typing indicator not delivered");
            }
        }
    }

    /// One call: wait for the request's rate scope (sleeping outside any lock), take a global
    /// permit, call the channel; a 429 pauses the whole scope.
    async fn execute(&self, req: &NativeRequest) -> Result<NativeReceipt, ChannelError> {
        if let Some(limit) = &req.rate {
            let wait = self.inner.rates.reserve(limit, std::time::Instant::now());
            if !wait.is_zero() {
                tracing::debug!(scope = %limit.scope, wait_ms = wait.as_millis() as u64, "waiting for rate scope");
                tokio::time::sleep(wait).await;
            }
        }
        let result = {
            let _permit = self.inner.permits.acquire().await;
            self.inner.channels.execute(&self.key.channel_id, req).await
        };
        if let (Err(e), Some(limit)) = (&result, &req.rate)
            && e.http_status == Some(429)
        {
            let pause = e.retry_after.unwrap_or(self.inner.config.base_retry_delay);
            let pause = pause.min(self.inner.config.max_retry_delay);
            tracing::warn!(scope = %limit.scope, pause_ms = pause.as_millis() as u64, "rate limited: pausing the scope");
            self.inner
                .rates
                .pause(&limit.scope, std::time::Instant::now() + pause);
        }
        result
    }

    fn expired(item: &Item) -> bool {
        item.message
            .expiration
            .is_some_and(|exp| exp <= time::OffsetDateTime::now_utc())
    }

    async fn deliver(&self, item: Item) {
        let outcome = self.attempt_all(&item).await;
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
        self.inner.finish(item, outcome);
    }

    /// Every request of the message in order, each retried in place until it succeeds or gives up.
    async fn attempt_all(&self, item: &Item) -> Outcome {
        let cfg = &self.inner.config;
        self.inner.store.delivering(&item.id);
        let mut out = Outcome {
            state: DeliveryState::Delivering,
            receipts: Vec::new(),
            error: None,
            attempts: 0,
            possible_duplicate: false,
        };
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
                attempt += 1;
                out.attempts += 1;
                let result = self.execute(req).await;
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
                tokio::time::sleep(wait).await;
            }
        }
        out.state = DeliveryState::Delivered;
        out
    }

    async fn proactive(
        &self,
        address: Address,
        options: ProactiveOptions,
        items: Vec<Item>,
        created: oneshot::Sender<Result<Address, ChannelError>>,
    ) {
        let cfg = &self.inner.config;
        let mut attempt = 0u32;
        let result = loop {
            attempt += 1;
            let r = {
                let _permit = self.inner.permits.acquire().await;
                self.inner
                    .channels
                    .create_conversation(&address, &options)
                    .await
            };
            match r {
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
                let mut ready = Vec::with_capacity(items.len());
                for mut item in items {
                    item.message.address = new_address.clone();
                    match self
                        .inner
                        .channels
                        .render_send(&item.message, Some(&options))
                    {
                        Ok(r) => {
                            item.rendered = r;
                            ready.push(item);
                        }
                        Err(e) => {
                            let err = ChannelError {
                                code: Some("render".into()),
                                ..ChannelError::new(
                                    &self.key.channel_id,
                                    FailureKind::Permanent,
                                    e.to_string(),
                                )
                            };
                            self.fail(item, err, 0);
                        }
                    }
                }
                let key = ConversationKey::of(&new_address);
                if !ready.is_empty() {
                    // These were already counted as undelivered when the proactive job was accepted.
                    let n = ready.len();
                    self.inner.undelivered.fetch_sub(n, Ordering::SeqCst);
                    let job = Job::Deliver {
                        items: ready,
                        flush: true,
                    };
                    if let Err(SubmitError::ShuttingDown) = self.inner.enqueue_as(&key, job, true) {
                        tracing::warn!("proactive messages not queued: shutting down");
                    }
                }
                let _ = created.send(Ok(new_address));
            }
            Err(e) => {
                tracing::warn!(error = %e, "conversation not created");
                for item in items {
                    self.fail(item, e.clone(), attempt);
                }
                let _ = created.send(Err(e));
            }
        }
    }

    fn fail(&self, item: Item, error: ChannelError, attempts: u32) {
        self.inner.finish(
            item,
            Outcome {
                state: DeliveryState::Failed,
                receipts: Vec::new(),
                error: Some(error),
                attempts,
                possible_duplicate: false,
            },
        );
    }
}
