//! Scanning the markup bots write (markdown emphasis and runs, XML attributes and entities),
//! shared by the channels that convert it (Messenger to plain text, Telegram to its HTML).
//!
//! Owns only recognising the syntax, within a budget (`Scan`) that keeps hostile input linear;
//! each channel decides what a recognised piece becomes.

/// How far a markup parser may look ahead for closers, over one whole text. Each unmatched
/// opener (`_a _a _a ...`, `[[[...`, `<<<...`) scans to the end of its line, which costs the
/// square of the line's length; past this budget (32 steps per byte, far above what any real
/// text spends) markers are taken as literal text, so a hostile text costs linear time and
/// still converts, with less formatting.
pub(crate) struct Scan(std::cell::Cell<usize>);

impl Scan {
    pub(crate) fn new(len: usize) -> Self {
        Self(std::cell::Cell::new(
            len.saturating_mul(32).saturating_add(100_000),
        ))
    }

    /// Spends one step; `false` once the budget is gone.
    pub(crate) fn step(&self) -> bool {
        self.spend(1)
    }

    /// Spends `n` steps (a run of markers skipped at once); `false` once the budget is gone.
    pub(crate) fn spend(&self, n: usize) -> bool {
        let left = self.0.get();
        self.0.set(left.saturating_sub(n));
        left >= n
    }
}

/// How many times the character at `i` repeats from there.
pub(crate) fn run_len(chars: &[char], i: usize) -> usize {
    chars[i..].iter().take_while(|&&c| c == chars[i]).count()
}

/// The start of the next run of exactly `n` `c`s at or after `from`.
pub(crate) fn find_run(
    chars: &[char],
    from: usize,
    c: char,
    n: usize,
    scan: &Scan,
) -> Option<usize> {
    let mut j = from;
    while j < chars.len() {
        if !scan.step() {
            return None;
        }
        if chars[j] == c {
            let len = run_len(chars, j);
            // A run skipped at once costs its length: increasing runs would be quadratic.
            if !scan.spend(len) {
                return None;
            }
            if len == n {
                return Some(j);
            }
            j += len;
        } else {
            j += 1;
        }
    }
    None
}

/// The closing run for an emphasis opener of `n` markers at `i`, following the flanking rules
/// that keep `snake_case`, `2 * 3` and lone markers literal.
pub(crate) fn emphasis(chars: &[char], i: usize, n: usize, scan: &Scan) -> Option<usize> {
    let c = chars[i];
    let valid_len = match c {
        '*' | '_' => (1..=3).contains(&n),
        _ => n == 2,
    };
    if !valid_len {
        return None;
    }
    let after = chars.get(i + n)?;
    if after.is_whitespace() {
        return None;
    }
    if c == '_' && i > 0 && chars[i - 1].is_alphanumeric() {
        return None;
    }
    let mut j = i + n;
    // Same-length runs that only open nest (`**a **b** c**`): the closer after one is its own.
    let mut depth = 0usize;
    while let Some(close) = find_run(chars, j, c, n, scan) {
        let prev = chars[close - 1];
        let next = chars.get(close + n);
        let can_close = !prev.is_whitespace()
            && close > i + n
            && (c != '_' || !next.is_some_and(|a| a.is_alphanumeric()));
        let can_open =
            next.is_some_and(|a| !a.is_whitespace()) && (c != '_' || !prev.is_alphanumeric());
        if can_close && depth == 0 {
            return Some(close);
        }
        if can_close {
            depth -= 1;
        } else if can_open {
            depth += 1;
        }
        j = close + n;
    }
    None
}

/// The value of attribute `name` in a tag's text (`a href="u"`), quoted or not.
pub(crate) fn attribute(tag: &str, name: &str) -> Option<String> {
    let lower = tag.to_ascii_lowercase();
    let at = lower.find(&format!("{name}="))? + name.len() + 1;
    let v = &tag[at..];
    let quote = v.chars().next()?;
    if quote == '"' || quote == '\'' {
        let end = v[1..].find(quote)?;
        Some(v[1..1 + end].to_string())
    } else {
        Some(
            v.split_whitespace()
                .next()?
                .trim_end_matches('/')
                .to_string(),
        )
    }
}

/// `&amp;`, `&lt;`, `&gt;`, `&quot;`, `&apos;`, `&nbsp;` (as `nbsp`; left as written when
/// `None`) and numeric entities (but NUL, which no channel shows) decoded; anything else that starts with `&` is text. Linear: an entity's `;` is looked for
/// only as far as the longest name.
pub(crate) fn decode_entities(s: &str, nbsp: Option<char>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp..];
        // Entity names are short: looking further for the `;` would make `&&&...` quadratic.
        let semi = after.bytes().take(12).position(|b| b == b';');
        let decoded = semi.filter(|&semi| semi <= 10).and_then(|semi| {
            let name = &after[1..semi];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => nbsp,
                _ => {
                    let num = name.strip_prefix('#')?;
                    let code = match num.strip_prefix(['x', 'X']) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                        None => num.parse().ok()?,
                    };
                    char::from_u32(code).filter(|c| *c != '\0')
                }
            }?;
            Some((c, semi + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &after[len..];
            }
            None => {
                out.push('&');
                rest = &after[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// `count` texts of up to `max_pieces` pieces of `alphabet` each, drawn from a fixed seed (a
/// linear congruential generator: the same texts on every run), for the converters' tests.
#[cfg(test)]
pub(crate) fn random_texts(
    alphabet: &'static [&'static str],
    mut seed: u64,
    count: usize,
    max_pieces: u64,
) -> impl Iterator<Item = String> {
    (0..count).map(move |_| {
        let mut s = String::new();
        for _ in 0..(seed % max_pieces) {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            s.push_str(alphabet[(seed >> 33) as usize % alphabet.len()]);
        }
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entities_decode_by_name_and_number_and_leave_the_rest() {
        assert_eq!(
            decode_entities(
                "a &amp; b &lt;3 &#x1F600; &#65;&nbsp;&bogus; & &#0;",
                Some(' ')
            ),
            "a & b <3 😀 A &bogus; & &#0;"
        );
        assert_eq!(decode_entities("&nbsp;", Some('\u{a0}')), "\u{a0}");
        assert_eq!(decode_entities("&nbsp;", None), "&nbsp;");
    }

    #[test]
    fn ampersands_without_semicolons_decode_in_linear_time() {
        let s = "&".repeat(1 << 20);
        let started = std::time::Instant::now();
        assert_eq!(decode_entities(&s, None), s);
        // Quadratic (each `&` searching the rest for a `;`) took minutes here.
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn attributes_quoted_or_not() {
        assert_eq!(
            attribute(r#"a HREF="https://x/?a=1""#, "href").as_deref(),
            Some("https://x/?a=1")
        );
        assert_eq!(attribute("a href='u'", "href").as_deref(), Some("u"));
        assert_eq!(attribute("a href=u/", "href").as_deref(), Some("u"));
        assert_eq!(attribute("a", "href"), None);
    }
}
