//! A circuit breaker, fed by real traffic: one per failure domain (a
//! backend address, or a deployment on it; see [`super::health`]).
//!
//! Closed: requests flow; `consecutive_failures` failures in a row (5xx,
//! connect errors, timeouts, broken streams; never a 4xx) open it. Open: no
//! requests for `open_seconds`, doubled on each consecutive re-open up to
//! `max_open_seconds`. Then half-open: `half_open_probes` trial requests;
//! one success closes it, one failure (or a probe outliving
//! `probe_timeout_seconds`) re-opens it for longer. A provider's own 429 is
//! not a failure: it pauses the deployment for the provider's own
//! `retry-after` (or the configured cool-down when it gave none).

use crate::config::BreakerSettings;
use std::time::{Duration, Instant};

/// The longest a provider's `retry-after` pauses a deployment.
const MAX_COOLDOWN: Duration = Duration::from_secs(3600);

/// What an attempt was allowed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// A normal request through a closed breaker.
    Normal,
    /// A half-open trial request.
    Probe,
}

/// How an attempt ended, as far as the breaker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered (2xx, or a 4xx that is the client's fault).
    Success,
    /// 5xx, connect error, timeout, broken or stalled stream.
    Failure,
    /// The provider's own 429, with its `retry-after` if it sent one.
    RateLimited(Option<Duration>),
    /// Says nothing about the backend (the client went away, the provider
    /// refused the gateway's key).
    Neutral,
}

/// A state change worth logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Opened for this long.
    Opened(Duration),
    /// Closed after a good probe.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    #[default]
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen,
}

/// The breaker state of one backend.
#[derive(Debug, Default)]
pub struct Breaker {
    state: State,
    failures: u32,
    /// Consecutive re-opens, for the doubling.
    reopens: u32,
    probes_in_flight: u32,
    /// Probes allowed at once while half-open (`half_open_probes`).
    probe_limit: u32,
    probe_deadline: Option<Instant>,
    cooldown_until: Option<Instant>,
    /// The `runestone_circuit_state` value last published for this backend.
    published: Option<i64>,
}

/// A read-only view for `/ready` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BreakerView {
    /// `closed`, `half_open` or `open`.
    pub state: &'static str,
    /// Paused after a provider 429.
    pub cooling_down: bool,
}

impl BreakerView {
    /// The `runestone_circuit_state` value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(&self) -> i64 {
        match self.state {
            "open" => 2,
            "half_open" => 1,
            _ => 0,
        }
    }
}

impl Breaker {
    /// Whether an attempt could be allowed now (without taking it).
    pub fn available(&self, now: Instant) -> bool {
        self.cooldown_until.is_none_or(|until| now >= until) && self.healthy(now)
    }

    /// Whether the breaker lets attempts through, a provider's cool-down
    /// aside (resting at the provider's request is not ill health).
    pub fn healthy(&self, now: Instant) -> bool {
        match self.state {
            State::Closed => true,
            State::Open { until } => now >= until,
            // Full of probes: nothing until one reports back (or its
            // deadline passes, which re-opens the breaker).
            State::HalfOpen => {
                self.probes_in_flight < self.probe_limit.max(1)
                    || self.probe_deadline.is_some_and(|d| now >= d)
            }
        }
    }

    /// Takes an attempt: normal when closed, a probe when half-open.
    pub fn acquire(&mut self, now: Instant, settings: &BreakerSettings) -> Option<Permit> {
        if !self.available(now) {
            return None;
        }
        if let State::Open { until } = self.state {
            if now >= until {
                self.state = State::HalfOpen;
                self.probes_in_flight = 0;
                self.probe_limit = settings.half_open_probes;
            }
        }
        match self.state {
            State::Closed => Some(Permit::Normal),
            State::Open { .. } => None,
            State::HalfOpen => {
                if self.probes_in_flight >= settings.half_open_probes {
                    // A probe that never reported back failed.
                    if self.probe_deadline.is_some_and(|d| now >= d) {
                        self.reopen(now, settings);
                    }
                    return None;
                }
                self.probes_in_flight += 1;
                self.probe_deadline = Some(now + settings.probe_timeout);
                Some(Permit::Probe)
            }
        }
    }

