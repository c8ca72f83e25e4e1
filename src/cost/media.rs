//! Usage of the media endpoints (moderations, images, audio): tokens only
//! where the provider reports them (their answers are not text to count),
//! and the units they are priced by: images (those in the answer's `data`,
//! else those asked for), characters spoken (the request's `input`), and
//! seconds of audio (the answer's `usage.seconds` or `duration`).

use super::{reported_usage, Usage, MAX_AUDIO_MS};
use serde::Deserialize;
use serde_json::value::RawValue;

/// What a media request asks for, as far as billing goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Media {
    /// Images asked for (`n`, default 1), for image endpoints.
    pub images: Option<u64>,
    /// Characters of text to speak.
    pub characters: u64,
}

impl Media {
    /// The usage of an answer whose body could not be read (a binary or
    /// streamed answer, or one too large): `reported` tokens, if any, and
    /// the units the request asked for.
    pub fn usage(&self, reported: Option<Usage>) -> Usage {
        Usage {
            images: self.images.unwrap_or(0),
            characters: self.characters,
            ..reported.unwrap_or_default()
        }
    }

    /// The usage of a whole JSON answer: its reported tokens, its images,
    /// its seconds of audio.
    pub fn usage_from_json(&self, body: &[u8]) -> Usage {
        #[derive(Deserialize)]
        struct Answer<'a> {
            #[serde(borrow, default)]
            usage: Option<&'a RawValue>,
            #[serde(borrow, default)]
            data: Option<Vec<&'a RawValue>>,
            #[serde(default)]
            duration: Option<f64>,
        }
        let Ok(answer) = serde_json::from_slice::<Answer<'_>>(body) else {
            return self.usage(None);
        };
        let mut usage = self.usage_reported(answer.usage, answer.duration);
        if self.images.is_some() {
            if let Some(data) = &answer.data {
                usage.images = data.len() as u64;
            }
        }
        usage
    }

    /// The usage of a JSON answer too large to read whole, from its end
    /// (`tail`): the units asked for, and the tokens and seconds its
    /// `usage` reports.
    pub fn usage_from_tail(&self, tail: &[u8]) -> Usage {
        self.usage_reported(super::usage_member_in_json_tail(tail), None)
    }

    /// The units asked for, with the tokens and seconds of audio a `usage`
    /// member reports (or the answer's `duration`).
    fn usage_reported(&self, reported: Option<&RawValue>, duration: Option<f64>) -> Usage {
        #[derive(Deserialize)]
        struct Seconds {
            #[serde(default)]
            seconds: Option<f64>,
        }
        let seconds = reported
            .and_then(|u| serde_json::from_str::<Seconds>(u.get()).ok())
            .and_then(|s| s.seconds)
            .or(duration);
        let mut usage = self.usage(reported.and_then(reported_usage));
        if let Some(seconds) = seconds.filter(|s| s.is_finite() && *s >= 0.0) {
            usage.audio_ms = ((seconds * 1000.0).round() as u64).min(MAX_AUDIO_MS);
        }
        usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_those_in_the_answer_else_those_asked_for() {
        let media = Media {
            images: Some(3),
            characters: 0,
        };
        let answer = br#"{"created":1,"data":[{"b64_json":"AA=="},{"b64_json":"AA=="}]}"#;
        assert_eq!(media.usage_from_json(answer).images, 2);
        assert_eq!(media.usage_from_json(b"not json").images, 3);
        let with_tokens = br#"{"data":[{"url":"u"}],"usage":{"input_tokens":10,"output_tokens":272,"total_tokens":282}}"#;
        let usage = media.usage_from_json(with_tokens);
        assert_eq!(
            (usage.images, usage.prompt_tokens, usage.completion_tokens),
            (1, 10, 272)
        );
    }

    #[test]
    fn seconds_come_from_usage_or_duration_and_characters_from_the_request() {
        let media = Media::default();
        let usage =
            media.usage_from_json(br#"{"text":"hi","usage":{"type":"duration","seconds":4}}"#);
        assert_eq!((usage.audio_ms, usage.total()), (4000, 0));
        let usage = media.usage_from_json(br#"{"text":"hi","duration":2.5,"segments":[]}"#);
        assert_eq!(usage.audio_ms, 2500);
        let usage = media.usage_from_json(br#"{"text":"hi","duration":1e300}"#);
        assert_eq!(usage.audio_ms, MAX_AUDIO_MS);
        // An embeddings-like `data` is not counted as images.
        assert_eq!(media.usage_from_json(br#"{"data":[1,2]}"#).images, 0);
        let speech = Media {
            images: None,
            characters: 42,
        };
        assert_eq!(speech.usage(None).characters, 42);
    }
}
