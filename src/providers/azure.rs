//! Azure OpenAI: the deployment (the target's model name) and the API
//! version are in the URL, the key in `api-key`; answers are OpenAI's.

use super::Adapter;
use crate::openai::Endpoint;
use http::HeaderName;

/// The Azure OpenAI adapter.
pub(super) struct Azure;

impl Adapter for Azure {
    fn path(
        &self,
        base_path: &str,
        endpoint: Endpoint,
        deployment: &str,
        api_version: Option<&str>,
    ) -> String {
        // The version is checked at config load to be URL-safe.
        if endpoint == Endpoint::Responses {
            // The deployment is the body's model.
            return format!(
                "{base_path}/openai/responses?api-version={}",
                api_version.unwrap_or_default()
            );
        }
        format!(
            "{base_path}/openai/deployments/{}{}?api-version={}",
            url::form_urlencoded::byte_serialize(deployment.as_bytes()).collect::<String>(),
            endpoint.provider_suffix(),
            api_version.unwrap_or_default()
        )
    }

    fn credential_header(&self) -> HeaderName {
        HeaderName::from_static("api-key")
    }
}
