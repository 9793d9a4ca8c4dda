//! A plugin's configuration: the TOML table kvsidecar passes at load time.

use std::cell::RefCell;
use std::collections::BTreeSet;

/// The `config` table of a plugin, with typed getters that name the key in their errors.
///
/// Each getter marks its key as known; [`Config::finish`] then rejects keys no getter asked
/// for, so a misspelt key fails the load instead of being ignored.
#[derive(Debug, Default)]
pub struct Config {
    table: toml::Table,
    used: RefCell<BTreeSet<String>>,
}

impl Config {
    /// Parses `text`, the plugin's table as TOML.
    pub fn parse(text: &str) -> Result<Config, String> {
        let table = text.parse::<toml::Table>().map_err(|error| format!("plugin config is not valid TOML: {}", error.message()))?;
        Ok(Config { table, used: RefCell::default() })
    }

    fn get(&self, key: &str) -> Option<&toml::Value> {
        self.used.borrow_mut().insert(key.to_string());
        self.table.get(key)
    }

    /// Returns the float at `key`, or `default` when the key is absent. Integers are accepted.
    pub fn f64(&self, key: &str, default: f64) -> Result<f64, String> {
        match self.get(key) {
            None => Ok(default),
            Some(toml::Value::Float(value)) if value.is_finite() => Ok(*value),
            Some(toml::Value::Integer(value)) => Ok(*value as f64),
            Some(other) => Err(format!("config key `{key}`: expected a finite number, found {other}")),
        }
    }

    /// Returns the non-negative integer at `key`, or `default` when the key is absent.
    pub fn u64(&self, key: &str, default: u64) -> Result<u64, String> {
        match self.get(key) {
            None => Ok(default),
            Some(toml::Value::Integer(value)) if *value >= 0 => Ok(*value as u64),
            Some(other) => Err(format!("config key `{key}`: expected a non-negative integer, found {other}")),
        }
    }

    /// Returns the boolean at `key`, or `default` when the key is absent.
    pub fn bool(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.get(key) {
            None => Ok(default),
            Some(toml::Value::Boolean(value)) => Ok(*value),
            Some(other) => Err(format!("config key `{key}`: expected true or false, found {other}")),
        }
    }

    /// Returns the string at `key`, or `default` when the key is absent.
    pub fn string(&self, key: &str, default: &str) -> Result<String, String> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(toml::Value::String(value)) => Ok(value.clone()),
            Some(other) => Err(format!("config key `{key}`: expected a string, found {other}")),
        }
    }

    /// Fails when the table contains a key that no getter requested.
    pub fn finish(&self) -> Result<(), String> {
        let used = self.used.borrow();
        let unknown: Vec<&str> = self.table.keys().map(String::as_str).filter(|key| !used.contains(*key)).collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let known: Vec<&str> = used.iter().map(String::as_str).collect();
        let reads = if known.is_empty() { "no keys".to_string() } else { known.join(", ") };
        Err(format!("unknown config key(s) {}; this plugin reads {reads}", unknown.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::Config;

    #[test]
    fn getters_read_keys_finish_rejects_rest() {
        let config = Config::parse("imbalance = 4\nweight = 0.5\nname = \"a\"\nstrict = true\ntypo = 1\n").unwrap();
        assert_eq!(config.u64("imbalance", 0).unwrap(), 4);
        assert_eq!(config.f64("weight", 0.0).unwrap(), 0.5);
        assert_eq!(config.string("name", "").unwrap(), "a");
        assert!(config.bool("strict", false).unwrap());
        assert_eq!(config.u64("absent", 7).unwrap(), 7);
        let error = config.finish().unwrap_err();
        assert!(error.contains("typo"), "{error}");
    }

    #[test]
    fn wrong_type_error_names_key() {
        let config = Config::parse("imbalance = -1\nweight = \"x\"").unwrap();
        assert!(config.u64("imbalance", 0).unwrap_err().contains("imbalance"));
        assert!(config.f64("weight", 0.0).unwrap_err().contains("weight"));
        assert!(Config::parse("no equals sign").unwrap_err().contains("TOML"));
    }
}
