//! Property-based fuzzing of what a request goes through before anything is accepted: protobuf
//! decoding, proto -> model conversion (with its validation), and the pure render of every
//! channel. Whatever the bytes or the text, none of it may panic.
//!
//! Seeds are the golden inputs (tests/golden/*/*.input.json): every card, action and option the
//! renderers know, so mutations start from messages that reach deep into each renderer. Two
//! properties: bytes of an encoded request mutated at random (flips, inserts, cuts, copies),
//! and messages whose strings are replaced by hostile text (grapheme clusters, markup of every
//! channel, control characters, very long runs, markup nested deep) and whose lists are
//! multiplied. A third renders markup nested thousands deep on a worker-sized stack.
//!
//! Bounded for CI: `FUZZ_CASES` cases per property (default 5,000: a few seconds each in a debug
//! build). A longer hunt: `FUZZ_CASES=100000 cargo test --release --test fuzz`.

use std::fs;
use std::path::Path;

use channel_gateway::api::convert::{self, Violations};
use channel_gateway::api::pb;
use channel_gateway::channels::botframework::render as bf;
use channel_gateway::channels::facebook::{config::FacebookConfig, render as fb};
use channel_gateway::channels::slack::{config::SlackConfig, render as slack};
use channel_gateway::channels::telegram::{config::TelegramConfig, html as tg_html, render as tg};
use channel_gateway::model::{Message, ProactiveOptions};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::Message as _;
use serde_json::Value;

/// The golden inputs of every channel, as messages (proactive cases contribute theirs).
fn seeds() -> Vec<Message> {
    let mut out = Vec::new();
    for channel in ["botframework", "facebook", "slack", "telegram"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(channel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".input.json"))
            .collect();
        names.sort();
        for path in names {
            let v: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
            match v.get("messages") {
                Some(list) => {
                    out.extend(serde_json::from_value::<Vec<Message>>(list.clone()).unwrap())
                }
                None => out.push(serde_json::from_value(v).unwrap()),
            }
        }
    }
    assert!(out.len() > 100, "{} seeds", out.len());
    out
}

/// Renders `m` as every channel would (the address's channel id switched to each family).
fn render_everywhere(m: &Message) {
    let facebook = FacebookConfig::default();
    let slack_config = SlackConfig::default();
    let options = ProactiveOptions {
        topic_name: m.text.clone(),
        ..Default::default()
    };
    for channel in [
        "msteams",
        "webchat",
        "skype",
        "directline",
        "facebook",
        "slack",
        "telegram",
    ] {
        let mut m = m.clone();
        m.address.channel_id = channel.into();
        let one = std::slice::from_ref(&m);
        match channel {
            "facebook" => {
                let _ = fb::render_send(&m, None, &facebook);
                let _ = fb::render_proactive(one, &options, &facebook);
            }
            "slack" => {
                let _ = slack::render_send(&m, None, &slack_config);
                let _ = slack::render_proactive(one, &options, &slack_config);
            }
            "telegram" => {
                let config = TelegramConfig::default();
                if let Ok(r) = tg::render_send(&m, None, &config) {
                    telegram_texts_fit(&r);
                }
                // Again at an address Telegram takes, so the content reaches the renderer.
                let mut at_chat = m.clone();
                at_chat.address.conversation = Some(channel_gateway::model::Conversation {
                    id: "42".into(),
                    ..Default::default()
                });
                at_chat.address.bot = Some(channel_gateway::model::Identity {
                    id: "bot".into(),
                    ..Default::default()
                });
                at_chat.address.thread_id = None;
                if let Ok(r) = tg::render_send(&at_chat, None, &config) {
                    telegram_texts_fit(&r);
                }
                let _ = tg::render_proactive(one, &ProactiveOptions::default(), &config);
            }
            _ => {
                let _ = bf::render_send(&m);
                let _ = bf::render_proactive(one, &options);
            }
        }
    }
}

/// Every Telegram text and caption is HTML whose tags balance and whose visible text is
/// within Telegram's limit: a cut never lands inside a tag or an entity.
fn telegram_texts_fit(r: &channel_gateway::channels::Rendered) {
    if let Err(e) = tg::texts_fit(r, true) {
        panic!("{e}");
    }
}

/// What the gateway does with a Send's bytes before it accepts them: decode, convert and
/// validate, then render the valid ones.
fn accept(bytes: &[u8]) {
    let Ok(req) = pb::SendRequest::decode(bytes) else {
        return;
    };
    let Some(m) = req.message else {
        return;
    };
    let mut v = Violations::default();
    let msg = convert::message(&mut v, &"message", m);
    if v.is_empty() {
        render_everywhere(&msg);
    }
}

