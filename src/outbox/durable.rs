//! The durable outbox on redb (pure Rust, ACID, crash-safe file format).
//!
//! One writer thread commits everything: it takes every command waiting in its queue and applies
//! them in one transaction with an immediate (fsync'd) commit, so concurrent appends share one
//! durable write (group commit). Readers use MVCC snapshots plus an overlay of changes not yet
//! committed, so a status read never goes back in time.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::{
    Change, DeliveryState, Durable, IdempotencyRecord, Store, StoreError, StoredMessage, apply,
};

/// What does not change after acceptance (or a proactive move): the message itself.
const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");
/// What changes on every attempt: small, so state updates do not rewrite the message.
const STATES: TableDefinition<u64, &[u8]> = TableDefinition::new("states");
/// Ids of messages not finished.
const PENDING: TableDefinition<u64, u8> = TableDefinition::new("pending");
/// Ids of failed or expired messages (kept until redelivered).
const FAILED: TableDefinition<u64, u8> = TableDefinition::new("failed");
/// (finished at ms, id) of delivered messages, for compaction by age.
const DELIVERED: TableDefinition<(u64, u64), u8> = TableDefinition::new("delivered");
const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

type Ack = oneshot::Sender<Result<(), StoreError>>;

#[derive(serde::Serialize)]
struct BodyRef<'a> {
    conversation: &'a str,
    message: &'a crate::model::Message,
    proactive: &'a Option<crate::model::ProactiveOptions>,
    accepted_at_ms: u64,
    warnings: &'a [crate::model::Warning],
}

#[derive(serde::Deserialize)]
struct Body {
    conversation: String,
    message: crate::model::Message,
    proactive: Option<crate::model::ProactiveOptions>,
    accepted_at_ms: u64,
    #[serde(default)]
    warnings: Vec<crate::model::Warning>,
}

#[derive(serde::Serialize)]
struct StateRef<'a> {
    state: DeliveryState,
    attempts: u32,
    receipts: &'a [crate::channels::NativeReceipt],
    error: &'a Option<crate::channels::ChannelError>,
    possible_duplicate: bool,
    updated_at_ms: u64,
}

#[derive(serde::Deserialize)]
struct State {
    state: DeliveryState,
    attempts: u32,
    receipts: Vec<crate::channels::NativeReceipt>,
    error: Option<crate::channels::ChannelError>,
    possible_duplicate: bool,
    updated_at_ms: u64,
}

fn encode_body(m: &StoredMessage) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(&BodyRef {
        conversation: &m.conversation,
        message: &m.message,
        proactive: &m.proactive,
        accepted_at_ms: m.accepted_at_ms,
        warnings: &m.warnings,
    })
    .map_err(storage)
}

fn encode_state(m: &StoredMessage) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(&StateRef {
        state: m.state,
        attempts: m.attempts,
        receipts: &m.receipts,
        error: &m.error,
        possible_duplicate: m.possible_duplicate,
        updated_at_ms: m.updated_at_ms,
    })
    .map_err(storage)
}

fn decode(id: u64, body: &[u8], state: &[u8]) -> Result<StoredMessage, StoreError> {
    let b: Body = serde_json::from_slice(body).map_err(storage)?;
    let s: State = serde_json::from_slice(state).map_err(storage)?;
    Ok(StoredMessage {
        id,
        conversation: b.conversation,
        message: b.message,
        proactive: b.proactive,
        accepted_at_ms: b.accepted_at_ms,
        state: s.state,
        attempts: s.attempts,
        receipts: s.receipts,
        error: s.error,
        possible_duplicate: s.possible_duplicate,
        updated_at_ms: s.updated_at_ms,
        warnings: b.warnings,
    })
}

/// Reads one message from both tables of a read or write transaction.
fn load(
    messages: &impl ReadableTable<u64, &'static [u8]>,
    states: &impl ReadableTable<u64, &'static [u8]>,
    id: u64,
) -> Result<Option<StoredMessage>, StoreError> {
    let (Some(b), Some(s)) = (
        messages.get(id).map_err(storage)?,
        states.get(id).map_err(storage)?,
    ) else {
        return Ok(None);
    };
    decode(id, b.value(), s.value()).map(Some)
}

enum Cmd {
    /// New versions of messages (and the idempotency key that accepted them), committed together.
    /// The bool says whether the message body changed too (or only its state).
    Put {
        entries: Vec<(u64, StoredMessage, bool)>,
        idempotency: Option<(String, IdempotencyRecord)>,
        ack: Ack,
    },
    Compact {
        cutoff_ms: u64,
        idem_cutoff_ms: u64,
        done: mpsc::Sender<usize>,
    },
}

