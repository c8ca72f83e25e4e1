//! Dispatch by method and path, the locally answered endpoints, and the
//! proxied ones: read the body, route it, admit it, forward it.

use super::forward::{Call, Exchange};
use super::{respond, Gateway, RequestCtx};
use crate::admin;
use crate::cost;
use crate::openai::{rewrite_body, ApiError, Endpoint, Form, RequestFields};
use bytes::Bytes;
use pingora::proxy::Session;
use tracing::debug;

impl Gateway {
    /// Answers one request: locally, by forwarding it, or with an error.
    pub(super) async fn serve(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), ApiError> {
        let limit = self.config.server.max_request_header_bytes;
        if respond::head_size(session.req_header()) > limit {
            return Err(ApiError::headers_too_large(limit));
        }
        respond::check_framing(session)?;
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let endpoint = Endpoint::from_path(&path);
        match (method.as_str(), path.as_str(), endpoint) {
            ("POST", _, Some(endpoint)) => {
                ctx.endpoint = endpoint.name();
                self.proxy(session, ctx, endpoint).await
            }
            ("GET" | "HEAD", "/health", _) => {
                ctx.endpoint = "health";
                let (status, body) = admin::health();
                respond::json(session, ctx, status, body).await
            }
            ("GET" | "HEAD", "/ready", _) => {
                ctx.endpoint = "ready";
                let redis_up = self.limiter.redis().map(|r| r.is_up());
                let (status, body) = admin::ready(&self.config, &self.upstreams, redis_up);
                respond::json(session, ctx, status, body).await
            }
            ("GET" | "HEAD", "/v1/models", _) => {
                ctx.endpoint = "models";
                let tenant = self.authenticate(session, ctx)?;
                let (status, body) = admin::models(&self.config, &self.config.tenants[tenant]);
                respond::json(session, ctx, status, body).await
            }
            ("GET" | "HEAD", _, _) if path.starts_with("/v1/models/") => {
                ctx.endpoint = "models";
                let tenant = self.authenticate(session, ctx)?;
                // Everything after the prefix (a model name may hold '/').
                let id = percent_encoding::percent_decode_str(&path["/v1/models/".len()..])
                    .decode_utf8_lossy()
                    .into_owned();
                match admin::model(&self.config, &self.config.tenants[tenant], &id) {
                    Some(body) => respond::json(session, ctx, 200, body).await,
                    None => Err(ApiError::model_not_found(&id)),
                }
            }
            ("GET" | "HEAD", "/v1/usage", _) => {
                ctx.endpoint = "usage";
                let tenant = self.authenticate(session, ctx)?;
                let report = self.limiter.usage(tenant).await;
                let (status, body) = admin::usage(&self.config.tenants[tenant], &report);
                respond::json(session, ctx, status, body).await
            }
            (_, _, _) if path.starts_with("/v1/responses/") => {
                ctx.endpoint = "responses";
                let rest = path["/v1/responses/".len()..].to_string();
                self.response_operation(session, ctx, &rest).await
            }
            ("GET" | "HEAD", "/v1/jobs", _) => {
                ctx.endpoint = "jobs";
                let tenant = self.authenticate(session, ctx)?;
                self.list_jobs(session, ctx, tenant).await
            }
            ("GET" | "HEAD" | "DELETE", _, _) if path.starts_with("/v1/jobs/") => {
                ctx.endpoint = "jobs";
                let tenant = self.authenticate(session, ctx)?;
                let id = &path["/v1/jobs/".len()..];
                if !plain_job_id(id) {
                    return Err(ApiError::job_not_found("(not a job id)"));
                }
                if method == http::Method::DELETE {
                    self.cancel_job(session, ctx, tenant, id).await
                } else {
                    self.job_status(session, ctx, tenant, id).await
                }
            }
            _ => {
                // A known path asked with a method it does not take: its
                // own methods, as `Allow` names them.
                let allow = match path.as_str() {
                    "/health" | "/ready" | "/v1/models" | "/v1/usage" | "/v1/jobs" => "GET, HEAD",
                    p if p.starts_with("/v1/models/") => "GET, HEAD",
                    p if p.starts_with("/v1/jobs/") => "GET, HEAD, DELETE",
                    _ if endpoint.is_some() => "POST",
                    _ => return Err(ApiError::unknown_url(method.as_str(), &path)),
                };
                let upgrade = session.req_header().headers.get(http::header::UPGRADE);
                if upgrade.is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket")) {
                    return Err(ApiError::websocket_not_served(
                        method.as_str(),
                        &path,
                        allow,
                    ));
                }
                Err(ApiError::method_not_allowed(method.as_str(), &path, allow))
            }
        }
    }

    /// The proxied endpoints: authenticate, read the body, route, admit (or
    /// park, or store as a job), forward.
    async fn proxy(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        endpoint: Endpoint,
    ) -> Result<(), ApiError> {
        let tenant = self.authenticate(session, ctx)?;
        let mut body =
            respond::read_body(session, self.config.server.max_request_body_bytes).await?;
        let form = match endpoint.is_form() {
            true => {
                let content_type = session
                    .req_header()
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .cloned();
                let announced = content_type.as_ref().and_then(|v| v.to_str().ok());
                Some(Form::parse(announced, body.clone()).await?)
            }
            false => None,
        };
        if endpoint == Endpoint::Moderations {
            body = with_default_model(body);
        }
        let fields = match &form {
            Some(form) => RequestFields::for_form(form),
            None => RequestFields::parse(&body)?,
        };
        let (route_index, route) = self
            .config
            .route(&fields.model)
            .ok_or_else(|| ApiError::model_not_found(&fields.model))?;
        ctx.exchange.route = Some(route_index);
        if !self.config.tenants[tenant].may_use(&route.name) {
            return Err(ApiError::model_not_allowed(&route.name));
        }
        if endpoint == Endpoint::ChatCompletions && fields.messages_is_array != Some(true) {
            // Refused here rather than spending an admission and a provider
            // call on it.
            return Err(ApiError::invalid_field(
                "messages",
                "expected an array of messages",
            ));
        }
        // Read before admission, so a request refused here spends nothing.
        let media = media_units(endpoint, &fields, form.as_ref())?;
        if endpoint == Endpoint::Responses && fields.background {
            // A background response is answered `queued`, without usage,
            // and its usage is only shown by later reads, which bill
            // nothing: it would never be billed.
            return Err(ApiError::invalid_field(
                "background",
                "background responses are not supported by this gateway (their usage could not be billed); leave 'background' out or false",
            ));
        }
        if endpoint == Endpoint::Responses && fields.names_conversation {
            // Conversations live in the provider account every tenant
            // shares, and the gateway creates none: one named here is not
            // the tenant's to be sure of.
            return Err(ApiError::invalid_field(
                "conversation",
                "conversations are not supported by this gateway (they would be shared by every tenant of its provider account); chain responses with previous_response_id",
            ));
        }
        self.check_tier_priced(tenant, route_index, &fields)?;
        ctx.exchange.requested_tier = fields.requested_tier();
        let pin = self
            .follow_up_pin(tenant, route_index, endpoint, &fields)
            .await?;
        // An upload's body is its file: no tokens are reserved for it.
        let tokens = match form {
            Some(_) => 0,
            None => {
                cost::estimate_request_tokens(body.len(), fields.max_tokens, endpoint.generates())
            }
        };
        if let Some(trace) = &mut ctx.trace {
            trace.note_request(&body, fields.max_tokens);
        }
        if super::jobs::wants_async(session) {
            if form.is_some() || endpoint == Endpoint::Speech {
                return Err(ApiError::invalid_field(
                    "prefer",
                    format!("{} requests cannot run as async jobs (a job keeps a JSON request and answer)", endpoint.name()),
                ));
            }
            return self
                .submit_job(session, ctx, tenant, route_index, endpoint, &body, tokens)
                .await;
        }
        let plan = self.cache_plan(session, tenant, route_index, endpoint, &fields, &body);
        let leader = match &plan {
            Some(plan) => match self.cache_lookup(session, ctx, plan).await? {
                super::cache::Looked::Served => return Ok(()),
                super::cache::Looked::Forward(leader) => leader,
            },
            None => None,
        };
        ctx.cache = plan.as_ref().map(|p| p.header());
        let Some(grant) = self
            .admit(session, ctx, tenant, route_index, tokens)
            .await?
        else {
            // The client left while parked: nothing more to send.
            return Ok(());
        };
        let rate_limits = grant.state;
        ctx.grant = Some(grant);
        // Usage is read from streams too: ask for it, and take it out again
        // when the client did not ask.
        // (A Responses stream always ends with its usage.)
        let asks_usage = matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions);
        let strip_usage = fields.stream && asks_usage && !fields.client_wants_usage();
        debug!(request_id = %ctx.request_id, tenant = %self.config.tenants[tenant].id, model = %route.name, endpoint = endpoint.name(), "routing");
        let estimate = match media {
            Some(media) => cost::Estimate::media(media),
            None => cost::Estimate::new(body.clone(), fields.max_tokens),
        };
        // A form goes upstream re-encoded, under the gateway's own
        // boundary: never the client's bytes or content type.
        let call = Call {
            content_type: match &form {
                Some(form) => form.content_type(),
                None => Call::post_json().content_type,
            },
            ..Call::post_json()
        };
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
            endpoint,
            call,
            pin,
            bills: true,
            routes: self.config.routes_for(tenant, route_index),
            context_routes: self.config.context_routes_for(tenant, route_index),
            stream: fields.stream,
            resumable: fields.stream
                && endpoint == Endpoint::ChatCompletions
                && fields.one_plain_choice,
            body_for: &|provider_model| match &form {
                Some(form) => form.body_for(provider_model),
                None => rewrite_body(&body, &fields, provider_model, strip_usage),
            },
            request_id,
            strip_usage,
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
        let admitted_error = |e| super::admission::admitted_error(e, &exchange.rate_limits);
        let Some(plan) = &plan else {
            return self
                .forwarder
                .forward(session, &exchange, report, &mut settler)
                .await
                .map_err(admitted_error);
        };
        let mut recorder = self.recorder(session, plan, leader.as_ref());
        let forwarded = self
            .forwarder
            .forward(&mut recorder, &exchange, report, &mut settler)
            .await;
        let (recorded, held_end) = recorder.into_parts();
        self.cache_store(plan, recorded, leader, report, *cost_pusd)
            .await;
        if let Some(end) = held_end {
            let _ = session.write_response_body(Some(end), true).await;
        }
        forwarded.map_err(admitted_error)
    }

    /// Refuses a processing tier (`service_tier`) that a model the request
    /// may be served by prices tiers for (`pricing.<model>.service_tiers`)
    /// but not this one: its tokens would be billed at the standard price.
    /// `auto` and `default` are always taken, and every tier where no
    /// model prices tiers (billed at the one price, as documented).
    pub(super) fn check_tier_priced(
        &self,
        tenant: usize,
        route_index: usize,
        fields: &RequestFields,
    ) -> Result<(), ApiError> {
        let Some(given) = fields.service_tier else {
            return Ok(());
        };
        let name = serde_json::from_str::<String>(given).ok();
        // As `fields.requested_tier()` reads it, from the name decoded here.
        let tier = name.as_deref().and_then(cost::ServiceTier::asked);
        if name.as_deref() == Some("auto") || tier == Some(cost::ServiceTier::Default) {
            return Ok(());
        }
        let config = &self.config;
        let routes = config.routes_for(tenant, route_index);
        let context_routes = config.context_routes_for(tenant, route_index);
        let prices = routes.iter().chain(&context_routes).flat_map(|(_, route)| {
            let priced = route.targets.iter().filter_map(|t| t.price.as_ref());
            priced.map(|price| (&route.name, price))
        });
        for (model, price) in prices {
            if price.tiered() && tier.and_then(|tier| price.tier(tier)).is_none() {
                let shown = match &name {
                    Some(name) if name.chars().count() <= 64 => format!("'{name}'"),
                    Some(name) => format!("'{}...'", name.chars().take(64).collect::<String>()),
                    None => "the value given".to_owned(),
                };
                let priced = cost::ServiceTier::PRICED
                    .into_iter()
                    .filter(|tier| price.tier(*tier).is_some())
                    .map(cost::ServiceTier::name);
                let priced = ["auto", "default"].into_iter().chain(priced);
                return Err(ApiError::invalid_field(
                    "service_tier",
                    format!(
                        "{shown} is not priced for model '{model}' on this gateway (accepted: {})",
                        priced.collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The model moderations use when the request names none (OpenAI's
/// default).
const DEFAULT_MODERATION_MODEL: &str = "omni-moderation-latest";

/// A moderations body that names no model, with OpenAI's default spliced
/// in (routing needs a name; the provider gets it explicitly).
fn with_default_model(body: Bytes) -> Bytes {
    match RequestFields::parse(&body) {
        Err(e) if e.code == "missing_model" => {
            crate::openai::with_model(&body, DEFAULT_MODERATION_MODEL).unwrap_or(body)
        }
        _ => body,
    }
}

/// Whether a path segment can be a job id (`job_` and up to 100 letters,
/// digits, `-` or `_`): anything else is no job, and is never echoed.
fn plain_job_id(id: &str) -> bool {
    id.strip_prefix("job_").is_some_and(|rest| {
        (1..=100).contains(&rest.len())
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// The most images billed for an answer whose images could not be counted
/// (OpenAI allows 10 per request).
const MAX_IMAGES_ASKED: u64 = 128;

/// What a media request is billed by besides reported tokens (`None` for
/// the text endpoints): images asked for, characters to speak. Read from
/// the fields the request was routed by (one strict parse: a field given
/// twice was refused there), and refused when of the wrong type, so a
/// request cannot be billed for less than it asks.
fn media_units(
    endpoint: Endpoint,
    fields: &RequestFields<'_>,
    form: Option<&Form>,
) -> Result<Option<cost::Media>, ApiError> {
    let images = |n: Option<u64>| Some(n.unwrap_or(1).min(MAX_IMAGES_ASKED));
    let media = match endpoint {
        Endpoint::ImageGenerations => {
            let n = match fields.n {
                None | Some("null") => None,
                Some(raw) => Some(
                    serde_json::from_str::<u64>(raw)
                        .map_err(|_| ApiError::invalid_field("n", "expected a whole number"))?,
                ),
            };
            cost::Media {
                images: images(n),
                characters: 0,
            }
        }
        Endpoint::ImageEdits | Endpoint::ImageVariations => cost::Media {
            images: images(form.and_then(|f| f.n)),
            characters: 0,
        },
        Endpoint::Speech => {
            let input = fields
                .input
                .and_then(|raw| serde_json::from_str::<std::borrow::Cow<'_, str>>(raw).ok())
                .ok_or_else(|| ApiError::invalid_field("input", "expected the text to speak"))?;
            cost::Media {
                images: None,
                characters: input.chars().count() as u64,
            }
        }
        Endpoint::Moderations | Endpoint::Transcriptions | Endpoint::Translations => {
            cost::Media::default()
        }
        Endpoint::ChatCompletions
        | Endpoint::Completions
        | Endpoint::Embeddings
        | Endpoint::Responses => return Ok(None),
    };
    Ok(Some(media))
}
