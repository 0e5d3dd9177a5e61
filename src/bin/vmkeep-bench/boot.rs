//! `vmkeep-bench --boot N`: N VMs booting the test guest at once on the local cluster's node
//! (docs/performance.md, "On the node: time to Running and launcher memory").
//!
//! In a namespace of its own it starts `vmkeep run --cpu-allocation-ratio R` (10, KubeVirt's
//! default, so ten 1-vCPU VMs fit the 2-CPU node's requests), puts the test guest of
//! `hack/guest.sh` on a host-path PersistentVolume adopted by a non-persistent Image (as
//! tests/launcher.rs does, through the same code: tests/support/host.rs), makes one Template
//! (1 vCPU, `--boot-memory-mib`, the guest as its root disk) and creates the N VirtualMachines
//! at once. For each VM it measures, from sending its create:
//!
//! - **Starting** and **Running** (`status.phase`, polled every 0.2 s): Running is QEMU running
//!   the guest (the launcher Pod Ready). Starting comes once its clone is copied and the
//!   launcher Pod exists (the local host-path storage cannot clone: a copier Pod copies the
//!   64 MiB guest disk per VM);
//! - **guest ready**: the guest's `vmkeep-guest: ready` line on its serial console, read from
//!   the launcher's log as the API server streams it (`kubectl logs -f`);
//!
//! then, with every guest up, each launcher Pod's memory from `/proc` on this machine (QEMU's
//! resident set outside the guest RAM, the guest RAM touched, `vmkeep launch`'s resident set)
//! beside the Pod's memory request and the guest's RAM. It deletes the VMs and the namespace and
//! waits until the VMs, their PVCs and the namespace are gone.

use std::{
    collections::BTreeMap,
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use futures::{AsyncBufReadExt as _, StreamExt as _, future::join_all};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, LogParams, PostParams},
};
use serde::Deserialize as _;
use serde_json::{Value, json};
use vmkeep::{
    api::{ConditionStatus, Image, Template, VirtualMachine, image::ImagePhase, virtual_machine::VirtualMachinePhase},
    plan::names,
};

use super::{
    Args, Provenance, audit, host,
    operator::{Operator, round3},
    report, workload, write_results,
};

/// The local cluster's StorageClass (`hack/cluster.sh`), in which the guest's volume is made.
const STORAGE_CLASS: &str = "standard";
/// The line the test guest prints once it has booted and checked its disks.
const READY_LINE: &str = "vmkeep-guest: ready";
/// The name of the Image, and of the Template.
const IMAGE: &str = "guest";
const TEMPLATE: &str = "boot";

/// The options of the boot mode.
#[derive(clap::Args, Debug)]
pub struct BootArgs {
    /// Boot mode: N VMs booting the test guest of hack/guest.sh at once on the local cluster's
    /// node; time to Running and to the guest's ready line, launcher memory.
    #[arg(id = "boot", long = "boot", value_name = "N")]
    pub vms: Option<usize>,
    /// Guest RAM of the boot mode's Template, MiB (96: the least the test guest boots with;
    /// 88 did not boot).
    #[arg(long, default_value_t = 96, value_parser = clap::value_parser!(u64).range(16..))]
    pub boot_memory_mib: u64,
    /// The operator's --cpu-allocation-ratio in the boot mode (KubeVirt's default: 10).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub boot_cpu_allocation_ratio: u32,
}

/// What was seen of one VM, from sending its create.
#[derive(Clone, Debug, Default)]
struct Seen {
    starting: Option<Duration>,
    running: Option<Duration>,
    ready: Option<Duration>,
    restarts: i32,
    accelerator: Option<String>,
    phase: Option<String>,
}

