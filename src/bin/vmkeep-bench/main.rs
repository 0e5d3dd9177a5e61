//! `vmkeep-bench`: measures the vmkeep operator against a real (local) control plane.
//!
//! For each N of `--vms` it starts `vmkeep run --namespace <bench ns>` as a child process,
//! creates the Images and Templates, then N VirtualMachines (`--concurrency` creates in flight)
//! and measures:
//!
//! - time from each VM's create request to the VM being seen `Starting` (a watch): p50, p95,
//!   p99, and the whole batch;
//! - the operator's write requests, from the API server's audit log (`audit.log` next to the
//!   kubeconfig of `hack/cluster.sh`), total, per VM, by verb and resource;
//! - a full resync: the operator restarted on the converged set must write nothing;
//! - the operator's peak RSS (VmHWM) and CPU time (utime + stime) from `/proc`;
//! - the floor: a minimal client creating the very same PVCs and Pods (replayed from what vmkeep
//!   made) with the same concurrency in another namespace, and vmkeep's batch time against it.
//!
//! It writes a JSON results file and prints a summary; `--svg` draws time to `Starting` against
//! N. `--smoke` is the quick CI check (exit 1 when a VM does not reach `Starting`, a VM writes
//! more than its PVC creates + 4 until `Starting` (with an audit log), or the resync writes
//! anything); `--memory` is the large run for the RSS figure. `--boot N` (boot.rs) is the run on
//! the local cluster's node: N VMs booting the test guest of `hack/guest.sh` at once under
//! `vmkeep run --cpu-allocation-ratio 10`, time from create to `Running` and to the guest's
//! `vmkeep-guest: ready` console line, and each launcher Pod's memory beside its guest's.
//!
//! Run it against your own control plane, e.g.
//! `VMKEEP_CLUSTER_DIR=$HOME/.cache/vmkeep/bench-cluster VMKEEP_API_PORT=26443
//! VMKEEP_ETCD_PORT=33790 bash hack/cluster.sh up`, then
//! `cargo run --release --bin vmkeep-bench -- --kubeconfig ~/.cache/vmkeep/bench-cluster/kubeconfig --vms 100`.

mod audit;
mod boot;
/// The test guest, host-path volumes and launcher memory, shared with the tests.
#[path = "../../../tests/support/host.rs"]
mod host;
mod operator;
mod report;
mod stages;
mod workload;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use audit::{Actor, AuditLog, Write};
use clap::Parser;
use kube::{Api, Client};
use operator::{Metrics, Operator, mib, round3};
use serde_json::{Value, json};
use vmkeep::api::{Image, VirtualMachine};
use workload::Workload;

#[derive(Parser, Debug)]
#[command(name = "vmkeep-bench", version, about = "Measure the vmkeep operator against a local control plane")]
struct Args {
    /// The cluster's kubeconfig (default: $KUBECONFIG, else the local control plane's).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The API server's audit log (default: audit.log next to the kubeconfig, as
    /// hack/cluster.sh writes it). Without one, writes are counted by the operator's metrics.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Numbers of VirtualMachines, one run each (comma-separated), e.g. 20,100,1000.
    #[arg(long, value_delimiter = ',')]
    vms: Vec<usize>,
    /// Creates in flight: of the bench's VMs, of the floor's VMs, and the operator's
    /// `--concurrency` (reconciles of one kind at once).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Every K-th VM has a persistent image of its own (and its own template); 0: none.
    #[arg(long, default_value_t = 10)]
    persistent_every: usize,
    /// The vmkeep binary (default: `vmkeep` next to this binary, e.g. target/release/vmkeep).
    #[arg(long)]
    operator: Option<PathBuf>,
    /// Where results, the chart's default location and operator logs go.
    #[arg(long, default_value = "target/bench")]
    out_dir: PathBuf,
    /// The JSON results file (default: <out-dir>/results.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the chart of time to Starting against N to this SVG file.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Seconds every VM may take to reach Starting (default: 120 + N / 5).
    #[arg(long)]
    timeout: Option<u64>,
    /// Seconds without writes in the bench namespace that count as converged.
    #[arg(long)]
    quiet: Option<f64>,
    /// Skip the floor.
    #[arg(long)]
    no_floor: bool,
    /// Keep the namespaces (and their objects) after each run.
    #[arg(long)]
    keep: bool,
    /// CI smoke mode: 20 VMs by default, no floor, short settling; exit 1 unless every VM
    /// reaches Starting and the resync writes nothing.
    #[arg(long)]
    smoke: bool,
    /// Memory mode: 10000 VMs by default and no floor, for the RSS figure.
    #[arg(long)]
    memory: bool,
    #[command(flatten)]
    boot: boot::BootArgs,
}

