//! PEM, the text framing of certificates and keys: the one place in the crate that reads or
//! writes it. Decoding is rustls-pki-types' (`PemObject`), encoding the `pem` crate's (the one
//! rcgen uses), so no module frames base64 by hand.
//!
//! This module only converts between PEM text and DER; it never logs. Its errors can quote a
//! BEGIN/END line or one offending base64 symbol, never a section's body; callers decoding a
//! private key still map them to a fixed description.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, SubjectPublicKeyInfoDer};

/// Why PEM text could not be decoded. The messages are those the crate showed before PEM had
/// one home (rustls-pemfile's for a malformed section, rustls-pki-types' otherwise).
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// The text holds no section of the wanted kind (e.g. not PEM at all).
    #[error("no items found")]
    NoItemsFound,
    /// A section has no END line (the file is truncated); holds the section's label.
    #[error("section end {0:?} missing")]
    MissingSectionEnd(String),
    /// A BEGIN line is malformed; holds that line.
    #[error("illegal section start: {0:?}")]
    IllegalSectionStart(String),
    /// Anything else: invalid base64, an oversized section.
    #[error("{0}")]
    Other(String),
}

impl From<rustls::pki_types::pem::Error> for PemError {
    fn from(e: rustls::pki_types::pem::Error) -> PemError {
        use rustls::pki_types::pem::Error;
        match e {
            Error::NoItemsFound => PemError::NoItemsFound,
            Error::MissingSectionEnd { end_marker } => {
                PemError::MissingSectionEnd(String::from_utf8_lossy(&end_marker).into_owned())
            }
            Error::IllegalSectionStart { line } => {
                PemError::IllegalSectionStart(String::from_utf8_lossy(&line).into_owned())
            }
            other => PemError::Other(other.to_string()),
        }
    }
}

/// One certificate as PEM: `-----BEGIN CERTIFICATE-----`, base64 in 64-column lines, LF line
/// ends, a trailing newline (the layout of rcgen's `Certificate::pem` and of OpenSSL).
pub fn encode_certificate(der: &[u8]) -> String {
    let block = pem::Pem::new("CERTIFICATE", der.to_vec());
    pem::encode_config(
        &block,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Every certificate in `text`, in order; sections of other kinds are skipped.
pub fn certificates(
    text: &[u8],
) -> impl Iterator<Item = Result<CertificateDer<'static>, PemError>> + '_ {
    CertificateDer::pem_slice_iter(text).map(|r| r.map_err(PemError::from))
}

/// The first certificate in `text` ([`PemError::NoItemsFound`] if there is none).
pub fn first_certificate(text: &[u8]) -> Result<CertificateDer<'static>, PemError> {
    CertificateDer::from_pem_slice(text).map_err(PemError::from)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in `text`. The DER zeroizes on drop.
pub fn private_key(text: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(text).map_err(PemError::from)
}

/// The first `PUBLIC KEY` section (a SubjectPublicKeyInfo) in `text`.
pub fn public_key(text: &[u8]) -> Result<SubjectPublicKeyInfoDer<'static>, PemError> {
    SubjectPublicKeyInfoDer::from_pem_slice(text).map_err(PemError::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData as _;

    #[test]
    fn a_certificate_round_trips_in_the_layout_rcgen_writes() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let text = encode_certificate(cert.der());
        assert_eq!(text, cert.pem());
        assert!(text.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(text.ends_with("-----END CERTIFICATE-----\n"));
        assert!(text.lines().all(|l| l.len() <= 64));
        assert_eq!(first_certificate(text.as_bytes()).unwrap(), *cert.der());
    }

    #[test]
    fn certificates_reads_a_bundle_and_skips_other_sections() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let bundle = format!("{}{}{}", cert.pem(), key.serialize_pem(), cert.pem());
        let certs: Vec<_> = certificates(bundle.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(certs, [cert.der().clone(), cert.der().clone()]);
        assert!(private_key(bundle.as_bytes()).is_ok());
        assert_eq!(
            public_key(key.public_key_pem().as_bytes())
                .unwrap()
                .as_ref(),
            key.subject_public_key_info()
        );
    }

    #[test]
    fn text_without_pem_is_no_items_found_and_bad_base64_is_an_error() {
        assert!(matches!(
            first_certificate(b"not a pem"),
            Err(PemError::NoItemsFound)
        ));
        assert_eq!(certificates(b"not a pem").count(), 0);
        let broken = b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        let err = certificates(broken).next().unwrap().unwrap_err();
        assert!(err.to_string().starts_with("base64 decode error"), "{err}");
        let unterminated = b"-----BEGIN CERTIFICATE-----\nAAAA\n";
        assert_eq!(
            first_certificate(unterminated).unwrap_err().to_string(),
            r#"section end "CERTIFICATE" missing"#
        );
    }
}
