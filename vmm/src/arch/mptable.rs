//! The Intel MultiProcessor Specification 1.4 table that tells a guest how many processors it has
//! and how interrupts are routed, so that Linux brings the application processors up with
//! INIT/SIPI.

use vm_memory::{Bytes, GuestAddress};

use super::layout;
use devices::GuestMemoryMmap;

/// Why the MP table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than APIC ids below the IOAPIC's.
    #[error("the MP table can describe at most {max} vCPUs, {asked} were asked for")]
    TooManyCpus { asked: u8, max: u8 },
    /// Guest memory does not cover the table.
    #[error("guest memory does not cover the MP table")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The largest vCPU count the table describes (APIC ids 0..=253; the IOAPIC takes the next id).
pub const MAX_CPUS: u8 = 254;
/// The number of IOAPIC pins routed.
pub const IOAPIC_PINS: u8 = 24;

const MPC_SPEC: u8 = 4;
const MPC_APIC_VERSION: u8 = 0x14;
const MPC_IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the configuration table (header and entries) for `num_cpus` processors.
fn config_table(num_cpus: u8) -> Vec<u8> {
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.push(0); // processor
        entries.push(cpu);
        entries.push(MPC_APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    // One ISA bus.
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    let ioapic_id = num_cpus;
    entries.extend_from_slice(&[2, ioapic_id, MPC_IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&layout::IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        let kind = if pin == 0 { MP_IRQ_EXTINT } else { MP_IRQ_INT };
        entries.extend_from_slice(&[3, kind, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 is ExtINT and LINT1 is NMI on every local APIC.
    entries.extend_from_slice(&[4, MP_IRQ_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let length = (44 + entries.len()) as u16;
    let mut table = Vec::with_capacity(usize::from(length));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.push(MPC_SPEC);
    table.push(0); // checksum, filled below
    table.extend_from_slice(b"ARKVM   ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&layout::APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// Writes the floating pointer and the configuration table for `num_cpus` processors.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus {
            asked: num_cpus,
            max: MAX_CPUS,
        });
    }
    let table_addr = layout::MPTABLE_START + 16;
    let mut mpf = [0u8; 16];
    mpf[0..4].copy_from_slice(b"_MP_");
    mpf[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    mpf[8] = 1; // length in 16-byte units
    mpf[9] = MPC_SPEC;
    mpf[10] = checksum(&mpf);
    mem.write_slice(&mpf, GuestAddress(layout::MPTABLE_START))
        .map_err(MptableError::Write)?;
    mem.write_slice(&config_table(num_cpus), GuestAddress(table_addr))
        .map_err(MptableError::Write)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_checksums_and_counts() {
        for cpus in [1u8, 4, MAX_CPUS] {
            let t = config_table(cpus);
            assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let len = u16::from_le_bytes([t[4], t[5]]) as usize;
            assert_eq!(len, t.len());
            let count = u16::from_le_bytes([t[34], t[35]]);
            assert_eq!(count, u16::from(cpus) + 2 + u16::from(IOAPIC_PINS) + 2);
            // Only the first processor is the boot processor.
            assert_eq!(t[44 + 3], CPU_ENABLED | CPU_BOOTPROCESSOR);
            if cpus > 1 {
                assert_eq!(t[44 + 20 + 3], CPU_ENABLED);
            }
            assert!(layout::MPTABLE_START + 16 + (t.len() as u64) < 0x10_0000);
        }
    }

    #[test]
    fn refuses_too_many() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        assert!(setup_mptable(&mem, 0).is_err());
        assert!(setup_mptable(&mem, 4).is_ok());
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(layout::MPTABLE_START))
            .unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
