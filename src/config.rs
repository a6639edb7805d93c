//! One validated configuration: a TOML file, then environment overrides, then checks that name the key.
//!
//! Owns every tunable and its default. Everything runs on these defaults with no file at all.
//! Secrets are read here and handed to channel clients; they must never be logged or shown
//! (the `Debug` of a secret prints `<redacted>`).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// Environment overrides: `CHANNEL_GATEWAY__SECTION__KEY=value` sets `section.key`
/// (`__` separates levels; the value is read as TOML, or as a string when it is not TOML).
pub const ENV_PREFIX: &str = "CHANNEL_GATEWAY__";

pub use crate::settings::{ConfigError, Secret, parse_duration};
pub(crate) use crate::settings::{capped, de_duration, invalid};

// The Bot Framework section's types under their older path, which clients of the library use.
pub use crate::channels::botframework::config::{BotCredentials, BotFrameworkConfig};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub delivery: DeliveryConfig,
    pub outbox: OutboxConfig,
    pub admin: AdminConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub channels: ChannelsConfig,
    pub inbound: crate::inbound::config::InboundConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listen address.
    pub listen: String,
    /// How long shutdown waits for queued messages to drain.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
    /// Largest accepted message, in bytes of its protobuf encoding.
    pub max_message_bytes: usize,
    /// Most messages in one SendBatch or SendProactive.
    pub max_batch_len: usize,
    /// How long an idempotency key returns the first call's result.
    #[serde(deserialize_with = "de_duration")]
    pub idempotency_window: Duration,
    /// TLS for the gRPC listener (mTLS with `client_ca_file`).
    pub tls: Option<TlsConfig>,
    /// Also serve on this Unix domain socket (for sidecars).
    pub unix_socket: Option<std::path::PathBuf>,
    /// Open gRPC connections at once (TCP, TLS and Unix socket together); past it a new one is
    /// closed at once. Unset: 10,000, or half the open-file limit when that is lower.
    pub max_connections: Option<usize>,
    /// How long a new connection has to finish TLS and send the HTTP/2 preface and SETTINGS.
    #[serde(deserialize_with = "de_duration")]
    pub handshake_timeout: Duration,
    /// HTTP/2 PING interval on idle connections (0 = none); a peer that does not answer within
    /// `http2_keepalive_timeout` is disconnected.
    #[serde(deserialize_with = "de_duration")]
    pub http2_keepalive_interval: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub http2_keepalive_timeout: Duration,
    /// Open WatchDeliveries streams at once; past it RESOURCE_EXHAUSTED.
    pub max_watchers: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs.
    pub client_ca_file: Option<std::path::PathBuf>,
    /// How often the files are checked for changes (SIGHUP reloads at once).
    #[serde(default = "default_reload", deserialize_with = "de_duration")]
    pub reload_interval: Duration,
}

