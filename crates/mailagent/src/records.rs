//! `mailagent records` (§7): list the records created from forms, and the
//! dates they print and filter on.

use anyhow::{anyhow, Context as _};
use common::config::Config;
use form_processor::store::{RecordFilter, Store};

/// `mailagent records`
#[derive(Debug, clap::Args)]
pub struct RecordsArgs {
    /// One JSON object a line: id, module, business-object, fields,
    /// children, source, created-at.
    #[arg(long)]
    pub json: bool,
    /// Only records of this topic (its configured subject).
    #[arg(long)]
    pub topic: Option<String>,
    /// Only records created since: epoch seconds, `2024-03-01`,
    /// `2024-03-01T10:00:00Z`, or an age such as `30m`, `12h`, `7d`.
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many records.
    #[arg(long)]
    pub limit: Option<i64>,
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// (year, month, day) to days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Epoch seconds as `2024-03-01T10:00:00Z`.
pub fn format_utc(secs: i64) -> String {
    let (y, m, d) = civil(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Parses `--since`: epoch seconds, a date, a UTC date-time, or an age.
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
    let mut parts = date.split('-');
    let (Some(y), Some(m), Some(d), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let (y, m, d): (i64, u32, u32) = (
        y.parse().map_err(|_| bad())?,
        m.parse().map_err(|_| bad())?,
        d.parse().map_err(|_| bad())?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let mut secs = days_from_civil(y, m, d) * 86_400;
    if let Some(t) = time {
        let hms: Vec<i64> = t
            .split(':')
            .map(|x| x.parse().map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        let weights = [3600, 60, 1];
        if hms.is_empty() || hms.len() > 3 {
            return Err(bad());
        }
        secs += hms.iter().zip(weights).map(|(v, w)| v * w).sum::<i64>();
    }
    Ok(secs)
}

/// Opens the configured record store; an error names it (redacted).
pub(crate) async fn open_store(config: &Config) -> anyhow::Result<Store> {
    Store::open(config.form_processor.store.expose(), None)
        .await
        .with_context(|| {
            format!(
                "cannot open the record store {}",
                config.form_processor.store
            )
        })
}

/// `mailagent records`
pub async fn records(config: &Config, args: &RecordsArgs) -> anyhow::Result<()> {
    let now = common::heartbeat::now_secs() as i64;
    let filter = RecordFilter {
        topic: args.topic.clone(),
        since: args
            .since
            .as_deref()
            .map(|s| parse_since(s, now))
            .transpose()?,
        limit: args.limit,
    };
    let store = open_store(config).await?;
    let records = store.records(&filter).await?;
    for r in &records {
        if args.json {
            let mut v = serde_json::to_value(r)?;
            v["created-at"] = serde_json::Value::String(format_utc(r.created_at));
            v["source"]["received-at"] =
                serde_json::Value::String(format_utc(r.source.received_at));
            println!("{v}");
        } else {
            println!(
                "#{} {}/{} {} fields, {} children, from {} \"{}\" at {}",
                r.id,
                r.module,
                r.business_object,
                r.fields.len(),
                r.children.len(),
                r.source.sender,
                r.source.subject,
                format_utc(r.created_at)
            );
        }
    }
    if !args.json {
        println!("{} record(s)", records.len());
    }
    store.close().await;
    Ok(())
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
            ("7d", Some(now - 7 * 86_400)),
            ("30m", Some(now - 1800)),
            ("2024-13-01", None),
            ("yesterday", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_since(input, now).ok(), want, "{input}");
        }
        assert_eq!(format_utc(1_709_287_200), "2024-03-01T10:00:00Z");
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
    }
}
