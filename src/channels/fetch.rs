//! Fetching a file a person sent (`FetchAttachment`), channel-neutral: the request and answer
//! types of `Channel::fetch_attachment`, its errors, the URL checks every channel shares (no
//! credentials in a URL, https unless a loopback host the configuration names, no address
//! literal of a private network), and the download itself: one GET, no redirect followed, the
//! answer's status classified, its size bounded before and while reading, its time bounded, its
//! bytes handed on in pieces of at most [`CHUNK_BYTES`] as they arrive (never the whole file
//! in memory).
//!
//! Knows no channel: each channel's `fetch.rs` decides which URLs are its own and which
//! credential goes where, then calls [`download`]. Nothing here logs, and no error quotes a
//! URL (Telegram's download URL holds the bot's token).

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;

use super::RouteError;
use super::http::{Http, Streamed, TransportError};

/// The most bytes one fetch streams when the request asks for no less: 25 MiB, Slack's and
/// Messenger's usual upload sizes are under it, Telegram lets bots download 20 MB.
pub const DEFAULT_MAX_BYTES: u64 = 25 << 20;

/// The most bytes in one piece handed to the caller (one gRPC message).
pub const CHUNK_BYTES: usize = 64 << 10;

/// How long a whole download may take, whatever its pace: 25 MiB at ~90 KB/s. Each piece must
/// also come within the channel's request timeout (`delivery.request_timeout`).
pub const MAX_FETCH_TIME: Duration = Duration::from_secs(300);

/// The longest `content_url` taken: channels' file URLs are a few hundred characters.
pub const MAX_URL_CHARS: usize = 4096;

/// Characters kept of a media type or a file name from a channel's answer.
const MAX_LABEL_CHARS: usize = 255;

/// One file to fetch, as a received event named it.
#[derive(Debug, Clone, Copy)]
pub struct FetchRequest<'a> {
    /// The event's `address.channel_id`.
    pub channel_id: &'a str,
    /// The event's `address.bot.id`: selects the credentials.
    pub bot_id: &'a str,
    /// The attachment's `content_url`, as received.
    pub content_url: &'a str,
    /// The most bytes to stream, already bounded by [`DEFAULT_MAX_BYTES`].
    pub max_bytes: u64,
}

/// A file being fetched: what the channel said about it, then its bytes.
pub struct Fetched {
    /// The answer's media type, `application/octet-stream` when it named none.
    pub content_type: String,
    /// The last segment of the URL's path (Slack and Messenger URLs end in the file's name),
    /// when there is one.
    pub name: Option<String>,
    /// The size the channel announced, if it did.
    pub size: Option<u64>,
    /// The bytes in order, each piece at most [`CHUNK_BYTES`]; an error ends the stream.
    pub body: BoxStream<'static, Result<Bytes, FetchError>>,
}

/// Why a file cannot be fetched. The texts never quote a URL nor a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The request cannot be served as given: `field` is its path in the request.
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// The channel id is unknown, disabled or not configured.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// No credentials for the bot on this channel.
    #[error("{0}")]
    NoCredentials(String),
    /// The channel says there is no such file (any more).
    #[error("{0}")]
    NotFound(String),
    /// The channel refused the credentials sent, or answered in a way no fetch can get past
    /// (a redirect, a refusal): only the configuration or the file's owner can change it.
    #[error("{0}")]
    Refused(String),
    /// The file is over the bound of the request (or the channel's own).
    #[error("the file is over {limit} bytes (the fetch's bound)")]
    TooLarge { limit: u64 },
    /// The channel could not be reached or failed, or the download took too long: try again.
    #[error("{0}")]
    Unavailable(String),
    /// The channel cannot fetch files.
    #[error("{0}")]
    Unsupported(String),
}

impl FetchError {
    pub fn invalid_url(reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: "content_url",
            reason: reason.into(),
        }
    }

    /// The same error with every secret in `secrets` replaced: the last line of defence for a
    /// text that came from a channel or the transport.
    pub fn scrubbed<'a>(self, secrets: impl IntoIterator<Item = &'a str> + Clone) -> Self {
        let s = |t: String| super::shared::scrub_secrets(t, secrets.clone());
        match self {
            Self::InvalidArgument { field, reason } => Self::InvalidArgument {
                field,
                reason: s(reason),
            },
            Self::NoCredentials(t) => Self::NoCredentials(s(t)),
            Self::NotFound(t) => Self::NotFound(s(t)),
            Self::Refused(t) => Self::Refused(s(t)),
            Self::Unavailable(t) => Self::Unavailable(s(t)),
            Self::Unsupported(t) => Self::Unsupported(s(t)),
            e @ (Self::Route(_) | Self::TooLarge { .. }) => e,
        }
    }

    /// A channel API call made on the way to a file (Telegram's `getFile`, a Bot Framework
    /// token) that failed, by what the channel's client made of it.
    pub fn from_channel(e: super::ChannelError) -> Self {
        use super::{ErrorCategory, FailureKind};
        let text = e.message;
        match (e.code.as_deref(), e.category, e.kind) {
            (Some("no_credentials"), _, _) => Self::NoCredentials(text),
            (_, Some(ErrorCategory::NotFound), _) => Self::NotFound(text),
            (_, Some(ErrorCategory::Unauthorized | ErrorCategory::Refused), _) => {
                Self::Refused(text)
            }
            (_, _, FailureKind::Permanent) => Self::Refused(text),
            _ => Self::Unavailable(text),
        }
    }

    fn transport(channel: &str, e: &TransportError) -> Self {
        Self::Unavailable(format!(
            "{} error fetching the file from {channel}: {e}",
            e.what()
        ))
    }
}

