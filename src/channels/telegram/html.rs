//! Text for Telegram: markdown, the v3 XML subset and plain text read into styled runs
//! ([`Rich`]), and runs written as Telegram's HTML subset (`parse_mode: "HTML"`).
//!
//! Owns the conversion and the escaping. Cutting to a length lives in `split`, which works on
//! the runs (the text a user sees), so a cut can never fall inside a tag or an entity: tags
//! are written only after the cut, each part closing what it opened.
//!
//! Telegram's nesting rules (Bot API, "Formatting options"): bold, italic, underline and
//! strikethrough may contain and be part of anything but `pre` and `code`; blockquotes do not
//! nest; other entities do not contain each other. [`Rich::push`] enforces them: code and pre
//! drop the inline styles (and a link drops the code inside it), a `pre` is never quoted.

use crate::channels::markup::{self, Scan, attribute, emphasis, find_run, run_len};
use std::fmt::Write as _;

use crate::channels::text;

/// The styles of one run of text; Telegram's entity set, minus what the model cannot express.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Style {
    pub bold: bool,
    pub italic: bool,
    pub underline: bool,
    pub strike: bool,
    pub code: bool,
    /// A code block, with its language (`""` for none).
    pub pre: Option<String>,
    /// An inline link's URL (http, https or tg only: see [`linkable`]).
    pub link: Option<String>,
    pub quote: bool,
}

/// Text of one style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub text: String,
    pub style: Style,
}

/// Styled text: what Telegram shows, and how.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rich {
    pub runs: Vec<Run>,
}

/// One tag, in the order tags are opened when several start together.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tag {
    Quote,
    Link(String),
    Pre(String),
    Code,
    B,
    I,
    U,
    S,
}

impl Style {
    fn tags(&self) -> Vec<Tag> {
        let mut t = Vec::new();
        if self.quote {
            t.push(Tag::Quote);
        }
        if let Some(u) = &self.link {
            t.push(Tag::Link(u.clone()));
        }
        if let Some(l) = &self.pre {
            t.push(Tag::Pre(l.clone()));
        }
        if self.code {
            t.push(Tag::Code);
        }
        for (on, tag) in [
            (self.bold, Tag::B),
            (self.italic, Tag::I),
            (self.underline, Tag::U),
            (self.strike, Tag::S),
        ] {
            if on {
                t.push(tag);
            }
        }
        t
    }

    /// The style as Telegram can nest it.
    fn normalized(mut self) -> Self {
        if self.pre.is_some() {
            self.code = false;
            self.link = None;
            self.quote = false;
        }
        if self.link.is_some() {
            self.code = false;
        }
        if self.code || self.pre.is_some() {
            self.bold = false;
            self.italic = false;
            self.underline = false;
            self.strike = false;
        }
        self
    }
}

impl Rich {
    /// Appends `text` in `style`, joined to the last run when the style is the same.
    pub fn push(&mut self, text: &str, style: &Style) {
        if text.is_empty() {
            return;
        }
        let style = style.clone().normalized();
        match self.runs.last_mut() {
            Some(last) if last.style == style => last.text.push_str(text),
            _ => self.runs.push(Run {
                text: text.to_string(),
                style,
            }),
        }
    }

    pub fn plain(text: &str) -> Self {
        let mut r = Self::default();
        r.push(text, &Style::default());
        r
    }

    pub fn append(&mut self, other: Rich) {
        for run in other.runs {
            self.push(&run.text, &run.style);
        }
    }

    /// What the user sees, without markup.
    pub fn visible(&self) -> String {
        self.runs.iter().map(|r| r.text.as_str()).collect()
    }

    /// Length as Telegram counts it after parsing the entities: UTF-16 code units.
    pub fn len16(&self) -> usize {
        self.runs
            .iter()
            .map(|r| text::len(&r.text, text::utf16))
            .sum()
    }

    pub fn is_blank(&self) -> bool {
        self.runs.iter().all(|r| r.text.trim().is_empty())
    }

