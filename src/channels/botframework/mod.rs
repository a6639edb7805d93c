//! Bot Framework Connector v3 (Skype, Teams, Web Chat, Direct Line, Emulator).

pub mod client;
pub mod config;
pub mod render;
