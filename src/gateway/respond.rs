//! Writing answers: OpenAI-shaped errors, local JSON answers, the common
//! headers; and reading the request: its id, its framing, its head size and
//! its body within the limit.

use super::RequestCtx;
use crate::openai::ApiError;
use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use std::time::Duration;

/// The request's id: the client's own `x-request-id` when short and plain,
/// else a fresh one.
pub(super) fn request_id(session: &Session) -> String {
    session
        .req_header()
        .headers
        .get(super::forward::headers::X_REQUEST_ID)
        .and_then(|v| sane_request_id(v.as_bytes()))
        .unwrap_or_else(new_request_id)
}

/// Rejects bodies whose framing is ambiguous (request smuggling): both
/// `Transfer-Encoding` and `Content-Length`.
///
/// Pingora drops `Content-Length` from the parsed header when
/// `Transfer-Encoding` is also present (RFC 9112 6.3), so the request head
/// as it came off the wire is what is checked.
pub(super) fn check_framing(session: &Session) -> Result<(), ApiError> {
    let headers = &session.req_header().headers;
    if !headers.contains_key(http::header::TRANSFER_ENCODING) {
        return Ok(());
    }
    let raw_has_length = session
        .as_downstream()
        .as_http1()
        .is_some_and(|h1| has_content_length_line(&h1.get_headers_raw_bytes()));
    if headers.contains_key(http::header::CONTENT_LENGTH) || raw_has_length {
        return Err(ApiError::bad_request(
            "A request must not carry both Content-Length and Transfer-Encoding.",
        ));
    }
    Ok(())
}

/// Whether a raw HTTP/1 request head has a `Content-Length` header line.
fn has_content_length_line(head: &[u8]) -> bool {
    const NAME: &[u8] = b"content-length";
    head.split(|&b| b == b'\n').skip(1).any(|line| {
        line.len() > NAME.len()
            && line[..NAME.len()].eq_ignore_ascii_case(NAME)
            && line[NAME.len()..]
                .iter()
                .find(|b| !matches!(b, b' ' | b'\t'))
                == Some(&b':')
    })
}

/// The size of a request head as sent: request line and header lines.
pub(super) fn head_size(header: &pingora::http::RequestHeader) -> usize {
    let line = header.method.as_str().len() + header.raw_path().len() + 12;
    header.headers.iter().fold(line, |sum, (name, value)| {
        sum + name.as_str().len() + value.len() + 4
    })
}

/// Reads the whole request body, refusing it past `limit` bytes.
pub(super) async fn read_body(session: &mut Session, limit: usize) -> Result<Bytes, ApiError> {
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::request_too_large(limit));
    }
    let request = session.req_header();
    // RFC 9110 10.1.1: ignored in an HTTP/1.0 request.
    let expects_continue = request.version == http::Version::HTTP_11
        && request
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        // The client waits for this before sending its body (curl does for
        // bodies over 1 MiB, a second before giving up on it). Pingora
        // closes a connection answered before its body's end; an interim
        // answer is not that.
        let downstream = session.as_downstream_mut();
        downstream.set_close_on_response_before_downstream_finish(false);
        let _ = downstream.write_continue_response().await;
        downstream.set_close_on_response_before_downstream_finish(true);
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(0));
    loop {
        // A client still sending when the grace period ends is told so
        // (the runtimes would drop it unanswered a second later).
        let read = tokio::select! {
            biased;
            read = session.read_request_body() => read,
            _ = super::client::ending() => return Err(ApiError::stopped_reading_request()),
        };
        let Some(chunk) = read
            .map_err(|e| ApiError::bad_request(format!("Could not read the request body: {e}")))?
        else {
            break;
        };
        if body.len() + chunk.len() > limit {
            return Err(ApiError::request_too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// A fresh request id: a random UUID (what model servers that check
/// `x-request-id` accept).
fn new_request_id() -> String {
    crate::ids::uuid_v4()
}

/// Keeps a client's `x-request-id` when it is short and plain, so it can be
/// logged and echoed safely.
fn sane_request_id(value: &[u8]) -> Option<String> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b));
    ok.then(|| String::from_utf8_lossy(value).into_owned())
}

/// Writes a complete JSON response with the gateway's common headers.
pub(super) async fn json(
    session: &mut Session,
    ctx: &RequestCtx,
    status: u16,
    body: serde_json::Value,
) -> Result<(), ApiError> {
    let body = Bytes::from(body.to_string());
    let header =
        response_header(status, ctx, body.len()).map_err(|e| ApiError::internal(e.to_string()))?;
    write_complete(session, header, body).await;
    Ok(())
}

