//! Metrics change as messages flow: scrape, send, scrape.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_accepted_delivered_failed_and_retried_messages() {
    let h = start().await;
    let admin = h.gateway.admin_addr.expect("admin listener");
    let scrape = || metrics_text(admin);
    let before = scrape().await;
    assert_eq!(
        metric_value(
            &before,
            "channel_gateway_messages_accepted_total{channel=\"msteams\"}"
        ),
        0.0
    );

    h.fake.script(
        "m-fail",
        vec![Scripted {
            status: 404,
            body: json!({"error": {"code": "NotFound", "message": "gone"}}),
            retry_after: None,
        }],
    );
    h.fake.script(
        "m-retry",
        vec![Scripted {
            status: 500,
            body: json!({}),
            retry_after: None,
        }],
    );
    for i in 0..5 {
        h.send("m-ok", &format!("{i}")).await.unwrap();
    }
    h.send("m-fail", "x").await.unwrap();
    h.send("m-retry", "y").await.unwrap();
    h.fake
        .wait_for(Duration::from_secs(10), "6 delivered", |r| r.len() == 6)
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let after = scrape().await;
    let accepted = metric_value(
        &after,
        "channel_gateway_messages_accepted_total{channel=\"msteams\"}",
    );
    assert_eq!(accepted, 7.0, "{after}");
    assert_eq!(
        metric_value(
            &after,
            "channel_gateway_messages_finished_total{channel=\"msteams\",outcome=\"delivered\"}"
        ),
        6.0
    );
    assert_eq!(
        metric_value(
            &after,
            "channel_gateway_messages_finished_total{channel=\"msteams\",outcome=\"failed\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &after,
            "channel_gateway_messages_retried_total{channel=\"msteams\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &after,
            "channel_gateway_delivery_latency_seconds_count{channel=\"msteams\"}"
        ),
        6.0
    );
    assert_eq!(
        metric_value(
            &after,
            "channel_gateway_channel_request_duration_seconds_count{channel=\"msteams\",outcome=\"error\"}"
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &after,
            "channel_gateway_token_refreshes{channel=\"botframework\"}"
        ),
        1.0
    );
    assert_eq!(metric_value(&after, "channel_gateway_queue_depth"), 0.0);
    assert!(metric_value(&after, "channel_gateway_active_conversation_workers") >= 1.0);
}
