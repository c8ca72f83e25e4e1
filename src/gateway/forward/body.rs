//! Copying an answer to the client as the provider produces it, through a
//! meter that reads its usage (and, for translated providers, translates
//! it) and the redactor that keeps the provider's key out.

use super::decode::UpstreamBody;
use super::headers::{has_media_type, is_event_stream};
use super::{AnswerDetails, Report, Settle, CLIENT_TOO_SLOW};
use crate::config::ProviderSettings;
use crate::cost::{self, Encoding, Estimate, StreamMeter, Usage};
use crate::gateway::client::{next_piece, while_taken, Client, Progress};
use crate::openai::ApiError;
use crate::providers::anthropic::StreamTranslator;
use crate::redact::Redactor;
use crate::upstream::breaker::Outcome;
use crate::upstream::health::Domain;
use crate::upstream::{Backend, Upstreams};
use bytes::Bytes;
use pingora::http::ResponseHeader;
use std::task::Poll;
use std::time::{Duration, Instant};
use tracing::warn;

/// The next read's wait: `idle` from now, but not past `until`, as its
/// end (for `timeout_at`: one clock read) and its length.
pub(super) fn read_gap(idle: Duration, until: Instant) -> (tokio::time::Instant, Duration) {
    let now = tokio::time::Instant::now();
    let gap = idle.min(until.saturating_duration_since(now.into_std()));
    (now + gap, gap)
}

/// When a body's reads have stalled (no chunk for `idle`, or `until`
/// passed), when a send to the client has waited too long, and how long
/// the sends have waited in all. Its timer is armed once and moved on only
/// when it fires, not at every chunk (a timer set and cancelled for each
/// read or send was a few hundred instructions a streamed token).
struct Stall {
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// When the current read began.
    last: tokio::time::Instant,
    idle: Duration,
    until: Instant,
    /// The timer was moved on to a send's bound during a send: the next
    /// read sets its gap's end again.
    pushed: bool,
    /// When the last send to the client began, whether it had to wait,
    /// and how long the sends have waited in all: the client's time, not
    /// the provider's.
    send_began: tokio::time::Instant,
    blocked: bool,
    waited: Duration,
}

impl Stall {
    fn new(idle: Duration, until: Instant) -> Self {
        let (end, _) = read_gap(idle, until);
        Stall {
            timer: Box::pin(tokio::time::sleep_until(end)),
            last: tokio::time::Instant::now(),
            idle,
            until,
            pushed: false,
            send_began: tokio::time::Instant::now(),
            blocked: false,
            waited: Duration::ZERO,
        }
    }

    /// A read begins: its gap is counted from now (not from the last
    /// chunk's arrival, so a slow client's time is not the provider's).
    fn reading(&mut self) {
        self.last = tokio::time::Instant::now();
        if std::mem::take(&mut self.blocked) {
            self.waited += self.last - self.send_began;
        }
        if std::mem::take(&mut self.pushed) {
            let until = tokio::time::Instant::from_std(self.until);
            self.timer
                .as_mut()
                .reset((self.last + self.idle).min(until));
        }
    }

    /// Whether the current read began at or after `deadline`.
    fn past(&self, deadline: Instant) -> bool {
        self.last >= tokio::time::Instant::from_std(deadline)
    }

    /// Whether the copy has waited, in all, [`CLIENT_STUCK`] or more for
    /// the client to take what was sent: enough to have made it miss its
    /// deadline. (Not a share of its time: a client that stops reading
    /// once, near the deadline, must not get the provider blamed, while
    /// the socket buffers hide part of its pause.)
    fn waited_on_client(&self) -> bool {
        self.waited >= CLIENT_STUCK
    }

    /// A send to the client begins (after a piece that had to wait, if
    /// any: its wait is counted).
    fn sending(&mut self, now: Instant) {
        let now = tokio::time::Instant::from_std(now);
        if std::mem::take(&mut self.blocked) {
            self.waited += now - self.send_began;
        }
        self.send_began = now;
    }

    /// The reads must end by `until` (before the deadline given first).
    fn end_by(&mut self, until: Instant) {
        if until < self.until {
            self.until = until;
            let (end, _) = read_gap(self.idle, until);
            self.timer.as_mut().reset(end.min(self.last + self.idle));
        }
    }

    /// Resolves once `deadline` (a send's bound) has passed, however long
    /// the gap: what a send to the client may take (neither the provider's
    /// idle timeout nor the drain after the last event is the client's).
    /// Cancel-safe, as [`Stall::stalled`].
    async fn ran_out(&mut self, deadline: Instant) {
        // Polled only when the send has to wait.
        self.blocked = true;
        let deadline = tokio::time::Instant::from_std(deadline);
        // A send timeout shorter than the read gap the timer is set to.
        if deadline < self.timer.deadline() {
            self.timer.as_mut().reset(deadline);
            self.pushed = true;
        }
        loop {
            self.timer.as_mut().await;
            if deadline <= tokio::time::Instant::now() {
                return;
            }
            self.timer.as_mut().reset(deadline);
            self.pushed = true;
        }
    }

    /// Resolves when the reads have stalled, with the gap they were given
    /// (the idle timeout, or what was left of the deadline). Cancel-safe:
    /// the timer is kept.
    async fn stalled(&mut self) -> Duration {
        loop {
            self.timer.as_mut().await;
            let until = tokio::time::Instant::from_std(self.until);
            let end = (self.last + self.idle).min(until);
            if end <= tokio::time::Instant::now() {
                return end.saturating_duration_since(self.last);
            }
            self.timer.as_mut().reset(end);
        }
    }
}

/// Whether a successful answer is neither JSON nor a stream (audio, text):
/// one with a content type that says so.
fn is_opaque(header: &ResponseHeader) -> bool {
    let given = header.headers.get(http::header::CONTENT_TYPE);
    given.is_some_and(|v| v.to_str().is_ok())
        && !has_media_type(header, "application/json")
        && !is_event_stream(header)
}

/// Reads usage from a response on its way to the client. One per request,
/// in the request's state.
pub(super) enum Meter {
    /// An error answer: the provider generated nothing. It is held (up to
    /// a bound) and sent whole at the end.
    Error { body: Vec<u8> },
    /// A JSON body, kept (up to a bound) to read its `usage` at the end;
    /// past the bound, only its `tail` is kept (where `usage` is).
    Json {
        body: Vec<u8>,
        seen: usize,
        tail: Vec<u8>,
    },
    /// An SSE stream, metered event by event (boxed, as the next: large,
    /// and the meter is part of every request's state).
    Stream(Box<StreamMeter>),
    /// A stream in the provider's own format, translated event by event.
    Translated(Box<StreamTranslator>),
    /// A body that is neither JSON nor a stream (speech audio, a
    /// transcription as text): passed through as it comes, nothing read.
    Opaque { seen: usize },
}

impl Meter {
    /// The meter for an OpenAI-format answer with this header; `estimate`
    /// counts (as `model`'s encoding does) when the provider reports no usage.
    /// An endpoint whose answers are JSON (`answers_json`) has them read as
    /// JSON whatever their content type says (a page or words in their
    /// place are then judged whole, not passed on as they come).
    pub(super) fn for_response(
        header: &ResponseHeader,
        answers_json: bool,
        strip_usage: bool,
        estimate: &Estimate,
        model: &str,
    ) -> Self {
        match (header.status.is_success(), is_event_stream(header)) {
            (false, _) => Meter::Error { body: Vec::new() },
            (true, true) => Meter::Stream(Box::new(
                StreamMeter::new(strip_usage).with_estimate(estimate.clone(), model),
            )),
            (true, false) if !answers_json && is_opaque(header) => Meter::Opaque { seen: 0 },
            (true, false) => Meter::Json {
                body: Vec::new(),
                seen: 0,
                tail: Vec::new(),
            },
        }
    }

    /// Whether the meter may edit the body (so its length changes): a
    /// stream loses events it cannot read, and what the gateway added.
    pub(super) fn edits_body(&self) -> bool {
        !matches!(self, Meter::Json { .. } | Meter::Opaque { .. })
    }

    /// Whether the answer goes to the client from its first byte (else it
    /// is held until its first content, or whole for JSON).
    pub(super) fn passes_at_once(&self) -> bool {
        matches!(self, Meter::Opaque { .. })
    }

