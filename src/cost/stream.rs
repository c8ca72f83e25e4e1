//! Metering an SSE stream on its way through, event by event: the final
//! usage chunk read (and taken out again when the client did not ask for
//! it), the generated text counted for an estimate, whether the stream
//! finished, never holding more than one event ([`MAX_LINE_BYTES`]).
//!
//! An event is passed on when its blank line arrives, its lines as they
//! came (a `data:` payload split over several lines is read joined, as the
//! SSE format says). An event whose payload is neither JSON nor `[DONE]` is
//! left out of what the client gets (OpenAI SDKs would fail on it) and is
//! not counted; the stream goes on, unless the meter was asked to halt
//! there (a stream that can be continued elsewhere breaks instead). An
//! event too long to hold passes through unread. The provider's error
//! event ends what is passed on, as the last event of a whole answer does
//! (what follows either is read only for a usage report).

use super::last::{Known, LastEvent};
use super::{sample_text, Estimate, Probe, ServiceTier, Usage, MAX_LINE_BYTES};
use crate::openai::ApiError;
use bytes::{Buf, Bytes, BytesMut};
use memchr::memmem::Finder;
use serde_json::value::RawValue;
use std::ops::Range;
use std::sync::{LazyLock, OnceLock};

/// Generated text a stream keeps to count tokens in, should the provider
/// report no usage (the rest is counted at the sample's rate).
pub(crate) const SAMPLE_BYTES: usize = 64 * 1024;

/// The most finish reasons kept (one per choice).
const MAX_FINISH_REASONS: usize = 16;

/// The most the event's and the output's buffers keep between events (a
/// larger one is let go).
const KEPT_EVENT_BYTES: usize = 16 * 1024;

/// The start of an event too long to hold that is kept to read its type.
const OVERSIZED_HEAD_BYTES: usize = 4096;

/// Reads usage from an SSE stream on its way through, and optionally
/// removes what the gateway added (the usage chunk, `"usage":null` fields).
#[derive(Debug)]
pub struct StreamMeter {
    strip_usage: bool,
    /// Bytes not yet read as lines.
    pub(super) partial: BytesMut,
    /// How much of `partial` is known to hold no line end.
    scanned: usize,
    /// The last line read ended with a `\r` at the end of its read (a
    /// `\n` that comes next belongs to it).
    after_cr: bool,
    /// The complete lines of the event being read, until its blank line.
    pub(super) event: BytesMut,
    /// The bytes of those lines as they came (its `id` lines, left out of
    /// `event`, too): an event is too long to hold by its own length,
    /// however its bytes were split between reads.
    event_bytes: usize,
    /// Inside an event too long to hold: passed through until its end.
    oversized: bool,
    /// Part of a line of it went through unended (or, after the last
    /// event, was let go unread): the next line end is that line's, not a
    /// blank line ending the event.
    oversized_mid_line: bool,
    /// Its first and last bytes, kept to read its type (a Responses
    /// stream's `response.completed` may be longer than the bound: it
    /// carries the whole output again), its usage (last in it), and
    /// whether it is an error and of which class.
    oversized_head: Vec<u8>,
    oversized_tail: Vec<u8>,
    usage: Option<Usage>,
    /// The processing tier the last event that named one said.
    tier: Option<ServiceTier>,
    generated_bytes: u64,
    /// The stream's `data: [DONE]` went by.
    saw_done: bool,
    /// The first in-band error event that went by, as the gateway's error
    /// ([`ApiError::from_in_band`]): a `[DONE]` after it does not end a
    /// whole answer.
    error: Option<Box<ApiError>>,
    /// An event with choices went by (an OpenAI completion stream).
    saw_choices: bool,
    /// A choice's `finish_reason` went by, and which (at most
    /// [`MAX_FINISH_REASONS`]).
    saw_finish: bool,
    finish_reasons: Vec<String>,
    /// A Responses API stream: its response's id, and whether its end
    /// (`response.completed`, `incomplete`, `failed`, or `error`) went by.
    response_id: Option<String>,
    saw_response_end: bool,
    /// A stream of speech, a transcription or an image (typed events),
    /// and whether its last event (`.done`, `.completed`) went by.
    media: bool,
    saw_media_end: bool,
    /// The Responses stream ended with its answer (`response.completed` or
    /// `incomplete`, not a failure).
    saw_response_answer: bool,
    /// The number the next Responses API event takes: past every
    /// `sequence_number` seen, and one past the count of events.
    next_sequence: u64,
    /// What ends the event the client has only part of: nothing at an
    /// event's end, else the line ends it lacks (`"\n"` or `"\n\n"`).
    event_end: &'static [u8],
    /// The largest `sequence_number` in the event too long to hold that
    /// goes on, read as it passes.
    oversized_number: Option<u64>,
    /// Events left out because they were not JSON.
    malformed: u64,
    /// Stop at an event that is not JSON (see [`StreamMeter::halt_on_malformed`]).
    halt_on_malformed: bool,
    /// Stopped at one: the rest is held until told to go on.
    halted: bool,
    /// The generated values seen (JSON, a comma after each), up to
    /// [`SAMPLE_BYTES`], and how many of `generated_bytes` they are.
    sample: Vec<u8>,
    sampled_bytes: u64,
    /// The answer's `id`, `object`, `created` and `model` (raw JSON), from
    /// its first event.
    identity: Option<[String; 4]>,
    /// Counting when the provider reports none: the request, and the model
    /// whose encoding counts.
    estimate: Option<(Estimate, String)>,
    counted: OnceLock<Usage>,
    /// Written before the next event (the gateway's usage chunk, before
    /// `[DONE]`).
    before_next: Vec<u8>,
    /// The buffer what goes on is written in: each chunk's share is split
    /// off, and its memory taken back in place once the client's copy is
    /// gone (no allocation a chunk).
    pub(super) out: BytesMut,
    /// The last event read in full, for the next ones that differ from it
    /// only in their text.
    last: LastEvent,
}

