//! A test double of KubeVirt for one namespace, and KubeVirt's VirtualMachineInstance CRD.
//!
//! KubeVirt cannot run on the test cluster (no images, no registry, no nested virtualization to
//! speak of), so [`Kubevirt`] plays the two parts of it that vmkeep deals with:
//!
//! - **virt-controller**: for each new VirtualMachineInstance it adds KubeVirt's finalizer and
//!   creates the virt-launcher Pod as KubeVirt does (`generateName: virt-launcher-<vmi>-`, labels
//!   `kubevirt.io: virt-launcher` and `kubevirt.io/created-by: <vmi uid>` plus every label of the
//!   VMI, a controller ownerReference to the VMI, the VMI's nodeSelector, tolerations, priority
//!   class and grace period, one volume per `persistentVolumeClaim` volume of the VMI, mounted
//!   into its `compute` container so the kubelet really attaches the PVCs); it follows the Pod
//!   with the VMI's `status.phase`: `Scheduling`, `Scheduled` once the scheduler binds the Pod,
//!   `Running` with `nodeName`, `activePods` and a `Ready` condition True once the Pod runs and is
//!   ready (`Failed` if the Pod ends or vanishes while the VMI lives).
//! - **virt-handler** on deletion: when the VMI has a deletionTimestamp, the Pod is deleted with
//!   the VMI's `terminationGracePeriodSeconds`, the VMI's phase set to `Succeeded`, its
//!   finalizer removed. The Pod then outlives the VMI by [`Kubevirt::start`]'s `linger`: it
//!   carries a finalizer of the double ([`POD_FINALIZER`]) that is removed only `linger` after
//!   the VMI's finalizer was (without it the garbage collector would delete the Pod at once,
//!   its owner being gone). That is the worst order KubeVirt allows, and what vmkeep's fencing
//!   must wait out: a persistent image's claim may go only once the Pod is gone too.
//!
//! **What is simulated and what is not**: there is no QEMU, no libvirt, no guest, no
//! virt-launcher or virt-handler process. Real are the API server, the CRD's schema (the status
//! the double writes passes it), the Pod, its scheduling by the cluster's scheduler, the kubelet
//! attaching the PVCs, and the garbage collector. The `compute` container runs the repository's pause
//! image (`hack/images.sh --print-name pause`) under restricted Pod Security; the disks are
//! attached to the Pod but nothing reads them. The phases, the `Ready` condition, its reasons and
//! messages are the double's own approximation of KubeVirt's, not KubeVirt's code; live
//! migration, guest agent, interfaces, resource overhead, VMI `spec` validation (KubeVirt's
//! admission webhooks) and KubeVirt's own VirtualMachine kind are not played at all. The CRD is
//! the one `k8s-crds-kube-virt` generates ([`vmkeep::kubevirt::instance_crd`]), not the one
//! KubeVirt's operator installs. What the double does, it logs with `eprintln!` (prefix
//! `kubevirt-double`).
//!
//! The double is level-triggered: each pass lists the namespace's VMIs and virt-launcher Pods and
//! does what is missing, after every watch event of either and at least every half second.

use std::{
    collections::{BTreeMap, HashMap},
    sync::OnceLock,
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{PersistentVolumeClaim, Pod},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::{Value, json};
use vmkeep::plan::build::LAUNCHER_UID;

use super::{kubectl, repo, wait_for};

/// KubeVirt's finalizer on a VirtualMachineInstance (virt-controller's).
pub const FINALIZER: &str = "kubevirt.io/virtualMachineControllerFinalize";
/// The double's finalizer on a virt-launcher Pod: keeps it `linger` past its VMI.
pub const POD_FINALIZER: &str = "test.vmkeep.io/virt-launcher-outlives-vmi";
/// The label KubeVirt gives a virt-launcher Pod: the uid of its VMI.
pub const CREATED_BY: &str = "kubevirt.io/created-by";
/// The label selector of virt-launcher Pods.
pub const LAUNCHER_SELECTOR: &str = "kubevirt.io=virt-launcher";
/// The name of KubeVirt's VirtualMachineInstance CRD.
pub const CRD_NAME: &str = "virtualmachineinstances.kubevirt.io";
/// The label the tests put on the CRD they install: a CRD without it is a real KubeVirt's (or
/// someone else's), which the tests never replace or delete.
pub const CRD_MARK: (&str, &str) = ("vmkeep.io/installed-by-test", "kubevirt");

/// The pause image the local node has (`hack/images.sh --print-name pause`).
pub fn pause_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let out = std::process::Command::new("bash")
            .arg(repo().join("hack/images.sh"))
            .args(["--print-name", "pause"])
            .output()
            .expect("cannot run hack/images.sh");
        assert!(out.status.success(), "hack/images.sh --print-name pause failed");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    })
}

