//! One attempt against one deployment: connect (or reuse a pooled
//! connection), send the request, wait for the response head, and then
//! either refuse the answer (a failure the failover decides on) or hold it
//! until its first content is in (so a provider too slow to start fails
//! over with nothing sent) and copy it to the client.

use super::body::{read_gap, BodyEnd, Copy, FirstContent, Meter};
use super::decode::{self, Decoder, UpstreamBody};
use super::headers::{
    client_response, gateway_headers, is_event_stream, redacted, upstream_request,
};
use super::resume::{with_prefill, Continuation};
use super::{Exchange, Forwarder, Report, Settle};
use crate::config::{ModelRoute, ProviderSettings};
use crate::cost::MAX_METERED_JSON_BYTES;
use crate::gateway::client::Client;
use crate::openai::ApiError;
use crate::providers::adapter;
use crate::redact::Redactor;
use crate::upstream::breaker::Outcome;
use crate::upstream::failover::Attempted;
use crate::upstream::health::Domain;
use crate::upstream::Backend;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
use pingora::{ErrorSource, ErrorType};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// The longest message of a provider's error kept for the client (after
/// its key is masked).
const MAX_ERROR_MESSAGE_CHARS: usize = 1000;

/// The longest `param` or `code` of a provider's error kept for the client.
const MAX_ERROR_FIELD_CHARS: usize = 200;

/// A provider's error (its message, and the `param` and `code` it named,
/// read out of its answer), masked of the provider's key as the client
/// will read them (see [`Redactor::redact_decoded`]: read out of JSON and
/// written again, a key may be the key once more) and cut to
/// [`MAX_ERROR_MESSAGE_CHARS`] and [`MAX_ERROR_FIELD_CHARS`].
fn masked(mut error: ApiError, redactor: &Redactor<'_>) -> ApiError {
    // Cut once masked: a key cut in two would not be found.
    let mask = |text: &str, most: usize| -> String {
        redactor.redact_decoded(text).chars().take(most).collect()
    };
    // A name (of a field, of an error) holds no control characters: a
    // client printing one as it is would run a terminal's escapes. Taken
    // out before the mask looks: out after, a key split by one would be
    // whole again.
    let name = |text: &str| -> String {
        let text: String = text.chars().filter(|c| !c.is_control()).collect();
        mask(&text, MAX_ERROR_FIELD_CHARS)
    };
    error.message = mask(&error.message, MAX_ERROR_MESSAGE_CHARS).into();
    error.param = (error.param.as_deref()).map(|param| name(param).into());
    if let Some(code) = &mut error.provider_code {
        **code = name(code);
    }
    error
}

/// What a provider answered in the other form than asked for: one JSON
/// answer to a request for a stream of events, and the other way round.
const FOR_A_STREAM_ONE_JSON_ANSWER: &str = "a request for a stream with one JSON answer";
const FOR_ONE_JSON_ANSWER_A_STREAM: &str = "a request for one JSON answer with a stream";

/// How long, and how much of, a refused answer's body is read for its
/// connection to be kept (see [`Attempt::drain`]).
const DRAIN_WAIT: Duration = Duration::from_millis(50);
const DRAIN_BYTES: usize = 64 * 1024;

/// How sending on one connection failed: the connection was a stale kept
/// one (see [`Attempt::request_on`]), or the attempt ended so.
enum Failed {
    Stale,
    Attempted(Attempted),
}

/// One attempt: where, and for what.
pub(super) struct Attempt<'a> {
    pub forwarder: &'a Forwarder,
    pub exchange: &'a Exchange<'a>,
    pub route: &'a ModelRoute,
    pub backend: &'a Backend,
    /// A prompt too long for the model can still move to context
    /// fallbacks (else the provider's answer is passed on).
    pub may_change_context: bool,
    /// Continuing a stream that broke: how the rest is asked for. Only a
    /// stream can continue it; any other answer is a failure.
    pub continuation: Option<&'a Continuation>,
    /// The attempt's span, when the request is traced.
    pub span_id: Option<[u8; 8]>,
}

/// What the upstream connection is, once the answer's head is in; boxed
/// when passed on (a pooled connection and its peer are more than a
/// kilobyte, in every request's state).
struct Answer {
    upstream: HttpSession,
    peer: Box<pingora::upstreams::peer::HttpPeer>,
    /// When the attempt started (the first-token deadline counts from it).
    started: Instant,
    ttfb: Duration,
    deadline: Instant,
}

