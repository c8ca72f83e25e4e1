//! The response cache in the request path: whether a request may be
//! answered from the cache, a hit served in the form the client asked for,
//! identical requests in flight coalesced, and a complete answer stored.
//!
//! A hit counts as a request (RPM, the request counters, `/v1/usage`) but
//! reserves and bills no tokens; what the provider call would have cost is
//! counted as saved. Only a complete, successful answer is stored: never an
//! error, a broken stream or a truncated one.

use super::client::{self, Client};
use super::forward::headers::{is_event_stream, HeaderError, X_REQUEST_ID};
use super::forward::{
    client_gone_reason, Report, CLIENT_CLOSED, CLIENT_TOO_SLOW, GATEWAY_STOPPING,
};
use super::{Gateway, RequestCtx};
use crate::cache::{self, flight, Entry, Form, Join, Key, Landed};
use crate::config::{ModelCache, PICO_PER_USD};
use crate::limits::Settlement;
use crate::metrics;
use crate::openai::{ApiError, Endpoint, RequestFields};
use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use std::sync::Arc;
use std::time::{Duration, Instant};

const X_RUNESTONE_CACHE: HeaderName = HeaderName::from_static("x-runestone-cache");

/// What the cache does for one request.
pub(super) struct Plan {
    tenant: usize,
    route: usize,
    endpoint: Endpoint,
    /// The request's key, when its answer may be stored (not with
    /// `no-store`, not when the cache is bypassed): a bypassed request is
    /// not digested.
    key: Option<Key>,
    ttl: Duration,
    /// Look the request up (it has a key, and no `Cache-Control:
    /// no-cache`).
    lookup: bool,
    form: Form,
}

impl Plan {
    /// The `x-runestone-cache` a forwarded answer carries.
    pub(super) fn header(&self) -> &'static str {
        if self.lookup {
            "miss"
        } else {
            "bypass"
        }
    }
}

/// What looking a request up came to.
pub(super) enum Looked {
    /// Answered from the cache or from another request's call.
    Served,
    /// Not found: forward it, leading the flight when there is one.
    Forward(Option<cache::flight::Leader>),
}

/// The `Cache-Control` request directives the cache honours.
fn directives(session: &Session) -> (bool, bool) {
    let mut no_cache = false;
    let mut no_store = false;
    for value in session
        .req_header()
        .headers
        .get_all(http::header::CACHE_CONTROL)
    {
        for directive in value.to_str().unwrap_or_default().split(',') {
            let directive = directive.trim();
            no_cache |= directive.eq_ignore_ascii_case("no-cache");
            no_store |= directive.eq_ignore_ascii_case("no-store");
        }
    }
    (no_cache, no_store)
}

/// Whether a chat or text completion asks for the same answer every time:
/// `temperature` 0 or a `seed`.
fn deterministic(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Sampling {
        #[serde(default)]
        temperature: Option<f64>,
        #[serde(default)]
        seed: Option<serde_json::Number>,
    }
    serde_json::from_slice::<Sampling>(body)
        .is_ok_and(|s| s.temperature == Some(0.0) || s.seed.is_some())
}

impl Gateway {
    /// The cache's plan for a request, `None` when the cache does not
    /// apply (no `cache:` section, an endpoint it does not keep).
    pub(super) fn cache_plan(
        &self,
        session: &Session,
        tenant: usize,
        route: usize,
        endpoint: Endpoint,
        fields: &RequestFields<'_>,
        body: &[u8],
    ) -> Option<Plan> {
        let cache = self.cache.as_ref()?;
        if !matches!(
            endpoint,
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Embeddings
        ) {
            return None;
        }
        let model = &self.config.models[route];
        let ttl = match model.cache {
            ModelCache::Inherit => cache.settings.ttl,
            ModelCache::Ttl(ttl) => ttl,
            ModelCache::Off => Duration::ZERO,
        };
        let (no_cache, no_store) = directives(session);
        let eligible = !ttl.is_zero()
            && self.config.tenants[tenant].cache
            && (endpoint == Endpoint::Embeddings
                || !cache.settings.only_deterministic
                || deterministic(body))
            && !no_store;
        let key = match eligible {
            true => {
                let tenant_id = &self.config.tenants[tenant].id;
                Some(cache::key::key(
                    tenant_id,
                    &model.name,
                    endpoint.name(),
                    body,
                )?)
            }
            false => None,
        };
        let plan = Plan {
            tenant,
            route,
            endpoint,
            key,
            ttl,
            lookup: eligible && !no_cache,
            form: Form {
                stream: fields.stream && endpoint != Endpoint::Embeddings,
                include_usage: fields.client_wants_usage(),
            },
        };
        if !plan.lookup {
            self.count_cache(&plan, "bypass");
        }
        Some(plan)
    }

