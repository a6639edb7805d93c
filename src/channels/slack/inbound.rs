//! Slack's receiving side: the signature check of every webhook call (Events API,
//! interactivity, slash commands) and their normalization into the model, each event with the
//! address a reply goes to.
//!
//! Owns only the pure part: nothing here stores, answers or calls Slack. The listener calls
//! `verify` before anything else, then `parse`. It must not touch the send side (`render`,
//! `client`): an address made here is checked against `render::render_send` in tests only.

use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::config::SlackConfig;
use crate::channels::channel::{Inbound, Parsed, WebhookError, WebhookRequest};
use crate::settings::Secret;

pub const PATH_EVENTS: &str = "/webhooks/slack/events";
pub const PATH_INTERACTIVITY: &str = "/webhooks/slack/interactivity";
pub const PATH_COMMANDS: &str = "/webhooks/slack/commands";

const SIGNATURE_HEADER: &str = "x-slack-signature";
const TIMESTAMP_HEADER: &str = "x-slack-request-timestamp";
/// Slack: "If the timestamp is more than five minutes from local time, it could be a replay
/// attack". Both ways: a timestamp from the future is as suspect as an old one.
const MAX_SKEW_SECS: u64 = 5 * 60;
/// `v0=` and 32 bytes in hex.
const SIGNATURE_LEN: usize = 3 + 64;
/// Unix seconds have 10 digits until 2286: more is not a timestamp.
const TIMESTAMP_MAX_DIGITS: usize = 12;

/// Slack behind the `Inbound` interface: the configured signing secrets and the workspaces that
/// events are addressed to.
pub struct SlackInbound {
    config: SlackConfig,
    secrets: Vec<Secret>,
}

impl SlackInbound {
    /// `None` without a signing secret: nothing could be verified, so nothing is received.
    pub fn new(config: &SlackConfig) -> Option<Self> {
        let secrets: Vec<Secret> = config.signing_secrets().into_iter().cloned().collect();
        if secrets.is_empty() {
            return None;
        }
        Some(Self {
            config: config.clone(),
            secrets,
        })
    }

    fn check(&self, req: &WebhookRequest<'_>) -> Result<(), WebhookError> {
        let signature = single_header(req, SIGNATURE_HEADER)?
            .ok_or(WebhookError::Unverified("missing X-Slack-Signature"))?;
        let timestamp = single_header(req, TIMESTAMP_HEADER)?.ok_or(WebhookError::Unverified(
            "missing X-Slack-Request-Timestamp",
        ))?;
        if timestamp.is_empty()
            || timestamp.len() > TIMESTAMP_MAX_DIGITS
            || !timestamp.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(WebhookError::Unverified(
                "X-Slack-Request-Timestamp is not a number",
            ));
        }
        let ts: u64 = timestamp
            .parse()
            .map_err(|_| WebhookError::Unverified("X-Slack-Request-Timestamp is not a number"))?;
        if ts.abs_diff(req.received_at) > MAX_SKEW_SECS {
            return Err(WebhookError::Unverified(
                "X-Slack-Request-Timestamp outside the 5-minute window",
            ));
        }
        let expected = signature
            .strip_prefix("v0=")
            .filter(|_| signature.len() == SIGNATURE_LEN)
            .and_then(decode_hex)
            .ok_or(WebhookError::Unverified(
                "X-Slack-Signature is not v0=<hex>",
            ))?;
        // Every secret is tried, each in constant time: which one matched says nothing an
        // attacker can use, since each comparison on its own leaks nothing.
        let mut ok = false;
        for secret in &self.secrets {
            ok |= signature_matches(secret, timestamp, req.body, &expected);
        }
        if ok {
            Ok(())
        } else {
            Err(WebhookError::Unverified("X-Slack-Signature does not match"))
        }
    }
}

/// The header's value when it appears once; a repeated signature or timestamp is refused
/// rather than guessing which one Slack meant.
fn single_header<'a>(
    req: &'a WebhookRequest<'_>,
    name: &'static str,
) -> Result<Option<&'a str>, WebhookError> {
    let mut values = req.headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(WebhookError::Unverified("X-Slack header repeated"));
    }
    first
        .to_str()
        .map(|s| Some(s.trim()))
        .map_err(|_| WebhookError::Unverified("X-Slack header is not ASCII"))
}

/// HMAC-SHA256 of `v0:{timestamp}:{body}` keyed by the signing secret, compared with `expected`
/// by `verify_slice` (constant time).
fn signature_matches(secret: &Secret, timestamp: &str, body: &[u8], expected: &[u8]) -> bool {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()) else {
        return false;
    };
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body);
    mac.verify_slice(expected).is_ok()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    fn nibble(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let b = s.as_bytes();
    if b.len() % 2 != 0 {
        return None;
    }
    b.chunks(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

impl Inbound for SlackInbound {
    fn paths(&self) -> Vec<String> {
        [PATH_EVENTS, PATH_INTERACTIVITY, PATH_COMMANDS]
            .map(String::from)
            .to_vec()
    }

    fn verify<'a>(
        &'a self,
        req: &'a WebhookRequest<'a>,
    ) -> BoxFuture<'a, Result<(), WebhookError>> {
        let result = self.check(req);
        Box::pin(async move { result })
    }

    fn parse(&self, req: &WebhookRequest<'_>) -> Result<Parsed, WebhookError> {
        parse::parse(&self.config, req)
    }
}

