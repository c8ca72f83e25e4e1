//! A request's trace (OpenTelemetry): its context, continued from the
//! client's `traceparent`, and its spans, built once the request is
//! recorded from what the access log line is built from.
//!
//! One server span per request (an async job's attempt: a consumer span
//! linked to the request that queued the job), named after the GenAI
//! conventions (`chat gpt-4o-mini`); under it the wait in the overflow
//! queue and one client span per provider attempt.

use super::forward::AttemptRecord;
use super::{Gateway, RequestCtx};
use crate::config::{ProviderKind, PICO_PER_USD};
use crate::telemetry::{self, Event, Kind, Link, Span, TraceContext, Value};
use http::HeaderValue;
use std::time::{Duration, Instant, SystemTime};

/// The most of a prompt kept in a span event (with `capture_content`).
const MAX_CAPTURED_BYTES: usize = 64 * 1024;

/// What a request's trace needs beyond the request itself.
#[derive(Debug)]
pub(super) struct RequestTrace {
    /// The trace and the sampling decision.
    pub context: TraceContext,
    /// The request's own span.
    pub span_id: [u8; 8],
    /// The wall-clock time at `mono` (spans carry wall-clock times; the
    /// request measures with `Instant`).
    wall: SystemTime,
    mono: Instant,
    /// When the request was parked in the overflow queue.
    pub parked_at: Option<Instant>,
    /// An async job's attempt: the request that queued the job.
    link: Option<Link>,
    /// The request's `max_tokens`, and (with `capture_content`) its prompt.
    pub max_tokens: Option<u64>,
    pub prompt: Option<String>,
    /// The request's method.
    method: http::Method,
}

impl RequestTrace {
    /// The trace of a request with these headers, when tracing is on.
    pub fn for_request(request: &pingora::http::RequestHeader) -> Option<Box<Self>> {
        let settings = telemetry::settings()?;
        let context = TraceContext::from_headers(&request.headers, settings.sample_ratio);
        let mut trace = Self::new(context);
        trace.method = request.method.clone();
        Some(Box::new(trace))
    }

    /// The trace of an async job's attempt: a trace of its own, linked to
    /// the request that queued the job (its `traceparent`), and recorded
    /// when that request was.
    pub fn for_job(submitted_by: Option<&str>) -> Option<Box<Self>> {
        let settings = telemetry::settings()?;
        let mut trace = Self::new(TraceContext::root(settings.sample_ratio));
        if let Some((trace_id, span_id, flags)) =
            submitted_by.and_then(telemetry::parse_traceparent)
        {
            trace.link = Some(Link {
                trace_id,
                span_id,
                sampled: flags & 1 == 1,
            });
            trace.context.sampled |= flags & 1 == 1;
        }
        Some(Box::new(trace))
    }

    fn new(context: TraceContext) -> Self {
        RequestTrace {
            context,
            span_id: telemetry::new_span_id(),
            wall: SystemTime::now(),
            mono: Instant::now(),
            parked_at: None,
            link: None,
            max_tokens: None,
            prompt: None,
            method: http::Method::POST,
        }
    }

    /// The `traceparent` naming this request's span: what an async job
    /// keeps to link its attempts to the request that queued it.
    pub fn traceparent(&self) -> HeaderValue {
        self.context.traceparent(self.span_id)
    }

    /// Notes what the request asked for: its `max_tokens`, and its prompt
    /// (the body's `messages`, `input` or `prompt`) when content is
    /// captured.
    pub fn note_request(&mut self, body: &[u8], max_tokens: Option<u64>) {
        self.max_tokens = max_tokens;
        if self.context.sampled && telemetry::settings().is_some_and(|s| s.capture_content) {
            self.prompt = prompt_of(body);
        }
    }

    /// The wall-clock time of `instant`.
    fn at(&self, instant: Instant) -> SystemTime {
        match instant.checked_duration_since(self.mono) {
            Some(after) => self.wall + after,
            None => self.wall - self.mono.duration_since(instant),
        }
    }

