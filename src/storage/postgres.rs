//! PostgreSQL, the engine several replicas share: its config section, the connection pool, the
//! versioned schema migrations, and the errors all of them give.
//!
//! Owns how the gateway connects (pool size, timeouts, keepalives, no TLS yet) and the
//! `cg_schema_version` bookkeeping table. Knows no table of the outbox or the inbox: their DDL
//! arrives as [`Migration`]s, their queries run on the [`Pool`]. Nothing here logs or returns the
//! URL's password: errors name the host, port, database and user only, and anything the server or
//! the client library says is scrubbed of the password before it is shown.
//!
//! TLS: connections use `NoTls`, and a URL that asks for TLS (`sslmode=require`,
//! `sslnegotiation=direct`) is refused by [`PostgresConfig::validate`] rather than sent in clear.
//! Adding it means a `tokio-postgres-rustls` connector (rustls on ring, as the rest of the gateway)
//! in [`pool`], where `NoTls` is passed, and dropping that refusal.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod, Runtime};
use serde::Deserialize;
use tokio_postgres::NoTls;
use tokio_postgres::config::{Host, SslMode, SslNegotiation};

use crate::settings::{ConfigError, Secret, capped, de_duration, invalid};

pub use deadpool_postgres::{Object, Pool};

/// Where [`PostgresConfig`] sits in the config file: its validation errors name
/// `outbox.postgres.url`, `outbox.postgres.pool_size`, ….
pub const SECTION: &str = "outbox.postgres";

/// Bounds of `pool_size`: one connection works (slowly); past 256 per replica the database's
/// `max_connections` is the limit long before the gateway's.
pub const POOL_SIZE_MAX: usize = 256;

/// The longest URL accepted: a real one is a few hundred bytes.
const URL_MAX_BYTES: usize = 4096;

/// How much of a server's or the client library's words an error carries.
const REASON_MAX_CHARS: usize = 300;

/// `outbox.postgres`: how to reach the database several replicas share.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE`, or libpq's `host=… user=…` form. In practice
    /// from the environment (`CHANNEL_GATEWAY__OUTBOX__POSTGRES__URL`, e.g. from a Kubernetes
    /// Secret) rather than a file; `Debug` shows `<redacted>`.
    pub url: Secret,
    /// Connections per replica.
    pub pool_size: usize,
    /// Bounds opening a connection (TCP and authentication), waiting for a free pooled one, and
    /// checking a pooled one before reuse.
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// The server cancels any one statement running longer (the session's `statement_timeout`).
    /// Schema migrations are exempt.
    #[serde(deserialize_with = "de_duration")]
    pub statement_timeout: Duration,
    /// How long a replica's partition lease holds without renewal: a dead replica's
    /// conversations resume elsewhere after about `lease + renew_every`.
    #[serde(deserialize_with = "de_duration")]
    pub lease: Duration,
    /// How often a replica renews its leases and looks at who is live.
    #[serde(deserialize_with = "de_duration")]
    pub renew_every: Duration,
    /// The slow poll of a replica's partitions for new messages, besides the wake-ups
    /// (`NOTIFY`) that normally bring them at once.
    #[serde(deserialize_with = "de_duration")]
    pub poll_every: Duration,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: Secret::default(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(10),
            lease: Duration::from_secs(3),
            renew_every: Duration::from_millis(750),
            poll_every: Duration::from_secs(1),
        }
    }
}

