//! The `arkvm` command line: argument definitions and the commands behind them.

/// `println!` for the client commands: a failed write to stdout (a full disk, say) ends the
/// command with a one-line error and status 1 instead of a panic.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            eprintln!("arkvm: error: cannot write the output: {e}");
            std::process::exit(1);
        }
    }};
}

pub mod backup;
pub mod common;
pub mod control;
pub mod docs;
pub mod dr;
pub mod dr_report;
pub mod drill;
pub mod exit;
pub mod format;
pub mod hydrate_bar;
pub mod launch;

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

use crate::capture::staging::StagingSize;

use crate::config::{
    check_memory, check_memory_fits_host, check_vm_name, host_memory_bytes, ConfigError,
};

/// arkvm: a KVM virtual machine monitor for backup and disaster recovery of running guests.
#[derive(Parser)]
#[command(name = "arkvm", version, about, long_about = None)]
pub struct Cli {
    /// Log level for messages on stderr. The ARKVM_LOG environment variable takes tracing
    /// filter syntax and wins when set.
    #[arg(long, global = true, default_value = "warn",
        value_parser = ["off", "error", "warn", "info", "debug", "trace"])]
    pub log_level: String,
    /// Log format on stderr: text, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Boot a guest kernel (ELF vmlinux or bzImage) and run it until it stops.
    Run(RunArgs),
    /// Start a new VM from a snapshot, continuing exactly where it was taken.
    Restore(RestoreArgs),
    /// Snapshot a running VM through its control socket (live copy-on-write by default).
    Snapshot(SnapshotArgs),
    /// Pause a running VM's vCPUs.
    Pause(SocketArg),
    /// Resume a paused VM.
    Resume(SocketArg),
    /// Show a VM's state and configuration (and its last snapshot).
    Status(StatusArgs),
    /// Stop a VM (arkvm exits with status 0).
    Shutdown(SocketArg),
    /// Manage a backup repository.
    #[command(subcommand)]
    Backup(backup::BackupCommand),
    /// Disaster recovery: receive checkpoints on a second host, query it, recover from it.
    #[command(subcommand)]
    Dr(dr::DrCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions(docs::CompletionsArgs),
    /// Write man pages for arkvm and every subcommand into a directory.
    Man(docs::ManArgs),
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (timestamp, level, fields, message).
    Json,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// The guest kernel: an ELF vmlinux or a bzImage.
    #[arg(long)]
    pub kernel: PathBuf,
    /// An initrd (initramfs) image.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=1")]
    pub cmdline: String,
    /// Guest memory size, a whole number of MiB, with a K, M, G or T suffix.
    #[arg(long, default_value = "256M")]
    pub memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u64,
    /// A disk: PATH[,readonly][,overlay=PATH][,id=NAME]. Repeat for more disks.
    #[arg(long = "disk", value_name = "DISK")]
    pub disks: Vec<String>,
    /// A network device on an existing tap: tap=IFNAME[,mac=MAC][,id=NAME]. Repeat for more.
    #[arg(long = "net", value_name = "NET")]
    pub nets: Vec<String>,
    /// Serve the control API (HTTP/JSON) on this Unix socket.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// The VM's name: backups in a repository are grouped and made incremental by it. 1-64
    /// characters of A-Z a-z 0-9 . _ -, not starting with '.'.
    #[arg(long, default_value = "vm")]
    pub name: String,
    /// Allow --memory larger than the host's memory (MemTotal in /proc/meminfo).
    #[arg(long)]
    pub memory_overcommit: bool,
    /// System call filters on every VMM thread (docs/seccomp.md); `off` is for debugging only.
    #[arg(long, value_enum, default_value = "on")]
    pub seccomp: crate::seccomp::SeccompMode,
    #[command(flatten)]
    pub capture: CaptureArgs,
    #[command(flatten)]
    pub dr: DrRunArgs,
}

/// How live snapshots of this VM are taken.
#[derive(clap::Args)]
pub struct CaptureArgs {
    /// Most memory for the copy-on-write staging pool of one live snapshot (e.g. 512M; 0
    /// turns it off): a guest write to memory the snapshot has not copied yet waits for a copy
    /// into this pool instead of the target's I/O. `auto` (the default) is the guest's memory
    /// size, at most half of the host's available memory when the snapshot starts. Beyond
    /// 64M the pool is freed when the snapshot ends. The ARKVM_COW_STAGING environment
    /// variable sets it when the option is not given.
    #[arg(long, value_name = "SIZE|auto")]
    pub cow_staging: Option<String>,
}

/// The environment variable that sizes the staging pool when `--cow-staging` is not given.
pub const COW_STAGING_ENV: &str = "ARKVM_COW_STAGING";

impl CaptureArgs {
    /// The staging pool's bound: the option, else the environment variable, else None (the
    /// default, automatic).
    pub fn cow_staging(&self) -> Result<Option<StagingSize>, ConfigError> {
        let text = match &self.cow_staging {
            Some(t) => t.clone(),
            None => match std::env::var(COW_STAGING_ENV) {
                Ok(t) => t,
                Err(_) => return Ok(None),
            },
        };
        StagingSize::parse(&text).map(Some)
    }
}

impl RunArgs {
    /// Checks what can be checked before anything is created: the name by the repository's
    /// rule, and the memory size, also against the host's memory unless
    /// `--memory-overcommit`.
    pub fn check(&self) -> Result<(), ConfigError> {
        check_vm_name(&self.name)?;
        self.capture.cow_staging()?;
        let bytes = check_memory(&self.memory)?;
        if let Some(host) = host_memory_bytes() {
            check_memory_fits_host(&self.memory, bytes, host, self.memory_overcommit)?;
        }
        Ok(())
    }
}

