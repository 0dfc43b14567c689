/work/main/guest-images/tiny/target/x86_64-unknown-linux-gnu/release/deps/arkvm_tiny_guests-bd41572ef66a3316.d: src/lib.rs src/boot.rs src/mem.rs src/blk.rs src/bootparams.rs src/cmdline.rs src/diskpattern.rs src/hostile.rs src/paging.rs src/region.rs src/serial.rs src/status.rs src/tsc.rs src/virtio_mmio.rs Cargo.toml

/work/main/guest-images/tiny/target/x86_64-unknown-linux-gnu/release/deps/libarkvm_tiny_guests-bd41572ef66a3316.rmeta: src/lib.rs src/boot.rs src/mem.rs src/blk.rs src/bootparams.rs src/cmdline.rs src/diskpattern.rs src/hostile.rs src/paging.rs src/region.rs src/serial.rs src/status.rs src/tsc.rs src/virtio_mmio.rs Cargo.toml

src/lib.rs:
src/boot.rs:
src/mem.rs:
src/blk.rs:
src/bootparams.rs:
src/cmdline.rs:
src/diskpattern.rs:
src/hostile.rs:
src/paging.rs:
src/region.rs:
src/serial.rs:
src/status.rs:
src/tsc.rs:
src/virtio_mmio.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
