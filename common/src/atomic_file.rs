//! Writing a file so that a reader never sees half of it and a crash leaves either the old content
//! or the new: the bytes go to a temporary file in the target's directory (`tempfile`), are synced,
//! and the temporary file is renamed over the target, then the directory is synced. Every file
//! Flashgate writes whole (packed images, exports, PKI material, the soft keystore, journal ids,
//! simulator state) goes through here.
//!
//! A target that already exists and is not a regular file — a character device such as `/dev/null`,
//! a FIFO, a socket — is never replaced: it is opened and written in place (once, running as root,
//! a rename replaced `/dev/null` with a regular file). A symbolic link is followed for that check.

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Mode of files holding secrets or private state (keys, keystore, ledger, journal id).
pub const PRIVATE_MODE: u32 = 0o600;
/// Mode of files anyone may read (certificates, images, exports).
pub const PUBLIC_MODE: u32 = 0o644;

/// Writing `path` failed at step `op`.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct WriteError {
    /// The step that failed ("creating a temporary file beside", "writing", "renaming into place" …).
    pub op: &'static str,
    /// The file concerned (the target, or its directory for the temporary file).
    pub path: PathBuf,
    /// What the operating system said.
    #[source]
    pub source: io::Error,
}

fn err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WriteError + 'a {
    move |source| WriteError { op, path: path.to_path_buf(), source }
}

/// A file being written: write into it, then [`AtomicFile::commit`]. Dropped without a commit, a
/// regular target is left as it was (the temporary file is removed); a non-regular target has
/// received whatever was written.
pub struct AtomicFile {
    target: PathBuf,
    inner: Inner,
}

enum Inner {
    /// The target is (or will be) a regular file: a temporary sibling to rename over it.
    Replace(tempfile::NamedTempFile),
    /// The target exists and is a device, FIFO or socket: written in place.
    InPlace(File),
}

impl AtomicFile {
    /// Start writing `path`; a new regular file gets permission bits `mode` (whatever the umask).
    pub fn create(path: &Path, mode: u32) -> Result<Self, WriteError> {
        let target = path.to_path_buf();
        match std::fs::metadata(path) {
            Ok(meta) if !meta.is_file() && !meta.is_dir() => {
                let file = OpenOptions::new().write(true).open(path).map_err(err("opening", path))?;
                return Ok(Self { target, inner: Inner::InPlace(file) });
            }
            Ok(meta) if meta.is_dir() => {
                return Err(WriteError {
                    op: "writing",
                    path: target,
                    source: io::Error::new(io::ErrorKind::IsADirectory, "is a directory"),
                });
            }
            _ => {}
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .permissions(Permissions::from_mode(mode))
            .tempfile_in(&dir)
            .map_err(err("creating a temporary file in", &dir))?;
        // The umask narrows the mode given at creation: set it exactly.
        tmp.as_file().set_permissions(Permissions::from_mode(mode)).map_err(err("setting the mode of", tmp.path()))?;
        Ok(Self { target, inner: Inner::Replace(tmp) })
    }

    /// The file being written to.
    pub fn path(&self) -> &Path {
        &self.target
    }

    /// Make the content durable and put it in place.
    pub fn commit(self) -> Result<(), WriteError> {
        let target = self.target;
        match self.inner {
            Inner::InPlace(mut f) => f.flush().map_err(err("writing", &target)),
            Inner::Replace(tmp) => {
                tmp.as_file().sync_all().map_err(err("syncing", &target))?;
                tmp.persist(&target).map_err(|e| WriteError {
                    op: "renaming into place",
                    path: target.clone(),
                    source: e.error,
                })?;
                sync_parent(&target);
                Ok(())
            }
        }
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Replace(t) => t.write(buf),
            Inner::InPlace(f) => f.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Inner::Replace(t) => t.flush(),
            Inner::InPlace(f) => f.flush(),
        }
    }
}

/// Write `bytes` to `path` as one step (see the module header); `mode` for a new regular file.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), WriteError> {
    let mut f = AtomicFile::create(path, mode)?;
    f.write_all(bytes).map_err(err("writing", path))?;
    f.commit()
}

/// Sync the directory holding `path` so a rename into it survives a power cut. Some filesystems
/// refuse fsync on a directory; that is not an error of the write.
pub fn sync_parent(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn replaces_a_regular_file_whole_with_the_mode_given() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.bin");
        std::fs::write(&p, b"old").unwrap();
        write(&p, b"new content", PRIVATE_MODE).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new content");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        write(&p, b"x", PUBLIC_MODE).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o644);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn an_uncommitted_write_leaves_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keep.txt");
        std::fs::write(&p, b"old").unwrap();
        let mut f = AtomicFile::create(&p, PUBLIC_MODE).unwrap();
        f.write_all(b"half").unwrap();
        drop(f);
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_fifo_is_written_in_place_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || {
                let mut s = Vec::new();
                File::open(&fifo).unwrap().read_to_end(&mut s).unwrap();
                s
            })
        };
        write(&fifo, b"through the pipe", PUBLIC_MODE).unwrap();
        assert_eq!(reader.join().unwrap(), b"through the pipe");
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO is still a FIFO");
    }

    #[test]
    fn a_directory_or_a_missing_parent_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let e = write(dir.path(), b"x", PUBLIC_MODE).unwrap_err();
        assert!(e.to_string().contains(&dir.path().display().to_string()), "{e}");
        let missing = dir.path().join("no/such/dir/file");
        let e = write(&missing, b"x", PUBLIC_MODE).unwrap_err();
        assert!(e.to_string().contains("no/such/dir"), "{e}");
    }
}