impl Attempt<'_> {
    /// For a sampled trace, whether the answer is described (`Some`), and
    /// with its text (`Some(true)`).
    fn describes(&self) -> Option<bool> {
        self.exchange
            .traced()
            .then(|| crate::telemetry::settings().is_some_and(|s| s.capture_content))
    }

    fn provider(&self) -> &ProviderSettings {
        &self
            .forwarder
            .upstreams
            .provider(self.backend.provider)
            .settings
    }

    /// Tells the breakers of `domain` how it went, and passes `attempted`
    /// on.
    fn outcome(&self, outcome: Outcome, domain: Domain, attempted: Attempted) -> Attempted {
        self.forwarder
            .upstreams
            .record_outcome(self.backend, outcome, domain, None);
        attempted
    }

    /// The client went away before its answer was whole: nothing is
    /// said about the deployment.
    fn client_gone(&self) -> Attempted {
        self.outcome(Outcome::Neutral, Domain::Deployment, Attempted::ClientGone)
    }

    /// A failure of the deployment (what the provider did).
    fn deployment_failure(&self, error: ApiError) -> Attempted {
        self.outcome(
            Outcome::Failure,
            Domain::Deployment,
            Attempted::deployment(error),
        )
    }

    /// An answer in the other form than the client asked for (`what`, see
    /// [`FOR_A_STREAM_ONE_JSON_ANSWER`]), `received` bytes of it read: none
    /// its SDK can read, so a failure of the deployment.
    fn in_the_other_form(&self, what: &str, received: usize) -> Attempted {
        let provider = &self.provider().name;
        warn!(request_id = %self.exchange.request_id, provider = %provider, received, "provider answered {what}");
        self.deployment_failure(ApiError::upstream_error(format!(
            "The provider '{provider}' answered {what}."
        )))
    }

    /// Runs the attempt; how it ended.
    pub(super) async fn run(
        &self,
        client: &mut dyn Client,
        report: &mut Report,
        settle: &mut dyn Settle,
    ) -> Attempted {
        // Boxed, and gone once the head is in: a stream's task holds the
        // largest state of every call it is inside for the stream's life,
        // and connecting is larger than copying.
        let answer = match Box::pin(self.send(client)).await {
            Ok(answer) => answer,
            Err(attempted) => return attempted,
        };
        report.upstream_status = answer.upstream.response_header().map(|h| h.status.as_u16());
        match self.answer(answer, client, report, settle).await {
            Ok(attempted) | Err(attempted) => attempted,
        }
    }

    /// Connects, sends the request and reads the answer's head (past any
    /// informational `1xx`).
    async fn send(&self, client: &mut dyn Client) -> Result<Box<Answer>, Attempted> {
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
                Domain::Deployment,
                Attempted::deployment(ApiError::invalid_field(
                    "model",
                    format!(
                        "the provider '{}' does not serve {}",
                        provider.name,
                        exchange.endpoint.name()
                    ),
                )),
            ));
        }
        let mut body = (exchange.body_for)(provider_model);
        if let Some(Continuation::Prefill(text)) = self.continuation {
            let delivered_tokens = (text.len() as u64).div_ceil(4);
            // The text the client has, read out of other providers'
            // answers and written as JSON again: none of their keys goes to
            // this one, in any form it reads as.
            let text = self
                .forwarder
                .upstreams
                .redact_keys()
                .iter()
                .fold(text.clone(), |text, key| {
                    Redactor::new(Some(key)).redact_decoded(&text)
                });
            body = with_prefill(&body, &text, delivered_tokens).unwrap_or(body);
        }
        let body = kind
            .request_body(body, provider_model)
            // A request this provider kind cannot take as asked (a field
            // Anthropic cannot honour): another target may; if none does,
            // this is the answer.
            .map_err(|e| {
                self.outcome(
                    Outcome::Neutral,
                    Domain::Deployment,
                    Attempted::deployment(e),
                )
            })?;
        // Boxed: more than half a kilobyte, held for the whole answer.
        let peer = Box::new(upstreams.peer(self.backend));
        let (mut upstream, mut reused) = match self.forwarder.connections.kept(&peer).await {
            Some(pooled) => (HttpSession::H1(pooled), true),
            None => self.connect(&peer, false).await?,
        };
        loop {
            match self
                .request_on(&mut upstream, reused, body.clone(), deadline, client)
                .await
            {
                Ok(()) => break,
                // A kept connection that proved stale says nothing about
                // the provider: once more on a new one (not another kept
                // one, which may be as stale), outside the retries.
                Err(Failed::Stale) => {
                    debug!(request_id = %exchange.request_id, provider = %provider.name, backend = %self.backend.addr, "a kept connection was stale; sending again on a new one");
                    (upstream, reused) = self.connect(&peer, true).await?;
                }
                Err(Failed::Attempted(attempted)) => return Err(attempted),
            }
        }
        Ok(Box::new(Answer {
            upstream,
            peer,
            started,
            ttfb: started.elapsed(),
            deadline,
        }))
    }

    /// A connection to the backend: from the pool or new, or (`new_only`)
    /// new whatever the pool holds.
    async fn connect(
        &self,
        peer: &HttpPeer,
        new_only: bool,
    ) -> Result<(HttpSession, bool), Attempted> {
        let connect_error = |e: Box<pingora::Error>| {
            let (outcome, domain, attempted) = classify(self.provider(), &e, Phase::Connect);
            self.outcome(outcome, domain, attempted)
        };
        // Boxed: connecting (TLS included) is a large future, and held
        // inline it would enlarge every request's state for the life of
        // its stream.
        let connections = &self.forwarder.connections;
        let (fresh, reused) = match new_only {
            false => Box::pin(connections.get(peer)).await,
            // Not another kept one, which may be as stale.
            true => Box::pin(connections.new_session(peer))
                .await
                .map(|fresh| (fresh, false)),
        }
        .map_err(connect_error)?;
        Ok((HttpSession::H1(fresh), reused))
    }

    /// Sends the request on `upstream` and reads the answer's head (past
    /// any informational `1xx`). [`Failed::Stale`]: the connection was a
    /// kept one (`reused`) found closed ([`crate::connections::let_go`]),
    /// or answering with bytes that are no answer's head, before anything
    /// of this request's answer: the provider closed it while idle, or
    /// sent bytes after its last answer that came in only now.
    async fn request_on(
        &self,
        upstream: &mut HttpSession,
        reused: bool,
        body: Bytes,
        deadline: Instant,
        client: &mut dyn Client,
    ) -> Result<(), Failed> {
        let provider = self.provider();
        let exchange = self.exchange;
        let provider_model = &self.route.targets[self.backend.target].model;
        let header = upstream_request(
            provider,
            provider_model,
            exchange,
            client.request_headers(),
            body.len(),
            self.span_id,
        )
        .map_err(|e| {
            Failed::Attempted(Attempted::Final(ApiError::internal(format!(
                "cannot build the upstream request: {e}"
            ))))
        })?;
        let sent = async {
            upstream.write_request_header(Box::new(header)).await?;
            upstream.write_request_body(body, true).await?;
            upstream.finish_request_body().await
        };
        if let Err(e) = sent.await {
            if reused {
                return Err(Failed::Stale);
            }
            let (outcome, domain, _) = classify(provider, &e, Phase::Connect);
            return Err(Failed::Attempted(self.outcome(
                outcome,
                domain,
                Attempted::Retryable {
                    error: ApiError::upstream_error(format!(
                        "Sending the request to the provider '{}' failed.",
                        provider.name
                    )),
                    domain,
                    transient: true,
                },
            )));
        }

        let sent = tokio::time::Instant::now();
        let first_byte = provider
            .timeouts
            .first_byte
            .min(deadline.saturating_duration_since(sent.into_std()));
        let header_deadline = sent + first_byte;
        // Informational answers (100 Continue, 103 Early Hints) come before
        // the real one: read past a few of them.
        for informational in 0.. {
            tokio::select! {
                // In order, without a random draw: once the head is in,
                // sending it finds a client that is gone.
                biased;
                read = tokio::time::timeout_at(header_deadline, upstream.read_response_header()) => match read {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        let stale = reused && informational == 0 && crate::connections::let_go(&e);
                        if stale {
                            return Err(Failed::Stale);
                        }
                        let (outcome, domain, attempted) = classify(provider, &e, Phase::Answer);
                        return Err(Failed::Attempted(self.outcome(outcome, domain, attempted)));
                    }
                    Err(_) => return Err(Failed::Attempted(self.deployment_failure(ApiError::upstream_timeout(format!(
                        "The provider '{}' sent no response within {first_byte:?}.", provider.name
                    ))))),
                },
                _ = client.gone() => return Err(Failed::Attempted(self.client_gone())),
            }
            let status = upstream.response_header().map_or(0, |h| h.status.as_u16());
            if !(100..200).contains(&status) {
                break;
            }
            if status == 101 || informational >= 4 {
                return Err(Failed::Attempted(self.deployment_failure(
                    ApiError::upstream_error(format!(
                        "The provider '{}' answered {status} and nothing else.",
                        provider.name
                    )),
                )));
            }
        }
        Ok(())
    }

    /// Decides on the answer whose head is in, and copies it to the client.
    async fn answer(
        &self,
        mut answer: Box<Answer>,
        client: &mut dyn Client,
        report: &mut Report,
        settle: &mut dyn Settle,
    ) -> Result<Attempted, Attempted> {
        let provider = self.provider();
        let kind = adapter(provider.kind);
        let exchange = self.exchange;
        let upstreams = &self.forwarder.upstreams;
        // The provider's head is read where the session keeps it, not
        // copied: what the attempt needs of it is taken before the body is.
        let Some(head) = answer.upstream.response_header() else {
            return Err(self.headless());
        };
        if let Some(attempted) = self.refused(head) {
            warn!(request_id = %exchange.request_id, provider = %provider.name, backend = %self.backend.addr, status = head.status.as_u16(), "provider refused the attempt");
            self.drain(answer).await;
            return Err(attempted);
        }
        let event_stream = is_event_stream(head);
        // Whether an answer with nothing in it is no answer: not for a 204 or
        // 205 (they say they have nothing to send), nor for the calls on a
        // stored response (reading, deleting, cancelling: the provider's
        // acknowledgement, whatever its shape, and no other deployment to
        // ask).
        let may_be_empty = matches!(head.status.as_u16(), 204 | 205) || !exchange.bills;
        // Whether a whole answer must be a JSON object (not a read of a
        // stored response, whatever it holds).
        let json_expected = exchange.bills && exchange.endpoint.answers_json();
        if self.continuation.is_some() && !(head.status.is_success() && event_stream) {
            let refused = self.continuation_refused(head);
            self.drain(answer).await;
            return Err(refused);
        }
        // Asked for identity, a provider may compress anyway: the answer is
        // decoded, so what is metered, redacted and sent on is plain.
        // A status that has no body has nothing to decode, whatever its
        // head says.
        let bodiless = matches!(head.status.as_u16(), 204 | 205 | 304);
        let decoder = match Decoder::for_answer(&head.headers).map(|d| d.filter(|_| !bodiless)) {
            Ok(decoder) => decoder.map(|decoder| {
                debug!(request_id = %exchange.request_id, provider = %provider.name, encoding = decoder.name(), "decoding an answer compressed despite accept-encoding: identity");
                Box::new(decoder)
            }),
            Err(()) => {
                let codings = |name| decode::named_codings(&head.headers, name);
                warn!(request_id = %exchange.request_id, provider = %provider.name, content_encoding = %codings(header::CONTENT_ENCODING), transfer_encoding = %codings(header::TRANSFER_ENCODING), "provider answered in a coding the gateway cannot decode");
                return Err(self.deployment_failure(ApiError::upstream_error(format!(
                    "The provider '{}' answered in a content encoding the gateway cannot decode.",
                    provider.name
                ))));
            }
        };
        let decoding = decoder.is_some();
        // Whatever the provider sends on, its key never reaches the client.
        let mut redactor = Redactor::new(provider.redact_key.as_ref());
        let translated = kind.translates_answers();
        if !head.status.is_success() || (translated && !event_stream) {
            // An error answer, or a translated JSON one: read whole, then
            // decided on.
            let mut body = UpstreamBody::new(&mut answer.upstream, decoder);
            let until = (answer.started + provider.timeouts.first_token).min(answer.deadline);
            let whole = self.read_whole(&mut body, until, client).await?;
            drop(body);
            return self
                .whole_answer(answer, whole, client, report, settle, &redactor)
                .await;
        }
        let mut meter = if translated {
            Meter::Translated(Box::new(
                kind.stream_translator(&self.route.name, !exchange.strip_usage)
                    .with_estimate(
                        self.estimate(),
                        &self.route.targets[self.backend.target].model,
                    ),
            ))
        } else {
            Meter::for_response(
                head,
                json_expected,
                exchange.strip_usage,
                exchange.estimate,
                &self.route.targets[self.backend.target].model,
            )
        };
        let mut body = UpstreamBody::new(&mut answer.upstream, decoder);
        // The head is held until the first content is in: a provider that
        // answers at once but starts only much later fails over with
        // nothing sent to the client.
        // Counted from the request, like first_byte_ms.
        let first_token = provider.timeouts.first_token;
        let first_token_deadline = (answer.started + first_token).min(answer.deadline);
        let mut held = Held::default();
        let mut first = FirstContent::new(event_stream);
        if meter.passes_at_once() {
            first = FirstContent::found_at_once();
        }
        let mut received = 0usize;
        let mut ended = false;
        // An event that is not JSON stops the meter: before any content it
        // is left out (nothing it may have carried was sent), after content
        // the copy judges it as it judges one in a later read.
        meter.halt_on_malformed(true);
        while !first.found() {
            // Not in order: what is held here is not sent yet, so a
            // provider flooding it must not keep a gone client unseen.
            let read = tokio::select! {
                read = tokio::time::timeout_at(first_token_deadline.into(), body.read()) => read,
                _ = client.gone() => return Err(self.client_gone()),
            };
            match read {
                Ok(Ok(Some(chunk))) => {
                    received += chunk.len();
                    let model = &self.route.targets[self.backend.target].model;
                    let mut out = redactor.feed(meter.feed_counted(chunk, model).await);
                    loop {
                        // Nothing sent yet: another deployment may answer.
                        if meter.cut() {
                            return Err(self.deployment_failure(ApiError::upstream_error(
                                super::body::cut_message(&provider.name),
                            )));
                        }
                        first.scan(&out);
                        // An error event before any content: nothing sent
                        // yet, so judged as the status it stands for
                        // (another deployment may answer); after content,
                        // the client gets the event.
                        if let Some(error) = meter.in_band_error().filter(|_| !first.found()) {
                            return Err(self.error_in_answer(error.clone(), &redactor));
                        }
                        held.push(out);
                        if !meter.halted() || first.found() {
                            break;
                        }
                        // Left out: the meter goes on with the rest of the
                        // read, and stops again at the next such event.
                        meter.halt_on_malformed(false);
                        meter.halt_on_malformed(true);
                        out = redactor.feed(meter.feed(Bytes::new()));
                    }
                    if held.len() > MAX_METERED_JSON_BYTES {
                        break;
                    }
                }
                Ok(Ok(None)) => {
                    // A last event without its line end is read now, in
                    // time to fail over should it be an error.
                    let last = redactor.feed(meter.read_last_event());
                    first.scan(&last);
                    held.push(last);
                    if let Some(error) = meter.in_band_error().filter(|_| !first.found()) {
                        return Err(self.error_in_answer(error.clone(), &redactor));
                    }
                    // A JSON answer that is the provider's error, under a
                    // 200 (a read of a stored response is passed on as it
                    // is, whatever it holds).
                    if let Some(error) = meter.json_error().filter(|_| exchange.bills) {
                        warn!(request_id = %exchange.request_id, provider = %provider.name, "provider answered 200 with an error body");
                        return Err(self.error_in_answer(error, &redactor));
                    }
                    // Not one whole event for the client (none, only one
                    // cut short, only comments, or only the usage report
                    // the gateway asked for and takes out), or an empty
                    // JSON body: no answer, and nothing sent, so another
                    // deployment may give one.
                    if first.nothing_in(held.as_slice()) && !may_be_empty {
                        warn!(request_id = %exchange.request_id, provider = %provider.name, received, event_stream, "provider ended its answer with nothing in it");
                        let what = if event_stream {
                            "ended its stream without a whole event"
                        } else {
                            "answered with an empty body"
                        };
                        return Err(self.deployment_failure(ApiError::upstream_error(format!(
                            "The provider '{}' {what}.",
                            provider.name
                        ))));
                    }
                    // Nor is a page or words where a JSON answer belongs (a
                    // base URL that reaches a web server, say).
                    if json_expected && !may_be_empty && meter.not_an_object() {
                        warn!(request_id = %exchange.request_id, provider = %provider.name, received, "provider answered 200 with a body that is not a JSON object");
                        return Err(self.deployment_failure(ApiError::upstream_error(format!(
                            "The provider '{}' answered 200 with a body that is not JSON.",
                            provider.name
                        ))));
                    }
                    ended = true;
                    break;
                }
                Ok(Err(e)) => {
                    let (outcome, domain, attempted) = classify(provider, &e, Phase::Answer);
                    return Err(self.outcome(outcome, domain, attempted));
                }
                Err(_) => {
                    return Err(self.deployment_failure(ApiError::upstream_timeout(format!(
                        "The provider '{}' sent no content within {first_token:?}.",
                        provider.name
                    ))))
                }
            }
        }
        // Nor is one JSON answer where a stream of events was asked for
        // (the SDKs would read no event, and no error): read whole above,
        // or held past what is metered.
        if exchange.stream
            && exchange.endpoint.streams_when_asked()
            && !event_stream
            && !may_be_empty
        {
            return Err(self.in_the_other_form(FOR_A_STREAM_ONE_JSON_ANSWER, received));
        }
        // A stream where one JSON answer was asked for is none the SDKs can
        // read (they would hand the client a string for an object); its
        // error before any content was judged above, as any stream's is.
        if json_expected && !exchange.stream && event_stream {
            return Err(self.in_the_other_form(FOR_ONE_JSON_ANSWER_A_STREAM, received));
        }
        // The provider's head, from the session the body is read from.
        let (response, declared_len) = {
            let Some(head) = body.session.response_header() else {
                return Err(self.headless());
            };
            // A decoded answer's length is not the provider's.
            let edits_body = meter.edits_body() || decoding;
            let response = client_response(
                head,
                exchange,
                &provider.name,
                report.attempts,
                edits_body,
                &redactor,
            )
            .map_err(|e| {
                Attempted::Final(ApiError::internal(format!(
                    "cannot build the response header: {e}"
                )))
            })?;
            let declared_len = head
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|_| !edits_body);
            (response, declared_len)
        };
        if !client.send_header(response).await {
            return Err(self.client_gone());
        }
        let send_timeout = client.swap_send_timeout(None);
        let copy = Copy {
            upstreams,
            endpoint: exchange.endpoint,
            bills: exchange.bills,
            provider,
            declared_len,
            idle: provider.timeouts.idle,
            deadline: answer.deadline,
            send_timeout,
            progress: client.progress(),
            backend: self.backend,
            ttfb: answer.ttfb,
            estimate: exchange.estimate,
            model: &self.route.targets[self.backend.target].model,
            reads_tier: self.route.targets[self.backend.target]
                .price
                .is_some_and(|price| price.tiered()),
            request_id: exchange.request_id,
            describe: self.describes(),
        };
        let end = copy
            .run(
                client,
                &mut body,
                report,
                settle,
                &mut meter,
                &mut redactor,
                (held.into_bytes(), received, ended),
            )
            .await;
        if !matches!(end, BodyEnd::ClientTooSlow { mid_send: true }) {
            // (An aborted client keeps the abort's own short timeout.)
            client.swap_send_timeout(send_timeout);
        }
        match end {
            BodyEnd::Complete => self.release(answer).await,
            // Left for the forwarder to continue elsewhere.
            BodyEnd::ProviderBroke(message) if client.resumable() => {
                return Ok(Attempted::StreamBroken(ApiError::upstream_error(message)))
            }
            BodyEnd::ClientGone => return Ok(Attempted::ClientGone),
            BodyEnd::ProviderBroke(_) | BodyEnd::ClientTooSlow { .. } => {}
        }
        Ok(Attempted::Answered)
    }

    /// The request's estimate, capped at the token limit this provider
    /// kind was sent when the request set none.
    fn estimate(&self) -> crate::cost::Estimate {
        let kind = adapter(self.provider().kind);
        self.exchange
            .estimate
            .clone()
            .or_max_tokens(kind.default_max_tokens())
    }

    /// Returns the answer's connection to the pool when the provider's
    /// response was read to its end (and it keeps connections alive).
    async fn release(&self, mut answer: Box<Answer>) {
        // Pingora's own verdict on release reads only the first
        // `Connection` header: a provider that says `keep-alive`, then
        // `close`, would leave a connection closing under the next request.
        let kept = answer
            .upstream
            .response_header()
            .is_some_and(connection_kept);
        if !kept || !answer.upstream.response_done() {
            return;
        }
        let Answer { upstream, peer, .. } = *answer;
        if let HttpSession::H1(done) = upstream {
            // Boxed: a large future, for the last moment of a request, that
            // would otherwise size its whole state.
            Box::pin(
                self.forwarder
                    .connections
                    .release(done, &peer, peer.options.idle_timeout),
            )
            .await;
        }
    }

    /// Reads out the body of an answer not taken (a refusal: an error body
    /// small and sent with its head) and returns its connection to the
    /// pool, so a provider refusing under load is asked again over the same
    /// connection, not a new one (and a TLS handshake) for every retry. A
    /// body slower or larger than that is not waited for: the connection
    /// is closed.
    async fn drain(&self, mut answer: Box<Answer>) {
        let kept = matches!(answer.upstream, HttpSession::H1(_))
            && answer
                .upstream
                .response_header()
                .is_some_and(may_keep_alive);
        if !kept {
            return;
        }
        let until = tokio::time::Instant::now() + DRAIN_WAIT;
        let mut left = DRAIN_BYTES;
        loop {
            match tokio::time::timeout_at(until, answer.upstream.read_response_body()).await {
                Ok(Ok(Some(chunk))) if chunk.len() <= left => left -= chunk.len(),
                Ok(Ok(None)) => break,
                _ => return,
            }
        }
        self.release(answer).await;
    }

    /// Reads a whole answer body (up to a bound) by `until` (the first
    /// token's deadline: nothing of it reaches the client before it is
    /// whole), each gap within the idle timeout; a client that goes away
    /// ends it.
    async fn read_whole(
        &self,
        answer: &mut UpstreamBody<'_>,
        until: Instant,
        client: &mut dyn Client,
    ) -> Result<Vec<u8>, Attempted> {
        let provider = self.provider();
        let mut body = Vec::new();
        loop {
            let (gap_end, _) = read_gap(provider.timeouts.idle, until);
            let read = tokio::select! {
                read = tokio::time::timeout_at(gap_end, answer.read()) => read,
                _ = client.gone() => return Err(self.client_gone()),
            };
            match read {
                Ok(Ok(Some(chunk))) if body.len() + chunk.len() <= MAX_METERED_JSON_BYTES => {
                    body.extend_from_slice(&chunk)
                }
                Ok(Ok(None)) => return Ok(body),
                Err(_) if Instant::now() >= until => {
                    return Err(self.deployment_failure(ApiError::upstream_timeout(format!(
                        "The provider '{}' did not finish its answer within {:?}.",
                        provider.name, provider.timeouts.first_token
                    ))))
                }
                _ => {
                    return Err(self.deployment_failure(ApiError::upstream_error(format!(
                        "The provider '{}' broke off its answer.",
                        provider.name
                    ))))
                }
            }
        }
    }

    /// An answer whose head the session does not hold.
    fn headless(&self) -> Attempted {
        self.deployment_failure(ApiError::upstream_error(format!(
            "The provider '{}' sent no response header.",
            self.provider().name
        )))
    }

    /// A whole answer read before anything goes to the client: an error
    /// (passed on, or a prompt too long that moves to context fallbacks) or
    /// a translated JSON answer (its length changes), its connection
    /// released first.
    async fn whole_answer(
        &self,
        answer: Box<Answer>,
        body: Vec<u8>,
        client: &mut dyn Client,
        report: &mut Report,
        settle: &mut dyn Settle,
        redactor: &Redactor<'_>,
    ) -> Result<Attempted, Attempted> {
        let provider = self.provider();
        let kind = adapter(provider.kind);
        let upstreams = &self.forwarder.upstreams;
        let ttfb = answer.ttfb;
        let Some(head) = answer.upstream.response_header() else {
            return Err(self.headless());
        };
        let status = head.status;
        // Passed on with an error answer: redacted as every header is.
        let content_type = head
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| redacted(redactor, value).ok());
        // Read to its end: the connection goes back to the pool (an error
        // or a translated answer would otherwise cost the next request a
        // new connection, and a TLS handshake).
        self.release(answer).await;
        let code = status.as_u16();
        let body = redactor.redact(&body).into_owned();
        let (status, content_type, answer) = if !status.is_success() {
            // The provider's words, read out of its body: masked again as
            // the client will read them.
            let error = kind
                .translates_answers()
                .then(|| masked(kind.translate_error(code, &body), redactor));
            let too_long = match &error {
                Some(error) => error.code == "context_length_exceeded",
                None => crate::openai::is_context_length_error(&body),
            };
            if too_long && self.may_change_context {
                upstreams.record_outcome(
                    self.backend,
                    Outcome::Success,
                    Domain::Deployment,
                    Some(ttfb),
                );
                let error = error.unwrap_or_else(|| {
                    ApiError::context_length_exceeded("The prompt is too long for the model.")
                });
                return Err(Attempted::ContextTooLong(error));
            }
            upstreams.record_outcome(
                self.backend,
                Outcome::Success,
                Domain::Deployment,
                Some(ttfb),
            );
            match error {
                // A translated error is the gateway's own OpenAI error.
                Some(error) => return Err(Attempted::Final(error)),
                // Not OpenAI's shape (empty, text, HTML): the client gets
                // one, with the provider's status and text.
                None if !crate::openai::is_openai_error(&body) => {
                    return Err(Attempted::Final(masked(
                        ApiError::from_provider_answer(&provider.name, code, &body),
                        redactor,
                    )))
                }
                None => {
                    let content_type =
                        content_type.unwrap_or(HeaderValue::from_static("application/json"));
                    (status, content_type, body)
                }
            }
        } else {
            // Should the provider report no usage, the gateway counts.
            let model = &self.route.targets[self.backend.target].model;
            crate::cost::Encoding::for_model(model).ready().await;
            let (answer, usage) = kind
                .translate_answer(&body, &self.route.name, &self.estimate(), model)
                .map_err(|e| self.error_in_answer(e, redactor))?;
            // One whole answer where a stream was asked for: none the SDKs
            // read (as in `answer`, for answers not translated).
            if self.exchange.stream && self.exchange.endpoint.streams_when_asked() {
                return Err(self.in_the_other_form(FOR_A_STREAM_ONE_JSON_ANSWER, body.len()));
            }
            report.usage = Some(usage);
            if let Some(capture) = self.describes() {
                report.answer =
                    Some(super::body::answer_details(&answer, capture).redacted(redactor));
            }
            (status, HeaderValue::from_static("application/json"), answer)
        };
        report.usage.get_or_insert_with(Default::default);
        settle.settle(report).await;
        upstreams.record_outcome(
            self.backend,
            Outcome::Success,
            Domain::Deployment,
            Some(ttfb),
        );
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = status;
        parts.headers.insert(header::CONTENT_TYPE, content_type);
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
        if !client
            .send_header(Box::new(ResponseHeader::from(parts)))
            .await
        {
            return Ok(Attempted::ClientGone);
        }
        report.first_byte_at.get_or_insert_with(Instant::now);
        let answer = Bytes::from(redactor.redact(&answer).into_owned());
        if !client.send_body(answer, true).await {
            return Ok(Attempted::ClientGone);
        }
        Ok(Attempted::Answered)
    }

    /// The provider's error inside an answer that came with a 200 (a JSON
    /// error body, a stream's error event before any content), masked of
    /// the provider's key and taken as the status it names would be: a
    /// 429 rests the deployment, a 401 or 403 (the gateway's key refused)
    /// moves on without a breaker count, another 4xx is the client's answer
    /// (no breaker counts it; a prompt too long moves to the context
    /// fallbacks), anything else fails the deployment.
    fn error_in_answer(&self, error: ApiError, redactor: &Redactor<'_>) -> Attempted {
        let mut error = masked(error, redactor);
        match error.status {
            429 => {
                let rest = self.forwarder.upstreams.rate_limit_cooldown();
                error.retry_after_ms = Some(rest.as_millis().max(1) as u64);
                self.outcome(
                    Outcome::RateLimited(None),
                    Domain::Deployment,
                    Attempted::RateLimited(error),
                )
            }
            // The gateway's key refused: another deployment may serve,
            // and the client is not told of a key it did not send.
            401 | 403 => self.outcome(
                Outcome::Neutral,
                Domain::Deployment,
                Attempted::deployment(ApiError::upstream_error(format!(
                    "The provider '{}' refused the gateway's credentials.",
                    self.provider().name
                ))),
            ),
            // A prompt too long moves on to a model with a larger context.
            400..=499 if error.code == "context_length_exceeded" && self.may_change_context => self
                .outcome(
                    Outcome::Neutral,
                    Domain::Deployment,
                    Attempted::ContextTooLong(error),
                ),
            400..=499 => self.outcome(
                Outcome::Neutral,
                Domain::Deployment,
                Attempted::Final(error),
            ),
            _ => self.deployment_failure(error),
        }
    }

    /// A continuation answered other than with a stream: a 4xx is final
    /// (a 400 may be a prefill refused, which the forwarder tries without),
    /// anything else a failure of the deployment.
    fn continuation_refused(&self, head: &ResponseHeader) -> Attempted {
        let status = head.status.as_u16();
        let mut error = ApiError::upstream_error(format!(
            "The provider '{}' answered {status} to the continuation.",
            self.provider().name
        ));
        if head.status.is_client_error() {
            error.status = status;
            return self.outcome(
                Outcome::Neutral,
                Domain::Deployment,
                Attempted::Final(error),
            );
        }
        self.deployment_failure(error)
    }

    /// An answer that must not reach the client, and what it means: a 5xx
    /// (a failure of the deployment, worth one more try when 500, 502,
    /// 503 or 529), a redirect or another answer that is neither a success
    /// nor an error (a failure of the deployment: see below), the
    /// provider's own 429 (the deployment cools down for its wait), or a
    /// 401/403 that means the gateway's key was refused (the tenant's key
    /// was fine, so the client must not see an authentication error).
    fn refused(&self, head: &ResponseHeader) -> Option<Attempted> {
        let name = &self.provider().name;
        let status = head.status.as_u16();
        match status {
            // A 3xx (or a 1xx Pingora did not read past) to an API call: a
            // base URL the provider moved, plain HTTP where it wants TLS, a
            // login page in the way. Not followed (the request, and the
            // provider's key with it, would go where the config does not
            // say), nor passed on (a client would get a 307 with no
            // `location`, or a 304 to a POST): failed over as a 5xx is.
            100..=199 | 300..=399 | 500..=599 => {
                let error = ApiError::upstream_error(if status >= 500 {
                    format!("The provider '{name}' answered {status}.")
                } else {
                    format!("The provider '{name}' answered {status}, a redirect or an answer the gateway does not take; check its base_url.")
                });
                Some(self.outcome(
                    Outcome::Failure,
                    Domain::Deployment,
                    Attempted::Retryable {
                        error,
                        domain: Domain::Deployment,
                        // 529: Anthropic's "overloaded". Never a redirect.
                        transient: matches!(status, 500 | 502 | 503 | 529),
                    },
                ))
            }
            429 => {
                let wait = retry_after(head);
                let mut error = ApiError::provider_rate_limited(name);
                // The deployment rests this long: the client is told so.
                let rest = wait.unwrap_or(self.forwarder.upstreams.rate_limit_cooldown());
                error.retry_after_ms = Some(rest.as_millis().max(1) as u64);
                Some(self.outcome(
                    Outcome::RateLimited(wait),
                    Domain::Deployment,
                    Attempted::RateLimited(error),
                ))
            }
            401 | 403 => Some(self.outcome(
                Outcome::Neutral,
                Domain::Deployment,
                Attempted::deployment(ApiError::upstream_error(format!(
                    "The provider '{name}' refused the gateway's credentials."
                ))),
            )),
            _ => None,
        }
    }
}

