//! Quota taken ahead from Redis (`redis.lease`). An admission that goes to
//! Redis also takes a share of the tenant's requests and tokens per minute
//! when they fit, and the concurrency slots of requests that end are kept
//! rather than released, so the next requests are admitted here without a
//! round trip. What is taken counts in Redis at once, so the instances
//! together never admit more than the limits allow; what one holds unused
//! is given back `redis.lease.ms` after it took it (and when it stops), so
//! the others can have it.

use super::Lease;
use crate::config::{LeaseSettings, TenantLimits, TenantSettings};
use crate::gcra::WINDOW_MS;
use crate::limits::{window, RateLimitState};
use crate::lock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// How much of a tenant's limits one instance holds at most.
#[derive(Debug, Clone, Copy, Default)]
struct Size {
    requests: u64,
    tokens: u64,
    slots: usize,
}

impl Size {
    /// `share` of each limit the tenant has, rounded down.
    fn of(limits: &TenantLimits, share: f64) -> Size {
        let part = |limit: u64| (limit as f64 * share).floor() as u64;
        Size {
            requests: limits.requests_per_minute.map_or(0, |rpm| part(rpm.into())),
            tokens: limits.tokens_per_minute.map_or(0, part),
            slots: limits
                .max_concurrent
                .map_or(0, |max| part(max.into()) as usize),
        }
    }

    /// Whether every limit the tenant has gets a share: when one does not
    /// (a share of a small limit rounds to nothing), each of its requests
    /// needs Redis anyway, and nothing is taken ahead.
    fn covers(&self, limits: &TenantLimits) -> bool {
        (limits.requests_per_minute.is_none() || self.requests > 0)
            && (limits.tokens_per_minute.is_none() || self.tokens > 0)
            && (limits.max_concurrent.is_none() || self.slots > 0)
    }
}

/// What one tenant's pool holds.
#[derive(Debug, Default)]
struct Pool {
    /// Requests and tokens taken from Redis's minutes, not yet admitted.
    requests: u64,
    tokens: u64,
    /// Until when they may be admitted against (this process's clock, Unix
    /// ms); Redis was last read when they were taken.
    until: f64,
    /// Concurrency slots (leases in Redis) kept for the next requests, each
    /// with when it was kept (Unix ms).
    slots: Vec<(Lease, f64)>,
    /// The TATs Redis answered with at the last take (Unix ms, Redis's
    /// clock), and Redis's clock less this one's then: for the headers.
    requests_tat: f64,
    tokens_tat: f64,
    skew: f64,
    /// Whether an admission asking for more is on its way to Redis: the
    /// others then ask for none, or a burst would each take a share.
    asking: bool,
}

/// An admission's ask for more quota, while it is on its way to Redis:
/// dropped (answered, failed, or the request gone) the next may ask.
pub(super) struct Ask<'a> {
    pools: &'a Pools,
    tenant: usize,
    /// The requests and tokens asked for.
    pub(super) extra: [u64; 2],
}

impl Drop for Ask<'_> {
    fn drop(&mut self) {
        if self.extra != [0, 0] {
            lock(&self.pools.pools[self.tenant]).asking = false;
        }
    }
}

/// What a pool gives back to Redis.
#[derive(Debug, Default)]
pub(super) struct Unused {
    pub(super) tenant: usize,
    pub(super) requests: u64,
    pub(super) tokens: u64,
    pub(super) slots: Vec<Lease>,
}

/// Every tenant's pool, for a store with `redis.lease`.
#[derive(Debug)]
pub(super) struct Pools {
    hold_ms: f64,
    /// Per tenant; `None` for one that is not pooled (no limits, or one
    /// whose share rounds to nothing).
    sizes: Vec<Option<Size>>,
    /// The tenants' limits, for what is given back.
    pub(super) limits: Vec<TenantLimits>,
    pools: Vec<Mutex<Pool>>,
    /// `runestone_leased_admissions_total{tenant}`, per tenant.
    admitted: Vec<prometheus::IntCounter>,
    /// Set once the process stops: from then on every admission and
    /// settlement goes to Redis, and what the pools hold is given back.
    stopped: AtomicBool,
}

