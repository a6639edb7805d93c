//! Facebook Messenger channel: pure render (model -> Send API requests), the Graph API client,
//! and the `[channels.facebook]` config section.

pub mod client;
pub mod config;
mod money;
pub mod render;
mod text;
