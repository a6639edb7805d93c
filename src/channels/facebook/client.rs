//! HTTP client for the Messenger Send API: page tokens and `appsecret_proof` attached at send
//! time, and the Graph API's answers classified into delivered, retry later, or refused for good.
//!
//! The only place that talks HTTP to Graph. The page token travels in the query string, so
//! nothing here may log, format or return a URL with its query (the shared transport's errors
//! never carry one); every error message is also scrubbed of the token as a last line of defence.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use super::config::FacebookConfig;
use crate::channels::http::{Http, Payload, TransportError, parse_uri};
use crate::channels::shared::retry_after;
use crate::channels::{ChannelError, FailureKind, NativeReceipt, NativeRequest};
use crate::model::{Address, ProactiveOptions};
use crate::settings::Secret;

const CHANNEL: &str = "facebook";

/// Graph error codes worth retrying: temporary send failure (1200), rate limits (4, 17, 32,
/// 613) and temporary service trouble (1, 2).
const RETRYABLE_CODES: &[i64] = &[1200, 613, 4, 17, 32, 2, 1];
/// Codes that will not change on retry: bad parameter (100), token (190), outside the
/// messaging window (10), person unavailable (551), permissions (200).
const PERMANENT_CODES: &[i64] = &[100, 190, 10, 551, 200];

/// Hex HMAC-SHA256 of the access token keyed by the app secret, as Graph's `appsecret_proof`.
pub fn appsecret_proof(access_token: &str, app_secret: &str) -> String {
    crate::channels::shared::hmac_sha256_hex(app_secret.as_bytes(), &[access_token.as_bytes()])
}

struct PageAuth {
    token: Secret,
    proof: Option<Secret>,
}

pub struct FacebookClient {
    http: Http,
    config: FacebookConfig,
    pages: HashMap<String, PageAuth>,
}

impl FacebookClient {
    pub fn new(config: FacebookConfig, request_timeout: Duration) -> Result<Self, String> {
        let http = Http::new(request_timeout)?;
        let pages = config
            .all_pages()
            .into_iter()
            .map(|p| {
                let proof = p
                    .app_secret
                    .as_ref()
                    .map(|s| Secret::new(appsecret_proof(p.access_token.expose(), s.expose())));
                (
                    p.page_id,
                    PageAuth {
                        token: p.access_token,
                        proof,
                    },
                )
            })
            .collect();
        Ok(Self {
            http,
            config,
            pages,
        })
    }

    /// The transport, for a file download (`fetch.rs`), which reads its answer piece by piece.
    pub(super) fn http(&self) -> &Http {
        &self.http
    }

    pub fn config(&self) -> &FacebookConfig {
        &self.config
    }

    /// Whether `bot_id` (address.bot.id, the page id) has a page token configured.
    pub fn has_credentials(&self, bot_id: &str) -> bool {
        self.pages.contains_key(bot_id)
    }

    /// Whether any bot has credentials here: a channel without any cannot send anything.
    pub fn has_any_credentials(&self) -> bool {
        !self.pages.is_empty()
    }

