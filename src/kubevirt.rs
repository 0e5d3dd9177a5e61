//! The KubeVirt runtime's IO: whether the cluster serves KubeVirt's VirtualMachineInstance API,
//! and the cache of the VirtualMachineInstances vmkeep made. The decisions (which runtime, what
//! a VMI means for the VM's status) are pure, in [`crate::plan::runtime`]; the manifest is
//! [`crate::plan::build::virtual_machine_instance`]; fencing asks the API server in
//! [`crate::claim`].
//!
//! KubeVirt may be installed (or removed) while vmkeep runs, and vmkeep needs no permission on
//! its API unless a VM uses it. So nothing here runs until something asks for KubeVirt
//! ([`Instances::want`]: the operator's `--runtime` is `kubevirt` or `auto`, or a VM's Template
//! or status names it). Then API discovery is asked every [`PROBE_INTERVAL`] until the API is
//! served, and once it is, VirtualMachineInstances labelled as vmkeep's are watched into a
//! cache; each change wakes the VM named like the VMI. A 404 (KubeVirt removed) goes back to
//! probing, a 403 is shown to the VMs as the reason they cannot run.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        reflector::{self, ObjectRef, Store},
        watcher::{self, Event},
    },
};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    api::VirtualMachine,
    plan::{build, cached::CachedVmi, names, runtime::KubevirtApi},
};

/// How often API discovery is asked whether KubeVirt's API is served, while it is not.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// `kubevirt.io/v1` `VirtualMachineInstance` for kube's dynamic API.
pub fn instance_resource() -> kube::api::ApiResource {
    build::virtual_machine_instance_resource()
}

/// The `virtualmachineinstances.kubevirt.io` CRD as generated from KubeVirt's types (the crate
/// `k8s-crds-kube-virt`, which vmkeep builds VMIs with), for tests that play KubeVirt on a
/// cluster without it. Not what KubeVirt's operator installs (that one has more versions and
/// printer columns), but the same `v1` schema and a status subresource.
pub fn instance_crd() -> CustomResourceDefinition {
    use kube_core_kubevirt::CustomResourceExt;
    let crd = k8s_crds_kube_virt::virtualmachineinstances::VirtualMachineInstance::crd();
    // The crate builds on another k8s-openapi: the same JSON, read into this crate's type.
    let mut json = serde_json::to_value(crd).expect("a CRD serializes");
    drop_null_enum_values(&mut json);
    serde_json::from_value(json).expect("the CRD reads as apiextensions.k8s.io/v1")
}

/// Removes `null` from every `enum` list of a schema: kopium writes it for optional enums
/// (which are `nullable: true` already), and the API server of Kubernetes 1.20 refuses such a
/// CRD (422, "per-version schemas may not all be set to identical values"; kubectl: unknown
/// object type "nil" in `...memLock.enum`). Found with `spec.domain.rebootPolicy` and
/// `spec.domain.memory.reservedOverhead.memLock`.
fn drop_null_enum_values(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::Array(values)) = map.get_mut("enum") {
                values.retain(|v| !v.is_null());
                if values.is_empty() {
                    map.remove("enum");
                }
            }
            map.values_mut().for_each(drop_null_enum_values);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_null_enum_values),
        _ => {}
    }
}

/// Whether the cluster serves `kubevirt.io/v1` `virtualmachineinstances` (API discovery).
pub async fn served(client: &Client) -> Result<bool, kube::Error> {
    match client.list_api_group_resources("kubevirt.io/v1").await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == "virtualmachineinstances")),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// The VirtualMachineInstances vmkeep made, and what vmkeep knows of their API.
#[derive(Clone)]
pub struct Instances {
    /// The cached VMIs (empty until [`KubevirtApi::Ready`]).
    pub store: Store<CachedVmi>,
    state: watch::Receiver<KubevirtApi>,
    wanted: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

impl Instances {
    /// What is known of KubeVirt's API now.
    pub fn state(&self) -> KubevirtApi {
        self.state.borrow().clone()
    }

