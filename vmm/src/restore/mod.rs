//! Restore: rebuilding a VM from a snapshot in a new process.

pub mod from_dir;
pub mod lazy_memory;
