//! Forwarding one request to a provider through Pingora's connector, with
//! failover.
//!
//! A [`Forwarder`] takes what forwarding needs (the upstreams, the
//! connection pool, the failover policy), an [`Exchange`] saying what to
//! forward, and fills a [`Report`] of what happened: who served, after how
//! many attempts, what was used. Which backend comes next and whether a
//! failure is retried is [`crate::upstream::failover`]'s decision; one
//! attempt is [`attempt`]; copying the answer through the meters is
//! [`body`]; the headers each way are [`headers`].
//!
//! The body is in hand, so an attempt that fails before anything reached the
//! client (connect error or timeout, no response header in time, a 5xx, the
//! provider's own 429, the provider refusing the gateway's key) moves to the
//! next eligible backend with the whole body replayed, then to the model's
//! fallbacks in order, up to `failover.max_attempts` attempts. Every outcome
//! feeds the backend's circuit breaker.
//!
//! Once the response header has gone to the client the answer is streamed
//! chunk by chunk as the provider produces it, each gap bounded by the
//! provider's idle timeout. A chat stream the provider breaks off or stalls
//! is continued on the next eligible deployment and spliced into the same
//! client stream ([`resume`]); one that cannot be ends with an in-band SSE
//! error event and no `[DONE]`. Either way the break counts as a failure of
//! the deployment.

mod attempt;
mod body;
mod decode;
pub(super) mod headers;
pub(crate) mod resume;

use super::client::Client;
use crate::config::FailoverSettings;
use crate::config::ModelRoute;
use crate::connections::Connections;
use crate::cost::Usage;
use crate::openai::{ApiError, Endpoint};
use crate::telemetry::TraceContext;
use crate::upstream::failover::{Attempted, Failover, Next, Step};
use crate::upstream::Upstreams;
use async_trait::async_trait;
use bytes::Bytes;
use http::HeaderValue;
use resume::{Continuation, Resumable};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::warn;

/// Forwards requests to providers: the upstreams, the connection pool and
/// the failover policy.
pub(crate) struct Forwarder {
    pub(crate) upstreams: Arc<Upstreams>,
    /// Connections to the providers, kept between requests.
    pub(crate) connections: Connections,
    /// The failover policy.
    pub(crate) policy: FailoverSettings,
}

/// How a provider is called, beyond the endpoint's path.
pub(crate) struct Call<'a> {
    pub method: http::Method,
    /// Path after the endpoint's own (`/{id}/cancel`), already
    /// percent-encoded.
    pub tail: &'a str,
    /// The client's query string, passed on.
    pub query: Option<&'a str>,
    /// The body's content type.
    pub content_type: HeaderValue,
}

impl Call<'_> {
    /// A JSON body POSTed to the endpoint's path: how most endpoints are
    /// called.
    pub(crate) fn post_json() -> Self {
        Call {
            method: http::Method::POST,
            tail: "",
            query: None,
            content_type: HeaderValue::from_static("application/json"),
        }
    }
}

