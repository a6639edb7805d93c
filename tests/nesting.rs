//! Deeply nested and unmatched markup through the pure renders of Messenger, Slack and Bot
//! Framework: a text well under `server.max_message_bytes` must neither exhaust a worker's stack
//! (a stack overflow aborts the whole gateway, `catch_unwind` cannot stop it) nor take time
//! growing with the square of its length, and what comes out stays within the channel's limits.
//!
//! Each render runs on a thread with the stack of a tokio worker (2 MiB), so a recursion that
//! would overflow there overflows here too. Each pattern is its own module, each channel its own
//! test, so one abort names its pattern and channel. One test sends the reported text end to
//! end (gRPC client -> gateway -> fake Graph API) and checks the gateway still answers after.

#[path = "facebook_support/mod.rs"]
mod facebook_support;

use std::time::{Duration, Instant};

use channel_gateway::channels::Rendered;
use channel_gateway::channels::botframework::render as bf;
use channel_gateway::channels::facebook::{config::FacebookConfig, render as fb};
use channel_gateway::channels::slack::{config::SlackConfig, render as slack};
use channel_gateway::model::Message;
use serde_json::{Value, json};

/// A tokio worker thread's default stack.
const STACK: usize = 2 << 20;
/// The default `server.max_message_bytes`: the most text one message can carry.
const INPUT: usize = 256 << 10;
/// Generous for a linear render of `INPUT` bytes in a debug build on a shared machine (about
/// 0.1 s alone; 2.4 s was seen with the whole suite and two builds on 2 cores, past an earlier
/// bound of 2 s); a quadratic one takes minutes.
const BOUND: Duration = Duration::from_secs(20);

/// `open` n times, `mid`, then `close` n times, with n as large as fits in `INPUT` bytes.
fn nest(open: &str, mid: &str, close: &str) -> String {
    let n = (INPUT - mid.len()) / (open.len() + close.len());
    format!("{}{mid}{}", open.repeat(n), close.repeat(n))
}

/// `s` repeated to fill `INPUT` bytes.
fn fill(s: &str) -> String {
    fill_then(s, "")
}

/// `s` repeated, then `end`, in `INPUT` bytes.
fn fill_then(s: &str, end: &str) -> String {
    fill_between("", s, end)
}

/// `start`, `s` repeated, then `end`, in `INPUT` bytes.
fn fill_between(start: &str, s: &str, end: &str) -> String {
    let n = (INPUT - start.len() - end.len()) / s.len();
    format!("{start}{}{end}", s.repeat(n))
}

/// Lines nested one level deeper each (`indent` once more per line), until `INPUT` is used.
fn deeper_lines(indent: &str, item: &str) -> String {
    let mut out = String::new();
    let mut depth = 0;
    loop {
        let line = format!("{}{item}\n", indent.repeat(depth));
        if out.len() + line.len() > INPUT {
            return out;
        }
        out.push_str(&line);
        depth += 1;
    }
}

/// Runs of backticks one longer each, none closed: each looks for its closer to the end.
fn backtick_runs() -> String {
    let mut out = String::new();
    let mut k = 1;
    while out.len() + k + 2 <= INPUT {
        out.push_str(&"`".repeat(k));
        out.push_str("a ");
        k += 1;
    }
    out
}

#[derive(Clone, Copy)]
enum Channel {
    Facebook,
    Slack,
    Teams,
}

fn address(channel: Channel) -> Value {
    match channel {
        Channel::Facebook => json!({
            "channel_id": "facebook",
            "user": {"id": "5120863467921834"},
            "bot": {"id": "107345288765432"},
            "conversation": {"id": "5120863467921834"}
        }),
        Channel::Slack => json!({
            "channel_id": "slack",
            "user": {"id": "U024BE7LH"},
            "bot": {"id": "B0123BOT"},
            "conversation": {"id": "C0123CHAN"}
        }),
        Channel::Teams => json!({
            "channel_id": "msteams",
            "user": {"id": "29:1Xyz"},
            "bot": {"id": "28:c9e8c047"},
            "conversation": {"id": "a:1Xyz9AbcD"},
            "service_url": "https://smba.trafficmanager.net/amer/"
        }),
    }
}

