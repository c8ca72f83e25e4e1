//! The in-process limit store: exact within one gateway process, one small
//! mutex per tenant (no lock is shared between tenants), never held across
//! an await.

use super::{window, LimitKind, PeriodUsage, RateLimitState, Refusal};
use crate::config::TenantLimits;
use crate::gcra;
use std::sync::Mutex;

#[derive(Debug, Default)]
struct TenantState {
    requests_tat: f64,
    tokens_tat: f64,
    inflight: u32,
    /// Usage of the current period (its id): an older one is never read.
    usage: Option<(String, PeriodUsage)>,
    /// What the last reload handed the new process of that usage (`None`:
    /// nothing), so that what is settled after it is known
    /// ([`LocalStore::tail`]).
    handed: Option<(String, PeriodUsage)>,
}

impl TenantState {
    /// The usage of period `period_id`, when it is the current one.
    fn usage_in(&self, period_id: &str) -> Option<&PeriodUsage> {
        let (id, usage) = self.usage.as_ref()?;
        (id == period_id).then_some(usage)
    }
}

/// What a tenant's limits count that the in-process store does not hold
/// (while Redis is unavailable): the last known shared spend (pUSD), and
/// this instance's requests in flight that Redis admitted.
#[derive(Debug, Clone, Copy, Default)]
pub struct Elsewhere {
    /// Spend this store does not hold (pUSD).
    pub spent: i64,
    /// Requests in flight this store did not admit.
    pub held: u32,
}

/// Per-tenant limit state held in this process.
#[derive(Debug)]
pub struct LocalStore {
    tenants: Vec<Mutex<TenantState>>,
}

impl LocalStore {
    /// State for `tenants` tenants, all idle.
    pub fn new(tenants: usize) -> Self {
        LocalStore {
            tenants: (0..tenants).map(|_| Mutex::default()).collect(),
        }
    }

    fn state(&self, tenant: usize) -> std::sync::MutexGuard<'_, TenantState> {
        // A panic while holding the lock leaves consistent numbers behind:
        // every update below is a plain assignment.
        self.tenants[tenant]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Admits one request of `tokens` tokens, all limits or none, counting
    /// what is held `elsewhere` too.
    pub fn admit(
        &self,
        tenant: usize,
        limits: &TenantLimits,
        tokens: u64,
        period_id: &str,
        elsewhere: Elsewhere,
        now: f64,
    ) -> Result<RateLimitState, Refusal> {
        let mut state = self.state(tenant);
        let current = |state: &TenantState| RateLimitState {
            requests: limits
                .requests_per_minute
                .map(|rpm| window(state.requests_tat, now, u64::from(rpm))),
            tokens: limits
                .tokens_per_minute
                .map(|tpm| window(state.tokens_tat, now, tpm)),
        };
        let refuse = |limit, retry_after: Option<f64>, state: &TenantState| Refusal {
            limit,
            retry_after_ms: retry_after.map(|ms| ms.ceil() as u64),
            state: current(state),
        };

        if let Some(budget) = limits.budget {
            let spent = state.usage_in(period_id).map_or(0, |u| u.cost_pusd) + elsewhere.spent;
            if spent >= budget.amount_pusd {
                return Err(refuse(LimitKind::Budget, None, &state));
            }
        }
        let requests_tat = match limits.requests_per_minute {
            Some(rpm) => match gcra::take(state.requests_tat, now, f64::from(rpm), 1.0) {
                Ok(tat) => Some(tat),
                Err(wait) => return Err(refuse(LimitKind::Requests, Some(wait), &state)),
            },
            None => None,
        };
        let tokens_tat = match limits.tokens_per_minute {
            Some(tpm) => match gcra::take(state.tokens_tat, now, tpm as f64, tokens as f64) {
                Ok(tat) => Some(tat),
                Err(wait) => return Err(refuse(LimitKind::Tokens, Some(wait), &state)),
            },
            None => None,
        };
        if let Some(max) = limits.max_concurrent {
            if state.inflight.saturating_add(elsewhere.held) >= max {
                return Err(refuse(LimitKind::Concurrency, None, &state));
            }
            state.inflight += 1;
        }
        if let Some(tat) = requests_tat {
            state.requests_tat = tat;
        }
        if let Some(tat) = tokens_tat {
            state.tokens_tat = tat;
        }
        Ok(current(&state))
    }

