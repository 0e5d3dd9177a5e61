//! What the tests against a real API server share: the cluster (the local control plane by
//! default, or any cluster named by `VMKEEP_TEST_KUBECONFIG`), kubectl, a namespace per test, the
//! operator process, and waiting on conditions with deadlines.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::{
    io::Write,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

pub mod chart;
pub mod env;
pub mod host;
pub mod kubevirt;
pub mod node;

use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

/// The repository's root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn hack(args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(repo().join("hack/cluster.sh"))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("cannot run hack/cluster.sh");
    assert!(out.status.success(), "hack/cluster.sh {} failed", args.join(" "));
    String::from_utf8(out.stdout).expect("utf-8").trim().lines().last().unwrap_or_default().to_owned()
}

/// The kubeconfig of the cluster under test: `VMKEEP_TEST_KUBECONFIG` when set, else the local
/// control plane, started on first use (`hack/cluster.sh up`, idempotent).
pub fn kubeconfig() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| match std::env::var_os("VMKEEP_TEST_KUBECONFIG") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(hack(&["up"])),
    })
}

/// Whether the tests run on the local control plane (which they may reshape freely).
pub fn is_local_cluster() -> bool {
    std::env::var_os("VMKEEP_TEST_KUBECONFIG").is_none_or(|p| p.is_empty())
}

/// The kubectl the tests use: `VMKEEP_KUBECTL` or the one `hack/cluster.sh tools` installs.
pub fn kubectl_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| match std::env::var_os("VMKEEP_KUBECTL") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(hack(&["tools"])).join("kubectl"),
    })
}

/// The helm the tests use: `HELM` (as for hack/render-deploy.sh) or the one `hack/cluster.sh
/// tools` installs.
pub fn helm_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| match std::env::var_os("HELM") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(hack(&["tools"])).join("helm"),
    })
}

/// Runs kubectl against the cluster under test with `stdin` as its input.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    kubectl_with(kubeconfig(), args, stdin)
}

/// Runs kubectl with another kubeconfig (another identity) and `stdin` as its input.
pub fn kubectl_with(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(kubectl_path())
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start kubectl");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.unwrap_or_default().as_bytes()).expect("write to kubectl");
    drop(input);
    child.wait_with_output().expect("kubectl")
}