impl PostgresConfig {
    /// Checks every field, naming the key (`outbox.postgres.url`, …) in the error. The URL must
    /// parse and name a host and a user; the error never shows the URL or its password.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.client_config().map(|_| ())
    }

    /// The URL parsed, with this section's settings applied over it.
    pub(crate) fn client_config(&self) -> Result<tokio_postgres::Config, ConfigError> {
        self.client_config_planned(Plans::PerExecution)
    }

    fn client_config_planned(&self, plans: Plans) -> Result<tokio_postgres::Config, ConfigError> {
        let key = |field: &str| format!("{SECTION}.{field}");
        if !(1..=POOL_SIZE_MAX).contains(&self.pool_size) {
            return Err(invalid(
                &key("pool_size"),
                format!("must be 1 to {POOL_SIZE_MAX}"),
            ));
        }
        check_duration(
            &key("connect_timeout"),
            self.connect_timeout,
            Duration::from_millis(100),
            Duration::from_secs(300),
        )?;
        // 0 would be the server's "no limit": a stuck statement would hold a connection for ever.
        check_duration(
            &key("statement_timeout"),
            self.statement_timeout,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?;
        check_duration(
            &key("lease"),
            self.lease,
            Duration::from_millis(500),
            Duration::from_secs(600),
        )?;
        check_duration(
            &key("renew_every"),
            self.renew_every,
            Duration::from_millis(50),
            Duration::from_secs(300),
        )?;
        // Two renewals per lease at least: one late renewal must not lose every partition.
        if self.renew_every.saturating_mul(2) > self.lease {
            return Err(invalid(
                &key("renew_every"),
                format!(
                    "must be at most half of outbox.postgres.lease ({:?})",
                    self.lease
                ),
            ));
        }
        check_duration(
            &key("poll_every"),
            self.poll_every,
            Duration::from_millis(50),
            Duration::from_secs(600),
        )?;
        let url = self.url.expose().trim();
        let url_key = key("url");
        if url.is_empty() {
            return Err(invalid(
                &url_key,
                "is empty: set postgres://USER:PASSWORD@HOST:PORT/DATABASE \
                 (from the environment: CHANNEL_GATEWAY__OUTBOX__POSTGRES__URL)",
            ));
        }
        if url.len() > URL_MAX_BYTES {
            return Err(invalid(
                &url_key,
                format!("is longer than {URL_MAX_BYTES} bytes"),
            ));
        }
        let mut pg = tokio_postgres::Config::from_str(url)
            .map_err(|e| invalid(&url_key, unparsable_reason(&e)))?;
        if pg.get_hosts().is_empty() {
            return Err(invalid(&url_key, "names no host (postgres://USER@HOST/…)"));
        }
        if pg.get_user().is_none_or(str::is_empty) {
            return Err(invalid(&url_key, "names no user (postgres://USER@HOST/…)"));
        }
        if pg.get_ssl_mode() == SslMode::Require
            || pg.get_ssl_negotiation() == SslNegotiation::Direct
        {
            return Err(invalid(
                &url_key,
                "asks for TLS (sslmode=require or sslnegotiation=direct), which the gateway \
                 does not support yet: reach the database over a trusted network or a TLS tunnel",
            ));
        }
        pg.connect_timeout(self.connect_timeout);
        // A server's statement_timeout for the session, after any `options` the URL has. And
        // plans made for each execution: a statement prepared while the outbox's tables were
        // empty (a new database) would keep a plan that scans them whole once they hold
        // 100,000 rows (a fresh database's first run delivered 2.4k msg/s instead of 11k).
        let planned = match plans {
            Plans::PerExecution => "-c plan_cache_mode=force_custom_plan".to_string(),
            Plans::Once => PLANNED_ONCE
                .iter()
                .map(|(k, v)| format!("-c {k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
        };
        let statement_timeout = format!(
            "-c statement_timeout={} {planned}",
            self.statement_timeout.as_millis(),
        );
        let options = match pg.get_options() {
            Some(o) if !o.trim().is_empty() => format!("{o} {statement_timeout}"),
            _ => statement_timeout,
        };
        pg.options(options);
        if pg.get_application_name().is_none() {
            // What `pg_stat_activity` shows an operator for these sessions.
            pg.application_name("channel-gateway");
        }
        // A server that vanishes (a failover, a partition) without closing the connection is
        // noticed in ~25 s rather than the kernel's ~2 h, even while a query waits for its answer;
        // tcp_user_timeout bounds data the server never acknowledges.
        pg.keepalives(true);
        pg.keepalives_idle(Duration::from_secs(10));
        pg.keepalives_interval(Duration::from_secs(5));
        pg.keepalives_retries(3);
        pg.tcp_user_timeout(
            self.connect_timeout
                .saturating_add(self.statement_timeout)
                .min(Duration::from_secs(600)),
        );
        Ok(pg)
    }

    /// What an error may say about where it tried: hosts, ports, database and user; never the
    /// password. `None` when the URL does not parse.
    pub fn target(&self) -> Option<String> {
        tokio_postgres::Config::from_str(self.url.expose().trim())
            .ok()
            .map(|pg| describe_target(&pg))
    }

    /// `text` with the URL and its password (as spelled and decoded) replaced by `<redacted>`:
    /// for any error a store built on this config shows or logs.
    pub fn scrub(&self, text: String) -> String {
        crate::channels::shared::scrub_secrets(text, self.secrets().iter().map(String::as_str))
    }

    /// What errors must not show: the password as the URL spells it and decoded, and the URL.
    fn secrets(&self) -> Vec<String> {
        let url = self.url.expose().trim();
        let mut secrets = vec![url.to_string()];
        if let Ok(pg) = tokio_postgres::Config::from_str(url)
            && let Some(p) = pg.get_password()
        {
            secrets.push(String::from_utf8_lossy(p).into_owned());
        }
        if let Some(raw) = raw_url_password(url) {
            secrets.push(raw.to_string());
        }
        secrets.retain(|s| !s.is_empty());
        // Longest first, so a password inside the URL goes with the URL rather than leaving the rest.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets
    }
}

fn check_duration(key: &str, d: Duration, min: Duration, max: Duration) -> Result<(), ConfigError> {
    if d < min || d > max {
        return Err(invalid(
            key,
            format!("must be {min:?} to {max:?} (e.g. `5s`)"),
        ));
    }
    Ok(())
}

/// Why the URL did not parse, without echoing any of it: the client library's reasons may quote
/// an unknown option's name or the character it stopped at, which could be part of the password.
fn unparsable_reason(e: &tokio_postgres::Error) -> String {
    let detail = std::error::Error::source(e)
        .map(|s| s.to_string())
        .unwrap_or_default();
    // These name only the library's own fixed option names.
    let safe = detail.starts_with("invalid value for option `")
        || detail == "unexpected EOF"
        || detail == "unterminated parameter";
    let mut reason = String::from(
        "is not a PostgreSQL URL (postgres://USER:PASSWORD@HOST:PORT/DATABASE) \
         nor a key=value connection string",
    );
    if safe {
        reason.push_str(": ");
        reason.push_str(&capped(&detail, 80));
    } else if detail.starts_with("unknown option") {
        reason.push_str(": it has an unknown option (its name is not shown: it may be a secret)");
    }
    reason
}

/// The password as written between `:` and `@` in a URL (percent-encoded), when there is one.
fn raw_url_password(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    userinfo.split_once(':').map(|(_, p)| p)
}

/// `host:port,…/database as user`: where a connection went, for errors and logs.
fn describe_target(pg: &tokio_postgres::Config) -> String {
    let ports = pg.get_ports();
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let port = ports
                .get(i)
                .or_else(|| ports.first())
                .copied()
                .unwrap_or(5432);
            match h {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect();
    let user = pg.get_user().unwrap_or("");
    let db = pg.get_dbname().unwrap_or(user);
    capped(&format!("{}/{db} as user {user}", hosts.join(",")), 200)
}

/// Errors of the PostgreSQL engine. None carries the URL or its password.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database could not be reached, refused the connection, or the connection broke: the
    /// gateway is not ready, and a retry later may work.
    #[error("PostgreSQL unavailable: {0}")]
    Unavailable(String),
    /// A statement failed for another reason (a constraint, a bug, a cancelled statement).
    #[error("PostgreSQL, {context}: {reason}")]
    Query {
        context: &'static str,
        /// SQLSTATE when the server answered, e.g. `23505` for a unique violation.
        code: Option<String>,
        reason: String,
    },
    #[error(
        "the database's schema is at version {database}, newer than this build of \
         channel-gateway knows (version {binary}): a newer gateway migrated it. Run that version \
         or a newer one; downgrading the schema is not supported"
    )]
    SchemaTooNew { database: u32, binary: u32 },
    #[error(
        "the database's schema migration {version} is `{database}` but this build's is \
         `{binary}`: another build of the gateway migrated this database"
    )]
    SchemaMismatch {
        version: u32,
        database: String,
        binary: String,
    },
    #[error("schema migration {version} ({name}) failed: {reason}")]
    Migration {
        version: u32,
        name: &'static str,
        reason: String,
    },
    #[error("this build's list of schema migrations is invalid: {0}")]
    BadMigrations(String),
}

