//! What a VirtualMachine should be, decided from what was observed: which disks it has, which
//! persistent images it must claim, which children to create or delete, and its phase and
//! conditions. Plain data in, plain data out: no client here.
//!
//! [`decide`] is the whole verdict of one reconcile: from an [`Observed`] (the caches and the
//! claims read from the API server) to a [`VmPlan`] (claims to take or release, children to
//! create or delete, finalizer, status, Warning Event). "Why was this VM Rejected?" is answered
//! by [`super::claim::plan_claims`]; "why is it Pending?" by [`resolve_disks`] and
//! [`plan_children`].

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::{PersistentVolumeClaim, Pod},
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{ObjectMeta, Time},
    },
};
use kube::ResourceExt;

use super::{
    build,
    cached::{CachedContainerStatus, CachedPod, CachedPvc},
    claim::{self, ClaimPlan, ClaimState},
    clone::{Chosen, CloneStrategy},
    conditions::{Cond, Health, RECONCILING, STALLED, find, merge},
    mover::MoverState,
    names, quantity, reason,
    runtime::Choice,
};
use crate::api::{
    Image, Template,
    image::{ImagePhase, ImageType, VolumeMode},
    template::{Runtime, TemplateSpec},
    virtual_machine::{
        LastExit, RunStrategy, VirtualMachine, VirtualMachineDiskStatus, VirtualMachinePhase, VirtualMachineStatus,
    },
};
use crate::launcher::spec::ExitReason;

pub const IMAGES_CLAIMED: &str = "ImagesClaimed";
pub const DISKS_READY: &str = "DisksReady";
pub use super::conditions::READY;

/// Why a VM (or a Template) cannot proceed: `Pending` until something changes, or `Failed`
/// when the spec can never work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocker {
    pub phase: VirtualMachinePhase,
    pub reason: &'static str,
    pub message: String,
}

impl Blocker {
    fn pending(reason: &'static str, message: String) -> Self {
        Self { phase: VirtualMachinePhase::Pending, reason, message }
    }
    fn failed(reason: &'static str, message: String) -> Self {
        Self { phase: VirtualMachinePhase::Failed, reason, message }
    }
}

/// An image a VM can use now: the mode in force, its PVC and capacity.
#[derive(Clone, Debug, PartialEq)]
pub struct UsableImage {
    pub persistent: bool,
    pub pvc_name: String,
    pub capacity: Option<Quantity>,
    /// For a non-persistent image, `spec.size`: clones get at least that even while the image's
    /// own PVC has not grown to it (a disk may still ask for less, down to `capacity`).
    pub grown: Option<Quantity>,
    pub r#type: ImageType,
}

/// Whether a new VM may start using `image` (named `name`): it exists, is not deleted or
/// disabled, and its PVC is ready.
pub fn usable_image(name: &str, image: Option<&Image>) -> Result<UsableImage, Blocker> {
    let Some(image) = image else {
        return Err(Blocker::pending(reason::IMAGE_NOT_FOUND, format!("image {name} does not exist")));
    };
    if image.metadata.deletion_timestamp.is_some() {
        return Err(Blocker::pending(reason::IMAGE_NOT_READY, format!("image {name} is being deleted")));
    }
    if image.spec.disabled {
        return Err(Blocker::pending(reason::IMAGE_DISABLED, format!("image {name} is disabled")));
    }
    let status = image.status.clone().unwrap_or_default();
    if status.persistent.is_some_and(|p| p != image.spec.persistent) {
        // A new user would keep the old mode in force for as long as it lives: it waits until
        // the change applies, which is as soon as the last VM lets go.
        let message = format!(
            "image {name} changes to persistent: {}; that applies once no VirtualMachine uses it",
            image.spec.persistent
        );
        return Err(Blocker::pending(reason::IMAGE_NOT_READY, message));
    }
    let ready = matches!(status.phase, Some(ImagePhase::Ready | ImagePhase::Used | ImagePhase::UsedPersistent));
    match (ready, status.persistent, status.pvc_name) {
        (true, Some(persistent), Some(pvc_name)) => {
            // A clone gets spec.size when it grew past what the image's PVC has (that PVC may
            // not expand, or not yet); the image in place has what storage gave it.
            let grown = image.spec.size.clone().filter(|_| !persistent);
            Ok(UsableImage { persistent, pvc_name, capacity: status.capacity, grown, r#type: image.spec.r#type })
        }
        _ => {
            let phase = status.phase.map_or_else(|| "not provisioned yet".to_owned(), |p| format!("{p:?}"));
            Err(Blocker::pending(reason::IMAGE_NOT_READY, format!("image {name} is not ready ({phase})")))
        }
    }
}

/// What of an Image the decisions of VMs and Templates read ([`usable_image`]), as one hash:
/// a VM is woken when it changes, not when the Image's count of running VMs or its consumers do.
pub fn image_view(image: &Image) -> u64 {
    let status = image.status.as_ref();
    fingerprint(&(
        &image.metadata.uid,
        image.metadata.generation,
        image.metadata.deletion_timestamp.is_some(),
        status.map(|s| (s.phase, s.persistent, &s.pvc_name, &s.capacity)),
    ))
}

/// What of a Template the decisions of VMs read: its spec (and which Template it is).
pub fn template_view(template: &Template) -> u64 {
    fingerprint(&(&template.metadata.uid, template.metadata.generation, template.metadata.deletion_timestamp.is_some()))
}

/// What of a VM's PVC or launcher Pod the controllers read (`child_state`, the Image's
/// `pvc_view`): which object, its owners, deletion, phase and capacity. The binder's and
/// provisioner's annotation updates do not wake a VM.
pub fn child_view<K: kube::Resource>(child: &K, phase: Option<&str>, capacity: Option<&Quantity>) -> u64 {
    let meta = child.meta();
    let owners: Vec<&str> = meta.owner_references.iter().flatten().map(|o| o.uid.as_str()).collect();
    fingerprint(&(&meta.uid, owners, meta.deletion_timestamp.is_some(), phase, capacity))
}

/// What of a PVC the controllers decide from: [`child_view`] with its capacity, and the
/// [`CloneView`] of its annotations (a recorded copy wakes its VM).
pub fn pvc_view(pvc: &CachedPvc) -> u64 {
    let status = pvc.status.as_ref();
    let capacity = status.and_then(|s| s.capacity.as_ref()?.get("storage"));
    // The slim cache keeps only FileSystemResizePending among the conditions.
    let resizing = status.and_then(|s| s.conditions.as_ref()).map_or(0, Vec::len);
    let view = child_view(pvc, status.and_then(|s| s.phase.as_deref()), capacity);
    fingerprint(&(view, CloneView::of(&pvc.metadata), resizing))
}

/// What of a launcher Pod the VM controller decides from: [`child_view`] and the
/// [`LauncherView`] (readiness, node, restarts, exits), so a restart or readiness change wakes
/// the VM and nothing else does.
pub fn pod_view(pod: &CachedPod) -> u64 {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    fingerprint(&(child_view(pod, phase, None), LauncherView::of(pod)))
}

fn fingerprint(value: &impl std::fmt::Debug) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    format!("{value:?}").hash(&mut hasher);
    hasher.finish()
}

/// One disk of a Template, checked against its image.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckedDisk {
    pub name: String,
    pub image: Option<String>,
    pub persistent: bool,
    /// The image's PVC: attached directly (persistent) or cloned (not).
    pub image_pvc: Option<String>,
    /// The size of the VM's own PVC (clone or volatile disk).
    pub size: Option<Quantity>,
    pub read_only: bool,
}

