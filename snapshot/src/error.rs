//! Error helpers shared by every arkvm crate: one way to print an error with its causes, and one
//! policy for poisoned locks.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Formats an error and its chain of sources as one line: "what failed: why: why".
///
/// A source whose text the line already ends with is not repeated (some errors include their
/// source's text in their own message).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let msg = src.to_string();
        if !s.ends_with(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = src.source();
    }
    s
}

/// Locks `m`, recovering the guard if a thread panicked while holding it.
///
/// This is arkvm's one lock-poisoning policy. A panic in arkvm is a bug and is already reported
/// where it happens; every structure behind these locks is valid between statements, so the
/// other threads go on with it rather than cascade the panic. That matters most in threads that
/// must never panic, such as userfaultfd handlers, where a panic would leave every faulting
/// writer blocked in the kernel.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes `l` for reading, under the same policy as [`lock`].
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// Takes `l` for writing, under the same policy as [`lock`].
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped: inner")]
    struct Repeats(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner;

    #[test]
    fn chains_sources_without_repeating_them() {
        let e = Outer(std::io::Error::other("disk gone"));
        assert_eq!(error_chain(&e), "outer: disk gone");
        assert_eq!(error_chain(&Repeats(Inner)), "wrapped: inner");
    }

    #[test]
    fn a_poisoned_lock_is_recovered() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }
}
