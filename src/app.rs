//! The application: a validated [`ServeConfig`] in, a [`Running`] proxy out.
//!
//! `app::run` opens every component (CA, token keys, revocations, shared state, secret
//! backend, policies, upstream client, audit log), binds the listeners, and starts the
//! background tasks (hot reload, revocation sync, admin). [`Running::shutdown`] stops
//! accepting, lets in-flight requests finish (bounded), and flushes the audit log. The CLI's
//! `serve` and the tests start the proxy the same way, so what the tests run is what ships.
//!
//! This module wires components together; it holds no request logic and never prints.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::audit::{AuditSink, AuditWriter, Recorder, Rotation};
use crate::auth::{Revocations, TokenKeys};
use crate::fsutil;
use crate::metrics::Metrics;
use crate::policy::reload::{keep_last_good, DirStamp};
use crate::policy::{Policies, Severity};
use crate::proxy::server::{self, Drain};
use crate::proxy::{admin, Limits, ResolvePin, Shared, Upstream};
use crate::redis::Redis;
use crate::secrets::BackendConfig;
use crate::tls::{CertificateAuthority, LeafCache, ListenerCert};
use crate::tripwire::Tripwire;

/// How often revocations, signing keys and policy files are checked for changes.
const RELOAD_EVERY: Duration = Duration::from_millis(250);

/// How often the tripwire's credential set is rebuilt from OpenBao (the file store is checked
/// on every reload tick: a `stat`). Never per request.
const TRIPWIRE_REMOTE_EVERY: Duration = Duration::from_secs(5);

/// Leaf certificates kept in memory (one per upstream host).
const LEAF_CACHE_SIZE: u64 = 10_000;

/// Everything `serve` needs, validated. [`ServeConfig::new`] gives the embedded defaults.
#[derive(Debug)]
pub struct ServeConfig {
    /// Directory of per-agent policy files.
    pub policies: PathBuf,
    /// Directory of the CA (`ca.crt`, `ca.key`).
    pub certs: PathBuf,
    /// Keys, secrets, revocations and (by default) the audit log.
    pub state_dir: PathBuf,
    /// The agent-facing listener (port 0 picks a free port).
    pub listen: SocketAddr,
    /// The admin listener (`/healthz`, `/metrics`); `None` disables it.
    pub admin_listen: Option<SocketAddr>,
    /// A second agent-facing listener speaking TLS with latchkey's own certificate
    /// (`--listen-tls`); `None` for none.
    pub listen_tls: Option<SocketAddr>,
    /// Names (DNS or IP) the TLS listener's certificate covers besides `localhost`,
    /// `127.0.0.1` and `::1` (`--tls-name`).
    pub tls_names: Vec<String>,
    /// Extra PEM files of roots trusted for upstream TLS.
    pub upstream_ca: Vec<PathBuf>,
    /// `--resolve` pins.
    pub resolve: Vec<ResolvePin>,
    /// Audit log file (default `<state_dir>/audit.jsonl`; `-` is standard output).
    pub audit_log: Option<PathBuf>,
    /// When the audit log rotates.
    pub audit_rotation: Rotation,
    /// This replica's name in every audit line.
    pub replica_id: String,
    /// Timeouts and sizes.
    pub limits: Limits,
    /// Verify tokens with these public keys (JWKS or PEM) instead of the state dir's own.
    pub verify_keys: Option<PathBuf>,
    /// Allow upstreams on private addresses without a pin.
    pub allow_private_upstreams: bool,
    /// Where credential values live.
    pub secrets: BackendConfig,
    /// Shared session state across replicas.
    pub redis: Option<RedisConfig>,
    /// What a request caught carrying a credential costs its session.
    pub on_exfiltration: crate::tripwire::OnExfiltration,
    /// The longest a request waits for a credential to mint a token (an OAuth refresh, a
    /// GitHub App installation token) before it is answered 503 `credential_unavailable`.
    pub credential_wait: Duration,
    /// Human approvals: how long a request is held, how many per agent, who hears of them.
    pub approval: ApprovalConfig,
    /// A listener for the dashboard alone (besides the admin listener's `/ui/`).
    pub ui_listen: Option<SocketAddr>,
    /// Mark the dashboard's cookies `Secure` (it is served over TLS by a front proxy).
    pub ui_secure_cookie: bool,
    /// Threads of the runtime `serve` runs on (`--worker-threads`, else the CPUs this process
    /// may use). [`run`] serves on whatever runtime it is called from; [`runtime_builder`]
    /// builds the one this asks for.
    pub worker_threads: usize,
}