impl Pools {
    /// Pools for these tenants, sized by `settings`.
    pub(super) fn new(settings: LeaseSettings, tenants: &[TenantSettings]) -> Self {
        Pools {
            hold_ms: settings.hold.as_secs_f64() * 1000.0,
            sizes: tenants
                .iter()
                .map(|t| {
                    let size = Size::of(&t.limits, settings.share);
                    (t.limits.is_limited() && size.covers(&t.limits)).then_some(size)
                })
                .collect(),
            limits: tenants.iter().map(|t| t.limits.clone()).collect(),
            pools: tenants.iter().map(|_| Mutex::default()).collect(),
            admitted: tenants
                .iter()
                .map(|t| crate::metrics::LEASED_ADMISSIONS.with_label_values(&[&t.id]))
                .collect(),
            stopped: AtomicBool::new(false),
        }
    }

    /// The size of `tenant`'s pool, when its requests are admitted
    /// against one now.
    fn size(&self, tenant: usize) -> Option<Size> {
        self.sizes[tenant].filter(|_| !self.stopped.load(Ordering::Relaxed))
    }

    /// Whether `tenant`'s requests are admitted against a pool now: its
    /// settlements are not waited for.
    pub(super) fn pooled(&self, tenant: usize) -> bool {
        self.size(tenant).is_some()
    }

    /// Admits one request of `tokens` tokens against the pool, if it holds
    /// enough of every limit the tenant has (the budget is the caller's to
    /// check): the slot it takes, if any, and the headers' view.
    pub(super) fn take(
        &self,
        tenant: usize,
        limits: &TenantLimits,
        tokens: u64,
        now: f64,
    ) -> Option<(Option<Lease>, RateLimitState)> {
        if !self.pooled(tenant) {
            return None;
        }
        let mut pool = lock(&self.pools[tenant]);
        let enough = now < pool.until
            && (limits.requests_per_minute.is_none() || pool.requests >= 1)
            && (limits.tokens_per_minute.is_none() || pool.tokens >= tokens)
            && (limits.max_concurrent.is_none() || !pool.slots.is_empty());
        if !enough {
            return None;
        }
        let lease = limits
            .max_concurrent
            .and_then(|_| pool.slots.pop())
            .map(|(lease, _)| lease);
        if limits.requests_per_minute.is_some() {
            pool.requests -= 1;
        }
        if limits.tokens_per_minute.is_some() {
            pool.tokens -= tokens;
        }
        self.admitted[tenant].inc();
        Some((lease, pool.state(limits, now)))
    }

