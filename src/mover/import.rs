//! `vmkeep import`: downloads a disk image over HTTP(S) into a PVC, as an importer Pod's
//! container.
//!
//! The file is fetched with `GET` (User-Agent `vmkeep-import`, plus one header per file of a
//! mounted Secret, see [`ImportArgs::headers_dir`]) and streamed, without a temporary copy for
//! raw images, through:
//!
//! 1. a SHA-256 of the *downloaded* bytes (the file as served, compressed or not): checked
//!    against [`ImportArgs::sha256`] when given;
//! 2. decompression chosen by the file's magic bytes: gzip (`1f 8b`, concatenated members too),
//!    xz (`FD 37 7A 58 5A 00`, concatenated streams too, with a decoder memory limit of 256 MiB:
//!    a file made with a larger dictionary is refused as `UnsupportedFormat`), else none;
//! 3. the format step: a raw image is written sparsely (all-zero 1 MiB chunks are skipped) to
//!    `<target>/disk.img.partial`, then renamed to `disk.img`; a qcow2 image is saved to
//!    `<scratch>/download.qcow2` and converted to raw by `qemu-img convert`. A block-device
//!    target is written in place. The reported digest is the SHA-256 of the disk as written
//!    (its raw content and the zeros up to its size: what a copy of it reports); of the raw content
//!    on a block device.
//!
//! A file target is `max(raw bytes, capacity rounded down to 1 MiB)` long (the extra bytes are
//! zeros, as holes). A raw image larger than the PVC (or the device) fails `TooSmall` as soon as
//! it is known: before the download when the server tells the (uncompressed) length, else as soon
//! as the stream passes the PVC's size (reading stops there: an endless stream cannot hold the
//! importer). A probe that must count the (decompressed) stream stops after 1 TiB. A mismatching
//! format (a qcow2 file declared raw, a raw file declared qcow2, VMDK / VHD / VHDX / VDI images)
//! is refused, and so is a qcow2 image with a backing or external data file (it could read files
//! of the importer Pod).
//!
//! Redirects (301, 302, 303, 307, 308; at most 10) are followed by the importer itself, not by
//! the HTTP client: the headers of [`ImportArgs::headers_dir`] are sent only to the origin
//! (scheme, host and port) of [`ImportArgs::url`], never to another one a redirect leads to, and
//! a redirect from `https` to `http` is refused. A resumed request goes to the URL the redirects
//! led to (and starts from the original URL again if that one answers HTTP 4xx).
//!
//! Network trouble never fails an import: a connection error, a timeout (connect 10 s, 30 s
//! per read), an error mid-body, HTTP 5xx and HTTP 429 are retried for ever with a back-off of
//! 1 s, 2 s, 4 s ... 30 s. A body cut short resumes with `Range: bytes=<offset>-` and
//! `If-Range: <validator>` (the first response's strong `ETag`, else its `Last-Modified`),
//! transparently to the hasher and the decompressor: a `206` goes on at the offset; a `200` to
//! it (the file changed, or a server that ignores ranges) is spliced only when it carries the
//! first response's strong `ETag` (its first `<offset>` bytes are then dropped). Otherwise (no
//! validator, or a changed file) the bytes already streamed cannot be trusted: the import ends
//! as `Retrying` (below) and the next container starts over from byte 0. HTTP 4xx other than
//! 429 is terminal.
//!
//! Every 2 s (and at the end of the download) one line [`PROGRESS_PREFIX`]`{"downloaded":N,
//! "total":N|null,"retries":N,"lastError":"..."|null}` goes to stdout ([`parse_progress`]);
//! `total` is the whole file's length when the server tells it.
//!
//! The termination message is one line ([`parse_result`]):
//! - `Imported: sha256:<hex> <raw bytes> bytes (downloaded <n> bytes, <r> retries, <s> s)`;
//! - `Size: <bytes>` for a probe ([`ImportArgs::probe`]): the bytes the PVC must hold;
//! - `<Reason>: <message>` with a reason among `ImportFailed` (HTTP 4xx, I/O, qemu-img, bad
//!   arguments, a missing or empty Secret or ConfigMap), `ChecksumMismatch`,
//!   `UnsupportedFormat` and `TooSmall` (the PVC cannot hold the image: the message names the
//!   `spec.size` to set);
//! - `Retrying: <why>` for a failure that is not terminal (the import must start over):
//!   [`parse_result`] reads it as `None`, [`parse_retrying`] as its why.
//!
//! Exit codes ([`run`]): 0 for every terminal outcome (imported, probed, or one of the four
//! failure reasons: the Pod, `restartPolicy: OnFailure`, ends `Succeeded` and its termination
//! message tells the outcome), 1 for `Retrying` (the kubelet restarts the container, with its
//! crash back-off).
//!
//! URLs in messages and logs lose their query string and user info (presigned URLs carry
//! secrets there); header values are never logged.

use std::{
    ffi::OsStr,
    fmt,
    fs::{File, OpenOptions},
    io::{self, BufReader, Cursor, Read, Seek, SeekFrom, Write},
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};

use crate::launcher::disk::DISK_IMG;
use crate::mover::copy::{disk_file, sha256_name};

/// Write (and zero-detection) granularity: an all-zero chunk of a raw image is not written.
const CHUNK: usize = 1 << 20;
const MIB: u64 = 1 << 20;
/// The bytes of the decompressed stream read to recognise its format.
const HEAD: usize = 4096;
/// The system CA bundle trusted, when present, besides [`ImportArgs::ca_dir`].
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The qcow2 download in [`ImportArgs::scratch`].
const SCRATCH_FILE: &str = "download.qcow2";
/// Termination messages are capped at 4 KiB by Kubernetes.
const MAX_MESSAGE: usize = 3000;
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
const QCOW2_MAGIC: &[u8] = b"QFI\xfb";
/// The memory the xz decoder may use (the Pod's limit is 512 MiB).
const XZ_MEMLIMIT: u64 = 256 * MIB;
/// Redirects followed, at most, per request.
const MAX_REDIRECTS: u32 = 10;

/// The start of a progress line on stdout; compact JSON follows ([`Progress`]).
pub const PROGRESS_PREFIX: &str = "vmkeep-import-progress ";

/// The format of the (decompressed) image served: the Image's `source.http.format`.
pub use crate::api::image::DiskFormat as Format;

/// What to import, and where.
#[derive(Clone, Debug, Default)]
pub struct ImportArgs {
    /// The `http://` or `https://` URL of the image.
    pub url: String,
    /// A mounted folder (writes `disk.img`) or a block device, as in copy.rs `disk_file`.
    pub target: PathBuf,
    /// The format of the image once decompressed.
    pub format: Format,
    /// The expected SHA-256 (64 hex digits, any case, an optional `sha256:` before them) of
    /// the DOWNLOADED bytes: the file as served, compressed if it is.
    pub sha256: Option<String>,
    /// Bytes of the target PVC; 0 = unknown.
    pub capacity: u64,
    /// A writable folder (an emptyDir) for qcow2 downloads.
    pub scratch: PathBuf,
    /// A mounted Secret: each regular file is one HTTP header (the file name is the header's
    /// name, its trimmed content the value). Dotfiles and the `..data` links are skipped. The
    /// headers are sent to the URL's origin only, not to another one a redirect leads to. A
    /// missing or empty folder (the optional Secret is missing, or empty) fails the import.
    pub headers_dir: Option<PathBuf>,
    /// A mounted ConfigMap: every regular file is a PEM bundle of CA certificates trusted in
    /// addition to the system bundle `/etc/ssl/certs/ca-certificates.crt` (when present). A
    /// missing or empty folder (the optional ConfigMap is missing, or empty) fails the import.
    pub ca_dir: Option<PathBuf>,
    /// Only find the size the PVC must have (`Size: <bytes>`), writing nothing: a qcow2
    /// image's virtual size from its header, an uncompressed raw image's `Content-Length`,
    /// else the count of all decompressed bytes (a stream of more than 1 TiB fails).
    pub probe: bool,
}

/// An importer's result, read back from its termination message by [`parse_result`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImportResult {
    /// The image is in place.
    Imported {
        /// `sha256:<hex>` of the raw content.
        digest: String,
        /// Bytes of the raw content.
        bytes: u64,
        /// Connections retried (after server or network errors).
        retries: u32,
    },
    /// A probe's answer: the bytes the PVC must hold.
    Size(u64),
    /// A terminal failure (a `Retrying: <why>` message is none: [`parse_retrying`]).
    Failed {
        /// `ImportFailed`, `ChecksumMismatch`, `UnsupportedFormat` or `TooSmall`.
        reason: String,
        /// Why, for a person.
        message: String,
    },
}

/// The reasons of a failed import, as in the termination message.
const REASONS: [&str; 4] = ["ImportFailed", "ChecksumMismatch", "UnsupportedFormat", "TooSmall"];

/// Reads an importer's termination message: `None` when it is none of the shapes of the
/// module's documentation.
pub fn parse_result(message: &str) -> Option<ImportResult> {
    let message = message.trim();
    if let Some(rest) = message.strip_prefix("Imported: ") {
        let mut words = rest.split_whitespace();
        let digest = words.next().filter(|d| d.starts_with("sha256:"))?;
        let bytes = words.next()?.parse().ok()?;
        // `(downloaded <n> bytes, <r> retries, <s> s)`
        let retries = rest.split(", ").find_map(|part| part.strip_suffix(" retries")?.parse().ok()).unwrap_or(0);
        return Some(ImportResult::Imported { digest: digest.to_owned(), bytes, retries });
    }
    if let Some(rest) = message.strip_prefix("Size: ") {
        return rest.split_whitespace().next()?.parse().ok().map(ImportResult::Size);
    }
    let (reason, why) = message.split_once(": ")?;
    REASONS.contains(&reason).then(|| ImportResult::Failed { reason: reason.to_owned(), message: why.to_owned() })
}

/// The why of a `Retrying: <why>` termination message (a non-terminal failure: the container
/// exited 1 and is restarted); `None` for any other message.
pub fn parse_retrying(message: &str) -> Option<&str> {
    message.trim().strip_prefix("Retrying: ")
}

/// A download's progress, as printed every 2 s on stdout after [`PROGRESS_PREFIX`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Progress {
    /// Bytes of the file received (as served: compressed if it is).
    pub downloaded: u64,
    /// The file's length, when the server tells it.
    pub total: Option<u64>,
    /// Connections retried so far.
    pub retries: u32,
    /// Why the last retry was made.
    pub last_error: Option<String>,
}

impl Progress {
    /// The percentage downloaded (0..=100) when the total is known.
    pub fn percent(&self) -> Option<u8> {
        let total = self.total?;
        if total == 0 {
            return Some(100);
        }
        Some((u128::from(self.downloaded) * 100 / u128::from(total)).min(100) as u8)
    }
}

impl fmt::Display for Progress {
    /// `42%`, or `123 MiB` when the total is unknown (the retries are shown apart, in
    /// `status.importRetries`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.percent() {
            Some(p) => write!(f, "{p}%"),
            None => write!(f, "{} MiB", self.downloaded / MIB),
        }
    }
}

