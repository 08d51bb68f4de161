//! Reading the log for humans: `latchkey logs tail [-f] [--agent NAME] [--decision allow|deny] [--since 10m] [--json]`.
//!
//! Read-only: never writes the log and never checks the chain (that is `verify`).
//! Log fields come from agents (paths, hosts, names), so control characters are escaped
//! before they reach a terminal.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::future::Future;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::event::{AuditEvent, Decision};
use super::rotate::{rotated_segments, segment_path};
use super::sink::AuditError;

/// How often `-f` looks for new lines: fast enough to feel live, cheap enough to leave running.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Which events to show; `None` fields match everything.
#[derive(Debug, Clone, Default)]
pub struct TailFilter {
    /// Only events of this agent.
    pub agent: Option<String>,
    /// Only allowed or only denied events.
    pub decision: Option<Decision>,
    /// Only events at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// With `decision: deny`, also the 407 challenges (`outcome: challenged`) of clients
    /// that send credentials only when asked; without it they are left out, so that real
    /// refusals are not buried under one challenge per connection.
    pub challenges: bool,
}

impl TailFilter {
    /// Whether `e` passes every set criterion.
    pub fn matches(&self, e: &AuditEvent) -> bool {
        self.agent
            .as_deref()
            .is_none_or(|a| e.agent.as_deref() == Some(a))
            && self.decision.is_none_or(|d| e.decision == d)
            && self.since.is_none_or(|s| e.ts >= s)
            && (self.challenges
                || self.decision != Some(Decision::Deny)
                || e.outcome != Some(super::Outcome::Challenged))
    }
}

/// What `tail` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TailReport {
    /// Lines printed (after filtering).
    pub printed: u64,
    /// Lines that did not parse as audit events and were skipped.
    pub skipped: u64,
}

const GREEN: &str = "\x1b[32m";
const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const RESET: &str = "\x1b[0m";

/// One readable line: time, agent (obo), method host+path, status, route, credential, reason, latency.
/// colour = ANSI colours (green allow / red deny) when true.
pub fn format_line(e: &AuditEvent, colour: bool) -> String {
    if e.approval.kind.as_deref() == Some("approval") {
        return format_approval(e, colour);
    }
    let (word, paint) = match (e.decision, e.outcome) {
        (Decision::Allow, _) => ("ALLOW", GREEN),
        // A 407 asking for credentials is not a refusal: not painted like one.
        (Decision::Deny, Some(super::Outcome::Challenged)) => ("AUTH?", YELLOW),
        (Decision::Deny, _) => ("DENY ", RED),
    };
    let mut s = String::with_capacity(160);
    s.push_str(&e.ts_string());
    s.push(' ');
    if colour {
        s.push_str(paint);
        s.push_str(word);
        s.push_str(RESET);
    } else {
        s.push_str(word);
    }
    s.push(' ');
    s.push_str(&clean(e.agent.as_deref().unwrap_or("-")));
    if let Some(obo) = &e.on_behalf_of {
        let _ = write!(s, " (obo {})", clean(obo));
    }
    let _ = write!(
        s,
        " {} {}{} ",
        clean(&e.method),
        clean(&e.host),
        clean(&e.path),
    );
    match e.status {
        Some(status) => {
            let _ = write!(s, "{status}");
        }
        None => s.push('-'),
    }
    let _ = write!(
        s,
        " route={} cred={} reason={}",
        clean(e.route.as_deref().unwrap_or("-")),
        clean(e.credential.as_deref().unwrap_or("-")),
        clean(e.reason.as_deref().unwrap_or("-")),
    );
    // Lines written before these fields existed simply lack them.
    if let Some(outcome) = e.outcome {
        let _ = write!(s, " outcome={}", outcome.as_str());
    }
    if let (Some(up), Some(down)) = (e.bytes_up, e.bytes_down) {
        let _ = write!(s, " up={up}B down={down}B");
    }
    if let Some(id) = &e.approval.approval_id {
        let _ = write!(s, " approval={}", clean(id));
        if let Some(by) = &e.approval.approver {
            let _ = write!(s, " by={}", clean(by));
        }
    }
    let _ = write!(s, " {:.1}ms", e.duration_ms);
    s
}

