//! `--disk PATH[,readonly][,overlay=PATH][,id=NAME]`: parsing and start-time validation.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Sector size of the virtio-blk protocol; disk sizes must be a multiple of it.
pub const SECTOR_SIZE: u64 = 512;
/// Longest id a guest can read with GET_ID.
pub const MAX_ID_LEN: usize = 20;

/// Why a `--disk` option is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskConfigError {
    /// `--disk` had no path.
    #[error("--disk needs a path")]
    MissingPath,
    /// An option after the path is not known.
    #[error("unknown --disk option '{0}' (expected readonly, overlay=PATH or id=NAME)")]
    UnknownOption(String),
    /// An option was given twice.
    #[error("--disk option '{0}' given twice")]
    DuplicateOption(String),
    /// `overlay=` without a path.
    #[error("--disk overlay= needs a path")]
    EmptyOverlay,
    /// The id is empty, too long or not printable ASCII.
    #[error("disk id '{0}' must be 1 to 20 printable ASCII characters")]
    BadId(String),
    /// Two disks have the same id.
    #[error("disk id '{0}' is used twice")]
    DuplicateId(String),
    /// The image does not exist.
    #[error("disk image {0} does not exist")]
    Missing(PathBuf),
    /// The image is a directory.
    #[error("disk image {0} is a directory")]
    Directory(PathBuf),
    /// The image is neither a regular file nor a block device.
    #[error("disk image {0} is not a regular file")]
    NotAFile(PathBuf),
    /// The image cannot be inspected.
    #[error("cannot inspect disk image {path}: {reason}")]
    Inaccessible { path: PathBuf, reason: String },
    /// The image size is not a multiple of 512.
    #[error("disk image {path} is {size} bytes, not a multiple of 512")]
    BadSize { path: PathBuf, size: u64 },
    /// The image cannot be written but `readonly` was not given.
    /// The image is in a known non-raw format (qcow2, VMDK, ...).
    #[error(
        "disk image {path} is a {format} image, not a raw one; convert it with \
         `qemu-img convert -f {qemu_name} -O raw {path} {path}.raw` and use the raw file"
    )]
    NotRaw {
        path: PathBuf,
        format: &'static str,
        qemu_name: &'static str,
    },
    #[error("disk image {0} is read-only; add ',readonly' to use it")]
    ReadOnlyFile(PathBuf),
    /// The same file appears twice among the disks and overlays.
    #[error("{first} and {second} are the same file")]
    SameFile { first: PathBuf, second: PathBuf },
    /// The overlay's directory does not exist.
    #[error("overlay {0} cannot be created: its directory does not exist")]
    OverlayDirMissing(PathBuf),
}

/// One `--disk` option.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// The raw image file (the base layer).
    pub path: PathBuf,
    /// Offer the disk read-only and refuse writes.
    pub readonly: bool,
    /// An overlay file taking the writes (created if absent); the base stays untouched.
    pub overlay: Option<PathBuf>,
    /// The stable device id; [`DiskConfig::device_id`] supplies `disk<N>` when absent.
    pub id: Option<String>,
}

impl DiskConfig {
    /// The device id of disk number `index` (its position among the `--disk` options).
    pub fn device_id(&self, index: usize) -> String {
        self.id.clone().unwrap_or_else(|| format!("disk{index}"))
    }
}

impl FromStr for DiskConfig {
    type Err = DiskConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(DiskConfigError::MissingPath);
        }
        let mut cfg = DiskConfig {
            path: PathBuf::from(path),
            readonly: false,
            overlay: None,
            id: None,
        };
        for opt in parts {
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt, None),
            };
            match (key, value) {
                ("readonly", None) => {
                    if cfg.readonly {
                        return Err(DiskConfigError::DuplicateOption(key.into()));
                    }
                    cfg.readonly = true;
                }
                ("overlay", Some(v)) => {
                    if v.is_empty() {
                        return Err(DiskConfigError::EmptyOverlay);
                    }
                    if cfg.overlay.replace(PathBuf::from(v)).is_some() {
                        return Err(DiskConfigError::DuplicateOption(key.into()));
                    }
                }
                ("id", Some(v)) => {
                    if !v.bytes().all(|b| b.is_ascii_graphic())
                        || v.is_empty()
                        || v.len() > MAX_ID_LEN
                    {
                        return Err(DiskConfigError::BadId(v.into()));
                    }
                    if cfg.id.replace(v.into()).is_some() {
                        return Err(DiskConfigError::DuplicateOption(key.into()));
                    }
                }
                _ => return Err(DiskConfigError::UnknownOption(opt.into())),
            }
        }
        Ok(cfg)
    }
}

