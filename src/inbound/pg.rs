//! The inbox's durable half when replicas share one PostgreSQL: received events, their
//! per-group deliveries, the dedupe keys, the consumer groups, and which replica holds which
//! conversation of a group (`inbox_claims`).
//!
//! Owns the SQL of the shared inbox and the writer task that commits acks, attempt counts and
//! claim releases in order. Knows nothing of streams, credits or deadlines: the inbox
//! (`inbox.rs` and its `claims` driver) decides those. The tables mirror the SQLite file's
//! (`store.rs`), plus:
//! - `inbox_deliveries.seq`: the event's position in commit order, as the outbox numbers its
//!   rows (`crate::outbox::PostgresStore`): its transaction's id (`xid8`), then its place in the
//!   transaction. A reader takes as read everything up to `pg_snapshot_xmin` of its snapshot,
//!   so a conversation's holder never later finds an earlier event of it committed;
//! - `inbox_claims`: one row per (group, conversation) that a replica holds, with an expiry on
//!   the database's clock. Only the holder hands the conversation's events to its streams; it
//!   renews its rows, and gives a conversation up once it has nothing left, or when none of its
//!   streams matches it any more, so a stream on another replica can take it;
//! - `inbox_replies`: a bot's answer to an event whose channel call waits on another replica
//!   (`reply_replica`): the bot's replica writes it and says so on `cg_inbox_reply`, the
//!   waiting replica writes it into the channel's answer and records the outcome in the row;
//! - event ids come from one sequence (`cg_inbox_event_id`), started at the time in
//!   microseconds like the SQLite file's, so they are unique across replicas.
//!
//! Acks are not fenced: an ack says a bot has the event, whoever handed it out, and deleting a
//! delivery twice changes nothing.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot};

use super::store::{InboxStoreError, NewEvent};
use crate::storage::postgres::{PgError, Pool, get};

/// The tables, as a migration's SQL (`crate::storage::postgres::MIGRATIONS`).
pub const MIGRATION_SQL: &str = "
CREATE TABLE inbox_events (
    id BIGINT PRIMARY KEY,
    channel TEXT NOT NULL,
    bot_id TEXT NOT NULL,
    conversation TEXT NOT NULL,
    received_at_ms BIGINT NOT NULL,
    reply_by_ms BIGINT,
    reply_replica TEXT,
    body BYTEA NOT NULL
);
CREATE INDEX inbox_events_received ON inbox_events (received_at_ms);
CREATE TABLE inbox_deliveries (
    grp TEXT NOT NULL,
    event_id BIGINT NOT NULL,
    conversation TEXT NOT NULL,
    channel TEXT NOT NULL,
    bot_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (event_id, grp)
);
CREATE INDEX inbox_deliveries_seq ON inbox_deliveries (seq);
CREATE INDEX inbox_deliveries_conversation ON inbox_deliveries (grp, conversation, seq);
CREATE TABLE inbox_dedupe (
    channel TEXT NOT NULL,
    key TEXT NOT NULL,
    seen_at_ms BIGINT NOT NULL,
    PRIMARY KEY (channel, key)
);
CREATE INDEX inbox_dedupe_seen ON inbox_dedupe (seen_at_ms);
CREATE TABLE inbox_groups (
    name TEXT PRIMARY KEY,
    created_at_ms BIGINT NOT NULL,
    seen_at_ms BIGINT NOT NULL
);
INSERT INTO inbox_groups (name, created_at_ms, seen_at_ms)
    VALUES ('default', (extract(epoch FROM now()) * 1000)::int8, (extract(epoch FROM now()) * 1000)::int8);
