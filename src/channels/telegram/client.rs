//! HTTP client for the Telegram Bot API: the bot's token put into the URL path at send time,
//! one POST per rendered request, and the classification of Telegram's answers
//! (`{ok:true, result}` or `{ok:false, error_code, description, parameters}`).
//!
//! The only place that talks HTTP to Telegram, and the only place a token meets a URL. A rendered
//! URL carries [`TOKEN_PLACEHOLDER`]; the real one is built here, handed to the transport and
//! dropped. Nothing here logs, formats or returns it: the transport's errors never carry a URL,
//! and every message is scrubbed of the token all the same, should Telegram ever echo it.
//!
//! Must not render anything (that is `render.rs`), nor decide retries (the delivery engine does,
//! from the [`FailureKind`] and `retry_after` given here).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use super::config::TelegramConfig;
use super::{CHANNEL_ID, TOKEN_PLACEHOLDER};
use crate::channels::http::{Http, Payload, TransportError, parse_uri};
use crate::channels::shared::{CredentialHint, no_credentials, retry_after, scrub_secrets};
use crate::channels::{
    ChannelError, ErrorCategory, FailureKind, HttpMethod, NativeReceipt, NativeRequest,
};
use crate::settings::Secret;

/// The longest Bot API method name accepted (the longest real one is under 40 characters).
const MAX_METHOD_CHARS: usize = 64;

/// The one call that changes nothing a retry could duplicate: a typing indicator shown twice
/// is the same indicator.
const IDEMPOTENT_METHOD: &str = "sendChatAction";

pub struct TelegramClient {
    http: Http,
    config: TelegramConfig,
    tokens: HashMap<String, Secret>,
}

impl TelegramClient {
    pub fn new(config: TelegramConfig, request_timeout: Duration) -> Result<Self, String> {
        let http = Http::new(request_timeout)?;
        let tokens = config
            .bots
            .iter()
            .map(|b| (b.bot_id.clone(), b.token.clone()))
            .collect();
        Ok(Self {
            http,
            config,
            tokens,
        })
    }

    pub fn config(&self) -> &TelegramConfig {
        &self.config
    }

    /// The transport, for a file download (`fetch.rs`), which reads its answer piece by piece.
    pub(super) fn http(&self) -> &Http {
        &self.http
    }

    /// `bot_id`'s token, for `fetch.rs`, which puts it in the download URL and nowhere else.
    pub(super) fn token(&self, bot_id: &str) -> Option<&Secret> {
        self.tokens.get(bot_id)
    }

    /// Whether `bot_id` (address.bot.id) has a token configured.
    pub fn has_credentials(&self, bot_id: &str) -> bool {
        self.tokens.contains_key(bot_id)
    }

