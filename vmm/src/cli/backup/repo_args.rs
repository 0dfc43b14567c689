//! The flags every `backup` subcommand takes: the repository, its key, and `--json`.

use std::path::PathBuf;

#[derive(clap::Args)]
pub struct RepoArgs {
    /// The repository directory.
    #[arg(long, env = "ARKVM_REPO")]
    pub repo: PathBuf,
    /// The repository's key file (encrypted repositories).
    #[arg(long, env = "ARKVM_KEY_FILE")]
    pub key: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}
