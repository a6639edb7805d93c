//! Cutting styled text ([`Rich`]) to Telegram's length limits: 4096 for a message's text, 1024
//! for a caption, both counted after entity parsing, i.e. on the text the user sees.
//!
//! Lengths are counted in UTF-16 code units (how the Bot API measures entity offsets, and never
//! less than a count in characters), so a part that fits here fits Telegram whichever it counts.
//! Cuts are made in the visible text, preferring a paragraph break, then a line break, then a
//! sentence end, then a space, and always between grapheme clusters; the styles of each part
//! come from its runs, so a tag open across a cut is closed before it and opened again after,
//! and no cut can fall inside a tag or an entity. The parts, put back together, are the text.

use super::html::{Rich, Run};
use crate::channels::text;

/// Splits `rich` into parts of at most `max` UTF-16 units each (at least one character per
/// part, even under a limit smaller than it). Concatenated, the parts' visible text is the
/// original's; whitespace at a cut stays at the end of the earlier part.
pub fn split(rich: &Rich, max: usize) -> Vec<Rich> {
    let visible = rich.visible();
    let mut cuts = Vec::new();
    let mut start = 0;
    while start < visible.len() {
        let rest = &visible[start..];
        let fit = text::fit_prefix(rest, max, text::utf16);
        if fit == rest.len() {
            break;
        }
        let end = match fit {
            0 => text::first_char(rest),
            n => best_cut(rest, n).unwrap_or(n),
        };
        start += end;
        cuts.push(start);
    }
    let mut parts = Vec::with_capacity(cuts.len() + 1);
    let mut from = 0;
    for cut in cuts.into_iter().chain(std::iter::once(visible.len())) {
        parts.push(slice(rich, from, cut));
        from = cut;
    }
    parts.retain(|p| !p.runs.is_empty());
    parts
}

/// The runs of `rich` between byte offsets `from` and `to` of its visible text.
fn slice(rich: &Rich, from: usize, to: usize) -> Rich {
    let mut out = Rich::default();
    let mut at = 0;
    for run in &rich.runs {
        let (a, b) = (at, at + run.text.len());
        at = b;
        let (s, e) = (from.max(a), to.min(b));
        if s < e {
            out.runs.push(Run {
                text: run.text[s - a..e - a].to_string(),
                style: run.style.clone(),
            });
        }
    }
    out
}

/// Where to cut `s` at or before byte `end` (itself a grapheme boundary): just after the last
/// paragraph break, line break, sentence end or space in `s[..end]` that leaves some text
/// before it; `None` when there is none (a long word: cut at `end`).
fn best_cut(s: &str, end: usize) -> Option<usize> {
    let window = &s[..end];
    let worth = |cut: usize| !window[..cut].trim().is_empty() && text::is_boundary(s, cut);
    if let Some(i) = window.rfind("\n\n").map(|i| i + 2).filter(|&c| worth(c)) {
        return Some(i);
    }
    if let Some(i) = window.rfind('\n').map(|i| i + 1).filter(|&c| worth(c)) {
        return Some(i);
    }
    let sentence = window
        .match_indices(". ")
        .chain(window.match_indices("! "))
        .chain(window.match_indices("? "))
        .map(|(i, _)| i + 2)
        .filter(|&c| worth(c))
        .max();
    if sentence.is_some() {
        return sentence;
    }
    // A space just past the window still makes the window's end a word boundary.
    if s[end..].starts_with(char::is_whitespace) && worth(end) {
        return Some(end);
    }
    window
        .char_indices()
        .rev()
        .find(|(_, c)| c.is_whitespace())
        .map(|(i, c)| i + c.len_utf8())
        .filter(|&c| worth(c))
}

#[cfg(test)]
mod tests {
    use super::super::html::{from_markdown, from_xml};
    use super::*;

    fn visible(parts: &[Rich]) -> String {
        parts.iter().map(Rich::visible).collect()
    }

    fn check(r: &Rich, max: usize) -> Vec<Rich> {
        let parts = split(r, max);
        assert_eq!(visible(&parts), r.visible(), "nothing lost nor added");
        for p in &parts {
            assert!(p.len16() <= max.max(2), "{} > {max}", p.len16());
            let h = p.to_html();
            assert!(super::super::html::visible_text(&h).is_ok(), "{h}");
        }
        parts
    }

    #[test]
    fn prefers_paragraphs_then_lines_then_sentences_then_words() {
        let r = Rich::plain(&format!(
            "{}\n\n{}\n{}",
            "a".repeat(30),
            "b".repeat(10),
            "c".repeat(10)
        ));
        let p = check(&r, 45);
        assert_eq!(p[0].visible(), format!("{}\n\n", "a".repeat(30)));
        let r = Rich::plain("One two. Three four five");
        assert_eq!(check(&r, 16)[0].visible(), "One two. ");
        let r = Rich::plain("one two three four");
        let p = check(&r, 9);
        assert_eq!(
            p.iter().map(Rich::visible).collect::<Vec<_>>(),
            ["one two ", "three ", "four"]
        );
        let r = Rich::plain(&"x".repeat(25));
        assert_eq!(check(&r, 10).len(), 3);
    }

    #[test]
    fn tags_open_across_a_cut_are_closed_and_reopened() {
        let r = from_markdown(&format!("**{} {}**", "a".repeat(10), "b".repeat(10)));
        let p = check(&r, 12);
        assert_eq!(p[0].to_html(), format!("<b>{} </b>", "a".repeat(10)));
        assert_eq!(p[1].to_html(), format!("<b>{}</b>", "b".repeat(10)));
        let r = from_markdown("```py\nline one\nline two\n```");
        let p = check(&r, 10);
        assert_eq!(
            p[0].to_html(),
            "<pre><code class=\"language-py\">line one\n</code></pre>"
        );
        assert_eq!(
            p[1].to_html(),
            "<pre><code class=\"language-py\">line two</code></pre>"
        );
    }

    #[test]
    fn entities_count_once_and_are_never_cut() {
        // 10 `&` are 10 visible characters, 50 bytes of HTML.
        let r = Rich::plain(&"&".repeat(10));
        let p = check(&r, 4);
        assert_eq!(p[0].to_html(), "&amp;&amp;&amp;&amp;");
        let r = Rich::plain(&"😀".repeat(5));
        let p = check(&r, 4);
        assert_eq!(p[0].visible(), "😀😀");
    }

    #[test]
    fn arbitrary_input_splits_within_the_limit_losing_nothing() {
        const ALPHABET: &[&str] = &[
            "*",
            "**",
            "_",
            "~~",
            "`",
            "```",
            "[x](https://a.b/(c))",
            "!",
            "<",
            ">",
            "&",
            "\n",
            "\n\n",
            " ",
            ". ",
            "> ",
            "a",
            "é",
            "😀",
            "🇫🇷",
            "<b>",
            "</b>",
            "<i>",
            "<pre>",
            "</pre>",
            "word",
        ];
        for s in crate::channels::markup::random_texts(ALPHABET, 0x2545_f491_4f6c_dd1d, 1500, 60) {
            for r in [from_markdown(&s), from_xml(&s), Rich::plain(&s)] {
                for max in [1, 2, 5, 13] {
                    check(&r, max);
                }
            }
        }
    }
}
