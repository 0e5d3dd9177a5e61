//! The VirtualMachine controller, one visible pipeline: [`observe`] (the caches, and the claims
//! read from the API server) -> [`plan::decide`] (pure) -> [`apply`] (finalizer, claims, PVCs,
//! launcher Pod, status, Event). When applying finds something the observation could not know
//! (a claim lost to another VM in the meantime, a child's name taken by a foreign object), that
//! fact joins the observation and the plan is decided again.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{PersistentVolumeClaim, Pod},
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, ResourceExt,
    api::{LogParams, Patch, PatchParams},
    runtime::{controller::Action, reflector::ObjectRef},
};
use tracing::{info, warn};

use super::{Context, Error, Stores, apply};
use crate::{
    api::{
        Image, Template, VirtualMachine,
        template::Runtime,
        virtual_machine::{VirtualMachinePhase, VirtualMachineStatus},
    },
    claim::{self, Release},
    launcher::spec,
    plan::{
        build,
        cached::CachedPod,
        claim::{self as rules, ClaimState},
        clone::{self, Chosen, ClassInfo, CloneStrategy},
        mover::MoverState,
        names,
        runtime::{self, Choice, KubevirtApi},
        virtual_machine::{self as plan, Child, CloneView, LauncherView, Observed, OtherVm, PodChange, VmPlan},
    },
};

/// How soon a VM whose runtime depends on KubeVirt's API, not known yet, looks again.
const RUNTIME_WAIT: Duration = Duration::from_secs(1);

/// How often one reconcile decides again after applying found something new.
const MAX_PASSES: usize = 4;

/// Reconciles one VirtualMachine: observe, decide, apply, until the plan applies as decided.
pub async fn reconcile(vm: Arc<VirtualMachine>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = vm.namespace().ok_or(Error::MissingNamespace)?;
    let cached = Cached::read(&ctx, &ns, &vm);
    if cached.runtime == Choice::Wait && vm.metadata.deletion_timestamp.is_none() {
        // Which runtime, or whether a VirtualMachineInstance exists, is known in a moment (the
        // KubeVirt API's probe or the first list of its cache).
        return Ok(Action::requeue(RUNTIME_WAIT));
    }
    let mut facts = Facts::default();
    for _ in 0..MAX_PASSES {
        let observed = observe(&ctx, &ns, &vm, &cached, &facts).await?;
        let decided = plan::decide(&observed);
        match apply(&ctx, &ns, &vm, &decided, &mut facts).await? {
            Applied::Done => {
                record(&ctx, &ns, &vm, &cached, &decided);
                return Ok(decided.requeue.map_or_else(Action::await_change, Action::requeue));
            }
            // A Pod still fences a claim. Its deletion normally wakes the VM, but a Pod a user took
            // out of vmkeep's watch (labels edited) would not: look again in a while.
            Applied::Fenced => return Ok(Action::requeue(FENCED_RECHECK)),
            Applied::Learned(fact) => facts.learn(fact),
        }
    }
    // Still changing under our feet: look again shortly.
    Ok(Action::requeue(Duration::from_millis(500)))
}

/// The launcher metrics an applied plan shows: a start (into Running), restarts, and a stop
/// this replica asked for that has ended (the Pod is gone).
fn record(ctx: &Context, ns: &str, vm: &VirtualMachine, cached: &Cached, decided: &VmPlan) {
    let key = format!("{ns}/{}", vm.name_any());
    {
        let mut stopping = ctx.stopping.lock().expect("stopping launchers");
        if matches!(decided.pod, Some(PodChange::Delete | PodChange::DeleteInstance)) {
            stopping.entry(key).or_insert_with(std::time::Instant::now);
        } else if matches!(cached.pod, Child::Missing | Child::Foreign)
            && let Some(asked) = stopping.remove(&key)
        {
            ctx.metrics.launcher_stop.observe(asked.elapsed().as_secs_f64());
        }
    }
    let (before, after) = (vm.status.as_ref(), decided.status.as_ref());
    let running = |s: Option<&VirtualMachineStatus>| s.and_then(|s| s.phase) == Some(VirtualMachinePhase::Running);
    if running(after)
        && !running(before)
        && let Some(created) = &cached.launcher.created
    {
        let since = jiff::Timestamp::now().duration_since(created.0);
        ctx.metrics.launcher_start.observe(since.as_secs_f64().max(0.0));
    }
    if let (Some(was), Some(now)) = (before.and_then(|s| s.restarts), after.and_then(|s| s.restarts))
        && now > was
    {
        ctx.metrics.launcher_restarts.inc_by((now - was) as u64);
    }
}

