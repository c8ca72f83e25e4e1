//! Providers, their backends, health, circuit breakers and the choice of
//! backend for each attempt.
//!
//! Each provider is a Pingora `LoadBalancer` over its backends (the
//! addresses its host name resolves to). The balancer runs as a background
//! service: [`DnsDiscovery`] re-resolves the host every
//! [`RESOLVE_INTERVAL`] (never on the request path) and, when the provider
//! has a `health_check`, Pingora's `HttpHealthCheck` takes failing backends
//! out of selection until they pass again.
//!
//! On top of health, real traffic feeds circuit breakers by failure domain
//! ([`health`]): a deployment (one provider model on one backend) for what
//! the provider answered, the backend address for what the network did.
//! [`Upstreams::choose_backend`] picks, among a route's targets that have an
//! eligible deployment (healthy backend, breakers allowing, not yet tried by
//! this request), one target by the route's strategy, then one backend of
//! that provider round robin.

pub mod breaker;
mod discovery;
pub mod failover;
pub mod health;

use crate::config::{Config, ModelRoute, Price, ProviderSettings, Strategy};
use crate::cost::ServiceTier;
use crate::metrics;
use breaker::{BreakerView, Outcome, Transition};
use health::{Domain, Health, Permits};
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend as LbBackend, Backends, LoadBalancer};
use pingora::upstreams::peer::HttpPeer;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How often provider host names are resolved again.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);

/// A provider's balancer: round robin over its backends.
pub type Balancer = LoadBalancer<RoundRobin>;

use discovery::health_check;
pub use discovery::DnsDiscovery;

/// A provider with its balancer and the breakers of its failure domains.
pub struct Provider {
    /// Its validated settings.
    pub settings: ProviderSettings,
    balancer: Arc<Balancer>,
    /// The provider models its targets name, by slot: a deployment is a
    /// slot on a backend.
    models: Vec<String>,
    health: Mutex<Health>,
}

/// A backend's state for `/ready`: its address, whether it passes its
/// health check, its transport breaker, and its deployments' breakers (by
/// provider model).
pub type BackendState = (SocketAddr, bool, BreakerView, Vec<(String, BreakerView)>);

