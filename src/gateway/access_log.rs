//! The access log: one JSON line per request on stdout.
//!
//! Built from an explicit allow-list of fields (the [`Line`] struct) so no
//! key, prompt, completion or client-chosen path can land in it: the
//! endpoint is a closed name, the model and tenant come from the config.
//!
//! Lines are written off the request path: a request appends its line to
//! a bounded queue (one buffer, no allocation a line), and a thread of its
//! own takes what has queued up and writes it in one `write` every few
//! milliseconds; after a second with no line it sleeps until the next one
//! comes (an idle gateway does not wake it). A line that finds the queue
//! full is dropped and counted (`runestone_access_log_dropped_total`)
//! rather than making the request wait on a slow disk or a full pipe. [`flush`] writes out what is queued
//! when the process stops (graceful shutdown or upgrade).

use crate::lock;
use std::cell::RefCell;
use std::io::{ErrorKind, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lines that may wait for the writer (about 400 bytes each).
const QUEUE_LINES: usize = 16 * 1024;
/// How long the writer rests between writes (a line reaches stdout at most
/// this late).
const PAUSE: Duration = Duration::from_millis(5);
/// Rests with nothing written after which the writer sleeps until a line
/// is queued: a second.
const IDLE_PAUSES: u32 = 200;
/// The capacity a buffer keeps after a burst made it larger.
const KEPT_BYTES: usize = 256 * 1024;
/// The most one `write` takes, in whole lines: what a pipe takes in one
/// piece (POSIX's `PIPE_BUF`), so the old and the new process writing to
/// the same pipe during an upgrade never tear each other's lines, and a
/// write cut short at shutdown ends at a line's end.
const PIECE_BYTES: usize = 4096;

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
    /// The processing tier the tokens were billed at, when priced apart
    /// from the standard one (`flex`, `priority`, `scale`).
    pub service_tier: Option<&'static str>,
}

/// Writes `,"name":` (names are plain), one copy of a constant.
macro_rules! key {
    ($out:expr, $name:literal) => {
        $out.extend_from_slice(concat!(",\"", $name, "\":").as_bytes())
    };
}

impl Line<'_> {
    /// The line as one JSON object: `ts` (Unix seconds) and `"type":
    /// "access"`, then the fields in order, milliseconds for durations, the
    /// optional ones left out when absent (`trace_id`, `cache`, `job`,
    /// `job_attempt`, `service_tier`) or null (`backend`, `ttft`, `error`).
    ///
    /// Written out by hand rather than derived: serde escaped every key and
    /// went through a map for the stamp, 10k instructions a request, most
    /// of what the log cost.
    fn to_json(&self, ts_ms: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"ts\":");
        thousandths(out, ts_ms);
        out.extend_from_slice(b",\"type\":\"access\",\"request_id\":");
        string(out, self.request_id);
        if let Some(trace_id) = self.trace_id {
            key!(out, "trace_id");
            string(out, trace_id);
        }
        key!(out, "tenant");
        string(out, self.tenant);
        key!(out, "endpoint");
        string(out, self.endpoint);
        key!(out, "model");
        string(out, self.model);
        key!(out, "provider");
        string(out, self.provider);
        key!(out, "backend");
        match self.backend {
            Some(SocketAddr::V4(addr)) => {
                for (i, octet) in addr.ip().octets().iter().enumerate() {
                    out.push(if i == 0 { b'"' } else { b'.' });
                    integer(out, *octet);
                }
                out.push(b':');
                integer(out, addr.port());
                out.push(b'"');
            }
            other => value(out, &other),
        }
        key!(out, "status");
        integer(out, self.status);
        key!(out, "prompt_tokens");
        integer(out, self.prompt_tokens);
        key!(out, "completion_tokens");
        integer(out, self.completion_tokens);
        key!(out, "usage_estimated");
        out.extend_from_slice(if self.usage_estimated {
            b"true"
        } else {
            b"false"
        });
        key!(out, "cost_usd");
        value(out, &self.cost_usd);
        key!(out, "duration");
        millis(out, self.duration);
        key!(out, "ttft");
        match self.ttft {
            Some(ttft) => millis(out, ttft),
            None => out.extend_from_slice(b"null"),
        }
        key!(out, "attempts");
        integer(out, self.attempts);
        key!(out, "resumptions");
        integer(out, self.resumptions);
        key!(out, "overflow_wait");
        millis(out, self.overflow_wait);
        key!(out, "error");
        match self.error {
            Some(error) => string(out, error),
            None => out.extend_from_slice(b"null"),
        }
        if let Some(cache) = self.cache {
            key!(out, "cache");
            string(out, cache);
        }
        if let Some(job) = self.job {
            key!(out, "job");
            string(out, job);
        }
        if let Some(attempt) = self.job_attempt {
            key!(out, "job_attempt");
            integer(out, attempt);
        }
        if let Some(tier) = self.service_tier {
            key!(out, "service_tier");
            string(out, tier);
        }
        out.extend_from_slice(b"}\n");
    }
}

