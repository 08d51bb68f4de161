//! The local certificate authority: `certs/ca.crt` (handed to agents) and `certs/ca.key`
//! (mode 0600, never leaves this process).
//!
//! The CA is ECDSA P-256, `CA:true, pathlen:0` (it may sign leaves only, never another CA),
//! valid ten years with `notBefore` backdated a day to tolerate clock skew. This module must
//! never print the key: `Debug` shows the subject and fingerprint only.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

const CERT_FILE: &str = "ca.crt";
const KEY_FILE: &str = "ca.key";
/// Subject common name of a CA created by latchkey.
pub(crate) const CA_COMMON_NAME: &str = "latchkey local CA";
const CA_ORGANIZATION: &str = "latchkey";
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const CA_BACKDATE: Duration = Duration::from_secs(24 * 3600);

/// Why the CA could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Exactly one of the two files exists; we refuse to guess (regenerating would silently
    /// invalidate the CA agents already trust).
    #[error("{} exists but {} is missing", present.display(), missing.display())]
    HalfPresent {
        /// The file that exists.
        present: PathBuf,
        /// The file that does not.
        missing: PathBuf,
    },
    /// Neither file exists (from [`CertificateAuthority::load`]).
    #[error("no CA in {}: {} not found (run `latchkey ca init`)", dir.display(), CERT_FILE)]
    Missing {
        /// The certs directory.
        dir: PathBuf,
    },
    /// A filesystem operation failed.
    #[error("could not access {}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The certificate file holds no parseable certificate.
    #[error("could not parse the CA certificate {}: {reason}", path.display())]
    BadCertificate {
        /// The certificate file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The key file holds no parseable private key (the reason never includes key bytes).
    #[error("could not parse the CA private key {}: {reason}", path.display())]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The key in `ca.key` is not the key of the certificate in `ca.crt`.
    #[error("the private key {} does not match the certificate {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// Key generation or signing failed while creating a new CA.
    #[error("could not generate the CA: {0}")]
    Generate(String),
}

