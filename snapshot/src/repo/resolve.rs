//! Naming a backup point the short way: `latest` (of the repository or of one VM) or any
//! unique prefix of its id, resolved to the full id once for every command that takes one.

use super::{RepoError, Repository};

/// The name of the newest point.
pub const LATEST: &str = "latest";

impl Repository {
    /// The full id of the point `spec` names: an exact id, [`LATEST`] (the newest readable
    /// point, of `vm` when given), or a prefix of exactly one id.
    pub fn resolve_point(&self, spec: &str, vm: Option<&str>) -> Result<String, RepoError> {
        let ids = self.point_ids()?;
        if spec == LATEST {
            // Ids sort by time: the newest readable point of the VM is the last one.
            return ids
                .iter()
                .rev()
                .find(|id| {
                    self.read_point(id)
                        .is_ok_and(|p| vm.is_none_or(|vm| p.vm == vm))
                })
                .cloned()
                .ok_or_else(|| RepoError::NoLatestPoint {
                    vm: vm.map(str::to_string),
                });
        }
        if ids.iter().any(|id| id == spec) {
            return Ok(spec.to_string());
        }
        let matches: Vec<&String> = if spec.is_empty() {
            Vec::new()
        } else {
            ids.iter().filter(|id| id.starts_with(spec)).collect()
        };
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(RepoError::NoSuchPoint {
                id: spec.chars().take(80).collect(),
            }),
            many => Err(RepoError::AmbiguousPoint {
                prefix: spec.to_string(),
                count: many.len(),
            }),
        }
    }
}
