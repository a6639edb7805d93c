//! Wake-ups between replicas without hot polling: after an append commits, the replica that
//! accepted it says which partitions have new work (`NOTIFY cg_outbox`), and the replica that
//! owns them hears it on a connection of its own (`LISTEN`).
//!
//! Owns the `cg_outbox` channel's payload format (partition numbers, comma-separated) and the
//! listening connection. The NOTIFY is sent outside the append's transaction, on purpose: a
//! NOTIFY inside a transaction takes a database-wide lock at commit, which would serialise every
//! replica's commits. Notifications are coalesced: whatever partitions are queued while one
//! NOTIFY is on its way go out together in the next. A notification can be lost (a connection
//! dropped between commit and NOTIFY, a listener reconnecting); the listener then wakes every
//! partition once, and the owners' slow poll is the safety net for the rest.
//!
//! Knows nothing of messages: a wake-up only says "look at this partition again".

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{broadcast, mpsc};
use tokio_postgres::AsyncMessage;

use super::postgres::{PgError, Pool, PostgresConfig, describe, get};

/// The channel every replica listens on.
pub const CHANNEL: &str = "cg_outbox";

/// What a listener hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// These partitions have new work.
    Partitions(Vec<u32>),
    /// Notifications may have been missed (the listener just (re)connected): look at all.
    All,
}

/// Sends coalesced notifications from a task of its own.
#[derive(Clone)]
pub struct Notifier {
    tx: mpsc::UnboundedSender<u32>,
}

impl Notifier {
    pub fn start(pool: Pool) -> Notifier {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(notify_loop(pool, rx));
        Notifier { tx }
    }

    /// Partition `p` has new work (called after the commit that stored it).
    pub fn wake(&self, partition: u32) {
        let _ = self.tx.send(partition);
    }
}

/// Longest payload sent: PostgreSQL's limit is 8000 bytes; 256 partitions take at most ~1 KB.
const MAX_PAYLOAD: usize = 7000;

async fn notify_loop(pool: Pool, mut rx: mpsc::UnboundedReceiver<u32>) {
    while let Some(first) = rx.recv().await {
        let mut parts = BTreeSet::from([first]);
        while let Ok(p) = rx.try_recv() {
            parts.insert(p);
        }
        let mut payload = String::new();
        for p in parts {
            if payload.len() > MAX_PAYLOAD {
                break;
            }
            if !payload.is_empty() {
                payload.push(',');
            }
            payload.push_str(&p.to_string());
        }
        let sent = async {
            let client = get(&pool).await?;
            client
                .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
                .await
                .map_err(|e| PgError::query("notifying other replicas", &e))
        };
        if let Err(e) = sent.await {
            // The owners' slow poll finds the work anyway; only the wake-up is late.
            tracing::debug!(error = %e, "outbox wake-up not sent");
        }
    }
}

/// Parses a payload; anything that is not a partition number is ignored (another version's
/// format, or a stray NOTIFY by hand).
pub fn parse(payload: &str, partitions: u32) -> Vec<u32> {
    payload
        .split(',')
        .filter_map(|s| s.trim().parse::<u32>().ok())
        .filter(|p| *p < partitions)
        .collect()
}

/// Listens on its own connection, reconnecting with backoff; every (re)connection first says
/// `Wake::All`. Subscribers get wake-ups on a broadcast channel (a lagging one gets `All`).
pub struct Listener {
    tx: broadcast::Sender<Wake>,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    pub fn start(config: &PostgresConfig, partitions: u32) -> Result<Listener, PgError> {
        Self::start_on(config, CHANNEL, partitions)
    }

    /// Listens on another channel than the outbox's; its notifications say `Wake::All` (the
    /// shared inbox's say "new events", nothing more).
    pub fn start_on(
        config: &PostgresConfig,
        channel: &'static str,
        partitions: u32,
    ) -> Result<Listener, PgError> {
        let pg = config.client_config().map_err(PgError::Config)?;
        let (tx, _) = broadcast::channel(1024);
        let task = tokio::spawn(listen_loop(pg, tx.clone(), channel, partitions));
        Ok(Listener { tx, task })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Wake> {
        self.tx.subscribe()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn listen_loop(
    pg: tokio_postgres::Config,
    tx: broadcast::Sender<Wake>,
    channel: &'static str,
    partitions: u32,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match pg.connect(tokio_postgres::NoTls).await {
            Ok((client, mut conn)) => {
                // The connection's messages (notifications among them) come out of polling it.
                let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
                let sql = format!("LISTEN {channel}");
                let listening = {
                    // LISTEN completes only while the connection is polled.
                    let mut listen = std::pin::pin!(client.batch_execute(&sql));
                    loop {
                        tokio::select! {
                            r = &mut listen => break r.map_err(|e| describe(&e)),
                            m = messages.next() => if m.is_none() {
                                break Err("the connection closed".to_string());
                            },
                        }
                    }
                };
                match listening {
                    Ok(()) => {
                        backoff = Duration::from_millis(100);
                        let _ = tx.send(Wake::All);
                        while let Some(m) = messages.next().await {
                            match m {
                                Ok(AsyncMessage::Notification(n))
                                    if n.channel() == channel && channel != CHANNEL =>
                                {
                                    let _ = tx.send(Wake::All);
                                }
                                Ok(AsyncMessage::Notification(n)) if n.channel() == channel => {
                                    let parts = parse(n.payload(), partitions);
                                    if !parts.is_empty() {
                                        let _ = tx.send(Wake::Partitions(parts));
                                    }
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    tracing::warn!(error = %describe(&e), "outbox listener connection failed");
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "outbox listener could not LISTEN"),
                }
            }
            Err(e) => tracing::warn!(error = %describe(&e), "outbox listener cannot connect"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_partition_numbers_and_nothing_else() {
        assert_eq!(parse("1,2,255", 256), vec![1, 2, 255]);
        assert_eq!(parse("1, x,256,-1,,7", 256), vec![1, 7]);
        assert!(parse("", 256).is_empty());
    }
}
