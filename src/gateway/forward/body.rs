//! Copying an answer to the client as the provider produces it, through a
//! meter that reads its usage (and, for translated providers, translates
//! it) and the redactor that keeps the provider's key out.

use super::{Report, Settle};
use crate::config::ProviderSettings;
use crate::cost::{self, StreamMeter, Usage};
use crate::gateway::client::Client;
use crate::openai::ApiError;
use crate::providers::anthropic::StreamTranslator;
use crate::redact::Redactor;
use crate::upstream::breaker::Outcome;
use crate::upstream::{Backend, Upstreams};
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::protocols::http::client::HttpSession;
use std::time::{Duration, Instant};
use tracing::warn;

/// Whether a response is an SSE stream.
pub(super) fn is_event_stream(header: &ResponseHeader) -> bool {
    header
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// Reads usage from a response on its way to the client.
pub(super) enum Meter {
    /// An error answer: the provider generated nothing. It is held (up to
    /// a bound) and sent whole at the end.
    Error { body: Vec<u8> },
    /// A JSON body, kept (up to a bound) to read its `usage` at the end.
    Json { body: Vec<u8>, seen: usize },
    /// An SSE stream, metered event by event.
    Stream(StreamMeter),
    /// A stream in the provider's own format, translated event by event.
    Translated(StreamTranslator),
}

impl Meter {
    /// The meter for an OpenAI-format answer with this header.
    pub(super) fn for_response(header: &ResponseHeader, strip_usage: bool) -> Self {
        match (header.status.is_success(), is_event_stream(header)) {
            (false, _) => Meter::Error { body: Vec::new() },
            (true, true) => Meter::Stream(StreamMeter::new(strip_usage)),
            (true, false) => Meter::Json {
                body: Vec::new(),
                seen: 0,
            },
        }
    }

    /// Whether the meter edits the body (so its length changes).
    pub(super) fn edits_body(&self) -> bool {
        matches!(self, Meter::Stream(m) if m.strips_usage())
            || matches!(self, Meter::Translated(_) | Meter::Error { .. })
    }

    /// Takes an upstream chunk, returns what to send on.
    fn feed(&mut self, chunk: Bytes) -> Bytes {
        match self {
            Meter::Error { body } => {
                if body.len() + chunk.len() <= cost::MAX_METERED_JSON_BYTES {
                    body.extend_from_slice(&chunk);
                }
                Bytes::new()
            }
            Meter::Json { body, seen } => {
                *seen += chunk.len();
                if *seen <= cost::MAX_METERED_JSON_BYTES {
                    body.extend_from_slice(&chunk);
                }
                chunk
            }
            Meter::Stream(meter) => meter.feed(chunk),
            Meter::Translated(translator) => translator.feed(&chunk),
        }
    }

    /// The end of the upstream body: what is still to be sent.
    fn finish(&mut self) -> Bytes {
        match self {
            Meter::Stream(meter) => meter.finish(),
            Meter::Error { body } => Bytes::from(std::mem::take(body)),
            _ => Bytes::new(),
        }
    }

    /// What the answer used, read or (when the provider said nothing, or the
    /// answer broke off) estimated.
    fn usage(&self, prompt_estimate: u64) -> Usage {
        match self {
            Meter::Error { .. } => Usage::default(),
            Meter::Json { body, seen } if *seen <= cost::MAX_METERED_JSON_BYTES => {
                cost::usage_from_json(body, prompt_estimate)
            }
            Meter::Json { seen, .. } => Usage {
                prompt_tokens: prompt_estimate,
                completion_tokens: (*seen as u64).div_ceil(4),
                cached_tokens: 0,
                estimated: true,
            },
            Meter::Stream(meter) => meter.usage(prompt_estimate),
            Meter::Translated(translator) => translator.usage().unwrap_or(Usage {
                prompt_tokens: prompt_estimate,
                completion_tokens: translator.generated_bytes().div_ceil(4),
                cached_tokens: 0,
                estimated: true,
            }),
        }
    }
}

/// How copying the response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyEnd {
    Complete,
    ClientGone,
    ProviderBroke,
}

/// Copies the response body chunk by chunk, as the provider produces it,
/// through the meter and the redactor.
pub(super) struct Copy<'a> {
    pub upstreams: &'a Upstreams,
    pub is_stream: bool,
    pub provider: &'a ProviderSettings,
    /// The provider's `content-length`, when it sent one.
    pub declared_len: Option<usize>,
    /// Longest gap between two chunks.
    pub idle: Duration,
    /// End of the attempt's total time.
    pub deadline: Instant,
    /// The backend answering, and how long its first byte took.
    pub backend: &'a Backend,
    pub ttfb: Duration,
    /// Prompt tokens estimated from the request body.
    pub prompt_estimate: u64,
    /// For the logs.
    pub request_id: &'a str,
}

