//! Delivery status and the outbox through gRPC: idempotency across a restart, WatchDeliveries,
//! ListFailed and Redeliver, backpressure bounds.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio_stream::StreamExt;
use tonic::Code;

use channel_gateway::api::pb::{self, channel_gateway_client::ChannelGatewayClient};

fn refusal() -> Scripted {
    Scripted {
        status: 404,
        body: json!({"error": {"code": "ConversationNotFound", "message": "Conversation not found."}}),
        retry_after: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_survives_a_restart() {
    let fake = FakeConnector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut c = config_for(&fake);
        c.outbox.data_dir = dir.path().to_path_buf();
        c.delivery.idle_timeout = Duration::from_millis(20);
        c
    };
    let h = HarnessLite::start(config()).await;
    let req = pb::SendRequest {
        message: Some(fake.text("idem-restart", "only once")),
        idempotency_key: "order-42".into(),
        wait: pb::WaitMode::Delivered as i32,
    };
    let first = h
        .client
        .clone()
        .send(req.clone())
        .await
        .unwrap()
        .into_inner();
    h.stop().await;

    // The same data directory, a new process-worth of gateway.
    let h = HarnessLite::start(config()).await;
    let again = h.client.clone().send(req).await.unwrap().into_inner();
    assert_eq!(again.message_id, first.message_id);
    assert_eq!(again.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(again.receipts, first.receipts);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.for_conversation("idem-restart").len(), 1, "sent twice");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_deliveries_streams_each_outcome() {
    let h = start().await;
    let mut watch = h
        .client
        .clone()
        .watch_deliveries(pb::WatchDeliveriesRequest {
            conversation_id: "w".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    h.fake.script("w", vec![Scripted { ..refusal() }]);
    let a = h.send("w", "refused").await.unwrap().message_id;
    let b = h.send("w", "fine").await.unwrap().message_id;
    h.send("elsewhere", "not watched").await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let d = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("no event")
            .unwrap()
            .unwrap()
            .delivery
            .unwrap();
        seen.push((d.message_id.clone(), d.state, d.error.map(|e| e.code)));
    }
    assert_eq!(
        seen,
        vec![
            (
                a,
                pb::DeliveryState::Failed as i32,
                Some("ConversationNotFound".to_string())
            ),
            (b, pb::DeliveryState::Delivered as i32, None),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_messages_are_listed_and_can_be_redelivered() {
    let h = start().await;
    let mut c = h.client.clone();
    h.fake.script("lf", vec![refusal()]);
    let id = h.send("lf", "first try fails").await.unwrap().message_id;
    h.send("lf", "next one goes").await.unwrap();
    h.fake
        .wait_for(Duration::from_secs(10), "the next message", |r| {
            r.iter().any(|x| x.text() == "next one goes")
        })
        .await;
    let d = delivery(&mut c, &id).await;
    assert_eq!(d.state, pb::DeliveryState::Failed as i32);
    assert_eq!(d.error.as_ref().unwrap().http_status, 404);
    assert!(d.error.unwrap().permanent);

    let list = c
        .list_failed(pb::ListFailedRequest {
            bot_id: BOT.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<&str> = list
        .deliveries
        .iter()
        .map(|d| d.message_id.as_str())
        .collect();
    assert_eq!(listed, [id.as_str()]);
    assert!(list.next_page_token.is_empty());

    let err = c
        .redeliver(pb::RedeliverRequest {
            message_ids: vec!["nope".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&err), ["message_ids[0]"]);

    c.redeliver(pb::RedeliverRequest {
        message_ids: vec![id.clone()],
    })
    .await
    .unwrap();
    h.fake
        .wait_for(Duration::from_secs(10), "the redelivered message", |r| {
            r.iter().any(|x| x.text() == "first try fails")
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let d = delivery(&mut c, &id).await;
        if d.state == pb::DeliveryState::Delivered as i32 {
            assert_eq!(d.receipts.len(), 1);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "redelivered message not delivered: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let list = c
        .list_failed(pb::ListFailedRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.deliveries.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounds_answer_resource_exhausted_and_drop_nothing() {
    let h = start_with(|c| c.delivery.max_pending_per_conversation = 3).await;
    h.fake.set_latency("full", Duration::from_millis(300));
    for i in 0..3 {
        h.send("full", &format!("m{i}")).await.unwrap();
    }
    let err = h.send("full", "one too many").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message()
            .contains("delivery.max_pending_per_conversation"),
        "{}",
        err.message()
    );
    // Other conversations are not affected.
    h.send("other", "fine").await.unwrap();
    h.fake
        .wait_for(Duration::from_secs(10), "the accepted three", |r| {
            r.iter().filter(|x| x.conversation == "full").count() == 3
        })
        .await;
    let texts: Vec<String> = h.fake.texts("full");
    assert_eq!(texts, ["m0", "m1", "m2"]);
    // Once drained, the conversation accepts again.
    h.send("full", "room again").await.unwrap();
}

/// With `delivery.max_wait_for_room`, a Send to a full conversation waits until a message of
/// that conversation is finished instead of being refused, and order holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_line_waits_for_room_when_configured() {
    let h = start_with(|c| {
        c.delivery.max_pending_per_conversation = 2;
        c.delivery.max_wait_for_room = Duration::from_secs(30);
    })
    .await;
    // Long enough that each next Send surely arrives while the line is still full.
    h.fake.set_latency("paced", Duration::from_millis(300));
    for i in 0..6 {
        h.send("paced", &format!("m{i}")).await.unwrap();
        // Two may be pending: so the third and later were accepted only once all but one of
        // those before them had reached the channel.
        let arrived = h.fake.for_conversation("paced").len();
        assert!(
            arrived + 1 >= i,
            "m{i} accepted with only {arrived} delivered: it did not wait for room"
        );
    }
    h.fake
        .wait_for(Duration::from_secs(10), "all six", |r| {
            r.iter().filter(|x| x.conversation == "paced").count() == 6
        })
        .await;
    let texts: Vec<String> = h.fake.texts("paced");
    assert_eq!(texts, ["m0", "m1", "m2", "m3", "m4", "m5"]);
    // m2 to m5 waited: the histogram counts them.
    let admin = h.gateway.admin_addr.expect("admin listener");
    let waited = metric_value(
        &metrics_text(admin).await,
        "channel_gateway_room_wait_seconds_count{channel=\"msteams\"} ",
    );
    assert!(waited >= 4.0, "room waits counted: {waited}");
}

/// A waiting Send holds only its own conversation: others are accepted meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_waiting_for_room_holds_up_no_other_conversation() {
    let h = start_with(|c| {
        c.delivery.max_pending_per_conversation = 1;
        c.delivery.max_wait_for_room = Duration::from_secs(30);
    })
    .await;
    h.fake.set_latency("slow", Duration::from_secs(3));
    h.send("slow", "first").await.unwrap();
    let mut client = h.client.clone();
    let address = h.address("slow");
    let waiting =
        tokio::spawn(async move { send_text(&mut client, &address, "second".into()).await });
    // Set-up only: lets the second Send reach its wait before the other conversation's.
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.send("other", "not held up").await.unwrap();
    assert!(
        !waiting.is_finished(),
        "the second Send should still wait for the first to be delivered"
    );
    assert!(h.fake.for_conversation("slow").len() <= 1);
    waiting.await.unwrap().unwrap();
    h.fake
        .wait_for(Duration::from_secs(15), "both slow messages", |r| {
            r.iter().filter(|x| x.conversation == "slow").count() == 2
        })
        .await;
    let texts: Vec<String> = h.fake.texts("slow");
    assert_eq!(texts, ["first", "second"]);
}

/// The wait is bounded: past `max_wait_for_room` the Send is refused as without it, and it is
/// never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_for_room_ends_in_a_refusal_and_sends_nothing() {
    let h = start_with(|c| {
        c.delivery.max_pending_per_conversation = 1;
        c.delivery.max_wait_for_room = Duration::from_millis(300);
    })
    .await;
    h.fake.set_latency("stuck", Duration::from_secs(2));
    h.send("stuck", "m0").await.unwrap();
    let started = Instant::now();
    let err = h.send("stuck", "refused").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .contains("delivery.max_pending_per_conversation"),
        "{}",
        err.message()
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "refused after {:?}, before max_wait_for_room",
        started.elapsed()
    );
    h.fake
        .wait_for(Duration::from_secs(10), "m0", |r| {
            r.iter().any(|x| x.conversation == "stuck")
        })
        .await;
    // The line is free again: the next Send is accepted and follows m0 directly.
    h.send("stuck", "m1").await.unwrap();
    h.fake
        .wait_for(Duration::from_secs(10), "m1", |r| {
            r.iter().filter(|x| x.conversation == "stuck").count() == 2
        })
        .await;
    let texts: Vec<String> = h.fake.texts("stuck");
    assert_eq!(texts, ["m0", "m1"]);
}

/// A call abandoned while it waits (its deadline passed) leaves the line: the room that frees
/// up next goes to the Send after it, and the abandoned message is never sent. Were it still
/// waiting in the gateway, it would be woken first and delivered before m1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_abandoned_while_waiting_is_never_sent() {
    let h = start_with(|c| {
        c.delivery.max_pending_per_conversation = 1;
        c.delivery.max_wait_for_room = Duration::from_secs(30);
    })
    .await;
    h.fake.set_latency("deadline", Duration::from_secs(1));
    h.send("deadline", "m0").await.unwrap();
    let mut req = tonic::Request::new(pb::SendRequest {
        message: Some(h.text("deadline", "gave up")),
        ..Default::default()
    });
    req.set_timeout(Duration::from_millis(100));
    let err = h.client.clone().send(req).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    h.send("deadline", "m1").await.unwrap();
    h.fake
        .wait_for(Duration::from_secs(10), "two messages", |r| {
            r.iter().filter(|x| x.conversation == "deadline").count() == 2
        })
        .await;
    assert_eq!(h.fake.texts("deadline"), ["m0", "m1"]);
}

/// Shutdown answers a Send waiting for room at once (UNAVAILABLE, as any Send then) rather
/// than holding its call open while the queues drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_a_send_waiting_for_room() {
    let h = start_with(|c| {
        c.delivery.max_pending_per_conversation = 1;
        c.delivery.max_wait_for_room = Duration::from_secs(60);
        c.server.shutdown_grace = Duration::from_secs(1);
    })
    .await;
    // m0 outlasts the grace: nothing but shutdown itself can end the second Send's wait
    // before the drain gives up.
    h.fake.set_latency("draining", Duration::from_secs(20));
    h.send("draining", "m0").await.unwrap();
    let mut client = h.client.clone();
    let address = h.address("draining");
    let waiting =
        tokio::spawn(async move { send_text(&mut client, &address, "waits".into()).await });
    // Set-up only: a Send arriving after shutdown began is refused the same way.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = tokio::spawn(h.gateway.shutdown());
    let err = waiting.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        !stopping.is_finished(),
        "the waiting Send was answered only once the drain had ended"
    );
    stopping.await.unwrap().unwrap();
}

/// A gateway on a given config, stoppable so another can open the same outbox.
struct HarnessLite {
    gateway: channel_gateway::server::RunningGateway,
    client: ChannelGatewayClient<tonic::transport::Channel>,
}

impl HarnessLite {
    async fn start(config: channel_gateway::config::Config) -> Self {
        // The previous gateway's workers let go of the outbox file once idle.
        let deadline = Instant::now() + Duration::from_secs(10);
        let gateway = loop {
            match channel_gateway::server::start(config.clone()).await {
                Ok(g) => break g,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("gateway did not start: {e}"),
            }
        };
        let client = ChannelGatewayClient::connect(format!("http://{}", gateway.addr))
            .await
            .unwrap();
        Self { gateway, client }
    }

    async fn stop(self) {
        drop(self.client);
        self.gateway.shutdown().await.unwrap();
    }
}

/// The delivering mark runs at most one message ahead of the channel, so a crash can flag only
/// the message in flight and the next one of its conversation as possible duplicates
/// (docs/delivery.md, the duplicate flag): while the first of three is on its way, the second is marked and the third is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_next_message_is_marked_ahead_of_the_call() {
    let h = start().await;
    let mut c = h.client.clone();
    h.fake.set_latency("ahead", Duration::from_millis(1500));
    let ids: Vec<String> = c
        .send_batch(pb::SendBatchRequest {
            messages: ["one", "two", "three"]
                .iter()
                .map(|t| h.text("ahead", t))
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .into_iter()
        .map(|r| r.message_id)
        .collect();
    let state = |id: String| {
        let mut c = h.client.clone();
        async move {
            c.get_delivery(pb::GetDeliveryRequest { message_id: id })
                .await
                .unwrap()
                .into_inner()
                .delivery
                .unwrap()
                .state
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while state(ids[1].clone()).await != pb::DeliveryState::Delivering as i32 {
        assert!(
            Instant::now() < deadline,
            "the second message was never marked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        state(ids[0].clone()).await,
        pb::DeliveryState::Delivering as i32,
        "the first is still on its way"
    );
    assert_eq!(
        state(ids[2].clone()).await,
        pb::DeliveryState::Accepted as i32,
        "the third is not marked before the second goes out"
    );
    h.fake
        .wait_for(Duration::from_secs(30), "all three", |r| {
            r.iter().filter(|x| x.conversation == "ahead").count() == 3
        })
        .await;
    let texts: Vec<String> = h.fake.texts("ahead");
    assert_eq!(texts, ["one", "two", "three"]);
}
