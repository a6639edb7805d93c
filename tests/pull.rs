//! Receiving without a public URL: Telegram `getUpdates` long polling and Slack Socket Mode,
//! against fake channel servers on 127.0.0.1 that record what they were asked, feeding a test
//! sink that records what it took (and can refuse).
//!
//! What is shown: events reach the sink in order through the same normalization as the
//! webhooks; the channel is told "received" (Telegram's offset, Slack's envelope ack) only for
//! what the sink said is durable; a refused batch comes again and none is lost; conflicts, rate
//! limits and disconnects are survived; tokens appear in no error or log line.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use channel_gateway::channels::channel::{Channel, InboundEvent};
use channel_gateway::channels::telegram::Telegram;
use channel_gateway::channels::telegram::config::{Receive, TelegramBot, TelegramConfig};
use channel_gateway::channels::telegram::polling::{Poller, Timing};
use channel_gateway::config::Secret;
use channel_gateway::inbound::{Sink, SinkError};

// ---------------------------------------------------------------------------------------------
// The test sink

/// Records what it took, in order; answers `Full` (or `Failed`) the first `refuse` times.
#[derive(Default)]
struct TestSink {
    got: Mutex<Vec<(String, InboundEvent)>>,
    refuse: Mutex<u32>,
    fail_instead: bool,
    /// Appends answered, refused or not.
    calls: Mutex<u32>,
}

impl TestSink {
    fn refusing(n: u32) -> Arc<Self> {
        Arc::new(Self {
            refuse: Mutex::new(n),
            ..Default::default()
        })
    }

    fn failing(n: u32) -> Arc<Self> {
        Arc::new(Self {
            refuse: Mutex::new(n),
            fail_instead: true,
            ..Default::default()
        })
    }

    fn keys(&self) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(_, e)| e.dedupe_key.clone())
            .collect()
    }
}

impl Sink for TestSink {
    fn append<'a>(
        &'a self,
        channel: &'a str,
        events: Vec<InboundEvent>,
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            *self.calls.lock().unwrap() += 1;
            {
                let mut refuse = self.refuse.lock().unwrap();
                if *refuse > 0 {
                    *refuse -= 1;
                    return Err(if self.fail_instead {
                        SinkError::Failed("disk on fire".into())
                    } else {
                        SinkError::Full {
                            retry_after: Duration::from_millis(30),
                        }
                    });
                }
            }
            let mut got = self.got.lock().unwrap();
            got.extend(events.into_iter().map(|e| (channel.to_string(), e)));
            Ok(())
        })
    }
}

/// Waits until `f` holds, for at most 10 s.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Log lines written while a test runs on its own thread (current-thread runtime).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// A fake Telegram Bot API

const TOKEN: &str = "7100200300:AAH-pollsecret_xyz";
const BOT: &str = "helper_bot";

/// Keeps updates as Telegram does: an update below the offset asked is confirmed and forgotten.
#[derive(Default)]
struct FakeTelegram {
    pending: Mutex<Vec<Value>>,
    /// Answers given before the updates, in order: (status, body).
    forced: Mutex<VecDeque<(u16, Value)>>,
    /// Each getUpdates call: its path and body.
    calls: Mutex<Vec<(String, Value)>>,
}

impl FakeTelegram {
    async fn start() -> (Arc<Self>, String) {
        let fake = Arc::new(Self::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .fallback(telegram_handle)
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (fake, base)
    }

    fn push(&self, update: Value) {
        self.pending.lock().unwrap().push(update);
    }

    fn offsets(&self) -> Vec<Option<i64>> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| b.get("offset").and_then(Value::as_i64))
            .collect()
    }
}