impl Provider {
    fn new(settings: ProviderSettings, models: Vec<String>) -> Self {
        let discovery = DnsDiscovery::new(&settings);
        let mut balancer = Balancer::from_backends(Backends::new(Box::new(discovery)));
        if let Some(hc) = &settings.health_check {
            balancer.set_health_check(Box::new(health_check(&settings, hc)));
            balancer.health_check_frequency = Some(hc.interval);
        }
        balancer.update_frequency = Some(RESOLVE_INTERVAL);
        // Take in the start-up resolution (the seed answers without waiting).
        if futures_now(balancer.update()).is_none() {
            warn!(provider = %settings.name, "provider backends will be known after the first discovery");
        }
        let balancer = Arc::new(balancer);
        for backend in balancer.backends().get_backend().iter() {
            metrics::UPSTREAM_HEALTHY
                .with_label_values(&[&settings.name, &backend.addr.to_string()])
                .set(1);
        }
        Provider {
            settings,
            balancer,
            models,
            health: Mutex::default(),
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The backends with their health and breakers, for `/ready`.
    pub fn backend_states(&self) -> Vec<BackendState> {
        let now = Instant::now();
        let health = self.health();
        self.addrs()
            .into_iter()
            .map(|addr| {
                let deployments = health
                    .deployment_views(addr, now)
                    .into_iter()
                    .map(|(slot, view)| (self.models.get(slot).cloned().unwrap_or_default(), view))
                    .collect();
                (
                    addr,
                    self.is_healthy(addr),
                    health.transport_view(addr, now),
                    deployments,
                )
            })
            .collect()
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.balancer
            .backends()
            .get_backend()
            .iter()
            .filter_map(|b| b.addr.as_inet().copied())
            .collect()
    }

    fn is_healthy(&self, addr: SocketAddr) -> bool {
        let backend = LbBackend {
            addr: pingora::protocols::l4::socket::SocketAddr::Inet(addr),
            weight: self.settings.weight as usize,
            ext: Default::default(),
        };
        self.balancer.backends().ready(&backend)
    }

    /// Whether deployment `slot` has a backend that could take an attempt.
    fn has_eligible(&self, index: usize, slot: usize, tried: &Tried, now: Instant) -> bool {
        let health = self.health();
        self.balancer.backends().get_backend().iter().any(|b| {
            let Some(addr) = b.addr.as_inet() else {
                return false;
            };
            self.balancer.backends().ready(b)
                && !tried.skips(index, slot, *addr)
                && health.available(slot, *addr, now)
        })
    }

    /// Whether deployment `slot` has a healthy backend (resting after a
    /// provider 429 or not).
    fn has_healthy(&self, slot: usize, now: Instant) -> bool {
        let health = self.health();
        self.balancer.backends().get_backend().iter().any(|b| {
            b.addr.as_inet().is_some_and(|addr| {
                self.balancer.backends().ready(b) && health.healthy(slot, *addr, now)
            })
        })
    }

    /// The soonest moment deployment `slot` may be tried again on one of
    /// its backends.
    fn next_chance(&self, slot: usize, now: Instant) -> Option<Instant> {
        let health = self.health();
        self.addrs()
            .into_iter()
            .filter_map(|addr| health.next_chance(slot, addr, now))
            .min()
    }
}

/// Polls a future that is known to be ready at once.
fn futures_now<F: std::future::Future>(f: F) -> Option<F::Output> {
    use std::task::{Context, Poll, Waker};
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// The backend chosen for one attempt: a deployment (the target's provider
/// model) on one backend address, and what its breakers allowed.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Index of the model route in the config.
    pub route: usize,
    /// Index of the target within the route.
    pub target: usize,
    /// Index of the provider in the config.
    pub provider: usize,
    /// The provider model's slot within the provider.
    pub slot: usize,
    /// The address connected to.
    pub addr: SocketAddr,
    /// What the breakers allowed: normal attempts or half-open probes.
    pub permits: Permits,
}

/// What one request has already tried: deployments whose failure moved it
/// on, and backend addresses that failed at the transport (for every
/// deployment on them). A deployment the provider rate-limited is not in
/// here: its cool-down says when it may be tried again.
#[derive(Debug, Clone, Default)]
pub struct Tried {
    deployments: Vec<(usize, usize, SocketAddr)>,
    addrs: Vec<(usize, SocketAddr)>,
    /// Only this provider's deployments may serve the request (the one
    /// holding what it refers to).
    pub only: Option<usize>,
}

impl Tried {
    /// Whether deployment `slot` of `provider` at `addr` is out for this
    /// request.
    pub fn skips(&self, provider: usize, slot: usize, addr: SocketAddr) -> bool {
        self.only.is_some_and(|only| only != provider)
            || self.addrs.contains(&(provider, addr))
            || self.deployments.contains(&(provider, slot, addr))
    }

    /// The request is done with this deployment.
    pub fn deployment(&mut self, backend: &Backend) {
        self.deployments
            .push((backend.provider, backend.slot, backend.addr));
    }

    /// The request is done with this address, for every deployment on it.
    pub fn address(&mut self, backend: &Backend) {
        self.addrs.push((backend.provider, backend.addr));
    }
}

/// Per-route selection state.
struct RouteState {
    cursor: AtomicUsize,
    /// Moving average of time to first byte per target, in microseconds
    /// (0 = no sample yet, tried first by `least_latency`).
    ttfb_us: Vec<AtomicU64>,
    /// Each target's price, for `cheapest`.
    prices: Vec<Option<Price>>,
    /// Each target's model slot within its provider.
    slots: Vec<usize>,
}

/// Why no backend was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoBackend {
    /// When a deployment resting (after a provider 429) or behind an open
    /// breaker may be tried again: a moment worth waiting for.
    pub frees_in: Option<Duration>,
    /// When the client might try again: that moment, or else (every
    /// backend failing its health checks) the next check's interval.
    pub retry_after: Option<Duration>,
}

/// All providers and the per-route selection state.
pub struct Upstreams {
    providers: Vec<Provider>,
    /// Every provider's key, each once, longest first
    /// ([`crate::redact::every_key`]): what the gateway masks text of that
    /// several providers' answers went into.
    redact_keys: Vec<crate::redact::RedactKey>,
    routes: Vec<RouteState>,
    breaker: crate::config::BreakerSettings,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams")
            .field("providers", &self.providers.len())
            .finish()
    }
}

impl Upstreams {
    /// How long a deployment rests after a provider 429 that gave no wait.
    pub fn rate_limit_cooldown(&self) -> Duration {
        self.breaker.rate_limit_cooldown
    }