/// `--approval-timeout`, `--approval-queue`, `--approval-webhook`.
#[derive(Debug, Clone)]
pub struct ApprovalConfig {
    /// Longest a request waits for a person's decision before 403 approval_timeout.
    pub timeout: Duration,
    /// Most requests one agent may have held at once (the excess: 429 approval_queue_full).
    pub queue: usize,
    /// Where each pending approval is announced (JSON POST), if anywhere.
    pub webhook: Option<String>,
}

impl Default for ApprovalConfig {
    fn default() -> ApprovalConfig {
        ApprovalConfig {
            timeout: Duration::from_secs(300),
            queue: 16,
            webhook: None,
        }
    }
}

/// `--redis` and its grace period.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://host:port`.
    pub url: String,
    /// How long tokens newer than the last sync are still accepted while Redis is down.
    pub grace: Duration,
}

impl ServeConfig {
    /// The embedded defaults around three directories: proxy on 127.0.0.1:8080, admin on
    /// 127.0.0.1:8081, file secret store, no Redis, the host name as replica id.
    pub fn new(policies: PathBuf, certs: PathBuf, state_dir: PathBuf) -> ServeConfig {
        ServeConfig {
            policies,
            certs,
            state_dir,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8081))),
            listen_tls: None,
            tls_names: Vec::new(),
            upstream_ca: Vec::new(),
            resolve: Vec::new(),
            audit_log: None,
            audit_rotation: Rotation::default(),
            replica_id: default_replica_id(),
            limits: Limits::default(),
            verify_keys: None,
            allow_private_upstreams: false,
            secrets: BackendConfig::File,
            redis: None,
            on_exfiltration: Default::default(),
            credential_wait: crate::credential::DEFAULT_WAIT,
            approval: ApprovalConfig::default(),
            ui_listen: None,
            ui_secure_cookie: false,
            worker_threads: available_threads(),
        }
    }

    /// Where audit lines go.
    pub fn audit_path(&self) -> PathBuf {
        self.audit_log
            .clone()
            .unwrap_or_else(|| self.state_dir.join("audit.jsonl"))
    }
}

/// The CPUs this process may run on (its affinity and cgroup quota count), at least one.
pub fn available_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// The runtime for `serve` with `threads` threads. One is a single current-thread event loop:
/// every request of a proxy given one core then runs without the work-stealing scheduler's
/// cross-thread wake-ups (BENCHMARKS.md, "Performance, round two").
pub fn runtime_builder(threads: usize) -> tokio::runtime::Builder {
    if threads <= 1 {
        return tokio::runtime::Builder::new_current_thread();
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(threads);
    builder
}

/// The host name, or `latchkey` when it cannot be read.
pub fn default_replica_id() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "latchkey".to_owned())
}

/// Why the proxy could not start: what was being done, and the cause.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct StartError {
    what: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl StartError {
    fn new(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StartError {
        StartError {
            what: what.into(),
            source: Some(source.into()),
        }
    }
}

/// Attach "what we were doing" to a component's error.
trait Doing<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, StartError>;
}

impl<T, E: Into<Box<dyn std::error::Error + Send + Sync>>> Doing<T> for Result<T, E> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, StartError> {
        self.map_err(|e| StartError::new(what(), e))
    }
}

