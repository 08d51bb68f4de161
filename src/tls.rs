//! TLS interception: latchkey's local certificate authority and the per-host leaf
//! certificates it mints for intercepted `CONNECT` tunnels, plus the certificate of
//! latchkey's own TLS listener (`--listen-tls`).
//!
//! This module owns the CA private key and the process-wide leaf key. It must never log or
//! print either, and it always uses the aws-lc-rs rustls provider explicitly rather than the
//! process default. It does not decide *whether* to intercept a host: callers mint only for
//! hosts that policy already allowed.
//!
//! `tls::pem` is the crate's one reader and writer of PEM text (certificates, keys), used by
//! the CA, the upstream client's extra roots, the token key files and the CA bundle.

mod ca;
mod leaf;
pub mod pem;

pub use ca::{CaError, CertificateAuthority};
pub use leaf::{LeafCache, LeafError, ListenerCert, LEAF_CACHE_TTL, LEAF_VALIDITY, LISTENER_NAMES};

use std::sync::Arc;
use std::time::{Duration, SystemTime, SystemTimeError, UNIX_EPOCH};

/// The crypto provider every TLS object in this crate is built with (aws-lc-rs), so the
/// result never depends on which provider some other crate installed as process default.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The roots of the system trust store. Certificates the store cannot parse are skipped: a
/// broken entry must not take the others down.
pub fn system_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    roots
}

/// Add every certificate of the PEM file at `path` to `roots` (an `--upstream-ca` file). `Err`
/// says why in one phrase: unreadable, invalid PEM or certificate, or no certificate at all.
pub fn add_root_file(
    roots: &mut rustls::RootCertStore,
    path: &std::path::Path,
) -> Result<(), String> {
    let data = std::fs::read(path).map_err(|e| e.to_string())?;
    let mut added = 0;
    for cert in pem::certificates(&data) {
        let cert = cert.map_err(|e| format!("invalid PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("invalid certificate: {e}"))?;
        added += 1;
    }
    if added == 0 {
        return Err("no certificate found".into());
    }
    Ok(())
}

/// A client config for outgoing TLS (upstreams, the secret manager): our provider, safe
/// protocol versions, certificates always verified against `roots`, no client certificate.
pub fn client_config(roots: rustls::RootCertStore) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the aws-lc-rs provider supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// The HTTP/1.1 client latchkey uses for its own calls (token endpoints, the secret
/// manager): TLS through [`client_config`] with `roots` (plain `http://` is for the caller
/// to allow or refuse), connects bounded by `connect_timeout`, idle connections kept 30 s.
pub fn own_client(roots: rustls::RootCertStore, connect_timeout: Duration) -> OwnClient {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_config(roots))
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(https)
}

/// See [`own_client`].
pub type OwnClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
>;

/// Sets `not_before = now - backdate` and `not_after = now + lifetime`.
///
/// Computed from `SystemTime` through rcgen's own date constructor so this crate does not
/// need the `time` crate as a direct dependency.
fn set_validity(
    params: &mut rcgen::CertificateParams,
    backdate: Duration,
    lifetime: Duration,
) -> Result<(), SystemTimeError> {
    let now = rcgen::date_time_ymd(1970, 1, 1) + SystemTime::now().duration_since(UNIX_EPOCH)?;
    params.not_before = now - backdate;
    params.not_after = now + lifetime;
    Ok(())
}

/// A random positive serial number of 128 bits (high bit cleared so the DER INTEGER is
/// positive); unique per certificate, since some clients reject a repeated issuer+serial.
fn random_serial() -> rcgen::SerialNumber {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes[0] &= 0x7f;
    // Never zero: a zero serial is not "positive" (RFC 5280 4.1.2.2).
    bytes[15] |= 0x01;
    rcgen::SerialNumber::from_slice(&bytes)
}
