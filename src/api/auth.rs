//! Caller authentication and per-caller limits for the ChannelGateway service.
//!
//! Owns who a caller is (a bearer token, or an mTLS client certificate, matched by SHA-256) and
//! which bot ids it may send as. Health and reflection stay open for probes. Tokens are compared
//! as hashes and never logged.
//!
//! Unknown credentials are throttled per peer address before any per-caller limit applies (a
//! caller is only known once authenticated), and their WARN lines are rate-limited. Every map
//! keyed by something a peer chooses (its address, an unauthenticated caller) is bounded.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use crate::config::{AuthConfig, LimitsConfig};
use crate::log_limit::LogLimit;

/// Most peers (or unauthenticated callers) whose buckets are kept: ~100 bytes each.
pub const MAX_TRACKED: usize = 10_000;

/// Token buckets by key, all with one rate, at most `cap` of them: a key that must make room
/// takes it from full buckets (idle long enough to have refilled, so dropping them changes
/// nothing), else from the least recently used half.
struct Buckets<K> {
    per_second: f64,
    burst: f64,
    cap: usize,
    map: Mutex<HashMap<K, Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn new(per_second: f64, burst: u32, cap: usize) -> Self {
        Self {
            per_second,
            burst: f64::from(burst.max(1)),
            cap: cap.max(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    fn refilled(&self, b: &Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        (b.tokens + elapsed * self.per_second).min(self.burst)
    }

    /// Whether `key` has a token now, without taking it.
    fn has_token(&self, key: &K, now: Instant) -> bool {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).is_none_or(|b| self.refilled(b, now) >= 1.0)
    }

    /// Takes a token of `key` if one is there now.
    fn try_take(&self, key: &K, now: Instant) -> bool {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(key) && map.len() >= self.cap {
            self.make_room(&mut map, now);
        }
        let b = map.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        b.tokens = self.refilled(b, now);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Called only when full; frees at least half the map, so its cost is spread over as many
    /// new keys.
    fn make_room(&self, map: &mut HashMap<K, Bucket>, now: Instant) {
        map.retain(|_, b| self.refilled(b, now) < self.burst);
        if map.len() <= self.cap / 2 {
            return;
        }
        let mut lasts: Vec<Instant> = map.values().map(|b| b.last).collect();
        let keep = self.cap / 2;
        let cut = lasts.len().saturating_sub(keep);
        let (_, newest_dropped, _) = lasts.select_nth_unstable(cut.saturating_sub(1));
        let cutoff = *newest_dropped;
        map.retain(|_, b| b.last > cutoff);
    }

    fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The part of a peer's address its failures are counted under: an IPv6 peer usually holds a
/// whole /64, so one address each would not slow it down.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(
                seg[0], seg[1], seg[2], seg[3], 0, 0, 0, 0,
            ))
        }
    }
}

/// Lowercase hex SHA-256. Every authenticated call hashes its token: the digits come from a
/// table rather than a `format!` per byte.
pub fn sha256_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for b in Sha256::digest(bytes) {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Who is calling, once authenticated. Made for every call, so it shares the configured
/// identity instead of copying its name and bot list, and an unauthenticated caller's address
/// is written out only when a message names it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `None` when authentication is off: any bot, named by its address.
    identity: Option<Arc<Identity>>,
    remote: Option<IpAddr>,
}

impl Caller {
    pub fn may_send_as(&self, bot_id: &str) -> bool {
        self.bots().is_none_or(|b| b.iter().any(|x| x == bot_id))
    }

    pub fn any_bot(&self) -> bool {
        self.bots().is_none()
    }

    /// The bots it may act as; `None`: any bot.
    pub fn bots(&self) -> Option<&[String]> {
        self.identity.as_ref().and_then(|i| i.bots.as_deref())
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.identity, self.remote) {
            (Some(i), _) => f.write_str(&i.name),
            (None, Some(ip)) => write!(f, "{ip}"),
            (None, None) => f.write_str("local"),
        }
    }
}

/// The peer's TLS client certificate fingerprint, put in request extensions by the listener.
#[derive(Debug, Clone)]
pub struct ClientCertFingerprint(pub String);

#[derive(Debug)]
struct Identity {
    name: String,
    bots: Option<Vec<String>>,
}

