//! Keeps a provider's key out of everything forwarded to clients.
//!
//! A provider may echo the credentials it was sent: in an error message, a
//! JSON answer, mid-stream, in a response header, or JSON-escaped
//! (`sk\u002d...`, every character may be written as `\uXXXX`, `/` as
//! `\/`, and a key's own `"` and `\` as `\"` and `\\`). A [`Redactor`] finds the key in any of those forms and overwrites
//! it with `*` of the same length, so framing (`content-length`, SSE lines,
//! JSON strings) stays valid. Streams are redacted across chunk boundaries:
//! bytes that could be the start of the key are held back until the next
//! chunk shows whether they are (at most a few dozen bytes, and only when a
//! chunk ends in what looks like the key's beginning).

use bytes::Bytes;
use std::borrow::Cow;

/// Keys shorter than this are placeholders (`EMPTY`, `ollama`, `x`, as
/// local servers that check no key are configured), not secrets: masking
/// one would overwrite that word, or letter, everywhere in every answer.
/// The config check warns about them.
pub const MIN_REDACTED_KEY_LEN: usize = 8;

/// A provider's key made ready for redaction once, when the config is
/// loaded: its search and what the scans need to know of it. Its `Debug`
/// does not show the key.
#[derive(Clone)]
pub struct RedactKey {
    /// Finds the key as written (`memchr`'s substring search, which
    /// looks for a pair of its rarer bytes first).
    finder: memchr::memmem::Finder<'static>,
    /// The key holds a `"` or a `\\`, which JSON text escapes as it does
    /// its own ([`RedactKey::may_be_escaped`]).
    own_escapes: bool,
    /// The key holds a `\\`, which a text's backslash may be or begin an
    /// escape of ([`match_every_reading`]).
    backslash: bool,
    /// What the key is overwritten with: `*`, or for a key holding a `*`
    /// a byte it does not hold, so that no mask and what is around it can
    /// make up the key again (`sk-ab**` masked inside `sk-absk-ab**`).
    mask: u8,
}

impl RedactKey {
    /// `key` ready to be redacted; `None` for one shorter than
    /// [`MIN_REDACTED_KEY_LEN`] (a placeholder: nothing is masked).
    pub fn new(key: &str) -> Option<Self> {
        let key = key.as_bytes();
        (key.len() >= MIN_REDACTED_KEY_LEN).then(|| RedactKey {
            finder: memchr::memmem::Finder::new(key).into_owned(),
            own_escapes: key.iter().any(|b| matches!(b, b'\\' | b'"')),
            backslash: key.contains(&b'\\'),
            // Printable, and not a byte JSON or SSE reads (a space last);
            // only a key of every such byte (93 of them) holds them all,
            // and is masked with `*` (docs/security.md lists it).
            mask: match key.contains(&b'*') {
                false => b'*',
                true => (b'#'..=b'~')
                    .chain([b'!', b' '])
                    .find(|b| !matches!(b, b'"' | b'\\') && !key.contains(b))
                    .unwrap_or(b'*'),
            },
        })
    }

    fn bytes(&self) -> &[u8] {
        self.finder.needle()
    }
}

/// `keys` as [`redact_every`] and [`mask_every`] take them: each once
/// (providers of one account share theirs), the longest first, so that a
/// key that begins another (`sk-proj-abc` of `sk-proj-abc-more`) does not
/// mask its part of the longer one and leave the rest of it showing.
pub fn every_key<'k>(keys: impl IntoIterator<Item = &'k RedactKey>) -> Vec<RedactKey> {
    let mut every: Vec<RedactKey> = Vec::new();
    for key in keys {
        if !every.iter().any(|k| k.bytes() == key.bytes()) {
            every.push(key.clone());
        }
    }
    every.sort_by_key(|key| std::cmp::Reverse(key.bytes().len()));
    every
}

/// `bytes` (JSON written again, or gathered from several providers) with
/// every one of `keys` overwritten, each as [`Redactor::redact`] does.
pub fn redact_every<'k>(keys: impl IntoIterator<Item = &'k RedactKey>, bytes: Vec<u8>) -> Vec<u8> {
    match mask_every(keys, &bytes) {
        Cow::Owned(masked) => masked,
        Cow::Borrowed(_) => bytes,
    }
}

