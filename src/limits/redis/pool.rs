//! Quota taken ahead from Redis (`redis.lease`). An admission that goes to
//! Redis hands back what the pool still holds and takes a share of the
//! tenant's requests and tokens per minute anew when it fits (one such ask
//! at a time; the requests that find the pool empty meanwhile wait for
//! it), and the concurrency slots of requests that end are kept rather
//! than released, so the next requests are admitted here without a round
//! trip. Their settlements' corrections stay with the pool (what goes
//! beyond the share goes back at the next upkeep) and their usage is owed
//! to the ledger's flush (`RedisStore::settle`). What is taken is a hold in
//! Redis, counted as taken at once and not ageing with the minute while it
//! waits, so the instances together never admit more than the limits
//! allow; what one holds is given back `redis.lease.ms` after it asked for
//! it (and when it stops), what of it was used then counting in the
//! minute, so the others can have the rest.

use super::Lease;
use crate::config::{LeaseSettings, TenantLimits, TenantSettings};
use crate::gcra::WINDOW_MS;
use crate::limits::{window, RateLimitState};
use crate::lock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Milliseconds on this process's monotonic clock: what the pools time
/// their holdings by, so a wall clock stepped back or forth does not
/// stretch or cut them.
pub(super) fn now() -> f64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64() * 1000.0
}

/// How much of a tenant's limits one instance holds at most.
#[derive(Debug, Clone, Copy, Default)]
struct Size {
    requests: i64,
    tokens: i64,
    slots: usize,
}

impl Size {
    /// `share` of each limit the tenant has, rounded down.
    fn of(limits: &TenantLimits, share: f64) -> Size {
        let part = |limit: u64| (limit as f64 * share).floor() as i64;
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

/// What one tenant's pool holds. Times are [`now`]'s.
#[derive(Debug, Default)]
struct Pool {
    /// Requests and tokens taken from Redis's minutes and not yet
    /// admitted, corrected by the settlements since (a token overrun can
    /// take them below zero: owed to Redis, charged when they go back).
    requests: i64,
    tokens: i64,
    /// Until when they may be admitted against: `redis.lease.ms` after
    /// they were last asked for.
    until: f64,
    /// The hold Redis keeps for what was last taken: counted against the
    /// limits as it stands until given back, when what of it was used is
    /// charged.
    hold: Option<Lease>,
    /// Holds whose release went unanswered, with what was given back with
    /// them: sent again with the next upkeep (a hold released already is
    /// not released twice).
    releases: Vec<(Lease, [i64; 2])>,
    /// What settlements gave back beyond the pool's share (a reservation
    /// mostly unused): not admitted against, given back at the next
    /// upkeep.
    excess: [i64; 2],
    /// Until when Redis's spend, read by the last admission it decided,
    /// may stand for the budget: `redis.lease.ms` after that read.
    read_until: f64,
    /// Concurrency slots (leases in Redis) kept for the next requests, each
    /// with when it was kept.
    slots: Vec<(Lease, f64)>,
    /// The last admission's read: the TATs (Unix ms, Redis's clock), and
    /// Redis's clock then with this one's, for the headers.
    requests_tat: f64,
    tokens_tat: f64,
    read_at: (f64, f64),
    /// Whether an admission asking for more is on its way to Redis: the
    /// others then ask for none, or a burst would each take a share.
    asking: bool,
    /// Slots of requests in flight that Redis lost: not kept when they end
    /// (those of a renewal's last look only).
    lost: Vec<Lease>,
}

/// An admission's ask for quota, while it is on its way to Redis: what the
/// pool held goes back with it (so Redis decides the request against
/// everything but what others hold), and a share is asked for anew. Dropped
/// unanswered (failed, or the request gone), the next may ask, and the
/// holds it named are released with the next upkeep (Redis may not have
/// seen it).
pub(super) struct Ask<'a> {
    pools: &'a Pools,
    tenant: usize,
    /// The requests and tokens asked for.
    pub(super) extra: [i64; 2],
    /// The requests and tokens given back (tokens below zero: charged).
    pub(super) back: [i64; 2],
    /// The hold they are given back from, if any.
    pub(super) release: Option<Lease>,
    /// The hold what is asked for becomes, when it comes.
    pub(super) hold: Option<Lease>,
    /// When it was asked for: what comes is held from then.
    sent: f64,
    answered: bool,
}

impl Drop for Ask<'_> {
    fn drop(&mut self) {
        if self.extra != [0, 0] || self.back != [0, 0] {
            let mut pool = lock(&self.pools.pools[self.tenant]);
            pool.asking = false;
            if !self.answered {
                let releases = [(self.release, self.back), (self.hold, self.extra)];
                let releases = releases
                    .into_iter()
                    .filter_map(|(h, back)| Some((h?, back)));
                pool.release_later(releases);
            }
            drop(pool);
            self.pools.refilled[self.tenant].notify_waiters();
        }
    }
}

