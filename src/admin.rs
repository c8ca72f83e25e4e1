//! Endpoints the gateway answers itself: `/health`, `/ready`, `/v1/models`.
//!
//! Each function returns the status and JSON body; the gateway glue writes
//! them out.

use crate::config::{Config, TenantSettings, PICO_PER_USD};
use crate::limits::UsageReport;
use crate::upstream::Upstreams;
use serde_json::json;

/// `GET /health`: the process is alive and answering.
pub fn health() -> (u16, serde_json::Value) {
    (200, json!({"status": "ok"}))
}

/// `GET /ready`: 200 when the config is loaded, Redis (when configured)
/// answers, and every model has at least one backend that could take a
/// request now; 503 otherwise. The body details each part: per model, per
/// provider each backend's health and circuit breaker, and whether the
/// metrics listener is serving.
pub fn ready(
    config: &Config,
    upstreams: &Upstreams,
    redis_up: Option<bool>,
) -> (u16, serde_json::Value) {
    let models: serde_json::Map<String, serde_json::Value> = config
        .models
        .iter()
        .enumerate()
        .map(|(index, route)| {
            let state = if upstreams.can_serve(index, route) {
                "ok"
            } else if upstreams.is_healthy(index, route) {
                // Resting at the provider's request: still ready.
                "rate_limited"
            } else {
                "no_eligible_backend"
            };
            (route.name.clone(), json!(state))
        })
        .collect();
    let providers: serde_json::Map<String, serde_json::Value> = upstreams
        .providers()
        .iter()
        .map(|provider| {
            let backends: Vec<serde_json::Value> = provider
                .backend_states()
                .into_iter()
                .map(|(addr, healthy, breaker, deployments)| {
                    // The address's circuit is its worst breaker (as in
                    // `runestone_circuit_state`); each is listed too.
                    let worst = deployments
                        .iter()
                        .map(|(_, view)| view)
                        .chain([&breaker])
                        .max_by_key(|view| view.gauge())
                        .map_or(breaker.state, |view| view.state);
                    let cooling_down = breaker.cooling_down
                        || deployments.iter().any(|(_, view)| view.cooling_down);
                    let deployments: Vec<serde_json::Value> = deployments
                        .into_iter()
                        .map(|(model, view)| {
                            json!({
                                "model": model,
                                "circuit": view.state,
                                "cooling_down": view.cooling_down,
                            })
                        })
                        .collect();
                    json!({
                        "address": addr.to_string(),
                        "healthy": healthy,
                        "circuit": worst,
                        "transport": breaker.state,
                        "cooling_down": cooling_down,
                        "deployments": deployments,
                    })
                })
                .collect();
            (
                provider.settings.name.clone(),
                json!({ "backends": backends }),
            )
        })
        .collect();
    let models_ok = models.values().all(|v| v != "no_eligible_backend");
    let redis_ok = redis_up.unwrap_or(true);
    let ready = models_ok && redis_ok;
    let mut checks = json!({ "config": "ok", "models": models, "providers": providers });
    if let Some(up) = redis_up {
        checks["redis"] = json!(if up { "ok" } else { "unavailable" });
    }
    if let Some(addr) = config.server.metrics_listen {
        // Reported, not made a reason to take the instance out of rotation:
        // scrapes failing must not stop traffic.
        checks["metrics"] = match crate::metrics::listener_failure() {
            None => json!({"status": "ok", "listen": addr.to_string()}),
            Some(error) => {
                json!({"status": "unavailable", "listen": addr.to_string(), "error": error})
            }
        };
    }
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": checks,
    });
    (if ready { 200 } else { 503 }, body)
}

/// `GET /v1/models`: the public models this tenant may use, in OpenAI's
/// list shape.
pub fn models(config: &Config, tenant: &TenantSettings) -> (u16, serde_json::Value) {
    let data: Vec<serde_json::Value> = config
        .models
        .iter()
        .filter(|route| tenant.may_use(&route.name))
        .filter_map(|route| model(config, tenant, &route.name))
        .collect();
    (200, json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`: the public model, in OpenAI's shape, if this
/// tenant may use it; `None` (404 `model_not_found`) otherwise, whether it
/// exists or not.
pub fn model(config: &Config, tenant: &TenantSettings, id: &str) -> Option<serde_json::Value> {
    let (_, route) = config.route(id)?;
    tenant.may_use(&route.name).then(
        || json!({"id": route.name, "object": "model", "created": 0, "owned_by": "runestone"}),
    )
}

/// `GET /v1/usage`: the calling tenant's usage in its current accounting
/// period (its budget's, or the calendar month).
pub fn usage(tenant: &TenantSettings, report: &UsageReport) -> (u16, serde_json::Value) {
    let usd = |pusd: i64| pusd as f64 / PICO_PER_USD;
    let budget = tenant.limits.budget.map(|b| {
        json!({
            "amount_usd": usd(b.amount_pusd),
            "remaining_usd": usd((b.amount_pusd - report.usage.cost_pusd).max(0)),
        })
    });
    let body = json!({
        "object": "runestone.usage",
        "tenant": tenant.id,
        "period": report.period.name(),
        "period_id": report.period_id,
        "requests": report.usage.requests,
        "prompt_tokens": report.usage.prompt_tokens,
        "completion_tokens": report.usage.completion_tokens,
        "total_tokens": report.usage.prompt_tokens + report.usage.completion_tokens,
        "cost_usd": usd(report.usage.cost_pusd),
        // Requests whose tokens are the gateway's count, not the provider's.
        "estimated_requests": report.usage.estimated_requests,
        // Requests answered from the response cache, and what their
        // provider calls would have cost.
        "cache_hits": report.usage.cache_hits,
        "cache_saved_usd": usd(report.usage.cache_saved_pusd),
        "budget": budget,
        "partial": report.partial,
    });
    (200, body)
}
