//! Replicas of the real gateway binary on one PostgreSQL database, for the test binaries that run
//! several (tests/replicas.rs: the outbox; tests/replicas_inbound.rs: the inbox): a fresh database
//! on the binary's shared throwaway cluster (tests/pg), processes started on ports and data
//! directories of their own, killed (SIGKILL), signalled (SIGSTOP, SIGCONT, SIGTERM) and
//! restarted, the tail of each one's log on a failure, and a direct connection to the database.
//!
//! Owns only the processes' lifecycle, the settings every replica shares (the lease, the
//! renewal, the poll), the tests' turn-taking (`SERIAL`) and the way a check lists what it found
//! wrong (`Problems`). What a replica is configured for beyond that (delivery retries, channels)
//! is each test binary's, given with [`Replicas::set_env`]; what is checked is each binary's.
//! Needs the binary to declare `mod common;` (the fake connector, `gateway_command`, `free_port`).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use channel_gateway::api::pb::channel_gateway_client::ChannelGatewayClient;

use crate::common::pg::PgCluster;
use crate::common::{FakeConnector, free_port, gateway_command};

pub type Client = ChannelGatewayClient<tonic::transport::Channel>;

/// The lease settings every replica runs with (the design's defaults, named so the bounds the
/// tests assert follow them).
pub const LEASE: Duration = Duration::from_secs(3);
pub const RENEW_EVERY: Duration = Duration::from_millis(750);
const LEASE_ENV: &str = "3s";
const RENEW_EVERY_ENV: &str = "750ms";
const POLL_EVERY_ENV: &str = "1s";

/// One test at a time: the tests assert timings, and three gateways with PostgreSQL already fill
/// a 2-core machine. A tokio mutex: held across awaits, and a panicking test releases it without
/// poisoning it.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub struct Replica {
    pub name: char,
    pub port: u16,
    pub admin: u16,
    /// The webhook listener's port, when the cluster serves webhooks (`Replicas::webhooks`).
    pub webhook: Option<u16>,
    pub dir: PathBuf,
    pub child: Option<Child>,
    /// Lazily connected: it reconnects to the same port after a restart.
    pub client: Client,
}

pub struct Replicas {
    pub fake: FakeConnector,
    pub url: String,
    pub db: tokio_postgres::Client,
    pub replicas: Vec<Replica>,
    pub root: tempfile::TempDir,
    /// Each replica started from now on serves webhooks on a port of its own, kept across
    /// restarts (off: the listener binds port 0, as `gateway_command` has it, and nobody calls
    /// it).
    pub webhooks: bool,
    /// Environment every replica started from now on gets, after the shared settings (a key set
    /// here overrides them).
    env: Vec<(String, String)>,
    /// Ends the replicas if this process dies without dropping `Replicas` (the watchdog's exit,
    /// a SIGKILL): `sh` reading a pipe only this process writes to; at its end of file it kills
    /// the pids listed in `root/pids` and removes `root`. `Drop` disarms it.
    reaper: Option<(Child, ChildStdin)>,
}

impl Replicas {
    /// A fresh database on the shared cluster; no replica yet.
    pub async fn new(fake: &FakeConnector) -> Replicas {
        let url = tokio::task::spawn_blocking(|| PgCluster::shared().create_database())
            .await
            .unwrap();
        let db = connect_db(&url).await;
        let root = tempfile::Builder::new()
            .prefix("cg-replicas-")
            .tempdir()
            .unwrap();
        const SCRIPT: &str = r#"trap '' INT HUP
read -r word
[ "$word" = disarm ] && exit 0
[ -f "$1/pids" ] && kill -KILL $(cat "$1/pids") 2>/dev/null
rm -rf "$1"
"#;
        let mut reaper = Command::new("sh")
            .args(["-c", SCRIPT, "replicas-reaper"])
            .arg(root.path())
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = reaper.stdin.take().unwrap();
        Replicas {
            fake: fake.clone(),
            url,
            db,
            replicas: Vec::new(),
            root,
            webhooks: false,
            env: Vec::new(),
            reaper: Some((reaper, stdin)),
        }
    }

