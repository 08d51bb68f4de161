//! Temporary credentials scoped down to one route: STS `AssumeRole` with a session policy
//! derived from the route (its service; actions from its methods or its explicit `actions`;
//! S3 resources from its bucket and key paths), cached until shortly before they expire, one
//! call at a time per scope (single-flight), bounded in time.
//!
//! The session policy can only narrow the role: what a request signed with these
//! credentials may do is the intersection of the role's own policies and this one, so a
//! leaked temporary key cannot exceed the route even outside latchkey.
//!
//! Nothing here logs or returns a key or token: errors name the role and the STS error code.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http_body_util::BodyExt;
use zeroize::Zeroizing;

use super::Keys;
use crate::credential::Transport;
use crate::deny::Deny;
use crate::policy::Route;

/// Temporary credentials are renewed this long before they expire.
const RENEW_BEFORE: Duration = Duration::from_secs(300);
/// The longest a request waits for STS (and for another request's call to STS).
const STS_WAIT: Duration = Duration::from_secs(10);
/// The session name prefix when the document names none.
const DEFAULT_SESSION_PREFIX: &str = "latchkey";

/// The role a credential assumes, from its document.
#[derive(Debug, Clone)]
pub struct Role {
    /// `arn:PARTITION:iam::ACCOUNT:role/NAME`.
    pub arn: String,
    session_prefix: String,
    external_id: Option<String>,
    duration: Duration,
    endpoint: http::Uri,
    region: String,
}

impl Role {
    /// Check and keep a document's role settings.
    pub fn from_settings(
        arn: String,
        session_prefix: Option<String>,
        external_id: Option<String>,
        duration: Option<String>,
        endpoint: Option<String>,
        region: Option<String>,
    ) -> Result<Role, String> {
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        if parts.len() != 6
            || parts[0] != "arn"
            || parts[2] != "iam"
            || !parts[5].starts_with("role/")
        {
            return Err(format!(
                "`role_arn` {arn:?} is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)"
            ));
        }
        let session_prefix = session_prefix.unwrap_or_else(|| DEFAULT_SESSION_PREFIX.into());
        if session_prefix.len() > 32 || !session_prefix.bytes().all(session_char) {
            return Err(
                "`role_session_name` must be at most 32 of letters, digits and +=,.@-".into(),
            );
        }
        let duration = match duration {
            None => Duration::from_secs(3600),
            Some(text) => humantime::parse_duration(&text)
                .ok()
                .filter(|d| (900..=43200).contains(&d.as_secs()))
                .ok_or_else(|| format!("`duration` {text:?} must be a duration from 15m to 12h"))?,
        };
        let region = region.unwrap_or_else(|| "us-east-1".into());
        if !region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(format!("`sts_region` {region:?} is not a region name"));
        }
        let endpoint_text =
            endpoint.unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com"));
        let endpoint: http::Uri = endpoint_text
            .parse()
            .ok()
            .filter(|u: &http::Uri| {
                matches!(u.scheme_str(), Some("https" | "http")) && u.host().is_some()
            })
            .ok_or_else(|| format!("`sts_endpoint` {endpoint_text:?} is not an http(s) URL"))?;
        Ok(Role {
            arn,
            session_prefix,
            external_id,
            duration,
            endpoint,
            region,
        })
    }

    fn partition(&self) -> &str {
        self.arn.split(':').nth(1).unwrap_or("aws")
    }

    /// The session name for `agent`: the prefix, '-', the agent (STS allows 64 characters
    /// of letters, digits and +=,.@-).
    pub fn session_name(&self, agent: &str) -> String {
        let mut name = format!("{}-", self.session_prefix);
        name.extend(agent.chars().map(|c| {
            if c.is_ascii() && session_char(c as u8) {
                c
            } else {
                '-'
            }
        }));
        name.truncate(64);
        name
    }
}

fn session_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"+=,.@-_".contains(&b)
}

/// One cache slot: the temporary keys of one scope, and when they expire.
type Slot = Arc<tokio::sync::Mutex<Option<(Arc<Keys>, SystemTime)>>>;

/// Assumes a role per (route scope, agent), with a cache.
pub struct Assumer {
    role: Role,
    transport: Option<Arc<dyn Transport>>,
    cache: dashmap::DashMap<String, Slot>,
}

impl Assumer {
    /// An assumer of `role` calling STS through `transport`.
    pub fn new(role: Role, transport: Option<Arc<dyn Transport>>) -> Assumer {
        Assumer {
            role,
            transport,
            cache: Default::default(),
        }
    }

    /// The audit detail: which role, which session.
    pub fn detail(&self, agent: &str) -> String {
        format!(
            "role={} session={}",
            self.role.arn,
            self.role.session_name(agent)
        )
    }

