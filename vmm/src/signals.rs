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

/// Blocks SIGINT and SIGTERM on the calling thread (and the threads it starts from now on), so
/// that one arriving before [`run_until_terminated`] waits stays pending; returns the set.
pub fn block_termination() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is valid storage for sigemptyset to initialise.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame; the mask change only affects this
    // thread and the threads it starts from now on.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

/// Runs `work` on a thread of its own with SIGINT and SIGTERM blocked, and waits for it on the
/// calling thread, which takes those signals instead: returns `Some` with `work`'s result, or
/// `None` when a termination signal arrived first (the caller then ends the process cleanly).
/// For servers without an event loop (`dr serve`).
pub fn run_until_terminated<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<Option<T>> {
    let set = block_termination();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("server".into())
        .spawn(move || {
            let _ = tx.send(work());
        })?;
    let wait = libc::timespec {
        tv_sec: 0,
        tv_nsec: 200_000_000,
    };
    loop {
        match rx.try_recv() {
            Ok(v) => return Ok(Some(v)),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                return Err(std::io::Error::other(
                    "the server thread ended without a result",
                ))
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => {}
        }
        // SAFETY: `set` and `wait` are valid for the call; no siginfo is requested.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &wait) };
        if sig == libc::SIGINT || sig == libc::SIGTERM {
            TERMINATED.store(true, Ordering::SeqCst);
            return Ok(None);
        }
    }
}