/// Checks every disk of a Template against the images it names. A spec that can never work
/// (`Failed`) wins over one that waits for something (`Pending`).
pub fn check_template<'a>(
    template: &TemplateSpec,
    images: impl Fn(&str) -> Option<&'a Image>,
) -> Result<Vec<CheckedDisk>, Blocker> {
    let mut disks = Vec::new();
    let mut pending = None;
    let mut cdroms = Vec::new();
    let mut persistent_images: BTreeMap<&str, &str> = BTreeMap::new();
    for disk in &template.disks {
        match (&disk.image, &disk.blank) {
            (None, Some(blank)) => disks.push(CheckedDisk {
                name: disk.name.clone(),
                image: None,
                persistent: false,
                image_pvc: None,
                size: Some(blank.size.clone()),
                read_only: false,
            }),
            (Some(name), None) => match usable_image(name, images(name)) {
                Err(blocker) => {
                    // A disk smaller than what the image last had stays Failed while the image
                    // waits for something (GitOps health does not flap to Reconciling).
                    let known = images(name).and_then(|i| i.status.as_ref()?.capacity.clone());
                    if let (Some(size), Some(capacity)) = (&disk.size, &known)
                        && quantity::bytes(size) < quantity::bytes(capacity)
                    {
                        return Err(disk_too_small(&disk.name, size, name, capacity));
                    }
                    pending.get_or_insert(blocker);
                }
                Ok(image) => {
                    if image.r#type == ImageType::Cdrom {
                        cdroms.push(disk.name.as_str());
                    }
                    let size = match (&disk.size, &image.capacity) {
                        (Some(size), Some(capacity)) => {
                            let (want, have) = (quantity::bytes(size), quantity::bytes(capacity));
                            if want < have {
                                return Err(disk_too_small(&disk.name, size, name, capacity));
                            }
                            if image.persistent && want > have {
                                return Err(Blocker::failed(
                                    reason::INVALID_DISK_SIZE,
                                    format!(
                                        "disk {} cannot grow persistent image {name} ({} > {}): resize the image instead",
                                        disk.name, size.0, capacity.0
                                    ),
                                ));
                            }
                            Some(quantity::max(capacity, size))
                        }
                        (size, capacity) => size.clone().or_else(|| capacity.clone()),
                    };
                    let size = match (size, &image.grown) {
                        (Some(size), Some(grown)) => Some(quantity::max(&size, grown)),
                        (size, grown) => size.or_else(|| grown.clone()),
                    };
                    if image.persistent
                        && let Some(other) = persistent_images.insert(name, &disk.name)
                    {
                        return Err(Blocker::failed(
                            reason::INVALID_TEMPLATE,
                            format!(
                                "disks {other} and {} both use persistent image {name}; it can back one disk",
                                disk.name
                            ),
                        ));
                    }
                    disks.push(CheckedDisk {
                        name: disk.name.clone(),
                        image: Some(name.clone()),
                        persistent: image.persistent,
                        image_pvc: Some(image.pvc_name),
                        size: if image.persistent { None } else { size },
                        read_only: image.r#type == ImageType::Cdrom,
                    });
                }
            },
            _ => {
                return Err(Blocker::failed(
                    reason::INVALID_TEMPLATE,
                    format!("disk {} must name exactly one of image or blank", disk.name),
                ));
            }
        }
    }
    if cdroms.len() > 1 {
        return Err(Blocker::failed(
            reason::INVALID_TEMPLATE,
            format!("disks {} all use CDROM images; a template may have one", cdroms.join(", ")),
        ));
    }
    match pending {
        Some(blocker) => Err(blocker),
        None => Ok(disks),
    }
}

/// `Failed`: a Template disk asks for less than its image holds.
fn disk_too_small(disk: &str, size: &Quantity, image: &str, capacity: &Quantity) -> Blocker {
    Blocker::failed(
        reason::INVALID_DISK_SIZE,
        format!("disk {disk} asks for {} but image {image} holds {}", size.0, capacity.0),
    )
}

/// The disks a VM is made of, resolved from its Template and recorded in its status.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub disks: Vec<VirtualMachineDiskStatus>,
    pub cpu: i32,
    pub memory: Quantity,
    /// The image PVC each non-persistent disk is cloned from (only needed until its PVC exists).
    pub clone_sources: BTreeMap<String, String>,
}

/// Resolves the VM's disks: the record in its status when there is one (later Template edits do
/// not change existing VMs), else the Template as it is now.
pub fn resolve_disks<'a>(
    vm: &VirtualMachine,
    template: Option<&TemplateSpec>,
    images: impl Fn(&str) -> Option<&'a Image>,
) -> Result<Resolved, Blocker> {
    let vm_name = vm.name_any();
    let status = vm.status.clone().unwrap_or_default();
    // The record counts once the VM provisioned (held its claims); a VM that waited or was
    // Rejected resolves afresh, with the images' modes as they are now.
    let provisioned = status.phase != Some(VirtualMachinePhase::Rejected)
        && find(&status.conditions, IMAGES_CLAIMED).is_some_and(|c| c.status == crate::api::ConditionStatus::True);
    if provisioned && let (Some(cpu), Some(memory)) = (status.cpu, status.memory.clone()) {
        let mut clone_sources = BTreeMap::new();
        for disk in status.disks.iter().filter(|d| !d.persistent) {
            if let Some(image) = &disk.image
                && let Ok(usable) = usable_image(image, images(image))
            {
                clone_sources.insert(disk.name.clone(), usable.pvc_name);
            }
        }
        return Ok(Resolved { disks: status.disks, cpu, memory, clone_sources });
    }
    let Some(template) = template else {
        return Err(Blocker::pending(
            reason::TEMPLATE_NOT_FOUND,
            format!("template {} does not exist", vm.spec.template_ref.name),
        ));
    };
    let checked = check_template(template, images)?;
    let mut clone_sources = BTreeMap::new();
    let disks = checked
        .into_iter()
        .map(|d| {
            let pvc_name = if d.persistent {
                d.image_pvc.clone()
            } else {
                if let Some(source) = &d.image_pvc {
                    clone_sources.insert(d.name.clone(), source.clone());
                }
                Some(names::vm_disk_pvc(&vm_name, &d.name))
            };
            VirtualMachineDiskStatus {
                name: d.name,
                image: d.image,
                persistent: d.persistent,
                pvc_name,
                phase: None,
                size: d.size,
                read_only: d.read_only,
                clone_strategy: None,
                clone_fallback: None,
                digest: None,
            }
        })
        .collect();
    Ok(Resolved { disks, cpu: template.cpu, memory: template.memory.clone(), clone_sources })
}

/// The persistent images a VM must hold, in disk order.
pub fn persistent_images(disks: &[VirtualMachineDiskStatus]) -> Vec<String> {
    disks.iter().filter(|d| d.persistent).filter_map(|d| d.image.clone()).collect()
}

/// What exists of a child (PVC or Pod) with the name vmkeep gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Child {
    Missing,
    /// Ours (controller reference to this VM), with its phase.
    Ours {
        phase: Option<String>,
        deleting: bool,
    },
    /// Someone else's: vmkeep leaves it alone.
    Foreign,
}

/// What to do with the children of a VM that holds its claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildrenPlan {
    /// Disks whose PVC to create (clones and volatile disks).
    pub create_pvcs: Vec<String>,
    pub pod: PodAction,
    /// A child name taken by an object that is not ours: `(kind, name)`.
    pub conflict: Option<(&'static str, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodAction {
    Nothing,
    Create,
    Delete,
}

