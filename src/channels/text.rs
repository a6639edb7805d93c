//! Measuring, cutting and splitting text to a channel's limit, shared by every channel: each
//! channel counts its own unit (Slack characters, Messenger UTF-16 units, Teams UTF-16 units of
//! the JSON it receives), and every cut lands on a grapheme cluster boundary, so a flag, a skin
//! tone or a ZWJ sequence is kept whole or left out whole, never shown as broken pieces.
//!
//! Owns only plain-text mechanics: markup (mrkdwn tokens, code fences) is the caller's to
//! protect; the channel's own limits and warnings stay in the channel.

use unicode_segmentation::UnicodeSegmentation;

/// How a channel counts the length of a text: the size of one character in its unit.
pub type Unit = fn(char) -> usize;

/// Unicode scalar values (Slack's limits).
pub fn chars(_: char) -> usize {
    1
}

/// UTF-16 code units (Messenger's limits, and JavaScript's `length`).
pub fn utf16(c: char) -> usize {
    c.len_utf16()
}

/// UTF-16 code units of the character as written inside a JSON string (Teams measures the
/// activity it receives, escapes included).
pub fn json_utf16(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{08}' | '\u{0c}' => 2,
        c if u32::from(c) < 0x20 => 6,
        c => c.len_utf16(),
    }
}

/// The length of `s` in `unit`.
pub fn len(s: &str, unit: Unit) -> usize {
    s.chars().map(unit).sum()
}

/// The byte index of the longest prefix of `s` made of whole grapheme clusters that fits in
/// `max` units. When not even the first cluster fits, the longest prefix of whole characters
/// (so a limit is never exceeded for the sake of a cluster; 0 when no character fits).
pub fn fit_prefix(s: &str, max: usize, unit: Unit) -> usize {
    let mut used = 0usize;
    for (i, g) in s.grapheme_indices(true) {
        let n = len(g, unit);
        if used.saturating_add(n) > max {
            if i == 0 {
                return char_prefix(s, max, unit);
            }
            return i;
        }
        used += n;
    }
    s.len()
}

fn char_prefix(s: &str, max: usize, unit: Unit) -> usize {
    let mut used = 0usize;
    for (i, c) in s.char_indices() {
        used = used.saturating_add(unit(c));
        if used > max {
            return i;
        }
    }
    s.len()
}

/// The byte index just after the first character of `s` (its length when empty): the least a
/// split must take to move on when not even one character fits its limit.
pub fn first_char(s: &str) -> usize {
    s.chars().next().map_or(s.len(), char::len_utf8)
}

/// Whether byte index `i` of `s` is a grapheme cluster boundary.
pub fn is_boundary(s: &str, i: usize) -> bool {
    i == 0
        || i == s.len()
        || (s.is_char_boundary(i)
            && unicode_segmentation::GraphemeCursor::new(i, s.len(), true)
                .is_boundary(s, 0)
                .unwrap_or(false))
}

/// The last grapheme boundary of `s` at or before byte index `i`.
pub fn floor_boundary(s: &str, i: usize) -> usize {
    if i >= s.len() {
        return s.len();
    }
    s.grapheme_indices(true)
        .map(|(j, _)| j)
        .take_while(|&j| j <= i)
        .last()
        .unwrap_or(0)
}

/// `s` cut to at most `max` units at a grapheme boundary, trailing whitespace dropped and `…`
/// appended (within `max`); `None` when it already fits.
pub fn truncate(s: &str, max: usize, unit: Unit) -> Option<String> {
    if len(s, unit) <= max {
        return None;
    }
    let keep = fit_prefix(s, max.saturating_sub(unit('…')), unit);
    let mut out = s[..keep].trim_end().to_string();
    out.push('…');
    Some(out)
}

/// Splits `s` into pieces of at most `max` units, preferring paragraph breaks, then line
/// breaks, then sentence ends, then spaces; a single word longer than the limit is cut at a
/// grapheme boundary. Whitespace at the cuts is dropped; the pieces keep their order.
pub fn split(s: &str, max: usize, unit: Unit) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while len(rest, unit) > max {
        // At least one character per piece, even under a limit smaller than it.
        let window_end = match fit_prefix(rest, max, unit) {
            0 => first_char(rest),
            n => n,
        };
        let cut = boundary(rest, window_end)
            .filter(|&c| c > 0)
            .unwrap_or(window_end);
        let piece = rest[..cut].trim_end();
        out.push(piece.to_string());
        rest = rest[cut..].trim_start();
    }
    if !rest.is_empty() {
        out.push(rest.to_string());
    }
    out
}