struct Bench {
    args: Args,
    kubeconfig: PathBuf,
    audit_path: Option<PathBuf>,
    operator_bin: PathBuf,
    client: Client,
    floor_client: Client,
    quiet: Duration,
}

/// What decides the exit code of a run.
struct Verdict {
    all_starting: bool,
    resync_writes: Option<u64>,
    /// The VMs that wrote more than their PVC creates + 4 until `Starting` (the writes-per-VM
    /// target of docs/performance.md); `None` without an audit log to attribute writes.
    vms_over_writes: Option<usize>,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("bench: error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn default_kubeconfig() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache/vmkeep/cluster/kubeconfig")
}

async fn run(mut args: Args) -> anyhow::Result<ExitCode> {
    if args.vms.is_empty() {
        args.vms = vec![if args.smoke {
            20
        } else if args.memory {
            10_000
        } else {
            100
        }];
    }
    let kubeconfig = args.kubeconfig.clone().filter(|p| !p.as_os_str().is_empty()).unwrap_or_else(default_kubeconfig);
    let audit_path = match &args.audit_log {
        Some(p) => Some(p.clone()),
        None => kubeconfig.parent().map(|d| d.join("audit.log")).filter(|p| p.exists()),
    };
    let operator_bin = match &args.operator {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.parent().context("no folder of the bench binary")?.join("vmkeep"),
    };
    anyhow::ensure!(operator_bin.exists(), "no vmkeep binary at {} (cargo build --release)", operator_bin.display());
    if let Some(n) = args.boot.vms {
        return boot::run(&args, n, &kubeconfig, &operator_bin).await;
    }
    // 5 s also in the smoke run: on a node whose Pods run, the scheduler retries the launcher
    // Pods it cannot place with a back-off of up to 10 s, and each retry may change a VM's
    // status; 2 s of quiet once ended the batch early and counted those writes as the resync's.
    let quiet = Duration::from_secs_f64(args.quiet.unwrap_or(5.0));
    let client = workload::client(&kubeconfig, audit::BENCH_AGENT).await?;
    let floor_client = workload::client(&kubeconfig, audit::FLOOR_AGENT).await?;
    workload::ensure_crds(&client).await.context("vmkeep's CRDs")?;
    match &audit_path {
        Some(p) => eprintln!("bench: counting writes from the audit log {}", p.display()),
        None => eprintln!("bench: no audit log found; counting writes by the operator's own metrics"),
    }
    let bench = Bench { args, kubeconfig, audit_path, operator_bin, client, floor_client, quiet };

    // The commit measured is the one checked out when the run starts.
    let provenance = Provenance::now();
    let mut runs = Vec::new();
    let mut verdicts = Vec::new();
    let mut points = Vec::new();
    let sizes = bench.args.vms.clone();
    for (i, &n) in sizes.iter().enumerate() {
        let last = i + 1 == sizes.len();
        let (result, verdict, point) = bench.run_one(n, last).await.with_context(|| format!("run with {n} VMs"))?;
        print!("{}", summary(&result));
        runs.push(result);
        verdicts.push(verdict);
        points.push(point);
    }
    let (commit, dirty) = (provenance.commit.clone(), provenance.dirty);
    let results = provenance.results(
        "batch",
        json!({
            "concurrency": bench.args.concurrency,
            "persistent_every": bench.args.persistent_every,
            "quiet_seconds": bench.quiet.as_secs_f64(),
            "smoke": bench.args.smoke,
            "memory": bench.args.memory,
            "floor": !bench.floor_disabled(),
            "kubeconfig": bench.kubeconfig,
            "audit_log": bench.audit_path,
            "operator": bench.operator_bin,
        }),
        json!(runs),
    );
    let out = bench.args.out.clone().unwrap_or_else(|| bench.args.out_dir.join("results.json"));
    write_results(&out, &results)?;
    eprintln!("bench: results in {}", out.display());
    if let Some(svg) = &bench.args.svg {
        let title = "vmkeep: time from VirtualMachine create to phase Starting";
        let subtitle = format!(
            "commit {}{}, {} CPUs, Kubernetes 1.20.2 local control plane, concurrency {}, 1 in {} VMs persistent",
            commit.as_deref().unwrap_or("?"),
            if dirty { " (modified)" } else { "" },
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            bench.args.concurrency,
            bench.args.persistent_every,
        );
        if let Some(dir) = svg.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(svg, report::svg(&points, title, &subtitle))?;
        eprintln!("bench: chart in {}", svg.display());
    }
    let failed = verdicts.iter().any(|v| {
        !v.all_starting || v.resync_writes.is_some_and(|w| w != 0) || v.vms_over_writes.is_some_and(|n| n > 0)
    });
    if bench.args.smoke {
        let why =
            "a VM did not reach Starting, a VM wrote more than its PVC creates + 4 until Starting, or the resync wrote";
        println!("smoke: {}", if failed { format!("FAILED ({why})") } else { "ok".to_owned() });
        return Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS });
    }
    Ok(ExitCode::SUCCESS)
}

