//! Request-field extraction and the body rewrite on arbitrary bytes: an
//! error or fields, and a rewrite that is still JSON when the input was.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use runestone::openai::{rewrite_body, RequestFields};

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    let Ok(fields) = RequestFields::parse(&body) else {
        return;
    };
    for ask_usage in [false, true] {
        let out = rewrite_body(&body, &fields, "provider-model", ask_usage);
        let value: serde_json::Value = match serde_json::from_slice(&out) {
            Ok(v) => v,
            Err(e) => panic!("rewrite of a parsed body is not JSON: {e}"),
        };
        assert_eq!(value["model"], "provider-model");
    }
});
