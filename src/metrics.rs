//! Every Prometheus metric the gateway exports, in one place.
//!
//! Metrics live in the `prometheus` crate's default registry, the one that
//! `pingora-prometheus` serves on `server.metrics_listen`. Labels carry only
//! bounded values from the config (tenant ids, public model names, provider
//! names) or from closed vocabularies; never keys or client-chosen strings.

use once_cell::sync::Lazy;
use prometheus::{
    register_counter_vec, register_histogram_vec, register_int_counter, register_int_counter_vec,
    register_int_gauge, register_int_gauge_vec, CounterVec, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec,
};
use std::any::Any;
use std::cell::RefCell;

/// Latency buckets in seconds, from sub-millisecond gateway work to long
/// generations.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// `runestone_requests_total{tenant,model,provider,status}`: every answered
/// API request, by final status.
pub static REQUESTS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "runestone_requests_total",
        "API requests answered, by tenant, public model, provider and HTTP status.",
        &["tenant", "model", "provider", "status"]
    )
    .expect("metric registers once")
});

/// `runestone_request_duration_seconds{model,provider}`: time from the
/// request's arrival to the last byte of its answer.
pub static REQUEST_DURATION: Lazy<HistogramVec> = Lazy::new(|| {
    register_histogram_vec!(
        "runestone_request_duration_seconds",
        "Time from request arrival to the end of the response.",
        &["model", "provider"],
        DURATION_BUCKETS.to_vec()
    )
    .expect("metric registers once")
});

/// `runestone_errors_total{reason}`: errors by a closed vocabulary that
/// tells the gateway's own decisions from the provider's failures.
pub static ERRORS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "runestone_errors_total",
        "Requests that ended in an error, by reason.",
        &["reason"]
    )
    .expect("metric registers once")
});

/// `runestone_tokens_total{tenant,model,kind}`: tokens used, `kind` is
/// `prompt` or `completion` (reported by the provider or estimated).
pub static TOKENS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "runestone_tokens_total",
        "Tokens used, by tenant, public model and kind (prompt, completion).",
        &["tenant", "model", "kind"]
    )
    .expect("metric registers once")
});

/// `runestone_cost_usd_total{tenant,model}`: spend at the configured prices.
pub static COST_USD: Lazy<CounterVec> = Lazy::new(|| {
    register_counter_vec!(
        "runestone_cost_usd_total",
        "Spend in US dollars at the configured prices, by tenant and public model.",
        &["tenant", "model"]
    )
    .expect("metric registers once")
});

/// `runestone_rate_limited_total{tenant,limit}`: refused admissions, by the
/// limit that refused (`rpm`, `tpm`, `concurrency`, `budget`).
pub static RATE_LIMITED: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "runestone_rate_limited_total",
        "Requests refused by a tenant limit, by tenant and limit (rpm, tpm, concurrency, budget).",
        &["tenant", "limit"]
    )
    .expect("metric registers once")
});

/// `runestone_leased_admissions_total{tenant}`: admissions decided against
/// quota taken ahead from Redis (`redis.lease`), without a round trip.
pub static LEASED_ADMISSIONS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "runestone_leased_admissions_total",
        "Requests admitted against quota taken ahead from Redis (redis.lease), without a round trip, by tenant.",
        &["tenant"]
    )
    .expect("metric registers once")
});

/// `runestone_inflight_requests{tenant}`: admitted requests not yet settled.
pub static INFLIGHT: Lazy<IntGaugeVec> = Lazy::new(|| {
    register_int_gauge_vec!(
        "runestone_inflight_requests",
        "Admitted requests in flight, by tenant.",
        &["tenant"]
    )
    .expect("metric registers once")
});

/// The admitted requests in flight, all tenants' ([`INFLIGHT`]).
pub fn inflight_total() -> i64 {
    use prometheus::core::Collector;
    (INFLIGHT.collect().iter())
        .flat_map(|family| family.get_metric())
        .map(|metric| metric.get_gauge().value() as i64)
        .sum()
}

/// `runestone_redis_up`: 1 while Redis answers, 0 while the gateway runs on
/// in-process counters.
pub static REDIS_UP: Lazy<IntGauge> = Lazy::new(|| {
    register_int_gauge!(
        "runestone_redis_up",
        "1 while Redis answers; 0 while limits fall back to in-process counters."
    )
    .expect("metric registers once")
});

/// `runestone_stream_resumptions_total{model,outcome}`: streams that broke
/// after reaching the client and were continued elsewhere (`attempted`),
/// and how that ended (`resumed`, `failed`).
pub static STREAM_RESUMPTIONS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "runestone_stream_resumptions_total",
        "Streams that broke after reaching the client, by model and outcome (attempted, resumed, failed).",
        &["model", "outcome"]
    )
    .expect("metric registers once")
});

/// `runestone_redis_errors_total{op}`: failed or timed-out Redis calls.
pub static REDIS_ERRORS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "runestone_redis_errors_total",
        "Redis calls that failed or timed out, by operation.",
        &["op"]
    )
    .expect("metric registers once")
});

