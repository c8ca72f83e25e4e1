//! Unit tests of usage extraction, estimates and stream metering.

use super::*;
use bytes::Bytes;

const PRICE: Price = Price {
    input: 150_000,
    output: 600_000,
    cached_input: 75_000,
    request: 0,
    image: 0,
    audio_second: 0,
    character: 0,
    tiers: [None; 3],
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
        ..Default::default()
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
            estimated: false,
            ..Default::default()
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
    let body = br#"{"choices":[],"usage":{"prompt_tokens":999999999999,"completion_tokens":2}}"#;
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
                estimated: false,
                ..Default::default()
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
fn a_broken_stream_is_counted_whatever_usage_went_by_in_it() {
    // A provider that reports usage on every chunk, claiming a great deal,
    // breaks off before its stream finished: the count, not the claim.
    let chunk = |content: &str| {
        format!("data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":null}}],\"usage\":{{\"prompt_tokens\":5000,\"completion_tokens\":90000,\"total_tokens\":95000}}}}\n\n")
    };
    let broken = chunk("Hello") + &chunk(" there");
    // Finished, the same stream is billed what it reported.
    let finished = broken.clone() + "data: [DONE]\n\n";
    for (text, billed) in [(broken, (40, 4, true)), (finished, (5000, 90000, false))] {
        let mut meter = StreamMeter::new(false);
        run(&mut meter, &text, 10);
        let usage = meter.usage(40);
        let got = (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.estimated,
        );
        assert_eq!(got, billed, "{text}");
    }
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
        let counted = meter.usage(1).completion_tokens;
        let giant = 40 * piece.len() as u64 / 4;
        assert!(
            (giant..giant + 100).contains(&counted),
            "counted once: {counted}"
        );
    }
}