fn identity(name: &str, bots: &[String]) -> Arc<Identity> {
    Arc::new(Identity {
        name: name.to_string(),
        bots: if bots.iter().any(|b| b == "*") {
            None
        } else {
            Some(bots.to_vec())
        },
    })
}

/// Authenticates calls and applies the per-caller rate limit.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<AuthInner>,
}

struct AuthInner {
    enabled: bool,
    tokens: HashMap<String, Arc<Identity>>,
    certs: HashMap<String, Arc<Identity>>,
    limits: LimitsConfig,
    /// Per caller (`limits.per_caller_*`): a configured identity, or an unauthenticated peer.
    rates: Buckets<String>,
    /// Unknown credentials per peer address (`limits.failed_auth_*`); `None` when off.
    failures: Option<Buckets<IpAddr>>,
    unknown_log: LogLimit,
    throttled_log: LogLimit,
}

impl Authenticator {
    pub fn new(auth: &AuthConfig, limits: &LimitsConfig) -> Self {
        let tokens = auth
            .tokens
            .iter()
            .map(|t| (t.sha256.to_ascii_lowercase(), identity(&t.name, &t.bots)))
            .collect();
        let certs = auth
            .clients
            .iter()
            .map(|c| {
                (
                    c.cert_sha256.to_ascii_lowercase().replace(':', ""),
                    identity(&c.name, &c.bots),
                )
            })
            .collect();
        Self {
            inner: Arc::new(AuthInner {
                enabled: auth.is_configured(),
                tokens,
                certs,
                limits: limits.clone(),
                rates: Buckets::new(
                    limits.per_caller_per_second,
                    limits.per_caller_burst,
                    MAX_TRACKED,
                ),
                failures: (limits.failed_auth_per_second > 0.0).then(|| {
                    Buckets::new(
                        limits.failed_auth_per_second,
                        limits.failed_auth_burst,
                        MAX_TRACKED,
                    )
                }),
                unknown_log: LogLimit::new(Duration::from_secs(1)),
                throttled_log: LogLimit::new(Duration::from_secs(1)),
            }),
        }
    }

    /// Callers whose per-caller buckets are kept now (at most `MAX_TRACKED`).
    pub fn tracked_callers(&self) -> usize {
        self.inner.rates.len()
    }

