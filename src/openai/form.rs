//! Multipart uploads (`/v1/images/edits`, `/variations`,
//! `/v1/audio/transcriptions`, `/translations`): the form is parsed (with
//! `multer`) for its `model`, `stream` and `n` fields, and always sent
//! upstream re-encoded in one canonical shape, under a boundary and a
//! content type of the gateway's own: each part with a clean
//! `Content-Disposition` (its name, and its filename when it has one) and
//! its `Content-Type`, the provider's model name in place of the public one.
//!
//! Multipart parsers disagree at the edges (which of two `name=` or
//! `boundary=` parameters counts, whether names match case-insensitively,
//! `name*=`, a preamble): had the client's bytes gone upstream, a provider
//! could read another model than the one the gateway routed, allowed and
//! billed. So a form that could be read two ways is refused (400), and the
//! provider only ever sees what the gateway read.

use super::ApiError;
use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue};

/// The fields the gateway reads: each must be a plain field, given once,
/// under exactly this name (not `Model` or `MODEL`, which some parsers
/// would take for it).
const READ_FIELDS: [&str; 3] = ["model", "stream", "n"];

/// One part of the form, as the gateway read it.
#[derive(Debug)]
struct Part {
    name: String,
    filename: Option<String>,
    content_type: Option<HeaderValue>,
    data: Bytes,
}

/// A parsed multipart form.
#[derive(Debug)]
pub struct Form {
    /// The boundary of the form the gateway sends (its own, fresh).
    boundary: String,
    parts: Vec<Part>,
    /// The public model the form names.
    pub model: String,
    /// `stream=true` (streamed transcriptions).
    pub stream: bool,
    /// Images asked for (`n`).
    pub n: Option<u64>,
}

fn ambiguous(what: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!(
        "The multipart form is ambiguous and was refused: {what}."
    ))
}

/// `tchar` of RFC 9110: what a token (a parameter's name or unquoted
/// value) is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The `; name=value` parameters after a media type or disposition type,
/// strictly: names are tokens, values tokens or quoted strings without
/// escapes (`\"` is read differently by different parsers), each name
/// (case-insensitively) at most once.
fn parameters(rest: &str, what: &str) -> Result<Vec<(String, String)>, ApiError> {
    let mut params: Vec<(String, String)> = Vec::new();
    let mut rest = rest.trim_matches([' ', '\t']);
    while !rest.is_empty() {
        rest = rest
            .strip_prefix(';')
            .ok_or_else(|| ambiguous(format!("{what} has text that is not a parameter")))?
            .trim_start_matches([' ', '\t']);
        if rest.is_empty() {
            // A trailing `;`.
            break;
        }
        let name_len = rest.bytes().take_while(|&b| is_tchar(b)).count();
        let name = &rest[..name_len];
        rest = rest[name_len..].trim_start_matches([' ', '\t']);
        rest = rest
            .strip_prefix('=')
            .filter(|_| !name.is_empty())
            .ok_or_else(|| ambiguous(format!("{what} has a parameter without a value")))?
            .trim_start_matches([' ', '\t']);
        let value = if let Some(quoted) = rest.strip_prefix('"') {
            let end = quoted
                .find('"')
                .ok_or_else(|| ambiguous(format!("{what} has an unclosed quote")))?;
            let value = &quoted[..end];
            if value.contains("\\\"") || value.bytes().any(|b| b.is_ascii_control()) {
                return Err(ambiguous(format!(
                    "{what} has an escaped quote or a control character in a value"
                )));
            }
            rest = &quoted[end + 1..];
            value
        } else {
            let len = rest.bytes().take_while(|&b| is_tchar(b)).count();
            let value = &rest[..len];
            rest = &rest[len..];
            value
        };
        rest = rest.trim_start_matches([' ', '\t']);
        if params.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
            return Err(ambiguous(format!(
                "{what} gives the parameter '{}' more than once",
                name.to_ascii_lowercase()
            )));
        }
        params.push((name.to_owned(), value.to_owned()));
    }
    Ok(params)
}

