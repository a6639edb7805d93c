//! HTTP client for the Slack Web API: bot tokens per workspace, `chat.postMessage` and
//! `conversations.open` calls, and the classification of Slack's answers, whose errors come as
//! HTTP 200 with `{"ok": false, "error": "code"}`.
//!
//! The only place that talks HTTP to Slack. A token is only sent to URLs under
//! `channels.slack.api_base_url`; no token is ever logged or put in an error.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use super::config::SlackConfig;
use super::render::{open_request, opened_address};
use crate::channels::http::{Http, Payload, TransportError, parse_uri};
use crate::channels::shared::retry_after;
use crate::channels::{
    ChannelError, ErrorCategory, FailureKind, HttpMethod, NativeReceipt, NativeRequest,
};
use crate::model::{Address, ProactiveOptions};
use crate::settings::Secret;

const CHANNEL: &str = "slack";
/// The wait after `ratelimited` when Slack gives no Retry-After: its per-channel pace.
const DEFAULT_RATE_LIMIT_WAIT: Duration = Duration::from_secs(1);

/// Slack error codes that are not a permanent refusal, with why. Every other code is permanent:
/// repeating a request Slack refused for a reason we do not know would only be refused again
/// (and risks hammering a workspace).
const NOT_PERMANENT: &[(&str, FailureKind, &str)] = &[
    (
        "ratelimited",
        FailureKind::Retryable,
        "rate limited: nothing was posted; wait for Retry-After",
    ),
    (
        "rate_limited",
        FailureKind::Retryable,
        "older spelling of ratelimited",
    ),
    (
        "service_unavailable",
        FailureKind::Retryable,
        "Slack is briefly unavailable; nothing was posted",
    ),
    (
        "request_timeout",
        FailureKind::Retryable,
        "the POST body arrived missing or truncated, so nothing was posted",
    ),
    (
        "team_added_to_org",
        FailureKind::Retryable,
        "the workspace is migrating into an Enterprise org; Slack asks to retry later",
    ),
    (
        "internal_error",
        FailureKind::Ambiguous,
        "Slack says part of the operation may have succeeded: a retry may duplicate",
    ),
    (
        "fatal_error",
        FailureKind::Ambiguous,
        "Slack says part of the operation may have succeeded: a retry may duplicate",
    ),
];

/// Permanent codes worth naming, with why (documentation for operators; the default is the same).
pub const PERMANENT: &[(&str, &str)] = &[
    (
        "channel_not_found",
        "the channel id is wrong or the bot cannot see it",
    ),
    (
        "not_in_channel",
        "the bot must be invited to the channel first",
    ),
    ("is_archived", "the channel is archived"),
    ("msg_too_long", "the text is too long"),
    ("msg_blocks_too_long", "the blocks hold too many characters"),
    ("no_text", "the message has no text and no blocks"),
    (
        "invalid_blocks",
        "a block breaks a Block Kit rule (see the message)",
    ),
    (
        "invalid_blocks_format",
        "blocks are not a JSON array of blocks",
    ),
    ("too_many_attachments", "more than 100 legacy attachments"),
    ("invalid_auth", "the token is not valid"),
    ("not_authed", "no token was sent"),
    (
        "account_inactive",
        "the token belongs to a deleted user or workspace",
    ),
    ("token_revoked", "the token was revoked"),
    (
        "token_expired",
        "the token expired (rotating tokens are not refreshed here)",
    ),
    (
        "missing_scope",
        "the token lacks a scope (chat:write, im:write)",
    ),
    ("no_permission", "the workspace does not allow it"),
    (
        "restricted_action",
        "a workspace preference forbids posting here",
    ),
    (
        "restricted_action_read_only_channel",
        "the channel is read-only",
    ),
    (
        "restricted_action_thread_only_channel",
        "the channel takes thread replies only",
    ),
    (
        "restricted_action_non_threadable_channel",
        "the channel takes no thread replies",
    ),
    (
        "cannot_reply_to_message",
        "thread_ts names a message that takes no replies",
    ),
    ("thread_not_found", "thread_ts names no message"),
    ("ekm_access_denied", "administrators suspended posting"),
    ("invalid_arguments", "the request is malformed"),
    ("user_not_found", "a user id of conversations.open is wrong"),
    ("user_not_visible", "the bot may not see that user"),
    ("user_disabled", "the user is deactivated"),
    ("not_enough_users", "a group DM needs more people"),
    ("too_many_users", "a group DM holds at most 8 people"),
    ("cannot_dm_bot", "a bot cannot be sent a DM"),
    (
        "cant_update_message",
        "this bot may not edit that message (it did not post it)",
    ),
    (
        "edit_window_closed",
        "the workspace's message edit window for that message has closed",
    ),
    (
        "message_not_found",
        "no message has that ts in that channel (deleted, or never posted there)",
    ),
    (
        "cant_delete_message",
        "this bot may not delete that message (it did not post it)",
    ),
];

