//! The gRPC listener's resources: connections that never finish their handshake are closed,
//! open connections are bounded, and the gateway keeps answering meanwhile; unknown credentials
//! are throttled per peer, and say so in few log lines.

mod common;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use channel_gateway::api::auth::sha256_hex;
use channel_gateway::api::pb;
use channel_gateway::config::TokenIdentity;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// True when the server closes `conn` within `within` (what it wrote first is read and dropped).
async fn closed_by_server(conn: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

async fn healthy(h: &Harness) {
    let mut health = HealthClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{}", h.gateway.addr))
            .unwrap()
            .connect()
            .await
            .expect("a new connection is taken"),
    );
    health
        .check(HealthCheckRequest::default())
        .await
        .expect("health answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_finish_their_handshake_are_closed() {
    let h = start_with(|c| c.server.handshake_timeout = Duration::from_millis(300)).await;
    let addr = h.gateway.addr;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut preface_only = Vec::new();
    for _ in 0..10 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(PREFACE).await.unwrap();
        preface_only.push(c);
    }
    // The gateway answers while they hang, on connections old and new.
    healthy(&h).await;
    h.send("conv-listener", "hello").await.expect("send");

    for (i, c) in silent.iter_mut().enumerate() {
        assert!(
            closed_by_server(c, Duration::from_secs(5)).await,
            "silent connection {i} is still open"
        );
    }
    for (i, c) in preface_only.iter_mut().enumerate() {
        assert!(
            closed_by_server(c, Duration::from_secs(5)).await,
            "preface-only connection {i} is still open"
        );
    }
    // A connection whose handshake finished is not cut by the deadline.
    h.send("conv-listener", "still here")
        .await
        .expect("the harness's connection outlives the handshake timeout");
    healthy(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_closed_at_once() {
    // The harness's client holds one connection; two idle ones fill the rest.
    let h = start_with(|c| c.server.max_connections = Some(3)).await;
    let addr = h.gateway.addr;
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(PREFACE).await.unwrap();
        idle.push(c);
    }
    // Past the limit: closed promptly, not left waiting.
    let started = std::time::Instant::now();
    let mut extra = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_by_server(&mut extra, Duration::from_secs(2)).await,
        "a connection past server.max_connections stays open"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // The connection admitted before keeps working.
    h.send("conv-limit", "admitted before")
        .await
        .expect("the harness's connection still works");

    // Once the idle ones go, there is room again.
    drop(idle);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut probe = TcpStream::connect(addr).await.unwrap();
        probe.write_all(PREFACE).await.unwrap();
        if !closed_by_server(&mut probe, Duration::from_millis(200)).await {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "closed connections never gave their slots back"
        );
    }
}

/// A peer that finished its handshake and then went silent (it never answers a PING) is
/// disconnected by HTTP/2 keepalive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_pings_is_disconnected() {
    let h = start_with(|c| {
        // A second to answer: the harness's own client must keep up on a loaded CI machine.
        c.server.http2_keepalive_interval = Duration::from_millis(200);
        c.server.http2_keepalive_timeout = Duration::from_secs(1);
    })
    .await;
    let mut c = TcpStream::connect(h.gateway.addr).await.unwrap();
    c.write_all(PREFACE).await.unwrap();
    // An empty SETTINGS, and the ACK of the server's: the handshake is done.
    c.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 4, 1, 0, 0, 0, 0])
        .await
        .unwrap();
    assert!(
        closed_by_server(&mut c, Duration::from_secs(5)).await,
        "a peer that never answers PING stays connected"
    );
    // The gateway's own clients answer PINGs and stay.
    tokio::time::sleep(Duration::from_millis(600)).await;
    h.send("keepalive", "still connected")
        .await
        .expect("a live client keeps its connection");
}

