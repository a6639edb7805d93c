//! The PostgreSQL groundwork against a real server: the throwaway clusters of tests/pg (they start
//! quickly, side by side, and leave nothing behind, even when the test panics or its process is
//! killed), the pool's errors (no password in them, a silent server bounded by connect_timeout,
//! an outage reported as unavailable and survived), and the schema migrations (replicas starting
//! together apply each once; a newer or foreign schema is refused).

#[path = "pg/mod.rs"]
mod pg;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use channel_gateway::settings::Secret;
use channel_gateway::storage::postgres::{
    self, MIGRATIONS, Migration, PgError, PostgresConfig, SCHEMA_LOCK_KEY,
};
use pg::PgCluster;

fn config(url: &str) -> PostgresConfig {
    PostgresConfig {
        url: Secret::new(url),
        pool_size: 4,
        ..PostgresConfig::default()
    }
}

/// MIGRATIONS, then two that fail if run twice: a CREATE TABLE without IF NOT EXISTS (slow, so
/// the other replicas queue on the lock while it runs) and an INSERT of a primary key.
const THREE: &[Migration] = &[
    MIGRATIONS[0],
    Migration {
        version: 2,
        name: "table_t",
        sql: "CREATE TABLE t (id integer PRIMARY KEY, note text); SELECT pg_sleep(0.3)",
    },
    Migration {
        version: 3,
        name: "row_one",
        sql: "INSERT INTO t (id, note) VALUES (1, 'once')",
    },
];

async fn scalar_i64(url: &str, sql: &str) -> i64 {
    let pool = postgres::connect(&config(url)).await.unwrap();
    let client = postgres::get(&pool).await.unwrap();
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_replicas_migrating_at_once_apply_each_migration_once() {
    let cluster = PgCluster::shared();
    let url = cluster.create_database();
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let mut replicas = Vec::new();
    for _ in 0..8 {
        let url = url.clone();
        let barrier = barrier.clone();
        replicas.push(tokio::spawn(async move {
            // Each "replica" has its own pool, as separate processes would.
            let pool = postgres::connect(&config(&url)).await.unwrap();
            barrier.wait().await;
            postgres::migrate(&pool, THREE).await
        }));
    }
    for r in replicas {
        assert_eq!(
            r.await.unwrap().unwrap(),
            3,
            "every replica ends at version 3"
        );
    }
    assert_eq!(
        scalar_i64(&url, "SELECT count(*) FROM cg_schema_version").await,
        3
    );
    assert_eq!(scalar_i64(&url, "SELECT count(*) FROM t").await, 1);
    assert_eq!(
        scalar_i64(&url, "SELECT max(version)::int8 FROM cg_schema_version").await,
        3
    );
    // Starting again changes nothing.
    let pool = postgres::connect(&config(&url)).await.unwrap();
    assert_eq!(postgres::migrate(&pool, THREE).await.unwrap(), 3);
    assert_eq!(
        scalar_i64(&url, "SELECT count(*) FROM cg_schema_version").await,
        3
    );
    // The lock key is the one documented (operators may see it in pg_locks).
    assert_eq!(SCHEMA_LOCK_KEY.to_be_bytes(), *b"cg_schem");
}

#[tokio::test]
async fn a_database_migrated_by_a_newer_or_another_build_is_refused() {
    let cluster = PgCluster::shared();
    let url = cluster.create_database();
    let pool = postgres::connect(&config(&url)).await.unwrap();
    assert_eq!(postgres::migrate(&pool, THREE).await.unwrap(), 3);

    // An older binary, knowing only version 1.
    let e = postgres::migrate(&pool, &MIGRATIONS[..1])
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            PgError::SchemaTooNew {
                database: 3,
                binary: 1
            }
        ),
        "{e:?}"
    );
    let shown = e.to_string();
    assert!(
        shown.contains("version 3") && shown.contains("(version 1)") && shown.contains("downgrad"),
        "{shown}"
    );

    // A build whose migration 2 is another one.
    let other: &[Migration] = &[
        MIGRATIONS[0],
        Migration {
            version: 2,
            name: "something_else",
            sql: "SELECT 1",
        },
        THREE[2],
        Migration {
            version: 4,
            name: "four",
            sql: "SELECT 1",
        },
    ];
    let e = postgres::migrate(&pool, other).await.unwrap_err();
    match &e {
        PgError::SchemaMismatch {
            version,
            database,
            binary,
        } => {
            assert_eq!(*version, 2);
            assert_eq!(database, "table_t");
            assert_eq!(binary, "something_else");
        }
        other => panic!("{other:?}"),
    }
    // Neither refusal changed anything.
    assert_eq!(
        scalar_i64(&url, "SELECT count(*) FROM cg_schema_version").await,
        3
    );

    // A migration that fails is not recorded, and is applied by the next start that has it fixed.
    let url = cluster.create_database();
    let pool = postgres::connect(&config(&url)).await.unwrap();
    let broken: &[Migration] = &[
        MIGRATIONS[0],
        Migration {
            version: 2,
            name: "table_t",
            sql: "CREATE TABLE t (id integer PRIMARY KEY); SELECT no_such_function()",
        },
    ];
    let e = postgres::migrate(&pool, broken).await.unwrap_err();
    assert!(matches!(e, PgError::Migration { version: 2, .. }), "{e:?}");
    assert!(e.to_string().contains("no_such_function"), "{e}");
    assert_eq!(postgres::migrate(&pool, &THREE[..2]).await.unwrap(), 2);
}

