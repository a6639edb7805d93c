//! Delivery shared by several replicas over one PostgreSQL (`outbox.backend = "postgres"`).
//!
//! Owns what a replica does besides the single-process dispatcher: which accepted messages it
//! delivers (those of the partitions it leases, `crate::storage::lease`), how it learns of them
//! (reading new rows of its partitions by their commit-ordered `seq`, woken by its own commits,
//! by other replicas' `NOTIFY` and by a slow poll), how it gives a partition up (its messages
//! leave memory once nothing of it is in flight, then the lease manager releases it), and how a
//! Send that waits for delivery learns the outcome when another replica delivers.
//!
//! Every Send goes to the database first, on every replica: even the owner's own Sends are
//! delivered from what it reads back (their rendered form and waiting caller kept aside,
//! "parked", until then). That keeps one order for a conversation whatever replica each of its
//! Sends came through: a Send answered before the next one was made is numbered before it.
//!
//! Must not touch channels' JSON, gRPC, or the lease tables (the lease manager owns them).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, broadcast, oneshot, watch};

use crate::bounded::later_tokio;

use crate::channels::ChannelError;
use crate::model::Address;
use crate::outbox::{Fence, Outcome, PostgresStore, Store, StoredMessage};
use crate::storage::lease::{Drainer, Ownership, PARTITIONS, partition_of};
use crate::storage::notify::{Notifier, Wake};

/// A second look after a wake-up that found nothing new (see `run_feed`).
const RECHECK_AFTER: Duration = Duration::from_millis(20);
/// The feed reads at most once per this: under load a wake-up comes every fraction of a
/// millisecond (every replica's commits, each replica's NOTIFYs), and reading on each cost a
/// round trip per two messages (three replicas: 0.49 reads per message). Adds up to this much
/// to a delivery under load, nothing when reads are further apart.
const FEED_PACE: Duration = Duration::from_millis(2);
/// How often idle shared rate scopes are dropped (those untouched this long).
const PRUNE_EVERY: Duration = Duration::from_secs(300);
/// Messages read per query while catching up.
const FEED_LIMIT: usize = 2000;
/// A parked Send not fed within this long is let go (its partition moved away meanwhile, or
/// its key was taken by another replica's acceptance): its caller, if waiting, watches the
/// database instead.
const PARKED_FOR: Duration = Duration::from_secs(30);

/// A local Send waiting for its owner (this replica) to read it back.
pub(super) struct Parked {
    pub item: super::Item,
    pub partition: u32,
    /// Its conversation key's hash (`conversation_hash`), for a typing indicator's wait.
    pub conversation: u64,
    /// The first message of a proactive start carries who waits for the new address.
    pub created: Option<oneshot::Sender<Result<Address, ChannelError>>>,
    /// A StreamReply's feed: it goes in line as a stream once read back.
    pub stream: Option<super::StreamFeed>,
    pub at: Instant,
}

/// The parked Sends by id, and how many of each conversation (by its key's hash) are parked.
#[derive(Default)]
struct ParkedSet {
    by_id: HashMap<u64, Parked>,
    per_conversation: HashMap<u64, usize>,
}

impl ParkedSet {
    fn insert(&mut self, id: u64, parked: Parked) {
        let conversation = parked.conversation;
        if let Some(old) = self.by_id.insert(id, parked) {
            self.forget(old.conversation);
        }
        *self.per_conversation.entry(conversation).or_default() += 1;
    }

    fn remove(&mut self, id: u64) -> Option<Parked> {
        let parked = self.by_id.remove(&id)?;
        self.forget(parked.conversation);
        Some(parked)
    }

    fn forget(&mut self, conversation: u64) {
        if let Some(n) = self.per_conversation.get_mut(&conversation) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_conversation.remove(&conversation);
            }
        }
    }

    fn has_conversation(&self, conversation: u64) -> bool {
        self.per_conversation.contains_key(&conversation)
    }
}