/// latchkey's certificate authority: the CA certificate and the issuer (signing key) used to
/// mint leaf certificates.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    fingerprint: String,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SECURITY: the signing key is deliberately absent.
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl CertificateAuthority {
    /// Loads `certs_dir/ca.crt` + `ca.key`, or creates both (directory created 0700 if
    /// missing; `ca.key` 0600, written atomically) when neither exists. Returns the CA and
    /// whether it was created.
    pub fn load_or_create(certs_dir: &Path) -> Result<(CertificateAuthority, bool), CaError> {
        let cert_path = certs_dir.join(CERT_FILE);
        let key_path = certs_dir.join(KEY_FILE);
        if exists(&cert_path)? || exists(&key_path)? {
            return Self::load(certs_dir).map(|ca| (ca, false));
        }
        Self::create(certs_dir).map(|ca| (ca, true))
    }

    /// Loads `certs_dir/ca.crt` and `certs_dir/ca.key`; checks that they belong together.
    pub fn load(certs_dir: &Path) -> Result<CertificateAuthority, CaError> {
        let cert_path = certs_dir.join(CERT_FILE);
        let key_path = certs_dir.join(KEY_FILE);
        match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => {}
            (false, false) => {
                return Err(CaError::Missing {
                    dir: certs_dir.to_path_buf(),
                })
            }
            (true, false) => {
                return Err(CaError::HalfPresent {
                    present: cert_path,
                    missing: key_path,
                })
            }
            (false, true) => {
                return Err(CaError::HalfPresent {
                    present: key_path,
                    missing: cert_path,
                })
            }
        }
        let cert_pem = fs::read_to_string(&cert_path).map_err(|source| CaError::Io {
            path: cert_path.clone(),
            source,
        })?;
        let key_pem =
            Zeroizing::new(fs::read_to_string(&key_path).map_err(|source| CaError::Io {
                path: key_path.clone(),
                source,
            })?);
        Self::from_pem(&cert_pem, &key_pem, &cert_path, &key_path)
    }

    fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<CertificateAuthority, CaError> {
        let bad_cert = |reason: String| CaError::BadCertificate {
            path: cert_path.to_path_buf(),
            reason,
        };
        let bad_key = |reason: String| CaError::BadKey {
            path: key_path.to_path_buf(),
            reason,
        };
        let cert_der = super::pem::first_certificate(cert_pem.as_bytes())
            .map_err(|e| bad_cert(e.to_string()))?;
        // SECURITY: parse errors are mapped to fixed descriptions; they never echo file bytes.
        let key_der = super::pem::private_key(key_pem.as_bytes())
            .map_err(|_| bad_key("no PEM private key found".to_owned()))?;
        let provider = super::provider();
        rustls::sign::CertifiedKey::from_der(
            vec![cert_der.clone()],
            key_der.clone_key(),
            &provider,
        )
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => CaError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            },
            rustls::Error::General(_) => bad_key("unsupported or malformed key".to_owned()),
            other => bad_cert(other.to_string()),
        })?;
        let key_pair = KeyPair::try_from(&key_der)
            .map_err(|_| bad_key("unsupported or malformed key".to_owned()))?;
        // Reading the issuer from the certificate (not from fresh params) makes every leaf's
        // AKI equal to the SKI actually present in ca.crt, which strict chain builders check.
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key_pair).map_err(|e| bad_cert(e.to_string()))?;
        let fingerprint = fingerprint_of(&cert_der);
        // Normalise to the single certificate we parsed, so `cert_pem` and `cert_der` agree.
        let cert_pem = super::pem::encode_certificate(&cert_der);
        Ok(CertificateAuthority {
            cert_pem,
            cert_der,
            issuer,
            fingerprint,
        })
    }

    fn create(certs_dir: &Path) -> Result<CertificateAuthority, CaError> {
        crate::fsutil::ensure_private_dir(certs_dir).map_err(|source| CaError::Io {
            path: certs_dir.to_path_buf(),
            source,
        })?;
        let generate = |e: rcgen::Error| CaError::Generate(e.to_string());
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, CA_COMMON_NAME);
        dn.push(DnType::OrganizationName, CA_ORGANIZATION);
        params.distinguished_name = dn;
        // pathlen 0: a leaked or misused CA can sign leaves but no intermediate CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(super::random_serial());
        super::set_validity(&mut params, CA_BACKDATE, CA_LIFETIME)
            .map_err(|e| CaError::Generate(e.to_string()))?;
        let cert = params.self_signed(&key).map_err(generate)?;
        let cert_pem = cert.pem();
        let key_pem = Zeroizing::new(key.serialize_pem());

        let cert_path = certs_dir.join(CERT_FILE);
        let key_path = certs_dir.join(KEY_FILE);
        // The key goes first and without clobbering: if another process is creating a CA at
        // the same moment, the loser loads the winner's files instead of mixing the two.
        match write_new(&key_path, key_pem.as_bytes(), 0o600)? {
            Written::Created => {}
            Written::AlreadyExists => return Self::load(certs_dir),
        }
        if let Written::AlreadyExists = write_new(&cert_path, cert_pem.as_bytes(), 0o644)? {
            return Self::load(certs_dir);
        }
        tracing::info!(path = %cert_path.display(), "created a new latchkey CA");
        Self::from_pem(&cert_pem, &key_pem, &cert_path, &key_path)
    }

    /// The CA certificate in PEM form (what agents add to their trust store).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate in DER form (the second element of every leaf chain).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// SHA-256 fingerprint of the certificate, upper-case hex with colons, for
    /// `latchkey ca show`.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// The issuer that signs leaves.
    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

