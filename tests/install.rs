//! The install paths against a real cluster: the Helm chart (lint, render, install, uninstall,
//! its values schema), the rendered `deploy/` manifests (up to date, and they install and
//! uninstall cleanly), the chart's RBAC (enough for the operator, and no more), and the offline
//! OCI image of `hack/image.sh`. With a schedulable node the operator installed by `helm install`
//! and by `kubectl apply -f deploy/` runs in the cluster with the chart's ServiceAccount, becomes
//! Available and serves VMs that then run; its webhook answers through its Service. The images
//! are the ones `hack/images.sh` imports into the local node (load them into another cluster).

mod support;

use std::{
    fs::File,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::{Api, Client};
use support::{chart::*, *};
use vmkeep::{
    api::{Image, VirtualMachine, virtual_machine::VirtualMachinePhase},
    plan::names,
};

/// Serialises the tests of this file that run an operator: one installed in the cluster serves
/// every namespace, so no other operator may serve any namespace meanwhile.
static OPERATORS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const LONG: Duration = Duration::from_secs(60);
/// `hack/image.sh` installs Debian packages and downloads some on its first run.
const IMAGE_BUILD: Duration = Duration::from_secs(900);

async fn wait_all_gone(what: &str, references: &[String], namespace: &str) {
    wait_for(what, LONG, async || existing(references, namespace).is_empty().then_some(())).await;
}

#[tokio::test]
async fn the_chart_lints_renders_installs_and_uninstalls() {
    let _alone = OPERATORS.lock().await;
    install_crds();
    let ns = TestNamespace::new("install-chart");
    // Cluster-scoped names derive from the release name: one per test run.
    let release = ns.name.clone();
    helm_ok(&["lint", "--strict", CHART]);

    let rendered = render(&release, &ns.name, &[]);
    assert!(rendered.status.success(), "helm template failed:\n{}", text(&rendered.stderr));
    let manifest = text(&rendered.stdout);
    kubectl_ok(&["apply", "--dry-run=server", "-n", &ns.name, "-f", "-"], Some(&manifest));
    let rendered = objects(&manifest);
    let mut kinds: Vec<&str> = rendered.iter().map(|o| o["kind"].as_str().expect("kind")).collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]);
    let all: Vec<String> = rendered.iter().map(reference).collect();
    let cluster_scoped: Vec<String> = rendered.iter().filter(|o| is_cluster_scoped(o)).map(reference).collect();
    assert_eq!(cluster_scoped.len(), 2, "{cluster_scoped:?}");

    let _cleanup = OnDrop(|| {
        let _ = helm(&["uninstall", &release, "--namespace", &ns.name, "--ignore-not-found"]);
        delete_quietly(&cluster_scoped, &ns.name);
    });
    // The CRDs are installed by install_crds(), never by (and never owned by) this release.
    helm_ok(&["install", &release, CHART, "--namespace", &ns.name, "--skip-crds"]);
    let installed = existing(&all, &ns.name);
    assert_eq!(installed.len(), all.len(), "helm install created {installed:?} of {all:?}");
    let crd_owners = kubectl_ok(
        &["get", "-f", repo().join("crds").to_str().unwrap(), "-o", r#"jsonpath={.items[*].metadata.annotations}"#],
        None,
    );
    assert!(!crd_owners.contains(&release), "the release took the CRDs: {crd_owners}");
    // The release's Deployment and ServiceAccount are named after the release.
    serves_in_cluster(&ns.name, &release, &release).await;

    helm_ok(&["uninstall", &release, "--namespace", &ns.name]);
    wait_all_gone("helm uninstall to remove the cluster-scoped objects", &cluster_scoped, &ns.name).await;
    wait_all_gone("helm uninstall to remove every object", &all, &ns.name).await;
}

