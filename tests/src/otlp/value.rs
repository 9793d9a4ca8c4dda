//! Attribute values of OTLP messages as plain Rust values.

use std::collections::BTreeMap;
use std::fmt;

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};

/// An attribute value: the OTLP `AnyValue` without its protobuf wrapping.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
    Bytes(Vec<u8>),
    Array(Vec<Value>),
    Map(BTreeMap<String, Value>),
    /// An index into the string table of a profiles dictionary, which only the profiling signal uses.
    StringIndex(i32),
    /// An `AnyValue` without a value, which OTLP allows.
    Empty,
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(text) => Some(text),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(number) => Some(*number),
            _ => None,
        }
    }

    pub fn as_double(&self) -> Option<f64> {
        match self {
            Value::Double(number) => Some(*number),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(flag) => Some(*flag),
            _ => None,
        }
    }
}

/// Formats strings without quotes and numbers as Rust prints them, so that an attribute filter
/// such as `("http.response.status_code", "200")` matches a string or an integer alike.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Str(text) => f.write_str(text),
            Value::Int(number) => write!(f, "{number}"),
            Value::Double(number) => write!(f, "{number}"),
            Value::Bool(flag) => write!(f, "{flag}"),
            Value::Bytes(bytes) => f.write_str(&hex::encode(bytes)),
            Value::Array(values) => {
                let items: Vec<String> = values.iter().map(Value::to_string).collect();
                write!(f, "[{}]", items.join(","))
            }
            Value::Map(entries) => {
                let items: Vec<String> = entries.iter().map(|(key, value)| format!("{key}={value}")).collect();
                write!(f, "{{{}}}", items.join(","))
            }
            Value::StringIndex(index) => write!(f, "string #{index}"),
            Value::Empty => Ok(()),
        }
    }
}

impl From<&AnyValue> for Value {
    fn from(value: &AnyValue) -> Value {
        match &value.value {
            Some(any_value::Value::StringValue(text)) => Value::Str(text.clone()),
            Some(any_value::Value::IntValue(number)) => Value::Int(*number),
            Some(any_value::Value::DoubleValue(number)) => Value::Double(*number),
            Some(any_value::Value::BoolValue(flag)) => Value::Bool(*flag),
            Some(any_value::Value::BytesValue(bytes)) => Value::Bytes(bytes.clone()),
            Some(any_value::Value::ArrayValue(array)) => Value::Array(array.values.iter().map(Value::from).collect()),
            Some(any_value::Value::KvlistValue(list)) => Value::Map(attributes(&list.values)),
            Some(any_value::Value::StringValueStrindex(index)) => Value::StringIndex(*index),
            None => Value::Empty,
        }
    }
}

/// Converts OTLP key-value pairs into a map. A key that appears twice keeps its last value.
pub fn attributes(pairs: &[KeyValue]) -> BTreeMap<String, Value> {
    pairs
        .iter()
        .map(|pair| (pair.key.clone(), pair.value.as_ref().map(Value::from).unwrap_or(Value::Empty)))
        .collect()
}

/// Returns whether every `(key, expected)` pair of `filter` names an attribute whose value
/// formats as `expected` (see the `Display` of [`Value`]).
pub fn matches(attributes: &BTreeMap<String, Value>, filter: &[(&str, &str)]) -> bool {
    filter.iter().all(|(key, expected)| attributes.get(*key).is_some_and(|value| value.to_string() == *expected))
}