/// What the caches hold for one VM's decision (owned, so [`Observed`] can borrow from it).
struct Cached {
    template: Option<Arc<Template>>,
    images: BTreeMap<String, Arc<Image>>,
    pvcs: BTreeMap<String, Child>,
    /// What the VM's clone PVCs' annotations say, and its copier Pods, by PVC.
    clones: BTreeMap<String, CloneView>,
    copiers: BTreeMap<String, MoverState>,
    /// Its workload (launcher Pod or VirtualMachineInstance) of the runtime in force.
    pod: Child,
    launcher: LauncherView,
    /// The runtime in force ([`runtime::in_force`]).
    runtime: Choice,
    /// Whether a VirtualMachineInstance of it may exist unseen (see [`Observed`]).
    instance_unseen: bool,
    /// Whether the VirtualMachineInstance it ran with is seen gone (see [`Observed`]).
    instance_gone: bool,
    /// The claims this VM may hold or need: recorded disks, its template's persistent images,
    /// and the cached Leases held by its uid (a status lost in a restore).
    claim_images: BTreeSet<String>,
    /// The other VMs of the namespace, read once when an image this VM needs is free.
    others: std::sync::OnceLock<Vec<(Arc<VirtualMachine>, BTreeSet<String>)>>,
}

impl Cached {
    fn read(ctx: &Context, ns: &str, vm: &VirtualMachine) -> Self {
        let uid = vm.uid().unwrap_or_default();
        let template = ctx.stores.template(ns, &vm.spec.template_ref.name);
        let recorded = vm.status.iter().flat_map(|s| s.disks.iter()).filter_map(|d| d.image.clone());
        let templated = template.iter().flat_map(|t| t.spec.disks.iter()).filter_map(|d| d.image.clone());
        let images: BTreeMap<String, Arc<Image>> =
            recorded.chain(templated).filter_map(|name| ctx.stores.image(ns, &name).map(|i| (name, i))).collect();
        let mut claim_images: BTreeSet<String> = vm
            .status
            .iter()
            .flat_map(|s| s.disks.iter())
            .filter(|d| d.persistent)
            .filter_map(|d| d.image.clone())
            .collect();
        // A template image whose mode in force is persistent (what a resolve would claim).
        claim_images.extend(
            images
                .iter()
                .filter(|(_, i)| i.status.as_ref().and_then(|s| s.persistent) == Some(true))
                .filter(|(name, _)| {
                    template.as_ref().is_some_and(|t| t.spec.disks.iter().any(|d| d.image.as_ref() == Some(name)))
                })
                .map(|(name, _)| name.clone()),
        );
        for lease in ctx.stores.leases.state() {
            if lease.metadata.namespace.as_deref() == Some(ns)
                && claim::holder(&lease).is_some_and(|h| h.uid == uid)
                && let Some(image) = claim::image_of(&lease)
            {
                claim_images.insert(image.clone());
            }
        }
        let mut clones = BTreeMap::new();
        let mut copiers = BTreeMap::new();
        let pvcs = vm
            .status
            .iter()
            .flat_map(|s| s.disks.iter())
            .filter(|d| !d.persistent)
            .filter_map(|d| d.pvc_name.clone())
            .chain(
                template.iter().flat_map(|t| t.spec.disks.iter()).map(|d| names::vm_disk_pvc(&vm.name_any(), &d.name)),
            )
            .map(|pvc| {
                let cached = ctx.stores.pvcs.get(&ObjectRef::new(&pvc).within(ns));
                let state = apply::child_state(cached.as_deref(), &uid, |p| p.status.as_ref()?.phase.clone());
                if let (Some(claim), Child::Ours { .. }) = (&cached, &state) {
                    clones.insert(pvc.clone(), CloneView::of(&claim.metadata));
                }
                if let Some(pod) = ctx.stores.pods.get(&ObjectRef::new(&names::copier_pod(ns, &pvc)).within(ns)) {
                    copiers.insert(pvc.clone(), MoverState::of_copier(&pod, apply::vm_child(&pod.metadata, &uid)));
                }
                (pvc, state)
            })
            .collect();
        let pod_name = names::launcher_pod(ns, &vm.name_any());
        let (launcher_pod, launcher_view) = match ctx.stores.pods.get(&ObjectRef::new(&pod_name).within(ns)) {
            None => (Child::Missing, LauncherView::default()),
            Some(p) if rules::launcher_of(&p.metadata, &vm.name_any(), &uid) => (
                Child::Ours {
                    phase: p.status.as_ref().and_then(|s| s.phase.clone()),
                    deleting: p.metadata.deletion_timestamp.is_some(),
                },
                LauncherView::of(&p),
            ),
            Some(_) => (Child::Foreign, LauncherView::default()),
        };
        let Workload { runtime, instance_unseen, instance_gone, pod, launcher } =
            workload(ctx, ns, vm, template.as_deref(), launcher_pod, launcher_view);
        Self {
            template,
            images,
            pvcs,
            clones,
            copiers,
            pod,
            launcher,
            runtime,
            instance_unseen,
            instance_gone,
            claim_images,
            others: std::sync::OnceLock::new(),
        }
    }
}

