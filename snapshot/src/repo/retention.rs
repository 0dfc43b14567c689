//! Which backup points prune keeps: restic's retention policies, per VM.
//!
//! Points are taken newest first. A calendar policy (`hourly`, `daily`, `weekly`, `monthly`,
//! `yearly`) keeps the newest point of each of its last N buckets that hold points; `last`
//! keeps the newest N points; `within` keeps every point no older than the duration before the
//! VM's newest point. A point is kept when any policy keeps it, and the reasons add up. Buckets
//! are calendar periods in [`KeepPolicy::time_zone`] (weeks are ISO 8601 weeks).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::Timestamp;

use super::PointManifest;

/// Which points prune keeps, per VM. Counts of 0 turn a policy off.
#[derive(Clone, Debug, PartialEq)]
pub struct KeepPolicy {
    /// Keep the newest N points.
    pub keep_last: usize,
    /// Keep the newest point of each of the last N hours that have points.
    pub keep_hourly: usize,
    /// Keep the newest point of each of the last N days that have points.
    pub keep_daily: usize,
    /// Keep the newest point of each of the last N ISO weeks that have points.
    pub keep_weekly: usize,
    /// Keep the newest point of each of the last N months that have points.
    pub keep_monthly: usize,
    /// Keep the newest point of each of the last N years that have points.
    pub keep_yearly: usize,
    /// Keep every point made within this long before the VM's newest point.
    pub keep_within: Option<Duration>,
    /// The time zone calendar buckets are counted in.
    pub time_zone: TimeZone,
}

impl Default for KeepPolicy {
    fn default() -> Self {
        Self {
            keep_last: 0,
            keep_hourly: 0,
            keep_daily: 0,
            keep_weekly: 0,
            keep_monthly: 0,
            keep_yearly: 0,
            keep_within: None,
            time_zone: TimeZone::UTC,
        }
    }
}

impl KeepPolicy {
    /// Keeps the newest `n` points of each VM.
    pub fn last(n: usize) -> Self {
        Self {
            keep_last: n,
            ..Self::default()
        }
    }

    /// Whether no policy is set (such a policy would keep nothing).
    pub fn is_empty(&self) -> bool {
        self.keep_within.is_none()
            && [
                self.keep_last,
                self.keep_hourly,
                self.keep_daily,
                self.keep_weekly,
                self.keep_monthly,
                self.keep_yearly,
            ]
            .iter()
            .all(|n| *n == 0)
    }

    /// For each point of `points` that the policy keeps, why. Points of other VMs never
    /// affect each other.
    pub fn select(&self, points: &[PointManifest]) -> BTreeMap<String, Vec<KeepReason>> {
        let mut by_vm: BTreeMap<&str, Vec<&PointManifest>> = BTreeMap::new();
        for point in points {
            by_vm.entry(point.vm.as_str()).or_default().push(point);
        }
        let mut kept = BTreeMap::new();
        for vm_points in by_vm.values_mut() {
            // Newest first; ids sort by creation time, to the nanosecond.
            vm_points.sort_by(|a, b| (b.created_unix_ms, &b.id).cmp(&(a.created_unix_ms, &a.id)));
            self.select_vm(vm_points, &mut kept);
        }
        kept
    }

    fn select_vm(
        &self,
        newest_first: &[&PointManifest],
        kept: &mut BTreeMap<String, Vec<KeepReason>>,
    ) {
        let mut rules: Vec<Bucketer> = [
            (KeepReason::Last, self.keep_last),
            (KeepReason::Hourly, self.keep_hourly),
            (KeepReason::Daily, self.keep_daily),
            (KeepReason::Weekly, self.keep_weekly),
            (KeepReason::Monthly, self.keep_monthly),
            (KeepReason::Yearly, self.keep_yearly),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(reason, left)| Bucketer {
            reason,
            left,
            last: None,
        })
        .collect();
        let newest_ms = newest_first.first().map_or(0, |p| p.created_unix_ms);
        let within_ms = self
            .keep_within
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        for (index, point) in newest_first.iter().enumerate() {
            let time = self.civil(point.created_unix_ms);
            let mut reasons = Vec::new();
            if within_ms.is_some_and(|w| newest_ms.saturating_sub(point.created_unix_ms) <= w) {
                reasons.push(KeepReason::Within);
            }
            for rule in &mut rules {
                if rule.left == 0 {
                    continue;
                }
                let bucket = rule.reason.bucket(index, time);
                if rule.last != Some(bucket) {
                    rule.last = Some(bucket);
                    rule.left -= 1;
                    reasons.push(rule.reason);
                }
            }
            if !reasons.is_empty() {
                reasons.sort();
                kept.insert(point.id.clone(), reasons);
            }
        }
    }

    /// The civil time of a point in the policy's time zone.
    fn civil(&self, unix_ms: u64) -> DateTime {
        let ts = i64::try_from(unix_ms)
            .ok()
            .and_then(|ms| Timestamp::from_millisecond(ms).ok())
            .unwrap_or(Timestamp::MAX);
        self.time_zone.to_datetime(ts)
    }
}

