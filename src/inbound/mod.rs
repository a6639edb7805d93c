//! Receiving: the webhook listener that channels call, in front of a durable sink (the inbox).
//!
//! Owns the HTTP side of receiving: which path belongs to which channel, the body bound and the
//! slow-client timeout, verification before anything else, the answer (2xx only once the sink
//! said the events are durable; 503 with `Retry-After` when it is full), and the refusal
//! metric. Must not know any channel's format (each channel's `Inbound` verifies and parses),
//! nor how events are stored, deduplicated or streamed to bots (the sink does).

pub mod listener;

pub use listener::{InboundRouter, Sink, SinkError, serve};
