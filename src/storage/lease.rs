//! Partition leases: which replica may deliver which conversations, when several replicas share
//! one PostgreSQL.
//!
//! Owns the tables `cg_replicas` (one row per running replica, with a heartbeat) and
//! `cg_partitions` (one row per partition: its owner, its fencing epoch and until when the lease
//! holds). Conversations hash into [`PARTITIONS`] fixed partitions ([`partition_of`]). Each
//! replica runs one [`LeaseManager`] task that, every `renew_every`:
//!
//! 1. beats its heartbeat, and reads the live replicas (a heartbeat within `lease`, not stopping);
//! 2. renews the leases it holds; a partition it held that did not renew was taken over after
//!    its lease ran out (a pause longer than the lease, a partition from the database): it is
//!    reported lost;
//! 3. decides, by rendezvous hashing over the live replicas, which partitions it should hold
//!    (each replica computes the same answer from the same live set, and a replica coming or
//!    going moves only its own share);
//! 4. hands over those it holds but should not: they are published as `releasing`, and released
//!    in the database only once the consumer said it has nothing in flight there ([`Leases::
//!    drained`]), so two replicas never deliver one conversation at once;
//! 5. takes those it should hold that are free or whose lease ran out, each with a new epoch.
//!
//! All lease times are the database's clock (`now()`), so replicas' clocks need not agree. The
//! replica's own view of a lease ends at the local instant the renewal was *sent* plus `lease`,
//! before the database's, so a replica stops acting on a partition before anyone else may take
//! it. State writes are fenced besides ([`FENCE`]): a write made under a stale epoch changes
//! nothing, whatever the local clocks did.
//!
//! Knows nothing of messages or channels: the dispatcher reads the published ownership.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::postgres::{PgError, Pool, get};

/// Conversations hash into this many partitions: enough for an even spread over tens of
/// replicas, few enough that renewing all of one replica's leases is one small UPDATE.
pub const PARTITIONS: u32 = 256;

/// The tables, as a migration's SQL (the store's migration list includes it).
pub const MIGRATION_SQL: &str = "
CREATE TABLE cg_replicas (
    id TEXT PRIMARY KEY,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL,
    stopping BOOLEAN NOT NULL DEFAULT false
);
CREATE TABLE cg_partitions (
    partition INTEGER PRIMARY KEY,
    owner TEXT,
    epoch BIGINT NOT NULL DEFAULT 0,
    lease_until TIMESTAMPTZ
);
INSERT INTO cg_partitions (partition) SELECT generate_series(0, 255);
";

/// A condition for a fenced write: true only while replica `$R` holds partition `$P` at epoch
/// `$E` with its lease running, by the database's clock. Substitute the parameter numbers.
pub const FENCE: &str = "EXISTS (SELECT 1 FROM cg_partitions f WHERE f.partition = $P \
                         AND f.owner = $R AND f.epoch = $E AND f.lease_until > now())";

