//! Builds the Pingora server: the API listener, the Prometheus listener and
//! the background services, from a validated [`Config`].

use crate::config::Config;
use crate::gateway::Gateway;
use crate::limits::{redis::RedisMaintenance, Limiter};
use crate::metrics;
use crate::overflow::{Drain, Overflow};
use crate::services::{
    DrainService, EndRequestsService, MaintenanceService, ReloadService, StartLockService,
    TailsService,
};
use crate::upstream::Upstreams;
use pingora::connectors::ConnectorOptions;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::proxy::http_proxy_service_with_name;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::{background_service, GenBackgroundService};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

/// Process-level switches from the command line, as Pingora's own.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Detach and run in the background.
    pub daemon: bool,
    /// Take the listening sockets over from a running instance.
    pub upgrade: bool,
    /// The config file, read again on SIGHUP.
    pub config_path: Option<std::path::PathBuf>,
}

/// Builds a ready-to-run server for `config`, with its limiter (see
/// [`Limiter::leave_tail`], for when the server has stopped).
pub fn build(config: Config, options: RunOptions) -> (Server, Limiter) {
    metrics::register_all();
    let server_conf = ServerConf {
        threads: config.server.threads,
        // A second past the grace period: the requests still running at
        // its end are ended then and settle in that second
        // (`EndRequestsService`), before the runtimes stop and drop what
        // runs on them.
        grace_period_seconds: Some(config.server.grace_period_seconds + 1),
        graceful_shutdown_timeout_seconds: Some(config.server.grace_period_seconds.max(1)),
        pid_file: config.server.pid_file.clone(),
        upgrade_sock: config.server.upgrade_sock.clone(),
        daemon: options.daemon,
        // A daemon stays in the directory it was started from, so that the
        // config's relative paths (and `--config` itself, read again on
        // SIGHUP) mean what they did in the foreground.
        working_directory: options
            .daemon
            .then(|| std::env::current_dir().ok())
            .flatten(),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: options.upgrade,
        daemon: options.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf);
    server.bootstrap();
    if !options.daemon {
        // Daemons get their pid file from Pingora; a foreground process
        // writes its own so that `runestone reload` can find it.
        // Never through a symlink nor into a file another user made: in a
        // shared directory (the default is in /tmp) one could be planted
        // to have this process overwrite a file of their choosing, or to
        // write another pid into it afterwards.
        // Mode 0644 whatever the umask: one anyone may write is refused by
        // `runestone reload` and by a second start's check.
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .mode(0o644)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&config.server.pid_file)
            .and_then(|mut file| {
                use std::os::unix::fs::{MetadataExt, PermissionsExt};
                let owner = file.metadata()?.uid();
                if owner != nix::unistd::geteuid().as_raw() {
                    return Err(std::io::Error::other(format!(
                        "it belongs to user {owner}, not this process's"
                    )));
                }
                file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
                file.set_len(0)?;
                file.write_all(std::process::id().to_string().as_bytes())
            });
        if let Err(e) = written {
            tracing::warn!(pid_file = %config.server.pid_file, error = %e, "cannot write the pid file");
        }
    }

    let config = Arc::new(config);
    let upstreams = Arc::new(Upstreams::new(&config));
    let connector_options = Some(ConnectorOptions::from_server_conf(&server.configuration));
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    if let Some(telemetry) = &config.telemetry {
        crate::telemetry::start(
            telemetry,
            Some(ConnectorOptions::from_server_conf(&server.configuration)),
        );
    }
    // One Redis connection for limits and the overflow queue.
    let redis = crate::redis_conn::RedisConnection::for_config(&config);
    if let Some(redis) = &redis {
        let (mode, endpoints) = redis.describe();
        tracing::info!(mode, endpoints = ?endpoints, "Redis: limits, spend, the overflow queue and jobs are shared");
    }
    let limiter = Limiter::new(&config, redis.clone());
    limiter.remove_stale_tails();
    // A reload's predecessor's spend, counted until Redis is read; without
    // Redis, its usage (a reload keeps budgets and `/v1/usage`). Only in a
    // successor (`--upgrade`): a variable left in a fresh start's
    // environment is no predecessor's.
    if options.upgrade {
        if let Ok(handover) = std::env::var(crate::limits::HANDOVER_ENV) {
            limiter.count_handed_over(&handover);
        }
        if let Ok(handover) = std::env::var(crate::limits::HANDOVER_USAGE_ENV) {
            limiter.count_handed_over_usage(&handover);
        }
        if let Ok(handover) = std::env::var(crate::limits::HANDOVER_MINUTES_ENV) {
            limiter.count_handed_over_minutes(&handover);
        }
        if let Ok(awaited) = std::env::var(crate::limits::AWAITED_ENV) {
            limiter.await_tails(&awaited);
            server.add_service(background_service(
                "usage left at a reload",
                TailsService(limiter.clone()),
            ));
        }
    }
    let overflow = Overflow::new(&config, redis.clone());
    limiter.on_freed({
        let overflow = overflow.clone();
        move |tenant| overflow.capacity_freed(tenant)
    });
    match limiter.redis() {
        Some(redis) => {
            // What a process ending while Redis does not answer still owes
            // is left beside the pid file for the next one to pay.
            redis.keep_debts_beside(&config.server.pid_file);
            server.add_service(background_service(
                "redis maintenance",
                MaintenanceService(RedisMaintenance::new(redis)),
            ));
        }
        None => crate::limits::redis::warn_of_debts_left_beside(&config.server.pid_file),
    }

    let gateway = Gateway::new(
        config.clone(),
        upstreams.clone(),
        limiter.clone(),
        overflow.clone(),
        connector_options,
        redis,
    );
    let drain = Drain::new(
        overflow,
        limiter.clone(),
        upstreams.clone(),
        config.clone(),
        Arc::new(gateway.clone()),
    );
    server.add_service(background_service("overflow drain", DrainService(drain)));
    server.add_service(background_service(
        "start lock",
        StartLockService(config.server.listen),
    ));
    server.add_service(background_service(
        "end requests before the runtimes stop",
        EndRequestsService(std::time::Duration::from_secs(
            config.server.grace_period_seconds,
        )),
    ));
    if let Some(path) = options.config_path.clone() {
        server.add_service(background_service(
            "reload on SIGHUP",
            ReloadService(
                crate::reload::ReloadOnHangup::new(path, options.daemon, &config.server).handing({
                    let limiter = limiter.clone();
                    move || {
                        vec![
                            (crate::limits::HANDOVER_ENV, limiter.handover()),
                            (crate::limits::HANDOVER_USAGE_ENV, limiter.handover_usage()),
                            (
                                crate::limits::HANDOVER_MINUTES_ENV,
                                limiter.handover_minutes(),
                            ),
                            (crate::limits::AWAITED_ENV, limiter.handover_awaited()),
                        ]
                    }
                }),
            ),
        ));
    }

    let mut api =
        http_proxy_service_with_name(&server.configuration, gateway.clone(), "runestone api");
    match &config.server.tls {
        Some(tls) => api
            .add_tls(&config.server.listen.to_string(), &tls.cert, &tls.key)
            .unwrap_or_else(|e| panic!("cannot serve TLS with {} and {}: {e}", tls.cert, tls.key)),
        // Plain HTTP reads straight into Pingora's header and body buffers.
        // Its default 64 KiB read buffer per connection (meant to batch a TLS
        // layer's small reads) would be a second copy of every byte and, on a
        // long stream, 64 KiB of memory held for nothing.
        None => api.add_listener(
            ListenerConfig::tcp(config.server.listen.to_string())
                .l4_buffer(L4BufferSettings::default().read(0)),
        ),
    }
    server.add_service(api);

    if let Some(addr) = config.server.metrics_listen {
        let mut prometheus = pingora_prometheus::prometheus_http_service();
        prometheus.add_tcp(&addr.to_string());
        server.add_service(WatchedMetrics {
            inner: prometheus,
            addr,
        });
    }
    // Each provider's balancer re-resolves its host and runs its health
    // checks in the background.
    for (name, balancer) in upstreams.balancers() {
        server.add_service(GenBackgroundService::new(
            format!("BG provider {name}"),
            balancer,
        ));
    }
    (server, limiter)
}

