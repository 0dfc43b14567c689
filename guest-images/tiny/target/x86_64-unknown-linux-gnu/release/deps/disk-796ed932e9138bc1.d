/work/main/guest-images/tiny/target/x86_64-unknown-linux-gnu/release/deps/disk-796ed932e9138bc1.d: src/bin/disk.rs Cargo.toml

/work/main/guest-images/tiny/target/x86_64-unknown-linux-gnu/release/deps/libdisk-796ed932e9138bc1.rmeta: src/bin/disk.rs Cargo.toml

src/bin/disk.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