/// The text as the message's text and, a second time, as a hero card's text and title.
fn message(channel: Channel, format: &str, text: &str) -> Message {
    serde_json::from_value(json!({
        "type": "message",
        "address": address(channel),
        "text_format": format,
        "text": text,
    }))
    .expect("a message")
}

fn card(channel: Channel, format: &str, text: &str) -> Message {
    serde_json::from_value(json!({
        "type": "message",
        "address": address(channel),
        "text_format": format,
        "attachments": [{
            "content_type": "application/vnd.microsoft.card.hero",
            "content": {"hero": {"title": text, "text": text}}
        }]
    }))
    .expect("a message")
}

/// Renders on a thread with a worker's stack: how long it took.
fn render(channel: Channel, m: Message) -> Duration {
    std::thread::Builder::new()
        .name("render".into())
        .stack_size(STACK)
        .spawn(move || {
            let start = Instant::now();
            let r = match channel {
                Channel::Facebook => fb::render_send(&m, None, &FacebookConfig::default()),
                Channel::Slack => slack::render_send(&m, None, &SlackConfig::default()),
                Channel::Teams => bf::render_send(&m),
            };
            let took = start.elapsed();
            if let Ok(r) = r {
                within_limits(channel, &r);
            }
            took
        })
        .expect("a thread")
        .join()
        .expect("the render did not panic")
}

/// Every text within what the channel takes.
fn within_limits(channel: Channel, r: &Rendered) {
    assert!(!r.requests.is_empty());
    for q in &r.requests {
        let body = q.body.value();
        match channel {
            Channel::Facebook => {
                if let Some(t) = body["message"]["text"].as_str() {
                    let n = t.encode_utf16().count();
                    assert!(n <= fb::MAX_TEXT, "{n} UTF-16 units");
                }
            }
            Channel::Slack => {
                if let Some(t) = body["text"].as_str() {
                    let n = t.chars().count();
                    assert!(n <= slack::MAX_TEXT_CHARS, "{n} characters");
                }
                for b in body["blocks"].as_array().into_iter().flatten() {
                    if let Some(t) = b["text"]["text"].as_str() {
                        assert!(
                            t.chars().count() <= 3000,
                            "{} characters",
                            t.chars().count()
                        );
                    }
                }
            }
            // Teams' limit is on the activity as UTF-16; a longer text is split.
            Channel::Teams => {
                let json = std::str::from_utf8(q.body.as_bytes()).expect("JSON is UTF-8");
                let n = json.encode_utf16().count();
                assert!(n <= bf::TEAMS_MAX_UTF16_UNITS, "{n} UTF-16 units");
            }
        }
    }
}

fn check(channel: Channel, format: &str, text: &str) {
    assert!(
        text.len() <= INPUT && text.len() > INPUT / 2,
        "{}",
        text.len()
    );
    for m in [message(channel, format, text), card(channel, format, text)] {
        let took = render(channel, m);
        eprintln!("{} bytes rendered in {took:?}", text.len());
        assert!(took < BOUND, "{took:?} for {} bytes", text.len());
    }
}

/// One module per pattern, one test per channel: `pattern::facebook`, `pattern::slack`,
/// `pattern::teams`.
macro_rules! patterns {
    ($($name:ident: $format:literal, $text:expr;)*) => {$(
        mod $name {
            use super::*;

            #[test]
            fn facebook() {
                check(Channel::Facebook, $format, &$text);
            }

            #[test]
            fn slack() {
                check(Channel::Slack, $format, &$text);
            }

            #[test]
            fn teams() {
                check(Channel::Teams, $format, &$text);
            }
        }
    )*};
}

