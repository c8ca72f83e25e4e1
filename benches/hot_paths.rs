//! Micro-benchmarks of the functions on every request's path: key lookup,
//! request field extraction, admission (in-process and in Redis), a JSON
//! answer's usage, a cache hit (key and replay), SSE usage metering, and
//! the Anthropic translation (request, answer, stream).
//!
//! `cargo bench --bench hot_paths`; the Redis case runs when `redis-server`
//! is installed (it starts its own on a free port).

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use runestone::config::Config;
use runestone::cost::StreamMeter;
use runestone::limits::Limiter;
use runestone::openai::RequestFields;
use runestone::providers::anthropic;
use std::hint::black_box;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn config(redis_port: Option<u16>) -> Config {
    let tenants: String = (0..100)
        .map(|i| {
            format!(
                "  - id: t{i}\n    keys: [\"sk-bench-key-{i:04}\"]\n    limits: {{ requests_per_minute: 100000000, tokens_per_minute: 1000000000000, max_concurrent: 100000 }}\n"
            )
        })
        .collect();
    let redis = redis_port.map_or(String::new(), |p| {
        format!("redis: {{ url: \"redis://127.0.0.1:{p}/0\", timeout_ms: 200 }}\n")
    });
    let yaml = format!(
        "server: {{ listen: \"127.0.0.1:1\" }}\nproviders:\n  - {{ name: p, base_url: \"http://127.0.0.1:2/v1\" }}\nmodels:\n  - {{ name: m, targets: [{{ provider: p }}] }}\ntenants:\n{tenants}{redis}"
    );
    Config::from_yaml(&yaml, |_| None).expect("bench config is valid")
}

fn chat_body(content_bytes: usize) -> Bytes {
    let content = "x".repeat(content_bytes);
    Bytes::from(format!(
        r#"{{"messages":[{{"role":"system","content":"You are terse."}},{{"role":"user","content":"{content}"}}],"model":"m","stream":true,"max_tokens":256}}"#
    ))
}

fn stream_text(tokens: usize) -> Vec<Bytes> {
    let mut chunks = vec![Bytes::from_static(
        b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
    )];
    for i in 0..tokens {
        chunks.push(Bytes::from(format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}}}}],\"usage\":null}}\n\n"
        )));
    }
    chunks.push(Bytes::from_static(
        b"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":100,\"total_tokens\":110}}\n\ndata: [DONE]\n\n",
    ));
    chunks
}

fn key_lookup(c: &mut Criterion) {
    let config = config(None);
    let keys = runestone::auth::KeyIndex::new(&config.tenants);
    c.bench_function("auth/key_lookup (100 tenants)", |b| {
        b.iter(|| keys.authenticate(black_box("sk-bench-key-0042")))
    });
}

fn field_extraction(c: &mut Criterion) {
    for size in [1_000, 100_000] {
        let body = chat_body(size);
        c.bench_function(&format!("openai/request_fields ({size} B content)"), |b| {
            b.iter(|| RequestFields::parse(black_box(&body)).unwrap().max_tokens)
        });
    }
}

/// A chat completion as OpenAI writes it, `content_bytes` of text.
fn chat_answer(content_bytes: usize) -> Vec<u8> {
    let content = "word ".repeat(content_bytes / 5);
    format!(
        r#"{{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini-2024-07-18","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}","refusal":null,"annotations":[]}},"logprobs":null,"finish_reason":"stop"}}],"usage":{{"prompt_tokens":19,"completion_tokens":{},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":0,"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}},"service_tier":"default","system_fingerprint":"fp_1"}}"#,
        content_bytes / 5,
        19 + content_bytes / 5
    )
    .into_bytes()
}

fn json_usage(c: &mut Criterion) {
    for size in [100, 4_000] {
        let answer = chat_answer(size);
        c.bench_function(
            &format!("cost/usage of a JSON answer ({size} B content)"),
            |b| b.iter(|| runestone::cost::reported_usage_in_json(black_box(&answer))),
        );
    }
}

/// Masking the provider's key in a JSON answer that does not hold it (so
/// nearly every answer), its content English text of `size` bytes in
/// lines (`\n` escapes).
fn redaction(c: &mut Criterion) {
    // Made once, as the gateway does when it loads its config.
    let key = runestone::redact::RedactKey::new("sk-proj-AbCdEf0123456789");
    let text = "Sessions serve as a simple test of this system's costs.\\n";
    for size in [100, 4_000] {
        let answer = Bytes::from(format!(
            r#"{{"id":"chatcmpl-1","object":"chat.completion","choices":[{{"message":{{"role":"assistant","content":"{}"}}}}]}}"#,
            text.repeat(size / text.len() + 1)
        ));
        c.bench_function(
            &format!("redact/a JSON answer without the key ({size} B content)"),
            |b| {
                b.iter(|| {
                    let mut r = runestone::redact::Redactor::new(key.as_ref());
                    black_box(r.feed(black_box(answer.clone())))
                })
            },
        );
    }
    // A streamed token as OpenAI writes it: an id and a model with upper
    // case letters and dashes in every event.
    let event = Bytes::from_static(
        br#"data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n8KYM8AxLQsm","object":"chat.completion.chunk","created":1741569952,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_06737a9306","choices":[{"index":0,"delta":{"content":" Hello"},"logprobs":null,"finish_reason":null}]}

"#,
    );
    let mut r = runestone::redact::Redactor::new(key.as_ref());
    c.bench_function("redact/a streamed token's event", |b| {
        b.iter(|| black_box(r.feed(black_box(event.clone()))))
    });
}

