//! HTTP plumbing on Pingora's server session: reading bodies, pausing while
//! watching for a client that left, and writing complete replies.

use crate::*;

/// What to do with the connection after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Response complete: offer the connection for keep-alive.
    Reuse,
    /// Close the connection.
    Close,
}

/// Per-request facts echoed in API response headers.
#[derive(Debug)]
pub(crate) struct ApiMeta {
    /// Request number (ids and `x-request-id`).
    pub(crate) id: u64,
    /// Request body length.
    pub(crate) body_len: usize,
    /// Hex SHA-256 of the request body.
    pub(crate) body_sha256: String,
    /// Model named by the request.
    pub(crate) model: Option<String>,
    /// Extra response headers from a `headers` fault.
    pub(crate) extra_headers: Vec<(String, String)>,
    /// The credential to echo (an `echo_key` fault).
    pub(crate) echo_key: Option<String>,
    /// Compress the answer in this content encoding (a `compress` fault).
    pub(crate) compress: Option<&'static str>,
}

/// A streaming compressor for the `compress` fault: each piece written is
/// flushed, so a stream stays a stream.
pub(crate) enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Deflate(flate2::write::ZlibEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

impl Encoder {
    /// The compressor for `encoding` (`gzip`, `deflate`, `br`, `zstd`).
    pub(crate) fn new(encoding: &str) -> Option<Encoder> {
        let level = flate2::Compression::fast();
        Some(match encoding {
            "gzip" => Encoder::Gzip(flate2::write::GzEncoder::new(Vec::new(), level)),
            "deflate" => Encoder::Deflate(flate2::write::ZlibEncoder::new(Vec::new(), level)),
            "br" => Encoder::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                5,
                22,
            ))),
            "zstd" => Encoder::Zstd(zstd::stream::write::Encoder::new(Vec::new(), 3).ok()?),
            _ => return None,
        })
    }

    /// Compresses `bytes` (flushed); with `end`, the stream's trailer too.
    pub(crate) fn encode(&mut self, bytes: &[u8], end: bool) -> Bytes {
        use std::io::Write;
        let written = match self {
            Encoder::Gzip(e) => e.write_all(bytes).and_then(|()| e.flush()),
            Encoder::Deflate(e) => e.write_all(bytes).and_then(|()| e.flush()),
            Encoder::Brotli(e) => e.write_all(bytes).and_then(|()| e.flush()),
            Encoder::Zstd(e) => e.write_all(bytes).and_then(|()| e.flush()),
        };
        debug_assert!(written.is_ok());
        if end {
            let _ = match self {
                Encoder::Gzip(e) => e.try_finish(),
                Encoder::Deflate(e) => e.try_finish(),
                // Its stream's last block is written only as it is taken
                // apart: the rest of it, ended.
                Encoder::Brotli(e) => {
                    let ended = std::mem::replace(
                        e,
                        Box::new(brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22)),
                    );
                    return Bytes::from(ended.into_inner());
                }
                Encoder::Zstd(e) => e.do_finish(),
            };
        }
        let out = match self {
            Encoder::Gzip(e) => e.get_mut(),
            Encoder::Deflate(e) => e.get_mut(),
            Encoder::Brotli(e) => e.get_mut(),
            Encoder::Zstd(e) => e.get_mut(),
        };
        Bytes::from(std::mem::take(out))
    }
}

/// Writes a piece of a response body, compressed when `encoder` is set.
pub(crate) async fn write_body(
    session: &mut ServerSession,
    encoder: &mut Option<Encoder>,
    bytes: Bytes,
    end: bool,
) -> pingora::Result<()> {
    let bytes = match encoder {
        Some(encoder) => encoder.encode(&bytes, end),
        None => bytes,
    };
    session.write_response_body(bytes, end).await
}

impl ApiMeta {
    /// Response header with the `x-mock-*` headers.
    pub(crate) fn header(&self, status: u16, content_type: &str) -> Box<ResponseHeader> {
        let mut h = response_header(status, content_type);
        let _ = h.insert_header("x-mock-request-bytes", self.body_len.to_string());
        let _ = h.insert_header("x-mock-body-sha256", self.body_sha256.as_str());
        if let Some(m) = &self.model {
            // a model name that is not a valid header value is simply not echoed
            let _ = h.insert_header("x-mock-model", m.as_str());
        }
        let _ = h.insert_header("x-request-id", format!("req_mock_{}", self.id));
        if let Some(encoding) = self.compress {
            let _ = h.insert_header(http::header::CONTENT_ENCODING, encoding);
        }
        if let Some(key) = &self.echo_key {
            for name in [
                "x-request-id",
                "openai-version",
                "openai-processing-ms",
                "cache-control",
            ] {
                let _ = h.insert_header(name, key.as_str());
            }
        }
        for (name, value) in &self.extra_headers {
            let _ = h.append_header(name.clone(), value.as_str());
        }
        h
    }

    /// The model to put in response bodies.
    pub(crate) fn response_model(&self) -> &str {
        self.model.as_deref().unwrap_or(DEFAULT_MODEL)
    }
}