/// A proxy that is serving. Drop it without [`Running::shutdown`] and the listeners stop
/// with the runtime, but the audit log's last batch may not be flushed.
pub struct Running {
    /// The agent-facing address actually bound.
    pub addr: SocketAddr,
    /// The admin address actually bound, if enabled.
    pub admin_addr: Option<SocketAddr>,
    /// The TLS listener's address actually bound (`--listen-tls`), if enabled.
    pub tls_addr: Option<SocketAddr>,
    /// The dashboard's own address (`--ui-listen`), if given.
    pub ui_addr: Option<SocketAddr>,
    /// Whether audit lines go to standard output (`--audit-log -`).
    pub audit_to_stdout: bool,
    /// The CA certificate, when this start created the CA (give it to agents).
    pub created_ca: Option<PathBuf>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    alive: mpsc::Receiver<()>,
    tasks: Vec<JoinHandle<()>>,
    audit_writer: AuditWriter,
    addr_file: PathBuf,
}

/// What a clean shutdown did.
#[derive(Debug, Clone, Copy)]
pub struct Stopped {
    /// Audit lines written during this run.
    pub audit_lines: u64,
    /// Whether every connection finished within the drain timeout.
    pub drained: bool,
}

/// Check the caps against each other and against the file descriptors the process may open,
/// raising the soft `RLIMIT_NOFILE` to the hard limit first. A cap the fd limit cannot honour
/// would fail at the worst moment (EMFILE under load breaks every agent, not the one over
/// its cap), so it stops the start instead.
fn check_caps(limits: &mut Limits) -> Result<(), StartError> {
    let refuse = |what: String| StartError { what, source: None };
    for (flag, value) in [
        ("--max-connections", limits.max_connections),
        (
            "--max-unauthenticated-connections",
            limits.max_unauthenticated_connections,
        ),
        (
            "--max-connections-per-agent",
            limits.max_connections_per_agent,
        ),
        (
            "--max-requests-in-flight-per-agent",
            limits.max_requests_in_flight_per_agent,
        ),
        (
            "--max-upstream-connections",
            limits.max_upstream_connections,
        ),
    ] {
        if value == 0 {
            return Err(refuse(format!("{flag} must be at least 1")));
        }
    }
    if limits.first_request_timeout.is_zero() {
        return Err(refuse(
            "--first-request-timeout must be longer than 0".into(),
        ));
    }
    let available = raise_fd_limit();
    if limits.fit_fd_caps && limits.fds_needed() > available {
        let before = limits.fds_needed();
        limits.fit_to(available);
        tracing::warn!(
            available,
            needed = before,
            max_connections = limits.max_connections,
            max_unauthenticated_connections = limits.max_unauthenticated_connections,
            max_upstream_connections = limits.max_upstream_connections,
            "the file descriptor limit is below what the default connection caps need; \
             caps lowered to fit (raise the limit or set the caps to silence this)"
        );
    }
    let needed = limits.fds_needed();
    if needed > available {
        return Err(refuse(format!(
            "the caps need up to {needed} file descriptors (--max-connections {} + \
             --max-unauthenticated-connections {} + --max-upstream-connections {} + {} kept \
             aside) but this process may open only {available} (RLIMIT_NOFILE, hard limit \
             included): lower those flags or raise the limit (ulimit -n, LimitNOFILE=)",
            limits.max_connections,
            limits.max_unauthenticated_connections,
            limits.max_upstream_connections,
            crate::proxy::FD_RESERVE,
        )));
    }
    Ok(())
}

/// Raise the soft fd limit to the hard one (the default soft limit, often 1024, is far below
/// what the default caps need) and return the limit in force.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return u64::MAX;
    };
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                tracing::debug!(from = soft, to = hard, "raised the file descriptor limit");
                return hard;
            }
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "cannot raise the file descriptor limit")
            }
        }
    }
    soft
}

