//! The HTTP transport the channel clients share: a pooled HTTP/1.1 client with HTTPS
//! on the webpki roots, an `HTTPS_PROXY`/`ALL_PROXY` tunnel that honours `NO_PROXY`, one
//! timeout for the whole call, a bound on the answer's size, and no redirects; `open` reads
//! one answer piece by piece instead (a file download), its bound left to the caller.
//!
//! It owns connections and bytes on the wire, nothing else: it knows no channel, no token and
//! no URL rule (each client checks where its credentials may go before calling), and it never
//! logs. Its errors say whether the request can have reached the server, which is what the
//! clients need to classify a failure.
//!
//! Why hyper's client connection (`hyper::client::conn::http1`): the answer comes from a server
//! on the internet, and its framing (status line, headers, content-length, chunked coding,
//! extensions, trailers, interim answers, keep-alive) is where a hostile server attacks. This
//! module once framed answers itself with `httparse` and its own chunked decoder; it was
//! measured cheaper (no connection task, no channel between caller and connection, no header
//! map per answer: bench/PROFILE.md), and it kept every byte of chunk-size lines and trailers,
//! so an answer of endless tiny chunks or trailers took the gateway past a gigabyte in a second.
//! A parser that millions of deployments exercise is worth a moderate CPU cost per message.
//! hyper bounds the head, chunk extensions and trailers; this module adds the bound on the
//! decoded body, a meter of the bytes each answer takes off the wire, and the one deadline.
//! Why not reqwest or hyper-util's pooled `Client` on top: reqwest adds redirect and retry
//! layers we switch off and parses each URL again, and neither gives a hook to meter one
//! answer's bytes on its connection; the pool below keeps the reuse rules in a few lines.
//!
//! The pool: a connection goes back only after its answer was read whole; hyper itself closes
//! one whose server said `connection: close`, spoke HTTP/1.0 without keep-alive or sent bytes
//! nobody asked for, and such a connection is then skipped, never failed: a request it returns
//! unsent goes on another. Why HTTP/1.1 only: a pool of connections lets one busy channel host take as many
//! parallel calls as `delivery.max_concurrency` allows, where HTTP/2 would put them all on one
//! connection under the server's stream limit (measured slower here too, bench/PROFILE.md).

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Method, Request, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower::{Service, ServiceExt};

use super::{Body, ChannelError, FailureKind, HttpMethod};

/// Channel answers are small JSON documents; anything bigger is not one.
pub const MAX_ANSWER_BYTES: usize = 4 << 20;

const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// An answer's status line and headers may take this much (and its trailers as much again);
/// channels send a few hundred bytes.
const MAX_HEAD_BYTES: usize = 64 << 10;
/// Headers an answer may have (and trailers); channels send about a dozen.
const MAX_HEADERS: usize = 64;
/// hyper's read buffer for a connection at most: the head must fit in it.
const MAX_READ_BUFFER: usize = 2 * MAX_HEAD_BYTES;
/// What an answer may take off the wire beyond its decoded body: its head, its framing (chunk
/// lines, trailers), TLS records, and what hyper and rustls read ahead of what they decoded.
/// Channels' answers take a few hundred bytes; many tiny chunks or an endless chunk line reach
/// it within a fraction of a second, where the bound on the decoded body alone would let them
/// run ~6 bytes of work per byte of body.
const MAX_OVERHEAD_BYTES: usize = 512 << 10;

/// Why a call got no answer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The request could not be built (a URL or header the HTTP stack refuses): nothing was sent.
    #[error("invalid request: {0}")]
    Request(String),
    /// No connection (refused, DNS, TLS handshake, proxy tunnel): nothing was sent.
    #[error("{0}")]
    Connect(String),
    /// No complete answer within the call's timeout: the request may have been handled.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed after the request was (or may have been) written.
    #[error("{0}")]
    Transport(String),
}

impl TransportError {
    /// Whether the server can have seen the request.
    pub fn may_have_reached(&self) -> bool {
        matches!(self, Self::Timeout(_) | Self::Transport(_))
    }

    /// A short name for the failure, used as the error code.
    pub fn what(&self) -> &'static str {
        match self {
            Self::Request(_) => "request",
            Self::Connect(_) => "connect",
            Self::Timeout(_) => "timeout",
            Self::Transport(_) => "transport",
        }
    }

    /// The failure as a channel reports it. A call that changes nothing (`idempotent`: a read,
    /// a token request) is retried whatever happened on the wire; any other call that may have
    /// arrived is ambiguous, since repeating it may duplicate a message.
    pub fn to_channel_error(&self, channel: &str, calling: &str, idempotent: bool) -> ChannelError {
        let kind = match self {
            Self::Request(_) => FailureKind::Permanent,
            _ if !idempotent && self.may_have_reached() => FailureKind::Ambiguous,
            _ => FailureKind::Retryable,
        };
        let what = self.what();
        ChannelError {
            code: Some(what.into()),
            ..ChannelError::new(
                channel,
                kind,
                format!("{what} error calling {calling}: {self}"),
            )
        }
    }
}

/// A complete answer: status, headers and the whole body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The body as text; bytes that are not UTF-8 are replaced, never an error.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }

    /// The answer's headers, in order, repeated names kept. A copy: clients read headers only
    /// to classify a refusal (Retry-After), never on a delivered message.
    pub fn headers(&self) -> HeaderMap {
        self.headers.clone()
    }
}

