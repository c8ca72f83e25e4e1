//! OpenTelemetry traces: the spans the gateway records for a request, its
//! provider attempts, its wait in the overflow queue and an async job's
//! attempts, exported to a collector over OTLP/HTTP (protobuf).
//!
//! The gateway builds its spans itself, once a request is over, from what
//! it already keeps for the access log ([`Span`] is a plain record), and
//! hands them to the exporter's bounded queue ([`submit`]): a thread of its
//! own batches and POSTs them. A collector that is down, slow or refusing
//! costs dropped spans (`runestone_telemetry_dropped_total`), never a
//! request's time; what is queued is flushed at shutdown ([`flush`]).
//!
//! `context` reads and writes W3C trace context (`traceparent`,
//! `tracestate`) and decides sampling; `otlp` is the wire format;
//! `export` is the queue and its thread.

mod context;
mod export;
mod otlp;

pub use context::{
    new_span_id, parse_traceparent, valid_client_headers, TraceContext, TRACEPARENT, TRACESTATE,
};
pub use export::{flush, settings, start, submit, Settings};

use std::time::SystemTime;

/// A span's kind (OpenTelemetry's `SpanKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Work inside the gateway (the wait in the overflow queue).
    Internal,
    /// A request the gateway answers.
    Server,
    /// A request the gateway makes (a provider attempt).
    Client,
    /// An async job's attempt, started from the queue.
    Consumer,
}

/// An attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A string the gateway made or read.
    Str(String),
    /// A string from a closed vocabulary.
    Static(&'static str),
    /// A whole number.
    Int(i64),
    /// A number (a cost in USD).
    Float(f64),
    /// A flag.
    Bool(bool),
    /// A list of strings (finish reasons).
    Strs(Vec<String>),
}

/// Something that happened at a moment within a span.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// What happened (`runestone.first_token`, ...).
    pub name: &'static str,
    /// When.
    pub at: SystemTime,
    /// What else is known about it.
    pub attributes: Vec<(&'static str, Value)>,
}

/// A span in another trace this one follows from (an async job's attempt
/// links to the request that queued the job).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    /// The other span's trace.
    pub trace_id: [u8; 16],
    /// The other span.
    pub span_id: [u8; 8],
    /// Whether the other span's trace was recorded.
    pub sampled: bool,
}

/// One finished span, as exported.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// The trace it belongs to.
    pub trace_id: [u8; 16],
    /// Its own id.
    pub span_id: [u8; 8],
    /// Its parent, if not the trace's root.
    pub parent: Option<[u8; 8]>,
    /// The parent is in another process (the client's span).
    pub remote_parent: bool,
    /// The client's `tracestate`.
    pub trace_state: Option<String>,
    /// `{operation} {model}` for a request, after the GenAI conventions.
    pub name: String,
    /// What kind of work it is.
    pub kind: Kind,
    /// When it started.
    pub start: SystemTime,
    /// When it ended.
    pub end: SystemTime,
    /// Its attributes (names after OpenTelemetry's conventions, or
    /// `runestone.*`).
    pub attributes: Vec<(&'static str, Value)>,
    /// What happened within it.
    pub events: Vec<Event>,
    /// Spans in other traces it follows from.
    pub links: Vec<Link>,
    /// The span failed: why (its status is then `ERROR`).
    pub error: Option<String>,
}

impl Value {
    fn weight(&self) -> usize {
        match self {
            Value::Str(s) => s.len(),
            Value::Strs(items) => items.iter().map(String::len).sum(),
            _ => 8,
        }
    }
}

impl Span {
    /// About how many bytes the span holds (its strings, and a little for
    /// the rest): what bounds the export queue and batches.
    pub fn weight(&self) -> usize {
        let attributes = |list: &[(&'static str, Value)]| -> usize {
            list.iter().map(|(k, v)| k.len() + v.weight() + 8).sum()
        };
        128 + self.name.len()
            + self.trace_state.as_ref().map_or(0, String::len)
            + attributes(&self.attributes)
            + self
                .events
                .iter()
                .map(|e| e.name.len() + attributes(&e.attributes) + 16)
                .sum::<usize>()
            + self.links.len() * 32
            + self.error.as_ref().map_or(0, String::len)
    }
}
