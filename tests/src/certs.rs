//! Certificates for certificate-credential tests: an RSA key made with the
//! `openssl` CLI (ring, rcgen's backend, cannot generate RSA keys) and a
//! self-signed X.509 certificate made with rcgen, with any validity period.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

/// A certificate and its private key, as PEM.
#[derive(Clone)]
pub struct TestCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8 unless made by [`TestCert::with_pkcs1_key`]).
    pub key_pem: String,
    /// The certificate's DER.
    pub der: Vec<u8>,
    /// `notAfter`, epoch seconds.
    pub not_after: i64,
}

/// A fresh 2048-bit RSA private key, PEM PKCS#8.
pub fn rsa_key() -> String {
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .output()
        .expect("run openssl genpkey");
    assert!(out.status.success(), "openssl genpkey failed");
    String::from_utf8(out.stdout).expect("PEM")
}

/// `key_pem` (any PEM RSA private key) as PKCS#1: `-----BEGIN RSA PRIVATE
/// KEY-----`, the "traditional" form older tooling and many PKI exports write.
pub fn pkcs1(key_pem: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(["rsa", "-traditional"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run openssl rsa");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(key_pem.as_bytes())
        .expect("write the key to openssl");
    let out = child.wait_with_output().expect("openssl rsa");
    assert!(out.status.success(), "openssl rsa -traditional failed");
    let pem = String::from_utf8(out.stdout).expect("PEM");
    assert!(
        pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
        "not PKCS#1: {}",
        pem.lines().next().unwrap_or("")
    );
    pem
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl TestCert {
    /// A certificate with a new key, valid from an hour ago for `days` days
    /// from now (negative: already expired).
    pub fn new(days: i64) -> Self {
        Self::with_key(&rsa_key(), now() - 3600, now() + days * 86_400)
    }

    /// A certificate for `key_pem` valid between two epoch seconds.
    pub fn with_key(key_pem: &str, not_before: i64, not_after: i64) -> Self {
        let key = rcgen::KeyPair::from_pem_and_sign_algo(key_pem, &rcgen::PKCS_RSA_SHA256)
            .expect("rcgen reads the RSA key");
        let mut params =
            rcgen::CertificateParams::new(vec!["mailagent-test".to_string()]).expect("params");
        params.not_before =
            time::OffsetDateTime::from_unix_timestamp(not_before).expect("not_before");
        params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).expect("not_after");
        let cert = params.self_signed(&key).expect("self-sign");
        Self {
            cert_pem: cert.pem(),
            key_pem: key_pem.to_string(),
            der: cert.der().to_vec(),
            not_after,
        }
    }

    /// `x5t#S256` of the certificate.
    pub fn x5t_s256(&self) -> String {
        URL_SAFE_NO_PAD.encode(Sha256::digest(&self.der))
    }

    /// The same certificate with its private key in PKCS#1 form.
    pub fn with_pkcs1_key(&self) -> Self {
        Self {
            key_pem: pkcs1(&self.key_pem),
            ..self.clone()
        }
    }

    /// The SHA-1 thumbprint, upper-case hex.
    pub fn thumbprint(&self) -> String {
        use sha1::Digest as _;
        hex::encode_upper(sha1::Sha1::digest(&self.der))
    }

    /// Writes `<name>.crt` and `<name>.key` into `dir` (replacing them
    /// atomically, as a secret mount does); returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        replace(&cert, &self.cert_pem);
        replace(&key, &self.key_pem);
        (cert, key)
    }
}

/// Replaces `path`'s content atomically (write aside, rename).
pub fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp-new");
    std::fs::write(&tmp, content).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}
