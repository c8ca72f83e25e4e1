//! Files a process leaves beside its pid file for the next process on the
//! same pid file: what it owed Redis ([`super::redis`]'s debts) and, without
//! Redis, the usage it settled after a reload handed the rest over
//! ([`super::tail`]). Each is named `<pid_file>.<kind>.<pid>.<token>`,
//! written once aside and renamed into place (so it is always whole), mode
//! 0600.

use nix::unistd::Pid;
use std::path::{Path, PathBuf};

/// The files of `kind` beside `pid_file`: each with the pid its name gives
/// and whether it is one being written (`.new`).
pub(super) fn files_beside(pid_file: &Path, kind: &str) -> Vec<(PathBuf, i32, bool)> {
    let dir = match pid_file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Some(stem) = pid_file.file_name().map(|n| n.to_string_lossy()) else {
        return Vec::new();
    };
    let prefix = format!("{stem}.{kind}.");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let files = entries.flatten().filter_map(|entry| {
        let name = entry.file_name();
        let rest = name.to_str()?.strip_prefix(&prefix)?;
        let pid = rest.split('.').next()?.parse().ok()?;
        Some((entry.path(), pid, rest.ends_with(".new")))
    });
    files.collect()
}

/// A fresh name for this process's file of `kind` beside `pid_file` (no
/// other process, nor a later one given the same pid, writes it).
pub(super) fn own_file(pid_file: &Path, kind: &str) -> PathBuf {
    let token = &crate::ids::random_token()[..16];
    let mut name = pid_file.as_os_str().to_owned();
    name.push(format!(".{kind}.{}.{token}", Pid::this()));
    PathBuf::from(name)
}

/// Writes `text` to `path` through a file beside it (of a name of its
/// own, that no one can have left there), renamed over it.
pub(super) fn write_aside(path: &Path, text: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".{}.new", &crate::ids::random_token()[..8]));
    let aside = PathBuf::from(aside);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&aside)
        // Not synced: it is to outlive the process, not the machine (a
        // sync took up to 160 ms on a busy one, what a killed process
        // then lost).
        .and_then(|mut file| file.write_all(text))
        .and_then(|()| std::fs::rename(&aside, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&aside);
    }
    written
}

/// Reads the file at `path` when it is one this process may believe (see
/// [`crate::reload::trusted`]), under `most` bytes: `None` when it is gone
/// or cannot be read, `Err` when it may not be believed.
pub(super) fn read_trusted(path: &Path, most: u64) -> Result<Option<Vec<u8>>, &'static str> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(None);
    };
    if !crate::reload::trusted(&meta, most) {
        return Err("is not a file of this user's, or others may write it, or is too large");
    }
    Ok(std::fs::read(path).ok())
}

/// The files a process left alone (untrusted, unreadable), so that each is
/// said once (the first thousand of them), however often they are seen.
#[derive(Debug, Default)]
pub(super) struct Ignored(std::sync::Mutex<std::collections::HashSet<PathBuf>>);

impl Ignored {
    /// Whether `path` is one not said yet (it is now).
    pub(super) fn first(&self, path: &Path) -> bool {
        let mut ignored = crate::lock(&self.0);
        ignored.len() < 1000 && ignored.insert(path.to_path_buf())
    }
}

/// Removes a half-written file (`.new`) once no process of `pid` runs
/// (the file it was to replace, if any, is whole).
pub(super) fn remove_half_written(path: &Path, pid: i32) {
    if pid > 0 && !runs(pid) && is_regular(path) {
        let _ = std::fs::remove_file(path);
    }
}

/// Whether the process `pid` that started at `started` still runs.
pub(super) fn alive(pid: i32, started: u64) -> bool {
    pid > 0 && crate::reload::start_time(Pid::from_raw(pid)) == started
}

/// Whether any process `pid` runs.
fn runs(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether `path` is a regular file of this user's (not followed).
fn is_regular(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|meta| crate::reload::trusted(&meta, u64::MAX))
}

/// A directory of a test's own, removed when dropped.
#[cfg(test)]
pub(crate) struct Scratch(PathBuf);

#[cfg(test)]
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A pid file in a [`Scratch`] directory, for the files beside it.
#[cfg(test)]
pub(crate) fn scratch_pid_file() -> (Scratch, String) {
    let dir = std::env::temp_dir().join(format!("runestone-beside-{}", crate::ids::random_token()));
    std::fs::create_dir_all(&dir).unwrap();
    let pid_file = dir.join("gw.pid").display().to_string();
    (Scratch(dir), pid_file)
}
