//! What the memory guest puts in its pages besides the two generation words (`arkvm.fill=`), so
//! that backups are measured on data that does not compress away:
//! - `zero` (the default): nothing; a page holds only its two generation words.
//! - `random`: every byte from a fast PRNG (xorshift64*): incompressible, like encrypted data.
//! - `mixed`: a realistic mix picked per page: zero pages, English-like text, copies of the
//!   guest's own machine code, one page repeated many times, and random pages.
//!
//! The filler covers bytes 8..4088 of each page, between the generation words at byte 0 and
//! byte 4088, so the torn check is unchanged. It is written once, before the first generation.

/// Bytes of a page the filler owns: after the first generation word, before the last.
pub const FILL_START: usize = 8;
pub const FILL_END: usize = 4088;

/// The `arkvm.fill=` mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    Zero,
    Random,
    Mixed,
}

impl Fill {
    /// Parses the option's value; an absent option is `Zero`, an unknown one `None`.
    pub fn parse(value: Option<&str>) -> Option<Fill> {
        match value {
            None | Some("zero") => Some(Fill::Zero),
            Some("random") => Some(Fill::Random),
            Some("mixed") => Some(Fill::Mixed),
            Some(_) => None,
        }
    }

    /// The option's name for this mode.
    pub fn name(self) -> &'static str {
        match self {
            Fill::Zero => "zero",
            Fill::Random => "random",
            Fill::Mixed => "mixed",
        }
    }
}

/// xorshift64*: fast, and its output does not compress.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn fill(&mut self, bytes: &mut [u8]) {
        let mut chunks = bytes.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// What one page of the mixed fill holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    Zero,
    Text,
    Code,
    Repeated,
    Random,
}

/// The kind of page `index` in the mixed fill: 30% zero, 25% text, 20% code, 15% repeated,
/// 10% random, spread by a hash of the index.
pub fn mixed_kind(index: u64) -> PageKind {
    let h = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
    match h % 100 {
        0..30 => PageKind::Zero,
        30..55 => PageKind::Text,
        55..75 => PageKind::Code,
        75..90 => PageKind::Repeated,
        _ => PageKind::Random,
    }
}

const WORDS: [&str; 32] = [
    "the", "backup", "of", "a", "running", "machine", "is", "taken", "while", "guest", "memory",
    "and", "disks", "keep", "changing", "so", "every", "page", "copied", "must", "belong", "to",
    "one", "instant", "in", "time", "with", "its", "state", "restored", "later", "exactly",
];

fn fill_text(bytes: &mut [u8], rng: &mut Rng) {
    let mut i = 0;
    let mut line = 0;
    while i < bytes.len() {
        let r = rng.next();
        let word = WORDS[(r % WORDS.len() as u64) as usize].as_bytes();
        for &b in word {
            if i == bytes.len() {
                return;
            }
            bytes[i] = b;
            i += 1;
        }
        line += word.len() + 1;
        if i < bytes.len() {
            bytes[i] = if line > 72 { b'\n' } else { b' ' };
            if line > 72 {
                line = 0;
            }
            i += 1;
        }
    }
}

/// Fills `bytes` (the filler of page `index`) for `fill`; `code` is the guest's own image.
pub fn fill_page(fill: Fill, index: u64, bytes: &mut [u8], rng: &mut Rng, code: &[u8]) {
    let kind = match fill {
        Fill::Zero => return,
        Fill::Random => PageKind::Random,
        Fill::Mixed => mixed_kind(index),
    };
    match kind {
        PageKind::Zero => {}
        PageKind::Random => rng.fill(bytes),
        PageKind::Text => fill_text(bytes, rng),
        PageKind::Repeated => Rng::new(0x5EED).fill(bytes),
        PageKind::Code => {
            if code.len() <= bytes.len() {
                return;
            }
            let span = (code.len() - bytes.len()) as u64;
            let from = ((index.wrapping_mul(613)) % span) as usize;
            bytes.copy_from_slice(&code[from..from + bytes.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_unknown_is_refused() {
        assert_eq!(Fill::parse(None), Some(Fill::Zero));
        assert_eq!(Fill::parse(Some("random")), Some(Fill::Random));
        assert_eq!(Fill::parse(Some("mixed")), Some(Fill::Mixed));
        assert_eq!(Fill::parse(Some("nope")), None);
    }

    #[test]
    fn the_mix_has_every_kind_in_roughly_its_share() {
        let mut counts = [0u32; 5];
        for i in 0..100_000 {
            counts[mixed_kind(i) as usize] += 1;
        }
        for (c, want) in counts.iter().zip([30_000, 25_000, 20_000, 15_000, 10_000]) {
            assert!(c.abs_diff(want) < 2_000, "{counts:?}");
        }
    }

    #[test]
    fn random_pages_differ_and_repeated_pages_repeat() {
        let code = [0x90u8; 8192];
        let mut rng = Rng::new(1);
        let (mut a, mut b) = ([0u8; FILL_END - FILL_START], [0u8; FILL_END - FILL_START]);
        fill_page(Fill::Random, 0, &mut a, &mut rng, &code);
        fill_page(Fill::Random, 1, &mut b, &mut rng, &code);
        assert_ne!(a, b);
        assert!(a.iter().filter(|&&x| x == 0).count() < 100);
        let r = (0..1000)
            .find(|&i| mixed_kind(i) == PageKind::Repeated)
            .unwrap();
        let s = (r + 1..2000)
            .find(|&i| mixed_kind(i) == PageKind::Repeated)
            .unwrap();
        fill_page(Fill::Mixed, r, &mut a, &mut rng, &code);
        fill_page(Fill::Mixed, s, &mut b, &mut rng, &code);
        assert_eq!(a, b);
        let t = (0..1000)
            .find(|&i| mixed_kind(i) == PageKind::Text)
            .unwrap();
        fill_page(Fill::Mixed, t, &mut a, &mut rng, &code);
        assert!(a
            .iter()
            .all(|c| c.is_ascii_lowercase() || *c == b' ' || *c == b'\n'));
        let mut z = [7u8; 16];
        fill_page(Fill::Zero, 3, &mut z, &mut rng, &code);
        assert_eq!(z, [7u8; 16], "zero fill leaves the page alone");
    }
}
