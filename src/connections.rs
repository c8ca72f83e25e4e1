//! Connections to providers, webhooks and trace collectors, kept open
//! between requests in Pingora's connection pool.
//!
//! Pingora's own connector (`TransportConnector::reused_stream`, 0.9) takes
//! a kept connection out of its shared pointer with `Arc::try_unwrap` as
//! soon as the connection's idle watcher lets go of its lock. The watcher
//! drops its own pointer only after that, so on a runtime of more than one
//! thread the taker can come first: the healthy connection is then closed,
//! a new one dialled (a TLS handshake with the provider) and "failed to
//! acquire reusable stream" logged at ERROR (Pingora issue #998; seen
//! here with `threads: 2` and Redis for about one request in three). Here the
//! kept stream waits in an `Option` behind the watcher's lock and is taken
//! out under it, whoever holds the last pointer.

use futures_util::FutureExt;
use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::protocols::http::v1::client::HttpSession;
use pingora::protocols::Stream;
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora::ErrorType;
use pingora_pool::{ConnectionMeta, ConnectionPool};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::sync::Mutex;
use tracing::debug;

/// How many idle connections are kept when the options do not say
/// (Pingora's own default).
const DEFAULT_KEPT: usize = 128;

/// A kept connection: there until someone takes it.
struct Kept(Option<Stream>);

impl AsyncRead for Kept {
    /// What the idle watcher waits on: the connection's next byte, or its
    /// end; a connection already taken reads as ended.
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.0 {
            Some(stream) => Pin::new(stream).poll_read(cx, buf),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// Makes HTTP/1 connections (with Pingora's TLS settings) and keeps the
/// ones a finished answer leaves reusable, by peer.
pub struct Connections {
    kept: Arc<ConnectionPool<Arc<Mutex<Kept>>>>,
    transport: TransportConnector,
}

impl Connections {
    /// Connections made with `options` (Pingora's, from the server's
    /// configuration: TLS roots, pool size); `None` for its defaults.
    pub fn new(options: Option<ConnectorOptions>) -> Self {
        let size = options
            .as_ref()
            .map_or(DEFAULT_KEPT, |o| o.keepalive_pool_size);
        Connections {
            kept: Arc::new(ConnectionPool::new(size)),
            transport: TransportConnector::new(options),
        }
    }

    /// A kept connection to `peer`, if one is idle and still open.
    pub async fn kept(&self, peer: &HttpPeer) -> Option<HttpSession> {
        let kept = self.kept.get(&peer.reuse_hash())?;
        // The watcher holds the lock while the connection is idle: taken
        // once it has seen the connection picked up and let go.
        let mut stream = kept.lock().await.0.take()?;
        (peer.matches_fd(stream.id()) && still_idle(&mut stream))
            .then(|| HttpSession::new_with_options(stream, peer))
    }

    /// A kept connection to `peer`, or a new one; `true` with a kept one.
    pub async fn get(&self, peer: &HttpPeer) -> pingora::Result<(HttpSession, bool)> {
        match self.kept(peer).await {
            Some(session) => Ok((session, true)),
            None => Ok((self.new_session(peer).await?, false)),
        }
    }

    /// A new connection to `peer`, whatever is kept.
    pub async fn new_session(&self, peer: &HttpPeer) -> pingora::Result<HttpSession> {
        let stream = self.transport.new_stream(peer).await?;
        Ok(HttpSession::new_with_options(stream, peer))
    }

    /// Keeps `session`'s connection for `peer`'s next request when its
    /// answer was read to the end and both sides allow it; closes it
    /// otherwise. A kept connection is watched while idle: closed by the
    /// other side, sent anything, or idle past `idle_timeout`, it is
    /// dropped from the pool.
    pub async fn release(
        &self,
        mut session: HttpSession,
        peer: &HttpPeer,
        idle_timeout: Option<Duration>,
    ) {
        session.respect_keepalive();
        let Some(mut stream) = session.reuse().await else {
            return;
        };
        if !still_idle(&mut stream) {
            return;
        }
        let meta = ConnectionMeta::new(peer.reuse_hash(), stream.id());
        let kept = Arc::new(Mutex::new(Kept(Some(stream))));
        let Ok(watched) = kept.clone().try_lock_owned() else {
            return;
        };
        let (evicted, picked_up) = self.kept.put(&meta, kept);
        let pool = self.kept.clone();
        tokio::spawn(async move {
            pool.idle_poll(watched, &meta, idle_timeout, evicted, picked_up)
                .await;
        });
    }
}

/// Whether sending a request on a kept connection (or reading its answer's
/// head) failed as one fails that the other side closed while it was
/// idle: unwritable, closed, or answering bytes that are no answer's head
/// (sent after the answer before, come in only now). Such a request is
/// sent again on a new connection. A reset is not: it comes as well after
/// the other side has read the request and worked on it, and sending it
/// again would have it done twice unseen; it fails as an attempt does
/// (logged, counted, within `failover.max_attempts`).
pub fn let_go(e: &pingora::Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectionClosed | ErrorType::InvalidHTTPHeader | ErrorType::WriteError
    )
}

/// Whether an idle connection has nothing to read and is not closed: the
/// other side (a provider, a webhook, a trace collector) never speaks
/// first on one.
fn still_idle(stream: &mut Stream) -> bool {
    let mut byte = [0; 1];
    // Unconstrained: a read that is ready must not be put off by tokio's
    // budget, or it would pass for one that waits.
    match tokio::task::unconstrained(stream.read(&mut byte)).now_or_never() {
        None => true,
        Some(Ok(0)) => {
            debug!("a kept connection was closed by the other side");
            false
        }
        Some(Ok(_)) => {
            debug!("a kept connection had unexpected data; closed");
            false
        }
        Some(Err(e)) => {
            debug!("a kept connection failed: {e}");
            false
        }
    }
}
