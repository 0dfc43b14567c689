//! The `arkvm` command.

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

use vmm::cli::{backup, control, docs, dr, launch, Command, LogFormat};

fn init_logging(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_env("ARKVM_LOG")
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

/// Client commands end quietly when their output pipe closes (`arkvm backup list | head`), like
/// other Unix tools; a running VM instead ignores a closed stdout.
fn default_sigpipe() {
    // SAFETY: restoring the default disposition of SIGPIPE touches no Rust state.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

fn main() -> ExitCode {
    let cli = vmm::cli::parse();
    if !matches!(cli.command, Command::Run(_) | Command::Restore(_)) {
        default_sigpipe();
    }
    init_logging(&cli.log_level, cli.log_format);
    match cli.command {
        Command::Run(args) => launch::run(args),
        Command::Restore(args) => launch::restore(args),
        Command::Snapshot(args) => control::snapshot(args),
        Command::Pause(a) => control::simple_put(&a.api_socket, "/vm/pause", "paused"),
        Command::Resume(a) => control::simple_put(&a.api_socket, "/vm/resume", "resumed"),
        Command::Shutdown(a) => control::simple_put(&a.api_socket, "/vm/shutdown", "shutting down"),
        Command::Status(args) => control::status(args),
        Command::Backup(cmd) => backup::run(cmd),
        Command::Dr(cmd) => dr::run(cmd),
        Command::Completions(args) => docs::completions(args),
        Command::Man(args) => docs::man(args),
    }
}
