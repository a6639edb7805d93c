//! The webhook listener over real HTTP on 127.0.0.1: routing to a channel's inbound side,
//! verification before anything reaches the sink, the body bound and the slow-client timeout,
//! and the answers (2xx only once the sink took the events; 503 with Retry-After when full).
//! Telegram's inbound side serves as the channel (a secret header is the simplest to sign).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::json;

use channel_gateway::channels::Channels;
use channel_gateway::channels::channel::InboundEvent;
use channel_gateway::channels::telegram::config::TelegramBot;
use channel_gateway::config::{Config, Secret};
use channel_gateway::inbound::listener::Limits;
use channel_gateway::inbound::{InboundRouter, Sink, SinkError, serve};

const SECRET: &str = "hook-secret_1";
const PATH: &str = "/webhooks/telegram/helper_bot";

#[derive(Default)]
struct TestSink {
    got: Mutex<Vec<(String, InboundEvent)>>,
    full: Mutex<bool>,
}

impl Sink for TestSink {
    fn append<'a>(
        &'a self,
        channel: &'a str,
        events: Vec<InboundEvent>,
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            if *self.full.lock().unwrap() {
                return Err(SinkError::Full {
                    retry_after: Duration::from_secs(7),
                });
            }
            let mut got = self.got.lock().unwrap();
            got.extend(events.into_iter().map(|e| (channel.to_string(), e)));
            Ok(())
        })
    }
}

struct Harness {
    base: String,
    sink: Arc<TestSink>,
    refused: Arc<Mutex<Vec<(String, &'static str)>>>,
}

async fn start() -> Harness {
    let mut config = Config::default();
    config.channels.telegram.bots = vec![TelegramBot {
        bot_id: "helper_bot".into(),
        token: Secret::new("7100200300:AAHsecret"),
        secret_token: Some(Secret::new(SECRET)),
        receive: Default::default(),
    }];
    let channels = Channels::from_config(&config).unwrap();
    let router = InboundRouter::new(&channels).unwrap();
    assert_eq!(router.paths(), [PATH]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let sink = Arc::new(TestSink::default());
    let refused = Arc::new(Mutex::new(Vec::new()));
    let counter = {
        let refused = refused.clone();
        Arc::new(move |ch: &str, reason: &'static str| {
            refused.lock().unwrap().push((ch.to_string(), reason))
        })
    };
    tokio::spawn(serve(
        listener,
        router,
        sink.clone(),
        Limits {
            max_body_bytes: 64 << 10,
            read_timeout: Duration::from_millis(500),
            max_connections: 64,
        },
        counter,
        std::future::pending(),
    ));
    Harness {
        base,
        sink,
        refused,
    }
}

fn update(id: i64, text: &str) -> serde_json::Value {
    json!({"update_id": id, "message": {"message_id": id, "from": {"id": 5, "first_name": "A"},
        "chat": {"id": 5, "type": "private"}, "date": 1733000000, "text": text}})
}

async fn post(h: &Harness, path: &str, secret: Option<&str>, body: Vec<u8>) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .post(format!("{}{path}", h.base))
        .header("content-type", "application/json")
        .body(body);
    if let Some(s) = secret {
        r = r.header("X-Telegram-Bot-Api-Secret-Token", s);
    }
    r.send().await.unwrap()
}

#[tokio::test]
async fn a_verified_update_is_stored_then_answered() {
    let h = start().await;
    let r = post(
        &h,
        PATH,
        Some(SECRET),
        serde_json::to_vec(&update(1, "hi")).unwrap(),
    )
    .await;
    assert_eq!(r.status(), 200);
    let got = h.sink.got.lock().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "telegram");
    assert_eq!(got[0].1.dedupe_key, "helper_bot:1");
    assert_eq!(got[0].1.message.text.as_deref(), Some("hi"));
}

