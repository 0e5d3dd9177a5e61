//! Disks before QEMU starts: each PVC is where the controller said, a Filesystem PVC holds a raw
//! `disk.img` at its root (the layout of KubeVirt and CDI, so disks move between them), a blank
//! one is created sparse when absent, and every disk opens as it will be attached. Any problem
//! fails the start with a message naming the disk, never a silent empty disk.

use std::{
    ffi::CString,
    fs::{File, OpenOptions},
    os::unix::{ffi::OsStrExt, fs::FileTypeExt, fs::OpenOptionsExt},
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use super::spec::LaunchDisk;
use crate::api::image::VolumeMode;

/// The file of a Filesystem disk, at the root of its volume.
pub const DISK_IMG: &str = "disk.img";
/// How much smaller than its capacity a Filesystem PVC may be (filesystem overhead), as
/// KubeVirt tolerates (its default `filesystemOverhead` of 5.5 % rounded up to 10 %).
pub const TOLERATED_SHORTFALL: f64 = 0.10;
const MIB: u64 = 1 << 20;

/// A disk ready for QEMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreparedDisk {
    /// The disk's name in the Template.
    pub name: String,
    /// The raw file or block device QEMU opens.
    pub file: PathBuf,
    /// Attached read-only.
    pub read_only: bool,
    /// Attached as a CD-ROM drive.
    pub cdrom: bool,
}

/// Checks and prepares every disk, in order. Errors name the disk:
/// `disk root: no disk.img on its volume ...`.
pub fn prepare(disks: &[LaunchDisk]) -> Result<Vec<PreparedDisk>, String> {
    disks.iter().map(|d| prepare_one(d).map_err(|e| format!("disk {}: {e}", d.name))).collect()
}

fn prepare_one(disk: &LaunchDisk) -> Result<PreparedDisk, String> {
    let file = match disk.volume_mode {
        VolumeMode::Block => {
            let meta = std::fs::metadata(&disk.path)
                .map_err(|e| format!("its block device {} is not there: {e}", disk.path.display()))?;
            if !meta.file_type().is_block_device() {
                return Err(format!("{} is not a block device", disk.path.display()));
            }
            disk.path.clone()
        }
        VolumeMode::Filesystem => {
            if !disk.path.is_dir() {
                return Err(format!("its volume is not mounted at {}", disk.path.display()));
            }
            let file = disk.path.join(DISK_IMG);
            if !file.exists() {
                if disk.read_only || !disk.blank {
                    return Err(format!(
                        "no {DISK_IMG} on its volume ({}): the image's data is not there (vmkeep never \
                         boots an empty disk in place of an image)",
                        file.display()
                    ));
                }
                create_sparse(&file, disk.capacity)?;
            } else if !disk.read_only {
                grow(&file, disk.capacity)?;
            }
            file
        }
    };
    open(&file, disk.read_only).map_err(|e| format!("cannot open {}: {e}", file.display()))?;
    Ok(PreparedDisk { name: disk.name.clone(), file, read_only: disk.read_only, cdrom: disk.cdrom })
}

fn open(file: &Path, read_only: bool) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(!read_only).open(file)
}

/// Creates `file` sparse at `capacity` rounded down to 1 MiB, or at the space its filesystem
/// has when that is short by at most [`TOLERATED_SHORTFALL`] (with a Warning in the log).
fn create_sparse(file: &Path, capacity: u64) -> Result<(), String> {
    let mut size = capacity / MIB * MIB;
    if size == 0 {
        return Err(format!("its capacity ({capacity} bytes) is below 1 MiB"));
    }
    let available = available_bytes(file.parent().unwrap_or(Path::new("/")))?;
    if available < size {
        let fitting = available / MIB * MIB;
        if (fitting as f64) < size as f64 * (1.0 - TOLERATED_SHORTFALL) {
            return Err(format!(
                "its filesystem has {available} bytes free, the disk needs {size} (more than {}% short)",
                (TOLERATED_SHORTFALL * 100.0) as u32
            ));
        }
        warn!(file = %file.display(), capacity = size, available, "the filesystem is smaller than the disk: creating it at what fits");
        size = fitting;
    }
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o660)
        .open(file)
        .and_then(|f| f.set_len(size).and_then(|()| f.sync_all()))
        .map_err(|e| format!("cannot create {}: {e}", file.display()));
    if created.is_err() {
        let _ = std::fs::remove_file(file);
    }
    created?;
    info!(file = %file.display(), bytes = size, "created a blank sparse disk");
    Ok(())
}

