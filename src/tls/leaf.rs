//! Leaf certificates for intercepted hosts, minted on demand and cached as ready-to-use
//! `Arc<rustls::ServerConfig>`s.
//!
//! One ECDSA P-256 leaf key is generated per process and shared by every leaf (never the CA
//! key): minting is then a single signature. Leaves are short-lived ([`LEAF_VALIDITY`]) and
//! cached for much less ([`LEAF_CACHE_TTL`]), so a cached leaf is never near expiry. The cache
//! key is the normalised host, and concurrent first requests for a host mint once.
//!
//! This module does not check policy: callers must mint only for hosts that were allowed.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SubjectPublicKeyInfo,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;

use super::CertificateAuthority;

/// How long a minted leaf is valid (from 5 minutes before minting).
pub const LEAF_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long a minted leaf stays in the cache; far below [`LEAF_VALIDITY`] so a served leaf
/// always has weeks left.
pub const LEAF_CACHE_TTL: Duration = Duration::from_secs(12 * 3600);
/// Backdating of `notBefore`, for clients whose clock runs a little behind ours.
const LEAF_BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Longest common name X.509 allows (ub-common-name); longer hosts get a SAN only.
const MAX_CN_LEN: usize = 64;
const MAX_DNS_LEN: usize = 253;

/// Why a leaf could not be minted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LeafError {
    /// The host is neither a DNS name (`[a-z0-9.-_]`, at most 253 chars) nor an IP literal.
    #[error("cannot mint a certificate for {host:?}: not a DNS name or IP address")]
    InvalidHost {
        /// The rejected host.
        host: String,
    },
    /// rcgen failed to build or sign the certificate.
    #[error("could not generate a leaf certificate: {0}")]
    Generate(String),
    /// rustls rejected the key or configuration.
    #[error("could not build the TLS server configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Mints leaf certificates signed by the CA and caches one `ServerConfig` per host.
pub struct LeafCache {
    ca: Arc<CertificateAuthority>,
    provider: Arc<CryptoProvider>,
    /// Public half of the process-wide leaf key, embedded in every leaf.
    leaf_spki: SubjectPublicKeyInfo,
    /// Private half, loaded once into rustls.
    signing_key: Arc<dyn rustls::sign::SigningKey>,
    cache: moka::future::Cache<String, Arc<ServerConfig>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SECURITY: no key material; counts only.
        f.debug_struct("LeafCache")
            .field("ca", &self.ca)
            .field("entries", &self.cache.entry_count())
            .field("stats", &self.stats())
            .finish()
    }
}