fn runner() -> TestRunner {
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5000);
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Cut(usize),
    Copy(usize, usize, usize),
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let at = |i: usize| i % bytes.len();
    match m {
        Mutation::Flip(i, x) => {
            let i = at(*i);
            bytes[i] ^= x | 1;
        }
        Mutation::Insert(i, b) => {
            let i = at(*i);
            bytes.splice(i..i, b.iter().copied());
        }
        Mutation::Cut(i) => bytes.truncate(at(*i)),
        Mutation::Copy(from, len, to) => {
            let from = at(*from);
            let end = from.saturating_add(*len).min(bytes.len());
            let piece = bytes[from..end].to_vec();
            let to = at(*to);
            bytes.splice(to..to, piece);
        }
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Cut),
        (any::<usize>(), 1usize..256, any::<usize>()).prop_map(|(f, l, t)| Mutation::Copy(f, l, t)),
    ]
}

#[test]
fn mutated_request_bytes_never_panic() {
    let encoded: Vec<Vec<u8>> = seeds()
        .iter()
        .map(|m| {
            pb::SendRequest {
                message: Some(convert::message_pb(m)),
                ..Default::default()
            }
            .encode_to_vec()
        })
        .collect();
    let n = encoded.len();
    runner()
        .run(
            &(0..n, prop::collection::vec(mutation(), 1..8)),
            |(seed, mutations)| {
                let mut bytes = encoded[seed].clone();
                for m in &mutations {
                    apply(&mut bytes, m);
                }
                accept(&bytes);
                Ok(())
            },
        )
        .unwrap();
}

/// Text that has broken renderers: clusters a cut can split, every channel's markup, escapes,
/// controls, and runs long enough to force splitting.
fn hostile_text() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "👨‍👩‍👧‍👦",
        "🇫🇷",
        "👍🏽",
        "e\u{301}\u{302}\u{303}",
        "\u{200d}",
        "\u{202e}",
        "\u{fe0f}",
        "**",
        "__",
        "*",
        "_",
        "~~",
        "`",
        "```",
        "> ",
        "- [ ] ",
        "1. ",
        "# ",
        "\n",
        "\n\n",
        "\r\n",
        "\t",
        "\u{0}",
        "\u{1b}[31m",
        "<",
        ">",
        "&",
        "&amp;",
        "<at>",
        "</at>",
        "<b>",
        "<https://x.y|lab>",
        "<!channel>",
        "<@U1>",
        "[a](https://x.y)",
        "![i](http://x/y.png)",
        "|",
        "\\",
        "\"",
        "%7C",
        "https://example.com/a?b=c&d=e",
        "mailto:a@b.c",
        " ",
        "word",
        "ß",
        "İ",
        "𝔘",
        "\u{ffff}",
    ]);
    prop_oneof![
        3 => prop::collection::vec(pieces, 0..64).prop_map(|v| v.concat()),
        3 => (
            prop::sample::select(vec!["x", "é", "👍🏽", "ab ", "**a", "\n"]),
            1usize..6000
        )
            .prop_map(|(s, n)| s.repeat(n)),
        3 => ".{0,200}",
        1 => deep_nesting(1..1000),
    ]
}

/// Markup nested `depth` deep: an opener repeated, a word, a closer repeated as often. Openers
/// and closers are drawn apart, so some pairs match (nesting that recursed once per level) and
/// some never do (look-ahead that scanned to the end once per opener).
fn deep_nesting(depth: std::ops::Range<usize>) -> impl Strategy<Value = String> {
    let open = prop::sample::select(vec![
        "[",
        "![",
        "**a ",
        "*a ",
        "_a ",
        "__a ",
        "~~a ",
        "**a *b _c ~~d [e ",
        "`",
        "> ",
        ">  ",
        "  - ",
        "<",
        "&",
        "<b>",
        "<b><i><s>",
        "<u>",
        "<x>",
        "<a href=\"https://x.y\">",
    ]);
    let close = prop::sample::select(vec![
        "](https://x.y)",
        " b**",
        " b*",
        " b_",
        " b__",
        " b~~",
        "](https://x.y) f~~ g_ h* i**",
        "`",
        "",
        "\n",
        ">",
        ";",
        "</b>",
        "</s></i></b>",
        "</y>",
        "</a>",
    ]);
    (open, depth, close)
        .prop_map(|(open, n, close)| format!("{}x{}", open.repeat(n), close.repeat(n)))
}

