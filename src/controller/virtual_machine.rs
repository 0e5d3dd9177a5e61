//! The VirtualMachine controller: observe (stores, the claim Leases on the API server) ->
//! plan ([`crate::plan::virtual_machine`]) -> apply (claims, PVCs, launcher Pod) -> status.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{PersistentVolumeClaim, Pod},
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, ResourceExt,
    runtime::{controller::Action, reflector::ObjectRef},
};
use tracing::{info, instrument};

use super::{Context, Error, Stores, apply};
use crate::{
    api::{Image, Template, VirtualMachine, image::VolumeMode, virtual_machine::VirtualMachinePhase},
    claim,
    metrics::ReconcileLabels,
    plan::{
        build, names,
        virtual_machine::{self as plan, Blocker, Child, ClaimPlan, ClaimState, PodAction, Resolved, Verdict},
    },
};

const KIND: &str = "VirtualMachine";

#[instrument(skip_all, fields(vm = %vm.name_any(), namespace = ?vm.namespace()))]
pub async fn reconcile(vm: Arc<VirtualMachine>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.stores.ready().await;
    let labels = ReconcileLabels { kind: KIND };
    ctx.metrics.reconciliations.get_or_create(&labels).inc();
    let started = std::time::Instant::now();
    let result =
        if vm.metadata.deletion_timestamp.is_some() { cleanup(&vm, &ctx).await } else { provision(&vm, &ctx).await };
    ctx.metrics.reconcile_duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    result
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

/// The Images a VM's template and recorded disks name, from the cache.
fn images_for(
    ctx: &Context,
    ns: &str,
    vm: &VirtualMachine,
    template: Option<&Template>,
) -> BTreeMap<String, Arc<Image>> {
    let recorded = vm.status.iter().flat_map(|s| s.disks.iter()).filter_map(|d| d.image.clone());
    let templated = template.into_iter().flat_map(|t| t.spec.disks.iter()).filter_map(|d| d.image.clone());
    recorded.chain(templated).filter_map(|name| ctx.stores.image(ns, &name).map(|i| (name, i))).collect()
}

async fn write_status(
    ctx: &Context,
    vm: &VirtualMachine,
    resolved: Option<&Resolved>,
    verdict: &Verdict,
) -> Result<(), Error> {
    let status = plan::status(vm, resolved, verdict, &now());
    let previous = vm.status.as_ref();
    let entered = |phase: VirtualMachinePhase, reason: &str| {
        previous.is_none_or(|p| {
            p.phase != Some(phase)
                || p.observed_generation != vm.metadata.generation
                || !p.conditions.iter().any(|c| c.r#type == plan::READY && c.reason == reason)
        })
    };
    // Warnings for what a user must act on, once per transition.
    match verdict {
        Verdict::Rejected { image, holder } if entered(VirtualMachinePhase::Rejected, "ImageInUse") => {
            apply::event(ctx, vm, true, "ImageInUse", plan::in_use_message(image, holder)).await;
        }
        Verdict::Blocked { blocker, .. }
            if (blocker.phase == VirtualMachinePhase::Failed || blocker.reason == "NameConflict")
                && entered(blocker.phase, blocker.reason) =>
        {
            apply::event(ctx, vm, true, blocker.reason, blocker.message.clone()).await;
        }
        _ => {}
    }
    apply::status(ctx, vm, previous, &status).await
}

async fn provision(vm: &VirtualMachine, ctx: &Context) -> Result<Action, Error> {
    if plan::stays_rejected(vm) {
        return Ok(Action::await_change());
    }
    let ns = vm.namespace().ok_or(Error::MissingNamespace)?;
    let name = vm.name_any();
    let uid = vm.uid().unwrap_or_default();
    let template = ctx.stores.template(&ns, &vm.spec.template_ref.name);
    let images = images_for(ctx, &ns, vm, template.as_deref());
    let lookup = |n: &str| images.get(n).map(|i| i.as_ref());
    let resolved = match plan::resolve_disks(vm, template.as_ref().map(|t| &t.spec), lookup) {
        Ok(resolved) => resolved,
        Err(blocker) => {
            write_status(ctx, vm, None, &Verdict::Blocked { blocker, claimed: false }).await?;
            return Ok(Action::await_change());
        }
    };

    // Claims: all or nothing, persistent images in disk order.
    let wanted = plan::persistent_images(&resolved.disks);
    if !wanted.is_empty() {
        apply::add_finalizer(ctx, vm, names::VM_FINALIZER).await?;
    }
    let mut states = BTreeMap::new();
    for image in &wanted {
        states.insert(image.clone(), claim::state(ctx, &ns, image, &uid).await?);
    }
    loop {
        // The other VMs are only read for a Wait VM with a free image (a snapshot of the whole
        // cache: not on every reconcile).
        let earlier = |image: &str| plan::earlier_waiter(vm, ctx.stores.vms.state().iter().map(|o| o.as_ref()), image);
        match plan::plan_claims(vm.spec.on_image_conflict, &states, earlier) {
            ClaimPlan::Held => break,
            ClaimPlan::Take(free) => {
                for image in free {
                    let state = match images.get(&image) {
                        Some(img) => claim::take(ctx, img, vm).await?,
                        None => ClaimState::Other { holder: "(image not found)".into() },
                    };
                    states.insert(image, state);
                }
            }
            conflict @ (ClaimPlan::Conflict { .. } | ClaimPlan::Queued { .. }) => {
                // Let go of what it holds (no deadlock between waiters), but never while a
                // launcher Pod of this VM may use the disks (asked of the API server): fencing
                // comes first.
                let mine: Vec<&String> =
                    states.iter().filter(|(_, s)| **s == ClaimState::Mine).map(|(i, _)| i).collect();
                if !mine.is_empty() {
                    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
                    let running = pods.get_opt(&names::launcher_pod(&name)).await?;
                    if running.is_none_or(|p| !apply::owned_by(&p.metadata, &uid)) {
                        for image in mine {
                            claim::release(ctx, &ns, image, &uid).await?;
                        }
                    }
                }
                let verdict = match conflict {
                    ClaimPlan::Conflict { image, holder, wait: false } => Verdict::Rejected { image, holder },
                    ClaimPlan::Conflict { image, holder, wait: true } => {
                        Verdict::Waiting { image, holder: Some(holder) }
                    }
                    ClaimPlan::Queued { image } => Verdict::Waiting { image, holder: None },
                    _ => unreachable!("matched above"),
                };
                write_status(ctx, vm, Some(&resolved), &verdict).await?;
                return Ok(Action::await_change());
            }
        }
    }

    // Children: PVCs for clones and volatile disks, then the launcher Pod.
    let pvc_api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pvc_phase = |p: &PersistentVolumeClaim| p.status.as_ref().and_then(|s| s.phase.clone());
    let mut pvcs: BTreeMap<String, Child> = resolved
        .disks
        .iter()
        .filter(|d| !d.persistent)
        .filter_map(|d| d.pvc_name.clone())
        .map(|pvc| {
            let cached = ctx.stores.pvcs.get(&ObjectRef::new(&pvc).within(&ns));
            let state = apply::child_state(cached.as_deref(), &uid, pvc_phase);
            (pvc, state)
        })
        .collect();
    let pod_name = names::launcher_pod(&name);
    let pod_phase = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.clone());
    let cached_pod = ctx.stores.pods.get(&ObjectRef::new(&pod_name).within(&ns));
    let mut pod = apply::child_state(cached_pod.as_deref(), &uid, pod_phase);

    let children = plan::plan_children(vm.spec.run_strategy, &resolved.disks, &pvcs, &pod_name, &pod);
    let mut conflict = children.conflict.clone();
    // The missing PVCs, sent at once (they are independent; the Pod waits for all of them).
    let mut missing = Vec::new();
    for disk_name in &children.create_pvcs {
        let Some(disk) = resolved.disks.iter().find(|d| &d.name == disk_name) else { continue };
        let image = disk.image.as_ref().and_then(|i| images.get(i)).map(|i| i.as_ref());
        let source = resolved.clone_sources.get(disk_name).map(String::as_str);
        if disk.image.is_some() && source.is_none() {
            let blocker = Blocker {
                phase: VirtualMachinePhase::Pending,
                reason: "ImageNotReady",
                message: format!("image {} is not ready to be cloned", disk.image.as_deref().unwrap_or_default()),
            };
            write_status(ctx, vm, Some(&resolved), &Verdict::Blocked { blocker, claimed: true }).await?;
            return Ok(Action::await_change());
        }
        missing.push(build::vm_disk_pvc(vm, disk, image, source, &ctx.settings.access_mode));
    }
    let created = futures::future::join_all(missing.iter().map(|pvc| apply::create_child(ctx, &pvc_api, pvc, &uid)));
    for (pvc, created) in missing.iter().zip(created.await) {
        if created? {
            pvcs.insert(pvc.name_any(), Child::Ours { phase: Some("Pending".into()), deleting: false });
        } else {
            conflict.get_or_insert(("PersistentVolumeClaim", pvc.name_any()));
        }
    }
    if conflict.is_none() {
        match children.pod {
            PodAction::Create => {
                let modes: BTreeMap<String, VolumeMode> = resolved
                    .disks
                    .iter()
                    .filter_map(|d| Some((d.name.clone(), images.get(d.image.as_ref()?)?.spec.volume_mode)))
                    .collect();
                let inputs = build::LauncherInputs {
                    image: &ctx.settings.launcher_image,
                    cpu: resolved.cpu,
                    memory: &resolved.memory,
                    disks: &resolved.disks,
                    modes: &modes,
                    settings: template.as_ref().and_then(|t| t.spec.launcher.as_ref()),
                };
                let launcher = build::launcher_pod(vm, &inputs);
                if apply::create_child(ctx, &pod_api, &launcher, &uid).await? {
                    info!("created the launcher Pod");
                    pod = Child::Ours { phase: Some("Pending".into()), deleting: false };
                } else {
                    conflict = Some(("Pod", pod_name.clone()));
                }
            }
            PodAction::Delete => {
                apply::delete_child(ctx, &pod_api, &pod_name).await?;
                pod = Child::Ours { phase: None, deleting: true };
            }
            PodAction::Nothing => {}
        }
    }

    let mut resolved = resolved;
    for disk in &mut resolved.disks {
        disk.phase = match pvcs.get(disk.pvc_name.as_deref().unwrap_or_default()) {
            Some(Child::Ours { phase, .. }) => phase.clone().or(Some("Pending".into())),
            _ if disk.persistent => Some("Attached".into()),
            _ => Some("Missing".into()),
        };
    }
    let verdict = match conflict {
        Some((kind, object)) => Verdict::Blocked {
            blocker: Blocker {
                phase: VirtualMachinePhase::Pending,
                reason: "NameConflict",
                message: format!(
                    "{kind} {object} exists and does not belong to VirtualMachine {name}; vmkeep leaves it alone"
                ),
            },
            claimed: true,
        },
        None => Verdict::Provisioned { pod },
    };
    write_status(ctx, vm, Some(&resolved), &verdict).await?;
    Ok(Action::await_change())
}

/// Deletion: remove the launcher Pod, wait until it no longer exists (asked of the API server,
/// not a cache), release the claims, then let the VM go. Clone and volatile PVCs follow by
/// garbage collection.
async fn cleanup(vm: &VirtualMachine, ctx: &Context) -> Result<Action, Error> {
    if !vm.finalizers().iter().any(|f| f == names::VM_FINALIZER) {
        return Ok(Action::await_change());
    }
    let ns = vm.namespace().ok_or(Error::MissingNamespace)?;
    let uid = vm.uid().unwrap_or_default();
    write_status(ctx, vm, None, &Verdict::Terminating).await?;

    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pod_name = names::launcher_pod(&vm.name_any());
    if let Some(pod) = pod_api.get_opt(&pod_name).await?
        && apply::owned_by(&pod.metadata, &uid)
    {
        if pod.metadata.deletion_timestamp.is_none() {
            apply::delete_child(ctx, &pod_api, &pod_name).await?;
        }
        // The Pod's deletion wakes this VM (it is owned); the requeue is a safety net.
        return Ok(Action::requeue(Duration::from_secs(10)));
    }

    let mut images: Vec<String> = plan::persistent_images(&vm.status.clone().unwrap_or_default().disks);
    // Also any claim this VM holds that its status does not show (a status lost in a restore).
    for lease in ctx.stores.leases.state() {
        if lease.namespace().as_deref() == Some(ns.as_str())
            && lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(uid.as_str())
            && let Some(image) = lease.annotations().get(names::IMAGE_ANNOTATION)
            && !images.contains(image)
        {
            images.push(image.clone());
        }
    }
    for image in &images {
        claim::release(ctx, &ns, image, &uid).await?;
    }
    apply::remove_finalizer(ctx, vm, names::VM_FINALIZER).await?;
    Ok(Action::await_change())
}

// Relations: which VMs a change of another object concerns (found through the caches).

fn vms_in(
    stores: &Stores,
    ns: Option<String>,
    wanted: impl Fn(&VirtualMachine) -> bool,
) -> Vec<ObjectRef<VirtualMachine>> {
    stores
        .vms
        .state()
        .into_iter()
        .filter(|vm| vm.namespace() == ns && wanted(vm))
        .map(|vm| ObjectRef::from_obj(vm.as_ref()))
        .collect()
}

/// A Template change concerns the VMs made from it.
pub fn vms_of_template(stores: &Stores, template: &Template) -> Vec<ObjectRef<VirtualMachine>> {
    let name = template.name_any();
    vms_in(stores, template.namespace(), |vm| vm.spec.template_ref.name == name)
}

/// An Image change concerns the VMs whose template or recorded disks name it.
pub fn vms_of_image(stores: &Stores, image: &Image) -> Vec<ObjectRef<VirtualMachine>> {
    let name = image.name_any();
    let ns = image.namespace();
    vms_in(stores, ns.clone(), |vm| {
        let recorded = vm.status.iter().flat_map(|s| &s.disks).any(|d| d.image.as_deref() == Some(&name));
        recorded
            || ns
                .as_deref()
                .and_then(|ns| stores.template(ns, &vm.spec.template_ref.name))
                .is_some_and(|t| t.spec.disks.iter().any(|d| d.image.as_deref() == Some(&name)))
    })
}

/// A claim Lease change concerns its holder and the VMs waiting for its image.
pub fn vms_of_lease(stores: &Stores, lease: &Lease) -> Vec<ObjectRef<VirtualMachine>> {
    let Some(image) = lease.annotations().get(names::IMAGE_ANNOTATION).cloned() else { return Vec::new() };
    let holder = lease.annotations().get(names::HOLDER_ANNOTATION).cloned();
    vms_in(stores, lease.namespace(), |vm| {
        plan::waits_for(vm, &image) || holder.as_deref() == Some(vm.name_any().as_str())
    })
}