#[tokio::test]
async fn the_in_cluster_webhook_denies_a_second_claim_and_uninstall_leaves_nothing() {
    let _alone = OPERATORS.lock().await;
    install_crds();
    if schedulable_node().is_none() {
        eprintln!("skipped: the webhook is served by the operator's Pod, and the cluster has no schedulable node");
        return;
    }
    let ns = TestNamespace::new("install-webhook");
    let release = ns.name.clone();
    let values = ["--set", "webhook.enabled=true"];
    let rendered = render(&release, &ns.name, &values);
    assert!(rendered.status.success(), "helm template failed:\n{}", text(&rendered.stderr));
    let rendered = objects(&text(&rendered.stdout));
    let all: Vec<String> = rendered.iter().map(reference).collect();
    let cluster_scoped: Vec<String> = rendered.iter().filter(|o| is_cluster_scoped(o)).map(reference).collect();
    let _cleanup = OnDrop(|| {
        delete_vmkeep_objects(&ns.name);
        let _ = helm(&["uninstall", &release, "--namespace", &ns.name, "--ignore-not-found"]);
        delete_quietly(&cluster_scoped, &ns.name);
    });
    helm_ok(&[&["install", &release, CHART, "--namespace", &ns.name, "--skip-crds"], &values[..]].concat());
    kubectl_ok(
        &["wait", "--for=condition=Available", &format!("deployment/{release}"), "-n", &ns.name, "--timeout=180s"],
        None,
    );

    kubectl_ok(&["apply", "-n", &ns.name, "-f", "-"], Some(SCENARIO));
    let client = client().await;
    let images: Api<Image> = Api::namespaced(client.clone(), &ns.name);
    wait_for("Image disk to be claimed by holder", LONG, async || {
        let claimed_by = images.get("disk").await.expect("get image").status?.claimed_by?;
        (claimed_by.name == "holder").then_some(())
    })
    .await;
    // The API server calls the webhook through its Service once the operator has written the
    // caBundle; until then failurePolicy Ignore admits, so ask (dry run) until it answers.
    let expected = vmkeep::plan::claim::in_use_message("disk", "holder");
    wait_for("the webhook to deny the latecomer (dry run)", LONG, async || {
        let out = kubectl(&["apply", "--dry-run=server", "-n", &ns.name, "-f", "-"], Some(LATECOMER));
        (!out.status.success() && text(&out.stderr).contains(&expected)).then_some(())
    })
    .await;
    let denied = kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(LATECOMER));
    assert!(!denied.status.success(), "kubectl apply admitted a second claim");
    let stderr = text(&denied.stderr);
    assert!(stderr.contains("denied the request") && stderr.contains(&expected), "{stderr}");
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns.name);
    assert!(vms.get_opt("latecomer").await.expect("get vm").is_none(), "the denied VM exists");

    assert!(delete_vmkeep_objects(&ns.name), "the operator did not finish deleting the VMs and images");
    helm_ok(&["uninstall", &release, "--namespace", &ns.name]);
    wait_all_gone("helm uninstall to remove every object", &all, &ns.name).await;
    // Nothing else either: the webhook's certificate Secret (owned by the webhook configuration)
    // and the operator's Pods go too; what is left is what every namespace has.
    let left = wait_for("the namespace to hold only its defaults", Duration::from_secs(120), async || {
        let listed = kubectl_ok(
            &["get", "pods,secrets,configmaps,services,serviceaccounts,leases", "-n", &ns.name, "-o", "name"],
            None,
        );
        let left: Vec<String> = listed
            .lines()
            .filter(|l| {
                !(*l == "configmap/kube-root-ca.crt"
                    || *l == "serviceaccount/default"
                    || l.starts_with("secret/default-token-"))
            })
            .map(str::to_owned)
            .collect();
        left.is_empty().then_some(left)
    })
    .await;
    assert!(left.is_empty());
}

