//! Every Prometheus metric the gateway exports, in one place.
//!
//! Metrics live in the `prometheus` crate's default registry, the one that
//! `pingora-prometheus` serves on `server.metrics_listen`. Labels carry only
//! bounded values from the config (tenant ids, public model names, provider
//! names) or from closed vocabularies; never keys or client-chosen strings.

use once_cell::sync::Lazy;
use prometheus::{register_histogram_vec, register_int_counter_vec, HistogramVec, IntCounterVec};

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

/// Registers every metric, so that all of them appear on the first scrape.
pub fn register_all() {
    Lazy::force(&REQUESTS);
    Lazy::force(&REQUEST_DURATION);
    Lazy::force(&ERRORS);
}
