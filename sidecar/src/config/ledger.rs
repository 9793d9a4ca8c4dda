//! Types of the `[ledger]` section: the cost-per-task ledger, its prices and their exact parsing.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// The cost-per-task ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerConfig {
    pub enabled: bool,
    /// Request header that carries the task id. Requests without it are a task of their own.
    pub task_header: http::HeaderName,
    /// Tasks not seen for this long are deleted with their request records.
    pub retention: Duration,
    /// Label of the amounts in prices and reports, such as `USD`. No conversion happens.
    pub currency: String,
    /// Request records kept per task. Task totals keep counting past it.
    pub max_requests_per_task: u32,
    /// Price of models without an entry in `models`; None prices them at zero.
    pub price: Option<Price>,
    /// Prices by model name, as requests send it (model id, file name or alias).
    pub models: BTreeMap<String, Price>,
}

/// A price table: per token, or per engine hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Price {
    /// Amounts of currency per million tokens.
    Tokens { input: Micros, cached_input: Micros, output: Micros },
    /// Currency per hour of engine time, spread over tokens by the prefill and decode rates. A
    /// rate that is not configured is measured by the sidecar.
    Hourly { engine_per_hour: Micros, prefill_tokens_per_second: Option<Micros>, decode_tokens_per_second: Option<Micros> },
}

/// A non-negative decimal with at most 6 decimal places, stored exactly as millionths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Micros(pub u64);

impl Micros {
    /// Parses a decimal such as `0.15` or `12`. Returns the rule broken on failure.
    pub fn parse_decimal(text: &str) -> Result<Micros, &'static str> {
        let text = text.trim();
        if text.starts_with('-') {
            return Err("is negative");
        }
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        let digits = |part: &str| part.bytes().all(|byte| byte.is_ascii_digit());
        if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
            return Err("is not a decimal number");
        }
        if fraction.len() > 6 {
            return Err("has more than 6 decimal places");
        }
        let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| "is too large")? };
        let padded = format!("{fraction:0<6}");
        let fraction: u64 = padded.parse().map_err(|_| "is not a decimal number")?;
        whole.checked_mul(1_000_000).and_then(|micros| micros.checked_add(fraction)).map(Micros).ok_or("is too large")
    }

    /// Parses a TOML integer, float or string. A float is read in its shortest decimal form, so
    /// `0.15` is exactly 150000 millionths.
    pub fn parse_value(value: &toml::Value) -> Result<Micros, &'static str> {
        match value {
            toml::Value::Integer(n) if *n < 0 => Err("is negative"),
            toml::Value::Integer(n) => (*n as u64).checked_mul(1_000_000).map(Micros).ok_or("is too large"),
            toml::Value::Float(n) if !n.is_finite() => Err("is not a finite number"),
            toml::Value::Float(n) if *n < 0.0 => Err("is negative"),
            // Display of f64 writes the shortest decimal that reads back as the same float, and
            // never an exponent.
            toml::Value::Float(n) => Micros::parse_decimal(&n.to_string()),
            toml::Value::String(text) => Micros::parse_decimal(text),
            _ => Err("is not a number"),
        }
    }

    /// Returns the value as a TOML float when the float reads back exactly, else as a string.
    pub fn to_toml(self) -> toml::Value {
        let text = self.to_string();
        match text.parse::<f64>() {
            Ok(float) if Micros::parse_value(&toml::Value::Float(float)) == Ok(self) => toml::Value::Float(float),
            _ => toml::Value::String(text),
        }
    }
}

impl fmt::Display for Micros {
    /// Writes the decimal with trailing zeros removed, such as `0.15` or `2.0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fraction = format!("{:06}", self.0 % 1_000_000);
        let fraction = fraction.trim_end_matches('0');
        write!(f, "{}.{}", self.0 / 1_000_000, if fraction.is_empty() { "0" } else { fraction })
    }
}

/// Keys of a per-token price table.
pub const TOKEN_KEYS: [&str; 3] = ["input_per_million", "cached_input_per_million", "output_per_million"];
/// Keys of a per-hour price table.
pub const HOURLY_KEYS: [&str; 3] = ["engine_per_hour", "prefill_tokens_per_second", "decode_tokens_per_second"];

const PRICE_RULE: &str = "a price table has either input_per_million, cached_input_per_million and output_per_million, \
    or engine_per_hour with optional prefill_tokens_per_second and decode_tokens_per_second";

/// One invalid key of a price table: the key (empty for the table itself), its value and the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceIssue {
    pub key: String,
    pub value: String,
    pub rule: String,
}

