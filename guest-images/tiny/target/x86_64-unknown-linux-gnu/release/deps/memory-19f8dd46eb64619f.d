/work/main/guest-images/tiny/target/x86_64-unknown-linux-gnu/release/deps/memory-19f8dd46eb64619f.d: src/bin/memory.rs Cargo.toml

/work/main/guest-images/tiny/target/x86_64-unknown-linux-gnu/release/deps/libmemory-19f8dd46eb64619f.rmeta: src/bin/memory.rs Cargo.toml

src/bin/memory.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