/// How to treat Slack error `code`, and why.
pub fn classify_code(code: &str) -> (FailureKind, &'static str) {
    if let Some((_, kind, why)) = NOT_PERMANENT.iter().find(|(c, _, _)| *c == code) {
        return (*kind, why);
    }
    let why = PERMANENT
        .iter()
        .find(|(c, _)| *c == code)
        .map_or("Slack refused the request", |(_, why)| why);
    (FailureKind::Permanent, why)
}

/// Slack's answer `body` (HTTP `status`, `headers`) as a success value or a typed error.
/// `headers` is called only for a refusal: a success needs none.
pub fn check_answer(
    status: u16,
    headers: impl FnOnce() -> http::header::HeaderMap,
    body: &str,
) -> Result<Value, ChannelError> {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let ok = parsed
        .as_ref()
        .and_then(|v| v.get("ok"))
        .and_then(Value::as_bool);
    let code = parsed
        .as_ref()
        .and_then(|v| v.get("error"))
        .and_then(Value::as_str)
        .map(String::from);
    if (200..300).contains(&status) && ok == Some(true) {
        if let Some(w) = parsed
            .as_ref()
            .and_then(|v| v.get("warning"))
            .and_then(Value::as_str)
        {
            tracing::info!(
                slack_warning = %crate::bounded::for_log(w),
                "slack accepted the request with a warning"
            );
        }
        return parsed.ok_or_else(|| unreadable(status));
    }
    if (200..300).contains(&status) && ok.is_none() {
        // The request reached Slack and was answered: it may have been posted.
        return Err(unreadable(status));
    }
    let headers = &headers();
    let (kind, why, code) = match (status, code) {
        (429, code) => (
            FailureKind::Retryable,
            "rate limited: nothing was posted; wait for Retry-After",
            code.unwrap_or_else(|| "ratelimited".into()),
        ),
        (_, Some(code)) => {
            let (kind, why) = classify_code(&code);
            (kind, why, code)
        }
        (503, None) => (
            FailureKind::Retryable,
            "Slack is briefly unavailable",
            "http_503".into(),
        ),
        // The answer came from a proxy that may have forwarded the request: it may have been posted.
        (500..=599, None) => (
            FailureKind::Ambiguous,
            "server error without a Slack answer: the request may have been handled",
            format!("http_{status}"),
        ),
        (_, None) => (
            FailureKind::Permanent,
            "HTTP error without a Slack answer",
            format!("http_{status}"),
        ),
    };
    let detail = parsed
        .as_ref()
        .and_then(|v| v.pointer("/response_metadata/messages"))
        .and_then(Value::as_array)
        .map(|m| {
            m.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("; ")
        })
        .filter(|s| !s.is_empty());
    let message = match detail {
        Some(d) => format!("{why} ({d})"),
        None => why.to_string(),
    };
    let wait = (kind == FailureKind::Retryable
        && matches!(code.as_str(), "ratelimited" | "rate_limited")
        || status == 429)
        .then(|| retry_after(headers).unwrap_or(DEFAULT_RATE_LIMIT_WAIT));
    let category = category(&code);
    Err(ChannelError {
        channel: CHANNEL.into(),
        kind,
        http_status: Some(status),
        code: Some(code),
        message,
        retry_after: wait.or_else(|| (status == 503).then(|| retry_after(headers)).flatten()),
        category,
    })
}