CREATE TABLE inbox_claims (
    grp TEXT NOT NULL,
    conversation TEXT NOT NULL,
    replica TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    until TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (grp, conversation)
);
CREATE INDEX inbox_claims_replica ON inbox_claims (replica);
CREATE TABLE inbox_replies (
    event_id BIGINT PRIMARY KEY,
    replica TEXT NOT NULL,
    reply TEXT NOT NULL,
    outcome TEXT,
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX inbox_replies_replica ON inbox_replies (replica) WHERE outcome IS NULL;
CREATE SEQUENCE cg_inbox_event_id;
SELECT setval('cg_inbox_event_id', (extract(epoch FROM clock_timestamp()) * 1000000)::int8);
COMMENT ON TABLE inbox_events IS
    'channel-gateway: received events not yet acked by every consumer group';
";

/// The channel replicas say "new events" on, after an append commits.
pub const CHANNEL: &str = "cg_inbox";

/// The channel a replica says "a bot answered an event whose call waits elsewhere" on.
pub const REPLY_CHANNEL: &str = "cg_inbox_reply";

/// Rows a feed or load reads at once; a larger backlog is read in several.
pub const READ_LIMIT: i64 = 1000;

/// Operations one writer transaction carries at most.
const MAX_OPS_PER_COMMIT: usize = 4096;

/// One delivery as read: an event for one group, with where it stands in commit order.
#[derive(Debug, Clone)]
pub struct Row {
    pub group: Arc<str>,
    pub conversation: Arc<str>,
    pub seq: i64,
    pub attempts: u32,
    pub id: u64,
    pub channel: String,
    pub bot_id: String,
    pub received_at_ms: u64,
    pub reply_by_ms: Option<u64>,
    /// The replica whose channel call waits for the bot's answer.
    pub reply_replica: Option<Arc<str>>,
    pub body: Bytes,
}

/// A conversation just claimed, and whether another replica held it before (its lease ran
/// out rather than being given up: what it had out may have reached a bot).
#[derive(Debug, Clone)]
pub struct Claimed {
    pub conversation: Arc<str>,
    pub taken_over: bool,
}

/// What the stream asking for conversations accepts (`None`: anything).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Filter {
    pub bots: Option<Vec<String>>,
    pub channels: Option<Vec<String>>,
}

/// What one housekeeping round removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// Deliveries past the retention that nobody held, per channel.
    pub expired: Vec<(String, u64)>,
    /// Consumer groups no replica had a stream for within `group_idle`.
    pub groups_removed: u64,
}

enum Op {
    Ack {
        group: Arc<str>,
        id: u64,
    },
    Attempt {
        group: Arc<str>,
        id: u64,
        attempts: u32,
    },
    /// Gives a conversation up: with `force`, whatever is left; else only if nothing is left
    /// (an event committed meanwhile keeps it). Answers whether the row went.
    Release {
        group: Arc<str>,
        conversation: Arc<str>,
        force: bool,
        done: oneshot::Sender<bool>,
    },
    /// Answers once everything queued before it is committed.
    Flush {
        done: oneshot::Sender<()>,
    },
}

/// The shared inbox's handle. Cheap to share (`Arc`).
pub struct PgInbox {
    pool: Pool,
    replica: String,
    writer: mpsc::UnboundedSender<Op>,
    notifier: mpsc::UnboundedSender<()>,
    /// Woken after this replica stored events (the feed reads them without waiting for the
    /// database's notification).
    pub(super) stored: Notify,
    /// Events and bytes in the shared inbox, as last counted plus what this replica stored
    /// since: what `inbound.max_events` and `max_bytes` are checked against.
    events: AtomicU64,
    bytes: AtomicU64,
}

fn storage(e: PgError) -> InboxStoreError {
    InboxStoreError::Storage(crate::bounded::cap(&e.to_string(), 300).into_owned())
}

fn query(context: &'static str) -> impl Fn(tokio_postgres::Error) -> InboxStoreError {
    move |e| storage(PgError::query(context, &e))
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64().min(86_400.0 * 365.0)
}