/// What to do with a whole event.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Pass it on (cut where `judge` found its `"usage":null`, if it looked).
    Keep(Cut),
    /// Leave it out (with its blank line).
    Drop,
    /// Not JSON: leave it out, and halt when asked to.
    Malformed,
}

/// Where [`StreamMeter::write`] takes a `"usage":null` out of an event
/// passed on, when stripping.
#[derive(Debug, PartialEq, Eq)]
enum Cut {
    /// Not looked for yet: `write` looks in each `data:` line.
    Unknown,
    /// Looked for, and not there.
    Nowhere,
    /// At these bytes of the event.
    At(Range<usize>),
}

/// A Responses API event's `sequence_number`, as the largest whole number
/// after a `"sequence_number":` anywhere in `json`. Found by a scan rather
/// than by serde, which refuses an event that repeats the member, and
/// reads an event too long to hold piece by piece; one found elsewhere in the event (in a string, a nested object) can only make
/// the gateway's own number larger, never one an SDK would take as
/// already seen.
fn sequence_number(json: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"sequence_number\"";
    memchr::memmem::find_iter(json, KEY)
        .filter_map(|at| {
            let after = json[at + KEY.len()..]
                .trim_ascii_start()
                .strip_prefix(b":")?
                .trim_ascii_start();
            let digits = after.iter().take_while(|b| b.is_ascii_digit()).count();
            match after.get(digits) {
                // A fraction or exponent: not a whole number.
                Some(b'.' | b'e' | b'E') => None,
                _ => std::str::from_utf8(&after[..digits]).ok()?.parse().ok(),
            }
        })
        .max()
}

/// Bytes each side of the seam between two reads of an event too long to
/// hold in which its `sequence_number` is looked for: the member's name,
/// its colon and a number of 20 digits, with room to spare.
const SEAM_BYTES: usize = 48;

/// The number the event after one numbered `number` takes, when `next`
/// was its own: one more, or past its number.
fn numbered_after(next: u64, number: Option<u64>) -> u64 {
    let counted = next.saturating_add(1);
    number.map_or(counted, |number| counted.max(number.saturating_add(1)))
}

/// Whether a Responses stream event of type `kind` ends the stream with
/// its answer (`response.completed`, or `response.incomplete`).
fn ends_with_answer(kind: &str) -> bool {
    matches!(kind, "response.completed" | "response.incomplete")
}

/// Whether `kind` is an event of a streamed speech, transcription or image
/// (`Some`), and whether it is the stream's last (the whole answer, with
/// its usage).
pub fn media_event(kind: &str) -> Option<bool> {
    let (stream, event) = kind.rsplit_once('.')?;
    matches!(
        stream,
        "speech.audio" | "transcript.text" | "image_generation" | "image_edit"
    )
    .then(|| matches!(event, "done" | "completed"))
}

impl StreamMeter {
    /// A meter; `strip_usage` when the client did not ask for usage.
    pub fn new(strip_usage: bool) -> Self {
        StreamMeter {
            strip_usage,
            partial: BytesMut::new(),
            scanned: 0,
            after_cr: false,
            event: BytesMut::new(),
            event_bytes: 0,
            oversized: false,
            oversized_mid_line: false,
            oversized_head: Vec::new(),
            oversized_tail: Vec::new(),
            usage: None,
            tier: None,
            generated_bytes: 0,
            saw_done: false,
            error: None,
            saw_choices: false,
            saw_finish: false,
            finish_reasons: Vec::new(),
            response_id: None,
            saw_response_end: false,
            media: false,
            saw_media_end: false,
            saw_response_answer: false,
            next_sequence: 0,
            event_end: b"",
            oversized_number: None,
            malformed: 0,
            halt_on_malformed: false,
            halted: false,
            sample: Vec::new(),
            sampled_bytes: 0,
            identity: None,
            estimate: None,
            counted: OnceLock::new(),
            before_next: Vec::new(),
            out: BytesMut::new(),
            last: LastEvent::default(),
        }
    }

    /// Counts with `estimate` (as `model`'s encoding does) when the
    /// provider reports no usage; a client that asked for usage then gets
    /// the gateway's count as the usage chunk.
    pub fn with_estimate(mut self, estimate: Estimate, model: &str) -> Self {
        self.estimate = Some((estimate, model.to_owned()));
        self
    }

    /// Events left out because they were not JSON.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// With `on`, an event that is not JSON stops the meter: [`feed`]
    /// returns the events before it and holds the rest, and [`halted`] says
    /// so (a stream that may be continued elsewhere treats it as a break).
    /// Turning it off goes on (the next `feed` returns the rest), and the
    /// event it stopped at counts as left out ([`malformed`]); one a stream
    /// broke at does not.
    ///
    /// [`feed`]: StreamMeter::feed
    /// [`halted`]: StreamMeter::halted
    /// [`malformed`]: StreamMeter::malformed
    pub fn halt_on_malformed(&mut self, on: bool) {
        self.halt_on_malformed = on;
        if !on && self.halted {
            self.halted = false;
            self.malformed += 1;
        }
    }

