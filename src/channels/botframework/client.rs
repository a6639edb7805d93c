//! HTTP client for the Bot Framework Connector: OAuth tokens, the service-URL allow-list, and
//! classification of the connector's answers.
//!
//! The only place that talks HTTP to the connector or the token endpoint. It must never log or
//! return a token or password; errors carry the channel's own code and text only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Mutex;

use super::config::BotFrameworkConfig;
use crate::channels::http::{Http, Payload, TransportError, parse_uri};
use crate::channels::shared::retry_after;
use crate::channels::{ChannelError, FailureKind, HttpMethod, NativeReceipt, NativeRequest};
use crate::settings::Secret;

const CHANNEL: &str = "botframework";

/// Is `host:port` allowed by one of `patterns`? A pattern is a host or `*.domain` (strict
/// subdomains), optionally followed by `:port` or `:*` (any port); without one it allows only
/// the URL scheme's default port, so a token never goes to another service on the same host.
/// Runs twice per message (accept and send), so it compares in place instead of lowering copies.
pub fn host_allowed(patterns: &[String], host: &str, port: u16, default_port: u16) -> bool {
    patterns.iter().any(|p| {
        let (host_pattern, port_pattern) = split_host_pattern(p);
        let port_ok = match port_pattern {
            Some("*") => true,
            Some(n) => n.parse::<u16>().is_ok_and(|n| n == port),
            None => port == default_port,
        };
        port_ok && host_matches(host_pattern, host)
    })
}

/// An allow-list entry's host and port parts: `host`, `host:port`, `host:*`, and the same
/// with an IPv6 literal in brackets (`[::1]:*`), whose brackets stay with the host as a URL
/// writes them.
pub fn split_host_pattern(p: &str) -> (&str, Option<&str>) {
    if p.starts_with('[')
        && let Some(end) = p.find(']')
    {
        let (host, rest) = p.split_at(end + 1);
        return (host, rest.strip_prefix(':'));
    }
    match p.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (p, None),
    }
}

fn host_matches(pattern: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.').as_bytes();
    let p = pattern;
    match p.strip_prefix("*.") {
        Some(domain) => {
            let domain = domain.as_bytes();
            // `x.domain`: at least one character and a dot before the domain.
            host.len() > domain.len() + 1
                && host[host.len() - domain.len()..].eq_ignore_ascii_case(domain)
                && host[host.len() - domain.len() - 1] == b'.'
        }
        None => host.eq_ignore_ascii_case(p.as_bytes()),
    }
}

/// Why a service URL may not receive a token, or `None` when it may.
pub fn service_url_refusal(patterns: &[String], service_url: &str) -> Option<String> {
    allowed_url(patterns, service_url).err()
}

/// The URL parsed once, if it may receive a token. It is parsed as the transport's own `Uri`
/// and that very value is sent: the allow-list decides on the host the connection goes to.
pub(super) fn allowed_url(patterns: &[String], service_url: &str) -> Result<http::Uri, String> {
    let shown = || crate::bounded::cap(service_url, 256);
    let uri: http::Uri = service_url
        .parse()
        .map_err(|e| format!("`{}` is not a URL: {e}", shown()))?;
    let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
        return Err(format!("`{}` has no host", shown()));
    };
    let default_port = match uri.scheme_str() {
        Some("https") => 443,
        Some("http") if crate::channels::is_loopback(host) => 80,
        s => {
            return Err(format!(
                "scheme `{}` is not allowed for `{}`: only https (http for loopback hosts)",
                crate::bounded::cap(s.unwrap_or_default(), 32),
                crate::bounded::cap(host, 256)
            ));
        }
    };
    let port = uri.port_u16().unwrap_or(default_port);
    if !host_allowed(patterns, host, port, default_port) {
        return Err(format!(
            "`{}:{port}` is not in channels.botframework.allowed_service_hosts",
            crate::bounded::cap(host, 256)
        ));
    }
    Ok(uri)
}

