//! Undoing the content encoding of a provider that compressed its answer
//! although the gateway asked for `identity`: gzip, deflate, br and zstd,
//! chunk by chunk, so what is metered, redacted and sent on is the decoded
//! answer. The decoded size is bounded (a small body that inflates without
//! end is refused, not held).

use bytes::Bytes;
use std::io::{self, Write};

/// The error of an answer whose content encoding does not decode (cut
/// short, corrupt, past the decoded bound, a zstd window over 8 MiB).
pub(super) const DOES_NOT_DECODE: pingora::ErrorType =
    pingora::ErrorType::new("AnswerDoesNotDecode");

/// The most decoded bytes one answer may come to.
pub(super) const MAX_DECODED_BYTES: usize = 256 * 1024 * 1024;

/// About the most decoded bytes one read hands on: a piece of compressed
/// body decodes a step at a time, so that a small one inflating a
/// thousandfold (64 KiB to 64 MiB) is never held whole, and what is sent
/// on waits for the client like any other read.
const DECODED_PIECE: usize = 1024 * 1024;

/// Compressed bytes decoded in one step towards [`DECODED_PIECE`]: at a
/// thousandfold, a step adds a quarter of a piece.
const DECODE_STEP: usize = 256;

/// A streaming decoder for one content encoding.
pub(super) enum Decoder {
    Gzip(flate2::write::GzDecoder<Sink>),
    Deflate(flate2::write::ZlibDecoder<Sink>),
    Brotli(Box<BrotliStream>),
    Zstd(zstd::stream::write::Decoder<'static, Sink>),
}

/// Where decoded bytes collect until taken, counting them all.
pub(super) struct Sink {
    out: Vec<u8>,
    total: usize,
    cap: usize,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.total += buf.len();
        if self.total > self.cap {
            return Err(io::Error::other(
                "the answer decodes to more than the gateway holds",
            ));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A brotli stream, decoded into a bounded buffer a call at a time: the
/// crate's writer decodes all a write holds at once, and a few hundred
/// bytes of brotli may inflate to hundreds of megabytes.
pub(super) struct BrotliStream {
    state: brotli::BrotliState<
        brotli::HeapAlloc<u8>,
        brotli::HeapAlloc<u32>,
        brotli::HeapAlloc<brotli::HuffmanCode>,
    >,
    sink: Sink,
    ended: bool,
    /// Decoded bytes wait in the state for room to go to.
    pending: bool,
}

impl BrotliStream {
    fn new(sink: Sink) -> Self {
        BrotliStream {
            state: brotli::BrotliState::new(
                brotli::HeapAlloc::new(0),
                brotli::HeapAlloc::new(0),
                brotli::HeapAlloc::new(brotli::HuffmanCode::default()),
            ),
            sink,
            ended: false,
            pending: false,
        }
    }

    /// Decodes from the front of `input` into the sink until `input` is
    /// used up, and all it decodes to is out, or [`DECODED_PIECE`] bytes
    /// are there.
    fn decode_some(&mut self, input: &mut Bytes) -> io::Result<()> {
        let mut out = [0u8; 16 * 1024];
        while (!input.is_empty() || self.pending) && self.sink.out.len() < DECODED_PIECE {
            if self.ended {
                // Bytes past the end of the compressed stream.
                return Err(io::ErrorKind::WriteZero.into());
            }
            let (mut available_in, mut input_offset) = (input.len(), 0);
            let (mut available_out, mut output_offset, mut total_out) = (out.len(), 0, 0);
            let result = brotli::BrotliDecompressStream(
                &mut available_in,
                &mut input_offset,
                input,
                &mut available_out,
                &mut output_offset,
                &mut out,
                &mut total_out,
                &mut self.state,
            );
            bytes::Buf::advance(input, input_offset);
            self.sink.write_all(&out[..output_offset])?;
            self.pending = matches!(result, brotli::BrotliResult::NeedsMoreOutput);
            match result {
                brotli::BrotliResult::ResultSuccess => self.ended = true,
                brotli::BrotliResult::NeedsMoreInput | brotli::BrotliResult::NeedsMoreOutput => {}
                brotli::BrotliResult::ResultFailure => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "not brotli"))
                }
            }
        }
        Ok(())
    }

    /// The end of the body: an error unless the stream ended.
    fn finish(&self) -> io::Result<()> {
        if self.ended {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the stream was cut short",
        ))
    }
}