/// The runtime in force for `vm` and its workload of that runtime: the launcher Pod observed,
/// or its VirtualMachineInstance from the KubeVirt cache (asked for only when the VM's Template,
/// the operator's setting or its recorded status names KubeVirt).
fn workload(
    ctx: &Context,
    ns: &str,
    vm: &VirtualMachine,
    template: Option<&Template>,
    pod: Child,
    launcher: LauncherView,
) -> Workload {
    let name = vm.name_any();
    let uid = vm.uid().unwrap_or_default();
    let recorded = vm.status.as_ref().and_then(|s| s.runtime);
    let asked = template.and_then(|t| t.spec.runtime);
    if asked.unwrap_or(ctx.settings.runtime) != Runtime::Launcher || recorded == Some(Runtime::Kubevirt) {
        ctx.kubevirt.want();
    }
    // The VMI cache is read whenever it is listed, whatever this VM asks for now.
    let api = ctx.kubevirt.state();
    let found = if api == KubevirtApi::Ready { ctx.kubevirt.get(ns, &name) } else { None };
    // Its virt-launcher Pods may outlive the VMI, and the API itself (KubeVirt removed).
    let launchers = found.is_none() && recorded == Some(Runtime::Kubevirt) && virt_launchers(ctx, ns, &name);
    let (vmi, vmi_view) = runtime::instance(found.as_deref(), launchers, &name, &uid);
    let mut choice = runtime::in_force(&pod, &vmi, runtime::choose(ctx.settings.runtime, asked, &api));
    // It ran with KubeVirt and its VirtualMachineInstance cannot be seen: nothing may start
    // another workload on its disks, or release them, meanwhile.
    let unseen = recorded == Some(Runtime::Kubevirt)
        && !matches!(pod, Child::Ours { .. })
        && !matches!(api, KubevirtApi::Ready | KubevirtApi::NotServed);
    if unseen {
        choice = match &api {
            KubevirtApi::Unusable(why) => Choice::NotAvailable(why.clone()),
            _ => Choice::Wait,
        };
    }
    let (pod, launcher) = match choice {
        Choice::Run(Runtime::Kubevirt) => (vmi, vmi_view),
        _ => (pod, launcher),
    };
    // Seen gone for sure (listed, or KubeVirt's API gone), Pods included: the record of it can go.
    let instance_gone = recorded == Some(Runtime::Kubevirt)
        && found.is_none()
        && !launchers
        && matches!(api, KubevirtApi::Ready | KubevirtApi::NotServed);
    Workload { runtime: choice, instance_unseen: unseen, instance_gone, pod, launcher }
}

/// A VM's workload of the runtime in force, as [`workload`] found it.
struct Workload {
    runtime: Choice,
    instance_unseen: bool,
    instance_gone: bool,
    pod: Child,
    launcher: LauncherView,
}