struct CachedToken {
    value: Secret,
    /// When the token stops being used: its expiry minus the refresh margin.
    refresh_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// A created conversation, as the connector answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedConversation {
    pub id: String,
    pub service_url: Option<String>,
    pub activity_id: Option<String>,
}

/// One bot's token: read on every call without waiting, refreshed under an async lock.
#[derive(Default)]
struct TokenSlot {
    current: std::sync::RwLock<Option<CachedToken>>,
    // Held across the refresh so one refresh is in flight per bot.
    refresh: Mutex<()>,
}

impl TokenSlot {
    /// The cached token if it is fresh and not the one the connector just refused.
    fn usable(&self, stale: Option<&str>) -> Option<Secret> {
        // The slot holds one assignment at a time: a poisoned lock still holds a whole value.
        let guard = self.current.read().unwrap_or_else(|p| p.into_inner());
        let t = guard.as_ref()?;
        let rejected = stale.is_some_and(|s| s == t.value.expose());
        (!rejected && Instant::now() < t.refresh_at).then(|| t.value.clone())
    }
}

tokio::task_local! {
    /// The channel id of the message a call is made for, set by `Channels`: a token fetch is
    /// counted against the channel whose message needed it (the token itself serves every
    /// Bot Framework channel id of its bot).
    pub static FOR_CHANNEL: crate::metrics::LabelValue;
}

pub struct BotFrameworkClient {
    http: Http,
    config: BotFrameworkConfig,
    // foldhash (seeded per process) for these keys from the configuration: every activity
    // call looked its bot up in both with SipHash.
    credentials: HashMap<String, Secret, foldhash::fast::RandomState>,
    tokens: HashMap<String, Arc<TokenSlot>, foldhash::fast::RandomState>,
    /// Token requests made so far, by the channel id that needed them (a handful of ids).
    token_fetches: std::sync::Mutex<Vec<(crate::metrics::LabelValue, u64)>>,
    /// Service URLs already found allowed. A bot talks to a handful of them, and the accept
    /// path checked every message's by parsing it (~2% of the instructions per message).
    /// Bounded: emptied when full. Only allowed URLs are kept, so a refusal is always fresh.
    allowed_seen: std::sync::Mutex<std::collections::HashSet<String, foldhash::fast::RandomState>>,
    /// Service URLs a verified incoming call vouched for, per bot (the receiving side fills it).
    trusted: Arc<super::inbound::TrustedServiceUrls>,
}

/// How many allowed service URLs a client remembers before it starts over.
const ALLOWED_SEEN_MAX: usize = 1024;

impl BotFrameworkClient {
    pub fn new(config: BotFrameworkConfig, request_timeout: Duration) -> Result<Self, String> {
        let http = Http::new(request_timeout)?;
        let credentials: HashMap<String, Secret, _> = config.credentials().into_iter().collect();
        let tokens = credentials
            .keys()
            .map(|k| (k.clone(), Arc::new(TokenSlot::default())))
            .collect();
        Ok(Self {
            http,
            config,
            credentials,
            tokens,
            token_fetches: Default::default(),
            allowed_seen: Default::default(),
            trusted: Default::default(),
        })
    }

    /// Also sends a bot's token to service URLs a verified incoming call for that bot came from.
    pub fn with_trusted(mut self, trusted: Arc<super::inbound::TrustedServiceUrls>) -> Self {
        self.trusted = trusted;
        self
    }

    /// `refusal`, except that a service URL a verified call for `app_id` came from is allowed.
    pub fn refusal_for(&self, app_id: &str, service_url: &str) -> Option<String> {
        let refusal = self.refusal(service_url)?;
        (!self.trusted.contains(app_id, service_url)).then_some(refusal)
    }

