//! Reloading the config without a restart.
//!
//! A reload is a graceful upgrade onto the new config: the config is read
//! and validated first (a broken one is reported and the running process
//! keeps serving); then the running process starts its successor with
//! `--upgrade`, hands it the listening sockets (on SIGQUIT, which it sends
//! itself), accepts beside it for Pingora's 5 s and drains its in-flight
//! requests for `grace_period_seconds`. Tenants, keys, limits, pricing,
//! routes and providers all change at once, and no request is refused or
//! cut. Without Redis the new process is handed each tenant's usage in its
//! period (budgets, `/v1/usage`); the other in-process counters (rate
//! windows, concurrency, the in-process overflow queue) start afresh; with
//! `redis:` they are shared and carry over.
//!
//! Triggers: SIGHUP to the process (its own file, its own binary), or
//! `runestone reload --config FILE`, which finds the running process through
//! `server.pid_file`, leaves it a [`Request`] naming FILE and the command's
//! own binary, sends it SIGHUP, and waits until a process started after the
//! command listens. The successor is always the running process's child,
//! so it writes its access log and logs where the running one did.
//!
//! SIGHUP is held back from the start of the process ([`hold_hangups`])
//! until [`ReloadOnHangup`] listens, so one arriving while a new process
//! starts waits for it instead of killing it; a process that has started its
//! successor listens no more, so a second SIGHUP cannot start a second one.

use crate::config::Config;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// How long `runestone reload` waits for a new process to take over.
const HANDOVER_WAIT: Duration = Duration::from_secs(60);

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
    /// The request for the running process could not be written.
    #[error("cannot write the reload request {path}: {error} (is the pid file in a directory others can write, like /tmp? keep it in one of the gateway's user's)")]
    Request {
        /// The request's file.
        path: String,
        /// What went wrong.
        error: std::io::Error,
    },
    /// The running process was asked, but no new one took over in time.
    #[error(
        "no new process took over from process {pid} within {}s (the pid file {path} names {named}); the gateway's log says why",
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
    /// The config takes values from the environment that differ here from
    /// the running process's, which its successor inherits.
    #[error("the config takes {} from the environment, and this command's values differ from those process {pid} started with: a reload's new process is its child, with its environment, so it would not see them; restart the gateway to change them (nothing was changed)", names.join(", "))]
    Environment {
        /// The running process.
        pid: Pid,
        /// The variables whose values differ (never the values).
        names: Vec<String>,
    },
    /// The running process refused the request (its log says so too).
    #[error("process {pid} refused the reload and keeps serving: {reason}")]
    Refused {
        /// The process asked.
        pid: Pid,
        /// Why, as it logged it.
        reason: String,
    },
    /// A new process took over on another file than the one asked for
    /// (another reload at the same time, or the request not taken).
    #[error("process {pid} took over, but not with {exe} on {config} (another reload at the same time? the gateway's log says why)")]
    Superseded {
        /// The new process.
        pid: Pid,
        /// The file asked for.
        config: String,
        /// The binary asked for.
        exe: String,
    },
    /// A new process took over but does not listen on the config's address.
    #[error(
        "process {pid} took over but does not listen on {listen} after {}s (the address taken?); the gateway's log says why",
        HANDOVER_WAIT.as_secs()
    )]
    NotListening {
        /// The new process.
        pid: Pid,
        /// The address the config names.
        listen: std::net::SocketAddr,
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

/// What `runestone reload` asks of the running process, left beside its
/// pid file (`<pid_file>.reload.<pid>`) before the SIGHUP: the process it
/// is for, the binary to run and the config to run it on. Taken only by that
/// process, only from a regular file of its own user's (or root's) that no
/// one else may write: whoever can leave one chooses what the gateway runs.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    exe: PathBuf,
    config: PathBuf,
}

impl Request {
    /// Where the request for `pid` is left: a name of its own, so that one
    /// the process could not remove (a request of root's in a shared
    /// directory) is in no later process's way.
    fn file(pid_file: &str, pid: Pid) -> String {
        format!("{pid_file}.reload.{pid}")
    }

