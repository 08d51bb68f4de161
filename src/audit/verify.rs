//! Offline check of an audit log's hash chain (`latchkey audit verify`).
//!
//! Detects an edited line (its hash no longer matches its content) and a dropped, inserted
//! or reordered line (its `prev_hash` no longer names the line before it). It cannot detect
//! whole lines cut from the end; compare `last_hash` with a copy kept elsewhere for that.
//!
//! A rotated log is checked as one chain, oldest file first: `path.N` ... `path.1`, `path`.
//! Retention deletes the oldest files, so the oldest file left may start mid-chain; its first
//! `prev_hash` is then taken on trust as the anchor and the report says so
//! (`anchored_at_genesis == false`). Lines cut from the start of that file, like whole
//! files deleted from the old end, cannot be detected; compare `anchor_hash` with a hash
//! kept elsewhere for that.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::chain::{check_line, GENESIS_HASH};
use super::event::AuditEvent;
use super::rotate::rotated_segments;

/// A log whose chain is intact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Lines checked, across all files.
    pub lines: u64,
    /// `hash` of the last line (the anchor, e.g. the genesis hash, for an empty log).
    pub last_hash: String,
    /// Files checked: the rotated ones present plus the active one (if present).
    pub files: usize,
    /// Whether the oldest file starts at the genesis hash. `false` when older rotated files
    /// were deleted (retention): the chain is then intact from `anchor_hash` on.
    pub anchored_at_genesis: bool,
    /// `prev_hash` of the oldest line checked (the genesis hash when anchored at genesis).
    pub anchor_hash: String,
}

