//! The Responses API's stored responses through the gateway: a follow-up
//! (`previous_response_id`) pinned to the provider holding its predecessor,
//! and `GET`/`DELETE /v1/responses/{id}`, `POST /v1/responses/{id}/cancel`
//! and `GET /v1/responses/{id}/input_items` forwarded to it, for the tenant
//! that created the response only ([`super::stored`]).

use super::forward::{Call, Exchange, Report};
use super::stored::{Holder, Lookup};
use super::{respond, Gateway, RequestCtx};
use crate::config::ModelRoute;
use crate::cost;
use crate::openai::{ApiError, Endpoint, RequestFields};
use bytes::Bytes;
use pingora::proxy::Session;

/// The longest response id the gateway looks up.
const MAX_ID_LEN: usize = 256;

/// Whether `id` can be a response id: ids are opaque, but never anything
/// that would change the provider's path.
fn plausible_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Gateway {
    /// Where `tenant`'s response `id` lives: its provider's index and the
    /// route to reach it by (`param` names the field that gave the id).
    pub(super) async fn response_holder(
        &self,
        tenant: usize,
        id: &str,
        param: Option<&str>,
    ) -> Result<(usize, usize), ApiError> {
        let not_found = || ApiError::response_not_found(id, param);
        if !plausible_id(id) {
            return Err(not_found());
        }
        let tenant_id = &self.config.tenants[tenant].id;
        let holder = match self.stored.find(tenant_id, id).await {
            Lookup::Found(holder) => holder,
            Lookup::Unknown => return Err(not_found()),
            Lookup::Unavailable => return Err(ApiError::response_store_unavailable()),
        };
        let Some(provider) = self
            .config
            .providers
            .iter()
            .position(|p| p.name == holder.provider)
        else {
            return Err(not_found());
        };
        let on_provider = |route: &ModelRoute| route.targets.iter().any(|t| t.provider == provider);
        let usable = |(_, route): &(usize, &ModelRoute)| {
            self.config.tenants[tenant].may_use(&route.name) && on_provider(route)
        };
        // The model that created it, else any the tenant may use there.
        let route = self
            .config
            .route(&holder.model)
            .filter(usable)
            .or_else(|| self.config.models.iter().enumerate().find(usable));
        match route {
            Some((route, _)) => Ok((provider, route)),
            None => Err(not_found()),
        }
    }

    /// For a Responses request that follows up `previous_response_id`: the
    /// provider holding it, the only one that may serve. 404 when it is not
    /// the tenant's; 400 when the model cannot reach that provider.
    pub(super) async fn follow_up_pin(
        &self,
        tenant: usize,
        route_index: usize,
        endpoint: Endpoint,
        fields: &RequestFields<'_>,
    ) -> Result<Option<usize>, ApiError> {
        let (Some(previous), Endpoint::Responses) = (&fields.previous_response_id, endpoint) else {
            return Ok(None);
        };
        let param = "previous_response_id";
        let (provider, _) = self.response_holder(tenant, previous, Some(param)).await?;
        let serves = |(_, route): &(usize, &ModelRoute)| {
            route.targets.iter().any(|t| t.provider == provider)
        };
        if !self
            .config
            .routes_for(tenant, route_index)
            .iter()
            .any(serves)
        {
            return Err(ApiError::invalid_field(
                param,
                format!(
                    "the previous response is held by the provider '{}', which the model '{}' does not use",
                    self.config.providers[provider].name, self.config.models[route_index].name
                ),
            ));
        }
        Ok(Some(provider))
    }

    /// Records the response the answer created (or read) as `tenant`'s.
    pub(super) async fn remember_response(&self, tenant: usize, report: &Report) {
        let (Some(id), Some(provider), Some(route)) =
            (&report.response_id, report.provider, report.route)
        else {
            return;
        };
        if !plausible_id(id) {
            return;
        }
        let holder = Holder {
            provider: self.config.providers[provider].name.clone(),
            model: self.config.models[route].name.clone(),
        };
        self.stored
            .record(&self.config.tenants[tenant].id, id, holder)
            .await;
    }

    /// `GET`/`DELETE /v1/responses/{id}`, `POST /v1/responses/{id}/cancel`,
    /// `GET /v1/responses/{id}/input_items`: `rest` is the path after
    /// `/v1/responses/`. Admitted as a request (no tokens); what it returns
    /// was billed when the response was created. OpenAI's
    /// `/v1/responses/input_tokens` and `/v1/responses/compact` are not
    /// served (404).
    pub(super) async fn response_operation(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        rest: &str,
    ) -> Result<(), ApiError> {
        let method = session.req_header().method.clone();
        let path = format!("/v1/responses/{rest}");
        // `{id}/` (a trailing slash) is no operation: not found, never
        // forwarded as the response itself.
        let (id, operation) = match rest.split_once('/') {
            Some((id, operation)) => (id, Some(operation)),
            None => (rest, None),
        };
        // OpenAI's own paths beside `{id}` (its ids start `resp_`) are not
        // read as ids: a 405 naming `GET, DELETE` would mislead.
        let unserved = match (id, operation) {
            ("input_tokens", None) => Some("counting a response's input tokens"),
            ("compact", None) => Some("compacting a conversation"),
            _ => None,
        };
        if let Some(what) = unserved {
            return Err(ApiError::not_served(method.as_str(), &path, what));
        }
        // Each operation's methods, as its `Allow` names them.
        let allow = match operation {
            None => "GET, DELETE",
            Some("cancel") => "POST",
            Some("input_items") => "GET",
            _ => return Err(ApiError::unknown_url(method.as_str(), &path)),
        };
        if !allow.split(", ").any(|m| m == method.as_str()) {
            return Err(ApiError::method_not_allowed(method.as_str(), &path, allow));
        }
        let tenant = self.authenticate(session, ctx)?;
        // A body (cancel's is empty) is read and dropped: nothing in it is
        // passed on.
        respond::read_body(session, self.config.server.max_request_body_bytes).await?;
        let (provider, route_index) = self.response_holder(tenant, id, None).await?;
        ctx.exchange.route = Some(route_index);
        let Some(grant) = self.admit(session, ctx, tenant, route_index, 0).await? else {
            return Ok(());
        };
        let rate_limits = grant.state;
        ctx.grant = Some(grant);
        let tail = format!("/{rest}");
        let query = session.req_header().uri.query().map(str::to_owned);
        let estimate = cost::Estimate::new(Bytes::new(), None);
        let RequestCtx {
            request_id,
            exchange: report,
            grant,
            cost_pusd,
            tenant: tenant_index,
            started,
            trace,
            ..
        } = ctx;
        let exchange = Exchange {
            endpoint: Endpoint::Responses,
            call: Call {
                method: method.clone(),
                tail: &tail,
                query: query.as_deref(),
                ..Call::post_json()
            },
            pin: Some(provider),
            bills: false,
            routes: vec![(route_index, &self.config.models[route_index])],
            context_routes: Vec::new(),
            stream: false,
            resumable: false,
            body_for: &|_| Bytes::new(),
            request_id,
            strip_usage: false,
            estimate: &estimate,
            rate_limits,
            trace: trace.as_deref().map(|t| &t.context),
        };
        let mut settler = super::accounting::Settler {
            gateway: self,
            tenant: *tenant_index,
            grant,
            cost_pusd,
            started: *started,
        };
        let result = self
            .forwarder
            .forward(session, &exchange, report, &mut settler)
            .await
            .map_err(|e| super::admission::admitted_error(e, &exchange.rate_limits));
        let deleted = method == http::Method::DELETE
            && operation.is_none()
            && session
                .response_written()
                .is_some_and(|h| h.status.is_success());
        if deleted {
            self.stored
                .forget(&self.config.tenants[tenant].id, id)
                .await;
        }
        result
    }
}
