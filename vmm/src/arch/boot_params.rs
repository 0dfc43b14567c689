//! The Linux zero page (`boot_params`): the e820 memory map, the command line and the initrd.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use vm_memory::GuestAddress;

use super::layout;
use devices::GuestMemoryMmap;

/// Why the zero page could not be written.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    /// More e820 entries than the zero page holds.
    #[error("too many e820 entries for the zero page")]
    TooManyE820Entries,
    /// The zero page could not be written to guest memory.
    #[error("failed to write the Linux zero page to guest memory")]
    Write(#[source] linux_loader::configurator::Error),
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// Where the initrd was loaded.
#[derive(Clone, Copy, Debug)]
pub struct InitrdRange {
    pub addr: u64,
    pub size: u64,
}

fn add_e820(
    params: &mut boot_params,
    addr: u64,
    size: u64,
    kind: u32,
) -> Result<(), BootParamsError> {
    let i = usize::from(params.e820_entries);
    let entry = params
        .e820_table
        .get_mut(i)
        .ok_or(BootParamsError::TooManyE820Entries)?;
    entry.addr = addr;
    entry.size = size;
    entry.r#type = kind;
    params.e820_entries += 1;
    Ok(())
}

/// Builds the zero page for `mem_size` bytes of RAM and writes it at [`layout::ZERO_PAGE_START`].
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    cmdline_size: usize,
    setup_hdr: Option<setup_header>,
    initrd: Option<InitrdRange>,
) -> Result<(), BootParamsError> {
    let mut params = boot_params::default();
    if let Some(hdr) = setup_hdr {
        // A bzImage's own setup header, as the boot protocol asks.
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some(rd) = initrd {
        params.hdr.ramdisk_image = rd.addr as u32;
        params.hdr.ramdisk_size = rd.size as u32;
    }

    add_e820(&mut params, 0, layout::EBDA_START, E820_RAM)?;
    add_e820(
        &mut params,
        layout::EBDA_START,
        layout::HIMEM_START - layout::EBDA_START,
        E820_RESERVED,
    )?;
    for (start, len) in layout::ram_ranges(mem_size) {
        let (start, len) = if start == 0 {
            (layout::HIMEM_START, len.saturating_sub(layout::HIMEM_START))
        } else {
            (start, len)
        };
        if len > 0 {
            add_e820(&mut params, start, len, E820_RAM)?;
        }
    }
    let bp = BootParams::new::<boot_params>(&params, GuestAddress(layout::ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .map_err(BootParamsError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn e820_describes_ram() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        write_zero_page(&mem, 64 << 20, 10, None, None).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        assert_eq!(params.e820_entries, 3);
        assert_eq!({ params.e820_table[2].addr }, layout::HIMEM_START);
        assert_eq!(
            { params.e820_table[2].size },
            (64 << 20) - layout::HIMEM_START
        );
        assert_eq!({ params.hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
        assert_eq!({ params.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
    }
}
