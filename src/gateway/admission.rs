//! Who is asking and whether they may go on now: authentication (with
//! the failed-auth throttle), admission against the tenant's limits, and
//! waiting in the overflow queue when over them or when nothing can serve.

use super::{Gateway, RequestCtx};
use crate::auth;
use crate::limits::{Grant, LimitKind, RateLimitState, Refusal};
use crate::openai::ApiError;
use crate::overflow::{ParkRefusal, Parked, Waited};
use http::{HeaderName, HeaderValue};
use pingora::proxy::Session;
use std::time::Instant;

/// The header some SDKs (Anthropic's) send the key in. A constant: a name
/// given as `&str` is parsed again on every lookup.
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

impl Gateway {
    /// Authenticates the request; the tenant's index in the config. A valid
    /// key always passes; failures are counted per client address, and an
    /// address past `auth_failures_per_minute` is answered 429 instead of
    /// 401.
    pub(super) fn authenticate(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> Result<usize, ApiError> {
        let headers = &session.req_header().headers;
        let presented = auth::presented_key(
            headers
                .get_all(http::header::AUTHORIZATION)
                .iter()
                .map(|v| v.as_bytes()),
            headers.get_all(X_API_KEY).iter().map(|v| v.as_bytes()),
        );
        let error = match presented {
            auth::Presented::Key(key) => match self.keys.authenticate(key) {
                Some(tenant) => {
                    ctx.tenant = Some(tenant);
                    return Ok(tenant);
                }
                None => ApiError::invalid_api_key("Incorrect API key provided."),
            },
            auth::Presented::Missing => ApiError::invalid_api_key("You didn't provide an API key."),
            auth::Presented::Conflicting => ApiError::invalid_api_key(
                "The request carries two different API keys (Authorization and x-api-key, or two of one).",
            ),
        };
        let Some(peer) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        else {
            return Err(error);
        };
        let named_in = self.config.server.client_address_header;
        let client = auth::client_address(
            peer,
            &self.config.server.trusted_proxies,
            named_in,
            headers
                .get_all(named_in.name())
                .iter()
                .map(|v| v.as_bytes()),
        );
        match self
            .auth_failures
            .record_failure(client, crate::limits::now_ms())
        {
            Ok(()) => Err(error),
            Err(retry_after_ms) => {
                let mut error = ApiError::rate_limit_exceeded(
                    "Too many failed authentications from your address.",
                );
                error.retry_after_ms = Some(retry_after_ms.max(1));
                error.reason = Some(crate::openai::Reason::Auth);
                Err(error)
            }
        }
    }

    /// Admits a request for `route` (its index): a grant, or parks it when
    /// over a limit or when nothing can serve its model (with overflow on),
    /// or refuses it. `Ok(None)`: the client left while parked.
    pub(super) async fn admit(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        tenant: usize,
        route: usize,
        tokens: u64,
    ) -> Result<Option<Grant>, ApiError> {
        // The model or one of its fallbacks: a request that a fallback can
        // serve is not parked behind its resting primary.
        let can_serve = || {
            self.upstreams
                .can_serve_any(&self.config.routes_for(tenant, route))
        };
        self.admission(session, ctx, tenant, route, tokens, can_serve)
            .await
    }

    /// Admits a request answered without a provider (from the response
    /// cache): one request, no tokens, whatever the providers' health.
    pub(super) async fn admit_answered(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        tenant: usize,
        route: usize,
    ) -> Result<Option<Grant>, ApiError> {
        self.admission(session, ctx, tenant, route, 0, || true)
            .await
    }

    /// Admits as [`Self::admit`] says; `can_serve` tells whether the
    /// model could be served now, asked only with overflow on (it is what
    /// parks a request its limits let through).
    async fn admission(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        tenant: usize,
        route: usize,
        tokens: u64,
        can_serve: impl Fn() -> bool,
    ) -> Result<Option<Grant>, ApiError> {
        let overflow = self.overflow.settings(tenant);
        let mut no_room = None;
        if let Some(head) = self
            .overflow
            .head_waits(tenant)
            .filter(|_| overflow.enabled)
        {
            // Requests of the tenant are parked waiting for its limits:
            // this one queues behind them, first come, first served.
            match self.overflow.park(tenant, route, tokens).await {
                Ok(parked) => {
                    self.limiter.count_refusal(tenant, head);
                    return self
                        .wait_in_queue(session, ctx, tenant, Ok(parked), None)
                        .await;
                }
                // No room behind them: the limits decide, as for anyone,
                // and a refusal carries their headers.
                Err(why) => no_room = Some(why),
            }
        }
        let refusal = match self.limiter.admit(tenant, tokens).await {
            Ok(grant) if !overflow.enabled || can_serve() => return Ok(Some(grant)),
            Ok(grant) => {
                // Nothing can serve the model right now: give the grant back
                // unused and wait for a backend.
                self.limiter.release(grant).await;
                None
            }
            Err(refusal) if overflow.enabled && refusal.limit != LimitKind::Budget => {
                self.limiter.count_refusal(tenant, refusal.limit);
                Some(refusal)
            }
            Err(refusal) => {
                self.limiter.count_refusal(tenant, refusal.limit);
                return Err(refusal_error(refusal));
            }
        };
        let place = match no_room {
            Some(why) => Err(why),
            None => self.overflow.park(tenant, route, tokens).await,
        };
        self.wait_in_queue(session, ctx, tenant, place, refusal)
            .await
    }

    /// Waits in the queue (`place`: the request parked, or why it could
    /// not) until the limiter admits it (and its model can be served), the
    /// tenant's `max_wait` passes, or the client leaves (`Ok(None)`: nothing
    /// more to send). `refusal`: what the limits said, if asked.
    async fn wait_in_queue(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        tenant: usize,
        place: Result<Parked, ParkRefusal>,
        refusal: Option<Refusal>,
    ) -> Result<Option<Grant>, ApiError> {
        let retry_after_ms = refusal
            .as_ref()
            .and_then(|r| r.retry_after_ms)
            .unwrap_or(1000)
            .max(1);
        let mut parked = match place {
            Ok(parked) => parked,
            Err(why) => {
                self.overflow.count_park_refusal(tenant, why);
                let mut error = ApiError::rate_limit_exceeded(match why {
                    ParkRefusal::Full | ParkRefusal::StoreFull(_) => {
                        "Rate limit reached and the overflow queue is full."
                    }
                    ParkRefusal::Unavailable | ParkRefusal::Unconfirmed => {
                        "Rate limit reached and the overflow queue is unavailable."
                    }
                });
                error.retry_after_ms = Some(retry_after_ms);
                if let Some(refusal) = &refusal {
                    error.headers = rate_limit_headers(&refusal.state);
                }
                return Err(error);
            }
        };
        let parked_at = Instant::now();
        if let Some(trace) = &mut ctx.trace {
            trace.parked_at = Some(parked_at);
        }
        let waited = tokio::select! {
            waited = self.overflow.wait(&mut parked) => Some(waited),
            _ = session.downstream_session.read_body_or_idle(true) => None,
        };
        ctx.parked = parked_at.elapsed();
        match waited {
            Some(Waited::Admitted(grant)) => Ok(Some(grant)),
            Some(Waited::Refused(refusal)) => Err(refusal_error(refusal)),
            Some(Waited::TimedOut) => {
                let mut error = ApiError::rate_limit_exceeded(
                    "Rate limit reached; the request waited in the overflow queue for as long as allowed.",
                );
                error.retry_after_ms = Some(retry_after_ms);
                error.reason = Some(crate::openai::Reason::OverflowTimeout);
                Err(error)
            }
            Some(Waited::Stopping) => Err(ApiError::gateway_stopping()),
            None => {
                self.overflow.abandon(&mut parked, &self.limiter).await;
                ctx.error_reason = Some(super::forward::CLIENT_CLOSED);
                Ok(None)
            }
        }
    }
}

/// The 429 for a refused admission, with the limiter's own retry time.
fn refusal_error(refusal: Refusal) -> ApiError {
    let mut error = match refusal.limit {
        LimitKind::Budget => ApiError::insufficient_quota(
            "You exceeded your budget for the current period; it is restored when the period ends.",
        ),
        LimitKind::Requests => {
            ApiError::rate_limit_exceeded("Rate limit reached for requests per minute.")
        }
        LimitKind::Tokens => {
            ApiError::rate_limit_exceeded("Rate limit reached for tokens per minute.")
        }
        LimitKind::Concurrency => {
            ApiError::rate_limit_exceeded("Too many concurrent requests; wait for one to finish.")
        }
    };
    error.retry_after_ms = refusal.retry_after_ms;
    error.headers = rate_limit_headers(&refusal.state);
    if refusal.retry_after_ms.is_none() {
        // Waiting will not help (a spent `total` budget): tell the SDKs not
        // to retry.
        error.headers.push((
            HeaderName::from_static("x-should-retry"),
            HeaderValue::from_static("false"),
        ));
    }
    error
}

/// OpenAI's `x-ratelimit-*` header names: limit, remaining, reset, for
/// requests and for tokens.
const RATE_LIMIT_NAMES: [[HeaderName; 3]; 2] = [
    [
        HeaderName::from_static("x-ratelimit-limit-requests"),
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
    ],
    [
        HeaderName::from_static("x-ratelimit-limit-tokens"),
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
    ],
];

/// OpenAI's `x-ratelimit-*` headers for the tenant's own limits.
pub(super) fn rate_limit_headers(state: &RateLimitState) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers = Vec::with_capacity(rate_limit_header_count(state));
    // Every value is written into one buffer and split off it.
    let mut text = bytes::BytesMut::with_capacity(96);
    let _ = each_rate_limit_value(state, |name, value| {
        let _ = value.write_to(&mut text);
        // Digits, `.`, `m` and `s` only: always a valid value.
        if let Ok(value) = HeaderValue::from_maybe_shared(text.split().freeze()) {
            headers.push((name.clone(), value));
        }
        Ok::<(), ()>(())
    });
    headers
}