#[tokio::test]
async fn refusals_store_nothing_and_say_nothing() {
    let h = start().await;
    let body = serde_json::to_vec(&update(2, "hi")).unwrap();
    for secret in [None, Some("wrong"), Some("hook-secret_2")] {
        let r = post(&h, PATH, secret, body.clone()).await;
        assert_eq!(r.status(), 401, "{secret:?}");
        assert_eq!(r.text().await.unwrap(), "", "no detail on the wire");
    }
    assert_eq!(
        post(&h, "/webhooks/telegram/other", Some(SECRET), body.clone())
            .await
            .status(),
        404
    );
    assert_eq!(
        post(&h, PATH, Some(SECRET), b"{not json".to_vec())
            .await
            .status(),
        400
    );
    assert_eq!(
        post(&h, PATH, Some(SECRET), vec![b' '; 65 << 10])
            .await
            .status(),
        413
    );
    assert!(h.sink.got.lock().unwrap().is_empty());
    let refused = h.refused.lock().unwrap().clone();
    assert_eq!(
        refused,
        [
            ("telegram".to_string(), "no secret token header"),
            ("telegram".to_string(), "wrong secret token"),
            ("telegram".to_string(), "wrong secret token"),
            ("telegram".to_string(), "unreadable"),
            ("telegram".to_string(), "body too large or cut"),
        ]
    );
}

#[tokio::test]
async fn a_full_inbox_asks_the_channel_to_retry_later() {
    let h = start().await;
    *h.sink.full.lock().unwrap() = true;
    let r = post(
        &h,
        PATH,
        Some(SECRET),
        serde_json::to_vec(&update(3, "hi")).unwrap(),
    )
    .await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "7");
}

#[tokio::test]
async fn a_body_that_trickles_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = start().await;
    let addr = h.base.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {PATH} HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\nx-telegram-bot-api-secret-token: {SECRET}\r\n\r\n{{"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut answer = vec![0; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut answer))
        .await
        .expect("the listener answered")
        .unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 408"));
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Messenger's subscription handshake goes through the listener: the challenge comes back only
/// for the right verify token, and a signed event is stored.
#[tokio::test]
async fn messenger_handshake_and_signed_event_through_the_listener() {
    let mut config = Config::default();
    config.channels.telegram.bots.clear();
    let fb = &mut config.channels.facebook;
    fb.verify_token = Some(Secret::new("tok en&1"));
    fb.page_id = Some("1001".into());
    fb.access_token = Some(Secret::new("EAA-page"));
    fb.app_secret = Some(Secret::new("app-secret"));
    let channels = Channels::from_config(&config).unwrap();
    let router = InboundRouter::new(&channels).unwrap();
    assert_eq!(router.paths(), ["/webhooks/facebook"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let sink = Arc::new(TestSink::default());
    tokio::spawn(serve(
        listener,
        router,
        sink.clone(),
        Limits {
            max_body_bytes: 64 << 10,
            read_timeout: Duration::from_secs(5),
            max_connections: 64,
        },
        Arc::new(|_: &str, _: &'static str| {}),
        std::future::pending(),
    ));
    let http = reqwest::Client::new();
    let hub = |token: &str| {
        format!(
            "{base}/webhooks/facebook?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token={token}"
        )
    };
    let r = http.get(hub("tok+en%261")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "1158201444");
    let r = http.get(hub("wrong")).send().await.unwrap();
    assert_eq!(r.status(), 401);

    let body = serde_json::to_vec(&json!({"object": "page", "entry": [{"id": "1001", "time": 1733000000000i64,
        "messaging": [{"sender": {"id": "psid-7"}, "recipient": {"id": "1001"}, "timestamp": 1733000000000i64,
            "message": {"mid": "m_1", "text": "hello"}}]}]}))
    .unwrap();
    let sig = channel_gateway::channels::shared::hmac_sha256_hex(b"app-secret", &[&body]);
    let send = |sig: String| {
        http.post(format!("{base}/webhooks/facebook"))
            .header("x-hub-signature-256", format!("sha256={sig}"))
            .body(body.clone())
            .send()
    };
    assert_eq!(send("00".repeat(32)).await.unwrap().status(), 401);
    assert!(sink.got.lock().unwrap().is_empty());
    assert_eq!(send(sig).await.unwrap().status(), 200);
    let got = sink.got.lock().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.dedupe_key, "m_1");
    assert_eq!(got[0].1.message.address.user_id(), "psid-7");
}