    /// A span of this trace (times, attributes and events to be filled).
    fn span(&self, span_id: [u8; 8], parent: Option<[u8; 8]>, name: String, kind: Kind) -> Span {
        Span {
            trace_id: self.context.trace_id,
            span_id,
            parent,
            remote_parent: false,
            trace_state: None,
            name,
            kind,
            start: self.wall,
            end: self.wall,
            attributes: Vec::new(),
            events: Vec::new(),
            links: Vec::new(),
            error: None,
        }
    }
}

/// The prompt in a request body, as JSON (at most [`MAX_CAPTURED_BYTES`]).
fn prompt_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Prompt<'a> {
        #[serde(borrow, default)]
        messages: Option<&'a serde_json::value::RawValue>,
        #[serde(borrow, default)]
        input: Option<&'a serde_json::value::RawValue>,
        #[serde(borrow, default)]
        prompt: Option<&'a serde_json::value::RawValue>,
    }
    let parsed: Prompt<'_> = serde_json::from_slice(body).ok()?;
    let raw = parsed.messages.or(parsed.input).or(parsed.prompt)?.get();
    Some(truncated(raw))
}

fn truncated(text: &str) -> String {
    if text.len() <= MAX_CAPTURED_BYTES {
        return text.to_string();
    }
    let mut end = MAX_CAPTURED_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// `gen_ai.operation.name` for an endpoint (the conventions' names where
/// they have one, else the gateway's own); `None` for the endpoints the
/// gateway answers itself (models, usage, jobs' status).
fn operation(endpoint: &'static str) -> Option<&'static str> {
    match endpoint {
        "chat" | "responses" => Some("chat"),
        "completions" => Some("text_completion"),
        "models" | "usage" | "jobs" | "health" | "ready" | "other" => None,
        other => Some(other),
    }
}

/// `gen_ai.provider.name` for a provider kind.
fn provider_name(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::OpenAi => "openai",
        ProviderKind::Azure => "azure.ai.openai",
        ProviderKind::Anthropic => "anthropic",
    }
}

fn int(n: impl TryInto<i64>) -> Value {
    Value::Int(n.try_into().unwrap_or(i64::MAX))
}

impl Gateway {
    /// Exports a finished request's spans, when its trace is sampled.
    pub(super) fn export_trace(&self, ctx: &RequestCtx, status: u16, elapsed: Duration) {
        let Some(trace) = ctx.trace.as_deref().filter(|t| t.context.sampled) else {
            return;
        };
        // Only a tenant's requests: no unauthenticated client (nor a health
        // probe) can fill the export queue or pick what is sampled.
        if ctx.tenant.is_none() {
            return;
        }
        let report = &ctx.exchange;
        let gen_ai = operation(ctx.endpoint);
        let operation = gen_ai.unwrap_or(ctx.endpoint);
        let route = report.route.map(|r| &self.config.models[r]);
        let name = match (gen_ai, route) {
            (Some(operation), Some(route)) => format!("{operation} {}", route.name),
            (Some(operation), None) => operation.to_string(),
            (None, _) => format!("{} {}", trace.method, ctx.endpoint),
        };
        let kind = if ctx.job_attempt.is_some() {
            Kind::Consumer
        } else {
            Kind::Server
        };
        let mut span = trace.span(trace.span_id, trace.context.parent, name, kind);
        span.remote_parent = trace.context.parent.is_some();
        span.trace_state = trace
            .context
            .trace_state
            .as_ref()
            .and_then(|s| s.to_str().ok())
            .map(str::to_owned);
        span.start = trace.at(ctx.started);
        span.end = trace.at(ctx.started + elapsed);
        span.links.extend(trace.link);
        let attributes = &mut span.attributes;
        if let Some(operation) = gen_ai {
            attributes.push(("gen_ai.operation.name", Value::Static(operation)));
        }
        attributes.push(("http.request.method", Value::Str(trace.method.to_string())));
        attributes.push(("http.response.status_code", int(status)));
        attributes.push(("runestone.request_id", Value::Str(ctx.request_id.clone())));
        attributes.push(("runestone.attempts", int(report.attempts)));
        if let Some(tenant) = ctx.tenant {
            let id = &self.config.tenants[tenant].id;
            attributes.push(("runestone.tenant", Value::Str(id.clone())));
        }
        if let Some(route) = route {
            attributes.push(("gen_ai.request.model", Value::Str(route.name.clone())));
        }
        if let Some(provider) = report.provider {
            let kind = self.upstreams.provider(provider).settings.kind;
            attributes.push(("gen_ai.provider.name", Value::Static(provider_name(kind))));
        }
        let answer = report.answer.as_ref();
        let answered_model = answer.and_then(|a| a.model.clone()).or_else(|| {
            let target = &self.config.models[report.route?].targets[report.target?];
            report.usage.map(|_| target.model.clone())
        });
        if let Some(model) = answered_model {
            attributes.push(("gen_ai.response.model", Value::Str(model)));
        }
        if let Some(id) = answer.and_then(|a| a.id.clone()) {
            attributes.push(("gen_ai.response.id", Value::Str(id)));
        }
        if let Some(max_tokens) = trace.max_tokens {
            attributes.push(("gen_ai.request.max_tokens", int(max_tokens)));
        }
        if let Some(answer) = answer.filter(|a| !a.finish_reasons.is_empty()) {
            let reasons = Value::Strs(answer.finish_reasons.clone());
            attributes.push(("gen_ai.response.finish_reasons", reasons));
        }
        if report.usage.is_some() || !report.earlier.is_empty() {
            let usage = report.total_usage();
            attributes.push(("gen_ai.usage.input_tokens", int(usage.prompt_tokens)));
            attributes.push(("gen_ai.usage.output_tokens", int(usage.completion_tokens)));
            attributes.push(("runestone.usage_estimated", Value::Bool(usage.estimated)));
        }
        // The OpenAI conventions' processing tiers: asked for (`auto` is
        // none), and what the answer said served it.
        if let Some(tier) = report.requested_tier {
            attributes.push(("openai.request.service_tier", Value::Static(tier.name())));
        }
        if let Some(tier) = report.usage.and_then(|u| u.tier) {
            attributes.push(("openai.response.service_tier", Value::Static(tier.name())));
        }
        attributes.push((
            "runestone.cost_usd",
            Value::Float(ctx.cost_pusd as f64 / PICO_PER_USD),
        ));
        if let Some(cache) = ctx.cache {
            attributes.push(("runestone.cache", Value::Static(cache)));
        }
        if let Some(number) = ctx.job_attempt {
            attributes.push(("runestone.job_attempt", int(number)));
        }
        let error = ctx.error_reason.or(report.error_reason);
        if let Some(reason) = error {
            attributes.push(("error.type", Value::Static(reason)));
        }
        // A client's mistake (a 4xx) is not the server span's failure.
        if status >= 500 || status == 0 || report.error_reason.is_some() {
            span.error = Some(error.unwrap_or("unanswered").to_string());
        }
        if let Some(at) = report.first_byte_at {
            let ttft = at.saturating_duration_since(ctx.started);
            span.events.push(Event {
                name: "runestone.first_token",
                at: trace.at(at),
                attributes: vec![("runestone.ttft_ms", Value::Float(ttft.as_secs_f64() * 1e3))],
            });
        }
        for &(name, at) in &report.stream_events {
            span.events.push(Event {
                name,
                at: trace.at(at),
                attributes: Vec::new(),
            });
        }
        if let Some(prompt) = &trace.prompt {
            span.events.push(Event {
                name: "gen_ai.content.prompt",
                at: span.start,
                attributes: vec![("gen_ai.prompt", Value::Str(prompt.clone()))],
            });
        }
        if let Some(completion) = answer.and_then(|a| a.completion.as_deref()) {
            span.events.push(Event {
                name: "gen_ai.content.completion",
                at: span.end,
                attributes: vec![("gen_ai.completion", Value::Str(truncated(completion)))],
            });
        }
        let mut spans = vec![span];
        if let Some(parked_at) = trace.parked_at {
            let mut wait = trace.span(
                telemetry::new_span_id(),
                Some(trace.span_id),
                "overflow wait".into(),
                Kind::Internal,
            );
            wait.start = trace.at(parked_at);
            wait.end = trace.at(parked_at + ctx.parked);
            wait.attributes.push((
                "runestone.overflow_wait_ms",
                Value::Float(ctx.parked.as_secs_f64() * 1e3),
            ));
            spans.push(wait);
        }
        spans.extend(
            report
                .attempt_log
                .iter()
                .map(|record| self.attempt_span(trace, operation, record)),
        );
        telemetry::submit(spans);
    }

    /// The client span of one provider attempt.
    fn attempt_span(
        &self,
        trace: &RequestTrace,
        operation: &'static str,
        record: &AttemptRecord,
    ) -> Span {
        let provider = &self.upstreams.provider(record.provider).settings;
        let target = &self.config.models[record.route].targets[record.target];
        let mut span = trace.span(
            record.span_id,
            Some(trace.span_id),
            format!("{operation} {}", target.model),
            Kind::Client,
        );
        span.start = trace.at(record.started);
        span.end = trace.at(record.ended);
        let attributes = &mut span.attributes;
        attributes.push(("gen_ai.operation.name", Value::Static(operation)));
        attributes.push(("gen_ai.request.model", Value::Str(target.model.clone())));
        attributes.push((
            "gen_ai.provider.name",
            Value::Static(provider_name(provider.kind)),
        ));
        attributes.push(("server.address", Value::Str(provider.base_url.host.clone())));
        attributes.push(("server.port", int(provider.base_url.port)));
        attributes.push((
            "network.peer.address",
            Value::Str(record.backend.ip().to_string()),
        ));
        attributes.push(("runestone.provider", Value::Str(provider.name.clone())));
        attributes.push((
            "runestone.deployment",
            Value::Str(format!("{}/{}", provider.name, target.model)),
        ));
        attributes.push(("runestone.attempt.next", Value::Static(record.next)));
        if let Some(status) = record.status {
            attributes.push(("http.response.status_code", int(status)));
        }
        match (record.error, record.status) {
            (Some(reason), _) => {
                attributes.push(("error.type", Value::Static(reason)));
                span.error = Some(reason.to_string());
            }
            // A provider's own error answer, passed on: a failed client
            // call all the same (HTTP conventions: the status as the type).
            (None, Some(status)) if status >= 400 => {
                attributes.push(("error.type", Value::Str(status.to_string())));
                span.error = Some(status.to_string());
            }
            _ => {}
        }
        span
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_is_the_messages_input_or_prompt_and_bounded() {
        assert_eq!(
            prompt_of(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#).unwrap(),
            r#"[{"role":"user","content":"hi"}]"#
        );
        assert_eq!(
            prompt_of(br#"{"model":"m","input":"x"}"#).unwrap(),
            r#""x""#
        );
        assert_eq!(prompt_of(br#"{"model":"m"}"#), None);
        let long = format!(r#"{{"prompt":"{}"}}"#, "é".repeat(MAX_CAPTURED_BYTES));
        let kept = prompt_of(long.as_bytes()).unwrap();
        assert!(kept.len() <= MAX_CAPTURED_BYTES + 3 && kept.ends_with("..."));
    }

    #[test]
    fn operations_follow_the_genai_names() {
        assert_eq!(operation("chat"), Some("chat"));
        assert_eq!(operation("completions"), Some("text_completion"));
        assert_eq!(operation("embeddings"), Some("embeddings"));
        assert_eq!(operation("speech"), Some("speech"));
        assert_eq!(operation("models"), None);
    }
}
