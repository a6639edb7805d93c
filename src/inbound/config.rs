//! The `[inbound]` section: the webhook listener's address and bounds, and the inbox's.
//!
//! Owns the keys, their defaults and their checks; knows nothing of channels (each channel's
//! secrets are in its own section).

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::InboxSettings;
use crate::settings::{ConfigError, de_duration, invalid};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboundConfig {
    /// Receive events at all (the webhook listener and the Receive stream).
    pub enabled: bool,
    /// The webhook listener's address: the one channels call. It may face the internet (every
    /// call is verified before anything is stored) while gRPC stays private.
    pub listen: String,
    /// Largest webhook body, in bytes.
    pub max_body_bytes: usize,
    /// How long a webhook call has to send its headers and its body.
    #[serde(deserialize_with = "de_duration")]
    pub read_timeout: Duration,
    /// Open webhook connections at once; past it a new one is closed at once.
    pub max_connections: usize,
    /// An event not acked within this is delivered again.
    #[serde(deserialize_with = "de_duration")]
    pub ack_deadline: Duration,
    /// Events of one conversation out to a consumer group at once (1: one after the other).
    pub per_conversation: usize,
    /// Events no group acked within this are dropped (counted in inbound_events{outcome="expired"}).
    #[serde(deserialize_with = "de_duration")]
    pub retention: Duration,
    /// How long a channel's retry of a stored event is recognised and not stored again.
    #[serde(deserialize_with = "de_duration")]
    pub dedupe_window: Duration,
    /// Most events kept; past it a channel is answered 503 with Retry-After.
    pub max_events: usize,
    /// Most bytes of events kept, in MiB.
    pub max_mib: usize,
    /// Receive streams open at once.
    pub max_streams: usize,
    /// The largest `max_in_flight` a Receive stream may ask for.
    pub max_in_flight: usize,
    /// A consumer group other than `default` with no stream for this long is removed.
    #[serde(deserialize_with = "de_duration")]
    pub group_idle: Duration,
}

impl Default for InboundConfig {
    fn default() -> Self {
        let inbox = InboxSettings::default();
        Self {
            enabled: true,
            // The Bot Framework's conventional bot port.
            listen: "127.0.0.1:3978".into(),
            max_body_bytes: 1 << 20,
            read_timeout: Duration::from_secs(10),
            max_connections: 1024,
            ack_deadline: inbox.ack_deadline,
            per_conversation: inbox.per_conversation,
            retention: inbox.retention,
            dedupe_window: inbox.dedupe_window,
            max_events: inbox.max_events,
            max_mib: inbox.max_bytes >> 20,
            max_streams: inbox.max_streams,
            max_in_flight: inbox.max_in_flight,
            group_idle: inbox.group_idle,
        }
    }
}

/// Past these a key is a mistake, not a choice.
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

impl InboundConfig {
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.parse().map_err(|_| {
            invalid(
                "inbound.listen",
                "must be an address such as 127.0.0.1:3978",
            )
        })
    }

    pub fn inbox(&self) -> InboxSettings {
        InboxSettings {
            ack_deadline: self.ack_deadline,
            per_conversation: self.per_conversation,
            retention: self.retention,
            dedupe_window: self.dedupe_window,
            max_events: self.max_events,
            max_bytes: self.max_mib.saturating_mul(1 << 20),
            max_streams: self.max_streams,
            max_in_flight: self.max_in_flight,
            group_idle: self.group_idle,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        self.listen_addr()?;
        let counts: [(&str, usize, usize); 7] = [
            ("inbound.max_body_bytes", self.max_body_bytes, 64 << 20),
            ("inbound.max_connections", self.max_connections, 1_000_000),
            ("inbound.per_conversation", self.per_conversation, 1000),
            ("inbound.max_events", self.max_events, 100_000_000),
            ("inbound.max_mib", self.max_mib, 1 << 20),
            ("inbound.max_streams", self.max_streams, 100_000),
            ("inbound.max_in_flight", self.max_in_flight, 100_000),
        ];
        for (key, v, max) in counts {
            if v == 0 || v > max {
                return Err(invalid(key, format!("must be 1 to {max}")));
            }
        }
        for (key, d, min) in [
            (
                "inbound.read_timeout",
                self.read_timeout,
                Duration::from_millis(100),
            ),
            (
                "inbound.ack_deadline",
                self.ack_deadline,
                Duration::from_millis(100),
            ),
            ("inbound.retention", self.retention, Duration::from_secs(1)),
            (
                "inbound.dedupe_window",
                self.dedupe_window,
                Duration::from_secs(1),
            ),
            (
                "inbound.group_idle",
                self.group_idle,
                Duration::from_secs(1),
            ),
        ] {
            if d < min || d > MAX_DURATION {
                return Err(invalid(key, format!("must be from {min:?} to 30 days")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_name_their_key() {
        InboundConfig::default().validate().expect("defaults");
        let bad = |f: fn(&mut InboundConfig), key: &str| {
            let mut c = InboundConfig::default();
            f(&mut c);
            let e = c.validate().expect_err(key).to_string();
            assert!(e.contains(key), "{e}");
        };
        bad(|c| c.listen = "nowhere".into(), "inbound.listen");
        bad(|c| c.max_events = 0, "inbound.max_events");
        bad(|c| c.ack_deadline = Duration::ZERO, "inbound.ack_deadline");
        bad(
            |c| c.retention = Duration::from_secs(365 * 24 * 3600),
            "inbound.retention",
        );
        bad(|c| c.max_in_flight = 1 << 30, "inbound.max_in_flight");
        let off = InboundConfig {
            enabled: false,
            listen: "nowhere".into(),
            ..Default::default()
        };
        off.validate().expect("nothing to check when off");
    }
}
