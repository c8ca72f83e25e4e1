//! The failure domains of one provider, each with its circuit breaker.
//!
//! A deployment is one provider model on one backend address. What the
//! provider answered (a 5xx, its own 429, a stall, a first-token timeout)
//! says something about that deployment only, so it feeds the deployment's
//! breaker and cool-down; one model's trouble never takes the provider's
//! other models out. What the network did (connection refused or reset, a
//! TLS failure) says something about the address, so it feeds the
//! address's transport breaker, which every deployment on that address
//! obeys. Pure bookkeeping: no I/O, unit-tested here.

use super::breaker::{Breaker, BreakerView, Outcome, Permit, Transition};
use crate::config::BreakerSettings;
use rustc_hash::FxHashMap as HashMap;
use std::net::SocketAddr;
use std::time::Instant;

/// Where an attempt's outcome counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// The backend address, for every deployment on it.
    Transport,
    /// The deployment alone.
    Deployment,
}

/// What both breakers allowed an attempt as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permits {
    /// The address's transport breaker.
    pub transport: Permit,
    /// The deployment's breaker.
    pub deployment: Permit,
}

/// A change worth logging: which breaker, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// The model slot, or `None` for the address's transport breaker.
    pub slot: Option<usize>,
    /// What happened.
    pub transition: Transition,
}

/// The breakers of one provider: per address, and per deployment.
#[derive(Debug, Default)]
pub struct Health {
    transport: HashMap<SocketAddr, Breaker>,
    deployments: HashMap<(usize, SocketAddr), Breaker>,
    /// The `runestone_circuit_state` value last published per address (the
    /// worst of its breakers).
    published: HashMap<SocketAddr, i64>,
}

impl Health {
    /// Whether deployment `slot` on `addr` could take an attempt now.
    pub fn available(&self, slot: usize, addr: SocketAddr, now: Instant) -> bool {
        self.transport.get(&addr).is_none_or(|b| b.available(now))
            && self
                .deployments
                .get(&(slot, addr))
                .is_none_or(|b| b.available(now))
    }

    /// Whether deployment `slot` on `addr` is healthy: its breakers let
    /// attempts through, cool-downs aside.
    pub fn healthy(&self, slot: usize, addr: SocketAddr, now: Instant) -> bool {
        self.transport.get(&addr).is_none_or(|b| b.healthy(now))
            && self
                .deployments
                .get(&(slot, addr))
                .is_none_or(|b| b.healthy(now))
    }

    /// Takes an attempt on deployment `slot` at `addr`, when both its
    /// breakers allow one.
    pub fn acquire(
        &mut self,
        slot: usize,
        addr: SocketAddr,
        now: Instant,
        settings: &BreakerSettings,
    ) -> Option<Permits> {
        if !self.available(slot, addr, now) {
            return None;
        }
        let transport = self
            .transport
            .entry(addr)
            .or_default()
            .acquire(now, settings)?;
        match self
            .deployments
            .entry((slot, addr))
            .or_default()
            .acquire(now, settings)
        {
            Some(deployment) => Some(Permits {
                transport,
                deployment,
            }),
            None => {
                // Give the transport permit back unused.
                self.transport.entry(addr).or_default().record(
                    transport,
                    Outcome::Neutral,
                    now,
                    settings,
                );
                None
            }
        }
    }

    /// Records an attempt's outcome for deployment (slot, address) where it
    /// counts: a success clears both
    /// breakers' failure counts, a failure or the provider's own 429 counts
    /// in `domain` only. Returns the transitions worth logging.
    pub fn record(
        &mut self,
        (slot, addr): (usize, SocketAddr),
        permits: Permits,
        outcome: Outcome,
        domain: Domain,
        now: Instant,
        settings: &BreakerSettings,
    ) -> Vec<Change> {
        let (transport_outcome, deployment_outcome) = match (outcome, domain) {
            (Outcome::Success | Outcome::Neutral, _) => (outcome, outcome),
            (_, Domain::Transport) => (outcome, Outcome::Neutral),
            (_, Domain::Deployment) => (Outcome::Neutral, outcome),
        };
        let mut changes = Vec::new();
        if let Some(transition) = self.transport.entry(addr).or_default().record(
            permits.transport,
            transport_outcome,
            now,
            settings,
        ) {
            changes.push(Change {
                slot: None,
                transition,
            });
        }
        if let Some(transition) = self.deployments.entry((slot, addr)).or_default().record(
            permits.deployment,
            deployment_outcome,
            now,
            settings,
        ) {
            changes.push(Change {
                slot: Some(slot),
                transition,
            });
        }
        changes
    }

