//! Accounting for a finished request: settling its admission with what it
//! used (tokens, cost), and recording it (metrics, the access log line).

use super::forward::{Report, Settle};
use super::{access_log, Gateway, RequestCtx};
use crate::config::{Price, PICO_PER_USD};
use crate::cost::{ServiceTier, Usage};
use crate::limits::{Grant, Settlement};
use crate::metrics;
use async_trait::async_trait;
use std::time::Instant;

/// Settles one request's admission: frees its slot, corrects its token
/// reservation with the real usage, adds its spend, and counts tokens and
/// cost. Settles once; later calls do nothing.
pub(super) struct Settler<'a> {
    pub gateway: &'a Gateway,
    pub tenant: Option<usize>,
    /// Taken when settled.
    pub grant: &'a mut Option<Grant>,
    /// The request's cost, once settled.
    pub cost_pusd: &'a mut i64,
    pub started: Instant,
}

#[async_trait]
impl Settle for Settler<'_> {
    async fn settle(&mut self, report: &Report) {
        let Some(grant) = self.grant.take() else {
            return;
        };
        let gateway = self.gateway;
        if let Some(tenant) = self.tenant {
            // Before the client sees the end: its next request may name it.
            gateway.remember_response(tenant, report).await;
        }
        let usage = report.total_usage();
        // Each answered attempt at its own deployment's price, and under its
        // own model's label: a stream resumed on a fallback model keeps what
        // the first one generated under the first one's name.
        let attempts = report.earlier.iter().copied().chain(
            report
                .usage
                .map(|usage| (report.route, report.target, usage)),
        );
        let mut cost_pusd = 0i64;
        for (route, target, usage) in attempts {
            let price = gateway.price(route, target);
            let usage = Usage {
                tier: tier_billed(usage.tier, report.requested_tier, price),
                ..usage
            };
            let cost = usage
                .cost_pusd(price)
                .saturating_add(price.map_or(0, |p| p.request));
            cost_pusd = cost_pusd.saturating_add(cost);
            gateway.count_usage(self.tenant, route, usage, cost);
        }
        *self.cost_pusd = cost_pusd;
        let settlement = Settlement {
            cache_saved_pusd: None,
            usage,
            cost_pusd,
            duration: self.started.elapsed(),
        };
        gateway.limiter.settle(grant, settlement).await;
    }
}

/// The tier an attempt's tokens are billed at: the one its answer names;
/// else the one the request asked for, unless that tier costs less than
/// the standard price: a discount is given only when the answer confirms
/// it (a server that ignores `service_tier` serves the standard tier).
fn tier_billed(
    reported: Option<ServiceTier>,
    requested: Option<ServiceTier>,
    price: Option<&Price>,
) -> Option<ServiceTier> {
    reported.or_else(|| requested.filter(|tier| !price.is_some_and(|p| p.cheaper_at(*tier))))
}

/// The tenant, route and provider indices behind the labels, as a key for
/// [`metrics::child`] (`u32::MAX` when unknown).
fn label_key(tenant: Option<usize>, report: &Report) -> [u32; 3] {
    [tenant, report.route, report.provider].map(label_index)
}

/// One index behind a label, for [`metrics::child`]'s key.
fn label_index(i: Option<usize>) -> u32 {
    i.map_or(u32::MAX, |i| i as u32)
}

impl Gateway {
    /// Adds one attempt's tokens and cost to the tenant's and `route`'s
    /// counters.
    fn count_usage(
        &self,
        tenant: Option<usize>,
        route: Option<usize>,
        usage: Usage,
        cost_pusd: i64,
    ) {
        let (tenant_name, model) = self.label_names(tenant, route);
        let (t, m) = (label_index(tenant), label_index(route));
        if usage.total() > 0 {
            metrics::child(&metrics::TOKENS, [t, m, 0, 0], |v| {
                v.with_label_values(&[tenant_name, model, "prompt"])
            })
            .inc_by(usage.prompt_tokens);
            metrics::child(&metrics::TOKENS, [t, m, 1, 0], |v| {
                v.with_label_values(&[tenant_name, model, "completion"])
            })
            .inc_by(usage.completion_tokens);
        }
        if cost_pusd > 0 {
            metrics::child(&metrics::COST_USD, [t, m, 0, 0], |v| {
                v.with_label_values(&[tenant_name, model])
            })
            .inc_by(cost_pusd as f64 / PICO_PER_USD);
        }
    }

