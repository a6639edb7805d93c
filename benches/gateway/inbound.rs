//! The inbound scenarios (issue 25): signed Slack and Bot Framework events posted to the release
//! gateway's webhook listener, verified, stored in its durable inbox and streamed over Receive to
//! a bot that acks each one and checks per-conversation order.
//!
//! Owns the parts only these scenarios need: the Bot Framework's issuer (OpenID metadata and the
//! JWKS of the test-only key), the signing of events as each channel signs them, the webhook load
//! (closed-loop to saturate, open-loop to pace), and the bot. The gateway is spawned by the main
//! file's `spawn_gateway`, as for every other scenario.
//!
//! Half of the conversations are Slack channels (events signed v0 with the signing secret), the
//! other half Bot Framework conversations (activities with a bearer JWT the issuer's key signed:
//! a few tokens are signed once and reused, as the Connector reuses its token);
//! `--inbound-channels` makes them all one channel's. Each conversation's
//! events are posted one after the other (the next once the previous was answered), so their
//! order is defined and the bot checks it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::mpsc;

use super::{
    GatewayOpts, Proc, Row, count, cpu_of, flag, free_port, median_by, ms, pct, report, selected,
    spawn_gateway, unix_nanos,
};
use channel_gateway::api::pb;

const SLACK_SECRET: &str = "bench-slack-signing-secret-8f742231b10e";
const SLACK_TEAM: &str = "T0BENCH";
/// The workspace's bot: events of team `SLACK_TEAM` are addressed to it.
const SLACK_BOT: &str = "B0BENCH";
/// The bot of the Bot Framework side: `spawn_gateway` configures it (app id and password).
const BF_APP: &str = "bench-bot";
const BF_CHANNEL: &str = "msteams";
/// The Connector's service URL, as its token's `serviceurl` claim names it. Nothing is sent there.
const SERVICE_URL: &str = "https://smba.trafficmanager.net/amer/";
const CHANNEL_ISSUER: &str = "https://api.botframework.com";
/// The test-only key the Bot Framework inbound tests sign with (tests/inbound/botframework/).
const KEY: &[u8] = include_bytes!("../../tests/inbound/botframework/TEST_ONLY_rsa_a.der");
const KID: &str = "bench-key";
/// Tokens signed for a run; each webhook connection reuses one of them.
const TOKENS: usize = 4;

// ---------------------------------------------------------------- the Bot Framework's issuer

/// The public half of the test key as the Bot Connector's key document lists it: endorsed for
/// the channel the activities come from.
fn jwks() -> Value {
    let key = EncodingKey::from_rsa_der(KEY);
    let mut jwk = serde_json::to_value(
        jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::RS256).expect("jwk"),
    )
    .expect("jwk json");
    jwk["kid"] = json!(KID);
    jwk["use"] = json!("sig");
    jwk["endorsements"] = json!([BF_CHANNEL, "webchat"]);
    json!({ "keys": [jwk] })
}

/// A local issuer in this process: OpenID metadata at `/openid` pointing at its JWKS, and a
/// token endpoint for the send side's configuration (never called by these scenarios). The
/// gateway fetches the keys once per run and caches them, so its cost here is nil.
async fn issuer() -> u16 {
    use axum::routing::{get, post};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind issuer");
    let port = listener.local_addr().expect("issuer addr").port();
    let keys = jwks();
    let app = axum::Router::new()
        .route(
            "/openid",
            get(move || async move {
                axum::Json(json!({
                    "issuer": CHANNEL_ISSUER,
                    "jwks_uri": format!("http://127.0.0.1:{port}/keys"),
                    "id_token_signing_alg_values_supported": ["RS256"],
                }))
            }),
        )
        .route(
            "/keys",
            get(move || async move { axum::Json(keys.clone()) }),
        )
        .route(
            "/token",
            post(|| async {
                axum::Json(json!({"access_token": "bench-token", "expires_in": 3600}))
            }),
        );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    port
}