#[tokio::test]
async fn connection_errors_name_the_server_and_never_the_password() {
    let cluster = PgCluster::shared();
    cluster.execute(
        "postgres",
        "CREATE ROLE gw_login LOGIN PASSWORD 'Correct-Horse-9'",
    );
    let port = cluster.port();

    // The right password works: the wrong one below is refused for being wrong.
    let good = format!("postgres://gw_login:Correct-Horse-9@127.0.0.1:{port}/test");
    postgres::connect(&config(&good)).await.unwrap();

    let secret = "Wr0ng-Secret-pw";
    let wrong = format!("postgres://gw_login:{secret}@127.0.0.1:{port}/test");
    let e = postgres::connect(&config(&wrong)).await.unwrap_err();
    let shown = format!("{e} / {e:?}");
    assert!(e.is_unavailable(), "{shown}");
    assert!(shown.contains("password authentication failed"), "{shown}");
    assert!(
        shown.contains(&format!("127.0.0.1:{port}/test as user gw_login")),
        "{shown}"
    );
    assert!(
        !shown.contains(secret) && !shown.contains("Correct-Horse"),
        "{shown}"
    );

    // Nothing listens: refused at once.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("postgres://gw:{secret}@127.0.0.1:{closed}/gw");
    let e = postgres::connect(&config(&url)).await.unwrap_err();
    let shown = format!("{e} / {e:?}");
    assert!(e.is_unavailable(), "{shown}");
    assert!(shown.contains(&format!("127.0.0.1:{closed}")), "{shown}");
    assert!(!shown.contains(secret), "{shown}");

    // A server that accepts the connection and never answers: bounded by connect_timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let url = format!("postgres://gw:{secret}@127.0.0.1:{silent_port}/gw");
    let mut c = config(&url);
    c.connect_timeout = Duration::from_secs(1);
    let begun = Instant::now();
    let e = postgres::connect(&c).await.unwrap_err();
    let took = begun.elapsed();
    let shown = format!("{e} / {e:?}");
    assert!(took < Duration::from_secs(4), "{took:?}: {shown}");
    assert!(shown.contains("connect_timeout"), "{shown}");
    assert!(!shown.contains(secret), "{shown}");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_unavailable_and_the_pool_recovers_with_every_commit_kept() {
    // Its own cluster: it stops the server.
    let cluster = Arc::new(tokio::task::spawn_blocking(PgCluster::start).await.unwrap());
    let pool = postgres::connect(&config(cluster.url())).await.unwrap();
    {
        let client = postgres::get(&pool).await.unwrap();
        client
            .batch_execute("CREATE TABLE kept (id int PRIMARY KEY); INSERT INTO kept VALUES (1)")
            .await
            .unwrap();
    }

    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.stop_immediate())
        .await
        .unwrap();
    // The pooled connection is dead and no new one opens: unavailable, not a query error.
    let failed = match postgres::get(&pool).await {
        Err(e) => e,
        Ok(client) => match client.query_one("SELECT 1", &[]).await {
            Err(e) => PgError::query("probing", &e),
            Ok(_) => panic!("a query succeeded while the server was down"),
        },
    };
    assert!(failed.is_unavailable(), "{failed:?}");
    assert!(
        matches!(postgres::get(&pool).await, Err(PgError::Unavailable(_))),
        "no connection opens while the server is down"
    );

    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.start_again())
        .await
        .unwrap();
    // The same pool works again, and the crash lost no committed row.
    let client = postgres::get(&pool).await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    // A value of the wrong type is the caller's bug, not an outage.
    let row = client.query_one("SELECT 1::int4", &[]).await.unwrap();
    let e = PgError::query("reading", &row.try_get::<_, String>(0).unwrap_err());
    assert!(!e.is_unavailable(), "{e:?}");
    assert_eq!(e.sqlstate(), None);

    // A statement that runs past statement_timeout is cancelled by the server: a query error.
    drop(client);
    let mut short = config(cluster.url());
    short.statement_timeout = Duration::from_millis(200);
    let pool = postgres::connect(&short).await.unwrap();
    let client = postgres::get(&pool).await.unwrap();
    let e = client
        .batch_execute("SELECT pg_sleep(5)")
        .await
        .unwrap_err();
    let e = PgError::query("sleeping", &e);
    assert_eq!(e.sqlstate(), Some("57014"), "{e:?}");
    assert!(!e.is_unavailable());
    drop(client);
    drop(pool);
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