/// The LAST progress line in a chunk of log text (lines may carry a prefix, such as the
/// timestamps of `kubectl logs --timestamps`); `None` when there is none.
pub fn parse_progress(log: &str) -> Option<Progress> {
    log.lines().rev().find_map(|line| {
        let at = line.find(PROGRESS_PREFIX)?;
        serde_json::from_str(line[at + PROGRESS_PREFIX.len()..].trim()).ok()
    })
}

/// Knobs of an import that tests shorten.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    /// The first back-off; it doubles on each consecutive failure, up to `backoff_max`.
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) connect_timeout: Duration,
    /// A read (or the wait for the response's headers) that takes longer fails, and is retried.
    pub(crate) read_timeout: Duration,
    pub(crate) progress_every: Duration,
    pub(crate) system_ca_bundle: PathBuf,
    /// A probe that counts the decompressed stream fails past this many bytes.
    pub(crate) probe_max: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            progress_every: Duration::from_secs(2),
            system_ca_bundle: PathBuf::from(SYSTEM_CA_BUNDLE),
            probe_max: 1 << 40,
        }
    }
}

/// Runs an import as an importer Pod's container: writes the termination message; returns the
/// exit code: 0 for a terminal outcome (imported, probed, or a terminal failure), 1 for a
/// failure that is not terminal (`Retrying: <why>`: the container is to be run again).
pub fn run(args: &ImportArgs, termination_log: &Path) -> i32 {
    run_with(args, termination_log, &Config::default())
}

pub(crate) fn run_with(args: &ImportArgs, termination_log: &Path, config: &Config) -> i32 {
    let started = Instant::now();
    let (code, message) = match import(args, config) {
        Ok(Done::Size(bytes)) => {
            tracing::info!(bytes, "probed");
            (0, format!("Size: {bytes}"))
        }
        Ok(Done::Kept { digest, bytes }) => {
            tracing::warn!(digest, "the target already holds disk.img: kept, not downloaded again");
            (
                0,
                format!(
                    "Imported: {digest} {bytes} bytes (already imported: {DISK_IMG} was there, not downloaded again)"
                ),
            )
        }
        Ok(Done::Imported { digest, bytes, downloaded, retries }) => {
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(digest, bytes, downloaded, retries, secs, "imported");
            (
                0,
                format!(
                    "Imported: {digest} {bytes} bytes (downloaded {downloaded} bytes, {retries} retries, {secs:.1} s)"
                ),
            )
        }
        Err(failure) if failure.reason == Reason::Retrying => {
            tracing::warn!("import interrupted, to be run again: {failure}");
            (1, failure.to_string())
        }
        Err(failure) => {
            tracing::error!("import failed: {failure}");
            (0, failure.to_string())
        }
    };
    if let Err(e) = std::fs::write(termination_log, format!("{}\n", one_line(&message, MAX_MESSAGE))) {
        tracing::warn!("cannot write the termination message to {}: {e}", termination_log.display());
    }
    code
}

/// What an import did.
enum Done {
    Imported {
        digest: String,
        bytes: u64,
        downloaded: u64,
        retries: u32,
    },
    /// The target already held `disk.img`.
    Kept {
        digest: String,
        bytes: u64,
    },
    Size(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    ImportFailed,
    ChecksumMismatch,
    UnsupportedFormat,
    TooSmall,
    /// Not terminal: the import must start over (the container exits 1 and is run again).
    Retrying,
}

/// A failure: `<Reason>: <message>`, terminal unless [`Reason::Retrying`].
#[derive(Debug)]
struct Failure {
    reason: Reason,
    message: String,
}

impl Failure {
    fn new(reason: Reason, message: impl Into<String>) -> Self {
        Failure { reason, message: message.into() }
    }

    fn failed(message: impl Into<String>) -> Self {
        Failure::new(Reason::ImportFailed, message)
    }

    /// `Retrying: <why>; starting over`.
    fn starting_over(why: impl fmt::Display) -> Self {
        Failure::new(Reason::Retrying, format!("{why}; starting over"))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.reason, self.message)
    }
}

impl std::error::Error for Failure {}

/// An I/O error of a step as a failure; a [`Failure`] raised by the download (a terminal HTTP
/// status on a reconnection) comes through the decompressors inside the error, and is kept. The
/// xz decoder's memory limit is an unsupported file.
fn from_io(e: io::Error, step: &str) -> Failure {
    if e.get_ref()
        .and_then(|inner| inner.downcast_ref::<liblzma::stream::Error>())
        .is_some_and(|lz| matches!(lz, liblzma::stream::Error::MemLimit))
    {
        return Failure::new(
            Reason::UnsupportedFormat,
            format!(
                "the xz file needs more than {} MiB to decompress (recompress it with a smaller dictionary, e.g. xz -6)",
                XZ_MEMLIMIT / MIB
            ),
        );
    }
    if e.get_ref().is_some_and(|inner| inner.is::<Failure>()) {
        return match e.into_inner().map(|inner| inner.downcast::<Failure>()) {
            Some(Ok(failure)) => *failure,
            _ => Failure::failed(format!("{step}: an error was lost")),
        };
    }
    Failure::failed(format!("{step}: {e}"))
}

fn import(args: &ImportArgs, config: &Config) -> Result<Done, Failure> {
    let expected = expected_sha256(args.sha256.as_deref())?;
    if args.probe {
        return probe(args, config, expected.as_deref());
    }
    let target_file = disk_file(&args.target);
    let block = is_block_device(&target_file);
    if !block {
        if !args.target.is_dir() {
            return Err(Failure::failed(format!(
                "the target {} is neither a folder nor a block device",
                args.target.display()
            )));
        }
        if target_file.exists() {
            let (digest, bytes) = hash_file(&target_file, None)?;
            return Ok(Done::Kept { digest, bytes });
        }
    }
    let mut download = Download::new(args, config)?;
    let (digest, bytes) = match args.format {
        Format::Raw => import_raw(args, &mut download, &target_file, block, expected.as_deref())?,
        Format::Qcow2 => import_qcow2(args, &mut download, &target_file, block, expected.as_deref())?,
    };
    Ok(Done::Imported { digest, bytes, downloaded: download.progress.downloaded, retries: download.progress.retries })
}

/// The expected digest as 64 lowercase hex digits; an empty one is none.
fn expected_sha256(given: Option<&str>) -> Result<Option<String>, Failure> {
    let Some(given) = given.map(str::trim).filter(|s| !s.is_empty()) else { return Ok(None) };
    let hex = given.strip_prefix("sha256:").unwrap_or(given).to_ascii_lowercase();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Failure::failed(format!("the expected sha256 {given:?} is not 64 hex digits")));
    }
    Ok(Some(hex))
}

fn check_sha256(expected: Option<&str>, downloaded: &str) -> Result<(), Failure> {
    match expected {
        Some(expected) if expected != downloaded => {
            Err(Failure::new(Reason::ChecksumMismatch, format!("expected {expected}, downloaded {downloaded}")))
        }
        _ => Ok(()),
    }
}

fn probe(args: &ImportArgs, config: &Config, expected: Option<&str>) -> Result<Done, Failure> {
    let mut download = Download::new(args, config)?;
    let (size, whole) = {
        let opened = open_stream(&mut download)?;
        let mut stream = opened.stream;
        let head = read_head(&mut stream)?;
        check_format(&head, args.format, opened.compression)?;
        if let Some(size) = qcow2_virtual_size(&head) {
            (size, false)
        } else if let (Compression::None, Some(total)) = (opened.compression, opened.total) {
            (total, false)
        } else {
            // Counted, up to a bound: an endless stream cannot hold the probe.
            let most = config.probe_max.saturating_sub(head.len() as u64).saturating_add(1);
            let rest = io::copy(&mut stream.by_ref().take(most), &mut io::sink())
                .map_err(|e| from_io(e, "reading the image"))?;
            let size = head.len() as u64 + rest;
            if size > config.probe_max {
                return Err(Failure::failed(format!(
                    "the stream is too large to probe: more than {} bytes (once decompressed): set spec.size",
                    config.probe_max
                )));
            }
            (size, true)
        }
    };
    if whole {
        // The whole file went through the hasher: check it.
        let downloaded = download.finish()?;
        check_sha256(expected, &downloaded)?;
    } else {
        download.print_progress();
    }
    Ok(Done::Size(size))
}

fn import_raw(
    args: &ImportArgs,
    download: &mut Download,
    target_file: &Path,
    block: bool,
    expected: Option<&str>,
) -> Result<(String, u64), Failure> {
    let whole_mib = args.capacity / MIB * MIB;
    let written = if block { target_file.to_owned() } else { target_file.with_extension("img.partial") };
    let mut guard = RemoveOnDrop(if block { None } else { Some(written.clone()) });
    let mut out = open_target(&written, block)?;
    let limit = if block {
        Some(out.seek(SeekFrom::End(0)).map_err(|e| Failure::failed(format!("sizing {}: {e}", written.display())))?)
    } else {
        Some(args.capacity).filter(|c| *c > 0)
    };
    let (bytes, mut raw_hasher) = {
        let opened = open_stream(download)?;
        let mut stream = opened.stream;
        let head = read_head(&mut stream)?;
        check_format(&head, Format::Raw, opened.compression)?;
        let known = opened.total.filter(|_| opened.compression == Compression::None);
        if let (Some(bytes), Some(limit)) = (known, limit)
            && bytes > limit
        {
            return Err(too_small(bytes, limit));
        }
        if !block {
            // A sparse file: holes read as zeros, so only data is written.
            out.set_len(known.unwrap_or(0).max(whole_mib))
                .map_err(|e| Failure::failed(format!("sizing {}: {e}", written.display())))?;
        }
        let mut stream = Cursor::new(head).chain(stream);
        let mut sparse = Sparse { file: &mut out, path: &written, block, offset: 0 };
        let mut hasher = Context::new(&SHA256);
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = fill(&mut stream, &mut buf).map_err(|e| from_io(e, "reading the image"))?;
            if n == 0 {
                break;
            }
            // Past the limit, stop at once: the stream may be endless (its size is unknown).
            if let Some(limit) = limit
                && sparse.offset + n as u64 > limit
            {
                return Err(Failure::new(
                    Reason::TooSmall,
                    format!("the image holds more than {limit} bytes (the PVC's size): set spec.size larger"),
                ));
            }
            hasher.update(&buf[..n]);
            sparse.write(&buf[..n])?;
        }
        (sparse.offset, hasher)
    };
    let downloaded = download.finish()?;
    check_sha256(expected, &downloaded)?;
    if !block {
        let len = bytes.max(whole_mib);
        out.set_len(len).map_err(|e| Failure::failed(format!("sizing {}: {e}", written.display())))?;
        // The digest is the disk's, as a copy of it computes it: the zeros up to its size too.
        let zeros = vec![0u8; CHUNK];
        let mut left = len - bytes;
        while left > 0 {
            let n = left.min(CHUNK as u64);
            raw_hasher.update(&zeros[..n as usize]);
            left -= n;
        }
    }
    out.sync_all().map_err(|e| Failure::failed(format!("flushing {}: {e}", written.display())))?;
    if !block {
        rename_into_place(&written, target_file)?;
        guard.0 = None;
    }
    Ok((sha256_name(raw_hasher.finish().as_ref()), bytes))
}

