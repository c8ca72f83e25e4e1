//! The application: one request from its head to its last byte, with the
//! control endpoints, faults, latency and streaming.

use crate::*;

/// The pingora HTTP application.
#[derive(Debug)]
pub(crate) struct MockApp {
    /// Command line settings.
    pub(crate) cfg: MockConfig,
    /// Mutable state.
    pub(crate) state: MockState,
}

#[async_trait]
impl HttpServerApp for MockApp {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match session.read_request().await {
            Ok(true) => {}
            // client closed an idle keep-alive connection, or sent garbage
            Ok(false) | Err(_) => return None,
        }
        let keepalive = if *shutdown.borrow() { None } else { Some(60) };
        session.set_keepalive(keepalive);

        match self.handle(&mut session).await {
            Outcome::Reuse => {
                let settings = HttpPersistentSettings::for_session(&session);
                match session.finish().await {
                    Ok(Some(stream)) => {
                        Some(ReusedHttpStream::from_reusable_stream(stream, settings))
                    }
                    Ok(None) | Err(_) => None,
                }
            }
            Outcome::Close => {
                session.shutdown().await;
                None
            }
        }
    }
}

impl MockApp {
    /// Handles one request.
    pub(crate) async fn handle(&self, session: &mut ServerSession) -> Outcome {
        let expects_continue = session
            .req_header()
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if expects_continue && session.write_continue_response().await.is_err() {
            return Outcome::Close;
        }
        let body = match read_body(session).await {
            Ok(b) => b,
            Err(BodyError::Io) => return Outcome::Close,
            Err(BodyError::TooLarge) => {
                session.set_keepalive(None);
                let e = ApiError {
                    status: 413,
                    message: format!("Request body larger than {MAX_BODY_BYTES} bytes"),
                    kind: "invalid_request_error",
                    code: Some("request_too_large"),
                };
                let _ = send(
                    session,
                    response_header(413, "application/json"),
                    &Reply::error(&e),
                )
                .await;
                return Outcome::Close;
            }
        };
        let path = session.req_header().uri.path();
        if path == "/health" || path == "/_mock" || path.starts_with("/_mock/") {
            let reply = self.control(session.req_header().method.clone(), path, &body);
            return send(
                session,
                response_header(reply.status, &reply.content_type),
                &reply,
            )
            .await;
        }
        self.api(session, body).await
    }

    /// Serves a control endpoint.
    pub(crate) fn control(&self, method: Method, path: &str, body: &[u8]) -> Reply {
        let st = &self.state;
        match (method, path) {
            (_, "/health") => Reply {
                status: 200,
                content_type: "text/plain".into(),
                body: Bytes::from_static(b"ok"),
                retry_after: None,
                tokens: None,
            },
            // Which process answers (a test that started this one checks
            // it is not another server that holds the port).
            (Method::GET, "/_mock/pid") => Reply {
                status: 200,
                content_type: "text/plain".into(),
                body: Bytes::from(std::process::id().to_string()),
                retry_after: None,
                tokens: None,
            },
            (Method::GET, "/_mock/stats") => {
                let v = json!({
                    "requests": st.stats.requests.load(Ordering::Relaxed),
                    "by_path": st.stats.by_path(),
                    "by_model": st.stats.by_model(),
                    "prompt_tokens": st.stats.prompt_tokens.load(Ordering::Relaxed),
                    "completion_tokens": st.stats.completion_tokens.load(Ordering::Relaxed),
                    "disconnects": st.stats.disconnects.load(Ordering::Relaxed),
                    "connections": lock(&st.stats.peers).len(),
                    "faults_pending": st.faults_pending.load(Ordering::Acquire),
                    "latency_ms": st.latency_ms.load(Ordering::Relaxed),
                });
                Reply::json(200, serde_json::to_vec(&v).unwrap_or_default())
            }
            // A trace collector that takes every OTLP/HTTP export and
            // keeps nothing (the bench's row with traces on).
            (Method::POST, "/_mock/otlp/v1/traces") => Reply {
                status: 200,
                content_type: "application/x-protobuf".into(),
                body: Bytes::new(),
                retry_after: None,
                tokens: None,
            },
            (Method::GET, "/_mock/requests") => {
                let items: Vec<Value> = lock(&st.recorded).iter().map(|r| r.to_json()).collect();
                Reply::json(200, serde_json::to_vec(&items).unwrap_or_default())
            }
            (Method::POST, "/_mock/reset") => {
                st.reset(self.cfg.latency_ms);
                Reply::json(200, b"{\"ok\":true}".to_vec())
            }
            (Method::GET, "/_mock/faults") => {
                let pending: Vec<Value> = lock(&st.faults)
                    .entries
                    .iter()
                    .map(|f| f.to_json())
                    .collect();
                let v = json!({
                    "faults": pending,
                    "latency_ms": st.latency_ms.load(Ordering::Relaxed),
                });
                Reply::json(200, serde_json::to_vec(&v).unwrap_or_default())
            }
            (Method::POST, "/_mock/faults") => match parse_faults(body) {
                Ok((latency, faults)) => {
                    st.add_faults(latency, faults);
                    Reply::json(200, b"{\"ok\":true}".to_vec())
                }
                Err(msg) => Reply::json(
                    400,
                    error_json(&msg, "invalid_request_error", Some("invalid_fault")),
                ),
            },
            (method, path) => Reply::json(
                404,
                error_json(
                    &format!("Unknown control endpoint: {method} {path}"),
                    "invalid_request_error",
                    Some("unknown_url"),
                ),
            ),
        }
    }