impl PgError {
    /// A statement's error: [`PgError::Unavailable`] when the connection or the server is the
    /// problem (no answer, connection closed, the server shutting down or refusing connections),
    /// else [`PgError::Query`].
    pub fn query(context: &'static str, e: &tokio_postgres::Error) -> PgError {
        match e.as_db_error() {
            Some(db) => {
                let code = db.code().code();
                let reason = capped(db.message(), REASON_MAX_CHARS);
                if unavailable_sqlstate(code) {
                    PgError::Unavailable(format!("{context}: {reason} ({code})"))
                } else {
                    PgError::Query {
                        context,
                        code: Some(code.to_string()),
                        reason,
                    }
                }
            }
            None if connection_lost(e) => {
                PgError::Unavailable(format!("{context}: {}", describe(e)))
            }
            // The client's own refusals: a value of the wrong type, a parameter count.
            None => PgError::Query {
                context,
                code: None,
                reason: describe(e),
            },
        }
    }

    /// True when the database, not the request, is the problem: a caller answers UNAVAILABLE
    /// and keeps what it accepted.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, PgError::Unavailable(_))
    }

    /// The SQLSTATE the server answered with, when it did.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            PgError::Query { code, .. } => code.as_deref(),
            _ => None,
        }
    }
}

/// A client error that is about the connection, not the statement: closed, an I/O error, no
/// answer in time, or no connection at all. (The library's error kinds are private; its
/// messages for them are fixed strings.)
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if cause.is::<std::io::Error>() {
            return true;
        }
        source = cause.source();
    }
    let shown = e.to_string();
    [
        "error communicating with the server",
        "error connecting to server",
        "timeout waiting for server",
        "unexpected message from server",
        "error parsing response from server",
        "authentication error",
    ]
    .iter()
    .any(|k| shown.starts_with(k))
}

