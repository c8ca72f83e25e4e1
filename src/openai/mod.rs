//! The OpenAI wire format, as far as the gateway needs it.
//!
//! The gateway never deserialises a whole request: [`RequestFields::parse`]
//! borrows the handful of fields routing and accounting need, and
//! [`rewrite_body`] splices the provider's model name into the original bytes
//! instead of re-serialising them. [`ApiError`] is the one error type clients
//! see; it renders the `{"error": {...}}` body the official SDKs map to their
//! exception classes.

mod error;
mod form;
mod request;
mod rewrite;
#[cfg(test)]
mod tests;

pub use error::{
    error_in_json_answer, error_said, error_says, error_status, is_context_length_error,
    is_openai_error, kept_event_is_error, ApiError, Reason,
};
pub use form::Form;
pub use request::{RequestFields, StreamOptions, MAX_JSON_DEPTH};
pub use rewrite::{rewrite_body, with_model, without_streaming};

/// The OpenAI endpoints the gateway proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/embeddings`
    Embeddings,
    /// `POST /v1/responses`
    Responses,
    /// `POST /v1/moderations`
    Moderations,
    /// `POST /v1/images/generations`
    ImageGenerations,
    /// `POST /v1/images/edits` (multipart)
    ImageEdits,
    /// `POST /v1/images/variations` (multipart)
    ImageVariations,
    /// `POST /v1/audio/speech` (a binary answer)
    Speech,
    /// `POST /v1/audio/transcriptions` (multipart)
    Transcriptions,
    /// `POST /v1/audio/translations` (multipart)
    Translations,
}

/// Each endpoint: its path under `/v1` (and a provider's base URL), and
/// its label for logs, metrics and stored jobs.
const ENDPOINTS: [(Endpoint, &str, &str); 11] = [
    (Endpoint::ChatCompletions, "/chat/completions", "chat"),
    (Endpoint::Completions, "/completions", "completions"),
    (Endpoint::Embeddings, "/embeddings", "embeddings"),
    (Endpoint::Responses, "/responses", "responses"),
    (Endpoint::Moderations, "/moderations", "moderations"),
    (
        Endpoint::ImageGenerations,
        "/images/generations",
        "image_generations",
    ),
    (Endpoint::ImageEdits, "/images/edits", "image_edits"),
    (
        Endpoint::ImageVariations,
        "/images/variations",
        "image_variations",
    ),
    (Endpoint::Speech, "/audio/speech", "speech"),
    (
        Endpoint::Transcriptions,
        "/audio/transcriptions",
        "transcriptions",
    ),
    (
        Endpoint::Translations,
        "/audio/translations",
        "translations",
    ),
];

impl Endpoint {
    fn entry(self) -> &'static (Endpoint, &'static str, &'static str) {
        ENDPOINTS
            .iter()
            .find(|(e, ..)| *e == self)
            .expect("every endpoint is in the table")
    }

    /// The endpoint of a [`Endpoint::name`] (as async jobs store it).
    pub fn from_name(name: &str) -> Option<Self> {
        ENDPOINTS.iter().find(|e| e.2 == name).map(|e| e.0)
    }

    /// The endpoint for a gateway path, if it is one the gateway proxies.
    pub fn from_path(path: &str) -> Option<Self> {
        let suffix = path.strip_prefix("/v1")?;
        ENDPOINTS.iter().find(|e| e.1 == suffix).map(|e| e.0)
    }

    /// The path relative to a provider's OpenAI base URL (`.../v1`).
    pub fn provider_suffix(self) -> &'static str {
        self.entry().1
    }

    /// A short label for logs and metrics.
    pub fn name(self) -> &'static str {
        self.entry().2
    }

    /// Whether the body is a multipart form (a file upload) rather than
    /// JSON.
    pub fn is_form(self) -> bool {
        matches!(
            self,
            Endpoint::ImageEdits
                | Endpoint::ImageVariations
                | Endpoint::Transcriptions
                | Endpoint::Translations
        )
    }

    /// Whether a whole answer is always a JSON object (a stream aside):
    /// not speech's audio, nor a transcription's text, SRT or VTT.
    pub fn answers_json(self) -> bool {
        !matches!(
            self,
            Endpoint::Speech | Endpoint::Transcriptions | Endpoint::Translations
        )
    }

    /// Whether asking for a stream (`stream: true`) gets one: chat,
    /// completions and the Responses API always answer it with events
    /// (speech, transcriptions and images may answer whole: whisper-1
    /// ignores `stream`).
    pub fn streams_when_asked(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Responses
        )
    }

    /// Whether the answer is text the gateway counts tokens of when the
    /// provider reports none (else only reported tokens, and the request's
    /// or answer's images, characters and seconds, are billed).
    pub fn counts_tokens(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions
                | Endpoint::Completions
                | Endpoint::Embeddings
                | Endpoint::Responses
        )
    }

    /// Whether the answer is generated (tokens reserved for it at admission).
    pub fn generates(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Responses
        )
    }
}