/// Tokens as the Connector issues them to the bot: valid for an hour, for this service URL.
fn tokens() -> Vec<String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let key = EncodingKey::from_rsa_der(KEY);
    (0..TOKENS as u64)
        .map(|i| {
            let claims = json!({
                "serviceurl": SERVICE_URL,
                "nbf": now - 60 - i,
                "exp": now + 3600,
                "iss": CHANNEL_ISSUER,
                "aud": BF_APP,
            });
            let header = Header {
                kid: Some(KID.into()),
                ..Header::new(Algorithm::RS256)
            };
            jsonwebtoken::encode(&header, &claims, &key).expect("sign token")
        })
        .collect()
}

// ---------------------------------------------------------------- events as channels send them

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(H[usize::from(b >> 4)]));
        s.push(char::from(H[usize::from(b & 15)]));
    }
    s
}

/// Which channels post: `--inbound-channels both` (the default), `slack` or `botframework`, to
/// tell one channel's cost per event from the other's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mix {
    Both,
    Slack,
    BotFramework,
}

fn mix() -> Mix {
    static MIX: std::sync::OnceLock<Mix> = std::sync::OnceLock::new();
    *MIX.get_or_init(|| match super::arg("--inbound-channels").as_deref() {
        None | Some("both") => Mix::Both,
        Some("slack") => Mix::Slack,
        Some("botframework") => Mix::BotFramework,
        Some(other) => {
            panic!("--inbound-channels is both, slack or botframework, not `{other}`")
        }
    })
}

impl Mix {
    fn describe(self) -> &'static str {
        match self {
            Mix::Both => "half Slack, half Bot Framework",
            Mix::Slack => "Slack only",
            Mix::BotFramework => "Bot Framework only",
        }
    }
}

/// Conversation `conv` is a Slack channel when even, a Bot Framework conversation when odd
/// (unless `--inbound-channels` names one channel).
fn is_slack(conv: usize) -> bool {
    match mix() {
        Mix::Both => conv.is_multiple_of(2),
        Mix::Slack => true,
        Mix::BotFramework => false,
    }
}

/// The text of event `seq` of a conversation: its sequence number and when it was posted, which
/// the bot reads back to check order and latency.
fn event_text(seq: u64) -> String {
    format!("{seq} {}", unix_nanos())
}

