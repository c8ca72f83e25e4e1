//! The exporter: a bounded queue of finished spans, and a thread that
//! batches them and POSTs each batch to the collector.
//!
//! A request hands its spans over with `try_send` and never waits: a full
//! queue drops them (counted). The thread sends a batch when
//! [`BATCH_SPANS`] have queued or [`SCHEDULE`] has passed, one request at
//! a time, each bounded by [`EXPORT_TIMEOUT`]; a failed export drops its
//! batch (counted, logged at most once a minute), so a collector that is
//! down costs the gateway nothing but those spans.

use super::{otlp, Span};
use crate::config::TelemetrySettings;
use crate::metrics;
use bytes::Bytes;
use pingora::connectors::http::v1::Connector;
use pingora::connectors::ConnectorOptions;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Spans that may wait for the exporter (a few hundred bytes each).
const QUEUE_SPANS: usize = 8192;
/// The most spans in one export request.
const BATCH_SPANS: usize = 512;
/// The longest a span waits for its batch to fill.
const SCHEDULE: Duration = Duration::from_secs(1);
/// Bound on one export request (connect, send, answer).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
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
    Spans(Vec<Span>),
    /// Export everything before this, then say so.
    Flush(std::sync::mpsc::Sender<()>),
}

struct Exporter {
    queue: SyncSender<Message>,
    settings: Settings,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// Tracing's settings, when the config has a `telemetry:` section (and
/// [`start`] has run): `None` means no spans are built at all.
pub fn settings() -> Option<Settings> {
    EXPORTER.get().map(|e| e.settings)
}

/// Starts the exporter for `config` (once per process), its connections
/// made as `options` say (the gateway's TLS settings).
pub fn start(config: &TelemetrySettings, options: Option<ConnectorOptions>) {
    if EXPORTER.get().is_some() {
        return;
    }
    let (queue, rx) = sync_channel(QUEUE_SPANS);
    let target = Target {
        config: config.clone(),
        options,
    };
    let spawned = std::thread::Builder::new()
        .name("otlp-export".into())
        .spawn(move || target.run(rx));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the trace exporter; no spans are exported");
        return;
    }
    let _ = EXPORTER.set(Exporter {
        queue,
        settings: Settings {
            sample_ratio: config.sample_ratio,
            capture_content: config.capture_content,
        },
    });
    tracing::info!(endpoint = %format!("{}{}", config.traces_url.authority, config.traces_url.path),
                   "traces are exported over OTLP/HTTP");
}

/// Queues a request's spans for export; dropped (and counted) when the
/// exporter is that far behind.
pub fn submit(spans: Vec<Span>) {
    let Some(exporter) = EXPORTER.get() else {
        return;
    };
    let count = spans.len() as u64;
    if exporter.queue.try_send(Message::Spans(spans)).is_err() {
        metrics::TELEMETRY_DROPPED
            .with_label_values(&["queue_full"])
            .inc_by(count);
    }
}

/// Exports every span queued so far (waiting at most `limit`): called once
/// the server has stopped, so a graceful shutdown or upgrade loses none
/// the collector would take.
pub fn flush(limit: Duration) {
    let Some(exporter) = EXPORTER.get() else {
        return;
    };
    let (ack, done) = std::sync::mpsc::channel();
    if exporter.queue.send(Message::Flush(ack)).is_ok() {
        let _ = done.recv_timeout(limit);
    }
}

/// Where the exporter sends, and how it connects.
struct Target {
    config: TelemetrySettings,
    options: Option<ConnectorOptions>,
}

impl Target {
    /// The exporter thread: gathers spans into batches and sends each.
    fn run(self, rx: Receiver<Message>) {
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
        let connector = Connector::new(self.options.clone());
        let mut sender = Sender {
            target: &self,
            connector: &connector,
            runtime: &runtime,
            last_warning: None,
        };
        let mut batch = Vec::with_capacity(BATCH_SPANS);
        let mut due = Instant::now() + SCHEDULE;
        loop {
            let wait = due.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(Message::Spans(spans)) => {
                    batch.extend(spans);
                    if batch.len() >= BATCH_SPANS {
                        sender.send(&mut batch);
                        due = Instant::now() + SCHEDULE;
                    }
                }
                Ok(Message::Flush(ack)) => {
                    while let Ok(message) = rx.try_recv() {
                        if let Message::Spans(spans) = message {
                            batch.extend(spans);
                        }
                    }
                    sender.send(&mut batch);
                    let _ = ack.send(());
                }
                Err(RecvTimeoutError::Timeout) => {
                    sender.send(&mut batch);
                    due = Instant::now() + SCHEDULE;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    sender.send(&mut batch);
                    return;
                }
            }
        }
    }
}

/// Sends batches from the exporter thread.
struct Sender<'a> {
    target: &'a Target,
    connector: &'a Connector,
    runtime: &'a tokio::runtime::Runtime,
    last_warning: Option<Instant>,
}

impl Sender<'_> {
    /// Exports `batch` (in requests of at most [`BATCH_SPANS`]) and
    /// empties it.
    fn send(&mut self, batch: &mut Vec<Span>) {
        for chunk in batch.chunks(BATCH_SPANS) {
            let body = Bytes::from(otlp::encode(chunk, &self.target.config.service_name));
            match self.runtime.block_on(self.post(body)) {
                Ok(()) => metrics::TELEMETRY_EXPORTED.inc_by(chunk.len() as u64),
                Err(error) => {
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
            }
        }
        batch.clear();
    }

    /// One export request; `Err` says what went wrong (never a header's
    /// value).
    async fn post(&self, body: Bytes) -> Result<(), String> {
        let config = &self.target.config;
        let url = &config.traces_url;
        let mut headers: Vec<(&str, &str)> = config
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.expose()))
            .collect();
        headers.push(("content-type", "application/x-protobuf"));
        let status = crate::outbound::post(
            self.connector,
            url,
            &url.path,
            &headers,
            body,
            EXPORT_TIMEOUT,
        )
        .await?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!(
                "the collector at {} answered {status}",
                url.authority
            ))
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
