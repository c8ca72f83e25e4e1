//! One attempt against one backend: connect (or reuse a pooled
//! connection), send the request, wait for the response head, and either
//! refuse it (a retryable failure) or copy the answer to the client.

use super::body::{is_event_stream, Copy, Meter};
use super::headers::{client_response, gateway_headers, upstream_request};
use super::{Exchange, Forwarder, Report, Settle};
use crate::config::{ModelRoute, ProviderSettings};
use crate::gateway::client::Client;
use crate::openai::ApiError;
use crate::providers::adapter;
use crate::redact::Redactor;
use crate::upstream::breaker::Outcome;
use crate::upstream::failover::Attempted;
use crate::upstream::Backend;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::{ErrorSource, ErrorType};
use std::time::{Duration, Instant};
use tracing::warn;

/// One attempt: where, and for what.
pub(super) struct Attempt<'a> {
    pub forwarder: &'a Forwarder,
    pub exchange: &'a Exchange<'a>,
    pub route: &'a ModelRoute,
    pub backend: &'a Backend,
}

impl Attempt<'_> {
    fn provider(&self) -> &ProviderSettings {
        &self
            .forwarder
            .upstreams
            .provider(self.backend.provider)
            .settings
    }

    /// Tells the backend's breaker how it went, and passes `attempted` on.
    fn outcome(&self, outcome: Outcome, attempted: Attempted) -> Attempted {
        self.forwarder
            .upstreams
            .record_outcome(self.backend, outcome, None);
        attempted
    }

    /// Runs the attempt; how it ended.
    pub(super) async fn run(
        &self,
        client: &mut dyn Client,
        report: &mut Report,
        settle: &mut dyn Settle,
    ) -> Attempted {
        match self.exchange_with(client, report, settle).await {
            Ok(attempted) | Err(attempted) => attempted,
        }
    }

    async fn exchange_with(
        &self,
        client: &mut dyn Client,
        report: &mut Report,
        settle: &mut dyn Settle,
    ) -> Result<Attempted, Attempted> {
        let provider = self.provider();
        let kind = adapter(provider.kind);
        let upstreams = &self.forwarder.upstreams;
        let exchange = self.exchange;
        let timeouts = provider.timeouts;
        let started = Instant::now();
        let deadline = started + timeouts.total;
        let provider_model = &self.route.targets[self.backend.target].model;
        if !kind.serves(exchange.endpoint) {
            return Err(self.outcome(
                Outcome::Neutral,
                Attempted::Retryable(ApiError::invalid_field(
                    "model",
                    format!(
                        "the provider '{}' does not serve {}",
                        provider.name,
                        exchange.endpoint.name()
                    ),
                )),
            ));
        }
        let body = kind
            .request_body((exchange.body_for)(provider_model), provider_model)
            .map_err(|e| self.outcome(Outcome::Neutral, Attempted::Final(e)))?;
        let peer = upstreams.peer(self.backend);
        let io_error = |e: Box<pingora::Error>| {
            let (outcome, attempted) = classify(provider, self.backend, &e);
            self.outcome(outcome, attempted)
        };
        let connector = &self.forwarder.connector;
        let (mut upstream, reused) = match connector.reused_http_session(&peer).await {
            Some(pooled) => (HttpSession::H1(pooled), true),
            None => {
                // Boxed: connecting (TLS included) is a large future, and
                // held inline it would enlarge every request's state for the
                // life of its stream.
                let (fresh, reused) = Box::pin(connector.get_http_session(&peer))
                    .await
                    .map_err(io_error)?;
                (HttpSession::H1(fresh), reused)
            }
        };
        let header = upstream_request(
            provider,
            provider_model,
            exchange,
            client.request_headers(),
            body.len(),
        )
        .map_err(|e| {
            Attempted::Final(ApiError::internal(format!(
                "cannot build the upstream request: {e}"
            )))
        })?;
        let sent = async {
            upstream.write_request_header(Box::new(header)).await?;
            upstream.write_request_body(body, true).await?;
            upstream.finish_request_body().await
        };
        if let Err(e) = sent.await {
            // A pooled connection the provider had closed says nothing
            // about it.
            let outcome = if reused {
                Outcome::Neutral
            } else {
                classify(provider, self.backend, &e).0
            };
            return Err(self.outcome(
                outcome,
                Attempted::Retryable(ApiError::upstream_error(format!(
                    "Sending the request to the provider '{}' failed.",
                    provider.name
                ))),
            ));
        }

        let first_byte = timeouts
            .first_byte
            .min(deadline.saturating_duration_since(Instant::now()));
        let header_deadline = tokio::time::Instant::now() + first_byte;
        // Informational answers (100 Continue, 103 Early Hints) come before
        // the real one: read past a few of them.
        for informational in 0.. {
            tokio::select! {
                read = tokio::time::timeout_at(header_deadline, upstream.read_response_header()) => match read {
                    Ok(read) => read.map_err(io_error)?,
                    Err(_) => return Err(self.outcome(Outcome::Failure, Attempted::Retryable(ApiError::upstream_timeout(format!(
                        "The provider '{}' sent no response within {first_byte:?}.", provider.name
                    ))))),
                },
                _ = client.gone() => return Err(self.outcome(Outcome::Neutral, Attempted::Answered)),
            }
            let status = upstream.response_header().map_or(0, |h| h.status.as_u16());
            if !(100..200).contains(&status) {
                break;
            }
            if status == 101 || informational >= 4 {
                return Err(self.outcome(
                    Outcome::Failure,
                    Attempted::Retryable(ApiError::upstream_error(format!(
                        "The provider '{}' answered {status} and nothing else.",
                        provider.name
                    ))),
                ));
            }
        }
        let ttfb = started.elapsed();
        // Borrowed, not cloned: everything read from it is read before the
        // body.
        let Some(upstream_header) = upstream.response_header() else {
            return Err(self.outcome(
                Outcome::Failure,
                Attempted::Retryable(ApiError::upstream_error(format!(
                    "The provider '{}' sent no response header.",
                    provider.name
                ))),
            ));
        };
        let status = upstream_header.status.as_u16();
        if let Some((outcome, error)) = refused(provider, upstream_header) {
            warn!(request_id = %exchange.request_id, provider = %provider.name, backend = %self.backend.addr, status, "provider refused the attempt");
            return Err(self.outcome(outcome, Attempted::Retryable(error)));
        }
        if let Some(encoding) = upstream_header
            .headers
            .get(header::CONTENT_ENCODING)
            .filter(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
        {
            // Asked for identity: a compressed answer could be neither
            // metered nor redacted, so it is not passed on.
            warn!(request_id = %exchange.request_id, provider = %provider.name, encoding = ?encoding, "provider answered compressed despite accept-encoding: identity");
            return Err(self.outcome(
                Outcome::Failure,
                Attempted::Retryable(ApiError::upstream_error(format!(
                    "The provider '{}' answered with a content encoding the gateway did not ask for.",
                    provider.name
                ))),
            ));
        }
        // Whatever the provider sends on, its key never reaches the client.
        let mut redactor = Redactor::new(provider.api_key.as_ref().map(|k| k.expose()));
        if kind.translates_answers() && !is_event_stream(upstream_header) {
            let upstream_header = upstream_header.clone();
            return self
                .translated_json(
                    client,
                    report,
                    settle,
                    &mut upstream,
                    &upstream_header,
                    ttfb,
                    &redactor,
                )
                .await;
        }
        let mut meter = if kind.translates_answers() {
            Meter::Translated(kind.stream_translator(&self.route.name, !exchange.strip_usage))
        } else {
            Meter::for_response(upstream_header, exchange.strip_usage)
        };
        let response = client_response(
            upstream_header,
            exchange,
            &provider.name,
            report.attempts,
            meter.edits_body(),
            &redactor,
        )
        .map_err(|e| {
            Attempted::Final(ApiError::internal(format!(
                "cannot build the response header: {e}"
            )))
        })?;
        let declared_len = upstream_header
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|_| !meter.edits_body());
        if !client.send_header(response).await {
            return Err(self.outcome(Outcome::Neutral, Attempted::Answered));
        }
        let copy = Copy {
            upstreams,
            is_stream: exchange.stream,
            provider,
            declared_len,
            idle: timeouts.idle,
            deadline,
            backend: self.backend,
            ttfb,
            prompt_estimate: exchange.prompt_estimate,
            request_id: exchange.request_id,
        };
        let completed = copy
            .run(
                client,
                &mut upstream,
                report,
                settle,
                &mut meter,
                &mut redactor,
            )
            .await;
        if completed && upstream.response_done() {
            if let HttpSession::H1(done) = upstream {
                connector
                    .release_http_session(done, &peer, peer.options.idle_timeout)
                    .await;
            }
        }
        Ok(Attempted::Answered)
    }

    /// A translated JSON answer (Anthropic) is read whole and translated
    /// before anything goes to the client (its length changes); an error
    /// answer becomes the OpenAI error of the same class.
    #[allow(clippy::too_many_arguments)]
    async fn translated_json(
        &self,
        client: &mut dyn Client,
        report: &mut Report,
        settle: &mut dyn Settle,
        upstream: &mut HttpSession,
        header: &ResponseHeader,
        ttfb: Duration,
        redactor: &Redactor,
    ) -> Result<Attempted, Attempted> {
        let provider = self.provider();
        let kind = adapter(provider.kind);
        let upstreams = &self.forwarder.upstreams;
        let mut body = Vec::new();
        loop {
            match tokio::time::timeout(provider.timeouts.idle, upstream.read_response_body()).await
            {
                Ok(Ok(Some(chunk)))
                    if body.len() + chunk.len() <= crate::cost::MAX_METERED_JSON_BYTES =>
                {
                    body.extend_from_slice(&chunk)
                }
                Ok(Ok(None)) => break,
                _ => {
                    return Err(self.outcome(
                        Outcome::Failure,
                        Attempted::Retryable(ApiError::upstream_error(format!(
                            "The provider '{}' broke off its answer.",
                            provider.name
                        ))),
                    ));
                }
            }
        }
        let status = header.status.as_u16();
        if !header.status.is_success() {
            upstreams.record_outcome(self.backend, Outcome::Success, Some(ttfb));
            let error = kind
                .translate_answer(status, &redactor.redact(&body), &self.route.name)
                .err()
                .unwrap_or_else(|| ApiError::upstream_error("The provider answered an error."));
            return Err(Attempted::Final(error));
        }
        let (answer, usage) = kind
            .translate_answer(status, &body, &self.route.name)
            .map_err(|e| self.outcome(Outcome::Failure, Attempted::Retryable(e)))?;
        report.usage = Some(usage);
        settle.settle(report).await;
        upstreams.record_outcome(self.backend, Outcome::Success, Some(ttfb));
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(answer.len()));
        gateway_headers(
            &mut parts.headers,
            self.exchange,
            &provider.name,
            report.attempts,
        )
        .map_err(|e| Attempted::Final(ApiError::internal(e.to_string())))?;
        if client.send_header(ResponseHeader::from(parts)).await {
            report.first_byte_at.get_or_insert_with(Instant::now);
            let answer = match redactor.redact(&answer) {
                std::borrow::Cow::Borrowed(_) => Bytes::from(answer),
                std::borrow::Cow::Owned(redacted) => Bytes::from(redacted),
            };
            client.send_body(answer, true).await;
        }
        Ok(Attempted::Answered)
    }
}