    /// [`Meter::feed`], with `model`'s encoding loaded first when this
    /// chunk ends a stream the gateway must count for the client (its
    /// usage chunk).
    pub(super) async fn feed_counted(&mut self, chunk: Bytes, model: &str) -> Bytes {
        // `[DONE]` in this chunk, or (split across chunks) after the
        // finish reason went by.
        let ending =
            |m: &StreamMeter| m.saw_finish() || memchr::memmem::find(&chunk, b"DONE").is_some();
        let may_count = match self {
            Meter::Stream(m) => m.may_add_usage() && ending(m),
            Meter::Translated(t) => t.may_count_for_client(&chunk),
            _ => false,
        };
        // Only then is the encoding told: this runs for every chunk.
        if may_count {
            let encoding = Encoding::for_model(model);
            if !encoding.loaded() {
                encoding.ready().await;
            }
        }
        self.feed(chunk)
    }

    /// What the answer used when the gateway need not count it: the
    /// provider's report, or what a media request or an error is billed.
    /// `None` when the gateway must count (its encoding loaded first).
    fn usage_uncounted(&self, estimate: &Estimate, model: &str) -> Option<Usage> {
        if estimate.media_units().is_some() {
            return Some(self.usage(estimate, model));
        }
        match self {
            Meter::Error { .. } => Some(Usage::default()),
            Meter::Opaque { .. } => None,
            // The common case: one pass over the body, for `usage` alone.
            Meter::Json { body, seen, .. } if *seen <= cost::MAX_METERED_JSON_BYTES => {
                cost::reported_usage_in_json(body)
            }
            Meter::Json { tail, .. } => cost::reported_usage_in_json_tail(tail),
            Meter::Stream(meter) => meter.reported_usage().map(|_| meter.usage(0)),
            Meter::Translated(translator) => translator.usage(),
        }
    }

    /// Whether the end of a stream the gateway seals carries its own count
    /// (the provider reported no usage): then the encoding must be loaded
    /// first.
    fn seal_needs_count(&self, estimate: &Estimate) -> bool {
        estimate.media_units().is_none()
            && match self {
                Meter::Stream(meter) => meter.reported_usage().is_none(),
                // Its last event may come only now, with the usage chunk.
                Meter::Translated(translator) => translator.usage().is_none(),
                _ => false,
            }
    }

    /// Takes an upstream chunk, returns what to send on.
    pub(super) fn feed(&mut self, chunk: Bytes) -> Bytes {
        match self {
            Meter::Error { body } => {
                if body.len() + chunk.len() <= cost::MAX_METERED_JSON_BYTES {
                    body.extend_from_slice(&chunk);
                }
                Bytes::new()
            }
            Meter::Json { body, seen, tail } => {
                *seen += chunk.len();
                if *seen <= cost::MAX_METERED_JSON_BYTES {
                    body.extend_from_slice(&chunk);
                } else {
                    if tail.is_empty() {
                        // The usage may begin in what was kept whole.
                        let from = body.len().saturating_sub(cost::JSON_TAIL_BYTES);
                        tail.extend_from_slice(&body[from..]);
                    }
                    tail.extend_from_slice(&chunk);
                    let excess = tail.len().saturating_sub(cost::JSON_TAIL_BYTES);
                    tail.drain(..excess);
                }
                chunk
            }
            Meter::Stream(meter) => meter.feed(chunk),
            Meter::Translated(translator) => translator.feed(&chunk),
            Meter::Opaque { seen } => {
                *seen += chunk.len();
                chunk
            }
        }
    }

    /// Whether the last event of a whole answer went by (`[DONE]`, a
    /// Responses stream's `response.completed` or `incomplete`, Anthropic's
    /// `message_stop` or `error`): its client has all of it and may leave.
    fn said_last(&self) -> bool {
        match self {
            Meter::Stream(meter) => meter.said_last(),
            Meter::Translated(translator) => translator.finished(),
            _ => false,
        }
    }

    /// Whether what the answer used is known for good: from the provider's
    /// report, or counted once a translated stream ended (no report
    /// follows its `message_stop` or `error`).
    fn usage_final(&self) -> bool {
        match self {
            Meter::Stream(meter) => meter.reported_usage().is_some(),
            Meter::Translated(translator) => translator.usage().is_some() || translator.finished(),
            _ => true,
        }
    }

    /// Reads a stream's last event when the body ended without its blank
    /// line (else nothing): what it passes on, or translates to.
    pub(super) fn read_last_event(&mut self) -> Bytes {
        match self {
            Meter::Stream(meter) => meter.finish(),
            Meter::Translated(translator) => translator.finish(),
            _ => Bytes::new(),
        }
    }

    /// How a whole answer went for the breaker: as its in-band error event
    /// says, if it carried one (see [`in_band_judgement`]), though it came
    /// with a 200.
    fn outcome(&self) -> Outcome {
        self.in_band_status()
            .map_or(Outcome::Success, |status| in_band_judgement(status).0)
    }

    /// The status the provider's in-band error event stands for, if the
    /// stream carried one (see [`Meter::in_band_error`]).
    fn in_band_status(&self) -> Option<u16> {
        self.in_band_error().map(|error| error.status)
    }

    /// Whether the stream carried an in-band error that was the provider's
    /// failure (a server error, or an error that says nothing of its class).
    fn provider_failed(&self) -> bool {
        self.in_band_status()
            .is_some_and(|status| in_band_judgement(status).0 == Outcome::Failure)
    }

    /// The provider's in-band error event, if the stream carried one, as
    /// the gateway's error ([`ApiError::from_in_band`]; a translated
    /// stream's as translated).
    pub(super) fn in_band_error(&self) -> Option<&ApiError> {
        match self {
            Meter::Stream(meter) => meter.error(),
            Meter::Translated(translator) => translator.error(),
            _ => None,
        }
    }

    /// A JSON answer that is the provider's error though it came with a
    /// 200 ([`crate::openai::error_in_json_answer`]), read once it is whole.
    pub(super) fn json_error(&self) -> Option<ApiError> {
        match self {
            Meter::Json { body, seen, .. } if *seen <= cost::MAX_METERED_JSON_BYTES => {
                crate::openai::error_in_json_answer(body)
            }
            _ => None,
        }
    }

    /// Whether a whole JSON answer (as the meter holds it) is no JSON
    /// object: not `{` ... `}`, as an HTML page or plain words are not.
    pub(super) fn not_an_object(&self) -> bool {
        match self {
            Meter::Json { body, seen, .. } if *seen <= cost::MAX_METERED_JSON_BYTES => {
                let body = body.trim_ascii();
                !(body.starts_with(b"{") && body.ends_with(b"}"))
            }
            _ => false,
        }
    }

    /// Whether a translated stream was cut at an event too long to
    /// translate ([`StreamTranslator::cut`]).
    pub(super) fn cut(&self) -> bool {
        matches!(self, Meter::Translated(translator) if translator.cut())
    }

    /// Whether the stream carried the provider's own error event: a break
    /// after it needs no second one.
    fn carried_error(&self) -> bool {
        match self {
            Meter::Stream(meter) => meter.saw_error(),
            Meter::Translated(translator) => translator.finished() && !translator.stopped(),
            _ => false,
        }
    }

    /// Whether a completion stream ended before it finished (no
    /// `finish_reason`, no `[DONE]`): cut short, however cleanly.
    fn cut_short(&self) -> bool {
        match self {
            Meter::Stream(meter) => !meter.finished(),
            Meter::Translated(translator) => !translator.finished(),
            _ => false,
        }
    }

    /// The Responses API response the answer carries (its `id`), if any.
    /// A JSON answer's is read from its leading members (a Responses
    /// object begins with its `id` and `object`), so one too large to keep
    /// whole still names its response.
    pub(super) fn response_id(&self) -> Option<String> {
        match self {
            Meter::Stream(meter) => meter.response_id().map(str::to_owned),
            Meter::Json { body, .. } => {
                let (mut id, mut object) = (None, None);
                for (key, value) in cost::leading_members(body) {
                    match key.as_str() {
                        "id" => id = serde_json::from_str::<String>(value.get()).ok(),
                        "object" => object = serde_json::from_str::<String>(value.get()).ok(),
                        _ => {}
                    }
                    if id.is_some() && object.is_some() {
                        break;
                    }
                }
                id.filter(|_| object.as_deref() == Some("response"))
            }
            _ => None,
        }
    }

    /// What the answer says about itself, for its trace.
    fn details(&self, capture: bool) -> AnswerDetails {
        match self {
            Meter::Json { body, seen, .. } if *seen <= cost::MAX_METERED_JSON_BYTES => {
                answer_details(body, capture)
            }
            Meter::Stream(meter) => AnswerDetails {
                id: meter.answer_id(),
                model: meter.model(),
                finish_reasons: meter.finish_reasons().to_vec(),
                completion: capture.then(|| meter.generated_text()),
            },
            _ => AnswerDetails::default(),
        }
    }