async fn telegram_handle(State(fake): State<Arc<FakeTelegram>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    fake.calls
        .lock()
        .unwrap()
        .push((path.clone(), body.clone()));
    if path != format!("/bot{TOKEN}/getUpdates") {
        return (axum::http::StatusCode::NOT_FOUND, "{}").into_response();
    }
    if let Some((status, answer)) = fake.forced.lock().unwrap().pop_front() {
        return (
            axum::http::StatusCode::from_u16(status).unwrap(),
            answer.to_string(),
        )
            .into_response();
    }
    let offset = body.get("offset").and_then(Value::as_i64);
    let limit = body.get("limit").and_then(Value::as_u64).unwrap_or(100) as usize;
    let result: Vec<Value> = {
        let mut pending = fake.pending.lock().unwrap();
        if let Some(o) = offset {
            pending.retain(|u| u["update_id"].as_i64().unwrap() >= o);
        }
        pending.iter().take(limit).cloned().collect()
    };
    if result.is_empty() {
        // A short long poll: nothing new.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    axum::Json(json!({"ok": true, "result": result})).into_response()
}

fn update(id: i64, text: &str) -> Value {
    json!({"update_id": id, "message": {"message_id": id, "from": {"id": 5, "first_name": "A"},
        "chat": {"id": 5, "type": "private"}, "date": 1733000000, "text": text}})
}

fn telegram_config(base: &str) -> TelegramConfig {
    TelegramConfig {
        api_base_url: base.into(),
        bots: vec![TelegramBot {
            bot_id: BOT.into(),
            token: Secret::new(TOKEN),
            secret_token: None,
            receive: Receive::Polling,
        }],
        ..Default::default()
    }
}

fn quick() -> Timing {
    Timing {
        long_poll: Duration::from_secs(1),
        backoff_first: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        conflict_wait: Duration::from_millis(100),
    }
}

fn poll(config: &TelegramConfig, sink: Arc<TestSink>) -> tokio::task::JoinHandle<()> {
    let poller = Poller::new(config, &config.bots[0], quick()).unwrap();
    tokio::spawn(poller.run(sink))
}

#[tokio::test]
async fn telegram_updates_reach_the_sink_in_order_and_only_stored_ones_are_confirmed() {
    let (fake, base) = FakeTelegram::start().await;
    for i in 1..=3 {
        fake.push(update(i, &format!("m{i}")));
    }
    // Through the seam the server uses: the channel's pullers.
    let tg = Telegram::new(&telegram_config(&base), Duration::from_secs(5)).unwrap();
    assert!(tg.inbound().is_none(), "a polling bot has no webhook path");
    let sink = TestSink::refusing(0);
    let mut pullers = tg.pullers(sink.clone());
    assert_eq!(pullers.len(), 1);
    let task = tokio::spawn(pullers.remove(0));
    until("three events", || sink.keys().len() == 3).await;
    fake.push(update(4, "m4"));
    fake.push(update(5, "m5"));
    until("five events", || sink.keys().len() == 5).await;
    until("the offset past 5", || fake.offsets().contains(&Some(6))).await;
    task.abort();

    assert_eq!(
        sink.keys(),
        (1..=5).map(|i| format!("{BOT}:{i}")).collect::<Vec<_>>()
    );
    let got = sink.got.lock().unwrap();
    assert!(got.iter().all(|(ch, _)| ch == "telegram"));
    // The webhook's normalization: the address to reply to, the native update kept.
    let m = &got[0].1.message;
    assert_eq!(m.text.as_deref(), Some("m1"));
    assert_eq!(m.address.bot_id(), BOT);
    assert_eq!(m.address.conversation_id(), Some("5"));
    assert_eq!(m.source_event["telegram"]["update_id"], 1);

    let offsets = fake.offsets();
    assert_eq!(offsets[0], None, "the first call confirms nothing");
    // Offsets only grow, and only to one past an update the sink took.
    for w in offsets.windows(2) {
        assert!(w[0] <= w[1], "{offsets:?}");
    }
    assert!(
        offsets.iter().flatten().all(|o| [4, 6].contains(o)),
        "{offsets:?}"
    );
    let calls = fake.calls.lock().unwrap();
    let first = &calls[0].1;
    assert!(first["timeout"].as_u64().unwrap() >= 1, "long polling");
    let kinds: Vec<&str> = first["allowed_updates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for k in [
        "message",
        "callback_query",
        "message_reaction",
        "my_chat_member",
    ] {
        assert!(kinds.contains(&k), "{kinds:?}");
    }
}

#[tokio::test]
async fn telegram_a_full_sink_gets_the_same_updates_again_and_none_is_lost() {
    let (fake, base) = FakeTelegram::start().await;
    fake.push(update(10, "a"));
    fake.push(update(11, "b"));
    let sink = TestSink::refusing(3);
    let task = poll(&telegram_config(&base), sink.clone());
    until("both events", || sink.keys().len() == 2).await;
    until("the offset past them", || {
        fake.offsets().contains(&Some(12))
    })
    .await;
    task.abort();
    assert_eq!(sink.keys(), [format!("{BOT}:10"), format!("{BOT}:11")]);
    assert_eq!(*sink.calls.lock().unwrap(), 4, "three refusals, then taken");
    let offsets = fake.offsets();
    // Refused three times: asked again from the start each time, never past them.
    assert_eq!(offsets[..4], [None, None, None, None], "{offsets:?}");
    assert_eq!(offsets[4], Some(12), "{offsets:?}");

    // A failing sink: the same.
    let (fake, base) = FakeTelegram::start().await;
    fake.push(update(20, "c"));
    let sink = TestSink::failing(2);
    let task = poll(&telegram_config(&base), sink.clone());
    until("the event", || sink.keys().len() == 1).await;
    until("the offset past it", || fake.offsets().contains(&Some(21))).await;
    task.abort();
    assert_eq!(fake.offsets()[..3], [None, None, None]);
}

#[tokio::test]
async fn telegram_conflicts_and_flood_control_are_waited_out_and_never_show_the_token() {
    let (logs, _guard) = Logs::capture();
    let (fake, base) = FakeTelegram::start().await;
    {
        let mut forced = fake.forced.lock().unwrap();
        // Telegram's own wording; a description echoing the URL must still not leak the token.
        forced.push_back((
            409,
            json!({"ok": false, "error_code": 409,
                "description": format!("Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first (/bot{TOKEN}/getUpdates)")}),
        ));
        forced.push_back((
            429,
            json!({"ok": false, "error_code": 429, "description": "Too Many Requests: retry after 1",
                "parameters": {"retry_after": 1}}),
        ));
        forced.push_back((502, json!("<html>bad gateway</html>")));
    }
    fake.push(update(30, "after the storm"));
    let sink = TestSink::refusing(0);
    let started = Instant::now();
    let task = poll(&telegram_config(&base), sink.clone());
    until("the event", || sink.keys().len() == 1).await;
    task.abort();
    let elapsed = started.elapsed();
    // 409: conflict_wait (100 ms); 429 asked 1 s, capped at backoff_max (200 ms); 502: backoff.
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert_eq!(fake.offsets()[..4], [None, None, None, None]);
    let text = logs.text();
    assert!(text.contains("409"), "{text}");
    assert!(text.contains("deleteWebhook"), "{text}");
    assert!(text.contains("getUpdates failed"), "{text}");
    assert!(
        text.contains("use deleteWebhook to delete the webhook first"),
        "{text}"
    );
    assert!(!text.contains(TOKEN), "{text}");
    assert!(!text.contains("pollsecret"), "{text}");
}
