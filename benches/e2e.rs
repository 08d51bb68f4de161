//! End-to-end load benchmark: the same load generator drives a local HTTPS upstream directly and
//! through a real `latchkey serve` (the release binary), alternating direct and proxied runs, and
//! prints one table of medians with proxied/direct ratios. Run it with `scripts/bench-e2e`.
//!
//! The upstream serves fixed bodies (never an echo, so redaction finds nothing) with an
//! RSA-2048 certificate generated at start by rcgen (aws-lc-rs backend), on HTTPS (ALPN h2 and
//! http/1.1, like a public API) and on plain HTTP. The load generator speaks HTTP/1.1 with
//! rustls, session resumption off (every new connection is a full handshake, as for a fresh
//! agent process). Upstream and load generator share one tokio worker; the script pins this
//! process to core 0 and latchkey to core 1.
//!
//! Scenarios (budgets guarded, as ratios to direct):
//! - S1 HTTPS keep-alive, small responses, 32 connections: req/s >= 0.5x, added p99 <= 1 ms.
//! - S1-gw the same load in gateway mode: plain HTTP keep-alive to latchkey's listener,
//!   `GET /gw/api/small` with the token as `Authorization: Bearer`, latchkey to the HTTPS
//!   upstream (direct is S1's direct HTTPS): req/s >= 0.5x.
//! - S2 a new TLS connection per request (proxied: new CONNECT + TLS to latchkey): >= 1.0x.
//! - S3 plain HTTP, absolute-form through latchkey (insecure_http route): >= 0.6x.
//! - S4 one 100 MiB download through a credentialed route (body scanned): >= 0.8x.
//! - S4-up one 100 MiB upload (POST, content-length) through the same route: >= 0.8x.
//! - S5 2 000 idle CONNECT+TLS tunnels: <= 64 KiB of latchkey RSS per tunnel; reported for
//!   tunnels not used yet and, opened while those stay open, for 2 000 that served one request.
//! - S6 first request to 1 000 distinct hosts (leaf mint + both handshakes): p50 <= 3 ms.
//! - S7 S1 (proxied) while 500 requests of 50 other agents are held for approval
//!   (`approval = "request"`, 10 per agent): req/s >= 0.9x of S1 with nothing held.
//! - peak RSS of latchkey (VmHWM) under load (S1-S4, before S7's held requests): <= 30 MiB.
//!
//! Knobs (environment): BENCH_SECS (5) per timed run, BENCH_RUNS (3) per path, BENCH_CONNS (32),
//! BENCH_TUNNELS (2000), BENCH_HOSTS (1000), BENCH_BIG_MIB (100), BENCH_ONLY (e.g. "s1,s1gw,s4,s4up"),
//! BENCH_HELD_AGENTS (50), BENCH_HELD_PER_AGENT (10),
//! BENCH_PERF_DIR (profile latchkey with `perf record -e cpu-clock` during the first proxied run
//! of each scenario, to DIR/<scenario>.data).

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const API_HOST: &str = "api.bench.test";
const PLAIN_HOST: &str = "plain.bench.test";
const SECRET: &str = "bench-secret-value-0123456789abcdef";
/// The small response: a fixed JSON document of 256 bytes.
const SMALL: &[u8; 256] = br#"{"id":1296269,"name":"latchkey","full_name":"latchkey/latchkey","private":false,"description":"A local credential-injecting forward proxy for AI agents","fork":false,"size":4217,"stargazers_count":42,"open_issues_count":7,"default_branch":"main","pad":"x"}"#;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

type Err = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, Err>;

// ---------------------------------------------------------------------------------------------
// Upstream
// ---------------------------------------------------------------------------------------------

struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

/// An RSA-2048 CA and an RSA-2048 leaf for the bench hosts (rcgen generates RSA keys with the
/// aws-lc-rs backend, which latchkey already uses).
fn pki() -> Pki {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "latchkey bench upstream CA");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let issuer = CertifiedIssuer::self_signed(ca, ca_key).expect("CA cert");
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA leaf key");
    let mut params = CertificateParams::new(vec![
        API_HOST.to_string(),
        "*.bench.test".to_string(),
        "localhost".to_string(),
    ])
    .expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, API_HOST);
    let leaf = params.signed_by(&leaf_key, &issuer).expect("leaf cert");
    Pki {
        ca_pem: issuer.as_ref().pem(),
        cert_pem: leaf.pem(),
        key_pem: leaf_key.serialize_pem(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn upstream_tls(pki: &Pki) -> Arc<rustls::ServerConfig> {
    let certs = rustls_pemfile::certs(&mut pki.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("certs");
    let key = rustls_pemfile::private_key(&mut pki.key_pem.as_bytes())
        .expect("key")
        .expect("a key");
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

type UpBody = BoxBody<Bytes, Infallible>;

/// `n` bytes as 64 KiB slices of one shared buffer (no copy, no allocation per chunk).
struct Repeat {
    chunk: Bytes,
    left: u64,
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let take = self.left.min(self.chunk.len() as u64) as usize;
        self.left -= take as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..take)))))
    }
    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }
}

fn respond(path: &str, big: &Bytes, big_len: u64) -> Response<UpBody> {
    let body = if path == "/big" {
        Repeat {
            chunk: big.clone(),
            left: big_len,
        }
        .boxed()
    } else {
        Full::new(Bytes::from_static(SMALL)).boxed()
    };
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert("content-type", "application/json".parse().expect("value"));
    resp
}