/// The bound a request's `max_bytes` gives: 0 is the default, and no request goes past it.
pub fn bound(max_bytes: u64) -> u64 {
    match max_bytes {
        0 => DEFAULT_MAX_BYTES,
        n => n.min(DEFAULT_MAX_BYTES),
    }
}

/// `content_url` parsed, with the checks every channel makes before its own: an absolute
/// http(s) URL with a host, no `user:password@`, not too long. The reason never quotes it.
pub fn parse_url(content_url: &str) -> Result<url::Url, FetchError> {
    if content_url.is_empty() {
        return Err(FetchError::invalid_url(
            "required: the attachment's content_url",
        ));
    }
    if content_url.len() > MAX_URL_CHARS {
        return Err(FetchError::invalid_url(format!(
            "longer than {MAX_URL_CHARS} characters"
        )));
    }
    let url = url::Url::parse(content_url)
        .map_err(|e| FetchError::invalid_url(format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(FetchError::invalid_url("not an http(s) URL with a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(FetchError::invalid_url("must not carry a user or password"));
    }
    Ok(url)
}

/// Whether `url` is on the same origin (scheme, host, port) as `base`: a configured API base
/// whose host also serves files (the loopback fakes of tests, a self-hosted API server).
pub fn same_origin(url: &url::Url, base: &str) -> bool {
    url::Url::parse(base).is_ok_and(|b| {
        b.scheme() == url.scheme()
            && b.host_str()
                .zip(url.host_str())
                .is_some_and(|(a, b)| a.eq_ignore_ascii_case(b))
            && b.port_or_known_default() == url.port_or_known_default()
    })
}

/// Whether `host` (lowercase, as `url` gives it) is `domain` or one of its subdomains.
pub fn under_domain(host: &str, domain: &str) -> bool {
    host == domain
        || host
            .strip_suffix(domain)
            .is_some_and(|rest| rest.ends_with('.'))
}

/// Why an https URL fetched without credentials from a host the channel does not name may not
/// be: an address literal of this machine or a private, link-local or otherwise non-public
/// network (what a request forged by a bot would aim at), or `localhost`. `None` when it may.
/// A name that resolves to such an address is not caught here: only hosts a channel names, or
/// https to a public name, are ever fetched.
pub fn private_host_refusal(url: &url::Url) -> Option<String> {
    let refused = match url.host() {
        Some(url::Host::Ipv4(ip)) => {
            ip.is_private()
                || ip.is_loopback()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                || ip.is_documentation()
                || ip.is_multicast()
                || ip.octets()[0] == 0
                // Shared address space (100.64/10), benchmarking (198.18/15), IETF protocol
                // assignments (192.0.0/24), reserved (240/4).
                || (ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64)
                || (ip.octets()[0] == 198 && (ip.octets()[1] & 0xfe) == 18)
                || ip.octets()[..3] == [192, 0, 0]
                || ip.octets()[0] >= 240
        }
        Some(url::Host::Ipv6(ip)) => {
            let seg = ip.segments();
            ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80
                // Site-local (fec0::/10), 6to4 (2002::/16) and NAT64 (64:ff9b::/96) can all
                // reach an IPv4 address inside.
                || (seg[0] & 0xffc0) == 0xfec0
                || seg[0] == 0x2002
                || (seg[0] == 0x64 && seg[1] == 0xff9b)
                || ip.to_ipv4_mapped().is_some()
                || ip.to_ipv4().is_some()
        }
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.');
            d == "localhost" || d.ends_with(".localhost") || d.ends_with(".internal")
        }
        None => true,
    };
    refused.then(|| "names a host of a private network or this machine: not fetched".to_string())
}

/// The last segment of the URL's path, when it has one.
fn name_of(url: &url::Url) -> Option<String> {
    let last = url.path_segments()?.next_back()?;
    let decoded = percent_decode(last);
    let name = label(&decoded);
    (!name.is_empty()).then_some(name)
}

/// `%XX` decoded where it makes UTF-8; anything else kept as written.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

/// Text from a channel's answer made safe to hand on: control characters dropped, capped.
fn label(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_LABEL_CHARS)
        .collect()
}

/// The answer's media type: its `content-type` if it is one (`type/subtype` and parameters
/// of printable ASCII), else `application/octet-stream`.
fn media_type(s: &Streamed) -> String {
    s.headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| {
            t.len() <= MAX_LABEL_CHARS
                && t.split(';').next().is_some_and(|m| {
                    let mut parts = m.trim().split('/');
                    let ok = |p: Option<&str>| {
                        p.is_some_and(|p| {
                            !p.is_empty()
                                && p.bytes().all(|b| {
                                    b.is_ascii_alphanumeric() || b"!#$&^_.+-*".contains(&b)
                                })
                        })
                    };
                    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
                })
                && t.bytes().all(|b| (0x20..0x7f).contains(&b))
        })
        .unwrap_or("application/octet-stream")
        .to_string()
}