/// An answer whose body is still on the wire (`Http::open`): read it with `chunk`.
pub struct Streamed {
    pub status: u16,
    headers: HeaderMap,
    body: Incoming,
    wire: Arc<Wire>,
    /// Keeps the connection open while the body is read; dropping the `Streamed` closes it.
    _sender: Sender,
    /// How long one piece of the body may take.
    stall: Duration,
}

impl Streamed {
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The body's length as the answer declared it (`content-length`), if it did.
    pub fn declared_len(&self) -> Option<u64> {
        self.body.size_hint().exact()
    }

    /// The next piece of the body as hyper decoded it (trailers skipped), `None` at its end;
    /// an error when a piece takes longer than the client's timeout or the answer breaks.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, TransportError>> {
        loop {
            let frame = match tokio::time::timeout(self.stall, self.body.frame()).await {
                Err(_) => return Some(Err(TransportError::Timeout(self.stall))),
                Ok(None) => return None,
                Ok(Some(Err(e))) => {
                    return Some(Err(TransportError::Transport(format!(
                        "reading the answer: {}",
                        chain(&e)
                    ))));
                }
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                self.wire.decoded(data.len());
                if !data.is_empty() {
                    return Some(Ok(data));
                }
            }
        }
    }
}

impl From<HttpMethod> for Method {
    fn from(m: HttpMethod) -> Self {
        match m {
            HttpMethod::Get => Method::GET,
            HttpMethod::Post => Method::POST,
            HttpMethod::Put => Method::PUT,
            HttpMethod::Delete => Method::DELETE,
        }
    }
}

/// A request body with its media type.
pub struct Payload<'a> {
    pub content_type: &'static str,
    pub bytes: Cow<'a, [u8]>,
}

impl<'a> Payload<'a> {
    /// A rendered JSON body, sent as it is.
    pub fn json(body: &'a Body) -> Self {
        Self {
            content_type: "application/json",
            bytes: Cow::Borrowed(body.as_bytes()),
        }
    }
}

pub struct Http {
    connector: HttpsConnector<Connect>,
    handshake: http1::Builder,
    pool: Pool,
    timeout: Duration,
}

const USER_AGENT: HeaderValue =
    HeaderValue::from_static(concat!("channel-gateway/", env!("CARGO_PKG_VERSION")));

type Sender = http1::SendRequest<Full<Bytes>>;

/// Where a connection goes: calls to the same origin may share it.
#[derive(Clone)]
struct Origin {
    scheme: Scheme,
    authority: Authority,
}

impl Origin {
    fn of(uri: &Uri) -> Result<Self, TransportError> {
        match (uri.scheme(), uri.authority()) {
            (Some(scheme), Some(authority)) => Ok(Self {
                scheme: scheme.clone(),
                authority: authority.clone(),
            }),
            _ => Err(TransportError::Request(
                "the request URL has no scheme or host".into(),
            )),
        }
    }
}

impl PartialEq for Origin {
    fn eq(&self, other: &Self) -> bool {
        // Both compare ASCII case-insensitively, as hosts and schemes do; the same text (the
        // usual case: one configured base URL) is told by one byte compare first.
        let same = |a: &str, b: &str| a == b || a.eq_ignore_ascii_case(b);
        same(self.scheme.as_str(), other.scheme.as_str())
            && same(self.authority.as_str(), other.authority.as_str())
    }
}

impl Eq for Origin {}

impl Hash for Origin {
    /// One write of the lowercased text: `Authority`'s own `Hash` writes it a byte at a time.
    fn hash<H: Hasher>(&self, state: &mut H) {
        for part in [self.scheme.as_str(), self.authority.as_str()] {
            if part.bytes().any(|b| b.is_ascii_uppercase()) {
                state.write(part.to_ascii_lowercase().as_bytes());
            } else {
                state.write(part.as_bytes());
            }
            state.write_u8(0xff);
        }
    }
}

/// Idle keep-alive connections by origin. HTTP/1.1 carries one exchange at a time, so a call
/// takes a connection out and puts it back once it has read the whole answer; the most recently
/// used is taken first, so the oldest age out. There are never more than the calls that ran at
/// once to that origin (bounded by `delivery.max_concurrency`), and none older than 90 s is used.
/// Hashed with foldhash (seeded per process): SipHash was ~1% of the instructions per
/// delivered message here, for keys that come from the configured allow-lists.
#[derive(Default)]
struct Pool {
    idle: Mutex<IdleMap>,
}

type IdleMap = HashMap<Origin, Vec<Idle>, foldhash::fast::RandomState>;

struct Idle {
    conn: Conn,
    since: Instant,
}

/// A connection in the pool: the sending half of hyper's connection (its other half runs as a
/// task of its own, spawned at connect, and ends when this is dropped) and its byte meter.
struct Conn {
    sender: Sender,
    wire: Arc<Wire>,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, IdleMap> {
        // Every change under the lock is a single push, pop or drain: a panic elsewhere
        // cannot leave the map half-changed.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used idle connection to `origin` that is neither too old nor closed
    /// (by its server, or by hyper after an answer that ends the connection).
    fn take(&self, origin: &Origin) -> Option<Conn> {
        let mut idle = self.lock();
        let list = idle.get_mut(origin)?;
        while let Some(c) = list.pop() {
            if c.since.elapsed() < IDLE_TIMEOUT && !c.conn.sender.is_closed() {
                return Some(c.conn);
            }
        }
        None
    }

    fn put(&self, origin: Origin, conn: Conn) {
        let now = Instant::now();
        let mut idle = self.lock();
        let list = idle.entry(origin).or_default();
        // The oldest come first: those idle too long go, since their server may close them
        // at any moment.
        let stale = list
            .iter()
            .take_while(|c| now.duration_since(c.since) >= IDLE_TIMEOUT)
            .count();
        list.drain(..stale);
        list.push(Idle { conn, since: now });
    }
}

impl Http {
    /// A client whose proxy comes from the environment (`HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`).
    pub fn new(timeout: Duration) -> Result<Self, String> {
        Self::with_proxy(timeout, Matcher::from_env())
    }

