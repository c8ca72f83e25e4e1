//! Without Redis, the usage a process settles after a reload handed its
//! usage to the new process (its requests in flight, and those it accepts
//! until the new one listens): written beside the pid file when the process
//! ends, `<pid_file>.usage.<pid>.<token>`, and counted by the new process,
//! which was told whose files to wait for ([`AWAITED_ENV`]).
//!
//! A new process waits for its predecessor and for the ones its predecessor
//! still waited for (reloads in quick succession); a file is counted by the
//! process that removes it, so by one process only, and one that takes a
//! file after its own handover counts it in its own tail. A writer that has
//! ended without a file (killed) is waited for no more.

use super::beside::{
    alive, files_beside, own_file, read_trusted, remove_half_written, write_aside, Ignored,
};
use crate::lock;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tracing::{info, warn};

/// The environment variable a reload tells the new process in whose files
/// to find the usage settled after the handover: `[[pid, started], ...]`.
pub const AWAITED_ENV: &str = "RUNESTONE_AWAITED_USAGE";

/// The files' kind (`<pid_file>.usage.<pid>.<token>`).
const KIND: &str = "usage";

/// The most a file may hold (a few hundred bytes a tenant).
const MOST_BYTES: u64 = 16 << 20;

/// The most processes waited for at once: each lives its grace period
/// (30 s by default) after its handover, so a reload a second for half a
/// minute leaves thirty to wait for.
const MOST_AWAITED: usize = 1024;

/// How long a file is left for a process to take: one no process took by
/// then (its writer's successor was stopped or killed first) is removed.
const KEPT: Duration = Duration::from_secs(600);

/// A tenant's usage in one period: its id, the period's id, and the
/// counters ([`super::PeriodUsage::counts`]).
pub(super) type Entry = (String, String, [i64; 7]);

/// What a file holds.
#[derive(Debug, Serialize, Deserialize)]
struct Contents {
    /// The writer and when it started (a later process given the same pid
    /// is not the writer).
    pid: i32,
    started: u64,
    usage: Vec<Entry>,
}

/// A process, as a reload names it: its pid and when it started.
type Writer = (i32, u64);

/// This process's side of the tails: the writers it waits for, and whether
/// it has handed its usage over (and so leaves a tail when it ends).
#[derive(Debug)]
pub(super) struct Tails {
    pid_file: PathBuf,
    /// Files left alone as untrusted or unreadable (said once each).
    ignored: Ignored,
    awaited: Mutex<Vec<Writer>>,
    handed_over: AtomicBool,
}

impl Tails {
    /// The tails of processes on `pid_file`.
    pub(super) fn beside(pid_file: &str) -> Self {
        Tails {
            pid_file: PathBuf::from(pid_file),
            ignored: Ignored::default(),
            awaited: Mutex::default(),
            handed_over: AtomicBool::new(false),
        }
    }

    /// Waits for the writers a predecessor named ([`Tails::handover`]'s
    /// text).
    pub(super) fn await_writers(&self, text: &str) {
        match serde_json::from_str::<Vec<Writer>>(text) {
            Ok(mut writers) => {
                if writers.len() > MOST_AWAITED {
                    warn!(processes = writers.len(), waited_for = MOST_AWAITED, "too many earlier processes to wait for the usage of; the oldest are not counted");
                    writers.truncate(MOST_AWAITED);
                }
                *lock(&self.awaited) = writers;
            }
            Err(e) => {
                warn!(error = %e, "cannot read which processes' usage to wait for after the reload; not counted")
            }
        }
    }

    /// Whether a writer is still waited for.
    pub(super) fn awaits(&self) -> bool {
        !lock(&self.awaited).is_empty()
    }

    /// Notes that this process handed its usage over (it leaves a tail
    /// when it ends), and says whom the new process waits for: this process
    /// and those it still waits for.
    pub(super) fn handover(&self) -> String {
        self.handed_over.store(true, Ordering::Relaxed);
        let me = Pid::this();
        let mut writers = vec![(me.as_raw(), crate::reload::start_time(me))];
        writers.extend(lock(&self.awaited).iter().take(MOST_AWAITED - 1));
        serde_json::to_string(&writers).expect("writers serialize")
    }

