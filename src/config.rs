//! One validated configuration: a TOML file, then environment overrides, then checks that name the key.
//!
//! Owns every tunable and its default. Everything runs on these defaults with no file at all.
//! Secrets are read here and handed to channel clients; they must never be logged or shown
//! (the `Debug` of a secret prints `<redacted>`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Environment overrides: `CHANNEL_GATEWAY__SECTION__KEY=value` sets `section.key`
/// (`__` separates levels; the value is read as TOML, or as a string when it is not TOML).
pub const ENV_PREFIX: &str = "CHANNEL_GATEWAY__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Parse(String),
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

pub(crate) fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// A secret string whose `Debug` never shows it.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Parses `250ms`, `30s`, `5m`, `24h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 250ms, 30s, 5m or 24h"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit `{other}` in `{s}` (use ms, s, m, h)"
            ));
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{s}` is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        S(String),
        N(f64),
    }
    match Raw::deserialize(d)? {
        Raw::S(s) => parse_duration(&s).map_err(serde::de::Error::custom),
        Raw::N(n) if n >= 0.0 && n.is_finite() => Ok(Duration::from_secs_f64(n)),
        Raw::N(n) => Err(serde::de::Error::custom(format!(
            "{n} is not a valid duration"
        ))),
    }
}

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
            max_pending_total: 1_000_000,
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
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            per_caller_per_second: 0.0,
            per_caller_burst: 1000,
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
    /// An append-only log in `data_dir`: accepted messages survive a crash.
    Durable,
    /// Lost on a crash or restart; for tests and throwaway deployments.
    Memory,
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
    /// Memory for reading an outbox written by an earlier version (redb), imported once at the
    /// first start, in MiB.
    pub cache_mib: usize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            backend: OutboxBackend::Durable,
            data_dir: "channel-gateway-data".into(),
            retention: Duration::from_secs(3600),
            compact_interval: Duration::from_secs(60),
            cache_mib: 16,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelsConfig {
    pub botframework: BotFrameworkConfig,
    pub facebook: crate::channels::facebook::config::FacebookConfig,
    pub slack: crate::channels::slack::config::SlackConfig,
}

/// The channel ids served through the Bot Framework Connector unless configured otherwise.
pub const DEFAULT_BOTFRAMEWORK_CHANNEL_IDS: [&str; 5] =
    ["skype", "msteams", "webchat", "directline", "emulator"];

/// Hosts the Bot Framework serves conversations from; a token is only ever sent to these.
pub const DEFAULT_BOTFRAMEWORK_HOSTS: &[&str] = &[
    "*.botframework.com",
    "smba.trafficmanager.net",
    "*.botframework.azure.us",
    "smba.infra.gcc.teams.microsoft.com",
    "smba.infra.gov.teams.microsoft.us",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BotFrameworkConfig {
    pub enabled: bool,
    /// Channel ids served by the Bot Framework Connector.
    pub channel_ids: Vec<String>,
    /// OAuth client-credentials endpoint.
    pub token_url: String,
    pub scope: String,
    /// A token is treated as expired this long before its `expires_in` (the v3 SDK used 300 s).
    #[serde(deserialize_with = "de_duration")]
    pub token_refresh_margin: Duration,
    /// Service URL host patterns (`*.example.com` matches subdomains). Plain http is only
    /// accepted for loopback hosts.
    pub allowed_service_hosts: Vec<String>,
    /// Send without a token when the bot has no credentials (the Emulator without auth).
    pub allow_unauthenticated: bool,
    /// How often a kept-alive typing indicator repeats (clients show one for about 3 s).
    #[serde(deserialize_with = "de_duration")]
    pub typing_interval: Duration,
    /// Send to each Teams conversation and tenant within Teams' documented rate limits, so
    /// its 429s stay rare; off, only 429s slow sends down.
    pub teams_pacing: bool,
    /// Shortcut for a single bot: its Microsoft app id and password.
    pub app_id: Option<String>,
    pub app_password: Option<Secret>,
    pub bots: Vec<BotCredentials>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotCredentials {
    pub app_id: String,
    pub app_password: Secret,
}

impl Default for BotFrameworkConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            channel_ids: DEFAULT_BOTFRAMEWORK_CHANNEL_IDS.map(String::from).to_vec(),
            token_url: "https://login.microsoftonline.com/botframework.com/oauth2/v2.0/token"
                .into(),
            scope: "https://api.botframework.com/.default".into(),
            token_refresh_margin: Duration::from_secs(300),
            allowed_service_hosts: DEFAULT_BOTFRAMEWORK_HOSTS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            allow_unauthenticated: false,
            typing_interval: Duration::from_secs(3),
            teams_pacing: true,
            app_id: None,
            app_password: None,
            bots: Vec::new(),
        }
    }
}

impl BotFrameworkConfig {
    /// Every configured bot, the single-bot shortcut included.
    pub fn credentials(&self) -> BTreeMap<String, Secret> {
        let mut out: BTreeMap<String, Secret> = self
            .bots
            .iter()
            .map(|b| (b.app_id.clone(), b.app_password.clone()))
            .collect();
        if let (Some(id), Some(pw)) = (&self.app_id, &self.app_password) {
            out.insert(id.clone(), pw.clone());
        }
        out
    }
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
                    .map_err(|e| ConfigError::Parse(format!("{}: {e}", p.display())))?
            }
            None => toml::Table::new(),
        };
        for (k, v) in env {
            let Some(rest) = k.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            if path.iter().any(|p| p.is_empty()) {
                return Err(invalid(&k, "empty path segment in environment override"));
            }
            set_path(&mut table, &path, parse_env_value(&v)).map_err(|r| invalid(&k, r))?;
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server.listen.parse().map_err(|e| {
            invalid(
                "server.listen",
                format!("`{}` is not host:port ({e})", self.server.listen),
            )
        })
    }

    pub fn admin_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.admin.listen.parse().map_err(|e| {
            invalid(
                "admin.listen",
                format!("`{}` is not host:port ({e})", self.admin.listen),
            )
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let listen = self.listen_addr()?;
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
        if self.outbox.compact_interval.is_zero() {
            return Err(invalid("outbox.compact_interval", "must be more than 0"));
        }
        if self.outbox.cache_mib == 0 {
            return Err(invalid("outbox.cache_mib", "must be at least 1"));
        }
        if self.outbox.data_dir.as_os_str().is_empty() {
            return Err(invalid("outbox.data_dir", "must not be empty"));
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
        let bf = &self.channels.botframework;
        let token_url = url::Url::parse(&bf.token_url)
            .map_err(|e| invalid("channels.botframework.token_url", format!("not a URL: {e}")))?;
        // The bot's app password is posted to it.
        if let Some(reason) = crate::channels::clear_text_refusal(&token_url) {
            return Err(invalid("channels.botframework.token_url", reason));
        }
        for (i, host) in bf.allowed_service_hosts.iter().enumerate() {
            let bare = host.strip_prefix("*.").unwrap_or(host);
            if bare.is_empty() || bare.contains(['/', ':', '*']) {
                return Err(invalid(
                    &format!("channels.botframework.allowed_service_hosts[{i}]"),
                    format!("`{host}` is not a host name or `*.domain` pattern"),
                ));
            }
        }
        if bf.typing_interval < Duration::from_millis(100) {
            return Err(invalid(
                "channels.botframework.typing_interval",
                "must be at least 100ms",
            ));
        }
        if bf.app_id.is_some() != bf.app_password.is_some() {
            return Err(invalid(
                "channels.botframework.app_password",
                "app_id and app_password go together",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, b) in bf.bots.iter().enumerate() {
            if b.app_id.is_empty() {
                return Err(invalid(
                    &format!("channels.botframework.bots[{i}].app_id"),
                    "must not be empty",
                ));
            }
            if b.app_password.expose().is_empty() {
                return Err(invalid(
                    &format!("channels.botframework.bots[{i}].app_password"),
                    "must not be empty",
                ));
            }
            if !seen.insert(&b.app_id) {
                return Err(invalid(
                    &format!("channels.botframework.bots[{i}].app_id"),
                    format!("`{}` is configured twice", b.app_id),
                ));
            }
        }
        for (i, id) in bf.channel_ids.iter().enumerate() {
            if matches!(id.as_str(), "facebook" | "slack") || id.is_empty() {
                return Err(invalid(
                    &format!("channels.botframework.channel_ids[{i}]"),
                    format!("`{id}` cannot be served by the Bot Framework Connector here"),
                ));
            }
        }
        self.channels.facebook.validate()?;
        self.channels.slack.validate()?;
        Ok(())
    }
}

fn parse_env_value(v: &str) -> toml::Value {
    // A bare word like `127.0.0.1:50051` is not TOML; read it as a string then.
    format!("x = {v}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("x"))
        .unwrap_or_else(|| toml::Value::String(v.to_string()))
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
        let err = load("[channels.botframework]\ntoken_url = \"http://login.example/token\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("channels.botframework.token_url"), "{err}");
        assert!(err.contains("only https"), "{err}");
        assert!(
            load("[channels.botframework]\ntoken_url = \"http://127.0.0.1:9/token\"\n").is_ok()
        );
        let err = load("[outbox]\ncache_mib = 0\n").unwrap_err().to_string();
        assert!(err.contains("outbox.cache_mib"), "{err}");
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
        assert!(parse_duration("3 weeks").is_err());
    }
}