    fn count_cache(&self, plan: &Plan, outcome: &str) {
        let tenant = &self.config.tenants[plan.tenant].id;
        let model = &self.config.models[plan.route].name;
        metrics::CACHE_TOTAL
            .with_label_values(&[tenant, model, outcome])
            .inc();
    }

    /// Looks the request up: a stored answer, or the same request's
    /// provider call in flight here. Served, or what to forward with.
    pub(super) async fn cache_lookup(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        plan: &Plan,
    ) -> Result<Looked, ApiError> {
        let (Some(cache), Some(key), true) = (self.cache.as_ref(), plan.key, plan.lookup) else {
            return Ok(Looked::Forward(None));
        };
        let tenant_id = &self.config.tenants[plan.tenant].id;
        if let Some(entry) = cache.get(tenant_id, &key, plan.ttl).await {
            let age = cache::now_ms().saturating_sub(entry.stored_at_ms) / 1000;
            if self
                .serve_stored(session, ctx, plan, &entry, age, "hit")
                .await?
            {
                return Ok(Looked::Served);
            }
        }
        // Another request may be asking the provider the same: wait for
        // it. A call that fails lets the next waiter lead (a few rounds,
        // not a herd at once).
        for _ in 0..FLIGHT_ROUNDS {
            let waiting = match cache.flights.join(key, plan.form, FLIGHT_BYTES) {
                Join::Lead(leader) => {
                    self.count_cache(plan, "miss");
                    return Ok(Looked::Forward(Some(leader)));
                }
                Join::Wait(waiting) => waiting,
            };
            if self.wait_on(session, ctx, plan, waiting).await? {
                return Ok(Looked::Served);
            }
        }
        self.count_cache(plan, "miss");
        Ok(Looked::Forward(None))
    }

