//! Writing a restored database file around the page cache.
//!
//! A restore writes a whole database file once and syncs it. Through the page cache every
//! byte is first copied into newly allocated cache pages (on a virtual machine whose free
//! memory the host has taken back, each first touch of a page costs a fault in the host
//! too) and then written out by the final `fsync`. Linux's `O_DIRECT` (open(2)) sends the
//! data from our own buffers straight to the device instead, while the stream is decoded:
//! one thread fills a buffer as another writes the one before it.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

/// Bytes per direct write: a multiple of every logical block size (512 or 4096).
const BLOCK: usize = 1 << 20;
/// The alignment `O_DIRECT` asks of buffers, lengths and offsets (at most the page size).
const ALIGN: usize = 4096;
/// Buffers in flight: one filling, one writing, one spare.
const BUFFERS: usize = 3;

/// A zeroed buffer at an [`ALIGN`]-aligned address, as `O_DIRECT` needs (found inside a
/// larger vector, so no unsafe allocation is needed). Grown, never shrunk: a thread keeps
/// one and reuses it.
#[derive(Default)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let mut b = AlignedBuf::default();
        b.reserve(len);
        b
    }

    /// Makes the buffer at least `len` bytes long, padding included (its contents are
    /// then lost).
    pub fn reserve(&mut self, len: usize) {
        let len = len.div_ceil(ALIGN) * ALIGN;
        if self.raw.len() < len + ALIGN {
            self.raw = vec![0u8; len + ALIGN];
            self.start = self.raw.as_ptr().align_offset(ALIGN).min(ALIGN);
        }
    }

    /// The whole aligned buffer.
    pub fn block(&mut self) -> &mut [u8] {
        let start = self.start;
        self.raw.get_mut(start..).unwrap_or_default()
    }
}

/// Opens a new file for writing (mode 0600; `AlreadyExists` if there is one), with
/// `O_DIRECT` when `direct` (Linux).
fn create_new(path: &Path, direct: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true).mode(0o600);
    #[cfg(target_os = "linux")]
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = direct;
    opts.open(path)
}