/// The boundary of a `multipart/form-data` content type: exactly one
/// `boundary` parameter, of the characters RFC 2046 allows (no space).
fn boundary_of(content_type: &str) -> Result<String, ApiError> {
    let not_form = || {
        ApiError::bad_request(
            "This endpoint takes a multipart/form-data body (the file and its fields).",
        )
    };
    let media_type = content_type.split(';').next().unwrap_or_default();
    if !media_type
        .trim_matches([' ', '\t'])
        .eq_ignore_ascii_case("multipart/form-data")
    {
        return Err(not_form());
    }
    let rest = &content_type[media_type.len()..];
    let params = parameters(rest, "the Content-Type")?;
    let (name, boundary) = params
        .into_iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("boundary"))
        .ok_or_else(not_form)?;
    let bchar = |b: u8| b.is_ascii_alphanumeric() || b"'()+_,-./:=?".contains(&b);
    if name != "boundary" || !(1..=70).contains(&boundary.len()) || !boundary.bytes().all(bchar) {
        return Err(ambiguous("the Content-Type's boundary is not a plain one"));
    }
    Ok(boundary)
}

/// Checks the form's frame on the raw bytes, as the strictest parser
/// would read it, and says how many parts it has: nothing before the first
/// delimiter or after the last (parsers differ on preambles, epilogues and
/// padding after a delimiter), each part's header lines without folding and
/// each header given once (multer keeps only the last of two, another
/// parser the first).
fn part_heads(body: &[u8], boundary: &str) -> Result<usize, ApiError> {
    let delimiter = [b"\r\n--", boundary.as_bytes()].concat();
    let Some(mut rest) = body.strip_prefix(&delimiter[2..]) else {
        return Err(ambiguous(
            "the body does not start with the boundary's first delimiter",
        ));
    };
    let finder = memchr::memmem::Finder::new(&delimiter);
    let mut parts = 0;
    loop {
        if let Some(epilogue) = rest.strip_prefix(b"--") {
            if !matches!(epilogue, b"" | b"\r\n") {
                return Err(ambiguous("there is more after the closing delimiter"));
            }
            return Ok(parts);
        }
        let Some(part) = rest.strip_prefix(b"\r\n") else {
            return Err(ambiguous("a delimiter is not followed by a line break"));
        };
        let Some(head_end) = memchr::memmem::find(part, b"\r\n\r\n") else {
            return Err(ambiguous("a part's headers do not end"));
        };
        let mut names: Vec<String> = Vec::new();
        for line in part[..head_end].split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let name = line
                .iter()
                .position(|&b| b == b':')
                .map(|colon| &line[..colon])
                .filter(|name| !name.is_empty() && name.iter().all(|&b| is_tchar(b)))
                .ok_or_else(|| ambiguous("a part has a header line that is not 'Name: value'"))?;
            let name = String::from_utf8_lossy(name).to_ascii_lowercase();
            if names.contains(&name) {
                return Err(ambiguous(format!(
                    "a part gives the header '{name}' more than once"
                )));
            }
            names.push(name);
        }
        parts += 1;
        let Some(next) = finder.find(&part[head_end..]) else {
            return Err(ambiguous("the form has no closing delimiter"));
        };
        rest = &part[head_end + next + delimiter.len()..];
    }
}

/// A part's name and filename, read strictly from its one
/// `Content-Disposition` (`form-data`, then `name` and perhaps `filename`
/// in lower case; no `name*`/`filename*`, no case variants).
fn disposition(headers: &HeaderMap) -> Result<(String, Option<String>), ApiError> {
    let mut all = headers.get_all(header::CONTENT_DISPOSITION).iter();
    let (Some(value), None) = (all.next(), all.next()) else {
        return Err(ambiguous(
            "a part has no Content-Disposition, or more than one",
        ));
    };
    // UTF-8, not only visible ASCII: filenames may be in any script.
    let value = std::str::from_utf8(value.as_bytes())
        .map_err(|_| ambiguous("a part's Content-Disposition is not UTF-8"))?;
    let kind = value.split(';').next().unwrap_or_default();
    if !kind
        .trim_matches([' ', '\t'])
        .eq_ignore_ascii_case("form-data")
    {
        return Err(ambiguous("a part's Content-Disposition is not form-data"));
    }
    let rest = &value[kind.len()..];
    let mut name = None;
    let mut filename = None;
    for (param, value) in parameters(rest, "a part's Content-Disposition")? {
        match param.as_str() {
            "name" => name = Some(value),
            "filename" => filename = Some(value),
            other => {
                let lower = other.to_ascii_lowercase();
                if lower.starts_with("name") || lower.starts_with("filename") {
                    return Err(ambiguous(format!(
                        "a part's Content-Disposition has the parameter '{other}'"
                    )));
                }
                // Anything else is dropped from the form sent on.
            }
        }
    }
    let name = name.ok_or_else(|| ambiguous("a part has no name"))?;
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"_-.[]".contains(&b);
    if !(1..=128).contains(&name.len()) || !name.bytes().all(plain) {
        return Err(ambiguous(format!(
            "a part's name is not plain (letters, digits, '_', '-', '.', '[', ']'): {:?}",
            name.chars().take(40).collect::<String>()
        )));
    }
    Ok((name, filename))
}