#[tokio::test]
async fn the_values_schema_rejects_typos_and_more_replicas_need_leader_election() {
    let typo = render("schema", "schema", &["--set", "replicaz=2"]);
    assert!(!typo.status.success(), "a misspelled key was accepted");
    let stderr = text(&typo.stderr);
    assert!(stderr.contains("additional properties") && stderr.contains("replicaz"), "{stderr}");

    let unelected = render("schema", "schema", &["--set", "replicas=2"]);
    assert!(!unelected.status.success(), "two replicas without leader election were accepted");
    assert!(text(&unelected.stderr).contains("leaderElection.enabled"), "{}", text(&unelected.stderr));

    let elected = render("schema", "schema", &["--set", "replicas=2", "--set", "leaderElection.enabled=true"]);
    assert!(elected.status.success(), "{}", text(&elected.stderr));
    let rendered = objects(&text(&elected.stdout));
    let deployment = rendered.iter().find(|o| o["kind"] == "Deployment").expect("a Deployment");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let args = &deployment["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(args.as_sequence().expect("args").iter().any(|a| *a == "--leader-elect"), "args: {args:?}");
}

#[tokio::test]
async fn deploy_is_the_rendered_chart() {
    let out = Command::new("bash")
        .current_dir(repo())
        .env("HELM", helm_path())
        .args(["hack/render-deploy.sh", "--check"])
        .output()
        .expect("cannot run hack/render-deploy.sh");
    assert!(
        out.status.success(),
        "deploy/ or charts/vmkeep/crds/ is out of date: run hack/render-deploy.sh and commit the result\n{}",
        text(&out.stderr)
    );
}

/// A non-persistent image cloned for two VMs, and a persistent image held by one VM.
const SCENARIO: &str = r#"
apiVersion: vmkeep.io/v1alpha1
kind: Image
metadata: {name: os}
spec: {size: 1Gi, source: {blank: {}}}
---
apiVersion: vmkeep.io/v1alpha1
kind: Image
metadata: {name: disk}
spec: {persistent: true, size: 1Gi, source: {blank: {}}}
---
apiVersion: vmkeep.io/v1alpha1
kind: Template
metadata: {name: shared}
spec: {cpu: 1, memory: 128Mi, launcher: {terminationGracePeriodSeconds: 10}, disks: [{name: root, image: os}]}
---
apiVersion: vmkeep.io/v1alpha1
kind: Template
metadata: {name: exclusive}
spec: {cpu: 1, memory: 128Mi, launcher: {terminationGracePeriodSeconds: 10}, disks: [{name: data, image: disk}]}
---
apiVersion: vmkeep.io/v1alpha1
kind: VirtualMachine
metadata: {name: clone-1}
spec: {templateRef: {name: shared}}
---
apiVersion: vmkeep.io/v1alpha1
kind: VirtualMachine
metadata: {name: clone-2}
spec: {templateRef: {name: shared}}
---
apiVersion: vmkeep.io/v1alpha1
kind: VirtualMachine
metadata: {name: holder}
spec: {templateRef: {name: exclusive}, onImageConflict: Reject}
"#;

/// Applied once `holder` holds the persistent image.
const LATECOMER: &str = r#"
apiVersion: vmkeep.io/v1alpha1
kind: VirtualMachine
metadata: {name: latecomer}
spec: {templateRef: {name: exclusive}, onImageConflict: Reject}
"#;

async fn wait_phase(vms: &Api<VirtualMachine>, name: &str, phase: VirtualMachinePhase) -> VirtualMachine {
    wait_for(&format!("VirtualMachine {name} to be {phase:?}"), LONG, async || {
        vms.get_opt(name).await.expect("get vm").filter(|vm| reached(vm.status.as_ref().and_then(|s| s.phase), phase))
    })
    .await
}

/// With a schedulable node: waits until the operator's Deployment `deployment` in `namespace` is
/// Available, checks that it acts as ServiceAccount `sa` (its log, and the audit log of the
/// local cluster), and that it serves VMs applied now, one of which then runs on the node.
/// Without a node it says so and checks nothing.
async fn serves_in_cluster(namespace: &str, deployment: &str, sa: &str) {
    if schedulable_node().is_none() {
        eprintln!("no schedulable node: not running the operator in the cluster");
        return;
    }
    let (audit_log, audit_start) = audit_log_now();
    let started = std::time::Instant::now();
    let available = kubectl(
        &["wait", "--for=condition=Available", &format!("deployment/{deployment}"), "-n", namespace, "--timeout=180s"],
        None,
    );
    if !available.status.success() {
        let pods = kubectl(&["describe", "pods", "-n", namespace], None);
        panic!("the operator did not become Available: {}\n{}", text(&available.stderr), text(&pods.stdout));
    }
    eprintln!("operator Deployment Available after {:.1} s", started.elapsed().as_secs_f64());
    let identity = format!("ServiceAccount {namespace}/{sa} (in-cluster token)");
    let logs = kubectl_ok(&["logs", &format!("deployment/{deployment}"), "-n", namespace], None);
    assert!(logs.contains(&identity), "the operator's log does not name {identity}:\n{logs}");

    let scenario = TestNamespace::new("in-cluster");
    run_core_scenarios(client().await, &scenario.name, true).await;
    let logs = kubectl_ok(&["logs", &format!("deployment/{deployment}"), "-n", namespace], None);
    let refused = refusals_in(&logs);
    assert!(refused.is_empty(), "the operator was refused requests:\n{}", refused.join("\n"));
    if is_local_cluster() {
        let user = format!("system:serviceaccount:{namespace}:{sa}");
        let (count, refused) = audited_requests(&audit_log, audit_start, &user);
        assert!(count > 0, "no request of {user} in {}", audit_log.display());
        assert!(refused.is_empty(), "requests of {user} answered 403:\n{}", refused.join("\n"));
        eprintln!("in-cluster operator: {count} writes as {user}, none refused");
    }
}

/// The core scenarios with the given operator running: clones per VM, one holder of a
/// persistent image, a second claim rejected; then everything deleted through the finalizers.
/// With `running`, one of the VMs must also reach `Running` (a node runs its launcher Pod).
async fn run_core_scenarios(client: Client, namespace: &str, running: bool) {
    kubectl_ok(&["apply", "-n", namespace, "-f", "-"], Some(SCENARIO));
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), namespace);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    for vm in ["clone-1", "clone-2"] {
        wait_phase(&vms, vm, VirtualMachinePhase::Starting).await;
        let pvc = pvcs.get(&names::vm_disk_pvc(vm, "root")).await.expect("the VM's own clone PVC");
        assert_clone_of(&pvc, &names::image_pvc("os"));
    }

    let holder = wait_phase(&vms, "holder", VirtualMachinePhase::Starting).await;
    let disks = holder.status.expect("status").disks;
    assert_eq!(disks.iter().map(|d| d.pvc_name.clone()).collect::<Vec<_>>(), [Some(names::image_pvc("disk"))]);
    let images: Api<Image> = Api::namespaced(client, namespace);
    wait_for("Image disk to be claimed by holder", LONG, async || {
        let claimed_by = images.get("disk").await.expect("get image").status?.claimed_by?;
        (claimed_by.name == "holder").then_some(())
    })
    .await;
    kubectl_ok(&["apply", "-n", namespace, "-f", "-"], Some(LATECOMER));
    let rejected = wait_phase(&vms, "latecomer", VirtualMachinePhase::Rejected).await;
    let conditions = rejected.status.expect("status").conditions;
    let claimed = conditions.iter().find(|c| c.r#type == "ImagesClaimed").expect("condition ImagesClaimed");
    assert_eq!(claimed.reason, "ImageInUse");
    if running {
        // Each launcher requests a whole cpu: on a small node only some of them run.
        let running = wait_for("a VM to run", Duration::from_secs(120), async || {
            for name in ["clone-1", "clone-2", "holder"] {
                let vm = vms.get(name).await.expect("get vm");
                if vm.status.and_then(|s| s.phase) == Some(VirtualMachinePhase::Running) {
                    return Some(name);
                }
            }
            None
        })
        .await;
        eprintln!("VirtualMachine {running} runs on the node");
    }

    assert!(delete_vmkeep_objects(namespace), "the operator did not finish deleting the VMs and images");
}

