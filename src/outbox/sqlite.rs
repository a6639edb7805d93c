//! The durable outbox in SQLite: `data_dir/outbox.sqlite3`, the default backend.
//!
//! Owns that file (and its `-wal` and `-shm` companions), the lock file `data_dir/outbox.lock`
//! that keeps a second gateway off the directory, one writer thread and a few reader
//! connections. Every change goes through the writer's queue; the writer takes whatever queued
//! up and commits it in one transaction (group commit: one WAL append and one fsync for all of
//! it, `synchronous = FULL`), then settles the versions it committed in `Commits`, which is
//! what each `Durable` waits on. Knows nothing of ordering, gRPC or channels.
//!
//! What readers must see before the writer committed it (a body just appended, the newest
//! state of a message) is kept in an overlay in memory, as the log this replaces did; the
//! overlay holds only messages not yet committed and the state of unfinished ones, so memory
//! no longer grows with `outbox.retention`: the index lives on disk.
//!
//! A message's state has columns of its own (state, attempts, receipts, error, ...) in
//! `outbox_messages`, so an operator can look into the outbox with the `sqlite3` shell; its
//! body (the message's JSON) lies in `outbox_bodies`, so a state change rewrites a small row,
//! never the body. Within one commit, the changes of one message are
//! folded into one row write: under load a message accepted, marked delivering and delivered
//! within one group commit costs one INSERT.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

use futures::future::BoxFuture;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};

use super::codec::{decode_body, encode_bodies, lock, record_from, state_word, storage};
use super::overlay::Overlay;
use super::{
    Change, Commits, DeliveryState, Durable, IdempotencyRecord, StateRecord, Store, StoreError,
    StoredMessage, apply, apply_state,
};

/// The file's schema version (`PRAGMA user_version`). A file from a newer gateway is refused
/// rather than misread.
const SCHEMA_VERSION: i64 = 1;

/// States are stored as the words the API uses, so `sqlite3` shows them as they are.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS outbox_messages (
    id INTEGER PRIMARY KEY,
    conversation TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    possible_duplicate INTEGER NOT NULL,
    receipts TEXT,
    error TEXT,
    accepted_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_bodies (
    id INTEGER PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_unfinished ON outbox_messages (id)
    WHERE state IN ('accepted', 'delivering');
CREATE INDEX IF NOT EXISTS outbox_failed ON outbox_messages (id)
    WHERE state IN ('failed', 'expired');
CREATE INDEX IF NOT EXISTS outbox_delivered_at ON outbox_messages (updated_at_ms)
    WHERE state = 'delivered';
CREATE TABLE IF NOT EXISTS outbox_idempotency (
    key TEXT PRIMARY KEY,
    created_at_ms INTEGER NOT NULL,
    message_ids TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outbox_idempotency_created ON outbox_idempotency (created_at_ms);
CREATE TABLE IF NOT EXISTS outbox_meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
";

/// A whole message: its state row and its body.
const COLUMNS: &str = "m.id, m.conversation, m.state, m.attempts, m.possible_duplicate, \
                       m.receipts, m.error, m.accepted_at_ms, m.updated_at_ms, b.body";
const FROM: &str = "outbox_messages m JOIN outbox_bodies b ON b.id = m.id";

/// Rows deleted per transaction when compacting, so queued Sends wait for one chunk at most
/// (measured: ~5 ms for 5,000 rows on this VM), not for a whole hour of retention.
const COMPACT_CHUNK: usize = 5000;
/// Commands taken into one commit at most.
const MAX_BATCH: usize = 8192;
/// Reader connections kept open between reads.
const READERS_KEPT: usize = 4;

/// A row as read, before it is decoded (decoding happens outside the reader's lock).
struct RawRow {
    id: i64,
    conversation: String,
    state: String,
    attempts: i64,
    possible_duplicate: bool,
    receipts: Option<String>,
    error: Option<String>,
    accepted_at_ms: i64,
    updated_at_ms: i64,
    body: String,
}

impl RawRow {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: r.get(0)?,
            conversation: r.get(1)?,
            state: r.get(2)?,
            attempts: r.get(3)?,
            possible_duplicate: r.get(4)?,
            receipts: r.get(5)?,
            error: r.get(6)?,
            accepted_at_ms: r.get(7)?,
            updated_at_ms: r.get(8)?,
            body: r.get(9)?,
        })
    }

    fn decode(self) -> Result<StoredMessage, StoreError> {
        let record = record_from(
            &self.state,
            self.attempts,
            self.possible_duplicate,
            self.receipts.as_deref(),
            self.error.as_deref(),
            self.updated_at_ms,
        )?;
        let b = decode_body(&self.body)?;
        Ok(StoredMessage {
            id: self.id as u64,
            conversation: self.conversation,
            message: Arc::new(b.message),
            proactive: b.proactive,
            accepted_at_ms: u64::try_from(self.accepted_at_ms).unwrap_or_default(),
            record,
            warnings: b.warnings,
            op: b.op,
        })
    }
}

/// A message's body as the writer stores it: encoded by the caller, on its own core.
struct EncodedBody {
    conversation: String,
    accepted_at_ms: u64,
    json: String,
}

/// One change for the writer: a whole message (appended, or moved by a proactive start) or a
/// new state; in both cases the state as it now stands.
struct Entry {
    version: u64,
    id: u64,
    body: Option<EncodedBody>,
    state: StateRecord,
}

enum Cmd {
    Put {
        entries: Vec<Entry>,
        idempotency: Option<(String, IdempotencyRecord)>,
        /// The put's last version: settled once its commit is done, waited on or not.
        version: u64,
    },
    Compact {
        cutoff_ms: u64,
        idem_cutoff_ms: u64,
        done: tokio::sync::oneshot::Sender<usize>,
    },
}