/// [`redact_every`] of borrowed bytes: borrowed back when no key is there.
pub fn mask_every<'k, 'a>(
    keys: impl IntoIterator<Item = &'k RedactKey>,
    bytes: &'a [u8],
) -> Cow<'a, [u8]> {
    let mut bytes = Cow::Borrowed(bytes);
    for key in keys {
        if let Cow::Owned(masked) = Redactor::new(Some(key)).redact(&bytes) {
            bytes = Cow::Owned(masked);
        }
    }
    bytes
}

impl std::fmt::Debug for RedactKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedactKey(*****)")
    }
}

/// Redacts one key from a byte stream or from single values. Its `Debug`
/// shows neither the key nor what it holds back (the key's beginning).
#[derive(Clone, Default)]
pub struct Redactor<'k> {
    /// Borrowed from the provider's settings: nothing made a request.
    key: Option<&'k RedactKey>,
    /// The tail of the last chunk that may be the start of the key.
    held: Vec<u8>,
}

/// How the key matched at one position.
enum Match {
    /// The key ends here (exclusive).
    Whole(usize),
    /// The input ended while it still matched.
    Partial,
    /// Not the key.
    No,
}

impl std::fmt::Debug for Redactor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("key", &self.key)
            .field("held_bytes", &self.held.len())
            .finish()
    }
}

impl<'k> Redactor<'k> {
    /// A redactor for `key` (none: everything passes unchanged).
    pub fn new(key: Option<&'k RedactKey>) -> Self {
        Redactor {
            key,
            held: Vec::new(),
        }
    }

    /// A value (a header, a whole body) with the key overwritten.
    pub fn redact<'a>(&self, value: &'a [u8]) -> Cow<'a, [u8]> {
        match self.scan(value, true) {
            (None, _) => Cow::Borrowed(value),
            (Some(out), _) => Cow::Owned(out),
        }
    }

    /// A text read out of JSON (a provider's error message), with the key
    /// overwritten as it reads and as it reads once written as JSON again
    /// for the client: a key with a backslash of its own that a provider
    /// echoed unescaped (its `\n` read as a newline) is not in the text,
    /// and is the key again in the text's JSON. A text whose JSON cannot
    /// be masked and read back is replaced whole.
    pub fn redact_decoded(&self, text: &str) -> String {
        let masked = String::from_utf8_lossy(&self.redact(text.as_bytes())).into_owned();
        let json = serde_json::to_string(&masked).unwrap_or_default();
        match self.redact(json.as_bytes()) {
            Cow::Borrowed(_) => masked,
            Cow::Owned(again) => serde_json::from_slice(&again)
                .unwrap_or_else(|_| "(the provider's message held its key)".to_owned()),
        }
    }

    /// Takes the next chunk of a stream; returns what can be sent now.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if self.key.is_none() {
            return chunk;
        }
        if self.held.is_empty() {
            let (out, emit) = self.scan(&chunk, false);
            self.held.extend_from_slice(&chunk[emit..]);
            return match out {
                None if emit == chunk.len() => chunk,
                None => chunk.slice(..emit),
                Some(out) => Bytes::from(out),
            };
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(&chunk);
        let (out, emit) = self.scan(&buf, false);
        self.held.extend_from_slice(&buf[emit..]);
        match out {
            Some(out) => Bytes::from(out),
            None => {
                buf.truncate(emit);
                Bytes::from(buf)
            }
        }
    }

    /// The end of the stream: whatever was held back.
    pub fn finish(&mut self) -> Bytes {
        let held = std::mem::take(&mut self.held);
        match self.scan(&held, true) {
            (None, _) => Bytes::from(held),
            (Some(out), _) => Bytes::from(out),
        }
    }

    /// Scans `buf`: the redacted bytes (`None` when nothing changed) up to
    /// the returned position; the rest may be the start of the key and is
    /// held back (never, `at_end`).
    fn scan(&self, buf: &[u8], at_end: bool) -> (Option<Vec<u8>>, usize) {
        let Some(key) = self.key else {
            return (None, buf.len());
        };
        if key.may_be_escaped(buf) {
            return key.scan_escaped(buf, at_end);
        }
        key.scan_verbatim(buf, at_end)
    }
}