impl Bench {
    fn floor_disabled(&self) -> bool {
        self.args.no_floor || self.args.smoke || self.args.memory
    }

    fn start_operator(&self, ns: &str, what: &str) -> anyhow::Result<Operator> {
        let log = self.args.out_dir.join("logs").join(format!("{ns}-{what}.log"));
        Operator::start(&self.operator_bin, &self.kubeconfig, ns, self.args.concurrency, log)
    }

    fn audit(&self) -> anyhow::Result<Option<AuditLog>> {
        self.audit_path.as_deref().map(AuditLog::at_end).transpose()
    }

    /// Waits until neither the operator nor Kubernetes wrote in `namespaces` for `self.quiet`
    /// (and the operator's counters stood still), collecting the writes read meanwhile.
    async fn settle(
        &self,
        audit: &mut Option<AuditLog>,
        namespaces: &[String],
        operator: Option<&Operator>,
        max: Duration,
        writes: &mut Vec<Write>,
    ) -> anyhow::Result<bool> {
        let started = Instant::now();
        let mut last_activity = Instant::now();
        let mut last_counters = f64::NAN;
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if let Some(audit) = audit {
                let new = audit.read_new(namespaces)?;
                if new.iter().any(|w| matches!(w.actor, Actor::Operator | Actor::System)) {
                    last_activity = Instant::now();
                }
                writes.extend(new);
            }
            if let Some(op) = operator
                && let Some(m) = op.metrics().await
            {
                let counters = m.sum("vmkeep_reconciliations_total", "") + m.sum("vmkeep_api_writes_total", "");
                if counters != last_counters {
                    last_counters = counters;
                    last_activity = Instant::now();
                }
            }
            if last_activity.elapsed() >= self.quiet {
                return Ok(true);
            }
            if started.elapsed() > max {
                return Ok(false);
            }
        }
    }

    /// One run with `n` VMs; after the `last` one, the namespaces' deletion is not waited for.
    async fn run_one(&self, n: usize, last: bool) -> anyhow::Result<(Value, Verdict, report::Point)> {
        let nonce = jiff::Timestamp::now().as_second() % 100_000;
        let ns = format!("vmkeep-bench-{n}-{nonce}");
        let floor_ns = format!("vmkeep-bench-floor-{n}-{nonce}");
        let namespaces = vec![ns.clone()];
        let workload = Workload::new(n, self.args.persistent_every)?;
        let concurrency = usize::from(self.args.concurrency);
        let timeout = Duration::from_secs(self.args.timeout.unwrap_or(120 + n as u64 / 5));
        let settle_max = Duration::from_secs(120 + n as u64 / 10);
        eprintln!(
            "bench: run with {n} VMs ({} persistent) in namespace {ns}, concurrency {concurrency}",
            workload.persistent_vms()
        );

        workload::create_namespace(&self.client, &ns).await?;
        let mut op = self.start_operator(&ns, "operator")?;
        op.ready(Duration::from_secs(60)).await?;

        // Setup: Images and Templates, until every one is ready.
        let setup_started = Instant::now();
        let mut audit = self.audit()?;
        workload::setup(&self.client, &ns, &workload, concurrency).await?;
        let mut setup_writes = Vec::new();
        self.settle(&mut audit, &namespaces, Some(&op), settle_max, &mut setup_writes).await?;
        let setup_seconds = setup_started.elapsed().as_secs_f64();
        eprintln!("bench: setup done in {setup_seconds:.1}s; creating {n} VirtualMachines");

        // The batch: VMs until Starting, then until the operator and Kubernetes are quiet.
        let before = op.metrics().await.unwrap_or_default();
        let mut audit = self.audit()?;
        let batch = workload::batch(&self.client, &ns, &workload.vms, concurrency, timeout).await?;
        eprintln!(
            "bench: {}/{n} Starting, batch {:.2}s; waiting for the writes to settle",
            batch.latencies.len(),
            batch.batch.as_secs_f64()
        );
        let mut batch_writes = Vec::new();
        let settled = self.settle(&mut audit, &namespaces, Some(&op), settle_max, &mut batch_writes).await?;
        let after = op.metrics().await.unwrap_or_default();
        let batch_usage = op.stop().await?;

        // Resync: a new operator on the converged set must write nothing.
        let mut audit = self.audit()?;
        let resync_started = Instant::now();
        let mut op = self.start_operator(&ns, "resync")?;
        op.ready(Duration::from_secs(60)).await?;
        let expected =
            [("VirtualMachine", n), ("Image", workload.images.len()), ("Template", workload.templates.len())];
        let deadline = Instant::now() + settle_max;
        loop {
            let m = op.metrics().await.unwrap_or_default();
            let done = expected
                .iter()
                .all(|(kind, count)| m.sum("vmkeep_reconciliations_total", &format!("\"{kind}\"")) >= *count as f64);
            if done || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let resync_reconciled = resync_started.elapsed().as_secs_f64();
        let mut resync_writes = Vec::new();
        self.settle(&mut audit, &namespaces, Some(&op), settle_max, &mut resync_writes).await?;
        let resync_metrics = op.metrics().await.unwrap_or_default();
        let resync_usage = op.usage()?;

        // The floor: the same PVCs and Pods from a minimal client.
        let floor = if self.floor_disabled() {
            None
        } else {
            workload::create_namespace(&self.client, &floor_ns).await?;
            let floor_namespaces = vec![floor_ns.clone()];
            let mut floor_audit = self.audit()?;
            eprintln!("bench: floor: replaying vmkeep's PVCs and Pods into {floor_ns}");
            let floor = workload::floor(&self.client, &self.floor_client, &ns, &floor_ns, concurrency).await?;
            let mut floor_writes = Vec::new();
            self.settle(&mut floor_audit, &floor_namespaces, None, settle_max, &mut floor_writes).await?;
            Some((floor, floor_writes))
        };

        // Clean up while the operator runs: persistent VMs and Images hold finalizers, and an
        // Image lets go only after its last VM is gone.
        let mut cleanup = json!({"kept": self.args.keep});
        if !self.args.keep {
            let t = Instant::now();
            workload::delete_namespace(&self.client, &ns).await?;
            let deadline = Duration::from_secs(120 + n as u64 / 10);
            let vms: Api<VirtualMachine> = Api::namespaced(self.client.clone(), &ns);
            let images: Api<Image> = Api::namespaced(self.client.clone(), &ns);
            let gone = workload::none_left(&vms, deadline).await? && workload::none_left(&images, deadline).await?;
            cleanup["vms_deleted_seconds"] = json!(round3(t.elapsed().as_secs_f64()));
            cleanup["vms_deleted"] = json!(gone);
            if floor.is_some() {
                workload::delete_namespace(&self.client, &floor_ns).await?;
            }
        }
        let _ = op.stop().await;
        if !self.args.keep && !last {
            // The next run starts on a cluster that has finished this one's deletions.
            let t = Instant::now();
            let mut gone = workload::namespace_gone(&self.client, &ns, Duration::from_secs(600)).await?;
            if floor.is_some() {
                gone &= workload::namespace_gone(&self.client, &floor_ns, Duration::from_secs(600)).await?;
            }
            cleanup["namespaces_gone"] = json!(gone);
            cleanup["namespaces_gone_seconds"] = json!(round3(t.elapsed().as_secs_f64()));
        }

        // Figures.
        let audit_used = self.audit_path.is_some();
        let p = report::percentiles(batch.latencies.values().copied());
        let op_writes: Vec<&Write> = batch_writes.iter().filter(|w| w.actor == Actor::Operator).collect();
        let resync_op: Vec<&Write> = resync_writes.iter().filter(|w| w.actor == Actor::Operator).collect();
        let metric_writes = after.sum("vmkeep_api_writes_total", "") - before.sum("vmkeep_api_writes_total", "");
        let resync_metric_writes = resync_metrics.sum("vmkeep_api_writes_total", "");
        let total_writes = if audit_used { op_writes.len() as u64 } else { metric_writes.max(0.0) as u64 };
        let resync_count = if audit_used { resync_op.len() as u64 } else { resync_metric_writes as u64 };
        let attribution = Attribution::new(&workload);
        let per_vm = attribute(&workload, &attribution, &op_writes, &batch.starting_at);
        let pvc_creates: u64 = per_vm.values().map(|c| c.pvc_creates).sum();
        let pvcs_per_vm = pvc_creates as f64 / n.max(1) as f64;
        let writes_per_vm = total_writes as f64 / n.max(1) as f64;
        // The target counts writes from create to Starting; what follows (PVCs reported Bound
        // in the status) is shown as well.
        let to_starting: u64 = per_vm.values().map(|c| c.to_starting).sum();
        let to_starting_per_vm = to_starting as f64 / n.max(1) as f64;
        let over_limit: Vec<&String> =
            per_vm.iter().filter(|(_, c)| c.to_starting > c.pvc_creates + 4).map(|(vm, _)| vm).collect();
        let over_limit_settled = per_vm.values().filter(|c| c.writes > c.pvc_creates + 4).count();
        let (max_vm, max_direct) =
            per_vm.iter().max_by_key(|(_, c)| c.writes).map(|(vm, c)| (vm.clone(), c.writes)).unwrap_or_default();
        let direct: u64 = per_vm.values().map(|c| c.writes).sum();
        let max_vm_writes: Vec<String> = op_writes
            .iter()
            .filter(|w| attribution.vm_of(w).as_deref() == Some(max_vm.as_str()))
            .map(|w| format!("{} {} {} -> {}", w.verb, w.resource, w.name, w.code))
            .collect();
        let mut failed_codes: BTreeMap<String, u64> = BTreeMap::new();
        for w in op_writes.iter().filter(|w| w.code >= 400) {
            *failed_codes.entry(format!("{} {}", w.code, w.key())).or_default() += 1;
        }
        let agents: HashSet<&str> = op_writes.iter().map(|w| w.user_agent.as_str()).collect();
        let peak_rss = batch_usage.peak_rss_kib.max(resync_usage.peak_rss_kib);
        let batch_secs = batch.batch.as_secs_f64();
        let floor_json = floor.as_ref().map(|(f, writes)| {
            let floor_secs = f.batch.as_secs_f64();
            json!({
                "namespace": floor_ns,
                "batch_seconds": round3(floor_secs),
                "vms": f.units, "pvcs": f.pvcs, "pods": f.pods,
                "writes": writes.iter().filter(|w| w.actor == Actor::Floor).count(),
                "ratio": round3(batch_secs / floor_secs.max(1e-9)),
            })
        });
        let ratio = floor.as_ref().map(|(f, _)| batch_secs / f.batch.as_secs_f64().max(1e-9));
        let all_starting = batch.latencies.len() == n;
        let result = json!({
            "vms": n,
            "persistent_vms": workload.persistent_vms(),
            "images": workload.images.len(),
            "templates": workload.templates.len(),
            "namespace": ns,
            "reached_starting": batch.latencies.len(),
            "failed": batch.failed,
            "missing": batch.missing.iter().take(20).collect::<BTreeMap<_, _>>(),
            "missing_count": batch.missing.len(),
            "create_errors": batch.create_errors.iter().take(20).collect::<Vec<_>>(),
            "time_to_starting_seconds": {
                "p50": round3(p.p50), "p95": round3(p.p95), "p99": round3(p.p99),
                "max": round3(p.max), "mean": round3(p.mean),
            },
            "batch_seconds": round3(batch_secs),
            "stages_seconds": stages::stages(&batch_writes, |w| attribution.vm_of(w), &batch.starting_at),
            "creates_seconds": round3(batch.creates.as_secs_f64()),
            "vms_per_second": round3(n as f64 / batch_secs.max(1e-9)),
            "settled": settled,
            "setup": {
                "seconds": round3(setup_seconds),
                "operator_writes": setup_writes.iter().filter(|w| w.actor == Actor::Operator).count(),
                "by_request": audit::tally(setup_writes.iter().filter(|w| w.actor == Actor::Operator)),
            },
            "writes": {
                "source": if audit_used { "audit log" } else { "operator metrics" },
                "operator_user_agents": agents,
                "operator_total": total_writes,
                "per_vm": round3(writes_per_vm),
                "by_request": audit::tally(op_writes.iter().copied()),
                "failed_requests": failed_codes,
                "pvc_creates_per_vm": round3(pvcs_per_vm),
                "attributed_to_one_vm": direct,
                "shared_objects": op_writes.len() as u64 - direct,
                "per_vm_max": max_direct,
                "per_vm_max_vm": max_vm,
                "per_vm_max_writes": max_vm_writes,
                "to_starting": to_starting,
                "to_starting_per_vm": round3(to_starting_per_vm),
                "to_starting_per_vm_max": per_vm.values().map(|c| c.to_starting).max(),
                "vms_over_own_pvcs_plus_4": over_limit.len(),
                "vms_over_own_pvcs_plus_4_settled": over_limit_settled,
                "by_vm_kind": by_vm_kind(&per_vm),
                "operator_metrics": after.since(&before),
                "kubernetes_writes": audit::tally(batch_writes.iter().filter(|w| w.actor == Actor::System)),
                "bench_writes": batch_writes.iter().filter(|w| w.actor == Actor::Bench).count(),
            },
            "resync": {
                "writes": resync_count,
                "by_request": audit::tally(resync_op.iter().copied()),
                "operator_metric_writes": resync_metric_writes,
                "reconciled_seconds": round3(resync_reconciled),
                "reconciles": resync_metrics.since(&Metrics::default()).into_iter()
                    .filter(|(k, _)| k.starts_with("vmkeep_reconciliations_total"))
                    .collect::<BTreeMap<_, _>>(),
            },
            "floor": floor_json,
            "operator": {
                "batch": batch_usage.json(),
                "resync": resync_usage.json(),
                "reconciles_during_batch": after.since(&before).into_iter()
                    .filter(|(k, _)| k.starts_with("vmkeep_reconciliations_total"))
                    .collect::<BTreeMap<_, _>>(),
            },
            "cleanup": cleanup,
            "targets": {
                "writes_per_vm": {
                    "value": round3(to_starting_per_vm), "limit": round3(pvcs_per_vm + 4.0),
                    "vms_over": over_limit.len(),
                    "met": audit_used && over_limit.is_empty(),
                },
                "resync_writes": {"value": resync_count, "limit": 0, "met": resync_count == 0},
                "floor_ratio": {
                    "value": ratio.map(round3), "limit": 1.5, "applies": n >= 1000,
                    "met": ratio.map(|r| r <= 1.5),
                },
                "peak_rss_mib": {
                    "value": mib(peak_rss), "limit": 64, "applies": n >= 10_000,
                    "met": mib(peak_rss) < 64.0,
                },
                "all_starting": all_starting,
            },
        });
        let verdict = Verdict {
            all_starting,
            resync_writes: Some(resync_count),
            vms_over_writes: audit_used.then_some(over_limit.len()),
        };
        let point = report::Point { vms: n, p50: p.p50, p95: p.p95, p99: p.p99 };
        Ok((result, verdict, point))
    }
}

