//! Token usage and what it costs.
//!
//! Usage is read from the provider's answer on its way to the client:
//! [`usage_from_json`] for JSON bodies, [`StreamMeter`] for SSE streams, fed
//! chunk by chunk (chunks do not align with events, so it keeps the partial
//! last line). When the gateway asked the provider for
//! `stream_options.include_usage` on the client's behalf, the meter removes
//! the usage chunk and the `"usage":null` fields again, so the client sees
//! what the provider would have sent it.
//!
//! When the provider reports no usage (some OpenAI-compatible servers ignore
//! `include_usage`) or the answer breaks off, the gateway estimates, never
//! counts nothing: prompt tokens = request body bytes / 4, completion tokens =
//! bytes of generated text (content, text, tool-call arguments) / 4, both
//! rounded up. Four bytes per token is the usual rule of thumb for English.

use crate::config::Price;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Upper bound on any one usage number a provider reports; larger (absurd)
/// numbers are treated as missing so they cannot corrupt accounting.
pub const MAX_REPORTED_TOKENS: u64 = 100_000_000;

/// Completion tokens reserved at admission when the request sets neither
/// `max_tokens` nor `max_completion_tokens`.
pub const DEFAULT_COMPLETION_ESTIMATE: u64 = 1024;

/// Longest SSE line the meter holds while waiting for its end; a provider
/// sending an endless line cannot make the gateway buffer it.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

/// Non-streamed bodies are kept for usage parsing up to this size; past it
/// the gateway estimates.
pub const MAX_METERED_JSON_BYTES: usize = 16 * 1024 * 1024;

/// Tokens used by one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens, cached ones included.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Prompt tokens served from the provider's cache.
    pub cached_tokens: u64,
    /// Whether the numbers are the gateway's estimate rather than the provider's.
    pub estimated: bool,
}

impl Usage {
    /// The cost in pico-dollars at `price` (zero without a price).
    pub fn cost_pusd(&self, price: Option<&Price>) -> i64 {
        let Some(price) = price else { return 0 };
        let cached = self.cached_tokens.min(self.prompt_tokens);
        let uncached = self.prompt_tokens - cached;
        let tokens = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        tokens(uncached)
            .saturating_mul(price.input)
            .saturating_add(tokens(cached).saturating_mul(price.cached_input))
            .saturating_add(tokens(self.completion_tokens).saturating_mul(price.output))
    }

    /// All tokens.
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// Prompt tokens estimated from the request body's size.
pub fn estimate_prompt_tokens(body_len: usize) -> u64 {
    (body_len as u64).div_ceil(4).max(1)
}

/// Tokens reserved at admission: the prompt estimate plus the completion
/// budget the request asks for (or [`DEFAULT_COMPLETION_ESTIMATE`]).
pub fn estimate_request_tokens(body_len: usize, max_tokens: Option<u64>, generates: bool) -> u64 {
    let completion = if generates {
        max_tokens
            .unwrap_or(DEFAULT_COMPLETION_ESTIMATE)
            .min(MAX_REPORTED_TOKENS)
    } else {
        0
    };
    estimate_prompt_tokens(body_len) + completion
}

#[derive(Deserialize)]
struct UsageWire {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl UsageWire {
    fn into_usage(self) -> Option<Usage> {
        let prompt = self.prompt_tokens.unwrap_or(0);
        let completion = self.completion_tokens.unwrap_or(0);
        let cached = self
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0);
        if prompt > MAX_REPORTED_TOKENS || completion > MAX_REPORTED_TOKENS || cached > prompt {
            return None;
        }
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: cached,
            estimated: false,
        })
    }
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    choices: Option<Vec<ChoiceProbe<'a>>>,
    /// Kept raw: a malformed `usage` must not hide the generated text.
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChoiceProbe<'a> {
    #[serde(borrow, default)]
    delta: Option<MessageProbe<'a>>,
    #[serde(borrow, default)]
    message: Option<MessageProbe<'a>>,
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct MessageProbe<'a> {
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tool_calls: Option<&'a RawValue>,
    #[serde(borrow, default)]
    function_call: Option<&'a RawValue>,
}