impl PgInbox {
    /// The handle, with its writer and notifier tasks started on the current runtime. The
    /// schema is the outbox's to migrate (it opens first).
    pub fn start(pool: Pool, replica: String) -> Arc<Self> {
        let (writer, rx) = mpsc::unbounded_channel();
        let (notifier, nrx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(pool.clone(), replica.clone(), rx));
        tokio::spawn(notify_loop(pool.clone(), nrx));
        Arc::new(PgInbox {
            pool,
            replica,
            writer,
            notifier,
            stored: Notify::new(),
            events: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        })
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Events and bytes in the shared inbox (last count plus this replica's appends since).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.events.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    /// Stores events in one transaction, leaving out a channel retry of a stored event (by
    /// channel and dedupe key, whichever replica stored it); the id of each new event, `None`
    /// for a retry. Every consumer group visible when the deliveries are inserted gets a
    /// delivery of each (a group committed later gets the events stored after it).
    /// `reply_by` is, per event, until when its channel call waits for the bot's answer.
    pub async fn append(
        &self,
        events: &[NewEvent],
        reply_by: &[Option<u64>],
    ) -> Result<Vec<Option<u64>>, InboxStoreError> {
        let mut client = get(&self.pool).await.map_err(storage)?;
        let tx = client
            .transaction()
            .await
            .map_err(query("beginning an inbox append"))?;
        let channels: Vec<&str> = events.iter().map(|e| e.channel.as_str()).collect();
        let keys: Vec<&str> = events.iter().map(|e| e.dedupe_key.as_str()).collect();
        let now = ms(crate::outbox::now_ms());
        let rows = tx
            .query(
                "INSERT INTO inbox_dedupe (channel, key, seen_at_ms) \
                 SELECT u.c, u.k, $3 FROM unnest($1::text[], $2::text[]) AS u(c, k) \
                 ON CONFLICT DO NOTHING RETURNING channel, key",
                &[&channels, &keys, &now],
            )
            .await
            .map_err(query("storing inbox dedupe keys"))?;
        let mut fresh: HashSet<(String, String)> = rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect();
        // The first of two events with one key in a batch is the one stored.
        let picked: Vec<bool> = events
            .iter()
            .map(|e| fresh.remove(&(e.channel.clone(), e.dedupe_key.clone())))
            .collect();
        let n = picked.iter().filter(|p| **p).count();
        let mut out = vec![None; events.len()];
        if n > 0 {
            let rows = tx
                .query(
                    "SELECT nextval('cg_inbox_event_id') FROM generate_series(1, $1::int4)",
                    &[&(i32::try_from(n).unwrap_or(i32::MAX))],
                )
                .await
                .map_err(query("numbering inbox events"))?;
            let mut ids = rows.iter().map(|r| r.get::<_, i64>(0));
            let mut cols = Columns::default();
            for (i, e) in events.iter().enumerate() {
                if !picked[i] {
                    continue;
                }
                let Some(id) = ids.next() else { break };
                out[i] = Some(id as u64);
                cols.push(
                    id,
                    e,
                    reply_by.get(i).copied().flatten(),
                    cols.ids.len() as i64,
                );
            }
            tx.execute(
                "INSERT INTO inbox_events (id, channel, bot_id, conversation, received_at_ms, \
                 reply_by_ms, reply_replica, body) \
                 SELECT u.id, u.channel, u.bot, u.conv, u.received, u.by, \
                 CASE WHEN u.by IS NULL THEN NULL ELSE $8 END, u.body \
                 FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::int8[], \
                 $6::int8[], $7::bytea[]) AS u(id, channel, bot, conv, received, by, body)",
                &[
                    &cols.ids,
                    &cols.channels,
                    &cols.bots,
                    &cols.convs,
                    &cols.received,
                    &cols.reply_by,
                    &cols.bodies,
                    &self.replica,
                ],
            )
            .await
            .map_err(query("storing inbox events"))?;
            tx.execute(
                "INSERT INTO inbox_deliveries (grp, event_id, conversation, channel, bot_id, seq) \
                 SELECT g.name, u.id, u.conv, u.channel, u.bot, \
                 (pg_current_xact_id()::text::int8 << 24) + u.ord \
                 FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::int8[]) \
                 AS u(id, channel, bot, conv, ord) CROSS JOIN inbox_groups g",
                &[
                    &cols.ids,
                    &cols.channels,
                    &cols.bots,
                    &cols.convs,
                    &cols.ords,
                ],
            )
            .await
            .map_err(query("storing inbox deliveries"))?;
            let bytes: usize = cols.bodies.iter().map(|b| b.len()).sum();
            self.events.fetch_add(n as u64, Ordering::Relaxed);
            self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        }
        tx.commit()
            .await
            .map_err(query("committing an inbox append"))?;
        if n > 0 {
            self.stored.notify_one();
            let _ = self.notifier.send(());
        }
        Ok(out)
    }

    /// Creates a consumer group (no-op when it exists): events stored after this commit get a
    /// delivery for it.
    pub async fn add_group(&self, name: &str) -> Result<(), InboxStoreError> {
        let client = get(&self.pool).await.map_err(storage)?;
        let now = ms(crate::outbox::now_ms());
        client
            .execute(
                "INSERT INTO inbox_groups (name, created_at_ms, seen_at_ms) VALUES ($1, $2, $2) \
                 ON CONFLICT (name) DO UPDATE SET seen_at_ms = excluded.seen_at_ms",
                &[&name, &now],
            )
            .await
            .map_err(query("creating a consumer group"))?;
        Ok(())
    }

    /// Whether `name` exists, and how many groups there are.
    pub async fn groups(&self, name: &str) -> Result<(bool, usize), InboxStoreError> {
        let client = get(&self.pool).await.map_err(storage)?;
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM inbox_groups WHERE name = $1), \
                 (SELECT count(*) FROM inbox_groups)",
                &[&name],
            )
            .await
            .map_err(query("reading consumer groups"))?;
        Ok((row.get(0), row.get::<_, i64>(1).max(0) as usize))
    }

    /// A group acked an event (queued; committed in order with what came before).
    pub fn ack(&self, group: Arc<str>, id: u64) {
        let _ = self.writer.send(Op::Ack { group, id });
    }

