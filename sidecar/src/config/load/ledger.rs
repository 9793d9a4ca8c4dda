//! Reading and checking the `[ledger]` section and its price tables.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{ConfigIssue, ConfigValue, Reader, plugin_table, text};
use crate::config::Config;
use crate::config::ledger::{HOURLY_KEYS, LedgerConfig, Price, TOKEN_KEYS, parse_price, parse_task_header, valid_currency};

impl Reader<'_> {
    /// Reads the `[ledger]` section and its price tables.
    pub(super) fn ledger(&mut self) -> LedgerConfig {
        let default_header = http::HeaderName::from_static("x-task-id");
        let models = self.get("ledger.models", ModelPrices(toml::Table::new())).0;
        LedgerConfig {
            enabled: self.get("ledger.enabled", true),
            task_header: self.get("ledger.task_header", TaskHeader(default_header)).0,
            retention: self.get("ledger.retention", Duration::from_secs(30 * 24 * 3600)),
            currency: self.get("ledger.currency", "USD".to_string()),
            max_requests_per_task: self.get("ledger.max_requests_per_task", 10_000),
            price: self.default_price(),
            models: self.model_prices(models),
        }
    }

    /// Reads `[ledger.price]`, whose keys arrive one by one from the file and the environment.
    fn default_price(&mut self) -> Option<Price> {
        let mut table = toml::Table::new();
        let mut origin = String::new();
        for key in TOKEN_KEYS.into_iter().chain(HOURLY_KEYS) {
            let path = format!("ledger.price.{key}");
            self.used.insert(path.clone());
            if let Some((value, from)) = self.sources.values.get(&path) {
                table.insert(key.to_string(), value.clone());
                origin = from.clone();
            }
        }
        if table.is_empty() {
            return None;
        }
        match parse_price(&table) {
            Ok(price) => Some(price),
            Err(issues) => {
                for issue in issues {
                    let path = format!("ledger.price.{}", issue.key);
                    let (value, origin) = match self.sources.values.get(&path) {
                        Some((_, from)) => (issue.value, from.clone()),
                        // A missing key has no source of its own; name where it can be set.
                        None if issue.value.is_empty() => {
                            ("(not set)".to_string(), format!("set it in [ledger.price] or with KVSIDECAR_LEDGER_PRICE_{}", issue.key.to_ascii_uppercase()))
                        }
                        None => (issue.value, origin.clone()),
                    };
                    self.sources.issues.push(ConfigIssue { path, value, origin, rule: issue.rule });
                }
                None
            }
        }
    }

    /// Parses each table of `[ledger.models]`, reporting every invalid key with its model.
    fn model_prices(&mut self, tables: toml::Table) -> BTreeMap<String, Price> {
        let origin = self.sources.values.get("ledger.models").map(|(_, from)| from.clone()).unwrap_or_default();
        let mut prices = BTreeMap::new();
        for (model, value) in tables {
            let path = format!("ledger.models.{model:?}");
            let mut fail = |path: String, value: String, rule: String| {
                self.sources.issues.push(ConfigIssue { path, value, origin: origin.clone(), rule });
            };
            if model.is_empty() {
                fail(path, value.to_string(), "a model name must not be empty".into());
                continue;
            }
            let toml::Value::Table(table) = value else {
                fail(path, value.to_string(), "must be a price table, such as { input_per_million = 0.15, cached_input_per_million = 0.075, output_per_million = 0.6 }".into());
                continue;
            };
            match parse_price(&table) {
                Ok(price) => {
                    prices.insert(model, price);
                }
                Err(issues) => {
                    for issue in issues {
                        let nested = table.get(&issue.key).is_some_and(toml::Value::is_table);
                        let rule = if nested { format!("{}; quote a model name that contains dots, as [ledger.models.\"qwen2.5-7b\"]", issue.rule) } else { issue.rule };
                        let key_path = if issue.key.is_empty() { path.clone() } else { format!("{path}.{}", issue.key) };
                        fail(key_path, issue.value, rule);
                    }
                }
            }
        }
        prices
    }
}

/// The ledger's task header: a lowercase header name.
struct TaskHeader(http::HeaderName);

impl ConfigValue for TaskHeader {
    fn parse(value: &toml::Value) -> Result<Self, String> {
        let text = text(value).ok_or("must be a lowercase HTTP header name, such as \"x-task-id\"")?;
        parse_task_header(text.trim()).map(TaskHeader)
    }
}

/// The `[ledger.models]` table: a price table per model name. From the environment it is TOML
/// text, as `{ "llama-3-8b" = { engine_per_hour = 2.5 } }`.
struct ModelPrices(toml::Table);

impl ConfigValue for ModelPrices {
    fn parse(value: &toml::Value) -> Result<Self, String> {
        let rule = "must be a table of price tables by model name, such as { \"llama-3-8b\" = { engine_per_hour = 2.5 } }";
        match value {
            toml::Value::Table(table) => Ok(ModelPrices(table.clone())),
            toml::Value::String(text) => plugin_table(text).map(ModelPrices).map_err(|_| rule.to_string()),
            _ => Err(rule.to_string()),
        }
    }
}

/// Checks the rules of `[ledger]` that span keys or ranges. Returns each broken rule with its
/// path and value.
pub(super) fn check(config: &Config) -> Vec<(&'static str, String, &'static str)> {
    let ledger = &config.ledger;
    let mut broken = Vec::new();
    if ledger.retention < Duration::from_secs(1) {
        broken.push(("ledger.retention", humantime::format_duration(ledger.retention).to_string(), "must be at least 1s, such as \"30d\""));
    }
    if !valid_currency(&ledger.currency) {
        broken.push(("ledger.currency", format!("{:?}", ledger.currency), "must be 1 to 8 ASCII letters, such as \"USD\""));
    }
    if ledger.task_header == config.request.tenant_header {
        broken.push(("ledger.task_header", ledger.task_header.to_string(), "must differ from request.tenant_header"));
    }
    broken
}

/// Returns the rule for an unknown key in `[ledger]` or `[ledger.price]`, or None for a path
/// outside them.
pub(super) fn unknown_key_rule(path: &str) -> Option<String> {
    if path.starts_with("ledger.price.") {
        return Some(format!(
            "unknown key in [ledger.price]; its keys are {} for a per-token price, or {} for a per-hour price",
            TOKEN_KEYS.join(", "),
            HOURLY_KEYS.join(", ")
        ));
    }
    if path == "ledger.price" {
        return Some("must be a table [ledger.price] of per-token or per-hour prices".into());
    }
    path.starts_with("ledger.").then(|| {
        "unknown key in [ledger]; its keys are enabled, task_header, retention, currency and max_requests_per_task, and the tables [ledger.price] and [ledger.models]".into()
    })
}
