//! The access log: one JSON line per request on stdout.
//!
//! Built from an explicit allow-list of fields (the [`Line`] struct) so no
//! key, prompt, completion or client-chosen path can land in it: the
//! endpoint is a closed name, the model and tenant come from the config.

use serde::Serialize;
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Every field the access log has; nothing else is written.
#[derive(Debug, Serialize)]
pub(super) struct Line<'a> {
    pub request_id: &'a str,
    pub tenant: &'a str,
    pub endpoint: &'static str,
    pub model: &'a str,
    pub provider: &'a str,
    pub backend: Option<SocketAddr>,
    pub status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub usage_estimated: bool,
    pub cost_usd: f64,
    #[serde(serialize_with = "millis")]
    pub duration: Duration,
    #[serde(serialize_with = "opt_millis")]
    pub ttft: Option<Duration>,
    pub attempts: u32,
    /// Continuations of a stream that broke after reaching the client.
    pub resumptions: u32,
    #[serde(serialize_with = "millis")]
    pub overflow_wait: Duration,
    pub error: Option<&'static str>,
    /// An async job's attempt: the job's id, and which attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_attempt: Option<u32>,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1e6).round() / 1e3)
}

fn opt_millis<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => millis(d, s),
        None => s.serialize_none(),
    }
}

#[derive(Serialize)]
struct Stamped<'a> {
    ts: f64,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    line: &'a Line<'a>,
}

/// Writes one line to stdout (a failed write is not the request's problem).
pub(super) fn write(line: &Line<'_>) {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| (d.as_secs_f64() * 1e3).round() / 1e3);
    let stamped = Stamped {
        ts,
        kind: "access",
        line,
    };
    if let Ok(mut text) = serde_json::to_vec(&stamped) {
        text.push(b'\n');
        let _ = std::io::stdout().lock().write_all(&text);
    }
}