    /// Whether any bot has a token here: a channel without any cannot send anything.
    pub fn has_any_credentials(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The configured bot ids, for the error that says none matched (ids only).
    pub fn credential_hint(&self) -> CredentialHint {
        CredentialHint {
            what: "bot",
            key: "bot_id",
            section: "channels.telegram.bots",
            ids: self.config.bots.iter().map(|b| b.bot_id.clone()).collect(),
        }
    }

    /// The Bot API method of a rendered URL, if it is `{api_base}/bot<token>/METHOD` under the
    /// configured base with a plain method name: nothing else may receive a token.
    fn method_of<'r>(&self, req: &'r NativeRequest) -> Result<&'r str, ChannelError> {
        let prefix = format!("{}/bot{TOKEN_PLACEHOLDER}/", self.config.api_base());
        let method = req
            .url
            .strip_prefix(&prefix)
            .filter(|m| {
                !m.is_empty()
                    && m.len() <= MAX_METHOD_CHARS
                    && m.bytes().all(|b| b.is_ascii_alphabetic())
            })
            .filter(|_| req.method == HttpMethod::Post);
        // The URL is not echoed: whatever it is, it is not one a token may go to.
        method.ok_or_else(|| ChannelError {
            code: Some("url_not_allowed".into()),
            ..ChannelError::new(
                CHANNEL_ID,
                FailureKind::Permanent,
                "the request is not a POST to {channels.telegram.api_base_url}/bot<token>/METHOD \
                 with a Bot API method name",
            )
        })
    }

    /// POSTs one rendered Bot API call with the bot's token and returns Telegram's `result`.
    /// Crate-visible for `getUpdates` polling, which needs the result itself.
    pub(crate) async fn call(&self, req: &NativeRequest) -> Result<Value, ChannelError> {
        let method = self.method_of(req)?;
        let bot_id = req.credential.as_str();
        let Some(token) = self.tokens.get(bot_id) else {
            return Err(ChannelError {
                code: Some("no_credentials".into()),
                ..ChannelError::new(
                    CHANNEL_ID,
                    FailureKind::Permanent,
                    no_credentials(&self.credential_hint(), bot_id),
                )
            });
        };
        let token = token.expose();
        let scrub = |mut e: ChannelError| {
            e.message = scrub_secrets(e.message, [token]);
            e.bound();
            e
        };
        let transport = |e: &TransportError| {
            scrub(e.to_channel_error(CHANNEL_ID, "the Bot API", method == IDEMPOTENT_METHOD))
        };
        let uri = parse_uri(&format!("{}/bot{token}/{method}", self.config.api_base()))
            .map_err(|e| transport(&e))?;
        let answer = self
            .http
            .send(
                http::Method::POST,
                uri,
                None,
                Some(Payload::json(&req.body)),
            )
            .await
            .map_err(|e| {
                let err = transport(&e);
                tracing::debug!(bot_id = %crate::bounded::for_log(bot_id), method, error = %err, "telegram call failed");
                err
            })?;
        let status = answer.status;
        let text = answer.text();
        let parsed: Option<Value> = serde_json::from_str(&text).ok();
        let ok = parsed
            .as_ref()
            .and_then(|v| v.get("ok"))
            .and_then(Value::as_bool);
        match (ok, parsed) {
            (Some(true), Some(mut v)) if (200..300).contains(&status) => {
                Ok(v.get_mut("result").map(Value::take).unwrap_or(Value::Null))
            }
            _ => {
                let err = scrub(classify(status, &answer.headers(), &text));
                tracing::debug!(
                    bot_id = %crate::bounded::for_log(bot_id),
                    method,
                    http_status = status,
                    code = err.code.as_deref().unwrap_or_default(),
                    kind = ?err.kind,
                    "telegram refused the request"
                );
                Err(err)
            }
        }
    }

    /// Makes one rendered Bot API call. The receipt's `native_id` is the sent message's
    /// `message_id`; for `sendMediaGroup` (an array of messages) it is the album's first
    /// message, since a receipt names one message and a reply (`reply_parameters.message_id`)
    /// takes one; empty for calls answering `true` (`sendChatAction`). `conversation_id` is
    /// `result.chat.id`, or the request's `chat_id` when the answer has none.
    ///
    /// An edit Telegram refuses as "message is not modified" succeeded: the message already
    /// shows what the update asked for (a retry of an edit that went through, or an update that
    /// changed nothing Telegram shows). Its receipt names the message edited.
    pub async fn execute(&self, req: &NativeRequest) -> Result<NativeReceipt, ChannelError> {
        let result = match self.call(req).await {
            Ok(r) => r,
            Err(e) if self.is_gone_delete(req, &e) => {
                tracing::debug!(bot_id = %crate::bounded::for_log(&req.credential), "telegram: the message to delete is gone already; it counts as done");
                return Ok(named_receipt(req));
            }
            Err(e) if self.is_unmodified_edit(req, &e) => {
                tracing::debug!(bot_id = %crate::bounded::for_log(&req.credential), "telegram: the edit changed nothing the message shows; it counts as done");
                return Ok(named_receipt(req));
            }
            Err(e) => return Err(e),
        };
        let message = match &result {
            Value::Array(messages) => messages.first(),
            Value::Object(_) => Some(&result),
            _ => None,
        };
        let native_id = message
            .and_then(|m| m.get("message_id"))
            .and_then(id_text)
            .unwrap_or_default();
        let conversation_id = message
            .and_then(|m| m.pointer("/chat/id"))
            .and_then(id_text)
            .or_else(|| req.body.value().get("chat_id").and_then(id_text))
            .unwrap_or_default();
        let mut receipt = NativeReceipt {
            native_id,
            conversation_id,
        };
        receipt.bound();
        Ok(receipt)
    }
}

