//! A throwaway PostgreSQL cluster for the tests: `initdb` into a fresh temp dir, a free port on
//! 127.0.0.1, trust authentication for the superuser on 127.0.0.1 only, the unix socket inside
//! the temp dir. It never touches a system cluster (no default port, socket, data directory or
//! service), and leaves no server behind: `Drop` stops it (`pg_ctl stop -m immediate`) and
//! removes the directory, also when the test panicked; if the test process dies without
//! unwinding (SIGKILL, a shared cluster in a `static`), a watchdog shell whose stdin is a pipe
//! from this process sees the pipe close and does the same.
//!
//! Include it with `#[path = "pg/mod.rs"] mod pg;`. The server's binaries are found as
//! `scripts/test.sh` finds them (which installs them when missing): `$CHANNEL_GATEWAY_TEST_PG_BIN`,
//! the directory `initdb` on PATH really lives in, then the highest `/usr/lib/postgresql/*/bin`.
//! As root (CI), initdb refuses to run, so the server runs as `postgres` (or `nobody`) through
//! `runuser` or `setpriv` (util-linux, on every Debian).
//!
//! Every method blocks (a start takes well under a second); from async code, call them in
//! `tokio::task::spawn_blocking` if the runtime's other tasks must keep running meanwhile.
#![allow(dead_code)]

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The superuser `initdb` creates, trusted from 127.0.0.1 without a password.
pub const SUPERUSER: &str = "postgres";

/// How long `pg_ctl` may wait for a start or a stop.
const WAIT_SECS: &str = "30";

/// A running (or deliberately stopped) throwaway cluster.
pub struct PgCluster {
    /// The temp dir: data directory, socket, server log. Taken (and removed) by `Drop`.
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    data: PathBuf,
    log: PathBuf,
    bin: PathBuf,
    /// When the test runs as root: the unprivileged user and the argv that runs a program as it.
    run_as: Option<RunAs>,
    port: u16,
    /// The first database's URL (`test`).
    url: String,
    databases: AtomicU32,
    /// Cleans up if this process dies before `Drop` (see the module doc).
    watchdog: Option<(Child, ChildStdin)>,
    /// How long `start()` took, for the tests that report it.
    pub started_in: Duration,
}

#[derive(Clone)]
struct RunAs {
    user: String,
    uid: u32,
    gid: u32,
    /// `runuser -u USER --` or `setpriv --reuid=UID --regid=GID --init-groups --`.
    prefix: Vec<OsString>,
}

impl PgCluster {
    /// Starts a fresh cluster with one database, `test` (see [`PgCluster::url`]). Panics with
    /// the reason (and the server log's tail) when it cannot.
    pub fn start() -> PgCluster {
        PgCluster::start_with("")
    }

