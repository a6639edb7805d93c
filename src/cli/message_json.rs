//! The message JSON the CLI reads (`--file`): the model's serde form (snake_case, as the golden
//! tests write it) or the proto's JSON mapping (lowerCamelCase names, enum value names, a card
//! as the attachment's oneof field, `value_object`). Owns only that reading; what a message may
//! hold is checked by the gateway.
//!
//! Strict where serde is lenient: a key the model does not have is an error naming its path,
//! since a misspelled key silently dropped sends a different message than the one written.

use serde_json::{Map, Value};

use channel_gateway::model::Message;

/// Keys whose values are free-form JSON: their own keys are the bot's, never renamed.
const FREE_FORM: &[&str] = &[
    "entities",
    "source_event",
    "value",
    "value_object",
    "channel_data",
    "json",
];

/// The attachment oneof's fields, which the model keeps under `content`.
const CARDS: &[&str] = &[
    "hero",
    "thumbnail",
    "receipt",
    "signin",
    "oauth",
    "animation",
    "audio",
    "video",
    "json",
];

/// Enum-valued keys and the prefixes of their proto value names.
fn enum_prefixes(key: &str, parent: &str) -> &'static [&'static str] {
    match key {
        "type" if matches!(parent, "buttons" | "actions" | "tap") => &["ACTION_TYPE_"],
        "type" => &["MESSAGE_TYPE_"],
        "text_format" => &["TEXT_FORMAT_"],
        "attachment_layout" => &["ATTACHMENT_LAYOUT_"],
        "input_hint" => &["INPUT_HINT_"],
        "importance" => &["IMPORTANCE_"],
        "delivery_mode" => &["DELIVERY_MODE_"],
        _ => &[],
    }
}

