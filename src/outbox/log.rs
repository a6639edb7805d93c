//! The durable outbox as an append-only log of segment files, with its index in memory.
//!
//! Owns the files under `data_dir/log/` and the lock file `data_dir/outbox.lock`, and renames
//! an imported `outbox.redb` once its contents are durable in the log. One writer
//! thread turns every change waiting in its queue into frames, writes them to the head segment
//! with one `pwrite` through an `O_DSYNC` handle, which returns once they are durable (group
//! commit; one system call where `pwrite` + `fdatasync` took two, ~7% less writer CPU). A B-tree store
//! wrote ~16 pages per commit and spent most of its CPU on the tree; a log writes only the
//! bytes that changed.
//!
//! Frame: `len: u32 | crc32(kind, payload): u32 | kind: u8 | payload`, little-endian. A run
//! of zeros (the segment's pre-written tail) or a frame that fails its checksum (a write torn
//! by a crash) ends a segment; every start opens a fresh head segment, so nothing is ever
//! written after a torn frame.
//!
//! The index keeps, per message, where its body and its newest state lie (~100 bytes per
//! retained message, measured for a BTreeMap of 40-byte slots) plus the idempotency keys; bodies are read back from the files. Replay
//! takes the newest record of each message. Segments are only ever deleted oldest first, once
//! their live records were copied forward, so a record still on disk is never older than one
//! deleted: a replay cannot bring back a superseded state. Messages dropped by compaction can
//! come back at replay with their final state; the compaction run at start drops them again.
//!
//! Knows nothing of ordering, gRPC or channels.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use super::{
    Change, Commits, DeliveryState, Durable, IdempotencyRecord, StateRecord, Store, StoreError,
    StoredMessage, apply, apply_state,
};

/// A segment is closed once it holds this much; a single commit may go past it.
const SEGMENT_BYTES: u64 = 64 << 20;
/// The head segment is written with zeros this far ahead of its data, so a commit's durable
/// write flushes data with no size change to journal. Measured on this VM for 6 KB commits: 48-72
/// µs of CPU and 120-150 µs of wall time per commit, against 108-118 and 271-284 µs when every
/// commit grew the file (4 MiB ahead did no better than 1 MiB).
const ZERO_AHEAD: u64 = 1 << 20;
const MAGIC: &[u8; 8] = b"cgwlog01";
const FRAME_HEADER: usize = 9;

const KIND_HEADER: u8 = 1;
/// id, state length, state, body.
const KIND_MESSAGE: u8 = 2;
/// id, body: a body copied forward alone (its newest state lies elsewhere).
const KIND_BODY: u8 = 3;
/// id, state.
const KIND_STATE: u8 = 4;
/// key length, key, record.
const KIND_IDEMPOTENCY: u8 = 5;

fn storage(e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(e.to_string())
}

#[derive(serde::Serialize)]
struct BodyRef<'a> {
    conversation: &'a str,
    message: &'a crate::model::Message,
    proactive: &'a Option<Arc<crate::model::ProactiveOptions>>,
    accepted_at_ms: u64,
    warnings: &'a [crate::model::Warning],
}

#[derive(serde::Deserialize)]
struct Body {
    conversation: String,
    message: crate::model::Message,
    proactive: Option<Arc<crate::model::ProactiveOptions>>,
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

/// A state in the JSON serde writes for `StateRecord`, byte for byte, written by hand: each
/// message's state is written about three times (accepted, delivering, final), and serde
/// escaped every key and number's text on the way (~1.5k instructions a record). Only the
/// strings that come from outside are escaped here (by serde_json); a rare error is left to
/// serde whole. `decode` reads it with serde, so the two cannot drift unseen: a unit test
/// compares both writers.
fn encode_state(s: &StateRecord) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(192);
    out.extend_from_slice(b"{\"state\":\"");
    out.extend_from_slice(match s.state {
        DeliveryState::Accepted => b"accepted".as_slice(),
        DeliveryState::Delivering => b"delivering",
        DeliveryState::Delivered => b"delivered",
        DeliveryState::Failed => b"failed",
        DeliveryState::Expired => b"expired",
    });
    out.extend_from_slice(b"\",\"attempts\":");
    push_decimal(&mut out, u64::from(s.attempts));
    out.extend_from_slice(b",\"receipts\":[");
    for (i, r) in s.receipts.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"native_id\":");
        serde_json::to_writer(&mut out, &r.native_id).map_err(storage)?;
        out.extend_from_slice(b",\"conversation_id\":");
        serde_json::to_writer(&mut out, &r.conversation_id).map_err(storage)?;
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"error\":");
    match &s.error {
        None => out.extend_from_slice(b"null"),
        Some(e) => serde_json::to_writer(&mut out, e).map_err(storage)?,
    }
    out.extend_from_slice(b",\"possible_duplicate\":");
    out.extend_from_slice(if s.possible_duplicate {
        b"true".as_slice()
    } else {
        b"false"
    });
    out.extend_from_slice(b",\"updated_at_ms\":");
    push_decimal(&mut out, s.updated_at_ms);
    out.push(b'}');
    Ok(out)
}

fn push_decimal(out: &mut Vec<u8>, n: u64) {
    // itoa writes two digits per step from a table, as serde_json does.
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

pub(super) fn decode(id: u64, body: &[u8], state: &[u8]) -> Result<StoredMessage, StoreError> {
    let b: Body = serde_json::from_slice(body).map_err(storage)?;
    Ok(StoredMessage {
        id,
        conversation: b.conversation,
        message: Arc::new(b.message),
        proactive: b.proactive,
        accepted_at_ms: b.accepted_at_ms,
        record: serde_json::from_slice(state).map_err(storage)?,
        warnings: b.warnings,
    })
}

/// Where some bytes lie: a segment, an offset and a length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    seg: u32,
    off: u32,
    len: u32,
}

/// One retained message in the index.
#[derive(Debug, Clone, Copy)]
struct Slot {
    body: Loc,
    state: Loc,
    kind: DeliveryState,
    updated_at_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct IdemSlot {
    loc: Loc,
    created_at_ms: u64,
}

struct Segment {
    file: Arc<File>,
    /// Bytes of frames written (the rest is zeros).
    size: u64,
    /// Bytes the index still points to.
    live: u64,
}

#[derive(Default)]
struct Index {
    messages: BTreeMap<u64, Slot>,
    /// Failed or expired ids: ListFailed pages through them without scanning every message.
    failed: BTreeSet<u64>,
    idempotency: HashMap<String, IdemSlot>,
    segments: BTreeMap<u32, Segment>,
}

/// Bytes of a body's frame besides the body (header and id), counted as live with the body. A
/// body framed with its state has 4 more (the state's length), and a state framed alone has
/// its own header and id: both stay uncounted, so live bytes err low by at most that much,
/// and a segment whose every record is live still counts far more than half live.
const BODY_FRAME_OVERHEAD: u64 = FRAME_HEADER as u64 + 8;

/// Bytes an idempotency record's frame takes: its header, the key's length and the key, and
/// the record (`loc`). The key must count: keys are what fill a segment when callers send long
/// ones, and a segment full of live keys counted as mostly dead was copied forward again and
/// again, for ever (issue 23).
fn idempotency_frame_bytes(key_len: usize, loc: Loc) -> u64 {
    FRAME_HEADER as u64 + 4 + key_len as u64 + u64::from(loc.len)
}

impl Index {
    fn live(&mut self, seg: u32, bytes: u64, add: bool) {
        if let Some(s) = self.segments.get_mut(&seg) {
            if add {
                s.live = s.live.saturating_add(bytes);
            } else {
                s.live = s.live.saturating_sub(bytes);
            }
        }
    }

