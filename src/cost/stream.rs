//! Metering an SSE stream on its way through: the final usage chunk read
//! (and taken out again when the client did not ask for it), the generated
//! text counted for an estimate, never buffering more than a partial line.

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
            self.saw_done = true;
            return false;
        }
        // An event that is not JSON is passed on as it is, and not counted.
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
