//! The command line: clap types and one function per subcommand. `anyhow` stops here; every
//! error reaches the user as one sentence with its cause chain (`{:#}`), never a panic.

use std::io::{IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::app::{self, RedisConfig, ServeConfig};
use crate::audit;
use crate::auth::{self, Revocations, TokenKeys, TokenSpec};
use crate::fsutil;
use crate::policy::{Policies, Severity};
use crate::proxy::{Limits, ResolvePin};
use crate::redis::Redis;
use crate::run;
use crate::secrets::{BackendConfig, OpenBaoAuth, OpenBaoConfig, Secret, Secrets};
use crate::tls::CertificateAuthority;

/// latchkey: give AI agents scoped, short-lived access to real APIs without ever handing them a key.
#[derive(Debug, Parser)]
#[command(name = "latchkey", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    dirs: Dirs,
    #[command(flatten)]
    state: StateArgs,
    #[command(subcommand)]
    command: Command,
}

/// The three places latchkey keeps its files.
#[derive(Debug, Clone, Args)]
pub struct Dirs {
    /// Directory of per-agent policy files.
    #[arg(
        long,
        global = true,
        env = "LATCHKEY_POLICIES",
        default_value = "policies"
    )]
    pub policies: PathBuf,
    /// Directory holding ca.crt (give to agents) and ca.key.
    #[arg(long, global = true, env = "LATCHKEY_CERTS", default_value = "certs")]
    pub certs: PathBuf,
    /// Directory for keys, the encrypted secret store, revocations and the audit log.
    #[arg(
        long,
        global = true,
        env = "LATCHKEY_STATE_DIR",
        default_value = ".latchkey"
    )]
    pub state_dir: PathBuf,
}

/// State shared by several `serve` replicas (used by `serve`, `token` and `run`).
#[derive(Debug, Clone, Args)]
pub struct StateArgs {
    /// Redis holding revocations and rate limits shared by every replica, e.g.
    /// redis://127.0.0.1:6379. Without it the state dir is the only store.
    #[arg(long, global = true, env = "LATCHKEY_REDIS", value_name = "URL")]
    pub redis: Option<String>,
    /// How long `serve` keeps accepting tokens issued after its last complete Redis sync while
    /// Redis is unreachable; after that they get 503 state_unavailable.
    #[arg(long, global = true, default_value = "30s", value_parser = parse_duration)]
    pub redis_grace: Duration,
}

