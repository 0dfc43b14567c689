//! Reserving an overlay's worst-case space before a snapshot switches a disk to it, so that a
//! snapshot never costs the guest its disk: `fallocate(FALLOC_FL_KEEP_SIZE)` allocates the
//! blocks past the end of the file (the file's length, which the overlay's recovery reads,
//! does not change); where the filesystem cannot fallocate, its free space is checked instead.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::overlay::OverlayError;

/// Reserves bytes `from..end` of `file` (at `path`).
pub(super) fn reserve(file: &File, path: &Path, from: u64, end: u64) -> Result<(), OverlayError> {
    let len = end.saturating_sub(from);
    if len == 0 {
        return Ok(());
    }
    let (Ok(off), Ok(l)) = (libc::off_t::try_from(from), libc::off_t::try_from(len)) else {
        return Err(no_space(path, len, free_bytes(file).unwrap_or(0)));
    };
    // SAFETY: fallocate on a descriptor this function borrows; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, off, l) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    let free = free_bytes(file);
    match err.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => {
            Err(no_space(path, len, free.unwrap_or(0)))
        }
        // No fallocate here: the free space must cover the worst case.
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => match free {
            Ok(f) if f >= len => Ok(()),
            Ok(f) => Err(no_space(path, len, f)),
            Err(source) => Err(OverlayError::Io {
                path: path.to_path_buf(),
                what: "check the free space of its filesystem",
                source,
            }),
        },
        _ => Err(OverlayError::Io {
            path: path.to_path_buf(),
            what: "reserve space for the guest's writes",
            source: err,
        }),
    }
}

fn no_space(path: &Path, needed: u64, free: u64) -> OverlayError {
    OverlayError::NoSpace {
        path: path.to_path_buf(),
        needed,
        free,
    }
}

/// Bytes an unprivileged writer may still use on `file`'s filesystem.
fn free_bytes(file: &File) -> io::Result<u64> {
    // SAFETY: an all-zero statvfs is a valid value for fstatvfs to fill in.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable statvfs owned by this frame.
    if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}