    /// The tenant id and public model name, for labels and logs (empty
    /// when not known yet).
    fn label_names(&self, tenant: Option<usize>, route: Option<usize>) -> (&str, &str) {
        let tenant = tenant.map_or("", |t| self.config.tenants[t].id.as_str());
        let model = route.map_or("", |r| self.config.models[r].name.as_str());
        (tenant, model)
    }

    /// The price of a route's target: its own `provider/model` entry, else
    /// its public model's.
    fn price(&self, route: Option<usize>, target: Option<usize>) -> Option<&Price> {
        let route = &self.config.models[route?];
        match target {
            Some(target) => route.targets[target].price.as_ref(),
            None => self.config.pricing.get(&route.name),
        }
    }

    /// The processing tier the answer's tokens were billed at, when its
    /// price depends on the tier and it is not the standard one (the
    /// access log's `service_tier`).
    fn billed_tier(&self, report: &super::forward::Report) -> Option<&'static str> {
        let usage = report.usage?;
        let price = self.price(report.route, report.target)?;
        let tier = tier_billed(usage.tier, report.requested_tier, Some(price))?;
        price.tier(tier).map(|_| tier.name())
    }

    /// Settles the request's admission with what it used (none when no
    /// provider answered). Runs once; later calls do nothing.
    pub(super) async fn settle(&self, ctx: &mut RequestCtx) {
        if ctx.grant.is_none() {
            // Settled already (as an answer ends), or never admitted: the
            // settlement's future is not even made.
            return;
        }
        let RequestCtx {
            grant,
            cost_pusd,
            tenant,
            started,
            exchange,
            ..
        } = ctx;
        Settler {
            gateway: self,
            tenant: *tenant,
            grant,
            cost_pusd,
            started: *started,
        }
        .settle(exchange)
        .await;
    }

    /// Records a finished request: its metrics and its access log line.
    pub(super) fn record(&self, ctx: &RequestCtx, status: u16) {
        let report = &ctx.exchange;
        let (tenant, model) = self.label_names(ctx.tenant, report.route);
        let provider = report
            .provider
            .map_or("", |p| self.upstreams.provider(p).settings.name.as_str());
        let [t, m, p] = label_key(ctx.tenant, report);
        metrics::child(&metrics::REQUESTS, [t, m, p, u32::from(status)], |v| {
            v.with_label_values(&[tenant, model, provider, &status.to_string()])
        })
        .inc();
        let elapsed = ctx.started.elapsed();
        let ttft = report
            .first_byte_at
            .map(|at| at.duration_since(ctx.started));
        if report.route.is_some() {
            metrics::child(&metrics::REQUEST_DURATION, [m, p, 0, 0], |v| {
                v.with_label_values(&[model, provider])
            })
            .observe(elapsed.as_secs_f64());
            if let Some(ttft) = ttft {
                metrics::child(&metrics::TIME_TO_FIRST_TOKEN, [m, p, 0, 0], |v| {
                    v.with_label_values(&[model, provider])
                })
                .observe(ttft.as_secs_f64());
            }
            let overhead = elapsed
                .saturating_sub(report.upstream_time)
                .saturating_sub(ctx.parked);
            metrics::GATEWAY_OVERHEAD.observe(overhead.as_secs_f64());
        }
        let error = ctx.error_reason.or(report.error_reason);
        if let Some(reason) = error {
            metrics::ERRORS.with_label_values(&[reason]).inc();
        }
        self.export_trace(ctx, status, elapsed);
        if self.config.server.access_log {
            let usage = report.total_usage();
            let trace_id = ctx.trace.as_ref().map(|t| hex::encode(t.context.trace_id));
            let line = access_log::Line {
                request_id: &ctx.request_id,
                trace_id: trace_id.as_deref(),
                tenant,
                endpoint: ctx.endpoint,
                model,
                provider,
                backend: report.backend,
                status,
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                usage_estimated: usage.estimated,
                cost_usd: ctx.cost_pusd as f64 / PICO_PER_USD,
                duration: elapsed,
                ttft,
                attempts: report.attempts,
                resumptions: report.resumptions,
                overflow_wait: ctx.parked,
                error,
                cache: ctx.cache,
                job: ctx.job_attempt.map(|_| ctx.request_id.as_str()),
                job_attempt: ctx.job_attempt,
                service_tier: self.billed_tier(report),
            };
            access_log::write(&line);
        }
    }
}