/// The operator's writes that concern one VM alone, and its PVC creates.
#[derive(Clone, Copy, Debug, Default)]
struct VmWrites {
    /// Until the operator was quiet.
    writes: u64,
    /// Received by the API server before the VM was seen `Starting` (the target's measure).
    to_starting: u64,
    pvc_creates: u64,
    persistent: bool,
}

/// Which VM a write is about, if it concerns one VM alone: the VM itself (and its status), its
/// PVCs (`<vm>-<disk>`), its launcher Pod, its Events (`<vm>.<suffix>`) and the claim Lease of
/// its persistent image. Writes to Images and Templates are shared.
struct Attribution {
    vms: HashSet<String>,
    by_lease: HashMap<String, String>,
}

impl Attribution {
    fn new(workload: &Workload) -> Self {
        Self {
            vms: workload.vms.iter().map(|v| v.name.clone()).collect(),
            by_lease: workload
                .vms
                .iter()
                .filter_map(|v| Some((vmkeep::plan::names::claim_lease(v.persistent_image.as_ref()?), v.name.clone())))
                .collect(),
        }
    }

    fn vm_of(&self, w: &Write) -> Option<String> {
        let known = |name: &str| self.vms.contains(name).then(|| name.to_owned());
        match w.resource.split('/').next().unwrap_or_default() {
            "virtualmachines" => known(&w.name),
            "persistentvolumeclaims" | "pods" => {
                let mut candidate = w.name.as_str();
                while let Some((head, _)) = candidate.rsplit_once('-') {
                    if self.vms.contains(head) {
                        return Some(head.to_owned());
                    }
                    candidate = head;
                }
                None
            }
            "leases" => self.by_lease.get(&w.name).cloned(),
            "events" => w.name.split_once('.').and_then(|(head, _)| known(head)),
            _ => None,
        }
    }
}

