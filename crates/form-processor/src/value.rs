//! Typed cell values (§6): text, number, boolean, date. Empty cells have no
//! value at all.

use serde_json::Value as Json;

/// One cell's value, with its type.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A string (shared or inline).
    Text(String),
    /// A number (Excel stores every number as a double).
    Number(f64),
    /// TRUE / FALSE.
    Bool(bool),
    /// A date-formatted cell, as ISO 8601 (`2024-03-01` or
    /// `2024-03-01T09:30:00`).
    Date(String),
}

impl Value {
    /// The JSON form: a string, a number (integral numbers without `.0`),
    /// a boolean, or the ISO 8601 string of a date.
    pub fn to_json(&self) -> Json {
        match self {
            Self::Text(s) | Self::Date(s) => Json::String(s.clone()),
            Self::Bool(b) => Json::Bool(*b),
            Self::Number(n) => number_json(*n),
        }
    }

    /// True when the value is blank text (a required field must not be).
    pub fn is_blank(&self) -> bool {
        matches!(self, Self::Text(s) if s.trim().is_empty())
    }

    /// A canonical string for unique-value comparison.
    pub fn canonical(&self) -> String {
        match self {
            Self::Text(s) => s.trim().to_string(),
            Self::Date(s) => s.clone(),
            Self::Bool(b) => b.to_string(),
            Self::Number(n) => number_json(*n).to_string(),
        }
    }
}

fn number_json(n: f64) -> Json {
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        Json::from(n as i64)
    } else {
        serde_json::Number::from_f64(n)
            .map(Json::Number)
            .unwrap_or(Json::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_keeps_the_type() {
        let cases = [
            (Value::Text("A-1".into()), serde_json::json!("A-1")),
            (Value::Number(12.0), serde_json::json!(12)),
            (Value::Number(1200.5), serde_json::json!(1200.5)),
            (Value::Bool(true), serde_json::json!(true)),
            (
                Value::Date("2024-03-01".into()),
                serde_json::json!("2024-03-01"),
            ),
            (Value::Number(f64::NAN), serde_json::Value::Null),
        ];
        for (v, want) in cases {
            assert_eq!(v.to_json(), want, "{v:?}");
        }
    }

    #[test]
    fn canonical_values_compare_trimmed_text_and_plain_numbers() {
        assert_eq!(Value::Text(" L-1 ".into()).canonical(), "L-1");
        assert_eq!(Value::Number(7.0).canonical(), "7");
        assert!(Value::Text("  ".into()).is_blank());
        assert!(!Value::Number(0.0).is_blank());
    }
}
