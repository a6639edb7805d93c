//! Telegram Bot API channel.

pub mod config;