/// Whether a virt-launcher Pod of VM `name`'s VirtualMachineInstance is still cached (by its
/// controller reference to a VMI of that name; KubeVirt copies the VMI's labels, vmkeep's
/// among them, onto the Pod, so the Pod cache has it). Asked only while the VMI is gone.
fn virt_launchers(ctx: &Context, ns: &str, name: &str) -> bool {
    ctx.stores.pods.state().iter().any(|p| {
        p.metadata.namespace.as_deref() == Some(ns)
            && p.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.controller == Some(true) && o.kind == "VirtualMachineInstance" && o.name == name)
    })
}

/// What applying a plan found out that no cache shows.
enum Fact {
    /// A claim this VM tried to take is held as this state says.
    Claim(String, ClaimState),
    /// A child name is taken by an object that is not the VM's.
    Taken(&'static str, String),
    /// Image copies read disks of the VM now (from the API server).
    Saving(Vec<String>),
}

/// The facts learned so far in this reconcile.
#[derive(Default)]
struct Facts {
    claims: BTreeMap<String, ClaimState>,
    taken: BTreeSet<(&'static str, String)>,
    saving: Vec<String>,
    /// The finalizer was added in an earlier pass (the VM object read has not got it).
    finalizer_added: bool,
}

impl Facts {
    fn learn(&mut self, fact: Fact) {
        match fact {
            Fact::Claim(image, state) => {
                self.claims.insert(image, state);
            }
            Fact::Taken(kind, name) => {
                self.taken.insert((kind, name));
            }
            Fact::Saving(copies) => self.saving = copies,
        }
    }
}

/// Observe: the cached objects, the claims (from the API server, or as just learned), and the
/// other VMs of the namespace when an image this VM needs is free.
async fn observe<'a>(
    ctx: &'a Context,
    ns: &str,
    vm: &'a VirtualMachine,
    cached: &'a Cached,
    facts: &Facts,
) -> Result<Observed<'a>, Error> {
    let uid = vm.uid().unwrap_or_default();
    let mut claims = BTreeMap::new();
    for image in &cached.claim_images {
        let state = match facts.claims.get(image) {
            Some(state) => state.clone(),
            None => ctx.claims.state(ns, image, &uid).await?,
        };
        claims.insert(image.clone(), state);
    }
    let mut launcher = cached.launcher.clone();
    if launcher.ready
        && launcher.runtime == Runtime::Launcher
        && vm.status.as_ref().is_none_or(|s| s.accelerator.is_none())
    {
        launcher.accelerator = accelerator(ctx, ns, vm).await;
    }
    let clone_choices =
        if vm.metadata.deletion_timestamp.is_none() { clone_choices(ctx, vm, cached).await? } else { BTreeMap::new() };
    let mut observed = Observed {
        vm,
        template: cached.template.as_deref(),
        images: cached.images.iter().map(|(n, i)| (n.clone(), i.as_ref())).collect(),
        claims,
        others: Vec::new(),
        pvcs: cached.pvcs.clone(),
        pod: cached.pod.clone(),
        launcher,
        runtime: cached.runtime.clone(),
        instance_unseen: cached.instance_unseen,
        instance_gone: cached.instance_gone,
        clone_choices,
        clones: cached.clones.clone(),
        copiers: cached.copiers.clone(),
        saving: match (&cached.pod, facts.saving.is_empty()) {
            (_, false) => facts.saving.clone(),
            (Child::Missing, true) => saving(ctx, ns, vm, cached),
            _ => Vec::new(),
        },
        taken: facts.taken.clone(),
        launcher_image: &ctx.settings.launcher_image,
        cpu_allocation_ratio: ctx.settings.cpu_allocation_ratio,
        access_mode: &ctx.settings.access_mode,
        now: Time(jiff::Timestamp::now()),
    };
    if observed.claims.values().any(|s| *s == ClaimState::Free) && vm.metadata.deletion_timestamp.is_none() {
        let snapshot = cached.others.get_or_init(|| others(ctx, ns, vm));
        observed.others = snapshot.iter().map(|(o, images)| OtherVm { vm: o, claims_now: images.clone() }).collect();
    }
    Ok(observed)
}

