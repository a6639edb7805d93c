//! The outbox in PostgreSQL (`outbox.backend = "postgres"`), shared by every replica on one
//! database: the same tables, columns and semantics as the SQLite store (`sqlite.rs`), over the
//! network, plus what sharing needs (migration 5 of `crate::storage::postgres`):
//! - ids from a block of 2^40 each replica start takes, so they are unique across replicas;
//! - a commit-ordered `seq` on every appended or redelivered message, which a partition's owner
//!   reads its new work by ([`PostgresStore::feed_load`], [`PostgresStore::feed_after`]);
//! - state writes fenced by the partition's lease epoch ([`Store::update_fenced`]): a write from
//!   a replica that lost the partition changes nothing and answers [`StoreError::Fenced`];
//! - an idempotency key inserted only if free (or past the window): of two replicas racing one
//!   key, the second stores nothing and answers [`StoreError::KeyTaken`].
//!
//! Owns the outbox's rows in the database (`outbox_messages`, `outbox_bodies`,
//! `outbox_idempotency`, `outbox_meta`, created by migration 2 of `crate::storage::postgres`),
//! one writer task on a connection of its own, and a pool of reader connections. Every change
//! goes through the writer's queue; the writer takes whatever queued up and commits it in one
//! transaction whose statements are pipelined (BEGIN, one multi-row statement per kind of write
//! over `unnest` arrays, COMMIT: one round trip and one WAL flush for the whole group), then
//! settles the versions it committed in `Commits`. Knows nothing of ordering, gRPC or channels;
//! does not lease partitions (`crate::storage::lease` does) nor decide who delivers.
//!
//! Copied from `sqlite.rs` (to be factored out by its owner): the overlay of changes not yet
//! committed and its upkeep after a commit, the folding of one message's changes into one row
//! write, the body's JSON and the state words.
//!
//! Unlike a disk failure, an unreachable database is an outage that ends: a commit that fails
//! answers its waiters with the error (a Send answers UNAVAILABLE) but does not break the store;
//! [`Store::failure`] reports the outage until a commit or a probe succeeds again, and
//! [`Store::transient`] says so. State changes nobody waited for (`record`: final outcomes, a
//! mark taken back) are kept and committed again with the next group, folded per message and at
//! most [`RETRY_MAX_MESSAGES`] messages' worth; past that bound (or after [`RETRY_MAX_TRIES`]
//! failures that were not an outage) the oldest are dropped with an error in the log, which
//! leaves those messages to be resent, flagged, after a restart, as a crash would.
//!
//! A commit whose connection broke during COMMIT may have committed: its waiters were told it
//! failed. A Send's retry with its idempotency key then finds the first acceptance; the
//! dispatcher records the message it dropped as failed, so it is never delivered twice.
//!
//! Text columns cannot hold NUL characters in PostgreSQL: conversations and idempotency keys
//! (from requests) are stored with `\` and NUL escaped (`\\`, `\0`), see [`escape_text`].

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::codec::{
    decode_body, encode_bodies, encode_body, lock, record_from, state_word, storage,
};
use super::overlay::Overlay;
use super::{
    Change, Commits, DeliveryState, Durable, IdempotencyRecord, StateRecord, Store, StoreError,
    StoredMessage, apply, apply_state,
};
use crate::storage::postgres::{self, MIGRATIONS, PgError, Pool, PostgresConfig};

/// Commands taken into one commit at most.
const MAX_BATCH: usize = 8192;
/// Rows deleted per compaction transaction, so queued Sends wait for one chunk at most.
const COMPACT_CHUNK: i64 = 5000;
/// Messages whose unwaited state changes are kept for the next commit after a failed one (an
/// entry is a message's newest state, a few hundred bytes: ~25 MB at most).
pub const RETRY_MAX_MESSAGES: usize = 100_000;
/// Failed commits, other than an outage, a kept state change is tried in before it is dropped:
/// an error that is about the change itself would otherwise fail every later group too.
pub const RETRY_MAX_TRIES: u8 = 5;
/// While the database is unreachable: how often the writer tries again without new work.
const RETRY_EVERY: Duration = Duration::from_millis(500);
/// While idle and healthy: how often the writer checks its connection, so readiness turns
/// 503 during an outage even when nothing is sent.
const PROBE_EVERY: Duration = Duration::from_secs(2);

/// Text from a request as a PostgreSQL TEXT value holds it: `\` doubled and NUL (which TEXT
/// refuses) as `\0`. Injective, and the identity for text without either.
pub fn escape_text(s: &str) -> Cow<'_, str> {
    if !s.contains(['\\', '\0']) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The inverse of [`escape_text`].