/// The first problem found; every variant names the file and, for a line, its 1-based
/// number within that file.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The line is not a JSON object (or is cut short, e.g. a torn last write).
    #[error("{}: line {line} is not valid JSON: {detail}", .file.display())]
    NotJson {
        /// The file holding the line.
        file: PathBuf,
        /// 1-based line number within `file`.
        line: u64,
        /// The parser's message.
        detail: String,
    },
    /// The line is JSON but lacks a field or has one of the wrong type.
    #[error("{}: line {line} is not an audit record: {detail}", .file.display())]
    BadRecord {
        /// The file holding the line.
        file: PathBuf,
        /// 1-based line number within `file`.
        line: u64,
        /// Which field is missing or wrong.
        detail: String,
    },
    /// The line's content does not hash to its `hash`: it was edited.
    #[error("{}: line {line} was edited: its content does not match its hash", .file.display())]
    Edited {
        /// The file holding the line.
        file: PathBuf,
        /// 1-based line number within `file`.
        line: u64,
    },
    /// The line's `prev_hash` is not the previous line's `hash`: a line was dropped,
    /// inserted or reordered just before it.
    #[error(
        "{}: line {line} does not follow line {previous}: a line was dropped, inserted or reordered",
        .file.display()
    )]
    BrokenChain {
        /// The file holding the line.
        file: PathBuf,
        /// 1-based line number within `file`.
        line: u64,
        /// The line before it in the same file (0 = start of the log).
        previous: u64,
    },
    /// A file does not continue the chain where the previous (older) file ended: a rotated
    /// file, or lines at the end of `previous_file` or the start of `file`, are missing.
    #[error(
        "{} does not continue the chain of {}: a rotated file or lines between them are missing",
        .file.display(),
        .previous_file.display()
    )]
    Gap {
        /// The newer file, whose first line does not follow.
        file: PathBuf,
        /// The older file it should continue.
        previous_file: PathBuf,
    },
    /// The log could not be read.
    #[error("cannot read audit log {}", .path.display())]
    Io {
        /// The log file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Check every line of the log at `path` and of its rotated files (`path.N` ... `path.1`,
/// then `path`) as one chain; stop at the first problem.
///
/// Without rotated files this is the check of a lone file: its first line must follow the
/// genesis hash, and a missing file is an error. With rotated files, a missing active file
/// (a crash right after rotation) counts as empty.
pub fn verify(path: &Path) -> Result<VerifyReport, VerifyError> {
    let mut segments: Vec<PathBuf> = rotated_segments(path)
        .map_err(|source| VerifyError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .into_iter()
        .rev()
        .map(|(_, p)| p)
        .collect();
    let rotated = !segments.is_empty();
    segments.push(path.to_path_buf());

    let mut state = Walk {
        lines: 0,
        expected_prev: None,
        anchor: None,
        previous_file: None,
        files: 0,
    };
    // Without rotated files the active file must start at genesis, exactly as before rotation existed.
    if !rotated {
        state.expected_prev = Some(GENESIS_HASH.to_owned());
        state.anchor = Some(GENESIS_HASH.to_owned());
    }
    for file in &segments {
        let opened = match File::open(file) {
            Ok(f) => f,
            Err(e) if rotated && e.kind() == io::ErrorKind::NotFound => {
                // Active file not re-created yet after a rotation, or a rotated file deleted
                // by retention while we listed: neither leaves a hole in the chain by itself.
                continue;
            }
            Err(source) => {
                return Err(VerifyError::Io {
                    path: file.clone(),
                    source,
                })
            }
        };
        state.files += 1;
        state.check_file(opened, file)?;
    }
    let anchor = state.anchor.unwrap_or_else(|| GENESIS_HASH.to_owned());
    Ok(VerifyReport {
        lines: state.lines,
        last_hash: state.expected_prev.unwrap_or_else(|| anchor.clone()),
        files: state.files,
        anchored_at_genesis: anchor == GENESIS_HASH,
        anchor_hash: anchor,
    })
}

/// Where the check stands between files.
struct Walk {
    lines: u64,
    /// `hash` of the last line checked; `None` before the first line of a rotated log.
    expected_prev: Option<String>,
    /// `prev_hash` of the first line checked.
    anchor: Option<String>,
    /// The last file that held a line.
    previous_file: Option<PathBuf>,
    files: usize,
}

impl Walk {
    fn check_file(&mut self, file: File, path: &Path) -> Result<(), VerifyError> {
        let mut reader = BufReader::new(file);
        let mut line_no: u64 = 0;
        let mut raw = Vec::new();
        loop {
            raw.clear();
            let n = reader
                .read_until(b'\n', &mut raw)
                .map_err(|source| VerifyError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            line_no += 1;
            let line = line_no;
            let file = || path.to_path_buf();
            let text = raw.strip_suffix(b"\n").unwrap_or(&raw);
            let object: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(text).map_err(|e| VerifyError::NotJson {
                    file: file(),
                    line,
                    detail: e.to_string(),
                })?;
            let check = check_line(&object).map_err(|d| VerifyError::BadRecord {
                file: file(),
                line,
                detail: d.to_owned(),
            })?;
            AuditEvent::deserialize_fields(&object).map_err(|detail| VerifyError::BadRecord {
                file: file(),
                line,
                detail,
            })?;
            if check.recomputed != check.hash {
                return Err(VerifyError::Edited { file: file(), line });
            }
            match &self.expected_prev {
                // The oldest line present: its `prev_hash` is the anchor, taken on trust.
                None => self.anchor = Some(check.prev_hash.clone()),
                Some(expected) if *expected == check.prev_hash => {}
                Some(_) => {
                    return Err(match (&self.previous_file, line) {
                        (Some(previous_file), 1) => VerifyError::Gap {
                            file: file(),
                            previous_file: previous_file.clone(),
                        },
                        _ => VerifyError::BrokenChain {
                            file: file(),
                            line,
                            previous: line - 1,
                        },
                    })
                }
            }
            self.expected_prev = Some(check.hash);
            self.lines += 1;
        }
        if line_no > 0 {
            self.previous_file = Some(path.to_path_buf());
        }
        Ok(())
    }
}

impl AuditEvent {
    /// Check that a parsed line carries every event field with the right type.
    fn deserialize_fields(
        object: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<AuditEvent, String> {
        serde::Deserialize::deserialize(object).map_err(|e: serde_json::Error| e.to_string())
    }
}