    /// Whether a stream stopped at an event that is not JSON.
    pub(super) fn halted(&self) -> bool {
        matches!(self, Meter::Stream(m) if m.halted())
    }

    /// Whether a stream stops at an event that is not JSON (else leaves
    /// it out and goes on).
    pub(super) fn halt_on_malformed(&mut self, on: bool) {
        if let Meter::Stream(m) = self {
            m.halt_on_malformed(on);
        }
    }

    /// The end of the upstream body: what is still to be sent. A stream
    /// that finished without `data: [DONE]` gets one from the gateway.
    fn finish(&mut self) -> Bytes {
        match self {
            Meter::Stream(meter) => {
                let rest = meter.finish();
                // Nor one its provider ended with an error event.
                if meter.saw_done()
                    || !meter.finished()
                    || !meter.is_completion_stream()
                    || meter.saw_error()
                {
                    return rest;
                }
                // The last event ends (with its blank line) before the seal.
                let newline = if rest.is_empty() || rest.ends_with(b"\n\n") {
                    ""
                } else if rest.ends_with(b"\n") {
                    "\n"
                } else {
                    "\n\n"
                };
                Bytes::from([&rest[..], newline.as_bytes(), &meter.seal()].concat())
            }
            Meter::Translated(translator) => translator.finish(),
            Meter::Error { body } => Bytes::from(std::mem::take(body)),
            _ => Bytes::new(),
        }
    }

    /// What the answer used: read, or (when the provider said nothing, or
    /// the answer broke off) the gateway's count with `estimate`, as
    /// `model`'s encoding counts.
    fn usage(&self, estimate: &Estimate, model: &str) -> Usage {
        let counted = |generated_bytes: u64| Usage {
            prompt_tokens: estimate.prompt_tokens(model),
            completion_tokens: estimate.completion_tokens(model, "", generated_bytes),
            cached_tokens: 0,
            estimated: true,
            ..Default::default()
        };
        if let Some(media) = estimate.media_units() {
            return match self {
                Meter::Error { .. } => Usage::default(),
                Meter::Json { body, seen, .. } if *seen <= cost::MAX_METERED_JSON_BYTES => {
                    media.usage_from_json(body)
                }
                // Too large to read whole: the units asked for, and what
                // its usage reports.
                Meter::Json { tail, .. } => media.usage_from_tail(tail),
                Meter::Stream(meter) => media.usage(meter.reported_usage()),
                _ => media.usage(None),
            };
        }
        match self {
            Meter::Error { .. } => Usage::default(),
            Meter::Opaque { seen } => counted(*seen as u64),
            Meter::Json { body, seen, .. } if *seen <= cost::MAX_METERED_JSON_BYTES => {
                cost::usage_from_json_counted(body, estimate, model)
            }
            Meter::Json { seen, tail, .. } => {
                cost::reported_usage_in_json_tail(tail).unwrap_or_else(|| counted(*seen as u64))
            }
            Meter::Stream(meter) => meter.usage(0),
            Meter::Translated(translator) => translator.billed_usage(),
        }
    }
}

/// What a JSON answer (chat, completion, Responses) says about itself: its
/// model, its finish reasons (a Responses answer's `status`) and, when
/// `capture`, its generated text. Members are taken as raw JSON and only
/// the strings kept are decoded (a tree of the whole answer cost a traced
/// request some 25k instructions); a member of the wrong type is left out,
/// as is an element of `choices` or `output` that is not an object. An
/// answer that reading refuses (a member given twice) is read as a tree.
pub(super) fn answer_details(body: &[u8], capture: bool) -> AnswerDetails {
    details_by_member(body, capture).unwrap_or_else(|()| details_from_a_tree(body, capture))
}

/// [`answer_details`] member by member; `Err` for an object it cannot read.
fn details_by_member(body: &[u8], capture: bool) -> Result<AnswerDetails, ()> {
    use serde_json::value::RawValue;
    #[derive(serde::Deserialize)]
    struct Answer<'a> {
        #[serde(default, borrow)]
        id: Option<&'a RawValue>,
        #[serde(default, borrow)]
        model: Option<&'a RawValue>,
        #[serde(default, borrow)]
        object: Option<&'a RawValue>,
        #[serde(default, borrow)]
        status: Option<&'a RawValue>,
        #[serde(default, borrow)]
        choices: Option<&'a RawValue>,
        #[serde(default, borrow)]
        output: Option<&'a RawValue>,
    }
    /// A choice (`finish_reason`, `message`, `text`), a message or a
    /// Responses output item (`content`), a content part (`text`).
    #[derive(serde::Deserialize)]
    struct Member<'a> {
        #[serde(default, borrow)]
        finish_reason: Option<&'a RawValue>,
        #[serde(default, borrow)]
        message: Option<&'a RawValue>,
        #[serde(default, borrow)]
        content: Option<&'a RawValue>,
        #[serde(default, borrow)]
        text: Option<&'a RawValue>,
    }
    /// `json` read as `T` when it is an object (a derived struct would
    /// also take an array, field by field); `Err` for an object that does
    /// not read as `T`.
    fn object<'a, T: serde::Deserialize<'a>>(json: &'a [u8]) -> Result<Option<T>, ()> {
        if !json.trim_ascii_start().starts_with(b"{") {
            return Ok(None);
        }
        serde_json::from_slice(json).map(Some).map_err(|_| ())
    }
    /// The elements of an array that are objects.
    fn objects(raw: Option<&RawValue>) -> Result<Vec<Member<'_>>, ()> {
        let items = raw
            .and_then(|r| serde_json::from_str::<Vec<&RawValue>>(r.get()).ok())
            .unwrap_or_default();
        let mut members = Vec::with_capacity(items.len());
        for item in items {
            members.extend(object::<Member>(item.get().as_bytes())?);
        }
        Ok(members)
    }
    let text =
        |raw: Option<&RawValue>| raw.and_then(|r| serde_json::from_str::<String>(r.get()).ok());
    let Some(answer) = object::<Answer>(body)? else {
        return Ok(AnswerDetails::default());
    };
    let choices = objects(answer.choices)?;
    let mut finish_reasons: Vec<String> = choices
        .iter()
        .filter_map(|c| text(c.finish_reason))
        .take(16)
        .collect();
    if finish_reasons.is_empty() && text(answer.object).as_deref() == Some("response") {
        finish_reasons.extend(text(answer.status));
    }
    let completion = if capture {
        let mut parts = Vec::new();
        for choice in &choices {
            let message = match choice.message {
                Some(m) => object::<Member>(m.get().as_bytes())?,
                None => None,
            };
            parts.extend(
                message
                    .and_then(|m| text(m.content))
                    .or_else(|| text(choice.text)),
            );
        }
        for item in objects(answer.output)? {
            parts.extend(
                objects(item.content)?
                    .into_iter()
                    .filter_map(|p| text(p.text)),
            );
        }
        Some(parts.join("\n"))
    } else {
        None
    };
    Ok(AnswerDetails {
        id: text(answer.id),
        model: text(answer.model),
        finish_reasons,
        completion,
    })
}

/// An answer's details read from a `serde_json::Value` tree of it: slower,
/// but it takes what the member-by-member reading refuses (a member given
/// twice: the last one counts, as in the tree).
fn details_from_a_tree(body: &[u8], capture: bool) -> AnswerDetails {
    use serde_json::Value;
    let Ok(Value::Object(answer)) = serde_json::from_slice::<Value>(body) else {
        return AnswerDetails::default();
    };
    let text = |v: &Value| v.as_str().map(str::to_owned);
    let choices = answer.get("choices").and_then(Value::as_array);
    let mut finish_reasons: Vec<String> = choices
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("finish_reason").and_then(text))
        .take(16)
        .collect();
    if finish_reasons.is_empty() && answer.get("object").and_then(Value::as_str) == Some("response")
    {
        finish_reasons.extend(answer.get("status").and_then(text));
    }
    let completion = capture.then(|| {
        let from_choices = choices.into_iter().flatten().filter_map(|c| {
            c.pointer("/message/content")
                .and_then(text)
                .or_else(|| c.get("text").and_then(text))
        });
        let from_output = answer
            .get("output")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|item| item.get("content").and_then(Value::as_array))
            .flatten()
            .filter_map(|part| part.get("text").and_then(text));
        from_choices
            .chain(from_output)
            .collect::<Vec<_>>()
            .join("\n")
    });
    AnswerDetails {
        id: answer.get("id").and_then(text),
        model: answer.get("model").and_then(text),
        finish_reasons,
        completion,
    }
}

