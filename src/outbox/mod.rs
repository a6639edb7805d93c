//! The store of accepted messages, behind a trait so a durable backend can replace the in-memory one.
//!
//! Owns delivery records (state, attempts, receipts, last error). Knows nothing of channels'
//! JSON or of gRPC. The in-memory store loses everything on a crash; durability is a later backend.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use crate::channels::{ChannelError, NativeReceipt};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    Accepted,
    Delivering,
    Delivered,
    Failed,
    Expired,
}

impl DeliveryState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Delivered | Self::Failed | Self::Expired)
    }
}

/// What happened to one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub state: DeliveryState,
    pub receipts: Vec<NativeReceipt>,
    pub error: Option<ChannelError>,
    pub attempts: u32,
    pub possible_duplicate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    pub id: String,
    /// `channel/bot/conversation`.
    pub conversation: String,
    pub seq: u64,
    pub accepted_at: SystemTime,
    pub state: DeliveryState,
    pub outcome: Option<Outcome>,
}

pub trait Store: Send + Sync + 'static {
    /// Records an accepted message; called before the caller is acknowledged.
    fn accepted(&self, record: Record);
    fn delivering(&self, id: &str);
    fn finished(&self, id: &str, outcome: Outcome);
    fn get(&self, id: &str) -> Option<Record>;
    /// Messages accepted and not yet finished, oldest first per conversation.
    fn undelivered(&self) -> Vec<Record>;
}

/// Keeps unfinished records, and the most recent finished ones up to a bound.
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
    keep_finished: usize,
}

#[derive(Default)]
struct MemoryInner {
    records: HashMap<String, Record>,
    finished_order: VecDeque<String>,
}

impl MemoryStore {
    pub fn new(keep_finished: usize) -> Self {
        Self {
            inner: Mutex::new(MemoryInner::default()),
            keep_finished,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut MemoryInner) -> T) -> T {
        // A panic elsewhere while holding the lock leaves records that are still consistent
        // (each update is one assignment), so recover the guard rather than poison the gateway.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }
}

impl Store for MemoryStore {
    fn accepted(&self, record: Record) {
        self.with(|s| {
            s.records.insert(record.id.clone(), record);
        })
    }

    fn delivering(&self, id: &str) {
        self.with(|s| {
            if let Some(r) = s.records.get_mut(id) {
                r.state = DeliveryState::Delivering;
            }
        })
    }

    fn finished(&self, id: &str, outcome: Outcome) {
        let keep = self.keep_finished;
        self.with(|s| {
            if let Some(r) = s.records.get_mut(id) {
                r.state = outcome.state;
                r.outcome = Some(outcome);
                s.finished_order.push_back(id.to_string());
            }
            while s.finished_order.len() > keep {
                if let Some(old) = s.finished_order.pop_front() {
                    s.records.remove(&old);
                }
            }
        })
    }

    fn get(&self, id: &str) -> Option<Record> {
        self.with(|s| s.records.get(id).cloned())
    }

    fn undelivered(&self) -> Vec<Record> {
        self.with(|s| {
            let mut v: Vec<Record> = s
                .records
                .values()
                .filter(|r| !r.state.is_terminal())
                .cloned()
                .collect();
            v.sort_by(|a, b| (&a.conversation, a.seq).cmp(&(&b.conversation, b.seq)));
            v
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, seq: u64) -> Record {
        Record {
            id: id.into(),
            conversation: "c".into(),
            seq,
            accepted_at: SystemTime::now(),
            state: DeliveryState::Accepted,
            outcome: None,
        }
    }

    #[test]
    fn finished_records_are_bounded_and_unfinished_kept() {
        let s = MemoryStore::new(2);
        for i in 0..5 {
            s.accepted(rec(&format!("m{i}"), i));
        }
        let done = Outcome {
            state: DeliveryState::Delivered,
            receipts: vec![],
            error: None,
            attempts: 1,
            possible_duplicate: false,
        };
        for i in 0..3 {
            s.finished(&format!("m{i}"), done.clone());
        }
        assert!(s.get("m0").is_none(), "oldest finished record is dropped");
        assert_eq!(s.get("m2").unwrap().state, DeliveryState::Delivered);
        let pending: Vec<u64> = s.undelivered().iter().map(|r| r.seq).collect();
        assert_eq!(pending, vec![3, 4]);
    }
}
