//! The OpenAI wire format, as far as the gateway needs it.
//!
//! The gateway never deserialises a whole request: [`RequestFields::parse`]
//! borrows the handful of fields routing and accounting need, and
//! [`rewrite_body`] splices the provider's model name into the original bytes
//! instead of re-serialising them. [`ApiError`] is the one error type clients
//! see; it renders the `{"error": {...}}` body the official SDKs map to their
//! exception classes.

mod error;
mod request;
mod rewrite;
#[cfg(test)]
mod tests;

pub use error::{is_context_length_error, is_openai_error, ApiError, Reason};
pub use request::{RequestFields, StreamOptions, MAX_JSON_DEPTH};
pub use rewrite::{rewrite_body, without_streaming};

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
}

impl Endpoint {
    /// The endpoint of a [`Endpoint::name`] (as async jobs store it).
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Endpoint::ChatCompletions,
            Endpoint::Completions,
            Endpoint::Embeddings,
            Endpoint::Responses,
        ]
        .into_iter()
        .find(|e| e.name() == name)
    }

    /// The endpoint for a gateway path, if it is one the gateway proxies.
    pub fn from_path(path: &str) -> Option<Self> {
        match path {
            "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
            "/v1/completions" => Some(Endpoint::Completions),
            "/v1/embeddings" => Some(Endpoint::Embeddings),
            "/v1/responses" => Some(Endpoint::Responses),
            _ => None,
        }
    }

    /// The path relative to a provider's OpenAI base URL (`.../v1`).
    pub fn provider_suffix(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
            Endpoint::Responses => "/responses",
        }
    }

    /// A short label for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
        }
    }
}
