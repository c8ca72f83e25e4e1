//! The SSE meter on arbitrary provider bytes, cut at an arbitrary point,
//! in both modes: it must not panic, must send what a whole feed sends,
//! and must not grow what it sends past what it got.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use runestone::cost::StreamMeter;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut) * data.len() / 256;
    for strip in [false, true] {
        let mut whole = StreamMeter::new(strip);
        let mut once = whole.feed(Bytes::copy_from_slice(data)).to_vec();
        once.extend_from_slice(&whole.finish());

        let mut split = StreamMeter::new(strip);
        let mut twice = split.feed(Bytes::copy_from_slice(&data[..cut])).to_vec();
        twice.extend_from_slice(&split.feed(Bytes::copy_from_slice(&data[cut..])));
        twice.extend_from_slice(&split.finish());

        assert!(once.len() <= data.len() + 64);
        assert_eq!(whole.usage(0), split.usage(0));
        if !strip {
            assert_eq!(once, data);
            assert_eq!(twice, data);
        }
    }
});