fn default_reload() -> Duration {
    Duration::from_secs(10)
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".into(),
            shutdown_grace: Duration::from_secs(30),
            max_message_bytes: 256 * 1024,
            max_batch_len: 100,
            idempotency_window: Duration::from_secs(24 * 3600),
            tls: None,
            unix_socket: None,
            max_connections: None,
            handshake_timeout: Duration::from_secs(10),
            http2_keepalive_interval: Duration::from_secs(60),
            http2_keepalive_timeout: Duration::from_secs(20),
            max_watchers: 64,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Channel calls in flight at once, across all conversations.
    pub max_concurrency: usize,
    /// A conversation's worker is evicted after this long without messages.
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// v3 `autoBatchDelay`: consecutive Sends to one conversation within this window go as one batch.
    #[serde(deserialize_with = "de_duration")]
    pub auto_batch_delay: Duration,
    /// Attempts per native request before the message fails.
    pub max_attempts: u32,
    /// A message still failing after this long since acceptance fails.
    #[serde(deserialize_with = "de_duration")]
    pub max_retry_age: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub base_retry_delay: Duration,
    /// Upper clamp on any wait, Retry-After included.
    #[serde(deserialize_with = "de_duration")]
    pub max_retry_delay: Duration,
    /// Retries of a POST whose outcome is unknown (timeout after sending); each may duplicate.
    pub max_ambiguous_retries: u32,
    /// Timeout of one channel HTTP call.
    #[serde(deserialize_with = "de_duration")]
    pub request_timeout: Duration,
    /// Undelivered messages one conversation may hold; past it Send is RESOURCE_EXHAUSTED.
    pub max_pending_per_conversation: usize,
    /// How long a Send to a conversation holding `max_pending_per_conversation` waits for room
    /// before it is refused; zero refuses at once.
    #[serde(deserialize_with = "de_duration")]
    pub max_wait_for_room: Duration,
    /// Undelivered messages the gateway may hold in all.
    pub max_pending_total: usize,
    /// StreamReply: a stream that sends nothing for this long is finished with what arrived,
    /// flagged (its client is gone), so its conversation's line moves on.
    #[serde(deserialize_with = "de_duration")]
    pub stream_idle_timeout: Duration,
    /// StreamReply: the growing text is shown at most this often (each showing is a channel
    /// call, within the channel's rate scopes besides).
    #[serde(deserialize_with = "de_duration")]
    pub stream_update_interval: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            max_concurrency: 512,
            idle_timeout: Duration::from_secs(30),
            auto_batch_delay: Duration::ZERO,
            max_attempts: 6,
            max_retry_age: Duration::from_secs(600),
            base_retry_delay: Duration::from_millis(200),
            max_retry_delay: Duration::from_secs(60),
            max_ambiguous_retries: 1,
            request_timeout: Duration::from_secs(30),
            max_pending_per_conversation: 10_000,
            max_wait_for_room: Duration::ZERO,
            // A pending message holds up to ~10 KB when it is alone in its conversation (its
            // worker, line and rendered request): 100k bounds that to about 1 GB.
            max_pending_total: 100_000,
            stream_idle_timeout: Duration::from_secs(30),
            stream_update_interval: Duration::from_secs(1),
        }
    }
}

/// Who may call the gateway and as which bots. Empty: no authentication, loopback only.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer tokens, stored as their SHA-256 (`channel-gateway hash-token` prints it).
    pub tokens: Vec<TokenIdentity>,
    /// mTLS client certificates, by the SHA-256 of their DER encoding.
    pub clients: Vec<CertIdentity>,
    /// Listen beyond loopback with no authentication configured (say so explicitly).
    pub allow_unauthenticated_remote: bool,
}

impl AuthConfig {
    pub fn is_configured(&self) -> bool {
        !self.tokens.is_empty() || !self.clients.is_empty()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenIdentity {
    pub name: String,
    pub sha256: String,
    /// Bot ids this caller may send as; `*` for any.
    pub bots: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertIdentity {
    pub name: String,
    pub cert_sha256: String,
    pub bots: Vec<String>,
}

/// Request limits per caller.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Calls per second per caller (0 = no limit); past it RESOURCE_EXHAUSTED.
    pub per_caller_per_second: f64,
    pub per_caller_burst: u32,
    /// Failed authentications per second per peer address (0 = no throttle), after a burst of
    /// `failed_auth_burst`; past it every call from that address is RESOURCE_EXHAUSTED, its
    /// credential unread.
    pub failed_auth_per_second: f64,
    pub failed_auth_burst: u32,
    /// Whether loopback peers are throttled too. Off by default: on loopback the callers are
    /// the machine's own processes (a sidecar's bots share 127.0.0.1), and one bot retrying a
    /// stale token would lock out every other.
    pub failed_auth_throttle_loopback: bool,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            per_caller_per_second: 0.0,
            per_caller_burst: 1000,
            failed_auth_per_second: 0.5,
            failed_auth_burst: 10,
            failed_auth_throttle_loopback: false,
        }
    }
}

