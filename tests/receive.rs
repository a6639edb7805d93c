//! Receiving end to end: events signed in the test exactly as each channel signs them, posted
//! over HTTP to a real gateway's webhook listener, read by a real gRPC client on the Receive
//! stream, acked, and answered with `Send` using the event's address unchanged, which must reach
//! the same conversation (Slack thread, Telegram topic, Messenger PSID) at the fake channels.

// Each channel's support module loads the shared fake-server code itself; three fakes in one
// gateway means it is loaded more than once.
#![allow(clippy::duplicate_mod)]

#[path = "facebook_support/mod.rs"]
mod facebook_support;
#[path = "fake_http/mod.rs"]
#[allow(dead_code)]
mod fake_http;
#[path = "slack_support/mod.rs"]
mod slack_support;
#[path = "telegram_support/mod.rs"]
mod telegram_support;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use channel_gateway::api::pb;
use channel_gateway::api::pb::channel_gateway_client::ChannelGatewayClient;
use channel_gateway::config::{Config, Secret, TokenIdentity};
use channel_gateway::server::RunningGateway;

const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const TELEGRAM_SECRET: &str = "tg-hook-secret_42";

struct Harness {
    slack: slack_support::FakeSlack,
    telegram: telegram_support::FakeTelegram,
    graph: facebook_support::FakeGraph,
    gateway: RunningGateway,
    client: ChannelGatewayClient<tonic::transport::Channel>,
    http: reqwest::Client,
}

fn config(
    h: (
        &slack_support::FakeSlack,
        &telegram_support::FakeTelegram,
        &facebook_support::FakeGraph,
    ),
) -> Config {
    let mut c = slack_support::config_for(h.0);
    c.channels.slack.signing_secret = Some(Secret::new(SLACK_SECRET));
    let mut t = telegram_support::config_for(h.1).channels.telegram;
    t.bots[0].secret_token = Some(Secret::new(TELEGRAM_SECRET));
    c.channels.telegram = t;
    c.channels.facebook = facebook_support::config_for(h.2).channels.facebook;
    c.inbound.ack_deadline = Duration::from_millis(800);
    c
}

async fn start_with(edit: impl FnOnce(&mut Config)) -> Harness {
    let slack = slack_support::FakeSlack::start().await;
    let telegram = telegram_support::FakeTelegram::start().await;
    let graph = facebook_support::FakeGraph::start().await;
    let mut c = config((&slack, &telegram, &graph));
    edit(&mut c);
    let (gateway, client) = fake_http::start_gateway(c).await;
    Harness {
        slack,
        telegram,
        graph,
        gateway,
        client,
        http: reqwest::Client::new(),
    }
}

async fn start() -> Harness {
    start_with(|_| {}).await
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hmac_hex(key: &str, parts: &[&[u8]]) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    for p in parts {
        m.update(p);
    }
    m.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Harness {
    fn url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.gateway.inbound_addr.expect("webhook listener")
        )
    }

    /// Posts a Slack Events API body signed as Slack signs it (v0, `ts`, the exact bytes).
    async fn slack_at(&self, body: &[u8], ts: u64, secret: &str) -> u16 {
        let sig = format!(
            "v0={}",
            hmac_hex(secret, &[format!("v0:{ts}:").as_bytes(), body])
        );
        self.http
            .post(self.url("/webhooks/slack/events"))
            .header("content-type", "application/json")
            .header("x-slack-request-timestamp", ts.to_string())
            .header("x-slack-signature", sig)
            .body(body.to_vec())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    async fn slack(&self, body: &Value) -> u16 {
        self.slack_at(&serde_json::to_vec(body).unwrap(), now(), SLACK_SECRET)
            .await
    }

    async fn telegram(&self, update: &Value, secret: Option<&str>) -> u16 {
        let mut r = self
            .http
            .post(self.url(&format!("/webhooks/telegram/{}", telegram_support::BOT)))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(update).unwrap());
        if let Some(s) = secret {
            r = r.header("x-telegram-bot-api-secret-token", s);
        }
        r.send().await.unwrap().status().as_u16()
    }

    /// Posts a Messenger webhook body signed with the app secret (`X-Hub-Signature-256`).
    async fn messenger_raw(&self, body: &[u8], secret: &str) -> u16 {
        self.http
            .post(self.url("/webhooks/facebook"))
            .header("content-type", "application/json")
            .header(
                "x-hub-signature-256",
                format!("sha256={}", hmac_hex(secret, &[body])),
            )
            .body(body.to_vec())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    async fn messenger(&self, body: &Value) -> u16 {
        self.messenger_raw(
            &serde_json::to_vec(body).unwrap(),
            facebook_support::APP_SECRET,
        )
        .await
    }

    async fn receive(&self, sub: pb::ReceiveSubscription) -> Stream {
        receive_on(self.client.clone(), sub)
            .await
            .expect("subscribed")
    }

    async fn send(&self, message: pb::Message) -> pb::SendResponse {
        self.client
            .clone()
            .send(pb::SendRequest {
                message: Some(message),
                wait: pb::WaitMode::Delivered as i32,
                ..Default::default()
            })
            .await
            .expect("send")
            .into_inner()
    }
}