/// SQLSTATEs that say the server, not the statement, is the problem: class 08 (connection
/// exception), 53 (insufficient resources: too many connections, disk full, out of memory),
/// 57P01–57P05 (shutting down, crashed, not accepting connections yet, idle session timed out),
/// 25006 (a read-only standby after a failover).
fn unavailable_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || (code.starts_with("57P") && code != "57P04")
        || code == "25006"
}

/// A client library error with its causes, capped. Server errors give severity, message and
/// SQLSTATE; their detail and hint (which may quote row values) are left out.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return capped(
            &format!("{} {} ({})", db.severity(), db.message(), db.code().code()),
            REASON_MAX_CHARS,
        );
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    capped(&s, REASON_MAX_CHARS)
}

type DeadpoolError = deadpool_postgres::PoolError;

fn pool_error_reason(e: &DeadpoolError) -> String {
    use deadpool_postgres::TimeoutType;
    match e {
        DeadpoolError::Timeout(TimeoutType::Wait) => {
            "no pooled connection came free in time (outbox.postgres.pool_size, connect_timeout)"
                .into()
        }
        DeadpoolError::Timeout(TimeoutType::Create) => {
            "connecting took longer than outbox.postgres.connect_timeout".into()
        }
        DeadpoolError::Timeout(TimeoutType::Recycle) => {
            "checking a pooled connection took longer than outbox.postgres.connect_timeout".into()
        }
        DeadpoolError::Backend(e) => describe(e),
        DeadpoolError::Closed => "the connection pool is closed".into(),
        DeadpoolError::NoRuntimeSpecified => "the connection pool has no runtime".into(),
        DeadpoolError::PostCreateHook(_) => "a new connection's setup failed".into(),
    }
}

/// The pool, without connecting yet: connections open as they are needed. For a gateway that
/// starts (not ready) while the database is down; [`connect`] checks the database first.
pub fn pool(config: &PostgresConfig) -> Result<Pool, PgError> {
    pool_planned(config, Plans::PerExecution)
}

/// The settings of a [`Plans::Once`] session.
pub const PLANNED_ONCE: &[(&str, &str)] = &[
    ("plan_cache_mode", "force_generic_plan"),
    ("enable_seqscan", "off"),
    ("jit", "off"),
];

/// How a session's statements are planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plans {
    /// For each execution, with its values (every pool's default; see `client_config`).
    PerExecution,
    /// Once per prepared statement, for any values: for a connection that runs the same few
    /// statements thousands of times a second, whose every table access is by a key the
    /// statement names (`= ANY($n)`, a primary key), so the one plan fits any size of table.
    /// Planning each execution cost more than running it (`crate::outbox::postgres`). With
    /// sequential scans off: a plan made while a table holds a page or two would scan it (the
    /// cheapest way then) and keep doing so as it grows to millions of rows, until the next
    /// ANALYZE; with them off, the planner takes the index the statement's key offers. And
    /// without JIT compilation: a scan left with no other way (the 256 rows of
    /// `cg_partitions`) is costed as disabled, which made every execution compile its
    /// expressions first (150 ms).
    Once,
}