impl StateArgs {
    /// The shared store, when `--redis` is given (no I/O yet).
    fn open(&self) -> Result<Option<Redis>> {
        self.redis
            .as_deref()
            .map(Redis::open)
            .transpose()
            .map_err(Into::into)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy.
    // Boxed: its many flags make it far larger than the other subcommands.
    Serve(Box<ServeArgs>),
    /// Manage credentials in the secret backend (encrypted file store or OpenBao).
    Secret(SecretArgs),
    /// Issue and revoke agent tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Validate and explain policies.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Read the audit log.
    #[command(subcommand)]
    Logs(LogsCmd),
    /// Check the audit log's hash chain.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Manage latchkey's certificate authority.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Manage the token signing keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Run a command as an agent: mint a token for its lifetime, point its proxy and CA
    /// variables at latchkey, pass its exit code through, revoke the token when it exits.
    #[command(long_about = RUN_LONG_ABOUT)]
    Run(RunArgs),
    /// Decide pending approvals: session grants and held requests.
    #[command(subcommand)]
    Approvals(ApprovalsCmd),
    /// The dashboard's admin token.
    #[command(subcommand)]
    Admin(AdminCmd),
    /// Connect an OAuth provider once (authorization code with PKCE in a browser, or the
    /// device flow with --device) and store the connection for routes to use.
    Connect(Box<ConnectArgs>),
    /// Show stored OAuth connections and GitHub App credentials.
    #[command(subcommand)]
    Connections(ConnectionsCmd),
    /// Internal to `run --contain`: the side that runs inside the network namespace.
    #[command(name = run::contain::INNER_SUBCOMMAND, hide = true)]
    ContainInner(ContainInnerArgs),
}

#[derive(Debug, Subcommand)]
enum ApprovalsCmd {
    /// Show pending grants and held requests (and recent decisions).
    List {
        /// Print JSON (one array of {pending, decision}).
        #[arg(long)]
        json: bool,
    },
    /// Approve one: a held request goes out, a grant's token is issued.
    Approve {
        /// The approval id (see `latchkey approvals list`).
        id: String,
        /// Grants: approve only these routes (comma-separated; a subset of those asked).
        #[arg(long, value_delimiter = ',', value_name = "ID,..")]
        routes: Option<Vec<String>>,
        /// Grants: a shorter token lifetime than asked.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// Held requests: also let this route through for this session for this long (e.g. 10m).
        #[arg(long = "for", value_parser = parse_duration, value_name = "DURATION")]
        for_duration: Option<Duration>,
        /// Who approves, for the audit log (default: $USER).
        #[arg(long = "as", value_name = "NAME")]
        approver: Option<String>,
    },
    /// Deny one: a held request gets 403 approval_denied, a grant issues no token.
    Deny {
        /// The approval id.
        id: String,
        /// Why (shown to the agent and in the audit log).
        #[arg(long)]
        reason: Option<String>,
        /// Who denies, for the audit log (default: $USER).
        #[arg(long = "as", value_name = "NAME")]
        approver: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCmd {
    /// Print the dashboard's admin token (created, 0600 in the state dir, on first use).
    Token {
        /// Replace it with a new one (signs every dashboard user out).
        #[arg(long)]
        rotate: bool,
    },
}

#[derive(Debug, Args)]
struct ConnectArgs {
    /// Connection name, as routes refer to it (`credential = "NAME"`).
    name: String,
    /// Make the connection of this user (for routes with `per_user = true`, chosen by the
    /// token's on-behalf-of user).
    #[arg(long)]
    user: Option<String>,
    /// Provider preset: github, google or generic [default: NAME when it is a preset, or the
    /// provider of the connection being remade].
    #[arg(long)]
    provider: Option<String>,
    /// Authorization endpoint (code flow).
    #[arg(long, value_name = "URL")]
    authorize_url: Option<String>,
    /// Token endpoint.
    #[arg(long, value_name = "URL")]
    token_url: Option<String>,
    /// Device authorization endpoint (--device).
    #[arg(long, value_name = "URL")]
    device_url: Option<String>,
    /// Scopes to ask for, separated by spaces or commas.
    #[arg(long)]
    scopes: Option<String>,
    /// The OAuth app's client id [default: that of the connection being remade, or of the
    /// operator's connection NAME for a --user connection].
    #[arg(long)]
    client_id: Option<String>,
    /// Read the OAuth app's client secret from standard input.
    #[arg(long, conflicts_with = "client_secret_from")]
    client_secret_stdin: bool,
    /// Take the OAuth app's client secret from this stored (static) secret.
    #[arg(long, value_name = "SECRET_NAME")]
    client_secret_from: Option<String>,
    /// Use the device authorization grant (RFC 8628): for hosts without a browser.
    #[arg(long)]
    device: bool,
    /// Port of the one-shot redirect listener on 127.0.0.1 (0: any free port; register
    /// http://127.0.0.1/callback with the provider, which must allow any loopback port).
    #[arg(long, default_value_t = 0)]
    redirect_port: u16,
    /// Only print the URL; do not try to open a browser.
    #[arg(long)]
    no_browser: bool,
    /// How long to wait for the authorisation.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    timeout: Duration,
    /// Extra PEM file of roots trusted for the token endpoint's TLS (repeatable).
    #[arg(long = "upstream-ca", value_name = "FILE")]
    upstream_ca: Vec<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
}

#[derive(Debug, Subcommand)]
enum ConnectionsCmd {
    /// Name, provider, user, scopes, expiry and health of each connection; never a token.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        backend: BackendArgs,
    },
}

/// `latchkey run --help`: what the command's environment becomes.
const RUN_LONG_ABOUT: &str = "\
Run a command as an agent: mint a token for its lifetime, point its proxy and CA variables at \
latchkey, pass its exit code and signals through, revoke the token when it exits.

The command gets, overriding any value it would inherit:
  HTTPS_PROXY HTTP_PROXY ALL_PROXY (and lower-case)  http://AGENT:TOKEN@latchkey
  SSL_CERT_FILE REQUESTS_CA_BUNDLE CURL_CA_BUNDLE NODE_EXTRA_CA_CERTS
  GRPC_DEFAULT_SSL_ROOTS_FILE_PATH NPM_CONFIG_CAFILE npm_config_cafile PIP_CERT
  AWS_CA_BUNDLE DENO_CERT CARGO_HTTP_CAINFO GIT_SSL_CAINFO HTTPLIB2_CA_CERTS
  CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE BUNDLE_SSL_CA_CERT NIX_SSL_CERT_FILE
                          a bundle of the system roots plus latchkey's CA
  NODE_USE_ENV_PROXY=1    so Node >= 22.21 / 24 honours the proxy (Node 20 does not: use
                          --contain or gateway mode)
  LATCHKEY_SESSION        the session id (jti)
NO_PROXY and no_proxy are merged: localhost,127.0.0.1,::1 plus the inherited entries. An \
inherited entry lets clients reach that host directly, around latchkey (a note names them); \
under --contain such connections fail.

--contain (Linux) runs the command in a network namespace of its own whose only way out is \
latchkey: a client that ignores the proxy variables fails at once instead of reaching the \
network. It needs util-linux `unshare` and iproute2 `ip`, and root or unprivileged user \
namespaces; when they are missing the command is not run.";

/// The hidden inner side of `run --contain` (see `run::contain`).
#[derive(Debug, Args)]
struct ContainInnerArgs {
    /// The outer process's relay socket.
    #[arg(long)]
    socket: PathBuf,
    /// Marker file to create once the namespace is set up.
    #[arg(long)]
    ready: PathBuf,
    /// iproute2 `ip`.
    #[arg(long)]
    ip: PathBuf,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<std::ffi::OsString>,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    token: IssueArgs,
    /// Proxy address (host:port); default: the running `latchkey serve` recorded in the state dir.
    #[arg(long)]
    proxy: Option<String>,
    /// Linux: run the command in its own network namespace whose only way out is latchkey,
    /// so clients that ignore HTTPS_PROXY fail instead of bypassing it.
    #[arg(long)]
    contain: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<std::ffi::OsString>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on (proxy and gateway mode, plain HTTP: off loopback, tokens cross
    /// the network in plaintext; use --listen-tls for that).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Also listen with TLS on this address, with a certificate from latchkey's CA (agents
    /// trust it with ca.crt): `curl --proxy https://ADDR --proxy-cacert ca.crt`, or
    /// `https://ADDR/gw/<route-id>` as an SDK base URL.
    #[arg(long, value_name = "ADDR")]
    listen_tls: Option<SocketAddr>,
    /// A name (DNS or IP) the --listen-tls certificate covers besides localhost, 127.0.0.1
    /// and ::1 (repeatable).
    #[arg(long = "tls-name", value_name = "NAME", requires = "listen_tls")]
    tls_names: Vec<String>,
    /// Extra PEM file of roots trusted for upstream TLS (repeatable).
    #[arg(long = "upstream-ca", value_name = "FILE")]
    upstream_ca: Vec<PathBuf>,
    /// Pin HOST:PORT to ADDR, like curl's --resolve (repeatable).
    #[arg(long, value_name = "HOST:PORT:ADDR")]
    resolve: Vec<ResolvePin>,
    /// Audit log file (default: <state-dir>/audit.jsonl); `-` writes lines to standard output
    /// for log shippers.
    #[arg(long, value_name = "FILE|-")]
    audit_log: Option<PathBuf>,
    /// This replica's name in every audit line (default: the host name).
    #[arg(long, env = "LATCHKEY_REPLICA_ID")]
    replica_id: Option<String>,
    /// Rotate the audit log when it would grow past this size (e.g. 64MiB).
    #[arg(long, default_value = "64MiB", value_parser = parse_size_arg)]
    audit_max_bytes: u64,
    /// How many rotated audit files to keep.
    #[arg(long, default_value_t = 10)]
    audit_keep: usize,
    /// What a request caught carrying a credential (403 secret_in_request) costs its
    /// session: `refuse` the request, or also `revoke` the session (its token) at once.
    #[arg(long, value_enum, default_value_t = crate::tripwire::OnExfiltration::Refuse)]
    on_exfiltration: crate::tripwire::OnExfiltration,
    /// The longest a request waits for its credential to mint a token (an OAuth refresh, a
    /// GitHub App installation token) before it is answered 503 credential_unavailable; the
    /// minting itself goes on in the background.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    credential_wait: Duration,
    /// Largest request body accepted on routes that set no max_body (e.g. 1GiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size_arg)]
    max_body: u64,
    /// Most authenticated agent connections and tunnels open at once, all agents together
    /// [default: 4096, lowered to fit the file descriptor limit when none of the three
    /// connection caps is given].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most connections that have not authenticated yet (a pool of their own; when it is
    /// full the oldest is closed) [default: 1024, fitted like --max-connections].
    #[arg(long)]
    max_unauthenticated_connections: Option<usize>,
    /// How long a new connection has to authenticate (CONNECT or an absolute-form request
    /// with a valid token) before it is closed.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    first_request_timeout: Duration,
    /// Most tunnels and in-flight plain requests one agent may hold at once.
    #[arg(long, default_value_t = 512)]
    max_connections_per_agent: usize,
    /// Most requests one agent may have in flight at once, across all its tunnels and
    /// HTTP/2 streams (the excess is answered 429 too_many_requests_in_flight).
    #[arg(long, default_value_t = 256)]
    max_requests_in_flight_per_agent: usize,
    /// Most upstream connections open at once, idle pooled ones included [default: 4096,
    /// fitted like --max-connections].
    #[arg(long)]
    max_upstream_connections: Option<usize>,
    /// Address of the admin listener (/healthz, /metrics, the dashboard under /ui/); `off`
    /// disables it.
    #[arg(long, default_value = "127.0.0.1:8081", value_name = "ADDR|off")]
    admin_listen: String,
    /// How long the upstream may take to send its response head (a route's `timeout`
    /// overrides it). Minutes, not seconds: a non-streaming LLM completion sends nothing
    /// until it is done.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    upstream_timeout: Duration,
    /// Longest silence between body bytes, in either direction, before the exchange is ended
    /// (a route's `idle_timeout` overrides it): a stalled stream does not hold its slot
    /// forever. Not applied to WebSocket sessions, which may idle between messages.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    upstream_idle_timeout: Duration,
    /// Verify tokens with the public keys in this JWKS or PEM file instead of the state dir's
    /// own keys (replicas that must not issue tokens). Re-read when it changes.
    #[arg(long, value_name = "FILE")]
    verify_keys: Option<PathBuf>,
    /// Allow upstreams that resolve to loopback, private, link-local or other non-public
    /// addresses without a --resolve pin (off by default: SSRF guard).
    #[arg(long)]
    allow_private_upstreams: bool,
    /// Longest a request on an `approval = "request"` route is held for a person's decision
    /// (then 403 approval_timeout).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    approval_timeout: Duration,
    /// Most requests one agent may have held for approval at once (the excess: 429
    /// approval_queue_full).
    #[arg(long, default_value_t = 16)]
    approval_queue: usize,
    /// POST a JSON announcement of each pending approval to this URL (Slack-compatible
    /// `text` field; never a body, header, secret or token).
    #[arg(long, value_name = "URL")]
    approval_webhook: Option<String>,
    /// Also serve the dashboard (/ui/, nothing else) on this address.
    #[arg(long, value_name = "ADDR")]
    ui_listen: Option<SocketAddr>,
    /// Mark the dashboard's cookies Secure: set it when a TLS front proxy serves /ui/.
    #[arg(long)]
    ui_secure_cookie: bool,
    /// Threads that serve connections (default: the CPUs this process may run on). With 1,
    /// latchkey runs a single event loop without the work-stealing scheduler: the cheapest
    /// set-up per request for a proxy given one core (e.g. `taskset -c 1`).
    #[arg(long, env = "LATCHKEY_WORKER_THREADS", value_name = "N")]
    worker_threads: Option<std::num::NonZeroUsize>,
    #[command(flatten)]
    backend: BackendArgs,
}

/// Which secret backend holds credential values: the encrypted file store in the state dir,
/// or a KV v2 engine in OpenBao / HashiCorp Vault. Accepted by `serve`, `secret` and
/// `policy check`; the OpenBao token and AppRole secret_id come from the environment only.
#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// Where credential values live: `file` (encrypted store in the state dir) or `openbao`
    /// (OpenBao or HashiCorp Vault, KV v2).
    #[arg(long, global = true, env = "LATCHKEY_SECRET_BACKEND", value_enum, default_value_t = BackendKind::File)]
    secret_backend: BackendKind,
    /// OpenBao/Vault address, e.g. https://bao.internal:8200 (default: $BAO_ADDR, then $VAULT_ADDR).
    #[arg(long, global = true, env = "LATCHKEY_OPENBAO_ADDR", value_name = "URL")]
    openbao_addr: Option<String>,
    /// KV v2 mount of the credentials.
    #[arg(
        long,
        global = true,
        env = "LATCHKEY_OPENBAO_MOUNT",
        default_value = "secret"
    )]
    openbao_mount: String,
    /// Prefix of credential names inside the mount: NAME lives at <mount>/data/<prefix>NAME.
    #[arg(
        long,
        global = true,
        env = "LATCHKEY_OPENBAO_PREFIX",
        default_value = "latchkey/"
    )]
    openbao_prefix: String,
    /// AppRole role_id (with LATCHKEY_OPENBAO_SECRET_ID); otherwise $BAO_TOKEN or $VAULT_TOKEN.
    #[arg(
        long,
        global = true,
        env = "LATCHKEY_OPENBAO_ROLE_ID",
        value_name = "ROLE_ID"
    )]
    openbao_role_id: Option<String>,
    /// How long a value read from OpenBao is served from memory before it must be re-read.
    #[arg(long, global = true, env = "LATCHKEY_SECRET_CACHE_TTL", default_value = "30s", value_parser = parse_duration)]
    secret_cache_ttl: Duration,
}

