//! Shared setup for integration tests: a throwaway upstream PKI, a real HTTPS (and plain HTTP)
//! echo upstream on 127.0.0.1:0 that reports exactly what it received, and a harness that
//! starts latchkey in a temp dir: in-process through `latchkey::app::run` (its own runtime and
//! its own log, on port 0) by default, or the real binary where a test is about the process
//! (signals, environment, standard output, memory). Nothing here contacts anything outside
//! loopback.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::Value;

/// Host names the test upstream's certificate covers.
pub const API_HOST: &str = "api.example.test";
pub const OTHER_HOST: &str = "other.example.test";
/// The real secret injected by latchkey in tests.
pub const SECRET: &str = "s3cr3t-UPSTREAM-value-9f8e7d";
/// What agents try to smuggle as their own credential.
pub const AGENT_OWN: &str = "agent-own-credential-1234";

/// A test CA and a leaf for the upstream (API_HOST, OTHER_HOST, localhost, 127.0.0.1).
pub struct UpstreamPki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl UpstreamPki {
    pub fn new() -> UpstreamPki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "latchkey test upstream CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let issuer = CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let ca_pem = issuer.as_ref().pem();
        let leaf_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![
            API_HOST.to_string(),
            OTHER_HOST.to_string(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .unwrap();
        params.distinguished_name.push(DnType::CommonName, API_HOST);
        let leaf = params.signed_by(&leaf_key, &issuer).unwrap();
        UpstreamPki {
            ca_pem,
            cert_pem: leaf.pem(),
            key_pem: leaf_key.serialize_pem(),
        }
    }

    fn server_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let certs = rustls_pemfile::certs(&mut self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut self.key_pem.as_bytes())
            .unwrap()
            .unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }
}

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// The authority the request named (`:authority` on HTTP/2, else `Host`).
    pub authority: Option<String>,
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
    /// The request's trailers, once the echo has read the body (empty until then, and for
    /// the special paths that never read it).
    pub trailers: Vec<(String, String)>,
    /// The body bytes received so far (echo paths only).
    pub body: Vec<u8>,
    /// `Some(true)` once the body ended cleanly, `Some(false)` if it broke off (an aborted
    /// upload), `None` while it is still being read.
    pub body_complete: Option<bool>,
}

