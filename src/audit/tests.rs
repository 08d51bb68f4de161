//! End-to-end tests of the audit log on real files: writer, chain, verify, tail.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{TimeZone, Utc};

use super::*;

fn event(i: u64) -> AuditEvent {
    AuditEvent {
        ts: Utc.with_ymd_and_hms(2026, 11, 22, 18, 0, 0).unwrap()
            + chrono::Duration::milliseconds(i as i64),
        request_id: format!("req-{i}"),
        agent: Some(
            if i.is_multiple_of(2) {
                "claude"
            } else {
                "codex"
            }
            .into(),
        ),
        on_behalf_of: Some("alice".into()),
        session: Some("jti-1".into()),
        task: None,
        route: Some("github".into()),
        credential: Some("gh_token".into()),
        credential_kind: Some("static".into()),
        credential_detail: None,
        decision: if i.is_multiple_of(3) {
            Decision::Deny
        } else {
            Decision::Allow
        },
        reason: if i.is_multiple_of(3) {
            Some("no_matching_rule".into())
        } else {
            None
        },
        replica: Some("replica-a".into()),
        method: "GET".into(),
        host: "api.github.com".into(),
        path: format!("/repos/{i}"),
        status: Some(if i.is_multiple_of(3) { 403 } else { 200 }),
        duration_ms: 1.0 / (i as f64 + 3.0),
        outcome: Some(if i.is_multiple_of(3) {
            Outcome::Denied
        } else {
            Outcome::Ok
        }),
        ttfb_ms: Some(0.5),
        bytes_up: Some(i),
        bytes_down: Some(2 * i),
        approval: Default::default(),
    }
}

fn log_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("state").join("audit.jsonl")
}

async fn write_events(path: &Path, range: std::ops::Range<u64>) -> u64 {
    let (sink, writer) = AuditSink::open(path).await.unwrap();
    for i in range {
        sink.record(event(i)).await;
    }
    writer.shutdown().await.unwrap()
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

/// A log of `n` lines for tamper tests.
async fn log_of(n: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    assert_eq!(write_events(&path, 0..n).await, n);
    (dir, path)
}

#[tokio::test]
async fn chain_of_1000_records_verifies() {
    let (_dir, path) = log_of(1000).await;
    let report = verify(&path).unwrap();
    assert_eq!(report.lines, 1000);
    let last: serde_json::Value = serde_json::from_str(read_lines(&path).last().unwrap()).unwrap();
    assert_eq!(last["hash"], report.last_hash.as_str());
    let first: serde_json::Value = serde_json::from_str(&read_lines(&path)[0]).unwrap();
    assert_eq!(first["prev_hash"], GENESIS_HASH);
    assert!(first["task"].is_null());
    assert_eq!(first["ts"], "2026-11-22T18:00:00.000Z");
}

#[tokio::test]
async fn reopening_continues_the_chain() {
    let (_dir, path) = log_of(10).await;
    let first_run = verify(&path).unwrap();
    assert_eq!(write_events(&path, 10..25).await, 15);
    let report = verify(&path).unwrap();
    assert_eq!(report.lines, 25);
    let line11: serde_json::Value = serde_json::from_str(&read_lines(&path)[10]).unwrap();
    assert_eq!(line11["prev_hash"], first_run.last_hash.as_str());
}

#[tokio::test]
async fn empty_existing_log_starts_at_genesis() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    std::fs::write(&path, "").unwrap();
    write_events(&path, 0..2).await;
    assert_eq!(verify(&path).unwrap().lines, 2);
}

#[tokio::test]
async fn verify_reports_the_edited_line() {
    let (_dir, path) = log_of(10).await;
    let mut lines = read_lines(&path);
    assert!(lines[4].contains("\"/repos/4\""));
    lines[4] = lines[4].replace("\"/repos/4\"", "\"/repos/evil\"");
    write_lines(&path, &lines);
    let err = verify(&path).unwrap_err();
    assert!(matches!(err, VerifyError::Edited { line: 5, .. }), "{err}");
    assert!(err.to_string().contains("line 5"));
}