/// The secret backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BackendKind {
    /// The encrypted store in the state dir.
    File,
    /// OpenBao or HashiCorp Vault (KV v2).
    Openbao,
}

/// Environment variable holding the AppRole secret_id (never a flag: argv is world-readable).
const OPENBAO_SECRET_ID_ENV: &str = "LATCHKEY_OPENBAO_SECRET_ID";
/// Bound on one HTTP exchange with OpenBao from the CLI and the background refresh.
const OPENBAO_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the one fetch a request may wait for when its credential is not cached fresh:
/// short, so an OpenBao outage turns into a quick 503 rather than a stalled agent.
const OPENBAO_REQUEST_FETCH_TIMEOUT: Duration = Duration::from_secs(2);

impl BackendArgs {
    /// The validated backend choice: flags plus the environment (tokens never come from argv).
    fn config(&self) -> Result<BackendConfig> {
        match self.secret_backend {
            BackendKind::File => Ok(BackendConfig::File),
            BackendKind::Openbao => {
                let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
                let addr = self
                    .openbao_addr
                    .clone()
                    .or_else(|| env("BAO_ADDR"))
                    .or_else(|| env("VAULT_ADDR"))
                    .ok_or_else(|| {
                        anyhow!("--secret-backend openbao needs --openbao-addr (or LATCHKEY_OPENBAO_ADDR, BAO_ADDR, VAULT_ADDR)")
                    })?;
                let auth = match &self.openbao_role_id {
                    Some(role_id) => {
                        let secret_id = env(OPENBAO_SECRET_ID_ENV).ok_or_else(|| {
                            anyhow!("--openbao-role-id needs the AppRole secret_id in {OPENBAO_SECRET_ID_ENV}")
                        })?;
                        OpenBaoAuth::AppRole {
                            role_id: role_id.clone(),
                            secret_id: Secret::new(secret_id.into_bytes()),
                        }
                    }
                    None => {
                        let token = env("BAO_TOKEN").or_else(|| env("VAULT_TOKEN")).ok_or_else(|| {
                            anyhow!("--secret-backend openbao needs a token in BAO_TOKEN or VAULT_TOKEN, or AppRole credentials (--openbao-role-id and {OPENBAO_SECRET_ID_ENV})")
                        })?;
                        OpenBaoAuth::Token(Secret::new(token.into_bytes()))
                    }
                };
                Ok(BackendConfig::OpenBao {
                    config: OpenBaoConfig {
                        addr,
                        mount: self.openbao_mount.clone(),
                        prefix: self.openbao_prefix.clone(),
                        auth,
                        timeout: OPENBAO_TIMEOUT,
                    },
                    cache_ttl: self.secret_cache_ttl,
                    request_fetch_timeout: OPENBAO_REQUEST_FETCH_TIMEOUT,
                })
            }
        }
    }

    /// Open the configured backend (see [`BackendConfig::open`]).
    fn open(&self, dirs: &Dirs) -> Result<Secrets> {
        Ok(self.config()?.open(&dirs.state_dir)?)
    }
}

/// `latchkey secret ...`: the backend flags, then what to do.
#[derive(Debug, Args)]
struct SecretArgs {
    #[command(flatten)]
    backend: BackendArgs,
    #[command(subcommand)]
    cmd: SecretCmd,
}

