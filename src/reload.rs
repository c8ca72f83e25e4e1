//! Reloading the config without a restart.
//!
//! A reload is a graceful upgrade onto the new config: the config is read
//! and validated first (a broken one is reported and the running process
//! keeps serving); then a new process starts with `--upgrade`, the running
//! one gets SIGQUIT and hands it the listening sockets, and drains its
//! in-flight requests for `grace_period_seconds` while the new one serves.
//! Tenants, keys, limits, pricing, routes and providers all change at once,
//! and no request is refused or cut. In-process counters (limits without
//! Redis, the in-process overflow queue) start afresh in the new process;
//! with `redis:` they are shared and carry over.
//!
//! Triggers: `runestone reload --config FILE` (it finds the running process
//! through `server.pid_file`), or SIGHUP to the process itself.

use crate::config::Config;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::Command;
use tracing::{error, info};

/// Why a reload did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config has problems; nothing changed.
    #[error("{0}")]
    Invalid(#[from] crate::config::ConfigError),
    /// No running gateway was found through the pid file.
    #[error("no running runestone found through the pid file {path}: {reason}")]
    NotRunning {
        /// The pid file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The new process could not be started.
    #[error("cannot start the new process: {0}")]
    Spawn(std::io::Error),
}

/// Reads the pid of the running gateway from the config's pid file.
fn running_pid(config: &Config) -> Result<Pid, ReloadError> {
    let path = &config.server.pid_file;
    let not_running = |reason: String| ReloadError::NotRunning {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| not_running(e.to_string()))?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| not_running(format!("'{}' is not a pid", text.trim())))?;
    let pid = Pid::from_raw(pid);
    kill(pid, None).map_err(|e| not_running(format!("process {pid}: {e}")))?;
    Ok(pid)
}

/// Validates `path`, starts a new process on it with `--upgrade`, and tells
/// the process `old` to hand over its sockets and drain.
fn upgrade(path: &Path, old: Pid, daemon: bool) -> Result<(), ReloadError> {
    let exe = std::env::current_exe().map_err(ReloadError::Spawn)?;
    let mut command = Command::new(exe);
    command.arg("--config").arg(path).arg("--upgrade");
    if daemon {
        command.arg("--daemon");
    }
    // The old process retries handing the sockets over until the new one
    // listens for them, so the order of these two steps does not matter.
    let _ = kill(old, Signal::SIGQUIT);
    let mut child = command.spawn().map_err(ReloadError::Spawn)?;
    if daemon {
        // The daemon's parent exits once the child is detached.
        let _ = child.wait();
    }
    Ok(())
}

/// `runestone reload --config FILE`: validate, then upgrade the running
/// process (found through `server.pid_file`) onto the file.
pub fn reload_running(path: &Path) -> Result<(), ReloadError> {
    let config = Config::load(path)?;
    let old = running_pid(&config)?;
    upgrade(path, old, true)
}

/// Background service: on SIGHUP, re-read the config file and, when it is
/// valid, hand over to a new process running it.
pub struct ReloadOnHangup {
    path: PathBuf,
    daemon: bool,
}

impl ReloadOnHangup {
    /// Reloads `path`; `daemon` when this process runs daemonized.
    pub fn new(path: PathBuf, daemon: bool) -> Self {
        ReloadOnHangup { path, daemon }
    }
}

impl ReloadOnHangup {
    /// Waits for SIGHUP until `shutdown` turns true.
    pub async fn run(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            error!("cannot listen for SIGHUP; reload with `runestone reload`");
            return;
        };
        loop {
            tokio::select! {
                _ = hangups.recv() => {}
                _ = shutdown.changed() => return,
            }
            match Config::load(&self.path) {
                Err(e) => error!("reload refused, the running config keeps serving: {e}"),
                Ok(_) => {
                    info!(config = %self.path.display(), "SIGHUP: handing over to a process on the new config");
                    if let Err(e) = upgrade(&self.path, Pid::this(), self.daemon) {
                        error!("reload failed, the running config keeps serving: {e}");
                    }
                }
            }
        }
    }
}