/// How long the rest of a body is read after the last event of a whole
/// answer (at most the idle timeout). A provider ends it at once; reading
/// it keeps the connection and lets the answer be stored, but a client that
/// reads to the end waits for it.
const AFTER_LAST_EVENT: Duration = Duration::from_secs(1);

/// How long a send to the client may wait, past the attempt's deadline,
/// before the client counts as one that stopped reading and is cut off (see
/// [`BodyEnd::ClientTooSlow`]); a send that finishes in time leaves the
/// stream's end to be judged at the next read.
const CLIENT_STUCK: Duration = Duration::from_secs(1);

/// What the client is told of a translated stream cut at an event too long
/// to translate.
pub(super) fn cut_message(provider: &str) -> String {
    format!(
        "The provider '{provider}' sent a stream event longer than {} bytes, which the gateway does not translate.",
        cost::MAX_LINE_BYTES
    )
}

/// How copying the response body ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum BodyEnd {
    /// The whole answer went to the client.
    Complete,
    /// The client went away.
    ClientGone,
    /// The provider broke off or stalled (why, for the client); the stream
    /// was ended with an in-band error unless the client can resume it.
    ProviderBroke(String),
    /// The attempt's total time ran out after the copy had waited a second
    /// or more in all for the client to take what was sent. Neither
    /// the provider's failure nor a stream to continue elsewhere (else a
    /// slow reader would trip breakers, and be served twice). `mid_send`:
    /// cut during a send that had waited [`CLIENT_STUCK`] (the connection
    /// is closed: a client not reading cannot be told more); else told
    /// in-band.
    ClientTooSlow { mid_send: bool },
}

/// Copies the response body chunk by chunk, as the provider produces it,
/// through the meter and the redactor.
pub(super) struct Copy<'a> {
    pub upstreams: &'a Upstreams,
    /// The endpoint answered (a Responses stream's error event has its own
    /// shape).
    pub endpoint: crate::openai::Endpoint,
    /// What the answer used is billed (else it counts as nothing).
    pub bills: bool,
    pub provider: &'a ProviderSettings,
    /// The provider's `content-length`, when it sent one.
    pub declared_len: Option<usize>,
    /// Longest gap between two chunks.
    pub idle: Duration,
    /// End of the attempt's total time.
    pub deadline: Instant,
    /// The longest a send may wait for the client
    /// (`server.client_send_timeout_seconds`), taken from the client for
    /// the copy: its own timer bounds the sends (Pingora's would set one
    /// for every write, a streamed token's hundreds of instructions).
    pub send_timeout: Option<Duration>,
    /// Whether the client is taking what is sent, when a send outlasts
    /// the send timeout: a slow reader is given more time.
    pub progress: Progress,
    /// The backend answering, and how long its first byte took.
    pub backend: &'a Backend,
    pub ttfb: Duration,
    /// What the gateway counts when the provider reports no usage, and the
    /// model whose encoding counts.
    pub estimate: &'a Estimate,
    pub model: &'a str,
    /// The target's price differs by processing tier: a JSON answer's
    /// `service_tier` is read.
    pub reads_tier: bool,
    /// For the logs.
    pub request_id: &'a str,
    /// For a sampled trace: the answer is described in the report, with
    /// its text when `Some(true)`.
    pub describe: Option<bool>,
}