    /// Waits on another request's call: follows its stream live when asked
    /// the same way, else takes its answer once it lands. True when the
    /// request was answered (or its client left); false when the call
    /// failed and this request must find its answer elsewhere.
    async fn wait_on(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        plan: &Plan,
        waiting: flight::Waiting,
    ) -> Result<bool, ApiError> {
        if waiting.form() == plan.form && plan.form.stream {
            let Some(grant) = self
                .admit_answered(session, ctx, plan.tenant, plan.route)
                .await?
            else {
                return Ok(true);
            };
            let rate_limit_headers = super::admission::rate_limit_headers(&grant.state);
            ctx.grant = Some(grant);
            let followed = {
                let mut follower = Following {
                    session: &mut *session,
                    request_id: &ctx.request_id,
                    rate_limit_headers,
                };
                waiting.follow(&mut follower).await
            };
            match followed {
                flight::Followed::Whole => {
                    // Settled before the client sees the end, as any answer.
                    match waiting.landed().await {
                        Landed::Answer(entry) => {
                            self.settle_hit(ctx, plan, entry.cost_pusd, "coalesced")
                                .await
                        }
                        // Whole, but not one to keep (too large, say).
                        Landed::Unstored(cost_pusd) => {
                            self.settle_hit(ctx, plan, cost_pusd, "coalesced").await
                        }
                        // The stream the client got ended with the error
                        // the first request got.
                        Landed::Failed(reason) => {
                            ctx.cache = Some("coalesced");
                            ctx.error_reason = Some(reason.unwrap_or("provider_stream_broken"));
                            self.release(ctx).await;
                        }
                    }
                    let _ = session.write_response_body(Some(Bytes::new()), true).await;
                    return Ok(true);
                }
                // Nothing reached the client: as one leaving while it
                // waits for the landing.
                flight::Followed::Abandoned => {
                    ctx.error_reason = Some(client_gone_reason());
                    self.release(ctx).await;
                    return Ok(true);
                }
                // Served from the flight as far as the client read: one
                // request, no tokens, as a client leaving any answer.
                flight::Followed::ClientLeft { whole } => {
                    if !whole {
                        ctx.error_reason = Some(client_gone_reason());
                        if crate::gateway::client::requests_ended() {
                            // Still there: told its answer was cut.
                            let event = ApiError::stopped_mid_answer().sse_event();
                            let _ = session.write_response_body(Some(event), true).await;
                        }
                    }
                    self.settle_hit(ctx, plan, 0, "coalesced").await;
                    return Ok(true);
                }
                flight::Followed::Broken => {
                    // Something went out and the rest cannot: the stream
                    // ends with an error the SDKs raise (no `[DONE]`).
                    ctx.cache = Some("coalesced");
                    ctx.error_reason = Some("provider_stream_broken");
                    self.release(ctx).await;
                    let error = ApiError::upstream_error(
                        "The stream this request shared with an identical one broke off.",
                    );
                    // (Only completions and embeddings are kept: never a
                    // Responses stream.)
                    let event = error.sse_event();
                    let _ = session.write_response_body(Some(event), true).await;
                    return Ok(true);
                }
                // Nothing to follow: the landing decides.
                flight::Followed::Nothing => {}
            }
        }
        let landed = tokio::select! {
            landed = waiting.landed() => landed,
            _ = crate::gateway::client::left_or_ended(session) => {
                ctx.error_reason = Some(client_gone_reason());
                self.release(ctx).await;
                return Ok(true);
            }
        };
        drop(waiting);
        if let Landed::Answer(entry) = landed {
            if self
                .serve_stored(session, ctx, plan, &entry, 0, "coalesced")
                .await?
            {
                return Ok(true);
            }
        }
        self.release(ctx).await;
        Ok(false)
    }

    /// Gives back a grant taken for an answer that did not come.
    async fn release(&self, ctx: &mut RequestCtx) {
        if let Some(grant) = ctx.grant.take() {
            self.limiter.release(grant).await;
        }
    }

    /// Answers from a stored (or just landed) entry, admitted as a request
    /// of no tokens; false (nothing sent) when the entry cannot be given in
    /// the form asked for (a stream of an answer only JSON can carry, or a
    /// stored answer that is not a JSON object).
    async fn serve_stored(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        plan: &Plan,
        entry: &Entry,
        age: u64,
        outcome: &'static str,
    ) -> Result<bool, ApiError> {
        let now = cache::now_secs();
        let rendered = match plan.form.stream {
            true if !entry.streamable => None,
            true => serde_json::from_str(entry.answer.get())
                .ok()
                .and_then(|answer| {
                    cache::replay::render_stream(&answer, plan.form.include_usage, now)
                })
                .map(|stream| (stream, "text/event-stream")),
            false => cache::replay::render_json(&entry.answer, now)
                .map(|json| (json, "application/json")),
        };
        let Some((body, content_type)) = rendered else {
            return Ok(false);
        };
        if ctx.grant.is_none() {
            let Some(grant) = self
                .admit_answered(session, ctx, plan.tenant, plan.route)
                .await?
            else {
                return Ok(true);
            };
            ctx.grant = Some(grant);
        }
        let grant = ctx.grant.as_ref().expect("admitted");
        let rate_limit_headers = super::admission::rate_limit_headers(&grant.state);
        let header = hit_header(
            200,
            HeaderValue::from_static(content_type),
            Some(body.len()),
            &ctx.request_id,
            age,
            &rate_limit_headers,
        )
        .map_err(|e| ApiError::internal(format!("the header of a cache hit: {e}")))?;
        self.settle_hit(ctx, plan, entry.cost_pusd, outcome).await;
        ctx.exchange.first_byte_at = Some(Instant::now());
        super::respond::write_complete(session, header, body).await;
        Ok(true)
    }

