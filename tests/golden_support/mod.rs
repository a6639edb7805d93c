//! The golden-test machinery every channel shares: walk `tests/golden/<channel>/*.input.json`,
//! render each case with the channel's pure renderer, compare with `NAME.json` as parsed JSON.
//!
//! `NAME.input.json` is a serialized `model::Message`, or for `proactive_*` cases
//! `{"messages": [...], "options": {...}}`. The result, `{"requests": [{method, url, body}],
//! "warnings": [...]}` (or `{"error": {kind, field, reason}}` when rendering fails), is compared
//! with `NAME.json`. `UPDATE_GOLDEN=1` writes the expected files instead: review each by hand.
//! Inputs must be canonical (what the model serializes back to), so a misspelt field cannot go
//! unnoticed; an expected file (or a `NAME.config.json`) without its input fails the run.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use channel_gateway::channels::{RenderError, Rendered};
use channel_gateway::model::{Message, ProactiveOptions};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

const INPUT_SUFFIX: &str = ".input.json";
pub const CONFIG_SUFFIX: &str = ".config.json";

/// One case's input, as the channel's renderer takes it.
pub enum Case {
    Send(Box<Message>),
    Proactive(Vec<Message>, ProactiveOptions),
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ProactiveInput {
    messages: Vec<Message>,
    #[serde(default)]
    options: ProactiveOptions,
}

/// `input` parsed as `T`, refusing input that does not serialize back to itself: the model
/// ignores unknown fields, so a misspelt field would otherwise silently test nothing.
fn parse_canonical<T: serde::de::DeserializeOwned + Serialize>(input: &str) -> Result<T, String> {
    let raw: Value = serde_json::from_str(input).map_err(|e| format!("not JSON: {e}"))?;
    let parsed: T = serde_json::from_value(raw.clone()).map_err(|e| format!("bad input: {e}"))?;
    let back = serde_json::to_value(&parsed).map_err(|e| e.to_string())?;
    if back != raw {
        return Err(format!(
            "input is not in canonical form (a misspelt or defaulted field?); it parses as\n{}",
            pretty(&back)
        ));
    }
    Ok(parsed)
}

fn parse_case(name: &str, input: &str) -> Result<Case, String> {
    if name.starts_with("proactive_") {
        let p: ProactiveInput = parse_canonical(input)?;
        Ok(Case::Proactive(p.messages, p.options))
    } else {
        Ok(Case::Send(Box::new(parse_canonical(input)?)))
    }
}

/// Case names (file name without `.input.json`), sorted.
fn cases(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_suffix(INPUT_SUFFIX).map(String::from))
        .collect();
    names.sort();
    names
}

fn error_json(e: &RenderError) -> Value {
    let (kind, field, reason) = match e {
        RenderError::InvalidArgument { field, reason } => ("invalid_argument", field, reason),
        RenderError::PermissionDenied { field, reason } => ("permission_denied", field, reason),
        RenderError::Unimplemented { field, reason } => ("unimplemented", field, reason),
    };
    json!({"error": {"kind": kind, "field": field, "reason": reason}})
}

/// The JSON path of the first place `a` and `b` differ.
fn first_difference(a: &Value, b: &Value, path: &str) -> String {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .find(|k| x.get(*k) != y.get(*k))
                .map(|k| match (x.get(k), y.get(k)) {
                    (Some(xv), Some(yv)) => first_difference(xv, yv, &format!("{path}.{k}")),
                    _ => format!("{path}.{k}"),
                })
                .unwrap_or_else(|| path.to_string())
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .position(|(xv, yv)| xv != yv)
            .map(|i| first_difference(&x[i], &y[i], &format!("{path}[{i}]")))
            .unwrap_or_else(|| path.to_string()),
        _ => path.to_string(),
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap()
}

/// Runs every case of `tests/golden/<channel>`; `render` gets the case's name (to find a
/// per-case config) and its input, and may refuse a result with a reason (an `Err` string).
pub fn run(
    channel: &str,
    min_cases: usize,
    render: impl Fn(&Path, &str, Case) -> Result<Result<Rendered, RenderError>, String>,
) {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(channel);
    let update = std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1");
    let names = cases(&dir);
    assert!(
        names.len() >= min_cases,
        "expected the golden cases in {}, found {}",
        dir.display(),
        names.len()
    );

    let mut failures = Vec::new();
    for name in &names {
        let input_path = dir.join(format!("{name}{INPUT_SUFFIX}"));
        let expected_path = dir.join(format!("{name}.json"));
        let input = fs::read_to_string(&input_path).unwrap();
        let actual = parse_case(name, &input)
            .and_then(|case| render(&dir, name, case))
            .and_then(|r| match r {
                Ok(r) => serde_json::to_value(&r).map_err(|e| e.to_string()),
                Err(e) => Ok(error_json(&e)),
            });
        let actual = match actual {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!("case `{name}`: {e}"));
                continue;
            }
        };
        if update {
            fs::write(&expected_path, pretty(&actual) + "\n").unwrap();
            continue;
        }
        let expected: Value = match fs::read_to_string(&expected_path) {
            Ok(s) => match serde_json::from_str(&s) {
                Ok(v) => v,
                Err(e) => {
                    failures.push(format!("case `{name}`: {}: {e}", expected_path.display()));
                    continue;
                }
            },
            Err(e) => {
                failures.push(format!(
                    "case `{name}`: {}: {e} (UPDATE_GOLDEN=1 writes it; review it by hand)",
                    expected_path.display()
                ));
                continue;
            }
        };
        if actual != expected {
            failures.push(format!(
                "case `{name}` differs from {} (first at {})\n--- expected\n{}\n--- actual\n{}",
                expected_path.display(),
                first_difference(&expected, &actual, "$"),
                pretty(&expected),
                pretty(&actual)
            ));
        }
    }

    // An expected file (or a config) without its input is a case that silently stopped running.
    for entry in fs::read_dir(&dir).unwrap() {
        let file = entry.unwrap().file_name().to_string_lossy().into_owned();
        let name = file
            .strip_suffix(CONFIG_SUFFIX)
            .or_else(|| file.strip_suffix(".json"));
        if let Some(name) = name
            && !file.ends_with(INPUT_SUFFIX)
            && !names.iter().any(|n| n == name)
        {
            failures.push(format!("{file} has no {name}{INPUT_SUFFIX}"));
        }
    }

    assert!(
        failures.is_empty(),
        "{} of {} golden cases failed:\n\n{}",
        failures.len(),
        names.len(),
        failures.join("\n\n")
    );
}
