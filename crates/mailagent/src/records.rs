//! `mailagent records` (§7): list the records created from forms.

use anyhow::Context as _;
use common::config::Config;
use form_processor::store::{RecordFilter, Store};

use crate::dates::{format_utc, parse_since};

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
