//! One module per scenario. Each defines its command-line options (a clap `Args` struct) and a `run`
//! that prints a human summary and, last, one JSON line for scripts.
//!
//! [`idle`], [`ingest`], [`history`], [`crossnode`]; and the delivery scenarios [`fanout`], [`targeted`],
//! [`chat`], which share receivers, publishers and measurements through [`delivery`]. [`receivers`]
//! opens the WebSocket connections of `idle`, `flat` and the delivery scenarios. [`flat`] checks that
//! the cost of a send stays the same with many idle connections open as with none.
//!
//! The JSON lines keep their fields in the documented order, so they are written with [`json_line`].

use serde_json::{json, Value};

pub mod chat;
pub mod crossnode;
pub mod delivery;
pub mod fanout;
pub mod flat;
pub mod history;
pub mod idle;
pub mod ingest;
pub mod receivers;
pub mod targeted;

/// One JSON object on one line, fields in the order given (serde_json's map would sort the keys
/// unless another feature is pulled in).
pub fn json_line(fields: &[(&str, Value)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(key, value)| format!("{}:{value}", json!(key)))
        .collect();
    format!("{{{}}}", body.join(","))
}

/// `value` rounded to `decimals` places, for figures whose noise would only clutter a JSON line.
pub fn round_to(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_keep_the_field_order_and_round_as_asked() {
        let line = json_line(&[
            ("scenario", json!("x")),
            ("b", json!(round_to(1.23456, 2))),
            ("a", json!(null)),
        ]);
        assert_eq!(line, r#"{"scenario":"x","b":1.23,"a":null}"#);
    }
}