/// The clone strategy of each image disk of the VM whose PVC is still to be made: from the
/// StorageClass of the image's PVC (read from the API server, only then) and the operator's
/// setting ([`crate::plan::clone::choose`]).
async fn clone_choices(ctx: &Context, vm: &VirtualMachine, cached: &Cached) -> Result<BTreeMap<String, Chosen>, Error> {
    let recorded = vm.status.iter().flat_map(|s| s.disks.iter()).filter(|d| !d.persistent).map(|d| (&d.name, &d.image));
    let templated = cached.template.iter().flat_map(|t| t.spec.disks.iter()).map(|d| (&d.name, &d.image));
    let mut choices = BTreeMap::new();
    let mut classes: BTreeMap<Option<String>, ClassInfo> = BTreeMap::new();
    for (disk, image) in recorded.chain(templated) {
        let Some(image) = image.as_ref().and_then(|i| cached.images.get(i)) else { continue };
        let pvc = names::vm_disk_pvc(&vm.name_any(), disk);
        if choices.contains_key(disk) || cached.pvcs.get(&pvc) != Some(&Child::Missing) {
            continue;
        }
        let class = image.status.as_ref().and_then(|s| s.storage_class_name.clone());
        if !classes.contains_key(&class) {
            classes.insert(class.clone(), super::storage_class_reused(ctx, class.as_deref()).await?);
        }
        let info = &classes[&class];
        let mut chosen = clone::choose(info, info.name.as_deref(), ctx.settings.clone_strategy);
        if chosen.strategy == CloneStrategy::Snapshot {
            // Snapshots serve image clones; a VM's clone is copied (docs/clones.md).
            let why = "a VM's clone is not made from a snapshot in this version: copied instead".to_owned();
            chosen = Chosen { strategy: CloneStrategy::Copy, fallback: Some(why) };
        }
        choices.insert(disk.clone(), chosen);
    }
    Ok(choices)
}

/// The helper Pods of Images that copy one of the VM's disks now (saved as an image, or a
/// persistent image cloned): the launcher waits for them. From the Pod cache, only while the VM
/// has no launcher.
fn saving(ctx: &Context, ns: &str, vm: &VirtualMachine, cached: &Cached) -> Vec<String> {
    let mut disks: BTreeSet<String> =
        vm.status.iter().flat_map(|s| s.disks.iter()).filter_map(|d| d.pvc_name.clone()).collect();
    // Its persistent images' PVCs (its launcher mounts them); a non-persistent image's PVC is
    // only read by the VM's own clone or copier, which a copy of it does not disturb.
    disks.extend(
        cached
            .images
            .values()
            .filter_map(|i| i.status.as_ref())
            .filter(|s| s.persistent == Some(true))
            .filter_map(|s| s.pvc_name.clone()),
    );
    let pods = ctx.stores.pods.state();
    copies_of(pods.iter().map(|p| p.as_ref()).filter(|p| p.metadata.namespace.as_deref() == Some(ns)), &disks)
}

/// The copies (Image copier Pods, by their `vmkeep.io/copy-source`) that read one of `disks`
/// now, as messages.
fn copies_of<'a>(pods: impl Iterator<Item = &'a CachedPod>, disks: &BTreeSet<String>) -> Vec<String> {
    pods.filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.annotations().get(names::COPY_SOURCE_ANNOTATION).is_some_and(|s| disks.contains(s)))
        .filter(|p| !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")))
        .map(|p| {
            let source = p.annotations().get(names::COPY_SOURCE_ANNOTATION).cloned().unwrap_or_default();
            format!("PersistentVolumeClaim {source} is being copied by Pod {}", p.name_any())
        })
        .collect()
}

