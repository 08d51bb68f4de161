//! Small file helpers for state that must survive crashes and stay private: atomic writes
//! (write, fsync, rename, fsync dir), owner-only directories, advisory locks, change stamps.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Create `dir` (and parents) with mode 0700 if it does not exist.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Replace `path` with `bytes` atomically: a temp file in the same directory with `mode`,
/// fsync, rename over, fsync the directory. A crash leaves either the old or the new file.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_stamped(path, bytes, mode).map(|_| ())
}

/// [`write_atomic`], returning the new file's stamp. The stamp is taken from the temp file's
/// handle before the rename, so it describes the bytes written here even if another process
/// replaces `path` right after; a reader comparing it with [`FileStamp::of`] then sees the
/// other writer's change instead of mistaking it for ours.
pub fn write_atomic_stamped(path: &Path, bytes: &[u8], mode: u32) -> io::Result<FileStamp> {
    let dir = parent_dir(path);
    let tmp = temp_path(path);
    let result = (|| {
        // SECURITY: the mode is set at creation, so the file is never briefly readable by others.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode passed to open is masked by umask; set it explicitly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        let stamp = FileStamp::of_file(&f)?;
        fs::rename(&tmp, path)?;
        Ok::<_, io::Error>(stamp)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    let stamp = result?;
    sync_dir(dir)?;
    Ok(stamp)
}

/// Create `path` with `bytes` only if it does not exist yet, atomically: a temp file with
/// `mode` is written, fsynced and hard-linked into place (the link fails if another process
/// won the race), then the directory is fsynced. `path` is never seen half-written. Returns
/// false, writing nothing, when `path` already exists.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<bool> {
    let dir = parent_dir(path);
    let tmp = temp_path(path);
    let linked = (|| {
        // SECURITY: the mode is set at creation, so the file is never briefly readable by others.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok::<_, io::Error>(fs::hard_link(&tmp, path))
    })();
    let _ = fs::remove_file(&tmp);
    match linked? {
        Ok(()) => {
            sync_dir(dir)?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// fsync a directory, so that renames and new entries in it survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// A fresh temp name beside `path`: random, so two writers never share one and nothing
/// planted at a predictable name is reused (callers open it with `create_new`).
fn temp_path(path: &Path) -> std::path::PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let suffix: [u8; 8] = rand::random();
    parent_dir(path).join(format!(".{name}.{}.tmp", hex::encode(suffix)))
}

/// Take an exclusive advisory lock on `path` (created 0600), held until the file is dropped.
pub fn lock_file(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    f.lock()?;
    Ok(f)
}

/// Identity of a file's current contents as far as one `stat` can tell (device, inode, size,
/// mtime). Atomic renames always change the inode, so a rewrite is never missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl FileStamp {
    /// The stamp of `path`, or `None` if it does not exist or cannot be read.
    pub fn of(path: &Path) -> Option<FileStamp> {
        fs::metadata(path)
            .ok()
            .map(|m| FileStamp::from_metadata(&m))
    }

    /// The stamp of `path`, `Ok(None)` if it does not exist; other errors are returned, for
    /// callers that must not treat an unreadable file as a missing one.
    pub fn try_of(path: &Path) -> io::Result<Option<FileStamp>> {
        match fs::metadata(path) {
            Ok(m) => Ok(Some(FileStamp::from_metadata(&m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The stamp of an open file: it describes exactly the bytes read through that handle,
    /// even if the path is replaced meanwhile.
    pub fn of_file(file: &File) -> io::Result<FileStamp> {
        file.metadata().map(|m| FileStamp::from_metadata(&m))
    }

    fn from_metadata(m: &fs::Metadata) -> FileStamp {
        FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        }
    }

    /// The file's size in bytes when stamped.
    pub fn size(&self) -> u64 {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        write_atomic(&p, b"one", 0o600).unwrap();
        let s1 = FileStamp::of(&p);
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_ne!(s1, FileStamp::of(&p));
        assert_eq!(FileStamp::of(&d.path().join("missing")), None);
    }

    #[test]
    fn stamped_write_returns_the_stamp_of_the_file_it_wrote() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("store");
        let s1 = write_atomic_stamped(&p, b"one", 0o600).unwrap();
        assert_eq!(FileStamp::of(&p), Some(s1));
        assert_eq!(FileStamp::try_of(&p).unwrap(), Some(s1));
        assert_eq!(s1.size(), 3);
        let f = File::open(&p).unwrap();
        assert_eq!(FileStamp::of_file(&f).unwrap(), s1);
        // Same length: only the inode (a fresh temp file each time) tells the versions apart.
        let s2 = write_atomic_stamped(&p, b"two", 0o600).unwrap();
        assert_ne!(s1, s2);
        assert_eq!(FileStamp::of(&p), Some(s2));
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(FileStamp::try_of(&d.path().join("missing")).unwrap(), None);
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "a temp file was left"
        );
    }

    #[test]
    fn lock_file_is_0600_and_exclusive() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lock");
        let held = lock_file(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let other = OpenOptions::new().write(true).open(&p).unwrap();
        assert!(other.try_lock().is_err(), "a second lock was granted");
        drop(held);
        other.try_lock().unwrap();
    }

    #[test]
    fn write_new_never_overwrites() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("key");
        assert!(write_new(&p, b"first", 0o600).unwrap());
        assert!(!write_new(&p, b"second", 0o600).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"first");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "a temp file was left"
        );
    }

    #[test]
    fn private_dir_is_0700() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b");
        ensure_private_dir(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
}
