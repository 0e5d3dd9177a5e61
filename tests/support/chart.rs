//! The Helm chart and identities made from it, shared by the install tests and the runtime tests
//! that run the operator as the chart's ServiceAccount: rendering, the objects of a manifest, a
//! ServiceAccount's token and kubeconfig, and the requests the operator was refused (its log
//! and, on the local cluster, the API server's audit log).

use std::{
    fs::File,
    io::{BufRead, BufReader, Seek, SeekFrom},
    path::Path,
    process::{Command, Output},
};

use serde::Deserialize;
use serde_yaml::Value;

use super::{env::LONG, helm_path, kubeconfig, kubectl, kubectl_ok, repo, wait_for};

/// The chart, relative to the repository.
pub const CHART: &str = "charts/vmkeep";

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs helm (in the repository, against the cluster under test).
pub fn helm(args: &[&str]) -> Output {
    Command::new(helm_path())
        .current_dir(repo())
        .env("KUBECONFIG", kubeconfig())
        .args(args)
        .output()
        .expect("cannot run helm")
}

/// Runs helm and panics with its output unless it succeeds; returns stdout.
pub fn helm_ok(args: &[&str]) -> String {
    let out = helm(args);
    assert!(out.status.success(), "helm {} failed:\n{}{}", args.join(" "), text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

/// `helm template` of the chart as `release` into `namespace`, with extra arguments.
pub fn render(release: &str, namespace: &str, extra: &[&str]) -> Output {
    helm(&[&["template", release, CHART, "--namespace", namespace], extra].concat())
}

/// The objects of a multi-document YAML stream.
pub fn objects(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("valid YAML"))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// `kind/name` of an object, as kubectl takes it.
pub fn reference(object: &Value) -> String {
    let kind = object["kind"].as_str().expect("kind").to_lowercase();
    format!("{kind}/{}", object["metadata"]["name"].as_str().expect("name"))
}

pub fn is_cluster_scoped(object: &Value) -> bool {
    object["metadata"]["namespace"].is_null()
}

/// Which of `references` (`kind/name`) exist, in `namespace` for namespaced kinds.
pub fn existing(references: &[String], namespace: &str) -> Vec<String> {
    if references.is_empty() {
        return Vec::new();
    }
    let args = [&["get", "--ignore-not-found", "-o", "name", "-n", namespace][..], &str_refs(references)[..]].concat();
    kubectl_ok(&args, None).lines().map(str::to_owned).collect()
}

pub fn str_refs(strings: &[String]) -> Vec<&str> {
    strings.iter().map(String::as_str).collect()
}

/// Deletes `references` (cluster-scoped ones, namespaced ones in `namespace`) if they exist.
pub fn delete_quietly(references: &[String], namespace: &str) {
    if !references.is_empty() {
        let args = [&["delete", "--ignore-not-found", "--wait=false", "-n", namespace][..], &str_refs(references)[..]];
        let _ = kubectl(&args.concat(), None);
    }
}

/// The token of ServiceAccount `sa`: on clusters before 1.24 the Secret the token controller
/// makes for it (`<sa>-token-*`, listed in the account's `.secrets`), else a TokenRequest.
pub async fn service_account_token(namespace: &str, sa: &str) -> String {
    let version: serde_json::Value = serde_json::from_str(&kubectl_ok(&["version", "-o", "json"], None)).unwrap();
    let minor = version["serverVersion"]["minor"].as_str().expect("server minor version");
    let minor: u32 = minor.trim_end_matches(|c: char| !c.is_ascii_digit()).parse().expect("minor version");
    if minor >= 24 {
        return kubectl_ok(&["create", "token", sa, "-n", namespace, "--duration=2h"], None).trim().to_owned();
    }
    let secret = wait_for(&format!("the token Secret of ServiceAccount {sa}"), LONG, async || {
        let names =
            kubectl_ok(&["get", "serviceaccount", sa, "-n", namespace, "-o", "jsonpath={.secrets[*].name}"], None);
        names.split_whitespace().find(|n| n.starts_with(&format!("{sa}-token-"))).map(str::to_owned)
    })
    .await;
    // The token controller creates the Secret with its token before it lists it in `.secrets`.
    let template = "go-template={{.data.token | base64decode}}";
    kubectl_ok(&["get", "secret", &secret, "-n", namespace, "-o", template], None).trim().to_owned()
}

/// Writes a kubeconfig for `token` to the cluster under test (server and CA of the admin's).
pub fn token_kubeconfig(path: &Path, token: &str, namespace: &str) {
    let admin = kubectl_ok(&["config", "view", "--raw", "--minify", "--flatten", "-o", "json"], None);
    let admin: serde_json::Value = serde_json::from_str(&admin).expect("kubeconfig as JSON");
    let cluster = admin["clusters"][0]["cluster"].clone();
    assert!(cluster["server"].is_string(), "no server in the admin kubeconfig");
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": cluster}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "cluster", "user": "operator", "namespace": namespace}}],
        "current-context": "operator",
    });
    std::fs::write(path, serde_json::to_string_pretty(&config).unwrap()).expect("write the kubeconfig");
}