    /// Leaves the request for `pid` (written aside and renamed, mode 0644:
    /// the paths are no secret).
    fn leave(&self, pid_file: &str, pid: Pid) -> Result<(), ReloadError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = Self::file(pid_file, pid);
        let aside = format!("{path}.{}", std::process::id());
        let mut text = format!("{pid}\0{}\0", start_time(pid)).into_bytes();
        text.extend_from_slice(self.exe.as_os_str().as_bytes());
        text.push(0);
        text.extend_from_slice(self.config.as_os_str().as_bytes());
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            // Readable by the gateway's user when root writes it.
            .mode(0o644)
            .open(&aside)
            .and_then(|mut file| file.write_all(&text))
            .and_then(|()| std::fs::rename(&aside, &path))
            .map_err(|error| {
                let _ = std::fs::remove_file(&aside);
                ReloadError::Request { path, error }
            })
    }

    /// Takes the request left for this process, if there is one (a request
    /// for another process is left where it is).
    fn take(pid_file: &str) -> Option<Request> {
        let path = Self::file(pid_file, Pid::this());
        let meta = std::fs::symlink_metadata(&path).ok()?;
        if !trusted(&meta, 64 * 1024) {
            warn!(request = %path, "ignoring a reload request that is not a file of this user's, or that others may write");
            return None;
        }
        let text = std::fs::read(&path).ok()?;
        let request = Self::parse(&text, Pid::this(), start_time(Pid::this()))?;
        let _ = std::fs::remove_file(&path);
        Some(request)
    }

    /// Where this process says why it refused the request for `pid`.
    fn refusal(pid_file: &str, pid: Pid) -> String {
        format!("{}.refused", Self::file(pid_file, pid))
    }

    /// Tells the command waiting on this process's request why it was
    /// refused (mode 0600: a config's problems are for the operator).
    fn refuse(pid_file: &str, reason: &str) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = Self::refusal(pid_file, Pid::this());
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&path)
            .and_then(|mut file| file.write_all(reason.as_bytes()));
        if let Err(e) = written {
            warn!(path = %path, error = %e, "cannot write why the reload was refused");
        }
    }

    /// Why `pid` refused the request left for it, if it did: read from a
    /// file of its own user's (or root's), then removed.
    fn refused(pid_file: &str, pid: Pid) -> Option<String> {
        let path = Self::refusal(pid_file, pid);
        let meta = std::fs::symlink_metadata(&path).ok()?;
        let theirs = std::fs::metadata(format!("/proc/{pid}")).ok()?.uid();
        if !meta.is_file() || (meta.uid() != theirs && meta.uid() != 0) || meta.len() > 64 * 1024 {
            return None;
        }
        let reason = std::fs::read_to_string(&path).ok()?;
        let _ = std::fs::remove_file(&path);
        Some(reason)
    }

    /// The request in `text` when it is for the process `me`, started at
    /// `started` (a later process given the same pid, as in a container
    /// started afresh, does not take an old one).
    fn parse(text: &[u8], me: Pid, started: u64) -> Option<Request> {
        let mut parts = text.split(|&b| b == 0);
        let mut number = || std::str::from_utf8(parts.next()?).ok()?.parse::<u64>().ok();
        let (pid, start) = (number()?, number()?);
        if pid != u64::try_from(me.as_raw()).ok()? || start != started {
            return None;
        }
        let exe = PathBuf::from(OsStr::from_bytes(parts.next()?));
        let config = PathBuf::from(OsStr::from_bytes(parts.next()?));
        parts.next().is_none().then_some(Request { exe, config })
    }
}

/// Whether a file left for this process (`meta`, not followed through a
/// symlink) may be believed: a regular file of this user's (or root's) that
/// no one else may write, under `most` bytes.
pub(crate) fn trusted(meta: &std::fs::Metadata, most: u64) -> bool {
    let owner = meta.uid();
    meta.is_file()
        && (owner == 0 || owner == nix::unistd::geteuid().as_raw())
        && meta.mode() & 0o022 == 0
        && meta.len() < most
}