#[test]
fn two_clusters_start_side_by_side_quickly() {
    let alone = PgCluster::start();
    eprintln!(
        "PostgreSQL test cluster on port {} started in {:?}",
        alone.port(),
        alone.started_in
    );
    assert!(
        alone.started_in < Duration::from_secs(15),
        "{:?}",
        alone.started_in
    );
    drop(alone);
    let started: Vec<PgCluster> = std::thread::scope(|s| {
        let a = s.spawn(PgCluster::start);
        let b = s.spawn(PgCluster::start);
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    let (a, b) = (&started[0], &started[1]);
    assert_ne!(a.port(), b.port());
    assert_ne!(a.data_dir(), b.data_dir());
    a.execute("test", "CREATE TABLE only_in_a (x int)");
    b.execute("test", "CREATE TABLE only_in_b (x int)");
    // Each is its own server: a's table is not in b.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let in_b = rt.block_on(scalar_i64(
        b.url(),
        "SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_a'",
    ));
    assert_eq!(in_b, 0);
    for c in &started {
        eprintln!(
            "PostgreSQL test cluster on port {} started in {:?} (two at once)",
            c.port(),
            c.started_in
        );
        // Well under 5 s on an idle machine; the bound is loose for a loaded CI box.
        assert!(c.started_in < Duration::from_secs(15), "{:?}", c.started_in);
    }
}

/// The postmaster and its children, and whether any process still runs from this data dir.
fn processes_of(pid: u32) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .unwrap();
    let mut pids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    pids.push(pid);
    pids
}

/// Alive and still a postgres process (not a zombie, not a reused pid).
fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit(')').next().unwrap_or("").trim_start();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    !stat.is_empty()
        && !state.starts_with('Z')
        && String::from_utf8_lossy(&cmdline).contains("postgres")
}

fn pgrep_data_dir(data: &str) -> String {
    let out = Command::new("pgrep")
        .args(["-a", "-f", data])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_until_gone(pids: &[u32], data: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        let found = pgrep_data_dir(data);
        if left.is_empty() && found.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still running after {within:?}: {left:?}; pgrep -f {data}: {found}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_panicking_test_leaves_no_server_and_no_directory() {
    let seen = Arc::new(Mutex::new(None));
    let s = seen.clone();
    let result = std::panic::catch_unwind(move || {
        let cluster = PgCluster::start();
        cluster.execute("test", "CREATE TABLE x (id int)");
        let pid = cluster.postmaster_pid().expect("running");
        *s.lock().unwrap() = Some((processes_of(pid), cluster.data_dir().to_path_buf()));
        panic!("the test fails while the cluster runs");
    });
    assert!(result.is_err());
    let (pids, data) = seen.lock().unwrap().take().unwrap();
    assert!(pids.len() > 1, "the postmaster had children: {pids:?}");
    // Drop ran during the unwinding: nothing is left, at once.
    wait_until_gone(&pids, &data.to_string_lossy(), Duration::from_millis(500));
    assert!(!data.exists(), "{} still exists", data.display());
    assert!(!data.parent().unwrap().exists());
}

const CHILD_ENV: &str = "CG_PG_WATCHDOG_CHILD";

/// Run by the test below in a child process that is then SIGKILLed (ignored otherwise).
#[test]
#[ignore = "a child process of a_killed_test_process_leaves_no_server_behind"]
fn watchdog_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let cluster = PgCluster::start();
    cluster.execute("test", "CREATE TABLE x (id int)");
    let pid = cluster.postmaster_pid().expect("running");
    println!("PGCLUSTER {pid} {}", cluster.data_dir().display());
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn a_killed_test_process_leaves_no_server_behind() {
    /// Kills the child if this test fails before it does, so a failure leaves nothing behind.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Killed(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "watchdog_child", "--ignored", "--nocapture"])
            .env(CHILD_ENV, "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let mut line = String::new();
    let mut reader = BufReader::new(stdout);
    let (pid, data) = loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "the child ended before its cluster ran"
        );
        if let Some(rest) = line.trim().strip_prefix("PGCLUSTER ") {
            let (pid, data) = rest.split_once(' ').unwrap();
            break (pid.parse::<u32>().unwrap(), data.to_string());
        }
    };
    // The postmaster and its children (a backend may be exiting: only the postmaster must run).
    let pids = processes_of(pid);
    assert!(alive(pid), "{pids:?}");
    child.0.kill().unwrap(); // SIGKILL: no Drop, no unwinding
    child.0.wait().unwrap();
    wait_until_gone(&pids, &data, Duration::from_secs(15));
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&data).exists() {
        assert!(Instant::now() < deadline, "{data} still exists");
        std::thread::sleep(Duration::from_millis(50));
    }
}
