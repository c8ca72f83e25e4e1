//! The Pingora glue: Runestone's `ProxyHttp` implementation.
//!
//! Pingora's own proxy phases replay a pre-read request body only through a
//! 64 KiB retry buffer, and routing needs the whole body (the OpenAI SDKs
//! put `model` after `messages`). So the gateway reads the body once in
//! `request_filter`, decides everything there, and forwards the exchange
//! itself through Pingora's connector (`forward`): one code path for every
//! body size, with the body kept in hand for a retry on another backend.
//!
//! The phases, and where each stage of a request lives:
//!
//! | phase | what happens | file |
//! |---|---|---|
//! | `request_filter` | request id; dispatch by path; locally answered endpoints | `routes.rs` |
//! | | authentication, admission, parking in the overflow queue | `admission.rs` |
//! | | async job submission and status | `jobs.rs` |
//! | | the response cache: hits, coalescing, storing | `cache.rs` |
//! | | forwarding with failover, the answer streamed back | `forward/` |
//! | | OpenAI-shaped errors and local answers | `respond.rs` |
//! | `upstream_peer` | never reached: `request_filter` answers every request | |
//! | `fail_to_proxy` | a 500 in OpenAI's shape | `respond.rs` |
//! | `logging` | settlement (if not done), metrics, the access log line, the trace's spans | `accounting.rs`, `access_log.rs`, `trace.rs` |

mod access_log;
mod accounting;
mod admission;
mod cache;
mod callback;
pub(crate) mod client;
mod forward;
mod jobs;
mod respond;
mod responses;
mod routes;
mod stored;
mod trace;

use crate::auth;
use crate::config::Config;
use crate::connections::Connections;
use crate::limits::{Grant, Limiter};
use crate::openai::ApiError;
use crate::overflow::Overflow;
use crate::upstream::Upstreams;
use async_trait::async_trait;
use forward::{Forwarder, Report};
use futures_util::FutureExt;
use pingora::connectors::ConnectorOptions;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Per-request state, carried from `request_filter` to `logging`.
pub struct RequestCtx {
    started: Instant,
    request_id: String,
    tenant: Option<usize>,
    /// The endpoint, for the access log (`chat`, `models`, ...).
    endpoint: &'static str,
    /// A `runestone_errors_total` reason for the gateway's own answer.
    error_reason: Option<&'static str>,
    /// The admission to settle.
    grant: Option<Grant>,
    /// Time spent parked in the overflow queue.
    parked: Duration,
    /// The request's cost, once settled.
    cost_pusd: i64,
    /// For an async job's attempt: its number (the request id is the
    /// job's).
    job_attempt: Option<u32>,
    /// What forwarding did: the route asked for (then the one that served),
    /// attempts, who served, usage.
    exchange: Report,
    /// The request's trace, when tracing is on.
    trace: Option<Box<trace::RequestTrace>>,
    /// What the response cache did (`hit`, `coalesced`, `miss`, `bypass`).
    cache: Option<&'static str>,
    /// Refused for its body's framing (or a failed read of it): nothing
    /// more is read from the connection, not even to throw it away.
    body_unsound: bool,
}

/// Writes out the access log lines still queued (at most `limit`): for
/// the end of the process.
pub fn flush_access_log(limit: std::time::Duration) {
    access_log::flush(limit);
}

/// The gateway: config, upstreams, limits and the connection pool to providers.
#[derive(Clone)]
pub struct Gateway {
    config: Arc<Config>,
    upstreams: Arc<Upstreams>,
    limiter: Limiter,
    overflow: Overflow,
    forwarder: Arc<Forwarder>,
    auth_failures: Arc<auth::FailureThrottle>,
    /// Tenant key digests -> tenant.
    keys: Arc<auth::KeyIndex>,
    /// Which tenant created which stored response, and where it lives.
    stored: stored::StoredResponses,
    /// The response cache, when configured.
    cache: Option<crate::cache::Cache>,
}

