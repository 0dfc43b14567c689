//! The round-trip disk pattern: the LE u64 at disk byte offset `o` (a multiple of 8) is
//! `o * 0x9E37_79B9_7F4A_7C15 ^ 0xA5A5_5A5A_0F0F_F0F0` (wrapping).

/// The pattern word at byte offset `off`.
pub fn word(off: u64) -> u64 {
    off.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xA5A5_5A5A_0F0F_F0F0
}

/// Fills `buf`, which holds disk bytes from offset `off` (a multiple of 8; `buf.len()` too).
pub fn fill(off: u64, buf: &mut [u8]) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&word(off + 8 * i as u64).to_le_bytes());
    }
}

/// Index of the first byte of the first wrong word in `buf` (disk bytes from `off`).
pub fn first_mismatch(off: u64, buf: &[u8]) -> Option<usize> {
    buf.chunks_exact(8)
        .enumerate()
        .position(|(i, w)| w != word(off + 8 * i as u64).to_le_bytes())
        .map(|i| 8 * i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check() {
        let mut buf = vec![0u8; 4096];
        fill(65536, &mut buf);
        assert_eq!(first_mismatch(65536, &buf), None);
        assert_eq!(&buf[8..16], &word(65536 + 8).to_le_bytes());
        assert_eq!(first_mismatch(0, &buf), Some(0));
        buf[100] ^= 1;
        assert_eq!(first_mismatch(65536, &buf), Some(96));
    }

    #[test]
    fn word_values() {
        assert_eq!(word(0), 0xA5A5_5A5A_0F0F_F0F0);
        assert_eq!(
            word(8),
            8u64.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xA5A5_5A5A_0F0F_F0F0
        );
    }
}