/// An answer's beginning, held back until its first content: the piece
/// read as it came (most answers are one), or the pieces joined once there
/// are several. At most one of the two holds anything.
#[derive(Default)]
struct Held {
    one: Bytes,
    joined: BytesMut,
}

impl Held {
    fn push(&mut self, piece: Bytes) {
        if piece.is_empty() {
            return;
        }
        if self.one.is_empty() && self.joined.is_empty() {
            self.one = piece;
            return;
        }
        if self.joined.is_empty() {
            self.joined
                .extend_from_slice(&std::mem::take(&mut self.one));
        }
        self.joined.extend_from_slice(&piece);
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn as_slice(&self) -> &[u8] {
        match self.joined.is_empty() {
            true => &self.one,
            false => &self.joined,
        }
    }

    fn into_bytes(self) -> Bytes {
        match self.joined.is_empty() {
            true => self.one,
            false => self.joined.freeze(),
        }
    }
}

/// Whether an HTTP/1 connection could be kept after an answer with this
/// head, before its body is read: a body of known length (chunked, or a
/// `Content-Length`: one that ends at the close cannot) and a connection
/// the provider keeps ([`connection_kept`]). This spares waiting for a
/// refusal's body whose connection is closed anyway.
fn may_keep_alive(head: &ResponseHeader) -> bool {
    let last_coding = tokens(head, header::TRANSFER_ENCODING).next_back();
    // Chunked only as the last coding; any other coding ends at the close.
    let known_length = match last_coding {
        Some(last) => last.eq_ignore_ascii_case("chunked"),
        None => {
            head.headers.contains_key(header::CONTENT_LENGTH)
                || head.status == http::StatusCode::NO_CONTENT
        }
    };
    known_length && connection_kept(head)
}

/// Whether the provider keeps the connection after this answer: no
/// `close` in any `Connection` header (Pingora's own verdict, applied on
/// release after this one, reads only the first), an HTTP/1.0 answer only
/// with `keep-alive` and never with a `Transfer-Encoding` (RFC 9112 6.1),
/// and never after a redirect (see below).
fn connection_kept(head: &ResponseHeader) -> bool {
    // A server answering an API call with a redirect (or a 1xx it should
    // not send) is misconfigured: the next attempt would take its
    // connection at once, before what it may still send after the answer
    // shows, and there is no retry under load to save.
    if head.status.is_redirection() || head.status.is_informational() {
        return false;
    }
    let has = |token: &str| tokens(head, header::CONNECTION).any(|t| t.eq_ignore_ascii_case(token));
    let alive = match head.version {
        http::Version::HTTP_10 => {
            has("keep-alive") && !head.headers.contains_key(header::TRANSFER_ENCODING)
        }
        _ => true,
    };
    alive && !has("close")
}

/// The comma-separated tokens of every `name` header of `head`.
fn tokens(
    head: &ResponseHeader,
    name: header::HeaderName,
) -> impl DoubleEndedIterator<Item = &str> {
    head.headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// The provider's wait after a 429: `retry-after-ms` when given, else
/// `retry-after` (seconds, fractions allowed), at least 100 ms and at most
/// an hour.
fn retry_after(head: &ResponseHeader) -> Option<Duration> {
    let number = |name: &str| {
        head.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|n| n.is_finite() && *n >= 0.0)
    };
    number("retry-after-ms")
        .map(|ms| ms / 1000.0)
        .or_else(|| number("retry-after"))
        .map(|secs| Duration::from_secs_f64(secs.min(3600.0)))
        // "Now" is not taken literally: retried at once, a deployment that
        // just refused would be asked again within microseconds.
        .map(|wait| wait.max(Duration::from_millis(100)))
}

/// When an I/O error happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Connecting, or sending the request: the network's doing.
    Connect,
    /// After the request reached the provider: what the provider did.
    Answer,
}