/// [`pool`] whose sessions plan as `plans` says.
pub fn pool_planned(config: &PostgresConfig, plans: Plans) -> Result<Pool, PgError> {
    let pg = config.client_config_planned(plans)?;
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            // A connection whose server went away is closed by its task and is not reused; one
            // that broke unnoticed fails its next statement, which the caller retries.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let timeout = Some(config.connect_timeout);
    Pool::builder(manager)
        .max_size(config.pool_size)
        .runtime(Runtime::Tokio1)
        .create_timeout(timeout)
        .wait_timeout(timeout)
        .recycle_timeout(timeout)
        .build()
        .map_err(|e| PgError::Unavailable(format!("cannot build the connection pool: {e}")))
}

/// The pool, after one connection opened and authenticated: a wrong URL, password or database
/// is an error at start rather than at the first message. The error names host, port, database
/// and user, never the password.
pub async fn connect(config: &PostgresConfig) -> Result<Pool, PgError> {
    let pool = pool(config)?;
    match pool.get().await {
        Ok(client) => {
            drop(client);
            Ok(pool)
        }
        Err(e) => {
            let target = config.target().unwrap_or_default();
            let reason = crate::channels::shared::scrub_secrets(
                pool_error_reason(&e),
                config.secrets().iter().map(String::as_str),
            );
            Err(PgError::Unavailable(format!(
                "cannot connect to {target}: {reason}"
            )))
        }
    }
}

/// A pooled connection, or [`PgError::Unavailable`].
pub async fn get(pool: &Pool) -> Result<Object, PgError> {
    pool.get()
        .await
        .map_err(|e| PgError::Unavailable(pool_error_reason(&e)))
}

/// One step of the schema: applied once per database, in version order, in its own transaction.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// 1, 2, 3, …: each build's list starts at 1 and has no gaps.
    pub version: u32,
    /// Recorded with the version; a database whose migration N has another name than this
    /// build's N was migrated by another build, and is refused.
    pub name: &'static str,
    /// One or more statements (simple query protocol: no parameters).
    pub sql: &'static str,
}

/// The gateway's schema. The stores' tables are added here as migrations 2, 3, …; a released
/// migration is never edited, only followed by a new one.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "schema_version",
        sql: "COMMENT ON TABLE cg_schema_version IS \
              'channel-gateway''s applied schema migrations; written by the gateway at start'",
    },
    Migration {
        version: 2,
        name: "outbox",
        sql: OUTBOX_SCHEMA,
    },
    Migration {
        version: 3,
        name: "partition_leases",
        sql: super::lease::MIGRATION_SQL,
    },
    Migration {
        version: 4,
        name: "rate_scopes",
        sql: super::rate::MIGRATION_SQL,
    },
    Migration {
        version: 5,
        name: "shared_delivery",
        sql: SHARED_DELIVERY,
    },
    Migration {
        version: 6,
        name: "shared_inbox",
        sql: crate::inbound::pg::MIGRATION_SQL,
    },
    Migration {
        version: 7,
        name: "outbox_one_unfinished_index",
        sql: ONE_UNFINISHED_INDEX,
    },
];

/// `outbox_unfinished` (unfinished messages by id) duplicated `outbox_feed` (the same rows by
/// `seq`): every append and every mark inserted an entry in both. The feed's index serves the
/// readers of unfinished messages alone (the start's read sorts what it reads by id).
const ONE_UNFINISHED_INDEX: &str = "DROP INDEX IF EXISTS outbox_unfinished;";

/// What several replicas need to share one outbox (`crate::outbox::PostgresStore`):
/// - `seq`: every appended (or redelivered) message's position: its transaction's id, then its
///   place in it. A reader takes as read everything below the oldest transaction still running
///   in its snapshot (`pg_snapshot_xmin`): those have all ended, and none can start below it, so
///   a partition's owner that reads what is new after its cursor never skips a message committed
///   late (`crate::outbox::PostgresStore::feed_after`).
/// - `epoch`: the fencing epoch of the last fenced state write (NULL when none), for audits.
/// - `cg_outbox_id_block`: each replica start takes a block of 2^40 message ids, so ids are
///   unique across replicas without a round trip per message. The first block is past every
///   id already given out.
const SHARED_DELIVERY: &str = "
ALTER TABLE outbox_messages ADD COLUMN seq BIGINT;
ALTER TABLE outbox_messages ADD COLUMN epoch BIGINT;
CREATE INDEX outbox_feed ON outbox_messages (seq)
    WHERE state IN ('accepted', 'delivering');
