//! The Bot Framework's receiving side (`POST /api/messages`): the Bot Connector's JWT checked
//! per "Authenticate requests from the Bot Connector service to your bot", and the Activity it
//! carries turned into a `Message` as a v3 bot receives it, with the address to reply to.
//!
//! Owns the signing-key cache (OpenID metadata → JWKS, refreshed daily and on an unknown key id
//! at most once per five minutes) and the set of service URLs a verified call came from. It
//! must not send anything to the connector: the client reads the verified service URLs
//! (`TrustedServiceUrls`) to send a bot's replies where the Connector said it lives.
//!
//! What the token proves: it was issued by the Bot Connector for one of our bots, for this
//! channel id (the key's endorsements) and this service URL (its `serviceurl` claim). It does
//! not sign the body, so a body changed on the way verifies as long as it keeps `channelId`
//! and `serviceUrl`: those two, the fields a reply's token would go to, are what verification
//! binds; the rest is as trustworthy as the TLS connection it came over.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::config::BotFrameworkConfig;
use crate::channels::channel::{
    Inbound, InboundEvent, Parsed, Reply, ReplyWindow, WebhookAnswer, WebhookError, WebhookRequest,
};
use crate::channels::http::{Http, parse_uri};
use crate::model::{
    Address, Attachment, AttachmentContent, Conversation, Identity, Message, MessageType,
    TextFormat,
};

/// Where the Bot Connector posts activities (the path registered as the bot's messaging
/// endpoint, below the inbound listener).
pub const PATH: &str = "/api/messages";

/// The issuer of the Bot Connector's tokens to bots.
pub const CHANNEL_ISSUER: &str = "https://api.botframework.com";

/// The issuers of the Emulator's tokens (Microsoft Entra ID tenants of the Bot Framework, v1
/// and v2 tokens, public and US Government clouds), as the Bot Framework SDKs list them.
pub const EMULATOR_ISSUERS: &[&str] = &[
    "https://sts.windows.net/d6d49420-f39b-4df7-a1dc-d59a935871db/",
    "https://login.microsoftonline.com/d6d49420-f39b-4df7-a1dc-d59a935871db/v2.0",
    "https://sts.windows.net/f8cdef31-a31e-4b4a-93e4-5f571e91255a/",
    "https://login.microsoftonline.com/f8cdef31-a31e-4b4a-93e4-5f571e91255a/v2.0",
    "https://sts.windows.net/cab8a31a-1906-4287-a0d8-4eef66b95f6e/",
    "https://login.microsoftonline.us/cab8a31a-1906-4287-a0d8-4eef66b95f6e/v2.0",
    "https://login.microsoftonline.us/f8cdef31-a31e-4b4a-93e4-5f571e91255a/",
    "https://login.microsoftonline.us/f8cdef31-a31e-4b4a-93e4-5f571e91255a/v2.0",
];

/// The only signing algorithms the Bot Connector uses (the SDKs' `AllowedSigningAlgorithms`).
const ALGORITHMS: [Algorithm; 3] = [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512];
/// Clock skew allowed on `exp` and `nbf`, as the SDKs allow.
const CLOCK_SKEW_SECS: f64 = 300.0;
/// Keys are fetched again after this long (the SDKs refresh daily).
const KEYS_MAX_AGE_SECS: u64 = 24 * 3600;
/// An unknown key id (or a failed fetch) fetches the keys at most this often: a flood of
/// tokens naming made-up keys must not become a flood of calls to the metadata endpoint.
const REFETCH_INTERVAL_SECS: u64 = 300;
/// A bearer token is ~1-2 KB; anything far longer is not one.
const MAX_TOKEN_BYTES: usize = 16 << 10;
/// The activity body read at most. The connector's own limit on activities is 256 KB.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// The metadata and key documents are a few KB.
const MAX_KEY_DOCUMENT_BYTES: usize = 256 << 10;
/// Keys kept from one key document, endorsements per key, and the length of each.
const MAX_KEYS: usize = 64;
const MAX_ENDORSEMENTS: usize = 512;
const MAX_KEY_STRING: usize = 16 << 10;
/// Service URLs remembered as verified before the set starts over.
const VERIFIED_URLS_MAX: usize = 1024;
/// JSON nesting of an activity; real ones nest a dozen levels (adaptive cards in channelData).
const MAX_DEPTH: usize = 64;
/// Ids (user, bot, conversation, activity, tenant) longer than this are not a channel's.
const MAX_ID_BYTES: usize = 1024;
/// Attachments, entities and members of one activity.
const MAX_ITEMS: usize = 256;

fn unverified(reason: &'static str) -> WebhookError {
    WebhookError::Unverified(reason)
}

/// One signing key as the key document lists it.
struct SigningKey {
    key: DecodingKey,
    /// The channel ids the key may sign for.
    endorsements: Vec<String>,
}

/// A key document's keys, fetched on demand and cached.
struct KeySource {
    metadata_url: String,
    // Async and held across a fetch: one fetch at a time, and the calls waiting for it use
    // its result instead of fetching again.
    state: tokio::sync::Mutex<KeyState>,
}

#[derive(Default)]
struct KeyState {
    keys: HashMap<String, Arc<SigningKey>>,
    /// When (received_at) the keys are to be fetched again without being asked to.
    refresh_due: u64,
    /// When an unknown key id (or a failed fetch) last caused a fetch.
    last_forced: Option<u64>,
    fetches: u64,
}

/// Time since `then`, for the cache: a clock that went back counts as a long time, so the
/// cache never waits for the clock to catch up.
fn elapsed(then: u64, now: u64) -> u64 {
    now.checked_sub(then).unwrap_or(u64::MAX)
}

impl KeySource {
    fn new(metadata_url: &str) -> Self {
        Self {
            metadata_url: metadata_url.to_string(),
            state: tokio::sync::Mutex::new(KeyState::default()),
        }
    }

    /// The key named `kid`, fetching the key document when it is due or the key is unknown
    /// (at most once per `REFETCH_INTERVAL_SECS` for unknown keys).
    async fn key(&self, http: &Http, kid: &str, now: u64) -> Result<Arc<SigningKey>, WebhookError> {
        let mut st = self.state.lock().await;
        let due = st.fetches == 0
            || now >= st.refresh_due
            || st.refresh_due > now.saturating_add(KEYS_MAX_AGE_SECS);
        if due {
            self.refresh(&mut st, http, now).await;
        }
        if let Some(k) = st.keys.get(kid) {
            return Ok(k.clone());
        }
        let may_force = st
            .last_forced
            .is_none_or(|t| elapsed(t, now) >= REFETCH_INTERVAL_SECS);
        if !due && may_force {
            st.last_forced = Some(now);
            self.refresh(&mut st, http, now).await;
            if let Some(k) = st.keys.get(kid) {
                return Ok(k.clone());
            }
        }
        Err(unverified("token signed with an unknown key"))
    }

    async fn refresh(&self, st: &mut KeyState, http: &Http, now: u64) {
        st.fetches += 1;
        match Box::pin(fetch_keys(http, &self.metadata_url)).await {
            Ok(keys) => {
                st.keys = keys;
                st.refresh_due = now.saturating_add(KEYS_MAX_AGE_SECS);
            }
            Err(reason) => {
                // The keys held stay in use; the next try waits like an unknown key's.
                tracing::warn!(
                    url = %self.metadata_url,
                    reason,
                    "bot framework signing keys could not be fetched"
                );
                st.refresh_due = now.saturating_add(REFETCH_INTERVAL_SECS);
                st.last_forced = Some(now);
            }
        }
    }
}

async fn get_json(http: &Http, url: &str) -> Result<Value, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    if let Some(reason) = crate::channels::clear_text_refusal(&parsed) {
        return Err(reason);
    }
    let uri = parse_uri(url).map_err(|e| e.to_string())?;
    let answer = http
        .send(http::Method::GET, uri, None, None)
        .await
        .map_err(|e| e.to_string())?;
    if !(200..300).contains(&answer.status) {
        return Err(format!("answered HTTP {}", answer.status));
    }
    if answer.body.len() > MAX_KEY_DOCUMENT_BYTES {
        return Err(format!("over {MAX_KEY_DOCUMENT_BYTES} bytes"));
    }
    serde_json::from_slice(&answer.body).map_err(|e| format!("not JSON: {e}"))
}