    /// The requests and tokens to ask Redis for with an admission: what
    /// fills the pool, unless another admission is asking already.
    pub(super) fn ask(&self, tenant: usize) -> Ask<'_> {
        let mut extra = [0, 0];
        if let Some(size) = self.size(tenant) {
            let mut pool = lock(&self.pools[tenant]);
            if !pool.asking {
                extra = [
                    size.requests.saturating_sub(pool.requests),
                    size.tokens.saturating_sub(pool.tokens),
                ];
                pool.asking = extra != [0, 0];
            }
        }
        Ask {
            pools: self,
            tenant,
            extra,
        }
    }

    /// Records Redis's answer to an admission that made `ask`: the TATs it
    /// read, and, when `taken` (what was asked for came with it), that
    /// much more in the pool, good for `redis.lease.ms` from `now` (this
    /// clock, Unix ms). The headers' view after it.
    pub(super) fn answered(
        &self,
        (ask, taken): (Ask<'_>, bool),
        limits: &TenantLimits,
        [redis_now, requests_tat, tokens_tat]: [f64; 3],
        now: f64,
    ) -> RateLimitState {
        let mut pool = lock(&self.pools[ask.tenant]);
        if taken {
            pool.requests += ask.extra[0];
            pool.tokens += ask.extra[1];
        }
        // Redis was read: the budget's view is fresh again.
        pool.until = now + self.hold_ms;
        pool.requests_tat = requests_tat;
        pool.tokens_tat = tokens_tat;
        pool.skew = redis_now - now;
        let state = pool.state(limits, now);
        drop(pool);
        // The next admission may ask.
        drop(ask);
        state
    }

    /// Keeps the slot of a request that ended for the tenant's next one;
    /// `false` when the pool has its share of slots already (the slot is
    /// released in Redis).
    pub(super) fn keep(&self, tenant: usize, lease: Lease, now: f64) -> bool {
        let Some(size) = self.size(tenant) else {
            return false;
        };
        let mut pool = lock(&self.pools[tenant]);
        if pool.slots.len() >= size.slots {
            return false;
        }
        pool.slots.push((lease, now));
        true
    }

    /// The slots the pools hold, for renewal with the leases of requests
    /// in flight.
    pub(super) fn slots(&self, tenant: usize) -> Vec<Lease> {
        lock(&self.pools[tenant])
            .slots
            .iter()
            .map(|&(lease, _)| lease)
            .collect()
    }

    /// Takes out what has been held unused for `redis.lease.ms` (all of
    /// it once stopped, or for a tenant that is not `up`), to be given
    /// back.
    pub(super) fn unused(&self, now: f64, up: impl Fn(usize) -> bool) -> Vec<Unused> {
        let stopped = self.stopped.load(Ordering::Relaxed);
        let mut unused = Vec::new();
        for (tenant, pool) in self.pools.iter().enumerate() {
            let mut pool = lock(pool);
            let all = stopped || !up(tenant);
            let mut out = Unused {
                tenant,
                ..Unused::default()
            };
            if all || now >= pool.until {
                out.requests = std::mem::take(&mut pool.requests);
                out.tokens = std::mem::take(&mut pool.tokens);
            }
            let hold_ms = self.hold_ms;
            pool.slots.retain(|&(lease, kept)| {
                let stale = all || now >= kept + hold_ms;
                if stale {
                    out.slots.push(lease);
                }
                !stale
            });
            if out.requests > 0 || out.tokens > 0 || !out.slots.is_empty() {
                unused.push(out);
            }
        }
        unused
    }

    /// Stops taking ahead: what the pools hold goes back with the next
    /// [`Pools::unused`].
    pub(super) fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// How often the pools are looked at for what to give back.
    pub(super) fn tick(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.hold_ms / 4000.0)
    }
}