    /// What this store decided that Redis does not know (it admits only
    /// while Redis is unavailable), for Redis to count once it is back: the
    /// requests in flight, and the requests and tokens TATs (Unix ms).
    pub fn outside_redis(&self, tenant: usize) -> [u64; 3] {
        let state = self.state(tenant);
        [
            u64::from(state.inflight),
            state.requests_tat as u64,
            state.tokens_tat as u64,
        ]
    }

    /// The tenant's requests and tokens TATs (Unix ms): how far into the
    /// future its minutes are taken, for a reload's new process.
    pub fn minutes(&self, tenant: usize) -> [f64; 2] {
        let state = self.state(tenant);
        [state.requests_tat, state.tokens_tat]
    }

    /// Counts the TATs a reload's predecessor handed over
    /// ([`LocalStore::minutes`]): each the later of its own and this
    /// store's.
    pub fn count_minutes(&self, tenant: usize, [requests_tat, tokens_tat]: [f64; 2]) {
        let mut state = self.state(tenant);
        state.requests_tat = state.requests_tat.max(requests_tat);
        state.tokens_tat = state.tokens_tat.max(tokens_tat);
    }

    /// Frees a concurrency slot taken by [`LocalStore::admit`].
    pub fn release(&self, tenant: usize) {
        let mut state = self.state(tenant);
        state.inflight = state.inflight.saturating_sub(1);
    }

    /// Frees the slot and corrects the reservation: the requests TAT by
    /// `request_delta` requests (-1 gives an unused request back) and the
    /// tokens TAT by the difference between real usage and reservation.
    pub fn settle_limits(
        &self,
        tenant: usize,
        limits: &TenantLimits,
        request_delta: i64,
        token_delta: i64,
        now: f64,
    ) {
        let mut state = self.state(tenant);
        if limits.max_concurrent.is_some() {
            state.inflight = state.inflight.saturating_sub(1);
        }
        if let Some(rpm) = limits.requests_per_minute.filter(|_| request_delta != 0) {
            state.requests_tat =
                gcra::shift(state.requests_tat, now, f64::from(rpm), request_delta);
        }
        if let Some(tpm) = limits.tokens_per_minute.filter(|_| token_delta != 0) {
            state.tokens_tat = gcra::shift(state.tokens_tat, now, tpm as f64, token_delta);
        }
    }

    /// Adds a finished request's usage to the period's counters.
    pub fn record(&self, tenant: usize, period_id: &str, usage: &PeriodUsage) {
        let mut state = self.state(tenant);
        match &mut state.usage {
            Some((id, counters)) if id == period_id => counters.add(usage),
            // A new period began: the old one is never read again.
            slot => *slot = Some((period_id.to_string(), usage.clone())),
        }
    }

    /// The period's counters, noted as handed to a reload's new process:
    /// what is settled after it is [`LocalStore::tail`].
    pub fn hand_over(&self, tenant: usize, period_id: &str) -> PeriodUsage {
        let mut state = self.state(tenant);
        let usage = state.usage_in(period_id).cloned().unwrap_or_default();
        state.handed = Some((period_id.to_string(), usage.clone()));
        usage
    }

    /// Notes that none of the tenant's usage was handed over after all
    /// (left out at the handover's bound).
    pub fn handed_none(&self, tenant: usize) {
        self.state(tenant).handed = None;
    }

    /// The usage settled since the last [`LocalStore::hand_over`] (all of
    /// it when it handed none of that period's), with its period's id;
    /// `None` when there is none.
    pub fn tail(&self, tenant: usize) -> Option<(String, PeriodUsage)> {
        let state = self.state(tenant);
        let (id, usage) = state.usage.as_ref()?;
        let tail = match &state.handed {
            Some((handed_id, handed)) if handed_id == id => usage.less(handed),
            _ => usage.clone(),
        };
        (tail != PeriodUsage::default()).then(|| (id.clone(), tail))
    }

    /// The period's counters.
    pub fn usage(&self, tenant: usize, period_id: &str) -> PeriodUsage {
        self.state(tenant)
            .usage_in(period_id)
            .cloned()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Budget, BudgetPeriod};

    /// Nothing held elsewhere.
    const NONE: Elsewhere = Elsewhere { spent: 0, held: 0 };

    fn limits() -> TenantLimits {
        TenantLimits {
            requests_per_minute: Some(5),
            tokens_per_minute: Some(1000),
            max_concurrent: Some(2),
            budget: Some(Budget {
                amount_pusd: 1000,
                period: BudgetPeriod::Daily,
            }),
        }
    }