    /// Leading and trailing whitespace removed (only line breaks at the ends of a code block,
    /// whose indentation counts).
    pub fn trimmed(mut self) -> Self {
        for run in &mut self.runs {
            let t = if run.style.pre.is_none() {
                run.text.trim_start()
            } else {
                run.text.trim_start_matches(['\n', '\r'])
            };
            let cut = run.text.len() - t.len();
            run.text.drain(..cut);
            if !run.text.is_empty() {
                break;
            }
        }
        for run in self.runs.iter_mut().rev() {
            let t = if run.style.pre.is_none() {
                run.text.trim_end()
            } else {
                run.text.trim_end_matches(['\n', '\r'])
            };
            run.text.truncate(t.len());
            if !run.text.is_empty() {
                break;
            }
        }
        self.runs.retain(|r| !r.text.is_empty());
        self
    }

    /// Telegram HTML: every tag opened is closed, `<`, `>`, `&` escaped.
    pub fn to_html(&self) -> String {
        let mut out = String::new();
        let mut open: Vec<Tag> = Vec::new();
        for run in &self.runs {
            let want = run.style.tags();
            // Keep the longest prefix of what is open that this run still wants.
            let keep = open.iter().take_while(|t| want.contains(t)).count();
            while open.len() > keep {
                if let Some(t) = open.pop() {
                    close(&mut out, &t);
                }
            }
            for t in want {
                if !open.contains(&t) {
                    start(&mut out, &t);
                    open.push(t);
                }
            }
            escape_into(&mut out, &run.text);
        }
        while let Some(t) = open.pop() {
            close(&mut out, &t);
        }
        out
    }
}

fn start(out: &mut String, t: &Tag) {
    match t {
        Tag::Quote => out.push_str("<blockquote>"),
        Tag::Link(u) => {
            out.push_str("<a href=\"");
            escape_attr(out, u);
            out.push_str("\">");
        }
        Tag::Pre(l) if l.is_empty() => out.push_str("<pre>"),
        Tag::Pre(l) => {
            out.push_str("<pre><code class=\"language-");
            escape_attr(out, l);
            out.push_str("\">");
        }
        Tag::Code => out.push_str("<code>"),
        Tag::B => out.push_str("<b>"),
        Tag::I => out.push_str("<i>"),
        Tag::U => out.push_str("<u>"),
        Tag::S => out.push_str("<s>"),
    }
}

fn close(out: &mut String, t: &Tag) {
    out.push_str(match t {
        Tag::Quote => "</blockquote>",
        Tag::Link(_) => "</a>",
        Tag::Pre(l) if l.is_empty() => "</pre>",
        Tag::Pre(_) => "</code></pre>",
        Tag::Code => "</code>",
        Tag::B => "</b>",
        Tag::I => "</i>",
        Tag::U => "</u>",
        Tag::S => "</s>",
    });
}

/// `&`, `<`, `>` as the entities Telegram decodes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    escape_into(&mut out, s);
    out
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
}

fn escape_attr(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("&quot;"),
            c => escape_into(out, c.encode_utf8(&mut [0; 4])),
        }
    }
}

/// The longest URL kept as a link target; a longer one is shown as text.
const MAX_URL_CHARS: usize = 2048;
/// The longest code block language kept (`language-...`).
const MAX_LANG_CHARS: usize = 32;

/// Whether Telegram takes `url` as an inline link: http(s), or tg:// (user mentions). Other
/// schemes (`javascript:`, `file:`, a bare word) are shown as text rather than risk the whole
/// message being refused.
pub fn linkable(url: &str) -> bool {
    let lower = url.trim().to_ascii_lowercase();
    url.len() <= MAX_URL_CHARS
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
        && (lower.starts_with("https://")
            || lower.starts_with("http://")
            || lower.starts_with("tg://"))
}

