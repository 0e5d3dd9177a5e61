//! How a disk is cloned from its image's PVC: the clone strategy, chosen per clone as
//! docs/clones.md says, in one place.
//!
//! - `csi-clone`: a PVC with `dataSource` = the source PVC; the CSI driver copies (fast, no Pod).
//! - `copy`: an empty PVC filled by a copier Pod (`vmkeep copy`), host-assisted; works with any
//!   storage, and across StorageClasses.
//! - `snapshot`: a `VolumeSnapshot` of the source, then a PVC from it (where the cluster serves
//!   `snapshot.storage.k8s.io/v1` and has a VolumeSnapshotClass for the class's driver; else
//!   `copy`, saying why). Image clones only in this version: a VM's clone asking for it is copied.
//!
//! The choice: the StorageClass annotation [`STRATEGY_ANNOTATION`], else the operator's
//! `--clone-strategy` when it names one, else `auto`: `csi-clone`, or `copy` when the
//! provisioner is known not to clone (it would bind an empty volume). `copy` also replaces
//! `csi-clone` for a clone into another StorageClass (CSI clones stay within one).

use std::fmt;

/// The StorageClass annotation that picks the clone strategy of clones in that class.
pub const STRATEGY_ANNOTATION: &str = "vmkeep.io/clone-strategy";

/// Provisioners that accept a `dataSource` but do not copy it: a clone would be an empty volume.
pub const NON_CLONING_PROVISIONERS: [&str; 3] =
    ["kubernetes.io/host-path", "kubernetes.io/no-provisioner", "rancher.io/local-path"];

/// A clone strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CloneStrategy {
    CsiClone,
    Copy,
    Snapshot,
}

impl CloneStrategy {
    /// The name in annotations, flags and status: `csi-clone`, `copy`, `snapshot`.
    pub fn as_str(self) -> &'static str {
        match self {
            CloneStrategy::CsiClone => "csi-clone",
            CloneStrategy::Copy => "copy",
            CloneStrategy::Snapshot => "snapshot",
        }
    }

    /// Parses a name; `None` for anything else.
    pub fn parse(name: &str) -> Option<Self> {
        [CloneStrategy::CsiClone, CloneStrategy::Copy, CloneStrategy::Snapshot].into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for CloneStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is known of the StorageClass a clone is made in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassInfo {
    /// The class's name (the cluster default's when the PVC names none).
    pub name: Option<String>,
    pub provisioner: Option<String>,
    /// Its [`STRATEGY_ANNOTATION`], as written.
    pub annotation: Option<String>,
    /// Its `volumeBindingMode` is `WaitForFirstConsumer`.
    pub binds_late: bool,
    /// Its `allowVolumeExpansion`: PVCs of the class may be asked to grow.
    pub allows_expansion: bool,
    /// The VolumeSnapshotClass for its driver, when `snapshot` is asked for and one exists.
    pub snapshot_class: Option<String>,
    /// Why `snapshot` cannot be had, when it is asked for and cannot (no snapshot API, no
    /// VolumeSnapshotClass for the driver).
    pub snapshot_unavailable: Option<String>,
}

/// A strategy chosen for one clone, and why it is not the one asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chosen {
    pub strategy: CloneStrategy,
    /// Why `copy` replaced the strategy asked for; `None` when none did.
    pub fallback: Option<String>,
}

