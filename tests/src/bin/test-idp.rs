//! **Test identity provider** as a process (for the demo and end-to-end
//! tests): speaks the Entra ID v2 token endpoint for the client-credentials
//! grant, signing with the key the test Dovecot trusts. Test support only.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use mailagent_tests::idp::{Signer, TestIdp};

/// Test identity provider (Entra ID v2 token endpoint stand-in).
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// RSA private key (PEM); defaults to the test services' key.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Register a client: `CLIENT_ID:SECRET` (repeatable).
    #[arg(long = "client")]
    clients: Vec<String>,
    /// Register a client by a certificate: `CLIENT_ID:PEM_FILE` (repeatable;
    /// the client has no usable secret).
    #[arg(long = "certificate")]
    certificates: Vec<String>,
    /// File to write the bound address to, once listening.
    #[arg(long)]
    addr_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let endpoints = mailagent_tests::env::Endpoints::load();
    let signer = match &args.key {
        Some(path) => Signer::from_pem(
            &std::fs::read(path)?,
            endpoints.get("MAILAGENT_TEST_IDP_KID"),
            endpoints.get("MAILAGENT_TEST_TENANT"),
            endpoints.get("MAILAGENT_TEST_ISSUER"),
            endpoints.get("MAILAGENT_TEST_AUDIENCE"),
        )?,
        None => Signer::trusted(&endpoints),
    };
    let idp = TestIdp::start_with(signer, args.listen).await;
    for c in &args.clients {
        let (id, secret) = c
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("--client takes CLIENT_ID:SECRET"))?;
        idp.register(id, secret);
    }
    for c in &args.certificates {
        let (id, path) = c
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("--certificate takes CLIENT_ID:PEM_FILE"))?;
        let pem = std::fs::read(path)?;
        let der = rustls_pemfile::certs(&mut pem.as_slice())
            .next()
            .ok_or_else(|| anyhow::anyhow!("no certificate in {path}"))??;
        idp.register(id, &format!("unknown-{}", uuid::Uuid::new_v4()));
        idp.add_certificate(id, der.as_ref());
    }
    if let Some(path) = &args.addr_file {
        std::fs::write(path, idp.addr.to_string())?;
    }
    println!(
        "test identity provider listening; token URL {}",
        idp.token_url()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