    /// Records an attempt's outcome; returns a transition worth logging.
    pub fn record(
        &mut self,
        permit: Permit,
        outcome: Outcome,
        now: Instant,
        settings: &BreakerSettings,
    ) -> Option<Transition> {
        let late_probe = permit == Permit::Probe && self.probe_deadline.is_some_and(|d| now > d);
        if permit == Permit::Probe {
            self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
        }
        let outcome = if late_probe && outcome == Outcome::Success {
            Outcome::Failure
        } else {
            outcome
        };
        match (outcome, permit, self.state) {
            (Outcome::Neutral, _, _) => None,
            (Outcome::RateLimited(retry_after), _, _) => {
                // The provider's own wait when it gave one, shorter or
                // longer than the default.
                let pause = retry_after.unwrap_or(settings.rate_limit_cooldown);
                self.cooldown_until = Some(now + pause.min(MAX_COOLDOWN));
                None
            }
            (Outcome::Success, Permit::Probe, State::HalfOpen) => {
                *self = Breaker::default();
                Some(Transition::Closed)
            }
            (Outcome::Success, _, State::Closed) => {
                self.failures = 0;
                None
            }
            (Outcome::Success, _, _) => None,
            (Outcome::Failure, Permit::Probe, State::HalfOpen) => Some(self.reopen(now, settings)),
            (Outcome::Failure, Permit::Normal, State::Closed) => {
                self.failures += 1;
                if self.failures >= settings.consecutive_failures {
                    self.reopens = 0;
                    let open_for = settings.open;
                    self.state = State::Open {
                        until: now + open_for,
                    };
                    Some(Transition::Opened(open_for))
                } else {
                    None
                }
            }
            // A request that started before the breaker opened.
            (Outcome::Failure, _, _) => None,
        }
    }

    fn reopen(&mut self, now: Instant, settings: &BreakerSettings) -> Transition {
        self.reopens += 1;
        let open_for = settings
            .open
            .saturating_mul(1u32 << self.reopens.min(16))
            .min(settings.max_open);
        self.state = State::Open {
            until: now + open_for,
        };
        self.probes_in_flight = 0;
        self.probe_deadline = None;
        Transition::Opened(open_for)
    }