/// Link `label` to `url` in `style`, or, when Telegram would not take the URL, the label
/// followed by the URL in parentheses.
fn push_link(out: &mut Rich, label: Rich, url: &str, style: &Style) {
    let url = url.trim();
    if url.is_empty() {
        out.append(label);
        return;
    }
    if label.is_blank() {
        let mut s = style.clone();
        if linkable(url) {
            s.link = Some(url.to_string());
        }
        out.push(url, &s);
        return;
    }
    if linkable(url) {
        for run in label.runs {
            let mut s = run.style;
            s.link = Some(url.to_string());
            out.push(&run.text, &s);
        }
    } else {
        out.append(label);
        out.push(&format!(" ({url})"), style);
    }
}

// ---------------------------------------------------------------------------------------------
// Markdown

/// CommonMark / GitHub markdown as styled runs: `**b**`/`__b__` bold, `*i*`/`_i_` italic,
/// `~~s~~` strikethrough, code spans, fenced code as `pre` with its language, `[t](u)` and
/// `<u>` links, `>` quotes as blockquotes, headings as bold lines, `-`/`*`/`+` items as `•`,
/// rules as `———`. Raw HTML is text (escaped). Emphasis does not span lines.
pub fn from_markdown(src: &str) -> Rich {
    let mut out = Rich::default();
    let scan = Scan::new(src.len());
    // The fence's marker and language while inside a code block.
    let mut fence: Option<(String, String)> = None;
    // The block style of the last line written (`None` before the first): the line break
    // between two lines is inside a quote or a code block only when both lines are, so a
    // block never starts or ends with it.
    let mut last: Option<Style> = None;
    let mut newline = |out: &mut Rich, style: &Style| {
        if let Some(prev) = last.replace(style.clone()) {
            let shared = if prev == *style {
                prev
            } else {
                Style::default()
            };
            out.push("\n", &shared);
        }
    };
    for raw in src.split('\n') {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if let Some((marker, lang)) = &fence {
            let pre = Style {
                pre: Some(lang.clone()),
                ..Default::default()
            };
            if indent <= 3
                && trimmed.trim_end().starts_with(marker.as_str())
                && trimmed.trim_end().chars().all(|c| marker.starts_with(c))
            {
                fence = None;
                continue;
            }
            newline(&mut out, &pre);
            out.push(line, &pre);
            continue;
        }
        if indent <= 3 && (trimmed.starts_with("```") || trimmed.starts_with("~~~")) {
            let c = trimmed.chars().next().unwrap_or('`');
            let n = trimmed.chars().take_while(|&x| x == c).count();
            let info = trimmed[n..].trim();
            let lang: String = info
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '#' | '_' | '.'))
                .take(MAX_LANG_CHARS)
                .collect();
            fence = Some((c.to_string().repeat(n), lang));
            continue;
        }
        let mut style = Style::default();
        let mut body = trimmed;
        while let Some(rest) = body.strip_prefix('>') {
            body = rest.strip_prefix(' ').unwrap_or(rest);
            style.quote = true;
        }
        let body = if style.quote { body } else { line };
        newline(
            &mut out,
            &Style {
                quote: style.quote,
                ..Default::default()
            },
        );
        markdown_line(body, &style, &mut out, &scan);
    }
    out
}

fn markdown_line(line: &str, style: &Style, out: &mut Rich, scan: &Scan) {
    let trimmed = line.trim_start();
    let indent = &line[..line.len() - trimmed.len()];
    let body = trimmed.trim_end();
    let hashes = body.chars().take_while(|&c| c == '#').count();
    if (1..=6).contains(&hashes) && body[hashes..].starts_with([' ', '\t']) {
        let text = body[hashes..].trim().trim_end_matches('#').trim_end();
        let bold = Style {
            bold: true,
            ..style.clone()
        };
        inline(&chars(text), &bold, out, scan);
        return;
    }
    let marks: Vec<char> = body.chars().filter(|c| !c.is_whitespace()).collect();
    if marks.len() >= 3
        && marks.iter().all(|&c| c == marks[0])
        && matches!(marks[0], '-' | '*' | '_')
    {
        out.push("———", style);
        return;
    }
    for bullet in ["- ", "* ", "+ "] {
        if let Some(rest) = body.strip_prefix(bullet) {
            let (check, rest) = text::task_box(rest.trim_start());
            out.push(&format!("{indent}• {check}"), style);
            inline(&chars(rest), style, out, scan);
            return;
        }
    }
    out.push(indent, style);
    inline(&chars(body), style, out, scan);
}