/// Decides which PVCs and whether a launcher Pod to create or delete.
pub fn plan_children(
    run: RunStrategy,
    disks: &[VirtualMachineDiskStatus],
    pvcs: &BTreeMap<String, Child>,
    pod_name: &str,
    pod: &Child,
) -> ChildrenPlan {
    let mut create_pvcs = Vec::new();
    let mut disks_settled = true;
    for disk in disks.iter().filter(|d| !d.persistent) {
        let name = disk.pvc_name.clone().unwrap_or_default();
        match pvcs.get(&name).unwrap_or(&Child::Missing) {
            Child::Missing => create_pvcs.push(disk.name.clone()),
            // Going away (deleted by someone): made again once it is gone, no Pod before.
            Child::Ours { deleting: true, .. } => disks_settled = false,
            Child::Ours { .. } => {}
            Child::Foreign => {
                return ChildrenPlan {
                    create_pvcs: Vec::new(),
                    pod: PodAction::Nothing,
                    conflict: Some(("PersistentVolumeClaim", name)),
                };
            }
        }
    }
    let pod = match (run, pod) {
        (RunStrategy::Always, Child::Foreign) => {
            return ChildrenPlan { create_pvcs, pod: PodAction::Nothing, conflict: Some(("Pod", pod_name.to_owned())) };
        }
        (RunStrategy::Always, Child::Missing) if disks_settled => PodAction::Create,
        (RunStrategy::Halted, Child::Ours { deleting: false, .. }) => PodAction::Delete,
        _ => PodAction::Nothing,
    };
    ChildrenPlan { create_pvcs, pod, conflict: None }
}

/// How far a VM got, after this reconcile's writes.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Waiting for, or failed on, something before its claims (`claimed: false`) or after them.
    Blocked {
        blocker: Blocker,
        claimed: bool,
    },
    Rejected {
        image: String,
        holder: String,
    },
    /// Another VM holds `image` (`Wait`), or this VM lets go of its claims before it is
    /// Rejected (its launcher Pod must go first).
    Waiting {
        image: String,
        holder: String,
    },
    /// `image` is free, and `first`, created earlier, goes first.
    Queued {
        image: String,
        first: String,
    },
    Terminating,
    /// Claims held, disks exist; the launcher Pod is as `pod` says, its guest as `launcher`.
    Provisioned {
        pod: Child,
        launcher: Box<LauncherView>,
    },
}

/// What a clone PVC's annotations say of how it is filled ([`build::vm_disk_pvc`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CloneView {
    /// `csi-clone` or `copy`.
    pub strategy: Option<String>,
    /// Why `copy` replaced the strategy asked for.
    pub fallback: Option<String>,
    /// The sha256 copied into a `copy` clone (or imported into an image PVC), once its
    /// copier (importer) succeeded.
    pub digest: Option<String>,
    /// The PVC a `copy` clone is copied from.
    pub copy_source: Option<String>,
    /// The URL an image PVC is imported from.
    pub import_source: Option<String>,
    /// How many times the import of an image PVC retried.
    pub import_retries: Option<u32>,
}

impl CloneView {
    /// The view of a PVC's metadata.
    pub fn of(meta: &kube::api::ObjectMeta) -> Self {
        let get = |key: &str| meta.annotations.as_ref().and_then(|a| a.get(key)).cloned();
        CloneView {
            strategy: get(names::CLONE_STRATEGY_ANNOTATION),
            fallback: get(names::CLONE_FALLBACK_ANNOTATION),
            digest: get(names::DIGEST_ANNOTATION),
            copy_source: get(names::COPY_SOURCE_ANNOTATION),
            import_source: get(names::IMPORT_SOURCE_ANNOTATION),
            import_retries: get(names::IMPORT_RETRIES_ANNOTATION).and_then(|r| r.parse().ok()),
        }
    }

    /// Whether the PVC still waits for its data: a `copy` clone or an import without its digest.
    pub fn data_pending(&self) -> bool {
        self.copy_pending() || (self.import_source.is_some() && self.digest.is_none())
    }

    /// Whether the clone is a `copy` still waiting for its data.
    pub fn copy_pending(&self) -> bool {
        self.strategy.as_deref() == Some(CloneStrategy::Copy.as_str()) && self.digest.is_none()
    }
}

/// Why a container waits to run (e.g. `CrashLoopBackOff`, `ImagePullBackOff`); `None` while it
/// is only being created.
pub(crate) fn waiting_reason(container: &CachedContainerStatus) -> Option<String> {
    let reason = container.state.as_ref()?.waiting.as_ref()?.reason.clone()?;
    (reason != "ContainerCreating" && reason != "PodInitializing").then_some(reason)
}

/// Why a Pod cannot be scheduled (its `PodScheduled` condition's message), if it cannot.
pub fn unschedulable(pod: &CachedPod) -> Option<String> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    let scheduled = conditions.iter().find(|c| c.type_ == "PodScheduled")?;
    (scheduled.status == "False").then(|| {
        let reason = scheduled.reason.as_deref().unwrap_or("Unschedulable");
        match scheduled.message.as_deref() {
            Some(message) => format!("{reason}: {message}"),
            None => reason.to_owned(),
        }
    })
}

/// What a VM's status shows of its launcher Pod's container.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LauncherView {
    /// The Pod is Ready: QEMU runs the guest (readiness probe on QMP `query-status`).
    pub ready: bool,
    /// The node it was scheduled to.
    pub node_name: Option<String>,
    /// The container's restart count.
    pub restarts: i32,
    /// How the container last ended (its current state when terminated, else its last state).
    pub last_exit: Option<LastExit>,
    /// Why the container waits to run again, e.g. `CrashLoopBackOff`.
    pub waiting: Option<String>,
    /// Why the Pod cannot be scheduled, if it cannot.
    pub unschedulable: Option<String>,
    /// The accelerator the launcher chose and why, once read from its log.
    pub accelerator: Option<(String, String)>,
    /// When the Pod was created (for the start latency).
    pub created: Option<Time>,
    /// Which runtime's workload this is: a launcher Pod, or a KubeVirt VirtualMachineInstance
    /// (see [`super::runtime::instance`]).
    pub runtime: Runtime,
}

impl LauncherView {
    /// The view of a launcher Pod (its `launcher` container).
    pub fn of(pod: &CachedPod) -> Self {
        let status = pod.status.as_ref();
        let container =
            status.and_then(|s| s.container_statuses.as_ref()?.iter().find(|c| c.name == build::LAUNCHER_CONTAINER));
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let terminated = container.and_then(|c| {
            c.state.as_ref().and_then(|s| s.terminated.as_ref()).or(c.last_state.as_ref()?.terminated.as_ref())
        });
        LauncherView {
            ready,
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            restarts: container.map_or(0, |c| c.restart_count),
            last_exit: terminated.map(|t| {
                let message = t.message.as_deref().unwrap_or_default();
                let (reason, message) = match ExitReason::parse(message) {
                    Some((reason, text)) => (reason.as_str().to_owned(), text.to_owned()),
                    None => (t.reason.clone().unwrap_or_else(|| "Error".into()), message.trim().to_owned()),
                };
                LastExit { reason, message, exit_code: t.exit_code, finished_at: t.finished_at.clone() }
            }),
            waiting: container.and_then(waiting_reason),
            unschedulable: unschedulable(pod),
            accelerator: None,
            created: pod.metadata.creation_timestamp.clone(),
            runtime: Runtime::Launcher,
        }
    }
}