/// Open every component, bind the listeners and start serving.
pub async fn run(mut cfg: ServeConfig) -> Result<Running, StartError> {
    check_caps(&mut cfg.limits)?;
    let audit_path = cfg.audit_path();
    let (ca, created) = CertificateAuthority::load_or_create(&cfg.certs)
        .doing(|| format!("cannot open the CA in {}", cfg.certs.display()))?;
    let keys = match &cfg.verify_keys {
        Some(file) => TokenKeys::verify_only(file)
            .doing(|| format!("cannot read the verify keys {}", file.display()))?,
        None => TokenKeys::load_or_create(&cfg.state_dir)
            .doing(|| "cannot open the token signing keys".to_owned())?,
    };
    let revocations =
        Revocations::open(&cfg.state_dir).doing(|| "cannot open the revocation list".to_owned())?;
    let metrics = Arc::new(Metrics::default());
    let shared_state = match &cfg.redis {
        Some(redis) => {
            let st = Arc::new(
                Redis::open(&redis.url).doing(|| "cannot use the --redis address".to_owned())?,
            );
            revocations.require_sync(redis.grace);
            // Start with the full set when Redis answers; when it does not, start anyway with
            // what the state dir holds: the sync task keeps trying, and the grace period applies.
            match crate::auth::resync_revocations(&st, &revocations).await {
                Ok(n) => tracing::info!(revocations = n, "shared state (Redis) synced"),
                Err(e) => {
                    tracing::error!(error = %e, "shared state (Redis) unreachable at start; will keep trying")
                }
            }
            Some(st)
        }
        None => None,
    };
    let rate_limits = match &shared_state {
        Some(st) => crate::ratelimit::RateLimits::shared(st.clone()),
        None => crate::ratelimit::RateLimits::local(),
    };
    let secrets = Arc::new(
        cfg.secrets
            .open(&cfg.state_dir)
            .doing(|| "cannot open the secret backend".to_owned())?,
    );
    secrets.start_refresh();
    // Taken before the build, like the policy stamp below: a change in between is then seen
    // by the reloader, and an unchanged store is not read a second time on its first tick.
    let mut secrets_seen = secrets.file_generation();
    let tripwire = match Tripwire::build(&secrets).await {
        Ok(t) => t,
        Err(e) => {
            secrets_seen = None;
            // A down OpenBao must not stop the start: formats are still caught, and the
            // reload loop keeps trying for the stored values.
            tracing::error!(error = %e, "cannot read the stored credentials for the exfiltration tripwire; will keep trying");
            Tripwire::formats_only()
        }
    };
    // Taken before the load: a file that changes between the two is then seen as a change by
    // the reloader instead of being missed until its next edit.
    let policy_stamp = DirStamp::of(&cfg.policies);
    let policies = load_policies(&cfg.policies)?;
    let upstream = Upstream::try_new(
        &cfg.upstream_ca,
        &cfg.resolve,
        cfg.limits.upstream_timeout,
        cfg.allow_private_upstreams,
        cfg.limits.max_upstream_connections,
    )
    .doing(|| "cannot build the upstream client".to_owned())?;
    let ca = Arc::new(ca);
    let tls_config = match cfg.listen_tls {
        Some(_) => Some(
            ListenerCert::try_new(ca.clone(), &cfg.tls_names)
                .and_then(ListenerCert::server_config)
                .doing(|| "cannot make the TLS listener's certificate (--tls-name)".to_owned())?,
        ),
        None => None,
    };
    let leaves = LeafCache::try_new(ca, LEAF_CACHE_SIZE)
        .doing(|| "cannot build the leaf certificate cache".to_owned())?;
    let audit_to_stdout = audit_path.as_os_str() == crate::audit::sink::STDOUT_PATH;
    let (audit, audit_writer) = AuditSink::open_rotating(&audit_path, Some(cfg.audit_rotation))
        .await
        .doing(|| format!("cannot open the audit log {}", audit_path.display()))?;
    let runtime = Arc::new(crate::credential::Runtime {
        endpoints: Arc::new(
            crate::credential::endpoint::Endpoints::new(
                &cfg.upstream_ca,
                crate::credential::ENDPOINT_TIMEOUT,
            )
            .doing(|| "cannot build the token endpoint client".to_owned())?,
        ),
        secrets: secrets.clone(),
        redis: shared_state.clone(),
        metrics: metrics.clone(),
        wait: cfg.credential_wait,
    });
    let credentials = crate::credential::Credentials::new(
        secrets.clone(),
        crate::credential::serving_kinds(
            runtime,
            Some(Arc::new(UpstreamTransport(upstream.clone()))),
        ),
    );
    let recorder = Arc::new(Recorder::new(
        audit,
        metrics.clone(),
        cfg.replica_id.clone(),
    ));
    if cfg.approval.queue == 0 {
        return Err(StartError {
            what: "--approval-queue must be at least 1".into(),
            source: None,
        });
    }
    let webhook = match &cfg.approval.webhook {
        Some(url) => Some(Arc::new(
            crate::approval::notify::Webhook::try_new(url)
                .doing(|| "cannot use the approval webhook".to_owned())?,
        )),
        None => None,
    };
    let holds = Arc::new(crate::approval::Holds::new(
        Arc::new(crate::approval::Store::new(
            &cfg.state_dir,
            shared_state.clone(),
        )),
        recorder.clone(),
        webhook,
        cfg.approval.timeout,
        cfg.approval.queue,
        cfg.replica_id.clone(),
    ));
    let stale = holds.forget_stale().await;
    if stale > 0 {
        tracing::warn!(
            stale,
            "removed held requests a previous run of this replica left behind"
        );
    }
    let shared = Arc::new(Shared {
        policies: ArcSwap::from_pointee(policies),
        keys,
        revocations,
        secrets,
        leaves,
        upstream,
        recorder,
        limits: cfg.limits.clone(),
        policies_dir: cfg.policies.clone(),
        metrics,
        limits_state: Default::default(),
        credentials,
        rate_limits,
        tripwire: ArcSwap::from_pointee(tripwire),
        on_exfiltration: cfg.on_exfiltration,
        redis: shared_state.clone(),
        holds: holds.clone(),
        ui: Arc::new(crate::ui::Dashboard::new(
            &cfg.state_dir,
            &audit_path,
            cfg.ui_secure_cookie,
        )),
    });
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .doing(|| format!("cannot listen on {}", cfg.listen))?;
    let addr = listener
        .local_addr()
        .doing(|| "cannot read the listening address".to_owned())?;
    if let Some(warning) = plaintext_warning(addr) {
        tracing::warn!("{warning}");
    }
    let tls_listener = match cfg.listen_tls {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .doing(|| format!("cannot listen on {a} for the TLS listener (--listen-tls)"))?,
        ),
        None => None,
    };
    let tls_addr = tls_listener.as_ref().and_then(|l| l.local_addr().ok());
    let admin_listener = match cfg.admin_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .doing(|| format!("cannot listen on {a} for the admin endpoints"))?,
        ),
        None => None,
    };
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
    let ui_listener = match cfg.ui_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .doing(|| format!("cannot listen on {a} for the dashboard"))?,
        ),
        None => None,
    };
    let ui_addr = ui_listener.as_ref().and_then(|l| l.local_addr().ok());
    // `latchkey run` finds the proxy through this file.
    let addr_file = cfg.state_dir.join("proxy.addr");
    fsutil::ensure_private_dir(&cfg.state_dir)
        .doing(|| format!("cannot create the state dir {}", cfg.state_dir.display()))?;
    fsutil::write_atomic(&addr_file, format!("{addr}\n").as_bytes(), 0o600)
        .doing(|| format!("cannot write {}", addr_file.display()))?;

    let (drain, stop, alive) = Drain::new();
    let mut tasks = vec![tokio::spawn(reload_loop(
        shared.clone(),
        drain.clone(),
        policy_stamp,
        secrets_seen,
    ))];
    if let (Some(st), Some(redis)) = (shared_state, &cfg.redis) {
        let shared = shared.clone();
        let mut drain = drain.clone();
        let grace = redis.grace;
        tasks.push(tokio::spawn(async move {
            crate::auth::sync_revocations(
                &st,
                &shared.revocations,
                &shared.metrics,
                grace,
                drain.stopped(),
            )
            .await
        }));
    }
    {
        let mut drain = drain.clone();
        tasks.push(tokio::spawn(async move {
            holds.watch(async move { drain.stopped().await }).await
        }));
    }
    if let Some(l) = admin_listener {
        tasks.push(tokio::spawn(admin::serve(
            l,
            shared.clone(),
            drain.clone(),
            admin::Serves::Admin,
        )));
    }
    if let Some(l) = ui_listener {
        tasks.push(tokio::spawn(admin::serve(
            l,
            shared.clone(),
            drain.clone(),
            admin::Serves::UiOnly,
        )));
    }
    if let (Some(l), Some(config)) = (tls_listener, tls_config) {
        tasks.push(tokio::spawn(server::serve_tls(
            l,
            shared.clone(),
            drain.clone(),
            config,
        )));
    }
    tasks.push(tokio::spawn(server::serve(listener, shared.clone(), drain)));
    Ok(Running {
        addr,
        admin_addr,
        tls_addr,
        ui_addr,
        audit_to_stdout,
        created_ca: created.then(|| cfg.certs.join("ca.crt")),
        shared,
        stop,
        alive,
        tasks,
        audit_writer,
        addr_file,
    })
}

