//! The last event the stream meter read in full, for the next ones that
//! differ from it only in their text.
//!
//! A provider streams an answer as events that are alike but for the few
//! characters of text each carries:
//! `{"id":"x",...,"choices":[{"index":0,"delta":{"content":"tok"},...}]}`.
//! Reading each with serde was a third of a streamed token's work in the
//! gateway. An event that is the last one byte for byte except inside its
//! text, its own a JSON string with no escape and no control character,
//! has the same members with the same values but that one: what the meter
//! takes from it (the text, where its `"usage":null` is, what it leaves
//! for the resumable record) follows from the last one's, positions after
//! the text moved by the difference in length. Any other difference (a
//! provider that numbers its events, OpenAI's `obfuscation` padding, the
//! first event and the last) has the event read in full.

use super::memo::Reading;
use std::ops::Range;

/// Events longer than this are not kept (they are rare; the buffer stays).
const MAX_BYTES: usize = 4096;

/// What the meter keeps of the last event it read in full.
#[derive(Debug, Default)]
pub(super) struct LastEvent {
    /// Its JSON; the buffer is reused.
    json: Vec<u8>,
    /// What the meter took from it; none when it cannot stand for the next.
    known: Option<Known>,
    /// Every event is read in full (tests compare the two ways).
    #[cfg(test)]
    pub off: bool,
}

/// What the meter took from an event: positions in its JSON.
#[derive(Debug, Clone)]
pub(super) struct Known {
    /// Its only generated value, a JSON string, quotes included.
    pub text: Range<usize>,
    /// Its `"usage":null`, when the meter looked for one.
    pub usage_null: Option<Range<usize>>,
    /// What it left for the resumable record, and the span of the error
    /// that reading depends on ([`super::memo::leave`]).
    pub reading: Option<(Reading, Option<Range<usize>>)>,
}

impl LastEvent {
    /// The next event is read in full.
    pub(super) fn forget(&mut self) {
        self.known = None;
    }

    /// Keeps `json`, an event the meter read in full whose only generated
    /// value is `known.text` and that says nothing else the meter keeps
    /// (no usage, error, finish or Responses event type): the caller
    /// checks that. (Its text may have escapes: only the next one's text
    /// is read.)
    pub(super) fn keep(&mut self, json: &[u8], known: Known) {
        self.known = None;
        #[cfg(test)]
        if self.off {
            return;
        }
        if json.len() > MAX_BYTES {
            return;
        }
        self.json.clear();
        self.json.extend_from_slice(json);
        self.known = Some(known);
    }

    /// What the meter would take from `json` reading it in full, when it
    /// differs from the last event only inside its text.
    pub(super) fn like(&self, json: &[u8]) -> Option<Known> {
        let last = self.known.as_ref()?;
        // Up to and with the text's opening quote; from its closing quote.
        let open = last.text.start + 1;
        let tail = &self.json[last.text.end - 1..];
        if json.len() < open + tail.len() || json[..open] != self.json[..open] {
            return None;
        }
        let close = open + memchr::memchr2(b'"', b'\\', &json[open..])?;
        if json[close] != b'"' || json[close..] != *tail || has_control(&json[open..close]) {
            return None;
        }
        let text = last.text.start..close + 1;
        // Positions before the text stay, after it move; one that spans
        // part of it cannot be (the caller's reading has none).
        let moved = |r: &Range<usize>| -> Option<Range<usize>> {
            if r.end <= last.text.start {
                Some(r.clone())
            } else if r.start >= last.text.end {
                Some(r.start - last.text.end + text.end..r.end - last.text.end + text.end)
            } else if *r == last.text {
                Some(text.clone())
            } else {
                None
            }
        };
        let usage_null = match &last.usage_null {
            Some(r) => Some(moved(r)?),
            None => None,
        };
        let reading = match &last.reading {
            Some((reading, guard)) => {
                let mut identity = [None, None, None];
                for (slot, r) in identity.iter_mut().zip(&reading.identity) {
                    if let Some(r) = r {
                        *slot = Some(moved(r)?);
                    }
                }
                let content = match &reading.content {
                    Some(r) => Some(moved(r)?),
                    None => None,
                };
                let guard = match guard {
                    Some(r) => Some(moved(r)?),
                    None => None,
                };
                let reading = Reading {
                    identity,
                    ends: reading.ends,
                    content,
                };
                Some((reading, guard))
            }
            None => None,
        };
        Some(Known {
            text,
            usage_null,
            reading,
        })
    }
}

/// Whether `text` has a byte JSON does not allow in a string as it is.
fn has_control(text: &[u8]) -> bool {
    text.iter().any(|&b| b < 0x20)
}