pub struct Cluster {
    pub(super) store: Arc<PostgresStore>,
    ownership: watch::Receiver<Arc<Ownership>>,
    drainer: Drainer,
    notifier: Notifier,
    /// New work committed here, in partitions this replica holds.
    wake: Notify,
    parked: Mutex<ParkedSet>,
    /// Messages of each partition in memory (in a line or in flight): a releasing partition is
    /// drained once its count is 0.
    live: Vec<AtomicUsize>,
    /// Each partition's take: bumped when this replica stops delivering it (handed over, lost,
    /// or its lease lapsed by this replica's clock before a renewal came). Messages read in an
    /// earlier take are not delivered: the next take reads the partition again, in order.
    tenure: Vec<AtomicU64>,
    poll_every: Duration,
    /// Catch-ups asked for (`caught_up`), and the last one done: a typing indicator waits for
    /// one that began after it was asked, so every Send answered before it is in line first.
    asked: AtomicU64,
    done: watch::Sender<u64>,
    /// A wide scope was paused by this replica: reservations look at pauses even without
    /// budgets. (Pauses written by other replicas are seen by their budgeted scopes' reads.)
    paused_any: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each change to these maps is one step: a panic elsewhere cannot leave them half done.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cluster {
    pub fn new(
        store: Arc<PostgresStore>,
        ownership: watch::Receiver<Arc<Ownership>>,
        drainer: Drainer,
        notifier: Notifier,
        poll_every: Duration,
    ) -> Arc<Cluster> {
        Arc::new(Cluster {
            store,
            ownership,
            drainer,
            notifier,
            wake: Notify::new(),
            parked: Mutex::new(ParkedSet::default()),
            live: (0..PARTITIONS).map(|_| AtomicUsize::new(0)).collect(),
            tenure: (0..PARTITIONS).map(|_| AtomicU64::new(0)).collect(),
            poll_every,
            asked: AtomicU64::new(0),
            done: watch::channel(0).0,
            paused_any: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The fence this replica delivers a conversation's messages under now, if it holds its
    /// partition.
    pub(super) fn fence_for(&self, conversation: &str) -> Option<Fence> {
        let partition = partition_of(conversation);
        self.ownership
            .borrow()
            .epoch_for(partition, Instant::now())
            .map(|epoch| Fence { partition, epoch })
    }

    /// Whether a message read under `fence` in take `tenure` may still be delivered here.
    pub(super) fn holds(&self, fence: Fence, tenure: u64) -> bool {
        self.tenure_of(fence.partition) == tenure
            && self
                .ownership
                .borrow()
                .epoch_for(fence.partition, Instant::now())
                == Some(fence.epoch)
    }

    fn tenure_of(&self, partition: u32) -> u64 {
        self.tenure
            .get(partition as usize)
            .map_or(u64::MAX, |t| t.load(Ordering::SeqCst))
    }

    /// Ends take `tenure` of `partition` (if it is still the current one): the feed reads the
    /// partition again once it is held.
    pub(super) fn invalidate(&self, partition: u32, tenure: u64) {
        if let Some(t) = self.tenure.get(partition as usize)
            && t.compare_exchange(tenure, tenure + 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            tracing::debug!(
                partition,
                "stopped delivering a partition; it is read again when held"
            );
            self.wake.notify_one();
        }
    }

    /// Resolves once the lease under `fence` is gone (taken over, or expired by this
    /// replica's clock): a channel call racing it is abandoned rather than overlap the next
    /// owner's. A partition being handed over is not lost: its calls in flight finish first.
    pub(super) async fn lost(&self, fence: Fence) {
        self.ends(fence, false).await
    }

    /// `lost`, or the partition starts being handed over: a wait (a retry's backoff) ends so
    /// the handover does not wait for it.
    pub(super) async fn moving(&self, fence: Fence) {
        self.ends(fence, true).await
    }

    async fn ends(&self, fence: Fence, releasing_ends: bool) {
        let mut rx = self.ownership.clone();
        loop {
            let until = {
                let own = rx.borrow_and_update();
                match own.held.get(&fence.partition) {
                    Some(h) if h.epoch == fence.epoch && !(releasing_ends && h.releasing) => {
                        h.valid_until
                    }
                    _ => return,
                }
            };
            let deadline = tokio::time::Instant::from_std(until);
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    let own = rx.borrow();
                    let held = own.held.get(&fence.partition).is_some_and(|h| {
                        h.epoch == fence.epoch && h.valid_until > Instant::now()
                    });
                    if !held {
                        return;
                    }
                }
                changed = rx.changed() => if changed.is_err() {
                    return;
                },
            }
        }
    }

    /// Resolves once the feed read everything committed before this call (at most `within`):
    /// what is not stored (a typing indicator) then goes in line behind it.
    ///
    /// A read can leave out what committed after a transaction still open elsewhere on the
    /// server, so this also waits until none of this replica's Sends to the conversation is
    /// still parked (`conversation`: its key's hash).
    pub(super) async fn caught_up(&self, within: Duration, conversation: u64) {
        let deadline = later_tokio(tokio::time::Instant::now(), within);
        loop {
            let asked = self.asked.fetch_add(1, Ordering::SeqCst) + 1;
            let mut done = self.done.subscribe();
            self.wake.notify_one();
            // Only whether it came: the value's guard must not live across an await.
            let read = tokio::time::timeout_at(deadline, done.wait_for(|d| *d >= asked))
                .await
                .map(|r| r.is_ok());
            let waiting = lock(&self.parked).has_conversation(conversation);
            if read.is_err() || !waiting {
                return;
            }
            // Not read yet: look again shortly (the feed looks again by itself too).
            if tokio::time::timeout_at(deadline, tokio::time::sleep(RECHECK_AFTER))
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// The wait the scopes wider than a conversation ask of a request (a Telegram bot's 30
    /// messages a second, a Teams tenant's 50): they span every replica's conversations, so
    /// their budgets are kept in the database (`crate::storage::rate`) besides this replica's
    /// own limiter. A conversation's own scope needs no sharing: one replica delivers it. If
    /// the database cannot answer, the local limiter alone applies (logged).
    pub(super) async fn reserve_shared(&self, scopes: &crate::channels::RateScopes) -> Duration {
        let wide = scopes.levels().get(1..).unwrap_or_default();
        let budgets: Vec<crate::storage::rate::SharedBudget> = wide
            .iter()
            .flat_map(|l| {
                l.budgets
                    .iter()
                    .enumerate()
                    .map(|(i, b)| crate::storage::rate::SharedBudget {
                        key: format!("{}#{i}", l.key),
                        per_second: b.per_second,
                        // One less than the channel allows at once: the wait is the database's
                        // answer, and the replicas' calls reach the channel a few milliseconds
                        // apart from it; without the margin two of them can land in one second
                        // with a whole burst (51 of 50 in a test).
                        burst: b.burst.saturating_sub(1).max(1),
                    })
            })
            .collect();
        // Nothing budgeted and no pause written: no round trip.
        if budgets.is_empty() && !self.paused_any.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let keys: Vec<String> = wide.iter().map(|l| l.key.to_string()).collect();
        match crate::storage::rate::reserve(self.store.pool(), &budgets, &keys).await {
            Ok(wait) => wait,
            Err(e) => {
                tracing::warn!(error = %e, "shared rate scopes unreadable: this replica's own limits apply alone");
                Duration::ZERO
            }
        }
    }

    /// A channel's 429 paused a scope wider than a conversation: every replica waits it out.
    pub(super) fn pause_shared(&self, scope: &str, pause: Duration) {
        self.paused_any.store(true, Ordering::Relaxed);
        let (pool, scope) = (self.store.pool().clone(), scope.to_string());
        tokio::spawn(async move {
            if let Err(e) = crate::storage::rate::pause(&pool, &scope, pause).await {
                tracing::warn!(error = %e, "a shared rate scope's pause was not written");
            }
        });
    }

    pub(super) fn park(&self, id: u64, parked: Parked) {
        lock(&self.parked).insert(id, parked);
    }

    /// Sends parked here, waiting to be read back.
    pub(super) fn parked_len(&self) -> usize {
        lock(&self.parked).by_id.len()
    }

    /// Whether a Send to the conversation (its key's hash) is parked here.
    pub(super) fn conversation_parked(&self, conversation: u64) -> bool {
        lock(&self.parked).has_conversation(conversation)
    }

    /// A conversation key's hash, to tell parked Sends apart by conversation without keeping
    /// their keys (a collision only makes a typing indicator wait a little longer).
    pub(super) fn conversation_hash(label: &str) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        label.hash(&mut h);
        h.finish()
    }

    /// A Send of this replica waiting to be read back: the feed need not decode its body.
    fn is_parked(&self, id: u64) -> bool {
        lock(&self.parked).by_id.contains_key(&id)
    }

    /// The message of a parked Send (the feed read it without its body).
    pub(super) fn parked_message(&self, id: u64) -> Option<(Arc<crate::model::Message>, bool)> {
        lock(&self.parked)
            .by_id
            .get(&id)
            .map(|p| (p.item.message.clone(), p.item.proactive.is_some()))
    }

    pub(super) fn unpark(&self, id: u64) -> Option<Parked> {
        lock(&self.parked).remove(id)
    }

    pub(super) fn entered(&self, partition: u32, n: usize) {
        if let Some(c) = self.live.get(partition as usize) {
            c.fetch_add(n, Ordering::SeqCst);
        }
    }

    /// A message of `partition` left memory (finished, or handed over).
    pub(super) fn left(&self, partition: u32) {
        if let Some(c) = self.live.get(partition as usize)
            && c.fetch_sub(1, Ordering::SeqCst) == 1
        {
            // Maybe the last of a partition being handed over.
            self.wake.notify_one();
        }
    }

    /// After a commit: the partitions with new work. Those held here are read at once; the
    /// others' owners hear a NOTIFY.
    pub fn committed(&self, partitions: Option<&[u32]>) {
        let Some(partitions) = partitions else {
            self.wake.notify_one();
            return;
        };
        let now = Instant::now();
        let own = self.ownership.borrow().clone();
        let mut local = false;
        for &p in partitions {
            if own.epoch_for(p, now).is_some() {
                local = true;
            } else {
                self.notifier.wake(p);
            }
        }
        if local {
            self.wake.notify_one();
        }
    }
}

/// A partition being fed.
struct Fed {
    epoch: i64,
    /// `seq` read up to.
    cursor: i64,
    tenure: u64,
}

/// What the feed needs from the dispatcher: putting read messages in line, and letting go of
/// what it held of a partition.
pub(super) trait Lines: Send + Sync + 'static {
    /// Puts the messages of one conversation (consecutive, in order) in its line.
    fn feed(&self, fence: Fence, tenure: u64, messages: Vec<StoredMessage>);
}

/// Runs for the dispatcher's life: takes up partitions as they are leased, reads their new
/// messages, lets go of partitions being handed over.
pub(super) async fn run_feed(
    cluster: Arc<Cluster>,
    lines: Arc<dyn Lines>,
    mut wakes: broadcast::Receiver<Wake>,
) {
    let mut own_rx = cluster.ownership.clone();
    // The partitions being fed: their epoch, cursor (`seq` read up to) and take.
    let mut fed: BTreeMap<u32, Fed> = BTreeMap::new();
    let mut read_new = true;
    let mut recheck: Option<tokio::time::Instant> = None;
    let mut last_read: Option<tokio::time::Instant> = None;
    let mut next_poll = later_tokio(tokio::time::Instant::now(), cluster.poll_every);
    let mut pruned = Instant::now();
    loop {
        let now = Instant::now();
        if now.duration_since(pruned) > PRUNE_EVERY {
            pruned = now;
            let pool = cluster.store.pool().clone();
            tokio::spawn(async move {
                if let Err(e) = crate::storage::rate::prune(&pool, PRUNE_EVERY).await {
                    tracing::debug!(error = %e, "pruning idle shared rate scopes failed");
                }
            });
        }
        let own = own_rx.borrow_and_update().clone();
        // Let go of what is no longer ours (lost, releasing, or expired by our clock), and of
        // a take a worker ended (it found the lease lapsed): read again below if still ours.
        let before = fed.len();
        let mut lapsed = 0;
        fed.retain(|p, f| {
            let keep = own.epoch_for(*p, now) == Some(f.epoch) && cluster.tenure_of(*p) == f.tenure;
            if !keep {
                // Still held at the same epoch: the lease lapsed here, or a worker found it so.
                if own
                    .held
                    .get(p)
                    .is_some_and(|h| h.epoch == f.epoch && !h.releasing)
                {
                    lapsed += 1;
                }
                cluster.invalidate(*p, f.tenure);
            }
            keep
        });
        if fed.len() < before {
            let gone = before - fed.len();
            if lapsed > 0 {
                tracing::warn!(
                    partitions = gone,
                    lapsed,
                    "stopped delivering partitions whose lease lapsed here (a late renewal): \
                     they are read again once renewed"
                );
            } else {
                tracing::info!(partitions = gone, "partitions handed over or lost");
            }
        }
        // Releasing partitions with nothing left in memory may go.
        for (p, h) in &own.held {
            let live = cluster.live[*p as usize].load(Ordering::SeqCst);
            if h.releasing && live == 0 && !fed.contains_key(p) {
                cluster.drainer.drained(*p);
            }
        }
        // Take up new ones: all their unfinished messages, then new ones from the head.
        let new: Vec<(u32, i64)> = own
            .held
            .keys()
            .filter(|p| !fed.contains_key(p))
            .filter_map(|p| own.epoch_for(*p, now).map(|e| (*p, e)))
            .collect();
        if !new.is_empty() {
            let parts: Vec<u32> = new.iter().map(|(p, _)| *p).collect();
            let known = |id| cluster.is_parked(id);
            match cluster.store.feed_load(&parts, &known).await {
                Ok(feed) => {
                    for (p, epoch) in new {
                        let tenure = cluster.tenure_of(p);
                        fed.insert(
                            p,
                            Fed {
                                epoch,
                                cursor: feed.head,
                                tenure,
                            },
                        );
                    }
                    put_in_line(&*lines, &fed, feed.messages);
                    tracing::info!(
                        partitions = parts.len(),
                        "took up partitions: their unfinished messages are in line"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading newly leased partitions failed; trying again")
                }
            }
        }
        let asked = cluster.asked.load(Ordering::SeqCst);
        if read_new || asked > *cluster.done.borrow() {
            read_new = false;
            let paced = last_read.and_then(|t| t.checked_add(FEED_PACE));
            if let Some(at) = paced.filter(|at| *at > tokio::time::Instant::now()) {
                tokio::time::sleep_until(at).await;
            }
            last_read = Some(tokio::time::Instant::now());
            match catch_up(&cluster, &*lines, &mut fed).await {
                Ok(read) => {
                    cluster.done.send_replace(asked);
                    // Woken for a commit but nothing new to read: an older transaction (another
                    // replica's) was still running, and what committed after it is not read
                    // until it ends. One more look shortly, rather than at the next poll.
                    recheck = (read == 0 && recheck.is_none())
                        .then(|| tokio::time::Instant::now() + RECHECK_AFTER);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading new messages failed; trying again");
                    read_new = true;
                }
            }
        }
        sweep_parked(&cluster, &fed);
        let recheck_at = recheck.unwrap_or_else(|| {
            tokio::time::Instant::now()
                .checked_add(cluster.poll_every)
                .unwrap_or_else(tokio::time::Instant::now)
        });
        tokio::select! {
            _ = tokio::time::sleep_until(recheck_at), if recheck.is_some() => {
                read_new = true;
            }
            changed = own_rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = cluster.wake.notified() => read_new = true,
            w = wakes.recv() => match w {
                Ok(Wake::Partitions(ps)) => read_new |= ps.iter().any(|p| fed.contains_key(p)),
                Ok(Wake::All) | Err(broadcast::error::RecvError::Lagged(_)) => read_new = true,
                Err(broadcast::error::RecvError::Closed) => {
                    // No listener: the poll alone.
                    tokio::time::sleep(cluster.poll_every).await;
                    read_new = true;
                }
            },
            // A deadline kept across turns: the lease manager publishes every renewal, which
            // wakes this loop more often than the poll's period, and a sleep started afresh
            // each turn would never end.
            _ = tokio::time::sleep_until(next_poll) => {
                read_new = true;
                next_poll = later_tokio(tokio::time::Instant::now(), cluster.poll_every);
            }
        }
    }
}

/// Reads every partition's messages after its cursor, until none is left; returns how many
/// it put in line.
async fn catch_up(
    cluster: &Cluster,
    lines: &dyn Lines,
    fed: &mut BTreeMap<u32, Fed>,
) -> Result<usize, crate::outbox::StoreError> {
    let mut read = 0;
    if fed.is_empty() {
        return Ok(read);
    }
    loop {
        let from = fed.values().map(|f| f.cursor).min().unwrap_or(0);
        let parts: Vec<u32> = fed.keys().copied().collect();
        let known = |id| cluster.is_parked(id);
        let feed = cluster
            .store
            .feed_after(from, &parts, FEED_LIMIT, &known)
            .await?;
        let fresh: Vec<_> = feed
            .messages
            .into_iter()
            .filter(|(p, seq, _)| fed.get(p).is_some_and(|f| *seq > f.cursor))
            .collect();
        read += fresh.len();
        put_in_line(lines, fed, fresh);
        // Everything up to here was read, for every partition fed.
        let upto = if feed.more { feed.last } else { feed.head };
        for f in fed.values_mut() {
            f.cursor = f.cursor.max(upto);
        }
        if !feed.more {
            return Ok(read);
        }
    }
}

/// Groups consecutive messages of one conversation (as a restart's resume does) and puts them
/// in line under their partition's fence.
fn put_in_line(
    lines: &dyn Lines,
    fed: &BTreeMap<u32, Fed>,
    messages: Vec<(u32, i64, StoredMessage)>,
) {
    let mut groups: Vec<(u32, String, Vec<StoredMessage>)> = Vec::new();
    for (p, _, m) in messages {
        match groups.last_mut() {
            Some((gp, conv, list)) if *gp == p && *conv == m.conversation => list.push(m),
            _ => groups.push((p, m.conversation.clone(), vec![m])),
        }
    }
    for (p, _, list) in groups {
        if let Some(f) = fed.get(&p) {
            lines.feed(
                Fence {
                    partition: p,
                    epoch: f.epoch,
                },
                f.tenure,
                list,
            );
        }
    }
}

/// Lets go of parked Sends nobody will feed here: a caller waiting for delivery then watches
/// the database.
fn sweep_parked(cluster: &Cluster, fed: &BTreeMap<u32, Fed>) {
    let now = Instant::now();
    let gone: Vec<Parked> = {
        let mut parked = lock(&cluster.parked);
        let ids: Vec<u64> = parked
            .by_id
            .iter()
            .filter(|(_, p)| {
                let age = now.duration_since(p.at);
                age > PARKED_FOR
                    || (age > Duration::from_secs(1) && !fed.contains_key(&p.partition))
            })
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter().filter_map(|id| parked.remove(id)).collect()
    };
    for p in gone {
        if let Some(done) = p.item.done {
            watch_remote(cluster.store.clone(), p.item.id, done);
        }
    }
}

/// A Send waiting for delivery whose message another replica delivers: the outcome is read
/// from the database until it is final or the caller stops waiting.
pub(super) fn watch_remote(store: Arc<PostgresStore>, id: u64, mut done: oneshot::Sender<Outcome>) {
    tokio::spawn(async move {
        let mut every = Duration::from_millis(50);
        loop {
            if done.is_closed() {
                return;
            }
            if let Ok(Some(m)) = store.get(id).await
                && m.record.state.is_terminal()
            {
                let _ = done.send(m.outcome());
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = done.closed() => return,
            }
            every = (every * 2).min(Duration::from_secs(1));
        }
    });
}
