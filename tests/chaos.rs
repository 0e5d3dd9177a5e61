//! The fault suite (docs/reliability.md): a seeded, mixed workload on the local node while the
//! operator is killed with SIGKILL (one replica, then two under leader election), the API
//! server, etcd, the kubelet and containerd are restarted; then invariants checked from the API
//! server and its audit log, never from vmkeep's own view:
//!
//! - never two Pods mounting one persistent PVC at the same moment (sampled every 250 ms, and
//!   from the audit log's Pod create and delete times);
//! - every claim Lease held by an existing VM or fenced by an existing launcher Pod;
//! - no vmkeep PVC, Pod or Lease without an existing owner (no orphans);
//! - no image PVC deleted or replaced while its Image exists, nor while a Pod mounted it;
//! - every VM converged to what its spec asks within [`CONVERGE`] of the last fault;
//! - the converged state quiet: a restarted operator writes nothing.
//!
//! Sizes and the seed come from the environment, so the same test is the CI run (small, the
//! defaults) and the large run by hand: `VMKEEP_CHAOS_SEED` (default 1), `VMKEEP_CHAOS_KILLS`
//! (SIGKILLs in all, default 24, at least 20), `VMKEEP_CHAOS_VMS` (VMs alive at once, default 8),
//! `VMKEEP_CHAOS_IMAGES` (persistent images, default 3), `VMKEEP_CHAOS_REPORT` (a JSON file for
//! the figures). The other tests here cover a lost node, an unreachable webhook and bad input.
//! Everything here changes the cluster for everyone (restarts, CRD swaps), so the tests of this
//! file run one at a time, and the restarts only on the local cluster of `hack/cluster.sh`.

mod support;

#[allow(dead_code)]
#[path = "../src/bin/vmkeep-bench/audit.rs"]
mod audit;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{PersistentVolumeClaim, Pod},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy},
};
use serde_json::json;
use support::{
    env::{GC, LONG, template_with},
    *,
};
use vmkeep::{
    api::{
        ConditionStatus, Image, VirtualMachine,
        virtual_machine::{OnImageConflict, RunStrategy, VirtualMachinePhase},
    },
    plan::{conditions::find as condition, names},
};

/// One test of this file at a time: they restart the cluster's processes and swap CRDs.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long every VM may take to converge after the last fault.
const CONVERGE: Duration = Duration::from_secs(300);

/// A whole number from the environment, or `default`.
fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The API server's audit log of the local cluster (beside its kubeconfig), if this is it.
fn audit_log() -> Option<PathBuf> {
    let path = kubeconfig().parent()?.join("audit.log");
    (is_local_cluster() && path.exists()).then_some(path)
}

