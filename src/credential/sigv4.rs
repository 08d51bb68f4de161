//! The `aws_sigv4` kind: the agent signs its AWS request with placeholder keys; latchkey checks
//! the signature's scope against the route, throws the agent's signature away and signs the
//! request again with the real key (or with temporary credentials of a role assumed for the
//! route, `sts`), using AWS's own `aws-sigv4` crate for the canonical request.
//!
//! - Header signing (`Authorization: AWS4-HMAC-SHA256 ...`) and query signing (presigned URLs:
//!   the agent's `X-Amz-*` signing parameters are replaced).
//! - Payload modes, from the agent's `x-amz-content-sha256`: `UNSIGNED-PAYLOAD`,
//!   `STREAMING-UNSIGNED-PAYLOAD-TRAILER` (body passed on; its checksum trailer is the
//!   agent's and the upstream checks it), a declared SHA-256 (kept, and checked as the body
//!   streams: `chunked::HashCheck`), `STREAMING-AWS4-HMAC-SHA256-PAYLOAD` (every chunk
//!   signature recomputed, chained from the new seed signature: `chunked::ChunkSigner`), and
//!   no header at all (non-S3 services: the body is read, bounded by the route's limit, and
//!   hashed).
//! - Anything else (SigV2, SigV4a, the signed-trailer streaming mode, a malformed
//!   `Authorization`) is refused with `cannot_sign`: a request is never sent half-signed.
//!
//! This module never logs, returns or formats a key: errors name the credential and the
//! problem. `aws-sigv4` traces canonical requests (session token included) at `trace` level
//! under its own target; `main` keeps that target off whatever `RUST_LOG` says.

pub mod chunked;
pub mod sts;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials as AwsCredentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest,
    SignatureLocation, SigningSettings, UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http_body_util::BodyExt;
use zeroize::Zeroizing;

use super::{Applied, Apply, Body, Credential, KindError, Outgoing, Transport};
use crate::deny::Deny;
use crate::inject::{self, Rewrite};
use crate::policy::Route;
use crate::redact::{self, Needles};
use crate::secrets::typed::{TypedDoc, SECRET_TABLE};
use crate::tripwire;

/// The only algorithm latchkey signs with.
const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// `x-amz-content-sha256` of an unsigned body.
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
/// `x-amz-content-sha256` of an aws-chunked body with a signature per chunk.
pub const STREAMING_SIGNED: &str = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD";
/// `x-amz-content-sha256` of an aws-chunked body with unsigned chunks and a checksum trailer.
pub const STREAMING_UNSIGNED_TRAILER: &str = "STREAMING-UNSIGNED-PAYLOAD-TRAILER";
/// Longest validity a presigned URL may ask for (SigV4's own limit, 7 days).
const MAX_PRESIGN: Duration = Duration::from_secs(7 * 24 * 3600);

/// Query parameters that carry a SigV4 query signature; the agent's copies are replaced.
const QUERY_SIGNING_PARAMS: [&str; 7] = [
    "x-amz-algorithm",
    "x-amz-credential",
    "x-amz-date",
    "x-amz-expires",
    "x-amz-signedheaders",
    "x-amz-signature",
    "x-amz-security-token",
];

/// Headers that belong to signing: dropped from the agent's request, put back by the signer.
const HEADER_SIGNING: [&str; 3] = ["x-amz-date", "x-amz-security-token", "x-amz-content-sha256"];

/// Builds `aws_sigv4` credentials; holds the transport STS is called through.
pub struct SigV4Kind {
    transport: Option<Arc<dyn Transport>>,
}

impl SigV4Kind {
    /// The kind, calling STS through `transport` (`None`: building and checking only).
    pub fn new(transport: Option<Arc<dyn Transport>>) -> SigV4Kind {
        SigV4Kind { transport }
    }
}

/// Settings a document may hold at its top level.
const SETTINGS: &[&str] = &[
    "kind",
    "access_key_id",
    "role_arn",
    "role_session_name",
    "external_id",
    "duration",
    "sts_endpoint",
    "sts_region",
];

