//! A tap device made for a unit test (`ip tuntap add`), deleted on drop.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub(crate) struct TestTap {
    pub name: String,
}

impl TestTap {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "aku{tag}{}x{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let ok = Command::new("ip")
            .args(["tuntap", "add", "dev", &name, "mode", "tap"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "cannot create tap {name} (the unit tests need root and iproute2)"
        );
        // Built first, so that a failure below still deletes the tap.
        let tap = Self { name };
        let up = Command::new("ip")
            .args(["link", "set", &tap.name, "up"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(up, "cannot bring tap {} up", tap.name);
        tap
    }
}

impl Drop for TestTap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["tuntap", "del", "dev", &self.name, "mode", "tap"])
            .status();
    }
}
