//! The exporter: a bounded queue of finished spans, and a thread that
//! batches them and POSTs each batch to the collector.
//!
//! A request hands its spans over with `try_send` and never waits: a full
//! queue ([`QUEUE_REQUESTS`] requests' spans, or [`QUEUE_BYTES`] of them)
//! drops them (counted). The thread sends a batch when [`BATCH_SPANS`] or
//! [`BATCH_BYTES`] have queued or [`SCHEDULE`] has passed, one request at
//! a time, each bounded by [`EXPORT_TIMEOUT`]; a collector that answers
//! 429, 502, 503 or 504 is asked again (twice, after a pause), any other
//! failure drops the batch (counted, logged at most once a minute). A
//! collector that is down costs the gateway nothing but those spans.
//!
//! The thread starts with the first spans, not with [`start`]: a daemon
//! forks after start-up, and a thread does not survive the fork.

use super::{otlp, Span};
use crate::config::TelemetrySettings;
use crate::connections::Connections;
use crate::metrics;
use bytes::Bytes;
use pingora::connectors::ConnectorOptions;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Requests whose spans may wait for the exporter.
const QUEUE_REQUESTS: usize = 8192;
/// The most bytes of spans (their strings) that may wait.
const QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// The most spans, and bytes of them, in one export request.
const BATCH_SPANS: usize = 512;
const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// The longest a span waits for its batch to fill.
const SCHEDULE: Duration = Duration::from_secs(1);
/// How often the exporter looks at its queue.
const POLL: Duration = Duration::from_millis(20);
/// Bound on one export request (connect, send, answer).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pauses before asking a collector that said "later" again.
const RETRY_PAUSES: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(2)];
/// The least time between two warnings about failed exports.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What the request path needs to know about tracing.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// The share of new traces kept.
    pub sample_ratio: f64,
    /// Prompts and completions as span events.
    pub capture_content: bool,
}

enum Message {
    Spans(Vec<Span>, usize),
    /// Export everything before this, then say so.
    Flush(std::sync::mpsc::Sender<()>),
}

