//! Maps the gateway's typed errors to gRPC statuses with google.rpc details: BadRequest field
//! violations for bad input, PreconditionFailure for an unconfigured channel, ErrorInfo carrying
//! the channel's own code for a delivery failure.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use super::convert::Violations;
use crate::channels::{ChannelError, FailureKind, RenderError, RenderOrRoute, RouteError};
use crate::delivery::SubmitError;

pub const DOMAIN: &str = "channel-gateway";

/// Bad input: every violation kept (see `Violations`) in the message and as BadRequest field
/// violations, then how many more there were.
pub fn invalid(v: Violations) -> Status {
    let mut summary = v
        .kept()
        .iter()
        .map(|(f, d)| format!("{f}: {d}"))
        .collect::<Vec<_>>()
        .join("; ");
    let mut violations: Vec<FieldViolation> = v
        .kept()
        .iter()
        .map(|(f, d)| FieldViolation::new(f.as_str(), d.as_str()))
        .collect();
    if v.more() > 0 {
        let more = format!("and {} more violations not listed", v.more());
        summary.push_str("; ");
        summary.push_str(&more);
        violations.push(FieldViolation::new("", more));
    }
    Status::with_error_details(
        Code::InvalidArgument,
        summary,
        ErrorDetails::with_bad_request(violations),
    )
}

pub fn invalid_field(field: impl Into<String>, description: impl Into<String>) -> Status {
    let mut v = Violations::default();
    v.add(field, description);
    invalid(v)
}

/// `field` is where the channel id sits in the request (for an unknown channel).
pub fn route(e: RouteError, field: &str) -> Status {
    match e {
        RouteError::Unknown(id) => invalid_field(
            field,
            format!(
                "unknown channel `{id}` (see GetCapabilities and channels.botframework.channel_ids)"
            ),
        ),
        RouteError::NotConfigured { channel_id, reason } => Status::with_error_details(
            Code::FailedPrecondition,
            format!("channel `{channel_id}` is not configured: {reason}"),
            ErrorDetails::with_precondition_failure_violation(
                "CHANNEL_NOT_CONFIGURED",
                channel_id,
                reason,
            ),
        ),
        RouteError::NoCredentials { channel_id, reason } => Status::with_error_details(
            Code::FailedPrecondition,
            reason.clone(),
            ErrorDetails::with_precondition_failure_violation(
                "CHANNEL_NOT_CONFIGURED",
                channel_id,
                reason,
            ),
        ),
        RouteError::PermissionDenied { field, reason } => Status::with_error_details(
            Code::PermissionDenied,
            format!("{field}: {reason}"),
            ErrorDetails::with_bad_request_violation(field, reason),
        ),
        RouteError::InvalidArgument { field, reason } => invalid_field(field, reason),
    }
}

/// A render error names fields relative to `message`; `prefix` is where that message sits.
pub fn render(e: RenderOrRoute, prefix: &str, channel_field: &str) -> Status {
    // `prefix` may be empty when the request has no message wrapper (SendTyping's `address`).
    let rebase = |f: String| match (f.strip_prefix("message."), f.as_str()) {
        (Some(rest), _) if prefix.is_empty() => rest.to_string(),
        (Some(rest), _) => format!("{prefix}.{rest}"),
        (None, "message") if !prefix.is_empty() => prefix.to_string(),
        _ => f,
    };
    match e {
        RenderOrRoute::Render(RenderError::InvalidArgument { field, reason }) => {
            invalid_field(rebase(field), reason)
        }
        RenderOrRoute::Render(RenderError::Unimplemented { field, reason }) => {
            Status::unimplemented(format!("{}: {reason}", rebase(field)))
        }
        RenderOrRoute::Render(RenderError::PermissionDenied { field, reason }) => route(
            RouteError::PermissionDenied {
                field: rebase(field),
                reason,
            },
            channel_field,
        ),
        RenderOrRoute::Route(r) => route(r, channel_field),
    }
}

