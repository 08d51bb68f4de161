//! `latchkey run --contain` (Linux): the command runs in a network namespace of its own whose
//! only way out is latchkey, so a client that ignores the proxy variables fails at once
//! (connection refused, network unreachable) instead of reaching the network around the
//! audit log.
//!
//! Two processes, no unsafe code:
//!
//! ```text
//! outer `latchkey run`                         inside the namespace
//!   serves <tmp>/latchkey-contain-<jti>/         `unshare --net [--user --map-root-user]`
//!   proxy.sock (0600, dir 0700)  <── unix ──     execs `latchkey __contain`, which brings `lo`
//!   and relays each connection                   up, listens on 127.0.0.1:<port>, relays each
//!   to latchkey's real listener                  connection to proxy.sock, and runs the command
//!                                                with HTTPS_PROXY=http://agent:TOKEN@127.0.0.1:<port>
//! ```
//!
//! A pathname Unix socket is the one channel: filesystem sockets cross network namespaces,
//! while abstract ones and every TCP/UDP address do not. The namespace is entered with
//! util-linux `unshare` (as root: `--net`; otherwise an unprivileged user namespace mapping
//! the caller to root in it, `--user --map-root-user --net`), so this crate never calls
//! unshare(2) itself. If the namespace cannot be made, the run fails with the reason: there
//! is no silent fallback to an uncontained run.
//!
//! What this does not contain (the filesystem, other Unix sockets, other processes of the
//! user) is in SECURITY.md.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use super::{apply_proxy, exit_code, AgentEnv, RunError, SignalForwarder};

/// Name of the hidden subcommand that runs inside the namespace.
pub const INNER_SUBCOMMAND: &str = "__contain";

/// Environment variable carrying `agent:TOKEN` from the outer to the inner process (never
/// argv, which every local user can read). The inner process removes it from the command's
/// environment.
pub const PROXY_AUTH_ENV: &str = "LATCHKEY_CONTAIN_PROXY_AUTH";

/// Pause after a failed accept (e.g. EMFILE), so a relay out of descriptors does not spin.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);

/// Where `ip` lives when it is not on PATH (non-root PATHs often lack the sbin directories).
const IP_FALLBACKS: &[&str] = &["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"];