    /// When this backend may next be tried, if it cannot be now.
    pub fn next_chance(&self, now: Instant) -> Option<Instant> {
        let open = match self.state {
            State::Open { until } if until > now => Some(until),
            State::HalfOpen if self.probes_in_flight > 0 => self.probe_deadline,
            _ => None,
        };
        let cooling = self.cooldown_until.filter(|&until| until > now);
        match (open, cooling) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// The gauge value to publish, when it differs from the one last
    /// published: the metric is written on changes only, not per request.
    pub fn unpublished_gauge(&mut self, now: Instant) -> Option<i64> {
        let gauge = self.view(now).gauge();
        (self.published != Some(gauge)).then(|| {
            self.published = Some(gauge);
            gauge
        })
    }

    /// The state for `/ready` and metrics.
    pub fn view(&self, now: Instant) -> BreakerView {
        BreakerView {
            state: match self.state {
                State::Closed => "closed",
                State::Open { until } if now < until => "open",
                State::Open { .. } | State::HalfOpen => "half_open",
            },
            cooling_down: self.cooldown_until.is_some_and(|until| now < until),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            consecutive_failures: 3,
            open: Duration::from_secs(10),
            max_open: Duration::from_secs(35),
            half_open_probes: 1,
            probe_timeout: Duration::from_secs(5),
            rate_limit_cooldown: Duration::from_secs(2),
        }
    }

    fn fail(b: &mut Breaker, now: Instant) -> Option<Transition> {
        let permit = b.acquire(now, &settings()).expect("allowed");
        b.record(permit, Outcome::Failure, now, &settings())
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let (s, t0) = (settings(), Instant::now());
        let mut b = Breaker::default();
        fail(&mut b, t0);
        fail(&mut b, t0);
        let p = b.acquire(t0, &s).unwrap();
        b.record(p, Outcome::Success, t0, &s); // resets the count
        fail(&mut b, t0);
        fail(&mut b, t0);
        assert_eq!(
            fail(&mut b, t0),
            Some(Transition::Opened(Duration::from_secs(10)))
        );
        assert!(b.acquire(t0 + Duration::from_secs(9), &s).is_none());
        assert_eq!(b.view(t0).gauge(), 2);
        assert_eq!(b.next_chance(t0), Some(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn half_opens_on_schedule_and_closes_after_a_good_probe() {
        let (s, t0) = (settings(), Instant::now());
        let mut b = Breaker::default();
        (0..3).for_each(|_| {
            fail(&mut b, t0);
        });
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.acquire(t1, &s), Some(Permit::Probe));
        assert_eq!(b.acquire(t1, &s), None, "one probe at a time");
        assert!(!b.available(t1), "not offered while its probe is out");
        assert!(
            b.available(t1 + s.probe_timeout),
            "offered again once the probe is overdue (taking it re-opens)"
        );
        assert_eq!(b.view(t1).gauge(), 1);
        assert_eq!(
            b.record(Permit::Probe, Outcome::Success, t1, &s),
            Some(Transition::Closed)
        );
        assert_eq!(b.acquire(t1, &s), Some(Permit::Normal));
    }

    #[test]
    fn reopens_for_longer_after_a_bad_probe_up_to_the_cap() {
        let (s, t0) = (settings(), Instant::now());
        let mut b = Breaker::default();
        (0..3).for_each(|_| {
            fail(&mut b, t0);
        });
        let mut now = t0 + Duration::from_secs(10);
        let mut opened = Vec::new();
        for _ in 0..3 {
            let p = b.acquire(now, &s).unwrap();
            assert_eq!(p, Permit::Probe);
            let Some(Transition::Opened(d)) = b.record(p, Outcome::Failure, now, &s) else {
                panic!()
            };
            opened.push(d.as_secs());
            now += d;
        }
        assert_eq!(opened, [20, 35, 35]);
    }

    #[test]
    fn a_probe_that_takes_too_long_counts_as_failed() {
        let (s, t0) = (settings(), Instant::now());
        let mut b = Breaker::default();
        (0..3).for_each(|_| {
            fail(&mut b, t0);
        });
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.acquire(t1, &s), Some(Permit::Probe));
        let late = t1 + Duration::from_secs(6);
        assert!(matches!(
            b.record(Permit::Probe, Outcome::Success, late, &s),
            Some(Transition::Opened(_))
        ));
        // A probe that never reports back frees the slot after its deadline.
        let t2 = late + Duration::from_secs(20);
        assert_eq!(b.acquire(t2, &s), Some(Permit::Probe));
        assert_eq!(b.acquire(t2 + Duration::from_secs(6), &s), None);
        assert_eq!(b.view(t2 + Duration::from_secs(6)).state, "open");
    }

    #[test]
    fn a_provider_429_cools_down_without_counting_as_failure() {
        let (s, t0) = (settings(), Instant::now());
        let mut b = Breaker::default();
        fail(&mut b, t0);
        fail(&mut b, t0);
        let p = b.acquire(t0, &s).unwrap();
        assert_eq!(b.record(p, Outcome::RateLimited(None), t0, &s), None);
        assert!(!b.available(t0 + Duration::from_secs(1)));
        assert!(b.view(t0).cooling_down);
        assert_eq!(b.view(t0).state, "closed");
        assert_eq!(
            fail(&mut b, t0 + Duration::from_secs(2)),
            Some(Transition::Opened(Duration::from_secs(10))),
            "the third failure opens it: the 429 did not count"
        );
        let mut c = Breaker::default();
        let p = c.acquire(t0, &s).unwrap();
        c.record(
            p,
            Outcome::RateLimited(Some(Duration::from_secs(7))),
            t0,
            &s,
        );
        assert_eq!(c.next_chance(t0), Some(t0 + Duration::from_secs(7)));
        // Shorter than the default is respected too.
        let mut d = Breaker::default();
        let p = d.acquire(t0, &s).unwrap();
        d.record(
            p,
            Outcome::RateLimited(Some(Duration::from_millis(500))),
            t0,
            &s,
        );
        assert_eq!(d.next_chance(t0), Some(t0 + Duration::from_millis(500)));
    }
}
