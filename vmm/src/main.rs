//! The `arkvm` command.

fn main() {}