/// Requests of `user` in the API server's audit log from byte `from` on: how many, and the
/// ones authorization refused (403).
pub fn audited_requests(log: &Path, from: u64, user: &str) -> (usize, Vec<String>) {
    let mut file = File::open(log).expect("open the audit log");
    file.seek(SeekFrom::Start(from)).expect("seek in the audit log");
    let needle = format!(r#""username":"{user}""#);
    let mut count = 0;
    let mut refused = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.expect("read the audit log");
        if !line.contains(&needle) {
            continue;
        }
        // The last line may be half written.
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        count += 1;
        // Refused by authorization; admission refuses with 403 too (a namespace being deleted
        // takes no new objects), after authorization allowed: that is no missing permission.
        let allowed = event["annotations"]["authorization.k8s.io/decision"] == "allow";
        if event["responseStatus"]["code"] == 403 && !allowed {
            refused.push(format!("{} {}: {}", event["verb"], event["requestURI"], event["annotations"]));
        }
    }
    (count, refused)
}

/// The first lines of an operator log that tell of a refused (403 Forbidden) request; a
/// namespace being deleted refuses new objects with 403 too, which is no missing permission.
pub fn refusals_in(log: &str) -> Vec<String> {
    let refused = |l: &&str| l.to_lowercase().contains("forbidden") && !l.contains("because it is being terminated");
    log.lines().filter(refused).take(5).map(str::to_owned).collect()
}

pub fn refusals(log: &Path) -> Vec<String> {
    refusals_in(&std::fs::read_to_string(log).unwrap_or_default())
}

/// Deletes the test's vmkeep objects while the operator runs (their finalizers need it); if
/// that does not finish, strips the finalizers so the namespace can go.
pub fn delete_vmkeep_objects(namespace: &str) -> bool {
    let kinds = "virtualmachines.vmkeep.io,images.vmkeep.io,templates.vmkeep.io";
    // Launcher Pods stop their guests first (ACPI, then quit at the grace period's deadline): on
    // a loaded 2-core CI machine that once took more than 90 s for three VMs.
    let deleted = kubectl(&["delete", kinds, "--all", "-n", namespace, "--wait=true", "--timeout=180s"], None);
    if deleted.status.success() {
        return true;
    }
    // What held the deletion up, for the next reader of a failed run.
    let held = kubectl(&["get", &format!("{kinds},pods,pvc,leases"), "-n", namespace, "-o", "wide"], None);
    let status = kubectl(&["get", kinds, "-n", namespace, "-o", "yaml"], None);
    let events = kubectl(&["get", "events", "-n", namespace, "--sort-by=.lastTimestamp"], None);
    eprintln!(
        "deleting the vmkeep objects of {namespace} did not finish: {}\n{}\n{}\n{}",
        text(&deleted.stderr),
        text(&held.stdout),
        text(&status.stdout),
        text(&events.stdout)
    );
    let left = kubectl(&["get", kinds, "-n", namespace, "-o", "name"], None);
    for object in text(&left.stdout).lines() {
        let unblock = r#"{"metadata":{"finalizers":null}}"#;
        let _ = kubectl(&["patch", object, "-n", namespace, "--type=merge", "-p", unblock], None);
    }
    false
}

