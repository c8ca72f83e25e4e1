//! Validation of the `telemetry:` section: where traces go (OTLP over
//! HTTP), under which service name, how many are kept, and whether
//! prompts and completions ride along.

use super::raw::RawTelemetry;
use super::{problem, BaseUrl, Problem, Secret};
use http::{HeaderName, HeaderValue};

/// Headers the exporter sets itself, or that would change how the request
/// is framed or carried.
const GATEWAY_HEADERS: [&str; 12] = [
    "host",
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "accept-encoding",
];

/// Where and how the gateway exports its traces.
#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    /// The collector's OTLP/HTTP traces URL (`.../v1/traces`).
    pub traces_url: BaseUrl,
    /// `service.name` on every span's resource.
    pub service_name: String,
    /// The share of new traces kept (0 to 1); a sampled incoming
    /// `traceparent` is always kept.
    pub sample_ratio: f64,
    /// Headers sent with every export (a collector's token): never logged.
    pub headers: Vec<(HeaderName, Secret)>,
    /// Prompts and completions as span events.
    pub capture_content: bool,
}

/// The telemetry settings from the raw section.
pub(super) fn validate_telemetry(
    raw: RawTelemetry,
    problems: &mut Vec<Problem>,
) -> Option<TelemetrySettings> {
    let before = problems.len();
    let traces_url = match BaseUrl::parse(&raw.otlp_endpoint) {
        // OTLP/HTTP: the endpoint is the collector's base, its traces under
        // `/v1/traces` (a URL already naming it is taken as it is).
        Ok(mut url) => {
            if !url.path.ends_with("/v1/traces") {
                url.path.push_str("/v1/traces");
            }
            Some(url)
        }
        // Not echoed: a collector's URL may carry its credential.
        Err(_) => {
            problems.push(problem(
                "telemetry.otlp_endpoint",
                "must be an http:// or https:// URL without credentials, query or fragment (put a token in telemetry.headers)",
            ));
            None
        }
    };
    let service_name = raw.service_name.unwrap_or_else(|| "runestone".into());
    if service_name.trim().is_empty() {
        problems.push(problem("telemetry.service_name", "must not be empty"));
    }
    let sample_ratio = raw.sample_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&sample_ratio) {
        problems.push(problem("telemetry.sample_ratio", "must be between 0 and 1"));
    }
    let mut headers: Vec<(HeaderName, Secret)> = Vec::new();
    for (name, value) in raw.headers.unwrap_or_default() {
        let path = format!("telemetry.headers.{name}");
        let Ok(header) = HeaderName::try_from(name.to_ascii_lowercase()) else {
            problems.push(problem(&path, "not a valid header name"));
            continue;
        };
        if HeaderValue::try_from(value.as_str()).is_err() {
            // The value itself is a secret: not echoed.
            problems.push(problem(&path, "not a valid header value"));
            continue;
        }
        if GATEWAY_HEADERS.contains(&header.as_str()) || header.as_str().starts_with("proxy-") {
            problems.push(problem(
                &path,
                "is the gateway's own (or a hop-by-hop header); it cannot be set",
            ));
            continue;
        }
        if headers.iter().any(|(seen, _)| *seen == header) {
            problems.push(problem(
                &path,
                "is given twice (header names are not case-sensitive)",
            ));
            continue;
        }
        headers.push((header, Secret(value)));
    }
    let traces_url = traces_url?;
    (problems.len() == before).then_some(TelemetrySettings {
        traces_url,
        service_name,
        sample_ratio,
        headers,
        capture_content: raw.capture_content.unwrap_or(false),
    })
}
