//! Receiving: the webhook listener that channels call, the durable inbox behind it, and the
//! streams that hand its events to bots.
//!
//! `listener` owns the HTTP side (paths, body bound, slow clients, verification first, the
//! answer); `store` owns what is on disk; `inbox` owns who gets which event when (groups,
//! per-conversation order, credits, ack deadlines, retention). None of them knows a channel's
//! format (each channel's `Inbound` verifies and parses) or the gRPC wire (`api` does).

pub mod config;
pub mod inbox;
pub mod listener;
pub mod pg;
pub mod store;

pub use inbox::{
    ClaimSettings, Delivered, Inbox, InboxSettings, ReceiveError, Receiver, Settled, Subscription,
};
pub use listener::{InboundRouter, Sink, SinkError, serve};