/// The writes of each VM (see [`Attribution`]), those before it was seen `Starting`, and its
/// PVC creates.
fn attribute(
    workload: &Workload,
    attribution: &Attribution,
    writes: &[&Write],
    starting_at: &BTreeMap<String, jiff::Timestamp>,
) -> BTreeMap<String, VmWrites> {
    let mut per_vm: BTreeMap<String, VmWrites> = workload
        .vms
        .iter()
        .map(|v| (v.name.clone(), VmWrites { persistent: v.persistent_image.is_some(), ..Default::default() }))
        .collect();
    for w in writes {
        let Some(vm) = attribution.vm_of(w) else { continue };
        let before_starting = matches!((w.at, starting_at.get(&vm)), (Some(at), Some(starting)) if at <= *starting);
        if let Some(entry) = per_vm.get_mut(&vm) {
            entry.writes += 1;
            entry.to_starting += u64::from(before_starting);
            let pvc_create = w.resource == "persistentvolumeclaims" && w.verb == "create" && w.code < 300;
            entry.pvc_creates += u64::from(pvc_create);
        }
    }
    per_vm
}

fn by_vm_kind(per_vm: &BTreeMap<String, VmWrites>) -> Value {
    let mut out = serde_json::Map::new();
    for (label, persistent) in [("non_persistent", false), ("persistent", true)] {
        let group: Vec<&VmWrites> = per_vm.values().filter(|c| c.persistent == persistent).collect();
        if group.is_empty() {
            continue;
        }
        let count = group.len() as f64;
        out.insert(
            label.into(),
            json!({
                "vms": group.len(),
                "writes_mean": round3(group.iter().map(|c| c.writes as f64).sum::<f64>() / count),
                "writes_max": group.iter().map(|c| c.writes).max(),
                "to_starting_mean": round3(group.iter().map(|c| c.to_starting as f64).sum::<f64>() / count),
                "to_starting_max": group.iter().map(|c| c.to_starting).max(),
                "pvc_creates_mean": round3(group.iter().map(|c| c.pvc_creates as f64).sum::<f64>() / count),
            }),
        );
    }
    Value::Object(out)
}