#[tokio::test]
async fn the_chart_rbac_is_enough_for_the_operator_and_no_more() {
    let _alone = OPERATORS.lock().await;
    install_crds();
    let ns = TestNamespace::new("install-rbac");
    let account = ChartAccount::new(&ns.name, &ns.name, &[]).await;
    let (config, user) = (&account.kubeconfig, &account.user);
    let (audit_log, audit_start) = audit_log_now();

    // The chart's ServiceAccount, with leader election (the chart's leaderElection.enabled)
    // renewing its Lease every second.
    let election = ["--leader-elect", "--leader-election-namespace", &ns.name, "--leader-election-seconds", "3"];
    let args = [&["--namespace", ns.name.as_str()][..], &election[..]].concat();
    let mut operator = Operator::start_with_kubeconfig("install-rbac", config, &args);
    let log = operator.log.clone();
    let _objects_cleanup = OnDrop(|| {
        delete_vmkeep_objects(&ns.name);
        // A scenario that times out for want of a permission says so in the operator's log.
        if std::thread::panicking() {
            eprintln!("refused requests in {}:\n{}", log.display(), refusals(&log).join("\n"));
        }
    });
    operator.ready().await;
    run_core_scenarios(client().await, &ns.name, false).await;
    assert!(operator.exited().is_none(), "the operator died:\n{}", operator.log_text());
    let refused = refusals(&log);
    assert!(refused.is_empty(), "the operator was refused requests:\n{}", refused.join("\n"));

    if is_local_cluster() {
        let (count, refused) = audited_requests(&audit_log, audit_start, user);
        assert!(count > 0, "no request of {user} in {}", audit_log.display());
        assert!(refused.is_empty(), "requests of {user} answered 403:\n{}", refused.join("\n"));
        eprintln!("audit log: {count} requests of {user}, none refused");
    } else {
        eprintln!("not the local control plane: no audit log to check for 403s (the operator's log has none)");
    }

    // No rule, no access: Secrets, other kinds, verbs the rules leave out.
    let refused: [&[&str]; 6] = [
        &["get", "secrets"],
        &["get", "secrets", "--all-namespaces"],
        &["get", "deployments"],
        &["delete", "persistentvolumes", "x"],
        &["create", "configmap", "x", "--from-literal=a=b"],
        &["delete", "images.vmkeep.io", "x"],
    ];
    for args in refused {
        let out = kubectl_with(config, &[args, &["-n", &ns.name]].concat(), None);
        let stderr = text(&out.stderr);
        assert!(!out.status.success() && stderr.contains("is forbidden: User"), "{user} may {args:?}: {stderr}");
    }
}