/// Pingora's Prometheus listener, watched. Its socket is bound here (unless
/// inherited from the previous process on upgrade) and handed to Pingora's
/// service through the listener table, so that an address that cannot be
/// bound (taken, at start or on a reload that moved it) is known at once
/// and `/ready` reports it; Pingora's own bind would retry for 30 s and then
/// panic in the service's thread, silently leaving the API without metrics.
struct WatchedMetrics {
    inner: pingora::services::listening::Service<pingora_prometheus::PrometheusServer>,
    addr: std::net::SocketAddr,
}

impl WatchedMetrics {
    /// Binds the listening socket as Pingora would (SO_REUSEADDR).
    fn bind(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        let socket = match self.addr {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(self.addr)?;
        let listener = socket.listen(1024)?.into_std()?;
        Ok(std::os::fd::OwnedFd::from(listener))
    }

    fn failed(&self, reason: String) {
        tracing::error!(listen = %self.addr, error = %reason, "the metrics listener is not serving");
        metrics::listener_failed(reason);
    }
}

#[async_trait::async_trait]
impl pingora::services::Service for WatchedMetrics {
    async fn start_service(
        &mut self,
        fds: Option<pingora::server::ListenFds>,
        shutdown: pingora::server::ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        use futures_util::FutureExt;
        use std::os::fd::IntoRawFd;
        if let Some(table) = &fds {
            let key = self.addr.to_string();
            let inherited = table.lock().get(&key).is_some();
            if !inherited {
                match self.bind() {
                    Ok(fd) => table.lock().add(key, fd.into_raw_fd()),
                    Err(e) => return self.failed(format!("cannot listen on {}: {e}", self.addr)),
                }
            }
        }
        let started = std::panic::AssertUnwindSafe(pingora::services::Service::start_service(
            &mut self.inner,
            fds,
            shutdown,
            listeners_per_fd,
        ))
        .catch_unwind()
        .await;
        if let Err(panic) = started {
            let reason = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the listener stopped".to_string());
            self.failed(reason);
        }
    }

    fn name(&self) -> &str {
        pingora::services::Service::name(&self.inner)
    }

    fn threads(&self) -> Option<usize> {
        pingora::services::Service::threads(&self.inner)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        pingora::services::Service::listen_addresses(&self.inner)
    }
}