fn inaccessible(path: &Path, e: std::io::Error) -> DiskConfigError {
    if e.kind() == std::io::ErrorKind::NotFound {
        DiskConfigError::Missing(path.to_path_buf())
    } else {
        DiskConfigError::Inaccessible {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }
}

/// Checks one base image; returns its (device, inode).
fn check_image(cfg: &DiskConfig) -> Result<(u64, u64), DiskConfigError> {
    let path = &cfg.path;
    let meta = std::fs::metadata(path).map_err(|e| inaccessible(path, e))?;
    if meta.is_dir() {
        return Err(DiskConfigError::Directory(path.clone()));
    }
    if !meta.is_file() {
        return Err(DiskConfigError::NotAFile(path.clone()));
    }
    if meta.len() % SECTOR_SIZE != 0 {
        return Err(DiskConfigError::BadSize {
            path: path.clone(),
            size: meta.len(),
        });
    }
    check_raw(path)?;
    if !cfg.readonly {
        // Root ignores permission bits, so look at them as well as trying to open.
        let no_write_bits = meta.permissions().mode() & 0o222 == 0;
        let opens = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .is_ok();
        if no_write_bits || !opens {
            return Err(DiskConfigError::ReadOnlyFile(path.clone()));
        }
    }
    Ok((meta.dev(), meta.ino()))
}

/// Refuses an image that starts with the magic of a known non-raw format.
fn check_raw(path: &Path) -> Result<(), DiskConfigError> {
    use std::io::Read;
    let mut header = Vec::with_capacity(super::image_format::HEADER_LEN);
    std::fs::File::open(path)
        .and_then(|f| {
            f.take(super::image_format::HEADER_LEN as u64)
                .read_to_end(&mut header)
        })
        .map_err(|e| inaccessible(path, e))?;
    match super::image_format::detect(&header) {
        Some(f) => Err(DiskConfigError::NotRaw {
            path: path.to_path_buf(),
            format: f.name,
            qemu_name: f.qemu_name,
        }),
        None => Ok(()),
    }
}

/// Checks an overlay path; returns its (device, inode) when the file already exists.
fn check_overlay(path: &Path) -> Result<Option<(u64, u64)>, DiskConfigError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Err(DiskConfigError::Directory(path.to_path_buf())),
        Ok(meta) if !meta.is_file() => Err(DiskConfigError::NotAFile(path.to_path_buf())),
        Ok(meta) => Ok(Some((meta.dev(), meta.ino()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            if dir.is_dir() {
                Ok(None)
            } else {
                Err(DiskConfigError::OverlayDirMissing(path.to_path_buf()))
            }
        }
        Err(e) => Err(inaccessible(path, e)),
    }
}

/// Validates every `--disk` before the VM starts: each image exists, is a file, has a size
/// that is a multiple of 512 and is writable unless `readonly`; no file (image or overlay)
/// appears twice; ids are unique.
pub fn validate_disks(disks: &[DiskConfig]) -> Result<(), DiskConfigError> {
    let mut seen: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut note = |key: (u64, u64), path: &Path| match seen.get(&key) {
        Some(first) => Err(DiskConfigError::SameFile {
            first: first.clone(),
            second: path.to_path_buf(),
        }),
        None => {
            seen.insert(key, path.to_path_buf());
            Ok(())
        }
    };
    for (index, cfg) in disks.iter().enumerate() {
        note(check_image(cfg)?, &cfg.path)?;
        if let Some(overlay) = &cfg.overlay {
            if let Some(key) = check_overlay(overlay)? {
                note(key, overlay)?;
            }
        }
        let id = cfg.device_id(index);
        if ids.insert(id.clone(), index).is_some() {
            return Err(DiskConfigError::DuplicateId(id));
        }
    }
    // Two overlays that do not exist yet but name the same path.
    let mut new_overlays: Vec<&PathBuf> = disks
        .iter()
        .filter_map(|d| d.overlay.as_ref())
        .filter(|p| !p.exists())
        .collect();
    new_overlays.sort();
    if let Some(w) = new_overlays.windows(2).find(|w| w[0] == w[1]) {
        return Err(DiskConfigError::SameFile {
            first: w[0].clone(),
            second: w[1].clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, vec![0u8; size as usize]).unwrap();
        p
    }

    #[test]
    fn parses_all_options() {
        let c: DiskConfig = "/a.img,readonly,overlay=/b.ovl,id=root".parse().unwrap();
        assert_eq!(c.path, PathBuf::from("/a.img"));
        assert!(c.readonly);
        assert_eq!(c.overlay, Some(PathBuf::from("/b.ovl")));
        assert_eq!(c.device_id(3), "root");
        let c: DiskConfig = "x.img".parse().unwrap();
        assert!(!c.readonly && c.overlay.is_none());
        assert_eq!(c.device_id(3), "disk3");
    }

    #[test]
    fn rejects_bad_options() {
        assert_eq!("".parse::<DiskConfig>(), Err(DiskConfigError::MissingPath));
        assert_eq!(
            "a,rw".parse::<DiskConfig>(),
            Err(DiskConfigError::UnknownOption("rw".into()))
        );
        assert_eq!(
            "a,overlay=".parse::<DiskConfig>(),
            Err(DiskConfigError::EmptyOverlay)
        );
        assert_eq!(
            "a,readonly,readonly".parse::<DiskConfig>(),
            Err(DiskConfigError::DuplicateOption("readonly".into()))
        );
        assert!(matches!(
            "a,id=this-id-is-much-too-long".parse::<DiskConfig>(),
            Err(DiskConfigError::BadId(_))
        ));
    }

    #[test]
    fn validation_errors_are_specific() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let d = dir.as_path();
        let good = image(d, "good.img", 4096);
        let odd = image(d, "odd.img", 1000);
        let ro = image(d, "ro.img", 512);
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).unwrap();
        let cfg = |s: &str| s.parse::<DiskConfig>().unwrap();
        let p = |x: &Path| x.display().to_string();

        assert!(validate_disks(&[cfg(&p(&good))]).is_ok());
        let missing = d.join("nope.img");
        assert_eq!(
            validate_disks(&[cfg(&p(&missing))]),
            Err(DiskConfigError::Missing(missing.clone()))
        );
        assert_eq!(
            validate_disks(&[cfg(&p(d))]),
            Err(DiskConfigError::Directory(d.to_path_buf()))
        );
        assert_eq!(
            validate_disks(&[cfg(&p(&odd))]),
            Err(DiskConfigError::BadSize {
                path: odd.clone(),
                size: 1000
            })
        );
        assert_eq!(
            validate_disks(&[cfg(&p(&ro))]),
            Err(DiskConfigError::ReadOnlyFile(ro.clone()))
        );
        assert!(validate_disks(&[cfg(&format!("{},readonly", p(&ro)))]).is_ok());
        // The same file twice, also through another name.
        let link = d.join("link.img");
        std::fs::hard_link(&good, &link).unwrap();
        assert!(matches!(
            validate_disks(&[cfg(&p(&good)), cfg(&p(&link))]),
            Err(DiskConfigError::SameFile { .. })
        ));
        // An overlay that is another disk's image.
        assert!(matches!(
            validate_disks(&[
                cfg(&format!("{},overlay={}", p(&good), p(&ro))),
                cfg(&format!("{},readonly", p(&ro)))
            ]),
            Err(DiskConfigError::SameFile { .. })
        ));
        let ovl = d.join("new.ovl");
        let other = image(d, "other.img", 512);
        assert!(matches!(
            validate_disks(&[
                cfg(&format!("{},overlay={}", p(&good), p(&ovl))),
                cfg(&format!("{},overlay={}", p(&other), p(&ovl)))
            ]),
            Err(DiskConfigError::SameFile { .. })
        ));
        assert!(matches!(
            validate_disks(&[cfg(&format!("{},overlay=/no/such/dir/x.ovl", p(&good)))]),
            Err(DiskConfigError::OverlayDirMissing(_))
        ));
        assert_eq!(
            validate_disks(&[
                cfg(&format!("{},id=a", p(&good))),
                cfg(&format!("{},id=a", p(&other)))
            ]),
            Err(DiskConfigError::DuplicateId("a".into()))
        );
    }
}