    /// Whether the request carries the configured API key (always true without one).
    pub(crate) fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(key) = self.cfg.api_key.as_deref() else {
            return true;
        };
        let bearer = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .is_some_and(|v| v.trim() == key);
        bearer
            || ["api-key", "x-api-key"].iter().any(|h| {
                headers
                    .get(*h)
                    .is_some_and(|v| v.as_bytes() == key.as_bytes())
            })
    }

    /// Serves an API request.
    pub(crate) async fn api(&self, session: &mut ServerSession, body: Bytes) -> Outcome {
        let st = &self.state;
        if let Some(peer) = session.client_addr().and_then(|a| a.as_inet()) {
            st.stats.count_peer(*peer);
        }
        let req = session.req_header();
        let path = req.uri.path();
        st.stats.count_request(path);
        let id = st.next_id.fetch_add(1, Ordering::Relaxed);
        let mut call = match media_route(path).filter(|_| req.method == Method::POST) {
            Some((kind, deployment)) => {
                let content_type = req
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok());
                match parse_media(kind, deployment, content_type, body.clone()).await {
                    Ok(media) => ApiCall::Media(media),
                    Err((e, model)) => ApiCall::Invalid(e, model),
                }
            }
            None => ApiCall::parse(&req.method, path, &body),
        };
        let sha: [u8; 32] = Sha256::digest(&body).into();
        let model = call.model().map(str::to_owned);
        if let Some(model) = &model {
            st.stats.count_model(model);
        }
        st.record(RecordedRequest {
            method: req.method.clone(),
            path: path.to_owned(),
            query: req.uri.query().map(str::to_owned),
            headers: req.headers.clone(),
            body_bytes: body.len(),
            body_sha256: sha,
            model: model.clone(),
            prefilled: call.prefilled(),
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        });
        let fault = st.take_fault(path, model.as_deref());
        let authorized = self.authorized(&req.headers);
        let req_headers = req.headers.clone();
        let mut meta = ApiMeta {
            id,
            body_len: body.len(),
            body_sha256: hex::encode(sha),
            model,
            extra_headers: Vec::new(),
            echo_key: None,
            compress: None,
        };
        drop(body);

        let mut watch = true;
        let latency = st.latency_ms.load(Ordering::Relaxed);
        if latency > 0 && !pause(session, &mut watch, Duration::from_millis(latency)).await {
            st.stats.disconnect();
            return Outcome::Close;
        }

        let mut disconnect_after = None;
        let mut end_after = None;
        let mut stall_in_stream = None;
        let mut no_usage = false;
        let mut first_token_ms = None;
        let mut malformed_after = None;
        let mut error_after = None;
        let mut error_code = None;
        let mut no_done = false;
        let mut linger_ms = None;
        match fault {
            None => {}
            Some(Fault::Headers(headers)) => meta.extra_headers = headers,
            Some(Fault::EchoKey) => meta.echo_key = Some(credential(&req_headers)),
            Some(Fault::NoUsage { linger_ms: linger }) => {
                no_usage = true;
                linger_ms = linger;
                if let ApiCall::Chat(g) | ApiCall::Completion(g) = &mut call {
                    g.include_usage = false;
                }
            }
            Some(Fault::DropConnection) => return Outcome::Close,
            Some(Fault::Status {
                status,
                retry_after,
                retry_after_ms,
            }) => {
                let mut reply = Reply::error(&ApiError::for_status(status));
                reply.retry_after =
                    retry_after.or((status == 429 && retry_after_ms.is_none()).then_some(1));
                if let Some(ms) = retry_after_ms {
                    meta.extra_headers
                        .push(("retry-after-ms".to_owned(), ms.to_string()));
                }
                return self.reply(session, &meta, &reply, None).await;
            }
            Some(Fault::FirstToken { ms }) => first_token_ms = Some(ms),
            Some(Fault::Malformed { after_chunks }) => malformed_after = Some(after_chunks),
            Some(Fault::ErrorEvent {
                after_chunks,
                linger_ms: linger,
                code,
            }) => {
                error_after = Some(after_chunks);
                linger_ms = linger;
                error_code = code;
            }
            Some(Fault::NoDone) => no_done = true,
            Some(Fault::Linger { ms }) => linger_ms = Some(ms),
            Some(Fault::Compress { encoding }) => meta.compress = Some(encoding),
            Some(Fault::RejectPrefill) => {
                if let ApiCall::Chat(g) | ApiCall::Messages(g, _) = &call {
                    if g.prefilled {
                        let e = ApiError {
                            status: 400,
                            message: "This model does not support assistant message prefill."
                                .to_owned(),
                            kind: "invalid_request_error",
                            code: Some("prefill_not_supported"),
                        };
                        return self.reply(session, &meta, &Reply::error(&e), None).await;
                    }
                }
            }
            Some(Fault::RawError {
                status,
                body,
                content_type,
                retry_after,
            }) => {
                let reply = Reply {
                    status,
                    content_type,
                    body: body.into(),
                    retry_after,
                    tokens: None,
                };
                return self.reply(session, &meta, &reply, None).await;
            }
            Some(Fault::Disconnect { after_chunks }) => disconnect_after = Some(after_chunks),
            Some(Fault::EndEarly { after_chunks }) => end_after = Some(after_chunks),
            Some(Fault::Stall {
                after_chunks,
                stall_ms,
            }) => {
                if after_chunks == 0 || !call.is_stream() {
                    if !pause(session, &mut watch, Duration::from_millis(stall_ms)).await {
                        st.stats.disconnect();
                        return Outcome::Close;
                    }
                } else {
                    stall_in_stream = Some((after_chunks, stall_ms));
                }
            }
        }

        if self.cfg.require_uuid_request_id && !has_uuid_request_id(&req_headers) {
            let reply = Reply {
                status: 400,
                content_type: "text/plain; charset=utf-8".into(),
                body: Vec::new().into(),
                retry_after: None,
                tokens: None,
            };
            return self.reply(session, &meta, &reply, None).await;
        }
        if !authorized {
            let e = ApiError {
                status: 401,
                message: match &meta.echo_key {
                    Some(key) => format!("Incorrect API key provided: {key}"),
                    None => "Incorrect API key provided".to_owned(),
                },
                kind: "invalid_request_error",
                code: Some("invalid_api_key"),
            };
            return self
                .reply(session, &meta, &Reply::error(&e), disconnect_after)
                .await;
        }

        let created = unix_now();
        let reply = match &call {
            ApiCall::Responses(g, extra) => {
                if let Some(previous) = &extra.previous_response_id {
                    if lock(&st.responses).get(previous).is_none() {
                        let e = ApiError {
                            status: 404,
                            message: format!("Previous response with id '{previous}' not found."),
                            kind: "invalid_request_error",
                            code: None,
                        };
                        return self.reply(session, &meta, &Reply::error(&e), None).await;
                    }
                }
                let body = response_body(meta.id, created, meta.response_model(), g, extra);
                if extra.store {
                    lock(&st.responses).keep(body.clone(), extra.input.clone());
                }
                if g.stream {
                    let plan = StreamPlan {
                        kind: StreamKind::Responses,
                        gen: g,
                        created,
                        disconnect_after,
                        end_after,
                        stall: stall_in_stream,
                        first_token_ms,
                        malformed_after,
                        error_after,
                        error_code: error_code.as_deref(),
                        no_done: true,
                        linger_ms,
                        no_usage,
                        responses: Some(extra),
                    };
                    return self.stream(session, &meta, &plan, &mut watch).await;
                }
                let mut r = Reply::json(200, serde_json::to_vec(&body).unwrap_or_default());
                r.tokens = Some((g.prompt_tokens, g.generated()));
                r
            }
            ApiCall::ResponseOp(op, id) => response_op(&mut lock(&st.responses), *op, id),
            ApiCall::Messages(g, Some(tool)) if g.stream => {
                let mut r = Reply::json(
                    200,
                    messages_tool_stream(meta.id, tool, g.prompt_tokens).into_bytes(),
                );
                r.content_type = "text/event-stream".into();
                r.tokens = Some((g.prompt_tokens, 5));
                r
            }
            ApiCall::Chat(g) | ApiCall::Completion(g) | ApiCall::Messages(g, _) if g.stream => {
                let kind = match call {
                    ApiCall::Chat(_) => StreamKind::Chat,
                    ApiCall::Messages(..) => StreamKind::Anthropic,
                    _ => StreamKind::Completion,
                };
                let plan = StreamPlan {
                    kind,
                    gen: g,
                    created,
                    disconnect_after,
                    end_after,
                    stall: stall_in_stream,
                    first_token_ms,
                    malformed_after,
                    error_after,
                    error_code: error_code.as_deref(),
                    no_done,
                    linger_ms,
                    no_usage,
                    responses: None,
                };
                return self.stream(session, &meta, &plan, &mut watch).await;
            }
            ApiCall::Messages(g, tool) => {
                let mut r = Reply::json(
                    200,
                    messages_body(meta.id, meta.response_model(), g, tool.as_deref()),
                );
                r.tokens = Some((g.prompt_tokens, g.generated()));
                r
            }
            ApiCall::Chat(g) => {
                let id = format!("chatcmpl-mock-{}", meta.id);
                let mut r = Reply::json(
                    200,
                    chat_completion_body(&id, created, meta.response_model(), g),
                );
                r.tokens = Some((g.prompt_tokens, g.generated()));
                r
            }
            ApiCall::Completion(g) => {
                let id = format!("cmpl-mock-{}", meta.id);
                let mut r = Reply::json(
                    200,
                    text_completion_body(&id, created, meta.response_model(), g),
                );
                r.tokens = Some((g.prompt_tokens, g.generated()));
                r
            }
            ApiCall::Embeddings(e) => {
                let mut r = Reply::json(200, embeddings_body(meta.response_model(), e));
                r.tokens = Some((e.prompt_tokens, 0));
                r
            }
            ApiCall::Models => {
                let v = json!({"object": "list", "data": [model_json(DEFAULT_MODEL)]});
                Reply::json(200, serde_json::to_vec(&v).unwrap_or_default())
            }
            ApiCall::Model(id) => {
                Reply::json(200, serde_json::to_vec(&model_json(id)).unwrap_or_default())
            }
            ApiCall::Media(media) => media.answer(meta.id, created),
            ApiCall::Invalid(e, _) => Reply::error(e),
            ApiCall::NotFound => {
                let req = session.req_header();
                Reply::error(&ApiError {
                    status: 404,
                    message: format!(
                        "Unknown request URL: {} {}. Please check the URL for typos.",
                        req.method,
                        req.uri.path()
                    ),
                    kind: "invalid_request_error",
                    code: Some("unknown_url"),
                })
            }
        };
        let reply = if no_usage {
            reply.without_usage()
        } else {
            reply
        };
        let reply = match &meta.echo_key {
            Some(key) => reply.with_echo(key),
            None => reply,
        };
        if let Some(ms) = first_token_ms {
            // The head at once, the body much later.
            let mut header = meta.header(reply.status, &reply.content_type);
            let _ = header.insert_header(http::header::CONTENT_LENGTH, reply.body.len());
            if session.write_response_header(header).await.is_err()
                || !pause(session, &mut watch, Duration::from_millis(ms)).await
                || session
                    .write_response_body(reply.body.clone(), true)
                    .await
                    .is_err()
            {
                st.stats.disconnect();
                return Outcome::Close;
            }
            if let Some((prompt, completion)) = reply.tokens {
                st.stats.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
                st.stats
                    .completion_tokens
                    .fetch_add(completion, Ordering::Relaxed);
            }
            return Outcome::Reuse;
        }
        self.reply(session, &meta, &reply, disconnect_after).await
    }

    /// Writes a complete API response, honouring a disconnect fault and accounting tokens.
    pub(crate) async fn reply(
        &self,
        session: &mut ServerSession,
        meta: &ApiMeta,
        reply: &Reply,
        disconnect_after: Option<u64>,
    ) -> Outcome {
        let stats = &self.state.stats;
        let header = meta.header(reply.status, &reply.content_type);
        if disconnect_after.is_some() {
            let mut header = header;
            let _ = header.insert_header(http::header::CONTENT_LENGTH, reply.body.len());
            if let Some(s) = reply.retry_after {
                let _ = header.insert_header(http::header::RETRY_AFTER, s);
            }
            if session.write_response_header(header).await.is_ok() {
                if let Some((prompt, _)) = reply.tokens {
                    stats.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
                }
                let half = reply.body.slice(..reply.body.len() / 2);
                let _ = session.write_response_body(half, false).await;
            }
            return Outcome::Close;
        }
        let compressed;
        let reply = match meta.compress.and_then(Encoder::new) {
            Some(mut encoder) => {
                compressed = Reply {
                    status: reply.status,
                    content_type: reply.content_type.clone(),
                    body: encoder.encode(&reply.body, true),
                    retry_after: reply.retry_after,
                    tokens: reply.tokens,
                };
                &compressed
            }
            None => reply,
        };
        let outcome = send(session, header, reply).await;
        if outcome == Outcome::Reuse {
            if let Some((prompt, completion)) = reply.tokens {
                stats.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
                stats
                    .completion_tokens
                    .fetch_add(completion, Ordering::Relaxed);
            }
        } else if reply.status == 200 {
            stats.disconnect();
        }
        outcome
    }

    /// Streams a generation as SSE.
    pub(crate) async fn stream(
        &self,
        session: &mut ServerSession,
        meta: &ApiMeta,
        plan: &StreamPlan<'_>,
        watch: &mut bool,
    ) -> Outcome {
        let stats = &self.state.stats;
        let g = plan.gen;
        let id = match plan.kind {
            StreamKind::Chat => format!("chatcmpl-mock-{}", meta.id),
            StreamKind::Completion => format!("cmpl-mock-{}", meta.id),
            StreamKind::Anthropic => format!("msg_mock_{}", meta.id),
            StreamKind::Responses => format!("resp_mock_{}", meta.id),
        };
        let mut chunks = ChunkMeta::new(
            plan.kind,
            &id,
            plan.created,
            meta.response_model(),
            g.include_usage,
            g.service_tier.as_deref(),
        );
        chunks.anthropic_usage = !plan.no_usage;
        if let Some(extra) = plan.responses {
            chunks.responses = Some(Box::new(ResponsesStream {
                id: meta.id,
                model: meta.response_model().to_owned(),
                created: plan.created,
                gen: g.clone(),
                extra: extra.clone(),
            }));
        }

        let mut encoder = meta.compress.and_then(Encoder::new);
        let mut header = meta.header(200, "text/event-stream");
        let _ = header.insert_header(http::header::CACHE_CONTROL, "no-cache");
        if session.req_header().version != http::Version::HTTP_10 {
            let _ = header.insert_header(http::header::TRANSFER_ENCODING, "chunked");
        }
        if session.write_response_header(header).await.is_err() {
            stats.disconnect();
            return Outcome::Close;
        }
        stats
            .prompt_tokens
            .fetch_add(g.prompt_tokens, Ordering::Relaxed);

        chunks.counts = (g.prompt_tokens, g.generated());
        if matches!(
            plan.kind,
            StreamKind::Chat | StreamKind::Anthropic | StreamKind::Responses
        ) && write_body(session, &mut encoder, chunks.role_event().into(), false)
            .await
            .is_err()
        {
            stats.disconnect();
            return Outcome::Close;
        }

        if let Some(key) = meta.echo_key.as_deref().filter(|k| !k.is_empty()) {
            // The raw key in two writes split mid-key, then the escaped key.
            let raw = chunks.choice_event(Some(&format!("key {key} ")), false, None);
            let split = raw.find(key).map_or(0, |at| at + key.len() / 2);
            let escaped = raw.replace(key, &escape_every_char(key));
            for (part, pause_after) in [
                (&raw[..split], true),
                (&raw[split..], false),
                (&escaped[..], false),
            ] {
                if write_body(
                    session,
                    &mut encoder,
                    Bytes::copy_from_slice(part.as_bytes()),
                    false,
                )
                .await
                .is_err()
                {
                    stats.disconnect();
                    return Outcome::Close;
                }
                if pause_after && !pause(session, watch, Duration::from_millis(30)).await {
                    stats.disconnect();
                    return Outcome::Close;
                }
            }
        }

        let interval = (self.cfg.tokens_per_second > 0)
            .then(|| Duration::from_secs_f64(1.0 / self.cfg.tokens_per_second as f64));
        let mut next = Instant::now();
        if let Some(ms) = plan.first_token_ms {
            if !pause(session, watch, Duration::from_millis(ms)).await {
                stats.disconnect();
                return Outcome::Close;
            }
        }
        for i in g.start..g.plan.tokens {
            if plan.malformed_after == Some(i - g.start)
                && write_body(
                    session,
                    &mut encoder,
                    Bytes::from_static(b"data: {\"choices\": [unparseable\n\n"),
                    false,
                )
                .await
                .is_err()
            {
                stats.disconnect();
                return Outcome::Close;
            }
            if plan.disconnect_after == Some(i - g.start) {
                return Outcome::Close;
            }
            if plan.error_after == Some(i - g.start) {
                return self
                    .end_with_error(session, &mut encoder, &chunks, plan, watch)
                    .await;
            }
            if plan.end_after == Some(i - g.start) {
                return match write_body(session, &mut encoder, Bytes::new(), true).await {
                    Ok(()) => Outcome::Reuse,
                    Err(_) => Outcome::Close,
                };
            }
            if let Some((k, ms)) = plan.stall {
                if k == i - g.start {
                    if !pause(session, watch, Duration::from_millis(ms)).await {
                        stats.disconnect();
                        return Outcome::Close;
                    }
                    next = Instant::now();
                }
            }
            if let Some(iv) = interval {
                let now = Instant::now();
                if next > now && !pause(session, watch, next - now).await {
                    stats.disconnect();
                    return Outcome::Close;
                }
                next += iv;
            }
            let event = if self.cfg.stamp_chunks {
                chunks.choice_event(Some(&monotonic_us().to_string()), false, None)
            } else {
                chunks.token_event(i)
            };
            if write_body(session, &mut encoder, event.into(), false)
                .await
                .is_err()
            {
                stats.disconnect();
                return Outcome::Close;
            }
            stats.completion_tokens.fetch_add(1, Ordering::Relaxed);
        }
        if plan.disconnect_after.is_some() {
            // asked to cut after at least as many tokens as the reply has
            return Outcome::Close;
        }
        if let Some((k, ms)) = plan.stall {
            // asked to stall after at least as many tokens as the reply has
            if k >= g.plan.tokens && !pause(session, watch, Duration::from_millis(ms)).await {
                stats.disconnect();
                return Outcome::Close;
            }
        }

        let mut tail = chunks.finish_event(g.plan.finish_reason);
        if g.include_usage {
            tail.push_str(&chunks.usage_event(g.prompt_tokens, g.generated()));
        }
        if !plan.no_done {
            tail.push_str(&chunks.done_event());
        }
        // the tail goes out as one chunk per event so clients see normal SSE framing
        for event in tail.split_inclusive("\n\n") {
            if write_body(
                session,
                &mut encoder,
                Bytes::copy_from_slice(event.as_bytes()),
                false,
            )
            .await
            .is_err()
            {
                stats.disconnect();
                return Outcome::Close;
            }
        }
        if let Some(ms) = plan.linger_ms {
            if !pause(session, watch, Duration::from_millis(ms)).await {
                stats.disconnect();
                return Outcome::Close;
            }
        }
        if write_body(session, &mut encoder, Bytes::new(), true)
            .await
            .is_err()
        {
            stats.disconnect();
            return Outcome::Close;
        }
        Outcome::Reuse
    }

    /// Ends a stream with the provider's in-band error event, and its body
    /// after the plan's `linger_ms` (a provider that keeps it open a while).
    async fn end_with_error(
        &self,
        session: &mut ServerSession,
        encoder: &mut Option<Encoder>,
        chunks: &ChunkMeta,
        plan: &StreamPlan<'_>,
        watch: &mut bool,
    ) -> Outcome {
        let stats = &self.state.stats;
        let sent = write_body(
            session,
            encoder,
            chunks.error_event(plan.error_code).into(),
            false,
        )
        .await;
        let lingered = match plan.linger_ms {
            Some(ms) => sent.is_ok() && pause(session, watch, Duration::from_millis(ms)).await,
            None => sent.is_ok(),
        };
        if !lingered
            || write_body(session, encoder, Bytes::new(), true)
                .await
                .is_err()
        {
            stats.disconnect();
            return Outcome::Close;
        }
        Outcome::Reuse
    }
}

