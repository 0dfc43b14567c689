//! Filling guest memory through userfaultfd: `UFFDIO_COPY` of a checked chunk and
//! `UFFDIO_ZEROPAGE` of a zero chunk, both waking the threads that wait on the range.
//!
//! A copy the kernel refuses with EAGAIN (guest memory changing shape under it) copied nothing
//! and is repeated; the `userfaultfd` crate reports it as `PartiallyCopied` with the kernel's
//! `-EAGAIN` as the count, so only a count inside the request is ever added to the bytes done.

use std::time::Duration;

use userfaultfd::Uffd;

use super::error::LazyMemoryError;

/// How many times in a row a fill may be refused with EAGAIN before it is an error.
const MAX_FILL_RETRIES: u32 = 2000;

/// After this many refusals in a row, each retry sleeps a millisecond instead of yielding.
const SPIN_RETRIES: u32 = 100;

/// The page size of guest memory as userfaultfd fills it.
const PAGE: usize = 4096;

/// What one `UFFDIO_COPY` call did to a fill that still needs `remaining` bytes.
#[derive(Debug)]
pub(super) enum CopyStep {
    /// `n` bytes (1..=remaining) were copied.
    Copied(usize),
    /// Nothing was copied and the call may be repeated (EAGAIN).
    Retry,
    /// The kernel reported more bytes than were asked for.
    BadCount(usize),
    /// The copy failed.
    Failed(userfaultfd::Error),
}

/// Reads a copy's result: only a count in `1..=remaining` is progress; a `PartiallyCopied`
/// outside that range (the crate's report of EAGAIN) is a retry, never added to the bytes done.
pub(super) fn copy_step(result: Result<usize, userfaultfd::Error>, remaining: usize) -> CopyStep {
    match result {
        Ok(n) | Err(userfaultfd::Error::PartiallyCopied(n)) if (1..=remaining).contains(&n) => {
            CopyStep::Copied(n)
        }
        Ok(0) | Err(userfaultfd::Error::PartiallyCopied(_)) => CopyStep::Retry,
        Ok(n) => CopyStep::BadCount(n),
        Err(e) => CopyStep::Failed(e),
    }
}

/// The errno of a failed zeropage: EAGAIN is transient, EEXIST means the page is already there.
fn zeropage_errno(e: &userfaultfd::Error) -> Option<i32> {
    match e {
        userfaultfd::Error::ZeropageFailed(errno) => Some(*errno as i32),
        _ => None,
    }
}

/// Waits before retry number `retries` of a refused fill.
fn back_off(retries: u32) {
    if retries < SPIN_RETRIES {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Copies `data` to guest memory at `host`, waking the threads that wait on it.
///
/// The caller owns chunk `index` (it claimed it), so nothing else fills `[host, host + len)`.
pub(super) fn copy_fill(
    uffd: &Uffd,
    index: u64,
    data: &[u8],
    host: usize,
) -> Result<(), LazyMemoryError> {
    let mut done = 0usize;
    let mut retries = 0u32;
    while done < data.len() {
        let remaining = data.len() - done;
        // SAFETY: the source is `remaining` bytes of the caller's buffer; the destination is the
        // same length inside one registered guest memory region (from the layout), which stays
        // mapped while the loader runs; nothing else fills it (the caller claimed the chunk).
        let r = unsafe {
            uffd.copy(
                data[done..].as_ptr().cast(),
                (host + done) as *mut libc::c_void,
                remaining,
                true,
            )
        };
        match copy_step(r, remaining) {
            CopyStep::Copied(n) => {
                done += n;
                retries = 0;
            }
            CopyStep::Retry if retries < MAX_FILL_RETRIES => {
                retries += 1;
                back_off(retries);
            }
            CopyStep::Retry => {
                return Err(LazyMemoryError::FillStalled {
                    index,
                    attempts: retries + 1,
                })
            }
            CopyStep::BadCount(reported) => {
                return Err(LazyMemoryError::FillCount {
                    index,
                    reported,
                    remaining,
                })
            }
            CopyStep::Failed(source) => return Err(LazyMemoryError::Fill { index, source }),
        }
    }
    Ok(())
}

/// Maps zero pages over `[host, host + len)`, waking the threads that wait on it.
pub(super) fn zero_fill(
    uffd: &Uffd,
    index: u64,
    host: usize,
    len: usize,
) -> Result<(), LazyMemoryError> {
    // SAFETY: as in `copy_fill`: one claimed chunk inside registered guest memory.
    match unsafe { uffd.zeropage(host as *mut libc::c_void, len, true) } {
        Ok(n) if n == len => return Ok(()),
        Ok(_) => {}
        Err(e) if zeropage_errno(&e) == Some(libc::EAGAIN) => {}
        Err(source) => return Err(LazyMemoryError::Fill { index, source }),
    }
    // Interrupted part of the way (the crate does not say how far): page by page, where a page
    // already there (EEXIST) is one this call filled.
    for page in (0..len).step_by(PAGE) {
        let mut retries = 0u32;
        loop {
            // SAFETY: one page of the chunk above.
            let r = unsafe {
                uffd.zeropage(
                    (host + page) as *mut libc::c_void,
                    PAGE.min(len - page),
                    true,
                )
            };
            match r {
                Ok(_) => break,
                Err(e) if zeropage_errno(&e) == Some(libc::EEXIST) => break,
                Err(e)
                    if zeropage_errno(&e) == Some(libc::EAGAIN) && retries < MAX_FILL_RETRIES =>
                {
                    retries += 1;
                    back_off(retries);
                }
                Err(source) => return Err(LazyMemoryError::Fill { index, source }),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_count_within_the_request_is_progress() {
        // EAGAIN before anything was copied: the crate hands back the kernel's -EAGAIN.
        let eagain = (-(libc::EAGAIN as i64)) as usize;
        assert!(matches!(
            copy_step(Err(userfaultfd::Error::PartiallyCopied(eagain)), 4096),
            CopyStep::Retry
        ));
        assert!(matches!(
            copy_step(Err(userfaultfd::Error::PartiallyCopied(0)), 4096),
            CopyStep::Retry
        ));
        assert!(matches!(
            copy_step(Err(userfaultfd::Error::PartiallyCopied(8192)), 4096),
            CopyStep::Retry
        ));
        assert!(matches!(
            copy_step(Err(userfaultfd::Error::PartiallyCopied(1024)), 4096),
            CopyStep::Copied(1024)
        ));
        assert!(matches!(copy_step(Ok(4096), 4096), CopyStep::Copied(4096)));
        assert!(matches!(copy_step(Ok(0), 4096), CopyStep::Retry));
        assert!(matches!(
            copy_step(Ok(8192), 4096),
            CopyStep::BadCount(8192)
        ));
        assert!(matches!(
            copy_step(Err(userfaultfd::Error::ReadEof), 4096),
            CopyStep::Failed(_)
        ));
    }
}