/// The command line's definition (for completions and man pages).
pub fn command() -> clap::Command {
    Cli::command()
}

/// Parses the command line and checks it before anything starts: bad usage (clap's errors)
/// exits with [`exit::USAGE`], a bad value (memory size, VM name) with [`exit::FAILURE`].
pub fn parse() -> Cli {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let status = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::SUCCESS
            };
            let _ = e.print();
            std::process::exit(i32::from(status));
        }
    };
    if let Command::Run(args) = &cli.command {
        if let Err(e) = args.check() {
            eprintln!("arkvm: error: {e}");
            std::process::exit(i32::from(exit::FAILURE));
        }
    }
    cli
}

/// Continuous protection from the start (the same as `PUT /dr` through the API).
#[derive(clap::Args)]
pub struct DrRunArgs {
    /// Send a checkpoint every --dr-interval to the `arkvm dr serve` receiver at HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", requires = "key")]
    pub dr_target: Option<String>,
    /// Time between checkpoints (e.g. 500ms, 1s, 2m, 1h).
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    pub dr_interval: String,
    /// Pre-shared key file of the DR link (the receiver's repository key).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Local staging repository for checkpoints (default under ~/.cache/arkvm/dr-staging).
    #[arg(long, value_name = "DIR")]
    pub dr_staging: Option<PathBuf>,
    /// Hold every frame the guest transmits until the DR site has committed a checkpoint
    /// taken after it (see docs/network.md).
    #[arg(long, requires = "dr_target")]
    pub dr_output_commit: bool,
}

#[derive(clap::Args)]
pub struct RestoreArgs {
    /// The snapshot directory to restore.
    #[arg(
        long = "from",
        value_name = "DIR",
        required_unless_present = "repo",
        conflicts_with = "repo"
    )]
    pub from: Option<PathBuf>,
    /// Restore a backup point from this repository (with --id).
    #[arg(long, requires = "id")]
    pub repo: Option<PathBuf>,
    /// The backup point to restore.
    #[arg(long)]
    pub id: Option<String>,
    /// The repository's key file.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Where to put the restored disks; it must not exist yet. Default: DIR.disks beside a
    /// snapshot directory; for a backup point a private temporary directory removed at exit
    /// (a point's disks are served from the repository and hydrated into it in the background).
    #[arg(long, value_name = "DIR")]
    pub disk_dir: Option<PathBuf>,
    /// How long a disk chunk of a point that cannot be read is retried before the VM stops
    /// (e.g. 500ms, 10s, 1m).
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub fetch_timeout: String,
    /// Limit the background hydration of a point's disks to this many bytes per second
    /// (K, M, G suffixes); the guest's own reads are never limited.
    #[arg(long, value_name = "RATE")]
    pub hydrate_rate: Option<String>,
    /// Refuse the snapshot unless it was taken with this much memory.
    #[arg(long)]
    pub memory: Option<String>,
    /// Serve the control API on this Unix socket.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    #[command(flatten)]
    pub capture: CaptureArgs,
    /// Attach the saved network device NAME to another tap: id=NAME,tap=IFNAME. Repeatable;
    /// devices not named attach to the tap they were saved with.
    #[arg(long = "net", value_name = "NET")]
    pub nets: Vec<String>,
    /// System call filters on every VMM thread (docs/seccomp.md); `off` is for debugging only.
    #[arg(long, value_enum, default_value = "on")]
    pub seccomp: crate::seccomp::SeccompMode,
}

#[derive(clap::Args)]
pub struct SocketArg {
    /// The VM's control socket.
    #[arg(long, env = "ARKVM_API_SOCKET")]
    pub api_socket: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The VM's control socket.
    #[arg(long, env = "ARKVM_API_SOCKET")]
    pub api_socket: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// How the snapshot's memory is captured.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum StrategyArg {
    /// Write-protect memory at the instant of the request and copy it while the guest runs.
    Cow,
    /// Copy while the guest runs, re-copy dirtied pages, then pause briefly for the rest.
    Precopy,
}

#[derive(clap::Args)]
pub struct SnapshotArgs {
    /// The VM's control socket.
    #[arg(long, env = "ARKVM_API_SOCKET")]
    pub api_socket: PathBuf,
    /// Write the snapshot to this directory (it must not exist).
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "repo",
        conflicts_with = "repo"
    )]
    pub out: Option<PathBuf>,
    /// Store the snapshot as a backup point in this repository (incremental when possible).
    #[arg(long, value_name = "DIR")]
    pub repo: Option<PathBuf>,
    /// The repository's key file.
    #[arg(long, requires = "repo")]
    pub key: Option<PathBuf>,
    /// How the backup compresses its chunks: default (zstd 1), fast (zstd -20), max (zstd 9)
    /// or off (stored plain, for a disk faster than the cores can compress).
    #[arg(long, requires = "repo", value_name = "default|fast|max|off")]
    pub compression: Option<snapshot::repo::Compression>,
    /// Pause the guest for the whole snapshot instead of taking it live (no --strategy).
    #[arg(long, conflicts_with = "strategy")]
    pub paused: bool,
    /// Live capture strategy.
    #[arg(long, value_enum, default_value = "cow")]
    pub strategy: StrategyArg,
    /// Return once the snapshot has started, without waiting for it to finish; prints the
    /// snapshot's id.
    #[arg(long)]
    pub no_wait: bool,
    /// Print the final report (with --no-wait: the snapshot's id) as JSON.
    #[arg(long)]
    pub json: bool,
}