/// A human decision's line: time, what happened, who asked, what for, who decided.
fn format_approval(e: &AuditEvent, colour: bool) -> String {
    let step = e.reason.as_deref().unwrap_or("-");
    let paint = match e.decision {
        Decision::Allow => GREEN,
        Decision::Deny if step == "approval_requested" => "",
        Decision::Deny => RED,
    };
    let mut s = String::with_capacity(160);
    s.push_str(&e.ts_string());
    s.push_str(" APPROVAL ");
    if colour && !paint.is_empty() {
        s.push_str(paint);
        s.push_str(&clean(step));
        s.push_str(RESET);
    } else {
        s.push_str(&clean(step));
    }
    let _ = write!(s, " {}", clean(e.agent.as_deref().unwrap_or("-")));
    if let Some(obo) = &e.on_behalf_of {
        let _ = write!(s, " (obo {})", clean(obo));
    }
    if e.method == "GRANT" {
        s.push_str(" session grant");
    } else {
        let _ = write!(
            s,
            " {} {}{}",
            clean(&e.method),
            clean(&e.host),
            clean(&e.path)
        );
    }
    let _ = write!(
        s,
        " id={} route={}",
        clean(e.approval.approval_id.as_deref().unwrap_or("-")),
        clean(e.route.as_deref().unwrap_or("-")),
    );
    if let Some(by) = &e.approval.approver {
        let _ = write!(s, " by={}", clean(by));
    }
    if let Some(what) = &e.approval.approved {
        let _ = write!(s, " what=\"{}\"", clean(what));
    }
    if let Some(sha) = &e.approval.body_sha256 {
        let _ = write!(s, " body_sha256={}", clean(&sha[..sha.len().min(16)]));
    }
    s
}

/// SECURITY: escape control and invisible characters so a crafted path or agent name cannot
/// send escape sequences to the operator's terminal, nor make the line read differently from
/// what it holds (bidi overrides reorder the text after them, zero-width characters hide).
fn clean(s: &str) -> Cow<'_, str> {
    if s.chars().any(hidden) {
        Cow::Owned(
            s.chars()
                .flat_map(|c| {
                    let escaped: Vec<char> = if hidden(c) {
                        c.escape_default().collect()
                    } else {
                        vec![c]
                    };
                    escaped
                })
                .collect(),
        )
    } else {
        Cow::Borrowed(s)
    }
}

/// A JSON line with the characters [`clean`] escapes written as `\uXXXX` escapes: the same
/// JSON value, safe to print. (A line that parsed holds them only inside strings.)
fn json_escaped(raw: &[u8]) -> Cow<'_, str> {
    let text = String::from_utf8_lossy(raw);
    if !text.chars().any(hidden) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if hidden(c) {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Control characters (C0, DEL, C1), format characters (Unicode category Cf: bidi embeddings,
/// overrides and isolates, zero-width characters, the BOM, invisible operators, tags) and the
/// line and paragraph separators.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{ad}'
                | '\u{600}'..='\u{605}'
                | '\u{61c}'
                | '\u{6dd}'
                | '\u{70f}'
                | '\u{890}'..='\u{891}'
                | '\u{8e2}'
                | '\u{180e}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206f}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
                | '\u{110bd}'
                | '\u{110cd}'
                | '\u{13430}'..='\u{1343f}'
                | '\u{1bca0}'..='\u{1bca3}'
                | '\u{1d173}'..='\u{1d17a}'
                | '\u{e0001}'
                | '\u{e0020}'..='\u{e007f}'
        )
}