    /// Settles a request answered without a provider call: one request, no
    /// tokens, no cost; `saved_pusd` counted as saved.
    async fn settle_hit(
        &self,
        ctx: &mut RequestCtx,
        plan: &Plan,
        saved_pusd: i64,
        outcome: &'static str,
    ) {
        ctx.cache = Some(outcome);
        self.count_cache(plan, outcome);
        if saved_pusd > 0 {
            metrics::CACHE_SAVED_USD
                .with_label_values(&[
                    &self.config.tenants[plan.tenant].id,
                    &self.config.models[plan.route].name,
                ])
                .inc_by(saved_pusd as f64 / PICO_PER_USD);
        }
        if let Some(grant) = ctx.grant.take() {
            let settlement = Settlement {
                usage: Default::default(),
                cost_pusd: 0,
                duration: ctx.started.elapsed(),
                cache_saved_pusd: Some(saved_pusd),
            };
            self.limiter.settle(grant, settlement).await;
        }
    }

    /// After forwarding: lands the flight with a complete answer (the
    /// waiters go first) and stores it.
    pub(super) async fn cache_store(
        &self,
        plan: &Plan,
        recorded: Recorded,
        mut leader: Option<flight::Leader>,
        report: &Report,
        cost_pusd: i64,
    ) {
        let delivered = recorded.delivered() && report.error_reason.is_none();
        let entry = self.entry(plan, recorded, report, cost_pusd).map(Arc::new);
        // Dropped at the end, once the entry is stored (see `Leader::land`).
        if let Some(leader) = &mut leader {
            leader.land(match (&entry, delivered) {
                (Some(entry), _) => Landed::Answer(entry.clone()),
                (None, true) => Landed::Unstored(cost_pusd),
                // Its client's leaving or slowness is not the followers'.
                (None, false) => Landed::Failed(report.error_reason.filter(|reason| {
                    ![CLIENT_CLOSED, CLIENT_TOO_SLOW, GATEWAY_STOPPING].contains(reason)
                })),
            });
        }
        let (Some(cache), Some(entry)) = (&self.cache, entry) else {
            return;
        };
        if let Some(key) = &plan.key {
            let tenant = &self.config.tenants[plan.tenant].id;
            cache.put(tenant, key, &entry, plan.ttl).await;
        }
    }

    /// The entry a forwarded answer makes, if it is one worth keeping: a
    /// complete 200 answer of the endpoint's shape, without an error, its
    /// usage reported (a stream's own count is not passed off as the
    /// provider's), every provider key redacted (a key split across a
    /// stream's events is whole once assembled).
    fn entry(
        &self,
        plan: &Plan,
        recorded: Recorded,
        report: &Report,
        cost_pusd: i64,
    ) -> Option<Entry> {
        if report.error_reason.is_some() {
            return None;
        }
        let (stream, body) = recorded.complete()?;
        let usage = report.total_usage();
        if usage.estimated {
            // The gateway's own count (a stream may carry it as its usage
            // chunk) is not passed off as the provider's.
            return None;
        }
        let (answer, streamable) = match stream {
            true => (
                cache::replay::from_stream(&body, plan.endpoint, Some(usage))?,
                true,
            ),
            false => {
                let answer = cache::replay::from_json(&body, plan.endpoint)?;
                let streamable = cache::replay::streamable(&answer);
                (answer, streamable)
            }
        };
        let bytes = crate::redact::redact_every(
            self.upstreams.redact_keys(),
            serde_json::to_vec(&answer).ok()?,
        );
        Some(Entry {
            stored_at_ms: cache::now_ms(),
            cost_pusd,
            streamable,
            answer: serde_json::from_slice(&bytes).ok()?,
        })
    }