impl Seen {
    /// Every header and trailer and the query, as one string, to search for leaked values.
    pub fn everything(&self) -> String {
        let mut s = format!("{} {} {:?}\n", self.method, self.path, self.query);
        for (k, v) in self.headers.iter().chain(&self.trailers) {
            s.push_str(&format!("{k}: {v}\n"));
        }
        s
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn header_pairs(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// A real upstream: HTTPS and plain HTTP listeners on loopback, echoing what they received as
/// JSON. `/big?bytes=N` streams N bytes without buffering them; `/switch` answers
/// `101 Switching Protocols`.
pub struct Upstream {
    pub https_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// HTTPS that offers only HTTP/1.1 by ALPN (latchkey speaks HTTP/2 to `https_addr`), for
    /// answers only HTTP/1 has, such as a 101.
    pub https1_addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// TCP connections accepted by the HTTPS listener (to prove pooling).
    pub tls_connections: Arc<std::sync::atomic::AtomicUsize>,
    /// The same for the HTTP/1.1-only listener.
    pub tls1_connections: Arc<std::sync::atomic::AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

impl Upstream {
    pub fn start(pki: &UpstreamPki) -> Upstream {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let cfg = pki.server_config(&[b"h2", b"http/1.1"]);
        let cfg1 = pki.server_config(&[b"http/1.1"]);
        let tls_connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = tls_connections.clone();
        let tls1_connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter1 = tls1_connections.clone();
        let (https_addr, http_addr, https1_addr) = runtime.block_on(async {
            let tls_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let plain_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let tls1_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addrs = (
                tls_listener.local_addr().unwrap(),
                plain_listener.local_addr().unwrap(),
                tls1_listener.local_addr().unwrap(),
            );
            tokio::spawn(accept_tls(tls_listener, cfg, seen.clone(), counter));
            tokio::spawn(accept_plain(plain_listener, seen.clone()));
            tokio::spawn(accept_tls(tls1_listener, cfg1, seen.clone(), counter1));
            addrs
        });
        Upstream {
            https_addr,
            http_addr,
            https1_addr,
            seen,
            tls_connections,
            tls1_connections,
            _runtime: runtime,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn accept_tls(
    listener: tokio::net::TcpListener,
    cfg: Arc<rustls::ServerConfig>,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        connections.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let acceptor = acceptor.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let svc = service_fn(move |req| {
                let seen = seen.clone();
                async move { Ok::<_, Infallible>(echo(req, seen).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

async fn accept_plain(listener: tokio::net::TcpListener, seen: Arc<Mutex<Vec<Seen>>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let seen = seen.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let seen = seen.clone();
                async move { Ok::<_, Infallible>(echo(req, seen).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

type EchoBody = BoxBody<Bytes, Infallible>;

async fn echo(req: Request<Incoming>, seen: Arc<Mutex<Vec<Seen>>>) -> Response<EchoBody> {
    let record = Seen {
        method: req.method().to_string(),
        authority: req.uri().authority().map(|a| a.to_string()).or_else(|| {
            req.headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        }),
        path: req.uri().path().to_string(),
        query: req.uri().query().map(str::to_string),
        headers: header_pairs(req.headers()),
        trailers: Vec::new(),
        body: Vec::new(),
        body_complete: None,
    };
    let index = {
        let mut seen = seen.lock().unwrap();
        seen.push(record.clone());
        seen.len() - 1
    };
    if req.uri().path() == "/acme/empty.git/info/refs"
        && req.uri().query() == Some("service=git-upload-pack")
    {
        // An empty repository: `git clone` succeeds on this advertisement alone.
        let mut body = pkt_line(b"# service=git-upload-pack\n");
        body.extend_from_slice(b"0000");
        body.extend(pkt_line(
            b"0000000000000000000000000000000000000000 capabilities^{}\0side-band-64k\n",
        ));
        body.extend_from_slice(b"0000");
        let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
        resp.headers_mut().insert(
            "content-type",
            "application/x-git-upload-pack-advertisement"
                .parse()
                .unwrap(),
        );
        return resp;
    }
    if req.uri().path().ends_with("/info/refs")
        && req.uri().query() == Some("service=git-upload-pack")
    {
        return git_upload_pack_advertisement();
    }
    if req.uri().path() == "/reflect" || req.uri().path() == "/reflect-split" {
        return reflect(&record, req.uri().path() == "/reflect-split");
    }
    if req.uri().path() == "/reflect-encoded" {
        return reflect_encoded(&record);
    }
    if req.uri().path() == "/reflect-compressed" {
        return reflect_compressed(
            &record,
            req.uri()
                .query()
                .and_then(|q| q.strip_prefix("enc="))
                .unwrap_or(""),
        )
        .await;
    }
    if req.uri().path() == "/drip" || req.uri().path() == "/drip-split" {
        return drip(&record, req.uri().path() == "/drip-split");
    }
    if req.uri().path() == "/v1/chat/completions" || req.uri().path() == "/v1/messages" {
        return fake_llm(req, seen, index).await;
    }
    if req.uri().path() == "/switch" {
        // Switches protocols whether or not the request asked to (a hostile or broken upstream).
        let mut resp = Response::new(Full::new(Bytes::new()).boxed());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        resp.headers_mut()
            .insert("upgrade", "websocket".parse().unwrap());
        return resp;
    }
    if req.uri().path() == "/stall" {
        // One chunk, then silence for a minute, then the end: a stream that stalls.
        let stream = futures_util::stream::unfold(0u8, |i| async move {
            match i {
                0 => Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"first chunk\n"))),
                    1,
                )),
                1 => {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Some((Ok(Frame::data(Bytes::from_static(b"too late\n"))), 2))
                }
                _ => None,
            }
        });
        return Response::new(StreamBody::new(stream).boxed());
    }
    if req.uri().path() == "/ws-bad-accept" {
        // A WebSocket switch whose accept value answers some other key (RFC 6455's example
        // key, which the tests never send).
        let mut resp = Response::new(Full::new(Bytes::new()).boxed());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert("connection", "Upgrade".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert(
            "sec-websocket-accept",
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".parse().unwrap(),
        );
        return resp;
    }
    if req.uri().path() == "/redirect" {
        // Points at another allowed-looking place: latchkey must pass this on, not follow it.
        let mut resp = Response::new(Full::new(Bytes::new()).boxed());
        *resp.status_mut() = StatusCode::FOUND;
        resp.headers_mut().insert(
            "location",
            format!("https://{OTHER_HOST}/collect").parse().unwrap(),
        );
        return resp;
    }
    if let Some(rest) = req.uri().path().strip_prefix("/delay/") {
        // `/delay/<ms>/<anything>`: seen at once, answered after <ms> (cancellation tests).
        let ms: u64 = rest
            .split('/')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if req.uri().path() == "/slow" {
        // Answers only after a long pause: for "a slow upstream blocks nobody else".
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    if req.uri().path() == "/big" {
        let n: u64 = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("bytes="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        return stream_bytes(n);
    }
    // Count the body as it streams in; never hold it.
    let mut body = req.into_body();
    let mut body_len = 0usize;
    let mut complete = true;
    loop {
        let frame = match body.frame().await {
            Some(Ok(frame)) => frame,
            Some(Err(_)) => {
                complete = false;
                break;
            }
            None => break,
        };
        if let Some(data) = frame.data_ref() {
            body_len += data.len();
            // Kept for the tripwire tests (small bodies); large uploads are only counted.
            let mut seen = seen.lock().unwrap();
            if seen[index].body.len() < 1 << 20 {
                seen[index].body.extend_from_slice(data);
            }
        }
        if let Some(trailers) = frame.trailers_ref() {
            seen.lock().unwrap()[index].trailers = header_pairs(trailers);
        }
    }
    seen.lock().unwrap()[index].body_complete = Some(complete);
    if !complete {
        return Response::new(Full::new(Bytes::new()).boxed());
    }
    let mut headers = BTreeMap::new();
    for (k, v) in &record.headers {
        headers
            .entry(k.clone())
            .or_insert_with(Vec::new)
            .push(v.clone());
    }
    let json = serde_json::json!({
        "method": record.method, "path": record.path, "query": record.query,
        "headers": headers, "body_len": body_len,
    });
    let mut resp = Response::new(Full::new(Bytes::from(json.to_string())).boxed());
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    // An upstream trying to spoof a proxy verdict: latchkey must strip this.
    resp.headers_mut().insert(
        "x-latchkey-request-id",
        "spoofed-by-upstream".parse().unwrap(),
    );
    resp
}

/// Events a streamed fake completion sends, [`LLM_EVENT_GAP`] apart.
pub const LLM_EVENTS: usize = 4;
/// The pause between two events of a streamed fake completion.
pub const LLM_EVENT_GAP: Duration = Duration::from_millis(400);

/// A fake OpenAI-compatible (`/v1/chat/completions`) and Anthropic-compatible (`/v1/messages`)
/// API: reads the JSON request (kept in `seen`), answers with a completion whose text is
/// `"hello from the fake API"`, or with `"stream": true`, as server-sent events in the
/// provider's format, [`LLM_EVENTS`] content events [`LLM_EVENT_GAP`] apart (the words
/// `w0 `, `w1 `...), so a client can tell a stream that arrives as it is produced from one
/// that was buffered.
async fn fake_llm(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    index: usize,
) -> Response<EchoBody> {
    let anthropic = req.uri().path() == "/v1/messages";
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let Ok(body) = body else {
        seen.lock().unwrap()[index].body_complete = Some(false);
        return Response::new(Full::new(Bytes::new()).boxed());
    };
    {
        let mut seen = seen.lock().unwrap();
        seen[index].body = body.to_vec();
        seen[index].body_complete = Some(true);
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = request["model"]
        .as_str()
        .unwrap_or("fake-model")
        .to_string();
    let stream = request["stream"].as_bool().unwrap_or(false);
    let json_response = |v: Value| {
        let mut resp = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
        resp.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        resp
    };
    if !stream {
        return json_response(if anthropic {
            serde_json::json!({
                "id": "msg_fake1", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "hello from the fake API"}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 3, "output_tokens": 5}
            })
        } else {
            serde_json::json!({
                "id": "chatcmpl-fake1", "object": "chat.completion", "created": 1700000000,
                "model": model,
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null,
                    "message": {"role": "assistant", "content": "hello from the fake API", "refusal": null}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
            })
        });
    }
    let mut events: Vec<String> = Vec::new();
    let sse = |event: Option<&str>, data: Value| match event {
        Some(e) => format!("event: {e}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    };
    if anthropic {
        events.push(sse(Some("message_start"), serde_json::json!({"type": "message_start", "message": {
            "id": "msg_fake1", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 3, "output_tokens": 0}}})));
        events.push(sse(
            Some("content_block_start"),
            serde_json::json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        ));
    }
    for i in 0..LLM_EVENTS {
        let word = format!("w{i} ");
        events.push(if anthropic {
            sse(
                Some("content_block_delta"),
                serde_json::json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": word}}),
            )
        } else {
            sse(
                None,
                serde_json::json!({"id": "chatcmpl-fake1", "object": "chat.completion.chunk",
                "created": 1700000000, "model": model,
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": null}]}),
            )
        });
    }
    if anthropic {
        events.push(
            sse(Some("content_block_stop"), serde_json::json!({"type": "content_block_stop", "index": 0}))
                + &sse(Some("message_delta"), serde_json::json!({"type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 5}}))
                + &sse(Some("message_stop"), serde_json::json!({"type": "message_stop"})),
        );
    } else {
        events.push(
            sse(
                None,
                serde_json::json!({"id": "chatcmpl-fake1", "object": "chat.completion.chunk",
                "created": 1700000000, "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            ) + "data: [DONE]\n\n",
        );
    }
    // The head and the opening events go at once; each content event after a pause.
    let first_content = if anthropic { 2 } else { 0 };
    let stream = futures_util::stream::unfold(0usize, move |i| {
        let event = events.get(i).cloned();
        async move {
            let event = event?;
            if i > first_content {
                tokio::time::sleep(LLM_EVENT_GAP).await;
            }
            Some((Ok::<_, Infallible>(Frame::data(Bytes::from(event))), i + 1))
        }
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    resp.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    resp.headers_mut()
        .insert("cache-control", "no-cache".parse().unwrap());
    resp
}

/// The commit id every ref of the test git endpoint points at.
pub const GIT_HEAD: &str = "8f3b6c2a1d4e5f60718293a4b5c6d7e8f9012345";

/// One git pkt-line: four hex digits giving the length including themselves, then the payload.
pub fn pkt_line(payload: &[u8]) -> Vec<u8> {
    let mut out = format!("{:04x}", payload.len() + 4).into_bytes();
    out.extend_from_slice(payload);
    out
}

/// A minimal git smart-HTTP ref advertisement (protocol v0) for
/// `GET <repo>/info/refs?service=git-upload-pack`: HEAD and refs/heads/main at [`GIT_HEAD`].
fn git_upload_pack_advertisement() -> Response<EchoBody> {
    let mut body = pkt_line(b"# service=git-upload-pack\n");
    body.extend_from_slice(b"0000");
    body.extend(pkt_line(
        format!("{GIT_HEAD} HEAD\0side-band-64k\n").as_bytes(),
    ));
    body.extend(pkt_line(format!("{GIT_HEAD} refs/heads/main\n").as_bytes()));
    body.extend_from_slice(b"0000");
    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
    resp.headers_mut().insert(
        "content-type",
        "application/x-git-upload-pack-advertisement"
            .parse()
            .unwrap(),
    );
    resp.headers_mut()
        .insert("cache-control", "no-cache".parse().unwrap());
    resp
}

/// An upstream that echoes the received `authorization` value back to the caller, in the body
/// and in the `x-debug-auth` response header (the tokenizer "echo exfiltration" class).
/// `split` streams the body in two chunks with a pause between them, cutting the value in half,
/// so a redactor that looks at one chunk at a time misses it.
fn reflect(record: &Seen, split: bool) -> Response<EchoBody> {
    let auth = record.header("authorization").unwrap_or("").to_string();
    let body = format!("{{\"you_sent\":\"{auth}\"}}");
    let mut resp = if split {
        let cut = 14 + auth.len() / 2;
        let first = Bytes::from(body[..cut].to_string());
        let second = Bytes::from(body[cut..].to_string());
        let stream = futures_util::stream::unfold(0u8, move |step| {
            let (first, second) = (first.clone(), second.clone());
            async move {
                match step {
                    0 => Some((Ok::<_, Infallible>(Frame::data(first)), 1)),
                    1 => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Some((Ok(Frame::data(second)), 2))
                    }
                    _ => None,
                }
            }
        });
        Response::new(StreamBody::new(stream).boxed())
    } else {
        Response::new(Full::new(Bytes::from(body)).boxed())
    };
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    if let Ok(v) = auth.parse() {
        resp.headers_mut().insert("x-debug-auth", v);
    }
    resp
}

/// The credential the request carried (`authorization: Bearer <it>`), as the upstream got it.
fn received_secret(record: &Seen) -> String {
    let auth = record.header("authorization").unwrap_or("");
    auth.strip_prefix("Bearer ").unwrap_or(auth).to_string()
}

/// Echoes the received credential in the encodings debug endpoints and SDKs use, one per
/// line as `name=value`: base64 (alone, and inside a longer URL-safe run at each alignment),
/// hex in both cases, JSON `\u00XX` escapes and percent-encoding of every byte.
fn reflect_encoded(record: &Seen) -> Response<EchoBody> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use base64::Engine;
    let secret = received_secret(record);
    let mut lines = vec![
        format!("b64={}", STANDARD.encode(&secret)),
        format!("hex={}", hex::encode(&secret)),
        format!("HEX={}", hex::encode_upper(&secret)),
        format!(
            "json_u={}",
            secret
                .bytes()
                .map(|b| format!("\\u{b:04x}"))
                .collect::<String>()
        ),
        format!(
            "pct={}",
            secret
                .bytes()
                .map(|b| format!("%{b:02X}"))
                .collect::<String>()
        ),
    ];
    for pad in ["", "x", "xy"] {
        let run = URL_SAFE_NO_PAD.encode(format!("{{\"user\":1,\"k\":\"{pad}{secret}\",\"n\":2}}"));
        lines.push(format!("b64url_in_run{}={run}", pad.len()));
    }
    let mut resp = Response::new(Full::new(Bytes::from(lines.join("\n") + "\n")).boxed());
    resp.headers_mut()
        .insert("content-type", "text/plain".parse().unwrap());
    resp
}

/// Echoes the request headers as JSON (like `/reflect`), compressed with the coding named by
/// the query (`gzip`, `deflate`, `br`, `zstd`; anything else is sent as garbage under that
/// name) whatever the request's `accept-encoding` said: an upstream that ignores `identity`.
async fn reflect_compressed(record: &Seen, coding: &str) -> Response<EchoBody> {
    use async_compression::tokio::bufread::{BrotliEncoder, GzipEncoder, ZlibEncoder, ZstdEncoder};
    use tokio::io::AsyncReadExt;
    let body = format!(
        "{{\"you_sent\":\"{}\",\"pad\":\"{}\"}}",
        record.header("authorization").unwrap_or(""),
        "lorem ipsum ".repeat(200)
    );
    let plain = body.as_bytes();
    let mut out = Vec::new();
    match coding {
        "gzip" => GzipEncoder::new(plain).read_to_end(&mut out).await,
        "deflate" => ZlibEncoder::new(plain).read_to_end(&mut out).await,
        "br" => BrotliEncoder::new(plain).read_to_end(&mut out).await,
        "zstd" => ZstdEncoder::new(plain).read_to_end(&mut out).await,
        _ => {
            out.extend_from_slice(b"\x1f\x9d garbage");
            Ok(0)
        }
    }
    .unwrap();
    let mut resp = Response::new(Full::new(Bytes::from(out)).boxed());
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    resp.headers_mut()
        .insert("content-encoding", coding.parse().unwrap());
    resp
}

/// Microseconds since the Unix epoch: the upstream stamps each `/drip` chunk with it and the
/// agent (same machine, same clock) measures how late the chunk reached it.
pub fn now_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

/// Chunks of `/drip`, 200 ms apart.
pub const DRIP_CHUNKS: usize = 5;
/// What every `/drip` chunk ends with: the first bytes of the credential it received.
pub const DRIP_TAIL: usize = 3;

/// A token stream whose chunks, 200 ms apart, each end with the first bytes of the received
/// credential: `<i:sent_us>` + `secret[..DRIP_TAIL]`. With `split`, two chunks 200 ms apart
/// that cut the whole credential in two: `token ` + its first 10 bytes, then the rest + ` end`.
fn drip(record: &Seen, split: bool) -> Response<EchoBody> {
    let secret = received_secret(record);
    let chunks: Vec<String> = if split {
        vec![
            format!("token {}", &secret[..10]),
            format!("{} end", &secret[10..]),
        ]
    } else {
        (0..DRIP_CHUNKS)
            .map(|i| format!("<{i}:{{us}}>{}", &secret[..DRIP_TAIL]))
            .collect()
    };
    let stream = futures_util::stream::unfold(0usize, move |i| {
        let chunk = chunks.get(i).cloned();
        async move {
            let chunk = chunk?;
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let chunk = chunk.replace("{us}", &now_us().to_string());
            Some((Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))), i + 1))
        }
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    resp.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    resp
}

fn stream_bytes(n: u64) -> Response<EchoBody> {
    const CHUNK: usize = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let stream = futures_util::stream::unfold(n, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let take = left.min(CHUNK as u64) as usize;
            Some((
                Ok::<_, Infallible>(Frame::data(chunk.slice(..take))),
                left - take as u64,
            ))
        }
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut()
        .insert("content-length", n.to_string().parse().unwrap());
    resp
}

/// A latchkey home: policies/, certs/, state/ in a temp dir, and the upstream it talks to.
pub struct Home {
    pub dir: tempfile::TempDir,
    pub upstream: Upstream,
    pub upstream_ca: PathBuf,
    /// The upstream's leaf certificate and key (PEM files), for upstreams a test starts
    /// itself (gRPC, WebSocket servers in Python).
    pub upstream_cert: PathBuf,
    pub upstream_key: PathBuf,
}

impl Home {
    pub fn new() -> Home {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("policies")).unwrap();
        let pki = UpstreamPki::new();
        let upstream_ca = dir.path().join("upstream-ca.pem");
        std::fs::write(&upstream_ca, &pki.ca_pem).unwrap();
        let upstream_cert = dir.path().join("upstream-cert.pem");
        let upstream_key = dir.path().join("upstream-key.pem");
        std::fs::write(&upstream_cert, &pki.cert_pem).unwrap();
        std::fs::write(&upstream_key, &pki.key_pem).unwrap();
        let upstream = Upstream::start(&pki);
        Home {
            dir,
            upstream,
            upstream_ca,
            upstream_cert,
            upstream_key,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn state(&self) -> PathBuf {
        self.path().join("state")
    }
    pub fn latchkey_ca(&self) -> PathBuf {
        self.path().join("certs/ca.crt")
    }
    /// `https://api.example.test:PORT` (the port of the local upstream).
    pub fn api_url(&self, path: &str) -> String {
        format!(
            "https://{API_HOST}:{}{path}",
            self.upstream.https_addr.port()
        )
    }
    pub fn https_port(&self) -> u16 {
        self.upstream.https_addr.port()
    }
    pub fn http_port(&self) -> u16 {
        self.upstream.http_addr.port()
    }

    /// The binary with the three global dirs pointing into this home.
    pub fn cmd(&self) -> Command {
        self.cmd_in(&self.state())
    }

    /// The binary with this home's policies and certs but another state dir (a second
    /// replica that shares nothing on disk but the policies and the CA).
    pub fn cmd_in(&self, state: &Path) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_latchkey"));
        c.arg("--policies")
            .arg(self.path().join("policies"))
            .arg("--certs")
            .arg(self.path().join("certs"))
            .arg("--state-dir")
            .arg(state)
            .env_remove("LATCHKEY_MASTER_KEY")
            .env("RUST_LOG", "info");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    pub fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "latchkey {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn write_policy(&self, file: &str, text: &str) {
        std::fs::write(self.path().join("policies").join(file), text).unwrap();
    }

    /// A standard policy: agent `bot` with a header-injected read route on the upstream.
    pub fn standard_policy(&self) {
        self.standard_policy_with("");
    }

    /// The standard policy with `more_routes` (TOML `[[routes]]` tables) after its own.
    pub fn standard_policy_with(&self, more_routes: &str) {
        let port = self.https_port();
        let http_port = self.http_port();
        self.write_policy(
            "bot.toml",
            &format!(
                r#"agent = "bot"
max_ttl = "1h"

[[routes]]
id = "issues-read"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/repos/acme/backend/issues", "/repos/acme/backend/issues/**", "/big", "/redirect", "/slow", "/delay/**"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}

[[routes]]
id = "issues-write"
host = "{API_HOST}:{port}"
methods = ["POST"]
paths = ["/repos/acme/backend/issues", "/delay/**"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}

[[routes]]
id = "query-key"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/search"]
credential = "github"
inject = {{ query = "api_key" }}

[[routes]]
id = "basic"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/basic"]
credential = "github"
inject = {{ basic_user = "bot-user" }}

[[routes]]
id = "missing-secret"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = ["/missing"]
credential = "not-stored"
inject = {{ header = "x-api-key", value = "{{secret}}" }}

[[routes]]
id = "plain-insecure"
host = "plain.example.test:{http_port}"
methods = ["GET"]
paths = ["/plain/**"]
credential = "github"
inject = {{ header = "x-api-key", value = "{{secret}}" }}
insecure_http = true

[[routes]]
id = "plain-credential-no-opt-in"
host = "nocreds.example.test:{http_port}"
methods = ["GET"]
paths = ["/**"]
credential = "github"
inject = {{ header = "x-api-key", value = "{{secret}}" }}
{more_routes}"#
            ),
        );
    }

    /// `latchkey secret set NAME [--kind KIND]` with `input` on standard input: the outcome,
    /// for tests that expect a refusal.
    pub fn secret_set(&self, name: &str, kind: Option<&str>, input: &[u8]) -> Output {
        let mut cmd = self.cmd();
        cmd.args(["secret", "set", name]);
        if let Some(kind) = kind {
            cmd.args(["--kind", kind]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    /// Store a static secret (one trailing newline, as `echo` would send, is dropped).
    pub fn set_secret(&self, name: &str, value: &str) {
        let out = self.secret_set(name, None, format!("{value}\n").as_bytes());
        assert!(out.status.success(), "{}", stderr(&out));
    }

    /// Store a typed credential of `kind` from its TOML document.
    pub fn set_typed(&self, name: &str, kind: &str, doc: &str) {
        let out = self.secret_set(name, Some(kind), doc.as_bytes());
        assert!(out.status.success(), "{}", stderr(&out));
    }

    pub fn issue(&self, agent: &str, extra: &[&str]) -> String {
        let mut args = vec!["token", "issue", "--agent", agent];
        args.extend_from_slice(extra);
        self.run_ok(&args).trim().to_string()
    }

    /// Start latchkey in-process on 127.0.0.1:0 with the upstream pinned and trusted; `extra`
    /// are `serve` flags, parsed exactly as the binary parses them.
    pub fn serve(&self, extra: &[&str]) -> Proxy {
        self.serve_in(&self.state(), extra)
    }

    /// `serve` with extra environment variables (e.g. an OpenBao token, never on argv): the
    /// real binary, since the environment is per process.
    pub fn serve_env(&self, extra: &[&str], envs: &[(&str, &str)]) -> Proxy {
        self.serve_full(&self.state(), extra, envs)
    }

    /// In-process `serve`, with its state (keys, secrets, revocations, audit log) in `state`.
    pub fn serve_in(&self, state: &Path, extra: &[&str]) -> Proxy {
        let mut args: Vec<std::ffi::OsString> = vec!["latchkey".into()];
        args.extend(self.global_args(state));
        args.extend(self.serve_args(extra));
        Proxy::in_process(
            latchkey::cli::serve_config_from_args(args)
                .unwrap_or_else(|e| panic!("serve flags {extra:?}: {e:#}")),
        )
    }

    /// `api.example.test:PORT`, the authority the standard routes name.
    pub fn api_authority(&self) -> String {
        format!("{API_HOST}:{}", self.https_port())
    }

    /// A CONNECT tunnel to the test API through `proxy` as the holder of `token`, TLS on
    /// top (SNI `api.example.test`, latchkey's CA trusted), for raw bytes.
    pub fn tunnel(&self, proxy: &Proxy, token: &str) -> RawTunnel {
        RawTunnel::open(
            proxy.addr,
            &self.api_authority(),
            token,
            API_HOST,
            &self.latchkey_ca(),
        )
        .expect("a tunnel to the test API")
    }

    /// The typed config `serve` would build for this home (port 0 for both listeners, the
    /// upstream CA trusted, the test hosts pinned), to adjust field by field and start with
    /// [`Proxy::in_process`].
    pub fn config(&self) -> latchkey::app::ServeConfig {
        let mut cfg = latchkey::app::ServeConfig::new(
            self.path().join("policies"),
            self.path().join("certs"),
            self.state(),
        );
        cfg.listen = "127.0.0.1:0".parse().unwrap();
        cfg.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        cfg.upstream_ca = vec![self.upstream_ca.clone()];
        cfg.resolve = [
            (API_HOST, self.https_port()),
            (OTHER_HOST, self.https_port()),
            ("plain.example.test", self.http_port()),
            ("nocreds.example.test", self.http_port()),
        ]
        .iter()
        .map(|(host, port)| format!("{host}:{port}:127.0.0.1").parse().unwrap())
        .collect();
        cfg
    }

    /// In-process, with exactly these `serve` arguments (no pins, no upstream CA added).
    pub fn serve_exactly(&self, serve_args: &[&str]) -> Proxy {
        let mut args: Vec<std::ffi::OsString> = vec!["latchkey".into()];
        args.extend(self.global_args(&self.state()));
        args.extend(serve_args.iter().map(Into::into));
        let cfg = latchkey::cli::serve_config_from_args(args)
            .unwrap_or_else(|e| panic!("serve flags {serve_args:?}: {e:#}"));
        Proxy::in_process(cfg)
    }

    /// The real `latchkey serve` binary on 127.0.0.1:0 (for signals, memory, stdout).
    pub fn serve_binary(&self, extra: &[&str]) -> Proxy {
        self.serve_full(&self.state(), extra, &[])
    }

    /// The three global directory flags.
    fn global_args(&self, state: &Path) -> Vec<std::ffi::OsString> {
        vec![
            "--policies".into(),
            self.path().join("policies").into(),
            "--certs".into(),
            self.path().join("certs").into(),
            "--state-dir".into(),
            state.into(),
        ]
    }

    /// `serve` on port 0, the upstream CA trusted, the test hosts pinned, then `extra`.
    fn serve_args(&self, extra: &[&str]) -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = vec![
            "serve".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--admin-listen".into(),
            "127.0.0.1:0".into(),
            "--upstream-ca".into(),
            self.upstream_ca.clone().into(),
        ];
        for (host, port) in [
            (API_HOST, self.https_port()),
            (OTHER_HOST, self.https_port()),
            ("plain.example.test", self.http_port()),
            ("nocreds.example.test", self.http_port()),
        ] {
            v.push("--resolve".into());
            v.push(format!("{host}:{port}:127.0.0.1").into());
        }
        v.extend(extra.iter().map(Into::into));
        v
    }

    /// The real binary with its own state dir and extra environment variables.
    pub fn serve_full(&self, state: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Proxy {
        let mut cmd = self.cmd_in(state);
        cmd.envs(envs.iter().copied());
        cmd.args(self.serve_args(extra))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("latchkey listening on ")
            .unwrap_or_else(|| {
                let _ = child.kill();
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
                panic!("latchkey serve did not start: {line:?} {err}")
            })
            .parse()
            .unwrap();
        let mut admin_line = String::new();
        reader.read_line(&mut admin_line).unwrap();
        let admin_addr = admin_line
            .trim()
            .strip_prefix("latchkey admin on ")
            .and_then(|a| a.parse().ok());
        // Keep draining stderr so the child never blocks on a full pipe.
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut l = String::new();
            while r.read_line(&mut l).map(|n| n > 0).unwrap_or(false) {
                log2.lock().unwrap().push_str(&l);
                l.clear();
            }
        });
        Proxy {
            run: Run::Process {
                child,
                _stdout: reader,
            },
            addr,
            admin_addr,
            tls_addr: None,
            log,
        }
    }

    /// Parsed audit lines. Only whole lines: a file read while the writer's `write` is copying
    /// a line across a page boundary can end mid-line (seen once in 262 tests), and the rest
    /// of that line is there on the next read.
    pub fn audit(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.state().join("audit.jsonl")).unwrap_or_default();
        text.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// Wait (bounded) until the audit log has at least n lines: the writer is asynchronous.
    pub fn wait_audit(&self, n: usize) -> Vec<Value> {
        for _ in 0..200 {
            let lines = self.audit();
            if lines.len() >= n {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("audit log never reached {n} lines: {:?}", self.audit());
    }

    pub fn curl(&self, proxy: &Proxy, token: &str, extra: &[&str], url: &str) -> Curl {
        let out = Command::new("curl")
            .args(["-sS", "--noproxy", "", "--max-time", "30"])
            .arg("--proxy")
            .arg(format!("http://agent:{token}@{}", proxy.addr))
            .arg("--cacert")
            .arg(self.latchkey_ca())
            .args([
                "-o",
                "-",
                "-D",
                "/dev/stderr",
                "-w",
                "\n%{http_code} %{http_connect}",
            ])
            .args(extra)
            .arg(url)
            .output()
            .expect("curl is installed (scripts/test installs it)");
        Curl::from(out)
    }
}

/// A curl result: body, status of the final response, status of the CONNECT.
#[derive(Debug)]
pub struct Curl {
    pub body: String,
    pub status: u16,
    pub connect_status: u16,
    pub headers: String,
    pub exit: i32,
}

impl Curl {
    fn from(out: Output) -> Curl {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, codes) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        let mut codes = codes.split_whitespace();
        let status = codes.next().and_then(|c| c.parse().ok()).unwrap_or(0);
        let connect_status = codes.next().and_then(|c| c.parse().ok()).unwrap_or(0);
        Curl {
            body: body.to_string(),
            status,
            connect_status,
            headers: String::from_utf8_lossy(&out.stderr).into_owned(),
            exit: out.status.code().unwrap_or(-1),
        }
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} headers {}", self.body, self.headers))
    }
}

/// A running proxy: in-process (stopped and drained on drop) or the real binary (killed on
/// drop).
pub struct Proxy {
    run: Run,
    pub addr: SocketAddr,
    /// The admin listener (/healthz, /metrics), when enabled.
    pub admin_addr: Option<SocketAddr>,
    /// The TLS listener (`--listen-tls`), when enabled (in-process proxies only).
    pub tls_addr: Option<SocketAddr>,
    log: Arc<Mutex<String>>,
}

enum Run {
    /// `latchkey::app::run` on a runtime of its own, in a thread of its own.
    InProcess {
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<Result<u64, String>>>,
    },
    /// The binary.
    Process {
        child: Child,
        _stdout: BufReader<std::process::ChildStdout>,
    },
}

/// Collects one in-process proxy's tracing output.
#[derive(Clone)]
struct LogSink(Arc<Mutex<String>>);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap()
            .push_str(&String::from_utf8_lossy(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Proxy {
    /// Start `cfg` in-process. Its runtime's threads log (at info, like the binary) into this
    /// proxy's own log, so tests running side by side never see each other's lines.
    pub fn in_process(cfg: latchkey::app::ServeConfig) -> Proxy {
        let log = Arc::new(Mutex::new(String::new()));
        let sink = LogSink(log.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        let dispatch = tracing::Dispatch::new(subscriber);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let for_workers = dispatch.clone();
            // The runtime the binary would build for this config (`--worker-threads`).
            let rt = latchkey::app::runtime_builder(cfg.worker_threads)
                .enable_all()
                .on_thread_start(move || {
                    // Kept for the thread's whole life: the guard is never dropped.
                    std::mem::forget(tracing::dispatcher::set_default(&for_workers));
                })
                .build()
                .expect("a test runtime starts");
            let _default = tracing::dispatcher::set_default(&dispatch);
            rt.block_on(async move {
                let running = match latchkey::app::run(cfg).await {
                    Ok(r) => r,
                    Err(e) => {
                        let msg = error_chain(&e);
                        let _ = ready_tx.send(Err(msg.clone()));
                        return Err(msg);
                    }
                };
                let _ = ready_tx.send(Ok((running.addr, running.admin_addr, running.tls_addr)));
                let _ = stop_rx.await;
                running
                    .shutdown()
                    .await
                    .map(|s| s.audit_lines)
                    .map_err(|e| error_chain(&e))
            })
        });
        let (addr, admin_addr, tls_addr) = ready_rx
            .recv()
            .expect("the proxy thread reports its start")
            .unwrap_or_else(|e| panic!("latchkey did not start: {e}"));
        Proxy {
            run: Run::InProcess {
                stop: Some(stop_tx),
                thread: Some(thread),
            },
            addr,
            admin_addr,
            tls_addr,
            log,
        }
    }

    pub fn url_with(&self, token: &str) -> String {
        format!("http://agent:{token}@{}", self.addr)
    }
    /// Everything the proxy logged so far (tracing output; stderr of the binary).
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
    /// The binary's process id (only for a proxy started with `serve_binary`).
    pub fn pid(&self) -> u32 {
        match &self.run {
            Run::Process { child, .. } => child.id(),
            Run::InProcess { .. } => panic!("pid() needs a proxy started with serve_binary"),
        }
    }
    /// SIGTERM the binary and wait for it to exit; an in-process proxy is shut down the
    /// same way (drain, flush) and reports success or failure as an exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        match &mut self.run {
            Run::Process { child, .. } => {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                child.wait().unwrap()
            }
            Run::InProcess { .. } => self.stop_in_process().map_or_else(
                |_| ExitStatusExt::from_raw(1 << 8),
                |_| ExitStatusExt::from_raw(0),
            ),
        }
    }
    /// Stop an in-process proxy the way SIGTERM stops the binary (drain, flush the audit
    /// log) and return the number of audit lines it wrote.
    pub fn shutdown(mut self) -> u64 {
        self.stop_in_process()
            .unwrap_or_else(|e| panic!("shutdown failed: {e}"))
    }

    /// Stop and join an in-process proxy (once; later calls return `Ok(0)`).
    fn stop_in_process(&mut self) -> Result<u64, String> {
        let Run::InProcess { stop, thread } = &mut self.run else {
            panic!("shutdown() is for in-process proxies; use terminate()");
        };
        if let Some(stop) = stop.take() {
            let _ = stop.send(());
        }
        match thread.take() {
            Some(t) => t.join().expect("the proxy thread does not panic"),
            None => Ok(0),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        match &mut self.run {
            Run::Process { child, .. } => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Run::InProcess { .. } => {
                // Wait for the drain and the audit flush: the next proxy a test starts on the
                // same state dir must find the log complete.
                if let Err(e) = self.stop_in_process() {
                    if !std::thread::panicking() {
                        panic!("shutdown failed: {e}");
                    }
                }
            }
        }
    }
}

/// An error and its causes, one sentence each (like `{:#}` of anyhow).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A home with the standard policy, the `github` secret, a token for `bot` (issued with
/// `issue_args`) and an in-process proxy.
pub fn ready_with(issue_args: &[&str]) -> (Home, Proxy, String) {
    ready_full(issue_args, &[])
}

/// [`ready_with`] for a plain token and a proxy started with `serve_flags`.
pub fn ready_serving(serve_flags: &[&str]) -> (Home, Proxy, String) {
    ready_full(&[], serve_flags)
}

fn ready_full(issue_args: &[&str], serve_flags: &[&str]) -> (Home, Proxy, String) {
    let home = Home::new();
    home.standard_policy();
    home.set_secret("github", SECRET);
    let token = home.issue("bot", issue_args);
    let proxy = home.serve(serve_flags);
    (home, proxy, token)
}

/// A token with `claims`, signed with this home's own signing key (for forged or malformed
/// claims that `token issue` would never produce).
pub fn sign_claims(home: &Home, claims: &Value) -> String {
    let pem = std::fs::read(home.state().join("signing.key")).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&pem).unwrap();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        claims,
        &key,
    )
    .unwrap()
}

/// Poll `f` until it returns `Some` (every 25 ms), failing the test after `limit`.
pub fn eventually<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "{what}: did not happen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A command's standard error as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A command's standard output as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A loopback port with nothing listening (bound, then released).
pub fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A parsed HTTP/1 response read off a raw socket: what the agent would really get.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Status line and header lines, as sent.
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// First value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.head, self.text()))
    }
    /// The `reason` of a latchkey JSON denial.
    pub fn reason(&self) -> String {
        self.json()["reason"].as_str().unwrap_or("").to_string()
    }
}

/// Read one response head byte by byte (so nothing after it, e.g. TLS, is consumed).
pub fn read_head<R: Read>(r: &mut R) -> std::io::Result<(u16, String)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if r.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "closed after {} bytes of head: {:?}",
                    head.len(),
                    String::from_utf8_lossy(&head)
                ),
            ));
        }
        head.push(byte[0]);
        if head.len() > 256 * 1024 {
            return Err(std::io::Error::other("response head too large"));
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line: {head:?}")))?;
    Ok((status, head))
}

/// Read a whole response: head, then a body framed by Content-Length, chunked, or close.
/// A read timeout set on the socket ends a close-delimited body.
pub fn read_response<R: Read>(r: &mut R) -> std::io::Result<RawResponse> {
    let (status, head) = read_head(r)?;
    let mut resp = RawResponse {
        status,
        head,
        body: Vec::new(),
    };
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(resp);
    }
    if let Some(len) = resp.header("content-length") {
        let len: usize = len.parse().map_err(std::io::Error::other)?;
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        resp.body = body;
    } else if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while !line.ends_with(b"\r\n") {
                r.read_exact(&mut byte)?;
                line.push(byte[0]);
            }
            let size_text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .map_err(std::io::Error::other)?;
            let mut chunk = vec![0u8; size + 2];
            r.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            resp.body.extend_from_slice(&chunk[..size]);
        }
    } else {
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => resp.body.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
        }
    }
    Ok(resp)
}

/// TCP to the proxy with bounded read/write timeouts, so a hung proxy fails the test instead
/// of hanging it.
pub fn proxy_socket(proxy: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Send raw bytes straight to the proxy port (no tunnel) and read one response.
pub fn raw_proxy(proxy: SocketAddr, bytes: &[u8]) -> std::io::Result<RawResponse> {
    let mut s = proxy_socket(proxy);
    s.write_all(bytes)?;
    read_response(&mut s)
}

/// `CONNECT authority` with an arbitrary `Proxy-Authorization` value (or none). Returns the
/// socket and the proxy's answer; on a 200 the body is not read (the tunnel starts there).
pub fn raw_connect(
    proxy: SocketAddr,
    authority: &str,
    proxy_authorization: Option<&str>,
) -> (TcpStream, RawResponse) {
    let mut s = proxy_socket(proxy);
    let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(auth) = proxy_authorization {
        req.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let resp = {
        let (status, head) = read_head(&mut s).unwrap();
        let mut r = RawResponse {
            status,
            head,
            body: Vec::new(),
        };
        if status != 200 {
            if let Some(len) = r.header("content-length") {
                let mut body = vec![0u8; len.parse().unwrap()];
                s.read_exact(&mut body).unwrap();
                r.body = body;
            }
        }
        r
    };
    (s, resp)
}

/// A rustls client config trusting only latchkey's CA (the agent's view), offering `alpn`.
pub fn agent_tls_config(latchkey_ca: &Path, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let pem = std::fs::read(latchkey_ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// Read (and drop) whatever comes until EOF or a reset: how long after `since` the peer
/// closed, or `None` when still open `limit` after it. The stream needs a read timeout.
pub fn closed_within(stream: &mut dyn Read, since: Instant, limit: Duration) -> Option<Duration> {
    let mut buf = [0u8; 1024];
    while since.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => return Some(since.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(since.elapsed()),
        }
    }
    None
}

/// A CONNECT tunnel through latchkey with TLS on top (trusting latchkey's CA, a chosen SNI),
/// over which arbitrary bytes can be written: the way to send what no HTTP client would.
pub struct RawTunnel {
    pub tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl RawTunnel {
    /// CONNECT with `Proxy-Authorization: Bearer token`, then a TLS handshake naming `sni`.
    /// Err if the CONNECT is refused or the handshake fails.
    pub fn open(
        proxy: SocketAddr,
        authority: &str,
        token: &str,
        sni: &str,
        latchkey_ca: &Path,
    ) -> Result<RawTunnel, String> {
        let (mut sock, resp) = raw_connect(proxy, authority, Some(&format!("Bearer {token}")));
        if resp.status != 200 {
            return Err(format!("CONNECT refused: {}{}", resp.head, resp.text()));
        }
        let cfg = agent_tls_config(latchkey_ca, &[b"http/1.1"]);
        let name = rustls::pki_types::ServerName::try_from(sni.to_string())
            .map_err(|e| format!("bad SNI {sni}: {e}"))?;
        let mut conn = rustls::ClientConnection::new(cfg, name).map_err(|e| e.to_string())?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
        }
        Ok(RawTunnel {
            tls: rustls::StreamOwned::new(conn, sock),
        })
    }

    /// Write bytes as they are and read one response.
    pub fn exchange(&mut self, bytes: &[u8]) -> std::io::Result<RawResponse> {
        self.tls.write_all(bytes)?;
        self.tls.flush()?;
        read_response(&mut self.tls)
    }

    /// Read one more response (e.g. the answer to a pipelined second request).
    pub fn read(&mut self) -> std::io::Result<RawResponse> {
        read_response(&mut self.tls)
    }
}

/// Body of the requests an [`H2Agent`] sends.
pub type AgentBody = BoxBody<Bytes, Infallible>;

/// An HTTP/2 client inside a CONNECT tunnel: the connection stays up while single streams are
/// reset, which is what a cancelled `fetch` or SDK call does.
pub struct H2Agent {
    pub send: hyper::client::conn::http2::SendRequest<AgentBody>,
    /// `api.example.test:PORT`.
    pub authority: String,
    /// The runtime the connection runs on; drive requests with `rt.block_on` / `rt.spawn`.
    pub rt: tokio::runtime::Runtime,
}

impl H2Agent {
    /// CONNECT to the test API as the holder of `token`, TLS with ALPN `h2`, HTTP/2 handshake.
    pub fn open(home: &Home, proxy: SocketAddr, token: &str) -> H2Agent {
        H2Agent::open_to(home, proxy, token, home.https_port())
    }

    /// [`H2Agent::open`] to `api.example.test:port`.
    pub fn open_to(home: &Home, proxy: SocketAddr, token: &str, port: u16) -> H2Agent {
        let authority = format!("{API_HOST}:{port}");
        let (sock, resp) = raw_connect(proxy, &authority, Some(&format!("Bearer {token}")));
        assert_eq!(resp.status, 200, "{}", resp.head);
        sock.set_nonblocking(true).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let tls = agent_tls_config(&home.latchkey_ca(), &[b"h2"]);
        let send = rt.block_on(async {
            let sock = tokio::net::TcpStream::from_std(sock).unwrap();
            let name = rustls::pki_types::ServerName::try_from(API_HOST.to_string()).unwrap();
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, sock)
                .await
                .expect("TLS in the tunnel");
            assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .expect("h2 handshake");
            tokio::spawn(conn);
            send
        });
        H2Agent {
            send,
            authority,
            rt,
        }
    }

    /// GET `path` on the tunnel's authority: the status and the body.
    pub fn get(&self, path: &str) -> Result<(u16, Bytes), hyper::Error> {
        let mut send = self.send.clone();
        let req = Request::get(format!("https://{}{path}", self.authority))
            .body(http_body_util::Empty::new().boxed())
            .unwrap();
        self.rt.block_on(async move {
            let resp = send.send_request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok((status, body))
        })
    }
}

/// The standard policy plus a route `h1-only` (GET `paths`, the `github` credential as a
/// bearer token) to the HTTP/1.1-only upstream, pinned by `--resolve`; latchkey serving it.
/// Returns the proxy, a token for `bot` and the upstream's port.
pub fn serve_h1_only(home: &Home, paths: &[&str]) -> (Proxy, String, u16) {
    let port = home.upstream.https1_addr.port();
    let paths: Vec<String> = paths.iter().map(|p| format!("{p:?}")).collect();
    home.standard_policy_with(&format!(
        r#"
[[routes]]
id = "h1-only"
host = "{API_HOST}:{port}"
methods = ["GET"]
paths = [{}]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
"#,
        paths.join(", ")
    ));
    home.set_secret("github", SECRET);
    let token = home.issue("bot", &[]);
    let pin = format!("{API_HOST}:{port}:127.0.0.1");
    (home.serve(&["--resolve", &pin]), token, port)
}

/// Poll `f` every 25 ms for up to `limit`; true once it held. For asynchronous effects (reloads,
/// revocations) whose timing is bounded but not instantaneous.
pub fn within(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

/// Peak resident memory (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// Current resident memory (VmRSS) of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// File descriptors a process holds open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A Python test server from `tests/python/` (the grpcio and `websockets` echo servers) on a
/// loopback port with the test upstream's certificate: started as `python3 SCRIPT server CERT
/// KEY LOG`, it prints its port on its first line and appends one JSON line per call it sees
/// to LOG. Killed on drop.
pub struct PyServer {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl PyServer {
    /// Start `tests/python/<script>`; `package` names what `scripts/test` installs for it, for
    /// the failure message.
    pub fn start(home: &Home, script: &str, package: &str) -> PyServer {
        let log = home.path().join(format!("{script}.calls.jsonl"));
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/python")
            .join(script);
        let mut child = Command::new("python3")
            .arg(path)
            .arg("server")
            .arg(&home.upstream_cert)
            .arg(&home.upstream_key)
            .arg(&log)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 is installed");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout is piped"))
            .read_line(&mut line)
            .expect("the server's first line");
        let port = line.trim().parse().unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("{script} did not start ({line:?}); scripts/test installs {package}")
        });
        PyServer { child, port, log }
    }

    /// Every call the server logged, in order.
    pub fn calls(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("the server logs JSON lines"))
            .collect()
    }

    /// `API_HOST:port`, the authority agents address the server by (pinned with `--resolve`).
    pub fn authority(&self) -> String {
        format!("{API_HOST}:{}", self.port)
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