impl LeafCache {
    /// Generates the process's ECDSA P-256 leaf key (never the CA key) and an empty cache
    /// bounded to `capacity` hosts.
    pub fn try_new(ca: Arc<CertificateAuthority>, capacity: u64) -> Result<LeafCache, LeafError> {
        let provider = super::provider();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| LeafError::Generate(e.to_string()))?;
        let leaf_spki = SubjectPublicKeyInfo::from_der(&key.subject_public_key_info())
            .map_err(|e| LeafError::Generate(e.to_string()))?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = provider.key_provider.load_private_key(der)?;
        // `key` (the rcgen copy of the private key) is dropped here; rustls holds the only one.
        let cache = moka::future::Cache::builder()
            .max_capacity(capacity)
            .time_to_live(LEAF_CACHE_TTL)
            .build();
        Ok(LeafCache {
            ca,
            provider,
            leaf_spki,
            signing_key,
            cache,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// A rustls `ServerConfig` presenting a leaf for `host` with chain `[leaf, CA]` and ALPN
    /// `["h2", "http/1.1"]`. `host` is already normalised (lower-case DNS name or IP literal;
    /// IPv6 may be bracketed). Cached per host; concurrent first calls mint once.
    pub async fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, LeafError> {
        let host = strip_brackets(host);
        // Fast path without allocating the owned key.
        if let Some(config) = self.cache.get(host).await {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(config);
        }
        let minted_here = AtomicBool::new(false);
        let result = self
            .cache
            .try_get_with(host.to_owned(), async {
                minted_here.store(true, Ordering::Relaxed);
                self.mint(host)
            })
            .await;
        // Callers that waited on another caller's mint count as hits: they did not mint.
        if minted_here.load(Ordering::Relaxed) {
            self.misses.fetch_add(1, Ordering::Relaxed);
        } else {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        result.map_err(Arc::unwrap_or_clone)
    }

    /// `(hits, misses)` of [`LeafCache::server_config`], for metrics.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Mints a fresh leaf and its `ServerConfig` without touching the cache (benches, tests).
    pub fn mint(&self, host: &str) -> Result<Arc<ServerConfig>, LeafError> {
        let chain = self.mint_chain(host)?;
        let certified = rustls::sign::CertifiedKey::new(chain, Arc::clone(&self.signing_key));
        let resolver = rustls::sign::SingleCertAndKey::from(Arc::new(certified));
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        // `http/1.0` too: curl --http1.0 offers only that, and rustls refuses a handshake
        // whose ALPN list shares nothing with ours; the tunnel serves it as HTTP/1.x.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
        Ok(Arc::new(config))
    }

    /// Signs a new leaf for `host`; returns the chain `[leaf, CA]`.
    fn mint_chain(&self, host: &str) -> Result<Vec<CertificateDer<'static>>, LeafError> {
        let host = strip_brackets(host);
        let san = san_for(host)?;
        sign_leaf(&self.ca, &self.leaf_spki, host, vec![san])
    }
}

/// Signs a leaf for `sans` with the CA (common name `cn` when short enough); returns the
/// chain `[leaf, CA]`.
fn sign_leaf(
    ca: &CertificateAuthority,
    spki: &SubjectPublicKeyInfo,
    cn: &str,
    sans: Vec<SanType>,
) -> Result<Vec<CertificateDer<'static>>, LeafError> {
    let generate = |e: rcgen::Error| LeafError::Generate(e.to_string());
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if cn.len() < MAX_CN_LEN {
        dn.push(DnType::CommonName, cn);
    }
    // With an empty subject rcgen marks the SAN critical, as RFC 5280 requires.
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    // NoCa: no basicConstraints and, importantly, no SKI: a leaf SKI equal to the CA's
    // breaks SChannel (mitmproxy#6494), and clients do not need one on a leaf.
    params.is_ca = IsCa::NoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    // SECURITY: a fresh random serial per leaf; clients may reject a repeated
    // issuer+serial pair with a different certificate (httpjail's fixed-serial pitfall).
    params.serial_number = Some(super::random_serial());
    super::set_validity(&mut params, LEAF_BACKDATE, LEAF_VALIDITY)
        .map_err(|e| LeafError::Generate(e.to_string()))?;
    let cert = params.signed_by(spki, ca.issuer()).map_err(generate)?;
    Ok(vec![cert.der().clone(), ca.cert_der().clone()])
}

/// The names latchkey's own TLS listener (`--listen-tls`) always answers to.
pub const LISTENER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The certificate of latchkey's own TLS listener (`--listen-tls`): a leaf signed by the CA
/// for [`LISTENER_NAMES`] and the operator's `--tls-name`s, so agents that trust `ca.crt`
/// trust the listener. Its key is its own (not the interception leaves' key). Re-minted once
/// it is older than [`LEAF_CACHE_TTL`], so a long-running latchkey never serves a leaf near
/// the end of its [`LEAF_VALIDITY`].
pub struct ListenerCert {
    ca: Arc<CertificateAuthority>,
    sans: Vec<SanType>,
    spki: SubjectPublicKeyInfo,
    signing_key: Arc<dyn rustls::sign::SigningKey>,
    current: std::sync::Mutex<(std::time::Instant, Arc<rustls::sign::CertifiedKey>)>,
}

impl std::fmt::Debug for ListenerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SECURITY: no key material; the names only.
        f.debug_struct("ListenerCert")
            .field("names", &self.sans)
            .finish()
    }
}

impl ListenerCert {
    /// A listener certificate for [`LISTENER_NAMES`] plus `extra` (DNS names or IP
    /// literals; anything else is refused, naming it).
    pub fn try_new(
        ca: Arc<CertificateAuthority>,
        extra: &[String],
    ) -> Result<ListenerCert, LeafError> {
        let mut sans = Vec::new();
        for name in LISTENER_NAMES
            .iter()
            .copied()
            .chain(extra.iter().map(String::as_str))
        {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            let san = san_for(strip_brackets(&name))?;
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
        let provider = super::provider();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| LeafError::Generate(e.to_string()))?;
        let spki = SubjectPublicKeyInfo::from_der(&key.subject_public_key_info())
            .map_err(|e| LeafError::Generate(e.to_string()))?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = provider.key_provider.load_private_key(der)?;
        let chain = sign_leaf(&ca, &spki, LISTENER_NAMES[0], sans.clone())?;
        let certified = Arc::new(rustls::sign::CertifiedKey::new(
            chain,
            Arc::clone(&signing_key),
        ));
        Ok(ListenerCert {
            ca,
            sans,
            spki,
            signing_key,
            current: std::sync::Mutex::new((std::time::Instant::now(), certified)),
        })
    }