    /// Whether this process handed its usage over.
    pub(super) fn handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Relaxed)
    }

    /// Writes `usage` (settled after the handover) for the new process,
    /// when there is one: the pid file names another gateway that runs
    /// (one whose start failed, after which this process served on,
    /// would never take it).
    pub(super) fn leave(&self, usage: Vec<Entry>) {
        let pid_file = self.pid_file.to_string_lossy();
        if !usage.is_empty() && crate::reload::another_running_on(&pid_file).is_some() {
            self.write(usage);
        }
    }

    /// Writes `usage` to a file of this process's.
    fn write(&self, usage: Vec<Entry>) {
        let me = Pid::this();
        let contents = Contents {
            pid: me.as_raw(),
            started: crate::reload::start_time(me),
            usage,
        };
        let path = own_file(&self.pid_file, KIND);
        let text = serde_json::to_vec(&contents).expect("usage serializes");
        match write_aside(&path, &text) {
            Ok(()) => {
                info!(path = %path.display(), tenants = contents.usage.len(), "left the usage settled after the handover for the new process")
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot leave the usage settled after the handover; the new process does not count it")
            }
        }
    }

    /// Removes the files left longer than [`KEPT`]: no process waits for
    /// them any more.
    pub(super) fn remove_stale(&self) {
        for (path, _, _) in files_beside(&self.pid_file, KIND) {
            let stale = std::fs::symlink_metadata(&path).is_ok_and(|meta| {
                crate::reload::trusted(&meta, u64::MAX)
                    && meta
                        .modified()
                        .is_ok_and(|at| at.elapsed().is_ok_and(|age| age > KEPT))
            });
            if stale && std::fs::remove_file(&path).is_ok() {
                info!(path = %path.display(), "removed a file of usage left at a reload that no process took");
            }
        }
    }

    /// The usage in the files of the writers waited for, each file taken
    /// (removed) as it is read; a writer found, or ended without a file,
    /// is waited for no more.
    pub(super) fn take(&self) -> Vec<Entry> {
        let awaited = lock(&self.awaited).clone();
        if awaited.is_empty() {
            return Vec::new();
        }
        // Which have ended, before their files are looked for: a file is
        // written before its writer ends.
        let ended: Vec<Writer> = (awaited.iter().copied())
            .filter(|&(pid, started)| !alive(pid, started))
            .collect();
        let mut done = ended.clone();
        let (mut counted, mut taken) = (Vec::new(), Vec::new());
        for (path, pid, half_written) in files_beside(&self.pid_file, KIND) {
            if half_written {
                remove_half_written(&path, pid);
                continue;
            }
            if !awaited.iter().any(|&(awaited, _)| awaited == pid) {
                continue;
            }
            let contents = match read_trusted(&path, MOST_BYTES) {
                Ok(Some(text)) => {
                    serde_json::from_slice::<Contents>(&text).map_err(|_| "does not read as one")
                }
                Ok(None) => continue,
                Err(why) => Err(why),
            };
            let contents = match contents {
                Ok(contents)
                    if awaited.contains(&(contents.pid, contents.started))
                        && contents.pid == pid =>
                {
                    contents
                }
                Ok(_) => continue,
                Err(why) => {
                    if self.ignored.first(&path) {
                        warn!(path = %path.display(), why, "ignoring a file of usage left at a reload");
                    }
                    continue;
                }
            };
            let writer = (contents.pid, contents.started);
            // One file a writer: a second naming it is no one's.
            if counted.contains(&writer) {
                continue;
            }
            done.push(writer);
            // Counted by whichever process removes it.
            if std::fs::remove_file(&path).is_ok() {
                counted.push(writer);
                taken.extend(contents.usage);
            }
        }
        lock(&self.awaited).retain(|writer| !done.contains(writer));
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use crate::limits::beside::scratch_pid_file as pid_file;

    fn entry(tenant: &str, requests: i64) -> Entry {
        (
            tenant.into(),
            "total".into(),
            [requests, 7, 16, 39, 0, 0, 0],
        )
    }

    #[test]
    fn a_tail_is_counted_by_the_one_process_that_takes_it() {
        let (_dir, pid_file) = pid_file();
        let old = Tails::beside(&pid_file);
        assert!(!old.handed_over());
        let awaited = old.handover();
        assert!(old.handed_over());
        let (new, other) = (Tails::beside(&pid_file), Tails::beside(&pid_file));
        new.await_writers(&awaited);
        other.await_writers(&awaited);
        assert!(new.take().is_empty(), "nothing left yet");
        assert!(new.awaits(), "its writer runs");
        old.write(vec![entry("acme", 2), entry("other", 1)]);
        assert_eq!(new.take(), [entry("acme", 2), entry("other", 1)]);
        assert!(!new.awaits(), "found");
        assert!(other.take().is_empty(), "taken once");
        assert!(new.take().is_empty());
        // A new process hands on what it still waits for, itself first.
        let chain = other.handover();
        let writers: Vec<Writer> = serde_json::from_str(&chain).unwrap();
        let me = Pid::this();
        assert_eq!(writers[0], (me.as_raw(), crate::reload::start_time(me)));
        assert_eq!(writers.len(), 2);
    }

    #[test]
    fn a_writer_ended_without_a_file_or_a_file_not_to_be_believed_is_not_waited_for() {
        let (_dir, pid_file) = pid_file();
        let tails = Tails::beside(&pid_file);
        // A pid no process has (above the kernel's largest).
        tails.await_writers("[[2147483000, 12]]");
        assert!(tails.awaits());
        assert!(tails.take().is_empty());
        assert!(!tails.awaits(), "ended without a file");
        // A file others may write is left alone (and so is its usage).
        let writer = Tails::beside(&pid_file);
        let reader = Tails::beside(&pid_file);
        reader.await_writers(&writer.handover());
        writer.write(vec![entry("acme", 1)]);
        let file = (files_beside(Path::new(&pid_file), KIND).into_iter())
            .map(|(path, _, _)| path)
            .next()
            .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(reader.take().is_empty());
        assert!(file.exists(), "left alone");
        // Nor is a file naming another writer than its name.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let forged = Contents {
            pid: 1,
            started: 0,
            usage: vec![entry("acme", 100)],
        };
        write_aside(&file, &serde_json::to_vec(&forged).unwrap()).unwrap();
        assert!(reader.take().is_empty());
        // Left longer than anyone waits: removed; a fresh one is kept.
        let stale = std::fs::File::options().write(true).open(&file).unwrap();
        stale
            .set_modified(std::time::SystemTime::now() - KEPT * 2)
            .unwrap();
        writer.write(vec![entry("acme", 1)]);
        writer.remove_stale();
        let left: Vec<_> = (files_beside(Path::new(&pid_file), KIND).into_iter())
            .map(|(path, _, _)| path)
            .collect();
        assert_eq!(left.len(), 1);
        assert_ne!(left[0], file);
        // Nothing that does not read as a list of writers is waited for.
        let garbled = Tails::beside(&pid_file);
        garbled.await_writers("not json");
        assert!(!garbled.awaits());
    }
}
