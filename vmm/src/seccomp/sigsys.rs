//! The SIGSYS handler: a denied system call (SECCOMP_RET_TRAP) prints one line naming the thread
//! kind and the system call, then ends the process. Only async-signal-safe calls (`write`,
//! `_exit`) and no allocation happen in the handler.

use std::cell::Cell;

use super::{syscall_name, ThreadKind};

/// The exit status of a process stopped by a denied system call (128 + SIGSYS, as if killed).
pub const DENIED_EXIT: i32 = 128 + libc::SIGSYS;

thread_local! {
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Records the calling thread's kind for the message.
pub fn set_thread_kind(kind: ThreadKind) {
    KIND.with(|k| k.set(Some(kind)));
}

/// Installs the handler for the whole process.
pub fn install() -> std::io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value to fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handler as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action.sa_mask` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is fully initialised and the handler only makes async-signal-safe calls.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A fixed buffer that formats without allocating.
struct Line {
    buf: [u8; 320],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// Formats the message for a denied system call `nr` made by a thread of kind `kind`.
pub(super) fn message(kind: Option<ThreadKind>, nr: i64, out: &mut [u8; 320]) -> usize {
    let mut line = Line {
        buf: [0; 320],
        len: 0,
    };
    line.push(b"arkvm: error: seccomp: the ");
    line.push(kind.map_or("unfiltered", |k| k.name()).as_bytes());
    line.push(b" thread made the system call ");
    line.push(syscall_name(nr).unwrap_or("unknown").as_bytes());
    line.push(b" (number ");
    line.push_number(nr as u64);
    line.push(b"), which its filter does not allow; stopping the VM. Add it to ");
    line.push(b"vmm/src/seccomp/kinds.rs if it is needed, or run with --seccomp off to debug ");
    line.push(b"(docs/seccomp.md)\n");
    out.copy_from_slice(&line.buf);
    line.len
}

extern "C" fn handler(_signal: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo; for SIGSYS its `_sigsys` member holds the
    // system call number as an int at byte 24 (after signo, errno, code, padding, call_addr).
    let nr = unsafe {
        (info as *const u8)
            .add(24)
            .cast::<libc::c_int>()
            .read_unaligned()
    };
    let kind = KIND.with(|k| k.get());
    let mut buf = [0u8; 320];
    let len = message(kind, i64::from(nr), &mut buf);
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf` outlives the call.
    unsafe {
        libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len);
        libc::_exit(DENIED_EXIT);
    }
}
