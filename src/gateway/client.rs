//! Who a forwarded response goes to: the downstream connection, or (for an
//! async job) a buffer that keeps the whole answer.

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Told when the process is about to drop the requests still running
/// (its runtimes stop at the end of its grace period): see [`end_requests`].
static ENDING: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Set with [`ENDING`]'s notification, for the waits that begin after it.
static ENDED: AtomicBool = AtomicBool::new(false);

/// Ends the requests still running, just before the process drops them at
/// the end of its grace period: each ends as if its client had left, so
/// it is billed what it used (the prompt sent, what a stream carried) and
/// its slot freed, where the drop would have billed nothing. A stream's
/// client is told so in-band, one that had no answer yet with a 503
/// (`request_filter`); a slow reader's connection closes.
pub(crate) fn end_requests() {
    ENDED.store(true, Ordering::Release);
    ENDING.notify_waiters();
}

/// Whether [`end_requests`] was called.
pub(crate) fn requests_ended() -> bool {
    ENDED.load(Ordering::Acquire)
}

/// Resolves when the client of `session` goes away, or the gateway ends
/// its requests ([`end_requests`]).
pub(crate) async fn left_or_ended(session: &mut Session) {
    tokio::select! {
        biased;
        _ = session.downstream_session.read_body_or_idle(true) => {}
        _ = ending() => {}
    }
}

/// Resolves once [`end_requests`] was called.
pub(crate) async fn ending() {
    // Created first: `notify_waiters` wakes one created before it even
    // when not polled yet, and the flag tells one created after.
    let told = ENDING.notified();
    if !ENDED.load(Ordering::Acquire) {
        told.await;
    }
}

/// Ends the requests still running (see [`end_requests`]) `grace` after
/// `shutdown` turns true (Pingora's graceful shutdown begins): the
/// runtimes stop, and drop what runs on them, a second later (the server
/// is given the grace period and that second), in which they settle.
pub(crate) async fn end_requests_before(
    grace: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    if !*shutdown.borrow() && shutdown.changed().await.is_err() {
        return;
    }
    tokio::time::sleep(grace).await;
    if crate::metrics::inflight_total() > 0 {
        tracing::warn!(
            "the grace period ends with requests still running: they are ended, and billed what they used"
        );
    }
    end_requests();
}

/// The receiving end of a forwarded response.
#[async_trait]
pub(crate) trait Client: Send {
    /// The client's request headers (a few are passed upstream).
    fn request_headers(&self) -> &http::HeaderMap;
    /// Sends the response header; false when the client is gone.
    async fn send_header(&mut self, header: Box<ResponseHeader>) -> bool;
    /// Sends a piece of the body (`end` on the last); false when the client
    /// is gone.
    async fn send_body(&mut self, body: Bytes, end: bool) -> bool;
    /// Resolves when the client goes away.
    async fn gone(&mut self);
    /// The body was cut short: close instead of ending it cleanly.
    async fn abort(&mut self);
    /// Whether a stream that breaks now can be continued elsewhere (see
    /// [`super::forward::resume`]); if not, the copy ends it.
    fn resumable(&self) -> bool {
        false
    }
    /// Sets how long a send may wait for the client to take it (`None`:
    /// unbounded) and returns what it was: the stream copy bounds its sends
    /// by its own timer meanwhile. A client that cannot stall has none.
    fn swap_send_timeout(&mut self, _timeout: Option<Duration>) -> Option<Duration> {
        None
    }
    /// How to tell whether the client is taking what is sent (see
    /// [`Progress`]).
    fn progress(&self) -> Progress {
        Progress::default()
    }
}

/// Whether a client takes what is sent to it, by the kernel's count of
/// the bytes it acknowledged on its connection. A send to a client whose
/// buffers are full waits until much of them drained (the kernel wakes a
/// writer only then: with megabytes buffered, seconds for a slow reader),
/// so the wait alone cannot tell a slow reader from one that stopped.
/// Plain TCP only: Pingora does not show a TLS connection's socket.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Progress(Option<std::os::fd::RawFd>);

impl Progress {
    /// The progress of `session`'s client.
    fn of(session: &Session) -> Self {
        Progress(tcp_socket(session))
    }

    /// The bytes the client has acknowledged so far, and when, if known.
    pub(crate) fn taken(self) -> Option<Taken> {
        let info = pingora::protocols::l4::ext::get_tcp_info(self.0?).ok()?;
        let at = std::time::Instant::now();
        Some(Taken(info.tcpi_bytes_acked, at))
    }

    /// Whether the client kept taking what was sent since `before`, at
    /// [`MIN_SEND_RATE`] at least: else it counts as stopped (a client
    /// trickling a few bytes a second would hold its answer for hours).
    pub(crate) fn kept_up(self, before: Option<Taken>) -> bool {
        let (Some(Taken(before, since)), Some(Taken(now, at))) = (before, self.taken()) else {
            return false;
        };
        let due = MIN_SEND_RATE as f64 * (at - since).as_secs_f64();
        now > before && (now - before) as f64 >= due
    }
}

