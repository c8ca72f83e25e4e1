//! Producing the body sent upstream from the client's bytes: edits are
//! spliced in, members spliced out, nothing else re-serialised.

use super::RequestFields;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// Body fields that name another upstream or key: removed, never honoured.
pub(super) const FOREIGN_UPSTREAM_FIELDS: [&str; 3] = ["api_key", "api_base", "base_url"];

/// Produces the body sent upstream: the provider's model name in place of
/// the public one, `stream_options.include_usage` set when `ask_usage`, and
/// any `api_key`/`api_base`/`base_url` removed. Edits are spliced into the
/// original bytes; the body is returned untouched (no copy) when nothing
/// has to change.
pub fn rewrite_body(
    body: &Bytes,
    fields: &RequestFields<'_>,
    provider_model: &str,
    ask_usage: bool,
) -> Bytes {
    if fields.has_foreign_upstream_fields {
        // The rare path: take the members out of the bytes, then edit the
        // result like any other body. Both steps keep every other byte.
        let cleaned = without_members(body, &FOREIGN_UPSTREAM_FIELDS);
        if let Ok(fields) = RequestFields::parse(&cleaned) {
            if !fields.has_foreign_upstream_fields {
                return splice_edits(&cleaned, &fields, provider_model, ask_usage);
            }
        }
        // Unreachable for a body `fields` was parsed from; never forward
        // the fields even so.
        return Bytes::from_static(b"{}");
    }
    splice_edits(body, fields, provider_model, ask_usage)
}

/// The model and usage edits of [`rewrite_body`], spliced into `body`.
fn splice_edits(
    body: &Bytes,
    fields: &RequestFields<'_>,
    provider_model: &str,
    ask_usage: bool,
) -> Bytes {
    let mut edits: Vec<(usize, usize, Vec<u8>)> = Vec::with_capacity(2);
    if fields.model != provider_model {
        let quoted = serde_json::to_vec(provider_model).expect("a string always serialises");
        edits.push((fields.model_span.0, fields.model_span.1, quoted));
    }
    if ask_usage {
        match fields.stream_options_span {
            Some((start, end)) => edits.push(include_usage_edit(body, start, end)),
            None => {
                // The body is a JSON object (parse checked): it opens with `{`.
                let open = body.iter().position(|&b| b == b'{').unwrap_or(0);
                edits.push((
                    open + 1,
                    open + 1,
                    br#""stream_options":{"include_usage":true},"#.to_vec(),
                ));
            }
        }
    }
    if edits.is_empty() {
        return body.clone();
    }
    edits.sort_by_key(|e| e.0);
    let grown: usize = edits
        .iter()
        .map(|(s, e, v)| v.len() - (e - s).min(v.len()))
        .sum();
    let mut out = Vec::with_capacity(body.len() + grown);
    let mut at = 0;
    for (start, end, value) in edits {
        out.extend_from_slice(&body[at..start]);
        out.extend_from_slice(&value);
        at = end;
    }
    out.extend_from_slice(&body[at..]);
    Bytes::from(out)
}

/// A JSON object body with `"model": model` as its first member, in place
/// of any `model` it had (`"model": null`); `None` when the body is not an
/// object.
pub fn with_model(body: &Bytes, model: &str) -> Option<Bytes> {
    let body = &without_members(body, &["model"]);
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    let rest = &body[open + 1..];
    let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
    let member = serde_json::json!({ "model": model }).to_string();
    let member = &member[1..member.len() - 1];
    let mut out = Vec::with_capacity(body.len() + member.len() + 1);
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(member.as_bytes());
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    Some(Bytes::from(out))
}

/// An async job runs without a client to stream to: the body with `stream`
/// and `stream_options` taken out, every other byte as sent.
pub fn without_streaming(body: &Bytes) -> Bytes {
    without_members(body, &["stream", "stream_options"])
}

/// The top-level members of a JSON object body, each as its name and the
/// byte range from its key's opening quote to the end of its value.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(entry) = map.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                    members.push(entry);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// A top-level member's place in the bytes: its name, where its key's
/// opening quote is, and where its value starts and ends.
struct Span<'a> {
    name: Cow<'a, str>,
    key_start: usize,
    value_start: usize,
    value_end: usize,
}