fn exists(path: &Path) -> Result<bool, CaError> {
    path.try_exists().map_err(|source| CaError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn fingerprint_of(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    let parts: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
    parts.join(":")
}

enum Written {
    Created,
    AlreadyExists,
}

/// Writes `bytes` to `path` atomically and without overwriting (see `fsutil::write_new`).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<Written, CaError> {
    match crate::fsutil::write_new(path, bytes, mode) {
        Ok(true) => Ok(Written::Created),
        Ok(false) => Ok(Written::AlreadyExists),
        Err(source) => Err(CaError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_ca_files_with_a_private_key_and_reloads_the_same_ca() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("certs");
        let (ca, created) = CertificateAuthority::load_or_create(&dir).unwrap();
        assert!(created);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&dir), 0o700);
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(ca.fingerprint().len(), 32 * 3 - 1);

        let (again, created) = CertificateAuthority::load_or_create(&dir).unwrap();
        assert!(!created);
        assert_eq!(again.fingerprint(), ca.fingerprint());
        assert_eq!(again.cert_der(), ca.cert_der());
        assert_eq!(
            CertificateAuthority::load(&dir).unwrap().fingerprint(),
            ca.fingerprint()
        );
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn only_the_certificate_present_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(dir.path()).unwrap();
        fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
        let err = CertificateAuthority::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, CaError::HalfPresent { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("ca.crt exists but"), "{msg}");
        assert!(msg.contains("ca.key is missing"), "{msg}");
    }

    #[test]
    fn only_the_key_present_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(dir.path()).unwrap();
        fs::remove_file(dir.path().join(CERT_FILE)).unwrap();
        let err = CertificateAuthority::load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains("ca.key exists but"), "{err}");
    }

    #[test]
    fn load_without_files_says_how_to_create_them() {
        let dir = tempfile::tempdir().unwrap();
        let err = CertificateAuthority::load(dir.path()).unwrap_err();
        assert!(matches!(err, CaError::Missing { .. }));
        assert!(err.to_string().contains("latchkey ca init"));
    }

    #[test]
    fn a_garbage_key_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(dir.path()).unwrap();
        fs::write(dir.path().join(KEY_FILE), "garbage, not a key").unwrap();
        let err = CertificateAuthority::load(dir.path()).unwrap_err();
        assert!(matches!(err, CaError::BadKey { .. }), "{err:?}");
        assert!(err.to_string().contains(KEY_FILE), "{err}");

        let bogus_pem = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        fs::write(dir.path().join(KEY_FILE), bogus_pem).unwrap();
        let err = CertificateAuthority::load(dir.path()).unwrap_err();
        assert!(matches!(err, CaError::BadKey { .. }), "{err:?}");
        assert!(err.to_string().contains(KEY_FILE), "{err}");
    }

    #[test]
    fn a_garbage_certificate_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(dir.path()).unwrap();
        fs::write(dir.path().join(CERT_FILE), "garbage").unwrap();
        let err = CertificateAuthority::load(dir.path()).unwrap_err();
        assert!(matches!(err, CaError::BadCertificate { .. }), "{err:?}");
        assert!(err.to_string().contains(CERT_FILE), "{err}");
    }

    #[test]
    fn a_key_from_another_ca_is_a_mismatch() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(a.path()).unwrap();
        CertificateAuthority::load_or_create(b.path()).unwrap();
        fs::copy(b.path().join(KEY_FILE), a.path().join(KEY_FILE)).unwrap();
        let err = CertificateAuthority::load(a.path()).unwrap_err();
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err:?}");
    }

    #[test]
    fn debug_does_not_print_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let key_pem = fs::read_to_string(dir.path().join(KEY_FILE)).unwrap();
        let key_b64: String = key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let dbg = format!("{ca:?} {ca:#?}");
        for chunk in key_b64.as_bytes().chunks(16) {
            assert!(!dbg.contains(std::str::from_utf8(chunk).unwrap()));
        }
        assert!(dbg.contains(&ca.fingerprint()));
    }

    #[test]
    fn ca_certificate_has_ca_constraints_and_key_usages() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let der = ca.cert_der().as_ref();
        // basicConstraints (2.5.29.19), critical, CA:TRUE, pathlen 0.
        let bc = [
            0x06, 0x03, 0x55, 0x1d, 0x13, 0x01, 0x01, 0xff, 0x04, 0x08, 0x30, 0x06, 0x01, 0x01,
            0xff, 0x02, 0x01, 0x00,
        ];
        assert!(der.windows(bc.len()).any(|w| w == bc), "basicConstraints");
        // keyUsage (2.5.29.15) present; subjectKeyIdentifier (2.5.29.14) present.
        assert!(der.windows(3).any(|w| w == [0x55, 0x1d, 0x0f]));
        assert!(der.windows(3).any(|w| w == [0x55, 0x1d, 0x0e]));
        assert!(der
            .windows(CA_COMMON_NAME.len())
            .any(|w| w == CA_COMMON_NAME.as_bytes()));
    }
}