/// The PVCs Images of namespace `ns` may copy from (their copier's `vmkeep.io/copy-source`),
/// from the caches: the PVC of the image an Image clones (`source.image`), the disk PVC of the
/// VM disk it saves (`source.virtualMachineDisk`: a clone, or a persistent image's PVC), by
/// the names recorded in status and by the names vmkeep gives (a superset). The Image is in
/// the cache before its copier can exist: the Image controller reads the same cache.
fn copy_sources(ctx: &Context, ns: &str) -> BTreeSet<String> {
    let mut sources = BTreeSet::new();
    for image in ctx.stores.images.state().iter().filter(|i| i.metadata.namespace.as_deref() == Some(ns)) {
        if let Some(source) = &image.spec.source.image {
            sources.insert(names::image_pvc(&source.name));
            let recorded = ctx.stores.image(ns, &source.name).and_then(|i| i.status.as_ref()?.pvc_name.clone());
            sources.extend(recorded);
        }
        if let Some(source) = &image.spec.source.virtual_machine_disk {
            sources.insert(names::vm_disk_pvc(&source.virtual_machine, &source.disk));
            let vm = ctx.stores.vms.get(&ObjectRef::new(&source.virtual_machine).within(ns));
            let disk = vm
                .as_ref()
                .and_then(|v| v.status.as_ref()?.disks.iter().find(|d| d.name == source.disk)?.pvc_name.clone());
            sources.extend(disk);
        }
    }
    sources
}

/// Right before a launcher Pod is created: the Image copies of its PVCs, read from the API
/// server (the cache may not have the copier an Image controller created a moment ago; the
/// Image side checks the launcher Pods the same way before its copier). Asked only when an
/// Image may copy one of the launcher's PVCs ([`copy_sources`]): a list of the namespace's
/// helper Pods before every launcher made starting 1,000 VMs 1.8 times slower (the benchmark,
/// docs/performance.md).
async fn copies_now(ctx: &Context, ns: &str, disks: BTreeSet<String>) -> Result<Vec<String>, Error> {
    if copy_sources(ctx, ns).is_disjoint(&disks) {
        return Ok(Vec::new());
    }
    let params = kube::api::ListParams::default().labels(names::TRANSFER_FOR_LABEL);
    let pods = Api::<CachedPod>::namespaced(ctx.client.clone(), ns).list(&params).await?;
    Ok(copies_of(pods.items.iter(), &disks))
}

/// Right before a workload is created: whether the VM's workload of the `other` runtime exists
/// on the API server (the caches and the VM's status may not show one made a moment ago, e.g.
/// just before the Template switched runtimes). Two workloads never run on one VM's disks. The
/// VirtualMachineInstance is asked for only where vmkeep uses KubeVirt's API, so the launcher
/// runtime alone costs nothing more.
async fn other_workload(ctx: &Context, ns: &str, vm: &VirtualMachine, other: Runtime) -> Result<bool, Error> {
    let (name, uid) = (vm.name_any(), vm.uid().unwrap_or_default());
    let meta = match other {
        Runtime::Kubevirt => {
            if !ctx.kubevirt.state().in_use() {
                return Ok(false);
            }
            let api: Api<build::Instance> = Api::namespaced(ctx.client.clone(), ns);
            match api.get_metadata_opt(&name).await {
                Ok(found) => found.map(|o| o.metadata),
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 403 => None,
                Err(e) => return Err(e.into()),
            }
        }
        _ => {
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
            api.get_metadata_opt(&names::launcher_pod(ns, &name)).await?.map(|o| o.metadata)
        }
    };
    let exists = meta.is_some_and(|m| rules::launcher_of(&m, &name, &uid));
    if exists {
        info!(runtime = other.as_str(), "waiting for the VM's workload of its other runtime to go");
    }
    Ok(exists)
}

/// The accelerator a running launcher chose, from the start of its log (it has no API
/// credentials to write it anywhere; see [`crate::launcher::spec::ACCELERATOR_LINE`]). `None`
/// when the log cannot be read or lacks the line (looked for again at the next reconcile).
async fn accelerator(ctx: &Context, ns: &str, vm: &VirtualMachine) -> Option<(String, String)> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let params = LogParams {
        container: Some(build::LAUNCHER_CONTAINER.into()),
        limit_bytes: Some(ACCELERATOR_LOG_BYTES),
        ..Default::default()
    };
    match api.logs(&names::launcher_pod(ns, &vm.name_any()), &params).await {
        Ok(log) => spec::parse_accelerator(&log),
        Err(error) => {
            warn!(%error, "cannot read the launcher's log for its accelerator");
            None
        }
    }
}

/// How much of the start of a launcher's log holds its accelerator line: it is printed before
/// QEMU starts, after a few log lines.
const ACCELERATOR_LOG_BYTES: i64 = 16 * 1024;

