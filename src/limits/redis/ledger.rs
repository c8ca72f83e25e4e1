//! What this instance owes Redis: usage recorded while it was down, leases
//! to release, and settlement batches it may not have applied, each sent
//! again under its own number until Redis confirms it.

use super::debts::Debt;
use super::scripts::{usage_ttl_seconds, REFUSED, SETTLE, SETTLED_TTL_MS};
use super::{Keys, Lease, SettleOp};
use crate::limits::PeriodUsage;
use crate::lock;
use crate::metrics;
use redis::Script;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use tracing::warn;

/// A settlement batch Redis may not have applied (its answer never came),
/// or usage it never got: sent by the flush, under the same number each time,
/// until Redis confirms it.
#[derive(Debug, Clone)]
pub(super) struct Unsettled {
    /// The batch's number among this instance's for the tenant (see
    /// [`Keys::settled`]).
    pub(super) batch: u64,
    pub(super) tenant: usize,
    pub(super) period_id: String,
    pub(super) rpm: u64,
    pub(super) tpm: u64,
    /// (request delta, token delta) per settlement, in order.
    pub(super) corrections: Vec<(i64, i64)>,
    pub(super) leases: Vec<Lease>,
    pub(super) usage: PeriodUsage,
    /// A send of it went unanswered: Redis may have applied it, so it is
    /// only ever sent again under its number, never owed anew.
    pub(super) uncertain: bool,
}

impl Unsettled {
    /// The batch for settlements that share a script call, numbered
    /// among the tenant's (`keys`).
    pub(super) fn from_ops(keys: &Keys, ops: &[SettleOp]) -> Self {
        let first = &ops[0];
        let mut usage = PeriodUsage::default();
        for op in ops {
            usage.add(&op.usage);
        }
        Unsettled {
            batch: keys.new_batch(),
            tenant: first.tenant,
            period_id: first.period_id.to_string(),
            rpm: first.rpm,
            tpm: first.tpm,
            corrections: ops
                .iter()
                .map(|op| (op.request_delta, op.token_delta))
                .filter(|&c| c != (0, 0))
                .collect(),
            leases: ops.iter().filter_map(|op| op.lease).collect(),
            usage,
            uncertain: false,
        }
    }

    /// The [`SETTLE`] call for this batch: by hash (`EVALSHA`) on the hot
    /// path, whole (`EVAL`) from the flush, which may follow a Redis restart.
    pub(super) fn command(&self, keys: &Keys, script: &Script, by_hash: bool) -> redis::Cmd {
        // Sized up front: grown argument by argument, the command's two
        // vectors were reallocated a dozen times.
        let (corrections, leases) = (self.corrections.len(), self.leases.len());
        let mut cmd = redis::Cmd::with_capacity(
            20 + 2 * corrections + leases,
            if by_hash { 0 } else { SETTLE.len() } + 400 + 40 * corrections + 34 * leases,
        );
        if by_hash {
            cmd.arg("EVALSHA").arg(script.get_hash());
        } else {
            cmd.arg("EVAL").arg(SETTLE);
        }
        let (settled, bit) = keys.settled(self.batch);
        cmd.arg(4)
            .arg(&keys.rate)
            .arg(&keys.inflight)
            .arg(keys.usage(&self.period_id))
            .arg(settled)
            .arg(self.rpm)
            .arg(self.tpm)
            .arg(usage_ttl_seconds(&self.period_id))
            .arg(bit)
            .arg(SETTLED_TTL_MS)
            .arg(self.usage.requests)
            .arg(self.usage.prompt_tokens)
            .arg(self.usage.completion_tokens)
            .arg(self.usage.cost_pusd)
            .arg(self.usage.estimated_requests)
            .arg(self.usage.cache_hits)
            .arg(self.usage.cache_saved_pusd)
            .arg(corrections);
        for (requests, tokens) in &self.corrections {
            cmd.arg(requests).arg(tokens);
        }
        for lease in &self.leases {
            cmd.arg(lease);
        }
        cmd
    }
}

