//! `lab-relay`: an iroh relay for the lab's network namespaces, built from the `iroh-relay`
//! crate with its `server` feature. It runs only inside the lab VM (which has no network card),
//! so the NAT scenarios never touch n0's public relays.
//!
//! `lab-relay <ip> <cert.pem>`: serves relaying over HTTPS on `<ip>:443` and QUIC address
//! discovery on `<ip>:7842` (without it a peer behind NAT learns only its private addresses
//! and cannot hole-punch), with a fresh self-signed certificate for `<ip>` whose PEM it writes
//! to `<cert.pem>` (its key beside it, reused by a restart) for the peers' `relay_ca`. Prints `lab-relay: ready https://<ip>/` once
//! both listen, and stops on SIGTERM. `lab-relay --cert-only <ip> <cert.pem>` only writes a
//! fresh certificate: one the peers must not trust.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use iroh_relay::server::{CertConfig, QuicConfig, RelayConfig, Server, ServerConfig, TlsConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// iroh's default port for QUIC address discovery, which a `RelayMode::custom` URL implies.
const QUIC_PORT: u16 = 7842;

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let cert_only = args.first().is_some_and(|a| a == "--cert-only");
    if cert_only {
        args.remove(0);
    }
    let [ip, cert_out] = &args[..] else {
        anyhow::bail!("usage: lab-relay [--cert-only] <ip> <cert.pem>");
    };
    let ip: IpAddr = ip
        .parse()
        .with_context(|| format!("`{ip}` is not an IP address"))?;
    let (cert, key) = certificate(ip, Path::new(cert_out), cert_only)?;
    if cert_only {
        return Ok(());
    }
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .context("the relay's certificate")?;
    let mut relay = RelayConfig::new(SocketAddr::new(ip, 80));
    relay.tls = Some(TlsConfig::new(
        SocketAddr::new(ip, 443),
        CertConfig::Manual { server_config: tls },
    ));
    let mut config = ServerConfig::default();
    config.relay = Some(relay);
    // The QUIC listener inherits the relay's TLS configuration.
    config.quic = Some(QuicConfig::new(SocketAddr::new(ip, QUIC_PORT)));
    let mut server = Server::spawn(config).await.context("starting the relay")?;
    println!(
        "lab-relay: ready https://{ip}/ (https {:?}, quic {:?})",
        server.https_addr(),
        server.quic_addr()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        r = server.join() => anyhow::bail!("the relay stopped: {r:?}"),
    }
    server.shutdown().await.context("stopping the relay")?;
    Ok(())
}

/// The relay's certificate and key: the ones beside `cert_out` from an earlier start (a
/// restarted relay keeps the certificate its peers trust), else a fresh self-signed pair for
/// `ip`, written there. `fresh` always makes a new one.
fn certificate(
    ip: IpAddr,
    cert_out: &Path,
    fresh: bool,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let key_out = cert_out.with_extension("key");
    if !fresh && cert_out.exists() && key_out.exists() {
        let cert = CertificateDer::from_pem_file(cert_out).context("reading the certificate")?;
        let key = PrivateKeyDer::from_pem_file(&key_out).context("reading the key")?;
        return Ok((cert, key));
    }
    let made = rcgen::generate_simple_self_signed(vec![ip.to_string()])
        .context("generating the relay's certificate")?;
    std::fs::write(cert_out, made.cert.pem())
        .with_context(|| format!("writing {}", cert_out.display()))?;
    std::fs::write(&key_out, made.signing_key.serialize_pem())
        .with_context(|| format!("writing {}", key_out.display()))?;
    let key = PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into());
    Ok((made.cert.der().clone(), key))
}
