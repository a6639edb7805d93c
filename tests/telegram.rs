//! The Telegram channel end to end: a real gRPC client, the real gateway (in process, and the
//! binary for the log test), and a fake Telegram Bot API on 127.0.0.1 that records every call
//! and answers as Telegram does or as scripted.
//!
//! Pacing (`channels.telegram.pacing`) is off in these tests: they send a chat 100 messages at
//! once, far above Telegram's documented 1 per second, and only a 429 may slow a chat down.

// For its watchdog and binary helpers; both harnesses load tests/fake_http for themselves.
#[allow(clippy::duplicate_mod)]
mod common;
#[path = "telegram_support/mod.rs"]
mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;
use tonic::Code;

use channel_gateway::api::pb::{self, channel_gateway_client::ChannelGatewayClient};

/// A bound for a busy 2-core machine, never an assertion on speed.
const GENEROUS: Duration = Duration::from_secs(120);

fn assert_no_token(what: &str, text: &str) {
    assert!(!text.contains(TOKEN), "the bot token leaked into {what}");
    assert!(
        !text.contains(TOKEN_SECRET),
        "the token's secret half leaked into {what}"
    );
}

/// What GetDelivery says of `id` once `done` holds for it (the outbox records a state just
/// after the channel's answer, so the fake may have seen the call a moment earlier).
async fn delivery_when(
    client: &mut ChannelGatewayClient<tonic::transport::Channel>,
    id: &str,
    done: impl Fn(&pb::Delivery) -> bool,
) -> pb::Delivery {
    let deadline = Instant::now() + GENEROUS;
    loop {
        let d = common::delivery(client, id).await;
        if done(&d) || Instant::now() > deadline {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn settled(d: &pb::Delivery) -> bool {
    d.state == pb::DeliveryState::Delivered as i32 || d.state == pb::DeliveryState::Failed as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_chats_receive_their_hundred_messages_each_in_order() {
    let _watchdog = common::Watchdog::start();
    let h = start().await;
    const CHATS: usize = 20;
    const PER_CHAT: usize = 100;
    let chats: Vec<String> = (0..CHATS).map(|c| (100_000 + c).to_string()).collect();
    let expected = |chat: &str| -> Vec<String> {
        (0..PER_CHAT)
            .map(|i| format!("chat {chat} message {i:03}"))
            .collect()
    };

    // One sender per chat, all at once: the order of a chat is the order its sender was
    // answered in.
    let mut tasks = Vec::new();
    for chat in chats.clone() {
        let mut client = h.client.clone();
        let texts = expected(&chat);
        tasks.push(tokio::spawn(async move {
            for t in texts {
                client
                    .send(send_req(text(&chat, &t), pb::WaitMode::Accepted))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    h.fake
        .wait_for(GENEROUS, "every message of every chat", |r| {
            r.iter().filter(|x| x.ok()).count() >= CHATS * PER_CHAT
        })
        .await;

    for chat in &chats {
        assert_eq!(
            h.fake.delivered_texts(chat),
            expected(chat),
            "chat {chat}: missing, repeated or out of order"
        );
        assert_eq!(
            h.fake.max_in_flight(chat),
            1,
            "chat {chat}: a call started before the previous one was answered"
        );
    }
    let received = h.fake.received();
    assert_eq!(
        received.len(),
        CHATS * PER_CHAT,
        "nothing refused, nothing extra"
    );
    for r in &received {
        assert_eq!(r.method, "sendMessage");
        assert_eq!(r.token, TOKEN, "the token travels in the path");
        assert!(
            r.content_type
                .as_deref()
                .is_some_and(|c| c.starts_with("application/json")),
            "{:?}",
            r.content_type
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_control_pauses_the_chat_for_retry_after_then_keeps_the_order() {
    let _watchdog = common::Watchdog::start();
    let h = start().await;
    let mut c = h.client.clone();
    let (busy, other) = ("200001", "200002");
    h.fake.flood(busy, 1, 2);

    let first = c
        .send(send_req(text(busy, "m0"), pb::WaitMode::Accepted))
        .await
        .unwrap()
        .into_inner();
    h.fake
        .wait_for(GENEROUS, "the 429", |r| r.iter().any(|x| x.status == 429))
        .await;
    // Sent during the pause: they wait behind m0, which is retried first.
    for t in ["m1", "m2"] {
        c.send(send_req(text(busy, t), pb::WaitMode::Accepted))
            .await
            .unwrap();
    }
    c.send(send_req(text(other, "elsewhere"), pb::WaitMode::Accepted))
        .await
        .unwrap();
    h.fake
        .wait_for(GENEROUS, "every message", |r| {
            r.iter().filter(|x| x.ok()).count() == 4
        })
        .await;

    let calls = h.fake.for_chat(busy);
    assert_eq!(
        calls
            .iter()
            .map(|r| (r.text(), r.status))
            .collect::<Vec<_>>(),
        [("m0", 429), ("m0", 200), ("m1", 200), ("m2", 200)],
        "the limited message was retried at the head of its chat"
    );
    let limited = &calls[0];
    assert_eq!(
        limited.description.as_deref(),
        Some("Too Many Requests: retry after 2")
    );
    for r in &calls[1..] {
        let after = r.at.duration_since(limited.at);
        assert!(
            after >= Duration::from_secs(2),
            "a call reached the chat {after:?} after a 429 with retry_after 2"
        );
    }
    let elsewhere = &h.fake.for_chat(other)[0];
    assert!(elsewhere.ok());
    assert!(
        elsewhere.at.duration_since(limited.at) < Duration::from_secs(2),
        "another chat waited for this chat's pause"
    );

    let d = delivery_when(&mut c, &first.message_id, settled).await;
    assert_eq!(d.state, pb::DeliveryState::Delivered as i32, "{d:?}");
    assert_eq!(d.attempts, 2);
    assert_eq!(d.receipts[0].conversation_id, busy);
    // The 429 gave no message id: the first message of the chat is 1.
    assert_eq!(d.receipts[0].native_id, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_400_fails_only_that_message() {
    let _watchdog = common::Watchdog::start();
    let h = start().await;
    let mut c = h.client.clone();
    let chat = "300001";
    const DESCRIPTION: &str =
        "Bad Request: can't parse entities: Can't find end of the entity starting at byte offset 7";
    h.fake.refuse_marker("REFUSEME", DESCRIPTION);

    let mut ids = Vec::new();
    for t in ["before", "REFUSEME now", "after"] {
        ids.push(
            c.send(send_req(text(chat, t), pb::WaitMode::Accepted))
                .await
                .unwrap()
                .into_inner()
                .message_id,
        );
    }
    let got: Vec<pb::Delivery> = {
        let mut v = Vec::new();
        for id in &ids {
            v.push(delivery_when(&mut c, id, settled).await);
        }
        v
    };
    assert_eq!(
        got.iter().map(|d| d.state).collect::<Vec<_>>(),
        [
            pb::DeliveryState::Delivered as i32,
            pb::DeliveryState::Failed as i32,
            pb::DeliveryState::Delivered as i32
        ]
    );
    let failed = &got[1];
    let e = failed.error.as_ref().unwrap();
    assert_eq!(e.channel, "telegram");
    assert_eq!(
        (e.code.as_str(), e.http_status, e.permanent),
        ("400", 400, true)
    );
    assert_eq!(e.message, DESCRIPTION, "Telegram's description is kept");
    assert_eq!(failed.attempts, 1, "a permanent refusal is not retried");
    assert!(failed.receipts.is_empty());
    assert_eq!(
        (
            got[0].receipts[0].native_id.as_str(),
            got[2].receipts[0].native_id.as_str()
        ),
        ("1", "2"),
        "Telegram's message ids, counting up in the chat"
    );
    assert_eq!(got[2].receipts[0].conversation_id, chat);

    let calls: Vec<(String, u16)> = h
        .fake
        .for_chat(chat)
        .iter()
        .map(|r| (r.text().to_string(), r.status))
        .collect();
    assert_eq!(
        calls,
        [
            ("before".to_string(), 200),
            ("REFUSEME now".to_string(), 400),
            ("after".to_string(), 200)
        ],
        "one call each, in order"
    );

    // Waiting for delivery, the caller gets the refusal as the gRPC status.
    let err = c
        .send(send_req(
            text(chat, "REFUSEME again"),
            pb::WaitMode::Delivered,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("can't parse entities"),
        "{}",
        err.message()
    );
    assert_no_token("the error", &format!("{err:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proactive_goes_to_the_users_chat_and_typing_is_a_chat_action() {
    let _watchdog = common::Watchdog::start();
    let h = start().await;
    let mut c = h.client.clone();
    let r = c
        .send_proactive(pb::SendProactiveRequest {
            address: Some(address("")),
            messages: vec![pb::Message {
                text: "Your order shipped".into(),
                ..Default::default()
            }],
            wait: pb::WaitMode::Delivered as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let new = r.address.unwrap();
    assert_eq!(
        new.conversation.as_ref().map(|c| c.id.as_str()),
        Some(USER),
        "a private chat's id is the user's id"
    );
    assert_eq!(r.results.len(), 1);
    assert_eq!(r.results[0].state, pb::DeliveryState::Delivered as i32);
    assert_eq!(r.results[0].receipts[0].conversation_id, USER);

    c.send_typing(pb::SendTypingRequest {
        address: Some(new.clone()),
        keep_alive: None,
    })
    .await
    .unwrap();
    h.fake
        .wait_for(GENEROUS, "the chat action", |r| r.len() >= 2)
        .await;
    let got = h.fake.received();
    assert_eq!(
        got.len(),
        2,
        "no call but the message and the action: {got:?}"
    );
    assert_eq!(
        (got[0].method.as_str(), got[0].chat(), got[0].text()),
        ("sendMessage", USER.to_string(), "Your order shipped")
    );
    assert_eq!(got[1].method, "sendChatAction");
    assert_eq!(got[1].chat(), USER);
    assert_eq!(got[1].body["action"], "typing");
    assert!(got.iter().all(Received::ok), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_never_appears_in_a_trace_log() {
    let _watchdog = common::Watchdog::start();
    let fake = FakeTelegram::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[admin]
listen = "127.0.0.1:0"

[inbound]
listen = "127.0.0.1:0"

[log]
format = "json"

[delivery]
base_retry_delay = "10ms"
max_retry_delay = "5s"

[channels.telegram]
api_base_url = "{}"
pacing = false

[[channels.telegram.bots]]
bot_id = "{BOT}"
token = "{TOKEN}"
"#,
            fake.base_url()
        ),
    )
    .unwrap();
    let port = common::free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_channel-gateway"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--config",
        ])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        // Everything every crate logs, hyper's and tonic's wire traces included.
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read as it comes: a trace run writes more than a pipe holds, and a full pipe would stall
    // the gateway.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut out = String::new();
            let _ = pipe.read_to_string(&mut out);
            out
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let mut c = ChannelGatewayClient::new(common::binary_channel(port).await);

    // A delivery, a typing indicator, a 429 then its retry, a permanent 400.
    c.send(send_req(text("500001", "hello"), pb::WaitMode::Delivered))
        .await
        .unwrap();
    c.send_typing(pb::SendTypingRequest {
        address: Some(address("500001")),
        keep_alive: None,
    })
    .await
    .unwrap();
    fake.flood("500002", 1, 1);
    c.send(send_req(text("500002", "limited"), pb::WaitMode::Delivered))
        .await
        .unwrap();
    fake.refuse_marker("REFUSEME", "Bad Request: message text is empty");
    let err = c
        .send(send_req(
            text("500003", "REFUSEME"),
            pb::WaitMode::Delivered,
        ))
        .await
        .unwrap_err();
    assert_no_token("a refusal", &format!("{err:?}"));

    // Render shows the placeholder, never the token.
    let r = c
        .render(pb::RenderRequest {
            change: None,
            message: Some(text("500001", "rendered")),
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_no_token("Render", &format!("{r:?}"));
    assert_eq!(
        r.requests[0].url,
        format!("{}/bot<token>/sendMessage", fake.base_url())
    );
    let caps = c
        .get_capabilities(pb::GetCapabilitiesRequest {
            channel_id: "telegram".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_no_token("GetCapabilities", &format!("{caps:?}"));
    assert_eq!(
        caps.capabilities.map(|c| c.implementation).as_deref(),
        Some("telegram")
    );
    // A bot without a token: refused before anything is sent.
    let mut stranger = text("500004", "who am I");
    stranger.address = Some(Box::new(address_as("unknown_bot", "500004")));
    let err = c
        .send(send_req(stranger, pb::WaitMode::Delivered))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert_no_token("the unknown bot's error", &format!("{err:?}"));

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let logs = format!(
        "{}{}",
        stderr.join().unwrap_or_default(),
        stdout.join().unwrap_or_default()
    );

    // The run did what it is meant to judge: the token reached the fake, in the path only.
    let mut received = fake.received();
    // Calls to one chat come in order; a chat action and the next chat's message may cross.
    received.sort_by_key(Received::chat);
    assert_eq!(
        received
            .iter()
            .map(|r| (r.method.as_str(), r.chat(), r.status))
            .collect::<Vec<_>>(),
        [
            ("sendMessage", "500001".to_string(), 200),
            ("sendChatAction", "500001".to_string(), 200),
            ("sendMessage", "500002".to_string(), 429),
            ("sendMessage", "500002".to_string(), 200),
            ("sendMessage", "500003".to_string(), 400),
        ]
    );
    assert!(received.iter().all(|r| r.token == TOKEN));
    assert!(
        logs.lines().count() > 50,
        "too few log lines to judge a trace run: {logs}"
    );
    for line in logs.lines() {
        serde_json::from_str::<Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    for (i, line) in logs.lines().enumerate() {
        assert!(
            !line.contains(TOKEN_SECRET),
            "log line {i} holds the token: {line}"
        );
    }
    assert!(
        logs.contains("sendMessage"),
        "the logs never name a Bot API method: is the channel's logging on?"
    );
}

/// The client alone against the fake, without the gateway: what the fake answers is what the
/// client reads (so the tests above judge the gateway, not a fake the client misunderstands).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reads_the_fakes_answers() {
    use channel_gateway::channels::telegram::client::TelegramClient;
    use channel_gateway::channels::telegram::method_url;
    use channel_gateway::channels::{Body, ErrorCategory, FailureKind, HttpMethod, NativeRequest};

    let fake = FakeTelegram::start().await;
    let config = support::config_for(&fake).channels.telegram;
    let client = TelegramClient::new(config.clone(), Duration::from_secs(10)).unwrap();
    let req = |method: &str, body: Value| NativeRequest {
        method: HttpMethod::Post,
        url: method_url(&config, method),
        body: Body::json(&body).unwrap(),
        credential: BOT.into(),
        rate: Default::default(),
    };
    let text = |chat: i64, t: &str| serde_json::json!({"chat_id": chat, "text": t});

    let r = client
        .execute(&req("sendMessage", text(600001, "a")))
        .await
        .unwrap();
    assert_eq!(
        (r.native_id.as_str(), r.conversation_id.as_str()),
        ("1", "600001")
    );
    let album = serde_json::json!({"chat_id": "600001", "media": [
        {"type": "photo", "media": "https://example.com/1.png"},
        {"type": "photo", "media": "https://example.com/2.png"}
    ]});
    let r = client.execute(&req("sendMediaGroup", album)).await.unwrap();
    assert_eq!(
        (r.native_id.as_str(), r.conversation_id.as_str()),
        ("2", "600001")
    );
    let typing = serde_json::json!({"chat_id": 600001, "action": "typing"});
    let r = client
        .execute(&req("sendChatAction", typing))
        .await
        .unwrap();
    assert_eq!(
        (r.native_id.as_str(), r.conversation_id.as_str()),
        ("", "600001")
    );

    fake.flood("600002", 1, 2);
    let e = client
        .execute(&req("sendMessage", text(600002, "b")))
        .await
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::Retryable);
    assert_eq!(e.retry_after, Some(Duration::from_secs(2)));
    assert_eq!(e.http_status, Some(429));

    fake.refuse_marker("REFUSEME", "Bad Request: chat not found");
    let e = client
        .execute(&req("sendMessage", text(600003, "REFUSEME")))
        .await
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::Permanent);
    assert_eq!(e.category, Some(ErrorCategory::NotFound));
    assert_eq!(e.message, "Bad Request: chat not found");

    // A token the fake does not know: Telegram's 401, and the token is not in the error.
    let mut wrong = config.clone();
    wrong.bots[0].token = channel_gateway::config::Secret::new("1:wrongtoken");
    let e = TelegramClient::new(wrong, Duration::from_secs(10))
        .unwrap()
        .execute(&req("sendMessage", text(600004, "c")))
        .await
        .unwrap_err();
    assert_eq!(e.category, Some(ErrorCategory::Unauthorized));
    assert!(!format!("{e:?}").contains("wrongtoken"), "{e:?}");

    let got = fake.received();
    assert_eq!(got.len(), 6);
    assert_eq!(got[5].token, "1:wrongtoken");
    assert!(got[..5].iter().all(|r| r.token == TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_and_render_speak_for_telegram() {
    let h = start().await;
    let mut c = h.client.clone();
    let caps = c
        .get_capabilities(pb::GetCapabilitiesRequest {
            channel_id: "telegram".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .unwrap();
    assert_eq!(caps.implementation, "telegram");
    assert!(caps.configured, "a bot with a token is configured");
    assert!(caps.proactive && caps.typing);
    assert_eq!(caps.max_text_length, 4096);
    assert_eq!(
        caps.typing_interval,
        Some(prost_types::Duration {
            seconds: 4,
            nanos: 0
        })
    );
    assert!(
        caps.proactive_note.contains("user.id"),
        "{}",
        caps.proactive_note
    );

    let r = c
        .render(pb::RenderRequest {
            message: Some(pb::Message {
                address: Some(Box::new(address("-1001234567890"))),
                text: "**hi** & <bye>".into(),
                ..Default::default()
            }),
            options: None,
            change: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.requests.len(), 1);
    assert_eq!(
        r.requests[0].url,
        format!("{}/bot<token>/sendMessage", h.fake.base_url())
    );
    let body: Value = serde_json::from_str(&r.requests[0].body_json).unwrap();
    assert_eq!(body["chat_id"], -1001234567890i64);
    assert_eq!(body["text"], "<b>hi</b> &amp; &lt;bye&gt;");
    assert_eq!(body["parse_mode"], "HTML");
    assert_no_token("Render", &format!("{r:?}"));
    assert!(h.fake.received().is_empty(), "Render sent something");
}
