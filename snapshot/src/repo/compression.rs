//! How a backup compresses its chunks (`arkvm snapshot --compression`): zstd at a level chosen
//! by name, or not at all. Every chunk object says how it is stored, so points of one
//! repository may differ and a reader needs no setting.
//!
//! | name | zstd level | for |
//! |---|---|---|
//! | `default` | 1 | most backups: fast, and 3x smaller on realistic memory |
//! | `fast` | -20 (`--fast=20`) | a host with few cores and a fast disk: about 2.7x zstd 1's speed for about 40% more bytes (zstd's own benchmark on a mix of zero, text, code and random pages) |
//! | `max` | 9 | archives: several times slower |
//! | `off` | none | a disk faster than the cores can compress (hashing still runs) |

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

/// A backup's chunk compression.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// zstd level 1.
    #[default]
    Default,
    /// zstd level -20.
    Fast,
    /// zstd level 9.
    Max,
    /// Chunks are stored plain.
    Off,
}

impl Compression {
    /// Every setting, for help texts and tests.
    pub const ALL: [Compression; 4] = [
        Compression::Default,
        Compression::Fast,
        Compression::Max,
        Compression::Off,
    ];

    /// The zstd level, or None for [`Compression::Off`].
    pub fn zstd_level(self) -> Option<i32> {
        match self {
            Compression::Default => Some(1),
            Compression::Fast => Some(-20),
            Compression::Max => Some(9),
            Compression::Off => None,
        }
    }

    /// The name on the command line and in the API.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Default => "default",
            Compression::Fast => "fast",
            Compression::Max => "max",
            Compression::Off => "off",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Compression::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown compression '{}': use default, fast, max or off",
                    s.chars().take(40).collect::<String>()
                )
            })
    }
}

thread_local! {
    /// This thread's zstd context and the level it was made for: a context is a few hundred
    /// KiB of tables, worth keeping across the 1 MiB chunks a backup worker compresses.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
}

/// `data` compressed with zstd at `level`, with a context kept per thread.
pub fn zstd_compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if !matches!(&*slot, Some((l, _)) if *l == level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        match &mut *slot {
            Some((_, c)) => c.compress(data),
            None => zstd::bulk::compress(data, level),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_are_refused() {
        for c in Compression::ALL {
            assert_eq!(c.name().parse::<Compression>().unwrap(), c);
        }
        assert_eq!(Compression::default(), Compression::Default);
        let err = "zip".parse::<Compression>().unwrap_err();
        assert!(err.contains("default, fast, max or off"), "{err}");
    }

    #[test]
    fn a_kept_context_compresses_like_a_fresh_one_at_every_level() {
        let data: Vec<u8> = (0..300_000u32)
            .map(|i| (i % 251) as u8 ^ (i / 7) as u8)
            .collect();
        for c in Compression::ALL {
            let Some(level) = c.zstd_level() else {
                continue;
            };
            for _ in 0..2 {
                let kept = zstd_compress(&data, level).unwrap();
                assert_eq!(zstd::stream::decode_all(&kept[..]).unwrap(), data, "{c}");
                assert_eq!(kept, zstd::bulk::compress(&data, level).unwrap(), "{c}");
            }
        }
    }
}