/// Where and when a results file was made: the commit checked out, whether tracked files
/// differed from it, the start, and the load average then.
struct Provenance {
    commit: Option<String>,
    dirty: bool,
    started: jiff::Timestamp,
    load_start: String,
}

impl Provenance {
    fn now() -> Self {
        Self {
            commit: git(&["rev-parse", "--short", "HEAD"]),
            dirty: git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()),
            started: jiff::Timestamp::now(),
            load_start: loadavg(),
        }
    }

    /// A results file of `mode` (`batch`, `boot`): the provenance, the machine, then
    /// `settings` and `runs`.
    fn results(self, mode: &str, settings: Value, runs: Value) -> Value {
        json!({
            "tool": "vmkeep-bench",
            "mode": mode,
            "version": env!("CARGO_PKG_VERSION"),
            "commit": self.commit,
            "dirty": self.dirty,
            "started": self.started.to_string(),
            "finished": jiff::Timestamp::now().to_string(),
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "machine": machine(self.load_start),
            "settings": settings,
            "runs": runs,
        })
    }
}

/// Writes `results` to `out` as pretty JSON, making its folder.
fn write_results(out: &std::path::Path, results: &Value) -> anyhow::Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(results)? + "\n")?;
    Ok(())
}

fn git(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn machine(load_start: String) -> Value {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| Some(l.strip_prefix("model name")?.split_once(':')?.1.trim().to_owned()));
    json!({
        "nproc": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu": cpu,
        "mem_total_kib": mem_kib,
        "mem_total_gib": round3(mem_kib as f64 / 1024.0 / 1024.0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
    })
}

fn usage_line(u: &Value) -> String {
    format!("peak RSS {} MiB, CPU {} s", u["peak_rss_mib"], u["cpu_seconds"])
}

fn met(v: &Value) -> &'static str {
    match v.as_bool() {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "n/a",
    }
}