/// What this instance owes Redis: usage recorded while it was down, leases
/// to release, and settlement batches it may not have applied. Shared by
/// the store and its batching task; the flush pays it once Redis answers.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// Usage recorded while Redis was down, per (tenant, period): never
    /// sent, so it is given a number when the flush first sends it.
    pub(super) pending: Pending,
    /// Leases whose release could not be sent (Redis down or frozen at
    /// settlement, an admission that timed out, a request that panicked),
    /// so a tenant does not lose those slots until the leases expire.
    pub(super) unreleased: Vec<(usize, Lease)>,
    /// Batches sent whose answer never came: sent again under their number.
    pub(super) unsettled: Vec<Unsettled>,
    /// (tenant, period) whose settlements Redis refuses, said once each.
    pub(super) refusals: HashSet<(usize, String)>,
    /// What ended processes owed Redis, taken over from their debt files.
    pub(super) adopted: Vec<Debt>,
    /// Batches and debts the flush has sent and awaits Redis's answer for.
    pub(super) sending: Vec<Unsettled>,
    pub(super) paying: Vec<Debt>,
    /// Tenants whose usage was kept because Redis was away (said when the
    /// flush pays it), not only owed with `redis.lease`.
    pub(super) outage: HashSet<usize>,
}

/// Usage owed and never sent, per tenant and period (a tenant has one
/// period at a time, two at a month's turn), found without building a key:
/// `redis.lease` adds to it at every settlement.
#[derive(Debug, Default)]
pub(super) struct Pending(BTreeMap<usize, Vec<(String, PeriodUsage)>>);

impl Pending {
    /// What is owed for `tenant`'s period `period_id`.
    pub(super) fn get(&self, tenant: usize, period_id: &str) -> Option<&PeriodUsage> {
        let periods = self.0.get(&tenant)?;
        (periods.iter().find(|(period, _)| period == period_id)).map(|(_, usage)| usage)
    }

    /// Owes `usage` for `tenant`'s period `period_id`.
    pub(super) fn add(&mut self, tenant: usize, period_id: &str, usage: &PeriodUsage) {
        let periods = self.0.entry(tenant).or_default();
        match periods.iter_mut().find(|(period, _)| period == period_id) {
            Some((_, owed)) => owed.add(usage),
            None => periods.push((period_id.to_string(), usage.clone())),
        }
    }

    /// Whether nothing is owed.
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// What is owed, by tenant and period.
    pub(super) fn iter(&self) -> impl Iterator<Item = (usize, &str, &PeriodUsage)> {
        (self.0.iter()).flat_map(|(&tenant, periods)| {
            (periods.iter()).map(move |(period, usage)| (tenant, period.as_str(), usage))
        })
    }

    /// Takes all that is owed, by tenant and period.
    pub(super) fn drain(&mut self) -> impl Iterator<Item = (usize, String, PeriodUsage)> {
        (std::mem::take(&mut self.0).into_iter()).flat_map(|(tenant, periods)| {
            (periods.into_iter()).map(move |(period, usage)| (tenant, period, usage))
        })
    }
}

/// Whether `error` is [`SETTLE`]'s refusal of a batch (Redis wrote none of
/// it), not a failure to reach Redis.
pub(super) fn refused(error: &redis::RedisError) -> bool {
    error.code() == Some(REFUSED)
}

impl Ledger {
    /// A batch Redis refused, writing none of it (`op` is where it was
    /// sent): its usage goes back to what is owed for its period and its
    /// leases to those to release, so a key that stays wrong costs one
    /// entry per tenant and period, not one per batch (its limit
    /// corrections are let go: the GCRA state is soft and ages out). Said
    /// once per tenant and period until a batch of theirs is applied again;
    /// counted each time.
    pub(super) fn refuse(&mut self, batch: Unsettled, op: &'static str, error: &str) {
        metrics::REDIS_ERRORS.with_label_values(&[op]).inc();
        if self
            .refusals
            .insert((batch.tenant, batch.period_id.clone()))
        {
            warn!(tenant = batch.tenant, period = %batch.period_id, error = %crate::redis_conn::scrub(error), "Redis refuses this tenant's settlements (a key holds what it should not); they are kept and sent again until Redis takes them");
        }
        if batch.uncertain {
            // An earlier send may yet count (a copy refused now for its
            // record key, an original still on its way): only its number
            // can say, so it keeps it.
            self.unsettled.push(batch);
            return;
        }
        self.pending
            .add(batch.tenant, &batch.period_id, &batch.usage);
        self.unreleased
            .extend(batch.leases.into_iter().map(|lease| (batch.tenant, lease)));
    }