/// The status a VM should have. `disks` carry the PVC phases observed; `previous` conditions
/// keep their transition times when unchanged, so a converged VM computes its current status.
pub fn status(vm: &VirtualMachine, resolved: Option<&Resolved>, verdict: &Verdict, now: &Time) -> VirtualMachineStatus {
    use VirtualMachinePhase as P;
    let previous = vm.status.clone().unwrap_or_default();
    let has_persistent = resolved.is_some_and(|r| r.disks.iter().any(|d| d.persistent));
    let claimed = if has_persistent {
        Cond::new(IMAGES_CLAIMED, true, reason::CLAIMED, "every persistent image is held by this VM")
    } else {
        Cond::new(IMAGES_CLAIMED, true, reason::NO_PERSISTENT_IMAGES, "no persistent image to claim")
    };
    let disks_ready = Cond::new(DISKS_READY, true, reason::DISKS_CREATED, "every disk's PVC exists");
    let (phase, conditions) = match verdict {
        Verdict::Terminating => {
            // Only Ready changes: the claims are released after the launcher Pod is gone.
            let mut kept: Vec<Cond> = previous
                .conditions
                .iter()
                .filter(|c| ![READY, RECONCILING, STALLED].contains(&c.r#type.as_str()))
                .map(Cond::from)
                .collect();
            kept.push(Cond::new(READY, false, reason::TERMINATING, "releasing the launcher Pod and claims"));
            (P::Terminating, kept)
        }
        Verdict::Blocked { blocker, claimed: held } => {
            let b = |t| Cond::new(t, false, blocker.reason, blocker.message.clone());
            let first = if *held { claimed } else { b(IMAGES_CLAIMED) };
            (blocker.phase, vec![first, b(DISKS_READY), b(READY)])
        }
        Verdict::Rejected { image, holder } => {
            let message = format!(
                "{}; this VM stays Rejected: to retry once the image is free, change its spec (e.g. \
                 onImageConflict: Wait) or delete and recreate it",
                claim::in_use_message(image, holder)
            );
            let b = |t| Cond::new(t, false, reason::IMAGE_IN_USE, message.clone());
            let claimed = Cond::new(IMAGES_CLAIMED, false, reason::IMAGE_IN_USE, claim::in_use_message(image, holder));
            (P::Rejected, vec![claimed, b(DISKS_READY), b(READY)])
        }
        Verdict::Waiting { .. } | Verdict::Queued { .. } => {
            let message = match verdict {
                Verdict::Queued { image, first } => {
                    format!("waiting for image {image}: VirtualMachine {first}, created earlier, is first in line")
                }
                Verdict::Waiting { image, holder } => {
                    format!("waiting for image {image}, held by VirtualMachine {holder}")
                }
                _ => unreachable!("matched above"),
            };
            let b = |t| Cond::new(t, false, reason::WAITING_FOR_IMAGE, message.clone());
            (P::Pending, vec![b(IMAGES_CLAIMED), b(DISKS_READY), b(READY)])
        }
        Verdict::Provisioned { pod, launcher } => {
            let halted = vm.spec.run_strategy == RunStrategy::Halted;
            let workload = workload_name(launcher.runtime);
            let (phase, ready) = match pod {
                Child::Ours { phase, deleting: false }
                    if phase.as_deref() == Some("Running") && launcher.ready && !halted =>
                {
                    let runs = match launcher.runtime {
                        Runtime::Kubevirt => "KubeVirt runs the guest (VirtualMachineInstance Ready)",
                        _ => "QEMU runs the guest",
                    };
                    (P::Running, Cond::new(READY, true, reason::RUNNING, runs))
                }
                // Someone else's Pod with the launcher's name is not ours to stop.
                // Powered off as the spec asks: converged (GitOps tools see it healthy).
                Child::Missing | Child::Foreign if halted => {
                    (P::Stopped, Cond::new(READY, true, reason::HALTED, "runStrategy is Halted: the VM is stopped"))
                }
                _ if halted => (P::Stopped, Cond::new(READY, false, reason::STOPPING, format!("removing {workload}"))),
                Child::Missing => {
                    (P::Provisioning, Cond::new(READY, false, reason::PROVISIONING, format!("creating {workload}")))
                }
                Child::Ours { deleting: true, .. } => (
                    P::Starting,
                    Cond::new(
                        READY,
                        false,
                        reason::STARTING,
                        format!("{workload} is stopping; a new one starts once it is gone"),
                    ),
                ),
                _ => (P::Starting, Cond::new(READY, false, reason::STARTING, starting_message(launcher))),
            };
            (phase, vec![claimed, disks_ready, ready])
        }
    };
    let mut conditions = conditions;
    if let Some(ready) = conditions.iter().find(|c| c.r#type == READY) {
        let health = Health::of(ready, matches!(phase, P::Rejected | P::Failed)).conditions();
        conditions.extend(health);
    }
    if *verdict == Verdict::Terminating {
        return VirtualMachineStatus {
            phase: Some(phase),
            conditions: merge(&previous.conditions, conditions, vm.metadata.generation, now),
            observed_generation: vm.metadata.generation,
            ..previous
        };
    }
    let record = !matches!(verdict, Verdict::Blocked { claimed: false, .. });
    let launcher_pod = match verdict {
        Verdict::Provisioned { pod: Child::Ours { .. }, launcher } if launcher.runtime == Runtime::Launcher => {
            Some(names::launcher_pod(&vm.namespace().unwrap_or_default(), &vm.name_any()))
        }
        _ => None,
    };
    // `kubevirt` while its workload is a VirtualMachineInstance (or is made one now), and kept
    // whatever else happens until a launcher Pod replaces it: how a later reconcile knows a VMI
    // may exist (src/controller/virtual_machine.rs `workload`). Absent for the launcher, so the
    // launcher's VMs write nothing new.
    let runtime = match verdict {
        Verdict::Provisioned { pod: Child::Ours { .. }, launcher } => {
            (launcher.runtime == Runtime::Kubevirt).then_some(Runtime::Kubevirt)
        }
        _ => previous.runtime,
    };
    // A VirtualMachineInstance whose guest ended is replaced at once: its end is shown.
    let ended = match verdict {
        Verdict::Provisioned { launcher, .. } if launcher.runtime == Runtime::Kubevirt => launcher.last_exit.clone(),
        _ => None,
    };
    // What the launcher shows while its Pod exists and is not going; the last exit stays.
    let running = match verdict {
        Verdict::Provisioned { pod: Child::Ours { deleting: false, .. }, launcher } => Some(launcher),
        _ => None,
    };
    VirtualMachineStatus {
        phase: Some(phase),
        disks: if record { resolved.map(|r| r.disks.clone()).unwrap_or_default() } else { Vec::new() },
        cpu: resolved.filter(|_| record).map(|r| r.cpu),
        memory: resolved.filter(|_| record).map(|r| r.memory.clone()),
        runtime,
        launcher_pod,
        node_name: running.and_then(|l| l.node_name.clone()),
        accelerator: running
            .and_then(|l| l.accelerator.as_ref().map(|(a, _)| a.clone()).or(previous.accelerator.clone())),
        restarts: running.map(|l| l.restarts),
        last_exit: running.and_then(|l| l.last_exit.clone()).or(ended).or(previous.last_exit),
        observed_generation: vm.metadata.generation,
        conditions: merge(&previous.conditions, conditions, vm.metadata.generation, now),
    }
}

/// What the status calls the workload of `runtime`.
fn workload_name(runtime: Runtime) -> &'static str {
    match runtime {
        Runtime::Kubevirt => "the VirtualMachineInstance",
        _ => "the launcher Pod",
    }
}

/// The Ready message of a VM whose launcher has not started the guest (yet, or again).
fn starting_message(launcher: &LauncherView) -> String {
    if launcher.runtime == Runtime::Kubevirt {
        let state = launcher.waiting.as_deref().unwrap_or("not running yet");
        return match &launcher.last_exit {
            Some(exit) => {
                format!("the VirtualMachineInstance is {state}; it last ended: {}: {}", exit.reason, exit.message)
            }
            None => format!("the VirtualMachineInstance is {state}"),
        };
    }
    if let Some(why) = &launcher.unschedulable {
        return format!("the launcher Pod cannot be scheduled: {why}");
    }
    match (&launcher.last_exit, &launcher.waiting) {
        (Some(exit), waiting) => format!(
            "the launcher starts the guest again (restart {}{}); it last ended: {}: {}",
            launcher.restarts,
            waiting.as_deref().map(|w| format!(", {w}")).unwrap_or_default(),
            exit.reason,
            exit.message
        ),
        (None, Some(waiting)) => format!("the launcher Pod waits: {waiting}"),
        (None, None) => "QEMU does not run the guest yet".into(),
    }
}

/// Another VM of the namespace, as far as the order of claims cares: the VM, and the persistent
/// images its Template resolves to now ([`claims_now`]); created earlier and not at its claims
/// yet, it goes first for those.
#[derive(Clone, Debug)]
pub struct OtherVm<'a> {
    /// The other VM.
    pub vm: &'a VirtualMachine,
    /// The persistent images it would claim now.
    pub claims_now: BTreeSet<String>,
}

