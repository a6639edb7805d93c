//! What both durable engines (SQLite, PostgreSQL) write alike: the state words, a message's
//! body as JSON, a state record from its columns, and their errors.
//!
//! Owns the format of the `outbox_*` tables' values, which the two engines share so an
//! operator reads both alike; knows nothing of connections, commits or overlays.

use std::sync::{Arc, Mutex, MutexGuard};

use super::{DeliveryState, StateRecord, StoreError, StoredMessage};
use crate::channels::{ChannelError, NativeReceipt};

pub(super) fn storage(e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(crate::bounded::cap(&e.to_string(), 300).into_owned())
}

/// States are stored as the words the API uses, so a shell shows them as they are.
pub(super) fn state_word(s: DeliveryState) -> &'static str {
    match s {
        DeliveryState::Accepted => "accepted",
        DeliveryState::Delivering => "delivering",
        DeliveryState::Delivered => "delivered",
        DeliveryState::Failed => "failed",
        DeliveryState::Expired => "expired",
    }
}

pub(super) fn parse_state(s: &str) -> Result<DeliveryState, StoreError> {
    Ok(match s {
        "accepted" => DeliveryState::Accepted,
        "delivering" => DeliveryState::Delivering,
        "delivered" => DeliveryState::Delivered,
        "failed" => DeliveryState::Failed,
        "expired" => DeliveryState::Expired,
        other => {
            return Err(storage(format!(
                "unknown state {:?} in the outbox",
                crate::bounded::cap(other, 40)
            )));
        }
    })
}

#[derive(serde::Serialize)]
struct BodyRef<'a> {
    message: &'a crate::model::Message,
    proactive: &'a Option<Arc<crate::model::ProactiveOptions>>,
    warnings: &'a [crate::model::Warning],
    /// Left out for a message to send: bodies stored before operations existed read the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    op: &'a Option<super::Operation>,
}

/// A message's body as stored (`outbox_bodies.body`).
#[derive(serde::Deserialize)]
pub(super) struct Body {
    pub message: crate::model::Message,
    pub proactive: Option<Arc<crate::model::ProactiveOptions>>,
    #[serde(default)]
    pub warnings: Vec<crate::model::Warning>,
    #[serde(default)]
    pub op: Option<super::Operation>,
}

pub(super) fn encode_body(m: &StoredMessage) -> Result<String, StoreError> {
    serde_json::to_string(&BodyRef {
        message: &m.message,
        proactive: &m.proactive,
        warnings: &m.warnings,
        op: &m.op,
    })
    .map_err(storage)
}

/// Encodes each message's body, on the caller's thread (not the writer's): the messages, shared,
/// with their JSON.
pub(super) fn encode_bodies(
    messages: Vec<StoredMessage>,
) -> Result<Vec<(Arc<StoredMessage>, String)>, StoreError> {
    messages
        .into_iter()
        .map(|m| {
            let json = encode_body(&m)?;
            Ok((Arc::new(m), json))
        })
        .collect()
}

pub(super) fn decode_body(json: &str) -> Result<Body, StoreError> {
    serde_json::from_str(json).map_err(storage)
}

/// A state record from its columns; a value no gateway wrote is an error, never a panic.
pub(super) fn record_from(
    state: &str,
    attempts: i64,
    possible_duplicate: bool,
    receipts: Option<&str>,
    error: Option<&str>,
    updated_at_ms: i64,
) -> Result<StateRecord, StoreError> {
    let receipts: Vec<NativeReceipt> = match receipts {
        Some(r) => serde_json::from_str(r).map_err(storage)?,
        None => Vec::new(),
    };
    let error: Option<ChannelError> = match error {
        Some(e) => Some(serde_json::from_str(e).map_err(storage)?),
        None => None,
    };
    Ok(StateRecord {
        state: parse_state(state)?,
        attempts: attempts.clamp(0, i64::from(u32::MAX)) as u32,
        receipts,
        error,
        possible_duplicate,
        updated_at_ms: u64::try_from(updated_at_ms).unwrap_or_default(),
    })
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change under these locks is a set of inserts and removes; a panic elsewhere cannot
    // leave a half-written value, so recover the guard.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
