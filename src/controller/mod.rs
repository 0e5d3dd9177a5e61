//! The controllers: one module per kind (observe -> plan -> apply -> status), the [`Context`]
//! they share, and the wiring of who watches what.

mod apply;
mod events;
mod image;
pub mod informer;
mod orphans;
mod template;
mod virtual_machine;

use std::{sync::Arc, time::Duration};

use futures::{FutureExt, StreamExt, future::BoxFuture};
use informer::Informer;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::PersistentVolumeClaim, storage::v1::StorageClass};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::DynamicObject,
    core::DeserializeGuard,
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::Reporter,
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::{
    api::{Image, Template, VirtualMachine},
    claim::{self, Claims},
    metrics::{FailureLabels, Metrics, ReconcileLabels},
    plan::{
        build,
        cached::{CachedPod, CachedPvc},
        clone::{self, ClassInfo, CloneStrategy},
        names, virtual_machine as plan,
    },
    write::{self, Writes},
};

/// Operator settings the controllers use.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The container image of launcher Pods.
    pub launcher_image: String,
    /// The access mode of PVCs vmkeep creates (`ReadWriteOnce`, or `ReadWriteOncePod`).
    pub access_mode: String,
    /// How many objects of one kind are reconciled at once.
    pub concurrency: u16,
    /// Watch and act in this namespace only (all namespaces when `None`).
    pub namespace: Option<String>,
    /// The clone strategy when a StorageClass does not name one (`None`: `csi-clone` where the
    /// storage can clone, else `copy`); see [`crate::plan::clone`].
    pub clone_strategy: Option<CloneStrategy>,
    /// What runs VMs whose Template names no runtime (`--runtime`): `launcher`, `kubevirt`
    /// or `auto` (see [`crate::plan::runtime`]).
    pub runtime: crate::api::template::Runtime,
    /// vCPUs per requested CPU of launcher Pods (`--cpu-allocation-ratio`, at least 1; KubeVirt's
    /// `cpuAllocationRatio`): see [`crate::plan::build::launcher_cpu_request`].
    pub cpu_allocation_ratio: u32,
}

impl Settings {
    /// The API of `K` in the namespaces this operator serves.
    fn api<K>(&self, client: &Client) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
}

/// The caches every controller reads (never writes).
#[derive(Clone)]
pub struct Stores {
    pub images: Store<Image>,
    pub templates: Store<Template>,
    pub vms: Store<VirtualMachine>,
    /// vmkeep's PVCs and Pods, in their compact cached forms.
    pub pvcs: Store<CachedPvc>,
    pub pods: Store<CachedPod>,
    pub leases: Store<Lease>,
    /// How many of the [`KINDS`] caches have listed once.
    synced: tokio::sync::watch::Receiver<usize>,
}

/// The kinds vmkeep caches: Image, Template, VirtualMachine, PVC, Pod, Lease.
const KINDS: usize = 6;

impl Stores {
    /// Waits until every cache has listed once, so no decision is made from an empty cache.
    pub async fn ready(&self) {
        let mut synced = self.synced.clone();
        let _ = synced.wait_for(|n| *n >= KINDS).await;
    }

    /// The cached Image `name` in `namespace`.
    pub fn image(&self, namespace: &str, name: &str) -> Option<Arc<Image>> {
        self.images.get(&ObjectRef::new(name).within(namespace))
    }

    /// The cached Template `name` in `namespace`.
    pub fn template(&self, namespace: &str, name: &str) -> Option<Arc<Template>> {
        self.templates.get(&ObjectRef::new(name).within(namespace))
    }
}

/// What every reconciler shares.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub recorder: events::Events,
    pub stores: Stores,
    pub settings: Settings,
    /// Every write goes through here (timeout, count by outcome).
    pub writes: Writes,
    /// Every claim read, take and release goes through here.
    pub claims: Claims,
    /// When this replica deleted each launcher Pod still going, by Pod uid (for
    /// `vmkeep_launcher_stop_seconds`).
    pub stopping: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// KubeVirt's API and vmkeep's VirtualMachineInstances (the `kubevirt` runtime).
    pub kubevirt: crate::kubevirt::Instances,
    /// What [`storage_class`] last read of each StorageClass, and when.
    pub classes: std::sync::Mutex<std::collections::HashMap<Option<String>, (std::time::Instant, ClassInfo)>>,
}