fn import_qcow2(
    args: &ImportArgs,
    download: &mut Download,
    target_file: &Path,
    block: bool,
    expected: Option<&str>,
) -> Result<(String, u64), Failure> {
    let scratch_file = args.scratch.join(SCRATCH_FILE);
    let _scratch_guard = RemoveOnDrop(Some(scratch_file.clone()));
    let device_len = if block { Some(device_len(target_file)?) } else { None };
    let limit = device_len.or(Some(args.capacity).filter(|c| *c > 0));
    {
        let mut out = open_target(&scratch_file, false)?;
        let opened = open_stream(download)?;
        let mut stream = opened.stream;
        let head = read_head(&mut stream)?;
        check_format(&head, Format::Qcow2, opened.compression)?;
        // The header tells the virtual size: no need to download a file that cannot fit.
        if let (Some(size), Some(limit)) = (qcow2_virtual_size(&head), limit)
            && size > limit
        {
            return Err(too_small(size, limit));
        }
        let mut stream = Cursor::new(head).chain(stream);
        let mut sparse = Sparse { file: &mut out, path: &scratch_file, block: false, offset: 0 };
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = fill(&mut stream, &mut buf).map_err(|e| from_io(e, "reading the image"))?;
            if n == 0 {
                break;
            }
            sparse.write(&buf[..n])?;
        }
        let len = sparse.offset;
        out.set_len(len).map_err(|e| Failure::failed(format!("sizing {}: {e}", scratch_file.display())))?;
    }
    let downloaded = download.finish()?;
    check_sha256(expected, &downloaded)?;
    let size = qcow2_info(&scratch_file)?;
    if let Some(limit) = limit
        && size > limit
    {
        return Err(too_small(size, limit));
    }
    tracing::info!(virtual_size = size, "converting the qcow2 image to raw");
    if block {
        // -n: onto the device as it is (it exists; nothing is created).
        convert(&scratch_file, target_file, &[OsStr::new("-n")])?;
        let (digest, _) = hash_file(target_file, Some(size))?;
        return Ok((digest, size));
    }
    let written = target_file.with_extension("img.partial");
    let mut guard = RemoveOnDrop(Some(written.clone()));
    let _ = std::fs::remove_file(&written);
    convert(&scratch_file, &written, &[])?;
    let out = OpenOptions::new()
        .write(true)
        .open(&written)
        .map_err(|e| Failure::failed(format!("cannot open {}: {e}", written.display())))?;
    let len = out.metadata().map_err(|e| Failure::failed(format!("reading {}: {e}", written.display())))?.len();
    let want = size.max(args.capacity / MIB * MIB);
    if len < want {
        out.set_len(want).map_err(|e| Failure::failed(format!("sizing {}: {e}", written.display())))?;
    }
    out.sync_all().map_err(|e| Failure::failed(format!("flushing {}: {e}", written.display())))?;
    // The whole disk, zeros up to its size included (what a copy of it computes).
    let (digest, _) = hash_file(&written, None)?;
    rename_into_place(&written, target_file)?;
    guard.0 = None;
    Ok((digest, size))
}

/// `the image holds N bytes, the PVC M bytes: set spec.size to at least X`.
fn too_small(bytes: u64, limit: u64) -> Failure {
    Failure::new(
        Reason::TooSmall,
        format!(
            "the image holds {bytes} bytes, the PVC {limit} bytes: set spec.size to at least {}",
            quantity_up(bytes)
        ),
    )
}

/// A Kubernetes quantity at least `bytes`: whole MiB (`1536Mi`), or GiB when exact (`1Gi`).
fn quantity_up(bytes: u64) -> String {
    let mib = bytes.div_ceil(MIB).max(1);
    if mib.is_multiple_of(1024) { format!("{}Gi", mib / 1024) } else { format!("{mib}Mi") }
}

fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

fn device_len(path: &Path) -> Result<u64, Failure> {
    File::open(path)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .map_err(|e| Failure::failed(format!("sizing the device {}: {e}", path.display())))
}

/// Opens a file to write (created and emptied), or a device as it is.
fn open_target(path: &Path, block: bool) -> Result<File, Failure> {
    OpenOptions::new()
        .write(true)
        .create(!block)
        .truncate(!block)
        .mode(0o660)
        .open(path)
        .map_err(|e| Failure::failed(format!("cannot open the target {}: {e}", path.display())))
}

/// Renames a finished file into place and flushes its folder.
fn rename_into_place(from: &Path, to: &Path) -> Result<(), Failure> {
    std::fs::rename(from, to).map_err(|e| Failure::failed(format!("renaming {}: {e}", from.display())))?;
    if let Some(dir) = to.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Failure::failed(format!("flushing {}: {e}", dir.display())))?;
    }
    Ok(())
}

/// Removes a file when dropped, unless emptied first.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take()
            && let Err(e) = std::fs::remove_file(&path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
    }
}

/// Writes consecutive chunks at their offsets, skipping all-zero ones in a (pre-sized) file.
struct Sparse<'a> {
    file: &'a mut File,
    path: &'a Path,
    block: bool,
    offset: u64,
}

impl Sparse<'_> {
    fn write(&mut self, data: &[u8]) -> Result<(), Failure> {
        if self.block || data.iter().any(|b| *b != 0) {
            let offset = self.offset;
            self.file
                .seek(SeekFrom::Start(offset))
                .and_then(|_| self.file.write_all(data))
                .map_err(|e| Failure::failed(format!("writing {} at {offset}: {e}", self.path.display())))?;
        }
        self.offset += data.len() as u64;
        Ok(())
    }
}

/// `sha256:<hex>` and length of a file's first `len` bytes (all of it with `None`).
fn hash_file(path: &Path, len: Option<u64>) -> Result<(String, u64), Failure> {
    let file = File::open(path).map_err(|e| Failure::failed(format!("cannot open {}: {e}", path.display())))?;
    let mut reader = file.take(len.unwrap_or(u64::MAX));
    let mut hasher = Context::new(&SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut bytes = 0u64;
    loop {
        let n = fill(&mut reader, &mut buf).map_err(|e| Failure::failed(format!("reading {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    if let Some(len) = len
        && bytes < len
    {
        return Err(Failure::failed(format!("{} holds {bytes} bytes, not {len}", path.display())));
    }
    Ok((sha256_name(hasher.finish().as_ref()), bytes))
}

/// Reads until `buf` is full or the end: the bytes read.
fn fill<R: Read + ?Sized>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The first [`HEAD`] bytes of the decompressed stream (fewer for a tiny image).
fn read_head<R: Read + ?Sized>(stream: &mut R) -> Result<Vec<u8>, Failure> {
    let mut head = vec![0u8; HEAD];
    let n = fill(stream, &mut head).map_err(|e| from_io(e, "reading the image"))?;
    head.truncate(n);
    Ok(head)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Xz,
}

/// The decompressed stream of a download.
struct Opened<'a> {
    stream: Box<dyn Read + 'a>,
    compression: Compression,
    /// The file's length, when the server told it.
    total: Option<u64>,
}

/// Starts a download and decompresses it as its magic bytes say.
fn open_stream<'a>(download: &'a mut Download) -> Result<Opened<'a>, Failure> {
    let mut magic = [0u8; 6];
    let n = fill(download, &mut magic).map_err(|e| from_io(e, "downloading"))?;
    let magic = magic[..n].to_vec();
    let compression = if magic.starts_with(GZIP_MAGIC) {
        Compression::Gzip
    } else if magic.starts_with(XZ_MAGIC) {
        Compression::Xz
    } else {
        Compression::None
    };
    let total = download.progress.total;
    let raw = Cursor::new(magic).chain(download);
    let stream: Box<dyn Read + 'a> = match compression {
        Compression::None => Box::new(raw),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(BufReader::with_capacity(1 << 16, raw))),
        Compression::Xz => {
            // A bounded decoder: a file with a huge dictionary fails (MemLimit) instead of the Pod.
            let decoder = liblzma::stream::Stream::new_stream_decoder(XZ_MEMLIMIT, liblzma::stream::CONCATENATED)
                .map_err(|e| Failure::failed(format!("starting the xz decoder: {e}")))?;
            Box::new(liblzma::bufread::XzDecoder::new_stream(BufReader::with_capacity(1 << 16, raw), decoder))
        }
    };
    Ok(Opened { stream, compression, total })
}

/// The virtual size of a qcow2 header (a big-endian u64 at byte 24).
fn qcow2_virtual_size(head: &[u8]) -> Option<u64> {
    let bytes = head.strip_prefix(QCOW2_MAGIC)?.get(20..28)?;
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// The name of an image format other than raw and qcow2 that the head shows.
fn foreign_format(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        Some("VMDK")
    } else if head.starts_with(b"vhdxfile") {
        Some("VHDX")
    } else if head.starts_with(b"conectix") {
        Some("VHD")
    } else if head.get(0x40..0x44) == Some(&[0x7f, 0x10, 0xda, 0xbe]) {
        Some("VDI")
    } else if head.starts_with(b"QFI") {
        Some("qcow (version 1)")
    } else {
        None
    }
}

fn check_format(head: &[u8], format: Format, compression: Compression) -> Result<(), Failure> {
    let after = match compression {
        Compression::None => "",
        Compression::Gzip => " (once gunzipped)",
        Compression::Xz => " (once unxz'd)",
    };
    let qcow2 = head.starts_with(QCOW2_MAGIC);
    if qcow2 && head.len() < 32 {
        return Err(Failure::new(Reason::UnsupportedFormat, format!("the file{after} is a truncated qcow2 image")));
    }
    let unsupported = |message: String| Err(Failure::new(Reason::UnsupportedFormat, message));
    match (qcow2, format) {
        (true, Format::Raw) => unsupported(format!("the file{after} is qcow2: set source.http.format: qcow2")),
        (true, Format::Qcow2) | (false, Format::Raw) => match foreign_format(head) {
            Some(name) if !qcow2 => {
                unsupported(format!("the file{after} is a {name} image: only raw and qcow2 images can be imported"))
            }
            _ => Ok(()),
        },
        (false, Format::Qcow2) => match foreign_format(head) {
            Some(name) => {
                unsupported(format!("the file{after} is a {name} image: only raw and qcow2 images can be imported"))
            }
            None => unsupported(format!(
                "the file{after} is not qcow2 (no QFI\\xfb magic): set source.http.format: raw for a raw image"
            )),
        },
    }
}

