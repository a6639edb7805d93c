//! The inbox's durable half: received events, their per-group deliveries, the dedupe keys and
//! the consumer groups, in SQLite.
//!
//! Owns the file and the one writer thread. Every change goes through the writer's queue; the
//! writer takes whatever queued up and commits it in one transaction (group commit: one WAL append
//! and one fsync for all of it, `synchronous = FULL`), then answers the waiters and hands the
//! committed events, in id order, to the `on_commit` hook, so the in-memory queues see them in the
//! order they were stored whatever order the waiting tasks wake in. Knows nothing of streams,
//! acks or deadlines: the inbox (`inbox.rs`) decides those and only tells this file what to keep.
//!
//! SQLite (rusqlite, bundled) rather than the outbox's own log: step 10 moves the outbox to
//! SQLite too, and the inbox is written there first so it never needs a second format.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use crate::model::Message;

/// Where the answer to an event the channel waits on goes, and until when (Unix ms). Kept in
/// memory only: after a restart the channel has long had its neutral answer.
#[derive(Debug)]
pub struct ReplySlot {
    pub tx: tokio::sync::oneshot::Sender<super::listener::Answering>,
    pub by_ms: u64,
}

/// One event to store: what the sink was given, with its conversation key.
#[derive(Debug)]
pub struct NewEvent {
    pub channel: String,
    pub bot_id: String,
    /// `channel/bot/conversation`: the unit of order.
    pub conversation: Arc<str>,
    /// The channel's id of the event, which its retries repeat.
    pub dedupe_key: String,
    pub received_at_ms: u64,
    /// The message as stored (JSON): encoded once, and all the inbox keeps of it.
    pub body: Vec<u8>,
    /// The message itself, for a bot that takes it as soon as it is stored.
    pub message: Arc<Message>,
    pub reply: Option<ReplySlot>,
}

/// An event as kept: new ones from a commit, or every pending one at open.
#[derive(Debug)]
pub struct StoredEvent {
    pub id: u64,
    pub channel: String,
    pub bot_id: String,
    pub conversation: Arc<str>,
    pub received_at_ms: u64,
    /// The message as stored (JSON). Held instead of the decoded message, so what the inbox
    /// keeps in memory is what `inbound.max_mib` bounds; decoded when it goes to a bot.
    pub body: Bytes,
    /// The decoded message, for new events only: handed to a bot that takes it at once, then
    /// dropped (the inbox holds the body alone).
    pub message: Option<Arc<Message>>,
    /// The groups that have not acked it, with the attempts recorded for each.
    pub groups: Vec<(Arc<str>, u32)>,
    pub reply: Option<ReplySlot>,
}

/// What the writer tells the inbox after a commit, in commit order.
pub enum Committed {
    /// New events (duplicates left out), in id order.
    Events(Vec<StoredEvent>),
    /// A consumer group now exists: every event stored after this gets a delivery for it.
    Group(Arc<str>),
}

pub type OnCommit = Box<dyn FnMut(Committed) + Send>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InboxStoreError {
    #[error("inbox storage: {0}")]
    Storage(String),
    #[error("the inbox is closed")]
    Closed,
}

impl From<rusqlite::Error> for InboxStoreError {
    fn from(e: rusqlite::Error) -> Self {
        InboxStoreError::Storage(crate::bounded::cap(&e.to_string(), 300).into_owned())
    }
}

/// The answer to an append: how many events were new (the rest were channel retries).
pub type AppendResult = Result<usize, InboxStoreError>;

enum Op {
    Append {
        events: Vec<NewEvent>,
        done: oneshot::Sender<AppendResult>,
    },
    Group {
        name: Arc<str>,
        done: oneshot::Sender<Result<(), InboxStoreError>>,
    },
    /// A group is done with an event; `last` when no other group still holds it.
    Ack {
        group: Arc<str>,
        id: u64,
        last: bool,
    },
    /// Attempts made for a group, so a restart flags the redelivery. Nobody waits for it.
    Attempt {
        group: Arc<str>,
        id: u64,
        attempts: u32,
    },
    /// Events kept past the retention, dropped for every group.
    Expire {
        ids: Vec<u64>,
    },
    /// Dedupe keys older than the window go.
    ForgetKeys {
        before_ms: u64,
    },
    /// A consumer group is gone: no event is kept for it any more.
    RemoveGroup {
        name: Arc<str>,
    },
    Shutdown,
}

