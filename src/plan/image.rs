//! What an Image should be: its PVC, the persistence mode in force, its phase and conditions,
//! and whether its deletion may go ahead. Plain data in, plain data out.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::core::v1::Pod,
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::Time},
};
use kube::ResourceExt;

use super::{
    build,
    clone::{Chosen, CloneStrategy},
    conditions::{Cond, Health, merge},
    mover::MoverState,
    names, quantity, reason,
    virtual_machine::CloneView,
};
use crate::{
    api::{
        ConditionStatus, Image, ImageSpec, ImageStatus,
        image::{ClaimHolder, ImagePhase, TransferPod, VolumeMode},
    },
    mover::import::{self, ImportResult, Progress},
};

/// How often the progress of a running import is read (from its importer's log) and shown:
/// at most one status write per importing image per period.
pub const PROGRESS_PERIOD: Duration = Duration::from_secs(5);

pub use super::conditions::READY;
pub const IN_USE: &str = "InUse";
pub const PERSISTENCE_CHANGE_PENDING: &str = "PersistenceChangePending";

/// The PVC behind an image, as observed.
#[derive(Clone, Debug, PartialEq)]
pub enum ImagePvc {
    Missing,
    /// It exists; `ours` when vmkeep created it for this Image (its image-uid label, or the
    /// controller reference older versions gave it).
    Present {
        ours: bool,
        /// vmkeep made it, but not for this Image: another Image's PVC or a VM's disk.
        vmkeep_disk: bool,
        phase: Option<String>,
        /// What storage gave it (`status.capacity`), or what it asks for before it binds.
        capacity: Option<Quantity>,
        /// What it asks for (`spec.resources.requests.storage`).
        requested: Option<Quantity>,
        /// Storage expanded its volume; the filesystem grows when a Pod next mounts it
        /// (condition `FileSystemResizePending`).
        resize_pending: bool,
        storage_class: Option<String>,
        volume_mode: Option<String>,
        /// What its annotations say of how it is filled (strategy, copy source, import URL,
        /// digest).
        fill: Box<CloneView>,
    },
}

/// What a helper Pod of the Image does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `vmkeep import` into the image PVC.
    Import,
    /// `vmkeep import --probe`: the size an import without `spec.size` needs.
    Probe,
    /// `vmkeep copy` into the image PVC (a `copy` clone of an Image or a VM disk).
    Copy,
    /// Mounts the image PVC once, so that a `WaitForFirstConsumer` class binds it.
    Bind,
}

impl Role {
    /// Every role, with the name of its Pod for image PVC `pvc`.
    pub fn pods(namespace: &str, pvc: &str) -> [(Role, String); 4] {
        [
            (Role::Import, names::importer_pod(namespace, pvc)),
            (Role::Probe, names::size_probe_pod(namespace, pvc)),
            (Role::Copy, names::copier_pod(namespace, pvc)),
            (Role::Bind, names::binder_pod(namespace, pvc)),
        ]
    }

    /// The role of the helper Pod `pod` of image PVC `pvc`, if it is one.
    pub fn of(namespace: &str, pvc: &str, pod: &str) -> Option<Role> {
        Role::pods(namespace, pvc).into_iter().find(|(_, name)| name == pod).map(|(role, _)| role)
    }

    fn as_str(self) -> &'static str {
        match self {
            Role::Import => "Import",
            Role::Probe => "Probe",
            Role::Copy => "Copy",
            Role::Bind => "Bind",
        }
    }
}

/// A helper Pod of the Image, as observed.
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedMover {
    pub name: String,
    pub role: Role,
    pub state: MoverState,
    /// The Pod's phase.
    pub phase: Option<String>,
    /// The Image generation it was made for ([`names::GENERATION_ANNOTATION`]).
    pub generation: Option<i64>,
}

/// A VolumeSnapshot of an Image's `snapshot` clone, as observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotView {
    /// Controlled by this Image.
    pub ours: bool,
    /// `status.readyToUse`.
    pub ready: bool,
    /// `status.error.message`, if any.
    pub error: Option<String>,
}

/// The disk of a VirtualMachine that `source.virtualMachineDisk` names, as observed.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceDisk {
    /// Its PVC (the VM's clone or blank disk, or a persistent image's PVC).
    pub pvc: String,
    pub capacity: Option<Quantity>,
    pub storage_class: Option<String>,
    pub volume_mode: VolumeMode,
    /// Its content may be missing (a blank disk never written).
    pub blank: bool,
    /// The sha256 recorded for it, if any.
    pub digest: Option<String>,
}

/// The VirtualMachine that `source.virtualMachineDisk` names, as observed.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceVm {
    /// It runs, starts or stops: a launcher Pod exists, or it is not `Stopped`.
    pub running: bool,
    /// The disk, once the VM records it.
    pub disk: Option<SourceDisk>,
}

/// What the Image controller observed about one Image.
#[derive(Clone, Debug)]
pub struct ImageObservation<'a> {
    pub image: &'a Image,
    pub pvc: ImagePvc,
    /// For `source.image`: the source Image, if it exists.
    pub source_image: Option<&'a Image>,
    /// The VirtualMachines using this image now, sorted.
    pub consumers: Vec<String>,
    /// The holder of the claim Lease, if any.
    pub claim: Option<ClaimHolder>,
    /// For `source.image`: the VirtualMachine that writes the source now (it holds the
    /// persistent source's claim and its launcher runs). A holder that is Halted does not write.
    pub source_writer: Option<String>,
    /// For `source.virtualMachineDisk`: the VM, if it exists.
    pub source_vm: Option<SourceVm>,
    /// The clone strategy for the image's PVC, when it is a clone still to be made (chosen by
    /// [`super::clone::choose`] from the StorageClass).
    pub clone_choice: Option<Chosen>,
    /// The Image's helper Pods (importer, size probe, copier) at their names.
    pub movers: Vec<ObservedMover>,
    /// The VolumeSnapshotClass of a `snapshot` clone still to be made.
    pub snapshot_class: Option<String>,
    /// The VolumeSnapshot of a `snapshot` clone ([`names::snapshot`]), as observed.
    pub snapshot: Option<SnapshotView>,
    /// The image's PVC is unbound in a `WaitForFirstConsumer` StorageClass: it binds when a Pod
    /// first mounts it.
    pub binds_late: bool,
    /// Whether the StorageClass of the image's PVC allows volume expansion; only looked up when
    /// `spec.size` asks for more than the PVC does (`None` otherwise).
    pub allows_expansion: Option<bool>,
    /// Images wait to be cloned from this one (Pending or Cloning): it is kept, and bound in a
    /// `WaitForFirstConsumer` class.
    pub wanted_by_clones: bool,
    /// The Images being cloned from this one now (phase Cloning), sorted: a deleted image stays
    /// until they have their data (one still waiting does not hold it).
    pub cloning_now: Vec<String>,
    /// The last progress its importer logged.
    pub progress: Option<Progress>,
    /// The image helper Pods run (the launcher image).
    pub launcher_image: &'a str,
}