/// What a pool gives back to Redis.
#[derive(Debug, Default)]
pub(super) struct Unused {
    pub(super) tenant: usize,
    /// Given back to the TATs (no hold holds them).
    pub(super) requests: i64,
    pub(super) tokens: i64,
    /// Holds released, each with the requests and tokens left of it.
    pub(super) releases: Vec<(Lease, [i64; 2])>,
    pub(super) slots: Vec<Lease>,
}

/// Every tenant's pool, for a store with `redis.lease`.
#[derive(Debug)]
pub(super) struct Pools {
    hold_ms: f64,
    /// How long Redis keeps a hold that is not given back: twice
    /// `redis.lease.ms`, `redis.timeout_ms` (an answer that long on its
    /// way) and a second, well past the upkeep that gives it back.
    pub(super) hold_ttl_ms: u64,
    /// Per tenant; `None` for one that is not pooled (no limits, or one
    /// whose share rounds to nothing).
    sizes: Vec<Option<Size>>,
    /// The tenants' limits, for what is given back.
    pub(super) limits: Vec<TenantLimits>,
    pools: Vec<Mutex<Pool>>,
    /// Per tenant: told when an ask is answered (or given up), so the
    /// requests that found the pool empty meanwhile look again rather than
    /// each going to Redis against what the ask is taking.
    refilled: Vec<tokio::sync::Notify>,
    /// `runestone_leased_admissions_total{tenant}`, per pooled tenant.
    admitted: Vec<Option<prometheus::IntCounter>>,
    /// Set once the process stops: from then on every admission and
    /// settlement goes to Redis, and what the pools hold is given back.
    stopped: AtomicBool,
}

impl Pools {
    /// Pools for these tenants, sized by `settings`.
    pub(super) fn new(
        settings: LeaseSettings,
        redis_timeout: std::time::Duration,
        tenants: &[TenantSettings],
    ) -> Self {
        let sizes: Vec<Option<Size>> = tenants
            .iter()
            .map(|t| {
                let size = Size::of(&t.limits, settings.share);
                (t.limits.is_limited() && size.covers(&t.limits)).then_some(size)
            })
            .collect();
        Pools {
            hold_ms: settings.hold.as_secs_f64() * 1000.0,
            hold_ttl_ms: (2 * settings.hold + redis_timeout).as_millis() as u64 + 1000,
            admitted: tenants
                .iter()
                .zip(&sizes)
                .map(|(t, size)| {
                    size.map(|_| crate::metrics::LEASED_ADMISSIONS.with_label_values(&[&t.id]))
                })
                .collect(),
            sizes,
            limits: tenants.iter().map(|t| t.limits.clone()).collect(),
            pools: tenants.iter().map(|_| Mutex::default()).collect(),
            refilled: tenants.iter().map(|_| tokio::sync::Notify::new()).collect(),
            stopped: AtomicBool::new(false),
        }
    }

    /// The size of `tenant`'s pool, when its requests are admitted
    /// against one now.
    fn size(&self, tenant: usize) -> Option<Size> {
        self.sizes[tenant].filter(|_| !self.stopped.load(Ordering::Relaxed))
    }

    /// Whether `tenant`'s requests are admitted against a pool now: its
    /// settlements are then kept for the flush rather than sent each.
    pub(super) fn pooled(&self, tenant: usize) -> bool {
        self.size(tenant).is_some()
    }