async fn serve_upstream(tls: TcpListener, plain: TcpListener, cfg: Arc<rustls::ServerConfig>) {
    let big = Bytes::from(vec![b'x'; 64 * 1024]);
    let big_len = env_num("BENCH_BIG_MIB", 100) as u64 * 1024 * 1024;
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let big2 = big.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = plain.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let big = big2.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let r = respond(req.uri().path(), &big, big_len);
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    loop {
        let Ok((stream, _)) = tls.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let big = big.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let r = respond(req.uri().path(), &big, big_len);
                async move {
                    if req.uri().path() == "/up" {
                        // S4-up: take the whole upload before answering.
                        let mut body = req.into_body();
                        while let Some(Ok(_)) = body.frame().await {}
                    }
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

// ---------------------------------------------------------------------------------------------
// latchkey
// ---------------------------------------------------------------------------------------------

struct Latchkey {
    child: Child,
    addr: SocketAddr,
    pid: u32,
}

impl Drop for Latchkey {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn latchkey(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_latchkey"));
    c.arg("--policies")
        .arg(home.join("policies"))
        .arg("--certs")
        .arg(home.join("certs"))
        .arg("--state-dir")
        .arg(home.join("state"))
        .env_remove("LATCHKEY_MASTER_KEY")
        .env_remove("RUST_LOG");
    c
}

fn run_ok(mut cmd: Command, stdin: Option<&str>) -> String {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn latchkey");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().expect("latchkey output");
    assert!(
        out.status.success(),
        "latchkey failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn start_latchkey(home: &Path, https: u16, http: u16, hosts: &[String]) -> Latchkey {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1"]).arg(env!("CARGO_BIN_EXE_latchkey"));
    cmd.arg("--policies")
        .arg(home.join("policies"))
        .arg("--certs")
        .arg(home.join("certs"))
        .arg("--state-dir")
        .arg(home.join("state"))
        .env_remove("LATCHKEY_MASTER_KEY")
        .env_remove("RUST_LOG")
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "off"])
        // Enough for S5's idle tunnels and S6's distinct hosts, and no more than the fd
        // limit scripts/bench-e2e sets (latchkey refuses caps it cannot honour).
        .args([
            "--max-connections",
            &(2 * env_num("BENCH_TUNNELS", 2000) + 256).to_string(),
        ])
        .args(["--max-unauthenticated-connections", "512"])
        .args([
            "--max-upstream-connections",
            &(3 * env_num("BENCH_HOSTS", 1000) + 256).to_string(),
        ])
        .args(["--max-connections-per-agent", "20000"])
        .args(["--max-requests-in-flight-per-agent", "20000"])
        .args(["--approval-queue", "64", "--approval-timeout", "30m"])
        .arg("--upstream-ca")
        .arg(home.join("upstream-ca.pem"))
        .arg("--resolve")
        .arg(format!("{API_HOST}:{https}:127.0.0.1"))
        .arg("--resolve")
        .arg(format!("{PLAIN_HOST}:{http}:127.0.0.1"));
    for h in hosts {
        cmd.arg("--resolve").arg(format!("{h}:{https}:127.0.0.1"));
    }
    // One info line per request goes to stderr as in production; it is discarded here.
    cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = cmd.spawn().expect("spawn latchkey serve");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    reader.read_line(&mut line).expect("read listen line");
    let addr = line
        .trim()
        .strip_prefix("latchkey listening on ")
        .unwrap_or_else(|| panic!("latchkey serve did not start: {line:?}"))
        .parse()
        .expect("listen address");
    std::thread::spawn(move || {
        let mut sink = String::new();
        while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    Latchkey { child, addr, pid }
}

// ---------------------------------------------------------------------------------------------
// /proc readings
// ---------------------------------------------------------------------------------------------

/// (busy, total) jiffies of cpu0 and cpu1.
fn cpu_times() -> [(u64, u64); 2] {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let mut out = [(0, 0); 2];
    for line in text.lines() {
        for (i, name) in ["cpu0 ", "cpu1 "].iter().enumerate() {
            if let Some(rest) = line.strip_prefix(name) {
                let v: Vec<u64> = rest
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                let total: u64 = v.iter().take(8).sum();
                let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
                out[i] = (total - idle, total);
            }
        }
    }
    out
}

/// utime + stime of a process, in clock ticks (USER_HZ, 100 on Linux).
fn proc_cpu(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = text.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the comm field: state is field 3, utime 14, stime 15 -> indices 11 and 12 here.
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

struct Meter {
    cpus: [(u64, u64); 2],
    lk: u64,
    me: u64,
    start: Instant,
    lk_pid: u32,
}

#[derive(Clone, Copy, Default)]
struct Usage {
    core0: f64,
    core1: f64,
    /// latchkey CPU time over the run, in seconds.
    lk_cpu: f64,
    /// This process (upstream + load generator) CPU time, in seconds.
    me_cpu: f64,
    /// Wall time of the measurement, in seconds.
    wall: f64,
}

impl Meter {
    fn start(lk_pid: u32) -> Meter {
        Meter {
            cpus: cpu_times(),
            lk: proc_cpu(lk_pid),
            me: proc_cpu(std::process::id()),
            start: Instant::now(),
            lk_pid,
        }
    }
    fn stop(&self) -> Usage {
        let now = cpu_times();
        let share = |i: usize| {
            let (b0, t0) = self.cpus[i];
            let (b1, t1) = now[i];
            if t1 > t0 {
                (b1 - b0) as f64 / (t1 - t0) as f64
            } else {
                0.0
            }
        };
        Usage {
            wall: self.start.elapsed().as_secs_f64(),
            core0: share(0),
            core1: share(1),
            lk_cpu: (proc_cpu(self.lk_pid).saturating_sub(self.lk)) as f64 / 100.0,
            me_cpu: (proc_cpu(std::process::id()).saturating_sub(self.me)) as f64 / 100.0,
        }
    }
}

/// Start `perf record` on latchkey when BENCH_PERF_DIR is set.
fn perf_start(pid: u32, label: &str) -> Option<Child> {
    let dir = std::env::var("BENCH_PERF_DIR").ok()?;
    std::fs::create_dir_all(&dir).ok()?;
    let child = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "1999", "-g", "-p"])
        .arg(pid.to_string())
        .arg("-o")
        .arg(format!("{dir}/{label}.data"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(300));
    Some(child)
}

fn perf_stop(child: Option<Child>) {
    if let Some(mut c) = child {
        let _ = Command::new("kill")
            .args(["-INT", &c.id().to_string()])
            .status();
        let _ = c.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Load generator
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Via {
    Direct,
    Proxied,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Proxied => "proxied",
        }
    }
}

struct Ctx {
    https: SocketAddr,
    http: SocketAddr,
    proxy: SocketAddr,
    basic: String,
    /// `Bearer <token>`: the token as a gateway-mode API key.
    bearer: String,
    tls: Arc<rustls::ClientConfig>,
}

async fn tcp(addr: SocketAddr) -> Res<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    // RST on close: a run of new connections per request must not fill the port range with
    // TIME_WAIT sockets.
    s.set_zero_linger()?;
    Ok(s)
}

/// CONNECT host:port through latchkey; returns the raw tunnel once latchkey said 200.
async fn connect_tunnel(ctx: &Ctx, host: &str, port: u16) -> Res<TcpStream> {
    let mut s = tcp(ctx.proxy).await?;
    let head = format!(
        "CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\nProxy-Authorization: {}\r\n\r\n",
        ctx.basic
    );
    s.write_all(head.as_bytes()).await?;
    let mut buf = Vec::with_capacity(256);
    let mut byte = [0u8; 256];
    loop {
        let n = s.read(&mut byte).await?;
        if n == 0 {
            return Err("latchkey closed the CONNECT".into());
        }
        buf.extend_from_slice(&byte[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    if !buf.starts_with(b"HTTP/1.1 200") {
        return Err(format!("CONNECT refused: {}", String::from_utf8_lossy(&buf)).into());
    }
    Ok(s)
}

async fn open_tls(
    ctx: &Ctx,
    via: Via,
    host: &str,
) -> Res<tokio_rustls::client::TlsStream<TcpStream>> {
    let port = ctx.https.port();
    let raw = match via {
        Via::Direct => tcp(ctx.https).await?,
        Via::Proxied => connect_tunnel(ctx, host, port).await?,
    };
    let name = rustls::pki_types::ServerName::try_from(host.to_string())?;
    Ok(tokio_rustls::TlsConnector::from(ctx.tls.clone())
        .connect(name, raw)
        .await?)
}

async fn h1<T, B>(io: T) -> Res<SendRequest<B>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

fn get(host: &str, target: &str, proxy_auth: Option<&str>) -> Request<Empty<Bytes>> {
    let mut b = Request::get(target)
        .header("host", host)
        .header("user-agent", "latchkey-bench/1")
        .header("accept", "application/json");
    if let Some(auth) = proxy_auth {
        b = b.header("proxy-authorization", auth);
    }
    b.body(Empty::new()).expect("request")
}

/// A gateway-mode request: origin form on latchkey's listener, the token as the API key.
fn gateway_get(ctx: &Ctx, target: &str) -> Request<Empty<Bytes>> {
    Request::get(target)
        .header("host", ctx.proxy.to_string())
        .header("user-agent", "latchkey-bench/1")
        .header("accept", "application/json")
        .header("authorization", ctx.bearer.as_str())
        .body(Empty::new())
        .expect("request")
}

/// Send one request and read the whole body; returns the body length.
async fn fetch<B>(send: &mut SendRequest<B>, req: Request<B>) -> Res<u64>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    send.ready().await?;
    let resp = send.send_request(req).await?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()).into());
    }
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame?.into_data() {
            n += d.len() as u64;
        }
    }
    Ok(n)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// S1: keep-alive HTTPS.
    KeepAliveTls,
    /// S2: a new connection (and TLS handshake) per request.
    NewTls,
    /// S3: keep-alive plain HTTP (absolute form through latchkey).
    Plain,
    /// S1-gw: keep-alive; direct is HTTPS to the upstream, proxied is gateway mode (plain
    /// HTTP to latchkey's listener, origin-form `/gw/api/small`).
    Gateway,
}