/// The exporter as configured; its thread and queue start on first use.
struct Exporter {
    target: Target,
    settings: Settings,
    queue: OnceLock<Option<SyncSender<Message>>>,
    /// Bytes of spans in the queue.
    queued_bytes: AtomicUsize,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// Tracing's settings, when the config has a `telemetry:` section (and
/// [`start`] has run): `None` means no spans are built at all.
pub fn settings() -> Option<Settings> {
    EXPORTER.get().map(|e| e.settings)
}

/// Sets the exporter up for `config` (once per process), its connections
/// made as `options` say (the gateway's TLS settings).
pub fn start(config: &TelemetrySettings, options: Option<ConnectorOptions>) {
    let exporter = Exporter {
        target: Target {
            config: config.clone(),
            options,
        },
        settings: Settings {
            sample_ratio: config.sample_ratio,
            capture_content: config.capture_content,
        },
        queue: OnceLock::new(),
        queued_bytes: AtomicUsize::new(0),
    };
    if EXPORTER.set(exporter).is_ok() {
        // The host only: a collector's URL path may be its credential.
        tracing::info!(collector = %config.traces_url.authority, "traces are exported over OTLP/HTTP");
    }
}

impl Exporter {
    /// The queue to the exporter thread, started on first use.
    fn queue(&'static self) -> Option<&'static SyncSender<Message>> {
        self.queue
            .get_or_init(|| {
                let (tx, rx) = sync_channel(QUEUE_REQUESTS);
                let spawned = std::thread::Builder::new()
                    .name("otlp-export".into())
                    .spawn(move || self.target.run(rx, &self.queued_bytes));
                match spawned {
                    Ok(_) => Some(tx),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the trace exporter; no spans are exported");
                        None
                    }
                }
            })
            .as_ref()
    }
}

/// Queues a request's spans for export; dropped (and counted) when the
/// exporter is that far behind.
pub fn submit(spans: Vec<Span>) {
    let Some(exporter) = EXPORTER.get() else {
        return;
    };
    let count = spans.len() as u64;
    let bytes: usize = spans.iter().map(Span::weight).sum();
    let dropped = || {
        metrics::TELEMETRY_DROPPED
            .with_label_values(&["queue_full"])
            .inc_by(count);
    };
    let Some(queue) = exporter.queue() else {
        return dropped();
    };
    let queued = &exporter.queued_bytes;
    if queued.fetch_add(bytes, Ordering::Relaxed) + bytes > QUEUE_BYTES {
        queued.fetch_sub(bytes, Ordering::Relaxed);
        return dropped();
    }
    if queue.try_send(Message::Spans(spans, bytes)).is_err() {
        queued.fetch_sub(bytes, Ordering::Relaxed);
        dropped();
    }
}

/// Exports every span queued so far (waiting at most `limit` in all):
/// called once the server has stopped, so a graceful shutdown or upgrade
/// loses none the collector would take.
pub fn flush(limit: Duration) {
    let deadline = Instant::now() + limit;
    let Some(Some(queue)) = EXPORTER.get().and_then(|e| e.queue.get()) else {
        // Nothing was ever queued.
        return;
    };
    let (ack, done) = std::sync::mpsc::channel();
    let mut message = Message::Flush(ack);
    loop {
        match queue.try_send(message) {
            Ok(()) => break,
            Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                message = back;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => return,
        }
    }
    let _ = done.recv_timeout(deadline.saturating_duration_since(Instant::now()));
}

/// Where the exporter sends, and how it connects.
struct Target {
    config: TelemetrySettings,
    options: Option<ConnectorOptions>,
}

impl Target {
    /// The exporter thread: gathers spans into batches and sends each. It
    /// runs only when the cores have nothing else to do (SCHED_IDLE): under
    /// saturation spans wait (and, past the queue's bound, are dropped),
    /// requests never do.
    fn run(&self, rx: Receiver<Message>, queued_bytes: &AtomicUsize) {
        use thread_priority::unix::{
            set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
            ThreadSchedulePolicy,
        };
        let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
        if let Err(e) = set_thread_priority_and_policy(
            thread_native_id(),
            thread_priority::ThreadPriority::Min,
            idle,
        ) {
            tracing::warn!(error = ?e, "the trace exporter runs at normal priority");
        }
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the trace exporter's runtime; no spans are exported");
                return;
            }
        };
        let connections = Connections::new(self.options.clone());
        let mut sender = Sender {
            target: self,
            connections: &connections,
            runtime: &runtime,
            last_warning: None,
        };
        let mut batch = Batch::default();
        let mut due = Instant::now() + SCHEDULE;
        // The thread never waits on the queue itself, so a request handing
        // its spans over never has to wake it: it looks every POLL.
        loop {
            let mut acks = Vec::new();
            let mut open = true;
            while !batch.full() {
                match rx.try_recv() {
                    Ok(Message::Spans(spans, bytes)) => {
                        queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                        batch.add(spans, bytes);
                    }
                    Ok(Message::Flush(ack)) => acks.push(ack),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            if batch.full() || !acks.is_empty() || !open || Instant::now() >= due {
                sender.send(&mut batch);
                due = Instant::now() + SCHEDULE;
            }
            for ack in acks {
                let _ = ack.send(());
            }
            if !open {
                return;
            }
            if !batch.full() {
                std::thread::sleep(POLL);
            }
        }
    }
}

/// Spans gathered for export.
#[derive(Default)]
struct Batch {
    spans: Vec<Span>,
    bytes: usize,
}

impl Batch {
    fn add(&mut self, spans: Vec<Span>, bytes: usize) {
        self.spans.extend(spans);
        self.bytes += bytes;
    }

    fn full(&self) -> bool {
        self.spans.len() >= BATCH_SPANS || self.bytes >= BATCH_BYTES
    }
}

/// Sends batches from the exporter thread.
struct Sender<'a> {
    target: &'a Target,
    connections: &'a Connections,
    runtime: &'a tokio::runtime::Runtime,
    last_warning: Option<Instant>,
}

/// Why an export failed, and whether the collector asked to be asked
/// again.
struct Failed {
    message: String,
    retry: bool,
}

