//! Rate scopes shared by replicas: one row per scope budget in PostgreSQL, so a channel's limit
//! holds for all replicas together, and a channel's Retry-After written once pauses all of them.
//!
//! Owns the table `cg_rate_scopes`. Each budget of a scope (`key#index`) is a GCRA cell: its
//! theoretical arrival time (`tat`, seconds on the database's clock) moves by the emission
//! interval `1 / rate` per request, and a request may go once `tat - tolerance` is reached,
//! `tolerance = (burst - 1) / rate`. A reservation takes its place in line at once and returns
//! how long to wait, as the in-process limiter (`delivery::rate`) does, so waiting holds no
//! lock and no connection. All the budgets of a request are reserved in one statement.
//!
//! Knows nothing of channels: the scopes and budgets come from the caller.

use std::time::Duration;

use super::postgres::{PgError, Pool, get};

/// The table, as a migration's SQL.
pub const MIGRATION_SQL: &str = "
CREATE TABLE cg_rate_scopes (
    key TEXT PRIMARY KEY,
    tat DOUBLE PRECISION NOT NULL DEFAULT 0,
    paused_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    touched_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
";

/// Longest key stored: a scope key names a channel, a bot and a conversation at most.
pub const MAX_KEY_BYTES: usize = 512;

/// One budget of one scope: `per_second` requests with bursts of `burst`.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedBudget {
    pub key: String,
    pub per_second: f64,
    pub burst: u32,
}

fn usable(b: &SharedBudget) -> bool {
    b.per_second.is_finite() && b.per_second > 0.0 && b.key.len() <= MAX_KEY_BYTES
}

fn seconds(s: f64) -> Duration {
    // A negative wait is none; a huge one (a scope paused for days) is capped at a day.
    Duration::try_from_secs_f64(s.clamp(0.0, 86_400.0)).unwrap_or_default()
}

/// Takes a place in every budget (and looks at every scope's pause); the wait before sending.
/// `scopes` are the keys whose pause applies (scopes with no budget can still be paused).
pub async fn reserve(
    pool: &Pool,
    budgets: &[SharedBudget],
    scopes: &[String],
) -> Result<Duration, PgError> {
    // One row can be changed once per statement: a key named twice counts once.
    let mut seen = std::collections::HashSet::new();
    let budgets: Vec<&SharedBudget> = budgets
        .iter()
        .filter(|b| usable(b) && seen.insert(b.key.as_str()))
        .collect();
    let keys: Vec<&str> = budgets.iter().map(|b| b.key.as_str()).collect();
    let intervals: Vec<f64> = budgets.iter().map(|b| 1.0 / b.per_second).collect();
    let tolerances: Vec<f64> = budgets
        .iter()
        .map(|b| f64::from(b.burst.max(1) - 1) / b.per_second)
        .collect();
    let scopes: Vec<&str> = scopes
        .iter()
        .map(String::as_str)
        .filter(|s| s.len() <= MAX_KEY_BYTES)
        .collect();
    let client = get(pool).await?;
    // One statement: the budgets' upserts, then the pauses of the request's scopes. The
    // clock is read once, so every budget of the request is judged at the same instant.
    let row = client
        .query_one(
            "WITH clock AS (SELECT extract(epoch FROM clock_timestamp())::float8 AS t), \
             taken AS ( \
               INSERT INTO cg_rate_scopes AS s (key, tat, touched_at) \
               SELECT b.key, (SELECT t FROM clock) + b.interval, now() \
               FROM unnest($1::text[], $2::float8[]) AS b(key, interval) \
               ON CONFLICT (key) DO UPDATE SET \
                 tat = GREATEST(s.tat, (SELECT t FROM clock)) + excluded.tat - (SELECT t FROM clock), \
                 touched_at = now() \
               RETURNING s.key, s.tat \
             ) \
             SELECT \
               COALESCE((SELECT max(tk.tat - b.interval - b.tolerance - (SELECT t FROM clock)) \
                 FROM taken tk JOIN unnest($1::text[], $2::float8[], $3::float8[]) \
                   AS b(key, interval, tolerance) ON b.key = tk.key), 0), \
               COALESCE((SELECT max(paused_until) - (SELECT t FROM clock) \
                 FROM cg_rate_scopes WHERE key = ANY($4::text[])), 0)",
            &[&keys, &intervals, &tolerances, &scopes],
        )
        .await
        .map_err(|e| PgError::query("reserving shared rate scopes", &e))?;
    let wait: f64 = row.get(0);
    let paused: f64 = row.get(1);
    Ok(seconds(wait.max(paused)))
}

/// A channel said "not before `pause` from now" (a 429's Retry-After) for `scope`: every replica
/// waits for it.
pub async fn pause(pool: &Pool, scope: &str, pause: Duration) -> Result<(), PgError> {
    if scope.len() > MAX_KEY_BYTES {
        return Ok(());
    }
    let secs = pause.as_secs_f64().min(86_400.0);
    let client = get(pool).await?;
    client
        .execute(
            "INSERT INTO cg_rate_scopes AS s (key, paused_until, touched_at) \
             VALUES ($1, extract(epoch FROM clock_timestamp())::float8 + $2, now()) \
             ON CONFLICT (key) DO UPDATE SET \
               paused_until = GREATEST(s.paused_until, excluded.paused_until), touched_at = now()",
            &[&scope, &secs],
        )
        .await
        .map_err(|e| PgError::query("pausing a shared rate scope", &e))?;
    Ok(())
}

/// Drops scopes untouched for `idle` (a fresh row behaves the same): the table follows the
/// active scopes, not every conversation ever seen.
pub async fn prune(pool: &Pool, idle: Duration) -> Result<u64, PgError> {
    let client = get(pool).await?;
    client
        .execute(
            "DELETE FROM cg_rate_scopes WHERE touched_at < now() - make_interval(secs => $1) \
             AND paused_until < extract(epoch FROM clock_timestamp())::float8",
            &[&idle.as_secs_f64()],
        )
        .await
        .map_err(|e| PgError::query("pruning shared rate scopes", &e))
}
