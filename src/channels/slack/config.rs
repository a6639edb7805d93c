//! The `channels.slack` config section.

use serde::Deserialize;

use crate::config::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlackConfig {
    pub enabled: bool,
}

impl Default for SlackConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

impl SlackConfig {
    /// Checks the section; errors name the key as `channels.slack.KEY`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}