/// The persistent images a VM made from `template` would claim now: none while the Template
/// waits for something or can never work.
pub fn claims_now<'a>(template: Option<&TemplateSpec>, images: impl Fn(&str) -> Option<&'a Image>) -> BTreeSet<String> {
    match template.map(|t| check_template(t, images)) {
        Some(Ok(disks)) => disks.into_iter().filter(|d| d.persistent).filter_map(|d| d.image).collect(),
        _ => BTreeSet::new(),
    }
}

/// Everything one VM reconcile decides from: the caches and the claims read from the API
/// server, plus what applying an earlier plan of this reconcile found out.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    /// The VM reconciled.
    pub vm: &'a VirtualMachine,
    /// Its Template, if it exists.
    pub template: Option<&'a Template>,
    /// The Images its Template and recorded disks name, those that exist.
    pub images: BTreeMap<String, &'a Image>,
    /// Who holds each persistent image the VM needs or holds, read from the API server.
    pub claims: BTreeMap<String, ClaimState>,
    /// The other VMs of the namespace; only filled when an image it needs is free.
    pub others: Vec<OtherVm<'a>>,
    /// Its clone and volatile PVCs, by PVC name.
    pub pvcs: BTreeMap<String, Child>,
    /// Its workload, known by the identity recorded on it (see [`super::claim::launcher_of`]):
    /// the launcher Pod, or with the `kubevirt` runtime its VirtualMachineInstance (going while
    /// its virt-launcher Pods are), whichever [`Self::runtime`] says.
    pub pod: Child,
    /// What its workload shows of the guest, when it is ours.
    pub launcher: LauncherView,
    /// The runtime in force ([`super::runtime::in_force`]): the one whose workload exists, else
    /// the one a new workload gets.
    pub runtime: Choice,
    /// It ran with KubeVirt (`status.runtime`) and vmkeep cannot see its VirtualMachineInstance
    /// now (KubeVirt's API unusable, or not listed yet): one may exist, so nothing that needs
    /// it gone (a release, a launcher Pod, `Stopped`) may happen.
    pub instance_unseen: bool,
    /// It ran with KubeVirt and its VirtualMachineInstance and virt-launcher Pods are seen gone:
    /// `status.runtime` no longer needs to say `kubevirt`.
    pub instance_gone: bool,
    /// The clone strategy of each clone disk whose PVC is still to be made, by disk name
    /// (`csi-clone` when absent).
    pub clone_choices: BTreeMap<String, Chosen>,
    /// What its clone PVCs' annotations say, by PVC name.
    pub clones: BTreeMap<String, CloneView>,
    /// Its copier Pods, by the PVC each fills.
    pub copiers: BTreeMap<String, MoverState>,
    /// Copies Images make of the VM's disks now (a disk saved as an image, a persistent image
    /// cloned), as messages: the launcher waits for them (a disk is never copied under a guest).
    pub saving: Vec<String>,
    /// Child names found taken by objects that are not the VM's when it tried to create them.
    pub taken: BTreeSet<(&'static str, String)>,
    /// The container image of launcher Pods.
    pub launcher_image: &'a str,
    /// vCPUs per requested CPU of launcher Pods (`--cpu-allocation-ratio`).
    pub cpu_allocation_ratio: u32,
    /// The access mode of PVCs vmkeep creates.
    pub access_mode: &'a str,
    /// The time of this observation (for condition transitions).
    pub now: Time,
}

/// A change to the VM's workload (its launcher Pod, or its VirtualMachineInstance).
#[derive(Clone, Debug, PartialEq)]
pub enum PodChange {
    /// Create this launcher Pod.
    Create(Box<Pod>),
    /// Create this KubeVirt VirtualMachineInstance (the `kubevirt` runtime).
    CreateInstance(Box<build::Instance>),
    /// Delete the VM's launcher Pod (gracefully: fencing waits until it is gone).
    Delete,
    /// Delete the VM's VirtualMachineInstance (gracefully: fencing waits until it and its
    /// virt-launcher Pods are gone).
    DeleteInstance,
}

/// The change that stops the VM's workload of the runtime in force.
fn stop_workload(obs: &Observed) -> PodChange {
    match obs.runtime {
        Choice::Run(Runtime::Kubevirt) => PodChange::DeleteInstance,
        _ => PodChange::Delete,
    }
}

