//! Loading a Linux kernel (ELF `vmlinux` or `bzImage`), its command line and initrd into guest
//! memory, through linux-loader.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::boot_params::InitrdRange;
use crate::arch::layout;
use devices::GuestMemoryMmap;

/// Why the kernel, initrd or command line could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("cannot open kernel {path}")]
    OpenKernel {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Neither an ELF nor a bzImage.
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    UnknownFormat(String),
    /// The kernel does not fit in guest memory.
    #[error("kernel {path} does not fit in {mem_mib} MiB of guest memory ({reason})")]
    KernelTooBig {
        path: String,
        mem_mib: u64,
        reason: String,
    },
    /// The kernel is malformed.
    #[error("kernel {path} is not loadable: {reason}")]
    BadKernel { path: String, reason: String },
    /// The initrd could not be read.
    #[error("cannot read initrd {path}")]
    ReadInitrd {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below 4 GiB")]
    InitrdTooBig { path: String, size: u64 },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
}

/// What was loaded.
pub struct LoadedKernel {
    pub entry: u64,
    pub kernel_end: u64,
    pub setup_header: Option<setup_header>,
}

fn too_big(path: &Path, mem: &GuestMemoryMmap, reason: impl ToString) -> BootError {
    let size: u64 = mem.iter().map(|r| r.len()).sum();
    BootError::KernelTooBig {
        path: path.display().to_string(),
        mem_mib: size >> 20,
        reason: reason.to_string(),
    }
}

/// Loads a kernel, trying ELF first and bzImage second.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: shown.clone(),
        source,
    })?;
    if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(BootError::UnknownFormat(shown));
    }
    use linux_loader::loader::elf::Error as ElfError;
    use linux_loader::loader::Error as LoaderError;
    match Elf::load(
        mem,
        None,
        &mut file,
        Some(GuestAddress(layout::HIMEM_START)),
    ) {
        Ok(r) => {
            return Ok(LoadedKernel {
                entry: r.kernel_load.0,
                kernel_end: r.kernel_end,
                setup_header: None,
            })
        }
        Err(LoaderError::Elf(ElfError::InvalidElfMagicNumber)) => {}
        Err(LoaderError::Elf(ElfError::ReadKernelImage)) => {
            return Err(too_big(path, mem, "a segment lies outside guest memory"))
        }
        Err(LoaderError::Elf(ElfError::InvalidProgramHeaderAddress)) => {
            return Err(too_big(path, mem, "a segment lies outside guest memory"))
        }
        Err(LoaderError::Elf(ElfError::ReadElfHeader)) => {
            return Err(BootError::UnknownFormat(shown))
        }
        Err(e) => {
            return Err(BootError::BadKernel {
                path: shown,
                reason: e.to_string(),
            })
        }
    }
    use linux_loader::loader::bzimage::Error as BzError;
    match BzImage::load(
        mem,
        None,
        &mut file,
        Some(GuestAddress(layout::HIMEM_START)),
    ) {
        Ok(r) => Ok(LoadedKernel {
            // The 64-bit entry point is 0x200 past the protected-mode kernel's start.
            entry: r.kernel_load.0 + 0x200,
            kernel_end: r.kernel_end,
            setup_header: r.setup_header,
        }),
        Err(LoaderError::Bzimage(BzError::InvalidBzImage))
        | Err(LoaderError::Bzimage(BzError::ReadBzImageHeader)) => {
            Err(BootError::UnknownFormat(shown))
        }
        Err(LoaderError::Bzimage(BzError::ReadBzImageCompressedKernel)) => {
            Err(too_big(path, mem, "the kernel is larger than guest memory"))
        }
        Err(e) => Err(BootError::BadKernel {
            path: shown,
            reason: e.to_string(),
        }),
    }
}

/// Loads the initrd at the highest page-aligned address below 4 GiB (and below the MMIO hole)
/// that is above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<InitrdRange, BootError> {
    let shown = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| BootError::ReadInitrd {
        path: shown.clone(),
        source,
    })?;
    let size = data.len() as u64;
    let low_end = mem
        .iter()
        .find(|r| r.start_addr().0 == 0)
        .map(|r| r.len())
        .unwrap_or(0);
    let too_big = || BootError::InitrdTooBig {
        path: shown.clone(),
        size,
    };
    let addr = low_end.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end.max(layout::HIMEM_START) {
        return Err(too_big());
    }
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|_| too_big())?;
    Ok(InitrdRange { addr, size })
}

/// Writes the command line.
pub fn load_cmdline(mem: &GuestMemoryMmap, text: &str) -> Result<usize, BootError> {
    let mut cmdline =
        Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    if !text.is_empty() {
        cmdline
            .insert_str(text)
            .map_err(|e| BootError::Cmdline(e.to_string()))?;
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    Ok(text.len() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage_and_missing() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let dir = std::env::temp_dir().join(format!("arkvm-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk");
        std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
        assert!(matches!(
            load_kernel(&mem, &junk),
            Err(BootError::UnknownFormat(_))
        ));
        assert!(matches!(
            load_kernel(&mem, &dir.join("missing")),
            Err(BootError::OpenKernel { .. })
        ));
        let rd = dir.join("rd");
        std::fs::write(&rd, vec![1u8; 4096]).unwrap();
        let r = load_initrd(&mem, &rd, 2 << 20).unwrap();
        assert_eq!(r.addr + 4096, 8 << 20);
        std::fs::write(&rd, vec![1u8; 7 << 20]).unwrap();
        assert!(load_initrd(&mem, &rd, 2 << 20).is_err());
        assert_eq!(load_cmdline(&mem, "console=ttyS0").unwrap(), 14);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