    /// Temporary keys for `route` and `agent`: cached ones while they have more than
    /// [`RENEW_BEFORE`] left, else one STS call (others wait for it), all within
    /// [`STS_WAIT`].
    pub async fn credentials(
        &self,
        name: &str,
        long: &Keys,
        route: &Route,
        agent: &str,
    ) -> Result<Arc<Keys>, Deny> {
        let policy = session_policy(route, self.role.partition());
        let session = self.role.session_name(agent);
        let key = format!("{session}\n{policy}");
        let slot = self.cache.entry(key).or_default().clone();
        let unavailable = |why: String| {
            Deny::CredentialUnavailable(format!(
                "{name}: assuming role {} failed: {why}",
                self.role.arn
            ))
        };
        let work = async {
            let mut held = slot.lock().await;
            if let Some((keys, expires)) = held.as_ref() {
                if SystemTime::now() + RENEW_BEFORE < *expires {
                    return Ok(keys.clone());
                }
            }
            let (keys, expires) = self
                .assume(long, &session, &policy)
                .await
                .map_err(unavailable)?;
            let keys = Arc::new(keys);
            *held = Some((keys.clone(), expires));
            Ok(keys)
        };
        match tokio::time::timeout(STS_WAIT, work).await {
            Ok(result) => result,
            Err(_) => Err(unavailable(format!(
                "STS did not answer within {} s",
                STS_WAIT.as_secs()
            ))),
        }
    }

    async fn assume(
        &self,
        long: &Keys,
        session: &str,
        policy: &str,
    ) -> Result<(Keys, SystemTime), String> {
        let transport = self
            .transport
            .as_ref()
            .ok_or("no connection to STS in this command")?;
        let mut pairs = vec![
            ("Action", "AssumeRole".to_owned()),
            ("Version", "2011-06-15".to_owned()),
            ("RoleArn", self.role.arn.clone()),
            ("RoleSessionName", session.to_owned()),
            ("DurationSeconds", self.role.duration.as_secs().to_string()),
            ("Policy", policy.to_owned()),
        ];
        if let Some(id) = &self.role.external_id {
            pairs.push(("ExternalId", id.clone()));
        }
        let body = Bytes::from(form_body(&pairs));
        let uri = self.role.endpoint.clone();
        let mut parts = http::Request::post(uri.clone())
            .header(
                header::CONTENT_TYPE,
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .body(())
            .map_err(|_| "the STS request cannot be built".to_owned())?
            .into_parts()
            .0;
        let host = super::host_value(&uri).map_err(|e| e.to_string())?;
        parts.headers.insert(header::HOST, host.clone());
        let host_text = host.to_str().unwrap_or_default().to_owned();
        let settings = aws_sigv4::http_request::SigningSettings::default();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&long.identity)
            .region(&self.role.region)
            .name("sts")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|_| "the STS request cannot be signed".to_owned())?
            .into();
        let signable = aws_sigv4::http_request::SignableRequest::new(
            "POST",
            uri.to_string(),
            [
                (
                    "content-type",
                    "application/x-www-form-urlencoded; charset=utf-8",
                ),
                ("host", host_text.as_str()),
            ]
            .into_iter(),
            aws_sigv4::http_request::SignableBody::Bytes(&body),
        )
        .map_err(|_| "the STS request cannot be signed".to_owned())?;
        let (instructions, _) = aws_sigv4::http_request::sign(signable, &params)
            .map_err(|_| "the STS request cannot be signed".to_owned())?
            .into_parts();
        let mut req = http::Request::from_parts(parts, ());
        instructions.apply_to_request_http1x(&mut req);
        let (mut parts, ()) = req.into_parts();
        if let Some(v) = parts.headers.get_mut(header::AUTHORIZATION) {
            v.set_sensitive(true);
        }
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len() as u64));
        let body = http_body_util::Full::new(body)
            .map_err(|never| match never {})
            .boxed_unsync();
        let resp = transport
            .fetch(http::Request::from_parts(parts, body))
            .await
            .map_err(|e| format!("STS cannot be reached ({e})"))?;
        let text = std::str::from_utf8(resp.body()).unwrap_or("");
        if !resp.status().is_success() {
            let code = tag(text, "Code").unwrap_or_else(|| "no error code".into());
            return Err(format!("STS answered {} ({code})", resp.status().as_u16()));
        }
        let (Some(id), Some(secret), Some(token), Some(expiration)) = (
            tag(text, "AccessKeyId"),
            tag(text, "SecretAccessKey").map(Zeroizing::new),
            tag(text, "SessionToken").map(Zeroizing::new),
            tag(text, "Expiration"),
        ) else {
            return Err("the STS answer lacks credentials".into());
        };
        let expires = chrono::DateTime::parse_from_rfc3339(&expiration)
            .map(|t| SystemTime::from(t.with_timezone(&chrono::Utc)))
            .map_err(|_| "the STS answer has no valid Expiration".to_owned())?;
        Ok((Keys::new(&id, &secret, Some(&token)), expires))
    }
}

