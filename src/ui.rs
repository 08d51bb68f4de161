//! The dashboard, served under `/ui/` by the admin listener.

use std::path::Path;

use crate::fsutil;

/// The admin token's file in the state dir (0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Why the admin token cannot be read or made.
#[derive(Debug, thiserror::Error)]
#[error("cannot use the admin token file {}", .path.display())]
pub struct AdminTokenError {
    path: std::path::PathBuf,
    #[source]
    source: std::io::Error,
}

/// The admin token: read from the state dir, created (0600) when missing or when `rotate`.
pub fn admin_token(
    state_dir: &Path,
    rotate: bool,
) -> Result<zeroize::Zeroizing<String>, AdminTokenError> {
    let path = state_dir.join(ADMIN_TOKEN_FILE);
    let err = |source| AdminTokenError {
        path: path.clone(),
        source,
    };
    if !rotate {
        if let Some(t) = read_admin_token(state_dir) {
            return Ok(t);
        }
    }
    fsutil::ensure_private_dir(state_dir).map_err(err)?;
    let bytes: [u8; 32] = rand::random();
    let token = zeroize::Zeroizing::new(format!("lka_{}", hex::encode(bytes)));
    fsutil::write_atomic(&path, format!("{}\n", token.as_str()).as_bytes(), 0o600).map_err(err)?;
    Ok(token)
}

/// The admin token if one was made (`latchkey admin token`).
pub fn read_admin_token(state_dir: &Path) -> Option<zeroize::Zeroizing<String>> {
    let text =
        zeroize::Zeroizing::new(std::fs::read_to_string(state_dir.join(ADMIN_TOKEN_FILE)).ok()?);
    let t = text.trim();
    (!t.is_empty()).then(|| zeroize::Zeroizing::new(t.to_owned()))
}
