//! Delivering an async job's result to its callback URL, through the same
//! connections (and TLS settings) the gateway uses for providers.

use crate::config::BaseUrl;
use crate::connections::Connections;
use bytes::Bytes;
use std::time::Duration;

/// Bound on one delivery attempt.
const TIMEOUT: Duration = Duration::from_secs(10);

/// POSTs `body` with its signature to `url`; the answer's status.
pub(super) async fn post(
    connections: &Connections,
    url: &str,
    body: &[u8],
    signature: &str,
) -> Result<u16, String> {
    let (base, path) = split(url)?;
    let headers = [
        ("content-type", "application/json"),
        ("x-runestone-signature", signature),
    ];
    crate::outbound::post(
        connections,
        &base,
        &path,
        &headers,
        Bytes::copy_from_slice(body),
        TIMEOUT,
    )
    .await
    .map_err(|e| format!("delivery {e}"))
}

/// Splits a URL into where to connect and the path (with query) to ask for.
fn split(url: &str) -> Result<(BaseUrl, String), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("bad callback URL: {e}"))?;
    let mut path = parsed.path().to_string();
    if let Some(query) = parsed.query() {
        path = format!("{path}?{query}");
    }
    let origin = format!(
        "{}://{}",
        parsed.scheme(),
        parsed.host_str().unwrap_or_default()
    );
    let origin = match parsed.port() {
        Some(port) => format!("{origin}:{port}"),
        None => origin,
    };
    let base = BaseUrl::parse(&origin)?;
    Ok((base, path))
}