pub fn unescape_text(s: &str) -> String {
    if !s.contains('\\') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('0') => out.push('\0'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// A whole message: its state row and its body.
const COLUMNS: &str = "m.id, m.conversation, m.state, m.attempts, m.possible_duplicate, \
                       m.receipts, m.error, m.accepted_at_ms, m.updated_at_ms, b.body";
const FROM: &str = "outbox_messages m JOIN outbox_bodies b ON b.id = m.id";
/// `COLUMNS` without the body, for the feed: the bodies of a replica's own Sends are not
/// read back (a body is most of a row), the others' are read apart.
const FEED_COLUMNS: &str = "m.id, m.conversation, m.state, m.attempts, m.possible_duplicate, \
                            m.receipts, m.error, m.accepted_at_ms, m.updated_at_ms, NULL::text";

fn decode_message(r: &tokio_postgres::Row) -> Result<StoredMessage, StoreError> {
    decode_row(r, true)
}

/// A row as a message; without `body`, its message is left empty (the reader has it already).
fn decode_row(r: &tokio_postgres::Row, body: bool) -> Result<StoredMessage, StoreError> {
    let get = |e: tokio_postgres::Error| storage(format!("reading an outbox row: {e}"));
    let id: i64 = r.try_get(0).map_err(get)?;
    let conversation: &str = r.try_get(1).map_err(get)?;
    let state: &str = r.try_get(2).map_err(get)?;
    let attempts: i32 = r.try_get(3).map_err(get)?;
    let dup: bool = r.try_get(4).map_err(get)?;
    let receipts: Option<&str> = r.try_get(5).map_err(get)?;
    let error: Option<&str> = r.try_get(6).map_err(get)?;
    let accepted: i64 = r.try_get(7).map_err(get)?;
    let updated: i64 = r.try_get(8).map_err(get)?;
    let record = record_from(state, i64::from(attempts), dup, receipts, error, updated)?;
    let (message, proactive, warnings, op) = if body {
        let body: &str = r.try_get(9).map_err(get)?;
        let b = decode_body(body)?;
        (Arc::new(b.message), b.proactive, b.warnings, b.op)
    } else {
        Default::default()
    };
    Ok(StoredMessage {
        id: u64::try_from(id).unwrap_or_default(),
        conversation: unescape_text(conversation),
        message,
        proactive,
        accepted_at_ms: u64::try_from(accepted).unwrap_or_default(),
        record,
        warnings,
        op,
    })
}

fn db_id(id: u64) -> i64 {
    id.min(i64::MAX as u64) as i64
}

fn db_ms(ms: u64) -> i64 {
    ms.min(i64::MAX as u64) as i64
}

/// A message's body as the writer stores it: encoded by the caller, on its own core.
struct EncodedBody {
    conversation: String,
    accepted_at_ms: u64,
    json: String,
}

/// A body to write: encoded by the caller, or a move (a proactive start's message now in its
/// conversation) of a body not in the overlay, which the writer reads and rewrites.
enum BodyWrite {
    Encoded(EncodedBody),
    Moved {
        conversation: String,
        message: Arc<crate::model::Message>,
    },
}

/// A state change of a message whose state is not in the overlay (a finished message being
/// redelivered): the columns it sets, written as such, so `update` never waits for a read.
#[derive(Debug, Clone, PartialEq)]
struct Partial {
    /// `None` for a move, which sets no state column.
    state: Option<DeliveryState>,
    attempts: Option<u32>,
    clear_error: bool,
    updated_at_ms: u64,
}

impl Partial {
    /// `None` for a change that replaces the whole state (`Finished`) or is not a state change.
    fn of(change: &Change) -> Option<Partial> {
        let (state, attempts, clear_error) = match change {
            Change::Delivering { attempts } => (DeliveryState::Delivering, Some(*attempts), false),
            Change::Waiting { attempts } => (DeliveryState::Accepted, Some(*attempts), false),
            Change::Requeued => (DeliveryState::Accepted, None, true),
            Change::Finished(_) | Change::Moved { .. } => return None,
        };
        Some(Partial {
            state: Some(state),
            attempts,
            clear_error,
            updated_at_ms: super::now_ms(),
        })
    }

    /// This change, then `later`.
    fn then(mut self, later: &Partial) -> Partial {
        self.state = later.state.or(self.state);
        self.attempts = later.attempts.or(self.attempts);
        self.clear_error |= later.clear_error;
        self.updated_at_ms = later.updated_at_ms;
        self
    }

    fn apply_to(&self, s: &mut StateRecord) {
        if let Some(state) = self.state {
            s.state = state;
        }
        if let Some(a) = self.attempts {
            s.attempts = a;
        }
        if self.clear_error {
            s.error = None;
        }
        s.updated_at_ms = self.updated_at_ms;
    }
}

/// The state an entry writes: all of it, or the columns a change without a known base sets.
#[derive(Debug, Clone, PartialEq)]
enum EntryState {
    Full(StateRecord),
    Partial(Partial),
}

impl EntryState {
    /// This state, then `later`'s.
    fn then(self, later: EntryState) -> EntryState {
        match (self, later) {
            (_, EntryState::Full(s)) => EntryState::Full(s),
            (EntryState::Full(mut s), EntryState::Partial(p)) => {
                p.apply_to(&mut s);
                EntryState::Full(s)
            }
            (EntryState::Partial(q), EntryState::Partial(p)) => EntryState::Partial(q.then(&p)),
        }
    }
}

/// One change for the writer: a whole message (appended, or moved by a proactive start) or a
/// new state.
struct Entry {
    version: u64,
    id: u64,
    body: Option<BodyWrite>,
    state: EntryState,
    /// Failed commits (other than an outage) this change was part of.
    tries: u8,
    /// The lease epoch a fenced state write was made under.
    fence: Option<i64>,
    /// Redelivered: numbered again so the partition's owner reads it as new.
    requeue: bool,
    /// The idempotency key an appended message was accepted with: it is stored only if the
    /// key's record is its own acceptance.
    idem: Option<Arc<IdemTag>>,
}

/// An acceptance's key as stored, and its message ids as the record holds them.
struct IdemTag {
    key: String,
    ids: String,
}

enum Cmd {
    Put {
        entries: Vec<Entry>,
        idempotency: Option<(String, IdempotencyRecord)>,
        /// The put's last version: settled once its commit is done, waited on or not.
        version: u64,
        /// Somebody holds a `Durable` for it: a failed commit tells them, and the change is
        /// not tried again. Without one (`record`), a failed commit keeps it for the next.
        waited: bool,
    },
    Compact {
        cutoff_ms: u64,
        idem_cutoff_ms: u64,
        done: tokio::sync::oneshot::Sender<usize>,
    },
}

/// The overlay both stores keep (`overlay.rs`), and the changes of messages whose state is not
/// known here, until committed: a read applies them to the row it read.
#[derive(Default)]
struct PgOverlay {
    core: Overlay,
    partials: HashMap<u64, (u64, Partial)>,
}

impl std::ops::Deref for PgOverlay {
    type Target = Overlay;
    fn deref(&self) -> &Overlay {
        &self.core
    }
}

impl std::ops::DerefMut for PgOverlay {
    fn deref_mut(&mut self) -> &mut Overlay {
        &mut self.core
    }
}

/// The outage the writer last saw, cleared by its next success.
#[derive(Default)]
struct Health(Mutex<Option<String>>);

impl Health {
    fn set(&self, reason: &str) {
        *lock(&self.0) = Some(reason.to_string());
    }
    fn clear(&self) {
        lock(&self.0).take();
    }
    fn get(&self) -> Option<String> {
        lock(&self.0).clone()
    }
}

/// Called after a commit with the partitions that have new work (appended or redelivered
/// messages); `None` for "look at every partition".
pub type OnCommit = Arc<dyn Fn(Option<&[u32]>) + Send + Sync>;

/// What is shared between the store and its writer for sharing with other replicas.
struct Shared {
    /// This replica's id in `cg_replicas` and `cg_partitions.owner`: fenced writes name it.
    replica: String,
    /// `server.idempotency_window`: a key older than this is free again.
    window_ms: AtomicU64,
    on_commit: Mutex<Option<OnCommit>>,
}

pub struct PostgresStore {
    pool: Pool,
    /// The feed's own connection, whose statements are planned once (`Plans::Once`): the
    /// feed runs after every commit, and with three replicas planning its statement took
    /// ~95 µs a call, more than running it.
    feed_pool: Pool,
    config: PostgresConfig,
    overlay: Arc<Mutex<PgOverlay>>,
    tx: mpsc::UnboundedSender<Cmd>,
    health: Arc<Health>,
    commits: Arc<Commits>,
    stats: Arc<super::CommitStats>,
    next_id: u64,
    shared: Arc<Shared>,
}

/// Unfinished messages a partition's owner reads, with the position its cursor moves to.
pub struct Feed {
    /// In `seq` order (messages from before migration 5 first, by id); finished ones (by the
    /// overlay's newer word) left out.
    /// With each its partition and its `seq`.
    pub messages: Vec<(u32, i64, StoredMessage)>,
    /// Everything numbered up to here was visible to the read: a partition fully read moves
    /// its cursor here.
    pub head: i64,
    /// The read hit its limit: read again from `last`.
    pub more: bool,
    /// The highest `seq` read, finished messages included.
    pub last: i64,
}

/// Ids in a block each replica start takes from `cg_outbox_id_block`.
const ID_BLOCK_BITS: u32 = 40;

impl PostgresStore {
    /// Connects, applies the schema migrations the database lacks, and starts the writer. Fails
    /// when the database cannot be reached: the gateway cannot resume its outbox without it.
    pub async fn open(config: &PostgresConfig) -> Result<Self, StoreError> {
        let scrub = |e: PgError| storage(config.scrub(e.to_string()));
        let pool = postgres::connect(config).await.map_err(scrub)?;
        postgres::migrate(&pool, MIGRATIONS).await.map_err(scrub)?;
        let client = postgres::get(&pool).await.map_err(scrub)?;
        let row = client
            .query_one("SELECT nextval('cg_outbox_id_block')", &[])
            .await
            .map_err(|e| scrub(PgError::query("taking a block of message ids", &e)))?;
        drop(client);
        let block: i64 = row.try_get(0).map_err(storage)?;
        // 2^23 blocks fit an i64 id; a database past that has had eight million starts.
        let next_id = u64::try_from(block)
            .ok()
            .filter(|b| *b > 0 && *b < (1 << (63 - ID_BLOCK_BITS)))
            .map(|b| b << ID_BLOCK_BITS)
            .ok_or_else(|| storage(format!("message id block {block} out of range")))?;
        let shared = Arc::new(Shared {
            replica: replica_id(),
            window_ms: AtomicU64::new(24 * 3600 * 1000),
            on_commit: Mutex::new(None),
        });
        // The writer's connection is its own: a commit never waits for a reader's. The
        // writer's and the feed's statements are planned once (`planned_once`): planning them
        // for each commit's values cost more than running them.
        let planned_once = || {
            postgres::pool_planned(
                &PostgresConfig {
                    pool_size: 1,
                    ..config.clone()
                },
                postgres::Plans::Once,
            )
            .map_err(scrub)
        };
        let writer_pool = planned_once()?;
        let feed_pool = planned_once()?;
        let overlay = Arc::new(Mutex::new(PgOverlay::default()));
        let health = Arc::new(Health::default());
        let commits = Arc::new(Commits::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(super::CommitStats::default());
        let writer = Writer {
            stats: stats.clone(),
            pool: writer_pool,
            conn: None,
            config: config.clone(),
            overlay: overlay.clone(),
            health: health.clone(),
            commits: commits.clone(),
            shared: shared.clone(),
            retry: Vec::new(),
            retry_at: HashMap::new(),
        };
        tokio::spawn(writer.run(rx));
        Ok(Self {
            pool,
            feed_pool,
            config: config.clone(),
            overlay,
            tx,
            health,
            commits,
            stats,
            next_id,
            shared,
        })
    }

    /// This replica's id, unique per process start: the lease manager must use the same one.
    pub fn replica(&self) -> &str {
        &self.shared.replica
    }

    /// `server.idempotency_window`: past it, a key is free again for a new acceptance.
    pub fn set_idempotency_window(&self, window: Duration) {
        let ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        self.shared.window_ms.store(ms, Ordering::Relaxed);
    }

    /// Told after each commit which partitions have new work.
    pub fn set_on_commit(&self, hook: OnCommit) {
        *lock(&self.shared.on_commit) = Some(hook);
    }

    /// The pool the store reads with, for the lease manager and the notifier to share.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Every unfinished message of `partitions` (a partition just taken), oldest first. The
    /// bodies of those `known` says the caller has (its own Sends) are not decoded: their
    /// messages come back empty.
    pub async fn feed_load(
        &self,
        partitions: &[u32],
        known: &(dyn Fn(u64) -> bool + Sync),
    ) -> Result<Feed, StoreError> {
        let parts: Vec<i16> = partitions.iter().map(|p| *p as i16).collect();
        let c = self.client().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT x.*, h.seq FROM ({HEAD}) h LEFT JOIN LATERAL \
                     (SELECT {FEED_COLUMNS}, m.partition, COALESCE(m.seq, 0) AS seq \
                     FROM outbox_messages m \
                     WHERE m.partition = ANY($1) AND m.state IN ('accepted', 'delivering') \
                     AND COALESCE(m.seq, 0) <= h.seq \
                     ORDER BY m.seq NULLS FIRST, m.id) x ON true \
                     ORDER BY x.seq NULLS FIRST, x.id"
                ),
                &[&parts],
            )
            .await
            .map_err(|e| self.read_error("reading a partition's unfinished messages", &e))?;
        self.feed_rows(&c, &rows, None, known).await
    }

    /// Unfinished messages of `partitions` numbered after `after`, at most `limit`.
    pub async fn feed_after(
        &self,
        after: i64,
        partitions: &[u32],
        limit: usize,
        known: &(dyn Fn(u64) -> bool + Sync),
    ) -> Result<Feed, StoreError> {
        // The partitions as a mask indexed by partition (+ 1, arrays count from 1), not as
        // `partition = ANY(list)`: the planner estimates an `ANY` element by element against the
        // column's statistics, which for 256 partitions took ~120 µs a call, longer than running
        // it; a mask is a filter it does not estimate. The rows come from the `seq` index anyway.
        let mut mask = vec![false; crate::storage::lease::PARTITIONS as usize];
        for p in partitions {
            if let Some(m) = mask.get_mut(*p as usize) {
                *m = true;
            }
        }
        let limit = limit.clamp(1, 100_000) as i64;
        let c = postgres::get(&self.feed_pool)
            .await
            .map_err(|e| storage(self.config.scrub(e.to_string())))?;
        // Planned once (the feed's connection): the only index that gives the cursor's range
        // in order is `outbox_feed`, so the one plan reads the newest rows alone, whatever
        // the table holds (tests/postgres_outbox.rs checks the plans).
        let st = c
            .prepare_cached(&feed_after_sql())
            .await
            .map_err(|e| self.read_error("preparing the feed", &e))?;
        let rows = c
            .query(&st, &[&after, &mask, &limit])
            .await
            .map_err(|e| self.read_error("reading new messages", &e))?;
        self.feed_rows(&c, &rows, Some(limit as usize), known).await
    }

    async fn feed_rows(
        &self,
        c: &postgres::Object,
        rows: &[tokio_postgres::Row],
        limit: Option<usize>,
        known: &(dyn Fn(u64) -> bool + Sync),
    ) -> Result<Feed, StoreError> {
        // The head comes in the same statement as the rows: one snapshot, so every message
        // numbered up to it is among them (or finished).
        let mut head = 0i64;
        let mut last = 0i64;
        let mut messages = Vec::with_capacity(rows.len());
        let mut unknown: Vec<i64> = Vec::new();
        for r in rows {
            head = r
                .try_get::<_, Option<i64>>(12)
                .map_err(storage)?
                .unwrap_or(0);
            // The head's row alone: no message matched.
            let Some(id) = r.try_get::<_, Option<i64>>(0).map_err(storage)? else {
                continue;
            };
            let mut m = decode_row(r, false)?;
            if !known(u64::try_from(id).unwrap_or_default()) {
                unknown.push(id);
            }
            let partition: i16 = r.try_get(10).map_err(storage)?;
            let seq: i64 = r.try_get(11).map_err(storage)?;
            last = last.max(seq);
            // A state change of ours not yet committed is newer than the row. An append's own
            // record is not (`states`, not `state()`, which falls back to the appended body):
            // the row is that append, committed, and may differ from what was queued. A mark
            // at append that its fence refused is stored `accepted`, and the owner must see
            // that, even before the writer has taken the body out of the overlay.
            let ov = lock(&self.overlay);
            if let Some((_, s)) = ov.states.get(&m.id) {
                m.record = s.clone();
            } else if let Some((_, p)) = ov.partials.get(&m.id) {
                p.apply_to(&mut m.record);
            }
            drop(ov);
            if m.record.state.is_terminal() {
                continue;
            }
            messages.push((u32::from(partition.unsigned_abs()), seq, m));
        }
        if !unknown.is_empty() {
            let st = c
                .prepare_cached(FEED_BODIES)
                .await
                .map_err(|e| self.read_error("preparing the feed", &e))?;
            let bodies = c
                .query(&st, &[&unknown])
                .await
                .map_err(|e| self.read_error("reading new messages' bodies", &e))?;
            let mut by_id: HashMap<u64, String> = HashMap::with_capacity(bodies.len());
            for r in &bodies {
                let id: i64 = r.try_get(0).map_err(storage)?;
                by_id.insert(
                    u64::try_from(id).unwrap_or_default(),
                    r.try_get(1).map_err(storage)?,
                );
            }
            for (_, _, m) in &mut messages {
                if let Some(json) = by_id.remove(&m.id) {
                    let b = decode_body(&json)?;
                    m.message = Arc::new(b.message);
                    m.proactive = b.proactive;
                    m.warnings = b.warnings;
                    m.op = b.op;
                }
            }
        }
        Ok(Feed {
            messages,
            head,
            more: limit.is_some_and(|l| rows.len() >= l),
            last,
        })
    }

    fn send(&self, cmd: Cmd) {
        // Fails only once the writer is gone; its exit closed `commits`, so a waiter hears
        // Closed.
        let _ = self.tx.send(cmd);
    }

    fn read_error(&self, context: &'static str, e: &tokio_postgres::Error) -> StoreError {
        storage(self.config.scrub(PgError::query(context, e).to_string()))
    }

    async fn client(&self) -> Result<postgres::Object, StoreError> {
        postgres::get(&self.pool)
            .await
            .map_err(|e| storage(self.config.scrub(e.to_string())))
    }

    async fn read_message(&self, id: u64) -> Result<Option<StoredMessage>, StoreError> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&read_one_sql())
            .await
            .map_err(|e| self.read_error("preparing a read", &e))?;
        let row = c
            .query_opt(&st, &[&db_id(id)])
            .await
            .map_err(|e| self.read_error("reading a message", &e))?;
        row.as_ref().map(decode_message).transpose()
    }

    /// `append` for the partition's owner: a message appended as `delivering` (the head of an
    /// idle conversation, about to go out) keeps that mark only if this replica still holds
    /// `fence` when the insert runs (the same check as a fenced write); otherwise it is stored
    /// as `accepted`, and its owner marks it before sending it, as any message it reads back.
    /// The row's `epoch` then says whose mark it is (see `crate::delivery::shared`).
    pub fn append_fenced(
        &self,
        messages: Vec<StoredMessage>,
        idempotency: Option<(String, IdempotencyRecord)>,
        fence: Option<super::Fence>,
    ) -> Durable {
        self.put_bodies(messages, idempotency, fence)
    }

    /// Queues whole messages (body and state); `fence`: see `append_fenced`.
    fn put_bodies(
        &self,
        messages: Vec<StoredMessage>,
        idempotency: Option<(String, IdempotencyRecord)>,
        fence: Option<super::Fence>,
    ) -> Durable {
        let encoded = match encode_bodies(messages) {
            Ok(e) => e,
            Err(e) => return Durable::settled(Err(e)),
        };
        let idem = match &idempotency {
            Some((key, rec)) => match serde_json::to_string(&rec.message_ids) {
                Ok(ids) => Some(Arc::new(IdemTag {
                    key: escape_text(key).into_owned(),
                    ids,
                })),
                Err(e) => return Durable::settled(Err(storage(e))),
            },
            None => None,
        };
        let mut ov = lock(&self.overlay);
        let mut entries = Vec::with_capacity(encoded.len());
        for (m, json) in encoded {
            ov.partials.remove(&m.id);
            let marked = m.record.state == DeliveryState::Delivering;
            let version = ov.put_body(m.clone());
            entries.push(Entry {
                version,
                id: m.id,
                body: Some(BodyWrite::Encoded(EncodedBody {
                    conversation: m.conversation.clone(),
                    accepted_at_ms: m.accepted_at_ms,
                    json,
                })),
                state: EntryState::Full(m.record.clone()),
                tries: 0,
                fence: fence.filter(|_| marked).map(|f| f.epoch),
                requeue: false,
                idem: idem.clone(),
            });
        }
        let version = match entries.last() {
            Some(e) => e.version,
            None => ov.next_version(),
        };
        self.send(Cmd::Put {
            entries,
            idempotency,
            version,
            waited: true,
        });
        drop(ov);
        Durable::of(&self.commits, version)
    }

    async fn get_message(&self, id: u64) -> Result<Option<StoredMessage>, StoreError> {
        // A state change queued before the read and committed during it leaves the overlay
        // (this store keeps no committed state) while the read's snapshot may predate the
        // commit: then the row is read again, once, after that commit.
        for _ in 0..2 {
            let (body, queued) = {
                let ov = lock(&self.overlay);
                let queued = ov.states.contains_key(&id) || ov.partials.contains_key(&id);
                (ov.bodies.get(&id).map(|(_, m)| m.clone()), queued)
            };
            let mut m = match body {
                Some(m) => Arc::unwrap_or_clone(m),
                None => match self.read_message(id).await? {
                    Some(m) => m,
                    None => return Ok(None),
                },
            };
            // Looked at after the read: a state queued meanwhile is newer than the row.
            let ov = lock(&self.overlay);
            if let Some((_, s)) = ov.states.get(&id) {
                m.record = s.clone();
            } else if let Some((_, p)) = ov.partials.get(&id) {
                p.apply_to(&mut m.record);
            } else if queued {
                continue;
            }
            return Ok(Some(m));
        }
        // Committed during both reads (two changes in a row): the second read began after the
        // first change's commit, so it is as new as what this store had queued then.
        self.read_message(id).await
    }

    async fn pending_messages(&self) -> Result<Vec<StoredMessage>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM {FROM} \
                     WHERE m.state IN ('accepted', 'delivering') ORDER BY m.id"
                ),
                &[],
            )
            .await
            .map_err(|e| self.read_error("reading unfinished messages", &e))?;
        drop(c);
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut m = decode_message(r)?;
            // Called at start, when nothing is queued; a state queued since still wins.
            let ov = lock(&self.overlay);
            if let Some(s) = ov.state(m.id) {
                m.record = s;
            } else if let Some((_, p)) = ov.partials.get(&m.id) {
                p.apply_to(&mut m.record);
            }
            drop(ov);
            out.push(m);
        }
        Ok(out)
    }

    async fn failed_messages(
        &self,
        after_id: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let is_failed =
            |s: DeliveryState| matches!(s, DeliveryState::Failed | DeliveryState::Expired);
        // Failed ones not committed yet are in the overlay; the database has the rest.
        let mut ids: Vec<u64> = {
            let ov = lock(&self.overlay);
            ov.states
                .iter()
                .filter(|(id, (_, s))| **id > after_id && is_failed(s.state))
                .map(|(id, _)| *id)
                .chain(
                    ov.bodies
                        .iter()
                        .filter(|(id, (_, m))| **id > after_id && is_failed(m.record.state))
                        .map(|(id, _)| *id),
                )
                .collect()
        };
        let c = self.client().await?;
        let limit_db = limit.min(i64::MAX as usize) as i64;
        let rows = c
            .query(
                "SELECT id FROM outbox_messages WHERE state IN ('failed', 'expired') \
                 AND id > $1 ORDER BY id LIMIT $2",
                &[&db_id(after_id), &limit_db],
            )
            .await
            .map_err(|e| self.read_error("listing failed messages", &e))?;
        drop(c);
        for r in &rows {
            let id: i64 = r.try_get(0).map_err(storage)?;
            ids.push(u64::try_from(id).unwrap_or_default());
        }
        ids.sort_unstable();
        ids.dedup();
        let mut out = Vec::new();
        for id in ids {
            // The overlay may already say it was redelivered.
            if let Some(m) = self.get_message(id).await?
                && is_failed(m.record.state)
            {
                out.push(m);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    async fn idempotency_read(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT created_at_ms, message_ids FROM outbox_idempotency WHERE key = $1",
            )
            .await
            .map_err(|e| self.read_error("preparing a read", &e))?;
        let key = escape_text(key);
        let Some(r) = c
            .query_opt(&st, &[&key.as_ref()])
            .await
            .map_err(|e| self.read_error("reading an idempotency key", &e))?
        else {
            return Ok(None);
        };
        let created: i64 = r.try_get(0).map_err(storage)?;
        let ids: &str = r.try_get(1).map_err(storage)?;
        Ok(Some(IdempotencyRecord {
            created_at_ms: u64::try_from(created).unwrap_or_default(),
            message_ids: serde_json::from_str(ids).map_err(storage)?,
        }))
    }

    /// Applies a state change to the newest known state and queues it. A message whose state
    /// is not in the overlay (finished, and being redelivered) gets the columns the change sets,
    /// so nothing waits for a read.
    fn put_state(
        &self,
        id: u64,
        change: Change,
        waited: bool,
        fence: Option<super::Fence>,
    ) -> Option<u64> {
        let requeue = matches!(change, Change::Requeued);
        let mut ov = lock(&self.overlay);
        let state = if let Change::Finished(_) = change {
            // A final outcome replaces the whole state (see `Change::Finished`).
            let mut s = StateRecord::new(DeliveryState::Accepted, 0);
            apply_state(&mut s, change);
            EntryState::Full(s)
        } else if let Some(mut s) = ov.state(id) {
            apply_state(&mut s, change);
            EntryState::Full(s)
        } else {
            EntryState::Partial(Partial::of(&change)?)
        };
        let version = ov.next_version();
        match &state {
            EntryState::Full(s) => {
                ov.partials.remove(&id);
                ov.states.insert(id, (version, s.clone()));
            }
            EntryState::Partial(p) => {
                let seen = match ov.partials.remove(&id) {
                    Some((_, q)) => q.then(p),
                    None => p.clone(),
                };
                ov.partials.insert(id, (version, seen));
            }
        }
        self.send(Cmd::Put {
            entries: vec![Entry {
                version,
                id,
                body: None,
                state,
                tries: 0,
                fence: fence.map(|f| f.epoch),
                requeue,
                idem: None,
            }],
            idempotency: None,
            version,
            waited,
        });
        drop(ov);
        Some(version)
    }

    /// Queues a change (a move rewrites the body; a state change goes through `put_state`)
    /// and says when its commit is done. Nobody may be waiting (`waited` false): a failed
    /// commit then keeps the change for the next.
    fn write_change(
        &self,
        id: u64,
        change: Change,
        waited: bool,
        fence: Option<super::Fence>,
    ) -> Durable {
        match change {
            Change::Moved {
                conversation,
                message,
            } => self.put_move(id, conversation, message),
            change => match self.put_state(id, change, waited, fence) {
                Some(version) => Durable::of(&self.commits, version),
                None => Durable::ready(),
            },
        }
    }

    /// A proactive start's message moved to its conversation. With its body in the overlay it
    /// is put whole; else the writer rewrites the stored body with the state as it stands
    /// (readers see the move once it is committed, which the caller waits for).
    fn put_move(
        &self,
        id: u64,
        conversation: String,
        message: Arc<crate::model::Message>,
    ) -> Durable {
        let change = Change::Moved {
            conversation,
            message,
        };
        let in_overlay = {
            let ov = lock(&self.overlay);
            ov.bodies.get(&id).map(|(_, m)| {
                let mut m = StoredMessage::clone(m);
                if let Some((_, s)) = ov.states.get(&id) {
                    m.record = s.clone();
                }
                m
            })
        };
        if let Some(mut m) = in_overlay {
            apply(&mut m, change);
            return self.put_bodies(vec![m], None, None);
        }
        let Change::Moved {
            conversation,
            message,
        } = change
        else {
            return Durable::ready();
        };
        let mut ov = lock(&self.overlay);
        let version = ov.next_version();
        // The writer needs a whole state to write with the body: the overlay's (an unfinished
        // message), or the stored one it reads with the body.
        let state = match ov.state(id) {
            Some(mut s) => {
                s.updated_at_ms = super::now_ms();
                ov.states.insert(id, (version, s.clone()));
                Some(EntryState::Full(s))
            }
            None => None,
        };
        self.send(Cmd::Put {
            entries: vec![Entry {
                version,
                id,
                body: Some(BodyWrite::Moved {
                    conversation,
                    message,
                }),
                state: state.unwrap_or(EntryState::Partial(Partial {
                    state: None,
                    attempts: None,
                    clear_error: false,
                    updated_at_ms: super::now_ms(),
                })),
                tries: 0,
                fence: None,
                requeue: false,
                idem: None,
            }],
            idempotency: None,
            version,
            waited: true,
        });
        drop(ov);
        Durable::of(&self.commits, version)
    }
}

impl Store for PostgresStore {
    fn append(
        &self,
        messages: Vec<StoredMessage>,
        idempotency: Option<(String, IdempotencyRecord)>,
    ) -> Durable {
        self.put_bodies(messages, idempotency, None)
    }

    fn update(&self, id: u64, change: Change) -> Durable {
        self.update_fenced(id, change, None)
    }

    fn update_fenced(&self, id: u64, change: Change, fence: Option<super::Fence>) -> Durable {
        self.write_change(id, change, true, fence)
    }

    fn record(&self, id: u64, change: Change) {
        drop(self.record_fenced(id, change, None));
    }

    fn record_fenced(&self, id: u64, change: Change, fence: Option<super::Fence>) -> Durable {
        self.write_change(id, change, false, fence)
    }

    fn get(&self, id: u64) -> BoxFuture<'_, Result<Option<StoredMessage>, StoreError>> {
        Box::pin(self.get_message(id))
    }

    fn pending(&self) -> BoxFuture<'_, Result<Vec<StoredMessage>, StoreError>> {
        Box::pin(self.pending_messages())
    }

    fn failed(
        &self,
        after_id: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredMessage>, StoreError>> {
        Box::pin(self.failed_messages(after_id, limit))
    }

    fn next_id(&self) -> u64 {
        self.next_id
    }

    fn idempotency_get<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<IdempotencyRecord>, StoreError>> {
        Box::pin(self.idempotency_read(key))
    }

    fn failure(&self) -> Option<String> {
        self.health.get()
    }

    fn transient(&self) -> bool {
        true
    }

    fn commit_stats(&self) -> Option<Arc<super::CommitStats>> {
        Some(self.stats.clone())
    }

    fn compact(&self, cutoff_ms: u64, idem_cutoff_ms: u64) -> BoxFuture<'_, usize> {
        let (done, rx) = tokio::sync::oneshot::channel();
        self.send(Cmd::Compact {
            cutoff_ms,
            idem_cutoff_ms,
            done,
        });
        Box::pin(async move { rx.await.unwrap_or(0) })
    }
}