/// What a channel's answer to a file GET means, before its body is read.
fn classify(channel: &str, status: u16) -> Result<(), FetchError> {
    match status {
        200..=299 => Ok(()),
        300..=399 => Err(FetchError::Refused(format!(
            "{channel} answered the file request with a redirect (HTTP {status}), which is not \
             followed: the file is not served at that URL to these credentials"
        ))),
        401 | 403 => Err(FetchError::Refused(format!(
            "{channel} refused the file request (HTTP {status}): the bot's credentials may not \
             read it (a missing scope or permission)"
        ))),
        404 | 410 => Err(FetchError::NotFound(format!(
            "{channel} has no such file (HTTP {status})"
        ))),
        429 | 500..=599 => Err(FetchError::Unavailable(format!(
            "{channel} could not serve the file now (HTTP {status}): try again later"
        ))),
        _ => Err(FetchError::Refused(format!(
            "{channel} refused the file request (HTTP {status})"
        ))),
    }
}

/// Downloads `url` with `bearer` (if any) over `http`: one GET, no redirect followed, the
/// answer's head within the client's timeout, the whole body within [`MAX_FETCH_TIME`] and at
/// most `limit` bytes (a declared length over it is refused before reading). `channel` names
/// the channel in errors; `size_hint` is a size the channel announced before (Telegram's
/// `getFile`), used when the answer declares none. The URL must be one the channel checked.
pub async fn download(
    http: &Http,
    channel: &'static str,
    url: &url::Url,
    bearer: Option<&str>,
    limit: u64,
    size_hint: Option<u64>,
) -> Result<Fetched, FetchError> {
    let started = Instant::now();
    // A size the channel announced before is checked before any request.
    if size_hint.is_some_and(|n| n > limit) {
        return Err(FetchError::TooLarge { limit });
    }
    let uri =
        super::http::parse_uri(url.as_str()).map_err(|e| FetchError::transport(channel, &e))?;
    let answer = http
        .open(uri, bearer)
        .await
        .map_err(|e| FetchError::transport(channel, &e))?;
    classify(channel, answer.status)?;
    let declared = answer.declared_len();
    if let Some(n) = declared.or(size_hint)
        && n > limit
    {
        return Err(FetchError::TooLarge { limit });
    }
    let content_type = media_type(&answer);
    // A deadline that cannot be computed (a clock at its end) leaves only the per-piece bound.
    let deadline = started.checked_add(MAX_FETCH_TIME);
    let body = Pieces {
        answer,
        pending: Bytes::new(),
        read: 0,
        limit,
        deadline,
        channel,
        done: false,
    };
    Ok(Fetched {
        content_type,
        name: name_of(url),
        size: declared.or(size_hint),
        body: futures::stream::unfold(
            body,
            |mut p| async move { p.next().await.map(|item| (item, p)) },
        )
        .boxed(),
    })
}

/// The body being read: what the transport decoded, cut into pieces of [`CHUNK_BYTES`],
/// counted against the bound, and cut off at the deadline.
struct Pieces {
    answer: Streamed,
    pending: Bytes,
    read: u64,
    limit: u64,
    deadline: Option<Instant>,
    channel: &'static str,
    done: bool,
}

