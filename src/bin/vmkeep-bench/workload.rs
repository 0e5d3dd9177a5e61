//! What the bench creates and watches: namespaces, the CRDs when missing, Images, Templates and
//! VirtualMachines; time to `Starting` per VM; and the floor, a minimal client creating the very
//! PVCs and Pods vmkeep made.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::serde::{Serialize, de::DeserializeOwned};
use k8s_openapi::{
    api::core::v1::{Namespace, PersistentVolumeClaim, Pod, ServiceAccount},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        wait::{await_condition, conditions::is_crd_established},
        watcher::{self, Event},
    },
};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use vmkeep::{
    api::{ConditionStatus, Image, Template, VirtualMachine, virtual_machine::VirtualMachinePhase},
    plan::{conditions::find, names, template},
};

/// A client for `kubeconfig` that says who it is in the `User-Agent` header (the audit log
/// tells the bench's writes from the operator's by it).
pub async fn client(kubeconfig: &Path, agent: &str) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig).with_context(|| format!("cannot read {}", kubeconfig.display()))?;
    let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    config.headers.push(("user-agent".parse()?, agent.parse()?));
    Ok(Client::try_from(config)?)
}

/// One VirtualMachine of the workload.
#[derive(Clone, Debug)]
pub struct VmPlan {
    pub name: String,
    pub template: String,
    /// Its own persistent image, if it has one.
    pub persistent_image: Option<String>,
}

/// Images, Templates and VirtualMachines of one run.
pub struct Workload {
    pub images: Vec<Image>,
    pub templates: Vec<Template>,
    pub vms: Vec<VmPlan>,
}

impl Workload {
    /// `n` VMs from template `bench` (a clone of non-persistent image `base` and a volatile
    /// blank disk); every `persistent_every`-th VM (0: none) uses a template of its own that adds
    /// a persistent image of its own (`data-<i>`: a persistent image serves one VM at a time).
    pub fn new(n: usize, persistent_every: usize) -> anyhow::Result<Self> {
        let width = n.to_string().len().max(3);
        let image = |name: &str, persistent: bool, r#type: &str| {
            serde_json::from_value::<Image>(json!({
                "apiVersion": "vmkeep.io/v1alpha1", "kind": "Image", "metadata": {"name": name},
                "spec": {"persistent": persistent, "type": r#type, "size": "1Gi", "source": {"blank": {}}},
            }))
        };
        let template = |name: &str, data: Option<&str>| {
            let mut disks =
                vec![json!({"name": "root", "image": "base"}), json!({"name": "scratch", "blank": {"size": "1Gi"}})];
            if let Some(data) = data {
                disks.push(json!({"name": "data", "image": data}));
            }
            serde_json::from_value::<Template>(json!({
                "apiVersion": "vmkeep.io/v1alpha1", "kind": "Template", "metadata": {"name": name},
                "spec": {"cpu": 1, "memory": "256Mi", "disks": disks},
            }))
        };
        let mut images = vec![image("base", false, "OS")?];
        let mut templates = vec![template("bench", None)?];
        let mut vms = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("vm-{i:0width$}");
            if persistent_every > 0 && i % persistent_every == 0 {
                let data = format!("data-{i:0width$}");
                let tpl = format!("bench-{i:0width$}");
                images.push(image(&data, true, "DATABLOCK")?);
                templates.push(template(&tpl, Some(&data))?);
                vms.push(VmPlan { name, template: tpl, persistent_image: Some(data) });
            } else {
                vms.push(VmPlan { name, template: "bench".into(), persistent_image: None });
            }
        }
        Ok(Self { images, templates, vms })
    }

    pub fn persistent_vms(&self) -> usize {
        self.vms.iter().filter(|v| v.persistent_image.is_some()).count()
    }
}

fn vm_object(vm: &VmPlan) -> anyhow::Result<VirtualMachine> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "vmkeep.io/v1alpha1", "kind": "VirtualMachine", "metadata": {"name": vm.name},
        "spec": {"templateRef": {"name": vm.template}},
    }))?)
}