/// One bucket policy's progress through the points, newest first.
struct Bucketer {
    reason: KeepReason,
    /// Buckets still to keep a point of.
    left: usize,
    /// The bucket of the last point kept.
    last: Option<i64>,
}

/// Why prune keeps a point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeepReason {
    /// `--keep-last`.
    Last,
    /// `--keep-hourly`.
    Hourly,
    /// `--keep-daily`.
    Daily,
    /// `--keep-weekly`.
    Weekly,
    /// `--keep-monthly`.
    Monthly,
    /// `--keep-yearly`.
    Yearly,
    /// `--keep-within`.
    Within,
}

impl KeepReason {
    /// The policy's name, as in its flag (`daily` for `--keep-daily`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Last => "last",
            Self::Hourly => "hourly",
            Self::Daily => "daily",
            Self::Weekly => "weekly",
            Self::Monthly => "monthly",
            Self::Yearly => "yearly",
            Self::Within => "within",
        }
    }

    /// The bucket of the `index`th newest point, made at civil time `t`.
    fn bucket(self, index: usize, t: DateTime) -> i64 {
        let (y, m, d, h) = (
            i64::from(t.year()),
            i64::from(t.month()),
            i64::from(t.day()),
            i64::from(t.hour()),
        );
        match self {
            Self::Last | Self::Within => index as i64,
            Self::Hourly => ((y * 100 + m) * 100 + d) * 100 + h,
            Self::Daily => (y * 100 + m) * 100 + d,
            Self::Weekly => {
                let week = t.date().iso_week_date();
                i64::from(week.year()) * 100 + i64::from(week.week())
            }
            Self::Monthly => y * 100 + m,
            Self::Yearly => y,
        }
    }
}

impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::PointStats;
    use crate::FORMAT_VERSION;

    const HOUR: u64 = 3_600_000;
    const DAY: u64 = 24 * HOUR;

    fn point(vm: &str, unix_ms: u64) -> PointManifest {
        PointManifest {
            format_version: FORMAT_VERSION,
            id: format!("{unix_ms:016}-{vm}"),
            vm: vm.into(),
            created_unix_ms: unix_ms,
            parent: None,
            objects: Vec::new(),
            stats: PointStats::default(),
        }
    }

    fn kept(policy: &KeepPolicy, points: &[PointManifest]) -> Vec<u64> {
        let keep = policy.select(points);
        points
            .iter()
            .filter(|p| keep.contains_key(&p.id))
            .map(|p| p.created_unix_ms)
            .collect()
    }

    #[test]
    fn policies_per_vm_and_adding_up() {
        // vm1: two points on each of days 10, 11, 12; vm2: one point on day 12.
        let mut points = Vec::new();
        for day in 10..13 {
            points.push(point("vm1", day * DAY + 1000));
            points.push(point("vm1", day * DAY + 2000));
        }
        points.push(point("vm2", 12 * DAY));
        assert_eq!(
            kept(&KeepPolicy::last(2), &points),
            [12 * DAY + 1000, 12 * DAY + 2000, 12 * DAY]
        );
        let daily2 = KeepPolicy {
            keep_daily: 2,
            ..KeepPolicy::default()
        };
        assert_eq!(
            kept(&daily2, &points),
            [11 * DAY + 2000, 12 * DAY + 2000, 12 * DAY]
        );
        let both = KeepPolicy {
            keep_last: 1,
            keep_daily: 3,
            ..KeepPolicy::default()
        };
        assert_eq!(kept(&both, &points).len(), 4);
        let reasons = both.select(&points);
        assert_eq!(
            reasons[&point("vm1", 12 * DAY + 2000).id],
            [KeepReason::Last, KeepReason::Daily]
        );
        assert!(KeepPolicy::default().select(&points).is_empty());
    }

    #[test]
    fn within_counts_from_the_newest_point_and_days_follow_the_zone() {
        let points: Vec<_> = (0..10).map(|h| point("vm", 100 * DAY + h * HOUR)).collect();
        let within = KeepPolicy {
            keep_within: Some(Duration::from_secs(3 * 3600)),
            ..KeepPolicy::default()
        };
        assert_eq!(
            kept(&within, &points),
            [6, 7, 8, 9].map(|h| 100 * DAY + h * HOUR)
        );
        // Hours 0..9 UTC are one UTC day, but two days in UTC-5 (0..4 UTC are the evening
        // before).
        let utc_minus_5 = TimeZone::fixed(jiff::tz::Offset::constant(-5));
        let daily = KeepPolicy {
            keep_daily: 5,
            ..KeepPolicy::default()
        };
        assert_eq!(kept(&daily, &points), [100 * DAY + 9 * HOUR]);
        let local = KeepPolicy {
            time_zone: utc_minus_5,
            ..daily
        };
        assert_eq!(
            kept(&local, &points),
            [100 * DAY + 4 * HOUR, 100 * DAY + 9 * HOUR]
        );
    }
}
