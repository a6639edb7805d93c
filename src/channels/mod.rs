//! Channels: each one a pure renderer (model -> native requests) and an HTTP client.
//!
//! Owns everything channel-specific. Must not know about gRPC, sequencing or retries.

pub mod botframework;
mod types;

pub use types::*;
