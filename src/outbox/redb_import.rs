//! Reads an outbox written by earlier versions (redb, `data_dir/outbox.redb`) so the log store
//! can take over its messages at the first start after an upgrade.
//!
//! Owns only the old file's table layout; never writes to it. The log store decides when to
//! import and renames the file once its contents are durable in the log.

use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{IdempotencyRecord, StoreError, StoredMessage};

const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");
const STATES: TableDefinition<u64, &[u8]> = TableDefinition::new("states");
const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Everything an old outbox held.
pub(super) struct Imported {
    pub messages: Vec<StoredMessage>,
    pub idempotency: Vec<(String, IdempotencyRecord)>,
    pub next_id: u64,
}

fn err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(format!("cannot import {}: {e}", path.display()))
}

/// Reads every message (with its state) and idempotency key of the old file. Bodies and
/// states were stored as the same JSON the log keeps, so they decode alike.
pub(super) fn read(path: &Path, cache_bytes: usize) -> Result<Imported, StoreError> {
    let db = redb::Builder::new()
        .set_cache_size(cache_bytes)
        .open(path)
        .map_err(|e| err(path, e))?;
    let txn = db.begin_read().map_err(|e| err(path, e))?;
    let mut out = Imported {
        messages: Vec::new(),
        idempotency: Vec::new(),
        next_id: 1,
    };
    match txn.open_table(MESSAGES) {
        Ok(messages) => {
            let states = txn.open_table(STATES).map_err(|e| err(path, e))?;
            for entry in messages.iter().map_err(|e| err(path, e))? {
                let (id, body) = entry.map_err(|e| err(path, e))?;
                let id = id.value();
                out.next_id = out.next_id.max(id + 1);
                // A body without a state was never written by the old store; skip, not fail.
                let Some(state) = states.get(id).map_err(|e| err(path, e))? else {
                    continue;
                };
                out.messages
                    .push(super::log::decode(id, body.value(), state.value())?);
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(err(path, e)),
    }
    match txn.open_table(IDEMPOTENCY) {
        Ok(t) => {
            for entry in t.iter().map_err(|e| err(path, e))? {
                let (k, v) = entry.map_err(|e| err(path, e))?;
                let r: IdempotencyRecord =
                    serde_json::from_slice(v.value()).map_err(|e| err(path, e))?;
                out.idempotency.push((k.value().to_string(), r));
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(err(path, e)),
    }
    match txn.open_table(META) {
        Ok(t) => {
            if let Some(v) = t.get("next_id").map_err(|e| err(path, e))? {
                out.next_id = out.next_id.max(v.value());
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(err(path, e)),
    }
    Ok(out)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Writes an outbox the way earlier versions did, for the import tests.
    pub(in crate::outbox) fn write_old(
        path: &Path,
        messages: &[(u64, serde_json::Value, serde_json::Value)],
        idempotency: &[(&str, serde_json::Value)],
        next_id: Option<u64>,
    ) {
        let db = redb::Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut m = txn.open_table(MESSAGES).unwrap();
            let mut s = txn.open_table(STATES).unwrap();
            for (id, body, state) in messages {
                m.insert(*id, serde_json::to_vec(body).unwrap().as_slice())
                    .unwrap();
                s.insert(*id, serde_json::to_vec(state).unwrap().as_slice())
                    .unwrap();
            }
            let mut i = txn.open_table(IDEMPOTENCY).unwrap();
            for (k, r) in idempotency {
                i.insert(*k, serde_json::to_vec(r).unwrap().as_slice())
                    .unwrap();
            }
            let mut meta = txn.open_table(META).unwrap();
            if let Some(n) = next_id {
                meta.insert("next_id", n).unwrap();
            }
        }
        txn.commit().unwrap();
    }
}