    /// A batch whose send went unanswered: Redis may have applied it, so
    /// it is kept to be sent again under its number (Redis counts it once).
    pub(super) fn unanswered(&mut self, batch: Unsettled) {
        self.unsettled.push(Unsettled {
            uncertain: true,
            ..batch
        });
    }

    /// Spend owed for a tenant's period that Redis has not counted, in
    /// pUSD: counted against the budget by the admissions Redis decides,
    /// which see only Redis's own. All that is owed while Redis refuses the
    /// tenant's settlements; otherwise what was never sent (owed with
    /// `redis.lease`, or kept through an outage): a batch sent and not yet
    /// answered may have counted already.
    pub(super) fn uncounted_spend(&self, tenant: usize, period_id: &str) -> u64 {
        if !self.refusals.is_empty() && self.refusals.contains(&(tenant, period_id.to_string())) {
            return self.owed_spend(tenant, period_id).max(0) as u64;
        }
        if self.pending.is_empty() && self.unsettled.is_empty() {
            return 0;
        }
        let pending = self
            .pending
            .get(tenant, period_id)
            .map_or(0, |u| u.cost_pusd);
        let unsent: i64 = (self.unsettled.iter())
            .filter(|u| !u.uncertain && u.tenant == tenant && u.period_id == period_id)
            .map(|u| u.usage.cost_pusd)
            .sum();
        (pending + unsent).max(0) as u64
    }

    /// A batch of `tenant`'s period was applied: a refusal is said again if
    /// one comes.
    pub(super) fn applied(&mut self, tenant: usize, period_id: &str) {
        if !self.refusals.is_empty() {
            self.refusals.remove(&(tenant, period_id.to_string()));
        }
    }

    /// Gives the usage recorded while Redis was down its batch number, so
    /// that it is sent (and written down) under that number only: added to
    /// the batch of its tenant and period numbered earlier and never sent,
    /// if there is one, so an outage leaves one batch per tenant and period.
    pub(super) fn number_pending(&mut self, keys: &[Keys]) {
        let Ledger {
            pending, unsettled, ..
        } = self;
        for (tenant, period_id, usage) in pending.drain() {
            let unsent = unsettled.iter_mut().find(|u| {
                !u.uncertain
                    && u.tenant == tenant
                    && u.period_id == period_id
                    && u.corrections.is_empty()
                    && u.leases.is_empty()
            });
            match unsent {
                Some(batch) => batch.usage.add(&usage),
                None => unsettled.push(Unsettled {
                    batch: keys[tenant].new_batch(),
                    tenant,
                    period_id,
                    rpm: 0,
                    tpm: 0,
                    corrections: Vec::new(),
                    leases: Vec::new(),
                    usage,
                    uncertain: false,
                }),
            }
        }
    }

    /// Spend owed for a tenant's period (pending, unconfirmed, or taken
    /// over from an ended process), in pUSD.
    pub(super) fn owed_spend(&self, tenant: usize, period_id: &str) -> i64 {
        let pending = self
            .pending
            .get(tenant, period_id)
            .map_or(0, |u| u.cost_pusd);
        let unsettled: i64 = (self.unsettled.iter().chain(&self.sending))
            .filter(|u| u.tenant == tenant && u.period_id == period_id)
            .map(|u| u.usage.cost_pusd)
            .sum();
        let adopted: i64 = (self.adopted.iter().chain(&self.paying))
            .filter(|d| d.tenant == Some(tenant) && d.owed.period == period_id)
            .map(|d| d.owed.cost_pusd)
            .sum();
        pending + unsettled + adopted
    }
}