/// The members of a JSON object `text` (a slice of `body` starting at
/// `offset`), with their places in `body`. `None` when it is not an object.
fn spans<'a>(body: &'a [u8], offset: usize, text: &'a str) -> Option<Vec<Span<'a>>> {
    let Members(members) = serde_json::from_str::<Members<'_>>(text).ok()?;
    let base = body.as_ptr() as usize;
    members
        .into_iter()
        .map(|(name, value)| {
            let value_start = value.get().as_ptr() as usize - base;
            Some(Span {
                name,
                key_start: key_start(body, value_start).filter(|&k| k >= offset)?,
                value_start,
                value_end: value_start + value.get().len(),
            })
        })
        .collect()
}

/// `body` (a JSON object) without its top-level members named in `names`:
/// each run of removed members is cut out with one separator, so every
/// other byte (order, spacing, escapes) stays as sent. A body that is not a
/// JSON object is returned as it is.
pub(super) fn without_members(body: &Bytes, names: &[&str]) -> Bytes {
    let Ok(text) = std::str::from_utf8(body) else {
        return body.clone();
    };
    let Some(members) = spans(body, 0, text) else {
        return body.clone();
    };
    let removed = |i: usize| names.contains(&members[i].name.as_ref());
    if !(0..members.len()).any(removed) {
        return body.clone();
    }
    let mut cuts: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < members.len() {
        if !removed(i) {
            i += 1;
            continue;
        }
        let first = i;
        while i < members.len() && removed(i) {
            i += 1;
        }
        let last = i - 1;
        cuts.push(if i < members.len() {
            // Up to the next kept member's key, separator included.
            (members[first].key_start, members[i].key_start)
        } else if first > 0 {
            // From the end of the last kept member's value.
            (members[first - 1].value_end, members[last].value_end)
        } else {
            (members[first].key_start, members[last].value_end)
        });
    }
    let mut out = Vec::with_capacity(body.len());
    let mut at = 0;
    for (start, end) in cuts {
        out.extend_from_slice(&body[at..start]);
        at = end;
    }
    out.extend_from_slice(&body[at..]);
    Bytes::from(out)
}

/// The edit that sets `include_usage: true` in the `stream_options` value
/// at `start..end`, spliced so the client's other options keep their bytes.
fn include_usage_edit(body: &[u8], start: usize, end: usize) -> (usize, usize, Vec<u8>) {
    let whole = (start, end, br#"{"include_usage":true}"#.to_vec());
    let Some(members) = std::str::from_utf8(&body[start..end])
        .ok()
        .and_then(|text| spans(body, start, text))
    else {
        return whole;
    };
    if let Some(existing) = members.iter().find(|m| m.name == "include_usage") {
        return (existing.value_start, existing.value_end, b"true".to_vec());
    }
    match members.first() {
        Some(first) => (
            first.key_start,
            first.key_start,
            br#""include_usage":true,"#.to_vec(),
        ),
        None => whole,
    }
}

/// The opening quote of the key whose value starts at `value_start`: back
/// over whitespace, the `:`, whitespace, the key's closing quote, then to
/// the first quote that is not escaped.
fn key_start(body: &[u8], value_start: usize) -> Option<usize> {
    let mut i = value_start;
    let back_over_space = |i: &mut usize| {
        while *i > 0 && body[*i - 1].is_ascii_whitespace() {
            *i -= 1;
        }
    };
    back_over_space(&mut i);
    i = i.checked_sub(1).filter(|&c| body[c] == b':')?;
    back_over_space(&mut i);
    i = i.checked_sub(1).filter(|&c| body[c] == b'"')?;
    loop {
        i = i.checked_sub(1)?;
        if body[i] == b'"' {
            let backslashes = body[..i].iter().rev().take_while(|&&b| b == b'\\').count();
            if backslashes % 2 == 0 {
                return Some(i);
            }
        }
    }
}