/// The other VMs of the namespace and the persistent images each would claim now (for the
/// order of claims), from the caches.
fn others(ctx: &Context, ns: &str, vm: &VirtualMachine) -> Vec<(Arc<VirtualMachine>, BTreeSet<String>)> {
    ctx.stores
        .vms
        .state()
        .into_iter()
        .filter(|o| o.metadata.namespace.as_deref() == Some(ns) && o.metadata.uid != vm.metadata.uid)
        .filter(|o| o.metadata.deletion_timestamp.is_none())
        .map(|o| {
            if !rules::before_claims(&o) {
                // Only its place in a queue may matter (rules::waits_for, from its status).
                return (o, BTreeSet::new());
            }
            let template = ctx.stores.template(ns, &o.spec.template_ref.name);
            let names: Vec<&str> =
                template.iter().flat_map(|t| t.spec.disks.iter()).filter_map(|d| d.image.as_deref()).collect();
            let images: Vec<Arc<Image>> = names.iter().filter_map(|n| ctx.stores.image(ns, n)).collect();
            let lookup = |n: &str| images.iter().find(|i| i.name_any() == n).map(|i| i.as_ref());
            let claims = plan::claims_now(template.as_ref().map(|t| &t.spec), lookup);
            (o, claims)
        })
        .filter(|(o, claims)| !claims.is_empty() || rules::waits(o))
        .collect()
}

/// How often a VM whose claim release is fenced by a launcher Pod checks again (besides the
/// Pod watch, which misses Pods whose labels were edited).
const FENCED_RECHECK: Duration = Duration::from_secs(5);

/// What [`apply`] ended with.
enum Applied {
    /// The plan is applied.
    Done,
    /// Applied up to a release that a launcher Pod still fences.
    Fenced,
    /// Something the plan did not know: decide again with it.
    Learned(Fact),
}

