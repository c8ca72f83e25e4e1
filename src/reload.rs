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
//! Triggers: SIGHUP to the process, or `runestone reload --config FILE`,
//! which finds the running process through `server.pid_file`, sends it
//! SIGHUP when FILE is the file it runs on (so that its successor is its
//! own child, with its stdout and stderr, where the access log goes), and
//! waits until a process started after the command has taken over.
//!
//! SIGHUP is held back from the start of the process ([`hold_hangups`])
//! until [`ReloadOnHangup`] listens, so one arriving while a new process
//! starts waits for it instead of killing it; a process that has asked for
//! its successor listens no more, so a second SIGHUP cannot start a second
//! one.

use crate::config::Config;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// How long `runestone reload` waits for a new process to take over.
const HANDOVER_WAIT: Duration = Duration::from_secs(30);

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
    /// The running process was asked, but no new one took over in time.
    #[error(
        "no new process took over from process {pid} within {}s (the pid file {path} still names {named}); the gateway's log says why",
        HANDOVER_WAIT.as_secs()
    )]
    NoHandover {
        /// The process last asked to hand over.
        pid: Pid,
        /// The pid file.
        path: String,
        /// What the pid file named at the end.
        named: String,
    },
}

/// Blocks SIGHUP in the calling thread and so in every thread it starts:
/// called first thing in `main`, it holds a SIGHUP back until
/// [`ReloadOnHangup`] listens for it, instead of letting its default action
/// end a process that has written its pid file but not yet started its
/// services (a second reload right after a first).
pub fn hold_hangups() {
    if let Err(e) = hangup().thread_block() {
        warn!(error = %e, "cannot hold SIGHUP back while starting");
    }
}

fn hangup() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGHUP);
    set
}

/// The pid the pid file names, when it is a running runestone process.
fn running_pid(pid_file: &str) -> Result<Pid, ReloadError> {
    let not_running = |reason: String| ReloadError::NotRunning {
        path: pid_file.to_string(),
        reason,
    };
    let text = std::fs::read_to_string(pid_file).map_err(|e| not_running(e.to_string()))?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| not_running(format!("'{}' is not a pid", text.trim())))?;
    let pid = Pid::from_raw(pid);
    kill(pid, None).map_err(|e| not_running(format!("process {pid}: {e}")))?;
    if !is_runestone(pid) {
        return Err(not_running(format!(
            "process {pid} is not runestone (a stale pid file?)"
        )));
    }
    Ok(pid)
}

/// Starts a new process on `path` with `--upgrade`, then tells the process
/// `old` to hand over its sockets and drain. Nothing is sent when the new
/// process cannot be started.
fn upgrade(path: &Path, old: Pid, daemon: bool) -> Result<(), ReloadError> {
    let exe = std::env::current_exe().map_err(ReloadError::Spawn)?;
    let mut command = Command::new(exe);
    command.arg("--config").arg(path).arg("--upgrade");
    if daemon {
        command.arg("--daemon");
    }
    let mut child = command.spawn().map_err(ReloadError::Spawn)?;
    // The new process asks for the sockets until the old one sends them
    // (a daemon asks before it detaches, so the signal comes first).
    let _ = kill(old, Signal::SIGQUIT);
    if daemon {
        // The daemon's parent exits once the child is detached.
        let _ = child.wait();
    }
    Ok(())
}

