//! Reading the Linux `boot_params` zero page: the e820 map and the command line.

/// Size of the zero page.
pub const ZERO_PAGE_LEN: usize = 4096;
const E820_ENTRIES_OFF: usize = 0x1e8;
const CMD_LINE_PTR_OFF: usize = 0x228;
const E820_TABLE_OFF: usize = 0x2d0;
const E820_ENTRY_LEN: usize = 20;
const E820_MAX_ENTRIES: usize = 128;
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// Longest command line read.
pub const CMDLINE_MAX: usize = 4096;

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// 1 = RAM.
    pub kind: u32,
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(v)
}

/// The parsed parts of a zero page.
pub struct BootParams<'a> {
    page: &'a [u8],
}

impl<'a> BootParams<'a> {
    /// Wraps a zero page (at least `ZERO_PAGE_LEN` bytes; shorter input yields no entries).
    pub fn new(page: &'a [u8]) -> Self {
        BootParams { page }
    }

    /// Number of e820 entries (capped at the table size).
    pub fn e820_len(&self) -> usize {
        if self.page.len() < ZERO_PAGE_LEN {
            return 0;
        }
        usize::from(self.page[E820_ENTRIES_OFF]).min(E820_MAX_ENTRIES)
    }

    /// The `i`-th e820 entry.
    pub fn e820(&self, i: usize) -> E820Entry {
        let off = E820_TABLE_OFF + i * E820_ENTRY_LEN;
        E820Entry {
            addr: le_u64(self.page, off),
            size: le_u64(self.page, off + 8),
            kind: le_u32(self.page, off + 16),
        }
    }

    /// Iterates over the e820 entries.
    pub fn e820_entries(&self) -> impl Iterator<Item = E820Entry> + '_ {
        (0..self.e820_len()).map(|i| self.e820(i))
    }

    /// Guest-physical address of the command line (0 if none).
    pub fn cmd_line_ptr(&self) -> u64 {
        if self.page.len() < ZERO_PAGE_LEN {
            return 0;
        }
        u64::from(le_u32(self.page, CMD_LINE_PTR_OFF))
    }
}

/// Returns the bytes up to (not including) the first NUL, or all of `raw`.
pub fn until_nul(raw: &[u8]) -> &[u8] {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    &raw[..end]
}

/// The zero page and the command line of the running guest.
#[cfg(not(test))]
pub fn from_guest(boot_params: u64) -> (BootParams<'static>, &'static str) {
    // SAFETY: arkvm passes the address of a 4 KiB zero page in guest RAM, identity-mapped by
    // the prologue; nothing writes it while the guest runs.
    let page = unsafe { core::slice::from_raw_parts(boot_params as *const u8, ZERO_PAGE_LEN) };
    let bp = BootParams::new(page);
    let ptr = bp.cmd_line_ptr();
    let cmdline = if ptr == 0 {
        ""
    } else {
        // SAFETY: the command line is a NUL-terminated string in low guest RAM (at most
        // CMDLINE_MAX bytes are looked at), identity-mapped and never written while we run.
        let raw = unsafe { core::slice::from_raw_parts(ptr as *const u8, CMDLINE_MAX) };
        core::str::from_utf8(until_nul(raw)).unwrap_or("")
    };
    (bp, cmdline)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_with(entries: &[(u64, u64, u32)], cmdline_ptr: u32) -> Vec<u8> {
        let mut p = vec![0u8; ZERO_PAGE_LEN];
        p[E820_ENTRIES_OFF] = entries.len() as u8;
        for (i, (a, s, k)) in entries.iter().enumerate() {
            let off = E820_TABLE_OFF + i * E820_ENTRY_LEN;
            p[off..off + 8].copy_from_slice(&a.to_le_bytes());
            p[off + 8..off + 16].copy_from_slice(&s.to_le_bytes());
            p[off + 16..off + 20].copy_from_slice(&k.to_le_bytes());
        }
        p[CMD_LINE_PTR_OFF..CMD_LINE_PTR_OFF + 4].copy_from_slice(&cmdline_ptr.to_le_bytes());
        p
    }

    #[test]
    fn parses_e820_and_cmdline_ptr() {
        let p = page_with(
            &[
                (0, 0x9fc00, 1),
                (0x100000, 0xff00000, 1),
                (0xf0000, 0x10000, 2),
            ],
            0x20000,
        );
        let bp = BootParams::new(&p);
        assert_eq!(bp.e820_len(), 3);
        assert_eq!(
            bp.e820(1),
            E820Entry {
                addr: 0x100000,
                size: 0xff00000,
                kind: 1
            }
        );
        assert_eq!(bp.e820_entries().filter(|e| e.kind == E820_RAM).count(), 2);
        assert_eq!(bp.cmd_line_ptr(), 0x20000);
    }

    #[test]
    fn short_page_has_nothing() {
        let bp = BootParams::new(&[0u8; 16]);
        assert_eq!(bp.e820_len(), 0);
        assert_eq!(bp.cmd_line_ptr(), 0);
    }

    #[test]
    fn until_nul_stops_at_nul() {
        assert_eq!(until_nul(b"abc\0def"), b"abc");
        assert_eq!(until_nul(b"abc"), b"abc");
    }
}