/// OpenID metadata → `jwks_uri` → the RSA signing keys it lists, by key id.
async fn fetch_keys(
    http: &Http,
    metadata_url: &str,
) -> Result<HashMap<String, Arc<SigningKey>>, String> {
    let metadata = get_json(http, metadata_url).await?;
    let jwks_uri = metadata
        .get("jwks_uri")
        .and_then(Value::as_str)
        .ok_or("the metadata names no jwks_uri")?;
    let jwks = get_json(http, jwks_uri).await?;
    let listed = jwks
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("the key document has no keys")?;
    let text = |k: &Value, name: &str| {
        k.get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= MAX_KEY_STRING)
            .map(str::to_string)
    };
    let mut keys = HashMap::new();
    for k in listed.iter().take(MAX_KEYS) {
        if text(k, "kty").as_deref() != Some("RSA") || text(k, "use").is_some_and(|u| u != "sig") {
            continue;
        }
        let (Some(kid), Some(n), Some(e)) = (text(k, "kid"), text(k, "n"), text(k, "e")) else {
            continue;
        };
        let Ok(key) = DecodingKey::from_rsa_components(&n, &e) else {
            continue;
        };
        let endorsements = k
            .get("endorsements")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .take(MAX_ENDORSEMENTS)
                    .filter_map(Value::as_str)
                    .filter(|s| s.len() <= MAX_KEY_STRING)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        keys.insert(kid, Arc::new(SigningKey { key, endorsements }));
    }
    if keys.is_empty() {
        return Err("the key document lists no usable RSA key".into());
    }
    Ok(keys)
}

/// The claims a Bot Framework token is checked on. A duplicated or mistyped claim makes the
/// token unreadable (serde refuses both), so no claim is read two ways.
#[derive(Deserialize, Clone)]
struct Claims {
    iss: String,
    #[serde(default)]
    aud: Option<String>,
    exp: serde_json::Number,
    #[serde(default)]
    nbf: Option<serde_json::Number>,
    #[serde(default)]
    serviceurl: Option<String>,
    #[serde(default)]
    ver: Option<String>,
    #[serde(default)]
    appid: Option<String>,
    #[serde(default)]
    azp: Option<String>,
}

impl Claims {
    /// The bot the token was issued for: the audience of a Bot Connector token; for an
    /// Emulator token the app that asked for it (`appid` in v1 tokens, `azp` in v2), which is
    /// what the SDKs check there.
    fn app_id(&self) -> Option<&str> {
        if self.iss == CHANNEL_ISSUER {
            return self.aud.as_deref();
        }
        match self.ver.as_deref() {
            None | Some("") | Some("1.0") => self.appid.as_deref(),
            Some("2.0") => self.azp.as_deref(),
            Some(_) => None,
        }
    }
}

/// What verification needs of the activity: where the reply goes and for which channel.
/// Duplicated keys are refused by serde, so these read the same as any later parse.
#[derive(Deserialize)]
struct Bound {
    #[serde(rename = "channelId")]
    channel_id: Option<String>,
    #[serde(rename = "serviceUrl")]
    service_url: Option<String>,
}

/// The bearer token of the call: exactly one `Authorization: Bearer` header.
fn bearer(headers: &http::HeaderMap) -> Result<&str, WebhookError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let value = values
        .next()
        .ok_or_else(|| unverified("no Authorization header"))?;
    if values.next().is_some() {
        return Err(unverified("more than one Authorization header"));
    }
    let value = value
        .to_str()
        .map_err(|_| unverified("Authorization is not a bearer token"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| unverified("Authorization is not a bearer token"))?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(unverified("Authorization is not a bearer token"));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(unverified("bearer token too long"));
    }
    Ok(token)
}

/// The Bot Framework's inbound side: built from the `[channels.botframework]` section.
pub struct BotFrameworkInbound {
    channel_ids: Vec<String>,
    app_ids: Vec<String>,
    http: Http,
    channel_keys: KeySource,
    /// Present when `allow_emulator_tokens` is set.
    emulator_keys: Option<KeySource>,
    /// (app id, service URL) pairs a verified call came from, shared with the client.
    verified: Arc<TrustedServiceUrls>,
    /// Tokens whose signature verified, by their exact text. The Connector reuses one token
    /// for every call to a bot until it nears expiry, and an RSA verification cost ~116 µs of
    /// the ~130 µs a call took (bench/PROFILE.md, seventeenth pass); everything that depends
    /// on the call (time, audience, endorsement, service URL) is still checked on each.
    signatures: std::sync::Mutex<HashMap<String, Verified>>,
}

/// A token whose signature verified: its claims, the key that signed it, and when.
#[derive(Clone)]
struct Verified {
    claims: Claims,
    key: Arc<SigningKey>,
    emulator: bool,
    at: u64,
}

/// Tokens kept verified at most; the set starts over when full.
const VERIFIED_TOKENS_MAX: usize = 4096;
/// How long a verified signature is trusted without checking it again (the key it was
/// checked against is cached for a day anyway).
const VERIFIED_TOKEN_SECS: u64 = 15 * 60;

/// Service URLs a verified call for a bot came from: the client may send that bot's token
/// there even when no `allowed_service_hosts` pattern matches (as the SDKs'
/// `AppCredentials.TrustServiceUrl` does). The token's `serviceurl` claim vouches for them.
/// Bounded: forgotten when full.
#[derive(Debug, Default)]
pub struct TrustedServiceUrls(std::sync::Mutex<HashSet<(String, String)>>);

/// Whether `url` is `base` or a path below it. A bare prefix would let a trusted
/// `https://host` cover `https://host.example.net/...`.
fn under(base: &str, url: &str) -> bool {
    match url.strip_prefix(base) {
        Some(rest) => {
            !base.is_empty() && (base.ends_with('/') || rest.is_empty() || rest.starts_with('/'))
        }
        None => false,
    }
}

impl TrustedServiceUrls {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<(String, String)>> {
        // Only whole entries are added or the set cleared: a poisoned lock holds a valid set.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn contains(&self, app_id: &str, service_url: &str) -> bool {
        self.set()
            .contains(&(app_id.to_string(), service_url.to_string()))
    }

    /// Whether `url` (a request the client is about to make) is under a service URL trusted
    /// for `app_id`.
    pub fn covers(&self, app_id: &str, url: &str) -> bool {
        self.set()
            .iter()
            .any(|(a, su)| a == app_id && under(su, url))
    }

    fn insert(&self, app_id: &str, service_url: &str) {
        let mut set = self.set();
        if set.len() >= VERIFIED_URLS_MAX {
            set.clear();
        }
        set.insert((app_id.to_string(), service_url.to_string()));
    }
}

impl BotFrameworkInbound {
    pub fn new(config: &BotFrameworkConfig, request_timeout: Duration) -> Result<Self, String> {
        Ok(Self {
            channel_ids: config.channel_ids.clone(),
            app_ids: config.credentials().into_keys().collect(),
            http: Http::new(request_timeout)?,
            channel_keys: KeySource::new(&config.openid_metadata_url),
            emulator_keys: config
                .allow_emulator_tokens
                .then(|| KeySource::new(&config.emulator_openid_metadata_url)),
            verified: Default::default(),
            signatures: Default::default(),
        })
    }

    /// Whether a verified call for bot `app_id` came from `service_url` (exactly as the
    /// activity named it).
    pub fn service_url_verified(&self, app_id: &str, service_url: &str) -> bool {
        self.verified.contains(app_id, service_url)
    }

    /// The set the client reads to trust verified service URLs.
    pub fn trusted(&self) -> Arc<TrustedServiceUrls> {
        self.verified.clone()
    }

    fn remember(&self, app_id: &str, service_url: &str) {
        self.verified.insert(app_id, service_url);
    }

    #[cfg(test)]
    async fn key_fetches(&self) -> u64 {
        self.channel_keys.state.lock().await.fetches
    }

