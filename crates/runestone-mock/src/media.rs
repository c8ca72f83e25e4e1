//! Moderations, images and audio, as much as the gateway's tests need:
//! `POST /v1/moderations`, `/v1/images/generations` (JSON),
//! `/v1/images/edits` and `/variations` (multipart), `/v1/audio/speech`
//! (a binary answer, or SSE with `stream_format: "sse"`),
//! `/v1/audio/transcriptions` and `/translations` (multipart; JSON, text,
//! verbose JSON or SSE), also under Azure's `/openai/deployments/{name}/`.
//!
//! Deterministic: an image is `mock-image-<id>-<i>`; speech is 64 bytes per
//! character; audio lasts one second per 16,000 bytes uploaded; models whose
//! name starts with `gpt-` report token usage like OpenAI's newer models.

use crate::*;

/// Bytes of uploaded audio per second.
pub(crate) const AUDIO_BYTES_PER_SECOND: usize = 16_000;
/// Bytes of speech per character.
pub(crate) const SPEECH_BYTES_PER_CHAR: usize = 64;
/// Output tokens a `gpt-image` model reports per image.
pub(crate) const IMAGE_TOKENS: u64 = 272;

/// Which media endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MediaKind {
    Moderations,
    ImageGenerations,
    ImageEdits,
    ImageVariations,
    Speech,
    Transcriptions,
    Translations,
}

impl MediaKind {
    /// The endpoint a path (after `/v1` or an Azure deployment) names.
    fn from_suffix(suffix: &str) -> Option<Self> {
        Some(match suffix {
            "moderations" => MediaKind::Moderations,
            "images/generations" => MediaKind::ImageGenerations,
            "images/edits" => MediaKind::ImageEdits,
            "images/variations" => MediaKind::ImageVariations,
            "audio/speech" => MediaKind::Speech,
            "audio/transcriptions" => MediaKind::Transcriptions,
            "audio/translations" => MediaKind::Translations,
            _ => return None,
        })
    }

    fn is_form(self) -> bool {
        matches!(
            self,
            MediaKind::ImageEdits
                | MediaKind::ImageVariations
                | MediaKind::Transcriptions
                | MediaKind::Translations
        )
    }
}

/// The media endpoint of a POST path, with the Azure deployment if any.
pub(crate) fn media_route(path: &str) -> Option<(MediaKind, Option<&str>)> {
    if let Some(suffix) = path.strip_prefix("/v1/") {
        return MediaKind::from_suffix(suffix).map(|k| (k, None));
    }
    let (deployment, suffix) = path.strip_prefix("/openai/deployments/")?.split_once('/')?;
    MediaKind::from_suffix(suffix).map(|k| (k, Some(deployment)))
}

/// A media request, parsed.
#[derive(Debug, Clone)]
pub(crate) struct MediaCall {
    pub(crate) kind: MediaKind,
    pub(crate) model: Option<String>,
    n: u64,
    /// Moderation or speech input.
    input: Value,
    prompt: String,
    file_bytes: usize,
    response_format: Option<String>,
    stream: bool,
    stream_format: Option<String>,
}

#[derive(Deserialize, Default)]
struct JsonBody {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    n: Option<u64>,
    #[serde(default)]
    input: Value,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    response_format: Option<String>,
    #[serde(default)]
    stream_format: Option<String>,
    #[serde(default)]
    voice: Option<String>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError {
        status: 400,
        message: message.into(),
        kind: "invalid_request_error",
        code: None,
    }
}

/// Parses a media request: JSON, or the multipart form `content_type`
/// announces. `Err` carries the model named, if any.
pub(crate) async fn parse_media(
    kind: MediaKind,
    deployment: Option<&str>,
    content_type: Option<&str>,
    body: Bytes,
) -> Result<MediaCall, (ApiError, Option<String>)> {
    let mut call = MediaCall {
        kind,
        model: deployment.map(str::to_owned),
        n: 1,
        input: Value::Null,
        prompt: String::new(),
        file_bytes: 0,
        response_format: None,
        stream: false,
        stream_format: None,
    };
    if !kind.is_form() {
        let b: JsonBody =
            serde_json::from_slice(&body).map_err(|e| (ApiError::from_json(&e), None))?;
        call.model = call.model.or(b.model);
        call.n = b.n.unwrap_or(1);
        call.input = b.input;
        call.prompt = b.prompt.unwrap_or_default();
        call.response_format = b.response_format;
        call.stream_format = b.stream_format;
        if kind == MediaKind::Speech && (b.voice.is_none() || !call.input.is_string()) {
            return Err((
                invalid("Speech needs `input` text and a `voice`."),
                call.model,
            ));
        }
        if kind == MediaKind::Moderations && call.input.is_null() {
            return Err((invalid("Moderations need an `input`."), call.model));
        }
        return Ok(call);
    }
    let boundary = content_type
        .and_then(|t| multer::parse_boundary(t).ok())
        .ok_or_else(|| (invalid("Expected a multipart/form-data body."), None))?;
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut form = multer::Multipart::new(stream, boundary);
    let bad = |e: multer::Error| (invalid(format!("Bad multipart body: {e}")), None);
    let mut saw_file = false;
    while let Some(field) = form.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or_default().to_owned();
        let data = field.bytes().await.map_err(bad)?;
        let text = || String::from_utf8_lossy(&data).trim().to_owned();
        match name.as_str() {
            "model" if call.model.is_none() => call.model = Some(text()),
            "n" => call.n = text().parse().unwrap_or(1),
            "prompt" => call.prompt = text(),
            "response_format" => call.response_format = Some(text()),
            "stream" => call.stream = text() == "true",
            "file" | "image" | "image[]" => {
                saw_file = true;
                call.file_bytes += data.len();
            }
            _ => {}
        }
    }
    if call.model.is_none() {
        return Err((invalid("you must provide a model parameter"), None));
    }
    if !saw_file {
        return Err((
            invalid("A file upload (`file` or `image`) is required."),
            call.model,
        ));
    }
    Ok(call)
}

