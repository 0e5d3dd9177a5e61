//! The claim rules, pure: who holds a persistent image as one VM sees it, which VM goes first
//! for a free image (creation order, then name), what a VM does about its claims, and which Pods
//! still fence a holder's claims. [`crate::claim`] does the IO (the Lease reads and writes);
//! every decision it and the controllers make about claims comes from here.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

use super::{conditions::find, names, reason};
use crate::api::{
    ConditionStatus, VirtualMachine,
    image::ClaimHolder,
    virtual_machine::{OnImageConflict, VirtualMachinePhase},
};

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

/// The claim state of `holder`'s image for the VM with `vm_uid`.
pub fn state_of(holder: Option<&ClaimHolder>, vm_uid: &str) -> ClaimState {
    match holder {
        None => ClaimState::Free,
        Some(h) if h.uid == vm_uid => ClaimState::Mine,
        Some(h) => ClaimState::Other { holder: h.name.clone() },
    }
}

/// What a VM does about its persistent images.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimPlan {
    /// It holds every one (or needs none).
    Held,
    /// Take these free images now, in this order (image name order, the same for every VM, so
    /// two VMs that need the same images never hold one each). A lost take stops the rest.
    Take(Vec<String>),
    /// Another VM holds `image`: with `Reject` the VM is Rejected, with `Wait` it waits. Either
    /// way it lets go of the images it holds, so two waiting VMs never deadlock.
    Conflict { image: String, holder: String, wait: bool },
    /// `image` is free but `first`, a VM created earlier, goes first: first come, first served.
    Queued { image: String, first: String },
}

/// Decides the claims of a VM from who holds each persistent image it needs; `first_in_line`
/// names the VM created earlier that goes first for a free image, if any ([`first_in_line`]).
pub fn plan_claims(
    on_conflict: OnImageConflict,
    states: &BTreeMap<String, ClaimState>,
    first_in_line: impl Fn(&str) -> Option<String>,
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
    if let Some((image, first)) = free.iter().find_map(|i| Some((i, first_in_line(i)?))) {
        return ClaimPlan::Queued { image: image.clone(), first };
    }
    ClaimPlan::Take(free)
}

/// The message of a conflict, shared by the status, the Event and the admission webhook.
pub fn in_use_message(image: &str, holder: &str) -> String {
    format!("image {image} is persistent and already in use by VirtualMachine {holder}")
}

/// The order in which VMs get a free image: creation time, then name.
pub fn rank(vm: &VirtualMachine) -> (Option<jiff::Timestamp>, String) {
    (vm.metadata.creation_timestamp.clone().map(|t| t.0), vm.name_any())
}

/// Whether `vm` waits for a persistent image (its status says so).
pub fn waits(vm: &VirtualMachine) -> bool {
    vm.metadata.deletion_timestamp.is_none()
        && vm.status.as_ref().is_some_and(|s| {
            find(&s.conditions, super::virtual_machine::IMAGES_CLAIMED)
                .is_some_and(|c| c.reason == reason::WAITING_FOR_IMAGE)
        })
}

/// Whether `vm` waits for persistent `image` (it has recorded it and says so in its status).
pub fn waits_for(vm: &VirtualMachine, image: &str) -> bool {
    waits(vm) && vm.status.iter().flat_map(|s| &s.disks).any(|d| d.persistent && d.image.as_deref() == Some(image))
}

/// Whether `vm` has not come to its claims yet: it was never reconciled, its spec changed since
/// (a Rejected VM edited to try again), or it waited for something before its claims (its
/// Template, an Image). It neither holds its claims nor lost or waits for one.
pub fn before_claims(vm: &VirtualMachine) -> bool {
    let Some(status) = &vm.status else { return true };
    if status.observed_generation != vm.metadata.generation {
        return true;
    }
    match find(&status.conditions, super::virtual_machine::IMAGES_CLAIMED) {
        None => true,
        Some(c) => {
            c.status != ConditionStatus::True
                && c.reason != reason::IMAGE_IN_USE
                && c.reason != reason::WAITING_FOR_IMAGE
        }
    }
}

/// The VM created before `me` that goes first for free `image`, if any: a VM that has not come
/// to its claims yet and would claim the image now (`claims_now`: its Template resolves, now,
/// to that persistent image), so that VMs applied together get the image in creation order
/// whatever order they are reconciled in; and for a VM that waits (`Wait`), a VM that already
/// waits for it (first come, first served).
pub fn first_in_line<'a>(
    me: &VirtualMachine,
    others: impl IntoIterator<Item = &'a VirtualMachine>,
    image: &str,
    claims_now: impl Fn(&VirtualMachine, &str) -> bool,
) -> Option<String> {
    let mine = rank(me);
    let wait = me.spec.on_image_conflict == OnImageConflict::Wait;
    others
        .into_iter()
        .filter(|o| o.namespace() == me.namespace() && o.uid() != me.uid())
        .filter(|o| o.metadata.deletion_timestamp.is_none() && rank(o) < mine)
        .filter(|o| (wait && waits_for(o, image)) || (before_claims(o) && claims_now(o, image)))
        .min_by_key(|o| rank(o))
        .map(|o| o.name_any())
}

/// Whether a Rejected VM stays Rejected: until its spec changes (or it is recreated).
pub fn stays_rejected(vm: &VirtualMachine) -> bool {
    vm.status.as_ref().is_some_and(|s| {
        s.phase == Some(VirtualMachinePhase::Rejected) && s.observed_generation == vm.metadata.generation
    })
}

/// Whether a Pod is a launcher of the VM `vm_name` with uid `vm_uid`: by the identity vmkeep
/// recorded on it (the VM's uid label, or its owner reference), not by owner reference alone,
/// which an orphaning deletion removes, and not only while it carries vmkeep's managed-by label,
/// which a user may remove. A launcher labelled with the VM's name but no uid (made before vmkeep
/// recorded uids) counts too: fencing errs on the safe side.
pub fn launcher_of(pod: &ObjectMeta, vm_name: &str, vm_uid: &str) -> bool {
    let labels = pod.labels.as_ref();
    let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
    let owned = pod.owner_references.iter().flatten().any(|o| o.uid == vm_uid);
    match label(names::VM_UID_LABEL) {
        Some(uid) => uid == names::label_value(vm_uid) || owned,
        None if label(names::MANAGED_BY) == Some(names::MANAGER) => {
            label(names::VM_LABEL) == Some(names::label_value(vm_name).as_str()) || owned
        }
        None => owned,
    }
}

/// Whether `holder`'s claims are fenced: a launcher Pod of it still exists (deleting or not),
/// so its persistent PVCs may still be mounted and no other VM may take them.
pub fn fenced<'a>(pods: impl IntoIterator<Item = &'a ObjectMeta>, holder: &ClaimHolder) -> bool {
    pods.into_iter().any(|p| launcher_of(p, &holder.name, &holder.uid))
}
