//! The cache key: a digest of who asks, for which model and endpoint, and
//! the request body in a canonical form (keys sorted, no whitespace), with
//! the fields that do not change the answer left out.

use serde_json::value::RawValue;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Request fields that change how an answer is delivered or attributed,
/// not what it says.
const IGNORED_FIELDS: [&str; 4] = ["stream", "stream_options", "user", "metadata"];

/// A cache key (SHA-256).
pub type Key = [u8; 32];

/// The key of `body` (a JSON object) asked of `model` at `endpoint` by
/// `tenant`; `None` when the body is not a JSON object.
pub fn key(tenant: &str, model: &str, endpoint: &str, body: &[u8]) -> Option<Key> {
    let Value::Object(mut fields) = crate::json::from_bytes::<Value>(body).ok()? else {
        return None;
    };
    for name in IGNORED_FIELDS {
        fields.remove(name);
    }
    let mut canonical = Vec::with_capacity(body.len());
    write_canonical(&Value::Object(fields), &mut canonical);
    // The numbers as written, in the fields that count.
    let raw: std::collections::HashMap<&str, &RawValue> = crate::json::from_bytes(body).ok()?;
    let numbers: Vec<u8> = raw
        .iter()
        .filter(|(name, _)| !IGNORED_FIELDS.contains(name))
        .map(|(_, value)| number_literals(value.get().as_bytes()))
        .collect::<Vec<_>>()
        .concat();
    let numbers = sorted_literals(&numbers);
    let mut digest = Sha256::new();
    // Each part's length first, so no two different requests meet.
    for part in [
        tenant.as_bytes(),
        model.as_bytes(),
        endpoint.as_bytes(),
        &canonical,
        &numbers,
    ] {
        digest.update((part.len() as u64).to_be_bytes());
        digest.update(part);
    }
    Some(digest.finalize().into())
}

/// A JSON text's number literals as written, each followed by a comma:
/// parsed numbers lose what an `f64` cannot hold (two integers past 2^64
/// parse alike), but the provider gets the text, so two bodies whose
/// numbers are written differently must not share a key.
fn number_literals(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut in_string = false;
    let mut escaped = false;
    let mut start = None;
    let end = |from: usize, to: usize, out: &mut Vec<u8>| {
        out.extend_from_slice(&json[from..to]);
        out.push(b',');
    };
    for (i, &b) in json.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        let numeric = b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E');
        match (start, numeric) {
            (None, true) => start = Some(i),
            (Some(from), false) => {
                end(from, i, &mut out);
                start = None;
            }
            _ => {}
        }
        in_string = b == b'"';
    }
    if let Some(from) = start {
        end(from, json.len(), &mut out);
    }
    out
}

/// Comma-ended literals, sorted (so key order does not matter).
fn sorted_literals(literals: &[u8]) -> Vec<u8> {
    let mut each: Vec<&[u8]> = literals
        .split(|&b| b == b',')
        .filter(|l| !l.is_empty())
        .collect();
    each.sort_unstable();
    each.join(&b',')
}

/// `value` as JSON with every object's keys in order and no whitespace.
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (name, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, name).expect("a string serialises");
                out.push(b':');
                write_canonical(value, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("a scalar serialises"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(body: &str) -> Key {
        key("acme", "gpt-4o-mini", "chat", body.as_bytes()).unwrap()
    }

    #[test]
    fn key_order_whitespace_and_delivery_fields_do_not_matter() {
        let base = k(
            r#"{"model":"gpt-4o-mini","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#,
        );
        assert_eq!(
            base,
            k(r#"{ "messages" : [ {"content":"hi", "role":"user"} ],
                  "temperature": 0, "model": "gpt-4o-mini", "stream": true,
                  "stream_options": {"include_usage": true}, "user": "u-1", "metadata": {"a": "b"} }"#)
        );
        assert_ne!(
            base,
            k(
                r#"{"model":"gpt-4o-mini","temperature":0.5,"messages":[{"role":"user","content":"hi"}]}"#
            )
        );
        assert_ne!(
            base,
            k(
                r#"{"model":"gpt-4o-mini","temperature":0,"messages":[{"role":"user","content":"hi!"}]}"#
            )
        );
        // Message order is the conversation: it matters.
        assert_ne!(
            k(r#"{"messages":[{"role":"user","content":"a"},{"role":"user","content":"b"}]}"#),
            k(r#"{"messages":[{"role":"user","content":"b"},{"role":"user","content":"a"}]}"#)
        );
    }

    #[test]
    fn numbers_written_differently_never_share_a_key() {
        let a = k(r#"{"max":18446744073709551616,"s":"1e5"}"#);
        assert_ne!(a, k(r#"{"max":18446744073709551617,"s":"1e5"}"#));
        assert_ne!(k(r#"{"t":0}"#), k(r#"{"t":0.0}"#));
        // Reordered, the same numbers: the same key; numbers in the fields
        // left out do not count.
        assert_eq!(
            k(r#"{"a":1,"b":2.5}"#),
            k(r#"{"b":2.5, "a":1, "metadata":{"n":7}}"#)
        );
        // Digits inside strings are not numbers.
        assert_eq!(number_literals(br#"{"s":"12\"34","n":5}"#), b"5,");
    }

    #[test]
    fn tenants_models_and_endpoints_never_share_a_key() {
        let body = br#"{"input":"x"}"#;
        let a = key("acme", "m", "embeddings", body).unwrap();
        assert_ne!(a, key("beta", "m", "embeddings", body).unwrap());
        assert_ne!(a, key("acme", "n", "embeddings", body).unwrap());
        assert_ne!(a, key("acme", "m", "chat", body).unwrap());
        // Lengths are part of the digest: parts cannot slide into each other.
        assert_ne!(key("ab", "c", "e", body), key("a", "bc", "e", body));
        assert_eq!(key("acme", "m", "chat", b"[1]"), None);
        assert_eq!(key("acme", "m", "chat", b"not json"), None);
    }
}