    /// Whether the meter stopped at an event that is not JSON.
    pub fn halted(&self) -> bool {
        self.halted
    }

    /// Takes one upstream chunk and returns what to send the client now:
    /// the whole events seen so far (edited when stripping).
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if self.ended() {
            self.read_after_last(&chunk);
            return Bytes::new();
        }
        let mut out = std::mem::take(&mut self.out);
        out.reserve(chunk.len() + self.event.len());
        // The chunk itself when nothing waits before it (providers mostly
        // write whole events), else added to what waits; its lines are
        // read in place and what is left of the last waits.
        let mut partial = match std::mem::take(&mut self.partial) {
            waiting if waiting.is_empty() => chunk
                .try_into_mut()
                .unwrap_or_else(|shared| BytesMut::from(&shared[..])),
            mut waiting => {
                waiting.extend_from_slice(&chunk);
                waiting
            }
        };
        if self.halted {
            self.partial = partial;
            return self.hand_out(out);
        }
        // Bytes already scanned hold no line end. A line ends at `\n`,
        // `\r\n` or a lone `\r`, as SSE has it (and the OpenAI SDKs read
        // it), and goes on ending in `\n`: every reader after the meter
        // (the client's, the resumable record's) splits events where they
        // were metered. A `\r` that ends a read ends its line at once (a
        // blank one ends its event now); a `\n` the next read starts with
        // is its second half.
        let mut scan_from = self.scanned;
        let mut read = rest_of_line_end(&mut self.after_cr, &partial);
        while let Some(end) = line_end(&partial[read + scan_from..]) {
            let from = read + scan_from;
            partial[from + end.at] = b'\n';
            self.after_cr = end.cr_last;
            scan_from = 0;
            self.line(&partial[read..=from + end.at], &mut out);
            read = from + end.next;
            if self.ended() {
                self.read_after_last(&partial[read..]);
            }
            if self.halted || self.ended() {
                if !self.ended() {
                    partial.advance(read);
                    self.partial = partial;
                }
                self.scanned = 0;
                return self.hand_out(out);
            }
        }
        partial.advance(read);
        // An empty one lets the chunk's buffer go (a stream waits between
        // tokens); the next chunk brings its own.
        if !partial.is_empty() {
            self.partial = partial;
        }
        self.scanned = self.partial.len();
        if self.too_long_to_hold(self.partial.len()) {
            self.go_oversized(&mut out);
        }
        if self.oversized {
            self.generated_bytes += self.partial.len() as u64;
            let partial = std::mem::take(&mut self.partial);
            self.keep_oversized(&partial);
            out.extend_from_slice(&partial);
            self.oversized_mid_line |= !partial.is_empty();
            self.scanned = 0;
        }
        self.hand_out(out)
    }

    /// Whether the event being read, with `more` bytes of a line not yet
    /// ended, is longer than [`MAX_LINE_BYTES`] (and not already passing
    /// through as one).
    fn too_long_to_hold(&self, more: usize) -> bool {
        !self.oversized && self.event_bytes + more > MAX_LINE_BYTES
    }

    /// The event being read is too long to hold: what there is of it goes
    /// on unread (into `out`), and the rest of it as it comes.
    fn go_oversized(&mut self, out: &mut BytesMut) {
        self.oversized = true;
        self.generated_bytes += self.event.len() as u64;
        let event = std::mem::take(&mut self.event);
        self.keep_oversized(&event);
        out.extend_from_slice(&event);
    }

    /// What was written in `out`, to go on; the buffer is kept for the
    /// next chunk unless a large one grew it.
    fn hand_out(&mut self, mut out: BytesMut) -> Bytes {
        self.note_handed_out(&out);
        let written = out.split().freeze();
        if written.len() + out.capacity() <= KEPT_EVENT_BYTES {
            self.out = out;
        }
        written
    }

    /// Notes where what goes to the client ends: after an event, after a
    /// line of one, or inside a line.
    fn note_handed_out(&mut self, out: &[u8]) {
        self.event_end = match out {
            [] => self.event_end,
            [.., b'\n', b'\n'] => b"",
            [b'\n'] if self.event_end == b"\n" => b"",
            [.., b'\n'] => b"\n",
            _ => b"\n\n",
        };
    }

    /// What the client needs before an event the gateway adds: the end of
    /// the event it has only part of (the provider's last one may lack its
    /// blank line; one too long to hold goes on as it comes), else nothing.
    pub fn event_end(&self) -> &'static [u8] {
        self.event_end
    }

    /// Whether the client has part of a line of an event too long to hold,
    /// its body having broken off inside it: no event can follow it that
    /// an SDK would read. (A body that ends, ends its last line.)
    pub fn torn(&self) -> bool {
        self.oversized && self.event_end == b"\n\n"
    }

    /// One complete line, ending in `\n` (blank: that alone, as in SSE;
    /// a line of spaces is no blank line).
    fn line(&mut self, line: &[u8], out: &mut BytesMut) {
        let blank = line.len() == 1;
        if self.oversized {
            out.extend_from_slice(line);
            // A line end after part of a line that went through ends that
            // line, however it was split from it.
            let ends_a_line = std::mem::take(&mut self.oversized_mid_line);
            if blank && !ends_a_line {
                self.oversized = false;
                self.event_bytes = 0;
                self.judge_oversized();
            } else {
                self.generated_bytes += line.len() as u64;
                self.keep_oversized(line);
            }
            return;
        }
        if !blank {
            // Past the bound is too long whether the line that takes it
            // there ended in this read or will in a later one; that line
            // goes on as the rest of the event will.
            self.event_bytes += line.len();
            if self.too_long_to_hold(0) {
                self.go_oversized(out);
                return self.line(line, out);
            }
            // An `id` is left out: the gateway takes no `Last-Event-ID`,
            // and the Python SDK, once given one, reads every blank line
            // after as an event (and fails on it).
            if !is_id(line) {
                self.event.extend_from_slice(line);
            }
            return;
        }
        self.event_bytes = 0;
        let mut event = std::mem::take(&mut self.event);
        match self.judge(&event) {
            Verdict::Keep(cut) => {
                out.extend_from_slice(&std::mem::take(&mut self.before_next));
                self.write(&event, cut, out);
                out.extend_from_slice(line);
            }
            Verdict::Drop => {}
            // Halted, it is not left out yet: the stream may break there
            // (counted if told to go on).
            Verdict::Malformed if self.halt_on_malformed => self.halted = true,
            Verdict::Malformed => self.malformed += 1,
        }
        // Its buffer holds the next event, unless a large one grew it.
        if event.capacity() <= KEPT_EVENT_BYTES {
            event.clear();
            self.event = event;
        }
    }

    /// Reads what follows the last event of a whole answer, or the
    /// provider's error event: nothing of it is sent on or metered, but a
    /// usage report, while none came, is still taken (some servers send it
    /// after `[DONE]`).
    fn read_after_last(&mut self, bytes: &[u8]) {
        if self.usage.is_some() {
            self.partial.clear();
            return;
        }
        self.partial.extend_from_slice(bytes);
        // A `\r\n` cut between reads leaves an empty line: read as nothing.
        while let Some(end) = line_end(&self.partial) {
            let line = self.partial.split_to(end.next);
            // A line too long to hold is not read, whole in one read or
            // not (its start was let go, below).
            if std::mem::take(&mut self.oversized_mid_line) || end.at > MAX_LINE_BYTES {
                continue;
            }
            let probe = data_payload(&line).and_then(|p| serde_json::from_slice::<Probe>(p).ok());
            if let Some(usage) = probe.and_then(|p| p.usage()) {
                self.usage = Some(usage);
            }
        }
        if self.partial.len() > MAX_LINE_BYTES {
            self.partial.clear();
            self.oversized_mid_line = true;
        }
    }

    /// Keeps the head and the tail of an event too long to hold.
    fn keep_oversized(&mut self, bytes: &[u8]) {
        // Its number, looked for across the seam with the last read too
        // (the member may straddle two).
        let tail = &self.oversized_tail;
        let seam = [
            &tail[tail.len().saturating_sub(SEAM_BYTES)..],
            &bytes[..bytes.len().min(SEAM_BYTES)],
        ]
        .concat();
        let number = sequence_number(bytes).max(sequence_number(&seam));
        self.oversized_number = self.oversized_number.max(number);
        let room = OVERSIZED_HEAD_BYTES.saturating_sub(self.oversized_head.len());
        self.oversized_head
            .extend_from_slice(&bytes[..room.min(bytes.len())]);
        let tail = &mut self.oversized_tail;
        let keep = bytes.len().min(super::JSON_TAIL_BYTES);
        tail.extend_from_slice(&bytes[bytes.len() - keep..]);
        let excess = tail.len().saturating_sub(super::JSON_TAIL_BYTES);
        tail.drain(..excess);
    }

    /// Meters an event too long to hold, which went through unread, from
    /// its head and tail: whether it ends a Responses stream, and the usage
    /// it reports.
    fn judge_oversized(&mut self) {
        let head = std::mem::take(&mut self.oversized_head);
        let tail = std::mem::take(&mut self.oversized_tail);
        let number = self.oversized_number.take();
        // An error is read from what was kept of it.
        let kept = || [&head[..], &tail[..]].concat();
        match event_kind(&head) {
            Some(kind) if matches!(kind, "response.failed" | "error") => {
                self.note_event_kind(kind, &kept(), number);
            }
            Some(kind) => self.note_event_kind(kind, b"", number),
            None => {
                // A Responses event whose `type` does not lead is numbered
                // all the same.
                if self.response_id.is_some() {
                    self.next_sequence = numbered_after(self.next_sequence, number);
                }
                // The last event of an image or a transcription, its
                // `type` after its data (a server writing its fields in
                // alphabetical order puts `b64_json` first).
                if kinds_in(&tail).any(|kind| media_event(kind) == Some(true)) {
                    self.media = true;
                    self.saw_media_end = true;
                }
                let kept = kept();
                if crate::openai::kept_event_is_error(&kept) {
                    self.note_error(&kept);
                }
            }
        }
        if let Some(usage) = super::reported_usage_in_tail(&tail) {
            self.usage = Some(usage);
        }
        // The tier it names, unread with it: a chat chunk's, or a
        // Responses stream's end's (a `response.created` only echoes the
        // request's).
        let ends = event_kind(&head).is_none_or(super::ends_a_response);
        if let Some(tier) = super::dearest_tier_in_tail(&tail).filter(|_| ends) {
            self.tier = Some(tier);
        }
    }

    /// Notes a Responses stream event's type (`payload`, the event):
    /// whether it ends the stream, and with its answer or an error.
    fn note_event_kind(&mut self, kind: &str, payload: &[u8], number: Option<u64>) {
        if let Some(ends) = media_event(kind) {
            self.media = true;
            self.saw_media_end |= ends;
        }
        self.next_sequence = numbered_after(self.next_sequence, number);
        let answer = ends_with_answer(kind);
        let failure = matches!(kind, "response.failed" | "error");
        self.saw_response_answer |= answer;
        self.saw_response_end |= answer || failure;
        if failure {
            self.note_error(payload);
        }
    }

    /// Notes an in-band error event (`payload`): the first one.
    fn note_error(&mut self, payload: &[u8]) {
        self.error
            .get_or_insert_with(|| Box::new(ApiError::from_in_band(payload)));
    }

    /// Meters a whole event and says what becomes of it.
    fn judge(&mut self, event: &[u8]) -> Verdict {
        let mut payloads = lines(event).filter_map(data_payload);
        // The OpenAI Python SDK fails on bytes that are not UTF-8 in any
        // line, and on an event with an `event` or `retry` field but no
        // data (it reads its data as JSON): left out, and with data,
        // malformed (it may have carried text).
        let readable = event.is_ascii() || std::str::from_utf8(event).is_ok();
        let Some(first) = payloads.next() else {
            let sets_fields =
                || lines(event).any(|line| matches!(field(line), b"event" | b"retry"));
            if !readable || sets_fields() {
                return Verdict::Drop;
            }
            // Comments only (keep-alives): passed on.
            return Verdict::Keep(Cut::Unknown);
        };
        if !readable {
            return Verdict::Malformed;
        }
        let joined;
        let mut single = false;
        let payload = match payloads.next() {
            None => {
                single = true;
                first
            }
            Some(second) => {
                let mut all = [first, second].join(&b'\n');
                for more in payloads {
                    all.push(b'\n');
                    all.extend_from_slice(more);
                }
                joined = all;
                &joined[..]
            }
        };
        // As the SDKs read it: a payload that starts so (after the one
        // space `data_payload` takes off).
        if payload.starts_with(b"[DONE]") {
            self.saw_done = true;
            if let Some(usage) = self.added_usage_event() {
                self.before_next = usage;
            }
            return Verdict::Keep(Cut::Unknown);
        }
        if single {
            if let Some(known) = self.last.like(payload) {
                return self.keep_like_the_last(event, payload, known);
            }
        }
        // An empty `data:` (a keep-alive) carried nothing: left out, and no
        // break in a stream that could be continued.
        if payload.trim_ascii().is_empty() {
            return Verdict::Drop;
        }
        let Ok(probe) = crate::json::from_bytes::<Probe>(payload) else {
            return Verdict::Malformed;
        };
        let is_error = probe.is_error();
        if is_error {
            self.note_error(payload);
        }
        if let Some(tier) = probe.tier() {
            self.tier = Some(tier);
        }
        let generated = probe.generated_bytes();
        self.generated_bytes += generated;
        if self.sample.len() < SAMPLE_BYTES && generated > 0 {
            probe.push_generated(&mut self.sample);
            self.sampled_bytes += generated;
        }
        if self.identity.is_none() {
            // A `null` one is no identity (a later event may have it).
            fn given(v: Option<&RawValue>) -> Option<&RawValue> {
                v.filter(|v| v.get() != "null")
            }
            if let (Some(id), Some(object), Some(created), Some(model)) = (
                given(probe.id),
                probe.object,
                given(probe.created),
                given(probe.model),
            ) {
                self.identity = Some([id, object, created, model].map(|v| v.get().to_owned()));
            }
        }
        if probe.finished() {
            self.saw_finish = true;
            for reason in probe.finish_reasons() {
                if self.finish_reasons.len() < MAX_FINISH_REASONS {
                    self.finish_reasons.push(reason);
                }
            }
        }
        if let Some(kind) = probe.event_type() {
            self.note_event_kind(kind, payload, sequence_number(payload));
            // A Responses stream that sent no deltas (only `.done` events)
            // has its text in its final response: counted from there when
            // it reports no usage.
            if ends_with_answer(kind) && self.generated_bytes == 0 && probe.usage().is_none() {
                let before = self.sample.len();
                super::push_response_event_output(payload, &mut self.sample);
                let added = (self.sample.len() - before) as u64;
                self.generated_bytes += added;
                self.sampled_bytes += added;
            }
            if self.response_id.is_none() {
                self.response_id = probe.response_id().map(str::to_owned);
            }
        }
        let has_choices = probe.choices.as_ref().is_some_and(|c| !c.is_empty());
        self.saw_choices |= has_choices;
        if let Some(usage) = probe.usage() {
            self.usage = Some(usage);
        }
        // The usage chunk the gateway asked for, whether or not its usage
        // could be read (`{}`, impossible counts): never the client's.
        if !has_choices && self.strip_usage && probe.has_usage_object() && !is_error {
            return Verdict::Drop;
        }
        if !single {
            return Verdict::Keep(Cut::Unknown);
        }
        // Where `write` cuts this payload's line (only when stripping:
        // else nothing is looked for).
        let found = if self.strip_usage {
            find_usage_null(payload).map(|(start, end)| start..end)
        } else {
            None
        };
        let cut = cut_in(event, payload, found.as_ref());
        let reading = probe.reading(payload, is_error);
        match probe.only_text().filter(|_| !is_error) {
            Some(text) => {
                let at = |raw: &RawValue| {
                    let start = raw.get().as_ptr() as usize - payload.as_ptr() as usize;
                    start..start + raw.get().len()
                };
                let known = Known {
                    text: at(text),
                    padding: super::last::padding(payload).map(at),
                    usage_null: found.clone(),
                    reading: reading.clone(),
                };
                self.last.keep(payload, known);
            }
            None => self.last.forget(),
        }
        if let Some((reading, guard)) = reading {
            super::memo::leave(payload, found, guard, reading);
        }
        Verdict::Keep(cut)
    }

    /// Reads every event in full, as before [`LastEvent`] (tests compare
    /// the two ways).
    #[cfg(test)]
    pub(super) fn read_every_event_in_full(&mut self) {
        self.last.off = true;
    }

    /// Meters `payload` (`event`'s only one), which [`LastEvent::like`]
    /// found like the last one read in full but for its text: as `judge`
    /// would, with what it would have read (`known`).
    fn keep_like_the_last(&mut self, event: &[u8], payload: &[u8], known: Known) -> Verdict {
        let text = &payload[known.text.clone()];
        let generated = text.len() as u64;
        self.generated_bytes += generated;
        if self.sample.len() < SAMPLE_BYTES {
            self.sample.extend_from_slice(text);
            self.sample.push(b',');
            self.sampled_bytes += generated;
        }
        self.saw_choices = true;
        let cut = cut_in(event, payload, known.usage_null.as_ref());
        if let Some((reading, guard)) = known.reading {
            super::memo::leave(payload, known.usage_null, guard, reading);
        }
        Verdict::Keep(cut)
    }

    /// Writes a kept event's lines; when stripping, a `"usage":null` the
    /// gateway caused is taken out of its `data:` lines.
    fn write(&self, event: &[u8], cut: Cut, out: &mut BytesMut) {
        match cut {
            Cut::At(cut) if self.strip_usage => {
                out.extend_from_slice(&event[..cut.start]);
                out.extend_from_slice(&event[cut.end..]);
            }
            Cut::Unknown if self.strip_usage => self.write_cut_by_line(event, out),
            _ => out.extend_from_slice(event),
        }
    }

    /// Writes an event's lines with a `"usage":null` taken out of each
    /// `data:` line that has one.
    fn write_cut_by_line(&self, event: &[u8], out: &mut BytesMut) {
        for line in lines(event) {
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

    /// The end of the upstream body: the last event, when no blank line
    /// ended it.
    pub fn finish(&mut self) -> Bytes {
        let mut out = BytesMut::new();
        if self.ended() {
            // A usage report may end the body without its line end.
            self.read_after_last(b"\n");
            return out.freeze();
        }
        if self.halted {
            return out.freeze();
        }
        let rest = std::mem::take(&mut self.partial);
        self.scanned = 0;
        if self.too_long_to_hold(rest.len()) {
            self.go_oversized(&mut out);
        }
        self.event_bytes = 0;
        if self.oversized {
            self.generated_bytes += rest.len() as u64;
            self.keep_oversized(&rest);
            self.oversized = false;
            self.oversized_mid_line = false;
            self.judge_oversized();
            // An unended `id` line is left out here too, when it is one
            // (the client is at a line's start, not inside one).
            if self.event_end == b"\n\n" || !is_id(&rest) {
                out.extend_from_slice(&rest);
            }
            self.note_handed_out(&out);
            return out.freeze();
        }
        // An unended `id` line is left out, as any other (see `line`).
        if !is_id(&rest) {
            self.event.extend_from_slice(&rest);
        }
        let event = std::mem::take(&mut self.event);
        if !event.is_empty() {
            match self.judge(&event) {
                Verdict::Keep(cut) => {
                    out.extend_from_slice(&std::mem::take(&mut self.before_next));
                    self.write(&event, cut, &mut out);
                }
                Verdict::Drop => {}
                Verdict::Malformed => self.malformed += 1,
            }
        }
        self.note_handed_out(&out);
        out.freeze()
    }

    /// Whether an in-band error event went by (a completion stream's
    /// `{"error": ...}`, a Responses stream's failure or error).
    pub fn saw_error(&self) -> bool {
        self.error.is_some()
    }

    /// The stream's first in-band error event, as the gateway's error
    /// ([`ApiError::from_in_band`]: its status says whose fault it was), if
    /// one went by.
    pub fn error(&self) -> Option<&ApiError> {
        self.error.as_deref()
    }

    /// Whether the stream's `data: [DONE]` went by.
    pub fn saw_done(&self) -> bool {
        self.saw_done
    }

    /// Whether the last event of a whole answer went by (`[DONE]` not after
    /// an error event, or a Responses API stream's `response.completed` or
    /// `incomplete`, not its failure): nothing but the body's end should
    /// follow.
    pub fn said_last(&self) -> bool {
        (self.saw_done && !self.saw_error()) || self.saw_response_answer
    }

    /// Whether nothing more of the stream goes to the client: the last
    /// event of a whole answer went by, or the provider's error event
    /// (what follows it is read only for a usage report, as after
    /// `[DONE]`).
    pub fn ended(&self) -> bool {
        self.said_last() || self.saw_error()
    }

    /// Whether the stream finished: `[DONE]`, a `finish_reason` in a
    /// completion stream, the response's end in a Responses API stream,
    /// the last event of speech, a transcription or an image (a stream of
    /// another shape counts as finished).
    pub fn finished(&self) -> bool {
        if self.media {
            return self.saw_media_end || self.saw_done;
        }
        if self.response_id.is_some() {
            return self.saw_response_end;
        }
        self.saw_done || self.saw_finish || !self.saw_choices
    }

    /// Whether this is a stream of speech, a transcription or an image,
    /// whose usage comes only with its last event.
    pub fn is_media(&self) -> bool {
        self.media
    }

    /// Whether this is a completion stream (chunks with choices), which
    /// ends with `[DONE]`.
    pub fn is_completion_stream(&self) -> bool {
        self.saw_choices
    }

    /// The choices' finish reasons, as they went by.
    pub fn finish_reasons(&self) -> &[String] {
        &self.finish_reasons
    }

    /// The model the provider named in the stream's chunks.
    pub fn model(&self) -> Option<String> {
        let raw = &self.identity.as_ref()?[3];
        serde_json::from_str(raw).ok()
    }

    /// The answer's `id`, as the stream's chunks name it.
    pub fn answer_id(&self) -> Option<String> {
        let raw = &self.identity.as_ref()?[0];
        serde_json::from_str(raw).ok()
    }

    /// The text generated (content, tool calls, reasoning; the first
    /// 64 KiB of it), for a trace that captures content.
    pub fn generated_text(&self) -> String {
        sample_text(&self.sample)
    }

    /// The usage the provider reported, if it did.
    pub fn reported_usage(&self) -> Option<Usage> {
        self.usage.map(|usage| self.with_tier(usage))
    }

    /// `usage` with the tier the stream said it was served at.
    fn with_tier(&self, usage: Usage) -> Usage {
        Usage {
            tier: self.tier.or(usage.tier),
            ..usage
        }
    }

    /// The Responses API response this stream carries, once named.
    pub fn response_id(&self) -> Option<&str> {
        self.response_id.as_deref()
    }

    /// The `sequence_number` an event the gateway adds to a Responses API
    /// stream takes: past every event's (SDKs resuming a stream
    /// `starting_after` a number pass on only events past it).
    pub fn next_sequence_number(&self) -> u64 {
        // One too long to hold that the client has part of counts too.
        if self.oversized
            && (self.response_id.is_some() || event_kind(&self.oversized_head).is_some())
        {
            return numbered_after(self.next_sequence, self.oversized_number);
        }
        self.next_sequence
    }

    /// The usage the provider reported, or the gateway's count of what
    /// streamed through (with the estimate given; else bytes / 4, and
    /// `prompt_estimate` for the prompt). A stream that broke off before it
    /// finished is counted, whatever usage went by in it (a provider that
    /// reports usage on every chunk): what it claims there bounds nothing,
    /// where the count is capped at the request's token limit.
    pub fn usage(&self, prompt_estimate: u64) -> Usage {
        self.with_tier(self.tokens(prompt_estimate))
    }

    /// [`StreamMeter::usage`]'s tokens.
    fn tokens(&self, prompt_estimate: u64) -> Usage {
        if let Some(usage) = self.usage.filter(|_| self.finished()) {
            return usage;
        }
        let Some((estimate, model)) = &self.estimate else {
            return Usage {
                prompt_tokens: prompt_estimate,
                completion_tokens: self.generated_bytes.div_ceil(4),
                cached_tokens: 0,
                estimated: true,
                ..Default::default()
            };
        };
        *self.counted.get_or_init(|| Usage {
            prompt_tokens: estimate.prompt_tokens(model),
            completion_tokens: estimate.completion_tokens(
                model,
                &sample_text(&self.sample),
                self.generated_bytes.saturating_sub(self.sampled_bytes),
            ),
            cached_tokens: 0,
            estimated: true,
            ..Default::default()
        })
    }

    /// Whether a choice's finish reason went by.
    pub fn saw_finish(&self) -> bool {
        self.saw_finish
    }

    /// Whether the gateway would add its own count as the stream's usage
    /// chunk, were the stream to end now (the client asked for usage and
    /// the provider has sent none).
    pub fn may_add_usage(&self) -> bool {
        self.usage.is_none() && !self.strip_usage && self.estimate.is_some()
    }

    /// The usage chunk the gateway adds when the client asked for usage
    /// and the provider sent none: the gateway's count, in the answer's
    /// own `id`, `object`, `created` and `model`.
    fn added_usage_event(&self) -> Option<Vec<u8>> {
        if self.usage.is_some() || self.strip_usage || self.estimate.is_none() || !self.saw_choices
        {
            return None;
        }
        let [id, object, created, model] = self.identity.as_ref()?;
        let usage = self.usage(0);
        Some(
            format!(
                "data: {{\"id\":{id},\"object\":{object},\"created\":{created},\"model\":{model},\"choices\":[],\"usage\":{{\"prompt_tokens\":{},\"completion_tokens\":{},\"total_tokens\":{}}}}}\n\n",
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total()
            )
            .into_bytes(),
        )
    }

    /// What ends a stream that finished without `[DONE]`: the gateway's
    /// usage chunk when one is owed, and `data: [DONE]`.
    pub fn seal(&self) -> Bytes {
        let mut out = self.added_usage_event().unwrap_or_default();
        out.extend_from_slice(b"data: [DONE]\n\n");
        Bytes::from(out)
    }
}

/// The values of the `"type"` members whole in `bytes` (a part of an
/// event), at any depth: a string holding `"type"` has its quotes escaped.
fn kinds_in(bytes: &[u8]) -> impl Iterator<Item = &str> {
    memchr::memmem::find_iter(bytes, b"\"type\"").filter_map(move |at| {
        let rest = bytes[at + 6..].trim_ascii_start().strip_prefix(b":")?;
        let rest = rest.trim_ascii_start().strip_prefix(b"\"")?;
        let end = memchr::memchr(b'"', rest)?;
        std::str::from_utf8(&rest[..end]).ok()
    })
}

/// An event's type from its start: its `event:` line, else the `type` its
/// `data:` begins with.
fn event_kind(head: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(head)
        .or_else(|e| std::str::from_utf8(&head[..e.valid_up_to()]))
        .ok()?;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("event:") {
            return Some(name.trim());
        }
        if let Some(data) = line.strip_prefix("data:") {
            let rest = data.trim_start().strip_prefix('{')?.trim_start();
            let rest = rest.strip_prefix("\"type\"")?.trim_start();
            let rest = rest.strip_prefix(':')?.trim_start().strip_prefix('"')?;
            return rest.split_once('"').map(|(kind, _)| kind);
        }
    }
    None
}