fn chars(s: &str) -> Vec<char> {
    s.chars().collect()
}

const ESCAPABLE: &str = "\\`*_{}[]()#+-.!~>|<\"'";

/// Inline markdown of one line, in `style`.
fn inline(chars: &[char], style: &Style, out: &mut Rich, scan: &Scan) {
    inline_at(chars, style, out, scan, 0)
}

/// Styles nested deeper than this (`[[[[...` or `**a **b **c ...`) are taken as literal text:
/// each level is a recursive call, and a text of thousands would exhaust the stack.
const MAX_NESTING: usize = 16;

fn inline_at(chars: &[char], style: &Style, out: &mut Rich, scan: &Scan, depth: usize) {
    if depth > MAX_NESTING {
        out.push(&chars.iter().collect::<String>(), style);
        return;
    }
    let mut lit = String::new();
    let mut i = 0;
    macro_rules! flush {
        () => {
            out.push(&std::mem::take(&mut lit), style)
        };
    }
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' if chars.get(i + 1).is_some_and(|n| ESCAPABLE.contains(*n)) => {
                lit.push(chars[i + 1]);
                i += 2;
            }
            '`' => {
                let n = run_len(chars, i);
                match find_run(chars, i + n, '`', n, scan) {
                    Some(close) => {
                        flush!();
                        let mut code: String = chars[i + n..close].iter().collect();
                        if code.len() > 2 && code.starts_with(' ') && code.ends_with(' ') {
                            code = code[1..code.len() - 1].to_string();
                        }
                        out.push(
                            &code,
                            &Style {
                                code: true,
                                ..style.clone()
                            },
                        );
                        i = close + n;
                    }
                    None => {
                        lit.extend(&chars[i..i + n]);
                        i += n;
                    }
                }
            }
            '!' if chars.get(i + 1) == Some(&'[') => match link(chars, i + 1, scan) {
                Some((text, url, next)) => {
                    flush!();
                    let mut label = Rich::default();
                    inline_at(&text, style, &mut label, scan, depth + 1);
                    push_link(out, label, &url, style);
                    i = next;
                }
                None => {
                    lit.push(c);
                    i += 1;
                }
            },
            '[' => match link(chars, i, scan) {
                Some((text, url, next)) => {
                    flush!();
                    let mut label = Rich::default();
                    inline_at(&text, style, &mut label, scan, depth + 1);
                    push_link(out, label, &url, style);
                    i = next;
                }
                None => {
                    lit.push(c);
                    i += 1;
                }
            },
            '<' => match autolink(chars, i) {
                Some((url, next)) => {
                    flush!();
                    push_link(out, Rich::default(), &url, style);
                    i = next;
                }
                None => {
                    lit.push(c);
                    i += 1;
                }
            },
            '*' | '_' | '~' => {
                let n = run_len(chars, i);
                match emphasis(chars, i, n, scan) {
                    Some(close) => {
                        flush!();
                        let mut s = style.clone();
                        match (c, n) {
                            ('~', _) => s.strike = true,
                            (_, 1) => s.italic = true,
                            (_, 2) => s.bold = true,
                            _ => {
                                s.bold = true;
                                s.italic = true;
                            }
                        }
                        inline_at(&chars[i + n..close], &s, out, scan, depth + 1);
                        i = close + n;
                    }
                    None => {
                        lit.extend(&chars[i..i + n]);
                        i += n;
                    }
                }
            }
            _ => {
                lit.push(c);
                i += 1;
            }
        }
    }
    flush!();
}