impl Running {
    /// Stop accepting, let in-flight requests finish (up to the drain timeout), then flush
    /// and fsync the audit log: every request that completed has its line on disk.
    pub async fn shutdown(self) -> Result<Stopped, StartError> {
        let Running {
            shared,
            stop,
            mut alive,
            tasks,
            audit_writer,
            addr_file,
            ..
        } = self;
        let _ = stop.send(true);
        for task in tasks {
            let _ = task.await;
        }
        let drain_timeout = shared.limits.drain_timeout;
        drop(shared);
        // Every connection holds a Drain; recv returns None once the last one is gone.
        let drained = tokio::time::timeout(drain_timeout, alive.recv())
            .await
            .is_ok();
        if !drained {
            tracing::warn!("some connections did not finish in time");
        }
        let audit_lines = audit_writer
            .shutdown()
            .await
            .doing(|| "cannot flush the audit log".to_owned())?;
        let _ = std::fs::remove_file(addr_file);
        Ok(Stopped {
            audit_lines,
            drained,
        })
    }
}

/// The warning for a plain listener that is not on loopback: tokens (the proxy password, or
/// the API key in gateway mode) would cross the network in plaintext. `None` on loopback.
pub fn plaintext_warning(listen: SocketAddr) -> Option<String> {
    if listen.ip().is_loopback() {
        return None;
    }
    Some(format!(
        "--listen {listen} is not a loopback address: agent tokens sent to it (the proxy \
         password in proxy mode, the API key in gateway mode) cross the network in plaintext; \
         prefer --listen-tls for agents on other hosts"
    ))
}

