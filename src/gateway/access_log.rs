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

use serde::Serialize;
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
#[derive(Debug, Serialize)]
pub(super) struct Line<'a> {
    pub request_id: &'a str,
    /// The request's trace (with tracing on), to find its spans.
    #[serde(skip_serializing_if = "Option::is_none")]
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
    /// What the response cache did (with `cache:`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<&'static str>,
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
    let stamped = Stamped {
        ts,
        kind: "access",
        line,
    };
    let Ok(mut text) = serde_json::to_vec(&stamped) else {
        return;
    };
    text.push(b'\n');
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