    /// The interceptor: finds the caller, checks its rate, and leaves a `Caller` in the
    /// request's extensions for the service to authorize bot ids against.
    #[allow(clippy::result_large_err)]
    pub fn intercept(&self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let a = &self.inner;
        let remote = req.remote_addr().or_else(|| {
            req.extensions()
                .get::<crate::tls::PeerInfo>()
                .and_then(|p| p.remote)
        });
        let caller = if !a.enabled {
            Caller {
                identity: None,
                remote: remote.map(|r| r.ip()),
            }
        } else {
            // A peer that guessed too often is refused before its credential is looked at:
            // a guess must not be answered, or the throttle would not slow a search. Peers
            // without an address (the Unix socket) are local and not throttled, nor loopback
            // peers unless `limits.failed_auth_throttle_loopback` says so.
            let peer = remote
                .map(|r| r.ip())
                .filter(|ip| a.limits.failed_auth_throttle_loopback || !ip.is_loopback())
                .map(peer_key);
            let now = Instant::now();
            if let (Some(failures), Some(ip)) = (&a.failures, peer)
                && !failures.has_token(&ip, now)
            {
                if let Some(also) = a.throttled_log.allow(now) {
                    tracing::warn!(
                        peer = %ip,
                        also_refused = also,
                        "call refused: too many unknown credentials from this address"
                    );
                }
                return Err(Status::resource_exhausted(
                    "too many failed authentications from this address; \
                     retry later (limits.failed_auth_per_second)",
                ));
            }
            let bearer = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .map(str::trim);
            let cert = req
                .extensions()
                .get::<crate::tls::PeerInfo>()
                .and_then(|p| p.client_cert.clone());
            let found = match (bearer, &cert) {
                (Some(t), _) => a.tokens.get(&sha256_hex(t.as_bytes())),
                (None, Some(c)) => a.certs.get(&c.0),
                // Not a guess: not counted, so a client that forgot its token does not lock
                // out the others behind the same address.
                (None, None) => {
                    return Err(Status::unauthenticated(
                        "no credential: send `authorization: Bearer <token>` or a client certificate",
                    ));
                }
            };
            match found {
                Some(id) => Caller {
                    identity: Some(id.clone()),
                    remote: None,
                },
                None => {
                    if let (Some(failures), Some(ip)) = (&a.failures, peer) {
                        failures.try_take(&ip, now);
                    }
                    if let Some(also) = a.unknown_log.allow(now) {
                        tracing::warn!(
                            remote = ?remote,
                            with_token = bearer.is_some(),
                            also_unknown = also,
                            "caller presented an unknown credential"
                        );
                    }
                    return Err(Status::unauthenticated("unknown credential"));
                }
            }
        };
        if a.limits.per_caller_per_second > 0.0
            && !a.rates.try_take(&caller.to_string(), Instant::now())
        {
            return Err(Status::resource_exhausted(format!(
                "caller `{caller}` is over limits.per_caller_per_second ({})",
                a.limits.per_caller_per_second
            )));
        }
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// Checks the caller of `req` may act as `bot_id`.
#[allow(clippy::result_large_err)]
pub fn authorize<T>(req: &Request<T>, bot_id: &str) -> Result<(), Status> {
    match req.extensions().get::<Caller>() {
        Some(c) if c.may_send_as(bot_id) => Ok(()),
        Some(c) => Err(Status::permission_denied(format!(
            "caller `{c}` may not act as bot `{}`",
            crate::bounded::cap(bot_id, 128)
        ))),
        // The interceptor always runs before the service; no caller means it was bypassed.
        None => Err(Status::unauthenticated("no caller identity")),
    }
}

/// Checks the caller of `req` may see every bot (filters left empty).
#[allow(clippy::result_large_err)]
pub fn authorize_all<T>(req: &Request<T>, what: &str) -> Result<(), Status> {
    match req.extensions().get::<Caller>() {
        Some(c) if c.any_bot() => Ok(()),
        Some(c) => Err(Status::permission_denied(format!(
            "caller `{c}` may only act as some bots: set bot_id to {what}"
        ))),
        None => Err(Status::unauthenticated("no caller identity")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_stay_bounded_and_keep_the_recent_keys() {
        let b = Buckets::<u32>::new(1.0, 5, 100);
        let t0 = Instant::now();
        // Every key still owes tokens: nothing is idle, so the oldest go.
        for k in 0..10_000u32 {
            assert!(b.try_take(&k, t0 + Duration::from_millis(u64::from(k))));
            assert!(b.len() <= 100, "{} buckets after {k} keys", b.len());
        }
        let map = b.map.lock().unwrap();
        assert!(map.contains_key(&9_999), "the newest key is kept");
        assert!(!map.contains_key(&0), "the oldest key went");
    }

    #[test]
    fn a_kept_bucket_keeps_its_debt() {
        let b = Buckets::<u32>::new(0.001, 2, 100);
        let t0 = Instant::now();
        assert!(b.try_take(&1, t0));
        assert!(b.try_take(&1, t0));
        assert!(!b.has_token(&1, t0));
        assert!(!b.try_take(&1, t0));
        assert!(b.has_token(&2, t0), "another key is not affected");
    }

    /// Without authentication each peer address is a caller: a flood from many addresses (a
    /// /64 holds 2^64) must not keep a bucket for each.
    #[test]
    fn per_caller_buckets_are_bounded_for_arbitrary_callers() {
        let limits = LimitsConfig {
            per_caller_per_second: 1.0,
            per_caller_burst: 10,
            ..LimitsConfig::default()
        };
        let a = Authenticator::new(&AuthConfig::default(), &limits);
        for i in 0..(3 * MAX_TRACKED as u32) {
            let mut req = Request::new(());
            let ip = std::net::Ipv6Addr::from(u128::from(i) << 64 | 1);
            req.extensions_mut()
                .insert(tonic::transport::server::TcpConnectInfo {
                    local_addr: None,
                    remote_addr: Some((ip, 4000).into()),
                });
            assert!(a.intercept(req).is_ok());
        }
        assert!(
            a.tracked_callers() <= MAX_TRACKED,
            "{} callers tracked",
            a.tracked_callers()
        );
    }

    #[test]
    fn ipv6_peers_are_counted_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(peer_key(a), peer_key(b));
        assert_ne!(peer_key(a), peer_key(c));
    }

    #[test]
    fn sha256_matches_a_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
