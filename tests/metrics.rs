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
            "channel_gateway_token_refreshes_total{channel=\"msteams\"}"
        ),
        1.0
    );
    // The failure carries its class (the fake answered 404), not the channel's own code.
    assert_eq!(
        metric_value(
            &after,
            "channel_gateway_messages_failed_total{channel=\"msteams\",error=\"not_found\"}"
        ),
        1.0,
        "{after}"
    );
    assert_eq!(metric_value(&after, "channel_gateway_queue_depth"), 0.0);
    assert!(metric_value(&after, "channel_gateway_active_conversation_workers") >= 1.0);
}

/// A scrape before any traffic already shows every counter of each configured channel at 0
/// (a series born with its first event hides that event from `rate()`), the process figures
/// and the build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_before_any_traffic_shows_every_series() {
    let h = start().await;
    let text = metrics_text(h.gateway.admin_addr.expect("admin listener")).await;
    let has = |line: &str| {
        assert!(
            text.lines().any(|l| l == line),
            "`{line}` missing in\n{text}"
        )
    };
    for channel in ["msteams", "webchat", "facebook", "slack"] {
        has(&format!(
            "channel_gateway_messages_accepted_total{{channel=\"{channel}\"}} 0"
        ));
        has(&format!(
            "channel_gateway_messages_retried_total{{channel=\"{channel}\"}} 0"
        ));
        has(&format!(
            "channel_gateway_rate_limit_pauses_total{{channel=\"{channel}\"}} 0"
        ));
        for outcome in ["delivered", "failed", "expired"] {
            has(&format!(
                "channel_gateway_messages_finished_total{{channel=\"{channel}\",outcome=\"{outcome}\"}} 0"
            ));
        }
    }
    for channel in ["msteams", "webchat", "skype", "directline", "emulator"] {
        has(&format!(
            "channel_gateway_token_refreshes_total{{channel=\"{channel}\"}} 0"
        ));
    }
    has(&format!(
        "channel_gateway_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    ));
    assert!(
        text.contains("# TYPE process_cpu_seconds counter"),
        "{text}"
    );
    assert!(
        metric_value(&text, "process_cpu_seconds_total") > 0.0,
        "{text}"
    );
    let rss = metric_value(&text, "process_resident_memory_bytes");
    assert!(rss > 1e6 && rss < 1e10, "{rss}");
    assert!(metric_value(&text, "process_open_fds ") >= 3.0, "{text}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = metric_value(&text, "process_start_time_seconds");
    assert!(
        started <= now + 1.0 && started > now - 3600.0,
        "start {started}, now {now}"
    );
}
