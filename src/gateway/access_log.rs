//! The access log: one JSON line per request on stdout.
//!
//! Built from an explicit allow-list of fields (the [`Line`] struct) so no
//! key, prompt, completion or client-chosen path can land in it: the
//! endpoint is a closed name, the model and tenant come from the config.
//!
//! Lines are written off the request path: a request hands its serialised
//! line to a bounded queue, and a thread of its own writes what has
//! queued up in one `write` every few milliseconds. A line that finds the queue full is dropped and counted
//! (`runestone_access_log_dropped_total`) rather than making the request
//! wait on a slow disk or a full pipe. [`flush`] writes out what is queued
//! when the process stops (graceful shutdown or upgrade).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lines that may wait for the writer (about 400 bytes each).
const QUEUE_LINES: usize = 16 * 1024;
/// The most bytes the writer gathers into one write.
const BATCH_BYTES: usize = 256 * 1024;
/// How long the writer rests between writes (a line reaches stdout at most
/// this late, while the queue is not full).
const PAUSE: Duration = Duration::from_millis(5);

/// Every field the access log has; nothing else is written.
#[derive(Debug)]
pub(super) struct Line<'a> {
    pub request_id: &'a str,
    /// The request's trace (with tracing on), to find its spans.
    pub trace_id: Option<&'a str>,
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
    pub duration: Duration,
    pub ttft: Option<Duration>,
    pub attempts: u32,
    /// Continuations of a stream that broke after reaching the client.
    pub resumptions: u32,
    pub overflow_wait: Duration,
    pub error: Option<&'static str>,
    /// What the response cache did (with `cache:`).
    pub cache: Option<&'static str>,
    /// An async job's attempt: the job's id, and which attempt.
    pub job: Option<&'a str>,
    pub job_attempt: Option<u32>,
}

impl Line<'_> {
    /// The line as one JSON object: `ts` (Unix seconds) and `"type":
    /// "access"`, then the fields in order, milliseconds for durations, the
    /// optional ones left out when absent (`trace_id`, `cache`, `job`,
    /// `job_attempt`) or null (`backend`, `ttft`, `error`).
    ///
    /// Written out by hand rather than derived: serde escaped every key and
    /// went through a map for the stamp, 10k instructions a request, most
    /// of what the log cost.
    fn to_json(&self, ts: f64) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(b"{\"ts\":");
        value(&mut out, &ts);
        out.extend_from_slice(b",\"type\":\"access\",\"request_id\":");
        string(&mut out, self.request_id);
        if let Some(trace_id) = self.trace_id {
            key(&mut out, "trace_id");
            string(&mut out, trace_id);
        }
        key(&mut out, "tenant");
        string(&mut out, self.tenant);
        key(&mut out, "endpoint");
        string(&mut out, self.endpoint);
        key(&mut out, "model");
        string(&mut out, self.model);
        key(&mut out, "provider");
        string(&mut out, self.provider);
        key(&mut out, "backend");
        match self.backend {
            Some(SocketAddr::V4(addr)) => {
                for (i, octet) in addr.ip().octets().iter().enumerate() {
                    out.push(if i == 0 { b'"' } else { b'.' });
                    value(&mut out, octet);
                }
                out.push(b':');
                value(&mut out, &addr.port());
                out.push(b'"');
            }
            other => value(&mut out, &other),
        }
        key(&mut out, "status");
        value(&mut out, &self.status);
        key(&mut out, "prompt_tokens");
        value(&mut out, &self.prompt_tokens);
        key(&mut out, "completion_tokens");
        value(&mut out, &self.completion_tokens);
        key(&mut out, "usage_estimated");
        value(&mut out, &self.usage_estimated);
        key(&mut out, "cost_usd");
        value(&mut out, &self.cost_usd);
        key(&mut out, "duration");
        value(&mut out, &millis(self.duration));
        key(&mut out, "ttft");
        value(&mut out, &self.ttft.map(millis));
        key(&mut out, "attempts");
        value(&mut out, &self.attempts);
        key(&mut out, "resumptions");
        value(&mut out, &self.resumptions);
        key(&mut out, "overflow_wait");
        value(&mut out, &millis(self.overflow_wait));
        key(&mut out, "error");
        value(&mut out, &self.error);
        if let Some(cache) = self.cache {
            key(&mut out, "cache");
            string(&mut out, cache);
        }
        if let Some(job) = self.job {
            key(&mut out, "job");
            string(&mut out, job);
        }
        if let Some(attempt) = self.job_attempt {
            key(&mut out, "job_attempt");
            value(&mut out, &attempt);
        }
        out.extend_from_slice(b"}\n");
        out
    }
}

/// A duration in milliseconds, to the microsecond.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// `,"name":` (names are plain).
fn key(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

/// A JSON string: copied as is when nothing in it needs escaping (ids and
/// names from the config nearly always), else escaped by serde_json.
fn string(out: &mut Vec<u8>, s: &str) {
    // No early exit: the compiler checks 32 bytes at a time.
    let plain = !s.bytes().fold(false, |bad, b| {
        bad | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        value(out, s);
    }
}

/// A number, bool, null or string as serde_json writes it (writing to a
/// `Vec` cannot fail).
fn value<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    let _ = serde_json::to_writer(out, v);
}

enum Message {
    Line(Vec<u8>),
    /// Write out everything before this, then say so.
    Flush(std::sync::mpsc::Sender<()>),
}

/// The queue to the writer thread (started on first use).
fn queue() -> &'static SyncSender<Message> {
    static QUEUE: OnceLock<SyncSender<Message>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (tx, rx) = sync_channel(QUEUE_LINES);
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the access log writer; lines are dropped");
        }
        tx
    })
}