/// What an answer's `content-encoding` says was applied, read from every
/// line of it (a list may be split over several, RFC 9110): `Ok(None)` for
/// nothing or `identity` only, `Ok(Some(coding))` for one coding, and
/// `Err(())` for more than one, an empty member or a value that is not text
/// (none of which the gateway undoes: sent on, the client would get
/// compressed bytes it was not told of, unmetered and unredacted).
fn content_coding(headers: &http::HeaderMap) -> Result<Option<&str>, ()> {
    let mut coding = None;
    for value in headers.get_all(http::header::CONTENT_ENCODING) {
        for member in value.to_str().map_err(drop)?.split(',') {
            let member = member.trim();
            if member.eq_ignore_ascii_case("identity") {
                continue;
            }
            if member.is_empty() || coding.replace(member).is_some() {
                return Err(());
            }
        }
    }
    Ok(coding)
}

/// Whether an answer's `transfer-encoding` is anything but one `chunked`:
/// another coding (`gzip`, `compress`, ...) would reach the gateway still
/// applied, which nothing here undoes, and `chunked` twice (which HTTP/1.1
/// forbids) would be undone once, its inner framing sent on as the body.
fn transfer_coded(headers: &http::HeaderMap) -> bool {
    let mut chunked = 0;
    for value in headers.get_all(http::header::TRANSFER_ENCODING) {
        let Ok(value) = value.to_str() else {
            return true;
        };
        for coding in value.split(',').map(str::trim) {
            if !coding.eq_ignore_ascii_case("chunked") {
                return true;
            }
            chunked += 1;
        }
    }
    chunked > 1
}

/// The codings a header names, for a log line: the ones HTTP defines by
/// name, and `<other>` for anything else (a provider's own words, which may
/// hold its key, split over lines so that no redaction would find it whole).
pub(super) fn named_codings(headers: &http::HeaderMap, name: http::header::HeaderName) -> String {
    const KNOWN: [&str; 9] = [
        "identity",
        "chunked",
        "gzip",
        "x-gzip",
        "deflate",
        "br",
        "zstd",
        "compress",
        "x-compress",
    ];
    let mut out = Vec::new();
    for value in headers.get_all(name) {
        for member in String::from_utf8_lossy(value.as_bytes()).split(',') {
            let member = member.trim().to_ascii_lowercase();
            out.push(match KNOWN.iter().find(|known| **known == member) {
                Some(known) => *known,
                None => "<other>",
            });
        }
    }
    out.join(", ")
}

impl Decoder {
    /// The decoder an answer with these headers needs: `Ok(None)` for a
    /// plain one, `Err(())` for codings the gateway does not undo (several
    /// stacked, an unknown one, or any transfer coding but `chunked`).
    pub(super) fn for_answer(headers: &http::HeaderMap) -> Result<Option<Decoder>, ()> {
        if transfer_coded(headers) {
            return Err(());
        }
        match content_coding(headers)? {
            None => Ok(None),
            Some(coding) => match Decoder::for_encoding(coding.as_bytes()) {
                Some(Ok(decoder)) => Ok(Some(decoder)),
                _ => Err(()),
            },
        }
    }

    /// The decoder for a `content-encoding` value; `None` for `identity`
    /// or an encoding the gateway cannot undo (one coding only).
    pub(super) fn for_encoding(encoding: &[u8]) -> Option<io::Result<Decoder>> {
        Self::with_cap(encoding, MAX_DECODED_BYTES)
    }

    /// [`Decoder::for_encoding`], decoding to at most `cap` bytes.
    fn with_cap(encoding: &[u8], cap: usize) -> Option<io::Result<Decoder>> {
        let sink = || Sink {
            out: Vec::new(),
            total: 0,
            cap,
        };
        let encoding = encoding.trim_ascii();
        Some(Ok(match encoding.to_ascii_lowercase().as_slice() {
            b"gzip" | b"x-gzip" => Decoder::Gzip(flate2::write::GzDecoder::new(sink())),
            b"deflate" => Decoder::Deflate(flate2::write::ZlibDecoder::new(sink())),
            b"br" => Decoder::Brotli(Box::new(BrotliStream::new(sink()))),
            // A window of at most 8 MiB (what HTTP's zstd coding allows, RFC
            // 9659): a frame asking for more, up to 2 GiB, is refused.
            b"zstd" => match zstd::stream::write::Decoder::new(sink())
                .and_then(|mut decoder| decoder.window_log_max(23).map(|()| decoder))
            {
                Ok(decoder) => Decoder::Zstd(decoder),
                Err(e) => return Some(Err(e)),
            },
            _ => return None,
        }))
    }

