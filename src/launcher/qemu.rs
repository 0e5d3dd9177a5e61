//! The QEMU side of the launcher: the accelerator check and the command line. Plain data, so
//! the command line is tested without running QEMU.

use std::{fs::OpenOptions, os::fd::AsRawFd, path::Path};

use super::disk::PreparedDisk;

/// The accelerator QEMU runs the guest with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accelerator {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation (Tiny Code Generator): works everywhere, 10-50x slower.
    Tcg,
}

impl Accelerator {
    /// `KVM` or `TCG`, as shown in the VM's status.
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Kvm => "KVM",
            Accelerator::Tcg => "TCG",
        }
    }
}

/// `_IO(KVMIO, 0x00)` and `_IO(KVMIO, 0x01)` from `<linux/kvm.h>`; the stable API version is 12.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
const KVM_API_VERSION: libc::c_int = 12;

/// Decides the accelerator by a real check: `/dev/kvm` opens read-write, speaks API version 12
/// and creates a VM. Returns the choice and why (for the log, the status and the Event).
pub fn detect(kvm: &Path) -> (Accelerator, String) {
    let device = match OpenOptions::new().read(true).write(true).open(kvm) {
        Ok(device) => device,
        Err(e) => return (Accelerator::Tcg, format!("{}: {e}", kvm.display())),
    };
    // SAFETY: ioctls on an open /dev/kvm descriptor with no argument pointer.
    let version = unsafe { libc::ioctl(device.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != KVM_API_VERSION {
        return (Accelerator::Tcg, format!("{}: KVM API version {version}, not {KVM_API_VERSION}", kvm.display()));
    }
    // SAFETY: as above; a non-negative result is a new descriptor we own and close.
    let vm = unsafe { libc::ioctl(device.as_raw_fd(), KVM_CREATE_VM, 0) };
    if vm < 0 {
        return (
            Accelerator::Tcg,
            format!("{}: cannot create a VM: {}", kvm.display(), std::io::Error::last_os_error()),
        );
    }
    // SAFETY: `vm` is a descriptor KVM_CREATE_VM just returned.
    unsafe { libc::close(vm) };
    (Accelerator::Kvm, format!("{} works", kvm.display()))
}

/// What QEMU runs.
#[derive(Clone, Debug)]
pub struct Machine<'a> {
    /// The VM's name: QEMU's `-name` and the SMBIOS system serial number the guest can read.
    pub name: &'a str,
    /// Virtual CPUs.
    pub cpu: u32,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    pub accelerator: Accelerator,
    /// The disks, in boot order.
    pub disks: &'a [PreparedDisk],
    /// The QMP socket the launcher controls QEMU through.
    pub qmp_socket: &'a Path,
    /// A second QMP socket for the readiness probe (`vmkeep probe`).
    pub probe_socket: &'a Path,
}

/// TCG's translation cache, MiB: QEMU's default (1 GiB) would count against the Pod's memory.
pub const TCG_TB_SIZE_MIB: u64 = 64;

/// The `qemu-system-x86_64` arguments: q35, no default devices, the serial console on stdio
/// (the launcher relays it), QMP on two sockets, virtio-blk disks (CD-ROMs on the q35 AHCI bus)
/// with boot order, user-mode networking on virtio-net.
pub fn args(m: &Machine) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));
    push(&["-name", &format!("guest={},debug-threads=on", m.name)]);
    push(&["-machine", "q35", "-nodefaults", "-no-user-config", "-display", "none"]);
    match m.accelerator {
        Accelerator::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        Accelerator::Tcg => push(&["-accel", &format!("tcg,tb-size={TCG_TB_SIZE_MIB}"), "-cpu", "max"]),
    }
    push(&["-smp", &m.cpu.to_string(), "-m", &format!("{}M", m.memory_mib)]);
    push(&["-smbios", &format!("type=1,serial={}", m.name)]);
    push(&["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", m.qmp_socket.display())]);
    push(&["-chardev", &format!("socket,id=probe,path={},server=on,wait=off", m.probe_socket.display())]);
    push(&["-mon", "chardev=probe,mode=control"]);
    let mut cdroms = 0;
    for (i, disk) in m.disks.iter().enumerate() {
        let id = format!("disk-{}", disk.name);
        let file = disk.file.display().to_string().replace(',', ",,");
        let readonly = if disk.read_only { "on" } else { "off" };
        if disk.cdrom {
            push(&["-drive", &format!("file={file},format=raw,if=none,id={id},media=cdrom,readonly=on")]);
            push(&["-device", &format!("ide-cd,drive={id},bus=ide.{cdroms},bootindex={}", i + 1)]);
            cdroms += 1;
        } else {
            push(&[
                "-drive",
                &format!("file={file},format=raw,if=none,id={id},readonly={readonly},cache=writeback,aio=threads"),
            ]);
            // The serial (at most 20 bytes) names the disk in the guest: /dev/disk/by-id/virtio-<name>.
            let serial: String = disk.name.chars().take(20).collect();
            push(&["-device", &format!("virtio-blk-pci,drive={id},serial={serial},bootindex={}", i + 1)]);
        }
    }
    push(&["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,romfile="]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_attaches_disks_in_boot_order() {
        let disks = [
            PreparedDisk { name: "root".into(), file: "/d/root/disk.img".into(), read_only: false, cdrom: false },
            PreparedDisk { name: "iso".into(), file: "/d/iso/disk.img".into(), read_only: true, cdrom: true },
            PreparedDisk { name: "data".into(), file: "/dev/vmkeep/data".into(), read_only: false, cdrom: false },
        ];
        let m = Machine {
            name: "vm-a",
            cpu: 2,
            memory_mib: 512,
            accelerator: Accelerator::Tcg,
            disks: &disks,
            qmp_socket: Path::new("/run/qmp.sock"),
            probe_socket: Path::new("/run/probe.sock"),
        };
        let line = args(&m).join(" ");
        for part in [
            "-machine q35 -nodefaults",
            "-accel tcg,tb-size=64 -cpu max -smp 2 -m 512M",
            "-smbios type=1,serial=vm-a",
            "virtio-blk-pci,drive=disk-root,serial=root,bootindex=1",
            "file=/d/iso/disk.img,format=raw,if=none,id=disk-iso,media=cdrom,readonly=on",
            "ide-cd,drive=disk-iso,bus=ide.0,bootindex=2",
            "virtio-blk-pci,drive=disk-data,serial=data,bootindex=3",
            "-qmp unix:/run/qmp.sock,server=on,wait=off",
        ] {
            assert!(line.contains(part), "{part} not in {line}");
        }
    }

    #[test]
    fn kvm_is_only_chosen_when_it_works() {
        let (accel, why) = detect(Path::new("/nonexistent/kvm"));
        assert_eq!(accel, Accelerator::Tcg);
        assert!(why.contains("/nonexistent/kvm"), "{why}");
    }
}
