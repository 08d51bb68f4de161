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

/// A client config for outgoing TLS (upstreams, the secret manager): our provider, safe
/// protocol versions, certificates always verified against `roots`, no client certificate.
pub fn client_config(roots: rustls::RootCertStore) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the aws-lc-rs provider supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

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
