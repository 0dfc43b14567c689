//! A tap interface opened through `/dev/net/tun` (`IFF_TAP | IFF_NO_PI`, no vnet header): one
//! Ethernet frame per `read`/`write`, non-blocking.
//!
//! The interface must exist already and be a tap: `TUNSETIFF` would otherwise create a new one
//! (or re-type a tun), so the name is checked in sysfs first, and `TUNSETIFF` refuses a tap that
//! another process holds (`EBUSY`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `IFF_TAP` of `<linux/if_tun.h>`.
const IFF_TAP: u16 = 0x0002;
/// `IFF_NO_PI`: no packet-information prefix.
const IFF_NO_PI: u16 = 0x1000;
/// `TUNSETIFF` = `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// Longest interface name, without the NUL.
const IFNAMSIZ: usize = 16;

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long or has characters an interface name cannot have.
    #[error("'{0}' is not a valid interface name (1-15 characters, no '/', ' ' or ':')")]
    BadName(String),
    /// No interface of that name exists.
    #[error("network interface {0} does not exist (create it first, e.g. `ip tuntap add dev {0} mode tap`)")]
    Missing(String),
    /// The interface exists but is not a tap.
    #[error("network interface {0} is not a tap device")]
    NotTap(String),
    /// Another process holds the tap.
    #[error("tap {0} is busy (another process has it open)")]
    Busy(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// `TUNSETIFF` failed otherwise.
    #[error("cannot attach to tap {name}")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: u16,
    _pad: [u8; 22],
}

/// An attached tap.
#[derive(Debug)]
pub struct Tap {
    name: String,
    file: File,
}

/// Checks an interface name the way the kernel's `dev_valid_name` does.
pub fn check_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() < IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if ok {
        Ok(())
    } else {
        Err(TapError::BadName(name.chars().take(40).collect()))
    }
}

impl Tap {
    /// Attaches to the existing tap `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        check_name(name)?;
        let sys = Path::new("/sys/class/net").join(name);
        if !sys.exists() {
            return Err(TapError::Missing(name.into()));
        }
        let flags = std::fs::read_to_string(sys.join("tun_flags"))
            .ok()
            .and_then(|t| u32::from_str_radix(t.trim().trim_start_matches("0x"), 16).ok());
        match flags {
            Some(f) if f & u32::from(IFF_TAP) != 0 => {}
            _ => return Err(TapError::NotTap(name.into())),
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and may write) a `struct ifreq`, which `IfReq` lays out
        // with its full 40-byte size; the fd is ours.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(name.into()),
                Some(libc::EINVAL) => TapError::NotTap(name.into()),
                _ => TapError::Attach {
                    name: name.into(),
                    source: e,
                },
            });
        }
        Ok(Self {
            name: name.into(),
            file,
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame into `buf`; `WouldBlock` when none is waiting. A frame longer than
    /// `buf` is truncated by the kernel.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `buf.len()` bytes of writes; the fd is ours.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: `frame` is valid for `frame.len()` bytes of reads; the fd is ours.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_syscall() {
        for bad in ["", "a/b", "a b", "x:1", "0123456789abcdef", ".."] {
            assert!(
                matches!(check_name(bad), Err(TapError::BadName(_))),
                "{bad}"
            );
        }
        assert!(check_name("tap0").is_ok());
        assert!(matches!(
            Tap::open("arkvm-nonexist"),
            Err(TapError::Missing(_))
        ));
        // The loopback device exists but is not a tap.
        assert!(matches!(Tap::open("lo"), Err(TapError::NotTap(_))));
    }
}