#[derive(Debug, Subcommand)]
enum SecretCmd {
    /// Store a secret; the value is read from standard input (one trailing newline dropped).
    /// With `--kind` other than `static`, standard input is the credential's TOML document
    /// (`kind = "..."`, its settings, and its secret values under `[secret]`), checked before
    /// it is stored.
    Set {
        /// Secret name, as routes refer to it.
        name: String,
        /// The credential's kind: `static` (a single value) or a typed kind.
        #[arg(long, default_value = "static")]
        kind: String,
    },
    /// List secret names and dates (never values).
    List,
    /// Remove a secret.
    Rm {
        /// Secret name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Issue a token for an agent; prints the JWT alone on stdout.
    Issue(IssueArgs),
    /// List live sessions (id, agent, on behalf of, task, expiry); never the token itself.
    List {
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
    },
    /// Revoke one session (by its id, the token's jti) or every token of an agent.
    Revoke {
        /// Session id (jti) to revoke.
        #[arg(conflicts_with = "agent")]
        jti: Option<String>,
        /// Revoke every token of this agent issued until now.
        #[arg(long)]
        agent: Option<String>,
    },
}

#[derive(Debug, Args)]
struct IssueArgs {
    /// Agent name (must have a policy file).
    #[arg(long)]
    agent: String,
    /// Lifetime (default 15m, or the policy's max_ttl if that is shorter; more than max_ttl is refused).
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// The user on whose behalf the agent acts.
    #[arg(long)]
    on_behalf_of: Option<String>,
    /// What the agent is doing (shown in the audit log).
    #[arg(long)]
    task: Option<String>,
    /// Narrow the token to these route ids (repeatable).
    #[arg(long = "route", value_name = "ID")]
    routes: Vec<String>,
    /// When a route needs an approved session (approval = "session"): how long to wait for
    /// a person's decision before giving up.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    wait: Duration,
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// Validate every policy file; errors name file, line and field.
    Check {
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Show whether a request would be allowed and by which route.
    Explain {
        /// Agent name.
        #[arg(long)]
        agent: String,
        /// HTTP method, e.g. GET.
        method: String,
        /// Full URL, e.g. https://api.github.com/repos/acme/backend/issues.
        url: String,
    },
}

#[derive(Debug, Subcommand)]
enum LogsCmd {
    /// Print audit lines, one readable line per request.
    Tail {
        /// Keep following the log.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Only allow or deny. `deny` leaves out the 407 challenges of clients that send
        /// credentials only when asked (outcome `challenged`) unless --challenges is given.
        #[arg(long, value_parser = ["allow", "deny"])]
        decision: Option<String>,
        /// With --decision deny, show the 407 challenges too.
        #[arg(long)]
        challenges: bool,
        /// Only lines newer than this, e.g. 10m.
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// Print raw JSON lines.
        #[arg(long)]
        json: bool,
        /// Audit log file (default: <state-dir>/audit.jsonl).
        #[arg(long, value_name = "FILE")]
        audit_log: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Verify the hash chain; reports the first edited, dropped, inserted or reordered line.
    Verify {
        /// Audit log file (default: <state-dir>/audit.jsonl).
        #[arg(long, value_name = "FILE")]
        audit_log: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCmd {
    /// Make a new signing key; tokens signed with the previous keys stay valid until they expire.
    Rotate {
        /// How many public keys to keep accepting (the new one included).
        #[arg(long, default_value_t = crate::keys::DEFAULT_KEEP)]
        keep: usize,
    },
    /// Print the accepted public keys as JWKS (give this file to replicas: `serve --verify-keys`).
    Show,
}

#[derive(Debug, Subcommand)]
enum CaCmd {
    /// Create certs/ca.crt and certs/ca.key if they do not exist.
    Init,
    /// Print the CA certificate (PEM) and its fingerprint.
    Show,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    crate::policy::parse::parse_size(s)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration: {e}"))?;
    if d.is_zero() {
        return Err("the duration must be positive".into());
    }
    Ok(d)
}

impl Cli {
    /// How many threads the async runtime should have: `serve --worker-threads`, else the
    /// CPUs this process may run on. Every other command gets the default (it serves nothing).
    pub fn worker_threads(&self) -> Option<usize> {
        match &self.command {
            Command::Serve(args) => Some(args.threads()),
            _ => None,
        }
    }
}

impl ServeArgs {
    /// `--worker-threads`, else the CPUs this process may run on.
    fn threads(&self) -> usize {
        self.worker_threads
            .map_or_else(app::available_threads, std::num::NonZeroUsize::get)
    }
}

/// Run the parsed command line.
pub async fn run(cli: Cli) -> Result<ExitCode> {
    let dirs = cli.dirs;
    let state = cli.state;
    match cli.command {
        Command::Serve(args) => serve(&dirs, &state, *args).await,
        Command::Secret(args) => secret(&dirs, args).await,
        Command::Token(TokenCmd::Issue(args)) => token_issue(&dirs, &state, args).await,
        Command::Token(TokenCmd::Revoke { jti, agent }) => {
            token_revoke(&dirs, &state, jti, agent).await
        }
        Command::Token(TokenCmd::List { agent }) => {
            token_list(&dirs, &state, agent.as_deref()).await
        }
        Command::Policy(PolicyCmd::Check { backend }) => policy_check(&dirs, &backend).await,
        Command::Policy(PolicyCmd::Explain { agent, method, url }) => {
            policy_explain(&dirs, &agent, &method, &url)
        }
        Command::Logs(LogsCmd::Tail {
            follow,
            agent,
            decision,
            challenges,
            since,
            json,
            audit_log,
        }) => {
            let path = audit_log.unwrap_or_else(|| dirs.state_dir.join("audit.jsonl"));
            let filter = audit::TailFilter {
                agent,
                decision: decision.map(|d| {
                    if d == "allow" {
                        audit::Decision::Allow
                    } else {
                        audit::Decision::Deny
                    }
                }),
                since: since.map(|d| {
                    chrono::Utc::now() - chrono::Duration::from_std(d).unwrap_or_default()
                }),
                challenges,
            };
            let colour = std::io::stdout().is_terminal();
            let mut out = std::io::stdout();
            let report = audit::tail(
                &path,
                &filter,
                json,
                colour,
                follow,
                &mut out,
                shutdown_signal(),
            )
            .await
            .with_context(|| format!("cannot read {}", path.display()))?;
            if report.skipped > 0 {
                eprintln!(
                    "latchkey: skipped {} line(s) that are not audit records",
                    report.skipped
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(AuditCmd::Verify { audit_log }) => {
            let path = audit_log.unwrap_or_else(|| dirs.state_dir.join("audit.jsonl"));
            match audit::verify(&path) {
                Ok(report) => {
                    println!(
                        "OK: {} lines, chain intact ({})",
                        report.lines,
                        path.display()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!(
                        "latchkey: audit log {} failed verification: {e}",
                        path.display()
                    );
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Run(args) => run_agent(&dirs, &state, args).await,
        Command::Connect(args) => connect(&dirs, *args).await,
        Command::Connections(ConnectionsCmd::List { json, backend }) => {
            connections_list(&dirs, &backend, json).await
        }
        Command::ContainInner(args) => Ok(run::contain::inner(run::contain::InnerArgs {
            socket: args.socket,
            ready: args.ready,
            ip: args.ip,
            command: args.command,
        })
        .await?),
        Command::Approvals(cmd) => approvals(&dirs, &state, cmd).await,
        Command::Admin(AdminCmd::Token { rotate }) => {
            let token = crate::ui::admin_token(&dirs.state_dir, rotate)?;
            println!("{}", token.as_str());
            eprintln!(
                "admin token in {} (0600); sign in to the dashboard at http://ADMIN-ADDR/ui/ with it",
                dirs.state_dir.join(crate::ui::ADMIN_TOKEN_FILE).display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(KeysCmd::Rotate { keep }) => {
            let kid = crate::keys::rotate(&dirs.state_dir, keep)?;
            eprintln!(
                "new signing key {kid}; tokens signed with the previous keys stay valid until they expire"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(KeysCmd::Show) => {
            crate::keys::load_or_create_signing(&dirs.state_dir)?;
            let jwks = crate::keys::read_jwks(&dirs.state_dir)?.unwrap_or_default();
            println!("{}", serde_json::to_string_pretty(&jwks)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCmd::Init) => {
            let (ca, created) = CertificateAuthority::load_or_create(&dirs.certs)?;
            let crt = dirs.certs.join("ca.crt");
            if created {
                println!(
                    "created {} (fingerprint {})",
                    crt.display(),
                    ca.fingerprint()
                );
            } else {
                println!(
                    "{} already exists (fingerprint {})",
                    crt.display(),
                    ca.fingerprint()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCmd::Show) => {
            let ca = CertificateAuthority::load(&dirs.certs)?;
            print!("{}", ca.cert_pem());
            eprintln!("SHA-256 fingerprint: {}", ca.fingerprint());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// The config `latchkey ARGS...` would serve with, when ARGS is a `serve` command line (the
/// program name first). Tests start their in-process proxies through this, so the flags they
/// pass go through exactly the parsing and validation `serve` uses.
pub fn serve_config_from_args<I, T>(args: I) -> Result<ServeConfig>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::try_parse_from(args)?;
    match cli.command {
        Command::Serve(args) => serve_config(&cli.dirs, &cli.state, *args),
        _ => bail!("not a `serve` command line"),
    }
}

async fn serve(dirs: &Dirs, state: &StateArgs, args: ServeArgs) -> Result<ExitCode> {
    let running = app::run(serve_config(dirs, state, args)?).await?;
    if let Some(ca) = &running.created_ca {
        eprintln!(
            "latchkey: created a new CA at {} (give this file to agents)",
            ca.display()
        );
    }
    // With `--audit-log -`, standard output carries only audit lines.
    let announce = |line: String| {
        if running.audit_to_stdout {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    announce(format!("latchkey listening on {}", running.addr));
    if let Some(a) = running.admin_addr {
        announce(format!("latchkey admin on {a}"));
    }
    if let Some(a) = running.tls_addr {
        announce(format!("latchkey TLS listening on {a}"));
    }
    if let Some(a) = running.ui_addr {
        announce(format!("latchkey dashboard on http://{a}/ui/"));
    }
    let _ = std::io::stdout().flush();

    shutdown_signal().await;
    tracing::info!("shutting down: finishing in-flight requests");
    let stopped = running.shutdown().await?;
    tracing::info!(lines = stopped.audit_lines, "audit log flushed");
    Ok(ExitCode::SUCCESS)
}

/// Turn `serve`'s flags (and the global ones) into a validated config.
fn serve_config(dirs: &Dirs, state: &StateArgs, args: ServeArgs) -> Result<ServeConfig> {
    let admin_listen = if args.admin_listen.eq_ignore_ascii_case("off") {
        None
    } else {
        Some(args.admin_listen.parse::<SocketAddr>().with_context(|| {
            format!(
                "--admin-listen {:?} is not an address (or `off`)",
                args.admin_listen
            )
        })?)
    };
    let mut cfg = ServeConfig::new(
        dirs.policies.clone(),
        dirs.certs.clone(),
        dirs.state_dir.clone(),
    );
    cfg.worker_threads = args.threads();
    cfg.listen = args.listen;
    cfg.listen_tls = args.listen_tls;
    cfg.tls_names = args.tls_names;
    cfg.admin_listen = admin_listen;
    cfg.upstream_ca = args.upstream_ca;
    cfg.resolve = args.resolve;
    cfg.audit_log = args.audit_log;
    cfg.audit_rotation = audit::Rotation {
        max_bytes: args.audit_max_bytes,
        keep: args.audit_keep,
    };
    if let Some(id) = args.replica_id {
        cfg.replica_id = id;
    }
    let defaults = Limits::default();
    cfg.limits = Limits {
        upstream_timeout: args.upstream_timeout,
        upstream_idle_timeout: args.upstream_idle_timeout,
        max_body: args.max_body,
        max_connections: args.max_connections.unwrap_or(defaults.max_connections),
        max_unauthenticated_connections: args
            .max_unauthenticated_connections
            .unwrap_or(defaults.max_unauthenticated_connections),
        first_request_timeout: args.first_request_timeout,
        max_connections_per_agent: args.max_connections_per_agent,
        max_requests_in_flight_per_agent: args.max_requests_in_flight_per_agent,
        max_upstream_connections: args
            .max_upstream_connections
            .unwrap_or(defaults.max_upstream_connections),
        // Caps the operator did not choose may shrink to the fd limit; chosen ones may not.
        fit_fd_caps: args.max_connections.is_none()
            && args.max_unauthenticated_connections.is_none()
            && args.max_upstream_connections.is_none(),
        ..defaults
    };
    cfg.verify_keys = args.verify_keys;
    cfg.on_exfiltration = args.on_exfiltration;
    cfg.credential_wait = args.credential_wait;
    cfg.approval = app::ApprovalConfig {
        timeout: args.approval_timeout,
        queue: args.approval_queue,
        webhook: args.approval_webhook,
    };
    cfg.ui_listen = args.ui_listen;
    cfg.ui_secure_cookie = args.ui_secure_cookie;
    cfg.allow_private_upstreams = args.allow_private_upstreams;
    cfg.secrets = args.backend.config()?;
    cfg.redis = state.redis.clone().map(|url| RedisConfig {
        url,
        grace: state.redis_grace,
    });
    Ok(cfg)
}

async fn connect(dirs: &Dirs, args: ConnectArgs) -> Result<ExitCode> {
    let store = args.backend.open(dirs)?;
    let client_secret = if args.client_secret_stdin {
        let mut line = zeroize::Zeroizing::new(String::new());
        std::io::stdin()
            .read_line(&mut line)
            .context("cannot read the client secret from standard input")?;
        let trimmed = line.trim_end_matches(['\r', '\n']);
        if trimmed.is_empty() {
            bail!("--client-secret-stdin read an empty line");
        }
        Some(Secret::new(trimmed.as_bytes().to_vec()))
    } else if let Some(name) = &args.client_secret_from {
        let value = store
            .get(name)
            .await
            .map_err(|e| anyhow!("cannot read secret {name}: {e}"))?
            .ok_or_else(|| anyhow!("--client-secret-from {name}: no such secret"))?;
        Some(Secret::new(value.expose().to_vec()))
    } else {
        None
    };
    let req = crate::connect::ConnectRequest {
        name: args.name.clone(),
        user: args.user.clone(),
        provider: args.provider,
        authorize_url: args.authorize_url,
        token_url: args.token_url,
        device_url: args.device_url,
        scopes: args.scopes.map(|s| {
            s.split([' ', ','])
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        }),
        client_id: args.client_id,
        client_secret,
        device: args.device,
        redirect_port: args.redirect_port,
        open_browser: !args.no_browser,
        timeout: args.timeout,
        extra_roots: args.upstream_ca,
    };
    let mut say = std::io::stderr();
    let done = crate::connect::connect(req, &store, &mut say)
        .await
        .with_context(|| format!("cannot connect {}", args.name))?;
    println!(
        "connected {}{} (stored as {}); scopes: {}; access token expires: {}",
        args.name,
        args.user
            .as_deref()
            .map(|u| format!(" for user {u}"))
            .unwrap_or_default(),
        done.secret_name,
        if done.scopes.is_empty() {
            "-".to_owned()
        } else {
            done.scopes.join(" ")
        },
        done.expires_at.as_deref().unwrap_or("never"),
    );
    if !done.refreshable && done.expires_at.is_some() {
        eprintln!("warning: the provider issued no refresh token; the connection stops working when the access token expires");
    }
    Ok(ExitCode::SUCCESS)
}

async fn connections_list(dirs: &Dirs, backend: &BackendArgs, json: bool) -> Result<ExitCode> {
    let store = backend.open(dirs)?;
    let rows = crate::connect::list(&store).await?;
    if json {
        for row in &rows {
            println!("{}", serde_json::to_string(row)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        eprintln!("no connections stored in {}", store.describe());
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<10} {:<12} {:<24} {:<26} HEALTH",
        "NAME", "PROVIDER", "USER", "SCOPES", "EXPIRES"
    );
    for r in rows {
        println!(
            "{:<20} {:<10} {:<12} {:<24} {:<26} {}",
            r.name,
            r.provider,
            r.user.as_deref().unwrap_or("-"),
            if r.scopes.is_empty() {
                "-".to_owned()
            } else {
                r.scopes.join(" ")
            },
            r.expires_at.as_deref().unwrap_or("-"),
            r.health
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn secret(dirs: &Dirs, args: SecretArgs) -> Result<ExitCode> {
    let store = args.backend.open(dirs)?;
    match args.cmd {
        SecretCmd::Set { name, kind } => {
            crate::secrets::validate_name(&name)?;
            let mut buf = zeroize::Zeroizing::new(Vec::new());
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("cannot read the secret from standard input")?;
            if buf.last() == Some(&b'\n') {
                buf.pop();
                if buf.last() == Some(&b'\r') {
                    buf.pop();
                }
            }
            if buf.is_empty() {
                bail!("the secret read from standard input is empty; pipe the value in, e.g. `printf %s \"$TOKEN\" | latchkey secret set {name}`");
            }
            let value = if kind == "static" {
                if buf.starts_with(crate::secrets::typed::TYPED_MAGIC.as_bytes()) {
                    bail!("the value starts like a typed credential document; store it with `--kind KIND` (the kind its `kind` key names)");
                }
                Secret::new(std::mem::take(&mut *buf))
            } else {
                let text = std::str::from_utf8(&buf)
                    .map_err(|_| anyhow!("a {kind} credential document must be UTF-8 TOML"))?;
                crate::credential::check_document(&name, &kind, text)
                    .with_context(|| format!("cannot store credential {name}"))?
            };
            store.set(&name, value).await?;
            if kind == "static" {
                eprintln!("stored secret {name}");
            } else {
                eprintln!("stored {kind} credential {name}");
            }
        }
        SecretCmd::List => {
            let list = store.list().await?;
            if list.is_empty() {
                eprintln!("no secrets stored in {}", store.describe());
            }
            for m in list {
                println!(
                    "{}\tcreated {}\tupdated {}",
                    m.name,
                    m.created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    m.updated.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                );
            }
        }
        SecretCmd::Rm { name } => {
            if !store.remove(&name).await? {
                bail!("no secret named {name}");
            }
            eprintln!("removed secret {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn token_issue(dirs: &Dirs, state: &StateArgs, args: IssueArgs) -> Result<ExitCode> {
    let (token, claims) = issue_token(dirs, state, args, DEFAULT_TTL).await?;
    println!("{}", token.as_str());
    eprintln!(
        "session {} for agent {} expires {}",
        claims.jti,
        claims.sub,
        chrono::DateTime::from_timestamp(claims.exp as i64, 0)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);
const DEFAULT_RUN_TTL: Duration = Duration::from_secs(60 * 60);

/// Check the request against the agent's policy (agent exists, routes exist, TTL within
/// max_ttl), sign, and record the session. With `--redis`, Redis must answer first: a token
/// issued while replicas cannot be told about its revocation would outlive the grace period.
async fn issue_token(
    dirs: &Dirs,
    state: &StateArgs,
    args: IssueArgs,
    default_ttl: Duration,
) -> Result<(zeroize::Zeroizing<String>, auth::Claims)> {
    if let Some(st) = state.open()? {
        st.ping().await.context(
            "the shared state (--redis) is unreachable; refusing to issue a token that could \
             not be revoked on every replica",
        )?;
    }
    let policies = app::load_policies(&dirs.policies)?;
    let policy = policies.get(&args.agent).ok_or_else(|| {
        anyhow!(
            "no policy for agent {:?} in {}; write one before issuing tokens",
            args.agent,
            dirs.policies.display()
        )
    })?;
    for id in &args.routes {
        if policy.route(id).is_none() {
            bail!("agent {} has no route {id:?}", args.agent);
        }
    }
    let ttl = match (args.ttl, policy.max_ttl()) {
        (Some(ttl), Some(max)) if ttl > max => bail!(
            "--ttl {} exceeds the policy's max_ttl of {} for agent {}",
            humantime::format_duration(ttl),
            humantime::format_duration(max),
            args.agent
        ),
        (Some(ttl), _) => ttl,
        (None, Some(max)) => default_ttl.min(max),
        (None, None) => default_ttl,
    };
    // A route that needs an approved session: the token exists only after a person says so.
    let asked: Vec<&Arc<crate::policy::Route>> = if args.routes.is_empty() {
        policy.routes().iter().collect()
    } else {
        args.routes
            .iter()
            .filter_map(|id| policy.route(id))
            .collect()
    };
    let (routes, ttl) = if asked
        .iter()
        .any(|r| r.approval() == crate::policy::Approval::Session)
    {
        let offered = asked.iter().map(|r| r.id().to_owned()).collect();
        wait_for_grant(dirs, state, &args, ttl, offered).await?
    } else {
        (args.routes.clone(), ttl)
    };
    let keys = TokenKeys::load_or_create(&dirs.state_dir)?;
    let (token, claims) = keys.issue(&TokenSpec {
        agent: args.agent,
        ttl,
        on_behalf_of: args.on_behalf_of,
        task: args.task,
        routes,
    })?;
    record_session(&dirs.state_dir, &claims)?;
    Ok((zeroize::Zeroizing::new(token), claims))
}

/// How often a waiting `token issue` / `run` looks for the decision on its grant.
const GRANT_POLL: Duration = Duration::from_millis(200);

/// Ask for a session grant, say so on stderr, and wait (up to `--wait`) for a person's
/// decision. Returns the routes and lifetime approved (a person may narrow both).
async fn wait_for_grant(
    dirs: &Dirs,
    state: &StateArgs,
    args: &IssueArgs,
    ttl: Duration,
    offered: Vec<String>,
) -> Result<(Vec<String>, Duration)> {
    use crate::approval::{store, GrantAsk, Kind, Pending, Store};
    let store = Store::new(&dirs.state_dir, state.open()?.map(Arc::new));
    let now = auth::unix_now();
    let id = store::new_id(Kind::Session);
    let pending = Pending {
        id: id.clone(),
        kind: Kind::Session,
        agent: args.agent.clone(),
        on_behalf_of: args.on_behalf_of.clone(),
        task: args.task.clone(),
        created: now,
        expires: now + args.wait.as_secs().max(1),
        replica: None,
        request: None,
        grant: Some(GrantAsk {
            routes: args.routes.clone(),
            ttl_secs: ttl.as_secs(),
            offered: offered.clone(),
        }),
    };
    store
        .put_pending(&pending)
        .await
        .context("cannot record the session grant for approval")?;
    eprintln!(
        "approval {id}: waiting for approval of a session for agent {} ({}; up to {}): latchkey approvals approve {id}",
        args.agent,
        crate::approval::approved_text(&pending, None),
        humantime::format_duration(args.wait)
    );
    let decision = loop {
        if let Some(d) = store.decision(&id).await? {
            break d;
        }
        if auth::unix_now() >= pending.expires {
            let t = crate::approval::Decision {
                id: id.clone(),
                approve: false,
                approver: "timeout".into(),
                reason: None,
                at: auth::unix_now(),
                routes: None,
                ttl_secs: None,
                for_secs: None,
                timed_out: true,
            };
            break store.decide(&t).await?.unwrap_or(t);
        }
        tokio::time::sleep(GRANT_POLL).await;
    };
    if decision.timed_out {
        bail!(
            "nobody approved session grant {id} within {}; no token was issued",
            humantime::format_duration(args.wait)
        );
    }
    if !decision.approve {
        bail!(
            "session grant {id} was denied by {}{}; no token was issued",
            decision.approver,
            decision
                .reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    }
    let routes = decision.routes.unwrap_or_else(|| args.routes.clone());
    // SECURITY: whatever the store says, the token names only routes that were offered.
    if let Some(extra) = routes.iter().find(|r| !offered.contains(r)) {
        bail!("session grant {id} was approved for route {extra:?}, which was not asked for; no token was issued");
    }
    let ttl = decision.ttl_secs.map_or(ttl, Duration::from_secs).min(ttl);
    eprintln!("approval {id}: approved by {}", decision.approver);
    Ok((routes, ttl))
}

/// `latchkey approvals ...`.
async fn approvals(dirs: &Dirs, state: &StateArgs, cmd: ApprovalsCmd) -> Result<ExitCode> {
    use crate::approval::{self, Narrowing, Store};
    let store = Store::new(&dirs.state_dir, state.open()?.map(Arc::new));
    let me = || {
        std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "cli".to_owned())
    };
    match cmd {
        ApprovalsCmd::List { json } => {
            let list = store.list().await?;
            let now = auth::unix_now();
            if json {
                let v: Vec<serde_json::Value> = list
                    .iter()
                    .map(|(p, d)| serde_json::json!({"pending": p, "decision": d}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            let mut waiting = 0;
            for (p, d) in &list {
                let what = match &p.request {
                    Some(r) => format!(
                        "{} {}{}{} body {}B sha256 {}",
                        r.method,
                        r.host,
                        r.path,
                        r.query
                            .as_deref()
                            .map(|q| format!("?{q}"))
                            .unwrap_or_default(),
                        r.body_bytes,
                        &r.body_sha256[..16.min(r.body_sha256.len())]
                    ),
                    None => approval::approved_text(p, None),
                };
                let state = match d {
                    Some(d) if d.timed_out => "timed out".to_owned(),
                    Some(d) if d.approve => format!("approved by {}", d.approver),
                    Some(d) => format!("denied by {}", d.approver),
                    None if p.expires <= now => "expired".to_owned(),
                    None => {
                        waiting += 1;
                        format!("WAITING ({} s left)", p.expires - now)
                    }
                };
                println!(
                    "{}  {:<7} {} (for {}, task {}): {what}  [{state}]",
                    p.id,
                    p.kind.as_str(),
                    p.agent,
                    p.on_behalf_of.as_deref().unwrap_or("-"),
                    p.task.as_deref().unwrap_or("-"),
                );
            }
            eprintln!("{waiting} waiting for a decision");
            Ok(ExitCode::SUCCESS)
        }
        ApprovalsCmd::Approve {
            id,
            routes,
            ttl,
            for_duration,
            approver,
        } => {
            let narrowing = Narrowing {
                routes,
                ttl,
                for_duration,
            };
            let who = approver.unwrap_or_else(me);
            let d = approval::decide(&store, &id, true, &who, None, &narrowing).await?;
            eprintln!("approved {} as {}", d.id, d.approver);
            Ok(ExitCode::SUCCESS)
        }
        ApprovalsCmd::Deny {
            id,
            reason,
            approver,
        } => {
            let who = approver.unwrap_or_else(me);
            let d = approval::decide(
                &store,
                &id,
                false,
                &who,
                reason.as_deref(),
                &Narrowing::default(),
            )
            .await?;
            eprintln!("denied {} as {}", d.id, d.approver);
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn run_agent(dirs: &Dirs, state: &StateArgs, args: RunArgs) -> Result<ExitCode> {
    let proxy = match args.proxy {
        Some(p) => p
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned(),
        None => {
            let file = dirs.state_dir.join("proxy.addr");
            std::fs::read_to_string(&file)
                .map(|s| s.trim().to_owned())
                .map_err(|_| {
                    anyhow!(
                        "no running latchkey found ({} is missing); start `latchkey serve` or pass --proxy HOST:PORT",
                        file.display()
                    )
                })?
        }
    };
    let ca = CertificateAuthority::load_or_create(&dirs.certs)?.0;
    let (token, claims) = issue_token(dirs, state, args.token, DEFAULT_RUN_TTL).await?;
    let bundle_path = dirs.state_dir.join(format!("ca-bundle-{}.pem", claims.jti));
    let bundle = run::ca_bundle(ca.cert_pem());
    fsutil::write_atomic(&bundle_path, bundle.as_bytes(), 0o644)?;
    let no_proxy = run::NoProxy::merge(
        ["NO_PROXY", "no_proxy"]
            .iter()
            .filter_map(|v| std::env::var(v).ok())
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str),
    );
    if let Some(note) = no_proxy.note(args.contain) {
        eprintln!("{note}");
    }
    let env = run::AgentEnv::new(&bundle_path, &no_proxy, &claims.jti);
    let auth = zeroize::Zeroizing::new(format!("{}:{}", claims.sub, token.as_str()));
    let status = if args.contain {
        run::contain::run_contained(&args.command, &env, &proxy, &auth, &claims.jti).await
    } else {
        let proxy_url = zeroize::Zeroizing::new(format!("http://{}@{proxy}", auth.as_str()));
        run::run_plain(&args.command, &env, &proxy_url).await
    };
    // The task is over: its token dies with it, whatever happened.
    let revoked = revoke_everywhere(
        dirs,
        state,
        auth::Revoked::Session {
            jti: claims.jti.clone(),
            exp: claims.exp,
        },
    )
    .await;
    let _ = std::fs::remove_file(&bundle_path);
    revoked.context("cannot revoke the session token after the command exited")?;
    Ok(run::exit_code(status?))
}

/// Sessions issued here (never the token itself), so that `token revoke JTI` knows how long
/// to keep the revocation.
fn record_session(state_dir: &Path, claims: &auth::Claims) -> Result<()> {
    auth::sessions::record(state_dir, claims).with_context(|| {
        format!(
            "cannot record the session in {}",
            auth::sessions::path(state_dir).display()
        )
    })
}

/// Sessions recorded at issue time that have neither expired nor been revoked.
async fn token_list(dirs: &Dirs, state: &StateArgs, agent: Option<&str>) -> Result<ExitCode> {
    let revs = Revocations::open(&dirs.state_dir)?;
    if let Some(st) = state.open()? {
        let stored = auth::load_revocations(&st)
            .await
            .context("cannot read revocations from the shared state (--redis)")?;
        revs.learn(stored);
    }
    let sessions = auth::sessions::live(&dirs.state_dir, &revs).with_context(|| {
        format!(
            "cannot read {}",
            auth::sessions::path(&dirs.state_dir).display()
        )
    })?;
    let mut live = 0;
    println!("SESSION                           AGENT            ON-BEHALF-OF     EXPIRES               TASK");
    for claims in sessions {
        if agent.is_some_and(|a| a != claims.agent) {
            continue;
        }
        live += 1;
        println!(
            "{:<33} {:<16} {:<16} {:<21} {}",
            claims.jti,
            claims.agent,
            claims.obo.as_deref().unwrap_or("-"),
            chrono::DateTime::from_timestamp(claims.exp as i64, 0)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default(),
            claims.task.as_deref().unwrap_or("-")
        );
    }
    eprintln!("{live} live session(s)");
    Ok(ExitCode::SUCCESS)
}

fn session_exp(state_dir: &Path, jti: &str) -> Option<u64> {
    auth::sessions::read(state_dir)
        .ok()?
        .into_iter()
        .find(|l| l.jti == jti)
        .map(|l| l.exp)
}

/// Revoke in the state dir, then, with `--redis`, in Redis and on every replica. The local
/// write comes first so a Redis failure still leaves this host's proxies enforcing it, and
/// the error says the other replicas were not told.
async fn revoke_everywhere(dirs: &Dirs, state: &StateArgs, what: auth::Revoked) -> Result<()> {
    let revs = Revocations::open(&dirs.state_dir)?;
    let what = match what {
        auth::Revoked::Session { jti, exp } => {
            revs.revoke_session(&jti, exp)?;
            auth::Revoked::Session { jti, exp }
        }
        auth::Revoked::Agent { agent, .. } => {
            let cutoff = revs.revoke_agent(&agent)?;
            auth::Revoked::Agent { agent, cutoff }
        }
    };
    if let Some(st) = state.open()? {
        auth::publish_revocation(&st, &what).await.context(
            "revoked in the local state dir only: the shared state (--redis) is unreachable, \
             so other replicas were NOT told; run the revoke again once Redis is back",
        )?;
    }
    Ok(())
}

async fn token_revoke(
    dirs: &Dirs,
    state: &StateArgs,
    jti: Option<String>,
    agent: Option<String>,
) -> Result<ExitCode> {
    match (jti, agent) {
        (Some(jti), _) => {
            let exp = match session_exp(&dirs.state_dir, &jti) {
                Some(exp) => exp,
                None => {
                    eprintln!("note: session {jti} was not issued here; revoking it for a year");
                    auth::unix_now() + 366 * 24 * 3600
                }
            };
            revoke_everywhere(
                dirs,
                state,
                auth::Revoked::Session {
                    jti: jti.clone(),
                    exp,
                },
            )
            .await?;
            eprintln!("revoked session {jti}");
        }
        (None, Some(agent)) => {
            revoke_everywhere(
                dirs,
                state,
                auth::Revoked::Agent {
                    agent: agent.clone(),
                    cutoff: 0,
                },
            )
            .await?;
            eprintln!("revoked every token of agent {agent} issued until now");
        }
        (None, None) => bail!(
            "say what to revoke: a session id (`latchkey token revoke JTI`, see `latchkey token list`) or every token of an agent (`latchkey token revoke --agent NAME`)"
        ),
    }
    Ok(ExitCode::SUCCESS)
}

async fn policy_check(dirs: &Dirs, backend: &BackendArgs) -> Result<ExitCode> {
    let report = Policies::load_dir(&dirs.policies)
        .with_context(|| format!("cannot read policies from {}", dirs.policies.display()))?;
    let mut diagnostics = report.diagnostics.clone();
    // A missing credential is a warning: it may be stored after the policy is written. The
    // backend is asked once per referenced name, before the (synchronous) check.
    if let Ok(store) = backend.open(dirs) {
        let mut present = std::collections::HashSet::new();
        let mut unreachable = None;
        // The referenced names, gathered through the same walk that reports them.
        let names = std::cell::RefCell::new(std::collections::BTreeSet::new());
        let _ = report.policies.missing_credentials(&|name| {
            names.borrow_mut().insert(name.to_owned());
            true
        });
        for name in names.into_inner() {
            match store.contains(&name).await {
                Ok(true) => {
                    present.insert(name);
                }
                Ok(false) => {}
                Err(e) => {
                    unreachable = Some(e);
                    break;
                }
            }
        }
        match unreachable {
            Some(e) => eprintln!(
                "warning: cannot check which credentials exist in {}: {e}",
                store.describe()
            ),
            None => {
                diagnostics.extend(
                    report
                        .policies
                        .missing_credentials(&|name| present.contains(name)),
                );
                // Each stored credential is built by its kind, which says whether each route
                // that names it can use it.
                let mut built = std::collections::HashMap::new();
                for name in &present {
                    let outcome = match store.get(name).await {
                        Ok(Some(secret)) => {
                            crate::credential::build(name, &secret, &crate::credential::kinds())
                                .map_err(|e| e.to_string())
                        }
                        Ok(None) => continue,
                        Err(e) => Err(format!("cannot be read: {e}")),
                    };
                    built.insert(name.clone(), outcome);
                }
                diagnostics.extend(report.policies.credential_diagnostics(&|name, route| {
                    match built.get(name)? {
                        Err(why) => Some((
                            Severity::Error,
                            format!("credential {name:?} cannot be used: {why}"),
                        )),
                        Ok(credential) => credential.fits(route).err().map(|why| {
                            (
                                Severity::Error,
                                format!(
                                    "credential {name:?} ({}) does not fit route {}: {why}",
                                    credential.kind(),
                                    route.id()
                                ),
                            )
                        }),
                    }
                }));
            }
        }
    }
    let errors = diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    for d in &diagnostics {
        if d.severity == Severity::Error {
            eprintln!("error: {d}");
        } else {
            eprintln!("{d}");
        }
    }
    let agents = report.policies.agents().count();
    if errors > 0 {
        eprintln!("{errors} error(s); {agents} valid agent policy file(s)");
        return Ok(ExitCode::from(1));
    }
    println!(
        "OK: {agents} agent policy file(s) valid in {}",
        dirs.policies.display()
    );
    // Not an error (proxy mode uses them), but gateway mode cannot: say so before an agent
    // finds out with a 403.
    for policy in report.policies.agents() {
        for route in policy.routes() {
            if route.gateway_authority().is_none() {
                println!(
                    "note: {}: route {} (host {}) has a wildcard host: proxy mode only, it \
                     cannot be a gateway target (/gw/{}/...)",
                    policy.file().display(),
                    route.id(),
                    route.host(),
                    route.id()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn policy_explain(dirs: &Dirs, agent: &str, method: &str, url: &str) -> Result<ExitCode> {
    let policies = app::load_policies(&dirs.policies)?;
    let explained =
        crate::policy::explain(&policies, agent, method, url).map_err(|e| anyhow!(e))?;
    println!("{}", explained.text);
    Ok(if explained.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
