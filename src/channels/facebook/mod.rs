//! Facebook channel: pure render (model -> native requests), HTTP client, and its config section.

pub mod client;
pub mod config;
pub mod render;