#[tokio::test]
async fn the_plain_manifests_install_and_uninstall_without_leftovers() {
    let _alone = OPERATORS.lock().await;
    install_crds();
    let deploy = repo().join("deploy");
    let deploy = deploy.to_str().unwrap();
    let manifest = std::fs::read_to_string(repo().join("deploy/vmkeep.yaml")).expect("deploy/vmkeep.yaml");
    let cluster_scoped: Vec<String> =
        objects(&manifest).iter().filter(|o| is_cluster_scoped(o)).map(reference).collect();
    assert!(cluster_scoped.contains(&"namespace/vmkeep".to_owned()), "{cluster_scoped:?}");
    // deploy/ has fixed names: never replace an install that is not this test's (marked by
    // this label on its Namespace), only what an interrupted run of it left behind.
    const MARK: &str = "vmkeep.io/installed-by-test=install";
    let marked = ["get", "namespaces", "-l", MARK, "--field-selector", "metadata.name=vmkeep", "-o", "name"];
    let ours = !kubectl_ok(&marked, None).trim().is_empty();
    let present = existing(&cluster_scoped, "vmkeep");
    assert!(ours || present.is_empty(), "{present:?} exist and are not this test's: not touching another install");
    if ours {
        kubectl_ok(&["delete", "-f", deploy, "--ignore-not-found", "--timeout=120s"], None);
    }

    let _cleanup = OnDrop(|| {
        let _ = kubectl(&["delete", "-f", deploy, "--ignore-not-found", "--wait=false"], None);
    });
    kubectl_ok(&["apply", "-f", deploy], None);
    kubectl_ok(&["label", "namespace", "vmkeep", MARK], None);
    let installed = existing(&cluster_scoped, "vmkeep");
    assert_eq!(installed.len(), cluster_scoped.len(), "{installed:?}");
    kubectl_ok(&["get", "deployment/vmkeep", "serviceaccount/vmkeep", "service/vmkeep-metrics", "-n", "vmkeep"], None);
    serves_in_cluster("vmkeep", "vmkeep", "vmkeep").await;

    kubectl_ok(&["delete", "-f", deploy, "--timeout=120s"], None);
    wait_all_gone("kubectl delete to remove the cluster-scoped objects", &cluster_scoped, "vmkeep").await;
    let crds = kubectl_ok(&["get", "-f", repo().join("crds").to_str().unwrap(), "-o", "name"], None);
    assert_eq!(crds.lines().count(), 3, "the CRDs must stay: {crds}");
}

#[tokio::test]
async fn the_offline_image_runs_as_nonroot() {
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| text(&o.stdout).trim() == "0");
    if !root || !repo().join("hack/image.sh").exists() {
        eprintln!("skipped: hack/image.sh needs root (and the script)");
        return;
    }
    let logs = repo().join("target/e2e-logs");
    std::fs::create_dir_all(&logs).expect("log folder");
    let (stdout_path, stderr_path) = (logs.join("image.stdout"), logs.join("image.stderr"));
    // A cache of its own in target/: the developer's ~/.cache/vmkeep/image stays untouched.
    let cache: PathBuf = repo().join("target/e2e-image");
    let mut child = tokio::process::Command::new("bash")
        .current_dir(repo())
        .env("VMKEEP_CACHE", &cache)
        .args(["hack/image.sh", "--binary", env!("CARGO_BIN_EXE_vmkeep")])
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path).expect("stdout file"))
        .stderr(File::create(&stderr_path).expect("stderr file"))
        .kill_on_drop(true)
        .spawn()
        .expect("cannot run hack/image.sh");
    let status = wait_for("hack/image.sh to finish", IMAGE_BUILD, async || child.try_wait().expect("try_wait")).await;
    let (stdout, stderr) =
        (std::fs::read_to_string(&stdout_path).unwrap(), std::fs::read_to_string(&stderr_path).unwrap());
    assert!(status.success(), "hack/image.sh failed:\n{stderr}");
    assert!(stderr.contains("run as 65532:65532 on a read-only root"), "the check did not run as 65532:\n{stderr}");
    let reference = stdout.trim().lines().last().unwrap_or_default();
    let layout = cache.join("image/oci");
    assert_eq!(reference, format!("{}:{}", layout.display(), env!("CARGO_PKG_VERSION")));
    assert!(layout.join("index.json").exists(), "no OCI layout at {}", layout.display());
}