#[test]
fn handles_crlf_lines() {
    let upstream =
        stream_events(true).concat().replace('\n', "\r\n") + &USAGE_EVENT.replace('\n', "\r\n");
    let mut meter = StreamMeter::new(true);
    let out = run(&mut meter, &upstream, 5);
    assert_eq!(
        out,
        stream_events(false).concat(),
        "lines go on ending in \\n"
    );
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

#[test]
fn leaves_out_events_that_are_not_json() {
    let good = stream_events(false).concat();
    let upstream = format!("{good}data: {{\"choices\": [unparseable\n\ndata: [DONE]\n\n");
    for strip in [false, true] {
        let mut meter = StreamMeter::new(strip);
        assert_eq!(
            run(&mut meter, &upstream, 7),
            format!("{good}data: [DONE]\n\n")
        );
        assert_eq!(meter.malformed(), 1);
        assert_eq!(meter.usage(1).completion_tokens, 4, "not counted");
        assert!(meter.saw_done());
    }
}

#[test]
fn halts_at_an_event_that_is_not_json_when_asked_and_goes_on_when_told() {
    let good = stream_events(false).concat();
    let upstream = format!("{good}data: {{\"choices\": [unparseable\n\n{good}data: [DONE]\n\n");
    let mut meter = StreamMeter::new(false);
    meter.halt_on_malformed(true);
    let first = meter.feed(Bytes::from(upstream.clone()));
    assert_eq!(first, good.as_bytes(), "the lines before it");
    assert!(meter.halted());
    assert_eq!(
        meter.malformed(),
        0,
        "not left out while the stream may break there"
    );
    assert!(
        meter.feed(Bytes::from_static(b": more\n\n")).is_empty(),
        "held while halted"
    );
    meter.halt_on_malformed(false);
    assert_eq!(meter.malformed(), 1, "told to go on: left out");
    let rest = meter.feed(Bytes::new());
    // (Nothing after `[DONE]` goes on: the comment fed while halted neither.)
    assert_eq!(rest, format!("{good}data: [DONE]\n\n").as_bytes());
    assert!(!meter.halted());
    // An empty `data:` carried nothing: left out, not a halt.
    let mut meter = StreamMeter::new(false);
    meter.halt_on_malformed(true);
    let upstream = format!("{good}data:\n\ndata: \r\n\r\n{good}data: [DONE]\n\n");
    let out = meter.feed(Bytes::from(upstream));
    assert_eq!(out, format!("{good}{good}data: [DONE]\n\n").as_bytes());
    assert!(!meter.halted());
    assert_eq!(meter.malformed(), 0);
}

#[test]
fn nothing_after_the_last_event_of_a_whole_answer_is_sent_or_metered() {
    let good = stream_events(false).concat();
    let huge = USAGE_EVENT.replace("\"completion_tokens\":3", "\"completion_tokens\":3000000");
    for chunk_size in [1, 7, 4096] {
        let mut meter = StreamMeter::new(false);
        let after =
            format!("{huge}: ping\n\ndata: {{\"choices\": [{{\"delta\": {{\"content\": \"late\"}}");
        let upstream = format!("{good}{USAGE_EVENT}data: [DONE]\n\n{after}");
        let out = run(&mut meter, &upstream, chunk_size);
        assert_eq!(
            out,
            format!("{good}{USAGE_EVENT}data: [DONE]\n\n"),
            "{chunk_size}"
        );
        assert!(meter.said_last());
        assert_eq!(meter.usage(0).completion_tokens, 3, "{chunk_size}");
        assert!(meter.feed(Bytes::from(huge.clone())).is_empty());
        assert_eq!(meter.usage(0).completion_tokens, 3);
    }
    // A Responses stream's failure is its end, not an answer's last event.
    let mut meter = StreamMeter::new(false);
    let failed = "event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"failed\"}}\n\n";
    run(&mut meter, failed, 4096);
    assert!(meter.finished() && !meter.said_last());
    let mut meter = StreamMeter::new(false);
    run(&mut meter, &failed.replace("failed", "completed"), 4096);
    assert!(meter.finished() && meter.said_last());
}

#[test]
fn reads_a_payload_split_over_data_lines_and_drops_whole_events() {
    // One event, its JSON on two data lines (joined with a newline).
    let split = "event: chunk\ndata: {\"choices\":[{\"index\":0,\"delta\":\ndata: {\"content\":\"Hi\"}}]}\n\n";
    let bad = "event: ping\ndata: not json\n\n";
    let upstream = format!("{split}{bad}data: [DONE]\n\n");
    for chunk_size in [1, 5, 4096] {
        let mut meter = StreamMeter::new(false);
        let out = run(&mut meter, &upstream, chunk_size);
        assert_eq!(
            out,
            format!("{split}data: [DONE]\n\n"),
            "the bad event leaves whole"
        );
        assert_eq!(meter.malformed(), 1);
        assert_eq!(meter.usage(1).completion_tokens, 1, "\"Hi\" was read");
    }
}

#[test]
fn a_completion_stream_is_finished_by_its_finish_reason_or_done() {
    let events = stream_events(false);
    let mut meter = StreamMeter::new(false);
    run(&mut meter, &events[..2].concat(), 7);
    assert!(!meter.finished(), "cut before its finish_reason");
    let mut meter = StreamMeter::new(false);
    run(&mut meter, &events.concat(), 7);
    assert!(meter.finished() && !meter.saw_done());
    let mut other = StreamMeter::new(false);
    run(
        &mut other,
        "event: response.created\ndata: {\"type\":\"response.created\"}\n\n",
        7,
    );
    assert!(other.finished(), "not a completion stream: not judged");
}

#[test]
fn costs_images_characters_and_seconds_exactly() {
    let price = Price {
        image: 40_000_000_000,
        character: 15_000_000,
        audio_second: 100_000_000,
        ..Price::default()
    };
    let usage = Usage {
        images: 2,
        characters: 1000,
        audio_ms: 2500,
        ..Usage::default()
    };
    // 2 * $0.04 + 1000 * $15/1M + 2.5 s * $0.0001
    assert_eq!(
        usage.cost_pusd(Some(&price)),
        80_000_000_000 + 15_000_000_000 + 250_000_000
    );
    assert_eq!(usage.plus(usage).images, 4);
}

#[test]
fn speech_transcriptions_and_images_finish_at_their_last_event() {
    for (delta, last) in [
        ("transcript.text.delta", "transcript.text.done"),
        ("transcript.text.segment", "transcript.text.done"),
        ("speech.audio.delta", "speech.audio.done"),
        (
            "image_generation.partial_image",
            "image_generation.completed",
        ),
        ("image_edit.partial_image", "image_edit.completed"),
    ] {
        let mut meter = StreamMeter::new(false);
        meter.feed(Bytes::from(format!("data: {{\"type\":\"{delta}\"}}\n\n")));
        assert!(!meter.finished(), "cut after {delta}");
        meter.feed(Bytes::from(format!("data: {{\"type\":\"{last}\"}}\n\n")));
        assert!(meter.finished(), "{last}");
    }
    // One whose last event is too long to hold, its `type` after its
    // image (as a server writing fields in alphabetical order has it).
    let mut meter = StreamMeter::new(false);
    meter.feed(Bytes::from_static(
        b"data: {\"type\":\"image_generation.partial_image\",\"b64_json\":\"iVBO\"}\n\n",
    ));
    let image = "A".repeat(2 * 1024 * 1024);
    let last = format!("data: {{\"b64_json\":\"{image}\",\"type\": \"image_generation.completed\",\"usage\":{{\"input_tokens\":5,\"output_tokens\":50}}}}\n\n");
    for piece in last.as_bytes().chunks(64 * 1024) {
        meter.feed(Bytes::copy_from_slice(piece));
    }
    assert!(meter.finished(), "ended by its oversized last event");
    assert_eq!(
        meter.reported_usage().map(|u| u.completion_tokens),
        Some(50)
    );
    // A `[DONE]` ends one too.
    let mut meter = StreamMeter::new(false);
    meter.feed(Bytes::from_static(
        b"data: {\"type\":\"transcript.text.delta\",\"delta\":\"hi\"}\n\ndata: [DONE]\n\n",
    ));
    assert!(meter.finished());
    // Nor is the error of one its end.
    let mut meter = StreamMeter::new(false);
    meter.feed(Bytes::from_static(
        b"data: {\"type\":\"transcript.text.delta\",\"delta\":\"hi\"}\n\ndata: {\"type\":\"error\",\"error\":{\"message\":\"no\"}}\n\n",
    ));
    assert!(!meter.finished() && meter.saw_error());
}

#[test]
fn a_streamed_transcription_reports_its_seconds_in_its_last_event() {
    let mut meter = StreamMeter::new(false);
    meter.feed(Bytes::from_static(
        b"data: {\"type\":\"transcript.text.delta\",\"delta\":\"hi\"}\n\n",
    ));
    meter.feed(Bytes::from_static(
        b"data: {\"type\":\"transcript.text.done\",\"text\":\"hi\",\"usage\":{\"type\":\"duration\",\"seconds\":3.5}}\n\n",
    ));
    assert!(meter.finished());
    let media = Media::default().usage(meter.reported_usage());
    assert_eq!((media.audio_ms, media.total()), (3500, 0));
    // Token usage, and seconds that are not a number, keep their tokens.
    for (usage, expected) in [
        (
            r#"{"type":"tokens","input_tokens":20,"output_tokens":5}"#,
            (20, 5, 0),
        ),
        (
            r#"{"input_tokens":20,"output_tokens":5,"seconds":"x"}"#,
            (20, 5, 0),
        ),
        (r#"{"seconds":-4}"#, (0, 0, 0)),
        (r#"{"seconds":1e300}"#, (0, 0, 24 * 3600 * 1000)),
    ] {
        let body = format!("{{\"text\":\"hi\",\"usage\":{usage}}}");
        let got = usage_from_json(body.as_bytes(), 0);
        assert_eq!(
            (got.prompt_tokens, got.completion_tokens, got.audio_ms),
            expected,
            "{usage}"
        );
    }
}

#[test]
fn a_responses_stream_ending_with_an_event_too_long_to_hold_is_finished_and_billed() {
    let text = "x".repeat(MAX_LINE_BYTES + MAX_LINE_BYTES / 2);
    let stream = format!(
        "event: response.created\ndata: {{\"type\":\"response.created\",\"sequence_number\":0,\"response\":{{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"usage\":null}}}}\n\n\
         event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"delta\":\"xx\"}}\n\n\
         event: response.completed\ndata: {{\"type\":\"response.completed\",\"sequence_number\":2,\"response\":{{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"output\":[{{\"type\":\"message\",\"content\":[{{\"type\":\"output_text\",\"text\":\"{text}\"}}]}}],\"usage\":{{\"input_tokens\":10,\"output_tokens\":50000,\"total_tokens\":50010}},\"user\":null}}}}\n\n"
    );
    // Without the `event:` lines too: the type is read from the data.
    let bare: String = stream
        .lines()
        .filter(|l| !l.starts_with("event:"))
        .map(|l| format!("{l}\n"))
        .collect();
    for stream in [stream, bare] {
        let mut meter = StreamMeter::new(false);
        let mut out = Vec::new();
        for chunk in stream.as_bytes().chunks(64 * 1024) {
            out.extend_from_slice(&meter.feed(Bytes::copy_from_slice(chunk)));
        }
        out.extend_from_slice(&meter.finish());
        assert_eq!(out, stream.as_bytes(), "passed through whole");
        assert_eq!(meter.response_id(), Some("resp_1"));
        assert!(meter.finished(), "not a broken stream");
        let usage = meter.reported_usage().expect("its usage");
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (10, 50000));
    }
}

#[test]
fn the_next_responses_event_is_numbered_past_every_one_seen() {
    let event = |kind: &str, number: &str, more: &str| {
        let number = match number {
            "" => String::new(),
            n => format!(",\"sequence_number\":{n}"),
        };
        format!("event: {kind}\ndata: {{\"type\":\"{kind}\"{number}{more}}}\n\n")
    };
    let created = event(
        "response.created",
        "0",
        r#","response":{"id":"resp_1","status":"in_progress"}"#,
    );
    let delta = |n: &str| event("response.output_text.delta", n, r#","delta":"xx""#);
    let mut meter = StreamMeter::new(false);
    assert_eq!(meter.next_sequence_number(), 0, "none yet");
    run(&mut meter, &created, 7);
    assert_eq!(meter.next_sequence_number(), 1);
    // Alike but for their numbers: each is read for its own.
    run(
        &mut meter,
        &[delta("1"), delta("2"), delta(" 3 ")].concat(),
        5,
    );
    assert_eq!(meter.next_sequence_number(), 4);
    // Past a provider's gap, and past its highest when it goes back.
    run(&mut meter, &[delta("9"), delta("4")].concat(), 64);
    assert_eq!(meter.next_sequence_number(), 11);
    // An event with no number, or one that is not a whole number, is
    // counted on from the last.
    let odd = [
        delta(""),
        delta("\"x\""),
        delta("-1"),
        delta("12.5"),
        delta("1e9"),
    ];
    run(&mut meter, &odd.concat(), 64);
    assert_eq!(meter.next_sequence_number(), 16);
    // One that repeats the member is read (and passed on) as any other.
    let twice = delta("16,\"sequence_number\":16");
    assert_eq!(run(&mut meter, &twice, 64), twice, "passed on whole");
    assert_eq!(meter.next_sequence_number(), 17);
    // Past its largest, wherever the member is: a reader takes the last
    // one, or the top-level one after one in its text.
    run(&mut meter, &delta("9,\"sequence_number\":20"), 64);
    assert_eq!(meter.next_sequence_number(), 21);
    let in_text = r#","delta":"x \"sequence_number","sequence_number":30"#;
    run(
        &mut meter,
        &event("response.output_text.delta", "", in_text),
        64,
    );
    assert_eq!(meter.next_sequence_number(), 31);
    // (One in a nested object only makes it larger.)
    let nested = r#","item":{"sequence_number":99},"sequence_number":31"#;
    run(
        &mut meter,
        &event("response.output_item.added", "", nested),
        64,
    );
    assert_eq!(meter.next_sequence_number(), 100);
    // One too long to hold is numbered from its head, or its tail.
    let long = format!(r#","delta":"{}""#, "y".repeat(MAX_LINE_BYTES * 2));
    run(
        &mut meter,
        &event("response.output_text.delta", "140", &long),
        64 * 1024,
    );
    assert_eq!(meter.next_sequence_number(), 141);
    let number_last = format!(r#"{long},"sequence_number":150"#);
    run(
        &mut meter,
        &event("response.output_text.delta", "", &number_last),
        64 * 1024,
    );
    assert_eq!(meter.next_sequence_number(), 151);
    // Or its middle, and with its `type` not first.
    let middle = format!(
        r#"data: {{"delta":"{y}","sequence_number":155,"text":"{y}","type":"response.output_text.delta"}}"#,
        y = "y".repeat(MAX_LINE_BYTES)
    );
    run(&mut meter, &format!("{middle}\n\n"), 64 * 1024);
    assert_eq!(meter.next_sequence_number(), 156);
    // Or read in two, split inside its number's member or digits.
    for split in [r#""sequence_n"#, r#""sequence_number":1"#] {
        let mut split_meter = StreamMeter::new(false);
        run(&mut split_meter, &created, 64);
        let whole = middle.replace("155", "170");
        let at = whole.find(split).unwrap() + split.len();
        split_meter.feed(Bytes::copy_from_slice(&whole.as_bytes()[..at]));
        split_meter.feed(Bytes::copy_from_slice(&whole.as_bytes()[at..]));
        assert_eq!(
            split_meter.next_sequence_number(),
            171,
            "split after {split}"
        );
    }
    // And while the client has only part of it.
    let head = format!(
        "data: {{\"type\":\"response.output_text.delta\",\"sequence_number\":160,\"delta\":\"{}",
        "y".repeat(MAX_LINE_BYTES * 2)
    );
    meter.feed(Bytes::from(head));
    assert_eq!(meter.next_sequence_number(), 161);
    // Chat completion chunks have no type: nothing counts.
    let mut chat = StreamMeter::new(false);
    run(&mut chat, &stream_events(false).concat(), 64);
    assert_eq!(chat.next_sequence_number(), 0);
}

#[test]
fn an_event_too_long_to_hold_is_judged_by_its_length_however_it_is_read() {
    // Past the bound by its data line, or only by its last line (an `id`
    // after its data); naming flex, which an event too long to hold is
    // never billed at.
    for filler in [MAX_LINE_BYTES, MAX_LINE_BYTES - 90] {
        judged_alike_however_read(&"y".repeat(filler));
    }
}

fn judged_alike_however_read(filler: &str) {
    let long = format!(
        "data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{filler}\"}}}}],\"service_tier\":\"flex\"}}\nid: 7\n\n",
    );
    assert!(long.len() - "\n\n".len() > MAX_LINE_BYTES);
    let usage = "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\n\n";
    let text = [
        stream_events(false)[0].as_str(),
        &long,
        usage,
        "data: [DONE]\n\n",
    ]
    .concat();
    let read = |piece: usize| {
        let mut meter = StreamMeter::new(false);
        let sent = run(&mut meter, &text, piece);
        (sent, meter.usage(0))
    };
    let whole = read(text.len());
    assert!(whole.0.contains("id: 7\n"), "passed on as it came, unread");
    assert_ne!(whole.1.tier, Some(ServiceTier::Flex));
    assert_eq!(whole.1.completion_tokens, 7);
    // Split anywhere: inside the long line, at its end, between reads of
    // every size the gateway makes.
    for piece in [
        64 * 1024,
        256 * 1024,
        MAX_LINE_BYTES - 40,
        MAX_LINE_BYTES + 17,
    ] {
        assert!(read(piece) == whole, "pieces of {piece}");
    }
    // Or a read ends just before a line end of it, or just after: the
    // line end ends that line, not the event (a blank line would).
    let data_end = text.find("\nid: 7").unwrap();
    let id_end = data_end + "\nid: 7".len();
    for cut in [data_end, data_end + 1, id_end, id_end + 1] {
        let mut meter = StreamMeter::new(false);
        let mut sent = Vec::new();
        for piece in text.as_bytes()[..cut].chunks(64 * 1024) {
            sent.extend_from_slice(&meter.feed(Bytes::copy_from_slice(piece)));
        }
        sent.extend_from_slice(&meter.feed(Bytes::copy_from_slice(&text.as_bytes()[cut..])));
        sent.extend_from_slice(&meter.finish());
        assert!(
            (String::from_utf8(sent).unwrap(), meter.usage(0)) == whole,
            "a read ending at {cut}"
        );
    }
    // The body ends inside it, without its blank line: the same.
    let unended = &text[..text.find("id: 7").unwrap() + 5];
    let mut at_once = StreamMeter::new(false);
    let mut split = StreamMeter::new(false);
    assert_eq!(
        run(&mut at_once, unended, unended.len()),
        run(&mut split, unended, 64 * 1024)
    );
    assert_eq!(at_once.usage(0), split.usage(0));
}

#[test]
fn a_usage_line_too_long_to_hold_after_the_last_event_is_not_read_however_it_came() {
    let pad = "p".repeat(MAX_LINE_BYTES);
    let text = [
        stream_events(false)[0].as_str(),
        "data: [DONE]\n\n",
        &format!("data: {{\"pad\":\"{pad}\",\"choices\":[],\"usage\":{{\"prompt_tokens\":11,\"completion_tokens\":22,\"total_tokens\":33}}}}\n\n"),
    ]
    .concat();
    let usage = |piece: usize| {
        let mut meter = StreamMeter::new(false);
        run(&mut meter, &text, piece);
        meter.usage(5)
    };
    let whole = usage(text.len());
    assert!(whole.estimated, "not read: {whole:?}");
    for piece in [64 * 1024, MAX_LINE_BYTES - 3] {
        assert_eq!(usage(piece), whole, "pieces of {piece}");
    }
}

#[test]
fn an_event_the_client_has_only_part_of_is_ended_before_the_gateways() {
    let feed = |meter: &mut StreamMeter, text: &str| meter.feed(Bytes::from(text.to_owned()));
    let mut meter = StreamMeter::new(false);
    assert_eq!(meter.event_end(), b"", "nothing sent");
    feed(
        &mut meter,
        "data: {\"type\":\"a\"}\n\ndata: {\"type\":\"b\"}",
    );
    assert_eq!(meter.event_end(), b"", "the second waits for its line end");
    // The body ends without the last event's blank line, or its line end.
    let mut no_blank = StreamMeter::new(false);
    feed(&mut no_blank, "data: {\"type\":\"a\"}\n");
    no_blank.finish();
    assert_eq!(no_blank.event_end(), b"\n");
    meter.finish();
    assert_eq!(meter.event_end(), b"\n\n");
    // An event too long to hold goes on as it comes.
    let mut long = StreamMeter::new(false);
    let head = format!(
        "data: {{\"type\":\"a\",\"delta\":\"{}",
        "y".repeat(MAX_LINE_BYTES * 2)
    );
    feed(&mut long, &head);
    assert_eq!(long.event_end(), b"\n\n");
    feed(&mut long, "\"}\n");
    assert_eq!(long.event_end(), b"\n");
    feed(&mut long, "\n");
    assert_eq!(long.event_end(), b"");
    // Broken off inside a line of one: nothing can follow it. A body that
    // ends there ends its line.
    assert!(!long.torn());
    feed(&mut long, &head);
    assert!(long.torn(), "the body broke inside its line");
    long.finish();
    assert!(!long.torn());
    assert_eq!(long.event_end(), b"\n\n");
    // An `id` line the body ends in, unended, is left out as any other.
    let mut id_last = StreamMeter::new(false);
    let sent = run(&mut id_last, "data: {\"type\":\"a\"}\n\nid: 7", 64);
    assert_eq!(sent, "data: {\"type\":\"a\"}\n\n");
    assert_eq!(id_last.event_end(), b"");
}

#[test]
fn an_empty_usage_object_reports_nothing_and_is_counted() {
    let body =
        br#"{"choices":[{"message":{"role":"assistant","content":"hello there"}}],"usage":{}}"#;
    let usage = usage_from_json(body, 7);
    assert!(usage.estimated, "{usage:?}");
    assert_eq!(usage.prompt_tokens, 7);
    assert!(usage.completion_tokens > 0);
    let only_unread = br#"{"choices":[],"usage":{"total_tokens":9}}"#;
    assert!(usage_from_json(only_unread, 3).estimated);
    let transcription = br#"{"text":"hi","usage":{"type":"duration","seconds":2.5}}"#;
    assert!(!usage_from_json(transcription, 0).estimated);
}

#[test]
fn a_usage_chunk_the_gateway_asked_for_is_taken_out_even_when_unreadable() {
    for usage in ["{}", r#"{"prompt_tokens":1e15,"completion_tokens":2}"#] {
        let text = format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"hi\"}},\"finish_reason\":\"stop\"}}]}}\n\n\
             data: {{\"choices\":[],\"usage\":{usage}}}\n\ndata: [DONE]\n\n"
        );
        let mut meter = StreamMeter::new(true);
        let out = run(&mut meter, &text, 7);
        assert!(!out.contains("\"usage\""), "{usage}: {out}");
        assert!(out.contains("[DONE]") && out.contains("hi"), "{out}");
        assert!(meter.reported_usage().is_none(), "{usage}");
    }
}

#[test]
fn nothing_after_an_in_band_error_reaches_the_client_but_its_usage_is_read() {
    let good = stream_events(false).concat();
    let error = "data: {\"error\":{\"message\":\"engine dead\",\"type\":\"server_error\"}}\n\n";
    let after = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"more\"}}]}\n\n";
    for chunk_size in [1, 7, 4096] {
        let mut meter = StreamMeter::new(false);
        let out = run(
            &mut meter,
            &format!("{good}{error}{after}{USAGE_EVENT}data: [DONE]\n\n"),
            chunk_size,
        );
        assert_eq!(out, format!("{good}{error}"), "{chunk_size}");
        assert!(meter.saw_error() && meter.ended() && !meter.said_last());
        assert_eq!(meter.error().map(|e| e.status), Some(502));
        let usage = meter.reported_usage().expect("read after the error");
        assert_eq!(usage.completion_tokens, 3, "{chunk_size}");
    }
}

#[test]
fn an_error_event_too_long_to_hold_is_judged_by_what_was_kept_of_it() {
    let message = "x".repeat(MAX_LINE_BYTES + 10);
    let error = format!(
        "data: {{\"error\":{{\"message\":\"{message}\",\"type\":\"invalid_request_error\",\"code\":\"invalid_prompt\"}}}}\n\n"
    );
    let mut meter = StreamMeter::new(false);
    let good = stream_events(false).concat();
    let out = run(&mut meter, &format!("{good}{error}data: [DONE]\n\n"), 65536);
    assert_eq!(out.len(), good.len() + error.len());
    assert_eq!(meter.error().map(|e| e.status), Some(400));
    let failed = format!(
        "event: response.failed\ndata: {{\"type\":\"response.failed\",\"response\":{{\"id\":\"r\",\"status\":\"failed\",\"error\":{{\"code\":\"invalid_prompt\",\"message\":\"no\"}},\"instructions\":\"{message}\"}}}}\n\n"
    );
    let mut meter = StreamMeter::new(false);
    run(&mut meter, &failed, 65536);
    assert_eq!(meter.error().map(|e| e.status), Some(400));
}

#[test]
fn the_usage_chunk_the_gateway_adds_precedes_a_done_that_ends_the_body() {
    let identity =
        "\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\"";
    let events = format!(
        "data: {{{identity},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"Hi\"}}}}]}}\n\n\
         data: {{{identity},\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n"
    );
    let estimate = Estimate::new(Bytes::from_static(b"{\"messages\":[]}"), None);
    // `[DONE]` with and without the blank line that ends its event.
    for done in ["data: [DONE]\n\n", "data: [DONE]"] {
        let mut meter = StreamMeter::new(false).with_estimate(estimate.clone(), "m");
        let out = run(&mut meter, &format!("{events}{done}"), 4096);
        let usage = out.find("\"usage\"").unwrap_or_else(|| panic!("{out}"));
        assert!(usage < out.find("[DONE]").unwrap(), "{out}");
    }
}

#[test]
fn a_usage_report_after_done_is_read_while_none_came_before() {
    let good = stream_events(false).concat();
    for chunk_size in [1, 7, 4096] {
        let mut meter = StreamMeter::new(true);
        let out = run(
            &mut meter,
            &format!("{good}data: [DONE]\n\n{USAGE_EVENT}"),
            chunk_size,
        );
        assert_eq!(out, format!("{good}data: [DONE]\n\n"), "{chunk_size}");
        let usage = meter.reported_usage().expect("read after [DONE]");
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (12, 3));
    }
}

#[test]
fn error_events_of_every_shape_keep_a_done_from_ending_a_whole_answer() {
    let good = stream_events(false).concat();
    for error in [
        "data: {\"error\":\"engine dead\"}\n\n",
        "data: {\"object\":\"error\",\"message\":\"engine dead\",\"code\":500}\n\n",
        "event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"x\"}\n\n",
        "event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"failed\"}}\n\n",
    ] {
        let mut meter = StreamMeter::new(false);
        run(&mut meter, &format!("{good}{error}data: [DONE]\n\n"), 4096);
        assert!(meter.saw_error() && !meter.said_last(), "{error}");
    }
    // Some servers put an empty error in every chunk.
    for empty in ["null", "\"\"", "false", "0", "{}", "{ }", "[]"] {
        let mut meter = StreamMeter::new(false);
        let chunks = good.replace("\"choices\"", &format!("\"error\":{empty},\"choices\""));
        run(&mut meter, &format!("{chunks}data: [DONE]\n\n"), 4096);
        assert!(!meter.saw_error() && meter.said_last(), "{empty}");
    }
}

#[test]
fn reads_a_top_level_usage_from_the_end_and_leaves_the_rest_to_a_whole_parse() {
    fn at_end(body: &str) -> Option<Option<&str>> {
        top_level_usage_at_end(body.as_bytes()).map(|m| m.map(RawValue::get))
    }
    let usage = r#"{"prompt_tokens":7,"completion_tokens":2}"#;
    // Decided from the end: last, or followed by other members.
    assert_eq!(
        at_end(&format!(r#"{{"id":"x","usage":{usage}}}"#)),
        Some(Some(usage))
    );
    assert_eq!(
        at_end(&format!(
            "{{\"choices\":[{{\"message\":{{\"content\":\"say \\\"usage\\\": 1\"}}}}],\n  \"usage\" : {usage} ,\"system_fingerprint\":\"fp\", \"n\":[1,{{}}]}}\n"
        )),
        Some(Some(usage))
    );
    assert_eq!(at_end(r#"{"usage":null,"id":"x"}"#), Some(None));
    // An object malformed before its usage is billed by what it reports.
    assert_eq!(
        at_end(&format!("{{\"a\":\"x\ny\",\"usage\":{usage}}}")),
        Some(Some(usage))
    );
    // Left to the whole parse: nested, repeated, escaped before, followed
    // by a key written with escapes, a value, not at the top level.
    for body in [
        format!(r#"{{"usage":{usage},"usage":{usage}}}"#),
        format!(r#"{{"choices":[{{"usage":{usage}}}]}}"#),
        format!(r#"{{"a":{{"usage":{usage}}},"b":1}}"#),
        format!(r#"[{{"usage":{usage}}}]"#),
        format!(r#"{{"x":"\"usage":{usage}}}"#),
        format!(r#"{{"usage":{usage},"\u0075sage":null}}"#),
        r#"{"object":"usage"}"#.to_string(),
        r#"{"id":"x"}"#.to_string(),
        format!(r#"{{"usage":{usage}}} {{"#),
        format!("\u{feff}{{\"usage\":{usage}}}"),
        format!(r#"xx{{"usage":{usage}}}"#),
        format!(r#"ices":[1]}},"usage":{usage}}}"#),
        format!(r#""usage":{usage}}}"#),
    ] {
        assert_eq!(at_end(&body), None, "{body}");
    }
}

/// A JSON object as written out, members in order (repeats allowed), with
/// `usage` keys at any depth, `usage` inside strings and as a value, and
/// whitespace between tokens.
fn arbitrary_object() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let ws = prop::sample::select(vec!["", " ", "\n  ", "\t"]);
    let leaf = prop_oneof![
        Just("null".to_string()),
        any::<i32>().prop_map(|n| n.to_string()),
        prop::sample::select(vec!["usage", "say \"usage\": {}", "\\\"usage\\\"", "", "}"])
            .prop_map(|s| serde_json::to_string(s).unwrap()),
        Just(r#"{"prompt_tokens":3,"completion_tokens":4}"#.to_string()),
    ];
    let value = leaf.prop_recursive(3, 24, 4, move |inner| {
        let ws = prop::sample::select(vec!["", " ", "\n"]);
        let key = prop::sample::select(vec!["usage", "id", "choices", "\\u0075sage", "x"]);
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4)
                .prop_map(|items| format!("[{}]", items.join(","))),
            prop::collection::vec((key, ws, inner), 0..4).prop_map(|members| {
                let members: Vec<String> = members
                    .into_iter()
                    .map(|(k, w, v)| format!("{w}\"{k}\"{w}:{w}{v}"))
                    .collect();
                format!("{{{}}}", members.join(","))
            }),
        ]
    });
    let key = prop::sample::select(vec!["usage", "usage", "id", "choices", "\\u0075sage", "x"]);
    (prop::collection::vec((key, ws.clone(), value), 0..6), ws).prop_map(|(members, w)| {
        let members: Vec<String> = members
            .into_iter()
            .map(|(k, w, v)| format!("{w}\"{k}\"{w}:{w}{v}"))
            .collect();
        format!("{w}{{{}}}{w}", members.join(","))
    })
}

proptest::proptest! {
    /// Whenever the usage is read from the end, it is what parsing the
    /// whole body finds.
    #[test]
    fn usage_read_from_the_end_is_what_a_whole_parse_finds(body in arbitrary_object()) {
        proptest::prop_assume!(serde_json::from_str::<serde::de::IgnoredAny>(&body).is_ok());
        if let Some(member) = top_level_usage_at_end(body.as_bytes()) {
            proptest::prop_assert_eq!(
                member.map(|m| m.get()),
                usage_member_parsed(body.as_bytes()).map(|m| m.get()),
                "{}", body
            );
        }
    }
}

proptest::proptest! {
    /// The usage billed for a whole JSON body is what the general way
    /// reads (the top-level usage from the end, else a whole parse's),
    /// valid JSON or not: a byte that is not UTF-8, a quote or a brace
    /// put in anywhere, as a broken provider may send. (A body malformed
    /// before its usage is billed by it, as the README says: a whole
    /// parse alone would find none.)
    #[test]
    fn the_usage_billed_for_a_body_is_what_the_general_way_reads(
        body in arbitrary_object(),
        bad in proptest::option::of((0usize..400, proptest::sample::select(vec![0xffu8, 0xc3, b'"', b'}']))),
    ) {
        let mut body = body.into_bytes();
        if let Some((at, byte)) = bad {
            body.insert(at.min(body.len()), byte);
        }
        let general = top_level_usage_at_end(&body)
            .unwrap_or_else(|| usage_member_parsed(&body))
            .and_then(reported_usage);
        proptest::prop_assert_eq!(
            reported_usage_in_json(&body),
            general,
            "{}", String::from_utf8_lossy(&body)
        );
        // For valid JSON, that is the whole parse's.
        if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok() {
            proptest::prop_assert_eq!(general, usage_member_parsed(&body).and_then(reported_usage));
        }
    }
}

#[test]
fn a_usage_object_with_bytes_that_are_not_utf8_is_not_billed() {
    let body =
        b"{\"id\":\"x\",\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"note\":\"\xff\"}}";
    assert_eq!(reported_usage_in_json(body), None);
    let body = b"{\"id\":\"x\",\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"note\":\"\xc3\xa9\"}}";
    assert_eq!(
        reported_usage_in_json(body).map(|u| (u.prompt_tokens, u.completion_tokens)),
        Some((3, 4))
    );
}

#[test]
fn the_tail_of_a_large_json_body_is_billed_by_its_top_level_usage_only() {
    fn usage(tail: &str) -> Option<&str> {
        usage_member_in_json_tail(tail.as_bytes()).map(RawValue::get)
    }
    let top = r#"{"prompt_tokens":7,"completion_tokens":2}"#;
    let nested = r#"{"prompt_tokens":1,"completion_tokens":1}"#;
    // Last, as providers write it, and before other members.
    assert_eq!(usage(&format!("xxxx\"]}}],\"usage\":{top}}}\n")), Some(top));
    assert_eq!(
        usage(&format!("x\"],\"usage\":{top},\"id\":\"r\",\"n\":[1]}}")),
        Some(top)
    );
    // A nested `usage` after the answer's own is passed over, not billed.
    assert_eq!(
        usage(&format!(
            "{{\"usage\":{top},\"meta\":{{\"usage\":{nested}}}}}"
        )),
        Some(top)
    );
    // Many nested ones after it, the word in strings, keys with escapes.
    let many_nested = format!(
        ",\"meta\":[{}{{}}]}}",
        format!("{{\"usage\":{nested}}},").repeat(40)
    );
    let many_words = format!(",\"tags\":[{}\"x\"]}}", "\"usage\",".repeat(500));
    for after in [
        many_nested,
        many_words,
        r#","a\\":{"usage":{}}}"#.to_string(),
        r#","caf\u00e9":1}"#.to_string(),
    ] {
        let tail = format!("x\"],\"usage\":{top}{after}");
        assert_eq!(usage(&tail), Some(top), "{tail}");
    }
    // Only nested (or in a string, or repeated as a key with escapes
    // after it): none.
    for tail in [
        format!("xx\"],\"meta\":{{\"usage\":{nested}}}}}"),
        format!("xx\"],\"data\":[{{\"usage\":{nested}}}]}}"),
        format!("xx\",\"text\":\"say \\\"usage\\\":{nested}\"}}"),
        format!("xx\"],\"usage\":{nested},\"\\u0075sage\":{top}}}"),
        format!("xx\"],\"usage\":{top}}} trailing"),
    ] {
        assert_eq!(usage(&tail), None, "{tail}");
    }
    // An SSE event's data keeps finding a nested one (a Responses stream's
    // `response.completed` carries it in `response`).
    let event = format!("\"output\":[]}},\"usage\":{top}}}}}");
    assert_eq!(
        usage_member_in_tail(event.as_bytes()).map(RawValue::get),
        Some(top)
    );
    assert_eq!(usage(&event), None);
}

proptest::proptest! {
    /// The tail reader never bills a `usage` the body's top-level object
    /// does not have: what it finds is that object's (the last, as a tree
    /// of the body keeps it).
    #[test]
    fn a_tails_usage_is_the_top_level_objects(body in arbitrary_object()) {
        let Ok(serde_json::Value::Object(tree)) = serde_json::from_str(&body) else {
            return Ok(());
        };
        if let Some(found) = usage_member_in_json_tail(body.as_bytes()) {
            let found: serde_json::Value = serde_json::from_str(found.get()).unwrap();
            proptest::prop_assert_eq!(Some(&found), tree.get("usage"), "{}", body);
        }
    }
}

#[test]
fn a_responses_answer_without_usage_is_counted_from_what_its_items_generated() {
    let estimate = Estimate::new(Bytes::from_static(b"{\"input\":\"hi\"}"), None);
    let counted_in = |object: &str, output: &str| {
        let body = format!(r#"{{"id":"resp_1","object":"{object}","output":{output}}}"#);
        let usage = usage_from_json_counted(body.as_bytes(), &estimate, "gpt-4o");
        assert!(usage.estimated, "{body}");
        usage.completion_tokens
    };
    let counted = |output: &str| counted_in("response", output);
    let text = "The quick brown fox jumps over the lazy dog again and again";
    let message = format!(
        r#"[{{"type":"message","content":[{{"type":"output_text","text":"{text}","annotations":[]}}]}}]"#
    );
    let words = counted(&message);
    assert!((10..=24).contains(&words), "a message's text: {words}");
    for output in [
        format!(r#"[{{"type":"function_call","name":"f","arguments":"{{\"q\":\"{text}\"}}"}}]"#),
        format!(r#"[{{"type":"function_call","name":"f","arguments":{{"q":"{text}"}}}}]"#),
        format!(
            r#"[{{"type":"reasoning","summary":[{{"type":"summary_text","text":"{text}"}}],"encrypted_content":"gAAAA"}}]"#
        ),
        format!(r#"[{{"type":"message","content":[{{"type":"refusal","refusal":"{text}"}}]}}]"#),
        format!(r#"[{{"type":"message","content":"{text}"}}]"#),
        format!(
            r#"[{{"type":"code_interpreter_call","code":"print('{text}')","outputs":[{{"logs":"x"}}]}}]"#
        ),
        format!(r#"[{{"type":"custom_tool_call","input":"{text}"}}]"#),
        format!(r#"[{{"type":"computer_call","action":{{"type":"type","text":"{text}"}}}}]"#),
        format!(
            r#"[{{"type":"message","content":[{{"type":"output_audio","transcript":"{text}"}}]}}]"#
        ),
        format!(r#""{text}""#),
    ] {
        let n = counted(&output);
        assert!((10..=40).contains(&n), "{output}: {n}");
    }
    // What the model did not write out as text is not counted: a large
    // image beside a message with its content as a plain string, tool
    // results, encrypted reasoning.
    let image = "QUJD".repeat(50_000);
    let beside = format!(
        r#"[{{"type":"image_generation_call","result":"{image}"}},{{"type":"message","content":"Here it is."}}]"#
    );
    assert!(counted(&beside) < 10, "{}", counted(&beside));
    let results = format!(
        r#"[{{"type":"file_search_call","queries":["fox"],"results":[{{"text":"{}"}}]}}]"#,
        text.repeat(50)
    );
    assert!(counted(&results) < 10);
    assert_eq!(
        counted(r#"[{"type":"reasoning","summary":[],"encrypted_content":"gAAAAB"}]"#),
        0
    );
    assert_eq!(counted("[]"), 0);
    assert_eq!(counted("null"), 0);
    // Only a Responses answer's output is read.
    assert_eq!(counted_in("chat.completion", &message), 0);
}

#[test]
fn a_completion_reported_without_its_prompt_is_counted_not_billed_half() {
    let json = |usage: &str| {
        format!(r#"{{"choices":[{{"message":{{"content":"hello there"}}}}],"usage":{usage}}}"#)
    };
    for half in [
        r#"{"completion_tokens":5}"#,
        r#"{"output_tokens":5}"#,
        r#"{"prompt_tokens":null,"completion_tokens":5}"#,
    ] {
        assert_eq!(
            reported_usage_in_json(json(half).as_bytes()),
            None,
            "{half}"
        );
        let usage = usage_from_json(json(half).as_bytes(), 9);
        assert!(
            usage.estimated && usage.prompt_tokens == 9,
            "{half}: {usage:?}"
        );
    }
    // An embedding's report has no completion; a transcription's only seconds.
    let embedding =
        reported_usage_in_json(br#"{"data":[],"usage":{"prompt_tokens":4,"total_tokens":4}}"#);
    assert_eq!(
        embedding.map(|u| (u.prompt_tokens, u.completion_tokens)),
        Some((4, 0))
    );
    let seconds =
        reported_usage_in_json(br#"{"text":"hi","usage":{"type":"duration","seconds":3}}"#);
    assert_eq!(seconds.map(|u| u.audio_ms), Some(3000));
}

#[test]
fn leading_members_read_an_objects_start_as_far_as_it_goes() {
    let keys =
        |body: &str| -> Vec<String> { leading_members(body.as_bytes()).map(|(k, _)| k).collect() };
    assert_eq!(
        keys(r#" { "id" : "r", "\u006fbject":"response", "n":[1,{"a":2}] } "#),
        ["id", "object", "n"]
    );
    // Cut short: the members before the cut.
    assert_eq!(
        keys(r#"{"id":"r","object":"response","output":[{"text":"xxxx"#),
        ["id", "object"]
    );
    for not_members in ["", "[1]", "\"s\"", "{", "{}", "{1:2}", "{\"a\"2}"] {
        assert!(keys(not_members).is_empty(), "{not_members}");
    }
    let (_, value) = leading_members(br#"{"id":"resp_1"}"#).next().unwrap();
    assert_eq!(value.get(), "\"resp_1\"");
}

#[test]
fn a_responses_stream_without_deltas_or_usage_is_counted_from_its_final_response() {
    let text = "The quick brown fox jumps over the lazy dog again and again";
    let completed = |usage: &str| {
        format!(
            "event: response.output_text.done\ndata: {{\"type\":\"response.output_text.done\",\"text\":\"{text}\"}}\n\n\
             event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"output\":[{{\"type\":\"message\",\"content\":[{{\"type\":\"output_text\",\"text\":\"{text}\"}}]}}],\"usage\":{usage}}}}}\n\n"
        )
    };
    let metered = |stream: String| {
        let mut meter = StreamMeter::new(false);
        meter.feed(Bytes::from(stream));
        meter.finish();
        meter.usage(5)
    };
    let usage = metered(completed("null"));
    assert!(usage.estimated);
    assert!((10..=24).contains(&usage.completion_tokens), "{usage:?}");
    // Reported: as reported. With deltas: counted from them, once.
    let reported = metered(completed(r#"{"input_tokens":3,"output_tokens":7}"#));
    assert_eq!((reported.completion_tokens, reported.estimated), (7, false));
    let delta = format!(
        "data: {{\"type\":\"response.output_text.delta\",\"delta\":\"{text}\"}}\n\n{}",
        completed("null")
    );
    assert_eq!(metered(delta).completion_tokens, usage.completion_tokens);
}

proptest::proptest! {
    /// `lines` cuts as `split_inclusive` on `\n` does.
    #[test]
    fn lines_are_split_inclusive_on_line_ends(bytes in proptest::collection::vec(
        proptest::prop_oneof![proptest::strategy::Just(b'\n'), proptest::strategy::Just(b'\r'), proptest::prelude::any::<u8>()],
        0..64,
    )) {
        let split: Vec<&[u8]> = bytes.split_inclusive(|&b| b == b'\n').collect();
        proptest::prop_assert_eq!(lines(&bytes).collect::<Vec<_>>(), split);
    }
}

/// What a meter said of a stream, through every reader it has.
fn meter_said(meter: &StreamMeter) -> String {
    format!(
        "malformed {} halted {} error {:?} done {} last {} ended {} finished {} reasons {:?} \
         model {:?} answer {:?} text {:?} reported {:?} response {:?} usage {:?} finish {} add {}",
        meter.malformed(),
        meter.halted(),
        meter.error(),
        meter.saw_done(),
        meter.said_last(),
        meter.ended(),
        meter.finished(),
        meter.finish_reasons(),
        meter.model(),
        meter.answer_id(),
        meter.generated_text(),
        meter.reported_usage(),
        meter.response_id(),
        meter.usage(10),
        meter.saw_finish(),
        meter.may_add_usage(),
    )
}

/// Events of every kind the meter tells apart, with any line end.
fn any_stream() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let event = prop::sample::select(vec![
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo \\\"x\\\"\"}}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3,\"total_tokens\":15}}\n\n",
        "data: [DONE]\n\n",
        ": keep-alive\n\n",
        "event: message\ndata: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":\ndata: {\"content\":\"split\"}}]}\n\n",
        "data: not json\n\n",
        "data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n",
        "data: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}\n\n",
        "\n",
    ]);
    let line_end = prop::sample::select(vec!["\n", "\r\n", "\r"]);
    (prop::collection::vec((event, line_end), 0..8)).prop_map(|events| {
        events
            .into_iter()
            .map(|(e, line_end)| e.replace('\n', line_end))
            .collect()
    })
}

/// What `meter` passes on of `stream` read in pieces cut at `cuts` (in
/// one piece when there are none), its end included.
fn fed_in_reads(meter: &mut StreamMeter, stream: &str, cuts: &[proptest::sample::Index]) -> String {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
    at.sort_unstable();
    let (mut out, mut from) = (Vec::new(), 0);
    for to in at.into_iter().chain([stream.len()]) {
        out.extend_from_slice(&meter.feed(Bytes::copy_from_slice(&stream.as_bytes()[from..to])));
        from = to;
    }
    out.extend_from_slice(&meter.finish());
    String::from_utf8_lossy(&out).into_owned()
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]
    /// However a stream is cut into reads, the meter passes on the same
    /// bytes and says the same of it as when it comes in one piece.
    #[test]
    fn a_stream_is_metered_alike_however_it_is_cut(
        stream in any_stream(),
        cuts in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..6),
        strip in proptest::prelude::any::<bool>(),
        halt in proptest::prelude::any::<bool>(),
    ) {
        let meter = || {
            let mut meter = StreamMeter::new(strip);
            meter.halt_on_malformed(halt);
            meter
        };
        let (mut whole, mut cut) = (meter(), meter());
        let expected = fed_in_reads(&mut whole, &stream, &[]);
        proptest::prop_assert_eq!(fed_in_reads(&mut cut, &stream, &cuts), expected);
        proptest::prop_assert_eq!(meter_said(&cut), meter_said(&whole));
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
    /// A stream whose lines end with any mix of `\n`, `\r\n` and a lone
    /// `\r` is metered as the same stream with `\n`, and passed on as it,
    /// however it is cut into reads.
    #[test]
    fn every_line_end_is_read_and_passed_on_as_a_line_feed(
        with_cr in any_stream(),
        cuts in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..6),
        strip in proptest::prelude::any::<bool>(),
    ) {
        let stream = with_cr.replace("\r\n", "\n").replace('\r', "\n");
        let feed = |stream: &str, cuts: &[proptest::sample::Index]| {
            let mut meter = StreamMeter::new(strip);
            (fed_in_reads(&mut meter, stream, cuts), meter_said(&meter))
        };
        proptest::prop_assert_eq!(feed(&with_cr, &cuts), feed(&stream, &[]));
    }
}

#[test]
fn a_lone_carriage_return_ends_a_line_where_the_sdk_ends_it() {
    // The OpenAI SDKs end a line at a lone `\r`: here a comment and then
    // an event with text, which the meter read as one comment line (the
    // text was neither counted nor known to a resumed stream).
    let hidden = r#"data: {"choices":[{"index":0,"delta":{"content":"hidden text"}}]}"#;
    for upstream in [
        format!(": ka\r{hidden}\n\ndata: [DONE]\n\n"),
        format!(": ka\r{hidden}\r\rdata: [DONE]\r\r"),
        format!(": ka\r\n{hidden}\r\n\r\ndata: [DONE]\r\n\r\n"),
    ] {
        for step in [1, 2, 3, 7, upstream.len()] {
            let mut meter = StreamMeter::new(false);
            let out = run(&mut meter, &upstream, step);
            let expected = upstream.replace("\r\n", "\n").replace('\r', "\n");
            assert_eq!(out, expected, "{upstream:?} in reads of {step}");
            assert_eq!(meter.generated_text(), "hidden text", "{upstream:?}");
            assert!(meter.saw_done());
        }
    }
    // A `\r` that ends a read ends its line then: an event whose blank
    // line it is goes on at once (not when the next read comes), and a
    // `\n` the next read starts with is its second half.
    for rest in ["\n", "data: [DONE]\r\r"] {
        let mut meter = StreamMeter::new(false);
        let out = meter.feed(Bytes::from(format!("{hidden}\r\r")));
        assert_eq!(out, format!("{hidden}\n\n").as_bytes());
        assert_eq!(meter.generated_text(), "hidden text");
        let out = meter.feed(Bytes::from(rest));
        assert_eq!(
            out,
            rest.trim_start_matches('\n').replace('\r', "\n").as_bytes()
        );
    }
}

#[test]
fn done_is_read_as_the_sdks_read_it() {
    // The SDKs end a stream at a payload that starts with `[DONE]`; one
    // that is `[DONE]` after a blank data line or a second space is JSON
    // to them, and fails: left out here, and the stream is not done.
    for (event, done) in [
        ("data: [DONE]\n\n", true),
        ("data:[DONE]\n\n", true),
        ("data: [DONE] \n\n", true),
        ("data:\ndata: [DONE]\n\n", false),
        ("data:  [DONE]\n\n", false),
    ] {
        let mut meter = StreamMeter::new(false);
        let out = run(&mut meter, event, 64);
        assert_eq!(meter.saw_done(), done, "{event:?}");
        assert_eq!(out.is_empty(), !done, "{event:?}");
        assert_eq!(meter.malformed(), u64::from(!done), "{event:?}");
    }
}

#[test]
fn what_the_sdk_would_fail_on_is_left_out() {
    let hi = r#"data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}"#;
    for (upstream, passed, malformed) in [
        // No data, but a field that makes the Python SDK read "" as JSON.
        ("event: ping\n\n".to_owned(), "", 0),
        ("retry: 3000\n\n".to_owned(), "", 0),
        ("event\n\n".to_owned(), "", 0),
        // An `id` line is left out of its event (the SDK would keep it
        // and read every blank line after as an event).
        (format!("id: 7\n{hi}\n\n"), &*format!("{hi}\n\n"), 0),
        (format!("id\n{hi}\n\n\n"), &*format!("{hi}\n\n\n"), 0),
        // A line that is just `data` is data: "" is not JSON, but nothing
        // (a keep-alive), left out and not malformed (no break).
        ("data\n\n".to_owned(), "", 0),
        // Comments and other fields are passed on.
        (": keep-alive\n\n".to_owned(), ": keep-alive\n\n", 0),
        (
            format!("idx: 1\n{hi}\n\n"),
            &*format!("idx: 1\n{hi}\n\n"),
            0,
        ),
    ] {
        let mut meter = StreamMeter::new(false);
        assert_eq!(run(&mut meter, &upstream, 3), passed, "{upstream:?}");
        assert_eq!(meter.malformed(), malformed, "{upstream:?}");
    }
    // Bytes that are not UTF-8: a comment is left out, an event with data
    // is malformed (not billed), even where the meter reads nothing.
    for (upstream, malformed) in [
        (&b": \xff\n\n"[..], 0),
        (&b"data: {\"system_fingerprint\":\"\xff\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n"[..], 1),
    ] {
        let mut meter = StreamMeter::new(false);
        assert!(meter.feed(Bytes::from_static(upstream)).is_empty());
        assert!(meter.finish().is_empty());
        assert_eq!(meter.malformed(), malformed);
        assert_eq!(meter.generated_text(), "");
    }
}

#[test]
fn a_line_of_spaces_is_no_blank_line() {
    // The SDKs end an event only at an empty line: a line of spaces is a
    // field they ignore, so two data lines around it are one event (not
    // JSON, left out), not two that are billed and that the SDK fails on.
    let upstream = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n \r\n\t\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n";
    let mut meter = StreamMeter::new(false);
    assert_eq!(run(&mut meter, upstream, 5), "");
    assert_eq!(meter.malformed(), 1);
    assert_eq!(meter.generated_text(), "");
}

#[test]
fn only_a_usage_null_member_is_cut_not_a_key_ending_in_usage() {
    let run_one = |event: &str| {
        let mut meter = StreamMeter::new(true);
        let out = meter.feed(Bytes::from(format!("data: {event}\n\n")));
        String::from_utf8(out.to_vec()).unwrap()
    };
    // A key whose text ends `"usage` (an escaped quote) is not the member:
    // cutting there would merge the next key into it.
    for event in [
        r#"{"x\"usage":null,"choices":[{"delta":{"content":"hi"}}]}"#,
        r#"{"x\"usage": null, "choices":[{"delta":{"content":"hi"}}]}"#,
    ] {
        assert_eq!(run_one(event), format!("data: {event}\n\n"));
    }
    // The member itself is, wherever it stands in its object, and a later
    // one when the first match is not a member.
    for (event, cut) in [
        (r#"{"usage":null,"a":1}"#, r#"{"a":1}"#),
        (r#"{"a":1, "usage":null,"b":2}"#, r#"{"a":1, "b":2}"#),
        (r#"{"a":1,"usage":null}"#, r#"{"a":1}"#),
        (
            r#"{"x\"usage":null,"y":{"usage":null,"b":2}}"#,
            r#"{"x\"usage":null,"y":{"b":2}}"#,
        ),
    ] {
        assert_eq!(run_one(event), format!("data: {cut}\n\n"), "{event}");
    }
}

#[test]
fn a_choice_or_delta_that_is_not_an_object_makes_the_event_malformed() {
    for event in [
        r#"{"choices":[[{"content":"hello world"}]]}"#,
        r#"{"choices":[[null,null,null,"stop"]]}"#,
        r#"{"choices":[{"delta":[null,null,null,null,null,"r"]}]}"#,
        r#"{"choices":[{"message":["hello"]}]}"#,
        r#"{"choices":[1]}"#,
    ] {
        let mut meter = StreamMeter::new(false);
        let out = meter.feed(Bytes::from(format!("data: {event}\n\n")));
        assert!(out.is_empty(), "{event}");
        assert_eq!(meter.malformed(), 1, "{event}");
        assert_eq!(meter.generated_text(), "", "{event}");
        assert!(!meter.saw_finish(), "{event}");
    }
}

#[test]
fn a_choice_that_gives_index_or_refusal_twice_is_passed_on_as_before() {
    for event in [
        r#"{"choices":[{"index":0,"index":0,"delta":{"content":"x"}}]}"#,
        r#"{"choices":[{"index":0,"delta":{"content":"x","refusal":null,"refusal":null}}]}"#,
        r#"{"choices":[{"\u0069ndex":1,"index":0,"delta":{"content":"x"}}]}"#,
    ] {
        let mut meter = StreamMeter::new(false);
        let out = meter.feed(Bytes::from(format!("data: {event}\n\n")));
        assert_eq!(&out[..], format!("data: {event}\n\n").as_bytes(), "{event}");
        assert_eq!(meter.malformed(), 0, "{event}");
        assert_eq!(meter.generated_text(), "x", "{event}");
    }
}

#[test]
fn a_stream_holds_no_large_buffer_between_events() {
    let mut meter = StreamMeter::new(false);
    // An event of about 1 MB (under the bound it is read within), in
    // 16 KiB reads, then a small one.
    let comments = ": padding\n".repeat(100_000);
    let big = format!("{comments}data: {{\"choices\":[{{\"delta\":{{\"content\":\"a\"}}}}]}}\n\n");
    for piece in big.as_bytes().chunks(16 * 1024) {
        meter.feed(Bytes::copy_from_slice(piece));
    }
    meter.feed(Bytes::from_static(
        b"data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n",
    ));
    assert_eq!(meter.generated_text(), "ab");
    assert!(
        meter.event.capacity() <= 64 * 1024,
        "{}",
        meter.event.capacity()
    );
    assert!(
        meter.partial.capacity() <= 64 * 1024,
        "{}",
        meter.partial.capacity()
    );
    // Nor the output buffer a large event grew (it would be taken back
    // whole once what went on is gone).
    let mut meter = StreamMeter::new(false);
    drop(meter.feed(Bytes::from(big)));
    meter.out.reserve(1);
    assert!(
        meter.out.capacity() <= 64 * 1024,
        "{}",
        meter.out.capacity()
    );
}

/// Runs of chat completion chunks alike but for their text (plain, with
/// escapes, quotes, control characters, non-ASCII, `null`, a number),
/// each run of its own shape: the id, which member has the text, a finish
/// reason, a second choice, the `"usage":null` and where it is, an error,
/// a usage report, spacing, OpenAI's `obfuscation` padding (first or last,
/// its value differing like the text, given twice). What the meter must
/// tell apart from the last event it read in full.
fn alike_chunks() -> impl proptest::strategy::Strategy<Value = Vec<String>> {
    use proptest::prelude::*;
    let text = prop::sample::select(vec![
        "\"tok\"",
        "\"\"",
        "\"a longer piece of text \"",
        "\"with \\\"quotes\\\"\"",
        "\"back\\\\slash\"",
        "\"line\\nfeed\"",
        "\"raw\ttab\"",
        "\"raw\u{1}\"",
        "\"caf\u{e9} \u{1f600}\"",
        "\"usage\\\":null,\\\"x\"",
        "\"}]}\"",
        "null",
        "1",
    ]);
    let member = prop::sample::select(vec![
        "content",
        "content",
        "content",
        "reasoning_content",
        "tool_calls",
        "refusal",
    ]);
    let id = prop::sample::select(vec!["\"c\"", "\"c\"", "\"d\"", "null"]);
    let finish = prop::sample::select(vec!["null", "null", "null", "\"stop\""]);
    let extra = prop::sample::select(vec![
        "",
        ",\"usage\":null",
        ",\"usage\": null",
        ",\"obfuscation\":\"ab\"",
        ",\"error\":null",
        ",\"error\":{\"message\":\"overloaded\"}",
        ",\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}",
    ]);
    let lead = prop::sample::select(vec!["", "\"usage\":null,", "\"usage\": null, "]);
    let index = prop::sample::select(vec!["0", "0", "0", "1"]);
    let second = prop::sample::select(vec![
        "",
        "",
        "",
        ",{\"index\":1,\"delta\":{\"content\":\"b\"}}",
    ]);
    let space = prop::sample::select(vec!["", "", " "]);
    // OpenAI's padding, which differs from event to event like the text.
    let padding = prop::sample::select(vec![
        "\"ab\"",
        "\"xyz12\"",
        "\"\"",
        "\"e\\\"q\"",
        "\"t\tb\"",
        "7",
    ]);
    let padded = prop::sample::select(vec!["no", "first", "last", "last"]);
    let shape = (
        member, id, finish, extra, lead, index, second, space, padded,
    );
    let run = (shape, prop::collection::vec((text, padding), 1..6));
    prop::collection::vec(run, 1..5).prop_map(|runs| {
        let mut events = Vec::new();
        for ((member, id, finish, extra, lead, index, second, space, padded), texts) in runs {
            for (text, padding) in texts {
                let (first, last) = match padded {
                    "first" => (format!("\"obfuscation\":{padding},"), String::new()),
                    "last" => (String::new(), format!(",\"obfuscation\":{padding}")),
                    _ => (String::new(), String::new()),
                };
                events.push(format!(
                    "data: {{{first}{lead}\"id\":{id},\"object\":\"chat.completion.chunk\",\"created\":1,\
                     \"model\":\"m\",\"choices\":[{{\"index\":{index},\"delta\":{{\"{member}\":{space}{text}}},\
                     \"finish_reason\":{finish}}}{second}]{extra}{last}}}\n\n"
                ));
            }
        }
        events
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]
    /// An event read as like the last one (`cost::last`) is metered, passed
    /// on and left for the resumable record exactly as when every event is
    /// read in full.
    #[test]
    fn an_event_like_the_last_is_metered_as_if_read_in_full(
        events in alike_chunks(),
        strip in proptest::prelude::any::<bool>(),
    ) {
        let run = |in_full: bool| {
            super::memo::clear();
            let mut meter = StreamMeter::new(strip);
            if in_full {
                meter.read_every_event_in_full();
            }
            let mut seen = Vec::new();
            for event in &events {
                let out = meter.feed(Bytes::copy_from_slice(event.as_bytes()));
                let out = String::from_utf8_lossy(&out).into_owned();
                let left: Vec<_> = out
                    .lines()
                    .filter_map(|line| line.strip_prefix("data:"))
                    .map(|json| super::memo::take(json.trim().as_bytes()))
                    .collect();
                seen.push((out, left));
            }
            let end = String::from_utf8_lossy(&meter.finish()).into_owned();
            (seen, end, meter_said(&meter))
        };
        let in_full = run(true);
        proptest::prop_assert_eq!(run(false), in_full);
    }
}

#[test]
fn tokens_cost_the_price_of_the_tier_they_were_served_at() {
    use crate::config::TokenPrice;
    let mut price = PRICE;
    price.tiers[1] = Some(TokenPrice {
        input: 300_000,
        output: 1_200_000,
        cached_input: 150_000,
    });
    let usage = |tier| Usage {
        prompt_tokens: 1000,
        completion_tokens: 500,
        cached_tokens: 400,
        tier,
        ..Default::default()
    };
    // The standard price, as in `costs_cached_and_uncached_tokens_exactly`.
    assert_eq!(usage(None).cost_pusd(Some(&price)), 420_000_000);
    assert_eq!(
        usage(Some(ServiceTier::Default)).cost_pusd(Some(&price)),
        420_000_000
    );
    // Priority at twice the price: 600 * 0.30 + 400 * 0.15 + 500 * 1.20.
    assert_eq!(
        usage(Some(ServiceTier::Priority)).cost_pusd(Some(&price)),
        840_000_000
    );
    // A tier without a price of its own costs the standard price.
    assert_eq!(
        usage(Some(ServiceTier::Flex)).cost_pusd(Some(&price)),
        420_000_000
    );
    // Attempts together keep the last one's tier, else the first's.
    let plus = |a, b| usage(a).plus(usage(b)).tier;
    assert_eq!(
        plus(Some(ServiceTier::Flex), Some(ServiceTier::Priority)),
        Some(ServiceTier::Priority)
    );
    assert_eq!(plus(Some(ServiceTier::Flex), None), Some(ServiceTier::Flex));
}

#[test]
fn a_tier_is_named_as_openai_and_anthropic_name_it() {
    for (name, tier) in [
        ("default", Some(ServiceTier::Default)),
        ("standard", Some(ServiceTier::Default)),
        ("flex", Some(ServiceTier::Flex)),
        ("priority", Some(ServiceTier::Priority)),
        ("fast", Some(ServiceTier::Priority)),
        ("scale", Some(ServiceTier::Scale)),
        ("auto", None),
        ("batch", None),
        ("Priority", None),
        ("", None),
    ] {
        assert_eq!(ServiceTier::from_name(name), tier, "{name}");
    }
    // Anthropic's name for the standard tier is no name for it in a
    // request (OpenAI refuses it).
    assert_eq!(ServiceTier::asked("standard"), None);
    assert_eq!(ServiceTier::asked("fast"), Some(ServiceTier::Priority));
    let json = |text: &str| ServiceTier::from_json(&RawValue::from_string(text.into()).unwrap());
    assert_eq!(json(r#""flex""#), Some(ServiceTier::Flex));
    assert_eq!(json(r#""fl\u0065x""#), Some(ServiceTier::Flex));
    assert_eq!(json("null"), None);
    assert_eq!(json(r#"{"tier":"flex"}"#), None);
    assert_eq!(json(r#"["flex"]"#), None);
}

#[test]
fn a_json_answers_tier_is_its_own_top_level_member_only() {
    let tier = |body: &str| reported_tier_in_json(body.as_bytes());
    // OpenAI's chat completion: after its usage.
    assert_eq!(
        tier(
            r#"{"id":"c","choices":[],"usage":{"prompt_tokens":1},"service_tier":"priority","system_fingerprint":null}"#
        ),
        Some(ServiceTier::Priority)
    );
    // A Responses answer: before its usage, with the client's metadata
    // echoed after it, which names a cheaper tier.
    let response = r#"{"id":"resp_1","object":"response","output":[{"type":"message","content":[{"type":"output_text","text":"say \"service_tier\":\"flex\""}]}],"service_tier":"default","usage":{"input_tokens":1,"output_tokens":1},"metadata":{"service_tier":"flex"}}"#;
    assert_eq!(tier(response), Some(ServiceTier::Default));
    // Only nested, or only in text: the answer says nothing.
    assert_eq!(
        tier(
            r#"{"id":"resp_1","output":"\"service_tier\":\"flex\"","metadata":{"service_tier":"flex"}}"#
        ),
        None
    );
    // The usage read from the end of a chat completion has it already
    // (no second pass); one before its usage is left to the whole read.
    let chat = r#"{"id":"c","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2},"service_tier":"priority","system_fingerprint":null}"#;
    let usage = reported_usage_in_json(chat.as_bytes()).unwrap();
    assert_eq!(
        (usage.completion_tokens, usage.tier),
        (2, Some(ServiceTier::Priority))
    );
    let escaped = chat.replace("\"service_tier\"", "\"service_t\\u0069er\"");
    assert_ne!(escaped, chat);
    assert_eq!(
        reported_usage_in_json(escaped.as_bytes()).unwrap().tier,
        Some(ServiceTier::Priority)
    );
    assert_eq!(
        reported_usage_in_json(response.as_bytes()).unwrap().tier,
        None
    );
    assert_eq!(tier(r#"{"service_tier":"auto"}"#), None);
    assert_eq!(tier(r#"{"service_tier":null}"#), None);
    // Given twice, the last (as JSON readers, the SDKs' among them, take
    // it); its name escaped, the same member.
    assert_eq!(
        tier(r#"{"service_tier":"flex","service_tier":"priority"}"#),
        Some(ServiceTier::Priority)
    );
    assert_eq!(
        tier(r#"{"service_t\u0069er":"priority","usage":{}}"#),
        Some(ServiceTier::Priority)
    );
    assert_eq!(tier(r#"[{"service_tier":"flex"}]"#), None);
    assert_eq!(tier(r#"{"service_tier":"flex""#), None);
}

#[test]
fn a_stream_is_billed_at_the_tier_its_events_name() {
    // A chat stream names its tier in every chunk, the usage chunk too.
    let chat = [
        "data: {\"id\":\"c\",\"service_tier\":\"priority\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n",
        "data: {\"id\":\"c\",\"service_tier\":\"priority\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"}}]}\n\n",
        "data: {\"id\":\"c\",\"service_tier\":\"priority\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"id\":\"c\",\"service_tier\":\"priority\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n",
        "data: [DONE]\n\n",
    ]
    .concat();
    for size in [1, 7, chat.len()] {
        let mut meter = StreamMeter::new(false);
        assert_eq!(run(&mut meter, &chat, size), chat);
        let usage = meter.usage(0);
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (3, 2));
        assert_eq!(usage.tier, Some(ServiceTier::Priority), "chunks of {size}");
        assert_eq!(
            meter.reported_usage().unwrap().tier,
            Some(ServiceTier::Priority)
        );
    }
    // Without a usage report, the gateway's count is at the tier too.
    let cut = chat
        .split("data: {\"id\":\"c\",\"service_tier\":\"priority\",\"choices\":[],")
        .next()
        .unwrap();
    let mut meter = StreamMeter::new(false);
    run(&mut meter, cut, 5);
    assert!(meter.usage(0).estimated);
    assert_eq!(meter.usage(0).tier, Some(ServiceTier::Priority));
    // A Responses stream: `auto` as created, what served it once complete.
    let responses = [
        "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"service_tier\":\"auto\",\"usage\":null}}\n\n",
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"delta\":\"Hi\"}\n\n",
        "event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":2,\"response\":{\"id\":\"resp_1\",\"service_tier\":\"flex\",\"usage\":{\"input_tokens\":4,\"output_tokens\":1},\"metadata\":{\"service_tier\":\"scale\"}}}\n\n",
    ]
    .concat();
    let mut meter = StreamMeter::new(false);
    run(&mut meter, &responses, 9);
    assert_eq!(meter.usage(0).tier, Some(ServiceTier::Flex));
    // A stream that names no tier leaves it to the request's.
    let mut meter = StreamMeter::new(false);
    run(
        &mut meter,
        &(stream_events(false).concat() + USAGE_EVENT),
        3,
    );
    assert_eq!(meter.usage(0).tier, None);
    // Named twice in a chunk (or its response), the last counts, and the
    // events pass as they came (a struct's field given twice would have
    // made them unreadable, and left out).
    let chat_twice = chat.replace(
        "\"service_tier\":\"priority\"",
        "\"service_tier\":\"flex\",\"service_tier\":\"priority\"",
    );
    let responses_twice = responses.replace(
        "\"service_tier\":\"flex\"",
        "\"service_tier\":\"priority\",\"service_tier\":\"flex\"",
    );
    for (twice, last) in [
        (chat_twice, ServiceTier::Priority),
        (responses_twice, ServiceTier::Flex),
    ] {
        for size in [1, 7, twice.len()] {
            let mut meter = StreamMeter::new(false);
            assert_eq!(run(&mut meter, &twice, size), twice);
            assert_eq!(meter.malformed(), 0);
            assert_eq!(meter.usage(0).tier, Some(last));
            assert!(!meter.usage(0).estimated);
        }
    }
    // An event that is an array is read as before (no tier in it).
    let mut meter = StreamMeter::new(false);
    assert_eq!(run(&mut meter, "data: []\n\n", 4), "data: []\n\n");
    assert_eq!(meter.malformed(), 0);
}

#[test]
fn a_responses_tier_is_the_ending_events_even_when_too_long_to_hold() {
    // `response.created` echoes the request's tier: not what served it.
    let run_responses = |created: &str, completed: &str| {
        let stream = format!(
            "event: response.created\ndata: {{\"type\":\"response.created\",\"sequence_number\":0,\"response\":{{\"id\":\"resp_1\",\"service_tier\":\"{created}\",\"usage\":null}}}}\n\n\
             event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"delta\":\"Hi\"}}\n\n{completed}"
        );
        let mut meter = StreamMeter::new(false);
        assert_eq!(
            run(&mut meter, &stream, 64 * 1024),
            stream,
            "passed through whole"
        );
        meter.usage(0).tier
    };
    let completed = |tier: &str, text_len: usize, metadata: &str| {
        let text = "x".repeat(text_len);
        format!(
            "event: response.completed\ndata: {{\"type\":\"response.completed\",\"sequence_number\":2,\"response\":{{\"id\":\"resp_1\",\"output\":[{{\"type\":\"message\",\"content\":[{{\"type\":\"output_text\",\"text\":\"{text}\"}}]}}],{tier}\"usage\":{{\"input_tokens\":10,\"output_tokens\":50}},\"metadata\":{metadata}}}}}\n\n"
        )
    };
    // Cut after its start: the echo is no tier.
    assert_eq!(run_responses("flex", ""), None);
    // Ending without naming one: none either.
    assert_eq!(run_responses("flex", &completed("", 10, "{}")), None);
    let big = MAX_LINE_BYTES + MAX_LINE_BYTES / 2;
    for size in [10, big] {
        let named = |tier| format!("\"service_tier\":\"{tier}\",");
        assert_eq!(
            run_responses("auto", &completed(&named("priority"), size, "{}")),
            Some(ServiceTier::Priority),
            "{size}"
        );
        assert_eq!(
            run_responses("flex", &completed(&named("default"), size, "{}")),
            Some(ServiceTier::Default),
            "{size}"
        );
    }
    // Too long to hold, its tail is read for the dearest tier it names, a
    // discount never (a client's metadata echoed there may name one).
    let flex_metadata = r#"{"service_tier":"flex"}"#;
    let priority = "\"service_tier\":\"priority\",";
    assert_eq!(
        run_responses("auto", &completed(priority, big, flex_metadata)),
        Some(ServiceTier::Priority)
    );
    assert_eq!(
        run_responses("auto", &completed("\"service_tier\":\"flex\",", big, "{}")),
        None
    );
}

#[test]
fn a_json_answers_tier_is_read_from_its_tail_and_its_own_member_only() {
    // Too large to keep whole: the tier after its usage, from the tail.
    let tail = br#"xxxx"}}],"usage":{"prompt_tokens":5,"completion_tokens":7},"service_tier":"priority","system_fingerprint":null}"#;
    let usage = reported_usage_in_json_tail(tail).unwrap();
    assert_eq!(
        (usage.completion_tokens, usage.tier),
        (7, Some(ServiceTier::Priority))
    );
    // A usage nested in another member is taken (as before), but not the
    // tier nested with it: only the answer's own.
    let nested = br#"{"id":"x","object":"chat.completion","response":{"usage":{"prompt_tokens":1000,"completion_tokens":1000},"service_tier":"flex"}}"#;
    assert_eq!(usage_from_json(nested, 0).tier, None);
    let own = br#"{"id":"x","choices":[{"message":{"content":"hi"}}],"service_tier":"priority"}"#;
    let usage = usage_from_json(own, 3);
    assert!(usage.estimated);
    assert_eq!(usage.tier, Some(ServiceTier::Priority));
    // Bytes that are not UTF-8 in an `index` or `refusal` of the answer
    // itself are skipped unread, as before: counted by its text.
    let mut body = br#"{"id":"x","choices":[{"message":{"content":"hi"}}],"x":""#.to_vec();
    body.extend_from_slice(&b"a".repeat(4000));
    body.extend_from_slice(b"\",\"refusal\":\"\xff\"}");
    let usage = usage_from_json(&body, 3);
    assert!(usage.estimated);
    assert_eq!(usage.completion_tokens, 1, "{usage:?}");
}
