//! The Responses API, as much as the gateway's tests need: `POST
//! /v1/responses` (JSON, or SSE with its typed events and usage in
//! `response.completed`), and for stored responses `GET /v1/responses/{id}`,
//! `DELETE`, `POST .../cancel` and `GET .../input_items`. A follow-up naming
//! a `previous_response_id` this mock does not hold is refused with 404, as
//! OpenAI refuses one stored elsewhere.

use crate::*;

/// The most responses the mock keeps.
const STORED: usize = 1000;

/// What a Responses API request asks beyond a generation.
#[derive(Debug, Clone)]
pub(crate) struct ResponsesExtra {
    /// The request's `input`, kept for `input_items`.
    pub(crate) input: Value,
    pub(crate) previous_response_id: Option<String>,
    pub(crate) store: bool,
    /// Made with `background: true` (the only kind `cancel` accepts).
    pub(crate) background: bool,
    /// The tier the response says served it (as `served_tier` gives it).
    pub(crate) service_tier: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ResponsesBody {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    input: Value,
    #[serde(default)]
    instructions: Option<String>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    previous_response_id: Option<String>,
    #[serde(default)]
    store: Option<bool>,
    #[serde(default)]
    background: Option<bool>,
    #[serde(default)]
    mock_tokens: Option<u64>,
    #[serde(default)]
    service_tier: Option<String>,
    #[serde(default)]
    mock_service_tier: Option<String>,
}

/// Parses a `POST /v1/responses` body.
pub(crate) fn parse_responses(body: &[u8]) -> Result<(GenRequest, ResponsesExtra), ApiError> {
    let b: ResponsesBody = serde_json::from_slice(body).map_err(|e| ApiError::from_json(&e))?;
    let input_bytes = match &b.input {
        Value::String(s) => s.len() as u64,
        Value::Array(items) => items
            .iter()
            .map(|item| content_bytes(&item["content"]))
            .sum(),
        _ => 0,
    } + b.instructions.as_ref().map_or(0, |i| i.len() as u64);
    Ok((
        GenRequest {
            model: b.model,
            prompt_tokens: bytes_to_tokens(input_bytes).max(1),
            plan: plan(b.mock_tokens, &[b.max_output_tokens]),
            start: 0,
            prefilled: false,
            stream: b.stream.unwrap_or(false),
            include_usage: false,
            service_tier: None,
        },
        ResponsesExtra {
            input: b.input,
            previous_response_id: b.previous_response_id,
            store: b.store.unwrap_or(true),
            background: b.background.unwrap_or(false),
            service_tier: crate::requests::served_tier(b.service_tier, b.mock_service_tier),
        },
    ))
}

/// A response object, `status` and `output` as given.
pub(crate) fn response_object(
    id: &str,
    created: u64,
    model: &str,
    extra: &ResponsesExtra,
    status: &str,
    output: Value,
    usage: Value,
) -> Value {
    json!({
        "id": id, "object": "response", "created_at": created, "status": status,
        "error": null, "incomplete_details": null, "instructions": null,
        "max_output_tokens": null, "model": model, "output": output,
        "parallel_tool_calls": true, "previous_response_id": extra.previous_response_id,
        "reasoning": {"effort": null, "summary": null}, "store": extra.store,
        "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
        "tools": [], "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": null,
        "metadata": {}, "background": extra.background, "service_tier": extra.service_tier,
    })
}

/// The assistant message item with `text`.
pub(crate) fn message_item(id: u64, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": format!("msg_mock_{id}"), "status": status, "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

/// Responses API usage.
pub(crate) fn responses_usage(input: u64, output: u64) -> Value {
    json!({"input_tokens": input, "input_tokens_details": {"cached_tokens": 0},
           "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
           "total_tokens": input + output})
}

/// The whole answer to a non-streamed request (and what is stored).
pub(crate) fn response_body(
    id: u64,
    created: u64,
    model: &str,
    g: &GenRequest,
    extra: &ResponsesExtra,
) -> Value {
    let text = reply_text(0, g.plan.tokens);
    // Cut by max_output_tokens: OpenAI calls the response incomplete.
    let status = if g.plan.finish_reason == "length" {
        "incomplete"
    } else {
        "completed"
    };
    let mut response = response_object(
        &format!("resp_mock_{id}"),
        created,
        model,
        extra,
        status,
        json!([message_item(id, &text, "completed")]),
        responses_usage(g.prompt_tokens, g.generated()),
    );
    if status == "incomplete" {
        response["incomplete_details"] = json!({"reason": "max_output_tokens"});
    }
    response
}

/// One typed Responses event.
pub(crate) fn responses_event(kind: &str, mut data: Value, sequence: u64) -> String {
    data["type"] = json!(kind);
    data["sequence_number"] = json!(sequence);
    format!("event: {kind}\ndata: {data}\n\n")
}

/// The stored responses of this mock, oldest first.
#[derive(Debug, Default)]
pub(crate) struct ResponseStore {
    responses: VecDeque<(String, Value, Value)>,
}

impl ResponseStore {
    /// Keeps `response` (with the `input` that made it).
    pub(crate) fn keep(&mut self, response: Value, input: Value) {
        let id = response["id"].as_str().unwrap_or_default().to_owned();
        if self.responses.len() >= STORED {
            self.responses.pop_front();
        }
        self.responses.push_back((id, response, input));
    }

    /// The stored response `id` and its input.
    pub(crate) fn get(&self, id: &str) -> Option<(&Value, &Value)> {
        self.responses
            .iter()
            .find(|(stored, ..)| stored == id)
            .map(|(_, response, input)| (response, input))
    }

    /// The stored response `id`, to change.
    pub(crate) fn get_mut(&mut self, id: &str) -> Option<&mut Value> {
        self.responses
            .iter_mut()
            .find(|(stored, ..)| stored == id)
            .map(|(_, response, _)| response)
    }

    /// Forgets `id`; whether it was there.
    pub(crate) fn delete(&mut self, id: &str) -> bool {
        let before = self.responses.len();
        self.responses.retain(|(stored, ..)| stored != id);
        self.responses.len() < before
    }
}

/// What to do with a stored response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResponseOp {
    Get,
    Delete,
    Cancel,
    InputItems,
}

/// Answers an operation on a stored response.
pub(crate) fn response_op(store: &mut ResponseStore, op: ResponseOp, id: &str) -> Reply {
    let not_found = || {
        Reply::error(&ApiError {
            status: 404,
            message: format!("No response found with id '{id}'."),
            kind: "invalid_request_error",
            code: None,
        })
    };
    let json = |v: Value| Reply::json(200, serde_json::to_vec(&v).unwrap_or_default());
    match op {
        ResponseOp::Delete => {
            if store.delete(id) {
                json(json!({"id": id, "object": "response.deleted", "deleted": true}))
            } else {
                not_found()
            }
        }
        ResponseOp::Get => match store.get(id) {
            Some((response, _)) => json(response.clone()),
            None => not_found(),
        },
        ResponseOp::Cancel => match store.get_mut(id) {
            Some(response) if response["background"] == json!(true) => {
                response["status"] = json!("cancelled");
                json(response.clone())
            }
            Some(_) => Reply::error(&ApiError {
                status: 400,
                message: "Only responses created with background=true can be cancelled.".into(),
                kind: "invalid_request_error",
                code: None,
            }),
            None => not_found(),
        },
        ResponseOp::InputItems => match store.get(id) {
            Some((_, input)) => {
                let items: Vec<Value> = match input {
                    Value::String(text) => vec![
                        json!({"type": "message", "id": format!("msg_in_{id}"), "role": "user", "status": "completed",
                        "content": [{"type": "input_text", "text": text}]}),
                    ],
                    Value::Array(items) => items
                        .iter()
                        .enumerate()
                        .map(|(i, item)| {
                            let mut item = item.clone();
                            item["id"] = json!(format!("msg_in_{i}"));
                            item["type"] = json!("message");
                            item
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                let first = items.first().map(|i| i["id"].clone());
                let last = items.last().map(|i| i["id"].clone());
                json(
                    json!({"object": "list", "data": items, "first_id": first, "last_id": last, "has_more": false}),
                )
            }
            None => not_found(),
        },
    }
}