/// The credential a request carried: the bearer key, `x-api-key` or `api-key`.
pub(crate) fn credential(headers: &HeaderMap) -> String {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header("authorization")
        .map(|v| v.strip_prefix("Bearer ").unwrap_or(v))
        .or_else(|| header("x-api-key"))
        .or_else(|| header("api-key"))
        .unwrap_or_default()
        .to_owned()
}

/// Every character of `text` as a JSON `\uXXXX` escape.
pub(crate) fn escape_every_char(text: &str) -> String {
    text.chars()
        .map(|c| format!("\\u{:04x}", c as u32))
        .collect()
}

/// A bare response header with a content type.
pub(crate) fn response_header(status: u16, content_type: &str) -> Box<ResponseHeader> {
    let mut h = ResponseHeader::build(status, Some(8))
        .unwrap_or_else(|_| ResponseHeader::build(500, Some(8)).expect("500 is a valid status"));
    let _ = h.insert_header(http::header::CONTENT_TYPE, content_type);
    Box::new(h)
}

/// A complete (non-streamed) response.
#[derive(Debug)]
pub(crate) struct Reply {
    /// Status.
    pub(crate) status: u16,
    /// `content-type`.
    pub(crate) content_type: Cow<'static, str>,
    /// Body.
    pub(crate) body: Bytes,
    /// `retry-after` seconds.
    pub(crate) retry_after: Option<u64>,
    /// (prompt, completion) tokens to account when the response is delivered.
    pub(crate) tokens: Option<(u64, u64)>,
}

impl Reply {
    /// The same reply without its `usage` member.
    pub(crate) fn without_usage(mut self) -> Self {
        if let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(&self.body) {
            body.remove("usage");
            self.body = serde_json::to_vec(&body).unwrap_or_default().into();
        }
        self
    }

    /// The same reply echoing `key`: as `system_fingerprint` and, escaped
    /// character by character, as `echo_escaped` (JSON objects only).
    pub(crate) fn with_echo(mut self, key: &str) -> Self {
        if let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(&self.body) {
            body.insert("system_fingerprint".into(), json!(key));
            body.insert("echo_escaped".into(), json!("@ECHO@"));
            let text = serde_json::to_string(&body)
                .unwrap_or_default()
                .replace("@ECHO@", &escape_every_char(key));
            self.body = text.into_bytes().into();
        }
        self
    }

    /// A JSON reply.
    pub(crate) fn json(status: u16, body: Vec<u8>) -> Self {
        Reply {
            status,
            content_type: "application/json".into(),
            body: body.into(),
            retry_after: None,
            tokens: None,
        }
    }

    /// An OpenAI-shaped error reply.
    pub(crate) fn error(e: &ApiError) -> Self {
        Reply::json(e.status, e.body())
    }
}

/// Why reading the request body stopped.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// Larger than [`MAX_BODY_BYTES`].
    TooLarge,
    /// The client went away or sent garbage.
    Io,
}

/// Reads the whole request body without copying in the common single-chunk case.
pub(crate) async fn read_body(session: &mut ServerSession) -> Result<Bytes, BodyError> {
    let hint = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if hint.is_some_and(|n| n > MAX_BODY_BYTES) {
        return Err(BodyError::TooLarge);
    }
    let mut first: Option<Bytes> = None;
    let mut rest: Option<BytesMut> = None;
    let mut total = 0usize;
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                total += chunk.len();
                if total > MAX_BODY_BYTES {
                    return Err(BodyError::TooLarge);
                }
                if let Some(buf) = rest.as_mut() {
                    buf.extend_from_slice(&chunk);
                } else if let Some(f) = first.take() {
                    let mut buf = BytesMut::with_capacity(hint.unwrap_or(0).max(total));
                    buf.extend_from_slice(&f);
                    buf.extend_from_slice(&chunk);
                    rest = Some(buf);
                } else {
                    first = Some(chunk);
                }
            }
            Ok(None) => break,
            Err(_) => return Err(BodyError::Io),
        }
    }
    Ok(match (rest, first) {
        (Some(buf), _) => buf.freeze(),
        (None, Some(f)) => f,
        (None, None) => Bytes::new(),
    })
}

/// Sleeps `dur`, watching for the client to go away meanwhile.
///
/// Returns `false` when the client closed or reset the connection. If the
/// client sent more data instead (pipelining), watching stops for the rest of
/// this request and the connection will not be reused.
pub(crate) async fn pause(session: &mut ServerSession, watch: &mut bool, dur: Duration) -> bool {
    if dur.is_zero() {
        return true;
    }
    let sleep = tokio::time::sleep(dur);
    tokio::pin!(sleep);
    if *watch {
        tokio::select! {
            _ = &mut sleep => return true,
            res = session.read_body_or_idle(true) => match res {
                Err(e) if matches!(e.etype(), ErrorType::ConnectionClosed | ErrorType::ReadError) => {
                    return false;
                }
                _ => {
                    *watch = false;
                    session.set_keepalive(None);
                }
            },
        }
    }
    sleep.await;
    true
}

/// Current Unix time in seconds.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