/// Everything numbered up to here is final for a reader's snapshot: below the oldest
/// transaction still running (`xmin`), every transaction has committed or aborted, and none
/// can start with a smaller id. A partition's owner reads up to it and moves its cursor there.
/// A transaction left open elsewhere on the server holds it back, as it holds back vacuum.
/// The feed's statement (`PostgresStore::feed_after`).
fn feed_after_sql() -> String {
    format!(
        "SELECT x.*, h.seq FROM ({HEAD}) h LEFT JOIN LATERAL \
         (SELECT {FEED_COLUMNS}, m.partition, m.seq FROM outbox_messages m \
         WHERE m.seq > $1 AND m.seq <= h.seq AND ($2::bool[])[m.partition + 1] \
         AND m.state IN ('accepted', 'delivering') ORDER BY m.seq LIMIT $3) x ON true \
         ORDER BY x.seq"
    )
}

/// One whole message by id.
fn read_one_sql() -> String {
    format!("SELECT {COLUMNS} FROM {FROM} WHERE m.id = $1")
}

/// The bodies of other replicas' Sends the feed read.
const FEED_BODIES: &str = "SELECT id, body FROM outbox_bodies WHERE id = ANY($1)";

/// The statements of the connections whose plans are made once (`postgres::Plans::Once`: the
/// feed's and the writer's), by name: a test checks that none of their plans reads a whole
/// outbox table, on an empty database, a small one and a full one.
#[doc(hidden)]
pub fn planned_once() -> Vec<(&'static str, String)> {
    vec![
        ("feed", feed_after_sql()),
        ("feed bodies", FEED_BODIES.into()),
        ("read a message", read_one_sql()),
        ("compact messages", COMPACT_MESSAGES.into()),
        ("compact keys", COMPACT_KEYS.into()),
        ("insert messages", INSERT_MESSAGES.into()),
        ("insert bodies", INSERT_BODIES.into()),
        ("update states", update_states_sql()),
        ("update partial states", update_partial_sql()),
        ("insert keys", INSERT_KEYS.into()),
    ]
}