/// Creates the file `path` (it must not exist; mode 0600) holding the first `len` bytes of
/// `buf`, written with `O_DIRECT` where the file system allows it (`buf` must have room to
/// pad `len` to [`ALIGN`]: [`AlignedBuf::reserve`]`(len)`), else through the page cache.
/// Not synced: the caller syncs the file system once for many files.
///
/// # Errors
/// The file exists or cannot be written (a partly written file is removed).
pub fn write_new_file(path: &Path, buf: &mut AlignedBuf, len: usize) -> io::Result<()> {
    let padded = len.div_ceil(ALIGN) * ALIGN;
    let block = buf.block();
    block
        .get_mut(len..padded)
        .ok_or_else(|| io::Error::other("the aligned buffer is too short"))?
        .fill(0);
    let block: &[u8] = block;
    #[cfg(target_os = "linux")]
    {
        match create_new(path, true) {
            Ok(mut f) => {
                let written = f
                    .write_all(block.get(..padded).unwrap_or_default())
                    .and_then(|()| f.set_len(len as u64));
                drop(f);
                match written {
                    Ok(()) => return Ok(()),
                    // Direct I/O refused at the first write: the page cache, below.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        std::fs::remove_file(path)?;
                    }
                    Err(e) => {
                        let _ = std::fs::remove_file(path);
                        return Err(e);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(e),
            Err(_) => {}
        }
    }
    let written =
        create_new(path, false).and_then(|mut f| f.write_all(block.get(..len).unwrap_or_default()));
    if let Err(e) = written {
        if e.kind() != io::ErrorKind::AlreadyExists {
            let _ = std::fs::remove_file(path);
        }
        return Err(e);
    }
    Ok(())
}

/// A new file written with `O_DIRECT` from a thread of its own, or, where the file system
/// refuses direct I/O (tmpfs, some network file systems), through the page cache.
pub(crate) enum RestoreFile {
    Direct(DirectWriter),
    Buffered(io::BufWriter<File>),
}

impl RestoreFile {
    /// Creates `path` (mode 0600; it must not exist).
    ///
    /// # Errors
    /// The file cannot be created.
    pub fn create(path: &Path) -> io::Result<RestoreFile> {
        #[cfg(target_os = "linux")]
        {
            match create_new(path, true) {
                // A file system may accept the flag and refuse the writes: one aligned
                // block written at the start tells (the stream overwrites it).
                Ok(f) => {
                    let mut probe = AlignedBuf::new(ALIGN);
                    let ok = std::os::unix::fs::FileExt::write_all_at(
                        &f,
                        probe.block().get(..ALIGN).unwrap_or_default(),
                        0,
                    );
                    if ok.is_ok() {
                        return Ok(RestoreFile::Direct(DirectWriter::start(f)));
                    }
                    drop(f);
                    std::fs::remove_file(path)?;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(e),
                Err(_) => {}
            }
        }
        Ok(RestoreFile::Buffered(io::BufWriter::with_capacity(
            BLOCK,
            create_new(path, false)?,
        )))
    }

    /// Writes what is left and returns the file, exactly as long as what was written (not
    /// yet synced).
    ///
    /// # Errors
    /// A write failed.
    pub fn finish(self) -> io::Result<File> {
        match self {
            RestoreFile::Direct(d) => d.finish(),
            RestoreFile::Buffered(b) => b.into_inner().map_err(io::IntoInnerError::into_error),
        }
    }
}

impl Write for RestoreFile {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            RestoreFile::Direct(d) => d.write(b),
            RestoreFile::Buffered(w) => w.write(b),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Fills aligned blocks and hands each, full, to the writing thread.
pub(crate) struct DirectWriter {
    cur: AlignedBuf,
    filled: usize,
    written: u64,
    to_disk: Option<SyncSender<(AlignedBuf, usize)>>,
    free: Receiver<AlignedBuf>,
    writer: Option<JoinHandle<io::Result<File>>>,
}

impl DirectWriter {
    fn start(file: File) -> DirectWriter {
        let (to_disk, queued) = sync_channel::<(AlignedBuf, usize)>(BUFFERS);
        let (give_back, free) = sync_channel::<AlignedBuf>(BUFFERS);
        for _ in 1..BUFFERS {
            let _ = give_back.send(AlignedBuf::new(BLOCK));
        }
        let writer = std::thread::spawn(move || {
            let mut file = file;
            for (mut buf, len) in queued {
                file.write_all(buf.block().get(..len).unwrap_or_default())?;
                // The reader may have stopped; the buffer is then dropped.
                let _ = give_back.send(buf);
            }
            Ok(file)
        });
        DirectWriter {
            cur: AlignedBuf::new(BLOCK),
            filled: 0,
            written: 0,
            to_disk: Some(to_disk),
            free,
            writer: Some(writer),
        }
    }

    /// Queues the current block (`len` bytes of it, a multiple of [`ALIGN`]) and takes a
    /// free one.
    fn send(&mut self, len: usize) -> io::Result<()> {
        let next = self.free.recv().map_err(|_| self.stopped())?;
        let full = std::mem::replace(&mut self.cur, next);
        self.to_disk
            .as_ref()
            .ok_or_else(|| io::Error::other("the restore file is closed"))?
            .send((full, len))
            .map_err(|_| self.stopped())?;
        self.filled = 0;
        Ok(())
    }

    /// The writing thread's error, once it stopped.
    fn stopped(&mut self) -> io::Error {
        self.to_disk = None;
        match self.writer.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => e,
            _ => io::Error::other("the restore file's writer stopped"),
        }
    }

    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = b.len().min(BLOCK - self.filled);
        self.cur
            .block()
            .get_mut(self.filled..self.filled + n)
            .unwrap_or_default()
            .copy_from_slice(b.get(..n).unwrap_or_default());
        self.filled += n;
        self.written += n as u64;
        if self.filled == BLOCK {
            self.send(BLOCK)?;
        }
        Ok(n)
    }

    fn finish(mut self) -> io::Result<File> {
        // The last block is padded to the alignment with zeros, and the file cut back to
        // the length written.
        let tail = self.filled;
        let padded = tail.div_ceil(ALIGN) * ALIGN;
        if tail > 0 {
            self.cur
                .block()
                .get_mut(tail..padded)
                .unwrap_or_default()
                .fill(0);
            self.send(padded)?;
        }
        self.to_disk = None;
        let file = match self.writer.take().map(JoinHandle::join) {
            Some(Ok(r)) => r?,
            _ => return Err(io::Error::other("the restore file's writer stopped")),
        };
        // Also undoes the probe's block when less than it was written.
        file.set_len(self.written)?;
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_file_holds_exactly_what_was_written_in_any_pieces() {
        let dir = tempfile::tempdir().unwrap();
        for (n, len) in [0usize, 1, 4095, 4096, BLOCK, 3 * BLOCK + 777]
            .into_iter()
            .enumerate()
        {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
            let path = dir.path().join(format!("f{n}"));
            let mut f = RestoreFile::create(&path).unwrap();
            for piece in data.chunks(1000 + n * 4096) {
                f.write_all(piece).unwrap();
            }
            f.finish().unwrap().sync_all().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), data, "{len} bytes");
            assert!(
                RestoreFile::create(&path).is_err(),
                "an existing file is kept"
            );
        }
    }

    #[test]
    fn a_new_file_holds_exactly_its_bytes_and_never_replaces_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut buf = AlignedBuf::default();
        for len in [0usize, 1, 4095, 4096, 4097, 300_000] {
            buf.reserve(len);
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            buf.block()[..len].copy_from_slice(&data);
            // Garbage after the end must not reach the file.
            if let Some(after) = buf.block().get_mut(len..len + 10) {
                after.fill(0xEE);
            }
            let path = dir.path().join(format!("c{len}"));
            write_new_file(&path, &mut buf, len).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), data, "{len} bytes");
            let e = write_new_file(&path, &mut buf, len).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
            assert_eq!(std::fs::read(&path).unwrap(), data, "{len} bytes kept");
        }
    }
}
