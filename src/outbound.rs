//! POSTs to the URLs an operator configured (an async job's callback, the
//! trace collector), on connections kept between them (with Pingora's TLS
//! settings).

use crate::config::BaseUrl;
use crate::connections::Connections;
use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::protocols::http::v1::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
use std::time::Duration;

/// The most of an answer's body read (and thrown away) so that its
/// connection can be used again; a longer one closes it.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Sends `header` and `body` on `session` and reads the answer's head.
async fn send(
    session: &mut HttpSession,
    header: &RequestHeader,
    body: &Bytes,
) -> pingora::Result<()> {
    session
        .write_request_header(Box::new(header.clone()))
        .await?;
    session.write_body(body).await?;
    session.finish_body().await?;
    session.read_response().await?;
    Ok(())
}

/// POSTs `body` to `path` at `base` with `headers` (besides `host` and
/// `content-length`), within `timeout`: the answer's status, or what went
/// wrong (naming the host, never a header's value). The status counts as
/// soon as the answer's head is in; its body is read only to reuse the
/// connection.
pub async fn post(
    connections: &Connections,
    base: &BaseUrl,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    timeout: Duration,
) -> Result<u16, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let failed = |e: Box<pingora::Error>| format!("to {}: {}", base.authority, e.etype().as_str());
    let exchange = async {
        let addr = tokio::net::lookup_host((base.host.as_str(), base.port))
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", base.host))?
            .next()
            .ok_or_else(|| format!("{} has no address", base.host))?;
        let mut peer = HttpPeer::new(addr, base.tls, base.host.clone());
        peer.options.connection_timeout = Some(timeout);
        peer.options.read_timeout = Some(timeout);
        let mut header = RequestHeader::build("POST", path.as_bytes(), Some(4 + headers.len()))
            .map_err(failed)?;
        let length = body.len().to_string();
        let own = [
            ("host", base.authority.as_str()),
            ("content-length", &length),
        ];
        for (name, value) in own.iter().chain(headers) {
            header
                .insert_header(name.to_string(), value.to_string())
                .map_err(|_| format!("to {}: the header '{name}' is not valid", base.authority))?;
        }
        let (mut session, reused) = connections.get(&peer).await.map_err(failed)?;
        let sent = send(&mut session, &header, &body).await;
        if let Err(e) = sent {
            // A kept connection the other side let go of while idle: once
            // more on a new one (as a provider's request is).
            if !reused || !crate::connections::let_go(&e) {
                return Err(failed(e));
            }
            tracing::debug!(to = %base.authority, error = %e, "a kept connection was closed; sending again on a new one");
            session = connections.new_session(&peer).await.map_err(failed)?;
            send(&mut session, &header, &body).await.map_err(failed)?;
        }
        let status = session.get_status().map_or(0, |s| s.as_u16());
        Ok::<_, String>((session, peer, status))
    };
    let (mut session, peer, status) = match tokio::time::timeout_at(deadline, exchange).await {
        Ok(result) => result?,
        Err(_) => return Err(format!("to {} timed out", base.authority)),
    };
    // The (small) answer read within what is left of the time, so the
    // connection can go back to the pool; a long or slow one is dropped.
    let drained = async {
        let mut read = 0;
        while let Ok(Some(chunk)) = session.read_body_ref().await {
            read += chunk.len();
            if read > MAX_ANSWER_BYTES {
                return false;
            }
        }
        true
    };
    if let Ok(true) = tokio::time::timeout_at(deadline, drained).await {
        session.respect_keepalive();
        connections.release(session, &peer, None).await;
    }
    Ok(status)
}