/// `runestone_upstream_healthy{provider,backend}`: 1 while the backend
/// passes its health check (always 1 without one).
pub static UPSTREAM_HEALTHY: Lazy<IntGaugeVec> = Lazy::new(|| {
    register_int_gauge_vec!(
        "runestone_upstream_healthy",
        "1 while the backend passes its health check, by provider and backend address.",
        &["provider", "backend"]
    )
    .expect("metric registers once")
});

/// `runestone_circuit_state{provider,backend}`: 0 closed, 1 half-open, 2 open.
pub static CIRCUIT_STATE: Lazy<IntGaugeVec> = Lazy::new(|| {
    register_int_gauge_vec!(
        "runestone_circuit_state",
        "Circuit breaker state by provider and backend address: 0 closed, 1 half-open, 2 open.",
        &["provider", "backend"]
    )
    .expect("metric registers once")
});

/// `runestone_overflow_parked{tenant}`: requests and jobs waiting in the
/// tenant's overflow queue.
pub static OVERFLOW_PARKED: Lazy<IntGaugeVec> = Lazy::new(|| {
    register_int_gauge_vec!(
        "runestone_overflow_parked",
        "Requests and async jobs waiting in the tenant's overflow queue.",
        &["tenant"]
    )
    .expect("metric registers once")
});

/// `runestone_overflow_total{tenant,outcome}`: what became of parked work:
/// `admitted`, `timeout`, `full`, `abandoned`, `unavailable` (Redis down),
/// `stopping` (the instance stopped), `refused` (the budget ran out while
/// parked), `completed` and `failed` (async jobs), `callback_failed` (a
/// job's callback not delivered after its retries).
pub static OVERFLOW_TOTAL: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "runestone_overflow_total",
        "Parked requests and jobs by outcome.",
        &["tenant", "outcome"]
    )
    .expect("metric registers once")
});

/// `runestone_access_log_dropped_total`: access log lines dropped because
/// the writer was too far behind (a slow disk or a full pipe).
pub static ACCESS_LOG_DROPPED: Lazy<IntCounter> = Lazy::new(|| {
    register_int_counter!(
        "runestone_access_log_dropped_total",
        "Access log lines dropped because the writer was too far behind."
    )
    .expect("metric registers once")
});

/// `runestone_client_send_timeouts_total`: client connections cut because
/// a write of the answer waited `server.client_send_timeout_seconds`
/// untaken.
pub static CLIENT_SEND_TIMEOUTS: Lazy<IntCounter> = Lazy::new(|| {
    register_int_counter!(
        "runestone_client_send_timeouts_total",
        "Client connections cut because a write of the answer waited the send timeout untaken."
    )
    .expect("metric registers once")
});

/// `runestone_cache_total{tenant,model,outcome}`: the response cache's
/// decisions: `hit` (a stored answer), `coalesced` (another request's
/// call), `miss` (forwarded after a lookup), `bypass` (not looked up).
pub static CACHE_TOTAL: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "runestone_cache_total",
        "Response cache lookups and bypasses, by tenant, public model and outcome.",
        &["tenant", "model", "outcome"]
    )
    .expect("metric registers once")
});

/// `runestone_cache_saved_usd_total{tenant,model}`: what the provider
/// calls that cache hits replaced would have cost.
pub static CACHE_SAVED_USD: Lazy<CounterVec> = Lazy::new(|| {
    register_counter_vec!(
        "runestone_cache_saved_usd_total",
        "USD the provider calls answered from the response cache would have cost, by tenant and public model.",
        &["tenant", "model"]
    )
    .expect("metric registers once")
});

/// `runestone_telemetry_dropped_total{reason}`: spans that never reached
/// the collector: `queue_full` (the exporter was too far behind) or
/// `export_failed` (the collector was down, slow or refused them).
pub static TELEMETRY_DROPPED: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "runestone_telemetry_dropped_total",
        "Trace spans dropped: the export queue was full, or the collector failed to take them.",
        &["reason"]
    )
    .expect("metric registers once")
});

/// `runestone_telemetry_exported_total`: spans the collector took.
pub static TELEMETRY_EXPORTED: Lazy<IntCounter> = Lazy::new(|| {
    register_int_counter!(
        "runestone_telemetry_exported_total",
        "Trace spans the collector accepted."
    )
    .expect("metric registers once")
});

/// `runestone_jobs_total{tenant, outcome}`: async jobs by what happened
/// to them: `submitted`, `deduplicated` (a submission that found its job
/// by its idempotency key), `retried` (an attempt failed and another is
/// scheduled), `timed_out` (an attempt ran past `jobs.timeout_seconds`),
/// `cancelled`, `completed` and `failed` (the job's end).
pub static JOBS_TOTAL: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "runestone_jobs_total",
        "Async jobs by outcome.",
        &["tenant", "outcome"]
    )
    .expect("metric registers once")
});

