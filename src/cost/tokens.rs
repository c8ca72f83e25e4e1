//! Counting tokens when a provider reports none: OpenAI's own encodings
//! (o200k for the GPT-4o, GPT-4.1, GPT-5 and o-series families, cl100k for
//! GPT-4, GPT-3.5 and the embedding models), and cl100k as the closest
//! stand-in for other families (Llama, Mistral, Qwen: their tokenizers are
//! not shipped, and a real BPE is nearer their counts than bytes / 4).
//!
//! Counted: the prompt's text (messages' text, a completion prompt, an
//! embedding input) with the chat format's few tokens per message, and the
//! text the model generated (content, reasoning, tool-call arguments),
//! capped at the request's token limit. An encoding loads the first time
//! it is needed, off the runtime's threads ([`Encoding::ready`]): a
//! gateway whose providers always report usage never holds its tables
//! (about 70 MB for both).

use bytes::Bytes;
use serde_json::Value;
use std::sync::OnceLock;
use tiktoken_rs::CoreBPE;

/// Which encoding counts a model's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// GPT-4o, GPT-4.1, GPT-4.5, GPT-5, o1/o3/o4.
    O200k,
    /// GPT-4, GPT-3.5, the embedding models; the stand-in for the rest.
    Cl100k,
}

impl Encoding {
    /// The encoding for a model name (a provider's or a public one).
    pub fn for_model(model: &str) -> Encoding {
        let model = model.rsplit('/').next().unwrap_or(model).as_bytes();
        let o200k = [
            "gpt-4o",
            "gpt-4.1",
            "gpt-4.5",
            "gpt-5",
            "chatgpt-4o",
            "o1",
            "o3",
            "o4",
            "gpt-oss",
        ];
        // Read for every chunk of a stream: compared without a lowercase
        // copy.
        let starts_with = |prefix: &str| {
            model
                .get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
        };
        if o200k.iter().any(|prefix| starts_with(prefix)) {
            Encoding::O200k
        } else {
            Encoding::Cl100k
        }
    }

    fn table(self) -> &'static OnceLock<Option<CoreBPE>> {
        static O200K: OnceLock<Option<CoreBPE>> = OnceLock::new();
        static CL100K: OnceLock<Option<CoreBPE>> = OnceLock::new();
        match self {
            Encoding::O200k => &O200K,
            Encoding::Cl100k => &CL100K,
        }
    }

    fn bpe(self) -> Option<&'static CoreBPE> {
        self.table()
            .get_or_init(|| match self {
                Encoding::O200k => tiktoken_rs::o200k_base().ok(),
                Encoding::Cl100k => tiktoken_rs::cl100k_base().ok(),
            })
            .as_ref()
    }

    /// Whether the encoding's tables are in memory.
    pub fn loaded(self) -> bool {
        self.table().get().is_some()
    }

    /// Loads the encoding, if it is not yet, on the runtime's blocking
    /// threads (about 0.1 s of CPU in a release build): a request about to
    /// count awaits this rather than stall a runtime thread (and every
    /// task on it, Redis replies included) while the tables load.
    pub async fn ready(self) {
        if self.loaded() {
            return;
        }
        let _ = tokio::task::spawn_blocking(move || {
            self.bpe();
        })
        .await;
    }

    /// Tokens in `text` (bytes / 4 should the encoding fail to load).
    pub fn count(self, text: &str) -> u64 {
        match self.bpe() {
            Some(bpe) => bpe.encode_ordinary(text).len() as u64,
            None => (text.len() as u64).div_ceil(4),
        }
    }
}

/// Tokens the chat format adds per message, and to prime the answer.
const PER_MESSAGE: u64 = 3;
const PRIMING: u64 = 3;

