//! End-to-end benchmark: the real gateway binary and a fake Bot Framework connector run as
//! separate processes on 127.0.0.1; a gRPC load generator drives them and a minimal tonic echo
//! server, in the same run, gives the machine's baseline. Prints a table (and with
//! `--write-results`, bench/RESULTS.md). Every run verifies per-conversation order at the fake.
//!
//!     cargo bench --bench gateway                 # full run
//!     cargo bench --bench gateway -- --quick      # smaller counts, a smoke run
//!     cargo bench --bench gateway -- --concurrency 256 --conversations 1000 --messages 100000
//!
//! `--repeat N` runs each delivery scenario N times (default 3, 1 with `--quick`) and reports
//! the median run.
//! `--concurrency` is the number of concurrent callers (default 64, the echo baseline's too;
//! the slow-channel scenarios keep one caller per conversation), `--conversations` the
//! broadcast's width (default 1000) and `--messages` the Send scenarios' count (SendBatch
//! sends twice as many). `--slow-callers` sets the callers of the slow channel's Send scenario
//! (default: one per conversation), to tell the cost of many callers from that of many
//! conversations waiting on the channel. `--slow-room` sets where the waiting variant of that
//! scenario (`delivery.max_wait_for_room`) holds each conversation's Sends (default 2).
//!
//! Roles: the same executable also serves as the fake channel (`--role fake`) and the echo
//! server (`--role echo`), so each side is its own process.
//!
//! The inbound scenarios (gateway/inbound.rs) run after the send side: signed Slack and Bot
//! Framework events posted to the gateway's webhook listener and acked by a bot on Receive.
//! `--only inbound` runs them alone; their `--inbound-*` flags are described there and in
//! bench/README.md.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tonic::{Request, Response, Status};

use channel_gateway::api::pb::{
    self,
    channel_gateway_client::ChannelGatewayClient,
    channel_gateway_server::{ChannelGateway, ChannelGatewayServer},
};

type Client = ChannelGatewayClient<tonic::transport::Channel>;

// In a folder of its own: a file directly in benches/ would be a benchmark target itself.
#[path = "gateway/inbound.rs"]
mod inbound;
// The tests' throwaway PostgreSQL cluster (initdb in a temp dir, a free port, removed after).
#[path = "../tests/pg/mod.rs"]
mod pg;

// The same allocator as the gateway binary, so the load generator, the fake and the echo
// baseline don't pay glibc's malloc on cores they share with the gateway.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

fn main() {
    let role = arg("--role");
    // The fake stands in for a channel on other machines: one thread keeps its share of the
    // cores small and free of cross-thread wake-ups. The echo server runs like the gateway.
    let rt = if role.as_deref() == Some("fake") {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    }
    .expect("runtime");
    match role.as_deref() {
        Some("fake") => rt.block_on(fake_channel()),
        Some("echo") => rt.block_on(echo_server()),
        _ => rt.block_on(driver()),
    }
}

// ---------------------------------------------------------------- fake channel

/// The fake reads only the text: a real channel runs on other machines, so its cost here
/// should stay small next to the gateway's.
#[derive(serde::Deserialize)]
struct Activity<'a> {
    #[serde(default, borrow)]
    text: std::borrow::Cow<'a, str>,
}

#[derive(Default)]
struct FakeStats {
    received: AtomicU64,
    violations: AtomicU64,
    duplicates: AtomicU64,
    /// Each conversation's last sequence number, when the fake answered that call, and when
    /// its first call arrived.
    last: Mutex<HashMap<String, (u64, Instant, Instant)>>,
    /// From the fake's answer to a conversation's call to that conversation's next call, in µs,
    /// summed over `gaps` such pairs. On the slow channel a conversation's throughput is one call
    /// per delay + lateness + gap, so this says where the rest of its time went.
    gap_us: AtomicU64,
    gaps: AtomicU64,
    /// How much later than its delay the fake answered, in µs, summed over every call: its own
    /// timer and scheduling, which the gateway cannot help.
    late_us: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
    /// While true, activity calls wait: the gateway then only accepts (its deliveries queue
    /// up behind the calls held here), which isolates the accept path.
    hold: tokio::sync::watch::Sender<bool>,
    /// Connections the fake has accepted since it started (never reset): the RSS rows tell the
    /// gateway's connection pool apart from its conversations with it.
    connections: AtomicU64,
    /// When each conversation's activities were updated (StreamReply showings).
    updates: Mutex<HashMap<String, Vec<Instant>>>,
}

