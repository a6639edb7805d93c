//! Partition leases between replicas on one real PostgreSQL (tests/pg): each partition has one
//! holder at a time, a dead replica's partitions move within lease + renewal + 1 s, a replica
//! that leaves hands its partitions over within 1 s, and a write fenced by a stale epoch changes
//! nothing.

#[path = "pg/mod.rs"]
mod pg;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use channel_gateway::storage::lease::{self, LeaseConfig, Leases, Ownership, PARTITIONS};
use channel_gateway::storage::postgres;
use pg::PgCluster;
use tokio::sync::watch;

async fn pool(url: &str) -> postgres::Pool {
    pg::migrated_pool(url).await
}

fn config() -> LeaseConfig {
    LeaseConfig {
        lease: Duration::from_secs(2),
        renew_every: Duration::from_millis(500),
    }
}

/// A replica whose consumer drains a releasing partition at once (it has nothing in flight).
struct Replica {
    leases: Option<Leases>,
    rx: watch::Receiver<Arc<Ownership>>,
    consumer: tokio::task::JoinHandle<()>,
}

impl Replica {
    async fn start(url: &str, name: &str) -> Replica {
        let leases = Leases::start(pool(url).await, config(), name.to_string());
        let rx = leases.subscribe();
        let mut watch = leases.subscribe();
        let drainer = leases.drainer();
        let consumer = tokio::spawn(async move {
            while watch.changed().await.is_ok() {
                let releasing: Vec<u32> = watch
                    .borrow()
                    .held
                    .iter()
                    .filter(|(_, h)| h.releasing)
                    .map(|(p, _)| *p)
                    .collect();
                for p in releasing {
                    drainer.drained(p);
                }
            }
        });
        Replica {
            leases: Some(leases),
            rx,
            consumer,
        }
    }

    /// The partitions it may act on now, with their epochs.
    fn held(&self, now: Instant) -> BTreeMap<u32, i64> {
        let o = self.rx.borrow();
        o.held
            .keys()
            .filter_map(|p| o.epoch_for(*p, now).map(|e| (*p, e)))
            .collect()
    }

    fn kill(&mut self) {
        if let Some(l) = self.leases.take() {
            l.abandon();
        }
        self.consumer.abort();
    }

    async fn stop(&mut self) {
        if let Some(l) = self.leases.take() {
            l.shutdown(Duration::from_secs(5)).await;
        }
        self.consumer.abort();
    }
}

