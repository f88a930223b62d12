//! Dates on the command line, through `chrono`: `--since` parsing and
//! the UTC timestamps printed next to records and failures.

use anyhow::anyhow;
use chrono::{DateTime, NaiveDate, NaiveTime};

/// Epoch seconds as `2024-03-01T10:00:00Z` (the bare seconds past the
/// years `chrono` can name).
pub fn format_utc(secs: i64) -> String {
    match DateTime::from_timestamp(secs, 0) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        None => secs.to_string(),
    }
}

/// Parses `--since`: epoch seconds, an age (`30s`, `30m`, `12h`, `7d`)
/// before `now`, a date (`2024-03-01`, midnight UTC) or a UTC date-time
/// (`2024-03-01T10:00:00Z`, a space for the `T`, seconds or minutes and
/// seconds optional, the `Z` too).
pub fn parse_since(s: &str, now: i64) -> anyhow::Result<i64> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    if let Some(unit) = s.chars().last().filter(|c| "smhd".contains(*c)) {
        if let Ok(n) = s[..s.len() - 1].parse::<i64>() {
            let mult = match unit {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                _ => 86_400,
            };
            return Ok(now - n * mult);
        }
    }
    let bad = || {
        anyhow!("--since {s:?}: expected epoch seconds, YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ or an age like 7d")
    };
    let (date, time) = match s.split_once(['T', ' ']) {
        Some((d, t)) => (d, Some(t.trim_end_matches('Z'))),
        None => (s, None),
    };
    let date = NaiveDate::parse_from_str(date, "%Y-%m-%d").map_err(|_| bad())?;
    let time = match time {
        None => NaiveTime::MIN,
        Some(t) => {
            // `10` and `10:30` stand for `10:00:00` and `10:30:00`.
            let t = match t.split(':').count() {
                1 => format!("{t}:00:00"),
                2 => format!("{t}:00"),
                _ => t.to_string(),
            };
            NaiveTime::parse_from_str(&t, "%H:%M:%S").map_err(|_| bad())?
        }
    };
    Ok(date.and_time(time).and_utc().timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_table() {
        let now = 1_764_000_000;
        let cases = [
            ("1700000000", Some(1_700_000_000)),
            ("2024-03-01", Some(1_709_251_200)),
            ("2024-03-01T10:00:00Z", Some(1_709_287_200)),
            ("2024-03-01T10:00:00", Some(1_709_287_200)),
            ("2024-03-01 10:00", Some(1_709_287_200)),
            ("2024-03-01T10", Some(1_709_287_200)),
            ("2024-3-1", Some(1_709_251_200)),
            ("2024-02-29", Some(1_709_164_800)),
            ("1969-12-31T23:59:59Z", Some(-1)),
            ("7d", Some(now - 7 * 86_400)),
            ("30m", Some(now - 1800)),
            ("12h", Some(now - 12 * 3600)),
            ("45s", Some(now - 45)),
            ("2024-13-01", None),
            ("2023-02-29", None),
            ("2024-03-01T24:00:00Z", None),
            ("2024-03-01T10:00:00.5Z", None),
            ("2024-03", None),
            ("yesterday", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_since(input, now).ok(), want, "{input}");
        }
    }

    #[test]
    fn format_utc_table() {
        let cases = [
            (1_709_287_200, "2024-03-01T10:00:00Z"),
            (0, "1970-01-01T00:00:00Z"),
            (-1, "1969-12-31T23:59:59Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (i64::MAX, "9223372036854775807"),
        ];
        for (secs, want) in cases {
            assert_eq!(format_utc(secs), want, "{secs}");
        }
    }
}
