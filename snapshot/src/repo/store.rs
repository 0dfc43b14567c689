//! The repository's storage trait, kept to what an object store can do (create-if-absent, get,
//! list, delete; no rename, no append, no overwrite), and its local-directory backend.

use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::fs_util::{create_private_dir_all, private_open_options, rename_noreplace, sync_fs};

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("object '{name}' does not exist")]
    NotFound {
        /// The object's name.
        name: String,
    },
    /// The object name is not a relative `/`-separated path of `[A-Za-z0-9._-]` components.
    #[error("'{name}' is not a valid object name")]
    BadName {
        /// The refused name.
        name: String,
    },
    /// The lock is held by someone else and the caller chose not to wait.
    #[error("the repository is locked by another process ({})", path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A request to a remote store failed (after retries); `problem` holds no secret.
    #[error("cannot {action} {location}: {problem}")]
    Remote {
        /// What was being done.
        action: &'static str,
        /// The object or store.
        location: String,
        /// What went wrong, in one line.
        problem: String,
    },
    /// The store cannot be used as configured (a bad URL, missing settings).
    #[error("{problem}")]
    Unusable {
        /// What is wrong, in one line without secrets.
        problem: String,
    },
    /// The backing storage failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// How a repository lock is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Held by every backup writer; many at once.
    Shared,
    /// Held by prune and garbage collection; excludes every other holder.
    Exclusive,
}

/// What holds a repository lock for as long as it lives.
pub trait LockGuard: Send + Sync {
    /// Whether the lock has been held without a gap since it was taken. An `flock` always is;
    /// a lease that was not renewed in time may have let a prune run in the gap.
    fn unbroken(&self) -> bool {
        true
    }
}

impl LockGuard for fs::File {}

/// A held repository lock, released on drop (and by the OS when the holder dies).
pub struct StoreLock {
    guard: Box<dyn LockGuard>,
}

impl StoreLock {
    /// A lock held for as long as `guard` lives.
    pub fn new(guard: Box<dyn LockGuard>) -> Self {
        Self { guard }
    }

    /// Whether the lock has been held without a gap since it was taken: if so, nothing that
    /// needs the exclusive lock (prune, garbage collection) ran meanwhile.
    pub fn unbroken(&self) -> bool {
        self.guard.unbroken()
    }
}

impl std::fmt::Debug for StoreLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreLock")
    }
}

/// A flat namespace of immutable objects under `/`-separated names.
///
/// Objects are written once and never changed: a writer either creates an object under a
/// content-derived or unique name or finds it already there. This is what object stores honour
/// (conditional create), so every backend can implement it without rename or append.
pub trait ChunkStore: Send + Sync {
    /// Creates `name` with `bytes` unless it exists; returns whether it was created. Readers
    /// never see a partial object. The object is durable after the next [`ChunkStore::sync`].
    fn put_if_absent(&self, name: &str, bytes: &[u8]) -> Result<bool, StoreError>;
    /// Makes every object created so far durable (a no-op where puts are durable already).
    fn sync(&self) -> Result<(), StoreError>;
    /// The bytes of `name`.
    fn get(&self, name: &str) -> Result<Vec<u8>, StoreError>;
    /// Whether `name` exists.
    fn contains(&self, name: &str) -> Result<bool, StoreError>;
    /// The first of `names` that does not exist, if any: [`ChunkStore::contains`] for many
    /// objects at once (a store with round trips asks several at a time).
    fn first_missing(&self, names: &[String]) -> Result<Option<String>, StoreError> {
        for name in names {
            if !self.contains(name)? {
                return Ok(Some(name.clone()));
            }
        }
        Ok(None)
    }
    /// Whether a writer should ask [`ChunkStore::contains`] before encoding and putting a
    /// chunk. True where that answer is cheap (a local `stat`); false where it costs a request
    /// of its own and [`ChunkStore::put_if_absent`] answers "exists" just as well (a
    /// create-only PUT on S3 fails with 412 on an existing object).
    fn probe_before_put(&self) -> bool {
        true
    }
    /// How many chunk writes a backup should keep in flight at once, whatever the number of
    /// cores: 1 where a write is bound by this host (a local disk; the writers are then one per
    /// core), more where each write mostly waits for a round trip (an object store).
    fn writes_in_flight(&self) -> usize {
        1
    }
    /// Every object name that starts with `prefix` (a `/`-terminated folder, or empty), sorted.
    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// Removes `name`; removing an absent object is not an error.
    fn delete(&self, name: &str) -> Result<(), StoreError>;
    /// Takes the repository lock, waiting for it if `wait`.
    fn lock(&self, mode: LockMode, wait: bool) -> Result<StoreLock, StoreError>;
    /// Removes what interrupted `put_if_absent` calls left behind, and returns how many. Call
    /// only under the exclusive lock.
    fn clean_incomplete(&self) -> Result<usize, StoreError>;
    /// Where the store is, for messages.
    fn location(&self) -> String;
}