/// This process's binary, where it is now: an upgrade that replaced the
/// file leaves the running process's link reading `... (deleted)`, and
/// the path without that is the new binary.
fn own_exe() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(
        match exe.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
            Some(path) if Path::new(path).exists() => PathBuf::from(path),
            _ => exe,
        },
    )
}

/// The pid the pid file names, when it is a running runestone process
/// (see [`is_runestone`]).
fn running_pid(pid_file: &str) -> Result<Pid, ReloadError> {
    let not_running = |reason: String| ReloadError::NotRunning {
        path: pid_file.to_string(),
        reason,
    };
    match std::fs::symlink_metadata(pid_file) {
        Ok(meta) if meta.is_symlink() => {
            return Err(not_running(
                "it is a symlink (planted in a shared directory?)".into(),
            ))
        }
        Ok(meta) if meta.mode() & 0o002 != 0 => {
            return Err(not_running(
                "anyone may write it (planted in a shared directory?)".into(),
            ))
        }
        _ => {}
    }
    let text = std::fs::read_to_string(pid_file).map_err(|e| not_running(e.to_string()))?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| not_running(format!("'{}' is not a pid", text.trim())))?;
    let pid = Pid::from_raw(pid);
    if pid.as_raw() <= 0 {
        return Err(not_running(format!("'{pid}' is not a pid")));
    }
    kill(pid, None).map_err(|e| not_running(format!("process {pid}: {e}")))?;
    if !is_runestone(pid) {
        return Err(not_running(format!(
            "process {pid} is not runestone (a stale pid file?)"
        )));
    }
    Ok(pid)
}

/// The running runestone, other than this process, that `pid_file` names:
/// a gateway started on a pid file another one serves on would write its
/// own pid over it (so that reloads reach the wrong process) and then wait
/// for a port that stays taken. `None` when there is none (no file, a stale
/// pid, another program's).
pub fn another_running_on(pid_file: &str) -> Option<i32> {
    running_pid(pid_file)
        .ok()
        .map(Pid::as_raw)
        .filter(|pid| *pid != Pid::this().as_raw())
}

/// Whether a gateway may start afresh (not as a reload's successor) on
/// `pid_file`, to listen on `listen`; why not, when it may not. It may not
/// while the gateway the pid file names serves there (it would write its
/// own pid over that one's, so that reloads reached it, and wait for the
/// taken port), nor when another program holds the address (Pingora would
/// retry it for 30 s, then fail in its listener and leave a process that
/// serves nothing). It may while that gateway drains its grace period (it
/// listens no more). On `Ok` this process holds the pid file's start lock
/// until it listens, so that of two started at the same moment one finds
/// the other serving.
pub fn may_start(pid_file: &str, listen: std::net::SocketAddr) -> Result<(), String> {
    let running =
        || another_running_on(pid_file).filter(|&pid| listens(Pid::from_raw(pid), listen));
    let lock = lock_for_start(pid_file, || running().is_some());
    // One told to stop a moment ago (`kill` then a start at once) may not
    // have closed its listener yet: given two seconds to do so.
    let settled = Instant::now() + Duration::from_secs(2);
    while running().is_some() && Instant::now() < settled {
        std::thread::sleep(Duration::from_millis(20));
    }
    // It did, while this start waited without the lock: the lock is taken
    // now, so that of two starts waiting so, one finds the other serving.
    if lock == StartLock::Refused && running().is_none() {
        lock_for_start(pid_file, || running().is_some());
    }
    if let Some(pid) = running() {
        return Err(format!("runestone already runs on the pid file {pid_file} (process {pid}); stop it first, or reload it: runestone reload --config FILE"));
    }
    std::net::TcpListener::bind(listen)
        .map(drop)
        .map_err(|e| format!("cannot listen on server.listen {listen}: {e}"))
}

/// The pid file held locked by a gateway starting afresh, from before it
/// looks for another gateway on it ([`another_running_on`]) until it
/// listens ([`release_start_lock_when_listening`]): two started at the same
/// moment would both find none, and the one left waiting for the taken port
/// could write its pid over the one that serves.
static STARTING: std::sync::Mutex<Option<nix::fcntl::Flock<std::fs::File>>> =
    std::sync::Mutex::new(None);

