//! The store's upkeep in the background: connecting at start-up, probing
//! Redis for the tenants it stopped answering for, paying what is owed to it
//! once it answers (with what ended processes left owing), renewing the
//! leases this instance holds.

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
    /// Runs until `shutdown` turns true, then pays what is owed while the
    /// process drains.
    pub async fn run(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        // What ended processes left is counted from the first request (the
        // budgets), and what this one owes is written down as it is owed,
        // whatever Redis's calls wait for.
        self.store.take_over_debts();
        let writer = tokio::spawn(self.store.clone().write_down_as_owed());
        let stopping = tokio::select! {
            _ = self.store.connect() => false,
            _ = shutdown.changed() => true,
        };
        if !stopping {
            self.serve(&mut shutdown).await;
        }
        self.store.pay_before_exit().await;
        writer.abort();
    }

    /// The upkeep until `shutdown` turns true.
    async fn serve(&self, shutdown: &mut tokio::sync::watch::Receiver<bool>) {
        let mut probe = tokio::time::interval(PROBE_EVERY);
        let mut renew = tokio::time::interval(RENEW_EVERY);
        // Those left before this process started were taken in `run`; a
        // reload's predecessor ends a grace period after this one started.
        let first = tokio::time::Instant::now() + LOOK_FOR_DEBTS_EVERY;
        let mut debts = tokio::time::interval_at(first, LOOK_FOR_DEBTS_EVERY);
        loop {
            tokio::select! {
                _ = debts.tick() => self.store.take_over_debts(),
                _ = probe.tick() => {
                    if !self.store.is_up() {
                        self.store.probe().await;
                    }
                    // For the tenants Redis answers for (all but those of a
                    // cluster primary that is down).
                    self.store.flush_pending().await;
                }
                _ = renew.tick() => self.store.renew_leases().await,
                _ = shutdown.changed() => return,
            }
        }
    }
}