/// The fake serves HTTP/1.1 with hyper's server connection, one task per connection, and
/// routes by hand rather than through a web framework: it shares the two cores with the gateway
/// it measures, and a router, extractors and a JSON tree per call made it cost ~28 µs of CPU
/// per message on the slow channel, a fifth of the machine's whole budget there.
async fn fake_channel() {
    let delay = Duration::from_millis(arg("--delay-ms").and_then(|s| s.parse().ok()).unwrap_or(0));
    let stats = Arc::new(FakeStats::default());
    // A deep accept queue, as a channel's front servers have: the gateway opens a connection
    // per busy conversation, 1,000 of them within a few ms at a run's start, and tokio's
    // default backlog (1,024) overflowed now and then. The kernel then drops the SYN and the
    // client retries it a second later, so one conversation started 1 s late and stretched
    // the whole run by ~10% (`nstat`: TcpExtListenOverflows 1, TcpExtTCPSynRetrans 1).
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    let listener = socket.listen(8192).expect("listen");
    println!("{}", listener.local_addr().expect("addr").port());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let stats = stats.clone();
        let service = hyper::service::service_fn(move |req| {
            let stats = stats.clone();
            async move { Ok::<_, std::convert::Infallible>(fake_serve(&stats, delay, req).await) }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One request as the fake needs it.
struct FakeRequest {
    post: bool,
    /// An activity update (a StreamReply's showing).
    put: bool,
    /// The path and query.
    path: String,
}

/// Reads one request's body and answers it through `fake_route`.
async fn fake_serve(
    s: &FakeStats,
    delay: Duration,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use http_body_util::BodyExt;
    let (head, body) = req.into_parts();
    let req = FakeRequest {
        post: head.method == hyper::Method::POST,
        put: head.method == hyper::Method::PUT,
        path: head
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
    };
    let (status, answer) = match body.collect().await {
        Ok(body) => fake_route(s, delay, &req, &body.to_bytes()).await,
        Err(e) => (400, json!({ "error": e.to_string() }).to_string()),
    };
    let mut answer = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(answer)));
    *answer.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    answer.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    answer
}

async fn fake_route(
    s: &FakeStats,
    delay: Duration,
    req: &FakeRequest,
    body: &[u8],
) -> (u16, String) {
    let (path, query) = req.path.split_once('?').unwrap_or((req.path.as_str(), ""));
    // Slack and Telegram, for the StreamReply scenarios: a message posted (its first text's
    // latency, when it carries the first chunk's send time) and its updates, per conversation.
    if req.post
        && let Some(method) = path.strip_prefix("/api/").or_else(|| {
            path.strip_prefix("/bot")
                .and_then(|p| p.split_once('/'))
                .map(|(_, m)| m)
        })
        && matches!(
            method,
            "chat.postMessage" | "chat.update" | "sendMessage" | "editMessageText"
        )
    {
        return fake_message(s, method, body);
    }
    // An update of an activity: a stream's next showing. Counted per conversation.
    if req.put
        && let Some((conv, id)) = path
            .strip_prefix("/v3/conversations/")
            .and_then(|p| p.split_once("/activities/"))
    {
        s.updates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(conv.to_string())
            .or_default()
            .push(Instant::now());
        return (200, json!({ "id": id }).to_string());
    }
    if let Some(conv) = path
        .strip_prefix("/v3/conversations/")
        .and_then(|p| p.strip_suffix("/activities"))
        .filter(|_| req.post)
    {
        let Ok(activity) = serde_json::from_slice::<Activity>(body) else {
            return (400, r#"{"error":"the body is not an activity"}"#.into());
        };
        return (200, fake_activity(s, delay, conv, &activity.text).await);
    }
    match (req.post, path) {
        (true, "/token") => (
            200,
            json!({"access_token": "bench-token", "expires_in": 3600}).to_string(),
        ),
        (true, "/hold") => {
            s.hold.send_replace(body.trim_ascii() == b"on");
            (200, "\"ok\"".into())
        }
        (false, "/stats") => {
            let mut stats = json!({
                "received": s.received.load(Ordering::Relaxed),
                "connections": s.connections.load(Ordering::Relaxed),
                "violations": s.violations.load(Ordering::Relaxed),
                "duplicates": s.duplicates.load(Ordering::Relaxed),
                "late_us": s.late_us.load(Ordering::Relaxed) / s.received.load(Ordering::Relaxed).max(1),
                "gap_us": s.gap_us.load(Ordering::Relaxed) / s.gaps.load(Ordering::Relaxed).max(1),
            });
            // Sorting every latency is asked for once, at the end of a run: the load polls the
            // counts every 10 ms, and sorting 200k latencies each time was ~8% of the fake's
            // CPU, on the cores the gateway is measured on.
            if query == "latency" {
                let mut l = s
                    .latencies_us
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                l.sort_unstable();
                stats["p50_us"] = pct(&l, 50.0).into();
                stats["p99_us"] = pct(&l, 99.0).into();
                let last = s.last.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(t0) = last.values().map(|v| v.2).min() {
                    let since = |t: Instant| t.saturating_duration_since(t0).as_micros() as u32;
                    let first = last.values().map(|v| since(v.2)).max().unwrap_or(0);
                    let mut end: Vec<u32> = last.values().map(|v| since(v.1)).collect();
                    end.sort_unstable();
                    stats["first_max_us"] = first.into();
                    stats["end_p10_us"] = pct(&end, 10.0).into();
                    stats["end_p50_us"] = pct(&end, 50.0).into();
                    stats["end_max_us"] = pct(&end, 100.0).into();
                }
            }
            (200, stats.to_string())
        }
        (false, "/stream") => {
            // Updates per conversation: the most in any one second, and in all.
            let updates = s.updates.lock().unwrap_or_else(|p| p.into_inner());
            let mut worst = 0usize;
            let mut total = 0usize;
            for times in updates.values() {
                total += times.len();
                for (i, t) in times.iter().enumerate() {
                    let n = times[i..]
                        .iter()
                        .take_while(|u| u.saturating_duration_since(*t) < Duration::from_secs(1))
                        .count();
                    worst = worst.max(n);
                }
            }
            (
                200,
                json!({"worst_per_s": worst, "updates": total, "conversations": updates.len()})
                    .to_string(),
            )
        }
        (true, "/reset") => {
            s.updates.lock().unwrap_or_else(|p| p.into_inner()).clear();
            s.received.store(0, Ordering::Relaxed);
            s.violations.store(0, Ordering::Relaxed);
            s.duplicates.store(0, Ordering::Relaxed);
            s.gap_us.store(0, Ordering::Relaxed);
            s.late_us.store(0, Ordering::Relaxed);
            s.gaps.store(0, Ordering::Relaxed);
            s.last.lock().unwrap_or_else(|p| p.into_inner()).clear();
            s.latencies_us
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            (200, "\"ok\"".into())
        }
        _ => (404, r#"{"error":"no such route"}"#.into()),
    }
}

/// A Slack or Telegram message call of a StreamReply scenario (see `fake_route`).
fn fake_message(s: &FakeStats, method: &str, body: &[u8]) -> (u16, String) {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let conv = v
        .get("channel")
        .or_else(|| v.get("chat_id"))
        .map(|c| c.to_string().trim_matches('"').to_string())
        .unwrap_or_default();
    let n = s.received.fetch_add(1, Ordering::Relaxed) + 1;
    match method {
        "chat.postMessage" | "sendMessage" => {
            let text = v.get("text").and_then(Value::as_str).unwrap_or_default();
            let mut parts = text.split(' ');
            let sent: u128 = match (parts.next(), parts.next()) {
                (Some("0"), Some(t)) => t.parse().unwrap_or(0),
                _ => 0,
            };
            let now = unix_nanos();
            if sent > 0 && now > sent {
                s.latencies_us
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(((now - sent) / 1000).min(u32::MAX as u128) as u32);
            }
        }
        _ => s
            .updates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(conv.clone())
            .or_default()
            .push(Instant::now()),
    }
    let answer = if method.starts_with("chat.") {
        json!({"ok": true, "channel": conv, "ts": format!("1700000000.{n:06}")})
    } else {
        let id = v.get("message_id").cloned().unwrap_or_else(|| json!(n));
        json!({"ok": true, "result": {"message_id": id, "chat": {"id": v.get("chat_id")}}})
    };
    (200, answer.to_string())
}

/// One activity: waits while held and for the channel's delay, then checks the conversation's
/// order (the text is "<seq> <sent unix nanos>") and answers with the activity's id.
async fn fake_activity(s: &FakeStats, delay: Duration, conv: &str, text: &str) -> String {
    let arrived = Instant::now();
    let mut held = s.hold.subscribe();
    let _ = held.wait_for(|h| !*h).await;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut parts = text.split(' ');
    let seq: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let sent: u128 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let now = unix_nanos();
    let answered = Instant::now();
    let late = answered.saturating_duration_since(arrived + delay);
    s.late_us
        .fetch_add(late.as_micros() as u64, Ordering::Relaxed);
    {
        let mut last = s.last.lock().unwrap_or_else(|p| p.into_inner());
        let prev = last.get_mut(conv);
        match prev.as_deref().map(|p| p.0) {
            Some(p) if seq == p => {
                s.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            Some(p) if seq != p + 1 => {
                s.violations.fetch_add(1, Ordering::Relaxed);
            }
            None if seq != 0 => {
                s.violations.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        match prev {
            Some(p) => {
                let gap = arrived.saturating_duration_since(p.1);
                s.gap_us
                    .fetch_add(gap.as_micros() as u64, Ordering::Relaxed);
                s.gaps.fetch_add(1, Ordering::Relaxed);
                p.0 = seq;
                p.1 = answered;
            }
            None => {
                last.insert(conv.to_string(), (seq, answered, arrived));
            }
        }
    }
    if sent > 0 && now > sent {
        let us = ((now - sent) / 1000).min(u32::MAX as u128) as u32;
        s.latencies_us
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(us);
    }
    let n = s.received.fetch_add(1, Ordering::Relaxed) + 1;
    format!(r#"{{"id":"a{n}"}}"#)
}

fn pct(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------- echo server

struct Echo;

#[tonic::async_trait]
impl ChannelGateway for Echo {
    async fn send(
        &self,
        _r: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        Ok(Response::new(pb::SendResponse {
            message_id: "1".into(),
            state: pb::DeliveryState::Accepted as i32,
            ..Default::default()
        }))
    }
    async fn send_batch(
        &self,
        _r: Request<pb::SendBatchRequest>,
    ) -> Result<Response<pb::SendBatchResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn send_typing(
        &self,
        _r: Request<pb::SendTypingRequest>,
    ) -> Result<Response<pb::SendTypingResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn send_proactive(
        &self,
        _r: Request<pb::SendProactiveRequest>,
    ) -> Result<Response<pb::SendProactiveResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn update_message(
        &self,
        _: Request<pb::UpdateMessageRequest>,
    ) -> Result<Response<pb::UpdateMessageResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn delete_message(
        &self,
        _: Request<pb::DeleteMessageRequest>,
    ) -> Result<Response<pb::DeleteMessageResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn stream_reply(
        &self,
        _: Request<tonic::Streaming<pb::StreamReplyRequest>>,
    ) -> Result<Response<pb::StreamReplyResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn render(
        &self,
        _r: Request<pb::RenderRequest>,
    ) -> Result<Response<pb::RenderResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn get_capabilities(
        &self,
        _r: Request<pb::GetCapabilitiesRequest>,
    ) -> Result<Response<pb::GetCapabilitiesResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn get_delivery(
        &self,
        _r: Request<pb::GetDeliveryRequest>,
    ) -> Result<Response<pb::GetDeliveryResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    type WatchDeliveriesStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::WatchDeliveriesResponse, Status>> + Send>,
    >;
    async fn watch_deliveries(
        &self,
        _r: Request<pb::WatchDeliveriesRequest>,
    ) -> Result<Response<Self::WatchDeliveriesStream>, Status> {
        Err(Status::unimplemented("echo"))
    }
    type ReceiveStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::ReceiveResponse, Status>> + Send>,
    >;
    async fn receive(
        &self,
        _r: Request<tonic::Streaming<pb::ReceiveRequest>>,
    ) -> Result<Response<Self::ReceiveStream>, Status> {
        Err(Status::unimplemented("echo"))
    }
    type FetchAttachmentStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::FetchAttachmentResponse, Status>> + Send>,
    >;
    async fn fetch_attachment(
        &self,
        _r: Request<pb::FetchAttachmentRequest>,
    ) -> Result<Response<Self::FetchAttachmentStream>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn list_failed(
        &self,
        _r: Request<pb::ListFailedRequest>,
    ) -> Result<Response<pb::ListFailedResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn redeliver(
        &self,
        _r: Request<pb::RedeliverRequest>,
    ) -> Result<Response<pb::RedeliverResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
}

async fn echo_server() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    println!("{}", listener.local_addr().expect("addr").port());
    tonic::transport::Server::builder()
        .add_service(ChannelGatewayServer::new(Echo))
        // Accepted the same way as the gateway's listener (Nagle off), so the two compare.
        .serve_with_incoming(channel_gateway::server::no_delay(listener))
        .await
        .expect("serve");
}

// ---------------------------------------------------------------- driver

struct Proc {
    child: Child,
    port: u16,
    /// The gateway's admin listener (metrics); 0 for the other roles.
    admin: u16,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// CPU time the process has used so far (user + system).
    fn cpu(&self) -> Duration {
        cpu_of(self.child.id())
    }
}

/// CPU time a process has used so far (user + system). Per message it is a steadier figure than
/// throughput on a shared machine: waiting for a core costs no CPU.
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    // The kernel reports clock ticks; USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

/// Starts this executable in another role and reads the port it prints.
async fn spawn_role(role: &str, extra: &[&str]) -> Proc {
    use std::io::BufRead;
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .arg("--role")
        .arg(role)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn role");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("role output");
    let port: u16 = line.trim().parse().expect("role printed no port");
    Proc {
        child,
        port,
        admin: 0,
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct GatewayOpts {
    durable: bool,
    max_concurrency: usize,
    idle_timeout: &'static str,
    /// How long delivered messages stay in the outbox (the gateway's default when `None`).
    retention: Option<&'static str>,
    /// `delivery.max_pending_per_conversation` and `delivery.max_wait_for_room`: a Send to a
    /// full line waits for room. `None`: a bound no run reaches, so nothing waits.
    room: Option<(usize, &'static str)>,
    /// More of the gateway's environment, set last (so it overrides the above).
    env: Vec<(&'static str, String)>,
    /// The outbox on PostgreSQL: a fresh database of this cluster for each run. Runs end with
    /// a SIGKILL, which may leave a delivered message's final state uncommitted; a later run on
    /// the same database would deliver it again (flagged), which the order check would count.
    pg: Option<std::sync::Arc<pg::PgCluster>>,
}

impl GatewayOpts {
    /// What the delivery scenarios run with unless they say otherwise: the default concurrency
    /// and idle timeout, the default retention, and no Send waiting for room.
    fn standard(durable: bool) -> Self {
        Self {
            durable,
            max_concurrency: 512,
            idle_timeout: "30s",
            retention: None,
            room: None,
            env: Vec::new(),
            pg: None,
        }
    }
}

fn spawn_gateway(fake_port: u16, data_dir: &std::path::Path, o: &GatewayOpts) -> Proc {
    let port = free_port();
    let admin = free_port();
    // Another build of the gateway can be measured against this one with the same benchmark
    // binary (A/B runs, bench/PROFILE.md).
    let exe = std::env::var("BENCH_GATEWAY_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_channel-gateway").to_string());
    let mut cmd = Command::new(exe);
    if let Some(retention) = o.retention {
        cmd.env("CHANNEL_GATEWAY__OUTBOX__RETENTION", retention)
            .env("CHANNEL_GATEWAY__OUTBOX__COMPACT_INTERVAL", "1s");
    }
    let child = cmd
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(data_dir)
        .env(
            "CHANNEL_GATEWAY__OUTBOX__BACKEND",
            // `--backend log` measured the hand-written log against SQLite (bench/PROFILE.md).
            if o.durable {
                arg("--backend").unwrap_or_else(|| "sqlite".into())
            } else {
                "memory".into()
            },
        )
        .env(
            "CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__ALLOWED_SERVICE_HOSTS",
            "[\"127.0.0.1:*\"]",
        )
        .env(
            "CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__TOKEN_URL",
            format!("http://127.0.0.1:{fake_port}/token"),
        )
        .env(
            "CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__APP_ID",
            "bench-bot",
        )
        .env(
            "CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__APP_PASSWORD",
            "bench-secret",
        )
        .env(
            "CHANNEL_GATEWAY__DELIVERY__MAX_CONCURRENCY",
            o.max_concurrency.to_string(),
        )
        .env("CHANNEL_GATEWAY__DELIVERY__IDLE_TIMEOUT", o.idle_timeout)
        .env(
            "CHANNEL_GATEWAY__DELIVERY__MAX_PENDING_PER_CONVERSATION",
            o.room.map_or(1_000_000, |r| r.0).to_string(),
        )
        // The accept scenarios hold every message of the run, more than the default allows.
        .env("CHANNEL_GATEWAY__DELIVERY__MAX_PENDING_TOTAL", "1000000")
        .env(
            "CHANNEL_GATEWAY__DELIVERY__MAX_WAIT_FOR_ROOM",
            o.room.map_or("0s", |r| r.1),
        )
        .env("CHANNEL_GATEWAY__SERVER__MAX_BATCH_LEN", "100")
        .env("RUST_LOG", "error")
        .env(
            "CHANNEL_GATEWAY__ADMIN__LISTEN",
            format!("127.0.0.1:{admin}"),
        )
        .env("CHANNEL_GATEWAY__INBOUND__LISTEN", "127.0.0.1:0")
        .envs(o.env.iter().map(|(k, v)| (*k, v.as_str())))
        .envs(o.pg.iter().flat_map(|c| {
            [
                ("CHANNEL_GATEWAY__OUTBOX__BACKEND", "postgres".to_string()),
                (
                    "CHANNEL_GATEWAY__OUTBOX__POSTGRES__URL",
                    c.create_database(),
                ),
            ]
        }))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn gateway (build it with `cargo build --release` first)");
    Proc { child, port, admin }
}

/// A gateway for one scenario: on a fresh data directory, with a client connected, and the
/// fake's records cleared. Dropped in field order: the process goes before its directory.
struct Started {
    gw: Proc,
    client: Client,
    _dir: tempfile::TempDir,
}

async fn start_gateway(fake: &Proc, opts: &GatewayOpts) -> Started {
    fake_reset(fake.port).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = spawn_gateway(fake.port, dir.path(), opts);
    let client = connect(gw.port).await;
    Started {
        gw,
        client,
        _dir: dir,
    }
}

async fn connect(port: u16) -> Client {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match ChannelGatewayClient::connect(format!("http://127.0.0.1:{port}")).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("no server on {port}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The fake's counts; with `latency`, also its end-to-end latency percentiles.
async fn fake_stats(port: u16, latency: bool) -> Value {
    let query = if latency { "?latency" } else { "" };
    let r = reqwest::get(format!("http://127.0.0.1:{port}/stats{query}"))
        .await
        .expect("stats");
    r.json().await.expect("stats json")
}

async fn fake_hold(port: u16, on: bool) {
    let _ = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/hold"))
        .body(if on { "on" } else { "off" })
        .send()
        .await;
}

async fn fake_reset(port: u16) {
    let _ = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/reset"))
        .send()
        .await;
}

fn address(fake_port: u16, conv: usize) -> pb::Address {
    pb::Address {
        channel_id: "webchat".into(),
        user: Some(pb::Identity {
            id: "u".into(),
            ..Default::default()
        }),
        bot: Some(pb::Identity {
            id: "bench-bot".into(),
            ..Default::default()
        }),
        conversation: Some(pb::ConversationAccount {
            id: format!("c{conv}"),
            ..Default::default()
        }),
        service_url: format!("http://127.0.0.1:{fake_port}/"),
        ..Default::default()
    }
}

struct Load {
    concurrency: usize,
    conversations: usize,
    messages: usize,
    batch: usize,
    /// Conversation ids start here (a later wave of new conversations).
    first_conversation: usize,
    /// Each call returns once its message is delivered: no backlog builds up in the gateway.
    wait_delivered: bool,
}

struct LoadResult {
    calls_per_s: f64,
    messages: usize,
    p50: Duration,
    p99: Duration,
    p999: Duration,
}

/// `concurrency` tasks; each owns conversations `task, task + concurrency, ...` and sends them
/// round-robin, so each conversation has one sender and a known order.
async fn drive(
    client: &Client,
    fake_port: u16,
    load: &Load,
    seq_base: &Arc<Mutex<Vec<u64>>>,
) -> LoadResult {
    drive_over(
        std::slice::from_ref(client),
        fake_port,
        load,
        seq_base,
        None,
    )
    .await
}

/// `drive` over several gateways (task `t` calls `clients[t % len]`: replicas sharing one
/// database), at most `rate` calls a second in all when given (each task paced to its share).
async fn drive_over(
    clients: &[Client],
    fake_port: u16,
    load: &Load,
    seq_base: &Arc<Mutex<Vec<u64>>>,
    rate: Option<f64>,
) -> LoadResult {
    let per_task = load.messages / load.concurrency;
    let start = Instant::now();
    let mut tasks = Vec::new();
    // Each task's interval between calls at the paced rate.
    let every = rate.map(|r| Duration::from_secs_f64(load.concurrency as f64 / r.max(1.0)));
    for t in 0..load.concurrency {
        let mut client = clients[t % clients.len()].clone();
        let convs: Vec<usize> = (t..load.conversations).step_by(load.concurrency).collect();
        let seqs = seq_base.clone();
        let batch = load.batch;
        let first = load.first_conversation;
        let wait = if load.wait_delivered {
            pb::WaitMode::Delivered as i32
        } else {
            pb::WaitMode::Accepted as i32
        };
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_task / batch.max(1) + 1);
            if convs.is_empty() {
                return lat;
            }
            let addrs: Vec<pb::Address> = convs
                .iter()
                .map(|c| address(fake_port, first + *c))
                .collect();
            let mut sent = 0;
            let mut k = 0;
            while sent < per_task {
                let i = k % convs.len();
                k += 1;
                let conv = convs[i];
                let n = batch.max(1).min(per_task - sent);
                let msgs: Vec<pb::Message> = (0..n)
                    .map(|_| {
                        let seq = {
                            let mut s = seqs.lock().unwrap_or_else(|p| p.into_inner());
                            s[conv] += 1;
                            s[conv] - 1
                        };
                        pb::Message {
                            address: Some(Box::new(addrs[i].clone())),
                            text: format!("{seq} {}", unix_nanos()),
                            ..Default::default()
                        }
                    })
                    .collect();
                if let Some(every) = every {
                    // Paced: the k-th call of the task at k intervals from the start, so a
                    // slow call is not followed by a burst.
                    let due = start + every.mul_f64((k - 1) as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let t0 = Instant::now();
                let ok = if batch > 1 {
                    client
                        .send_batch(pb::SendBatchRequest {
                            messages: msgs,
                            wait,
                            ..Default::default()
                        })
                        .await
                        .is_ok()
                } else {
                    client
                        .send(pb::SendRequest {
                            message: msgs.into_iter().next(),
                            wait,
                            ..Default::default()
                        })
                        .await
                        .is_ok()
                };
                assert!(ok, "send failed during the benchmark");
                lat.push(t0.elapsed());
                sent += n;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let elapsed = start.elapsed();
    all.sort_unstable();
    let p = |q: f64| {
        all.get(((q / 100.0) * (all.len().saturating_sub(1)) as f64) as usize)
            .copied()
            .unwrap_or_default()
    };
    LoadResult {
        calls_per_s: all.len() as f64 / elapsed.as_secs_f64(),
        messages: per_task * load.concurrency,
        p50: p(50.0),
        p99: p(99.0),
        p999: p(99.9),
    }
}

async fn wait_delivered(fake_port: u16, n: u64, within: Duration) -> (Value, Duration) {
    let start = Instant::now();
    loop {
        let s = fake_stats(fake_port, false).await;
        if s["received"].as_u64().unwrap_or(0) >= n {
            let elapsed = start.elapsed();
            return (fake_stats(fake_port, true).await, elapsed);
        }
        if start.elapsed() > within {
            panic!("only {} of {n} delivered after {within:?}", s["received"]);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

struct Row(String, String);

/// A channel the StreamReply scenario streams to: its name, channel id, the gateway's settings
/// for it, and its documented limit on one conversation.
struct StreamTarget {
    name: &'static str,
    channel_id: &'static str,
    env: Vec<(&'static str, String)>,
    limit: &'static str,
}

/// StreamReply to channels that stream by edits (Teams, Slack, Telegram), each with its own
/// defaults for pacing: `conversations` replies at once, each 200 chunks 10 ms apart, like a
/// language model's tokens. Reports the time from a reply's first chunk to its first text at
/// the fake (its first message carries the chunk's send time) and the most updates one
/// conversation got in any second, against the channel's limit.
async fn stream_scenario(fake: &Proc, quick: bool, rows: &mut Vec<Row>) {
    let targets = [
        StreamTarget {
            name: "Teams",
            channel_id: "msteams",
            env: Vec::new(),
            limit: "Teams allows 7 a second per conversation",
        },
        StreamTarget {
            name: "Slack",
            channel_id: "slack",
            env: vec![
                (
                    "CHANNEL_GATEWAY__CHANNELS__SLACK__API_BASE_URL",
                    format!("http://127.0.0.1:{}/api", fake.port),
                ),
                (
                    "CHANNEL_GATEWAY__CHANNELS__SLACK__WORKSPACES",
                    r#"[{ bot_id = "B0BENCH", token = "xoxb-bench" }]"#.into(),
                ),
            ],
            limit: "Slack: about 1 a second per channel (channels.slack.rate_per_second)",
        },
        StreamTarget {
            name: "Telegram",
            channel_id: "telegram",
            env: vec![
                (
                    "CHANNEL_GATEWAY__CHANNELS__TELEGRAM__API_BASE_URL",
                    format!("http://127.0.0.1:{}", fake.port),
                ),
                (
                    "CHANNEL_GATEWAY__CHANNELS__TELEGRAM__BOTS",
                    r#"[{ bot_id = "benchbot", token = "1000:bench" }]"#.into(),
                ),
            ],
            limit: "Telegram: about 1 a second per private chat",
        },
    ];
    for target in targets {
        stream_run(fake, quick, &target, rows).await;
    }
}

async fn stream_run(fake: &Proc, quick: bool, target: &StreamTarget, rows: &mut Vec<Row>) {
    let conversations = if quick { 5 } else { 20 };
    let name = format!(
        "StreamReply to {}, {conversations} replies at once, 200 chunks 10 ms apart, durable",
        target.name
    );
    if !selected(&name) {
        return;
    }
    let opts = GatewayOpts {
        env: target.env.clone(),
        ..GatewayOpts::standard(true)
    };
    let started = start_gateway(fake, &opts).await;
    let cpu_before = cpu_of(started.gw.child.id());
    let mut tasks = Vec::new();
    let t0 = Instant::now();
    for c in 0..conversations {
        let mut client = started.client.clone();
        let mut address = address(fake.port, c);
        address.channel_id = target.channel_id.into();
        let (bot, conversation) = match target.channel_id {
            "slack" => ("B0BENCH".to_string(), format!("C0STREAM{c}")),
            "telegram" => ("benchbot".to_string(), format!("{}", 500_000 + c)),
            _ => ("bench-bot".to_string(), format!("stream-{c}")),
        };
        address.bot = Some(pb::Identity {
            id: bot,
            ..Default::default()
        });
        if target.channel_id == "telegram" {
            address.user = Some(pb::Identity {
                id: conversation.clone(),
                ..Default::default()
            });
        }
        address.conversation = Some(pb::ConversationAccount {
            id: conversation,
            ..Default::default()
        });
        tasks.push(tokio::spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel(256);
            let call = tokio::spawn(async move {
                client
                    .stream_reply(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
            });
            let frame = |k| pb::StreamReplyRequest { kind: Some(k) };
            use pb::stream_reply_request::Kind;
            let _ = tx
                .send(frame(Kind::Start(pb::Message {
                    address: Some(Box::new(address)),
                    ..Default::default()
                })))
                .await;
            // The first chunk carries its send time (the fake's order check reads "0 <nanos>").
            let _ = tx
                .send(frame(Kind::Chunk(format!("0 {} ", unix_nanos()))))
                .await;
            for i in 1..200 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let _ = tx.send(frame(Kind::Chunk(format!("tok{i} ")))).await;
            }
            let _ = tx.send(frame(Kind::Finish(pb::Message::default()))).await;
            drop(tx);
            call.await.ok().and_then(|r| r.ok()).map(|r| r.into_inner())
        }));
    }
    let mut done = 0;
    for t in tasks {
        if let Ok(Some(r)) = t.await
            && r.state == pb::DeliveryState::Delivered as i32
            && !r.incomplete
        {
            done += 1;
        }
    }
    let took = t0.elapsed();
    let cpu = cpu_of(started.gw.child.id()).saturating_sub(cpu_before);
    let stats = fake_stats(fake.port, true).await;
    let stream: Value = reqwest::get(format!("http://127.0.0.1:{}/stream", fake.port))
        .await
        .expect("fake /stream")
        .json()
        .await
        .expect("fake /stream JSON");
    let us = |k: &str| stats[k].as_u64().unwrap_or(0) as f64 / 1000.0;
    report(
        rows,
        name,
        format!(
            "{done} of {conversations} shown whole in {took:.1?}; first text at the fake p50 \
             {:.1} ms, p99 {:.1} ms after the first chunk; updates per conversation: at most {} \
             in any second, {} in all (delivery.stream_update_interval 1s; {}); gateway CPU \
             {:.0} ms in all",
            us("p50_us"),
            us("p99_us"),
            stream["worst_per_s"],
            stream["updates"],
            target.limit,
            cpu.as_secs_f64() * 1000.0
        ),
    );
}

/// Adds a row to the table and prints it at once (a long run shows progress).
fn report(rows: &mut Vec<Row>, name: String, result: String) {
    println!("{name}: {result}");
    rows.push(Row(name, result));
}

/// Several replicas on one PostgreSQL database: `n` gateways spawned on the same URL (each
/// held to `cap` of a core if given), the callers spread over them (consecutive Sends of one
/// conversation go through one caller, and so one replica; delivery is by each conversation's
/// partition owner, whichever accepted it), paced at `rate` calls/s if given. Returns the
/// delivered rate and the load's figures.
async fn replicas_run(
    fake: &Proc,
    cluster: &pg::PgCluster,
    (n, rate, cap): (usize, Option<f64>, Option<f64>),
    load: &Load,
    rows: &mut Vec<Row>,
) -> (f64, LoadResult) {
    let name = &replicas_name(load.conversations, n, rate, cap);
    fake_reset(fake.port).await;
    let url = cluster.create_database();
    let opts = GatewayOpts {
        env: vec![
            ("CHANNEL_GATEWAY__OUTBOX__BACKEND", "postgres".into()),
            ("CHANNEL_GATEWAY__OUTBOX__POSTGRES__URL", url.clone()),
        ],
        ..GatewayOpts::standard(true)
    };
    let dirs: Vec<tempfile::TempDir> = (0..n)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    // Declared before the gateways, so dropped after them even when a panic unwinds: a
    // cgroup can be removed only once its process has gone.
    let mut caps: Vec<CpuCap> = Vec::new();
    let gws: Vec<Proc> = dirs
        .iter()
        .map(|d| spawn_gateway(fake.port, d.path(), &opts))
        .collect();
    if let Some(cores) = cap {
        for g in &gws {
            caps.push(CpuCap::apply(g.child.id(), cores).expect("CPU cap checked before"));
        }
    }
    let mut clients = Vec::new();
    for g in &gws {
        clients.push(connect(g.port).await);
    }
    // Every partition held, each replica with its share, before the load starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut owned = Vec::new();
        for g in &gws {
            owned.push(gauge(g.admin, "partitions_owned").await.unwrap_or(0));
        }
        if owned.iter().sum::<u64>() == 256 && owned.iter().all(|o| *o > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: partitions never split: {owned:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let wal = |url: String| async move {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect for pg_stat_wal");
        tokio::spawn(conn);
        let r = c
            .query_one("SELECT wal_sync::int8 FROM pg_stat_wal", &[])
            .await
            .expect("pg_stat_wal");
        r.get::<_, i64>(0)
    };
    let wal0 = wal(url.clone()).await;
    let seqs = Arc::new(Mutex::new(vec![0u64; load.conversations]));
    let cpu0: Duration = gws.iter().map(Proc::cpu).sum();
    pg_statements(cluster, true).await;
    let db_cpu0 = db_cpu(cluster);
    let start = Instant::now();
    let r = drive_over(&clients, fake.port, load, &seqs, rate).await;
    let (stats, _) = wait_delivered(fake.port, r.messages as u64, Duration::from_secs(600)).await;
    let total = start.elapsed();
    let cpu: Duration = gws.iter().map(Proc::cpu).sum::<Duration>() - cpu0;
    let db = db_cpu(cluster).saturating_sub(db_cpu0);
    pg_statements(cluster, false).await;
    let violations = stats["violations"].as_u64().unwrap_or(0);
    assert_eq!(violations, 0, "{name}: ORDER VIOLATED at the fake channel");
    let mut commits = 0;
    for g in &gws {
        commits += gauge(g.admin, "outbox_commits_total").await.unwrap_or(0);
    }
    let wal_syncs = wal(url).await - wal0;
    let msgs = r.messages.max(1) as f64;
    let delivered = r.messages as f64 / total.as_secs_f64();
    report(
        rows,
        name.to_string(),
        format!(
            "accepted {:.0} calls/s (p50 {} ms, p99 {} ms, p99.9 {} ms); delivered {delivered:.0} \
             msg/s, gateways' CPU {:.0} µs and the database's {:.0} µs per delivered message; \
             order OK ({} msgs, {} dup); \
             outbox commits {:.3} and WAL flushes {:.3} per message (the database's, all \
             replicas)",
            r.calls_per_s,
            ms(r.p50),
            ms(r.p99),
            ms(r.p999),
            cpu.as_secs_f64() * 1e6 / msgs,
            db.as_secs_f64() * 1e6 / msgs,
            r.messages,
            stats["duplicates"].as_u64().unwrap_or(0),
            commits as f64 / msgs,
            wal_syncs as f64 / msgs,
        ),
    );
    drop(gws);
    drop(caps);
    (delivered, r)
}

/// What the replicas' scenarios measured.
struct ReplicasFigures {
    /// Delivered msg/s: three replicas, one, on the machine's shared cores.
    three: f64,
    one: f64,
    /// Accept p99 of the three at half their rate.
    half_p99: Duration,
    /// With each gateway's CPU capped (`--replica-cpu`): the cap in cores, three's rate, one's.
    capped: Option<(f64, f64, f64)>,
}

/// Three replicas against one on the same database, then the three at half their rate for
/// the accept latency; then three against one again with each gateway held to the same share
/// of a core, as replicas on nodes of their own are (where the cgroup CPU controller is
/// writable: the bench runs as root).
async fn replicas_scenarios(
    fake: &Proc,
    cluster: &pg::PgCluster,
    sends: &Load,
    rows: &mut Vec<Row>,
) -> Option<ReplicasFigures> {
    let convs = sends.conversations;
    // The three are compared with the one, so selecting the three runs the one as well.
    if !selected(&replicas_name(convs, 3, None, None)) {
        return None;
    }
    let mut run = async |n: usize, rate: Option<f64>, cap: Option<f64>| {
        replicas_run(fake, cluster, (n, rate, cap), sends, rows).await
    };
    let (one, _) = run(1, None, None).await;
    let (three, _) = run(3, None, None).await;
    let (_, half) = run(3, Some(three / 2.0), None).await;
    let cores = match arg("--replica-cpu") {
        None => Ok(REPLICA_CPU),
        // A cap is at least a cgroup's smallest quota (1 ms per 10 ms period) and at most the
        // machine: any other value would be refused by the kernel halfway through the runs.
        Some(c) => c
            .parse::<f64>()
            .ok()
            .filter(|c| (0.1..=64.0).contains(c))
            .ok_or(format!(
                "--replica-cpu {c:?}: a number of cores from 0.1 to 64"
            )),
    };
    let capped = match cores.and_then(|cores| CpuCap::check(cores).map(|()| cores)) {
        Ok(cores) => {
            let (one, _) = run(1, None, Some(cores)).await;
            let (three, _) = run(3, None, Some(cores)).await;
            Some((cores, three, one))
        }
        Err(why) => {
            println!("replicas with a CPU cap: not run ({why})");
            None
        }
    };
    Some(ReplicasFigures {
        three,
        one,
        half_p99: half.p99,
        capped,
    })
}

/// Each gateway's share of a core in the capped replicas' runs: three of them and the
/// database fit in this machine's two cores beside the load and the fake channel.
const REPLICA_CPU: f64 = 0.25;

/// The name of a replicas scenario: `n` replicas, at `rate` calls/s when paced, each held to
/// `cap` of a core.
fn replicas_name(convs: usize, n: usize, rate: Option<f64>, cap: Option<f64>) -> String {
    let base = format!("{convs} conversations, Send, PostgreSQL outbox");
    match (n, rate, cap) {
        (1, _, None) => format!("{base}, one replica (WAL counted)"),
        (1, _, Some(c)) => format!("{base}, one replica held to {c} of a core"),
        (_, None, None) => format!("{base}, three replicas"),
        (_, None, Some(c)) => format!("{base}, three replicas held to {c} of a core each"),
        (_, Some(r), _) => {
            format!("{base}, three replicas at half that rate ({r:.0} calls/s)")
        }
    }
}

/// One process held to a share of the CPU by a cgroup of its own (the v1 `cpu` controller
/// or v2's `cpu.max`), removed on drop. A replica on a node of its own has its node's cores;
/// on this machine the three and the database share two, so a cap gives each the same
/// budget whether one runs or three.
struct CpuCap {
    dir: std::path::PathBuf,
}

/// Scheduler period of a cap: short, so a capped process runs in slices of milliseconds
/// rather than stalling for most of a 100 ms period.
const CAP_PERIOD_US: u64 = 10_000;

impl CpuCap {
    fn root() -> Option<(std::path::PathBuf, bool)> {
        let v1 = std::path::Path::new("/sys/fs/cgroup/cpu");
        if v1.join("cpu.cfs_quota_us").exists() {
            return Some((v1.to_path_buf(), true));
        }
        let v2 = std::path::Path::new("/sys/fs/cgroup");
        let controllers = std::fs::read_to_string(v2.join("cgroup.subtree_control")).ok()?;
        controllers
            .split_whitespace()
            .any(|c| c == "cpu")
            .then(|| (v2.to_path_buf(), false))
    }

    /// Whether caps of `cores` can be made here, and if not why: one is put on a short-lived
    /// process.
    fn check(cores: f64) -> Result<(), String> {
        let mut child = Command::new("sleep")
            .arg("5")
            .spawn()
            .map_err(|e| format!("sleep: {e}"))?;
        let cap = Self::apply(child.id(), cores);
        let _ = child.kill();
        let _ = child.wait();
        drop(cap?);
        Ok(())
    }

    /// A cgroup of its own for process `pid`, which may use `cores` of a core.
    fn apply(pid: u32, cores: f64) -> Result<Self, String> {
        let (root, v1) = Self::root().ok_or("no cgroup CPU controller found")?;
        let dir = root.join(format!("cg-bench-{pid}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cap = CpuCap { dir };
        let quota = ((cores * CAP_PERIOD_US as f64) as u64).max(1000);
        let write = |file: &str, value: String| {
            std::fs::write(cap.dir.join(file), value)
                .map_err(|e| format!("{}/{file}: {e}", cap.dir.display()))
        };
        if v1 {
            write("cpu.cfs_period_us", CAP_PERIOD_US.to_string())?;
            write("cpu.cfs_quota_us", quota.to_string())?;
        } else {
            write("cpu.max", format!("{quota} {CAP_PERIOD_US}"))?;
        }
        write("cgroup.procs", pid.to_string())?;
        Ok(cap)
    }
}

impl Drop for CpuCap {
    fn drop(&mut self) {
        // Removable once its process has gone: the gateways are killed just before.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("cgroup {} left behind", self.dir.display());
    }
}

/// Callers of a `wave`.
const WAVE_CALLERS: usize = 64;

/// One message to each of `n` conversations numbered from `first`, each call waiting until its
/// message is delivered (no backlog builds up in the gateway); returns once the fake has them all.
async fn wave(client: &Client, fake_port: u16, n: usize, first: usize) {
    let seqs = Arc::new(Mutex::new(vec![0u64; n]));
    let load = Load {
        concurrency: WAVE_CALLERS.min(n),
        conversations: n,
        messages: n,
        batch: 1,
        first_conversation: first,
        wait_delivered: true,
    };
    let r = drive(client, fake_port, &load, &seqs).await;
    wait_delivered(fake_port, r.messages as u64, Duration::from_secs(600)).await;
}

/// `--only <text>` runs just the scenarios whose name contains it (for profiling one path);
/// `--only =<name>` the one scenario with exactly that name; `|` separates alternatives, so
/// `--only "a|b"` runs both (a PostgreSQL row and the embedded row it is compared with).
fn selected(name: &str) -> bool {
    arg("--only").is_none_or(|o| {
        o.split('|').any(|o| match o.strip_prefix('=') {
            Some(exact) => name == exact,
            None => name.contains(o),
        })
    })
}

/// The benchmark's PostgreSQL is sized as a deployment's would be, not as the tests' clusters
/// (16 MB of shared buffers, so that many fit on one machine): PostgreSQL's own guidance is a
/// quarter of the memory for a dedicated server; 1 GB is what this shared machine can spare.
/// It keeps 1 GB of WAL segments for reuse (`min_wal_size`), and `warm_wal` fills them once, as
/// a database that has been running has: see there.
/// `--pg-statements` also loads `pg_stat_statements` and prints each run's costliest statements.
fn pg_settings() -> String {
    let mut s = String::from("shared_buffers = 1GB\nmin_wal_size = 1GB\nmax_wal_size = 2GB\n");
    if flag("--pg-statements") {
        s.push_str(
            "shared_preload_libraries = 'pg_stat_statements'\n\
             pg_stat_statements.track_planning = on\n",
        );
    }
    s
}

/// With `--pg-statements`: clears the cluster's statement counts (`reset`), or prints the
/// statements that took the most time since.
async fn pg_statements(cluster: &pg::PgCluster, reset: bool) {
    if !flag("--pg-statements") {
        return;
    }
    let Ok((c, conn)) = tokio_postgres::connect(cluster.url(), tokio_postgres::NoTls).await else {
        return;
    };
    tokio::spawn(conn);
    let _ = c
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await;
    if reset {
        let _ = c.batch_execute("SELECT pg_stat_statements_reset()").await;
        return;
    }
    let rows = c
        .query(
            "SELECT calls, rows, total_exec_time, total_plan_time, \
             shared_blks_hit + shared_blks_read, \
             left(regexp_replace(query, '\\s+', ' ', 'g'), 140) \
             FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 12",
            &[],
        )
        .await
        .unwrap_or_default();
    println!("  statements (calls, rows, executing ms, planning ms, blocks, query):");
    for r in rows {
        println!(
            "    {:>8} {:>9} {:>9.0} {:>9.0} {:>10}  {}",
            r.get::<_, i64>(0),
            r.get::<_, i64>(1),
            r.get::<_, f64>(2),
            r.get::<_, f64>(3),
            r.get::<_, i64>(4),
            r.get::<_, &str>(5)
        );
    }
}

/// A new cluster has no WAL segments to reuse: every 16 MB of WAL it creates a segment, filling
/// it with zeroes and syncing it, and every commit waits meanwhile (~50 ms here: the accept
/// p99.9 of a one-replica run was 50 ms, 10 ms once segments were reused). A database that has
/// been running recycles its old segments instead. So before the runs, 1 GB of WAL is written
/// and a checkpoint makes those segments reusable (`min_wal_size` keeps them).
fn warm_wal(cluster: &pg::PgCluster) {
    let started = Instant::now();
    cluster.execute(
        "postgres",
        "CREATE TABLE cg_bench_warm AS SELECT repeat('x', 1000) AS t \
         FROM generate_series(1, 900000); DROP TABLE cg_bench_warm; CHECKPOINT",
    );
    println!(
        "PostgreSQL: 1 GB of WAL written and checkpointed in {:.1} s, so runs reuse segments",
        started.elapsed().as_secs_f64()
    );
}

/// CPU time the PostgreSQL cluster has used so far: its postmaster (with the backends it has
/// reaped) and every live child (the gateways' backends, the WAL writer, the checkpointer).
/// Beside the gateway's CPU it shows where a message's cost went when both share the cores.
fn db_cpu(cluster: &pg::PgCluster) -> Duration {
    let Some(pm) = cluster.postmaster_pid() else {
        return Duration::ZERO;
    };
    // Fields after the command name: state, ppid, ..., then utime, stime, cutime, cstime.
    let fields = |pid: u32| -> Option<Vec<u64>> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (_, rest) = stat.rsplit_once(')')?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ppid = f.get(1)?.parse().ok()?;
        let mut out = vec![ppid];
        for i in 11..15 {
            out.push(f.get(i)?.parse().ok()?);
        }
        Some(out)
    };
    let mut ticks = fields(pm).map_or(0, |f| f[1..5].iter().sum());
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(f) = fields(pid).filter(|f| f[0] == u64::from(pm)) {
            ticks += f[1] + f[2];
        }
    }
    Duration::from_millis(ticks * 10)
}

/// Runs a delivery scenario `--repeat` times (default 3), each on a fresh gateway, and reports
/// the run with the median delivered rate, listing every run's rate: single runs on a shared
/// machine differ by a fifth or more.
async fn delivery_scenario(
    name: &str,
    fake: &Proc,
    gw_opts: &GatewayOpts,
    load: &Load,
    rows: &mut Vec<Row>,
) -> (LoadResult, f64, f64) {
    if !selected(name) {
        return (
            LoadResult {
                calls_per_s: 0.0,
                messages: 0,
                p50: Duration::ZERO,
                p99: Duration::ZERO,
                p999: Duration::ZERO,
            },
            0.0,
            0.0,
        );
    }
    let repeat = count("--repeat", if flag("--quick") { 1 } else { 3 });
    let mut runs = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        runs.push(delivery_run(name, fake, gw_opts, load).await);
    }
    let (rates, (r, delivered_per_s, gw_us, text)) = median_by(runs, |r| r.1);
    let text = if repeat > 1 {
        format!("median of {repeat} runs (delivered msg/s: {rates}): {text}")
    } else {
        text
    };
    report(rows, name.to_string(), text);
    (r, delivered_per_s, gw_us)
}

/// The run with the median figure, and every run's figure in ascending order for the row.
fn median_by<T>(mut runs: Vec<T>, figure: impl Fn(&T) -> f64) -> (String, T) {
    runs.sort_by(|a, b| figure(a).total_cmp(&figure(b)));
    let all = runs
        .iter()
        .map(|r| format!("{:.0}", figure(r)))
        .collect::<Vec<_>>()
        .join(", ");
    let median = runs.swap_remove(runs.len() / 2);
    (all, median)
}

/// One run on a fresh gateway: the load, then every message delivered in order.
async fn delivery_run(
    name: &str,
    fake: &Proc,
    gw_opts: &GatewayOpts,
    load: &Load,
) -> (LoadResult, f64, f64, String) {
    let started = start_gateway(fake, gw_opts).await;
    let (gw, client) = (&started.gw, &started.client);
    let seqs = Arc::new(Mutex::new(vec![0u64; load.conversations]));
    let me = std::process::id();
    let (cpu0, fake_cpu0, load_cpu0) = (gw.cpu(), fake.cpu(), cpu_of(me));
    if let Some(c) = gw_opts.pg.as_deref() {
        pg_statements(c, true).await;
    }
    let db_cpu0 = gw_opts.pg.as_deref().map(db_cpu);
    let start = Instant::now();
    let r = drive(client, fake.port, load, &seqs).await;
    let (stats, _) = wait_delivered(fake.port, r.messages as u64, Duration::from_secs(600)).await;
    let total = start.elapsed();
    let per_msg = |d: Duration| d.as_secs_f64() * 1e6 / r.messages.max(1) as f64;
    let (gw_us, fake_us, load_us) = (
        per_msg(gw.cpu() - cpu0),
        per_msg(fake.cpu() - fake_cpu0),
        per_msg(cpu_of(me) - load_cpu0),
    );
    let db_us = match (gw_opts.pg.as_deref(), db_cpu0) {
        (Some(c), Some(c0)) => format!(
            ", of the database {:.0} µs",
            per_msg(db_cpu(c).saturating_sub(c0))
        ),
        _ => String::new(),
    };
    if let Some(c) = gw_opts.pg.as_deref() {
        pg_statements(c, false).await;
    }
    let delivered_per_s = r.messages as f64 / total.as_secs_f64();
    let violations = stats["violations"].as_u64().unwrap_or(0);
    assert_eq!(violations, 0, "{name}: ORDER VIOLATED at the fake channel");
    let (_, peak) = gw.rss_kib();
    // A durable store's commits: each is one durable write (a WAL fsync for SQLite, a WAL
    // flush for PostgreSQL), so commits per message is what durability costs per message.
    let commits = match (
        gauge(gw.admin, "outbox_commits_total").await,
        gauge(gw.admin, "outbox_commit_changes_total").await,
    ) {
        (Some(c), Some(ch)) if c > 0 => format!(
            "; outbox {c} commits: {:.3} per message, {:.1} changes per commit",
            c as f64 / r.messages.max(1) as f64,
            ch as f64 / c as f64
        ),
        _ => String::new(),
    };
    // When each conversation began and ended shows stragglers: the run lasts until the last
    // conversation's last message, so one that started or ran late stretches it.
    let sec = |k: &str| stats[k].as_f64().unwrap_or(0.0) / 1e6;
    let text = format!(
        "accepted {:.0} calls/s (p50 {} ms, p99 {} ms, p99.9 {} ms); delivered {:.0} msg/s, gateway CPU {:.0} µs per delivered message; end-to-end p50 {:.2} ms, p99 {:.2} ms; order OK ({} msgs, {} dup); between a conversation's answer and its next call {:.2} ms (the fake answered {:.2} ms late); CPU per message of the fake channel {:.0} µs, of the load generator {:.0} µs{db_us}; gateway peak RSS {} MiB; from the fake's first call, conversations began by {:.2} s and ended between {:.2} and {:.2} s (median {:.2} s)",
        r.calls_per_s,
        ms(r.p50),
        ms(r.p99),
        ms(r.p999),
        delivered_per_s,
        gw_us,
        stats["p50_us"].as_f64().unwrap_or(0.0) / 1000.0,
        stats["p99_us"].as_f64().unwrap_or(0.0) / 1000.0,
        r.messages,
        stats["duplicates"],
        stats["gap_us"].as_f64().unwrap_or(0.0) / 1000.0,
        stats["late_us"].as_f64().unwrap_or(0.0) / 1000.0,
        fake_us,
        load_us,
        peak / 1024,
        sec("first_max_us"),
        sec("end_p10_us"),
        sec("end_max_us"),
        sec("end_p50_us"),
    ) + &commits;
    println!("  run: {text}");
    (r, delivered_per_s, gw_us, text)
}

/// The accept path alone: the fake holds every activity call until the load ends, so the
/// gateway's CPU goes to accepting (its deliveries queue behind the held calls). The gateway
/// and the echo server take turns, round after round with the same client, and the headline is
/// the median of the rounds' ratios: this machine's speed drifts within seconds, and a turn
/// each keeps both sides of a ratio under the same drift. Then the fake lets go, and the run
/// still has to deliver every message in order.
async fn accept_scenario(
    name: &str,
    fake: &Proc,
    echo: &Client,
    gw_opts: &GatewayOpts,
    load: &Load,
    rounds: usize,
    rows: &mut Vec<Row>,
) -> Option<f64> {
    if !selected(name) {
        return None;
    }
    let started = start_gateway(fake, gw_opts).await;
    fake_hold(fake.port, true).await;
    let (gw, client) = (&started.gw, &started.client);
    let seqs = Arc::new(Mutex::new(vec![0u64; load.conversations]));
    let echo_seqs = Arc::new(Mutex::new(vec![0u64; load.conversations]));
    let mut turns = Vec::new();
    let mut messages = 0;
    for _ in 0..rounds {
        let e = drive(echo, 1, load, &echo_seqs).await;
        let g = drive(client, fake.port, load, &seqs).await;
        messages += g.messages;
        turns.push((g, e));
    }
    fake_hold(fake.port, false).await;
    let (stats, drained) =
        wait_delivered(fake.port, messages as u64, Duration::from_secs(600)).await;
    let violations = stats["violations"].as_u64().unwrap_or(0);
    assert_eq!(violations, 0, "{name}: ORDER VIOLATED at the fake channel");
    let (_, peak) = gw.rss_kib();
    let mut ratios: Vec<f64> = turns
        .iter()
        .map(|(g, e)| g.calls_per_s / e.calls_per_s)
        .collect();
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    let rounds_text = turns
        .iter()
        .map(|(g, e)| {
            format!(
                "{:.0} vs {:.0} = {:.2}x (gateway p50 {} ms, p99 {} ms, p99.9 {} ms)",
                g.calls_per_s,
                e.calls_per_s,
                g.calls_per_s / e.calls_per_s,
                ms(g.p50),
                ms(g.p99),
                ms(g.p999)
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    report(
        rows,
        name.to_string(),
        format!(
            "median {median:.2}x echo over {rounds} rounds of {} calls each (gateway vs echo calls/s: {rounds_text}); once released, the backlog drained in {:.1} s; order OK ({messages} msgs, {} dup); gateway peak RSS {} MiB",
            load.messages,
            drained.as_secs_f64(),
            stats["duplicates"],
            peak / 1024
        ),
    );
    Some(median)
}

/// What an active conversation costs: the gateway's RSS once `n` conversations have each had a
/// message delivered and still hold their workers, less its RSS before them. The baseline is
/// taken after a warm-up of `RSS_WARM_UP` conversations, driven like the wave, which opens the
/// connections the wave will use and the allocator's pages for 64 calls at once: those grow
/// with deliveries in flight (up to `delivery.max_concurrency`) and shrink when they idle, not
/// with conversations, so their cost is reported beside the figure rather than spread over the
/// first thousand conversations. Measured on `--repeat` fresh gateways, median reported: at 1k
/// conversations a few of the allocator's pages more or less move the figure by a fifth.
async fn rss_per_conversation(fake: &Proc, n: usize, rows: &mut Vec<Row>) {
    let name = format!("RSS, {n} active conversations");
    if !selected(&name) {
        return;
    }
    let repeat = count("--repeat", if flag("--quick") { 1 } else { 3 });
    let mut runs = Vec::new();
    for _ in 0..repeat {
        runs.push(rss_once(fake, n).await);
    }
    let (all, (_, median)) = median_by(runs, |r| r.0);
    report(
        rows,
        name,
        format!("median of {repeat} gateways (bytes per active conversation: {all}): {median}"),
    );
}

/// Conversations run before the baseline of `rss_per_conversation`: four per caller, so the
/// pool holds about as many connections as the wave will want.
const RSS_WARM_UP: usize = 4 * WAVE_CALLERS;

/// One gateway's bytes per active conversation, and the row's text for it.
async fn rss_once(fake: &Proc, n: usize) -> (f64, String) {
    let opts = GatewayOpts {
        idle_timeout: "10m",
        ..GatewayOpts::standard(true)
    };
    let started = start_gateway(fake, &opts).await;
    let (gw, client) = (&started.gw, &started.client);
    let connections = |stats: &Value| stats["connections"].as_u64().unwrap_or(0);
    // One conversation first, so code, the token and the outbox are paged in.
    wave(client, fake.port, 1, n).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (first, _) = gw.rss_kib();
    let opened = connections(&fake_stats(fake.port, false).await);
    wave(client, fake.port, RSS_WARM_UP, n + 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (base, _) = gw.rss_kib();
    let pool = connections(&fake_stats(fake.port, false).await).saturating_sub(opened);
    fake_reset(fake.port).await;
    // Waiting for each delivery: a backlog of accepted messages, freed once delivered but kept
    // by the allocator, would otherwise be counted as conversation state.
    wave(client, fake.port, n, 0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (after, _) = gw.rss_kib();
    let more = connections(&fake_stats(fake.port, false).await)
        .saturating_sub(opened)
        .saturating_sub(pool);
    let per = (after.saturating_sub(base) as f64 * 1024.0) / n as f64;
    let text = format!(
        "{:.1} MiB -> {:.1} MiB: {per:.0} bytes per active conversation (the wave opened {more} more connections); the baseline is after {} warm-up conversations, which opened {pool} pooled connections and took RSS from {:.1} MiB to {:.1} MiB",
        base as f64 / 1024.0,
        after as f64 / 1024.0,
        RSS_WARM_UP + 1,
        first as f64 / 1024.0,
        base as f64 / 1024.0,
    );
    (per, text)
}

/// One gauge of the gateway's metrics (`channel_gateway_<name>`), when it answers.
async fn gauge(admin: u16, name: &str) -> Option<u64> {
    let text = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let prefix = format!("channel_gateway_{name}");
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

async fn active_workers(admin: u16) -> Option<u64> {
    gauge(admin, "active_conversation_workers").await
}

async fn wait_evicted(admin: u16) -> Duration {
    let start = Instant::now();
    loop {
        if active_workers(admin).await == Some(0) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "workers not evicted: {:?}",
            active_workers(admin).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An evicted conversation must cost nothing: after a wave of `n` conversations is evicted, a
/// second wave of `n` new ones must fit in the memory the first one left behind.
async fn rss_after_eviction(fake: &Proc, n: usize, rows: &mut Vec<Row>) {
    if !selected("RSS") {
        return;
    }
    // Delivered messages leave the outbox after 1 s here, so what remains is what the
    // conversations themselves cost. A retained message costs ~100 bytes of outbox index until
    // its retention ends (docs/configuration.md, `outbox.retention`); the active-conversation rows include it.
    let opts = GatewayOpts {
        idle_timeout: "2s",
        retention: Some("1s"),
        ..GatewayOpts::standard(true)
    };
    let started = start_gateway(fake, &opts).await;
    let (gw, client) = (&started.gw, &started.client);
    let (base, _) = gw.rss_kib();
    let mut after = Vec::new();
    for i in 0..2 {
        fake_reset(fake.port).await;
        wave(client, fake.port, n, i * n).await;
        let (active, _) = gw.rss_kib();
        wait_evicted(gw.admin).await;
        // Past the retention and a compaction.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let (evicted, _) = gw.rss_kib();
        after.push((active, evicted));
    }
    let grew = after[1].1.saturating_sub(after[0].1);
    report(
        rows,
        format!("RSS, {n} conversations evicted, then {n} new ones"),
        format!(
            "{} MiB at start; wave 1: {} MiB active, {} MiB once evicted (0 workers); wave 2 of new conversations: {} MiB active, {} MiB once evicted: {:.0} bytes per evicted conversation (delivered messages compacted after 1 s)",
            base / 1024,
            after[0].0 / 1024,
            after[0].1 / 1024,
            after[1].0 / 1024,
            after[1].1 / 1024,
            grew as f64 * 1024.0 / n as f64
        ),
    );
}

/// RSS with delivered messages retained (the default `outbox.retention` of 1 h, so nothing is
/// compacted): the durable store's index is on disk, so memory should not grow with what it
/// keeps. Fed with SendBatch of 20 over 1,000 conversations.
async fn rss_retained(fake: &Proc, total: usize, rows: &mut Vec<Row>) {
    let name = format!("RSS, {total} delivered messages retained vs 10,000");
    if !selected(&name) {
        return;
    }
    let started = start_gateway(fake, &GatewayOpts::standard(true)).await;
    let (gw, client) = (&started.gw, &started.client);
    let seqs = Arc::new(Mutex::new(vec![0u64; 1000]));
    let mut at = Vec::new();
    let mut sent = 0u64;
    fake_reset(fake.port).await;
    for upto in [10_000usize, total] {
        let load = Load {
            concurrency: 64,
            conversations: 1000,
            messages: upto - sent as usize,
            batch: 20,
            first_conversation: 0,
            // Each call waits for its delivery: no backlog builds up, whose peak the
            // allocator would keep and the figure would then show instead of the store's.
            wait_delivered: true,
        };
        let r = drive(client, fake.port, &load, &seqs).await;
        sent += r.messages as u64;
        wait_delivered(fake.port, sent, Duration::from_secs(600)).await;
        // The last outcomes reach the store after the fake's answers.
        tokio::time::sleep(Duration::from_secs(2)).await;
        at.push((sent, gw.rss_kib().0));
    }
    let (small, big) = (at[0].1.max(1), at[1].1);
    report(
        rows,
        name,
        format!(
            "{} MiB after {} delivered, {} MiB after {} delivered, all retained: {:+.1}% (target within 10%)",
            small / 1024,
            at[0].0,
            big / 1024,
            at[1].0,
            (big as f64 / small as f64 - 1.0) * 100.0
        ),
    );
}

/// A positive count given on the command line, or the default.
fn count(name: &str, default: usize) -> usize {
    match arg(name) {
        None => default,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => panic!("{name} must be a positive whole number, got `{v}`"),
        },
    }
}

async fn driver() {
    let quick = flag("--quick");
    let scale = if quick { 10 } else { 1 };
    let concurrency = count("--concurrency", 64);
    let conversations = count("--conversations", 1000);
    let messages = count("--messages", 100_000 / scale);
    // Scenario names carry the load's shape, so `--only` and the table say what was run.
    let convs = if conversations.is_multiple_of(1000) {
        format!("{}k conversations", conversations / 1000)
    } else {
        format!("{conversations} conversations")
    };
    let callers = if concurrency == 64 {
        String::new()
    } else {
        format!(", {concurrency} callers")
    };
    // One call in flight per conversation needs a limit at least that wide.
    let slow_limit = conversations.max(1024);
    let ideal = conversations as f64 * 20.0;
    let mut rows: Vec<Row> = Vec::new();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
        / 1024;

    let load = format!(
        "Load: {concurrency} concurrent callers (on the slow channel: one per conversation with Send, one per five with SendBatch), {conversations} conversations, {messages} messages per Send scenario (twice as many with SendBatch).\n\n{}",
        inbound::describe(quick)
    );
    // `--only inbound`: the inbound scenarios alone, without the send side's servers.
    if arg("--only").is_some_and(|o| o.contains("inbound")) {
        let summary = inbound::scenarios(quick, &mut rows).await;
        finish(&rows, &summary, &load, cores, mem);
        return;
    }

    // `--only StreamReply`: the streaming scenario alone.
    if arg("--only").is_some_and(|o| o.contains("StreamReply")) {
        let fake = spawn_role("fake", &[]).await;
        stream_scenario(&fake, quick, &mut rows).await;
        finish(&rows, &[], &load, cores, mem);
        return;
    }

    // 1. The machine's baseline: a minimal tonic server answering the same Send.
    let echo = spawn_role("echo", &[]).await;
    let echo_client = connect(echo.port).await;
    let seqs = Arc::new(Mutex::new(vec![0u64; conversations]));
    let echo_load = Load {
        concurrency,
        conversations,
        messages,
        batch: 1,
        first_conversation: 0,
        wait_delivered: false,
    };
    let e = drive(&echo_client, 1, &echo_load, &seqs).await;
    report(
        &mut rows,
        "echo server (baseline)".into(),
        format!(
            "{:.0} calls/s (p50 {} ms, p99 {} ms, p99.9 {} ms)",
            e.calls_per_s,
            ms(e.p50),
            ms(e.p99),
            ms(e.p999)
        ),
    );

    let fake = spawn_role("fake", &[]).await;
    let sends = Load {
        concurrency,
        conversations,
        messages,
        batch: 1,
        first_conversation: 0,
        wait_delivered: false,
    };
    // The accept path in rounds against the echo server (still running for these).
    let rounds = Load {
        messages: messages / 5,
        ..sends
    };
    let held_durable = accept_scenario(
        &format!("accept path: {convs}, Send, durable outbox, deliveries held{callers}"),
        &fake,
        &echo_client,
        &GatewayOpts::standard(true),
        &rounds,
        5,
        &mut rows,
    )
    .await;
    let held_memory = accept_scenario(
        &format!("accept path: {convs}, Send, in-memory outbox, deliveries held{callers}"),
        &fake,
        &echo_client,
        &GatewayOpts::standard(false),
        &rounds,
        5,
        &mut rows,
    )
    .await;
    drop(echo);
    let (durable, durable_delivered, durable_cpu) = delivery_scenario(
        &format!("{convs}, Send, durable outbox{callers}"),
        &fake,
        &GatewayOpts::standard(true),
        &sends,
        &mut rows,
    )
    .await;
    let (memory, _, _) = delivery_scenario(
        &format!("{convs}, Send, in-memory outbox{callers}"),
        &fake,
        &GatewayOpts::standard(false),
        &sends,
        &mut rows,
    )
    .await;
    // Short conversations, the common case: each conversation's worker, connection use and
    // outbox records start and end 20 messages apart, not 100.
    let short = Load {
        messages: conversations * 20,
        ..sends
    };
    let (_, short_delivered, short_cpu) = delivery_scenario(
        &format!("{convs} x 20 messages, Send, durable outbox{callers}"),
        &fake,
        &GatewayOpts::standard(true),
        &short,
        &mut rows,
    )
    .await;
    let batches = Load {
        concurrency,
        conversations,
        messages: 2 * messages,
        batch: 20,
        first_conversation: 0,
        wait_delivered: false,
    };
    let (_, batch_delivered, batch_cpu) = delivery_scenario(
        &format!("{convs}, SendBatch of 20, durable{callers}"),
        &fake,
        &GatewayOpts::standard(true),
        &batches,
        &mut rows,
    )
    .await;
    // The same two loads with the outbox on PostgreSQL (one replica, a throwaway cluster on
    // this machine, fsync on): what a shared deployment pays against the embedded store.
    let pg_send_name = format!("{convs}, Send, PostgreSQL outbox (one replica){callers}");
    let pg_batch_name =
        format!("{convs}, SendBatch of 20, PostgreSQL outbox (one replica){callers}");
    let (pg_send, pg_batch, pg_replicas) = if selected(&pg_send_name)
        || selected(&pg_batch_name)
        || selected(&replicas_name(sends.conversations, 3, None, None))
    {
        let cluster = std::sync::Arc::new(pg::PgCluster::start_with(&pg_settings()));
        warm_wal(&cluster);
        let pg_opts = || GatewayOpts {
            pg: Some(cluster.clone()),
            ..GatewayOpts::standard(true)
        };
        let (_, send, send_cpu) =
            delivery_scenario(&pg_send_name, &fake, &pg_opts(), &sends, &mut rows).await;
        let (_, batch, batch_cpu) =
            delivery_scenario(&pg_batch_name, &fake, &pg_opts(), &batches, &mut rows).await;
        let replicas = replicas_scenarios(&fake, &cluster, &sends, &mut rows).await;
        let some = |rate: f64, cpu| (rate > 0.0).then_some((rate, cpu));
        (some(send, send_cpu), some(batch, batch_cpu), replicas)
    } else {
        (None, None, None)
    };
    let hot = Load {
        concurrency: 1,
        conversations: 1,
        messages: 5_000 / scale,
        batch: 1,
        first_conversation: 0,
        wait_delivered: false,
    };
    delivery_scenario(
        "one hot conversation (serial), durable",
        &fake,
        &GatewayOpts::standard(true),
        &hot,
        &mut rows,
    )
    .await;
    drop(fake);

    let slow = spawn_role("fake", &["--delay-ms", "50"]).await;
    let slow_load = Load {
        concurrency: count("--slow-callers", conversations),
        conversations,
        messages,
        batch: 1,
        first_conversation: 0,
        wait_delivered: false,
    };
    let slow_opts = |room| GatewayOpts {
        max_concurrency: slow_limit,
        room,
        ..GatewayOpts::standard(true)
    };
    let (_, slow_delivered, slow_cpu) = delivery_scenario(
        &format!("slow channel (50 ms), {convs}, Send, concurrency limit {slow_limit}, durable"),
        &slow,
        &slow_opts(None),
        &slow_load,
        &mut rows,
    )
    .await;
    // The same callers with backpressure that waits: a Send to a conversation already holding
    // `room` undelivered messages waits for one to finish, so each caller is held to its
    // channel's pace instead of queueing ahead of it (the setting a bot that floods a slow
    // channel should run with; the default refuses at 10,000 instead).
    let room = count("--slow-room", 2);
    let (_, slow_waiting_delivered, slow_waiting_cpu) = delivery_scenario(
        &format!("slow channel (50 ms), {convs}, Send waiting for room at {room} per conversation, concurrency limit {slow_limit}, durable"),
        &slow,
        &slow_opts(Some((room, "60s"))),
        &slow_load,
        &mut rows,
    )
    .await;
    // The same channel fed by SendBatch: acceptance is then cheap, so the figure shows what
    // the delivery engine draws from parallel conversations alone.
    let slow_batches = Load {
        concurrency: conversations.div_ceil(5),
        conversations,
        messages: 2 * messages,
        batch: 20,
        first_conversation: 0,
        wait_delivered: false,
    };
    let (_, slow_batch_delivered, slow_batch_cpu) = delivery_scenario(
        &format!("slow channel (50 ms), {convs}, SendBatch of 20, concurrency limit {slow_limit}, durable"),
        &slow,
        &slow_opts(None),
        &slow_batches,
        &mut rows,
    )
    .await;
    drop(slow);

    let fake = spawn_role("fake", &[]).await;
    stream_scenario(&fake, quick, &mut rows).await;
    for n in [1_000usize, 10_000, 100_000] {
        if quick && n > 10_000 {
            continue;
        }
        rss_per_conversation(&fake, n, &mut rows).await;
    }
    rss_after_eviction(&fake, if quick { 10_000 } else { 50_000 }, &mut rows).await;
    rss_retained(&fake, if quick { 100_000 } else { 1_000_000 }, &mut rows).await;
    drop(fake);

    let ratio = |r: &LoadResult| r.calls_per_s / e.calls_per_s;
    let pg_ratio = |pg: Option<(f64, f64)>, embedded: f64| match pg {
        Some((rate, cpu)) if embedded > 0.0 => format!(
            "{rate:.0} msg/s, {:.2}x the embedded store, gateway CPU {cpu:.0} µs per message",
            rate / embedded
        ),
        _ => "not run".into(),
    };
    let mut summary = vec![
        format!(
            "PostgreSQL outbox, one replica: Send {}; SendBatch of 20 {} (target >= 0.5x)",
            pg_ratio(pg_send, durable_delivered),
            pg_ratio(pg_batch, batch_delivered)
        ),
        match &pg_replicas {
            Some(f) => format!(
                "PostgreSQL outbox, three replicas vs one (Send): {:.0} vs {:.0} msg/s, \
                 {:.2}x on the machine's shared cores; {} (target: not slower); accept p99 at \
                 half of the three's rate {} ms (target <= 10 ms)",
                f.three,
                f.one,
                f.three / f.one.max(1.0),
                match f.capped {
                    Some((cores, three, one)) => format!(
                        "each held to {cores} of a core: {three:.0} vs {one:.0} msg/s, {:.2}x",
                        three / one.max(1.0)
                    ),
                    None => "with a CPU cap: not run".into(),
                },
                ms(f.half_p99)
            ),
            None => "PostgreSQL outbox, three replicas: not run".into(),
        },
        format!(
            "accept path (durable) / echo: {:.2}x (target >= 0.5x); in-memory {:.2}x (median of rounds taken in turn with the echo server)",
            held_durable.unwrap_or(0.0),
            held_memory.unwrap_or(0.0)
        ),
        format!(
            "accept while delivering every message to the fake on the same cores / echo: durable {:.2}x, in-memory {:.2}x",
            ratio(&durable),
            ratio(&memory)
        ),
        format!(
            "delivered, {convs}, one Send per message: {durable_delivered:.0} msg/s, gateway CPU {durable_cpu:.0} µs per message (target >= 15,000 msg/s)"
        ),
        format!(
            "delivered, {convs} x 20 messages, one Send per message: {short_delivered:.0} msg/s, gateway CPU {short_cpu:.0} µs per message"
        ),
        format!(
            "delivered, {convs}, SendBatch of 20: {batch_delivered:.0} msg/s, gateway CPU {batch_cpu:.0} µs per message (target >= 30,000 msg/s)"
        ),
        format!(
            "slow channel (50 ms), Send: {slow_delivered:.0} msg/s = {:.0}% of the ideal {ideal:.0}, gateway CPU {slow_cpu:.0} µs per message (target >= 80%)",
            100.0 * slow_delivered / ideal
        ),
        format!(
            "slow channel (50 ms), Send waiting for room at {room} per conversation: {slow_waiting_delivered:.0} msg/s = {:.0}% of the ideal {ideal:.0}, gateway CPU {slow_waiting_cpu:.0} µs per message",
            100.0 * slow_waiting_delivered / ideal
        ),
        format!(
            "slow channel (50 ms), SendBatch of 20: {slow_batch_delivered:.0} msg/s = {:.0}% of the ideal {ideal:.0}, gateway CPU {slow_batch_cpu:.0} µs per message",
            100.0 * slow_batch_delivered / ideal
        ),
    ];
    summary.extend(inbound::scenarios(quick, &mut rows).await);
    finish(&rows, &summary, &load, cores, mem);
}

/// Prints the headline and the table; with `--write-results`, writes them to bench/RESULTS.md.
fn finish(rows: &[Row], summary: &[String], load: &str, cores: usize, mem: u64) {
    println!();
    for s in summary {
        println!("{s}");
    }
    let mut table = String::from("| scenario | result |\n|---|---|\n");
    for r in rows {
        table.push_str(&format!("| {} | {} |\n", r.0, r.1));
    }
    println!("\n{table}");
    if flag("--write-results") {
        let date = std::process::Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let doc = format!(
            "# Benchmark results\n\nCommand: `cargo bench --bench gateway -- {}`\n\nMachine: {cores} cores, {mem} GiB memory. Date: {date}.\n\n{load}\n\nThe gateway (release build) and the fake connector run as separate processes on 127.0.0.1; the load generator is this benchmark process (in the inbound scenarios also the bot and the Bot Framework's issuer). All of them share the machine's cores. The profile, what it led to change and how to read these figures: bench/PROFILE.md.\n\n## Headline\n\n{}\n\n## All scenarios\n\n{table}",
            std::env::args()
                .skip(1)
                .filter(|a| a != "--bench")
                .collect::<Vec<_>>()
                .join(" "),
            summary
                .iter()
                .map(|s| format!("- {s}"))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        let _ = std::fs::create_dir_all("bench");
        std::fs::write("bench/RESULTS.md", doc).expect("write bench/RESULTS.md");
        println!("wrote bench/RESULTS.md");
    }
}