/// `qemu-img convert -f qcow2 -O raw [extra] <from> <to>`.
fn convert(from: &Path, to: &Path, extra: &[&OsStr]) -> Result<(), Failure> {
    let mut args = vec![OsStr::new("convert")];
    args.extend_from_slice(extra);
    args.extend([OsStr::new("-f"), OsStr::new("qcow2"), OsStr::new("-O"), OsStr::new("raw")]);
    args.extend([from.as_os_str(), to.as_os_str()]);
    qemu_img(&args, "qemu-img convert").map(drop)
}

/// Runs `qemu-img`: its stdout, or its stderr in the failure.
fn qemu_img(args: &[&OsStr], step: &str) -> Result<Vec<u8>, Failure> {
    let output = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| Failure::failed(format!("{step}: cannot run qemu-img: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(Failure::failed(format!("{step} failed ({}): {}", output.status, one_line(stderr.trim(), 2000))));
    }
    Ok(output.stdout)
}

/// The virtual size of a downloaded qcow2 image, refusing backing and external data files.
fn qcow2_info(path: &Path) -> Result<u64, Failure> {
    let stdout = qemu_img(
        &[OsStr::new("info"), OsStr::new("-f"), OsStr::new("qcow2"), OsStr::new("--output=json"), path.as_os_str()],
        "qemu-img info",
    )?;
    let info: serde_json::Value = serde_json::from_slice(&stdout)
        .map_err(|e| Failure::failed(format!("qemu-img info: cannot read its JSON output: {e}")))?;
    if let Some(backing) = info.get("backing-filename").and_then(|b| b.as_str()) {
        return Err(Failure::new(
            Reason::UnsupportedFormat,
            format!(
                "the qcow2 image has a backing file ({}): only standalone images can be imported",
                one_line(backing, 200)
            ),
        ));
    }
    if info.pointer("/format-specific/data/data-file").is_some() {
        return Err(Failure::new(
            Reason::UnsupportedFormat,
            "the qcow2 image has an external data file: only standalone images can be imported",
        ));
    }
    info.get("virtual-size")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| Failure::failed("qemu-img info: no virtual-size in its output"))
}

/// `s` on one line, cut to at most `max` bytes (at a character boundary).
fn one_line(s: &str, max: usize) -> String {
    let mut line: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if line.len() > max {
        let mut end = max.saturating_sub(3);
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push_str("...");
    }
    line
}

/// A URL fit for messages: no user info, no query string (presigned URLs carry secrets there).
fn shown_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, _)) => (base, true),
        None => (url, false),
    };
    let base = base.split_once('#').map_or(base, |(b, _)| b);
    let base = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
            format!("{scheme}://{host}{path}")
        }
        None => base.to_owned(),
    };
    if query { format!("{base}?...") } else { base }
}

/// The regular files of a mounted Secret or ConfigMap folder, by name: dotfiles (and the
/// `..data` links of the mount) are skipped, symbolic links to files followed. The volume is
/// optional: a missing Secret or ConfigMap is an empty (or absent) folder, a failure `<what>
/// holds no key (it is missing or empty)`.
fn mounted_files(dir: &Path, what: &str) -> Result<Vec<(String, PathBuf)>, Failure> {
    let missing = || Failure::failed(format!("{what} holds no key (it is missing or empty)"));
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
        Err(e) => return Err(Failure::failed(format!("cannot list {}: {e}", dir.display()))),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Failure::failed(format!("cannot list {}: {e}", dir.display())))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
        let path = entry.path();
        if !name.starts_with('.') && std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push((name, path));
        }
    }
    if files.is_empty() {
        return Err(missing());
    }
    files.sort();
    Ok(files)
}

/// The headers of [`ImportArgs::headers_dir`], checked (values are secrets: never shown).
fn read_headers(dir: &Path) -> Result<Vec<(String, String)>, Failure> {
    let mut headers = Vec::new();
    for (name, path) in mounted_files(dir, "the Secret of source.http.secretRef")? {
        let value = std::fs::read_to_string(&path)
            .map_err(|e| Failure::failed(format!("cannot read the header file {}: {e}", path.display())))?;
        let value = value.trim().to_owned();
        if ureq::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(Failure::failed(format!("the file {} does not name an HTTP header", path.display())));
        }
        if ureq::http::HeaderValue::from_str(&value).is_err() {
            return Err(Failure::failed(format!("the file {} holds no valid HTTP header value", path.display())));
        }
        headers.push((name, value));
    }
    Ok(headers)
}

/// The certificates of a PEM bundle.
fn pem_certificates(pem: &[u8]) -> Result<Vec<Certificate<'static>>, String> {
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(pem) {
        match item {
            Ok(PemItem::Certificate(cert)) => certs.push(cert),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(certs)
}

/// The trusted roots: the system bundle (when present) and every bundle of `ca_dir`.
fn root_certificates(system: &Path, ca_dir: Option<&Path>) -> Result<Vec<Certificate<'static>>, Failure> {
    let mut roots = Vec::new();
    match std::fs::read(system) {
        Ok(pem) => match pem_certificates(&pem) {
            Ok(certs) => roots.extend(certs),
            Err(e) => tracing::warn!("skipping the system CA bundle {}: {e}", system.display()),
        },
        Err(e) => tracing::debug!("no system CA bundle {}: {e}", system.display()),
    }
    if let Some(dir) = ca_dir {
        for (_, path) in mounted_files(dir, "the ConfigMap of source.http.caConfigMap")? {
            let pem = std::fs::read(&path)
                .map_err(|e| Failure::failed(format!("cannot read the CA bundle {}: {e}", path.display())))?;
            let certs = pem_certificates(&pem)
                .map_err(|e| Failure::failed(format!("the CA bundle {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(Failure::failed(format!("the CA bundle {} holds no PEM certificate", path.display())));
            }
            roots.extend(certs);
        }
    }
    if roots.is_empty() {
        tracing::warn!("no trusted CA certificate: HTTPS servers will not be trusted");
    }
    Ok(roots)
}

/// Whether a failed attempt is retried.
enum Attempt {
    Retry(String),
    /// Ends the import: a terminal failure, or [`Reason::Retrying`] (it must start over).
    Fatal(Failure),
}

/// A request error: retried, unless it cannot go away by itself (a bad URL or an untrusted
/// certificate).
fn classify(e: ureq::Error, url: &str) -> Attempt {
    use ureq::Error as E;
    let untrusted = |tls: &rustls::Error| {
        matches!(tls, rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)
    };
    let fatal = match &e {
        E::Io(io) => io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()).is_some_and(untrusted),
        E::Rustls(tls) => untrusted(tls),
        E::BadUri(_)
        | E::Http(_)
        | E::RequireHttpsOnly(_)
        | E::TooManyRedirects
        | E::RedirectFailed
        | E::InvalidProxyUrl
        | E::Tls(_)
        | E::Pem(_)
        | E::TlsRequired => true,
        _ => false,
    };
    let message = format!("GET {url}: {e}");
    if fatal { Attempt::Fatal(Failure::failed(message)) } else { Attempt::Retry(message) }
}

/// `bytes <start>-<end>/<total|*>`: the start and the total.
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let (range, total) = value.trim().strip_prefix("bytes ")?.split_once('/')?;
    let start = range.split_once('-')?.0.trim().parse().ok()?;
    Some((start, total.trim().parse().ok()))
}

/// The origin of an `http(s)` URL: scheme, host (lowercased) and port.
fn origin(url: &str) -> Option<(String, String, u16)> {
    let uri: ureq::http::Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let port = uri.port_u16().or(match scheme.as_str() {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    })?;
    Some((scheme, uri.host()?.to_ascii_lowercase(), port))
}

/// Whether two URLs have the same origin (scheme, host and port).
fn same_origin(a: &str, b: &str) -> bool {
    origin(a).is_some_and(|o| Some(o) == origin(b))
}

/// Whether an `ETag` is a strong one (not `W/"..."`).
fn is_strong_etag(etag: &str) -> bool {
    !etag.trim().is_empty() && !etag.trim_start().starts_with("W/")
}

/// The URL a redirect from `from` to `location` leads to: `location` resolved against `from`
/// (without its fragment); refused when it is not `http(s)`, or goes from `https` to `http`.
fn redirect_target(from: &str, location: &str) -> Result<String, Failure> {
    let location = location.trim();
    let location = location.split_once('#').map_or(location, |(l, _)| l);
    let (scheme, rest) = from.split_once("://").unwrap_or(("", from));
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let path = path.split_once(['?', '#']).map_or(path, |(p, _)| p);
    let target = if location.contains("://") {
        location.to_owned()
    } else if let Some(rest) = location.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else if location.starts_with('/') {
        format!("{scheme}://{authority}{location}")
    } else if location.starts_with('?') || location.is_empty() {
        format!("{scheme}://{authority}{path}{location}")
    } else {
        let dir = path.rfind('/').map_or("/", |at| &path[..=at]);
        format!("{scheme}://{authority}{dir}{location}")
    };
    let (from_shown, to_shown) = (shown_url(from), shown_url(&target));
    let to_scheme = target.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match to_scheme.as_deref() {
        Some("https") => Ok(target),
        Some("http") if scheme.eq_ignore_ascii_case("https") => {
            Err(Failure::failed(format!("refusing the redirect from {from_shown} to {to_shown}: from https to http")))
        }
        Some("http") => Ok(target),
        _ => Err(Failure::failed(format!("refusing the redirect from {from_shown} to {to_shown}: not http(s)"))),
    }
}

/// The body of the file as a `Read` that never fails on network trouble: it reconnects (with
/// back-off, and a `Range` to go on where it was) until it has the whole file, or a terminal
/// failure (returned as the inner error of an `io::Error`). It hashes what it reads.
struct Download<'c> {
    agent: ureq::Agent,
    url: String,
    shown: String,
    /// The URL the last response came from, after its redirects: resumed requests go there.
    current: String,
    /// Sent only to the origin of `url` ([`same_origin`]).
    headers: Vec<(String, String)>,
    /// The strong `ETag` of the first response, if any.
    etag: Option<String>,
    /// The `Last-Modified` of the first response, if any.
    last_modified: Option<String>,
    config: &'c Config,
    body: Option<ureq::BodyReader<'static>>,
    /// Bytes to drop from the current response (a `200` to a `Range` request).
    skip: u64,
    eof: bool,
    /// Failures since bytes were last received, for the back-off.
    failures: u32,
    progress: Progress,
    last_print: Instant,
    hasher: Context,
}

