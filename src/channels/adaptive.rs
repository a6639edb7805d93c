//! Reading an Adaptive Card's elements, for channels that cannot show one and send its text
//! instead. Owns only the card's JSON shape; each channel decides how the text looks.

use serde_json::{Map, Value};

/// The text of a `RichTextBlock`: its inlines (plain strings or `TextRun`s) joined.
pub(crate) fn rich_text(o: &Map<String, Value>) -> String {
    o.get("inlines")
        .and_then(Value::as_array)
        .map(|inl| {
            inl.iter()
                .filter_map(|i| i.as_str().or_else(|| i.get("text").and_then(Value::as_str)))
                .collect()
        })
        .unwrap_or_default()
}

/// The facts of a `FactSet` as (title, value), each empty when missing.
pub(crate) fn facts(o: &Map<String, Value>) -> impl Iterator<Item = (&str, &str)> {
    o.get("facts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|f| {
            let s = |k: &str| f.get(k).and_then(Value::as_str).unwrap_or_default();
            (s("title"), s("value"))
        })
}