#[derive(Default, Clone)]
struct Run {
    requests: u64,
    errors: u64,
    secs: f64,
    lat_us: Vec<u32>,
    usage: Usage,
    first_error: Option<String>,
}

impl Run {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.secs
    }
    fn pct(&self, p: f64) -> f64 {
        pct(&self.lat_us, p)
    }
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// One timed run of `conns` concurrent workers for `secs`.
async fn timed(ctx: Arc<Ctx>, kind: Kind, via: Via, conns: usize, secs: f64, lk_pid: u32) -> Run {
    let api = format!("{API_HOST}:{}", ctx.https.port());
    let plain = format!("{PLAIN_HOST}:{}", ctx.http.port());
    let barrier = Arc::new(tokio::sync::Barrier::new(conns + 1));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let ctx = ctx.clone();
        let barrier = barrier.clone();
        let stop = stop.clone();
        let (api, plain) = (api.clone(), plain.clone());
        tasks.push(tokio::spawn(async move {
            let mut run = Run::default();
            // Keep-alive kinds connect before the clock starts.
            let mut sender = match (kind, via) {
                // Gateway mode's direct baseline is S1's: HTTPS keep-alive to the upstream.
                (Kind::KeepAliveTls, _) | (Kind::Gateway, Via::Direct) => {
                    match open_tls(&ctx, via, API_HOST).await {
                        Ok(tls) => h1(tls).await.ok(),
                        Err(e) => {
                            run.first_error = Some(e.to_string());
                            None
                        }
                    }
                }
                (Kind::Plain, _) | (Kind::Gateway, Via::Proxied) => {
                    let addr = match (kind, via) {
                        (Kind::Plain, Via::Direct) => ctx.http,
                        _ => ctx.proxy,
                    };
                    match tcp(addr).await {
                        Ok(s) => h1(s).await.ok(),
                        Err(e) => {
                            run.first_error = Some(e.to_string());
                            None
                        }
                    }
                }
                (Kind::NewTls, _) => None,
            };
            barrier.wait().await;
            let plain_target = format!("http://{plain}/small");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t0 = Instant::now();
                let result = match kind {
                    Kind::KeepAliveTls => match sender.as_mut() {
                        Some(s) => fetch(s, get(&api, "/small", None)).await,
                        None => Err("no connection".into()),
                    },
                    Kind::Gateway => match sender.as_mut() {
                        Some(s) => {
                            let req = match via {
                                Via::Direct => get(&api, "/small", None),
                                Via::Proxied => gateway_get(&ctx, "/gw/api/small"),
                            };
                            fetch(s, req).await
                        }
                        None => Err("no connection".into()),
                    },
                    Kind::Plain => match sender.as_mut() {
                        Some(s) => {
                            let req = match via {
                                Via::Direct => get(&plain, "/small", None),
                                Via::Proxied => {
                                    get(&plain, &plain_target, Some(ctx.basic.as_str()))
                                }
                            };
                            fetch(s, req).await
                        }
                        None => Err("no connection".into()),
                    },
                    Kind::NewTls => {
                        async {
                            let tls = open_tls(&ctx, via, API_HOST).await?;
                            let mut s = h1(tls).await?;
                            fetch(&mut s, get(&api, "/small", None)).await
                        }
                        .await
                    }
                };
                match result {
                    Ok(_) => {
                        run.requests += 1;
                        run.lat_us
                            .push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                    Err(e) => {
                        run.errors += 1;
                        if run.first_error.is_none() {
                            run.first_error = Some(e.to_string());
                        }
                        if sender.is_some() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            run
        }));
    }
    barrier.wait().await;
    let meter = Meter::start(lk_pid);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = Run::default();
    for t in tasks {
        let r = t.await.expect("worker");
        total.requests += r.requests;
        total.errors += r.errors;
        total.lat_us.extend(r.lat_us);
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
    }
    total.secs = start.elapsed().as_secs_f64();
    total.usage = meter.stop();
    total.lat_us.sort_unstable();
    total
}

/// S7: open `per_agent` requests for each agent (its Basic credentials in `basics`), each
/// on a tunnel and connection of its own, on a route that holds them for approval. The
/// returned tasks wait for answers that never come; aborting them closes the connections.
async fn hold_requests(
    ctx: Arc<Ctx>,
    basics: &[String],
    per_agent: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    let api = format!("{API_HOST}:{}", ctx.https.port());
    let mut out = Vec::new();
    for basic in basics {
        for _ in 0..per_agent {
            let ctx = ctx.clone();
            let basic = basic.clone();
            let api = api.clone();
            out.push(tokio::spawn(async move {
                let held = async {
                    let mut s = tcp(ctx.proxy).await?;
                    let head = format!(
                        "CONNECT {api} HTTP/1.1\r\nHost: {api}\r\nProxy-Authorization: {basic}\r\n\r\n"
                    );
                    s.write_all(head.as_bytes()).await?;
                    let mut buf = [0u8; 512];
                    let n = s.read(&mut buf).await?;
                    if !buf[..n].starts_with(b"HTTP/1.1 200") {
                        return Err::<(), Box<dyn std::error::Error + Send + Sync>>(
                            "CONNECT refused".into(),
                        );
                    }
                    let name = rustls::pki_types::ServerName::try_from(API_HOST.to_string())?;
                    let tls = tokio_rustls::TlsConnector::from(ctx.tls.clone())
                        .connect(name, s)
                        .await?;
                    let mut send = h1(tls).await?;
                    let _ = fetch(&mut send, get(&api, "/small", None)).await;
                    Ok(())
                };
                let _ = held.await;
            }));
        }
    }
    out
}

/// S4: one download of the big body over one new connection; S4-up: one upload of as many
/// bytes (`/up`, which the upstream drains). Returns MB/s, bytes moved and the usage.
async fn transfer(ctx: Arc<Ctx>, via: Via, lk_pid: u32, up: bool) -> Res<(f64, u64, Usage)> {
    let api = format!("{API_HOST}:{}", ctx.https.port());
    let tls = open_tls(&ctx, via, API_HOST).await?;
    let mut s: SendRequest<UpBody> = h1(tls).await?;
    // Warm the connection (and latchkey's upstream pool) with one small request.
    fetch(&mut s, get(&api, "/small", None).map(|b| b.boxed())).await?;
    let meter = Meter::start(lk_pid);
    let t0 = Instant::now();
    let n = if up {
        let len = big_len();
        let req = Request::post("/up")
            .header("host", api.as_str())
            .header("content-length", len)
            .header("content-type", "application/octet-stream")
            .body(
                Repeat {
                    chunk: Bytes::from(vec![b'x'; 64 * 1024]),
                    left: len,
                }
                .boxed(),
            )?;
        fetch(&mut s, req).await?;
        len
    } else {
        fetch(&mut s, get(&api, "/big", None).map(|b| b.boxed())).await?
    };
    let secs = t0.elapsed().as_secs_f64();
    Ok((n as f64 / secs / 1e6, n, meter.stop()))
}

fn big_len() -> u64 {
    env_num("BENCH_BIG_MIB", 100) as u64 * 1024 * 1024
}

/// S6: one new connection and one request per host, one host at a time.
async fn first_contact(ctx: Arc<Ctx>, via: Via, hosts: Vec<String>, lk_pid: u32) -> Run {
    let port = ctx.https.port();
    let meter = Meter::start(lk_pid);
    let start = Instant::now();
    let mut run = Run::default();
    for h in hosts {
        let t0 = Instant::now();
        let r = async {
            let tls = open_tls(&ctx, via, &h).await?;
            let mut s = h1(tls).await?;
            fetch(&mut s, get(&format!("{h}:{port}"), "/small", None)).await
        }
        .await;
        match r {
            Ok(_) => {
                run.requests += 1;
                run.lat_us.push(t0.elapsed().as_micros() as u32);
            }
            Err(e) => {
                run.errors += 1;
                run.first_error.get_or_insert(e.to_string());
            }
        }
    }
    run.secs = start.elapsed().as_secs_f64();
    run.usage = meter.stop();
    run.lat_us.sort_unstable();
    run
}

/// A tunnel S5 keeps open (its TLS stream, or the client connection that used it), held only
/// so that it stays open.
type Idle = Box<dyn Send>;

/// S5: open `n` CONNECT+TLS tunnels (each serving one `GET /small` first if `used`) and keep
/// them; returns them and the failures.
async fn open_idle(ctx: Arc<Ctx>, n: usize, used: bool) -> (Vec<Idle>, usize) {
    let mut kept = Vec::with_capacity(n);
    let mut failed = 0;
    let mut left = n;
    while left > 0 {
        let batch = left.min(64);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let ctx = ctx.clone();
            set.spawn(async move {
                let tls = open_tls(&ctx, Via::Proxied, API_HOST).await?;
                if !used {
                    return Ok(Box::new(tls) as Idle);
                }
                let mut send = h1(tls).await?;
                let host = format!("{API_HOST}:{}", ctx.https.port());
                fetch(&mut send, get(&host, "/small", None)).await?;
                Ok::<_, Err>(Box::new(send) as Idle)
            });
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(t)) => kept.push(t),
                _ => failed += 1,
            }
        }
        left -= batch;
    }
    (kept, failed)
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// The last column of a scenario's row: where the CPU went, direct and through latchkey.
fn usage_cell(direct: &[Usage], proxied: &[Usage]) -> String {
    format!(
        "direct: {}; proxied: {}",
        usage_note(direct),
        usage_note(proxied)
    )
}