CREATE SEQUENCE cg_outbox_id_block;
SELECT setval('cg_outbox_id_block', GREATEST(
    COALESCE((SELECT max(id) FROM outbox_messages), 0),
    COALESCE((SELECT value FROM outbox_meta WHERE name = 'next_id'), 0)) / 1099511627776 + 1,
    false);
";

/// The outbox's tables (`crate::outbox::PostgresStore`): the same tables, columns, words and
/// partial indexes as the SQLite file's, so both engines share their SQL and an operator reads
/// both alike (but for `outbox_unfinished`, dropped by migration 7). `partition` is the
/// conversation's hash mod 256 (computed by the gateway): the unit replicas lease
/// (`super::lease`).
const OUTBOX_SCHEMA: &str = "
CREATE TABLE outbox_messages (
    id BIGINT PRIMARY KEY,
    conversation TEXT NOT NULL,
    partition SMALLINT NOT NULL,
    state TEXT NOT NULL
        CHECK (state IN ('accepted', 'delivering', 'delivered', 'failed', 'expired')),
    attempts INTEGER NOT NULL,
    possible_duplicate BOOLEAN NOT NULL,
    receipts TEXT,
    error TEXT,
    accepted_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
CREATE TABLE outbox_bodies (
    id BIGINT PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE INDEX outbox_unfinished ON outbox_messages (id)
    WHERE state IN ('accepted', 'delivering');
CREATE INDEX outbox_failed ON outbox_messages (id)
    WHERE state IN ('failed', 'expired');
CREATE INDEX outbox_delivered_at ON outbox_messages (updated_at_ms)
    WHERE state = 'delivered';
CREATE TABLE outbox_idempotency (
    key TEXT PRIMARY KEY,
    created_at_ms BIGINT NOT NULL,
    message_ids TEXT NOT NULL
);
CREATE INDEX outbox_idempotency_created ON outbox_idempotency (created_at_ms);
CREATE TABLE outbox_meta (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
COMMENT ON TABLE outbox_messages IS
    'channel-gateway: accepted messages and their delivery state (bodies in outbox_bodies)';
";

/// The `pg_advisory_xact_lock` key every replica's migration transaction takes ("cg_schem" in
/// ASCII), so replicas starting together apply each migration once, one after another.
pub const SCHEMA_LOCK_KEY: i64 = 0x6367_5f73_6368_656d;

/// Applies the migrations the database lacks and returns the schema version it is then at.
///
/// Each pending migration runs in its own transaction that first takes
/// [`SCHEMA_LOCK_KEY`] and re-reads `cg_schema_version`, so replicas starting at once wait for
/// each other and each migration is applied exactly once. Refuses a database at a newer version
/// than `migrations` knows (a downgrade) and one whose applied migrations are not this list's
/// first ones. Migrations run without the pool's statement timeout: bound the whole call if
/// start-up must be bounded.
pub async fn migrate(pool: &Pool, migrations: &[Migration]) -> Result<u32, PgError> {
    check_list(migrations)?;
    let binary = migrations.last().map_or(0, |m| m.version);
    let mut client = get(pool).await?;
    loop {
        let tx = client
            .transaction()
            .await
            .map_err(|e| PgError::query("beginning a migration", &e))?;
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = 0; \
             SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY}); \
             CREATE TABLE IF NOT EXISTS cg_schema_version (\
                 version integer PRIMARY KEY, \
                 name text NOT NULL, \
                 applied_at timestamptz NOT NULL DEFAULT now())"
        ))
        .await
        .map_err(|e| PgError::query("locking the schema", &e))?;
        let rows = tx
            .query(
                "SELECT version, name FROM cg_schema_version ORDER BY version",
                &[],
            )
            .await
            .map_err(|e| PgError::query("reading the schema version", &e))?;
        let mut applied = Vec::with_capacity(rows.len());
        for row in &rows {
            let version: i32 = row
                .try_get(0)
                .map_err(|e| PgError::query("reading the schema version", &e))?;
            let name: String = row
                .try_get(1)
                .map_err(|e| PgError::query("reading the schema version", &e))?;
            applied.push((u32::try_from(version).unwrap_or(0), name));
        }
        let current = applied.last().map_or(0, |(v, _)| *v);
        if current > binary {
            return Err(PgError::SchemaTooNew {
                database: current,
                binary,
            });
        }
        for (i, (version, name)) in applied.iter().enumerate() {
            match migrations.get(i) {
                Some(m) if m.version == *version && m.name == name => {}
                other => {
                    return Err(PgError::SchemaMismatch {
                        version: *version,
                        database: capped(name, 64),
                        binary: other.map_or("(none)", |m| m.name).to_string(),
                    });
                }
            }
        }
        let Some(next) = migrations.get(applied.len()) else {
            tx.commit()
                .await
                .map_err(|e| PgError::query("ending the schema check", &e))?;
            return Ok(current);
        };
        let failed = |e: tokio_postgres::Error| PgError::Migration {
            version: next.version,
            name: next.name,
            reason: describe(&e),
        };
        tx.batch_execute(next.sql).await.map_err(failed)?;
        // check_list bounds versions to i32.
        let version = i32::try_from(next.version).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO cg_schema_version (version, name) VALUES ($1, $2)",
            &[&version, &next.name],
        )
        .await
        .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        tracing::info!(
            version = next.version,
            name = next.name,
            "applied a PostgreSQL schema migration"
        );
    }
}