/// The VirtualMachineInstances of `namespace` (dynamic: the CRD may come and go).
pub fn vmis(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &vmkeep::kubevirt::instance_resource())
}

/// The virt-launcher Pods of the VMI whose uid is `uid`.
pub async fn launcher_pods(client: &Client, namespace: &str, uid: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector = format!("{LAUNCHER_SELECTOR},{CREATED_BY}={uid}");
    pods.list(&ListParams::default().labels(&selector)).await.expect("list virt-launcher pods").items
}

/// KubeVirt played for one namespace, until dropped. The double runs on a thread of its own
/// with its own runtime and client, so a test that blocks its runtime (kubectl in a `Drop`)
/// does not stop it. Dropping it stops the double and removes its finalizers from the
/// namespace's VMIs and Pods, so nothing waits for a double that is gone.
pub struct Kubevirt {
    namespace: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Kubevirt {
    /// Starts the double in `namespace`; a deleted VMI's Pod goes `linger` after the VMI.
    pub fn start(namespace: &str, linger: Duration) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let ns = namespace.to_owned();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            runtime.block_on(async move {
                let client = super::client().await;
                let double = Double {
                    vmis: vmis(&client, &ns),
                    pods: Api::namespaced(client.clone(), &ns),
                    pvcs: Api::namespaced(client, &ns),
                    linger,
                    released: HashMap::new(),
                    created: HashMap::new(),
                };
                eprintln!("kubevirt-double: playing virt-controller and virt-handler in {ns} (Pods linger {linger:?})");
                tokio::select! {
                    _ = double.run() => {}
                    _ = stopped => {}
                }
            });
        });
        Self { namespace: namespace.to_owned(), stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for Kubevirt {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        release_finalizers(&self.namespace);
    }
}