/// WARN lines the gateway (in this test process) has written so far.
fn warn_lines() -> Arc<Mutex<Vec<u8>>> {
    static LINES: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LINES
        .get_or_init(|| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = lines.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_max_level(tracing::Level::WARN)
                .with_writer(move || Sink(sink.clone()))
                .finish();
            tracing::subscriber::set_global_default(subscriber).unwrap();
            lines
        })
        .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn count_lines(log: &Mutex<Vec<u8>>, containing: &str) -> usize {
    String::from_utf8_lossy(&log.lock().unwrap())
        .lines()
        .filter(|l| l.contains(containing))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_credentials_are_throttled_per_peer_and_logged_sparingly() {
    const RIGHT: &str = "the-right-token";
    let log = warn_lines();
    let h = start_with(|c| {
        c.auth.tokens = vec![TokenIdentity {
            name: "bot-a".into(),
            sha256: sha256_hex(RIGHT.as_bytes()),
            bots: vec![BOT.into()],
        }];
        c.limits.failed_auth_burst = 5;
        c.limits.failed_auth_throttle_loopback = true;
        c.limits.failed_auth_per_second = 0.01;
    })
    .await;
    let call = |token: &str| {
        let mut c = h.client.clone();
        let mut req = tonic::Request::new(pb::SendRequest {
            message: Some(h.text("auth-throttle", "hi")),
            ..Default::default()
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        async move { c.send(req).await }
    };
    let started = std::time::Instant::now();
    let mut codes = Vec::new();
    for i in 0..50 {
        codes.push(call(&format!("guess-{i}")).await.unwrap_err().code());
    }
    let unauthenticated = codes
        .iter()
        .filter(|c| **c == tonic::Code::Unauthenticated)
        .count();
    assert_eq!(unauthenticated, 5, "guesses answered: {codes:?}");
    assert!(
        codes[5..]
            .iter()
            .all(|c| *c == tonic::Code::ResourceExhausted),
        "{codes:?}"
    );
    // The throttle holds whatever the credential: a guess that happened to be right is not
    // answered either.
    let e = call(RIGHT).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("limits.failed_auth_per_second"));

    // At most one line a second for each kind, not one per attempt.
    let secs = started.elapsed().as_secs() as usize;
    let unknown = count_lines(&log, "presented an unknown credential");
    let refused = count_lines(&log, "too many unknown credentials");
    assert!((1..=secs + 1).contains(&unknown), "{unknown} lines");
    assert!((1..=secs + 1).contains(&refused), "{refused} lines");
}

/// By default loopback peers are not throttled: a sidecar's bots share 127.0.0.1, and one bot
/// retrying a stale token must not lock out the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_peers_are_not_throttled_by_default() {
    const RIGHT: &str = "the-right-token";
    let h = start_with(|c| {
        c.auth.tokens = vec![TokenIdentity {
            name: "bot-a".into(),
            sha256: sha256_hex(RIGHT.as_bytes()),
            bots: vec![BOT.into()],
        }];
        c.limits.failed_auth_burst = 2;
        c.limits.failed_auth_per_second = 0.01;
    })
    .await;
    let call = |token: &str| {
        let mut c = h.client.clone();
        let mut req = tonic::Request::new(pb::SendRequest {
            message: Some(h.text("auth-loopback", "hi")),
            ..Default::default()
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        async move { c.send(req).await }
    };
    for i in 0..10 {
        let e = call(&format!("stale-{i}")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{}", e.message());
    }
    call(RIGHT)
        .await
        .expect("another local bot still gets through");
}

async fn watch(
    client: &mut pb::channel_gateway_client::ChannelGatewayClient<tonic::transport::Channel>,
) -> Result<tonic::Streaming<pb::WatchDeliveriesResponse>, tonic::Status> {
    client
        .watch_deliveries(pb::WatchDeliveriesRequest::default())
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_past_the_limit_are_refused_naming_the_key() {
    let h = start_with(|c| c.server.max_watchers = 3).await;
    let mut c = h.client.clone();
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(watch(&mut c).await.expect("within the limit"));
    }
    let e = watch(&mut c).await.expect_err("a fourth watcher");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
    assert!(
        e.message().contains("server.max_watchers"),
        "{}",
        e.message()
    );

    // A watcher that goes gives its place back.
    drop(open.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while watch(&mut c).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "a closed watcher kept its place"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Each watcher used to read every change back from the outbox itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_read_from_the_outbox_once_however_many_watch() {
    const WATCHERS: usize = 200;
    const MESSAGES: usize = 20;
    let h = start_with(|c| c.server.max_watchers = WATCHERS).await;
    let admin = h.gateway.admin_addr.expect("admin listener");
    // Spread over connections: one HTTP/2 connection carries at most 200 streams.
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut c = pb::channel_gateway_client::ChannelGatewayClient::connect(format!(
            "http://{}",
            h.gateway.addr
        ))
        .await
        .unwrap();
        for _ in 0..WATCHERS / 4 {
            streams.push(watch(&mut c).await.expect("watch"));
        }
    }
    let text = metrics_text(admin).await;
    assert_eq!(
        metric_value(&text, "channel_gateway_watchers "),
        WATCHERS as f64
    );
    for i in 0..MESSAGES {
        h.send("watched", &format!("m{i}")).await.expect("send");
    }
    // Every watcher hears of every message.
    let mut readers = tokio::task::JoinSet::new();
    for mut s in streams {
        readers.spawn(async move {
            let mut seen = 0;
            while seen < MESSAGES {
                let d = tokio::time::timeout(Duration::from_secs(30), s.message())
                    .await
                    .expect("a change within 30 s")
                    .expect("the stream goes on")
                    .expect("not ended");
                assert_eq!(
                    d.delivery.unwrap().state,
                    pb::DeliveryState::Delivered as i32
                );
                seen += 1;
            }
        });
    }
    while let Some(r) = readers.join_next().await {
        r.unwrap();
    }
    let text = metrics_text(admin).await;
    assert_eq!(
        metric_value(&text, "channel_gateway_watch_outbox_reads_total"),
        MESSAGES as f64,
        "one read per change, not one per watcher"
    );
}