/// `runestone_overflow_wait_seconds{tenant}`: how long admitted parked
/// requests waited.
pub static OVERFLOW_WAIT: Lazy<HistogramVec> = Lazy::new(|| {
    register_histogram_vec!(
        "runestone_overflow_wait_seconds",
        "Time parked requests waited before admission.",
        &["tenant"],
        DURATION_BUCKETS.to_vec()
    )
    .expect("metric registers once")
});

/// `runestone_time_to_first_token_seconds{model,provider}`: from the
/// request's arrival to the first byte of the answer's body.
pub static TIME_TO_FIRST_TOKEN: Lazy<HistogramVec> = Lazy::new(|| {
    register_histogram_vec!(
        "runestone_time_to_first_token_seconds",
        "Time from request arrival to the first byte of the response body.",
        &["model", "provider"],
        DURATION_BUCKETS.to_vec()
    )
    .expect("metric registers once")
});

/// `runestone_gateway_overhead_seconds`: time spent in the gateway itself,
/// total minus the time waiting on providers and parked in the queue.
pub static GATEWAY_OVERHEAD: Lazy<prometheus::Histogram> = Lazy::new(|| {
    prometheus::register_histogram!(
        "runestone_gateway_overhead_seconds",
        "Time spent in the gateway: total minus waiting on providers and in the overflow queue.",
        vec![0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]
    )
    .expect("metric registers once")
});

/// `runestone_budget_used_ratio{tenant}`: spend in the current budget
/// period over the budget (1 = spent), for tenants with a budget.
pub static BUDGET_USED: Lazy<prometheus::GaugeVec> = Lazy::new(|| {
    prometheus::register_gauge_vec!(
        "runestone_budget_used_ratio",
        "Spend in the current budget period divided by the budget, by tenant.",
        &["tenant"]
    )
    .expect("metric registers once")
});

/// Why the metrics listener is not serving, once it failed to start (it
/// could not bind its address): `/ready` reports it.
static LISTENER_FAILURE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Records that the metrics listener failed to start.
pub fn listener_failed(reason: String) {
    let _ = LISTENER_FAILURE.set(reason);
}

/// Why the metrics listener is not serving, if it failed.
pub fn listener_failure() -> Option<&'static str> {
    LISTENER_FAILURE.get().map(String::as_str)
}

/// Registers every metric, so that all of them appear on the first scrape
/// (the Redis ones appear once Redis is configured).
pub fn register_all() {
    Lazy::force(&REQUESTS);
    Lazy::force(&REQUEST_DURATION);
    Lazy::force(&ERRORS);
    Lazy::force(&STREAM_RESUMPTIONS);
    Lazy::force(&TOKENS);
    Lazy::force(&COST_USD);
    Lazy::force(&RATE_LIMITED);
    Lazy::force(&INFLIGHT);
    Lazy::force(&UPSTREAM_HEALTHY);
    Lazy::force(&CIRCUIT_STATE);
    Lazy::force(&OVERFLOW_PARKED);
    Lazy::force(&OVERFLOW_TOTAL);
    Lazy::force(&JOBS_TOTAL);
    Lazy::force(&ACCESS_LOG_DROPPED);
    Lazy::force(&CLIENT_SEND_TIMEOUTS);
    Lazy::force(&TELEMETRY_DROPPED);
    Lazy::force(&CACHE_TOTAL);
    Lazy::force(&CACHE_SAVED_USD);
    Lazy::force(&TELEMETRY_EXPORTED);
    Lazy::force(&OVERFLOW_WAIT);
    Lazy::force(&TIME_TO_FIRST_TOKEN);
    Lazy::force(&GATEWAY_OVERHEAD);
    Lazy::force(&BUDGET_USED);
}

/// Metric children by (vector address, label key): see [`child`].
type Children = rustc_hash::FxHashMap<(usize, [u32; 4]), Box<dyn Any>>;

thread_local! {
    /// This thread's metric children.
    static CHILDREN: RefCell<Children> = RefCell::default();
}

/// The child of the metric vector `vec` for the labels that `key` stands
/// for (config indices and small codes), made by `make` on this thread's
/// first use and reused after that.
///
/// A vector's `with_label_values` hashes every label string and takes the
/// vector's lock on each call; the hot path does that once per thread and
/// label set instead. `key` must determine the labels `make` uses: they are
/// fixed for the life of the process (a reload starts a new process).
pub fn child<V: 'static, M: Clone + 'static>(
    vec: &'static V,
    key: [u32; 4],
    make: impl FnOnce(&V) -> M,
) -> M {
    CHILDREN.with(|children| {
        let mut children = children.borrow_mut();
        let entry = children
            .entry((vec as *const V as usize, key))
            .or_insert_with(|| Box::new(make(vec)));
        entry
            .downcast_ref::<M>()
            .expect("one child type per metric vector")
            .clone()
    })
}