/// Why a reconcile failed; [`Error::reason`] is stable (logs, metrics).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A read from the API server failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A write failed or timed out.
    #[error(transparent)]
    Write(#[from] write::Error),
    /// Reading, taking or releasing a claim failed.
    #[error("claim: {0}")]
    Claim(#[from] claim::Error),
    /// The object changed since it was read (a finalizer patch's test failed).
    #[error("changed concurrently: {0}")]
    Conflict(String),
    #[error("the object has no namespace")]
    MissingNamespace,
    #[error("cannot serialize: {0}")]
    Serialize(#[from] serde_json::Error),
}

impl Error {
    /// The stable reason of this error, for the failure metric and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Conflict(_) => "Conflict",
            Error::Write(e) | Error::Claim(claim::Error::Write(e)) => match e {
                write::Error::Timeout { .. } => "WriteTimeout",
                _ if e.code() == Some(409) => "Conflict",
                _ => "WriteFailed",
            },
            Error::Kube(_) | Error::Claim(claim::Error::Read { .. }) => "ReadFailed",
            Error::MissingNamespace | Error::Claim(claim::Error::MissingNamespace) => "MissingNamespace",
            Error::Serialize(_) => "SerializeError",
        }
    }
}

/// Retries soon after a conflict (someone else changed the object: read it again), later after
/// anything else.
fn error_policy<K: Resource<DynamicType = ()>>(kind: &'static str) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> Action {
    move |obj, error, _ctx| match error {
        Error::Conflict(_) => {
            tracing::debug!(kind, name = %obj.name_any(), %error, "retrying after a conflict");
            Action::requeue(Duration::from_millis(200))
        }
        Error::Write(e) | Error::Claim(claim::Error::Write(e)) if e.code() == Some(409) => {
            tracing::debug!(kind, name = %obj.name_any(), %error, "retrying after a conflict");
            Action::requeue(Duration::from_millis(200))
        }
        _ => {
            warn!(kind, name = %obj.name_any(), namespace = ?obj.namespace(), %error, "reconcile failed");
            Action::requeue(Duration::from_secs(5))
        }
    }
}

/// The one reconcile wrapper of every kind: waits until the caches are ready, counts the
/// reconcile, times it, counts failures by reason, and runs it in a span naming the object.
fn instrumented<K, F, Fut>(
    kind: &'static str,
    reconcile: F,
) -> impl FnMut(Arc<K>, Arc<Context>) -> BoxFuture<'static, Result<Action, Error>>
where
    K: Resource<DynamicType = ()> + Send + Sync + 'static,
    F: Fn(Arc<K>, Arc<Context>) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    move |obj, ctx| {
        async move {
            ctx.stores.ready().await;
            let labels = ReconcileLabels { kind };
            ctx.metrics.reconciliations.get_or_create(&labels).inc();
            let started = std::time::Instant::now();
            let span = info_span!("reconcile", kind, name = %obj.name_any(), namespace = ?obj.namespace());
            let result = reconcile(obj, ctx.clone()).instrument(span).await;
            ctx.metrics.reconcile_duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
            if let Err(error) = &result {
                ctx.metrics.failures.get_or_create(&FailureLabels { kind, reason: error.reason() }).inc();
            }
            result
        }
        .boxed()
    }
}

fn managed() -> watcher::Config {
    watcher::Config::default().labels(names::MANAGED_SELECTOR)
}

