//! Small file-system helpers: private creation (files 0600, directories 0700, with that mode
//! from the start, never chmod-ed afterwards), rename without replacing, and directory and
//! file-system syncs.
//!
//! Everything arkvm writes that holds guest memory, disk contents, VM state or keys is created
//! through [`create_private_file`], [`create_private_dir`] or [`create_private_dir_all`], so
//! that no other local user can read it whatever the umask (a umask can only take permission
//! bits away, and these modes grant nothing to group or others).

use std::ffi::CString;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// The mode of every file arkvm creates that holds guest data, state or keys.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// The mode of every directory arkvm creates that holds such files.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Open options that create files with mode 0600; add `read`, `write`, `create_new` and the
/// rest as needed.
pub fn private_open_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(PRIVATE_FILE_MODE);
    options
}

/// Creates a new file with mode 0600 for writing, refusing to reuse an existing one.
pub fn create_private_file(path: &Path) -> io::Result<File> {
    private_open_options()
        .write(true)
        .create_new(true)
        .open(path)
}

/// Creates the directory `path` with mode 0700; fails if it exists.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().mode(PRIVATE_DIR_MODE).create(path)
}

/// Creates `path` and any missing parents, each with mode 0700. Directories that already exist
/// keep their mode: a directory the user made is theirs to set.
pub fn create_private_dir_all(path: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(path)
}

/// Renames `from` to `to`, failing with [`io::ErrorKind::AlreadyExists`] if `to` exists, even as
/// an empty directory (which a plain rename would replace).
///
/// On file systems without `RENAME_NOREPLACE` it falls back to check-then-rename for
/// directories (a narrow race remains) and to hard link plus unlink for files (exact).
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c_path = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
    };
    let (c_from, c_to) = (c_path(from)?, c_path(to)?);
    // SAFETY: both pointers are NUL-terminated strings that outlive the call; renameat2 only
    // reads them.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c_from.as_ptr(),
            libc::AT_FDCWD,
            c_to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => {
            Err(io::Error::new(io::ErrorKind::AlreadyExists, err))
        }
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            if fs::symlink_metadata(from)?.is_dir() {
                if fs::symlink_metadata(to).is_ok() {
                    return Err(io::Error::from(io::ErrorKind::AlreadyExists));
                }
                fs::rename(from, to)
            } else {
                fs::hard_link(from, to)?;
                fs::remove_file(from)
            }
        }
        _ => Err(err),
    }
}

/// fsyncs a directory so that entries created or renamed in it are durable.
pub(crate) fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Flushes everything written to the file system holding `path` (`syncfs(2)`).
pub(crate) fn sync_fs(path: &Path) -> io::Result<()> {
    let dir = File::open(path)?;
    // SAFETY: syncfs takes a file descriptor this function owns for the call; it touches no
    // memory.
    let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{mode_of, permissive_umask, TestDir};

    #[test]
    fn private_files_and_dirs_ignore_a_permissive_umask() {
        permissive_umask();
        let tmp = TestDir::new("fs-util-private");
        let file = tmp.path().join("f");
        create_private_file(&file).unwrap();
        assert_eq!(mode_of(&file), 0o600);
        assert!(
            create_private_file(&file).is_err(),
            "an existing file is reused"
        );
        let dir = tmp.path().join("d");
        create_private_dir(&dir).unwrap();
        assert_eq!(mode_of(&dir), 0o700);
        let deep = tmp.path().join("a/b/c");
        create_private_dir_all(&deep).unwrap();
        for p in ["a", "a/b", "a/b/c"] {
            assert_eq!(mode_of(&tmp.path().join(p)), 0o700, "{p}");
        }
        create_private_dir_all(&deep).unwrap();
    }

    #[test]
    fn rename_never_replaces() {
        let tmp = TestDir::new("fs-util");
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        fs::write(&a, b"a").unwrap();
        fs::write(&b, b"b").unwrap();
        let err = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&b).unwrap(), b"b");
        let c = tmp.path().join("c");
        rename_noreplace(&a, &c).unwrap();
        assert!(!a.exists());
        assert_eq!(fs::read(&c).unwrap(), b"a");
        let (d, e) = (tmp.path().join("d"), tmp.path().join("e"));
        fs::create_dir(&d).unwrap();
        fs::create_dir(&e).unwrap();
        assert_eq!(
            rename_noreplace(&d, &e).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        sync_dir(tmp.path()).unwrap();
        sync_fs(tmp.path()).unwrap();
    }
}