/// Grows `file` (sparse) to `capacity` rounded down to 1 MiB when its volume grew past it (the
/// image's `spec.size` was raised and storage expanded the PVC), as KubeVirt does for
/// `disk.img`; never shrinks it. The guest sees the new size at this start. A filesystem with
/// less room than the growth leaves the file as it is (with a Warning in the log): the guest
/// would otherwise meet I/O errors when it fills it.
fn grow(file: &Path, capacity: u64) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let target = capacity / MIB * MIB;
    let meta = std::fs::metadata(file).map_err(|e| format!("cannot stat {}: {e}", file.display()))?;
    let len = meta.len();
    // Within the tolerated shortfall is what fits (see create_sparse): the volume did not grow.
    if (len as f64) >= target as f64 * (1.0 - TOLERATED_SHORTFALL) {
        return Ok(());
    }
    // The file is sparse: what it may still take is its length, not what it holds now.
    let available = available_bytes(file.parent().unwrap_or(Path::new("/")))?;
    let allocated = meta.blocks() * 512;
    if available + allocated < target {
        warn!(file = %file.display(), len, capacity = target, available, "not growing the disk: its filesystem has too little room");
        return Ok(());
    }
    OpenOptions::new()
        .write(true)
        .open(file)
        .and_then(|f| f.set_len(target).and_then(|()| f.sync_all()))
        .map_err(|e| format!("cannot grow {} to {target} bytes: {e}", file.display()))?;
    info!(file = %file.display(), from = len, to = target, "grew the disk to its volume's capacity");
    Ok(())
}

/// Bytes an unprivileged user may still write on the filesystem holding `dir` (`statvfs`).
fn available_bytes(dir: &Path) -> Result<u64, String> {
    let path = CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stat` a buffer of the right type, which
    // statvfs fills when it returns 0.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(format!("statvfs {}: {}", dir.display(), std::io::Error::last_os_error()));
    }
    // SAFETY: statvfs returned 0, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_bavail * stat.f_frsize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(dir: &Path, blank: bool, read_only: bool) -> LaunchDisk {
        LaunchDisk {
            name: "data".into(),
            path: dir.to_owned(),
            volume_mode: VolumeMode::Filesystem,
            capacity: (3 << 20) + 5,
            read_only,
            cdrom: false,
            blank,
        }
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmkeep-disk-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_blank_disk_is_created_sparse_at_its_capacity_rounded_down() {
        let dir = tempdir("blank");
        let prepared = prepare(&[disk(&dir, true, false)]).unwrap();
        assert_eq!(prepared[0].file, dir.join(DISK_IMG));
        assert_eq!(std::fs::metadata(dir.join(DISK_IMG)).unwrap().len(), 3 << 20);
        // A second start keeps what is there.
        std::fs::write(dir.join(DISK_IMG), b"kept").unwrap();
        prepare(&[disk(&dir, true, false)]).unwrap();
        assert!(std::fs::read(dir.join(DISK_IMG)).unwrap().starts_with(b"kept"));
    }

    #[test]
    fn a_disk_grows_to_a_larger_capacity_and_never_shrinks() {
        let dir = tempdir("grow");
        std::fs::write(dir.join(DISK_IMG), b"data").unwrap();
        prepare(&[disk(&dir, false, false)]).unwrap();
        let grown = std::fs::read(dir.join(DISK_IMG)).unwrap();
        assert_eq!(grown.len(), 3 << 20, "grown to the capacity rounded down");
        assert_eq!(&grown[..4], b"data", "the data stays");
        let mut small = disk(&dir, false, false);
        small.capacity = 1 << 20;
        prepare(&[small]).unwrap();
        assert_eq!(std::fs::metadata(dir.join(DISK_IMG)).unwrap().len(), 3 << 20, "never shrunk");
        // A read-only disk is left alone.
        std::fs::write(dir.join(DISK_IMG), b"ro").unwrap();
        prepare(&[disk(&dir, false, true)]).unwrap();
        assert_eq!(std::fs::read(dir.join(DISK_IMG)).unwrap(), b"ro");
    }

    #[test]
    fn an_image_without_its_data_or_a_missing_volume_fails_naming_the_disk() {
        let dir = tempdir("image");
        let err = prepare(&[disk(&dir, false, false)]).unwrap_err();
        assert!(err.starts_with("disk data: no disk.img on its volume"), "{err}");
        assert!(!dir.join(DISK_IMG).exists());
        let err = prepare(&[disk(&dir.join("absent"), true, false)]).unwrap_err();
        assert!(err.starts_with("disk data: its volume is not mounted at"), "{err}");
        let err = prepare(&[disk(&dir, true, true)]).unwrap_err();
        assert!(err.contains("no disk.img"), "a read-only disk is never created: {err}");
    }
}
