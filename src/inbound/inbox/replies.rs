//! Answers to channel calls across replicas (shared inbox only).
//!
//! A channel call that waits for the bot's answer (a Slack slash command, a Teams invoke, a
//! Telegram button) is held by the replica that stored the event; the event may go to a bot
//! on another. That replica writes the answer to `inbox_replies` (`PgInbox::put_reply`) and
//! waits for its outcome; the holder, woken on `cg_inbox_reply` (or, after its listener
//! reconnected, by looking at all its rows), writes it into the channel's answer through the
//! same slot as a local answer, and records whether it was used. Owns only that hand-over: the
//! slot and the HTTP answer are the listener's.

use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot};

use super::super::listener::Answering;
use super::super::pg::PgInbox;
use super::Shared;
use crate::channels::channel::Reply;
use crate::model::Message;
use crate::storage::notify::Wake;

/// A `Reply` as stored in `inbox_replies.reply`.
#[derive(Serialize, Deserialize)]
struct Stored {
    message: Option<Message>,
    body: Option<serde_json::Value>,
    status: Option<u16>,
}

/// How often the bot's replica looks for the outcome of an answer it handed over.
const OUTCOME_POLL: Duration = Duration::from_millis(20);

/// Hands `reply` to `replica`, whose channel call for `event_id` waits until `by_ms`; resolves
/// like a local answer: whether it was written into the channel's answer.
pub(super) fn answer_elsewhere(
    pg: Arc<PgInbox>,
    event_id: u64,
    replica: Arc<str>,
    by_ms: u64,
    reply: Reply,
) -> oneshot::Receiver<Result<(), String>> {
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let _ = tx.send(hand_over(&pg, event_id, &replica, by_ms, reply).await);
    });
    rx
}

async fn hand_over(
    pg: &PgInbox,
    event_id: u64,
    replica: &str,
    by_ms: u64,
    reply: Reply,
) -> Result<(), String> {
    let stored = serde_json::to_string(&Stored {
        message: reply.message,
        body: reply.body,
        status: reply.status,
    })
    .map_err(|e| format!("cannot encode the answer: {e}"))?;
    if !pg
        .put_reply(event_id, replica, &stored)
        .await
        .map_err(|e| e.to_string())?
    {
        return Err("the event has an answer already".into());
    }
    // The holder records the outcome once the channel's answer is written, or once its
    // deadline passed; a little past `by_ms` it cannot come any more.
    let give_up = by_ms.saturating_add(2_000);
    loop {
        match pg.reply_outcome(event_id).await {
            Ok(Some(outcome)) if outcome.is_empty() => return Ok(()),
            Ok(Some(outcome)) => return Err(outcome),
            Ok(None) | Err(_) if crate::outbox::now_ms() > give_up => {
                return Err("late: the channel was given the neutral answer".into());
            }
            Ok(None) | Err(_) => tokio::time::sleep(OUTCOME_POLL).await,
        }
    }
}

/// The holder's side: writes the answers other replicas handed over into the waiting calls.
pub(super) async fn write_answers(
    weak: Weak<Shared>,
    pg: Arc<PgInbox>,
    mut wakes: broadcast::Receiver<Wake>,
) {
    loop {
        match wakes.recv().await {
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
        let Some(shared) = weak.upgrade() else { return };
        let rows = match pg.replies_for_me().await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read answers handed over by other replicas");
                continue;
            }
        };
        for (event_id, stored) in rows {
            let slot = {
                let mut st = shared.lock();
                match st.events.get_mut(&event_id).and_then(|e| e.reply.take()) {
                    Some(slot) => Some(slot),
                    None => st.replies.remove(&event_id),
                }
            };
            let pg = pg.clone();
            tokio::spawn(async move {
                let outcome = match (slot, serde_json::from_str::<Stored>(&stored)) {
                    (None, _) => "late: the channel was given the neutral answer".to_string(),
                    (Some(_), Err(e)) => format!("the answer handed over is unreadable: {e}"),
                    (Some(slot), Ok(s)) => {
                        let (used, rx) = oneshot::channel();
                        let reply = Reply {
                            message: s.message,
                            body: s.body,
                            status: s.status,
                        };
                        if crate::outbox::now_ms() > slot.by_ms
                            || slot.tx.send(Answering { reply, used }).is_err()
                        {
                            "late: the channel was given the neutral answer".to_string()
                        } else {
                            match rx.await {
                                Ok(Ok(())) => String::new(),
                                Ok(Err(why)) => why,
                                Err(_) => "the channel's call ended without the answer".into(),
                            }
                        }
                    }
                };
                if let Err(e) = pg.set_outcome(event_id, &outcome).await {
                    tracing::warn!(event_id, error = %e, "cannot record an answer's outcome");
                }
            });
        }
    }
}
