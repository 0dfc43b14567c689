//! Link the guest binaries as static, non-PIE ELF images placed by `link.ld` at 2 MiB.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo always sets CARGO_MANIFEST_DIR"),
    );
    let script = dir.join("link.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    let args = [
        "-nostartfiles".to_string(),
        "-nostdlib".to_string(),
        "-static".to_string(),
        "-no-pie".to_string(),
        "-Wl,--build-id=none".to_string(),
        "-Wl,-z,max-page-size=0x1000".to_string(),
        "-Wl,-z,noexecstack".to_string(),
        format!("-Wl,-T,{}", script.display()),
    ];
    for arg in args {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
