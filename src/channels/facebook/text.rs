//! Text for Messenger, which shows plain text only: markdown and Skype-style XML turned into
//! plain text that reads well, long text split at natural boundaries, and titles cut to a limit.
//!
//! Lengths are counted in UTF-16 code units: never more than Messenger's count, whichever way it
//! counts characters, so a piece that fits here fits there. Cuts keep grapheme clusters whole
//! (the shared `channels::text`).

use crate::channels::markup::{Scan, attribute, decode_entities, emphasis, find_run, run_len};
use crate::channels::text as shared;

/// Length as the limits here count it.
pub fn len16(s: &str) -> usize {
    shared::len(s, shared::utf16)
}

/// `s` cut to `max` units at a grapheme boundary with an ellipsis, or `None` when it already fits.
pub fn truncate(s: &str, max: usize) -> Option<String> {
    shared::truncate(s, max, shared::utf16)
}

/// Splits `s` into pieces of at most `limit` units, preferring paragraph breaks, then line
/// breaks, then sentence ends, then spaces; a single word longer than the limit is cut between
/// grapheme clusters. Whitespace at the cuts is dropped; the pieces keep their order.
pub fn split(s: &str, limit: usize) -> Vec<String> {
    shared::split(s, limit, shared::utf16)
}

/// Markdown as plain text: emphasis and code markers removed, links as "text (url)", headings
/// and block quotes without their markers, bullets as "•", fenced code kept without its fences,
/// strikethrough as `~text~` (the chat convention).
///
/// Bounded for hostile text: styles and links nested more than [`MAX_NESTING`] deep are literal
/// text, and the look-ahead for closers has a budget ([`Scan`]), so any text renders in linear
/// time on a small stack.
pub fn markdown_to_plain(s: &str) -> String {
    let scan = Scan::new(s.len());
    let mut out = Vec::new();
    let mut fence: Option<String> = None;
    for line in s.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if indent <= 3 && (trimmed.starts_with("```") || trimmed.starts_with("~~~")) {
            let marker: String = trimmed.chars().take(3).collect();
            match &fence {
                Some(open) if *open == marker => fence = None,
                Some(_) => out.push(line.to_string()),
                None => fence = Some(marker),
            }
            continue;
        }
        if fence.is_some() {
            out.push(line.to_string());
            continue;
        }
        out.push(markdown_line(line, &scan));
    }
    out.join("\n")
}

fn markdown_line(mut line: &str, scan: &Scan) -> String {
    // Block quotes, nested or not, each level separated by any spaces: a loop, as `>  >  > ...`
    // thousands deep would exhaust the stack as a recursion.
    let (indent, body) = loop {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let mut body = trimmed.trim_end();
        let mut quoted = false;
        while let Some(rest) = body.strip_prefix('>') {
            body = rest.strip_prefix(' ').unwrap_or(rest);
            quoted = true;
        }
        if !quoted {
            break (indent, body);
        }
        line = body;
    };
    let hashes = body.chars().take_while(|&c| c == '#').count();
    if (1..=6).contains(&hashes) && body[hashes..].starts_with([' ', '\t']) {
        let text = body[hashes..].trim().trim_end_matches('#').trim_end();
        return inline(text, scan);
    }
    let marks: Vec<char> = body.chars().filter(|c| !c.is_whitespace()).collect();
    if marks.len() >= 3
        && marks.iter().all(|&c| c == marks[0])
        && matches!(marks[0], '-' | '*' | '_')
    {
        return "———".to_string();
    }
    for bullet in ["- ", "* ", "+ "] {
        if let Some(rest) = body.strip_prefix(bullet) {
            let (check, rest) = crate::channels::text::task_box(rest.trim_start());
            return format!("{indent}• {check}{}", inline(rest, scan));
        }
    }
    let digits = body.chars().take_while(char::is_ascii_digit).count();
    if (1..=9).contains(&digits)
        && let Some(marker) = body.get(..digits + 1)
        && (marker.ends_with('.') || marker.ends_with(')'))
        && let Some(rest) = body[digits + 1..].strip_prefix(' ')
        && let (check @ ("☐ " | "☑ "), rest) = crate::channels::text::task_box(rest.trim_start())
    {
        return format!("{indent}{marker} {check}{}", inline(rest, scan));
    }
    format!("{indent}{}", inline(body, scan))
}

