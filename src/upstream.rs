//! Providers, their resolved addresses, and the choice of backend.
//!
//! Host names are resolved off the request path: once at start-up and then
//! periodically by [`Resolver`], a Pingora background service, into an
//! `ArcSwap` that the request path only loads. A backend is one resolved
//! address of one provider; [`Upstreams::choose_backend`] picks one among a
//! route's targets according to the route's strategy, skipping targets that
//! have no address or were already tried for this request.

use crate::config::{Config, ModelRoute, ProviderSettings, Strategy};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::HttpPeer;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// How often provider host names are resolved again.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);

/// Timeouts applied to every provider connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP (and TLS) connect.
    pub connect: Duration,
    /// Longest wait for any read: the first byte, and each gap between
    /// stream chunks.
    pub read: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            read: Duration::from_secs(120),
        }
    }
}

/// A provider with its current addresses.
#[derive(Debug)]
pub struct Provider {
    /// Its validated settings.
    pub settings: ProviderSettings,
    addrs: ArcSwap<Vec<SocketAddr>>,
    next_addr: AtomicUsize,
}

impl Provider {
    fn new(settings: ProviderSettings) -> Self {
        let literal = settings
            .base_url
            .host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| vec![SocketAddr::new(ip, settings.base_url.port)]);
        Provider {
            settings,
            addrs: ArcSwap::from_pointee(literal.unwrap_or_default()),
            next_addr: AtomicUsize::new(0),
        }
    }

    fn is_literal(&self) -> bool {
        self.settings.base_url.host.parse::<IpAddr>().is_ok()
    }

    /// Whether the provider has at least one address.
    pub fn is_resolved(&self) -> bool {
        !self.addrs.load().is_empty()
    }

    fn next_address(&self) -> Option<SocketAddr> {
        let addrs = self.addrs.load();
        if addrs.is_empty() {
            return None;
        }
        let i = self.next_addr.fetch_add(1, Ordering::Relaxed);
        Some(addrs[i % addrs.len()])
    }

    fn store(&self, mut addrs: Vec<SocketAddr>) {
        addrs.sort();
        addrs.dedup();
        if **self.addrs.load() != addrs {
            info!(provider = %self.settings.name, ?addrs, "provider addresses changed");
            self.addrs.store(Arc::new(addrs));
        }
    }

    /// Resolves the host name now, blocking: for start-up only.
    fn resolve_blocking(&self) {
        if self.is_literal() {
            return;
        }
        let url = &self.settings.base_url;
        match (url.host.as_str(), url.port).to_socket_addrs() {
            Ok(addrs) => self.store(addrs.collect()),
            Err(e) => {
                warn!(provider = %self.settings.name, host = %url.host, error = %e, "cannot resolve provider host")
            }
        }
    }

    async fn resolve(&self) {
        if self.is_literal() {
            return;
        }
        let url = &self.settings.base_url;
        match tokio::net::lookup_host((url.host.as_str(), url.port)).await {
            Ok(addrs) => self.store(addrs.collect()),
            // Keep the last good addresses: a DNS hiccup must not take a
            // provider out of service.
            Err(e) => {
                warn!(provider = %self.settings.name, host = %url.host, error = %e, "cannot re-resolve provider host")
            }
        }
    }
}

/// The backend chosen for one attempt.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Index of the provider in the config.
    pub provider: usize,
    /// Index of the target within the route.
    pub target: usize,
    /// The address connected to.
    pub addr: SocketAddr,
}

/// All providers and the per-route selection state.
#[derive(Debug)]
pub struct Upstreams {
    providers: Vec<Provider>,
    route_cursors: Vec<AtomicUsize>,
    timeouts: Timeouts,
}

impl Upstreams {
    /// Builds the providers of a config and resolves their host names.
    pub fn new(config: &Config) -> Self {
        let upstreams = Upstreams {
            providers: config
                .providers
                .iter()
                .cloned()
                .map(Provider::new)
                .collect(),
            route_cursors: config.models.iter().map(|_| AtomicUsize::new(0)).collect(),
            timeouts: Timeouts::default(),
        };
        for provider in &upstreams.providers {
            provider.resolve_blocking();
        }
        upstreams
    }