impl Form {
    /// Parses `body` as the multipart form `content_type` announces;
    /// refuses (400) what is not a form, names no model, or could be read
    /// two ways.
    pub async fn parse(content_type: Option<&str>, body: Bytes) -> Result<Form, ApiError> {
        let content_type = content_type.ok_or_else(|| {
            ApiError::bad_request(
                "This endpoint takes a multipart/form-data body (the file and its fields).",
            )
        })?;
        let boundary = boundary_of(content_type)?;
        let heads = part_heads(&body, &boundary)?;
        let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
        let mut multipart = multer::Multipart::new(stream, boundary);
        let malformed = |e: multer::Error| {
            ApiError::bad_request(format!("The multipart form could not be read: {e}"))
        };
        let mut form = Form {
            boundary: String::new(),
            parts: Vec::new(),
            model: String::new(),
            stream: false,
            n: None,
        };
        let mut model = None;
        while let Some(field) = multipart.next_field().await.map_err(malformed)? {
            let (name, filename) = disposition(field.headers())?;
            // multer reads the name its own way: both must agree.
            if field.name() != Some(name.as_str()) {
                return Err(ambiguous("a part's name can be read two ways"));
            }
            let mut types = field.headers().get_all(header::CONTENT_TYPE).iter();
            let content_type = types.next().cloned();
            if types.next().is_some() {
                return Err(ambiguous("a part has more than one Content-Type"));
            }
            let data = field.bytes().await.map_err(malformed)?;
            if let Some(read) = READ_FIELDS
                .iter()
                .find(|read| read.eq_ignore_ascii_case(&name))
            {
                if *read != name {
                    return Err(ambiguous(format!("a part is named '{name}', not '{read}'")));
                }
                if filename.is_some() {
                    return Err(ApiError::invalid_field(
                        read,
                        "expected a plain form field, not a file",
                    ));
                }
                if form.parts.iter().any(|p| p.name == name) {
                    return Err(ApiError::invalid_field(read, "given more than once"));
                }
            }
            let text = || String::from_utf8_lossy(&data).trim().to_owned();
            match name.as_str() {
                "model" => model = Some(text()),
                "stream" => form.stream = text().eq_ignore_ascii_case("true"),
                "n" => {
                    form.n = Some(
                        text()
                            .parse()
                            .map_err(|_| ApiError::invalid_field("n", "expected an integer"))?,
                    )
                }
                _ => {}
            }
            form.parts.push(Part {
                name,
                filename,
                content_type,
                data,
            });
        }
        if form.parts.len() != heads {
            return Err(ambiguous("its parts can be counted two ways"));
        }
        form.model = model
            .filter(|m| !m.is_empty())
            .ok_or_else(ApiError::missing_model)?;
        form.boundary = fresh_boundary(&form.parts);
        Ok(form)
    }

    /// The content type of the form the gateway sends (with its own
    /// boundary).
    pub fn content_type(&self) -> HeaderValue {
        HeaderValue::from_str(&format!("multipart/form-data; boundary={}", self.boundary))
            .expect("the gateway's boundary is a valid header value")
    }

    /// The form to send for `provider_model`, in the canonical shape: every
    /// part as the gateway read it, the model's value replaced.
    pub fn body_for(&self, provider_model: &str) -> Bytes {
        let size = self
            .parts
            .iter()
            .map(|p| p.data.len() + p.name.len() + 160)
            .sum::<usize>()
            + provider_model.len();
        let mut out = BytesMut::with_capacity(size);
        for part in &self.parts {
            out.put_slice(b"--");
            out.put_slice(self.boundary.as_bytes());
            out.put_slice(b"\r\nContent-Disposition: form-data; name=\"");
            out.put_slice(part.name.as_bytes());
            out.put_slice(b"\"");
            if let Some(filename) = &part.filename {
                out.put_slice(b"; filename=\"");
                put_escaped(&mut out, filename);
                out.put_slice(b"\"");
            }
            out.put_slice(b"\r\n");
            if let Some(content_type) = &part.content_type {
                out.put_slice(b"Content-Type: ");
                out.put_slice(content_type.as_bytes());
                out.put_slice(b"\r\n");
            }
            out.put_slice(b"\r\n");
            if part.name == "model" {
                out.put_slice(provider_model.as_bytes());
            } else {
                out.put_slice(&part.data);
            }
            out.put_slice(b"\r\n");
        }
        out.put_slice(b"--");
        out.put_slice(self.boundary.as_bytes());
        out.put_slice(b"--\r\n");
        out.freeze()
    }
}

