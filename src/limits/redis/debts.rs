//! What this process owes Redis, written down beside the pid file while it
//! owes anything, so that a process that ends owing (stopped, reloaded or
//! killed while Redis does not answer) leaves it to the next process on the
//! same pid file to pay.
//!
//! The file, `<pid_file>.owed.<pid>.<random>` (mode 0600; named afresh each
//! time it is created, so no other process, nor a later one given the same
//! pid, writes it, and no one can plant a file in its way), holds each debt
//! as the `SETTLE` call that pays it, with the script that runs it: the
//! process that takes the file sends those calls as they are, so a batch
//! Redis already applied (its answer lost) counts once, by its record (see
//! `Keys::settled`), and a later version's script cannot change what an
//! old batch means. A file is taken only once the process that wrote it has
//! ended, only from a regular file of this user's (or root's) that no one
//! else may write: whoever can leave one chooses what is written to Redis.

use crate::limits::beside::{
    alive, files_beside, own_file, read_trusted, remove_half_written, write_aside, Ignored,
};
use crate::lock;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tracing::{info, warn};

/// The most a debt file may hold: far above what an outage leaves (a
/// batch per tenant and period, and the batches in flight when it began).
const MOST_BYTES: u64 = 64 << 20;

/// The files' kind (`<pid_file>.owed.<pid>.<token>`).
const KIND: &str = "owed";

/// A debt as it is written: the tenant's id and the period (for the budget
/// view of the process that takes it), its spend, and the call that pays it
/// (`EVAL` of `scripts[script]` on `keys` and `args`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Written {
    pub(super) tenant: String,
    pub(super) period: String,
    pub(super) cost_pusd: i64,
    pub(super) script: usize,
    pub(super) keys: Vec<String>,
    pub(super) args: Vec<String>,
}

/// What a debt file holds.
#[derive(Debug, Serialize, Deserialize)]
struct Contents {
    /// The writer and when it started (a later process given the same pid
    /// is not the writer).
    pid: i32,
    started: u64,
    scripts: Vec<String>,
    owed: Vec<Written>,
}

/// A debt taken over from an ended process's file, paid as that process
/// would have paid it.
#[derive(Debug, Clone)]
pub(super) struct Debt {
    /// The tenant's index in this process's config, when it has one of
    /// that id (its budget view counts the debt until it is paid).
    pub(super) tenant: Option<usize>,
    pub(super) script: Arc<str>,
    pub(super) owed: Written,
    /// Redis refused it (said once).
    pub(super) refused: bool,
}

impl Debt {
    /// The call that pays it.
    pub(super) fn command(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(&*self.script)
            .arg(self.owed.keys.len())
            .arg(&self.owed.keys)
            .arg(&self.owed.args);
        cmd
    }
}

/// This process's debt file, beside the pid file.
#[derive(Debug)]
pub(super) struct DebtFile {
    pid_file: PathBuf,
    /// This process's file, and what was last written there (`None`: no
    /// file of this process's is there, and the next is named afresh).
    own: Mutex<(PathBuf, Option<Vec<u8>>)>,
    /// The last write failed (said once until one succeeds).
    failing: AtomicBool,
    /// Files left alone as untrusted or unreadable (said once each).
    ignored: Ignored,
}

impl DebtFile {
    /// The debt file of this process for `pid_file`.
    pub(super) fn beside(pid_file: &str) -> Self {
        DebtFile {
            pid_file: PathBuf::from(pid_file),
            own: Mutex::new((PathBuf::new(), None)),
            failing: AtomicBool::new(false),
            ignored: Ignored::default(),
        }
    }

    /// Whether the last write succeeded (what is owed is written down).
    pub(super) fn is_written(&self) -> bool {
        !self.failing.load(Ordering::Relaxed)
    }