/// One Receive stream: acks go in through `tx`, events come out of `rx`.
struct Stream {
    tx: mpsc::Sender<pb::ReceiveRequest>,
    rx: tonic::Streaming<pb::ReceiveResponse>,
    subscribed: pb::ReceiveSubscribed,
}

async fn receive_on(
    mut client: ChannelGatewayClient<tonic::transport::Channel>,
    sub: pb::ReceiveSubscription,
) -> Result<Stream, tonic::Status> {
    let (tx, input) = mpsc::channel(64);
    tx.send(pb::ReceiveRequest {
        kind: Some(pb::receive_request::Kind::Subscribe(sub)),
    })
    .await
    .unwrap();
    let mut rx = client
        .receive(ReceiverStream::new(input))
        .await?
        .into_inner();
    match rx.message().await? {
        Some(pb::ReceiveResponse {
            kind: Some(pb::receive_response::Kind::Subscribed(subscribed)),
        }) => Ok(Stream { tx, rx, subscribed }),
        other => panic!("expected the subscription first, got {other:?}"),
    }
}

impl Stream {
    async fn next(&mut self) -> pb::ReceivedEvent {
        self.next_within(Duration::from_secs(10))
            .await
            .expect("an event in time")
    }

    async fn next_within(&mut self, d: Duration) -> Option<pb::ReceivedEvent> {
        match tokio::time::timeout(d, self.rx.next()).await {
            Ok(Some(Ok(pb::ReceiveResponse {
                kind: Some(pb::receive_response::Kind::Event(e)),
            }))) => Some(e),
            Ok(other) => panic!("stream: {other:?}"),
            Err(_) => None,
        }
    }

    async fn ack(&self, e: &pb::ReceivedEvent) {
        self.tx
            .send(pb::ReceiveRequest {
                kind: Some(pb::receive_request::Kind::Ack(pb::ReceiveAck {
                    event_ids: vec![e.event_id.clone()],
                })),
            })
            .await
            .unwrap();
    }
}

fn text(e: &pb::ReceivedEvent) -> &str {
    e.message.as_ref().map_or("", |m| m.text.as_str())
}

fn address(e: &pb::ReceivedEvent) -> pb::Address {
    e.message
        .as_ref()
        .and_then(|m| m.address.as_deref().cloned())
        .expect("an address")
}

/// A reply: the event's address unchanged, new text.
fn reply(e: &pb::ReceivedEvent, text: &str) -> pb::Message {
    pb::Message {
        address: Some(Box::new(address(e))),
        text: text.into(),
        ..Default::default()
    }
}