/// `runestone reload --config FILE`: validate, then have the running
/// process (found through `server.pid_file`) hand over to a new process on
/// the file. Returns once the pid file names a runestone process started
/// after this command (it read the file after it was validated here), or
/// fails after [`HANDOVER_WAIT`]. A process in the pid file that started
/// before (a previous reload's, not yet serving this file) is asked in turn.
pub fn reload_running(path: &Path) -> Result<Pid, ReloadError> {
    let config = Config::load(path)?;
    let pid_file = config.server.pid_file.as_str();
    let since = start_time(Pid::this());
    let deadline = Instant::now() + HANDOVER_WAIT;
    let mut asked: Option<Pid> = None;
    loop {
        match (running_pid(pid_file), asked) {
            (Ok(pid), Some(_)) if start_time(pid) >= since => return Ok(pid),
            (Ok(pid), _) if asked != Some(pid) => {
                ask(pid, path, pid_file)?;
                asked = Some(pid);
            }
            (Err(e), None) => return Err(e),
            // Asked; the old process drains while the new one starts (the
            // pid file may be missing or name the old one meanwhile).
            _ => {}
        }
        if Instant::now() >= deadline {
            let named = std::fs::read_to_string(pid_file)
                .map(|text| text.trim().to_string())
                .unwrap_or_else(|e| e.to_string());
            return Err(ReloadError::NoHandover {
                pid: asked.unwrap_or(Pid::this()),
                path: pid_file.to_string(),
                named,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asks `pid` to hand over to a process on `path`: SIGHUP when it runs on
/// that file (its successor is its child and writes where it does), else a
/// daemon started from here takes the sockets.
fn ask(pid: Pid, path: &Path, pid_file: &str) -> Result<(), ReloadError> {
    if serves(pid, path) {
        kill(pid, Signal::SIGHUP).map_err(|e| ReloadError::NotRunning {
            path: pid_file.to_string(),
            reason: format!("process {pid}: {e}"),
        })
    } else {
        upgrade(path, pid, true)
    }
}

/// When `pid` started, in clock ticks since boot (`/proc/<pid>/stat`), or
/// 0 when unknown.
fn start_time(pid: Pid) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command's name, in parentheses, may hold spaces: count the
    // fields after its closing one (the state is field 3, the start 22).
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .and_then(|ticks| ticks.parse().ok())
        .unwrap_or(0)
}

/// Whether `pid` runs this command's program: the same name, or the same
/// executable (an upgraded binary shows its old one as deleted).
fn is_runestone(pid: Pid) -> bool {
    let comm = |pid: &str| std::fs::read(format!("/proc/{pid}/comm")).ok();
    if comm(&pid.to_string()).is_some_and(|theirs| Some(theirs) == comm("self")) {
        return true;
    }
    let exe = |pid: &str| {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| {
                p.to_string_lossy()
                    .trim_end_matches(" (deleted)")
                    .to_string()
            })
    };
    exe(&pid.to_string()).is_some_and(|theirs| Some(theirs) == exe("self"))
}

/// Whether the process `pid` runs with `--config` naming `path` (read from
/// its command line, relative to its working directory).
fn serves(pid: Pid, path: &Path) -> bool {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let Ok(cmdline) = std::fs::read(proc.join("cmdline")) else {
        return false;
    };
    let Some(named) = config_arg(&cmdline) else {
        return false;
    };
    let named = Path::new(std::ffi::OsStr::from_bytes(named));
    let Ok(cwd) = std::fs::read_link(proc.join("cwd")) else {
        return false;
    };
    match (cwd.join(named).canonicalize(), path.canonicalize()) {
        (Ok(theirs), Ok(ours)) => theirs == ours,
        _ => false,
    }
}

/// The value of `--config` in a NUL-separated command line, in each form
/// the command accepts: `--config FILE`, `--config=FILE`, `-c FILE`,
/// `-cFILE`, and after other short switches (`-dc FILE`, `-dcFILE`).
fn config_arg(cmdline: &[u8]) -> Option<&[u8]> {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).skip(1).collect();
    for (i, arg) in args.iter().enumerate() {
        if *arg == b"--" {
            return None;
        }
        if *arg == b"--config" {
            return args.get(i + 1).copied();
        }
        if let Some(value) = arg.strip_prefix(b"--config=") {
            return Some(value);
        }
        if let Some(switches) = arg.strip_prefix(b"-").filter(|s| !s.starts_with(b"-")) {
            if let Some(at) = switches.iter().position(|&b| b == b'c') {
                let value = &switches[at + 1..];
                return if value.is_empty() {
                    args.get(i + 1).copied()
                } else {
                    Some(value)
                };
            }
        }
    }
    None
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
    /// Waits for SIGHUP until `shutdown` turns true, or until it has asked
    /// for a successor: this process is then handing over and draining,
    /// and a second SIGHUP is ignored (the successor reloads on its own).
    pub async fn run(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            error!("cannot listen for SIGHUP; reload with `runestone reload`");
            return;
        };
        // Listening now: let the SIGHUP held back since the start in (the
        // handler stays installed for the process's life, so one arriving
        // after this returns is ignored).
        if let Err(e) = hangup().thread_unblock() {
            error!(error = %e, "cannot let SIGHUP in; reload with `runestone reload`");
            return;
        }
        loop {
            tokio::select! {
                _ = hangups.recv() => {}
                _ = shutdown.changed() => return,
            }
            match Config::load(&self.path) {
                Err(e) => error!("reload refused, the running config keeps serving: {e}"),
                Ok(_) => {
                    info!(config = %self.path.display(), "SIGHUP: handing over to a process on the new config");
                    match upgrade(&self.path, Pid::this(), self.daemon) {
                        Ok(()) => return,
                        Err(e) => error!("reload failed, the running config keeps serving: {e}"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::config_arg;

    fn named(args: &[&str]) -> Option<String> {
        let cmdline = args.join("\0");
        config_arg(cmdline.as_bytes()).map(|v| String::from_utf8_lossy(v).into_owned())
    }

    #[test]
    fn the_config_is_found_in_every_form_the_command_takes() {
        let f = Some("a.yaml".to_string());
        assert_eq!(named(&["runestone", "--config", "a.yaml"]), f);
        assert_eq!(named(&["runestone", "--config=a.yaml", "-d"]), f);
        assert_eq!(named(&["runestone", "-d", "-c", "a.yaml"]), f);
        assert_eq!(named(&["runestone", "-ca.yaml"]), f);
        assert_eq!(named(&["runestone", "-dc", "a.yaml"]), f);
        assert_eq!(named(&["runestone", "-udca.yaml"]), f);
        assert_eq!(named(&["runestone", "--upgrade", "--daemon"]), None);
        assert_eq!(named(&["runestone", "--", "-c", "a.yaml"]), None);
        // The program's own name is not an argument.
        assert_eq!(named(&["-c", "--daemon"]), None);
    }
}
