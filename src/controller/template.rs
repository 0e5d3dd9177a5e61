//! The Template controller: `status.instances` and `Ready` (every image it names exists and is
//! usable), decided by [`crate::plan::template`].

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    ResourceExt,
    runtime::{controller::Action, reflector::ObjectRef},
};

use super::{Context, Error, Stores, apply};
use crate::{
    api::{Image, Template, VirtualMachine},
    plan,
};

/// Reconciles one Template.
pub async fn reconcile(template: Arc<Template>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = template.namespace().ok_or(Error::MissingNamespace)?;
    let name = template.name_any();
    let instances = ctx
        .stores
        .vms
        .state()
        .iter()
        .filter(|vm| vm.metadata.namespace.as_deref() == Some(ns.as_str()) && vm.spec.template_ref.name == name)
        .filter(|vm| plan::template::is_instance(vm))
        .count();
    let images: Vec<Arc<Image>> =
        template.spec.disks.iter().filter_map(|d| ctx.stores.image(&ns, d.image.as_deref()?)).collect();
    let lookup = |n: &str| images.iter().find(|i| i.name_any() == n).map(|i| i.as_ref());
    let status = plan::template::status(&template, instances, lookup, &Time(jiff::Timestamp::now()));
    apply::status(&ctx, template.as_ref(), template.status.as_ref(), &status).await?;
    let previous = template.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    if let Some(stalled) = plan::conditions::newly_stalled(previous, &status.conditions) {
        apply::event(&ctx, template.as_ref(), true, &stalled.reason, stalled.message.clone()).await;
    }
    Ok(Action::await_change())
}

/// A VM change (created, deleted) concerns its Template's instance count.
pub fn template_of_vm(vm: VirtualMachine) -> Option<ObjectRef<Template>> {
    Some(ObjectRef::new(&vm.spec.template_ref.name).within(&vm.namespace()?))
}

/// An Image change concerns the Templates that name it.
pub fn templates_of_image(stores: &Stores, image: &Image) -> Vec<ObjectRef<Template>> {
    let name = image.name_any();
    stores
        .templates
        .state()
        .into_iter()
        .filter(|t| {
            t.metadata.namespace == image.metadata.namespace
                && t.spec.disks.iter().any(|d| d.image.as_deref() == Some(&name))
        })
        .map(|t| ObjectRef::from_obj(t.as_ref()))
        .collect()
}
