//! `vmkeep copy`: copies a disk (a Filesystem PVC's `disk.img`, or a Block device) into another
//! sparsely (runs of zeros are skipped, not written) and computes the sha256 of the source's
//! raw content on the way. The target is at least as large as the source: a larger target (a
//! clone grown by the Template's `size`) keeps its extra bytes as zeros.
//!
//! The termination message is `Copied: sha256:<hex> <bytes> bytes in <seconds> s`
//! ([`parse_result`]), or `CopyFailed: <why>`.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::Instant,
};

use ring::digest::{Context, SHA256};

use crate::launcher::disk::DISK_IMG;

/// The copy buffer: a run of zeros this long (aligned) is skipped in the target.
const CHUNK: usize = 1 << 20;
const MIB: u64 = 1 << 20;

/// The file a disk path names: a block device as it is, a folder's `disk.img`.
pub fn disk_file(path: &Path) -> PathBuf {
    match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_block_device() => path.to_owned(),
        _ => path.join(DISK_IMG),
    }
}

/// What a copy did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Copied {
    /// `sha256:<hex>` of the source's raw content.
    pub digest: String,
    /// Bytes of the source.
    pub bytes: u64,
}

/// The digest recorded for a copy of a blank image that holds no `disk.img` yet: nothing to copy
/// (the launcher creates the clone's blank disk).
pub const NOTHING: &str = "none";
/// The digest recorded for a clone that already held its `disk.img` (copied before and its
/// record lost, or written by its guest): kept as it is, never copied over.
pub const KEPT: &str = "kept";

/// What a copy did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The source was copied.
    Copied(Copied),
    /// A blank source without `disk.img`: nothing to copy.
    Nothing,
    /// The target already held `disk.img`: kept.
    Kept,
}

impl Outcome {
    /// What the controller records as the clone's digest: `sha256:<hex>`, [`NOTHING`] or [`KEPT`].
    pub fn digest(&self) -> &str {
        match self {
            Outcome::Copied(c) => &c.digest,
            Outcome::Nothing => NOTHING,
            Outcome::Kept => KEPT,
        }
    }
}

/// Whether a recorded digest is a real one (not [`NOTHING`] or [`KEPT`]).
pub fn is_sha256(digest: &str) -> bool {
    digest.starts_with("sha256:")
}