impl Copy<'_> {
    /// Copies the whole answer, starting with what was held back until its
    /// first content came (`held`: the bytes to send first, how many
    /// upstream bytes they came from, and whether the body already ended);
    /// how it ended (a complete answer's connection may go back to the
    /// pool). The report's usage is set however it ended, and the request
    /// settled when complete.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn run(
        &self,
        client: &mut dyn Client,
        upstream: &mut UpstreamBody<'_>,
        report: &mut Report,
        settle: &mut dyn Settle,
        meter: &mut Meter,
        redactor: &mut Redactor<'_>,
        held: (Bytes, usize, bool),
    ) -> BodyEnd {
        let mut settled = false;
        let end = self
            .copy(
                client,
                upstream,
                report,
                settle,
                meter,
                redactor,
                &mut settled,
                held,
            )
            .await;
        if matches!(end, BodyEnd::ClientGone) && !settled {
            self.read_for_usage(upstream, meter).await;
        }
        if !settled {
            // Not settled before the end (a broken or abandoned body): what
            // the meter saw is what the request used.
            report.usage = self.usage(meter).await;
            report.response_id = self.response_id(meter);
            let outcome = match end {
                BodyEnd::Complete => meter.outcome(),
                BodyEnd::ProviderBroke(_) => Outcome::Failure,
                BodyEnd::ClientGone | BodyEnd::ClientTooSlow { .. } => Outcome::Neutral,
            };
            self.upstreams.record_outcome(
                self.backend,
                outcome,
                Domain::Deployment,
                Some(self.ttfb),
            );
        }
        let malformed = match meter {
            Meter::Stream(stream) => stream.malformed(),
            Meter::Translated(translator) => u64::from(translator.malformed()),
            _ => 0,
        };
        if malformed > 0 {
            warn!(request_id = %self.request_id, provider = %self.provider.name, events = malformed, "left out stream events that were not JSON");
        }
        if let Some(capture) = self.describe {
            report.answer = Some(meter.details(capture).redacted(redactor));
        }
        if let (BodyEnd::Complete, Some(status)) = (&end, meter.in_band_status()) {
            report.error_reason = Some(in_band_judgement(status).1);
        }
        match &end {
            BodyEnd::ProviderBroke(message) if !client.resumable() => {
                // Settled before the client sees the end, as a whole answer
                // is: its next request (or a read of its usage) finds it.
                settle.settle(report).await;
                let error = ApiError::upstream_error(message.as_str());
                self.end_broken(client, meter, error).await;
                report.error_reason = Some("provider_stream_broken");
            }
            // Ended as the grace period runs out: its client is still
            // there, and is told its answer was cut (it would look whole).
            BodyEnd::ClientGone if crate::gateway::client::requests_ended() => {
                self.end_broken(client, meter, ApiError::stopped_mid_answer())
                    .await;
            }
            BodyEnd::ClientTooSlow { mid_send } => {
                settle.settle(report).await;
                if *mid_send {
                    client.abort().await;
                } else {
                    warn!(request_id = %self.request_id, provider = %self.provider.name, "the attempt's total timeout ran out while its client was slow to take the answer");
                    let error = ApiError::upstream_timeout(format!(
                        "The answer ran past the total timeout of the provider '{}' while this client was slow to read it.",
                        self.provider.name
                    ));
                    self.end_broken(client, meter, error).await;
                }
                report.error_reason = Some(CLIENT_TOO_SLOW);
            }
            _ => {}
        }
        end
    }

    #[allow(clippy::too_many_arguments)]
    async fn copy(
        &self,
        client: &mut dyn Client,
        upstream: &mut UpstreamBody<'_>,
        report: &mut Report,
        settle: &mut dyn Settle,
        meter: &mut Meter,
        redactor: &mut Redactor<'_>,
        settled: &mut bool,
        (held, mut received, ended): (Bytes, usize, bool),
    ) -> BodyEnd {
        if ended {
            return self
                .body_ended(client, report, settle, meter, redactor, settled, held)
                .await;
        }
        if self.declared_len.is_some_and(|n| received >= n) {
            self.settle(report, settle, meter, settled).await;
        }
        // Once the last event of a whole answer went by, its client has it
        // all (SDKs close a stream at `[DONE]`): the rest of the body is
        // read until this deadline and not passed on, so the answer is
        // stored and its connection kept even when the client leaves.
        let last = self.after_last(report, settle, meter, settled).await;
        let mut stall = Stall::new(self.idle, self.deadline);
        if !held.is_empty() {
            report.first_byte_at.get_or_insert_with(Instant::now);
            if let Err(end) = self.pass_on(client, meter, &mut stall, held).await {
                return end;
            }
        }
        let mut drain_until = last.then(|| self.drain(&mut stall));
        // An event that is not JSON may have carried text: a stream that
        // can be continued elsewhere breaks there rather than lose it. The
        // first-content wait may have stopped at one after what it held.
        if !meter.halted() {
            meter.halt_on_malformed(client.resumable());
        }
        loop {
            if meter.halted() {
                if client.resumable() {
                    warn!(request_id = %self.request_id, provider = %self.provider.name, "provider sent a stream event that is not JSON");
                    return BodyEnd::ProviderBroke(format!(
                        "The provider '{}' sent a stream event that is not JSON.",
                        self.provider.name
                    ));
                }
                // Not resumable (turned off, or a tool call went by): leave
                // it out and go on.
                meter.halt_on_malformed(false);
                let rest = redactor.feed(meter.feed(Bytes::new()));
                // What was held may end the answer.
                let last = self.after_last(report, settle, meter, settled).await;
                if !rest.is_empty() {
                    if let Err(end) = self.pass_on(client, meter, &mut stall, rest).await {
                        return end;
                    }
                }
                if last {
                    drain_until = Some(self.drain(&mut stall));
                }
            }
            stall.reading();
            // Checked here too, not only when a read waits: a provider
            // whose data is always there (a runaway, a flood after `[DONE]`,
            // or a gateway too busy to catch up) would never be cut.
            match drain_until {
                Some(until) if stall.past(until) => break,
                None if stall.past(self.deadline) => return self.out_of_time(&stall),
                _ => {}
            }
            // Data already there is read before the stall is judged (as
            // `timeout_at` did): an idle gap or a drain's deadline that
            // passed while a slow client held the send up must not cut off
            // what is waiting (the usage after `[DONE]`, say).
            let read_or_stall = async {
                tokio::select! {
                    biased;
                    read = upstream.read_ready() => Ok(read),
                    gap = stall.stalled() => Err(gap),
                }
            };
            // Not in order: a provider flooding events that are not passed
            // on (nothing sent) must not keep a gone client unseen. A client
            // that has every byte of the length it was told may leave: the
            // body's end is read, not lost to that race.
            let whole = self.declared_len.is_some_and(|n| received >= n);
            let read = tokio::select! {
                read = read_or_stall => read,
                _ = client.gone(), if drain_until.is_none() && !whole => return self.client_left(client, meter),
            };
            match read {
                // After the last event: sent nowhere, read only for a
                // usage report that has not come yet.
                Ok(Ok(Some(chunk))) if drain_until.is_some() => {
                    if !*settled {
                        meter.feed(chunk);
                        if meter.usage_final() {
                            self.settle(report, settle, meter, settled).await;
                        }
                    }
                }
                Ok(Ok(Some(chunk))) => {
                    received += chunk.len();
                    let out = redactor.feed(meter.feed_counted(chunk, self.model).await);
                    if self.declared_len.is_some_and(|n| received >= n) {
                        // The client knows the body is whole once it has
                        // these bytes: settle first, so a client that sends
                        // its next request at once finds its slot free.
                        self.settle(report, settle, meter, settled).await;
                    }
                    let last = self.after_last(report, settle, meter, settled).await;
                    if !out.is_empty() {
                        report.first_byte_at.get_or_insert_with(Instant::now);
                        if let Err(end) = self.pass_on(client, meter, &mut stall, out).await {
                            return end;
                        }
                    }
                    if last {
                        drain_until = Some(self.drain(&mut stall));
                    }
                    if meter.cut() {
                        warn!(request_id = %self.request_id, provider = %self.provider.name, "provider sent a stream event too long to translate");
                        return BodyEnd::ProviderBroke(cut_message(&self.provider.name));
                    }
                }
                Ok(Ok(None)) => break,
                // After the last event, a body that breaks off or stalls
                // instead of ending still carried the whole answer.
                Ok(Err(_)) | Err(_) if drain_until.is_some() => {
                    warn!(request_id = %self.request_id, provider = %self.provider.name, "provider did not end the body after the stream's last event");
                    break;
                }
                Ok(Err(e)) => {
                    warn!(request_id = %self.request_id, provider = %self.provider.name, error = %e, "provider broke off the response");
                    return BodyEnd::ProviderBroke(format!(
                        "The provider '{}' broke off the response.",
                        self.provider.name
                    ));
                }
                Err(_) if Instant::now() >= self.deadline => return self.out_of_time(&stall),
                Err(gap) => {
                    warn!(request_id = %self.request_id, provider = %self.provider.name, gap = ?gap, "provider stalled mid-response");
                    return BodyEnd::ProviderBroke(format!(
                        "The provider '{}' stalled for {gap:?}.",
                        self.provider.name
                    ));
                }
            }
        }
        self.body_ended(
            client,
            report,
            settle,
            meter,
            redactor,
            settled,
            Bytes::new(),
        )
        .await
    }

    /// The upstream body ended (after `unsent`, held back until now): a
    /// completion stream that never finished is cut short, anything else
    /// is complete and settled before the client sees its end.
    #[allow(clippy::too_many_arguments)]
    async fn body_ended(
        &self,
        client: &mut dyn Client,
        report: &mut Report,
        settle: &mut dyn Settle,
        meter: &mut Meter,
        redactor: &mut Redactor<'_>,
        settled: &mut bool,
        unsent: Bytes,
    ) -> BodyEnd {
        // A stream sealed by the gateway may carry its count.
        if meter.seal_needs_count(self.estimate) {
            Encoding::for_model(self.model).ready().await;
        }
        let rest = [
            &unsent[..],
            &redactor.feed(meter.finish())[..],
            &redactor.finish()[..],
        ]
        .concat();
        if !rest.is_empty() {
            report.first_byte_at.get_or_insert_with(Instant::now);
        }
        // A stream its provider ended with an error that was not its
        // failure (the request's fault, a rate limit, a refused key) is
        // its answer, however it ends: not a break.
        let refused = meter.carried_error() && !meter.provider_failed();
        if meter.cut_short() && !refused {
            warn!(request_id = %self.request_id, provider = %self.provider.name, "provider ended the stream before it finished");
            if !rest.is_empty() {
                match self.send(client, Bytes::from(rest), false).await {
                    Some(true) => {}
                    Some(false) => return BodyEnd::ClientGone,
                    None => return BodyEnd::ClientTooSlow { mid_send: true },
                }
            }
            return BodyEnd::ProviderBroke(format!(
                "The provider '{}' ended the stream before it finished.",
                self.provider.name
            ));
        }
        self.settle(report, settle, meter, settled).await;
        match self.send(client, Bytes::from(rest), true).await {
            None => BodyEnd::ClientTooSlow { mid_send: true },
            // Gone or not, the answer was whole.
            Some(_) => BodyEnd::Complete,
        }
    }

    /// Sends a piece of the answer to the client within the attempt's
    /// time, or [`CLIENT_STUCK`] from now if that is later (a client that
    /// reads is never cut: the send is tried first): whether the client
    /// took it, `None` when it did not in time (what it has is then cut
    /// short: the piece may be half written).
    async fn send(&self, client: &mut dyn Client, mut body: Bytes, end: bool) -> Option<bool> {
        // In pieces, each with its own bound (a whole JSON answer is sent
        // here): a slow but steady reader is not cut.
        loop {
            let piece = next_piece(&mut body);
            let last_resort = self.last_resort(Instant::now());
            let last = body.is_empty();
            let mut send = client.send_body(piece, end && last);
            // Tried once first: only a send that has to wait gets its
            // bound, boxed (its timer would otherwise take room in the
            // state of every stream while it copies).
            let first = std::future::poll_fn(|cx| Poll::Ready(send.as_mut().poll(cx))).await;
            let sent = match first {
                Poll::Ready(sent) => Some(sent),
                Poll::Pending => {
                    let bounded = while_taken(
                        &mut send,
                        self.progress,
                        self.send_timeout,
                        Some(last_resort),
                    );
                    Box::pin(bounded).await
                }
            };
            match sent {
                Some(true) if !last => {}
                Some(sent) => return Some(sent),
                None => {
                    self.left_untaken();
                    return None;
                }
            }
        }
    }

    /// A send reached its bound with the client not taking it: its
    /// connection is cut (by the caller), and counted.
    fn left_untaken(&self) {
        warn!(request_id = %self.request_id, provider = %self.provider.name, "a client left its answer untaken past the send's bound; its connection is cut");
        crate::metrics::CLIENT_SEND_TIMEOUTS.inc();
    }

    /// How the copy ends when the answer has not finished by the attempt's
    /// deadline: the provider's failure (as a stall is), unless the copy
    /// waited a second or more in all for the client to take the answer.
    fn out_of_time(&self, stall: &Stall) -> BodyEnd {
        if stall.waited_on_client() {
            return BodyEnd::ClientTooSlow { mid_send: false };
        }
        warn!(request_id = %self.request_id, provider = %self.provider.name, "provider did not finish within its total timeout");
        BodyEnd::ProviderBroke(format!(
            "The provider '{}' did not finish within its total timeout.",
            self.provider.name
        ))
    }

    /// When a send beginning at `now` has waited too long for the client,
    /// however long its send timeout: at the deadline, or [`CLIENT_STUCK`]
    /// after `now` if that is later (before it, the send timeout bounds the
    /// wait while the client takes nothing, see [`Progress`]).
    fn last_resort(&self, now: Instant) -> Instant {
        self.deadline.max(now + CLIENT_STUCK)
    }

    /// [`Copy::send`] of a piece of the copy, timed by the copy's own
    /// timer (a timer per send would cost a streamed token a few hundred
    /// instructions): how the copy ends if it did not go out.
    async fn pass_on(
        &self,
        client: &mut dyn Client,
        meter: &Meter,
        stall: &mut Stall,
        mut body: Bytes,
    ) -> Result<(), BodyEnd> {
        // In pieces, each with its own bound, as in `send`.
        while !body.is_empty() {
            let piece = next_piece(&mut body);
            let now = Instant::now();
            stall.sending(now);
            let last_resort = self.last_resort(now);
            // A send timeout from `now`, up to the last resort.
            let within = |now: Instant| {
                let timeout = self.send_timeout;
                timeout.map_or(last_resort, |timeout| last_resort.min(now + timeout))
            };
            // However slowly the client takes it, the piece goes by then.
            let cap = last_resort + self.send_timeout.unwrap_or(CLIENT_STUCK);
            let mut bound = within(now);
            let progress = self.progress;
            let mut send = client.send_body(piece, false);
            let sent = loop {
                tokio::select! {
                    biased;
                    sent = &mut send => break sent,
                    // A client slow to take it when the gateway ends its
                    // requests: billed, and cut.
                    _ = crate::gateway::client::ending() => {
                        return Err(BodyEnd::ClientTooSlow { mid_send: true });
                    }
                    before = async {
                        // When the send has to wait (and again each time
                        // it is given more).
                        let before = progress.taken();
                        stall.ran_out(bound).await;
                        before
                    } => {
                        // A client that took something meanwhile is slow,
                        // not stuck: it gets the send timeout again, or
                        // past the deadline a second at a time.
                        let now = Instant::now();
                        let more = match bound < last_resort {
                            true => within(now),
                            false => cap.min(now + CLIENT_STUCK),
                        };
                        if more <= now || !progress.kept_up(before) {
                            self.left_untaken();
                            return Err(BodyEnd::ClientTooSlow { mid_send: true });
                        }
                        bound = more;
                    }
                }
            };
            drop(send);
            if !sent {
                return Err(self.client_left(client, meter));
            }
        }
        Ok(())
    }

    /// A streamed speech, transcription or image whose client left before
    /// its last event: the rest is read, sent nowhere, for that event's
    /// usage (the only count of what it used), within the attempt's time
    /// and idle gaps. Any other stream ends at once.
    async fn read_for_usage(&self, upstream: &mut UpstreamBody<'_>, meter: &mut Meter) {
        let mut stall = Stall::new(self.idle, self.deadline);
        let unfinished = |meter: &Meter| matches!(meter, Meter::Stream(m) if m.is_media() && !m.finished() && !m.saw_error());
        while self.bills && unfinished(meter) {
            stall.reading();
            if stall.past(self.deadline) {
                return;
            }
            let read = tokio::select! {
                biased;
                read = upstream.read_ready() => read,
                _ = stall.stalled() => return,
            };
            match read {
                Ok(Some(chunk)) => {
                    meter.feed(chunk);
                }
                Ok(None) | Err(_) => return,
            }
        }
    }

    /// How the copy ends when its client went away: after the provider's
    /// own error event (the SDKs close the stream at it, often before the
    /// provider ends its body) as that event says, as the body's end would
    /// judge it: the provider's failure, or its answer to a request at
    /// fault; else as the client's leaving. Never as a stream to resume:
    /// nobody would read the continuation.
    fn client_left(&self, client: &dyn Client, meter: &Meter) -> BodyEnd {
        if !meter.carried_error() || client.resumable() {
            return BodyEnd::ClientGone;
        }
        if !meter.provider_failed() {
            return BodyEnd::Complete;
        }
        BodyEnd::ProviderBroke(format!(
            "The provider '{}' ended the stream with an error.",
            self.provider.name
        ))
    }

    /// Ends a response the provider did not finish: an event stream gets
    /// an in-band error event and a clean end (no `[DONE]`, so SDKs raise);
    /// any other body (JSON, audio) cannot be repaired, so the connection
    /// is closed and the client sees the truncation. What the provider
    /// sent decides, not the request's `stream`. So is a stream whose body
    /// broke off inside a line of an event too long to hold, which went on
    /// as it came: the client's part of it cannot be read, nor an event
    /// after it.
    async fn end_broken(&self, client: &mut dyn Client, meter: &Meter, error: ApiError) {
        let last = match meter {
            // The provider's own error event said it already.
            _ if meter.carried_error() => Bytes::new(),
            Meter::Stream(stream) if !stream.torn() => {
                // Not glued to an event the client has only part of.
                let event = error.sse_event_for(self.endpoint, stream.next_sequence_number());
                [stream.event_end(), &event].concat().into()
            }
            Meter::Translated(_) => error.sse_event(),
            _ => {
                client.abort().await;
                return;
            }
        };
        // A client not taking it by the attempt's deadline is cut off.
        if self.send(client, last, true).await.is_none() {
            client.abort().await;
        }
    }

    /// What the answer used, as billed (nothing for an answer that is not
    /// billed).
    async fn usage(&self, meter: &Meter) -> Option<Usage> {
        if !self.bills {
            return None;
        }
        let usage = match meter.usage_uncounted(self.estimate, self.model) {
            Some(usage) => usage,
            None => {
                Encoding::for_model(self.model).ready().await;
                meter.usage(self.estimate, self.model)
            }
        };
        // A stream's tier is read as it passes; a JSON answer's only when
        // its price depends on it (a second pass over the body).
        match meter {
            Meter::Json { body, seen, .. }
                if self.reads_tier
                    && usage.tier.is_none()
                    && *seen <= cost::MAX_METERED_JSON_BYTES =>
            {
                Some(Usage {
                    tier: cost::reported_tier_in_json(body),
                    ..usage
                })
            }
            _ => Some(usage),
        }
    }

    /// The Responses API response the answer carries (its `id`, which a
    /// follow-up names); other endpoints' answers are not read for one.
    fn response_id(&self, meter: &Meter) -> Option<String> {
        (self.endpoint == crate::openai::Endpoint::Responses)
            .then(|| meter.response_id())
            .flatten()
    }

    /// Whether the last event of a whole answer went by (then the rest of
    /// the body is drained, see [`Copy::drain`]); settles then, before its
    /// client has it, so that its next request finds its slot free. After
    /// the provider's error event, which ends what the client gets, the
    /// body's end is awaited as briefly (and the stream judged by the
    /// error there).
    async fn after_last(
        &self,
        report: &mut Report,
        settle: &mut dyn Settle,
        meter: &Meter,
        settled: &mut bool,
    ) -> bool {
        if meter.halted() || !(meter.said_last() || meter.carried_error()) {
            return false;
        }
        // Until what it used is final, settled when it is or at the body's
        // end (some servers send their usage after `[DONE]`).
        if meter.said_last() && meter.usage_final() {
            self.settle(report, settle, meter, settled).await;
        }
        true
    }

    /// Until when the rest of the body is read, once the client has the
    /// last event (see [`AFTER_LAST_EVENT`]): counted from now, so that a
    /// client slow to take that event does not use up the drain's time
    /// (the usage some servers send after `[DONE]` is waiting by then).
    fn drain(&self, stall: &mut Stall) -> Instant {
        let until = (Instant::now() + self.idle.min(AFTER_LAST_EVENT)).min(self.deadline);
        stall.end_by(until);
        until
    }

    /// The whole answer is in hand: settle the admission and tell the
    /// breaker, before the client can see the end of the response (so its
    /// next request finds the slot free and the breaker up to date).
    async fn settle(
        &self,
        report: &mut Report,
        settle: &mut dyn Settle,
        meter: &Meter,
        settled: &mut bool,
    ) {
        if std::mem::replace(settled, true) {
            return;
        }
        report.usage = self.usage(meter).await;
        report.response_id = self.response_id(meter);
        settle.settle(report).await;
        self.upstreams.record_outcome(
            self.backend,
            meter.outcome(),
            Domain::Deployment,
            Some(self.ttfb),
        );
    }
}

