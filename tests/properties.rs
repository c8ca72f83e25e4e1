//! Issue 9: properties of the parsers that read untrusted bytes (the SSE
//! meter, request-field extraction, the Anthropic translation, config
//! loading), checked with proptest on the stable toolchain. The same four
//! have cargo-fuzz targets in fuzz/ for longer, coverage-guided runs.

use bytes::Bytes;
use proptest::prelude::*;
use runestone::config::Config;
use runestone::cost::StreamMeter;
use runestone::openai::{rewrite_body, RequestFields};
use runestone::providers::anthropic::{to_messages_request, StreamTranslator};
use serde_json::{json, Value};

/// `data` cut at `cuts` (positions taken modulo its length), in order.
fn split(data: &[u8], cuts: &[usize]) -> Vec<Bytes> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    at.sort_unstable();
    at.dedup();
    let mut pieces = Vec::new();
    let mut start = 0;
    for end in at.into_iter().chain([data.len()]) {
        pieces.push(Bytes::copy_from_slice(&data[start..end]));
        start = end;
    }
    pieces
}

/// An OpenAI chat stream of `tokens`, with a final usage chunk.
fn openai_stream(tokens: &[String], prompt: u64) -> Vec<u8> {
    let mut out = String::new();
    for t in tokens {
        let chunk = json!({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": t}}], "usage": null});
        out += &format!("data: {chunk}\n\n");
    }
    let usage = json!({"id": "c", "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": tokens.len(), "total_tokens": prompt + tokens.len() as u64}});
    out += &format!("data: {usage}\n\ndata: [DONE]\n\n");
    out.into_bytes()
}

/// An Anthropic Messages stream of `tokens`.
fn anthropic_stream(tokens: &[String], input: u64) -> Vec<u8> {
    let mut events = vec![
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_1", "model": "claude", "usage": {"input_tokens": input, "output_tokens": 0}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    for t in tokens {
        events.push(("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}})));
    }
    events.push((
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": tokens.len()}})));
    events.push(("message_stop", json!({"type": "message_stop"})));
    events
        .into_iter()
        .map(|(kind, data)| format!("event: {kind}\ndata: {data}\n\n"))
        .collect::<String>()
        .into_bytes()
}

/// Text with the `"created":<seconds>` values blanked (they come from the clock).
fn without_created(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    let mut rest = text.as_ref();
    while let Some(at) = rest.find("\"created\":") {
        out += &rest[..at + 10];
        rest = rest[at + 10..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out + rest
}

fn token() -> impl Strategy<Value = String> {
    any::<String>().prop_map(|s| s.chars().take(12).collect())
}

proptest! {
    // 256 cases each (PROPTEST_CASES for more). Failures print their
    // minimal input; nothing is written beside the tests.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// However the provider's bytes are cut into chunks, the meter sends the
    /// same bytes and reads the same usage.
    #[test]
    fn the_sse_meter_does_not_depend_on_chunk_boundaries(
        tokens in prop::collection::vec(token(), 0..20),
        prompt in 0u64..100_000,
        cuts in prop::collection::vec(any::<usize>(), 0..30),
        strip in any::<bool>(),
    ) {
        let stream = openai_stream(&tokens, prompt);
        let run = |pieces: Vec<Bytes>| {
            let mut meter = StreamMeter::new(strip);
            let mut out = Vec::new();
            for piece in pieces {
                out.extend_from_slice(&meter.feed(piece));
            }
            out.extend_from_slice(&meter.finish());
            (out, meter.usage(0))
        };
        let whole = run(vec![Bytes::from(stream.clone())]);
        let cut = run(split(&stream, &cuts));
        prop_assert_eq!(&whole, &cut);
        prop_assert_eq!(whole.1.prompt_tokens, prompt);
        prop_assert_eq!(whole.1.completion_tokens, tokens.len() as u64);
        prop_assert!(!whole.1.estimated);
        if !strip {
            prop_assert_eq!(&whole.0, &stream, "without stripping the stream passes untouched");
        }
    }

    /// Arbitrary bytes never panic the meter, and what it holds stays bounded.
    #[test]
    fn the_sse_meter_survives_any_bytes(
        data in prop::collection::vec(any::<u8>(), 0..4096),
        cuts in prop::collection::vec(any::<usize>(), 0..10),
        strip in any::<bool>(),
    ) {
        let mut meter = StreamMeter::new(strip);
        let mut sent = 0;
        for piece in split(&data, &cuts) {
            sent += meter.feed(piece).len();
        }
        sent += meter.finish().len();
        prop_assert!(sent <= data.len() + 64);
        let usage = meter.usage(7);
        prop_assert!(usage.prompt_tokens <= 10_000_000 && usage.completion_tokens <= 10_000_000);
    }

    /// Any bytes: a parse result or an error, never a panic; a body that is
    /// not UTF-8 is always refused.
    #[test]
    fn request_fields_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
        let parsed = RequestFields::parse(&data);
        if std::str::from_utf8(&data).is_err() {
            prop_assert!(parsed.is_err());
        }
    }

    /// A well-formed body: the model is read, and rewriting it for a provider
    /// changes the model (and adds stream_options when asked) and nothing else.
    #[test]
    fn rewriting_changes_only_the_model(
        model in any::<String>(),
        provider_model in any::<String>(),
        content in any::<String>(),
        max_tokens in prop::option::of(0u64..100_000),
        stream in any::<bool>(),
    ) {
        prop_assume!(!model.trim().is_empty(), "a blank model is refused, tested elsewhere");
        let mut original = json!({"model": model, "messages": [{"role": "user", "content": content}], "stream": stream});
        if let Some(n) = max_tokens {
            original["max_tokens"] = json!(n);
        }
        let body = Bytes::from(serde_json::to_vec(&original).unwrap());
        let fields = RequestFields::parse(&body).unwrap();
        prop_assert_eq!(fields.model.as_ref(), model.as_str());
        prop_assert_eq!(fields.stream, stream);
        prop_assert_eq!(fields.max_tokens, max_tokens);
        let rewritten: Value = serde_json::from_slice(&rewrite_body(&body, &fields, &provider_model, stream)).unwrap();
        let mut expected = original.clone();
        expected["model"] = json!(provider_model);
        if stream {
            expected["stream_options"] = json!({"include_usage": true});
        }
        prop_assert_eq!(rewritten, expected);
    }

    /// However an Anthropic stream is cut, the translation is the same, and
    /// its usage is the stream's own.
    #[test]
    fn the_anthropic_translation_does_not_depend_on_chunk_boundaries(
        tokens in prop::collection::vec(token(), 0..20),
        input in 0u64..100_000,
        cuts in prop::collection::vec(any::<usize>(), 0..30),
        include_usage in any::<bool>(),
    ) {
        let stream = anthropic_stream(&tokens, input);
        let run = |pieces: Vec<Bytes>| {
            let mut translator = StreamTranslator::new("gpt-4o-mini", include_usage);
            let mut out = Vec::new();
            for piece in pieces {
                out.extend_from_slice(&translator.feed(&piece));
            }
            (without_created(&out), translator.usage(), translator.finished())
        };
        let whole = run(vec![Bytes::from(stream.clone())]);
        let cut = run(split(&stream, &cuts));
        prop_assert_eq!(&whole, &cut);
        let usage = whole.1.expect("usage read");
        prop_assert_eq!(usage.prompt_tokens, input);
        prop_assert_eq!(usage.completion_tokens, tokens.len() as u64);
        prop_assert!(whole.2, "message_stop ends the stream");
    }

    /// Any request body: an Anthropic request or an OpenAI-shaped error.
    #[test]
    fn the_anthropic_request_translation_never_panics(
        data in prop::collection::vec(any::<u8>(), 0..512),
        messages in prop::collection::vec((prop::sample::select(vec!["system", "user", "assistant", "tool", "x"]), any::<String>()), 0..6),
    ) {
        let _ = to_messages_request(&data, "claude");
        let body = json!({"model": "m", "messages": messages.iter().map(|(r, c)| json!({"role": r, "content": c})).collect::<Vec<_>>()});
        match to_messages_request(&serde_json::to_vec(&body).unwrap(), "claude") {
            Ok(out) => { serde_json::from_slice::<Value>(&out).unwrap(); }
            Err(e) => prop_assert_eq!(e.status, 400),
        }
    }

    /// Any text as a config file: problems listed, never a panic.
    #[test]
    fn config_loading_never_panics(text in any::<String>()) {
        let _ = Config::from_yaml(&text, |_| None);
    }

    /// Config-shaped YAML with arbitrary values: a config or a list of
    /// problems, each naming where it is.
    #[test]
    fn config_problems_name_their_place(
        listen in any::<String>(),
        threads in any::<i64>(),
        base_url in any::<String>(),
        rpm in any::<i64>(),
    ) {
        let text = format!(
            "server: {{ listen: {listen:?}, threads: {threads} }}\nproviders: [{{ name: p, base_url: {base_url:?} }}]\nmodels: [{{ name: m, targets: [{{ provider: p }}] }}]\ntenants: [{{ id: t, keys: [k-0123456789abcdef], limits: {{ requests_per_minute: {rpm} }} }}]\n"
        );
        if let Err(problems) = Config::from_yaml(&text, |_| None) {
            prop_assert!(!problems.is_empty());
        }
    }
}
