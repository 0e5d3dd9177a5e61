//! Every name and label vmkeep gives to what it creates: one place, so that the controllers,
//! the tests and users agree.

/// The prefix of vmkeep's own labels and annotations.
pub const VMKEEP_PREFIX: &str = "vmkeep.io/";
/// The label every object vmkeep creates carries.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const MANAGER: &str = "vmkeep";
/// The label selector of everything vmkeep creates.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=vmkeep";
/// The label naming the VirtualMachine a PVC or Pod belongs to.
pub const VM_LABEL: &str = "vmkeep.io/virtual-machine";
/// The label recording the uid of the VirtualMachine a launcher Pod runs: how the Pod is known
/// as that VM's even after an orphaning deletion removed its owner reference.
pub const VM_UID_LABEL: &str = "vmkeep.io/virtual-machine-uid";
/// The label recording the uid of the Image an image PVC was made for (image PVCs carry no
/// owner reference: their fate is decided by the Image's finalizer, not by garbage collection).
pub const IMAGE_UID_LABEL: &str = "vmkeep.io/image-uid";
/// The annotation naming the Image of a claim Lease or PVC (names can exceed a label's 63).
pub const IMAGE_ANNOTATION: &str = "vmkeep.io/image";
/// The annotation naming the VirtualMachine that holds a claim Lease.
pub const HOLDER_ANNOTATION: &str = "vmkeep.io/virtual-machine";
/// The field manager of every write vmkeep makes.
pub const FIELD_MANAGER: &str = "vmkeep";
/// The finalizer that fences a VM's persistent-image claims behind its launcher Pod.
pub const VM_FINALIZER: &str = "vmkeep.io/release-claims";
/// The finalizer that keeps an Image while VirtualMachines use it.
pub const IMAGE_FINALIZER: &str = "vmkeep.io/image-in-use";

/// The label naming the VirtualMachine a copier Pod fills a disk for (not [`VM_LABEL`]: a copier
/// mounts no persistent image, so it never fences a claim).
pub const COPY_FOR_LABEL: &str = "vmkeep.io/copy-for";
/// The annotation of a clone PVC recording its clone strategy (`csi-clone`, `copy`).
pub const CLONE_STRATEGY_ANNOTATION: &str = "vmkeep.io/clone-strategy";
/// The annotation of a clone PVC saying why `copy` replaced the strategy asked for.
pub const CLONE_FALLBACK_ANNOTATION: &str = "vmkeep.io/clone-fallback";
/// The annotation of a `copy` clone PVC naming the PVC it is copied from.
pub const COPY_SOURCE_ANNOTATION: &str = "vmkeep.io/copy-source";
/// The annotation of a `copy` clone PVC recording the sha256 of what was copied into it
/// (`sha256:<hex>`), written once its copier succeeded: the clone is complete.
pub const DIGEST_ANNOTATION: &str = "vmkeep.io/digest";

/// The label naming the Image a helper Pod (importer, size probe, copier) moves data for.
pub const TRANSFER_FOR_LABEL: &str = "vmkeep.io/transfer-for";
/// The annotation of an Image's helper Pod recording the Image `metadata.generation` it was
/// made for: a failed one is replaced once the spec changes.
pub const GENERATION_ANNOTATION: &str = "vmkeep.io/generation";
/// The annotation of an Image PVC filled by an import, naming the URL: the PVC waits for its
/// data until [`DIGEST_ANNOTATION`] is set.
pub const IMPORT_SOURCE_ANNOTATION: &str = "vmkeep.io/import-source";

/// The annotation of an imported image PVC recording how many times its import retried.
pub const IMPORT_RETRIES_ANNOTATION: &str = "vmkeep.io/import-retries";

/// The importer Pod that fills image PVC `pvc` from a URL: `<pvc>-import`.
pub fn importer_pod(namespace: &str, pvc: &str) -> String {
    pod(namespace, &format!("{pvc}-import"))
}

/// The Pod that finds the size of an import without `spec.size`: `<pvc>-size`.
pub fn size_probe_pod(namespace: &str, pvc: &str) -> String {
    pod(namespace, &format!("{pvc}-size"))
}

/// The Pod that mounts image PVC `pvc` once so that a `WaitForFirstConsumer` class binds it:
/// `<pvc>-bind`.
pub fn binder_pod(namespace: &str, pvc: &str) -> String {
    pod(namespace, &format!("{pvc}-bind"))
}

/// The VolumeSnapshot a `snapshot` clone PVC `pvc` is made from: `<pvc>-snapshot`.
pub fn snapshot(pvc: &str) -> String {
    fit(&format!("{pvc}-snapshot"), 253)
}

/// The annotation of a `snapshot` clone PVC naming the VolumeSnapshot it was made from.
pub const SNAPSHOT_ANNOTATION: &str = "vmkeep.io/snapshot";

/// The copier Pod that fills a `copy` clone PVC: `<pvc>-copy`.
pub fn copier_pod(namespace: &str, pvc: &str) -> String {
    pod(namespace, &format!("{pvc}-copy"))
}

