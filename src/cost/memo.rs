//! A streamed event read once for its two readers.
//!
//! The stream meter reads every event the provider sends (usage, the text
//! for an estimate, errors); the resumable record
//! (`gateway::forward::resume`) reads each again as the client got it (the
//! answer's id, the text so far, whether a continuation could follow).
//! Both are serde reads of the same few hundred bytes, and the two were
//! over half of a streamed token's work in the gateway. So the meter
//! leaves what the record would read of an event here, under the exact
//! bytes the client gets (its `"usage":null` taken out when the meter takes
//! that out), and the record takes a reading whose bytes are its own, and
//! reads the event itself when there is none.
//!
//! A reading is a function of those bytes alone, so taking one is always
//! right; a miss (a key the redactor masked, an event of several `data:`
//! lines or several choices, the task woken on another thread between the
//! two) costs the second read and nothing else. Readings are kept per
//! thread, a few at a time: a stream's meter and record run in one task,
//! the record right after the meter.

use serde_json::value::RawValue;
use std::cell::RefCell;
use std::ops::Range;

/// Readings kept per thread (one read from a provider may hold several
/// events).
pub(crate) const SLOTS: usize = 4;

/// Events longer than this are left to the record to read (they are rare,
/// and a slot keeps its buffer).
const MAX_KEY_BYTES: usize = 4096;

/// What the resumable record reads of an event: positions in its JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Reading {
    /// `id`, `created` and `model`, when there (`null` counts).
    pub identity: [Option<Range<usize>>; 3],
    /// Something a continuation could not follow went by (see
    /// [`choice_ends`]), or the provider's error.
    pub ends: bool,
    /// The only choice's text, a JSON string.
    pub content: Option<Range<usize>>,
}

/// Whether a choice ends what a continuation could follow: another
/// choice's index (a whole number other than 0), a finish reason, a tool
/// or function call, or a refusal with something in it.
pub(crate) fn choice_ends(
    index: Option<&RawValue>,
    finished: bool,
    calls: bool,
    refusal: Option<&RawValue>,
) -> bool {
    index.and_then(|i| i.get().parse::<u64>().ok()).unwrap_or(0) != 0
        || finished
        || calls
        || refusal.is_some_and(|r| r.get().starts_with('"') && r.get() != "\"\"")
}

struct Slot {
    /// The event's JSON as the client gets it, whitespace around it left
    /// out; its buffer is reused.
    json: Vec<u8>,
    reading: Option<Reading>,
}

struct Memo {
    slots: [Slot; SLOTS],
    /// The slot written next (the oldest).
    next: usize,
}

thread_local! {
    static MEMO: RefCell<Memo> = const {
        RefCell::new(Memo {
            slots: [const {
                Slot {
                    json: Vec::new(),
                    reading: None,
                }
            }; SLOTS],
            next: 0,
        })
    };
}

/// Leaves `reading` (positions in `payload`) for the record, under
/// `payload` with `cut` taken out, as the client gets it. Not when the cut
/// falls inside a value the reading depends on (`guard`, the identity): the
/// record would read that value another way.
pub(crate) fn leave(
    payload: &[u8],
    cut: Option<Range<usize>>,
    guard: Option<Range<usize>>,
    mut reading: Reading,
) {
    let (kept_before, removed) = match &cut {
        Some(cut) => {
            let inside = |r: &Range<usize>| r.start < cut.end && cut.start < r.end;
            if reading.identity.iter().flatten().chain(&guard).any(inside) {
                return;
            }
            (cut.start, cut.len())
        }
        None => (payload.len(), 0),
    };
    if payload.len() - removed > MAX_KEY_BYTES {
        return;
    }
    let lead = payload.len() - payload.trim_ascii_start().len();
    let shift = |r: &mut Range<usize>| {
        let by = if r.start >= kept_before { removed } else { 0 };
        *r = r.start - by - lead..r.end - by - lead;
    };
    reading.identity.iter_mut().flatten().for_each(shift);
    reading.content.iter_mut().for_each(shift);
    MEMO.with_borrow_mut(|memo| {
        let at = memo.next;
        memo.next = (at + 1) % SLOTS;
        let slot = &mut memo.slots[at];
        slot.json.clear();
        match cut {
            Some(cut) => {
                slot.json.extend_from_slice(&payload[lead..cut.start]);
                slot.json.extend_from_slice(&payload[cut.end..]);
            }
            None => slot.json.extend_from_slice(&payload[lead..]),
        }
        let end = slot.json.trim_ascii_end().len();
        slot.json.truncate(end);
        slot.reading = Some(reading);
    });
}