/// A cache hit's work besides I/O: the request's key, and the stored
/// entry read and written out as the JSON answer (fresh id and created).
fn cache_hit(c: &mut Criterion) {
    let body = chat_body(100);
    c.bench_function("cache/key of a chat request (100 B content)", |b| {
        b.iter(|| runestone::cache::key::key("t0", "m", "chat", black_box(&body)))
    });
    for size in [100, 4_000] {
        let answer: serde_json::Value = serde_json::from_slice(&chat_answer(size)).unwrap();
        let entry = runestone::cache::Entry {
            stored_at_ms: 0,
            cost_pusd: 1,
            streamable: true,
            answer: serde_json::value::to_raw_value(&answer).unwrap(),
        };
        let stored = serde_json::to_vec(&entry).unwrap();
        c.bench_function(
            &format!("cache/hit replayed as JSON ({size} B content)"),
            |b| {
                b.iter(|| {
                    let entry: runestone::cache::Entry =
                        serde_json::from_slice(black_box(&stored)).unwrap();
                    runestone::cache::replay::render_json(&entry.answer, 1)
                })
            },
        );
    }
}

fn sse_metering(c: &mut Criterion) {
    let chunks = stream_text(100);
    for strip in [false, true] {
        let name = if strip {
            "cost/stream_meter strip usage (102 events)"
        } else {
            "cost/stream_meter pass-through (102 events)"
        };
        c.bench_function(name, |b| {
            b.iter_batched(
                || chunks.clone(),
                |chunks| {
                    let mut meter = StreamMeter::new(strip);
                    for chunk in chunks {
                        black_box(meter.feed(chunk));
                    }
                    meter.finish();
                    meter.usage(1)
                },
                BatchSize::SmallInput,
            )
        });
    }
}

/// An Anthropic Messages stream of `tokens` text deltas, as the provider
/// sends it.
fn anthropic_stream(tokens: usize) -> Vec<Bytes> {
    let mut chunks = vec![Bytes::from_static(
        b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    )];
    for i in 0..tokens {
        chunks.push(Bytes::from(format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"tok{i} \"}}}}\n\n"
        )));
    }
    chunks.push(Bytes::from_static(
        b"event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":100}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ));
    chunks
}

fn translation(c: &mut Criterion) {
    let request = br#"{"model":"m","max_tokens":256,"temperature":0.2,"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Summarise the quarterly report in three bullet points."},{"role":"assistant","content":"Revenue up, costs flat, churn down."},{"role":"user","content":"And the risks?"}]}"#;
    let answer = br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude","content":[{"type":"text","text":"Supply costs and a slower second half."}],"stop_reason":"end_turn","usage":{"input_tokens":42,"output_tokens":12}}"#;
    let stream = anthropic_stream(100);
    // The inputs are what the adapter accepts (else the figures would time
    // an early error).
    anthropic::to_messages_request(request, "claude").expect("a valid request");
    let estimate = runestone::cost::Estimate::new(Bytes::from_static(request), Some(256));
    anthropic::to_chat_completion(answer, "m", &estimate, "claude").expect("a valid answer");
    let mut translator = anthropic::StreamTranslator::new("m", true);
    for chunk in &stream {
        translator.feed(chunk);
    }
    assert!(translator.usage().is_some(), "the stream's usage is read");

    c.bench_function("anthropic/to_messages_request (4 messages)", |b| {
        b.iter(|| anthropic::to_messages_request(black_box(request), "claude"))
    });
    c.bench_function("anthropic/to_chat_completion", |b| {
        b.iter(|| anthropic::to_chat_completion(black_box(answer), "m", &estimate, "claude"))
    });
    c.bench_function("anthropic/stream translation (100 deltas)", |b| {
        b.iter_batched(
            || stream.clone(),
            |chunks| {
                let mut translator = anthropic::StreamTranslator::new("m", true);
                for chunk in chunks {
                    black_box(translator.feed(&chunk));
                }
                translator.usage()
            },
            BatchSize::SmallInput,
        )
    });
}

fn admission(c: &mut Criterion, name: &str, limiter: &Limiter) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let settlement = runestone::limits::Settlement {
        cache_saved_pusd: None,
        usage: runestone::cost::Usage {
            prompt_tokens: 100,
            completion_tokens: 100,
            cached_tokens: 0,
            estimated: false,
            ..Default::default()
        },
        cost_pusd: 1,
        duration: Duration::from_millis(10),
    };
    if let Some(redis) = limiter.redis() {
        // The gateway's maintenance service connects at start-up.
        runtime.block_on(redis.connect());
    }
    let mut tenant = 0;
    c.bench_function(name, |b| {
        b.to_async(&runtime).iter(|| {
            tenant = (tenant + 1) % 100;
            let limiter = limiter.clone();
            async move {
                let grant = limiter.admit(tenant, 300).await.expect("admitted");
                limiter.settle(grant, settlement).await;
            }
        })
    });
}

fn admission_in_process(c: &mut Criterion) {
    let limiter = Limiter::new(&config(None), None);
    admission(c, "limits/admit+settle in-process", &limiter);
}

struct RedisServer(Child);

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn admission_redis(c: &mut Criterion) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Ok(child) = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
    else {
        eprintln!("redis-server not found: skipping the Redis admission benchmark");
        return;
    };
    let _server = RedisServer(child);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let config = config(Some(port));
    let limiter = Limiter::new(
        &config,
        runestone::redis_conn::RedisConnection::for_config(&config),
    );
    admission(c, "limits/admit+settle redis (2 round trips)", &limiter);
}

criterion_group!(
    benches,
    key_lookup,
    field_extraction,
    json_usage,
    redaction,
    cache_hit,
    sse_metering,
    translation,
    admission_in_process,
    admission_redis
);
criterion_main!(benches);
