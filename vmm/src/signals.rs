//! SIGINT and SIGTERM end the VM cleanly: the handler only wakes the event loop, which then
//! stops the guest, answers API clients and removes the control socket.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
static TERMINATED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    TERMINATED.store(true, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte buffer and `fd` is the
        // exit event fd, which lives as long as the process runs the guest.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Routes SIGINT and SIGTERM to the event fd `fd` from now on.
pub fn set_wake_fd(fd: i32) {
    WAKE_FD.store(fd, Ordering::SeqCst);
}

/// Installs the handlers. Call first thing, before anything (a control socket) needs cleaning
/// up: a signal that arrives before the event loop runs is remembered and honoured there.
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only touches atomics and calls write(2), both async-signal-safe.
        unsafe { libc::signal(sig, on_terminate as *const () as libc::sighandler_t) };
    }
}

/// Whether a termination signal arrived.
pub fn terminated() -> bool {
    TERMINATED.load(Ordering::SeqCst)
}