/// Parses a price table, reporting every invalid key.
pub fn parse_price(table: &toml::Table) -> Result<Price, Vec<PriceIssue>> {
    let mut issues = Vec::new();
    let mut amounts = BTreeMap::new();
    for (key, value) in table {
        let rule = if HOURLY_KEYS[1..].contains(&key.as_str()) {
            "must be a number of tokens per second above 0 with at most 6 decimal places, such as 850 or 42.5"
        } else if key == "engine_per_hour" {
            "must be an amount of currency per engine hour, at least 0 with at most 6 decimal places, such as 2.5"
        } else if TOKEN_KEYS.contains(&key.as_str()) {
            "must be an amount of currency per million tokens, at least 0 with at most 6 decimal places, such as 0.15"
        } else {
            issues.push(PriceIssue { key: key.clone(), value: value.to_string(), rule: format!("unknown key; {PRICE_RULE}") });
            continue;
        };
        match Micros::parse_value(value) {
            Ok(Micros(0)) if HOURLY_KEYS[1..].contains(&key.as_str()) => {
                issues.push(PriceIssue { key: key.clone(), value: value.to_string(), rule: format!("is 0, but {rule}") });
            }
            Ok(amount) => {
                amounts.insert(key.as_str(), amount);
            }
            Err(broken) => issues.push(PriceIssue { key: key.clone(), value: value.to_string(), rule: format!("{broken}, but {rule}") }),
        }
    }
    let per_token: Vec<&str> = TOKEN_KEYS.into_iter().filter(|key| table.contains_key(*key)).collect();
    let per_hour: Vec<&str> = HOURLY_KEYS.into_iter().filter(|key| table.contains_key(*key)).collect();
    if !per_token.is_empty() && !per_hour.is_empty() {
        issues.push(PriceIssue {
            key: per_hour[0].to_string(),
            value: table[per_hour[0]].to_string(),
            rule: format!("a price table is per token or per engine hour, not both; remove {} or {}", per_token.join(", "), per_hour.join(", ")),
        });
    } else if !per_token.is_empty() {
        for key in TOKEN_KEYS.into_iter().filter(|key| !table.contains_key(*key)) {
            issues.push(PriceIssue { key: key.to_string(), value: String::new(), rule: format!("missing; a per-token price needs all of {}", TOKEN_KEYS.join(", ")) });
        }
    } else if !per_hour.is_empty() && !table.contains_key("engine_per_hour") {
        issues.push(PriceIssue { key: "engine_per_hour".into(), value: String::new(), rule: "missing; prefill and decode rates need an engine_per_hour price".into() });
    } else if per_hour.is_empty() && issues.is_empty() {
        issues.push(PriceIssue { key: String::new(), value: "{}".into(), rule: format!("empty price table; {PRICE_RULE}") });
    }
    if !issues.is_empty() {
        return Err(issues);
    }

    let amount = |key: &str| amounts.get(key).copied();
    match amount("engine_per_hour") {
        Some(engine_per_hour) => Ok(Price::Hourly {
            engine_per_hour,
            prefill_tokens_per_second: amount("prefill_tokens_per_second"),
            decode_tokens_per_second: amount("decode_tokens_per_second"),
        }),
        None => Ok(Price::Tokens {
            input: amount("input_per_million").unwrap_or_default(),
            cached_input: amount("cached_input_per_million").unwrap_or_default(),
            output: amount("output_per_million").unwrap_or_default(),
        }),
    }
}

/// Returns the price as the TOML table that `parse_price` reads.
pub fn price_table(price: &Price) -> toml::Table {
    let mut table = toml::Table::new();
    match *price {
        Price::Tokens { input, cached_input, output } => {
            for (key, amount) in TOKEN_KEYS.into_iter().zip([input, cached_input, output]) {
                table.insert(key.into(), amount.to_toml());
            }
        }
        Price::Hourly { engine_per_hour, prefill_tokens_per_second, decode_tokens_per_second } => {
            table.insert("engine_per_hour".into(), engine_per_hour.to_toml());
            for (key, rate) in HOURLY_KEYS[1..].iter().zip([prefill_tokens_per_second, decode_tokens_per_second]) {
                if let Some(rate) = rate {
                    table.insert((*key).into(), rate.to_toml());
                }
            }
        }
    }
    table
}

/// Checks a task header name: a lowercase HTTP header name, as HTTP/2 sends them.
pub fn parse_task_header(text: &str) -> Result<http::HeaderName, String> {
    let rule = || "must be a lowercase HTTP header name, such as \"x-task-id\"".to_string();
    if text.bytes().any(|byte| byte.is_ascii_uppercase()) {
        return Err(rule());
    }
    text.parse().map_err(|_| rule())
}

/// Checks a currency label: 1 to 8 ASCII letters.
pub fn valid_currency(text: &str) -> bool {
    (1..=8).contains(&text.len()) && text.bytes().all(|byte| byte.is_ascii_alphabetic())
}