    /// Attempts made for a group, so the next holder flags the redelivery.
    pub fn attempt(&self, group: Arc<str>, id: u64, attempts: u32) {
        let _ = self.writer.send(Op::Attempt {
            group,
            id,
            attempts,
        });
    }

    /// Gives conversations up, after everything queued before is committed; whether each row
    /// went (`false`: an event came meanwhile and it is kept, or it was not this replica's).
    pub async fn release(&self, items: Vec<(Arc<str>, Arc<str>, bool)>) -> Vec<bool> {
        let mut waits = Vec::with_capacity(items.len());
        for (group, conversation, force) in items {
            let (done, rx) = oneshot::channel();
            let _ = self.writer.send(Op::Release {
                group,
                conversation,
                force,
                done,
            });
            waits.push(rx);
        }
        let mut out = Vec::with_capacity(waits.len());
        for w in waits {
            out.push(w.await.unwrap_or(false));
        }
        out
    }

    /// Resolves once everything queued so far is committed (or the writer is gone).
    pub async fn flush(&self) {
        let (done, rx) = oneshot::channel();
        if self.writer.send(Op::Flush { done }).is_ok() {
            let _ = rx.await;
        }
    }

    /// Extends this replica's claims that are still running; the ones extended (the others
    /// were lost: they ran out, and another replica may hold them now).
    pub async fn renew(
        &self,
        held: &[(Arc<str>, Arc<str>)],
        lease: Duration,
    ) -> Result<HashSet<(Arc<str>, Arc<str>)>, InboxStoreError> {
        if held.is_empty() {
            return Ok(HashSet::new());
        }
        let groups: Vec<&str> = held.iter().map(|(g, _)| &**g).collect();
        let convs: Vec<&str> = held.iter().map(|(_, c)| &**c).collect();
        let client = get(&self.pool).await.map_err(storage)?;
        let rows = client
            .query(
                "UPDATE inbox_claims c SET until = clock_timestamp() + make_interval(secs => $4) \
                 FROM unnest($2::text[], $3::text[]) AS u(g, conv) \
                 WHERE c.grp = u.g AND c.conversation = u.conv AND c.replica = $1 \
                 AND c.until > clock_timestamp() RETURNING c.grp, c.conversation",
                &[&self.replica, &groups, &convs, &secs(lease)],
            )
            .await
            .map_err(query("renewing inbox claims"))?;
        let mut kept = HashSet::with_capacity(rows.len());
        for r in rows {
            let g: String = r.get(0);
            let c: String = r.get(1);
            // The caller's own Arcs, so its maps are keyed the same.
            if let Some(k) = held.iter().find(|(hg, hc)| **hg == *g && **hc == *c) {
                kept.insert(k.clone());
            }
        }
        Ok(kept)
    }