/// A boundary of the gateway's own that no part's data holds.
fn fresh_boundary(parts: &[Part]) -> String {
    loop {
        let boundary = format!("runestone-{:032x}", rand::random::<u128>());
        let finder = memchr::memmem::Finder::new(boundary.as_bytes());
        if parts.iter().all(|p| finder.find(&p.data).is_none()) {
            return boundary;
        }
    }
}

/// A filename inside quotes, as browsers write it: `"`, `\` and line
/// breaks percent-escaped, so no parser can end the value early.
fn put_escaped(out: &mut BytesMut, filename: &str) {
    for b in filename.bytes() {
        match b {
            b'"' => out.put_slice(b"%22"),
            b'\\' => out.put_slice(b"%5C"),
            b'\r' => out.put_slice(b"%0D"),
            b'\n' => out.put_slice(b"%0A"),
            b => out.put_u8(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPE: &str = "multipart/form-data; boundary=XyZ";

    fn body(model: &str) -> Bytes {
        Bytes::from(format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\0\x01binary\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--XyZ\r\nContent-Disposition: form-data; name=\"stream\"\r\n\r\ntrue\r\n--XyZ--\r\n"
        ))
    }

    fn part(disposition: &str, value: &str) -> String {
        format!("--AAA\r\nContent-Disposition: form-data; {disposition}\r\n\r\n{value}\r\n")
    }

    fn file() -> String {
        "--AAA\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFFdata\r\n".into()
    }

    async fn refused(content_type: &str, body: String) -> ApiError {
        match Form::parse(Some(content_type), Bytes::from(body)).await {
            Ok(form) => panic!("accepted, model {:?}", form.model),
            Err(e) => e,
        }
    }

    #[tokio::test]
    async fn sends_the_form_it_read_in_a_canonical_shape_under_its_own_boundary() {
        let form = Form::parse(Some(TYPE), body(" whisper-1 \t"))
            .await
            .unwrap();
        assert_eq!((form.model.as_str(), form.stream), ("whisper-1", true));
        let content_type = form.content_type();
        let content_type = content_type.to_str().unwrap();
        assert!(content_type.starts_with("multipart/form-data; boundary=runestone-"));
        assert!(!content_type.contains("XyZ"));
        for provider_model in ["whisper-1", "my-deployment"] {
            let sent = form.body_for(provider_model);
            let text = String::from_utf8_lossy(&sent);
            assert!(!text.contains("XyZ"), "{text}");
            let boundary = &form.boundary;
            let expected = format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\0\x01binary\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{provider_model}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"stream\"\r\n\r\ntrue\r\n--{boundary}--\r\n"
            );
            assert_eq!(text, expected);
            let again = Form::parse(Some(content_type), sent).await.unwrap();
            assert_eq!(again.model, provider_model);
        }
    }

    #[tokio::test]
    async fn drops_other_disposition_parameters_and_part_headers_and_escapes_filenames() {
        let body = format!(
            "{}--AAA\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\\y.wav\"; size=3\r\nContent-Type: audio/wav\r\nContent-Transfer-Encoding: base64\r\n\r\nabc\r\n--AAA--\r\n",
            part("name=\"model\"", "whisper-1")
        );
        let form = Form::parse(Some("multipart/form-data; boundary=AAA"), Bytes::from(body))
            .await
            .unwrap();
        let sent = String::from_utf8_lossy(&form.body_for("whisper-1")).into_owned();
        assert!(
            sent.contains("Content-Disposition: form-data; name=\"file\"; filename=\"x%5Cy.wav\"\r\nContent-Type: audio/wav\r\n\r\nabc\r\n"),
            "{sent}"
        );
        assert!(
            !sent.contains("size=") && !sent.contains("Transfer"),
            "{sent}"
        );
    }

    #[tokio::test]
    async fn refuses_forms_a_provider_could_read_another_way() {
        let plain = "multipart/form-data; boundary=AAA";
        let cases = [
            // Content types naming the boundary twice, or oddly.
            ("multipart/form-data; boundary=AAA; boundary=BBB", format!("{}{}--AAA--\r\n", part("name=\"model\"", "whisper-1"), file())),
            ("multipart/form-data; BOUNDARY=BBB; boundary=AAA", format!("{}--AAA--\r\n", part("name=\"model\"", "whisper-1"))),
            ("multipart/form-data; Boundary=AAA", format!("{}--AAA--\r\n", part("name=\"model\"", "whisper-1"))),
            ("multipart/form-data; boundary=\"AAA \"", format!("{}--AAA--\r\n", part("name=\"model\"", "whisper-1"))),
            ("multipart/form-data; boundary=AAA junk", format!("{}--AAA--\r\n", part("name=\"model\"", "whisper-1"))),
            // Parts naming themselves twice, or in ways parsers read apart.
            (plain, format!("{}{}{}--AAA--\r\n", part("name=\"model\"", "whisper-1"), part("name=\"file\"; name=\"model\"", "gpt-4o-transcribe"), file())),
            (plain, format!("{}{}--AAA--\r\n", part("name=\"file\"; NAME=\"model\"", "x"), file())),
            (plain, format!("{}{}{}--AAA--\r\n", part("name=\"model\"", "whisper-1"), part("NAME=\"model\"", "gpt-4o-transcribe"), file())),
            (plain, format!("{}{}{}--AAA--\r\n", part("name=\"model\"", "whisper-1"), part("name*=UTF-8''model", "gpt-4o-transcribe"), file())),
            (plain, format!("{}{}{}--AAA--\r\n", part("name=\"model\"", "whisper-1"), part("name=\"Model\"", "gpt-4o-transcribe"), file())),
            (plain, format!("{}{}{}--AAA--\r\n", part("name=\"model\"", "whisper-1"), part("name=\"model \"", "gpt-4o-transcribe"), file())),
            (plain, format!("{}{}{}--AAA--\r\n", part("name=\"model\"", "whisper-1"), part("name=\"mo\\\"del\"", "gpt-4o-transcribe"), file())),
            (plain, format!("{}{}{}--AAA--\r\n", part("name=\"model\"", "whisper-1"), part("name=\"model\"; filename=\"m.txt\"", "gpt-4o-transcribe"), file())),
            (plain, format!("{}--AAA\r\nContent-Disposition: form-data; name=\"file\"\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-transcribe\r\n{}--AAA--\r\n", part("name=\"model\"", "whisper-1"), file())),
            (plain, format!("{}{}{}--AAA--\r\n", part("name=\"model\"", "whisper-1"), part("name=\"n\"", "1"), part("name=\"n\"", "9"))),
            // Something before the first boundary.
            (plain, format!("preamble\r\n{}{}--AAA--\r\n", part("name=\"model\"", "whisper-1"), file())),
            (plain, format!("\r\n{}{}--AAA--\r\n", part("name=\"model\"", "whisper-1"), file())),
            // Two headers of a kind (multer keeps the last, others the first).
            (plain, format!("{}--AAA\r\nContent-Disposition: form-data; name=\"model\"\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\ngpt-4o-transcribe\r\n{}--AAA--\r\n", part("name=\"model\"", "whisper-1"), file())),
            (plain, format!("{}--AAA\r\nContent-Disposition: form-data; name=\"file\"\r\n content-disposition: form-data; name=\"model\"\r\n\r\nx\r\n--AAA--\r\n", part("name=\"model\"", "whisper-1"))),
            // Padding after a delimiter; parts after the closing one.
            (plain, format!("{}--AAA \r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nx\r\n--AAA--\r\n", part("name=\"model\"", "whisper-1"))),
            (plain, format!("{}{}--AAA--\r\n{}--AAA--\r\n", part("name=\"model\"", "whisper-1"), file(), part("name=\"model\"", "gpt-4o-transcribe"))),
        ];
        for (content_type, body) in cases {
            let e = refused(content_type, body.clone()).await;
            assert_eq!(e.status, 400, "{content_type} {body}");
        }
    }

    #[tokio::test]
    async fn refuses_what_is_not_a_form_or_names_no_model() {
        let e = Form::parse(Some("application/json"), Bytes::from_static(b"{}"))
            .await
            .err()
            .unwrap();
        assert_eq!(e.status, 400);
        let e = Form::parse(None, body("x")).await.err().unwrap();
        assert_eq!(e.status, 400);
        let no_model = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc\r\n--XyZ--\r\n",
        );
        let e = Form::parse(Some(TYPE), no_model).await.err().unwrap();
        assert_eq!(e.code, "missing_model");
        let twice = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nbig\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nsmall\r\n--XyZ--\r\n",
        );
        let e = Form::parse(Some(TYPE), twice).await.err().unwrap();
        assert_eq!((e.status, e.param.as_deref()), (400, Some("model")));
        let truncated = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nabc",
        );
        assert_eq!(
            Form::parse(Some(TYPE), truncated)
                .await
                .err()
                .unwrap()
                .status,
            400
        );
    }
}
