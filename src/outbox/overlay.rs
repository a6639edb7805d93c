//! What a durable store's readers must see before its writer has committed it: bodies just
//! appended, and the newest state of each message until that state is on disk (for an
//! unfinished message, until it finishes, so its next change needs no read). Shared by the
//! SQLite and PostgreSQL stores.
//!
//! Owns the versions changes are queued under (the writer settles them in that order) and the
//! rule for letting go of an entry once its version is committed. Knows nothing of engines or
//! of how a change is written.

use std::collections::HashMap;
use std::sync::Arc;

use super::{StateRecord, StoredMessage};

#[derive(Default)]
pub(super) struct Overlay {
    version: u64,
    /// Bodies appended or moved and not yet committed (their state as of that moment inside).
    pub bodies: HashMap<u64, (u64, Arc<StoredMessage>)>,
    /// The newest state of a message, until the writer committed that very version and, for
    /// an unfinished message, until it finishes.
    pub states: HashMap<u64, (u64, StateRecord)>,
}

impl Overlay {
    /// The newest state known here, if any.
    pub fn state(&self, id: u64) -> Option<StateRecord> {
        match self.states.get(&id) {
            Some((_, s)) => Some(s.clone()),
            None => self.bodies.get(&id).map(|(_, m)| m.record.clone()),
        }
    }

    pub fn next_version(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    /// A whole message queued (appended, or moved by a proactive start): its version.
    pub fn put_body(&mut self, m: Arc<StoredMessage>) -> u64 {
        let version = self.next_version();
        self.states.remove(&m.id);
        self.bodies.insert(m.id, (version, m));
        version
    }

    /// A new state queued: its version.
    pub fn put_state(&mut self, id: u64, state: StateRecord) -> u64 {
        let version = self.next_version();
        self.states.insert(id, (version, state));
        version
    }

    /// The change of message `id` queued as `version` is on disk: a body goes (reads find it in
    /// the file), its state stays while the message is unfinished, and a finished state goes.
    /// A newer version still on its way is kept.
    pub fn committed(&mut self, id: u64, version: u64, body: bool) {
        if body
            && self.bodies.get(&id).is_some_and(|(v, _)| *v == version)
            && let Some((_, m)) = self.bodies.remove(&id)
            && !m.record.state.is_terminal()
            && !self.states.contains_key(&id)
        {
            self.states.insert(id, (version, m.record.clone()));
        }
        if self
            .states
            .get(&id)
            .is_some_and(|(v, s)| *v == version && s.state.is_terminal())
        {
            self.states.remove(&id);
        }
    }
}
