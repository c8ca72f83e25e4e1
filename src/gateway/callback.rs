//! Delivering an async job's result to its callback URL, through the same
//! connector (and TLS settings) the gateway uses for providers.

use crate::config::BaseUrl;
use bytes::Bytes;
use pingora::connectors::http::v1::Connector;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
use std::time::Duration;

/// Bound on one delivery attempt.
const TIMEOUT: Duration = Duration::from_secs(10);

/// POSTs `body` with its signature to `url`; the answer's status.
pub(super) async fn post(
    connector: &Connector,
    url: &str,
    body: &[u8],
    signature: &str,
) -> Result<u16, String> {
    let (base, path) = split(url)?;
    let addr = tokio::net::lookup_host((base.host.as_str(), base.port))
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", base.host))?
        .next()
        .ok_or_else(|| format!("{} has no address", base.host))?;
    let mut peer = HttpPeer::new(addr, base.tls, base.host.clone());
    peer.options.connection_timeout = Some(TIMEOUT);
    peer.options.read_timeout = Some(TIMEOUT);
    let mut header =
        RequestHeader::build("POST", path.as_bytes(), Some(5)).map_err(|e| e.to_string())?;
    let headers = [
        ("host", base.authority.clone()),
        ("content-type", "application/json".to_string()),
        ("content-length", body.len().to_string()),
        ("x-runestone-signature", signature.to_string()),
    ];
    for (name, value) in headers {
        header
            .insert_header(name, value)
            .map_err(|e| e.to_string())?;
    }
    let exchange = async {
        let (session, _) = connector.get_http_session(&peer).await?;
        let mut session: HttpSession = HttpSession::H1(session);
        session.write_request_header(Box::new(header)).await?;
        session
            .write_request_body(Bytes::copy_from_slice(body), true)
            .await?;
        session.finish_request_body().await?;
        session.read_response_header().await?;
        Ok::<u16, Box<pingora::Error>>(session.response_header().map_or(0, |h| h.status.as_u16()))
    };
    match tokio::time::timeout(TIMEOUT, exchange).await {
        Ok(Ok(status)) => Ok(status),
        Ok(Err(e)) => Err(format!(
            "delivery to {} failed: {}",
            base.authority,
            e.etype().as_str()
        )),
        Err(_) => Err(format!("delivery to {} timed out", base.authority)),
    }
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