/// `[text](url "title")` starting at `i` (the `[`): the label's characters, the URL and the
/// index after it. The URL may hold balanced parentheses (`https://en.wikipedia.org/wiki/A_(b)`)
/// or be written `<...>`.
fn link(chars: &[char], i: usize, scan: &Scan) -> Option<(Vec<char>, String, usize)> {
    let mut depth = 0usize;
    let mut j = i;
    let close = loop {
        if !scan.step() {
            return None;
        }
        match chars.get(j)? {
            '\\' => j += 1,
            '[' => depth += 1,
            ']' => {
                depth = depth.saturating_sub(1);
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
    let mut k = close + 2;
    while chars.get(k).is_some_and(|c| *c == ' ') {
        k += 1;
    }
    let mut url = String::new();
    if chars.get(k) == Some(&'<') {
        k += 1;
        while let Some(&c) = chars.get(k) {
            if !scan.step() {
                return None;
            }
            k += 1;
            if c == '>' {
                break;
            }
            url.push(c);
        }
    } else {
        let mut parens = 0usize;
        while let Some(&c) = chars.get(k) {
            if !scan.step() {
                return None;
            }
            match c {
                '\\' if chars.get(k + 1).is_some_and(|n| ESCAPABLE.contains(*n)) => {
                    url.push(chars[k + 1]);
                    k += 2;
                    continue;
                }
                '(' => parens += 1,
                ')' if parens == 0 => break,
                ')' => parens -= 1,
                c if c.is_whitespace() => break,
                _ => {}
            }
            url.push(c);
            k += 1;
        }
    }
    // An optional title, then the closing parenthesis.
    let end = (k..chars.len()).find(|&m| !scan.step() || chars[m] == ')')?;
    if chars[end] != ')' {
        return None;
    }
    Some((chars[i + 1..close].to_vec(), url, end + 1))
}

/// `<https://...>` or `<a@b.c>` at `i`: the address and the index after it.
fn autolink(chars: &[char], i: usize) -> Option<(String, usize)> {
    let end = (i + 1..chars.len()).find(|&k| chars[k] == '>' || chars[k] == '<')?;
    if chars[end] != '>' {
        return None;
    }
    let inner: String = chars[i + 1..end].iter().collect();
    let no_space = !inner.contains(char::is_whitespace);
    let is_url = inner.contains("://") && no_space;
    let is_mail = inner.contains('@') && no_space;
    (is_url || is_mail).then_some((inner, end + 1))
}

/// Entities decoded as Telegram reads them: `&nbsp;` stays a no-break space.
pub fn decode_entities(s: &str) -> String {
    markup::decode_entities(s, Some('\u{a0}'))
}

// ---------------------------------------------------------------------------------------------
// XML

/// Skype-style XML (the Bot Framework `xml` text format) as styled runs: `<b>`/`<strong>`,
/// `<i>`/`<em>`, `<u>`/`<ins>`, `<s>`/`<strike>`/`<del>`, `<a href>`, `<code>`, `<pre>`,
/// `<blockquote>`/`<quote>`, `<br>`, `<p>`/`<div>` ends as line breaks; any other tag is
/// dropped and its text kept. Entities are decoded (then escaped again on output); a `<` that
/// starts no tag is text.
pub fn from_xml(src: &str) -> Rich {
    let mut out = Rich::default();
    let mut style = Style::default();
    // Nesting counts, so `<b><b>x</b>y</b>` keeps `y` bold.
    let mut depth = [0u32; 7];
    let mut links: Vec<Option<String>> = Vec::new();
    let mut rest = src;
    while let Some(lt) = rest.find('<') {
        out.push(&decode_entities(&rest[..lt]), &style);
        let after = &rest[lt..];
        // A tag ends at the first `>`; a `<` before it means this one starts no tag. Looking
        // no further than the next `<` keeps a text of many `<` linear.
        let Some(gt) = after[1..].find(['<', '>']).map(|i| i + 1) else {
            out.push(&decode_entities(after), &style);
            rest = "";
            break;
        };
        let tag = &after[1..gt];
        let closing = tag.starts_with('/');
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        if name.is_empty() || after.as_bytes()[gt] == b'<' {
            out.push("<", &style);
            rest = &after[1..];
            continue;
        }
        let self_closing = tag.ends_with('/');
        let slot = match name.as_str() {
            "b" | "strong" => Some(0),
            "i" | "em" => Some(1),
            "u" | "ins" => Some(2),
            "s" | "strike" | "del" => Some(3),
            "code" => Some(4),
            "pre" => Some(5),
            "blockquote" | "quote" => Some(6),
            _ => None,
        };
        match (name.as_str(), slot) {
            ("br", _) => out.push("\n", &style),
            ("p" | "div", _) if closing => out.push("\n", &style),
            ("a", _) if !closing && !self_closing => {
                let href = attribute(tag, "href")
                    .map(|h| decode_entities(&h))
                    .filter(|h| linkable(h));
                links.push(href);
                style.link = links.iter().rev().flatten().next().cloned();
            }
            ("a", _) if closing => {
                links.pop();
                style.link = links.iter().rev().flatten().next().cloned();
            }
            (_, Some(k)) if !self_closing => {
                if closing {
                    depth[k] = depth[k].saturating_sub(1);
                } else {
                    depth[k] = depth[k].saturating_add(1);
                }
                let on = depth[k] > 0;
                match k {
                    0 => style.bold = on,
                    1 => style.italic = on,
                    2 => style.underline = on,
                    3 => style.strike = on,
                    4 => style.code = on,
                    5 => style.pre = on.then(String::new),
                    _ => style.quote = on,
                }
            }
            _ => {}
        }
        rest = &after[gt + 1..];
    }
    out.push(&decode_entities(rest), &style);
    out
}

/// A receipt-style table as a code block: `rows` of (left, right), the right column aligned.
pub fn table(rows: &[(String, String)]) -> String {
    let width = rows
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0)
        .min(28);
    let mut out = String::new();
    for (l, r) in rows {
        let pad = width.saturating_sub(l.chars().count());
        if r.is_empty() {
            let _ = writeln!(out, "{l}");
        } else {
            let _ = writeln!(out, "{l}{}  {r}", " ".repeat(pad));
        }
    }
    out.trim_end_matches('\n').to_string()
}

/// The text a user sees of Telegram HTML (tags dropped, entities decoded), or why the HTML
/// is not what the renderer promises: a tag left open or closing nothing, a stray `>`.
/// The renderers' tests, goldens and fuzz targets check every text and caption with it.
pub fn visible_text(html: &str) -> Result<String, String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn md(s: &str) -> String {
        from_markdown(s).to_html()
    }

    #[test]
    fn markdown_styles_nest_and_escape() {
        assert_eq!(md("**bold *both* bold**"), "<b>bold <i>both</i> bold</b>");
        assert_eq!(md("*it **both** it*"), "<i>it <b>both</b> it</i>");
        assert_eq!(md("***x*** ~~gone~~"), "<b><i>x</i></b> <s>gone</s>");
        assert_eq!(md("a < b && c > d"), "a &lt; b &amp;&amp; c &gt; d");
        assert_eq!(md("<b>raw</b>"), "&lt;b&gt;raw&lt;/b&gt;");
        assert_eq!(md("snake_case_name 2 * 3"), "snake_case_name 2 * 3");
        assert_eq!(md("`a <b> & *c*`"), "<code>a &lt;b&gt; &amp; *c*</code>");
        assert_eq!(md("**a `code` b**"), "<b>a </b><code>code</code><b> b</b>");
        assert_eq!(md("\\*lit\\*"), "*lit*");
        assert_eq!(md("# Title"), "<b>Title</b>");
        assert_eq!(md("- [ ] todo\n* one"), "• ☐ todo\n• one");
    }

    #[test]
    fn links_keep_parentheses_and_refuse_odd_schemes() {
        assert_eq!(
            md("[wiki](https://en.wikipedia.org/wiki/Rust_(language)) end"),
            "<a href=\"https://en.wikipedia.org/wiki/Rust_(language)\">wiki</a> end"
        );
        assert_eq!(
            md("[**b** x](https://x.io/?a=1&b=\"2\")"),
            "<a href=\"https://x.io/?a=1&amp;b=&quot;2&quot;\"><b>b</b> x</a>"
        );
        assert_eq!(
            md("<https://x.io>"),
            "<a href=\"https://x.io\">https://x.io</a>"
        );
        assert_eq!(md("[x](javascript:alert(1))"), "x (javascript:alert(1))");
        assert_eq!(md("[`c`](https://x.io)"), "<a href=\"https://x.io\">c</a>");
        assert_eq!(md("[t](<https://x.io/a b>)"), "t (https://x.io/a b)");
    }

    #[test]
    fn code_blocks_and_quotes() {
        assert_eq!(
            md("```rust\nlet a = b < c && *d*;\n```\nafter"),
            "<pre><code class=\"language-rust\">let a = b &lt; c &amp;&amp; *d*;</code></pre>\nafter"
        );
        assert_eq!(md("```\nx\n  y\n```"), "<pre>x\n  y</pre>");
        assert_eq!(
            md("> one *i*\n> two\nout"),
            "<blockquote>one <i>i</i>\ntwo</blockquote>\nout"
        );
        assert_eq!(
            md("```js\" onclick=\"x\ny"),
            "<pre><code class=\"language-js\">y</code></pre>"
        );
    }

    #[test]
    fn xml_tags_map_and_unknown_ones_are_dropped() {
        let r = from_xml(
            "<b>B <i>BI</i></b><br/><ss type=\"smile\">:)</ss> &amp; &lt;3 &#x1F600; a < b \
             <a href=\"https://x.io\">site</a> <a href=\"ftp://x\">ftp</a> <pre>p</pre>",
        );
        assert_eq!(
            r.to_html(),
            "<b>B <i>BI</i></b>\n:) &amp; &lt;3 😀 a &lt; b <a href=\"https://x.io\">site</a> ftp <pre>p</pre>"
        );
        assert_eq!(from_xml("<b>x").to_html(), "<b>x</b>");
        assert_eq!(from_xml("x</b>y").to_html(), "xy");
        assert_eq!(from_xml("&bogus; &#0;").visible(), "&bogus; &#0;");
    }

    #[test]
    fn unmatched_markers_cost_linear_time() {
        // Quadratic parsing would take minutes here; with the scan budget it is immediate, and
        // the text is all kept (as literal markers once the budget is gone).
        for s in ["_a ", "*a ", "[a", "``a ", "~~a ", "[a](", "**a *b* "] {
            let src = s.repeat(100_000);
            let r = from_markdown(&src);
            assert!(r.visible().len() > src.len() / 3, "{s}");
        }
        // Nesting thousands deep is literal text past a depth, not a stack overflow.
        for s in ["[", "**a ", "*a _b "] {
            let src = format!(
                "{}x{}",
                s.repeat(50_000),
                "](https://x.io) b** c*".repeat(50_000)
            );
            assert!(!from_markdown(&src).runs.is_empty());
        }
        for s in ["<", "&", "< a", "&#"] {
            let src = format!("{}>;", s.repeat(200_000));
            assert!(from_xml(&src).visible().len() >= src.len() - 1, "{s}");
        }
    }

    #[test]
    fn arbitrary_input_yields_balanced_html() {
        const ALPHABET: &[&str] = &[
            "*",
            "**",
            "_",
            "~~",
            "`",
            "```",
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
            "> ",
            "a",
            "é",
            "😀",
            "<b>",
            "</b>",
            "<a href=\"",
            "&#x",
            "http://x",
            "<pre>",
            "</i>",
        ];
        for s in crate::channels::markup::random_texts(ALPHABET, 0x9e37_79b9_7f4a_7c15, 2000, 40) {
            for r in [from_markdown(&s), from_xml(&s)] {
                let h = r.to_html();
                assert!(super::visible_text(&h).is_ok(), "{s:?} -> {h:?}");
            }
        }
    }
}