/// Apply, in order: finalizer, claims to take, claims to release, PVCs, launcher Pod, status,
/// Warning Event, finalizer removal.
async fn apply(
    ctx: &Context,
    ns: &str,
    vm: &VirtualMachine,
    decided: &VmPlan,
    facts: &mut Facts,
) -> Result<Applied, Error> {
    let uid = vm.uid().unwrap_or_default();
    if decided.add_finalizer && !facts.finalizer_added {
        apply::add_finalizer(ctx, vm, names::VM_FINALIZER).await?;
        facts.finalizer_added = true;
    }
    for image in &decided.take {
        let state = ctx.claims.take(image, vm).await?;
        if state != ClaimState::Mine {
            return Ok(Applied::Learned(Fact::Claim(image.clone(), state)));
        }
    }
    let mut fenced = false;
    for image in &decided.release {
        fenced |= ctx.claims.release(ns, image, &uid).await? == Release::Fenced;
    }
    let pvc_api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let created =
        futures::future::join_all(decided.create_pvcs.iter().map(|pvc| apply::create_child(ctx, &pvc_api, pvc, &uid)));
    for (pvc, created) in decided.create_pvcs.iter().zip(created.await) {
        if !created? {
            return Ok(Applied::Learned(Fact::Taken("PersistentVolumeClaim", pvc.name_any())));
        }
    }
    for (pvc, digest) in &decided.record_digests {
        let patch = serde_json::json!({"metadata": {"annotations": {names::DIGEST_ANNOTATION: digest}}});
        let params = PatchParams::default();
        ctx.writes.send("PersistentVolumeClaim", "patch", pvc_api.patch(pvc, &params, &Patch::Merge(&patch))).await?;
        info!(%pvc, %digest, "copied a clone");
    }
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    for copier in &decided.delete_copiers {
        apply::delete_child(ctx, &pod_api, copier).await?;
    }
    for copier in &decided.create_copiers {
        if !apply::create_child(ctx, &pod_api, copier, &uid).await? {
            return Ok(Applied::Learned(Fact::Taken("Pod", copier.name_any())));
        }
    }
    let pod_name = names::launcher_pod(ns, &vm.name_any());
    match &decided.pod {
        Some(PodChange::Create(pod)) => {
            let disks = pod
                .spec
                .iter()
                .flat_map(|s| s.volumes.iter().flatten())
                .filter_map(|v| Some(v.persistent_volume_claim.as_ref()?.claim_name.clone()))
                .collect();
            let copies = copies_now(ctx, ns, disks).await?;
            if !copies.is_empty() {
                return Ok(Applied::Learned(Fact::Saving(copies)));
            }
            if other_workload(ctx, ns, vm, Runtime::Kubevirt).await? {
                return Ok(Applied::Fenced);
            }
            if !apply::create_child(ctx, &pod_api, pod.as_ref(), &uid).await? {
                return Ok(Applied::Learned(Fact::Taken("Pod", pod_name)));
            }
            info!("created the launcher Pod");
        }
        Some(PodChange::CreateInstance(vmi)) => {
            let copies = copies_now(ctx, ns, vmi.claim_names().map(str::to_owned).collect()).await?;
            if !copies.is_empty() {
                return Ok(Applied::Learned(Fact::Saving(copies)));
            }
            if other_workload(ctx, ns, vm, Runtime::Launcher).await? {
                return Ok(Applied::Fenced);
            }
            let api: Api<build::Instance> = Api::namespaced(ctx.client.clone(), ns);
            if !apply::create_child(ctx, &api, vmi.as_ref(), &uid).await? {
                return Ok(Applied::Learned(Fact::Taken("VirtualMachineInstance", vm.name_any())));
            }
            info!("created the VirtualMachineInstance");
        }
        Some(PodChange::Delete) => apply::delete_child(ctx, &pod_api, &pod_name).await?,
        Some(PodChange::DeleteInstance) => {
            let api: Api<build::Instance> = Api::namespaced(ctx.client.clone(), ns);
            apply::delete_child(ctx, &api, &vm.name_any()).await?
        }
        None => {}
    }
    if let Some(status) = &decided.status {
        apply::status(ctx, vm, vm.status.as_ref(), status).await?;
    }
    if let Some((reason, message)) = &decided.warning {
        apply::event(ctx, vm, true, reason, message.clone()).await;
    }
    if let Some((reason, message)) = &decided.notice {
        apply::event(ctx, vm, false, reason, message.clone()).await;
    }
    for pvc in &decided.delete_pvcs {
        apply::delete_child(ctx, &pvc_api, pvc).await?;
    }
    if fenced {
        // A launcher Pod exists (one appeared since the plan was made, or the watch cannot see
        // it): the finalizer stays.
        return Ok(Applied::Fenced);
    }
    if decided.remove_finalizer {
        apply::remove_finalizer(ctx, vm, names::VM_FINALIZER).await?;
    }
    Ok(Applied::Done)
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
        .filter(|vm| vm.metadata.namespace == ns && wanted(vm))
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
    let Some(image) = claim::image_of(lease).cloned() else { return Vec::new() };
    let holder = claim::holder(lease);
    vms_in(stores, lease.namespace(), |vm| {
        rules::waits_for(vm, &image)
            || holder.as_ref().is_some_and(|h| Some(h.uid.as_str()) == vm.metadata.uid.as_deref())
            || rejected_for(vm, &image)
    })
}

/// Whether `vm` is Rejected for want of `image`: its message names the image's holder, so a
/// claim change concerns it.
fn rejected_for(vm: &VirtualMachine, image: &str) -> bool {
    vm.status.as_ref().is_some_and(|s| {
        s.phase == Some(VirtualMachinePhase::Rejected) && s.disks.iter().any(|d| d.image.as_deref() == Some(image))
    })
}

/// A launcher Pod change concerns the VM it is labelled with (its owner reference may be gone).
pub fn vm_of_pod(stores: &Stores, pod: &CachedPod) -> Vec<ObjectRef<VirtualMachine>> {
    let labels = pod.labels();
    let label = labels.get(names::VM_LABEL).or_else(|| labels.get(names::COPY_FOR_LABEL));
    let (Some(label), Some(ns)) = (label, pod.namespace()) else { return Vec::new() };
    if label.len() < 63 {
        // Not shortened: the label is the VM's name.
        return vec![ObjectRef::new(label).within(&ns)];
    }
    vms_in(stores, Some(ns), |vm| names::label_value(&vm.name_any()) == *label)
}