pub fn submit(e: SubmitError) -> Status {
    match e {
        SubmitError::ShuttingDown => {
            Status::unavailable("the gateway is shutting down; retry on another instance")
        }
        SubmitError::Backpressure { bound, .. } => Status::with_error_details(
            Code::ResourceExhausted,
            e.to_string(),
            ErrorDetails::with_quota_failure_violation(bound, e.to_string()),
        ),
        SubmitError::NotFound(_) => Status::not_found(e.to_string()),
        SubmitError::NotFailed(_) | SubmitError::NotHere | SubmitError::NotRedeliverable(..) => {
            Status::failed_precondition(e.to_string())
        }
        SubmitError::Store(e) => outbox_read(e),
    }
}

/// The outbox could not make an accepted message durable: the caller must retry.
pub fn outbox(e: crate::outbox::StoreError) -> Status {
    if e == crate::outbox::StoreError::KeyTaken {
        // Answered from the first acceptance by `GatewayService::idempotent`; a caller sees
        // this only if that one could not be read.
        return Status::aborted(KEY_TAKEN);
    }
    Status::unavailable(format!("message not stored: {e}; retry"))
}

/// Another replica accepted the same idempotency key first: retry to get its answer.
pub const KEY_TAKEN: &str = "the idempotency key was accepted by another gateway replica at the same moment; retry \
     with the same key for its answer";

/// `outbox`'s answer to a key another replica took first.
pub fn is_key_taken(s: &Status) -> bool {
    s.code() == tonic::Code::Aborted && s.message() == KEY_TAKEN
}

/// The outbox could not be read (its engine is unreachable, or a row is corrupt): not the same
/// as a message it does not know, so the caller may retry.
pub fn outbox_read(e: crate::outbox::StoreError) -> Status {
    Status::unavailable(format!("outbox read failed: {e}; retry"))
}

/// The channel's refusal as a status: its code and text in the message and in ErrorInfo.
pub fn channel(e: &ChannelError, attempts: u32, possible_duplicate: bool) -> Status {
    use crate::channels::ErrorCategory as C;
    let code = match (e.code.as_deref(), e.http_status) {
        _ if e.category == Some(C::NotFound) => Code::NotFound,
        _ if e.category == Some(C::InvalidRequest) => Code::InvalidArgument,
        _ if matches!(e.category, Some(C::Unauthorized | C::Refused)) => Code::FailedPrecondition,
        (Some("expired"), _) => Code::DeadlineExceeded,
        (Some("service_url_not_allowed"), _) => Code::PermissionDenied,
        (Some("no_credentials"), _) => Code::FailedPrecondition,
        (_, Some(400 | 413 | 422)) => Code::InvalidArgument,
        (_, Some(401 | 403)) => Code::FailedPrecondition,
        (_, Some(404)) => Code::NotFound,
        (_, Some(405 | 501)) => Code::Unimplemented,
        (_, Some(409)) => Code::Aborted,
        (_, Some(429)) => Code::ResourceExhausted,
        _ if e.kind == FailureKind::Permanent => Code::FailedPrecondition,
        _ => Code::Unavailable,
    };
    let mut meta = HashMap::new();
    meta.insert("channel".to_string(), e.channel.clone());
    if let Some(s) = e.http_status {
        meta.insert("http_status".into(), s.to_string());
    }
    meta.insert(
        "permanent".into(),
        (e.kind == FailureKind::Permanent).to_string(),
    );
    meta.insert("attempts".into(), attempts.to_string());
    meta.insert("possible_duplicate".into(), possible_duplicate.to_string());
    if let Some(c) = &e.code {
        meta.insert("channel_code".into(), c.clone());
    }
    // `e`'s text is bounded when it is displayed (and when it is stored).
    Status::with_error_details(
        code,
        format!(
            "delivery failed after {attempts} attempt{}: {e}",
            if attempts == 1 { "" } else { "s" }
        ),
        ErrorDetails::with_error_info(
            e.code.clone().unwrap_or_else(|| "channel_error".into()),
            DOMAIN,
            meta,
        ),
    )
}
