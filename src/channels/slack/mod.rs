//! Slack channel: pure render (model -> Web API requests, with Block Kit and mrkdwn), the HTTP
//! client, and its config section.

pub mod blocks;
pub mod client;
pub mod config;
pub mod mrkdwn;
pub mod render;