/// Runs the boot mode with `n` VMs.
pub async fn run(args: &Args, n: usize, kubeconfig: &Path, operator_bin: &Path) -> anyhow::Result<ExitCode> {
    let boot = &args.boot;
    anyhow::ensure!(n > 0, "--boot needs at least one VM");
    let client = workload::client(kubeconfig, audit::BENCH_AGENT).await?;
    workload::ensure_crds(&client).await.context("vmkeep's CRDs")?;
    let node = schedulable_node(&client).await?.context(
        "the cluster has no schedulable node: --boot needs the local cluster with its node (hack/cluster.sh up)",
    )?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let guest = host::build_guest(repo).map_err(|e| anyhow!(e))?;
    let timeout = Duration::from_secs(args.timeout.unwrap_or(600));

    let provenance = Provenance::now();
    let load_start = provenance.load_start.clone();
    let started = provenance.started;
    let nonce = started.as_second() % 100_000;
    let ns = format!("vmkeep-bench-boot-{n}-{nonce}");
    eprintln!(
        "bench: boot: {n} VMs (1 vCPU, {} MiB) booting {} in namespace {ns} on node {node}; load {load_start}",
        boot.boot_memory_mib,
        guest.display()
    );
    workload::create_namespace(&client, &ns).await?;
    let ratio = boot.boot_cpu_allocation_ratio.to_string();
    let log = args.out_dir.join("logs").join(format!("{ns}-operator.log"));
    let started_op =
        Operator::start_with(operator_bin, kubeconfig, &ns, args.concurrency, &["--cpu-allocation-ratio", &ratio], log);
    let mut op = match started_op {
        Ok(op) => op,
        Err(e) => {
            let _ = workload::delete_namespace(&client, &ns).await;
            return Err(e);
        }
    };
    if let Err(e) = op.ready(Duration::from_secs(60)).await {
        let _ = op.stop().await;
        let _ = workload::delete_namespace(&client, &ns).await;
        return Err(e);
    }

    let pv = format!("{ns}-guest");
    let dir = std::env::temp_dir().join("vmkeep-bench").join(&pv);
    let outcome = measure(&client, &ns, &pv, &dir, &guest, n, boot, timeout).await;
    // Clean up whatever happened: the VMs first (their finalizers need the operator), then the
    // namespace (the Image's finalizer too), then the guest's volume.
    let cleanup = if args.keep {
        json!({"kept": true})
    } else {
        match cleanup(&client, &ns, n).await {
            Ok(c) => c,
            Err(e) => json!({"error": format!("{e:#}")}),
        }
    };
    let operator = op.stop().await;
    if !args.keep {
        let _ = Api::<PersistentVolume>::all(client.clone()).delete(&pv, &DeleteParams::default()).await;
        let _ = std::fs::remove_dir_all(&dir);
    }
    let operator = operator?;
    let mut result = outcome?;
    result["cleanup"] = cleanup;
    result["operator"] = operator.json();

    let results = provenance.results(
        "boot",
        json!({
            "vms": n,
            "template_cpu": 1,
            "guest_memory_mib": boot.boot_memory_mib,
            "cpu_allocation_ratio": boot.boot_cpu_allocation_ratio,
            "concurrency": args.concurrency,
            "guest_disk": guest,
            "storage_class": STORAGE_CLASS,
            "node": node,
            "timeout_seconds": timeout.as_secs(),
            "kubeconfig": kubeconfig,
            "operator": operator_bin,
        }),
        json!([result]),
    );
    let out = args.out.clone().unwrap_or_else(|| args.out_dir.join("boot.json"));
    write_results(&out, &results)?;
    let run = &results["runs"][0];
    print!("{}", summary(run, &results["machine"]));
    eprintln!("bench: results in {}", out.display());
    let ok = run["reached_running"] == json!(n) && run["reached_ready"] == json!(n);
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The guest's Image, the Template, the VMs and what they showed.
#[allow(clippy::too_many_arguments)]
async fn measure(
    client: &Client,
    ns: &str,
    pv: &str,
    dir: &Path,
    guest: &Path,
    n: usize,
    boot: &BootArgs,
    timeout: Duration,
) -> anyhow::Result<Value> {
    // The guest's disk: a host-path volume of this machine, adopted by a non-persistent Image.
    let setup_started = Instant::now();
    host::stage_guest_disk(guest, dir).map_err(|e| anyhow!(e))?;
    let (volume, claim_and_image) = host::guest_volume_manifests(pv, dir, ns, IMAGE, false, STORAGE_CLASS);
    let volume: PersistentVolume = serde_yaml::from_str(&volume)?;
    Api::<PersistentVolume>::all(client.clone()).create(&PostParams::default(), &volume).await?;
    for doc in serde_yaml::Deserializer::from_str(&claim_and_image) {
        let value = Value::deserialize(doc)?;
        match value["kind"].as_str() {
            Some("PersistentVolumeClaim") => {
                let pvc: PersistentVolumeClaim = serde_json::from_value(value)?;
                Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
                    .create(&PostParams::default(), &pvc)
                    .await?;
            }
            Some("Image") => {
                let image: Image = serde_json::from_value(value)?;
                Api::<Image>::namespaced(client.clone(), ns).create(&PostParams::default(), &image).await?;
            }
            other => bail!("unexpected manifest kind {other:?}"),
        }
    }
    let images: Api<Image> = Api::namespaced(client.clone(), ns);
    poll("the guest's Image to be Ready", Duration::from_secs(120), async || {
        let image = images.get_opt(IMAGE).await.ok()??;
        let status = image.status?;
        (status.phase == Some(ImagePhase::Ready) && status.capacity.is_some()).then_some(())
    })
    .await?;
    let template: Template = serde_json::from_value(json!({
        "apiVersion": "vmkeep.io/v1alpha1",
        "kind": "Template",
        "metadata": {"name": TEMPLATE},
        "spec": {
            "cpu": 1,
            "memory": format!("{}Mi", boot.boot_memory_mib),
            "disks": [{"name": "root", "image": IMAGE}],
            // The test guest flushes and powers off on the power button within a second.
            "launcher": {"terminationGracePeriodSeconds": 20},
        },
    }))?;
    let templates: Api<Template> = Api::namespaced(client.clone(), ns);
    templates.create(&PostParams::default(), &template).await?;
    poll("the Template to be Ready", Duration::from_secs(60), async || {
        let status = templates.get_opt(TEMPLATE).await.ok()??.status?;
        status.conditions.iter().any(|c| c.r#type == "Ready" && c.status == ConditionStatus::True).then_some(())
    })
    .await?;
    let setup_seconds = setup_started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The batch: every create in flight at once.
    let names: Vec<String> = (1..=n).map(|i| format!("vm-{i:03}")).collect();
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    eprintln!("bench: boot: setup done in {setup_seconds:.1}s; creating {n} VirtualMachines at once");
    let batch_started = Instant::now();
    let creates = names.iter().map(|name| {
        let vms = vms.clone();
        let vm: VirtualMachine = serde_json::from_value(json!({
            "apiVersion": "vmkeep.io/v1alpha1",
            "kind": "VirtualMachine",
            "metadata": {"name": name},
            "spec": {"templateRef": {"name": TEMPLATE}},
        }))
        .expect("a VirtualMachine");
        async move {
            let sent = Instant::now();
            vms.create(&PostParams::default(), &vm).await.map(|_| sent)
        }
    });
    let mut created = BTreeMap::new();
    for (name, result) in names.iter().zip(join_all(creates).await) {
        created.insert(name.clone(), result.with_context(|| format!("create VirtualMachine {name}"))?);
    }
    let creates_seconds = batch_started.elapsed().as_secs_f64();

    // The guests' consoles, each followed as soon as its launcher runs.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
    let followers: Vec<_> = names
        .iter()
        .map(|name| {
            let (pods, tx, ns, name) = (pods.clone(), ready_tx.clone(), ns.to_owned(), name.clone());
            tokio::spawn(async move {
                if follow_until_ready(&pods, &names::launcher_pod(&ns, &name)).await {
                    let _ = tx.send((name, Instant::now()));
                }
            })
        })
        .collect();
    drop(ready_tx);

    let mut seen: BTreeMap<String, Seen> = names.iter().map(|n| (n.clone(), Seen::default())).collect();
    let deadline = Instant::now() + timeout;
    loop {
        while let Ok((name, at)) = ready_rx.try_recv() {
            if let (Some(s), Some(sent)) = (seen.get_mut(&name), created.get(&name)) {
                s.ready.get_or_insert(at - *sent);
            }
        }
        let now = Instant::now();
        for vm in vms.list(&ListParams::default()).await? {
            let name = vm.name_any();
            let (Some(s), Some(sent)) = (seen.get_mut(&name), created.get(&name)) else { continue };
            let Some(status) = vm.status else { continue };
            let phase = status.phase;
            if matches!(phase, Some(VirtualMachinePhase::Starting | VirtualMachinePhase::Running)) {
                s.starting.get_or_insert(now - *sent);
            }
            if phase == Some(VirtualMachinePhase::Running) {
                s.running.get_or_insert(now - *sent);
                s.accelerator = status.accelerator.clone();
            }
            s.restarts = status.restarts.unwrap_or_default();
            s.phase = phase.map(|p| format!("{p:?}"));
        }
        if seen.values().all(|s| s.running.is_some() && s.ready.is_some()) {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("bench: boot: not every VM Running with its guest ready after {timeout:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let batch_seconds = batch_started.elapsed().as_secs_f64();
    for follower in followers {
        follower.abort();
    }
    eprintln!("bench: boot: batch {batch_seconds:.1}s; reading the launchers' memory");

    // Memory, every guest up (and idle: the test guest waits for the power button).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut per_vm = Vec::new();
    let mut memory = Vec::new();
    for name in &names {
        let s = &seen[name];
        let pod = pods.get_opt(&names::launcher_pod(ns, name)).await?;
        let (requests, limits) = pod
            .as_ref()
            .and_then(|p| p.spec.as_ref()?.containers.first()?.resources.clone())
            .map(|r| (r.requests.unwrap_or_default(), r.limits.unwrap_or_default()))
            .unwrap_or_default();
        let quantity = |map: &BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>, key: &str| {
            map.get(key).map(|q| q.0.clone())
        };
        let request_mib = requests.get("memory").map(|q| vmkeep::plan::quantity::bytes_u64(q) >> 20);
        let m = pod.as_ref().and_then(|p| p.uid()).and_then(|uid| host::launcher_memory(&uid, boot.boot_memory_mib));
        if let Some(m) = m {
            memory.push((m, request_mib));
        }
        per_vm.push(json!({
            "name": name,
            "to_starting_seconds": s.starting.map(|d| round3(d.as_secs_f64())),
            "to_running_seconds": s.running.map(|d| round3(d.as_secs_f64())),
            "to_guest_ready_seconds": s.ready.map(|d| round3(d.as_secs_f64())),
            "phase": s.phase,
            "restarts": s.restarts,
            "accelerator": s.accelerator,
            "node": pod.as_ref().and_then(|p| p.spec.as_ref()?.node_name.clone()),
            "pod_requests": {"cpu": quantity(&requests, "cpu"), "memory": quantity(&requests, "memory")},
            "pod_limits": {"cpu": quantity(&limits, "cpu"), "memory": quantity(&limits, "memory")},
            "pod_memory_request_mib": request_mib,
            "memory_mib": m.map(|m| json!({
                "qemu_outside_guest": m.qemu_outside_guest_mib,
                "guest_touched": m.guest_touched_mib,
                "vmkeep_launch": m.launch_mib,
                "overhead": m.qemu_outside_guest_mib + m.launch_mib,
                "total": m.qemu_outside_guest_mib + m.guest_touched_mib + m.launch_mib,
            })),
        }));
    }
    let durations = |f: fn(&Seen) -> Option<Duration>| seen.values().filter_map(f).collect::<Vec<_>>();
    let figures = |samples: Vec<Duration>| {
        let p = report::percentiles(samples.iter().copied());
        json!({
            "count": samples.len(),
            "p50": round3(p.p50), "p95": round3(p.p95), "max": round3(p.max), "mean": round3(p.mean),
        })
    };
    let pick = |f: fn(&host::LauncherMemory) -> u64| memory.iter().map(|(m, _)| f(m)).collect::<Vec<_>>();
    let request_mib = memory.iter().filter_map(|(_, r)| *r).max();
    Ok(json!({
        "vms": n,
        "namespace": ns,
        "setup_seconds": round3(setup_seconds),
        "creates_seconds": round3(creates_seconds),
        "batch_seconds": round3(batch_seconds),
        "reached_running": seen.values().filter(|s| s.running.is_some()).count(),
        "reached_ready": seen.values().filter(|s| s.ready.is_some()).count(),
        "restarts": seen.values().map(|s| s.restarts).sum::<i32>(),
        "time_to_starting_seconds": figures(durations(|s| s.starting)),
        "time_to_running_seconds": figures(durations(|s| s.running)),
        "time_to_guest_ready_seconds": figures(durations(|s| s.ready)),
        "memory_mib": {
            "guest": boot.boot_memory_mib,
            "pod_request": request_mib,
            "pod_request_over_guest": request_mib.map(|r| r.saturating_sub(boot.boot_memory_mib)),
            "qemu_outside_guest": mib_figures(pick(|m| m.qemu_outside_guest_mib)),
            "guest_touched": mib_figures(pick(|m| m.guest_touched_mib)),
            "vmkeep_launch": mib_figures(pick(|m| m.launch_mib)),
            "overhead": mib_figures(pick(|m| m.qemu_outside_guest_mib + m.launch_mib)),
            "total": mib_figures(pick(|m| m.qemu_outside_guest_mib + m.guest_touched_mib + m.launch_mib)),
            "measured_vms": memory.len(),
        },
        "per_vm": per_vm,
    }))
}

/// Follows the launcher's log (the guest's serial console) from the start of its container
/// until it shows [`READY_LINE`]; a stream that ends (the container not started yet, or
/// restarted) is opened again.
async fn follow_until_ready(pods: &Api<Pod>, pod: &str) -> bool {
    let params = LogParams { container: Some("launcher".into()), follow: true, ..Default::default() };
    loop {
        let started = pods.get_opt(pod).await.ok().flatten().is_some_and(|p| {
            p.status
                .and_then(|s| s.container_statuses)
                .is_some_and(|cs| cs.iter().any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some())))
        });
        if started && let Ok(stream) = pods.log_stream(pod, &params).await {
            let mut lines = stream.lines();
            while let Some(Ok(line)) = lines.next().await {
                if line.contains(READY_LINE) {
                    return true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls `check` every 0.25 s until it returns `Some`.
async fn poll<T>(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Deletes the VMs and waits until they are gone, then the namespace, and waits until its PVCs
/// and the namespace itself are gone.
async fn cleanup(client: &Client, ns: &str, n: usize) -> anyhow::Result<Value> {
    let started = Instant::now();
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), ns);
    vms.delete_collection(&DeleteParams::background(), &ListParams::default()).await?;
    let deadline = Duration::from_secs(300 + 10 * n as u64);
    let vms_gone = workload::none_left(&vms, deadline).await?;
    let vms_seconds = started.elapsed().as_secs_f64();
    workload::delete_namespace(client, ns).await?;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let pvcs_gone = workload::none_left(&pvcs, deadline).await?;
    let namespace_gone = workload::namespace_gone(client, ns, deadline).await?;
    eprintln!("bench: boot: cleaned up in {:.1}s", started.elapsed().as_secs_f64());
    Ok(json!({
        "vms_gone": vms_gone,
        "vms_gone_seconds": round3(vms_seconds),
        "pvcs_gone": pvcs_gone,
        "namespace_gone": namespace_gone,
        "seconds": round3(started.elapsed().as_secs_f64()),
    }))
}

/// A Ready, schedulable node without NoSchedule or NoExecute taints, if the cluster has one.
async fn schedulable_node(client: &Client) -> anyhow::Result<Option<String>> {
    let nodes = Api::<Node>::all(client.clone()).list(&ListParams::default()).await?;
    Ok(nodes.items.into_iter().find_map(|node| {
        let spec = node.spec.clone().unwrap_or_default();
        let tainted =
            spec.taints.unwrap_or_default().iter().any(|t| t.effect == "NoSchedule" || t.effect == "NoExecute");
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        (ready && !tainted && spec.unschedulable != Some(true)).then(|| node.name_any())
    }))
}

/// The human summary.
fn summary(r: &Value, machine: &Value) -> String {
    let t = |key: &str| {
        let v = &r[key];
        format!("p50 {}s  p95 {}s  max {}s  ({} VMs)", v["p50"], v["p95"], v["max"], v["count"])
    };
    let m = &r["memory_mib"];
    let mem = |key: &str| format!("p50 {} MiB, max {} MiB", m[key]["p50"], m[key]["max"]);
    let mut s = format!("\n== boot: {} VMs at once ==\n", r["vms"]);
    s += &format!("time to Starting    {}\n", t("time_to_starting_seconds"));
    s += &format!("time to Running     {}\n", t("time_to_running_seconds"));
    s += &format!("time to guest ready {}\n", t("time_to_guest_ready_seconds"));
    s += &format!("batch               {}s (restarts {})\n", r["batch_seconds"], r["restarts"]);
    s += &format!(
        "memory per VM       guest {} MiB, Pod request {} MiB; QEMU outside guest RAM {}; guest RAM touched {}; vmkeep launch {}\n",
        m["guest"],
        m["pod_request"],
        mem("qemu_outside_guest"),
        mem("guest_touched"),
        mem("vmkeep_launch")
    );
    s += &format!("load average        {} -> {}\n", machine["loadavg_start"], machine["loadavg_end"]);
    s
}

/// Nearest-rank p50, p95, max (whole MiB, as measured) and the mean of `values` (MiB), by
/// [`report::percentiles_of`]; no figures when empty.
fn mib_figures(values: Vec<u64>) -> Value {
    if values.is_empty() {
        return json!({"count": 0, "p50": null, "p95": null, "max": null, "mean": 0.0});
    }
    let p = report::percentiles_of(values.iter().map(|&v| v as f64));
    json!({"count": values.len(), "p50": p.p50 as u64, "p95": p.p95 as u64, "max": p.max as u64, "mean": round3(p.mean)})
}
