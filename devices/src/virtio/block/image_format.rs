//! Recognising disk image formats that are not raw: an image that starts with a known magic
//! (qcow2, VMDK, VHD/VHDX, VDI, ...) would otherwise boot as a raw disk full of metadata.

/// A non-raw image format, by the name `qemu-img` gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageFormat {
    /// The name users know it by (`qcow2`, `VMDK`, ...).
    pub name: &'static str,
    /// `qemu-img`'s name of the format (`-f` option).
    pub qemu_name: &'static str,
}

/// How many leading bytes [`detect`] looks at.
pub const HEADER_LEN: usize = 512;

/// (offset, magic, name, qemu-img name) of every format recognised.
const MAGICS: &[(usize, &[u8], &str, &str)] = &[
    (0, b"QFI\xfb\x00\x00\x00\x01", "qcow", "qcow"),
    (0, b"QFI\xfb", "qcow2", "qcow2"),
    (0, b"KDMV", "VMDK", "vmdk"),
    (0, b"COWD", "VMDK (ESX COW)", "vmdk"),
    (0, b"# Disk DescriptorFile", "VMDK descriptor", "vmdk"),
    (0, b"vhdxfile", "VHDX", "vhdx"),
    (0, b"conectix", "VHD", "vpc"),
    (0x40, b"\x7f\x10\xda\xbe", "VDI", "vdi"),
    (0, b"QED\x00", "QED", "qed"),
    (0, b"WithoutFreeSpace", "Parallels", "parallels"),
    (0, b"WithouFreSpacExt", "Parallels", "parallels"),
    (0, b"cloop", "cloop", "cloop"),
];

/// The format `header` (the first bytes of an image, up to [`HEADER_LEN`]) starts with, if
/// it is a known non-raw one.
pub fn detect(header: &[u8]) -> Option<ImageFormat> {
    MAGICS
        .iter()
        .find(|(at, magic, _, _)| header.get(*at..*at + magic.len()) == Some(*magic))
        .map(|&(_, _, name, qemu_name)| ImageFormat { name, qemu_name })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_magics_and_raw() {
        let mut qcow2 = vec![0u8; 512];
        qcow2[..8].copy_from_slice(b"QFI\xfb\x00\x00\x00\x03");
        assert_eq!(detect(&qcow2).unwrap().name, "qcow2");
        qcow2[7] = 1;
        assert_eq!(detect(&qcow2).unwrap().name, "qcow");
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(b"\x7f\x10\xda\xbe");
        assert_eq!(detect(&vdi).unwrap().qemu_name, "vdi");
        assert_eq!(detect(b"vhdxfile....").unwrap().name, "VHDX");
        assert_eq!(detect(b"KDMV").unwrap().qemu_name, "vmdk");
        assert_eq!(detect(&[0u8; 512]), None);
        assert_eq!(detect(b"QF"), None);
    }
}