    /// The client wrapped for the cache: its answer kept for storing and
    /// published to the flight's followers.
    pub(super) fn recorder<'a>(
        &self,
        client: &'a mut dyn Client,
        plan: &Plan,
        leader: Option<&flight::Leader>,
    ) -> Recorder<'a> {
        let max_bytes = self
            .cache
            .as_ref()
            .map_or(0, |c| c.settings.max_entry_bytes);
        Recorder {
            inner: client,
            header: plan.header(),
            flight: leader.map(|l| l.flight().clone()),
            max_bytes: if plan.key.is_some() || leader.is_some() {
                max_bytes
            } else {
                0
            },
            recorded: Recorded::default(),
            client_gone: false,
            hold_end: plan.key.is_some(),
            held_end: None,
            send_timeout: None,
        }
    }
}

/// Rounds of waiting on identical requests' calls before making one's own.
const FLIGHT_ROUNDS: usize = 3;

/// The most of a stream in flight kept for requests that follow it (they
/// get it from its start); a longer stream breaks off for its followers.
const FLIGHT_BYTES: usize = crate::cost::MAX_METERED_JSON_BYTES;

/// The head of an answer from the cache (a stored one, of `len` bytes, or
/// one followed live, of a length not known yet). Built on `http`'s
/// types directly: names are constants, no header-case map.
fn hit_header(
    status: u16,
    content_type: HeaderValue,
    len: Option<usize>,
    request_id: &str,
    age: u64,
    rate_limit_headers: &[(HeaderName, HeaderValue)],
) -> Result<ResponseHeader, HeaderError> {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = http::StatusCode::from_u16(status)?;
    let headers = &mut parts.headers;
    // Room for the framing Pingora adds too.
    headers.reserve(6 + rate_limit_headers.len());
    headers.insert(header::CONTENT_TYPE, content_type);
    if let Some(len) = len {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    headers.insert(X_REQUEST_ID, HeaderValue::from_str(request_id)?);
    headers.insert(X_RUNESTONE_CACHE, HeaderValue::from_static("hit"));
    headers.insert(header::AGE, HeaderValue::from(age));
    for (name, value) in rate_limit_headers {
        headers.insert(name.clone(), value.clone());
    }
    Ok(ResponseHeader::from(parts))
}

/// What a client got, as far as the cache keeps it.
#[derive(Default)]
pub(super) struct Recorded {
    status: Option<u16>,
    stream: bool,
    body: Vec<u8>,
    overflowed: bool,
    ended: bool,
    aborted: bool,
}

impl Recorded {
    /// Whether a whole 200 answer went out (kept or not).
    fn delivered(&self) -> bool {
        self.status == Some(200) && self.ended && !self.aborted
    }

    /// A whole 200 answer (whether a stream, and its body), if that is
    /// what it was and it was kept.
    fn complete(self) -> Option<(bool, Vec<u8>)> {
        (self.status == Some(200) && self.ended && !self.aborted && !self.overflowed)
            .then_some((self.stream, self.body))
    }
}

/// A client wrapped for the cache: its answer's head carries
/// `x-runestone-cache`, and what it gets is recorded (up to the bound) and
/// published to the flight's followers. While followers follow, the
/// provider call goes on even when this client leaves.
pub(super) struct Recorder<'a> {
    inner: &'a mut dyn Client,
    header: &'static str,
    flight: Option<Arc<flight::Flight>>,
    max_bytes: usize,
    recorded: Recorded,
    client_gone: bool,
    /// The answer may be stored: its last piece waits until it is, so a
    /// client that asks again as soon as it has its answer finds it.
    hold_end: bool,
    held_end: Option<Bytes>,
    /// The client's send timeout while others may follow: enforced here on
    /// the client's own sends, not by the copy, whose cut would end their
    /// answers with this client's.
    send_timeout: Option<Duration>,
}

impl Recorder<'_> {
    /// What was recorded, and the answer's last piece if it was held back
    /// (to send once the answer is stored).
    pub(super) fn into_parts(self) -> (Recorded, Option<Bytes>) {
        let held = self.held_end.filter(|_| !self.client_gone);
        (self.recorded, held)
    }

    fn followed(&self) -> bool {
        self.flight.as_ref().is_some_and(|f| f.has_waiters())
    }
}