/// What one VM reconcile does, in the order the controller applies it: finalizer, claims to
/// take (in order, stopping at the first lost), claims to release (fenced), PVCs, the launcher
/// Pod, the status, a Warning Event, the finalizer's removal.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmPlan {
    /// Add the finalizer that fences the VM's claims.
    pub add_finalizer: bool,
    /// Persistent images to claim, in this order.
    pub take: Vec<String>,
    /// Persistent images to release (each release is fenced again on the API server).
    pub release: Vec<String>,
    /// Clone and volatile-disk PVCs to create.
    pub create_pvcs: Vec<PersistentVolumeClaim>,
    /// A change to the launcher Pod.
    pub pod: Option<PodChange>,
    /// Copier Pods to create (after the PVCs, before the launcher).
    pub create_copiers: Vec<Pod>,
    /// Digests to record on copied PVCs `(pvc, digest)`: the copy is complete.
    pub record_digests: Vec<(String, String)>,
    /// Copier Pods to delete (their copy is recorded).
    pub delete_copiers: Vec<String>,
    /// The VM's own disk PVCs to delete (its deletion: see `decide_cleanup`).
    pub delete_pvcs: Vec<String>,
    /// The status to have (written when it differs); `None` leaves it as it is.
    pub status: Option<VirtualMachineStatus>,
    /// A Warning Event `(reason, message)`, once per transition.
    pub warning: Option<(&'static str, String)>,
    /// A Normal Event `(reason, message)`, once per transition.
    pub notice: Option<(&'static str, String)>,
    /// Remove the finalizer: the VM may go.
    pub remove_finalizer: bool,
    /// Look again after this long even if nothing changes.
    pub requeue: Option<Duration>,
}

/// How soon a VM that queues behind an earlier VM looks again (that VM may never take the
/// image, e.g. when it waits for a Template).
const QUEUED_RECHECK: Duration = Duration::from_secs(2);
/// How soon a VM whose launcher Pod is going looks again (the Pod's deletion wakes it too).
const POD_GOING_RECHECK: Duration = Duration::from_secs(10);
/// The least time between the creation of a VirtualMachineInstance that `Failed` and its
/// replacement.
const REPLACE_FAILED: Duration = Duration::from_secs(30);
/// How soon a VM whose runtime is not available looks again (KubeVirt may be installed).
const RUNTIME_RECHECK: Duration = Duration::from_secs(10);

/// The whole decision of one VM reconcile (see the module).
pub fn decide(obs: &Observed) -> VmPlan {
    if obs.vm.metadata.deletion_timestamp.is_some() {
        return decide_cleanup(obs);
    }
    let vm = obs.vm;
    let mine: Vec<String> =
        obs.claims.iter().filter(|(_, s)| **s == ClaimState::Mine).map(|(i, _)| i.clone()).collect();
    if claim::stays_rejected(vm) {
        // A Rejected VM holds nothing; should it still hold a claim, it lets go (fenced). Its
        // message follows the claims: who holds the image now, or that it is free to retry.
        let mut plan = let_go(obs, mine, VmPlan::default());
        plan.status = Some(still_rejected(obs));
        return plan;
    }
    let mut plan = VmPlan::default();
    // An image this VM holds keeps, for it, the mode in force: a persistence change waits for it,
    // and it must not wait for that change (a status lost in a restore resolves again).
    let held: BTreeMap<&str, Image> = mine
        .iter()
        .filter_map(|name| {
            let mut image = (*obs.images.get(name)?).clone();
            image.spec.persistent = image.status.as_ref()?.persistent?;
            Some((name.as_str(), image))
        })
        .collect();
    let images = |n: &str| held.get(n).or_else(|| obs.images.get(n).copied());
    let resolved = match resolve_disks(vm, obs.template.map(|t| &t.spec), images) {
        Ok(resolved) => resolved,
        Err(blocker) => {
            // An image still persistent while a change away from it waits, held by another VM:
            // that is a conflict, and `Reject` means Rejected (a `Wait` VM waits for the change).
            let held = obs.template.and_then(|t| held_by_other(vm, &t.spec, images));
            let verdict = match held {
                Some((image, holder))
                    if vm.spec.on_image_conflict == crate::api::virtual_machine::OnImageConflict::Reject =>
                {
                    Verdict::Rejected { image, holder }
                }
                _ => Verdict::Blocked { blocker, claimed: false },
            };
            return with_status(obs, plan, None, verdict);
        }
    };
    // A VM to be started needs its runtime; a Halted one does not, unless its VirtualMachineInstance
    // may still run where vmkeep cannot see it.
    let unavailable = match &obs.runtime {
        _ if vm.spec.run_strategy == RunStrategy::Halted && !obs.instance_unseen => None,
        Choice::NotAvailable(why) => Some(why.clone()),
        Choice::Wait => Some("waiting to learn whether the cluster serves KubeVirt's API".to_owned()),
        Choice::Run(_) => None,
    };
    if let Some(message) = unavailable {
        // Nothing can run it: it takes no claim (another VM may use the images meanwhile). One
        // that ran with KubeVirt keeps what it holds: its VMI may run where vmkeep cannot see.
        let mut plan = if obs.instance_unseen { plan } else { let_go(obs, mine, plan) };
        plan.requeue = Some(RUNTIME_RECHECK);
        let blocker = Blocker::pending(reason::RUNTIME_NOT_AVAILABLE, message);
        return with_status(obs, plan, Some(&resolved), Verdict::Blocked { blocker, claimed: false });
    }
    let wanted = persistent_images(&resolved.disks);
    plan.add_finalizer = !wanted.is_empty() && !obs.vm.finalizers().iter().any(|f| f == names::VM_FINALIZER);
    let states: BTreeMap<String, ClaimState> =
        wanted.iter().map(|i| (i.clone(), obs.claims.get(i).cloned().unwrap_or(ClaimState::Free))).collect();
    // A free image is only taken while a new VM could start using it (not deleted, no
    // persistence change pending, ...).
    for (image, _) in states.iter().filter(|(_, s)| **s == ClaimState::Free) {
        if let Err(blocker) = usable_image(image, images(image)) {
            return with_status(obs, plan, Some(&resolved), Verdict::Blocked { blocker, claimed: false });
        }
    }
    let would_claim = |other: &VirtualMachine, image: &str| {
        obs.others.iter().find(|o| std::ptr::eq(o.vm, other)).is_some_and(|o| o.claims_now.contains(image))
    };
    let first = |image: &str| claim::first_in_line(vm, obs.others.iter().map(|o| o.vm), image, would_claim);
    let verdict = match claim::plan_claims(vm.spec.on_image_conflict, &states, first) {
        ClaimPlan::Held => None,
        ClaimPlan::Take(free) => {
            plan.take = free;
            None
        }
        ClaimPlan::Conflict { image, holder, wait } => {
            let holding = mine.iter().any(|i| states.contains_key(i));
            // Rejected is final: only once this VM lets go of everything it holds.
            Some(if wait || holding { Verdict::Waiting { image, holder } } else { Verdict::Rejected { image, holder } })
        }
        ClaimPlan::Queued { image, first } => {
            plan.requeue = Some(QUEUED_RECHECK);
            Some(Verdict::Queued { image, first })
        }
    };
    if let Some(verdict) = verdict {
        let mut plan = let_go(obs, mine, plan);
        // Not holding every persistent image it needs, it runs no launcher: its claim was lost
        // (a Lease deleted or edited by hand) and another VM may now mount the image.
        if plan.pod.is_none()
            && let Child::Ours { deleting: false, .. } = obs.pod
        {
            plan.pod = Some(stop_workload(obs));
        }
        return with_status(obs, plan, Some(&resolved), verdict);
    }
    provision(obs, plan, resolved)
}

/// The first image of `template` whose persistent mode is still in force (a change to
/// non-persistent pending) and held by another VM than `vm`: `(image, holder)`.
fn held_by_other<'a>(
    vm: &VirtualMachine,
    template: &TemplateSpec,
    images: impl Fn(&str) -> Option<&'a Image>,
) -> Option<(String, String)> {
    template.disks.iter().filter_map(|d| d.image.as_deref()).find_map(|name| {
        let image = images(name)?;
        let status = image.status.as_ref()?;
        let holder = status.claimed_by.as_ref()?;
        let pending = status.persistent == Some(true) && !image.spec.persistent;
        (pending && vm.metadata.uid.as_deref() != Some(holder.uid.as_str()))
            .then(|| (name.to_owned(), holder.name.clone()))
    })
}

/// The status of a VM that stays Rejected: named after the image's holder now, or saying the
/// images are free and how to retry; only `Ready`'s message moves when they are free.
fn still_rejected(obs: &Observed) -> VirtualMachineStatus {
    let held = obs.claims.iter().find_map(|(image, state)| match state {
        ClaimState::Other { holder } => Some((image.clone(), holder.clone())),
        _ => None,
    });
    let verdict = match &held {
        Some((image, holder)) => Verdict::Rejected { image: image.clone(), holder: holder.clone() },
        // Keep the verdict's shape; the message is replaced below.
        None => Verdict::Rejected { image: String::new(), holder: String::new() },
    };
    let mut conditions = status(obs.vm, None, &verdict, &obs.now).conditions;
    if held.is_none() {
        let message = "the persistent images this VM needs are free now; it stays Rejected: to retry, change its \
                       spec (e.g. onImageConflict: Wait) or delete and recreate it";
        for c in conditions.iter_mut().filter(|c| c.r#type != RECONCILING) {
            c.message = message.to_owned();
        }
    }
    // Everything else stays as recorded when it was Rejected (no write unless the claims moved).
    VirtualMachineStatus { conditions, ..obs.vm.status.clone().unwrap_or_default() }
}

/// Lets go of the claims in `mine`: released once no launcher Pod of the VM exists, else the
/// Pod is stopped first (fencing) and the VM looks again once it is gone.
fn let_go(obs: &Observed, mine: Vec<String>, mut plan: VmPlan) -> VmPlan {
    if mine.is_empty() {
        return plan;
    }
    match &obs.pod {
        Child::Missing | Child::Foreign => plan.release = mine,
        Child::Ours { deleting, .. } => {
            if !deleting {
                plan.pod = Some(stop_workload(obs));
            }
            plan.requeue = Some(POD_GOING_RECHECK);
        }
    }
    plan
}