/// A PVC to create for an image.
#[derive(Clone, Debug, PartialEq)]
pub struct PvcRequest {
    pub name: String,
    pub size: Quantity,
    pub storage_class: Option<String>,
    pub volume_mode: VolumeMode,
    /// Clone from this PVC (same namespace), through its `dataSource` (`csi-clone`).
    pub clone_from: Option<String>,
    /// Restore this VolumeSnapshot (same namespace), through its `dataSource` (`snapshot`).
    pub from_snapshot: Option<String>,
    /// vmkeep's annotations: clone strategy, fallback, copy source, import URL, inherited digest.
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finalizer {
    Add,
    Keep,
    /// Deletion may go ahead: nothing uses the image any more.
    Remove,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ImagePlan {
    pub create_pvc: Option<PvcRequest>,
    /// The image's own PVC to delete: the image is deleted and nothing uses it any more (image
    /// PVCs have no owner reference, so this, not garbage collection, is how they go, whatever
    /// propagation policy deleted the Image); or an import into it never completed and
    /// `spec.size` grew past it (it is made again at the new size).
    pub delete_pvc: Option<String>,
    pub finalizer: Finalizer,
    /// Helper Pods to create (importer, size probe, copier, binder).
    pub create_pods: Vec<Pod>,
    /// The VolumeSnapshot to take for a `snapshot` clone.
    pub create_snapshot: Option<kube::api::DynamicObject>,
    /// The VolumeSnapshot to delete: the clone made from it is bound.
    pub delete_snapshot: Option<String>,
    /// Ask storage to expand the image's PVC `(pvc, size)` (`spec.size` grew).
    pub expand_pvc: Option<(String, Quantity)>,
    /// Helper Pods to delete (done, or made for an older spec).
    pub delete_pods: Vec<String>,
    /// The digest to record on the image PVC ([`names::DIGEST_ANNOTATION`]) and, for an import,
    /// its retries: its data is complete.
    pub record: Option<Record>,
    /// Plan again after this long (the progress of an import).
    pub requeue: Option<Duration>,
    pub status: ImageStatus,
    /// An Event to publish (once, when the image enters a state a user acts on).
    pub event: Option<ImageEvent>,
}

/// The result of an import or copy, recorded on the image PVC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub pvc: String,
    pub digest: String,
    /// For an import: how many times it retried.
    pub retries: Option<u32>,
}

/// Where the image's PVC comes from, or why it cannot be had yet.
enum Source {
    /// The PVC to use, and the request to create it when it is missing (None: adopt, or a
    /// clone that exists already); `clone` while the PVC is a clone of another image.
    Pvc {
        name: String,
        create: Option<PvcRequest>,
        clone: bool,
    },
    Blocked {
        phase: ImagePhase,
        reason: &'static str,
        message: String,
    },
    /// An import without `spec.size`: its size probe is to be made.
    Probe {
        pvc: String,
    },
    /// A size probe made for an older spec: it goes, and a new one comes.
    Reprobe {
        pod: String,
    },
    /// A `snapshot` clone: the VolumeSnapshot `name` of PVC `source` is to be taken.
    TakeSnapshot {
        name: String,
        source: String,
        class: String,
    },
}

/// Why an Image's spec can never work whatever else exists, as `(reason, message)`: its source
/// names not exactly one kind, or a blank image has no positive size. The controller reports it
/// as phase `Error`; the admission webhook denies it with the same message.
pub fn spec_error(spec: &ImageSpec) -> Option<(&'static str, String)> {
    let src = &spec.source;
    let kinds = [
        src.blank.is_some(),
        src.pvc.is_some(),
        src.image.is_some(),
        src.http.is_some(),
        src.virtual_machine_disk.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() != 1 {
        let message = "spec.source must name exactly one of blank, pvc, image, http, virtualMachineDisk";
        return Some((reason::INVALID_SOURCE, message.into()));
    }
    if src.blank.is_some() {
        let Some(size) = &spec.size else {
            return Some((reason::MISSING_SIZE, "spec.size is required for a blank image".into()));
        };
        if quantity::bytes(size).is_none_or(|b| b == 0) {
            return Some((reason::INVALID_SIZE, format!("spec.size {} is not a positive size", size.0)));
        }
    }
    None
}

fn source(obs: &ImageObservation) -> Source {
    let image = obs.image;
    let ns = image.namespace().unwrap_or_default();
    let spec = &image.spec;
    let own_pvc = names::image_pvc(&image.name_any());
    let src = &spec.source;
    if let Some((reason, message)) = spec_error(spec) {
        return Source::Blocked { phase: ImagePhase::Error, reason, message };
    }
    let request = |size: Quantity, annotations: BTreeMap<String, String>| PvcRequest {
        name: own_pvc.clone(),
        size,
        storage_class: spec.storage_class_name.clone(),
        volume_mode: spec.volume_mode,
        clone_from: None,
        from_snapshot: None,
        annotations,
    };
    if let (Some(_), Some(size)) = (&src.blank, spec.size.clone()) {
        return Source::Pvc { name: own_pvc.clone(), create: Some(request(size, BTreeMap::new())), clone: false };
    }
    if let Some(pvc) = &src.pvc {
        return Source::Pvc { name: pvc.name.clone(), create: None, clone: false };
    }
    let made = matches!(obs.pvc, ImagePvc::Present { ours: true, .. });
    if made {
        // The PVC exists: it no longer depends on its source (its data may still be moving).
        return Source::Pvc { name: own_pvc, create: None, clone: src.http.is_none() };
    }
    if let Some(http) = &src.http {
        let annotations = BTreeMap::from([(names::IMPORT_SOURCE_ANNOTATION.to_owned(), http.url.clone())]);
        if let Some(size) = spec.size.clone() {
            return Source::Pvc { name: own_pvc.clone(), create: Some(request(size, annotations)), clone: false };
        }
        // No spec.size: a probe finds the size the image needs, then the PVC is made.
        let probe = obs.movers.iter().find(|m| m.role == Role::Probe);
        // A probe made for an older spec (a URL or format fixed since) is made again.
        if let Some(stale) =
            probe.filter(|p| p.generation != image.metadata.generation && p.state != MoverState::Foreign)
        {
            return Source::Reprobe { pod: stale.name.clone() };
        }
        return match probe.map(|p| &p.state) {
            Some(MoverState::Done(message)) => match import::parse_result(message) {
                Some(ImportResult::Size(bytes)) => {
                    let size = Quantity(format!("{}Mi", bytes.div_ceil(MIB).max(1)));
                    Source::Pvc { name: own_pvc.clone(), create: Some(request(size, annotations)), clone: false }
                }
                _ => Source::Blocked {
                    phase: ImagePhase::Error,
                    reason: reason::IMPORT_FAILED,
                    message: format!("the size probe ended with {message:?}"),
                },
            },
            Some(MoverState::Failed(why)) => import_failure(why, "finding the image's size"),
            Some(MoverState::Foreign) => foreign(&names::size_probe_pod(&ns, &own_pvc)),
            Some(MoverState::Running { note }) => Source::Blocked {
                phase: ImagePhase::Importing,
                reason: reason::SIZING,
                message: format!(
                    "finding the size of {} (spec.size is not set; Pod {}){}{}",
                    http.url,
                    names::size_probe_pod(&ns, &own_pvc),
                    note.as_deref().map(|n| format!(": {n}")).unwrap_or_default(),
                    retrying_after(obs)
                ),
            },
            None => Source::Probe { pvc: own_pvc },
        };
    }
    if let Some(from) = &src.image {
        let name = image.name_any();
        let cycle = obs.source_image.and_then(|s| s.spec.source.image.as_ref()).is_some_and(|s| s.name == name);
        if from.name == name || cycle {
            return Source::Blocked {
                phase: ImagePhase::Error,
                reason: reason::INVALID_SOURCE,
                message: format!(
                    "image {name} cannot be cloned from itself (source.image {} leads back to it)",
                    from.name
                ),
            };
        }
        let Some(source) = obs.source_image else {
            return Source::Blocked {
                phase: ImagePhase::Pending,
                reason: reason::SOURCE_NOT_FOUND,
                message: format!("source image {} does not exist", from.name),
            };
        };
        let status = source.status.clone().unwrap_or_default();
        // A snapshot is taken while a guest writes (crash-consistent); a copy never is.
        if !by_snapshot(obs)
            && let Some(blocked) = source_busy(obs)
        {
            return blocked;
        }
        if source.spec.volume_mode != spec.volume_mode {
            return Source::Blocked {
                phase: ImagePhase::Error,
                reason: reason::INVALID_VOLUME_MODE,
                message: format!(
                    "a clone keeps the volumeMode of its source: set spec.volumeMode: {:?} like image {}",
                    source.spec.volume_mode, from.name
                ),
            };
        }
        // A persistent source held by a Halted VM (no writer) is copied too.
        let ready = matches!(
            status.phase,
            Some(ImagePhase::Ready | ImagePhase::Used | ImagePhase::UsedPersistent | ImagePhase::Disabled)
        );
        let (true, Some(source_pvc)) = (ready, status.pvc_name) else {
            return Source::Blocked {
                phase: ImagePhase::Pending,
                reason: reason::SOURCE_NOT_READY,
                message: format!("source image {} is not ready", from.name),
            };
        };
        let Some(size) = at_least(spec.size.as_ref(), status.capacity.as_ref()) else {
            return Source::Blocked {
                phase: ImagePhase::Pending,
                reason: reason::SOURCE_NOT_READY,
                message: format!("source image {} has no capacity yet", from.name),
            };
        };
        let class = spec.storage_class_name.clone().or_else(|| source.spec.storage_class_name.clone());
        let create =
            match clone_request(own_pvc.clone(), size, class, spec.volume_mode, &source_pvc, obs, status.digest) {
                Ok(create) => create,
                Err(step) => return *step,
            };
        return Source::Pvc { name: own_pvc, create: Some(create), clone: true };
    }
    if let Some(from) = &src.virtual_machine_disk {
        let vm = &from.virtual_machine;
        let Some(source_vm) = &obs.source_vm else {
            return Source::Blocked {
                phase: ImagePhase::Pending,
                reason: reason::SOURCE_NOT_FOUND,
                message: format!("VirtualMachine {vm} does not exist"),
            };
        };
        let Some(disk) = &source_vm.disk else {
            return Source::Blocked {
                phase: ImagePhase::Pending,
                reason: reason::SOURCE_NOT_FOUND,
                message: format!("VirtualMachine {vm} has no disk {} (yet)", from.disk),
            };
        };
        if source_vm.running && !by_snapshot(obs) {
            return Source::Blocked {
                phase: ImagePhase::Pending,
                reason: reason::SOURCE_IN_USE,
                message: format!(
                    "VirtualMachine {vm} runs: disk {} is saved once it is Halted (runStrategy: Halted); \
                     a running disk is never copied",
                    from.disk
                ),
            };
        }
        if disk.volume_mode != spec.volume_mode {
            return Source::Blocked {
                phase: ImagePhase::Error,
                reason: reason::INVALID_VOLUME_MODE,
                message: format!(
                    "a saved disk keeps its volumeMode: set spec.volumeMode: {:?} like disk {} of VirtualMachine {vm}",
                    disk.volume_mode, from.disk
                ),
            };
        }
        let Some(size) = at_least(spec.size.as_ref(), disk.capacity.as_ref()) else {
            return Source::Blocked {
                phase: ImagePhase::Pending,
                reason: reason::SOURCE_NOT_READY,
                message: format!("disk {} of VirtualMachine {vm} has no capacity yet", from.disk),
            };
        };
        let class = spec.storage_class_name.clone().or_else(|| disk.storage_class.clone());
        let create = match clone_request(own_pvc.clone(), size, class, spec.volume_mode, &disk.pvc, obs, None) {
            Ok(create) => create,
            Err(step) => return *step,
        };
        return Source::Pvc { name: own_pvc, create: Some(create), clone: true };
    }
    Source::Blocked {
        phase: ImagePhase::Error,
        reason: reason::INVALID_SOURCE,
        message: "spec.source names no source vmkeep knows".into(),
    }
}

const MIB: u64 = 1 << 20;

/// The larger of a wanted and a source size; `None` when neither is known.
fn at_least(want: Option<&Quantity>, have: Option<&Quantity>) -> Option<Quantity> {
    match (want, have) {
        (Some(a), Some(b)) => Some(quantity::max(a, b)),
        (Some(a), None) | (None, Some(a)) => Some(a.clone()),
        (None, None) => None,
    }
}

/// Whether the clone still to be made is taken through a VolumeSnapshot.
fn by_snapshot(obs: &ImageObservation) -> bool {
    obs.clone_choice.as_ref().is_some_and(|c| c.strategy == CloneStrategy::Snapshot) && obs.snapshot_class.is_some()
}

/// The PVC of a clone of `source_pvc`, by the strategy chosen (`csi-clone` when none was):
/// `dataSource` for `csi-clone` (inheriting the source's digest), an empty PVC naming its
/// source for `copy`, the VolumeSnapshot once it is ready to use for `snapshot` (until then,
/// `Err` with the step: take it, or wait for it).
fn clone_request(
    name: String,
    size: Quantity,
    storage_class: Option<String>,
    volume_mode: VolumeMode,
    source_pvc: &str,
    obs: &ImageObservation,
    source_digest: Option<String>,
) -> Result<PvcRequest, Box<Source>> {
    let chosen = obs.clone_choice.clone().unwrap_or(Chosen { strategy: CloneStrategy::CsiClone, fallback: None });
    let mut annotations =
        BTreeMap::from([(names::CLONE_STRATEGY_ANNOTATION.to_owned(), chosen.strategy.as_str().to_owned())]);
    if let Some(why) = chosen.fallback {
        annotations.insert(names::CLONE_FALLBACK_ANNOTATION.to_owned(), why);
    }
    let inherit = |annotations: &mut BTreeMap<String, String>| {
        if let Some(digest) = source_digest.clone().filter(|d| crate::mover::copy::is_sha256(d)) {
            annotations.insert(names::DIGEST_ANNOTATION.to_owned(), digest);
        }
    };
    let mut request =
        PvcRequest { name, size, storage_class, volume_mode, clone_from: None, from_snapshot: None, annotations };
    match chosen.strategy {
        CloneStrategy::Copy => {
            request.annotations.insert(names::COPY_SOURCE_ANNOTATION.to_owned(), source_pvc.to_owned());
        }
        CloneStrategy::CsiClone => {
            inherit(&mut request.annotations);
            request.clone_from = Some(source_pvc.to_owned());
        }
        CloneStrategy::Snapshot => {
            let snapshot = names::snapshot(&request.name);
            match (&obs.snapshot, &obs.snapshot_class) {
                (None, Some(class)) => {
                    return Err(Box::new(Source::TakeSnapshot {
                        name: snapshot,
                        source: source_pvc.to_owned(),
                        class: class.clone(),
                    }));
                }
                (None, None) => {
                    return Err(Box::new(Source::Blocked {
                        phase: ImagePhase::Pending,
                        reason: reason::CLONING,
                        message: "waiting for the VolumeSnapshotClass of the snapshot strategy".into(),
                    }));
                }
                (Some(SnapshotView { ours: false, .. }), _) => {
                    return Err(Box::new(Source::Blocked {
                        phase: ImagePhase::Error,
                        reason: reason::NAME_CONFLICT,
                        message: format!(
                            "VolumeSnapshot {snapshot} exists and is not this image's; vmkeep leaves it alone"
                        ),
                    }));
                }
                (Some(SnapshotView { ready: false, error, .. }), _) => {
                    return Err(Box::new(Source::Blocked {
                        phase: ImagePhase::Cloning,
                        reason: reason::CLONING,
                        message: format!(
                            "waiting for VolumeSnapshot {snapshot} of PersistentVolumeClaim {source_pvc} to be ready to use{}",
                            error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
                        ),
                    }));
                }
                (Some(SnapshotView { ready: true, .. }), _) => {
                    request.annotations.insert(names::SNAPSHOT_ANNOTATION.to_owned(), snapshot.clone());
                    request.from_snapshot = Some(snapshot);
                }
            }
        }
    }
    Ok(request)
}

/// A failed importer or probe: terminal with the importer's reason when it gave one
/// (`ChecksumMismatch`, `ImportFailed`, `UnsupportedFormat`, `TooSmall`).
fn import_failure(why: &str, doing: &str) -> Source {
    let known = [reason::CHECKSUM_MISMATCH, reason::IMPORT_FAILED, reason::UNSUPPORTED_FORMAT, reason::TOO_SMALL];
    let reason = why.split_once(": ").and_then(|(r, _)| known.into_iter().find(|k| *k == r));
    Source::Blocked {
        phase: ImagePhase::Error,
        reason: reason.unwrap_or(reason::IMPORT_FAILED),
        message: match reason {
            Some(r) => why.strip_prefix(r).and_then(|m| m.strip_prefix(": ")).unwrap_or(why).to_owned(),
            None => format!("{doing} failed: {why}"),
        },
    }
}

fn foreign(pod: &str) -> Source {
    Source::Blocked {
        phase: ImagePhase::Error,
        reason: reason::NAME_CONFLICT,
        message: format!("Pod {pod} exists and is not this image's; vmkeep leaves it alone"),
    }
}

/// The data step of an image PVC that exists: its importer or copier, until the digest is
/// recorded. `None` when its data is complete (or it needs none).
fn fill(obs: &ImageObservation, pvc: &str, view: &CloneView, plan: &mut ImagePlan) -> Option<Source> {
    let image = obs.image;
    let ns = image.namespace().unwrap_or_default();
    if !view.data_pending() || image.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let role = if view.import_source.is_some() { Role::Import } else { Role::Copy };
    let mover = obs.movers.iter().find(|m| m.role == role);
    let generation = image.metadata.generation;
    let (phase, doing) = match role {
        Role::Import => (ImagePhase::Importing, reason::IMPORTING),
        _ => (ImagePhase::Cloning, reason::CLONING),
    };
    let working = |message: String| Some(Source::Blocked { phase, reason: doing, message });
    let state = match mover {
        // A failed helper made for an older spec is replaced.
        Some(m) if matches!(m.state, MoverState::Failed(_)) && m.generation != generation => {
            plan.delete_pods.push(m.name.clone());
            return working(format!("retrying with the changed spec (Pod {} goes first)", m.name));
        }
        Some(m) => &m.state,
        None => {
            return match role {
                Role::Import => {
                    let capacity = image.spec.size.as_ref().map_or(0, quantity::bytes_u64);
                    let job = build::ImportJob { target: Some(pvc), mode: image.spec.volume_mode, capacity };
                    plan.create_pods.extend(build::importer_pod(image, pvc, &job, obs.launcher_image));
                    working(format!(
                        "importing {} (Pod {})",
                        view.import_source.as_deref().unwrap_or_default(),
                        names::importer_pod(&ns, pvc)
                    ))
                }
                _ => {
                    let source = view.copy_source.clone().unwrap_or_default();
                    // Never copy a disk a VM writes: a persistent source held, a VM that runs.
                    if let Some(blocked) = source_busy(obs) {
                        return Some(blocked);
                    }
                    let blank = obs.source_image.is_some_and(|i| i.spec.source.blank.is_some())
                        || obs.source_vm.as_ref().and_then(|v| v.disk.as_ref()).is_some_and(|d| d.blank);
                    let capacity = image.spec.size.as_ref().map_or(0, quantity::bytes_u64);
                    let job = build::CopyJob {
                        target: pvc,
                        source: &source,
                        mode: image.spec.volume_mode,
                        blank_source: blank,
                        capacity,
                    };
                    let mut pod = build::copier_pod(
                        image,
                        (names::TRANSFER_FOR_LABEL, &image.name_any()),
                        &job,
                        obs.launcher_image,
                    );
                    pod.metadata.annotations = Some(BTreeMap::from([
                        (names::COPY_SOURCE_ANNOTATION.to_owned(), source.clone()),
                        (names::GENERATION_ANNOTATION.to_owned(), generation.unwrap_or_default().to_string()),
                    ]));
                    plan.create_pods.push(pod);
                    working(format!("copying PersistentVolumeClaim {source} (Pod {})", names::copier_pod(&ns, pvc)))
                }
            };
        }
    };
    let name = mover.map(|m| m.name.clone()).unwrap_or_default();
    match state {
        MoverState::Done(result) => {
            let (digest, retries) = match role {
                Role::Import => match import::parse_result(result) {
                    Some(ImportResult::Imported { digest, retries, .. }) => (digest, Some(retries)),
                    _ => return Some(import_failure(result, "the import")),
                },
                _ => (result.clone(), None),
            };
            plan.record = Some(Record { pvc: pvc.to_owned(), digest, retries });
            plan.delete_pods.push(name);
            None
        }
        MoverState::Running { note } => {
            let note = note.as_deref().map(|n| format!("; its last attempt failed: {n}")).unwrap_or_default();
            match role {
                Role::Import => {
                    plan.requeue = Some(PROGRESS_PERIOD);
                    working(format!(
                        "importing {} (Pod {name}){note}{}",
                        view.import_source.as_deref().unwrap_or_default(),
                        retrying_after(obs)
                    ))
                }
                _ => working(format!(
                    "copying PersistentVolumeClaim {} (Pod {name}){note}",
                    view.copy_source.as_deref().unwrap_or_default()
                )),
            }
        }
        MoverState::Failed(why) => match role {
            Role::Import if why.split_once(": ").is_some_and(|(r, _)| r.chars().all(char::is_alphanumeric)) => {
                Some(import_failure(why, "the import"))
            }
            // A Pod that ended without saying why (evicted, out of memory): again.
            Role::Import => {
                plan.delete_pods.push(name.clone());
                working(format!("the importer Pod {name} failed ({why}); starting again"))
            }
            _ => Some(Source::Blocked {
                phase: ImagePhase::Error,
                reason: reason::COPY_FAILED,
                message: format!("the copy failed: {why} (delete Pod {name} to retry)"),
            }),
        },
        MoverState::Foreign => Some(foreign(&name)),
    }
}

/// Network trouble an importer or probe retries itself: `; retrying after: <the last error it
/// logged>`, or nothing.
fn retrying_after(obs: &ImageObservation) -> String {
    let last = obs.progress.as_ref().and_then(|p| p.last_error.as_deref());
    last.map(|e| format!("; retrying after: {e}")).unwrap_or_default()
}

/// Why the source of a copy cannot be read now: a persistent source image held by a VM, a VM
/// whose disk is saved that runs.
fn source_busy(obs: &ImageObservation) -> Option<Source> {
    let image = obs.image;
    if let (Some(from), Some(writer)) = (&image.spec.source.image, &obs.source_writer) {
        return Some(Source::Blocked {
            phase: ImagePhase::Pending,
            reason: reason::SOURCE_IN_USE,
            message: format!(
                "source image {} is persistent and VirtualMachine {writer} runs with it; it is cloned once that VM is \
                 Halted or gone (a disk a guest writes is never copied)",
                from.name
            ),
        });
    }
    let from = image.spec.source.virtual_machine_disk.as_ref()?;
    match &obs.source_vm {
        // Its disks go with it: what was to be saved is gone.
        None => Some(Source::Blocked {
            phase: ImagePhase::Error,
            reason: reason::SOURCE_NOT_FOUND,
            message: format!(
                "VirtualMachine {} was deleted before its disk {} was copied; delete this Image",
                from.virtual_machine, from.disk
            ),
        }),
        Some(vm) if vm.running => Some(Source::Blocked {
            phase: ImagePhase::Pending,
            reason: reason::SOURCE_IN_USE,
            message: format!(
                "VirtualMachine {} runs: disk {} is copied once it is Halted",
                from.virtual_machine, from.disk
            ),
        }),
        Some(_) => None,
    }
}

/// Decides an Image's PVC, finalizer and status.
pub fn plan(obs: &ImageObservation, now: &Time) -> ImagePlan {
    let image = obs.image;
    let previous = image.status.clone().unwrap_or_default();
    let in_use = !obs.consumers.is_empty() || obs.claim.is_some();
    let deleting = image.metadata.deletion_timestamp.is_some();
    let has_finalizer = image.finalizers().iter().any(|f| f == names::IMAGE_FINALIZER);
    // An Image being cloned from stays until its clones have their data (its PVC is their source).
    let finalizer = match (deleting, has_finalizer, in_use || !obs.cloning_now.is_empty()) {
        (true, true, false) => Finalizer::Remove,
        (false, false, _) => Finalizer::Add,
        _ => Finalizer::Keep,
    };

    // The persistence mode in force changes only while nothing uses the image. While it is used,
    // the cluster says which mode is in force, not the status (which a restore may have lost):
    // a held claim means persistent, VMs using clones of it mean not.
    let in_force = match (&obs.claim, obs.consumers.is_empty()) {
        (Some(_), _) => true,
        (None, false) => false,
        (None, true) => image.spec.persistent,
    };
    let change_pending = in_force != image.spec.persistent;

    let mut acts = ImagePlan {
        create_pvc: None,
        delete_pvc: None,
        finalizer,
        create_pods: Vec::new(),
        create_snapshot: None,
        delete_snapshot: None,
        expand_pvc: None,
        delete_pods: Vec::new(),
        record: None,
        requeue: None,
        status: ImageStatus::default(),
        event: None,
    };
    let mut create_pvc = None;
    let mut pvc_name = None;
    let mut capacity = None;
    let mut storage_class = None;
    let mut view = CloneView::default();
    let mut resized: Option<Resized> = None;
    let (phase, ready) = match source(obs) {
        Source::Blocked { phase, reason, message } => {
            if obs.snapshot.is_some() {
                // A VolumeSnapshot is not watched: look at it again.
                acts.requeue = Some(PROGRESS_PERIOD);
            }
            (phase, Cond::new(READY, false, reason, message))
        }
        Source::Reprobe { pod } => {
            let message = format!("finding the size again for the changed spec (Pod {pod} goes first)");
            acts.delete_pods.push(pod);
            (ImagePhase::Importing, Cond::new(READY, false, reason::SIZING, message))
        }
        Source::TakeSnapshot { name, source, class } => {
            if !deleting {
                acts.create_snapshot = Some(build::volume_snapshot(image, &name, &source, &class));
            }
            acts.requeue = Some(PROGRESS_PERIOD);
            let message = format!("taking VolumeSnapshot {name} of PersistentVolumeClaim {source}");
            (ImagePhase::Cloning, Cond::new(READY, false, reason::CLONING, message))
        }
        Source::Probe { pvc } => {
            let job = build::ImportJob { target: None, mode: image.spec.volume_mode, capacity: 0 };
            if !deleting {
                acts.create_pods.extend(build::importer_pod(image, &pvc, &job, obs.launcher_image));
            }
            let url = image.spec.source.http.as_ref().map(|h| h.url.as_str()).unwrap_or_default();
            let message = format!(
                "finding the size of {url} (spec.size is not set; Pod {})",
                names::size_probe_pod(&image.namespace().unwrap_or_default(), &pvc)
            );
            (ImagePhase::Importing, Cond::new(READY, false, reason::SIZING, message))
        }
        Source::Pvc { name, create, clone } => match (&obs.pvc, create) {
            (ImagePvc::Present { ours: false, .. }, Some(_)) => (
                ImagePhase::Error,
                Cond::new(
                    READY,
                    false,
                    reason::NAME_CONFLICT,
                    format!("PersistentVolumeClaim {name} exists and is not this image's; vmkeep leaves it alone"),
                ),
            ),
            (ImagePvc::Present { ours: false, vmkeep_disk: true, .. }, None) => (
                ImagePhase::Error,
                Cond::new(
                    READY,
                    false,
                    reason::PVC_MANAGED_BY_VMKEEP,
                    format!(
                        "PersistentVolumeClaim {name} is a disk vmkeep made for another Image or a VirtualMachine; \
                         adopting it would bypass its claim (to copy an Image, use source.image)"
                    ),
                ),
            ),
            (ImagePvc::Missing, None) => (
                ImagePhase::Pending,
                Cond::new(READY, false, reason::PVC_NOT_FOUND, format!("PersistentVolumeClaim {name} does not exist")),
            ),
            (ImagePvc::Missing, Some(request)) => {
                capacity = Some(request.size.clone());
                storage_class = request.storage_class.clone();
                create_pvc = (!deleting).then_some(request);
                pvc_name = Some(name);
                if clone {
                    (ImagePhase::Cloning, Cond::new(READY, false, reason::CLONING, "cloning the source image"))
                } else {
                    (ImagePhase::Pending, Cond::new(READY, false, reason::PROVISIONING, "creating the image's PVC"))
                }
            }
            (
                ImagePvc::Present {
                    phase,
                    capacity: observed,
                    requested,
                    resize_pending,
                    storage_class: class,
                    volume_mode,
                    fill: f,
                    ..
                },
                request,
            ) => {
                capacity = observed.clone().or_else(|| request.as_ref().map(|r| r.size.clone()));
                storage_class = class.clone();
                pvc_name = Some(name.clone());
                view = (**f).clone();
                // An import that has not completed into a PVC smaller than spec.size (raised after
                // a TooSmall): the PVC holds no image yet, so it is made again at the new size.
                let regrow = matches!(&obs.pvc, ImagePvc::Present { ours: true, .. })
                    && f.import_source.is_some()
                    && f.digest.is_none()
                    && match (&image.spec.size, &capacity) {
                        (Some(size), Some(have)) => quantity::bytes(have) < quantity::bytes(size),
                        _ => false,
                    };
                if regrow && !deleting {
                    acts.delete_pvc = Some(name.clone());
                    acts.delete_pods.extend(obs.movers.iter().map(|m| m.name.clone()));
                }
                let filling = match &obs.pvc {
                    _ if regrow => Some(Source::Blocked {
                        phase: ImagePhase::Importing,
                        reason: reason::IMPORTING,
                        message: format!(
                            "PersistentVolumeClaim {name} is smaller than spec.size and holds no image yet: made again \
                             at {}",
                            image.spec.size.as_ref().map(|q| q.0.as_str()).unwrap_or_default()
                        ),
                    }),
                    ImagePvc::Present { ours: true, .. } => fill(obs, &name, f, &mut acts),
                    _ => None,
                };
                let bound = phase.as_deref() == Some("Bound");
                // WaitForFirstConsumer: an image PVC that must be cloned (a csi-clone to finish,
                // VMs or Images to clone it) is bound by a short-lived Pod; a copy binds it anyway.
                let ours = matches!(&obs.pvc, ImagePvc::Present { ours: true, .. });
                // A non-persistent image exists to be cloned, at the size storage gives it.
                let needed = clone || obs.wanted_by_clones || !in_force;
                let binder = obs.movers.iter().find(|m| m.role == Role::Bind);
                if ours && !bound && obs.binds_late && needed && filling.is_none() && !deleting && binder.is_none() {
                    acts.create_pods.push(build::binder_pod(image, &name, image.spec.volume_mode, obs.launcher_image));
                }
                if let (true, Some(binder)) = (bound, binder) {
                    acts.delete_pods.push(binder.name.clone());
                }
                // A snapshot clone is done once bound: its VolumeSnapshot goes.
                match &obs.snapshot {
                    Some(SnapshotView { ours: true, .. }) if bound => {
                        acts.delete_snapshot = Some(names::snapshot(&name))
                    }
                    Some(_) if !bound => acts.requeue = Some(PROGRESS_PERIOD),
                    _ => {}
                }
                let mode = format!("{:?}", image.spec.volume_mode);
                let too_small = match (&image.spec.size, &capacity) {
                    (Some(size), Some(have)) => quantity::bytes(have) < quantity::bytes(size),
                    _ => false,
                };
                let sizing = Sizing {
                    pvc: &name,
                    ours,
                    bound,
                    requested: requested.as_ref(),
                    capacity: capacity.as_ref(),
                    class: class.as_deref(),
                    persistent: in_force,
                    resize_pending: *resize_pending,
                };
                // A size below the PVC is refused, the image stays usable at the size it has.
                resized = match sizing.shrunk(image) {
                    // Made again at the new size, or going: nothing to resize.
                    _ if regrow || deleting => None,
                    Some(message) => Some(Resized {
                        condition: Cond::new(RESIZED, false, reason::INVALID_SIZE, message),
                        expand: None,
                        stalled: true,
                    }),
                    None => sizing.resized(image, obs.allows_expansion),
                };
                if let Some(Resized { expand: Some(size), .. }) = &resized
                    && !deleting
                    && !regrow
                {
                    acts.expand_pvc = Some((name.clone(), size.clone()));
                }
                if let Some(Source::Blocked { phase, reason, message }) = filling {
                    (phase, Cond::new(READY, false, reason, message))
                } else if phase.as_deref() == Some("Lost") {
                    let message = format!("PersistentVolumeClaim {name} lost its volume");
                    (ImagePhase::Error, Cond::new(READY, false, reason::PVC_LOST, message))
                } else if volume_mode.as_ref().is_some_and(|m| *m != mode) {
                    let message = format!(
                        "PersistentVolumeClaim {name} has volumeMode {}, the image says {mode}",
                        volume_mode.as_deref().unwrap_or_default()
                    );
                    (ImagePhase::Error, Cond::new(READY, false, reason::INVALID_VOLUME_MODE, message))
                } else if too_small && !ours {
                    let message = format!(
                        "PersistentVolumeClaim {name} holds {}, less than spec.size {}: vmkeep does not resize a \
                         PVC it adopted (expand it, or lower spec.size)",
                        capacity.as_ref().map(|c| c.0.as_str()).unwrap_or_default(),
                        image.spec.size.as_ref().map(|c| c.0.as_str()).unwrap_or_default()
                    );
                    (ImagePhase::Error, Cond::new(READY, false, reason::PVC_TOO_SMALL, message))
                } else if clone && !bound {
                    (ImagePhase::Cloning, Cond::new(READY, false, reason::CLONING, "cloning the source image"))
                } else if !in_force && !bound {
                    let adopted = if ours {
                        ""
                    } else {
                        ", and vmkeep does not bind a PVC it adopted (bind it, or run a Pod that mounts it)"
                    };
                    let message = format!(
                        "PersistentVolumeClaim {name} is not bound yet: clones of the image are sized from the \
                         capacity storage gives it{adopted}"
                    );
                    (ImagePhase::Pending, Cond::new(READY, false, reason::PVC_NOT_BOUND, message))
                } else {
                    // Binding is left to the scheduler (WaitForFirstConsumer classes bind late).
                    (
                        ImagePhase::Ready,
                        Cond::new(READY, true, reason::PVC_READY, format!("PersistentVolumeClaim {name}")),
                    )
                }
            }
        },
    };
    // A deletion held by users says who: `kubectl delete` waits on them.
    let ready = match (deleting, in_use || !obs.cloning_now.is_empty()) {
        (true, true) => {
            let by = match (&obs.claim, obs.consumers.is_empty()) {
                (Some(holder), true) => format!("VirtualMachine {}", holder.name),
                (_, false) => format!("VirtualMachine {}", listed(&obs.consumers)),
                _ => format!("Image {} (cloning it)", listed(&obs.cloning_now)),
            };
            Cond::new(READY, false, reason::IN_USE, format!("deleted: waits until no longer used by {by}"))
        }
        (true, false) => Cond::new(READY, false, reason::DELETING, "deleted: removing the image's PVC"),
        _ => ready,
    };
    let phase = match phase {
        _ if deleting => ImagePhase::Deleting,
        ImagePhase::Ready if image.spec.disabled => ImagePhase::Disabled,
        ImagePhase::Ready if in_force && obs.claim.is_some() => ImagePhase::UsedPersistent,
        ImagePhase::Ready if !obs.consumers.is_empty() => ImagePhase::Used,
        other => other,
    };

    let in_use_cond = if in_use {
        let users = match (&obs.claim, obs.consumers.is_empty()) {
            (Some(holder), true) => holder.name.clone(),
            _ => listed(&obs.consumers),
        };
        Cond::new(IN_USE, true, reason::IN_USE, format!("used by VirtualMachine {users}"))
    } else {
        Cond::new(IN_USE, false, reason::UNUSED, "no VirtualMachine uses this image")
    };
    let pending_cond = if change_pending {
        Cond::new(
            PERSISTENCE_CHANGE_PENDING,
            true,
            reason::IN_USE,
            format!("persistent: {} applies once no VirtualMachine uses the image", image.spec.persistent),
        )
    } else {
        Cond::new(PERSISTENCE_CHANGE_PENDING, false, reason::APPLIED, "spec.persistent is in force")
    };
    // A size probe is done once the PVC it sized exists; an importer or copier once its digest
    // is recorded (its deletion may have failed after the record).
    if matches!(obs.pvc, ImagePvc::Present { ours: true, .. }) {
        let done = |m: &&ObservedMover| {
            m.role == Role::Probe
                || (matches!(m.role, Role::Import | Role::Copy) && !view.data_pending() && acts.record.is_none())
        };
        let stale: Vec<String> = obs.movers.iter().filter(done).map(|m| m.name.clone()).collect();
        for name in stale {
            if !acts.delete_pods.contains(&name) {
                acts.delete_pods.push(name);
            }
        }
    }
    let digest = acts.record.as_ref().map(|r| r.digest.clone()).or(view.digest.clone());
    let transfer_pod = obs
        .movers
        .iter()
        .filter(|m| !acts.delete_pods.contains(&m.name))
        .map(|m| TransferPod { name: m.name.clone(), role: m.role.as_str().into(), phase: m.phase.clone() })
        .chain(acts.create_pods.iter().filter_map(|p| {
            let name = p.name_any();
            let role = Role::of(&image.namespace().unwrap_or_default(), &names::image_pvc(&image.name_any()), &name)?;
            Some(TransferPod { name, role: role.as_str().into(), phase: None })
        }))
        .next();
    let importing = phase == ImagePhase::Importing;
    if importing && acts.requeue.is_none() {
        // The progress (and the last error) of an import or size probe is read again.
        acts.requeue = Some(PROGRESS_PERIOD);
    }
    let (progress, import_retries) = match (&obs.progress, importing) {
        (Some(p), true) => (Some(p.to_string()), Some(p.retries)),
        (_, true) => (previous.progress.clone(), previous.import_retries),
        _ => (
            digest.as_ref().filter(|_| view.import_source.is_some()).map(|_| "100%".to_owned()),
            acts.record.as_ref().and_then(|r| r.retries).or(view.import_retries),
        ),
    };
    let generation = image.metadata.generation;
    let status = ImageStatus {
        phase: Some(phase),
        persistent: Some(in_force),
        pvc_name,
        capacity,
        storage_class_name: storage_class,
        running_vms: Some(i32::try_from(obs.consumers.len()).unwrap_or(i32::MAX)),
        consumers: obs.consumers.iter().take(MAX_CONSUMERS).cloned().collect(),
        consumers_truncated: obs.consumers.len() > MAX_CONSUMERS,
        claimed_by: obs.claim.clone(),
        progress,
        import_retries,
        digest: digest.filter(|d| crate::mover::copy::is_sha256(d)),
        clone_strategy: view.strategy.clone(),
        clone_fallback: view.fallback.clone(),
        transfer_pod,
        observed_generation: generation,
        conditions: {
            // A change of persistence waiting for its users is on its way too.
            let resized_cond = resized.as_ref().map(|r| &r.condition);
            let health = match (phase, resized.as_ref()) {
                (ImagePhase::Error, _) => Health::Stalled(&ready),
                (_, Some(r)) if r.stalled => Health::Stalled(&r.condition),
                _ if ready.status != ConditionStatus::True => Health::of(&ready, false),
                _ if change_pending => Health::Reconciling(&pending_cond),
                // A non-persistent image that cannot expand is done: its clones get spec.size.
                // Storage did its part (the filesystem grows at the next mount), or a non-persistent
                // image cannot expand (its clones get spec.size): converged.
                (_, Some(r))
                    if ![reason::EXPANSION_NOT_SUPPORTED, reason::FILESYSTEM_RESIZE_PENDING]
                        .contains(&r.condition.reason.as_str()) =>
                {
                    Health::Reconciling(&r.condition)
                }
                _ => Health::Converged,
            };
            let [reconciling, stalled] = health.conditions();
            let mut wanted = vec![ready.clone(), in_use_cond, pending_cond.clone()];
            wanted.extend(resized_cond.cloned());
            wanted.extend([reconciling, stalled]);
            merge(&previous.conditions, wanted, generation, now)
        },
    };
    let event = image_event(&previous, phase, &ready, &pending_cond, resized.as_ref());
    let delete_pvc = match (&obs.pvc, finalizer) {
        (ImagePvc::Present { ours: true, .. }, Finalizer::Remove) => status.pvc_name.clone(),
        _ => acts.delete_pvc.take(),
    };
    ImagePlan { create_pvc, delete_pvc, status, event, ..acts }
}

/// Condition type: `spec.size` is more than the image's PVC has (present only then).
pub const RESIZED: &str = "Resized";

/// The size of an image's PVC against `spec.size`.
struct Sizing<'a> {
    pvc: &'a str,
    ours: bool,
    bound: bool,
    requested: Option<&'a Quantity>,
    capacity: Option<&'a Quantity>,
    class: Option<&'a str>,
    persistent: bool,
    resize_pending: bool,
}

/// A `spec.size` that the PVC does not have yet: the condition, whether storage is to be asked
/// to expand it (to that size), and whether it is stalled (a persistent image in a class that
/// cannot expand: its VMs never see the new size).
#[derive(Clone, Debug, PartialEq)]
struct Resized {
    condition: Cond,
    expand: Option<Quantity>,
    stalled: bool,
}

impl Sizing<'_> {
    /// `None` when the PVC has what `spec.size` asks (or is not the image's own).
    /// `allows_expansion` is the StorageClass's `allowVolumeExpansion` (looked up only when
    /// `spec.size` asks for more than the PVC does).
    fn resized(&self, image: &Image, allows_expansion: Option<bool>) -> Option<Resized> {
        let want = image.spec.size.as_ref()?;
        let (requested, pvc) = (self.requested?, self.pvc);
        if !self.ours {
            return None;
        }
        let cond = |reason: &str, message: String| Cond::new(RESIZED, false, reason, message);
        if quantity::bytes(requested) < quantity::bytes(want) {
            let class = self.class.unwrap_or("(the default)");
            let (condition, expand, stalled) = match (self.bound, allows_expansion) {
                (false, _) => (
                    cond(
                        reason::EXPANDING,
                        format!("PersistentVolumeClaim {pvc} is expanded to {} once bound", want.0),
                    ),
                    None,
                    false,
                ),
                (true, Some(true)) => (
                    cond(
                        reason::EXPANDING,
                        format!(
                            "asked storage to expand PersistentVolumeClaim {pvc} from {} to {}",
                            requested.0, want.0
                        ),
                    ),
                    Some(want.clone()),
                    false,
                ),
                (true, _) => (
                    cond(
                        reason::EXPANSION_NOT_SUPPORTED,
                        format!(
                            "StorageClass {class} does not allow volume expansion: PersistentVolumeClaim {pvc} stays at \
                             {}; new clones get {}{}",
                            requested.0,
                            want.0,
                            if self.persistent { ", the VMs that use the image in place do not" } else { "" }
                        ),
                    ),
                    None,
                    self.persistent,
                ),
            };
            return Some(Resized { condition, expand, stalled });
        }
        let capacity = self.capacity?;
        if self.bound && self.resize_pending {
            // Done as far as storage goes: converged, the guest sees it at its next start.
            return Some(Resized {
                condition: cond(
                    reason::FILESYSTEM_RESIZE_PENDING,
                    format!(
                        "storage expanded the volume of PersistentVolumeClaim {pvc} to {}; its filesystem grows when \
                         a Pod next mounts it",
                        requested.0
                    ),
                ),
                expand: None,
                stalled: false,
            });
        }
        (self.bound && quantity::bytes(capacity) < quantity::bytes(requested)).then(|| Resized {
            condition: cond(
                reason::EXPANDING,
                format!(
                    "waiting for storage to expand PersistentVolumeClaim {pvc} to {} (it has {}); a VM sees the new size \
                     at its next start",
                    requested.0, capacity.0
                ),
            ),
            expand: None,
            stalled: false,
        })
    }