/// The best place to cut `s` at or before `end` (a byte index); `None` when there is none.
fn boundary(s: &str, end: usize) -> Option<usize> {
    let window = &s[..end];
    let next_is_space = s[end..].starts_with(char::is_whitespace);
    let nonempty = |cut: usize| !window[..cut].trim().is_empty();

    // Paragraph: a line break followed by a blank line.
    let mut best = None;
    for (i, _) in window.match_indices('\n') {
        let after = &window[i + 1..];
        let blank = after.find('\n').is_some_and(|j| {
            after[..j]
                .chars()
                .all(|c| c == ' ' || c == '\t' || c == '\r')
        });
        if blank && nonempty(i) {
            best = Some(i);
        }
    }
    if best.is_some() {
        return best;
    }
    if let Some(i) = window.rfind('\n').filter(|&i| nonempty(i)) {
        return Some(i);
    }
    // Sentence: terminal punctuation (and closing quotes or brackets) followed by a space.
    let chars: Vec<(usize, char)> = window.char_indices().collect();
    for k in (0..chars.len()).rev() {
        let (i, c) = chars[k];
        if !matches!(c, '.' | '!' | '?' | '…' | '。' | '！' | '？') {
            continue;
        }
        let mut m = k + 1;
        while m < chars.len() && matches!(chars[m].1, '"' | '\'' | '”' | '’' | ')' | ']' | '»')
        {
            m += 1;
        }
        let followed_by_space = match chars.get(m) {
            Some((_, c)) => c.is_whitespace(),
            None => next_is_space,
        };
        let cut = chars.get(m).map(|(j, _)| *j).unwrap_or(end);
        let cjk = matches!(c, '。' | '！' | '？');
        if (followed_by_space || cjk) && nonempty(cut) && i > 0 && is_boundary(s, cut) {
            return Some(cut);
        }
    }
    // Word: the last whitespace (or the window's end when a space follows it).
    if next_is_space {
        return Some(end);
    }
    window
        .char_indices()
        .rev()
        .find(|(i, c)| c.is_whitespace() && nonempty(*i) && is_boundary(s, *i))
        .map(|(i, _)| i)
}

/// A markdown task list item's box (`- [ ] a`, `- [x] b`) as a symbol that reads as one on
/// channels without task lists: `[ ]` -> `☐`, `[x]` -> `☑`.
pub fn task_box(body: &str) -> (&'static str, &str) {
    if let Some(rest) = body.strip_prefix("[ ] ") {
        ("☐ ", rest)
    } else if let Some(rest) = body
        .strip_prefix("[x] ")
        .or_else(|| body.strip_prefix("[X] "))
    {
        ("☑ ", rest)
    } else {
        ("", body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAG: &str = "🇫🇷";
    const THUMB: &str = "👍🏽";
    const FAMILY: &str = "👨\u{200d}👩\u{200d}👧\u{200d}👦";

    #[test]
    fn truncation_keeps_clusters_whole() {
        // A flag is two regional indicators: cutting between them shows two letters.
        let s = format!("Vive la {FLAG}{FLAG} République");
        let t = truncate(&s, 11, chars).unwrap();
        assert_eq!(t, format!("Vive la {FLAG}…"));
        let t = truncate(&format!("ok {THUMB}{THUMB}"), 5, utf16).unwrap();
        assert_eq!(t, "ok…");
        let t = truncate(&format!("a {FAMILY} family"), 12, utf16).unwrap();
        assert_eq!(
            t, "a…",
            "the ZWJ sequence (11 units) does not fit in the 9 left"
        );
        assert_eq!(truncate("short", 5, chars), None);
    }

    #[test]
    fn a_cluster_bigger_than_the_limit_is_cut_by_characters() {
        assert_eq!(&FAMILY[..fit_prefix(FAMILY, 3, utf16)], "👨\u{200d}");
        assert_eq!(fit_prefix(FAMILY, 1, utf16), 0);
        let parts = split(FAMILY, 4, utf16);
        assert!(parts.iter().all(|p| len(p, utf16) <= 4), "{parts:?}");
        assert_eq!(parts.concat(), FAMILY);
        // A limit below one character still moves on, one character at a time.
        assert_eq!(split("😀😀", 1, utf16), ["😀", "😀"]);
    }

    #[test]
    fn split_cuts_long_words_between_clusters() {
        let s = format!("{FLAG}{FLAG}{FLAG}");
        assert_eq!(split(&s, 5, utf16), [FLAG, FLAG, FLAG]);
        assert_eq!(
            split("one two three four", 9, chars),
            ["one two", "three", "four"]
        );
    }

    #[test]
    fn json_units_count_escapes() {
        assert_eq!(len("a\"b\n", json_utf16), 6);
        assert_eq!(len("\u{1}", json_utf16), 6);
        assert_eq!(len("😀", json_utf16), 2);
    }

    #[test]
    fn boundaries() {
        let s = format!("a{FLAG}b");
        assert!(is_boundary(&s, 1));
        assert!(!is_boundary(&s, 5), "between the two indicators");
        assert_eq!(floor_boundary(&s, 5), 1);
        assert_eq!(floor_boundary(&s, 6), 1);
        assert_eq!(floor_boundary(&s, 9), 9);
    }
}