    /// Builds the providers of a config (resolving their host names once,
    /// at start-up) and the routes' selection state.
    pub fn new(config: &Config) -> Self {
        // Each provider's models, in the order its targets name them.
        let mut models: Vec<Vec<String>> = vec![Vec::new(); config.providers.len()];
        let routes = config
            .models
            .iter()
            .map(|route| RouteState {
                cursor: AtomicUsize::new(0),
                ttfb_us: route.targets.iter().map(|_| AtomicU64::new(0)).collect(),
                prices: route.targets.iter().map(|t| t.price).collect(),
                slots: route
                    .targets
                    .iter()
                    .map(|t| {
                        let names = &mut models[t.provider];
                        names.iter().position(|m| *m == t.model).unwrap_or_else(|| {
                            names.push(t.model.clone());
                            names.len() - 1
                        })
                    })
                    .collect(),
            })
            .collect();
        let redact_keys = crate::redact::every_key(
            config
                .providers
                .iter()
                .filter_map(|p| p.redact_key.as_ref()),
        );
        Upstreams {
            providers: config
                .providers
                .iter()
                .cloned()
                .zip(models)
                .map(|(settings, models)| Provider::new(settings, models))
                .collect(),
            redact_keys,
            routes,
            breaker: config.breaker,
        }
    }

    /// The balancers, to run as background services (discovery and health
    /// checks), with their providers' names.
    pub fn balancers(&self) -> impl Iterator<Item = (&str, Arc<Balancer>)> {
        self.providers
            .iter()
            .map(|p| (p.settings.name.as_str(), p.balancer.clone()))
    }

    /// The provider at `index`.
    pub fn provider(&self, index: usize) -> &Provider {
        &self.providers[index]
    }

    /// All providers, in config order.
    pub fn providers(&self) -> &[Provider] {
        &self.providers
    }

    /// Every provider's key, each once, ready to be masked.
    pub fn redact_keys(&self) -> &[crate::redact::RedactKey] {
        &self.redact_keys
    }

    /// Whether some target of `route` (the `route_index`-th) could take a
    /// request now.
    pub fn can_serve(&self, route_index: usize, route: &ModelRoute) -> bool {
        let now = Instant::now();
        let none = Tried::default();
        route.targets.iter().enumerate().any(|(t, target)| {
            let slot = self.routes[route_index].slots[t];
            self.providers[target.provider].has_eligible(target.provider, slot, &none, now)
        })
    }

    /// Whether some target of `route` is healthy, though perhaps resting
    /// after a provider 429 (for `/ready`: a rate limit is no reason to take
    /// the instance out of rotation).
    pub fn is_healthy(&self, route_index: usize, route: &ModelRoute) -> bool {
        let now = Instant::now();
        route.targets.iter().enumerate().any(|(t, target)| {
            let slot = self.routes[route_index].slots[t];
            self.providers[target.provider].has_healthy(slot, now)
        })
    }

    /// Whether any of `routes` (a route and its fallbacks, as
    /// [`crate::config::Config::routes_for`] gives them) could take a
    /// request now.
    pub fn can_serve_any(&self, routes: &[(usize, &ModelRoute)]) -> bool {
        routes
            .iter()
            .any(|&(index, route)| self.can_serve(index, route))
    }

    /// Picks a backend for the `route_index`-th route, skipping what
    /// `tried` rules out; `tier`, the processing tier asked for, is what
    /// `cheapest` compares prices at.
    pub fn choose_backend(
        &self,
        route_index: usize,
        route: &ModelRoute,
        tried: &Tried,
        tier: Option<ServiceTier>,
    ) -> Result<Backend, NoBackend> {
        let now = Instant::now();
        let slots = &self.routes[route_index].slots;
        // A few rounds: a breaker can turn between the check and the permit.
        let single = route.targets.len() == 1;
        for _ in 0..4 {
            // One target: whether it has a backend is what choosing one
            // finds out (asking first would read every backend's health
            // twice).
            let several: Vec<usize>;
            let eligible: &[usize] = if single {
                &[0]
            } else {
                several = (0..route.targets.len())
                    .filter(|&t| {
                        let p = route.targets[t].provider;
                        self.providers[p].has_eligible(p, slots[t], tried, now)
                    })
                    .collect();
                &several
            };
            let Some(target) = self.pick_target(route_index, route, eligible, tier) else {
                return Err(self.no_backend(route_index, route, now));
            };
            let (p, slot) = (route.targets[target].provider, slots[target]);
            let provider = &self.providers[p];
            let chosen = provider.balancer.select_with(b"", 256, |b, healthy| {
                let Some(addr) = b.addr.as_inet() else {
                    return false;
                };
                healthy
                    && !tried.skips(p, slot, *addr)
                    && provider.health().available(slot, *addr, now)
            });
            let Some(addr) = chosen.and_then(|b| b.addr.as_inet().copied()) else {
                // (With several targets, a breaker may have turned between
                // the check and the choice.)
                if single {
                    break;
                }
                continue;
            };
            let (permits, gauge) = {
                let mut health = provider.health();
                let permits = health.acquire(slot, addr, now, &self.breaker);
                (permits, health.unpublished_gauge(addr, now))
            };
            self.publish(p, addr, gauge);
            if let Some(permits) = permits {
                return Ok(Backend {
                    route: route_index,
                    target,
                    provider: p,
                    slot,
                    addr,
                    permits,
                });
            }
        }
        Err(self.no_backend(route_index, route, now))
    }