    #[test]
    fn concurrency_slots_are_taken_and_released() {
        let store = LocalStore::new(1);
        let l = TenantLimits {
            max_concurrent: Some(2),
            ..TenantLimits::default()
        };
        assert!(store.admit(0, &l, 1, "p", NONE, 0.0).is_ok());
        assert!(store.admit(0, &l, 1, "p", NONE, 0.0).is_ok());
        let refusal = store.admit(0, &l, 1, "p", NONE, 0.0).unwrap_err();
        assert_eq!(refusal.limit, LimitKind::Concurrency);
        store.release(0);
        assert!(store.admit(0, &l, 1, "p", NONE, 0.0).is_ok());
    }

    #[test]
    fn a_refusal_reserves_nothing() {
        let store = LocalStore::new(1);
        let l = limits();
        // 900 tokens fit, then a 200-token request is refused by TPM ...
        assert!(store.admit(0, &l, 900, "p", NONE, 0.0).is_ok());
        let refusal = store.admit(0, &l, 200, "p", NONE, 0.0).unwrap_err();
        assert_eq!(refusal.limit, LimitKind::Tokens);
        // ... without having taken a request or a slot.
        let state = store.admit(0, &l, 100, "p", NONE, 0.0).unwrap();
        assert_eq!(state.requests.unwrap().remaining, 3);
    }

    #[test]
    fn settlement_refunds_and_charges_overruns() {
        let store = LocalStore::new(1);
        let l = TenantLimits {
            tokens_per_minute: Some(1000),
            ..TenantLimits::default()
        };
        store.admit(0, &l, 800, "p", NONE, 0.0).unwrap();
        store.settle_limits(0, &l, 0, -700, 0.0); // used 100
        let state = store.admit(0, &l, 850, "p", NONE, 0.0).unwrap();
        assert_eq!(state.tokens.unwrap().remaining, 50);
        store.settle_limits(0, &l, 0, 150, 0.0); // used 1000 of 850 reserved
        assert_eq!(
            store.admit(0, &l, 1, "p", NONE, 0.0).unwrap_err().limit,
            LimitKind::Tokens
        );
    }

    #[test]
    fn budget_refuses_once_spent_and_resets_with_the_period() {
        let store = LocalStore::new(1);
        let l = limits();
        store.record(
            0,
            "d1",
            &PeriodUsage {
                requests: 1,
                cost_pusd: 999,
                ..Default::default()
            },
        );
        assert!(store.admit(0, &l, 1, "d1", NONE, 0.0).is_ok());
        store.record(
            0,
            "d1",
            &PeriodUsage {
                requests: 1,
                cost_pusd: 1,
                ..Default::default()
            },
        );
        assert_eq!(
            store.admit(0, &l, 1, "d1", NONE, 0.0).unwrap_err().limit,
            LimitKind::Budget
        );
        assert!(store.admit(0, &l, 1, "d2", NONE, 0.0).is_ok(), "a new day");
        assert_eq!(
            store
                .admit(
                    0,
                    &l,
                    1,
                    "d2",
                    Elsewhere {
                        spent: 1000,
                        held: 0
                    },
                    0.0
                )
                .unwrap_err()
                .limit,
            LimitKind::Budget
        );
    }

    #[test]
    fn the_tail_is_what_was_settled_after_the_handover() {
        let store = LocalStore::new(1);
        let spent = |cost_pusd: i64| PeriodUsage {
            requests: 1,
            prompt_tokens: 7,
            cost_pusd,
            ..Default::default()
        };
        assert_eq!(store.tail(0), None, "nothing settled");
        store.record(0, "d1", &spent(10));
        assert_eq!(store.hand_over(0, "d1"), spent(10));
        assert_eq!(store.tail(0), None, "all of it handed");
        store.record(0, "d1", &spent(5));
        assert_eq!(store.tail(0), Some(("d1".into(), spent(5))));
        // Left out at the handover's bound: all of it goes with the tail.
        store.handed_none(0);
        let mut all = spent(10);
        all.add(&spent(5));
        assert_eq!(store.tail(0), Some(("d1".into(), all)));
        // Handed in one period, settled in the next: all of the next's.
        store.hand_over(0, "d1");
        store.record(0, "d2", &spent(3));
        assert_eq!(store.tail(0), Some(("d2".into(), spent(3))));
    }
}