/// The writer's handle. Dropping every handle stops the writer after what is queued.
pub struct InboxStore {
    tx: mpsc::Sender<Op>,
}

/// What was in the file at open.
pub struct Opened {
    pub store: InboxStore,
    /// Pending events in id order, each with the groups still holding it.
    pub events: Vec<StoredEvent>,
    pub groups: Vec<Arc<str>>,
}

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS inbox_events (
    id INTEGER PRIMARY KEY,
    channel TEXT NOT NULL,
    bot_id TEXT NOT NULL,
    conversation TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS inbox_deliveries (
    grp TEXT NOT NULL,
    event_id INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (event_id, grp)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbox_dedupe (
    channel TEXT NOT NULL,
    key TEXT NOT NULL,
    seen_at_ms INTEGER NOT NULL,
    PRIMARY KEY (channel, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS inbox_dedupe_seen ON inbox_dedupe (seen_at_ms);
CREATE TABLE IF NOT EXISTS inbox_groups (
    name TEXT PRIMARY KEY,
    created_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
";

/// The group every event is kept for when a bot names none.
pub const DEFAULT_GROUP: &str = "default";

impl InboxStore {
    /// Opens (creating) the inbox at `path`, or an in-memory one with `None` (lost on restart,
    /// like the memory outbox). Reads every pending event back.
    pub fn open(path: Option<&Path>, on_commit: OnCommit) -> Result<Opened, InboxStoreError> {
        let conn = match path {
            Some(p) => Connection::open(p)?,
            None => Connection::open_in_memory()?,
        };
        if path.is_some() {
            // WAL: readers never block the writer; FULL: a commit is on disk before it is
            // acknowledged, which is what the 2xx to the channel promises.
            conn.pragma_update(None, "journal_mode", "WAL")?;
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(InboxStoreError::Storage(format!(
                "inbox schema version {version} is newer than this gateway's ({SCHEMA_VERSION}): \
                 run the newer gateway, or move the file away"
            )));
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        conn.execute(
            "INSERT OR IGNORE INTO inbox_groups (name, created_at_ms) VALUES (?1, ?2)",
            params![DEFAULT_GROUP, crate::outbox::now_ms() as i64],
        )?;
        // A crash between a group's last ack and the event's removal leaves an event nobody
        // holds: drop those now.
        conn.execute(
            "DELETE FROM inbox_events WHERE NOT EXISTS \
             (SELECT 1 FROM inbox_deliveries d WHERE d.event_id = inbox_events.id)",
            [],
        )?;
        let groups = load_groups(&conn)?;
        let events = load_events(&conn)?;
        let next_id = conn
            .query_row("SELECT MAX(id) FROM inbox_events", [], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .optional()?
            .flatten()
            .map_or(1, |m| m.saturating_add(1).max(1)) as u64;
        // Ids never go back below a time base: a bot that kept an event id from before a
        // restart that emptied the file cannot ack a new event by mistake.
        let next_id = next_id.max(crate::outbox::now_ms().saturating_mul(1000));
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            conn,
            next_id,
            groups: groups.clone(),
            on_commit,
        };
        std::thread::Builder::new()
            .name("inbox-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| InboxStoreError::Storage(format!("cannot start the inbox writer: {e}")))?;
        Ok(Opened {
            store: InboxStore { tx },
            events,
            groups,
        })
    }

    /// Stores events (a channel retry of a stored event, by channel and dedupe key, is left
    /// out); resolves once they are durable with how many were new.
    pub async fn append(&self, events: Vec<NewEvent>) -> AppendResult {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Op::Append { events, done })
            .map_err(|_| InboxStoreError::Closed)?;
        rx.await.map_err(|_| InboxStoreError::Closed)?
    }

    /// Creates a consumer group (no-op when it exists); resolves once durable.
    pub async fn add_group(&self, name: Arc<str>) -> Result<(), InboxStoreError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Op::Group { name, done })
            .map_err(|_| InboxStoreError::Closed)?;
        rx.await.map_err(|_| InboxStoreError::Closed)?
    }

    /// A group acked an event. Not waited for: an ack lost in a crash means a flagged
    /// redelivery, which at-least-once allows.
    pub fn ack(&self, group: Arc<str>, id: u64, last: bool) {
        let _ = self.tx.send(Op::Ack { group, id, last });
    }

    pub fn attempt(&self, group: Arc<str>, id: u64, attempts: u32) {
        let _ = self.tx.send(Op::Attempt {
            group,
            id,
            attempts,
        });
    }

    pub fn expire(&self, ids: Vec<u64>) {
        if !ids.is_empty() {
            let _ = self.tx.send(Op::Expire { ids });
        }
    }

    /// Removes a group (its events were released one by one already).
    pub fn remove_group(&self, name: Arc<str>) {
        let _ = self.tx.send(Op::RemoveGroup { name });
    }

    pub fn forget_keys(&self, before_ms: u64) {
        let _ = self.tx.send(Op::ForgetKeys { before_ms });
    }

    /// Stops the writer once what is queued is committed.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Op::Shutdown);
    }
}

fn load_groups(conn: &Connection) -> Result<Vec<Arc<str>>, InboxStoreError> {
    let mut st = conn.prepare("SELECT name FROM inbox_groups ORDER BY created_at_ms, name")?;
    let rows = st.query_map([], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for r in rows {
        out.push(Arc::from(r?));
    }
    Ok(out)
}

fn load_events(conn: &Connection) -> Result<Vec<StoredEvent>, InboxStoreError> {
    let mut st = conn.prepare(
        "SELECT e.id, e.channel, e.bot_id, e.conversation, e.received_at_ms, e.body, d.grp, d.attempts \
         FROM inbox_events e JOIN inbox_deliveries d ON d.event_id = e.id ORDER BY e.id, d.grp",
    )?;
    let mut rows = st.query([])?;
    let mut out: Vec<StoredEvent> = Vec::new();
    while let Some(r) = rows.next()? {
        let id = r.get::<_, i64>(0)? as u64;
        let grp: String = r.get(6)?;
        let attempts = r.get::<_, i64>(7)?.clamp(0, u32::MAX as i64) as u32;
        if let Some(last) = out.last_mut().filter(|e| e.id == id) {
            last.groups.push((Arc::from(grp), attempts));
            continue;
        }
        let body: Vec<u8> = r.get(5)?;
        match serde_json::from_slice::<Message>(&body) {
            Ok(_) => {}
            Err(e) => {
                // Written by this gateway, so unreadable means a damaged file: keep going with
                // the rest rather than refuse to start, and say which event was lost.
                tracing::error!(event_id = id, error = %e, "inbox event unreadable; skipped");
                continue;
            }
        }
        out.push(StoredEvent {
            id,
            channel: r.get(1)?,
            bot_id: r.get(2)?,
            conversation: Arc::from(r.get::<_, String>(3)?),
            received_at_ms: r.get::<_, i64>(4)?.max(0) as u64,
            body: Bytes::from(body),
            message: None,
            groups: vec![(Arc::from(grp), attempts)],
            reply: None,
        });
    }
    Ok(out)
}

struct Writer {
    conn: Connection,
    next_id: u64,
    groups: Vec<Arc<str>>,
    on_commit: OnCommit,
}

/// Most operations committed in one transaction: a burst is cut into commits of this size so
/// a waiter never waits behind an unbounded one.
const MAX_OPS_PER_COMMIT: usize = 4096;

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Op>) {
        while let Ok(first) = rx.recv() {
            let mut ops = vec![first];
            while ops.len() < MAX_OPS_PER_COMMIT {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            let stop = ops.iter().any(|o| matches!(o, Op::Shutdown));
            self.commit(ops);
            if stop {
                break;
            }
        }
    }

    fn commit(&mut self, ops: Vec<Op>) {
        let mut answers: Vec<(oneshot::Sender<AppendResult>, usize)> = Vec::new();
        let mut group_answers = Vec::new();
        let mut committed: Vec<Committed> = Vec::new();
        let next_before = self.next_id;
        let groups_before = self.groups.len();
        let result = (|| -> Result<(), InboxStoreError> {
            let tx = self.conn.transaction()?;
            for op in ops {
                match op {
                    Op::Append { events, done } => {
                        let mut fresh = Vec::new();
                        let now = crate::outbox::now_ms() as i64;
                        for e in events {
                            let new = tx
                                .prepare_cached(
                                    "INSERT OR IGNORE INTO inbox_dedupe (channel, key, seen_at_ms) \
                                     VALUES (?1, ?2, ?3)",
                                )?
                                .execute(params![e.channel, e.dedupe_key, now])?;
                            if new == 0 {
                                continue;
                            }
                            let id = self.next_id;
                            self.next_id = self.next_id.saturating_add(1);
                            tx.prepare_cached(
                                "INSERT INTO inbox_events (id, channel, bot_id, conversation, received_at_ms, body) \
                                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                            )?
                            .execute(params![
                                id as i64,
                                e.channel,
                                e.bot_id,
                                &*e.conversation,
                                e.received_at_ms as i64,
                                e.body
                            ])?;
                            for g in &self.groups {
                                tx.prepare_cached(
                                    "INSERT INTO inbox_deliveries (grp, event_id) VALUES (?1, ?2)",
                                )?
                                .execute(params![&**g, id as i64])?;
                            }
                            fresh.push(StoredEvent {
                                id,
                                channel: e.channel,
                                bot_id: e.bot_id,
                                conversation: e.conversation,
                                received_at_ms: e.received_at_ms,
                                body: Bytes::from(e.body),
                                message: Some(e.message),
                                groups: self.groups.iter().map(|g| (g.clone(), 0)).collect(),
                                reply: e.reply,
                            });
                        }
                        answers.push((done, fresh.len()));
                        if !fresh.is_empty() {
                            committed.push(Committed::Events(fresh));
                        }
                    }
                    Op::Group { name, done } => {
                        if !self.groups.contains(&name) {
                            tx.prepare_cached(
                                "INSERT OR IGNORE INTO inbox_groups (name, created_at_ms) VALUES (?1, ?2)",
                            )?
                            .execute(params![&*name, crate::outbox::now_ms() as i64])?;
                            self.groups.push(name.clone());
                            committed.push(Committed::Group(name));
                        }
                        group_answers.push(done);
                    }
                    Op::Ack { group, id, last } => {
                        tx.prepare_cached(
                            "DELETE FROM inbox_deliveries WHERE event_id = ?1 AND grp = ?2",
                        )?
                        .execute(params![id as i64, &*group])?;
                        if last {
                            tx.prepare_cached("DELETE FROM inbox_events WHERE id = ?1")?
                                .execute(params![id as i64])?;
                        }
                    }
                    Op::Attempt {
                        group,
                        id,
                        attempts,
                    } => {
                        tx.prepare_cached(
                            "UPDATE inbox_deliveries SET attempts = ?3 WHERE event_id = ?1 AND grp = ?2",
                        )?
                        .execute(params![id as i64, &*group, attempts as i64])?;
                    }
                    Op::Expire { ids } => {
                        for id in ids {
                            tx.prepare_cached("DELETE FROM inbox_deliveries WHERE event_id = ?1")?
                                .execute(params![id as i64])?;
                            tx.prepare_cached("DELETE FROM inbox_events WHERE id = ?1")?
                                .execute(params![id as i64])?;
                        }
                    }
                    Op::ForgetKeys { before_ms } => {
                        tx.prepare_cached("DELETE FROM inbox_dedupe WHERE seen_at_ms < ?1")?
                            .execute(params![before_ms.min(i64::MAX as u64) as i64])?;
                    }
                    Op::RemoveGroup { name } => {
                        tx.prepare_cached("DELETE FROM inbox_groups WHERE name = ?1")?
                            .execute(params![&*name])?;
                        tx.prepare_cached("DELETE FROM inbox_deliveries WHERE grp = ?1")?
                            .execute(params![&*name])?;
                        tx.prepare_cached(
                            "DELETE FROM inbox_events WHERE NOT EXISTS \
                             (SELECT 1 FROM inbox_deliveries d WHERE d.event_id = inbox_events.id)",
                        )?
                        .execute([])?;
                        self.groups.retain(|g| *g != name);
                    }
                    Op::Shutdown => {}
                }
            }
            tx.commit()?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                for c in committed {
                    (self.on_commit)(c);
                }
                for (done, n) in answers {
                    let _ = done.send(Ok(n));
                }
                for done in group_answers {
                    let _ = done.send(Ok(()));
                }
            }
            Err(e) => {
                // Rolled back: nothing of this batch is stored, so every waiter hears so and the
                // channel retries (it got no 2xx). Ids and groups go back to what is on disk.
                tracing::error!(error = %e, "inbox commit failed");
                self.next_id = next_before;
                self.groups.truncate(groups_before);
                for (done, _) in answers {
                    let _ = done.send(Err(e.clone()));
                }
                for done in group_answers {
                    let _ = done.send(Err(e.clone()));
                }
            }
        }
    }
}
