//! Metering an SSE stream on its way through: the final usage chunk read
//! (and taken out again when the client did not ask for it), the generated
//! text counted for an estimate, never buffering more than a partial line.
//!
//! A `data:` event whose payload is neither JSON nor `[DONE]` is left out
//! of what the client gets (OpenAI SDKs would fail on it) and is not
//! counted; the rest of the stream goes on, unless the meter was asked to
//! halt there (a stream that can be continued elsewhere breaks instead). A line too long to hold
//! ([`MAX_LINE_BYTES`]) passes through unread.

use super::{Probe, Usage, MAX_LINE_BYTES};
use bytes::{Bytes, BytesMut};

/// Reads usage from an SSE stream on its way through, and optionally
/// removes what the gateway added (the usage chunk, `"usage":null` fields).
#[derive(Debug)]
pub struct StreamMeter {
    strip_usage: bool,
    pub(super) partial: BytesMut,
    /// Inside a line longer than [`MAX_LINE_BYTES`]: pass it through.
    oversized: bool,
    skip_blank_line: bool,
    usage: Option<Usage>,
    generated_bytes: u64,
    /// The stream's `data: [DONE]` went by.
    saw_done: bool,
    /// Events left out because they were not JSON.
    malformed: u64,
    /// Stop at an event that is not JSON (see [`StreamMeter::halt_on_malformed`]).
    halt_on_malformed: bool,
    /// Stopped at one: the rest is held until told to go on.
    halted: bool,
}

/// What one line of the stream is.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// Passed on (an event, a comment, a blank line).
    Other,
    /// The usage chunk: no choices, only usage.
    UsageOnly,
    /// A `data:` payload that is neither JSON nor `[DONE]`.
    Malformed,
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
            saw_done: false,
            malformed: 0,
            halt_on_malformed: false,
            halted: false,
        }
    }

    /// With `on`, an event that is not JSON stops the meter: [`feed`]
    /// returns the lines before it and holds the rest, and [`halted`] says
    /// so (a stream that may be continued elsewhere treats it as a break).
    /// Turning it off goes on (the next `feed` returns the rest).
    ///
    /// [`feed`]: StreamMeter::feed
    /// [`halted`]: StreamMeter::halted
    pub fn halt_on_malformed(&mut self, on: bool) {
        self.halt_on_malformed = on;
        if !on {
            self.halted = false;
        }
    }

    /// Whether the meter stopped at an event that is not JSON.
    pub fn halted(&self) -> bool {
        self.halted
    }

    /// Events left out because they were not JSON.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// Takes one upstream chunk and returns what to send the client now:
    /// the complete lines seen so far (edited when stripping).
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
        self.partial.extend_from_slice(&rest);
        let mut out = BytesMut::with_capacity(passed.len() + rest.len());
        out.extend_from_slice(&passed);
        if self.halted {
            return out.freeze();
        }
        if let Some(last_newline) = self.partial.iter().rposition(|&b| b == b'\n') {
            let complete = self.partial.split_to(last_newline + 1).freeze();
            let mut consumed = 0;
            for line in complete.split_inclusive(|&b| b == b'\n') {
                consumed += line.len();
                if self.edit_line(line, &mut out) && self.halt_on_malformed {
                    let mut held = BytesMut::from(&complete[consumed..]);
                    held.extend_from_slice(&self.partial);
                    self.partial = held;
                    self.halted = true;
                    return out.freeze();
                }
            }
        }
        out.extend_from_slice(&self.release_oversized());
        out.freeze()
    }

    /// A partial line past [`MAX_LINE_BYTES`] is not held any longer: it is
    /// counted as generated text and sent on unedited.
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
        let mut out = BytesMut::new();
        self.edit_line(&rest, &mut out);
        out.freeze()
    }

    /// Whether the stream's `data: [DONE]` went by.
    pub fn saw_done(&self) -> bool {
        self.saw_done
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

    /// Meters one line; says what it is.
    fn observe(&mut self, line: &[u8]) -> Line {
        let Some(payload) = data_payload(line) else {
            return Line::Other;
        };
        if payload.trim_ascii() == b"[DONE]" {
            self.saw_done = true;
            return Line::Other;
        }
        let Ok(probe) = serde_json::from_slice::<Probe>(payload) else {
            return Line::Malformed;
        };
        self.generated_bytes += probe.generated_bytes();
        match probe.usage() {
            Some(usage) => {
                self.usage = Some(usage);
                if probe.choices.as_ref().is_none_or(|c| c.is_empty()) {
                    Line::UsageOnly
                } else {
                    Line::Other
                }
            }
            None => Line::Other,
        }
    }

    /// Meters the line and writes it, unless it is malformed or (when
    /// stripping) the usage chunk the gateway asked for; when stripping,
    /// a `"usage":null` the gateway caused is taken out. Returns whether
    /// the line was malformed.
    fn edit_line(&mut self, line: &[u8], out: &mut BytesMut) -> bool {
        let is_blank = line.iter().all(|b| b.is_ascii_whitespace());
        if is_blank && std::mem::take(&mut self.skip_blank_line) {
            return false;
        }
        match self.observe(line) {
            Line::Malformed => {
                self.malformed += 1;
                self.skip_blank_line = true;
                return true;
            }
            Line::UsageOnly if self.strip_usage => {
                self.skip_blank_line = true;
                return false;
            }
            _ => {}
        }
        let usage_null = data_payload(line)
            .filter(|_| self.strip_usage)
            .and_then(|payload| {
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
        false
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
