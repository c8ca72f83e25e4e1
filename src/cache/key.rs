//! The cache key: a digest of who asks, for which model and endpoint, and
//! the request body in a canonical form (keys sorted, no whitespace), with
//! the fields that do not change the answer left out.

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
    let Value::Object(mut fields) = serde_json::from_slice::<Value>(body).ok()? else {
        return None;
    };
    for name in IGNORED_FIELDS {
        fields.remove(name);
    }
    let mut canonical = Vec::with_capacity(body.len());
    write_canonical(&Value::Object(fields), &mut canonical);
    let mut digest = Sha256::new();
    // Each part's length first, so no two different requests meet.
    for part in [
        tenant.as_bytes(),
        model.as_bytes(),
        endpoint.as_bytes(),
        &canonical,
    ] {
        digest.update((part.len() as u64).to_be_bytes());
        digest.update(part);
    }
    Some(digest.finalize().into())
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