const HEAD: &str = "SELECT (pg_snapshot_xmin(pg_current_snapshot())::text::int8 << 24) - 1 AS seq";

/// Appended messages (or moved ones, rewritten whole). `seq` is a row's position in commit
/// order: its transaction's id (`xid8`, given in the order transactions first write, so a Send
/// answered before another was made has the smaller one; no lock serialises the replicas'
/// commits), then its place in the transaction (`ord`, below 2^24: a commit carries at most
/// 8,192 commands of at most a batch each; ids up to 2^39 fit, ~550 billion transactions).
/// A message accepted with an idempotency key is stored only if the key's record is its own
/// acceptance: another replica's that committed first leaves this one out.
/// A row appended with a fence (`u.epoch`: marked `delivering` by its partition's owner) keeps
/// its state only while the fence holds, as a fenced update would (`FENCED`); otherwise it is
/// stored `accepted`, with no epoch.
const INSERT_MESSAGES: &str = "INSERT INTO outbox_messages (id, conversation, partition, state, \
     attempts, possible_duplicate, receipts, error, accepted_at_ms, updated_at_ms, seq, epoch) \
     SELECT u.id, u.conversation, u.partition, \
     CASE WHEN u.held THEN u.state ELSE 'accepted' END, u.attempts, u.dup, u.receipts, \
     u.error, u.accepted, u.updated, (pg_current_xact_id()::text::int8 << 24) + u.ord, \
     CASE WHEN u.held THEN u.epoch END \
     FROM (SELECT u.*, (u.epoch IS NULL OR (u.partition, u.epoch) IN (SELECT f.partition, \
     f.epoch FROM cg_partitions f WHERE f.owner = $15 \
     AND f.lease_until > clock_timestamp() + make_interval(secs => $16))) AS held \
     FROM unnest($1::int8[], $2::text[], $3::int2[], $4::text[], $5::int4[], $6::bool[], \
     $7::text[], $8::text[], $9::int8[], $10::int8[], $11::text[], $12::text[], $13::int8[], \
     $14::int8[]) \
     AS u(id, conversation, partition, state, attempts, dup, receipts, error, accepted, updated, \
     key, ids, ord, epoch)) u \
     WHERE u.key IS NULL OR EXISTS (SELECT 1 FROM outbox_idempotency i \
     WHERE i.key = ANY($11::text[]) AND i.key = u.key AND i.message_ids = u.ids) \
     ON CONFLICT (id) DO UPDATE SET conversation = excluded.conversation, \
     partition = excluded.partition, state = excluded.state, attempts = excluded.attempts, \
     possible_duplicate = excluded.possible_duplicate, receipts = excluded.receipts, \
     error = excluded.error, updated_at_ms = excluded.updated_at_ms, epoch = excluded.epoch \
     RETURNING id, partition";