    /// Takes up to `n` conversations of `group` that have events, that no replica holds, and
    /// that `filter` accepts: the ones waiting longest first, so a replica short of credit
    /// never leaves a conversation behind for good.
    pub async fn claim(
        &self,
        group: &str,
        filter: &Filter,
        n: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>, InboxStoreError> {
        let client = get(&self.pool).await.map_err(storage)?;
        let limit = i64::try_from(n).unwrap_or(i64::MAX);
        let rows = client
            .query(
                "WITH cand AS ( \
                   SELECT d.conversation FROM inbox_deliveries d \
                   WHERE d.grp = $1 \
                     AND ($2::text[] IS NULL OR d.bot_id = ANY($2)) \
                     AND ($3::text[] IS NULL OR d.channel = ANY($3)) \
                     AND NOT EXISTS (SELECT 1 FROM inbox_claims c WHERE c.grp = d.grp \
                       AND c.conversation = d.conversation AND c.until > clock_timestamp()) \
                   GROUP BY d.conversation ORDER BY min(d.seq) LIMIT $4) \
                 INSERT INTO inbox_claims AS c (grp, conversation, replica, epoch, until) \
                 SELECT $1, conversation, $5, 1, clock_timestamp() + make_interval(secs => $6) \
                 FROM cand \
                 ON CONFLICT (grp, conversation) DO UPDATE SET replica = excluded.replica, \
                   epoch = c.epoch + 1, until = excluded.until \
                 WHERE c.until <= clock_timestamp() \
                 RETURNING c.conversation, c.epoch",
                &[
                    &group,
                    &filter.bots,
                    &filter.channels,
                    &limit,
                    &self.replica,
                    &secs(lease),
                ],
            )
            .await
            .map_err(query("claiming inbox conversations"))?;
        Ok(rows
            .iter()
            .map(|r| Claimed {
                conversation: Arc::from(r.get::<_, String>(0)),
                // A released claim's row is deleted: a row that was there had run out.
                taken_over: r.get::<_, i64>(1) > 1,
            })
            .collect())
    }

    /// Every delivery of `group` for `convs`, in commit order, up to the head; and the head.
    pub async fn load(
        &self,
        group: &Arc<str>,
        convs: &[Arc<str>],
    ) -> Result<(Vec<Row>, i64), InboxStoreError> {
        let names: Vec<&str> = convs.iter().map(|c| &**c).collect();
        let client = get(&self.pool).await.map_err(storage)?;
        let rows = client
            .query(
                &format!(
                    "SELECT h.head, x.* FROM ({HEAD}) h LEFT JOIN LATERAL ( \
                       SELECT {COLUMNS} FROM inbox_deliveries d \
                       JOIN inbox_events e ON e.id = d.event_id \
                       WHERE d.grp = $1 AND d.conversation = ANY($2) AND d.seq <= h.head \
                       ORDER BY d.seq) x ON true"
                ),
                &[&&**group, &names],
            )
            .await
            .map_err(query("loading claimed conversations"))?;
        read_rows(rows)
    }

    /// What is new in the conversations this replica holds: deliveries after `after`, up to the
    /// head, in commit order (at most [`READ_LIMIT`]); and where to read from next time.
    pub async fn feed(&self, after: i64) -> Result<(Vec<Row>, i64), InboxStoreError> {
        let client = get(&self.pool).await.map_err(storage)?;
        let rows = client
            .query(
                &format!(
                    "SELECT h.head, x.* FROM ({HEAD}) h LEFT JOIN LATERAL ( \
                       SELECT {COLUMNS} FROM inbox_deliveries d \
                       JOIN inbox_claims c ON c.grp = d.grp AND c.conversation = d.conversation \
                         AND c.replica = $1 \
                       JOIN inbox_events e ON e.id = d.event_id \
                       WHERE d.seq > $2 AND d.seq <= h.head \
                       ORDER BY d.seq LIMIT {READ_LIMIT}) x ON true"
                ),
                &[&self.replica, &after],
            )
            .await
            .map_err(query("reading new inbox events"))?;
        let (rows, head) = read_rows(rows)?;
        // A full page: the rest comes from after its last row.
        let next = if rows.len() as i64 >= READ_LIMIT {
            rows.last().map_or(head, |r| r.seq)
        } else {
            head
        };
        Ok((rows, next.max(after)))
    }

    /// Periodic upkeep, safe on every replica at once: drops deliveries older than
    /// `retention_cutoff_ms` that no replica holds, events no group still needs, dedupe keys
    /// older than `dedupe_cutoff_ms`, and groups (other than `default`) no replica saw a stream
    /// of since `group_cutoff_ms`; marks `seen` groups as in use; recounts the inbox.
    pub async fn sweep(
        &self,
        retention_cutoff_ms: u64,
        dedupe_cutoff_ms: u64,
        group_cutoff_ms: u64,
        seen: &[Arc<str>],
    ) -> Result<Swept, InboxStoreError> {
        let mut client = get(&self.pool).await.map_err(storage)?;
        let tx = client
            .transaction()
            .await
            .map_err(query("beginning inbox upkeep"))?;
        let seen: Vec<&str> = seen.iter().map(|g| &**g).collect();
        let now = ms(crate::outbox::now_ms());
        tx.execute(
            "UPDATE inbox_groups SET seen_at_ms = $2 WHERE name = ANY($1::text[])",
            &[&seen, &now],
        )
        .await
        .map_err(query("marking consumer groups in use"))?;
        let gone: Vec<String> = tx
            .query(
                "DELETE FROM inbox_groups WHERE name <> 'default' AND seen_at_ms < $1 \
                 RETURNING name",
                &[&ms(group_cutoff_ms)],
            )
            .await
            .map_err(query("removing idle consumer groups"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !gone.is_empty() {
            tx.execute(
                "DELETE FROM inbox_deliveries WHERE grp = ANY($1::text[])",
                &[&gone],
            )
            .await
            .map_err(query("removing idle consumer groups"))?;
            tx.execute(
                "DELETE FROM inbox_claims WHERE grp = ANY($1::text[])",
                &[&gone],
            )
            .await
            .map_err(query("removing idle consumer groups"))?;
        }
        let groups_removed = gone.len() as u64;
        let expired = tx
            .query(
                "WITH gone AS (DELETE FROM inbox_deliveries d USING inbox_events e \
                 WHERE d.event_id = e.id AND e.received_at_ms < $1 \
                 AND NOT EXISTS (SELECT 1 FROM inbox_claims c WHERE c.grp = d.grp \
                   AND c.conversation = d.conversation AND c.until > clock_timestamp()) \
                 RETURNING e.channel) \
                 SELECT channel, count(*) FROM gone GROUP BY channel",
                &[&ms(retention_cutoff_ms)],
            )
            .await
            .map_err(query("expiring inbox events"))?
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1).max(0) as u64))
            .collect();
        // Two groups acking one event at once on two replicas each see the other's delivery
        // still there: the event is left for this sweep.
        tx.execute(
            "DELETE FROM inbox_events e WHERE NOT EXISTS \
             (SELECT 1 FROM inbox_deliveries d WHERE d.event_id = e.id)",
            &[],
        )
        .await
        .map_err(query("removing acked inbox events"))?;
        tx.execute(
            "DELETE FROM inbox_dedupe WHERE seen_at_ms < $1",
            &[&ms(dedupe_cutoff_ms)],
        )
        .await
        .map_err(query("forgetting inbox dedupe keys"))?;
        // Answers nobody collected (their replica stopped meanwhile).
        tx.execute(
            "DELETE FROM inbox_replies WHERE created_at_ms < $1",
            &[&ms(crate::outbox::now_ms().saturating_sub(600_000))],
        )
        .await
        .map_err(query("removing old inbox answers"))?;
        // Claims that ran out long ago and nobody took (their conversations emptied).
        tx.execute(
            "DELETE FROM inbox_claims c WHERE c.until < clock_timestamp() - interval '1 minute' \
             AND NOT EXISTS (SELECT 1 FROM inbox_deliveries d WHERE d.grp = c.grp \
               AND d.conversation = c.conversation)",
            &[],
        )
        .await
        .map_err(query("removing stale inbox claims"))?;
        tx.commit()
            .await
            .map_err(query("committing inbox upkeep"))?;
        self.recount().await?;
        Ok(Swept {
            expired,
            groups_removed,
        })
    }