impl RedactKey {
    /// Whether the key may be written with an escape in `buf`: it holds a
    /// `\u` or `\/` escape, or a backslash in its last bytes (an escape the
    /// next chunk may complete). The escapes of text (`\n`, `\"`) cannot be
    /// part of a key without `"` or `\` (printable ASCII, as the config
    /// checks), so most answers are searched for it as written.
    fn may_be_escaped(&self, buf: &[u8]) -> bool {
        self.own_escapes
            || memchr::memchr_iter(b'\\', buf)
                .any(|at| at + 6 > buf.len() || matches!(buf[at + 1], b'u' | b'/'))
    }

    /// [`Redactor::scan`] of bytes where the key can only be written as
    /// itself ([`RedactKey::may_be_escaped`]): one substring search, where
    /// the escaped forms' scan stops at every byte equal to the key's
    /// first (`s` of `sk-`).
    fn scan_verbatim(&self, buf: &[u8], at_end: bool) -> (Option<Vec<u8>>, usize) {
        let key = self.bytes();
        let mut out: Option<Vec<u8>> = None;
        let mut copied = 0;
        // Leftmost first, never overlapping the key just masked.
        for start in self.finder.find_iter(buf) {
            let out = out.get_or_insert_with(|| Vec::with_capacity(buf.len()));
            out.extend_from_slice(&buf[copied..start]);
            out.resize(out.len() + key.len(), self.mask);
            copied = start + key.len();
        }
        // The key's beginning at the very end: the next chunk tells.
        let held = if at_end {
            None
        } else {
            // Only where the key's first byte is (the answer's last bytes
            // are seldom it).
            let from = copied.max(buf.len().saturating_sub(key.len() - 1));
            memchr::memchr_iter(key[0], &buf[from..])
                .map(|at| from + at)
                .find(|&start| key.starts_with(&buf[start..]))
        };
        let emit = held.unwrap_or(buf.len());
        if let Some(out) = &mut out {
            out.extend_from_slice(&buf[copied..emit]);
        }
        (out, emit)
    }

    /// [`Redactor::scan`] where the key may be written with escapes.
    fn scan_escaped(&self, buf: &[u8], at_end: bool) -> (Option<Vec<u8>>, usize) {
        let key = self.bytes();
        let Some(&first) = key.first() else {
            return (None, buf.len());
        };
        let mut out: Option<Vec<u8>> = None;
        let mut copied = 0;
        let mut i = 0;
        while let Some(at) = memchr::memchr2(first, b'\\', &buf[i..]) {
            let start = i + at;
            let found = if self.backslash {
                match_every_reading(buf, start, key, at_end)
            } else {
                match_at(buf, start, key)
            };
            match found {
                Match::Whole(end) => {
                    let out = out.get_or_insert_with(|| Vec::with_capacity(buf.len()));
                    out.extend_from_slice(&buf[copied..start]);
                    out.resize(out.len() + (end - start), self.mask);
                    copied = end;
                    i = end;
                }
                Match::Partial if !at_end => {
                    if let Some(out) = &mut out {
                        out.extend_from_slice(&buf[copied..start]);
                    }
                    return (out, start);
                }
                Match::Partial | Match::No => i = start + 1,
            }
        }
        if let Some(out) = &mut out {
            out.extend_from_slice(&buf[copied..]);
        }
        (out, buf.len())
    }
}

/// Whether the key starts at `start`, each of its bytes written as itself,
/// as a `\uXXXX` escape, or (for `/` and `"`) as `\/` and `\"`: a key
/// without a backslash of its own, which reads one way only.
fn match_at(buf: &[u8], start: usize, key: &[u8]) -> Match {
    let mut i = start;
    for &want in key {
        let Some(&b) = buf.get(i) else {
            return Match::Partial;
        };
        if b == want {
            i += 1;
            continue;
        }
        if b != b'\\' {
            return Match::No;
        }
        match escape_at(buf, i, want) {
            Escape::Is(len) => i += len,
            Escape::Partial => return Match::Partial,
            Escape::No => return Match::No,
        }
    }
    Match::Whole(i)
}

