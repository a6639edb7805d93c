//! The `channels.facebook` config section.

use serde::Deserialize;

use crate::config::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FacebookConfig {
    pub enabled: bool,
}

impl Default for FacebookConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

impl FacebookConfig {
    /// Checks the section; errors name the key as `channels.facebook.KEY`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}