    fn signatures(&self) -> std::sync::MutexGuard<'_, HashMap<String, Verified>> {
        // Only whole entries are added or the map cleared: a poisoned lock holds a valid map.
        self.signatures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The token's signature checked against the issuer's key: what does not depend on the
    /// call it came with.
    async fn verify_signature(&self, token: &str, now: u64) -> Result<Verified, WebhookError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| unverified("token unreadable"))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(unverified("token algorithm not allowed"));
        }
        let kid = header
            .kid
            .filter(|k| !k.is_empty())
            .ok_or_else(|| unverified("token names no key"))?;
        // Which key document to take the key from depends on the issuer; the issuer read
        // here is checked again on the verified claims.
        let issuer = jsonwebtoken::dangerous::insecure_decode::<Claims>(token)
            .map_err(|_| unverified("token unreadable"))?
            .claims
            .iss;
        let emulator = issuer != CHANNEL_ISSUER;
        let source = if !emulator {
            &self.channel_keys
        } else {
            match &self.emulator_keys {
                Some(k) if EMULATOR_ISSUERS.contains(&issuer.as_str()) => k,
                _ => return Err(unverified("token issuer not trusted")),
            }
        };
        let key = source.key(&self.http, &kid, now).await?;

        let mut validation = Validation::new(header.alg);
        validation.algorithms = ALGORITHMS.to_vec();
        // Time and audience are checked below, against `received_at` and the configured bots.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
            .map_err(|_| unverified("token signature invalid"))?
            .claims;
        if claims.iss != issuer {
            return Err(unverified("token issuer not trusted"));
        }
        Ok(Verified {
            claims,
            key,
            emulator,
            at: now,
        })
    }

    async fn check(&self, req: &WebhookRequest<'_>) -> Result<(), WebhookError> {
        let token = bearer(req.headers)?;
        if req.body.len() > MAX_BODY_BYTES {
            return Err(unverified("body too large"));
        }
        let bound: Bound =
            serde_json::from_slice(req.body).map_err(|_| unverified("body is not an activity"))?;
        let (Some(channel_id), Some(service_url)) = (bound.channel_id, bound.service_url) else {
            return Err(unverified("activity without channelId or serviceUrl"));
        };
        let cached = self
            .signatures()
            .get(token)
            .filter(|v| req.received_at.saturating_sub(v.at) < VERIFIED_TOKEN_SECS)
            .cloned();
        let Verified {
            claims,
            key,
            emulator,
            ..
        } = match cached {
            Some(v) => v,
            None => {
                let v = self.verify_signature(token, req.received_at).await?;
                let mut cache = self.signatures();
                if cache.len() >= VERIFIED_TOKENS_MAX {
                    cache.clear();
                }
                cache.insert(token.to_string(), v.clone());
                v
            }
        };
        let now = req.received_at as f64;
        let exp = claims
            .exp
            .as_f64()
            .filter(|e| e.is_finite())
            .ok_or_else(|| unverified("token expiry unreadable"))?;
        if now > exp + CLOCK_SKEW_SECS {
            return Err(unverified("token expired"));
        }
        if let Some(nbf) = &claims.nbf {
            let nbf = nbf
                .as_f64()
                .filter(|n| n.is_finite())
                .ok_or_else(|| unverified("token start unreadable"))?;
            if now + CLOCK_SKEW_SECS < nbf {
                return Err(unverified("token not valid yet"));
            }
        }
        let app_id = claims
            .app_id()
            .filter(|id| self.app_ids.iter().any(|a| a == id))
            .ok_or_else(|| unverified("token audience is not a configured bot"))?;
        // The Emulator's keys (Entra ID's) carry no endorsements; when a key has some, they
        // bind it to channels as the connector's do.
        let endorsed = key.endorsements.contains(&channel_id);
        if !(endorsed || emulator && key.endorsements.is_empty()) {
            return Err(unverified("signing key not endorsed for the channel"));
        }
        // Emulator tokens name no service URL: the Emulator runs on the developer's machine.
        if !emulator && claims.serviceurl.as_deref() != Some(service_url.as_str()) {
            return Err(unverified("serviceUrl differs from the token's"));
        }
        self.remember(app_id, &service_url);
        Ok(())
    }
}

impl Inbound for BotFrameworkInbound {
    fn paths(&self) -> Vec<String> {
        vec![PATH.to_string()]
    }

    fn verify<'a>(
        &'a self,
        req: &'a WebhookRequest<'a>,
    ) -> BoxFuture<'a, Result<(), WebhookError>> {
        Box::pin(self.check(req))
    }

    fn parse(&self, req: &WebhookRequest<'_>) -> Result<Parsed, WebhookError> {
        parse_activity(self, req)
    }

    /// An `invoke`'s answer is the HTTP response itself: `status` (default 200) and the JSON
    /// `body` the invoking client reads (an adaptive card refresh, a task module, ...).
    fn answer(&self, kind: &str, reply: &Reply) -> Result<WebhookAnswer, String> {
        if kind != REPLY_INVOKE || reply.message.is_some() {
            return Err(
                "respond.message: an invoke's answer is a status and a body; post a message with Send"
                    .into(),
            );
        }
        let status = reply.status.unwrap_or(200);
        if !(200..600).contains(&status) {
            return Err("respond.status: an HTTP status from 200 to 599".into());
        }
        Ok(WebhookAnswer {
            status,
            content_type: "application/json",
            body: reply
                .body
                .as_ref()
                .map(|b| b.to_string().into_bytes())
                .unwrap_or_default(),
        })
    }
}

/// Teams gives a bot 5 s to answer an invoke; the answer is written before that.
const REPLY_INVOKE: &str = "invoke";
const REPLY_INVOKE_WITHIN: Duration = Duration::from_millis(4500);

// ---------------------------------------------------------------------------------------------
// Parse

fn unreadable(reason: impl Into<String>) -> WebhookError {
    WebhookError::Unreadable(reason.into())
}

/// Whether `v` nests deeper than `max` (iteratively: the input decides the depth).
fn too_deep(v: &Value, max: usize) -> bool {
    let mut stack = vec![(v, 1usize)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(a) => Box::new(a.iter()),
            Value::Object(o) => Box::new(o.values()),
            _ => continue,
        };
        if depth > max {
            return true;
        }
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    false
}

fn str_field<'a>(o: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    o.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

fn id_field(o: &Map<String, Value>, key: &str, what: &str) -> Result<Option<String>, WebhookError> {
    match str_field(o, key) {
        Some(s) if s.len() > MAX_ID_BYTES => Err(unreadable(format!("{what} too long"))),
        s => Ok(s.map(str::to_string)),
    }
}

/// A ChannelAccount (`from`, `recipient`, a member) as an identity; `None` without an id.
fn account(v: Option<&Value>, what: &str) -> Result<Option<Identity>, WebhookError> {
    let Some(o) = v.and_then(Value::as_object) else {
        return Ok(None);
    };
    let Some(id) = id_field(o, "id", what)? else {
        return Ok(None);
    };
    Ok(Some(Identity {
        id,
        name: str_field(o, "name").map(str::to_string),
        role: str_field(o, "role").map(str::to_string),
        aad_object_id: id_field(o, "aadObjectId", what)?,
        tenant_id: None,
    }))
}

fn accounts(v: Option<&Value>, what: &str) -> Result<Vec<Identity>, WebhookError> {
    let Some(a) = v.and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    if a.len() > MAX_ITEMS {
        return Err(unreadable(format!("more than {MAX_ITEMS} {what}")));
    }
    a.iter()
        .filter_map(|m| account(Some(m), what).transpose())
        .collect()
}

fn attachment(v: &Value) -> Option<Attachment> {
    let o = v.as_object()?;
    Some(Attachment {
        content_type: str_field(o, "contentType").unwrap_or_default().to_string(),
        content_url: str_field(o, "contentUrl").map(str::to_string),
        name: str_field(o, "name").map(str::to_string),
        thumbnail_url: str_field(o, "thumbnailUrl").map(str::to_string),
        content: o
            .get("content")
            .filter(|c| !c.is_null())
            .map(|c| AttachmentContent::Json(c.clone())),
    })
}

fn rfc3339(o: &Map<String, Value>, key: &str) -> Option<time::OffsetDateTime> {
    str_field(o, key).and_then(|t| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
    })
}

/// `reactionsAdded` / `reactionsRemoved`: the reactions' types (`like`, `heart`).
fn reactions(v: Option<&Value>) -> Result<Vec<String>, WebhookError> {
    let Some(a) = v.and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    if a.len() > MAX_ITEMS {
        return Err(unreadable(format!("more than {MAX_ITEMS} reactions")));
    }
    Ok(a.iter()
        .filter_map(|r| r.get("type").and_then(Value::as_str))
        .filter(|t| !t.is_empty() && t.len() <= MAX_ID_BYTES)
        .map(str::to_string)
        .collect())
}

/// The activity types a v3 bot receives, as the model names them; `None` for types it has
/// no kind for (they are acknowledged and left out).
fn kind(t: &str) -> Option<MessageType> {
    Some(match t {
        "message" => MessageType::Message,
        "typing" => MessageType::Typing,
        "endOfConversation" => MessageType::EndOfConversation,
        "event" => MessageType::Event,
        "conversationUpdate" => MessageType::ConversationUpdate,
        "invoke" => MessageType::Invoke,
        "messageReaction" => MessageType::MessageReaction,
        "messageUpdate" => MessageType::MessageUpdate,
        "messageDelete" => MessageType::MessageDelete,
        "installationUpdate" => MessageType::InstallationUpdate,
        _ => return None,
    })
}