    /// [`PgCluster::start`] with more `postgresql.conf` lines, appended after the tests' own
    /// (so they override them): the benchmark sizes the server as a deployment would.
    pub fn start_with(extra_settings: &str) -> PgCluster {
        let begun = Instant::now();
        let bin = server_bin_dir();
        let run_as = run_as();
        let dir = tempfile::Builder::new()
            .prefix("cg-pg-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for PostgreSQL: {e}"));
        let root = dir.path().to_path_buf();
        if let Some(r) = &run_as {
            std::os::unix::fs::chown(&root, Some(r.uid), Some(r.gid))
                .unwrap_or_else(|e| panic!("cannot chown {} to {}: {e}", root.display(), r.user));
        }
        let mut cluster = PgCluster {
            data: root.join("data"),
            log: root.join("server.log"),
            root,
            dir: Some(dir),
            bin,
            run_as,
            port: 0,
            url: String::new(),
            databases: AtomicU32::new(0),
            watchdog: None,
            started_in: Duration::ZERO,
        };
        // Armed before the first file is written, so even a failed initdb is cleaned up.
        cluster.watchdog = Some(cluster.spawn_watchdog());
        cluster.initdb();
        if !extra_settings.is_empty() {
            cluster.append_settings(&format!("\n# extra settings\n{extra_settings}\n"));
        }
        cluster.start_on_a_free_port();
        cluster.execute("postgres", "CREATE DATABASE test");
        cluster.url = cluster.url_for("test");
        cluster.started_in = begun.elapsed();
        cluster
    }

    /// One cluster for the whole test binary, started by the first caller. Never dropped: the
    /// watchdog stops it and removes its directory when the process exits. Give each test its
    /// own database ([`PgCluster::create_database`]); never stop a shared cluster.
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(PgCluster::start)
    }

    /// `postgres://postgres@127.0.0.1:PORT/test`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL of database `db` on this cluster, as the superuser.
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// A fresh, empty database (`db_1`, `db_2`, …) and its URL: one per test on a shared cluster.
    pub fn create_database(&self) -> String {
        let n = self.databases.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("db_{n}");
        self.execute("postgres", &format!("CREATE DATABASE {name}"));
        self.url_for(&name)
    }

    /// Runs `sql` (one or more statements) as the superuser in database `db`; panics on error.
    pub fn execute(&self, db: &str, sql: &str) {
        if let Err(e) = run_sql(self.url_for(db), sql.to_string()) {
            panic!(
                "PostgreSQL test cluster: `{sql}` in {db} failed: {e}\n{}",
                self.log_tail()
            );
        }
    }

    /// The postmaster's pid while the server runs (from `postmaster.pid`).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        let pid: u32 = text.lines().next()?.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// The database goes away as in a clean failover: `pg_ctl stop -m fast` (sessions are
    /// ended, the server checkpoints and exits).
    pub fn stop(&self) {
        self.pg_ctl_stop("fast");
    }

    /// The database crashes: `pg_ctl stop -m immediate` (no checkpoint; the next start recovers
    /// from the WAL, so every committed transaction is still there).
    pub fn stop_immediate(&self) {
        self.pg_ctl_stop("immediate");
    }

    /// Starts the stopped server again on the same port and data directory, so the URLs handed
    /// out stay valid. Panics if the port was taken meanwhile.
    pub fn start_again(&self) {
        if let Err(log) = self.pg_ctl_start(self.port) {
            panic!(
                "PostgreSQL test cluster: cannot start again on port {}:\n{log}",
                self.port
            );
        }
    }

    /// The last lines of the server's log, for a failure's message.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        format!("--- server log ({}) ---\n{tail}", self.log.display())
    }

    fn program(&self, name: &str) -> Command {
        let exe = self.bin.join(name);
        let mut c = match &self.run_as {
            None => Command::new(exe),
            Some(r) => {
                let mut c = Command::new(&r.prefix[0]);
                c.args(&r.prefix[1..]).arg(exe);
                c
            }
        };
        // The server user may not be allowed into the test's working directory.
        c.current_dir(&self.root).stdin(Stdio::null());
        c
    }

    fn initdb(&self) {
        let out = self
            .program("initdb")
            .arg("-D")
            .arg(&self.data)
            .args([
                "--username",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                // No `--no-sync`: it saves ~0.2 s here, but the first start after a crash
                // (`stop_immediate`) then fsyncs every file initdb left unsynced, ~3.5 s.
                "--no-instructions",
            ])
            .output()
            .unwrap_or_else(|e| panic!("cannot run initdb: {e}"));
        if !out.status.success() {
            panic!(
                "PostgreSQL test cluster: initdb failed ({}){}:\n{}",
                out.status,
                self.run_as_hint(),
                output_text(&out)
            );
        }
        // The superuser is trusted from 127.0.0.1 and the cluster's own socket; every other role
        // must give its password (the tests of a wrong password need one that is checked).
        let hba = format!(
            "local all {SUPERUSER} trust\n\
             host all {SUPERUSER} 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n"
        );
        std::fs::write(self.data.join("pg_hba.conf"), hba)
            .unwrap_or_else(|e| panic!("cannot write pg_hba.conf: {e}"));
        let settings = format!(
            "\n# tests/pg/mod.rs\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             fsync = on\n\
             synchronous_commit = on\n\
             full_page_writes = on\n\
             shared_buffers = 16MB\n\
             max_connections = 200\n\
             logging_collector = off\n",
            self.root.display()
        );
        self.append_settings(&settings);
    }

    fn append_settings(&self, settings: &str) {
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .unwrap_or_else(|e| panic!("cannot open postgresql.conf: {e}"));
        conf.write_all(settings.as_bytes())
            .unwrap_or_else(|e| panic!("cannot write postgresql.conf: {e}"));
    }

    /// Another process may take the port between `free_port` and the server's bind: then a
    /// fresh port, a few times.
    fn start_on_a_free_port(&mut self) {
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            match self.pg_ctl_start(port) {
                Ok(()) => {
                    self.port = port;
                    return;
                }
                Err(log) if log.contains("Address already in use") => last = log,
                Err(log) => panic!(
                    "PostgreSQL test cluster: the server did not start{}:\n{log}",
                    self.run_as_hint()
                ),
            }
        }
        panic!("PostgreSQL test cluster: no free port after 5 tries:\n{last}");
    }

    /// `pg_ctl start -w`: returns when the server accepts connections, or with the log lines
    /// this start wrote.
    fn pg_ctl_start(&self, port: u16) -> Result<(), String> {
        let before = std::fs::metadata(&self.log).map_or(0, |m| m.len());
        let out = self
            .program("pg_ctl")
            .args(["start", "-w", "-s", "-t", WAIT_SECS, "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .arg("-o")
            .arg(format!("-p {port}"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run pg_ctl: {e}"));
        if out.status.success() {
            return Ok(());
        }
        let log = std::fs::read(&self.log).unwrap_or_default();
        let this_start = String::from_utf8_lossy(log.get(before as usize..).unwrap_or(&[]));
        Err(format!(
            "pg_ctl start ({}): {}\n--- server log ---\n{this_start}",
            out.status,
            output_text(&out)
        ))
    }

    fn pg_ctl_stop(&self, mode: &str) {
        let out = self
            .program("pg_ctl")
            .args(["stop", "-w", "-s", "-t", WAIT_SECS, "-m", mode, "-D"])
            .arg(&self.data)
            .output()
            .unwrap_or_else(|e| panic!("cannot run pg_ctl: {e}"));
        if !out.status.success() {
            panic!(
                "PostgreSQL test cluster: pg_ctl stop -m {mode} failed ({}): {}\n{}",
                out.status,
                output_text(&out),
                self.log_tail()
            );
        }
    }

    /// `sh` reading one line from a pipe only this process holds the writing end of (std opens
    /// pipes close-on-exec, so no other child inherits it). `Drop` writes `disarm`; if this
    /// process dies first, the pipe closes, `read` returns nothing, and the shell stops the
    /// server and removes the directory. It ignores SIGINT and SIGHUP, which a ^C or a closed
    /// terminal sends the whole process group, so it outlives the test to clean up after it.
    fn spawn_watchdog(&self) -> (Child, ChildStdin) {
        const SCRIPT: &str = r#"trap '' INT HUP
read -r word
[ "$word" = disarm ] && exit 0
data=$1 root=$2
shift 2
"$@" stop -w -s -t 30 -m immediate -D "$data" >/dev/null 2>&1
rm -rf "$root"
"#;
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(SCRIPT)
            .arg("pg-watchdog")
            .arg(&self.data)
            .arg(&self.root);
        if let Some(r) = &self.run_as {
            c.args(&r.prefix);
        }
        c.arg(self.bin.join("pg_ctl"))
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the cluster's watchdog (sh): {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        (child, stdin)
    }

    fn run_as_hint(&self) -> String {
        match &self.run_as {
            Some(r) => format!(
                " (running as user `{}`, which must be able to reach {}: is TMPDIR inside a \
                 private directory?)",
                r.user,
                self.root.display()
            ),
            None => String::new(),
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(pid) = self.postmaster_pid() {
            let stopped = self
                .program("pg_ctl")
                .args(["stop", "-w", "-s", "-t", WAIT_SECS, "-m", "immediate", "-D"])
                .arg(&self.data)
                .status()
                .is_ok_and(|s| s.success());
            if !stopped {
                eprintln!("PostgreSQL test cluster: pg_ctl stop failed; killing postmaster {pid}");
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        if let Some(dir) = self.dir.take()
            && let Err(e) = dir.close()
        {
            eprintln!("PostgreSQL test cluster: cannot remove its directory: {e}");
        }
        if let Some((mut child, mut stdin)) = self.watchdog.take() {
            let _ = stdin.write_all(b"disarm\n");
            drop(stdin);
            let _ = child.wait();
        }
    }
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`, searched as `scripts/test.sh`
/// searches; panics naming the script when there is none.
pub fn server_bin_dir() -> PathBuf {
    static FOUND: OnceLock<PathBuf> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            if let Some(dir) = std::env::var_os("CHANNEL_GATEWAY_TEST_PG_BIN") {
                let dir = PathBuf::from(dir);
                assert!(
                    has_server(&dir),
                    "CHANNEL_GATEWAY_TEST_PG_BIN={} has no initdb, pg_ctl and postgres",
                    dir.display()
                );
                return dir;
            }
            find_server_bin_dir().unwrap_or_else(|| {
                panic!(
                    "no PostgreSQL server found (initdb, pg_ctl, postgres on PATH or in \
                     /usr/lib/postgresql/*/bin): run the tests with `bash scripts/test.sh`, which \
                     installs it from the OS packages, or set CHANNEL_GATEWAY_TEST_PG_BIN"
                )
            })
        })
        .clone()
}

fn find_server_bin_dir() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    for dir in on_path {
        let initdb = dir.join("initdb");
        if is_executable(&initdb)
            && let Ok(real) = std::fs::canonicalize(&initdb)
            && let Some(real_dir) = real.parent()
            && has_server(real_dir)
        {
            return Some(real_dir.to_path_buf());
        }
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(str::parse)
                .collect::<Result<Vec<u32>, _>>()
                .ok()?;
            let bin = e.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn has_server(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|p| is_executable(&dir.join(p)))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// As root: who runs the server, and how. `None` for any other user.
fn run_as() -> Option<RunAs> {
    static RUN_AS: OnceLock<Option<RunAs>> = OnceLock::new();
    RUN_AS
        .get_or_init(|| {
            if id(&["-u"])? != 0 {
                return None;
            }
            let user = ["postgres", "nobody"]
                .into_iter()
                .find(|u| id(&["-u", u]).is_some())
                .unwrap_or_else(|| {
                    panic!("running as root, and there is neither a `postgres` nor a `nobody` user to run PostgreSQL as")
                });
            let uid = id(&["-u", user]).unwrap_or(u32::MAX);
            let gid = id(&["-g", user]).unwrap_or(u32::MAX);
            let find = |name: &str| {
                ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                    .iter()
                    .map(|d| Path::new(d).join(name))
                    .find(|p| is_executable(p))
            };
            let prefix: Vec<OsString> = if let Some(runuser) = find("runuser") {
                vec![runuser.into(), "-u".into(), user.into(), "--".into()]
            } else if let Some(setpriv) = find("setpriv") {
                vec![
                    setpriv.into(),
                    format!("--reuid={uid}").into(),
                    format!("--regid={gid}").into(),
                    "--init-groups".into(),
                    "--".into(),
                ]
            } else {
                panic!(
                    "running as root, and neither runuser nor setpriv (util-linux) is here to run \
                     PostgreSQL as `{user}` (initdb refuses root)"
                )
            };
            Some(RunAs {
                user: user.to_string(),
                uid,
                gid,
                prefix,
            })
        })
        .clone()
}

/// `id ARGS`, parsed: a uid or gid, or `None` when `id` fails (no such user).
fn id(args: &[&str]) -> Option<u32> {
    let out = Command::new("id").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// A port nobody listens on right now (the server binds it a moment later; a collision is
/// retried by the caller).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot find a free port on 127.0.0.1: {e}"))
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs SQL on a thread of its own with its own runtime, so a blocking helper works both in a
/// plain `#[test]` and inside a tokio runtime.
fn run_sql(url: String, sql: String) -> Result<(), String> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let connected = tokio::time::timeout(
                Duration::from_secs(30),
                tokio_postgres::connect(&url, tokio_postgres::NoTls),
            )
            .await
            .map_err(|_| format!("no connection to {url} within 30 s"))?;
            let (client, connection) =
                connected.map_err(|e| format!("connecting to {url}: {e:?}"))?;
            let driver = tokio::spawn(connection);
            let result = client
                .batch_execute(&sql)
                .await
                .map_err(|e| format!("{e:?}"));
            drop(client);
            let _ = driver.await;
            result
        })
    })
    .join()
    .map_err(|_| "the SQL thread panicked".to_string())?
}

/// A pool on `url` with the gateway's whole schema migrated (`storage::postgres::MIGRATIONS`).
pub async fn migrated_pool(url: &str) -> channel_gateway::storage::postgres::Pool {
    use channel_gateway::storage::postgres;
    let pool = postgres::connect(&postgres::PostgresConfig {
        url: channel_gateway::settings::Secret::new(url),
        pool_size: 4,
        ..postgres::PostgresConfig::default()
    })
    .await
    .unwrap();
    postgres::migrate(&pool, postgres::MIGRATIONS)
        .await
        .unwrap();
    pool
}
