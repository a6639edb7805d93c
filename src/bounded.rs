//! Bounds for values that come from outside (requests, channel answers, the config) at the
//! points where they meet something that would otherwise panic or grow: deadlines computed
//! from a duration, and text echoed into an error, a stored record or a log line.
//!
//! Owns no policy of its own beyond the caps below; each caller decides which value it bounds.
//! Knows nothing of gRPC, channels or the outbox.

use std::borrow::Cow;
use std::time::{Duration, Instant};

/// The longest text an error, a stored channel error or a status echoes from outside; longer
/// text is cut (at a character boundary) and says how much was left out.
pub const MAX_ECHO_CHARS: usize = 512;

/// A hundred years: the "never" a deadline saturates to.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `at + d`, or the far future when that does not fit (`Instant + Duration` panics on overflow).
pub fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(NEVER))
        .unwrap_or(at)
}

/// [`later`] for tokio's clock.
pub fn later_tokio(at: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(NEVER))
        .unwrap_or(at)
}

/// `s` cut to at most `max` characters, saying how many more there were.
pub fn cap(s: &str, max: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max) {
        None => Cow::Borrowed(s),
        Some((at, _)) => {
            let rest = s[at..].chars().count();
            Cow::Owned(format!("{}… ({rest} more characters)", &s[..at]))
        }
    }
}

/// [`cap`] in place, for owned text about to be kept or echoed.
pub fn cap_owned(s: &mut String, max: usize) {
    if let Cow::Owned(capped) = cap(s, max) {
        *s = capped;
    }
}

/// Text for a human log line: capped, with control characters (ANSI escapes, line breaks that
/// could forge another line) shown escaped rather than acted on.
pub fn for_log(s: &str) -> Cow<'_, str> {
    let capped = cap(s, MAX_ECHO_CHARS);
    if !capped.chars().any(char::is_control) {
        return capped;
    }
    let mut out = String::with_capacity(capped.len() + 8);
    for c in capped.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_saturate_instead_of_panicking() {
        let now = Instant::now();
        assert!(later(now, Duration::MAX) > now);
        assert_eq!(
            later(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
        let t = tokio::time::Instant::now();
        assert!(later_tokio(t, Duration::from_secs(i64::MAX as u64)) > t);
    }

    #[test]
    fn caps_count_characters_and_say_what_was_cut() {
        assert_eq!(cap("héllo", 5), "héllo");
        assert_eq!(cap("héllo wörld", 5), "héllo… (6 more characters)");
        let mut s = "x".repeat(10_000);
        cap_owned(&mut s, 10);
        assert!(s.starts_with("xxxxxxxxxx…"), "{s}");
        assert!(s.len() < 40);
    }

    #[test]
    fn log_text_has_no_escapes_or_forged_lines() {
        let hostile = "ok\n2026-01-01 INFO forged line \u{1b}[31mred\u{1b}[0m";
        let shown = for_log(hostile);
        assert!(
            !shown.contains('\n') && !shown.contains('\u{1b}'),
            "{shown}"
        );
        assert!(
            shown.contains("\\n2026") && shown.contains("\\u{1b}[31m"),
            "{shown}"
        );
        assert_eq!(for_log("plain"), "plain");
    }
}
