//! Multipart uploads (`/v1/images/edits`, `/variations`,
//! `/v1/audio/transcriptions`, `/translations`): the form is parsed (with
//! `multer`) for its `model`, `stream` and `n` fields, and sent upstream
//! with the provider's model name in place of the public one, every other
//! part (the file) byte for byte under its own headers.

use super::ApiError;
use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderMap;

/// One part of the form, as received.
struct Part {
    headers: HeaderMap,
    data: Bytes,
    is_model: bool,
}

/// A parsed multipart form.
pub struct Form {
    boundary: String,
    parts: Vec<Part>,
    /// The public model the form names.
    pub model: String,
    /// `stream=true` (streamed transcriptions).
    pub stream: bool,
    /// Images asked for (`n`).
    pub n: Option<u64>,
}

impl Form {
    /// Parses `body` as the multipart form `content_type` announces.
    pub async fn parse(content_type: Option<&str>, body: Bytes) -> Result<Form, ApiError> {
        let not_form = || {
            ApiError::bad_request(
                "This endpoint takes a multipart/form-data body (the file and its fields).",
            )
        };
        let content_type = content_type.ok_or_else(not_form)?;
        if !content_type
            .trim_start()
            .to_ascii_lowercase()
            .starts_with("multipart/form-data")
        {
            return Err(not_form());
        }
        let boundary = multer::parse_boundary(content_type).map_err(|_| not_form())?;
        let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
        let mut multipart = multer::Multipart::new(stream, boundary.clone());
        let malformed = |e: multer::Error| {
            ApiError::bad_request(format!("The multipart form could not be read: {e}"))
        };
        let mut form = Form {
            boundary,
            parts: Vec::new(),
            model: String::new(),
            stream: false,
            n: None,
        };
        let mut model = None;
        while let Some(field) = multipart.next_field().await.map_err(malformed)? {
            let name = field.name().map(str::to_owned);
            let headers = field.headers().clone();
            let data = field.bytes().await.map_err(malformed)?;
            let text = || String::from_utf8_lossy(&data).trim().to_owned();
            match name.as_deref() {
                // Which of two the provider would read is its own
                // business: a form naming two models is refused.
                Some("model") if model.is_some() => {
                    return Err(ApiError::invalid_field("model", "given more than once"))
                }
                Some("model") => model = Some(text()),
                Some("stream") => form.stream = text().eq_ignore_ascii_case("true"),
                Some("n") => {
                    form.n = Some(
                        text()
                            .parse()
                            .map_err(|_| ApiError::invalid_field("n", "expected an integer"))?,
                    )
                }
                _ => {}
            }
            form.parts.push(Part {
                is_model: name.as_deref() == Some("model"),
                headers,
                data,
            });
        }
        form.model = model
            .filter(|m| !m.is_empty())
            .ok_or_else(ApiError::missing_model)?;
        Ok(form)
    }

    /// The form to send for `provider_model`: `original` when the names
    /// agree, else the parts again with the model's replaced.
    pub fn body_for(&self, original: &Bytes, provider_model: &str) -> Bytes {
        if provider_model == self.model {
            return original.clone();
        }
        let size = original.len() + provider_model.len();
        let mut out = BytesMut::with_capacity(size);
        for part in &self.parts {
            out.put_slice(b"--");
            out.put_slice(self.boundary.as_bytes());
            out.put_slice(b"\r\n");
            for (name, value) in &part.headers {
                out.put_slice(name.as_str().as_bytes());
                out.put_slice(b": ");
                out.put_slice(value.as_bytes());
                out.put_slice(b"\r\n");
            }
            out.put_slice(b"\r\n");
            if part.is_model {
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

#[cfg(test)]
mod tests {
    use super::*;

    const TYPE: &str = "multipart/form-data; boundary=XyZ";

    fn body(model: &str) -> Bytes {
        Bytes::from(format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\0\x01binary\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--XyZ\r\nContent-Disposition: form-data; name=\"stream\"\r\n\r\ntrue\r\n--XyZ--\r\n"
        ))
    }

    #[tokio::test]
    async fn reads_the_model_and_swaps_it_keeping_every_other_byte() {
        let original = body("whisper-1");
        let form = Form::parse(Some(TYPE), original.clone()).await.unwrap();
        assert_eq!((form.model.as_str(), form.stream), ("whisper-1", true));
        assert_eq!(form.body_for(&original, "whisper-1"), original);
        let sent = form.body_for(&original, "my-deployment");
        let again = Form::parse(Some(TYPE), sent.clone()).await.unwrap();
        assert_eq!(again.model, "my-deployment");
        assert_eq!(again.parts[0].data, Bytes::from_static(b"RIFF\0\x01binary"));
        assert_eq!(again.parts[0].headers["content-type"], "audio/wav");
        let text = String::from_utf8_lossy(&sent);
        assert!(text.contains("filename=\"a.wav\""), "{text}");
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