/// Appends the text of a prompt value: a string, or an array of strings,
/// text parts or (the Responses API's `input`) items with their own
/// `content`, function call arguments or tool outputs.
fn push_text(text: &mut String, value: &Value) {
    match value {
        Value::String(s) => {
            text.push_str(s);
            text.push('\n');
        }
        Value::Array(parts) => {
            for part in parts {
                match part {
                    Value::String(s) => {
                        text.push_str(s);
                        text.push('\n');
                    }
                    Value::Object(item) => {
                        for field in ["text", "content", "arguments", "output"] {
                            if let Some(value) = item.get(field) {
                                push_text(text, value);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// The text of a request's prompt: its messages (their text parts), a
/// completion's `prompt`, an embedding's or a response's `input` (with its
/// `instructions`); how many messages.
fn prompt_text(request: &Value) -> (String, u64) {
    let mut text = String::new();
    let mut push = |value: &Value| push_text(&mut text, value);
    if let Some(messages) = request["messages"].as_array() {
        for message in messages {
            push(&message["content"]);
            if let Some(name) = message["name"].as_str() {
                push(&Value::String(name.to_owned()));
            }
            if let Some(calls) = message["tool_calls"].as_array() {
                for call in calls {
                    push(&call["function"]["arguments"]);
                }
            }
        }
        return (text, messages.len() as u64);
    }
    push(&request["instructions"]);
    push(&request["prompt"]);
    push(&request["input"]);
    (text, 0)
}

/// What the gateway counts itself for one request when the provider
/// reports no usage.
#[derive(Debug, Clone, Default)]
pub struct Estimate {
    /// The client's request body.
    body: Bytes,
    /// The request's token limit (`max_completion_tokens` or `max_tokens`).
    max_tokens: Option<u64>,
    /// A media request: no tokens are counted, these units are billed.
    media: Option<super::Media>,
}

impl Estimate {
    /// The estimate for a request body with its token limit.
    pub fn new(body: Bytes, max_tokens: Option<u64>) -> Self {
        Estimate {
            body,
            max_tokens,
            media: None,
        }
    }

    /// The same estimate with `limit` as its token limit when the request
    /// set none (what the gateway sent a provider that requires one).
    pub fn or_max_tokens(mut self, limit: Option<u64>) -> Self {
        self.max_tokens = self.max_tokens.or(limit);
        self
    }

    /// The estimate for a media request: nothing counted, `media` billed.
    pub fn media(media: super::Media) -> Self {
        Estimate {
            body: Bytes::new(),
            max_tokens: None,
            media: Some(media),
        }
    }

    /// What a media request is billed by (`None` for text endpoints).
    pub fn media_units(&self) -> Option<&super::Media> {
        self.media.as_ref()
    }

    /// The prompt's tokens, as `model`'s encoding counts them (bytes / 4
    /// for a body that is not JSON).
    pub fn prompt_tokens(&self, model: &str) -> u64 {
        let Ok(request) = serde_json::from_slice::<Value>(&self.body) else {
            return (self.body.len() as u64).div_ceil(4).max(1);
        };
        let (text, messages) = prompt_text(&request);
        let overhead = if messages > 0 {
            messages * PER_MESSAGE + PRIMING
        } else {
            0
        };
        (Encoding::for_model(model).count(&text) + overhead).max(1)
    }

    /// What a request sent to a provider is billed when no answer of it was
    /// read (its client left, or it was cut off): its prompt, as `model`'s
    /// encoding counts it (loaded first, off the worker thread), or the
    /// units a media request asked for.
    pub async fn prompt_sent(&self, model: &str) -> super::Usage {
        let usage = match &self.media {
            Some(media) => media.usage(None),
            None => {
                Encoding::for_model(model).ready().await;
                super::Usage {
                    prompt_tokens: self.prompt_tokens(model),
                    ..super::Usage::default()
                }
            }
        };
        super::Usage {
            estimated: true,
            ..usage
        }
    }

    /// [`Estimate::completion_tokens`] of a whole generated text: its first
    /// [`super::SAMPLE_BYTES`] counted and the rest at their rate, as a
    /// stream's are (an answer of megabytes is not tokenised whole on the
    /// request's worker thread).
    pub fn completion_tokens_of(&self, model: &str, text: &str) -> u64 {
        let mut cut = text.len().min(super::SAMPLE_BYTES);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        self.completion_tokens(model, &text[..cut], (text.len() - cut) as u64)
    }

    /// The generated tokens: `sample` (the generated text seen, or a
    /// sample of it) counted, the `unsampled` bytes beyond it at the
    /// sample's rate, capped at the request's limit (else at
    /// [`super::MAX_ESTIMATED_COMPLETION_TOKENS`]).
    pub fn completion_tokens(&self, model: &str, sample: &str, unsampled: u64) -> u64 {
        let counted = Encoding::for_model(model).count(sample);
        let rest = if unsampled == 0 {
            0
        } else if sample.is_empty() || counted == 0 {
            unsampled.div_ceil(4)
        } else {
            (unsampled as f64 * counted as f64 / sample.len() as f64).ceil() as u64
        };
        let limit = self
            .max_tokens
            .unwrap_or(super::MAX_ESTIMATED_COMPLETION_TOKENS);
        (counted + rest).min(limit)
    }
}

/// The text in a sample of generated values (JSON values, each followed by
/// a comma): strings as they are, anything else (tool calls) as its JSON.
pub fn sample_text(sample: &[u8]) -> String {
    let trimmed = sample.strip_suffix(b",").unwrap_or(sample);
    let mut array = Vec::with_capacity(trimmed.len() + 2);
    array.push(b'[');
    array.extend_from_slice(trimmed);
    array.push(b']');
    let Ok(values) = serde_json::from_slice::<Vec<Value>>(&array) else {
        return String::from_utf8_lossy(sample).into_owned();
    };
    values
        .iter()
        .map(|value| match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_with_the_model_familys_encoding() {
        assert_eq!(Encoding::for_model("gpt-4o-mini"), Encoding::O200k);
        assert_eq!(Encoding::for_model("openai/gpt-5"), Encoding::O200k);
        assert_eq!(Encoding::for_model("o3-mini"), Encoding::O200k);
        assert_eq!(Encoding::for_model("gpt-3.5-turbo"), Encoding::Cl100k);
        assert_eq!(Encoding::for_model("llama-3.1-8b"), Encoding::Cl100k);
        // Any case; a name shorter than a prefix, or cut inside a
        // character, is no match.
        assert_eq!(Encoding::for_model("Azure/GPT-4O"), Encoding::O200k);
        assert_eq!(Encoding::for_model("gpt-4"), Encoding::Cl100k);
        assert_eq!(Encoding::for_model("o"), Encoding::Cl100k);
        assert_eq!(Encoding::for_model("gpt-4\u{e9}"), Encoding::Cl100k);
        // "Hello world" is two tokens in both.
        assert_eq!(Encoding::O200k.count("Hello world"), 2);
        assert_eq!(Encoding::Cl100k.count("Hello world"), 2);
    }

    #[test]
    fn a_chat_prompt_is_its_text_and_the_formats_overhead() {
        let body = json!({"model": "gpt-4o", "max_tokens": 24, "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello world"}]},
        ]});
        let estimate = Estimate::new(Bytes::from(body.to_string()), Some(24));
        // "Be brief.\n" and "Hello world\n" plus 2 x 3 + 3.
        let text_tokens = Encoding::O200k.count("Be brief.\nHello world\n");
        assert_eq!(estimate.prompt_tokens("gpt-4o"), text_tokens + 9);
        // Completion: counted, and never past max_tokens.
        assert_eq!(estimate.completion_tokens("gpt-4o", "Hello world", 0), 2);
        assert_eq!(
            estimate.completion_tokens("gpt-4o", &"word ".repeat(100), 0),
            24
        );
        // A sample's rate carries to the bytes beyond it.
        let unlimited = Estimate::new(Bytes::from(body.to_string()), None);
        assert_eq!(unlimited.completion_tokens("gpt-4o", "Hello world", 11), 4);
    }
}

#[cfg(test)]
mod sample_tests {
    use super::*;

    #[test]
    fn a_sample_reads_back_as_its_text() {
        assert_eq!(
            sample_text(br#""Hel","lo \"you\"",[{"function":{"arguments":"{}"}}],"#),
            r#"Hello "you"[{"function":{"arguments":"{}"}}]"#
        );
        assert_eq!(sample_text(b""), "");
    }
}