    /// When deployment `slot` on `addr` may next be tried, if it cannot be
    /// now.
    pub fn next_chance(&self, slot: usize, addr: SocketAddr, now: Instant) -> Option<Instant> {
        let transport = self.transport.get(&addr).and_then(|b| b.next_chance(now));
        let deployment = self
            .deployments
            .get(&(slot, addr))
            .and_then(|b| b.next_chance(now));
        match (transport, deployment) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// The address's transport breaker, for `/ready`.
    pub fn transport_view(&self, addr: SocketAddr, now: Instant) -> BreakerView {
        self.transport
            .get(&addr)
            .map_or(BreakerView::default(), |b| b.view(now))
    }

    /// The deployments on `addr` that have a breaker, by slot, for `/ready`.
    pub fn deployment_views(&self, addr: SocketAddr, now: Instant) -> Vec<(usize, BreakerView)> {
        let mut views: Vec<(usize, BreakerView)> = self
            .deployments
            .iter()
            .filter(|((_, a), _)| *a == addr)
            .map(|((slot, _), b)| (*slot, b.view(now)))
            .collect();
        views.sort_by_key(|(slot, _)| *slot);
        views
    }

    /// The worst state of the address's breakers (its transport breaker and
    /// every deployment on it), when it differs from the one last
    /// published: `runestone_circuit_state` is written on changes only.
    pub fn unpublished_gauge(&mut self, addr: SocketAddr, now: Instant) -> Option<i64> {
        let worst = std::iter::once(self.transport_view(addr, now).gauge())
            .chain(
                self.deployments
                    .iter()
                    .filter(|((_, a), _)| *a == addr)
                    .map(|(_, b)| b.view(now).gauge()),
            )
            .max()
            .unwrap_or(0);
        (self.published.get(&addr) != Some(&worst)).then(|| {
            self.published.insert(addr, worst);
            worst
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            consecutive_failures: 2,
            ..BreakerSettings::default()
        }
    }

    fn addr(n: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], n))
    }

    fn fail(health: &mut Health, slot: usize, at: SocketAddr, domain: Domain, now: Instant) {
        let permits = health.acquire(slot, at, now, &settings()).unwrap();
        health.record(
            (slot, at),
            permits,
            Outcome::Failure,
            domain,
            now,
            &settings(),
        );
    }

    #[test]
    fn a_models_failures_open_its_deployment_only() {
        let (mut health, now, a) = (Health::default(), Instant::now(), addr(1));
        fail(&mut health, 0, a, Domain::Deployment, now);
        fail(&mut health, 0, a, Domain::Deployment, now);
        assert!(!health.available(0, a, now), "model 0 on a is open");
        assert!(
            health.available(1, a, now),
            "model 1 on the same backend is not"
        );
        assert_eq!(health.transport_view(a, now).state, "closed");
        assert_eq!(health.unpublished_gauge(a, now), Some(2), "the worst on a");
    }

    #[test]
    fn transport_failures_close_the_address_for_every_deployment() {
        let (mut health, now, a, b) = (Health::default(), Instant::now(), addr(1), addr(2));
        fail(&mut health, 0, a, Domain::Transport, now);
        fail(&mut health, 1, a, Domain::Transport, now);
        assert!(!health.available(0, a, now) && !health.available(1, a, now));
        assert!(
            health.available(0, b, now),
            "another address is not affected"
        );
        let soon = health.next_chance(1, a, now).unwrap();
        assert!(soon > now);
    }

    #[test]
    fn a_provider_429_cools_down_that_deployment_for_its_own_wait() {
        let (mut health, now, a) = (Health::default(), Instant::now(), addr(1));
        let permits = health.acquire(0, a, now, &settings()).unwrap();
        let wait = Duration::from_millis(500);
        health.record(
            (0, a),
            permits,
            Outcome::RateLimited(Some(wait)),
            Domain::Deployment,
            now,
            &settings(),
        );
        assert!(!health.available(0, a, now));
        assert!(health.available(1, a, now));
        assert!(
            health.available(0, a, now + wait),
            "exactly the provider's wait"
        );
        assert_eq!(health.next_chance(0, a, now), Some(now + wait));
    }

    #[test]
    fn a_success_clears_both_counts() {
        let (mut health, now, a) = (Health::default(), Instant::now(), addr(1));
        fail(&mut health, 0, a, Domain::Transport, now);
        let permits = health.acquire(0, a, now, &settings()).unwrap();
        health.record(
            (0, a),
            permits,
            Outcome::Success,
            Domain::Deployment,
            now,
            &settings(),
        );
        fail(&mut health, 0, a, Domain::Transport, now);
        assert!(
            health.available(0, a, now),
            "the count restarted after the success"
        );
    }
}