/// Event `seq` of conversation `conv` as its channel posts it: a Slack `event_callback` message
/// signed v0 over the exact bytes, or a Bot Framework message activity with the bearer token.
/// `ts_base` makes the Slack message ids of a run unique (Slack dedupes by team, channel, ts).
fn event_request(
    port: u16,
    conv: usize,
    seq: u64,
    token: &str,
    ts_base: u64,
) -> hyper::Request<Full<Bytes>> {
    let text = event_text(seq);
    let b = hyper::Request::builder()
        .method(hyper::Method::POST)
        .header(hyper::header::HOST, format!("127.0.0.1:{port}"))
        .header(hyper::header::CONTENT_TYPE, "application/json");
    let (b, body) = if is_slack(conv) {
        let now = now_secs();
        let ts = format!("{ts_base}.{seq:06}");
        let body = format!(
            r#"{{"token":"bench-verification-token","team_id":"{SLACK_TEAM}","api_app_id":"A0BENCH","type":"event_callback","event_id":"Ev{conv}x{seq}","event_time":{now},"authorizations":[{{"enterprise_id":null,"team_id":"{SLACK_TEAM}","user_id":"U0BENCHBOT","is_bot":true}}],"event":{{"type":"message","user":"U{conv:07}","text":"{text}","channel":"C{conv:07}","channel_type":"channel","ts":"{ts}","event_ts":"{ts}"}}}}"#
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(SLACK_SECRET.as_bytes()).expect("hmac key");
        mac.update(format!("v0:{now}:").as_bytes());
        mac.update(body.as_bytes());
        let sig = format!("v0={}", hex(&mac.finalize().into_bytes()));
        (
            b.uri("/webhooks/slack/events")
                .header("x-slack-request-timestamp", now.to_string())
                .header("x-slack-signature", sig),
            body,
        )
    } else {
        let body = format!(
            r#"{{"type":"message","id":"{seq}","timestamp":"2026-12-05T06:00:00.000Z","channelId":"{BF_CHANNEL}","serviceUrl":"{SERVICE_URL}","from":{{"id":"29:user{conv}","name":"User {conv}","aadObjectId":"00000000-0000-0000-0000-{conv:012}"}},"recipient":{{"id":"28:{BF_APP}","name":"Bench"}},"conversation":{{"id":"a:bench{conv}","conversationType":"personal","tenantId":"bench-tenant"}},"text":"{text}","textFormat":"plain","locale":"en-US","channelData":{{"tenant":{{"id":"bench-tenant"}}}}}}"#
        );
        (
            b.uri("/api/messages")
                .header(hyper::header::AUTHORIZATION, format!("Bearer {token}")),
            body,
        )
    };
    b.body(Full::new(Bytes::from(body))).expect("request")
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One keep-alive connection to the webhook listener, as a channel's sender holds one.
async fn open(port: u16) -> Sender {
    let deadline = Instant::now() + Duration::from_secs(60);
    let stream = loop {
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("no webhook listener on {port}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let _ = stream.set_nodelay(true);
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("http handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// Posts one event and reads the whole answer; the status.
async fn post(sender: &mut Sender, req: hyper::Request<Full<Bytes>>) -> u16 {
    let answer = async {
        sender.ready().await.ok()?;
        let r = sender.send_request(req).await.ok()?;
        let status = r.status().as_u16();
        r.into_body().collect().await.ok()?;
        Some(status)
    };
    match tokio::time::timeout(Duration::from_secs(30), answer).await {
        Ok(Some(s)) => s,
        Ok(None) => panic!("a webhook call failed during the benchmark"),
        Err(_) => panic!("a webhook call got no answer within 30 s"),
    }
}

// ---------------------------------------------------------------- the bot

#[derive(Default)]
struct BotState {
    /// Each conversation's last sequence number.
    last: HashMap<String, u64>,
    violations: u64,
    duplicates: u64,
    redelivered: u64,
    /// From posting an event to its arrival at the bot, in µs.
    latencies_us: Vec<u32>,
}

/// A bot on one Receive stream: acks every event as it arrives, each in its own message, as the
/// example echo bots do, and checks each conversation's order.
struct Bot {
    received: Arc<AtomicU64>,
    state: Arc<Mutex<BotState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Bot {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Bot {
    async fn connect(grpc_port: u16, max_in_flight: u32) -> Bot {
        let mut client = super::connect(grpc_port).await;
        let (tx, rx) = mpsc::channel::<pb::ReceiveRequest>(4096);
        tx.send(pb::ReceiveRequest {
            kind: Some(pb::receive_request::Kind::Subscribe(
                pb::ReceiveSubscription {
                    max_in_flight,
                    ..Default::default()
                },
            )),
        })
        .await
        .expect("subscribe");
        let mut stream = client
            .receive(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("Receive")
            .into_inner();
        match stream.message().await {
            Ok(Some(pb::ReceiveResponse {
                kind: Some(pb::receive_response::Kind::Subscribed(_)),
            })) => {}
            other => panic!("expected the subscription first, got {other:?}"),
        }
        let received = Arc::new(AtomicU64::new(0));
        let state = Arc::new(Mutex::new(BotState::default()));
        let task = tokio::spawn({
            let (received, state) = (received.clone(), state.clone());
            async move {
                while let Ok(Some(m)) = stream.message().await {
                    let Some(pb::receive_response::Kind::Event(e)) = m.kind else {
                        continue;
                    };
                    let now = unix_nanos();
                    {
                        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                        let (conv, text) = e.message.as_ref().map_or((String::new(), ""), |m| {
                            let a = m.address.as_deref();
                            let conv = format!(
                                "{}/{}",
                                a.map_or("", |a| a.channel_id.as_str()),
                                a.and_then(|a| a.conversation.as_ref())
                                    .map_or("", |c| c.id.as_str())
                            );
                            (conv, m.text.as_str())
                        });
                        let mut parts = text.split(' ');
                        let seq: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
                        let sent: u128 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
                        if e.redelivered {
                            s.redelivered += 1;
                        }
                        match s.last.get(&conv).copied() {
                            Some(p) if seq == p => s.duplicates += 1,
                            Some(p) if seq != p + 1 => s.violations += 1,
                            None if seq != 0 => s.violations += 1,
                            _ => {}
                        }
                        s.last.insert(conv, seq);
                        if sent > 0 && now > sent {
                            let us = ((now - sent) / 1000).min(u32::MAX as u128) as u32;
                            s.latencies_us.push(us);
                        }
                    }
                    let ack = pb::ReceiveRequest {
                        kind: Some(pb::receive_request::Kind::Ack(pb::ReceiveAck {
                            event_ids: vec![e.event_id],
                        })),
                    };
                    if tx.send(ack).await.is_err() {
                        break;
                    }
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Bot {
            received,
            state,
            task,
        }
    }

    /// Waits until `n` events arrived (and were acked), or panics after `within`.
    async fn wait_for(&self, n: u64, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let got = self.received.load(Ordering::Relaxed);
            if got >= n {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "only {got} of {n} events reached the bot after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Checks order and completeness: every conversation's every event, in order. Returns the
    /// text for the row and the latency percentiles (post → bot).
    fn verify(&self, name: &str, conversations: usize, events: u64) -> String {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(
            s.violations, 0,
            "{name}: ORDER VIOLATED at the bot ({} violations)",
            s.violations
        );
        assert_eq!(
            s.last.len(),
            conversations,
            "{name}: events of {} conversations reached the bot, not {conversations}",
            s.last.len()
        );
        let last_seqs: u64 = s.last.values().map(|v| v + 1).sum();
        assert_eq!(
            last_seqs, events,
            "{name}: the bot saw conversations up to {last_seqs} events in all, not {events}"
        );
        s.latencies_us.sort_unstable();
        format!(
            "order OK at the bot ({events} events, {conversations} conversations, {} dup, {} redelivered); posted → at the bot p50 {:.2} ms, p99 {:.2} ms",
            s.duplicates,
            s.redelivered,
            pct(&s.latencies_us, 50.0) as f64 / 1000.0,
            pct(&s.latencies_us, 99.0) as f64 / 1000.0,
        )
    }
}

// ---------------------------------------------------------------- the gateway

/// A gateway receiving on a known webhook port, with a Slack signing secret and one Bot
/// Framework bot whose keys the local issuer serves; its inbox bounded far past any run.
struct Receiving {
    gw: Proc,
    webhook: u16,
    _dir: tempfile::TempDir,
}

fn start(issuer: u16) -> Receiving {
    let webhook = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = GatewayOpts {
        env: vec![
            (
                "CHANNEL_GATEWAY__INBOUND__LISTEN",
                format!("127.0.0.1:{webhook}"),
            ),
            // The no-bot scenario keeps every event of its run.
            ("CHANNEL_GATEWAY__INBOUND__MAX_EVENTS", "10000000".into()),
            ("CHANNEL_GATEWAY__INBOUND__MAX_MIB", "8192".into()),
            // The paced load holds a connection per conversation.
            ("CHANNEL_GATEWAY__INBOUND__MAX_CONNECTIONS", "8192".into()),
            (
                "CHANNEL_GATEWAY__CHANNELS__SLACK__SIGNING_SECRET",
                SLACK_SECRET.into(),
            ),
            (
                "CHANNEL_GATEWAY__CHANNELS__SLACK__WORKSPACES",
                format!(
                    r#"[{{bot_id = "{SLACK_BOT}", token = "xoxb-bench", team_id = "{SLACK_TEAM}"}}]"#
                ),
            ),
            (
                "CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__OPENID_METADATA_URL",
                format!("http://127.0.0.1:{issuer}/openid"),
            ),
        ],
        // `--inbound-memory`: the in-memory inbox (SQLite without a file), to tell the storage's
        // share of a figure from the rest. Not a deployment setting: events are lost on a crash.
        ..GatewayOpts::standard(!flag("--inbound-memory"))
    };
    // The issuer stands in for the fake channel: the send side's token URL points at it.
    let gw = spawn_gateway(issuer, dir.path(), &opts);
    Receiving {
        gw,
        webhook,
        _dir: dir,
    }
}

/// The gateway's inbox gauge: events not yet acked by every group.
async fn pending(admin: u16) -> Option<u64> {
    super::gauge(admin, "inbound_pending").await
}

/// Waits until every ack is settled in the inbox (its pending gauge at 0), so the gateway's CPU
/// read next includes them. At most `within`.
async fn settled(admin: u16, within: Duration) -> Option<u64> {
    let start = Instant::now();
    loop {
        let p = pending(admin).await;
        if p == Some(0) || start.elapsed() > within {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------- the load

fn percentiles(mut lat: Vec<Duration>) -> (Duration, Duration, Duration) {
    lat.sort_unstable();
    let p = |q: f64| {
        lat.get(((q / 100.0) * lat.len().saturating_sub(1) as f64).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    (p(50.0), p(99.0), lat.last().copied().unwrap_or_default())
}

/// Closed loop: `concurrency` connections, each owning conversations `t, t + concurrency, ...`
/// and posting their events round-robin, one at a time, each once the previous was answered.
/// Returns the events posted and every answer's latency.
async fn saturate(
    port: u16,
    conversations: usize,
    concurrency: usize,
    events: usize,
    tokens: &Arc<Vec<String>>,
) -> (u64, Vec<Duration>) {
    let ts_base = now_secs();
    let per_task = events / concurrency;
    let mut senders = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        senders.push(open(port).await);
    }
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(t, mut sender)| {
            let tokens = tokens.clone();
            tokio::spawn(async move {
                let convs: Vec<usize> = (t..conversations).step_by(concurrency).collect();
                let mut seqs = vec![0u64; convs.len()];
                let mut lat = Vec::with_capacity(per_task);
                let token = &tokens[t % tokens.len()];
                for k in 0..per_task {
                    let i = k % convs.len();
                    let req = event_request(port, convs[i], seqs[i], token, ts_base);
                    seqs[i] += 1;
                    let t0 = Instant::now();
                    let status = post(&mut sender, req).await;
                    assert_eq!(status, 200, "a webhook call was answered {status}");
                    lat.push(t0.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::with_capacity(events);
    for t in tasks {
        all.extend(t.await.expect("load task"));
    }
    ((per_task * concurrency) as u64, all)
}

/// Open loop at `rate` events/s for `seconds`: a connection per conversation, event `k` of
/// conversation `c` due at `start + (k * conversations + c) / rate`, so the conversations take
/// turns evenly. An answer's latency counts from when its event was due, so a late post (its
/// conversation's previous one still unanswered) is counted, not hidden.
async fn paced(
    port: u16,
    conversations: usize,
    rate: f64,
    seconds: f64,
    tokens: &Arc<Vec<String>>,
) -> (u64, Vec<Duration>, Duration) {
    let ts_base = now_secs();
    let per_conv = ((rate * seconds) / conversations as f64).round().max(1.0) as u64;
    let mut senders = Vec::with_capacity(conversations);
    for _ in 0..conversations {
        senders.push(open(port).await);
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(c, mut sender)| {
            let tokens = tokens.clone();
            tokio::spawn(async move {
                let token = &tokens[c % tokens.len()];
                let mut lat = Vec::with_capacity(per_conv as usize);
                for k in 0..per_conv {
                    let due = start
                        + Duration::from_secs_f64(
                            (k as f64 * conversations as f64 + c as f64) / rate,
                        );
                    tokio::time::sleep_until(due).await;
                    let req = event_request(port, c, k, token, ts_base);
                    let status = post(&mut sender, req).await;
                    assert_eq!(status, 200, "a webhook call was answered {status}");
                    lat.push(tokio::time::Instant::now().saturating_duration_since(due));
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("paced task"));
    }
    let took = tokio::time::Instant::now().saturating_duration_since(start);
    (per_conv * conversations as u64, all, took)
}

// ---------------------------------------------------------------- scenarios

struct Shape {
    conversations: usize,
    concurrency: usize,
    events: usize,
    rate: f64,
    seconds: f64,
    max_in_flight: u32,
}

impl Shape {
    fn from_args(quick: bool) -> Shape {
        let conversations = count("--inbound-conversations", 1000);
        Shape {
            conversations,
            concurrency: count("--inbound-concurrency", 128).min(conversations),
            events: count("--inbound-events", if quick { 20_000 } else { 100_000 }),
            rate: count("--inbound-rate", 5000) as f64,
            seconds: count("--inbound-seconds", if quick { 3 } else { 10 }) as f64,
            max_in_flight: count("--inbound-in-flight", 1000) as u32,
        }
    }

    fn convs(&self) -> String {
        if self.conversations.is_multiple_of(1000) {
            format!("{}k conversations", self.conversations / 1000)
        } else {
            format!("{} conversations", self.conversations)
        }
    }
}

/// One saturated run on a fresh gateway: events/s end to end, gateway CPU per event (µs), and
/// the row's text.
async fn saturated_run(
    name: &str,
    issuer: u16,
    shape: &Shape,
    tokens: &Arc<Vec<String>>,
) -> (f64, f64, String) {
    let r = start(issuer);
    let bot = Bot::connect(r.gw.port, shape.max_in_flight).await;
    let me = std::process::id();
    let (cpu0, me0) = (r.gw.cpu(), cpu_of(me));
    let t0 = Instant::now();
    let (n, lat) = saturate(
        r.webhook,
        shape.conversations,
        shape.concurrency,
        shape.events,
        tokens,
    )
    .await;
    let posted = t0.elapsed();
    bot.wait_for(n, Duration::from_secs(600)).await;
    let total = t0.elapsed();
    let left = settled(r.gw.admin, Duration::from_secs(30)).await;
    let (gw_cpu, my_cpu) = (r.gw.cpu() - cpu0, cpu_of(me) - me0);
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n.max(1) as f64;
    let checked = bot.verify(name, shape.conversations, n);
    let (p50, p99, max) = percentiles(lat);
    let rate = n as f64 / total.as_secs_f64();
    let (_, peak) = r.gw.rss_kib();
    let text = format!(
        "{rate:.0} events/s end to end (posted → acked at the bot; all posted in {:.2} s = {:.0} events/s answered), gateway CPU {:.0} µs per event; webhook answer p50 {} ms, p99 {} ms, max {} ms; {checked}; CPU per event of the load generator and the bot (one process) {:.0} µs; inbox pending after the last ack: {}; gateway peak RSS {} MiB",
        posted.as_secs_f64(),
        n as f64 / posted.as_secs_f64(),
        per(gw_cpu),
        ms(p50),
        ms(p99),
        ms(max),
        per(my_cpu),
        left.map_or("unknown".into(), |p| p.to_string()),
        peak / 1024,
    );
    println!("  run: {text}");
    (rate, per(gw_cpu), text)
}

/// One paced run: the webhook answer's latency at a fixed rate, with a bot acking or with none
/// (the inbox keeps everything; a bot then drains it and checks it all arrived in order).
/// Returns the answer's p99 (ms) and the row's text.
async fn paced_run(
    name: &str,
    issuer: u16,
    shape: &Shape,
    tokens: &Arc<Vec<String>>,
    with_bot: bool,
) -> (f64, String) {
    let r = start(issuer);
    let bot = if with_bot {
        Some(Bot::connect(r.gw.port, shape.max_in_flight).await)
    } else {
        None
    };
    let cpu0 = r.gw.cpu();
    let (n, lat, took) = paced(
        r.webhook,
        shape.conversations,
        shape.rate,
        shape.seconds,
        tokens,
    )
    .await;
    let achieved = n as f64 / took.as_secs_f64();
    let (p50, p99, max) = percentiles(lat);
    let (checked, cpu_text) = match bot {
        Some(bot) => {
            bot.wait_for(n, Duration::from_secs(600)).await;
            settled(r.gw.admin, Duration::from_secs(30)).await;
            let per = (r.gw.cpu() - cpu0).as_secs_f64() * 1e6 / n.max(1) as f64;
            (
                bot.verify(name, shape.conversations, n),
                format!("gateway CPU {per:.0} µs per event"),
            )
        }
        None => {
            let stored_cpu = r.gw.cpu() - cpu0;
            let held = pending(r.gw.admin).await;
            let (_, rss) = r.gw.rss_kib();
            // Then a bot drains the backlog: nothing answered 200 may be missing.
            let cpu1 = r.gw.cpu();
            let bot = Bot::connect(r.gw.port, shape.max_in_flight).await;
            let drained = bot.wait_for(n, Duration::from_secs(600)).await;
            settled(r.gw.admin, Duration::from_secs(30)).await;
            let per = |d: Duration| d.as_secs_f64() * 1e6 / n.max(1) as f64;
            (
                format!(
                    "{} events held in the inbox at the end (gateway peak RSS {} MiB); a bot connected then drained them in {:.1} s ({:.0} events/s, gateway CPU {:.0} µs per event): {}",
                    held.map_or("unknown".into(), |p| p.to_string()),
                    rss / 1024,
                    drained.as_secs_f64(),
                    n as f64 / drained.as_secs_f64(),
                    per(r.gw.cpu() - cpu1),
                    bot.verify(name, shape.conversations, n)
                ),
                format!(
                    "gateway CPU {:.0} µs per event stored (no bot)",
                    per(stored_cpu)
                ),
            )
        }
    };
    let text = format!(
        "{n} events at {achieved:.0} events/s (open loop, a connection per conversation, latency from when each was due): webhook answer p50 {} ms, p99 {} ms, max {} ms; {cpu_text}; {checked}",
        ms(p50),
        ms(p99),
        ms(max),
    );
    (p99.as_secs_f64() * 1000.0, text)
}

/// Every inbound scenario that `--only` selects; their rows, and the headline lines.
pub async fn scenarios(quick: bool, rows: &mut Vec<Row>) -> Vec<String> {
    let shape = Shape::from_args(quick);
    let convs = shape.convs();
    let inbox = if flag("--inbound-memory") {
        "in-memory"
    } else {
        "durable"
    };
    let saturated = format!(
        "inbound: {convs} ({}), signed, webhook → {inbox} inbox → Receive → ack, {} webhook connections",
        mix().describe(),
        shape.concurrency
    );
    let with_bot = format!(
        "inbound at {:.0} events/s: {convs} ({}), signed, {inbox} inbox, a bot acking",
        shape.rate,
        mix().describe()
    );
    let no_bot = format!(
        "inbound at {:.0} events/s: {convs} ({}), signed, {inbox} inbox, no bot connected",
        shape.rate,
        mix().describe()
    );
    let mut summary = Vec::new();
    if ![&saturated, &with_bot, &no_bot].iter().any(|n| selected(n)) {
        return summary;
    }
    let issuer = issuer().await;
    let tokens = Arc::new(tokens());
    if selected(&saturated) {
        let repeat = count("--repeat", if quick { 1 } else { 3 });
        let mut runs = Vec::with_capacity(repeat);
        for _ in 0..repeat {
            runs.push(saturated_run(&saturated, issuer, &shape, &tokens).await);
        }
        let (rates, (rate, cpu, text)) = median_by(runs, |r| r.0);
        let text = if repeat > 1 {
            format!("median of {repeat} runs (events/s: {rates}): {text}")
        } else {
            text
        };
        report(rows, saturated.clone(), text);
        summary.push(format!(
            "inbound, {convs} ({}), signed events, webhook → {inbox} inbox → Receive → ack: {rate:.0} events/s end to end, gateway CPU {cpu:.0} µs per event (target >= 15,000 events/s)",
            mix().describe()
        ));
    }
    let mut answers = Vec::new();
    for (name, bot) in [(&with_bot, true), (&no_bot, false)] {
        if !selected(name) {
            continue;
        }
        let (p99, text) = paced_run(name, issuer, &shape, &tokens, bot).await;
        report(rows, name.to_string(), text);
        answers.push(format!(
            "{} {p99:.2} ms",
            if bot {
                "with a bot acking"
            } else {
                "with no bot connected"
            }
        ));
    }
    if !answers.is_empty() {
        summary.push(format!(
            "inbound at {:.0} events/s, the channel's answer p99: {} (target <= 20 ms)",
            shape.rate,
            answers.join(", ")
        ));
    }
    summary
}

/// The inbound load, for RESULTS.md.
pub fn describe(quick: bool) -> String {
    let s = Shape::from_args(quick);
    format!(
        "Inbound load: {} conversations ({}), every event signed (Slack v0 HMAC; Bot Framework RS256 JWTs from a local issuer, a few signed once and reused), one bot on one Receive stream (max_in_flight {}) acking each event; saturated: {} events over {} keep-alive webhook connections, closed loop; paced: {:.0} events/s for {:.0} s, open loop, a connection per conversation.",
        s.conversations,
        mix().describe(),
        s.max_in_flight,
        s.events,
        s.concurrency,
        s.rate,
        s.seconds
    )
}
