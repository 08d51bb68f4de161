//! The audit writer: one task owns the log file and the hash chain.
//!
//! Request handlers only push an [`AuditEvent`] into a bounded queue ([`AuditSink::record`],
//! or [`AuditSink::record_now`] where no `.await` is possible: a record completing on drop or
//! at the end of a response body);
//! the writer drains whatever is queued, encodes and chains every line into one buffer and
//! hands the batch to the OS in one write (group commit). It fsyncs on shutdown only: a
//! crash may lose the last batch, but never reorders or silently breaks the chain.
//! It must never drop an event while running: a full queue makes `record` wait, and a
//! failed write is retried until it succeeds.
//!
//! With a [`Rotation`], the writer rotates the file between two lines when the next one would
//! take it past `max_bytes` (see `rotate.rs`); the chain carries on into the new file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::chain::Chain;
use super::event::AuditEvent;
use super::rotate::{rotated_segments, segment_path, shift_segments, sync_dir, Rotation};

/// Events the queue holds before `record` starts waiting. At a few µs per line the writer
/// empties it in well under 100 ms, so a full queue means the disk, not the encoder, is slow.
pub const QUEUE_CAPACITY: usize = 4096;

/// Most events taken from the queue at once. The batch and the encoded lines stay allocated
/// (both buffers are reused), so this bounds what a burst leaves resident: with 1024 and one
/// write per batch, a writer that fell behind by a thousand lines (a stall of 25 ms at 40k
/// requests/s) kept about 1.1 MiB touched for good (events are 536 bytes, lines about 570);
/// now about 0.2 MiB. The backlog itself waits in the queue, whose blocks are freed as it
/// drains.
pub(super) const MAX_BATCH: usize = 256;

/// Encoded lines are written out once this many bytes are waiting, even mid-batch.
pub(super) const FLUSH_BYTES: usize = 64 * 1024;

/// How long the writer collects lines after the first one of a batch (see `run_writer`).
const GROUP_COMMIT: Duration = Duration::from_millis(2);

/// Back-off between retries of a failed write: long enough not to spin on a full disk,
/// short enough that the queue drains promptly once space is back.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Attempts a failing write gets once shutdown was requested; running, it retries forever.
const SHUTDOWN_WRITE_ATTEMPTS: u32 = 5;

