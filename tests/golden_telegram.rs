//! Golden tests for the Telegram renderer with the default `[channels.telegram]` config (see
//! `golden_support` for the case format). Every expected text is also checked to be Telegram
//! HTML whose tags balance and whose visible text fits the limit, so a reviewed file cannot
//! hold a part Telegram would refuse.

#[path = "golden_support/mod.rs"]
mod golden_support;

use channel_gateway::channels::Rendered;
use channel_gateway::channels::telegram::config::TelegramConfig;
use channel_gateway::channels::telegram::html::decode_entities;
use channel_gateway::channels::telegram::render::{
    MAX_CAPTION, MAX_TEXT, render_proactive, render_send,
};
use golden_support::Case;
use serde_json::Value;

/// The text a user sees of Telegram HTML, and whether its tags balance.
fn visible(html: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut stack: Vec<String> = Vec::new();
    let mut rest = html;
    while let Some(lt) = rest.find('<') {
        out.push_str(&rest[..lt]);
        let gt = rest[lt..]
            .find('>')
            .ok_or_else(|| format!("unclosed tag in {html:?}"))?
            + lt;
        let tag = &rest[lt + 1..gt];
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(char::is_ascii_alphanumeric)
            .collect();
        if tag.starts_with('/') {
            if stack.pop().as_deref() != Some(name.as_str()) {
                return Err(format!("`</{name}>` closes nothing open in {html:?}"));
            }
        } else {
            stack.push(name);
        }
        rest = &rest[gt + 1..];
    }
    out.push_str(rest);
    if out.contains('>') {
        return Err(format!("unescaped `>` in {html:?}"));
    }
    if !stack.is_empty() {
        return Err(format!("{stack:?} left open in {html:?}"));
    }
    Ok(decode_entities(&out))
}

fn check_texts(r: &Rendered) -> Result<(), String> {
    for q in &r.requests {
        let body = q.body.value();
        let mut texts: Vec<(&Value, usize)> =
            vec![(&body["text"], MAX_TEXT), (&body["caption"], MAX_CAPTION)];
        for m in body["media"].as_array().into_iter().flatten() {
            texts.push((&m["caption"], MAX_CAPTION));
        }
        for (t, max) in texts {
            if let Some(t) = t.as_str() {
                let v = visible(t)?;
                let n = v.encode_utf16().count();
                if n > max || v.trim().is_empty() {
                    return Err(format!("{n} UTF-16 units (limit {max}) in {}", q.url));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn golden_telegram() {
    let config = TelegramConfig::default();
    golden_support::run("telegram", 50, |_, _, case| {
        let r = match case {
            Case::Send(m) => render_send(&m, None, &config),
            Case::Proactive(ms, o) => render_proactive(&ms, &o, &config),
        };
        if let Ok(r) = &r {
            check_texts(r)?;
        }
        Ok(r)
    });
}
