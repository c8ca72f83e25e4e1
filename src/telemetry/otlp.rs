//! OTLP's trace messages (opentelemetry-proto's `trace/v1`,
//! `common/v1`, `resource/v1` and the collector's export request), as
//! far as the gateway writes them: a batch of spans written straight into
//! protobuf, and (for tests) the same messages declared for prost, to
//! decode it and to check it byte for byte. Field numbers are the
//! protocol's.

use super::{Kind, Span, Value};
use std::time::{SystemTime, UNIX_EPOCH};

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ExportTraceServiceRequest {
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<ResourceSpans>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ResourceSpans {
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<ScopeSpans>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Resource {
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<KeyValue>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ScopeSpans {
    #[prost(message, optional, tag = "1")]
    pub scope: Option<InstrumentationScope>,
    #[prost(message, repeated, tag = "2")]
    pub spans: Vec<ProtoSpan>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct InstrumentationScope {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub version: String,
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ProtoSpan {
    #[prost(bytes = "vec", tag = "1")]
    pub trace_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub span_id: Vec<u8>,
    #[prost(string, tag = "3")]
    pub trace_state: String,
    #[prost(bytes = "vec", tag = "4")]
    pub parent_span_id: Vec<u8>,
    #[prost(string, tag = "5")]
    pub name: String,
    /// `SpanKind`: 1 internal, 2 server, 3 client, 5 consumer.
    #[prost(int32, tag = "6")]
    pub kind: i32,
    #[prost(fixed64, tag = "7")]
    pub start_time_unix_nano: u64,
    #[prost(fixed64, tag = "8")]
    pub end_time_unix_nano: u64,
    #[prost(message, repeated, tag = "9")]
    pub attributes: Vec<KeyValue>,
    #[prost(message, repeated, tag = "11")]
    pub events: Vec<Event>,
    #[prost(message, repeated, tag = "13")]
    pub links: Vec<Link>,
    #[prost(message, optional, tag = "15")]
    pub status: Option<Status>,
    /// The W3C trace flags, and whether the parent is remote (bits 8, 9).
    #[prost(fixed32, tag = "16")]
    pub flags: u32,
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Event {
    #[prost(fixed64, tag = "1")]
    pub time_unix_nano: u64,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "3")]
    pub attributes: Vec<KeyValue>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Link {
    #[prost(bytes = "vec", tag = "1")]
    pub trace_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub span_id: Vec<u8>,
    #[prost(fixed32, tag = "6")]
    pub flags: u32,
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Status {
    #[prost(string, tag = "2")]
    pub message: String,
    /// `StatusCode`: 0 unset, 1 ok, 2 error.
    #[prost(int32, tag = "3")]
    pub code: i32,
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct KeyValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<AnyValue>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct AnyValue {
    #[prost(oneof = "AnyKind", tags = "1, 2, 3, 4, 5")]
    pub value: Option<AnyKind>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Oneof)]
pub(super) enum AnyKind {
    #[prost(string, tag = "1")]
    String(String),
    #[prost(bool, tag = "2")]
    Bool(bool),
    #[prost(int64, tag = "3")]
    Int(i64),
    #[prost(double, tag = "4")]
    Double(f64),
    #[prost(message, tag = "5")]
    Array(ArrayValue),
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ArrayValue {
    #[prost(message, repeated, tag = "1")]
    pub values: Vec<AnyValue>,
}

const SAMPLED: u32 = 0x01;
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

fn nanos(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

// The export request is written straight from the spans, field by field
// in the protocol's order, as prost would write the messages above: making
// those messages first copied every name and value into strings of their
// own (about 45k instructions a traced request). Lengths go before
// nested messages, so each is measured (`*_len`) before it is written.
// Like proto3, empty strings and bytes and zero numbers are left out,
// except inside `AnyValue`'s oneof.

use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};

/// A length-delimited field of `len` bytes, with its key and length.
fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn put_delimited(tag: u32, len: usize, buf: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

/// A string or bytes field (left out when empty).
fn bytes_len(tag: u32, bytes: &[u8]) -> usize {
    if bytes.is_empty() {
        0
    } else {
        delimited_len(tag, bytes.len())
    }
}

fn put_bytes(tag: u32, bytes: &[u8], buf: &mut Vec<u8>) {
    if !bytes.is_empty() {
        put_delimited(tag, bytes.len(), buf);
        buf.extend_from_slice(bytes);
    }
}

/// A `fixed64` field (left out when 0).
fn fixed64_len(tag: u32, value: u64) -> usize {
    if value == 0 {
        0
    } else {
        key_len(tag) + 8
    }
}

fn put_fixed64(tag: u32, value: u64, buf: &mut Vec<u8>) {
    if value != 0 {
        encode_key(tag, WireType::SixtyFourBit, buf);
        buf.extend_from_slice(&value.to_le_bytes());
    }
}

/// A `fixed32` field (left out when 0).
fn fixed32_len(tag: u32, value: u32) -> usize {
    if value == 0 {
        0
    } else {
        key_len(tag) + 4
    }
}

fn put_fixed32(tag: u32, value: u32, buf: &mut Vec<u8>) {
    if value != 0 {
        encode_key(tag, WireType::ThirtyTwoBit, buf);
        buf.extend_from_slice(&value.to_le_bytes());
    }
}

/// An `int32`/`int64` field (left out when 0).
fn int_len(tag: u32, value: i64) -> usize {
    if value == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(value as u64)
    }
}

fn put_int(tag: u32, value: i64, buf: &mut Vec<u8>) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value as u64, buf);
    }
}

/// `AnyValue`: its oneof member, written even when empty or zero.
fn any_len(value: &Value) -> usize {
    match value {
        Value::Str(s) => delimited_len(1, s.len()),
        Value::Static(s) => delimited_len(1, s.len()),
        Value::Bool(_) => key_len(2) + 1,
        Value::Int(i) => key_len(3) + encoded_len_varint(*i as u64),
        Value::Float(_) => key_len(4) + 8,
        Value::Strs(items) => delimited_len(5, array_len(items)),
    }
}

/// `ArrayValue` of strings: each an `AnyValue`.
fn array_len(items: &[String]) -> usize {
    items
        .iter()
        .map(|s| delimited_len(1, delimited_len(1, s.len())))
        .sum()
}

fn put_any(value: &Value, buf: &mut Vec<u8>) {
    let string = |s: &str, buf: &mut Vec<u8>| {
        put_delimited(1, s.len(), buf);
        buf.extend_from_slice(s.as_bytes());
    };
    match value {
        Value::Str(s) => string(s, buf),
        Value::Static(s) => string(s, buf),
        Value::Bool(b) => {
            encode_key(2, WireType::Varint, buf);
            encode_varint(u64::from(*b), buf);
        }
        Value::Int(i) => {
            encode_key(3, WireType::Varint, buf);
            encode_varint(*i as u64, buf);
        }
        Value::Float(f) => {
            encode_key(4, WireType::SixtyFourBit, buf);
            buf.extend_from_slice(&f.to_le_bytes());
        }
        Value::Strs(items) => {
            put_delimited(5, array_len(items), buf);
            for s in items {
                put_delimited(1, delimited_len(1, s.len()), buf);
                string(s, buf);
            }
        }
    }
}

/// `KeyValue`.
fn key_value_len(key: &str, value: &Value) -> usize {
    bytes_len(1, key.as_bytes()) + delimited_len(2, any_len(value))
}

/// Repeated `KeyValue`s under `tag`.
fn attributes_len(tag: u32, attributes: &[(&'static str, Value)]) -> usize {
    attributes
        .iter()
        .map(|(key, value)| delimited_len(tag, key_value_len(key, value)))
        .sum()
}

fn put_attributes(tag: u32, attributes: &[(&'static str, Value)], buf: &mut Vec<u8>) {
    for (key, value) in attributes {
        put_delimited(tag, key_value_len(key, value), buf);
        put_bytes(1, key.as_bytes(), buf);
        put_delimited(2, any_len(value), buf);
        put_any(value, buf);
    }
}

/// `Span.Event`.
fn event_len(event: &super::Event) -> usize {
    fixed64_len(1, nanos(event.at))
        + bytes_len(2, event.name.as_bytes())
        + attributes_len(3, &event.attributes)
}

/// `Span.Link`.
fn link_len(link: &super::Link) -> usize {
    bytes_len(1, &link.trace_id) + bytes_len(2, &link.span_id) + fixed32_len(6, link_flags(link))
}

fn link_flags(link: &super::Link) -> u32 {
    u32::from(link.sampled) | HAS_IS_REMOTE
}

/// `Status`: `ERROR` with the span's error, else unset (an empty message).
fn status_len(span: &Span) -> usize {
    span.error.as_ref().map_or(0, |message| {
        bytes_len(2, message.as_bytes()) + int_len(3, 2)
    })
}

fn kind_number(kind: Kind) -> i64 {
    match kind {
        Kind::Internal => 1,
        Kind::Server => 2,
        Kind::Client => 3,
        Kind::Consumer => 5,
    }
}

fn span_flags(span: &Span) -> u32 {
    match (span.parent, span.remote_parent) {
        (Some(_), true) => SAMPLED | HAS_IS_REMOTE | IS_REMOTE,
        _ => SAMPLED | HAS_IS_REMOTE,
    }
}

/// `Span`.
fn span_len(span: &Span) -> usize {
    bytes_len(1, &span.trace_id)
        + bytes_len(2, &span.span_id)
        + bytes_len(3, span.trace_state.as_deref().unwrap_or("").as_bytes())
        + span.parent.map_or(0, |p| bytes_len(4, &p))
        + bytes_len(5, span.name.as_bytes())
        + int_len(6, kind_number(span.kind))
        + fixed64_len(7, nanos(span.start))
        + fixed64_len(8, nanos(span.end))
        + attributes_len(9, &span.attributes)
        + span
            .events
            .iter()
            .map(|e| delimited_len(11, event_len(e)))
            .sum::<usize>()
        + span
            .links
            .iter()
            .map(|l| delimited_len(13, link_len(l)))
            .sum::<usize>()
        + delimited_len(15, status_len(span))
        + fixed32_len(16, span_flags(span))
}

fn put_span(span: &Span, len: usize, buf: &mut Vec<u8>) {
    put_delimited(2, len, buf);
    put_bytes(1, &span.trace_id, buf);
    put_bytes(2, &span.span_id, buf);
    put_bytes(3, span.trace_state.as_deref().unwrap_or("").as_bytes(), buf);
    if let Some(parent) = span.parent {
        put_bytes(4, &parent, buf);
    }
    put_bytes(5, span.name.as_bytes(), buf);
    put_int(6, kind_number(span.kind), buf);
    put_fixed64(7, nanos(span.start), buf);
    put_fixed64(8, nanos(span.end), buf);
    put_attributes(9, &span.attributes, buf);
    for event in &span.events {
        put_delimited(11, event_len(event), buf);
        put_fixed64(1, nanos(event.at), buf);
        put_bytes(2, event.name.as_bytes(), buf);
        put_attributes(3, &event.attributes, buf);
    }
    for link in &span.links {
        put_delimited(13, link_len(link), buf);
        put_bytes(1, &link.trace_id, buf);
        put_bytes(2, &link.span_id, buf);
        put_fixed32(6, link_flags(link), buf);
    }
    put_delimited(15, status_len(span), buf);
    if let Some(message) = &span.error {
        put_bytes(2, message.as_bytes(), buf);
        put_int(3, 2, buf);
    }
    put_fixed32(16, span_flags(span), buf);
}

/// One export request body for `spans`, under a resource naming the
/// service: `ExportTraceServiceRequest { resource_spans: [{ resource,
/// scope_spans: [{ scope, spans }] }] }`.
pub(super) fn encode(spans: &[Span], service_name: &str) -> Vec<u8> {
    let resource = [
        ("service.name", Value::Str(service_name.to_string())),
        ("service.version", Value::Static(env!("CARGO_PKG_VERSION"))),
        ("telemetry.sdk.name", Value::Static("runestone")),
        ("telemetry.sdk.language", Value::Static("rust")),
    ];
    let (scope_name, scope_version) = ("runestone", env!("CARGO_PKG_VERSION"));
    let resource_len = attributes_len(1, &resource);
    let scope_len = bytes_len(1, scope_name.as_bytes()) + bytes_len(2, scope_version.as_bytes());
    let lens: Vec<usize> = spans.iter().map(span_len).collect();
    let scope_spans_len =
        delimited_len(1, scope_len) + lens.iter().map(|&n| delimited_len(2, n)).sum::<usize>();
    let resource_spans_len = delimited_len(1, resource_len) + delimited_len(2, scope_spans_len);
    let mut buf = Vec::with_capacity(delimited_len(1, resource_spans_len));
    put_delimited(1, resource_spans_len, &mut buf);
    put_delimited(1, resource_len, &mut buf);
    put_attributes(1, &resource, &mut buf);
    put_delimited(2, scope_spans_len, &mut buf);
    put_delimited(1, scope_len, &mut buf);
    put_bytes(1, scope_name.as_bytes(), &mut buf);
    put_bytes(2, scope_version.as_bytes(), &mut buf);
    for (span, len) in spans.iter().zip(lens) {
        put_span(span, len, &mut buf);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    // The messages built the way prost writes them: what `encode` must
    // equal, byte for byte.
    fn any(value: &Value) -> AnyValue {
        let value = match value {
            Value::Str(s) => AnyKind::String(s.clone()),
            Value::Static(s) => AnyKind::String((*s).to_string()),
            Value::Int(i) => AnyKind::Int(*i),
            Value::Float(f) => AnyKind::Double(*f),
            Value::Bool(b) => AnyKind::Bool(*b),
            Value::Strs(items) => AnyKind::Array(ArrayValue {
                values: items
                    .iter()
                    .map(|s| AnyValue {
                        value: Some(AnyKind::String(s.clone())),
                    })
                    .collect(),
            }),
        };
        AnyValue { value: Some(value) }
    }

    fn key_values(attributes: &[(&'static str, Value)]) -> Vec<KeyValue> {
        attributes
            .iter()
            .map(|(key, value)| KeyValue {
                key: (*key).to_string(),
                value: Some(any(value)),
            })
            .collect()
    }

    fn proto_span(span: &Span) -> ProtoSpan {
        let remote = match (span.parent, span.remote_parent) {
            (Some(_), true) => HAS_IS_REMOTE | IS_REMOTE,
            _ => HAS_IS_REMOTE,
        };
        ProtoSpan {
            trace_id: span.trace_id.to_vec(),
            span_id: span.span_id.to_vec(),
            trace_state: span.trace_state.clone().unwrap_or_default(),
            parent_span_id: span.parent.map(|p| p.to_vec()).unwrap_or_default(),
            name: span.name.clone(),
            kind: match span.kind {
                Kind::Internal => 1,
                Kind::Server => 2,
                Kind::Client => 3,
                Kind::Consumer => 5,
            },
            start_time_unix_nano: nanos(span.start),
            end_time_unix_nano: nanos(span.end),
            attributes: key_values(&span.attributes),
            events: span
                .events
                .iter()
                .map(|e| Event {
                    time_unix_nano: nanos(e.at),
                    name: e.name.to_string(),
                    attributes: key_values(&e.attributes),
                })
                .collect(),
            links: span
                .links
                .iter()
                .map(|l| Link {
                    trace_id: l.trace_id.to_vec(),
                    span_id: l.span_id.to_vec(),
                    flags: u32::from(l.sampled) | HAS_IS_REMOTE,
                })
                .collect(),
            status: Some(match &span.error {
                Some(message) => Status {
                    message: message.clone(),
                    code: 2,
                },
                None => Status::default(),
            }),
            flags: SAMPLED | remote,
        }
    }

    /// One export request body for `spans`, under a resource naming the
    /// service.
    fn encode_by_messages(spans: &[Span], service_name: &str) -> Vec<u8> {
        use prost::Message;
        let resource = Resource {
            attributes: key_values(&[
                ("service.name", Value::Str(service_name.to_string())),
                ("service.version", Value::Static(env!("CARGO_PKG_VERSION"))),
                ("telemetry.sdk.name", Value::Static("runestone")),
                ("telemetry.sdk.language", Value::Static("rust")),
            ]),
        };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "runestone".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                    }),
                    spans: spans.iter().map(proto_span).collect(),
                }],
            }],
        }
        .encode_to_vec()
    }

    fn spans() -> Vec<Span> {
        let at = |s: u64| UNIX_EPOCH + Duration::from_millis(s);
        vec![
            Span {
                trace_id: [7; 16],
                span_id: [8; 8],
                parent: Some([9; 8]),
                remote_parent: true,
                trace_state: Some("vendor=a".into()),
                name: "chat gpt-4o-mini".into(),
                kind: Kind::Server,
                start: at(1_764_000_000_123),
                end: at(1_764_000_000_456),
                attributes: vec![
                    ("gen_ai.usage.input_tokens", Value::Int(12)),
                    ("runestone.negative", Value::Int(-3)),
                    ("runestone.zero", Value::Int(0)),
                    ("runestone.cost_usd", Value::Float(0.000123)),
                    ("runestone.cost_zero", Value::Float(0.0)),
                    ("runestone.cache", Value::Static("miss")),
                    ("runestone.empty", Value::Str(String::new())),
                    ("runestone.flag", Value::Bool(false)),
                    ("runestone.yes", Value::Bool(true)),
                    (
                        "gen_ai.response.finish_reasons",
                        Value::Strs(vec!["stop".into(), String::new(), "é".repeat(100)]),
                    ),
                    ("runestone.none", Value::Strs(Vec::new())),
                ],
                events: vec![
                    crate::telemetry::Event {
                        name: "runestone.first_token",
                        at: at(1_764_000_000_200),
                        attributes: Vec::new(),
                    },
                    crate::telemetry::Event {
                        name: "runestone.stream_broken",
                        at: UNIX_EPOCH,
                        attributes: vec![("error.type", Value::Static("provider_stream_broken"))],
                    },
                ],
                links: vec![crate::telemetry::Link {
                    trace_id: [1; 16],
                    span_id: [2; 8],
                    sampled: true,
                }],
                error: Some("upstream_error".into()),
            },
            Span {
                trace_id: [3; 16],
                span_id: [4; 8],
                parent: None,
                remote_parent: false,
                trace_state: None,
                name: String::new(),
                kind: Kind::Client,
                start: UNIX_EPOCH,
                end: at(5),
                attributes: vec![("long", Value::Str("x".repeat(300)))],
                events: Vec::new(),
                links: vec![crate::telemetry::Link {
                    trace_id: [5; 16],
                    span_id: [6; 8],
                    sampled: false,
                }],
                error: Some(String::new()),
            },
            Span {
                trace_id: [10; 16],
                span_id: [11; 8],
                parent: Some([12; 8]),
                remote_parent: false,
                trace_state: Some(String::new()),
                name: "x".into(),
                kind: Kind::Consumer,
                start: at(1),
                end: at(2),
                attributes: Vec::new(),
                events: Vec::new(),
                links: Vec::new(),
                error: None,
            },
        ]
    }

    #[test]
    fn spans_are_written_as_prost_writes_the_messages() {
        let spans = spans();
        assert_eq!(encode(&spans, "svc"), encode_by_messages(&spans, "svc"));
        assert_eq!(encode(&[], "svc"), encode_by_messages(&[], "svc"));
        for span in &spans {
            let one = std::slice::from_ref(span);
            assert_eq!(
                encode(one, "a service"),
                encode_by_messages(one, "a service")
            );
        }
        // Many spans: lengths past one varint byte at every level.
        let many: Vec<Span> = spans.iter().cycle().take(300).cloned().collect();
        assert_eq!(encode(&many, "svc"), encode_by_messages(&many, "svc"));
    }
}
