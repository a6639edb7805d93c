//! HTTP client for Slack. (Placeholder until the channel lands.)

use std::time::Duration;

use super::config::SlackConfig;
use crate::channels::{ChannelError, FailureKind, NativeReceipt, NativeRequest};
use crate::model::{Address, ProactiveOptions};

pub struct SlackClient {
    config: SlackConfig,
}

impl SlackClient {
    pub fn new(config: SlackConfig, _request_timeout: Duration) -> Result<Self, String> {
        Ok(Self { config })
    }

    pub fn config(&self) -> &SlackConfig {
        &self.config
    }

    /// Whether `bot_id` (address.bot.id) has credentials configured.
    pub fn has_credentials(&self, _bot_id: &str) -> bool {
        false
    }

    pub async fn execute(&self, _req: &NativeRequest) -> Result<NativeReceipt, ChannelError> {
        Err(ChannelError::new(
            "slack",
            FailureKind::Permanent,
            "not implemented",
        ))
    }

    /// Starts a conversation for an address without one and returns the address to use.
    pub async fn create_conversation(
        &self,
        _address: &Address,
        _options: &ProactiveOptions,
    ) -> Result<Address, ChannelError> {
        Err(ChannelError::new(
            "slack",
            FailureKind::Permanent,
            "not implemented",
        ))
    }
}