impl Copy<'_> {
    /// Copies the whole answer; whether it ended complete (its connection
    /// may go back to the pool). The report's usage is set and the request
    /// settled however it ended.
    pub(super) async fn run(
        &self,
        client: &mut dyn Client,
        upstream: &mut HttpSession,
        report: &mut Report,
        settle: &mut dyn Settle,
        meter: &mut Meter,
        redactor: &mut Redactor,
    ) -> bool {
        let mut settled = false;
        let end = self
            .copy(
                client,
                upstream,
                report,
                settle,
                meter,
                redactor,
                &mut settled,
            )
            .await;
        if !settled {
            // Not settled before the end (a broken or abandoned body): what
            // the meter saw is what the request used.
            report.usage = Some(meter.usage(self.prompt_estimate));
            let outcome = match end {
                BodyEnd::Complete => Outcome::Success,
                BodyEnd::ProviderBroke => Outcome::Failure,
                BodyEnd::ClientGone => Outcome::Neutral,
            };
            self.upstreams
                .record_outcome(self.backend, outcome, Some(self.ttfb));
        }
        end == BodyEnd::Complete
    }

    #[allow(clippy::too_many_arguments)]
    async fn copy(
        &self,
        client: &mut dyn Client,
        upstream: &mut HttpSession,
        report: &mut Report,
        settle: &mut dyn Settle,
        meter: &mut Meter,
        redactor: &mut Redactor,
        settled: &mut bool,
    ) -> BodyEnd {
        let mut received = 0;
        loop {
            let gap = self
                .idle
                .min(self.deadline.saturating_duration_since(Instant::now()));
            let read = tokio::select! {
                read = tokio::time::timeout(gap, upstream.read_response_body()) => read,
                _ = client.gone() => return BodyEnd::ClientGone,
            };
            match read {
                Ok(Ok(Some(chunk))) => {
                    received += chunk.len();
                    let out = redactor.feed(meter.feed(chunk));
                    if self.declared_len.is_some_and(|n| received >= n) {
                        // The client knows the body is whole once it has
                        // these bytes: settle first, so a client that sends
                        // its next request at once finds its slot free.
                        self.settle(report, settle, meter, settled).await;
                    }
                    if !out.is_empty() {
                        report.first_byte_at.get_or_insert_with(Instant::now);
                        if !client.send_body(out, false).await {
                            return BodyEnd::ClientGone;
                        }
                    }
                }
                Ok(Ok(None)) => {
                    let rest = redactor.feed(meter.finish());
                    let held = redactor.finish();
                    let rest = if held.is_empty() {
                        rest
                    } else {
                        Bytes::from([&rest[..], &held[..]].concat())
                    };
                    self.settle(report, settle, meter, settled).await;
                    client.send_body(rest, true).await;
                    return BodyEnd::Complete;
                }
                Ok(Err(e)) => {
                    warn!(request_id = %self.request_id, provider = %self.provider.name, error = %e, "provider broke off the response");
                    self.end_broken(
                        client,
                        format!(
                            "The provider '{}' broke off the response.",
                            self.provider.name
                        ),
                    )
                    .await;
                    report.error_reason = Some("provider_stream_broken");
                    return BodyEnd::ProviderBroke;
                }
                Err(_) => {
                    warn!(request_id = %self.request_id, provider = %self.provider.name, gap = ?gap, "provider stalled mid-response");
                    self.end_broken(
                        client,
                        format!("The provider '{}' stalled for {gap:?}.", self.provider.name),
                    )
                    .await;
                    report.error_reason = Some("provider_stream_broken");
                    return BodyEnd::ProviderBroke;
                }
            }
        }
    }

    /// Ends a response the provider did not finish: a stream gets an
    /// in-band error event and a clean end (no `[DONE]`, so SDKs raise); a
    /// JSON body cannot be repaired, so the connection is closed and the
    /// client sees the truncation.
    async fn end_broken(&self, client: &mut dyn Client, message: String) {
        if self.is_stream {
            let event = ApiError::upstream_error(message).sse_event();
            client.send_body(event, true).await;
        } else {
            client.abort();
        }
    }

    /// The whole answer is in hand: settle the admission and tell the
    /// breaker, before the client can see the end of the response (so its
    /// next request finds the slot free and the breaker up to date).
    async fn settle(
        &self,
        report: &mut Report,
        settle: &mut dyn Settle,
        meter: &Meter,
        settled: &mut bool,
    ) {
        if std::mem::replace(settled, true) {
            return;
        }
        report.usage = Some(meter.usage(self.prompt_estimate));
        settle.settle(report).await;
        self.upstreams
            .record_outcome(self.backend, Outcome::Success, Some(self.ttfb));
    }
}
