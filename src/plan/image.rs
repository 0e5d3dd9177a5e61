//! What an Image should be: its PVC, the persistence mode in force, its phase and conditions,
//! and whether its deletion may go ahead. Plain data in, plain data out.

use k8s_openapi::apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::Time};
use kube::ResourceExt;

use super::{
    conditions::{Cond, merge},
    names, quantity, reason,
};
use crate::api::{
    Image, ImageSpec, ImageStatus,
    image::{ClaimHolder, ImagePhase, VolumeMode},
};

pub const READY: &str = "Ready";
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
        capacity: Option<Quantity>,
        storage_class: Option<String>,
        volume_mode: Option<String>,
    },
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
}

/// A PVC to create for an image.
#[derive(Clone, Debug, PartialEq)]
pub struct PvcRequest {
    pub name: String,
    pub size: Quantity,
    pub storage_class: Option<String>,
    pub volume_mode: VolumeMode,
    /// Clone from this PVC (same namespace).
    pub clone_from: Option<String>,
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
    /// The image's own PVC to delete: the image is deleted and nothing uses it any more. Image
    /// PVCs have no owner reference, so this (not garbage collection) is how they go, whatever
    /// propagation policy deleted the Image.
    pub delete_pvc: Option<String>,
    pub finalizer: Finalizer,
    pub status: ImageStatus,
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
    let spec = &image.spec;
    let own_pvc = names::image_pvc(&image.name_any());
    let src = &spec.source;
    if let Some((reason, message)) = spec_error(spec) {
        return Source::Blocked { phase: ImagePhase::Error, reason, message };
    }
    if let (Some(_), Some(size)) = (&src.blank, spec.size.clone()) {
        let create = PvcRequest {
            name: own_pvc.clone(),
            size,
            storage_class: spec.storage_class_name.clone(),
            volume_mode: spec.volume_mode,
            clone_from: None,
        };
        return Source::Pvc { name: own_pvc, create: Some(create), clone: false };
    }
    if let Some(pvc) = &src.pvc {
        return Source::Pvc { name: pvc.name.clone(), create: None, clone: false };
    }
    if src.image.is_some() && matches!(obs.pvc, ImagePvc::Present { ours: true, .. }) {
        // The clone exists: it no longer depends on its source.
        return Source::Pvc { name: own_pvc, create: None, clone: true };
    }
    if let Some(from) = &src.image {
        let Some(source) = obs.source_image else {
            return Source::Blocked {
                phase: ImagePhase::Pending,
                reason: reason::SOURCE_NOT_FOUND,
                message: format!("source image {} does not exist", from.name),
            };
        };
        let status = source.status.clone().unwrap_or_default();
        if let Some(holder) = &status.claimed_by {
            return Source::Blocked {
                phase: ImagePhase::Pending,
                reason: reason::SOURCE_IN_USE,
                message: format!(
                    "source image {} is persistent and held by VirtualMachine {}; it is cloned once released",
                    from.name, holder.name
                ),
            };
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
        let ready = matches!(status.phase, Some(ImagePhase::Ready | ImagePhase::Used | ImagePhase::Disabled));
        let (true, Some(source_pvc)) = (ready, status.pvc_name) else {
            return Source::Blocked {
                phase: ImagePhase::Pending,
                reason: reason::SOURCE_NOT_READY,
                message: format!("source image {} is not ready", from.name),
            };
        };
        let size = match (&spec.size, &status.capacity) {
            (Some(a), Some(b)) => quantity::max(a, b),
            (Some(a), None) | (None, Some(a)) => a.clone(),
            (None, None) => {
                return Source::Blocked {
                    phase: ImagePhase::Pending,
                    reason: reason::SOURCE_NOT_READY,
                    message: format!("source image {} has no capacity yet", from.name),
                };
            }
        };
        let create = PvcRequest {
            name: own_pvc.clone(),
            size,
            storage_class: spec.storage_class_name.clone().or_else(|| source.spec.storage_class_name.clone()),
            volume_mode: spec.volume_mode,
            clone_from: Some(source_pvc),
        };
        return Source::Pvc { name: own_pvc, create: Some(create), clone: true };
    }
    Source::Blocked {
        phase: ImagePhase::Pending,
        reason: reason::SOURCE_NOT_SUPPORTED,
        message: "http and virtualMachineDisk sources are not supported yet".into(),
    }
}

/// Decides an Image's PVC, finalizer and status.
pub fn plan(obs: &ImageObservation, now: &Time) -> ImagePlan {
    let image = obs.image;
    let previous = image.status.clone().unwrap_or_default();
    let in_use = !obs.consumers.is_empty() || obs.claim.is_some();
    let deleting = image.metadata.deletion_timestamp.is_some();
    let has_finalizer = image.finalizers().iter().any(|f| f == names::IMAGE_FINALIZER);
    let finalizer = match (deleting, has_finalizer, in_use) {
        (true, true, false) => Finalizer::Remove,
        (false, false, _) => Finalizer::Add,
        _ => Finalizer::Keep,
    };

    // The persistence mode in force changes only while nothing uses the image.
    let in_force = match previous.persistent {
        Some(current) if in_use => current,
        _ => image.spec.persistent,
    };
    let change_pending = in_force != image.spec.persistent;

    let mut create_pvc = None;
    let mut pvc_name = None;
    let mut capacity = None;
    let mut storage_class = None;
    let (phase, ready) = match source(obs) {
        Source::Blocked { phase, reason, message } => (phase, Cond::new(READY, false, reason, message)),
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
            (ImagePvc::Present { phase, capacity: observed, storage_class: class, volume_mode, .. }, request) => {
                capacity = observed.clone().or_else(|| request.as_ref().map(|r| r.size.clone()));
                storage_class = class.clone();
                pvc_name = Some(name.clone());
                let bound = phase.as_deref() == Some("Bound");
                let mode = format!("{:?}", image.spec.volume_mode);
                let too_small = match (&image.spec.size, &capacity) {
                    (Some(size), Some(have)) => quantity::bytes(have) < quantity::bytes(size),
                    _ => false,
                };
                if phase.as_deref() == Some("Lost") {
                    let message = format!("PersistentVolumeClaim {name} lost its volume");
                    (ImagePhase::Error, Cond::new(READY, false, reason::PVC_LOST, message))
                } else if volume_mode.as_ref().is_some_and(|m| *m != mode) {
                    let message = format!(
                        "PersistentVolumeClaim {name} has volumeMode {}, the image says {mode}",
                        volume_mode.as_deref().unwrap_or_default()
                    );
                    (ImagePhase::Error, Cond::new(READY, false, reason::INVALID_VOLUME_MODE, message))
                } else if too_small {
                    let message = format!(
                        "PersistentVolumeClaim {name} holds {}, less than spec.size {}",
                        capacity.as_ref().map(|c| c.0.as_str()).unwrap_or_default(),
                        image.spec.size.as_ref().map(|c| c.0.as_str()).unwrap_or_default()
                    );
                    (ImagePhase::Error, Cond::new(READY, false, reason::PVC_TOO_SMALL, message))
                } else if clone && !bound {
                    (ImagePhase::Cloning, Cond::new(READY, false, reason::CLONING, "cloning the source image"))
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
            _ => obs.consumers.join(", "),
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
    let generation = image.metadata.generation;
    let status = ImageStatus {
        phase: Some(phase),
        persistent: Some(in_force),
        pvc_name,
        capacity,
        storage_class_name: storage_class,
        running_vms: Some(i32::try_from(obs.consumers.len()).unwrap_or(i32::MAX)),
        consumers: obs.consumers.clone(),
        claimed_by: obs.claim.clone(),
        progress: None,
        observed_generation: generation,
        conditions: merge(&previous.conditions, vec![ready, in_use_cond, pending_cond], generation, now),
    };
    let delete_pvc = match (&obs.pvc, finalizer) {
        (ImagePvc::Present { ours: true, .. }, Finalizer::Remove) => status.pvc_name.clone(),
        _ => None,
    };
    ImagePlan { create_pvc, delete_pvc, finalizer, status }
}