    /// Admits one request of `tokens` tokens against the pool, if it holds
    /// enough of every limit the tenant has and Redis's spend was read
    /// recently enough for the budget (its amount is the caller's to
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
        let tokens = i64::try_from(tokens).unwrap_or(i64::MAX);
        let mut pool = lock(&self.pools[tenant]);
        let fresh = now < pool.until;
        let enough = (limits.requests_per_minute.is_none() || (fresh && pool.requests >= 1))
            && (limits.tokens_per_minute.is_none() || (fresh && pool.tokens >= tokens))
            && (limits.max_concurrent.is_none() || !pool.slots.is_empty())
            && (limits.budget.is_none() || now < pool.read_until);
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
        if let Some(admitted) = &self.admitted[tenant] {
            admitted.inc();
        }
        Some((lease, pool.state(limits, now)))
    }

    /// Waits, while another admission's ask is on its way to Redis, for
    /// its answer (or until it is given up); returns at once when none is.
    pub(super) async fn await_refill(&self, tenant: usize) {
        let refilled = self.refilled[tenant].notified();
        tokio::pin!(refilled);
        // Registered before the look, so an answer in between is not missed.
        refilled.as_mut().enable();
        if lock(&self.pools[tenant]).asking {
            refilled.await;
        }
    }

    /// A kept slot for an admission Redis decides (the pool could not
    /// admit it for another limit): Redis counts it as the request's own.
    pub(super) fn kept_slot(&self, tenant: usize) -> Option<Lease> {
        self.pooled(tenant).then_some(())?;
        lock(&self.pools[tenant])
            .slots
            .pop()
            .map(|(lease, _)| lease)
    }

    /// What an admission going to Redis gives back and asks for: what the
    /// pool holds and a share anew, unless another admission is asking
    /// already.
    pub(super) fn ask(&self, tenant: usize, now: f64) -> Ask<'_> {
        let mut ask = Ask {
            pools: self,
            tenant,
            extra: [0, 0],
            back: [0, 0],
            release: None,
            hold: None,
            sent: now,
            answered: false,
        };
        if let Some(size) = self.size(tenant) {
            let mut pool = lock(&self.pools[tenant]);
            if !pool.asking {
                ask.back = [
                    std::mem::take(&mut pool.requests),
                    std::mem::take(&mut pool.tokens),
                ];
                ask.release = pool.hold.take();
                ask.extra = [size.requests, size.tokens];
                ask.hold = (ask.extra != [0, 0]).then(Lease::random);
                pool.asking = ask.extra != [0, 0] || ask.back != [0, 0];
            }
        }
        ask
    }

    /// Records Redis's answer to an admission that made `ask`: its read
    /// (`[redis_now, requests_tat, tokens_tat]`, Unix ms), and, when
    /// `taken` (what was asked for came with it, as the ask's hold), that
    /// much more in the pool, good for `redis.lease.ms` from when it was
    /// asked for. The headers' view after it.
    pub(super) fn answered(
        &self,
        (mut ask, taken): (Ask<'_>, bool),
        limits: &TenantLimits,
        [redis_now, requests_tat, tokens_tat]: [f64; 3],
        now: f64,
    ) -> RateLimitState {
        ask.answered = true;
        let mut pool = lock(&self.pools[ask.tenant]);
        let until = ask.sent + self.hold_ms;
        match ask.hold {
            Some(hold) if taken && now >= until => {
                // Come after its lease (a slow Redis): given back unused.
                pool.release_later([(hold, ask.extra)]);
            }
            hold if taken => {
                pool.requests += ask.extra[0];
                pool.tokens += ask.extra[1];
                pool.hold = hold;
                pool.until = until;
            }
            _ => {}
        }
        pool.read_until = now + self.hold_ms;
        pool.requests_tat = requests_tat;
        pool.tokens_tat = tokens_tat;
        pool.read_at = (redis_now, now);
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
        if let Some(at) = pool.lost.iter().position(|&lost| lost == lease) {
            pool.lost.swap_remove(at);
            return false;
        }
        if pool.slots.len() >= size.slots {
            return false;
        }
        pool.slots.push((lease, now));
        true
    }

    /// A settlement's corrections, kept with what the pool holds and given
    /// back with it: `requests` given back (1 for an unused grant), and
    /// `tokens` reserved but not used (below zero: used beyond the
    /// reservation).
    pub(super) fn correct(&self, tenant: usize, requests: i64, tokens: i64) {
        let (limits, size) = (&self.limits[tenant], self.sizes[tenant].unwrap_or_default());
        let mut pool = lock(&self.pools[tenant]);
        let pool = &mut *pool;
        // The pool holds no more than its share: the rest goes back.
        let add = |held: &mut i64, excess: &mut i64, by: i64, most: i64| {
            *held = held.saturating_add(by);
            if *held > most {
                *excess = excess.saturating_add(*held - most);
                *held = most;
            }
        };
        if limits.requests_per_minute.is_some() {
            add(
                &mut pool.requests,
                &mut pool.excess[0],
                requests,
                size.requests,
            );
        }
        if limits.tokens_per_minute.is_some() {
            add(&mut pool.tokens, &mut pool.excess[1], tokens, size.tokens);
        }
    }

    /// Drops slots Redis no longer holds (a failover to a replica that had
    /// not seen them, a key deleted): kept ones now, those of requests in
    /// flight when they end. Used again, they would run requests Redis
    /// does not count.
    pub(super) fn forget(&self, tenant: usize, lost: &[Lease]) {
        if self.sizes[tenant].is_none() {
            return;
        }
        let mut pool = lock(&self.pools[tenant]);
        // A lost slot not seen since the last renewal has ended already.
        pool.lost.clear();
        for lease in lost {
            match pool.slots.iter().position(|(kept, _)| kept == lease) {
                Some(at) => {
                    pool.slots.swap_remove(at);
                }
                None if !pool.lost.contains(lease) => pool.lost.push(*lease),
                None => {}
            }
        }
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
    /// it once stopped, or for a tenant that is not `up`) and what
    /// settlements gave back beyond the share, to be given back.
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
            let [requests, tokens] = std::mem::take(&mut pool.excess);
            out.requests = requests;
            out.tokens = tokens;
            out.releases = std::mem::take(&mut pool.releases);
            if all || now >= pool.until {
                let left = [
                    std::mem::take(&mut pool.requests),
                    std::mem::take(&mut pool.tokens),
                ];
                match pool.hold.take() {
                    Some(hold) => out.releases.push((hold, left)),
                    None => {
                        out.requests += left[0];
                        out.tokens += left[1];
                    }
                }
            }
            let hold_ms = self.hold_ms;
            pool.slots.retain(|&(lease, kept)| {
                let stale = all || now >= kept + hold_ms;
                if stale {
                    out.slots.push(lease);
                }
                !stale
            });
            if out.requests != 0
                || out.tokens != 0
                || !out.releases.is_empty()
                || !out.slots.is_empty()
            {
                unused.push(out);
            }
        }
        unused
    }

    /// Holds whose release went unanswered: sent again with the next
    /// upkeep.
    pub(super) fn release_again(&self, tenant: usize, releases: Vec<(Lease, [i64; 2])>) {
        lock(&self.pools[tenant]).release_later(releases);
    }

    /// Stops taking ahead: what the pools hold goes back with the next
    /// [`Pools::unused`].
    pub(super) fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// How often the pools are looked at for what to give back, and what
    /// their settlements owe is sent.
    pub(super) fn tick(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.hold_ms / 4000.0)
    }
}