fn parse_activity(
    inbound: &BotFrameworkInbound,
    req: &WebhookRequest<'_>,
) -> Result<Parsed, WebhookError> {
    if req.body.len() > MAX_BODY_BYTES {
        return Err(unreadable("body too large"));
    }
    let activity: Value =
        serde_json::from_slice(req.body).map_err(|_| unreadable("body is not JSON"))?;
    if too_deep(&activity, MAX_DEPTH) {
        return Err(unreadable(format!("nested deeper than {MAX_DEPTH}")));
    }
    let o = activity
        .as_object()
        .ok_or_else(|| unreadable("body is not an activity object"))?;

    let channel_id = str_field(o, "channelId").ok_or_else(|| unreadable("no channelId"))?;
    if !inbound.channel_ids.iter().any(|c| c == channel_id) {
        return Err(unreadable(
            "channelId is not a Bot Framework channel served here",
        ));
    }
    let service_url = str_field(o, "serviceUrl").ok_or_else(|| unreadable("no serviceUrl"))?;
    let activity_type = str_field(o, "type").ok_or_else(|| unreadable("no type"))?;
    let user = account(o.get("from"), "from")?.ok_or_else(|| unreadable("no from.id"))?;
    let recipient =
        account(o.get("recipient"), "recipient")?.ok_or_else(|| unreadable("no recipient.id"))?;
    let conv = o
        .get("conversation")
        .and_then(Value::as_object)
        .ok_or_else(|| unreadable("no conversation"))?;
    let conversation = Conversation {
        id: id_field(conv, "id", "conversation.id")?
            .ok_or_else(|| unreadable("no conversation.id"))?,
        name: str_field(conv, "name").map(str::to_string),
        is_group: conv.get("isGroup").and_then(Value::as_bool),
        conversation_type: str_field(conv, "conversationType").map(str::to_string),
        tenant_id: id_field(conv, "tenantId", "conversation.tenantId")?,
    };
    let activity_id = id_field(o, "id", "id")?;

    // The bot's own activities (an echo of what it sent) are not events for it.
    let own = |id: &str| {
        id == recipient.id
            || inbound
                .app_ids
                .iter()
                .any(|a| a == id || id.strip_prefix("28:") == Some(a.as_str()))
    };
    if own(&user.id) {
        return Ok(Parsed::default());
    }
    let Some(kind) = kind(activity_type) else {
        return Ok(Parsed::default());
    };

    // Credentials are looked up by `address.bot.id` (render's `credential`) and keyed by app
    // id, while the recipient's id is `28:{appId}` on Teams and Skype and a bot handle on Web
    // Chat: the address names the bot by the app id the verified token was issued for.
    let app_id = bot_app_id(inbound, req, &recipient.id)?;
    let bot = Identity {
        id: app_id,
        ..recipient
    };

    let mut msg = Message {
        kind,
        address: Address {
            channel_id: channel_id.to_string(),
            user: Some(user),
            bot: Some(bot),
            conversation: Some(conversation),
            service_url: Some(service_url.to_string()),
            id: activity_id.clone(),
            thread_id: None,
        },
        text: o.get("text").and_then(Value::as_str).map(str::to_string),
        text_format: match str_field(o, "textFormat") {
            Some("plain") => Some(TextFormat::Plain),
            Some("markdown") => Some(TextFormat::Markdown),
            Some("xml") => Some(TextFormat::Xml),
            _ => None,
        },
        text_locale: str_field(o, "locale").map(str::to_string),
        value: o.get("value").filter(|v| !v.is_null()).cloned(),
        value_type: str_field(o, "valueType").map(str::to_string),
        name: str_field(o, "name").map(str::to_string),
        code: str_field(o, "code").map(str::to_string),
        local_timezone: str_field(o, "localTimezone").map(str::to_string),
        ..Default::default()
    };
    if let Some(a) = o.get("attachments").and_then(Value::as_array) {
        if a.len() > MAX_ITEMS {
            return Err(unreadable(format!("more than {MAX_ITEMS} attachments")));
        }
        msg.attachments = a.iter().filter_map(attachment).collect();
    }
    if let Some(e) = o.get("entities").and_then(Value::as_array) {
        if e.len() > MAX_ITEMS {
            return Err(unreadable(format!("more than {MAX_ITEMS} entities")));
        }
        msg.entities = e.iter().filter(|e| e.is_object()).cloned().collect();
    }
    msg.members_added = accounts(o.get("membersAdded"), "membersAdded")?;
    msg.members_removed = accounts(o.get("membersRemoved"), "membersRemoved")?;
    msg.reactions_added = reactions(o.get("reactionsAdded"))?;
    msg.reactions_removed = reactions(o.get("reactionsRemoved"))?;
    msg.timestamp = rfc3339(o, "timestamp");
    msg.local_timestamp = rfc3339(o, "localTimestamp");
    // A reaction names the message it is on in `replyToId`: that is the message the model's
    // `address.id` names for it.
    if kind == MessageType::MessageReaction
        && let Some(target) = id_field(o, "replyToId", "replyToId")?
    {
        msg.address.id = Some(target);
    }

    let dedupe_key = dedupe_key(channel_id, &msg, activity_id.as_deref(), req.body);
    // Keyed by the channel id, as every channel's received events are (the trait's rule).
    msg.source_event.insert(channel_id.to_string(), activity);
    let reply = (kind == MessageType::Invoke).then_some(ReplyWindow {
        kind: REPLY_INVOKE,
        within: REPLY_INVOKE_WITHIN,
    });
    Ok(Parsed {
        events: vec![InboundEvent {
            dedupe_key,
            message: msg,
        }],
        answer: None,
        reply,
    })
}

/// The activity id, within its channel and conversation: the connector's retries repeat it,
/// and Teams' ids (times in milliseconds) are unique only within a conversation. Without an
/// id, a hash of the body (a retry repeats its bytes).
fn dedupe_key(channel_id: &str, msg: &Message, activity_id: Option<&str>, body: &[u8]) -> String {
    let conversation = msg.address.conversation_id().unwrap_or_default();
    match activity_id {
        // The lengths keep `a:b` + `c` apart from `a` + `b:c`.
        Some(id) => format!("{channel_id}:{}:{conversation}:{id}", conversation.len()),
        None => {
            let hex = crate::channels::shared::hex(&Sha256::digest(body));
            format!("{channel_id}:sha256:{hex}")
        }
    }
}