    /// The same deployment again, for one more attempt, when its breakers
    /// still allow one.
    pub fn reacquire(&self, backend: &Backend) -> Option<Backend> {
        let now = Instant::now();
        let permits = self.providers[backend.provider].health().acquire(
            backend.slot,
            backend.addr,
            now,
            &self.breaker,
        )?;
        Some(Backend {
            permits,
            ..backend.clone()
        })
    }

    fn pick_target(
        &self,
        route_index: usize,
        route: &ModelRoute,
        eligible: &[usize],
        tier: Option<ServiceTier>,
    ) -> Option<usize> {
        let state = &self.routes[route_index];
        match route.strategy {
            _ if eligible.is_empty() => None,
            Strategy::RoundRobin => {
                let n = state.cursor.fetch_add(1, Ordering::Relaxed);
                Some(eligible[n % eligible.len()])
            }
            Strategy::Weighted => {
                let weight =
                    |t: usize| u64::from(self.providers[route.targets[t].provider].settings.weight);
                let total: u64 = eligible.iter().map(|&t| weight(t)).sum();
                let mut ticket = fastrand::u64(0..total.max(1));
                eligible.iter().copied().find(|&t| {
                    let w = weight(t);
                    if ticket < w {
                        true
                    } else {
                        ticket -= w;
                        false
                    }
                })
            }
            Strategy::LeastLatency => eligible
                .iter()
                .copied()
                .min_by_key(|&t| state.ttfb_us[t].load(Ordering::Relaxed)),
            Strategy::Priority => eligible.first().copied(),
            Strategy::Cheapest => eligible.iter().copied().min_by_key(|&t| {
                state.prices[t].map_or(i64::MAX, |price| {
                    let tokens = price.tokens_at(tier);
                    tokens.input.saturating_add(tokens.output)
                })
            }),
        }
    }

    fn no_backend(&self, route_index: usize, route: &ModelRoute, now: Instant) -> NoBackend {
        let slots = &self.routes[route_index].slots;
        let soonest = route
            .targets
            .iter()
            .enumerate()
            .filter_map(|(t, target)| self.providers[target.provider].next_chance(slots[t], now))
            .min();
        let health_interval = route
            .targets
            .iter()
            .filter_map(|t| self.providers[t.provider].settings.health_check.as_ref())
            .map(|hc| hc.interval)
            .min();
        let frees_in = soonest.map(|at| at.saturating_duration_since(now));
        NoBackend {
            frees_in,
            retry_after: frees_in.or(health_interval),
        }
    }

    /// Feeds an attempt's outcome to the breakers of its failure domain
    /// (and its time to first byte to `least_latency`).
    pub fn record_outcome(
        &self,
        backend: &Backend,
        outcome: Outcome,
        domain: Domain,
        ttfb: Option<Duration>,
    ) {
        if let Some(ttfb) = ttfb {
            let slot = &self.routes[backend.route].ttfb_us[backend.target];
            let sample = ttfb.as_micros().min(u128::from(u64::MAX)) as u64;
            let old = slot.load(Ordering::Relaxed);
            let new = if old == 0 {
                sample.max(1)
            } else {
                (old * 4 + sample) / 5
            };
            slot.store(new.max(1), Ordering::Relaxed);
        }
        let provider = &self.providers[backend.provider];
        let now = Instant::now();
        let (changes, gauge) = {
            let mut health = provider.health();
            let changes = health.record(
                (backend.slot, backend.addr),
                backend.permits,
                outcome,
                domain,
                now,
                &self.breaker,
            );
            (changes, health.unpublished_gauge(backend.addr, now))
        };
        for change in changes {
            let name = &provider.settings.name;
            let model = change
                .slot
                .and_then(|s| provider.models.get(s))
                .map_or("", String::as_str);
            match change.transition {
                Transition::Opened(for_) => {
                    warn!(provider = %name, backend = %backend.addr, model, open_for = ?for_, "circuit opened")
                }
                Transition::Closed => {
                    info!(provider = %name, backend = %backend.addr, model, "circuit closed")
                }
            }
        }
        self.publish(backend.provider, backend.addr, gauge);
    }