/// The lines of `bytes`, each with its `\n` (the last without one when
/// the bytes end without it): `split_inclusive` on `\n`, but found with
/// `memchr` rather than a test of every byte.
pub(crate) fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |at| at + 1);
        let (line, tail) = rest.split_at(end);
        rest = tail;
        Some(line)
    })
}

/// Where the first line of `bytes` ends, as SSE ends lines: at `\n`,
/// `\r\n` or a lone `\r`.
pub(crate) struct LineEnd {
    /// Where its line end starts.
    pub(crate) at: usize,
    /// Where the next line starts.
    pub(crate) next: usize,
    /// It ended at a `\r` that is the last byte: a `\n` that starts the
    /// next read is the second half of its line end (for the reader to skip).
    pub(crate) cr_last: bool,
}

/// The end of the first line of `bytes`, if it has one.
pub(crate) fn line_end(bytes: &[u8]) -> Option<LineEnd> {
    let at = memchr::memchr2(b'\n', b'\r', bytes)?;
    let cr = bytes[at] == b'\r';
    let crlf = cr && bytes.get(at + 1) == Some(&b'\n');
    Some(LineEnd {
        at,
        next: at + 1 + usize::from(crlf),
        cr_last: cr && at + 1 == bytes.len(),
    })
}

/// How much of a read ends the last read's line: its first byte when that
/// line ended at a `\r` that ended its read (`after_cr`, spent once there
/// are bytes) and this is the `\n` of that `\r\n`.
pub(crate) fn rest_of_line_end(after_cr: &mut bool, bytes: &[u8]) -> usize {
    let Some(&first) = bytes.first() else {
        return 0;
    };
    usize::from(std::mem::take(after_cr) && first == b'\n')
}