    /// Hands a bot's answer to `replica`, whose channel call waits for it; false when the
    /// event has an answer already.
    pub async fn put_reply(
        &self,
        event_id: u64,
        replica: &str,
        reply: &str,
    ) -> Result<bool, InboxStoreError> {
        let client = get(&self.pool).await.map_err(storage)?;
        let n = client
            .execute(
                "INSERT INTO inbox_replies (event_id, replica, reply, created_at_ms) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (event_id) DO NOTHING",
                &[
                    &ms(event_id),
                    &replica,
                    &reply,
                    &ms(crate::outbox::now_ms()),
                ],
            )
            .await
            .map_err(query("handing an answer to another replica"))?;
        if n > 0 {
            client
                .execute("SELECT pg_notify($1, '')", &[&REPLY_CHANNEL])
                .await
                .map_err(query("notifying another replica"))?;
        }
        Ok(n > 0)
    }

    /// What became of an answer handed over (`None`: not yet): empty when it was written
    /// into the channel's answer, else why not. The row goes once read.
    pub async fn reply_outcome(&self, event_id: u64) -> Result<Option<String>, InboxStoreError> {
        let client = get(&self.pool).await.map_err(storage)?;
        let row = client
            .query_opt(
                "DELETE FROM inbox_replies WHERE event_id = $1 AND outcome IS NOT NULL \
                 RETURNING outcome",
                &[&ms(event_id)],
            )
            .await
            .map_err(query("reading an answer's outcome"))?;
        Ok(row.map(|r| r.get::<_, String>(0)))
    }

    /// Answers other replicas handed to this one, not yet written: (event id, answer).
    pub async fn replies_for_me(&self) -> Result<Vec<(u64, String)>, InboxStoreError> {
        let client = get(&self.pool).await.map_err(storage)?;
        let rows = client
            .query(
                "SELECT event_id, reply FROM inbox_replies WHERE replica = $1 \
                 AND outcome IS NULL ORDER BY event_id LIMIT 1000",
                &[&self.replica],
            )
            .await
            .map_err(query("reading answers for this replica"))?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i64>(0).max(0) as u64, r.get::<_, String>(1)))
            .collect())
    }

    /// Records what became of an answer (see `reply_outcome`).
    pub async fn set_outcome(&self, event_id: u64, outcome: &str) -> Result<(), InboxStoreError> {
        let client = get(&self.pool).await.map_err(storage)?;
        client
            .execute(
                "UPDATE inbox_replies SET outcome = $2 WHERE event_id = $1",
                &[&ms(event_id), &crate::bounded::cap(outcome, 300).as_ref()],
            )
            .await
            .map_err(query("recording an answer's outcome"))?;
        Ok(())
    }

    /// Counts what the shared inbox holds, for the bounds and the pending gauge.
    pub async fn recount(&self) -> Result<(u64, u64), InboxStoreError> {
        let client = get(&self.pool).await.map_err(storage)?;
        let row = client
            .query_one(
                "SELECT count(*), COALESCE(sum(octet_length(body)), 0)::int8 FROM inbox_events",
                &[],
            )
            .await
            .map_err(query("counting inbox events"))?;
        let events = row.get::<_, i64>(0).max(0) as u64;
        let bytes = row.get::<_, i64>(1).max(0) as u64;
        self.events.store(events, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
        Ok((events, bytes))
    }
}