/// Installs vmkeep's CRDs when they are missing (an installed one is left as it is) and waits
/// until they are established.
pub async fn ensure_crds(client: &Client) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in vmkeep::api::crds() {
        let name = crd.name_any();
        if api.get_opt(&name).await?.is_none() {
            api.patch(&name, &PatchParams::apply("vmkeep-bench").force(), &Patch::Apply(&crd)).await?;
        }
        tokio::time::timeout(Duration::from_secs(60), await_condition(api.clone(), &name, is_crd_established()))
            .await
            .with_context(|| format!("CRD {name} not established after 60s"))??;
    }
    Ok(())
}

/// Creates a namespace and waits for its `default` ServiceAccount (Pods are refused without it).
pub async fn create_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name, "labels": {"vmkeep.io/bench": "true"}}}))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    let deadline = Instant::now() + Duration::from_secs(60);
    while accounts.get_opt("default").await?.is_none() {
        if Instant::now() > deadline {
            bail!("namespace {name} has no default ServiceAccount after 60s (is kube-controller-manager running?)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Deletes a namespace (in the background; a missing one is fine).
pub async fn delete_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    match Api::<Namespace>::all(client.clone()).delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Waits until the namespace is gone; false after `timeout`.
pub async fn namespace_gone(client: &Client, name: &str, timeout: Duration) -> anyhow::Result<bool> {
    let api = Api::<Namespace>::all(client.clone());
    let deadline = Instant::now() + timeout;
    while api.get_opt(name).await?.is_some() {
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(true)
}

/// Waits until no object of `K` is left in `api`'s namespace; false after `timeout`.
pub async fn none_left<K>(api: &Api<K>, timeout: Duration) -> anyhow::Result<bool>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let deadline = Instant::now() + timeout;
    while !api.list_metadata(&ListParams::default().limit(1)).await?.items.is_empty() {
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(true)
}

/// Creates `objects` with at most `concurrency` requests in flight.
async fn create_all<K>(api: &Api<K>, objects: &[K], concurrency: usize) -> anyhow::Result<()>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    stream::iter(objects)
        .map(|o| async move {
            api.create(&PostParams::default(), o).await.with_context(|| format!("create {}", o.name_any()))
        })
        .buffer_unordered(concurrency)
        .try_for_each(|_| async { Ok(()) })
        .await
}

/// Creates the Images and Templates and waits until every Template is `Ready`: the operator
/// says so only when every image it names is usable (the check a new VM makes), and every image
/// of the workload is named by a template.
pub async fn setup(client: &Client, ns: &str, workload: &Workload, concurrency: usize) -> anyhow::Result<()> {
    let images: Api<Image> = Api::namespaced(client.clone(), ns);
    let templates: Api<Template> = Api::namespaced(client.clone(), ns);
    create_all(&images, &workload.images, concurrency).await?;
    create_all(&templates, &workload.templates, concurrency).await?;
    let deadline = Instant::now() + Duration::from_secs(60 + workload.images.len() as u64 / 5);
    loop {
        let ready = templates
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|t| {
                let conditions = t.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
                find(conditions, template::READY).is_some_and(|c| c.status == ConditionStatus::True)
            })
            .count();
        if ready == workload.templates.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "setup: {ready}/{} templates ready (their images usable) after the deadline",
                workload.templates.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How a batch of VirtualMachines went.
#[derive(Debug, Default)]
pub struct Batch {
    /// Time from sending each VM's create to seeing it `Starting` (or `Running`), by VM.
    pub latencies: BTreeMap<String, Duration>,
    /// When (wall clock) each VM was seen `Starting`: the audit log's writes up to then are
    /// the ones it took to get there.
    pub starting_at: BTreeMap<String, jiff::Timestamp>,
    /// VMs that ended `Rejected` or `Failed`, with their phase and reason.
    pub failed: BTreeMap<String, String>,
    /// VMs that did not reach `Starting` in time, with their last phase and reason.
    pub missing: BTreeMap<String, String>,
    /// Create requests the API server refused.
    pub create_errors: Vec<String>,
    /// First create sent -> last VM `Starting`.
    pub batch: Duration,
    /// First create sent -> last create answered.
    pub creates: Duration,
}

fn phase_of(vm: &VirtualMachine) -> (Option<VirtualMachinePhase>, String) {
    let status = vm.status.as_ref();
    let reason = status
        .and_then(|s| s.conditions.iter().find(|c| c.r#type == "Ready"))
        .map(|c| c.reason.clone())
        .unwrap_or_default();
    (status.and_then(|s| s.phase), reason)
}

/// Creates the VMs (`concurrency` creates in flight) and watches them until each is `Starting`
/// or has failed, or `timeout` passed; `progress` is told how many are `Starting` every 5 s.
pub async fn batch(
    client: &Client,
    ns: &str,
    vms: &[VmPlan],
    concurrency: usize,
    timeout: Duration,
) -> anyhow::Result<Batch> {
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), ns);
    let (tx, mut rx) =
        mpsc::unbounded_channel::<(String, Option<VirtualMachinePhase>, String, Instant, jiff::Timestamp)>();
    let (listed_tx, listed_rx) = oneshot::channel();
    let watch = tokio::spawn({
        let api = api.clone();
        async move {
            let mut listed = Some(listed_tx);
            let mut events = watcher::watcher(api, watcher::Config::default()).default_backoff().boxed();
            while let Some(event) = events.next().await {
                match event {
                    Ok(Event::InitDone) => {
                        if let Some(listed) = listed.take() {
                            let _ = listed.send(());
                        }
                    }
                    Ok(Event::Apply(vm) | Event::InitApply(vm)) => {
                        let (phase, reason) = phase_of(&vm);
                        if tx.send((vm.name_any(), phase, reason, Instant::now(), jiff::Timestamp::now())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(error) => eprintln!("bench: VM watch: {error}; retrying"),
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), listed_rx).await.context("the VM watch did not start")??;

    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let answered: Arc<Mutex<Option<Instant>>> = Arc::default();
    let objects: Vec<VirtualMachine> = vms.iter().map(vm_object).collect::<anyhow::Result<_>>()?;
    let first = Instant::now();
    let creator = tokio::spawn({
        let (api, sent, answered) = (api.clone(), sent.clone(), answered.clone());
        async move {
            stream::iter(objects)
                .map(|vm| {
                    let (api, sent, answered) = (api.clone(), sent.clone(), answered.clone());
                    async move {
                        let name = vm.name_any();
                        sent.lock().expect("lock").insert(name.clone(), Instant::now());
                        let result = api.create(&PostParams::default(), &vm).await;
                        *answered.lock().expect("lock") = Some(Instant::now());
                        result.err().map(|e| format!("{name}: {e}"))
                    }
                })
                .buffer_unordered(concurrency)
                .filter_map(|e| async move { e })
                .collect::<Vec<String>>()
                .await
        }
    });

    let n = vms.len();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen: HashMap<String, Instant> = HashMap::new();
    let mut starting_at = BTreeMap::new();
    let mut last: HashMap<String, (Option<VirtualMachinePhase>, String)> = HashMap::new();
    let mut failed = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    while seen.len() + failed.len() < n {
        tokio::select! {
            event = rx.recv() => {
                let Some((name, phase, reason, at, wall)) = event else { break };
                match phase {
                    Some(VirtualMachinePhase::Starting | VirtualMachinePhase::Running) => {
                        failed.remove(&name);
                        seen.entry(name.clone()).or_insert(at);
                        starting_at.entry(name.clone()).or_insert(wall);
                    }
                    Some(p @ (VirtualMachinePhase::Rejected | VirtualMachinePhase::Failed)) => {
                        failed.insert(name.clone(), format!("{p:?} ({reason})"));
                    }
                    _ => {}
                }
                last.insert(name, (phase, reason));
            }
            _ = tick.tick() => {
                eprintln!("bench:   {}/{n} Starting after {:.0}s", seen.len(), first.elapsed().as_secs_f64());
            }
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    watch.abort();
    let create_errors = creator.await.context("the VM creator task")?;
    let sent = sent.lock().expect("lock").clone();
    let mut out = Batch { create_errors, failed, starting_at, ..Default::default() };
    let first_sent = sent.values().min().copied().unwrap_or(first);
    out.creates = answered.lock().expect("lock").map(|t| t - first_sent).unwrap_or_default();
    out.batch = seen.values().max().map(|t| *t - first_sent).unwrap_or_default();
    for vm in vms {
        match (sent.get(&vm.name), seen.get(&vm.name)) {
            (Some(s), Some(t)) => {
                out.latencies.insert(vm.name.clone(), t.saturating_duration_since(*s));
            }
            _ if out.failed.contains_key(&vm.name) => {}
            _ => {
                let (phase, reason) = last.get(&vm.name).cloned().unwrap_or_default();
                out.missing.insert(vm.name.clone(), format!("{phase:?} ({reason})"));
            }
        }
    }
    Ok(out)
}

/// The floor: how long a minimal client takes to create the same PVCs and Pods.
#[derive(Debug, Default)]
pub struct Floor {
    /// VMs whose children were replayed.
    pub units: usize,
    pub pvcs: usize,
    pub pods: usize,
    /// First create sent -> last create answered.
    pub batch: Duration,
}

fn replay_meta(meta: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name.clone(),
        labels: meta.labels.clone(),
        annotations: meta.annotations.as_ref().map(|a| {
            a.iter().filter(|(k, _)| k.starts_with("vmkeep.io/")).map(|(k, v)| (k.clone(), v.clone())).collect()
        }),
        ..Default::default()
    }
}

fn replay_pvc(pvc: &PersistentVolumeClaim) -> PersistentVolumeClaim {
    let mut spec = pvc.spec.clone();
    if let Some(spec) = &mut spec {
        spec.volume_name = None;
    }
    PersistentVolumeClaim { metadata: replay_meta(&pvc.metadata), spec, status: None }
}

fn replay_pod(pod: &Pod) -> Pod {
    let mut spec = pod.spec.clone();
    if let Some(spec) = &mut spec {
        // Set by admission; sending it back is refused when it disagrees.
        spec.priority = None;
        spec.node_name = None;
    }
    Pod { metadata: replay_meta(&pod.metadata), spec, status: None }
}

/// Replays what vmkeep created in `from` into `to`, without owner references: first the
/// Images' PVCs (not timed: the clone sources), then per VM its PVCs one after the other and its
/// launcher Pod, `concurrency` VMs at a time (as the operator's VM workers do).
pub async fn floor(
    reader: &Client,
    writer: &Client,
    from: &str,
    to: &str,
    concurrency: usize,
) -> anyhow::Result<Floor> {
    let managed = ListParams::default().labels(names::MANAGED_SELECTOR);
    let pvcs = Api::<PersistentVolumeClaim>::namespaced(reader.clone(), from).list(&managed).await?.items;
    let pods = Api::<Pod>::namespaced(reader.clone(), from).list(&managed).await?.items;
    let vm_of = |meta: &ObjectMeta| meta.labels.as_ref().and_then(|l| l.get(names::VM_LABEL).cloned());
    let mut units: BTreeMap<String, (Vec<PersistentVolumeClaim>, Option<Pod>)> = BTreeMap::new();
    let mut image_pvcs = Vec::new();
    for pvc in &pvcs {
        match vm_of(&pvc.metadata) {
            Some(vm) => units.entry(vm).or_default().0.push(replay_pvc(pvc)),
            None => image_pvcs.push(replay_pvc(pvc)),
        }
    }
    for pod in &pods {
        if let Some(vm) = vm_of(&pod.metadata) {
            units.entry(vm).or_default().1 = Some(replay_pod(pod));
        }
    }
    let pvc_api: Api<PersistentVolumeClaim> = Api::namespaced(writer.clone(), to);
    let pod_api: Api<Pod> = Api::namespaced(writer.clone(), to);
    create_all(&pvc_api, &image_pvcs, concurrency).await?;

    let mut floor = Floor { units: units.len(), ..Default::default() };
    floor.pvcs = units.values().map(|u| u.0.len()).sum();
    floor.pods = units.values().filter(|u| u.1.is_some()).count();
    let started = Instant::now();
    stream::iter(units.into_values())
        .map(|(mut pvcs, pod)| {
            let (pvc_api, pod_api) = (&pvc_api, &pod_api);
            async move {
                pvcs.sort_by_key(|p| p.name_any());
                for pvc in &pvcs {
                    pvc_api
                        .create(&PostParams::default(), pvc)
                        .await
                        .with_context(|| format!("floor: create PVC {}", pvc.name_any()))?;
                }
                if let Some(pod) = &pod {
                    pod_api
                        .create(&PostParams::default(), pod)
                        .await
                        .with_context(|| format!("floor: create Pod {}", pod.name_any()))?;
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .try_for_each(|()| async { Ok(()) })
        .await?;
    floor.batch = started.elapsed();
    Ok(floor)
}