    /// The encoding's name, for messages.
    pub(super) fn name(&self) -> &'static str {
        match self {
            Decoder::Gzip(_) => "gzip",
            Decoder::Deflate(_) => "deflate",
            Decoder::Brotli(_) => "br",
            Decoder::Zstd(_) => "zstd",
        }
    }

    fn sink(&mut self) -> &mut Sink {
        match self {
            Decoder::Gzip(d) => d.get_mut(),
            Decoder::Deflate(d) => d.get_mut(),
            Decoder::Brotli(d) => &mut d.sink,
            Decoder::Zstd(d) => d.get_mut(),
        }
    }

    /// Whether decoded bytes wait to be taken ([`Decoder::decode_some`])
    /// although the input they came from was used up.
    pub(super) fn has_pending(&self) -> bool {
        matches!(self, Decoder::Brotli(stream) if stream.pending)
    }

    /// Decodes from the front of `input` until it is used up (and all it
    /// decodes to is out: [`Decoder::has_pending`]) or about
    /// [`DECODED_PIECE`] bytes came out; what came out. The rest of `input`
    /// is left there for the next call.
    pub(super) fn decode_some(&mut self, input: &mut Bytes) -> io::Result<Bytes> {
        if let Decoder::Brotli(stream) = self {
            stream.decode_some(input)?;
            return Ok(Bytes::from(std::mem::take(&mut stream.sink.out)));
        }
        while !input.is_empty() && self.sink().out.len() < DECODED_PIECE {
            let step = &input[..input.len().min(DECODE_STEP)];
            let used = match self {
                Decoder::Gzip(d) => d.write(step)?,
                Decoder::Deflate(d) => d.write(step)?,
                Decoder::Zstd(d) => d.write(step)?,
                Decoder::Brotli(_) => unreachable!("decoded above"),
            };
            if used == 0 {
                // Bytes past the end of the compressed stream.
                return Err(io::ErrorKind::WriteZero.into());
            }
            bytes::Buf::advance(input, used);
        }
        match self {
            Decoder::Gzip(d) => d.flush()?,
            Decoder::Deflate(d) => d.flush()?,
            Decoder::Zstd(d) => d.flush()?,
            Decoder::Brotli(_) => {}
        }
        Ok(Bytes::from(std::mem::take(&mut self.sink().out)))
    }

    /// The end of the body: the rest, or an error when it was cut short
    /// (its compressed stream not ended).
    pub(super) fn finish(&mut self) -> io::Result<Bytes> {
        match self {
            Decoder::Gzip(d) => d.try_finish()?,
            Decoder::Deflate(d) => d.try_finish()?,
            Decoder::Brotli(d) => d.finish()?,
            Decoder::Zstd(d) => d.do_finish()?,
        }
        Ok(Bytes::from(std::mem::take(&mut self.sink().out)))
    }
}

/// The size of a piece at which [`UpstreamBody::read_ready`] stops joining.
const MAX_JOINED_BYTES: usize = 64 * 1024;

/// The most reads [`UpstreamBody::read_ready`] joins: as many events (a
/// provider's read holds one, nearly always) as the stream meter keeps
/// its readings of for the resumable record, which would otherwise read
/// the first ones again.
const MAX_JOINED_READS: usize = crate::cost::memo::SLOTS;

/// The upstream body as the gateway reads it: decoded when the provider
/// encoded it.
pub(super) struct UpstreamBody<'a> {
    pub(super) session: &'a mut pingora::protocols::http::client::HttpSession,
    /// Boxed: rarely there, and large, in every request's state.
    pub(super) decoder: Option<Box<Decoder>>,
    /// How the body went on after the pieces the last
    /// [`UpstreamBody::read_ready`] joined (its end, or its failure): told
    /// by the next read.
    then: Option<pingora::Result<Option<Bytes>>>,
    /// Compressed bytes read and not decoded yet (see
    /// [`Decoder::decode_some`]).
    undecoded: Bytes,
}

impl<'a> UpstreamBody<'a> {
    /// The body of `session`, decoded by `decoder`.
    pub(super) fn new(
        session: &'a mut pingora::protocols::http::client::HttpSession,
        decoder: Option<Box<Decoder>>,
    ) -> Self {
        UpstreamBody {
            session,
            decoder,
            then: None,
            undecoded: Bytes::new(),
        }
    }