/// The writer thread: every [`PAUSE`], writes what has queued in one go
/// (a failed write is not the requests' problem). It never waits on the
/// queue itself, so a request queueing its line never has to wake it: the
/// request path pays a copy into the queue, no system call.
fn write_lines(rx: Receiver<Message>) {
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut acks = Vec::new();
    loop {
        let mut open = true;
        while batch.len() < BATCH_BYTES {
            match rx.try_recv() {
                Ok(Message::Line(line)) => batch.extend_from_slice(&line),
                Ok(Message::Flush(ack)) => acks.push(ack),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if !batch.is_empty() {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&batch);
            let _ = out.flush();
        }
        let full = batch.len() >= BATCH_BYTES;
        batch.clear();
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
        if !open {
            return;
        }
        if !full {
            std::thread::sleep(PAUSE);
        }
    }
}

/// Queues one line for stdout; dropped (and counted) when the writer is
/// that far behind.
pub(super) fn write(line: &Line<'_>) {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| (d.as_secs_f64() * 1e3).round() / 1e3);
    let text = line.to_json(ts);
    // Full, or (should the writer be gone) disconnected: dropped.
    if queue().try_send(Message::Line(text)).is_err() {
        crate::metrics::ACCESS_LOG_DROPPED.inc();
    }
}

/// Writes out every line queued so far (waiting at most `limit`): called
/// once the server has stopped, so a graceful shutdown or upgrade loses
/// none.
pub fn flush(limit: Duration) {
    let (ack, done) = std::sync::mpsc::channel();
    if queue().send(Message::Flush(ack)).is_ok() {
        let _ = done.recv_timeout(limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn line<'a>(text: &'a str, backend: Option<SocketAddr>, optional: bool) -> Line<'a> {
        Line {
            request_id: text,
            trace_id: optional.then_some(text),
            tenant: text,
            endpoint: "chat",
            model: text,
            provider: text,
            backend,
            status: 200,
            prompt_tokens: u64::MAX,
            completion_tokens: 7,
            usage_estimated: optional,
            cost_usd: 0.000_012_5,
            duration: Duration::from_micros(1_234_567),
            ttft: optional.then(|| Duration::from_nanos(1_500)),
            attempts: 2,
            resumptions: 0,
            overflow_wait: Duration::ZERO,
            error: optional.then_some("upstream_timeout"),
            cache: optional.then_some("hit"),
            job: optional.then_some(text),
            job_attempt: optional.then_some(3),
        }
    }

    proptest! {
        /// Whatever a string holds (quotes, backslashes, control
        /// characters, any Unicode), it is written exactly as serde_json
        /// writes it.
        #[test]
        fn strings_are_written_as_serde_json_writes_them(s in any::<String>()) {
            let mut out = Vec::new();
            string(&mut out, &s);
            prop_assert_eq!(out, serde_json::to_vec(&s).unwrap());
        }

        /// A line is one JSON object on one line, each field read back as
        /// it was given.
        #[test]
        fn a_line_is_one_json_object_with_every_field(
            text in any::<String>(),
            v6 in any::<bool>(),
            optional in any::<bool>(),
        ) {
            let backend: SocketAddr = match v6 {
                true => "[2001:db8::1]:8443".parse().unwrap(),
                false => "10.0.255.7:65535".parse().unwrap(),
            };
            let bytes = line(&text, Some(backend), optional).to_json(1.5);
            prop_assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1);
            let ends = bytes.ends_with(b"}\n");
            prop_assert!(ends, "the line does not end its object");
            let parsed: Value = serde_json::from_slice(&bytes).unwrap();
            let mut expected = json!({
                "ts": 1.5, "type": "access", "request_id": text, "tenant": text,
                "endpoint": "chat", "model": text, "provider": text,
                "backend": backend.to_string(), "status": 200,
                "prompt_tokens": u64::MAX, "completion_tokens": 7,
                "usage_estimated": optional, "cost_usd": 0.000_012_5,
                "duration": 1234.567, "ttft": null, "attempts": 2, "resumptions": 0,
                "overflow_wait": 0.0, "error": null,
            });
            if optional {
                for (k, v) in [
                    ("trace_id", json!(text)), ("ttft", json!(0.002)),
                    ("error", json!("upstream_timeout")), ("cache", json!("hit")),
                    ("job", json!(text)), ("job_attempt", json!(3)),
                ] {
                    expected[k] = v;
                }
            }
            prop_assert_eq!(parsed, expected);
        }
    }

    #[test]
    fn no_backend_is_null_and_the_fields_keep_their_order() {
        let text = String::from_utf8(line("r", None, false).to_json(2.0)).unwrap();
        assert_eq!(
            text,
            "{\"ts\":2.0,\"type\":\"access\",\"request_id\":\"r\",\"tenant\":\"r\",\
             \"endpoint\":\"chat\",\"model\":\"r\",\"provider\":\"r\",\"backend\":null,\
             \"status\":200,\"prompt_tokens\":18446744073709551615,\"completion_tokens\":7,\
             \"usage_estimated\":false,\"cost_usd\":0.0000125,\"duration\":1234.567,\
             \"ttft\":null,\"attempts\":2,\"resumptions\":0,\"overflow_wait\":0.0,\
             \"error\":null}\n"
        );
    }
}