struct Overlay {
    version: u64,
    messages: HashMap<u64, (u64, StoredMessage)>,
}

pub struct RedbStore {
    db: Arc<Database>,
    /// Taken on drop so the writer finishes its queue and lets go of the file.
    tx: Mutex<Option<mpsc::Sender<Cmd>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    overlay: Arc<Mutex<Overlay>>,
    next_id: u64,
}

fn storage(e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(e.to_string())
}

fn durable(rx: oneshot::Receiver<Result<(), StoreError>>) -> Durable {
    let f: std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send>> =
        Box::pin(rx.map(|r| r.unwrap_or(Err(StoreError::Closed))));
    f.shared()
}

impl RedbStore {
    /// Opens (or creates) `dir/outbox.redb`. An interrupted previous run is repaired by redb.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| storage(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("outbox.redb");
        let db = Database::create(&path)
            .map_err(|e| storage(format!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(storage)?;
        let next_id = {
            // Create every table up front so readers never meet a missing one.
            txn.open_table(MESSAGES).map_err(storage)?;
            txn.open_table(STATES).map_err(storage)?;
            txn.open_table(PENDING).map_err(storage)?;
            txn.open_table(FAILED).map_err(storage)?;
            txn.open_table(DELIVERED).map_err(storage)?;
            txn.open_table(IDEMPOTENCY).map_err(storage)?;
            let meta = txn.open_table(META).map_err(storage)?;
            meta.get("next_id")
                .map_err(storage)?
                .map(|v| v.value())
                .unwrap_or(1)
        };
        txn.commit().map_err(storage)?;
        let db = Arc::new(db);
        let overlay = Arc::new(Mutex::new(Overlay {
            version: 0,
            messages: HashMap::new(),
        }));
        let (tx, rx) = mpsc::channel();
        let (wdb, wov) = (db.clone(), overlay.clone());
        let handle = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || writer(wdb, wov, rx))
            .map_err(|e| storage(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            db,
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
            overlay,
            next_id,
        })
    }

    fn send(&self, cmd: Cmd) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        // A send only fails once the writer is gone; the dropped ack then reports Closed.
        if let Some(tx) = tx.as_ref() {
            let _ = tx.send(cmd);
        }
    }

    fn read(&self, id: u64) -> Result<Option<StoredMessage>, StoreError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let messages = txn.open_table(MESSAGES).map_err(storage)?;
        let states = txn.open_table(STATES).map_err(storage)?;
        load(&messages, &states, id)
    }

    /// Queues new versions of messages; under the overlay lock so versions reach the writer in
    /// order.
    fn put(
        &self,
        messages: Vec<StoredMessage>,
        body_changed: bool,
        idempotency: Option<(String, IdempotencyRecord)>,
    ) -> Durable {
        let (ack, rx) = oneshot::channel();
        let mut ov = self.overlay.lock().unwrap_or_else(|p| p.into_inner());
        let mut entries = Vec::with_capacity(messages.len());
        for m in messages {
            ov.version += 1;
            let version = ov.version;
            ov.messages.insert(m.id, (version, m.clone()));
            entries.push((version, m, body_changed));
        }
        self.send(Cmd::Put {
            entries,
            idempotency,
            ack,
        });
        drop(ov);
        durable(rx)
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
    }
}

impl Store for RedbStore {
    fn append(
        &self,
        messages: Vec<StoredMessage>,
        idempotency: Option<(String, IdempotencyRecord)>,
    ) -> Durable {
        self.put(messages, true, idempotency)
    }

    fn update(&self, id: u64, change: Change) -> Durable {
        let current = {
            let ov = self.overlay.lock().unwrap_or_else(|p| p.into_inner());
            ov.messages.get(&id).map(|(_, m)| m.clone())
        };
        let current = match current {
            Some(m) => Some(m),
            None => self.read(id).ok().flatten(),
        };
        match current {
            Some(mut m) => {
                let body_changed = matches!(change, Change::Moved { .. });
                apply(&mut m, change);
                self.put(vec![m], body_changed, None)
            }
            None => super::ready_durable(),
        }
    }