    /// Why a service URL may not receive a token, or `None` when it may (see
    /// `service_url_refusal`), remembering the URLs it allowed.
    pub fn refusal(&self, service_url: &str) -> Option<String> {
        if self.allowed_seen().contains(service_url) {
            return None;
        }
        let refusal = service_url_refusal(&self.config.allowed_service_hosts, service_url);
        if refusal.is_none() {
            let mut seen = self.allowed_seen();
            if seen.len() >= ALLOWED_SEEN_MAX {
                seen.clear();
            }
            seen.insert(service_url.to_string());
        }
        refusal
    }

    fn allowed_seen(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashSet<String, foldhash::fast::RandomState>>
    {
        // The set only gains or loses whole entries: a panic elsewhere cannot leave it
        // half-changed, so recover the guard.
        self.allowed_seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The transport, for a file download (`fetch.rs`), which reads its answer piece by piece.
    pub(super) fn http(&self) -> &Http {
        &self.http
    }

    pub fn has_credentials(&self, bot_id: &str) -> bool {
        self.credentials.contains_key(bot_id)
    }

    /// Whether any bot has credentials here: a channel without any cannot send anything.
    pub fn has_any_credentials(&self) -> bool {
        !self.credentials.is_empty()
    }

    pub fn config(&self) -> &BotFrameworkConfig {
        &self.config
    }

    /// Token requests made so far, by channel id (for metrics).
    pub fn token_fetches(&self) -> Vec<(crate::metrics::LabelValue, u64)> {
        // Only whole entries are ever written: a poisoned lock still holds valid counts.
        self.token_fetches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn count_token_fetch(&self) {
        let channel = FOR_CHANNEL
            .try_with(Clone::clone)
            .unwrap_or(std::borrow::Cow::Borrowed(CHANNEL));
        let mut counts = self.token_fetches.lock().unwrap_or_else(|p| p.into_inner());
        match counts.iter_mut().find(|(c, _)| *c == channel) {
            Some((_, n)) => *n += 1,
            None => counts.push((channel, 1)),
        }
    }

    /// `bot_id`'s Connector token (fetched or cached); `None` for a bot without credentials
    /// under `allow_unauthenticated`. Crate-visible within the channel for `fetch.rs`.
    pub(super) async fn token(
        &self,
        bot_id: &str,
        stale: Option<&str>,
    ) -> Result<Option<Secret>, ChannelError> {
        let (Some(slot), Some(password)) = (self.tokens.get(bot_id), self.credentials.get(bot_id))
        else {
            if self.config.allow_unauthenticated {
                return Ok(None);
            }
            return Err(ChannelError {
                code: Some("no_credentials".into()),
                ..ChannelError::new(
                    CHANNEL,
                    FailureKind::Permanent,
                    format!("no credentials configured for bot `{bot_id}`"),
                )
            });
        };
        if let Some(t) = slot.usable(stale) {
            return Ok(Some(t));
        }
        let _refreshing = slot.refresh.lock().await;
        // Someone else may have refreshed while this call waited for the lock.
        if let Some(t) = slot.usable(stale) {
            return Ok(Some(t));
        }
        // Boxed: a refresh is rare, and its HTTP call would otherwise make every activity
        // call's future ~4 KB larger, moved by value up to the delivery worker.
        let fresh = Box::pin(self.fetch_token(bot_id, password)).await?;
        let value = fresh.value.clone();
        *slot.current.write().unwrap_or_else(|p| p.into_inner()) = Some(fresh);
        Ok(Some(value))
    }

    async fn fetch_token(
        &self,
        bot_id: &str,
        password: &Secret,
    ) -> Result<CachedToken, ChannelError> {
        self.count_token_fetch();
        let started = Instant::now();
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", bot_id),
            ("client_secret", password.expose()),
            ("scope", self.config.scope.as_str()),
        ];
        let body = form
            .iter()
            .map(|(k, v)| format!("{k}={}", urlencode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let payload = Payload {
            content_type: "application/x-www-form-urlencoded",
            bytes: body.into_bytes().into(),
        };
        let resp = self
            .http
            .send(
                http::Method::POST,
                parse_uri(&self.config.token_url).map_err(|e| transport_error(&e, true))?,
                None,
                Some(payload),
            )
            .await
            .map_err(|e| transport_error(&e, true))?;
        let status = resp.status;
        if !(200..300).contains(&status) {
            let text = resp.text();
            let mut err = classify(status, &resp.headers(), &text);
            err.code = Some(format!("token_{}", err.code.as_deref().unwrap_or("error")));
            err.message = format!("token request failed: {}", err.message);
            return Err(err);
        }
        let parsed: TokenResponse = serde_json::from_slice(&resp.body).map_err(|e| {
            ChannelError::new(
                CHANNEL,
                FailureKind::Retryable,
                format!("token response unreadable: {e}"),
            )
        })?;
        let lifetime = token_lifetime(parsed.expires_in);
        let usable = usable_for(lifetime, self.config.token_refresh_margin);
        tracing::info!(
            bot_id,
            expires_in_s = lifetime.as_secs(),
            "bot framework token fetched"
        );
        Ok(CachedToken {
            value: Secret::new(parsed.access_token),
            refresh_at: crate::bounded::later(started, usable),
        })
    }

    async fn call(&self, req: &NativeRequest) -> Result<Value, ChannelError> {
        let url = allowed_url(&self.config.allowed_service_hosts, &req.url)
            .or_else(|reason| {
                // Under a service URL the Connector vouched for in a verified call: still
                // https only (http for loopback), as the allow-list would demand.
                let host = req
                    .url
                    .parse::<http::Uri>()
                    .ok()
                    .and_then(|u| u.host().map(|h| format!("{h}:*")));
                match host {
                    Some(pattern) if self.trusted.covers(&req.credential, &req.url) => {
                        allowed_url(&[pattern], &req.url)
                    }
                    _ => Err(reason),
                }
            })
            .map_err(|reason| ChannelError {
                code: Some("service_url_not_allowed".into()),
                ..ChannelError::new(CHANNEL, FailureKind::Permanent, reason)
            })?;
        let mut token = self.token(&req.credential, None).await?;
        let mut retried_401 = false;
        loop {
            let payload = match req.method {
                HttpMethod::Post | HttpMethod::Put => Some(Payload::json(&req.body)),
                HttpMethod::Get | HttpMethod::Delete => None,
            };
            let resp = self
                .http
                .send(
                    req.method.into(),
                    url.clone(),
                    token.as_ref().map(|t| t.expose()),
                    payload,
                )
                .await
                // A PUT sets the activity to the same content again, and a DELETE of an
                // activity gone already counts as done (`activity_gone`): both may be repeated
                // after a call that may have reached the connector; a POST may not.
                .map_err(|e| transport_error(&e, req.method != HttpMethod::Post))?;
            let status = resp.status;
            if status == 401 && token.is_some() && !retried_401 {
                // The connector may have revoked a token we still thought fresh: refresh once.
                retried_401 = true;
                let stale = token.as_ref().map(|t| t.expose().to_string());
                token = self.token(&req.credential, stale.as_deref()).await?;
                continue;
            }
            let text = resp.text();
            if !(200..300).contains(&status) {
                return Err(classify(status, &resp.headers(), &text));
            }
            if text.trim().is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_str(&text).map_err(|e| ChannelError {
                http_status: Some(status),
                ..ChannelError::new(
                    CHANNEL,
                    FailureKind::Ambiguous,
                    format!("success answer is not JSON: {e}"),
                )
            });
        }
    }

    /// Sends one activity request and returns the connector's activity id.
    pub async fn execute(&self, req: &NativeRequest) -> Result<NativeReceipt, ChannelError> {
        let body = match self.call(req).await {
            Ok(body) => body,
            Err(e) if req.method == HttpMethod::Delete && activity_gone(&e) => {
                tracing::info!(
                    http_status = e.http_status,
                    code = e.code.as_deref().unwrap_or_default(),
                    "the activity to delete is gone already; its delete counts as done"
                );
                Value::Null
            }
            Err(e) => return Err(e),
        };
        Ok(NativeReceipt {
            native_id: body
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            conversation_id: super::render::conversation_in_url(&req.url).unwrap_or_default(),
        })
    }

    /// POST /v3/conversations; the answer names the new conversation.
    pub async fn create_conversation(
        &self,
        req: &NativeRequest,
    ) -> Result<CreatedConversation, ChannelError> {
        let body = self.call(req).await?;
        let id = body
            .get("id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ChannelError {
                code: Some("no_conversation_id".into()),
                ..ChannelError::new(
                    CHANNEL,
                    FailureKind::Permanent,
                    "create conversation answered without an id",
                )
            })?;
        let text = |k: &str| body.get(k).and_then(Value::as_str).map(String::from);
        Ok(CreatedConversation {
            id: id.to_string(),
            service_url: text("serviceUrl"),
            activity_id: text("activityId"),
        })
    }
}

/// A token endpoint's `expires_in` is read as a lifetime between one minute and one day. The
/// Bot Framework's tokens live an hour; an answer of 0 would fetch a token before every message
/// (a 401 still fetches a new one at once), and a huge one would overflow the refresh time.
const TOKEN_LIFETIME_MIN: Duration = Duration::from_secs(60);
const TOKEN_LIFETIME_MAX: Duration = Duration::from_secs(24 * 3600);

fn token_lifetime(expires_in: Option<u64>) -> Duration {
    Duration::from_secs(expires_in.unwrap_or(3600)).clamp(TOKEN_LIFETIME_MIN, TOKEN_LIFETIME_MAX)
}

/// How long a token is used before it is refreshed: its lifetime less the margin, but at least
/// half of it, since a margin as long as the lifetime would refresh before every message.
fn usable_for(lifetime: Duration, margin: Duration) -> Duration {
    lifetime.saturating_sub(margin).max(lifetime / 2)
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn transport_error(e: &TransportError, idempotent: bool) -> ChannelError {
    e.to_channel_error(CHANNEL, "the connector", idempotent)
}

/// Whether a DELETE's refusal says the activity is not there (Teams: 404
/// `ActivityNotFoundInConversation`, "Message doesn't exist or it is deleted"). That is what the
/// delete was for, so it is done: a delete resent after a crash (its first DELETE reached the
/// channel, its receipt was not recorded) must not fail on the activity it removed, nor stop
/// before the message's other activities. A conversation that is not found is no such answer:
/// the activity may still show where this bot cannot reach it, so that stays a failure.
fn activity_gone(e: &ChannelError) -> bool {
    e.http_status == Some(404) && e.code.as_deref() != Some("ConversationNotFound")
}

/// Turns a non-success answer into a typed error with the connector's own code and text.
pub fn classify(status: u16, headers: &http::header::HeaderMap, body: &str) -> ChannelError {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let field = |k: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.pointer(&format!("/error/{k}")).or_else(|| v.get(k)))
            .and_then(Value::as_str)
            .map(String::from)
    };
    let code = field("code");
    let message = field("message").unwrap_or_else(|| {
        let snippet: String = body.chars().take(200).collect();
        if snippet.is_empty() {
            format!("HTTP {status}")
        } else {
            snippet
        }
    });
    let kind = match status {
        // Teams' 412 `PreconditionFailed`: "multiple concurrent operations on the same
        // conversation", to retry with backoff (its status-code table); nothing was done.
        412 | 429 | 500..=599 => FailureKind::Retryable,
        408 => FailureKind::Ambiguous,
        _ => FailureKind::Permanent,
    };
    ChannelError {
        channel: CHANNEL.into(),
        kind,
        http_status: Some(status),
        code: code.or_else(|| Some(format!("http_{status}"))),
        message,
        retry_after: if status == 429 || status == 503 {
            retry_after(headers)
        } else {
            None
        },
        category: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_lifetime_is_bounded_both_ways() {
        assert_eq!(token_lifetime(None), Duration::from_secs(3600));
        assert_eq!(token_lifetime(Some(0)), TOKEN_LIFETIME_MIN);
        assert_eq!(token_lifetime(Some(u64::MAX)), TOKEN_LIFETIME_MAX);
        assert_eq!(token_lifetime(Some(86_399)), Duration::from_secs(86_399));
    }

    #[test]
    fn a_token_is_refreshed_a_margin_before_it_expires_but_used_half_its_life() {
        let s = Duration::from_secs;
        assert_eq!(usable_for(s(3600), s(300)), s(3300));
        assert_eq!(usable_for(s(301), s(300)), Duration::from_millis(150_500));
        assert_eq!(usable_for(token_lifetime(Some(0)), s(300)), s(30));
    }

    fn pats(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_client_remembers_only_allowed_service_urls_and_only_so_many() {
        let config = BotFrameworkConfig {
            allowed_service_hosts: pats(&["*.botframework.com", "127.0.0.1:*"]),
            ..Default::default()
        };
        let client = BotFrameworkClient::new(config, Duration::from_secs(5)).unwrap();
        for _ in 0..2 {
            assert!(client.refusal("https://x.botframework.com/v3/").is_none());
            assert!(client.refusal("https://attacker.example/").is_some());
            assert!(client.refusal("http://x.botframework.com/").is_some());
        }
        assert_eq!(client.allowed_seen().len(), 1);
        for i in 0..ALLOWED_SEEN_MAX + 10 {
            assert!(client.refusal(&format!("http://127.0.0.1:{i}/")).is_none());
        }
        assert!(client.allowed_seen().len() <= ALLOWED_SEEN_MAX);
        assert!(client.refusal("https://attacker.example/").is_some());
    }

    #[test]
    fn allow_list_matches_the_port_too() {
        let p = pats(&[
            "smba.trafficmanager.net",
            "*.botframework.com:8443",
            "127.0.0.1:*",
        ]);
        assert!(service_url_refusal(&p, "https://smba.trafficmanager.net/amer/").is_none());
        assert!(service_url_refusal(&p, "https://smba.trafficmanager.net:443/amer/").is_none());
        let other = service_url_refusal(&p, "https://smba.trafficmanager.net:8080/amer/");
        assert!(other.is_some_and(|r| r.contains(":8080")));
        assert!(service_url_refusal(&p, "https://x.botframework.com:8443/").is_none());
        assert!(service_url_refusal(&p, "https://x.botframework.com/").is_some());
        assert!(service_url_refusal(&p, "http://127.0.0.1:4711/").is_none());
        assert!(!super::host_allowed(&p, "127.0.0.2", 80, 80));
        let v6 = pats(&["[::1]:*", "[2001:db8::1]"]);
        assert!(service_url_refusal(&v6, "http://[::1]:3978/").is_none());
        assert!(service_url_refusal(&v6, "https://[2001:db8::1]/").is_none());
        assert!(service_url_refusal(&v6, "https://[2001:db8::1]:8443/").is_some());
    }

    fn host_allowed(p: &[String], host: &str) -> bool {
        super::host_allowed(p, host, 443, 443)
    }

    #[test]
    fn allow_list_matches_hosts_and_subdomains_only() {
        let p = pats(&["*.botframework.com", "smba.trafficmanager.net", "127.0.0.1"]);
        assert!(host_allowed(&p, "webchat.botframework.com"));
        assert!(!host_allowed(&p, "botframework.com"));
        assert!(!host_allowed(&p, "evilbotframework.com"));
        assert!(!host_allowed(&p, "botframework.com.evil.io"));
        assert!(host_allowed(&p, "SMBA.trafficmanager.net"));
        assert!(host_allowed(&p, "127.0.0.1"));
        // Case and a trailing dot do not matter on either side; a bare dot is not a subdomain.
        assert!(host_allowed(&p, "Teams.BotFramework.com."));
        assert!(host_allowed(
            &pats(&["*.BotFramework.COM"]),
            "x.botframework.com"
        ));
        assert!(!host_allowed(&p, ".botframework.com"));
        assert!(!host_allowed(&p, "xbotframework.com"));
        assert!(service_url_refusal(&p, "https://smba.trafficmanager.net/amer/").is_none());
        assert!(service_url_refusal(&p, "http://smba.trafficmanager.net/amer/").is_some());
        assert!(service_url_refusal(&p, "http://127.0.0.1/").is_none());
        assert!(
            service_url_refusal(&p, "http://127.0.0.1:3978/").is_some(),
            "another port"
        );
        assert!(service_url_refusal(&p, "https://attacker.example/").is_some());
        // The host the connection would go to decides, not text before an `@`.
        assert!(
            service_url_refusal(&p, "https://smba.trafficmanager.net@attacker.example/").is_some()
        );
        assert!(service_url_refusal(&p, "https://x.botframework.com:8443/v3/").is_some());
        assert!(service_url_refusal(&p, "ftp://x.botframework.com/").is_some());
        assert!(service_url_refusal(&p, "/relative/only").is_some());
    }

    #[test]
    fn classification_keeps_the_channel_words() {
        let mut h = http::header::HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        let e = classify(
            429,
            &h,
            r#"{"error":{"code":"TooManyRequests","message":"slow down"}}"#,
        );
        assert_eq!(e.kind, FailureKind::Retryable);
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(e.code.as_deref(), Some("TooManyRequests"));
        let e = classify(
            404,
            &Default::default(),
            r#"{"error":{"code":"ConversationNotFound","message":"gone"}}"#,
        );
        assert_eq!(e.kind, FailureKind::Permanent);
        assert_eq!(e.message, "gone");
        let e = classify(
            412,
            &Default::default(),
            r#"{"error":{"code":"PreconditionFailed","message":"Precondition failed, please try again."}}"#,
        );
        assert_eq!(e.kind, FailureKind::Retryable);
        assert_eq!(e.code.as_deref(), Some("PreconditionFailed"));
        let e = classify(502, &Default::default(), "bad gateway");
        assert_eq!(e.kind, FailureKind::Retryable);
        assert_eq!(e.code.as_deref(), Some("http_502"));
    }

    #[test]
    fn only_an_activity_not_found_counts_as_deleted() {
        let answer = |status: u16, code: &str| {
            classify(
                status,
                &Default::default(),
                &format!(r#"{{"error":{{"code":"{code}","message":"Conversation not found."}}}}"#),
            )
        };
        assert!(activity_gone(&answer(
            404,
            "ActivityNotFoundInConversation"
        )));
        assert!(activity_gone(&classify(404, &Default::default(), "")));
        assert!(!activity_gone(&answer(404, "ConversationNotFound")));
        assert!(!activity_gone(&answer(403, "NotEnoughPermissions")));
        assert!(!activity_gone(&answer(400, "BadArgument")));
    }

    #[test]
    fn retry_after_http_date() {
        let mut h = http::header::HeaderMap::new();
        let later = time::OffsetDateTime::now_utc() + time::Duration::seconds(30);
        let s = later
            .format(&time::format_description::well_known::Rfc2822)
            .unwrap();
        h.insert("retry-after", s.parse().unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d <= Duration::from_secs(31) && d >= Duration::from_secs(28),
            "{d:?}"
        );
        let mut h = http::header::HeaderMap::new();
        h.insert(
            "retry-after",
            "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
    }
}