/// The human summary of one run.
fn summary(r: &Value) -> String {
    let t = &r["time_to_starting_seconds"];
    let w = &r["writes"];
    let mut s = format!("\n== {} VMs ({} with a persistent image) ==\n", r["vms"], r["persistent_vms"]);
    s += &format!(
        "reached Starting    {}/{}{}\n",
        r["reached_starting"],
        r["vms"],
        if r["failed"].as_object().is_some_and(|f| !f.is_empty()) {
            format!("  failed: {}", r["failed"])
        } else {
            String::new()
        }
    );
    s += &format!("time to Starting    p50 {}s  p95 {}s  p99 {}s  max {}s\n", t["p50"], t["p95"], t["p99"], t["max"]);
    s += &format!(
        "batch               {}s ({} VMs/s; creates sent in {}s)\n",
        r["batch_seconds"], r["vms_per_second"], r["creates_seconds"]
    );
    if let Some(stages) = r["stages_seconds"].as_object().filter(|s| !s.is_empty()) {
        s += "stages p50/p95 s   ";
        for (k, v) in stages {
            s += &format!(" {k} {}/{}", v["p50"], v["p95"]);
        }
        s += "\n";
    }
    if let Some(f) = r["floor"].as_object() {
        s += &format!(
            "floor               {}s for the same {} PVCs and {} Pods -> vmkeep / floor = {}  (target <= 1.5 at 1000 VMs: {})\n",
            f["batch_seconds"],
            f["pvcs"],
            f["pods"],
            f["ratio"],
            met(&r["targets"]["floor_ratio"]["met"])
        );
    }
    s += &format!(
        "writes to Starting  {} per VM, at most {} (PVC creates per VM {}; target <= own PVCs + 4 for every VM: {}, {} over)\n",
        w["to_starting_per_vm"],
        w["to_starting_per_vm_max"],
        w["pvc_creates_per_vm"],
        met(&r["targets"]["writes_per_vm"]["met"]),
        w["vms_over_own_pvcs_plus_4"],
    );
    s += &format!(
        "operator writes     {} = {} per VM until quiet (incl. disks reported Bound) [{}]\n",
        w["operator_total"],
        w["per_vm"],
        w["source"].as_str().unwrap_or_default()
    );
    if let Some(by) = w["by_request"].as_object() {
        for (k, v) in by {
            s += &format!("    {:>7}  {k}\n", v.as_u64().unwrap_or_default());
        }
    }
    s += &format!(
        "    one VM's own objects: {} writes, at most {} for one VM ({}); Images and Templates: {}\n",
        w["attributed_to_one_vm"],
        w["per_vm_max"],
        w["per_vm_max_vm"].as_str().unwrap_or_default(),
        w["shared_objects"]
    );
    if let Some(failed) = w["failed_requests"].as_object().filter(|f| !f.is_empty()) {
        s += &format!("    refused: {}\n", Value::Object(failed.clone()));
    }
    let resync = &r["resync"];
    s += &format!(
        "resync writes       {} (target 0: {}) {}\n",
        resync["writes"],
        met(&r["targets"]["resync_writes"]["met"]),
        resync["by_request"]
    );
    s += &format!("operator (batch)    {}\n", usage_line(&r["operator"]["batch"]));
    s += &format!("operator (resync)   {}\n", usage_line(&r["operator"]["resync"]));
    s += &format!("reconciles (batch)  {}\n", r["operator"]["reconciles_during_batch"]);
    s
}
