//! Restore: rebuilding a VM in a new process from a snapshot directory or a backup point.
//!
//! - [`source`]: [`source::RestoreSource`], what a restore reads (state, memory as a
//!   `ChunkSource`, disks).
//! - [`disk_hydration`]: instant disks for a restore from a point (read-through, hydrated in
//!   the background).
//! - [`from_dir`]: [`from_dir::restore`], open the source, copy the disks, build the VM.
//! - [`lazy_memory`]: the userfaultfd loader that fills guest memory from the `ChunkSource`.

pub mod disk_hydration;
pub mod from_dir;
pub mod lazy_memory;
pub mod source;