impl Gateway {
    /// A gateway serving `config` through `upstreams`, admitting with `limiter`.
    pub fn new(
        config: Arc<Config>,
        upstreams: Arc<Upstreams>,
        limiter: Limiter,
        overflow: Overflow,
        connector_options: Option<ConnectorOptions>,
        redis: Option<Arc<crate::redis_conn::RedisConnection>>,
    ) -> Self {
        let settings = config.redis.as_ref().filter(|_| redis.is_some());
        let shared = settings
            .zip(redis)
            .map(|(settings, conn)| (conn, settings.key_prefix.clone(), settings.timeout));
        // The cache's own connection, made by the first request that looks
        // an answer up: its drivers run on the requests' runtime, so a
        // lookup wakes no other thread.
        let own = settings.map(|settings| {
            let conn = Arc::new(crate::redis_conn::RedisConnection::new(settings));
            (conn, settings.key_prefix.clone(), settings.timeout)
        });
        let cache = config
            .cache
            .map(|settings| crate::cache::Cache::new(settings, own));
        let stored = stored::StoredResponses::new(shared, config.tenants.len());
        Gateway {
            stored,
            cache,
            keys: Arc::new(auth::KeyIndex::new(&config.tenants)),
            auth_failures: Arc::new(auth::FailureThrottle::new(
                config.server.auth_failures_per_minute,
            )),
            forwarder: Arc::new(Forwarder {
                upstreams: upstreams.clone(),
                connections: Connections::new(connector_options),
                policy: config.failover,
            }),
            config,
            upstreams,
            limiter,
            overflow,
        }
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    /// Boxed: Pingora keeps the context in each connection's task, in
    /// more than one of its states, and moves the task whole a few times
    /// a request; a pointer there instead of the context saves about
    /// 2 KB of every connection's task and of every such move.
    type CTX = Box<RequestCtx>;

    fn new_ctx(&self) -> Self::CTX {
        Box::new(RequestCtx {
            started: Instant::now(),
            request_id: String::new(),
            tenant: None,
            endpoint: "other",
            error_reason: None,
            grant: None,
            parked: Duration::ZERO,
            cost_pusd: 0,
            job_attempt: None,
            exchange: Report::default(),
            trace: None,
            cache: None,
            body_unsound: false,
        })
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        ctx.started = Instant::now();
        // HTTP/1.1 pipelining: a request sent before the previous answer is
        // served after it, in order (RFC 9112 9.3.2), rather than dropped
        // with the connection.
        session.as_downstream_mut().set_pipelining_enabled(true);
        // A client that stops reading (takes under 16 KiB/s of a waiting
        // write) holds its connection and the task serving it for this
        // long at most: `client::write_body`, and the stream copy's own
        // bound while it runs.
        let send_timeout = self.config.server.client_send_timeout;
        session.set_write_timeout(Some(send_timeout));
        // A connection kept alive waits this long for the client's next
        // request: Pingora would wait as long as the client asks
        // (`Keep-Alive: timeout=`), for ever by default, so idle clients
        // could hold connections (and file descriptors) without end. What
        // closes the connection after this answer still does.
        let downstream = session.as_downstream_mut();
        if downstream.get_keepalive().is_some() {
            let idle = self.config.server.client_idle_timeout.as_secs();
            downstream.set_keepalive(Some(idle));
        }
        ctx.request_id = respond::request_id(session);
        ctx.trace = trace::RequestTrace::for_request(session.req_header());
        // A panic anywhere below is a bug, but it must not take the
        // connection down unanswered or strand the tenant's slot: the grant
        // (in `ctx` or dropped while unwinding) is released either way.
        let served = AssertUnwindSafe(self.serve(session, ctx))
            .catch_unwind()
            .await;
        match served {
            // Ended as the grace period ran out before any answer went out
            // (a JSON request waiting for its provider's whole answer): its
            // client is told so, rather than left with a connection closed
            // unanswered. Billed as a client gone then (the prompt sent).
            Ok(Ok(())) if client::requests_ended() && respond::final_answer(session).is_none() => {
                session.set_keepalive(None);
                respond::error(session, ctx, &ApiError::stopped_mid_answer()).await;
            }
            Ok(Ok(())) => {}
            Ok(Err(error)) => respond::error(session, ctx, &error).await,
            Err(_) => {
                tracing::error!(request_id = %ctx.request_id, "the gateway failed while serving a request");
                session.set_keepalive(None);
                if respond::final_answer(session).is_none() {
                    let error = ApiError::internal("The gateway failed to handle the request.");
                    respond::error(session, ctx, &error).await;
                } else {
                    ctx.error_reason = Some("gateway_internal");
                }
            }
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        // request_filter answers every request (see the module docs).
        Error::e_explain(
            InternalError,
            "runestone forwards from request_filter; upstream_peer is unused",
        )
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy
    where
        Self::CTX: Send + Sync,
    {
        let error = ApiError::internal(format!(
            "The gateway failed to handle the request: {}",
            e.etype().as_str()
        ));
        respond::error(session, ctx, &error).await;
        FailToProxy {
            error_code: error.status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Self::CTX) {
        // Normally settled before the last byte went out; this covers
        // requests that ended otherwise (errors, disconnects).
        self.settle(ctx).await;
        let status = respond::final_answer(session).map_or(0, |h| h.status.as_u16());
        self.record(ctx, status);
        if !ctx.body_unsound {
            respond::discard_rest_of_body(session).await;
        }
    }
}