/// An error answered after admission, with the tenant's `x-ratelimit-*`
/// headers as every admitted answer has them.
pub(super) fn admitted_error(mut error: ApiError, state: &RateLimitState) -> ApiError {
    if error.headers.is_empty() {
        error.headers = rate_limit_headers(state);
    }
    error
}

/// How many `x-ratelimit-*` headers `state` makes.
pub(super) fn rate_limit_header_count(state: &RateLimitState) -> usize {
    3 * (usize::from(state.requests.is_some()) + usize::from(state.tokens.is_some()))
}

/// The value of one `x-ratelimit-*` header, written when the header is
/// (so a request holds only the numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RateLimitValue {
    /// A limit or what remains of it.
    Count(u64),
    /// When the window resets, in milliseconds, as OpenAI writes it.
    Reset(u64),
}

impl RateLimitValue {
    /// Writes the value as its header carries it.
    pub(super) fn write_to(self, out: &mut impl std::fmt::Write) -> std::fmt::Result {
        match self {
            RateLimitValue::Count(n) => write_number(out, n),
            RateLimitValue::Reset(ms) => write_reset(out, ms),
        }
    }
}

impl std::fmt::Display for RateLimitValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.write_to(f)
    }
}

/// An integer's digits, without `format_args!` (whose machinery costs
/// more than the digits on a request's path).
pub(super) fn write_number(out: &mut impl std::fmt::Write, n: u64) -> std::fmt::Result {
    out.write_str(itoa::Buffer::new().format(n))
}