    pub fn with_proxy(timeout: Duration, proxy: Matcher) -> Result<Self, String> {
        let mut tcp = HttpConnector::new();
        // The TLS layer above hands this connector https URLs too.
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(timeout));
        let connect = Connect {
            tcp,
            proxy: Arc::new(proxy),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // HTTP/1.1 only: no ALPN is offered, so a server cannot pick HTTP/2.
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(provider)
            .map_err(|e| format!("cannot set up TLS: {e}"))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(connect);
        let mut handshake = http1::Builder::new();
        handshake
            .max_header_size(MAX_HEAD_BYTES)
            .max_headers(MAX_HEADERS)
            .max_buf_size(MAX_READ_BUFFER);
        Ok(Self {
            connector: https,
            handshake,
            pool: Pool::default(),
            timeout,
        })
    }

    /// Makes one call and reads the whole answer, all within the timeout. A redirect is an
    /// answer like any other: credentials never follow one.
    pub async fn send(
        &self,
        method: Method,
        uri: Uri,
        bearer: Option<&str>,
        payload: Option<Payload<'_>>,
    ) -> Result<Answer, TransportError> {
        let origin = Origin::of(&uri)?;
        let request = request(method, &uri, bearer, payload)?;
        // Whether the request was handed to a connection: a call that runs out of time before
        // that (a host dropping SYNs, a stalled TLS handshake or proxy tunnel) sent nothing,
        // and must not count as one that may have reached the channel.
        let handed_over = AtomicBool::new(false);
        let call = async {
            let mut request = request;
            let (answer, conn) = loop {
                let (mut conn, reused) = match self.pool.take(&origin) {
                    Some(conn) => (conn, true),
                    // Boxed: a new connection is the rare case, and its state (TCP, proxy, TLS)
                    // would otherwise be part of every call's future, which each caller up to
                    // the delivery worker moves by value.
                    None => (Box::pin(self.connect(&uri)).await?, false),
                };
                // An idle connection is ready once hyper has finished with its last answer; one
                // that closes instead is skipped.
                if reused && conn.sender.ready().await.is_err() {
                    continue;
                }
                conn.wire.start();
                handed_over.store(true, Ordering::Relaxed);
                match conn.sender.try_send_request(request).await {
                    Ok(answer) => break (answer, conn),
                    Err(mut e) => match e.take_message() {
                        // The connection closed before the request went out: another one may
                        // take it, and a new one that does this has refused it unseen.
                        Some(unsent) if reused => request = unsent,
                        Some(_) => {
                            return Err(TransportError::Connect(format!(
                                "the connection closed before the request was sent: {}",
                                chain(e.error())
                            )));
                        }
                        None => return Err(TransportError::Transport(chain(e.error()))),
                    },
                }
            };
            if answer.status() == StatusCode::SWITCHING_PROTOCOLS {
                // The connection no longer speaks HTTP: dropping its sender closes it.
                return Err(TransportError::Transport(
                    "the answer switches protocols, which was not asked for".into(),
                ));
            }
            let (head, body) = answer.into_parts();
            let body = read_body(body, &conn.wire).await?;
            // Only a connection whose answer was read to the end can carry the next call; hyper
            // closes it (and `take` skips it) if the answer said it would not carry another.
            if !conn.sender.is_closed() {
                self.pool.put(origin, conn);
            }
            Ok(Answer {
                status: head.status.as_u16(),
                headers: head.headers,
                body,
            })
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) if !handed_over.load(Ordering::Relaxed) => Err(TransportError::Connect(
                format!("no connection within {:?}", self.timeout),
            )),
            Err(_) => Err(TransportError::Timeout(self.timeout)),
        }
    }

    /// A GET whose answer body is read piece by piece (a file download): the connection, the
    /// request and the answer's head within the timeout, then each piece of the body within it
    /// too (`Streamed::chunk`). No bound on the body here: the caller counts what it reads. A
    /// redirect is an answer like any other, never followed.
    ///
    /// Always on a connection of its own, closed after: downloads are rare, and a connection
    /// whose answer was not read to the end cannot carry another call.
    pub async fn open(&self, uri: Uri, bearer: Option<&str>) -> Result<Streamed, TransportError> {
        let request = request(Method::GET, &uri, bearer, None)?;
        let handed_over = AtomicBool::new(false);
        let call = async {
            let mut conn = Box::pin(self.connect(&uri)).await?;
            conn.sender
                .ready()
                .await
                .map_err(|e| TransportError::Connect(chain(&e)))?;
            conn.wire.start();
            handed_over.store(true, Ordering::Relaxed);
            let answer = conn
                .sender
                .send_request(request)
                .await
                .map_err(|e| TransportError::Transport(chain(&e)))?;
            if answer.status() == StatusCode::SWITCHING_PROTOCOLS {
                return Err(TransportError::Transport(
                    "the answer switches protocols, which was not asked for".into(),
                ));
            }
            let (head, body) = answer.into_parts();
            Ok(Streamed {
                status: head.status.as_u16(),
                headers: head.headers,
                body,
                wire: conn.wire,
                _sender: conn.sender,
                stall: self.timeout,
            })
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) if !handed_over.load(Ordering::Relaxed) => Err(TransportError::Connect(
                format!("no connection within {:?}", self.timeout),
            )),
            Err(_) => Err(TransportError::Timeout(self.timeout)),
        }
    }

    /// A new connection (TCP, a proxy tunnel, TLS) and its task.
    async fn connect(&self, uri: &Uri) -> Result<Conn, TransportError> {
        let io = self
            .connector
            .clone()
            .oneshot(uri.clone())
            .await
            .map_err(|e| TransportError::Connect(chain(&*e)))?;
        let wire = match &io {
            MaybeHttpsStream::Http(tcp) => tcp.inner().wire.clone(),
            MaybeHttpsStream::Https(tls) => tls.inner().get_ref().0.inner().inner().wire.clone(),
        };
        let (sender, conn) = self
            .handshake
            .handshake(io)
            .await
            .map_err(|e| TransportError::Connect(chain(&e)))?;
        // It ends with the connection: when the server closes it, on an error, or once the
        // sender is dropped (a call cut short, a connection not put back, the pool's end).
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { sender, wire })
    }
}