/// A duration in milliseconds, to the nearest microsecond (`1234.567`).
fn millis(out: &mut Vec<u8>, d: Duration) {
    let micros = d.as_nanos().saturating_add(500) / 1000;
    thousandths(out, u64::try_from(micros).unwrap_or(u64::MAX));
}

/// `n` thousandths written as serde_json writes the number `n / 1000`
/// (`1234.567`, `12.5`, `3.0`), without the float: the log's stamp and
/// durations were most of its formatting.
fn thousandths(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n / 1000).as_bytes());
    let frac = n % 1000;
    let digits = [
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ];
    // Trailing zeros dropped, one digit kept.
    let len = if frac.is_multiple_of(100) {
        2
    } else if frac.is_multiple_of(10) {
        3
    } else {
        4
    };
    out.extend_from_slice(&digits[..len]);
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

/// An integer as serde_json writes it.
fn integer(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A number, bool, null or string as serde_json writes it (writing to a
/// `Vec` cannot fail).
fn value<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    let _ = serde_json::to_writer(out, v);
}

/// The lines waiting for the writer, and how many.
#[derive(Default)]
struct Queued {
    bytes: Vec<u8>,
    lines: usize,
}

/// The queue, and the writer's own buffer (held while it writes, so lines
/// reach stdout in the order they queued, whoever writes them).
struct Log {
    queued: Mutex<Queued>,
    writing: Mutex<Vec<u8>>,
    /// Lines the writer took and has not written yet.
    in_flight: AtomicUsize,
    /// The last write failed (said once, not every few milliseconds).
    failing: AtomicBool,
    /// The writer sleeps until the next line: the one that queues it
    /// wakes it.
    asleep: AtomicBool,
    /// The writer thread (`None` when it could not be started).
    writer: Option<Thread>,
}

impl Log {
    fn new(writer: Option<Thread>) -> Self {
        Log {
            queued: Mutex::new(Queued::default()),
            writing: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            asleep: AtomicBool::new(false),
            writer,
        }
    }

    /// Lines queued or taken and not written yet.
    fn unwritten(&self) -> usize {
        lock(&self.queued).lines + self.in_flight.load(Ordering::Relaxed)
    }

    /// Queues a line; false (not queued) when [`QUEUE_LINES`] wait.
    fn queue(&self, text: &[u8]) -> bool {
        {
            let mut queued = lock(&self.queued);
            if queued.lines >= QUEUE_LINES {
                return false;
            }
            queued.bytes.extend_from_slice(text);
            queued.lines += 1;
        }
        // Read after the line is in: a writer that went to sleep before
        // it found the queue empty and said so first.
        if self.asleep.load(Ordering::Relaxed) && self.asleep.swap(false, Ordering::AcqRel) {
            if let Some(writer) = &self.writer {
                writer.unpark();
            }
        }
        true
    }

    /// The writer's loop: writes out what has queued every [`PAUSE`], and
    /// sleeps once nothing has come for [`IDLE_PAUSES`] of them.
    fn keep_writing(&self) {
        let mut idle = 0;
        loop {
            std::thread::sleep(PAUSE);
            idle = if self.write_out() { 0 } else { idle + 1 };
            if idle < IDLE_PAUSES {
                continue;
            }
            idle = 0;
            self.asleep.store(true, Ordering::SeqCst);
            // A line queued before this look is written at once; one
            // queued after it sees `asleep` and wakes the thread (an
            // unpark before the park makes the park return at once).
            if lock(&self.queued).lines == 0 {
                std::thread::park();
            }
            self.asleep.store(false, Ordering::SeqCst);
        }
    }

    /// Writes out what has queued, in pieces of whole lines. A stdout
    /// that fails (a full disk) loses the lines, counted as dropped: not
    /// the requests' problem. Whether there was anything to write.
    fn write_out(&self) -> bool {
        let mut batch = lock(&self.writing);
        {
            let mut queued = lock(&self.queued);
            if queued.lines == 0 {
                return false;
            }
            std::mem::swap(&mut *batch, &mut queued.bytes);
            self.in_flight.store(queued.lines, Ordering::Relaxed);
            queued.lines = 0;
        }
        let mut out = std::io::stdout().lock();
        let mut rest = &batch[..];
        while !rest.is_empty() {
            let (piece, after) = rest.split_at(piece_len(rest));
            if let Err(e) = write_whole(&mut out, piece) {
                let lost = memchr::memchr_iter(b'\n', rest).count();
                crate::metrics::ACCESS_LOG_DROPPED.inc_by(lost as u64);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(error = %e, "cannot write the access log to stdout; its lines are dropped");
                }
                break;
            }
            self.failing.store(false, Ordering::Relaxed);
            self.in_flight
                .fetch_sub(memchr::memchr_iter(b'\n', piece).count(), Ordering::Relaxed);
            rest = after;
        }
        let _ = out.flush();
        self.in_flight.store(0, Ordering::Relaxed);
        batch.clear();
        batch.shrink_to(KEPT_BYTES);
        true
    }
}

