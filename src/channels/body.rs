//! Request bodies in the form they travel: compact JSON, serialized once when a message is
//! rendered, and a writer that builds a JSON object straight into those bytes.
//!
//! Owns only the byte form. Which fields a channel sends, and their shape, stay in that
//! channel's render; the transport sends the bytes as they are.

use std::fmt;

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use super::RenderError;

/// A request's body as compact JSON; empty for a request without one (or whose body was shed
/// while its message waits). Cloning shares the bytes.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Body(Bytes);

impl Body {
    /// `value` serialized.
    pub fn json(value: &impl Serialize) -> Result<Self, RenderError> {
        serde_json::to_vec(value)
            .map(|v| Self(Bytes::from(v)))
            .map_err(unserializable)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The body read back as a JSON value (`Null` when empty), for what inspects a request
    /// rather than sends it: the Render RPC, a receipt's fallback fields, tests.
    pub fn value(&self) -> Value {
        // Only `json` and `ObjWriter` make a body, so its bytes always parse.
        serde_json::from_slice(&self.0).unwrap_or(Value::Null)
    }
}

/// The JSON text as it is sent; `null` when there is none.
impl fmt::Display for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("null")
        } else {
            f.write_str(&String::from_utf8_lossy(&self.0))
        }
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn unserializable(e: serde_json::Error) -> RenderError {
    RenderError::invalid("message", format!("cannot be serialized: {e}"))
}

/// Serialized as the JSON it holds, so a rendered request reads the same whichever way its
/// body was built.
impl Serialize for Body {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value().serialize(s)
    }
}

/// What renders leave out of a request: `null`, `""`, `[]` and `{}`.
pub fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Bool(_) | Value::Number(_) => false,
    }
}

/// A JSON object written as it is built. Like the value trees renders build, it leaves out
/// what is empty (`null`, `""`, `[]`, `{}`), so an absent field and an empty one read the
/// same to the channel. Keys are written in the order they are put, each once: the caller
/// puts a key at most once.
pub struct ObjWriter {
    out: Vec<u8>,
    /// The first failure to serialize a value; `finish` reports it.
    error: Option<serde_json::Error>,
}

impl ObjWriter {
    pub fn new() -> Self {
        let mut out = Vec::with_capacity(512);
        out.push(b'{');
        Self { out, error: None }
    }

    fn key(&mut self, key: &str) {
        // Keys are the renders' own ASCII names: nothing in them needs escaping.
        debug_assert!(key.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\'));
        if self.out.last() != Some(&b'{') {
            self.out.push(b',');
        }
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn write(&mut self, v: &(impl Serialize + ?Sized)) {
        if let Err(e) = serde_json::to_writer(&mut self.out, v) {
            self.error.get_or_insert(e);
        }
    }

    /// A string, left out when empty.
    pub fn str(&mut self, key: &str, v: &str) {
        if !v.is_empty() {
            self.key(key);
            self.write(v);
        }
    }

    pub fn opt_str(&mut self, key: &str, v: Option<&str>) {
        if let Some(v) = v {
            self.str(key, v);
        }
    }

    pub fn bool(&mut self, key: &str, v: bool) {
        self.key(key);
        self.out
            .extend_from_slice(if v { b"true".as_slice() } else { b"false" });
    }

    pub fn opt_bool(&mut self, key: &str, v: Option<bool>) {
        if let Some(v) = v {
            self.bool(key, v);
        }
    }

    /// A value, left out when empty.
    pub fn value(&mut self, key: &str, v: &Value) {
        if !is_empty(v) {
            self.key(key);
            self.write(v);
        }
    }

    /// A list, left out when empty (its items are written as they are, empty or not).
    pub fn list<T: Serialize>(&mut self, key: &str, v: &[T]) {
        if !v.is_empty() {
            self.key(key);
            self.write(v);
        }
    }

    /// An object `fill` writes into this writer's bytes, left out when it puts nothing.
    pub fn obj(&mut self, key: &str, fill: impl FnOnce(&mut Self)) {
        let mark = self.out.len();
        self.key(key);
        self.out.push(b'{');
        let start = self.out.len();
        fill(self);
        if self.out.len() == start {
            self.out.truncate(mark);
        } else {
            self.out.push(b'}');
        }
    }

    /// A list of objects, one per item, each written by `fill`; left out when it has none.
    pub fn objs<T>(&mut self, key: &str, items: &[T], mut fill: impl FnMut(&mut Self, &T)) {
        if items.is_empty() {
            return;
        }
        self.key(key);
        self.out.push(b'[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            self.out.push(b'{');
            fill(self, item);
            self.out.push(b'}');
        }
        self.out.push(b']');
    }

    pub fn finish(mut self) -> Result<Body, RenderError> {
        if let Some(e) = self.error {
            return Err(unserializable(e));
        }
        self.out.push(b'}');
        Ok(Body(Bytes::from(self.out)))
    }
}

impl Default for ObjWriter {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_written_object_reads_as_the_value_it_describes() {
        let mut o = ObjWriter::new();
        o.str("type", "message");
        o.str("empty", "");
        o.opt_str("none", None);
        o.obj("from", |o| {
            o.str("id", "b\"1\\\n\u{1}é");
            o.opt_bool("isGroup", Some(false));
        });
        o.obj("nothing", |o| o.str("id", ""));
        o.value("null", &Value::Null);
        o.value("list", &json!([]));
        o.value("channelData", &json!({"a": [1, {"b": null}]}));
        o.list("listenFor", &["a", "b"]);
        o.list::<Value>("noList", &[]);
        o.objs("members", &["u1", "u2"], |o, id| o.str("id", id));
        o.objs("noMembers", &[] as &[&str], |o, id| o.str("id", id));
        o.bool("last", true);
        let body = o.finish().unwrap();
        assert_eq!(
            body.value(),
            json!({
                "type": "message",
                "from": {"id": "b\"1\\\n\u{1}é", "isGroup": false},
                "channelData": {"a": [1, {"b": null}]},
                "listenFor": ["a", "b"],
                "members": [{"id": "u1"}, {"id": "u2"}],
                "last": true,
            })
        );
        // The bytes are what serde_json would write for the same fields in that order.
        assert_eq!(
            std::str::from_utf8(body.as_bytes()).unwrap(),
            r#"{"type":"message","from":{"id":"b\"1\\\n\u0001é","isGroup":false},"channelData":{"a":[1,{"b":null}]},"listenFor":["a","b"],"members":[{"id":"u1"},{"id":"u2"}],"last":true}"#
        );
    }

    #[test]
    fn an_object_with_nothing_in_it_is_empty_json() {
        let mut o = ObjWriter::new();
        o.obj("a", |_| {});
        assert_eq!(o.finish().unwrap().as_bytes(), b"{}");
        assert_eq!(Body::default().value(), Value::Null);
        assert_eq!(
            Body::json(&json!({"k": "v"})).unwrap().as_bytes(),
            br#"{"k":"v"}"#
        );
    }
}
