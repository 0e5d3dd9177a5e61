//! What a VirtualMachine should be, decided from what was observed: which disks it has, which
//! persistent images it must claim, which children to create or delete, and its phase and
//! conditions. Plain data in, plain data out: no client here.
//!
//! "Why was this VM Rejected?" is answered by [`plan_claims`]; "why is it Pending?" by
//! [`resolve_disks`] and [`plan_children`].

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::Time};
use kube::ResourceExt;

use super::{
    conditions::{Cond, find, merge},
    names, quantity,
};
use crate::api::{
    Image, Template,
    image::{ImagePhase, ImageType},
    template::TemplateSpec,
    virtual_machine::{
        OnImageConflict, RunStrategy, VirtualMachine, VirtualMachineDiskStatus, VirtualMachinePhase,
        VirtualMachineStatus,
    },
};

pub const IMAGES_CLAIMED: &str = "ImagesClaimed";
pub const DISKS_READY: &str = "DisksReady";
pub const READY: &str = "Ready";

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
    pub r#type: ImageType,
}

/// Whether a new VM may start using `image` (named `name`): it exists, is not deleted or
/// disabled, and its PVC is ready.
pub fn usable_image(name: &str, image: Option<&Image>) -> Result<UsableImage, Blocker> {
    let Some(image) = image else {
        return Err(Blocker::pending("ImageNotFound", format!("image {name} does not exist")));
    };
    if image.metadata.deletion_timestamp.is_some() {
        return Err(Blocker::pending("ImageNotReady", format!("image {name} is being deleted")));
    }
    if image.spec.disabled {
        return Err(Blocker::pending("ImageDisabled", format!("image {name} is disabled")));
    }
    let status = image.status.clone().unwrap_or_default();
    let ready = matches!(status.phase, Some(ImagePhase::Ready | ImagePhase::Used | ImagePhase::UsedPersistent));
    match (ready, status.persistent, status.pvc_name) {
        (true, Some(persistent), Some(pvc_name)) => {
            Ok(UsableImage { persistent, pvc_name, capacity: status.capacity, r#type: image.spec.r#type })
        }
        _ => {
            let phase = status.phase.map_or_else(|| "not provisioned yet".to_owned(), |p| format!("{p:?}"));
            Err(Blocker::pending("ImageNotReady", format!("image {name} is not ready ({phase})")))
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
                                return Err(Blocker::failed(
                                    "InvalidDiskSize",
                                    format!(
                                        "disk {} asks for {} but image {name} holds {}",
                                        disk.name, size.0, capacity.0
                                    ),
                                ));
                            }
                            if image.persistent && want > have {
                                return Err(Blocker::failed(
                                    "InvalidDiskSize",
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
                    if image.persistent
                        && let Some(other) = persistent_images.insert(name, &disk.name)
                    {
                        return Err(Blocker::failed(
                            "InvalidTemplate",
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
                    "InvalidTemplate",
                    format!("disk {} must name exactly one of image or blank", disk.name),
                ));
            }
        }
    }
    if cdroms.len() > 1 {
        return Err(Blocker::failed(
            "InvalidTemplate",
            format!("disks {} all use CDROM images; a template may have one", cdroms.join(", ")),
        ));
    }
    match pending {
        Some(blocker) => Err(blocker),
        None => Ok(disks),
    }
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

/// Whether a Rejected VM stays Rejected: until its spec changes (or it is recreated).
pub fn stays_rejected(vm: &VirtualMachine) -> bool {
    vm.status.as_ref().is_some_and(|s| {
        s.phase == Some(VirtualMachinePhase::Rejected) && s.observed_generation == vm.metadata.generation
    })
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
            "TemplateNotFound",
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
            }
        })
        .collect();
    Ok(Resolved { disks, cpu: template.cpu, memory: template.memory.clone(), clone_sources })
}

/// The persistent images a VM must hold, in disk order.
pub fn persistent_images(disks: &[VirtualMachineDiskStatus]) -> Vec<String> {
    disks.iter().filter(|d| d.persistent).filter_map(|d| d.image.clone()).collect()
}

/// Who holds the claim on a persistent image, as seen by one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimState {
    /// This VM holds it.
    Mine,
    /// Nobody holds it.
    Free,
    /// Another VirtualMachine holds it.
    Other { holder: String },
}

/// What a VM does about its persistent images.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimPlan {
    /// It holds every one (or needs none).
    Held,
    /// Take these free images now.
    Take(Vec<String>),
    /// Another VM holds `image`: with `Reject` the VM is Rejected, with `Wait` it waits. Either
    /// way it lets go of the images it holds, so two waiting VMs never deadlock.
    Conflict { image: String, holder: String, wait: bool },
    /// `image` is free but a VM created earlier waits for it: first come, first served.
    Queued { image: String },
}

/// Decides the claims of a VM from who holds each persistent image it needs.
pub fn plan_claims(
    on_conflict: OnImageConflict,
    states: &BTreeMap<String, ClaimState>,
    earlier_waiter: impl Fn(&str) -> bool,
) -> ClaimPlan {
    let wait = on_conflict == OnImageConflict::Wait;
    if let Some((image, ClaimState::Other { holder })) =
        states.iter().find(|(_, s)| matches!(s, ClaimState::Other { .. }))
    {
        return ClaimPlan::Conflict { image: image.clone(), holder: holder.clone(), wait };
    }
    let free: Vec<String> = states.iter().filter(|(_, s)| **s == ClaimState::Free).map(|(i, _)| i.clone()).collect();
    if free.is_empty() {
        return ClaimPlan::Held;
    }
    if wait && let Some(image) = free.iter().find(|i| earlier_waiter(i)) {
        return ClaimPlan::Queued { image: image.clone() };
    }
    ClaimPlan::Take(free)
}

