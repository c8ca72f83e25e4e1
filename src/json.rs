//! JSON read from bytes with one UTF-8 check of the whole text, and the
//! reading of a member whose presence counts.
//!
//! `serde_json::from_slice` checks each string it reads (every key
//! included) on its own; for a small document of many short strings, a
//! streamed chunk say, those checks cost more than checking the whole text
//! once and reading it as `str`.

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

/// For `#[serde(deserialize_with = ...)]`: a member that is there, even
/// as `null` (a plain `Option` reads `null` as absent).
pub(crate) fn present<'de, D: Deserializer<'de>>(
    member: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(member).map(Some)
}

/// `serde_json::from_slice`, with the whole text checked once. Text that
/// is not UTF-8 is read by `from_slice` itself, so the result is the same
/// for any input (it reads bytes it skips without checking them).
pub(crate) fn from_bytes<'a, T: Deserialize<'a>>(json: &'a [u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(json) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(json),
    }
}

/// Whether a raw JSON value is the string `text` (escaped or not).
pub(crate) fn is_str(raw: &serde_json::value::RawValue, text: &str) -> bool {
    let json = raw.get();
    let plain = json.len() == text.len() + 2
        && json.starts_with('"')
        && json.ends_with('"')
        && &json[1..json.len() - 1] == text;
    plain
        || (json.starts_with('"')
            && json.contains('\\')
            && serde_json::from_str::<String>(json).is_ok_and(|s| s == text))
}

#[cfg(test)]
mod tests {
    use super::from_bytes;
    use serde::Deserialize;

    #[derive(Deserialize, Debug, PartialEq)]
    struct Read<'a> {
        #[serde(borrow, default)]
        text: Option<&'a str>,
    }

    #[test]
    fn any_bytes_read_as_from_slice_reads_them() {
        for json in [
            &br#"{"text":"caf\xc3\xa9","other":[1,{"a":null}]}"#[..],
            b"{\"text\":\"ok\",\"skipped\":\"\xff\xfe\"}",
            b"{\"text\":\"\xff\"}",
            b"{\"text\":\"a\\\"b\"}",
            b"{\"text\":1}",
            b"\xef\xbb\xbf{}",
            b"",
        ] {
            let ours = from_bytes::<Read>(json).map_err(|e| e.to_string());
            let theirs = serde_json::from_slice::<Read>(json).map_err(|e| e.to_string());
            assert_eq!(ours, theirs, "{}", String::from_utf8_lossy(json));
        }
    }
}