/// What to forward.
pub(crate) struct Exchange<'a> {
    pub endpoint: Endpoint,
    /// How the provider is called.
    pub call: Call<'a>,
    /// Only this provider (index in the config) may serve: the one holding
    /// a stored response the request names.
    pub pin: Option<usize>,
    /// What the answer used is billed (false for reading a stored
    /// response: it was billed when created).
    pub bills: bool,
    /// The requested route first, then its fallbacks the tenant may use.
    pub routes: Vec<(usize, &'a ModelRoute)>,
    /// The requested route's context fallbacks the tenant may use, for a
    /// prompt too long for it.
    pub context_routes: Vec<(usize, &'a ModelRoute)>,
    /// The client asked for a stream (`stream: true`): an answer in the
    /// other form is none its SDK can read.
    pub stream: bool,
    /// A chat stream of one choice without log probabilities: one that can
    /// be continued elsewhere if it breaks (when the model allows it).
    pub resumable: bool,
    /// The upstream body for a provider's model name.
    pub body_for: &'a (dyn Fn(&str) -> Bytes + Sync),
    /// The request id sent upstream and to the client.
    pub request_id: &'a str,
    /// The gateway asked for `include_usage` on the client's behalf: take
    /// the usage chunk out again.
    pub strip_usage: bool,
    /// What the gateway counts when a provider reports no usage.
    pub estimate: &'a crate::cost::Estimate,
    /// The tenant's limits after admission, for the answer's
    /// `x-ratelimit-*` headers.
    pub rate_limits: crate::limits::RateLimitState,
    /// The request's trace, when tracing is on: every attempt sends the
    /// provider a `traceparent` naming its own span, and a sampled trace
    /// records its attempts and answer in the report.
    pub trace: Option<&'a TraceContext>,
}

impl Exchange<'_> {
    /// Whether the attempts and the answer are recorded for a trace.
    fn traced(&self) -> bool {
        self.trace.is_some_and(|t| t.sampled)
    }
}

/// One attempt against a deployment, for its trace span.
#[derive(Debug)]
pub(crate) struct AttemptRecord {
    /// The attempt's span (named as parent in its `traceparent`).
    pub span_id: [u8; 8],
    pub started: Instant,
    pub ended: Instant,
    /// Where: route and target (in the config), provider, backend.
    pub route: usize,
    pub target: usize,
    pub provider: usize,
    pub backend: SocketAddr,
    /// The provider's status, when it answered.
    pub status: Option<u16>,
    /// Why it failed (a `runestone_errors_total` reason), if it did.
    pub error: Option<&'static str>,
    /// What came next: `answered`, `failed_over`, `retried` or `gave_up`.
    pub next: &'static str,
}

/// What a traced answer said about itself: its id, the model that
/// generated it, why it stopped, and (when content is captured) its text.
#[derive(Debug, Default)]
pub(crate) struct AnswerDetails {
    pub id: Option<String>,
    pub model: Option<String>,
    pub finish_reasons: Vec<String>,
    pub completion: Option<String>,
}

/// The longest id, model name or finish reason taken from an answer into a
/// trace (longer ones are left out).
const MAX_DETAIL: usize = 256;

impl AnswerDetails {
    /// What the trace may keep: every string redacted of the provider's key
    /// (a provider that echoes it in its model name or finish reason is not
    /// put in a span), ids, models and finish reasons of a sane length.
    pub(crate) fn redacted(self, redactor: &crate::redact::Redactor) -> Self {
        // As read out of the answer's JSON: a collector that keeps spans
        // as JSON writes them again (see `Redactor::redact_decoded`).
        let clean = |text: String| redactor.redact_decoded(&text);
        let short = |text: String| (text.len() <= MAX_DETAIL).then(|| clean(text));
        AnswerDetails {
            id: self.id.and_then(short),
            model: self.model.and_then(short),
            finish_reasons: self.finish_reasons.into_iter().filter_map(short).collect(),
            completion: self.completion.map(clean),
        }
    }
}

