//! OpenAI chat completions <-> the Anthropic Messages API.
//!
//! Clients keep speaking OpenAI; these functions translate the request
//! ([`to_messages_request`]), a JSON answer ([`to_chat_completion`]), an SSE
//! stream event by event ([`StreamTranslator`], which never buffers more than
//! a partial line), and errors ([`to_openai_error`]). All are pure: the
//! gateway glue decides when to call them.
//!
//! Mapping, in short: `system`/`developer` messages become the top-level
//! `system`; `tool` messages become `tool_result` blocks of a user turn;
//! assistant `tool_calls` become `tool_use` blocks; consecutive turns of one
//! role merge (Anthropic requires alternation); image parts become `image`
//! blocks (base64 for data URLs, `url` otherwise); `tools`, `tool_choice`,
//! `stop`, `temperature`, `top_p` and `stream` carry over; `max_tokens` (or
//! `max_completion_tokens`) is required by Anthropic and defaults to
//! [`DEFAULT_MAX_TOKENS`]. Every other chat completions field is in
//! [`FIELDS`] (the README's table): translated, or refused with a 400 naming
//! it; a JSON `response_format` becomes a forced tool ([`STRUCTURED_TOOL`])
//! whose input the translators turn back into the answer's content.

mod answer;
mod request;
mod stream;
#[cfg(test)]
mod tests;

pub use answer::{to_chat_completion, to_openai_error, usage_json};
pub use request::{to_messages_request, FIELDS, STRUCTURED_TOOL};
pub use stream::StreamTranslator;

use crate::cost::{Estimate, Usage};
use crate::openai::{ApiError, Endpoint};
use bytes::Bytes;
use http::HeaderName;

/// `max_tokens` sent when the client gives none (Anthropic requires one).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// The `anthropic-version` header value the translation follows.
pub const API_VERSION: &str = "2023-06-01";

pub(super) fn invalid(param: &str, detail: &str) -> ApiError {
    ApiError::invalid_field(param, detail)
}

/// The Anthropic adapter: `/v1/messages` under the base URL (as the
/// Anthropic SDK does), the key in `x-api-key`, the API version header,
/// chat completions only, everything translated.
pub(super) struct Anthropic;

impl super::Adapter for Anthropic {
    fn path(&self, base_path: &str, _: Endpoint, _: &str, _: Option<&str>) -> String {
        format!("{base_path}/v1/messages")
    }

    fn credential_header(&self) -> HeaderName {
        HeaderName::from_static("x-api-key")
    }

    fn fixed_headers(&self) -> &'static [(&'static str, &'static str)] {
        &[("anthropic-version", API_VERSION)]
    }

    fn serves(&self, endpoint: Endpoint) -> bool {
        endpoint == Endpoint::ChatCompletions
    }

    fn request_body(&self, body: Bytes, provider_model: &str) -> Result<Bytes, ApiError> {
        to_messages_request(&body, provider_model).map(Bytes::from)
    }

    fn translates_answers(&self) -> bool {
        true
    }

    fn default_max_tokens(&self) -> Option<u64> {
        Some(DEFAULT_MAX_TOKENS)
    }

    fn translate_answer(
        &self,
        body: &[u8],
        public_model: &str,
        estimate: &Estimate,
        model: &str,
    ) -> Result<(Vec<u8>, Usage), ApiError> {
        to_chat_completion(body, public_model, estimate, model)
    }

    fn translate_error(&self, status: u16, body: &[u8]) -> ApiError {
        to_openai_error(status, body)
    }
}