    /// Why `spec.size` is refused: below what the image's own PVC (blank or imported, made at
    /// `spec.size`) asks for. Volumes do not shrink.
    fn shrunk(&self, image: &Image) -> Option<String> {
        // What the PVC has: the smaller of what it asks for and what storage gave (an expansion
        // storage never made can be undone; more than asked is no reason to refuse).
        let have = match (self.requested, self.capacity) {
            (Some(r), Some(c)) => quantity::min(r, c),
            (r, c) => r.or(c)?.clone(),
        };
        let want = image.spec.size.as_ref()?;
        let sized_by_spec = image.spec.source.blank.is_some() || image.spec.source.http.is_some();
        (self.ours && sized_by_spec && quantity::bytes(want) < quantity::bytes(&have)).then(|| {
            format!(
                "spec.size {} is below the size of PersistentVolumeClaim {} ({}): volumes do not shrink; set spec.size \
                 to at least {}",
                want.0, self.pvc, have.0, have.0
            )
        })
    }
}

/// At most this many names in `status.consumers` (`consumersTruncated` beyond, `runningVMs`
/// counts them all): an image used by 9,000 VMs wrote a 221 KB status on every change, and an
/// object must stay far below etcd's 1.5 MiB limit.
pub const MAX_CONSUMERS: usize = 100;

