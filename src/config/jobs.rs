//! Validation of the `jobs:` section: async jobs' lifetimes, attempts,
//! deadlines and the in-process store's bounds.

use super::raw::RawJobs;
use super::{problem, JobSettings, Problem};
use std::time::Duration;

/// A number of `name` that must lie in `range`, else a problem (and the
/// default).
fn within(
    value: Option<u64>,
    default: u64,
    name: &str,
    range: std::ops::RangeInclusive<u64>,
    problems: &mut Vec<Problem>,
) -> u64 {
    let value = value.unwrap_or(default);
    if !range.contains(&value) {
        problems.push(problem(
            &format!("jobs.{name}"),
            format!("must be between {} and {}", range.start(), range.end()),
        ));
        return default;
    }
    value
}

/// The job settings from the raw section.
pub(super) fn validate_jobs(raw: RawJobs, problems: &mut Vec<Problem>) -> JobSettings {
    let d = JobSettings::default();
    let secs = |d: Duration| d.as_secs();
    let millis = |d: Duration| d.as_millis() as u64;
    let ttl = within(
        raw.result_ttl_seconds,
        secs(d.result_ttl),
        "result_ttl_seconds",
        1..=365 * 86_400,
        problems,
    );
    let visibility = within(
        raw.visibility_timeout_seconds,
        secs(d.visibility_timeout),
        "visibility_timeout_seconds",
        2..=86_400,
        problems,
    );
    let max_jobs = raw.in_process_max_jobs.unwrap_or(d.in_process_max_jobs);
    if max_jobs == 0 {
        problems.push(problem("jobs.in_process_max_jobs", "must be at least 1"));
    }
    let max_bytes = raw.in_process_max_bytes.unwrap_or(d.in_process_max_bytes);
    if max_bytes < 1024 {
        problems.push(problem(
            "jobs.in_process_max_bytes",
            "must be at least 1024",
        ));
    }
    // A key must not outlive the job it names: a retried submission would
    // then find neither and run again.
    let idempotency = within(
        raw.idempotency_window_seconds,
        secs(d.idempotency_window).min(ttl),
        "idempotency_window_seconds",
        1..=ttl,
        problems,
    );
    let max_attempts = within(
        raw.max_attempts.map(u64::from),
        u64::from(d.max_attempts),
        "max_attempts",
        1..=100,
        problems,
    ) as u32;
    // An unfinished job is kept seven result TTLs.
    let max_age = within(
        raw.max_age_seconds,
        secs(d.max_age).min(ttl * 7),
        "max_age_seconds",
        1..=ttl * 7,
        problems,
    );
    let timeout = within(
        raw.timeout_seconds,
        secs(d.timeout),
        "timeout_seconds",
        1..=86_400,
        problems,
    );
    let backoff = within(
        raw.retry_backoff_ms,
        millis(d.retry_backoff),
        "retry_backoff_ms",
        10..=3_600_000,
        problems,
    );
    let backoff_max = within(
        raw.retry_backoff_max_ms,
        millis(d.retry_backoff_max).max(backoff),
        "retry_backoff_max_ms",
        backoff..=86_400_000,
        problems,
    );
    let concurrency = within(
        raw.concurrency.map(|c| c as u64),
        d.concurrency as u64,
        "concurrency",
        1..=100_000,
        problems,
    ) as usize;
    JobSettings {
        result_ttl: Duration::from_secs(ttl),
        visibility_timeout: Duration::from_secs(visibility),
        in_process_max_jobs: max_jobs,
        in_process_max_bytes: max_bytes,
        idempotency_window: Duration::from_secs(idempotency),
        max_attempts,
        max_age: Duration::from_secs(max_age),
        timeout: Duration::from_secs(timeout),
        retry_backoff: Duration::from_millis(backoff),
        retry_backoff_max: Duration::from_millis(backoff_max),
        concurrency,
    }
}
