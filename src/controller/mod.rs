//! The controllers: one module per kind (observe -> plan -> apply -> status), the [`Context`]
//! they share, and the wiring of who watches what.

mod apply;
mod image;
mod template;
mod virtual_machine;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{PersistentVolumeClaim, Pod},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{
    api::{Image, Template, VirtualMachine},
    metrics::{FailureLabels, Metrics, WriteLabels},
    plan::names,
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
}

/// The caches every controller reads (never writes).
#[derive(Clone)]
pub struct Stores {
    pub images: Store<Image>,
    pub templates: Store<Template>,
    pub vms: Store<VirtualMachine>,
    pub pvcs: Store<PersistentVolumeClaim>,
    pub pods: Store<Pod>,
    pub leases: Store<Lease>,
}

impl Stores {
    /// Waits until every cache has listed once, so no decision is made from an empty cache.
    pub async fn ready(&self) {
        let _ = tokio::join!(
            self.images.wait_until_ready(),
            self.templates.wait_until_ready(),
            self.vms.wait_until_ready(),
            self.pvcs.wait_until_ready(),
            self.pods.wait_until_ready(),
            self.leases.wait_until_ready(),
        );
    }

    pub fn image(&self, namespace: &str, name: &str) -> Option<Arc<Image>> {
        self.images.get(&ObjectRef::new(name).within(namespace))
    }

    pub fn template(&self, namespace: &str, name: &str) -> Option<Arc<Template>> {
        self.templates.get(&ObjectRef::new(name).within(namespace))
    }
}

/// What every reconciler shares.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub stores: Stores,
    pub settings: Settings,
}

impl Context {
    /// Counts an API write the operator is about to make.
    pub fn wrote(&self, resource: &'static str, verb: &'static str) {
        self.metrics.api_writes.get_or_create(&WriteLabels { resource, verb }).inc();
    }
}

/// Why a reconcile failed; the reason is stable (logs, metrics).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the object has no namespace")]
    MissingNamespace,
    #[error("cannot serialize: {0}")]
    Serialize(#[from] serde_json::Error),
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(e)) if e.code == 409 => "Conflict",
            Error::Kube(_) => "KubeError",
            Error::MissingNamespace => "MissingNamespace",
            Error::Serialize(_) => "SerializeError",
        }
    }
}

fn error_policy<K: Resource<DynamicType = ()>>(kind: &'static str) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> Action {
    move |obj, error, ctx| {
        ctx.metrics.failures.get_or_create(&FailureLabels { kind, reason: error.reason() }).inc();
        if error.reason() == "Conflict" {
            tracing::debug!(kind, name = %obj.name_any(), %error, "retrying after a conflict");
            return Action::requeue(Duration::from_millis(200));
        }
        warn!(kind, name = %obj.name_any(), namespace = ?obj.namespace(), %error, "reconcile failed");
        Action::requeue(Duration::from_secs(5))
    }
}

fn managed() -> watcher::Config {
    watcher::Config::default().labels(names::MANAGED_SELECTOR)
}

/// Runs every controller until `shutdown` is cancelled, then lets in-flight reconciles finish.
pub async fn run(client: Client, metrics: Arc<Metrics>, settings: Settings, shutdown: CancellationToken) {
    let images_ctl = Controller::new(Api::<Image>::all(client.clone()), watcher::Config::default());
    let templates_ctl = Controller::new(Api::<Template>::all(client.clone()), watcher::Config::default());
    let vms_ctl = Controller::new(Api::<VirtualMachine>::all(client.clone()), watcher::Config::default());

    // Children and claims: only what vmkeep made (label-selected), cached for every controller.
    let (pvcs, pvc_writer) = reflector::store();
    let pvc_events =
        reflector::reflector(pvc_writer, watcher(Api::<PersistentVolumeClaim>::all(client.clone()), managed()))
            .default_backoff()
            .touched_objects();
    let (pods, pod_writer) = reflector::store();
    let pod_events = reflector::reflector(pod_writer, watcher(Api::<Pod>::all(client.clone()), managed()))
        .default_backoff()
        .touched_objects();
    let (leases, lease_writer) = reflector::store();
    let lease_events = reflector::reflector(lease_writer, watcher(Api::<Lease>::all(client.clone()), managed()))
        .default_backoff()
        .touched_objects();

    let stores = Stores {
        images: images_ctl.store(),
        templates: templates_ctl.store(),
        vms: vms_ctl.store(),
        pvcs,
        pods,
        leases,
    };
    let reporter = Reporter { controller: "vmkeep".into(), instance: std::env::var("POD_NAME").ok() };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        metrics,
        stores: stores.clone(),
        settings: settings.clone(),
    });
    let config = kube::runtime::controller::Config::default().concurrency(settings.concurrency);

    let vm_ctl = {
        let (by_template, by_image, by_lease) = (stores.clone(), stores.clone(), stores.clone());
        vms_ctl
            .with_config(config.clone())
            .owns_stream(pvc_events)
            .owns_stream(pod_events)
            .watches(Api::<Template>::all(client.clone()), watcher::Config::default(), move |t| {
                virtual_machine::vms_of_template(&by_template, &t)
            })
            .watches(Api::<Image>::all(client.clone()), watcher::Config::default(), move |i| {
                virtual_machine::vms_of_image(&by_image, &i)
            })
            .watches_stream(lease_events, move |l| virtual_machine::vms_of_lease(&by_lease, &l))
            .graceful_shutdown_on(shutdown.clone().cancelled_owned())
            .run(virtual_machine::reconcile, error_policy("VirtualMachine"), ctx.clone())
            .for_each(|_| async {})
    };
    let image_ctl = {
        let (by_vm, by_image) = (stores.clone(), stores.clone());
        images_ctl
            .with_config(config.clone())
            .owns(Api::<PersistentVolumeClaim>::all(client.clone()), managed())
            .watches(Api::<VirtualMachine>::all(client.clone()), watcher::Config::default(), move |vm| {
                image::images_of_vm(&by_vm, &vm)
            })
            .watches(Api::<Lease>::all(client.clone()), managed(), image::image_of_lease)
            .watches(Api::<Image>::all(client.clone()), watcher::Config::default(), move |i| {
                image::clones_of(&by_image, &i)
            })
            .graceful_shutdown_on(shutdown.clone().cancelled_owned())
            .run(image::reconcile, error_policy("Image"), ctx.clone())
            .for_each(|_| async {})
    };
    let template_ctl = {
        let by_image = stores.clone();
        templates_ctl
            .with_config(config)
            .watches(Api::<VirtualMachine>::all(client.clone()), watcher::Config::default(), template::template_of_vm)
            .watches(Api::<Image>::all(client), watcher::Config::default(), move |i| {
                template::templates_of_image(&by_image, &i)
            })
            .graceful_shutdown_on(shutdown.cancelled_owned())
            .run(template::reconcile, error_policy("Template"), ctx.clone())
            .for_each(|_| async {})
    };
    tokio::join!(vm_ctl, image_ctl, template_ctl);
}