pub(super) fn response_header(
    status: u16,
    ctx: &RequestCtx,
    len: usize,
) -> pingora::Result<ResponseHeader> {
    let mut header = ResponseHeader::build_no_case(status, Some(4))?;
    header.insert_header("content-type", "application/json")?;
    header.insert_header("content-length", len.to_string())?;
    header.insert_header("x-request-id", &ctx.request_id)?;
    Ok(header)
}

/// Writes a whole response; a client that went away is not an error.
pub(super) async fn write_complete(session: &mut Session, header: ResponseHeader, body: Bytes) {
    let head_only = session.req_header().method == "HEAD";
    if session
        .write_response_header(Box::new(header), head_only)
        .await
        .is_ok()
        && !head_only
    {
        crate::gateway::client::write_body(session, body, true).await;
    }
}

/// Answers an error in OpenAI's shape.
pub(super) async fn error(session: &mut Session, ctx: &mut RequestCtx, error: &ApiError) {
    ctx.error_reason = Some(error.reason());
    let body = error.body();
    let Ok(mut header) = response_header(error.status, ctx, body.len()) else {
        return;
    };
    if let Some(ms) = error.retry_after_ms {
        let _ = header.insert_header("retry-after", ms.div_ceil(1000).to_string());
        let _ = header.insert_header("retry-after-ms", ms.to_string());
    }
    for (name, value) in &error.headers {
        let _ = header.insert_header(name.clone(), value.clone());
    }
    if error.status == 400 {
        // The body's framing may be unsound (or reading it failed): read
        // nothing more from this connection.
        session.set_keepalive(None);
        ctx.body_unsound = true;
    }
    write_complete(session, header, body).await;
}

/// The final answer's head once written (not an interim `100 Continue`).
pub(super) fn final_answer(session: &Session) -> Option<&ResponseHeader> {
    session
        .response_written()
        .filter(|h| !h.status.is_informational())
}

/// The longest a request's unread body is read and thrown away after its
/// answer.
const DISCARD_FOR: Duration = Duration::from_secs(10);

/// The longest wait for the next bytes of a body being thrown away: a
/// client that stops sending is not waited for.
const DISCARD_IDLE: Duration = Duration::from_secs(1);

/// The most of an unread body that is thrown away.
const DISCARD_AT_MOST: usize = 64 << 20;

/// What each read counts for at least, so a body in one-byte chunks (each
/// its own parse) runs out of budget as fast in reads as in bytes.
const DISCARD_READ_COST: usize = 1024;

/// Reads and throws away what is left of a request's body once it has been
/// answered without reading it whole (over the limit, a wrong key, a local
/// path), within [`DISCARD_FOR`], [`DISCARD_IDLE`] and [`DISCARD_AT_MOST`];
/// the connection is closed after it. Nothing is done for a body read to
/// its end. Called after the request is logged, so its duration and metrics
/// are the answer's.
///
/// A socket closed with unread bytes in it is reset, and a client still
/// sending its body (most send it whole before reading) would see a broken
/// pipe instead of the answer already written (a "lingering close").
pub(super) async fn discard_rest_of_body(session: &mut Session) {
    if session.is_body_done() {
        return;
    }
    session.set_keepalive(None);
    if final_answer(session).is_none() {
        return;
    }
    let discard = async {
        let mut budget = DISCARD_AT_MOST;
        while budget > 0 {
            match tokio::time::timeout(DISCARD_IDLE, session.read_request_body()).await {
                Ok(Ok(Some(chunk))) => {
                    budget = budget.saturating_sub(chunk.len().max(DISCARD_READ_COST))
                }
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_FOR, discard).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_plain_client_request_ids_only() {
        assert_eq!(
            sane_request_id(b"abc-123_x.y:z").as_deref(),
            Some("abc-123_x.y:z")
        );
        assert_eq!(sane_request_id(b""), None);
        assert_eq!(sane_request_id(b"has space"), None);
        assert_eq!(sane_request_id(b"new\nline"), None);
        assert_eq!(sane_request_id(&[b'a'; 129]), None);
    }

    #[test]
    fn finds_a_content_length_line_in_a_raw_head() {
        let head = b"POST / HTTP/1.1\r\nHost: x\r\ncontent-LENGTH : 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(has_content_length_line(head));
        assert!(!has_content_length_line(
            b"POST /content-length: HTTP/1.1\r\nX-Content-Length: 5\r\n\r\n"
        ));
    }

    #[test]
    fn generated_request_ids_are_unique() {
        let a = new_request_id();
        assert!(crate::ids::is_uuid(&a), "{a}");
        assert_ne!(a, new_request_id());
    }
}