/// Runs every controller until `shutdown` is cancelled, then lets in-flight reconciles finish.
pub async fn run(client: Client, metrics: Arc<Metrics>, settings: Settings, shutdown: CancellationToken) {
    let all = watcher::Config::default;
    let reporter = Reporter { controller: "vmkeep".into(), instance: std::env::var("POD_NAME").ok() };
    let recorder = events::Events::new(client.clone(), reporter);
    let writes = Writes::new(metrics.clone());
    let malformed =
        informer::Malformed { recorder: recorder.clone(), metrics: metrics.clone(), writes: writes.clone() };
    let (synced, synced_rx) = tokio::sync::watch::channel(0);
    let synced = Arc::new(synced);
    let (mut images, images_w) = Informer::new(settings.api::<DeserializeGuard<Image>>(&client), all());
    let (mut templates, templates_w) = Informer::new(settings.api::<DeserializeGuard<Template>>(&client), all());
    let (mut vms, vms_w) = Informer::new(settings.api::<DeserializeGuard<VirtualMachine>>(&client), all());
    // Children and claims: only what vmkeep made (label-selected).
    let (mut pvcs, pvcs_w) = Informer::new(settings.api::<DeserializeGuard<CachedPvc>>(&client), managed());
    let (mut pods, pods_w) = Informer::new(settings.api::<DeserializeGuard<CachedPod>>(&client), managed());
    let (mut leases, leases_w) = Informer::new(settings.api::<DeserializeGuard<Lease>>(&client), managed());

    let stores = Stores {
        images: images.store.clone(),
        templates: templates.store.clone(),
        vms: vms.store.clone(),
        pvcs: pvcs.store.clone(),
        pods: pods.store.clone(),
        leases: leases.store.clone(),
        synced: synced_rx,
    };
    let client_for_watch = client.clone();
    // The KubeVirt runtime's cache, started when something asks for it; a VMI change wakes
    // the VM of the same name.
    let (kubevirt, kubevirt_runner) =
        crate::kubevirt::instances(settings.runtime != crate::api::template::Runtime::Launcher);
    let (vms_tx, vms_rx) = tokio::sync::mpsc::channel(1024);
    let (vmis_tx, vmis_rx) = tokio::sync::mpsc::channel(1024);
    let triggers = crate::kubevirt::Triggers { vms: vms_tx, instances: vmis_tx };
    let kubevirt_task = kubevirt_runner.run(client.clone(), settings.namespace.clone(), triggers, shutdown.clone());
    let vmi_changes = futures::stream::unfold(vms_rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let vmis = futures::stream::unfold(vmis_rx, |mut rx| async move { rx.recv().await.map(|v| (Ok(v), rx)) });
    let ctx = Arc::new(Context {
        recorder,
        claims: Claims::new(client.clone(), Some(writes.clone())).with_kubevirt(kubevirt.clone()),
        writes,
        client,
        metrics,
        stores: stores.clone(),
        settings: settings.clone(),
        stopping: Default::default(),
        kubevirt,
        classes: Default::default(),
    });
    // A short debounce folds a burst of events about one object (its PVC binding, its Pod
    // appearing) into one reconcile, and so into one status write.
    let config = kube::runtime::controller::Config::default()
        .concurrency(settings.concurrency)
        .debounce(Duration::from_millis(300));

    let vm_ctl = {
        let (by_template, by_image, by_lease, by_pod) =
            (stores.clone(), stores.clone(), stores.clone(), stores.clone());
        Controller::for_stream(vms.subscribe(), stores.vms.clone())
            .with_config(config.clone())
            .owns_stream(pvcs.subscribe_view(informer::pvc_view))
            // A launcher Pod by the VM name it is labelled with, not its owner reference (which an
            // orphaning deletion removes): its deletion is what fencing waits for.
            .watches_stream(pods.subscribe_view(informer::pod_view), move |p| virtual_machine::vm_of_pod(&by_pod, &p))
            // Only changes VMs read: an Image's status counts move with every VM, and waking
            // every VM of a busy image each time made reconciles grow with the square of VMs.
            .watches_stream(templates.subscribe_view(plan::template_view), move |t| {
                virtual_machine::vms_of_template(&by_template, &t)
            })
            .watches_stream(images.subscribe_view(plan::image_view), move |i| {
                virtual_machine::vms_of_image(&by_image, &i)
            })
            .watches_stream(leases.subscribe(), move |l| virtual_machine::vms_of_lease(&by_lease, &l))
            // A VirtualMachineInstance by its name, the VM's.
            .reconcile_on(vmi_changes)
            .graceful_shutdown_on(shutdown.clone().cancelled_owned())
            .run(
                instrumented("VirtualMachine", virtual_machine::reconcile),
                error_policy("VirtualMachine"),
                ctx.clone(),
            )
            .for_each(|_| async {})
    };
    // PVCs vmkeep did not make, as metadata only and not cached: an Image that adopts one
    // (`source.pvc`) sees it bind or grow within seconds.
    let foreign_pvcs = watcher(
        settings.api::<kube::core::PartialObjectMeta<PersistentVolumeClaim>>(&client_for_watch),
        watcher::Config::default().labels(&format!("{}!={}", names::MANAGED_BY, names::MANAGER)),
    )
    .default_backoff()
    .touched_objects();
    let image_ctl = {
        let (by_image, by_pod, by_vm, by_pvc, by_own) =
            (stores.clone(), stores.clone(), stores.clone(), stores.clone(), stores.clone());
        Controller::for_stream(images.subscribe(), stores.images.clone())
            .with_config(config.clone())
            .owns_stream(pvcs.subscribe_view(informer::pvc_view))
            .watches_stream(vms.subscribe(), move |vm| image::images_of_vm(&by_vm, vm))
            .watches_stream(leases.subscribe(), image::image_of_lease)
            // The claims of a VM removed by force are released once its last launcher Pod is gone.
            .watches_stream(pods.subscribe_view(informer::pod_view), move |p| image::images_of_pod(&by_pod, &p))
            .watches_stream(images.subscribe(), move |i| image::clones_of(&by_image, &i))
            .watches_stream(foreign_pvcs, move |p| image::images_adopting(&by_pvc, &p))
            // Its own PVC has no owner reference (no propagation policy may take it): by label.
            .watches_stream(pvcs.subscribe_view(informer::pvc_view), move |p| image::image_of_pvc(&by_own, &p))
            .graceful_shutdown_on(shutdown.clone().cancelled_owned())
            .run(instrumented("Image", image::reconcile), error_policy("Image"), ctx.clone())
            .for_each(|_| async {})
    };
    // What a VM deleted with `--cascade=orphan` leaves behind (src/controller/orphans.rs).
    let orphan_pvcs = Controller::for_stream(pvcs.subscribe(), stores.pvcs.clone())
        .with_config(config.clone())
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(orphans::reconcile, error_policy("PersistentVolumeClaim"), ctx.clone())
        .for_each(|_| async {});
    let orphan_pods = Controller::for_stream(pods.subscribe(), stores.pods.clone())
        .with_config(config.clone())
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(orphans::reconcile, error_policy("Pod"), ctx.clone())
        .for_each(|_| async {});
    // What an orphaning deletion of a VM leaves of its VirtualMachineInstance.
    let orphan_vmis = Controller::for_stream(vmis, ctx.kubevirt.store.clone())
        .with_config(config.clone())
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(orphans::reconcile, error_policy("VirtualMachineInstance"), ctx.clone())
        .for_each(|_| async {});
    let template_ctl = {
        let by_image = stores.clone();
        Controller::for_stream(templates.subscribe(), stores.templates.clone())
            .with_config(config)
            .watches_stream(vms.subscribe(), template::template_of_vm)
            .watches_stream(images.subscribe_view(plan::image_view), move |i| {
                template::templates_of_image(&by_image, &i)
            })
            .graceful_shutdown_on(shutdown.clone().cancelled_owned())
            .run(instrumented("Template", template::reconcile), error_policy("Template"), ctx.clone())
            .for_each(|_| async {})
    };
    let informers = async {
        tokio::join!(
            images.run(images_w, synced.clone(), malformed.clone(), shutdown.clone()),
            templates.run(templates_w, synced.clone(), malformed.clone(), shutdown.clone()),
            vms.run(vms_w, synced.clone(), malformed.clone(), shutdown.clone()),
            pvcs.run(pvcs_w, synced.clone(), malformed.clone(), shutdown.clone()),
            pods.run(pods_w, synced.clone(), malformed.clone(), shutdown.clone()),
            leases.run(leases_w, synced.clone(), malformed.clone(), shutdown.clone()),
        )
    };
    tokio::join!(informers, vm_ctl, image_ctl, template_ctl, orphan_pvcs, orphan_pods, orphan_vmis, kubevirt_task);
}

/// How long what [`storage_class_reused`] read of an existing class is used again: a change to
/// a StorageClass (its clone-strategy annotation) reaches new VM clones within this time.
/// Reading the class for every VM whose clone is made cost a request per VM (the benchmark,
/// docs/performance.md). A class not found, and the VolumeSnapshotClasses, are read each time.
const CLASS_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// What the clone strategy needs of StorageClass `name` (the cluster's default class when
/// `None`); an unknown class is all `None` (`csi-clone` is then tried). The VolumeSnapshotClass
/// for its driver is looked up only when `snapshot` is asked for (by the class or the operator).
pub async fn storage_class(ctx: &Context, name: Option<&str>) -> Result<ClassInfo, Error> {
    let info = read_storage_class(ctx, name).await?;
    with_snapshot_class(ctx, info).await
}

/// [`storage_class`] for the clones of VMs, one per VM: the StorageClass is read from the API
/// server at most once per [`CLASS_TTL`] (the Image controller's reads, fewer and deciding
/// binding and expansion, stay fresh).
pub async fn storage_class_reused(ctx: &Context, name: Option<&str>) -> Result<ClassInfo, Error> {
    let key = name.map(str::to_owned);
    let cached = ctx.classes.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
    let info = match cached {
        Some((read, info)) if read.elapsed() < CLASS_TTL => info,
        _ => {
            let info = read_storage_class(ctx, name).await?;
            if info.provisioner.is_some() {
                let entry = (std::time::Instant::now(), info.clone());
                ctx.classes.lock().unwrap_or_else(|e| e.into_inner()).insert(key, entry);
            }
            info
        }
    };
    with_snapshot_class(ctx, info).await
}

/// `info` with the VolumeSnapshotClass for its driver, when `snapshot` is asked for.
async fn with_snapshot_class(ctx: &Context, mut info: ClassInfo) -> Result<ClassInfo, Error> {
    let asked = info.annotation.as_deref().and_then(CloneStrategy::parse).or(ctx.settings.clone_strategy);
    if let (Some(CloneStrategy::Snapshot), Some(driver)) = (asked, info.provisioner.as_deref()) {
        match snapshot_class(ctx, driver).await? {
            Ok(class) => info.snapshot_class = Some(class),
            Err(why) => info.snapshot_unavailable = Some(why),
        }
    }
    Ok(info)
}

/// The StorageClass `name` (the default one when `None`) as [`ClassInfo`], without the
/// snapshot fields.
async fn read_storage_class(ctx: &Context, name: Option<&str>) -> Result<ClassInfo, Error> {
    let api: Api<StorageClass> = Api::all(ctx.client.clone());
    let class = match name {
        Some(name) => api.get_opt(name).await?,
        None => api.list(&Default::default()).await?.items.into_iter().find(|c| {
            c.annotations().get("storageclass.kubernetes.io/is-default-class").map(String::as_str) == Some("true")
        }),
    };
    let Some(c) = class else {
        return Ok(ClassInfo { name: name.map(str::to_owned), ..Default::default() });
    };
    Ok(ClassInfo {
        name: Some(c.name_any()),
        annotation: c.annotations().get(clone::STRATEGY_ANNOTATION).cloned(),
        binds_late: c.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer"),
        allows_expansion: c.allow_volume_expansion == Some(true),
        provisioner: Some(c.provisioner),
        snapshot_class: None,
        snapshot_unavailable: None,
    })
}

/// The VolumeSnapshotClass for CSI `driver` (the one annotated default, else the first by
/// name), or why there is none: the cluster serves no `snapshot.storage.k8s.io/v1`, or no
/// class names that driver.
async fn snapshot_class(ctx: &Context, driver: &str) -> Result<Result<String, String>, Error> {
    let api: Api<DynamicObject> = Api::all_with(ctx.client.clone(), &build::volume_snapshot_class_resource());
    let classes = match api.list(&Default::default()).await {
        Ok(list) => list.items,
        Err(kube::Error::Api(e)) if e.code == 404 => {
            return Ok(Err("the cluster serves no snapshot.storage.k8s.io/v1 API (no CSI snapshot controller)".into()));
        }
        Err(e) => return Err(e.into()),
    };
    let mut matching: Vec<&DynamicObject> =
        classes.iter().filter(|c| c.data.get("driver").and_then(|d| d.as_str()) == Some(driver)).collect();
    matching.sort_by_key(|c| {
        let default = c.annotations().get("snapshot.storage.kubernetes.io/is-default-class").map(String::as_str);
        (default != Some("true"), c.name_any())
    });
    Ok(match matching.first() {
        Some(c) => Ok(c.name_any()),
        None => Err(format!("no VolumeSnapshotClass names driver {driver}")),
    })
}