/// The admin HTTP listener: `/metrics` (Prometheus), `/healthz`, `/readyz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub enabled: bool,
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:9090".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxBackend {
    /// SQLite in `data_dir` (`outbox.sqlite3`): accepted messages survive a crash.
    Sqlite,
    /// Lost on a crash or restart; for tests and throwaway deployments.
    Memory,
    /// PostgreSQL at `outbox.postgres.url` (one replica per database for now); the inbox stays
    /// in SQLite in `data_dir`.
    Postgres,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxConfig {
    pub backend: OutboxBackend,
    /// Where the durable outbox lives (`--data-dir`).
    pub data_dir: std::path::PathBuf,
    /// Delivered messages are compacted away this long after delivery; failed ones are kept.
    #[serde(deserialize_with = "de_duration")]
    pub retention: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub compact_interval: Duration,
    /// With `backend = "postgres"`: where the database is (checked only then).
    pub postgres: crate::storage::postgres::PostgresConfig,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            backend: OutboxBackend::Sqlite,
            data_dir: "channel-gateway-data".into(),
            retention: Duration::from_secs(3600),
            compact_interval: Duration::from_secs(60),
            postgres: crate::storage::postgres::PostgresConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelsConfig {
    pub botframework: crate::channels::botframework::config::BotFrameworkConfig,
    pub facebook: crate::channels::facebook::config::FacebookConfig,
    pub slack: crate::channels::slack::config::SlackConfig,
    pub telegram: crate::channels::telegram::config::TelegramConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `human` or `json`.
    pub format: String,
    /// An `EnvFilter` directive; `RUST_LOG` wins when set.
    pub level: String,
    /// OTLP/gRPC collector for trace export, e.g. `http://127.0.0.1:4317` (needs the `otlp`
    /// cargo feature).
    pub otlp_endpoint: Option<String>,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "human".into(),
            level: "info".into(),
            otlp_endpoint: None,
        }
    }
}