    fn get(&self, id: u64) -> Option<StoredMessage> {
        {
            let ov = self.overlay.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, m)) = ov.messages.get(&id) {
                return Some(m.clone());
            }
        }
        match self.read(id) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, message_id = id, "outbox read failed");
                None
            }
        }
    }

    fn pending(&self) -> Result<Vec<StoredMessage>, StoreError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let pending = txn.open_table(PENDING).map_err(storage)?;
        let messages = txn.open_table(MESSAGES).map_err(storage)?;
        let states = txn.open_table(STATES).map_err(storage)?;
        let mut out = Vec::new();
        for entry in pending.iter().map_err(storage)? {
            let (id, _) = entry.map_err(storage)?;
            if let Some(m) = load(&messages, &states, id.value())? {
                out.push(m);
            }
        }
        Ok(out)
    }

    fn failed(&self, after_id: u64, limit: usize) -> Vec<StoredMessage> {
        let run = || -> Result<Vec<StoredMessage>, StoreError> {
            let txn = self.db.begin_read().map_err(storage)?;
            let failed = txn.open_table(FAILED).map_err(storage)?;
            let messages = txn.open_table(MESSAGES).map_err(storage)?;
            let mut out = Vec::new();
            for entry in failed
                .range(after_id.saturating_add(1)..)
                .map_err(storage)?
            {
                let (id, _) = entry.map_err(storage)?;
                if let Some(m) = self.get(id.value()) {
                    // The overlay may already say it was redelivered.
                    if matches!(m.state, DeliveryState::Failed | DeliveryState::Expired) {
                        out.push(m);
                    }
                } else if let Some(v) = messages.get(id.value()).map_err(storage)? {
                    out.push(serde_json::from_slice(v.value()).map_err(storage)?);
                }
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        };
        run().unwrap_or_else(|e| {
            tracing::error!(error = %e, "outbox scan of failed messages failed");
            Vec::new()
        })
    }

    fn next_id(&self) -> u64 {
        self.next_id
    }

    fn idempotency_get(&self, key: &str) -> Option<IdempotencyRecord> {
        let run = || -> Result<Option<IdempotencyRecord>, StoreError> {
            let txn = self.db.begin_read().map_err(storage)?;
            let t = txn.open_table(IDEMPOTENCY).map_err(storage)?;
            match t.get(key).map_err(storage)? {
                Some(v) => serde_json::from_slice(v.value()).map(Some).map_err(storage),
                None => Ok(None),
            }
        };
        run().unwrap_or_else(|e| {
            tracing::error!(error = %e, "outbox idempotency read failed");
            None
        })
    }

    fn compact(&self, cutoff_ms: u64, idem_cutoff_ms: u64) -> usize {
        let (done, rx) = mpsc::channel();
        self.send(Cmd::Compact {
            cutoff_ms,
            idem_cutoff_ms,
            done,
        });
        rx.recv().unwrap_or(0)
    }
}

fn writer(db: Arc<Database>, overlay: Arc<Mutex<Overlay>>, rx: mpsc::Receiver<Cmd>) {
    const MAX_BATCH: usize = 8192;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let mut compacted = 0;
        let result = commit(&db, &batch, &mut compacted);
        if let Err(e) = &result {
            tracing::error!(error = %e, commands = batch.len(), "outbox commit failed");
        }
        let mut committed = Vec::new();
        for cmd in batch {
            match cmd {
                Cmd::Put { entries, ack, .. } => {
                    committed.extend(entries.into_iter().map(|(v, m, _)| (m.id, v)));
                    let _ = ack.send(result.clone());
                }
                Cmd::Compact { done, .. } => {
                    let _ = done.send(compacted);
                }
            }
        }
        if result.is_ok() {
            let mut ov = overlay.lock().unwrap_or_else(|p| p.into_inner());
            for (id, version) in committed {
                // Keep a newer version that is still on its way to disk.
                if ov.messages.get(&id).is_some_and(|(v, _)| *v == version) {
                    ov.messages.remove(&id);
                }
            }
        }
    }
}

