//! GCRA (the generic cell rate algorithm) over a one-minute window: the one
//! rate algorithm of the gateway, shared by the tenant limits and the
//! failed-authentication throttle. A limit of N per minute admits up to N at
//! once from idle and refills continuously at N/60 per second; its state is
//! one number, the theoretical arrival time (TAT).

/// The window every per-minute limit refills over, in milliseconds.
pub const WINDOW_MS: f64 = 60_000.0;

/// Floating-point slack so that exactly N requests fit in a limit of N.
const EPSILON_MS: f64 = 1e-6;

/// Takes `amount` from a per-minute `limit` whose TAT is `tat`. Returns the
/// new TAT, or how many milliseconds until it would fit.
pub fn take(tat: f64, now: f64, limit: f64, amount: f64) -> Result<f64, f64> {
    let new_tat = tat.max(now) + amount * WINDOW_MS / limit;
    let over = new_tat - now - WINDOW_MS;
    if over > EPSILON_MS {
        Err(over)
    } else {
        Ok(new_tat)
    }
}

/// Moves a TAT by `delta` units of a per-minute `limit` after the fact: an
/// overrun counts from now when the limit was whole; a refund never makes
/// it more than whole.
pub fn shift(tat: f64, now: f64, limit: f64, delta: i64) -> f64 {
    let step = delta as f64 * WINDOW_MS / limit;
    if delta > 0 {
        tat.max(now) + step
    } else {
        (tat + step).max(now)
    }
}

/// What a limit with TAT `tat` could still admit now, and the milliseconds
/// until it is whole again.
pub fn remaining(tat: f64, now: f64, limit: u64) -> (u64, u64) {
    let used_ms = (tat - now).max(0.0);
    let remaining = ((WINDOW_MS - used_ms) * limit as f64 / WINDOW_MS + EPSILON_MS).floor();
    (
        remaining.clamp(0.0, limit as f64) as u64,
        used_ms.ceil() as u64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_admits_exactly_the_limit_in_a_burst() {
        let (limit, now) = (10.0, 1_000_000.0);
        let mut tat = 0.0;
        let mut admitted = 0;
        let mut last_refusal = None;
        for _ in 0..15 {
            match take(tat, now, limit, 1.0) {
                Ok(t) => {
                    tat = t;
                    admitted += 1;
                }
                Err(wait) => last_refusal = Some(wait),
            }
        }
        assert_eq!(admitted, 10);
        // The next slot frees after one emission interval: 6 s.
        assert!((last_refusal.unwrap() - 6000.0).abs() < 1e-3);
        assert!(take(tat, now + 6000.0, limit, 1.0).is_ok());
        assert!(take(tat, now + 5999.0, limit, 1.0).is_err());
    }

    #[test]
    fn gcra_admits_exactly_n_for_awkward_limits() {
        for limit in [3u64, 7, 600, 1000, 7919] {
            let now = 1_700_000_000_123.456;
            let mut tat = 0.0;
            let admitted = (0..limit + 5)
                .filter(|_| match take(tat, now, limit as f64, 1.0) {
                    Ok(t) => {
                        tat = t;
                        true
                    }
                    Err(_) => false,
                })
                .count();
            assert_eq!(admitted as u64, limit, "limit {limit}");
        }
    }

    #[test]
    fn shifts_charge_overruns_from_now_and_never_refund_past_whole() {
        let now = 100_000.0;
        assert_eq!(shift(0.0, now, 60.0, 2), now + 2000.0);
        assert_eq!(shift(now + 5000.0, now, 60.0, -2), now + 3000.0);
        assert_eq!(shift(now + 1000.0, now, 60.0, -5), now);
    }
}
