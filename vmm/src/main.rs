//! The `arkvm` command: boot a guest, and (as later stages land) snapshot, restore and back it up.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use vmm::config::{check_memory, check_vcpus, VmConfig};
use vmm::runtime::Vmm;

/// arkvm: a KVM virtual machine monitor for backup and disaster recovery of running guests.
#[derive(Parser)]
#[command(name = "arkvm", version, about, long_about = None)]
struct Cli {
    /// Log level for messages on stderr (error, warn, info, debug, trace). The ARKVM_LOG
    /// environment variable takes tracing filter syntax and wins when set.
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest kernel (ELF vmlinux or bzImage) and run it until it stops.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The guest kernel: an ELF vmlinux or a bzImage.
    #[arg(long)]
    kernel: std::path::PathBuf,
    /// An initrd (initramfs) image.
    #[arg(long)]
    initrd: Option<std::path::PathBuf>,
    /// The kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=1")]
    cmdline: String,
    /// Guest memory size, with a K, M, G or T suffix.
    #[arg(long, default_value = "256M")]
    memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u64,
}

fn init_logging(level: &str) {
    let filter = EnvFilter::try_from_env("ARKVM_LOG")
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("arkvm: error: {}", vmm::error_chain(e));
    ExitCode::from(1)
}

fn run(args: RunArgs) -> ExitCode {
    let memory_bytes = match check_memory(&args.memory) {
        Ok(m) => m,
        Err(e) => return fail(&e),
    };
    let vcpus = match check_vcpus(args.vcpus) {
        Ok(v) => v,
        Err(e) => return fail(&e),
    };
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        memory_bytes,
        vcpus,
    };
    let built = match vmm::builder::build_cold(&config, Box::new(std::io::stdout())) {
        Ok(b) => b,
        Err(e) => return fail(&e),
    };
    let t = built.timings;
    tracing::info!(
        "boot timings: create_vm_us={} memory_us={} load_us={} vcpus_us={}",
        t.create_vm_us,
        t.memory_us,
        t.load_us,
        t.vcpus_us
    );
    let mut vmm = match Vmm::new(config, built) {
        Ok(v) => v,
        Err(e) => return fail(&e),
    };
    match vmm.run() {
        Ok(exit) if exit.is_clean() => ExitCode::SUCCESS,
        Ok(exit) => {
            eprintln!("arkvm: guest stopped: {exit}");
            ExitCode::from(2)
        }
        Err(e) => fail(&e),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    match cli.command {
        Command::Run(args) => run(args),
    }
}
