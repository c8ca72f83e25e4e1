//! How long a job waits before its next attempt: exponential backoff with
//! jitter, so jobs that failed together (a provider outage) do not all
//! come back at the same instant.

use crate::config::JobSettings;
use std::time::Duration;

/// The wait after attempt `number` (1-based) failed: `retry_backoff`
/// doubled for each attempt before it, capped at `retry_backoff_max`, then
/// a random point in its upper half ("equal jitter": never less than half
/// the step, so the backoff still grows).
pub(super) fn backoff(settings: &JobSettings, number: u32) -> Duration {
    let step = step(settings, number);
    let half = step / 2;
    half + half.mul_f64(fastrand::f64())
}

/// The backoff step before jitter.
fn step(settings: &JobSettings, number: u32) -> Duration {
    let doublings = number.saturating_sub(1).min(30);
    settings
        .retry_backoff
        .saturating_mul(1 << doublings)
        .min(settings.retry_backoff_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let settings = JobSettings {
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_millis(1000),
            ..JobSettings::default()
        };
        let steps: Vec<u64> = (1..=6)
            .map(|n| step(&settings, n).as_millis() as u64)
            .collect();
        assert_eq!(steps, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(step(&settings, u32::MAX).as_millis(), 1000, "no overflow");
        for n in 1..=6 {
            for _ in 0..200 {
                let wait = backoff(&settings, n);
                let step = step(&settings, n);
                assert!(wait >= step / 2 && wait <= step, "{wait:?} for {step:?}");
            }
        }
        let waits: std::collections::HashSet<Duration> =
            (0..50).map(|_| backoff(&settings, 3)).collect();
        assert!(waits.len() > 10, "jittered: {}", waits.len());
    }
}
