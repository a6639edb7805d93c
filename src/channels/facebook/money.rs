//! Prices as bots write them on receipt cards ("$22.00", "22,00 EUR", "€ 1.234,50", "Rs. 2500")
//! turned into an exact amount and, when the text names one, an ISO 4217 currency.

use serde_json::{Number, Value};

/// An exact decimal: `units / 10^scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decimal {
    units: i128,
    scale: u32,
}

impl Decimal {
    pub fn zero() -> Self {
        Self { units: 0, scale: 0 }
    }

    fn rescale(self, scale: u32) -> i128 {
        self.units * 10i128.pow(scale - self.scale)
    }

    pub fn add(self, other: Self) -> Self {
        let scale = self.scale.max(other.scale);
        Self {
            units: self.rescale(scale) + other.rescale(scale),
            scale,
        }
    }

    /// As a JSON number (Messenger takes prices as numbers), trailing zeros dropped.
    pub fn to_json(self) -> Value {
        let s = self.to_string();
        match s.parse::<i64>() {
            Ok(n) => Value::Number(n.into()),
            Err(_) => s
                .parse::<f64>()
                .ok()
                .and_then(Number::from_f64)
                .map(Value::Number)
                .unwrap_or(Value::Null),
        }
    }
}

impl std::fmt::Display for Decimal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = if self.units < 0 { "-" } else { "" };
        let abs = self.units.unsigned_abs();
        let pow = 10u128.pow(self.scale);
        let (int, frac) = (abs / pow, abs % pow);
        if self.scale == 0 || frac == 0 {
            return write!(f, "{sign}{int}");
        }
        let frac = format!("{frac:0width$}", width = self.scale as usize);
        write!(f, "{sign}{int}.{}", frac.trim_end_matches('0'))
    }
}

/// A parsed price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Money {
    pub amount: Decimal,
    /// The currency the text names, if any.
    pub currency: Option<String>,
}

/// Symbols and words bots put next to amounts. Longest first, so "US$" wins over "$".
const SYMBOLS: &[(&str, &str)] = &[
    ("US$", "USD"),
    ("CA$", "CAD"),
    ("C$", "CAD"),
    ("A$", "AUD"),
    ("AU$", "AUD"),
    ("NZ$", "NZD"),
    ("HK$", "HKD"),
    ("S$", "SGD"),
    ("R$", "BRL"),
    ("MX$", "MXN"),
    ("Rs.", "INR"),
    ("Rs", "INR"),
    ("zł", "PLN"),
    ("kr", "SEK"),
    ("€", "EUR"),
    ("£", "GBP"),
    ("¥", "JPY"),
    ("₹", "INR"),
    ("₩", "KRW"),
    ("₽", "RUB"),
    ("₺", "TRY"),
    ("₪", "ILS"),
    ("₫", "VND"),
    ("₱", "PHP"),
    ("₴", "UAH"),
    ("$", "USD"),
];

/// Currencies a bare symbol may stand for; the configured default wins when it is one of them.
fn ambiguous(symbol: &str) -> &'static [&'static str] {
    match symbol {
        "$" => &[
            "USD", "CAD", "AUD", "NZD", "HKD", "SGD", "MXN", "ARS", "CLP", "COP", "TWD",
        ],
        "¥" => &["JPY", "CNY"],
        "kr" => &["SEK", "NOK", "DKK", "ISK"],
        _ => &[],
    }
}

