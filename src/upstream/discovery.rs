//! Where a provider's backends come from and whether they are healthy: its
//! host name re-resolved in the background ([`DnsDiscovery`], never on the
//! request path), and Pingora's HTTP health check with its results
//! published as `runestone_upstream_healthy`.

use crate::config::{HealthCheckSettings, ProviderSettings};
use crate::metrics;
use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::health_check::{HealthObserve, HttpHealthCheck};
use pingora::lb::Backend as LbBackend;
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Mutex;
use tracing::{info, warn};

/// Resolves a provider's host name into backends; never on the request path.
pub struct DnsDiscovery {
    provider: String,
    host: String,
    port: u16,
    weight: usize,
    /// The start-up resolution, answered by the first discovery without
    /// waiting, so the balancer can serve before its service runs.
    seed: Mutex<Option<BTreeSet<LbBackend>>>,
}

impl DnsDiscovery {
    /// Discovery for a provider, seeded with a resolution made now (at
    /// start-up, before the server runs).
    pub(super) fn new(settings: &ProviderSettings) -> Self {
        let discovery = DnsDiscovery {
            provider: settings.name.clone(),
            host: settings.base_url.host.clone(),
            port: settings.base_url.port,
            weight: settings.weight as usize,
            seed: Mutex::default(),
        };
        *discovery.seed.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(discovery.resolve_blocking());
        discovery
    }

    fn backends(&self, addrs: impl Iterator<Item = SocketAddr>) -> BTreeSet<LbBackend> {
        addrs
            .map(|addr| LbBackend {
                addr: pingora::protocols::l4::socket::SocketAddr::Inet(addr),
                weight: self.weight,
                ext: Default::default(),
            })
            .collect()
    }

    /// Resolves now, blocking: for start-up only.
    fn resolve_blocking(&self) -> BTreeSet<LbBackend> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return self.backends(std::iter::once(SocketAddr::new(ip, self.port)));
        }
        match (self.host.as_str(), self.port).to_socket_addrs() {
            Ok(addrs) => self.backends(addrs),
            Err(e) => {
                warn!(provider = %self.provider, host = %self.host, error = %e, "cannot resolve provider host");
                BTreeSet::new()
            }
        }
    }
}

#[async_trait]
impl ServiceDiscovery for DnsDiscovery {
    async fn discover(&self) -> pingora::Result<(BTreeSet<LbBackend>, HashMap<u64, bool>)> {
        if let Some(seed) = self.seed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Ok((seed, HashMap::new()));
        }
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok((
                self.backends(std::iter::once(SocketAddr::new(ip, self.port))),
                HashMap::new(),
            ));
        }
        match tokio::net::lookup_host((self.host.as_str(), self.port)).await {
            Ok(addrs) => Ok((self.backends(addrs), HashMap::new())),
            Err(e) => {
                // An error keeps the last good backends: a DNS hiccup must
                // not take a provider out of service.
                warn!(provider = %self.provider, host = %self.host, error = %e, "cannot re-resolve provider host");
                pingora::Error::e_explain(
                    pingora::ErrorType::ConnectNoRoute,
                    "DNS resolution failed",
                )
            }
        }
    }
}

/// Publishes health changes as `runestone_upstream_healthy` and logs them.
struct HealthGauge {
    provider: String,
}

#[async_trait]
impl HealthObserve for HealthGauge {
    async fn observe(&self, target: &LbBackend, healthy: bool) {
        let backend = target.addr.to_string();
        metrics::UPSTREAM_HEALTHY
            .with_label_values(&[&self.provider, &backend])
            .set(i64::from(healthy));
        if healthy {
            info!(provider = %self.provider, %backend, "backend passed its health check");
        } else {
            warn!(provider = %self.provider, %backend, "backend failed its health check; out of selection");
        }
    }
}

pub(super) fn health_check(
    settings: &ProviderSettings,
    hc: &HealthCheckSettings,
) -> HttpHealthCheck {
    let url = &settings.base_url;
    let mut check = HttpHealthCheck::new(&url.authority, url.tls);
    let path = format!("{}{}", url.path, hc.path);
    let mut req = RequestHeader::build("GET", path.as_bytes(), None).expect("a GET header builds");
    let _ = req.insert_header("host", &url.authority);
    if let Some((name, value)) = &settings.credential {
        let _ = req.insert_header(name.clone(), value.clone());
    }
    for (name, value) in crate::providers::adapter(settings.kind).fixed_headers() {
        let _ = req.insert_header(*name, *value);
    }
    check.req = req;
    check.consecutive_success = hc.healthy_threshold;
    check.consecutive_failure = hc.unhealthy_threshold;
    check.peer_template.options.connection_timeout = Some(hc.timeout);
    check.peer_template.options.read_timeout = Some(hc.timeout);
    check.health_changed_callback = Some(Box::new(HealthGauge {
        provider: settings.name.clone(),
    }));
    check
}