/// Children once the claims are (about to be) held: the missing PVCs, then the launcher Pod.
fn provision(obs: &Observed, mut plan: VmPlan, mut resolved: Resolved) -> VmPlan {
    let vm = obs.vm;
    let name = vm.name_any();
    let mut pvcs = obs.pvcs.clone();
    let mut pod = obs.pod.clone();
    let mut copiers = obs.copiers.clone();
    let ns = vm.namespace().unwrap_or_default();
    let pod_name = names::launcher_pod(&ns, &name);
    for (kind, taken) in &obs.taken {
        match *kind {
            "Pod" if *taken == pod_name => pod = Child::Foreign,
            "VirtualMachineInstance" => pod = Child::Foreign,
            // A copier's name taken by a Pod that is not the VM's (the Pod cache only sees
            // vmkeep's own).
            "Pod" => {
                let disk = resolved
                    .disks
                    .iter()
                    .filter_map(|d| d.pvc_name.as_ref())
                    .find(|p| names::copier_pod(&ns, p) == *taken);
                if let Some(pvc) = disk {
                    copiers.insert(pvc.clone(), MoverState::Foreign);
                }
            }
            _ => {
                pvcs.insert(taken.clone(), Child::Foreign);
            }
        }
    }
    let mut children = plan_children(vm.spec.run_strategy, &resolved.disks, &pvcs, &pod_name, &pod);
    let runtime = match obs.runtime {
        Choice::Run(runtime) => runtime,
        _ => Runtime::Launcher,
    };
    if runtime == Runtime::Kubevirt && children.conflict == Some(("Pod", pod_name.clone())) {
        // The workload is the VirtualMachineInstance named after the VM.
        children.conflict = Some(("VirtualMachineInstance", name.clone()));
    }
    // A VirtualMachineInstance whose guest ended is not started again by KubeVirt: with
    // `runStrategy: Always` it is replaced (deleted, then made again once it and its Pods are
    // gone), as the launcher starts a guest again that powered itself off.
    // A VMI that failed young is replaced no sooner than REPLACE_FAILED after it was made, so
    // a guest that cannot start does not loop (the launcher has the kubelet's back-off).
    if runtime == Runtime::Kubevirt
        && vm.spec.run_strategy == RunStrategy::Always
        && let Child::Ours { phase, deleting: false } = &pod
        && super::runtime::finished(phase.as_deref())
    {
        let age = obs.launcher.created.as_ref().map_or(i64::MAX, |c| obs.now.0.as_second() - c.0.as_second());
        let wait = REPLACE_FAILED.as_secs() as i64 - age;
        if phase.as_deref() == Some("Failed") && wait > 0 {
            plan.requeue = Some(Duration::from_secs(wait as u64));
        } else {
            children.pod = PodAction::Delete;
        }
    }
    for disk_name in &children.create_pvcs {
        let Some(disk) = resolved.disks.iter().find(|d| &d.name == disk_name) else { continue };
        let image = disk.image.as_deref().and_then(|i| obs.images.get(i).copied());
        let source = resolved.clone_sources.get(disk_name).map(String::as_str);
        if disk.image.is_some() && source.is_none() {
            let blocker = Blocker::pending(
                reason::IMAGE_NOT_READY,
                format!("image {} is not ready to be cloned", disk.image.as_deref().unwrap_or_default()),
            );
            return with_status(obs, plan, Some(&resolved), Verdict::Blocked { blocker, claimed: true });
        }
        let csi = Chosen { strategy: CloneStrategy::CsiClone, fallback: None };
        let chosen = obs.clone_choices.get(disk_name).unwrap_or(&csi);
        let clone = source.map(|source| build::CloneOf { source, chosen });
        let pvc = build::vm_disk_pvc(vm, disk, image, clone, obs.access_mode);
        pvcs.insert(pvc.name_any(), Child::Ours { phase: Some("Pending".into()), deleting: false });
        plan.create_pvcs.push(pvc);
    }
    // Copies: a copier per `copy` clone without its digest, only while no launcher Pod exists
    // (never under a running guest); the launcher waits for every copy.
    let mut copying = Vec::new();
    let planned: BTreeMap<String, CloneView> =
        plan.create_pvcs.iter().map(|p| (p.name_any(), CloneView::of(&p.metadata))).collect();
    for disk in resolved.disks.iter_mut().filter(|d| !d.persistent && d.image.is_some()) {
        let pvc = disk.pvc_name.clone().unwrap_or_default();
        let Some(mut view) = planned.get(&pvc).or_else(|| obs.clones.get(&pvc)).cloned() else { continue };
        if view.copy_pending() && children.conflict.is_none() && obs.pod == Child::Missing {
            let image = disk.image.clone().unwrap_or_default();
            let copier = names::copier_pod(&ns, &pvc);
            match copiers.get(&pvc) {
                Some(MoverState::Done(digest)) => {
                    plan.record_digests.push((pvc.clone(), digest.clone()));
                    plan.delete_copiers.push(copier);
                    view.digest = Some(digest.clone());
                }
                None => match resolved.clone_sources.get(&disk.name) {
                    Some(source) => {
                        let found = obs.images.get(&image);
                        let mode = found.map_or(VolumeMode::Filesystem, |i| i.spec.volume_mode);
                        let blank = found.is_some_and(|i| i.spec.source.blank.is_some());
                        let capacity = disk.size.as_ref().map_or(0, quantity::bytes_u64);
                        let job = build::CopyJob { target: &pvc, source, mode, blank_source: blank, capacity };
                        let mut pod = build::copier_pod(vm, (names::COPY_FOR_LABEL, &name), &job, obs.launcher_image);
                        // Found again by the VM's uid after an orphaning deletion (see decide_cleanup).
                        let uid = names::label_value(&vm.uid().unwrap_or_default());
                        pod.labels_mut().insert(names::VM_UID_LABEL.to_owned(), uid);
                        plan.create_copiers.push(pod);
                        copying.push(format!("copying disk {} from image {image} (copier Pod {copier})", disk.name));
                    }
                    None => copying.push(format!("disk {} waits for image {image} to be ready to copy", disk.name)),
                },
                Some(MoverState::Running { note }) => copying.push(format!(
                    "copying disk {} from image {image} (copier Pod {copier}){}",
                    disk.name,
                    note.as_deref().map(|n| format!("; its last attempt failed: {n}")).unwrap_or_default()
                )),
                Some(MoverState::Failed(why)) => {
                    copying.push(format!("the copy of disk {} failed: {why} (delete Pod {copier} to retry)", disk.name))
                }
                Some(MoverState::Foreign) => copying.push(format!(
                    "Pod {copier} exists and does not belong to VirtualMachine {name}; vmkeep leaves it alone"
                )),
            }
        }
        disk.clone_strategy = view.strategy;
        disk.clone_fallback = view.fallback;
        // A blank image's copy copied nothing, a kept clone was not copied: no digest to show.
        disk.digest = view.digest.filter(|d| crate::mover::copy::is_sha256(d));
    }
    let copying = (!copying.is_empty()).then(|| copying.join("; "));
    let saving = (children.pod == PodAction::Create && !obs.saving.is_empty()).then(|| obs.saving.join("; "));
    if saving.is_some() {
        plan.requeue = Some(POD_GOING_RECHECK);
    }
    if children.conflict.is_none() && copying.is_none() && saving.is_none() {
        match children.pod {
            PodAction::Create => {
                let disks = launcher_disks(&resolved.disks, |n| obs.images.get(n).copied());
                let inputs = build::LauncherInputs {
                    image: obs.launcher_image,
                    cpu: resolved.cpu,
                    cpu_allocation_ratio: obs.cpu_allocation_ratio,
                    memory: &resolved.memory,
                    disks: &disks,
                    settings: obs.template.and_then(|t| t.spec.launcher.as_ref()),
                };
                plan.pod = Some(match runtime {
                    Runtime::Kubevirt => {
                        PodChange::CreateInstance(Box::new(build::virtual_machine_instance(vm, &inputs)))
                    }
                    _ => PodChange::Create(Box::new(build::launcher_pod(vm, &inputs))),
                });
                pod = Child::Ours { phase: Some("Pending".into()), deleting: false };
            }
            PodAction::Delete => {
                plan.pod = Some(stop_workload(obs));
                pod = Child::Ours { phase: None, deleting: true };
            }
            PodAction::Nothing => {}
        }
    }
    for disk in &mut resolved.disks {
        disk.phase = match pvcs.get(disk.pvc_name.as_deref().unwrap_or_default()) {
            Some(Child::Ours { phase, .. }) => phase.clone().or(Some("Pending".into())),
            _ if disk.persistent => Some("Attached".into()),
            _ => Some("Missing".into()),
        };
    }
    let verdict = match children.conflict {
        None if let Some(message) = saving => Verdict::Blocked {
            blocker: Blocker {
                phase: VirtualMachinePhase::Provisioning,
                reason: reason::DISK_BEING_COPIED,
                message: format!("the launcher waits: {message}"),
            },
            claimed: true,
        },
        None if let Some(message) = copying => Verdict::Blocked {
            blocker: Blocker { phase: VirtualMachinePhase::Provisioning, reason: reason::COPYING, message },
            claimed: true,
        },
        Some((kind, object)) => Verdict::Blocked {
            blocker: Blocker::pending(
                reason::NAME_CONFLICT,
                format!("{kind} {object} exists and does not belong to VirtualMachine {name}; vmkeep leaves it alone"),
            ),
            claimed: true,
        },
        None => Verdict::Provisioned { pod, launcher: Box::new(obs.launcher.clone()) },
    };
    with_status(obs, plan, Some(&resolved), verdict)
}

