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
    Change, DeliveryState, Durable, IdempotencyRecord, StateRecord, Store, StoreError,
    StoredMessage, apply, apply_state,
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

// Both encoders start with room for a typical record: serde_json's to_vec starts at 128 bytes,
// so a message body was reallocated as it grew, on the accept path.
fn encode_body(m: &StoredMessage) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(1024);
    serde_json::to_writer(
        &mut out,
        &BodyRef {
            conversation: &m.conversation,
            message: &m.message,
            proactive: &m.proactive,
            accepted_at_ms: m.accepted_at_ms,
            warnings: &m.warnings,
        },
    )
    .map_err(storage)?;
    Ok(out)
}

fn encode_state(s: &StateRecord) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(192);
    serde_json::to_writer(&mut out, s).map_err(storage)?;
    Ok(out)
}

fn decode(id: u64, body: &[u8], state: &[u8]) -> Result<StoredMessage, StoreError> {
    let b: Body = serde_json::from_slice(body).map_err(storage)?;
    Ok(StoredMessage {
        id,
        conversation: b.conversation,
        message: b.message,
        proactive: b.proactive,
        accepted_at_ms: b.accepted_at_ms,
        record: serde_json::from_slice(state).map_err(storage)?,
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

/// A new version of one message: its state, and its body when that is new too (an append or
/// a proactive move). State changes never carry the body, so they cost a few bytes. Both come
/// encoded by the caller: the writer is the one serial step every acceptance waits for, so it
/// only inserts bytes.
struct Entry {
    version: u64,
    id: u64,
    body: Option<Vec<u8>>,
    /// What the list tables need (pending, failed, delivered by time); the whole state travels
    /// encoded in `state_bytes`.
    state: DeliveryState,
    updated_at_ms: u64,
    state_bytes: Vec<u8>,
}

enum Cmd {
    /// New versions of messages (and the idempotency key that accepted them), committed together.
    Put {
        entries: Vec<Entry>,
        idempotency: Option<(String, IdempotencyRecord)>,
        ack: Ack,
    },
    Compact {
        cutoff_ms: u64,
        idem_cutoff_ms: u64,
        done: mpsc::Sender<usize>,
    },
}

/// What readers must see before the writer has committed it.
#[derive(Default)]
struct Overlay {
    version: u64,
    /// Bodies appended or moved and not yet committed (their state as of that moment inside).
    bodies: HashMap<u64, (u64, Arc<StoredMessage>)>,
    /// The newest state of a message, until the writer committed that very version.
    states: HashMap<u64, (u64, StateRecord)>,
}

impl Overlay {
    fn state(&self, id: u64) -> Option<StateRecord> {
        match self.states.get(&id) {
            Some((_, s)) => Some(s.clone()),
            None => self.bodies.get(&id).map(|(_, m)| m.record.clone()),
        }
    }

    fn next_version(&mut self) -> u64 {
        self.version += 1;
        self.version
    }
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
    /// redb's own default cache is 1 GiB: too much for a sidecar, so the caller bounds it
    /// (`outbox.cache_mib`).
    pub fn open(dir: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| storage(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("outbox.redb");
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(&path)
            .map_err(|e| storage(format!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(storage)?;
        let next_id = {
            // Create every table up front so readers never meet a missing one.
            txn.open_table(STATES).map_err(storage)?;
            txn.open_table(PENDING).map_err(storage)?;
            txn.open_table(FAILED).map_err(storage)?;
            txn.open_table(DELIVERED).map_err(storage)?;
            txn.open_table(IDEMPOTENCY).map_err(storage)?;
            let messages = txn.open_table(MESSAGES).map_err(storage)?;
            let meta = txn.open_table(META).map_err(storage)?;
            next_id_after(&messages, &meta)?
        };
        txn.commit().map_err(storage)?;
        let db = Arc::new(db);
        let overlay = Arc::new(Mutex::new(Overlay::default()));
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

    fn overlay(&self) -> std::sync::MutexGuard<'_, Overlay> {
        // Every overlay change is a single insert or remove: a panic cannot leave it half done.
        self.overlay.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a command; called under the overlay lock so versions reach the writer in order.
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

    fn read_state(&self, id: u64) -> Result<Option<StateRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let states = txn.open_table(STATES).map_err(storage)?;
        match states.get(id).map_err(storage)? {
            Some(v) => serde_json::from_slice(v.value()).map(Some).map_err(storage),
            None => Ok(None),
        }
    }

    /// Queues whole messages (body and state).
    fn put_bodies(
        &self,
        messages: Vec<StoredMessage>,
        idempotency: Option<(String, IdempotencyRecord)>,
    ) -> Durable {
        let mut encoded = Vec::with_capacity(messages.len());
        for m in messages {
            match (encode_body(&m), encode_state(&m.record)) {
                (Ok(body), Ok(state_bytes)) => encoded.push((Arc::new(m), body, state_bytes)),
                (Err(e), _) | (_, Err(e)) => return super::settled(Err(e)),
            }
        }
        let (ack, rx) = oneshot::channel();
        let mut ov = self.overlay();
        let mut entries = Vec::with_capacity(encoded.len());
        for (m, body, state_bytes) in encoded {
            let version = ov.next_version();
            ov.states.remove(&m.id);
            ov.bodies.insert(m.id, (version, m.clone()));
            entries.push(Entry {
                version,
                id: m.id,
                body: Some(body),
                state: m.record.state,
                updated_at_ms: m.record.updated_at_ms,
                state_bytes,
            });
        }
        self.send(Cmd::Put {
            entries,
            idempotency,
            ack,
        });
        drop(ov);
        durable(rx)
    }

    /// Applies a state change to the newest known state and queues it.
    fn put_state(&self, id: u64, change: Change) -> Durable {
        let mut ov = self.overlay();
        let current = if matches!(change, Change::Finished(_)) {
            // A final outcome replaces the whole state (see `Change::Finished`): nothing to read
            // back or copy, whatever this placeholder says.
            StateRecord::new(DeliveryState::Accepted, 0)
        } else if let Some(s) = ov.state(id) {
            s
        } else {
            // Committed and out of the overlay: read its state (never its body) from disk,
            // outside the lock. Only this message's own worker changes its state, so nothing
            // newer can arrive meanwhile.
            drop(ov);
            let Some(s) = self.read_state(id).ok().flatten() else {
                return super::ready_durable();
            };
            ov = self.overlay();
            ov.state(id).unwrap_or(s)
        };
        let mut state = current;
        apply_state(&mut state, change);
        let state_bytes = match encode_state(&state) {
            Ok(b) => b,
            Err(e) => return super::settled(Err(e)),
        };
        let (ack, rx) = oneshot::channel();
        let version = ov.next_version();
        let entry = Entry {
            version,
            id,
            body: None,
            state: state.state,
            updated_at_ms: state.updated_at_ms,
            state_bytes,
        };
        ov.states.insert(id, (version, state));
        self.send(Cmd::Put {
            entries: vec![entry],
            idempotency: None,
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
        self.put_bodies(messages, idempotency)
    }

    fn update(&self, id: u64, change: Change) -> Durable {
        if !matches!(change, Change::Moved { .. }) {
            return self.put_state(id, change);
        }
        match self.get(id) {
            Some(mut m) => {
                apply(&mut m, change);
                self.put_bodies(vec![m], None)
            }
            None => super::ready_durable(),
        }
    }

    fn get(&self, id: u64) -> Option<StoredMessage> {
        let (body, state) = {
            let ov = self.overlay();
            (
                ov.bodies.get(&id).map(|(_, m)| m.clone()),
                ov.states.get(&id).map(|(_, s)| s.clone()),
            )
        };
        let mut m = match body {
            Some(m) => Arc::unwrap_or_clone(m),
            None => match self.read(id) {
                Ok(Some(m)) => m,
                Ok(None) => return None,
                Err(e) => {
                    tracing::error!(error = %e, message_id = id, "outbox read failed");
                    return None;
                }
            },
        };
        if let Some(s) = state {
            m.record = s;
        }
        Some(m)
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
            let mut out = Vec::new();
            for entry in failed
                .range(after_id.saturating_add(1)..)
                .map_err(storage)?
            {
                let (id, _) = entry.map_err(storage)?;
                // The overlay may already say it was redelivered.
                if let Some(m) = self.get(id.value())
                    && matches!(
                        m.record.state,
                        DeliveryState::Failed | DeliveryState::Expired
                    )
                {
                    out.push(m);
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
    // Group commit: everything that queued up during the previous commit goes in the next one.
    // Waiting on purpose to gather more (up to 300 µs once 8 commands were waiting) was tried:
    // in interleaved runs it was not faster, and it delays every acknowledgement it holds.
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
                    committed.extend(
                        entries
                            .into_iter()
                            .map(|e| (e.id, e.version, e.body.is_some())),
                    );
                    let _ = ack.send(result.clone());
                }
                Cmd::Compact { done, .. } => {
                    let _ = done.send(compacted);
                }
            }
        }
        if result.is_ok() {
            let mut ov = overlay.lock().unwrap_or_else(|p| p.into_inner());
            for (id, version, body) in committed {
                // Keep a newer version that is still on its way to disk.
                if body && ov.bodies.get(&id).is_some_and(|(v, _)| *v == version) {
                    ov.bodies.remove(&id);
                }
                if ov.states.get(&id).is_some_and(|(v, _)| *v == version) {
                    ov.states.remove(&id);
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
                    for e in entries {
                        if let Some(body) = &e.body {
                            messages.insert(e.id, body.as_slice()).map_err(storage)?;
                        }
                        states
                            .insert(e.id, e.state_bytes.as_slice())
                            .map_err(storage)?;
                        // Only the changes that move a message in or out of a list touch it.
                        match e.state {
                            DeliveryState::Accepted => {
                                pending.insert(e.id, 0).map_err(storage)?;
                                if e.body.is_none() {
                                    // Redelivered: it leaves the failed list.
                                    failed.remove(e.id).map_err(storage)?;
                                }
                            }
                            // Appended as the conversation's next message: pending from the start.
                            DeliveryState::Delivering if e.body.is_some() => {
                                pending.insert(e.id, 0).map_err(storage)?;
                            }
                            DeliveryState::Delivering => {}
                            DeliveryState::Delivered => {
                                pending.remove(e.id).map_err(storage)?;
                                delivered
                                    .insert((e.updated_at_ms, e.id), 0)
                                    .map_err(storage)?;
                            }
                            DeliveryState::Failed | DeliveryState::Expired => {
                                pending.remove(e.id).map_err(storage)?;
                                failed.insert(e.id, 0).map_err(storage)?;
                            }
                        }
                    }
                }
                Cmd::Compact {
                    cutoff_ms,
                    idem_cutoff_ms,
                    ..
                } => {
                    // Compaction may remove the newest message: record the bound first.
                    let next_id = next_id_after(&messages, &meta)?;
                    meta.insert("next_id", next_id).map_err(storage)?;
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
    }
    txn.commit().map_err(storage)
}

/// The next message id: past the newest message kept, and past the bound compaction recorded
/// when it removed messages. Appends don't write the bound, so a commit touches one table less.
fn next_id_after(
    messages: &impl ReadableTable<u64, &'static [u8]>,
    meta: &impl ReadableTable<&'static str, u64>,
) -> Result<u64, StoreError> {
    let newest = messages
        .last()
        .map_err(storage)?
        .map(|(k, _)| k.value() + 1)
        .unwrap_or(1);
    let recorded = meta
        .get("next_id")
        .map_err(storage)?
        .map(|v| v.value())
        .unwrap_or(1);
    Ok(newest.max(recorded))
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
            record: StateRecord::new(DeliveryState::Accepted, now_ms()),
            warnings: vec![],
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

    #[tokio::test]
    async fn survives_reopen_and_tracks_states() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RedbStore::open(dir.path(), 1 << 20).unwrap();
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
        let s = RedbStore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.next_id(), 4);
        let pending: Vec<u64> = s.pending().unwrap().iter().map(|m| m.id).collect();
        assert_eq!(pending, vec![1, 3]);
        assert_eq!(s.get(1).unwrap().record.state, DeliveryState::Delivering);
        let failed: Vec<u64> = s.failed(0, 10).iter().map(|m| m.id).collect();
        assert_eq!(failed, vec![2]);
        assert_eq!(s.idempotency_get("k").unwrap().message_ids, vec![1, 2, 3]);
        assert_eq!(s.compact(u64::MAX, 6), 0, "nothing delivered yet");
        assert!(s.idempotency_get("k").is_none(), "old key compacted");
    }

    #[tokio::test]
    async fn appended_as_delivering_is_pending_and_redelivered_leaves_failed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RedbStore::open(dir.path(), 1 << 20).unwrap();
            let mut head = msg(1);
            head.record.state = DeliveryState::Delivering;
            s.append(vec![head, msg(2)], None).await.unwrap();
            let failed = finished(DeliveryState::Failed, 1);
            s.update(2, Change::Finished(failed)).await.unwrap();
            s.update(2, Change::Requeued).await.unwrap();
        }
        let s = RedbStore::open(dir.path(), 1 << 20).unwrap();
        let pending: Vec<(u64, DeliveryState)> = s
            .pending()
            .unwrap()
            .iter()
            .map(|m| (m.id, m.record.state))
            .collect();
        assert_eq!(
            pending,
            vec![(1, DeliveryState::Delivering), (2, DeliveryState::Accepted)]
        );
        assert!(s.failed(0, 10).is_empty(), "requeued left the failed list");
    }

    #[tokio::test]
    async fn delivered_messages_are_compacted_after_retention() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path(), 1 << 20).unwrap();
        s.append(vec![msg(1), msg(2)], None).await.unwrap();
        let done = finished(DeliveryState::Delivered, 1);
        s.update(1, Change::Finished(done)).await.unwrap();
        assert_eq!(s.compact(0, 0), 0, "not old enough");
        assert_eq!(s.compact(u64::MAX, 0), 1);
        assert!(s.get(1).is_none());
        assert!(s.get(2).is_some(), "undelivered kept");
    }

    #[tokio::test]
    async fn ids_are_not_reused_after_the_newest_message_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RedbStore::open(dir.path(), 1 << 20).unwrap();
            s.append(vec![msg(1), msg(2)], None).await.unwrap();
            let done = finished(DeliveryState::Delivered, 1);
            for id in [1, 2] {
                s.update(id, Change::Finished(done.clone())).await.unwrap();
            }
            assert_eq!(s.compact(u64::MAX, 0), 2);
        }
        let s = RedbStore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.next_id(), 3, "the bound compaction recorded survives");
    }
}