    /// Sends one Send API request; the receipt's `native_id` is Messenger's `message_id`
    /// (empty for a sender action) and its `conversation_id` the recipient's PSID.
    pub async fn execute(&self, req: &NativeRequest) -> Result<NativeReceipt, ChannelError> {
        let page_id = req.credential.as_str();
        let Some(auth) = self.pages.get(page_id) else {
            return Err(ChannelError {
                code: Some("no_credentials".into()),
                ..ChannelError::new(
                    CHANNEL,
                    FailureKind::Permanent,
                    format!(
                        "no access token configured for page `{page_id}` (channels.facebook.pages)"
                    ),
                )
            });
        };
        let token = auth.token.expose();
        let scrub = |s: String| scrub(s, auth);
        let mut url = url::Url::parse(&req.url).map_err(|e| {
            ChannelError::new(
                CHANNEL,
                FailureKind::Permanent,
                format!("request URL is not a URL: {e}"),
            )
        })?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("access_token", token);
            if let Some(proof) = &auth.proof {
                q.append_pair("appsecret_proof", proof.expose());
            }
        }
        let payload = Payload::json(&req.body);
        let resp = self
            .http
            .send(
                http::Method::POST,
                parse_uri(url.as_str()).map_err(|e| transport_error(&e, &scrub))?,
                None,
                Some(payload),
            )
            .await
            .map_err(|e| transport_error(&e, &scrub))?;
        let status = resp.status;
        let text = resp.text();
        let parsed: Option<Value> = serde_json::from_str(&text).ok();
        let graph_error = parsed.as_ref().and_then(|v| v.get("error"));
        if !(200..300).contains(&status) || graph_error.is_some() {
            let mut err = classify(status, &resp.headers(), &text);
            err.message = scrub(err.message);
            tracing::debug!(
                page_id,
                http_status = status,
                code = err.code.as_deref().unwrap_or_default(),
                kind = ?err.kind,
                "facebook send refused"
            );
            return Err(err);
        }
        let Some(body) = parsed else {
            return Err(ChannelError {
                http_status: Some(status),
                code: Some("unreadable_answer".into()),
                ..ChannelError::new(
                    CHANNEL,
                    FailureKind::Ambiguous,
                    "success answer is not JSON",
                )
            });
        };
        let field = |k: &str| body.get(k).and_then(Value::as_str).map(String::from);
        let recipient = field("recipient_id").unwrap_or_else(|| {
            req.body
                .value()
                .get("recipient")
                .and_then(|r| r.get("id"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        });
        Ok(NativeReceipt {
            native_id: field("message_id").unwrap_or_default(),
            conversation_id: recipient,
        })
    }

    /// Messenger needs no conversation creation: the user's PSID is the conversation.
    pub async fn create_conversation(
        &self,
        address: &Address,
        _options: &ProactiveOptions,
    ) -> Result<Address, ChannelError> {
        let psid = address.user_id();
        if psid.is_empty() {
            return Err(ChannelError {
                code: Some("no_recipient".into()),
                ..ChannelError::new(
                    CHANNEL,
                    FailureKind::Permanent,
                    "address.user.id (the PSID) is required to message someone on Messenger",
                )
            });
        }
        let mut out = address.clone();
        let mut conv = out.conversation.take().unwrap_or_default();
        conv.id = psid.to_string();
        out.conversation = Some(conv);
        out.id = None;
        Ok(out)
    }
}

/// `s` without the page token or proof, should a message ever echo them.
fn scrub(s: String, auth: &PageAuth) -> String {
    let secrets = std::iter::once(&auth.token).chain(auth.proof.as_ref());
    crate::channels::shared::scrub_secrets(s, secrets.map(Secret::expose))
}

/// A failure to get an answer. A connect error never reached Graph; anything after the request
/// was written (a timeout, a reset, an unreadable body) may have sent the message.
fn transport_error(e: &TransportError, scrub: &impl Fn(String) -> String) -> ChannelError {
    let mut err = e.to_channel_error(CHANNEL, "the Graph API", false);
    err.message = scrub(err.message);
    err
}

/// Turns a Graph error answer (`{"error": {message, type, code, error_subcode, fbtrace_id}}`)
/// into a typed failure with Graph's own code (`"100/2018001"` with a subcode) and text.
pub fn classify(status: u16, headers: &http::header::HeaderMap, body: &str) -> ChannelError {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let get = |k: &str| error.and_then(|e| e.get(k));
    let number = |k: &str| {
        get(k).and_then(|v| {
            v.as_i64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        })
    };
    let code = number("code");
    let subcode = number("error_subcode");
    let mut message = get("message")
        .and_then(Value::as_str)
        .map(String::from)
        .unwrap_or_else(|| {
            let snippet: String = body.chars().take(200).collect();
            if snippet.trim().is_empty() {
                format!("HTTP {status}")
            } else {
                snippet
            }
        });
    if let Some(trace) = get("fbtrace_id").and_then(Value::as_str) {
        message.push_str(&format!(" (fbtrace_id {trace})"));
    }
    let kind = match code {
        Some(c) if RETRYABLE_CODES.contains(&c) => FailureKind::Retryable,
        Some(c) if PERMANENT_CODES.contains(&c) || (200..300).contains(&c) => {
            FailureKind::Permanent
        }
        _ => match status {
            429 | 500..=599 => FailureKind::Retryable,
            _ => FailureKind::Permanent,
        },
    };
    let code = match (code, subcode) {
        (Some(c), Some(s)) => Some(format!("{c}/{s}")),
        (Some(c), None) => Some(c.to_string()),
        _ => Some(format!("http_{status}")),
    };
    ChannelError {
        channel: CHANNEL.into(),
        kind,
        http_status: Some(status),
        code,
        message,
        retry_after: retry_after(headers),
        // Graph's HTTP statuses already say what kind of refusal it is.
        category: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderMap;

    #[test]
    fn appsecret_proof_is_hex_hmac_sha256() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            appsecret_proof("what do ya want for nothing?", "Jefe"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    fn graph(code: i64, subcode: Option<i64>) -> String {
        let mut e = serde_json::json!({
            "message": "(#100) No matching user found",
            "type": "OAuthException",
            "code": code,
            "fbtrace_id": "AbC123"
        });
        if let Some(s) = subcode {
            e["error_subcode"] = s.into();
        }
        serde_json::json!({ "error": e }).to_string()
    }

    #[test]
    fn classification_by_graph_code_then_status() {
        let h = HeaderMap::new();
        let e = classify(400, &h, &graph(100, Some(2018001)));
        assert_eq!(e.kind, FailureKind::Permanent);
        assert_eq!(e.code.as_deref(), Some("100/2018001"));
        assert_eq!(e.http_status, Some(400));
        assert_eq!(e.channel, "facebook");
        assert_eq!(
            e.message,
            "(#100) No matching user found (fbtrace_id AbC123)"
        );
        for code in [1200, 613, 4, 2, 17, 32] {
            let e = classify(400, &h, &graph(code, None));
            assert_eq!(e.kind, FailureKind::Retryable, "code {code}");
            assert_eq!(e.code, Some(code.to_string()));
        }
        for code in [100, 190, 10, 551, 200, 230] {
            assert_eq!(
                classify(500, &h, &graph(code, None)).kind,
                FailureKind::Permanent,
                "code {code}"
            );
        }
        assert_eq!(classify(500, &h, "oops").kind, FailureKind::Retryable);
        assert_eq!(classify(500, &h, "oops").code.as_deref(), Some("http_500"));
        assert_eq!(classify(429, &h, "").kind, FailureKind::Retryable);
        assert_eq!(classify(429, &h, "").message, "HTTP 429");
        assert_eq!(classify(404, &h, "").kind, FailureKind::Permanent);
        assert_eq!(
            classify(400, &h, &graph(9999, None)).kind,
            FailureKind::Permanent
        );
        let mut h = HeaderMap::new();
        h.insert("retry-after", "3".parse().unwrap());
        assert_eq!(
            classify(503, &h, "").retry_after,
            Some(Duration::from_secs(3))
        );
    }

    #[test]
    fn scrub_removes_token_and_proof() {
        let auth = PageAuth {
            token: Secret::new("EAAtoken"),
            proof: Some(Secret::new("abc123proof")),
        };
        assert_eq!(
            scrub("x EAAtoken y abc123proof".into(), &auth),
            "x <redacted> y <redacted>"
        );
    }

    #[tokio::test]
    async fn conversation_is_the_psid() {
        let c = FacebookClient::new(FacebookConfig::default(), Duration::from_secs(1)).unwrap();
        let addr = Address {
            channel_id: "facebook".into(),
            user: Some(crate::model::Identity {
                id: "psid-9".into(),
                ..Default::default()
            }),
            id: Some("old".into()),
            ..Default::default()
        };
        let out = c
            .create_conversation(&addr, &ProactiveOptions::default())
            .await
            .unwrap();
        assert_eq!(out.conversation_id(), Some("psid-9"));
        assert_eq!(out.id, None);
        let mut no_user = addr.clone();
        no_user.user = None;
        let e = c
            .create_conversation(&no_user, &ProactiveOptions::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind, FailureKind::Permanent);
    }
}
