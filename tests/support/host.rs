//! What the tests and `vmkeep-bench --boot` do on this machine itself, beside the local
//! cluster's node: build the test guest, put its disk on a host-path volume, and read a launcher
//! Pod's memory from `/proc`. Plain `std`: `src/bin/vmkeep-bench/boot.rs` includes this file
//! too (`#[path]`), so the two measure and stage guests the same way.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// Builds the test guest of `hack/guest.sh` in the repository `repo` (once, cached; installs
/// Debian packages, so root only) and returns the path of its BIOS-bootable raw disk; its
/// variants lie beside it.
pub fn build_guest(repo: &Path) -> Result<PathBuf, String> {
    let out = Command::new("bash")
        .arg(repo.join("hack/guest.sh"))
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run hack/guest.sh: {e}"))?;
    if !out.status.success() {
        return Err("hack/guest.sh failed".into());
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().lines().last().unwrap_or_default()))
}

/// Copies the guest disk `source` (sparse) into folder `dir` as `disk.img`, both writable by
/// anyone: the launcher runs as a non-root user and writes to its disk, as to a provisioner's
/// volume. Returns the disk's path.
pub fn stage_guest_disk(source: &Path, dir: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let disk = dir.join("disk.img");
    let copied = Command::new("cp")
        .arg("--sparse=always")
        .arg(source)
        .arg(&disk)
        .status()
        .map_err(|e| format!("cannot run cp: {e}"))?;
    if !copied.success() {
        return Err(format!("cannot copy {} to {}", source.display(), disk.display()));
    }
    for (path, mode) in [(dir, 0o777), (disk.as_path(), 0o666)] {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
    }
    Ok(disk)
}

/// The manifests that make folder `dir` of this machine Image `image` of namespace `namespace`:
/// a host-path PersistentVolume `pv` (64Mi, reclaim `Retain`: the folder is the caller's to
/// remove) in StorageClass `class`, bound in advance to PVC `<image>-disk`; then that PVC and
/// the Image adopting it (`source.pvc`). Returns (the PersistentVolume, the PVC and the Image),
/// as YAML.
pub fn guest_volume_manifests(
    pv: &str,
    dir: &Path,
    namespace: &str,
    image: &str,
    persistent: bool,
    class: &str,
) -> (String, String) {
    let volume = format!(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: {pv}}}\n\
         spec: {{capacity: {{storage: 64Mi}}, accessModes: [ReadWriteOnce], storageClassName: {class},\n\
         persistentVolumeReclaimPolicy: Retain, hostPath: {{path: {}}}, claimRef: {{namespace: {namespace}, name: {image}-disk}}}}\n",
        dir.display()
    );
    let claim_and_image = format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: {image}-disk}}\n\
         spec: {{accessModes: [ReadWriteOnce], storageClassName: {class}, volumeName: {pv}, resources: {{requests: {{storage: 64Mi}}}}}}\n---\n\
         apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {{name: {image}}}\n\
         spec: {{persistent: {persistent}, source: {{pvc: {{name: {image}-disk}}}}}}\n"
    );
    (volume, claim_and_image)
}

/// The memory of one launcher Pod as this machine's kernel sees it, MiB.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LauncherMemory {
    /// QEMU's resident set outside the guest's RAM: device models, the TCG translation cache,
    /// libraries, I/O buffers.
    pub qemu_outside_guest_mib: u64,
    /// The guest RAM QEMU touched (resident): at most the guest's memory.
    pub guest_touched_mib: u64,
    /// `vmkeep launch`'s resident set (PID 1 of the container: console relay, QMP, stop).
    pub launch_mib: u64,
}

/// The memory of the launcher Pod with uid `pod_uid` whose guest has `guest_mib` MiB of RAM,
/// read from `/proc` on this machine (the Pod runs on the local node): its processes are those
/// whose cgroup names the Pod. `None` while QEMU or `vmkeep launch` is not found.
pub fn launcher_memory(pod_uid: &str, guest_mib: u64) -> Option<LauncherMemory> {
    let needle = format!("pod{pod_uid}");
    let mut qemu = None;
    let mut launch = None;
    for entry in std::fs::read_dir("/proc").ok()?.filter_map(Result::ok) {
        let Ok(cgroup) = std::fs::read_to_string(entry.path().join("cgroup")) else { continue };
        if !cgroup.contains(&needle) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.starts_with(b"qemu-system") {
            qemu = Some(entry.path());
        } else if cmdline.windows(6).any(|w| w == b"launch") {
            launch = Some(entry.path());
        }
    }
    let rss = |process: &Path| -> Option<u64> {
        let text = std::fs::read_to_string(process.join("status")).ok()?;
        let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb / 1024)
    };
    let qemu = qemu?;
    // The guest's RAM is one anonymous mapping of its size: its Rss is what the guest touched.
    let smaps = std::fs::read_to_string(qemu.join("smaps")).ok()?;
    let mut size = 0;
    let mut guest = 0;
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            size = v.trim().trim_end_matches(" kB").parse::<u64>().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("Rss:")
            && size == guest_mib * 1024
        {
            guest = v.trim().trim_end_matches(" kB").parse::<u64>().unwrap_or(0) / 1024;
        }
    }
    let total = rss(&qemu)?;
    Some(LauncherMemory {
        qemu_outside_guest_mib: total.saturating_sub(guest),
        guest_touched_mib: guest,
        launch_mib: rss(&launch?)?,
    })
}