/// What happened to a forwarded request.
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// Attempts made against backends.
    pub attempts: u32,
    /// The route (index in the config) that served, or was last tried.
    pub route: Option<usize>,
    /// Its target that served (or last failed), within the route.
    pub target: Option<usize>,
    /// The provider of that target.
    pub provider: Option<usize>,
    /// The backend connected to.
    pub backend: Option<SocketAddr>,
    /// Time spent waiting on providers, over all attempts.
    pub upstream_time: Duration,
    /// When the first body byte went to the client.
    pub first_byte_at: Option<Instant>,
    /// Usage read from (or estimated for) the answer.
    pub usage: Option<Usage>,
    /// The processing tier the request asked for (`service_tier`): what
    /// its tokens are billed at when the answer does not say.
    pub requested_tier: Option<crate::cost::ServiceTier>,
    /// A `runestone_errors_total` reason found after the answer started
    /// (`provider_stream_broken`, `client_closed`).
    pub error_reason: Option<&'static str>,
    /// Streams that broke after reaching the client and were continued
    /// elsewhere: what each attempt used, where (route, target), billed
    /// with the answer.
    pub earlier: Vec<(Option<usize>, Option<usize>, Usage)>,
    /// Continuations attempted after a stream broke.
    pub resumptions: u32,
    /// The Responses API response the answer created (its `id`).
    pub response_id: Option<String>,
    /// The status the provider answered the current attempt with.
    pub upstream_status: Option<u16>,
    /// For a sampled trace: every attempt, stream breaks and resumptions
    /// (and when), and what the answer said about itself.
    pub attempt_log: Vec<AttemptRecord>,
    pub stream_events: Vec<(&'static str, Instant)>,
    pub answer: Option<AnswerDetails>,
}

impl Report {
    /// What the request used over all its attempts.
    pub(crate) fn total_usage(&self) -> Usage {
        self.earlier
            .iter()
            .map(|(_, _, usage)| *usage)
            .chain(self.usage)
            .fold(Usage::default(), Usage::plus)
    }

    /// The client went away before its answer was whole (unless the
    /// answer had already failed otherwise).
    pub(crate) fn client_closed(&mut self) {
        self.error_reason.get_or_insert(client_gone_reason());
    }

    /// The usage of earlier attempts, summed.
    fn earlier_usage(&self) -> Usage {
        self.earlier
            .iter()
            .map(|(_, _, usage)| *usage)
            .fold(Usage::default(), Usage::plus)
    }
}

/// The `runestone_errors_total` reason of a request whose client went
/// away before its answer was whole.
pub(crate) const CLIENT_CLOSED: &str = "client_closed";

/// The `runestone_errors_total` reason of a request the gateway ended as
/// its grace period ran out (see [`crate::gateway::client::end_requests`]).
pub(crate) const GATEWAY_STOPPING: &str = "gateway_stopping";

/// Why a request's client is gone: it went away ([`CLIENT_CLOSED`]), or
/// the gateway ended it as its grace period ran out ([`GATEWAY_STOPPING`]).
pub(crate) fn client_gone_reason() -> &'static str {
    if super::client::requests_ended() {
        GATEWAY_STOPPING
    } else {
        CLIENT_CLOSED
    }
}

/// The `runestone_errors_total` reason of a stream whose attempt ran out
/// of time while its client was slow to take it.
pub(crate) const CLIENT_TOO_SLOW: &str = "client_too_slow";

/// Settles the request's admission once its answer is whole, before the
/// client sees its end (so a client that sends its next request at once
/// finds its slot free). Called at most once, with the report so far.
#[async_trait]
pub(crate) trait Settle: Send {
    /// The answer is whole: account for `report.usage`.
    async fn settle(&mut self, report: &Report);
}

/// Why an attempt failed, as a `runestone_errors_total` reason (`None`
/// when it answered).
fn failure_reason(attempted: &Attempted) -> Option<&'static str> {
    match attempted {
        Attempted::Answered => None,
        Attempted::ClientGone => Some(client_gone_reason()),
        Attempted::StreamBroken(_) => Some("provider_stream_broken"),
        Attempted::Retryable { error, .. }
        | Attempted::RateLimited(error)
        | Attempted::ContextTooLong(error)
        | Attempted::Final(error) => Some(error.reason()),
    }
}

/// Counts a resumption of the exchange's stream.
fn resumption(exchange: &Exchange<'_>, outcome: &str) {
    let model = exchange.routes.first().map_or("", |(_, r)| r.name.as_str());
    crate::metrics::STREAM_RESUMPTIONS
        .with_label_values(&[model, outcome])
        .inc();
}

