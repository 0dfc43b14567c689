//! How the command line prints values: dates, byte sizes, counted nouns, durations.

use std::time::Duration;

use indicatif::HumanBytes;

/// A time in milliseconds since the Unix epoch as a UTC date: `2026-11-18 11:06:40`.
pub fn date_utc(unix_ms: u64) -> String {
    timestamp(unix_ms).strftime("%Y-%m-%d %H:%M:%S").to_string()
}

/// A time in milliseconds since the Unix epoch as RFC 3339 in UTC, for JSON.
pub fn date_rfc3339(unix_ms: u64) -> String {
    timestamp(unix_ms)
        .strftime("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

fn timestamp(unix_ms: u64) -> jiff::Timestamp {
    i64::try_from(unix_ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .unwrap_or(jiff::Timestamp::MAX)
}

/// A byte count in binary units (`1.50 MiB`).
pub fn bytes(n: u64) -> String {
    HumanBytes(n).to_string()
}

/// `n` and the noun, plural unless `n` is 1: `1 point`, `2 points`.
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Parses a duration such as `90s`, `1h`, `2days 3h` or `1y` (humantime's syntax).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("'{text}' is not a duration: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_sizes_and_counts() {
        assert_eq!(date_utc(0), "1970-01-01 00:00:00");
        assert_eq!(date_utc(1_795_000_000_000), "2026-11-18 11:06:40");
        assert_eq!(date_utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(date_rfc3339(951_782_400_005), "2000-02-29T00:00:00.005Z");
        assert_eq!(bytes(3 << 20), "3.00 MiB");
        assert_eq!(count(1, "point"), "1 point");
        assert_eq!(count(0, "point"), "0 points");
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("soon").is_err());
    }
}
