//! What a Template's status should be: how many VMs were made from it, and whether every image
//! it names exists and is usable (the same check a new VM makes).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{
    conditions::{Cond, merge},
    reason,
    virtual_machine::check_template,
};
use crate::api::{Image, Template, TemplateStatus};

pub const READY: &str = "Ready";

pub fn status<'a>(
    template: &Template,
    instances: usize,
    images: impl Fn(&str) -> Option<&'a Image>,
    now: &Time,
) -> TemplateStatus {
    let ready = match check_template(&template.spec, images) {
        Ok(_) => Cond::new(READY, true, reason::IMAGES_READY, "every image exists and is usable"),
        Err(blocker) => Cond::new(READY, false, blocker.reason, blocker.message),
    };
    let previous = template.status.clone().unwrap_or_default();
    let generation = template.metadata.generation;
    TemplateStatus {
        instances: Some(i32::try_from(instances).unwrap_or(i32::MAX)),
        observed_generation: generation,
        conditions: merge(&previous.conditions, vec![ready], generation, now),
    }
}