    fn live_body(&mut self, body: Loc, add: bool) {
        self.live(body.seg, u64::from(body.len) + BODY_FRAME_OVERHEAD, add);
    }

    fn live_state(&mut self, state: Loc, add: bool) {
        self.live(state.seg, u64::from(state.len), add);
    }

    fn live_message(&mut self, slot: &Slot, add: bool) {
        self.live_body(slot.body, add);
        self.live_state(slot.state, add);
    }

    fn set_message(&mut self, id: u64, slot: Slot) {
        self.live_message(&slot, true);
        if let Some(old) = self.messages.insert(id, slot) {
            self.live_message(&old, false);
        }
        self.track_failed(id, slot.kind);
    }

    fn set_body(&mut self, id: u64, body: Loc) {
        let Some(slot) = self.messages.get_mut(&id) else {
            return;
        };
        let old = std::mem::replace(&mut slot.body, body);
        self.live_body(old, false);
        self.live_body(body, true);
    }

    fn set_state(&mut self, id: u64, state: Loc, kind: DeliveryState, updated_at_ms: u64) {
        // A state for a message no longer indexed (compacted meanwhile) is left unreferenced.
        let Some(slot) = self.messages.get_mut(&id) else {
            return;
        };
        let old = std::mem::replace(&mut slot.state, state);
        slot.kind = kind;
        slot.updated_at_ms = updated_at_ms;
        self.live_state(old, false);
        self.live_state(state, true);
        self.track_failed(id, kind);
    }

    fn track_failed(&mut self, id: u64, kind: DeliveryState) {
        if matches!(kind, DeliveryState::Failed | DeliveryState::Expired) {
            self.failed.insert(id);
        } else {
            self.failed.remove(&id);
        }
    }

    fn set_idempotency(&mut self, key: String, slot: IdemSlot) {
        let key_len = key.len();
        self.live(
            slot.loc.seg,
            idempotency_frame_bytes(key_len, slot.loc),
            true,
        );
        if let Some(old) = self.idempotency.insert(key, slot) {
            self.live(
                old.loc.seg,
                idempotency_frame_bytes(key_len, old.loc),
                false,
            );
        }
    }

    fn remove_idempotency(&mut self, key: &str) {
        if let Some(s) = self.idempotency.remove(key) {
            self.live(s.loc.seg, idempotency_frame_bytes(key.len(), s.loc), false);
        }
    }