impl super::Kind for SigV4Kind {
    fn name(&self) -> &'static str {
        "aws_sigv4"
    }

    fn build(&self, name: &str, doc: &TypedDoc) -> Result<Arc<dyn Credential>, KindError> {
        let invalid =
            |why: String| KindError::Invalid(format!("aws_sigv4 credential {name}: {why}"));
        doc.only_settings(SETTINGS).map_err(invalid)?;
        let setting = |key: &str| -> Result<Option<String>, KindError> {
            match doc.table.get(key) {
                None => Ok(None),
                Some(toml::Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
                Some(_) => Err(invalid(format!("`{key}` must be a non-empty string"))),
            }
        };
        let secrets = match doc.table.get(SECRET_TABLE) {
            Some(toml::Value::Table(t)) => t,
            _ => {
                return Err(invalid(
                    "needs a [secret] table with secret_access_key".into(),
                ))
            }
        };
        for key in secrets.keys() {
            if key != "secret_access_key" && key != "session_token" {
                return Err(invalid(format!(
                    "unknown secret {key:?} (known: secret_access_key, session_token)"
                )));
            }
        }
        let secret = |key: &str| -> Result<Option<Zeroizing<String>>, KindError> {
            match secrets.get(key) {
                None => Ok(None),
                Some(toml::Value::String(s)) if !s.is_empty() => {
                    Ok(Some(Zeroizing::new(s.clone())))
                }
                Some(_) => Err(invalid(format!(
                    "[secret] {key} must be a non-empty string"
                ))),
            }
        };
        let access_key_id =
            setting("access_key_id")?.ok_or_else(|| invalid("needs `access_key_id`".into()))?;
        if !access_key_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(invalid("`access_key_id` must be letters and digits".into()));
        }
        let secret_access_key = secret("secret_access_key")?
            .ok_or_else(|| invalid("needs [secret] secret_access_key".into()))?;
        let session_token = secret("session_token")?;
        let keys = Keys::new(
            &access_key_id,
            &secret_access_key,
            session_token.as_ref().map(|t| t.as_str()),
        );
        let role = match setting("role_arn")? {
            None => {
                for key in [
                    "role_session_name",
                    "external_id",
                    "duration",
                    "sts_endpoint",
                ] {
                    if doc.table.contains_key(key) {
                        return Err(invalid(format!("`{key}` needs `role_arn`")));
                    }
                }
                None
            }
            Some(role_arn) => Some(
                sts::Role::from_settings(
                    role_arn,
                    setting("role_session_name")?,
                    setting("external_id")?,
                    setting("duration")?,
                    setting("sts_endpoint")?,
                    setting("sts_region")?,
                )
                .map_err(invalid)?,
            ),
        };
        Ok(Arc::new(SigV4 {
            name: name.to_owned(),
            keys,
            role: role.map(|role| sts::Assumer::new(role, self.transport.clone())),
        }))
    }
}

/// One key pair (long-term, or temporary with its session token) ready to sign with, and the
/// forms of its secret parts that must never be seen in a response.
pub struct Keys {
    identity: Identity,
    secret: Zeroizing<String>,
    needles: Option<Arc<Needles>>,
}

impl Keys {
    /// Keys from their parts.
    pub fn new(access_key_id: &str, secret: &str, session_token: Option<&str>) -> Keys {
        let mut forms = redact::encoded_forms(secret.as_bytes());
        if let Some(token) = session_token {
            forms.extend(redact::encoded_forms(token.as_bytes()));
        }
        Keys {
            identity: AwsCredentials::new(
                access_key_id,
                secret,
                session_token.map(str::to_owned),
                None,
                "latchkey",
            )
            .into(),
            secret: Zeroizing::new(secret.to_owned()),
            needles: Needles::new(forms),
        }
    }
}

/// An `aws_sigv4` credential.
pub struct SigV4 {
    name: String,
    keys: Keys,
    role: Option<sts::Assumer>,
}

impl Credential for SigV4 {
    fn kind(&self) -> &'static str {
        "aws_sigv4"
    }

    fn fits(&self, route: &Route) -> Result<(), String> {
        if route.inject().is_some() {
            return Err(
                "an aws_sigv4 credential signs the request itself; remove the route's `inject`"
                    .into(),
            );
        }
        if self.role.is_some() && route.signing().service.is_none() {
            return Err(
                "a credential that assumes a role needs the route's `service` (the session \
                 policy is scoped to it)"
                    .into(),
            );
        }
        Ok(())
    }

    fn tripwire_kind(&self) -> Option<tripwire::Kind> {
        // The agent's placeholder `Authorization` is replaced anyway.
        Some(tripwire::Kind::Aws)
    }

    fn apply<'a>(&'a self, out: Outgoing<'a>) -> Apply<'a> {
        Apply::pending(async move {
            let route = out.rewrite.allowed.route();
            self.fits(route).map_err(|why| {
                Deny::CredentialUnavailable(format!("{}: {why} (route {})", self.name, route.id()))
            })?;
            let agent = AgentSignature::read(out.parts)?;
            agent.check_scope(route)?;
            let (keys, detail) = match &self.role {
                None => (KeysRef::Long(&self.keys), None),
                Some(assumer) => {
                    let temp = assumer
                        .credentials(&self.name, &self.keys, route, &out.claims.sub)
                        .await?;
                    let detail = Some(assumer.detail(&out.claims.sub));
                    (KeysRef::Temp(temp), detail)
                }
            };
            let signed = resign(
                out.parts,
                out.rewrite,
                out.body,
                &agent,
                keys.get(),
                SystemTime::now(),
            )
            .await?;
            Ok(Applied {
                body: signed,
                needles: keys.get().needles.clone(),
                detail,
            })
        })
    }
}

