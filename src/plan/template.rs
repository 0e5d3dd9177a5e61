//! What a Template's status should be: how many VMs were made from it, and whether every image
//! it names exists and is usable (the same check a new VM makes).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{
    conditions::{Cond, Health, merge},
    reason,
    virtual_machine::check_template,
};
use crate::api::{Image, Template, TemplateStatus, VirtualMachine, virtual_machine::VirtualMachinePhase};

pub use super::conditions::READY;

pub fn status<'a>(
    template: &Template,
    instances: usize,
    images: impl Fn(&str) -> Option<&'a Image>,
    now: &Time,
) -> TemplateStatus {
    let (ready, stalled) = match check_template(&template.spec, images) {
        Ok(_) => (Cond::new(READY, true, reason::IMAGES_READY, "every image exists and is usable"), false),
        Err(blocker) => {
            let stalled = blocker.phase == VirtualMachinePhase::Failed;
            (Cond::new(READY, false, blocker.reason, blocker.message), stalled)
        }
    };
    let [a, b] = Health::of(&ready, stalled).conditions();
    let previous = template.status.clone().unwrap_or_default();
    let generation = template.metadata.generation;
    TemplateStatus {
        instances: Some(i32::try_from(instances).unwrap_or(i32::MAX)),
        observed_generation: generation,
        conditions: merge(&previous.conditions, vec![ready, a, b], generation, now),
    }
}

/// Whether a VM counts among a Template's `instances`: a Rejected or Failed VM was made from
/// it but holds nothing and runs nothing.
pub fn is_instance(vm: &VirtualMachine) -> bool {
    !matches!(
        vm.status.as_ref().and_then(|s| s.phase),
        Some(VirtualMachinePhase::Rejected | VirtualMachinePhase::Failed)
    )
}