/// A response that must not reach the client, with what the breaker should
/// make of it: a 5xx (failure), the provider's own 429 (cool-down), or a
/// 401/403 that means the gateway's key was refused (the tenant's key was
/// fine, so the client must not see an authentication error).
fn refused(provider: &ProviderSettings, header: &ResponseHeader) -> Option<(Outcome, ApiError)> {
    let name = &provider.name;
    let status = header.status.as_u16();
    match status {
        500..=599 => Some((
            Outcome::Failure,
            ApiError::upstream_error(format!("The provider '{name}' answered {status}.")),
        )),
        429 => {
            let retry_after = header
                .headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| Duration::from_secs_f64(s.min(3600.0)));
            let mut error = ApiError::provider_rate_limited(name);
            error.retry_after_ms = Some(retry_after.map_or(1000, |d| d.as_millis() as u64));
            Some((Outcome::RateLimited(retry_after), error))
        }
        401 | 403 => Some((
            Outcome::Neutral,
            ApiError::upstream_error(format!(
                "The provider '{name}' refused the gateway's credentials."
            )),
        )),
        _ => None,
    }
}

/// Maps a connector or I/O error to the breaker outcome and how the
/// attempt ended.
fn classify(
    provider: &ProviderSettings,
    backend: &Backend,
    e: &pingora::Error,
) -> (Outcome, Attempted) {
    let name = &provider.name;
    match e.etype() {
        _ if e.esource() == &ErrorSource::Downstream => (Outcome::Neutral, Attempted::Answered),
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => (
            Outcome::Failure,
            Attempted::Retryable(ApiError::upstream_timeout(format!(
                "The provider '{name}' timed out."
            ))),
        ),
        _ => (
            Outcome::Failure,
            Attempted::Retryable(ApiError::upstream_error(format!(
                "The provider '{name}' could not be reached ({}) at {}.",
                e.etype().as_str(),
                backend.addr
            ))),
        ),
    }
}