impl Sender<'_> {
    /// Exports `batch` (in requests of at most [`BATCH_SPANS`] spans and
    /// about [`BATCH_BYTES`]) and empties it.
    fn send(&mut self, batch: &mut Batch) {
        let mut spans = std::mem::take(&mut batch.spans).into_iter().peekable();
        batch.bytes = 0;
        while spans.peek().is_some() {
            let mut chunk = Vec::new();
            let mut bytes = 0;
            while let Some(span) =
                spans.next_if(|_| chunk.len() < BATCH_SPANS && bytes < BATCH_BYTES)
            {
                bytes += span.weight();
                chunk.push(span);
            }
            self.export(&chunk);
        }
    }

    /// One batch, asked again while the collector says "later".
    fn export(&mut self, chunk: &[Span]) {
        let body = Bytes::from(otlp::encode(chunk, &self.target.config.service_name));
        let mut pauses = RETRY_PAUSES.iter();
        let error = loop {
            match self.runtime.block_on(self.post(body.clone())) {
                Ok(()) => {
                    metrics::TELEMETRY_EXPORTED.inc_by(chunk.len() as u64);
                    return;
                }
                Err(failed) => match pauses.next() {
                    Some(pause) if failed.retry => std::thread::sleep(*pause),
                    _ => break failed.message,
                },
            }
        };
        metrics::TELEMETRY_DROPPED
            .with_label_values(&["export_failed"])
            .inc_by(chunk.len() as u64);
        if self
            .last_warning
            .is_none_or(|at| at.elapsed() >= WARN_EVERY)
        {
            self.last_warning = Some(Instant::now());
            tracing::warn!(spans = chunk.len(), error = %error,
                           "trace export failed; the spans are dropped (warned at most once a minute)");
        }
    }

    /// One export request.
    async fn post(&self, body: Bytes) -> Result<(), Failed> {
        let config = &self.target.config;
        let url = &config.traces_url;
        let mut headers: Vec<(&str, &str)> = config
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.expose()))
            .collect();
        headers.push(("content-type", "application/x-protobuf"));
        let status = crate::outbound::post(
            self.connections,
            url,
            &url.path,
            &headers,
            body,
            EXPORT_TIMEOUT,
        )
        .await
        .map_err(|message| Failed {
            message,
            retry: false,
        })?;
        match status {
            200..=299 => Ok(()),
            _ => Err(Failed {
                message: format!("the collector at {} answered {status}", url.authority),
                retry: matches!(status, 429 | 502 | 503 | 504),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Kind, Span, Value};
    use super::otlp;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn a_span_encodes_to_the_protocol_fields() {
        use prost::Message;
        let span = Span {
            trace_id: [7; 16],
            span_id: [8; 8],
            parent: Some([9; 8]),
            remote_parent: true,
            trace_state: Some("vendor=a".into()),
            name: "chat gpt-4o-mini".into(),
            kind: Kind::Server,
            start: UNIX_EPOCH + Duration::from_secs(1),
            end: UNIX_EPOCH + Duration::from_secs(2),
            attributes: vec![("gen_ai.usage.input_tokens", Value::Int(12))],
            events: Vec::new(),
            links: Vec::new(),
            error: Some("upstream_error".into()),
        };
        let body = otlp::encode(&[span], "svc");
        let decoded = otlp::ExportTraceServiceRequest::decode(&body[..]).unwrap();
        let resource = &decoded.resource_spans[0];
        let service = &resource.resource.as_ref().unwrap().attributes[0];
        assert_eq!(service.key, "service.name");
        let span = &resource.scope_spans[0].spans[0];
        assert_eq!(span.trace_id, vec![7; 16]);
        assert_eq!(span.parent_span_id, vec![9; 8]);
        assert_eq!(span.kind, 2);
        assert_eq!(span.start_time_unix_nano, 1_000_000_000);
        assert_eq!(span.flags, 0x301);
        assert_eq!(span.status.as_ref().unwrap().code, 2);
        assert_eq!(span.attributes[0].key, "gen_ai.usage.input_tokens");
    }
}