    /// [`UpstreamBody::read`], joined with the pieces that are already
    /// there behind it (at most [`MAX_JOINED_READS`] reads, and none once
    /// [`MAX_JOINED_BYTES`] are in): a provider's events that arrived
    /// together go to the client in one write, as a plain proxy forwards
    /// them, rather than a write (and a system call) each. Nothing waits
    /// for more: what is not there yet is read next time.
    pub(super) async fn read_ready(&mut self) -> pingora::Result<Option<Bytes>> {
        let Some(first) = self.read().await? else {
            return Ok(None);
        };
        let mut joined: Option<bytes::BytesMut> = None;
        for _ in 1..MAX_JOINED_READS {
            if joined.as_ref().map_or(first.len(), |j| j.len()) >= MAX_JOINED_BYTES {
                break;
            }
            // A read that has to wait is dropped unfinished: the body's
            // readers keep their place across that (they are cancel-safe).
            match futures_util::FutureExt::now_or_never(self.read()) {
                None => break,
                Some(Ok(Some(more))) => joined
                    .get_or_insert_with(|| {
                        // A provider's events are of a size: room for all.
                        let room = (first.len() + more.len()) * MAX_JOINED_READS / 2;
                        let mut all = bytes::BytesMut::with_capacity(room.min(MAX_JOINED_BYTES));
                        all.extend_from_slice(&first);
                        all
                    })
                    .extend_from_slice(&more),
                Some(then) => {
                    self.then = Some(then);
                    break;
                }
            }
        }
        Ok(Some(joined.map_or(first, bytes::BytesMut::freeze)))
    }

