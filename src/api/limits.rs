//! The size each RPC may receive, enforced before tonic buffers a message.
//!
//! tonic takes one decoding limit per service and reserves a message's whole announced length
//! as soon as it reads the message's 5-byte gRPC prefix. With one limit for the service, every
//! RPC accepted what SendBatch may carry (`max_message_bytes` × `max_batch_len`, 25 MiB by
//! default): eight concurrent 24 MB Sends took the gateway from 64 to 281 MiB before the
//! per-message check refused them. This layer reads each message's prefix as the request body
//! streams in and ends the body with INVALID_ARGUMENT when the announced length is over its
//! RPC's limit, before tonic sees it. It parses only that prefix (flag, big-endian length; the
//! gRPC wire format's own framing, not HTTP's); everything else passes through untouched.
//!
//! Owns nothing but that check; knows the RPC names, not their messages.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame};
use tonic::Status;

use crate::config::ServerConfig;

/// What one RPC may receive, in bytes of one protobuf message.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Send, SendTyping, Render, UpdateMessage: one message and its envelope.
    one_message: usize,
    /// SendBatch, SendProactive: `max_batch_len` messages and their envelope.
    batch: usize,
    /// Every other RPC: ids, filters and page tokens.
    other: usize,
}

/// Room for what surrounds the messages: an idempotency key, a proactive start's options
/// (members, topic, activity), field tags.
const ENVELOPE_BYTES: usize = 64 << 10;

impl RequestLimits {
    pub fn new(c: &ServerConfig) -> Self {
        Self {
            one_message: c.max_message_bytes.saturating_add(ENVELOPE_BYTES),
            batch: c
                .max_message_bytes
                .saturating_mul(c.max_batch_len)
                .saturating_add(ENVELOPE_BYTES),
            other: ENVELOPE_BYTES,
        }
    }

    /// The largest of them: the decoding limit the service itself is given.
    pub fn largest(&self) -> usize {
        self.one_message.max(self.batch).max(self.other)
    }

    /// The limit for a request path, and the setting that sets it; `None` for paths outside
    /// the gateway's own service (health, reflection keep tonic's default).
    fn for_path(&self, path: &str) -> Option<(usize, &'static str)> {
        let method = path.strip_prefix("/channelgateway.v1.ChannelGateway/")?;
        Some(match method {
            // Receive: each message on the stream, the largest a respond carrying a message.
            // StreamReply: each frame, the largest a start or a finish carrying a message.
            "Send" | "SendTyping" | "Render" | "Receive" | "UpdateMessage" | "StreamReply" => {
                (self.one_message, "server.max_message_bytes")
            }
            "SendBatch" | "SendProactive" => (
                self.batch,
                "server.max_message_bytes × server.max_batch_len",
            ),
            _ => (self.other, "the request size of this RPC"),
        })
    }
}

impl<S> tower::Layer<S> for RequestLimits {
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Limited<S> {
        Limited {
            inner,
            limits: *self,
        }
    }
}

/// The service behind [`RequestLimits`].
#[derive(Debug, Clone)]
pub struct Limited<S> {
    inner: S,
    limits: RequestLimits,
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for Limited<S>
where
    S: tower::Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        match self.limits.for_path(req.uri().path()) {
            Some((limit, setting)) => {
                let (parts, body) = req.into_parts();
                let body = tonic::body::Body::new(Prefixed {
                    inner: body,
                    limit,
                    setting,
                    state: Prefix::Header {
                        have: 0,
                        bytes: [0; 5],
                    },
                });
                self.inner.call(http::Request::from_parts(parts, body))
            }
            None => self.inner.call(req),
        }
    }
}

#[derive(Debug)]
enum Prefix {
    /// Reading a message's 5-byte prefix.
    Header { have: usize, bytes: [u8; 5] },
    /// Inside a message's body, this many bytes from its end.
    Body { left: usize },
}

/// A request body whose messages' prefixes are checked as they pass.
struct Prefixed {
    inner: tonic::body::Body,
    limit: usize,
    setting: &'static str,
    state: Prefix,
}

impl Prefixed {
    /// Follows the prefixes through one chunk of the body; an error once one is over the limit.
    fn check(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            match &mut self.state {
                Prefix::Header { have, bytes } => {
                    let n = (5 - *have).min(data.len());
                    bytes[*have..*have + n].copy_from_slice(&data[..n]);
                    *have += n;
                    data.advance(n);
                    if *have == 5 {
                        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
                        let len = len as usize;
                        if len > self.limit {
                            return Err(Status::invalid_argument(format!(
                                "request: the message is {len} bytes; this RPC takes at most {} ({})",
                                self.limit, self.setting
                            )));
                        }
                        self.state = if len == 0 {
                            Prefix::Header {
                                have: 0,
                                bytes: [0; 5],
                            }
                        } else {
                            Prefix::Body { left: len }
                        };
                    }
                }
                Prefix::Body { left } => {
                    let n = (*left).min(data.len());
                    *left -= n;
                    data.advance(n);
                    if *left == 0 {
                        self.state = Prefix::Header {
                            have: 0,
                            bytes: [0; 5],
                        };
                    }
                }
            }
        }
        Ok(())
    }
}

impl Body for Prefixed {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(status) = this.check(data)
                {
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefixed(limit: usize) -> Prefixed {
        Prefixed {
            inner: tonic::body::Body::empty(),
            limit,
            setting: "server.max_message_bytes",
            state: Prefix::Header {
                have: 0,
                bytes: [0; 5],
            },
        }
    }

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&(len as u32).to_be_bytes());
        m.resize(5 + len, 7);
        m
    }

    #[test]
    fn a_message_within_the_limit_passes_in_any_chunking() {
        let mut two = message(100);
        two.extend(message(0));
        two.extend(message(100));
        for chunk in [1, 2, 3, 5, 7, 64, 1000] {
            let mut p = prefixed(100);
            for c in two.chunks(chunk) {
                p.check(c).unwrap();
            }
            assert!(matches!(p.state, Prefix::Header { have: 0, .. }), "{chunk}");
        }
    }

    #[test]
    fn an_announced_length_over_the_limit_is_refused_at_its_prefix() {
        let m = message(101);
        for chunk in [1, 2, 5, 6] {
            let mut p = prefixed(100);
            let mut chunks = m.chunks(chunk);
            let err = loop {
                match p.check(chunks.next().unwrap()) {
                    Ok(()) => continue,
                    Err(e) => break e,
                }
            };
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().contains("101 bytes"), "{}", err.message());
        }
    }

    #[test]
    fn each_rpc_has_its_own_limit() {
        let c = ServerConfig::default();
        let l = RequestLimits::new(&c);
        let path = |m: &str| format!("/channelgateway.v1.ChannelGateway/{m}");
        assert_eq!(
            l.for_path(&path("Send")).unwrap().0,
            c.max_message_bytes + ENVELOPE_BYTES
        );
        assert!(l.for_path(&path("SendBatch")).unwrap().0 > l.for_path(&path("Send")).unwrap().0);
        assert_eq!(l.for_path(&path("GetDelivery")).unwrap().0, ENVELOPE_BYTES);
        // An update carries a whole new message.
        assert_eq!(
            l.for_path(&path("UpdateMessage")).unwrap().0,
            l.for_path(&path("Send")).unwrap().0
        );
        // A respond on the Receive stream may carry a message as large as a Send's.
        assert_eq!(
            l.for_path(&path("Receive")).unwrap().0,
            l.for_path(&path("Send")).unwrap().0
        );
        assert!(l.for_path("/grpc.health.v1.Health/Check").is_none());
    }
}