/// The store's state shared with its batching task.
#[derive(Debug)]
pub(super) struct Shared {
    /// Per tenant: whether Redis answered its last call. On a cluster a
    /// tenant's keys live on one primary, so one primary down takes only its
    /// tenants to in-process limits. All start down until Redis answers.
    pub(super) up: Vec<AtomicBool>,
    pub(super) ledger: Mutex<Ledger>,
    /// Told each time a settlement is kept for the flush.
    pub(super) deferred: tokio::sync::Notify,
}

impl Shared {
    /// State for `tenants` tenants, all down until Redis first answers.
    pub(super) fn new(tenants: usize) -> Self {
        Shared {
            up: (0..tenants).map(|_| AtomicBool::new(false)).collect(),
            ledger: Mutex::default(),
            deferred: tokio::sync::Notify::new(),
        }
    }

    /// Whether `tenant`'s keys answered their last call.
    pub(super) fn is_up(&self, tenant: usize) -> bool {
        self.up
            .get(tenant)
            .is_some_and(|up| up.load(Ordering::Relaxed))
    }

    /// Whether every tenant's keys answer (what `/ready` and
    /// `runestone_redis_up` report).
    pub(super) fn all_up(&self) -> bool {
        self.up.iter().all(|up| up.load(Ordering::Relaxed))
    }

    /// Counts a failed call and marks `tenant` (every tenant for `None`)
    /// down.
    pub(super) fn failed(&self, tenant: Option<usize>, op: &'static str, error: &str) {
        metrics::REDIS_ERRORS.with_label_values(&[op]).inc();
        let was_up = self.all_up();
        let marked = match tenant {
            Some(t) => self
                .up
                .get(t)
                .is_some_and(|up| up.swap(false, Ordering::Relaxed)),
            None => self
                .up
                .iter()
                .fold(false, |any, up| up.swap(false, Ordering::Relaxed) | any),
        };
        if marked {
            metrics::REDIS_UP.set(0);
        }
        if marked && was_up {
            warn!(op, error = %error, "Redis unavailable; limits fall back to in-process counters and spend is kept locally");
        }
    }

    /// Marks `tenant` (every tenant for `None`) up after Redis answered;
    /// whether that made every tenant up again.
    pub(super) fn recovered(&self, tenant: Option<usize>) -> bool {
        let was_up = self.all_up();
        match tenant {
            Some(t) => {
                if let Some(up) = self.up.get(t) {
                    up.store(true, Ordering::Relaxed);
                }
            }
            None => self
                .up
                .iter()
                .for_each(|up| up.store(true, Ordering::Relaxed)),
        }
        let now_up = self.all_up();
        if now_up {
            metrics::REDIS_UP.set(1);
        }
        now_up && !was_up
    }

    /// Owes a settlement's usage to Redis without an outage (`redis.lease`):
    /// kept for the flush as [`Shared::defer`] keeps it, without saying
    /// Redis was away when it is paid.
    pub(super) fn owe(&self, tenant: usize, period_id: &str, usage: &PeriodUsage) {
        if *usage == PeriodUsage::default() {
            return;
        }
        lock(&self.ledger).pending.add(tenant, period_id, usage);
        self.deferred.notify_one();
    }

