//! Raises the scheduling priority of the threads a snapshot's pause waits on (the thread that
//! pauses, and the vCPU threads that must leave `KVM_RUN` and acknowledge) for the length of the
//! pause, so that on a busy host the pause is not stretched by waiting for a CPU.
//!
//! Everything slow (listing the process's threads in `/proc/self/task`) happens before the pause
//! starts; inside it there are only `setpriority` calls, three per thread, and the same number
//! after it. Without `CAP_SYS_NICE` the raise fails and changes nothing. `ARKVM_PAUSE_BOOST=0`
//! turns it off (for benchmarks that compare).

/// The nice value the boosted threads get during the pause.
const BOOST_NICE: i32 = -10;

/// The threads to boost, found before the pause.
pub struct PauseBoost {
    tids: Vec<libc::id_t>,
    /// Each boosted thread's nice value before, to put back.
    saved: Vec<(libc::id_t, i32)>,
}

/// The calling thread's id.
fn gettid() -> libc::id_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::id_t }
}

impl PauseBoost {
    /// Finds the calling thread and the vCPU threads (named `vcpu*`).
    pub fn prepare() -> Self {
        let off = std::env::var("ARKVM_PAUSE_BOOST").is_ok_and(|v| v == "0");
        let mut tids = Vec::new();
        if !off {
            tids.push(gettid());
            if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
                for entry in dir.flatten() {
                    let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
                        continue;
                    };
                    let comm =
                        std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                    if comm.starts_with("vcpu") {
                        tids.push(tid);
                    }
                }
            }
        }
        Self {
            tids,
            saved: Vec::new(),
        }
    }

    /// Raises the threads' priority (call just before pausing).
    pub fn raise(&mut self) {
        for &tid in &self.tids {
            // SAFETY: plain syscalls on a thread id; no memory of ours is touched. A thread
            // that has ended makes them fail, which is harmless.
            unsafe {
                *libc::__errno_location() = 0;
                let before = libc::getpriority(libc::PRIO_PROCESS, tid);
                if *libc::__errno_location() != 0 {
                    continue;
                }
                if before > BOOST_NICE
                    && libc::setpriority(libc::PRIO_PROCESS, tid, BOOST_NICE) == 0
                {
                    self.saved.push((tid, before));
                }
            }
        }
    }
}

impl Drop for PauseBoost {
    /// Puts every boosted thread's priority back.
    fn drop(&mut self) {
        for &(tid, nice) in &self.saved {
            // SAFETY: as in `raise`.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, tid, nice);
            }
        }
    }
}
