//! What the real binary writes to its logs: JSON lines carrying the caller's W3C trace into the
//! delivery spans, and never a configured secret or a channel token.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};

use channel_gateway::api::pb::{self, channel_gateway_client::ChannelGatewayClient};
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_carry_the_trace_and_never_a_secret() {
    let fake = FakeConnector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = gateway_command(&fake, dir.path(), port)
        .env("CHANNEL_GATEWAY__ADMIN__LISTEN", "127.0.0.1:0")
        .env("CHANNEL_GATEWAY__LOG__FORMAT", "json")
        .env("CHANNEL_GATEWAY__DELIVERY__BASE_RETRY_DELAY", "10ms")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read as it comes: at debug level a gateway on PostgreSQL logs every poll of its
    // partitions, and a full pipe would stall it.
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut logs = String::new();
        let _ = stderr.read_to_string(&mut logs);
        logs
    });
    let mut client = ChannelGatewayClient::new(binary_channel(port).await);
    let message = |conv: &str| pb::Message {
        address: Some(Box::new(pb::Address {
            channel_id: "msteams".into(),
            user: Some(pb::Identity {
                id: "29:u".into(),
                ..Default::default()
            }),
            bot: Some(pb::Identity {
                id: BOT.into(),
                ..Default::default()
            }),
            conversation: Some(pb::ConversationAccount {
                id: conv.into(),
                ..Default::default()
            }),
            service_url: fake.service_url(),
            ..Default::default()
        })),
        text: "hello".into(),
        ..Default::default()
    };
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = tonic::Request::new(pb::SendRequest {
        message: Some(message("traced")),
        wait: pb::WaitMode::Delivered as i32,
        ..Default::default()
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    client.send(req).await.unwrap();

    // A refusal, a revoked token (refresh and retry) and a retry: the paths that handle secrets.
    fake.script(
        "refused",
        vec![Scripted {
            status: 403,
            body: json!({"error": {"code": "Forbidden", "message": "no"}}),
            retry_after: None,
        }],
    );
    fake.script(
        "revoked",
        vec![
            Scripted {
                status: 401,
                body: json!({"error": {"code": "Unauthorized", "message": "expired"}}),
                retry_after: None,
            },
            Scripted {
                status: 500,
                body: json!({}),
                retry_after: None,
            },
        ],
    );
    for conv in ["refused", "revoked"] {
        let _ = client
            .send(pb::SendRequest {
                message: Some(message(conv)),
                wait: pb::WaitMode::Delivered as i32,
                ..Default::default()
            })
            .await;
    }
    assert!(fake.token_requests() >= 2, "the token was not refreshed");

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let logs = reader.join().unwrap();

    assert!(
        logs.lines().count() > 5,
        "too few log lines to judge: {logs}"
    );
    for line in logs.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    for secret in [PASSWORD, "tok-1", "tok-2", "tok-3"] {
        assert!(!logs.contains(secret), "`{secret}` appears in the logs");
    }
    let traced: Vec<&str> = logs.lines().filter(|l| l.contains(trace_id)).collect();
    assert!(
        traced
            .iter()
            .any(|l| l.contains("\"deliver\"") && l.contains("delivered")),
        "no delivery log line carries the trace id: {traced:?}"
    );
}