/// Slack answers refusals with HTTP 200; its code says what kind they are.
fn category(code: &str) -> Option<ErrorCategory> {
    Some(match code {
        "channel_not_found" | "user_not_found" | "users_not_found" | "thread_not_found"
        | "message_not_found" => ErrorCategory::NotFound,
        "invalid_blocks"
        | "invalid_blocks_format"
        | "invalid_arguments"
        | "msg_too_long"
        | "msg_blocks_too_long"
        | "no_text"
        | "too_many_attachments"
        | "invalid_attachments"
        | "invalid_metadata_format"
        | "markdown_text_conflict" => ErrorCategory::InvalidRequest,
        "invalid_auth" | "not_authed" | "token_revoked" | "token_expired" | "account_inactive"
        | "missing_scope" | "no_permission" | "ekm_access_denied" => ErrorCategory::Unauthorized,
        "not_in_channel"
        | "is_archived"
        | "channel_is_archived"
        | "restricted_action"
        | "cannot_dm_bot"
        | "user_is_bot"
        | "team_access_not_granted" => ErrorCategory::Refused,
        _ => return None,
    })
}

fn unreadable(status: u16) -> ChannelError {
    ChannelError {
        http_status: Some(status),
        code: Some("unreadable_answer".into()),
        ..ChannelError::new(
            CHANNEL,
            FailureKind::Ambiguous,
            "Slack's answer is not the JSON it documents: the request may have been handled",
        )
    }
}

fn transport_error(e: &TransportError) -> ChannelError {
    // A connect failure never reached Slack; a timeout or reset after sending might have.
    e.to_channel_error(CHANNEL, "Slack", false)
}

pub struct SlackClient {
    http: Http,
    config: SlackConfig,
    tokens: HashMap<String, Secret>,
}

impl SlackClient {
    pub fn new(config: SlackConfig, request_timeout: Duration) -> Result<Self, String> {
        let http = Http::new(request_timeout)?;
        let tokens = config
            .workspaces
            .iter()
            .map(|w| (w.bot_id.clone(), w.token.clone()))
            .collect();
        Ok(Self {
            http,
            config,
            tokens,
        })
    }

    pub fn config(&self) -> &SlackConfig {
        &self.config
    }

    /// The transport, for a file download (`fetch.rs`), which reads its answer piece by piece.
    pub(super) fn http(&self) -> &Http {
        &self.http
    }

    /// `bot_id`'s token, for `fetch.rs`, which sends it only to Slack's file hosts.
    pub(super) fn token(&self, bot_id: &str) -> Option<&Secret> {
        self.tokens.get(bot_id)
    }

    /// Whether `bot_id` (address.bot.id) has a token configured.
    pub fn has_credentials(&self, bot_id: &str) -> bool {
        self.tokens.contains_key(bot_id)
    }