    /// Asks for KubeVirt: the first call starts the probe and, once served, the watch.
    pub fn want(&self) {
        if !self.wanted.swap(true, Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    /// The cached VMI `name` in `namespace`.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<CachedVmi>> {
        self.store.get(&ObjectRef::new(name).within(namespace))
    }
}

/// Runs the probe and the watch behind [`Instances`].
pub struct Runner {
    writer: reflector::store::Writer<CachedVmi>,
    state: watch::Sender<KubevirtApi>,
    wanted: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

/// A new cache of VMIs and its runner; `wanted` starts the runner at once.
pub fn instances(wanted: bool) -> (Instances, Runner) {
    let (store, writer) = reflector::store();
    let (tx, rx) = watch::channel(KubevirtApi::Unknown);
    let (wanted, wake) = (Arc::new(AtomicBool::new(wanted)), Arc::new(Notify::new()));
    let instances = Instances { store, state: rx, wanted: wanted.clone(), wake: wake.clone() };
    (instances, Runner { writer, state: tx, wanted, wake })
}

/// Where the runner sends what a VMI change concerns.
pub struct Triggers {
    /// The VM named like the VMI.
    pub vms: mpsc::Sender<ObjectRef<VirtualMachine>>,
    /// The VMI itself.
    pub instances: mpsc::Sender<CachedVmi>,
}

/// Why a watch ended.
enum Ended {
    /// 404: KubeVirt's API is gone, or not served yet by a restarted API server.
    NotFound,
    /// 403: vmkeep may not watch VMIs (why).
    Forbidden(String),
    Shutdown,
}

/// How many API discovery failures in a row make KubeVirt's API `Unusable` (before: retried
/// every second, the state unchanged).
const DISCOVERY_FAILURES: u32 = 3;

impl Runner {
    /// Probes and watches until `shutdown`; every VMI change sends the VM of the same name to
    /// `triggers.vms` (the VM controller's trigger) and the VMI to `triggers.instances` (the
    /// sweep of what an orphaning deletion leaves behind, src/controller/orphans.rs).
    pub async fn run(
        mut self,
        client: Client,
        namespace: Option<String>,
        triggers: Triggers,
        shutdown: CancellationToken,
    ) {
        while !self.wanted.load(Ordering::SeqCst) {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = shutdown.cancelled() => return,
            }
        }
        let mut discovery_failures = 0u32;
        loop {
            let mut next_probe = PROBE_INTERVAL;
            match served(&client).await {
                Ok(true) => {
                    discovery_failures = 0;
                    info!("the cluster serves KubeVirt's VirtualMachineInstance API: watching vmkeep's instances");
                    // An Unusable state stays until a list succeeds (Ready at its end).
                    self.state.send_if_modified(|s| match s {
                        KubevirtApi::Unusable(_) | KubevirtApi::Syncing => false,
                        _ => {
                            *s = KubevirtApi::Syncing;
                            true
                        }
                    });
                    match self.watch(&client, namespace.as_deref(), &triggers, &shutdown).await {
                        Ended::Shutdown => return,
                        Ended::NotFound => {
                            // Removed, or an API server that just restarted and serves its
                            // CRDs a moment later: VMs wait (their VMIs are not seen) until
                            // discovery says which, in a second.
                            warn!("watching VirtualMachineInstances: 404; asking API discovery again");
                            self.state.send_replace(KubevirtApi::Syncing);
                            next_probe = Duration::from_secs(1);
                        }
                        Ended::Forbidden(why) => {
                            self.state.send_replace(KubevirtApi::Unusable(why));
                        }
                    }
                }
                Ok(false) => {
                    discovery_failures = 0;
                    // Gone for sure: forget what was cached (every VMI went with the API).
                    self.writer.apply_watcher_event(&Event::Init);
                    self.writer.apply_watcher_event(&Event::InitDone);
                    self.state
                        .send_if_modified(|s| std::mem::replace(s, KubevirtApi::NotServed) != KubevirtApi::NotServed);
                }
                Err(error) => {
                    warn!(%error, "cannot ask API discovery whether KubeVirt is installed");
                    discovery_failures += 1;
                    // A passing error leaves the state as it is (VMs that need it wait).
                    if discovery_failures >= DISCOVERY_FAILURES {
                        let why = format!("API discovery of kubevirt.io/v1 failed: {error}");
                        self.state.send_replace(KubevirtApi::Unusable(why));
                    } else {
                        next_probe = Duration::from_secs(1);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(next_probe) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Watches vmkeep's VMIs into the cache until the API is gone or `shutdown`.
    async fn watch(
        &mut self,
        client: &Client,
        namespace: Option<&str>,
        triggers: &Triggers,
        shutdown: &CancellationToken,
    ) -> Ended {
        let api: Api<CachedVmi> = match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let config = watcher::Config::default().labels(names::MANAGED_SELECTOR);
        let mut stream = watcher::watcher(api, config).boxed();
        let mut failures = 0u32;
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                _ = shutdown.cancelled() => return Ended::Shutdown,
            };
            let Some(next) = next else { return Ended::NotFound };
            match next {
                Ok(event) => {
                    failures = 0;
                    self.writer.apply_watcher_event(&event);
                    match &event {
                        Event::InitDone => {
                            self.state.send_replace(KubevirtApi::Ready);
                        }
                        Event::Apply(vmi) | Event::Delete(vmi) | Event::InitApply(vmi) => {
                            // Waits when the controllers lag: a settled VM has no requeue to
                            // make up for a lost wake-up.
                            if let Some(ns) = vmi.namespace() {
                                let _ = triggers.vms.send(ObjectRef::new(&vmi.name_any()).within(&ns)).await;
                            }
                            if !matches!(event, Event::Delete(_)) {
                                let _ = triggers.instances.send(vmi.clone()).await;
                            }
                        }
                        Event::Init => {}
                    }
                }
                Err(error) => {
                    let code = api_code(&error);
                    if code == Some(404) {
                        return Ended::NotFound;
                    }
                    if code == Some(403) {
                        // A fresh watch lists again once allowed (kube's watcher resumes a
                        // forbidden watch without a new list, so Ready would never come back).
                        return Ended::Forbidden(format!(
                            "vmkeep may not watch VirtualMachineInstances ({error}); with the Helm chart set runtime (or kubevirt.enabled) to grant it"
                        ));
                    }
                    warn!(%error, "watching VirtualMachineInstances failed");
                    failures = (failures + 1).min(5);
                    let backoff = Duration::from_millis(500 << failures);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return Ended::Shutdown,
                    }
                }
            }
        }
    }
}

/// The HTTP status of a watch error that came from the API server.
fn api_code(error: &watcher::Error) -> Option<u16> {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(e))
        | watcher::Error::WatchStartFailed(kube::Error::Api(e))
        | watcher::Error::WatchFailed(kube::Error::Api(e)) => Some(e.code),
        watcher::Error::WatchError(e) => Some(e.code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_generated_crd_is_kubevirts_v1_with_a_status_subresource() {
        let crd = super::instance_crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("virtualmachineinstances.kubevirt.io"));
        assert_eq!(crd.spec.names.kind, "VirtualMachineInstance");
        let v1 = crd.spec.versions.iter().find(|v| v.name == "v1").expect("v1");
        assert!(v1.served && v1.storage);
        assert!(v1.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
        fn null_enums(value: &serde_json::Value) -> usize {
            match value {
                serde_json::Value::Object(map) => {
                    let here = map
                        .get("enum")
                        .and_then(|e| e.as_array())
                        .map_or(0, |e| e.iter().filter(|v| v.is_null()).count());
                    here + map.values().map(null_enums).sum::<usize>()
                }
                serde_json::Value::Array(items) => items.iter().map(null_enums).sum(),
                _ => 0,
            }
        }
        assert_eq!(null_enums(&serde_json::to_value(&crd).unwrap()), 0, "the API server refuses a null in an enum");
        let mut raw = serde_json::json!({"enum": ["a", null], "x": [{"enum": [null]}]});
        super::drop_null_enum_values(&mut raw);
        assert_eq!(raw, serde_json::json!({"enum": ["a"], "x": [{}]}));
    }
}