/// Long-term keys borrowed from the credential, or temporary ones shared with the cache.
enum KeysRef<'a> {
    Long(&'a Keys),
    Temp(Arc<Keys>),
}

impl KeysRef<'_> {
    fn get(&self) -> &Keys {
        match self {
            KeysRef::Long(k) => k,
            KeysRef::Temp(k) => k,
        }
    }
}

/// Where the agent put its signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// `Authorization` header.
    Header,
    /// Query parameters (a presigned URL), valid for this long.
    Query(Duration),
}

/// What latchkey reads from the agent's signature: never its key or signature, only the scope
/// and which headers it signed.
#[derive(Debug, Clone)]
pub struct AgentSignature {
    /// Header or query.
    pub location: Location,
    /// The service of the credential scope (`s3`).
    pub service: String,
    /// The region of the credential scope (`us-east-1`).
    pub region: String,
    /// The headers the agent signed (lower-case), as its `SignedHeaders` lists them.
    pub signed_headers: Vec<String>,
}

impl AgentSignature {
    /// Read the agent's SigV4 signature from its request head (before anything is stripped).
    pub fn read(parts: &Parts) -> Result<AgentSignature, Deny> {
        let cannot = |why: &str| Deny::CannotSign(why.to_owned());
        let mut auth = parts.headers.get_all(header::AUTHORIZATION).iter();
        let header = auth.next();
        if auth.next().is_some() {
            return Err(cannot("the request has more than one Authorization header"));
        }
        let query = query_signature(parts.uri.query().unwrap_or(""))?;
        match (header, query) {
            (Some(_), Some(_)) => Err(cannot(
                "the request is signed both in its Authorization header and in its query",
            )),
            (None, None) => Err(cannot(
                "the request carries no AWS SigV4 signature to replace (sign it with the \
                 placeholder keys `latchkey run` provides)",
            )),
            (Some(value), None) => {
                let text = value
                    .to_str()
                    .map_err(|_| cannot("the Authorization header is not ASCII"))?;
                Self::from_header(text)
            }
            (None, Some(q)) => {
                let (service, region) = scope(&q.credential)?;
                let expires = q
                    .expires
                    .parse::<u64>()
                    .ok()
                    .filter(|s| (1..=MAX_PRESIGN.as_secs()).contains(s))
                    .ok_or_else(|| cannot("X-Amz-Expires must be 1 to 604800 seconds"))?;
                Ok(AgentSignature {
                    location: Location::Query(Duration::from_secs(expires)),
                    service,
                    region,
                    signed_headers: split_signed_headers(&q.signed_headers)?,
                })
            }
        }
    }

    fn from_header(text: &str) -> Result<AgentSignature, Deny> {
        let cannot = |why: &str| Deny::CannotSign(why.to_owned());
        let (algorithm, rest) = text.split_once(' ').unwrap_or((text, ""));
        match algorithm {
            ALGORITHM => {}
            "AWS4-ECDSA-P256-SHA256" => {
                return Err(cannot(
                    "SigV4a (AWS4-ECDSA-P256-SHA256) is not supported; sign with SigV4",
                ))
            }
            "AWS" => return Err(cannot("SigV2 (`AWS key:signature`) is not supported")),
            _ => {
                return Err(cannot(
                    "the Authorization header is not an AWS SigV4 signature",
                ))
            }
        }
        let (mut credential, mut signed, mut signature) = (None, None, None);
        for part in rest.split(',') {
            let Some((k, v)) = part.trim().split_once('=') else {
                return Err(cannot("the SigV4 Authorization header is malformed"));
            };
            let slot = match k {
                "Credential" => &mut credential,
                "SignedHeaders" => &mut signed,
                "Signature" => &mut signature,
                _ => {
                    return Err(cannot(
                        "the SigV4 Authorization header has an unknown field",
                    ))
                }
            };
            if slot.replace(v).is_some() {
                return Err(cannot("the SigV4 Authorization header repeats a field"));
            }
        }
        let (Some(credential), Some(signed), Some(_)) = (credential, signed, signature) else {
            return Err(cannot(
                "the SigV4 Authorization header lacks Credential, SignedHeaders or Signature",
            ));
        };
        let (service, region) = scope(credential)?;
        Ok(AgentSignature {
            location: Location::Header,
            service,
            region,
            signed_headers: split_signed_headers(signed)?,
        })
    }