/// Print matching existing lines of the log at `path` to `out` (raw JSON line if `json`,
/// else [`format_line`]): its rotated files oldest first (`path.N` ... `path.1`), then
/// `path` itself. If `follow`, keep following `path` like `tail -F` (new lines appended;
/// file rotated away, replaced or truncated -> reopen from the start) until `stop` resolves.
///
/// Lines that do not parse are counted in [`TailReport::skipped`], never a panic. Without
/// `follow`, a log with no file at all is an error; with it, `tail` waits for `path` to appear.
pub async fn tail(
    path: &Path,
    filter: &TailFilter,
    json: bool,
    colour: bool,
    follow: bool,
    out: &mut (dyn Write + Send),
    stop: impl Future<Output = ()>,
) -> Result<TailReport, AuditError> {
    let mut printer = Printer {
        filter,
        json,
        colour,
        out,
        report: TailReport::default(),
        pending: Vec::new(),
    };
    let read_err = |source| AuditError::Read {
        path: path.to_path_buf(),
        source,
    };
    // Open the active file before listing the rotated ones: if the writer rotates in
    // between, the active file shows up again as `path.1` (same inode) and is skipped
    // there, so no line is read twice or missed. Open files keep their content even if
    // renamed or deleted by a later rotation.
    let (mut current, missing) = match open(path).await {
        Ok(f) => (Some(f), None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => (None, Some(e)),
        Err(e) => return Err(read_err(e)),
    };
    let history = open_rotated(path, None, current.as_ref().map(|c| c.id)).await?;
    if let Some(e) = missing.filter(|_| !follow && history.is_empty()) {
        return Err(read_err(e));
    }
    for mut f in history {
        printer.drain(&mut f).await?;
        // A rotated file is complete: a last line without newline will not be finished.
        printer.finish()?;
    }
    if let Some(f) = current.as_mut() {
        printer.drain(f).await?;
    }
    if !follow {
        printer.finish()?;
        return Ok(printer.report);
    }
    tokio::pin!(stop);
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
        }
        if let Some(f) = current.as_mut() {
            // Finish what the current file holds, even if it was just replaced.
            printer.drain(f).await?;
            let size = f.file.metadata().await.map_err(read_err)?.len();
            if size < f.offset {
                // Truncated in place: start over from the top.
                f.file
                    .seek(io::SeekFrom::Start(0))
                    .await
                    .map_err(read_err)?;
                f.offset = 0;
                printer.pending.clear();
                printer.drain(f).await?;
            }
        }
        let replaced = match tokio::fs::metadata(path).await {
            Ok(meta) => current
                .as_ref()
                .is_none_or(|f| (meta.dev(), meta.ino()) != f.id),
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(read_err(e)),
        };
        if replaced {
            match open(path).await {
                Ok(mut f) => {
                    if let Some(old) = current.as_mut() {
                        // Our writer finishes (and fsyncs) the old file before renaming it
                        // away, so whatever it appended since the drain above is there now.
                        printer.drain(old).await?;
                        printer.pending.clear();
                        // Several rotations between two polls: the files in between.
                        for mut between in open_rotated(path, Some(old.id), Some(f.id)).await? {
                            printer.drain(&mut between).await?;
                            printer.finish()?;
                        }
                    }
                    printer.pending.clear();
                    printer.drain(&mut f).await?;
                    current = Some(f);
                }
                // Gone again between the two calls: try on the next tick.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(read_err(e)),
            }
        }
    }
    Ok(printer.report)
}

