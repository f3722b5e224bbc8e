//! Exclusive ownership of the pin and state directories, taken before the daemon touches
//! anything, and the checks that a start can succeed at all (bpffs, a writable state
//! directory) made before a program is attached.
//!
//! Ownership is an exclusive `flock` on each directory. The kernel drops it when the process
//! exits however it exits, so a `kill -9` never leaves a stale lock behind, and the holder's
//! PID is read back from `/proc/locks` to name it in the refusal.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

/// The lock file in the state directory; it also holds the owner's PID, for people.
pub const STATE_LOCK_FILE: &str = "limiter.lock";

/// Why the daemon may not start.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    /// The pin directory is not on a BPF filesystem.
    #[error(
        "pin directory {path}: {where_} is not on a BPF filesystem (bpffs), so nothing can be \
         pinned there; mount one (`mount -t bpf bpf /sys/fs/bpf`, or a `sys-fs-bpf.mount` \
         unit) or set pin_dir to a directory under a bpffs mount"
    )]
    NotBpffs {
        /// The configured pin directory.
        path: PathBuf,
        /// The existing directory that was checked (the pin directory or its nearest parent).
        where_: String,
    },
    /// Another process holds a directory.
    #[error(
        "{what} {path} is held by another limiter daemon{holder}; it keeps running and \
         filtering. Stop it first (`systemctl stop limiter`), or give this one its own \
         pin_dir and state_dir"
    )]
    Held {
        /// "pin directory" or "state directory".
        what: &'static str,
        /// The directory.
        path: PathBuf,
        /// " (PID n)", when known.
        holder: String,
    },
    /// The state directory cannot be created, locked or written.
    #[error(
        "state directory {path}: {source}; runtime changes could not be saved. Make it a \
         writable directory (systemd: StateDirectory=limiter) or set state_dir"
    )]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The pin directory cannot be created or opened.
    #[error("pin directory {path}: {source}")]
    PinDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The daemon's hold on its directories; dropping it releases them.
#[derive(Debug)]
pub struct Ownership {
    _pins: Flock<File>,
    _state: Flock<File>,
}

impl Ownership {
    /// Checks that `pin_dir` is on bpffs and `state_dir` is writable, and takes both
    /// exclusively. Creates them when missing: the pin directory mode 0700 (pins expose
    /// per-source state), the state directory mode 0700 (the runtime state names clients).
    pub fn acquire(pin_dir: &Path, state_dir: &Path) -> Result<Self, OwnershipError> {
        check_bpffs(pin_dir)?;

        let state_err = |source| OwnershipError::StateDir {
            path: state_dir.to_owned(),
            source,
        };
        create_private_dir(state_dir).map_err(state_err)?;
        let lock_path = state_dir.join(STATE_LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(state_err)?;
        let mut state = lock(file, "state directory", state_dir)?;
        // Writing our PID proves the directory takes writes before anything is attached.
        state.set_len(0).map_err(state_err)?;
        writeln!(*state, "{}", std::process::id()).map_err(state_err)?;
        state.sync_all().map_err(state_err)?;

        let pin_err = |source| OwnershipError::PinDir {
            path: pin_dir.to_owned(),
            source,
        };
        create_private_dir(pin_dir).map_err(pin_err)?;
        let dir = File::open(pin_dir).map_err(pin_err)?;
        let pins = lock(dir, "pin directory", pin_dir)?;
        Ok(Self {
            _pins: pins,
            _state: state,
        })
    }
}

/// Creates `dir` (and its parents) if missing; a directory this creates is mode 0700.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

fn lock(file: File, what: &'static str, path: &Path) -> Result<Flock<File>, OwnershipError> {
    let inode = file.metadata().map(|m| m.ino()).ok();
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            OwnershipError::Held {
                what,
                path: path.to_owned(),
                holder: inode
                    .and_then(lock_holder)
                    .map_or_else(String::new, |pid| format!(" (PID {pid})")),
            }
        } else if what == "pin directory" {
            OwnershipError::PinDir {
                path: path.to_owned(),
                source: errno.into(),
            }
        } else {
            OwnershipError::StateDir {
                path: path.to_owned(),
                source: errno.into(),
            }
        }
    })
}

/// The PID holding a `flock` on the file with this inode, from `/proc/locks`.
fn lock_holder(inode: u64) -> Option<u32> {
    holder_in(&fs::read_to_string("/proc/locks").ok()?, inode)
}

/// Parses `/proc/locks` lines such as `1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF`.
fn holder_in(locks: &str, inode: u64) -> Option<u32> {
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Blocked waiters are listed as "1: -> FLOCK ..."; skip them.
        if fields.get(1) != Some(&"FLOCK") {
            return None;
        }
        let pid = fields.get(4)?.parse().ok()?;
        let file_inode: u64 = fields.get(5)?.rsplit(':').next()?.parse().ok()?;
        (file_inode == inode).then_some(pid)
    })
}

/// Refuses a pin directory whose nearest existing ancestor is not on bpffs.
fn check_bpffs(pin_dir: &Path) -> Result<(), OwnershipError> {
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let on_bpffs = nix::sys::statfs::statfs(existing)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
    if on_bpffs {
        return Ok(());
    }
    Err(OwnershipError::NotBpffs {
        path: pin_dir.to_owned(),
        where_: if existing == pin_dir {
            "it".to_owned()
        } else {
            format!("its nearest existing parent {}", existing.display())
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines_name_the_holder() {
        let locks = "1: POSIX  ADVISORY  WRITE 77 00:1a:42 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 999 00:1f:5678 0 EOF\n";
        assert_eq!(holder_in(locks, 5678), Some(1234));
        assert_eq!(holder_in(locks, 42), None, "POSIX locks are not ours");
        assert_eq!(holder_in(locks, 1), None);
    }

    #[test]
    fn a_plain_directory_is_not_bpffs_and_the_message_says_how_to_fix_it() {
        let dir = std::env::temp_dir().join(format!("limiter-pins-{}", std::process::id()));
        let e = check_bpffs(&dir.join("limiter")).unwrap_err().to_string();
        assert!(
            e.contains("limiter-pins") && e.contains("mount -t bpf"),
            "{e}"
        );
    }

    #[test]
    fn a_second_lock_on_the_state_directory_names_this_process() {
        let dir = std::env::temp_dir().join(format!("limiter-own-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        create_private_dir(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let first = lock(File::open(&dir).unwrap(), "state directory", &dir).unwrap();
        let second = lock(File::open(&dir).unwrap(), "state directory", &dir).unwrap_err();
        let text = second.to_string();
        assert!(
            text.contains(&format!("PID {}", std::process::id())),
            "{text}"
        );
        drop(first);
        assert!(lock(File::open(&dir).unwrap(), "state directory", &dir).is_ok());
        fs::remove_dir_all(&dir).unwrap();
    }
}