/// Copies `source` into `target` (see the module). With `allow_missing` (a blank image), a
/// source folder without `disk.img` copies nothing: `Ok(None)`. A file target is written as
/// `disk.img.partial` and renamed when complete, at least `capacity` bytes (rounded down to
/// 1 MiB: a clone grown by the Template keeps its size); a target that already holds `disk.img`
/// is never overwritten (it was copied before, or a guest wrote it): [`Outcome::Kept`]. Errors
/// name the file and the step.
pub fn copy(source: &Path, target: &Path, allow_missing: bool, capacity: u64) -> Result<Outcome, String> {
    let source_file = disk_file(source);
    let target_file = disk_file(target);
    if target.is_dir() && target_file.exists() {
        return Ok(Outcome::Kept);
    }
    if allow_missing && source.is_dir() && !source_file.exists() {
        return Ok(Outcome::Nothing);
    }
    let mut from =
        File::open(&source_file).map_err(|e| format!("cannot open the source {}: {e}", source_file.display()))?;
    let bytes = from
        .seek(SeekFrom::End(0))
        .and_then(|n| from.seek(SeekFrom::Start(0)).map(|_| n))
        .map_err(|e| e.to_string())?;
    let block = std::fs::metadata(&target_file).is_ok_and(|m| m.file_type().is_block_device());
    let written = if block { target_file.clone() } else { target_file.with_extension("img.partial") };
    let mut to = OpenOptions::new()
        .write(true)
        .create(!block)
        .truncate(!block)
        .mode(0o660)
        .open(&written)
        .map_err(|e| format!("cannot open the target {}: {e}", written.display()))?;
    if block {
        let target_len = to.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
        if target_len < bytes {
            return Err(format!("the target device has {target_len} bytes, the source {bytes}"));
        }
    } else {
        // A sparse file: holes read as zeros, so only data is written.
        to.set_len(bytes.max(capacity / MIB * MIB)).map_err(|e| format!("sizing the target: {e}"))?;
    }
    let mut hasher = Context::new(&SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    loop {
        let n = read_full(&mut from, &mut buf).map_err(|e| format!("reading the source at {offset}: {e}"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        // A file target starts as holes; a device must get its zeros written.
        if block || buf[..n].iter().any(|b| *b != 0) {
            to.seek(SeekFrom::Start(offset))
                .and_then(|_| to.write_all(&buf[..n]))
                .map_err(|e| format!("writing the target at {offset}: {e}"))?;
        }
        offset += n as u64;
    }
    to.sync_all().map_err(|e| format!("flushing the target: {e}"))?;
    if !block {
        std::fs::rename(&written, &target_file).map_err(|e| format!("renaming {}: {e}", written.display()))?;
        if let Some(dir) = target_file.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("flushing {}: {e}", dir.display()))?;
        }
    }
    Ok(Outcome::Copied(Copied { digest: sha256_name(hasher.finish().as_ref()), bytes: offset }))
}

/// `sha256:<hex>` of a SHA-256 digest.
pub fn sha256_name(digest: &[u8]) -> String {
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Runs a copy as a copier Pod's container: writes the termination message; returns the exit
/// code (0 copied, 1 failed).
pub fn run(source: &Path, target: &Path, allow_missing: bool, capacity: u64, termination_log: &Path) -> i32 {
    let started = Instant::now();
    let (code, message) = match copy(source, target, allow_missing, capacity) {
        Ok(Outcome::Nothing) => {
            tracing::info!("the blank source holds no disk.img: nothing to copy");
            (0, format!("Copied: {NOTHING} 0 bytes (a blank image that holds no disk.img yet)"))
        }
        Ok(Outcome::Kept) => {
            tracing::warn!("the clone already holds disk.img: kept as it is, not copied over");
            (0, format!("Copied: {KEPT} 0 bytes (the clone already held its disk.img: kept, not copied over)"))
        }
        Ok(Outcome::Copied(c)) => {
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(digest = %c.digest, bytes = c.bytes, secs, "copied");
            (0, format!("Copied: {} {} bytes in {secs:.1} s", c.digest, c.bytes))
        }
        Err(e) => {
            tracing::error!("copy failed: {e}");
            (1, format!("CopyFailed: {e}"))
        }
    };
    if let Err(e) = std::fs::write(termination_log, format!("{message}\n")) {
        tracing::warn!("cannot write the termination message: {e}");
    }
    code
}

/// Reads a copier's termination message: `Ok(digest)` for a copy, `Err(why)` for a failure,
/// `None` for anything else.
pub fn parse_result(message: &str) -> Option<Result<String, String>> {
    if let Some(rest) = message.trim().strip_prefix("Copied: ") {
        let digest = rest.split_whitespace().next().filter(|d| is_sha256(d) || *d == NOTHING || *d == KEPT);
        return digest.map(|d| Ok(d.to_owned()));
    }
    message.trim().strip_prefix("CopyFailed: ").map(|why| Err(why.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_sparse_keeps_the_content_and_reports_its_digest() {
        let dir = std::env::temp_dir().join(format!("vmkeep-copy-test-{}", std::process::id()));
        let (src, dst) = (dir.join("src"), dir.join("dst"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        let mut content = vec![0u8; 3 * CHUNK + 5];
        content[10..14].copy_from_slice(b"boot");
        content[2 * CHUNK + 7] = 1;
        std::fs::write(src.join(DISK_IMG), &content).unwrap();
        // A clone grown by the Template is as large as its capacity.
        let Outcome::Copied(copied) = copy(&src, &dst, false, 4 * CHUNK as u64 + 7).unwrap() else {
            panic!("not copied")
        };
        assert_eq!(copied.bytes, content.len() as u64);
        assert_eq!(copied.digest, sha256_name(ring::digest::digest(&SHA256, &content).as_ref()));
        let out = std::fs::read(dst.join(DISK_IMG)).unwrap();
        assert_eq!(out.len(), 4 * CHUNK);
        assert_eq!(&out[..content.len()], &content[..]);
        assert!(out[content.len()..].iter().all(|b| *b == 0));
        assert!(!dst.join("disk.img.partial").exists());
        // Sparse: the all-zero chunk between was not written.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(dst.join(DISK_IMG)).unwrap().blocks() * 512 < 3 * CHUNK as u64);
        // Never over a disk that is there: kept.
        std::fs::write(dst.join(DISK_IMG), b"the guest wrote this").unwrap();
        assert_eq!(copy(&src, &dst, false, 0), Ok(Outcome::Kept));
        assert_eq!(std::fs::read(dst.join(DISK_IMG)).unwrap(), b"the guest wrote this");
        std::fs::remove_file(dst.join(DISK_IMG)).unwrap();
        assert_eq!(parse_result(&format!("Copied: {} 1 bytes in 0.1 s\n", copied.digest)), Some(Ok(copied.digest)));
        assert_eq!(parse_result("CopyFailed: no source"), Some(Err("no source".into())));
        assert!(copy(&dir.join("absent"), &dst, false, 0).unwrap_err().contains("cannot open the source"));
        // A blank image never written holds no disk.img: nothing to copy, when that is allowed.
        let blank = dir.join("blank");
        std::fs::create_dir_all(&blank).unwrap();
        assert_eq!(copy(&blank, &dst, true, 0), Ok(Outcome::Nothing));
        assert!(copy(&blank, &dst, false, 0).unwrap_err().contains("cannot open the source"));
        assert_eq!(parse_result("Copied: none 0 bytes (a blank image)"), Some(Ok(NOTHING.into())));
    }
}
