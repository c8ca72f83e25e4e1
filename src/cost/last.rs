//! The last event the stream meter read in full, for the next ones that
//! differ from it only in their text.
//!
//! A provider streams an answer as events that are alike but for the few
//! characters of text each carries:
//! `{"id":"x",...,"choices":[{"index":0,"delta":{"content":"tok"},...}]}`.
//! Reading each with serde was a third of a streamed token's work in the
//! gateway. An event that is the last one byte for byte except inside its
//! text, where it has a JSON string with no escape and no control
//! character, has the same members with the same values but that one: what
//! the meter takes from it (the text, where its `"usage":null` is, what it
//! leaves for the resumable record) follows from the last one's, positions
//! after the text moved by the difference in length. OpenAI pads each
//! event with random characters (an `obfuscation` member, on by default):
//! that string may differ likewise. Any other difference (a provider that
//! numbers its events, the first event and the last) has the event read in
//! full.

use super::memo::Reading;
use serde::Deserialize;
use serde_json::value::RawValue;
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
    /// Its strings that may differ (its text, its padding), in order.
    holes: [Range<usize>; 2],
    holes_len: usize,
    /// Every event is read in full (tests compare the two ways).
    #[cfg(test)]
    pub off: bool,
}

/// What the meter took from an event: positions in its JSON.
#[derive(Debug, Clone)]
pub(super) struct Known {
    /// Its only generated value, a JSON string, quotes included.
    pub text: Range<usize>,
    /// Its `obfuscation` member's value, when a string: padding, read by
    /// nothing.
    pub padding: Option<Range<usize>>,
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
    /// checks that. (Its strings may have escapes: only the next one's are
    /// read.)
    pub(super) fn keep(&mut self, json: &[u8], known: Known) {
        self.known = None;
        #[cfg(test)]
        if self.off {
            return;
        }
        let apart = known
            .padding
            .as_ref()
            .is_none_or(|p| p.end <= known.text.start || known.text.end <= p.start);
        if json.len() > MAX_BYTES || !apart {
            return;
        }
        self.json.clear();
        self.json.extend_from_slice(json);
        self.holes = [known.text.clone(), 0..0];
        self.holes_len = 1;
        if let Some(padding) = &known.padding {
            self.holes[1] = padding.clone();
            self.holes_len = 2;
            if padding.start < known.text.start {
                self.holes.swap(0, 1);
            }
        }
        self.known = Some(known);
    }

    /// What the meter would take from `json` reading it in full, when it
    /// differs from the last event only inside its text and its padding.
    pub(super) fn like(&self, json: &[u8]) -> Option<Known> {
        let last = self.known.as_ref()?;
        let holes = &self.holes[..self.holes_len];
        // Where each is in `json`.
        let mut found = [0..0, 0..0];
        // Where the bytes that must be alike start in the last event
        // (after a hole's closing quote) and in `json`.
        let (mut from, mut at) = (0, 0);
        for (hole, found) in holes.iter().zip(&mut found) {
            // Alike up to and with its opening quote.
            let alike = &self.json[from..hole.start + 1];
            if json.get(at..at + alike.len()) != Some(alike) {
                return None;
            }
            let open = at + alike.len();
            let close = open + memchr::memchr2(b'"', b'\\', &json[open..])?;
            if json[close] != b'"' || has_control(&json[open..close]) {
                return None;
            }
            *found = open - 1..close + 1;
            // From its closing quote on.
            (from, at) = (hole.end - 1, close);
        }
        if json[at..] != self.json[from..] {
            return None;
        }
        // A position before a hole stays, after it moves by the difference
        // in length; one that spans part of a hole cannot be (the caller's
        // reading has none).
        let moved = |r: &Range<usize>| -> Option<Range<usize>> {
            let mut by = 0isize;
            for (hole, found) in holes.iter().zip(&found) {
                if r.end <= hole.start {
                    break;
                }
                if r == hole {
                    return Some(found.clone());
                }
                if r.start < hole.end {
                    return None;
                }
                by += found.len() as isize - hole.len() as isize;
            }
            Some(r.start.checked_add_signed(by)?..r.end.checked_add_signed(by)?)
        };
        let new = |r: &Option<Range<usize>>| -> Option<Option<Range<usize>>> {
            match r {
                Some(r) => Some(Some(moved(r)?)),
                None => Some(None),
            }
        };
        let reading = match &last.reading {
            Some((reading, guard)) => {
                let mut identity = [None, None, None];
                for (slot, r) in identity.iter_mut().zip(&reading.identity) {
                    *slot = new(r)?;
                }
                let reading = Reading {
                    identity,
                    ends: reading.ends,
                    content: new(&reading.content)?,
                };
                Some((reading, new(guard)?))
            }
            None => None,
        };
        Some(Known {
            text: moved(&last.text)?,
            padding: new(&last.padding)?,
            usage_null: new(&last.usage_null)?,
            reading,
        })
    }
}

/// The value of `json`'s `obfuscation` member, when it has one, once, and
/// a string. Read apart from the meter's own reading, which would refuse
/// the event for a member given twice, and only when the name is there.
pub(super) fn padding(json: &[u8]) -> Option<&RawValue> {
    #[derive(Deserialize)]
    struct Padding<'a> {
        #[serde(borrow, default)]
        obfuscation: Option<&'a RawValue>,
    }
    memchr::memmem::find(json, b"\"obfuscation\"")?;
    let padding = crate::json::from_bytes::<Padding>(json).ok()?.obfuscation?;
    padding.get().starts_with('"').then_some(padding)
}

/// Whether `text` has a byte JSON does not allow in a string as it is.
fn has_control(text: &[u8]) -> bool {
    text.iter().any(|&b| b < 0x20)
}