impl MediaCall {
    fn model(&self) -> &str {
        self.model.as_deref().unwrap_or(DEFAULT_MODEL)
    }

    /// Models named like OpenAI's newer ones report token usage.
    fn reports_tokens(&self) -> bool {
        self.model().starts_with("gpt-")
    }

    fn audio_seconds(&self) -> u64 {
        self.file_bytes.div_ceil(AUDIO_BYTES_PER_SECOND).max(1) as u64
    }

    /// The answer.
    pub(crate) fn answer(&self, id: u64, created: u64) -> Reply {
        let json = |v: Value| Reply::json(200, serde_json::to_vec(&v).unwrap_or_default());
        match self.kind {
            MediaKind::Moderations => {
                let inputs: Vec<String> = match &self.input {
                    Value::Array(items) => items.iter().map(|i| i.to_string()).collect(),
                    other => vec![other.to_string()],
                };
                let results: Vec<Value> = inputs
                    .iter()
                    .map(|text| {
                        let flagged = text.contains("flagme");
                        json!({"flagged": flagged,
                               "categories": {"harassment": false, "violence": flagged},
                               "category_scores": {"harassment": 0.001, "violence": if flagged { 0.97 } else { 0.002 }}})
                    })
                    .collect();
                json(
                    json!({"id": format!("modr-mock-{id}"), "model": self.model(), "results": results}),
                )
            }
            MediaKind::ImageGenerations | MediaKind::ImageEdits | MediaKind::ImageVariations => {
                let data: Vec<Value> = (0..self.n)
                    .map(|i| {
                        let image = format!("mock-image-{id}-{i}");
                        if self.response_format.as_deref() == Some("url") {
                            json!({"url": format!("https://images.mock.invalid/{image}.png")})
                        } else {
                            json!({"b64_json": base64_encode(image.as_bytes())})
                        }
                    })
                    .collect();
                let mut answer = json!({"created": created, "data": data});
                if self.reports_tokens() {
                    let text = bytes_to_tokens(self.prompt.len() as u64);
                    let image = (self.file_bytes / 1000) as u64;
                    let output = IMAGE_TOKENS * self.n;
                    answer["usage"] = json!({"input_tokens": text + image, "output_tokens": output,
                        "total_tokens": text + image + output,
                        "input_tokens_details": {"text_tokens": text, "image_tokens": image}});
                }
                json(answer)
            }
            MediaKind::Speech => {
                let text = self.input.as_str().unwrap_or_default();
                let audio: Vec<u8> = b"ID3"
                    .iter()
                    .copied()
                    .chain((0..).map(|i: usize| (i % 251) as u8))
                    .take((text.chars().count() * SPEECH_BYTES_PER_CHAR).max(3))
                    .collect();
                if self.stream_format.as_deref() == Some("sse") {
                    let mut events = String::new();
                    for chunk in audio.chunks(4096) {
                        let delta =
                            json!({"type": "speech.audio.delta", "audio": base64_encode(chunk)});
                        events.push_str(&format!("data: {delta}\n\n"));
                    }
                    let input = bytes_to_tokens(text.len() as u64);
                    let output = (audio.len() / 100) as u64;
                    let done = json!({"type": "speech.audio.done",
                        "usage": {"input_tokens": input, "output_tokens": output, "total_tokens": input + output}});
                    events.push_str(&format!("data: {done}\n\n"));
                    let mut r = Reply::json(200, events.into_bytes());
                    r.content_type = "text/event-stream".into();
                    return r;
                }
                let mut r = Reply::json(200, audio);
                r.content_type = match self.response_format.as_deref() {
                    Some("wav") => "audio/wav",
                    Some("opus") => "audio/opus",
                    _ => "audio/mpeg",
                }
                .into();
                r
            }
            MediaKind::Transcriptions | MediaKind::Translations => {
                let seconds = self.audio_seconds();
                let text = format!("mock transcript of {} bytes", self.file_bytes);
                let usage = if self.reports_tokens() {
                    let output = bytes_to_tokens(text.len() as u64);
                    json!({"type": "tokens", "input_tokens": seconds * 10, "output_tokens": output,
                           "total_tokens": seconds * 10 + output})
                } else {
                    json!({"type": "duration", "seconds": seconds})
                };
                if self.stream {
                    let mut events = String::new();
                    for word in text.split_inclusive(' ') {
                        let delta = json!({"type": "transcript.text.delta", "delta": word});
                        events.push_str(&format!("data: {delta}\n\n"));
                    }
                    let done =
                        json!({"type": "transcript.text.done", "text": text, "usage": usage});
                    events.push_str(&format!("data: {done}\n\n"));
                    let mut r = Reply::json(200, events.into_bytes());
                    r.content_type = "text/event-stream".into();
                    return r;
                }
                match self.response_format.as_deref() {
                    Some("text" | "srt" | "vtt") => {
                        let mut r = Reply::json(200, format!("{text}\n").into_bytes());
                        r.content_type = "text/plain; charset=utf-8".into();
                        r
                    }
                    Some("verbose_json") => {
                        let task = if self.kind == MediaKind::Translations {
                            "translate"
                        } else {
                            "transcribe"
                        };
                        json(
                            json!({"task": task, "language": "english", "duration": seconds as f64,
                                    "text": text, "segments": [], "usage": usage}),
                        )
                    }
                    _ => json(json!({"text": text, "usage": usage})),
                }
            }
        }
    }
}
