//! Rate scopes shared by replicas on one real PostgreSQL (tests/pg): three replicas sending as
//! fast as the shared scope lets them stay within rate + burst in every second, and a pause one
//! replica writes holds the others.

#[path = "pg/mod.rs"]
mod pg;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use channel_gateway::storage::postgres;
use channel_gateway::storage::rate::{self, SharedBudget};
use pg::PgCluster;

async fn pool(url: &str) -> postgres::Pool {
    pg::migrated_pool(url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_together_stay_within_the_shared_rate() {
    const RATE: f64 = 40.0;
    const BURST: u32 = 5;
    let cluster = PgCluster::shared();
    let url = cluster.create_database();
    let budget = vec![SharedBudget {
        key: "telegram/bot-1#0".into(),
        per_second: RATE,
        burst: BURST,
    }];
    let scopes = vec!["telegram/bot-1".to_string()];
    let sent: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let start = Instant::now();
    let run = Duration::from_secs(3);
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let pool = pool(&url).await;
        let (budget, scopes, sent) = (budget.clone(), scopes.clone(), sent.clone());
        // Four senders per replica, each sending as soon as the scope allows.
        for _ in 0..4 {
            let (pool, budget, scopes, sent) =
                (pool.clone(), budget.clone(), scopes.clone(), sent.clone());
            replicas.push(tokio::spawn(async move {
                while start.elapsed() < run {
                    let wait = rate::reserve(&pool, &budget, &scopes).await.unwrap();
                    // The instant the shared scope let this send go: what the limiter decided
                    // across replicas, without the test machine's wake-up jitter.
                    let go = Instant::now() + wait;
                    tokio::time::sleep_until(go.into()).await;
                    sent.lock().unwrap().push(go);
                }
            }));
        }
    }
    for r in replicas {
        r.await.unwrap();
    }
    let mut at: Vec<Duration> = sent.lock().unwrap().iter().map(|t| *t - start).collect();
    at.sort();
    // Every window of one second holds at most rate + burst sends.
    let mut worst = 0;
    for (i, t) in at.iter().enumerate() {
        let n = at[i..]
            .iter()
            .take_while(|u| **u < *t + Duration::from_secs(1))
            .count();
        worst = worst.max(n);
    }
    let total = at.len();
    println!(
        "{total} sends in {run:?} from 3 replicas x 4 senders; busiest second {worst} (rate {RATE}, burst {BURST})"
    );
    assert!(
        worst <= RATE as usize + BURST as usize,
        "busiest second {worst}"
    );
    // And the scope is used, not starved: at least 80% of what it allows.
    let allowed = RATE * at.last().unwrap().as_secs_f64() + f64::from(BURST);
    assert!(total as f64 >= 0.8 * allowed, "{total} of {allowed:.0}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_written_by_one_replica_pauses_the_others() {
    let cluster = PgCluster::shared();
    let url = cluster.create_database();
    let (one, two) = (pool(&url).await, pool(&url).await);
    let budget = vec![SharedBudget {
        key: "msteams/bot/19:c#0".into(),
        per_second: 1000.0,
        burst: 100,
    }];
    let scopes = vec!["msteams/bot/19:c".to_string(), "msteams/bot".to_string()];
    assert_eq!(
        rate::reserve(&two, &budget, &scopes).await.unwrap(),
        Duration::ZERO
    );
    rate::pause(&one, "msteams/bot", Duration::from_millis(1500))
        .await
        .unwrap();
    let wait = rate::reserve(&two, &budget, &scopes).await.unwrap();
    assert!(
        wait > Duration::from_millis(1200) && wait <= Duration::from_millis(1500),
        "{wait:?}"
    );
    // A shorter pause does not shorten a longer one.
    rate::pause(&one, "msteams/bot", Duration::from_millis(10))
        .await
        .unwrap();
    assert!(rate::reserve(&two, &budget, &scopes).await.unwrap() > Duration::from_millis(1000));
    // Another scope is not paused.
    let other = vec!["slack/T1".to_string()];
    assert_eq!(
        rate::reserve(&two, &[], &other).await.unwrap(),
        Duration::ZERO
    );
    // Idle rows go; a paused one stays until its pause ends.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let pruned = rate::prune(&one, Duration::from_millis(1)).await.unwrap();
    assert_eq!(pruned, 1, "the budget row, not the paused scope");
}