/// Samples every replica's view every 20 ms for `d`, failing if two replicas may act on one
/// partition at one instant; returns the last sample.
async fn watch_exclusive(replicas: &[&Replica], d: Duration) -> Vec<BTreeMap<u32, i64>> {
    let end = Instant::now() + d;
    loop {
        let now = Instant::now();
        let views: Vec<BTreeMap<u32, i64>> = replicas.iter().map(|r| r.held(now)).collect();
        let mut seen = BTreeSet::new();
        for v in &views {
            for p in v.keys() {
                assert!(
                    seen.insert(*p),
                    "partition {p} held by two replicas at once"
                );
            }
        }
        if now >= end {
            return views;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn union(views: &[BTreeMap<u32, i64>]) -> BTreeSet<u32> {
    views.iter().flat_map(|v| v.keys().copied()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_partitions_and_take_over_a_dead_ones_in_time() {
    let cluster = PgCluster::shared();
    let url = cluster.create_database();
    let mut a = Replica::start(&url, "replica-a").await;
    let views = watch_exclusive(&[&a], Duration::from_millis(800)).await;
    assert_eq!(
        union(&views).len(),
        PARTITIONS as usize,
        "one replica holds them all"
    );

    let b = Replica::start(&url, "replica-b").await;
    let c = Replica::start(&url, "replica-c").await;
    // Rebalancing: a hands over to b and c without any partition held twice meanwhile.
    let views = watch_exclusive(&[&a, &b, &c], Duration::from_secs(4)).await;
    assert_eq!(union(&views).len(), PARTITIONS as usize, "{views:?}");
    for v in &views {
        assert!(
            v.len() > 50,
            "an even share each: {:?}",
            views.iter().map(BTreeMap::len).collect::<Vec<_>>()
        );
    }

    // a dies without a word: its partitions move within lease + renewal + 1 s, each under a
    // new epoch.
    let before = views[0].clone();
    a.kill();
    let killed = Instant::now();
    let bound = config().lease + config().renew_every + Duration::from_secs(1);
    let took = loop {
        let now = Instant::now();
        let views = [b.held(now), c.held(now)];
        if union(&views).len() == PARTITIONS as usize {
            for (p, old) in &before {
                let new = views.iter().find_map(|v| v.get(p)).unwrap();
                assert!(new > old, "partition {p}: epoch {new} after {old}");
            }
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < bound + Duration::from_secs(2),
            "not taken over: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "a killed replica's {} partitions moved in {took:?} (bound {bound:?})",
        before.len()
    );
    assert!(took <= bound, "{took:?} > {bound:?}");
    watch_exclusive(&[&b, &c], Duration::from_millis(600)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_leaves_hands_its_partitions_over_within_a_second() {
    let cluster = PgCluster::shared();
    let url = cluster.create_database();
    let mut a = Replica::start(&url, "leaver-a").await;
    let b = Replica::start(&url, "leaver-b").await;
    let views = watch_exclusive(&[&a, &b], Duration::from_secs(3)).await;
    assert_eq!(union(&views).len(), PARTITIONS as usize);
    let gone = views[0].len();
    assert!(gone > 0);
    let t = Instant::now();
    a.stop().await;
    let took = loop {
        if b.held(Instant::now()).len() == PARTITIONS as usize {
            break t.elapsed();
        }
        assert!(t.elapsed() < Duration::from_secs(5), "not handed over");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!("a leaving replica's {gone} partitions were held by the other in {took:?}");
    assert!(took <= Duration::from_secs(1), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_fenced_by_a_stale_epoch_changes_nothing() {
    let cluster = PgCluster::shared();
    let url = cluster.create_database();
    let db = pool(&url).await;
    let client = postgres::get(&db).await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'first')",
        )
        .await
        .unwrap();
    let fenced = format!(
        "UPDATE t SET v = $1 WHERE id = 1 AND {}",
        lease::FENCE
            .replace("$P", "$2")
            .replace("$R", "$3")
            .replace("$E", "$4")
    );
    let mut a = Replica::start(&url, "fence-a").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let epoch = loop {
        if let Some(e) = a.held(Instant::now()).get(&7).copied() {
            break e;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let write = |v: &'static str, replica: &'static str, epoch: i64| {
        let client = &client;
        let fenced = &fenced;
        async move {
            client
                .execute(fenced.as_str(), &[&v, &7i32, &replica, &epoch])
                .await
                .unwrap()
        }
    };
    assert_eq!(
        write("by a", "fence-a", epoch).await,
        1,
        "the holder writes"
    );
    assert_eq!(write("old epoch", "fence-a", epoch - 1).await, 0);
    assert_eq!(write("not the holder", "fence-b", epoch).await, 0);
    // a pauses past its lease (killed here); b takes partition 7 under a new epoch, and a's
    // write, arriving late, changes nothing.
    a.kill();
    let b = Replica::start(&url, "fence-b").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let new = loop {
        if let Some(e) = b.held(Instant::now()).get(&7).copied() {
            break e;
        }
        assert!(Instant::now() < deadline, "b never took partition 7");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(new > epoch);
    assert_eq!(write("late, from a", "fence-a", epoch).await, 0);
    assert_eq!(write("by b", "fence-b", new).await, 1);
    let v: String = client
        .query_one("SELECT v FROM t WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "by b");
}
