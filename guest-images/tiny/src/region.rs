//! The memory guest's region arithmetic: RAM ranges above 4 MiB, page counts, print interval.

use crate::bootparams::{E820Entry, E820_RAM};

/// Page size the memory guest works in.
pub const PAGE: u64 = 4096;
/// The region starts here: everything below belongs to arkvm's low structures and the guest.
pub const REGION_FLOOR: u64 = 4 << 20;
/// The prologue maps at most 64 GiB of guest-physical space; RAM above is left out.
pub const REGION_CEILING: u64 = 64 << 30;
/// Most RAM ranges kept.
pub const MAX_RANGES: usize = 16;

/// A set of page-aligned, sorted, disjoint RAM ranges `[start, end)`.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    ranges: [(u64, u64); MAX_RANGES],
    len: usize,
}

impl Region {
    /// RAM from the e820 map above `REGION_FLOOR`, optionally only the first `limit_mb` MiB.
    pub fn from_e820(entries: impl Iterator<Item = E820Entry>, limit_mb: Option<u64>) -> Self {
        let mut r = Region {
            ranges: [(0, 0); MAX_RANGES],
            len: 0,
        };
        for e in entries.filter(|e| e.kind == E820_RAM) {
            let start = e.addr.max(REGION_FLOOR).next_multiple_of(PAGE);
            let end = e.addr.saturating_add(e.size).min(REGION_CEILING) / PAGE * PAGE;
            if start < end && r.len < MAX_RANGES {
                r.ranges[r.len] = (start, end);
                r.len += 1;
            }
        }
        // Insertion sort by start (the table is tiny).
        for i in 1..r.len {
            let mut j = i;
            while j > 0 && r.ranges[j - 1].0 > r.ranges[j].0 {
                r.ranges.swap(j - 1, j);
                j -= 1;
            }
        }
        if let Some(mb) = limit_mb {
            let mut left = mb.saturating_mul(1 << 20);
            for i in 0..r.len {
                let (s, e) = r.ranges[i];
                let take = (e - s).min(left);
                r.ranges[i].1 = s + take;
                left -= take;
            }
            let mut n = 0;
            for i in 0..r.len {
                if r.ranges[i].0 < r.ranges[i].1 {
                    r.ranges[n] = r.ranges[i];
                    n += 1;
                }
            }
            r.len = n;
        }
        r
    }

    /// The ranges, lowest first.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges[..self.len]
    }

    /// Total pages.
    pub fn pages(&self) -> u64 {
        self.ranges().iter().map(|(s, e)| (e - s) / PAGE).sum()
    }

    /// First byte (0 if empty).
    pub fn start(&self) -> u64 {
        self.ranges().first().map_or(0, |r| r.0)
    }

    /// End of the last range (0 if empty).
    pub fn end(&self) -> u64 {
        self.ranges().last().map_or(0, |r| r.1)
    }

    /// Calls `f(first_page_address, page_count)` for the pages `[first, first + count)` of the
    /// region (page numbers counted over all ranges in order), split at range boundaries.
    pub fn for_span(&self, first: u64, count: u64, mut f: impl FnMut(u64, u64)) {
        let mut skip = first;
        let mut left = count;
        for &(s, e) in self.ranges() {
            if left == 0 {
                break;
            }
            let n = (e - s) / PAGE;
            if skip >= n {
                skip -= n;
                continue;
            }
            let take = (n - skip).min(left);
            f(s + skip * PAGE, take);
            left -= take;
            skip = 0;
        }
    }
}

/// Pages written per pass after the first one, for `hot_pct` percent (`None` = all pages).
/// `Some(0)` means idle (no writes after the first pass); any other percentage gives at least 1.
pub fn hot_pages(pages: u64, hot_pct: Option<u64>) -> u64 {
    match hot_pct {
        None => pages,
        Some(0) => 0,
        Some(p) => (pages * p.min(100) / 100).clamp(1, pages.max(1)),
    }
}

/// Passes between two progress lines: about one line per 2^20 page visits.
pub fn print_interval(pages_per_pass: u64) -> u64 {
    ((1u64 << 20) / pages_per_pass.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(addr: u64, size: u64) -> E820Entry {
        E820Entry {
            addr,
            size,
            kind: E820_RAM,
        }
    }

    #[test]
    fn region_skips_low_memory_and_reserved() {
        let e = [
            ram(0, 0x9fc00),
            E820Entry {
                addr: 0x9fc00,
                size: 0x400,
                kind: 2,
            },
            ram(0x100000, (256 << 20) - 0x100000),
        ];
        let r = Region::from_e820(e.into_iter(), None);
        assert_eq!(r.ranges(), &[(4 << 20, 256 << 20)]);
        assert_eq!(r.pages(), (252 << 20) / PAGE);
    }

    #[test]
    fn region_spans_the_hole_and_limits() {
        let e = [ram(1 << 32, 1 << 30), ram(0x100000, (3 << 30) - 0x100000)];
        let r = Region::from_e820(e.into_iter(), None);
        assert_eq!(
            r.ranges(),
            &[(4 << 20, 3 << 30), (1 << 32, (1 << 32) + (1 << 30))]
        );
        assert_eq!(r.start(), 4 << 20);
        assert_eq!(r.end(), (1 << 32) + (1 << 30));
        let limited = Region::from_e820(e.into_iter(), Some(3 * 1024));
        assert_eq!(
            limited.ranges(),
            &[(4 << 20, 3 << 30), (1 << 32, (1 << 32) + (4 << 20))]
        );
        let small = Region::from_e820(e.into_iter(), Some(16));
        assert_eq!(small.ranges(), &[(4 << 20, 20 << 20)]);
    }

    #[test]
    fn region_stops_at_the_mapped_ceiling() {
        let e = [ram(1 << 32, 100 << 30), ram(80 << 30, 1 << 30)];
        let r = Region::from_e820(e.into_iter(), None);
        assert_eq!(r.ranges(), &[(1 << 32, REGION_CEILING)]);
    }

    #[test]
    fn spans_cross_ranges() {
        let e = [ram(4 << 20, 2 * PAGE), ram(1 << 32, 3 * PAGE)];
        let r = Region::from_e820(e.into_iter(), None);
        let mut got = Vec::new();
        r.for_span(1, 3, |a, n| got.push((a, n)));
        assert_eq!(got, vec![((4 << 20) + PAGE, 1), (1 << 32, 2)]);
        got.clear();
        r.for_span(4, 10, |a, n| got.push((a, n)));
        assert_eq!(got, vec![((1 << 32) + 2 * PAGE, 1)]);
    }

    #[test]
    fn hot_and_interval() {
        assert_eq!(hot_pages(1000, None), 1000);
        assert_eq!(hot_pages(1000, Some(0)), 0);
        assert_eq!(hot_pages(1000, Some(1)), 10);
        assert_eq!(hot_pages(10, Some(1)), 1);
        assert_eq!(hot_pages(1000, Some(250)), 1000);
        assert_eq!(print_interval(64512), 16);
        assert_eq!(print_interval(1 << 21), 1);
        assert_eq!(print_interval(0), 1 << 20);
    }
}
