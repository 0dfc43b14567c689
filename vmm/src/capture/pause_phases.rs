//! Where a snapshot's vCPU pause went, phase by phase, for the log (`cow pause phases:`) and
//! `scripts/bench/pause_load.py`: raising the pause priority, stopping the vCPUs (kicking them
//! out of `KVM_RUN`), saving their and the devices' state, write-protecting what was written,
//! freezing the disks, starting the copy, resuming.

use std::fmt;
use std::time::Instant;

/// Phase names and their lengths in microseconds, in order.
pub struct PausePhases {
    last: Instant,
    phases: Vec<(&'static str, u64)>,
}

impl PausePhases {
    /// Starts timing at `start`.
    pub fn new(start: Instant) -> Self {
        Self {
            last: start,
            phases: Vec::with_capacity(8),
        }
    }

    /// Ends phase `name` now; the next phase starts here.
    pub fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.phases
            .push((name, now.duration_since(self.last).as_micros() as u64));
        self.last = now;
    }
}

impl fmt::Display for PausePhases {
    /// `name_us=N` for each phase, space-separated.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, us)) in self.phases.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{name}_us={us}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_print_in_order_and_add_up() {
        let start = Instant::now();
        let mut p = PausePhases::new(start);
        p.mark("stop_vcpus");
        std::thread::sleep(std::time::Duration::from_millis(2));
        p.mark("save_state");
        let text = p.to_string();
        assert!(text.starts_with("stop_vcpus_us="), "{text}");
        assert!(text.contains(" save_state_us="), "{text}");
        let total: u64 = p.phases.iter().map(|(_, us)| us).sum();
        assert!(total >= 2000, "{total}");
        assert!(total <= start.elapsed().as_micros() as u64);
    }
}