/// Bodies of the messages stored above (a message left out leaves its body out). The stored
/// rows are looked up by `= ANY($1)`: a plan made once (`planned_once`) would otherwise be free
/// to hash the whole table for a semi-join.
const INSERT_BODIES: &str = "INSERT INTO outbox_bodies (id, body) \
     SELECT u.id, u.body FROM unnest($1::int8[], $2::text[]) AS u(id, body) \
     WHERE u.id IN (SELECT m.id FROM outbox_messages m WHERE m.id = ANY($1::int8[])) \
     ON CONFLICT (id) DO UPDATE SET body = excluded.body";

/// A state write is fenced when it carries an epoch (`u.epoch`): it changes the row only while
/// this replica (`$R`) holds the partition at that epoch with its lease running. A redelivered
/// message (`u.bump`) is numbered again, after everything before it.
/// The held partitions are read once per statement (a hashed subplan of at most 256 rows),
/// not once per row. The lease must still run `$M` seconds past the statement's own moment
/// (`clock_timestamp()`, not the transaction's start): the commit follows on the server within
/// milliseconds (it is pipelined), so a write that passes commits before the lease could run out
/// and another replica take the partition and read its rows. Otherwise a mark committed just
/// after the takeover would be missed by the new owner, which would then send the message again
/// without flagging it.
const FENCED: &str = "(u.epoch IS NULL OR (m.partition, u.epoch) IN (SELECT f.partition, f.epoch \
     FROM cg_partitions f WHERE f.owner = $R \
     AND f.lease_until > clock_timestamp() + make_interval(secs => $M)))";
const RENUMBER: &str = "seq = CASE WHEN u.bump IS NULL THEN m.seq \
     ELSE (pg_current_xact_id()::text::int8 << 24) + u.bump END, \
     epoch = COALESCE(u.epoch, m.epoch)";

/// The updates below name their rows twice, `m.id = ANY($1)` beside the join on `u.id`: with
/// the join alone the planner may hash the whole table (a sequential scan per commit, which
/// grows with the outbox: 50 ms for a commit of 443 state changes over 200,000 rows, 3 ms with
/// the index probe the `ANY` gives it).
fn update_states_sql() -> String {
    format!(
        "UPDATE outbox_messages m SET state = u.state, \
         attempts = u.attempts, possible_duplicate = u.dup, receipts = u.receipts, \
         error = u.error, updated_at_ms = u.updated, {} \
         FROM unnest($1::int8[], $2::text[], $3::int4[], $4::bool[], $5::text[], $6::text[], \
         $7::int8[], $8::int8[], $9::int8[]) AS u(id, state, attempts, dup, receipts, error, \
         updated, epoch, bump) WHERE m.id = ANY($1) AND m.id = u.id AND {} \
         RETURNING m.id, m.partition, u.bump",
        RENUMBER,
        FENCED.replace("$R", "$10").replace("$M", "$11"),
    )
}

/// The columns a change sets on a message whose whole state the store did not know.
fn update_partial_sql() -> String {
    format!(
        "UPDATE outbox_messages m SET state = COALESCE(u.state, m.state), \
         attempts = COALESCE(u.attempts, m.attempts), \
         error = CASE WHEN u.clear THEN NULL ELSE m.error END, updated_at_ms = u.updated, {} \
         FROM unnest($1::int8[], $2::text[], $3::int4[], $4::bool[], $5::int8[], $6::int8[], \
         $7::int8[]) AS u(id, state, attempts, clear, updated, epoch, bump) \
         WHERE m.id = ANY($1) AND m.id = u.id AND {} RETURNING m.id, m.partition, u.bump",
        RENUMBER,
        FENCED.replace("$R", "$8").replace("$M", "$9"),
    )
}

/// A key is taken only if free, or older than the window (`$4`): of two replicas racing one
/// key, the second's insert changes nothing, and its messages are left out (above). Returns
/// the keys this commit holds.
const INSERT_KEYS: &str = "INSERT INTO outbox_idempotency (key, created_at_ms, message_ids) \
     SELECT * FROM unnest($1::text[], $2::int8[], $3::text[]) \
     ON CONFLICT (key) DO UPDATE SET created_at_ms = excluded.created_at_ms, \
     message_ids = excluded.message_ids WHERE outbox_idempotency.created_at_ms < $4 \
     OR outbox_idempotency.message_ids = excluded.message_ids \
     RETURNING key, message_ids";

/// The rows to delete are gathered into an array first (`= ANY(ARRAY(…))`): the writer's plans
/// are made once (`planned_once`), and one made for `id IN (subquery)` may walk the whole
/// primary key to join them.
const COMPACT_MESSAGES: &str = "WITH gone AS (DELETE FROM outbox_messages WHERE id = ANY(ARRAY(\
     SELECT id FROM outbox_messages WHERE state = 'delivered' AND updated_at_ms < $1 LIMIT $2)) \
     RETURNING id), \
     bodies AS (DELETE FROM outbox_bodies WHERE id = ANY(ARRAY(SELECT id FROM gone))) \
     SELECT count(*) FROM gone";

const COMPACT_KEYS: &str = "DELETE FROM outbox_idempotency WHERE key = ANY(ARRAY(\
     SELECT key FROM outbox_idempotency WHERE created_at_ms < $1 LIMIT $2))";

type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);

struct Writer {
    stats: Arc<super::CommitStats>,
    /// A pool of one: the writer's own connection, opened again after it broke.
    pool: Pool,
    conn: Option<postgres::Object>,
    config: PostgresConfig,
    overlay: Arc<Mutex<PgOverlay>>,
    health: Arc<Health>,
    commits: Arc<Commits>,
    shared: Arc<Shared>,
    /// State changes nobody waited for, from failed commits: oldest first, one per message
    /// (folded), at most `RETRY_MAX_MESSAGES`.
    retry: Vec<Entry>,
    retry_at: HashMap<u64, usize>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        // However the writer ends, what it had not settled fails as Closed.
        self.commits.close();
    }
}

type QueuedPut = (Vec<Entry>, Option<(String, IdempotencyRecord)>, u64, bool);

