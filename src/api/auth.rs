//! Caller authentication and per-caller limits for the ChannelGateway service.
//!
//! Owns who a caller is (a bearer token, or an mTLS client certificate, matched by SHA-256) and
//! which bot ids it may send as. Health and reflection stay open for probes. Tokens are compared
//! as hashes and never logged.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use crate::channels::RateLimit;
use crate::config::{AuthConfig, LimitsConfig};
use crate::delivery::rate::RateLimiter;

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

    /// `None`: any bot.
    fn bots(&self) -> Option<&[String]> {
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
    rates: RateLimiter,
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
                rates: RateLimiter::default(),
            }),
        }
    }

    /// The interceptor: finds the caller, checks its rate, and leaves a `Caller` in the
    /// request's extensions for the service to authorize bot ids against.
    #[allow(clippy::result_large_err)]
    pub fn intercept(&self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let a = &self.inner;
        let caller = if !a.enabled {
            let remote = req.remote_addr().or_else(|| {
                req.extensions()
                    .get::<crate::tls::PeerInfo>()
                    .and_then(|p| p.remote)
            });
            Caller {
                identity: None,
                remote: remote.map(|r| r.ip()),
            }
        } else {
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
                    tracing::warn!(
                        remote = ?req.remote_addr(),
                        with_token = bearer.is_some(),
                        "caller presented an unknown credential"
                    );
                    return Err(Status::unauthenticated("unknown credential"));
                }
            }
        };
        if a.limits.per_caller_per_second > 0.0 {
            let limit = RateLimit {
                scope: format!("caller:{caller}"),
                per_second: a.limits.per_caller_per_second,
                burst: a.limits.per_caller_burst,
            };
            if !a.rates.try_take(&limit, Instant::now()) {
                return Err(Status::resource_exhausted(format!(
                    "caller `{caller}` is over limits.per_caller_per_second ({})",
                    a.limits.per_caller_per_second
                )));
            }
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
    fn sha256_matches_a_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