/// The request as it goes on a connection of its own: its target is the path only, the host
/// goes in `Host` (without any user info, which is no business of the server's).
fn request(
    method: Method,
    uri: &Uri,
    bearer: Option<&str>,
    payload: Option<Payload<'_>>,
) -> Result<Request<Full<Bytes>>, TransportError> {
    let invalid = |what: &str| TransportError::Request(format!("{what} is not a valid header"));
    let host = uri.authority().map_or("", |a| a.as_str());
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let mut headers = HeaderMap::with_capacity(6);
    headers.insert(
        header::HOST,
        HeaderValue::from_str(host).map_err(|_| invalid("the host"))?,
    );
    headers.insert(header::USER_AGENT, USER_AGENT);
    if let Some(token) = bearer {
        // Checked as a header value: a line break would end the header and start another.
        let mut value =
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| invalid("the token"))?;
        value.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, value);
    }
    if let Some(p) = &payload {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(p.content_type),
        );
    }
    let body = match payload {
        Some(Payload {
            bytes: Cow::Owned(b),
            ..
        }) => Bytes::from(b),
        Some(Payload {
            bytes: Cow::Borrowed(b),
            ..
        }) => Bytes::copy_from_slice(b),
        None => Bytes::new(),
    };
    // A POST or PUT says its length even when empty; some servers refuse one that does not.
    if !body.is_empty() || matches!(method, Method::POST | Method::PUT) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let target = uri
        .path_and_query()
        .filter(|p| p.as_str().starts_with('/'))
        .cloned()
        .map_or_else(|| Uri::from_static("/"), Uri::from);
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = method;
    *request.uri_mut() = target;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Ok(request)
}

/// The whole body, decoded, or an error once it passes `MAX_ANSWER_BYTES`. hyper bounds what
/// frames it (chunk extensions and trailers: 16 KiB each) and `Wire` what it reads for it; the
/// bytes it decodes are counted here, and copied out of its read buffer as they come, so a body
/// of many small chunks holds no more than its decoded bytes.
async fn read_body(body: Incoming, wire: &Wire) -> Result<Bytes, TransportError> {
    // A length over the bound is refused before reading any of it.
    let declared = body.size_hint().lower();
    if declared > MAX_ANSWER_BYTES as u64 {
        return Err(too_big());
    }
    let mut body = Limited::new(body, MAX_ANSWER_BYTES);
    // The usual answer is one piece, kept as hyper read it; more pieces are put together.
    let mut first = Bytes::new();
    let mut joined: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                too_big()
            } else {
                TransportError::Transport(format!("reading the answer: {}", chain(&*e)))
            }
        })?;
        let Ok(data) = frame.into_data() else {
            // Trailers, which nothing here reads.
            continue;
        };
        wire.decoded(data.len());
        if first.is_empty() && joined.is_empty() {
            first = data;
        } else {
            if joined.is_empty() {
                joined.reserve(first.len() + data.len());
                joined.extend_from_slice(&first);
                first = Bytes::new();
            }
            joined.extend_from_slice(&data);
        }
    }
    Ok(if joined.is_empty() {
        first
    } else {
        Bytes::from(joined)
    })
}

fn too_big() -> TransportError {
    TransportError::Transport(format!(
        "reading the answer: it is over {MAX_ANSWER_BYTES} bytes"
    ))
}

/// A request URL as the transport takes it. Its text is left out of the error: a URL may carry
/// a credential in its query.
pub fn parse_uri(url: &str) -> Result<Uri, TransportError> {
    url.parse()
        .map_err(|e| TransportError::Request(format!("not a valid request URL: {e}")))
}

/// An error and its causes on one line: hyper's own text alone ("client error (Connect)")
/// does not say what happened.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// TCP to the destination, or through an HTTP CONNECT tunnel when the proxy settings cover it.
/// Only https destinations are tunnelled. Plain http is what loopback fakes and test setups
/// use (Bot Framework and Messenger allow it for loopback hosts only), and it goes direct:
/// `HTTP_PROXY` is not honoured, so a plain-http call never hands its request to a proxy.
#[derive(Clone)]
struct Connect {
    tcp: HttpConnector,
    proxy: Arc<Matcher>,
}