/// How a stream that ended with the provider's in-band error event counts
/// (`status`, of the error as [`ApiError::from_in_band`] or the Anthropic
/// translation makes it): for the breaker, and as a
/// `runestone_errors_total` reason. A rate limit rests the deployment; the
/// gateway's key refused says nothing of the deployment's health (as a
/// 401 or 403 answer); nor does a fault of the request, the provider's
/// answer to it; anything else failed.
fn in_band_judgement(status: u16) -> (Outcome, &'static str) {
    match status {
        429 => (Outcome::RateLimited(None), "provider_429"),
        401 | 403 => (Outcome::Neutral, "provider_5xx"),
        400..=499 => (Outcome::Neutral, "invalid_request"),
        _ => (Outcome::Failure, "provider_stream_broken"),
    }
}

/// Watches an answer for its first content: a stream's first event that
/// carries text, reasoning, a tool call, a finish reason or usage (a
/// role-only event does not, nor the provider's error), or `[DONE]`, or an
/// event that is not JSON at all (passed on as it is); a JSON answer's
/// end. Fed the bytes as they go to the client.
pub(super) struct FirstContent {
    stream: bool,
    partial: Vec<u8>,
    found: bool,
}

impl FirstContent {
    /// A watcher for an SSE stream (`stream`) or a JSON answer.
    pub(super) fn new(stream: bool) -> Self {
        FirstContent {
            stream,
            partial: Vec::new(),
            found: false,
        }
    }