/// Parameters of one SSE stream.
#[derive(Debug)]
pub(crate) struct StreamPlan<'a> {
    /// Dialect.
    pub(crate) kind: StreamKind,
    /// The parsed request.
    pub(crate) gen: &'a GenRequest,
    /// `created` timestamp.
    pub(crate) created: u64,
    /// Close after this many token events.
    pub(crate) disconnect_after: Option<u64>,
    /// End the body cleanly after this many token events (no finish).
    pub(crate) end_after: Option<u64>,
    /// Pause (after token events, ms).
    pub(crate) stall: Option<(u64, u64)>,
    /// Pause before the first token (after the role event), ms.
    pub(crate) first_token_ms: Option<u64>,
    /// A non-JSON event after this many token events.
    pub(crate) malformed_after: Option<u64>,
    /// The provider's error event after this many token events, and the
    /// body's end (after `linger_ms`).
    pub(crate) error_after: Option<u64>,
    /// That error's code, when not the server's overload.
    pub(crate) error_code: Option<&'a str>,
    /// End without `[DONE]`.
    pub(crate) no_done: bool,
    /// End the body this many ms after the last event.
    pub(crate) linger_ms: Option<u64>,
    /// An Anthropic stream without usage (its start and final delta carry
    /// none); other dialects leave theirs out through `include_usage`.
    pub(crate) no_usage: bool,
    /// A Responses API stream: what its events carry.
    pub(crate) responses: Option<&'a ResponsesExtra>,
}

/// Writes a complete response with a content length.
pub(crate) async fn send(
    session: &mut ServerSession,
    mut header: Box<ResponseHeader>,
    reply: &Reply,
) -> Outcome {
    let _ = header.insert_header(http::header::CONTENT_LENGTH, reply.body.len());
    if let Some(s) = reply.retry_after {
        let _ = header.insert_header(http::header::RETRY_AFTER, s);
    }
    if session.write_response_header(header).await.is_err() {
        return Outcome::Close;
    }
    match session.write_response_body(reply.body.clone(), true).await {
        Ok(()) => Outcome::Reuse,
        Err(_) => Outcome::Close,
    }
}

/// Whether `x-request-id` is a UUID in its canonical text form.
fn has_uuid_request_id(headers: &HeaderMap) -> bool {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|id| {
            id.len() == 36
                && id.char_indices().all(|(i, c)| match i {
                    8 | 13 | 18 | 23 => c == '-',
                    _ => c.is_ascii_hexdigit(),
                })
        })
}