impl Service<Uri> for Connect {
    type Response = TokioIo<Counted>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let tcp = self.tcp.clone();
        let intercept = (dst.scheme_str() == Some("https"))
            .then(|| self.proxy.intercept(&dst))
            .flatten();
        let counted = |tcp: TokioIo<TcpStream>| {
            TokioIo::new(Counted {
                tcp: tcp.into_inner(),
                wire: Arc::new(Wire::new()),
            })
        };
        match intercept {
            // The tunnel speaks plain HTTP to the proxy: say so rather than fail its handshake.
            Some(via) if via.uri().scheme_str() == Some("https") => Box::pin(async {
                Err(
                    "an https:// proxy is not supported: give HTTPS_PROXY as http://host:port"
                        .into(),
                )
            }),
            Some(via) => {
                let mut tunnel = Tunnel::new(via.uri().clone(), tcp);
                if let Some(auth) = via.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                Box::pin(async move { Ok(counted(tunnel.call(dst).await?)) })
            }
            None => {
                let mut tcp = tcp;
                Box::pin(async move { Ok(counted(tcp.call(dst).await?)) })
            }
        }
    }
}

/// What a connection read for the answer being read, against what it may: `MAX_OVERHEAD_BYTES`
/// more than the body decoded so far. It counts TCP bytes (under TLS, if any), so it bounds
/// the work of every layer above: TLS records, head, chunk lines, extensions, trailers. Before
/// the first request, the proxy's and the TLS handshake's answers take from the same allowance.
struct Wire {
    read: AtomicUsize,
    allowed: AtomicUsize,
}

impl Wire {
    fn new() -> Self {
        Self {
            read: AtomicUsize::new(0),
            allowed: AtomicUsize::new(MAX_OVERHEAD_BYTES),
        }
    }

    /// A request is about to go out: what is read from now on is its answer.
    fn start(&self) {
        self.read.store(0, Ordering::Relaxed);
        self.allowed.store(MAX_OVERHEAD_BYTES, Ordering::Relaxed);
    }