/// The partition of a conversation key (`channel/bot/conversation`): FNV-1a, stable across
/// builds and platforms, since every replica must agree.
pub fn partition_of(conversation: &str) -> u32 {
    (fnv1a(conversation.as_bytes()) % u64::from(PARTITIONS)) as u32
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Rendezvous weight of a replica for a partition; the highest wins. Mixed after FNV so that
/// replica ids differing in one character still spread evenly.
fn weight(partition: u32, replica: &str) -> u64 {
    let mut h =
        fnv1a(replica.as_bytes()) ^ u64::from(partition).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // splitmix64's finaliser.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The partitions `me` should hold when `live` replicas are running.
pub fn desired(me: &str, live: &[String]) -> BTreeSet<u32> {
    (0..PARTITIONS)
        .filter(|p| {
            live.iter()
                .max_by_key(|r| (weight(*p, r), r.as_str()))
                .is_some_and(|winner| winner == me)
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// How long a lease holds without renewal: a dead replica's partitions move after this.
    pub lease: Duration,
    /// How often leases are renewed and the live replicas looked at.
    pub renew_every: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        // A dead replica's conversations resume within lease + renew_every + a query: ~4 s.
        Self {
            lease: Duration::from_secs(3),
            renew_every: Duration::from_millis(750),
        }
    }
}

/// One partition this replica holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The fencing epoch it was taken with.
    pub epoch: i64,
    /// Until when this replica may act on it (its own clock; before the database's end).
    pub valid_until: Instant,
    /// Being handed over: start nothing new there, and call `drained` once nothing is in flight.
    pub releasing: bool,
}

/// What this replica holds, as last published.
#[derive(Debug, Clone, Default)]
pub struct Ownership {
    pub held: BTreeMap<u32, Held>,
    /// Leases renewed, and lost to another replica, since the start.
    pub renewals: u64,
    pub losses: u64,
}

impl Ownership {
    /// May this replica act on `partition` at `now`, and under which epoch?
    pub fn epoch_for(&self, partition: u32, now: Instant) -> Option<i64> {
        self.held
            .get(&partition)
            .filter(|h| !h.releasing && h.valid_until > now)
            .map(|h| h.epoch)
    }
}

enum Cmd {
    Drained(u32),
    Stop(tokio::sync::oneshot::Sender<()>),
}

/// Tells the manager a releasing partition has nothing in flight.
#[derive(Clone)]
pub struct Drainer(mpsc::UnboundedSender<Cmd>);

impl Drainer {
    pub fn drained(&self, partition: u32) {
        let _ = self.0.send(Cmd::Drained(partition));
    }
}

/// The handle of a running lease manager.
pub struct Leases {
    replica: String,
    rx: watch::Receiver<Arc<Ownership>>,
    cmd: mpsc::UnboundedSender<Cmd>,
    task: tokio::task::JoinHandle<()>,
}

impl Leases {
    /// Starts the manager for replica `replica` (unique per process: a random id per start).
    pub fn start(pool: Pool, config: LeaseConfig, replica: String) -> Leases {
        let (tx, rx) = watch::channel(Arc::new(Ownership::default()));
        let (cmd, cmds) = mpsc::unbounded_channel();
        let manager = Manager {
            pool,
            config,
            me: replica.clone(),
            tx,
            held: BTreeMap::new(),
            drained: BTreeSet::new(),
            stopping: false,
            renewals: 0,
            losses: 0,
        };
        let task = tokio::spawn(manager.run(cmds));
        Leases {
            replica,
            rx,
            cmd,
            task,
        }
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Ownership>> {
        self.rx.clone()
    }

    /// The consumer has nothing in flight in a `releasing` partition: it may go.
    pub fn drained(&self, partition: u32) {
        self.drainer().drained(partition);
    }

    /// A handle the consumer's own task can keep to say so.
    pub fn drainer(&self) -> Drainer {
        Drainer(self.cmd.clone())
    }

    /// Hands every partition over (the consumer still has to call `drained` for each) and
    /// leaves; waits at most `within`.
    pub async fn shutdown(self, within: Duration) {
        let (done, rx) = tokio::sync::oneshot::channel();
        if self.cmd.send(Cmd::Stop(done)).is_ok() {
            let _ = tokio::time::timeout(within, rx).await;
        }
        self.task.abort();
    }

    /// Stops without a word to the database, as a killed process does (tests).
    pub fn abandon(self) {
        self.task.abort();
    }
}

struct Manager {
    pool: Pool,
    config: LeaseConfig,
    me: String,
    tx: watch::Sender<Arc<Ownership>>,
    held: BTreeMap<u32, Held>,
    /// Releasing partitions the consumer has drained.
    drained: BTreeSet<u32>,
    stopping: bool,
    renewals: u64,
    losses: u64,
}

fn pg(context: &'static str) -> impl Fn(tokio_postgres::Error) -> PgError {
    move |e| PgError::query(context, &e)
}

impl Manager {
    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        let mut tick = tokio::time::interval(self.config.renew_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop_done: Option<tokio::sync::oneshot::Sender<()>> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Drained(p)) => {
                        self.drained.insert(p);
                        // Another drained one may be right behind: take them all, then act.
                        while let Ok(Cmd::Drained(p)) = cmds.try_recv() {
                            self.drained.insert(p);
                        }
                    }
                    Some(Cmd::Stop(done)) => {
                        self.stopping = true;
                        stop_done = Some(done);
                    }
                    None => return,
                },
            }
            if let Err(e) = self.round().await {
                tracing::warn!(error = %e, replica = %self.me, "partition lease round failed");
            }
            if self.stopping && self.held.is_empty() {
                let _ = self.leave().await;
                if let Some(done) = stop_done.take() {
                    let _ = done.send(());
                }
                return;
            }
        }
    }

    async fn round(&mut self) -> Result<(), PgError> {
        let sent = Instant::now();
        let lease_s = self.config.lease.as_secs_f64();
        let client = get(&self.pool).await?;
        client
            .execute(
                "INSERT INTO cg_replicas (id, heartbeat_at, stopping) VALUES ($1, now(), $2) \
                 ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), stopping = $2",
                &[&self.me, &self.stopping],
            )
            .await
            .map_err(pg("beating the replica's heartbeat"))?;
        let live: Vec<String> = client
            .query(
                "SELECT id FROM cg_replicas WHERE NOT stopping \
                 AND heartbeat_at > now() - make_interval(secs => $1) ORDER BY id",
                &[&lease_s],
            )
            .await
            .map_err(pg("reading the live replicas"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        // Renew what is held; what does not renew was taken over.
        let renewed: BTreeMap<u32, i64> = client
            .query(
                "UPDATE cg_partitions SET lease_until = now() + make_interval(secs => $2) \
                 WHERE owner = $1 RETURNING partition, epoch",
                &[&self.me, &lease_s],
            )
            .await
            .map_err(pg("renewing partition leases"))?
            .iter()
            .map(|r| (r.get::<_, i32>(0) as u32, r.get::<_, i64>(1)))
            .collect();
        let valid_until = sent.checked_add(self.config.lease).unwrap_or(sent);
        let lost: Vec<u32> = self
            .held
            .keys()
            .filter(|p| !renewed.contains_key(p))
            .copied()
            .collect();
        if !lost.is_empty() {
            self.losses += lost.len() as u64;
            tracing::warn!(replica = %self.me, partitions = ?lost, "partition leases lost to another replica");
        }
        self.renewals += renewed.len() as u64;
        let want = if self.stopping {
            BTreeSet::new()
        } else {
            desired(&self.me, &live)
        };
        let mut held: BTreeMap<u32, Held> = renewed
            .iter()
            .map(|(p, epoch)| {
                (
                    *p,
                    Held {
                        epoch: *epoch,
                        valid_until,
                        releasing: !want.contains(p),
                    },
                )
            })
            .collect();
        // Hand over what the consumer drained.
        let release: Vec<i32> = held
            .iter()
            .filter(|(p, h)| h.releasing && self.drained.contains(p))
            .map(|(p, _)| *p as i32)
            .collect();
        if !release.is_empty() {
            client
                .execute(
                    "UPDATE cg_partitions SET owner = NULL, lease_until = NULL \
                     WHERE owner = $1 AND partition = ANY($2)",
                    &[&self.me, &release],
                )
                .await
                .map_err(pg("releasing partitions"))?;
            for p in &release {
                held.remove(&(*p as u32));
            }
        }
        self.drained
            .retain(|p| held.get(p).is_some_and(|h| h.releasing));
        // Take what should be ours and is free or expired.
        let take: Vec<i32> = want
            .iter()
            .filter(|p| !held.contains_key(p))
            .map(|p| *p as i32)
            .collect();
        if !take.is_empty() {
            let taken = client
                .query(
                    "UPDATE cg_partitions SET owner = $1, epoch = epoch + 1, \
                     lease_until = now() + make_interval(secs => $3) \
                     WHERE partition = ANY($2) AND (owner IS NULL OR lease_until < now()) \
                     RETURNING partition, epoch",
                    &[&self.me, &take, &lease_s],
                )
                .await
                .map_err(pg("taking partitions"))?;
            for r in taken {
                held.insert(
                    r.get::<_, i32>(0) as u32,
                    Held {
                        epoch: r.get(1),
                        valid_until,
                        releasing: false,
                    },
                );
            }
        }
        self.held = held;
        self.publish();
        Ok(())
    }

    fn publish(&self) {
        let _ = self.tx.send(Arc::new(Ownership {
            held: self.held.clone(),
            renewals: self.renewals,
            losses: self.losses,
        }));
    }

    async fn leave(&mut self) -> Result<(), PgError> {
        let client = get(&self.pool).await?;
        client
            .execute("DELETE FROM cg_replicas WHERE id = $1", &[&self.me])
            .await
            .map_err(pg("leaving"))?;
        self.publish();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        // Fixed: every replica, of every build, must agree.
        assert_eq!(
            partition_of("msteams/bot-1/19:abc"),
            partition_of("msteams/bot-1/19:abc")
        );
        let mut counts = vec![0u32; PARTITIONS as usize];
        for i in 0..100_000 {
            counts[partition_of(&format!("slack/B1/C{i}")) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 280 && *max < 520, "{min}..{max}");
    }

    #[test]
    fn rendezvous_gives_each_partition_one_owner_and_moves_only_a_leavers_share() {
        let live: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let sets: Vec<BTreeSet<u32>> = live.iter().map(|r| desired(r, &live)).collect();
        let total: usize = sets.iter().map(BTreeSet::len).sum();
        assert_eq!(total, PARTITIONS as usize, "each partition exactly once");
        for s in &sets {
            assert!(s.len() > 60 && s.len() < 110, "{}", s.len());
        }
        // c leaves: a and b keep all they had and split c's.
        let two = &live[..2];
        for (i, r) in two.iter().enumerate() {
            assert!(sets[i].is_subset(&desired(r, two)));
        }
        assert!(desired("d", &live).is_empty(), "not live: nothing");
    }
}