/// One message's row write within a commit: its changes folded together.
struct RowWrite<'a> {
    id: u64,
    body: Option<&'a EncodedBody>,
    state: EntryState,
    fence: Option<i64>,
    requeue: bool,
    idem: Option<&'a IdemTag>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        loop {
            let troubled = !self.retry.is_empty() || self.health.get().is_some();
            let wait = if troubled { RETRY_EVERY } else { PROBE_EVERY };
            let first = match tokio::time::timeout(wait, rx.recv()).await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(_) if self.retry.is_empty() => {
                    self.probe().await;
                    continue;
                }
                Err(_) => {
                    self.put(Vec::new()).await;
                    continue;
                }
            };
            // Group commit: everything that queued up during the previous commit goes in the
            // next.
            let mut cmds = vec![first];
            while cmds.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(c) => cmds.push(c),
                    Err(_) => break,
                }
            }
            let mut puts = Vec::with_capacity(cmds.len());
            for cmd in cmds {
                match cmd {
                    Cmd::Put {
                        entries,
                        idempotency,
                        version,
                        waited,
                    } => puts.push((entries, idempotency, version, waited)),
                    Cmd::Compact {
                        cutoff_ms,
                        idem_cutoff_ms,
                        done,
                    } => {
                        // Changes queued before the compaction are committed before it.
                        self.put(std::mem::take(&mut puts)).await;
                        let n = self.compact(cutoff_ms, idem_cutoff_ms, &mut rx).await;
                        let _ = done.send(n);
                    }
                }
            }
            self.put(puts).await;
        }
        // The store is gone: one last try for what nobody waited for.
        if !self.retry.is_empty() {
            self.put(Vec::new()).await;
        }
    }

    /// The writer's connection: the open one, or a new one.
    async fn client(&mut self) -> Result<&postgres::Object, PgError> {
        if self.conn.as_ref().is_some_and(|c| c.is_closed()) {
            // Let go of it first: the writer's pool holds one connection.
            self.discard();
        }
        let conn = match self.conn.take() {
            Some(c) => c,
            None => postgres::get(&self.pool).await?,
        };
        Ok(self.conn.insert(conn))
    }

    /// Closes the connection after an error: whatever state it is in, the next commit starts
    /// on a fresh one.
    fn discard(&mut self) {
        if let Some(c) = self.conn.take() {
            drop(postgres::Object::take(c));
        }
    }

    /// Idle: is the database still there? Readiness follows the answer.
    async fn probe(&mut self) {
        let result = match self.client().await {
            Ok(c) => c
                .batch_execute("SELECT 1")
                .await
                .map_err(|e| PgError::query("checking the database", &e)),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                if self.health.get().is_some() {
                    tracing::info!("PostgreSQL reachable again: the outbox takes writes");
                }
                self.health.clear();
            }
            Err(e) => {
                self.discard();
                let reason = self.config.scrub(e.to_string());
                if self.health.get().is_none() {
                    tracing::error!(error = %reason, "PostgreSQL unreachable: Sends are refused until it is back");
                }
                self.health.set(&reason);
            }
        }
    }

    async fn put(&mut self, puts: Vec<QueuedPut>) {
        let up_to = puts.last().map(|p| p.2);
        if up_to.is_none() && self.retry.is_empty() {
            return;
        }
        self.retry_at.clear();
        let mut entries: Vec<(Entry, bool)> = std::mem::take(&mut self.retry)
            .into_iter()
            .map(|e| (e, false))
            .collect();
        let mut keys = Vec::new();
        // Each keyed put's versions, with its key and ids as stored: refused together if it
        // lost the key.
        let mut keyed: Vec<(u64, u64, (String, String))> = Vec::new();
        for (es, idempotency, version, waited) in puts {
            if let Some(k) = idempotency {
                let first = es.first().map_or(version, |e| e.version);
                let ids = serde_json::to_string(&k.1.message_ids).unwrap_or_default();
                keyed.push((first, version, (escape_text(&k.0).into_owned(), ids)));
                keys.push(k);
            }
            entries.extend(es.into_iter().map(|e| (e, waited)));
        }
        let began = std::time::Instant::now();
        let result = self.commit(&mut entries, &keys).await;
        self.stats
            .record(entries.len() + keys.len(), began.elapsed(), result.is_ok());
        match result {
            Ok(done) => {
                if self.health.get().is_some() {
                    tracing::info!("PostgreSQL reachable again: the outbox takes writes");
                }
                self.health.clear();
                let mut refused: Vec<(u64, u64, StoreError)> = keyed
                    .into_iter()
                    .filter(|(_, _, k)| !done.keys.contains(k))
                    .map(|(a, b, _)| (a, b, StoreError::KeyTaken))
                    .collect();
                for (e, waited) in &entries {
                    if *waited && done.fenced_out.contains(&e.id) && e.fence.is_some() {
                        refused.push((e.version, e.version, StoreError::Fenced));
                    }
                }
                refused.sort_by_key(|r| r.0);
                self.committed(&entries, &refused, &done.fenced_out);
                if !done.fenced_out.is_empty() {
                    tracing::warn!(
                        messages = done.fenced_out.len(),
                        "state writes fenced out: their partition moved to another replica"
                    );
                }
                if let Some(v) = up_to {
                    self.commits.settle_except(v, refused);
                }
                if !done.woken.is_empty() {
                    let hook = lock(&self.shared.on_commit).clone();
                    if let Some(hook) = hook {
                        hook(Some(&done.woken));
                    }
                }
            }
            Err(e) => {
                self.discard();
                let reason = self.config.scrub(e.to_string());
                tracing::error!(
                    error = %reason,
                    changes = entries.len(),
                    "outbox commit failed: its Sends are refused, unwaited changes kept"
                );
                self.health.set(&reason);
                self.failed(entries, e.is_unavailable());
                if let Some(v) = up_to {
                    self.commits.settle(v, &Err(storage(reason)));
                }
            }
        }
    }

    /// The overlay lets go of what is now in the database (as in `sqlite.rs`), before anyone
    /// is told it is durable; and of what the commit refused (a lost key's messages, a fenced
    /// write), which the database does not have.
    fn committed(
        &self,
        entries: &[(Entry, bool)],
        refused: &[(u64, u64, StoreError)],
        fenced_out: &std::collections::HashSet<u64>,
    ) {
        let is_refused = |v: u64| refused.iter().any(|(a, b, _)| *a <= v && v <= *b);
        let mut ov = lock(&self.overlay);
        for (e, _) in entries {
            let (id, version) = (e.id, e.version);
            if fenced_out.contains(&id) || (!refused.is_empty() && is_refused(version)) {
                let newest = ov.bodies.get(&id).is_some_and(|(v, _)| *v <= version)
                    || ov.states.get(&id).is_some_and(|(v, _)| *v <= version)
                    || ov.partials.get(&id).is_some_and(|(v, _)| *v <= version);
                if newest {
                    ov.bodies.remove(&id);
                    ov.states.remove(&id);
                    ov.partials.remove(&id);
                }
                continue;
            }
            ov.committed(id, version, e.body.is_some());
            if ov.partials.get(&id).is_some_and(|(v, _)| *v == version) {
                ov.partials.remove(&id);
            }
            // Unlike SQLite's, a state committed here is not kept for readers: another replica
            // may deliver the message and change it in the database, and this replica would go
            // on reading (and keeping in memory) the state it appended.
            if ov.states.get(&id).is_some_and(|(v, _)| *v == version) {
                ov.states.remove(&id);
            }
        }
    }

    /// After a failed commit: what was waited for is forgotten by the overlay (its waiter hears
    /// the error; the database has what it had), what nobody waited for is kept for the next.
    fn failed(&mut self, entries: Vec<(Entry, bool)>, unavailable: bool) {
        let overlay = self.overlay.clone();
        let mut ov = lock(&overlay);
        let mut dropped = 0usize;
        let mut kept = Vec::new();
        for (mut e, waited) in entries {
            let newest = |ov: &PgOverlay| {
                ov.bodies.get(&e.id).is_some_and(|(v, _)| *v == e.version)
                    || ov.states.get(&e.id).is_some_and(|(v, _)| *v == e.version)
                    || ov.partials.get(&e.id).is_some_and(|(v, _)| *v == e.version)
            };
            let forget = |ov: &mut PgOverlay, id: u64| {
                ov.bodies.remove(&id);
                ov.states.remove(&id);
                ov.partials.remove(&id);
            };
            if waited || e.body.is_some() {
                if newest(&ov) {
                    forget(&mut ov, e.id);
                }
                continue;
            }
            if !unavailable {
                e.tries = e.tries.saturating_add(1);
            }
            if e.tries >= RETRY_MAX_TRIES {
                dropped += 1;
                if newest(&ov) {
                    forget(&mut ov, e.id);
                }
                continue;
            }
            kept.push(e);
        }
        for e in kept {
            self.keep(e);
        }
        if self.retry.len() > RETRY_MAX_MESSAGES {
            let excess = self.retry.len() - RETRY_MAX_MESSAGES;
            for e in self.retry.drain(..excess) {
                dropped += 1;
                let newest = ov.states.get(&e.id).is_some_and(|(v, _)| *v <= e.version)
                    || ov.partials.get(&e.id).is_some_and(|(v, _)| *v <= e.version);
                if newest {
                    ov.states.remove(&e.id);
                    ov.partials.remove(&e.id);
                }
            }
            self.retry_at = self
                .retry
                .iter()
                .enumerate()
                .map(|(i, e)| (e.id, i))
                .collect();
        }
        // What is kept is what readers see, unless something newer is queued.
        for e in &self.retry {
            let newer = ov.bodies.get(&e.id).is_some_and(|(v, _)| *v > e.version)
                || ov.states.get(&e.id).is_some_and(|(v, _)| *v > e.version)
                || ov.partials.get(&e.id).is_some_and(|(v, _)| *v > e.version);
            if newer {
                continue;
            }
            match &e.state {
                EntryState::Full(s) => {
                    ov.partials.remove(&e.id);
                    ov.states.insert(e.id, (e.version, s.clone()));
                }
                EntryState::Partial(p) => {
                    ov.states.remove(&e.id);
                    ov.partials.insert(e.id, (e.version, p.clone()));
                }
            }
        }
        drop(ov);
        if dropped > 0 {
            tracing::error!(
                dropped,
                kept = self.retry.len(),
                "outbox state changes dropped after failed commits: those messages are resent, \
                 flagged, after a restart"
            );
        }
    }

    /// Keeps an unwaited change for the next commit, folded into the message's earlier one.
    fn keep(&mut self, e: Entry) {
        match self.retry_at.get(&e.id) {
            Some(&i) => {
                let old = &mut self.retry[i];
                let before = std::mem::replace(
                    &mut old.state,
                    EntryState::Partial(Partial {
                        state: None,
                        attempts: None,
                        clear_error: false,
                        updated_at_ms: 0,
                    }),
                );
                old.state = before.then(e.state);
                old.version = e.version;
                old.tries = old.tries.max(e.tries);
            }
            None => {
                self.retry_at.insert(e.id, self.retry.len());
                self.retry.push(e);
            }
        }
    }

    /// Reads the stored message a move rewrites, and makes the move a whole body to write.
    async fn resolve_moves(&mut self, entries: &mut [(Entry, bool)]) -> Result<(), PgError> {
        if !entries
            .iter()
            .any(|(e, _)| matches!(e.body, Some(BodyWrite::Moved { .. })))
        {
            return Ok(());
        }
        let client = self.client().await?;
        let st = client
            .prepare_cached(&read_one_sql())
            .await
            .map_err(|e| PgError::query("preparing a read", &e))?;
        for (e, _) in entries.iter_mut() {
            let Some(BodyWrite::Moved {
                conversation,
                message,
            }) = e.body.take()
            else {
                continue;
            };
            let row = client
                .query_opt(&st, &[&db_id(e.id)])
                .await
                .map_err(|err| PgError::query("reading a moved message", &err))?;
            let stored = match row.as_ref().map(decode_message).transpose() {
                Ok(m) => m,
                Err(err) => {
                    tracing::error!(error = %err, message_id = e.id, "a moved message's row cannot be read; the move is not written");
                    None
                }
            };
            // Gone (compacted, or never committed): nothing to move.
            let Some(mut m) = stored else {
                continue;
            };
            apply(
                &mut m,
                Change::Moved {
                    conversation,
                    message,
                },
            );
            let json = match encode_body(&m) {
                Ok(j) => j,
                Err(err) => {
                    tracing::error!(error = %err, message_id = e.id, "a moved message cannot be encoded; the move is not written");
                    continue;
                }
            };
            let full = match std::mem::replace(
                &mut e.state,
                EntryState::Full(StateRecord::new(DeliveryState::Accepted, 0)),
            ) {
                EntryState::Full(s) => s,
                EntryState::Partial(p) => {
                    let mut s = m.record.clone();
                    p.apply_to(&mut s);
                    s
                }
            };
            e.state = EntryState::Full(full);
            e.body = Some(BodyWrite::Encoded(EncodedBody {
                conversation: m.conversation,
                accepted_at_ms: m.accepted_at_ms,
                json,
            }));
        }
        Ok(())
    }

    /// One transaction for the group, its statements pipelined on the writer's connection:
    /// BEGIN, a multi-row statement per kind of write, COMMIT, sent together.
    async fn commit(
        &mut self,
        entries: &mut [(Entry, bool)],
        keys: &[(String, IdempotencyRecord)],
    ) -> Result<Committed, PgError> {
        self.resolve_moves(entries).await?;
        // Fold each message's changes into one row write, in the order they were queued.
        let mut rows: Vec<RowWrite<'_>> = Vec::new();
        let mut at: HashMap<u64, usize> = HashMap::new();
        for (e, _) in entries.iter() {
            let body = match &e.body {
                Some(BodyWrite::Encoded(b)) => Some(b),
                _ => None,
            };
            match at.get(&e.id) {
                Some(&i) => {
                    let row = &mut rows[i];
                    let before = std::mem::replace(
                        &mut row.state,
                        EntryState::Full(StateRecord::new(DeliveryState::Accepted, 0)),
                    );
                    row.state = before.then(e.state.clone());
                    if body.is_some() {
                        row.body = body;
                    }
                    row.fence = e.fence.or(row.fence);
                    row.requeue |= e.requeue;
                    if e.idem.is_some() {
                        row.idem = e.idem.as_deref();
                    }
                }
                None => {
                    at.insert(e.id, rows.len());
                    rows.push(RowWrite {
                        id: e.id,
                        body,
                        state: e.state.clone(),
                        fence: e.fence,
                        requeue: e.requeue,
                        idem: e.idem.as_deref(),
                    });
                }
            }
        }
        // Whole rows (appended or moved), their bodies, whole states, partial states.
        let mut ins = InsertCols::default();
        let mut bodies_id: Vec<i64> = Vec::new();
        let mut bodies_json: Vec<&str> = Vec::new();
        let mut full = StateCols::default();
        let mut part = PartialCols::default();
        // Rows numbered in this commit: appended ones first, then redelivered ones.
        let mut numbered: i64 = 0;
        for r in &rows {
            let id = db_id(r.id);
            match (&r.state, r.body) {
                (EntryState::Full(s), Some(b)) => {
                    bodies_id.push(id);
                    bodies_json.push(&b.json);
                    // Of the key itself, not of its stored form: every replica computes it
                    // from the key. Below 256: fits a SMALLINT.
                    ins.partition
                        .push(crate::storage::lease::partition_of(&b.conversation) as i16);
                    let conversation = escape_text(&b.conversation).into_owned();
                    ins.conversation.push(conversation);
                    ins.id.push(id);
                    ins.state.push(state_word(s.state));
                    ins.attempts.push(s.attempts.min(i32::MAX as u32) as i32);
                    ins.dup.push(s.possible_duplicate);
                    ins.receipts.push(receipts_json(s)?);
                    ins.error.push(error_json(s)?);
                    ins.accepted.push(db_ms(b.accepted_at_ms));
                    ins.updated.push(db_ms(s.updated_at_ms));
                    ins.key.push(r.idem.map(|t| t.key.as_str()));
                    ins.ids.push(r.idem.map(|t| t.ids.as_str()));
                    numbered += 1;
                    ins.ord.push(numbered);
                    ins.epoch.push(r.fence);
                }
                (EntryState::Full(_), None) | (EntryState::Partial(_), _) => {}
            }
        }
        for r in &rows {
            let id = db_id(r.id);
            let bump = if r.requeue && r.body.is_none() {
                numbered += 1;
                Some(numbered)
            } else {
                None
            };
            match (&r.state, r.body) {
                (EntryState::Full(_), Some(_)) => {}
                (EntryState::Full(s), None) => {
                    full.id.push(id);
                    full.state.push(state_word(s.state));
                    full.attempts.push(s.attempts.min(i32::MAX as u32) as i32);
                    full.dup.push(s.possible_duplicate);
                    full.receipts.push(receipts_json(s)?);
                    full.error.push(error_json(s)?);
                    full.updated.push(db_ms(s.updated_at_ms));
                    full.epoch.push(r.fence);
                    full.bump.push(bump);
                }
                // A body never comes with a partial state (a move is resolved whole above).
                (EntryState::Partial(p), _) => {
                    part.id.push(id);
                    part.state.push(p.state.map(state_word));
                    part.attempts
                        .push(p.attempts.map(|a| a.min(i32::MAX as u32) as i32));
                    part.clear.push(p.clear_error);
                    part.updated.push(db_ms(p.updated_at_ms));
                    part.epoch.push(r.fence);
                    part.bump.push(bump);
                }
            }
        }
        let fenced: Vec<u64> = rows
            .iter()
            .filter(|r| r.fence.is_some() && r.body.is_none())
            .map(|r| r.id)
            .collect();
        // One key once per statement (ON CONFLICT cannot touch a row twice): the first wins,
        // as it would across commits.
        let mut key_at: HashMap<&str, usize> = HashMap::new();
        for (i, (k, _)) in keys.iter().enumerate() {
            key_at.entry(k.as_str()).or_insert(i);
        }
        let mut key_names: Vec<String> = Vec::new();
        let mut key_created: Vec<i64> = Vec::new();
        let mut key_ids: Vec<String> = Vec::new();
        for (i, (k, rec)) in keys.iter().enumerate() {
            if key_at.get(k.as_str()) != Some(&i) {
                continue;
            }
            key_names.push(escape_text(k).into_owned());
            key_created.push(db_ms(rec.created_at_ms));
            key_ids.push(
                serde_json::to_string(&rec.message_ids)
                    .map_err(|e| encode_error("encoding an idempotency record", e))?,
            );
        }
        let window = self.shared.window_ms.load(Ordering::Relaxed);
        let key_cutoff = db_ms(super::now_ms().saturating_sub(window));
        let shared = self.shared.clone();
        let replica = shared.replica.as_str();
        // A quarter of the lease, at most a second: a healthy lease always has more left.
        let margin = (self.config.lease.as_secs_f64() / 4.0).min(1.0);

        let client = self.client().await?;
        let prepare = |sql: String| async move {
            client
                .prepare_cached(&sql)
                .await
                .map_err(|e| PgError::query("preparing the outbox's statements", &e))
        };
        let st_ins = prepare(INSERT_MESSAGES.into()).await?;
        let st_bodies = prepare(INSERT_BODIES.into()).await?;
        let st_full = prepare(update_states_sql()).await?;
        let st_part = prepare(update_partial_sql()).await?;
        let st_keys = prepare(INSERT_KEYS.into()).await?;

        let ins_params: Vec<Param<'_>> = vec![
            &ins.id,
            &ins.conversation,
            &ins.partition,
            &ins.state,
            &ins.attempts,
            &ins.dup,
            &ins.receipts,
            &ins.error,
            &ins.accepted,
            &ins.updated,
            &ins.key,
            &ins.ids,
            &ins.ord,
            &ins.epoch,
            &replica,
            &margin,
        ];
        let body_params: Vec<Param<'_>> = vec![&bodies_id, &bodies_json];
        let full_params: Vec<Param<'_>> = vec![
            &full.id,
            &full.state,
            &full.attempts,
            &full.dup,
            &full.receipts,
            &full.error,
            &full.updated,
            &full.epoch,
            &full.bump,
            &replica,
            &margin,
        ];
        let part_params: Vec<Param<'_>> = vec![
            &part.id,
            &part.state,
            &part.attempts,
            &part.clear,
            &part.updated,
            &part.epoch,
            &part.bump,
            &replica,
            &margin,
        ];
        let key_params: Vec<Param<'_>> = vec![&key_names, &key_created, &key_ids, &key_cutoff];

        // Each request goes out when its future is first polled; try_join_all polls them in
        // this order, so the server gets BEGIN, the writes and COMMIT back to back. The head
        // goes first (its lock orders numbering by commit), keys before the messages they
        // admit, messages before their bodies.
        let mut steps: Vec<BoxFuture<'_, Result<Step, tokio_postgres::Error>>> = Vec::new();
        let c: &tokio_postgres::Client = client;
        steps.push(Box::pin(async move {
            c.batch_execute("BEGIN").await.map(|_| Step::Done)
        }));
        if !key_names.is_empty() {
            steps.push(step(c, &st_keys, &key_params, Step::Keys));
        }
        if !ins.id.is_empty() {
            steps.push(step(c, &st_ins, &ins_params, Step::Inserted));
            steps.push(step(c, &st_bodies, &body_params, |_| Step::Done));
        }
        if !full.id.is_empty() {
            steps.push(step(c, &st_full, &full_params, Step::Updated));
        }
        if !part.id.is_empty() {
            steps.push(step(c, &st_part, &part_params, Step::Updated));
        }
        steps.push(Box::pin(async move {
            c.batch_execute("COMMIT").await.map(|_| Step::Done)
        }));
        let done = futures::future::try_join_all(steps)
            .await
            .map_err(|e| PgError::query("committing to the outbox", &e))?;
        let mut out = Committed::default();
        let mut updated = std::collections::HashSet::new();
        for s in done {
            match s {
                Step::Done => {}
                Step::Keys(rows) => {
                    for r in rows {
                        let k: String = r
                            .try_get(0)
                            .map_err(|e| PgError::query("reading keys", &e))?;
                        let ids: String = r
                            .try_get(1)
                            .map_err(|e| PgError::query("reading keys", &e))?;
                        out.keys.insert((k, ids));
                    }
                }
                Step::Inserted(rows) => {
                    for r in rows {
                        let p: i16 = r
                            .try_get(1)
                            .map_err(|e| PgError::query("reading ids", &e))?;
                        out.woken.push(u32::from(p.unsigned_abs()));
                    }
                }
                Step::Updated(rows) => {
                    for r in rows {
                        let id: i64 = r
                            .try_get(0)
                            .map_err(|e| PgError::query("reading ids", &e))?;
                        let p: i16 = r
                            .try_get(1)
                            .map_err(|e| PgError::query("reading ids", &e))?;
                        let bump: Option<i64> = r
                            .try_get(2)
                            .map_err(|e| PgError::query("reading ids", &e))?;
                        updated.insert(u64::try_from(id).unwrap_or_default());
                        if bump.is_some() {
                            out.woken.push(u32::from(p.unsigned_abs()));
                        }
                    }
                }
            }
        }
        out.fenced_out = fenced
            .into_iter()
            .filter(|id| !updated.contains(id))
            .collect();
        out.woken.sort_unstable();
        out.woken.dedup();
        Ok(out)
    }

    /// Drops delivered messages and old idempotency keys a chunk per transaction, committing
    /// what queued up in between so Sends never wait for the whole compaction.
    async fn compact(
        &mut self,
        cutoff_ms: u64,
        idem_cutoff_ms: u64,
        rx: &mut mpsc::UnboundedReceiver<Cmd>,
    ) -> usize {
        let cutoff = db_ms(cutoff_ms);
        let idem_cutoff = db_ms(idem_cutoff_ms);
        let mut removed = 0;
        loop {
            match self.compact_chunk(cutoff, idem_cutoff).await {
                Ok((messages, keys)) => {
                    removed += messages;
                    if messages < COMPACT_CHUNK as usize && keys < COMPACT_CHUNK as usize {
                        return removed;
                    }
                }
                Err(e) => {
                    self.discard();
                    // Nothing is lost by a failed compaction: it is tried again next time.
                    let reason = self.config.scrub(e.to_string());
                    tracing::warn!(error = %reason, "outbox compaction failed");
                    return removed;
                }
            }
            let mut queued = Vec::new();
            while let Ok(c) = rx.try_recv() {
                match c {
                    Cmd::Put {
                        entries,
                        idempotency,
                        version,
                        waited,
                    } => queued.push((entries, idempotency, version, waited)),
                    Cmd::Compact { done, .. } => {
                        let _ = done.send(0);
                    }
                }
            }
            self.put(queued).await;
        }
    }

    async fn compact_chunk(
        &mut self,
        cutoff: i64,
        idem_cutoff: i64,
    ) -> Result<(usize, usize), PgError> {
        let client = self.client().await?;
        let fail = |e: tokio_postgres::Error| PgError::query("compacting the outbox", &e);
        let messages: i64 = client
            .query_one(COMPACT_MESSAGES, &[&cutoff, &COMPACT_CHUNK])
            .await
            .map_err(fail)?
            .try_get(0)
            .map_err(fail)?;
        let keys = client
            .execute(COMPACT_KEYS, &[&idem_cutoff, &COMPACT_CHUNK])
            .await
            .map_err(fail)?;
        Ok((
            usize::try_from(messages).unwrap_or(0),
            usize::try_from(keys).unwrap_or(0),
        ))
    }
}