fn trailing_newline_len(line: &[u8]) -> usize {
    match line {
        [.., b'\r', b'\n'] => 2,
        [.., b'\n'] => 1,
        _ => 0,
    }
}

/// The payload of a `data:` line, without the newline.
///
/// A line that is just `data` is one with no payload, as in SSE.
fn data_payload(line: &[u8]) -> Option<&[u8]> {
    let line = &line[..line.len() - trailing_newline_len(line)];
    if line == b"data" {
        return Some(b"");
    }
    let payload = line.strip_prefix(b"data:")?;
    Some(payload.strip_prefix(b" ").unwrap_or(payload))
}

/// The field an SSE line sets: what comes before its first colon, or the
/// whole line (without its end) when it has none; empty for a comment.
fn field(line: &[u8]) -> &[u8] {
    let line = &line[..line.len() - trailing_newline_len(line)];
    memchr::memchr(b':', line).map_or(line, |at| &line[..at])
}

/// Whether `line` (ended or not) is an `id` field.
fn is_id(line: &[u8]) -> bool {
    line.starts_with(b"id") && field(line) == b"id"
}

/// Where `write` cuts `event` for a `"usage":null` found in `payload` (a
/// slice of it) at `found`; nowhere when none was.
fn cut_in(event: &[u8], payload: &[u8], found: Option<&Range<usize>>) -> Cut {
    match found {
        Some(found) => {
            let at = payload.as_ptr() as usize - event.as_ptr() as usize;
            Cut::At(at + found.start..at + found.end)
        }
        None => Cut::Nowhere,
    }
}

/// The span of a `"usage":null` member (with one adjoining comma) in a
/// compact or lightly spaced JSON object.
///
/// Only where a member starts: a `"` right after a `,` cannot be inside a
/// string (there it is escaped), but one that opens the match by itself
/// must follow the object's `{` or a `,`, or it is an escaped quote in a key
/// such as `"x\"usage"` and cutting there would change the members the
/// client reads.
fn find_usage_null(payload: &[u8]) -> Option<(usize, usize)> {
    const PATTERNS: [&[u8]; 4] = [
        b",\"usage\":null",
        b", \"usage\": null",
        b"\"usage\":null,",
        b"\"usage\": null, ",
    ];
    static FINDERS: LazyLock<[Finder<'static>; 4]> = LazyLock::new(|| PATTERNS.map(Finder::new));
    let starts_member = |start: usize| {
        payload[start] == b','
            || matches!(payload[..start].trim_ascii_end().last(), Some(b'{' | b','))
    };
    FINDERS.iter().find_map(|finder| {
        finder
            .find_iter(payload)
            .find(|&start| starts_member(start))
            .map(|start| (start, start + finder.needle().len()))
    })
}
