//! The storage engines the gateway's stores are built on, below the outbox's `Store` trait and
//! the inbox: how to reach an engine and how its schema is versioned.
//!
//! Owns connections, pools and schema migrations; knows no message, event, idempotency key or
//! rate scope. The stores (`crate::outbox`, `crate::inbound`) own their tables and queries and
//! hand their DDL to this module as migrations.

pub mod lease;
pub mod notify;
pub mod postgres;
pub mod rate;