    fn file(&self, seg: u32) -> Result<Arc<File>, StoreError> {
        self.segments
            .get(&seg)
            .map(|s| s.file.clone())
            .ok_or_else(|| storage(format!("segment {seg} is gone")))
    }
}

fn read_at(file: &File, loc: Loc) -> Result<Vec<u8>, StoreError> {
    let mut buf = vec![0; loc.len as usize];
    file.read_exact_at(&mut buf, u64::from(loc.off))
        .map_err(|e| storage(format!("cannot read segment {}: {e}", loc.seg)))?;
    Ok(buf)
}

/// A new version of one message: its state, and its body when that is new too (an append or
/// a proactive move). Both come encoded by the caller: the writer is the one serial step every
/// acceptance waits for, so it only copies bytes.
struct Entry {
    version: u64,
    id: u64,
    body: Option<Vec<u8>>,
    state: DeliveryState,
    updated_at_ms: u64,
    state_bytes: Vec<u8>,
}

/// A `Cmd::Put` taken apart by the writer.
type QueuedPut = (Vec<Entry>, Option<(String, IdempotencyRecord)>, u64);

enum Cmd {
    Put {
        entries: Vec<Entry>,
        idempotency: Option<(String, IdempotencyRecord)>,
        /// The put's last version: settled in `Commits` once its commit is done, whether or not
        /// anybody waits for it.
        version: u64,
    },
    Compact {
        cutoff_ms: u64,
        idem_cutoff_ms: u64,
        done: mpsc::Sender<usize>,
    },
}

/// A map keyed by the gateway's own message ids.
type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// Hashes message ids: numbers the gateway hands out in sequence, which no caller chooses, so
/// SipHash's defence against chosen keys buys nothing and it cost ~1% of the instructions per
/// message. A multiply by an odd constant keeps sequential ids apart in the low bits (the
/// bucket) and mixes them into the high bits (the tag).
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// What readers must see before the writer has committed it, and the state of each unfinished
/// message the writer has committed (its next change starts from it).
#[derive(Default)]
struct Overlay {
    version: u64,
    /// Bodies appended or moved and not yet committed (their state as of that moment inside).
    bodies: IdMap<(u64, Arc<StoredMessage>)>,
    /// The newest state of a message, until the writer committed that very version and, for
    /// an unfinished message, until it finishes.
    states: IdMap<(u64, StateRecord)>,
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

fn segment_path(dir: &Path, seg: u32) -> PathBuf {
    dir.join(format!("{seg:010}.seg"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change under these locks is a set of inserts and removes applied by one thread;
    // a panic elsewhere cannot leave a half-written value, so recover the guard.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct LogStore {
    index: Arc<Mutex<Index>>,
    overlay: Arc<Mutex<Overlay>>,
    /// Taken on drop so the writer finishes its queue and lets go of the files.
    /// No lock around it: `Sender` is shared by reference, and only `drop` (with `&mut self`)
    /// takes it.
    tx: Option<mpsc::Sender<Cmd>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Why the writer stopped, once a write failed.
    broken: Arc<OnceLock<String>>,
    /// How far the writer got: what each `Durable` handed out waits on.
    commits: Arc<Commits>,
    #[cfg(test)]
    fail_next: Arc<std::sync::atomic::AtomicBool>,
    next_id: u64,
    /// Held for the store's life: a second gateway on the same directory is refused.
    _lock: File,
}

impl LogStore {
    /// Opens (or creates) the log in `dir`, replaying every segment into the index. An outbox
    /// of an earlier version found there (`outbox.redb`) is imported first.
    /// `import_cache_bytes` bounds the memory redb may use while that file is read.
    pub fn open(dir: &Path, import_cache_bytes: usize) -> Result<Self, StoreError> {
        Self::open_with(dir, SEGMENT_BYTES, import_cache_bytes)
    }

    /// `open` with another segment size (tests roll and free segments with small ones).
    pub(crate) fn open_with(
        dir: &Path,
        segment_bytes: u64,
        import_cache_bytes: usize,
    ) -> Result<Self, StoreError> {
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
        let log_dir = dir.join("log");
        create_dir_durably(&log_dir)?;
        let (index, mut next_id, last_seg) = replay(&log_dir)?;
        let old = dir.join("outbox.redb");
        let imported = if old.exists() {
            let imported = super::redb_import::read(&old, import_cache_bytes)?;
            // Past every id the old store gave out, even those it had compacted away: the
            // new head's header records it.
            next_id = next_id.max(imported.next_id);
            Some(imported)
        } else {
            None
        };
        let index = Arc::new(Mutex::new(index));
        let head = Head::create(&log_dir, last_seg + 1, next_id, &index)?;
        let overlay = Arc::new(Mutex::new(Overlay::default()));
        let broken = Arc::new(OnceLock::new());
        let commits = Arc::new(Commits::default());
        #[cfg(test)]
        let fail_next = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let mut w = Writer {
            dir: log_dir,
            head,
            index: index.clone(),
            overlay: overlay.clone(),
            broken: broken.clone(),
            commits: commits.clone(),
            #[cfg(test)]
            fail_next: fail_next.clone(),
            max_id: next_id.saturating_sub(1),
            segment_bytes,
            scratch: Batch::default(),
        };
        if let Some(imported) = imported {
            w.import(imported, &old)?;
        }
        let handle = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || w.run(rx))
            .map_err(|e| storage(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            index,
            overlay,
            tx: Some(tx),
            writer: Some(handle),
            broken,
            commits,
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

    /// Makes the next write fail as a full disk would.
    #[cfg(test)]
    pub(crate) fn fail_next_write(&self) {
        self.fail_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Breaks the store the way a full disk does: a write fails, and with it every later one.
    #[cfg(test)]
    #[allow(dead_code)]
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
        };
        assert!(self.append(vec![message], None).await.is_err());
    }

    fn read(&self, id: u64) -> Result<Option<StoredMessage>, StoreError> {
        let (slot, body_file, state_file) = {
            let ix = lock(&self.index);
            let Some(slot) = ix.messages.get(&id).copied() else {
                return Ok(None);
            };
            (slot, ix.file(slot.body.seg)?, ix.file(slot.state.seg)?)
        };
        // Read outside the lock; an open handle stays readable even if its segment is deleted.
        let body = read_at(&body_file, slot.body)?;
        let state = read_at(&state_file, slot.state)?;
        decode(id, &body, &state).map(Some)
    }

    fn read_state(&self, id: u64) -> Result<Option<StateRecord>, StoreError> {
        let (loc, file) = {
            let ix = lock(&self.index);
            let Some(slot) = ix.messages.get(&id) else {
                return Ok(None);
            };
            (slot.state, ix.file(slot.state.seg)?)
        };
        let bytes = read_at(&file, loc)?;
        serde_json::from_slice(&bytes).map(Some).map_err(storage)
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
                (Err(e), _) | (_, Err(e)) => return Durable::settled(Err(e)),
            }
        }
        let mut ov = lock(&self.overlay);
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
        let state_bytes = match encode_state(&state) {
            Ok(b) => b,
            Err(e) => return not_recorded(id, e, wait),
        };
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
            version,
        });
        drop(ov);
        wait.then(|| Durable::of(&self.commits, version))
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

impl Drop for LogStore {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

impl Store for LogStore {
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
        match self.get(id) {
            Some(mut m) => {
                apply(&mut m, change);
                self.put_bodies(vec![m], None)
            }
            None => Durable::ready(),
        }
    }

    fn record(&self, id: u64, change: Change) {
        if matches!(change, Change::Moved { .. }) {
            drop(self.update(id, change));
        } else {
            self.put_state(id, change, false);
        }
    }

    fn get(&self, id: u64) -> Option<StoredMessage> {
        let (body, state) = {
            let ov = lock(&self.overlay);
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
        let ids: Vec<u64> = lock(&self.index)
            .messages
            .iter()
            .filter(|(_, s)| !s.kind.is_terminal())
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(m) = self.read(id)? {
                out.push(m);
            }
        }
        Ok(out)
    }

    fn failed(&self, after_id: u64, limit: usize) -> Vec<StoredMessage> {
        let ids: Vec<u64> = lock(&self.index)
            .failed
            .range(after_id.saturating_add(1)..)
            .copied()
            .collect();
        let mut out = Vec::new();
        for id in ids {
            // The overlay may already say it was redelivered.
            if let Some(m) = self.get(id)
                && matches!(
                    m.record.state,
                    DeliveryState::Failed | DeliveryState::Expired
                )
            {
                out.push(m);
                if out.len() >= limit {
                    break;
                }
            }
        }
        out
    }

    fn next_id(&self) -> u64 {
        self.next_id
    }

    fn idempotency_get(&self, key: &str) -> Option<IdempotencyRecord> {
        let run = || -> Result<Option<IdempotencyRecord>, StoreError> {
            let (loc, file) = {
                let ix = lock(&self.index);
                let Some(slot) = ix.idempotency.get(key) else {
                    return Ok(None);
                };
                (slot.loc, ix.file(slot.loc.seg)?)
            };
            let bytes = read_at(&file, loc)?;
            serde_json::from_slice(&bytes).map(Some).map_err(storage)
        };
        run().unwrap_or_else(|e| {
            tracing::error!(error = %e, "outbox idempotency read failed");
            None
        })
    }

    fn failure(&self) -> Option<String> {
        self.broken.get().cloned()
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

/// The segment being written.
struct Head {
    seg: u32,
    file: Arc<File>,
    /// The same file opened with `O_DSYNC`: a write through it is durable when it returns.
    /// Only commits go through it; the zeros ahead are written and synced through `file`, so
    /// a commit never changes the file's size and needs no metadata flush.
    dsync: File,
    pos: u64,
    zeroed_until: u64,
}

impl Head {
    /// Creates segment `seg` with its header frame and registers it in the index.
    fn create(
        dir: &Path,
        seg: u32,
        next_id: u64,
        index: &Mutex<Index>,
    ) -> Result<Self, StoreError> {
        let path = segment_path(dir, seg);
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| storage(format!("cannot create {}: {e}", path.display())))?;
        let mut payload = Vec::with_capacity(16);
        payload.extend_from_slice(MAGIC);
        payload.extend_from_slice(&next_id.to_le_bytes());
        let mut buf = Vec::with_capacity(FRAME_HEADER + payload.len());
        push_frame(&mut buf, KIND_HEADER, &[&payload]);
        let dsync = {
            use std::os::unix::fs::OpenOptionsExt;
            File::options()
                .write(true)
                .custom_flags(libc::O_DSYNC)
                .open(&path)
                .map_err(|e| storage(format!("cannot open {}: {e}", path.display())))?
        };
        let mut head = Self {
            seg,
            dsync,
            file: Arc::new(file),
            pos: 0,
            zeroed_until: 0,
        };
        head.write(&buf)
            .map_err(|e| storage(format!("cannot write {}: {e}", path.display())))?;
        // The new file's name must be durable before anything in it is acknowledged.
        sync_dir(dir)?;
        lock(index).segments.insert(
            seg,
            Segment {
                file: head.file.clone(),
                size: head.pos,
                live: 0,
            },
        );
        Ok(head)
    }

    /// Writes at the end of the segment; durable when it returns.
    fn write(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        let end = self.pos + buf.len() as u64;
        if end > self.zeroed_until {
            let upto = end + ZERO_AHEAD;
            let zeros = vec![0u8; (upto - end) as usize];
            self.file.write_all_at(&zeros, end).map_err(storage)?;
            self.file.sync_data().map_err(storage)?;
            self.zeroed_until = upto;
        }
        self.dsync.write_all_at(buf, self.pos).map_err(storage)?;
        self.pos = end;
        Ok(())
    }
}

fn push_frame(buf: &mut Vec<u8>, kind: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[kind]);
    for p in parts {
        crc.update(p);
    }
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.extend_from_slice(&crc.finalize().to_le_bytes());
    buf.push(kind);
    for p in parts {
        buf.extend_from_slice(p);
    }
}

/// An index change that waits for its frame to be durable. Offsets are within the batch.
enum Pending {
    Message {
        id: u64,
        body: (u32, u32),
        state: (u32, u32),
        kind: DeliveryState,
        updated_at_ms: u64,
    },
    Body {
        id: u64,
        body: (u32, u32),
    },
    State {
        id: u64,
        state: (u32, u32),
        kind: DeliveryState,
        updated_at_ms: u64,
    },
    Idempotency {
        key: String,
        loc: (u32, u32),
        created_at_ms: u64,
    },
}

/// Frames of one commit and the index changes they make.
#[derive(Default)]
struct Batch {
    buf: Vec<u8>,
    pending: Vec<Pending>,
}

impl Batch {
    /// Offset and length of the last `len` bytes pushed, `back` bytes before the end.
    fn span(&self, back: usize, len: usize) -> (u32, u32) {
        ((self.buf.len() - back - len) as u32, len as u32)
    }

    fn message(&mut self, id: u64, body: &[u8], state: &[u8], kind: DeliveryState, at: u64) {
        push_frame(
            &mut self.buf,
            KIND_MESSAGE,
            &[
                &id.to_le_bytes(),
                &(state.len() as u32).to_le_bytes(),
                state,
                body,
            ],
        );
        let body_span = self.span(0, body.len());
        let state_span = self.span(body.len(), state.len());
        self.pending.push(Pending::Message {
            id,
            body: body_span,
            state: state_span,
            kind,
            updated_at_ms: at,
        });
    }

    fn body(&mut self, id: u64, body: &[u8]) {
        push_frame(&mut self.buf, KIND_BODY, &[&id.to_le_bytes(), body]);
        let body = self.span(0, body.len());
        self.pending.push(Pending::Body { id, body });
    }

    fn state(&mut self, id: u64, state: &[u8], kind: DeliveryState, at: u64) {
        push_frame(&mut self.buf, KIND_STATE, &[&id.to_le_bytes(), state]);
        let state_span = self.span(0, state.len());
        self.pending.push(Pending::State {
            id,
            state: state_span,
            kind,
            updated_at_ms: at,
        });
    }

    fn idempotency(&mut self, key: &str, record: &[u8], created_at_ms: u64) {
        let k = key.as_bytes();
        push_frame(
            &mut self.buf,
            KIND_IDEMPOTENCY,
            &[&(k.len() as u32).to_le_bytes(), k, record],
        );
        let loc = self.span(0, record.len());
        self.pending.push(Pending::Idempotency {
            key: key.to_string(),
            loc,
            created_at_ms,
        });
    }
}

struct Writer {
    dir: PathBuf,
    head: Head,
    index: Arc<Mutex<Index>>,
    overlay: Arc<Mutex<Overlay>>,
    /// Set by a failed write or sync: what is on disk is then unknown, so every later change
    /// is refused rather than acknowledged on top of it. Shared with the store, which reports
    /// it (readiness).
    broken: Arc<OnceLock<String>>,
    /// Settled after each commit, in version order.
    commits: Arc<Commits>,
    /// Tests make the next write fail as a full disk would.
    #[cfg(test)]
    fail_next: Arc<std::sync::atomic::AtomicBool>,
    max_id: u64,
    segment_bytes: u64,
    /// The buffers of the last commit, kept for the next.
    scratch: Batch,
}

impl Drop for Writer {
    fn drop(&mut self) {
        // However the writer ends (its queue closed, or a panic on its thread), what it had not
        // settled fails as Closed instead of waiting for ever.
        self.commits.close();
    }
}

/// A commit buffer larger than this (after a burst) is let go rather than kept.
const SCRATCH_KEEP: usize = 4 << 20;

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<Cmd>) {
        const MAX_BATCH: usize = 8192;
        // Group commit: everything that queued up during the previous commit goes in the next.
        // Holding commits back to make them fewer and larger was measured: no steady gain, and
        // it slows a single busy conversation, whose every commit would wait.
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
                        let n = self.compact(cutoff_ms, idem_cutoff_ms);
                        let _ = done.send(n);
                    }
                }
            }
            self.put(puts);
        }
    }

    fn put(&mut self, puts: Vec<QueuedPut>) {
        if puts.is_empty() {
            return;
        }
        // One buffer serves every commit: a fresh one of a few hundred KB per commit was paid
        // for again in allocation and page faults.
        let mut batch = std::mem::take(&mut self.scratch);
        batch.buf.clear();
        batch.pending.clear();
        let mut result = Ok(());
        for (entries, idempotency, _) in &puts {
            if let Some((key, record)) = idempotency {
                match serde_json::to_vec(record) {
                    Ok(bytes) => batch.idempotency(key, &bytes, record.created_at_ms),
                    Err(e) => result = Err(storage(e)),
                }
            }
            for e in entries {
                self.max_id = self.max_id.max(e.id);
                match &e.body {
                    Some(body) => {
                        batch.message(e.id, body, &e.state_bytes, e.state, e.updated_at_ms)
                    }
                    None => batch.state(e.id, &e.state_bytes, e.state, e.updated_at_ms),
                }
            }
        }
        if result.is_ok() {
            result = self.commit(&mut batch);
        }
        if batch.buf.capacity() <= SCRATCH_KEEP {
            self.scratch = batch;
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, commands = puts.len(), "outbox commit failed");
        }
        // Puts arrive in version order, so the last one's version settles them all.
        if let Some((_, _, up_to)) = puts.last() {
            self.commits.settle(*up_to, &result);
        }
        let mut committed = Vec::new();
        for (entries, _, _) in puts {
            committed.extend(
                entries
                    .into_iter()
                    .map(|e| (e.id, e.version, e.body.is_some())),
            );
        }
        if result.is_ok() {
            let mut ov = lock(&self.overlay);
            for (id, version, body) in committed {
                // Keep a newer version that is still on its way to disk.
                if body
                    && ov.bodies.get(&id).is_some_and(|(v, _)| *v == version)
                    && let Some((_, m)) = ov.bodies.remove(&id)
                    && !m.record.state.is_terminal()
                    && !ov.states.contains_key(&id)
                {
                    ov.states.insert(id, (version, m.record.clone()));
                }
                // The state of an unfinished message stays: its next change (the mark before
                // its delivery) needs it, and reading it back from the file cost a syscall and
                // a decode per message. Finished ones go; compaction only drops those.
                if ov
                    .states
                    .get(&id)
                    .is_some_and(|(v, s)| *v == version && s.state.is_terminal())
                {
                    ov.states.remove(&id);
                }
            }
        }
    }

    /// Writes a batch, makes it durable, then applies its index changes.
    fn commit(&mut self, batch: &mut Batch) -> Result<(), StoreError> {
        if let Some(reason) = self.broken.get() {
            return Err(storage(format!(
                "an earlier write failed ({reason}); restart the gateway"
            )));
        }
        if batch.buf.is_empty() {
            return Ok(());
        }
        if self.head.pos + batch.buf.len() as u64 > self.segment_bytes
            && self.head.pos > FRAME_HEADER as u64 + 16
        {
            self.roll()?;
        }
        let base = self.head.pos;
        if base + batch.buf.len() as u64 > u64::from(u32::MAX) {
            return Err(storage("one commit too large for a segment"));
        }
        #[cfg(test)]
        if self
            .fail_next
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            let e = storage("No space left on device (os error 28)");
            let _ = self.broken.set(e.to_string());
            return Err(e);
        }
        let written = self.head.write(&batch.buf);
        if let Err(e) = written {
            let _ = self.broken.set(e.to_string());
            return Err(e);
        }
        let seg = self.head.seg;
        let loc = |(off, len): (u32, u32)| Loc {
            seg,
            off: base as u32 + off,
            len,
        };
        let mut ix = lock(&self.index);
        if let Some(s) = ix.segments.get_mut(&seg) {
            s.size = self.head.pos;
        }
        for p in batch.pending.drain(..) {
            match p {
                Pending::Message {
                    id,
                    body,
                    state,
                    kind,
                    updated_at_ms,
                } => ix.set_message(
                    id,
                    Slot {
                        body: loc(body),
                        state: loc(state),
                        kind,
                        updated_at_ms,
                    },
                ),
                Pending::Body { id, body } => ix.set_body(id, loc(body)),
                Pending::State {
                    id,
                    state,
                    kind,
                    updated_at_ms,
                } => ix.set_state(id, loc(state), kind, updated_at_ms),
                Pending::Idempotency {
                    key,
                    loc: l,
                    created_at_ms,
                } => ix.set_idempotency(
                    key,
                    IdemSlot {
                        loc: loc(l),
                        created_at_ms,
                    },
                ),
            }
        }
        Ok(())
    }

    fn roll(&mut self) -> Result<(), StoreError> {
        let next = self.head.seg + 1;
        match Head::create(&self.dir, next, self.max_id + 1, &self.index) {
            Ok(h) => {
                self.head = h;
                Ok(())
            }
            Err(e) => {
                let _ = self.broken.set(e.to_string());
                Err(e)
            }
        }
    }

    /// Takes over the outbox of an earlier version (`outbox.redb`, see `redb_import`), then
    /// renames it `outbox.redb.imported`. Whatever the log already holds is skipped, so a crash
    /// before the rename only repeats the import, and a file written again by an older version
    /// after an upgrade (a downgrade, then an upgrade) adds only what that version accepted.
    fn import(&mut self, old: super::redb_import::Imported, path: &Path) -> Result<(), StoreError> {
        let (messages, keys): (Vec<_>, Vec<_>) = {
            let ix = lock(&self.index);
            (
                old.messages
                    .into_iter()
                    .filter(|m| !ix.messages.contains_key(&m.id))
                    .collect(),
                old.idempotency
                    .into_iter()
                    .filter(|(k, _)| !ix.idempotency.contains_key(k))
                    .collect(),
            )
        };
        for chunk in messages.chunks(4096) {
            let mut batch = Batch::default();
            for m in chunk {
                let (body, state) = (encode_body(m)?, encode_state(&m.record)?);
                batch.message(m.id, &body, &state, m.record.state, m.record.updated_at_ms);
            }
            self.commit(&mut batch)?;
        }
        let mut batch = Batch::default();
        for (key, r) in &keys {
            let bytes = serde_json::to_vec(r).map_err(storage)?;
            batch.idempotency(key, &bytes, r.created_at_ms);
        }
        self.commit(&mut batch)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let done = dir.join("outbox.redb.imported");
        std::fs::rename(path, &done)
            .map_err(|e| storage(format!("cannot rename {}: {e}", path.display())))?;
        sync_dir(dir)?;
        tracing::info!(
            messages = messages.len(),
            idempotency_keys = keys.len(),
            file = %done.display(),
            "imported the outbox of an earlier version"
        );
        Ok(())
    }

    /// Drops old delivered messages and idempotency keys, then frees the oldest segments.
    fn compact(&mut self, cutoff_ms: u64, idem_cutoff_ms: u64) -> usize {
        let dropped = {
            let mut ix = lock(&self.index);
            let old: Vec<(u64, Slot)> = ix
                .messages
                .iter()
                .filter(|(_, s)| s.kind == DeliveryState::Delivered && s.updated_at_ms < cutoff_ms)
                .map(|(id, s)| (*id, *s))
                .collect();
            for (id, s) in &old {
                ix.messages.remove(id);
                ix.live_message(s, false);
            }
            let stale: Vec<String> = ix
                .idempotency
                .iter()
                .filter(|(_, s)| s.created_at_ms < idem_cutoff_ms)
                .map(|(k, _)| k.clone())
                .collect();
            for k in stale {
                ix.remove_idempotency(&k);
            }
            old.len()
        };
        if let Err(e) = self.free_segments() {
            tracing::error!(error = %e, "outbox segment cleanup failed");
        }
        dropped
    }

    /// Deletes closed segments from the oldest on: empty ones at once, mostly dead ones after
    /// copying their live records to the head. Oldest first only: see the module doc.
    ///
    /// Only segments older than the head at the start are considered: records copied forward
    /// may fill the head and close it, and a run that went on to the segments it wrote itself
    /// could copy the same records for ever if it ever misjudged them as mostly dead.
    fn free_segments(&mut self) -> Result<(), StoreError> {
        let first_head = self.head.seg;
        loop {
            let (seg, size, live) = {
                let ix = lock(&self.index);
                match ix.segments.iter().next() {
                    Some((&seg, s)) if seg < first_head && seg != self.head.seg => {
                        (seg, s.size, s.live)
                    }
                    _ => return Ok(()),
                }
            };
            if live > 0 {
                if live * 2 > size {
                    return Ok(());
                }
                self.copy_forward(seg)?;
            }
            lock(&self.index).segments.remove(&seg);
            let path = segment_path(&self.dir, seg);
            std::fs::remove_file(&path)
                .map_err(|e| storage(format!("cannot delete {}: {e}", path.display())))?;
            tracing::debug!(segment = seg, live_bytes = live, "outbox segment freed");
        }
    }

    /// Rewrites every record of `seg` the index still points to at the head, durably.
    fn copy_forward(&mut self, seg: u32) -> Result<(), StoreError> {
        let (file, messages, keys) = {
            let ix = lock(&self.index);
            let messages: Vec<(u64, Slot)> = ix
                .messages
                .iter()
                .filter(|(_, s)| s.body.seg == seg || s.state.seg == seg)
                .map(|(id, s)| (*id, *s))
                .collect();
            let keys: Vec<(String, IdemSlot)> = ix
                .idempotency
                .iter()
                .filter(|(_, s)| s.loc.seg == seg)
                .map(|(k, s)| (k.clone(), *s))
                .collect();
            (ix.file(seg)?, messages, keys)
        };
        let mut batch = Batch::default();
        for (id, s) in messages {
            let body_here = s.body.seg == seg;
            let state_here = s.state.seg == seg;
            if body_here && state_here {
                let body = read_at(&file, s.body)?;
                let state = read_at(&file, s.state)?;
                batch.message(id, &body, &state, s.kind, s.updated_at_ms);
            } else if body_here {
                batch.body(id, &read_at(&file, s.body)?);
            } else {
                batch.state(id, &read_at(&file, s.state)?, s.kind, s.updated_at_ms);
            }
        }
        for (key, s) in keys {
            batch.idempotency(&key, &read_at(&file, s.loc)?, s.created_at_ms);
        }
        self.commit(&mut batch)
    }
}