/// How long a start waits for another one starting on the same pid file.
const START_WAIT: Duration = Duration::from_secs(30);

/// What [`lock_for_start`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartLock {
    /// This process holds the lock until it listens.
    Held,
    /// Not taken: another gateway serves on the pid file (the start is
    /// refused, unless that one stops: then the lock is to be taken again).
    Refused,
    /// Not taken, and not to be had (a pid file of another user's, a
    /// symlink, an unwritable directory, a wait past [`START_WAIT`]): the
    /// start goes on without it, as before there was one.
    Unavailable,
}

/// Locks `pid_file` (created empty when missing; never through a symlink
/// nor one of another user's) for this start, waiting while another start
/// holds it, for up to [`START_WAIT`], or until `refused` (another gateway
/// serves: a daemon holds its pid file locked for its life).
fn lock_for_start(pid_file: &str, refused: impl Fn() -> bool) -> StartLock {
    use nix::fcntl::{Flock, FlockArg};
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(pid_file);
    let mut file = match file {
        Ok(file)
            if file
                .metadata()
                .is_ok_and(|m| m.uid() == nix::unistd::geteuid().as_raw()) =>
        {
            file
        }
        // Another user's, or none to open: the pid file's own write says so.
        _ => return StartLock::Unavailable,
    };
    let deadline = Instant::now() + START_WAIT;
    let mut said = false;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => {
                *crate::lock(&STARTING) = Some(locked);
                return StartLock::Held;
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if refused() => return StartLock::Refused,
            Err((back, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                if !std::mem::replace(&mut said, true) {
                    info!(pid_file, "another gateway is starting on the pid file (or a daemon on it drains): waiting for it, up to 30 s");
                }
                file = back;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err((_, e)) => {
                warn!(pid_file, error = %e, "cannot lock the pid file for the start; starting without it");
                return StartLock::Unavailable;
            }
        }
    }
}

/// Releases the lock [`lock_for_start`] took once this process listens on
/// `listen`, or once it is told to stop (`shutdown`: it will not listen any
/// more, and a gateway started in its place must not wait for it), or after
/// [`START_WAIT`] (its listener is not coming). Looked for every 20 ms, so
/// a process stopped moments after it began to listen (a restart by hand)
/// could be missed listening; the stop releases it then.
pub async fn release_start_lock_when_listening(
    listen: std::net::SocketAddr,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    if crate::lock(&STARTING).is_none() {
        return;
    }
    let deadline = Instant::now() + START_WAIT;
    while !*shutdown.borrow() && !listens(Pid::this(), listen) && Instant::now() < deadline {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            // A closed channel: the server is going away too.
            _ = shutdown.changed() => break,
        }
    }
    crate::lock(&STARTING).take();
}