/// An `application/x-www-form-urlencoded` body encoded as the AWS SDKs encode it (every
/// byte but letters, digits and `-_.~` escaped, space as `+`), so a service that re-encodes
/// the parsed form to check the signature gets the same bytes.
fn form_body(pairs: &[(&str, String)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        for (j, text) in [k.as_bytes(), v.as_bytes()].into_iter().enumerate() {
            if j == 1 {
                out.push('=');
            }
            for &b in text {
                match b {
                    b' ' => out.push('+'),
                    b if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) => out.push(b as char),
                    b => out.push_str(&format!("%{b:02X}")),
                }
            }
        }
    }
    out
}

/// The text of the first `<name>...</name>` element, XML entities decoded.
fn tag(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&format!("</{name}>"))?;
    let raw = &xml[start..end];
    Some(
        raw.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

/// The session policy for `route`: one Allow statement for the route's service, its actions
/// (explicit, else derived from its methods) and, for S3, the buckets and key patterns its
/// host and paths name (else every resource of those actions).
pub fn session_policy(route: &Route, partition: &str) -> String {
    let signing = route.signing();
    let service = signing.service.as_deref().unwrap_or("*");
    let actions: BTreeSet<String> = if !signing.actions.is_empty() {
        signing.actions.iter().map(|a| a.to_string()).collect()
    } else if service == "s3" {
        route
            .methods()
            .iter()
            .flat_map(|m| s3_actions(m.as_str()))
            .map(|a| format!("s3:{a}"))
            .collect()
    } else {
        std::iter::once(format!("{service}:*")).collect()
    };
    let resources: BTreeSet<String> = if service == "s3" {
        s3_resources(route, partition)
    } else {
        std::iter::once("*".to_owned()).collect()
    };
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Action": actions,
            "Resource": resources,
        }]
    })
    .to_string()
}

/// The S3 actions a method can perform (multipart uploads included).
fn s3_actions(method: &str) -> &'static [&'static str] {
    match method {
        "GET" | "HEAD" => &[
            "GetObject",
            "ListBucket",
            "GetBucketLocation",
            "ListMultipartUploadParts",
            "ListBucketMultipartUploads",
        ],
        "PUT" => &["PutObject"],
        "POST" => &["PutObject", "DeleteObject"],
        "DELETE" => &["DeleteObject", "AbortMultipartUpload"],
        _ => &[],
    }
}

/// The bucket named by a virtual-hosted S3 host (`BUCKET.s3.REGION.amazonaws.com`).
fn virtual_host_bucket(host: &str) -> Option<&str> {
    let host = host.split(':').next().unwrap_or(host);
    let (bucket, rest) = host.split_once('.')?;
    (rest.starts_with("s3.") || rest.starts_with("s3-")).then_some(bucket)
}

/// Bucket and object ARNs for the route's paths: path-style (`/BUCKET/KEY...`) unless the
/// host names the bucket. A wildcard bucket means every resource.
fn s3_resources(route: &Route, partition: &str) -> BTreeSet<String> {
    let arn = |rest: &str| format!("arn:{partition}:s3:::{rest}");
    let host_bucket = virtual_host_bucket(route.host()).filter(|b| *b != "*");
    let mut out = BTreeSet::new();
    for path in route.paths() {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (bucket, key) = match host_bucket {
            Some(b) => (b, &segs[..]),
            None => match segs.split_first() {
                Some((b, key)) if !b.is_empty() && !b.contains('*') => (*b, key),
                _ => return std::iter::once("*".to_owned()).collect(),
            },
        };
        let key: Vec<&str> = key
            .iter()
            .map(|s| if s.contains('*') { "*" } else { s })
            .collect();
        let ends_any = path.ends_with("/**");
        if key.is_empty() || key == [""] || ends_any && key.len() == 1 {
            // The bucket itself (listing) ...
            out.insert(arn(bucket));
        }
        if !key.is_empty() && key != [""] {
            // ... and the objects the key pattern covers (IAM's `*` spans '/').
            out.insert(arn(&format!("{bucket}/{}", key.join("/"))));
        }
    }
    if out.is_empty() {
        out.insert("*".to_owned());
    }
    out
}