/// Creates `dir` (and its parents) so that it survives a crash: a segment acknowledged inside
/// a directory whose own entry was never synced could vanish with it.
fn create_dir_durably(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_durably(parent)?;
    }
    std::fs::create_dir(dir)
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Ok(()),
            _ => Err(e),
        })
        .map_err(|e| storage(format!("cannot create {}: {e}", dir.display())))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    sync_dir(parent)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| storage(format!("cannot sync {}: {e}", dir.display())))
}

/// `N` bytes of `b` from `at`, if it has that many.
fn bytes_at<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// What replay learns about one message before it knows both halves.
#[derive(Default)]
struct Partial {
    body: Option<Loc>,
    state: Option<(Loc, DeliveryState, u64)>,
}

/// Reads every segment in order into a fresh index; returns it, the next id and the newest
/// segment number (0 if none).
fn replay(dir: &Path) -> Result<(Index, u64, u32), StoreError> {
    let mut segs: Vec<u32> = Vec::new();
    for entry in std::fs::read_dir(dir)
        .map_err(|e| storage(format!("cannot list {}: {e}", dir.display())))?
    {
        let entry = entry.map_err(storage)?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        segs.push(n);
    }
    segs.sort_unstable();
    let mut index = Index::default();
    let mut partial: BTreeMap<u64, Partial> = BTreeMap::new();
    let mut idem: HashMap<String, IdemSlot> = HashMap::new();
    let mut next_id = 1u64;
    for &seg in &segs {
        let path = segment_path(dir, seg);
        let file = File::options()
            .read(true)
            .open(&path)
            .map_err(|e| storage(format!("cannot open {}: {e}", path.display())))?;
        let data = std::fs::read(&path)
            .map_err(|e| storage(format!("cannot read {}: {e}", path.display())))?;
        let mut off = 0usize;
        let mut first = true;
        while off + FRAME_HEADER <= data.len() {
            let (Some(len), Some(crc), Some([kind])) = (
                bytes_at(&data, off).map(u32::from_le_bytes),
                bytes_at(&data, off + 4).map(u32::from_le_bytes),
                bytes_at::<1>(&data, off + 8),
            ) else {
                break;
            };
            let len = len as usize;
            let start = off + FRAME_HEADER;
            if kind == 0 || start + len > data.len() {
                break;
            }
            let payload = &data[start..start + len];
            let mut h = crc32fast::Hasher::new();
            h.update(&[kind]);
            h.update(payload);
            if h.finalize() != crc {
                tracing::warn!(file = %path.display(), offset = off, "outbox segment ends in a torn write; the rest of it is ignored");
                break;
            }
            if first && kind != KIND_HEADER {
                return Err(storage(format!(
                    "{} is not an outbox segment",
                    path.display()
                )));
            }
            first = false;
            let at = |from: usize, to: usize| Loc {
                seg,
                off: (start + from) as u32,
                len: (to - from) as u32,
            };
            let bad = || storage(format!("{}: bad frame at {off}", path.display()));
            let id = || bytes_at(payload, 0).map(u64::from_le_bytes).ok_or_else(bad);
            match kind {
                KIND_HEADER => {
                    if payload.get(..8) != Some(&MAGIC[..]) {
                        return Err(storage(format!(
                            "{} is not an outbox segment of this version",
                            path.display()
                        )));
                    }
                    let n = bytes_at(payload, 8)
                        .map(u64::from_le_bytes)
                        .ok_or_else(bad)?;
                    next_id = next_id.max(n);
                }
                KIND_MESSAGE => {
                    let id = id()?;
                    let slen = bytes_at(payload, 8)
                        .map(u32::from_le_bytes)
                        .ok_or_else(bad)? as usize;
                    let state_end = 12 + slen;
                    let state_bytes = payload.get(12..state_end).ok_or_else(bad)?;
                    let s: StateRecord = serde_json::from_slice(state_bytes).map_err(storage)?;
                    let p = partial.entry(id).or_default();
                    p.body = Some(at(state_end, len));
                    p.state = Some((at(12, state_end), s.state, s.updated_at_ms));
                    next_id = next_id.max(id + 1);
                }
                KIND_BODY => {
                    let id = id()?;
                    partial.entry(id).or_default().body = Some(at(8, len));
                    next_id = next_id.max(id + 1);
                }
                KIND_STATE => {
                    let id = id()?;
                    let s: StateRecord = serde_json::from_slice(&payload[8..]).map_err(storage)?;
                    partial.entry(id).or_default().state =
                        Some((at(8, len), s.state, s.updated_at_ms));
                    next_id = next_id.max(id + 1);
                }
                KIND_IDEMPOTENCY => {
                    let klen = bytes_at(payload, 0)
                        .map(u32::from_le_bytes)
                        .ok_or_else(bad)? as usize;
                    let key = payload
                        .get(4..4 + klen)
                        .and_then(|k| std::str::from_utf8(k).ok())
                        .ok_or_else(bad)?;
                    let r: IdempotencyRecord =
                        serde_json::from_slice(&payload[4 + klen..]).map_err(storage)?;
                    idem.insert(
                        key.to_string(),
                        IdemSlot {
                            loc: at(4 + klen, len),
                            created_at_ms: r.created_at_ms,
                        },
                    );
                }
                other => {
                    return Err(storage(format!(
                        "{}: unknown frame kind {other} at {off}",
                        path.display()
                    )));
                }
            }
            off = start + len;
        }
        index.segments.insert(
            seg,
            Segment {
                file: Arc::new(file),
                size: off as u64,
                live: 0,
            },
        );
    }
    for (id, p) in partial {
        // A state whose body went with a freed segment belonged to a compacted message.
        if let (Some(body), Some((state, kind, updated_at_ms))) = (p.body, p.state) {
            index.set_message(
                id,
                Slot {
                    body,
                    state,
                    kind,
                    updated_at_ms,
                },
            );
        }
    }
    for (k, s) in idem {
        index.set_idempotency(k, s);
    }
    Ok((index, next_id, segs.last().copied().unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::NativeReceipt;
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

    #[test]
    fn a_state_is_written_as_serde_writes_it_and_read_back_the_same() {
        use crate::channels::{ChannelError, FailureKind};
        let mut cases = Vec::new();
        for (i, state) in [
            DeliveryState::Accepted,
            DeliveryState::Delivering,
            DeliveryState::Delivered,
            DeliveryState::Failed,
            DeliveryState::Expired,
        ]
        .into_iter()
        .enumerate()
        {
            let mut s = StateRecord::new(state, [0, 9, 10, 1_700_000_000_123, u64::MAX][i]);
            s.attempts = [0, 1, 10, 99, u32::MAX][i];
            s.possible_duplicate = i % 2 == 1;
            cases.push(s);
        }
        let mut s = cases[2].clone();
        s.receipts = vec![
            NativeReceipt {
                native_id: "1700000000.000100".into(),
                conversation_id: "C0\"quoted\\ \u{1} é 😀".into(),
            },
            NativeReceipt::default(),
        ];
        cases.push(s);
        let mut s = cases[3].clone();
        let mut e = ChannelError::new("slack", FailureKind::Permanent, "not_in_channel \"x\"");
        e.http_status = Some(200);
        e.code = Some("not_in_channel".into());
        s.error = Some(e);
        cases.push(s);
        for s in cases {
            let ours = encode_state(&s).unwrap();
            let serde = serde_json::to_vec(&s).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&serde)
            );
            let back: StateRecord = serde_json::from_slice(&ours).unwrap();
            assert_eq!(back, s);
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
            let s = LogStore::open(dir.path(), 1 << 20).unwrap();
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
        let s = LogStore::open(dir.path(), 1 << 20).unwrap();
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
    async fn a_recorded_outcome_nobody_waits_for_is_seen_at_once_and_written() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = LogStore::open(dir.path(), 1 << 20).unwrap();
            s.append(vec![msg(1), msg(2)], None).await.unwrap();
            let mut delivered = finished(DeliveryState::Delivered, 1);
            delivered.receipts.push(NativeReceipt {
                native_id: "a1".into(),
                conversation_id: "c".into(),
            });
            s.record(1, Change::Finished(delivered.clone()));
            assert_eq!(
                s.get(1).unwrap().outcome(),
                delivered,
                "seen before it is on disk"
            );
            s.record(2, Change::Delivering { attempts: 1 });
            assert_eq!(s.get(2).unwrap().record.state, DeliveryState::Delivering);
            // Dropping the store lets the writer finish what was queued.
        }
        let s = LogStore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.get(1).unwrap().outcome().receipts[0].native_id, "a1");
        assert_eq!(s.get(1).unwrap().record.state, DeliveryState::Delivered);
        assert_eq!(s.get(2).unwrap().record.state, DeliveryState::Delivering);
        let pending: Vec<u64> = s.pending().unwrap().iter().map(|m| m.id).collect();
        assert_eq!(pending, vec![2]);
    }

    #[tokio::test]
    async fn appended_as_delivering_is_pending_and_redelivered_leaves_failed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = LogStore::open(dir.path(), 1 << 20).unwrap();
            let mut head = msg(1);
            head.record.state = DeliveryState::Delivering;
            s.append(vec![head, msg(2)], None).await.unwrap();
            let failed = finished(DeliveryState::Failed, 1);
            s.update(2, Change::Finished(failed)).await.unwrap();
            s.update(2, Change::Requeued).await.unwrap();
        }
        let s = LogStore::open(dir.path(), 1 << 20).unwrap();
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
        let s = LogStore::open(dir.path(), 1 << 20).unwrap();
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
            let s = LogStore::open(dir.path(), 1 << 20).unwrap();
            s.append(vec![msg(1), msg(2)], None).await.unwrap();
            let done = finished(DeliveryState::Delivered, 1);
            for id in [1, 2] {
                s.update(id, Change::Finished(done.clone())).await.unwrap();
            }
            assert_eq!(s.compact(u64::MAX, 0), 2);
        }
        let s = LogStore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.next_id(), 3, "the bound compaction recorded survives");
    }

    fn segments(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.join("log"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn big(id: u64, text_len: usize) -> StoredMessage {
        let mut m = msg(id);
        Arc::make_mut(&mut m.message).text = Some("x".repeat(text_len));
        m
    }

    #[tokio::test]
    async fn a_torn_last_write_is_ignored_and_never_written_after() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = LogStore::open(dir.path(), 1 << 20).unwrap();
            s.append(vec![msg(1), msg(2)], None).await.unwrap();
            s.append(vec![msg(3)], None).await.unwrap();
        }
        // Cut the last frame short, as a crash during its write would.
        let seg = dir.path().join("log").join(&segments(dir.path())[0]);
        let data = std::fs::read(&seg).unwrap();
        let end = data.iter().rposition(|b| *b != 0).unwrap() + 1;
        let mut torn = data[..end - 10].to_vec();
        torn.resize(data.len(), 0xAB);
        std::fs::write(&seg, torn).unwrap();
        {
            let s = LogStore::open(dir.path(), 1 << 20).unwrap();
            let ids: Vec<u64> = s.pending().unwrap().iter().map(|m| m.id).collect();
            assert_eq!(ids, vec![1, 2], "the torn message is not brought back");
            assert_eq!(s.next_id(), 3);
            s.append(vec![msg(3)], None).await.unwrap();
        }
        assert_eq!(
            segments(dir.path()).len(),
            2,
            "each start writes a new segment"
        );
        let s = LogStore::open(dir.path(), 1 << 20).unwrap();
        let ids: Vec<u64> = s.pending().unwrap().iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
    }

    #[tokio::test]
    async fn a_corrupt_frame_ends_its_segment_but_not_the_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = LogStore::open(dir.path(), 1 << 20).unwrap();
            s.append(vec![big(1, 100)], None).await.unwrap();
            s.append(vec![big(2, 100)], None).await.unwrap();
        }
        let seg = dir.path().join("log").join(&segments(dir.path())[0]);
        let mut data = std::fs::read(&seg).unwrap();
        // Flip a byte of the second message's text: its checksum no longer matches.
        let at = data
            .windows(100)
            .rposition(|w| w.iter().all(|b| *b == b'x'))
            .unwrap();
        data[at] = b'y';
        std::fs::write(&seg, data).unwrap();
        let s = LogStore::open(dir.path(), 1 << 20).unwrap();
        let ids: Vec<u64> = s.pending().unwrap().iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![1]);
        assert_eq!(s.get(1).unwrap().message.text.as_ref().unwrap().len(), 100);
    }

    #[tokio::test]
    async fn a_second_store_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _s = LogStore::open(dir.path(), 1 << 20).unwrap();
        let err = match LogStore::open(dir.path(), 1 << 20) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("opened twice"),
        };
        assert!(err.contains("in use by another gateway"), "{err}");
    }

    #[tokio::test]
    async fn old_segments_are_freed_oldest_first_and_live_records_move_forward() {
        let dir = tempfile::tempdir().unwrap();
        let delivered = finished(DeliveryState::Delivered, 1);
        {
            let s = LogStore::open_with(dir.path(), 4096, 1 << 20).unwrap();
            // 1 stays failed; everything after it is delivered, over many small segments.
            s.append(vec![big(1, 300)], None).await.unwrap();
            s.update(1, Change::Finished(finished(DeliveryState::Failed, 3)))
                .await
                .unwrap();
            for id in 2..60 {
                s.append(vec![big(id, 300)], None).await.unwrap();
                s.update(id, Change::Finished(delivered.clone()))
                    .await
                    .unwrap();
            }
            let before = segments(dir.path()).len();
            assert!(before > 5, "{before} segments");
            assert_eq!(s.compact(u64::MAX, u64::MAX), 58);
            let after = segments(dir.path()).len();
            assert!(
                after <= 2,
                "{before} -> {after} segments: {:?}",
                segments(dir.path())
            );
            let kept = s.get(1).unwrap();
            assert_eq!(kept.record.state, DeliveryState::Failed);
            assert_eq!(kept.message.text.as_deref().map(str::len), Some(300));
            assert!(s.get(2).is_none());
        }
        let s = LogStore::open_with(dir.path(), 4096, 1 << 20).unwrap();
        let failed: Vec<u64> = s.failed(0, 10).iter().map(|m| m.id).collect();
        assert_eq!(failed, vec![1], "the copy survives a restart");
        assert_eq!(s.get(1).unwrap().record.attempts, 3);
        assert_eq!(s.next_id(), 60);
        assert!(s.pending().unwrap().is_empty());
    }

    fn disk_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir.join("log"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    }

    /// Runs a compaction on another thread and fails the test if it does not end in time: a
    /// compaction that never ends blocks the writer, and with it every later Send.
    async fn compact_within(s: &Arc<LogStore>, cutoff_ms: u64, idem_cutoff_ms: u64) -> usize {
        let s = s.clone();
        let run = tokio::task::spawn_blocking(move || s.compact(cutoff_ms, idem_cutoff_ms));
        tokio::time::timeout(std::time::Duration::from_secs(60), run)
            .await
            .expect("compaction ended")
            .unwrap()
    }

    #[tokio::test]
    async fn compaction_of_long_idempotency_keys_terminates_and_frees_their_space() {
        const SEGMENT: u64 = 8 << 20;
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(LogStore::open_with(dir.path(), SEGMENT, 1 << 20).unwrap());
        let delivered = finished(DeliveryState::Delivered, 1);
        // 80 keys of 1 MiB: ten segments' worth of keys that are still within their window.
        for id in 1..=80u64 {
            let key = format!("{id:08}{}", "k".repeat((1 << 20) - 8));
            let record = IdempotencyRecord {
                created_at_ms: 1_000 + id,
                message_ids: vec![id],
            };
            s.append(vec![msg(id)], Some((key, record))).await.unwrap();
            s.update(id, Change::Finished(delivered.clone()))
                .await
                .unwrap();
        }
        let written = disk_bytes(dir.path());
        assert!(written > 80 << 20, "{written} bytes on disk");
        // Messages go, keys stay: their segments are live and must not be copied again and
        // again.
        assert_eq!(compact_within(&s, u64::MAX, 0).await, 80);
        let kept = disk_bytes(dir.path());
        assert!(
            kept < written + 2 * SEGMENT,
            "live keys were copied over and over: {written} -> {kept} bytes"
        );
        assert_eq!(
            s.idempotency_get(&format!("{:08}{}", 7, "k".repeat((1 << 20) - 8)))
                .unwrap()
                .message_ids,
            vec![7]
        );
        // The next Send is written, and a second run on live keys changes nothing.
        s.append(vec![msg(81)], None).await.unwrap();
        assert_eq!(compact_within(&s, 0, 0).await, 0);
        assert!(disk_bytes(dir.path()) < written + 2 * SEGMENT);
        // Once the keys expire, their space is given back.
        compact_within(&s, u64::MAX, u64::MAX).await;
        let left = disk_bytes(dir.path());
        assert!(
            left <= 2 * (SEGMENT + ZERO_AHEAD),
            "{left} bytes left after every key expired"
        );
        assert!(s.get(81).is_some());
    }

    #[tokio::test]
    async fn replay_takes_the_newest_state_when_older_segments_stay() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = LogStore::open_with(dir.path(), 2048, 1 << 20).unwrap();
            // 1 stays pending and fills most of the first segment, so it is never freed.
            s.append(vec![big(1, 1500), msg(2)], None).await.unwrap();
            // 2's final state lands in a later segment.
            for id in 3..10 {
                s.append(vec![big(id, 300)], None).await.unwrap();
            }
            s.update(2, Change::Finished(finished(DeliveryState::Delivered, 1)))
                .await
                .unwrap();
            assert!(segments(dir.path()).len() > 2);
            // 2 leaves the index; its first record stays on disk in the first segment.
            assert_eq!(s.compact(u64::MAX, 0), 1);
            assert!(segments(dir.path()).contains(&format!("{:010}.seg", 1)));
        }
        let s = LogStore::open_with(dir.path(), 2048, 1 << 20).unwrap();
        let pending: Vec<u64> = s.pending().unwrap().iter().map(|m| m.id).collect();
        assert!(
            !pending.contains(&2),
            "2 came back as accepted: {pending:?}"
        );
        assert_eq!(pending, (1..10).filter(|i| *i != 2).collect::<Vec<_>>());
    }

    /// An `outbox.redb` in `dir` as earlier versions wrote it, holding `messages`.
    fn write_old(
        dir: &Path,
        messages: &[StoredMessage],
        keys: &[(&str, serde_json::Value)],
        next_id: Option<u64>,
    ) {
        let rows: Vec<(u64, serde_json::Value, serde_json::Value)> = messages
            .iter()
            .map(|m| {
                (
                    m.id,
                    serde_json::from_slice(&encode_body(m).unwrap()).unwrap(),
                    serde_json::to_value(&m.record).unwrap(),
                )
            })
            .collect();
        super::super::redb_import::tests::write_old(&dir.join("outbox.redb"), &rows, keys, next_id);
    }

    #[tokio::test]
    async fn an_outbox_of_an_earlier_version_is_imported_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut failed_msg = big(7, 20);
        failed_msg.record = StateRecord {
            state: DeliveryState::Failed,
            attempts: 4,
            receipts: vec![],
            error: None,
            possible_duplicate: true,
            updated_at_ms: 11,
        };
        let key = serde_json::json!({"created_at_ms": 9, "message_ids": [5, 7]});
        write_old(
            dir.path(),
            &[big(5, 10), failed_msg],
            &[("bot/k", key)],
            Some(20),
        );
        {
            let s = LogStore::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(s.next_id(), 20, "past the old store's recorded bound");
            let pending: Vec<u64> = s.pending().unwrap().iter().map(|m| m.id).collect();
            assert_eq!(pending, vec![5]);
            assert_eq!(s.get(5).unwrap().message.text.as_ref().unwrap().len(), 10);
            let failed = s.failed(0, 10);
            assert_eq!(failed.len(), 1);
            assert_eq!(failed[0].record.attempts, 4);
            assert!(failed[0].record.possible_duplicate);
            assert_eq!(s.idempotency_get("bot/k").unwrap().message_ids, vec![5, 7]);
            s.update(5, Change::Delivering { attempts: 1 })
                .await
                .unwrap();
        }
        assert!(!dir.path().join("outbox.redb").exists());
        assert!(dir.path().join("outbox.redb.imported").exists());
        // A second start reads the log only.
        {
            let s = LogStore::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(s.get(5).unwrap().record.state, DeliveryState::Delivering);
            assert_eq!(s.failed(0, 10).len(), 1);
        }
        // An older version ran again on this directory (a downgrade) and wrote a new file: what
        // it accepted is added, and what the log already holds is left as the log says.
        write_old(dir.path(), &[big(5, 10), big(30, 3)], &[], None);
        let s = LogStore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.next_id(), 31);
        assert_eq!(s.get(5).unwrap().record.state, DeliveryState::Delivering);
        let pending: Vec<u64> = s.pending().unwrap().iter().map(|m| m.id).collect();
        assert_eq!(pending, vec![5, 30]);
        assert_eq!(s.idempotency_get("bot/k").unwrap().message_ids, vec![5, 7]);
        assert!(!dir.path().join("outbox.redb").exists());
    }

    #[tokio::test]
    async fn the_mark_before_delivery_needs_no_read_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = LogStore::open(dir.path(), 1 << 20).unwrap();
        s.append(vec![msg(1)], None).await.unwrap();
        // Were its state read back, it would come from this (now empty) file.
        let seg = dir.path().join("log").join(&segments(dir.path())[0]);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(0)
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
    async fn a_missing_data_directory_is_created_with_its_parents() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a").join("b");
        {
            let s = LogStore::open(&nested, 1 << 20).unwrap();
            s.append(vec![msg(1)], None).await.unwrap();
        }
        let s = LogStore::open(&nested, 1 << 20).unwrap();
        assert_eq!(s.pending().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn after_a_failed_write_nothing_more_is_acknowledged_and_the_reason_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = LogStore::open(dir.path(), 1 << 20).unwrap();
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
        let s = LogStore::open(dir.path(), 1 << 20).unwrap();
        assert!(s.failure().is_none(), "a restart starts afresh");
        let ids: Vec<u64> = s.pending().unwrap().iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![1], "only what was acknowledged");
    }
}
