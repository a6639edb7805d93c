//! What every fake channel server of the tests shares: serving on 127.0.0.1, counting calls in
//! flight per key (a conversation, a PSID, a Slack channel), waiting for what it recorded, and
//! the gateway each harness starts in front of its fake. Each fake keeps only what its
//! channel's API looks like.

#[path = "../pg/mod.rs"]
pub mod pg;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Router;
use channel_gateway::api::pb::channel_gateway_client::ChannelGatewayClient;
use channel_gateway::config::Config;
use channel_gateway::server::RunningGateway;

/// A gateway config for a test against a fake channel: gRPC and admin on free ports of
/// 127.0.0.1, short retry delays, and the outbox the suite runs on: SQLite, the default, in a
/// directory of its own (tests run in parallel), or the one `CHANNEL_GATEWAY_TEST_BACKEND`
/// names (`memory`). Each harness then points its channel at its fake.
pub fn gateway_config() -> Config {
    let mut c = Config::load(
        None,
        vec![(
            "CHANNEL_GATEWAY__SERVER__LISTEN".into(),
            "\"127.0.0.1:0\"".into(),
        )],
    )
    .unwrap();
    c.delivery.base_retry_delay = Duration::from_millis(20);
    c.delivery.max_retry_delay = Duration::from_secs(2);
    c.delivery.request_timeout = Duration::from_secs(10);
    c.admin.listen = "127.0.0.1:0".into();
    c.inbound.listen = "127.0.0.1:0".into();
    match backend() {
        Backend::Memory => c.outbox.backend = channel_gateway::config::OutboxBackend::Memory,
        Backend::Sqlite => {
            c.outbox.backend = channel_gateway::config::OutboxBackend::Sqlite;
            c.outbox.data_dir = data_dir();
        }
        Backend::Postgres => {
            c.outbox.backend = channel_gateway::config::OutboxBackend::Postgres;
            c.outbox.data_dir = data_dir();
            c.outbox.postgres.url =
                channel_gateway::settings::Secret::new(postgres_url_for(&c.outbox.data_dir));
            c.outbox.postgres.pool_size = 4;
        }
    }
    c
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Memory,
    Postgres,
}

/// The outbox the suite runs on: `CHANNEL_GATEWAY_TEST_BACKEND` (`sqlite`, the default;
/// `postgres`, on a throwaway cluster per test binary, a database per gateway; `memory`).
pub fn backend() -> Backend {
    match std::env::var("CHANNEL_GATEWAY_TEST_BACKEND").as_deref() {
        Ok("sqlite") | Ok("") | Err(_) => Backend::Sqlite,
        Ok("memory") => Backend::Memory,
        Ok("postgres") => Backend::Postgres,
        Ok(other) => panic!("CHANNEL_GATEWAY_TEST_BACKEND={other}: sqlite, postgres or memory"),
    }
}

/// The database of the gateway that keeps its state in `data_dir`: a new one the first time,
/// the same one when that gateway restarts on that directory.
pub fn postgres_url_for(data_dir: &std::path::Path) -> String {
    static DATABASES: std::sync::Mutex<Option<HashMap<std::path::PathBuf, String>>> =
        std::sync::Mutex::new(None);
    let mut dbs = DATABASES.lock().unwrap_or_else(|p| p.into_inner());
    dbs.get_or_insert_with(HashMap::new)
        .entry(data_dir.to_path_buf())
        .or_insert_with(|| pg::PgCluster::shared().create_database())
        .clone()
}

/// A fresh data directory under this test process's own root in the temp dir. The root goes
/// with the process: each test binary removes the roots of test processes no longer running
/// when it makes its first one (a test process ends without running destructors of statics).
pub fn data_dir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static ROOT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let root = ROOT.get_or_init(|| {
        let tmp = std::env::temp_dir();
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("cg-test-data-")
                    && !std::path::Path::new(&format!("/proc/{pid}")).exists()
                {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let root = tmp.join(format!("cg-test-data-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        root
    });
    root.join(format!("gw-{}", NEXT.fetch_add(1, Ordering::Relaxed)))
}

/// Starts a gateway and connects a gRPC client to it over TCP.
pub async fn start_gateway(
    config: Config,
) -> (
    RunningGateway,
    ChannelGatewayClient<tonic::transport::Channel>,
) {
    let gateway = channel_gateway::server::start(config).await.unwrap();
    let client = ChannelGatewayClient::connect(format!("http://{}", gateway.addr))
        .await
        .unwrap();
    (gateway, client)
}

/// Serves `app` on a free port of 127.0.0.1 for the rest of the test.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

/// Calls in flight per key now, and the most ever seen at once.
#[derive(Default)]
pub struct InFlight(Mutex<HashMap<String, (u32, u32)>>);

impl InFlight {
    pub fn enter(&self, key: &str) {
        let mut f = self.0.lock().unwrap();
        let e = f.entry(key.to_string()).or_insert((0, 0));
        e.0 += 1;
        e.1 = e.1.max(e.0);
    }

    pub fn leave(&self, key: &str) {
        if let Some(e) = self.0.lock().unwrap().get_mut(key) {
            e.0 -= 1;
        }
    }

    pub fn max(&self, key: &str) -> u32 {
        self.0.lock().unwrap().get(key).map_or(0, |x| x.1)
    }

    /// Enters `key` until the guard drops. A handler's future is dropped when its client goes
    /// away mid-call (a gateway killed while a call waits on the fake's latency); a `leave`
    /// after an await would then never run, and the key would count one call in flight forever.
    pub fn track<'a>(&'a self, key: &'a str) -> InFlightGuard<'a> {
        self.enter(key);
        InFlightGuard { of: self, key }
    }
}

/// One call in flight, counted until dropped ([`InFlight::track`]).
pub struct InFlightGuard<'a> {
    of: &'a InFlight,
    key: &'a str,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.of.leave(self.key);
    }
}

/// Waits until `pred` holds for what `received` returns, or panics after `within` (a generous
/// bound for a busy machine, never an assertion on speed).
pub async fn wait_for<T: std::fmt::Debug>(
    within: Duration,
    what: &str,
    received: impl Fn() -> Vec<T>,
    pred: impl Fn(&[T]) -> bool,
) {
    let deadline = Instant::now() + within;
    loop {
        let got = received();
        if pred(&got) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; received {} calls: {got:#?}",
                got.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