/// Parses a price; `default_currency` settles a bare `$`, `¥` or `kr` when it is one they can
/// mean. `None` when the text holds no single amount ("10%", "free", "1-2").
pub fn parse_price(text: &str, default_currency: &str) -> Option<Money> {
    let mut s = text.trim().to_string();
    let mut currency = None;
    let mut negative = false;
    if let Some(rest) = s.strip_prefix('-').or_else(|| s.strip_prefix('−')) {
        negative = true;
        s = rest.trim_start().to_string();
    }
    // An ISO code before or after the number.
    let words: Vec<&str> = s.split_whitespace().collect();
    let is_code = |w: &str| w.len() == 3 && w.bytes().all(|b| b.is_ascii_uppercase());
    if let Some(first) = words.first().filter(|w| is_code(w) && words.len() > 1) {
        currency = Some(first.to_string());
        s = s[first.len()..].trim_start().to_string();
    } else if let Some(last) = words.last().filter(|w| is_code(w) && words.len() > 1) {
        currency = Some(last.to_string());
        s = s[..s.len() - last.len()].trim_end().to_string();
    }
    if currency.is_none() {
        for (sym, code) in SYMBOLS {
            let found = if let Some(rest) = s.strip_prefix(sym) {
                Some(rest.trim_start().to_string())
            } else {
                s.strip_suffix(sym).map(|rest| rest.trim_end().to_string())
            };
            if let Some(rest) = found {
                let options = ambiguous(sym);
                currency = Some(if options.contains(&default_currency) {
                    default_currency.to_string()
                } else {
                    code.to_string()
                });
                s = rest;
                break;
            }
        }
    }
    if let Some(rest) = s.strip_prefix('-').or_else(|| s.strip_prefix('−')) {
        negative = !negative;
        s = rest.trim_start().to_string();
    }
    let mut amount = parse_number(&s)?;
    if negative {
        amount.units = -amount.units;
    }
    Some(Money { amount, currency })
}

/// "1,234.50", "1.234,50", "1 234,50", "1'234.50", "22", "22,00" as exact decimals.
fn parse_number(s: &str) -> Option<Decimal> {
    let s: String = s
        .chars()
        .filter(|c| !matches!(c, ' ' | '\u{a0}' | '\u{202f}' | '\u{2009}' | '\''))
        .collect();
    if s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.' || c == ',')
    {
        return None;
    }
    if !s.starts_with(|c: char| c.is_ascii_digit()) && !s.starts_with(['.', ',']) {
        return None;
    }
    let last_dot = s.rfind('.');
    let last_comma = s.rfind(',');
    let decimal_sep = match (last_dot, last_comma) {
        (Some(d), Some(c)) => Some(if d > c { '.' } else { ',' }),
        (Some(_), None) => single_separator(&s, '.'),
        (None, Some(_)) => single_separator(&s, ','),
        (None, None) => None,
    };
    let (int, frac) = match decimal_sep {
        Some(sep) => {
            let at = s.rfind(sep)?;
            (&s[..at], &s[at + 1..])
        }
        None => (s.as_str(), ""),
    };
    let group = match decimal_sep {
        Some('.') => ',',
        Some(_) => '.',
        None => {
            if s.contains('.') {
                '.'
            } else {
                ','
            }
        }
    };
    // Grouping separators must sit between groups of three digits.
    let groups: Vec<&str> = int.split(group).collect();
    if groups.len() > 1
        && (groups[0].is_empty() || groups[0].len() > 3 || groups[1..].iter().any(|g| g.len() != 3))
    {
        return None;
    }
    let int_digits: String = groups.concat();
    if !int_digits.chars().all(|c| c.is_ascii_digit()) || !frac.chars().all(|c| c.is_ascii_digit())
    {
        return None;
    }
    if int_digits.is_empty() && frac.is_empty() {
        return None;
    }
    // Eighteen digits are more than any price has, and keep rescaled sums far inside i128.
    if int_digits.len() + frac.len() > 18 {
        return None;
    }
    let scale = u32::try_from(frac.len()).ok()?;
    let units: i128 = format!(
        "{}{frac}",
        if int_digits.is_empty() {
            "0"
        } else {
            &int_digits
        }
    )
    .parse()
    .ok()?;
    Some(Decimal { units, scale })
}

/// Whether a lone kind of separator is decimal: once, and not followed by exactly three digits
/// ("1,234" and "1.234" are thousands; "22,00" and "38.45" are decimals).
fn single_separator(s: &str, sep: char) -> Option<char> {
    if s.matches(sep).count() > 1 {
        return None;
    }
    let at = s.find(sep)?;
    let after = &s[at + 1..];
    if after.len() == 3 && at > 0 {
        None
    } else {
        Some(sep)
    }
}