/// How much of `bytes` (whole lines) the next `write` takes: up to
/// [`PIECE_BYTES`], or a longer line alone.
fn piece_len(bytes: &[u8]) -> usize {
    if bytes.len() <= PIECE_BYTES {
        return bytes.len();
    }
    match memchr::memrchr(b'\n', &bytes[..PIECE_BYTES]) {
        Some(end) => end + 1,
        None => memchr::memchr(b'\n', bytes).map_or(bytes.len(), |end| end + 1),
    }
}

/// Writes all of `piece`; a non-blocking stdout that is full is waited
/// for, as a blocking one is.
fn write_whole(out: &mut impl Write, mut piece: &[u8]) -> std::io::Result<()> {
    while !piece.is_empty() {
        match out.write(piece) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => piece = &piece[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The log (its writer thread started on first use). While lines come
/// the thread does not wait on the queue, so a request queueing its line
/// does not wake it: the request path pays a copy into the queue, no
/// system call (but for the first line after a second without any).
fn log() -> &'static Log {
    static LOG: OnceLock<Log> = OnceLock::new();
    LOG.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(|| log().keep_writing());
        let writer = match spawned {
            Ok(handle) => Some(handle.thread().clone()),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the access log writer; lines wait for the shutdown");
                None
            }
        };
        Log::new(writer)
    })
}

/// Queues one line for stdout; dropped (and counted) when the writer is
/// that far behind.
pub(super) fn write(line: &Line<'_>) {
    let ts_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    // Formatted outside the lock, in a buffer each thread keeps.
    thread_local! {
        static TEXT: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
    }
    TEXT.with_borrow_mut(|text| {
        text.clear();
        line.to_json(ts_ms, text);
        if !log().queue(text) {
            crate::metrics::ACCESS_LOG_DROPPED.inc();
        }
    });
}

/// Writes out every line queued so far (waiting at most `limit`): called
/// once the server has stopped, so a graceful shutdown or upgrade loses
/// none.
pub fn flush(limit: Duration) {
    // On a thread of its own: stdout may be a pipe nobody reads.
    let (done, finished) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("access-log-flush".into())
        .spawn(move || {
            log().write_out();
            let _ = done.send(());
        });
    let written = spawned.is_ok() && finished.recv_timeout(limit).is_ok();
    if !written {
        tracing::error!(
            lines = log().unwritten(),
            "stdout did not take the access log's last lines in time; they are lost"
        );
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
            service_tier: optional.then_some("priority"),
        }
    }

    proptest! {
        /// A stamp or a duration (below 10^15 thousandths: a stamp in
        /// milliseconds for 31,000 years, a duration in microseconds for
        /// 31) is written as serde_json writes the float it used to be.
        #[test]
        fn thousandths_are_written_as_serde_json_writes_the_number(n in 0u64..1_000_000_000_000_000) {
            let mut out = Vec::new();
            thousandths(&mut out, n);
            prop_assert_eq!(out, serde_json::to_vec(&(n as f64 / 1000.0)).unwrap());
        }

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
            let mut bytes = Vec::new();
            line(&text, Some(backend), optional).to_json(1500, &mut bytes);
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
                    ("service_tier", json!("priority")),
                ] {
                    expected[k] = v;
                }
            }
            prop_assert_eq!(parsed, expected);
        }
    }

    #[test]
    fn a_full_queue_refuses_lines_until_written_out() {
        let log = Log::new(None);
        for _ in 0..QUEUE_LINES {
            assert!(log.queue(b"{}\n"));
        }
        assert!(!log.queue(b"{}\n"), "past the bound");
        // What the writer takes frees the queue (its write is stdout's).
        std::mem::take(&mut *lock(&log.queued));
        assert!(log.queue(b"{}\n"));
        assert_eq!(lock(&log.queued).bytes, b"{}\n");
    }

    #[test]
    fn a_write_takes_whole_lines_within_what_a_pipe_takes_whole() {
        let line = |n: usize| [vec![b'x'; n - 1], vec![b'\n']].concat();
        let lines = [line(1000), line(2000), line(1500)].concat();
        assert_eq!(piece_len(&lines), 3000, "the third would pass the bound");
        assert_eq!(piece_len(&lines[3000..]), 1500);
        let long = [line(5000), line(10)].concat();
        assert_eq!(piece_len(&long), 5000, "a longer line goes alone");
        assert_eq!(piece_len(b"no end"), 6);
    }

    #[test]
    fn no_backend_is_null_and_the_fields_keep_their_order() {
        let mut bytes = Vec::new();
        line("r", None, false).to_json(2000, &mut bytes);
        let text = String::from_utf8(bytes).unwrap();
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