pub struct SqliteStore {
    path: std::path::PathBuf,
    overlay: Arc<Mutex<Overlay>>,
    /// Idle reader connections (each read takes one, or opens one).
    readers: Mutex<Vec<Connection>>,
    /// Taken on drop so the writer finishes its queue and lets go of the file.
    tx: Option<mpsc::Sender<Cmd>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Why the writer stopped, once a write failed.
    broken: Arc<OnceLock<String>>,
    commits: Arc<Commits>,
    stats: Arc<super::CommitStats>,
    #[cfg(test)]
    fail_next: Arc<std::sync::atomic::AtomicBool>,
    next_id: u64,
    /// Held for the store's life: a second gateway on the same directory is refused.
    _lock: File,
}

fn open_connection(path: &Path, flags: OpenFlags) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| storage(format!("cannot open {}: {e}", path.display())))?;
    // A reader meeting a checkpoint waits briefly instead of failing the read.
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(storage)?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (or creates) `dir/outbox.sqlite3`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        create_dir_durably(dir)?;
        let lock_path = dir.join("outbox.lock");
        let lock_file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| storage(format!("cannot open {}: {e}", lock_path.display())))?;
        lock_file.try_lock().map_err(|e| {
            storage(format!(
                "{} is in use by another gateway ({e})",
                dir.display()
            ))
        })?;
        let path = dir.join("outbox.sqlite3");
        let conn = open_connection(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let setup = || -> rusqlite::Result<i64> {
            // WAL: readers never block the writer. FULL: a commit is on disk before any Send
            // it holds is answered, which is what OK promises.
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            // After a burst the WAL is cut back to this, rather than kept at its largest.
            conn.pragma_update(None, "journal_size_limit", 64i64 << 20)?;
            // A checkpoint every 32 MiB of WAL rather than SQLite's 4 MiB: a row written as
            // accepted and then delivered reaches the main file once, and the file is synced
            // less often (see bench/PROFILE.md).
            conn.pragma_update(None, "wal_autocheckpoint", 8192)?;
            conn.pragma_query_value(None, "user_version", |r| r.get(0))
        };
        let version = setup().map_err(storage)?;
        if version > SCHEMA_VERSION {
            return Err(storage(format!(
                "outbox schema version {version} is newer than this gateway's \
                 ({SCHEMA_VERSION}): run the newer gateway, or move {} away",
                path.display()
            )));
        }
        conn.execute_batch(SCHEMA).map_err(storage)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(storage)?;
        let max_id: Option<i64> = conn
            .query_row("SELECT MAX(id) FROM outbox_messages", [], |r| r.get(0))
            .map_err(storage)?;
        let floor: Option<i64> = conn
            .query_row(
                "SELECT value FROM outbox_meta WHERE name = 'next_id'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(storage)?;
        // Past every id ever given out, even those compaction dropped since (`next_id` is
        // written with each commit that gives out a new one).
        let next_id = max_id
            .map_or(1, |m| m.saturating_add(1))
            .max(floor.unwrap_or(1))
            .max(1) as u64;
        let overlay = Arc::new(Mutex::new(Overlay::default()));
        let broken = Arc::new(OnceLock::new());
        let commits = Arc::new(Commits::default());
        #[cfg(test)]
        let fail_next = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(super::CommitStats::default());
        let mut w = Writer {
            stats: stats.clone(),
            conn,
            overlay: overlay.clone(),
            broken: broken.clone(),
            commits: commits.clone(),
            #[cfg(test)]
            fail_next: fail_next.clone(),
            next_id_written: next_id,
        };
        let handle = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || w.run(rx))
            .map_err(|e| storage(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            path,
            overlay,
            readers: Mutex::new(Vec::new()),
            tx: Some(tx),
            writer: Some(handle),
            broken,
            commits,
            stats,
            #[cfg(test)]
            fail_next,
            next_id,
            _lock: lock_file,
        })
    }

    /// Queues a command; called under the overlay lock so versions reach the writer in order.
    fn send(&self, cmd: Cmd) {
        // A send only fails once the writer is gone; its exit closes `commits`, so whoever
        // waits on this change then hears Closed.
        if let Some(tx) = &self.tx {
            let _ = tx.send(cmd);
        }
    }

    /// Runs `f` on a reader connection: an idle one, or a new one.
    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = match lock(&self.readers).pop() {
            Some(c) => c,
            None => open_connection(
                &self.path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?,
        };
        let result = f(&conn);
        let mut idle = lock(&self.readers);
        if idle.len() < READERS_KEPT {
            idle.push(conn);
        }
        result
    }

    fn read_message(&self, id: u64) -> Result<Option<StoredMessage>, StoreError> {
        let raw = self.read(|c| {
            c.prepare_cached(&format!("SELECT {COLUMNS} FROM {FROM} WHERE m.id = ?1"))
                .and_then(|mut st| st.query_row([id as i64], RawRow::from_row).optional())
                .map_err(storage)
        })?;
        raw.map(RawRow::decode).transpose()
    }

    fn read_state(&self, id: u64) -> Result<Option<StateRecord>, StoreError> {
        type Cols = (String, i64, bool, Option<String>, Option<String>, i64);
        let cols: Option<Cols> = self.read(|c| {
            c.prepare_cached(
                "SELECT state, attempts, possible_duplicate, receipts, error, updated_at_ms \
                 FROM outbox_messages WHERE id = ?1",
            )
            .and_then(|mut st| {
                st.query_row([id as i64], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })
                .optional()
            })
            .map_err(storage)
        })?;
        cols.map(|(s, a, d, r, e, u)| record_from(&s, a, d, r.as_deref(), e.as_deref(), u))
            .transpose()
    }

    /// Queues whole messages (body and state).
    fn put_bodies(
        &self,
        messages: Vec<StoredMessage>,
        idempotency: Option<(String, IdempotencyRecord)>,
    ) -> Durable {
        let encoded = match encode_bodies(messages) {
            Ok(e) => e,
            Err(e) => return Durable::settled(Err(e)),
        };
        let mut ov = lock(&self.overlay);
        let mut entries = Vec::with_capacity(encoded.len());
        for (m, json) in encoded {
            let version = ov.put_body(m.clone());
            entries.push(Entry {
                version,
                id: m.id,
                body: Some(EncodedBody {
                    conversation: m.conversation.clone(),
                    accepted_at_ms: m.accepted_at_ms,
                    json,
                }),
                state: m.record.clone(),
            });
        }
        // A put of an idempotency key alone still needs a version of its own to wait on.
        let version = match entries.last() {
            Some(e) => e.version,
            None => ov.next_version(),
        };
        self.send(Cmd::Put {
            entries,
            idempotency,
            version,
        });
        drop(ov);
        Durable::of(&self.commits, version)
    }

    /// Applies a state change to the newest known state and queues it. Without `wait`, nobody
    /// is handed a `Durable` for it.
    fn put_state(&self, id: u64, change: Change, wait: bool) -> Option<Durable> {
        let mut ov = lock(&self.overlay);
        let current = if matches!(change, Change::Finished(_)) {
            // A final outcome replaces the whole state (see `Change::Finished`): nothing to read.
            StateRecord::new(DeliveryState::Accepted, 0)
        } else if let Some(s) = ov.state(id) {
            s
        } else {
            // Committed and out of the overlay (a finished message being redelivered): read its
            // state outside the lock. Only this message's own worker changes its state, so
            // nothing newer can arrive meanwhile.
            drop(ov);
            let s = match self.read_state(id) {
                Ok(Some(s)) => s,
                Ok(None) => return wait.then(Durable::ready),
                Err(e) => return not_recorded(id, e, wait),
            };
            ov = lock(&self.overlay);
            ov.state(id).unwrap_or(s)
        };
        let mut state = current;
        apply_state(&mut state, change);
        let version = ov.put_state(id, state.clone());
        self.send(Cmd::Put {
            entries: vec![Entry {
                version,
                id,
                body: None,
                state,
            }],
            idempotency: None,
            version,
        });
        drop(ov);
        wait.then(|| Durable::of(&self.commits, version))
    }

    /// Makes the next commit fail as a full disk would.
    #[cfg(test)]
    pub(crate) fn fail_next_write(&self) {
        self.fail_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Breaks the store the way a full disk does: a write fails, and with it every later one.
    #[cfg(test)]
    pub(crate) async fn break_with_a_failed_write(&self) {
        self.fail_next_write();
        let now = super::now_ms();
        let message = StoredMessage {
            id: 1,
            conversation: "c".into(),
            message: Default::default(),
            proactive: None,
            accepted_at_ms: now,
            record: StateRecord::new(DeliveryState::Accepted, now),
            warnings: vec![],
            op: None,
        };
        assert!(self.append(vec![message], None).await.is_err());
    }
}