    /// Sets `runestone_circuit_state` for one backend (the worst of its
    /// breakers), when it has a new value to publish.
    fn publish(&self, provider: usize, addr: SocketAddr, gauge: Option<i64>) {
        if let Some(gauge) = gauge {
            metrics::CIRCUIT_STATE
                .with_label_values(&[&self.providers[provider].settings.name, &addr.to_string()])
                .set(gauge);
        }
    }

    /// The Pingora peer for a backend: TLS with SNI and certificate checks
    /// for https providers, and the provider's connect timeout.
    pub fn peer(&self, backend: &Backend) -> HttpPeer {
        let settings = &self.providers[backend.provider].settings;
        let url = &settings.base_url;
        let mut peer = HttpPeer::new(backend.addr, url.tls, url.host.clone());
        peer.options.connection_timeout = Some(settings.timeouts.connect);
        peer.options.total_connection_timeout = Some(settings.timeouts.connect * 2);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        peer.options.verify_cert = true;
        peer.options.verify_hostname = true;
        peer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use health::Domain;

    fn config(strategy: &str, extra: &str) -> Config {
        let yaml = format!(
            r#"
server: {{ listen: "127.0.0.1:1" }}
providers:
  - {{ name: a, base_url: "http://127.0.0.1:10/v1", weight: 3 }}
  - {{ name: b, base_url: "http://127.0.0.2:10/v1", weight: 1 }}
  - {{ name: c, base_url: "http://unresolvable.invalid/v1" }}
models:
  - name: m
    strategy: {strategy}
    targets: [{{ provider: a }}, {{ provider: c }}, {{ provider: b }}]
tenants: []
{extra}
"#
        );
        Config::from_yaml(&yaml, |_| None).unwrap()
    }

    fn picks(upstreams: &Upstreams, config: &Config, n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| {
                upstreams
                    .choose_backend(0, &config.models[0], &Tried::default(), None)
                    .unwrap()
                    .provider
            })
            .collect()
    }

