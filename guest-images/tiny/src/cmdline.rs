//! `key=value` options on the kernel command line (unknown words are ignored).

/// The command line, split on ASCII whitespace.
#[derive(Clone, Copy)]
pub struct Cmdline<'a> {
    text: &'a str,
}

/// Parses a number: decimal, or hexadecimal with a `0x` prefix.
pub fn parse_u64(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else {
        s.parse().ok()
    }
}

impl<'a> Cmdline<'a> {
    /// Wraps a command line.
    pub fn new(text: &'a str) -> Self {
        Cmdline { text }
    }

    /// The value of the last `key=value` word with this key.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.text
            .split_ascii_whitespace()
            .rev()
            .filter_map(|w| w.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// A numeric option; `None` if absent or not a number.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(parse_u64)
    }

    /// The numbers of a comma-separated list option (unparsable items are skipped).
    pub fn get_list(&self, key: &str) -> impl Iterator<Item = u64> + 'a {
        self.get(key).unwrap_or("").split(',').filter_map(parse_u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_options_among_other_words() {
        let c = Cmdline::new(
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 arkvm.passes=12 arkvm.mode=disk",
        );
        assert_eq!(c.get("arkvm.mode"), Some("disk"));
        assert_eq!(c.get_u64("arkvm.passes"), Some(12));
        assert_eq!(c.get("virtio_mmio.device"), Some("4K@0xd0000000:5"));
        assert_eq!(c.get("arkvm.hot_pct"), None);
    }

    #[test]
    fn last_word_wins_and_hex_parses() {
        let c = Cmdline::new("arkvm.ops=1 arkvm.ops=0x20");
        assert_eq!(c.get_u64("arkvm.ops"), Some(32));
        assert_eq!(c.get_u64("missing"), None);
        assert_eq!(Cmdline::new("arkvm.ops=zz").get_u64("arkvm.ops"), None);
    }

    #[test]
    fn lists_parse() {
        let c = Cmdline::new("arkvm.blocks=3,17,0x10,bad,9");
        let v: Vec<u64> = c.get_list("arkvm.blocks").collect();
        assert_eq!(v, vec![3, 17, 16, 9]);
        assert_eq!(Cmdline::new("").get_list("arkvm.blocks").count(), 0);
    }
}
