//! The response cache in the request path: whether a request may be
//! answered from the cache, a hit served in the form the client asked for,
//! identical requests in flight coalesced, and a complete answer stored.
//!
//! A hit counts as a request (RPM, the request counters, `/v1/usage`) but
//! reserves and bills no tokens; what the provider call would have cost is
//! counted as saved. Only a complete, successful answer is stored: never an
//! error, a broken stream or a truncated one.

use super::client::Client;
use super::forward::Report;
use super::{Gateway, RequestCtx};
use crate::cache::{self, flight, Entry, Form, Join, Key, Landed};
use crate::config::{ModelCache, PICO_PER_USD};
use crate::limits::Settlement;
use crate::metrics;
use crate::openai::{ApiError, Endpoint, RequestFields};
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

const X_RUNESTONE_CACHE: &str = "x-runestone-cache";

/// What the cache does for one request.
pub(super) struct Plan {
    tenant: usize,
    endpoint: Endpoint,
    key: Key,
    ttl: Duration,
    /// Look the request up (not with `Cache-Control: no-cache`, not when
    /// the cache is bypassed).
    lookup: bool,
    /// Store its answer (not with `no-store`, not when bypassed).
    store: bool,
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
    for value in session.req_header().headers.get_all("cache-control") {
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
        let tenant_id = &self.config.tenants[tenant].id;
        let key = cache::key::key(tenant_id, &model.name, endpoint.name(), body)?;
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
        let plan = Plan {
            tenant,
            endpoint,
            key,
            ttl,
            lookup: eligible && !no_cache,
            store: eligible,
            form: Form {
                stream: fields.stream && endpoint != Endpoint::Embeddings,
                include_usage: fields.client_wants_usage(),
            },
        };
        if !plan.lookup {
            self.count_cache(tenant, route, "bypass");
        }
        Some(plan)
    }

    fn count_cache(&self, tenant: usize, route: usize, outcome: &str) {
        let tenant = &self.config.tenants[tenant].id;
        let model = &self.config.models[route].name;
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
        tenant: usize,
        route: usize,
        plan: &Plan,
    ) -> Result<Looked, ApiError> {
        let Some(cache) = self.cache.as_ref().filter(|_| plan.lookup) else {
            return Ok(Looked::Forward(None));
        };
        let tenant_id = &self.config.tenants[tenant].id;
        if let Some(entry) = cache.get(tenant_id, &plan.key).await {
            let age = cache::now_secs().saturating_sub(entry.stored_at);
            self.serve_stored(
                session,
                ctx,
                tenant,
                route,
                plan,
                &entry.answer,
                entry.cost_pusd,
                age,
                "hit",
            )
            .await?;
            return Ok(Looked::Served);
        }
        let flight = match cache
            .flights
            .join(plan.key, plan.form, cache.settings.max_entry_bytes)
        {
            Join::Lead(leader) => {
                self.count_cache(tenant, route, "miss");
                return Ok(Looked::Forward(Some(leader)));
            }
            Join::Wait(flight) => flight,
        };
        // Another request is asking the provider the same: wait for it.
        if flight.form() == plan.form && plan.form.stream {
            let Some(grant) = self.admit_answered(session, ctx, tenant, route).await? else {
                return Ok(Looked::Served);
            };
            let rate_limit_headers = super::admission::rate_limit_headers(&grant.state);
            ctx.grant = Some(grant);
            let followed = {
                let mut follower = Following {
                    session: &mut *session,
                    request_id: &ctx.request_id,
                    rate_limit_headers,
                };
                flight.follow(&mut follower).await
            };
            match followed {
                Ok(true) => {
                    // Settled before the client sees the end, as any answer.
                    let saved = match flight.landed().await {
                        Landed::Answer(_, cost) => cost,
                        Landed::Failed => 0,
                    };
                    self.settle_hit(ctx, tenant, route, saved, "coalesced")
                        .await;
                    let _ = session.write_response_body(Some(Bytes::new()), true).await;
                    return Ok(Looked::Served);
                }
                Err(()) => {
                    // Cut off mid-stream (the client left, or the leader's
                    // answer went past the bound): what was sent stands.
                    ctx.error_reason = Some("provider_stream_broken");
                    session.set_keepalive(None);
                    return Ok(Looked::Served);
                }
                // Nothing to follow: the landing decides.
                Ok(false) => {}
            }
        }
        let landed = tokio::select! {
            landed = flight.landed() => landed,
            _ = session.downstream_session.read_body_or_idle(true) => return Ok(Looked::Served),
        };
        match landed {
            Landed::Answer(answer, cost_pusd) => {
                self.serve_stored(
                    session,
                    ctx,
                    tenant,
                    route,
                    plan,
                    &answer,
                    cost_pusd,
                    0,
                    "coalesced",
                )
                .await?;
                Ok(Looked::Served)
            }
            Landed::Failed => {
                // No answer to share: its own call, given back what it took.
                if let Some(grant) = ctx.grant.take() {
                    self.limiter.release(grant).await;
                }
                self.count_cache(tenant, route, "miss");
                Ok(Looked::Forward(None))
            }
        }
    }