impl Probe<'_> {
    /// Bytes of generated text in this object (quotes and escapes included:
    /// close enough for an estimate).
    fn generated_bytes(&self) -> u64 {
        let raw_len = |v: &Option<&RawValue>| {
            v.map_or(0, |v| {
                if v.get() == "null" {
                    0
                } else {
                    v.get().len() as u64
                }
            })
        };
        self.choices.iter().flatten().fold(0, |sum, c| {
            let message = c.delta.as_ref().or(c.message.as_ref());
            sum + raw_len(&c.text)
                + message.map_or(0, |m| {
                    raw_len(&m.content) + raw_len(&m.tool_calls) + raw_len(&m.function_call)
                })
        })
    }

    fn usage(&self) -> Option<Usage> {
        reported_usage(self.usage?)
    }
}

/// A `usage` value as the provider reported it; `None` unless it is an
/// object with sane numbers (serde would also read a struct from an array,
/// field by field).
fn reported_usage(raw: &RawValue) -> Option<Usage> {
    let raw = raw.get();
    if !raw.starts_with('{') {
        return None;
    }
    serde_json::from_str::<UsageWire>(raw).ok()?.into_usage()
}

/// Usage from a complete JSON response body; estimated from the generated
/// text (and `prompt_estimate`) when the provider sent none.
pub fn usage_from_json(body: &[u8], prompt_estimate: u64) -> Usage {
    // The common case first: a body with `usage`, everything else skipped
    // unread. Only a body without it is probed for its generated text.
    #[derive(Deserialize)]
    struct UsageOnly<'a> {
        #[serde(borrow, default)]
        usage: Option<&'a RawValue>,
    }
    let reported = serde_json::from_slice::<UsageOnly>(body)
        .ok()
        .and_then(|o| reported_usage(o.usage?));
    if let Some(usage) = reported {
        return usage;
    }
    match serde_json::from_slice::<Probe>(body) {
        Ok(probe) => probe.usage().unwrap_or(Usage {
            prompt_tokens: prompt_estimate,
            completion_tokens: probe.generated_bytes().div_ceil(4),
            cached_tokens: 0,
            estimated: true,
        }),
        Err(_) => Usage {
            prompt_tokens: prompt_estimate,
            completion_tokens: (body.len() as u64).div_ceil(4),
            cached_tokens: 0,
            estimated: true,
        },
    }
}

/// Reads usage from an SSE stream on its way through, and optionally
/// removes what the gateway added (the usage chunk, `"usage":null` fields).
#[derive(Debug)]
pub struct StreamMeter {
    strip_usage: bool,
    partial: BytesMut,
    /// Inside a line longer than [`MAX_LINE_BYTES`]: pass it through.
    oversized: bool,
    skip_blank_line: bool,
    usage: Option<Usage>,
    generated_bytes: u64,
}

impl StreamMeter {
    /// A meter; `strip_usage` when the client did not ask for usage.
    pub fn new(strip_usage: bool) -> Self {
        StreamMeter {
            strip_usage,
            partial: BytesMut::new(),
            oversized: false,
            skip_blank_line: false,
            usage: None,
            generated_bytes: 0,
        }
    }

    /// Whether this meter removes what the gateway asked for.
    pub fn strips_usage(&self) -> bool {
        self.strip_usage
    }