impl<'c> Download<'c> {
    fn new(args: &ImportArgs, config: &'c Config) -> Result<Self, Failure> {
        let headers = match &args.headers_dir {
            Some(dir) => read_headers(dir)?,
            None => Vec::new(),
        };
        let roots = root_certificates(&config.system_ca_bundle, args.ca_dir.as_deref())?;
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(RootCerts::new_with_certs(&roots))
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .user_agent("vmkeep-import")
            // The digest is of the file as served: no transfer compression.
            .accept_encoding("identity")
            .timeout_resolve(Some(config.connect_timeout))
            .timeout_connect(Some(config.connect_timeout))
            .timeout_send_request(Some(config.read_timeout))
            .timeout_recv_response(Some(config.read_timeout))
            .timeout_per_read(Some(config.read_timeout))
            // Redirects are followed by `attempt`: the Secret's headers go to their origin only.
            .max_redirects(0)
            .tls_config(tls)
            .build()
            .new_agent();
        let shown = shown_url(&args.url);
        if !(args.url.starts_with("http://") || args.url.starts_with("https://")) {
            return Err(Failure::failed(format!("the URL {shown} is not http:// or https://")));
        }
        Ok(Download {
            agent,
            url: args.url.clone(),
            shown,
            current: args.url.clone(),
            headers,
            etag: None,
            last_modified: None,
            config,
            body: None,
            skip: 0,
            eof: false,
            failures: 0,
            progress: Progress::default(),
            last_print: Instant::now(),
            hasher: Context::new(&SHA256),
        })
    }

    /// One request, from the current offset, following redirects.
    fn attempt(&mut self) -> Result<(), Attempt> {
        let offset = self.progress.downloaded;
        // The first response's validator: a resumed request must be of the same file.
        let if_range = self.etag.clone().or_else(|| self.last_modified.clone());
        if offset > 0 && if_range.is_none() {
            return Err(Attempt::Fatal(Failure::starting_over(format!(
                "the download of {} stopped at byte {offset} and the server tells no ETag or Last-Modified to \
                 resume it safely",
                self.shown
            ))));
        }
        let resumed_elsewhere = self.current != self.url;
        let mut url = self.current.clone();
        let mut redirects = 0;
        let response = loop {
            let shown = shown_url(&url);
            let mut request = self.agent.get(&url);
            if same_origin(&url, &self.url) {
                for (name, value) in &self.headers {
                    request = request.header(name, value);
                }
            }
            if let (true, Some(validator)) = (offset > 0, &if_range) {
                request = request.header("Range", format!("bytes={offset}-")).header("If-Range", validator);
            }
            let response = request.call().map_err(|e| classify(e, &shown))?;
            if !matches!(response.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
                break response;
            }
            if redirects == MAX_REDIRECTS {
                return Err(Attempt::Fatal(Failure::failed(format!(
                    "more than {MAX_REDIRECTS} redirects from {}",
                    self.shown
                ))));
            }
            let location = response.headers().get("location").and_then(|v| v.to_str().ok());
            let Some(location) = location else {
                return Err(Attempt::Fatal(Failure::failed(format!(
                    "HTTP {} from {shown} without a valid Location",
                    response.status().as_u16()
                ))));
            };
            url = redirect_target(&url, location).map_err(Attempt::Fatal)?;
            redirects += 1;
        };
        let shown = shown_url(&url);
        let status = response.status();
        let described = match status.canonical_reason() {
            Some(text) => format!("HTTP {} {text} from {shown}", status.as_u16()),
            None => format!("HTTP {} from {shown}", status.as_u16()),
        };
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let etag = header("etag").filter(|e| is_strong_etag(e));
        let changed = || {
            Attempt::Fatal(Failure::starting_over(
                "the file changed on the server during the download (no matching ETag)",
            ))
        };
        match status.as_u16() {
            200 if offset == 0 => {
                self.skip = 0;
                self.etag = etag;
                self.last_modified = header("last-modified");
                if let Some(len) = response.body().content_length() {
                    self.progress.total = Some(len);
                }
            }
            // A resumed request answered with the whole file: the same file (its strong ETag)
            // from a server that ignores ranges, else a changed file, not to be spliced.
            200 => {
                if self.etag.is_none() || etag != self.etag {
                    return Err(changed());
                }
                self.skip = offset;
                if let Some(len) = response.body().content_length() {
                    self.progress.total = Some(len);
                }
            }
            206 => {
                let range = header("content-range");
                let Some((start, total)) = range.as_deref().and_then(parse_content_range) else {
                    return Err(Attempt::Fatal(Failure::failed(format!("{described} without a valid Content-Range"))));
                };
                if start > offset {
                    return Err(Attempt::Fatal(Failure::failed(format!(
                        "{described} starts at byte {start}, not {offset}"
                    ))));
                }
                // A server that honours Range but not If-Range: the validators tell.
                let other_etag = matches!((&etag, &self.etag), (Some(now), Some(first)) if now != first);
                let other_date = self.etag.is_none()
                    && matches!((header("last-modified"), &self.last_modified), (Some(now), Some(first)) if now != *first);
                let other_total = matches!((total, self.progress.total), (Some(now), Some(first)) if now != first);
                if other_etag || other_date || other_total {
                    return Err(changed());
                }
                self.skip = offset - start;
                if total.is_some() {
                    self.progress.total = total;
                }
            }
            // Asked for the bytes after the end: the whole file is there.
            416 if self.progress.total.is_some_and(|t| offset >= t) => {
                self.eof = true;
                return Ok(());
            }
            429 | 500..=599 => return Err(Attempt::Retry(described)),
            // The URL a redirect led to may have expired (a presigned one): ask the original again.
            400..=499 if resumed_elsewhere => {
                self.current = self.url.clone();
                return Err(Attempt::Retry(format!("{described}: asking {} again", self.shown)));
            }
            _ => return Err(Attempt::Fatal(Failure::failed(described))),
        }
        self.current = url;
        self.body = Some(response.into_body().into_reader());
        Ok(())
    }

    /// Connects (again), retrying until a response comes or a terminal failure.
    fn connect(&mut self) -> Result<(), Failure> {
        loop {
            match self.attempt() {
                Ok(()) => return Ok(()),
                Err(Attempt::Retry(why)) => self.retry(why),
                Err(Attempt::Fatal(failure)) => return Err(failure),
            }
        }
    }

    /// Counts a retry and waits its back-off (printing progress meanwhile).
    fn retry(&mut self, why: String) {
        self.body = None;
        self.failures = self.failures.saturating_add(1);
        self.progress.retries = self.progress.retries.saturating_add(1);
        let wait =
            self.config.backoff_base.saturating_mul(1 << (self.failures - 1).min(16)).min(self.config.backoff_max);
        tracing::warn!(retries = self.progress.retries, "{why}: retrying in {wait:?}");
        self.progress.last_error = Some(one_line(&why, 300));
        self.print_progress();
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(self.config.progress_every));
            if self.last_print.elapsed() >= self.config.progress_every {
                self.print_progress();
            }
        }
    }

    fn print_progress(&mut self) {
        self.last_print = Instant::now();
        if let Ok(json) = serde_json::to_string(&self.progress) {
            let mut out = io::stdout().lock();
            let _ = writeln!(out, "{PROGRESS_PREFIX}{json}");
            let _ = out.flush();
        }
    }

    /// Reads the rest of the file (a decompressor may stop before it) and prints the progress:
    /// the hex SHA-256 of the whole file.
    fn finish(&mut self) -> Result<String, Failure> {
        io::copy(self, &mut io::sink()).map_err(|e| from_io(e, "downloading"))?;
        self.print_progress();
        let digest = self.hasher.clone().finish();
        Ok(digest.as_ref().iter().map(|b| format!("{b:02x}")).collect())
    }
}

