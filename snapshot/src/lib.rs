//! arkvm snapshot subsystem without KVM: the `Persist` trait, the snapshot format and the
//! backup repository.

pub mod persist;

pub use persist::Persist;