/// Removes the double's finalizers from the VMIs and virt-launcher Pods of `namespace` (kubectl:
/// this runs in `Drop`).
pub fn release_finalizers(namespace: &str) {
    for (kind, finalizer) in [(CRD_NAME, FINALIZER), ("pods", POD_FINALIZER)] {
        let listed = kubectl(&["get", kind, "-n", namespace, "-o", "json"], None);
        let Ok(list) = serde_json::from_slice::<Value>(&listed.stdout) else { continue };
        for object in list["items"].as_array().into_iter().flatten() {
            let finalizers: Vec<&str> =
                object["metadata"]["finalizers"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            if !finalizers.contains(&finalizer) {
                continue;
            }
            let kept: Vec<&str> = finalizers.into_iter().filter(|f| *f != finalizer).collect();
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            let patch = json!({"metadata": {"finalizers": kept}}).to_string();
            let _ = kubectl(&["patch", kind, name, "-n", namespace, "--type=merge", "-p", &patch], None);
            eprintln!("kubevirt-double: stopped; released its finalizer on {kind} {name}");
        }
    }
}

struct Double {
    vmis: Api<DynamicObject>,
    pods: Api<Pod>,
    pvcs: Api<PersistentVolumeClaim>,
    linger: Duration,
    /// When the finalizer of a VMI (by uid) was removed, or its Pod first found without it.
    released: HashMap<String, Instant>,
    /// The virt-launcher Pod created for each VMI (by uid): one per VMI, as KubeVirt (a VMI
    /// whose Pod vanished is Failed, not given another).
    created: HashMap<String, String>,
}

impl Double {
    async fn run(mut self) {
        let vmi_events = watcher(self.vmis.clone(), watcher::Config::default()).default_backoff().map(|_| ());
        let pod_events = watcher(self.pods.clone(), watcher::Config::default().labels(LAUNCHER_SELECTOR))
            .default_backoff()
            .map(|_| ());
        let mut events = futures::stream::select(vmi_events, pod_events).boxed();
        loop {
            if let Err(error) = self.pass().await {
                eprintln!("kubevirt-double: {error}");
            }
            tokio::select! {
                Some(_) = events.next() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            // Whatever else is ready is seen by the next pass.
            while let Some(Some(_)) = futures::FutureExt::now_or_never(events.next()) {}
        }
    }

    /// One look at every VMI and virt-launcher Pod of the namespace.
    async fn pass(&mut self) -> Result<(), kube::Error> {
        let vmis = match self.vmis.list(&ListParams::default()).await {
            Ok(list) => list.items,
            // No CRD: nothing to play, but orphaned Pods still go.
            Err(kube::Error::Api(e)) if e.code == 404 => Vec::new(),
            Err(e) => return Err(e),
        };
        let pods = self.pods.list(&ListParams::default().labels(LAUNCHER_SELECTOR)).await?.items;
        for vmi in &vmis {
            let uid = vmi.uid().unwrap_or_default();
            let mine: Vec<&Pod> = pods.iter().filter(|p| p.labels().get(CREATED_BY) == Some(&uid)).collect();
            self.instance(vmi, &mine).await?;
        }
        for pod in &pods {
            let owner = pod.labels().get(CREATED_BY).cloned().unwrap_or_default();
            let alive =
                vmis.iter().any(|v| v.uid().as_ref() == Some(&owner) && v.finalizers().iter().any(|f| f == FINALIZER));
            if !alive {
                self.orphan(pod, &owner).await?;
            }
        }
        Ok(())
    }

    /// virt-controller and virt-handler for one VMI.
    async fn instance(&mut self, vmi: &DynamicObject, pods: &[&Pod]) -> Result<(), kube::Error> {
        let (name, uid) = (vmi.name_any(), vmi.uid().unwrap_or_default());
        let has_finalizer = vmi.finalizers().iter().any(|f| f == FINALIZER);
        let status = &vmi.data["status"];
        let phase = status["phase"].as_str().unwrap_or_default();
        if vmi.metadata.deletion_timestamp.is_some() {
            if !has_finalizer {
                return Ok(());
            }
            let grace = grace_seconds(vmi);
            for pod in pods.iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
                let params = DeleteParams { grace_period_seconds: Some(grace as u32), ..DeleteParams::default() };
                ignore_not_found(self.pods.delete(&pod.name_any(), &params).await.map(|_| ()))?;
                eprintln!("kubevirt-double: VMI {name} deleted: deleting Pod {} (grace {grace} s)", pod.name_any());
            }
            let mut version = vmi.resource_version();
            if phase != "Succeeded" {
                let ready =
                    condition("False", "PodTerminating", "the VirtualMachineInstance is being deleted (test double)");
                version = self.set_status(&name, json!({"phase": "Succeeded", "conditions": [ready]})).await?;
            }
            let kept: Vec<&String> = vmi.finalizers().iter().filter(|f| *f != FINALIZER).collect();
            let patch = json!({"metadata": {"finalizers": kept, "resourceVersion": version}});
            ignore_not_found(self.vmis.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ()))?;
            self.released.entry(uid).or_insert_with(Instant::now);
            eprintln!("kubevirt-double: VMI {name} Succeeded, finalizer removed; its Pods go in {:?}", self.linger);
            return Ok(());
        }
        if !has_finalizer {
            let mut finalizers = vmi.finalizers().to_vec();
            finalizers.push(FINALIZER.to_owned());
            let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": vmi.resource_version()}});
            ignore_not_found(self.vmis.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ()))?;
            eprintln!("kubevirt-double: VMI {name}: finalizer added");
            // The next pass goes on with the VMI as patched.
            return Ok(());
        }
        if matches!(phase, "Succeeded" | "Failed") {
            return Ok(());
        }
        let Some(pod) = pods.first() else {
            if let Some(pod) = self.created.get(&uid).filter(|_| !phase.is_empty() && phase != "Pending") {
                let ready =
                    condition("False", "PodNotExists", &format!("virt-launcher Pod {pod} is gone (test double)"));
                self.set_status(&name, json!({"phase": "Failed", "reason": "PodDeleted", "conditions": [ready]}))
                    .await?;
                eprintln!("kubevirt-double: VMI {name} Failed: its Pod {pod} is gone");
                return Ok(());
            }
            if self.created.contains_key(&uid) {
                return Ok(());
            }
            let created = self.pods.create(&PostParams::default(), &self.launcher_pod(vmi).await?).await?;
            let pod = created.name_any();
            eprintln!("kubevirt-double: VMI {name}: created virt-launcher Pod {pod}");
            self.created.insert(uid, pod);
            let ready =
                condition("False", "GuestNotRunning", "the virt-launcher Pod is not scheduled yet (test double)");
            return self.set_status(&name, json!({"phase": "Scheduling", "conditions": [ready]})).await.map(drop);
        };
        self.created.insert(uid, pod.name_any());
        let pod_status = pod.status.clone().unwrap_or_default();
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let pod_ready = pod_status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
        let (want, reason, message) = match (pod_status.phase.as_deref(), &node) {
            (Some("Succeeded" | "Failed"), _) => ("Failed", "GuestNotRunning", "the virt-launcher Pod ended"),
            _ if pod.metadata.deletion_timestamp.is_some() => {
                ("Failed", "PodTerminating", "the virt-launcher Pod is being deleted")
            }
            (Some("Running"), Some(_)) if pod_ready => {
                ("Running", "GuestRunning", "the guest runs (test double: no guest)")
            }
            (_, Some(_)) => ("Scheduled", "GuestNotRunning", "the virt-launcher Pod does not run yet"),
            (_, None) => ("Scheduling", "GuestNotRunning", "the virt-launcher Pod is not scheduled yet"),
        };
        let ready = if want == "Running" { "True" } else { "False" };
        let had_ready = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Ready")
            .map(|c| (c["status"].as_str().unwrap_or_default(), c["reason"].as_str().unwrap_or_default()));
        let same = phase == want
            && status["nodeName"].as_str() == node.as_deref().filter(|_| want != "Scheduling")
            && had_ready == Some((ready, reason));
        if same {
            return Ok(());
        }
        let mut new = json!({
            "phase": want,
            "conditions": [condition(ready, reason, &format!("{message} (test double)"))],
        });
        if want != "Scheduling"
            && let Some(node) = &node
        {
            new["nodeName"] = json!(node);
            new["activePods"] = json!({pod.uid().unwrap_or_default(): node});
        }
        if want == "Failed" {
            new["reason"] = json!("PodFailed");
        }
        self.set_status(&name, new).await?;
        eprintln!("kubevirt-double: VMI {name} {want} (Pod {} on {node:?})", pod.name_any());
        Ok(())
    }

    /// A virt-launcher Pod whose VMI is gone (or finalized): its finalizer goes `linger` after
    /// the VMI's did, and the Pod is deleted then if nothing (the garbage collector) did before.
    async fn orphan(&mut self, pod: &Pod, owner: &str) -> Result<(), kube::Error> {
        let since = *self.released.entry(owner.to_owned()).or_insert_with(Instant::now);
        if since.elapsed() < self.linger {
            return Ok(());
        }
        let name = pod.name_any();
        if pod.finalizers().iter().any(|f| f == POD_FINALIZER) {
            let kept: Vec<&String> = pod.finalizers().iter().filter(|f| *f != POD_FINALIZER).collect();
            let patch = json!({"metadata": {"finalizers": kept, "resourceVersion": pod.resource_version()}});
            ignore_not_found(self.pods.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ()))?;
            eprintln!("kubevirt-double: Pod {name} released, {:?} after its VMI", since.elapsed());
        }
        if pod.metadata.deletion_timestamp.is_none() {
            let params = DeleteParams { grace_period_seconds: Some(1), ..DeleteParams::default() };
            ignore_not_found(self.pods.delete(&name, &params).await.map(|_| ()))?;
            eprintln!("kubevirt-double: Pod {name} deleted: its VMI is gone");
        }
        Ok(())
    }

    /// Merges `status` into the VMI's; returns its new resourceVersion (none if it is gone).
    async fn set_status(&self, name: &str, status: Value) -> Result<Option<String>, kube::Error> {
        let patch = json!({"status": status});
        match self.vmis.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(vmi) => Ok(vmi.resource_version()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The virt-launcher Pod of `vmi`, as virt-controller makes it (in the parts vmkeep sees).
    async fn launcher_pod(&self, vmi: &DynamicObject) -> Result<Pod, kube::Error> {
        let spec = &vmi.data["spec"];
        let mut labels: BTreeMap<String, String> = vmi.labels().clone();
        labels.insert("kubevirt.io".into(), "virt-launcher".into());
        labels.insert(CREATED_BY.into(), vmi.uid().unwrap_or_default());
        let (mut volumes, mut mounts, mut devices) = (Vec::new(), Vec::new(), Vec::new());
        for volume in spec["volumes"].as_array().into_iter().flatten() {
            let Some(claim) = volume["persistentVolumeClaim"].as_object() else { continue };
            let name = volume["name"].as_str().unwrap_or_default();
            let claim_name = claim.get("claimName").and_then(Value::as_str).unwrap_or_default();
            let read_only = claim.get("readOnly").and_then(Value::as_bool).unwrap_or(false);
            volumes
                .push(json!({"name": name, "persistentVolumeClaim": {"claimName": claim_name, "readOnly": read_only}}));
            let block =
                self.pvcs.get_opt(claim_name).await?.and_then(|p| p.spec?.volume_mode).as_deref() == Some("Block");
            if block {
                devices.push(json!({"name": name, "devicePath": format!("/dev/vmi-disks/{name}")}));
            } else {
                let path = format!("/var/run/kubevirt-private/vmi-disks/{name}");
                mounts.push(json!({"name": name, "mountPath": path, "readOnly": read_only}));
            }
        }
        let vmi_name = vmi.name_any();
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": format!("virt-launcher-{vmi_name}-"),
                "labels": labels,
                "finalizers": [POD_FINALIZER],
                "ownerReferences": [{
                    "apiVersion": "kubevirt.io/v1",
                    "kind": "VirtualMachineInstance",
                    "name": vmi_name,
                    "uid": vmi.uid(),
                    "controller": true,
                    "blockOwnerDeletion": true,
                }],
            },
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": false,
                "enableServiceLinks": false,
                "nodeSelector": spec["nodeSelector"],
                "tolerations": spec["tolerations"],
                "priorityClassName": spec["priorityClassName"],
                "terminationGracePeriodSeconds": grace_seconds(vmi),
                // What src/plan/build.rs gives vmkeep's own Pods: restricted Pod Security.
                "securityContext": {
                    "runAsNonRoot": true,
                    "runAsUser": LAUNCHER_UID,
                    "runAsGroup": LAUNCHER_UID,
                    "fsGroup": LAUNCHER_UID,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [{
                    "name": "compute",
                    "image": pause_image(),
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "16Mi"}},
                    "securityContext": {
                        "allowPrivilegeEscalation": false,
                        "readOnlyRootFilesystem": true,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": mounts,
                    "volumeDevices": devices,
                }],
                "volumes": volumes,
            },
        });
        Ok(serde_json::from_value(pod).expect("a Pod"))
    }
}

