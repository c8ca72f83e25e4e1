//! The Anthropic translation on arbitrary bytes: requests, JSON answers,
//! error bodies and streams (cut at an arbitrary point) never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runestone::providers::anthropic::{
    to_chat_completion, to_messages_request, to_openai_error, StreamTranslator,
};

fuzz_target!(|data: &[u8]| {
    let _ = to_messages_request(data, "claude");
    let _ = to_chat_completion(data, "gpt-4o-mini");
    let _ = to_openai_error(400, data);
    let cut = data.first().map_or(0, |&c| usize::from(c) * data.len() / 256);
    let mut translator = StreamTranslator::new("gpt-4o-mini", true);
    let _ = translator.feed(&data[..cut]);
    let _ = translator.feed(&data[cut..]);
    let _ = translator.usage();
});
