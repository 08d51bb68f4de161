//! Offline check of an audit log's hash chain (`latchkey audit verify`).
//!
//! Detects an edited line (its hash no longer matches its content) and a dropped, inserted
//! or reordered line (its `prev_hash` no longer names the line before it). It cannot detect
//! whole lines cut from the end; compare `last_hash` with a copy kept elsewhere for that.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::chain::{check_line, GENESIS_HASH};
use super::event::AuditEvent;

/// A log whose chain is intact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Lines checked.
    pub lines: u64,
    /// `hash` of the last line (the genesis hash for an empty log).
    pub last_hash: String,
}

/// The first problem found; every variant names the 1-based line.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The line is not a JSON object (or is cut short, e.g. a torn last write).
    #[error("line {line} is not valid JSON: {detail}")]
    NotJson {
        /// 1-based line number.
        line: u64,
        /// The parser's message.
        detail: String,
    },
    /// The line is JSON but lacks a field or has one of the wrong type.
    #[error("line {line} is not an audit record: {detail}")]
    BadRecord {
        /// 1-based line number.
        line: u64,
        /// Which field is missing or wrong.
        detail: String,
    },
    /// The line's content does not hash to its `hash`: it was edited.
    #[error("line {line} was edited: its content does not match its hash")]
    Edited {
        /// 1-based line number.
        line: u64,
    },
    /// The line's `prev_hash` is not the previous line's `hash`: a line was dropped,
    /// inserted or reordered just before it.
    #[error(
        "line {line} does not follow line {previous}: a line was dropped, inserted or reordered"
    )]
    BrokenChain {
        /// 1-based line number.
        line: u64,
        /// The line before it (0 = start of the log).
        previous: u64,
    },
    /// The log could not be read.
    #[error("cannot read audit log {path}")]
    Io {
        /// The log file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Check every line of the log at `path`; stop at the first problem.
pub fn verify(path: &Path) -> Result<VerifyReport, VerifyError> {
    let io_err = |source| VerifyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io_err)?);
    let mut expected_prev = GENESIS_HASH.to_owned();
    let mut line_no: u64 = 0;
    let mut raw = Vec::new();
    loop {
        raw.clear();
        if reader.read_until(b'\n', &mut raw).map_err(io_err)? == 0 {
            break;
        }
        line_no += 1;
        let line = line_no;
        let text = raw.strip_suffix(b"\n").unwrap_or(&raw);
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(text)
            .map_err(|e| VerifyError::NotJson {
                line,
                detail: e.to_string(),
            })?;
        let check = check_line(&object).map_err(|d| VerifyError::BadRecord {
            line,
            detail: d.to_owned(),
        })?;
        AuditEvent::deserialize_fields(&object)
            .map_err(|detail| VerifyError::BadRecord { line, detail })?;
        if check.recomputed != check.hash {
            return Err(VerifyError::Edited { line });
        }
        if check.prev_hash != expected_prev {
            return Err(VerifyError::BrokenChain {
                line,
                previous: line - 1,
            });
        }
        expected_prev = check.hash;
    }
    Ok(VerifyReport {
        lines: line_no,
        last_hash: expected_prev,
    })
}

impl AuditEvent {
    /// Check that a parsed line carries every event field with the right type.
    fn deserialize_fields(
        object: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<AuditEvent, String> {
        serde::Deserialize::deserialize(object).map_err(|e: serde_json::Error| e.to_string())
    }
}
