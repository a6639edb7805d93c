//! WatchDeliveries' fan-out: each state change is read back from the outbox and made into a
//! `Delivery` once, by one task, then shared with every open watcher, which only filters it.
//! Watchers are bounded by `server.max_watchers`.
//!
//! Each watcher used to read the message back itself: 1,000 unfiltered watchers made delivery
//! 17–32× slower. The task (and its subscription to the dispatcher's events, which the
//! dispatcher builds only while someone listens) lives only while a watcher is open.

use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, oneshot};
use tonic::Status;

use super::pb;
use crate::delivery::{DeliveryEvent, Dispatcher};

/// How many changes a watcher may fall behind before it is told it missed some.
const BACKLOG: usize = 4096;

/// One change, as every watcher sees it.
pub struct Change {
    pub bot_id: String,
    pub channel_id: String,
    pub conversation_id: String,
    pub delivery: pb::Delivery,
}

#[derive(Clone)]
pub enum Watched {
    Change(Arc<Change>),
    /// The fan-out itself fell behind the dispatcher and lost this many changes.
    Missed(u64),
}

pub struct Watchers {
    max: usize,
    dispatcher: Dispatcher,
    hub: Mutex<Hub>,
}

#[derive(Default)]
struct Hub {
    open: usize,
    tx: Option<broadcast::Sender<Watched>>,
    /// Ends the fan-out task when the last watcher goes.
    stop: Option<oneshot::Sender<()>>,
}

/// A watcher's place, given back when its stream is dropped.
pub struct Seat(Arc<Watchers>);

impl Drop for Seat {
    fn drop(&mut self) {
        let w = &self.0;
        let mut hub = w.hub.lock().unwrap_or_else(|p| p.into_inner());
        hub.open = hub.open.saturating_sub(1);
        w.dispatcher.metrics().watchers.set(hub.open as i64);
        if hub.open == 0 {
            hub.tx = None;
            if let Some(stop) = hub.stop.take() {
                let _ = stop.send(());
            }
        }
    }
}

impl Watchers {
    pub fn new(dispatcher: Dispatcher, max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            dispatcher,
            hub: Mutex::new(Hub::default()),
        })
    }

    /// A new watcher's changes from now on, or RESOURCE_EXHAUSTED past `server.max_watchers`.
    #[allow(clippy::result_large_err)]
    pub fn join(self: &Arc<Self>) -> Result<(broadcast::Receiver<Watched>, Seat), Status> {
        let mut hub = self.hub.lock().unwrap_or_else(|p| p.into_inner());
        if hub.open >= self.max {
            return Err(Status::resource_exhausted(format!(
                "{} WatchDeliveries streams are open, server.max_watchers; close one, or filter \
                 one stream by bot_id and share it",
                self.max
            )));
        }
        let rx = match &hub.tx {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(BACKLOG);
                let (stop_tx, stop_rx) = oneshot::channel();
                // Subscribed before this returns: no change after the call is missed.
                let events = self.dispatcher.subscribe();
                tokio::spawn(fan_out(
                    events,
                    tx.clone(),
                    stop_rx,
                    self.dispatcher.clone(),
                ));
                hub.tx = Some(tx);
                hub.stop = Some(stop_tx);
                rx
            }
        };
        hub.open += 1;
        self.dispatcher.metrics().watchers.set(hub.open as i64);
        Ok((rx, Seat(self.clone())))
    }
}

async fn fan_out(
    mut events: broadcast::Receiver<DeliveryEvent>,
    tx: broadcast::Sender<Watched>,
    mut stop: oneshot::Receiver<()>,
    dispatcher: Dispatcher,
) {
    loop {
        let ev = tokio::select! {
            _ = &mut stop => return,
            ev = events.recv() => ev,
        };
        let watched = match ev {
            Ok(ev) => {
                dispatcher.metrics().watch_reads.inc();
                let m = match dispatcher.store().get(ev.id).await {
                    Ok(Some(m)) => m,
                    Ok(None) => continue,
                    Err(e) => {
                        // The event itself still says what changed; only the record is missing.
                        tracing::warn!(error = %e, message_id = ev.id, "outbox read for a watcher failed");
                        continue;
                    }
                };
                let mut delivery = super::service::delivery_pb(&m);
                // The event is the truth of this change; the record may be newer already.
                delivery.state = super::service::state_pb(ev.outcome.state) as i32;
                Watched::Change(Arc::new(Change {
                    bot_id: ev.bot_id,
                    channel_id: ev.channel_id,
                    conversation_id: ev.conversation_id,
                    delivery,
                }))
            }
            Err(broadcast::error::RecvError::Lagged(n)) => Watched::Missed(n),
            Err(broadcast::error::RecvError::Closed) => return,
        };
        // No receiver left: the last watcher is going, and `stop` follows.
        let _ = tx.send(watched);
    }
}