#[tokio::test]
async fn verify_reports_a_dropped_line() {
    let (_dir, path) = log_of(10).await;
    let mut lines = read_lines(&path);
    lines.remove(4);
    write_lines(&path, &lines);
    let err = verify(&path).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::BrokenChain {
                line: 5,
                previous: 4,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn verify_reports_an_inserted_line() {
    let (_dir, path) = log_of(10).await;
    let mut lines = read_lines(&path);
    let copy = lines[2].clone();
    lines.insert(6, copy);
    write_lines(&path, &lines);
    let err = verify(&path).unwrap_err();
    assert!(
        matches!(err, VerifyError::BrokenChain { line: 7, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn verify_reports_swapped_lines() {
    let (_dir, path) = log_of(10).await;
    let mut lines = read_lines(&path);
    lines.swap(3, 4);
    write_lines(&path, &lines);
    let err = verify(&path).unwrap_err();
    assert!(
        matches!(err, VerifyError::BrokenChain { line: 4, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn verify_reports_a_truncated_last_line() {
    let (_dir, path) = log_of(10).await;
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 20]).unwrap();
    let err = verify(&path).unwrap_err();
    assert!(
        matches!(err, VerifyError::NotJson { line: 10, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn verify_reports_a_missing_field() {
    let (_dir, path) = log_of(3).await;
    let mut lines = read_lines(&path);
    let mut v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&lines[1]).unwrap();
    v.remove("method");
    lines[1] = serde_json::to_string(&v).unwrap();
    write_lines(&path, &lines);
    let err = verify(&path).unwrap_err();
    assert!(
        matches!(err, VerifyError::BadRecord { line: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("method"), "{err}");
}

#[tokio::test]
async fn open_refuses_to_restart_after_a_torn_last_line() {
    let (_dir, path) = log_of(5).await;
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let err = AuditSink::open(&path).await.unwrap_err();
    assert!(matches!(err, AuditError::CorruptTail { .. }), "{err}");
    std::fs::write(&path, "not json\n").unwrap();
    let err = AuditSink::open(&path).await.unwrap_err();
    assert!(matches!(err, AuditError::CorruptTail { .. }), "{err}");
}

#[tokio::test]
async fn resume_finds_a_last_line_longer_than_one_read_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (sink, writer) = AuditSink::open(&path).await.unwrap();
    let mut big = event(1);
    big.path = "/x".repeat(10_000);
    sink.record(event(0)).await;
    sink.record(big).await;
    writer.shutdown().await.unwrap();
    write_events(&path, 2..4).await;
    assert_eq!(verify(&path).unwrap().lines, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_never_drops_records_from_concurrent_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (sink, writer) = AuditSink::open_with_capacity(&path, 4).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let sink = sink.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..625u64 {
                sink.record(event(t * 625 + i)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(writer.shutdown().await.unwrap(), 10_000);
    assert_eq!(read_lines(&path).len(), 10_000);
    assert_eq!(verify(&path).unwrap().lines, 10_000);
    drop(sink);
}

#[tokio::test]
async fn shutdown_completes_while_clones_are_alive_and_later_records_do_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (sink, writer) = AuditSink::open(&path).await.unwrap();
    let clone = sink.clone();
    sink.record(event(0)).await;
    clone.record(event(1)).await;
    assert_eq!(writer.shutdown().await.unwrap(), 2);
    clone.record(event(2)).await; // refused and logged
    assert_eq!(verify(&path).unwrap().lines, 2);
}

#[tokio::test]
async fn log_is_created_0600_in_a_private_new_directory() {
    let (dir, path) = log_of(1).await;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let dir_mode = std::fs::metadata(dir.path().join("state"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o077, 0);
}

#[tokio::test]
async fn an_existing_world_readable_log_is_tightened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    std::fs::write(&path, "").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    write_events(&path, 0..1).await;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn open_refuses_something_that_is_not_a_regular_file() {
    let err = AuditSink::open(Path::new("/dev/null")).await.unwrap_err();
    assert!(matches!(err, AuditError::Open { .. }), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let err = AuditSink::open(dir.path()).await.unwrap_err();
    assert!(matches!(err, AuditError::Open { .. }), "{err}");
}

#[test]
fn format_line_shows_the_decision_without_ansi_when_colour_is_off() {
    let mut e = event(3);
    e.path = "/a\u{1b}[2Jb".into();
    let line = format_line(&e, false);
    for part in [
        "codex",
        "alice",
        "403",
        "github",
        "gh_token",
        "no_matching_rule",
        "outcome=denied",
        "DENY",
        "GET api.github.com/a",
    ] {
        assert!(line.contains(part), "{part} missing from {line}");
    }
    assert!(!line.contains('\u{1b}'), "{line:?}");
    let coloured = format_line(&e, true);
    assert!(coloured.contains("\u{1b}[31mDENY"), "{coloured:?}");
    assert!(format_line(&event(1), true).contains("\u{1b}[32mALLOW"));
}

#[test]
fn format_line_escapes_bidi_overrides_zero_width_and_other_invisible_characters() {
    let invisible = [
        '\u{202a}',
        '\u{202b}',
        '\u{202c}',
        '\u{202d}',
        '\u{202e}',
        '\u{2066}',
        '\u{2067}',
        '\u{2068}',
        '\u{2069}',
        '\u{200b}',
        '\u{200c}',
        '\u{200d}',
        '\u{200e}',
        '\u{200f}',
        '\u{2060}',
        '\u{feff}',
        '\u{ad}',
        '\u{2028}',
        '\u{e0041}',
        '\u{9b}',
        '\u{7f}',
    ];
    for c in invisible {
        let mut e = event(3);
        e.path = format!("/admin{c}gpj.exe");
        e.agent = Some(format!("bot{c}"));
        e.host = format!("api{c}.example");
        e.on_behalf_of = Some(format!("alice{c}"));
        let line = format_line(&e, false);
        assert!(
            !line.contains(c),
            "U+{:04X} printed raw: {line:?}",
            c as u32
        );
        let escaped: String = c.escape_default().collect();
        assert!(
            line.contains(&format!("/admin{escaped}gpj.exe")),
            "U+{:04X} not escaped: {line:?}",
            c as u32
        );
    }
    // Visible non-ASCII text is printed as it is.
    let mut e = event(3);
    e.path = "/r\u{e9}sum\u{e9}/\u{65e5}\u{672c}".into();
    assert!(format_line(&e, false).contains("/r\u{e9}sum\u{e9}/\u{65e5}\u{672c}"));
}

#[test]
fn filter_by_agent_decision_and_since() {
    let all = TailFilter::default();
    assert!(all.matches(&event(0)));
    let claude = TailFilter {
        agent: Some("claude".into()),
        ..TailFilter::default()
    };
    assert!(claude.matches(&event(0)));
    assert!(!claude.matches(&event(1)));
    let deny = TailFilter {
        decision: Some(Decision::Deny),
        ..TailFilter::default()
    };
    assert!(deny.matches(&event(3)));
    assert!(!deny.matches(&event(1)));
    let since = TailFilter {
        since: Some(event(5).ts),
        ..TailFilter::default()
    };
    assert!(!since.matches(&event(4)));
    assert!(since.matches(&event(5)));
    assert!(since.matches(&event(6)));
}

#[test]
fn deny_filter_leaves_out_407_challenges_unless_asked() {
    let mut challenge = event(3);
    challenge.outcome = Some(Outcome::Challenged);
    challenge.status = Some(407);
    challenge.reason = Some("token_missing".into());
    let refusal = event(3);
    let deny = TailFilter {
        decision: Some(Decision::Deny),
        ..TailFilter::default()
    };
    assert!(deny.matches(&refusal));
    assert!(!deny.matches(&challenge));
    let with = TailFilter {
        decision: Some(Decision::Deny),
        challenges: true,
        ..TailFilter::default()
    };
    assert!(with.matches(&challenge));
    // Unfiltered, the challenge shows, marked as what it is.
    assert!(TailFilter::default().matches(&challenge));
    assert!(format_line(&challenge, false).contains("AUTH?"));
    assert!(format_line(&refusal, false).contains("DENY"));
    // The outcome's word round-trips through the line.
    let json = serde_json::to_string(&challenge).unwrap();
    assert!(json.contains("\"outcome\":\"challenged\""), "{json}");
    let back: AuditEvent = serde_json::from_str(&json).unwrap();
    assert_eq!(back.outcome, Some(Outcome::Challenged));
}

#[tokio::test]
async fn tail_prints_matching_lines_and_counts_unparsable_ones() {
    let (_dir, path) = log_of(6).await;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(b"garbage\n{\"half\":").unwrap();
    drop(f);
    let filter = TailFilter {
        decision: Some(Decision::Deny),
        ..TailFilter::default()
    };
    let mut out = Vec::new();
    let report = tail(
        &path,
        &filter,
        true,
        false,
        false,
        &mut out,
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(
        report,
        TailReport {
            printed: 2,
            skipped: 2
        }
    );
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0], read_lines(&path)[0]);
    assert!(lines[1].contains("\"req-3\""));

    let mut out = Vec::new();
    tail(
        &path,
        &TailFilter::default(),
        false,
        false,
        false,
        &mut out,
        std::future::pending(),
    )
    .await
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 6);
    assert!(text.lines().all(|l| l.starts_with("2026-11-22T18:00:00.")));
}

#[tokio::test]
async fn tail_json_escapes_invisible_characters_and_keeps_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (sink, writer) = AuditSink::open(&path).await.unwrap();
    let mut e = event(1);
    e.path = "/a\u{202e}b\u{200b}c\u{9b}d\u{e0041}".into();
    sink.record(e.clone()).await;
    writer.shutdown().await.unwrap();
    let mut out = Vec::new();
    tail(
        &path,
        &TailFilter::default(),
        true,
        false,
        false,
        &mut out,
        std::future::pending(),
    )
    .await
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.is_ascii(), "{text:?}");
    assert!(
        text.contains(r"/a\u202eb\u200bc\u009bd\udb40\udc41"),
        "{text}"
    );
    let printed: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(printed["path"], e.path);
}

#[tokio::test]
async fn tail_of_a_missing_file_without_follow_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = tail(
        &dir.path().join("nope.jsonl"),
        &TailFilter::default(),
        false,
        false,
        false,
        &mut Vec::new(),
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, AuditError::Read { .. }), "{err}");
}

/// A `Write` the test can read while `tail` runs in another task.
#[derive(Clone, Default)]
struct SharedOut(Arc<Mutex<Vec<u8>>>);

impl Write for SharedOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedOut {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    /// Wait (bounded) until the output satisfies `ready`.
    async fn wait_for(&self, ready: impl Fn(&str) -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while !ready(&self.text()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "timed out; output so far:\n{}", self.text());
    }
}

#[tokio::test]
async fn follow_picks_up_appended_and_replaced_lines_and_stops_on_signal() {
    let (_dir, path) = log_of(2).await;
    let out = SharedOut::default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = {
        let (path, mut out) = (path.clone(), out.clone());
        tokio::spawn(async move {
            let stop = async {
                let _ = stop_rx.await;
            };
            tail(
                &path,
                &TailFilter::default(),
                true,
                false,
                true,
                &mut out,
                stop,
            )
            .await
        })
    };
    out.wait_for(|t| t.lines().count() == 2).await;

    // Appended by a second writer run, after tail started.
    write_events(&path, 2..3).await;
    out.wait_for(|t| t.contains("\"req-2\"")).await;

    // Replaced (rotation): the new file is read from its start.
    let rotated = path.with_extension("new");
    let (sink, writer) = AuditSink::open(&rotated).await.unwrap();
    sink.record(event(77)).await;
    writer.shutdown().await.unwrap();
    std::fs::rename(&rotated, &path).unwrap();
    out.wait_for(|t| t.contains("\"req-77\"")).await;

    stop_tx.send(()).unwrap();
    let report = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("tail stops when signalled")
        .unwrap()
        .unwrap();
    assert_eq!(
        report,
        TailReport {
            printed: 4,
            skipped: 0
        }
    );
}

// ---- rotation ----

use super::rotate::segment_path;
use super::sink::{FLUSH_BYTES, MAX_BATCH};

/// 2 KiB files hold a handful of ~450-byte lines, so 200 records give dozens of rotations.
const TINY: Rotation = Rotation {
    max_bytes: 2048,
    keep: 1000,
};

async fn write_rotating(path: &Path, rotation: Rotation, range: std::ops::Range<u64>) -> u64 {
    let (sink, writer) = AuditSink::open_rotating(path, Some(rotation))
        .await
        .unwrap();
    for i in range {
        sink.record(event(i)).await;
    }
    writer.shutdown().await.unwrap()
}

/// Rotated files present, oldest first, then the active file.
fn all_files(path: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = rotate::rotated_segments(path)
        .unwrap()
        .into_iter()
        .rev()
        .map(|(_, p)| p)
        .collect();
    files.push(path.to_path_buf());
    files
}

/// Request ids in order across every file.
fn request_ids(path: &Path) -> Vec<String> {
    all_files(path)
        .iter()
        .flat_map(|f| read_lines(f))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            v["request_id"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn ids(range: std::ops::Range<u64>) -> Vec<String> {
    range.map(|i| format!("req-{i}")).collect()
}

async fn rotated_log(n: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    assert_eq!(write_rotating(&path, TINY, 0..n).await, n);
    (dir, path)
}

#[tokio::test]
async fn rotation_happens_at_the_threshold_without_splitting_a_line() {
    let (_dir, path) = rotated_log(200).await;
    let files = all_files(&path);
    assert!(files.len() >= 10, "only {} files", files.len());
    let longest_line = files
        .iter()
        .flat_map(|f| read_lines(f))
        .map(|l| l.len() as u64 + 1)
        .max()
        .unwrap();
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        assert!(
            bytes.len() as u64 <= TINY.max_bytes,
            "{} has {} bytes",
            f.display(),
            bytes.len()
        );
        // Full: the next line would not have fitted (except in the active file).
        if f != &path {
            assert!(bytes.len() as u64 + longest_line > TINY.max_bytes);
        }
        assert_eq!(bytes.last(), Some(&b'\n'), "{} ends mid-line", f.display());
        for line in read_lines(f) {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert!(v["hash"].is_string());
        }
        let mode = std::fs::metadata(f).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", f.display());
    }
    assert_eq!(request_ids(&path), ids(0..200));
}

#[tokio::test]
async fn a_line_longer_than_max_bytes_gets_a_file_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (sink, writer) = AuditSink::open_rotating(&path, Some(TINY)).await.unwrap();
    sink.record(event(0)).await;
    let mut big = event(1);
    big.path = "/x".repeat(2000);
    sink.record(big).await;
    sink.record(event(2)).await;
    writer.shutdown().await.unwrap();
    assert_eq!(read_lines(&segment_path(&path, 2)).len(), 1);
    assert_eq!(read_lines(&segment_path(&path, 1)).len(), 1);
    assert!(read_lines(&segment_path(&path, 1))[0].len() > 4000);
    assert_eq!(read_lines(&path).len(), 1);
    assert_eq!(verify(&path).unwrap().lines, 3);
}

#[tokio::test]
async fn verify_checks_the_chain_across_every_rotated_file() {
    let (_dir, path) = rotated_log(200).await;
    let report = verify(&path).unwrap();
    assert_eq!(report.lines, 200);
    assert_eq!(report.files, all_files(&path).len());
    assert!(report.anchored_at_genesis);
    assert_eq!(report.anchor_hash, GENESIS_HASH);
    let last: serde_json::Value = serde_json::from_str(read_lines(&path).last().unwrap()).unwrap();
    assert_eq!(last["hash"], report.last_hash.as_str());
    // Each file's first line continues the previous file's last.
    let files = all_files(&path);
    for pair in files.windows(2) {
        let older: serde_json::Value =
            serde_json::from_str(read_lines(&pair[0]).last().unwrap()).unwrap();
        let newer: serde_json::Value = serde_json::from_str(&read_lines(&pair[1])[0]).unwrap();
        assert_eq!(newer["prev_hash"], older["hash"]);
    }
}

/// A backlog far larger than one batch, with rotation thresholds that fall both inside and
/// across the writer's mid-batch flushes: every line once, in order, chained, no file over
/// its limit or ending mid-line.
#[tokio::test]
async fn a_backlog_is_written_in_bounded_pieces_with_rotation_in_between() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let rotation = Rotation {
        max_bytes: (FLUSH_BYTES + FLUSH_BYTES / 3) as u64,
        keep: 1000,
    };
    let (sink, writer) = AuditSink::open_rotating(&path, Some(rotation))
        .await
        .unwrap();
    // Queued without yielding (the queue has room): the writer finds them all waiting.
    let n = 3 * MAX_BATCH as u64 + 17;
    for i in 0..n {
        sink.record(event(i)).await;
    }
    assert_eq!(writer.shutdown().await.unwrap(), n);
    assert_eq!(request_ids(&path), ids(0..n));
    let files = all_files(&path);
    assert!(files.len() >= 3, "only {} files", files.len());
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        assert!(bytes.len() as u64 <= rotation.max_bytes, "{}", f.display());
        assert_eq!(bytes.last(), Some(&b'\n'), "{} ends mid-line", f.display());
    }
    let report = verify(&path).unwrap();
    assert_eq!(report.lines, n);
    assert!(report.anchored_at_genesis);
}

#[tokio::test]
async fn a_lone_file_reports_one_file_anchored_at_genesis() {
    let (_dir, path) = log_of(3).await;
    let report = verify(&path).unwrap();
    assert_eq!((report.lines, report.files), (3, 1));
    assert!(report.anchored_at_genesis);
}

#[tokio::test]
async fn an_edit_in_a_rotated_file_is_reported_with_that_file_and_line() {
    let (_dir, path) = rotated_log(200).await;
    let seg = segment_path(&path, 3);
    let mut lines = read_lines(&seg);
    lines[1] = lines[1].replace("\"GET\"", "\"PUT\"");
    write_lines(&seg, &lines);
    let err = verify(&path).unwrap_err();
    match &err {
        VerifyError::Edited { file, line: 2 } => assert_eq!(file, &seg),
        other => panic!("unexpected {other}"),
    }
    let text = err.to_string();
    assert!(text.contains("audit.jsonl.3: line 2"), "{text}");
}

#[tokio::test]
async fn a_dropped_line_in_a_rotated_file_is_reported_with_that_file() {
    let (_dir, path) = rotated_log(200).await;
    let seg = segment_path(&path, 5);
    let mut lines = read_lines(&seg);
    assert!(lines.len() >= 3);
    lines.remove(1);
    write_lines(&seg, &lines);
    match verify(&path).unwrap_err() {
        VerifyError::BrokenChain {
            file,
            line: 2,
            previous: 1,
        } => assert_eq!(file, seg),
        other => panic!("unexpected {other}"),
    }
}

#[tokio::test]
async fn a_dropped_last_line_of_a_rotated_file_is_a_gap_naming_both_files() {
    let (_dir, path) = rotated_log(200).await;
    let seg = segment_path(&path, 4);
    let mut lines = read_lines(&seg);
    lines.pop();
    write_lines(&seg, &lines);
    match verify(&path).unwrap_err() {
        VerifyError::Gap {
            file,
            previous_file,
        } => {
            assert_eq!(file, segment_path(&path, 3));
            assert_eq!(previous_file, seg);
        }
        other => panic!("unexpected {other}"),
    }
}

#[tokio::test]
async fn deleting_the_oldest_files_still_verifies_but_not_from_genesis() {
    let (_dir, path) = rotated_log(200).await;
    let files = all_files(&path);
    let dropped: usize = files[..2].iter().map(|f| read_lines(f).len()).sum();
    std::fs::remove_file(&files[0]).unwrap();
    std::fs::remove_file(&files[1]).unwrap();
    let report = verify(&path).unwrap();
    assert!(!report.anchored_at_genesis);
    assert_eq!(report.lines, 200 - dropped as u64);
    assert_eq!(report.files, files.len() - 2);
    let first: serde_json::Value = serde_json::from_str(&read_lines(&files[2])[0]).unwrap();
    assert_eq!(first["prev_hash"], report.anchor_hash.as_str());
}

#[tokio::test]
async fn a_missing_middle_file_is_a_gap_naming_both_neighbours() {
    let (_dir, path) = rotated_log(200).await;
    std::fs::remove_file(segment_path(&path, 4)).unwrap();
    let err = verify(&path).unwrap_err();
    match &err {
        VerifyError::Gap {
            file,
            previous_file,
        } => {
            assert_eq!(file, &segment_path(&path, 3));
            assert_eq!(previous_file, &segment_path(&path, 5));
        }
        other => panic!("unexpected {other}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("audit.jsonl.3") && text.contains("audit.jsonl.5"),
        "{text}"
    );
}

#[tokio::test]
async fn a_rotated_log_whose_middle_file_lost_its_first_line_is_a_gap() {
    let (_dir, path) = rotated_log(200).await;
    let seg = segment_path(&path, 2);
    let mut lines = read_lines(&seg);
    lines.remove(0);
    write_lines(&seg, &lines);
    assert!(matches!(
        verify(&path).unwrap_err(),
        VerifyError::Gap { file, .. } if file == seg
    ));
}

#[tokio::test]
async fn reopening_after_rotation_continues_the_chain() {
    let (_dir, path) = rotated_log(100).await;
    let before = verify(&path).unwrap();
    assert_eq!(write_rotating(&path, TINY, 100..200).await, 100);
    let report = verify(&path).unwrap();
    assert_eq!(report.lines, 200);
    assert!(report.anchored_at_genesis);
    assert!(report.files > before.files);
    assert_eq!(request_ids(&path), ids(0..200));
}

#[tokio::test]
async fn a_crash_right_after_rotation_resumes_from_the_rotated_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    write_rotating(&path, TINY, 0..30).await;
    // As if the writer died between renaming the active file and creating the new one.
    std::fs::rename(&path, segment_path(&path, 0)).unwrap();
    let n = rotate::rotated_segments(&path).unwrap().len() as u64;
    for k in (1..=n).rev() {
        std::fs::rename(segment_path(&path, k), segment_path(&path, k + 1)).unwrap();
    }
    std::fs::rename(segment_path(&path, 0), segment_path(&path, 1)).unwrap();
    assert!(!path.exists());
    let report = verify(&path).unwrap();
    assert_eq!(report.lines, 30);
    assert_eq!(report.files as u64, n + 1);

    // Missing active file: resumes from `.1`.
    write_rotating(&path, TINY, 30..31).await;
    assert_eq!(verify(&path).unwrap().lines, 31);

    // Empty active file (created, nothing written yet): same.
    write_rotating(
        &path,
        Rotation {
            max_bytes: 1,
            keep: 1000,
        },
        31..32,
    )
    .await;
    std::fs::write(&path, "").unwrap();
    write_rotating(&path, TINY, 32..40).await;
    let report = verify(&path).unwrap();
    assert_eq!(report.lines, 39);
    assert!(report.anchored_at_genesis);
}

#[tokio::test]
async fn retention_keeps_at_most_keep_rotated_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let rotation = Rotation {
        max_bytes: 2048,
        keep: 3,
    };
    write_rotating(&path, rotation, 0..200).await;
    let segments: Vec<u64> = rotate::rotated_segments(&path)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(segments, vec![1, 2, 3]);
    let report = verify(&path).unwrap();
    assert!(!report.anchored_at_genesis);
    assert_eq!(report.files, 4);
    assert!(report.lines < 200);
    let got = request_ids(&path);
    assert_eq!(got, ids(200 - got.len() as u64..200));

    // A smaller `keep` on a later run trims the older files at the next rotation.
    let fewer = Rotation {
        max_bytes: 2048,
        keep: 1,
    };
    write_rotating(&path, fewer, 200..230).await;
    let segments: Vec<u64> = rotate::rotated_segments(&path)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(segments, vec![1]);
    assert!(verify(&path).is_ok());
}

#[tokio::test]
async fn without_rotation_the_log_is_one_growing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let (sink, writer) = AuditSink::open_rotating(&path, None).await.unwrap();
    for i in 0..50 {
        sink.record(event(i)).await;
    }
    writer.shutdown().await.unwrap();
    assert!(rotate::rotated_segments(&path).unwrap().is_empty());
    assert!(std::fs::metadata(&path).unwrap().len() > TINY.max_bytes);
    assert_eq!(verify(&path).unwrap().lines, 50);
}

#[test]
fn default_rotation_is_64_mib_keeping_10() {
    assert_eq!(
        Rotation::default(),
        Rotation {
            max_bytes: 64 * 1024 * 1024,
            keep: 10
        }
    );
}

#[tokio::test]
async fn tail_reads_rotated_files_oldest_first_then_the_active_one() {
    let (_dir, path) = rotated_log(200).await;
    let mut out = Vec::new();
    let report = tail(
        &path,
        &TailFilter::default(),
        true,
        false,
        false,
        &mut out,
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(report.printed, 200);
    let got: Vec<String> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["request_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(got, ids(0..200));

    // Right after a rotation the active file may be missing: history still shows.
    std::fs::remove_file(&path).unwrap();
    let report = tail(
        &path,
        &TailFilter::default(),
        true,
        false,
        false,
        &mut Vec::new(),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert!(report.printed > 0 && report.printed < 200);
}

#[tokio::test]
async fn follow_keeps_up_with_our_own_writer_rotating() {
    let (_dir, path) = rotated_log(20).await;
    let out = SharedOut::default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = {
        let (path, mut out) = (path.clone(), out.clone());
        tokio::spawn(async move {
            let stop = async {
                let _ = stop_rx.await;
            };
            tail(
                &path,
                &TailFilter::default(),
                true,
                false,
                true,
                &mut out,
                stop,
            )
            .await
        })
    };
    out.wait_for(|t| t.lines().count() == 20).await;
    // Several rotations while tail follows, some between two of its polls.
    let (sink, writer) = AuditSink::open_rotating(&path, Some(TINY)).await.unwrap();
    for i in 20..120 {
        sink.record(event(i)).await;
        if i % 7 == 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    writer.shutdown().await.unwrap();
    out.wait_for(|t| t.contains("\"req-119\"")).await;
    stop_tx.send(()).unwrap();
    let report = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("tail stops when signalled")
        .unwrap()
        .unwrap();
    assert_eq!(report.printed, 120);
    let got: Vec<String> = out
        .text()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["request_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(got, ids(0..120));
}