/// The chart's RBAC (its ServiceAccount, ClusterRole and ClusterRoleBinding, rendered with
/// `values`) applied into `namespace`, and a kubeconfig holding that ServiceAccount's token:
/// the identity the chart gives the operator, for an operator run from the test's binary.
/// Dropping it deletes the cluster-scoped objects and the kubeconfig file.
pub struct ChartAccount {
    pub namespace: String,
    /// The rendered RBAC objects.
    pub objects: Vec<Value>,
    /// `system:serviceaccount:<namespace>:<name>`, as the audit log names it.
    pub user: String,
    pub kubeconfig: std::path::PathBuf,
    cluster_scoped: Vec<String>,
}

impl ChartAccount {
    /// Renders the RBAC templates of the chart as release `release` into `namespace` (which must
    /// exist) with `values` (e.g. `["--set", "runtime=kubevirt"]`), applies them and writes the
    /// kubeconfig.
    pub async fn new(release: &str, namespace: &str, values: &[&str]) -> Self {
        let only = ["serviceaccount", "clusterrole", "clusterrolebinding"].map(|t| format!("templates/{t}.yaml"));
        let mut args: Vec<&str> = only.iter().flat_map(|t| ["--show-only", t.as_str()]).collect();
        args.extend_from_slice(values);
        let rbac = render(release, namespace, &args);
        assert!(rbac.status.success(), "helm template failed:\n{}", text(&rbac.stderr));
        let rbac = text(&rbac.stdout);
        let objects = objects(&rbac);
        let cluster_scoped: Vec<String> = objects.iter().filter(|o| is_cluster_scoped(o)).map(reference).collect();
        let kubeconfig = std::env::temp_dir().join(format!("{namespace}.kubeconfig"));
        // Built before anything is applied, so that a failure below still cleans up.
        let mut account =
            Self { namespace: namespace.to_owned(), objects, user: String::new(), kubeconfig, cluster_scoped };
        kubectl_ok(&["apply", "-n", namespace, "-f", "-"], Some(&rbac));
        let sa = account.objects.iter().find(|o| o["kind"] == "ServiceAccount").expect("a ServiceAccount");
        let sa = sa["metadata"]["name"].as_str().expect("name").to_owned();
        token_kubeconfig(&account.kubeconfig, &service_account_token(namespace, &sa).await, namespace);
        account.user = format!("system:serviceaccount:{namespace}:{sa}");
        account
    }

    /// The rules of the rendered ClusterRole.
    pub fn cluster_role_rules(&self) -> Vec<Value> {
        let role = self.objects.iter().find(|o| o["kind"] == "ClusterRole").expect("a ClusterRole");
        role["rules"].as_sequence().cloned().unwrap_or_default()
    }
}

impl Drop for ChartAccount {
    fn drop(&mut self) {
        delete_quietly(&self.cluster_scoped, &self.namespace);
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// The audit log of the local cluster, and how long it is now: requests from here on are
/// [`audited_requests`] from that offset.
pub fn audit_log_now() -> (std::path::PathBuf, u64) {
    let audit_log = kubeconfig().parent().expect("kubeconfig folder").join("audit.log");
    let start = std::fs::metadata(&audit_log).map(|m| m.len()).unwrap_or(0);
    (audit_log, start)
}
