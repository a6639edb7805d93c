//! channel-gateway: a gRPC gateway that translates channel-neutral bot messages into chat
//! channels' native APIs and delivers them in order.
#![forbid(unsafe_code)]

pub mod api;
pub mod bounded;
pub mod channels;
pub mod config;
pub mod delivery;
pub mod inbound;
pub mod listener;
pub mod log_limit;
pub mod metrics;
pub mod model;
pub mod outbox;
pub mod server;
pub mod settings;
pub mod storage;
pub mod tls;