/// Why `--contain` could not run the command in a namespace.
#[derive(Debug, thiserror::Error)]
pub enum ContainError {
    /// util-linux `unshare` is not on PATH.
    #[error("--contain needs util-linux `unshare` on PATH (Debian/Ubuntu: apt install util-linux); the command was not run")]
    UnshareMissing,
    /// iproute2 `ip` is neither on PATH nor in the sbin directories.
    #[error("--contain needs iproute2 `ip` to bring up the namespace's loopback (Debian/Ubuntu: apt install iproute2); the command was not run")]
    IpMissing,
    /// The private directory or the Unix socket could not be made.
    #[error("--contain cannot set up its relay socket in {}", path.display())]
    Socket {
        /// The directory or socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `unshare` (or the setup inside the namespace) failed before the command started.
    #[error("--contain could not create or set up the network namespace ({mode}; {status}), so the command was not run; {hint}")]
    Namespace {
        /// `unshare --net` or `unshare --user --map-root-user --net`.
        mode: &'static str,
        /// How unshare / the inner setup ended.
        status: ExitStatus,
        /// What to try.
        hint: &'static str,
    },
    /// Bringing `lo` up inside the namespace failed.
    #[error("cannot bring up the loopback interface in the namespace (`ip link set lo up`): {0}")]
    Loopback(String),
    /// The in-namespace listener could not be bound.
    #[error("cannot listen on 127.0.0.1 inside the namespace")]
    Listen(#[source] std::io::Error),
    /// The inner process was started without the proxy credentials (not started by `run`).
    #[error(
        "{INNER_SUBCOMMAND} is internal to `latchkey run --contain` and needs {PROXY_AUTH_ENV}"
    )]
    NotFromRun,
    /// The ready marker could not be written.
    #[error("cannot write {}", path.display())]
    Ready {
        /// The marker path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The part of a contained run that lives in the caller's namespace: the private directory
/// with the relay socket, and the relay task. Dropping it stops the relay and removes both.
struct Relay {
    dir: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Create `<tmp>/latchkey-contain-<session>/` (0700, must not exist) with `proxy.sock`
    /// (0600) in it, and relay each connection on it to `proxy` (latchkey's listener).
    fn start(session: &str, proxy: String) -> Result<Relay, ContainError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("latchkey-contain-{session}"));
        let socket_err = |path: &Path| {
            let path = path.to_owned();
            move |source| ContainError::Socket { path, source }
        };
        // SECURITY: create (never reuse) the directory, owner-only: another local user cannot
        // have planted it, reach the socket inside it, or swap it for a symlink.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(socket_err(&dir))?;
        let socket = dir.join("proxy.sock");
        let bound = (|| {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(socket_err(&dir))?;
            let listener = UnixListener::bind(&socket).map_err(socket_err(&socket))?;
            std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
                .map_err(socket_err(&socket))?;
            Ok(listener)
        })();
        let listener = match bound {
            Ok(listener) => listener,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let task = tokio::spawn(async move {
            loop {
                let Ok((inside, _)) = listener.accept().await else {
                    // Out of descriptors or a transient error: back off rather than spin.
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                };
                let proxy = proxy.clone();
                tokio::spawn(async move {
                    match TcpStream::connect(&proxy).await {
                        Ok(outside) => splice(inside, outside).await,
                        Err(e) => tracing::warn!(
                            error = %e,
                            "--contain: cannot reach latchkey at {proxy}; the command's connection is closed"
                        ),
                    }
                });
            }
        });
        Ok(Relay { dir, task })
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("proxy.sock")
    }

    fn ready_marker(&self) -> PathBuf {
        self.dir.join("ready")
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Copy both ways until either side closes.
async fn splice<A, B>(mut a: A, mut b: B)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
}

/// The first executable `name` on PATH, then in `fallbacks`.
fn find_program(name: &str, fallbacks: &[&str]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .chain(fallbacks.iter().map(PathBuf::from))
        .find(|p| executable(p))
}

/// Run `command` contained: start the relay, enter a new network namespace through
/// `unshare`, and wait for the command (signals passed on). `proxy` is latchkey's address,
/// `proxy_auth` is `agent:TOKEN`.
pub async fn run_contained(
    command: &[OsString],
    env: &AgentEnv,
    proxy: &str,
    proxy_auth: &str,
    session: &str,
) -> Result<ExitStatus, RunError> {
    let unshare = find_program("unshare", &[]).ok_or(ContainError::UnshareMissing)?;
    let ip = find_program("ip", IP_FALLBACKS).ok_or(ContainError::IpMissing)?;
    let me = std::env::current_exe().map_err(|source| RunError::Spawn {
        program: "latchkey (its own binary, for the namespace side)".into(),
        source,
    })?;
    let wait_err = |source| RunError::Wait {
        program: unshare.display().to_string(),
        source,
    };
    // Before anything else exists, so a signal from here on is passed on, never fatal.
    let signals = SignalForwarder::install().map_err(wait_err)?;
    let relay = Relay::start(session, proxy.to_owned())?;
    let as_root = nix::unistd::geteuid().is_root();
    let (mode, hint) = if as_root {
        (
            "unshare --net",
            "if the message above is unshare's `Operation not permitted`, this container or sandbox does not grant the CAP_SYS_ADMIN a network namespace needs",
        )
    } else {
        (
            "unshare --user --map-root-user --net",
            "if the message above is unshare's `Operation not permitted`, unprivileged user namespaces are disabled (sysctl kernel.unprivileged_userns_clone, user.max_user_namespaces, or AppArmor's kernel.apparmor_restrict_unprivileged_userns): run as root or enable them",
        )
    };
    let mut cmd = tokio::process::Command::new(&unshare);
    if !as_root {
        cmd.args(["--user", "--map-root-user"]);
    }
    cmd.arg("--net")
        .arg("--")
        .arg(&me)
        .arg(INNER_SUBCOMMAND)
        .arg("--socket")
        .arg(relay.socket())
        .arg("--ready")
        .arg(relay.ready_marker())
        .arg("--ip")
        .arg(&ip)
        .arg("--")
        .args(command);
    env.apply(&mut cmd);
    // Whatever the caller had is not the way out any more; the inner process sets these.
    for var in super::PROXY_VARS {
        cmd.env_remove(var);
    }
    cmd.env(PROXY_AUTH_ENV, proxy_auth);
    let child = cmd.spawn().map_err(|source| RunError::Spawn {
        program: unshare.display().to_string(),
        source,
    })?;
    let status = signals.wait(child).await.map_err(wait_err)?;
    // The inner process writes the marker once the namespace is set up, right before it
    // starts the command: without it, an exit code is unshare's or the setup's, not the
    // command's. Killed by a signal (one passed on while it was starting) is not a setup
    // failure: it is reported as such, like the command's own death by signal.
    if !relay.ready_marker().exists() && status.signal().is_none() {
        return Err(ContainError::Namespace { mode, status, hint }.into());
    }
    drop(relay);
    Ok(status)
}

/// The arguments of the hidden inner subcommand.
#[derive(Debug)]
pub struct InnerArgs {
    /// The outer process's relay socket.
    pub socket: PathBuf,
    /// The marker to create once set up.
    pub ready: PathBuf,
    /// iproute2 `ip`.
    pub ip: PathBuf,
    /// The command and its arguments.
    pub command: Vec<OsString>,
}

/// Inside the namespace: bring `lo` up, listen on 127.0.0.1:0, relay to the outer socket,
/// run the command with the proxy variables pointing at that listener, and exit as it did.
pub async fn inner(args: InnerArgs) -> Result<ExitCode, RunError> {
    let program = args.command[0].to_string_lossy().into_owned();
    // First, so a signal the outer side passes on from now on is handled, not fatal.
    let signals = SignalForwarder::install().map_err(|source| RunError::Wait {
        program: program.clone(),
        source,
    })?;
    let auth = std::env::var(PROXY_AUTH_ENV).map_err(|_| ContainError::NotFromRun)?;
    let zeroized_auth = zeroize::Zeroizing::new(auth);
    let out = std::process::Command::new(&args.ip)
        .args(["link", "set", "lo", "up"])
        .output()
        .map_err(|e| ContainError::Loopback(format!("{}: {e}", args.ip.display())))?;
    if !out.status.success() {
        return Err(ContainError::Loopback(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
        .into());
    }
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(ContainError::Listen)?;
    let port = listener.local_addr().map_err(ContainError::Listen)?.port();
    let socket = args.socket.clone();
    let relay = tokio::spawn(async move {
        loop {
            let Ok((inside, _)) = listener.accept().await else {
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            };
            let socket = socket.clone();
            tokio::spawn(async move {
                if let Ok(outside) = UnixStream::connect(&socket).await {
                    splice(inside, outside).await;
                }
            });
        }
    });
    let proxy_url = zeroize::Zeroizing::new(format!(
        "http://{}@127.0.0.1:{port}",
        zeroized_auth.as_str()
    ));
    let mut cmd = tokio::process::Command::new(&args.command[0]);
    cmd.args(&args.command[1..]).env_remove(PROXY_AUTH_ENV);
    apply_proxy(&mut cmd, &proxy_url);
    std::fs::File::create_new(&args.ready).map_err(|source| ContainError::Ready {
        path: args.ready.clone(),
        source,
    })?;
    let child = cmd.spawn().map_err(|source| RunError::Spawn {
        program: program.clone(),
        source,
    })?;
    let status = signals
        .wait(child)
        .await
        .map_err(|source| RunError::Wait { program, source })?;
    relay.abort();
    Ok(exit_code(status))
}
