//! The exit statuses of `arkvm`, one table for every command (documented in
//! `docs/exit-status.md`).

use std::process::ExitCode;

/// The command did what was asked (for `run` and `restore`: the guest powered off or rebooted).
pub const SUCCESS: u8 = 0;
/// Bad input or a failed operation: a file, value, snapshot or repository that cannot be used,
/// a VM that cannot be reached, an I/O error.
pub const FAILURE: u8 = 1;
/// Bad usage: an unknown or missing flag, a malformed value, flags that contradict each other.
/// Nothing was started.
pub const USAGE: u8 = 2;
/// Damage found: `backup verify` found damaged chunks or points, or `backup list` listed an
/// unreadable point.
pub const DAMAGE: u8 = 3;
/// The guest stopped abnormally (a triple fault, an instruction KVM could not run, an internal
/// error), or its restored memory could not be loaded.
pub const GUEST_CRASH: u8 = 4;

/// The exit code of `status`.
pub fn code(status: u8) -> ExitCode {
    ExitCode::from(status)
}
