//! The Image controller: observe (its PVC, the VMs using it, its claim) -> plan
//! ([`crate::plan::image`]) -> apply (finalizer, PVC) -> status.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::{coordination::v1::Lease, core::v1::PersistentVolumeClaim},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, ResourceExt,
    runtime::{controller::Action, reflector::ObjectRef},
};

use super::{Context, Error, Stores, apply};
use crate::{
    api::{ConditionStatus, Image, VirtualMachine},
    claim,
    metrics::ReconcileLabels,
    plan::{
        build,
        conditions::find,
        image::{self as plan, Finalizer, ImageObservation, ImagePvc},
        names,
        virtual_machine::IMAGES_CLAIMED,
    },
};

/// Whether `vm` uses `image` now: it holds the claim on it (persistent), or it holds all its
/// claims and so has (or is creating) its clone of it (non-persistent).
fn uses(vm: &VirtualMachine, image: &str, holder_uid: Option<&str>) -> bool {
    let Some(status) = &vm.status else { return false };
    let claimed = find(&status.conditions, IMAGES_CLAIMED).is_some_and(|c| c.status == ConditionStatus::True);
    status
        .disks
        .iter()
        .filter(|d| d.image.as_deref() == Some(image))
        .any(|d| if d.persistent { holder_uid.is_some() && vm.uid().as_deref() == holder_uid } else { claimed })
}

fn pvc_view(pvc: Option<&PersistentVolumeClaim>, owner_uid: &str) -> ImagePvc {
    match pvc {
        None => ImagePvc::Missing,
        Some(p) => {
            let spec = p.spec.clone().unwrap_or_default();
            let requested = spec.resources.as_ref().and_then(|r| r.requests.as_ref()?.get("storage").cloned());
            ImagePvc::Present {
                ours: apply::owned_by(&p.metadata, owner_uid),
                phase: p.status.as_ref().and_then(|s| s.phase.clone()),
                // Before it binds, a PVC's capacity is what it asks for.
                capacity: p.status.as_ref().and_then(|s| s.capacity.as_ref()?.get("storage").cloned()).or(requested),
                storage_class: spec.storage_class_name,
                volume_mode: spec.volume_mode,
            }
        }
    }
}

pub async fn reconcile(image: Arc<Image>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.stores.ready().await;
    ctx.metrics.reconciliations.get_or_create(&ReconcileLabels { kind: "Image" }).inc();
    let ns = image.namespace().ok_or(Error::MissingNamespace)?;
    let name = image.name_any();
    let uid = image.uid().unwrap_or_default();

    let lease = ctx.stores.leases.get(&ObjectRef::new(&names::claim_lease(&name)).within(&ns));
    if let Some(lease) = &lease
        && !ctx
            .stores
            .vms
            .state()
            .iter()
            .any(|vm| vm.uid() == lease.spec.as_ref().and_then(|s| s.holder_identity.clone()))
        && claim::release_if_orphaned(&ctx, lease).await?
    {
        return Ok(Action::requeue(Duration::from_millis(100)));
    }
    let claim_holder = lease.as_deref().and_then(claim::holder);
    let holder_uid = claim_holder.as_ref().map(|h| h.uid.as_str());
    let mut consumers: Vec<String> = ctx
        .stores
        .vms
        .state()
        .iter()
        .filter(|vm| vm.namespace().as_deref() == Some(ns.as_str()) && uses(vm, &name, holder_uid))
        .map(|vm| vm.name_any())
        .collect();
    consumers.sort();

    // The PVC: ours from the cache; an adopted one (not labelled by vmkeep) from the API.
    let pvc_api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let adopted = image.spec.source.pvc.as_ref().map(|p| p.name.clone());
    let pvc = match &adopted {
        Some(pvc_name) => pvc_view(pvc_api.get_opt(pvc_name).await?.as_ref(), &uid),
        None => {
            let cached = ctx.stores.pvcs.get(&ObjectRef::new(&names::image_pvc(&name)).within(&ns));
            pvc_view(cached.as_deref(), &uid)
        }
    };
    let source_image = image.spec.source.image.as_ref().and_then(|s| ctx.stores.image(&ns, &s.name));
    let mut observation =
        ImageObservation { image: &image, pvc, source_image: source_image.as_deref(), consumers, claim: claim_holder };
    let now = Time(jiff::Timestamp::now());
    let mut decided = plan::plan(&observation, &now);

    if decided.finalizer == Finalizer::Add {
        apply::add_finalizer(&ctx, image.as_ref(), names::IMAGE_FINALIZER).await?;
    }
    if let Some(request) = &decided.create_pvc {
        let pvc = build::image_pvc(&image, request, &ctx.settings.access_mode);
        if !apply::create_child(&ctx, &pvc_api, &pvc, &uid).await? {
            observation.pvc = pvc_view(pvc_api.get_opt(&request.name).await?.as_ref(), &uid);
            decided = plan::plan(&observation, &now);
        }
    }
    apply::status(&ctx, image.as_ref(), image.status.as_ref(), &decided.status).await?;
    if decided.finalizer == Finalizer::Remove {
        apply::remove_finalizer(&ctx, image.as_ref(), names::IMAGE_FINALIZER).await?;
    }
    // An adopted PVC is not watched: look at it again now and then.
    Ok(match adopted {
        Some(_) => Action::requeue(Duration::from_secs(300)),
        None => Action::await_change(),
    })
}

/// A VM change concerns the images it records (its use of them starts or ends).
pub fn images_of_vm(vm: VirtualMachine) -> Vec<ObjectRef<Image>> {
    let Some(ns) = vm.namespace() else { return Vec::new() };
    let mut images: Vec<String> = vm.status.iter().flat_map(|s| &s.disks).filter_map(|d| d.image.clone()).collect();
    images.dedup();
    images.into_iter().map(|i| ObjectRef::new(&i).within(&ns)).collect()
}

/// A claim Lease change concerns its image.
pub fn image_of_lease(lease: Lease) -> Option<ObjectRef<Image>> {
    Some(ObjectRef::new(lease.annotations().get(names::IMAGE_ANNOTATION)?).within(&lease.namespace()?))
}

/// An Image change concerns the images cloned from it (a released source can now be cloned).
pub fn clones_of(stores: &Stores, source: &Image) -> Vec<ObjectRef<Image>> {
    let name = source.name_any();
    stores
        .images
        .state()
        .into_iter()
        .filter(|i| i.namespace() == source.namespace() && i.spec.source.image.as_ref().is_some_and(|s| s.name == name))
        .map(|i| ObjectRef::from_obj(i.as_ref()))
        .collect()
}