/// The VMI's `terminationGracePeriodSeconds` (KubeVirt's default 30).
fn grace_seconds(vmi: &DynamicObject) -> i64 {
    vmi.data["spec"]["terminationGracePeriodSeconds"].as_i64().unwrap_or(30)
}

/// A `Ready` condition in the shape the generated CRD wants (metav1.Condition: every field).
fn condition(status: &str, reason: &str, message: &str) -> Value {
    let now = serde_json::to_value(Time(jiff::Timestamp::now())).expect("a time");
    json!({"type": "Ready", "status": status, "reason": reason, "message": message, "lastTransitionTime": now,
           "lastProbeTime": null})
}

fn ignore_not_found(result: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match result {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other,
    }
}

/// Whether the VMI CRD is there, and whose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrdState {
    Absent,
    /// Installed by these tests (it has [`CRD_MARK`]).
    Ours,
    /// Installed by someone else: a real KubeVirt, not to be touched.
    Foreign,
}

fn crds(client: &Client) -> Api<CustomResourceDefinition> {
    Api::all(client.clone())
}

pub async fn crd_state(client: &Client) -> CrdState {
    match crds(client).get_opt(CRD_NAME).await.expect("get the VMI CRD") {
        None => CrdState::Absent,
        Some(crd) if crd.labels().get(CRD_MARK.0).map(String::as_str) == Some(CRD_MARK.1) => CrdState::Ours,
        Some(_) => CrdState::Foreign,
    }
}