/// Load the policy directory at start; any error in any file stops the start (unlike a
/// reload, there is no last good version to keep).
pub fn load_policies(dir: &std::path::Path) -> Result<Policies, StartError> {
    let report =
        Policies::load_dir(dir).doing(|| format!("cannot read policies from {}", dir.display()))?;
    let mut errors = Vec::new();
    for d in &report.diagnostics {
        if d.severity == Severity::Error {
            errors.push(d.to_string());
        } else {
            tracing::warn!("{d}");
        }
    }
    if !errors.is_empty() {
        return Err(StartError {
            what: format!(
                "{} error(s) in policy files under {}; run `latchkey policy check`:\n{}",
                errors.len(),
                dir.display(),
                errors.join("\n")
            ),
            source: None,
        });
    }
    Ok(report.policies)
}

/// Pick up revocations, signing keys, stored credentials (for the tripwire) and policy edits
/// while serving. `secrets_seen` is the file store's generation the running tripwire was built from (`None`
/// when it must be rebuilt on the first tick).
async fn reload_loop(
    shared: Arc<Shared>,
    mut drain: Drain,
    policy_stamp: DirStamp,
    mut secrets_seen: Option<u64>,
) {
    let mut tick = tokio::time::interval(RELOAD_EVERY);
    let mut last_policy_stamp = policy_stamp;
    let mut tripwire_built = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = drain.stopped() => return,
        }
        if let Err(e) = shared.revocations.reload_if_changed() {
            tracing::error!(error = %e, "cannot reload revocations; keeping the last list");
        }
        match shared.keys.reload_if_changed() {
            Ok(true) => tracing::info!("token verification keys reloaded"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot reload the token keys; keeping the last set")
            }
        }
        // The tripwire follows the secrets: the file store when its generation moves (one
        // `stat`), OpenBao on a modest interval.
        let generation = shared.secrets.file_generation();
        let due = match generation {
            Some(_) => generation != secrets_seen,
            None => tripwire_built.elapsed() >= TRIPWIRE_REMOTE_EVERY,
        };
        if due {
            tripwire_built = tokio::time::Instant::now();
            match Tripwire::build(&shared.secrets).await {
                Ok(t) => {
                    shared.tripwire.store(Arc::new(t));
                    secrets_seen = generation;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot rebuild the exfiltration tripwire; keeping the last set")
                }
            }
        }
        let stamp = DirStamp::of(&shared.policies_dir);
        if stamp != last_policy_stamp {
            last_policy_stamp = stamp;
            match Policies::load_dir(&shared.policies_dir) {
                Ok(report) => {
                    let current = shared.policies.load_full();
                    shared
                        .policies
                        .store(Arc::new(keep_last_good(&current, report)));
                    shared.credentials.clear();
                }
                Err(e) => tracing::error!(error = %e, "cannot read the policy directory"),
            }
        }
    }
}

