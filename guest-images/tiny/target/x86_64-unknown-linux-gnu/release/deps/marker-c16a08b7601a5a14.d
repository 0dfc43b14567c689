/work/main/guest-images/tiny/target/x86_64-unknown-linux-gnu/release/deps/marker-c16a08b7601a5a14.d: src/bin/marker.rs Cargo.toml

/work/main/guest-images/tiny/target/x86_64-unknown-linux-gnu/release/deps/libmarker-c16a08b7601a5a14.rmeta: src/bin/marker.rs Cargo.toml

src/bin/marker.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