impl Pieces {
    async fn next(&mut self) -> Option<Result<Bytes, FetchError>> {
        if self.done {
            return None;
        }
        if self.pending.is_empty() {
            let chunk = match self.deadline {
                Some(at) => match tokio::time::timeout_at(at.into(), self.answer.chunk()).await {
                    Ok(c) => c,
                    Err(_) => Some(Err(TransportError::Timeout(MAX_FETCH_TIME))),
                },
                None => self.answer.chunk().await,
            };
            match chunk {
                None => {
                    self.done = true;
                    return None;
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(FetchError::transport(self.channel, &e)));
                }
                Some(Ok(data)) => {
                    self.read = self.read.saturating_add(data.len() as u64);
                    if self.read > self.limit {
                        self.done = true;
                        return Some(Err(FetchError::TooLarge { limit: self.limit }));
                    }
                    self.pending = data;
                }
            }
        }
        let n = self.pending.len().min(CHUNK_BYTES);
        Some(Ok(self.pending.split_to(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_the_default_or_lower() {
        assert_eq!(bound(0), DEFAULT_MAX_BYTES);
        assert_eq!(bound(10), 10);
        assert_eq!(bound(u64::MAX), DEFAULT_MAX_BYTES);
    }

    #[test]
    fn urls_are_checked_without_being_quoted() {
        for bad in [
            "",
            "files.slack.com/x",
            "ftp://files.slack.com/x",
            "https://user:pw@files.slack.com/x",
            "file:///etc/passwd",
        ] {
            let e = parse_url(bad).unwrap_err();
            assert!(matches!(
                e,
                FetchError::InvalidArgument {
                    field: "content_url",
                    ..
                }
            ));
            if !bad.is_empty() {
                assert!(!e.to_string().contains(bad), "{e}");
            }
        }
        assert!(parse_url(&format!("https://a.b/{}", "x".repeat(MAX_URL_CHARS))).is_err());
        assert!(parse_url("https://files.slack.com/files-pri/T-F/a.pdf").is_ok());
    }

    #[test]
    fn private_hosts_are_refused_public_ones_kept() {
        for private in [
            "https://127.0.0.1/x",
            "https://10.1.2.3/x",
            "https://192.168.0.1/x",
            "https://172.16.0.1/x",
            "https://169.254.169.254/latest/meta-data",
            "https://198.18.0.1/x",
            "https://240.0.0.1/x",
            "https://[64:ff9b::a00:1]/x",
            "https://[2002:a00:1::]/x",
            "https://[::10.0.0.1]/x",
            "https://100.64.0.1/x",
            "https://0.0.0.0/x",
            "https://[::1]/x",
            "https://[fd00::1]/x",
            "https://[fe80::1]/x",
            "https://[::ffff:127.0.0.1]/x",
            "https://localhost/x",
            "https://metadata.google.internal/x",
        ] {
            let url = url::Url::parse(private).unwrap();
            assert!(private_host_refusal(&url).is_some(), "{private}");
        }
        for public in [
            "https://smba.trafficmanager.net/x",
            "https://8.8.8.8/x",
            "https://[2606:4700::1]/x",
        ] {
            let url = url::Url::parse(public).unwrap();
            assert_eq!(private_host_refusal(&url), None, "{public}");
        }
    }

    #[test]
    fn origins_and_domains_compare_exactly() {
        let u = url::Url::parse("http://127.0.0.1:8080/files/x").unwrap();
        assert!(same_origin(&u, "http://127.0.0.1:8080/api"));
        assert!(!same_origin(&u, "http://127.0.0.1:8081/api"));
        assert!(!same_origin(&u, "https://127.0.0.1:8080/api"));
        assert!(under_domain("files.slack.com", "files.slack.com"));
        assert!(under_domain("scontent.xx.fbcdn.net", "fbcdn.net"));
        assert!(!under_domain("evilfbcdn.net", "fbcdn.net"));
        assert!(!under_domain("fbcdn.net.evil.com", "fbcdn.net"));
    }

    #[test]
    fn names_come_from_the_last_path_segment() {
        let n = |s: &str| name_of(&url::Url::parse(s).unwrap());
        assert_eq!(
            n("https://files.slack.com/files-pri/T-F/download/r%C3%A9sum%C3%A9.pdf").as_deref(),
            Some("résumé.pdf")
        );
        assert_eq!(n("https://a.b/").as_deref(), None);
        assert_eq!(n("https://a.b/%0a%0dx").as_deref(), Some("x"));
    }

    #[test]
    fn statuses_map_to_what_a_bot_can_do() {
        assert!(classify("Slack", 200).is_ok());
        assert!(matches!(
            classify("Slack", 302),
            Err(FetchError::Refused(_))
        ));
        assert!(matches!(
            classify("Slack", 403),
            Err(FetchError::Refused(_))
        ));
        assert!(matches!(
            classify("Slack", 404),
            Err(FetchError::NotFound(_))
        ));
        assert!(matches!(
            classify("Slack", 503),
            Err(FetchError::Unavailable(_))
        ));
        assert!(matches!(
            classify("Slack", 429),
            Err(FetchError::Unavailable(_))
        ));
    }

    #[test]
    fn scrubbing_removes_a_secret_from_every_text() {
        let e = FetchError::Unavailable("at /file/bot123:ABC/x".into()).scrubbed(["123:ABC"]);
        assert_eq!(e.to_string(), "at /file/bot<redacted>/x");
    }
}