/// Everything at or below it is committed or will never be, for a reader's snapshot (see the
/// module doc).
const HEAD: &str = "SELECT (pg_snapshot_xmin(pg_current_snapshot())::text::int8 << 24) - 1 AS head";

const COLUMNS: &str = "d.grp, d.conversation, d.seq, d.attempts, e.id, e.channel, e.bot_id, \
     e.received_at_ms, e.reply_by_ms, e.body, e.reply_replica";

fn read_rows(rows: Vec<tokio_postgres::Row>) -> Result<(Vec<Row>, i64), InboxStoreError> {
    let bad = query("reading inbox rows");
    let mut head = 0i64;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        head = r.try_get(0).map_err(&bad)?;
        let group: Option<String> = r.try_get(1).map_err(&bad)?;
        let Some(group) = group else {
            // The head's row alone: nothing matched.
            continue;
        };
        let body: Vec<u8> = r.try_get(10).map_err(&bad)?;
        out.push(Row {
            group: Arc::from(group),
            conversation: Arc::from(r.try_get::<_, String>(2).map_err(&bad)?),
            seq: r.try_get(3).map_err(&bad)?,
            attempts: r.try_get::<_, i32>(4).map_err(&bad)?.max(0) as u32,
            id: r.try_get::<_, i64>(5).map_err(&bad)?.max(0) as u64,
            channel: r.try_get(6).map_err(&bad)?,
            bot_id: r.try_get(7).map_err(&bad)?,
            received_at_ms: r.try_get::<_, i64>(8).map_err(&bad)?.max(0) as u64,
            reply_by_ms: r
                .try_get::<_, Option<i64>>(9)
                .map_err(&bad)?
                .map(|v| v.max(0) as u64),
            body: Bytes::from(body),
            reply_replica: r
                .try_get::<_, Option<String>>(11)
                .map_err(&bad)?
                .map(Arc::from),
        });
    }
    Ok((out, head))
}

/// An append's new events, column by column (`unnest` takes one array per column).
#[derive(Default)]
struct Columns<'a> {
    ids: Vec<i64>,
    channels: Vec<&'a str>,
    bots: Vec<&'a str>,
    convs: Vec<&'a str>,
    received: Vec<i64>,
    reply_by: Vec<Option<i64>>,
    bodies: Vec<&'a [u8]>,
    ords: Vec<i64>,
}

impl<'a> Columns<'a> {
    fn push(&mut self, id: i64, e: &'a NewEvent, reply_by: Option<u64>, ord: i64) {
        self.ids.push(id);
        self.channels.push(&e.channel);
        self.bots.push(&e.bot_id);
        self.convs.push(&e.conversation);
        self.received.push(ms(e.received_at_ms));
        self.reply_by.push(reply_by.map(ms));
        self.bodies.push(&e.body);
        self.ords.push(ord);
    }
}