/// The disks as the launcher attaches them: the volume mode of the image (Filesystem for a
/// volatile disk), the size of the VM's own PVC or of the persistent image, and whether the
/// content is blank (a volatile disk or a `source.blank` image: the launcher may create it).
pub fn launcher_disks<'a>(
    disks: &'a [VirtualMachineDiskStatus],
    images: impl Fn(&str) -> Option<&'a Image>,
) -> Vec<build::LauncherDisk<'a>> {
    disks
        .iter()
        .map(|disk| {
            let image = disk.image.as_deref().and_then(&images);
            let size = disk.size.as_ref().or_else(|| image?.status.as_ref()?.capacity.as_ref());
            build::LauncherDisk {
                disk,
                volume_mode: image.map_or(VolumeMode::Filesystem, |i| i.spec.volume_mode),
                capacity: size.map_or(0, quantity::bytes_u64),
                blank: image.is_none_or(|i| i.spec.source.blank.is_some()),
            }
        })
        .collect()
}

/// Deletion: stop the launcher Pod, wait until it is gone, release the claims, let the VM go.
/// The VM's clone and volatile PVCs and its copier Pods are deleted too, whatever the deletion's
/// propagation policy: a non-persistent disk dies with its VM (an orphaning deletion would leave
/// them without an owner for ever; found by the VM's uid label, [`names::VM_UID_LABEL`]).
fn decide_cleanup(obs: &Observed) -> VmPlan {
    // Shown even when vmkeep holds no finalizer on it (a foreground deletion, another finalizer):
    // the VM is going, whatever it was.
    let mut plan = VmPlan { status: Some(status(obs.vm, None, &Verdict::Terminating, &obs.now)), ..VmPlan::default() };
    if !obs.vm.finalizers().iter().any(|f| f == names::VM_FINALIZER) {
        return plan;
    }
    let mine: Vec<String> =
        obs.claims.iter().filter(|(_, s)| **s == ClaimState::Mine).map(|(i, _)| i.clone()).collect();
    if obs.instance_unseen {
        // Its VirtualMachineInstance cannot be seen (KubeVirt's API unusable, or not listed
        // yet): nothing is released, nothing is deleted, until it can.
        plan.requeue = Some(RUNTIME_RECHECK);
        return plan;
    }
    plan.delete_pvcs = (obs.pvcs.iter())
        .filter(|(_, child)| matches!(child, Child::Ours { deleting: false, .. }))
        .map(|(pvc, _)| pvc.clone())
        .collect();
    plan.delete_copiers = (obs.copiers.iter())
        .filter(|(_, state)| !matches!(state, MoverState::Foreign))
        .map(|(pvc, _)| names::copier_pod(&obs.vm.namespace().unwrap_or_default(), pvc))
        .collect();
    match &obs.pod {
        Child::Ours { deleting, .. } => {
            if !deleting {
                plan.pod = Some(stop_workload(obs));
            }
            plan.requeue = Some(POD_GOING_RECHECK);
        }
        Child::Missing | Child::Foreign => {
            plan.release = mine;
            plan.remove_finalizer = true;
        }
    }
    plan
}

/// What becomes of a child of a VM (a disk PVC, a copier or launcher Pod, labelled with the VM's
/// uid) that no controller owns: an orphaning deletion of the VM (`--cascade=orphan`) strips
/// the owner references, and a VM without persistent disks has no finalizer to clean up after
/// it, so it would stay for ever (a launcher Pod kept running). A non-persistent disk dies with
/// its VM whatever the propagation policy (the rule of [`decide_cleanup`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeftBehind {
    /// Owned (the garbage collector's), not a VM's, or already going: nothing to do.
    No,
    /// Its VM is deleted or being deleted: delete it.
    Delete,
    /// Its VM exists and is not being deleted (its deletion may not have reached the cache
    /// yet, or a user removed the owner reference): look again soon.
    Recheck,
}

/// [`LeftBehind`] for `child`, given the metadata of the VM with the uid it is labelled with
/// (`None`: no such VM in the namespace, as the API server says: a VM that vmkeep cannot read
/// is left out of its cache but still exists).
pub fn left_behind(child: &ObjectMeta, vm: Option<&ObjectMeta>) -> LeftBehind {
    let labelled = child.labels.as_ref().is_some_and(|l| l.contains_key(names::VM_UID_LABEL));
    let controlled = child.owner_references.iter().flatten().any(|o| o.controller == Some(true));
    if !labelled || controlled || child.deletion_timestamp.is_some() {
        return LeftBehind::No;
    }
    match vm {
        Some(vm) if vm.deletion_timestamp.is_none() => LeftBehind::Recheck,
        _ => LeftBehind::Delete,
    }
}

/// Adds the status of `verdict` and the Warning it calls for (once per transition).
fn with_status(obs: &Observed, mut plan: VmPlan, resolved: Option<&Resolved>, verdict: Verdict) -> VmPlan {
    let vm = obs.vm;
    let previous = vm.status.as_ref();
    let entered = |phase: VirtualMachinePhase, reason: &str| {
        previous.is_none_or(|p| {
            p.phase != Some(phase)
                || p.observed_generation != vm.metadata.generation
                || !p.conditions.iter().any(|c| c.r#type == READY && c.reason == reason)
        })
    };
    plan.warning = match &verdict {
        Verdict::Rejected { image, holder } if entered(VirtualMachinePhase::Rejected, reason::IMAGE_IN_USE) => {
            Some((reason::IMAGE_IN_USE, claim::in_use_message(image, holder)))
        }
        Verdict::Blocked { blocker, .. }
            if (blocker.phase == VirtualMachinePhase::Failed || blocker.reason == reason::NAME_CONFLICT)
                && entered(blocker.phase, blocker.reason) =>
        {
            Some((blocker.reason, blocker.message.clone()))
        }
        _ => None,
    };
    let mut status = status(vm, resolved, &verdict, &obs.now);
    let makes_instance = matches!(&verdict, Verdict::Provisioned { pod: Child::Ours { .. }, launcher }
        if launcher.runtime == Runtime::Kubevirt);
    if obs.instance_gone && !makes_instance {
        // Nothing of KubeVirt's left to look for (e.g. Halted, then moved to the launcher).
        status.runtime = None;
    }
    if let (Some(accelerator), None) = (&status.accelerator, previous.and_then(|p| p.accelerator.as_ref()))
        && let Some((_, why)) = &obs.launcher.accelerator
    {
        plan.notice = Some((reason::ACCELERATOR, format!("QEMU runs the guest with {accelerator} ({why})")));
    }
    plan.status = Some(status);
    plan
}
