//! The progress bar of a restore's disk hydration, on stderr when it is a terminal.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::restore::disk_hydration::DiskHydration;

/// Draws the bar until dropped or until hydration ends.
pub struct HydrateBar {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the bar, if stderr is a terminal.
pub fn start(hydration: Arc<DiskHydration>) -> Option<HydrateBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("hydrate-bar".into())
        .spawn(move || {
            // Terminal ioctls (its width) and writes: the capture kind allows both.
            crate::seccomp::enter(crate::seccomp::ThreadKind::Capture);
            let total = hydration.totals().bytes_total;
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "hydrating disks {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style);
            }
            loop {
                let t = hydration.totals();
                bar.set_position(t.bytes_done);
                if t.done || t.error.is_some() || flag.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            bar.finish_and_clear();
        })
        .ok()?;
    Some(HydrateBar {
        stop,
        thread: Some(thread),
    })
}

impl Drop for HydrateBar {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