/// [`match_at`] for a key with a backslash of its own (written `\`, `\\`
/// or `\u005c`): a backslash of the text may be the key's as itself or
/// begin an escape of it, so every reading is followed at once (the
/// positions they have reached: the work grows with the key, not with the
/// ways of reading it). The longest whole match wins; but while a reading
/// that ran out of input may still become a longer one (a key ending in
/// `\`, whole as `\` and unfinished as `\\`), more input decides: the
/// match is partial unless `at_end` (no more input follows `buf`).
fn match_every_reading(buf: &[u8], start: usize, key: &[u8], at_end: bool) -> Match {
    let mut at = vec![start];
    let mut next = Vec::new();
    let mut partial = false;
    for &want in key {
        for &i in &at {
            let Some(&b) = buf.get(i) else {
                partial = true;
                continue;
            };
            if b == want {
                next.push(i + 1);
            }
            if b == b'\\' {
                match escape_at(buf, i, want) {
                    Escape::Is(len) => next.push(i + len),
                    Escape::Partial => partial = true,
                    Escape::No => {}
                }
            }
        }
        next.sort_unstable();
        next.dedup();
        std::mem::swap(&mut at, &mut next);
        next.clear();
        if at.is_empty() {
            return if partial { Match::Partial } else { Match::No };
        }
    }
    match at.last() {
        Some(_) if partial && !at_end => Match::Partial,
        Some(&end) => Match::Whole(end),
        None => Match::No,
    }
}

/// Whether a JSON escape of `want` starts at `buf[at]` (a backslash).
enum Escape {
    /// It does, this many bytes long.
    Is(usize),
    /// The input ended while it still could.
    Partial,
    No,
}