/// Why the tests must not install or delete the VMI CRD here, if they must not.
pub async fn foreign_kubevirt(client: &Client) -> Option<String> {
    (crd_state(client).await == CrdState::Foreign)
        .then(|| format!("{CRD_NAME} exists and was not installed by these tests (a real KubeVirt?): not touching it"))
}

/// Installs the VMI CRD ([`vmkeep::kubevirt::instance_crd`], marked as the tests'), and waits
/// until it is Established and API discovery serves `kubevirt.io/v1` VMIs.
pub async fn install_crd(client: &Client) {
    let mut crd = vmkeep::kubevirt::instance_crd();
    crd.metadata.labels.get_or_insert_default().insert(CRD_MARK.0.into(), CRD_MARK.1.into());
    let params = PatchParams::apply("vmkeep-tests").force();
    crds(client).patch(CRD_NAME, &params, &Patch::Apply(&crd)).await.expect("install the VMI CRD");
    wait_for("the VMI CRD to be Established", Duration::from_secs(60), async || {
        let crd = crds(client).get_opt(CRD_NAME).await.expect("get the VMI CRD")?;
        let conditions = crd.status?.conditions?;
        conditions.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
    })
    .await;
    wait_for("API discovery to serve kubevirt.io/v1 VMIs", Duration::from_secs(60), async || {
        vmkeep::kubevirt::served(client).await.ok()?.then_some(())
    })
    .await;
    eprintln!("installed the VMI CRD {CRD_NAME}");
}

