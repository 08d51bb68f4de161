//! The HTTP client kinds use to reach token endpoints (OAuth token and device endpoints, the
//! GitHub App API), and the checks on their URLs.
//!
//! Built on the hyper-util client with rustls that the upstream path and the OpenBao client
//! already use (no second HTTP stack): TLS always verified against the system roots plus the
//! `--upstream-ca` files, one timeout over the whole exchange, answers read up to
//! [`MAX_ANSWER`] bytes into zeroising buffers. Plain `http://` is accepted for loopback hosts
//! only (a provider's development server, the test suite), as RFC 8252 does for redirects.
//!
//! This module must never put a request or answer body into an error or a log line: they carry
//! client secrets, codes and tokens. Errors name the endpoint (scheme, host, path) and the
//! HTTP status.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use zeroize::Zeroizing;

/// Largest token endpoint answer read; a token response is a few kilobytes.
pub const MAX_ANSWER: usize = 1 << 20;

/// Why a token endpoint could not be used. Names the endpoint, never a body.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EndpointError {
    /// The URL is not https (or http to a loopback host), or not a URL.
    #[error("{url:?} is not a usable endpoint URL: {why}")]
    BadUrl {
        /// The URL as configured (operator's own configuration, never a secret).
        url: String,
        /// Why.
        why: &'static str,
    },
    /// The configured CA files cannot be read.
    #[error("cannot read the CA file {path}: {why}")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// No answer within the timeout.
    #[error("{0} did not answer within {1:?}")]
    Timeout(String, Duration),
    /// Connecting or TLS failed, or the exchange broke.
    #[error("{0} cannot be reached ({1})")]
    Unreachable(String, String),
    /// The answer was larger than [`MAX_ANSWER`] or broke off.
    #[error("{0} sent an answer that could not be read")]
    BadAnswer(String),
}

/// The client for token endpoints. Cheap to share behind an `Arc`.
pub struct Endpoints {
    client: crate::tls::OwnClient,
    timeout: Duration,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// An answer: status, content type and body (zeroised on drop).
pub struct Answer {
    /// The HTTP status.
    pub status: StatusCode,
    /// The body, at most [`MAX_ANSWER`] bytes.
    pub body: Zeroizing<Vec<u8>>,
}

impl Endpoints {
    /// A client trusting the system roots plus the PEM files `extra_roots`, giving each
    /// exchange at most `timeout`.
    pub fn new(extra_roots: &[PathBuf], timeout: Duration) -> Result<Endpoints, EndpointError> {
        let mut roots = crate::tls::system_roots();
        for path in extra_roots {
            crate::tls::add_root_file(&mut roots, path).map_err(|why| EndpointError::BadCa {
                path: path.to_owned(),
                why,
            })?;
        }
        let client = crate::tls::own_client(roots, timeout);
        Ok(Endpoints { client, timeout })
    }

    /// The bound on one exchange.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// POST `body` (of `content_type`) to `url` with `headers`, and read the answer.
    pub async fn post(
        &self,
        url: &Uri,
        content_type: &'static str,
        headers: Vec<(header::HeaderName, HeaderValue)>,
        body: Zeroizing<Vec<u8>>,
    ) -> Result<Answer, EndpointError> {
        let shown = shown(url);
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(url.clone())
            .header(header::CONTENT_TYPE, content_type)
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("latchkey/", env!("CARGO_PKG_VERSION")),
            )
            // The body is handed to hyper as `Bytes`, which cannot be zeroised; it lives only
            // for this exchange.
            .body(Full::new(Bytes::copy_from_slice(&body)))
            .map_err(|_| EndpointError::BadUrl {
                url: shown.clone(),
                why: "it cannot be requested",
            })?;
        for (name, value) in headers {
            req.headers_mut().insert(name, value);
        }
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| {
                EndpointError::Unreachable(shown.clone(), cause(&e as &dyn std::error::Error))
            })?;
            let status = resp.status();
            let collected = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|_| EndpointError::BadAnswer(shown.clone()))?;
            Ok(Answer {
                status,
                body: Zeroizing::new(collected.to_bytes().to_vec()),
            })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(EndpointError::Timeout(shown, self.timeout)),
        }
    }
}

/// The innermost cause of a client error, without the URI (hyper-util's messages do not
/// carry bodies; the URI is not included either).
fn cause(e: &dyn std::error::Error) -> String {
    let mut inner = e;
    while let Some(next) = inner.source() {
        inner = next;
    }
    inner.to_string()
}

/// `scheme://host[:port]/path`, for errors and logs: no query (it might carry a secret).
pub fn shown(url: &Uri) -> String {
    format!(
        "{}://{}{}",
        url.scheme_str().unwrap_or("?"),
        url.authority().map_or("?", |a| a.as_str()),
        url.path()
    )
}

/// Check an endpoint URL: `https://`, or `http://` to a loopback host; a host; no user info
/// and no fragment.
pub fn check_url(text: &str) -> Result<Uri, EndpointError> {
    let bad = |why| EndpointError::BadUrl {
        url: text.to_owned(),
        why,
    };
    let uri: Uri = text.parse().map_err(|_| bad("it is not a URL"))?;
    let authority = uri.authority().ok_or_else(|| bad("it has no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("it carries user info"));
    }
    if text.contains('#') {
        return Err(bad("it has a fragment"));
    }
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if is_loopback(authority.host()) => Ok(uri),
        Some("http") => Err(bad(
            "plain http is allowed only to a loopback host; use https",
        )),
        _ => Err(bad("it must be an https:// URL")),
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `application/x-www-form-urlencoded` of `pairs`, in a zeroising buffer.
pub fn form(pairs: &[(&str, &str)]) -> Zeroizing<Vec<u8>> {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    Zeroizing::new(s.finish().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_must_be_https_or_loopback_http() {
        assert!(check_url("https://github.com/login/oauth/access_token").is_ok());
        assert!(check_url("http://127.0.0.1:8080/token").is_ok());
        assert!(check_url("http://localhost:1/token").is_ok());
        assert!(check_url("http://[::1]:9/token").is_ok());
        for bad in [
            "http://auth.example.com/token",
            "ftp://x/y",
            "not a url",
            "https://user:pw@auth.example.com/token",
            "https://auth.example.com/token#frag",
            "/token",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shown_urls_drop_the_query() {
        let u: Uri = "https://a.example/t?code=sekrit".parse().unwrap();
        assert_eq!(shown(&u), "https://a.example/t");
    }

    #[test]
    fn forms_are_percent_encoded() {
        let f = form(&[("a", "b c"), ("x", "&=")]);
        assert_eq!(&f[..], b"a=b+c&x=%26%3D");
    }
}