/// What a client had taken of its connection (bytes acknowledged), and
/// when.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Taken(u64, std::time::Instant);

/// The slowest a client may take a waiting answer and still count as
/// reading it: 16 KiB/s (128 kbit/s).
pub(crate) const MIN_SEND_RATE: u64 = 16 * 1024;

/// Awaits `send` for `timeout`, and for another `timeout` each time the
/// client kept taking its connection's bytes meanwhile
/// ([`Progress::kept_up`]), but never past `last_resort`: `None` when it
/// did not finish in time.
pub(crate) async fn while_taken<F: std::future::Future + Unpin>(
    send: &mut F,
    progress: Progress,
    timeout: Option<Duration>,
    last_resort: Option<std::time::Instant>,
) -> Option<F::Output> {
    loop {
        let now = std::time::Instant::now();
        let bound = match (timeout, last_resort) {
            (None, None) => return Some(send.await),
            (Some(timeout), last) => last.map_or(now + timeout, |last| last.min(now + timeout)),
            (None, Some(last)) => last,
        };
        let mut before = None;
        // Polled only when the send has to wait.
        let waited = async {
            before = progress.taken();
            tokio::time::sleep_until(bound.into()).await;
        };
        tokio::select! {
            biased;
            out = &mut *send => return Some(out),
            () = waited => {}
        }
        let past_last = last_resort.is_some_and(|last| last <= std::time::Instant::now());
        if timeout.is_none() || past_last || !progress.kept_up(before) {
            return None;
        }
    }
}

#[async_trait]
impl Client for Session {
    fn request_headers(&self) -> &http::HeaderMap {
        &self.req_header().headers
    }

    async fn send_header(&mut self, mut header: Box<ResponseHeader>) -> bool {
        frame_unknown_length(self, &mut header);
        self.write_response_header(header, false).await.is_ok()
    }

    async fn send_body(&mut self, body: Bytes, end: bool) -> bool {
        // One write when no bound of `write_body`'s is needed (a stream's
        // event; the copy's sends, which it bounds itself). The rest is
        // boxed, out of this future: it is boxed itself for every event,
        // and the timers and the cut would make it several times larger.
        if body.len() <= SEND_PIECE && (!end || self.get_write_timeout().is_none()) {
            return match self.write_response_body(Some(body), end).await {
                Ok(()) => true,
                Err(e) => Box::pin(failed(self, &e)).await,
            };
        }
        Box::pin(write_body(self, body, end)).await
    }

    async fn gone(&mut self) {
        left_or_ended(self).await
    }

    async fn abort(&mut self) {
        cut(self).await;
    }

    fn swap_send_timeout(&mut self, timeout: Option<Duration>) -> Option<Duration> {
        let was = self.get_write_timeout();
        self.set_write_timeout(timeout);
        was
    }

    fn progress(&self) -> Progress {
        Progress::of(self)
    }
}

/// The most of a body written to a client at once. Pingora's write
/// timeout (`server.client_send_timeout_seconds`) bounds each write whole,
/// so a large answer goes in pieces: a slow but steady reader gets it, as
/// under nginx's `send_timeout`, and only a client that leaves a piece
/// untaken that long is cut.
pub(crate) const SEND_PIECE: usize = 64 * 1024;

/// Writes `body` (`end`: the last of it) to the client in pieces of at most
/// [`SEND_PIECE`] bytes. False when the client is gone, or left a piece
/// untaken for the send timeout: then its connection is cut, so that what
/// follows (Pingora's end of the response) does not wait as long again.
pub(crate) async fn write_body(session: &mut Session, mut body: Bytes, end: bool) -> bool {
    // Bounded here rather than by Pingora, which cannot tell a slow reader
    // from a stuck one, and flushes the end of a body without its timeout
    // (a small answer waits in the connection's write buffer until then).
    let timeout = session.get_write_timeout();
    session.set_write_timeout(None);
    let progress = Progress::of(session);
    let written = loop {
        let piece = next_piece(&mut body);
        let last = body.is_empty();
        let mut write = Box::pin(session.write_response_body(Some(piece), end && last));
        let written = while_taken(&mut write, progress, timeout, None).await;
        drop(write);
        match written {
            Some(Ok(())) if last => break true,
            Some(Ok(())) => {}
            Some(Err(_)) => break false,
            None => {
                untaken(session).await;
                break false;
            }
        }
    };
    session.set_write_timeout(timeout);
    written
}

/// A write to the client failed: false, and when the client left it
/// untaken for the send timeout (rather than going away), its connection
/// is cut and counted.
async fn failed(session: &mut Session, error: &pingora::Error) -> bool {
    if error.etype() == &pingora::ErrorType::WriteTimedout {
        untaken(session).await;
    }
    false
}

/// The client took nothing of its answer for the send timeout: its
/// connection is cut, and counted.
async fn untaken(session: &mut Session) {
    note_untaken();
    cut(session).await;
}

/// Logs and counts a client cut for leaving its answer untaken for the
/// send timeout (the caller cuts it).
pub(crate) fn note_untaken() {
    tracing::warn!("a client left its answer untaken for the send timeout; its connection is cut");
    crate::metrics::CLIENT_SEND_TIMEOUTS.inc();
}