fn commit(db: &Database, batch: &[Cmd], compacted: &mut usize) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(storage)?;
    {
        let mut messages = txn.open_table(MESSAGES).map_err(storage)?;
        let mut states = txn.open_table(STATES).map_err(storage)?;
        let mut pending = txn.open_table(PENDING).map_err(storage)?;
        let mut failed = txn.open_table(FAILED).map_err(storage)?;
        let mut delivered = txn.open_table(DELIVERED).map_err(storage)?;
        let mut idem = txn.open_table(IDEMPOTENCY).map_err(storage)?;
        let mut meta = txn.open_table(META).map_err(storage)?;
        let mut next_id = meta
            .get("next_id")
            .map_err(storage)?
            .map(|v| v.value())
            .unwrap_or(1);
        for cmd in batch {
            match cmd {
                Cmd::Put {
                    entries,
                    idempotency,
                    ..
                } => {
                    if let Some((key, record)) = idempotency {
                        let bytes = serde_json::to_vec(record).map_err(storage)?;
                        idem.insert(key.as_str(), bytes.as_slice())
                            .map_err(storage)?;
                    }
                    for (_, m, body_changed) in entries {
                        if *body_changed {
                            messages
                                .insert(m.id, encode_body(m)?.as_slice())
                                .map_err(storage)?;
                        }
                        states
                            .insert(m.id, encode_state(m)?.as_slice())
                            .map_err(storage)?;
                        next_id = next_id.max(m.id + 1);
                        if m.state.is_terminal() {
                            pending.remove(m.id).map_err(storage)?;
                        } else {
                            pending.insert(m.id, 0).map_err(storage)?;
                        }
                        match m.state {
                            DeliveryState::Failed | DeliveryState::Expired => {
                                failed.insert(m.id, 0).map_err(storage)?;
                            }
                            _ => {
                                failed.remove(m.id).map_err(storage)?;
                            }
                        }
                        if m.state == DeliveryState::Delivered {
                            delivered
                                .insert((m.updated_at_ms, m.id), 0)
                                .map_err(storage)?;
                        }
                    }
                }
                Cmd::Compact {
                    cutoff_ms,
                    idem_cutoff_ms,
                    ..
                } => {
                    let old: Vec<(u64, u64)> = delivered
                        .range(..(*cutoff_ms, 0))
                        .map_err(storage)?
                        .filter_map(|e| e.ok().map(|(k, _)| k.value()))
                        .collect();
                    for (at, id) in old {
                        delivered.remove((at, id)).map_err(storage)?;
                        messages.remove(id).map_err(storage)?;
                        states.remove(id).map_err(storage)?;
                        *compacted += 1;
                    }
                    let stale: Vec<String> = idem
                        .iter()
                        .map_err(storage)?
                        .filter_map(|e| e.ok())
                        .filter_map(|(k, v)| {
                            let r: IdempotencyRecord = serde_json::from_slice(v.value()).ok()?;
                            (r.created_at_ms < *idem_cutoff_ms).then(|| k.value().to_string())
                        })
                        .collect();
                    for k in stale {
                        idem.remove(k.as_str()).map_err(storage)?;
                    }
                }
            }
        }
        meta.insert("next_id", next_id).map_err(storage)?;
    }
    txn.commit().map_err(storage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{Outcome, now_ms};

    fn msg(id: u64) -> StoredMessage {
        StoredMessage {
            id,
            conversation: "c".into(),
            message: Default::default(),
            proactive: None,
            accepted_at_ms: now_ms(),
            state: DeliveryState::Accepted,
            attempts: 0,
            receipts: vec![],
            error: None,
            possible_duplicate: false,
            updated_at_ms: now_ms(),
            warnings: vec![],
        }
    }

    #[tokio::test]
    async fn survives_reopen_and_tracks_states() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RedbStore::open(dir.path()).unwrap();
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
            let failed = Outcome {
                state: DeliveryState::Failed,
                receipts: vec![],
                error: None,
                attempts: 2,
                possible_duplicate: false,
            };
            s.update(2, Change::Finished(failed)).await.unwrap();
        }
        let s = RedbStore::open(dir.path()).unwrap();
        assert_eq!(s.next_id(), 4);
        let pending: Vec<u64> = s.pending().unwrap().iter().map(|m| m.id).collect();
        assert_eq!(pending, vec![1, 3]);
        assert_eq!(s.get(1).unwrap().state, DeliveryState::Delivering);
        let failed: Vec<u64> = s.failed(0, 10).iter().map(|m| m.id).collect();
        assert_eq!(failed, vec![2]);
        assert_eq!(s.idempotency_get("k").unwrap().message_ids, vec![1, 2, 3]);
        assert_eq!(s.compact(u64::MAX, 6), 0, "nothing delivered yet");
        assert!(s.idempotency_get("k").is_none(), "old key compacted");
    }

    #[tokio::test]
    async fn delivered_messages_are_compacted_after_retention() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        s.append(vec![msg(1), msg(2)], None).await.unwrap();
        let done = Outcome {
            state: DeliveryState::Delivered,
            receipts: vec![],
            error: None,
            attempts: 1,
            possible_duplicate: false,
        };
        s.update(1, Change::Finished(done)).await.unwrap();
        assert_eq!(s.compact(0, 0), 0, "not old enough");
        assert_eq!(s.compact(u64::MAX, 0), 1);
        assert!(s.get(1).is_none());
        assert!(s.get(2).is_some(), "undelivered kept");
    }
}