    /// The next piece of the (decoded) body; `None` at its end. A body that
    /// does not decode is a read error (the provider's failure).
    pub(super) async fn read(&mut self) -> pingora::Result<Option<Bytes>> {
        if let Some(then) = self.then.take() {
            return then;
        }
        // Not a read error: the provider's answer is at fault, not the
        // connection (no retry on the same deployment), and says so.
        let failed = |e: io::Error, encoding: &str| {
            pingora::Error::explain(
                DOES_NOT_DECODE,
                format!("the answer does not decode as {encoding}: {e}"),
            )
        };
        loop {
            if let Some(decoder) = self.decoder.as_mut() {
                if !self.undecoded.is_empty() || decoder.has_pending() {
                    let out = decoder
                        .decode_some(&mut self.undecoded)
                        .map_err(|e| failed(e, decoder.name()))?;
                    if !out.is_empty() {
                        return Ok(Some(out));
                    }
                    continue;
                }
            }
            let chunk = self.session.read_response_body().await?;
            let Some(decoder) = self.decoder.as_mut() else {
                return Ok(chunk);
            };
            match chunk {
                Some(chunk) => self.undecoded = chunk,
                None => {
                    let rest = decoder.finish().map_err(|e| failed(e, decoder.name()))?;
                    self.decoder = None;
                    return Ok((!rest.is_empty()).then_some(rest));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All `piece` decodes to, a step at a time.
    fn decode_whole(decoder: &mut Decoder, piece: &[u8]) -> io::Result<Vec<u8>> {
        let mut input = Bytes::copy_from_slice(piece);
        let mut out = Vec::new();
        while !input.is_empty() || decoder.has_pending() {
            out.extend_from_slice(&decoder.decode_some(&mut input)?);
        }
        Ok(out)
    }

    fn roundtrip(encoding: &str, compressed: Vec<u8>, plain: &[u8]) {
        let mut decoder = Decoder::for_encoding(encoding.as_bytes()).unwrap().unwrap();
        let mut out = Vec::new();
        for piece in compressed.chunks(7) {
            out.extend_from_slice(&decode_whole(&mut decoder, piece).unwrap());
        }
        out.extend_from_slice(&decoder.finish().unwrap());
        assert_eq!(out, plain, "{encoding}");
    }

    #[test]
    fn decodes_each_encoding_in_pieces() {
        let plain = b"data: {\"choices\":[{\"delta\":{\"content\":\"hello\"}}]}\n\n".repeat(50);
        for encoding in ["gzip", "deflate", "br", "zstd"] {
            roundtrip(encoding, encoded(encoding, &plain), &plain);
        }
        // The coding's name as the head gives it, in any case.
        roundtrip("Deflate", encoded("deflate", &plain), &plain);
        assert!(Decoder::for_encoding(b"identity").is_none());
        assert!(
            Decoder::for_encoding(b"gzip, br").is_none(),
            "one coding only"
        );
    }

    #[test]
    fn every_line_of_the_codings_counts() {
        let headers = |lines: &[(&str, &str)]| {
            let mut map = http::HeaderMap::new();
            for (name, value) in lines {
                map.append(
                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    http::HeaderValue::from_str(value).unwrap(),
                );
            }
            map
        };
        let ce = |values: &[&str]| {
            let lines: Vec<_> = values.iter().map(|v| ("content-encoding", *v)).collect();
            content_coding(&headers(&lines)).map(|c| c.map(str::to_owned))
        };
        assert_eq!(ce(&[]), Ok(None));
        assert_eq!(ce(&["identity"]), Ok(None));
        assert_eq!(ce(&["identity", "GZIP"]), Ok(Some("GZIP".into())));
        assert_eq!(ce(&["gzip, identity"]), Ok(Some("gzip".into())));
        assert_eq!(ce(&["gzip", "br"]), Err(()));
        assert_eq!(ce(&["gzip, br"]), Err(()));
        assert_eq!(ce(&["gzip,"]), Err(()));
        let te = |values: &[&str]| {
            let lines: Vec<_> = values.iter().map(|v| ("transfer-encoding", *v)).collect();
            transfer_coded(&headers(&lines))
        };
        assert!(!te(&[]));
        assert!(!te(&["chunked"]));
        assert!(!te(&["Chunked"]));
        assert!(te(&["gzip"]));
        assert!(te(&["gzip, chunked"]));
        assert!(te(&["chunked", "gzip"]));
        assert!(te(&["chunked, chunked"]));
        assert!(te(&["chunked", "chunked"]));
        let mut head = headers(&[
            ("content-encoding", "GZip, sk-proj-Ab3dEf"),
            ("content-encoding", "9HiJ2kLmN0pQ7z"),
        ]);
        assert_eq!(
            named_codings(&head, http::header::CONTENT_ENCODING),
            "gzip, <other>, <other>"
        );
        head.clear();
        assert_eq!(named_codings(&head, http::header::TRANSFER_ENCODING), "");
    }

    /// A client session over loopback whose answer the returned socket
    /// writes: the head is read, the body left to the test.
    async fn answered(
        head: &[u8],
    ) -> (
        pingora::protocols::http::client::HttpSession,
        tokio::net::TcpStream,
    ) {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (mut provider, _) = accepted.unwrap();
        let stream = pingora::protocols::l4::stream::Stream::from(client.unwrap());
        let mut session = pingora::protocols::http::client::HttpSession::H1(
            pingora::protocols::http::v1::client::HttpSession::new(Box::new(stream)),
        );
        let request = pingora::http::RequestHeader::build("GET", b"/", None).unwrap();
        session
            .write_request_header(Box::new(request))
            .await
            .unwrap();
        provider.write_all(head).await.unwrap();
        session.read_response_header().await.unwrap();
        (session, provider)
    }

    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";

    #[tokio::test]
    async fn what_is_there_is_joined_and_a_read_that_would_wait_loses_nothing() {
        use tokio::io::AsyncWriteExt;
        let (mut session, mut provider) = answered(CHUNKED).await;
        // Six whole chunks and the start of a seventh's head: the reads
        // joined stop at the most, then at what would have to wait.
        let mut sent = Vec::new();
        for word in ["one ", "two ", "three ", "four ", "five ", "six "] {
            sent.extend_from_slice(format!("{:x}\r\n{word}\r\n", word.len()).as_bytes());
        }
        provider.write_all(&sent).await.unwrap();
        provider.write_all(b"5\r").await.unwrap();
        let mut body = UpstreamBody::new(&mut session, None);
        let first = body.read_ready().await.unwrap().unwrap();
        assert_eq!(&first[..], b"one two three four ");
        let second = body.read_ready().await.unwrap().unwrap();
        assert_eq!(&second[..], b"five six ");
        // The rest of the head, its chunk and the end.
        let rest = async {
            provider.write_all(b"\nseven\r\n0\r\n\r\n").await.unwrap();
            provider
        };
        let (third, _provider) = tokio::join!(body.read_ready(), rest);
        assert_eq!(&third.unwrap().unwrap()[..], b"seven");
        assert!(body.read_ready().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_break_behind_what_was_joined_is_told_by_the_next_read() {
        use tokio::io::AsyncWriteExt;
        let (mut session, mut provider) = answered(CHUNKED).await;
        provider
            .write_all(b"5\r\nhello\r\n6\r\n world\r\n9\r\ncut sh")
            .await
            .unwrap();
        drop(provider);
        let mut body = UpstreamBody::new(&mut session, None);
        // What came before the break is whole; the break comes after it.
        let mut got = Vec::new();
        let broke = loop {
            match body.read_ready().await {
                Ok(Some(piece)) => got.extend_from_slice(&piece),
                Ok(None) => break false,
                Err(_) => break true,
            }
        };
        assert!(broke, "a body cut inside a chunk is a read error");
        assert!(got.starts_with(b"hello world"), "{got:?}");
    }

    #[tokio::test]
    async fn a_whole_body_and_its_end_come_in_one_read() {
        use tokio::io::AsyncWriteExt;
        let (mut session, mut provider) =
            answered(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n").await;
        provider.write_all(b"hello world").await.unwrap();
        let mut body = UpstreamBody::new(&mut session, None);
        assert_eq!(
            &body.read_ready().await.unwrap().unwrap()[..],
            b"hello world"
        );
        assert!(body.read_ready().await.unwrap().is_none());
        assert!(body.read().await.unwrap().is_none());
    }

    #[test]
    fn a_body_that_inflates_without_end_is_refused() {
        let zeros = vec![0u8; 4 << 20];
        let compressed = zstd::encode_all(&zeros[..], 3).unwrap();
        assert!(compressed.len() < 4096);
        let mut decoder = Decoder::with_cap(b"zstd", 1 << 20).unwrap().unwrap();
        let result = compressed
            .chunks(4096)
            .try_for_each(|piece| decode_whole(&mut decoder, piece).map(drop));
        assert!(result.is_err());
    }

    /// `plain` in `encoding`.
    fn encoded(encoding: &str, plain: &[u8]) -> Vec<u8> {
        match encoding {
            "gzip" => {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
                gz.write_all(plain).unwrap();
                gz.finish().unwrap()
            }
            "deflate" => {
                let mut zlib =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
                zlib.write_all(plain).unwrap();
                zlib.finish().unwrap()
            }
            "br" => {
                let mut br = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
                br.write_all(plain).unwrap();
                br.into_inner()
            }
            _ => zstd::encode_all(plain, 3).unwrap(),
        }
    }

    #[test]
    fn a_piece_that_inflates_a_thousandfold_is_handed_on_a_step_at_a_time() {
        // Brotli's 16 MiB of zeros is under a hundred bytes: less than one
        // of the other codings' steps.
        let zeros = vec![0u8; 16 << 20];
        for encoding in ["gzip", "br", "zstd"] {
            let compressed = Bytes::from(encoded(encoding, &zeros));
            assert!(
                compressed.len() < 128 * 1024,
                "{encoding}: {}",
                compressed.len()
            );
            let mut decoder = Decoder::for_encoding(encoding.as_bytes()).unwrap().unwrap();
            let mut input = compressed;
            let (mut total, mut largest) = (0, 0);
            while !input.is_empty() || decoder.has_pending() {
                let out = decoder.decode_some(&mut input).unwrap();
                total += out.len();
                largest = largest.max(out.len());
            }
            total += decoder.finish().unwrap().len();
            assert_eq!(total, zeros.len(), "{encoding}");
            assert!(largest <= 2 * DECODED_PIECE, "{encoding}: {largest}");
        }
    }

    #[test]
    fn a_stream_cut_short_or_with_a_window_past_8_mib_does_not_decode() {
        let plain = b"data: {\"choices\":[{\"delta\":{\"content\":\"hello\"}}]}\n\n".repeat(500);
        for encoding in ["gzip", "br", "zstd"] {
            let whole = encoded(encoding, &plain);
            let cut = &whole[..whole.len() - 4];
            let mut decoder = Decoder::for_encoding(encoding.as_bytes()).unwrap().unwrap();
            let decoded = decode_whole(&mut decoder, cut).and_then(|_| decoder.finish());
            assert!(decoded.is_err(), "{encoding}: a cut stream passed as whole");
        }
        // A zstd frame that asks for a 128 MiB window.
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        encoder.window_log(27).unwrap();
        encoder.long_distance_matching(true).unwrap();
        encoder.write_all(&vec![7u8; 20 << 20]).unwrap();
        let long = encoder.finish().unwrap();
        let mut decoder = Decoder::for_encoding(b"zstd").unwrap().unwrap();
        assert!(decode_whole(&mut decoder, &long).is_err());
    }
}
