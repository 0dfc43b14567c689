//! The VM configuration given on the command line, checked before anything is created.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::arch::mptable::MAX_CPUS;

/// Why a configuration value is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A memory size could not be parsed.
    #[error(
        "invalid memory size '{0}': use a number with an optional K, M, G or T suffix (e.g. 256M)"
    )]
    BadSize(String),
    /// Memory size zero.
    #[error("--memory must be greater than zero")]
    ZeroMemory,
    /// Memory too small to boot.
    #[error("--memory {0} is too small: arkvm needs at least 2 MiB")]
    TooLittleMemory(String),
    /// Memory size is not a whole number of MiB (snapshots store memory in 1 MiB chunks).
    #[error("--memory {0} is not a multiple of 1 MiB")]
    UnalignedMemory(String),
    /// Bad vCPU count.
    #[error("--vcpus must be between 1 and {max}, got {got}")]
    VcpuCount { got: u64, max: u8 },
    /// A VM name the backup repository would refuse (and that could escape a directory).
    #[error("--name '{0}' is not a valid VM name: use 1-64 characters of A-Z a-z 0-9 . _ -, not starting with '.'")]
    BadName(String),
    /// More guest memory than the host has.
    #[error("--memory {asked} is more than this host's memory ({host_mib} MiB); pass --memory-overcommit to start anyway")]
    MoreThanHost { asked: String, host_mib: u64 },
}

/// Parses a size such as `256M`, `1G`, `4096` (bytes), `2T`.
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let t = text.trim();
    let bad = || ConfigError::BadSize(text.to_string());
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Everything needed to boot a guest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmConfig {
    /// The VM's name in backup repositories.
    #[serde(default = "default_vm_name")]
    pub name: String,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_bytes: u64,
    pub vcpus: u8,
    #[serde(default)]
    pub disks: Vec<devices::virtio::block::DiskConfig>,
    #[serde(default)]
    pub nets: Vec<devices::virtio::net::NetConfig>,
}

fn default_vm_name() -> String {
    "vm".to_string()
}

/// Checks a memory size given as text and returns it in bytes.
pub fn check_memory(text: &str) -> Result<u64, ConfigError> {
    let bytes = parse_size(text)?;
    if bytes == 0 {
        return Err(ConfigError::ZeroMemory);
    }
    if bytes < crate::vstate::memory::MIN_MEMORY {
        return Err(ConfigError::TooLittleMemory(text.to_string()));
    }
    if bytes % (1 << 20) != 0 {
        return Err(ConfigError::UnalignedMemory(text.to_string()));
    }
    Ok(bytes)
}

/// Checks a VM name by the rule the backup repository applies to the VM names of its points,
/// so that a name accepted at start works for every backup and checkpoint, and can never name
/// a path outside the directory it is used in.
pub fn check_vm_name(name: &str) -> Result<(), ConfigError> {
    snapshot::repo::validate_vm_name(name)
        .map_err(|_| ConfigError::BadName(name.chars().take(80).collect()))
}

/// Refuses guest memory larger than the host's (`host_bytes`), unless `overcommit`.
pub fn check_memory_fits_host(
    text: &str,
    bytes: u64,
    host_bytes: u64,
    overcommit: bool,
) -> Result<(), ConfigError> {
    // More than KVM can map at all is refused when memory is created, with that reason.
    if bytes > host_bytes && bytes <= crate::vstate::memory::MAX_MEMORY && !overcommit {
        return Err(ConfigError::MoreThanHost {
            asked: text.to_string(),
            host_mib: host_bytes >> 20,
        });
    }
    Ok(())
}

/// The host's memory (`MemTotal` of `/proc/meminfo`), or `None` if it cannot be read.
pub fn host_memory_bytes() -> Option<u64> {
    meminfo_total(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// The host's memory available to new work without swapping (`MemAvailable` of
/// `/proc/meminfo`), or `None` if it cannot be read.
pub fn host_available_bytes() -> Option<u64> {
    meminfo_field(
        &std::fs::read_to_string("/proc/meminfo").ok()?,
        "MemAvailable:",
    )
}

/// `MemTotal` in bytes, from the text of `/proc/meminfo` (`MemTotal:   24567890 kB`).
fn meminfo_total(meminfo: &str) -> Option<u64> {
    meminfo_field(meminfo, "MemTotal:")
}

/// The value of `field` (with its colon) in bytes, from the text of `/proc/meminfo`.
fn meminfo_field(meminfo: &str, field: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with(field))?;
    let mut words = line[field.len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => value.checked_mul(1024),
        None => Some(value),
        Some(_) => None,
    }
}

/// Checks a vCPU count.
pub fn check_vcpus(n: u64) -> Result<u8, ConfigError> {
    match u8::try_from(n) {
        Ok(v) if (1..=MAX_CPUS).contains(&v) => Ok(v),
        _ => Err(ConfigError::VcpuCount {
            got: n,
            max: MAX_CPUS,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(check_memory("0"), Err(ConfigError::ZeroMemory));
        assert!(check_memory("1M").is_err());
        assert!(check_memory("4097K").is_err());
        assert!(check_memory("4096K").is_ok());
        assert!(check_memory("4100K").is_err());
        assert!(check_memory("3000000").is_err());
    }

    #[test]
    fn names_follow_the_repository_rule() {
        for good in ["vm", "web-1", "db_2.prod", &"x".repeat(64)] {
            assert_eq!(check_vm_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "../x",
            "../../../../tmp/x",
            "a/b",
            ".hidden",
            "a b",
            &"x".repeat(65),
        ] {
            let err = check_vm_name(bad).unwrap_err();
            assert!(matches!(err, ConfigError::BadName(_)), "{bad}");
            assert!(!err.to_string().contains('\n'));
        }
    }

    #[test]
    fn memory_beyond_the_host_needs_overcommit() {
        let host = 23 << 30;
        assert_eq!(check_memory_fits_host("16G", 16 << 30, host, false), Ok(()));
        assert_eq!(check_memory_fits_host("23G", 23 << 30, host, false), Ok(()));
        let err = check_memory_fits_host("7T", 7 << 40, host, false).unwrap_err();
        assert_eq!(
            err,
            ConfigError::MoreThanHost {
                asked: "7T".into(),
                host_mib: 23 << 10
            }
        );
        assert!(err.to_string().contains("--memory-overcommit"), "{err}");
        assert_eq!(check_memory_fits_host("7T", 7 << 40, host, true), Ok(()));
        // Beyond KVM's limit the builder refuses with that reason instead.
        assert_eq!(
            check_memory_fits_host("1000T", 1000 << 40, host, false),
            Ok(())
        );
    }

    #[test]
    fn host_memory_from_meminfo() {
        let text = "MemTotal:       24567896 kB\nMemFree:         1000 kB\n";
        assert_eq!(meminfo_total(text), Some(24567896 * 1024));
        assert_eq!(meminfo_total("MemFree: 1 kB\n"), None);
        let both = "MemTotal: 8 kB\nMemFree: 1 kB\nMemAvailable:    4 kB\n";
        assert_eq!(meminfo_field(both, "MemAvailable:"), Some(4096));
        assert_eq!(meminfo_total("MemTotal: lots kB\n"), None);
        assert!(host_memory_bytes().is_some_and(|b| b > 64 << 20));
    }

    #[test]
    fn vcpus() {
        assert!(check_vcpus(0).is_err());
        assert_eq!(check_vcpus(4), Ok(4));
        assert!(check_vcpus(300).is_err());
        assert!(check_vcpus(254).is_ok());
    }
}