    /// The provider at `index`.
    pub fn provider(&self, index: usize) -> &Provider {
        &self.providers[index]
    }

    /// Whether some target of `route` has an address.
    pub fn can_serve(&self, route: &ModelRoute) -> bool {
        route
            .targets
            .iter()
            .any(|t| self.providers[t.provider].is_resolved())
    }

    /// Picks a backend for `route` (the `route_index`-th model), skipping
    /// the targets in `tried`.
    pub fn choose_backend(
        &self,
        route_index: usize,
        route: &ModelRoute,
        tried: &[usize],
    ) -> Option<Backend> {
        let eligible = |t: &usize| {
            !tried.contains(t) && self.providers[route.targets[*t].provider].is_resolved()
        };
        let count = (0..route.targets.len()).filter(eligible).count();
        if count == 0 {
            return None;
        }
        // Pick among the eligible targets only, so a target that cannot
        // serve does not push its share onto its neighbour.
        let nth = match route.strategy {
            Strategy::RoundRobin => {
                self.route_cursors[route_index].fetch_add(1, Ordering::Relaxed) % count
            }
            Strategy::Priority => 0,
        };
        let target = (0..route.targets.len()).filter(eligible).nth(nth)?;
        let provider = route.targets[target].provider;
        let addr = self.providers[provider].next_address()?;
        Some(Backend {
            provider,
            target,
            addr,
        })
    }

    /// The Pingora peer for a backend: TLS with SNI and certificate checks
    /// for https providers, and the gateway's timeouts.
    pub fn peer(&self, backend: &Backend) -> HttpPeer {
        let url = &self.providers[backend.provider].settings.base_url;
        let mut peer = HttpPeer::new(backend.addr, url.tls, url.host.clone());
        peer.options.connection_timeout = Some(self.timeouts.connect);
        peer.options.total_connection_timeout = Some(self.timeouts.connect * 2);
        peer.options.read_timeout = Some(self.timeouts.read);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        peer.options.verify_cert = true;
        peer.options.verify_hostname = true;
        peer
    }

    async fn resolve_all(&self) {
        for provider in &self.providers {
            provider.resolve().await;
        }
    }
}

/// Background service that re-resolves provider host names.
pub struct Resolver {
    upstreams: Arc<Upstreams>,
}

impl Resolver {
    /// A resolver for these upstreams.
    pub fn new(upstreams: Arc<Upstreams>) -> Self {
        Resolver { upstreams }
    }
}

#[async_trait]
impl BackgroundService for Resolver {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            self.upstreams.resolve_all().await;
            tokio::select! {
                _ = tokio::time::sleep(RESOLVE_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(strategy: &str) -> Config {
        let yaml = format!(
            r#"
server: {{ listen: "127.0.0.1:1" }}
providers:
  - {{ name: a, base_url: "http://127.0.0.1:10/v1" }}
  - {{ name: b, base_url: "http://127.0.0.2:10/v1" }}
  - {{ name: c, base_url: "http://unresolvable.invalid/v1" }}
models:
  - name: m
    strategy: {strategy}
    targets: [{{ provider: a }}, {{ provider: c }}, {{ provider: b }}]
tenants: []
"#
        );
        Config::from_yaml(&yaml, |_| None).unwrap()
    }

    #[test]
    fn round_robin_alternates_and_skips_unresolved_targets() {
        let config = config("round_robin");
        let upstreams = Upstreams::new(&config);
        let route = &config.models[0];
        let picks: Vec<usize> = (0..6)
            .map(|_| upstreams.choose_backend(0, route, &[]).unwrap().provider)
            .collect();
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 3, "{picks:?}");
        assert_eq!(picks.iter().filter(|&&p| p == 1).count(), 3, "{picks:?}");
        assert!(
            !picks.contains(&2),
            "unresolvable provider must not be picked"
        );
    }

    #[test]
    fn priority_takes_the_first_untried_target() {
        let config = config("priority");
        let upstreams = Upstreams::new(&config);
        let route = &config.models[0];
        assert_eq!(upstreams.choose_backend(0, route, &[]).unwrap().target, 0);
        assert_eq!(upstreams.choose_backend(0, route, &[0]).unwrap().target, 2);
        assert!(upstreams.choose_backend(0, route, &[0, 2]).is_none());
    }
}