    /// Takes one upstream chunk and returns what to send the client now.
    /// Without stripping that is the chunk itself, untouched; with it, the
    /// complete lines seen so far, edited.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        // The rest of a line too long to hold goes through unread.
        let mut passed = Bytes::new();
        let mut rest = chunk.clone();
        if self.oversized {
            match rest.iter().position(|&b| b == b'\n') {
                None => {
                    self.generated_bytes += rest.len() as u64;
                    return chunk;
                }
                Some(i) => {
                    self.generated_bytes += i as u64;
                    passed = rest.split_to(i + 1);
                    self.oversized = false;
                }
            }
        }
        if !self.strip_usage {
            self.meter_lines(&rest);
            self.release_oversized();
            return chunk;
        }
        self.partial.extend_from_slice(&rest);
        let mut out = BytesMut::with_capacity(passed.len() + rest.len());
        out.extend_from_slice(&passed);
        if let Some(last_newline) = self.partial.iter().rposition(|&b| b == b'\n') {
            let complete = self.partial.split_to(last_newline + 1).freeze();
            for line in complete.split_inclusive(|&b| b == b'\n') {
                self.edit_line(line, &mut out);
            }
        }
        out.extend_from_slice(&self.release_oversized());
        out.freeze()
    }

    /// A partial line past [`MAX_LINE_BYTES`] is not held any longer: it is
    /// counted as generated text and (in strip mode) sent on unedited.
    fn release_oversized(&mut self) -> Bytes {
        if self.partial.len() <= MAX_LINE_BYTES {
            return Bytes::new();
        }
        self.generated_bytes += self.partial.len() as u64;
        self.oversized = true;
        std::mem::take(&mut self.partial).freeze()
    }

    /// The end of the upstream body: whatever is left of a last line
    /// without a newline.
    pub fn finish(&mut self) -> Bytes {
        let rest = std::mem::take(&mut self.partial).freeze();
        if rest.is_empty() {
            return rest;
        }
        if self.strip_usage {
            let mut out = BytesMut::new();
            self.edit_line(&rest, &mut out);
            out.freeze()
        } else {
            self.observe(&rest);
            Bytes::new()
        }
    }

    /// The usage the provider reported, or an estimate from what streamed
    /// through (`prompt_estimate` for the prompt side).
    pub fn usage(&self, prompt_estimate: u64) -> Usage {
        self.usage.unwrap_or(Usage {
            prompt_tokens: prompt_estimate,
            completion_tokens: self.generated_bytes.div_ceil(4),
            cached_tokens: 0,
            estimated: true,
        })
    }

    /// Pass-through mode: meter complete lines, keep the partial tail.
    fn meter_lines(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        if !self.partial.is_empty() {
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.partial.extend_from_slice(&rest[..=i]);
                    let line = std::mem::take(&mut self.partial);
                    self.observe(&line);
                    rest = &rest[i + 1..];
                }
                None => {
                    self.partial.extend_from_slice(rest);
                    return;
                }
            }
        }
        let complete_end = rest.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        for line in rest[..complete_end].split_inclusive(|&b| b == b'\n') {
            self.observe(line);
        }
        self.partial.extend_from_slice(&rest[complete_end..]);
    }

    /// Meters one line; returns whether it is a usage-only chunk.
    fn observe(&mut self, line: &[u8]) -> bool {
        let Some(payload) = data_payload(line) else {
            return false;
        };
        if payload == b"[DONE]" {
            return false;
        }
        let Ok(probe) = serde_json::from_slice::<Probe>(payload) else {
            return false;
        };
        self.generated_bytes += probe.generated_bytes();
        match probe.usage() {
            Some(usage) => {
                self.usage = Some(usage);
                probe.choices.as_ref().is_none_or(|c| c.is_empty())
            }
            None => false,
        }
    }

    /// Strip mode: meter the line and write it, edited, unless it is the
    /// usage chunk the gateway asked for.
    fn edit_line(&mut self, line: &[u8], out: &mut BytesMut) {
        let is_blank = line.iter().all(|b| b.is_ascii_whitespace());
        if is_blank && std::mem::take(&mut self.skip_blank_line) {
            return;
        }
        if self.observe(line) {
            self.skip_blank_line = true;
            return;
        }
        let usage_null = data_payload(line).and_then(|payload| {
            let offset = payload.as_ptr() as usize - line.as_ptr() as usize;
            find_usage_null(payload).map(|(start, end)| (offset + start, offset + end))
        });
        match usage_null {
            Some((start, end)) => {
                out.extend_from_slice(&line[..start]);
                out.extend_from_slice(&line[end..]);
            }
            None => out.extend_from_slice(line),
        }
    }
}

