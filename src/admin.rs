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

/// `GET /ready`: 200 when the config is loaded and every model has at least
/// one target with a resolved address; 503 with the failing parts otherwise.
pub fn ready(config: &Config, upstreams: &Upstreams) -> (u16, serde_json::Value) {
    let models: serde_json::Map<String, serde_json::Value> = config
        .models
        .iter()
        .map(|route| {
            let state = if upstreams.can_serve(route) {
                "ok"
            } else {
                "no_resolved_target"
            };
            (route.name.clone(), json!(state))
        })
        .collect();
    let all_ok = models.values().all(|v| v == "ok");
    let status = if all_ok { 200 } else { 503 };
    let body = json!({
        "status": if all_ok { "ready" } else { "not_ready" },
        "checks": { "config": "ok", "models": models },
    });
    (status, body)
}

/// `GET /v1/models`: the public models this tenant may use, in OpenAI's
/// list shape.
pub fn models(config: &Config, tenant: &TenantSettings) -> (u16, serde_json::Value) {
    let data: Vec<serde_json::Value> = config
        .models
        .iter()
        .filter(|route| tenant.may_use(&route.name))
        .map(|route| json!({"id": route.name, "object": "model", "created": 0, "owned_by": "runestone"}))
        .collect();
    (200, json!({"object": "list", "data": data}))
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
        "budget": budget,
        "partial": report.partial,
    });
    (200, body)
}