impl Config {
    /// Reads the file (if any), applies `CHANNEL_GATEWAY__*` overrides from `env`, validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| syntax_error(p, &text, &e))?
            }
            None => toml::Table::new(),
        };
        let mut overrides = Vec::new();
        for (k, v) in env {
            let Some(rest) = k.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            if path.iter().any(|p| p.is_empty()) {
                return Err(invalid(&k, "empty path segment in environment override"));
            }
            let (value, not_toml) = match parse_env_value(&v) {
                Ok(value) => (value, None),
                // A bare word like `127.0.0.1:50051` is not TOML; it is read as a string then.
                Err(problem) => (toml::Value::String(v), Some(problem)),
            };
            set_path(&mut table, &path, value).map_err(|r| invalid(&k, r))?;
            overrides.push(EnvOverride {
                key: path.join("."),
                var: k,
                not_toml,
            });
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| shape_error(&e, &overrides))?;
        config.validate()?;
        Ok(config)
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        socket_addr("server.listen", &self.server.listen)
    }

    pub fn admin_addr(&self) -> Result<SocketAddr, ConfigError> {
        socket_addr("admin.listen", &self.admin.listen)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let listen = self.listen_addr()?;
        self.inbound.validate()?;
        self.admin_addr()?;
        if !listen.ip().is_loopback()
            && !self.auth.is_configured()
            && !self.auth.allow_unauthenticated_remote
        {
            return Err(invalid(
                "server.listen",
                format!(
                    "{listen} is not loopback and no caller authentication is configured \
                     (set auth.tokens / auth.clients, or auth.allow_unauthenticated_remote = true)"
                ),
            ));
        }
        for (i, t) in self.auth.tokens.iter().enumerate() {
            if t.sha256.len() != 64 || !t.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(invalid(
                    &format!("auth.tokens[{i}].sha256"),
                    "must be the 64 hex digits of the token's SHA-256",
                ));
            }
            if t.bots.is_empty() {
                return Err(invalid(
                    &format!("auth.tokens[{i}].bots"),
                    "name at least one bot id, or `*`",
                ));
            }
        }
        for (i, c) in self.auth.clients.iter().enumerate() {
            let hex = c.cert_sha256.replace(':', "");
            if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(invalid(
                    &format!("auth.clients[{i}].cert_sha256"),
                    "must be the 64 hex digits of the certificate's SHA-256",
                ));
            }
            if c.bots.is_empty() {
                return Err(invalid(
                    &format!("auth.clients[{i}].bots"),
                    "name at least one bot id, or `*`",
                ));
            }
        }
        if !(self.limits.per_caller_per_second >= 0.0
            && self.limits.per_caller_per_second.is_finite())
        {
            return Err(invalid("limits.per_caller_per_second", "must be 0 or more"));
        }
        if !(self.limits.failed_auth_per_second >= 0.0
            && self.limits.failed_auth_per_second.is_finite())
        {
            return Err(invalid(
                "limits.failed_auth_per_second",
                "must be 0 or more",
            ));
        }
        if self.server.max_connections == Some(0) {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if self.server.handshake_timeout.is_zero() {
            return Err(invalid("server.handshake_timeout", "must be more than 0"));
        }
        if !self.server.http2_keepalive_interval.is_zero()
            && self.server.http2_keepalive_timeout.is_zero()
        {
            return Err(invalid(
                "server.http2_keepalive_timeout",
                "must be more than 0 while server.http2_keepalive_interval is set",
            ));
        }
        if self.server.max_watchers == 0 {
            return Err(invalid("server.max_watchers", "must be at least 1"));
        }
        let d = &self.delivery;
        if d.max_concurrency == 0 {
            return Err(invalid("delivery.max_concurrency", "must be at least 1"));
        }
        if d.max_attempts == 0 {
            return Err(invalid("delivery.max_attempts", "must be at least 1"));
        }
        if d.idle_timeout.is_zero() {
            return Err(invalid("delivery.idle_timeout", "must be more than 0"));
        }
        if d.request_timeout.is_zero() {
            return Err(invalid("delivery.request_timeout", "must be more than 0"));
        }
        if d.max_pending_per_conversation == 0 {
            return Err(invalid(
                "delivery.max_pending_per_conversation",
                "must be at least 1",
            ));
        }
        if d.max_pending_total == 0 {
            return Err(invalid("delivery.max_pending_total", "must be at least 1"));
        }
        if d.stream_idle_timeout < Duration::from_secs(1)
            || d.stream_idle_timeout > Duration::from_secs(3600)
        {
            return Err(invalid(
                "delivery.stream_idle_timeout",
                "must be between 1s and 1h",
            ));
        }
        if d.stream_update_interval < Duration::from_millis(100)
            || d.stream_update_interval > Duration::from_secs(60)
        {
            return Err(invalid(
                "delivery.stream_update_interval",
                "must be between 100ms and 60s",
            ));
        }
        if self.outbox.compact_interval.is_zero() {
            return Err(invalid("outbox.compact_interval", "must be more than 0"));
        }
        if self.outbox.data_dir.as_os_str().is_empty() {
            return Err(invalid("outbox.data_dir", "must not be empty"));
        }
        if self.outbox.backend == OutboxBackend::Postgres {
            self.outbox.postgres.validate()?;
        }
        if self.server.max_batch_len == 0 {
            return Err(invalid("server.max_batch_len", "must be at least 1"));
        }
        if self.log.otlp_endpoint.is_some() && !cfg!(feature = "otlp") {
            return Err(invalid(
                "log.otlp_endpoint",
                "this build has no OTLP export: build with `--features otlp`",
            ));
        }
        if !matches!(self.log.format.as_str(), "human" | "json") {
            return Err(invalid("log.format", "must be `human` or `json`"));
        }
        check_log_filter(&self.log.level).map_err(|reason| invalid("log.level", reason))?;
        self.channels.botframework.validate()?;
        self.channels.facebook.validate()?;
        self.channels.slack.validate()?;
        self.channels.telegram.validate()?;
        Ok(())
    }
}

/// `host:port` as a socket address: an IP address, or `localhost` (the IPv4 loopback, so the
/// no-authentication check sees loopback), or a name resolved now.
fn socket_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    use std::net::{Ipv4Addr, ToSocketAddrs};
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    let shown = capped(value, 80);
    let (host, port) = value
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .ok_or_else(|| {
            invalid(
                key,
                format!("`{shown}` is not host:port (e.g. 127.0.0.1:50051 or localhost:50051)"),
            )
        })?;
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    (host, port)
        .to_socket_addrs()
        .map_err(|e| invalid(key, format!("cannot resolve `{shown}`: {e}")))?
        .next()
        .ok_or_else(|| invalid(key, format!("`{shown}` resolves to no address")))
}

/// `log.level` as `tracing`'s filter reads it, refusing what it would take silently: a word
/// that is not a level is read as a target name (`verbose` logs only target `verbose`, i.e.
/// nothing), and a bad level after `=` is skipped.
fn check_log_filter(level: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare = !directive.contains(['=', '[']);
        if bare && !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(directive)) {
            return Err(format!(
                "`{}` is not a level: use trace, debug, info, warn, error or off, or \
                 target=level directives like `info,channel_gateway=debug`",
                capped(directive, 40)
            ));
        }
        directive
            .parse::<tracing_subscriber::filter::Directive>()
            .map_err(|e| format!("`{}`: {e}", capped(directive, 40)))?;
    }
    Ok(())
}