fn usage_note(u: &[Usage]) -> String {
    let c0 = median(u.iter().map(|x| x.core0).collect());
    let c1 = median(u.iter().map(|x| x.core1).collect());
    let lk = median(u.iter().map(|x| x.lk_cpu / x.wall).collect());
    let me = median(u.iter().map(|x| x.me_cpu / x.wall).collect());
    let sat = if c0 >= 0.95 { " (core0 saturated)" } else { "" };
    format!(
        "core0 {:.0}% core1 {:.0}%{sat}, load side {:.0}%, latchkey {:.0}%",
        c0 * 100.0,
        c1 * 100.0,
        me * 100.0,
        lk * 100.0
    )
}

fn log(line: &str) {
    eprintln!("[e2e] {line}");
}

fn main() {
    // `cargo bench` passes `--bench`; this target takes its knobs from the environment.
    let secs = env_num("BENCH_SECS", 5) as f64;
    let runs = env_num("BENCH_RUNS", 3);
    let conns = env_num("BENCH_CONNS", 32);
    let tunnels = env_num("BENCH_TUNNELS", 2000);
    let n_hosts = env_num("BENCH_HOSTS", 1000);
    let only = std::env::var("BENCH_ONLY")
        .unwrap_or_default()
        .to_lowercase();
    let want = |s: &str| only.is_empty() || only.split(',').any(|x| x.trim() == s);

    let affinity = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Cpus_allowed_list:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    if affinity != "0" {
        log(&format!(
            "warning: this process may run on CPUs {affinity}; scripts/bench-e2e pins it to core 0"
        ));
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");

    // Home: policies, certs, state in a temp dir.
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().to_path_buf();
    std::fs::create_dir_all(home.join("policies")).expect("policies dir");
    let t = Instant::now();
    let pki = pki();
    log(&format!(
        "RSA-2048 upstream PKI in {:.1}s",
        t.elapsed().as_secs_f64()
    ));
    std::fs::write(home.join("upstream-ca.pem"), &pki.ca_pem).expect("write CA");

    let (https, http) = rt.block_on(async {
        let tls = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let plain = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addrs = (
            tls.local_addr().expect("addr"),
            plain.local_addr().expect("addr"),
        );
        tokio::spawn(serve_upstream(tls, plain, upstream_tls(&pki)));
        addrs
    });
    let (hp, pp) = (https.port(), http.port());
    std::fs::write(
        home.join("policies/bench.toml"),
        format!(
            r#"agent = "bench"
max_ttl = "2h"

[[routes]]
id = "api"
host = "{API_HOST}:{hp}"
methods = ["GET", "POST"]
paths = ["/small", "/big", "/up"]
credential = "bench_token"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}

[[routes]]
id = "plain"
host = "{PLAIN_HOST}:{pp}"
methods = ["GET"]
paths = ["/small"]
credential = "bench_token"
inject = {{ header = "x-api-key", value = "{{secret}}" }}
insecure_http = true

[[routes]]
id = "many-hosts"
host = "*.bench.test:{hp}"
methods = ["GET"]
paths = ["/small"]
credential = "bench_token"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
"#
        ),
    )
    .expect("write policy");
    // S7: agents whose every request is held for a person's approval.
    let held_agents = env_num("BENCH_HELD_AGENTS", 50);
    let held_per_agent = env_num("BENCH_HELD_PER_AGENT", 10);
    let held_names: Vec<String> = if want("s7") {
        (0..held_agents).map(|i| format!("held-{i:02}")).collect()
    } else {
        Vec::new()
    };
    for name in &held_names {
        std::fs::write(
            home.join(format!("policies/{name}.toml")),
            format!(
                r#"agent = "{name}"
max_ttl = "2h"

[[routes]]
id = "pay"
host = "{API_HOST}:{hp}"
methods = ["GET"]
paths = ["/small"]
credential = "bench_token"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
approval = "request"
"#
            ),
        )
        .expect("write held policy");
    }
    let mut c = latchkey(&home);
    c.args(["secret", "set", "bench_token"]);
    run_ok(c, Some(&format!("{SECRET}\n")));
    let held_basics: Vec<String> = held_names
        .iter()
        .map(|name| {
            let mut c = latchkey(&home);
            c.args(["token", "issue", "--agent", name, "--ttl", "2h"]);
            let t = run_ok(c, None).trim().to_string();
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("agent:{t}"))
            )
        })
        .collect();
    let mut c = latchkey(&home);
    c.args(["token", "issue", "--agent", "bench", "--ttl", "2h"]);
    let token = run_ok(c, None).trim().to_string();
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("agent:{token}"))
    );
    let bearer = format!("Bearer {token}");

    // Distinct host names for S6, one set per run.
    let host_sets: Vec<Vec<String>> = (0..runs)
        .map(|r| {
            (0..n_hosts)
                .map(|i| format!("r{r}-h{i:04}.bench.test"))
                .collect()
        })
        .collect();
    let all_hosts: Vec<String> = if want("s6") {
        host_sets.iter().flatten().cloned().collect()
    } else {
        Vec::new()
    };
    let lk = start_latchkey(&home, hp, pp, &all_hosts);
    log(&format!(
        "latchkey pid {} on {} (CPUs {}), upstream https {https} http {http}",
        lk.pid,
        lk.addr,
        std::fs::read_to_string(format!("/proc/{}/status", lk.pid))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l
                .strip_prefix("Cpus_allowed_list:")
                .map(|v| v.trim().to_string()))
            .unwrap_or_default()
    ));

    let mut roots = rustls::RootCertStore::empty();
    for pem in [
        pki.ca_pem.clone(),
        std::fs::read_to_string(home.join("certs/ca.crt")).expect("latchkey CA"),
    ] {
        for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
            roots.add(cert.expect("cert")).expect("root");
        }
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    let ctx = Arc::new(Ctx {
        https,
        http,
        proxy: lk.addr,
        basic,
        bearer,
        tls: Arc::new(tls),
    });
    let pid = lk.pid;
    let rss0 = status_kib(pid, "VmRSS:");
    log(&format!("latchkey RSS at start: {rss0} KiB"));

    // Smoke: every path answers before anything is timed.
    rt.block_on(async {
        for via in [Via::Direct, Via::Proxied] {
            let r = timed(ctx.clone(), Kind::KeepAliveTls, via, 1, 0.2, pid).await;
            assert!(r.requests > 0, "{via:?} TLS: {:?}", r.first_error);
            let r = timed(ctx.clone(), Kind::Plain, via, 1, 0.2, pid).await;
            assert!(r.requests > 0, "{via:?} plain: {:?}", r.first_error);
            let r = timed(ctx.clone(), Kind::Gateway, via, 1, 0.2, pid).await;
            assert!(r.requests > 0, "{via:?} gateway: {:?}", r.first_error);
        }
    });

    let mut rows: Vec<[String; 6]> = Vec::new();
    let fmt = |x: f64, d: usize| {
        if x.is_finite() {
            format!("{x:.d$}")
        } else {
            "n/a".into()
        }
    };

    for (key, kind, label, n) in [
        (
            "s1",
            Kind::KeepAliveTls,
            "S1 HTTPS keep-alive, 32 conns",
            conns,
        ),
        (
            "s1gw",
            Kind::Gateway,
            "S1-gw gateway mode keep-alive (plain HTTP /gw/ to latchkey), 32 conns",
            conns,
        ),
        ("s2", Kind::NewTls, "S2 new TLS conn per request", conns),
        ("s3", Kind::Plain, "S3 plain HTTP absolute-form", conns),
    ] {
        if !want(key) {
            continue;
        }
        let mut res: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
        for i in 0..runs {
            for via in [Via::Direct, Via::Proxied] {
                let perf = (i == 0 && via == Via::Proxied)
                    .then(|| perf_start(pid, key))
                    .flatten();
                let r = rt.block_on(timed(ctx.clone(), kind, via, n, secs, pid));
                perf_stop(perf);
                log(&format!(
                    "{key} run {i} {:>7}: {:>8.0} req/s p50 {:.3} ms p99 {:.3} ms errors {} \
                     core0 {:.0}% core1 {:.0}% latchkey cpu {:.1} us/req, load side {:.1} us/req{}",
                    via.name(),
                    r.rps(),
                    r.pct(50.0),
                    r.pct(99.0),
                    r.errors,
                    r.usage.core0 * 100.0,
                    r.usage.core1 * 100.0,
                    r.usage.lk_cpu * 1e6 / r.requests.max(1) as f64,
                    r.usage.me_cpu * 1e6 / r.requests.max(1) as f64,
                    r.first_error
                        .as_deref()
                        .map(|e| format!(" first error: {e}"))
                        .unwrap_or_default()
                ));
                res[via as usize].push(r);
            }
        }
        log(&format!(
            "{key} done: latchkey VmRSS {} KiB VmHWM {} KiB",
            status_kib(pid, "VmRSS:"),
            status_kib(pid, "VmHWM:")
        ));
        let m = |v: &Vec<Run>, f: &dyn Fn(&Run) -> f64| median(v.iter().map(f).collect());
        let d_rps = m(&res[0], &|r| r.rps());
        let p_rps = m(&res[1], &|r| r.rps());
        let d50 = m(&res[0], &|r| r.pct(50.0));
        let p50 = m(&res[1], &|r| r.pct(50.0));
        let d99 = m(&res[0], &|r| r.pct(99.0));
        let p99 = m(&res[1], &|r| r.pct(99.0));
        let lk_us = m(&res[1], &|r| {
            r.usage.lk_cpu * 1e6 / r.requests.max(1) as f64
        });
        let d_u: Vec<Usage> = res[0].iter().map(|r| r.usage).collect();
        let p_u: Vec<Usage> = res[1].iter().map(|r| r.usage).collect();
        rows.push([
            label.to_string(),
            format!(
                "{} req/s (p50 {} / p99 {} ms)",
                fmt(d_rps, 0),
                fmt(d50, 2),
                fmt(d99, 2)
            ),
            format!(
                "{} req/s (p50 {} / p99 {} ms)",
                fmt(p_rps, 0),
                fmt(p50, 2),
                fmt(p99, 2)
            ),
            format!(
                "{}x; added p50 {} ms, p99 {} ms",
                fmt(p_rps / d_rps, 2),
                fmt(p50 - d50, 2),
                fmt(p99 - d99, 2)
            ),
            format!("latchkey {} µs CPU/req", fmt(lk_us, 1)),
            usage_cell(&d_u, &p_u),
        ]);
    }

    for (key, up, what) in [("s4", false, "download"), ("s4up", true, "upload")] {
        if !want(key) {
            continue;
        }
        let mut res: [Vec<(f64, Usage)>; 2] = [Vec::new(), Vec::new()];
        for i in 0..runs {
            for via in [Via::Direct, Via::Proxied] {
                let perf = (i == 0 && via == Via::Proxied)
                    .then(|| perf_start(pid, key))
                    .flatten();
                let r = rt.block_on(transfer(ctx.clone(), via, pid, up));
                perf_stop(perf);
                match r {
                    Ok((mbs, n, u)) => {
                        log(&format!(
                            "{key} run {i} {:>7}: {mbs:.0} MB/s ({n} bytes) core0 {:.0}% core1 {:.0}% \
                             latchkey cpu {:.2} s",
                            via.name(),
                            u.core0 * 100.0,
                            u.core1 * 100.0,
                            u.lk_cpu
                        ));
                        res[via as usize].push((mbs, u));
                    }
                    Err(e) => log(&format!("{key} run {i} {}: error {e}", via.name())),
                }
            }
        }
        log(&format!(
            "{key} done: latchkey VmRSS {} KiB VmHWM {} KiB",
            status_kib(pid, "VmRSS:"),
            status_kib(pid, "VmHWM:")
        ));
        let d = median(res[0].iter().map(|x| x.0).collect());
        let p = median(res[1].iter().map(|x| x.0).collect());
        let lk_ns = median(
            res[1]
                .iter()
                .map(|x| x.1.lk_cpu * 1e9 / big_len() as f64)
                .collect(),
        );
        let d_u: Vec<Usage> = res[0].iter().map(|x| x.1).collect();
        let p_u: Vec<Usage> = res[1].iter().map(|x| x.1).collect();
        rows.push([
            format!(
                "S4{} {} MiB {what}",
                if up { "-up" } else { "" },
                env_num("BENCH_BIG_MIB", 100)
            ),
            format!("{} MB/s", fmt(d, 0)),
            format!("{} MB/s", fmt(p, 0)),
            format!("{}x", fmt(p / d, 2)),
            format!("latchkey {} ns CPU/byte", fmt(lk_ns, 2)),
            usage_cell(&d_u, &p_u),
        ]);
    }

    // S7 holds 500 requests (and their connections) at once: memory of its own, after S1-S4.
    let hwm_s1_s4 = status_kib(pid, "VmHWM:");
    if want("s7") {
        let held_total = held_basics.len() * held_per_agent;
        let mut base = Vec::new();
        let mut loaded = Vec::new();
        let approvals_dir = home.join("state/approvals");
        let pending = || {
            std::fs::read_dir(&approvals_dir)
                .map(|d| {
                    d.flatten()
                        .filter(|e| {
                            let n = e.file_name();
                            let n = n.to_string_lossy();
                            n.starts_with('r') && n.ends_with(".json") && !n.contains(".decision")
                        })
                        .count()
                })
                .unwrap_or(0)
        };
        for i in 0..runs {
            let r = rt.block_on(timed(
                ctx.clone(),
                Kind::KeepAliveTls,
                Via::Proxied,
                conns,
                secs,
                pid,
            ));
            log(&format!(
                "s7 run {i} nothing held: {:>8.0} req/s p50 {:.3} ms p99 {:.3} ms errors {} latchkey cpu {:.1} us/req",
                r.rps(),
                r.pct(50.0),
                r.pct(99.0),
                r.errors,
                r.usage.lk_cpu * 1e6 / r.requests.max(1) as f64,
            ));
            base.push(r);
            // Hold `held_total` requests: each on a tunnel and connection of its own.
            let t0 = Instant::now();
            let holders = rt.block_on(hold_requests(ctx.clone(), &held_basics, held_per_agent));
            while pending() < held_total && t0.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(50));
            }
            log(&format!(
                "s7 run {i}: {} requests held in {:.1}s",
                pending(),
                t0.elapsed().as_secs_f64()
            ));
            let r = rt.block_on(timed(
                ctx.clone(),
                Kind::KeepAliveTls,
                Via::Proxied,
                conns,
                secs,
                pid,
            ));
            log(&format!(
                "s7 run {i} {} held: {:>8.0} req/s p50 {:.3} ms p99 {:.3} ms errors {} latchkey cpu {:.1} us/req",
                pending(),
                r.rps(),
                r.pct(50.0),
                r.pct(99.0),
                r.errors,
                r.usage.lk_cpu * 1e6 / r.requests.max(1) as f64,
            ));
            loaded.push(r);
            // The held agents go away: their entries disappear (cancelled).
            for h in holders {
                h.abort();
            }
            let t0 = Instant::now();
            while pending() > 0 && t0.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let m = |v: &Vec<Run>, f: &dyn Fn(&Run) -> f64| median(v.iter().map(f).collect());
        let (b_rps, l_rps) = (m(&base, &|r| r.rps()), m(&loaded, &|r| r.rps()));
        let (b50, l50) = (m(&base, &|r| r.pct(50.0)), m(&loaded, &|r| r.pct(50.0)));
        let (b99, l99) = (m(&base, &|r| r.pct(99.0)), m(&loaded, &|r| r.pct(99.0)));
        let cpu = |r: &Run| r.usage.lk_cpu * 1e6 / r.requests.max(1) as f64;
        let (b_cpu, l_cpu) = (m(&base, &cpu), m(&loaded, &cpu));
        rows.push([
            format!(
                "S7 S1 proxied while {held_total} requests of {} agents are held",
                held_basics.len()
            ),
            format!(
                "nothing held: {} req/s (p50 {} / p99 {} ms)",
                fmt(b_rps, 0),
                fmt(b50, 2),
                fmt(b99, 2)
            ),
            format!(
                "{} req/s (p50 {} / p99 {} ms)",
                fmt(l_rps, 0),
                fmt(l50, 2),
                fmt(l99, 2)
            ),
            format!("{}x of nothing held", fmt(l_rps / b_rps, 2)),
            format!(
                "latchkey {} µs CPU/req (nothing held: {})",
                fmt(l_cpu, 1),
                fmt(b_cpu, 1)
            ),
            String::new(),
        ]);
    }

    let hwm_before_s6 = status_kib(pid, "VmHWM:");
    let rss_before_s6 = status_kib(pid, "VmRSS:");
    let mut per_host = f64::NAN;
    if want("s6") {
        let mut res: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
        for (i, hosts) in host_sets.iter().enumerate() {
            for via in [Via::Direct, Via::Proxied] {
                let perf = (i == 0 && via == Via::Proxied)
                    .then(|| perf_start(pid, "s6"))
                    .flatten();
                let r = rt.block_on(first_contact(ctx.clone(), via, hosts.clone(), pid));
                perf_stop(perf);
                log(&format!(
                    "s6 run {i} {:>7}: {} hosts p50 {:.3} ms p99 {:.3} ms errors {} core0 {:.0}% \
                     core1 {:.0}% latchkey cpu {:.0} us/host{}",
                    via.name(),
                    r.requests,
                    r.pct(50.0),
                    r.pct(99.0),
                    r.errors,
                    r.usage.core0 * 100.0,
                    r.usage.core1 * 100.0,
                    r.usage.lk_cpu * 1e6 / r.requests.max(1) as f64,
                    r.first_error
                        .as_deref()
                        .map(|e| format!(" first error: {e}"))
                        .unwrap_or_default()
                ));
                res[via as usize].push(r);
            }
        }
        log(&format!(
            "s6 done: latchkey VmRSS {} KiB VmHWM {} KiB",
            status_kib(pid, "VmRSS:"),
            status_kib(pid, "VmHWM:")
        ));
        per_host = status_kib(pid, "VmRSS:").saturating_sub(rss_before_s6) as f64
            / (n_hosts * runs).max(1) as f64;
        let m = |v: &Vec<Run>, f: &dyn Fn(&Run) -> f64| median(v.iter().map(f).collect());
        let d50 = m(&res[0], &|r| r.pct(50.0));
        let p50 = m(&res[1], &|r| r.pct(50.0));
        let d99 = m(&res[0], &|r| r.pct(99.0));
        let p99 = m(&res[1], &|r| r.pct(99.0));
        let lk_us = m(&res[1], &|r| {
            r.usage.lk_cpu * 1e6 / r.requests.max(1) as f64
        });
        let d_u: Vec<Usage> = res[0].iter().map(|r| r.usage).collect();
        let p_u: Vec<Usage> = res[1].iter().map(|r| r.usage).collect();
        rows.push([
            format!("S6 first request to {n_hosts} distinct hosts"),
            format!("p50 {} / p99 {} ms", fmt(d50, 2), fmt(d99, 2)),
            format!("p50 {} / p99 {} ms", fmt(p50, 2), fmt(p99, 2)),
            format!(
                "p50 {}x; added p50 {} ms",
                fmt(p50 / d50, 2),
                fmt(p50 - d50, 2)
            ),
            format!("latchkey {} µs CPU/host", fmt(lk_us, 0)),
            usage_cell(&d_u, &p_u),
        ]);
    }

    let hwm_load = status_kib(pid, "VmHWM:");
    log(&format!("latchkey VmHWM after S1-S4/S6: {hwm_load} KiB"));

    if want("s5") {
        // Unused tunnels first, then as many that each served one request, measured while
        // the first set stays open (so the second cannot reuse memory the first gave back).
        let mut all = Vec::new();
        for (used, what) in [(false, "unused"), (true, "idle after one request")] {
            std::thread::sleep(Duration::from_millis(500));
            let before = status_kib(pid, "VmRSS:");
            let t0 = Instant::now();
            let (kept, failed) = rt.block_on(open_idle(ctx.clone(), tunnels, used));
            let open_secs = t0.elapsed().as_secs_f64();
            std::thread::sleep(Duration::from_secs(1));
            let after = status_kib(pid, "VmRSS:");
            let per = (after.saturating_sub(before)) as f64 / kept.len().max(1) as f64;
            log(&format!(
                "s5 ({what}): {} tunnels open ({failed} failed) in {open_secs:.1}s; RSS {before} \
                 -> {after} KiB = {per:.1} KiB/tunnel",
                kept.len()
            ));
            rows.push([
                format!("S5 {tunnels} CONNECT+TLS tunnels, {what}"),
                "-".into(),
                format!(
                    "RSS {before} -> {after} KiB ({} open, {failed} failed)",
                    kept.len()
                ),
                format!("{} KiB per tunnel", fmt(per, 1)),
                String::new(),
                String::new(),
            ]);
            all.extend(kept);
        }
        rt.block_on(async move {
            drop(all);
        });
    }
    let hwm = status_kib(pid, "VmHWM:");
    rows.push([
        "Peak RSS (VmHWM)".into(),
        "-".into(),
        format!(
            "{} MiB after S1-S4; {} MiB after S7 (500 held); {} MiB after S6 ({} distinct \
             hosts); {} MiB incl. S5",
            fmt(hwm_s1_s4 as f64 / 1024.0, 1),
            fmt(hwm_before_s6 as f64 / 1024.0, 1),
            fmt(hwm_load as f64 / 1024.0, 1),
            n_hosts * runs,
            fmt(hwm as f64 / 1024.0, 1)
        ),
        format!(
            "start {} MiB; S6 adds {} KiB per distinct host",
            fmt(rss0 as f64 / 1024.0, 1),
            fmt(per_host, 1)
        ),
        String::new(),
        String::new(),
    ]);

    println!();
    println!(
        "latchkey e2e: {runs} runs per path, {secs} s each, medians; latchkey on core 1, \
         upstream + load generator on core 0"
    );
    println!();
    println!("| scenario | direct | through latchkey | proxied/direct | latchkey cost | core busy (median) |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!("| {} |", r.join(" | "));
    }
    drop(lk);
    drop(dir);
}