/// A build's list: versions 1, 2, 3, … without gaps, each with a short name.
fn check_list(migrations: &[Migration]) -> Result<(), PgError> {
    for (i, m) in migrations.iter().enumerate() {
        let expected = u32::try_from(i + 1).unwrap_or(u32::MAX);
        if m.version != expected || i32::try_from(m.version).is_err() {
            return Err(PgError::BadMigrations(format!(
                "migration #{} has version {}, expected {expected}",
                i + 1,
                m.version
            )));
        }
        if m.name.is_empty() || m.name.len() > 63 {
            return Err(PgError::BadMigrations(format!(
                "migration {} needs a name of 1 to 63 bytes",
                m.version
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_url(url: &str) -> PostgresConfig {
        PostgresConfig {
            url: Secret::new(url),
            ..PostgresConfig::default()
        }
    }

    fn key_of(e: ConfigError) -> (String, String) {
        match e {
            ConfigError::Invalid { key, reason } => (key, reason),
            other => panic!("not a key error: {other}"),
        }
    }

    #[test]
    fn defaults_and_deny_unknown_fields() {
        let c: PostgresConfig = toml::from_str("url = \"postgres://u:p@h/db\"").unwrap();
        assert_eq!(c.pool_size, 16);
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.statement_timeout, Duration::from_secs(10));
        c.validate().unwrap();
        let c: PostgresConfig = toml::from_str(
            "url = \"postgres://u@h/db\"\npool_size = 3\nconnect_timeout = \"2s\"\n\
             statement_timeout = \"1500ms\"",
        )
        .unwrap();
        assert_eq!(c.pool_size, 3);
        assert_eq!(c.statement_timeout, Duration::from_millis(1500));
        let e = toml::from_str::<PostgresConfig>("url = \"postgres://u@h/db\"\npool = 3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `pool`"), "{e}");
        // A unitless duration is refused, as everywhere in the config.
        assert!(toml::from_str::<PostgresConfig>("statement_timeout = 10").is_err());
    }

    #[test]
    fn debug_never_shows_the_password() {
        let c = with_url("postgres://gw:hunter2-secret@db.internal:5432/gateway");
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        assert_eq!(
            c.target().unwrap(),
            "db.internal:5432/gateway as user gw",
            "the target names where, never the password"
        );
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = with_url("postgres://u@h/db");
        c.pool_size = 0;
        assert_eq!(
            key_of(c.validate().unwrap_err()).0,
            "outbox.postgres.pool_size"
        );
        c.pool_size = POOL_SIZE_MAX + 1;
        assert_eq!(
            key_of(c.validate().unwrap_err()).0,
            "outbox.postgres.pool_size"
        );
        c.pool_size = POOL_SIZE_MAX;
        c.validate().unwrap();
        c.connect_timeout = Duration::ZERO;
        assert_eq!(
            key_of(c.validate().unwrap_err()).0,
            "outbox.postgres.connect_timeout"
        );
        c.connect_timeout = Duration::from_secs(1);
        c.statement_timeout = Duration::ZERO;
        assert_eq!(
            key_of(c.validate().unwrap_err()).0,
            "outbox.postgres.statement_timeout"
        );
        let (key, reason) = key_of(PostgresConfig::default().validate().unwrap_err());
        assert_eq!(key, "outbox.postgres.url");
        assert!(
            reason.contains("CHANNEL_GATEWAY__OUTBOX__POSTGRES__URL"),
            "{reason}"
        );
    }

    #[test]
    fn a_bad_url_is_refused_without_echoing_it() {
        let secret = "s3cr3t-Pw";
        for url in [
            format!("mysql://u:{secret}@h/db"),
            format!("postgres://u:{secret}@h:notaport/db"),
            format!("postgres://u:{secret}@h/db?{secret}=1"),
            format!("host=h user=u password={secret} {secret}=x"),
            format!("host=h user=u password='{secret}"),
            format!("postgres://u:{secret}@/db"),
            format!("postgres://:{secret}@h/db"),
            format!("postgres://u:{secret}@h/db?sslmode=require"),
            format!("postgres://u:{secret}@h/db?sslnegotiation=direct&sslmode=require"),
            "x".repeat(URL_MAX_BYTES + 1) + secret,
        ] {
            let e = with_url(&url).validate().unwrap_err();
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains(secret), "{url}: {shown}");
            assert!(!shown.contains("s3cr3t"), "{url}: {shown}");
            assert_eq!(key_of(e).0, "outbox.postgres.url", "{url}");
        }
        let (_, reason) = key_of(
            with_url("postgres://u@h/db?sslmode=require")
                .validate()
                .unwrap_err(),
        );
        assert!(reason.contains("TLS"), "{reason}");
        let (_, reason) = key_of(with_url("postgres://u@h:x/db").validate().unwrap_err());
        assert!(
            reason.contains("invalid value for option `port`"),
            "{reason}"
        );
    }

    #[test]
    fn settings_are_applied_over_the_url() {
        let mut c = with_url("postgres://u@h/db?options=-c%20search_path%3Dgw");
        c.statement_timeout = Duration::from_millis(2500);
        let pg = c.client_config().unwrap();
        assert_eq!(
            pg.get_options(),
            Some(
                "-c search_path=gw -c statement_timeout=2500 -c plan_cache_mode=force_custom_plan"
            )
        );
        assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_secs(5)));
        assert_eq!(pg.get_application_name(), Some("channel-gateway"));
        let pg = with_url("postgres://u@h/db?application_name=mine")
            .client_config()
            .unwrap();
        assert_eq!(pg.get_application_name(), Some("mine"));
    }

    #[test]
    fn secrets_cover_the_encoded_and_decoded_password() {
        let c = with_url("postgres://u:p%40ss%3Aword@h/db");
        let s = c.secrets();
        assert!(s.iter().any(|x| x == "p@ss:word"), "{s:?}");
        assert!(s.iter().any(|x| x == "p%40ss%3Aword"), "{s:?}");
        assert_eq!(raw_url_password("postgres://u@h/db"), None);
        assert_eq!(raw_url_password("host=h"), None);
    }

    #[test]
    fn the_migration_list_is_checked() {
        check_list(MIGRATIONS).unwrap();
        check_list(&[]).unwrap();
        let m = |version, name| Migration {
            version,
            name,
            sql: "",
        };
        assert!(check_list(&[m(2, "a")]).is_err());
        assert!(check_list(&[m(1, "a"), m(3, "b")]).is_err());
        assert!(check_list(&[m(1, "a"), m(1, "b")]).is_err());
        assert!(check_list(&[m(1, "")]).is_err());
    }

    #[test]
    fn sqlstates_that_mean_the_server_is_the_problem() {
        for code in ["08006", "08001", "57P01", "57P03", "53300", "25006"] {
            assert!(unavailable_sqlstate(code), "{code}");
        }
        for code in ["23505", "57014", "42P01", "40001", "57P04"] {
            assert!(!unavailable_sqlstate(code), "{code}");
        }
    }
}