    /// The agent's scope must be the route's `service` and `region` where the route names them.
    pub fn check_scope(&self, route: &Route) -> Result<(), Deny> {
        let signing = route.signing();
        let service_ok = signing.service.as_deref().is_none_or(|s| s == self.service);
        let region_ok = signing.region.as_deref().is_none_or(|r| r == self.region);
        if service_ok && region_ok {
            return Ok(());
        }
        Err(Deny::SigningScopeNotAllowed {
            route: route.id().to_owned(),
            signed: format!("{}/{}", self.service, self.region),
            allowed: format!(
                "{}/{}",
                signing.service.as_deref().unwrap_or("*"),
                signing.region.as_deref().unwrap_or("*")
            ),
        })
    }
}

/// The SigV4 parameters of a presigned URL's query.
struct QuerySignature {
    credential: String,
    signed_headers: String,
    expires: String,
}

fn query_signature(query: &str) -> Result<Option<QuerySignature>, Deny> {
    let mut algorithm = None;
    let (mut credential, mut signed, mut expires, mut signature) = (None, None, None, None);
    let mut v2 = false;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k == "AWSAccessKeyId" {
            v2 = true;
        }
        let slot = match k.to_ascii_lowercase().as_str() {
            "x-amz-algorithm" => &mut algorithm,
            "x-amz-credential" => &mut credential,
            "x-amz-signedheaders" => &mut signed,
            "x-amz-expires" => &mut expires,
            "x-amz-signature" => &mut signature,
            _ => continue,
        };
        if slot.replace(v.into_owned()).is_some() {
            return Err(Deny::CannotSign(
                "the query repeats a SigV4 parameter".to_owned(),
            ));
        }
    }
    if algorithm.is_none() && signature.is_none() && credential.is_none() {
        if v2 {
            return Err(Deny::CannotSign(
                "SigV2 presigned URLs (AWSAccessKeyId=...) are not supported; presign with \
                 SigV4 (boto3: signature_version=\"s3v4\")"
                    .to_owned(),
            ));
        }
        return Ok(None);
    }
    if algorithm.as_deref() != Some(ALGORITHM) {
        return Err(Deny::CannotSign(
            "a presigned URL must use X-Amz-Algorithm=AWS4-HMAC-SHA256".to_owned(),
        ));
    }
    match (credential, signed, expires, signature) {
        (Some(credential), Some(signed_headers), Some(expires), Some(_)) => {
            Ok(Some(QuerySignature {
                credential,
                signed_headers,
                expires,
            }))
        }
        _ => Err(Deny::CannotSign(
            "the presigned URL lacks X-Amz-Credential, X-Amz-SignedHeaders, X-Amz-Expires or \
             X-Amz-Signature"
                .to_owned(),
        )),
    }
}

/// `KEY/DATE/REGION/SERVICE/aws4_request` -> (service, region).
fn scope(credential: &str) -> Result<(String, String), Deny> {
    let parts: Vec<&str> = credential.split('/').collect();
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    match parts.as_slice() {
        [_, date, region, service, "aws4_request"]
            if date.len() == 8 && name_ok(region) && name_ok(service) =>
        {
            Ok(((*service).to_owned(), (*region).to_owned()))
        }
        _ => Err(Deny::CannotSign(
            "the SigV4 credential scope is not KEY/DATE/REGION/SERVICE/aws4_request".to_owned(),
        )),
    }
}

fn split_signed_headers(list: &str) -> Result<Vec<String>, Deny> {
    let names: Vec<String> = list.split(';').map(str::to_ascii_lowercase).collect();
    if names
        .iter()
        .any(|n| HeaderName::from_bytes(n.as_bytes()).is_err())
    {
        return Err(Deny::CannotSign(
            "SignedHeaders lists something that is not a header name".to_owned(),
        ));
    }
    Ok(names)
}