/// Chooses the strategy of a clone in class `target` from a source in class `source` (see the
/// module); `default` is the operator's `--clone-strategy` (`None`: auto).
pub fn choose(target: &ClassInfo, source: Option<&str>, default: Option<CloneStrategy>) -> Chosen {
    let class = target.name.as_deref().unwrap_or("(default)");
    let asked = match target.annotation.as_deref() {
        Some(name) => match CloneStrategy::parse(name) {
            Some(s) => s,
            None => {
                return Chosen {
                    strategy: CloneStrategy::Copy,
                    fallback: Some(format!(
                        "StorageClass {class} asks for clone strategy {name:?}, which is not csi-clone, copy or snapshot"
                    )),
                };
            }
        },
        None => default.unwrap_or(CloneStrategy::CsiClone),
    };
    // Only `auto` second-guesses the provisioner; a StorageClass or operator that names
    // csi-clone is trusted (a CSI driver may clone under a name vmkeep does not know).
    let auto = target.annotation.is_none() && default.is_none();
    let fallback = match asked {
        CloneStrategy::Copy => None,
        CloneStrategy::Snapshot => match &target.snapshot_class {
            Some(_) => None,
            None => Some(
                target
                    .snapshot_unavailable
                    .clone()
                    .unwrap_or_else(|| format!("StorageClass {class} has no VolumeSnapshotClass for its driver")),
            ),
        },
        CloneStrategy::CsiClone => {
            if let Some(p) = target.provisioner.as_deref().filter(|p| auto && NON_CLONING_PROVISIONERS.contains(p)) {
                Some(format!("provisioner {p} of StorageClass {class} cannot clone volumes"))
            } else if let (Some(s), Some(t)) = (source, target.name.as_deref())
                && s != t
            {
                Some(format!("the source is in StorageClass {s}, the clone in {t}: CSI clones stay within one class"))
            } else {
                None
            }
        }
    };
    match fallback {
        Some(why) => Chosen { strategy: CloneStrategy::Copy, fallback: Some(why) },
        None => Chosen { strategy: asked, fallback: None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(name: &str, provisioner: &str, annotation: Option<&str>) -> ClassInfo {
        ClassInfo {
            name: Some(name.into()),
            provisioner: Some(provisioner.into()),
            annotation: annotation.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn the_strategy_follows_the_class_the_operator_and_what_storage_can_do() {
        let csi = class("fast", "csi.example.com", None);
        assert_eq!(choose(&csi, Some("fast"), None), Chosen { strategy: CloneStrategy::CsiClone, fallback: None });
        assert_eq!(choose(&csi, Some("fast"), Some(CloneStrategy::Copy)).strategy, CloneStrategy::Copy);
        let annotated = class("fast", "csi.example.com", Some("copy"));
        assert_eq!(choose(&annotated, Some("fast"), Some(CloneStrategy::CsiClone)).strategy, CloneStrategy::Copy);
        let hostpath = class("standard", "kubernetes.io/host-path", None);
        // Named explicitly, csi-clone is trusted; only auto falls back.
        assert_eq!(
            choose(&hostpath, Some("standard"), Some(CloneStrategy::CsiClone)).strategy,
            CloneStrategy::CsiClone
        );
        let chosen = choose(&hostpath, Some("standard"), None);
        assert_eq!(chosen.strategy, CloneStrategy::Copy);
        assert_eq!(
            chosen.fallback.as_deref(),
            Some("provisioner kubernetes.io/host-path of StorageClass standard cannot clone volumes")
        );
        let across = choose(&csi, Some("slow"), None);
        assert_eq!(across.strategy, CloneStrategy::Copy);
        assert!(across.fallback.unwrap().contains("StorageClass slow, the clone in fast"));
        let snapshot = choose(&class("fast", "csi.example.com", Some("snapshot")), Some("fast"), None);
        assert_eq!(snapshot.strategy, CloneStrategy::Copy);
        let unserved = ClassInfo {
            snapshot_unavailable: Some("the cluster serves no snapshot.storage.k8s.io/v1".into()),
            ..class("fast", "csi.example.com", Some("snapshot"))
        };
        assert_eq!(
            choose(&unserved, None, None).fallback.as_deref(),
            Some("the cluster serves no snapshot.storage.k8s.io/v1")
        );
        let snapshots = ClassInfo {
            snapshot_class: Some("csi-snaps".into()),
            ..class("fast", "csi.example.com", Some("snapshot"))
        };
        assert_eq!(
            choose(&snapshots, Some("fast"), None),
            Chosen { strategy: CloneStrategy::Snapshot, fallback: None }
        );
        let bad = choose(&class("fast", "csi.example.com", Some("rsync")), Some("fast"), None);
        assert!(bad.fallback.unwrap().contains("\"rsync\""));
    }
}