/// Runs kubectl and panics with its output unless it succeeds; returns stdout.
pub fn kubectl_ok(args: &[&str], stdin: Option<&str>) -> String {
    let out = kubectl(args, stdin);
    assert!(
        out.status.success(),
        "kubectl {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A client for the cluster under test.
pub async fn client() -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig()).expect("read the kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("kubeconfig");
    Client::try_from(config).expect("client")
}

/// Installs (or updates) the committed CRDs and waits until they are established.
pub fn install_crds() {
    let crds = repo().join("crds");
    kubectl_ok(&["apply", "--server-side", "--force-conflicts", "-f", crds.to_str().unwrap()], None);
    kubectl_ok(&["wait", "--for=condition=Established", "--timeout=60s", "-f", crds.to_str().unwrap()], None);
}

/// A namespace of its own for one test, deleted (in the background) when dropped.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub fn new(test: &str) -> Self {
        let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").subsec_nanos();
        let name = format!("vmkeep-test-{test}-{nonce:x}");
        kubectl_ok(&["create", "namespace", &name], None);
        Self { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "namespace", &self.name, "--wait=false"], None);
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_for<T>(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The name of a node that Pods can run on (Ready, schedulable, without NoSchedule or NoExecute
/// taints), if the cluster under test has one. Tests that need running Pods skip without it.
pub fn schedulable_node() -> Option<String> {
    let nodes: serde_json::Value = serde_json::from_str(&kubectl_ok(&["get", "nodes", "-o", "json"], None)).ok()?;
    nodes["items"].as_array()?.iter().find_map(|node| {
        let ready =
            node["status"]["conditions"].as_array()?.iter().any(|c| c["type"] == "Ready" && c["status"] == "True");
        let tainted = node["spec"]["taints"]
            .as_array()
            .is_some_and(|taints| taints.iter().any(|t| t["effect"] == "NoSchedule" || t["effect"] == "NoExecute"));
        let cordoned = node["spec"]["unschedulable"] == true;
        (ready && !tainted && !cordoned).then(|| node["metadata"]["name"].as_str().map(str::to_owned))?
    })
}

/// Whether a VM in phase `actual` has reached `wanted`. `Starting` is reached once the launcher
/// Pod exists, so on a cluster whose Pods run a VM already `Running` has reached it too; every
/// other phase is reached only by itself.
pub fn reached(
    actual: Option<vmkeep::api::virtual_machine::VirtualMachinePhase>,
    wanted: vmkeep::api::virtual_machine::VirtualMachinePhase,
) -> bool {
    use vmkeep::api::virtual_machine::VirtualMachinePhase::{Running, Starting};
    actual == Some(wanted) || (wanted == Starting && actual == Some(Running))
}

/// Runs its closure when dropped: a cleanup that happens after the happy path and after a
/// failed assertion alike.
pub struct OnDrop<F: FnMut()>(pub F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

pub use vmkeep::health::probe as http_get;

/// A `vmkeep run` process against the cluster under test; killed when dropped. Its log is
/// `target/e2e-logs/<name>.log`.
pub struct Operator {
    child: Child,
    pub http: SocketAddr,
    pub log: PathBuf,
}

impl Operator {
    pub fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    /// Starts `vmkeep run` for one namespace only, so tests in parallel do not share operators.
    pub fn for_namespace(name: &str, namespace: &str) -> Self {
        Self::start_with(name, &["--namespace", namespace])
    }

    pub fn start_with(name: &str, args: &[&str]) -> Self {
        Self::start_with_kubeconfig(name, kubeconfig(), args)
    }

    /// Starts `vmkeep run` with another kubeconfig, e.g. one holding a ServiceAccount's token.
    pub fn start_with_kubeconfig(name: &str, kubeconfig: &Path, args: &[&str]) -> Self {
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let logs = repo().join("target/e2e-logs");
        std::fs::create_dir_all(&logs).expect("log folder");
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_vmkeep"))
            .args(["run", "--http-addr", &http.to_string()])
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,vmkeep=debug")
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("cannot start vmkeep");
        Self { child, http, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's exit status if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// SIGKILL, and waits until it is gone (a crash, no goodbye).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM, as the kubelet does on Pod deletion.
    pub fn terminate(&self) {
        let ok = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("kill");
        assert!(ok.success(), "kill -TERM failed");
    }

    /// Waits until `/readyz` answers 200.
    pub async fn ready(&mut self) {
        let http = self.http;
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_get(http, "/readyz").is_none_or(|(s, _)| s != 200) {
            assert!(self.exited().is_none(), "vmkeep exited:\n{}", self.log_text());
            assert!(Instant::now() < deadline, "vmkeep not ready after 60s:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The sum of the samples of a counter family (`vmkeep_<name>_total`), optionally only
    /// those whose labels contain `filter`.
    pub fn counter(&self, name: &str, filter: &str) -> u64 {
        let (_, body) = http_get(self.http, "/metrics").expect("/metrics answers");
        let prefix = format!("vmkeep_{name}_total");
        body.lines()
            .filter(|l| l.starts_with(&prefix) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// The value of a gauge (`vmkeep_<name>`), if the operator answers.
    pub fn gauge(&self, name: &str) -> Option<i64> {
        let (_, body) = http_get(self.http, "/metrics")?;
        let prefix = format!("vmkeep_{name} ");
        body.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test guest of `hack/guest.sh` (built once, cached; installs Debian packages, so root
/// only): a BIOS-bootable raw disk. Its variants lie beside it.
pub fn guest_image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| host::build_guest(repo()).unwrap_or_else(|e| panic!("{e}")))
}

/// Asserts that `pvc` is a clone of the image PVC `source`, made as the cluster's storage allows
/// (docs/clones.md): a `csi-clone` (its `dataSource`) or a `copy` (its copy-source annotation).
/// Returns the strategy.
pub fn assert_clone_of(pvc: &k8s_openapi::api::core::v1::PersistentVolumeClaim, source: &str) -> String {
    use kube::ResourceExt;
    use vmkeep::plan::names;
    let annotations = pvc.annotations();
    let strategy = annotations.get(names::CLONE_STRATEGY_ANNOTATION).cloned().unwrap_or_default();
    if strategy == "copy" {
        assert_eq!(annotations.get(names::COPY_SOURCE_ANNOTATION).map(String::as_str), Some(source), "{annotations:?}");
        assert!(pvc.spec.as_ref().and_then(|s| s.data_source.as_ref()).is_none(), "a copy has no dataSource");
    } else {
        let data_source = pvc.spec.as_ref().and_then(|s| s.data_source.clone()).expect("the clone has a dataSource");
        assert_eq!((data_source.kind.as_str(), data_source.name.as_str()), ("PersistentVolumeClaim", source));
    }
    strategy
}