/// Open the rotated files of `path`, oldest first.
///
/// With `after`, only the files newer than the one with that identity, and none if it is
/// not among them (replaced by hand rather than rotated, or already deleted: then, like
/// `tail -F`, we go straight to the new file). The file with identity `active` was opened
/// as the active file before this listing and is skipped: a rotation since renamed it, and
/// it will be read as the active file. Open files keep their content even if a later
/// rotation renames or deletes them.
///
/// Why probe `.1`, `.2`, ... upwards rather than trust a directory listing: the writer may
/// rotate meanwhile, and a listing taken during renames can miss a name. Rotation only
/// moves files to higher numbers, the direction we probe in, so a probe can meet a file
/// twice (dropped by identity) but never jump over one.
async fn open_rotated(
    path: &Path,
    after: Option<(u64, u64)>,
    active: Option<(u64, u64)>,
) -> Result<Vec<Followed>, AuditError> {
    let listed_max = rotated_segments(path)
        .map_err(|source| AuditError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .last()
        .map_or(0, |(n, _)| *n);
    let mut newest_first: Vec<Followed> = Vec::new();
    let mut k = 1;
    loop {
        let seg = segment_path(path, k);
        match open(&seg).await {
            Ok(f) if Some(f.id) == after => {
                newest_first.reverse();
                return Ok(newest_first);
            }
            Ok(f) => {
                if Some(f.id) != active && newest_first.iter().all(|g| g.id != f.id) {
                    newest_first.push(f);
                }
            }
            // A hole (an interrupted rotation, or a rename in flight) below the highest
            // number listed; past it, the end.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if k > listed_max {
                    break;
                }
            }
            Err(source) => return Err(AuditError::Read { path: seg, source }),
        }
        k += 1;
    }
    if after.is_some() {
        return Ok(Vec::new());
    }
    newest_first.reverse();
    Ok(newest_first)
}

/// An open log file and how far it has been read.
struct Followed {
    path: PathBuf,
    file: tokio::fs::File,
    id: (u64, u64),
    offset: u64,
}

async fn open(path: &Path) -> io::Result<Followed> {
    let file = tokio::fs::File::open(path).await?;
    let meta = file.metadata().await?;
    Ok(Followed {
        path: path.to_path_buf(),
        file,
        id: (meta.dev(), meta.ino()),
        offset: 0,
    })
}

/// Turns bytes into printed lines, holding back a partial last line until its `\n` arrives.
struct Printer<'a> {
    filter: &'a TailFilter,
    json: bool,
    colour: bool,
    out: &'a mut (dyn Write + Send),
    report: TailReport,
    pending: Vec<u8>,
}

impl Printer<'_> {
    /// Read everything new in `f` and print the complete lines.
    async fn drain(&mut self, f: &mut Followed) -> Result<(), AuditError> {
        let n = f
            .file
            .read_to_end(&mut self.pending)
            .await
            .map_err(|source| AuditError::Read {
                path: f.path.clone(),
                source,
            })?;
        f.offset += n as u64;
        let Some(last_nl) = self.pending.iter().rposition(|&b| b == b'\n') else {
            return Ok(());
        };
        let complete: Vec<u8> = self.pending.drain(..=last_nl).collect();
        for line in complete.split(|&b| b == b'\n') {
            self.line(line).map_err(AuditError::Output)?;
        }
        self.out.flush().map_err(AuditError::Output)
    }

    /// Without `-f`, a last line with no newline is printed (or skipped) as it is.
    fn finish(&mut self) -> Result<(), AuditError> {
        let rest = std::mem::take(&mut self.pending);
        self.line(&rest).map_err(AuditError::Output)?;
        self.out.flush().map_err(AuditError::Output)
    }

    fn line(&mut self, raw: &[u8]) -> io::Result<()> {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let Ok(event) = serde_json::from_slice::<AuditEvent>(raw) else {
            self.report.skipped += 1;
            return Ok(());
        };
        if !self.filter.matches(&event) {
            return Ok(());
        }
        self.report.printed += 1;
        if self.json {
            self.out.write_all(json_escaped(raw).as_bytes())?;
        } else {
            self.out
                .write_all(format_line(&event, self.colour).as_bytes())?;
        }
        self.out.write_all(b"\n")
    }
}