/// A replica's id, unique per process start: the host (a pod's name on Kubernetes), the pid,
/// and a random part, so a restarted process never inherits its predecessor's leases.
fn replica_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(64)
        .collect();
    let host = if host.is_empty() {
        "gateway".into()
    } else {
        host
    };
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// One pipelined statement: its request goes out when the future is first polled.
fn step<'a>(
    client: &'a tokio_postgres::Client,
    st: &'a tokio_postgres::Statement,
    params: &'a [Param<'a>],
    kind: fn(Vec<tokio_postgres::Row>) -> Step,
) -> BoxFuture<'a, Result<Step, tokio_postgres::Error>> {
    Box::pin(async move { client.query(st, params).await.map(kind) })
}

/// What a pipelined statement returned that the commit needs.
enum Step {
    Done,
    Keys(Vec<tokio_postgres::Row>),
    Inserted(Vec<tokio_postgres::Row>),
    Updated(Vec<tokio_postgres::Row>),
}

/// What a commit decided beyond "it is durable".
#[derive(Default)]
struct Committed {
    /// The keys (as stored) this commit holds, with the acceptance (its ids) holding each: a
    /// put whose key and ids are not here lost the key.
    keys: std::collections::HashSet<(String, String)>,
    /// Fenced state writes that changed nothing: the partition moved on.
    fenced_out: std::collections::HashSet<u64>,
    /// Partitions with new work.
    woken: Vec<u32>,
}

