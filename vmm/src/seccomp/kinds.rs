//! The thread kinds of a running VM and the system calls each may make: the one table to edit
//! when a thread needs another system call, or when a new kind of thread appears (see
//! `docs/seccomp.md`).
//!
//! A kind's filter allows its own groups, and every group of the kinds it starts: a thread
//! started by a filtered thread keeps its parent's filter (seccomp filters stack), so a parent
//! must allow what its children do. Lists name system calls; `names.rs` maps them to numbers,
//! and a misspelt name fails `arkvm run` before anything starts (and the unit tests). `call(N)`
//! allows `call` only with N as its second argument (an ioctl request).

/// What a thread of the VMM process does; each kind gets its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread once the VM runs: the event loop, devices, API calls, snapshot starts.
    Main,
    /// A vCPU thread (`vcpuN`, `vstate/vcpu.rs`).
    Vcpu,
    /// The control socket's accept thread and its per-connection threads (`api/server.rs`).
    Api,
    /// A snapshot, capture or backup worker (`capture/job.rs`), with any library threads it
    /// starts (an object-store client's runtime, a staging pool): network and file I/O.
    Capture,
    /// The userfaultfd write-protect fault handler of a live copy-on-write snapshot
    /// (`capture/cow.rs`).
    CowFault,
    /// The userfaultfd missing-page handler and prefetcher of a lazy restore
    /// (`restore/lazy_memory.rs`).
    LazyFault,
    /// The sender of a DR checkpoint (`dr_checkpoints.rs`).
    DrSend,
}

impl ThreadKind {
    /// Every kind, for building all filters at start.
    pub const ALL: [ThreadKind; 7] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::Capture,
        ThreadKind::CowFault,
        ThreadKind::LazyFault,
        ThreadKind::DrSend,
    ];

    /// The name used in messages and `docs/seccomp.md`.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
            ThreadKind::Capture => "capture",
            ThreadKind::CowFault => "cow-fault",
            ThreadKind::LazyFault => "lazy-fault",
            ThreadKind::DrSend => "dr-send",
        }
    }

    /// The groups of system calls this kind makes itself.
    pub(super) fn groups(self) -> &'static [&'static [&'static str]] {
        match self {
            ThreadKind::Main => &[
                BASE, SPAWN, FILES, NET, POLL, IOCTL, SIGNALS, PROCESS, MEMORY_FDS,
            ],
            ThreadKind::Vcpu => &[BASE, FILES, POLL, IOCTL],
            ThreadKind::Api => &[BASE, SPAWN, NET, POLL, SOCKET_IOCTL, THREAD_EXIT],
            ThreadKind::Capture => &[BASE, SPAWN, FILES, NET, POLL, IOCTL, MEMORY_FDS],
            ThreadKind::CowFault => &[BASE, FILES, POLL, IOCTL],
            // NET: a point in an object store is read from the fault threads.
            ThreadKind::LazyFault => &[BASE, FILES, NET, POLL, IOCTL],
            ThreadKind::DrSend => &[BASE, FILES, NET, POLL, SOCKET_IOCTL],
        }
    }

    /// The kinds of thread this kind starts after its own filter is in place.
    pub(super) fn starts(self) -> &'static [ThreadKind] {
        match self {
            ThreadKind::Main => &[
                ThreadKind::Vcpu,
                ThreadKind::Capture,
                ThreadKind::CowFault,
                ThreadKind::LazyFault,
                ThreadKind::DrSend,
            ],
            ThreadKind::Api => &[ThreadKind::Api],
            _ => &[],
        }
    }
}

/// Every thread: memory, locks, time, reading and writing open descriptors, logging, ending.
const BASE: &[&str] = &[
    "read",
    "write",
    "readv",
    "writev",
    "pread64",
    "pwrite64",
    "close",
    "futex",
    "mmap",
    "munmap",
    "mremap",
    "mprotect",
    "madvise",
    "brk",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sigaltstack",
    "exit",
    "exit_group",
    "clock_gettime",
    "clock_getres",
    "clock_nanosleep",
    "nanosleep",
    "gettimeofday",
    "sched_yield",
    "sched_getaffinity",
    "getpid",
    "gettid",
    "getrandom",
    "tgkill",
    "restart_syscall",
    "fstat",
    "newfstatat",
    "statx",
    "lseek",
    "fcntl",
    "dup",
    // Thread priorities: the pause boost (capture/pause_boost.rs), the copier and backup
    // workers at nice +10, the lazy restore's prefetch at nice 10.
    "getpriority",
    "setpriority",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
];

/// Starting threads (Rust's spawn, and a thread applying its own filter at its start).
const SPAWN: &[&str] = &[
    "clone",
    "clone3",
    "set_robust_list",
    "rseq",
    "prctl",
    "seccomp",
];

/// Files: snapshots, repositories, overlays and staging directories.
const FILES: &[&str] = &[
    "openat",
    "open",
    "creat",
    "stat",
    "lstat",
    "access",
    "faccessat",
    "faccessat2",
    "readlink",
    "readlinkat",
    "getcwd",
    "getdents64",
    "mkdir",
    "mkdirat",
    "rmdir",
    "unlink",
    "unlinkat",
    "rename",
    "renameat",
    "renameat2",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "fsync",
    "fdatasync",
    "sync_file_range",
    "syncfs",
    "fallocate",
    "ftruncate",
    "truncate",
    "statfs",
    "fstatfs",
    "fchmod",
    "fchmodat",
    "chmod",
    "fchown",
    "flock",
    "preadv",
    "pwritev",
    "preadv2",
    "pwritev2",
    "copy_file_range",
    "sendfile",
    "utimensat",
    "dup3",
    "umask",
    "fadvise64",
    "msync",
    "mincore",
];

/// Sockets: the control socket, the DR link, an object-store client.
const NET: &[&str] = &[
    "socket",
    "socketpair",
    "connect",
    "accept",
    "accept4",
    "bind",
    "listen",
    "sendto",
    "recvfrom",
    "sendmsg",
    "recvmsg",
    "sendmmsg",
    "recvmmsg",
    "shutdown",
    "getsockname",
    "getpeername",
    "setsockopt",
    "getsockopt",
    "uname",
];

/// Waiting on descriptors and waking other threads.
const POLL: &[&str] = &[
    "poll",
    "ppoll",
    "select",
    "pselect6",
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "eventfd2",
    "pipe2",
    "timerfd_create",
    "timerfd_settime",
];

/// KVM, userfaultfd and terminal ioctls (their numbers are not filtered, see docs/seccomp.md).
const IOCTL: &[&str] = &["ioctl"];

/// The socket ioctls of the standard library (set_nonblocking: FIONBIO; FIOCLEX).
const SOCKET_IOCTL: &[&str] = &["ioctl(0x5421)", "ioctl(0x5451)"];

/// What the C library may do while a short-lived thread (an API connection) ends, after its
/// thread-locals are gone: a thread without file access was seen stopped on `openat` there,
/// in a live snapshot of a restored VM under load (the full suite, 2026-12-03).
const THREAD_EXIT: &[&str] = &["openat"];

/// Signals sent and handled by the event loop (vCPU kicks, SIGTERM).
const SIGNALS: &[&str] = &["rt_sigaction", "kill", "tkill", "rt_sigtimedwait"];

/// Waiting for children and process limits (the event loop's clean-up).
const PROCESS: &[&str] = &["wait4", "getrlimit", "prlimit64", "sched_getparam"];

/// Guest-memory descriptors created after the start (live snapshots, restores).
const MEMORY_FDS: &[&str] = &["userfaultfd", "memfd_create"];