patterns! {
    // Nested thousands deep: each level was a recursive call.
    links_nested: "markdown", nest("[", "x", "](https://x.io)");
    images_nested: "markdown", nest("![", "x", "](https://x.io)");
    bold_nested: "markdown", nest("**a ", "x", " b**");
    italic_star_nested: "markdown", nest("*a ", "x", " b*");
    italic_underscore_nested: "markdown", nest("_a ", "x", " b_");
    bold_underscore_nested: "markdown", nest("__a ", "x", " b__");
    strike_nested: "markdown", nest("~~a ", "x", " b~~");
    mixed_nested: "markdown", nest("**a *b _c ~~d [e ", "x", "](https://x.io) f~~ g_ h* i**");
    quotes_nested: "markdown", nest("> ", "x", "");
    quotes_spaced_nested: "markdown", nest(">  ", "x", "");
    lists_nested: "markdown", deeper_lines("  ", "- item *a* [b](https://x.io)");
    ordered_lists_nested: "markdown", deeper_lines("   ", "1. item");
    one_line_indented: "markdown", format!("{}- x", " ".repeat(INPUT - 3));
    // Unmatched: each marker looked for its closer to the end of the text.
    brackets_unmatched: "markdown", fill("[a");
    brackets_open: "markdown", fill("[");
    link_targets_unclosed: "markdown", fill("[a](");
    images_unmatched: "markdown", fill("![a");
    stars_unmatched: "markdown", fill("*a ");
    double_stars_unmatched: "markdown", fill("**a ");
    underscores_unmatched: "markdown", fill("_a ");
    tildes_unmatched: "markdown", fill("~~a ");
    backticks_unmatched: "markdown", backtick_runs();
    backticks_in_brackets: "markdown", fill("[`a ``b ");
    backticks_in_emphasis: "markdown", fill("*a ``b ");
    angles_unmatched: "markdown", fill("<");
    angles_spaced: "markdown", fill_then("< a", ">");
    angles_urls: "markdown", fill_then("<http://a", ">");
    ampersands: "markdown", fill("&");
    // The v3 XML subset.
    xml_nested: "xml", nest("<b><i><s>", "x", "</s></i></b>");
    xml_bold_nested: "xml", nest("<b>", "x", "</b>");
    xml_unknown_nested: "xml", nest("<x>", "x", "</y>");
    xml_underline_nested: "xml", nest("<u>", "x", "</u>");
    xml_styles_in_a_link: "xml", fill_between("<a href=\"https://x.io\">", "<b>", "x</a>");
    xml_links_nested: "xml", nest("<a href=\"https://x.io\">", "x", "</a>");
    xml_links_sequential: "xml", fill("<a href=\"https://x.io\">x</a> ");
    xml_angles: "xml", fill_then("<", ">");
    xml_angles_spaced: "xml", fill_then("< a", ">");
    xml_ampersands: "xml", fill_then("&", ";");
    xml_numeric_refs: "xml", fill_then("&#", ";");
}

/// The reported crash, end to end: 3,000 nested `[` then `](https://x.io)` (about 48 KB, well
/// under `server.max_message_bytes`) sent to Messenger as markdown. It aborted the whole gateway
/// (every conversation's worker and the gRPC server); now it is delivered, and the gateway
/// takes the next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reported_nesting_is_delivered_and_the_gateway_lives_on() {
    use channel_gateway::api::pb;
    let h = facebook_support::start().await;
    let deep = format!("{}x{}", "[".repeat(3000), "](https://x.io)".repeat(3000));
    assert!(deep.len() > 45_000 && deep.len() < 50_000);
    let send = |text: &str| {
        let mut m = facebook_support::text("5120863467921834", text);
        m.text_format = pb::TextFormat::Markdown as i32;
        let mut client = h.client.clone();
        async move {
            let call = client.send(pb::SendRequest {
                message: Some(m),
                wait: pb::WaitMode::Delivered as i32,
                ..Default::default()
            });
            tokio::time::timeout(Duration::from_secs(60), call)
                .await
                .expect("an answer in time")
                .expect("delivered")
                .into_inner()
        }
    };
    let r = send(&deep).await;
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32);
    let texts: String = h
        .fake
        .delivered("5120863467921834")
        .iter()
        .map(|q| q.text().to_string())
        .collect();
    // The 17 outer links became text, the rest is literal markdown; all of it within limits.
    assert!(
        texts.contains("[[[x](https://x.io)](https://x.io)"),
        "{}",
        &texts[..200]
    );
    let r = send("still **here**").await;
    assert_eq!(r.state, pb::DeliveryState::Delivered as i32);
    assert!(
        h.fake
            .delivered("5120863467921834")
            .iter()
            .any(|q| q.text() == "still here")
    );
}