/// The client's socket, when its connection is plain TCP (Pingora does
/// not show a TLS connection's).
fn tcp_socket(session: &Session) -> Option<std::os::fd::RawFd> {
    use std::os::fd::AsRawFd;
    let stream = session.downstream_session.stream()?;
    let tcp = stream
        .as_any()
        .downcast_ref::<pingora::protocols::l4::stream::Stream>()?;
    Some(tcp.as_raw_fd())
}

/// Takes the next piece to send off `body`: [`SEND_PIECE`] bytes at most.
pub(crate) fn next_piece(body: &mut Bytes) -> Bytes {
    match body.len() > SEND_PIECE {
        true => body.split_to(SEND_PIECE),
        false => std::mem::take(body),
    }
}

/// Closes the client's connection without ending the response cleanly
/// (see [`Client::abort`]).
async fn cut(session: &mut Session) {
    session.set_keepalive(None);
    // A client that does not read cannot hold the request up: what is
    // left to write (here, and Pingora's end of the response) gets this
    // long, then the connection goes.
    // Ended by the gateway, a moment before its runtimes stop: not long
    // enough for a slow client to hold the request's end (its access line)
    // past them.
    let grace = match requests_ended() {
        true => ABORT_GRACE / 10,
        false => ABORT_GRACE,
    };
    session.downstream_session.set_write_timeout(Some(grace));
    // Closed before the end is framed: a chunked body then lacks its
    // last chunk, so the client sees the truncation (Pingora would
    // write it when the request finishes).
    let shutdown = session.downstream_session.shutdown();
    if tokio::time::timeout(grace, shutdown).await.is_err() {
        // What is buffered did not go (the shutdown writes it first):
        // the socket itself is shut, so nothing more goes out, Pingora's
        // end of the body included, and a client reading later still
        // sees the truncation.
        // (Plain TCP: a TLS connection keeps what Pingora does.)
        if let Some(socket) = tcp_socket(session) {
            let how = nix::sys::socket::Shutdown::Write;
            let _ = nix::sys::socket::shutdown(socket, how);
        }
    }
}

/// How long an aborted response's last writes may wait for the client.
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// Marks an answer of unknown length (a stream, an edited body) chunked
/// for an HTTP/1.1 client, so that its connection carries the next request.
/// Pingora sends a header with neither a length nor chunking as a body read
/// until the close, and closes after it; an HTTP/1.0 client gets that, as
/// it cannot read chunks (told `Connection: close`), and HTTP/2 frames
/// bodies itself.
pub(crate) fn frame_unknown_length(session: &mut Session, header: &mut ResponseHeader) {
    let request = session.req_header();
    let bodiless = request.method == http::Method::HEAD
        || header.status.is_informational()
        || matches!(header.status.as_u16(), 204 | 304);
    if bodiless
        || header.headers.contains_key(http::header::CONTENT_LENGTH)
        || header.headers.contains_key(http::header::TRANSFER_ENCODING)
    {
        return;
    }
    match request.version {
        // Cannot fail: a valid name and value.
        http::Version::HTTP_11 => {
            let _ = header.insert_header(http::header::TRANSFER_ENCODING, "chunked");
        }
        http::Version::HTTP_10 | http::Version::HTTP_09 => session.set_keepalive(None),
        _ => {}
    }
}

/// The largest answer an async job keeps (as much as the gateway meters).
pub(crate) const MAX_JOB_ANSWER_BYTES: usize = crate::cost::MAX_METERED_JSON_BYTES;

/// Collects a whole response, for async jobs, up to
/// [`MAX_JOB_ANSWER_BYTES`].
#[derive(Debug, Default)]
pub(crate) struct Collected {
    /// The request headers the job was submitted with (allow-listed ones).
    pub request_headers: http::HeaderMap,
    /// The response status, once known.
    pub status: Option<u16>,
    /// The response content type.
    pub content_type: Option<String>,
    /// The response body.
    pub body: BytesMut,
    /// Whether the body is complete.
    pub complete: bool,
    /// The answer went past [`MAX_JOB_ANSWER_BYTES`] and was cut off.
    pub too_large: bool,
}

#[async_trait]
impl Client for Collected {
    fn request_headers(&self) -> &http::HeaderMap {
        &self.request_headers
    }

    async fn send_header(&mut self, header: Box<ResponseHeader>) -> bool {
        self.status = Some(header.status.as_u16());
        self.content_type = header
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        true
    }

    async fn send_body(&mut self, body: Bytes, end: bool) -> bool {
        if self.body.len() + body.len() > MAX_JOB_ANSWER_BYTES {
            // Like a client that went away: the provider request is ended.
            self.too_large = true;
            self.complete = false;
            return false;
        }
        self.body.extend_from_slice(&body);
        self.complete |= end;
        true
    }

    async fn gone(&mut self) {
        std::future::pending::<()>().await
    }

    async fn abort(&mut self) {
        self.complete = false;
    }
}
