//! Accounting periods in UTC: which period a moment falls in (a day, a
//! month, or all time), its id (`2026-11-25`, `2026-11`, `total`), and how
//! long until it ends.

use crate::config::{BudgetPeriod, TenantLimits};
use std::sync::Arc;

/// The period usage and budgets are counted in for a tenant: its budget's,
/// or the calendar month without a budget.
pub fn accounting_period(limits: &TenantLimits) -> BudgetPeriod {
    limits.budget.map_or(BudgetPeriod::Monthly, |b| b.period)
}

/// The current period's id (`2026-11-25`, `2026-11`, `total`) and the
/// milliseconds until it ends (`None` for `total`), in UTC.
pub fn period_at(period: BudgetPeriod, unix_ms: f64) -> (Arc<str>, Option<u64>) {
    let secs = (unix_ms / 1000.0).floor() as i64;
    let days = secs.div_euclid(86_400);
    let (id, end_ms) = current_period(period, days);
    (id, end_ms.map(|end| (end - unix_ms).ceil() as u64))
}

/// The id of the period (of kind `period`) that day `days` falls in, and
/// when that period ends (Unix milliseconds; `None` for `total`): worked out
/// once per day, thread and kind rather than for every admission and
/// settlement, and the id shared rather than copied.
fn current_period(period: BudgetPeriod, days: i64) -> (Arc<str>, Option<f64>) {
    type Known = (i64, Option<(Arc<str>, Option<f64>)>);
    thread_local! {
        static LAST: std::cell::RefCell<[Known; 3]> =
            const { std::cell::RefCell::new([(i64::MIN, None), (i64::MIN, None), (i64::MIN, None)]) };
    }
    let slot = match period {
        BudgetPeriod::Daily => 0,
        BudgetPeriod::Monthly => 1,
        BudgetPeriod::Total => 2,
    };
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        let (day, known) = &mut last[slot];
        match known {
            Some(known) if *day == days => known.clone(),
            _ => {
                *day = days;
                known.insert(period_of(period, days)).clone()
            }
        }
    })
}

/// The id of the period that day `days` falls in, and when it ends.
fn period_of(period: BudgetPeriod, days: i64) -> (Arc<str>, Option<f64>) {
    const DAY_MS: f64 = 86_400_000.0;
    let (y, m, d) = civil_from_days(days);
    match period {
        BudgetPeriod::Daily => (
            format!("{y:04}-{m:02}-{d:02}").into(),
            Some((days + 1) as f64 * DAY_MS),
        ),
        BudgetPeriod::Monthly => {
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            let next = days_from_civil(ny, nm, 1);
            (format!("{y:04}-{m:02}").into(), Some(next as f64 * DAY_MS))
        }
        BudgetPeriod::Total => ("total".into(), None),
    }
}

/// Days since 1970-01-01 -> (year, month, day) in the proleptic Gregorian
/// calendar (the "civil from days" algorithm of H. Hinnant).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_follow_the_utc_calendar() {
        // 2026-11-25T21:00:00Z
        let t = 1_795_640_400_000.0;
        assert_eq!(
            period_at(BudgetPeriod::Daily, t),
            ("2026-11-25".into(), Some(3 * 3_600_000))
        );
        let (id, left) = period_at(BudgetPeriod::Monthly, t);
        assert_eq!(&*id, "2026-11");
        assert_eq!(left, Some((5 * 24 + 3) * 3_600_000));
        assert_eq!(period_at(BudgetPeriod::Total, t), ("total".into(), None));
        // Year end and leap day.
        assert_eq!(
            &*period_at(BudgetPeriod::Monthly, 1_798_761_599_000.0).0,
            "2026-12"
        );
        assert_eq!(
            &*period_at(BudgetPeriod::Daily, 1_709_164_800_000.0).0,
            "2024-02-29"
        );
        for days in [-1000i64, 0, 59, 60, 365, 10_957, 20_000, 100_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