/// An environment value read as TOML, or why it is not TOML (without echoing it).
fn parse_env_value(v: &str) -> Result<toml::Value, String> {
    const PREFIX: &str = "x = ";
    match format!("{PREFIX}{v}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("x").ok_or_else(|| "no value".to_string()),
        Err(e) => {
            let at = e
                .span()
                .map(|s| {
                    let before = s.start.saturating_sub(PREFIX.len()).min(v.len());
                    let column = v.get(..before).map_or(before, |b| b.chars().count()) + 1;
                    format!(" at column {column}")
                })
                .unwrap_or_default();
            Err(format!("{}{at}", redact(e.message())))
        }
    }
}

/// One `CHANNEL_GATEWAY__*` override, remembered to name it in an error about its key.
struct EnvOverride {
    var: String,
    /// The dotted config key it sets.
    key: String,
    /// Set when the value is not TOML (it was then read as a string).
    not_toml: Option<String>,
}

/// The shape of the keys that take a list of tables, for errors about them. The values are
/// placeholders: an error never shows what was given.
fn shape_of(key: &str) -> Option<(&'static str, &'static str)> {
    const SHAPES: &[(&str, &str)] = &[
        (
            "channels.slack.workspaces",
            r#"[{bot_id = "B0123ABCD", token = "xoxb-..."}]"#,
        ),
        (
            "channels.telegram.bots",
            r#"[{bot_id = "my_bot", token = "123456:ABC-..."}]"#,
        ),
        (
            "channels.facebook.pages",
            r#"[{page_id = "1234567890", access_token = "EAA...", app_secret = "..."}]"#,
        ),
        (
            "channels.botframework.bots",
            r#"[{app_id = "00000000-0000-0000-0000-000000000000", app_password = "..."}]"#,
        ),
        (
            "auth.tokens",
            r#"[{name = "my-bot", sha256 = "<64 hex digits>", bots = ["*"]}]"#,
        ),
        (
            "auth.clients",
            r#"[{name = "my-bot", cert_sha256 = "<64 hex digits>", bots = ["*"]}]"#,
        ),
    ];
    SHAPES
        .iter()
        .find(|(k, _)| key == *k || key.strip_prefix(k).is_some_and(|r| r.starts_with('.')))
        .copied()
}

/// A deserialization error (wrong type, unknown key) as a ConfigError naming the key, and the
/// environment variable when one set it; values are redacted.
fn shape_error(e: &toml::de::Error, overrides: &[EnvOverride]) -> ConfigError {
    let problem = redact(e.message());
    let Some(key) = error_key(e) else {
        return ConfigError::Parse(problem);
    };
    let shape = shape_of(&key);
    // The longest override at or above the failing key set it.
    let from_env = overrides
        .iter()
        .filter(|o| key == o.key || key.strip_prefix(&o.key).is_some_and(|r| r.starts_with('.')))
        .max_by_key(|o| o.key.len());
    match from_env {
        Some(o) => {
            let mut reason = match &o.not_toml {
                Some(why) => format!("the value is not valid TOML ({why})"),
                None => problem,
            };
            match shape {
                Some((k, shape)) => reason.push_str(&format!(
                    "; `{k}` is a list of tables, which the environment gives as a TOML inline \
                     array: {}='{shape}'",
                    env_var(k)
                )),
                None if o.not_toml.is_some() => reason.push_str(
                    "; the environment value is read as TOML (a number, true/false, \"quoted \
                     string\", [inline array] or {inline table}), or else as a plain string",
                ),
                None => {}
            }
            ConfigError::Env {
                var: o.var.clone(),
                key,
                reason,
            }
        }
        None => {
            let mut reason = problem;
            if let Some((k, shape)) = shape {
                reason.push_str(&format!("; `{k}` has the shape {shape}"));
            }
            ConfigError::Invalid { key, reason }
        }
    }
}

/// The environment variable that sets a dotted config key.
fn env_var(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}

