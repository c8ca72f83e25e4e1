//! Config loading on arbitrary text: a config or a list of problems.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runestone::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(problems) = Config::from_yaml(text, |_| None) {
            assert!(!problems.is_empty());
        }
    }
});
