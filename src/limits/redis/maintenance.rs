//! The store's upkeep in the background: connecting at start-up, probing
//! Redis for the tenants it stopped answering for, paying what is owed to it
//! once it answers (with what ended processes left owing), renewing the
//! leases this instance holds, giving back quota taken ahead and not used.

use super::{RedisStore, PROBE_EVERY, RENEW_EVERY};
use std::time::Duration;

/// How often the debts of ended processes are looked for.
const LOOK_FOR_DEBTS_EVERY: Duration = Duration::from_secs(5);

/// The store's upkeep: probes Redis while it is down, flushes what is owed
/// to it, renews this instance's leases (run as a background service).
pub struct RedisMaintenance {
    store: RedisStore,
}

impl RedisMaintenance {
    /// Maintenance for `store`.
    pub fn new(store: RedisStore) -> Self {
        RedisMaintenance { store }
    }
}

impl RedisMaintenance {
    /// Runs for the process's life: through its grace period too (the
    /// requests still running settle then, and hold leases), until its
    /// runtime stops and drops it, when what is still owed is written down
    /// a last time.
    pub async fn run(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        // What ended processes left is counted from the first request (the
        // budgets), and what this one owes is written down as it is owed,
        // whatever Redis's calls wait for (to the end: the task is dropped
        // with the runtime, not before).
        self.store.take_over_debts();
        let _writer = tokio::spawn(self.store.clone().write_down_as_owed());
        let stopping = tokio::select! {
            _ = self.store.connect() => false,
            _ = shutdown.changed() => true,
        };
        self.serve(&mut shutdown, stopping).await;
    }

    /// The upkeep, for as long as the process runs; once `shutdown` turns
    /// true (`stopping`), said once if anything is owed.
    async fn serve(&self, shutdown: &mut tokio::sync::watch::Receiver<bool>, mut stopping: bool) {
        let mut probe = tokio::time::interval(PROBE_EVERY);
        let mut renew = tokio::time::interval(RENEW_EVERY);
        // Without `redis.lease` the pools' branch never runs.
        let pooled = self.store.pool_tick();
        let mut pools = tokio::time::interval(pooled.unwrap_or(RENEW_EVERY));
        if stopping {
            self.store.stop_pooling().await;
        }
        // Those left before this process started were taken in `run`; a
        // reload's predecessor ends a grace period after this one started.
        let first = tokio::time::Instant::now() + LOOK_FOR_DEBTS_EVERY;
        let mut debts = tokio::time::interval_at(first, LOOK_FOR_DEBTS_EVERY);
        // Owed as the process began to stop, and not paid yet.
        let mut owed_at_stop = stopping && self.store.say_what_is_owed_at_stop();
        loop {
            tokio::select! {
                _ = debts.tick(), if !stopping => self.store.take_over_debts(),
                _ = probe.tick() => {
                    if !self.store.is_up() {
                        self.store.probe().await;
                    }
                    // For the tenants Redis answers for (all but those of a
                    // cluster primary that is down).
                    self.store.flush_pending().await;
                    if owed_at_stop && self.store.owes_nothing() {
                        owed_at_stop = false;
                        tracing::info!("paid Redis what was owed before stopping");
                    }
                }
                _ = renew.tick() => self.store.renew_leases().await,
                _ = pools.tick(), if pooled.is_some() => self.store.pool_upkeep().await,
                _ = shutdown.changed(), if !stopping => {
                    stopping = true;
                    self.store.stop_pooling().await;
                    self.store.flush_pending().await;
                    owed_at_stop = self.store.say_what_is_owed_at_stop();
                }
            }
        }
    }
}
