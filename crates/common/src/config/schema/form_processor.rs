//! `[form-processor]`: the record store and the limits on forms.

use figment::value::Dict;
use serde::Serialize;

use crate::config::reader::Walker;
use crate::config::section::Section;
use crate::secret::SecretUrl;

/// `[form-processor]`
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FormProcessorConfig {
    /// `sqlite://path` (default) or `postgres://…` (a secret: may hold a password).
    pub store: SecretUrl,
    /// Messages in flight at once (AMQP prefetch).
    pub prefetch: u16,
    /// Deliveries of one dedupe key before it is dead-lettered unprocessed.
    pub delivery_limit: u32,
    /// Whose `Authentication-Results` headers `require-authenticated-sender`
    /// believes: authserv-ids (RFC 8601) of the receiving side, and/or
    /// `exchange-online` for Exchange Online's id-less header (trusted by its
    /// position above the `Received` from the sender).
    pub trusted_authserv_ids: Vec<String>,
    /// Largest accepted workbook attachment, bytes.
    pub max_workbook_bytes: u64,
    /// Largest total decompressed size of a workbook's zip entries, bytes.
    pub max_decompressed_bytes: u64,
    /// Most worksheets in one workbook.
    pub max_sheets: u32,
    /// Most rows read from one worksheet.
    pub max_rows: u32,
    /// Most cells read from one workbook.
    pub max_cells: u64,
    /// Deepest MIME nesting accepted.
    pub max_mime_depth: u32,
    /// Most MIME parts accepted.
    pub max_mime_parts: u32,
    /// SQLite's `synchronous` setting for the record store.
    pub sqlite_synchronous: SqliteSynchronous,
}

/// `[form-processor] sqlite-synchronous`: how SQLite makes a commit durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SqliteSynchronous {
    /// Every commit is on disk before it returns (the default): a record
    /// acked to RabbitMQ — and its mail then flagged or deleted — survives
    /// a power loss.
    #[default]
    Full,
    /// WAL commits are synced at checkpoints only: faster, but a power loss
    /// can roll back the last commits after their mails were acked.
    Normal,
}

impl SqliteSynchronous {
    /// The value for `PRAGMA synchronous`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "FULL",
            Self::Normal => "NORMAL",
        }
    }
}

/// Reads `[form-processor]` from the top-level `tree`.
pub(super) fn parse(w: &mut Walker, tree: &Dict) -> FormProcessorConfig {
    let t = w.section(tree, Section::FormProcessor);
    let p = Section::FormProcessor.key();
    w.unknown_keys(
        t,
        p,
        &[
            "store",
            "store-file",
            "prefetch",
            "delivery-limit",
            "trusted-authserv-ids",
            "max-workbook-bytes",
            "max-decompressed-bytes",
            "max-sheets",
            "max-rows",
            "max-cells",
            "max-mime-depth",
            "max-mime-parts",
            "sqlite-synchronous",
        ],
    );
    let store = w.secret_url(
        t,
        p,
        "store",
        "sqlite://data/records.db",
        &["sqlite", "postgres", "postgresql"],
    );
    let sqlite_synchronous = match w.string(t, p, "sqlite-synchronous").as_deref() {
        None | Some("full") => SqliteSynchronous::Full,
        Some("normal") => SqliteSynchronous::Normal,
        Some(other) => {
            w.err(
                format!("{p}.sqlite-synchronous"),
                format!("unknown setting {other:?}: expected \"full\" (default) or \"normal\""),
            );
            SqliteSynchronous::Full
        }
    };
    let trusted_authserv_ids = w.string_list(t, p, "trusted-authserv-ids");
    for (i, id) in trusted_authserv_ids.iter().enumerate() {
        // An authserv-id is an RFC 2045 token (in practice a host name).
        if id
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "()<>@,;:\\\"/[]?=".contains(c))
        {
            w.err(
                format!("{p}.trusted-authserv-ids[{i}]"),
                format!(
                    "{id:?} is not an authserv-id: expected the receiving server's host name as it \
                     opens its Authentication-Results headers (e.g. \"mx.contoso.com\"), or \
                     \"exchange-online\""
                ),
            );
        }
    }
    FormProcessorConfig {
        store,
        prefetch: w.int_in(t, p, "prefetch", 1, 65535, 64) as u16,
        delivery_limit: w.int_in(t, p, "delivery-limit", 1, 1000, 5) as u32,
        trusted_authserv_ids,
        max_workbook_bytes: w.int_in(t, p, "max-workbook-bytes", 1024, 1 << 34, 10 << 20),
        max_decompressed_bytes: w.int_in(t, p, "max-decompressed-bytes", 1024, 1 << 36, 100 << 20),
        max_sheets: w.int_in(t, p, "max-sheets", 1, 10_000, 64) as u32,
        max_rows: w.int_in(t, p, "max-rows", 1, 10_000_000, 200_000) as u32,
        max_cells: w.int_in(t, p, "max-cells", 1, 1 << 32, 2_000_000),
        max_mime_depth: w.int_in(t, p, "max-mime-depth", 1, 1000, 20) as u32,
        max_mime_parts: w.int_in(t, p, "max-mime-parts", 1, 100_000, 500) as u32,
        sqlite_synchronous,
    }
}