/// `hack/cluster.sh restart NAME SECONDS`: NAME stopped, down SECONDS, started again.
async fn restart(name: &str, down: u64) {
    let started = Instant::now();
    let out = tokio::process::Command::new("bash")
        .arg(repo().join("hack/cluster.sh"))
        .args(["restart", name, &down.to_string()])
        .output()
        .await
        .expect("hack/cluster.sh restart");
    assert!(out.status.success(), "restarting {name} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("[chaos] {name} restarted ({down} s down, {:.1} s in all)", started.elapsed().as_secs_f64());
}

/// The operator replicas: one without leader election, or two with it (3 s Leases).
struct Fleet {
    ns: String,
    elect: bool,
    replicas: Vec<Option<Operator>>,
    kills: usize,
    /// Replicas that stopped by themselves because they could not renew the leader Lease in
    /// time (the API server or etcd away): by design, as the kubelet would restart them.
    lease_losses: usize,
}

/// Operators started by this file, for their log names (`target/e2e-logs/chaos-*.log`).
static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Fleet {
    fn new(ns: &str, replicas: usize, elect: bool) -> Self {
        let mut fleet = Self { ns: ns.to_owned(), elect, replicas: Vec::new(), kills: 0, lease_losses: 0 };
        for _ in 0..replicas {
            let op = fleet.start();
            fleet.replicas.push(Some(op));
        }
        fleet
    }

    fn start(&mut self) -> Operator {
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let name = format!("chaos-{n}-{}", if self.elect { "elected" } else { "single" });
        let mut args = vec!["--namespace".to_owned(), self.ns.clone()];
        if self.elect {
            let more = ["--leader-elect", "--leader-election-namespace", &self.ns, "--leader-election-seconds", "3"];
            args.extend(more.iter().map(|s| s.to_string()));
            args.extend(["--identity".to_owned(), name.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Operator::start_with(&name, &args)
    }

    /// SIGKILL to replica `i` (no goodbye: its Lease, if it led, must expire), and a new one.
    fn kill(&mut self, i: usize) {
        let i = i % self.replicas.len();
        drop(self.replicas[i].take()); // Operator's Drop sends SIGKILL and reaps it
        self.kills += 1;
        self.replicas[i] = Some(self.start());
    }

    /// Panics with its log if a replica exited by itself (a crash, not a kill); one that
    /// stopped because it lost the leader Lease is started again, as the kubelet would.
    fn assert_alive(&mut self) {
        for i in 0..self.replicas.len() {
            let Some(op) = self.replicas[i].as_mut() else { continue };
            if op.exited().is_none() {
                continue;
            }
            let log = op.log_text();
            assert!(self.elect && log.contains("lost the leader Lease"), "an operator exited by itself:\n{log}");
            self.lease_losses += 1;
            self.replicas[i] = Some(self.start());
        }
    }
}

/// What the workload made: every VM (names are never reused) and the persistent image it uses.
#[derive(Default)]
struct Model {
    /// VM name -> the persistent image its Template uses, if any.
    uses: BTreeMap<String, Option<String>>,
    live: BTreeSet<String>,
    always: BTreeSet<String>,
    actions: BTreeMap<&'static str, u64>,
    errors: u64,
}

/// The mixed workload: Templates over one non-persistent image (`os`) and `images` persistent
/// ones; VMs created (Wait or Reject, Always or Halted, a tenth with long names), flipped
/// between Always and Halted, deleted with each propagation policy. At most `always_cap` VMs ask
/// to run at once: the node has that many CPUs for one-CPU launchers.
struct Workload {
    api: Api<VirtualMachine>,
    rng: fastrand::Rng,
    images: usize,
    max_live: usize,
    always_cap: usize,
    seq: usize,
    model: Arc<Mutex<Model>>,
}

fn setup_yaml(images: usize) -> String {
    let grace = "launcher: {terminationGracePeriodSeconds: 10}, ";
    let mut yaml = String::from(
        "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {name: os}\n\
         spec: {size: 64Mi, source: {blank: {}}}\n---\n",
    );
    yaml += &template_with("t-os", &[("root", Some("os"))], grace);
    for i in 0..images {
        yaml += &format!(
            "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {{name: p{i}}}\n\
             spec: {{persistent: true, size: 64Mi, source: {{blank: {{}}}}}}\n---\n"
        );
        yaml += &template_with(&format!("t-p{i}"), &[("data", Some(&format!("p{i}")))], grace);
    }
    // Both kinds in one VM: a clone of os and the first persistent image.
    yaml += &template_with("t-mix", &[("root", Some("os")), ("data", Some("p0"))], grace);
    yaml
}

impl Workload {
    /// One step; API errors (a restarting API server) are counted, not fatal.
    async fn step(&mut self) {
        let (live, always) = {
            let m = self.model.lock().unwrap();
            (m.live.iter().cloned().collect::<Vec<_>>(), m.always.len())
        };
        let roll = self.rng.u32(0..10);
        let action = if live.len() < self.max_live / 2 || (roll < 4 && live.len() < self.max_live) {
            "create"
        } else if roll < 7 {
            "flip"
        } else {
            "delete"
        };
        let result = match action {
            "create" => self.create(always).await,
            "flip" => self.flip(&live, always).await,
            _ => self.delete(&live).await,
        };
        let mut m = self.model.lock().unwrap();
        *m.actions.entry(action).or_default() += 1;
        if let Err(e) = result {
            m.errors += 1;
            eprintln!("[chaos] {action}: {e}");
        }
    }

    async fn create(&mut self, always: usize) -> Result<(), kube::Error> {
        self.seq += 1;
        let mut name = format!("vm-{:04}", self.seq);
        if self.rng.u32(0..10) == 0 {
            // 253 characters, the longest name there is: its Pods must still get names the
            // kubelet can start in this namespace (docs/reliability.md, "What it found").
            name.push('-');
            while name.len() < 253 {
                name.push_str("long");
            }
            name.truncate(253);
        }
        let pick = self.rng.usize(0..self.images + 2);
        let (template, image) = match pick {
            0 => ("t-os".to_owned(), None),
            1 => ("t-mix".to_owned(), Some("p0".to_owned())),
            i => (format!("t-p{}", i - 2), Some(format!("p{}", i - 2))),
        };
        let run = if always < self.always_cap && self.rng.bool() { "Always" } else { "Halted" };
        self.create_named(name, &template, image, run).await
    }

    /// A VM of `template` (using the persistent `image`) that the random steps did not choose.
    async fn create_with(&mut self, template: &str, image: Option<&str>, run: &str) -> Result<(), kube::Error> {
        self.seq += 1;
        let name = format!("vm-{:04}", self.seq);
        self.create_named(name, template, image.map(str::to_owned), run).await
    }

    async fn create_named(
        &mut self,
        name: String,
        template: &str,
        image: Option<String>,
        run: &str,
    ) -> Result<(), kube::Error> {
        let conflict = if self.rng.bool() { "Wait" } else { "Reject" };
        let vm: VirtualMachine = serde_json::from_value(json!({
            "apiVersion": "vmkeep.io/v1alpha1", "kind": "VirtualMachine", "metadata": {"name": name},
            "spec": {"templateRef": {"name": template}, "onImageConflict": conflict, "runStrategy": run},
        }))
        .expect("a VirtualMachine");
        {
            let mut m = self.model.lock().unwrap();
            m.uses.insert(name.clone(), image);
        }
        match self.api.create(&PostParams::default(), &vm).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
        let mut m = self.model.lock().unwrap();
        m.live.insert(name.clone());
        if run == "Always" {
            m.always.insert(name);
        }
        Ok(())
    }

    async fn flip(&mut self, live: &[String], always: usize) -> Result<(), kube::Error> {
        let Some(name) = self.rng.choice(live).cloned() else { return Ok(()) };
        let to_always = !self.model.lock().unwrap().always.contains(&name);
        if to_always && always >= self.always_cap {
            return Ok(());
        }
        let run = if to_always { "Always" } else { "Halted" };
        let patch = json!({"spec": {"runStrategy": run}});
        self.api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        let mut m = self.model.lock().unwrap();
        if to_always {
            m.always.insert(name);
        } else {
            m.always.remove(&name);
        }
        Ok(())
    }

    /// `name` set to Halted.
    async fn halt(&mut self, name: &str) -> Result<(), kube::Error> {
        let patch = json!({"spec": {"runStrategy": "Halted"}});
        self.api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        self.model.lock().unwrap().always.remove(name);
        Ok(())
    }

    async fn delete(&mut self, live: &[String]) -> Result<(), kube::Error> {
        let Some(name) = self.rng.choice(live).cloned() else { return Ok(()) };
        let policy = match self.rng.u32(0..4) {
            0 => PropagationPolicy::Foreground,
            1 => PropagationPolicy::Orphan,
            _ => PropagationPolicy::Background,
        };
        let params = DeleteParams { propagation_policy: Some(policy), ..DeleteParams::default() };
        match self.api.delete(&name, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
        let mut m = self.model.lock().unwrap();
        m.live.remove(&name);
        m.always.remove(&name);
        Ok(())
    }
}

/// Samples the namespace's Pods every 250 ms: two Pods (deleting or not) on one persistent PVC
/// at once is a violation. Also records which PVCs each Pod mounted.
struct Sampler {
    task: tokio::task::JoinHandle<()>,
    violations: Arc<Mutex<Vec<String>>>,
    samples: Arc<Mutex<u64>>,
}

fn pvcs_of(pod: &Pod) -> Vec<String> {
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    volumes.into_iter().flatten().filter_map(|v| Some(v.persistent_volume_claim.as_ref()?.claim_name.clone())).collect()
}

impl Sampler {
    fn run(client: Client, ns: &str, persistent: BTreeSet<String>) -> Self {
        let pods: Api<Pod> = Api::namespaced(client, ns);
        let violations = Arc::new(Mutex::new(Vec::new()));
        let samples = Arc::new(Mutex::new(0));
        let (seen, count) = (violations.clone(), samples.clone());
        let task = tokio::spawn(async move {
            loop {
                if let Ok(list) = pods.list(&ListParams::default()).await {
                    let mut users: BTreeMap<String, Vec<String>> = BTreeMap::new();
                    for pod in &list.items {
                        for pvc in pvcs_of(pod).into_iter().filter(|p| persistent.contains(p)) {
                            users.entry(pvc).or_default().push(pod.name_any());
                        }
                    }
                    for (pvc, pods) in users.into_iter().filter(|(_, p)| p.len() > 1) {
                        seen.lock().unwrap().push(format!("{} {pvc} mounted by {pods:?}", jiff::Timestamp::now()));
                    }
                    *count.lock().unwrap() += 1;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Self { task, violations, samples }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The Ready reason of a VM.
fn ready_reason(vm: &VirtualMachine) -> String {
    vm.status.as_ref().and_then(|s| condition(&s.conditions, "Ready")).map(|c| c.reason.clone()).unwrap_or_default()
}

/// Why the namespace is not converged yet (empty: converged): each VM is what its spec asks
/// (the holder of its persistent image, or a VM without one, Running or Stopped by its run
/// strategy; a Wait VM Pending behind a holder; a Reject VM Rejected) with its status of the
/// current generation; every persistent image that a Wait VM wants has a holder.
async fn unconverged(client: &Client, ns: &str, uses: &BTreeMap<String, Option<String>>) -> Vec<String> {
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), ns);
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let (Ok(vms), Ok(leases)) = (vms.list(&ListParams::default()).await, leases.list(&ListParams::default()).await)
    else {
        return vec!["the API server does not answer".to_owned()];
    };
    let holder = |image: &str| -> Option<String> {
        let lease = leases.items.iter().find(|l| l.name_any() == names::claim_lease(image))?;
        lease.annotations().get(names::HOLDER_ANNOTATION).cloned()
    };
    let mut why = Vec::new();
    for vm in &vms.items {
        let name = vm.name_any();
        let Some(status) = &vm.status else {
            why.push(format!("{name}: no status"));
            continue;
        };
        if vm.metadata.deletion_timestamp.is_some() {
            why.push(format!("{name}: still deleting"));
            continue;
        }
        if status.observed_generation != vm.metadata.generation {
            why.push(format!("{name}: status of generation {:?}", status.observed_generation));
            continue;
        }
        let image = uses.get(&name).cloned().flatten();
        let holds = image.as_deref().is_none_or(|i| holder(i).as_deref() == Some(name.as_str()));
        let always = vm.spec.run_strategy == RunStrategy::Always;
        let wait = vm.spec.on_image_conflict == OnImageConflict::Wait;
        let (want, reason) = match (holds, always, wait) {
            (true, true, _) => (VirtualMachinePhase::Running, None),
            (true, false, _) => (VirtualMachinePhase::Stopped, None),
            (false, _, true) => (VirtualMachinePhase::Pending, Some("WaitingForImage")),
            (false, _, false) => (VirtualMachinePhase::Rejected, None),
        };
        // Running and Stopped are Ready (a Stopped VM whose Pod still goes is not yet).
        let ready = status.conditions.iter().any(|c| c.r#type == "Ready" && c.status == ConditionStatus::True);
        let settled = match want {
            VirtualMachinePhase::Running | VirtualMachinePhase::Stopped => ready,
            _ => reason.is_none_or(|r| ready_reason(vm) == r),
        };
        if status.phase != Some(want) || !settled {
            why.push(format!("{name}: {:?} ({}), wants {want:?}", status.phase, ready_reason(vm)));
        }
        if let (false, true, Some(image)) = (holds, wait, &image)
            && holder(image).is_none()
        {
            why.push(format!("{name} waits for {image}, which nobody holds"));
        }
    }
    why
}

/// Waits until [`unconverged`] finds nothing, at most [`CONVERGE`]; `between` runs before each
/// look (e.g. starting again a replica that lost its Lease). Panics with what is not converged.
async fn wait_converged(
    client: &Client,
    ns: &str,
    uses: &BTreeMap<String, Option<String>>,
    what: &str,
    mut between: impl FnMut(),
) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        between();
        let why = unconverged(client, ns, uses).await;
        if why.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not converged within {} s:\n{}",
            CONVERGE.as_secs(),
            why.join("\n")
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Claims, orphans and image PVCs, read from the API server now.
async fn check_objects(client: &Client, ns: &str, image_pvc_uids: &BTreeMap<String, String>) -> Vec<String> {
    let mut bad = Vec::new();
    let vms = Api::<VirtualMachine>::namespaced(client.clone(), ns).list(&ListParams::default()).await.expect("vms");
    let images = Api::<Image>::namespaced(client.clone(), ns).list(&ListParams::default()).await.expect("images");
    let managed = ListParams::default().labels(names::MANAGED_SELECTOR);
    let pods = Api::<Pod>::namespaced(client.clone(), ns).list(&managed).await.expect("pods");
    let pvcs = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns).list(&managed).await.expect("pvcs");
    let leases = Api::<Lease>::namespaced(client.clone(), ns).list(&ListParams::default()).await.expect("leases");
    // Owners a vmkeep child may have: a VM, an Image, or another child (a copier Pod's PVC).
    let owners: BTreeSet<String> = (vms.items.iter().filter_map(|v| v.uid()))
        .chain(images.items.iter().filter_map(|i| i.uid()))
        .chain(pvcs.items.iter().filter_map(|p| p.uid()))
        .chain(pods.items.iter().filter_map(|p| p.uid()))
        .collect();
    let vm_uids: BTreeSet<String> = vms.items.iter().filter_map(|v| v.uid()).collect();

    for lease in leases.items.iter().filter(|l| l.name_any().starts_with("vmkeep-claim-")) {
        let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone()).unwrap_or_default();
        let fenced = pods.items.iter().any(|p| p.labels().get(names::VM_UID_LABEL) == Some(&holder));
        if !vm_uids.contains(&holder) && !fenced {
            bad.push(format!("claim {} held by {holder}: no such VM and no Pod of it", lease.name_any()));
        }
    }
    let owned = |meta: &kube::core::ObjectMeta| {
        meta.owner_references.iter().flatten().any(|r| owners.contains(&r.uid))
            || meta.labels.as_ref().and_then(|l| l.get(names::IMAGE_UID_LABEL)).is_some_and(|u| owners.contains(u))
    };
    bad.extend(
        pods.items.iter().filter(|p| !owned(&p.metadata)).map(|p| format!("Pod {}: no owner exists", p.name_any())),
    );
    bad.extend(
        pvcs.items.iter().filter(|p| !owned(&p.metadata)).map(|p| format!("PVC {}: no owner exists", p.name_any())),
    );
    for image in &images.items {
        let pvc = names::image_pvc(&image.name_any());
        let now = pvcs.items.iter().find(|p| p.name_any() == pvc).and_then(|p| p.uid());
        match (image_pvc_uids.get(&image.name_any()), now) {
            (_, None) => bad.push(format!("Image {}: its PVC {pvc} is gone", image.name_any())),
            (Some(first), Some(now)) if *first != now => {
                bad.push(format!("Image {}: its PVC {pvc} was replaced ({first} -> {now})", image.name_any()))
            }
            _ => {}
        }
    }
    bad
}

/// A Pod's lifetimes from the audit log: from each successful create to the last successful
/// delete before the next create (open: it may still exist).
fn lifetimes(writes: &[&audit::Write]) -> Vec<(jiff::Timestamp, Option<jiff::Timestamp>)> {
    let mut lives: Vec<(jiff::Timestamp, Option<jiff::Timestamp>)> = Vec::new();
    for w in writes {
        match (w.verb.as_str(), w.code) {
            ("create", 201) => lives.extend(w.at.map(|t| (t, None))),
            ("delete", 200 | 202) => {
                if let Some(last) = lives.last_mut() {
                    last.1 = w.done.or(w.at);
                }
            }
            _ => {}
        }
    }
    lives
}

/// From the audit log: no two launcher Pods of one persistent image alive at once; no image PVC
/// deleted before its Image was, or while a launcher Pod mounting it was alive.
fn check_audit(ns: &str, writes: &[audit::Write], model: &Model, images: &BTreeSet<String>) -> Vec<String> {
    let mut bad = Vec::new();
    let mut by_pod: BTreeMap<&str, Vec<&audit::Write>> = BTreeMap::new();
    for w in writes.iter().filter(|w| w.resource == "pods") {
        by_pod.entry(w.name.as_str()).or_default().push(w);
    }
    let mut per_image: BTreeMap<String, Vec<(String, jiff::Timestamp, Option<jiff::Timestamp>)>> = BTreeMap::new();
    for (vm, image) in &model.uses {
        let (Some(image), Some(writes)) = (image, by_pod.get(names::launcher_pod(ns, vm).as_str())) else { continue };
        for (from, to) in lifetimes(writes) {
            per_image.entry(image.clone()).or_default().push((vm.clone(), from, to));
        }
    }
    let none = Vec::new();
    for image in images {
        let lives = per_image.get(image).unwrap_or(&none);
        for (i, a) in lives.iter().enumerate() {
            for b in &lives[i + 1..] {
                let a_before_b = a.2.is_some_and(|end| end <= b.1);
                let b_before_a = b.2.is_some_and(|end| end <= a.1);
                if !a_before_b && !b_before_a {
                    bad.push(format!(
                        "{image}: the launchers of {} ({:?}) and {} ({:?}) were alive at once",
                        a.0,
                        (a.1, a.2),
                        b.0,
                        (b.1, b.2)
                    ));
                }
            }
        }
        let pvc = names::image_pvc(image);
        // Its Image's deletion: by name, or all of the namespace's at once (a prune).
        let image_deleted = writes
            .iter()
            .filter(|w| w.resource == "images" && w.code < 300)
            .filter(|w| (w.verb == "delete" && w.name == *image) || w.verb == "deletecollection")
            .filter_map(|w| w.at)
            .min();
        let deletes = writes.iter().filter(|w| w.resource == "persistentvolumeclaims" && w.name == pvc);
        for del in deletes.filter(|w| w.verb == "delete" && w.code < 300) {
            let Some(at) = del.at else { continue };
            if image_deleted.is_none_or(|d| d > at) {
                bad.push(format!("{pvc} deleted at {at} while Image {image} was not"));
            }
            for (vm, from, to) in lives {
                if *from <= at && to.is_none_or(|end| end > at) {
                    bad.push(format!("{pvc} deleted at {at} while the launcher of {vm} was alive"));
                }
            }
        }
    }
    bad
}

#[tokio::test]
async fn faults_survived_a_mixed_workload_loses_nothing_and_converges() {
    let _alone = ALONE.lock().await;
    install_crds();
    if let Some(why) = support::node::skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let seed = setting("VMKEEP_CHAOS_SEED", 1);
    let kills = setting("VMKEEP_CHAOS_KILLS", 24).max(20) as usize;
    let max_live = setting("VMKEEP_CHAOS_VMS", 8).max(2) as usize;
    let images = setting("VMKEEP_CHAOS_IMAGES", 3).max(1) as usize;
    let local = audit_log();
    if local.is_none() {
        eprintln!(
            "not the local cluster: no restarts of its processes, no audit log checks (run them on hack/cluster.sh)"
        );
    }
    eprintln!("[chaos] seed {seed}, {kills} kills, {max_live} VMs alive at most, {images} persistent images");
    let client = client().await;
    let ns = TestNamespace::new("chaos");
    let mut audit = local.as_deref().map(|p| audit::AuditLog::at_end(p).expect("audit log"));
    let cpus = kubectl_ok(&["get", "nodes", "-o", "jsonpath={.items[*].status.allocatable.cpu}"], None);
    let always_cap = cpus.split_whitespace().filter_map(|c| c.parse::<usize>().ok()).sum::<usize>().max(1);

    let mut fleet = Fleet::new(&ns.name, 1, false);
    kubectl_ok(&["apply", "-n", &ns.name, "-f", "-"], Some(&setup_yaml(images)));
    let persistent: BTreeSet<String> = (0..images).map(|i| names::image_pvc(&format!("p{i}"))).collect();
    let sampler = Sampler::run(client.clone(), &ns.name, persistent);
    let image_api: Api<Image> = Api::namespaced(client.clone(), &ns.name);
    let mut pvc_uids = BTreeMap::new();
    for image in std::iter::once("os".to_owned()).chain((0..images).map(|i| format!("p{i}"))) {
        let uid = wait_for(&format!("Image {image} to have its PVC"), LONG, async || {
            let pvc = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns.name)
                .get_opt(&names::image_pvc(&image))
                .await
                .ok()??;
            image_api.get_opt(&image).await.ok()??;
            pvc.uid()
        })
        .await;
        pvc_uids.insert(image, uid);
    }

    let model = Arc::new(Mutex::new(Model::default()));
    let mut workload = Workload {
        api: Api::namespaced(client.clone(), &ns.name),
        rng: fastrand::Rng::with_seed(seed),
        images,
        max_live,
        always_cap,
        seq: 0,
        model: model.clone(),
    };
    let mut faults = fastrand::Rng::with_seed(seed ^ 0x5eed);
    let started = Instant::now();
    let mut restarts: BTreeMap<&str, u32> = BTreeMap::new();

    // The schedule: the kills in two halves (one replica, then two elected), a workload step
    // every 0.5-1.5 s, a kill every 1.5-5 s, the restarts of the control plane in the middle of
    // each half and the node's between the halves.
    for (phase, (replicas, elect)) in [(1, false), (2, true)].into_iter().enumerate() {
        if phase == 1 {
            let kills = fleet.kills;
            drop(fleet); // no moment with an unelected replica beside elected ones
            fleet = Fleet::new(&ns.name, replicas, elect);
            fleet.kills = kills;
        }
        let half = kills / 2 + if phase == 1 { kills % 2 } else { 0 };
        let mut next_kill = Instant::now() + Duration::from_millis(faults.u64(1500..5000));
        let mut done = 0;
        // The control plane's restart runs beside the workload and the kills (their requests
        // fail meanwhile, as a user's would).
        let mut restarting = None;
        while done < half {
            workload.step().await;
            tokio::time::sleep(Duration::from_millis(faults.u64(500..1500))).await;
            if Instant::now() >= next_kill {
                fleet.assert_alive();
                fleet.kill(faults.usize(0..replicas));
                done += 1;
                next_kill = Instant::now() + Duration::from_millis(faults.u64(1500..5000));
                if done == half / 2 && local.is_some() {
                    let which = if phase == 0 { "kube-apiserver" } else { "etcd" };
                    restarting = Some(tokio::spawn(restart(which, 2)));
                    *restarts.entry(which).or_default() += 1;
                }
            }
        }
        if let Some(restarting) = restarting {
            restarting.await.expect("the restart");
        }
        if phase == 0 && local.is_some() {
            // A VM that surely runs (the workload's may all be Halted or waiting now), within
            // the node's CPUs; then the node's restarts on a settled namespace, so that a Pod
            // the operator stops for the last steps is not taken for one the restarts touched.
            let always: Vec<String> = model.lock().unwrap().always.iter().cloned().collect();
            if always.len() >= always_cap {
                workload.halt(&always[0]).await.expect("halting a VM for the keeper");
            }
            workload.create_with("t-os", None, "Always").await.expect("the keeper VM");
            let uses = model.lock().unwrap().uses.clone();
            wait_converged(&client, &ns.name, &uses, "before the node restarts", || fleet.assert_alive()).await;
            node_restarts(&client, &ns.name, &mut restarts).await;
        }
    }
    let last_fault = Instant::now();
    let faults_took = started.elapsed();

    // Converge: one replica, no more faults.
    let kills = fleet.kills;
    drop(fleet);
    let mut fleet = Fleet::new(&ns.name, 1, false);
    fleet.kills = kills;
    let uses = model.lock().unwrap().uses.clone();
    wait_converged(&client, &ns.name, &uses, "after the last fault", || fleet.assert_alive()).await;
    let waited = last_fault.elapsed();
    eprintln!("[chaos] converged {:.1} s after the last fault", waited.as_secs_f64());

    // Quiet: once the operator has stopped writing (5 s without a write of its own), a
    // restarted one reads everything and writes nothing.
    let mut quiet_from = Vec::new();
    if let Some(a) = audit.as_mut() {
        let mut calm_since = Instant::now();
        let deadline = Instant::now() + CONVERGE;
        while calm_since.elapsed() < Duration::from_secs(5) {
            assert!(
                Instant::now() < deadline,
                "the operator kept writing for {} s after converging",
                CONVERGE.as_secs()
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
            let new = a.read_new(std::slice::from_ref(&ns.name)).expect("audit");
            if new.iter().any(|w| w.actor == audit::Actor::Operator) {
                calm_since = Instant::now();
            }
            quiet_from.extend(new);
        }
    }
    fleet.kill(0);
    fleet.replicas[0].as_mut().unwrap().ready().await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let mut writes = quiet_from;
    if let Some(a) = audit.as_mut() {
        let quiet: Vec<audit::Write> = a.read_new(std::slice::from_ref(&ns.name)).expect("audit");
        let by_operator: Vec<String> = quiet
            .iter()
            .filter(|w| w.actor == audit::Actor::Operator)
            .map(|w| format!("{} {}", w.key(), w.name))
            .collect();
        assert!(by_operator.is_empty(), "the converged state is not quiet: a restarted operator wrote {by_operator:?}");
        writes.extend(quiet);
    }
    let violations = check_objects(&client, &ns.name, &pvc_uids).await;
    assert!(violations.is_empty(), "invariants broken:\n{}", violations.join("\n"));

    // GitOps prune: everything deleted at once, the operator killed once meanwhile.
    let all = DeleteParams::default();
    let lp = ListParams::default();
    let _ = Api::<VirtualMachine>::namespaced(client.clone(), &ns.name).delete_collection(&all, &lp).await;
    let _ = image_api.delete_collection(&all, &lp).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    fleet.kill(0);
    wait_for("every VM and Image to be gone", CONVERGE, async || {
        let vms = Api::<VirtualMachine>::namespaced(client.clone(), &ns.name).list(&lp).await.ok()?;
        let images = image_api.list(&lp).await.ok()?;
        (vms.items.is_empty() && images.items.is_empty()).then_some(())
    })
    .await;
    // Launcher Pods stop within their grace period, PVCs go after their Pods: give them time.
    let mut left = Vec::new();
    let deadline = Instant::now() + GC;
    while Instant::now() < deadline {
        left = check_objects(&client, &ns.name, &BTreeMap::new()).await;
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let sampled = sampler.violations.lock().unwrap().clone();
    let samples = *sampler.samples.lock().unwrap();
    drop(sampler);
    let mut audited = Vec::new();
    if let Some(a) = audit.as_mut() {
        tokio::time::sleep(Duration::from_secs(2)).await; // the log's last lines
        writes.extend(a.read_new(std::slice::from_ref(&ns.name)).expect("audit"));
    }
    let model = model.lock().unwrap();
    if audit.is_some() {
        audited = check_audit(&ns.name, &writes, &model, &pvc_uids.keys().cloned().collect());
    }

    let report = json!({
        "seed": seed,
        "faults": {"operatorKills": fleet.kills, "leaseLossRestarts": fleet.lease_losses, "restarts": restarts},
        "vms": model.uses.len(),
        "persistentVms": model.uses.values().filter(|i| i.is_some()).count(),
        "actions": model.actions,
        "apiErrorsSeen": model.errors,
        "podSamples": samples,
        "auditWrites": writes.len(),
        "faultsSeconds": faults_took.as_secs(),
        "convergedSecondsAfterLastFault": waited.as_secs_f64(),
        "violations": {"sampled": sampled.len(), "audit": audited.len(), "objectsAfterPrune": left.len()},
    });
    eprintln!("[chaos] {report}");
    if let Ok(path) = std::env::var("VMKEEP_CHAOS_REPORT") {
        std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).expect("report");
    }
    assert!(samples > 10, "the Pod sampler hardly sampled ({samples})");
    assert!(sampled.is_empty(), "two Pods mounted one persistent PVC:\n{}", sampled.join("\n"));
    assert!(audited.is_empty(), "the audit log shows:\n{}", audited.join("\n"));
    assert!(left.is_empty(), "after the prune:\n{}", left.join("\n"));
}

/// The kubelet and containerd restarted while VMs run: the running launcher Pods stay (same
/// uid, same container, no restart) and their VMs stay Running.
async fn node_restarts(client: &Client, ns: &str, restarts: &mut BTreeMap<&str, u32>) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let running = async || -> BTreeMap<String, (String, String, i32)> {
        let list = pods.list(&ListParams::default().labels(names::MANAGED_SELECTOR)).await.expect("pods");
        list.items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && p.name_any().ends_with("-launcher"))
            .filter_map(|p| {
                let c = p.status.as_ref()?.container_statuses.as_ref()?.first()?.clone();
                c.state.as_ref()?.running.as_ref()?;
                Some((p.name_any(), (p.uid()?, c.container_id?, c.restart_count)))
            })
            .collect()
    };
    let before = wait_for("a launcher Pod to run", Duration::from_secs(120), async || {
        Some(running().await).filter(|r| !r.is_empty())
    })
    .await;
    for (name, down) in [("kubelet", 5), ("containerd", 5)] {
        restart(name, down).await;
        *restarts.entry(name).or_default() += 1;
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = running().await;
    for (pod, was) in &before {
        assert_eq!(after.get(pod), Some(was), "launcher Pod {pod} was re-created or restarted by a node restart");
    }
    eprintln!("[chaos] {} running launcher Pods kept through the kubelet and containerd restarts", before.len());
}

/// A persistent image `p`, Template `t` using it, and VMs in `ns`.
fn held_image_yaml() -> String {
    "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {name: p}\n\
     spec: {persistent: true, size: 64Mi, source: {blank: {}}}\n---\n"
        .to_owned()
        + &template_with("t", &[("data", Some("p"))], "launcher: {terminationGracePeriodSeconds: 10}, ")
}

fn vm_yaml(name: &str, conflict: &str, labels: &str) -> String {
    format!(
        "apiVersion: vmkeep.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n\
         spec: {{templateRef: {{name: t}}, onImageConflict: {conflict}}}\n"
    )
}

#[tokio::test]
async fn a_lost_node_keeps_each_claim_with_its_pod_until_the_pod_is_really_gone() {
    let _alone = ALONE.lock().await;
    install_crds();
    if let Some(why) = support::node::skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    if audit_log().is_none() {
        eprintln!("skipped: stopping the kubelet needs the local cluster of hack/cluster.sh");
        return;
    }
    let mut env = support::env::Env::new("chaos-node").await;
    kubectl_ok(&["apply", "-n", &env.ns.name, "-f", "-"], Some(&held_image_yaml()));
    kubectl_ok(&["apply", "-n", &env.ns.name, "-f", "-"], Some(&vm_yaml("a", "Wait", "")));
    env.wait_vm("a", VirtualMachinePhase::Running).await;
    kubectl_ok(&["apply", "-n", &env.ns.name, "-f", "-"], Some(&vm_yaml("b", "Wait", "")));
    wait_for("b to wait for p", LONG, async || (ready_reason(&env.vm("b").await?) == "WaitingForImage").then_some(()))
        .await;

    // The node is lost for 70 s: longer than the launcher's grace period (10 s) and than the
    // node monitor's grace period (40 s: the node turns NotReady). a is deleted meanwhile: its
    // Pod stays Terminating (no kubelet confirms), so the claim must stay with a.
    let lost = tokio::spawn(restart("kubelet", 70));
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.delete_vm("a").await;
    let pod = names::launcher_pod(&env.ns.name, "a");
    let until = Instant::now() + Duration::from_secs(55);
    let mut checks = 0;
    while Instant::now() < until {
        let a_pod = env.pod(&pod).await.expect("a's launcher Pod stays while its node is lost");
        assert!(a_pod.metadata.deletion_timestamp.is_some() || checks < 5, "a's Pod is not even Terminating");
        assert_eq!(env.claim_holder("p").await.as_deref(), Some("a"), "the claim left a while its Pod exists");
        assert!(
            env.pod(&names::launcher_pod(&env.ns.name, "b")).await.is_none(),
            "b got a launcher while a's Pod exists"
        );
        let b = env.vm("b").await.expect("b");
        assert_eq!(ready_reason(&b), "WaitingForImage", "b: {:?}", b.status);
        checks += 1;
        if checks == 10 {
            // And an operator that starts now, amid it all, keeps to the rule.
            env.operator.kill();
            env.operator = Operator::start_with("chaos-node-2", &["--namespace", &env.ns.name]);
            env.operator.ready().await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let node = kubectl_ok(
        &["get", "nodes", "-o", "jsonpath={.items[0].status.conditions[?(@.type==\"Ready\")].status}"],
        None,
    );
    eprintln!("[chaos] node Ready={node} after 58 s without a kubelet; {checks} checks held");
    lost.await.expect("the kubelet restarted");
    // The kubelet is back: a's Pod goes for good, then b takes p and runs.
    env.wait_gone::<Pod>(&pod, GC).await;
    env.wait_vm_within("b", VirtualMachinePhase::Running, GC).await;
    assert_eq!(env.claim_holder("p").await.as_deref(), Some("b"));
}

#[tokio::test]
async fn an_unreachable_webhook_refuses_or_admits_as_its_failure_policy_says() {
    let _alone = ALONE.lock().await;
    install_crds();
    let env = support::env::Env::new("chaos-webhook").await;
    kubectl_ok(&["apply", "-n", &env.ns.name, "-f", "-"], Some(&held_image_yaml()));
    kubectl_ok(&["apply", "-n", &env.ns.name, "-f", "-"], Some(&vm_yaml("holder", "Reject", "")));
    wait_for("holder to hold p", LONG, async || (env.claim_holder("p").await? == "holder").then_some(())).await;
    // Nothing listens on this port: every call of the webhook fails.
    let port = free_port();
    let label = format!("vmkeep-chaos/webhook: {}", env.ns.name);
    // One configuration, its policy changed in place: a dry run that passes after Fail refused
    // can only mean that Ignore is in force.
    let config = format!("vmkeep-chaos-{}", env.ns.name);
    let _gone = OnDrop(|| {
        let _ = kubectl(&["delete", "validatingwebhookconfiguration", &config, "--ignore-not-found"], None);
    });
    for policy in ["Fail", "Ignore"] {
        let webhook = format!(
            "apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingWebhookConfiguration\n\
             metadata: {{name: {config}}}\nwebhooks:\n- name: claims.vmkeep.io\n\
             \x20 clientConfig: {{url: 'https://127.0.0.1:{port}/validate'}}\n\
             \x20 rules: [{{apiGroups: [vmkeep.io], apiVersions: ['*'], operations: [CREATE, UPDATE], resources: [virtualmachines]}}]\n\
             \x20 objectSelector: {{matchLabels: {{'vmkeep-chaos/webhook': {}}}}}\n\
             \x20 failurePolicy: {policy}\n  sideEffects: None\n  admissionReviewVersions: [v1]\n  timeoutSeconds: 2\n",
            env.ns.name
        );
        kubectl_ok(&["apply", "-f", "-"], Some(&webhook));
        let name = format!("late-{}", policy.to_lowercase());
        // The API server reads webhook configurations through an informer: ask until it applies.
        let out = wait_for(&format!("the {policy} webhook to be called"), LONG, async || {
            let out = kubectl(
                &["apply", "--dry-run=server", "-n", &env.ns.name, "-f", "-"],
                Some(&vm_yaml(&name, "Reject", &label)),
            );
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            match policy {
                "Fail" => stderr.contains("failed calling webhook").then_some(stderr),
                _ => out.status.success().then_some(stderr),
            }
        })
        .await;
        let applied = kubectl(&["apply", "-n", &env.ns.name, "-f", "-"], Some(&vm_yaml(&name, "Reject", &label)));
        if policy == "Fail" {
            // Fails closed: refused, with the API server's reason, and nothing made.
            assert!(!applied.status.success(), "failurePolicy Fail admitted {name}: {out}");
            assert!(String::from_utf8_lossy(&applied.stderr).contains("failed calling webhook"));
            assert!(env.vm(&name).await.is_none());
        } else {
            // Fails open: admitted, and the controller's claim still decides.
            assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
            env.wait_vm(&name, VirtualMachinePhase::Rejected).await;
        }
        // Status writes of the VMs never go through it: the holder stays converged.
        assert_eq!(env.claim_holder("p").await.as_deref(), Some("holder"));
    }
}

#[tokio::test]
async fn objects_of_other_shapes_and_a_flood_of_500_never_stall_the_watch() {
    let _alone = ALONE.lock().await;
    install_crds();
    let mut env = support::env::Env::new("chaos-input").await;
    let ns = env.ns.name.clone();
    kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(&held_image_yaml()));
    // A VM that will turn unreadable, whose volatile disk lost its owner reference (by hand):
    // the sweep of what deleted VMs leave behind must not take it, as the VM still exists.
    let kept = template_with("tv", &[("scratch", None)], "")
        + "apiVersion: vmkeep.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: kept}\n\
           spec: {templateRef: {name: tv}, runStrategy: Halted}\n";
    kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(&kept));
    env.wait_vm("kept", VirtualMachinePhase::Stopped).await;
    let unowned = r#"[{"op": "remove", "path": "/metadata/ownerReferences"}]"#;
    kubectl_ok(&["patch", "pvc", "kept-scratch", "-n", &ns, "--type=json", "-p", unowned], None);
    let scratch_uid = env.pvc("kept-scratch").await.and_then(|p| p.uid()).expect("kept's disk");

    // Objects written by another version of vmkeep: the VirtualMachine CRD swapped for one whose
    // schema keeps anything (as an older or newer CRD would have let them in), two written, the
    // CRD restored. One lacks a field this version needs, one has a run strategy it does not know.
    let _restore = OnDrop(install_crds);
    let anything = r#"[{"op": "replace", "path": "/spec/versions/0/schema/openAPIV3Schema",
        "value": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}]"#;
    kubectl_ok(&["patch", "crd", "virtualmachines.vmkeep.io", "--type=json", "-p", anything], None);
    let shapes = "apiVersion: vmkeep.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: kept}\n\
                  spec: {templateRef: {name: tv}, runStrategy: Paused}\n---\n\
                  apiVersion: vmkeep.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: older}\n\
                  spec: {template: t}\n---\n\
                  apiVersion: vmkeep.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: newer}\n\
                  spec: {templateRef: {name: t}, runStrategy: Paused, gpus: 2}\n";
    wait_for("the permissive schema to apply", LONG, async || {
        kubectl(&["apply", "-n", &ns, "-f", "-"], Some(shapes)).status.success().then_some(())
    })
    .await;
    install_crds();
    // Each gets a Warning Event naming what cannot be read; the others flow.
    for name in ["older", "newer", "kept"] {
        let event = env.wait_event("Malformed", name).await;
        assert_eq!(event.type_.as_deref(), Some("Warning"), "{event:?}");
        eprintln!("[chaos] {name}: {}", event.note.unwrap_or_default());
    }
    tokio::time::sleep(Duration::from_secs(8)).await; // more than the sweep's recheck
    let scratch = env.pvc("kept-scratch").await;
    assert_eq!(scratch.and_then(|p| p.uid()), Some(scratch_uid), "the disk of an unreadable VM was swept");
    let current = "apiVersion: vmkeep.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: current}\n\
                   spec: {templateRef: {name: t}, runStrategy: Halted}\n";
    kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(current));
    env.wait_vm("current", VirtualMachinePhase::Stopped).await;
    // Fixed by the user, the newer one is read again (and waits its turn for p).
    let fixed = "apiVersion: vmkeep.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: newer}\n\
                 spec: {templateRef: {name: t}, runStrategy: Halted, onImageConflict: Reject}\n";
    kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(fixed));
    env.wait_vm("newer", VirtualMachinePhase::Rejected).await;
    kubectl_ok(
        &["delete", "virtualmachines", "older", "current", "newer", "kept", "-n", &ns, "--wait=true", "--timeout=120s"],
        None,
    );

    // A flood: 100 persistent images, their 100 Templates and 300 VMs (a tenth with names of
    // 200 characters) created at once, 32 requests in flight, the operator killed twice on the
    // way. Each image ends with exactly one holder; the others wait or are rejected.
    let client = env.client.clone();
    let mut yaml = String::new();
    for i in 0..100 {
        yaml += &format!(
            "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {{name: f{i}}}\n\
             spec: {{persistent: true, size: 64Mi, source: {{blank: {{}}}}}}\n---\n"
        );
        yaml += &template_with(&format!("tf{i}"), &[("data", Some(&format!("f{i}")))], "");
    }
    let objects: Vec<serde_json::Value> = yaml
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(d).expect("yaml")).expect("json"))
        .collect();
    let mut uses = BTreeMap::new();
    let mut vms = Vec::new();
    for i in 0..300 {
        let mut name = format!("f{:03}", i);
        if i % 10 == 0 {
            name += &format!("-{}", "x".repeat(196));
        }
        let image = format!("f{}", i / 3);
        uses.insert(name.clone(), Some(image.clone()));
        let conflict = if i % 3 == 1 { "Reject" } else { "Wait" };
        vms.push(json!({"apiVersion": "vmkeep.io/v1alpha1", "kind": "VirtualMachine", "metadata": {"name": name},
            "spec": {"templateRef": {"name": format!("t{image}")}, "onImageConflict": conflict, "runStrategy": "Halted"}}));
    }
    let started = Instant::now();
    let dynamic = |kind: &str| {
        let gvk = kube::core::GroupVersionKind::gvk("vmkeep.io", "v1alpha1", kind);
        let resource = kube::core::ApiResource::from_gvk(&gvk);
        Api::<kube::core::DynamicObject>::namespaced_with(client.clone(), &ns, &resource)
    };
    let (images_api, templates_api, vms_api) = (dynamic("Image"), dynamic("Template"), dynamic("VirtualMachine"));
    let all: Vec<serde_json::Value> = objects.into_iter().chain(vms).collect();
    let total = all.len();
    let mut created = 0usize;
    for (n, chunk) in all.chunks(total.div_ceil(3)).enumerate() {
        let creates = chunk.iter().map(|o| {
            let api = match o["kind"].as_str() {
                Some("Image") => &images_api,
                Some("Template") => &templates_api,
                _ => &vms_api,
            };
            let object: kube::core::DynamicObject = serde_json::from_value(o.clone()).expect("object");
            async move { api.create(&PostParams::default(), &object).await }
        });
        let results: Vec<_> = futures::stream::iter(creates).buffer_unordered(32).collect().await;
        for r in results {
            r.expect("create");
            created += 1;
        }
        if n < 2 {
            env.operator.kill();
            env.operator = Operator::start_with(&format!("chaos-flood-{n}"), &["--namespace", &ns]);
        }
    }
    eprintln!("[chaos] {created} objects created in {:.1} s", started.elapsed().as_secs_f64());
    wait_converged(&client, &ns, &uses, "the flood", || {}).await;
    eprintln!("[chaos] the flood converged {:.1} s after its first create", started.elapsed().as_secs_f64());
    let leases = Api::<Lease>::namespaced(client.clone(), &ns).list(&ListParams::default()).await.expect("leases");
    let claims = leases.items.iter().filter(|l| l.name_any().starts_with("vmkeep-claim-f")).count();
    assert_eq!(claims, 100, "each flooded image has one holder");
    let bad = check_objects(&client, &ns, &BTreeMap::new()).await;
    assert!(bad.is_empty(), "{bad:?}");
    kubectl_ok(
        &["delete", "virtualmachines,images,templates", "--all", "-n", &ns, "--wait=true", "--timeout=300s"],
        None,
    );
}