/// One message from its JSON; `Err` says what is wrong and where (`attachments[0].hero.titel`).
pub fn message(v: Value) -> Result<Message, String> {
    let v = normalize(v, "");
    let mut unknown = Vec::new();
    let m: Message = serde_ignored::deserialize(&v, |path| unknown.push(path_string(&path, &v)))
        .map_err(|e| e.to_string())?;
    match unknown.as_slice() {
        [] => Ok(m),
        [one] => Err(format!("unknown field `{one}`")),
        many => Err(format!(
            "unknown fields {}",
            many.iter()
                .map(|p| format!("`{p}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// `a.0.b` as serde_ignored gives it, written `a[0].b`. serde_ignored leaves out the variant
/// of an enum (the card under `content`); `doc` has it.
fn path_string(path: &serde_ignored::Path<'_>, doc: &Value) -> String {
    walk(path, doc).0
}

/// The path's display form and its JSON pointer into `doc`.
fn walk(path: &serde_ignored::Path<'_>, doc: &Value) -> (String, String) {
    use serde_ignored::Path;
    match path {
        Path::Root => (String::new(), String::new()),
        Path::Seq { parent, index } => {
            let (shown, pointer) = walk(parent, doc);
            (format!("{shown}[{index}]"), format!("{pointer}/{index}"))
        }
        Path::Map { parent, key } => {
            let (shown, pointer) = walk(parent, doc);
            let shown = if shown.is_empty() {
                key.clone()
            } else {
                format!("{shown}.{key}")
            };
            (
                shown,
                format!("{pointer}/{}", key.replace('~', "~0").replace('/', "~1")),
            )
        }
        Path::NewtypeVariant { parent } => {
            let (shown, pointer) = walk(parent, doc);
            match doc.pointer(&pointer).and_then(Value::as_object) {
                Some(o) if o.len() == 1 => {
                    let variant = o.keys().next().cloned().unwrap_or_default();
                    (format!("{shown}.{variant}"), format!("{pointer}/{variant}"))
                }
                _ => (shown, pointer),
            }
        }
        Path::Some { parent } | Path::NewtypeStruct { parent } => walk(parent, doc),
    }
}

/// The proto JSON form rewritten into the model's: names to snake_case, enum names to the
/// model's values (`_UNSPECIFIED` dropped), a card moved under `content`, `value_object` to
/// `value`. The model's own form passes through unchanged.
fn normalize(v: Value, parent: &str) -> Value {
    match v {
        Value::Array(items) => {
            Value::Array(items.into_iter().map(|i| normalize(i, parent)).collect())
        }
        Value::Object(fields) => {
            let mut out = Map::new();
            for (k, v) in fields {
                let key = snake_case(&k);
                if FREE_FORM.contains(&key.as_str()) {
                    out.insert(key, v);
                    continue;
                }
                let v = match v {
                    Value::String(s) => match enum_value(&s, enum_prefixes(&key, parent)) {
                        Some(None) => continue,
                        Some(Some(model)) => Value::String(model),
                        None => Value::String(s),
                    },
                    other => normalize(other, &key),
                };
                out.insert(key, v);
            }
            if parent == "attachments"
                && !out.contains_key("content")
                && let Some(card) = CARDS.iter().find(|c| out.contains_key(**c))
                && let Some(body) = out.remove(*card)
            {
                let mut content = Map::new();
                content.insert(card.to_string(), body);
                out.insert("content".into(), Value::Object(content));
            }
            if matches!(parent, "buttons" | "actions" | "tap")
                && !out.contains_key("value")
                && let Some(obj) = out.remove("value_object")
            {
                out.insert("value".into(), obj);
            }
            Value::Object(out)
        }
        other => other,
    }
}

/// `TEXT_FORMAT_MARKDOWN` as `markdown`; `Some(None)` for `_UNSPECIFIED` (the default); `None`
/// when `s` is not a proto value name of this key (the model's own `markdown` included).
fn enum_value(s: &str, prefixes: &[&str]) -> Option<Option<String>> {
    let rest = prefixes.iter().find_map(|p| s.strip_prefix(p))?;
    if rest == "UNSPECIFIED" {
        return Some(None);
    }
    Some(Some(rest.to_ascii_lowercase()))
}

/// `serviceUrl` as `service_url`; snake_case names are unchanged.
fn snake_case(k: &str) -> String {
    if !k.chars().any(|c| c.is_ascii_uppercase()) {
        return k.to_string();
    }
    let mut out = String::with_capacity(k.len() + 4);
    let mut prev_lower = false;
    for c in k.chars() {
        if c.is_ascii_uppercase() {
            if prev_lower {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
            prev_lower = false;
        } else {
            prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_misspelled_key_is_named_with_its_path() {
        let err = message(json!({
            "address": {"channel_id": "msteams", "convesation": {"id": "c"}},
            "attachments": [{"content": {"hero": {"titel": "x"}}}],
        }))
        .unwrap_err();
        assert!(err.contains("`address.convesation`"), "{err}");
        assert!(err.contains("`attachments[0].content.hero.titel`"), "{err}");
    }

    #[test]
    fn free_form_json_keeps_its_keys() {
        let m = message(json!({
            "address": {"channel_id": "slack"},
            "sourceEvent": {"slack": {"unfurlLinks": true}},
            "entities": [{"type": "mention", "mentionedId": "x"}],
        }))
        .unwrap();
        assert_eq!(m.source_event["slack"], json!({"unfurlLinks": true}));
        assert_eq!(m.entities[0]["mentionedId"], "x");
    }

    #[test]
    fn the_proto_json_mapping_reads_as_the_model_form() {
        let proto = message(json!({
            "type": "MESSAGE_TYPE_MESSAGE",
            "address": {"channelId": "msteams", "serviceUrl": "https://x/", "conversation": {"id": "c", "isGroup": true}},
            "text": "*hi*",
            "textFormat": "TEXT_FORMAT_MARKDOWN",
            "attachmentLayout": "ATTACHMENT_LAYOUT_CAROUSEL",
            "importance": "IMPORTANCE_UNSPECIFIED",
            "attachments": [{"contentType": "", "hero": {"title": "t", "buttons": [
                {"type": "ACTION_TYPE_MESSAGE_BACK", "title": "b", "displayText": "d", "valueObject": {"k": 1}}
            ]}}],
            "suggestedActions": {"actions": [{"type": "ACTION_TYPE_IM_BACK", "title": "y", "value": "y"}]},
        }))
        .unwrap();
        let model = message(json!({
            "address": {"channel_id": "msteams", "service_url": "https://x/", "conversation": {"id": "c", "is_group": true}},
            "text": "*hi*",
            "text_format": "markdown",
            "attachment_layout": "carousel",
            "attachments": [{"content_type": "", "content": {"hero": {"title": "t", "buttons": [
                {"type": "message_back", "title": "b", "display_text": "d", "value": {"k": 1}}
            ]}}}],
            "suggested_actions": {"actions": [{"type": "im_back", "title": "y", "value": "y"}]},
        }))
        .unwrap();
        assert_eq!(proto, model);
    }

    #[test]
    fn names_convert() {
        assert_eq!(snake_case("serviceUrl"), "service_url");
        assert_eq!(snake_case("aadObjectId"), "aad_object_id");
        assert_eq!(snake_case("service_url"), "service_url");
    }
}