    /// Writes what `owed` gives (each debt with its script) as what this
    /// process owes, or removes the file when it owes nothing; nothing is
    /// done when that is what the file says already. `owed` is read while
    /// the file is held, so of two writers the later one's view is the one
    /// left. Written aside and renamed, so the file is always whole.
    /// Whether the file says so now.
    pub(super) fn keep(&self, owed: impl FnOnce() -> Vec<(Arc<str>, Written)>) -> bool {
        let me = Pid::this();
        let mut own = lock(&self.own);
        let (path, last) = &mut *own;
        let owed = owed();
        if owed.is_empty() {
            if last.take().is_some() {
                if let Err(e) = std::fs::remove_file(&*path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        warn!(path = %path.display(), error = %e, "cannot remove the file of what was owed to Redis, paid now");
                    }
                }
            }
            return true;
        }
        let mut scripts: Vec<Arc<str>> = Vec::new();
        let owed = owed
            .into_iter()
            .map(|(script, mut written)| {
                written.script = match scripts.iter().position(|s| *s == script) {
                    Some(at) => at,
                    None => {
                        scripts.push(script);
                        scripts.len() - 1
                    }
                };
                written
            })
            .collect();
        let file = Contents {
            pid: me.as_raw(),
            started: crate::reload::start_time(me),
            scripts: scripts.iter().map(|s| s.to_string()).collect(),
            owed,
        };
        let text = serde_json::to_vec(&file).expect("debts serialize");
        if last.as_ref() == Some(&text) {
            return true;
        }
        if last.is_none() {
            *path = own_file(&self.pid_file, KIND);
        }
        match write_aside(path, &text) {
            Ok(()) => {
                *last = Some(text);
                if self.failing.swap(false, Ordering::Relaxed) {
                    info!(path = %path.display(), "what is owed to Redis is written down again");
                }
                true
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    warn!(path = %path.display(), error = %e, "cannot write down what is owed to Redis (tried again every half second); it is lost if this process ends before Redis answers");
                }
                false
            }
        }
    }

    /// The debts left by processes on this pid file that have ended, with
    /// the files they came from (removed by the caller once this process's
    /// own file holds them). `ids` are this process's tenants' ids.
    pub(super) fn left_by_others(&self, ids: &[String]) -> Vec<(PathBuf, Vec<Debt>)> {
        let mut found = Vec::new();
        for (path, pid, half_written) in files_beside(&self.pid_file, KIND) {
            // One being written when its process was killed: removed once
            // no process of that pid runs (the file it was to replace, if
            // any, is whole).
            if half_written {
                remove_half_written(&path, pid);
                continue;
            }
            if path == lock(&self.own).0 {
                continue;
            }
            let Some(file) = self.read(&path) else {
                continue;
            };
            if file.pid != pid || alive(file.pid, file.started) {
                continue;
            }
            match debts_of(file, ids) {
                Some(debts) => found.push((path, debts)),
                None => self.ignore(&path, "does not read as one"),
            }
        }
        found
    }

    /// The debt file at `path`, when it is one this process may trust.
    fn read(&self, path: &Path) -> Option<Contents> {
        let text = match read_trusted(path, MOST_BYTES) {
            Ok(text) => text?,
            Err(why) => {
                self.ignore(path, why);
                return None;
            }
        };
        let file = serde_json::from_slice(&text);
        if file.is_err() {
            self.ignore(path, "does not read as one");
        }
        file.ok()
    }

    /// Says once that the file at `path` is left alone, and why (for the
    /// first thousand such files).
    fn ignore(&self, path: &Path, why: &str) {
        if self.ignored.first(path) {
            warn!(path = %path.display(), why, "ignoring a file of what was owed to Redis");
        }
    }
}

/// Says, at start-up without Redis, that debt files of earlier processes
/// are beside `pid_file`: only a gateway with Redis pays them.
pub fn warn_of_debts_left_beside(pid_file: &str) {
    let left = (files_beside(Path::new(pid_file), KIND).into_iter())
        .filter(|(_, _, half_written)| !half_written)
        .count();
    if left > 0 {
        warn!(files = left, pid_file, "what earlier processes owed Redis is written down beside the pid file, and only a gateway with redis: configured pays it");
    }
}