/// A state change that could not be queued: the waiter hears why; with no waiter, the log does.
fn not_recorded(id: u64, e: StoreError, wait: bool) -> Option<Durable> {
    if wait {
        return Some(Durable::settled(Err(e)));
    }
    tracing::error!(error = %e, message_id = id, "outbox state change not recorded");
    None
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

/// Reads, answered on the calling thread: a local SQLite read takes microseconds, less than a
/// hand-over to a blocking thread would.
impl SqliteStore {
    fn get_now(&self, id: u64) -> Result<Option<StoredMessage>, StoreError> {
        let (body, state) = {
            let ov = lock(&self.overlay);
            (
                ov.bodies.get(&id).map(|(_, m)| m.clone()),
                ov.states.get(&id).map(|(_, s)| s.clone()),
            )
        };
        let mut m = match body {
            Some(m) => Arc::unwrap_or_clone(m),
            None => match self.read_message(id)? {
                Some(m) => m,
                None => return Ok(None),
            },
        };
        if let Some(s) = state {
            m.record = s;
        }
        Ok(Some(m))
    }

    fn pending_now(&self) -> Result<Vec<StoredMessage>, StoreError> {
        let rows = self.read(|c| {
            let mut st = c
                .prepare(&format!(
                    "SELECT {COLUMNS} FROM {FROM} \
                     WHERE m.state IN ('accepted', 'delivering') ORDER BY m.id"
                ))
                .map_err(storage)?;
            let rows = st.query_map([], RawRow::from_row).map_err(storage)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(storage)
        })?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let mut m = r.decode()?;
            // Called at start, when nothing is queued; a state queued since still wins.
            if let Some(s) = lock(&self.overlay).state(m.id) {
                m.record = s;
            }
            out.push(m);
        }
        Ok(out)
    }

    fn failed_now(&self, after_id: u64, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        let is_failed =
            |s: DeliveryState| matches!(s, DeliveryState::Failed | DeliveryState::Expired);
        // Failed ones not committed yet are in the overlay; the file has the rest.
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
        let read = self.read(|c| {
            let mut st = c
                .prepare_cached(
                    "SELECT id FROM outbox_messages WHERE state IN ('failed', 'expired') \
                     AND id > ?1 ORDER BY id LIMIT ?2",
                )
                .map_err(storage)?;
            let rows = st
                .query_map(
                    params![after_id.min(i64::MAX as u64) as i64, limit as i64],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(storage)?;
            rows.map(|r| r.map(|id| id as u64))
                .collect::<Result<Vec<_>, _>>()
                .map_err(storage)
        });
        ids.extend(read?);
        ids.sort_unstable();
        ids.dedup();
        let mut out = Vec::new();
        for id in ids {
            // The overlay may already say it was redelivered.
            if let Some(m) = self.get_now(id)?
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

    fn idempotency_now(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        let read = self.read(|c| {
            c.prepare_cached(
                "SELECT created_at_ms, message_ids FROM outbox_idempotency WHERE key = ?1",
            )
            .and_then(|mut st| {
                st.query_row([key], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
                    .optional()
            })
            .map_err(storage)
        });
        let decode = |(created, ids): (i64, String)| -> Result<IdempotencyRecord, StoreError> {
            Ok(IdempotencyRecord {
                created_at_ms: u64::try_from(created).unwrap_or_default(),
                message_ids: serde_json::from_str(&ids).map_err(storage)?,
            })
        };
        read.and_then(|row| row.map(decode).transpose())
    }
}

impl Store for SqliteStore {
    fn append(
        &self,
        messages: Vec<StoredMessage>,
        idempotency: Option<(String, IdempotencyRecord)>,
    ) -> Durable {
        self.put_bodies(messages, idempotency)
    }

    fn update(&self, id: u64, change: Change) -> Durable {
        if !matches!(change, Change::Moved { .. }) {
            return self
                .put_state(id, change, true)
                .unwrap_or_else(Durable::ready);
        }
        match self.get_now(id) {
            Ok(Some(mut m)) => {
                apply(&mut m, change);
                self.put_bodies(vec![m], None)
            }
            Ok(None) => Durable::ready(),
            Err(e) => Durable::settled(Err(e)),
        }
    }

    fn record(&self, id: u64, change: Change) {
        if matches!(change, Change::Moved { .. }) {
            drop(self.update(id, change));
        } else {
            self.put_state(id, change, false);
        }
    }

    fn get(&self, id: u64) -> BoxFuture<'_, Result<Option<StoredMessage>, StoreError>> {
        Box::pin(std::future::ready(self.get_now(id)))
    }

    fn pending(&self) -> BoxFuture<'_, Result<Vec<StoredMessage>, StoreError>> {
        Box::pin(std::future::ready(self.pending_now()))
    }

    fn failed(
        &self,
        after_id: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredMessage>, StoreError>> {
        Box::pin(std::future::ready(self.failed_now(after_id, limit)))
    }

    fn next_id(&self) -> u64 {
        self.next_id
    }

    fn idempotency_get<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<IdempotencyRecord>, StoreError>> {
        Box::pin(std::future::ready(self.idempotency_now(key)))
    }

    fn failure(&self) -> Option<String> {
        self.broken.get().cloned()
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

/// One row's write within a commit: the changes of one message folded together.
struct RowWrite {
    id: u64,
    body: Option<EncodedBody>,
    state: StateRecord,
}

struct Writer {
    conn: Connection,
    stats: Arc<super::CommitStats>,
    overlay: Arc<Mutex<Overlay>>,
    /// Set by a failed commit: every later change is refused rather than acknowledged, until a
    /// restart reads back what is on disk. Shared with the store, which reports it (readiness).
    broken: Arc<OnceLock<String>>,
    commits: Arc<Commits>,
    #[cfg(test)]
    fail_next: Arc<std::sync::atomic::AtomicBool>,
    /// The `next_id` the file records: ids below it were given out.
    next_id_written: u64,
}

impl Drop for Writer {
    fn drop(&mut self) {
        // However the writer ends (its queue closed, or a panic on its thread), what it had not
        // settled fails as Closed instead of waiting for ever.
        self.commits.close();
    }
}

type QueuedPut = (Vec<Entry>, Option<(String, IdempotencyRecord)>, u64);

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<Cmd>) {
        // Group commit: everything that queued up during the previous commit goes in the next.
        while let Ok(first) = rx.recv() {
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
                    } => puts.push((entries, idempotency, version)),
                    Cmd::Compact {
                        cutoff_ms,
                        idem_cutoff_ms,
                        done,
                    } => {
                        // Changes queued before the compaction are committed before it.
                        self.put(std::mem::take(&mut puts));
                        let n = self.compact(cutoff_ms, idem_cutoff_ms, &rx, &mut puts);
                        let _ = done.send(n);
                    }
                }
            }
            self.put(puts);
        }
    }

    fn put(&mut self, puts: Vec<QueuedPut>) {
        let Some((_, _, up_to)) = puts.last() else {
            return;
        };
        let up_to = *up_to;
        // Fold each message's changes into one row write, in the order they were queued.
        let mut rows: Vec<RowWrite> = Vec::new();
        let mut at: HashMap<u64, usize> = HashMap::new();
        let mut keys = Vec::new();
        let mut committed = Vec::new();
        for (entries, idempotency, _) in puts {
            if let Some(k) = idempotency {
                keys.push(k);
            }
            for e in entries {
                committed.push((e.id, e.version, e.body.is_some()));
                match at.get(&e.id) {
                    Some(&i) => {
                        let row = &mut rows[i];
                        row.state = e.state;
                        if e.body.is_some() {
                            row.body = e.body;
                        }
                    }
                    None => {
                        at.insert(e.id, rows.len());
                        rows.push(RowWrite {
                            id: e.id,
                            body: e.body,
                            state: e.state,
                        });
                    }
                }
            }
        }
        let began = std::time::Instant::now();
        let result = self.commit(&rows, &keys);
        self.stats
            .record(rows.len() + keys.len(), began.elapsed(), result.is_ok());
        if let Err(e) = &result {
            tracing::error!(error = %e, rows = rows.len(), "outbox commit failed");
        }
        // The overlay lets go of what is now in the file before anyone is told it is durable,
        // so a waiter sees the overlay as the commit left it.
        if result.is_ok() {
            let mut ov = lock(&self.overlay);
            for (id, version, body) in committed {
                ov.committed(id, version, body);
            }
        }
        self.commits.settle(up_to, &result);
    }

    fn commit(
        &mut self,
        rows: &[RowWrite],
        keys: &[(String, IdempotencyRecord)],
    ) -> Result<(), StoreError> {
        if let Some(reason) = self.broken.get() {
            return Err(storage(format!(
                "an earlier outbox write failed ({reason}); restart the gateway"
            )));
        }
        #[cfg(test)]
        if self
            .fail_next
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            let reason = "No space left on device (os error 28)".to_string();
            let _ = self.broken.set(reason.clone());
            return Err(storage(reason));
        }
        let max_id = rows.iter().map(|r| r.id).max().unwrap_or(0);
        let next_id = self.next_id_written.max(max_id.saturating_add(1));
        let result = (|| -> Result<(), StoreError> {
            let tx = self.conn.transaction().map_err(storage)?;
            {
                let mut st = Statements {
                    insert: tx.prepare_cached(INSERT_ROW).map_err(storage)?,
                    body: tx.prepare_cached(INSERT_BODY).map_err(storage)?,
                    update: tx.prepare_cached(UPDATE_STATE).map_err(storage)?,
                };
                for r in rows {
                    write_row(&mut st, r)?;
                }
            }
            for (key, rec) in keys {
                let ids = serde_json::to_string(&rec.message_ids).map_err(storage)?;
                tx.prepare_cached(
                    "INSERT INTO outbox_idempotency (key, created_at_ms, message_ids) \
                     VALUES (?1, ?2, ?3) ON CONFLICT (key) DO UPDATE SET \
                     created_at_ms = excluded.created_at_ms, message_ids = excluded.message_ids",
                )
                .and_then(|mut st| st.execute(params![key, rec.created_at_ms as i64, ids]))
                .map_err(storage)?;
            }
            if next_id > self.next_id_written {
                tx.prepare_cached(
                    "INSERT INTO outbox_meta (name, value) VALUES ('next_id', ?1) \
                     ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                )
                .and_then(|mut st| st.execute([next_id as i64]))
                .map_err(storage)?;
            }
            tx.commit().map_err(storage)
        })();
        match &result {
            Ok(()) => self.next_id_written = next_id,
            // What a failed commit left is rolled back by SQLite, but the gateway already
            // told its workers the changes were queued: refuse everything after it so nothing
            // is acknowledged on top of a gap, and let a restart read back the truth.
            Err(e) => {
                let _ = self.broken.set(e.to_string());
            }
        }
        result
    }

    /// Drops delivered messages and old idempotency keys a chunk per transaction, committing
    /// what queued up in between so Sends never wait for the whole compaction.
    fn compact(
        &mut self,
        cutoff_ms: u64,
        idem_cutoff_ms: u64,
        rx: &mpsc::Receiver<Cmd>,
        later: &mut Vec<QueuedPut>,
    ) -> usize {
        let cutoff = cutoff_ms.min(i64::MAX as u64) as i64;
        let idem_cutoff = idem_cutoff_ms.min(i64::MAX as u64) as i64;
        let mut removed = 0;
        if self.broken.get().is_some() {
            return 0;
        }
        loop {
            let chunk = (|| -> rusqlite::Result<(usize, usize)> {
                let tx = self.conn.transaction()?;
                // The chunk's ids, then both halves of each.
                let ids: Vec<i64> = tx
                    .prepare_cached(
                        "SELECT id FROM outbox_messages WHERE state = 'delivered' \
                         AND updated_at_ms < ?1 LIMIT ?2",
                    )?
                    .query_map(params![cutoff, COMPACT_CHUNK as i64], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                let mut messages = 0;
                {
                    let mut bodies =
                        tx.prepare_cached("DELETE FROM outbox_bodies WHERE id = ?1")?;
                    let mut states =
                        tx.prepare_cached("DELETE FROM outbox_messages WHERE id = ?1")?;
                    for id in &ids {
                        bodies.execute([id])?;
                        messages += states.execute([id])?;
                    }
                }
                let keys = tx
                    .prepare_cached(
                        "DELETE FROM outbox_idempotency WHERE key IN (SELECT key FROM \
                         outbox_idempotency WHERE created_at_ms < ?1 LIMIT ?2)",
                    )?
                    .execute(params![idem_cutoff, COMPACT_CHUNK as i64])?;
                tx.commit()?;
                Ok((messages, keys))
            })();
            match chunk {
                Ok((messages, keys)) => {
                    removed += messages;
                    if messages < COMPACT_CHUNK && keys < COMPACT_CHUNK {
                        return removed;
                    }
                }
                Err(e) => {
                    // Nothing is lost by a failed compaction: it is tried again next time.
                    tracing::warn!(error = %storage(e), "outbox compaction failed");
                    return removed;
                }
            }
            // Sends queued meanwhile go in before the next chunk; a compaction queued behind
            // them waits for the next round.
            let mut queued = Vec::new();
            while let Ok(c) = rx.try_recv() {
                match c {
                    Cmd::Put {
                        entries,
                        idempotency,
                        version,
                    } => queued.push((entries, idempotency, version)),
                    Cmd::Compact { done, .. } => {
                        let _ = done.send(0);
                    }
                }
            }
            later.extend(queued);
            self.put(std::mem::take(later));
        }
    }
}

const INSERT_ROW: &str = "INSERT INTO outbox_messages (id, conversation, state, attempts, \
     possible_duplicate, receipts, error, accepted_at_ms, updated_at_ms) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (id) DO UPDATE SET \
     conversation = excluded.conversation, state = excluded.state, \
     attempts = excluded.attempts, possible_duplicate = excluded.possible_duplicate, \
     receipts = excluded.receipts, error = excluded.error, \
     updated_at_ms = excluded.updated_at_ms";

/// Bodies live apart from states: SQLite rewrites a whole row for any change, and a state
/// changes about three times per message while its body never does (bench/PROFILE.md).
const INSERT_BODY: &str = "INSERT INTO outbox_bodies (id, body) VALUES (?1, ?2) \
     ON CONFLICT (id) DO UPDATE SET body = excluded.body";

const UPDATE_STATE: &str = "UPDATE outbox_messages SET state = ?2, attempts = ?3, \
     possible_duplicate = ?4, receipts = ?5, error = ?6, updated_at_ms = ?7 WHERE id = ?1";

/// Writes one row with statements prepared once per commit (looking a cached statement up by
/// its text for every row cost a hash of the text each time).
struct Statements<'a> {
    insert: rusqlite::CachedStatement<'a>,
    body: rusqlite::CachedStatement<'a>,
    update: rusqlite::CachedStatement<'a>,
}

