//! Unit tests of the wire format: parsing, limits, rewriting, errors.

use super::rewrite::{without_members, without_streaming, FOREIGN_UPSTREAM_FIELDS};
use super::*;
use bytes::Bytes;

#[test]
fn reads_model_after_messages() {
    let body =
        br#"{"messages":[{"role":"user","content":"hi"}],"model":"gpt-4o-mini","stream":true}"#;
    let fields = RequestFields::parse(body).unwrap();
    assert_eq!(fields.model, "gpt-4o-mini");
    assert!(fields.stream);
    assert_eq!(
        &body[fields.model_span.0..fields.model_span.1],
        b"\"gpt-4o-mini\""
    );
}

#[test]
fn reads_escaped_model_names() {
    let body = br#"{"model":"a\u0062c"}"#;
    assert_eq!(RequestFields::parse(body).unwrap().model, "abc");
}

#[test]
fn rejects_bodies_that_are_not_json() {
    for body in [
        &b"{"[..],
        b"not json",
        b"\xff\xfe",
        b"{\"model\": \"\xff\"}",
    ] {
        let err = RequestFields::parse(body).unwrap_err();
        assert_eq!((err.status, err.code), (400, "invalid_json"), "{body:?}");
    }
}

#[test]
fn rejects_missing_empty_or_null_model() {
    for body in [
        &br#"{}"#[..],
        br#"{"model":""}"#,
        br#"{"model":null}"#,
        br#"{"model":"  "}"#,
    ] {
        let err = RequestFields::parse(body).unwrap_err();
        assert_eq!(
            err.code,
            "missing_model",
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn rejects_wrongly_typed_fields() {
    let err = RequestFields::parse(br#"{"model":5}"#).unwrap_err();
    assert_eq!((err.status, err.param.as_deref()), (400, Some("model")));
    let err = RequestFields::parse(br#"{"model":"m","stream":"yes"}"#).unwrap_err();
    assert_eq!((err.status, err.param.as_deref()), (400, Some("stream")));
    let err = RequestFields::parse(br#"{"model":"m","max_tokens":-1}"#).unwrap_err();
    assert_eq!(
        (err.status, err.param.as_deref()),
        (400, Some("max_tokens"))
    );
    let err = RequestFields::parse(br#"[1,2]"#).unwrap_err();
    assert_eq!(err.status, 400);
    // Sampling fields a provider might answer with a 500 instead.
    for (field, value) in [
        ("temperature", r#""hot""#),
        ("top_p", "[1]"),
        ("frequency_penalty", "{}"),
        ("presence_penalty", "true"),
        ("seed", "1.5"),
        ("top_logprobs", "-2"),
    ] {
        let body = format!(r#"{{"model":"m","{field}":{value}}}"#);
        let err = RequestFields::parse(body.as_bytes()).unwrap_err();
        assert_eq!((err.status, err.param.as_deref()), (400, Some(field)));
    }
    let fine = br#"{"model":"m","temperature":0.7,"top_p":null,"seed":-3,"top_logprobs":2}"#;
    assert!(RequestFields::parse(fine).is_ok());
}

#[test]
fn rewrite_keeps_the_body_when_the_model_name_is_the_same() {
    let body = Bytes::from_static(br#"{"model":"m","messages":[]}"#);
    let fields = RequestFields::parse(&body).unwrap();
    let out = rewrite_body(&body, &fields, "m", false);
    assert_eq!(out.as_ptr(), body.as_ptr(), "no copy expected");
}

#[test]
fn rewrite_splices_the_provider_model_name() {
    let body =
        Bytes::from_static(br#"{"messages":[{"content":"model"}], "model" : "public","n":1}"#);
    let fields = RequestFields::parse(&body).unwrap();
    let out = rewrite_body(&body, &fields, "provider-\"x\"", false);
    let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(value["model"], "provider-\"x\"");
    assert_eq!(value["messages"][0]["content"], "model");
    assert_eq!(value["n"], 1);
}

#[test]
fn rewrite_removes_fields_that_name_another_upstream() {
    let body = Bytes::from_static(
        br#"{"model":"m","api_key":"sk-x","api_base":"http://evil","base_url":"http://evil"}"#,
    );
    let fields = RequestFields::parse(&body).unwrap();
    assert!(fields.has_foreign_upstream_fields);
    let value: serde_json::Value =
        serde_json::from_slice(&rewrite_body(&body, &fields, "p", false)).unwrap();
    assert_eq!(value, serde_json::json!({"model": "p"}));
}

#[test]
fn removing_foreign_fields_keeps_every_other_byte() {
    // Key order, spacing, escapes and a big integer stay as sent.
    let body = Bytes::from_static(
            br#"{ "z": 12345678901234567890123, "api_key" : "sk-\"x\"", "a\u0062": [1.50, {"k":"v"}], "base_url":null,"api_\u0062ase":"e", "model":"m"}"#,
        );
    let fields = RequestFields::parse(&body).unwrap();
    let out = rewrite_body(&body, &fields, "m", false);
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        r#"{ "z": 12345678901234567890123, "a\u0062": [1.50, {"k":"v"}], "model":"m"}"#
    );
    let out = rewrite_body(&body, &fields, "p", true);
    let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(value["model"], "p");
    assert_eq!(value["stream_options"]["include_usage"], true);
    assert!(value.get("api_key").is_none() && value.get("api_base").is_none());
}

#[test]
fn asking_for_usage_keeps_the_clients_other_options_as_sent() {
    let body = Bytes::from_static(
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":false, "z":12345678901234567890123,"s":"\u00e9"}}"#,
        );
    let fields = RequestFields::parse(&body).unwrap();
    let out = rewrite_body(&body, &fields, "m", true);
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        r#"{"model":"m","stream":true,"stream_options":{"include_usage":true, "z":12345678901234567890123,"s":"\u00e9"}}"#
    );
    for (options, expected) in [
        (r#"{"x":1}"#, r#"{"include_usage":true,"x":1}"#),
        (r#"{ }"#, r#"{"include_usage":true}"#),
        ("null", r#"{"include_usage":true}"#),
    ] {
        let body = Bytes::from(format!(r#"{{"model":"m","stream_options":{options}}}"#));
        let fields = RequestFields::parse(&body).unwrap();
        let out = rewrite_body(&body, &fields, "m", true);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            format!(r#"{{"model":"m","stream_options":{expected}}}"#)
        );
    }
}

#[test]
fn removing_members_leaves_valid_json_wherever_they_are() {
    for (body, expected) in [
        (r#"{"api_key":1, "model":"m"}"#, r#"{"model":"m"}"#),
        (
            r#"{"model":"m", "api_key":1 , "base_url":2 }"#,
            r#"{"model":"m" }"#,
        ),
        (
            r#"{"model":"m","api_key":1,"n":2,"base_url":3}"#,
            r#"{"model":"m","n":2}"#,
        ),
    ] {
        let body = Bytes::from(body);
        assert_eq!(
            std::str::from_utf8(&without_members(&body, &FOREIGN_UPSTREAM_FIELDS)).unwrap(),
            expected
        );
    }
}

#[test]
fn refuses_numbers_out_of_range_and_deep_nesting() {
    for body in [
        r#"{"model":"m","api_key":"k","temperature":1e999}"#.to_string(),
        r#"{"model":"m","x":-1E400}"#.to_string(),
        format!(r#"{{"model":"m","x":{}}}"#, "9".repeat(400)),
        format!(
            r#"{{"model":"m","messages":{}1{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        ),
    ] {
        let err = RequestFields::parse(body.as_bytes()).unwrap_err();
        assert_eq!((err.status, err.code), (400, "invalid_json"), "{body}");
    }
    let ok = format!(
        r#"{{"model":"m","x":[1e300,-2.5E-10,"1e999 \" {{[",{}0{}]}}"#,
        "[".repeat(MAX_JSON_DEPTH - 2),
        "]".repeat(MAX_JSON_DEPTH - 2)
    );
    assert!(RequestFields::parse(ok.as_bytes()).is_ok(), "{ok}");
}

#[test]
fn jobs_run_without_streaming_fields_and_nothing_else_changes() {
    let body = Bytes::from_static(
            br#"{"stream":true,"model":"m","n":12345678901234567890,"stream_options":{"include_usage":true}}"#,
        );
    assert_eq!(
        &without_streaming(&body)[..],
        br#"{"model":"m","n":12345678901234567890}"#
    );
    let plain = Bytes::from_static(br#"{"model":"m"}"#);
    assert_eq!(without_streaming(&plain).as_ptr(), plain.as_ptr());
}

#[test]
fn rewrite_asks_for_usage_without_touching_the_rest() {
    let body = Bytes::from_static(br#"{"model":"m","stream":true,"messages":[]}"#);
    let fields = RequestFields::parse(&body).unwrap();
    assert!(!fields.client_wants_usage());
    let out = rewrite_body(&body, &fields, "p", true);
    let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        value,
        serde_json::json!({"model": "p", "stream": true, "messages": [], "stream_options": {"include_usage": true}})
    );

    let body = Bytes::from_static(
        br#"{"stream_options":{"include_usage":false,"x":1},"model":"m","stream":true}"#,
    );
    let fields = RequestFields::parse(&body).unwrap();
    let out = rewrite_body(&body, &fields, "m", true);
    let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        value["stream_options"],
        serde_json::json!({"include_usage": true, "x": 1})
    );

    let body = Bytes::from_static(
        br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
    );
    assert!(RequestFields::parse(&body).unwrap().client_wants_usage());
    let err = RequestFields::parse(br#"{"model":"m","stream_options":{"include_usage":"yes"}}"#)
        .unwrap_err();
    assert_eq!(err.param.as_deref(), Some("stream_options"));
}

#[test]
fn error_body_has_the_openai_shape() {
    let body: serde_json::Value =
        serde_json::from_slice(&ApiError::missing_model().body()).unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "missing_model");
    assert_eq!(body["error"]["param"], "model");
    assert!(body["error"]["message"].is_string());
}

#[test]
fn recognises_a_prompt_too_long_by_code_or_by_message() {
    assert!(is_context_length_error(
        br#"{"error":{"message":"too long","type":"invalid_request_error","code":"context_length_exceeded"}}"#
    ));
    assert!(is_context_length_error(
        br#"{"error":{"message":"This model's maximum context length is 4096 tokens. However, you requested 5000 tokens.","type":"BadRequestError","code":400}}"#
    ));
    assert!(!is_context_length_error(
        br#"{"error":{"message":"Your request was rejected by the safety system.","code":"content_policy_violation"}}"#
    ));
}

#[test]
fn tells_whose_fault_an_in_band_error_was() {
    let cases: &[(&str, u16)] = &[
        // OpenAI's own, mid-stream.
        (
            r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}"#,
            500,
        ),
        (
            r#"{"error":{"message":"too long","type":"invalid_request_error","code":"context_length_exceeded"}}"#,
            400,
        ),
        (
            r#"{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}"#,
            429,
        ),
        // vLLM, nested and flat.
        (
            r#"{"error":{"object":"error","message":"boom","type":"InternalServerError","code":500}}"#,
            500,
        ),
        (
            r#"{"object":"error","message":"bad","type":"BadRequestError","param":null,"code":400}"#,
            400,
        ),
        // Gemini's OpenAI layer: the number wins over the class.
        (
            r#"{"error":{"code":503,"message":"overloaded","status":"UNAVAILABLE"}}"#,
            503,
        ),
        (
            r#"{"error":{"message":"bad","status":"INVALID_ARGUMENT"}}"#,
            400,
        ),
        (r#"{"error":{"code":"429","message":"quota"}}"#, 429),
        // Responses: the error event, and response.failed's error.
        (
            r#"{"type":"error","code":"ERR_SOMETHING","message":"Something went wrong","param":null,"sequence_number":3}"#,
            500,
        ),
        (
            r#"{"type":"response.failed","response":{"id":"resp_1","status":"failed","error":{"code":"server_error","message":"x"}}}"#,
            500,
        ),
        (
            r#"{"type":"response.failed","response":{"id":"resp_1","status":"failed","error":{"code":"invalid_prompt","message":"x"}}}"#,
            400,
        ),
        (
            r#"{"type":"response.failed","response":{"id":"resp_1","status":"failed","error":{"code":"failed_to_download_image","message":"x"}}}"#,
            400,
        ),
        (
            r#"{"type":"response.failed","response":{"id":"resp_1","status":"failed","error":{"code":"vector_store_timeout","message":"x"}}}"#,
            500,
        ),
        // TGI: the message in `error`, the class in `error_type`.
        (
            r#"{"error":"Input validation error: `inputs` must be <= 4096","error_type":"validation"}"#,
            400,
        ),
        (
            r#"{"error":"Model is overloaded","error_type":"overloaded"}"#,
            500,
        ),
        // A prompt too long said only in words.
        (
            r#"{"error":{"message":"This model's maximum context length is 4096 tokens. However, you requested 9000 tokens."}}"#,
            400,
        ),
        // A request's fault whose code names a server or a timeout.
        (
            r#"{"error":{"type":"invalid_request_error","code":"invalid_mcp_server_url","message":"x"}}"#,
            400,
        ),
        (
            r#"{"error":{"type":"invalid_request_error","code":"image_download_timeout","message":"x"}}"#,
            400,
        ),
        // The gateway's key refused, in words.
        (
            r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","code":"invalid_api_key"}}"#,
            401,
        ),
        (
            r#"{"error":{"code":403,"message":"denied","status":"PERMISSION_DENIED"}}"#,
            403,
        ),
        // A number out of range is passed over for the next.
        (r#"{"error":{"code":200,"status":429,"message":"x"}}"#, 429),
        // Nothing said, or not said in JSON: the provider's.
        (r#"{"error":"something broke"}"#, 500),
        (r#"{"error":{"message":"?","code":200}}"#, 500),
        ("not json", 500),
    ];
    for (event, status) in cases {
        // The gateway's own error for a provider failure is a 502.
        let status = if *status >= 500 { 502 } else { *status };
        assert_eq!(
            ApiError::from_in_band(event.as_bytes()).status,
            status,
            "{event}"
        );
    }
}

#[test]
fn an_in_band_error_becomes_the_gateways_error_of_its_status() {
    let refused = ApiError::from_in_band(
        br#"{"object":"error","message":"bad image","type":"BadRequestError","code":422}"#,
    );
    assert_eq!((refused.status, refused.code), (422, "invalid_request"));
    assert_eq!(&*refused.message, "bad image");
    let too_long = ApiError::from_in_band(
        br#"{"error":{"message":"too long","type":"invalid_request_error","code":"context_length_exceeded"}}"#,
    );
    assert_eq!(
        (too_long.status, too_long.code),
        (400, "context_length_exceeded")
    );
    let limited =
        ApiError::from_in_band(br#"{"error":{"message":"slow","code":"rate_limit_exceeded"}}"#);
    assert_eq!((limited.status, limited.reason()), (429, "provider_429"));
    let failed = ApiError::from_in_band(b"not json");
    assert_eq!((failed.status, failed.reason()), (502, "provider_5xx"));
    assert!(!failed.message.is_empty());
    // A prompt too long said only in words is said as OpenAI says it.
    let in_words = ApiError::from_in_band(
        br#"{"error":{"message":"This model's maximum context length is 4096 tokens."}}"#,
    );
    assert_eq!(
        (in_words.status, in_words.code),
        (400, "context_length_exceeded")
    );
}

#[test]
fn reads_the_responses_background_flag_as_a_boolean() {
    let fields = RequestFields::parse(br#"{"model":"m","input":"hi","background":true}"#).unwrap();
    assert!(fields.background);
    let fields = RequestFields::parse(br#"{"model":"m","background":null}"#).unwrap();
    assert!(!fields.background);
    let err = RequestFields::parse(br#"{"model":"m","background":"yes"}"#).unwrap_err();
    assert_eq!(
        (err.status, err.param.as_deref()),
        (400, Some("background"))
    );
}

#[test]
fn a_field_the_gateway_reads_given_twice_is_refused_by_name() {
    for (body, param) in [
        (&br#"{"model":"m","n":1,"n":2}"#[..], "n"),
        (
            br#"{"model":"tts-1","input":"long text","input":""}"#,
            "input",
        ),
        (br#"{"model":"a","model":"b"}"#, "model"),
    ] {
        let err = RequestFields::parse(body).unwrap_err();
        assert_eq!((err.status, err.param.as_deref()), (400, Some(param)));
    }
}

#[test]
fn a_default_model_takes_the_place_of_a_null_one() {
    let body = Bytes::from_static(br#"{"model":null,"input":"hi"}"#);
    let with = with_model(&body, "omni-moderation-latest").unwrap();
    let fields = RequestFields::parse(&with).unwrap();
    assert_eq!(fields.model, "omni-moderation-latest");
    let body = Bytes::from_static(br#"{"input":"hi"}"#);
    let with = with_model(&body, "m").unwrap();
    assert_eq!(&with[..], br#"{"model":"m","input":"hi"}"#);
}

#[test]
fn the_tier_a_request_asks_for_is_read_as_openai_names_it() {
    use crate::cost::ServiceTier;
    let tier = |body: &str| {
        let fields = RequestFields::parse(body.as_bytes()).unwrap();
        (
            fields.service_tier.map(str::to_owned),
            fields.requested_tier(),
        )
    };
    assert_eq!(tier(r#"{"model":"m"}"#), (None, None));
    assert_eq!(tier(r#"{"model":"m","service_tier":null}"#), (None, None));
    assert_eq!(
        tier(r#"{"model":"m","service_tier":"auto"}"#),
        (Some(r#""auto""#.into()), None)
    );
    assert_eq!(
        tier(r#"{"model":"m","service_tier":"fast"}"#).1,
        Some(ServiceTier::Priority)
    );
    assert_eq!(
        tier(r#"{"model":"m","service_tier":"fl\u0065x"}"#).1,
        Some(ServiceTier::Flex)
    );
    assert_eq!(tier(r#"{"model":"m","service_tier":7}"#).1, None);
    // Given twice, it could be billed at one and served at the other.
    let err =
        RequestFields::parse(br#"{"model":"m","service_tier":"flex","service_tier":"priority"}"#)
            .unwrap_err();
    assert_eq!(err.param.as_deref(), Some("service_tier"), "{err:?}");
}