    /// The listener's `ServerConfig`: this certificate, ALPN `http/1.1` only (the proxy
    /// and gateway speak HTTP/1.1 to agents; tunnels negotiate their own TLS inside).
    pub fn server_config(self) -> Result<Arc<ServerConfig>, LeafError> {
        let mut config = ServerConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(self));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    fn current(&self) -> Arc<rustls::sign::CertifiedKey> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.0.elapsed() >= LEAF_CACHE_TTL {
            match sign_leaf(&self.ca, &self.spki, LISTENER_NAMES[0], self.sans.clone()) {
                Ok(chain) => {
                    let certified =
                        rustls::sign::CertifiedKey::new(chain, Arc::clone(&self.signing_key));
                    *current = (std::time::Instant::now(), Arc::new(certified));
                }
                // The served leaf still has weeks left: keep it and try again next time.
                Err(e) => {
                    tracing::error!(error = %e, "cannot renew the TLS listener's certificate")
                }
            }
        }
        Arc::clone(&current.1)
    }
}

impl rustls::server::ResolvesServerCert for ListenerCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }
}

/// `[::1]` -> `::1`; anything else unchanged.
fn strip_brackets(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// An IP SAN for IP literals, a DNS SAN for names. Rejects anything else rather than minting
/// a certificate with a surprising name.
fn san_for(host: &str) -> Result<SanType, LeafError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let invalid = || LeafError::InvalidHost {
        host: host.chars().take(MAX_DNS_LEN + 8).collect(),
    };
    let valid = !host.is_empty()
        && host.len() <= MAX_DNS_LEN
        && !host.starts_with('.')
        && !host.ends_with('.')
        && !host.contains("..")
        && host.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
        });
    if !valid {
        return Err(invalid());
    }
    let name = host.to_owned().try_into().map_err(|_| invalid())?;
    Ok(SanType::DnsName(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use std::collections::HashSet;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn ca() -> (tempfile::TempDir, Arc<CertificateAuthority>) {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = CertificateAuthority::load_or_create(dir.path()).unwrap();
        (dir, Arc::new(ca))
    }

    fn client_config(ca: &CertificateAuthority) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(super::super::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// A real TLS handshake over an in-memory pipe; returns the negotiated ALPN protocol and
    /// the number of certificates the server sent.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<rustls::ClientConfig>,
        name: &str,
    ) -> Result<(Option<Vec<u8>>, usize), std::io::Error> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let connector = tokio_rustls::TlsConnector::from(client);
        let server_name = ServerName::try_from(name.to_owned()).unwrap();
        let server_task = tokio::spawn(async move {
            let mut tls = acceptor.accept(server_io).await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            tls.write_all(&buf).await?;
            tls.shutdown().await?;
            Ok::<_, std::io::Error>(())
        });
        let mut tls = connector.connect(server_name, client_io).await?;
        tls.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"ping");
        let (_, conn) = tls.get_ref();
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        let chain_len = conn.peer_certificates().map_or(0, <[_]>::len);
        server_task.await.unwrap()?;
        Ok((alpn, chain_len))
    }

    /// The serial INTEGER of a DER certificate (Certificate -> tbsCertificate -> [0] version
    /// -> serialNumber), parsed by hand to avoid a parser dependency.
    fn serial_of(der: &[u8]) -> Vec<u8> {
        fn header(d: &[u8]) -> (u8, usize, usize) {
            let tag = d[0];
            let first = d[1];
            if first < 0x80 {
                (tag, 2, usize::from(first))
            } else {
                let n = usize::from(first & 0x7f);
                let len = d[2..2 + n]
                    .iter()
                    .fold(0usize, |acc, b| acc << 8 | usize::from(*b));
                (tag, 2 + n, len)
            }
        }
        let (_, h, _) = header(der); // Certificate SEQUENCE
        let tbs = &der[h..];
        let (_, h, _) = header(tbs); // tbsCertificate SEQUENCE
        let mut rest = &tbs[h..];
        let (tag, h, len) = header(rest);
        if tag == 0xa0 {
            rest = &rest[h + len..]; // skip [0] version
        }
        let (tag, h, len) = header(rest);
        assert_eq!(tag, 0x02, "serial is an INTEGER");
        rest[h..h + len].to_vec()
    }

    fn mint_der(leaves: &LeafCache, host: &str) -> Vec<u8> {
        let chain = leaves.mint_chain(host).unwrap();
        assert_eq!(chain.len(), 2);
        chain[0].to_vec()
    }

    #[tokio::test]
    async fn a_leaf_for_a_dns_name_verifies_with_a_rustls_client() {
        let (_dir, ca) = ca();
        let leaves = LeafCache::try_new(Arc::clone(&ca), 100).unwrap();
        let server = leaves.server_config("api.example.test").await.unwrap();
        let (alpn, chain) = handshake(server, client_config(&ca), "api.example.test")
            .await
            .unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(chain, 2, "chain is [leaf, CA]");
    }

    #[tokio::test]
    async fn a_leaf_for_an_ip_literal_verifies_with_a_rustls_client() {
        let (_dir, ca) = ca();
        let leaves = LeafCache::try_new(Arc::clone(&ca), 100).unwrap();
        let server = leaves.server_config("127.0.0.1").await.unwrap();
        handshake(server, client_config(&ca), "127.0.0.1")
            .await
            .unwrap();
        let server = leaves.server_config("[::1]").await.unwrap();
        handshake(server, client_config(&ca), "::1").await.unwrap();
    }

    #[tokio::test]
    async fn a_leaf_does_not_verify_for_another_name() {
        let (_dir, ca) = ca();
        let leaves = LeafCache::try_new(Arc::clone(&ca), 100).unwrap();
        let server = leaves.server_config("api.example.test").await.unwrap();
        let err = handshake(server, client_config(&ca), "evil.example.test")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not valid for name"), "{err}");
    }

    #[tokio::test]
    async fn the_listener_certificate_covers_loopback_names_and_tls_names_only() {
        let (_dir, ca) = ca();
        let server = ListenerCert::try_new(Arc::clone(&ca), &["Latchkey.Internal.".into()])
            .and_then(ListenerCert::server_config)
            .unwrap();
        for name in ["localhost", "127.0.0.1", "::1", "latchkey.internal"] {
            let (alpn, chain) = handshake(Arc::clone(&server), client_config(&ca), name)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            // HTTP/1.1 only: the proxy and the gateway speak nothing else to agents.
            assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]), "{name}");
            assert_eq!(chain, 2, "{name}");
        }
        let err = handshake(server, client_config(&ca), "evil.example.test")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not valid for name"), "{err}");
        for bad in ["not a name", "*.example.com", ""] {
            let err = ListenerCert::try_new(Arc::clone(&ca), &[bad.into()]).unwrap_err();
            assert!(matches!(err, LeafError::InvalidHost { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn the_listener_key_is_its_own_and_not_shown_in_debug() {
        let (_dir, ca) = ca();
        let cert = ListenerCert::try_new(Arc::clone(&ca), &[]).unwrap();
        let leaves = LeafCache::try_new(Arc::clone(&ca), 100).unwrap();
        let spki = cert.spki.der_bytes().to_vec();
        assert!(!ca
            .cert_der()
            .windows(spki.len())
            .any(|w| w == spki.as_slice()));
        assert_ne!(spki, leaves.leaf_spki.der_bytes());
        // The served leaf carries that key.
        let leaf = cert.current().cert[0].clone();
        assert!(leaf.windows(spki.len()).any(|w| w == spki.as_slice()));
        let debug = format!("{cert:?}");
        assert!(
            debug.contains("ListenerCert") && !debug.contains("signing"),
            "{debug}"
        );
    }

    #[tokio::test]
    async fn a_leaf_does_not_verify_against_another_ca() {
        let (_dir, ca) = ca();
        let (_other_dir, other) = self::ca();
        let leaves = LeafCache::try_new(ca, 100).unwrap();
        let server = leaves.server_config("api.example.test").await.unwrap();
        assert!(handshake(server, client_config(&other), "api.example.test")
            .await
            .is_err());
    }

    #[tokio::test]
    async fn alpn_offers_h2_then_http11_then_http10() {
        let (_dir, ca) = ca();
        let leaves = LeafCache::try_new(Arc::clone(&ca), 100).unwrap();
        let server = leaves.server_config("api.example.test").await.unwrap();
        assert_eq!(
            server.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()]
        );
        let mut only_h1 = (*client_config(&ca)).clone();
        only_h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        let (alpn, _) = handshake(server.clone(), Arc::new(only_h1), "api.example.test")
            .await
            .unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
        // curl --http1.0 offers only `http/1.0`.
        let mut only_h10 = (*client_config(&ca)).clone();
        only_h10.alpn_protocols = vec![b"http/1.0".to_vec()];
        let (alpn, _) = handshake(server, Arc::new(only_h10), "api.example.test")
            .await
            .unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"http/1.0"[..]));
    }

    #[tokio::test]
    async fn concurrent_first_requests_for_one_host_mint_once() {
        let (_dir, ca) = ca();
        let leaves = Arc::new(LeafCache::try_new(ca, 100).unwrap());
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let leaves = Arc::clone(&leaves);
                tokio::spawn(async move { leaves.server_config("api.example.test").await })
            })
            .collect();
        let mut configs = Vec::new();
        for t in tasks {
            configs.push(t.await.unwrap().unwrap());
        }
        assert!(configs.iter().all(|c| Arc::ptr_eq(c, &configs[0])));
        assert_eq!(leaves.stats(), (31, 1));
        leaves.server_config("api.example.test").await.unwrap();
        assert_eq!(leaves.stats(), (32, 1));
    }

    #[test]
    fn serials_are_unique_across_hosts_and_reissues() {
        let (_dir, ca) = ca();
        let leaves = LeafCache::try_new(Arc::clone(&ca), 100).unwrap();
        let mut serials = HashSet::new();
        for i in 0..50 {
            let host = format!("h{}.example.test", i % 5);
            let der = mint_der(&leaves, &host);
            let serial = serial_of(&der);
            assert!(serial[0] & 0x80 == 0, "serial is positive");
            assert!(serial.len() <= 17);
            assert!(serials.insert(serial), "duplicate serial at {i}");
        }
        assert_ne!(
            serial_of(ca.cert_der()),
            serial_of(&mint_der(&leaves, "a.test"))
        );
    }

    #[test]
    fn leaf_has_aki_of_the_ca_and_no_ski() {
        let (_dir, ca) = ca();
        let leaves = LeafCache::try_new(Arc::clone(&ca), 100).unwrap();
        let der = mint_der(&leaves, "api.example.test");
        let ski_oid = [0x06, 0x03, 0x55, 0x1d, 0x0e];
        let aki_oid = [0x06, 0x03, 0x55, 0x1d, 0x23];
        let eku_server_auth = [0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
        assert!(!der.windows(5).any(|w| w == ski_oid), "leaf has no SKI");
        assert!(der.windows(5).any(|w| w == aki_oid), "leaf has an AKI");
        assert!(der.windows(8).any(|w| w == eku_server_auth));
        // The CA's SKI value: OID, OCTET STRING wrapper, inner OCTET STRING of 20 bytes.
        let ca_der = ca.cert_der().as_ref();
        let at = ca_der.windows(5).position(|w| w == ski_oid).unwrap();
        let ski = &ca_der[at + 5 + 4..at + 5 + 4 + 20];
        assert_eq!(ca_der[at + 5 + 2], 0x04);
        assert!(der.windows(20).any(|w| w == ski), "AKI equals the CA's SKI");
    }

    #[test]
    fn long_hosts_get_no_common_name_and_bad_hosts_are_refused() {
        let (_dir, ca) = ca();
        let leaves = LeafCache::try_new(ca, 100).unwrap();
        let long = format!("{}.example.test", "a".repeat(60));
        let der = mint_der(&leaves, &long);
        let cn_oid = [0x06, 0x03, 0x55, 0x04, 0x03];
        // The only CN left is the issuer's.
        assert_eq!(der.windows(5).filter(|w| *w == cn_oid).count(), 1);
        for bad in [
            "",
            "Upper.example",
            "a b",
            "a..b",
            ".a",
            "a/b",
            "*.example.com",
        ] {
            assert!(
                matches!(leaves.mint(bad), Err(LeafError::InvalidHost { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_leaf_key_is_not_the_ca_key() {
        let (_dir, ca) = ca();
        let leaves = LeafCache::try_new(Arc::clone(&ca), 100).unwrap();
        let leaf_spki = leaves.leaf_spki.der_bytes().to_vec();
        assert!(!ca
            .cert_der()
            .windows(leaf_spki.len())
            .any(|w| w == leaf_spki.as_slice()));
    }
}