    /// A watcher for an answer sent on from its first byte.
    pub(super) fn found_at_once() -> Self {
        FirstContent {
            stream: false,
            partial: Vec::new(),
            found: true,
        }
    }

    /// Whether the first content has gone by.
    pub(super) fn found(&self) -> bool {
        self.found
    }

    /// Whether an answer that ended gave nothing to pass on: no content
    /// went by and what is `held` is, for a stream, without a `data:` line
    /// (no event, none whole, or only comments, blank lines and ids), or,
    /// for a JSON answer, empty or only JSON's whitespace.
    pub(super) fn nothing_in(&self, held: &[u8]) -> bool {
        if self.found {
            return false;
        }
        if self.stream {
            !held
                .split(|&b| b == b'\n')
                .any(|line| line.starts_with(b"data:"))
        } else {
            held.iter()
                .all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        }
    }

    /// Takes the next bytes of the answer.
    pub(super) fn scan(&mut self, bytes: &[u8]) {
        if self.found || !self.stream {
            return;
        }
        self.partial.extend_from_slice(bytes);
        let mut consumed = 0;
        while let Some(at) = memchr::memchr(b'\n', &self.partial[consumed..]) {
            let line = &self.partial[consumed..consumed + at];
            consumed += at + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() > crate::cost::MAX_LINE_BYTES {
                // As one that has not ended yet (below), however the
                // reads fell.
                self.found = true;
                break;
            }
            let Some(payload) = line.strip_prefix(b"data:") else {
                continue;
            };
            if carries_content(payload.trim_ascii()) {
                self.found = true;
                break;
            }
        }
        self.partial.drain(..consumed);
        if self.partial.len() > crate::cost::MAX_LINE_BYTES {
            // A line that never ends: stop holding the head for it.
            self.found = true;
        }
    }
}

