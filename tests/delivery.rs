//! Ordering, parallelism, batching, typing, proactive starts, tokens and delivery outcomes,
//! through a real gRPC client, the real gateway, and a fake connector on 127.0.0.1.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use serde_json::json;
use tonic::Code;

use channel_gateway::api::pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_conversations_of_two_hundred_keep_order_under_concurrency() {
    let h = start().await;
    h.fake.set_jitter(Duration::from_millis(2));
    let mut tasks = Vec::new();
    // Two concurrent senders per conversation: each sender's own sequence must stay in order,
    // and the gateway must never have two activities of one conversation in flight.
    for c in 0..50 {
        for s in 0..2 {
            let client = h.client.clone();
            let conv = format!("conv-{c}");
            let address = h.address(&conv);
            tasks.push(tokio::spawn(async move {
                let mut client = client;
                for i in 0..100 {
                    send_text(&mut client, &address, format!("s{s}-{i}"))
                        .await
                        .unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    h.fake
        .wait_for(Duration::from_secs(120), "10,000 activities", |r| {
            r.len() >= 10_000
        })
        .await;
    let received = h.fake.received();
    assert_eq!(received.len(), 10_000, "no duplicates, nothing lost");
    for c in 0..50 {
        let conv = format!("conv-{c}");
        let got = h.fake.for_conversation(&conv);
        assert_eq!(got.len(), 200, "{conv}");
        for s in 0..2 {
            let seq: Vec<u32> = got
                .iter()
                .filter_map(|r| {
                    r.text()
                        .strip_prefix(&format!("s{s}-"))
                        .map(|n| n.parse().unwrap())
                })
                .collect();
            assert_eq!(
                seq,
                (0..100).collect::<Vec<_>>(),
                "{conv} sender {s} out of order"
            );
        }
        assert_eq!(
            h.fake.max_in_flight(&conv),
            1,
            "{conv}: next message started before the previous was acknowledged"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_conversation_does_not_delay_the_others() {
    let h = start().await;
    h.fake.set_latency("slow", Duration::from_millis(1500));
    for i in 0..3 {
        h.send("slow", &format!("slow-{i}")).await.unwrap();
    }
    let mut tasks = Vec::new();
    for c in 0..5 {
        let mut client = h.client.clone();
        let msgs: Vec<pb::Message> = (0..20)
            .map(|i| h.text(&format!("fast-{c}"), &format!("f{i}")))
            .collect();
        tasks.push(tokio::spawn(async move {
            for m in msgs {
                let r = client
                    .send(pb::SendRequest {
                        message: Some(m),
                        wait: pb::WaitMode::Delivered as i32,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(r.state, pb::DeliveryState::Delivered as i32);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let slow_done = h.fake.for_conversation("slow").len();
    assert!(
        slow_done <= 1,
        "the fast conversations waited for the slow one ({slow_done} slow delivered first)"
    );
    let fast = h
        .fake
        .received()
        .iter()
        .filter(|r| r.conversation.starts_with("fast-"))
        .count();
    assert_eq!(fast, 100);
    h.fake
        .wait_for(Duration::from_secs(20), "slow conversation", |r| {
            r.iter().filter(|x| x.conversation == "slow").count() == 3
        })
        .await;
    let slow: Vec<String> = h.fake.texts("slow");
    assert_eq!(slow, ["slow-0", "slow-1", "slow-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_is_contiguous_while_other_sends_race_it() {
    let h = start().await;
    h.fake.set_jitter(Duration::from_millis(1));
    let racer = {
        let mut client = h.client.clone();
        let address = h.address("shared");
        tokio::spawn(async move {
            for i in 0..150 {
                send_text(&mut client, &address, format!("single-{i}"))
                    .await
                    .unwrap();
            }
        })
    };
    let mut batches = Vec::new();
    for b in 0..5 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let msgs: Vec<pb::Message> = (0..20)
            .map(|i| h.text("shared", &format!("batch{b}-{i}")))
            .collect();
        let r = h
            .client
            .clone()
            .send_batch(pb::SendBatchRequest {
                messages: msgs,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.results.len(), 20);
        batches.push(b);
    }
    racer.await.unwrap();
    h.fake
        .wait_for(Duration::from_secs(60), "all of shared", |r| r.len() == 250)
        .await;
    let texts: Vec<String> = h.fake.texts("shared");
    for b in batches {
        let start = texts
            .iter()
            .position(|t| t == &format!("batch{b}-0"))
            .unwrap();
        let expected: Vec<String> = (0..20).map(|i| format!("batch{b}-{i}")).collect();
        assert_eq!(
            &texts[start..start + 20],
            expected.as_slice(),
            "batch {b} was interleaved"
        );
    }
    let singles: Vec<&String> = texts.iter().filter(|t| t.starts_with("single-")).collect();
    let expected: Vec<String> = (0..150).map(|i| format!("single-{i}")).collect();
    assert_eq!(singles, expected.iter().collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_lands_in_line_and_keep_alive_stops_at_the_next_message() {
    let h = start_with(|c| {
        c.channels.botframework.typing_interval = Duration::from_millis(150);
    })
    .await;
    h.fake.set_latency("t", Duration::from_millis(30));
    let mut client = h.client.clone();
    h.send("t", "before").await.unwrap();
    client
        .send_typing(pb::SendTypingRequest {
            address: Some(h.address("t")),
            keep_alive: None,
        })
        .await
        .unwrap();
    h.send("t", "after").await.unwrap();
    h.fake
        .wait_for(Duration::from_secs(10), "3 activities", |r| r.len() == 3)
        .await;
    let kinds: Vec<String> = h
        .fake
        .for_conversation("t")
        .iter()
        .map(|r| format!("{}:{}", r.kind(), r.text()))
        .collect();
    assert_eq!(kinds, ["message:before", "typing:", "message:after"]);

    client
        .send_typing(pb::SendTypingRequest {
            address: Some(h.address("k")),
            keep_alive: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
        })
        .await
        .unwrap();
    h.fake
        .wait_for(Duration::from_secs(10), "typing repeated", |r| {
            r.iter()
                .filter(|x| x.conversation == "k" && x.kind() == "typing")
                .count()
                >= 3
        })
        .await;
    h.send("k", "done").await.unwrap();
    h.fake
        .wait_for(Duration::from_secs(10), "message after typing", |r| {
            r.iter()
                .any(|x| x.conversation == "k" && x.text() == "done")
        })
        .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let k = h.fake.for_conversation("k");
    assert_eq!(
        k.last().unwrap().text(),
        "done",
        "typing went on after the next message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proactive_start_returns_the_new_address_and_messages_follow_it() {
    let h = start().await;
    let mut address = h.address("");
    address.conversation = None;
    let r = h
        .client
        .clone()
        .send_proactive(pb::SendProactiveRequest {
            address: Some(address),
            messages: vec![
                pb::Message {
                    text: "hello".into(),
                    ..Default::default()
                },
                pb::Message {
                    text: "second".into(),
                    ..Default::default()
                },
            ],
            options: Some(pb::ProactiveOptions {
                topic_name: "Alerts".into(),
                ..Default::default()
            }),
            wait: pb::WaitMode::Delivered as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let new = r.address.unwrap();
    let conv = new.conversation.as_ref().unwrap().id.clone();
    assert_eq!(conv, "created:1");
    assert_eq!(r.results.len(), 2);
    assert!(
        r.results
            .iter()
            .all(|x| x.state == pb::DeliveryState::Delivered as i32)
    );
    let received = h.fake.received();
    assert_eq!(received[0].path, "/v3/conversations");
    assert_eq!(received[0].body["bot"]["id"], BOT);
    assert_eq!(received[0].body["members"][0]["id"], "29:user-1");
    assert_eq!(received[0].body["topicName"], "Alerts");
    assert!(
        received[0]
            .authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer "))
    );
    let texts: Vec<&str> = received[1..].iter().map(|r| r.text()).collect();
    assert_eq!(texts, ["hello", "second"]);
    assert!(received[1..].iter().all(|r| r.conversation == conv));

    // The saved address works for the next Send.
    h.client
        .clone()
        .send(pb::SendRequest {
            message: Some(pb::Message {
                address: Some(Box::new(new)),
                text: "later".into(),
                ..Default::default()
            }),
            wait: pb::WaitMode::Delivered as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let last = h.fake.received().last().unwrap().clone();
    assert_eq!(
        (last.conversation.as_str(), last.text()),
        ("created:1", "later")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_fetched_once_and_reused_even_when_its_endpoint_says_it_expires_at_once() {
    let h = start_with(|c| {
        c.channels.botframework.token_refresh_margin = Duration::from_secs(300);
    })
    .await;
    // A token endpoint that says its tokens expire at once must not make the gateway fetch a
    // token before every message (the lifetime has a floor, and half of it stays usable
    // whatever the margin). When a token is refreshed is unit-tested in the client.
    *h.fake.state.token_expires_in.lock().unwrap() = 0;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut client = h.client.clone();
        let m = h.text(&format!("tk-{i}"), "x");
        tasks.push(tokio::spawn(async move {
            client
                .send(pb::SendRequest {
                    message: Some(m),
                    wait: pb::WaitMode::Delivered as i32,
                    ..Default::default()
                })
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        h.fake.token_requests(),
        1,
        "20 concurrent first sends share one token fetch"
    );
    let body = h.fake.state.token_requests.lock().unwrap()[0].clone();
    assert!(
        body.contains("grant_type=client_credentials")
            && body.contains(&format!("client_id={BOT}"))
    );
    assert!(
        h.fake
            .received()
            .iter()
            .all(|r| r.authorization.as_deref() == Some("Bearer tok-1"))
    );

    for i in 0..5 {
        h.client
            .clone()
            .send(pb::SendRequest {
                message: Some(h.text(&format!("tk-later-{i}"), "y")),
                wait: pb::WaitMode::Delivered as i32,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert_eq!(h.fake.token_requests(), 1, "the token is reused");

    // A 401 from the connector forces one refresh and one retry.
    h.fake.script(
        "tk-401",
        vec![Scripted {
            status: 401,
            body: json!({"error": {"code": "Unauthorized", "message": "token revoked"}}),
            retry_after: None,
        }],
    );
    h.client
        .clone()
        .send(pb::SendRequest {
            message: Some(h.text("tk-401", "z")),
            wait: pb::WaitMode::Delivered as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(h.fake.token_requests(), 2);
    assert_eq!(
        h.fake.for_conversation("tk-401")[0]
            .authorization
            .as_deref(),
        Some("Bearer tok-2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_never_sent_to_a_host_outside_the_allow_list() {
    let h = start().await;
    // `localhost` reaches the same fake, but only 127.0.0.1 is allowed.
    let mut m = h.text("outside", "leak?");
    m.address.as_mut().unwrap().service_url = format!("http://localhost:{}/", h.fake.addr.port());
    let err = h
        .client
        .clone()
        .send(pb::SendRequest {
            message: Some(m),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("message.address.service_url"),
        "{}",
        err.message()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(h.fake.received().is_empty());
    assert_eq!(h.fake.token_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_delivered_returns_the_channel_id_or_the_channel_error() {
    let h = start().await;
    let r = h
        .client
        .clone()
        .send(pb::SendRequest {
            message: Some(h.text("d", "hi")),
            wait: pb::WaitMode::Delivered as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32);
    assert_eq!(r.receipts.len(), 1);
    assert!(r.receipts[0].native_id.starts_with("activity-"));
    assert_eq!(r.receipts[0].conversation_id, "d");

    h.fake.script(
        "refused",
        vec![Scripted {
            status: 403,
            body: json!({"error": {"code": "BotNotInConversationRoster", "message": "The bot is not part of the conversation roster."}}),
            retry_after: None,
        }],
    );
    let err = h
        .client
        .clone()
        .send(pb::SendRequest {
            message: Some(h.text("refused", "hi")),
            wait: pb::WaitMode::Delivered as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("BotNotInConversationRoster"),
        "{}",
        err.message()
    );
    assert!(
        err.message()
            .contains("not part of the conversation roster"),
        "{}",
        err.message()
    );
    use tonic_types::StatusExt;
    let info = err.get_details_error_info().unwrap();
    assert_eq!(info.reason, "BotNotInConversationRoster");
    assert_eq!(info.metadata["http_status"], "403");
    assert_eq!(info.metadata["permanent"], "true");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_answers_are_retried_in_place_honouring_retry_after() {
    let h = start().await;
    h.fake.script(
        "busy",
        vec![
            Scripted {
                status: 429,
                body: json!({"error": {"code": "TooManyRequests", "message": "slow down"}}),
                retry_after: Some(1),
            },
            Scripted {
                status: 503,
                body: json!({}),
                retry_after: None,
            },
        ],
    );
    let first = tokio::time::Instant::now();
    for i in 0..3 {
        h.send("busy", &format!("m{i}")).await.unwrap();
    }
    h.fake
        .wait_for(Duration::from_secs(20), "3 delivered", |r| r.len() == 3)
        .await;
    let texts: Vec<String> = h.fake.texts("busy");
    assert_eq!(
        texts,
        ["m0", "m1", "m2"],
        "the retried message stayed at the head of the line"
    );
    assert!(
        first.elapsed() >= Duration::from_secs(1),
        "Retry-After was honoured"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_errors_name_the_field() {
    let h = start().await;
    let mut c = h.client.clone();
    let send = |m: Option<pb::Message>| pb::SendRequest {
        message: m,
        ..Default::default()
    };

    let cases: Vec<(pb::SendRequest, Code, &str)> = vec![
        (send(None), Code::InvalidArgument, "message"),
        (
            send(Some(pb::Message {
                text: "x".into(),
                ..Default::default()
            })),
            Code::InvalidArgument,
            "message.address",
        ),
        (
            send(Some({
                let mut m = h.text("a", "x");
                m.address.as_mut().unwrap().channel_id = "carrier-pigeon".into();
                m
            })),
            Code::InvalidArgument,
            "message.address.channel_id",
        ),
        (
            send(Some({
                let mut m = h.text("a", "x");
                m.address.as_mut().unwrap().conversation = None;
                m
            })),
            Code::InvalidArgument,
            "message.address.conversation.id",
        ),
        (
            send(Some(h.text("a", ""))),
            Code::InvalidArgument,
            "message",
        ),
        (
            send(Some(pb::Message {
                attachments: vec![pb::Attachment {
                    content: Some(pb::attachment::Content::Hero(pb::HeroCard {
                        title: "t".into(),
                        buttons: vec![pb::CardAction {
                            r#type: pb::ActionType::OpenUrl as i32,
                            title: "Go".into(),
                            value: "not a url".into(),
                            ..Default::default()
                        }],
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..h.text("a", "")
            })),
            Code::InvalidArgument,
            "message.attachments[0].hero.buttons[0].value",
        ),
        (
            send(Some(h.text("a", &"x".repeat(300_000)))),
            Code::InvalidArgument,
            "message",
        ),
    ];
    for (req, code, field) in cases {
        let err = c.send(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{field}: {}", err.message());
        let fields = bad_fields(&err);
        assert!(
            fields.iter().any(|f| f == field),
            "expected field {field}, got {fields:?} ({})",
            err.message()
        );
    }

    // A batch across conversations names the odd message.
    let err = c
        .send_batch(pb::SendBatchRequest {
            messages: vec![h.text("a", "1"), h.text("b", "2")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&err), ["messages[1].address"]);

    // A known channel without configuration is a precondition, not bad input.
    let mut m = h.text("a", "x");
    m.address.as_mut().unwrap().channel_id = "facebook".into();
    let err = c.send(send(Some(m))).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());

    // A bot without credentials cannot send.
    let mut m = h.text("a", "x");
    m.address.as_mut().unwrap().bot.as_mut().unwrap().id = "stranger".into();
    let err = c.send(send(Some(m))).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());

    // A service URL outside the allow-list.
    let mut m = h.text("a", "x");
    m.address.as_mut().unwrap().service_url = "https://attacker.example/".into();
    let err = c.send(send(Some(m))).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(bad_fields(&err), ["message.address.service_url"]);

    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        h.fake.received().is_empty(),
        "nothing invalid reached the channel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_accepts_once() {
    let h = start().await;
    let req = pb::SendRequest {
        message: Some(h.text("idem", "once")),
        idempotency_key: "k-1".into(),
        ..Default::default()
    };
    let a = h
        .client
        .clone()
        .send(req.clone())
        .await
        .unwrap()
        .into_inner();
    let b = h.client.clone().send(req).await.unwrap().into_inner();
    assert_eq!(a.message_id, b.message_id);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.fake.for_conversation("idem").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_go_to_the_incoming_activity() {
    let h = start().await;
    let mut m = h.text("r", "answer");
    m.address.as_mut().unwrap().id = "incoming-7".into();
    h.client
        .clone()
        .send(pb::SendRequest {
            message: Some(m),
            wait: pb::WaitMode::Delivered as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let got = h.fake.for_conversation("r");
    assert_eq!(got[0].reply_to.as_deref(), Some("incoming-7"));
    assert_eq!(got[0].body["replyToId"], "incoming-7");
    let ids: HashSet<_> = got.iter().map(|r| r.path.clone()).collect();
    assert_eq!(ids.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_workers_are_evicted_without_losing_messages() {
    // An idle timeout of 1 ms makes workers evict themselves all the time, so sends keep racing
    // the eviction decision across many conversations at once.
    let h = start_with(|c| c.delivery.idle_timeout = Duration::from_millis(1)).await;
    let mut tasks = Vec::new();
    for c in 0..40 {
        let mut client = h.client.clone();
        let address = h.address(&format!("idle-{c}"));
        tasks.push(tokio::spawn(async move {
            for i in 0..60u64 {
                send_text(&mut client, &address, format!("m{i}"))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_micros(rand::random::<u64>() % 1500)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    h.fake
        .wait_for(Duration::from_secs(30), "2400 messages", |r| {
            r.len() == 2400
        })
        .await;
    for c in 0..40 {
        let texts: Vec<String> = h
            .fake
            .for_conversation(&format!("idle-{c}"))
            .iter()
            .map(|r| r.text().to_string())
            .collect();
        assert_eq!(texts, (0..60).map(|i| format!("m{i}")).collect::<Vec<_>>());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        h.gateway.dispatcher.active_workers(),
        0,
        "idle workers evicted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_refuses_new_sends_and_drains_the_queues() {
    let h = start().await;
    h.fake.set_latency("drain", Duration::from_millis(150));
    for i in 0..5 {
        h.send("drain", &format!("m{i}")).await.unwrap();
    }
    let client = h.client.clone();
    let probe = h.text("drain", "too late");
    let stopping = tokio::spawn(h.gateway.shutdown());
    // New sends are refused while the queue drains.
    let mut refused = None;
    for _ in 0..50 {
        match client
            .clone()
            .send(pb::SendRequest {
                message: Some(probe.clone()),
                ..Default::default()
            })
            .await
        {
            Err(e) => {
                refused = Some(e);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    let refused = refused.expect("a send during shutdown was accepted");
    assert!(matches!(refused.code(), Code::Unavailable), "{refused:?}");
    stopping.await.unwrap().unwrap();
    let texts: Vec<String> = h.fake.texts("drain");
    assert_eq!(
        &texts[..5],
        ["m0", "m1", "m2", "m3", "m4"],
        "accepted messages drained before exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_not_sent_and_reported() {
    let h = start().await;
    h.fake.set_latency("exp", Duration::from_millis(400));
    h.send("exp", "first").await.unwrap();
    let soon = std::time::SystemTime::now() + Duration::from_millis(100);
    let mut m = h.text("exp", "stale");
    m.expiration = Some(prost_types::Timestamp::from(soon));
    let err = h
        .client
        .clone()
        .send(pb::SendRequest {
            message: Some(m),
            wait: pb::WaitMode::Delivered as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    h.send("exp", "third").await.unwrap();
    h.fake
        .wait_for(Duration::from_secs(10), "two messages", |r| r.len() == 2)
        .await;
    let texts: Vec<String> = h.fake.texts("exp");
    assert_eq!(texts, ["first", "third"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_batch_window_groups_sends_and_keeps_order() {
    let h = start_with(|c| c.delivery.auto_batch_delay = Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    for i in 0..4 {
        h.send("ab", &format!("m{i}")).await.unwrap();
    }
    h.fake
        .wait_for(Duration::from_secs(10), "4 messages", |r| r.len() == 4)
        .await;
    let got = h.fake.for_conversation("ab");
    assert!(
        got[0].at.duration_since(started) >= Duration::from_millis(300),
        "the window was not waited"
    );
    let texts: Vec<&str> = got.iter().map(|r| r.text()).collect();
    assert_eq!(texts, ["m0", "m1", "m2", "m3"]);
}

/// A 429 for one Teams conversation pauses that conversation only: Teams limits each bot per
/// conversation, and the host's other conversations go on. (Every conversation of the host
/// waited out the pause before.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_pauses_its_conversation_not_the_hosts_others() {
    let h = start_with(|c| c.delivery.max_retry_delay = Duration::from_secs(10)).await;
    h.fake.script(
        "limited",
        vec![Scripted {
            status: 429,
            body: json!({"error": {"code": "TooManyRequests", "message": "slow down"}}),
            retry_after: Some(3),
        }],
    );
    h.send("limited", "a").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let refused_at = loop {
        if let Some((at, _)) = h.fake.state.refused.lock().unwrap().first().cloned() {
            break at;
        }
        assert!(std::time::Instant::now() < deadline, "no 429 given");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Give the 429 answer time to travel back to the gateway; the pause counts from there.
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.client
        .clone()
        .send(pb::SendRequest {
            message: Some(h.text("neighbour", "b")),
            wait: pb::WaitMode::Delivered as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let b = h.fake.for_conversation("neighbour")[0].at;
    assert!(
        b.duration_since(refused_at) < Duration::from_millis(2000),
        "another conversation of the host waited {:?} for a 429 it was not given",
        b.duration_since(refused_at)
    );
    // The refused conversation itself waits out its Retry-After.
    h.fake
        .wait_for(
            Duration::from_secs(20),
            "the refused message, retried",
            |r| r.iter().any(|x| x.conversation == "limited"),
        )
        .await;
    let a = h.fake.for_conversation("limited")[0].at;
    assert!(
        a.duration_since(refused_at) >= Duration::from_millis(2900),
        "retried {:?} after a 429 with Retry-After: 3",
        a.duration_since(refused_at)
    );
}

/// With `teams_pacing` (the default), a Teams conversation is sent no faster than Teams'
/// documented budget per bot per conversation: a few at once, then spaced, never a 429 needed.
/// (Nothing paced a Bot Framework conversation before: all six went at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teams_conversation_is_paced_within_its_documented_budget() {
    let h = start_with(|c| c.channels.botframework.teams_pacing = true).await;
    let messages = (0..6).map(|i| h.text("paced", &format!("m{i}"))).collect();
    h.client
        .clone()
        .send_batch(pb::SendBatchRequest {
            messages,
            ..Default::default()
        })
        .await
        .unwrap();
    h.fake
        .wait_for(Duration::from_secs(20), "six paced messages", |r| {
            r.len() == 6
        })
        .await;
    let got = h.fake.for_conversation("paced");
    let texts: Vec<&str> = got.iter().map(|r| r.text()).collect();
    assert_eq!(texts, ["m0", "m1", "m2", "m3", "m4", "m5"]);
    // Four at once, then two a second (8 per 2 s, of which 4 as a burst): the sixth goes about
    // a second after the first. (Paced from the first, the fourth would go 1.5 s after it.)
    let after = |i: usize| got[i].at.duration_since(got[0].at);
    assert!(after(3) < Duration::from_millis(1000), "{:?}", after(3));
    assert!(after(5) >= Duration::from_millis(900), "{:?}", after(5));
}

/// A message far back in its line keeps its requests without their bodies until its turn
/// (`delivery::SHED_AFTER`), then is rendered again: it must reach the channel exactly as the
/// ones that kept their bodies, and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_far_back_in_a_long_line_go_out_rendered_again_and_in_order() {
    let h = common::start().await;
    h.fake.set_latency("deep", Duration::from_secs(2));
    let address = h.address("deep");
    let mut client = h.client.clone();
    for i in 0..60 {
        common::send_text(&mut client, &address, format!("m{i}"))
            .await
            .unwrap();
    }
    h.fake.set_latency("deep", Duration::ZERO);
    h.fake
        .wait_for(Duration::from_secs(20), "60 activities", |r| {
            r.iter().filter(|x| x.conversation == "deep").count() == 60
        })
        .await;
    let got = h.fake.for_conversation("deep");
    let texts: Vec<&str> = got.iter().map(|r| r.text()).collect();
    let want: Vec<String> = (0..60).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, want);
    let without_text = |r: &common::Received| {
        let mut b = r.body.clone();
        b.as_object_mut().unwrap().remove("text");
        b
    };
    for r in &got[1..] {
        assert_eq!(without_text(r), without_text(&got[0]), "{}", r.text());
    }
}