/// The message of a conflict, shared by the status, the Event and the admission webhook.
pub fn in_use_message(image: &str, holder: &str) -> String {
    format!("image {image} is persistent and already in use by VirtualMachine {holder}")
}

/// Whether `vm` waits for persistent `image` (it has recorded it and says so in its status).
pub fn waits_for(vm: &VirtualMachine, image: &str) -> bool {
    let Some(status) = &vm.status else { return false };
    vm.metadata.deletion_timestamp.is_none()
        && find(&status.conditions, IMAGES_CLAIMED).is_some_and(|c| c.reason == "WaitingForImage")
        && status.disks.iter().any(|d| d.persistent && d.image.as_deref() == Some(image))
}

/// Whether a VM created before `me` waits for `image` (creation time, then name, decides).
pub fn earlier_waiter<'a>(
    me: &VirtualMachine,
    others: impl IntoIterator<Item = &'a VirtualMachine>,
    image: &str,
) -> bool {
    let key = |vm: &VirtualMachine| (vm.metadata.creation_timestamp.clone().map(|t| t.0), vm.name_any());
    let mine = key(me);
    others
        .into_iter()
        .filter(|o| o.namespace() == me.namespace() && o.uid() != me.uid())
        .any(|o| waits_for(o, image) && key(o) < mine)
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
    Waiting {
        image: String,
        holder: Option<String>,
    },
    Terminating,
    /// Claims held, disks exist; the launcher Pod is as `pod` says.
    Provisioned {
        pod: Child,
    },
}

/// The status a VM should have. `disks` carry the PVC phases observed; `previous` conditions
/// keep their transition times when unchanged, so a converged VM computes its current status.
pub fn status(vm: &VirtualMachine, resolved: Option<&Resolved>, verdict: &Verdict, now: &Time) -> VirtualMachineStatus {
    use VirtualMachinePhase as P;
    let previous = vm.status.clone().unwrap_or_default();
    let has_persistent = resolved.is_some_and(|r| r.disks.iter().any(|d| d.persistent));
    let claimed = if has_persistent {
        Cond::new(IMAGES_CLAIMED, true, "Claimed", "every persistent image is held by this VM")
    } else {
        Cond::new(IMAGES_CLAIMED, true, "NoPersistentImages", "no persistent image to claim")
    };
    let disks_ready = Cond::new(DISKS_READY, true, "DisksCreated", "every disk's PVC exists");
    let (phase, conditions) = match verdict {
        Verdict::Terminating => {
            // Only Ready changes: the claims are released after the launcher Pod is gone.
            let mut kept: Vec<Cond> =
                previous.conditions.iter().filter(|c| c.r#type != READY).map(Cond::from).collect();
            kept.push(Cond::new(READY, false, "Terminating", "releasing the launcher Pod and claims"));
            (P::Terminating, kept)
        }
        Verdict::Blocked { blocker, claimed: held } => {
            let b = |t| Cond::new(t, false, blocker.reason, blocker.message.clone());
            let first = if *held { claimed } else { b(IMAGES_CLAIMED) };
            (blocker.phase, vec![first, b(DISKS_READY), b(READY)])
        }
        Verdict::Rejected { image, holder } => {
            let b = |t| Cond::new(t, false, "ImageInUse", in_use_message(image, holder));
            (P::Rejected, vec![b(IMAGES_CLAIMED), b(DISKS_READY), b(READY)])
        }
        Verdict::Waiting { image, holder } => {
            let message = match holder {
                Some(holder) => format!("waiting for image {image}, held by VirtualMachine {holder}"),
                None => format!("waiting for image {image}: a VirtualMachine created earlier is first in line"),
            };
            let b = |t| Cond::new(t, false, "WaitingForImage", message.clone());
            (P::Pending, vec![b(IMAGES_CLAIMED), b(DISKS_READY), b(READY)])
        }
        Verdict::Provisioned { pod } => {
            let halted = vm.spec.run_strategy == RunStrategy::Halted;
            let (phase, ready) = match pod {
                Child::Ours { phase, deleting: false } if phase.as_deref() == Some("Running") && !halted => {
                    (P::Running, Cond::new(READY, true, "Running", "the launcher Pod runs"))
                }
                // Someone else's Pod with the launcher's name is not ours to stop.
                Child::Missing | Child::Foreign if halted => {
                    (P::Stopped, Cond::new(READY, false, "Halted", "runStrategy is Halted"))
                }
                _ if halted => (P::Stopped, Cond::new(READY, false, "Stopping", "removing the launcher Pod")),
                Child::Missing => {
                    (P::Provisioning, Cond::new(READY, false, "Provisioning", "creating the launcher Pod"))
                }
                _ => (P::Starting, Cond::new(READY, false, "Starting", "the launcher Pod is not running yet")),
            };
            (phase, vec![claimed, disks_ready, ready])
        }
    };
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
        Verdict::Provisioned { pod: Child::Ours { .. } } => Some(names::launcher_pod(&vm.name_any())),
        _ => None,
    };
    VirtualMachineStatus {
        phase: Some(phase),
        disks: if record { resolved.map(|r| r.disks.clone()).unwrap_or_default() } else { Vec::new() },
        cpu: resolved.filter(|_| record).map(|r| r.cpu),
        memory: resolved.filter(|_| record).map(|r| r.memory.clone()),
        launcher_pod,
        observed_generation: vm.metadata.generation,
        conditions: merge(&previous.conditions, conditions, vm.metadata.generation, now),
    }
}