/// Styles and links nested deeper than this (`[[[[...`, `**a **b **c ...`) are literal text:
/// each level is a recursive call, and thousands of them would exhaust a worker's stack (an
/// abort of the whole gateway).
pub const MAX_NESTING: usize = 16;

const ESCAPABLE: &str = "\\`*_{}[]()#+-.!~>|<\"'";

/// Inline markdown of one line as plain text.
fn inline(s: &str, scan: &Scan) -> String {
    inline_at(s, scan, 0)
}

/// Inline markdown `depth` levels inside styles or link labels.
fn inline_at(s: &str, scan: &Scan, depth: usize) -> String {
    if depth > MAX_NESTING {
        return s.to_string();
    }
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' if chars.get(i + 1).is_some_and(|n| ESCAPABLE.contains(*n)) => {
                out.push(chars[i + 1]);
                i += 2;
            }
            '`' => {
                let n = run_len(&chars, i);
                match find_run(&chars, i + n, '`', n, scan) {
                    Some(close) => {
                        let code: String = chars[i + n..close].iter().collect();
                        out.push_str(code.trim());
                        i = close + n;
                    }
                    None => {
                        out.extend(&chars[i..i + n]);
                        i += n;
                    }
                }
            }
            '!' if chars.get(i + 1) == Some(&'[') => match link(&chars, i + 1, scan, depth) {
                Some((text, url, next)) => {
                    out.push_str(&link_text(&text, &url));
                    i = next;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            },
            '[' => match link(&chars, i, scan, depth) {
                Some((text, url, next)) => {
                    out.push_str(&link_text(&text, &url));
                    i = next;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            },
            '<' => match autolink(&chars, i, scan) {
                Some((url, next)) => {
                    out.push_str(&url);
                    i = next;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            },
            '*' | '_' | '~' => {
                let n = run_len(&chars, i);
                match emphasis(&chars, i, n, scan) {
                    Some(close) => {
                        let inner: String = chars[i + n..close].iter().collect();
                        // Struck text is not emphasis: dropping its marks would assert it.
                        if c == '~' {
                            out.push('~');
                            out.push_str(&inline_at(&inner, scan, depth + 1));
                            out.push('~');
                        } else {
                            out.push_str(&inline_at(&inner, scan, depth + 1));
                        }
                        i = close + n;
                    }
                    None => {
                        out.extend(&chars[i..i + n]);
                        i += n;
                    }
                }
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// `[text](url "title")` starting at `i` (the `[`), `nesting` levels deep: the text, the url and
/// the index after it.
fn link(chars: &[char], i: usize, scan: &Scan, nesting: usize) -> Option<(String, String, usize)> {
    let mut depth = 0;
    let mut j = i;
    let close = loop {
        if !scan.step() {
            return None;
        }
        match chars.get(j)? {
            '\\' => j += 1,
            '[' => depth += 1,
            ']' => {
                depth -= 1;
                if depth == 0 {
                    break j;
                }
            }
            _ => {}
        }
        j += 1;
    };
    if chars.get(close + 1) != Some(&'(') {
        return None;
    }
    let end = (close + 2..chars.len()).find(|&k| !scan.step() || chars[k] == ')')?;
    if chars[end] != ')' {
        return None;
    }
    let target: String = chars[close + 2..end].iter().collect();
    let url = target.split_whitespace().next().unwrap_or_default();
    let url = url
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string();
    let text: String = chars[i + 1..close].iter().collect();
    Some((inline_at(&text, scan, nesting + 1), url, end + 1))
}

fn link_text(text: &str, url: &str) -> String {
    let bare = |u: &str| {
        u.trim_start_matches("mailto:")
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string()
    };
    if url.is_empty() {
        text.to_string()
    } else if text.trim().is_empty() || bare(text) == bare(url) {
        url.to_string()
    } else {
        format!("{text} ({url})")
    }
}

/// `<https://...>` or `<a@b.c>` at `i`: the address and the index after it.
fn autolink(chars: &[char], i: usize, scan: &Scan) -> Option<(String, usize)> {
    // Neither form holds whitespace: looking past it would only find a `>` ending no autolink.
    let end = (i + 1..chars.len())
        .find(|&k| !scan.step() || chars[k] == '>' || chars[k].is_whitespace())?;
    if chars[end] != '>' {
        return None;
    }
    let inner: String = chars[i + 1..end].iter().collect();
    let is_url = inner.contains("://") && !inner.contains(char::is_whitespace);
    let is_mail =
        inner.contains('@') && !inner.contains(char::is_whitespace) && !inner.contains('<');
    (is_url || is_mail).then_some((inner, end + 1))
}

/// Skype-style XML (`<b>`, `<i>`, `<a href>`, `<br/>`, `<ss>`...) as plain text: tags dropped,
/// links as "text (url)", line breaks kept, entities decoded.
pub fn xml_to_plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut link: Option<(String, usize)> = None;
    let mut rest = s;
    while let Some(lt) = rest.find('<') {
        out.push_str(&decode_entities(&rest[..lt], Some(' ')));
        let after = &rest[lt..];
        // The name first: a `<` that starts no tag ("a < b") is text whatever follows, and
        // looking for its `>` first would make a text of many `<` quadratic. (Splitting the
        // text at such a `<` decodes it the same: no entity holds a `<`.)
        let name: String = after[1..]
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        if name.is_empty() {
            out.push('<');
            rest = &after[1..];
            continue;
        }
        let Some(gt) = after.find('>') else {
            out.push_str(&decode_entities(after, Some(' ')));
            rest = "";
            break;
        };
        let tag = &after[1..gt];
        let closing = tag.starts_with('/');
        match name.as_str() {
            "br" => out.push('\n'),
            "p" | "div" if closing => out.push('\n'),
            "a" if !closing => {
                link = attribute(tag, "href").map(|h| (decode_entities(&h, Some(' ')), out.len()));
            }
            "a" => {
                if let Some((href, start)) = link.take() {
                    let text = out[start..].to_string();
                    out.truncate(start);
                    out.push_str(&link_text(&text, &href));
                }
            }
            _ => {}
        }
        rest = &after[gt + 1..];
    }
    out.push_str(&decode_entities(rest, Some(' ')));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_emphasis_links_and_blocks() {
        let md = "# Hello\n**Bold** and *it* and __b__ and _i_ and ~~gone~~ and `co*de*`.\n\
                  See [the docs](https://example.com/docs \"Docs\") or <https://x.io>.\n\
                  > quoted *text*\n* one\n- two\n---\n```\nlet a = *b*;\n```\nsnake_case_name 2 * 3 * 4 a*b\n\
                  ![logo](https://example.com/l.png) [https://example.com](https://example.com) \\*lit\\*";
        assert_eq!(
            markdown_to_plain(md),
            "Hello\nBold and it and b and i and ~gone~ and co*de*.\n\
             See the docs (https://example.com/docs) or https://x.io.\n\
             quoted text\n• one\n• two\n———\nlet a = *b*;\nsnake_case_name 2 * 3 * 4 a*b\n\
             logo (https://example.com/l.png) https://example.com *lit*"
        );
        assert_eq!(markdown_to_plain("***both*** **a *b* c**"), "both a b c");
        assert_eq!(
            markdown_to_plain("**a **b** c** and *x *y* z*"),
            "a b c and x y z"
        );
        assert_eq!(markdown_to_plain("**a** b **c**"), "a b c");
        assert_eq!(
            markdown_to_plain("- [ ] todo\n* [x] done\n1. [X] first\n2) plain"),
            "• ☐ todo\n• ☑ done\n1. ☑ first\n2) plain"
        );
        assert_eq!(markdown_to_plain("1é [ ] x"), "1é [ ] x");
        assert_eq!(
            markdown_to_plain("an *unclosed emphasis"),
            "an *unclosed emphasis"
        );
    }

    #[test]
    fn xml_tags_links_and_entities() {
        let xml = "<b>Bold</b> <i>it</i><br/>line &amp; more &lt;3 &#x1F600; \
                   <a href=\"https://example.com\">site</a> <ss type=\"smile\">:)</ss> a < b";
        assert_eq!(
            xml_to_plain(xml),
            "Bold it\nline & more <3 😀 site (https://example.com) :) a < b"
        );
    }

    #[test]
    fn split_prefers_paragraphs_then_sentences_then_words() {
        let p1 = "a".repeat(30);
        let p2 = format!("{}. {}", "b".repeat(20), "c".repeat(20));
        let s = format!("{p1}\n\n{p2}");
        assert_eq!(split(&s, 50), [p1.clone(), p2.clone()]);
        assert_eq!(
            split(&p2, 30),
            [format!("{}.", "b".repeat(20)), "c".repeat(20)]
        );
        assert_eq!(split("one two three four", 9), ["one two", "three", "four"]);
        assert_eq!(
            split(&"x".repeat(25), 10),
            ["x".repeat(10), "x".repeat(10), "x".repeat(5)]
        );
        assert_eq!(split("short", 10), ["short"]);
        assert!(split("  ", 10).is_empty());
    }

    #[test]
    fn split_counts_utf16_and_never_cuts_a_character() {
        let s = "😀".repeat(5);
        let parts = split(&s, 4);
        assert_eq!(parts, ["😀😀", "😀😀", "😀"]);
        assert!(parts.iter().all(|p| len16(p) <= 4));
    }

    #[test]
    fn truncation_adds_an_ellipsis_within_the_limit() {
        assert_eq!(truncate("short", 20), None);
        let t = truncate("A very long button title", 20).unwrap();
        assert_eq!(t, "A very long button …".replace("button …", "button…"));
        assert_eq!(len16(&t), 19);
        assert!(len16(&truncate(&"é".repeat(30), 20).unwrap()) <= 20);
    }

    #[test]
    fn nesting_past_the_limit_is_literal_text() {
        let bold = |n: usize| format!("{}x{}", "**a ".repeat(n), " b**".repeat(n));
        // The outermost style and MAX_NESTING more inside it convert; deeper ones are text.
        let at_limit = markdown_to_plain(&bold(MAX_NESTING + 1));
        assert!(!at_limit.contains('*'), "{at_limit}");
        let past = markdown_to_plain(&bold(MAX_NESTING + 2));
        assert_eq!(past.matches("**").count(), 2, "{past}");
        assert!(past.contains("**a x b**"), "{past}");
        let links = |n: usize| format!("{}x{}", "[".repeat(n), "](u)".repeat(n));
        assert!(!markdown_to_plain(&links(MAX_NESTING + 1)).contains('['));
        assert!(markdown_to_plain(&links(MAX_NESTING + 2)).contains("[x](u)"));
        // Quotes are not nesting: any depth, each level separated by any spaces, is one quote.
        assert_eq!(
            markdown_to_plain(&format!("{}*x*", ">  ".repeat(50_000))),
            " x"
        );
    }

    #[test]
    fn unmatched_markers_cost_linear_time() {
        // Each opener would look for its closer to the end of the text: minutes for these
        // (a similar parser took 134 s on 900 KB of `_a `); with the budget, well under a
        // second, the text kept.
        for s in ["_a ", "*a ", "~~a ", "[a", "[a](", "[`a ``b ", "<a", "< a"] {
            let src = s.repeat(300_000 / s.len());
            let start = std::time::Instant::now();
            let plain = markdown_to_plain(&src);
            assert!(start.elapsed() < std::time::Duration::from_secs(5), "{s}");
            // Code spans drop their backticks: a third is left at least.
            assert!(plain.len() >= src.len() / 3, "{s}");
        }
        for s in ["<", "< a", "&", "&#", "&lt"] {
            let src = format!("{}>;", s.repeat(300_000 / s.len()));
            let start = std::time::Instant::now();
            let plain = xml_to_plain(&src);
            assert!(start.elapsed() < std::time::Duration::from_secs(5), "{s}");
            assert!(plain.len() >= src.len() / 2, "{s}");
        }
    }

    #[test]
    fn arbitrary_input_never_panics_and_splits_within_the_limit() {
        const ALPHABET: &[&str] = &[
            "*",
            "**",
            "_",
            "~~",
            "`",
            "[",
            "]",
            "(",
            ")",
            "!",
            "<",
            ">",
            "&",
            ";",
            "#",
            "\\",
            "\n",
            "\n\n",
            " ",
            ".",
            "a",
            "é",
            "😀",
            "。",
            "<a href=\"",
            "&#x",
            "http://x",
        ];
        for s in crate::channels::markup::random_texts(ALPHABET, 0x9e37_79b9_7f4a_7c15, 2000, 40) {
            let _ = xml_to_plain(&s);
            let plain = markdown_to_plain(&s);
            for limit in [1, 2, 7] {
                for piece in split(&plain, limit) {
                    assert!(len16(&piece) <= limit.max(2), "{piece:?} over {limit}");
                }
            }
            let _ = truncate(&s, 5);
        }
    }
}
