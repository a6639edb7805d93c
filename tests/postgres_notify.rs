//! Wake-ups between replicas on a real PostgreSQL (tests/pg): coalesced NOTIFYs reach a
//! listener on another connection, and a listener that lost its connection reconnects and says
//! that everything must be looked at again.

#[path = "pg/mod.rs"]
mod pg;

use std::collections::BTreeSet;
use std::time::Duration;

use channel_gateway::settings::Secret;
use channel_gateway::storage::notify::{Listener, Notifier, Wake};
use channel_gateway::storage::postgres::{self, PostgresConfig};
use pg::PgCluster;
use tokio::sync::broadcast;

fn config(url: &str) -> PostgresConfig {
    PostgresConfig {
        url: Secret::new(url),
        pool_size: 2,
        ..PostgresConfig::default()
    }
}

async fn next(rx: &mut broadcast::Receiver<Wake>, within: Duration) -> Wake {
    tokio::time::timeout(within, rx.recv())
        .await
        .expect("a wake-up in time")
        .expect("the listener is running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_notifications_reach_the_listener() {
    let cluster = PgCluster::shared();
    let url = cluster.create_database();
    let listener = Listener::start(&config(&url), 256).unwrap();
    let mut rx = listener.subscribe();
    assert_eq!(
        next(&mut rx, Duration::from_secs(10)).await,
        Wake::All,
        "first, on connecting"
    );
    let notifier = Notifier::start(postgres::connect(&config(&url)).await.unwrap());
    for i in 0..1000u32 {
        notifier.wake([3, 7, 200][i as usize % 3]);
    }
    let mut seen = BTreeSet::new();
    let mut messages = 0;
    while seen.len() < 3 {
        match next(&mut rx, Duration::from_secs(5)).await {
            Wake::Partitions(p) => {
                messages += 1;
                seen.extend(p);
            }
            Wake::All => panic!("no reconnection expected"),
        }
    }
    // Let stragglers arrive, then count.
    while let Ok(Ok(Wake::Partitions(p))) =
        tokio::time::timeout(Duration::from_millis(300), rx.recv()).await
    {
        messages += 1;
        seen.extend(p);
    }
    println!("1000 wake-ups of 3 partitions arrived as {messages} notifications");
    assert_eq!(seen, BTreeSet::from([3, 7, 200]));
    assert!(messages < 1000, "coalesced: {messages}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_reconnects_after_an_outage_and_wakes_everything() {
    // A cluster of its own: this test stops it.
    let cluster = std::sync::Arc::new(PgCluster::start());
    let url = cluster.create_database();
    let listener = Listener::start(&config(&url), 256).unwrap();
    let mut rx = listener.subscribe();
    assert_eq!(next(&mut rx, Duration::from_secs(10)).await, Wake::All);
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || {
        c.stop();
        std::thread::sleep(Duration::from_millis(500));
        c.start_again();
    })
    .await
    .unwrap();
    assert_eq!(
        next(&mut rx, Duration::from_secs(15)).await,
        Wake::All,
        "notifications may have been missed while it was down"
    );
    let notifier = Notifier::start(postgres::connect(&config(&url)).await.unwrap());
    notifier.wake(42);
    assert_eq!(
        next(&mut rx, Duration::from_secs(5)).await,
        Wake::Partitions(vec![42])
    );
}