/// The configured app id the call was for: the verified token's (read again here, since
/// `verify` returns nothing); without a readable token, the recipient's id when it names a
/// configured bot (`{appId}` or `28:{appId}`).
fn bot_app_id(
    inbound: &BotFrameworkInbound,
    req: &WebhookRequest<'_>,
    recipient_id: &str,
) -> Result<String, WebhookError> {
    let from_token = bearer(req.headers)
        .ok()
        .and_then(|t| jsonwebtoken::dangerous::insecure_decode::<Claims>(t).ok())
        .and_then(|d| d.claims.app_id().map(str::to_string));
    let from_recipient = || {
        let bare = recipient_id.strip_prefix("28:").unwrap_or(recipient_id);
        inbound.app_ids.iter().find(|a| *a == bare).cloned()
    };
    from_token
        .filter(|id| inbound.app_ids.iter().any(|a| a == id))
        .or_else(from_recipient)
        .ok_or_else(|| unreadable("the activity names no configured bot"))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    /// Test-only RSA key pairs (PKCS#1 DER, made with `openssl genrsa 2048` for these tests;
    /// they sign nothing else): `A` is the connector's published key, `B` an unpublished one.
    const KEY_A: &[u8] = include_bytes!("../../../tests/inbound/botframework/TEST_ONLY_rsa_a.der");
    const KEY_B: &[u8] = include_bytes!("../../../tests/inbound/botframework/TEST_ONLY_rsa_b.der");
    const APP: &str = "bot-app-id";
    const SERVICE_URL: &str = "https://smba.trafficmanager.net/amer/";
    const NOW: u64 = 1_764_000_000;

    /// The public half of `der` as a JWK with `kid` and `endorsements`, as the Bot Connector's
    /// key document lists its keys.
    fn jwk(der: &[u8], kid: &str, endorsements: &[&str]) -> Value {
        let key = EncodingKey::from_rsa_der(der);
        let mut v = serde_json::to_value(
            jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap(),
        )
        .unwrap();
        v["kid"] = json!(kid);
        v["use"] = json!("sig");
        if !endorsements.is_empty() {
            v["endorsements"] = json!(endorsements);
        }
        v
    }

    /// A local issuer: OpenID metadata at `/openid` (and `/emulator/openid`), whose
    /// `jwks_uri` serves the keys held in `keys` (and `emulator_keys`).
    struct Issuer {
        base: String,
        keys: Arc<Mutex<Value>>,
        metadata_hits: Arc<AtomicUsize>,
    }

    async fn issuer() -> Issuer {
        use axum::routing::get;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let keys = Arc::new(Mutex::new(json!({
            "keys": [jwk(KEY_A, "key-a", &["msteams", "skype"])]
        })));
        let emulator_keys = json!({ "keys": [jwk(KEY_A, "emu-a", &[])] });
        let hits = Arc::new(AtomicUsize::new(0));
        let app = axum::Router::new()
            .route(
                "/openid",
                get({
                    let (base, hits) = (base.clone(), hits.clone());
                    move || async move {
                        hits.fetch_add(1, Ordering::SeqCst);
                        axum::Json(json!({
                            "issuer": CHANNEL_ISSUER,
                            "jwks_uri": format!("{base}/keys"),
                            "id_token_signing_alg_values_supported": ["RS256"],
                        }))
                    }
                }),
            )
            .route(
                "/keys",
                get({
                    let keys = keys.clone();
                    move || async move { axum::Json(keys.lock().unwrap().clone()) }
                }),
            )
            .route(
                "/emulator/openid",
                get({
                    let base = base.clone();
                    move || async move {
                        axum::Json(json!({ "jwks_uri": format!("{base}/emulator/keys") }))
                    }
                }),
            )
            .route(
                "/emulator/keys",
                get(move || async move { axum::Json(emulator_keys.clone()) }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Issuer {
            base,
            keys,
            metadata_hits: hits,
        }
    }

    fn config(issuer: &Issuer) -> BotFrameworkConfig {
        BotFrameworkConfig {
            openid_metadata_url: format!("{}/openid", issuer.base),
            emulator_openid_metadata_url: format!("{}/emulator/openid", issuer.base),
            bots: vec![super::super::config::BotCredentials {
                app_id: APP.into(),
                app_password: crate::settings::Secret::new("pw".to_string()),
            }],
            ..Default::default()
        }
    }

    fn inbound(issuer: &Issuer) -> BotFrameworkInbound {
        BotFrameworkInbound::new(&config(issuer), Duration::from_secs(5)).unwrap()
    }

    /// Claims as the Bot Connector issues them to a bot.
    fn claims() -> Value {
        json!({
            "serviceurl": SERVICE_URL,
            "nbf": NOW - 60,
            "exp": NOW + 3600,
            "iss": CHANNEL_ISSUER,
            "aud": APP,
        })
    }

    fn sign_with(claims: &Value, kid: &str, alg: Algorithm, der: &[u8]) -> String {
        let header = Header {
            kid: Some(kid.into()),
            ..Header::new(alg)
        };
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_der(der)).unwrap()
    }

    fn sign(claims: &Value) -> String {
        sign_with(claims, "key-a", Algorithm::RS256, KEY_A)
    }

    fn activity(channel_id: &str, service_url: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "type": "message",
            "id": "1481567603816",
            "timestamp": "2026-11-24T16:00:00.000Z",
            "channelId": channel_id,
            "serviceUrl": service_url,
            "from": {"id": "29:user", "name": "Ann"},
            "recipient": {"id": format!("28:{APP}"), "name": "Bot"},
            "conversation": {"id": "a:1"},
            "text": "hello",
        }))
        .unwrap()
    }

    async fn verify_at(
        inb: &BotFrameworkInbound,
        authorization: Option<&str>,
        body: &[u8],
        received_at: u64,
    ) -> Result<(), WebhookError> {
        let mut headers = http::HeaderMap::new();
        if let Some(a) = authorization {
            headers.insert(http::header::AUTHORIZATION, a.parse().unwrap());
        }
        let req = WebhookRequest {
            method: &http::Method::POST,
            path: PATH,
            query: None,
            headers: &headers,
            body,
            received_at,
        };
        inb.verify(&req).await
    }

    async fn verify(
        inb: &BotFrameworkInbound,
        token: &str,
        body: &[u8],
    ) -> Result<(), WebhookError> {
        verify_at(inb, Some(&format!("Bearer {token}")), body, NOW).await
    }

    /// The reasons are fixed phrases: compared whole.
    fn refused(r: Result<(), WebhookError>, reason: &'static str) {
        assert_eq!(r, Err(WebhookError::Unverified(reason)));
    }

    /// Base64url without padding, as JWTs write their parts.
    fn b64(v: &Value) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = serde_json::to_vec(v).unwrap();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(char::from(A[(n >> (18 - 6 * i) & 63) as usize]));
            }
        }
        out
    }

    #[tokio::test]
    async fn a_token_the_connector_signed_verifies_and_its_service_url_is_remembered() {
        let iss = issuer().await;
        let inb = inbound(&iss);
        let body = activity("msteams", SERVICE_URL);
        assert!(!inb.service_url_verified(APP, SERVICE_URL));
        verify(&inb, &sign(&claims()), &body).await.unwrap();
        assert!(inb.service_url_verified(APP, SERVICE_URL));
        assert!(!inb.service_url_verified("other-app", SERVICE_URL));
        for alg in [Algorithm::RS384, Algorithm::RS512] {
            verify(&inb, &sign_with(&claims(), "key-a", alg, KEY_A), &body)
                .await
                .unwrap();
        }
        // The keys were fetched once for all three.
        assert_eq!(iss.metadata_hits.load(Ordering::SeqCst), 1);
        // "bearer" is a scheme name: any case.
        verify_at(
            &inb,
            Some(&format!("bearer {}", sign(&claims()))),
            &body,
            NOW,
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn claims_that_do_not_name_this_bot_channel_or_time_are_refused() {
        let iss = issuer().await;
        let inb = inbound(&iss);
        let body = activity("msteams", SERVICE_URL);
        let with = |k: &str, v: Value| {
            let mut c = claims();
            c[k] = v;
            sign(&c)
        };
        refused(
            verify(&inb, &with("aud", json!("another-bot")), &body).await,
            "token audience is not a configured bot",
        );
        refused(
            verify(&inb, &with("iss", json!("https://attacker.example")), &body).await,
            "token issuer not trusted",
        );
        // The Emulator's issuers only when configured.
        refused(
            verify(&inb, &with("iss", json!(EMULATOR_ISSUERS[0])), &body).await,
            "token issuer not trusted",
        );
        // Expired beyond the 5 minutes of skew, and within them.
        refused(
            verify(&inb, &with("exp", json!(NOW - 301)), &body).await,
            "token expired",
        );
        verify(&inb, &with("exp", json!(NOW - 299)), &body)
            .await
            .unwrap();
        refused(
            verify(&inb, &with("nbf", json!(NOW + 301)), &body).await,
            "token not valid yet",
        );
        verify(&inb, &with("nbf", json!(NOW + 299)), &body)
            .await
            .unwrap();
        // An expiry that is not a number is not a missing one.
        refused(
            verify(&inb, &with("exp", json!("never")), &body).await,
            "token unreadable",
        );
        // The service URL claim must be there and equal the activity's.
        refused(
            verify(
                &inb,
                &with("serviceurl", json!("https://attacker.example/")),
                &body,
            )
            .await,
            "serviceUrl differs from the token's",
        );
        let mut c = claims();
        c.as_object_mut().unwrap().remove("serviceurl");
        refused(
            verify(&inb, &sign(&c), &body).await,
            "serviceUrl differs from the token's",
        );
    }

    #[tokio::test]
    async fn the_signing_key_must_be_endorsed_for_the_activity_channel() {
        let iss = issuer().await;
        let inb = inbound(&iss);
        // key-a is endorsed for msteams and skype only.
        verify(&inb, &sign(&claims()), &activity("skype", SERVICE_URL))
            .await
            .unwrap();
        refused(
            verify(&inb, &sign(&claims()), &activity("webchat", SERVICE_URL)).await,
            "signing key not endorsed for the channel",
        );
    }

    #[test]
    fn a_trusted_service_url_covers_only_the_paths_below_it() {
        let t = TrustedServiceUrls::default();
        t.insert("bot", "https://smba.example.net");
        t.insert("bot", "https://svc.example.org/amer/");
        assert!(t.covers(
            "bot",
            "https://smba.example.net/v3/conversations/a/activities"
        ));
        assert!(t.covers("bot", "https://svc.example.org/amer/v3/conversations"));
        assert!(!t.covers("bot", "https://smba.example.net.evil.test/v3/conversations"));
        assert!(!t.covers("bot", "https://smba.example.netx/v3"));
        assert!(!t.covers("other-bot", "https://smba.example.net/v3/conversations"));
    }

    #[tokio::test]
    async fn a_token_verified_once_is_still_checked_against_each_call_and_the_clock() {
        let iss = issuer().await;
        let inb = inbound(&iss);
        let token = sign(&claims());
        verify(&inb, &token, &activity("msteams", SERVICE_URL))
            .await
            .unwrap();
        // The signature is not checked again, but what depends on the call is.
        refused(
            verify(&inb, &token, &activity("msteams", "https://other.example/")).await,
            "serviceUrl differs from the token's",
        );
        refused(
            verify(&inb, &token, &activity("webchat", SERVICE_URL)).await,
            "signing key not endorsed for the channel",
        );
        refused(
            verify_at(
                &inb,
                Some(&format!("Bearer {token}")),
                &activity("msteams", SERVICE_URL),
                NOW + 3600 + 600,
            )
            .await,
            "token expired",
        );
        // A token that differs by one character of its signature is not the verified one.
        let mut forged: Vec<char> = token.chars().collect();
        let i = forged.len() - 10;
        forged[i] = if forged[i] == 'A' { 'B' } else { 'A' };
        let forged: String = forged.into_iter().collect();
        refused(
            verify(&inb, &forged, &activity("msteams", SERVICE_URL)).await,
            "token signature invalid",
        );
    }

    #[tokio::test]
    async fn a_call_without_a_bearer_token_or_with_another_algorithm_is_refused() {
        let iss = issuer().await;
        let inb = inbound(&iss);
        let body = activity("msteams", SERVICE_URL);
        refused(
            verify_at(&inb, None, &body, NOW).await,
            "no Authorization header",
        );
        refused(
            verify_at(&inb, Some("Basic dXNlcjpwdw=="), &body, NOW).await,
            "Authorization is not a bearer token",
        );
        refused(
            verify_at(&inb, Some("Bearer "), &body, NOW).await,
            "Authorization is not a bearer token",
        );
        // HS256 with the public key's bytes as the secret: the classic key confusion.
        let hs = jsonwebtoken::encode(
            &Header {
                kid: Some("key-a".into()),
                ..Header::new(Algorithm::HS256)
            },
            &claims(),
            &EncodingKey::from_secret(KEY_A),
        )
        .unwrap();
        refused(
            verify(&inb, &hs, &body).await,
            "token algorithm not allowed",
        );
        // `alg: none`, unsigned: not even a known algorithm.
        let none = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "kid": "key-a"})),
            b64(&claims())
        );
        refused(verify(&inb, &none, &body).await, "token unreadable");
        refused(verify(&inb, "not.a.jwt", &body).await, "token unreadable");
        // Signed by a key that is not the one it names.
        refused(
            verify(
                &inb,
                &sign_with(&claims(), "key-a", Algorithm::RS256, KEY_B),
                &body,
            )
            .await,
            "token signature invalid",
        );
        // A token signed, then its claims changed.
        let good = sign(&claims());
        let mut parts: Vec<&str> = good.split('.').collect();
        let mut forged = claims();
        forged["aud"] = json!(APP);
        forged["exp"] = json!(NOW + 999_999);
        let forged = b64(&forged);
        parts[1] = &forged;
        refused(
            verify(&inb, &parts.join("."), &body).await,
            "token signature invalid",
        );
    }

    #[tokio::test]
    async fn the_token_binds_channel_id_and_service_url_not_the_rest_of_the_body() {
        let iss = issuer().await;
        let inb = inbound(&iss);
        let token = sign(&claims());
        // The JWT does not sign the body: a changed text (here non-ASCII) still verifies. What
        // matters, and is checked, is where a reply would go and for which channel.
        let mut changed: Value = serde_json::from_slice(&activity("msteams", SERVICE_URL)).unwrap();
        changed["text"] = json!("Überweisung an 🦀 bestätigt");
        verify(&inb, &token, &serde_json::to_vec(&changed).unwrap())
            .await
            .unwrap();
        refused(
            verify(
                &inb,
                &token,
                &activity("msteams", "https://attacker.example/"),
            )
            .await,
            "serviceUrl differs from the token's",
        );
        refused(
            verify(&inb, &token, &activity("webchat", SERVICE_URL)).await,
            "signing key not endorsed for the channel",
        );
        // A second `serviceUrl` key cannot make verification and parsing read different URLs.
        let twice = format!(
            r#"{{"channelId":"msteams","serviceUrl":"{SERVICE_URL}","serviceUrl":"https://attacker.example/"}}"#
        );
        refused(
            verify(&inb, &token, twice.as_bytes()).await,
            "body is not an activity",
        );
        refused(
            verify(&inb, &token, br#"{"channelId":"msteams"}"#).await,
            "activity without channelId or serviceUrl",
        );
    }

    #[tokio::test]
    async fn an_unknown_key_fetches_the_keys_once_per_five_minutes_at_most() {
        let iss = issuer().await;
        let inb = inbound(&iss);
        let body = activity("msteams", SERVICE_URL);
        let hits = || iss.metadata_hits.load(Ordering::SeqCst);
        verify(&inb, &sign(&claims()), &body).await.unwrap();
        assert_eq!(hits(), 1);
        let unknown = |kid: &str| sign_with(&claims(), kid, Algorithm::RS256, KEY_B);
        // One fetch for the unknown key, then refused.
        refused(
            verify(&inb, &unknown("key-b"), &body).await,
            "token signed with an unknown key",
        );
        assert_eq!(hits(), 2);
        // Another unknown key within 5 minutes: no fetch.
        refused(
            verify(&inb, &unknown("key-c"), &body).await,
            "token signed with an unknown key",
        );
        refused(
            verify_at(
                &inb,
                Some(&format!("Bearer {}", unknown("key-d"))),
                &body,
                NOW + 299,
            )
            .await,
            "token signed with an unknown key",
        );
        assert_eq!(hits(), 2);
        assert_eq!(inb.key_fetches().await, 2);
        // The connector rolls key-b in; 5 minutes later an unknown key fetches again, and finds it.
        iss.keys
            .lock()
            .unwrap()
            .get_mut("keys")
            .and_then(Value::as_array_mut)
            .unwrap()
            .push(jwk(KEY_B, "key-b", &["msteams"]));
        verify_at(
            &inb,
            Some(&format!("Bearer {}", unknown("key-b"))),
            &body,
            NOW + 300,
        )
        .await
        .unwrap();
        assert_eq!(hits(), 3);
        // Known keys are used without a fetch until a day has passed.
        verify_at(
            &inb,
            Some(&format!("Bearer {}", sign(&claims()))),
            &body,
            NOW + 3000,
        )
        .await
        .unwrap();
        assert_eq!(hits(), 3);
        let mut later = claims();
        later["exp"] = json!(NOW + 2 * 86_400);
        verify_at(
            &inb,
            Some(&format!("Bearer {}", sign(&later))),
            &body,
            NOW + 86_400 + 300,
        )
        .await
        .unwrap();
        assert_eq!(hits(), 4);
    }

    #[tokio::test]
    async fn unreachable_keys_refuse_and_are_not_fetched_again_at_once() {
        let mut c = BotFrameworkConfig {
            openid_metadata_url: "http://127.0.0.1:9/openid".into(),
            ..Default::default()
        };
        c.app_id = Some(APP.into());
        c.app_password = Some(crate::settings::Secret::new("pw".to_string()));
        let inb = BotFrameworkInbound::new(&c, Duration::from_secs(2)).unwrap();
        let body = activity("msteams", SERVICE_URL);
        for _ in 0..3 {
            refused(
                verify(&inb, &sign(&claims()), &body).await,
                "token signed with an unknown key",
            );
        }
        assert_eq!(inb.key_fetches().await, 1);
    }

    #[tokio::test]
    async fn emulator_tokens_verify_only_when_allowed() {
        let iss = issuer().await;
        let mut c = config(&iss);
        c.allow_emulator_tokens = true;
        let inb = BotFrameworkInbound::new(&c, Duration::from_secs(5)).unwrap();
        let body = activity("emulator", "http://localhost:56789");
        // A v1 Emulator token names the bot in `appid`; its keys have no endorsements and it
        // names no service URL.
        let v1 = json!({
            "iss": EMULATOR_ISSUERS[0], "aud": APP, "appid": APP, "ver": "1.0",
            "nbf": NOW - 60, "exp": NOW + 3600,
        });
        let token = sign_with(&v1, "emu-a", Algorithm::RS256, KEY_A);
        verify(&inb, &token, &body).await.unwrap();
        let mut v2 = v1.clone();
        v2["iss"] = json!(EMULATOR_ISSUERS[1]);
        v2["ver"] = json!("2.0");
        v2["azp"] = json!("another-bot");
        refused(
            verify(
                &inb,
                &sign_with(&v2, "emu-a", Algorithm::RS256, KEY_A),
                &body,
            )
            .await,
            "token audience is not a configured bot",
        );
        // The Emulator's keys do not sign for the Bot Connector's issuer.
        let mut forged = claims();
        forged["serviceurl"] = json!("http://localhost:56789");
        refused(
            verify(
                &inb,
                &sign_with(&forged, "emu-a", Algorithm::RS256, KEY_A),
                &body,
            )
            .await,
            "token signed with an unknown key",
        );
        // Off: the same token is refused.
        refused(
            verify(&inbound(&iss), &token, &body).await,
            "token issuer not trusted",
        );
    }

    // -----------------------------------------------------------------------------------------
    // Parse

    fn payload(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/inbound/botframework/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    /// An inbound for `APP` whose key source is never reached (parse does no I/O).
    fn parser() -> BotFrameworkInbound {
        let c = BotFrameworkConfig {
            app_id: Some(APP.into()),
            app_password: Some(crate::settings::Secret::new("pw".to_string())),
            ..Default::default()
        };
        BotFrameworkInbound::new(&c, Duration::from_secs(5)).unwrap()
    }

    fn parse_with(
        inb: &BotFrameworkInbound,
        token: Option<&str>,
        body: &[u8],
    ) -> Result<Parsed, WebhookError> {
        let mut headers = http::HeaderMap::new();
        if let Some(t) = token {
            headers.insert(
                http::header::AUTHORIZATION,
                format!("Bearer {t}").parse().unwrap(),
            );
        }
        let req = WebhookRequest {
            method: &http::Method::POST,
            path: PATH,
            query: None,
            headers: &headers,
            body,
            received_at: NOW,
        };
        inb.parse(&req)
    }

    /// The one event of a verified call (the connector's token names `APP`).
    fn parse_one(body: &[u8]) -> InboundEvent {
        let parsed = parse_with(&parser(), Some(&sign(&claims())), body).unwrap();
        assert_eq!(parsed.answer, None);
        assert_eq!(parsed.events.len(), 1);
        parsed.events.into_iter().next().unwrap()
    }

    fn ts(s: &str) -> Option<time::OffsetDateTime> {
        Some(
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap(),
        )
    }

    const USER: &str = "29:1XJKJMvc5GBtc2JwZq0oj8tHZmzrQgFmB39ATiQWA85gQtHieVkKilBZ9XHoq9j7Zaqt7CZ-NJWi7me2kHTL3Bw";
    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

    /// What a bot sends back with the address it received.
    fn reply_url(ev: &InboundEvent) -> (String, String) {
        let reply = Message {
            address: ev.message.address.clone(),
            text: Some("echo".into()),
            ..Default::default()
        };
        let r = super::super::render::render_send(&reply).unwrap();
        (r.requests[0].url.clone(), r.requests[0].credential.clone())
    }

    #[test]
    fn a_teams_channel_message_with_a_mention_maps_every_field_and_replies_in_its_thread() {
        let body = payload("teams_message_mention.json");
        let ev = parse_one(&body);
        let m = &ev.message;
        assert_eq!(m.kind, MessageType::Message);
        assert_eq!(
            m.text.as_deref(),
            Some("<at>Echo Bot</at> Grüße, how are you?")
        );
        assert_eq!(m.text_format, Some(TextFormat::Plain));
        assert_eq!(m.text_locale.as_deref(), Some("en-US"));
        assert_eq!(m.timestamp, ts("2026-11-24T16:00:00.123Z"));
        assert_eq!(m.local_timestamp, ts("2026-11-24T17:00:00.123+01:00"));
        assert_eq!(m.local_timezone.as_deref(), Some("Europe/Berlin"));
        assert_eq!(m.entities.len(), 2);
        assert_eq!(m.entities[0]["type"], "mention");
        assert_eq!(m.entities[0]["mentioned"]["id"], "28:bot-app-id");
        assert_eq!(m.entities[0]["text"], "<at>Echo Bot</at>");
        let a = &m.address;
        assert_eq!(a.channel_id, "msteams");
        assert_eq!(
            a.user,
            Some(Identity {
                id: USER.into(),
                name: Some("Megan Bowen".into()),
                aad_object_id: Some("6a4b2c9e-1d2f-4e8a-9b7c-3d5e6f708192".into()),
                ..Default::default()
            })
        );
        // The bot by its app id (its credentials' key); its name as the activity gave it.
        assert_eq!(
            a.bot,
            Some(Identity {
                id: APP.into(),
                name: Some("Echo Bot".into()),
                ..Default::default()
            })
        );
        assert_eq!(
            a.conversation,
            Some(Conversation {
                id: "19:c0a8d5f1e2b34c6d9e8f7a6b5c4d3e2f@thread.tacv2;messageid=1764000000123"
                    .into(),
                is_group: Some(true),
                conversation_type: Some("channel".into()),
                tenant_id: Some(TENANT.into()),
                name: None,
            })
        );
        assert_eq!(
            a.service_url.as_deref(),
            Some("https://smba.trafficmanager.net/amer/")
        );
        assert_eq!(a.id.as_deref(), Some("1764000000123"));
        assert_eq!(a.thread_id, None);
        // The whole activity as received, channelData included.
        let native: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(m.source_event.get("msteams"), Some(&native));
        assert_eq!(m.source_event.len(), 1);
        assert_eq!(
            ev.dedupe_key,
            format!(
                "msteams:{}:{}:1764000000123",
                a.conversation_id().unwrap().len(),
                a.conversation_id().unwrap()
            )
        );
        let (url, credential) = reply_url(&ev);
        assert_eq!(
            url,
            "https://smba.trafficmanager.net/amer/v3/conversations/\
             19%3Ac0a8d5f1e2b34c6d9e8f7a6b5c4d3e2f%40thread.tacv2%3Bmessageid%3D1764000000123\
             /activities/1764000000123"
        );
        assert_eq!(credential, APP);
    }

    #[test]
    fn a_conversation_update_lists_the_members_added() {
        let ev = parse_one(&payload("teams_conversation_update.json"));
        let m = &ev.message;
        assert_eq!(m.kind, MessageType::ConversationUpdate);
        assert_eq!(
            m.members_added,
            vec![
                Identity {
                    id: "28:bot-app-id".into(),
                    ..Default::default()
                },
                Identity {
                    id: "29:1AbCdEfGhIjKlMnOpQrStUvWxYz".into(),
                    aad_object_id: Some("0e1f2a3b-4c5d-6e7f-8091-a2b3c4d5e6f7".into()),
                    ..Default::default()
                },
            ]
        );
        assert!(m.members_removed.is_empty());
        assert_eq!(m.timestamp, ts("2026-11-24T16:05:00.000Z"));
        assert_eq!(m.text, None);
        assert_eq!(m.address.user_id(), USER);
        assert_eq!(m.address.bot_id(), APP);
        assert_eq!(
            m.source_event["msteams"]["channelData"]["eventType"],
            "teamMemberAdded"
        );
        let (url, _) = reply_url(&ev);
        assert_eq!(
            url,
            "https://smba.trafficmanager.net/emea/v3/conversations/\
             19%3Ac0a8d5f1e2b34c6d9e8f7a6b5c4d3e2f%40thread.tacv2\
             /activities/f%3A2b6d3b1c-8f0e-4c5a-9d7e-1a2b3c4d5e6f"
        );
    }

    #[test]
    fn an_invoke_keeps_its_name_and_value() {
        let ev = parse_one(&payload("teams_invoke.json"));
        let m = &ev.message;
        assert_eq!(m.kind, MessageType::Invoke);
        assert_eq!(m.name.as_deref(), Some("adaptiveCard/action"));
        assert_eq!(m.value.as_ref().unwrap()["action"]["verb"], "approve");
        assert_eq!(m.value.as_ref().unwrap()["action"]["data"]["request"], 42);
        assert_eq!(m.entities[0]["type"], "clientInfo");
        let c = m.address.conversation.as_ref().unwrap();
        assert_eq!(c.conversation_type.as_deref(), Some("personal"));
        assert_eq!(c.is_group, None);
        assert_eq!(c.tenant_id.as_deref(), Some(TENANT));
        // An invoke is answered as itself: its own id is the reply target.
        assert_eq!(
            m.address.id.as_deref(),
            Some("f:9c8b7a6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d")
        );
        let (url, _) = reply_url(&ev);
        assert_eq!(
            url,
            "https://smba.trafficmanager.net/amer/v3/conversations/a%3A1Xy2Zw3Vu4Ts5Rq6Po7Nm8Lk9Ji0Hg\
             /activities/f%3A9c8b7a6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
        );
    }

    #[test]
    fn a_message_reaction_names_its_types_and_the_message_reacted_to() {
        let ev = parse_one(&payload("teams_message_reaction.json"));
        let m = &ev.message;
        assert_eq!(m.kind, MessageType::MessageReaction);
        assert_eq!(m.reactions_added, vec!["like".to_string(), "heart".into()]);
        assert!(m.reactions_removed.is_empty());
        assert_eq!(m.address.id.as_deref(), Some("1764000000456"));
        // The reaction's own id is what the connector repeats on a retry.
        assert!(
            ev.dedupe_key.ends_with(":1764000000789"),
            "{}",
            ev.dedupe_key
        );
        let (url, _) = reply_url(&ev);
        assert_eq!(
            url,
            "https://smba.trafficmanager.net/amer/v3/conversations/a%3A1Xy2Zw3Vu4Ts5Rq6Po7Nm8Lk9Ji0Hg\
             /activities/1764000000456"
        );
    }

    fn minimal() -> Value {
        json!({
            "type": "message",
            "id": "5",
            "channelId": "webchat",
            "serviceUrl": "https://webchat.botframework.com/",
            "from": {"id": "dl_123", "name": "You"},
            // Web Chat names the bot by its handle, not its app id.
            "recipient": {"id": "echo-bot-handle", "name": "Echo"},
            "conversation": {"id": "Dk4WDCV2mCx1bvTqY8Jnuq-us"},
            "text": "hi",
        })
    }

    #[test]
    fn the_bot_is_named_by_the_token_audience_or_by_a_recipient_that_names_it() {
        let inb = parser();
        let body = serde_json::to_vec(&minimal()).unwrap();
        let ev = &parse_with(&inb, Some(&sign(&claims())), &body)
            .unwrap()
            .events[0];
        assert_eq!(ev.message.address.bot_id(), APP);
        assert_eq!(
            ev.message.address.bot.as_ref().unwrap().name.as_deref(),
            Some("Echo")
        );
        // Without a token (the contract calls parse after verify), a `28:` recipient still
        // names the configured bot; a handle does not.
        assert_eq!(
            parse_with(&inb, None, &body),
            Err(WebhookError::Unreadable(
                "the activity names no configured bot".into()
            ))
        );
        let mut v = minimal();
        v["recipient"]["id"] = json!(format!("28:{APP}"));
        let ev = &parse_with(&inb, None, &serde_json::to_vec(&v).unwrap())
            .unwrap()
            .events[0];
        assert_eq!(ev.message.address.bot_id(), APP);
    }

    #[test]
    fn the_bots_own_activities_and_unknown_types_are_left_out() {
        let inb = parser();
        let token = sign(&claims());
        for from in [
            format!("28:{APP}"),
            APP.to_string(),
            "echo-bot-handle".into(),
        ] {
            let mut v = minimal();
            v["from"] = json!({"id": from, "role": "bot"});
            let parsed = parse_with(&inb, Some(&token), &serde_json::to_vec(&v).unwrap()).unwrap();
            assert!(parsed.events.is_empty(), "{from}");
        }
        let mut v = minimal();
        v["type"] = json!("trace");
        let parsed = parse_with(&inb, Some(&token), &serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(parsed.events.is_empty());
    }

    #[test]
    fn a_channel_not_served_here_or_a_hostile_body_is_unreadable() {
        let inb = parser();
        let token = sign(&claims());
        let parse = |v: &Value| parse_with(&inb, Some(&token), &serde_json::to_vec(v).unwrap());
        let mut v = minimal();
        v["channelId"] = json!("slack");
        assert!(matches!(parse(&v), Err(WebhookError::Unreadable(_))));
        for key in ["serviceUrl", "from", "recipient", "conversation", "type"] {
            let mut v = minimal();
            v.as_object_mut().unwrap().remove(key);
            assert!(
                matches!(parse(&v), Err(WebhookError::Unreadable(_))),
                "{key}"
            );
        }
        let mut v = minimal();
        v["conversation"]["id"] = json!("x".repeat(MAX_ID_BYTES + 1));
        assert!(matches!(parse(&v), Err(WebhookError::Unreadable(_))));
        let mut v = minimal();
        v["entities"] = json!(vec![json!({"type": "mention"}); MAX_ITEMS + 1]);
        assert!(matches!(parse(&v), Err(WebhookError::Unreadable(_))));
        let mut v = minimal();
        v["membersAdded"] = json!(vec![json!({"id": "29:x"}); MAX_ITEMS + 1]);
        assert!(matches!(parse(&v), Err(WebhookError::Unreadable(_))));
        let mut deep = json!("bottom");
        for _ in 0..MAX_DEPTH {
            deep = json!([deep]);
        }
        let mut v = minimal();
        v["channelData"] = deep;
        assert!(matches!(parse(&v), Err(WebhookError::Unreadable(_))));
        // Far deeper than serde_json's own limit: refused, not a stack overflow.
        let bomb = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(
            parse_with(&inb, Some(&token), bomb.as_bytes()),
            Err(WebhookError::Unreadable(_))
        ));
        assert!(matches!(
            parse_with(&inb, Some(&token), &vec![b' '; MAX_BODY_BYTES + 1]),
            Err(WebhookError::Unreadable(_))
        ));
    }

    #[test]
    fn an_activity_without_an_id_is_deduplicated_by_its_bytes() {
        let inb = parser();
        let token = sign(&claims());
        let mut v = minimal();
        v.as_object_mut().unwrap().remove("id");
        let body = serde_json::to_vec(&v).unwrap();
        let a = parse_with(&inb, Some(&token), &body).unwrap().events[0].clone();
        let b = parse_with(&inb, Some(&token), &body).unwrap().events[0].clone();
        assert_eq!(a.dedupe_key, b.dedupe_key);
        assert!(
            a.dedupe_key.starts_with("webchat:sha256:"),
            "{}",
            a.dedupe_key
        );
        assert_eq!(a.message.address.id, None);
        v["text"] = json!("other");
        let c = parse_with(&inb, Some(&token), &serde_json::to_vec(&v).unwrap()).unwrap();
        assert_ne!(c.events[0].dedupe_key, a.dedupe_key);
        // Ids are unique per conversation only: the same id elsewhere is another event.
        let mut d = minimal();
        d["conversation"]["id"] = json!("another");
        let d = parse_with(&inb, Some(&token), &serde_json::to_vec(&d).unwrap()).unwrap();
        let e = parse_with(&inb, Some(&token), &serde_json::to_vec(&minimal()).unwrap()).unwrap();
        assert_ne!(d.events[0].dedupe_key, e.events[0].dedupe_key);
    }

    #[test]
    fn attachments_sent_by_the_user_keep_url_type_and_name() {
        let mut v = minimal();
        v["attachments"] = json!([
            {"contentType": "image/png", "contentUrl": "https://webchat.botframework.com/attachments/x/0", "name": "cat.png", "thumbnailUrl": "https://webchat.botframework.com/t/0"},
            {"contentType": "application/vnd.microsoft.teams.file.download.info", "name": "report.pdf", "content": {"downloadUrl": "https://contoso.sharepoint.com/x", "fileType": "pdf"}},
            "not an attachment"
        ]);
        let ev = parse_one(&serde_json::to_vec(&v).unwrap());
        let a = &ev.message.attachments;
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].content_type, "image/png");
        assert_eq!(
            a[0].content_url.as_deref(),
            Some("https://webchat.botframework.com/attachments/x/0")
        );
        assert_eq!(a[0].name.as_deref(), Some("cat.png"));
        assert_eq!(
            a[0].thumbnail_url.as_deref(),
            Some("https://webchat.botframework.com/t/0")
        );
        assert_eq!(
            a[1].content,
            Some(AttachmentContent::Json(
                json!({"downloadUrl": "https://contoso.sharepoint.com/x", "fileType": "pdf"})
            ))
        );
    }
}