/// The dotted key a deserialization error is about. toml keeps it private and shows it only
/// in its `Display`, after the message, as "in `a.b.c`".
fn error_key(e: &toml::de::Error) -> Option<String> {
    let shown = e.to_string();
    let rest = shown.strip_prefix(e.message())?.trim();
    let key = rest.strip_prefix("in `")?.strip_suffix('`')?;
    (!key.is_empty()).then(|| key.to_string())
}

/// A TOML syntax error by line and column, and the key that line writes; never the line itself
/// (it may hold a token).
fn syntax_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let at = e.span().map_or(0, |s| s.start).min(text.len());
    let before = text.get(..at).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    ConfigError::Syntax {
        path: path.display().to_string(),
        line,
        column,
        key: key_at(text, line),
        message: redact(e.message()),
    }
}

/// The table header in force at `line` (1-based) and the key that line assigns, if it starts
/// with `key =`: names for a syntax error that cannot show the line.
fn key_at(text: &str, line: usize) -> Option<String> {
    let bare = |k: &str| {
        let k = k.trim();
        (!k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        .then(|| k.to_string())
    };
    let mut table = None;
    let mut key = None;
    for (i, l) in text.lines().take(line).enumerate() {
        let l = l.trim_start();
        if let Some(h) = l.strip_prefix('[') {
            let h = h.trim_start_matches('[');
            table = h.split(']').next().and_then(bare);
            key = None;
        } else if i + 1 == line {
            key = l.split_once('=').and_then(|(k, _)| bare(k));
        }
    }
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (t, k) => k.or(t),
    }
}

