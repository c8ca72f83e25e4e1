//! Pingora's background services, as thin adapters over the domain's
//! long-running loops: each loop is a plain `run(shutdown)` on its own type
//! (unit-testable with a Tokio watch channel), and only this module knows
//! Pingora's `BackgroundService` trait.

use crate::limits::redis::RedisMaintenance;
use crate::limits::Limiter;
use crate::overflow::Drain;
use crate::reload::ReloadOnHangup;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

/// The overflow drain ([`Drain::run`]).
pub struct DrainService(pub Drain);

#[async_trait]
impl BackgroundService for DrainService {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.run(shutdown).await
    }
}

/// Redis upkeep: probe, flush, lease renewal ([`RedisMaintenance::run`]).
pub struct MaintenanceService(pub RedisMaintenance);

#[async_trait]
impl BackgroundService for MaintenanceService {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.run(shutdown).await
    }
}

/// Reload on SIGHUP ([`ReloadOnHangup::run`]).
pub struct ReloadService(pub ReloadOnHangup);

#[async_trait]
impl BackgroundService for ReloadService {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.run(shutdown).await
    }
}

/// The usage earlier processes settled after a reload's handover, taken
/// as they leave it ([`Limiter::take_tails`]).
pub struct TailsService(pub Limiter);

#[async_trait]
impl BackgroundService for TailsService {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.take_tails(shutdown).await
    }
}

/// Ends the requests still running as the grace period (`0`) ends, a
/// second before the runtimes stop
/// ([`crate::gateway::client::end_requests_before`]).
pub struct EndRequestsService(pub std::time::Duration);

#[async_trait]
impl BackgroundService for EndRequestsService {
    async fn start(&self, shutdown: ShutdownWatch) {
        crate::gateway::client::end_requests_before(self.0, shutdown).await
    }
}

/// Releases the pid file's start lock once the API listens, or the
/// process stops ([`crate::reload::release_start_lock_when_listening`]).
pub struct StartLockService(pub std::net::SocketAddr);

#[async_trait]
impl BackgroundService for StartLockService {
    async fn start(&self, shutdown: ShutdownWatch) {
        crate::reload::release_start_lock_when_listening(self.0, shutdown).await
    }
}
