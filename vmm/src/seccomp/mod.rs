//! System call filters per thread kind (seccomp-bpf via rust-vmm's `seccompiler`).
//!
//! `arkvm run` and `arkvm restore` call [`prepare`] first: it builds every kind's filter and
//! installs the SIGSYS handler. Each thread then calls [`enter`] with its kind as the first
//! thing it does; the main thread enters [`ThreadKind::Main`] when the VM starts running. A
//! denied system call raises SIGSYS, whose handler prints the thread kind and the system call's
//! number and name, then ends the process (exit status 159). `--seccomp off` skips all of it.
//! The lists live in `kinds.rs`; `docs/seccomp.md` says how to add a system call or a kind.

mod kinds;
mod names;
mod sigsys;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub use kinds::ThreadKind;
pub use names::syscall_name;

/// Whether the filters are installed (`--seccomp on|off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Every thread runs under its kind's filter.
    On,
    /// No filter: for debugging only.
    Off,
}

/// Why the filters could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A list in `kinds.rs` names a system call this architecture does not have.
    #[error("the {kind} thread filter names an unknown system call `{name}`")]
    UnknownSyscall {
        /// The thread kind.
        kind: &'static str,
        /// The name.
        name: &'static str,
    },
    /// seccompiler refused the filter.
    #[error("cannot build the {kind} thread filter")]
    Build {
        /// The thread kind.
        kind: &'static str,
        /// The cause.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

static FILTERS: OnceLock<HashMap<ThreadKind, BpfProgram>> = OnceLock::new();

/// Builds every kind's filter and installs the SIGSYS handler (with `On`); with `Off` nothing is
/// filtered and [`enter`] does nothing. Call once, before the VM's threads start.
pub fn prepare(mode: SeccompMode) -> Result<(), SeccompError> {
    if mode == SeccompMode::Off {
        tracing::warn!("seccomp filters are off (--seccomp off): for debugging only");
        return Ok(());
    }
    let mut built = HashMap::new();
    for kind in ThreadKind::ALL {
        built.insert(kind, build(kind)?);
    }
    sigsys::install().map_err(SeccompError::Handler)?;
    let _ = FILTERS.set(built);
    Ok(())
}

/// Installs `kind`'s filter on the calling thread, if [`prepare`] turned filters on. A thread
/// that cannot install its filter ends the process: it must not run unfiltered.
pub fn enter(kind: ThreadKind) {
    let Some(program) = FILTERS.get().and_then(|f| f.get(&kind)) else {
        return;
    };
    sigsys::set_thread_kind(kind);
    if let Err(e) = seccompiler::apply_filter(program) {
        eprintln!(
            "arkvm: error: cannot install the {} thread's seccomp filter: {}",
            kind.name(),
            crate::error_chain(&e)
        );
        std::process::exit(1);
    }
}

/// The system call names `kind`'s filter allows: its own groups and those of every kind it
/// starts, transitively.
pub fn allowed(kind: ThreadKind) -> BTreeSet<&'static str> {
    let mut names = BTreeSet::new();
    let mut todo = vec![kind];
    let mut seen = BTreeSet::new();
    while let Some(k) = todo.pop() {
        if !seen.insert(k.name()) {
            continue;
        }
        for group in k.groups() {
            names.extend(group.iter().copied());
        }
        todo.extend_from_slice(k.starts());
    }
    names
}

/// The number of system call `name` on this architecture.
pub fn syscall_number(name: &str) -> Option<i64> {
    (0..512).find(|&nr| syscall_name(nr) == Some(name))
}

fn build(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let names = allowed(kind);
    let unknown = |name| SeccompError::UnknownSyscall {
        kind: kind.name(),
        name,
    };
    for name in &names {
        // `call(N)`: the call only with N as its second argument (an ioctl request).
        let (call, arg) = match name.split_once('(') {
            Some((call, rest)) => {
                let arg = rest.strip_suffix(')').and_then(parse_arg);
                (call, Some(arg.ok_or_else(|| unknown(name))?))
            }
            None => (*name, None),
        };
        let nr = syscall_number(call).ok_or_else(|| unknown(name))?;
        if arg.is_some() && names.contains(call) {
            continue;
        }
        let chain = rules.entry(nr).or_default();
        if let Some(arg) = arg {
            let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, arg)
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(|e| SeccompError::Build {
                    kind: kind.name(),
                    source: seccompiler::Error::Backend(e),
                })?;
            chain.push(cond);
        }
    }
    let build_err = |source| SeccompError::Build {
        kind: kind.name(),
        source,
    };
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| build_err(seccompiler::Error::Backend(e)))?;
    BpfProgram::try_from(filter).map_err(|e| build_err(seccompiler::Error::Backend(e)))
}

fn parse_arg(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}