/// Maps a connector or I/O error to the breaker outcome, its failure
/// domain, and how the attempt ended. Before the request reached the
/// provider, failures (refused, reset, TLS, connect timeout) count against
/// the address, for every deployment on it; once it was sent, whatever
/// went wrong (a closed connection, a timeout, an answer that is no HTTP
/// or whose framing breaks) counts against the deployment (one model's
/// server dropping requests says nothing about the others). A reset is
/// worth one more try. The client's message names the provider, not its
/// address (the log's "attempt failed" line has that, for operators).
fn classify(
    provider: &ProviderSettings,
    e: &pingora::Error,
    phase: Phase,
) -> (Outcome, Domain, Attempted) {
    let name = &provider.name;
    let failure = |domain: Domain, transient: bool, error: ApiError| {
        (
            Outcome::Failure,
            domain,
            Attempted::Retryable {
                error,
                domain,
                transient,
            },
        )
    };
    match e.etype() {
        _ if e.esource() == &ErrorSource::Downstream => {
            (Outcome::Neutral, Domain::Deployment, Attempted::ClientGone)
        }
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => failure(
            Domain::Deployment,
            false,
            ApiError::upstream_timeout(format!("The provider '{name}' timed out.")),
        ),
        ErrorType::ConnectTimedout => failure(
            Domain::Transport,
            false,
            ApiError::upstream_timeout(format!(
                "The provider '{name}' could not be reached in time."
            )),
        ),
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError => failure(
            match phase {
                Phase::Connect => Domain::Transport,
                Phase::Answer => Domain::Deployment,
            },
            true,
            ApiError::upstream_error(format!(
                "The provider '{name}' closed the connection ({}).",
                e.etype().as_str(),
            )),
        ),
        // Reached, and what came back is no HTTP answer (a head that does
        // not parse, a body whose framing breaks): what the provider
        // answered, so its deployment's, as a 5xx is. Another model behind
        // the same address (a router's other path) may well answer.
        ErrorType::InvalidHTTPHeader if phase == Phase::Answer => failure(
            Domain::Deployment,
            false,
            ApiError::upstream_error(format!(
                "The provider '{name}' answered with something that is not HTTP ({}).",
                e.etype().as_str(),
            )),
        ),
        _ if phase == Phase::Answer => {
            warn!(provider = %name, error = %e, "the provider's answer could not be read");
            failure(
                Domain::Deployment,
                false,
                ApiError::upstream_error(format!(
                    "The provider '{name}' answered with a body that could not be read ({}).",
                    e.etype().as_str(),
                )),
            )
        }
        _ => failure(
            Domain::Transport,
            false,
            ApiError::upstream_error(format!(
                "The provider '{name}' could not be reached ({}).",
                e.etype().as_str(),
            )),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_held_is_every_piece_in_order_joined_only_when_several() {
        assert_eq!(Held::default().into_bytes(), Bytes::new());
        let one = Bytes::from_static(b"data: {}\n\n");
        let mut held = Held::default();
        held.push(Bytes::new());
        held.push(one.clone());
        held.push(Bytes::new());
        assert_eq!(held.as_slice(), &one[..]);
        // Not copied: the piece read is the piece sent.
        assert_eq!(held.into_bytes().as_ptr(), one.as_ptr());
        let mut held = Held::default();
        for piece in ["a", "", "bc", "d"] {
            held.push(Bytes::from(piece));
        }
        assert_eq!((held.len(), held.as_slice()), (4, &b"abcd"[..]));
        assert_eq!(held.into_bytes(), Bytes::from("abcd"));
    }

    #[test]
    fn a_refusal_is_read_out_only_when_its_connection_could_be_kept() {
        let head = |version, headers: &[(&str, &str)]| {
            let mut head = ResponseHeader::build(503, None).unwrap();
            head.set_version(version);
            for (name, value) in headers {
                head.append_header(name.to_string(), *value).unwrap();
            }
            head
        };
        let v11 = http::Version::HTTP_11;
        assert!(may_keep_alive(&head(v11, &[("content-length", "12")])));
        assert!(may_keep_alive(&head(
            v11,
            &[("transfer-encoding", "chunked")]
        )));
        assert!(may_keep_alive(&head(
            http::Version::HTTP_10,
            &[("content-length", "2"), ("connection", "Keep-Alive")]
        )));
        // Ends at the close; closed after; HTTP/1.0 by default.
        assert!(!may_keep_alive(&head(v11, &[])));
        assert!(!may_keep_alive(&head(
            v11,
            &[("transfer-encoding", "gzip")]
        )));
        assert!(!may_keep_alive(&head(
            v11,
            &[("transfer-encoding", "chunked, gzip")]
        )));
        assert!(may_keep_alive(&head(
            v11,
            &[("transfer-encoding", "gzip, chunked")]
        )));
        assert!(!may_keep_alive(&head(
            v11,
            &[("content-length", "2"), ("connection", "keep-alive, Close")]
        )));
        assert!(!may_keep_alive(&head(
            http::Version::HTTP_10,
            &[("content-length", "2")]
        )));
        // `close` in any of several headers (Pingora reads the first).
        assert!(!may_keep_alive(&head(
            v11,
            &[
                ("content-length", "2"),
                ("connection", "keep-alive"),
                ("connection", "close")
            ]
        )));
        assert!(!may_keep_alive(&head(
            http::Version::HTTP_10,
            &[
                ("content-length", "2"),
                ("connection", "keep-alive"),
                ("connection", "close")
            ]
        )));
        let mut redirect = head(v11, &[("content-length", "0")]);
        redirect.set_status(307).unwrap();
        assert!(!may_keep_alive(&redirect), "a redirect's connection");
        // HTTP/1.0 with a transfer coding: closed after (RFC 9112 6.1).
        assert!(!may_keep_alive(&head(
            http::Version::HTTP_10,
            &[
                ("transfer-encoding", "chunked"),
                ("connection", "keep-alive")
            ]
        )));
    }
}