/// `v` with string leaves replaced (by index in `texts`, cycling) and lists repeated `times`.
fn mutate_json(v: &mut Value, texts: &[String], next: &mut usize, times: usize, depth: usize) {
    match v {
        Value::String(s) => {
            if let Some(t) = texts.get(*next % texts.len().max(1)) {
                // Keys the model parses as enums or URLs keep working often enough: replace
                // only every other leaf.
                if next.is_multiple_of(2) {
                    *s = t.clone();
                }
            }
            *next += 1;
        }
        Value::Array(items) => {
            for item in items.iter_mut() {
                mutate_json(item, texts, next, times, depth + 1);
            }
            if depth < 3 && !items.is_empty() {
                let copy = items.clone();
                for _ in 1..times {
                    items.extend(copy.iter().cloned());
                }
            }
        }
        Value::Object(map) => {
            for (_, item) in map.iter_mut() {
                mutate_json(item, texts, next, times, depth + 1);
            }
        }
        _ => {}
    }
}

#[test]
fn hostile_text_and_long_lists_never_panic() {
    let seeds: Vec<Value> = seeds()
        .iter()
        .map(|m| serde_json::to_value(m).unwrap())
        .collect();
    let n = seeds.len();
    runner()
        .run(
            &(
                0..n,
                prop::collection::vec(hostile_text(), 1..6),
                1usize..12,
            ),
            |(seed, texts, times)| {
                let mut v = seeds[seed].clone();
                let mut next = 0;
                mutate_json(&mut v, &texts, &mut next, times, 0);
                if let Ok(m) = serde_json::from_value::<Message>(v) {
                    render_everywhere(&m);
                    // And the same message through the request path.
                    let bytes = pb::SendRequest {
                        message: Some(convert::message_pb(&m)),
                        ..Default::default()
                    }
                    .encode_to_vec();
                    accept(&bytes);
                }
                Ok(())
            },
        )
        .unwrap();
}

/// Text nested thousands deep (`[[[[...`, `**a **a ...`, `<a><a>...`), in each text format, as
/// a message's text and a card's: every channel renders it on a test thread's stack (2 MiB, a
/// tokio worker's), where a recursion per level would overflow and abort the whole binary.
#[test]
fn deep_nesting_never_overflows_the_stack() {
    // Each case renders up to ~100 KB on every channel: a twentieth of the cases keeps this
    // quick (about 10 s in a debug build).
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(5000)
        / 20;
    let mut runner = TestRunner::new(Config {
        cases: cases.max(1),
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &(deep_nesting(1..5000), 0usize..3, any::<bool>()),
            |(text, format, as_card)| {
                let format = ["markdown", "xml", "plain"][format];
                let mut v = serde_json::json!({
                    "type": "message",
                    "address": {
                        "channel_id": "facebook",
                        "user": {"id": "u1"},
                        "bot": {"id": "b1"},
                        "conversation": {"id": "c1"},
                        "service_url": "https://smba.trafficmanager.net/amer/"
                    },
                    "text_format": format,
                });
                if as_card {
                    v["attachments"] = serde_json::json!([{
                        "content_type": "application/vnd.microsoft.card.hero",
                        "content": {"hero": {"title": &text, "text": &text}}
                    }]);
                } else {
                    v["text"] = text.into();
                }
                let m: Message = serde_json::from_value(v).expect("a message");
                render_everywhere(&m);
                Ok(())
            },
        )
        .unwrap();
}

/// Telegram's split of styled text: every part within the limit with balanced tags, and the
/// parts' visible text, put together, exactly the original's (nothing lost, nothing added).
#[test]
fn telegram_split_keeps_every_character_within_the_limit() {
    use channel_gateway::channels::telegram::split;
    runner()
        .run(
            &(hostile_text(), 1usize..300, 0usize..3),
            |(text, max, format)| {
                let rich = match format {
                    0 => tg_html::from_markdown(&text),
                    1 => tg_html::from_xml(&text),
                    _ => tg_html::Rich::plain(&text),
                };
                let parts = split::split(&rich, max);
                let joined: String = parts.iter().map(tg_html::Rich::visible).collect();
                prop_assert_eq!(joined, rich.visible());
                for p in &parts {
                    // One character always moves on, even when it alone is over the limit.
                    prop_assert!(p.len16() <= max.max(2));
                    let html = p.to_html();
                    let mut depth = 0i64;
                    for (i, _) in html.match_indices('<') {
                        depth += if html[i..].starts_with("</") { -1 } else { 1 };
                        prop_assert!(depth >= 0, "{}", html);
                    }
                    prop_assert_eq!(depth, 0, "{}", html);
                }
                Ok(())
            },
        )
        .unwrap();
}