    /// Keeps a settlement that is not sent now for the flush: its usage
    /// summed per period, its lease to release.
    pub(super) fn defer(
        &self,
        tenant: usize,
        period_id: &str,
        lease: Option<Lease>,
        usage: &PeriodUsage,
    ) {
        let mut ledger = lock(&self.ledger);
        ledger.outage.insert(tenant);
        if let Some(lease) = lease {
            ledger.unreleased.push((tenant, lease));
        }
        if *usage != PeriodUsage::default() {
            ledger.pending.add(tenant, period_id, usage);
        }
        drop(ledger);
        self.deferred.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(request_delta: i64, token_delta: i64, lease: Option<u128>, cost: i64) -> SettleOp {
        SettleOp {
            tenant: 0,
            period_id: "2026-12".into(),
            rpm: 60,
            tpm: 1000,
            request_delta,
            token_delta,
            lease: lease.map(|id| Lease(id.to_be_bytes())),
            usage: PeriodUsage {
                requests: u64::from(request_delta == 0),
                prompt_tokens: 3,
                completion_tokens: 4,
                cost_pusd: cost,
                ..PeriodUsage::default()
            },
            reply: tokio::sync::oneshot::channel().0,
        }
    }

    fn keys() -> Keys {
        Keys {
            rate: "p:{t}:rate".into(),
            inflight: "p:{t}:inflight".into(),
            holds: "p:{t}:holds".into(),
            usage_prefix: "p:{t}:usage:".into(),
            settled_prefix: "p:{t}:settled:i1:".into(),
            next_batch: std::sync::atomic::AtomicU64::new(0),
        }
    }

    #[test]
    fn a_batch_sums_usage_and_keeps_each_correction_and_lease() {
        let keys = keys();
        let batch = Unsettled::from_ops(
            &keys,
            &[
                op(0, -5, Some(1), 10),
                op(0, 0, None, 20),
                op(-1, -100, Some(3), 0),
            ],
        );
        assert_eq!(batch.usage.requests, 2);
        assert_eq!(batch.usage.cost_pusd, 30);
        assert_eq!(
            batch.corrections,
            [(0, -5), (-1, -100)],
            "no-op corrections are left out"
        );
        assert_eq!(
            batch.leases,
            [Lease(1_u128.to_be_bytes()), Lease(3_u128.to_be_bytes())]
        );
        assert_eq!(batch.batch, 0);
        assert_eq!(Unsettled::from_ops(&keys, &[op(0, 0, None, 0)]).batch, 1);
    }

    #[test]
    fn a_batch_is_sent_with_its_record_whole_or_by_hash() {
        let keys = keys();
        keys.next_batch
            .store(65_538, std::sync::atomic::Ordering::Relaxed);
        let batch = Unsettled::from_ops(&keys, &[op(0, -5, Some(1), 10)]);
        let script = Script::new(SETTLE);
        let args = |cmd: &redis::Cmd| -> Vec<String> {
            cmd.args_iter()
                .map(|a| match a {
                    redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                    _ => String::new(),
                })
                .collect()
        };
        let by_hash = args(&batch.command(&keys, &script, true));
        assert_eq!(by_hash[0], "EVALSHA");
        assert_eq!(
            by_hash[2..7],
            [
                "4",
                "p:{t}:rate",
                "p:{t}:inflight",
                "p:{t}:usage:2026-12",
                "p:{t}:settled:i1:1"
            ],
            "the batch's block of 65,536"
        );
        assert_eq!(by_hash[10], "2", "the batch's bit in its block");
        assert_eq!(by_hash[15], "10", "the summed cost");
        assert_eq!(by_hash[16], "0", "no request counted by the gateway");
        assert_eq!(by_hash[17..19], ["0", "0"], "no cache hits, nothing saved");
        assert_eq!(
            by_hash[19..],
            ["1", "0", "-5", &format!("{:032x}", 1)],
            "one correction, one lease, as 32 hex digits"
        );
        let whole = args(&batch.command(&keys, &script, false));
        assert_eq!((whole[0].as_str(), whole[1].as_str()), ("EVAL", SETTLE));
        assert_eq!(whole[2..], by_hash[2..], "the same arguments either way");
    }

    #[test]
    fn a_refused_batch_is_owed_again_once_per_period() {
        let keys = keys();
        let mut ledger = Ledger::default();
        for _ in 0..3 {
            let batch =
                Unsettled::from_ops(&keys, &[op(0, -5, Some(1), 10), op(0, 0, Some(2), 20)]);
            ledger.refuse(
                batch,
                "settle",
                "REFUSED p:{t}:usage:2026-12 cost_pusd holds 007",
            );
        }
        assert_eq!(
            ledger.pending.iter().count(),
            1,
            "one entry per tenant and period"
        );
        let owed = ledger.pending.get(0, "2026-12").unwrap();
        assert_eq!((owed.requests, owed.cost_pusd), (6, 90));
        assert_eq!(ledger.unreleased.len(), 6, "every lease is released");
        assert!(ledger.unsettled.is_empty(), "nothing of it was applied");
        assert_eq!(ledger.refusals.len(), 1);
        ledger.applied(0, "2026-12");
        assert!(ledger.refusals.is_empty(), "said again if it comes again");
    }

    #[test]
    fn a_refused_batch_that_may_have_counted_keeps_its_number() {
        let keys = keys();
        let mut ledger = Ledger::default();
        let mut batch = Unsettled::from_ops(&keys, &[op(0, 0, Some(1), 10)]);
        batch.uncertain = true;
        let number = batch.batch;
        ledger.refuse(batch, "flush", "REFUSED WRONGTYPE");
        assert!(ledger.pending.is_empty(), "not owed anew");
        assert_eq!(ledger.unsettled.len(), 1);
        assert_eq!(ledger.unsettled[0].batch, number, "sent again as itself");
        assert_eq!(ledger.uncounted_spend(0, "2026-12"), 10);
        assert_eq!(ledger.uncounted_spend(0, "2026-11"), 0);
        assert_eq!(ledger.uncounted_spend(1, "2026-12"), 0);
    }

    #[test]
    fn an_outage_leaves_one_unsent_batch_per_tenant_and_period() {
        let keys = [keys(), keys()];
        let mut ledger = Ledger::default();
        let owe = |ledger: &mut Ledger, tenant: usize, period: &str, cost: i64| {
            let usage = PeriodUsage {
                requests: 1,
                cost_pusd: cost,
                ..PeriodUsage::default()
            };
            ledger.pending.add(tenant, period, &usage);
        };
        owe(&mut ledger, 0, "2026-12", 5);
        ledger.number_pending(&keys);
        owe(&mut ledger, 0, "2026-12", 7);
        owe(&mut ledger, 1, "2026-12", 1);
        owe(&mut ledger, 0, "2026-11", 2);
        ledger.number_pending(&keys);
        assert!(ledger.pending.is_empty());
        let mut numbered: Vec<(usize, &str, u64, i64)> = (ledger.unsettled.iter())
            .map(|u| (u.tenant, &*u.period_id, u.usage.requests, u.usage.cost_pusd))
            .collect();
        numbered.sort();
        assert_eq!(
            numbered,
            [
                (0, "2026-11", 1, 2),
                (0, "2026-12", 2, 12),
                (1, "2026-12", 1, 1)
            ]
        );
        // A batch that was sent (it may have counted) is added to no more.
        ledger.unsettled.iter_mut().for_each(|u| u.uncertain = true);
        owe(&mut ledger, 1, "2026-12", 3);
        ledger.number_pending(&keys);
        assert_eq!(ledger.unsettled.len(), 4);
        assert_eq!(ledger.owed_spend(1, "2026-12"), 4);
    }

    #[test]
    fn owed_spend_counts_pending_and_unconfirmed_batches_of_the_period() {
        let mut ledger = Ledger::default();
        ledger.pending.add(
            0,
            "2026-12",
            &PeriodUsage {
                cost_pusd: 7,
                ..PeriodUsage::default()
            },
        );
        ledger
            .unsettled
            .push(Unsettled::from_ops(&keys(), &[op(0, 0, None, 100)]));
        let debt = |tenant: Option<usize>, period: &str| Debt {
            tenant,
            script: "return 1".into(),
            owed: super::super::debts::Written {
                tenant: "acme".into(),
                period: period.into(),
                cost_pusd: 1000,
                script: 0,
                keys: Vec::new(),
                args: Vec::new(),
            },
            refused: false,
        };
        // What an ended process owed, for this process's tenant 0 or for
        // a tenant it does not have.
        ledger.adopted.push(debt(Some(0), "2026-12"));
        ledger.adopted.push(debt(Some(0), "2026-11"));
        ledger.adopted.push(debt(None, "2026-12"));
        assert_eq!(ledger.owed_spend(0, "2026-12"), 1107);
        assert_eq!(ledger.owed_spend(0, "2026-11"), 1000);
        assert_eq!(ledger.owed_spend(1, "2026-12"), 0);
    }
}