/// A parser's message with every double-quoted value replaced: serde shows a string it did not
/// expect as `string "..."`, and that string may be a token.
fn redact(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    let mut in_backticks = false;
    while let Some(c) = chars.next() {
        // Backticks quote key names, types and grammar (`"` among them), not string values.
        if c == '`' {
            in_backticks = !in_backticks;
        }
        if c != '"' || in_backticks {
            out.push(c);
            continue;
        }
        // Skip to the closing quote (serde escapes inner quotes as \").
        let mut escaped = false;
        for c in chars.by_ref() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => break,
                _ => {}
            }
        }
        out.push_str("(value not shown)");
    }
    let out = out.replace("string (value not shown)", "a string");
    capped(&out, 300)
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut cur = table;
    for p in parents {
        let entry = cur
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` is not a table"))?;
    }
    cur.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_with_no_file() {
        let c = Config::load(None, Vec::new()).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:50051");
        assert!(c.channels.botframework.enabled);
    }

    #[test]
    fn env_overrides_and_names_bad_keys() {
        let c = Config::load(
            None,
            vec![
                (
                    "CHANNEL_GATEWAY__SERVER__LISTEN".into(),
                    "127.0.0.2:1234".into(),
                ),
                (
                    "CHANNEL_GATEWAY__DELIVERY__MAX_CONCURRENCY".into(),
                    "7".into(),
                ),
                (
                    "CHANNEL_GATEWAY__DELIVERY__AUTO_BATCH_DELAY".into(),
                    "250ms".into(),
                ),
                ("UNRELATED".into(), "x".into()),
            ],
        )
        .unwrap();
        assert_eq!(c.server.listen, "127.0.0.2:1234");
        assert_eq!(c.delivery.max_concurrency, 7);
        assert_eq!(c.delivery.auto_batch_delay, Duration::from_millis(250));

        let err = Config::load(
            None,
            vec![(
                "CHANNEL_GATEWAY__DELIVERY__MAX_CONCURENCY".into(),
                "7".into(),
            )],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("max_concurency"), "{err}");

        let err = Config::load(
            None,
            vec![("CHANNEL_GATEWAY__SERVER__LISTEN".into(), "nowhere".into())],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("server.listen"), "{err}");
    }

    #[test]
    fn file_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let load = |text: &str| {
            std::fs::write(&p, text).unwrap();
            Config::load(Some(&p), Vec::new())
        };
        let err = load("[delivery]\nidle_timeout = \"5 parsecs\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("idle_timeout"), "{err}");
        let err = load("[channels.botframework]\nallowed_service_hosts = [\"https://x/\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("allowed_service_hosts[0]"), "{err}");
        load("[channels.botframework]\nallowed_service_hosts = [\"[::1]:*\", \"127.0.0.1:3978\", \"*.x.example:*\", \"[2001:db8::1]\"]\n")
            .expect("ports and IPv6 literals");
        for bad in ["127.0.0.1:99999", "[::1", "[not-an-ip]:*", "x.example:y"] {
            let err = load(&format!(
                "[channels.botframework]\nallowed_service_hosts = [\"{bad}\"]\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains("allowed_service_hosts[0]"), "{bad}: {err}");
        }
        let err = load("[channels.botframework]\ntoken_url = \"http://login.example/token\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("channels.botframework.token_url"), "{err}");
        assert!(err.contains("only https"), "{err}");
        assert!(
            load("[channels.botframework]\ntoken_url = \"http://127.0.0.1:9/token\"\n").is_ok()
        );
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("1m 30s 5ms").unwrap(),
            Duration::from_millis(90_005)
        );
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("nan").is_err());
        // Past what a Duration holds: an error, not a panic.
        assert!(parse_duration("99999999999999999999999h").is_err());
        assert!(parse_duration("18446744073709551615s 18446744073709551615s").is_err());
    }

    #[test]
    fn log_level_must_be_a_filter_that_logs() {
        let level = |v: &str| {
            Config::load(
                None,
                vec![("CHANNEL_GATEWAY__LOG__LEVEL".to_string(), v.to_string())],
            )
        };
        for ok in [
            "info",
            "DEBUG",
            "warn,channel_gateway=debug",
            "off",
            "h2=warn,info",
        ] {
            level(ok).unwrap();
        }
        for bad in [
            "verbose",
            "information",
            "channel_gateway=loud",
            "info,,trace=x",
        ] {
            let err = level(bad).unwrap_err().to_string();
            assert!(err.contains("log.level"), "{bad}: {err}");
        }
    }

    #[test]
    fn listen_takes_localhost() {
        let c = Config::load(
            None,
            vec![
                (
                    "CHANNEL_GATEWAY__SERVER__LISTEN".to_string(),
                    "localhost:50051".to_string(),
                ),
                (
                    "CHANNEL_GATEWAY__ADMIN__LISTEN".to_string(),
                    "LOCALHOST:9090".to_string(),
                ),
            ],
        )
        .unwrap();
        assert_eq!(c.listen_addr().unwrap(), "127.0.0.1:50051".parse().unwrap());
        assert_eq!(c.admin_addr().unwrap(), "127.0.0.1:9090".parse().unwrap());
        let err = Config::load(
            None,
            vec![(
                "CHANNEL_GATEWAY__SERVER__LISTEN".to_string(),
                "localhost".to_string(),
            )],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("server.listen"), "{err}");
    }

    #[test]
    fn plain_numbers_are_not_durations() {
        let env = |v: &str| {
            Config::load(
                None,
                vec![(
                    "CHANNEL_GATEWAY__DELIVERY__AUTO_BATCH_DELAY".to_string(),
                    v.to_string(),
                )],
            )
        };
        for v in ["250", "\"250\"", "2.5"] {
            let err = env(v).unwrap_err().to_string();
            assert!(err.contains("delivery.auto_batch_delay"), "{v}: {err}");
            assert!(err.contains("ms`") && err.contains("s`"), "{v}: {err}");
        }
        assert_eq!(
            env("1h30m").unwrap().delivery.auto_batch_delay,
            Duration::from_secs(5400)
        );
        assert_eq!(env("0").unwrap().delivery.auto_batch_delay, Duration::ZERO);

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        for (text, key) in [
            (
                "[delivery]\nauto_batch_delay = 250\n",
                "delivery.auto_batch_delay",
            ),
            ("[server]\nshutdown_grace = 30\n", "server.shutdown_grace"),
            (
                "[channels.facebook]\ntyping_interval = 15\n",
                "channels.facebook.typing_interval",
            ),
            (
                "[server.tls]\ncert_file = \"c\"\nkey_file = \"k\"\nreload_interval = 10\n",
                "server.tls.reload_interval",
            ),
        ] {
            std::fs::write(&p, text).unwrap();
            let err = Config::load(Some(&p), Vec::new()).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
            assert!(err.contains("no unit"), "{text}: {err}");
        }
    }

    /// A token in a malformed list-of-tables override, in every way a user got it wrong.
    #[test]
    fn env_list_errors_name_the_variable_never_the_value() {
        const TOKEN: &str = "xoxb-TOPSECRET-4242";
        let cases = [
            (
                "CHANNEL_GATEWAY__CHANNELS__SLACK__WORKSPACES",
                "bot_id",
                "token",
            ),
            (
                "CHANNEL_GATEWAY__CHANNELS__FACEBOOK__PAGES",
                "page_id",
                "access_token",
            ),
            (
                "CHANNEL_GATEWAY__CHANNELS__BOTFRAMEWORK__BOTS",
                "app_id",
                "app_password",
            ),
            (
                "CHANNEL_GATEWAY__CHANNELS__TELEGRAM__BOTS",
                "bot_id",
                "token",
            ),
        ];
        for (var, id, secret) in cases {
            let values = [
                // Unclosed array, a table instead of an array, JSON, a bare value, a typo'd
                // field, a number where the secret goes, shell-style separators.
                format!(r#"[{{{id} = "1", {secret} = "{TOKEN}"}}"#),
                format!(r#"{{{id} = "1", {secret} = "{TOKEN}"}}"#),
                format!(r#"[{{"{id}": "1", "{secret}": "{TOKEN}"}}]"#),
                TOKEN.to_string(),
                format!("1:{TOKEN}"),
                format!(r#"[{{{id} = "1", {secret}s = "{TOKEN}"}}]"#),
                format!(r#"["{TOKEN}"]"#),
                format!(r#"[{{{id} = "1", {secret} = "{TOKEN}"}}, "{TOKEN}"]"#),
            ];
            for v in values {
                let err = Config::load(None, vec![(var.to_string(), v.clone())])
                    .unwrap_err()
                    .to_string();
                assert!(!err.contains("TOPSECRET"), "{var}={v}: token in {err}");
                assert!(err.contains(var), "{var}={v}: {err}");
                assert!(err.contains("inline array"), "{var}={v}: {err}");
            }
        }
    }

    #[test]
    fn syntax_errors_give_the_place_not_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        for (text, line, key) in [
            (
                "[channels.slack]\nworkspaces = [{bot_id = \"B1\", token = \"xoxb-TOPSECRET\"]\n",
                2,
                "channels.slack.workspaces",
            ),
            (
                "[[channels.slack.workspaces]]\nbot_id = \"B1\"\ntoken = \"xoxb-TOPSECRET\n",
                3,
                "channels.slack.workspaces.token",
            ),
            (
                "[channels.botframework]\napp_id = \"a\"\napp_password = xoxb-TOPSECRET\n",
                3,
                "channels.botframework.app_password",
            ),
            (
                "[channels.facebook]\naccess_token = \"EAA-TOPSECRET\" x\n",
                2,
                "channels.facebook.access_token",
            ),
        ] {
            std::fs::write(&p, text).unwrap();
            let err = Config::load(Some(&p), Vec::new()).unwrap_err().to_string();
            assert!(!err.contains("TOPSECRET"), "token in {err}");
            assert!(err.contains(&format!("line {line}")), "{err}");
            assert!(err.contains(&format!("`{key}`")), "{err}");
        }
        // Wrong types in a file: the key and the problem, not the value.
        std::fs::write(&p, "[channels.slack]\nworkspaces = \"xoxb-TOPSECRET\"\n").unwrap();
        let err = Config::load(Some(&p), Vec::new()).unwrap_err().to_string();
        assert!(!err.contains("TOPSECRET"), "token in {err}");
        assert!(err.contains("channels.slack.workspaces"), "{err}");
        assert!(err.contains("bot_id ="), "{err}");
    }

    #[test]
    fn redaction_keeps_names_and_grammar() {
        assert_eq!(
            redact(r#"invalid type: string "a\"b`c", expected a sequence"#),
            "invalid type: a string, expected a sequence"
        );
        assert_eq!(
            redact("invalid basic string, expected `\"`"),
            "invalid basic string, expected `\"`"
        );
        assert_eq!(
            redact("unknown field `tokn`, expected `bot_id` or `token`"),
            "unknown field `tokn`, expected `bot_id` or `token`"
        );
    }
}
