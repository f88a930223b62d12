//! Outgoing TLS with rustls: the platform roots and webpki roots, plus the
//! optional `[tls] extra-ca-file`. Verification is always on.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use crate::error::{Error, Result};

/// The root store: webpki roots, platform roots, and the extra CA file.
pub fn root_store(extra_ca_file: Option<&Path>) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = extra_ca_file {
        for cert in read_certs(path)? {
            roots
                .add(cert)
                .map_err(|e| Error::Tls(format!("cannot use CA in {}: {e}", path.display())))?;
        }
    }
    Ok(roots)
}

/// Reads the PEM certificates of a file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        action: format!("read CA file {}", path.display()),
        source,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Tls(format!("cannot parse {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// A rustls client configuration with verification on.
pub fn client_config(extra_ca_file: Option<&Path>) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(root_store(extra_ca_file)?)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What a certificate the server presented is wrong with, in an operator's
/// words (the same wording in the fetchers' logs, `mailagent test-connection`
/// and connection errors to Redis and RabbitMQ).
pub fn certificate_cause(err: &rustls::Error) -> String {
    use rustls::CertificateError;
    match err {
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => {
            "the server's certificate has expired".into()
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => {
            "the server's certificate is not valid yet (check the clocks)".into()
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "the server's certificate is not valid for this host name (wrong host?)".into(),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "untrusted certificate: self-signed or signed by a CA not in the trust store (add the CA with [tls] extra-ca-file)".into()
        }
        // A self-signed certificate whose name equals a trusted root's
        // (Debian's snakeoil "localhost" is one) fails this way.
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
            "untrusted certificate: its signature does not verify against the trusted CA of that name (self-signed, or not the certificate that CA issued)".into()
        }
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => {
            "the server's certificate has been revoked".into()
        }
        rustls::Error::InvalidCertificate(_) => format!("the server's certificate was refused: {err}"),
        rustls::Error::InvalidMessage(_) => {
            "the server does not speak TLS on this port (plaintext port, or wrong port)".into()
        }
        other => format!("TLS failed: {other}"),
    }
}

/// Finds a TLS problem inside an I/O error from a handshake (tokio-rustls
/// wraps the `rustls::Error` in the `io::Error`) and says what it means.
pub fn handshake_cause(err: &std::io::Error) -> Option<String> {
    let inner = err.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(certificate_cause(inner))
}

/// What a trial TLS handshake with a server found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The server speaks TLS and its certificate verified.
    Verified,
    /// The server speaks TLS but its certificate was refused: the cause.
    Refused(String),
    /// The server answered, but not with TLS.
    NotTls,
    /// Nothing to learn: no connection, a timeout, or an unexpected error.
    Inconclusive(String),
}

/// Tries a TLS handshake with `host:port`, verified as the agents verify
/// (the roots of [`client_config`]), to explain a failed connection: a
/// certificate problem, or TLS spoken where plaintext was expected or the
/// other way round. Sends nothing after the handshake.
pub async fn probe(
    host: &str,
    port: u16,
    extra_ca_file: Option<&Path>,
    timeout: std::time::Duration,
) -> Probe {
    let config = match client_config(extra_ca_file) {
        Ok(c) => c,
        Err(e) => return Probe::Inconclusive(e.to_string()),
    };
    let name = match rustls::pki_types::ServerName::try_from(host.to_string()) {
        Ok(n) => n,
        Err(e) => return Probe::Inconclusive(e.to_string()),
    };
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect((host, port)).await?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map(|_| ())
    };
    match tokio::time::timeout(timeout, attempt).await {
        Err(_) => Probe::Inconclusive("timed out".into()),
        Ok(Ok(())) => Probe::Verified,
        Ok(Err(e)) => match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::InvalidMessage(_)) => Probe::NotTls,
            Some(inner @ rustls::Error::InvalidCertificate(_)) => {
                Probe::Refused(certificate_cause(inner))
            }
            Some(inner) => Probe::Inconclusive(inner.to_string()),
            None => Probe::Inconclusive(e.to_string()),
        },
    }
}

/// The roots of [`root_store`] as one PEM text, for clients that take a PEM
/// bundle in place of the platform roots (redis-rs `build_with_tls`): the
/// platform roots and the extra CA file. (webpki's built-in roots exist only
/// as trust anchors, not certificates, so they are not in it.)
pub fn roots_pem(extra_ca_file: &Path) -> Result<Vec<u8>> {
    use base64::Engine;
    let mut certs: Vec<CertificateDer<'static>> = Vec::new();
    for cert in rustls_native_certs::load_native_certs().certs {
        // Only what a root store accepts: one unreadable platform
        // certificate must not make the whole bundle unusable.
        if RootCertStore::empty().add(cert.clone()).is_ok() {
            certs.push(cert);
        }
    }
    certs.extend(read_certs(extra_ca_file)?);
    let mut pem = String::new();
    for cert in &certs {
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    Ok(pem.into_bytes())
}

/// The transport under a mail session: plaintext (before STARTTLS/STLS, or
/// with `allow-insecure`) or TLS.
pub enum MailStream {
    /// Plaintext (only with `allow-insecure`, or before STARTTLS).
    Plain(tokio::net::TcpStream),
    /// TLS.
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

impl std::fmt::Debug for MailStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Plain(_) => f.write_str("MailStream::Plain"),
            Self::Tls(_) => f.write_str("MailStream::Tls"),
        }
    }
}

impl tokio::io::AsyncRead for MailStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for MailStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