/// Credential kinds reach their own endpoints (STS) through the proxy's upstream client: the
/// same roots, `--resolve` pins, private-address guard and response timeout as agent traffic.
struct UpstreamTransport(Upstream);

/// The most of a credential endpoint's answer latchkey reads (an STS answer is ~2 KiB).
const MAX_FETCHED: usize = 1 << 20;

impl crate::credential::Transport for UpstreamTransport {
    fn fetch(
        &self,
        req: http::Request<crate::credential::Body>,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<crate::credential::Fetched, String>>
                + Send
                + '_,
        >,
    > {
        Box::pin(async move {
            use http_body_util::BodyExt;
            let resp = self
                .0
                .send(req, None, false)
                .await
                .map_err(|f| f.deny.to_string())?;
            let (parts, body) = resp.into_parts();
            let body = http_body_util::Limited::new(body, MAX_FETCHED)
                .collect()
                .await
                .map_err(|e| format!("its answer could not be read: {e}"))?
                .to_bytes();
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_off_loopback_is_warned_about_plaintext_tokens() {
        for quiet in ["127.0.0.1:8080", "127.0.0.2:1", "[::1]:8080"] {
            assert_eq!(plaintext_warning(quiet.parse().unwrap()), None, "{quiet}");
        }
        for loud in ["0.0.0.0:8080", "192.168.1.5:8080", "[::]:8080"] {
            let w = plaintext_warning(loud.parse().unwrap()).expect(loud);
            assert!(w.contains("plaintext") && w.contains("--listen-tls"), "{w}");
        }
    }
}