fn slack_message(
    event_id: &str,
    channel: &str,
    ts: &str,
    thread: Option<&str>,
    text: &str,
) -> Value {
    let mut event = json!({
        "type": "message",
        "user": "U0HUMAN",
        "text": text,
        "channel": channel,
        "channel_type": "channel",
        "ts": ts,
        "event_ts": ts,
    });
    if let Some(t) = thread {
        event["thread_ts"] = json!(t);
    }
    json!({
        "token": "XXYYZZverificationtoken",
        "team_id": "T0123TEAM",
        "api_app_id": "A0123APP",
        "type": "event_callback",
        "event_id": event_id,
        "event_time": 1_700_000_000,
        "event": event,
    })
}

fn telegram_update(
    update_id: i64,
    chat: i64,
    topic: Option<i64>,
    message_id: i64,
    text: &str,
) -> Value {
    let mut message = json!({
        "message_id": message_id,
        "from": {"id": 4242, "is_bot": false, "first_name": "Ada"},
        "chat": {"id": chat, "type": "supergroup", "title": "Team", "is_forum": topic.is_some()},
        "date": 1_700_000_000,
        "text": text,
    });
    if let Some(t) = topic {
        message["message_thread_id"] = json!(t);
        message["is_topic_message"] = json!(true);
    }
    json!({"update_id": update_id, "message": message})
}