/// The reading left for exactly `json` (whitespace around it left out),
/// if any; taken.
pub(crate) fn take(json: &[u8]) -> Option<Reading> {
    MEMO.with_borrow_mut(|memo| {
        // The newest first: the event just metered.
        let newest_first = (1..=SLOTS).map(|back| (memo.next + SLOTS - back) % SLOTS);
        let at = newest_first
            .into_iter()
            .find(|&at| memo.slots[at].reading.is_some() && memo.slots[at].json == json)?;
        memo.slots[at].reading.take()
    })
}

/// Forgets every reading on this thread (for tests that read an event
/// both ways).
#[cfg(test)]
pub(crate) fn clear() {
    MEMO.with_borrow_mut(|memo| memo.slots.iter_mut().for_each(|slot| slot.reading = None));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(content: Range<usize>) -> Reading {
        Reading {
            content: Some(content),
            ..Reading::default()
        }
    }

    #[test]
    fn a_reading_is_taken_once_and_only_for_its_own_bytes() {
        let json = br#"{"c":"hi"}"#;
        leave(json, None, None, reading(5..9));
        assert_eq!(take(br#"{"c":"ho"}"#), None);
        assert_eq!(take(json), Some(reading(5..9)));
        assert_eq!(take(json), None);
    }

    #[test]
    fn positions_follow_the_cut_and_the_trimmed_space() {
        let payload = br#"  {"c":"hi","usage":null,"d":"x"} "#;
        let cut = 11..24;
        assert_eq!(&payload[cut.clone()], br#","usage":null"#);
        let mut read = reading(7..11);
        read.identity[0] = Some(29..32);
        leave(payload, Some(cut), None, read);
        let json = br#"{"c":"hi","d":"x"}"#;
        let got = take(json).expect("left under the bytes the client gets");
        assert_eq!(&json[got.content.unwrap()], br#""hi""#);
        assert_eq!(&json[got.identity[0].clone().unwrap()], br#""x""#);
    }

    #[test]
    fn a_cut_inside_what_the_reading_depends_on_leaves_nothing() {
        let payload = br#"{"id":{"a":1,"usage":null}}"#;
        let mut read = Reading::default();
        read.identity[0] = Some(6..26);
        leave(payload, Some(12..25), None, read);
        assert_eq!(take(br#"{"id":{"a":1}}"#), None);
        leave(payload, Some(12..25), Some(6..26), Reading::default());
        assert_eq!(take(br#"{"id":{"a":1}}"#), None);
    }

    #[test]
    fn the_newest_reading_of_the_same_bytes_is_taken_first() {
        let json = br#"{"c":"same"}"#;
        leave(json, None, None, reading(5..11));
        let mut newer = reading(5..11);
        newer.ends = true;
        leave(json, None, None, newer.clone());
        assert_eq!(take(json), Some(newer));
        assert_eq!(take(json), Some(reading(5..11)));
    }

    #[test]
    fn the_oldest_reading_makes_room() {
        for i in 0..=SLOTS {
            leave(format!("[{i}]").as_bytes(), None, None, Reading::default());
        }
        assert_eq!(take(b"[0]"), None);
        assert!(take(format!("[{SLOTS}]").as_bytes()).is_some());
    }
}