/// The PVC of a VM's disk: `<vm>-<disk>`.
pub fn vm_disk_pvc(vm: &str, disk: &str) -> String {
    fit(&format!("{vm}-{disk}"), 253)
}

/// The launcher Pod of a VM: `<vm>-launcher`.
pub fn launcher_pod(namespace: &str, vm: &str) -> String {
    pod(namespace, &format!("{vm}-launcher"))
}

/// The Pod volume of a VM disk (a DNS label: at most 63 characters).
pub fn disk_volume(disk: &str) -> String {
    fit(&format!("disk-{disk}"), 63)
}

/// The PVC vmkeep creates for an Image: `<image>-image`.
pub fn image_pvc(image: &str) -> String {
    fit(&format!("{image}-image"), 253)
}

/// The Lease that is the exclusive claim on a persistent Image.
pub fn claim_lease(image: &str) -> String {
    fit(&format!("vmkeep-claim-{image}"), 253)
}

/// The longest Pod name the kubelet can start in `namespace`. It keeps each Pod's logs in
/// `/var/log/pods/<namespace>_<pod>_<uid>`, a single path component, which Linux filesystems
/// limit to 255 bytes (`NAME_MAX`); with the 36-character uid and two `_` that leaves 217 for
/// the namespace and the Pod's name together. A longer name (valid up to 253) makes a Pod the
/// kubelet never starts: its sandbox fails with "file name too long", again every few seconds,
/// and nothing shows in the Pod's status (the kubelet's `BuildPodLogsDirectory`; found by the
/// fault suite, docs/reliability.md). At most 253, at least 154 (namespaces have at most 63).
pub fn pod_name_max(namespace: &str) -> usize {
    POD_LOG_DIRECTORY_MAX.saturating_sub(namespace.len()).min(253)
}

/// `NAME_MAX` (255) less a Pod uid (36) and the two `_` of the kubelet's Pod log folder name.
const POD_LOG_DIRECTORY_MAX: usize = 255 - 36 - 2;

/// A Pod name in `namespace`: `name`, or a shorter one made by [`fit`] when the kubelet could
/// not start a Pod of that name ([`pod_name_max`]). A name that fits is kept as it is, so every
/// Pod made before this rule keeps its name.
fn pod(namespace: &str, name: &str) -> String {
    fit(name, pod_name_max(namespace))
}

/// A label value naming an object (label values have at most 63 characters).
pub fn label_value(name: &str) -> String {
    fit(name, 63)
}

/// `name` if it has at most `max` characters, else a prefix of it and a stable hash of the
/// whole, so every long name still maps to exactly one short one.
pub fn fit(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_owned();
    }
    let mut cut = max - 17;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    let prefix = name[..cut].trim_end_matches(['-', '.']);
    format!("{prefix}-{:016x}", fnv1a(name.as_bytes()))
}

/// FNV-1a: a stable hash (unlike std's), so every replica computes the same name.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_fit_and_differ() {
        assert_eq!(claim_lease("ubuntu"), "vmkeep-claim-ubuntu");
        let a = "a".repeat(253);
        let b = format!("{}b", "a".repeat(252));
        assert!(claim_lease(&a).len() <= 253);
        assert_ne!(claim_lease(&a), claim_lease(&b));
        assert_eq!(claim_lease(&a), claim_lease(&a));
        assert_eq!(label_value(&a).len(), 63);
        assert_eq!(disk_volume(&"d".repeat(63)).len(), 63);
        assert!(!fit(&format!("{}.{}", "x".repeat(45), "y".repeat(40)), 63).contains(".-"));
    }

    #[test]
    fn pod_names_fit_the_kubelets_log_folder() {
        // The kubelet's folder is `<namespace>_<pod>_<uid>`: at most 255 bytes.
        let folder = |ns: &str, pod: &str| ns.len() + 1 + pod.len() + 1 + 36;
        assert_eq!(launcher_pod("default", "vm-a"), "vm-a-launcher");
        for ns in ["a", "chaos-1733145600-12345678", &"n".repeat(63)] {
            for vm in [5, 150, 208, 253] {
                let vm = "v".repeat(vm);
                for pod in [launcher_pod(ns, &vm), copier_pod(ns, &vm_disk_pvc(&vm, "root")), importer_pod(ns, &vm)] {
                    assert!(folder(ns, &pod) <= 255, "{ns}/{pod}: {}", folder(ns, &pod));
                    assert!(pod.len() <= 253);
                }
            }
        }
        // A 208-character VM in a 26-character namespace: its launcher's folder would be 282 bytes.
        let (ns, vm) = ("x".repeat(26), "v".repeat(208));
        let pod = launcher_pod(&ns, &vm);
        assert_eq!(pod.len(), 217 - 26);
        assert_ne!(pod, launcher_pod(&ns, &format!("{}w", "v".repeat(207))));
        assert_eq!(pod_name_max(""), 217);
        assert_eq!(pod_name_max(&"n".repeat(63)), 154);
    }
}