/// The debts a file holds, each with its script and this process's index
/// for its tenant; `None` when one names a script the file lacks.
fn debts_of(file: Contents, ids: &[String]) -> Option<Vec<Debt>> {
    let scripts: Vec<Arc<str>> = file.scripts.into_iter().map(Arc::from).collect();
    file.owed
        .into_iter()
        .map(|owed| {
            Some(Debt {
                tenant: ids.iter().position(|id| *id == owed.tenant),
                script: scripts.get(owed.script)?.clone(),
                owed,
                refused: false,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::fs::PermissionsExt;

    fn written(tenant: &str, cost: i64) -> Written {
        Written {
            tenant: tenant.into(),
            period: "2026-12".into(),
            cost_pusd: cost,
            script: 0,
            keys: vec!["p:{t}:rate".into(), "p:{t}:usage:2026-12".into()],
            args: vec!["1".into(), cost.to_string()],
        }
    }

    use crate::limits::beside::scratch_pid_file as pid_file;

    /// Leaves `file` as a debt file of `pid` beside `pid_file`, mode 0600.
    fn leave(pid_file: &str, pid: i32, file: &Contents) -> PathBuf {
        let path = PathBuf::from(format!("{pid_file}.owed.{pid}.0123abcd"));
        write_aside(&path, &serde_json::to_vec(file).unwrap()).unwrap();
        path
    }

    #[test]
    fn a_process_keeps_its_file_while_it_owes_and_removes_it_when_paid() {
        let (_dir, pid_file) = pid_file();
        let debts = DebtFile::beside(&pid_file);
        let script: Arc<str> = Arc::from("return 1");
        assert!(debts.keep(|| vec![(script.clone(), written("acme", 5))]));
        let path = lock(&debts.own).0.clone();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let pid = Pid::this();
        assert!(name.starts_with(&format!("gw.pid.owed.{pid}.")), "{name}");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let file: Contents = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(file.scripts, ["return 1"]);
        assert_eq!(file.owed, [written("acme", 5)]);
        // Its own file, of a running process, is nobody's to take.
        assert!(debts.left_by_others(&[]).is_empty());
        // Two debts with one script: written once.
        let other = Arc::from("return 1");
        debts.keep(|| vec![(script, written("acme", 5)), (other, written("b", 1))]);
        let file: Contents = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!((file.scripts.len(), file.owed.len()), (1, 2));
        debts.keep(Vec::new);
        assert!(!path.exists(), "paid: no file");
        // Owing again: a file of another name (one someone saw may have been
        // taken meanwhile).
        debts.keep(|| vec![(Arc::from("return 1"), written("acme", 1))]);
        let again = lock(&debts.own).0.clone();
        assert!(again.exists());
        assert_ne!(again, path);
    }

    #[test]
    fn the_debts_of_an_ended_process_are_taken_with_their_tenants() {
        let (_dir, pid_file) = pid_file();
        let debts = DebtFile::beside(&pid_file);
        // A pid no process has (above the kernel's largest).
        let ended = 1 << 23;
        let file = Contents {
            pid: ended,
            started: 12,
            scripts: vec!["return 2".into()],
            owed: vec![written("gone", 3), written("acme", 4)],
        };
        let path = leave(&pid_file, ended, &file);
        let ids = ["other".to_string(), "acme".to_string()];
        let found = debts.left_by_others(&ids);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, path);
        let tenants: Vec<Option<usize>> = found[0].1.iter().map(|d| d.tenant).collect();
        assert_eq!(tenants, [None, Some(1)], "by id, not by place");
        assert_eq!(&*found[0].1[0].script, "return 2");
        let cmd = found[0].1[1].command();
        let args: Vec<Vec<u8>> = cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        let expected: [&[u8]; 7] = [
            b"EVAL",
            b"return 2",
            b"2",
            b"p:{t}:rate",
            b"p:{t}:usage:2026-12",
            b"1",
            b"4",
        ];
        assert_eq!(args, expected);
    }

    #[test]
    fn a_running_writer_an_untrusted_file_or_a_broken_one_is_left() {
        let (_dir, pid_file) = pid_file();
        let debts = DebtFile::beside(&pid_file);
        let me = Pid::this();
        // Another running process's (this test's own pid and start, under
        // another name): not taken while it runs.
        let running = Contents {
            pid: me.as_raw(),
            started: crate::reload::start_time(me),
            scripts: vec!["x".into()],
            owed: vec![written("acme", 1)],
        };
        let elsewhere = format!("{pid_file}2");
        leave(&elsewhere, me.as_raw(), &running);
        let later = DebtFile::beside(&elsewhere);
        assert!(later.left_by_others(&[]).is_empty());
        // The same pid started at another time is another process (a
        // container's pid 1 started again): its file is taken, and this
        // process's own, written first, is another.
        let reused = Contents {
            started: 1,
            ..running
        };
        let earlier = leave(&elsewhere, me.as_raw(), &reused);
        assert!(later.keep(|| vec![(Arc::from("y"), written("acme", 2))]));
        assert!(earlier.exists() && lock(&later.own).0.exists());
        let taken = later.left_by_others(&[]);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].0, earlier);
        // Others may write it: ignored.
        let ended = 1 << 23;
        let path = leave(
            &pid_file,
            ended,
            &Contents {
                pid: ended,
                ..reused
            },
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(debts.left_by_others(&[]).is_empty());
        // Not a debt file, or one naming a script it lacks: ignored.
        std::fs::write(&path, b"{\"pid\": 1").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(debts.left_by_others(&[]).is_empty());
        let lacking = Contents {
            pid: ended,
            started: 1,
            scripts: Vec::new(),
            owed: vec![written("acme", 1)],
        };
        leave(&pid_file, ended, &lacking);
        assert!(debts.left_by_others(&[]).is_empty());
        // Half-written files: removed once their process has ended.
        let half = |pid: i32| PathBuf::from(format!("{pid_file}.owed.{pid}.01.ab.new"));
        std::fs::write(half(ended), b"{").unwrap();
        std::fs::write(half(me.as_raw()), b"{").unwrap();
        assert!(debts.left_by_others(&[]).is_empty());
        assert!(!half(ended).exists());
        assert!(half(me.as_raw()).exists(), "its process may finish it");
    }
}
