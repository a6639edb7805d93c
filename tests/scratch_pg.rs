mod common;
use common::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scratch() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("channel_gateway=info")
        .try_init();
    let h = start().await;
    let began = Instant::now();
    let mut tasks = Vec::new();
    let n_per = 120;
    for t in 0..64 {
        let mut client = h.client.clone();
        let addrs: Vec<_> = (0..16)
            .map(|c| h.address(&format!("c{}", t * 16 + c)))
            .collect();
        tasks.push(tokio::spawn(async move {
            for i in 0..n_per {
                send_text(&mut client, &addrs[i % 16], format!("{}", i / 16))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = 64 * n_per;
    h.fake
        .wait_for(Duration::from_secs(60), "all", |r| r.len() >= total)
        .await;
    println!("delivered all in {:?}", began.elapsed());
    let mut bad = 0;
    for c in 0..1024 {
        let texts = h.fake.texts(&format!("c{c}"));
        let nums: Vec<usize> = texts.iter().map(|t| t.parse().unwrap()).collect();
        let mut sorted = nums.clone();
        sorted.sort();
        if nums != sorted {
            bad += 1;
            println!("c{c}: {nums:?}");
        }
    }
    assert_eq!(bad, 0);
}