impl TelegramClient {
    /// Whether `e` is Telegram's answer to an edit that would change nothing: "Bad Request:
    /// message is not modified: specified new message content and reply markup are exactly the
    /// same as a current content and reply markup of the message".
    fn is_unmodified_edit(&self, req: &NativeRequest, e: &ChannelError) -> bool {
        e.http_status == Some(400)
            && e.code.as_deref() == Some("400")
            && e.message.to_ascii_lowercase().contains(NOT_MODIFIED)
            && self.method_of(req).is_ok_and(|m| m.starts_with("edit"))
    }
}

impl TelegramClient {
    /// Whether `e` says a message to delete is gone already ("Bad Request: message to delete
    /// not found"): the delete's purpose holds, and a delete carried out again after a crash
    /// (its first attempt went through) must not fail the change, nor stop before the
    /// message's other native messages.
    fn is_gone_delete(&self, req: &NativeRequest, e: &ChannelError) -> bool {
        e.http_status == Some(400)
            && e.message
                .to_ascii_lowercase()
                .contains("message to delete not found")
            && self.method_of(req).is_ok_and(|m| m == "deleteMessage")
    }
}

/// The receipt of a call that changed a message the request names (`chat_id`, `message_id`),
/// for a refusal that means it is done already.
fn named_receipt(req: &NativeRequest) -> NativeReceipt {
    let body = req.body.value();
    let mut receipt = NativeReceipt {
        native_id: body.get("message_id").and_then(id_text).unwrap_or_default(),
        conversation_id: body.get("chat_id").and_then(id_text).unwrap_or_default(),
    };
    receipt.bound();
    receipt
}

/// What Telegram's description of an edit that changes nothing says.
const NOT_MODIFIED: &str = "message is not modified";