/// A quantity ("368", "2.5"), as a JSON number.
pub fn parse_quantity(text: &str) -> Option<Value> {
    let t = text.trim();
    if t.is_empty() || !t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    parse_number(t).map(Decimal::to_json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Option<(String, Option<String>)> {
        parse_price(s, "USD").map(|m| (m.amount.to_string(), m.currency))
    }

    fn some(amount: &str, cur: &str) -> Option<(String, Option<String>)> {
        Some((amount.to_string(), Some(cur.to_string())))
    }

    #[test]
    fn prices_as_bots_write_them() {
        assert_eq!(p("$22.00"), some("22", "USD"));
        assert_eq!(p("$ 38.45"), some("38.45", "USD"));
        assert_eq!(p("22,00 EUR"), some("22", "EUR"));
        assert_eq!(p("€ 1.234,50"), some("1234.5", "EUR"));
        assert_eq!(p("1,234.56 GBP"), some("1234.56", "GBP"));
        assert_eq!(p("£5"), some("5", "GBP"));
        assert_eq!(p("Rs. 2500.00"), some("2500", "INR"));
        assert_eq!(p("USD 12.50"), some("12.5", "USD"));
        assert_eq!(p("-$5.00"), some("-5", "USD"));
        assert_eq!(p("1 234,50 €"), some("1234.5", "EUR"));
        assert_eq!(p("CHF 1'234.50"), some("1234.5", "CHF"));
        assert_eq!(p("12.5"), Some(("12.5".into(), None)));
        assert_eq!(p("1,234"), Some(("1234".into(), None)));
        assert_eq!(p("10%"), None);
        assert_eq!(p("free"), None);
        assert_eq!(p("1,23,4"), None);
        assert_eq!(p(""), None);
        assert_eq!(p(&"9".repeat(40)), None);
        assert_eq!(p("$"), None);
    }

    #[test]
    fn a_bare_symbol_takes_the_default_currency_it_can_mean() {
        let cad = parse_price("$10", "CAD").unwrap();
        assert_eq!(cad.currency.as_deref(), Some("CAD"));
        let eur = parse_price("$10", "EUR").unwrap();
        assert_eq!(eur.currency.as_deref(), Some("USD"));
        assert_eq!(
            parse_price("¥1000", "CNY").unwrap().currency.as_deref(),
            Some("CNY")
        );
    }

    #[test]
    fn exact_sums_and_json_numbers() {
        let a = parse_price("$0.10", "USD").unwrap().amount;
        let b = parse_price("$0.20", "USD").unwrap().amount;
        assert_eq!(a.add(b).to_string(), "0.3");
        assert_eq!(a.add(b).to_json(), serde_json::json!(0.3));
        assert_eq!(Decimal::zero().add(a).to_json(), serde_json::json!(0.1));
        assert_eq!(
            parse_price("$90.95", "USD").unwrap().amount.to_json(),
            serde_json::json!(90.95)
        );
        assert_eq!(
            parse_price("$45.00", "USD").unwrap().amount.to_json(),
            serde_json::json!(45)
        );
        assert_eq!(parse_quantity("368"), Some(serde_json::json!(368)));
        assert_eq!(parse_quantity("2.5"), Some(serde_json::json!(2.5)));
        assert_eq!(parse_quantity("two"), None);
    }

    #[test]
    fn arbitrary_input_never_panics() {
        const ALPHABET: &[&str] = &[
            "$", "€", "US$", "Rs.", "kr", "1", "22", ".", ",", " ", "-", "EUR", "'", "é", "😀", "%",
        ];
        let mut seed: u64 = 42;
        for _ in 0..5000 {
            let mut s = String::new();
            for _ in 0..(seed % 9) {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                s.push_str(ALPHABET[(seed >> 33) as usize % ALPHABET.len()]);
            }
            if let Some(m) = parse_price(&s, "USD") {
                let _ = m.amount.to_json();
            }
            let _ = parse_quantity(&s);
        }
    }
}
