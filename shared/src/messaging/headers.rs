//! Our AMQP header names and conversions between AMQP tables and JSON (the outbox and the
//! dead-letter store keep headers as JSON). Our own headers, not `x-death`, are the
//! source of truth for attempt and replay counts.

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{Map, Value};

pub const TRACEPARENT: &str = "traceparent";
pub const REQUEST_ID: &str = "x-request-id";

pub const SERVICE: &str = "x-commerce-service";
pub const HANDLER: &str = "x-commerce-handler";
pub const ERROR_KIND: &str = "x-commerce-error-kind";
pub const ERROR_MESSAGE: &str = "x-commerce-error-message";
pub const ERROR_CHAIN: &str = "x-commerce-error-chain";
/// Failed attempts so far.
pub const ATTEMPTS: &str = "x-commerce-attempts";
pub const FIRST_FAILURE_AT: &str = "x-commerce-first-failure-at";
pub const LAST_FAILURE_AT: &str = "x-commerce-last-failure-at";
pub const ORIGINAL_EXCHANGE: &str = "x-commerce-original-exchange";
pub const ORIGINAL_ROUTING_KEY: &str = "x-commerce-original-routing-key";
pub const REPLAY_COUNT: &str = "x-commerce-replay-count";
pub const REPLAYED_BY: &str = "x-commerce-replayed-by";

/// Headers that describe one failure; a replay starts without them.
pub const FAILURE_HEADERS: [&str; 9] = [
    SERVICE,
    HANDLER,
    ERROR_KIND,
    ERROR_MESSAGE,
    ERROR_CHAIN,
    ATTEMPTS,
    FIRST_FAILURE_AT,
    LAST_FAILURE_AT,
    "x-death",
];

/// Longest header text we send: error chains can be long, frames are not.
const MAX_TEXT: usize = 4096;

pub fn text(value: &str) -> AMQPValue {
    let mut end = value.len().min(MAX_TEXT);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    AMQPValue::LongString(LongString::from(value[..end].to_owned()))
}

pub fn get_str(table: &FieldTable, key: &str) -> Option<String> {
    match table.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

pub fn get_i64(table: &FieldTable, key: &str) -> Option<i64> {
    match table.inner().get(key)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

pub fn value_to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(v) => Value::Bool(*v),
        AMQPValue::ShortShortInt(v) => Value::from(*v),
        AMQPValue::ShortShortUInt(v) => Value::from(*v),
        AMQPValue::ShortInt(v) => Value::from(*v),
        AMQPValue::ShortUInt(v) => Value::from(*v),
        AMQPValue::LongInt(v) => Value::from(*v),
        AMQPValue::LongUInt(v) => Value::from(*v),
        AMQPValue::LongLongInt(v) => Value::from(*v),
        AMQPValue::Timestamp(v) => Value::from(*v),
        AMQPValue::Float(v) => Value::from(*v),
        AMQPValue::Double(v) => Value::from(*v),
        AMQPValue::DecimalValue(v) => Value::String(format!("{}e-{}", v.value, v.scale)),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::ByteArray(b) => Value::String(String::from_utf8_lossy(b.as_slice()).into()),
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(value_to_json).collect())
        }
        AMQPValue::FieldTable(table) => to_json(table),
        AMQPValue::Void => Value::Null,
    }
}

pub fn to_json(table: &FieldTable) -> Value {
    Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), value_to_json(v)))
            .collect(),
    )
}

fn value_from_json(value: &Value) -> AMQPValue {
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => AMQPValue::LongLongInt(i),
            (None, Some(f)) => AMQPValue::Double(f),
            (None, None) => text(&n.to_string()),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.clone())),
        Value::Array(items) => {
            let mut array = FieldArray::default();
            for item in items {
                array.push(value_from_json(item));
            }
            AMQPValue::FieldArray(array)
        }
        Value::Object(map) => AMQPValue::FieldTable(from_json(map)),
    }
}

pub fn from_json(map: &Map<String, Value>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in map {
        if let Ok(key) = ShortString::try_new(key.clone()) {
            table.insert(key, value_from_json(value));
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_keeps_strings_numbers_and_nesting() {
        let json = serde_json::json!({
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ATTEMPTS: 3,
            "nested": {"list": [1, "a", true]},
        });
        let Value::Object(map) = &json else {
            unreachable!()
        };
        let table = from_json(map);
        assert_eq!(get_i64(&table, ATTEMPTS), Some(3));
        assert_eq!(to_json(&table), json);
    }

    #[test]
    fn long_text_is_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_TEXT);
        let AMQPValue::LongString(cut) = text(&long) else {
            unreachable!()
        };
        assert!(cut.len() <= MAX_TEXT);
        assert!(std::str::from_utf8(cut.as_bytes()).is_ok());
    }
}