#[async_trait]
impl Client for Recorder<'_> {
    fn request_headers(&self) -> &http::HeaderMap {
        self.inner.request_headers()
    }

    async fn send_header(&mut self, mut header: Box<ResponseHeader>) -> bool {
        let _ = header.insert_header(X_RUNESTONE_CACHE, self.header);
        let status = header.status.as_u16();
        let content_type = header
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        self.recorded.status = Some(status);
        self.recorded.stream = is_event_stream(&header);
        if let Some(flight) = &self.flight {
            flight.head(status, content_type);
        }
        self.client_gone = !self.inner.send_header(header).await;
        !self.client_gone || self.followed()
    }

    async fn send_body(&mut self, body: Bytes, end: bool) -> bool {
        let recorded = &mut self.recorded;
        if !recorded.overflowed {
            if recorded.body.len() + body.len() > self.max_bytes {
                recorded.overflowed = true;
                recorded.body = Vec::new();
            } else {
                recorded.body.extend_from_slice(&body);
            }
        }
        recorded.ended |= end;
        if let Some(flight) = &self.flight {
            flight.body(&body, end);
        }
        if end && self.hold_end && self.recorded.status == Some(200) && !self.client_gone {
            self.held_end = Some(body);
            return true;
        }
        if !self.client_gone {
            let sent = match self.send_timeout {
                None => self.inner.send_body(body, end).await,
                Some(timeout) => {
                    let progress = self.inner.progress();
                    let mut send = self.inner.send_body(body, end);
                    let sent = client::while_taken(&mut send, progress, Some(timeout), None).await;
                    drop(send);
                    match sent {
                        Some(sent) => sent,
                        None => {
                            client::note_untaken();
                            self.inner.abort().await;
                            false
                        }
                    }
                }
            };
            self.client_gone = !sent;
        }
        !self.client_gone || self.followed()
    }

    async fn gone(&mut self) {
        if !self.client_gone {
            self.inner.gone().await;
            // Ended by the gateway, not left: its client is still there,
            // to be told so in-band.
            self.client_gone = !crate::gateway::client::requests_ended();
        }
        // Followers still reading: the call goes on for them (unless the
        // gateway ends its requests: they are ended too).
        while self.followed() && !crate::gateway::client::requests_ended() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn abort(&mut self) {
        self.recorded.aborted = true;
        self.inner.abort().await;
    }

    fn swap_send_timeout(&mut self, timeout: Option<Duration>) -> Option<Duration> {
        if self.flight.is_none() {
            return self.inner.swap_send_timeout(timeout);
        }
        // Not handed to the copy while others may follow (see
        // `send_timeout`): kept here for the copy, given back after it.
        match self.send_timeout.take() {
            None => self.send_timeout = self.inner.swap_send_timeout(None),
            kept => {
                self.inner.swap_send_timeout(kept);
            }
        }
        None
    }

    fn progress(&self) -> crate::gateway::client::Progress {
        self.inner.progress()
    }
}

/// Writes a followed stream to a waiting client.
struct Following<'a> {
    session: &'a mut Session,
    request_id: &'a str,
    rate_limit_headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

#[async_trait]
impl flight::Follower for Following<'_> {
    async fn head(&mut self, status: u16, content_type: &str) -> bool {
        let Ok(content_type) = HeaderValue::from_str(content_type) else {
            return false;
        };
        let Ok(mut header) = hit_header(
            status,
            content_type,
            None,
            self.request_id,
            0,
            &self.rate_limit_headers,
        ) else {
            return false;
        };
        crate::gateway::client::frame_unknown_length(self.session, &mut header);
        self.session
            .write_response_header(Box::new(header), false)
            .await
            .is_ok()
    }

    async fn body(&mut self, chunk: Bytes) -> bool {
        crate::gateway::client::write_body(self.session, chunk, false).await
    }

    async fn gone(&mut self) {
        crate::gateway::client::left_or_ended(self.session).await
    }
}
