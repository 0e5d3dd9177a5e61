//! The launcher's command-line contract: how the controller describes each disk to
//! `vmkeep launch` (built in [`crate::plan::build`], parsed in the launcher), in one place.
//!
//! A disk is one `--disk` argument, comma-separated `key=value` items and flags:
//! `name=root,path=/var/lib/vmkeep/disks/root,volumeMode=Filesystem,capacity=1073741824,blank`
//! (flags: `readOnly`, `cdrom`, `blank`). Readable in `kubectl get pod -o yaml`.

use std::{fmt, path::PathBuf, str::FromStr};

use crate::api::image::VolumeMode;

/// One disk of the VM, in Template (boot) order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchDisk {
    /// The disk's name in the Template (a DNS label).
    pub name: String,
    /// Where the PVC appears in the container: a mounted folder (Filesystem, holding
    /// `disk.img`) or a block device (Block).
    pub path: PathBuf,
    /// The PVC's volume mode.
    pub volume_mode: VolumeMode,
    /// Bytes the disk should have: the PVC's requested size. `disk.img` is created at this size
    /// rounded down to 1 MiB when the disk is blank and has none.
    pub capacity: u64,
    /// Attached read-only (CDROM images).
    pub read_only: bool,
    /// Attached as a CD-ROM drive (an image of type CDROM).
    pub cdrom: bool,
    /// The disk's content is blank (a volatile disk, or an image made with `source.blank`):
    /// a missing `disk.img` is created empty. Any other disk without its `disk.img` fails the
    /// start: an image's data is never replaced by an empty disk.
    pub blank: bool,
}

impl fmt::Display for LaunchDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.volume_mode {
            VolumeMode::Filesystem => "Filesystem",
            VolumeMode::Block => "Block",
        };
        write!(f, "name={},path={},volumeMode={mode},capacity={}", self.name, self.path.display(), self.capacity)?;
        for (on, flag) in [(self.read_only, "readOnly"), (self.cdrom, "cdrom"), (self.blank, "blank")] {
            if on {
                write!(f, ",{flag}")?;
            }
        }
        Ok(())
    }
}

impl FromStr for LaunchDisk {
    type Err = String;

    /// Errors: a missing `name`, `path` or `capacity`, an unknown key or flag, a bad number.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut name, mut path, mut capacity) = (None, None, None);
        let mut disk = LaunchDisk {
            name: String::new(),
            path: PathBuf::new(),
            volume_mode: VolumeMode::Filesystem,
            capacity: 0,
            read_only: false,
            cdrom: false,
            blank: false,
        };
        for item in s.split(',') {
            match item.split_once('=') {
                Some(("name", v)) => name = Some(v.to_owned()),
                Some(("path", v)) => path = Some(PathBuf::from(v)),
                Some(("capacity", v)) => capacity = Some(v.parse::<u64>().map_err(|e| format!("capacity {v}: {e}"))?),
                Some(("volumeMode", "Filesystem")) => disk.volume_mode = VolumeMode::Filesystem,
                Some(("volumeMode", "Block")) => disk.volume_mode = VolumeMode::Block,
                None if item == "readOnly" => disk.read_only = true,
                None if item == "cdrom" => disk.cdrom = true,
                None if item == "blank" => disk.blank = true,
                _ => return Err(format!("unknown disk item {item:?} in {s:?}")),
            }
        }
        disk.name = name.ok_or_else(|| format!("no name= in disk {s:?}"))?;
        disk.path = path.ok_or_else(|| format!("no path= in disk {s:?}"))?;
        disk.capacity = capacity.ok_or_else(|| format!("no capacity= in disk {s:?}"))?;
        Ok(disk)
    }
}

/// Why a launcher's container ended, the first word of its termination message
/// (`<Reason>: <message>`), which the controller shows as the VM's `status.lastExit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered itself off (QEMU exited 0 without being asked): with
    /// `runStrategy: Always` the kubelet starts the container again, with back-off.
    GuestPowerOff,
    /// Stopped on SIGTERM: the guest powered off after the ACPI power button.
    Stopped,
    /// Stopped on SIGTERM: the guest did not power off before the deadline; QEMU was told to
    /// quit, then killed.
    Killed,
    /// QEMU ended by itself with an error (its exit code is in the message).
    QemuExited,
    /// A disk is missing or unusable; QEMU was not started.
    DiskUnavailable,
    /// QEMU could not be started or controlled.
    LaunchFailed,
}

impl ExitReason {
    /// Every reason, for parsing.
    pub const ALL: [ExitReason; 6] = [
        ExitReason::GuestPowerOff,
        ExitReason::Stopped,
        ExitReason::Killed,
        ExitReason::QemuExited,
        ExitReason::DiskUnavailable,
        ExitReason::LaunchFailed,
    ];

    /// The reason's name (CamelCase, as in Kubernetes condition reasons).
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::GuestPowerOff => "GuestPowerOff",
            ExitReason::Stopped => "Stopped",
            ExitReason::Killed => "Killed",
            ExitReason::QemuExited => "QemuExited",
            ExitReason::DiskUnavailable => "DiskUnavailable",
            ExitReason::LaunchFailed => "LaunchFailed",
        }
    }

    /// Splits a termination message into its reason and text; `None` for a message the
    /// launcher did not write (e.g. an OOM kill leaves none).
    pub fn parse(message: &str) -> Option<(ExitReason, &str)> {
        let (word, rest) = message.split_once(": ")?;
        let reason = Self::ALL.into_iter().find(|r| r.as_str() == word)?;
        Some((reason, rest.trim_end()))
    }
}

/// The line the launcher prints (to the container log) once it has chosen the accelerator:
/// `vmkeep-launcher: accelerator=<KVM|TCG> <why>`; the controller reads it back.
pub const ACCELERATOR_LINE: &str = "vmkeep-launcher: accelerator=";

/// Finds the accelerator line in the start of a launcher's log: `(accelerator, why)`.
pub fn parse_accelerator(log: &str) -> Option<(String, String)> {
    let line = log.lines().find_map(|l| l.strip_prefix(ACCELERATOR_LINE))?;
    let (accel, why) = line.split_once(' ').unwrap_or((line, ""));
    Some((accel.to_owned(), why.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_round_trips_through_its_argument() {
        let disk = LaunchDisk {
            name: "root".into(),
            path: "/var/lib/vmkeep/disks/root".into(),
            volume_mode: VolumeMode::Block,
            capacity: 1 << 30,
            read_only: true,
            cdrom: true,
            blank: false,
        };
        let arg = disk.to_string();
        assert_eq!(
            arg,
            "name=root,path=/var/lib/vmkeep/disks/root,volumeMode=Block,capacity=1073741824,readOnly,cdrom"
        );
        assert_eq!(arg.parse::<LaunchDisk>(), Ok(disk));
        assert!("name=a,path=/x".parse::<LaunchDisk>().unwrap_err().contains("capacity"));
        assert!("name=a,path=/x,capacity=1,shiny".parse::<LaunchDisk>().unwrap_err().contains("shiny"));
    }

    #[test]
    fn exit_reasons_and_the_accelerator_line_parse_back() {
        assert_eq!(
            ExitReason::parse("QemuExited: QEMU exited with code 1\n"),
            Some((ExitReason::QemuExited, "QEMU exited with code 1"))
        );
        assert_eq!(ExitReason::parse("OOMKilled"), None);
        let log = "boot\nvmkeep-launcher: accelerator=TCG /dev/kvm: No such file or directory\nmore";
        assert_eq!(parse_accelerator(log), Some(("TCG".into(), "/dev/kvm: No such file or directory".into())));
    }
}