    /// Whether any bot has credentials here: a channel without any cannot send anything.
    pub fn has_any_credentials(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// POSTs one Web API request with the bot's token and returns Slack's `ok: true` answer.
    async fn call(&self, req: &NativeRequest) -> Result<Value, ChannelError> {
        let base = format!("{}/", self.config.api_base_url.trim_end_matches('/'));
        if !req.url.starts_with(&base) || req.method != HttpMethod::Post {
            // A token only ever goes to the configured API.
            return Err(ChannelError {
                code: Some("url_not_allowed".into()),
                ..ChannelError::new(
                    CHANNEL,
                    FailureKind::Permanent,
                    "the request is not a POST under channels.slack.api_base_url",
                )
            });
        }
        let token = self
            .tokens
            .get(&req.credential)
            .ok_or_else(|| ChannelError {
                code: Some("no_credentials".into()),
                ..ChannelError::new(
                    CHANNEL,
                    FailureKind::Permanent,
                    format!(
                        "no token configured for bot `{}` (channels.slack.workspaces)",
                        req.credential
                    ),
                )
            })?;
        let method = req.url.rsplit('/').next().unwrap_or_default();
        let payload = Payload {
            content_type: "application/json; charset=utf-8",
            bytes: req.body.as_bytes().into(),
        };
        let resp = self
            .http
            .send(
                http::Method::POST,
                parse_uri(&req.url).map_err(|e| transport_error(&e))?,
                Some(token.expose()),
                Some(payload),
            )
            .await
            .map_err(|e| {
                let err = transport_error(&e);
                tracing::debug!(method, error = %err, "slack call failed");
                err
            })?;
        let status = resp.status;
        check_answer(status, || resp.headers(), &resp.text()).inspect_err(|e| {
            tracing::debug!(method, status, code = e.code.as_deref().unwrap_or_default(), kind = ?e.kind, "slack refused the request");
        })
    }

    /// Sends one `chat.postMessage`; the receipt carries Slack's `ts` and channel id.
    pub async fn execute(&self, req: &NativeRequest) -> Result<NativeReceipt, ChannelError> {
        let answer = match self.call(req).await {
            Ok(a) => a,
            // A message to delete that is gone already: the delete's purpose holds, and one
            // carried out again after a crash (its first attempt went through) must not fail
            // the change, nor stop before the message's other native messages.
            Err(e)
                if e.code.as_deref() == Some("message_not_found")
                    && req.url.ends_with("/chat.delete") =>
            {
                tracing::debug!("slack: the message to delete is gone already; it counts as done");
                req.body.value().clone()
            }
            Err(e) => return Err(e),
        };
        let text = |k: &str| answer.get(k).and_then(Value::as_str).map(String::from);
        Ok(NativeReceipt {
            native_id: text("ts").unwrap_or_default(),
            conversation_id: text("channel")
                .or_else(|| {
                    req.body
                        .value()
                        .get("channel")
                        .and_then(Value::as_str)
                        .map(String::from)
                })
                .unwrap_or_default(),
        })
    }

    /// `conversations.open` with the address's user (and `options.members` for a group DM);
    /// returns the address with the DM's channel id as its conversation.
    pub async fn create_conversation(
        &self,
        address: &Address,
        options: &ProactiveOptions,
    ) -> Result<Address, ChannelError> {
        let req =
            open_request(address, options, &self.config, "address").map_err(|e| ChannelError {
                code: Some("render".into()),
                ..ChannelError::new(CHANNEL, FailureKind::Permanent, e.to_string())
            })?;
        let answer = self.call(&req).await?;
        let id = answer
            .pointer("/channel/id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ChannelError {
                code: Some("no_channel_id".into()),
                ..ChannelError::new(
                    CHANNEL,
                    FailureKind::Permanent,
                    "conversations.open answered without a channel id",
                )
            })?;
        tracing::info!(bot_id = address.bot_id(), channel = id, "slack DM opened");
        Ok(opened_address(address, id, options))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderMap;

    fn headers(retry: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(r) = retry {
            h.insert("retry-after", r.parse().unwrap());
        }
        h
    }

    #[test]
    fn ok_false_on_http_200_is_a_failure_with_the_code() {
        let e = check_answer(
            200,
            || headers(None),
            r#"{"ok":false,"error":"channel_not_found"}"#,
        )
        .unwrap_err();
        assert_eq!(e.kind, FailureKind::Permanent);
        assert_eq!(e.code.as_deref(), Some("channel_not_found"));
        assert_eq!(e.http_status, Some(200));
        assert_eq!(e.retry_after, None);
    }

    #[test]
    fn success_needs_ok_true() {
        let v = check_answer(
            200,
            || headers(None),
            r#"{"ok":true,"channel":"C1","ts":"1.2","warning":"missing_charset"}"#,
        )
        .unwrap();
        assert_eq!(v["ts"], "1.2");
        let e = check_answer(200, || headers(None), "<html>proxy</html>").unwrap_err();
        assert_eq!(e.kind, FailureKind::Ambiguous);
        assert_eq!(e.code.as_deref(), Some("unreadable_answer"));
    }

    #[test]
    fn rate_limits_honour_retry_after() {
        let e = check_answer(
            429,
            || headers(Some("7")),
            r#"{"ok":false,"error":"ratelimited"}"#,
        )
        .unwrap_err();
        assert_eq!(e.kind, FailureKind::Retryable);
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(e.code.as_deref(), Some("ratelimited"));
        let e = check_answer(429, || headers(None), "").unwrap_err();
        assert_eq!(e.retry_after, Some(DEFAULT_RATE_LIMIT_WAIT));
        let e = check_answer(
            200,
            || headers(Some("2")),
            r#"{"ok":false,"error":"ratelimited"}"#,
        )
        .unwrap_err();
        assert_eq!(e.retry_after, Some(Duration::from_secs(2)));
    }

    #[test]
    fn classification_table() {
        for (code, kind) in [
            ("ratelimited", FailureKind::Retryable),
            ("service_unavailable", FailureKind::Retryable),
            ("request_timeout", FailureKind::Retryable),
            ("internal_error", FailureKind::Ambiguous),
            ("fatal_error", FailureKind::Ambiguous),
            ("channel_not_found", FailureKind::Permanent),
            ("not_in_channel", FailureKind::Permanent),
            ("invalid_auth", FailureKind::Permanent),
            ("msg_blocks_too_long", FailureKind::Permanent),
            ("some_new_code", FailureKind::Permanent),
        ] {
            assert_eq!(classify_code(code).0, kind, "{code}");
        }
        for (code, _) in PERMANENT {
            assert_eq!(classify_code(code).0, FailureKind::Permanent, "{code}");
            assert!(
                !NOT_PERMANENT.iter().any(|(c, _, _)| c == code),
                "{code} listed twice"
            );
        }
    }

    #[test]
    fn http_errors_without_a_slack_answer() {
        assert_eq!(
            check_answer(503, || headers(Some("3")), "")
                .unwrap_err()
                .retry_after,
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            check_answer(502, || headers(None), "bad gateway")
                .unwrap_err()
                .kind,
            FailureKind::Ambiguous
        );
        let e = check_answer(404, || headers(None), "not found").unwrap_err();
        assert_eq!(e.kind, FailureKind::Permanent);
        assert_eq!(e.code.as_deref(), Some("http_404"));
    }

    #[test]
    fn invalid_blocks_detail_is_kept() {
        let e = check_answer(
            200,
            || headers(None),
            r#"{"ok":false,"error":"invalid_blocks","response_metadata":{"messages":["[ERROR] must be less than 76 characters [json-pointer:/blocks/1/elements/0/text/text]"]}}"#,
        )
        .unwrap_err();
        assert!(
            e.message.contains("json-pointer:/blocks/1"),
            "{}",
            e.message
        );
    }

    #[tokio::test]
    async fn refuses_urls_outside_the_api_and_unknown_bots() {
        let config = SlackConfig {
            workspaces: vec![super::super::config::SlackWorkspace {
                bot_id: "B1".into(),
                token: Secret::new("xoxb-test-token"),
                team_id: None,
                signing_secret: None,
                receive: Default::default(),
                app_token: None,
            }],
            ..Default::default()
        };
        let client = SlackClient::new(config, Duration::from_secs(1)).unwrap();
        assert!(client.has_credentials("B1") && !client.has_credentials("B2"));
        let mut req = NativeRequest {
            method: HttpMethod::Post,
            url: "https://attacker.test/api/chat.postMessage".into(),
            body: crate::channels::Body::json(&serde_json::json!({})).unwrap(),
            credential: "B1".into(),
            rate: Default::default(),
        };
        let e = client.execute(&req).await.unwrap_err();
        assert_eq!(e.code.as_deref(), Some("url_not_allowed"));
        req.url = "https://slack.com/api.evil.test/x".into();
        assert_eq!(
            client.execute(&req).await.unwrap_err().code.as_deref(),
            Some("url_not_allowed")
        );
        req.url = "https://slack.com/api/chat.postMessage".into();
        req.credential = "B2".into();
        let e = client.execute(&req).await.unwrap_err();
        assert_eq!(e.code.as_deref(), Some("no_credentials"));
        assert!(!format!("{e:?}{e}").contains("xoxb-test-token"));
    }
}