fn encode_error(context: &'static str, e: serde_json::Error) -> PgError {
    PgError::Query {
        context,
        code: None,
        reason: e.to_string(),
    }
}

fn receipts_json(s: &StateRecord) -> Result<Option<String>, PgError> {
    if s.receipts.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(&s.receipts)
        .map(Some)
        .map_err(|e| encode_error("encoding receipts", e))
}

fn error_json(s: &StateRecord) -> Result<Option<String>, PgError> {
    match &s.error {
        Some(e) => serde_json::to_string(e)
            .map(Some)
            .map_err(|e| encode_error("encoding an error", e)),
        None => Ok(None),
    }
}

#[derive(Default)]
struct InsertCols<'a> {
    /// The fence of an owner's `delivering` mark at append.
    epoch: Vec<Option<i64>>,
    key: Vec<Option<&'a str>>,
    ids: Vec<Option<&'a str>>,
    ord: Vec<i64>,
    id: Vec<i64>,
    conversation: Vec<String>,
    partition: Vec<i16>,
    state: Vec<&'a str>,
    attempts: Vec<i32>,
    dup: Vec<bool>,
    receipts: Vec<Option<String>>,
    error: Vec<Option<String>>,
    accepted: Vec<i64>,
    updated: Vec<i64>,
}

#[derive(Default)]
struct StateCols<'a> {
    epoch: Vec<Option<i64>>,
    bump: Vec<Option<i64>>,
    id: Vec<i64>,
    state: Vec<&'a str>,
    attempts: Vec<i32>,
    dup: Vec<bool>,
    receipts: Vec<Option<String>>,
    error: Vec<Option<String>>,
    updated: Vec<i64>,
}

#[derive(Default)]
struct PartialCols<'a> {
    epoch: Vec<Option<i64>>,
    bump: Vec<Option<i64>>,
    id: Vec<i64>,
    state: Vec<Option<&'a str>>,
    attempts: Vec<Option<i32>>,
    clear: Vec<bool>,
    updated: Vec<i64>,
}