mod parse {
    use super::*;

    pub fn parse(_config: &SlackConfig, _req: &WebhookRequest<'_>) -> Result<Parsed, WebhookError> {
        Ok(Parsed::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::slack::config::SlackWorkspace;

    /// Slack's documented example ("Verifying requests from Slack"): a slash command.
    pub const DOC_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
    pub const DOC_TIMESTAMP: u64 = 1531420618;
    pub const DOC_BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    pub const DOC_SIGNATURE: &str =
        "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

    pub fn config(secret: &str) -> SlackConfig {
        SlackConfig {
            signing_secret: Some(Secret::new(secret)),
            ..Default::default()
        }
    }

    /// Signs as Slack does: hex HMAC-SHA256 of `v0:{ts}:{body}`.
    pub fn sign(secret: &str, ts: u64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("v0:{ts}:").as_bytes());
        mac.update(body);
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("v0={hex}")
    }

    pub fn headers(sig: Option<&str>, ts: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(s) = sig {
            h.insert("X-Slack-Signature", s.parse().unwrap());
        }
        if let Some(t) = ts {
            h.insert("X-Slack-Request-Timestamp", t.parse().unwrap());
        }
        h
    }

    pub fn run_verify(
        inbound: &SlackInbound,
        path: &str,
        headers: &http::HeaderMap,
        body: &[u8],
        now: u64,
    ) -> Result<(), WebhookError> {
        let method = http::Method::POST;
        let req = WebhookRequest {
            method: &method,
            path,
            query: None,
            headers,
            body,
            received_at: now,
        };
        futures::executor::block_on(inbound.verify(&req))
    }

    #[test]
    fn slacks_documented_example_verifies() {
        // The test's own signer agrees with the published vector.
        assert_eq!(
            sign(DOC_SECRET, DOC_TIMESTAMP, DOC_BODY.as_bytes()),
            DOC_SIGNATURE
        );
        let inbound = SlackInbound::new(&config(DOC_SECRET)).unwrap();
        let h = headers(Some(DOC_SIGNATURE), Some(&DOC_TIMESTAMP.to_string()));
        for now in [DOC_TIMESTAMP, DOC_TIMESTAMP + 300, DOC_TIMESTAMP - 300] {
            run_verify(&inbound, PATH_COMMANDS, &h, DOC_BODY.as_bytes(), now).unwrap();
        }
        // Upper-case hex is the same signature.
        let upper = format!("v0={}", DOC_SIGNATURE[3..].to_ascii_uppercase());
        let h = headers(Some(&upper), Some(&DOC_TIMESTAMP.to_string()));
        run_verify(
            &inbound,
            PATH_COMMANDS,
            &h,
            DOC_BODY.as_bytes(),
            DOC_TIMESTAMP,
        )
        .unwrap();
    }

    #[test]
    fn refusals_have_fixed_reasons_and_never_quote_the_request() {
        let inbound = SlackInbound::new(&config(DOC_SECRET)).unwrap();
        let ts = DOC_TIMESTAMP.to_string();
        let body = DOC_BODY.as_bytes();
        let wrong_secret = sign("another-secret", DOC_TIMESTAMP, body);
        let mut changed = DOC_BODY.to_string();
        changed.push('x');
        let cases: Vec<(&str, http::HeaderMap, Vec<u8>, u64)> = vec![
            (
                "wrong secret",
                headers(Some(&wrong_secret), Some(&ts)),
                body.to_vec(),
                DOC_TIMESTAMP,
            ),
            (
                "missing signature",
                headers(None, Some(&ts)),
                body.to_vec(),
                DOC_TIMESTAMP,
            ),
            (
                "missing timestamp",
                headers(Some(DOC_SIGNATURE), None),
                body.to_vec(),
                DOC_TIMESTAMP,
            ),
            (
                "old",
                headers(Some(DOC_SIGNATURE), Some(&ts)),
                body.to_vec(),
                DOC_TIMESTAMP + 301,
            ),
            (
                "future",
                headers(Some(DOC_SIGNATURE), Some(&ts)),
                body.to_vec(),
                DOC_TIMESTAMP - 301,
            ),
            (
                "body changed",
                headers(Some(DOC_SIGNATURE), Some(&ts)),
                changed.into_bytes(),
                DOC_TIMESTAMP,
            ),
            (
                "v1",
                headers(Some(&DOC_SIGNATURE.replace("v0=", "v1=")), Some(&ts)),
                body.to_vec(),
                DOC_TIMESTAMP,
            ),
            (
                "short",
                headers(Some(&DOC_SIGNATURE[..60]), Some(&ts)),
                body.to_vec(),
                DOC_TIMESTAMP,
            ),
            (
                "not hex",
                headers(Some(&DOC_SIGNATURE.replace('a', "g")), Some(&ts)),
                body.to_vec(),
                DOC_TIMESTAMP,
            ),
            (
                "ts not a number",
                headers(Some(DOC_SIGNATURE), Some("1531420618.5")),
                body.to_vec(),
                DOC_TIMESTAMP,
            ),
            (
                "ts huge",
                headers(Some(DOC_SIGNATURE), Some("99999999999999999999999")),
                body.to_vec(),
                DOC_TIMESTAMP,
            ),
            (
                "ts empty",
                headers(Some(DOC_SIGNATURE), Some("")),
                body.to_vec(),
                DOC_TIMESTAMP,
            ),
        ];
        for (name, h, b, now) in cases {
            let err = run_verify(&inbound, PATH_EVENTS, &h, &b, now).unwrap_err();
            let WebhookError::Unverified(reason) = &err else {
                panic!("{name}: {err:?}");
            };
            for leak in [DOC_SECRET, &DOC_SIGNATURE[3..], "xyzz0Wbap", "1531420618"] {
                assert!(!reason.contains(leak), "{name}: {reason}");
            }
        }
        // Repeated headers: refused rather than picking one.
        let mut h = headers(Some(DOC_SIGNATURE), Some(&ts));
        h.append("X-Slack-Signature", wrong_secret.parse().unwrap());
        assert!(run_verify(&inbound, PATH_EVENTS, &h, body, DOC_TIMESTAMP).is_err());
        // Non-ASCII header bytes.
        let mut h = headers(None, Some(&ts));
        h.insert(
            "X-Slack-Signature",
            http::HeaderValue::from_bytes(b"v0=\xe9").unwrap(),
        );
        assert!(run_verify(&inbound, PATH_EVENTS, &h, body, DOC_TIMESTAMP).is_err());
    }

    /// A JSON body with non-ASCII text, signed over its UTF-8 bytes: verifies as sent; one
    /// changed character (same length in bytes) is refused.
    #[test]
    fn non_ascii_json_body_is_checked_over_its_exact_bytes() {
        let secret = "s3cret-signing";
        let inbound = SlackInbound::new(&config(secret)).unwrap();
        let body =
            r#"{"type":"event_callback","event":{"type":"message","text":"héllo wörld 👋"}}"#;
        let now = 1_700_000_000;
        let h = headers(
            Some(&sign(secret, now, body.as_bytes())),
            Some(&now.to_string()),
        );
        run_verify(&inbound, PATH_EVENTS, &h, body.as_bytes(), now).unwrap();
        let tampered = body.replace('é', "è");
        assert_eq!(tampered.len(), body.len());
        assert_eq!(
            run_verify(&inbound, PATH_EVENTS, &h, tampered.as_bytes(), now),
            Err(WebhookError::Unverified("X-Slack-Signature does not match"))
        );
        // Re-serializing the JSON (as a framework that parses first would) breaks it too.
        let reserialized =
            serde_json::to_vec(&serde_json::from_str::<serde_json::Value>(body).unwrap()).unwrap();
        let spaced = [b" ".as_slice(), &reserialized].concat();
        assert!(run_verify(&inbound, PATH_EVENTS, &h, &spaced, now).is_err());
    }

    #[test]
    fn every_configured_secret_is_tried_and_none_means_no_inbound() {
        assert!(SlackInbound::new(&SlackConfig::default()).is_none());
        let mut c = SlackConfig::default();
        c.workspaces = vec![
            SlackWorkspace {
                bot_id: "B1".into(),
                token: Secret::new("xoxb-1"),
                team_id: Some("T1".into()),
                signing_secret: Some(Secret::new("secret-one")),
            },
            SlackWorkspace {
                bot_id: "B2".into(),
                token: Secret::new("xoxb-2"),
                team_id: Some("T2".into()),
                signing_secret: Some(Secret::new("secret-two")),
            },
        ];
        let inbound = SlackInbound::new(&c).unwrap();
        let now = 1_700_000_000;
        let body = b"{}";
        for s in ["secret-one", "secret-two"] {
            let h = headers(Some(&sign(s, now, body)), Some(&now.to_string()));
            run_verify(&inbound, PATH_EVENTS, &h, body, now).unwrap();
        }
        let h = headers(
            Some(&sign("secret-three", now, body)),
            Some(&now.to_string()),
        );
        assert!(run_verify(&inbound, PATH_EVENTS, &h, body, now).is_err());
    }
}