/// `runestone reload --config FILE`: validate, then have the running
/// process (found through `server.pid_file`) hand over to a new process on
/// the file, running this command's binary. Returns the new process once
/// the pid file names a runestone process started after this command (it
/// read the file after it was validated here) and that process listens on
/// the config's address; fails after [`HANDOVER_WAIT`]. A process in the
/// pid file that started before (a previous reload's) is asked in turn.
pub fn reload_running(path: &Path) -> Result<Pid, ReloadError> {
    let config = Config::load(path)?;
    let pid_file = config.server.pid_file.as_str();
    let request = Request {
        exe: own_exe().map_err(|error| ReloadError::Request {
            path: "this binary's path".to_string(),
            error,
        })?,
        config: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
    };
    let since = start_time(Pid::this());
    let deadline = Instant::now() + HANDOVER_WAIT;
    let mut asked: Option<Pid> = None;
    loop {
        match (running_pid(pid_file), asked) {
            (Ok(pid), Some(_)) if start_time(pid) >= since => {
                if !runs(pid, &request) {
                    return Err(ReloadError::Superseded {
                        pid,
                        config: request.config.display().to_string(),
                        exe: request.exe.display().to_string(),
                    });
                }
                // A request of another command's left for the process that
                // handed over (two reloads at once): no one takes it now.
                if let Some(asked) = asked {
                    let _ = std::fs::remove_file(Request::file(pid_file, asked));
                }
                return listening(pid, config.server.listen, deadline);
            }
            (Ok(pid), _) if asked != Some(pid) => {
                let names = environment_differences(path, pid);
                if !names.is_empty() {
                    return Err(ReloadError::Environment { pid, names });
                }
                request.leave(pid_file, pid)?;
                kill(pid, Signal::SIGHUP).map_err(|e| ReloadError::NotRunning {
                    path: pid_file.to_string(),
                    reason: format!("process {pid}: {e}"),
                })?;
                asked = Some(pid);
            }
            (Err(e), None) => return Err(e),
            (_, Some(pid)) if let Some(reason) = Request::refused(pid_file, pid) => {
                return Err(ReloadError::Refused { pid, reason });
            }
            // Asked; the old process hands over while the new one starts
            // (the pid file may be missing or name the old one meanwhile).
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

/// The variables the config at `path` takes from the environment
/// (`${NAME}`) whose value in this command's environment is not the one
/// `pid` started with (when its environment can be read: this user's
/// process, or root's command).
fn environment_differences(path: &Path, pid: Pid) -> Vec<String> {
    use std::os::unix::ffi::OsStringExt;
    let (Ok(text), Ok(environ)) = (
        std::fs::read_to_string(path),
        std::fs::read(format!("/proc/{pid}/environ")),
    ) else {
        return Vec::new();
    };
    let theirs: std::collections::HashMap<&[u8], &[u8]> = environ
        .split(|&b| b == 0)
        .filter_map(|pair| {
            let eq = pair.iter().position(|&b| b == b'=')?;
            Some((&pair[..eq], &pair[eq + 1..]))
        })
        .collect();
    let names = std::cell::RefCell::new(std::collections::BTreeSet::new());
    let _ = Config::from_yaml(&text, |name| {
        names.borrow_mut().insert(name.to_string());
        std::env::var(name).ok()
    });
    names
        .into_inner()
        .into_iter()
        .filter(|name| {
            let ours = std::env::var_os(name).map(OsStringExt::into_vec);
            ours.as_deref() != theirs.get(name.as_bytes()).copied()
        })
        .collect()
}

/// Whether `pid` runs what `request` asked for: its binary, started with
/// `--config` and the absolute path (as the gateway starts its successor).
fn runs(pid: Pid, request: &Request) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let config = request.config.as_os_str().as_bytes();
    args.windows(2)
        .any(|pair| pair[0] == b"--config" && pair[1] == config)
        && exe_of(&pid.to_string()).is_some_and(|exe| exe == request.exe)
}

/// Waits until `pid` listens on `listen` (a socket it got from the old
/// process, or bound itself when the address changed), until `deadline`.
fn listening(
    pid: Pid,
    listen: std::net::SocketAddr,
    deadline: Instant,
) -> Result<Pid, ReloadError> {
    while !listens(pid, listen) {
        if Instant::now() >= deadline {
            return Err(ReloadError::NotListening { pid, listen });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(pid)
}

/// Whether one of `pid`'s own sockets listens on TCP `listen` (its
/// descriptors' socket inodes against its network namespace's tables).
fn listens(pid: Pid, listen: std::net::SocketAddr) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let sockets: std::collections::HashSet<String> = fds
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_str()?;
            Some(
                link.strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    ["tcp", "tcp6"].iter().any(|table| {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            return false;
        };
        text.lines().skip(1).any(|row| {
            let fields: Vec<&str> = row.split_whitespace().collect();
            // local address, state (0A: listening), inode
            matches!(fields.as_slice(), [_, local, _, "0A", _, _, _, _, _, inode, ..]
                if table_address(local) == Some(listen) && sockets.contains(*inode))
        })
    })
}

/// An address as `/proc/net/tcp{,6}` shows it: the address's bytes as
/// host-order 32-bit words in hex, a colon, the port in hex.
fn table_address(text: &str) -> Option<std::net::SocketAddr> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    if address.len() != 8 && address.len() != 32 {
        return None;
    }
    let mut bytes = Vec::with_capacity(16);
    for word in address.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match <[u8; 4]>::try_from(bytes.as_slice()) {
        Ok(v4) => std::net::IpAddr::from(v4),
        Err(_) => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
    };
    Some(std::net::SocketAddr::new(ip, port))
}

/// When `pid` started, in clock ticks since boot (`/proc/<pid>/stat`), or
/// 0 when unknown.
pub(crate) fn start_time(pid: Pid) -> u64 {
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

/// The binary `pid` (or `self`) runs, as its path was when it started.
fn exe_of(pid: &str) -> Option<PathBuf> {
    let link = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let link = link.to_string_lossy();
    Some(PathBuf::from(
        link.strip_suffix(" (deleted)").unwrap_or(&link),
    ))
}

/// Whether `pid` runs this command's program: the same binary, or one of
/// the same name elsewhere (a new version installed beside the old), or of
/// the same name but for a version after it (a versioned binary,
/// `runestone-1.4`, that a `runestone` link pointed to before an upgrade
/// moved it on). A script named like it runs its interpreter, and
/// is not.
fn is_runestone(pid: Pid) -> bool {
    match (exe_of(&pid.to_string()), exe_of("self")) {
        (Some(theirs), Some(ours)) => {
            theirs == ours
                || theirs.file_name() == ours.file_name()
                || program(&theirs).is_some_and(|theirs| program(&ours) == Some(theirs))
        }
        _ => false,
    }
}

/// A binary's name without a version after it (`runestone-1.4`,
/// `runestone_v2`: `runestone`; `runestone-mock` is another program).
fn program(path: &Path) -> Option<&str> {
    let name = path.file_name()?.to_str()?;
    let versioned = name.char_indices().find(|&(at, c)| {
        let rest = &name[at + c.len_utf8()..];
        let rest = rest.strip_prefix('v').unwrap_or(rest);
        at > 0 && matches!(c, '-' | '_' | '.') && rest.starts_with(|c: char| c.is_ascii_digit())
    });
    Some(versioned.map_or(name, |(at, _)| &name[..at]))
}

/// Background service: on SIGHUP, re-read the config file (or the one a
/// [`Request`] names) and, when it is valid, hand over to a new process
/// running it.
pub struct ReloadOnHangup {
    path: PathBuf,
    daemon: bool,
    pid_file: String,
    upgrade_sock: String,
    listen: std::net::SocketAddr,
    /// What the new process is told of this one's state, as environment
    /// variables (see [`ReloadOnHangup::handing`]).
    handover: Option<Handover>,
}

/// Writes the environment variables a reload hands the new process.
type Handover = Box<dyn Fn() -> Vec<(&'static str, String)> + Send + Sync>;

/// How long a new process has to start listening on the upgrade socket
/// before the running one gives up on it and keeps serving.
const SUCCESSOR_START: Duration = Duration::from_secs(30);

impl ReloadOnHangup {
    /// Reloads `path`; `daemon` when this process runs daemonized; requests
    /// are looked for beside the pid file, and the sockets handed over
    /// through the upgrade socket, both of `server`.
    pub fn new(path: PathBuf, daemon: bool, server: &crate::config::ServerSettings) -> Self {
        ReloadOnHangup {
            path,
            daemon,
            pid_file: server.pid_file.clone(),
            upgrade_sock: server.upgrade_sock.clone(),
            listen: server.listen,
            handover: None,
        }
    }

    /// Hands each new process the environment variables `handover` writes
    /// when it is started (this process's state that it should count).
    pub fn handing(
        mut self,
        handover: impl Fn() -> Vec<(&'static str, String)> + Send + Sync + 'static,
    ) -> Self {
        self.handover = Some(Box::new(handover));
        self
    }

    /// Waits for SIGHUP until `shutdown` turns true, or until it has started
    /// a successor: this process is then handing over and draining, and a
    /// second SIGHUP is ignored (the successor reloads on its own).
    pub async fn run(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            error!("cannot listen for SIGHUP; restart to change the config");
            return;
        };
        // Listening now: let the SIGHUP held back since the start in (the
        // handler stays installed for the process's life, so one arriving
        // after this returns is ignored).
        if let Err(e) = hangup().thread_unblock() {
            error!(error = %e, "cannot let SIGHUP in; restart to change the config");
            return;
        }
        loop {
            tokio::select! {
                _ = hangups.recv() => {}
                _ = shutdown.changed() => return,
            }
            let request = Request::take(&self.pid_file);
            let asked = request.is_some();
            match self.hand_over(request).await {
                Ok(()) => return,
                Err(e) => {
                    error!("reload failed, the running config keeps serving: {e}");
                    if asked {
                        // The command waiting for the handover says why.
                        Request::refuse(&self.pid_file, &e);
                    }
                }
            }
        }
    }

    /// Starts the successor on the requested (or own) binary and config,
    /// and once it waits for the sockets, has Pingora hand them over
    /// (SIGQUIT). A successor that fails to start gets nothing, and this
    /// process keeps serving.
    async fn hand_over(&self, request: Option<Request>) -> Result<(), String> {
        let (exe, path) = match request {
            Some(Request { exe, config }) => (exe, config),
            None => (
                own_exe().map_err(|e| format!("cannot find this binary: {e}"))?,
                self.path.clone(),
            ),
        };
        let config = Config::load(&path).map_err(|e| e.to_string())?;
        if config.server.listen != self.listen {
            // Checked before anything is handed over: a new process that
            // cannot bind it would serve nothing once this one stops.
            std::net::TcpListener::bind(config.server.listen)
                .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
        }
        if config.server.pid_file != self.pid_file {
            return Err(format!(
                "server.pid_file changed ({} to {}): `runestone reload` finds the gateway, and the new process what the old one leaves, through it, so changing it needs a restart",
                self.pid_file, config.server.pid_file
            ));
        }
        if config.server.upgrade_sock != self.upgrade_sock {
            return Err(format!(
                "server.upgrade_sock changed ({} to {}): the sockets are handed over through it, so changing it needs a restart",
                self.upgrade_sock, config.server.upgrade_sock
            ));
        }
        info!(config = %path.display(), binary = %exe.display(), "SIGHUP: handing over to a process on the new config");
        // Which file is at the path (an inode number may be reused), and
        // whose.
        let socket = |path: &str| {
            std::fs::symlink_metadata(path)
                .ok()
                .map(|m| ((m.ino(), m.ctime(), m.ctime_nsec()), m.uid()))
        };
        let before = socket(&self.upgrade_sock).map(|(file, _)| file);
        let mut command = Command::new(&exe);
        command.arg("--config").arg(&path).arg("--upgrade");
        if self.daemon {
            command.arg("--daemon");
        }
        if let Some(handover) = &self.handover {
            command.envs(handover());
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        // The new process binds the upgrade socket afresh (a new file),
        // then waits a few seconds for the sockets.
        let deadline = Instant::now() + SUCCESSOR_START;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("the new process exited at its start ({status})"));
            }
            let now = socket(&self.upgrade_sock);
            if let Some((_, owner)) = now.filter(|(file, _)| Some(*file) != before) {
                // Only to a socket of this user's: in a shared directory
                // (the default is in /tmp) another user could bind the path
                // first and be sent the listening sockets.
                if owner != nix::unistd::geteuid().as_raw() {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "{} is not this user's socket: not handing the listening sockets to it (keep server.upgrade_sock in a directory of the gateway's user)",
                        self.upgrade_sock
                    ));
                }
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the new process did not wait for the sockets on {} within {}s",
                    self.upgrade_sock,
                    SUCCESSOR_START.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = kill(Pid::this(), Signal::SIGQUIT);
        if self.daemon {
            // Its parent exits once the daemon is detached.
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{listens, table_address, Request};
    use nix::unistd::Pid;
    use std::path::PathBuf;

    #[test]
    fn a_versioned_binary_is_the_same_program_and_another_name_is_not() {
        let program = |name: &str| super::program(std::path::Path::new(name)).map(str::to_owned);
        for name in [
            "/usr/bin/runestone",
            "runestone-1.4",
            "runestone_v2",
            "runestone.2026.12",
            "runestone-v1.4.2",
        ] {
            assert_eq!(program(name).as_deref(), Some("runestone"), "{name}");
        }
        for (name, is) in [
            ("runestone-mock", "runestone-mock"),
            ("runestone-", "runestone-"),
            ("python3", "python3"),
            ("-1", "-1"),
        ] {
            assert_eq!(program(name).as_deref(), Some(is), "{name}");
        }
    }

    #[test]
    fn a_process_listens_only_on_its_own_listening_sockets() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let address = listener.local_addr().unwrap();
        assert!(listens(Pid::this(), address));
        // The same port on another address is not it.
        assert!(!listens(Pid::this(), ([127, 0, 0, 2], port).into()));
        // A connection's own port is not a listening one.
        let client = std::net::TcpStream::connect(address).unwrap();
        assert!(!listens(Pid::this(), client.local_addr().unwrap()));
        drop(listener);
        assert!(!listens(Pid::this(), address));
        // Another process's listener is not this one's.
        assert!(!listens(Pid::from_raw(1), address));
        let v6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        assert!(listens(Pid::this(), v6.local_addr().unwrap()));
    }

    #[tokio::test]
    async fn the_start_lock_is_released_when_the_process_stops_before_it_was_seen_listening() {
        // A gateway stopped moments after it began to listen (a restart by
        // hand) held the lock for 30 s, and the one started in its place
        // waited for it.
        let (_dir, pid_file) = crate::limits::beside::scratch_pid_file();
        super::lock_for_start(&pid_file, || false);
        assert!(
            crate::lock(&super::STARTING).is_some(),
            "locked for the start"
        );
        let other = || {
            let file = std::fs::File::open(&pid_file).unwrap();
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok()
        };
        assert!(!other(), "another start waits");
        // Nothing listens there: only the stop can release it.
        let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = nobody.local_addr().unwrap();
        drop(nobody);
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let release = tokio::spawn(super::release_start_lock_when_listening(address, shutdown));
        tokio::task::yield_now().await;
        assert!(
            crate::lock(&super::STARTING).is_some(),
            "held while starting"
        );
        stop.send(true).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), release)
            .await
            .expect("released at the stop, not after 30 s")
            .unwrap();
        assert!(crate::lock(&super::STARTING).is_none());
        assert!(other(), "the next start takes it");
    }

    #[test]
    fn addresses_read_as_the_kernel_writes_them() {
        // Written in this machine's byte order.
        if cfg!(target_endian = "little") {
            assert_eq!(
                table_address("0100007F:1F90"),
                Some(([127, 0, 0, 1], 8080).into())
            );
            assert_eq!(
                table_address("00000000000000000000000001000000:0050"),
                Some("[::1]:80".parse().unwrap())
            );
        }
        assert_eq!(
            table_address("00000000:0000"),
            Some(([0, 0, 0, 0], 0).into())
        );
        assert_eq!(table_address("0100007F"), None);
        assert_eq!(table_address("01007F:1F90"), None);
    }

    #[test]
    fn a_request_is_taken_only_by_the_process_it_names() {
        let me = Pid::from_raw(4242);
        let request = Some(Request {
            exe: PathBuf::from("/opt/new bin/runestone"),
            config: PathBuf::from("/etc/runestone/other.yaml"),
        });
        assert_eq!(
            Request::parse(
                b"4242\098\0/opt/new bin/runestone\0/etc/runestone/other.yaml",
                me,
                98
            ),
            request
        );
        assert_eq!(Request::parse(b"4243\098\0/x\0/y", me, 98), None);
        // The same pid, another process (started at another time).
        assert_eq!(Request::parse(b"4242\099\0/x\0/y", me, 98), None);
        assert_eq!(Request::parse(b"4242\098\0/x", me, 98), None);
        assert_eq!(Request::parse(b"4242\098\0/x\0/y\0/z", me, 98), None);
        assert_eq!(Request::parse(b"", me, 98), None);
    }
}
