//! W3C trace context: reading a client's `traceparent` and `tracestate`,
//! the sampling decision, and the `traceparent` sent to providers.

use http::{HeaderMap, HeaderName, HeaderValue};

/// The W3C trace context's headers. Constants: a name given as `&str` is
/// parsed again on every lookup.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// See [`TRACEPARENT`].
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The longest `tracestate` passed on (the W3C limit is 32 members of at
/// most 256 bytes each; 512 bytes is what it asks to be kept at least).
const MAX_TRACE_STATE: usize = 512;

/// The trace a request belongs to: continued from the client's
/// `traceparent`, or new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace's id (never all zeros).
    pub trace_id: [u8; 16],
    /// The client's span this request's span is a child of.
    pub parent: Option<[u8; 8]>,
    /// Whether the trace is recorded (and exported).
    pub sampled: bool,
    /// The client's `tracestate`, passed on as it came.
    pub trace_state: Option<HeaderValue>,
}

impl TraceContext {
    /// The context for a request with these headers: the client's trace
    /// when it sent a valid `traceparent` (its sampled flag decides,
    /// parent-based), else a new trace kept at `sample_ratio`.
    pub fn from_headers(headers: &HeaderMap, sample_ratio: f64) -> Self {
        match client_traceparent(headers) {
            Some((trace_id, span_id, flags)) => TraceContext {
                trace_id,
                parent: Some(span_id),
                sampled: flags & 1 == 1,
                trace_state: trace_state(headers),
            },
            None => Self::root(sample_ratio),
        }
    }

    /// A new trace, kept at `sample_ratio` (decided on the trace id, as
    /// OpenTelemetry's ratio sampler does, so every service deciding on
    /// the same id agrees).
    pub fn root(sample_ratio: f64) -> Self {
        let trace_id = new_trace_id();
        TraceContext {
            trace_id,
            parent: None,
            sampled: ratio_keeps(&trace_id, sample_ratio),
            trace_state: None,
        }
    }

    /// The `traceparent` naming `span_id` as the parent, for a request the
    /// gateway makes within this trace.
    pub fn traceparent(&self, span_id: [u8; 8]) -> HeaderValue {
        let text = format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(span_id),
            u8::from(self.sampled)
        );
        HeaderValue::try_from(text).expect("hex digits are a valid header value")
    }
}

/// The client's `traceparent`, when it sent exactly one and it is valid
/// (two are ambiguous: the W3C spec has the request start a trace of its
/// own).
fn client_traceparent(headers: &HeaderMap) -> Option<([u8; 16], [u8; 8], u8)> {
    let mut values = headers.get_all(TRACEPARENT).iter();
    let (value, None) = (values.next()?, values.next()) else {
        return None;
    };
    parse_traceparent(value.to_str().ok()?)
}

/// The client's `traceparent` and `tracestate` as they may be passed on
/// when the gateway itself does not trace: only a valid pair (the same
/// checks as when it traces), never whatever the client sent.
pub fn valid_client_headers(headers: &HeaderMap) -> Option<(HeaderValue, Option<HeaderValue>)> {
    client_traceparent(headers)?;
    let traceparent = headers.get(TRACEPARENT)?.clone();
    Some((traceparent, trace_state(headers)))
}

/// A fresh span id (never all zeros).
pub fn new_span_id() -> [u8; 8] {
    loop {
        let id = fastrand::u64(..).to_be_bytes();
        if id != [0; 8] {
            return id;
        }
    }
}

fn new_trace_id() -> [u8; 16] {
    loop {
        let id = fastrand::u128(..).to_be_bytes();
        if id != [0; 16] {
            return id;
        }
    }
}

/// Whether a ratio sampler keeps the trace: its id's low 8 bytes, read as
/// a number, below the ratio's share of them.
fn ratio_keeps(trace_id: &[u8; 16], ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 {
        return false;
    }
    let low = u64::from_be_bytes(trace_id[8..].try_into().expect("8 bytes"));
    (low >> 1) < (ratio * (1u64 << 63) as f64) as u64
}

/// `version-traceid-parentid-flags` (W3C Trace Context level 1): the trace
/// id, the parent's span id and the flags; `None` for anything malformed
/// (then the request starts a trace of its own, as the spec asks).
pub fn parse_traceparent(value: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let value = value.trim_matches([' ', '\t']);
    let mut parts = value.split('-');
    let version = parts.next()?;
    let (trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?);
    let rest = parts.next();
    let lower_hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if version.len() != 2 || !lower_hex(version) || version == "ff" {
        return None;
    }
    // Version 00 is exactly four fields; a later version may add more.
    if version == "00" && rest.is_some() {
        return None;
    }
    if trace.len() != 32 || parent.len() != 16 || flags.len() != 2 {
        return None;
    }
    if !(lower_hex(trace) && lower_hex(parent) && lower_hex(flags)) {
        return None;
    }
    let mut trace_id = [0; 16];
    let mut span_id = [0; 8];
    hex::decode_to_slice(trace, &mut trace_id).ok()?;
    hex::decode_to_slice(parent, &mut span_id).ok()?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((trace_id, span_id, flags))
}