/// Why the audit log could not be opened, written or closed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log's directory did not exist and could not be created.
    #[error("cannot create audit log directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The log could not be opened (or created) for appending.
    #[error("cannot open audit log {path}")]
    Open {
        /// The log file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The log could not be read (resuming the chain, or tailing).
    #[error("cannot read audit log {path}")]
    Read {
        /// The log file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The log's last line is not a complete chained record, so the chain cannot be resumed.
    /// Fires on a torn write or an edited tail; we refuse rather than silently restart.
    #[error("audit log {path} ends with a line that is not a complete chained record ({what}); refusing to restart the hash chain, run `latchkey audit verify`")]
    CorruptTail {
        /// The log file.
        path: PathBuf,
        /// What is wrong with the last line.
        what: String,
    },
    /// Queued lines could not be written before shutdown gave up retrying.
    #[error("cannot write {unwritten_lines} queued audit lines to {path}")]
    Write {
        /// The log file.
        path: PathBuf,
        /// Lines still unwritten (lost).
        unwritten_lines: u64,
        /// The last OS error.
        #[source]
        source: io::Error,
    },
    /// The final fsync failed: written lines may not be durable.
    #[error("cannot fsync audit log {path}")]
    Sync {
        /// The log file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The writer task panicked or was cancelled (e.g. its runtime shut down first).
    #[error("audit writer task ended abnormally")]
    WriterGone,
    /// Output of `tail` could not be written.
    #[error("cannot write audit output")]
    Output(#[source] io::Error),
}

/// Cheap to clone handle; lines are encoded, hashed and written by one dedicated task, off the request path.
#[derive(Clone, Debug)]
pub struct AuditSink {
    tx: mpsc::Sender<AuditEvent>,
    /// Where [`AuditSink::record_now`] puts an event when the bounded queue is full: it
    /// cannot wait, and it must not drop. Its size is bounded by the requests in flight
    /// (each completes once), and [`AuditSink::ready`] keeps new requests from piling on.
    overflow: mpsc::UnboundedSender<AuditEvent>,
}

/// Owns the writer task; [`AuditWriter::shutdown`] drains and closes the log.
#[derive(Debug)]
pub struct AuditWriter {
    close: oneshot::Sender<()>,
    task: JoinHandle<Result<u64, AuditError>>,
}

impl AuditSink {
    /// Open (create, mode 0600, parent dir created 0700) the log at `path`, resume the hash
    /// chain from its last line, and spawn the writer task on the current tokio runtime.
    /// Rotates with [`Rotation::default`] (64 MiB, 10 files kept).
    ///
    /// A last line that does not parse is an error: the chain is never silently restarted.
    /// Must be called inside a tokio runtime.
    pub async fn open(path: &Path) -> Result<(AuditSink, AuditWriter), AuditError> {
        Self::spawn(path, Some(Rotation::default()), QUEUE_CAPACITY).await
    }

    /// [`AuditSink::open`] with a chosen rotation; `None` never rotates (one growing file).
    ///
    /// If the active file is empty or missing but `path.1` exists (a crash right after a
    /// rotation), the chain resumes from the last line of the newest rotated file.
    pub async fn open_rotating(
        path: &Path,
        rotation: Option<Rotation>,
    ) -> Result<(AuditSink, AuditWriter), AuditError> {
        // Standard output cannot be renamed away.
        let rotation = if is_stdout(path) { None } else { rotation };
        Self::spawn(path, rotation, QUEUE_CAPACITY).await
    }

    /// [`AuditSink::open`] with a chosen queue capacity (at least 1).
    pub async fn open_with_capacity(
        path: &Path,
        capacity: usize,
    ) -> Result<(AuditSink, AuditWriter), AuditError> {
        Self::spawn(path, Some(Rotation::default()), capacity).await
    }

    async fn spawn(
        path: &Path,
        rotation: Option<Rotation>,
        capacity: usize,
    ) -> Result<(AuditSink, AuditWriter), AuditError> {
        let owned = path.to_path_buf();
        let (file, chain, len) = tokio::task::spawn_blocking(move || open_blocking(&owned))
            .await
            .map_err(|_| AuditError::WriterGone)??;
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let (overflow, overflow_rx) = mpsc::unbounded_channel();
        let (close_tx, close_rx) = oneshot::channel();
        let task = tokio::spawn(run_writer(
            LogFile {
                path: path.to_path_buf(),
                file: Some(file),
                len,
                rotation,
                rotate_after: None,
            },
            chain,
            Queues { rx, overflow_rx },
            close_rx,
        ));
        Ok((
            AuditSink { tx, overflow },
            AuditWriter {
                close: close_tx,
                task,
            },
        ))
    }

    /// Queue one event; waits while the queue is full (backpressure, never drops).
    ///
    /// Only after [`AuditWriter::shutdown`] has begun is an event refused; that is logged
    /// at `error` with its request id, since the audit trail then has a hole.
    pub async fn record(&self, event: AuditEvent) {
        if let Err(mpsc::error::SendError(event)) = self.tx.send(event).await {
            lost(&event);
        }
    }

    /// Queue one event without waiting: for code that cannot `.await` (a `Drop`, a body's
    /// `poll_frame`). Never drops an event while the writer runs: a full queue spills into
    /// the overflow queue, which the writer drains too.
    pub fn record_now(&self, event: AuditEvent) {
        let event = match self.tx.try_send(event) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(event)) => event,
            Err(mpsc::error::TrySendError::Closed(event)) => return lost(&event),
        };
        if let Err(mpsc::error::SendError(event)) = self.overflow.send(event) {
            lost(&event);
        }
    }

    /// Wait until the queue has room: backpressure for a new request while the writer is
    /// behind (a slow disk), so the overflow queue stays small.
    pub async fn ready(&self) {
        if self.tx.capacity() == 0 {
            // The permit is only a wait for room; dropping it gives the slot back.
            let _ = self.tx.reserve().await;
        }
    }
}

/// An event that arrived after the writer shut down: the audit trail has a hole, say so.
fn lost(event: &AuditEvent) {
    tracing::error!(
        request_id = %event.request_id,
        "audit event recorded after the audit writer shut down; it is not in the log"
    );
}

/// The writer's two inputs: the bounded queue, and the overflow of `record_now`.
struct Queues {
    rx: mpsc::Receiver<AuditEvent>,
    overflow_rx: mpsc::UnboundedReceiver<AuditEvent>,
}

impl Queues {
    /// Stop accepting events; those already queued are still received.
    fn close(&mut self) {
        self.rx.close();
        self.overflow_rx.close();
    }

    /// Move queued events into `batch` without waiting (the overflow first: it is older).
    fn try_take(&mut self, batch: &mut Vec<AuditEvent>) -> usize {
        let before = batch.len();
        while batch.len() < MAX_BATCH {
            match self.overflow_rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        while batch.len() < MAX_BATCH {
            match self.rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        batch.len() - before
    }

    /// Wait for at least one event; 0 once both queues are closed (or every sink dropped)
    /// and empty.
    async fn take(&mut self, batch: &mut Vec<AuditEvent>) -> usize {
        let n = self.try_take(batch);
        if n > 0 {
            return n;
        }
        let first = tokio::select! {
            e = self.rx.recv() => match e {
                Some(e) => Some(e),
                None => self.overflow_rx.recv().await,
            },
            e = self.overflow_rx.recv() => match e {
                Some(e) => Some(e),
                None => self.rx.recv().await,
            },
        };
        match first {
            Some(e) => {
                batch.push(e);
                1 + self.try_take(batch)
            }
            None => 0,
        }
    }
}

impl AuditWriter {
    /// Close the queue, write everything still queued, flush and fsync, and return the
    /// number of lines written during this run.
    ///
    /// Works while clones of [`AuditSink`] still exist (e.g. in connection tasks that are
    /// finishing): their later `record` calls are refused and logged. Call after the server
    /// stopped accepting requests.
    pub async fn shutdown(self) -> Result<u64, AuditError> {
        // The writer may already have ended (it never does on its own), so ignore a send error.
        let _ = self.close.send(());
        self.task.await.map_err(|_| AuditError::WriterGone)?
    }
}

/// The path that means "write lines to standard output" (`--audit-log -`, for log shippers).
pub const STDOUT_PATH: &str = "-";

fn is_stdout(path: &Path) -> bool {
    path.as_os_str() == STDOUT_PATH
}

/// Open or create the log and find where the chain stands; also returns the file's length.
fn open_blocking(path: &Path) -> Result<(File, Chain, u64), AuditError> {
    if is_stdout(path) {
        // A fresh chain per run: the shipper keeps the lines, and each run's chain verifies
        // on its own from genesis.
        use std::os::fd::AsFd;
        let fd = std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| AuditError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        return Ok((File::from(fd), Chain::genesis(), 0));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // SECURITY: the log names agents, hosts and paths; keep a new directory private.
        crate::fsutil::ensure_private_dir(dir).map_err(|source| AuditError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let (mut file, len) = open_active(path)?;
    let chain = if len == 0 {
        resume_from_rotated(path)?
    } else {
        resume_chain(&mut file, path)?
    };
    Ok((file, chain, len))
}

/// Open or create the active file for appending (0600, regular file only) and return its length.
fn open_active(path: &Path) -> Result<(File, u64), AuditError> {
    let open_err = |source| AuditError::Open {
        path: path.to_path_buf(),
        source,
    };
    // SECURITY: 0600 so other local users (and agents running as them) cannot read it.
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if !meta.is_file() {
        // Refuse devices and FIFOs: the chain needs an append-only regular file, and
        // tightening the mode below must never chmod something like /dev/null.
        return Err(open_err(io::Error::other("not a regular file")));
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "audit log was readable by others; tightening to 0600");
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(open_err)?;
    }
    Ok((file, meta.len()))
}

/// The active file is empty: continue from the newest non-empty rotated file, if any, so
/// that a crash right after a rotation does not restart the chain at genesis.
fn resume_from_rotated(path: &Path) -> Result<Chain, AuditError> {
    let segments = rotated_segments(path).map_err(|source| AuditError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    for (_, seg) in segments {
        let read_err = |source| AuditError::Read {
            path: seg.clone(),
            source,
        };
        let mut file = File::open(&seg).map_err(read_err)?;
        if file.metadata().map_err(read_err)?.len() > 0 {
            return resume_chain(&mut file, &seg);
        }
    }
    Ok(Chain::genesis())
}

/// Read the last line of the log and continue the chain from its `hash`.
fn resume_chain(file: &mut File, path: &Path) -> Result<Chain, AuditError> {
    let read_err = |source| AuditError::Read {
        path: path.to_path_buf(),
        source,
    };
    let corrupt = |what: String| AuditError::CorruptTail {
        path: path.to_path_buf(),
        what,
    };
    let len = file.seek(SeekFrom::End(0)).map_err(read_err)?;
    if len == 0 {
        return Ok(Chain::genesis());
    }
    // Read backwards in chunks until the newline before the last line (or the file start).
    const CHUNK: u64 = 8192;
    let mut tail: Vec<u8> = Vec::new();
    let mut pos = len;
    loop {
        let start = pos.saturating_sub(CHUNK);
        let mut chunk = vec![0u8; usize::try_from(pos - start).expect("chunk fits usize")];
        file.seek(SeekFrom::Start(start)).map_err(read_err)?;
        file.read_exact(&mut chunk).map_err(read_err)?;
        chunk.extend_from_slice(&tail);
        tail = chunk;
        pos = start;
        // Skip the final byte: it should be the last line's own `\n`.
        let body = &tail[..tail.len() - 1];
        if body.contains(&b'\n') || pos == 0 {
            break;
        }
    }
    if tail.last() != Some(&b'\n') {
        return Err(corrupt("last line is not terminated by a newline".into()));
    }
    let body = &tail[..tail.len() - 1];
    let last = match body.iter().rposition(|&b| b == b'\n') {
        Some(i) => &body[i + 1..],
        None => body,
    };
    let value: serde_json::Value =
        serde_json::from_slice(last).map_err(|e| corrupt(format!("not valid JSON: {e}")))?;
    let hash = value
        .get("hash")
        .and_then(|h| h.as_str())
        .ok_or_else(|| corrupt("no `hash` field".into()))?;
    Chain::resume(hash).ok_or_else(|| corrupt("`hash` is not 64 lowercase hex digits".into()))
}

/// The log file, moved into `spawn_blocking` for each write and back.
struct LogFile {
    path: PathBuf,
    file: Option<File>,
    /// Bytes in the active file, compared with `max_bytes` before each line.
    len: u64,
    rotation: Option<Rotation>,
    /// After a failed rotation, keep writing to the current file and retry only after this.
    rotate_after: Option<Instant>,
}

impl LogFile {
    /// Whether a line of `line_len` bytes, after `buffered` bytes not yet written, must go
    /// to a new file. A line always fits an empty file, so no line is ever split or dropped.
    fn must_rotate(&self, buffered: u64, line_len: u64) -> bool {
        let Some(rotation) = self.rotation else {
            return false;
        };
        if self.rotate_after.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        let before = self.len + buffered;
        before > 0 && before + line_len > rotation.max_bytes
    }
}

/// The writer loop: drain, encode, write, repeat; on close, drain the rest and fsync.
async fn run_writer(
    mut log: LogFile,
    mut chain: Chain,
    mut queues: Queues,
    mut close: oneshot::Receiver<()>,
) -> Result<u64, AuditError> {
    let mut batch: Vec<AuditEvent> = Vec::with_capacity(MAX_BATCH);
    let mut buf: Vec<u8> = Vec::with_capacity(FLUSH_BYTES + 4096);
    let mut written: u64 = 0;
    let mut closing = false;
    loop {
        let received = if closing {
            queues.take(&mut batch).await
        } else {
            tokio::select! {
                // Close first: under steady traffic the queue is never empty, and shutdown
                // must still begin. A dropped `AuditWriter` also lands here (graceful close).
                biased;
                _ = &mut close => {
                    // Refuse new events; everything already queued is still received.
                    queues.close();
                    closing = true;
                    continue;
                }
                n = queues.take(&mut batch) => n,
            }
        };
        if received == 0 {
            break; // queue closed (or every sink dropped) and empty
        }
        if batch.len() < MAX_BATCH && !closing {
            // Group commit: a woken writer would otherwise run at once (tokio schedules a
            // woken task next on the waking thread) and hand the disk a few lines per write,
            // each write a hand-off to a blocking thread and back. Collecting for
            // GROUP_COMMIT first makes that one write per GROUP_COMMIT under load (profiled
            // in BENCHMARKS.md), and while the writer sleeps a request's line costs a push,
            // not a wake-up. It delays the log by at most GROUP_COMMIT, never a request.
            tokio::time::sleep(GROUP_COMMIT).await;
            queues.try_take(&mut batch);
        }
        let mut lines: u64 = 0;
        for event in batch.drain(..) {
            let start = buf.len();
            chain.append(&event, &mut buf);
            let line_len = (buf.len() - start) as u64;
            if log.must_rotate(start as u64, line_len) {
                // Write the lines before this one to the old file, then rotate; the line
                // (already chained) opens the new file.
                let line = buf.split_off(start);
                if lines > 0 {
                    buf = write_batch(&mut log, buf, lines, closing).await?;
                    written += lines;
                    lines = 0;
                }
                rotate(&mut log, closing).await?;
                buf.extend_from_slice(&line);
            }
            lines += 1;
            if buf.len() >= FLUSH_BYTES {
                buf = write_batch(&mut log, buf, lines, closing).await?;
                written += lines;
                lines = 0;
            }
        }
        if lines > 0 {
            buf = write_batch(&mut log, buf, lines, closing).await?;
            written += lines;
        }
    }
    sync(&mut log).await?;
    Ok(written)
}

/// Write one batch, retrying on error. Returns the emptied buffer for reuse.
async fn write_batch(
    log: &mut LogFile,
    mut buf: Vec<u8>,
    lines: u64,
    closing: bool,
) -> Result<Vec<u8>, AuditError> {
    let mut backoff = RETRY_MIN;
    let mut attempts = 0u32;
    loop {
        let file = log.file.take().ok_or(AuditError::WriterGone)?;
        let before = buf.len();
        let (file, res, rest) = tokio::task::spawn_blocking(move || {
            let mut file = file;
            let res = write_all_tracked(&mut file, &buf);
            let rest = match &res {
                Ok(()) => {
                    buf.clear();
                    buf
                }
                // Keep only what the OS did not take, so a retry never duplicates a line.
                Err((done, _)) => buf.split_off(*done),
            };
            (file, res.map_err(|(_, e)| e), rest)
        })
        .await
        .map_err(|_| AuditError::WriterGone)?;
        log.file = Some(file);
        log.len += (before - rest.len()) as u64;
        buf = rest;
        match res {
            Ok(()) => return Ok(buf),
            Err(source) => {
                attempts += 1;
                tracing::error!(path = %log.path.display(), error = %source, attempts, "audit log write failed; retrying (requests wait meanwhile)");
                if closing && attempts >= SHUTDOWN_WRITE_ATTEMPTS {
                    return Err(AuditError::Write {
                        path: log.path.clone(),
                        unwritten_lines: bytecount_newlines(&buf).min(lines),
                        source,
                    });
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Like `write_all`, but on error says how many bytes were written.
fn write_all_tracked(file: &mut File, buf: &[u8]) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    while done < buf.len() {
        match file.write(&buf[done..]) {
            Ok(0) => return Err((done, io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

fn bytecount_newlines(buf: &[u8]) -> u64 {
    buf.iter().filter(|&&b| b == b'\n').count() as u64
}

/// fsync the log so everything written survives a crash.
async fn sync(log: &mut LogFile) -> Result<(), AuditError> {
    let file = log.file.take().ok_or(AuditError::WriterGone)?;
    let stdout = is_stdout(&log.path);
    let (file, res) = tokio::task::spawn_blocking(move || {
        // A pipe or terminal cannot be fsynced; everything was already written to it.
        let res = if stdout { Ok(()) } else { file.sync_all() };
        (file, res)
    })
    .await
    .map_err(|_| AuditError::WriterGone)?;
    log.file = Some(file);
    res.map_err(|source| AuditError::Sync {
        path: log.path.clone(),
        source,
    })
}

/// How a rotation attempt failed.
enum RotateFailure {
    /// Nothing was renamed away yet: the current file is still the active one.
    Kept(io::Error),
    /// The active file is now `path.1`, but the fresh active file could not be created.
    NoNewFile(AuditError),
}

/// Rotate the active file: fsync it, shift `path.k` -> `path.{k+1}` (dropping past
/// `keep`), rename it to `path.1` and open a fresh active file. The chain is untouched.
///
/// If the old file cannot be moved away, keep writing to it (the file grows past
/// `max_bytes`, but nothing is lost) and try again later. If the new file cannot be created,
/// retry like a failed write: requests wait meanwhile.
async fn rotate(log: &mut LogFile, closing: bool) -> Result<(), AuditError> {
    let keep = log.rotation.map_or(1, |r| r.keep);
    let file = log.file.take().ok_or(AuditError::WriterGone)?;
    let path = log.path.clone();
    let (file, res) = tokio::task::spawn_blocking(move || {
        let res = move_away(&file, &path, keep);
        (file, res)
    })
    .await
    .map_err(|_| AuditError::WriterGone)?;
    let failure = match res {
        Ok(new) => {
            install(log, new);
            return Ok(());
        }
        Err(RotateFailure::Kept(source)) => {
            tracing::error!(path = %log.path.display(), error = %source, "audit log rotation failed; still writing to the current file");
            log.file = Some(file);
            log.rotate_after = Some(Instant::now() + RETRY_MAX);
            return Ok(());
        }
        Err(RotateFailure::NoNewFile(e)) => e,
    };
    // Keep the old handle until a new file exists, so a shutdown error path still owns a file.
    log.file = Some(file);
    let mut error = failure;
    let mut backoff = RETRY_MIN;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        tracing::error!(path = %log.path.display(), error = %error, attempts, "cannot create a new audit log after rotation; retrying (requests wait meanwhile)");
        if closing && attempts >= SHUTDOWN_WRITE_ATTEMPTS {
            return Err(error);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RETRY_MAX);
        let path = log.path.clone();
        match tokio::task::spawn_blocking(move || open_fresh(&path))
            .await
            .map_err(|_| AuditError::WriterGone)?
        {
            Ok(new) => {
                install(log, new);
                return Ok(());
            }
            Err(e) => error = e,
        }
    }
}

fn install(log: &mut LogFile, (file, len): (File, u64)) {
    log.file = Some(file);
    log.len = len;
    log.rotate_after = None;
    tracing::info!(path = %log.path.display(), "audit log rotated");
}

/// The blocking part of [`rotate`].
fn move_away(file: &File, path: &Path, keep: usize) -> Result<(File, u64), RotateFailure> {
    // Durable before it is renamed: `path.1` must never end with a line that is later lost.
    file.sync_all().map_err(RotateFailure::Kept)?;
    shift_segments(path, keep).map_err(RotateFailure::Kept)?;
    std::fs::rename(path, segment_path(path, 1)).map_err(RotateFailure::Kept)?;
    open_fresh(path).map_err(RotateFailure::NoNewFile)
}

/// Create the new active file and make the renames and the new entry durable.
fn open_fresh(path: &Path) -> Result<(File, u64), AuditError> {
    let opened = open_active(path)?;
    if let Err(e) = sync_dir(path) {
        // The files are all there; only their names may not survive a power cut.
        tracing::warn!(path = %path.display(), error = %e, "cannot fsync the audit log directory after rotation");
    }
    Ok(opened)
}