impl Pool {
    /// The headers' view: Redis's TATs at the last take, less what the pool
    /// still holds (this instance may yet admit it).
    fn state(&self, limits: &TenantLimits, now: f64) -> RateLimitState {
        let redis_now = now + self.skew;
        RateLimitState {
            requests: limits.requests_per_minute.map(|rpm| {
                let held = self.requests as f64 * WINDOW_MS / f64::from(rpm);
                window(self.requests_tat - held, redis_now, u64::from(rpm))
            }),
            tokens: limits.tokens_per_minute.map(|tpm| {
                let held = self.tokens as f64 * WINDOW_MS / tpm as f64;
                window(self.tokens_tat - held, redis_now, tpm)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, TenantLimits};
    use std::time::Duration;

    /// Pools of share 0.1, held a second, for one tenant with `limits`.
    fn pools(limits: &str) -> (Pools, TenantLimits) {
        let yaml = format!(
            r#"
server: {{ listen: "127.0.0.1:1" }}
providers: [{{ name: p, base_url: "http://127.0.0.1:1/v1" }}]
models: [{{ name: m, targets: [{{ provider: p }}] }}]
tenants:
  - {{ id: pool-test, keys: ["sk-pool-test"], limits: {limits} }}
"#
        );
        let config = Config::from_yaml(&yaml, |_| None).expect("valid config");
        let lease = LeaseSettings {
            share: 0.1,
            hold: Duration::from_millis(1000),
        };
        (
            Pools::new(lease, &config.tenants),
            config.tenants[0].limits.clone(),
        )
    }

    #[test]
    fn a_burst_asks_for_one_share_not_one_each() {
        let (pools, limits) = pools("{ requests_per_minute: 100, tokens_per_minute: 5000 }");
        let first = pools.ask(0);
        assert_eq!(first.extra, [10, 500]);
        assert_eq!(pools.ask(0).extra, [0, 0], "the first is on its way");
        let view = pools.answered((first, true), &limits, [0.0; 3], 0.0);
        assert!(view.requests.is_some() && view.tokens.is_some());
        assert_eq!(pools.ask(0).extra, [0, 0], "the pool is full");
        // A request gone before its answer lets the next one ask.
        assert!(pools.take(0, &limits, 100, 1.0).is_some());
        let gone = pools.ask(0);
        assert_eq!(gone.extra, [1, 100]);
        drop(gone);
        assert_eq!(pools.ask(0).extra, [1, 100]);
    }

    #[test]
    fn a_pool_admits_what_it_holds_for_the_lease_and_gives_back_the_rest() {
        let (pools, limits) = pools("{ requests_per_minute: 100, max_concurrent: 20 }");
        let ask = pools.ask(0);
        pools.answered((ask, true), &limits, [0.0; 3], 0.0);
        // No slot kept yet: the first requests need Redis for theirs.
        assert!(pools.take(0, &limits, 1, 1.0).is_none());
        let slots: Vec<Lease> = (0..3).map(|_| Lease::random()).collect();
        assert!(pools.keep(0, slots[0], 1.0));
        assert!(pools.keep(0, slots[1], 1.0));
        assert!(!pools.keep(0, slots[2], 1.0), "a share of 20 is 2 slots");
        for _ in 0..2 {
            assert!(pools.take(0, &limits, 1, 2.0).unwrap().0.is_some());
        }
        assert!(pools.take(0, &limits, 1, 2.0).is_none(), "no slot left");
        assert!(pools.keep(0, slots[0], 500.0));
        assert!(pools.unused(999.0, |_| true).is_empty(), "held a second");
        assert!(
            pools.take(0, &limits, 1, 1000.0).is_none(),
            "the lease ran out"
        );
        let unused = pools.unused(1500.0, |_| true);
        assert_eq!(unused.len(), 1);
        assert_eq!((unused[0].requests, unused[0].slots.len()), (8, 1));
        // Stopped, it takes nothing ahead and gives back everything.
        assert!(pools.keep(0, slots[1], 1600.0));
        pools.stop();
        assert_eq!(pools.ask(0).extra, [0, 0]);
        assert!(!pools.keep(0, slots[2], 1600.0));
        assert_eq!(pools.unused(1600.0, |_| true)[0].slots, [slots[1]]);
    }

    fn limits(rpm: Option<u32>, tpm: Option<u64>, max: Option<u32>) -> TenantLimits {
        TenantLimits {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            max_concurrent: max,
            ..TenantLimits::default()
        }
    }

    #[test]
    fn a_share_is_taken_of_every_limit_or_of_none() {
        let size = Size::of(&limits(Some(100), Some(10_000), Some(10)), 0.1);
        assert_eq!((size.requests, size.tokens, size.slots), (10, 1000, 1));
        assert!(size.covers(&limits(Some(100), Some(10_000), Some(10))));
        // A share of 4 concurrent requests rounds to none: every request
        // of that tenant needs Redis for its slot.
        let small = limits(Some(100), None, Some(4));
        assert!(!Size::of(&small, 0.1).covers(&small));
    }
}