/// At most this many names in a message; the rest are counted.
const NAMES_IN_MESSAGE: usize = 10;

/// `a, b, c` or `a, b, ... and 140 more`: names for a condition message, bounded.
fn listed(names: &[String]) -> String {
    let shown = names.iter().take(NAMES_IN_MESSAGE).cloned().collect::<Vec<_>>().join(", ");
    match names.len().saturating_sub(NAMES_IN_MESSAGE) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// The Event a user acts on, once, when the image enters the state: an Error (Warning, with
/// its reason), a persistence change that waits for users, a deletion held by users (Normal).
fn image_event(
    previous: &ImageStatus,
    phase: ImagePhase,
    ready: &Cond,
    pending: &Cond,
    resized: Option<&Resized>,
) -> Option<ImageEvent> {
    let entered = |c: &Cond| {
        !previous.conditions.iter().any(|p| p.r#type == c.r#type && p.reason == c.reason && p.status == c.status)
    };
    if phase == ImagePhase::Error && entered(ready) {
        return Some(ImageEvent { warning: true, reason: ready.reason.clone(), message: ready.message.clone() });
    }
    // A size storage cannot give, or one below the PVC: a Warning when it stalls the image.
    if let Some(r) = resized
        .filter(|r| [reason::EXPANSION_NOT_SUPPORTED, reason::INVALID_SIZE].contains(&r.condition.reason.as_str()))
        && entered(&r.condition)
    {
        let (reason, message) = (r.condition.reason.clone(), r.condition.message.clone());
        return Some(ImageEvent { warning: r.stalled, reason, message });
    }
    if phase == ImagePhase::Deleting && ready.reason == reason::IN_USE && entered(ready) {
        return Some(ImageEvent { warning: false, reason: reason::IN_USE.into(), message: ready.message.clone() });
    }
    if pending.status == ConditionStatus::True && entered(pending) {
        return Some(ImageEvent {
            warning: false,
            reason: PERSISTENCE_CHANGE_PENDING.into(),
            message: pending.message.clone(),
        });
    }
    None
}

/// An Event to publish about the Image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageEvent {
    /// Warning (an error to act on) or Normal.
    pub warning: bool,
    pub reason: String,
    pub message: String,
}
