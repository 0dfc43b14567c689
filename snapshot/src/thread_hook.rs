//! A hook that every thread this crate starts on its own (an object store's runtime and lease
//! threads) runs first, so that the VMM can put them under its system call filters
//! (`vmm/src/seccomp/`) like the threads it starts itself.

use std::sync::OnceLock;

static START_HOOK: OnceLock<fn()> = OnceLock::new();

/// Sets the hook; the first call wins, later ones are ignored.
pub fn set_thread_start_hook(hook: fn()) {
    let _ = START_HOOK.set(hook);
}

/// Runs the hook, if one is set, on the calling thread.
pub fn on_thread_start() {
    if let Some(hook) = START_HOOK.get() {
        hook();
    }
}
