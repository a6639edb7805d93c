//! Fault injection: 30% of the connector's answers are 429s, 500s, answers slower than the
//! gateway's timeout, or dropped connections. Everything must still arrive, in order per
//! conversation, and no request may reach a paused conversation before its Retry-After.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn everything_arrives_in_order_through_random_faults() {
    let h = start_with(|c| {
        c.delivery.request_timeout = Duration::from_millis(300);
        c.delivery.max_attempts = 50;
        c.delivery.max_ambiguous_retries = 50;
        c.delivery.base_retry_delay = Duration::from_millis(10);
        c.delivery.max_retry_delay = Duration::from_secs(2);
    })
    .await;
    *h.fake.state.fault_rate.lock().unwrap() = 0.3;
    *h.fake.state.slow_answer.lock().unwrap() = Duration::from_millis(600);

    const CONVS: usize = 10;
    const PER: usize = 20;
    let mut tasks = Vec::new();
    for c in 0..CONVS {
        let mut client = h.client.clone();
        let address = h.address(&format!("f-{c}"));
        tasks.push(tokio::spawn(async move {
            for i in 0..PER {
                send_text(&mut client, &address, format!("{i}"))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    h.fake
        .wait_for(
            Duration::from_secs(240),
            "every message through the faults",
            |r| {
                let mut last: HashMap<&str, usize> = HashMap::new();
                for x in r {
                    if let Ok(n) = x.text().parse::<usize>() {
                        let e = last.entry(x.conversation.as_str()).or_default();
                        *e = (*e).max(n + 1);
                    }
                }
                last.len() == CONVS && last.values().all(|n| *n == PER)
            },
        )
        .await;
    *h.fake.state.fault_rate.lock().unwrap() = 0.0;

    for c in 0..CONVS {
        let conv = format!("f-{c}");
        let mut seq: Vec<usize> = h
            .fake
            .for_conversation(&conv)
            .iter()
            .map(|r| r.text().parse().unwrap())
            .collect();
        // A slow answer took effect before the gateway timed out and resent it: an adjacent
        // duplicate, which the gateway reports as a possible duplicate.
        seq.dedup();
        assert_eq!(
            seq,
            (0..PER).collect::<Vec<_>>(),
            "{conv} out of order or incomplete"
        );
    }

    let faults = h.fake.state.faults.lock().unwrap().clone();
    let arrivals = h.fake.state.arrivals.lock().unwrap().clone();
    let kinds = |k: &str| faults.iter().filter(|(_, f, _)| *f == k).count();
    println!(
        "faults: 429={} 500={} slow={} drop={} of {} requests",
        kinds("429"),
        kinds("500"),
        kinds("slow"),
        kinds("drop"),
        arrivals.len()
    );
    assert!(arrivals.len() > CONVS * PER, "retries must have happened");
    assert!(
        faults.len() * 5 >= arrivals.len()
            && kinds("429") > 0
            && kinds("drop") > 0
            && kinds("slow") > 0,
        "fault injection did not happen as planned"
    );
    // A 429 pauses its conversation for Retry-After (1 s) from when the gateway reads it; the
    // scattered 429s of a few conversations never pause the others (Teams limits each bot's
    // conversation).
    for (at, _, conv) in faults.iter().filter(|(_, f, _)| *f == "429") {
        let early: Vec<Duration> = arrivals
            .iter()
            .filter(|(a, c)| c == conv && *a > *at && *a < *at + Duration::from_millis(950))
            .map(|(a, _)| a.duration_since(*at))
            .collect();
        assert!(
            early.is_empty(),
            "{conv} was sent to {early:?} after its 429"
        );
    }
}