    /// Sets `key` for every replica started (or restarted) from now on; a second call with the
    /// same key replaces the value.
    pub fn set_env(&mut self, key: &str, value: impl Into<String>) {
        let value = value.into();
        match self.env.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.env.push((key.to_string(), value)),
        }
    }

    /// Lists the running replicas' pids for the reaper (replaced whole, so it never reads half).
    fn write_pids(&self) {
        let pids: Vec<String> = self
            .replicas
            .iter()
            .filter_map(|r| r.child.as_ref().map(|c| c.id().to_string()))
            .collect();
        let tmp = self.root.path().join("pids.new");
        std::fs::write(&tmp, pids.join(" ")).unwrap();
        std::fs::rename(&tmp, self.root.path().join("pids")).unwrap();
    }

    /// Starts one more replica, on ports and a data directory of its own, and waits until it
    /// is ready; returns its index.
    pub async fn start(&mut self) -> usize {
        let i = self.replicas.len();
        let name = char::from(b'A' + i as u8);
        let dir = self.root.path().join(format!("replica-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        self.replicas.push(Replica {
            name,
            port,
            admin: free_port(),
            webhook: self.webhooks.then(free_port),
            dir,
            child: None,
            client: ChannelGatewayClient::new(channel),
        });
        self.spawn(i);
        self.wait_ready(i).await;
        i
    }

    fn spawn(&mut self, i: usize) {
        let r = &self.replicas[i];
        assert!(r.child.is_none(), "replica {} is still running", r.name);
        // Appended across restarts: the tail shown on a failure covers every run.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(r.dir.join("gateway.log"))
            .unwrap();
        let mut cmd = gateway_command(&self.fake, &r.dir, r.port);
        cmd.env("CHANNEL_GATEWAY__OUTBOX__BACKEND", "postgres")
            .env("CHANNEL_GATEWAY__OUTBOX__POSTGRES__URL", &self.url)
            .env("CHANNEL_GATEWAY__OUTBOX__POSTGRES__LEASE", LEASE_ENV)
            .env(
                "CHANNEL_GATEWAY__OUTBOX__POSTGRES__RENEW_EVERY",
                RENEW_EVERY_ENV,
            )
            .env(
                "CHANNEL_GATEWAY__OUTBOX__POSTGRES__POLL_EVERY",
                POLL_EVERY_ENV,
            )
            .env(
                "CHANNEL_GATEWAY__ADMIN__LISTEN",
                format!("127.0.0.1:{}", r.admin),
            )
            .env("RUST_LOG", "warn");
        if let Some(webhook) = r.webhook {
            cmd.env(
                "CHANNEL_GATEWAY__INBOUND__LISTEN",
                format!("127.0.0.1:{webhook}"),
            );
        }
        let child = cmd
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.replicas[i].child = Some(child);
        self.write_pids();
    }

    /// Waits for `/readyz` on the replica's admin port; panics with its log if it exits or
    /// is not ready within 30 s.
    pub async fn wait_ready(&mut self, i: usize) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let r = &mut self.replicas[i];
        let url = format!("http://127.0.0.1:{}/readyz", r.admin);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(resp) = http.get(&url).send().await
                && resp.status().is_success()
            {
                return;
            }
            if let Some(status) = r.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "replica {} exited while starting ({status}); its log:\n{}",
                    r.name,
                    log_tail(&r.dir)
                );
            }
            assert!(
                Instant::now() < deadline,
                "replica {} not ready within 30 s; its log:\n{}",
                r.name,
                log_tail(&r.dir)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, and the instant the process was reaped (it can send nothing after).
    pub fn kill(&mut self, i: usize) -> Instant {
        let mut child = self.take_child(i);
        child.kill().unwrap();
        child.wait().unwrap();
        Instant::now()
    }

    /// Starts the replica again on its ports and data directory; waits until it is ready.
    pub async fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_ready(i).await;
    }

    /// Sends `signal` (`STOP`, `CONT`, `TERM`) to the replica's process.
    pub fn signal(&self, i: usize, signal: &str) {
        let r = &self.replicas[i];
        let pid = r.child.as_ref().expect("a running replica").id();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "kill -{signal} {pid} (replica {})",
            r.name
        );
    }

    /// The process, now the caller's to wait for.
    pub fn take_child(&mut self, i: usize) -> Child {
        let child = self.replicas[i]
            .child
            .take()
            .expect("the replica is running");
        self.write_pids();
        child
    }

    pub fn client(&self, i: usize) -> Client {
        self.replicas[i].client.clone()
    }

    pub fn clients(&self) -> Vec<Client> {
        self.replicas.iter().map(|r| r.client.clone()).collect()
    }

    /// The replica's webhook listener, as a channel calls it (`http://127.0.0.1:port`).
    pub fn webhook_base(&self, i: usize) -> String {
        let r = &self.replicas[i];
        let port = r
            .webhook
            .unwrap_or_else(|| panic!("replica {} serves no webhooks", r.name));
        format!("http://127.0.0.1:{port}")
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        for r in &mut self.replicas {
            // SIGKILL also ends a stopped process.
            if let Some(mut c) = r.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            if failed {
                eprintln!(
                    "--- replica {} (port {}), the end of its log ---\n{}",
                    r.name,
                    r.port,
                    log_tail(&r.dir)
                );
            }
        }
        if let Some((mut reaper, mut stdin)) = self.reaper.take() {
            let _ = stdin.write_all(b"disarm\n");
            drop(stdin);
            let _ = reaper.wait();
        }
    }
}

/// The last lines of a replica's log, without the pauses the fake's 429s cause on purpose.
pub fn log_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("rate limited: pausing"))
        .collect();
    lines[lines.len().saturating_sub(25)..]
        .iter()
        .map(|l| l.chars().take(400).collect::<String>())
        .collect::<Vec<_>>()
        .join("\n")
}

pub async fn connect_db(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// What a check found wrong, by kind: a failure shows every kind, with a count and a few cases
/// (a run can break thousands of messages or events the same way).
#[derive(Default)]
pub struct Problems(pub BTreeMap<&'static str, Vec<String>>);

impl Problems {
    pub fn add(&mut self, kind: &'static str, case: String) {
        self.0.entry(kind).or_default().push(case);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (kind, cases) in &self.0 {
            writeln!(f, "{} {kind}, e.g.:", cases.len())?;
            for case in cases.iter().take(8) {
                writeln!(f, "    {case}")?;
            }
        }
        Ok(())
    }
}