impl Read for Download<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.eof {
                return Ok(0);
            }
            let Some(body) = self.body.as_mut() else {
                self.connect().map_err(io::Error::other)?;
                continue;
            };
            match body.read(buf) {
                Ok(0) => match self.progress.total {
                    Some(total) if self.progress.downloaded < total => {
                        let at = self.progress.downloaded;
                        self.retry(format!("the body of {} ended at byte {at} of {total}", self.shown));
                    }
                    _ => {
                        self.body = None;
                        self.eof = true;
                    }
                },
                Ok(n) => {
                    let skip = self.skip.min(n as u64) as usize;
                    self.skip -= skip as u64;
                    if skip == n {
                        continue;
                    }
                    buf.copy_within(skip..n, 0);
                    let n = n - skip;
                    self.hasher.update(&buf[..n]);
                    self.progress.downloaded += n as u64;
                    self.failures = 0;
                    if self.last_print.elapsed() >= self.config.progress_every {
                        self.print_progress();
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let at = self.progress.downloaded;
                    self.retry(format!("reading {} at byte {at}: {e}", self.shown));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        net::TcpListener,
        sync::{Arc, Mutex},
    };

    /// What the test server answers; every answer closes its connection.
    #[derive(Clone, Default)]
    struct Plan {
        body: Vec<u8>,
        /// Honour `Range` with a 206 (else answer 200 with the whole body), and `If-Range`:
        /// a 200 with the whole body when it names no longer the file.
        ranges: bool,
        /// Send only this many bytes of the body (with the full Content-Length), then drop the
        /// connection, on the first request not answered with an error.
        drop_after: Option<usize>,
        /// Answer 500 to the first requests.
        errors: usize,
        /// Answer this status to every request.
        status: Option<u16>,
        /// Answer this status to every request after the first.
        then_status: Option<u16>,
        /// The `ETag` (lowercase) and `Last-Modified` of the file.
        etag: Option<String>,
        last_modified: Option<String>,
        /// The file (and its `ETag`) served after the first request: it changed.
        then_body: Option<Vec<u8>>,
        then_etag: Option<String>,
        /// `(path, location)`: a request for the path is answered `302 Found` to the location.
        redirects: Vec<(String, String)>,
        /// Answer 200 with an endless body (no Content-Length).
        endless: bool,
        /// Honour `Range` but ignore `If-Range`.
        no_if_range: bool,
    }

    /// Serves a plan on 127.0.0.1: its URL and the (lowercased) heads of the requests.
    fn serve(plan: Plan) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/images/disk?token=secret", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        std::thread::spawn(move || {
            for (i, conn) in listener.incoming().enumerate() {
                let Ok(mut conn) = conn else { continue };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_lowercase();
                log.lock().unwrap().push(head.clone());
                let path = head.split_whitespace().nth(1).unwrap_or("").split('?').next().unwrap_or("").to_owned();
                if let Some((_, location)) = plan.redirects.iter().find(|(p, _)| *p == path) {
                    let _ = write!(
                        conn,
                        "HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    continue;
                }
                let status = match i {
                    i if i < plan.errors => Some(500),
                    i if i > 0 && plan.then_status.is_some() => plan.then_status,
                    _ => plan.status,
                };
                if let Some(status) = status {
                    let _ = write!(conn, "HTTP/1.1 {status} Oops\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    continue;
                }
                if plan.endless {
                    let _ = write!(conn, "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n");
                    let noise: Vec<u8> = (0..CHUNK).map(|k| (k % 251) as u8 | 1).collect();
                    while conn.write_all(&noise).is_ok() {}
                    continue;
                }
                let (body, etag) = match (&plan.then_body, i) {
                    (Some(then), i) if i > 0 => (then, plan.then_etag.as_deref()),
                    _ => (&plan.body, plan.etag.as_deref()),
                };
                let mut validators = String::new();
                if let Some(etag) = etag {
                    validators += &format!("etag: {etag}\r\n");
                }
                if let Some(date) = &plan.last_modified {
                    validators += &format!("last-modified: {date}\r\n");
                }
                let line = |name: &str| head.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
                let same_file = match line("if-range: ").filter(|_| !plan.no_if_range) {
                    Some(v) => Some(v) == etag || Some(v) == plan.last_modified.as_deref().map(str::trim),
                    None => true,
                };
                let len = body.len();
                let start = line("range: bytes=")
                    .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
                    .filter(|_| plan.ranges && same_file)
                    .unwrap_or(0);
                let status = match start {
                    0 => "200 OK".to_owned(),
                    _ => format!("206 Partial Content\r\ncontent-range: bytes {start}-{}/{len}", len - 1),
                };
                let body = &body[start..];
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\n{validators}content-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let body = match plan.drop_after {
                    Some(k) if i == plan.errors => &body[..k.min(body.len())],
                    _ => body,
                };
                let _ = conn.write_all(body);
            }
        });
        (url, requests)
    }

    /// A raw disk: 256 KiB of noise, zeros, `boot` at 2 MiB + 5 (when that long), a tail of 7s.
    fn disk(len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        let mut x: u32 = 0x9e37_79b9;
        for b in &mut data[..256 << 10] {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        if len > 2 * CHUNK + 9 {
            data[2 * CHUNK + 5..2 * CHUNK + 9].copy_from_slice(b"boot");
        }
        data[len - 100..].fill(7);
        data
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut encoder = liblzma::write::XzEncoder::new(Vec::new(), 1);
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    fn digest(data: &[u8]) -> String {
        sha256_name(ring::digest::digest(&SHA256, data).as_ref())
    }

    fn hex(data: &[u8]) -> String {
        digest(data).trim_start_matches("sha256:").to_owned()
    }

    /// A fresh folder with `pvc/` and `scratch/`, and arguments to import `url` into it.
    fn setup(name: &str, url: &str) -> ImportArgs {
        let dir = std::env::temp_dir().join(format!("vmkeep-import-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pvc")).unwrap();
        std::fs::create_dir_all(dir.join("scratch")).unwrap();
        ImportArgs {
            url: url.to_owned(),
            target: dir.join("pvc"),
            scratch: dir.join("scratch"),
            ..ImportArgs::default()
        }
    }

    /// Runs an import with short back-offs: the exit code and the termination message.
    fn go(args: &ImportArgs) -> (i32, String) {
        go_with(args, &Config::default())
    }

    /// [`go`] with other knobs (back-offs shortened anyway).
    fn go_with(args: &ImportArgs, config: &Config) -> (i32, String) {
        let config = Config {
            backoff_base: Duration::from_millis(5),
            backoff_max: Duration::from_millis(20),
            progress_every: Duration::from_millis(50),
            ..config.clone()
        };
        let log = args.target.with_file_name("termination-log");
        let code = run_with(args, &log, &config);
        let message = std::fs::read_to_string(&log).unwrap();
        assert_eq!(message.lines().count(), 1, "{message}");
        (code, message.trim().to_owned())
    }

    fn failed(message: &str, reason: &str) -> String {
        match parse_result(message) {
            Some(ImportResult::Failed { reason: r, message }) if r == reason => message,
            other => panic!("not {reason}: {message} ({other:?})"),
        }
    }

    fn imported(args: &ImportArgs, content: &[u8]) -> String {
        let (code, message) = go(args);
        assert_eq!(code, 0, "{message}");
        match parse_result(&message) {
            Some(ImportResult::Imported { digest: d, bytes, .. }) => {
                // The disk's digest: its content, then zeros up to the capacity (whole MiB).
                let mut disk = content.to_vec();
                disk.resize(content.len().max((args.capacity / MIB * MIB) as usize), 0);
                assert_eq!((d, bytes), (digest(&disk), content.len() as u64), "{message}");
                let written = std::fs::read(args.target.join(DISK_IMG)).unwrap_or_default();
                assert_eq!(digest(&written), digest(&disk), "the digest is the disk's as written");
            }
            other => panic!("not imported: {message} ({other:?})"),
        }
        assert!(!args.target.join("disk.img.partial").exists());
        message
    }

    fn have_qemu_img() -> bool {
        let found = Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success());
        if !found {
            println!("skipped: qemu-img is not installed");
        }
        found
    }

    /// A qcow2 image of `raw`, made with qemu-img.
    fn qcow2(raw: &[u8], name: &str) -> Vec<u8> {
        let dir = std::env::temp_dir().join(format!("vmkeep-import-fixture-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("raw"), raw).unwrap();
        let status = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(dir.join("raw"))
            .arg(dir.join("qcow2"))
            .status()
            .unwrap();
        assert!(status.success());
        let image = std::fs::read(dir.join("qcow2")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        image
    }

    #[test]
    fn a_raw_image_is_written_sparsely_with_its_digest_and_kept_after() {
        let content = disk(4 * CHUNK + 4321);
        let (url, _) = serve(Plan { body: content.clone(), ..Plan::default() });
        let mut args = setup("raw", &url);
        args.capacity = 6 * MIB + 77;
        let message = imported(&args, &content);
        assert!(message.contains(&format!("(downloaded {} bytes, 0 retries, ", content.len())), "{message}");
        let out = std::fs::read(args.target.join(DISK_IMG)).unwrap();
        // As large as the PVC (rounded down to MiB), zeros after the image.
        assert_eq!(out.len(), 6 * CHUNK);
        assert_eq!(&out[..content.len()], &content[..]);
        assert!(out[content.len()..].iter().all(|b| *b == 0));
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(args.target.join(DISK_IMG)).unwrap().blocks();
        assert!(blocks * 512 <= 3 * MIB, "not sparse: {blocks} blocks");
        // Already there (a record lost): not downloaded again, its digest reported.
        let (_, requests) = serve(Plan { status: Some(500), ..Plan::default() });
        let (code, message) = go(&args);
        assert_eq!(code, 0, "{message}");
        assert!(message.contains("already imported"), "{message}");
        assert_eq!(
            parse_result(&message),
            Some(ImportResult::Imported { digest: digest(&out), bytes: out.len() as u64, retries: 0 })
        );
        assert!(requests.lock().unwrap().is_empty());
    }

    #[test]
    fn gzip_and_xz_images_are_decompressed_and_checked_as_downloaded() {
        let content = disk(3 * CHUNK + 512);
        for (name, file) in [("gz", gzip(&content)), ("xz", xz(&content))] {
            let (url, _) = serve(Plan { body: file.clone(), ..Plan::default() });
            let mut args = setup(name, &url);
            // The checksum is the served (compressed) file's, in any case.
            args.sha256 = Some(hex(&file).to_uppercase());
            let message = imported(&args, &content);
            assert!(message.contains(&format!("(downloaded {} bytes,", file.len())), "{message}");
            assert_eq!(std::fs::read(args.target.join(DISK_IMG)).unwrap(), content);
        }
    }

    #[test]
    fn a_qcow2_image_is_converted_to_raw() {
        if !have_qemu_img() {
            return;
        }
        let content = disk(4 * CHUNK + 4096);
        let image = qcow2(&content, "convert");
        // Compressed too: the stream is decompressed before it is saved.
        let (url, _) = serve(Plan {
            body: gzip(&image),
            ranges: true,
            drop_after: Some(100_000),
            etag: Some("\"q1\"".into()),
            ..Plan::default()
        });
        let mut args = setup("qcow2", &url);
        args.format = Format::Qcow2;
        args.capacity = 5 * MIB + 1;
        let message = imported(&args, &content);
        assert!(message.contains(", 1 retries,"), "{message}");
        let out = std::fs::read(args.target.join(DISK_IMG)).unwrap();
        assert_eq!(out.len(), 5 * CHUNK);
        assert_eq!(&out[..content.len()], &content[..]);
        assert!(out[content.len()..].iter().all(|b| *b == 0));
        assert!(!args.scratch.join(SCRATCH_FILE).exists());
        // A PVC too small for it, told by its header.
        let (url, _) = serve(Plan { body: image, ..Plan::default() });
        let mut args = setup("qcow2-small", &url);
        args.format = Format::Qcow2;
        args.capacity = 2 * MIB;
        let (code, message) = go(&args);
        assert_eq!(code, 0, "a terminal failure: {message}");
        let why = failed(&message, "TooSmall");
        assert_eq!(
            why,
            format!(
                "the image holds {} bytes, the PVC {} bytes: set spec.size to at least 5Mi",
                content.len(),
                2 * MIB
            )
        );
        assert!(!args.target.join(DISK_IMG).exists());
        assert!(!args.scratch.join(SCRATCH_FILE).exists());
    }

    #[test]
    fn a_dropped_body_resumes_with_or_without_range_support() {
        let content = disk(3 * CHUNK + 99);
        let file = gzip(&content);
        // With Range (206): a gzip stream cut in its middle goes on.
        let etag = Some("\"v1\"".to_owned());
        let (url, requests) = serve(Plan {
            body: file.clone(),
            ranges: true,
            drop_after: Some(70_000),
            etag: etag.clone(),
            ..Plan::default()
        });
        let mut args = setup("resume-range", &url);
        args.sha256 = Some(hex(&file));
        let message = imported(&args, &content);
        assert!(message.contains(&format!("(downloaded {} bytes, 1 retries,", file.len())), "{message}");
        let requests = requests.lock().unwrap();
        assert_eq!(requests.len(), 2);
        assert!(!requests[0].contains("range:"));
        assert!(requests[1].contains("range: bytes=70000-"), "{}", requests[1]);
        assert!(requests[1].contains("\r\nif-range: \"v1\"\r\n"), "{}", requests[1]);
        drop(requests);
        // Without Range (200, with the same strong ETag): the first bytes are read again and dropped.
        let (url, requests) =
            serve(Plan { body: content.clone(), drop_after: Some(300_001), etag: etag.clone(), ..Plan::default() });
        let mut args = setup("resume-200", &url);
        args.sha256 = Some(hex(&content));
        let message = imported(&args, &content);
        assert!(message.contains(&format!("(downloaded {} bytes, 1 retries,", content.len())), "{message}");
        assert_eq!(requests.lock().unwrap().len(), 2);
        assert_eq!(std::fs::read(args.target.join(DISK_IMG)).unwrap(), content);
        // A terminal answer on reconnection comes through the decompressor as itself.
        let (url, _) = serve(Plan {
            body: file,
            ranges: true,
            drop_after: Some(70_000),
            then_status: Some(403),
            etag,
            ..Plan::default()
        });
        let args = setup("resume-403", &url);
        let (code, message) = go(&args);
        assert_eq!(code, 0, "a terminal failure: {message}");
        assert!(failed(&message, "ImportFailed").starts_with("HTTP 403 Forbidden from "), "{message}");
        assert!(!args.target.join("disk.img.partial").exists());
    }

    #[test]
    fn server_errors_are_retried_and_client_errors_are_not() {
        let content = disk(CHUNK + 1000);
        let (url, requests) = serve(Plan { body: content.clone(), errors: 2, ..Plan::default() });
        let args = setup("retry", &url);
        let message = imported(&args, &content);
        assert!(message.contains(", 2 retries,"), "{message}");
        assert_eq!(requests.lock().unwrap().len(), 3);
        let (url, requests) = serve(Plan { status: Some(404), ..Plan::default() });
        let args = setup("404", &url);
        let (code, message) = go(&args);
        assert_eq!(code, 0, "a terminal failure: {message}");
        let port = url.split(':').nth(2).and_then(|s| s.split('/').next()).unwrap();
        // The query string (a presigned URL's secret) is not shown.
        assert_eq!(
            failed(&message, "ImportFailed"),
            format!("HTTP 404 Not Found from http://127.0.0.1:{port}/images/disk?...")
        );
        assert_eq!(requests.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_wrong_checksum_leaves_no_disk() {
        let content = disk(2 * CHUNK);
        let (url, _) = serve(Plan { body: content.clone(), ..Plan::default() });
        let mut args = setup("checksum", &url);
        args.sha256 = Some(format!("sha256:{}", "ab".repeat(32)));
        let (code, message) = go(&args);
        assert_eq!(code, 0, "a terminal failure: {message}");
        assert_eq!(
            failed(&message, "ChecksumMismatch"),
            format!("expected {}, downloaded {}", "ab".repeat(32), hex(&content))
        );
        assert!(!args.target.join(DISK_IMG).exists());
        assert!(!args.target.join("disk.img.partial").exists());
        args.sha256 = Some("abc".into());
        assert!(failed(&go(&args).1, "ImportFailed").contains("is not 64 hex digits"));
    }

    #[test]
    fn formats_are_checked() {
        let mut header = vec![0u8; 2 * CHUNK];
        header[..4].copy_from_slice(QCOW2_MAGIC);
        header[7] = 3;
        header[24..32].copy_from_slice(&(3 * MIB).to_be_bytes());
        let mut vmdk = disk(2 * CHUNK);
        vmdk[..4].copy_from_slice(b"KDMV");
        let cases = [
            (header.clone(), Format::Raw, "the file is qcow2: set source.http.format: qcow2"),
            (gzip(&header), Format::Raw, "the file (once gunzipped) is qcow2: set source.http.format: qcow2"),
            (disk(2 * CHUNK), Format::Qcow2, "the file is not qcow2"),
            (vmdk.clone(), Format::Raw, "the file is a VMDK image"),
            (xz(&vmdk), Format::Qcow2, "the file (once unxz'd) is a VMDK image"),
        ];
        for (i, (body, format, why)) in cases.into_iter().enumerate() {
            let (url, _) = serve(Plan { body, ..Plan::default() });
            let mut args = setup(&format!("format-{i}"), &url);
            args.format = format;
            let (code, message) = go(&args);
            assert_eq!(code, 0, "a terminal failure: {message}");
            assert!(failed(&message, "UnsupportedFormat").starts_with(why), "{message}");
            assert!(!args.target.join(DISK_IMG).exists());
            assert!(!args.target.join("disk.img.partial").exists());
        }
    }

    #[test]
    fn a_raw_image_larger_than_the_pvc_is_too_small() {
        let content = disk(3 * CHUNK + 1);
        let exact = format!(
            "the image holds {} bytes, the PVC {} bytes: set spec.size to at least 4Mi",
            content.len(),
            2 * MIB
        );
        // The Content-Length of a plain file tells the size; a compressed one's does not.
        let more = format!("the image holds more than {} bytes (the PVC's size): set spec.size larger", 2 * MIB);
        for (name, body, why) in [("plain", content.clone(), exact), ("gz", gzip(&content), more)] {
            let (url, _) = serve(Plan { body, ..Plan::default() });
            let mut args = setup(&format!("small-{name}"), &url);
            args.capacity = 2 * MIB;
            let (code, message) = go(&args);
            assert_eq!(code, 0, "a terminal failure: {message}");
            assert_eq!(failed(&message, "TooSmall"), why);
            assert!(!args.target.join("disk.img.partial").exists());
        }
        assert_eq!(quantity_up(1 << 30), "1Gi");
        assert_eq!(quantity_up(1536 * MIB - 7), "1536Mi");
        assert_eq!(quantity_up(1), "1Mi");
    }

    #[test]
    fn a_probe_finds_the_size_the_pvc_needs() {
        let content = disk(3 * CHUNK + 7);
        let mut header = vec![0u8; CHUNK];
        header[..4].copy_from_slice(QCOW2_MAGIC);
        header[24..32].copy_from_slice(&(10_u64 << 30).to_be_bytes());
        let cases = [
            (content.clone(), Format::Raw, content.len() as u64),
            (gzip(&content), Format::Raw, content.len() as u64),
            (xz(&header), Format::Qcow2, 10 << 30),
        ];
        for (i, (body, format, size)) in cases.into_iter().enumerate() {
            let (url, _) = serve(Plan { body, ..Plan::default() });
            let mut args = setup(&format!("probe-{i}"), &url);
            args.probe = true;
            args.format = format;
            let (code, message) = go(&args);
            assert_eq!((code, parse_result(&message)), (0, Some(ImportResult::Size(size))), "{message}");
            assert!(!args.target.join(DISK_IMG).exists());
        }
        // A probe that read the whole file checks it.
        let (url, _) = serve(Plan { body: gzip(&content), ..Plan::default() });
        let mut args = setup("probe-sum", &url);
        args.probe = true;
        args.sha256 = Some("00".repeat(32));
        failed(&go(&args).1, "ChecksumMismatch");
    }

    #[test]
    fn headers_come_from_the_mounted_secret() {
        let content = disk(CHUNK);
        let (url, requests) = serve(Plan { body: content.clone(), ..Plan::default() });
        let mut args = setup("headers", &url);
        let secret = args.scratch.with_file_name("secret");
        std::fs::create_dir_all(secret.join("..2024_01_01")).unwrap();
        std::fs::write(secret.join("..2024_01_01/Authorization"), "Bearer Tok3n\n").unwrap();
        std::fs::write(secret.join("..2024_01_01/X-Extra"), " two words ").unwrap();
        std::os::unix::fs::symlink("..2024_01_01", secret.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/Authorization", secret.join("Authorization")).unwrap();
        std::os::unix::fs::symlink("..data/X-Extra", secret.join("X-Extra")).unwrap();
        std::fs::write(secret.join(".hidden"), "no").unwrap();
        args.headers_dir = Some(secret.clone());
        imported(&args, &content);
        let head = requests.lock().unwrap()[0].clone();
        assert!(head.contains("\r\nauthorization: bearer tok3n\r\n"), "{head}");
        assert!(head.contains("\r\nx-extra: two words\r\n"), "{head}");
        assert!(head.contains("\r\nuser-agent: vmkeep-import\r\n"), "{head}");
        assert!(!head.contains("hidden"), "{head}");
        // A bad header name is named, its value never shown.
        std::fs::write(secret.join("Bad Name"), "Tok3n").unwrap();
        std::fs::remove_file(args.target.join(DISK_IMG)).unwrap();
        let why = failed(&go(&args).1, "ImportFailed");
        assert!(why.contains("Bad Name") && !why.contains("Tok3n"), "{why}");
    }

    #[test]
    fn results_and_progress_read_back() {
        let digest = format!("sha256:{}", "0f".repeat(32));
        let message = format!("Imported: {digest} 1073741824 bytes (downloaded 5 bytes, 2 retries, 1.0 s)\n");
        assert_eq!(parse_result(&message), Some(ImportResult::Imported { digest, bytes: 1 << 30, retries: 2 }));
        assert_eq!(parse_result("Size: 42\n"), Some(ImportResult::Size(42)));
        assert_eq!(
            parse_result("TooSmall: the image holds 2 bytes: x"),
            Some(ImportResult::Failed { reason: "TooSmall".into(), message: "the image holds 2 bytes: x".into() })
        );
        assert_eq!(parse_result("Copied: sha256:00 1 bytes"), None);
        assert_eq!(parse_result("Imported: none 1 bytes"), None);
        // A non-terminal failure is no result: the container runs again.
        assert_eq!(parse_result("Retrying: the file changed; starting over"), None);
        assert_eq!(
            parse_retrying("Retrying: the file changed; starting over\n"),
            Some("the file changed; starting over")
        );
        assert_eq!(parse_retrying("ImportFailed: HTTP 404"), None);
        let progress = Progress { downloaded: 42, total: Some(100), retries: 2, last_error: Some("HTTP 500".into()) };
        let line = format!("{PROGRESS_PREFIX}{}", serde_json::to_string(&progress).unwrap());
        assert_eq!(line, r#"vmkeep-import-progress {"downloaded":42,"total":100,"retries":2,"lastError":"HTTP 500"}"#);
        let fresh = Progress { downloaded: 3 * MIB, ..Progress::default() };
        let fresh_line = format!("{PROGRESS_PREFIX}{}", serde_json::to_string(&fresh).unwrap());
        assert!(fresh_line.ends_with(r#"{"downloaded":3145728,"total":null,"retries":0,"lastError":null}"#));
        let log = format!("{fresh_line}\nsome log\n2024-01-01T00:00:00Z {line}\nmore log\n");
        assert_eq!(parse_progress(&log), Some(progress.clone()));
        assert_eq!(parse_progress("nothing"), None);
        assert_eq!(progress.percent(), Some(42));
        assert_eq!(progress.to_string(), "42%");
        assert_eq!(fresh.to_string(), "3 MiB");
        assert_eq!("QCOW2".parse(), Ok(Format::Qcow2));
        assert!("vmdk".parse::<Format>().is_err());
        assert_eq!(shown_url("https://u:p@h.example/a/b?X-Sig=1#f"), "https://h.example/a/b?...");
        assert_eq!(parse_content_range("bytes 10-99/100"), Some((10, Some(100))));
        assert_eq!(one_line("a\nb", 10), "a b");
    }

    /// A folder as a Secret volume mounts it: `..data` links to the files.
    fn secret(dir: &Path, files: &[(&str, &str)]) {
        std::fs::create_dir_all(dir.join("..2024_01_01")).unwrap();
        std::os::unix::fs::symlink("..2024_01_01", dir.join("..data")).unwrap();
        for (name, value) in files {
            std::fs::write(dir.join("..2024_01_01").join(name), value).unwrap();
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
    }

    /// [`go_with`] in a thread: its outcome, or a panic when it does not end within `secs`.
    fn go_within(args: &ImportArgs, config: Config, secs: u64) -> (i32, String) {
        let (tx, rx) = std::sync::mpsc::channel();
        let args = args.clone();
        std::thread::spawn(move || {
            let _ = tx.send(go_with(&args, &config));
        });
        rx.recv_timeout(Duration::from_secs(secs)).expect("the import did not stop")
    }

    #[test]
    fn secret_headers_go_to_their_origin_only_and_resumes_go_where_redirects_led() {
        let content = disk(2 * CHUNK + 10);
        // Another origin (another port) serves the file, and cuts it once.
        let (far, far_requests) = serve(Plan {
            body: content.clone(),
            ranges: true,
            drop_after: Some(200_000),
            etag: Some("\"f1\"".into()),
            ..Plan::default()
        });
        // The origin redirects to itself (a relative Location), then to the other origin.
        let (url, requests) = serve(Plan {
            redirects: vec![("/images/disk".into(), "hop?x=1".into()), ("/images/hop".into(), far)],
            ..Plan::default()
        });
        let mut args = setup("redirects", &url);
        let dir = args.scratch.with_file_name("secret");
        secret(&dir, &[("Authorization", "Bearer Tok3n"), ("X-Extra", "two words")]);
        args.headers_dir = Some(dir);
        let message = imported(&args, &content);
        assert!(message.contains(", 1 retries,"), "{message}");
        let requests = requests.lock().unwrap().clone();
        // The resumed request went to the end of the redirects, not through them again.
        assert_eq!(requests.len(), 2, "{requests:?}");
        assert!(requests[1].starts_with("get /images/hop?x=1 "), "{}", requests[1]);
        for head in &requests {
            assert!(head.contains("\r\nauthorization: bearer tok3n\r\n"), "{head}");
            assert!(head.contains("\r\nx-extra: two words\r\n"), "{head}");
        }
        let far_requests = far_requests.lock().unwrap().clone();
        assert_eq!(far_requests.len(), 2, "{far_requests:?}");
        for head in &far_requests {
            assert!(!head.contains("authorization") && !head.contains("x-extra") && !head.contains("tok3n"), "{head}");
            assert!(head.contains("\r\nuser-agent: vmkeep-import\r\n"), "{head}");
        }
        assert!(far_requests[1].contains("\r\nrange: bytes=200000-\r\n"), "{}", far_requests[1]);
        assert!(far_requests[1].contains("\r\nif-range: \"f1\"\r\n"), "{}", far_requests[1]);
        // The URL the redirects led to expired (a presigned one): the original URL is asked again,
        // and its redirects' answer is final.
        let (far, far_requests) = serve(Plan {
            body: content.clone(),
            ranges: true,
            drop_after: Some(200_000),
            etag: Some("\"f1\"".into()),
            then_status: Some(403),
            ..Plan::default()
        });
        let (url, requests) = serve(Plan { redirects: vec![("/images/disk".into(), far)], ..Plan::default() });
        let args = setup("redirect-expired", &url);
        let (code, message) = go(&args);
        assert_eq!(code, 0, "a terminal failure: {message}");
        let why = failed(&message, "ImportFailed");
        assert!(why.starts_with("HTTP 403 Forbidden from http://127.0.0.1:") && why.ends_with("/images/disk?..."));
        assert_eq!((requests.lock().unwrap().len(), far_requests.lock().unwrap().len()), (2, 3));
        // A redirect loop ends.
        let (url, requests) =
            serve(Plan { redirects: vec![("/images/disk".into(), "/images/disk".into())], ..Plan::default() });
        let args = setup("redirect-loop", &url);
        let (code, message) = go(&args);
        assert_eq!(code, 0, "a terminal failure: {message}");
        assert!(failed(&message, "ImportFailed").starts_with("more than 10 redirects from http://"), "{message}");
        assert_eq!(requests.lock().unwrap().len(), 11);
    }

    #[test]
    fn redirects_are_resolved_and_https_to_http_is_refused() {
        let from = "https://a.example/x/y?sig=1";
        let cases = [
            ("z", "https://a.example/x/z"),
            ("/p?q", "https://a.example/p?q"),
            ("?r=2", "https://a.example/x/y?r=2"),
            ("//b.example/p", "https://b.example/p"),
            ("https://b.example:8443/p#f", "https://b.example:8443/p"),
        ];
        for (location, to) in cases {
            assert_eq!(redirect_target(from, location).unwrap().as_str(), to, "{location}");
        }
        assert_eq!(redirect_target("http://a.example/x", "http://b.example/y").unwrap(), "http://b.example/y");
        let refused = redirect_target(from, "http://b.example/p?sig=2").unwrap_err();
        assert_eq!(refused.reason, Reason::ImportFailed);
        assert_eq!(
            refused.message,
            "refusing the redirect from https://a.example/x/y?... to http://b.example/p?...: from https to http"
        );
        assert!(redirect_target(from, "file:///etc/passwd").is_err());
        assert!(same_origin("https://a.example/x", "https://u@A.example:443/y?z"));
        assert!(!same_origin("http://a.example/x", "https://a.example/x"));
        assert!(!same_origin("http://a.example:8080/x", "http://a.example/x"));
        assert!(!same_origin("http://a.example/x", "http://b.a.example/x"));
    }

    #[test]
    fn an_endless_body_stops_at_the_pvc_size_and_a_probe_at_its_bound() {
        let (url, _) = serve(Plan { endless: true, ..Plan::default() });
        let mut args = setup("endless", &url);
        args.capacity = 4 * MIB;
        let (code, message) = go_within(&args, Config::default(), 60);
        assert_eq!(code, 0, "a terminal failure: {message}");
        assert_eq!(
            failed(&message, "TooSmall"),
            format!("the image holds more than {} bytes (the PVC's size): set spec.size larger", 4 * MIB)
        );
        assert!(!args.target.join("disk.img.partial").exists());
        args.probe = true;
        let (code, message) = go_within(&args, Config { probe_max: 8 * MIB, ..Config::default() }, 60);
        assert_eq!(code, 0, "a terminal failure: {message}");
        assert_eq!(
            failed(&message, "ImportFailed"),
            format!("the stream is too large to probe: more than {} bytes (once decompressed): set spec.size", 8 * MIB)
        );
    }

    #[test]
    fn a_changed_file_is_not_spliced_but_started_over() {
        let old = disk(2 * CHUNK + 10);
        let mut new = old.clone();
        new[100..200].fill(9);
        let changed = "the file changed on the server during the download (no matching ETag); starting over";
        let date = "wed, 21 oct 2015 07:28:00 gmt";
        let plan = Plan { body: old.clone(), drop_after: Some(300_000), ..Plan::default() };
        let v1 = Some("\"v1\"".to_owned());
        let cases = [
            // The file changed: a server that honours If-Range answers 200 with the new one.
            (
                "if-range",
                Plan {
                    ranges: true,
                    etag: v1.clone(),
                    then_body: Some(new.clone()),
                    then_etag: Some("\"v2\"".into()),
                    ..plan.clone()
                },
                Some("if-range: \"v1\""),
            ),
            // ... one that ignores it answers 206 of the new file: its ETag tells.
            (
                "no-if-range",
                Plan {
                    ranges: true,
                    no_if_range: true,
                    etag: v1,
                    then_body: Some(new),
                    then_etag: Some("\"v2\"".into()),
                    ..plan.clone()
                },
                Some("if-range: \"v1\""),
            ),
            // A 200 with a Last-Modified only: maybe another file.
            ("date-200", Plan { last_modified: Some(date.into()), ..plan.clone() }, Some("if-range: wed, 21 oct")),
        ];
        for (name, plan, if_range) in cases {
            let (url, requests) = serve(plan);
            let args = setup(&format!("changed-{name}"), &url);
            let (code, message) = go(&args);
            assert_eq!((code, message.as_str()), (1, format!("Retrying: {changed}").as_str()), "{name}");
            assert_eq!(parse_result(&message), None);
            assert_eq!(parse_retrying(&message), Some(changed));
            let requests = requests.lock().unwrap().clone();
            assert_eq!(requests.len(), 2, "{name}");
            assert!(requests[1].contains(if_range.unwrap()), "{name}: {}", requests[1]);
            assert!(!args.target.join(DISK_IMG).exists() && !args.target.join("disk.img.partial").exists());
        }
        // No validator at all (a weak ETag is none): a cut download cannot resume safely.
        let (url, requests) = serve(Plan { ranges: true, etag: Some("W/\"w1\"".into()), ..plan.clone() });
        let args = setup("changed-none", &url);
        let (code, message) = go(&args);
        assert_eq!(code, 1, "{message}");
        let why = parse_retrying(&message).unwrap();
        assert!(why.contains("stopped at byte 300000") && why.ends_with("; starting over"), "{message}");
        assert_eq!(requests.lock().unwrap().len(), 1);
        assert!(!args.target.join("disk.img.partial").exists());
        // The same file by its Last-Modified, with ranges: resumed.
        let (url, requests) = serve(Plan { ranges: true, last_modified: Some(date.into()), ..plan });
        let args = setup("changed-not", &url);
        imported(&args, &old);
        let requests = requests.lock().unwrap().clone();
        assert!(requests[1].contains(&format!("\r\nif-range: {date}\r\n")), "{}", requests[1]);
    }

    #[test]
    fn an_xz_file_that_needs_too_much_memory_is_refused() {
        let content = disk(CHUNK);
        let mut file = xz(&content);
        // The first block header, after the 12-byte stream header: its size, flags (no sizes),
        // one filter (LZMA2, 1 byte of properties: the dictionary size), padding, CRC32.
        assert_eq!(&file[13..16], &[0x00, 0x21, 0x01]);
        let end = 12 + (usize::from(file[12]) + 1) * 4;
        file[16] = 36; // 1 GiB
        let mut crc = flate2::Crc::new();
        crc.update(&file[12..end - 4]);
        file[end - 4..end].copy_from_slice(&crc.sum().to_le_bytes());
        for probe in [false, true] {
            let (url, _) = serve(Plan { body: file.clone(), ..Plan::default() });
            let mut args = setup(&format!("xz-bomb-{probe}"), &url);
            args.probe = probe;
            let (code, message) = go(&args);
            assert_eq!(code, 0, "a terminal failure: {message}");
            assert_eq!(
                failed(&message, "UnsupportedFormat"),
                "the xz file needs more than 256 MiB to decompress (recompress it with a smaller dictionary, e.g. xz -6)"
            );
            assert!(!args.target.join(DISK_IMG).exists() && !args.target.join("disk.img.partial").exists());
        }
    }

    #[test]
    fn a_missing_or_empty_secret_or_configmap_fails() {
        let (url, requests) = serve(Plan { body: disk(CHUNK), ..Plan::default() });
        let mut args = setup("missing", &url);
        let empty = args.scratch.with_file_name("empty");
        secret(&empty, &[]);
        std::fs::write(empty.join(".hidden"), "no").unwrap();
        let absent = args.scratch.with_file_name("absent");
        for dir in [empty, absent] {
            args.headers_dir = Some(dir.clone());
            args.ca_dir = None;
            let (code, message) = go(&args);
            assert_eq!(code, 0, "a terminal failure: {message}");
            assert_eq!(
                failed(&message, "ImportFailed"),
                "the Secret of source.http.secretRef holds no key (it is missing or empty)"
            );
            args.headers_dir = None;
            args.ca_dir = Some(dir);
            let (code, message) = go(&args);
            assert_eq!(code, 0, "a terminal failure: {message}");
            assert_eq!(
                failed(&message, "ImportFailed"),
                "the ConfigMap of source.http.caConfigMap holds no key (it is missing or empty)"
            );
        }
        assert!(requests.lock().unwrap().is_empty());
    }
}