/// The agent's query without its SigV4 signing parameters (any case, any encoding of the name).
fn query_without_signing(query: &str) -> String {
    let mut out = String::with_capacity(query.len());
    for pair in query.split('&') {
        if pair.is_empty() {
            continue;
        }
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        let decoded: String = form_urlencoded::parse(key.as_bytes())
            .next()
            .map(|(k, _)| k.to_ascii_lowercase())
            .unwrap_or_default();
        if QUERY_SIGNING_PARAMS.contains(&decoded.as_str()) {
            continue;
        }
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(pair);
    }
    out
}

/// How the body is covered by the signature.
enum Payload {
    /// Not covered.
    Unsigned,
    /// aws-chunked, unsigned chunks, checksum trailer in the body.
    StreamingUnsignedTrailer,
    /// aws-chunked, every chunk signed (the seed signs this literal).
    StreamingSigned,
    /// The agent declared this SHA-256 (hex) in `x-amz-content-sha256`.
    Declared(String),
    /// No declaration: latchkey hashes the body.
    Hashed,
}

/// The signing rules of a service: S3 signs the path as sent, others normalise it and encode
/// it twice (what every AWS SDK does).
fn settings_for(service: &str, payload_header: bool, location: Location) -> SigningSettings {
    let mut settings = SigningSettings::default();
    if matches!(service, "s3" | "s3-object-lambda" | "s3express") {
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    }
    if payload_header {
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    }
    if let Location::Query(expires) = location {
        settings.signature_location = SignatureLocation::QueryParams;
        settings.expires_in = Some(expires);
    }
    settings
}