impl Forwarder {
    /// Ends the request with `error`: the client's answer when nothing has
    /// gone to it yet, else an in-band event that ends its stream.
    async fn end(
        &self,
        client: &mut Resumable<'_>,
        exchange: &Exchange<'_>,
        report: &mut Report,
        settle: &mut dyn Settle,
        error: ApiError,
    ) -> Result<(), ApiError> {
        if !client.started() {
            return Err(error);
        }
        // Settled before the client sees the end, as a whole answer is: its
        // next request (or a read of its usage) finds it.
        settle.settle(report).await;
        if report.resumptions > 0 {
            resumption(exchange, "failed");
        }
        report.error_reason = Some("provider_stream_broken");
        let message = format!(
            "The stream broke off and could not be resumed: {}",
            error.message
        );
        client
            // (Only chat completion streams are resumed.)
            .fail(ApiError::upstream_error(message).sse_event())
            .await;
        Ok(())
    }
    /// Forwards the exchange, failing over until a deployment answers;
    /// fills `report` as it goes (it is whole however this returns).
    pub(crate) async fn forward(
        &self,
        client: &mut dyn Client,
        exchange: &Exchange<'_>,
        report: &mut Report,
        settle: &mut dyn Settle,
    ) -> Result<(), ApiError> {
        let mut failover = Failover::new(
            self.policy,
            exchange.routes.clone(),
            exchange.context_routes.clone(),
        )
        .only_provider(exchange.pin);
        let resumable = exchange.resumable
            && exchange
                .routes
                .first()
                .is_some_and(|(_, r)| r.resume_streams);
        let client = &mut Resumable::new(client, resumable).masking(self.upstreams.redact_keys());
        let mut continuation = None;
        let tier = report.requested_tier;
        loop {
            let next = failover.next(|index, route, tried| {
                self.upstreams.choose_backend(index, route, tried, tier)
            });
            let ((route_index, route), mut backend) = match next {
                Next::Try { route, backend } => (route, backend),
                Next::Wait(wait) => {
                    // Nothing can serve before a deployment's cool-down ends,
                    // and that is soon: wait for it (unless the client goes).
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue,
                        _ = client.gone() => {
                            report.client_closed();
                            return Ok(());
                        }
                    }
                }
                Next::GiveUp => {
                    if let Some(last) = report.attempt_log.last_mut() {
                        last.next = "gave_up";
                    }
                    let model = exchange.routes.first().map_or("", |(_, r)| r.name.as_str());
                    return self
                        .end(client, exchange, report, settle, failover.give_up(model))
                        .await;
                }
            };
            let mut prefill = self
                .upstreams
                .provider(backend.provider)
                .settings
                .supports_prefill;
            // The attempts at this deployment.
            'deployment: loop {
                if report.resumptions > 0 {
                    continuation = Some(client.continue_with(prefill, report.earlier_usage()));
                }
                report.attempts = failover.attempts();
                report.provider = Some(backend.provider);
                report.route = Some(route_index);
                report.backend = Some(backend.addr);
                report.target = Some(backend.target);
                let started = Instant::now();
                let span_id = exchange.trace.map(|_| crate::telemetry::new_span_id());
                // In a block of its own: the attempt's outcome ends with it,
                // not held across the awaits below (room in the state of
                // every stream).
                let (step, record) = 'judged: {
                    let attempted = attempt::Attempt {
                        forwarder: self,
                        exchange,
                        route,
                        backend: &backend,
                        may_change_context: failover.may_change_context(),
                        continuation: continuation.as_ref(),
                        span_id,
                    }
                    .run(client, report, settle)
                    .await;
                    report.upstream_time += started.elapsed();
                    // A continuation that said something else ends its copy
                    // as a gone client would.
                    let diverged = client.diverged();
                    // Recorded once the failover has decided what comes next.
                    let record =
                        span_id
                            .filter(|_| exchange.traced())
                            .map(|span_id| AttemptRecord {
                                span_id,
                                started,
                                ended: Instant::now(),
                                route: route_index,
                                target: backend.target,
                                provider: backend.provider,
                                backend: backend.addr,
                                status: report.upstream_status.take(),
                                error: if diverged {
                                    Some("provider_stream_broken")
                                } else {
                                    failure_reason(&attempted)
                                },
                                next: "answered",
                            });
                    if diverged {
                        warn!(request_id = %exchange.request_id, backend = %backend.addr, "a restarted stream said something else than the client has");
                        // `end` says the stream could not be resumed; this says why.
                        let error = ApiError::upstream_error(
                            "the next deployment began differently from what the client already has.",
                        );
                        break 'judged (Step::Done(Err(error)), record);
                    }
                    if matches!(&continuation, Some(Continuation::Prefill(_)))
                        && matches!(&attempted, Attempted::Final(e) if e.status == 400)
                        && failover.attempts_left()
                    {
                        // The deployment does not continue a prefill: the same
                        // deployment, from the beginning.
                        if let Some(again) = self.upstreams.reacquire(&backend) {
                            failover.retrying(&again);
                            backend = again;
                            prefill = false;
                            continue 'deployment;
                        }
                    }
                    if matches!(attempted, Attempted::StreamBroken(_)) {
                        // The stream broke after reaching the client: what it
                        // used is billed, and the next deployment continues it.
                        let usage = report.usage.take().unwrap_or_default();
                        report.earlier.push((report.route, report.target, usage));
                        report.resumptions += 1;
                        resumption(exchange, "attempted");
                        if exchange.traced() {
                            report
                                .stream_events
                                .push(("runestone.stream.broken", Instant::now()));
                        }
                    }
                    if let Attempted::Retryable { error, .. } | Attempted::RateLimited(error) =
                        &attempted
                    {
                        warn!(request_id = %exchange.request_id, provider = %self.upstreams.provider(backend.provider).settings.name,
                              backend = %backend.addr, attempt = report.attempts, error = %error, "attempt failed; failing over");
                    }
                    if matches!(attempted, Attempted::ClientGone) {
                        report.client_closed();
                        // An attempt ends so only once its request was sent:
                        // the provider has the prompt, and works on it, so a
                        // client that leaves before any answer was read is
                        // billed it (else leaving early would cost nothing,
                        // past budgets and token limits).
                        if report.usage.is_none() {
                            let model = &route.targets[backend.target].model;
                            report.usage = Some(exchange.estimate.prompt_sent(model).await);
                        }
                    }
                    (failover.after(attempted), record)
                };
                if let Some(mut record) = record {
                    record.next = match &step {
                        Step::TryNext => "failed_over",
                        Step::RetrySame(_) => "retried",
                        Step::Done(Err(_)) => "gave_up",
                        Step::Done(Ok(())) => "answered",
                    };
                    report.attempt_log.push(record);
                }
                match step {
                    Step::TryNext => break,
                    Step::Done(Err(error)) => {
                        return self.end(client, exchange, report, settle, error).await
                    }
                    Step::Done(Ok(())) => {
                        if report.resumptions > 0 && client.completed() {
                            resumption(exchange, "resumed");
                            if exchange.traced() {
                                report
                                    .stream_events
                                    .push(("runestone.stream.resumed", Instant::now()));
                            }
                        }
                        return Ok(());
                    }
                    Step::RetrySame(pause) => {
                        // Jittered by half either way, so retries of many
                        // requests do not arrive together.
                        let pause = pause.mul_f64(0.5 + fastrand::f64());
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = client.gone() => {
                                report.client_closed();
                                return Ok(());
                            }
                        }
                        match self.upstreams.reacquire(&backend) {
                            Some(again) => {
                                failover.retrying(&again);
                                backend = again;
                            }
                            None => {
                                failover.retry_refused();
                                break;
                            }
                        }
                    }
                }
            }
        }
    }
}