/// The VirtualMachineInstance `name` of `namespace`, if any (none when the CRD is absent).
pub async fn vmi(client: &Client, namespace: &str, name: &str) -> Option<DynamicObject> {
    match vmis(client, namespace).get_opt(name).await {
        Ok(found) => found,
        Err(kube::Error::Api(e)) if e.code == 404 => None,
        Err(e) => panic!("get VirtualMachineInstance {name}: {e}"),
    }
}

/// Deletes the VMI CRD if these tests installed it ([`CrdState::Ours`]; a foreign one is never
/// touched), and waits until it is gone and API discovery no longer serves `kubevirt.io/v1`.
pub async fn remove_crd(client: &Client) {
    if crd_state(client).await != CrdState::Ours {
        return;
    }
    match crds(client).delete(CRD_NAME, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => panic!("delete the VMI CRD: {e}"),
    }
    wait_for("the VMI CRD to be gone", Duration::from_secs(120), async || {
        (crd_state(client).await == CrdState::Absent).then_some(())
    })
    .await;
    wait_for("API discovery to stop serving kubevirt.io/v1 VMIs", Duration::from_secs(60), async || {
        (!vmkeep::kubevirt::served(client).await.ok()?).then_some(())
    })
    .await;
    eprintln!("removed the VMI CRD {CRD_NAME}");
}
