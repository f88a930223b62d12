//! `[tls]`: trust settings shared by every outgoing TLS connection.

use std::path::PathBuf;

use figment::value::Dict;
use serde::Serialize;

use crate::config::reader::{join, Walker};
use crate::config::section::Section;

/// `[tls]`: trust settings shared by every outgoing TLS connection.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TlsConfig {
    /// PEM file of further CA certificates, added to the platform/webpki roots.
    pub extra_ca_file: Option<PathBuf>,
}

/// Reads `[tls]` from the top-level `tree`, checking that the extra CA
/// file holds a certificate.
pub(super) fn parse(w: &mut Walker, tree: &Dict) -> TlsConfig {
    let t = w.section(tree, Section::Tls);
    let p = Section::Tls.key();
    w.unknown_keys(t, p, &["extra-ca-file"]);
    let extra_ca_file = w.string(t, p, "extra-ca-file").map(PathBuf::from);
    if let Some(path) = &extra_ca_file {
        w.check_ca_file(path, &join(p, "extra-ca-file"));
    }
    TlsConfig { extra_ca_file }
}