fn trailing_newline_len(line: &[u8]) -> usize {
    match line {
        [.., b'\r', b'\n'] => 2,
        [.., b'\n'] => 1,
        _ => 0,
    }
}

/// The payload of a `data:` line, without the newline.
fn data_payload(line: &[u8]) -> Option<&[u8]> {
    let line = &line[..line.len() - trailing_newline_len(line)];
    let payload = line.strip_prefix(b"data:")?;
    Some(payload.strip_prefix(b" ").unwrap_or(payload))
}

/// The span of a `"usage":null` member (with one adjoining comma) in a
/// compact or lightly spaced JSON object.
fn find_usage_null(payload: &[u8]) -> Option<(usize, usize)> {
    const PATTERNS: [&[u8]; 4] = [
        b",\"usage\":null",
        b", \"usage\": null",
        b"\"usage\":null,",
        b"\"usage\": null, ",
    ];
    PATTERNS.iter().find_map(|p| {
        payload
            .windows(p.len())
            .position(|w| w == *p)
            .map(|start| (start, start + p.len()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRICE: Price = Price {
        input: 150_000,
        output: 600_000,
        cached_input: 75_000,
    };

    fn stream_events(include_usage_nulls: bool) -> Vec<String> {
        let null = if include_usage_nulls {
            ",\"usage\":null"
        } else {
            ""
        };
        vec![
            format!("data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}}}}]{null}}}\n\n"),
            format!("data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"Hello there\"}}}}]{null}}}\n\n"),
            format!("data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]{null}}}\n\n"),
        ]
    }

    const USAGE_EVENT: &str = "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3,\"total_tokens\":15,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n";

    fn run(meter: &mut StreamMeter, text: &str, chunk_size: usize) -> String {
        let mut out = Vec::new();
        for piece in text.as_bytes().chunks(chunk_size) {
            out.extend_from_slice(&meter.feed(Bytes::copy_from_slice(piece)));
        }
        out.extend_from_slice(&meter.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn costs_cached_and_uncached_tokens_exactly() {
        let usage = Usage {
            prompt_tokens: 1000,
            completion_tokens: 500,
            cached_tokens: 400,
            estimated: false,
        };
        // 600 * 0.15/1M + 400 * 0.075/1M + 500 * 0.60/1M USD = 0.00042 USD
        assert_eq!(usage.cost_pusd(Some(&PRICE)), 420_000_000);
        assert_eq!(usage.cost_pusd(None), 0);
    }

    #[test]
    fn reads_usage_from_json() {
        let body = br#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#;
        assert_eq!(
            usage_from_json(body, 99),
            Usage {
                prompt_tokens: 7,
                completion_tokens: 2,
                cached_tokens: 0,
                estimated: false
            }
        );
    }

    #[test]
    fn estimates_json_without_usage() {
        let body = br#"{"choices":[{"message":{"content":"12345678"}}]}"#;
        let usage = usage_from_json(body, 50);
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.estimated
            ),
            (50, 3, true)
        );
    }

    #[test]
    fn rejects_absurd_or_negative_usage() {
        let body = br#"{"choices":[],"usage":{"prompt_tokens":-5,"completion_tokens":2}}"#;
        assert!(usage_from_json(body, 10).estimated);
        let body = br#"{"choices":[],"usage":{"prompt_tokens":1e30,"completion_tokens":2}}"#;
        assert!(usage_from_json(body, 10).estimated);
        let body =
            br#"{"choices":[],"usage":{"prompt_tokens":999999999999,"completion_tokens":2}}"#;
        assert!(usage_from_json(body, 10).estimated);
        // Not an object: serde would read [] as all-default (zero) usage.
        for usage in ["[]", "[100, 50]", "\"12\"", "null"] {
            let body = format!(r#"{{"choices":[],"usage":{usage}}}"#);
            assert!(usage_from_json(body.as_bytes(), 10).estimated, "{usage}");
        }
    }

    #[test]
    fn passes_a_stream_through_untouched_and_reads_its_usage() {
        let text = stream_events(true).concat() + USAGE_EVENT + "data: [DONE]\n\n";
        for chunk_size in [1, 7, 64, 4096] {
            let mut meter = StreamMeter::new(false);
            assert_eq!(
                run(&mut meter, &text, chunk_size),
                text,
                "chunk size {chunk_size}"
            );
            assert_eq!(
                meter.usage(1),
                Usage {
                    prompt_tokens: 12,
                    completion_tokens: 3,
                    cached_tokens: 4,
                    estimated: false
                }
            );
        }
    }

    #[test]
    fn strips_what_the_gateway_asked_for_at_any_chunking() {
        let upstream = stream_events(true).concat() + USAGE_EVENT + "data: [DONE]\n\n";
        let expected = stream_events(false).concat() + "data: [DONE]\n\n";
        for chunk_size in [1, 3, 50, 4096] {
            let mut meter = StreamMeter::new(true);
            assert_eq!(
                run(&mut meter, &upstream, chunk_size),
                expected,
                "chunk size {chunk_size}"
            );
            assert_eq!(meter.usage(1).completion_tokens, 3);
        }
    }

    #[test]
    fn estimates_a_stream_without_usage() {
        let text = stream_events(false).concat() + "data: [DONE]\n\n";
        let mut meter = StreamMeter::new(true);
        assert_eq!(run(&mut meter, &text, 10), text);
        let usage = meter.usage(40);
        // "\"\"" (2 bytes) + "\"Hello there\"" (13 bytes) = 15 bytes -> 4 tokens
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.estimated
            ),
            (40, 4, true)
        );
    }

    #[test]
    fn estimates_a_stream_cut_mid_line() {
        let text = stream_events(false).concat();
        let cut = &text[..text.len() - 30];
        let mut meter = StreamMeter::new(false);
        run(&mut meter, cut, 16);
        assert!(meter.usage(5).estimated);
        assert_eq!(meter.usage(5).completion_tokens, 4);
    }

    #[test]
    fn does_not_hold_an_endless_line() {
        for strip in [false, true] {
            let mut meter = StreamMeter::new(strip);
            let mut out = 0;
            let piece = Bytes::from(vec![b'x'; 64 * 1024]);
            for _ in 0..40 {
                out += meter.feed(piece.clone()).len();
                assert!(
                    meter.partial.len() <= MAX_LINE_BYTES + piece.len(),
                    "strip {strip}"
                );
            }
            // The giant line ends; normal events after it are still metered.
            out += meter.feed(Bytes::from_static(b"\n\n")).len();
            let tail = stream_events(false).concat();
            out += meter.feed(Bytes::from(tail.clone())).len();
            assert_eq!(
                out,
                40 * piece.len() + 2 + tail.len(),
                "everything went through, strip {strip}"
            );
            assert!(meter.usage(1).completion_tokens >= 40 * piece.len() as u64 / 4);
        }
    }

    #[test]
    fn handles_crlf_lines() {
        let upstream =
            stream_events(true).concat().replace('\n', "\r\n") + &USAGE_EVENT.replace('\n', "\r\n");
        let mut meter = StreamMeter::new(true);
        let out = run(&mut meter, &upstream, 5);
        assert_eq!(out, stream_events(false).concat().replace('\n', "\r\n"));
        assert!(!meter.usage(1).estimated);
    }

    #[test]
    fn estimates_requests() {
        assert_eq!(estimate_request_tokens(400, Some(50), true), 150);
        assert_eq!(
            estimate_request_tokens(400, None, true),
            100 + DEFAULT_COMPLETION_ESTIMATE
        );
        assert_eq!(estimate_request_tokens(400, Some(50), false), 100);
        assert_eq!(estimate_request_tokens(0, None, false), 1);
    }
}