/// The client's `tracestate` (its entries joined, when sent as several
/// headers), when it is of a size worth passing on.
fn trace_state(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut values = headers.get_all(TRACESTATE).iter();
    let first = values.next()?;
    let joined = match values.next() {
        None => first.clone(),
        Some(second) => {
            let mut all = first.as_bytes().to_vec();
            for more in std::iter::once(second).chain(values) {
                all.push(b',');
                all.extend_from_slice(more.as_bytes());
            }
            HeaderValue::from_bytes(&all).ok()?
        }
    };
    let valid = !joined.is_empty()
        && joined.len() <= MAX_TRACE_STATE
        && joined.to_str().is_ok_and(valid_trace_state);
    valid.then_some(joined)
}

/// Whether a `tracestate` is a list of at most 32 `key=value` members
/// (W3C Trace Context: keys of lowercase letters, digits and `_-*/`, with
/// an optional `tenant@system` form; values of printable ASCII but `,`
/// and `=`, not ending in a space). Empty members are allowed.
fn valid_trace_state(state: &str) -> bool {
    let key_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-*/".contains(c);
    let valid_key = |key: &str| {
        let mut parts = key.splitn(2, '@');
        let first = parts.next().unwrap_or_default();
        let vendor_ok = parts.next().is_none_or(|v| {
            !v.is_empty()
                && v.len() <= 13
                && v.starts_with(|c: char| c.is_ascii_lowercase())
                && v.chars().all(key_char)
        });
        !first.is_empty()
            && first.len() <= 241
            && first.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && first.chars().all(key_char)
            && vendor_ok
    };
    let valid_value = |value: &str| {
        !value.is_empty()
            && value.len() <= 256
            && !value.ends_with(' ')
            && value
                .chars()
                .all(|c| (' '..='~').contains(&c) && c != ',' && c != '=')
    };
    let members: Vec<&str> = state
        .split(',')
        .map(|m| m.trim_matches([' ', '\t']))
        .filter(|m| !m.is_empty())
        .collect();
    !members.is_empty()
        && members.len() <= 32
        && members.iter().all(|member| {
            member
                .split_once('=')
                .is_some_and(|(key, value)| valid_key(key) && valid_value(value))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_continued_with_its_sampled_flag() {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", HeaderValue::from_static(VALID));
        headers.insert("tracestate", HeaderValue::from_static("vendor=a"));
        headers.append("tracestate", HeaderValue::from_static("other=b"));
        let context = TraceContext::from_headers(&headers, 0.0);
        assert_eq!(
            hex::encode(context.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            context.parent,
            Some([0, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        assert!(
            context.sampled,
            "a sampled parent is kept whatever the ratio"
        );
        assert_eq!(context.trace_state.unwrap(), "vendor=a,other=b");
        let span = [1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(
            context_traceparent(&headers, span),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-01"
        );

        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
        );
        let unsampled = TraceContext::from_headers(&headers, 1.0);
        assert!(!unsampled.sampled, "an unsampled parent is not recorded");
    }

    fn context_traceparent(headers: &HeaderMap, span: [u8; 8]) -> String {
        let context = TraceContext::from_headers(headers, 1.0);
        context.traceparent(span).to_str().unwrap().to_string()
    }

    #[test]
    fn malformed_traceparents_start_a_trace_of_their_own() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
        // A later version may carry more fields.
        assert!(parse_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"
        )
        .is_some());
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", HeaderValue::from_static("garbage"));
        headers.insert("tracestate", HeaderValue::from_static("vendor=a"));
        let context = TraceContext::from_headers(&headers, 1.0);
        assert_eq!(context.parent, None);
        assert_eq!(
            context.trace_state, None,
            "no tracestate without its parent"
        );
        assert!(context.sampled);
    }

    #[test]
    fn two_traceparents_or_a_malformed_tracestate_are_not_continued() {
        let mut headers = HeaderMap::new();
        headers.append("traceparent", HeaderValue::from_static(VALID));
        headers.append("traceparent", HeaderValue::from_static(VALID));
        assert_eq!(TraceContext::from_headers(&headers, 1.0).parent, None);
        assert!(valid_client_headers(&headers).is_none());
        for (state, kept) in [
            ("vendor=a,other@sys=b-1", true),
            ("congo=t61rcWkgMzE, rojo=00f067aa0ba902b7", true),
            ("not a list member;;; x-evil: 1", false),
            (",,,,", false),
            ("Upper=x", false),
            ("k=v,", true),
            ("k=va=lue", false),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("traceparent", HeaderValue::from_static(VALID));
            headers.insert("tracestate", HeaderValue::from_str(state).unwrap());
            let context = TraceContext::from_headers(&headers, 1.0);
            assert_eq!(context.trace_state.is_some(), kept, "{state:?}");
            assert!(context.parent.is_some(), "the traceparent still counts");
        }
    }

    #[test]
    fn the_ratio_keeps_about_its_share_of_new_traces() {
        assert!(!TraceContext::root(0.0).sampled);
        assert!(TraceContext::root(1.0).sampled);
        let kept = (0..20_000)
            .filter(|_| TraceContext::root(0.25).sampled)
            .count();
        assert!(
            (4_500..5_500).contains(&kept),
            "kept {kept} of 20000 at 0.25"
        );
    }
}
