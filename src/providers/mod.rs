//! Provider adapters: everything that differs between provider kinds, one
//! file per kind behind the [`Adapter`] trait, chosen in one place
//! ([`adapter`]). The URL path of each endpoint, the header carrying the
//! key, fixed headers (API versions), which endpoints a kind serves, and
//! the translation of requests, answers and streams when the kind does not
//! speak OpenAI's format. Adding a kind touches its own file, the `match`
//! below and the config's `kind` names.

pub mod anthropic;
mod azure;
mod openai;

use crate::config::ProviderKind;
use crate::cost::{Estimate, Usage};
use crate::openai::{ApiError, Endpoint};
use bytes::Bytes;
use http::{HeaderName, HeaderValue};

/// What one provider kind needs of the gateway's forwarding.
pub trait Adapter: Sync {
    /// The request path for `endpoint` under the provider's base path
    /// (`provider_model` for kinds that put it in the URL).
    fn path(
        &self,
        base_path: &str,
        endpoint: Endpoint,
        provider_model: &str,
        api_version: Option<&str>,
    ) -> String;

    /// The header that carries the provider's key.
    fn credential_header(&self) -> HeaderName;

    /// The credential header's value for `key`.
    fn credential_value(&self, key: &str) -> String {
        key.to_string()
    }

    /// Headers every request to this kind carries (an API version).
    fn fixed_headers(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }

    /// Whether this kind serves `endpoint` (a target that does not is
    /// skipped for it).
    fn serves(&self, _endpoint: Endpoint) -> bool {
        true
    }

    /// The body to send, from the OpenAI-shaped body (already carrying the
    /// provider's model name).
    fn request_body(&self, body: Bytes, _provider_model: &str) -> Result<Bytes, ApiError> {
        Ok(body)
    }

    /// Whether answers come in the provider's own format and are translated
    /// (JSON read whole through [`Adapter::translate_answer`], streams
    /// through [`Adapter::stream_translator`]); else they pass through.
    fn translates_answers(&self) -> bool {
        false
    }

    /// The token limit sent for a request that sets none (the provider
    /// requires one), so a count of its answer is capped where the
    /// provider stopped.
    fn default_max_tokens(&self) -> Option<u64> {
        None
    }

    /// A whole successful answer as an OpenAI JSON answer, answering as
    /// `public_model`, with its usage: the provider's report, or the
    /// gateway's count by `estimate` as `model`'s encoding counts (which
    /// should be loaded) when it reported none to bill by. Only called when
    /// [`Adapter::translates_answers`].
    fn translate_answer(
        &self,
        body: &[u8],
        public_model: &str,
        estimate: &Estimate,
        model: &str,
    ) -> Result<(Vec<u8>, Usage), ApiError> {
        let _ = (body, public_model, estimate, model);
        Err(ApiError::internal(
            "answer translation asked of a pass-through provider",
        ))
    }

    /// An error answer (status `status`) as the OpenAI error of the same
    /// class. Only called when [`Adapter::translates_answers`].
    fn translate_error(&self, status: u16, body: &[u8]) -> ApiError {
        let _ = body;
        ApiError::internal(format!(
            "error translation asked of a pass-through provider (status {status})"
        ))
    }

    /// A translator for a streamed answer. Only called when
    /// [`Adapter::translates_answers`].
    fn stream_translator(
        &self,
        public_model: &str,
        include_usage: bool,
    ) -> anthropic::StreamTranslator {
        anthropic::StreamTranslator::new(public_model, include_usage)
    }
}

/// The adapter for a provider kind: the one place kinds are told apart.
pub fn adapter(kind: ProviderKind) -> &'static dyn Adapter {
    match kind {
        ProviderKind::OpenAi => &openai::OpenAi,
        ProviderKind::Azure => &azure::Azure,
        ProviderKind::Anthropic => &anthropic::Anthropic,
    }
}

/// The credential header for `key` on a provider of `kind`, marked
/// sensitive (never logged by the HTTP stack).
pub fn credential(
    kind: ProviderKind,
    key: &str,
) -> Result<(HeaderName, HeaderValue), http::header::InvalidHeaderValue> {
    let adapter = adapter(kind);
    let mut value = HeaderValue::try_from(adapter.credential_value(key))?;
    value.set_sensitive(true);
    Ok((adapter.credential_header(), value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_says_where_and_how_it_is_called() {
        let openai = adapter(ProviderKind::OpenAi);
        assert_eq!(
            openai.path("/v1", Endpoint::Embeddings, "m", None),
            "/v1/embeddings"
        );
        assert_eq!(
            credential(ProviderKind::OpenAi, "sk-1").unwrap().1,
            "Bearer sk-1"
        );
        assert!(openai.serves(Endpoint::Completions) && !openai.translates_answers());

        let azure = adapter(ProviderKind::Azure);
        assert_eq!(
            azure.path(
                "",
                Endpoint::ChatCompletions,
                "my deployment",
                Some("2024-10-21")
            ),
            "/openai/deployments/my+deployment/chat/completions?api-version=2024-10-21"
        );
        let (name, value) = credential(ProviderKind::Azure, "k").unwrap();
        assert_eq!((name.as_str(), value.to_str().unwrap()), ("api-key", "k"));
        assert!(value.is_sensitive());

        let anthropic = adapter(ProviderKind::Anthropic);
        assert_eq!(
            anthropic.path("", Endpoint::ChatCompletions, "c", None),
            "/v1/messages"
        );
        assert_eq!(
            credential(ProviderKind::Anthropic, "k").unwrap().0,
            "x-api-key"
        );
        assert_eq!(
            anthropic.fixed_headers(),
            [("anthropic-version", anthropic::API_VERSION)]
        );
        assert!(
            !anthropic.serves(Endpoint::Embeddings) && anthropic.serves(Endpoint::ChatCompletions)
        );
        assert!(anthropic.translates_answers());
        let body = anthropic
            .request_body(
                Bytes::from_static(br#"{"model":"c","messages":[{"role":"user","content":"hi"}]}"#),
                "c",
            )
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["max_tokens"], anthropic::DEFAULT_MAX_TOKENS);
    }
}