    /// Answers from a stored (or just landed) answer, admitted as a
    /// request of no tokens.
    #[allow(clippy::too_many_arguments)]
    async fn serve_stored(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        tenant: usize,
        route: usize,
        plan: &Plan,
        answer: &Map<String, Value>,
        cost_pusd: i64,
        age: u64,
        outcome: &'static str,
    ) -> Result<(), ApiError> {
        if ctx.grant.is_none() {
            let Some(grant) = self.admit_answered(session, ctx, tenant, route).await? else {
                return Ok(());
            };
            ctx.grant = Some(grant);
        }
        let now = cache::now_secs();
        let (body, content_type) = match plan.form.stream {
            true => match cache::replay::render_stream(answer, plan.form.include_usage, now) {
                Some(stream) => (stream, "text/event-stream"),
                None => (cache::replay::render_json(answer, now), "application/json"),
            },
            false => (cache::replay::render_json(answer, now), "application/json"),
        };
        let grant = ctx.grant.as_ref().expect("admitted");
        let rate_limit_headers = super::admission::rate_limit_headers(&grant.state);
        let header = cached_header(
            &ctx.request_id,
            content_type,
            body.len(),
            age,
            &rate_limit_headers,
        )
        .map_err(|e| ApiError::internal(e.to_string()))?;
        self.settle_hit(ctx, tenant, route, cost_pusd, outcome)
            .await;
        ctx.exchange.first_byte_at = Some(Instant::now());
        super::respond::write_complete(session, header, body).await;
        Ok(())
    }

    /// Settles a request answered without a provider call: one request, no
    /// tokens, no cost; `saved_pusd` counted as saved.
    async fn settle_hit(
        &self,
        ctx: &mut RequestCtx,
        tenant: usize,
        route: usize,
        saved_pusd: i64,
        outcome: &'static str,
    ) {
        ctx.cache = Some(outcome);
        self.count_cache(tenant, route, outcome);
        if saved_pusd > 0 {
            metrics::CACHE_SAVED_USD
                .with_label_values(&[
                    &self.config.tenants[tenant].id,
                    &self.config.models[route].name,
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

    /// After forwarding: stores a complete answer and lands the flight.
    pub(super) async fn cache_store(
        &self,
        plan: &Plan,
        recorded: Recorded,
        leader: Option<flight::Leader>,
        report: &Report,
        cost_pusd: i64,
    ) {
        let answer = recorded
            .complete()
            .filter(|_| report.error_reason.is_none())
            .and_then(|(stream, body)| match stream {
                true => cache::replay::from_stream(&body, plan.endpoint, report.total_usage()),
                false => cache::replay::from_json(&body),
            });
        let Some(answer) = answer else {
            if let Some(leader) = leader {
                leader.land(Landed::Failed);
            }
            return;
        };
        let Some(cache) = &self.cache else { return };
        let entry = Entry {
            stored_at: cache::now_secs(),
            cost_pusd,
            answer,
        };
        if plan.store {
            cache
                .put(
                    &self.config.tenants[plan.tenant].id,
                    &plan.key,
                    &entry,
                    plan.ttl,
                )
                .await;
        }
        if let Some(leader) = leader {
            leader.land(Landed::Answer(Arc::new(entry.answer), cost_pusd));
        }
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
            max_bytes: if plan.store || leader.is_some() {
                max_bytes
            } else {
                0
            },
            recorded: Recorded::default(),
            client_gone: false,
        }
    }
}

/// The head of an answer from the cache.
fn cached_header(
    request_id: &str,
    content_type: &str,
    len: usize,
    age: u64,
    rate_limit_headers: &[(http::HeaderName, http::HeaderValue)],
) -> pingora::Result<ResponseHeader> {
    let mut header = ResponseHeader::build_no_case(200, Some(8))?;
    header.insert_header("content-type", content_type)?;
    header.insert_header("content-length", len.to_string())?;
    header.insert_header("x-request-id", request_id)?;
    header.insert_header(X_RUNESTONE_CACHE, "hit")?;
    header.insert_header("age", age.to_string())?;
    for (name, value) in rate_limit_headers {
        header.insert_header(name.clone(), value.clone())?;
    }
    Ok(header)
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
    /// A whole 200 answer (whether a stream, and its body), if that is
    /// what it was.
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
}

impl Recorder<'_> {
    /// What was recorded.
    pub(super) fn into_recorded(self) -> Recorded {
        self.recorded
    }

    fn followed(&self) -> bool {
        self.flight.as_ref().is_some_and(|f| f.has_followers())
    }
}

#[async_trait]
impl Client for Recorder<'_> {
    fn request_headers(&self) -> &http::HeaderMap {
        self.inner.request_headers()
    }

    async fn send_header(&mut self, mut header: ResponseHeader) -> bool {
        let _ = header.insert_header(X_RUNESTONE_CACHE, self.header);
        let status = header.status.as_u16();
        let content_type = header
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        self.recorded.status = Some(status);
        self.recorded.stream = content_type.starts_with("text/event-stream");
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
        if !self.client_gone {
            self.client_gone = !self.inner.send_body(body, end).await;
        }
        !self.client_gone || self.followed()
    }

    async fn gone(&mut self) {
        if !self.client_gone {
            self.inner.gone().await;
            self.client_gone = true;
        }
        // Followers still reading: the call goes on for them.
        while self.followed() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn abort(&mut self) {
        self.recorded.aborted = true;
        self.inner.abort();
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
        let Ok(mut header) = ResponseHeader::build_no_case(status, Some(6)) else {
            return false;
        };
        let _ = header.insert_header("content-type", content_type);
        let _ = header.insert_header("x-request-id", self.request_id);
        let _ = header.insert_header(X_RUNESTONE_CACHE, "hit");
        let _ = header.insert_header("age", "0");
        for (name, value) in &self.rate_limit_headers {
            let _ = header.insert_header(name.clone(), value.clone());
        }
        self.session
            .write_response_header(Box::new(header), false)
            .await
            .is_ok()
    }

    async fn body(&mut self, chunk: Bytes) -> bool {
        self.session
            .write_response_body(Some(chunk), false)
            .await
            .is_ok()
    }
}