/// Reads the escape at `buf[at]` (a backslash) as a form of `want`.
fn escape_at(buf: &[u8], at: usize, want: u8) -> Escape {
    match buf.get(at + 1) {
        None => Escape::Partial,
        Some(&c) if c == want && matches!(c, b'/' | b'"' | b'\\') => Escape::Is(2),
        Some(b'u') => {
            let digits = &buf[(at + 2).min(buf.len())..(at + 6).min(buf.len())];
            if !digits.iter().all(u8::is_ascii_hexdigit) {
                return Escape::No;
            }
            if digits.len() < 4 {
                return Escape::Partial;
            }
            let value = digits
                .iter()
                .fold(0u32, |v, d| v * 16 + (*d as char).to_digit(16).unwrap_or(0));
            if value == u32::from(want) {
                Escape::Is(6)
            } else {
                Escape::No
            }
        }
        Some(_) => Escape::No,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-live/abc123";

    #[test]
    fn a_key_that_begins_another_leaves_none_of_the_longer_showing() {
        let short = "sk-proj-0123456789abcdef";
        let long = "sk-proj-0123456789abcdef-LONGERTAIL";
        let (a, b, again) = (prepared(short), prepared(long), prepared(short));
        let keys = every_key([&a, &b, &again]);
        assert_eq!(keys.len(), 2, "each key once");
        let text = format!("{long} and {short}");
        let masked = String::from_utf8(redact_every(&keys, text.into_bytes())).unwrap();
        assert_eq!(
            masked,
            format!("{} and {}", "*".repeat(long.len()), "*".repeat(short.len()))
        );
    }

    fn prepared(key: &str) -> RedactKey {
        RedactKey::new(key).expect("a key long enough to redact")
    }

    #[test]
    fn neither_the_key_nor_what_is_held_back_shows_in_debug_output() {
        let key = prepared(KEY);
        let mut r = Redactor::new(Some(&key));
        assert_eq!(r.feed(Bytes::from_static(b"data: sk-live/abc12")), "data: ");
        let shown = format!("{r:?}");
        assert!(!shown.contains("live"), "{shown}");
    }

    #[test]
    fn a_key_holding_a_star_is_not_made_up_again_by_its_mask() {
        let key = prepared("sk-ab********");
        let r = Redactor::new(Some(&key));
        for text in [
            "sk-absk-ab********",
            "sk-ab********",
            "x sk-ab\\u002a*******",
        ] {
            let out = r.redact(text.as_bytes());
            assert_eq!(out.len(), text.len());
            assert!(
                !String::from_utf8_lossy(&out).contains("sk-ab********"),
                "{text}"
            );
        }
        // Any other key is masked with `*`.
        assert_eq!(
            Redactor::new(Some(&prepared(KEY)))
                .redact(b"sk-live/abc123")
                .as_ref(),
            b"**************"
        );
    }

    #[test]
    fn a_decoded_text_is_masked_as_it_reads_and_as_its_json_reads() {
        // A key with `\n` in it (two characters), echoed unescaped in a
        // JSON string: read, that is a newline; written again, the key.
        let key = prepared(r"sk-test\nKEY-0123456789");
        let r = Redactor::new(Some(&key));
        let decoded: String = serde_json::from_str(r#""bad key sk-test\nKEY-0123456789""#).unwrap();
        let masked = r.redact_decoded(&decoded);
        let json = serde_json::to_string(&masked).unwrap();
        assert!(!json.contains(r"sk-test\nKEY"), "{json}");
        assert!(masked.starts_with("bad key "), "{masked}");
        // The key as it reads, and a text without it, as before.
        let plain = prepared(KEY);
        let r = Redactor::new(Some(&plain));
        assert_eq!(r.redact_decoded("x sk-live/abc123 y"), "x ************** y");
        assert_eq!(r.redact_decoded("line\none \"two\""), "line\none \"two\"");
    }

    fn redact(text: &str) -> String {
        String::from_utf8(
            Redactor::new(Some(&prepared(KEY)))
                .redact(text.as_bytes())
                .into_owned(),
        )
        .unwrap()
    }

    /// `text` fed to a redactor for `key` as a stream, in pieces cut at
    /// `cuts`, and its end.
    fn streamed(key: &str, text: &str, cuts: &[usize]) -> String {
        let key = prepared(key);
        let mut r = Redactor::new(Some(&key));
        let mut out = Vec::new();
        let mut from = 0;
        for &cut in cuts.iter().chain([&text.len()]) {
            out.extend_from_slice(&r.feed(Bytes::copy_from_slice(&text.as_bytes()[from..cut])));
            from = cut;
        }
        out.extend_from_slice(&r.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn redacts_raw_and_escaped_forms_keeping_the_length() {
        assert_eq!(redact("Bearer sk-live/abc123!"), "Bearer **************!");
        let escaped = r#"{"k":"sk\u002dlive\/abc\u0031\u00323"}"#;
        let out = redact(escaped);
        assert_eq!(out.len(), escaped.len());
        assert!(
            !out.contains("live") && out.starts_with(r#"{"k":""#),
            "{out}"
        );
        assert_eq!(redact(r"\u0073\u006B-live/abc123"), "*".repeat(24));
        assert_eq!(redact("sk-live/abc12 sk-liv"), "sk-live/abc12 sk-liv");
        assert_eq!(redact(r"\u00zz sk-live\x"), r"\u00zz sk-live\x");
        assert_eq!(
            Redactor::new(None).redact(b"sk-live/abc123").as_ref(),
            b"sk-live/abc123"
        );
        // A placeholder key is not masked: it would mangle every answer.
        for placeholder in ["e", "EMPTY", "ollama", "sk-1234"] {
            assert!(RedactKey::new(placeholder).is_none(), "{placeholder}");
        }
        assert_eq!(
            Redactor::new(Some(&prepared("sk-12345")))
                .redact(b"a sk-12345 b")
                .as_ref(),
            b"a ******** b"
        );
    }

    #[test]
    fn redacts_a_key_split_over_any_chunk_boundary() {
        let text = r#"data: {"a":"sk-live/abc123","b":"sk\u002dlive/abc123"} sk-"#;
        for cut in 0..=text.len() {
            for cut2 in cut..=text.len() {
                let out = streamed(KEY, text, &[cut, cut2]);
                assert_eq!(out.len(), text.len());
                assert!(!out.contains("live"), "cut at {cut}/{cut2}: {out}");
                assert!(
                    out.ends_with(" sk-"),
                    "a harmless tail is let through: {out}"
                );
            }
        }
    }

    proptest::proptest! {
        /// Whichever way a text is scanned, it is masked as the scan of
        /// every escaped form masks it, and the same tail is held back.
        #[test]
        fn the_quick_scan_agrees_with_the_scan_of_every_form(
            text in r#"(sk-live/abc123|sk-live/abc12|sk-live/|sk-|s|k|3|abc123|\\u002d|\\u0073|\\/|\\n|\\"|\\\\|\\u00|\\| |x){0,12}"#,
            at_end: bool,
        ) {
            let key = prepared(KEY);
            proptest::prop_assert_eq!(
                Redactor::new(Some(&key)).scan(text.as_bytes(), at_end),
                key.scan_escaped(text.as_bytes(), at_end)
            );
        }
    }

    proptest::proptest! {
        /// A key that overlaps itself (`sk-sk-sk` in `sk-sk-sk-sk`) is
        /// masked leftmost first, as the scan of every form masks it.
        #[test]
        fn a_key_overlapping_itself_is_masked_as_every_form_scan_masks_it(
            text in r#"(sk-sk-sk|sk-|sk|s|-|x|\\u0073){0,16}"#,
            at_end: bool,
        ) {
            let key = prepared("sk-sk-sk");
            proptest::prop_assert_eq!(
                Redactor::new(Some(&key)).scan(text.as_bytes(), at_end),
                key.scan_escaped(text.as_bytes(), at_end)
            );
        }
    }

    /// A key with a `"` and a `\` (printable ASCII allows them), in every
    /// form a JSON writer may give it, is masked whole and nothing else
    /// is, however a stream cuts it.
    #[test]
    fn redacts_a_key_with_a_quote_and_a_backslash_in_every_form() {
        let key = r#"sk-ab"cd\ef12"#;
        let every_u: String = key.bytes().map(|b| format!("\\u{b:04X}")).collect();
        let json = serde_json::to_string(key).unwrap();
        let forms = [
            key.to_string(),
            json[1..json.len() - 1].to_string(),
            every_u,
            r#"sk-ab\u0022cd\\ef12"#.to_string(),
            r#"sk-ab\"cd\u005cef12"#.to_string(),
        ];
        for form in &forms {
            let text = format!(r#"{{"error":"bad key {form}\n","k":"\\u0073k-ab"}}"#);
            let want = text.replace(form.as_str(), &"*".repeat(form.len()));
            assert_eq!(
                Redactor::new(Some(&prepared(key)))
                    .redact(text.as_bytes())
                    .as_ref(),
                want.as_bytes(),
                "{form}"
            );
            for cut in 0..=text.len() {
                assert_eq!(streamed(key, &text, &[cut]), want, "{form} cut at {cut}");
            }
        }
        // Every reading of a key of backslashes at once: 2^40 ways to read
        // 80 of them, followed as 80 positions at most.
        let backslashes = format!("k{}", "\\".repeat(40));
        let text = format!("k{}", "\\".repeat(120));
        let out = Redactor::new(Some(&prepared(&backslashes)))
            .redact(text.as_bytes())
            .into_owned();
        assert_eq!(
            out,
            format!("{}{}", "*".repeat(81), "\\".repeat(40)).into_bytes()
        );
        // A key ending in a backslash, whole as `\` and unfinished as
        // `\\` where a chunk ends: the next chunk decides.
        let trailing = r"sk-abcd1234\";
        let text = r#"{"content":"sk-abcd1234\\"}"#;
        let want = format!(r#"{{"content":"{}"}}"#, "*".repeat(13));
        for cut in 0..=text.len() {
            assert_eq!(streamed(trailing, text, &[cut]), want, "cut at {cut}");
        }
        // A backslash of the text before the key's own is not the key's.
        let text = r#"\\sk-ab\"cd\\ef1"#;
        assert_eq!(
            Redactor::new(Some(&prepared(key)))
                .redact(text.as_bytes())
                .as_ref(),
            text.as_bytes()
        );
    }

    #[test]
    fn passes_clean_chunks_without_copying() {
        let key = prepared(KEY);
        let mut r = Redactor::new(Some(&key));
        let chunk = Bytes::from_static(b"data: {\"text\":\"no secrets \\n here\"}\n\n");
        let out = r.feed(chunk.clone());
        assert_eq!(out.as_ptr(), chunk.as_ptr());
    }
}