/// Whether a stream event's payload carries content.
fn carries_content(payload: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Event<'a> {
        #[serde(default, borrow)]
        choices: Vec<Choice<'a>>,
        #[serde(default, borrow)]
        usage: Option<&'a serde_json::value::RawValue>,
        /// A Responses API event's type.
        #[serde(default, borrow, rename = "type")]
        kind: Option<std::borrow::Cow<'a, str>>,
        /// The provider's error (see `Probe::is_error`).
        #[serde(default, borrow)]
        error: Option<&'a serde_json::value::RawValue>,
        #[serde(default, borrow)]
        object: Option<&'a serde_json::value::RawValue>,
    }
    #[derive(serde::Deserialize)]
    struct Choice<'a> {
        #[serde(default, borrow)]
        delta: Option<Delta<'a>>,
        #[serde(default, borrow)]
        text: Option<std::borrow::Cow<'a, str>>,
        #[serde(default, borrow)]
        finish_reason: Option<&'a serde_json::value::RawValue>,
    }
    #[derive(serde::Deserialize)]
    struct Delta<'a> {
        #[serde(default, borrow)]
        content: Option<std::borrow::Cow<'a, str>>,
        #[serde(default, borrow)]
        tool_calls: Option<&'a serde_json::value::RawValue>,
        #[serde(default, borrow)]
        refusal: Option<std::borrow::Cow<'a, str>>,
        #[serde(default, borrow)]
        function_call: Option<&'a serde_json::value::RawValue>,
        #[serde(default, borrow)]
        reasoning_content: Option<std::borrow::Cow<'a, str>>,
        #[serde(default, borrow)]
        reasoning: Option<std::borrow::Cow<'a, str>>,
    }
    if payload == b"[DONE]" {
        return true;
    }
    let Ok(event) = serde_json::from_slice::<Event<'_>>(payload) else {
        return true;
    };
    // The provider's error is no content, whatever else the event has
    // (OpenRouter's carries a choice with `finish_reason: "error"`): one
    // before any content is judged with nothing sent.
    if event
        .error
        .is_some_and(|error| crate::openai::error_said(error.get()))
        || event
            .object
            .is_some_and(|object| crate::json::is_str(object, "error"))
    {
        return false;
    }
    if let Some(kind) = event.kind.as_deref() {
        // A stream of typed events (the Responses API's, a streamed
        // transcription's `transcript.text.delta`, speech's
        // `speech.audio.delta`, an image's `partial_image`): each carries
        // something but the stream's error and the Responses API's
        // opening events. (Another `type`, as a chat stream's heartbeat,
        // is judged by its choices.)
        if kind == "error" || kind.starts_with("response.") || cost::media_event(kind).is_some() {
            return !matches!(
                kind,
                "error"
                    | "response.failed"
                    | "response.created"
                    | "response.in_progress"
                    | "response.queued"
                    | "response.output_item.added"
                    | "response.content_part.added"
            );
        }
    }
    let present =
        |raw: Option<&serde_json::value::RawValue>| raw.is_some_and(|r| r.get() != "null");
    // A usage report alone (the stream's last chunk) is something for the
    // client; one a provider puts on every chunk (the role's included) is
    // not content by itself.
    (present(event.usage) && event.choices.is_empty())
        || event.choices.iter().any(|choice| {
            present(choice.finish_reason)
                || choice.text.as_deref().is_some_and(|t| !t.is_empty())
                || choice.delta.as_ref().is_some_and(|d| {
                    d.content.as_deref().is_some_and(|c| !c.is_empty())
                        || d.refusal.as_deref().is_some_and(|c| !c.is_empty())
                        || d.reasoning_content
                            .as_deref()
                            .is_some_and(|c| !c.is_empty())
                        || d.reasoning.as_deref().is_some_and(|c| !c.is_empty())
                        || present(d.tool_calls)
                        || present(d.function_call)
                })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A JSON answer of `filler` bytes of image data, then its usage, fed
    /// in 1 MiB chunks.
    fn fed_json(filler: usize) -> Meter {
        let mut meter = Meter::Json {
            body: Vec::new(),
            seen: 0,
            tail: Vec::new(),
        };
        let answer = [
            &b"{\"created\":1,\"data\":[{\"b64_json\":\""[..],
            &vec![b'A'; filler],
            br#""}],"usage":{"input_tokens":50,"output_tokens":4000,"total_tokens":4050}}"#,
        ]
        .concat();
        for chunk in answer.chunks(1024 * 1024) {
            meter.feed(Bytes::copy_from_slice(chunk));
        }
        meter
    }

    #[test]
    fn an_answer_without_usage_cut_at_the_size_bound_is_billed_no_more_than_a_model_generates() {
        let filler = cost::MAX_METERED_JSON_BYTES + 1024 * 1024;
        for (max_tokens, limit) in [
            (None, cost::MAX_ESTIMATED_COMPLETION_TOKENS),
            (Some(300), 300),
        ] {
            let estimate = Estimate::new(Bytes::from_static(b"{\"input\":\"hi\"}"), max_tokens);
            let mut meter = Meter::Json {
                body: Vec::new(),
                seen: 0,
                tail: Vec::new(),
            };
            for _ in 0..filler / (1024 * 1024) {
                meter.feed(Bytes::from(vec![b' '; 1024 * 1024]));
            }
            let usage = meter.usage(&estimate, "gpt-4o");
            assert_eq!((usage.completion_tokens, usage.estimated), (limit, true));
            let mut stream = Meter::Stream(Box::new(
                StreamMeter::new(false).with_estimate(estimate, "gpt-4o"),
            ));
            for _ in 0..filler / (1024 * 1024) {
                stream.feed(Bytes::from(vec![b'x'; 1024 * 1024]));
            }
            assert_eq!(
                stream
                    .usage(&Estimate::default(), "gpt-4o")
                    .completion_tokens,
                limit
            );
        }
    }

    #[test]
    fn an_answer_too_large_to_read_whole_is_billed_its_usage_and_the_units_asked_for() {
        let media = Estimate::media(cost::Media {
            images: Some(3),
            characters: 0,
        });
        for filler in [1024, cost::MAX_METERED_JSON_BYTES + 10] {
            let usage = fed_json(filler).usage(&media, "gpt-image-1");
            assert_eq!(
                (usage.prompt_tokens, usage.completion_tokens),
                (50, 4000),
                "{filler}"
            );
            let asked_or_seen = if filler > cost::MAX_METERED_JSON_BYTES {
                3
            } else {
                1
            };
            assert_eq!(usage.images, asked_or_seen);
        }
        let text = Estimate::new(Bytes::from_static(b"{}"), None);
        let usage = fed_json(cost::MAX_METERED_JSON_BYTES + 10).usage(&text, "gpt-4o");
        assert_eq!((usage.completion_tokens, usage.estimated), (4000, false));
    }

    #[test]
    fn answer_details_read_what_a_tree_of_the_answer_says() {
        let bodies: [&str; 16] = [
            r#" {"choices":[[1,2],{"message":["x"],"text":"t","finish_reason":"stop"}],"output":[[{"text":"no"}]]}"#,
            r#"{"object":"response","status":"completed","output":[{"content":[["t"],{"text":"yes"}]}]}"#,
            r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Hi \"there\"\n"},"finish_reason":"stop"},{"message":{"content":null,"tool_calls":[]},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":1}}"#,
            r#"{"id":"cmpl-1","object":"text_completion","model":"m","choices":[{"text":"once","finish_reason":"length"}]}"#,
            r#"{"id":"resp_1","object":"response","status":"completed","model":"m","output":[{"type":"reasoning","content":[]},{"type":"message","content":[{"type":"output_text","text":"a"},{"type":"output_text","text":"b"},7]},"x"]}"#,
            r#"{"id":"resp_2","object":"response","status":"incomplete","output":{"not":"an array"}}"#,
            r#"{"id":7,"model":["m"],"choices":"none"}"#,
            r#"{"choices":[1,"two",null,{"finish_reason":5,"text":6},{"message":"text","text":"t"}]}"#,
            r#"{"choices":[{"message":{"content":"from message"},"text":"from text"}]}"#,
            r#"{"model":null,"id":null,"choices":null,"object":null}"#,
            r#"[1,2,3]"#,
            r#""just a string""#,
            r#"{"truncated": "#,
            r#"not json"#,
            r#"{"id":"a\u00e9\ud83d\ude00","model":"m\/n","choices":[{"finish_reason":"stop"},{"finish_reason":"stop"},{"finish_reason":"stop"},{"finish_reason":"stop"},{"finish_reason":"stop"},{"finish_reason":"stop"},{"finish_reason":"stop"},{"finish_reason":"stop"},{"finish_reason":"stop"},{"finish_reason":"stop"},{"finish_reason":"stop"},{"finish_reason":"stop"},{"finish_reason":"stop"},{"finish_reason":"stop"},{"finish_reason":"stop"},{"finish_reason":"stop"},{"finish_reason":"17th"}]}"#,
            r#"{"object":"response","status":"failed","choices":[]}"#,
        ];
        for body in bodies {
            for capture in [false, true] {
                let by_member = details_by_member(body.as_bytes(), capture);
                let valid = serde_json::from_str::<serde_json::Value>(body).is_ok();
                assert!(by_member.is_ok() || !valid, "{body} read member by member");
                let new = answer_details(body.as_bytes(), capture);
                let old = details_from_a_tree(body.as_bytes(), capture);
                let as_tuple = |d: &AnswerDetails| {
                    (
                        d.id.clone(),
                        d.model.clone(),
                        d.finish_reasons.clone(),
                        d.completion.clone(),
                    )
                };
                assert_eq!(as_tuple(&new), as_tuple(&old), "{body} (capture {capture})");
            }
        }
        // A member given twice: the tree's reading (the last one counts).
        for body in [
            r#"{"id":"a","id":"b","choices":[{"finish_reason":"stop"}]}"#,
            r#"{"choices":[{"finish_reason":"x","finish_reason":"stop","message":{"content":"a"}}]}"#,
            r#"{"choices":[{"message":{"content":"a","content":"b"}}]}"#,
            r#"{"object":"response","object":"response","status":"completed"}"#,
            r#"{"output":[{"content":[{"text":"a","text":"b"}]}]}"#,
        ] {
            assert!(details_by_member(body.as_bytes(), true).is_err(), "{body}");
            let read = answer_details(body.as_bytes(), true);
            let tree = details_from_a_tree(body.as_bytes(), true);
            assert_eq!(
                (read.id, read.finish_reasons, read.completion),
                (tree.id, tree.finish_reasons, tree.completion),
                "{body}"
            );
        }
        let chat = answer_details(bodies[2].as_bytes(), true);
        assert_eq!(chat.id.as_deref(), Some("chatcmpl-1"));
        assert_eq!(chat.finish_reasons, ["stop", "tool_calls"]);
        assert_eq!(chat.completion.as_deref(), Some("Hi \"there\"\n"));
    }

    #[test]
    fn the_first_content_is_the_first_event_with_something_in_it() {
        /// Whether a stream's first content is found in `event`.
        fn found_in(event: &[u8]) -> bool {
            let mut first = FirstContent::new(true);
            first.scan(event);
            first.found()
        }
        let mut first = FirstContent::new(true);
        first.scan(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n");
        assert!(!first.found(), "a role-only event is not content");
        // A provider that reports usage on every chunk (vLLM's continuous
        // usage stats): the role's chunk is still no content.
        first.scan(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":0}}\n\n");
        assert!(!first.found(), "usage beside a choice with nothing in it");
        first.scan(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel");
        assert!(!first.found(), "not a whole line yet");
        first.scan(b"lo\"}}]}\n\n");
        assert!(first.found());
        for event in [
            &b"data: [DONE]\n"[..],
            b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0}]}}]}\n",
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n",
            b"data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n",
            b"data: {\"choices\":[{\"text\":\"a\"}]}\n",
            b"data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"hmm\"}}]}\n",
            b"data: {\"choices\":[{\"delta\":{\"reasoning\":\"hmm\"}}]}\n",
            b"data: not json at all\n",
            b"data: {\"type\":\"transcript.text.delta\",\"delta\":\"Hel\"}\n",
            b"data: {\"type\":\"speech.audio.delta\",\"audio\":\"SUQz\"}\n",
            b"data: {\"type\":\"image_generation.partial_image\",\"b64_json\":\"iVBO\"}\n",
            b"data: {\"type\":\"response.output_text.delta\",\"delta\":\"Hel\"}\n",
        ] {
            assert!(found_in(event), "{}", String::from_utf8_lossy(event));
        }
        // A typed stream's error or opening carries nothing, nor does a
        // chat stream's heartbeat.
        for event in [
            &b"data: {\"type\":\"error\",\"error\":{\"message\":\"no\"}}\n"[..],
            b"data: {\"type\":\"response.failed\",\"response\":{}}\n",
            b"data: {\"type\":\"ping\"}\n",
            b"data: {\"type\":\"heartbeat\"}\n",
            b"data: {\"type\":\"response.created\",\"response\":{}}\n",
            b"data: {\"type\":\"response.content_part.added\"}\n",
        ] {
            assert!(!found_in(event), "{}", String::from_utf8_lossy(event));
        }
        let mut json = FirstContent::new(false);
        json.scan(b"{\"choices\":[]}");
        assert!(!json.found(), "a JSON answer is held whole");
    }

    #[test]
    fn a_line_too_long_to_hold_ends_the_wait_for_content_however_it_came() {
        // An error event longer than a line is held, before any content.
        let long = format!(
            "data: {{\"error\":{{\"message\":\"{}\"}}}}\n\n",
            "x".repeat(cost::MAX_LINE_BYTES)
        );
        for piece in [64 * 1024, long.len()] {
            let mut first = FirstContent::new(true);
            for bytes in long.as_bytes().chunks(piece) {
                first.scan(bytes);
            }
            assert!(first.found(), "pieces of {piece}");
        }
    }
}
