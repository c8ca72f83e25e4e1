//! OpenAI and any OpenAI-compatible server: the base URL plus the
//! endpoint's path, the key as a bearer token, answers passed through.

use super::Adapter;
use crate::openai::Endpoint;
use http::{header, HeaderName};

/// The OpenAI adapter.
pub(super) struct OpenAi;

impl Adapter for OpenAi {
    fn path(&self, base_path: &str, endpoint: Endpoint, _: &str, _: Option<&str>) -> String {
        // Joined, not `format!`: this runs for every request.
        [base_path, endpoint.provider_suffix()].concat()
    }

    fn credential_header(&self) -> HeaderName {
        header::AUTHORIZATION
    }

    fn credential_value(&self, key: &str) -> String {
        format!("Bearer {key}")
    }
}
