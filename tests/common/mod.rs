//! Shared setup for integration tests: a throwaway upstream PKI, a real HTTPS (and plain HTTP)
//! echo upstream on 127.0.0.1:0 that reports exactly what it received, and a harness that runs
//! the real `latchkey` binary in a temp dir. Nothing here contacts anything outside loopback.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
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
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(cfg)
    }
}

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    /// Every header value and the query, as one string, to search for leaked values.
    pub fn everything(&self) -> String {
        let mut s = format!("{} {} {:?}\n", self.method, self.path, self.query);
        for (k, v) in &self.headers {
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

/// A real upstream: HTTPS and plain HTTP listeners on loopback, echoing what they received as
/// JSON. `/big?bytes=N` streams N bytes without buffering them.
pub struct Upstream {
    pub https_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// TCP connections accepted by the HTTPS listener (to prove pooling).
    pub tls_connections: Arc<std::sync::atomic::AtomicUsize>,
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
        let cfg = pki.server_config();
        let tls_connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = tls_connections.clone();
        let (https_addr, http_addr) = runtime.block_on(async {
            let tls_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let plain_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addrs = (
                tls_listener.local_addr().unwrap(),
                plain_listener.local_addr().unwrap(),
            );
            tokio::spawn(accept_tls(tls_listener, cfg, seen.clone(), counter));
            tokio::spawn(accept_plain(plain_listener, seen.clone()));
            addrs
        });
        Upstream {
            https_addr,
            http_addr,
            seen,
            tls_connections,
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
        path: req.uri().path().to_string(),
        query: req.uri().query().map(str::to_string),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    seen.lock().unwrap().push(record.clone());
    if req.uri().path().ends_with("/info/refs")
        && req.uri().query() == Some("service=git-upload-pack")
    {
        return git_upload_pack_advertisement();
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
    let body_len = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
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
    pub pki: UpstreamPki,
    pub upstream: Upstream,
    pub upstream_ca: PathBuf,
}

impl Home {
    pub fn new() -> Home {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("policies")).unwrap();
        let pki = UpstreamPki::new();
        let upstream_ca = dir.path().join("upstream-ca.pem");
        std::fs::write(&upstream_ca, &pki.ca_pem).unwrap();
        let upstream = Upstream::start(&pki);
        Home {
            dir,
            pki,
            upstream,
            upstream_ca,
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
        let mut c = Command::new(env!("CARGO_BIN_EXE_latchkey"));
        c.arg("--policies")
            .arg(self.path().join("policies"))
            .arg("--certs")
            .arg(self.path().join("certs"))
            .arg("--state-dir")
            .arg(self.state())
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
paths = ["/repos/acme/backend/issues", "/repos/acme/backend/issues/**", "/big"]
credential = "github"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}

[[routes]]
id = "issues-write"
host = "{API_HOST}:{port}"
methods = ["POST"]
paths = ["/repos/acme/backend/issues"]
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
"#
            ),
        );
    }

    pub fn set_secret(&self, name: &str, value: &str) {
        let mut child = self
            .cmd()
            .args(["secret", "set", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{value}\n").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn issue(&self, agent: &str, extra: &[&str]) -> String {
        let mut args = vec!["token", "issue", "--agent", agent];
        args.extend_from_slice(extra);
        self.run_ok(&args).trim().to_string()
    }

    /// Start `latchkey serve` on 127.0.0.1:0 with the upstream pinned and trusted.
    pub fn serve(&self, extra: &[&str]) -> Proxy {
        let mut cmd = self.cmd();
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream-ca",
        ])
        .arg(&self.upstream_ca)
        .args([
            "--resolve",
            &format!("{API_HOST}:{}:127.0.0.1", self.https_port()),
        ])
        .args([
            "--resolve",
            &format!("{OTHER_HOST}:{}:127.0.0.1", self.https_port()),
        ])
        .args([
            "--resolve",
            &format!("plain.example.test:{}:127.0.0.1", self.http_port()),
        ])
        .args([
            "--resolve",
            &format!("nocreds.example.test:{}:127.0.0.1", self.http_port()),
        ])
        .args(extra)
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
            child,
            addr,
            admin_addr,
            log,
            _stdout: reader,
        }
    }

    /// Parsed audit lines.
    pub fn audit(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.state().join("audit.jsonl")).unwrap_or_default();
        text.lines()
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

/// A running `latchkey serve`, killed on drop.
pub struct Proxy {
    pub child: Child,
    pub addr: SocketAddr,
    /// The admin listener (/healthz, /metrics), when enabled.
    pub admin_addr: Option<SocketAddr>,
    pub log: Arc<Mutex<String>>,
    pub _stdout: BufReader<std::process::ChildStdout>,
}

impl Proxy {
    pub fn url_with(&self, token: &str) -> String {
        format!("http://agent:{token}@{}", self.addr)
    }
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// SIGTERM and wait for exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port with nothing listening (bound, then released).
pub fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}
