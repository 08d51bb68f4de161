//! Size-based rotation: `audit.jsonl` -> `audit.jsonl.1` -> ... -> `audit.jsonl.{keep}`.
//!
//! The chain does not restart at a rotation: the first line of a fresh active file names the
//! last hash of the file rotated away, so `verify` checks the whole set as one chain. This
//! module only renames and deletes whole files; it never rewrites or splits a line.

use std::ffi::OsString;

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// When the writer rotates the log and how many rotated files it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate before a line would take the active file past this many bytes. A file holds
    /// at least one line, so a single line longer than this still gets a file of its own.
    pub max_bytes: u64,
    /// Rotated files kept (`path.1` newest ... `path.{keep}` oldest); older ones are deleted.
    /// At least 1 is always kept: rotation never simply truncates the log.
    pub keep: usize,
}

impl Default for Rotation {
    /// 64 MiB x 10 files: enough for days of busy traffic (a line is ~500 bytes), while one
    /// file stays small enough for `verify` and `tail` to read in seconds.
    fn default() -> Rotation {
        Rotation {
            max_bytes: 64 * 1024 * 1024,
            keep: 10,
        }
    }
}

/// `path` with `.{n}` appended: `audit.jsonl` -> `audit.jsonl.3`.
pub(crate) fn segment_path(path: &Path, n: u64) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// The rotated files of the log at `path` that exist now, newest first (`.1`, `.2`, ...).
///
/// Found by listing the directory rather than probing `.1`, `.2`, ... in turn, so a hole
/// left by an interrupted rotation does not hide the older files behind it.
pub(crate) fn rotated_segments(path: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let Some(base) = path.file_name() else {
        return Ok(Vec::new());
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if let Some(n) = segment_number(base.as_bytes(), name.as_bytes()) {
            found.push((n, segment_path(path, n)));
        }
    }
    found.sort_unstable_by_key(|(n, _)| *n);
    Ok(found)
}

/// `Some(n)` if `name` is `base.n` with `n` a positive decimal without leading zeros.
fn segment_number(base: &[u8], name: &[u8]) -> Option<u64> {
    let digits = name.strip_prefix(base)?.strip_prefix(b".")?;
    if digits.is_empty() || digits[0] == b'0' || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Make room for a new `path.1`: delete what would move past `keep`, then rename every
/// other rotated file one step older, oldest first so that no rename overwrites a file.
///
/// A crash at any point leaves the files in chain order (only possibly with a hole in the
/// numbering, which [`rotated_segments`] tolerates).
pub(crate) fn shift_segments(path: &Path, keep: usize) -> io::Result<()> {
    let keep = u64::try_from(keep.max(1)).unwrap_or(u64::MAX);
    let segments = rotated_segments(path)?;
    for (n, seg) in segments.iter().rev() {
        if *n >= keep {
            remove_if_present(seg)?;
        } else {
            std::fs::rename(seg, segment_path(path, n + 1))?;
        }
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// fsync the directory holding `path`, so that renames and the new file survive a crash.
pub(crate) fn sync_dir(path: &Path) -> io::Result<()> {
    crate::fsutil::sync_dir(crate::fsutil::parent_dir(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_numbers_are_positive_decimals_after_the_exact_name() {
        let base = b"audit.jsonl";
        assert_eq!(segment_number(base, b"audit.jsonl.1"), Some(1));
        assert_eq!(segment_number(base, b"audit.jsonl.12"), Some(12));
        for other in [
            &b"audit.jsonl"[..],
            b"audit.jsonl.",
            b"audit.jsonl.0",
            b"audit.jsonl.01",
            b"audit.jsonl.1x",
            b"audit.jsonl1",
            b"xaudit.jsonl.1",
            b"audit.jsonl.99999999999999999999999",
        ] {
            assert_eq!(segment_number(base, other), None, "{other:?}");
        }
    }

    #[test]
    fn segment_path_appends_the_number() {
        assert_eq!(
            segment_path(Path::new("/s/audit.jsonl"), 3),
            PathBuf::from("/s/audit.jsonl.3")
        );
    }

    #[test]
    fn shift_keeps_order_and_deletes_past_keep() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        for n in [1u64, 2, 4] {
            std::fs::write(segment_path(&path, n), format!("{n}")).unwrap();
        }
        shift_segments(&path, 4).unwrap();
        let got: Vec<(u64, String)> = rotated_segments(&path)
            .unwrap()
            .into_iter()
            .map(|(n, p)| (n, std::fs::read_to_string(p).unwrap()))
            .collect();
        assert_eq!(got, vec![(2, "1".into()), (3, "2".into())]);
    }
}
