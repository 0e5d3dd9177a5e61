//! The Image controller: observe (its PVC, the VMs using it, its claim) -> plan
//! ([`crate::plan::image`]) -> apply (finalizer, PVC) -> status. It also releases the claim of a
//! VM that was removed without its finalizer running, once that VM's launcher Pods are gone.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{PersistentVolumeClaim, Pod},
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, ResourceExt,
    api::{DynamicObject, LogParams, Patch, PatchParams, PostParams},
    runtime::{controller::Action, reflector::ObjectRef},
};

use super::{Context, Error, Stores, apply};
use tracing::{info, warn};

use crate::{
    api::{
        ConditionStatus, Image, VirtualMachine,
        image::{ImagePhase, VolumeMode},
        virtual_machine::VirtualMachinePhase,
    },
    claim::{self, Release},
    mover::import::{self, ImportResult, Progress},
    plan::{
        build,
        cached::{CachedPod, CachedPvc},
        clone::{self, Chosen, CloneStrategy},
        conditions::find,
        image::{
            self as plan, Finalizer, ImageObservation, ImagePvc, ObservedMover, Role, SnapshotView, SourceDisk,
            SourceVm,
        },
        mover::MoverState,
        names, quantity, reason as plan_reason,
        virtual_machine::{CloneView, IMAGES_CLAIMED},
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
        .any(|d| if d.persistent { holder_uid.is_some() && vm.metadata.uid.as_deref() == holder_uid } else { claimed })
}

/// Whether `pvc` was made by vmkeep for the Image with `image_uid`: its image-uid label, or
/// (made by an older version) its controller reference.
fn made_for(pvc: &CachedPvc, image_uid: &str) -> bool {
    pvc.labels().get(names::IMAGE_UID_LABEL) == Some(&names::label_value(image_uid))
        || apply::owned_by(&pvc.metadata, image_uid)
}

fn pvc_view(pvc: Option<&CachedPvc>, owner_uid: &str) -> ImagePvc {
    match pvc {
        None => ImagePvc::Missing,
        Some(p) => {
            let spec = p.spec.clone().unwrap_or_default();
            let requested = spec.resources.as_ref().and_then(|r| r.requests.as_ref()?.get("storage").cloned());
            let ours = made_for(p, owner_uid);
            ImagePvc::Present {
                ours,
                vmkeep_disk: !ours && p.labels().get(names::MANAGED_BY).map(String::as_str) == Some(names::MANAGER),
                phase: p.status.as_ref().and_then(|s| s.phase.clone()),
                // Before it binds, a PVC's capacity is what it asks for.
                capacity: p
                    .status
                    .as_ref()
                    .and_then(|s| s.capacity.as_ref()?.get("storage").cloned())
                    .or_else(|| requested.clone()),
                requested,
                resize_pending: p
                    .status
                    .iter()
                    .flat_map(|s| s.conditions.iter().flatten())
                    .any(|c| c.type_ == "FileSystemResizePending" && c.status == "True"),
                storage_class: spec.storage_class_name,
                volume_mode: spec.volume_mode,
                fill: Box::new(CloneView::of(&p.metadata)),
            }
        }
    }
}

/// An image PVC vmkeep made concerns its Image (found by the uid label: the PVC has no owner
/// reference): its binding, expansion and capacity.
pub fn image_of_pvc(stores: &Stores, pvc: &CachedPvc) -> Option<ObjectRef<Image>> {
    let uid = pvc.labels().get(names::IMAGE_UID_LABEL)?;
    let ns = pvc.namespace()?;
    let images = stores.images.state();
    let image = images.iter().find(|i| {
        i.metadata.namespace.as_deref() == Some(ns.as_str())
            && i.metadata.uid.as_deref().is_some_and(|u| names::label_value(u) == *uid)
    })?;
    Some(ObjectRef::from_obj(image.as_ref()))
}

/// A PVC vmkeep did not make concerns the Images that adopt it (`source.pvc`).
pub fn images_adopting(
    stores: &Stores,
    pvc: &kube::core::PartialObjectMeta<PersistentVolumeClaim>,
) -> Vec<ObjectRef<Image>> {
    let (Some(ns), name) = (pvc.namespace(), pvc.name_any()) else { return Vec::new() };
    stores
        .images
        .state()
        .iter()
        .filter(|i| i.metadata.namespace.as_deref() == Some(ns.as_str()))
        .filter(|i| i.spec.source.pvc.as_ref().is_some_and(|p| p.name == name))
        .map(|i| ObjectRef::from_obj(i.as_ref()))
        .collect()
}

/// Reconciles one Image.
pub async fn reconcile(image: Arc<Image>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = image.namespace().ok_or(Error::MissingNamespace)?;
    let name = image.name_any();
    let uid = image.uid().unwrap_or_default();

    let lease = ctx.stores.leases.get(&ObjectRef::new(&names::claim_lease(&name)).within(&ns));
    let claim_holder = lease.as_deref().and_then(claim::holder);
    if let (Some(lease), Some(holder)) = (&lease, &claim_holder)
        && ctx.stores.vms.find(|vm| vm.metadata.uid.as_deref() == Some(holder.uid.as_str())).is_none()
        && ctx.claims.release_orphaned(lease).await? == Release::Released
    {
        return Ok(Action::requeue(Duration::from_millis(100)));
    }
    let holder_uid = claim_holder.as_ref().map(|h| h.uid.as_str());
    let mut consumers: Vec<String> = ctx
        .stores
        .vms
        .state()
        .iter()
        .filter(|vm| vm.metadata.namespace.as_deref() == Some(ns.as_str()) && uses(vm, &name, holder_uid))
        .map(|vm| vm.name_any())
        .collect();
    consumers.sort();

    // The PVC: ours from the cache; an adopted one (not labelled by vmkeep) from the API.
    let pvc_api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    // Reads decode into the cached form: what the decisions read, nothing else.
    let pvc_read: Api<CachedPvc> = Api::namespaced(ctx.client.clone(), &ns);
    let adopted = image.spec.source.pvc.as_ref().map(|p| p.name.clone());
    let pvc = match &adopted {
        Some(pvc_name) => pvc_view(pvc_read.get_opt(pvc_name).await?.as_ref(), &uid),
        None => {
            let cached = ctx.stores.pvcs.get(&ObjectRef::new(&names::image_pvc(&name)).within(&ns));
            if let Some(pvc) = cached.as_deref()
                && apply::owned_by(&pvc.metadata, &uid)
            {
                detach_pvc(&ctx, &pvc_api, &pvc.name_any(), &uid).await?;
            }
            pvc_view(cached.as_deref(), &uid)
        }
    };
    if let Some(lease) = lease.as_deref()
        && !lease.owner_references().is_empty()
    {
        detach_claim(&ctx, lease).await?;
    }
    let source_image = image.spec.source.image.as_ref().and_then(|s| ctx.stores.image(&ns, &s.name));
    let own_pvc = names::image_pvc(&name);
    let movers = movers(&ctx, &ns, &own_pvc, &uid);
    let source_vm = source_vm(&ctx, &ns, &image);
    let source_writer = source_image.as_deref().and_then(|s| writer(&ctx, &ns, s));
    let (clone_choice, snapshot_class) = match &pvc {
        ImagePvc::Missing => clone_choice(&ctx, &image, source_image.as_deref(), source_vm.as_ref()).await?,
        ImagePvc::Present { .. } => (None, None),
    };
    let progress = match movers.iter().find(|m| matches!(m.role, Role::Import | Role::Probe)) {
        Some(m) if matches!(m.state, MoverState::Running { .. }) => progress(&ctx, &ns, &m.name).await,
        _ => None,
    };
    let binds_late = match &pvc {
        ImagePvc::Present { ours: true, phase, storage_class, .. } if phase.as_deref() == Some("Pending") => {
            super::storage_class(&ctx, storage_class.as_deref()).await?.binds_late
        }
        _ => false,
    };
    // The class is asked whether it expands only when spec.size asks for more than the PVC does.
    // Known not to expand for this generation: not asked again on every wake-up.
    let refused = image.status.as_ref().and_then(|s| find(&s.conditions, plan::RESIZED)).is_some_and(|c| {
        c.reason == plan_reason::EXPANSION_NOT_SUPPORTED && c.observed_generation == image.metadata.generation
    });
    let allows_expansion = match (&pvc, &image.spec.size) {
        (ImagePvc::Present { ours: true, requested: Some(have), .. }, Some(want))
            if refused && quantity::bytes(have) < quantity::bytes(want) =>
        {
            Some(false)
        }
        (ImagePvc::Present { ours: true, requested: Some(have), storage_class, .. }, Some(want))
            if quantity::bytes(have) < quantity::bytes(want) =>
        {
            Some(super::storage_class(&ctx, storage_class.as_deref()).await?.allows_expansion)
        }
        _ => None,
    };
    let clones: Vec<(String, Option<ImagePhase>)> = ctx
        .stores
        .images
        .state()
        .iter()
        .filter(|i| {
            i.metadata.namespace.as_deref() == Some(ns.as_str())
                && i.spec.source.image.as_ref().is_some_and(|s| s.name == name)
        })
        .map(|i| (i.name_any(), i.status.as_ref().and_then(|s| s.phase)))
        .collect();
    let wanted_by_clones =
        clones.iter().any(|(_, p)| matches!(p, None | Some(ImagePhase::Pending | ImagePhase::Cloning)));
    // Only clones that are copying now hold a deleted source: one still waiting gives up with it.
    let mut cloning_now: Vec<String> =
        clones.into_iter().filter(|(_, p)| *p == Some(ImagePhase::Cloning)).map(|(n, _)| n).collect();
    cloning_now.sort();
    // A snapshot clone: its VolumeSnapshot (read from the API server, only while one may exist).
    let strategy = match &pvc {
        ImagePvc::Present { ours: true, fill, .. } => fill.strategy.clone(),
        _ => clone_choice.as_ref().map(|c| c.strategy.as_str().to_owned()),
    };
    let snapshot_api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &ns, &build::volume_snapshot_resource());
    let snapshot = match strategy.as_deref() {
        Some("snapshot") => match snapshot_api.get_opt(&names::snapshot(&own_pvc)).await {
            Ok(found) => found.map(|s| SnapshotView {
                ours: apply::owned_by(&s.metadata, &uid),
                ready: s.data.pointer("/status/readyToUse").and_then(|r| r.as_bool()) == Some(true),
                error: s.data.pointer("/status/error/message").and_then(|m| m.as_str()).map(str::to_owned),
            }),
            Err(kube::Error::Api(e)) if e.code == 404 => None,
            Err(e) => return Err(e.into()),
        },
        _ => None,
    };
    let mut observation = ImageObservation {
        image: &image,
        pvc,
        source_image: source_image.as_deref(),
        consumers,
        claim: claim_holder,
        source_writer,
        source_vm,
        clone_choice,
        movers,
        progress,
        snapshot_class,
        snapshot,
        binds_late,
        allows_expansion,
        wanted_by_clones,
        cloning_now,
        launcher_image: &ctx.settings.launcher_image,
    };
    let now = Time(jiff::Timestamp::now());
    let mut decided = plan::plan(&observation, &now);

    if decided.finalizer == Finalizer::Add {
        apply::add_finalizer(&ctx, image.as_ref(), names::IMAGE_FINALIZER).await?;
    }
    if let Some(request) = &decided.create_pvc {
        let pvc = build::image_pvc(&image, request, &ctx.settings.access_mode);
        if !apply::create_child(&ctx, &pvc_api, &pvc, &uid).await? {
            observation.pvc = pvc_view(pvc_read.get_opt(&request.name).await?.as_ref(), &uid);
            decided = plan::plan(&observation, &now);
        }
    }
    if let Some(record) = &decided.record {
        let mut annotations = serde_json::Map::new();
        annotations.insert(names::DIGEST_ANNOTATION.into(), record.digest.clone().into());
        if let Some(retries) = record.retries {
            annotations.insert(names::IMPORT_RETRIES_ANNOTATION.into(), retries.to_string().into());
        }
        let patch = serde_json::json!({"metadata": {"annotations": annotations}});
        let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
        ctx.writes.send("PersistentVolumeClaim", "patch", pvc_api.patch(&record.pvc, &params, &patch)).await?;
        info!(image = %name, pvc = %record.pvc, digest = %record.digest, "the image's data is complete");
    }
    if let Some((pvc, size)) = &decided.expand_pvc {
        // Only the storage request grows; the API server allows that for bound PVCs of a class
        // with allowVolumeExpansion, and the storage's resizer does the rest.
        let patch = serde_json::json!({"spec": {"resources": {"requests": {"storage": size}}}});
        let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
        ctx.writes.send("PersistentVolumeClaim", "patch", pvc_api.patch(pvc, &params, &patch)).await?;
        info!(image = %name, %pvc, size = %size.0, "asked storage to expand the image's PVC");
    }
    if let Some(snapshot) = &decided.create_snapshot {
        let params = PostParams { field_manager: Some(names::FIELD_MANAGER.into()), ..Default::default() };
        match ctx.writes.send("VolumeSnapshot", "create", snapshot_api.create(&params, snapshot)).await {
            Ok(_) => info!(image = %name, snapshot = %snapshot.name_any(), "took a VolumeSnapshot"),
            Err(e) if e.code() == Some(409) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(snapshot) = &decided.delete_snapshot {
        let params = kube::api::DeleteParams::background();
        match ctx.writes.send("VolumeSnapshot", "delete", snapshot_api.delete(snapshot, &params)).await {
            Ok(_) => {}
            Err(e) if e.code() == Some(404) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    for pod in &decided.delete_pods {
        apply::delete_child(&ctx, &pod_api, pod).await?;
    }
    let mut requeue = decided.requeue;
    for pod in &decided.create_pods {
        // A copy never starts under a guest: the launcher Pods that mount its source, read from
        // the API server (the cache may lag a launcher created a moment ago; the VM side checks
        // the copiers the same way before its launcher).
        if let Some(source) = pod.annotations().get(names::COPY_SOURCE_ANNOTATION)
            && let Some(launcher) = launcher_mounting(&ctx, &ns, source).await?
        {
            info!(image = %name, %source, %launcher, "not copying: a launcher mounts the source");
            requeue = Some(Duration::from_secs(2));
            continue;
        }
        if !apply::create_child(&ctx, &pod_api, pod, &uid).await? {
            // Taken by a Pod that is not this Image's (the cache only sees vmkeep's Pods).
            let pod_name = pod.name_any();
            warn!(image = %name, pod = %pod_name, "a helper Pod's name is taken");
            if let Some(role) = Role::of(&ns, &own_pvc, &pod_name) {
                observation.movers.retain(|m| m.name != pod_name);
                observation.movers.push(ObservedMover {
                    name: pod_name,
                    role,
                    state: MoverState::Foreign,
                    phase: None,
                    generation: None,
                });
                decided.status = plan::plan(&observation, &now).status;
            }
        }
    }
    apply::status(&ctx, image.as_ref(), image.status.as_ref(), &decided.status).await?;
    if let Some(event) = &decided.event {
        apply::event(&ctx, image.as_ref(), event.warning, &event.reason, event.message.clone()).await;
    }
    if let Some(pvc) = &decided.delete_pvc {
        apply::delete_child(&ctx, &pvc_api, pvc).await?;
    }
    if decided.finalizer == Finalizer::Remove {
        apply::remove_finalizer(&ctx, image.as_ref(), names::IMAGE_FINALIZER).await?;
    }
    // An adopted PVC is watched (metadata only): its changes wake the Image.
    Ok(match requeue {
        Some(after) => Action::requeue(after),
        None => Action::await_change(),
    })
}

/// A launcher Pod (any VM's, not finished) that mounts PVC `pvc`, read from the API server;
/// with the KubeVirt runtime in use, also a VirtualMachineInstance of vmkeep's that names it
/// (its virt-launcher Pod, labelled like it, may not exist yet).
async fn launcher_mounting(ctx: &Context, ns: &str, pvc: &str) -> Result<Option<String>, Error> {
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    if ctx.kubevirt.state().in_use() {
        let vmis: Api<build::Instance> = Api::namespaced(ctx.client.clone(), ns);
        let params = kube::api::ListParams::default().labels(names::VM_LABEL);
        match vmis.list(&params).await {
            Ok(list) => {
                if let Some(vmi) = list.items.iter().find(|v| v.claim_names().any(|c| c == pvc)) {
                    return Ok(Some(format!("VirtualMachineInstance {}", vmi.name_any())));
                }
            }
            Err(kube::Error::Api(e)) if e.code == 403 || e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let params = kube::api::ListParams::default().labels(names::VM_LABEL);
    let pods = pod_api.list(&params).await?;
    Ok(pods
        .items
        .iter()
        .filter(|p| !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")))
        .find(|p| {
            p.spec
                .iter()
                .flat_map(|s| s.volumes.iter().flatten())
                .any(|v| v.persistent_volume_claim.as_ref().is_some_and(|c| c.claim_name == pvc))
        })
        .map(|p| p.name_any()))
}

/// The Image's helper Pods at their names (importer, size probe, copier), from the cache.
fn movers(ctx: &Context, ns: &str, pvc: &str, image_uid: &str) -> Vec<ObservedMover> {
    Role::pods(ns, pvc)
        .into_iter()
        .filter_map(|(role, pod_name)| {
            let pod = ctx.stores.pods.get(&ObjectRef::new(&pod_name).within(ns))?;
            let ours = apply::owned_by(&pod.metadata, image_uid);
            let state = match role {
                Role::Copy => MoverState::of_copier(&pod, ours),
                Role::Import | Role::Probe => MoverState::of(&pod, ours, build::IMPORTER_CONTAINER, import_outcome),
                Role::Bind => MoverState::of(&pod, ours, build::BINDER_CONTAINER, |_| Some(Ok(String::new()))),
            };
            Some(ObservedMover {
                name: pod_name,
                role,
                state,
                phase: pod.status.as_ref().and_then(|s| s.phase.clone()),
                generation: pod.annotations().get(names::GENERATION_ANNOTATION).and_then(|g| g.parse().ok()),
            })
        })
        .collect()
}

/// An importer's termination message as a helper's outcome: the message itself when it
/// succeeded (the plan reads it again), `<Reason>: <message>` when it failed (for good, or
/// `Retrying: ...` before the kubelet runs it again).
fn import_outcome(message: &str) -> Option<Result<String, String>> {
    if let Some(why) = import::parse_retrying(message) {
        return Some(Err(format!("Retrying: {why}")));
    }
    match import::parse_result(message)? {
        ImportResult::Failed { reason, message } => Some(Err(format!("{reason}: {message}"))),
        _ => Some(Ok(message.trim().to_owned())),
    }
}

/// Whether VM `name` runs (or starts or stops): its launcher Pod exists, or it is not `Stopped`.
fn vm_runs(ctx: &Context, ns: &str, vm: &VirtualMachine) -> bool {
    let launcher = ctx.stores.pods.get(&ObjectRef::new(&names::launcher_pod(ns, &vm.name_any())).within(ns));
    launcher.is_some() || vm.status.as_ref().and_then(|s| s.phase) != Some(VirtualMachinePhase::Stopped)
}

/// The VirtualMachine that writes persistent image `source` now: its claim holder (from the
/// claim Lease), while that VM runs (a Halted holder keeps the claim and writes nothing). From the caches.
fn writer(ctx: &Context, ns: &str, source: &Image) -> Option<String> {
    // The claim itself (the Lease), not the source's status, which may lag it.
    let lease = ctx.stores.leases.get(&ObjectRef::new(&names::claim_lease(&source.name_any())).within(ns))?;
    let holder = claim::holder(&lease)?;
    let vm = ctx.stores.vms.find(|v| v.metadata.uid.as_deref() == Some(holder.uid.as_str()));
    match vm {
        Some(vm) if !vm_runs(ctx, ns, &vm) => None,
        _ => Some(holder.name.clone()),
    }
}

/// For `source.virtualMachineDisk`: the VM (whether it runs) and its disk, from the caches.
fn source_vm(ctx: &Context, ns: &str, image: &Image) -> Option<SourceVm> {
    let from = image.spec.source.virtual_machine_disk.as_ref()?;
    let vm = ctx.stores.vms.get(&ObjectRef::new(&from.virtual_machine).within(ns))?;
    let running = vm_runs(ctx, ns, &vm);
    let status = vm.status.clone().unwrap_or_default();
    let disk = status.disks.iter().find(|d| d.name == from.disk).and_then(|d| {
        let pvc_name = d.pvc_name.clone()?;
        let pvc = ctx.stores.pvcs.get(&ObjectRef::new(&pvc_name).within(ns));
        let spec = pvc.as_ref().and_then(|p| p.spec.clone()).unwrap_or_default();
        let requested = spec.resources.as_ref().and_then(|r| r.requests.as_ref()?.get("storage").cloned());
        let capacity = pvc.as_ref().and_then(|p| p.status.as_ref()?.capacity.as_ref()?.get("storage").cloned());
        let source_image = d.image.as_ref().and_then(|i| ctx.stores.image(ns, i));
        Some(SourceDisk {
            pvc: pvc_name,
            capacity: capacity.or(requested).or_else(|| d.size.clone()),
            storage_class: spec.storage_class_name,
            volume_mode: match spec.volume_mode.as_deref() {
                Some("Block") => VolumeMode::Block,
                _ => VolumeMode::Filesystem,
            },
            blank: source_image.as_ref().is_none_or(|i| i.spec.source.blank.is_some()),
            digest: None,
        })
    });
    Some(SourceVm { running, disk })
}

/// The clone strategy of an image cloned from another Image or a VM disk, and the
/// VolumeSnapshotClass when it is `snapshot`, from the StorageClasses (read from the API server,
/// only while its PVC is to be made).
async fn clone_choice(
    ctx: &Context,
    image: &Image,
    source_image: Option<&Image>,
    source_vm: Option<&SourceVm>,
) -> Result<(Option<Chosen>, Option<String>), Error> {
    let source_class = match (source_image, source_vm) {
        (Some(i), _) => i.status.as_ref().and_then(|s| s.storage_class_name.clone()),
        (None, Some(vm)) => vm.disk.as_ref().and_then(|d| d.storage_class.clone()),
        (None, None) => return Ok((None, None)),
    };
    let target = image.spec.storage_class_name.clone().or_else(|| source_class.clone());
    let info = super::storage_class(ctx, target.as_deref()).await?;
    let source = source_class.or_else(|| info.name.clone());
    let chosen = clone::choose(&info, source.as_deref(), ctx.settings.clone_strategy);
    let snapshot_class = info.snapshot_class.filter(|_| chosen.strategy == CloneStrategy::Snapshot);
    Ok((Some(chosen), snapshot_class))
}

/// The last progress an importer logged (its log's last lines, read through `pods/log`; the
/// importer has no API credentials). `None` when it cannot be read.
async fn progress(ctx: &Context, ns: &str, pod: &str) -> Option<Progress> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let params =
        LogParams { container: Some(build::IMPORTER_CONTAINER.into()), tail_lines: Some(20), ..Default::default() };
    match api.logs(pod, &params).await {
        Ok(log) => import::parse_progress(&log),
        Err(error) => {
            tracing::debug!(%error, %pod, "cannot read the importer's log for its progress");
            None
        }
    }
}

// An image PVC or claim Lease made by an older vmkeep has the Image as owner, through which a
// foreground or background deletion of the Image would take it while a VM holds it. Both are
// taken out of garbage collection once, on the Image's next reconcile.

/// Removes the owner references of an image PVC made by an older vmkeep and labels it with its
/// Image's uid (how vmkeep knows it now).
async fn detach_pvc(ctx: &Context, api: &Api<PersistentVolumeClaim>, name: &str, image_uid: &str) -> Result<(), Error> {
    let patch = serde_json::json!({"metadata": {
        "ownerReferences": null,
        "labels": { names::IMAGE_UID_LABEL: names::label_value(image_uid) },
    }});
    let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
    match ctx.writes.send("PersistentVolumeClaim", "patch", api.patch(name, &params, &patch)).await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(404) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes the owner references of a claim Lease made by an older vmkeep: an update checked
/// against the resourceVersion read, so it never rewrites a claim that changed meanwhile.
async fn detach_claim(ctx: &Context, lease: &Lease) -> Result<(), Error> {
    let ns = lease.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &ns);
    let mut detached = lease.clone();
    detached.metadata.owner_references = None;
    let (name, params) = (lease.name_any(), PostParams::default());
    match ctx.writes.send("Lease", "update", api.replace(&name, &params, &detached)).await {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.code(), Some(404 | 409)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A VM change concerns the images it records (its use of them starts or ends) and the images
/// saved from its disks (it stopped: they may be copied).
pub fn images_of_vm(stores: &Stores, vm: VirtualMachine) -> Vec<ObjectRef<Image>> {
    let Some(ns) = vm.namespace() else { return Vec::new() };
    let mut images: Vec<String> = vm.status.iter().flat_map(|s| &s.disks).filter_map(|d| d.image.clone()).collect();
    let name = vm.name_any();
    // Images cloned from the images it uses (a persistent source is copied once its VM stops),
    // and images saved from its disks.
    let used = images.clone();
    images.extend(
        stores
            .images
            .state()
            .iter()
            .filter(|i| i.metadata.namespace.as_deref() == Some(ns.as_str()))
            .filter(|i| {
                let source = &i.spec.source;
                source.image.as_ref().is_some_and(|s| used.contains(&s.name))
                    || source.virtual_machine_disk.as_ref().is_some_and(|s| s.virtual_machine == name)
            })
            .map(|i| i.name_any()),
    );
    images.sort();
    images.dedup();
    images.into_iter().map(|i| ObjectRef::new(&i).within(&ns)).collect()
}

/// A claim Lease change concerns its image.
pub fn image_of_lease(lease: Lease) -> Option<ObjectRef<Image>> {
    Some(ObjectRef::new(claim::image_of(&lease)?).within(&lease.namespace()?))
}

/// A helper Pod change concerns its Image; a launcher Pod change concerns the images its VM holds claims on (by the VM uid recorded on
/// the Pod, or its owner): when the VM was removed by force, the Pod's end frees them.
pub fn images_of_pod(stores: &Stores, pod: &CachedPod) -> Vec<ObjectRef<Image>> {
    let Some(ns) = pod.namespace() else { return Vec::new() };
    // An Image's own helper Pod (importer, size probe, copier) concerns that Image.
    if let Some(owner) = pod.owner_references().iter().find(|o| o.kind == "Image" && o.controller == Some(true)) {
        return vec![ObjectRef::new(&owner.name).within(&ns)];
    }
    let uids: Vec<&str> = pod
        .labels()
        .get(names::VM_UID_LABEL)
        .map(String::as_str)
        .into_iter()
        .chain(pod.owner_references().iter().map(|o| o.uid.as_str()))
        .collect();
    stores
        .leases
        .state()
        .iter()
        .filter(|l| l.metadata.namespace.as_deref() == Some(ns.as_str()))
        .filter(|l| claim::holder(l).is_some_and(|h| uids.contains(&h.uid.as_str())))
        .filter_map(|l| Some(ObjectRef::new(claim::image_of(l)?).within(&ns)))
        .collect()
}

/// An Image change concerns the images cloned from it (a released source can now be cloned)
/// and its own source (a clone waiting for it may need it bound).
pub fn clones_of(stores: &Stores, image: &Image) -> Vec<ObjectRef<Image>> {
    let name = image.name_any();
    let source =
        image.spec.source.image.as_ref().zip(image.namespace()).map(|(s, ns)| ObjectRef::new(&s.name).within(&ns));
    stores
        .images
        .state()
        .into_iter()
        .filter(|i| {
            i.metadata.namespace == image.metadata.namespace
                && i.spec.source.image.as_ref().is_some_and(|s| s.name == name)
        })
        .map(|i| ObjectRef::from_obj(i.as_ref()))
        .chain(source)
        .collect()
}