/// A Telegram id (an integer up to 52 bits; a `@channel` name in a request) as text.
fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// Telegram's refusal (`{ok:false, error_code, description, parameters}`, HTTP `status`) as a
/// typed failure: `code` is `error_code` (`http_<status>` without one), `message` Telegram's
/// description. An answer that is not Telegram's JSON is judged by its HTTP status.
///
/// - 429: retryable after `parameters.retry_after` (or `Retry-After`, the larger of both): a
///   floor the delivery engine clamps to `delivery.max_retry_delay`.
/// - `parameters.migrate_to_chat_id`: permanent; the group became a supergroup, and the message
///   names the chat id to send to.
/// - Telegram's own 5xx: retryable (it said nothing was done). A 5xx that is not Telegram's
///   answer (a proxy's page) is ambiguous as for the other channels, the request may have been
///   forwarded; 503 says the service is down, so retryable.
/// - A success status without Telegram's answer: ambiguous (the message may have been sent).
/// - Every other status: permanent, with a category where Telegram's description is clear.
///
/// The message is Telegram's whole description: the caller scrubs it of the token and only then
/// bounds it (`ChannelError::bound`), so that a cut cannot leave part of a token unrecognised.
pub fn classify(status: u16, headers: &http::header::HeaderMap, body: &str) -> ChannelError {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let telegram = parsed
        .as_ref()
        .filter(|v| v.get("ok").and_then(Value::as_bool) == Some(false));
    let error_code = telegram
        .and_then(|v| v.get("error_code"))
        .and_then(Value::as_u64)
        .and_then(|c| u16::try_from(c).ok());
    let description = telegram
        .and_then(|v| v.get("description"))
        .and_then(Value::as_str)
        .filter(|d| !d.trim().is_empty());
    let param = |k: &str| telegram.and_then(|v| v.pointer(&format!("/parameters/{k}")));
    // Telegram's error_code mirrors the HTTP status; a proxy may have changed the latter.
    let effective = error_code.unwrap_or(status);
    let mut message = match description {
        Some(d) => d.to_string(),
        None if telegram.is_some() => format!("Telegram refused the request (HTTP {status})"),
        None if (200..300).contains(&status) => {
            format!("HTTP {status} without a Bot API answer: the request may have been handled")
        }
        None => format!("HTTP {status} without a Bot API answer"),
    };
    let migrated = param("migrate_to_chat_id").and_then(id_text);
    let wait = param("retry_after")
        .and_then(Value::as_u64)
        .map(Duration::from_secs)
        .max(retry_after(headers));
    let lower = description.unwrap_or_default().to_ascii_lowercase();
    let (kind, category) = if let Some(chat) = &migrated {
        message = format!("the group moved to supergroup {chat}: send to that chat id ({message})");
        (FailureKind::Permanent, Some(ErrorCategory::Refused))
    } else {
        match effective {
            // Telegram's description already says how long ("retry after 18053").
            429 => (FailureKind::Retryable, None),
            // A success status without Telegram's answer (a proxy's page, a cut answer): the
            // message may have been sent.
            200..=299 if telegram.is_none() => (FailureKind::Ambiguous, None),
            503 => (FailureKind::Retryable, None),
            500..=599 if telegram.is_some() => (FailureKind::Retryable, None),
            500..=599 => (FailureKind::Ambiguous, None),
            401 => (FailureKind::Permanent, Some(ErrorCategory::Unauthorized)),
            // Every 403 of the Bot API is the chat refusing the bot: blocked by the user, kicked
            // from the group, not a member of the channel, a chat it may not start.
            403 => (FailureKind::Permanent, Some(ErrorCategory::Refused)),
            // "message to edit not found", "message to delete not found", "chat not found".
            400 if lower.contains("not found") => {
                (FailureKind::Permanent, Some(ErrorCategory::NotFound))
            }
            // Telegram gives no reason; for the bot's own messages, which are all the gateway
            // deletes, it is the age limit of deleteMessage (or, in a channel, a bot that may no
            // longer post there).
            400 if lower.contains("message can't be deleted") => {
                message = format!(
                    "Telegram deletes a bot's messages only within 48 hours of sending them \
                     (in a channel, only while the bot may post there): {message}"
                );
                (FailureKind::Permanent, Some(ErrorCategory::Refused))
            }
            400 if lower.contains("there is no text in the message to edit") => {
                message = format!(
                    "the native message is a photo or other media, which Telegram cannot turn \
                     into a text message: delete the message and send the new one instead \
                     ({message})"
                );
                (FailureKind::Permanent, Some(ErrorCategory::InvalidRequest))
            }
            400 => (FailureKind::Permanent, Some(ErrorCategory::InvalidRequest)),
            _ => (FailureKind::Permanent, None),
        }
    };
    ChannelError {
        channel: CHANNEL_ID.into(),
        kind,
        http_status: Some(status),
        code: Some(error_code.map_or_else(|| format!("http_{status}"), |c| c.to_string())),
        message,
        retry_after: (kind == FailureKind::Retryable).then_some(wait).flatten(),
        category,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::Body;
    use crate::channels::telegram::config::TelegramBot;
    use crate::channels::telegram::method_url;
    use http::header::HeaderMap;

    const TOKEN: &str = "123456:ABC-secret_token";

    fn none() -> HeaderMap {
        HeaderMap::new()
    }

    fn refusal(code: u16, description: &str, parameters: Value) -> String {
        serde_json::json!({
            "ok": false,
            "error_code": code,
            "description": description,
            "parameters": parameters,
        })
        .to_string()
    }

    #[test]
    fn flood_control_waits_for_retry_after() {
        let body = refusal(
            429,
            "Too Many Requests: retry after 7",
            serde_json::json!({"retry_after": 7}),
        );
        let e = classify(429, &none(), &body);
        assert_eq!(e.kind, FailureKind::Retryable);
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(e.code.as_deref(), Some("429"));
        assert_eq!(e.http_status, Some(429));
        assert!(e.message.starts_with("Too Many Requests"), "{}", e.message);
        // A Retry-After header longer than the body's wins: both are floors.
        let mut h = HeaderMap::new();
        h.insert("retry-after", "9".parse().unwrap());
        assert_eq!(
            classify(429, &h, &body).retry_after,
            Some(Duration::from_secs(9))
        );
        // A 429 with no Telegram body at all still waits for the header.
        let e = classify(429, &h, "<html>slow down</html>");
        assert_eq!(e.kind, FailureKind::Retryable);
        assert_eq!(e.retry_after, Some(Duration::from_secs(9)));
        assert_eq!(e.code.as_deref(), Some("http_429"));
    }

    #[test]
    fn server_errors_are_retried() {
        let e = classify(
            502,
            &none(),
            &refusal(502, "Bad Gateway", serde_json::json!({})),
        );
        assert_eq!(e.kind, FailureKind::Retryable);
        assert_eq!(e.retry_after, None);
        assert_eq!(
            classify(
                500,
                &none(),
                &refusal(500, "Internal Server Error", Value::Null)
            )
            .kind,
            FailureKind::Retryable
        );
        assert_eq!(classify(503, &none(), "").kind, FailureKind::Retryable);
        // A proxy's page: the request may have been forwarded and sent.
        let e = classify(502, &none(), "<html>bad gateway</html>");
        assert_eq!(e.kind, FailureKind::Ambiguous);
        assert_eq!(e.code.as_deref(), Some("http_502"));
    }

    #[test]
    fn migrated_group_names_the_new_chat() {
        let e = classify(
            400,
            &none(),
            &refusal(
                400,
                "Bad Request: group chat was upgraded to a supergroup chat",
                serde_json::json!({"migrate_to_chat_id": -1001234567890_i64}),
            ),
        );
        assert_eq!(e.kind, FailureKind::Permanent);
        assert!(
            e.message
                .starts_with("the group moved to supergroup -1001234567890: send to that chat id"),
            "{}",
            e.message
        );
        assert_eq!(e.category, Some(ErrorCategory::Refused));
        assert_eq!(e.retry_after, None);
    }

    #[test]
    fn refusals_are_permanent_with_a_category() {
        for (status, description, category) in [
            (
                400,
                "Bad Request: chat not found",
                Some(ErrorCategory::NotFound),
            ),
            (
                400,
                "Bad Request: can't parse entities: Unsupported start tag \"foo\"",
                Some(ErrorCategory::InvalidRequest),
            ),
            (
                403,
                "Forbidden: bot was blocked by the user",
                Some(ErrorCategory::Refused),
            ),
            (
                403,
                "Forbidden: bot was kicked from the group chat",
                Some(ErrorCategory::Refused),
            ),
            (401, "Unauthorized", Some(ErrorCategory::Unauthorized)),
            (404, "Not Found", None),
        ] {
            let e = classify(status, &none(), &refusal(status, description, Value::Null));
            assert_eq!(e.kind, FailureKind::Permanent, "{description}");
            assert_eq!(e.category, category, "{description}");
            assert_eq!(e.message, description);
            assert_eq!(e.code, Some(status.to_string()));
            assert_eq!(e.http_status, Some(status));
            assert_eq!(e.channel, "telegram");
        }
    }

    #[test]
    fn refusals_of_edits_and_deletes_say_why() {
        for gone in [
            "Bad Request: message to edit not found",
            "Bad Request: message to delete not found",
        ] {
            let e = classify(400, &none(), &refusal(400, gone, Value::Null));
            assert_eq!(e.kind, FailureKind::Permanent);
            assert_eq!(e.category, Some(ErrorCategory::NotFound));
            assert_eq!((e.code.as_deref(), e.message.as_str()), (Some("400"), gone));
        }
        for old in [
            "Bad Request: message can't be deleted",
            "Bad Request: message can't be deleted for everyone",
        ] {
            let e = classify(400, &none(), &refusal(400, old, Value::Null));
            assert_eq!(e.kind, FailureKind::Permanent);
            assert_eq!(e.category, Some(ErrorCategory::Refused));
            assert!(
                e.message
                    .starts_with("Telegram deletes a bot's messages only within 48 hours"),
                "{}",
                e.message
            );
            assert!(
                e.message.ends_with(old),
                "Telegram's words kept: {}",
                e.message
            );
        }
        let e = classify(
            400,
            &none(),
            &refusal(
                400,
                "Bad Request: there is no text in the message to edit",
                Value::Null,
            ),
        );
        assert_eq!(e.category, Some(ErrorCategory::InvalidRequest));
        assert!(e.message.contains("cannot turn"), "{}", e.message);
    }

    #[test]
    fn garbage_is_judged_by_status_and_capped() {
        let e = classify(400, &none(), "not json");
        assert_eq!(e.kind, FailureKind::Permanent);
        assert_eq!(e.code.as_deref(), Some("http_400"));
        assert_eq!(e.message, "HTTP 400 without a Bot API answer");
        let e = classify(200, &none(), "<html>cached page</html>");
        assert_eq!(e.kind, FailureKind::Ambiguous);
        assert_eq!(e.code.as_deref(), Some("http_200"));
        assert_eq!(
            classify(200, &none(), r#"{"ok":true"#).kind,
            FailureKind::Ambiguous
        );
        // ok:true on an error status is not a success, and not Telegram's refusal either.
        let e = classify(500, &none(), r#"{"ok":true,"result":true}"#);
        assert_eq!(e.kind, FailureKind::Ambiguous);
    }

    fn client(base: &str) -> TelegramClient {
        let config = TelegramConfig {
            api_base_url: base.into(),
            bots: vec![TelegramBot {
                bot_id: "my_bot".into(),
                token: Secret::new(TOKEN),
                secret_token: None,
                receive: Default::default(),
            }],
            ..Default::default()
        };
        TelegramClient::new(config, Duration::from_secs(2)).unwrap()
    }

    fn request(url: String, bot: &str) -> NativeRequest {
        NativeRequest {
            method: HttpMethod::Post,
            url,
            body: Body::json(&serde_json::json!({"chat_id": 42, "text": "hi"})).unwrap(),
            credential: bot.into(),
            rate: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_token_only_goes_under_the_api_base_to_a_plain_method() {
        let c = client("https://api.telegram.org");
        assert!(c.has_credentials("my_bot") && !c.has_credentials("other"));
        assert!(c.has_any_credentials());
        for url in [
            "https://attacker.test/bot<token>/sendMessage".to_string(),
            "https://api.telegram.org.attacker.test/bot<token>/sendMessage".into(),
            "https://api.telegram.org/bot<token>/../x/sendMessage".into(),
            "https://api.telegram.org/bot<token>/sendMessage?chat_id=1".into(),
            "https://api.telegram.org/bot<token>/send%2FMessage".into(),
            "https://api.telegram.org/bot<token>/".into(),
            "https://api.telegram.org/botX/sendMessage".into(),
            format!("https://api.telegram.org/bot<token>/{}", "a".repeat(65)),
        ] {
            let e = c
                .execute(&request(url.clone(), "my_bot"))
                .await
                .unwrap_err();
            assert_eq!(e.code.as_deref(), Some("url_not_allowed"), "{url}");
            assert_eq!(e.kind, FailureKind::Permanent);
            assert!(!e.to_string().contains("attacker"), "{e}");
        }
        let mut get = request(method_url(c.config(), "sendMessage"), "my_bot");
        get.method = HttpMethod::Get;
        assert_eq!(
            c.execute(&get).await.unwrap_err().code.as_deref(),
            Some("url_not_allowed")
        );
    }

    #[tokio::test]
    async fn an_unknown_bot_is_named_and_no_token_shown() {
        let c = client("https://api.telegram.org");
        let e = c
            .execute(&request(method_url(c.config(), "sendMessage"), "other"))
            .await
            .unwrap_err();
        assert_eq!(e.code.as_deref(), Some("no_credentials"));
        assert_eq!(e.kind, FailureKind::Permanent);
        let text = format!("{e} {e:?}");
        assert!(
            text.contains("`other`") && text.contains("`my_bot`"),
            "{text}"
        );
        assert!(!text.contains(TOKEN), "{text}");
        let long = "b".repeat(10_000);
        let e = c
            .execute(&request(method_url(c.config(), "sendMessage"), &long))
            .await
            .unwrap_err();
        assert!(e.message.len() < 500, "{}", e.message.len());
    }

    #[tokio::test]
    async fn transport_errors_never_carry_the_token() {
        // A port nothing listens on: a connect error, whose text must not hold the URL.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let c = client(&format!("http://127.0.0.1:{port}"));
        let e = c
            .execute(&request(method_url(c.config(), "sendMessage"), "my_bot"))
            .await
            .unwrap_err();
        assert_eq!(e.kind, FailureKind::Retryable, "{e}");
        assert!(!format!("{e} {e:?}").contains(TOKEN), "{e:?}");
    }

    /// A server on 127.0.0.1 that answers each connection's one request with the next of
    /// `answers` (and closes it), and returns the request lines it saw.
    async fn serve(answers: Vec<(u16, String)>) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            for (status, body) in answers {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // The head, then as much body as Content-Length says.
                loop {
                    let n = s.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len: usize = text
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len || n == 0 {
                            seen.push(text.lines().next().unwrap_or_default().to_string());
                            break;
                        }
                    }
                }
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(answer.as_bytes()).await.unwrap();
            }
            seen
        });
        (base, task)
    }

    #[tokio::test]
    async fn an_edit_that_changes_nothing_is_a_success_and_keeps_the_message() {
        const UNMODIFIED: &str = "Bad Request: message is not modified: specified new message \
            content and reply markup are exactly the same as a current content and reply markup \
            of the message";
        let (base, server) = serve(vec![
            (400, refusal(400, UNMODIFIED, Value::Null)),
            (400, refusal(400, UNMODIFIED, Value::Null)),
            (400, refusal(400, UNMODIFIED, Value::Null)),
        ])
        .await;
        let c = client(&base);
        let call = |method: &str| NativeRequest {
            body: Body::json(&serde_json::json!({"chat_id": -100, "message_id": 17})).unwrap(),
            ..request(method_url(c.config(), method), "my_bot")
        };
        for edit in ["editMessageText", "editMessageMedia"] {
            let r = c.execute(&call(edit)).await.unwrap();
            assert_eq!(
                (r.native_id.as_str(), r.conversation_id.as_str()),
                ("17", "-100"),
                "{edit}"
            );
        }
        // Only an edit can be "not modified": anything else saying so is a refusal.
        let e = c.execute(&call("sendMessage")).await.unwrap_err();
        assert_eq!(e.kind, FailureKind::Permanent);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn the_token_goes_in_the_path_and_answers_become_receipts() {
        let message =
            |id: i64, chat: i64| serde_json::json!({"message_id": id, "chat": {"id": chat}});
        let ok = |result: Value| serde_json::json!({"ok": true, "result": result}).to_string();
        let (base, server) = serve(vec![
            (200, ok(message(5, 42))),
            (200, ok(Value::Array(vec![message(6, 42), message(7, 42)]))),
            (200, ok(Value::Bool(true))),
            // Telegram never echoes a token, but should it, nothing here passes it on.
            (
                400,
                refusal(400, &format!("Bad Request: bot{TOKEN} is odd"), Value::Null),
            ),
            // The token across the point where the message is cut: scrubbed first, then cut.
            (
                400,
                refusal(
                    400,
                    &format!("{}{TOKEN}{}", "x".repeat(505), "y".repeat(100_000)),
                    Value::Null,
                ),
            ),
        ])
        .await;
        let c = client(&base);
        let send = |method: &str| request(method_url(c.config(), method), "my_bot");
        let r = c.execute(&send("sendMessage")).await.unwrap();
        assert_eq!(
            (r.native_id.as_str(), r.conversation_id.as_str()),
            ("5", "42")
        );
        let r = c.execute(&send("sendMediaGroup")).await.unwrap();
        assert_eq!(
            (r.native_id.as_str(), r.conversation_id.as_str()),
            ("6", "42")
        );
        let r = c.execute(&send("sendChatAction")).await.unwrap();
        assert_eq!(
            (r.native_id.as_str(), r.conversation_id.as_str()),
            ("", "42")
        );
        let e = c.execute(&send("sendMessage")).await.unwrap_err();
        assert_eq!(e.message, "Bad Request: bot<redacted> is odd");
        assert_eq!(e.category, Some(ErrorCategory::InvalidRequest));
        let e = c.execute(&send("sendMessage")).await.unwrap_err();
        assert!(e.message.len() < 600, "capped: {}", e.message.len());
        assert!(!e.message.contains(&TOKEN[..6]), "{}", e.message);
        let seen = server.await.unwrap();
        assert_eq!(
            seen,
            [
                format!("POST /bot{TOKEN}/sendMessage HTTP/1.1"),
                format!("POST /bot{TOKEN}/sendMediaGroup HTTP/1.1"),
                format!("POST /bot{TOKEN}/sendChatAction HTTP/1.1"),
                format!("POST /bot{TOKEN}/sendMessage HTTP/1.1"),
                format!("POST /bot{TOKEN}/sendMessage HTTP/1.1"),
            ]
        );
    }
}