    #[test]
    fn round_robin_alternates_and_skips_unresolved_targets() {
        let config = config("round_robin", "");
        let upstreams = Upstreams::new(&config);
        let picks = picks(&upstreams, &config, 6);
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 3, "{picks:?}");
        assert_eq!(picks.iter().filter(|&&p| p == 1).count(), 3, "{picks:?}");
    }

    #[test]
    fn weighted_splits_by_provider_weight() {
        let config = config("weighted", "");
        let upstreams = Upstreams::new(&config);
        let picks = picks(&upstreams, &config, 4000);
        let a = picks.iter().filter(|&&p| p == 0).count() as f64 / 4000.0;
        assert!((a - 0.75).abs() < 0.05, "share of a: {a}");
    }

    #[test]
    fn priority_takes_the_first_untried_target() {
        let config = config("priority", "");
        let upstreams = Upstreams::new(&config);
        let route = &config.models[0];
        let mut tried = Tried::default();
        let first = upstreams.choose_backend(0, route, &tried, None).unwrap();
        assert_eq!(first.target, 0);
        tried.deployment(&first);
        let second = upstreams.choose_backend(0, route, &tried, None).unwrap();
        assert_eq!(second.target, 2);
        tried.deployment(&second);
        assert!(upstreams.choose_backend(0, route, &tried, None).is_err());
    }

    #[test]
    fn cheapest_prefers_the_lowest_priced_target() {
        let config = config(
            "cheapest",
            "pricing:\n  a/m: { input: 5, output: 5 }\n  b/m: { input: 1, output: 1 }\n",
        );
        let upstreams = Upstreams::new(&config);
        assert!(picks(&upstreams, &config, 5).iter().all(|&p| p == 1));
    }

    #[test]
    fn cheapest_compares_prices_at_the_tier_asked_for() {
        // b's priority costs more than a's.
        let tiered = config(
            "cheapest",
            "pricing:\n  a/m: { input: 5, output: 5, service_tiers: { priority: { input: 6, output: 6 } } }\n  b/m: { input: 1, output: 1, service_tiers: { priority: { input: 20, output: 20 } } }\n",
        );
        let upstreams = Upstreams::new(&tiered);
        let route = &tiered.models[0];
        let at = |tier| {
            upstreams
                .choose_backend(0, route, &Tried::default(), tier)
                .unwrap()
                .provider
        };
        assert_eq!(at(None), 1);
        assert_eq!(at(Some(ServiceTier::Default)), 1);
        assert_eq!(at(Some(ServiceTier::Priority)), 0);
        // A tier neither prices: their standard prices.
        assert_eq!(at(Some(ServiceTier::Flex)), 1);
    }

    #[test]
    fn least_latency_prefers_the_fastest_target() {
        let config = config("least_latency", "");
        let upstreams = Upstreams::new(&config);
        let route = &config.models[0];
        let none = Tried::default();
        let a = upstreams.choose_backend(0, route, &none, None).unwrap();
        upstreams.record_outcome(
            &a,
            Outcome::Success,
            Domain::Deployment,
            Some(Duration::from_millis(50)),
        );
        let b = upstreams.choose_backend(0, route, &none, None).unwrap();
        assert_eq!(b.provider, 1, "an unmeasured target is tried first");
        upstreams.record_outcome(
            &b,
            Outcome::Success,
            Domain::Deployment,
            Some(Duration::from_millis(5)),
        );
        assert!(picks(&upstreams, &config, 5).iter().all(|&p| p == 1));
    }

    #[test]
    fn an_open_breaker_takes_a_deployment_out_and_reports_when_it_half_opens() {
        let config = config(
            "priority",
            "circuit_breaker: { consecutive_failures: 2, open_seconds: 30 }\n",
        );
        let upstreams = Upstreams::new(&config);
        let route = &config.models[0];
        let none = Tried::default();
        for _ in 0..2 {
            let a = upstreams.choose_backend(0, route, &none, None).unwrap();
            assert_eq!(a.provider, 0);
            upstreams.record_outcome(&a, Outcome::Failure, Domain::Deployment, None);
        }
        let next = upstreams.choose_backend(0, route, &none, None).unwrap();
        assert_eq!(next.provider, 1, "a is open");
        upstreams.record_outcome(&next, Outcome::Failure, Domain::Deployment, None);
        upstreams.record_outcome(&next, Outcome::Failure, Domain::Deployment, None);
        let none = upstreams.choose_backend(0, route, &none, None).unwrap_err();
        let wait = none.retry_after.unwrap();
        assert!(
            wait > Duration::from_secs(28) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
    }

    #[test]
    fn one_models_trouble_leaves_the_providers_other_models_alone() {
        let yaml = r#"
server: { listen: "127.0.0.1:1" }
providers:
  - { name: a, base_url: "http://127.0.0.1:10/v1" }
models:
  - { name: big, targets: [{ provider: a }], fallbacks: [small] }
  - { name: small, targets: [{ provider: a }] }
tenants: []
circuit_breaker: { consecutive_failures: 1 }
"#;
        let config = Config::from_yaml(yaml, |_| None).unwrap();
        let upstreams = Upstreams::new(&config);
        let none = Tried::default();
        let big = upstreams
            .choose_backend(0, &config.models[0], &none, None)
            .unwrap();
        upstreams.record_outcome(
            &big,
            Outcome::RateLimited(Some(Duration::from_secs(60))),
            Domain::Deployment,
            None,
        );
        assert!(
            upstreams
                .choose_backend(0, &config.models[0], &none, None)
                .is_err(),
            "big cools down"
        );
        let small = upstreams
            .choose_backend(1, &config.models[1], &none, None)
            .unwrap();
        assert_eq!(
            (small.provider, small.addr),
            (big.provider, big.addr),
            "same provider and backend"
        );
        upstreams.record_outcome(&small, Outcome::Failure, Domain::Transport, None);
        assert!(
            upstreams
                .choose_backend(1, &config.models[1], &none, None)
                .is_err(),
            "a transport failure takes the address out for every model"
        );
    }
}
