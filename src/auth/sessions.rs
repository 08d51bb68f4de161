//! The sessions file, `sessions.jsonl` in the state dir: one line per token issued on this
//! host (its claims, never the token), appended at issue time, so that `token list`, the
//! dashboard's sessions page and `token revoke JTI` know which sessions exist and until when.
//!
//! This module owns the file's format; it decides nothing about a session beyond whether it
//! has expired or been revoked.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{unix_now, Claims, Revocations, AUDIENCE, ISSUER};

/// One line of the sessions file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SessionLine {
    /// The session id.
    pub jti: String,
    /// The agent.
    pub agent: String,
    /// The delegating user, if any.
    pub obo: Option<String>,
    /// The task, if any.
    pub task: Option<String>,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
    /// The routes the token is narrowed to, if it is.
    #[serde(default)]
    pub routes: Option<Vec<String>>,
}

impl SessionLine {
    /// The claims revocation checks look at (agent, session, issue time).
    fn claims(&self) -> Claims {
        Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: self.agent.clone(),
            jti: self.jti.clone(),
            iat: self.iat,
            exp: self.exp,
            nbf: None,
            obo: None,
            task: None,
            routes: None,
            kid: None,
        }
    }
}

/// Where the sessions file of `state_dir` is.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("sessions.jsonl")
}

/// Append the session of `claims` (created 0600).
pub fn record(state_dir: &Path, claims: &Claims) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path(state_dir))?;
    let line = SessionLine {
        jti: claims.jti.clone(),
        agent: claims.sub.clone(),
        obo: claims.obo.clone(),
        task: claims.task.clone(),
        iat: claims.iat,
        exp: claims.exp,
        routes: claims.routes.clone(),
    };
    let text = serde_json::to_string(&line).expect("strings and numbers serialise");
    writeln!(f, "{text}")
}

/// Every recorded session (lines that do not parse are skipped); none when there is no file.
pub fn read(state_dir: &Path) -> std::io::Result<Vec<SessionLine>> {
    let text = match std::fs::read_to_string(path(state_dir)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// The recorded sessions that have neither expired nor been revoked.
pub fn live(state_dir: &Path, revs: &Revocations) -> std::io::Result<Vec<SessionLine>> {
    let now = unix_now();
    Ok(read(state_dir)?
        .into_iter()
        .filter(|l| l.exp > now && !revs.is_revoked(&l.claims()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_session_reads_back_and_is_live_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let revs = Revocations::open(dir.path()).unwrap();
        assert!(live(dir.path(), &revs).unwrap().is_empty());
        let now = unix_now();
        let claims = |jti: &str, exp: u64| Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: "bot".into(),
            jti: jti.into(),
            iat: now,
            exp,
            nbf: None,
            obo: Some("alice".into()),
            task: None,
            routes: Some(vec!["r".into()]),
            kid: None,
        };
        record(dir.path(), &claims("live", now + 600)).unwrap();
        record(dir.path(), &claims("gone", now - 1)).unwrap();
        record(dir.path(), &claims("revoked", now + 600)).unwrap();
        revs.revoke_session("revoked", now + 600).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read(dir.path()).unwrap().len(), 3);
        let live = live(dir.path(), &revs).unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].jti, "live");
        assert_eq!(live[0].obo.as_deref(), Some("alice"));
        assert_eq!(live[0].routes.as_deref(), Some(&["r".to_owned()][..]));
    }
}
