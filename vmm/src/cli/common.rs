//! What every command of the command line shares: printing a failure, and opening a repository
//! with its key.

use std::path::Path;
use std::process::ExitCode;

use snapshot::repo::{RepoKey, Repository};

/// Prints `e` with its causes on one line and returns exit status 1.
pub fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("arkvm: error: {}", crate::error_chain(e));
    ExitCode::from(1)
}

/// Loads a repository key file, if one is given.
fn load_key(key: Option<&Path>) -> Result<Option<RepoKey>, ExitCode> {
    key.map(RepoKey::load).transpose().map_err(|e| fail(&e))
}

/// Opens an existing repository.
pub fn open_repo(repo: &Path, key: Option<&Path>) -> Result<Repository, ExitCode> {
    let key = load_key(key)?;
    Repository::open(repo, key).map_err(|e| fail(&e))
}