/// Calls `each` with OpenAI's `x-ratelimit-*` headers for the tenant's own
/// limits, by name, in order; stops at the first error. A plain loop: an
/// iterator chain here cost more than writing the values.
pub(super) fn each_rate_limit_value<E>(
    state: &RateLimitState,
    mut each: impl FnMut(&HeaderName, RateLimitValue) -> Result<(), E>,
) -> Result<(), E> {
    for (window, [limit, remaining, reset]) in
        [state.requests, state.tokens].iter().zip(&RATE_LIMIT_NAMES)
    {
        if let Some(w) = window {
            each(limit, RateLimitValue::Count(w.limit))?;
            each(remaining, RateLimitValue::Count(w.remaining))?;
            each(reset, RateLimitValue::Reset(w.reset_ms))?;
        }
    }
    Ok(())
}

/// A duration as OpenAI writes resets: `20ms`, `8.64s`, `6m0s`. Integer
/// arithmetic: float formatting cost more than the rest of the rate-limit
/// headers together.
fn write_reset(out: &mut impl std::fmt::Write, ms: u64) -> std::fmt::Result {
    if ms < 1000 {
        write_number(out, ms)?;
        return out.write_str("ms");
    }
    let (minutes, rest) = (ms / 60_000, ms % 60_000);
    if minutes > 0 {
        write_number(out, minutes)?;
        out.write_char('m')?;
    }
    write_number(out, rest / 1000)?;
    let (mut millis, mut digits) = (rest % 1000, 3);
    if millis > 0 {
        while millis % 10 == 0 {
            millis /= 10;
            digits -= 1;
        }
        let mut buffer = itoa::Buffer::new();
        let written = buffer.format(millis);
        out.write_char('.')?;
        for _ in written.len()..digits {
            out.write_char('0')?;
        }
        out.write_str(written)?;
    }
    out.write_char('s')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_resets_like_openai() {
        let format_reset = |ms| RateLimitValue::Reset(ms).to_string();
        assert_eq!(format_reset(0), "0ms");
        assert_eq!(format_reset(20), "20ms");
        assert_eq!(format_reset(1000), "1s");
        assert_eq!(format_reset(8640), "8.64s");
        assert_eq!(format_reset(360_000), "6m0s");
        assert_eq!(format_reset(61_500), "1m1.5s");
        assert_eq!(format_reset(1_005), "1.005s");
        assert_eq!(format_reset(59_990), "59.99s");
        assert_eq!(format_reset(120_001), "2m0.001s");
        assert_eq!(format_reset(u64::MAX), "307445734561825m51.615s");
    }
}