/// Checks that `name` is a relative path of safe components.
pub(crate) fn check_name(name: &str) -> Result<(), StoreError> {
    let component_ok = |c: &str| {
        !c.is_empty()
            && !c.starts_with('.')
            && c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    };
    if name.len() <= 512 && name.split('/').all(component_ok) {
        Ok(())
    } else {
        Err(StoreError::BadName {
            name: name.chars().take(80).collect(),
        })
    }
}

/// The local-directory backend: object `a/b` is the file `ROOT/a/b`.
///
/// Objects are written to `ROOT/.tmp/`, then renamed into place with `RENAME_NOREPLACE` (which
/// fails if the name exists, making creation atomic and exclusive). They are not fsynced one by
/// one: [`ChunkStore::sync`] is one `syncfs(2)` that a backup calls before it creates its point
/// manifest, as Proxmox Backup Server's default "filesystem" sync level does. The lock is
/// `flock(2)` on `ROOT/.lock`. Every directory it creates is 0700 and every object 0600.
#[derive(Debug)]
pub struct LocalDirStore {
    root: PathBuf,
}

/// The folder of in-flight writes inside a local store.
pub(super) const TMP_DIR: &str = ".tmp";
/// The lock file inside a local store.
pub(super) const LOCK_FILE: &str = ".lock";

impl LocalDirStore {
    /// Opens (creating if needed, mode 0700) a store rooted at `root`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let tmp = root.join(TMP_DIR);
        create_private_dir_all(&tmp).map_err(io_error("create", &tmp))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, name: &str) -> Result<PathBuf, StoreError> {
        check_name(name)?;
        Ok(self.root.join(name))
    }
}