    /// `n` bytes of body came out of what was read.
    fn decoded(&self, n: usize) {
        self.allowed.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` more bytes were read: an error once they pass what is allowed.
    fn read(&self, n: usize) -> std::io::Result<()> {
        let read = self.read.fetch_add(n, Ordering::Relaxed).saturating_add(n);
        if read > self.allowed.load(Ordering::Relaxed) {
            return Err(std::io::Error::other(format!(
                "the answer takes over {MAX_OVERHEAD_BYTES} bytes more than its body"
            )));
        }
        Ok(())
    }
}

/// A TCP connection whose reads are counted in its `Wire`.
struct Counted {
    tcp: TcpStream,
    wire: Arc<Wire>,
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.tcp).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => Poll::Ready(this.wire.read(buf.filled().len() - before)),
            other => other,
        }
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl Connection for Counted {
    fn connected(&self) -> Connected {
        self.tcp.connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// One call without a token or a body.
    async fn call(http: &Http, method: Method, url: &str) -> Result<Answer, TransportError> {
        call_with_token(http, method, url, None).await
    }

    /// One call without a body, with a bearer token if given.
    async fn call_with_token(
        http: &Http,
        method: Method,
        url: &str,
        token: Option<&str>,
    ) -> Result<Answer, TransportError> {
        http.send(method, parse_uri(url).unwrap(), token, None)
            .await
    }

    /// A port on this machine that nothing listens on: it was bound and released.
    fn unused_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    /// Reads one whole request from `s` (its head, then as many bytes as its content-length
    /// says), keeping what follows in `got`; the request as text, or `None` once the client
    /// closed before sending a whole one.
    async fn read_request(s: &mut TcpStream, got: &mut Vec<u8>) -> Option<String> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let len = String::from_utf8_lossy(&got[..end])
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: ").map(str::to_string))
                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                if got.len() >= end + 4 + len {
                    let request: Vec<u8> = got.drain(..end + 4 + len).collect();
                    return Some(String::from_utf8_lossy(&request).to_string());
                }
            }
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return None;
            }
            got.extend_from_slice(&buf[..n]);
        }
    }

    /// A one-shot HTTP server: returns the request it read and answers with `answer`.
    async fn serve_once(answer: &'static [u8]) -> (String, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let seen = read_request(&mut s, &mut Vec::new()).await;
            s.write_all(answer).await.unwrap();
            seen.unwrap_or_default()
        });
        (format!("http://{addr}"), task)
    }

    #[tokio::test]
    async fn sends_the_body_token_and_agent_and_reads_the_whole_answer() {
        let (base, server) = serve_once(
            b"HTTP/1.1 201 Created\r\ncontent-length: 11\r\nretry-after: 3\r\n\r\n{\"id\":\"a\"}\n",
        )
        .await;
        let http = Http::new(Duration::from_secs(5)).unwrap();
        let answer = http
            .send(
                Method::POST,
                parse_uri(&format!("{base}/v3/x?y=1")).unwrap(),
                Some("tok"),
                Some(Payload::json(
                    &Body::json(&serde_json::json!({"text": "hi"})).unwrap(),
                )),
            )
            .await
            .unwrap();
        assert_eq!(answer.status, 201);
        assert_eq!(answer.text(), "{\"id\":\"a\"}\n");
        assert_eq!(answer.headers()["retry-after"], "3");
        let seen = server.await.unwrap();
        assert!(seen.starts_with("POST /v3/x?y=1 HTTP/1.1\r\n"), "{seen}");
        assert!(seen.contains("authorization: Bearer tok\r\n"), "{seen}");
        assert!(
            seen.contains("content-type: application/json\r\n"),
            "{seen}"
        );
        assert!(seen.contains("user-agent: channel-gateway/"), "{seen}");
        assert!(seen.ends_with("{\"text\":\"hi\"}"), "{seen}");
    }

    #[tokio::test]
    async fn a_redirect_is_returned_not_followed() {
        let (base, server) = serve_once(
            b"HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:1/\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        let http = Http::new(Duration::from_secs(5)).unwrap();
        let answer = call_with_token(&http, Method::GET, &format!("{base}/"), Some("tok"))
            .await
            .unwrap();
        assert_eq!(answer.status, 302);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn failures_say_whether_the_request_can_have_arrived() {
        let http = Http::new(Duration::from_millis(300)).unwrap();
        // Nothing listens on a port just released: the request never left.
        let port = unused_port();
        let e = call(&http, Method::POST, &format!("http://127.0.0.1:{port}/"))
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::Connect(_)), "{e:?}");
        assert!(!e.may_have_reached());

        // A server that reads and never answers: the call times out, maybe handled.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _silent = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            while s.read(&mut buf).await.unwrap_or(0) > 0 {}
        });
        let e = call(&http, Method::POST, &format!("http://{addr}/"))
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::Timeout(_)), "{e:?}");
        assert!(e.may_have_reached());

        // A TLS handshake that never completes: out of time before the request was handed to
        // a connection, so nothing was sent (it was a Timeout, which made a POST ambiguous).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _stalled = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            while s.read(&mut buf).await.unwrap_or(0) > 0 {}
        });
        let e = call(&http, Method::POST, &format!("https://{addr}/"))
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::Connect(_)), "{e:?}");
        assert!(e.to_string().contains("no connection within"), "{e}");
        assert!(!e.may_have_reached());

        // An answer cut short after the request went out.
        let (base, server) =
            serve_once(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"partial\"").await;
        let e = call(&http, Method::POST, &format!("{base}/"))
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::Transport(_)), "{e:?}");
        server.await.unwrap();

        let e = parse_uri("http://exa mple/?access_token=secret").unwrap_err();
        assert!(matches!(e, TransportError::Request(_)), "{e:?}");
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[tokio::test]
    async fn an_answer_over_the_size_bound_is_refused() {
        static BIG: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
            let mut v = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                MAX_ANSWER_BYTES + 1
            )
            .into_bytes();
            v.resize(v.len() + MAX_ANSWER_BYTES + 1, b'x');
            v
        });
        let (base, server) = serve_once(BIG.as_slice()).await;
        let http = Http::new(Duration::from_secs(10)).unwrap();
        let e = call(&http, Method::GET, &format!("{base}/"))
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::Transport(_)), "{e:?}");
        let _ = server.await;
    }

    #[tokio::test]
    async fn an_answer_at_the_bound_in_small_chunks_is_read_whole() {
        // The bound on what an answer takes beyond its body must leave room for ordinary
        // chunked coding: 4 MiB in 1 KiB chunks carries ~28 KiB of chunk lines.
        static CHUNKED: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
            let mut v = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            for _ in 0..MAX_ANSWER_BYTES / 1024 {
                v.extend_from_slice(b"400\r\n");
                v.resize(v.len() + 1024, b'x');
                v.extend_from_slice(b"\r\n");
            }
            v.extend_from_slice(b"0\r\n\r\n");
            v
        });
        let (base, server) = serve_once(CHUNKED.as_slice()).await;
        let http = Http::new(Duration::from_secs(10)).unwrap();
        let answer = call(&http, Method::GET, &format!("{base}/")).await.unwrap();
        assert_eq!(answer.body.len(), MAX_ANSWER_BYTES);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn https_goes_through_the_configured_proxy_with_connect() {
        // A proxy that records the tunnel request and refuses it.
        let (proxy, seen) =
            serve_once(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n").await;
        let matcher = Matcher::builder()
            .https(proxy.clone())
            .no("skip.example")
            .build();
        let http = Http::with_proxy(Duration::from_secs(5), matcher).unwrap();
        let e = call(
            &http,
            Method::POST,
            "https://graph.example:443/v1/me/messages",
        )
        .await
        .unwrap_err();
        assert!(matches!(e, TransportError::Connect(_)), "{e:?}");
        let seen = seen.await.unwrap();
        assert!(
            seen.starts_with("CONNECT graph.example:443 HTTP/1.1\r\n"),
            "{seen}"
        );
        // Nothing of the request itself (path, body, token) is shown to the proxy.
        assert!(!seen.contains("/v1/me/messages"), "{seen}");
    }

    #[tokio::test]
    async fn an_https_proxy_is_refused_with_a_reason() {
        let matcher = Matcher::builder()
            .https("https://127.0.0.1:1".to_string())
            .build();
        let http = Http::with_proxy(Duration::from_secs(5), matcher).unwrap();
        let e = call(&http, Method::GET, "https://graph.example/")
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::Connect(_)), "{e:?}");
        assert!(
            e.to_string().contains("https:// proxy is not supported"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn plain_http_is_never_proxied() {
        let (base, server) = serve_once(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        // Nothing listens at the proxy: reaching the server proves it was bypassed.
        let matcher = Matcher::builder()
            .all("http://127.0.0.1:1".to_string())
            .build();
        let http = Http::with_proxy(Duration::from_secs(5), matcher).unwrap();
        let answer = call(&http, Method::GET, &format!("{base}/")).await.unwrap();
        assert_eq!(answer.status, 204);
        server.await.unwrap();
    }

    /// Stands in for an https channel host: returns the first TLS record a client sends (its
    /// ClientHello), then hangs up.
    async fn first_record() -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // A record: type, version (2 bytes), length (2 bytes), then that many bytes.
            while got.len() < 5 || got.len() < 5 + u16::from_be_bytes([got[3], got[4]]) as usize {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        (port, task)
    }

    #[tokio::test]
    async fn tls_offers_http_1_1_only() {
        // The check below must be able to see an offer: a client that does offer h2.
        let (port, hello) = first_record().await;
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("channel.example").unwrap();
        let _ = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await;
        assert_eq!(
            alpn(&hello.await.unwrap()),
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );

        let (port, hello) = first_record().await;
        let http = Http::with_proxy(Duration::from_secs(5), Matcher::builder().build()).unwrap();
        let e = call(&http, Method::GET, &format!("https://127.0.0.1:{port}/"))
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::Connect(_)), "{e:?}");
        let hello = tokio::time::timeout(Duration::from_secs(5), hello)
            .await
            .expect("no TLS hello")
            .unwrap();
        // Without ALPN a server speaks HTTP/1.1; offering "h2" would let it pick HTTP/2.
        let offered = alpn(&hello);
        assert!(
            !offered.iter().any(|p| p == b"h2"),
            "HTTP/2 offered: {offered:?}"
        );
    }

    /// The protocols a TLS ClientHello record offers in its ALPN extension (none if absent).
    fn alpn(record: &[u8]) -> Vec<Vec<u8>> {
        let at = |i: usize| *record.get(i).expect("a whole ClientHello") as usize;
        let u16_at = |i: usize| (at(i) << 8) | at(i + 1);
        // Record header (5), handshake header (4), version (2), random (32).
        let mut i = 5 + 4 + 2 + 32;
        i += 1 + at(i); // session id
        i += 2 + u16_at(i); // cipher suites
        i += 1 + at(i); // compression methods
        let end = i + 2 + u16_at(i);
        i += 2;
        while i + 4 <= end {
            let (kind, len) = (u16_at(i), u16_at(i + 2));
            if kind == 16 {
                // A list length (2), then length-prefixed names.
                let (mut j, stop) = (i + 6, i + 4 + len);
                let mut names = Vec::new();
                while j < stop {
                    names.push(record[j + 1..j + 1 + at(j)].to_vec());
                    j += 1 + at(j);
                }
                return names;
            }
            i += 4 + len;
        }
        Vec::new()
    }

    #[tokio::test]
    async fn https_to_a_no_proxy_host_goes_direct() {
        let (port, first_bytes) = first_record().await;
        let (proxy, _unused) = serve_once(b"HTTP/1.1 403 Forbidden\r\n\r\n").await;
        let matcher = Matcher::builder().https(proxy).no("127.0.0.1").build();
        let http = Http::with_proxy(Duration::from_secs(5), matcher).unwrap();
        let e = call(&http, Method::GET, &format!("https://127.0.0.1:{port}/"))
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::Connect(_)), "{e:?}");
        // A TLS handshake record (0x16), not a CONNECT line: the proxy was not used.
        let got = tokio::time::timeout(Duration::from_secs(5), first_bytes)
            .await
            .expect("the channel host saw no connection: the call went through the proxy")
            .unwrap();
        assert_eq!(got.first(), Some(&0x16), "{got:?}");
    }

    /// A keep-alive server: answers `per_connection` requests on each connection it accepts,
    /// then closes it. Returns its base URL, the number of connections accepted so far and the
    /// requests it read, in order.
    async fn keep_alive_server(
        per_connection: usize,
    ) -> (
        String,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<Mutex<Vec<String>>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (accepted.clone(), heads.clone());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    for _ in 0..per_connection {
                        let Some(head) = read_request(&mut s, &mut got).await else {
                            return;
                        };
                        seen.lock().unwrap().push(head);
                        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .unwrap();
                    }
                });
            }
        });
        (format!("http://{addr}"), accepted, heads)
    }

    #[tokio::test]
    async fn calls_in_turn_share_one_connection_and_name_their_host() {
        let (base, accepted, heads) = keep_alive_server(usize::MAX).await;
        let http = Http::new(Duration::from_secs(5)).unwrap();
        for i in 0..3 {
            let answer = call(&http, Method::GET, &format!("{base}/n/{i}?q=1"))
                .await
                .unwrap();
            assert_eq!((answer.status, answer.text().as_ref()), (200, "ok"));
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        let heads = heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 3);
        let host = base.trim_start_matches("http://");
        for (i, head) in heads.iter().enumerate() {
            assert!(
                head.starts_with(&format!("GET /n/{i}?q=1 HTTP/1.1\r\n")),
                "{head}"
            );
            assert!(head.contains(&format!("host: {host}\r\n")), "{head}");
        }
    }

    #[tokio::test]
    async fn calls_at_once_each_get_a_connection() {
        let (base, accepted, _) = keep_alive_server(usize::MAX).await;
        let http = Http::new(Duration::from_secs(5)).unwrap();
        let url = format!("{base}/");
        let (a, b) = tokio::join!(
            call(&http, Method::GET, &url),
            call(&http, Method::GET, &url)
        );
        assert_eq!((a.unwrap().status, b.unwrap().status), (200, 200));
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
        // Both are idle now: the next two calls reuse them.
        let (a, b) = tokio::join!(
            call(&http, Method::GET, &url),
            call(&http, Method::GET, &url)
        );
        assert_eq!((a.unwrap().status, b.unwrap().status), (200, 200));
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_while_idle_is_replaced_not_failed() {
        let (base, accepted, heads) = keep_alive_server(1).await;
        let http = Http::new(Duration::from_secs(5)).unwrap();
        let url = format!("{base}/");
        call(&http, Method::POST, &url).await.unwrap();
        // Let the connection's task see the server's close.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let answer = call(&http, Method::POST, &url).await.unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(heads.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn an_opened_answer_is_read_piece_by_piece_and_a_stalled_body_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let head = read_request(&mut s, &mut Vec::new()).await.unwrap();
            s.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: 10\r\n\r\nabc",
            )
            .await
            .unwrap();
            // The rest never comes: the socket stays open past the client's timeout.
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(s);
            head
        });
        let http = Http::new(Duration::from_millis(300)).unwrap();
        let mut answer = http
            .open(
                parse_uri(&format!("http://{addr}/f/x.png")).unwrap(),
                Some("tok"),
            )
            .await
            .unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.declared_len(), Some(10));
        assert_eq!(answer.headers()["content-type"], "image/png");
        assert_eq!(
            answer.chunk().await.unwrap().unwrap(),
            Bytes::from_static(b"abc")
        );
        let e = answer.chunk().await.unwrap().unwrap_err();
        assert!(matches!(e, TransportError::Timeout(_)), "{e:?}");
        drop(answer);
        let head = server.await.unwrap();
        assert!(head.starts_with("GET /f/x.png HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("authorization: Bearer tok\r\n"), "{head}");
    }

    #[tokio::test]
    async fn a_url_without_a_host_is_refused_before_sending() {
        let http = Http::new(Duration::from_secs(5)).unwrap();
        let e = http
            .send(Method::GET, Uri::from_static("/only/a/path"), None, None)
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::Request(_)), "{e:?}");
    }

    /// A server that answers each request it reads with the next of `script`, across the
    /// connections it accepts; an entry marked `true` closes its connection after its answer.
    /// Returns its base URL and the number of connections accepted so far.
    async fn scripted_server(
        script: Vec<(&'static [u8], bool)>,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let script = Arc::new(Mutex::new(std::collections::VecDeque::from(script)));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let script = script.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    while read_request(&mut s, &mut got).await.is_some() {
                        let next = script.lock().unwrap().pop_front();
                        let Some((answer, close)) = next else { return };
                        s.write_all(answer).await.unwrap();
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        (format!("http://{addr}"), accepted)
    }

    #[tokio::test]
    async fn interim_and_chunked_answers_are_read_whole_and_keep_the_connection() {
        let (base, accepted) = scripted_server(vec![
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4;x=1\r\n{\"id\r\n6\r\n\":\"a\"}\r\n0\r\nx-trailer: 1\r\n\r\n",
                false,
            ),
            (b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok", false),
            // The answer to HEAD names a length and has no body.
            (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nlast", false),
        ])
        .await;
        let http = Http::new(Duration::from_secs(5)).unwrap();
        let url = format!("{base}/");
        let first = call(&http, Method::POST, &url).await.unwrap();
        assert_eq!(
            (first.status, first.text().as_ref()),
            (200, "{\"id\":\"a\"}")
        );
        let second = call(&http, Method::POST, &url).await.unwrap();
        assert_eq!((second.status, second.text().as_ref()), (201, "ok"));
        let head = call(&http, Method::HEAD, &url).await.unwrap();
        assert_eq!((head.status, head.text().as_ref()), (200, ""));
        let last = call(&http, Method::GET, &url).await.unwrap();
        assert_eq!(last.text(), "last");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_is_not_reused_after_close_extra_bytes_or_a_body_to_the_end() {
        let (base, accepted) = scripted_server(vec![
            // The server says it closes (and keeps the socket open: the header decides).
            (
                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\na",
                false,
            ),
            // Bytes after the answer: the connection is out of step.
            (b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nbEXTRA", false),
            // No length: the body runs to the connection's end.
            (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true),
            (b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\nd", false),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\ne", false),
        ])
        .await;
        let http = Http::new(Duration::from_secs(5)).unwrap();
        let url = format!("{base}/");
        let mut bodies = Vec::new();
        for _ in 0..5 {
            bodies.push(
                call(&http, Method::GET, &url)
                    .await
                    .unwrap()
                    .text()
                    .to_string(),
            );
        }
        assert_eq!(bodies, ["a", "b", "until the end", "d", "e"]);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn a_malformed_answer_is_a_transport_error_that_may_have_arrived() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 1x\r\n\r\na"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
        ] {
            let (base, server) = serve_once(answer).await;
            let http = Http::new(Duration::from_secs(5)).unwrap();
            let e = call(&http, Method::POST, &format!("{base}/"))
                .await
                .unwrap_err();
            assert!(
                matches!(e, TransportError::Transport(_)) && e.may_have_reached(),
                "{answer:?}: {e:?}"
            );
            server.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_token_that_would_break_the_header_is_refused_before_connecting() {
        // Nothing listens there: a connection attempt would fail as `Connect`.
        let port = unused_port();
        let http = Http::new(Duration::from_secs(5)).unwrap();
        let e = call_with_token(
            &http,
            Method::POST,
            &format!("http://127.0.0.1:{port}/"),
            Some("tok\r\nx-injected: 1"),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, TransportError::Request(_)), "{e:?}");
    }
}