/// Commits what the inbox queued, in order, one transaction per batch. A failed batch is
/// tried again whole (every statement in it can be applied twice) until the database answers.
async fn write_loop(pool: Pool, replica: String, mut rx: mpsc::UnboundedReceiver<Op>) {
    let mut backoff = Duration::from_millis(50);
    while let Some(first) = rx.recv().await {
        let mut ops = vec![first];
        while ops.len() < MAX_OPS_PER_COMMIT {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        loop {
            match commit(&pool, &replica, &ops).await {
                Ok(released) => {
                    backoff = Duration::from_millis(50);
                    for op in ops {
                        match op {
                            Op::Release {
                                group,
                                conversation,
                                done,
                                ..
                            } => {
                                let _ = done.send(released.contains(&(group, conversation)));
                            }
                            Op::Flush { done } => {
                                let _ = done.send(());
                            }
                            Op::Ack { .. } | Op::Attempt { .. } => {}
                        }
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, ops = ops.len(), "inbox write failed; trying again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

async fn commit(
    pool: &Pool,
    replica: &str,
    ops: &[Op],
) -> Result<HashSet<(Arc<str>, Arc<str>)>, InboxStoreError> {
    let (mut ack_ids, mut ack_groups) = (Vec::new(), Vec::new());
    let (mut att_ids, mut att_groups, mut att_n) = (Vec::new(), Vec::new(), Vec::new());
    let (mut rel_groups, mut rel_convs, mut rel_force) = (Vec::new(), Vec::new(), Vec::new());
    let mut keys: Vec<(Arc<str>, Arc<str>)> = Vec::new();
    for op in ops {
        match op {
            Op::Ack { group, id } => {
                ack_ids.push(ms(*id));
                ack_groups.push(&**group);
            }
            Op::Attempt {
                group,
                id,
                attempts,
            } => {
                att_ids.push(ms(*id));
                att_groups.push(&**group);
                att_n.push(i32::try_from(*attempts).unwrap_or(i32::MAX));
            }
            Op::Release {
                group,
                conversation,
                force,
                ..
            } => {
                rel_groups.push(&**group);
                rel_convs.push(&**conversation);
                rel_force.push(*force);
                keys.push((group.clone(), conversation.clone()));
            }
            Op::Flush { .. } => {}
        }
    }
    let mut client = get(pool).await.map_err(storage)?;
    let tx = client
        .transaction()
        .await
        .map_err(query("beginning an inbox write"))?;
    // `d.event_id = ANY($1)` beside the join gives the planner the primary key's probe; with
    // the join alone it may hash the whole table (see `crate::outbox::postgres`).
    if !ack_ids.is_empty() {
        tx.execute(
            "DELETE FROM inbox_deliveries d USING unnest($1::int8[], $2::text[]) AS u(id, g) \
             WHERE d.event_id = ANY($1) AND d.event_id = u.id AND d.grp = u.g",
            &[&ack_ids, &ack_groups],
        )
        .await
        .map_err(query("writing inbox acks"))?;
        tx.execute(
            "DELETE FROM inbox_events e WHERE e.id = ANY($1::int8[]) AND NOT EXISTS \
             (SELECT 1 FROM inbox_deliveries d WHERE d.event_id = e.id)",
            &[&ack_ids],
        )
        .await
        .map_err(query("removing acked inbox events"))?;
    }
    if !att_ids.is_empty() {
        tx.execute(
            "UPDATE inbox_deliveries d SET attempts = GREATEST(d.attempts, u.n) \
             FROM unnest($1::int8[], $2::text[], $3::int4[]) AS u(id, g, n) \
             WHERE d.event_id = ANY($1) AND d.event_id = u.id AND d.grp = u.g",
            &[&att_ids, &att_groups, &att_n],
        )
        .await
        .map_err(query("writing inbox attempts"))?;
    }
    let mut released = HashSet::new();
    if !rel_groups.is_empty() {
        let rows = tx
            .query(
                "DELETE FROM inbox_claims c USING unnest($2::text[], $3::text[], $4::bool[]) \
                 AS u(g, conv, force) \
                 WHERE c.grp = u.g AND c.conversation = u.conv AND c.replica = $1 \
                 AND (u.force OR NOT EXISTS (SELECT 1 FROM inbox_deliveries d \
                   WHERE d.grp = c.grp AND d.conversation = c.conversation)) \
                 RETURNING c.grp, c.conversation",
                &[&replica, &rel_groups, &rel_convs, &rel_force],
            )
            .await
            .map_err(query("releasing inbox conversations"))?;
        for r in rows {
            let g: String = r.get(0);
            let c: String = r.get(1);
            if let Some(k) = keys.iter().find(|(kg, kc)| **kg == *g && **kc == *c) {
                released.insert(k.clone());
            }
        }
    }
    tx.commit()
        .await
        .map_err(query("committing an inbox write"))?;
    Ok(released)
}

/// Says "new events" to the other replicas, coalesced: one NOTIFY for whatever appends
/// committed while the previous one was on its way. Outside the appends' transactions, as the
/// outbox's (`crate::storage::notify`), so commits are not serialised.
async fn notify_loop(pool: Pool, mut rx: mpsc::UnboundedReceiver<()>) {
    while rx.recv().await.is_some() {
        while rx.try_recv().is_ok() {}
        let sent = async {
            let client = get(&pool).await?;
            client
                .execute("SELECT pg_notify($1, '')", &[&CHANNEL])
                .await
                .map_err(|e| PgError::query("notifying other replicas", &e))
        };
        if let Err(e) = sent.await {
            // The holders' poll finds the events anyway; only the wake-up is late.
            tracing::debug!(error = %e, "inbox wake-up not sent");
        }
    }
}

/// Until when a claim counts as held by this replica: the lease from when the statement that
/// took or renewed it was sent, less a margin for the database's and this clock's drift.
pub fn held_until(sent: Instant, lease: Duration) -> Instant {
    let margin = (lease / 4).min(Duration::from_secs(1));
    sent.checked_add(lease.saturating_sub(margin))
        .unwrap_or(sent)
}