/// Rebuild the agent's request for the upstream and sign it with `keys` at `time`: the
/// function the kind, the cross-check tests and the benchmark share.
pub async fn resign(
    parts: &mut Parts,
    rewrite: &Rewrite<'_>,
    body: Body,
    agent: &AgentSignature,
    keys: &Keys,
    time: SystemTime,
) -> Result<Body, Deny> {
    let cannot = |why: &str| Deny::CannotSign(why.to_owned());
    let declared = match parts.headers.get("x-amz-content-sha256") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| cannot("x-amz-content-sha256 is not ASCII"))?
                .to_owned(),
        ),
    };
    let payload = match declared.as_deref() {
        None if matches!(agent.location, Location::Query(_)) && agent.service == "s3" => {
            Payload::Unsigned
        }
        None => Payload::Hashed,
        Some(UNSIGNED_PAYLOAD) => Payload::Unsigned,
        Some(STREAMING_UNSIGNED_TRAILER) => Payload::StreamingUnsignedTrailer,
        Some(STREAMING_SIGNED) => Payload::StreamingSigned,
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Payload::Declared(h.to_ascii_lowercase())
        }
        Some(other) if other.starts_with("STREAMING-") => {
            return Err(Deny::CannotSign(format!(
                "the payload mode {other} is not supported (use {STREAMING_SIGNED}, \
                 {STREAMING_UNSIGNED_TRAILER}, {UNSIGNED_PAYLOAD} or a SHA-256)"
            )))
        }
        Some(_) => {
            return Err(cannot(
                "x-amz-content-sha256 is not a payload mode or a SHA-256",
            ))
        }
    };
    if matches!(
        payload,
        Payload::StreamingSigned | Payload::StreamingUnsignedTrailer
    ) && matches!(agent.location, Location::Query(_))
    {
        return Err(cannot("a streaming payload cannot be presigned"));
    }
    let decoded_length = match parts.headers.get("x-amz-decoded-content-length") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| cannot("x-amz-decoded-content-length is not a number"))?,
        ),
    };
    if matches!(payload, Payload::StreamingSigned) && decoded_length.is_none() {
        return Err(cannot(
            "a STREAMING-AWS4-HMAC-SHA256-PAYLOAD upload needs x-amz-decoded-content-length",
        ));
    }
    let content_length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok());

    // SECURITY: the agent's signature and everything that belongs to it go; what the signer
    // computes replaces it. The query is rebuilt without the agent's signing parameters.
    let query = rewrite.query.map(query_without_signing);
    let rebuilt = Rewrite {
        query: query.as_deref().filter(|q| !q.is_empty()),
        ..*rewrite
    };
    inject::rebuild(parts, &rebuilt)?;
    for name in HEADER_SIGNING {
        parts.headers.remove(name);
    }
    let host = host_value(&parts.uri)?;
    parts.headers.insert(header::HOST, host);

    // The body, when the signature must cover its bytes (a bounded read: the body is already
    // limited to the route's max_body).
    let (body, buffered) = match payload {
        Payload::Hashed => {
            let collected = body.collect().await.map_err(|_| Deny::BadBody)?;
            let bytes = collected.to_bytes();
            (None, Some(bytes))
        }
        _ => (Some(body), None),
    };
    let signable_body = match (&payload, &buffered) {
        (Payload::Hashed, Some(bytes)) => SignableBody::Bytes(bytes),
        (Payload::Unsigned, _) => SignableBody::UnsignedPayload,
        (Payload::StreamingUnsignedTrailer, _) => SignableBody::StreamingUnsignedPayloadTrailer,
        (Payload::StreamingSigned, _) => SignableBody::Precomputed(STREAMING_SIGNED.to_owned()),
        (Payload::Declared(h), _) => SignableBody::Precomputed(h.clone()),
        (Payload::Hashed, None) => unreachable!("a hashed payload was read above"),
    };

    // Sign exactly the headers the agent signed (the signer adds host, date, token and the
    // payload hash itself); a header it signed that latchkey dropped is not signed.
    let signed: Vec<(&str, &str)> = parts
        .headers
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            n != "host"
                && !HEADER_SIGNING.contains(&n)
                && agent.signed_headers.iter().any(|s| s == n)
        })
        .map(|(name, value)| Ok((name.as_str(), value.to_str().map_err(|_| ())?)))
        .collect::<Result<_, ()>>()
        .map_err(|_| cannot("a signed header's value is not ASCII"))?;
    let host_header = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let uri = parts.uri.to_string();
    let settings = settings_for(&agent.service, declared.is_some(), agent.location);
    let params = v4::SigningParams::builder()
        .identity(&keys.identity)
        .region(&agent.region)
        .name(&agent.service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|_| cannot("the signing parameters are incomplete"))?
        .into();
    let request = SignableRequest::new(
        parts.method.as_str(),
        uri,
        signed
            .into_iter()
            .chain(std::iter::once(("host", host_header.as_str()))),
        signable_body,
    )
    .map_err(|_| cannot("the request cannot be put in canonical form"))?;
    let (instructions, seed) = sign(request, &params)
        .map_err(|_| cannot("the request cannot be signed"))?
        .into_parts();
    let taken = std::mem::replace(parts, http::Request::new(()).into_parts().0);
    let mut req = http::Request::from_parts(taken, ());
    instructions.apply_to_request_http1x(&mut req);
    *parts = req.into_parts().0;
    if let Some(v) = parts.headers.get_mut(header::AUTHORIZATION) {
        v.set_sensitive(true);
    }

    Ok(match (payload, body, buffered) {
        (Payload::Hashed, _, Some(bytes)) => full(bytes),
        (Payload::StreamingSigned, Some(body), _) => {
            let key = v4::generate_signing_key(&keys.secret, time, &agent.region, &agent.service);
            chunked::ChunkSigner::new(
                body,
                chunked::ChunkKey {
                    key: Zeroizing::new(key.as_ref().to_vec()),
                    date_time: format_date_time(time),
                    scope: format!(
                        "{}/{}/{}/aws4_request",
                        &format_date_time(time)[..8],
                        agent.region,
                        agent.service
                    ),
                },
                seed,
                decoded_length.unwrap_or(0),
            )
            .boxed_unsync()
        }
        (Payload::Declared(hash), Some(body), _) => {
            chunked::HashCheck::new(body, &hash, content_length)?.boxed_unsync()
        }
        (_, Some(body), _) => body,
        (_, None, _) => unreachable!("only a hashed payload is read"),
    })
}

/// `Host` as the upstream will see it: the authority without a default port (what hyper
/// sends and the signer expects).
fn host_value(uri: &http::Uri) -> Result<HeaderValue, Deny> {
    let host = uri
        .host()
        .ok_or_else(|| Deny::CannotSign("the request has no host".to_owned()))?;
    let default = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    let value = match uri.port_u16() {
        Some(p) if p != default => format!("{host}:{p}"),
        _ => host.to_owned(),
    };
    HeaderValue::from_str(&value).map_err(|_| Deny::CannotSign("the host is not valid".to_owned()))
}

/// `YYYYMMDDTHHMMSSZ`.
pub fn format_date_time(time: SystemTime) -> String {
    let t: chrono::DateTime<chrono::Utc> = time.into();
    t.format("%Y%m%dT%H%M%SZ").to_string()
}

fn full(bytes: Bytes) -> Body {
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[cfg(test)]
mod tests;