impl ChunkStore for LocalDirStore {
    fn put_if_absent(&self, name: &str, bytes: &[u8]) -> Result<bool, StoreError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = self.path_of(name)?;
        if path.exists() {
            return Ok(false);
        }
        let dir = path.parent().expect("object paths are under the root");
        create_private_dir_all(dir).map_err(io_error("create", dir))?;
        let tmp = self.root.join(TMP_DIR).join(format!(
            "{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> io::Result<()> {
            let mut file = private_open_options()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            file.write_all(bytes)
        };
        let result =
            write().map_err(io_error("write", &tmp)).and_then(|()| {
                match rename_noreplace(&tmp, &path) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(io_error("create", &path)(e)),
                }
            });
        if !matches!(result, Ok(true)) {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn sync(&self) -> Result<(), StoreError> {
        sync_fs(&self.root).map_err(io_error("sync the file system of", &self.root))
    }

    fn get(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.path_of(name)?;
        fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::NotFound {
                name: name.to_string(),
            },
            _ => io_error("read", &path)(e),
        })
    }

    fn contains(&self, name: &str) -> Result<bool, StoreError> {
        let path = self.path_of(name)?;
        match fs::symlink_metadata(&path) {
            Ok(meta) => Ok(meta.is_file()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error("inspect", &path)(e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let folder = prefix.trim_end_matches('/');
        let start = if folder.is_empty() {
            self.root.clone()
        } else {
            self.path_of(folder)?
        };
        let mut names = Vec::new();
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error("list", &dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io_error("list", &dir))?;
                if entry.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                let path = entry.path();
                let kind = entry.file_type().map_err(io_error("inspect", &path))?;
                if kind.is_dir() {
                    stack.push(path);
                } else if kind.is_file() {
                    let rel = path
                        .strip_prefix(&self.root)
                        .expect("listed under the root");
                    let name = rel.to_string_lossy().into_owned();
                    if name.starts_with(prefix) {
                        names.push(name);
                    }
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn delete(&self, name: &str) -> Result<(), StoreError> {
        let path = self.path_of(name)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("remove", &path)(e)),
        }
    }

    fn clean_incomplete(&self) -> Result<usize, StoreError> {
        let tmp = self.root.join(TMP_DIR);
        let mut removed = 0;
        for entry in fs::read_dir(&tmp).map_err(io_error("list", &tmp))? {
            let path = entry.map_err(io_error("list", &tmp))?.path();
            fs::remove_file(&path).map_err(io_error("remove", &path))?;
            removed += 1;
        }
        Ok(removed)
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn lock(&self, mode: LockMode, wait: bool) -> Result<StoreLock, StoreError> {
        let path = self.root.join(LOCK_FILE);
        let file = private_open_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_error("open", &path))?;
        let mut op = match mode {
            LockMode::Shared => libc::LOCK_SH,
            LockMode::Exclusive => libc::LOCK_EX,
        };
        if !wait {
            op |= libc::LOCK_NB;
        }
        loop {
            // SAFETY: flock on a file descriptor this function owns for the call's duration; it
            // touches no memory.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(StoreLock::new(Box::new(file)));
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Err(StoreError::Locked { path }),
                _ => return Err(io_error("lock", &path)(err)),
            }
        }
    }
}

/// Builds a [`StoreError::Io`].
fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TestDir;

    #[test]
    fn create_only_semantics() {
        let tmp = TestDir::new("store");
        let store = LocalDirStore::open(tmp.path()).unwrap();
        assert!(store.put_if_absent("chunks/ab/abcd", b"one").unwrap());
        assert!(!store.put_if_absent("chunks/ab/abcd", b"two").unwrap());
        assert_eq!(store.get("chunks/ab/abcd").unwrap(), b"one");
        assert!(store.contains("chunks/ab/abcd").unwrap());
        assert!(!store.contains("chunks/ab/none").unwrap());
        assert!(matches!(
            store.get("chunks/ab/none"),
            Err(StoreError::NotFound { .. })
        ));
        assert!(store.put_if_absent("points/p1.json", b"{}").unwrap());
        assert_eq!(store.list("chunks/").unwrap(), vec!["chunks/ab/abcd"]);
        assert_eq!(
            store.list("").unwrap(),
            vec!["chunks/ab/abcd", "points/p1.json"]
        );
        store.delete("chunks/ab/abcd").unwrap();
        store.delete("chunks/ab/abcd").unwrap();
        assert!(store.list("chunks/").unwrap().is_empty());
        // No temporaries are left behind.
        assert_eq!(store.clean_incomplete().unwrap(), 0);
    }

    #[test]
    fn objects_and_folders_are_private_whatever_the_umask() {
        crate::test_util::permissive_umask();
        let tmp = TestDir::new("store-private");
        let root = tmp.path().join("repo");
        let store = LocalDirStore::open(&root).unwrap();
        store
            .put_if_absent("chunks/ab/abcd", b"guest bytes")
            .unwrap();
        drop(store.lock(LockMode::Shared, false).unwrap());
        for (path, mode) in [
            ("", 0o700),
            (".tmp", 0o700),
            ("chunks", 0o700),
            ("chunks/ab", 0o700),
            ("chunks/ab/abcd", 0o600),
            (".lock", 0o600),
        ] {
            assert_eq!(crate::test_util::mode_of(&root.join(path)), mode, "{path}");
        }
    }

    #[test]
    fn bad_names_are_refused() {
        let tmp = TestDir::new("store-names");
        let store = LocalDirStore::open(tmp.path()).unwrap();
        for bad in ["", "/abs", "a/../b", "a//b", ".lock", "a/.tmp/x", "a b"] {
            assert!(
                matches!(
                    store.put_if_absent(bad, b"x"),
                    Err(StoreError::BadName { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn exclusive_lock_excludes() {
        let tmp = TestDir::new("store-lock");
        let store = LocalDirStore::open(tmp.path()).unwrap();
        let a = store.lock(LockMode::Shared, false).unwrap();
        let b = store.lock(LockMode::Shared, false).unwrap();
        assert!(matches!(
            store.lock(LockMode::Exclusive, false),
            Err(StoreError::Locked { .. })
        ));
        drop((a, b));
        let x = store.lock(LockMode::Exclusive, false).unwrap();
        assert!(store.lock(LockMode::Shared, false).is_err());
        drop(x);
        assert!(store.lock(LockMode::Shared, false).is_ok());
    }

    #[test]
    fn concurrent_creators_agree() {
        let tmp = TestDir::new("store-race");
        let store = LocalDirStore::open(tmp.path()).unwrap();
        let created: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|i| {
                    let store = &store;
                    s.spawn(move || store.put_if_absent("x/y", &[i]).unwrap() as usize)
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(created, 1);
        assert_eq!(store.get("x/y").unwrap().len(), 1);
    }
}
