//! The building blocks every config section is made of: `Secret`, durations with units,
//! `ConfigError` and the helpers that name a key in it.
//!
//! Shared by `config` (which lists the sections) and each channel's own section in its folder,
//! so neither imports the other. Knows no section and no default.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Config errors name the key and the problem; none shows a value that could be a secret (a
/// TOML syntax error gives line and column, not the line; a type error says "a string").
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "config file {path}: TOML syntax error at line {line}, column {column}{}: {message}",
        .key.as_deref().map(|k| format!(" (in `{k}`)")).unwrap_or_default()
    )]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        /// The table and key being written on that line, when the line starts one.
        key: Option<String>,
        message: String,
    },
    #[error("config: {0}")]
    Parse(String),
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("{var} (config key `{key}`): {reason}")]
    Env {
        var: String,
        key: String,
        reason: String,
    },
}

pub(crate) fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// A secret string whose `Debug` never shows it.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Parses `250ms`, `30s`, `5m`, `24h` and sums like `1h30m`. A plain number is refused (`0`
/// aside): v3's `autoBatchDelay` was in milliseconds, and `250` read as seconds surprised a user.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let shown = capped(s, 40);
    if s.is_empty() {
        return Err("an empty string is not a duration: write e.g. `250ms` or `30s`".into());
    }
    if s.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return plain_number(s);
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(digits);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let n: f64 = num.parse().map_err(|_| {
            format!("`{shown}` is not a duration like 250ms, 30s, 5m, 24h or 1h30m")
        })?;
        let scale = match unit.trim() {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => {
                return Err(format!(
                    "unknown duration unit `{}` in `{shown}` (use ms, s, m, h)",
                    capped(other, 20)
                ));
            }
        };
        let part = Duration::try_from_secs_f64(n * scale)
            .map_err(|_| format!("`{shown}` is not a valid duration"))?;
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("`{shown}` is too long a duration"))?;
        rest = tail;
    }
    Ok(total)
}

/// A duration without a unit: only zero is unambiguous.
fn plain_number(n: &str) -> Result<Duration, String> {
    if n.parse::<f64>() == Ok(0.0) {
        return Ok(Duration::ZERO);
    }
    let n = capped(n, 20);
    Err(format!(
        "`{n}` has no unit: write `{n}ms` or `{n}s` (or m, h, e.g. `1h30m`)"
    ))
}

/// Durations in the config: a string with units (`250ms`, `1h30m`); a TOML number only when 0.
pub(crate) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        S(String),
        I(i64),
        F(f64),
    }
    let parsed = match Raw::deserialize(d)? {
        Raw::S(s) => parse_duration(&s),
        Raw::I(n) => plain_number(&n.to_string()),
        Raw::F(n) => plain_number(&n.to_string()),
    };
    parsed.map_err(serde::de::Error::custom)
}

/// At most `max` characters of `s`, marked when cut: what an error may echo of a value.
pub(crate) fn capped(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}