/// The most releases a pool keeps for the next upkeep: a Redis that
/// answers its probes but fails admissions (a key an operator broke) adds
/// one or two an ask; past this the oldest go, and Redis counts their
/// holds used whole at their expiry.
const MOST_RELEASES: usize = 64;

impl Pool {
    /// Keeps `releases` for the next upkeep, the oldest dropped past
    /// [`MOST_RELEASES`].
    fn release_later(&mut self, releases: impl IntoIterator<Item = (Lease, [i64; 2])>) {
        self.releases.extend(releases);
        let over = self.releases.len().saturating_sub(MOST_RELEASES);
        self.releases.drain(..over);
    }

    /// The headers' view: Redis's TATs at the last read, less what the
    /// pool still holds (this instance may yet admit it).
    fn state(&self, limits: &TenantLimits, now: f64) -> RateLimitState {
        let redis_now = self.read_at.0 + (now - self.read_at.1);
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
            Pools::new(lease, Duration::from_millis(50), &config.tenants),
            config.tenants[0].limits.clone(),
        )
    }

    #[test]
    fn a_burst_asks_for_one_share_not_one_each() {
        let (pools, limits) = pools("{ requests_per_minute: 100, tokens_per_minute: 5000 }");
        let first = pools.ask(0, 0.0);
        assert_eq!((first.extra, first.back), ([10, 500], [0, 0]));
        assert!(first.release.is_none() && first.hold.is_some());
        let held = first.hold;
        let second = pools.ask(0, 0.0);
        assert_eq!(
            (second.extra, second.back),
            ([0, 0], [0, 0]),
            "the first is on its way"
        );
        let view = pools.answered((first, true), &limits, [0.0; 3], 0.0);
        assert!(view.requests.is_some() && view.tokens.is_some());
        assert!(pools.take(0, &limits, 100, 1.0).is_some());
        // The settlement gives 30 of its 100 tokens back to the pool.
        pools.correct(0, 0, 30);
        // One that the pool cannot admit hands back what it holds and asks
        // for a share anew; gone before its answer, the next may ask.
        assert!(pools.take(0, &limits, 1000, 2.0).is_none());
        let gone = pools.ask(0, 2.0);
        assert_eq!((gone.extra, gone.back), ([10, 500], [9, 430]));
        assert_eq!(gone.release, held, "what is left goes back from its hold");
        let asked = gone.hold.unwrap();
        drop(gone);
        let next = pools.ask(0, 3.0);
        assert_eq!(
            (next.extra, next.back, next.release),
            ([10, 500], [0, 0], None),
            "given back once"
        );
        // Redis may or may not have seen the ask that went unanswered: both
        // holds it named are released with the next upkeep.
        let unused = pools.unused(4.0, |_| true);
        assert_eq!(
            unused[0].releases,
            [(held.unwrap(), [9, 430]), (asked, [10, 500])]
        );
    }

    #[test]
    fn a_pool_admits_what_it_holds_for_the_lease_and_gives_back_the_rest() {
        let (pools, limits) = pools("{ requests_per_minute: 100, max_concurrent: 20 }");
        let ask = pools.ask(0, 0.0);
        let hold = ask.hold.unwrap();
        pools.answered((ask, true), &limits, [0.0; 3], 5.0);
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
        // The kept slot outlives the requests' lease: a request Redis
        // decides takes it as its own.
        let unused = pools.unused(1200.0, |_| true);
        assert_eq!((unused[0].requests, unused[0].slots.len()), (0, 0));
        assert_eq!(unused[0].releases, [(hold, [8, 0])], "held from the ask");
        assert_eq!(pools.kept_slot(0), Some(slots[0]));
        assert!(pools.keep(0, slots[0], 1300.0));
        assert_eq!(pools.unused(2300.0, |_| true)[0].slots, [slots[0]]);
        // A slot Redis lost is forgotten.
        assert!(pools.keep(0, slots[1], 2400.0));
        pools.forget(0, &[slots[1]]);
        assert_eq!(pools.kept_slot(0), None);
        // Stopped, it takes nothing ahead and gives back everything.
        assert!(pools.keep(0, slots[1], 2500.0));
        pools.stop();
        assert_eq!(pools.ask(0, 2500.0).extra, [0, 0]);
        assert!(!pools.keep(0, slots[2], 2500.0));
        assert_eq!(pools.unused(2500.0, |_| true)[0].slots, [slots[1]]);
    }

    #[test]
    fn quota_that_comes_after_its_lease_is_given_back_unused() {
        let (pools, limits) = pools("{ requests_per_minute: 100 }");
        let ask = pools.ask(0, 0.0);
        let hold = ask.hold.unwrap();
        // A slow Redis: the answer comes a lease after the ask.
        pools.answered((ask, true), &limits, [0.0; 3], 1000.0);
        assert!(pools.take(0, &limits, 1, 1000.0).is_none());
        let unused = pools.unused(1000.0, |_| true);
        assert_eq!(unused[0].releases, [(hold, [10, 0])]);
    }

    #[test]
    fn releases_kept_for_the_upkeep_are_bounded() {
        let (pools, _) = pools("{ requests_per_minute: 100 }");
        for _ in 0..100 {
            drop(pools.ask(0, 0.0));
        }
        let unused = pools.unused(0.0, |_| true);
        assert_eq!(unused[0].releases.len(), MOST_RELEASES);
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