fn write_row(st: &mut Statements<'_>, r: &RowWrite) -> Result<(), StoreError> {
    let s = &r.state;
    let receipts = if s.receipts.is_empty() {
        None
    } else {
        Some(serde_json::to_string(&s.receipts).map_err(storage)?)
    };
    let error = match &s.error {
        Some(e) => Some(serde_json::to_string(e).map_err(storage)?),
        None => None,
    };
    let state = state_word(s.state);
    let updated = s.updated_at_ms.min(i64::MAX as u64) as i64;
    let id = r.id.min(i64::MAX as u64) as i64;
    let n = match &r.body {
        Some(b) => st.body.execute(params![id, b.json]).and_then(|_| {
            st.insert.execute(params![
                id,
                b.conversation,
                state,
                s.attempts,
                s.possible_duplicate,
                receipts,
                error,
                b.accepted_at_ms.min(i64::MAX as u64) as i64,
                updated,
            ])
        }),
        None => st.update.execute(params![
            id,
            state,
            s.attempts,
            s.possible_duplicate,
            receipts,
            error,
            updated
        ]),
    };
    // A state change of a message compaction already dropped updates nothing: fine.
    n.map(drop).map_err(storage)
}

/// Creates `dir` and its missing parents, syncing each new directory's parent so the entry
/// survives a crash.
fn create_dir_durably(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent()
        && !parent.as_os_str().is_empty()
    {
        create_dir_durably(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(storage(format!("cannot create {}: {e}", dir.display()))),
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(|e| storage(format!("cannot sync {}: {e}", parent.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::{ChannelError, NativeReceipt};
    use crate::outbox::{Outcome, now_ms};

    fn msg(id: u64) -> StoredMessage {
        StoredMessage {
            id,
            conversation: "c".into(),
            message: Default::default(),
            proactive: None,
            accepted_at_ms: now_ms(),
            record: StateRecord::new(DeliveryState::Accepted, now_ms()),
            warnings: vec![],
            op: None,
        }
    }

    fn finished(state: DeliveryState, attempts: u32) -> Outcome {
        Outcome {
            state,
            receipts: vec![],
            error: None,
            attempts,
            possible_duplicate: false,
        }
    }

    fn open(dir: &Path) -> SqliteStore {
        SqliteStore::open(dir).unwrap()
    }

    /// The file as an operator's `sqlite3` shell sees it.
    fn shell(dir: &Path) -> Connection {
        Connection::open(dir.join("outbox.sqlite3")).unwrap()
    }

    #[tokio::test]
    async fn survives_reopen_and_tracks_states() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            assert_eq!(s.next_id(), 1);
            s.append(
                vec![msg(1), msg(2), msg(3)],
                Some((
                    "k".into(),
                    IdempotencyRecord {
                        created_at_ms: 5,
                        message_ids: vec![1, 2, 3],
                    },
                )),
            )
            .await
            .unwrap();
            s.update(1, Change::Delivering { attempts: 1 })
                .await
                .unwrap();
            let failed = finished(DeliveryState::Failed, 2);
            s.update(2, Change::Finished(failed)).await.unwrap();
        }
        let s = open(dir.path());
        assert_eq!(s.next_id(), 4);
        let pending: Vec<u64> = s.pending_now().unwrap().iter().map(|m| m.id).collect();
        assert_eq!(pending, vec![1, 3]);
        assert_eq!(
            s.get_now(1).unwrap().unwrap().record.state,
            DeliveryState::Delivering
        );
        let failed: Vec<u64> = s.failed_now(0, 10).unwrap().iter().map(|m| m.id).collect();
        assert_eq!(failed, vec![2]);
        assert_eq!(
            s.idempotency_now("k").unwrap().unwrap().message_ids,
            vec![1, 2, 3]
        );
        assert_eq!(s.compact(u64::MAX, 6).await, 0, "nothing delivered yet");
        assert!(
            s.idempotency_now("k").unwrap().is_none(),
            "old key compacted"
        );
    }

    #[tokio::test]
    async fn a_whole_message_reads_back_as_it_was_written() {
        use crate::channels::FailureKind;
        let dir = tempfile::tempdir().unwrap();
        let mut m = msg(7);
        m.conversation = "slack/B1/C0\"quoted\\ é 😀".into();
        m.proactive = Some(Arc::new(crate::model::ProactiveOptions::default()));
        Arc::make_mut(&mut m.message).text = Some("hello \u{1} 😀".into());
        m.warnings = vec![crate::model::Warning::new(
            "text_split",
            "message.text",
            "split in two",
        )];
        let mut out = finished(DeliveryState::Failed, 3);
        out.receipts = vec![NativeReceipt {
            native_id: "1700000000.000100".into(),
            conversation_id: "C0".into(),
        }];
        let mut e = ChannelError::new("slack", FailureKind::Permanent, "not_in_channel \"x\"");
        e.http_status = Some(200);
        e.code = Some("not_in_channel".into());
        out.error = Some(e);
        out.possible_duplicate = true;
        {
            let s = open(dir.path());
            s.append(vec![m.clone()], None).await.unwrap();
            s.update(7, Change::Finished(out.clone())).await.unwrap();
        }
        let s = open(dir.path());
        let back = s.get_now(7).unwrap().unwrap();
        assert_eq!(back.conversation, m.conversation);
        assert_eq!(back.message, m.message);
        assert_eq!(back.proactive, m.proactive);
        assert_eq!(back.warnings, m.warnings);
        assert_eq!(back.accepted_at_ms, m.accepted_at_ms);
        assert_eq!(back.outcome(), out);
        // And the shell sees plain columns.
        let (state, attempts, dup): (String, i64, bool) = shell(dir.path())
            .query_row(
                "SELECT state, attempts, possible_duplicate FROM outbox_messages WHERE id = 7",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((state.as_str(), attempts, dup), ("failed", 3, true));
    }

    #[tokio::test]
    async fn a_recorded_outcome_nobody_waits_for_is_seen_at_once_and_written() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            s.append(vec![msg(1), msg(2)], None).await.unwrap();
            let mut delivered = finished(DeliveryState::Delivered, 1);
            delivered.receipts.push(NativeReceipt {
                native_id: "a1".into(),
                conversation_id: "c".into(),
            });
            s.record(1, Change::Finished(delivered.clone()));
            assert_eq!(
                s.get_now(1).unwrap().unwrap().outcome(),
                delivered,
                "seen before it is on disk"
            );
            s.record(2, Change::Delivering { attempts: 1 });
            assert_eq!(
                s.get_now(2).unwrap().unwrap().record.state,
                DeliveryState::Delivering
            );
            // Dropping the store lets the writer finish what was queued.
        }
        let s = open(dir.path());
        assert_eq!(
            s.get_now(1).unwrap().unwrap().outcome().receipts[0].native_id,
            "a1"
        );
        assert_eq!(
            s.get_now(1).unwrap().unwrap().record.state,
            DeliveryState::Delivered
        );
        assert_eq!(
            s.get_now(2).unwrap().unwrap().record.state,
            DeliveryState::Delivering
        );
        let pending: Vec<u64> = s.pending_now().unwrap().iter().map(|m| m.id).collect();
        assert_eq!(pending, vec![2]);
    }

    #[tokio::test]
    async fn appended_as_delivering_is_pending_and_redelivered_leaves_failed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            let mut head = msg(1);
            head.record.state = DeliveryState::Delivering;
            s.append(vec![head, msg(2)], None).await.unwrap();
            let failed = finished(DeliveryState::Failed, 1);
            s.update(2, Change::Finished(failed)).await.unwrap();
            assert_eq!(s.failed_now(0, 10).unwrap().len(), 1);
            s.update(2, Change::Requeued).await.unwrap();
        }
        let s = open(dir.path());
        let pending: Vec<(u64, DeliveryState)> = s
            .pending_now()
            .unwrap()
            .iter()
            .map(|m| (m.id, m.record.state))
            .collect();
        assert_eq!(
            pending,
            vec![(1, DeliveryState::Delivering), (2, DeliveryState::Accepted)]
        );
        assert!(
            s.failed_now(0, 10).unwrap().is_empty(),
            "requeued left the failed list"
        );
    }

    #[tokio::test]
    async fn failed_pages_in_id_order_and_see_changes_not_yet_committed() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.append((1..=6).map(msg).collect(), None).await.unwrap();
        for id in [2, 3, 5, 6] {
            let f = finished(DeliveryState::Failed, 1);
            s.update(id, Change::Finished(f)).await.unwrap();
        }
        let page = |after, limit| -> Vec<u64> {
            s.failed_now(after, limit)
                .unwrap()
                .iter()
                .map(|m| m.id)
                .collect()
        };
        assert_eq!(page(0, 2), vec![2, 3]);
        assert_eq!(page(3, 2), vec![5, 6]);
        assert_eq!(page(6, 2), Vec::<u64>::new());
        // Redelivered but not necessarily committed: gone from the list at once.
        s.record(3, Change::Requeued);
        assert_eq!(page(0, 10), vec![2, 5, 6]);
    }

    #[tokio::test]
    async fn delivered_messages_are_compacted_after_retention() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.append(vec![msg(1), msg(2)], None).await.unwrap();
        let done = finished(DeliveryState::Delivered, 1);
        s.update(1, Change::Finished(done)).await.unwrap();
        assert_eq!(s.compact(0, 0).await, 0, "not old enough");
        assert_eq!(s.compact(u64::MAX, 0).await, 1);
        assert!(s.get_now(1).unwrap().is_none());
        assert!(s.get_now(2).unwrap().is_some(), "undelivered kept");
    }

    #[tokio::test]
    async fn compaction_goes_a_chunk_at_a_time_and_drops_everything_old() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let n = COMPACT_CHUNK as u64 * 2 + 17;
        let done = finished(DeliveryState::Delivered, 1);
        let mut batch = Vec::new();
        for id in 1..=n {
            let mut m = msg(id);
            m.record.state = DeliveryState::Delivered;
            batch.push(m);
        }
        s.append(batch, None).await.unwrap();
        s.append(vec![msg(n + 1)], None).await.unwrap();
        s.update(n + 1, Change::Finished(done)).await.unwrap();
        assert_eq!(s.compact(u64::MAX, 0).await, n as usize + 1);
        let left: i64 = shell(dir.path())
            .query_row(
                "SELECT (SELECT COUNT(*) FROM outbox_messages) + (SELECT COUNT(*) FROM outbox_bodies)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(left, 0, "states and bodies both gone");
    }

    #[tokio::test]
    async fn ids_are_not_reused_after_the_newest_message_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            s.append(vec![msg(1), msg(2)], None).await.unwrap();
            let done = finished(DeliveryState::Delivered, 1);
            for id in [1, 2] {
                s.update(id, Change::Finished(done.clone())).await.unwrap();
            }
            assert_eq!(s.compact(u64::MAX, 0).await, 2);
        }
        let s = open(dir.path());
        assert_eq!(s.next_id(), 3, "the bound the file recorded survives");
    }

    #[tokio::test]
    async fn a_second_store_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _s = open(dir.path());
        let err = match SqliteStore::open(dir.path()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("opened twice"),
        };
        assert!(err.contains("in use by another gateway"), "{err}");
    }

    #[tokio::test]
    async fn a_file_from_a_newer_gateway_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()));
        shell(dir.path())
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let err = match SqliteStore::open(dir.path()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a newer schema was opened"),
        };
        assert!(err.contains("newer than this gateway"), "{err}");
    }

    #[tokio::test]
    async fn a_corrupt_row_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            s.append(vec![msg(1), msg(2)], None).await.unwrap();
        }
        shell(dir.path())
            .execute_batch(
                "UPDATE outbox_bodies SET body = '{not json' WHERE id = 1;
                 UPDATE outbox_messages SET state = 'sideways' WHERE id = 2;",
            )
            .unwrap();
        let s = open(dir.path());
        assert!(s.get_now(1).is_err(), "a body that is not JSON");
        assert!(s.get_now(2).is_err(), "a state that is not one");
        let err = s.pending_now().unwrap_err().to_string();
        assert!(err.contains("outbox storage"), "{err}");
    }

    #[tokio::test]
    async fn the_mark_before_delivery_needs_no_read_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.append(vec![msg(1)], None).await.unwrap();
        // Were its state read back, it would come from the file, where it is now gone.
        shell(dir.path())
            .execute_batch("DELETE FROM outbox_messages; DELETE FROM outbox_bodies;")
            .unwrap();
        s.update(1, Change::Delivering { attempts: 1 })
            .await
            .unwrap();
        let state = lock(&s.overlay).state(1).unwrap();
        assert_eq!(
            (state.state, state.attempts),
            (DeliveryState::Delivering, 1)
        );
    }

    #[tokio::test]
    async fn the_overlay_keeps_only_unfinished_messages() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.append((1..=100).map(msg).collect(), None).await.unwrap();
        for id in 1..=100 {
            s.update(id, Change::Delivering { attempts: 1 })
                .await
                .unwrap();
            if id > 10 {
                let done = finished(DeliveryState::Delivered, 1);
                s.update(id, Change::Finished(done)).await.unwrap();
            }
        }
        let ov = lock(&s.overlay);
        assert!(
            ov.bodies.is_empty(),
            "committed bodies are read from the file"
        );
        assert_eq!(ov.states.len(), 10, "the ten still delivering");
    }

    #[tokio::test]
    async fn changes_queued_back_to_back_end_in_the_last_state() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        // Queued back to back, they most likely share a commit; either way the row ends in the
        // last state.
        let mut m = msg(1);
        m.record.state = DeliveryState::Delivering;
        let a = s.append(vec![m], None);
        s.record(1, Change::Delivering { attempts: 2 });
        let mut done = finished(DeliveryState::Delivered, 2);
        done.receipts.push(NativeReceipt {
            native_id: "n1".into(),
            conversation_id: "c".into(),
        });
        let last = s.update(1, Change::Finished(done.clone()));
        a.await.unwrap();
        last.await.unwrap();
        drop(s);
        let s = open(dir.path());
        assert_eq!(s.get_now(1).unwrap().unwrap().outcome(), done);
    }

    #[tokio::test]
    async fn a_missing_data_directory_is_created_with_its_parents() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a").join("b");
        {
            let s = open(&nested);
            s.append(vec![msg(1)], None).await.unwrap();
        }
        let s = open(&nested);
        assert_eq!(s.pending_now().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn after_a_failed_write_nothing_more_is_acknowledged_and_the_reason_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            s.append(vec![msg(1)], None).await.unwrap();
            assert!(s.failure().is_none());
            s.fail_next_write();
            let err = s.append(vec![msg(2)], None).await.unwrap_err().to_string();
            assert!(err.contains("No space left"), "{err}");
            // The next write would succeed on its own: it is refused all the same.
            let err = s.append(vec![msg(3)], None).await.unwrap_err().to_string();
            assert!(err.contains("restart the gateway"), "{err}");
            assert!(s.failure().unwrap().contains("No space left"));
        }
        let s = open(dir.path());
        assert!(s.failure().is_none(), "a restart starts afresh");
        let ids: Vec<u64> = s.pending_now().unwrap().iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![1], "only what was acknowledged");
    }

    #[tokio::test]
    async fn a_read_only_file_fails_the_commit_and_breaks_the_store() {
        // A real failure from SQLite rather than the test hook: the database made read-only
        // underneath the writer (as a remount would).
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.append(vec![msg(1)], None).await.unwrap();
        shell(dir.path())
            .execute_batch(
                "CREATE TRIGGER no_writes BEFORE INSERT ON outbox_messages \
                 BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END;",
            )
            .unwrap();
        let err = s.append(vec![msg(2)], None).await.unwrap_err().to_string();
        assert!(err.contains("disk I/O error"), "{err}");
        assert!(s.failure().is_some());
    }
}
