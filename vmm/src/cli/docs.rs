//! `arkvm completions SHELL` and `arkvm man DIR`: shell completion scripts and man pages,
//! generated from the command line's definition.

use std::path::PathBuf;
use std::process::ExitCode;

use super::common::fail;

#[derive(clap::Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(clap::Args)]
pub struct ManArgs {
    /// The directory to write `arkvm.1`, `arkvm-backup.1`, ... into (created if missing).
    pub dir: PathBuf,
}

/// `arkvm completions`.
pub fn completions(args: CompletionsArgs) -> ExitCode {
    let mut cmd = super::command();
    clap_complete::generate(args.shell, &mut cmd, "arkvm", &mut std::io::stdout());
    ExitCode::SUCCESS
}

/// `arkvm man`.
pub fn man(args: ManArgs) -> ExitCode {
    if let Err(e) = std::fs::create_dir_all(&args.dir) {
        return fail(&e);
    }
    match clap_mangen::generate_to(super::command(), &args.dir) {
        Ok(()) => {
            crate::outln!("wrote man pages to {}", args.dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}