fn messenger_batch(events: &[(&str, &str, &str)]) -> Value {
    let messaging: Vec<Value> = events
        .iter()
        .enumerate()
        .map(|(i, (psid, mid, text))| {
            json!({
                "sender": {"id": psid},
                "recipient": {"id": facebook_support::PAGE},
                "timestamp": 1_700_000_000_000u64 + i as u64,
                "message": {"mid": mid, "text": text},
            })
        })
        .collect();
    json!({
        "object": "page",
        "entry": [{"id": facebook_support::PAGE, "time": 1_700_000_000_000u64, "messaging": messaging}],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_channels_signed_event_arrives_and_its_address_replies_in_place() {
    let h = start().await;
    let mut s = h.receive(Default::default()).await;
    assert_eq!(s.subscribed.group, "default");

    // Slack: a message in a thread; the reply goes to the same channel and thread.
    let body = slack_message(
        "Ev01",
        "C0123CHAN",
        "1700000123.000200",
        Some("1700000000.000100"),
        "hello from a thread",
    );
    assert_eq!(h.slack(&body).await, 200);
    let e = s.next().await;
    assert_eq!(text(&e), "hello from a thread");
    assert_eq!((e.attempt, e.redelivered), (1, false));
    let native = &e.message.as_ref().unwrap().source_event["slack"];
    assert!(
        format!("{native:?}").contains("Ev01"),
        "the native event rides along"
    );
    h.send(reply(&e, "slack reply")).await;
    s.ack(&e).await;
    let posted = h.slack.posted("C0123CHAN");
    assert_eq!(posted.len(), 1, "{posted:?}");
    assert_eq!(posted[0].text(), "slack reply");
    assert_eq!(posted[0].body["thread_ts"], "1700000000.000100");

    // Telegram: a message in a forum topic; the reply lands in the topic, replying to it.
    assert_eq!(
        h.telegram(
            &telegram_update(9001, -100777, Some(55), 321, "hi from a topic"),
            Some(TELEGRAM_SECRET)
        )
        .await,
        200
    );
    let e = s.next().await;
    assert_eq!(text(&e), "hi from a topic");
    h.send(reply(&e, "telegram reply")).await;
    s.ack(&e).await;
    let sent: Vec<_> = h
        .telegram
        .for_chat("-100777")
        .into_iter()
        .filter(|r| !r.is_typing())
        .collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].text(), "telegram reply");
    assert_eq!(sent[0].body["message_thread_id"], 55);
    assert_eq!(sent[0].body["reply_parameters"]["message_id"], 321);

    // Messenger: the reply goes to the sender's PSID.
    assert_eq!(
        h.messenger(&messenger_batch(&[("PSID-A", "m_1", "hi from messenger")]))
            .await,
        200
    );
    let e = s.next().await;
    assert_eq!(text(&e), "hi from messenger");
    h.send(reply(&e, "messenger reply")).await;
    s.ack(&e).await;
    let got = h.graph.delivered("PSID-A");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].text(), "messenger reply");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_store_nothing() {
    let h = start().await;
    let mut s = h.receive(Default::default()).await;
    let body = serde_json::to_vec(&slack_message(
        "EvBAD",
        "C1",
        "1700000001.000001",
        None,
        "naïve café ☕",
    ))
    .unwrap();
    // A wrong secret, an old timestamp, a body changed after signing (non-ASCII JSON).
    assert_eq!(h.slack_at(&body, now(), "not-the-secret").await, 401);
    assert_eq!(h.slack_at(&body, now() - 600, SLACK_SECRET).await, 401);
    let sig = format!(
        "v0={}",
        hmac_hex(SLACK_SECRET, &[format!("v0:{}:", now()).as_bytes(), &body])
    );
    let changed = String::from_utf8(body.clone())
        .unwrap()
        .replace("café", "cafe")
        .into_bytes();
    let r = h
        .http
        .post(h.url("/webhooks/slack/events"))
        .header("x-slack-request-timestamp", now().to_string())
        .header("x-slack-signature", sig)
        .body(changed)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.text().await.unwrap(), "", "no detail on the wire");
    // Missing headers.
    let r = h
        .http
        .post(h.url("/webhooks/slack/events"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // Telegram: a wrong secret, none at all.
    let update = telegram_update(1, 5, None, 1, "forged");
    assert_eq!(h.telegram(&update, Some("guess")).await, 401);
    assert_eq!(h.telegram(&update, None).await, 401);
    // Messenger: signed with another secret.
    let fb = serde_json::to_vec(&messenger_batch(&[("PSID-X", "m_x", "forged")])).unwrap();
    assert_eq!(h.messenger_raw(&fb, "not-jefe").await, 401);
    assert!(
        s.next_within(Duration::from_millis(300)).await.is_none(),
        "nothing refused was stored"
    );
    // The same body, signed right, goes through.
    assert_eq!(h.slack_at(&body, now(), SLACK_SECRET).await, 200);
    assert_eq!(text(&s.next().await), "naïve café ☕");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_retry_of_a_stored_event_is_answered_and_not_delivered_twice() {
    let h = start().await;
    let body = slack_message("EvRETRY", "C1", "1700000002.000001", None, "once");
    assert_eq!(h.slack(&body).await, 200);
    assert_eq!(h.slack(&body).await, 200, "the retry is answered 2xx");
    let t = telegram_update(77, 5, None, 9, "tg once");
    assert_eq!(h.telegram(&t, Some(TELEGRAM_SECRET)).await, 200);
    assert_eq!(h.telegram(&t, Some(TELEGRAM_SECRET)).await, 200);
    let mut s = h.receive(Default::default()).await;
    let mut got = Vec::new();
    while let Some(e) = s.next_within(Duration::from_millis(500)).await {
        got.push(text(&e).to_string());
        s.ack(&e).await;
    }
    got.sort();
    assert_eq!(got, ["once", "tg once"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_messenger_batch_of_100_from_10_senders_arrives_complete_and_in_order_per_sender() {
    let h = start().await;
    let events: Vec<(String, String, String)> = (0..100)
        .map(|i| {
            (
                format!("PSID-{}", i % 10),
                format!("m_{i}"),
                format!("{}:{}", i % 10, i / 10),
            )
        })
        .collect();
    let refs: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
        .collect();
    assert_eq!(h.messenger(&messenger_batch(&refs)).await, 200);
    let mut s = h
        .receive(pb::ReceiveSubscription {
            max_in_flight: 10,
            ..Default::default()
        })
        .await;
    let mut per_sender: HashMap<String, Vec<u32>> = HashMap::new();
    for _ in 0..100 {
        let e = s.next().await;
        let (sender, n) = text(&e).split_once(':').unwrap();
        per_sender
            .entry(sender.to_string())
            .or_default()
            .push(n.parse().unwrap());
        assert_eq!(address(&e).user.unwrap().id, format!("PSID-{sender}"));
        s.ack(&e).await;
    }
    assert_eq!(per_sender.len(), 10);
    for (sender, seq) in per_sender {
        assert_eq!(seq, (0..10).collect::<Vec<u32>>(), "sender {sender}");
    }
    assert!(s.next_within(Duration::from_millis(200)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_streams_of_one_group_share_conversations_and_a_dead_ones_events_move_to_the_other() {
    let h = start().await;
    let sub = pb::ReceiveSubscription {
        group: "workers".into(),
        max_in_flight: 100,
        ..Default::default()
    };
    let mut a = h.receive(sub.clone()).await;
    let mut b = h.receive(sub).await;
    for i in 0..3 {
        for chat in [11, 22] {
            let u = telegram_update(chat * 100 + i, chat, None, i, &format!("{chat}-{i}"));
            assert_eq!(h.telegram(&u, Some(TELEGRAM_SECRET)).await, 200);
        }
    }
    let ea = a.next().await;
    let eb = b.next().await;
    let chat = |e: &pb::ReceivedEvent| text(e).split('-').next().unwrap().to_string();
    assert_ne!(
        chat(&ea),
        chat(&eb),
        "one conversation is held by one stream at a time"
    );
    assert!(a.next_within(Duration::from_millis(200)).await.is_none());
    assert!(b.next_within(Duration::from_millis(50)).await.is_none());
    // a dies with its event unacked: within the ack deadline it goes to b, flagged, in order.
    let a_chat = chat(&ea);
    drop(a);
    b.ack(&eb).await;
    let mut seen: HashMap<String, Vec<(String, bool)>> = HashMap::new();
    for _ in 0..5 {
        let e = b.next().await;
        seen.entry(chat(&e))
            .or_default()
            .push((text(&e).to_string(), e.redelivered));
        b.ack(&e).await;
    }
    assert_eq!(
        seen[&a_chat],
        [
            (format!("{a_chat}-0"), true),
            (format!("{a_chat}-1"), false),
            (format!("{a_chat}-2"), false)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_not_acked_in_time_comes_again_flagged() {
    let h = start().await;
    let mut s = h.receive(Default::default()).await;
    assert_eq!(
        h.telegram(
            &telegram_update(5, 9, None, 1, "late"),
            Some(TELEGRAM_SECRET)
        )
        .await,
        200
    );
    let first = s.next().await;
    let again = s.next().await;
    assert_eq!(first.event_id, again.event_id);
    assert_eq!((again.attempt, again.redelivered), (2, true));
    s.ack(&again).await;
    assert!(s.next_within(Duration::from_millis(1200)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_limited_to_one_bot_never_receives_anothers_events() {
    const TOKEN_A: &str = "caller-a-token-7f3a";
    let h = start_with(|c| {
        c.auth.tokens = vec![TokenIdentity {
            name: "bot-a".into(),
            sha256: channel_gateway::api::auth::sha256_hex(TOKEN_A.as_bytes()),
            bots: vec![telegram_support::BOT.into()],
        }];
    })
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", h.gateway.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let auth = |mut r: tonic::Request<()>| {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {TOKEN_A}").parse().unwrap(),
        );
        Ok(r)
    };
    let client = ChannelGatewayClient::with_interceptor(channel, auth);
    let open = |sub: pb::ReceiveSubscription| {
        let mut client = client.clone();
        async move {
            let (tx, input) = mpsc::channel(4);
            tx.send(pb::ReceiveRequest {
                kind: Some(pb::receive_request::Kind::Subscribe(sub)),
            })
            .await
            .unwrap();
            let r = client.receive(ReceiverStream::new(input)).await;
            (tx, r)
        }
    };
    let (_tx, denied) = open(pb::ReceiveSubscription {
        bot_ids: vec![slack_support::BOT.into()],
        ..Default::default()
    })
    .await;
    let denied = match denied {
        Err(e) => e,
        Ok(mut r) => r.get_mut().message().await.expect_err("denied"),
    };
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains("subscribe.bot_ids[0]"),
        "{}",
        denied.message()
    );

    let (tx, r) = open(Default::default()).await;
    let mut rx = r.expect("its own bots").into_inner();
    assert!(matches!(
        rx.message().await.unwrap().unwrap().kind,
        Some(pb::receive_response::Kind::Subscribed(_))
    ));
    // A Slack event (another bot) first, then a Telegram one (its bot): only the second comes.
    assert_eq!(
        h.slack(&slack_message(
            "EvB",
            "C9",
            "1700000003.000001",
            None,
            "for slack bot"
        ))
        .await,
        200
    );
    assert_eq!(
        h.telegram(
            &telegram_update(6, 9, None, 1, "for bot a"),
            Some(TELEGRAM_SECRET)
        )
        .await,
        200
    );
    let e = match tokio::time::timeout(Duration::from_secs(10), rx.message()).await {
        Ok(Ok(Some(pb::ReceiveResponse {
            kind: Some(pb::receive_response::Kind::Event(e)),
        }))) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(text(&e), "for bot a");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.message())
            .await
            .is_err()
    );
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiving_off_answers_unavailable_and_a_bad_first_message_names_the_field() {
    let h = start_with(|c| c.inbound.enabled = false).await;
    assert!(h.gateway.inbound_addr.is_none());
    let e = receive_on(h.client.clone(), Default::default())
        .await
        .err()
        .expect("off");
    assert_eq!(e.code(), Code::Unavailable);

    let h = start().await;
    let (tx, input) = mpsc::channel(4);
    tx.send(pb::ReceiveRequest {
        kind: Some(pb::receive_request::Kind::Ack(pb::ReceiveAck::default())),
    })
    .await
    .unwrap();
    let Err(e) = h.client.clone().receive(ReceiverStream::new(input)).await else {
        panic!("a stream must subscribe first")
    };
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("subscribe"), "{}", e.message());
    let Err(e) = receive_on(
        h.client.clone(),
        pb::ReceiveSubscription {
            group: "no spaces allowed".into(),
            ..Default::default()
        },
    )
    .await
    else {
        panic!("a bad group is refused")
    };
    assert_eq!(e.code(), Code::InvalidArgument);
}

impl Harness {
    /// Posts a slash command's form as Slack does, and returns the status and body of the answer.
    async fn slack_command(&self, trigger: &str, text: &str) -> (u16, String, std::time::Duration) {
        let body = format!(
            "token=XXYYZZ&team_id=T0123TEAM&channel_id=C0CMD&user_id=U0HUMAN&command=%2Fask&text={text}&trigger_id={trigger}&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2F1"
        );
        let ts = now();
        let sig = format!(
            "v0={}",
            hmac_hex(
                SLACK_SECRET,
                &[format!("v0:{ts}:").as_bytes(), body.as_bytes()]
            )
        );
        let started = std::time::Instant::now();
        let r = self
            .http
            .post(self.url("/webhooks/slack/commands"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-slack-request-timestamp", ts.to_string())
            .header("x-slack-signature", sig)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.text().await.unwrap(), started.elapsed())
    }
}

async fn respond(
    s: &Stream,
    e: &pb::ReceivedEvent,
    message: Option<pb::Message>,
    body: Option<Value>,
) {
    s.tx.send(pb::ReceiveRequest {
        kind: Some(pb::receive_request::Kind::Respond(pb::ReceiveRespond {
            event_id: e.event_id.clone(),
            message,
            body: body.map(|b| channel_gateway::api::convert::json_to_value(&b)),
            status: 0,
        })),
    })
    .await
    .unwrap();
}

async fn responded(s: &mut Stream) -> pb::ReceiveResponded {
    match tokio::time::timeout(Duration::from_secs(10), s.rx.next()).await {
        Ok(Some(Ok(pb::ReceiveResponse {
            kind: Some(pb::receive_response::Kind::Responded(r)),
        }))) => r,
        other => panic!("expected responded, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slash_command_is_answered_with_the_bots_message_when_it_comes_in_time() {
    let h = start().await;
    let mut s = h.receive(Default::default()).await;
    let post = {
        let h = &h;
        async move { h.slack_command("trig-1", "status%20please").await }
    };
    let bot = async {
        let e = s.next().await;
        assert_eq!(text(&e), "status please");
        let by = e.reply_by.expect("the channel waits: reply_by is set");
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let left = by.seconds * 1000 + i64::from(by.nanos / 1_000_000) - now_ms;
        assert!(
            (0..=3000).contains(&left),
            "reply_by within Slack's 3 s: {left} ms"
        );
        let mut answer = reply(&e, "All *green*");
        answer.source_event.insert(
            "slack".into(),
            channel_gateway::api::convert::json_to_struct(&json!({"response_type": "in_channel"})),
        );
        respond(&s, &e, Some(answer), None).await;
        let r = responded(&mut s).await;
        assert!(r.in_time, "{r:?}");
        s.ack(&e).await;
    };
    let ((status, body, _), ()) = tokio::join!(post, bot);
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).expect("a JSON answer");
    assert_eq!(v["response_type"], "in_channel");
    // Rendered as any Slack message is: markdown's emphasis in mrkdwn.
    assert_eq!(v["text"], "All _green_");
    assert!(v.get("channel").is_none(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_or_unfit_answer_leaves_the_neutral_answer_and_the_bot_is_told() {
    let h = start().await;
    // No bot: the channel gets the neutral answer within its 3 s.
    let (status, body, took) = h.slack_command("trig-2", "anyone").await;
    assert_eq!((status, body.as_str()), (200, ""));
    assert!(
        took < Duration::from_millis(2900),
        "answered within Slack's deadline: {took:?}"
    );
    // The bot comes later: its answer is late, and it is told.
    let mut s = h.receive(Default::default()).await;
    let e = s.next().await;
    respond(&s, &e, Some(reply(&e, "too late")), None).await;
    let r = responded(&mut s).await;
    assert!(!r.in_time && r.error.contains("late"), "{r:?}");
    s.ack(&e).await;
    // An answer that does not fit (Slack takes a JSON object as a body): the bot is told why.
    let post = h.slack_command("trig-3", "x");
    let bot = async {
        let e = s.next().await;
        respond(&s, &e, None, Some(json!(["not", "an", "object"]))).await;
        let r = responded(&mut s).await;
        assert!(!r.in_time && r.error.contains("respond.body"), "{r:?}");
        s.ack(&e).await;
    };
    let ((status, body, _), ()) = tokio::join!(post, bot);
    assert_eq!((status, body.as_str()), (200, ""), "the neutral answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pressed_telegram_button_is_stored_then_answered_so_it_stops_spinning() {
    let h = start().await;
    let mut s = h.receive(Default::default()).await;
    let update = json!({
        "update_id": 4001,
        "callback_query": {
            "id": "4382bfdwdsb323b2d9",
            "from": {"id": 4242, "is_bot": false, "first_name": "Ada"},
            "message": {"message_id": 77, "chat": {"id": 4242, "type": "private"}, "date": 1_700_000_000, "text": "Pick one"},
            "chat_instance": "-1234",
            "data": "yes"
        }
    });
    let r = h
        .http
        .post(h.url(&format!("/webhooks/telegram/{}", telegram_support::BOT)))
        .header("x-telegram-bot-api-secret-token", TELEGRAM_SECRET)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&update).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let answer: Value = r
        .json()
        .await
        .expect("a method call as the webhook's answer");
    assert_eq!(
        answer,
        json!({"method": "answerCallbackQuery", "callback_query_id": "4382bfdwdsb323b2d9"})
    );
    let e = s.next().await;
    let native = &e.message.as_ref().unwrap().source_event["telegram"];
    assert!(format!("{native:?}").contains("4382bfdwdsb323b2d9"));
    // Not stored (a wrong secret): no answer either.
    let r = h
        .http
        .post(h.url(&format!("/webhooks/telegram/{}", telegram_support::BOT)))
        .header("x-telegram-bot-api-secret-token", "guess")
        .body(serde_json::to_vec(&update).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.text().await.unwrap(), "");
}
