//! The validating admission webhook against a real API server: every rule denies with the words
//! of the controller and admits its twin, namespaces labelled `vmkeep.io/webhook: disabled` are
//! skipped, creation goes on while the operator is down (failurePolicy Ignore) and the
//! controller decides later, and a deleted, broken or expired certificate Secret is renewed
//! while the webhook keeps answering.
//!
//! The API server calls the operator at `https://127.0.0.1:<port>/validate` (URL mode); each
//! test has its own ValidatingWebhookConfiguration, limited to its own namespaces by a label
//! (Kubernetes 1.20 does not label namespaces with their name).

mod support;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use k8s_openapi::api::{admissionregistration::v1::ValidatingWebhookConfiguration, core::v1::Secret};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::{Value, json};
use support::*;
use vmkeep::{
    api::{Image, VirtualMachine, image::ImagePhase, virtual_machine::VirtualMachinePhase},
    plan::claim::in_use_message,
    webhook::certs::{self, Bundle},
};

const LONG: Duration = Duration::from_secs(60);
/// The Secret of the webhook's certificate (vmkeep's default name).
const SECRET: &str = "vmkeep-webhook-tls";
/// The label that puts a namespace under one test's webhook configuration.
const SCOPE_LABEL: &str = "vmkeep-test/webhook";

fn image(name: &str, spec: &str) -> String {
    format!("apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {{name: {name}}}\nspec: {spec}\n---\n")
}

fn template(name: &str, disks: &str) -> String {
    format!(
        "apiVersion: vmkeep.io/v1alpha1\nkind: Template\nmetadata: {{name: {name}}}\n\
         spec: {{cpu: 1, memory: 128Mi, disks: {disks}}}\n---\n"
    )
}

fn vm(name: &str, template: &str, extra: &str) -> String {
    format!(
        "apiVersion: vmkeep.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\n\
         spec: {{templateRef: {{name: {template}}}{extra}}}\n---\n"
    )
}

/// Puts namespace `ns` under the webhook configuration `scope`, with more `labels`.
fn scope(ns: &TestNamespace, scope: &str, labels: &[&str]) {
    let label = format!("{SCOPE_LABEL}={scope}");
    kubectl_ok(&[&["label", "namespace", &ns.name, &label][..], labels].concat(), None);
}

/// One test's namespace, webhook configuration and operator. Dropping it deletes the test's
/// objects while the operator still runs (their finalizers need it), then the configuration.
struct Env {
    ns: TestNamespace,
    /// The ValidatingWebhookConfiguration, named like the namespace.
    config: String,
    port: u16,
    /// The Secret the operator keeps its certificate in.
    secret: String,
    /// The operator's kubeconfig, when not the admin's.
    kubeconfig: Option<PathBuf>,
    operator: Option<Operator>,
    client: Client,
    starts: u32,
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.operator.is_none() {
            // A test that failed while the operator was down: nobody would remove the finalizers.
            let names = kubectl(&["get", "virtualmachines,images", "-n", &self.ns.name, "-o", "name"], None);
            for object in String::from_utf8_lossy(&names.stdout).lines() {
                let patch = r#"{"metadata":{"finalizers":null}}"#;
                let _ = kubectl(&["patch", object, "-n", &self.ns.name, "--type=merge", "-p", patch], None);
            }
        }
        let _ = kubectl(
            &["delete", "virtualmachines,images,templates", "--all", "-n", &self.ns.name, "--timeout=90s"],
            None,
        );
        let _ = kubectl(&["delete", "validatingwebhookconfiguration", &self.config, "--ignore-not-found"], None);
    }
}

impl Env {
    async fn new(test: &str) -> Self {
        let mut env = Self::prepare(test).await;
        env.start(test).await;
        env
    }

    /// The namespace and webhook configuration, without an operator yet.
    async fn prepare(test: &str) -> Self {
        install_crds();
        let ns = TestNamespace::new(test);
        let config = ns.name.clone();
        scope(&ns, &config, &[]);
        let webhook = json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": config},
            "webhooks": [{
                "name": "validate.vmkeep.io",
                "clientConfig": {"url": "https://127.0.0.1:PORT/validate"},
                "rules": [{
                    "apiGroups": ["vmkeep.io"], "apiVersions": ["v1alpha1"], "operations": ["CREATE", "UPDATE"],
                    "resources": ["images", "templates", "virtualmachines"], "scope": "Namespaced",
                }],
                // As in the chart, plus the test's own scope.
                "namespaceSelector": {
                    "matchLabels": {SCOPE_LABEL: config},
                    "matchExpressions": [{"key": "vmkeep.io/webhook", "operator": "NotIn", "values": ["disabled"]}],
                },
                "failurePolicy": "Ignore",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 5,
            }],
        });
        let port = free_port();
        let webhook = webhook.to_string().replace("PORT", &port.to_string());
        kubectl_ok(&["create", "-f", "-"], Some(&webhook));
        let client = client().await;
        Self { ns, config, port, secret: SECRET.into(), kubeconfig: None, operator: None, client, starts: 0 }
    }

    /// Starts the operator (again) and waits until the webhook denies through the API server.
    async fn start(&mut self, test: &str) {
        self.starts += 1;
        let (addr, secret) = (format!("127.0.0.1:{}", self.port), format!("{}/{}", self.ns.name, self.secret));
        let args = [
            "--namespace",
            &self.ns.name,
            "--webhook-addr",
            &addr,
            "--webhook-secret",
            &secret,
            "--webhook-config",
            &self.config,
            "--webhook-dns-names",
            "127.0.0.1",
            "--webhook-cert-check-seconds",
            "2",
        ];
        let name = format!("webhook-{test}-{}", self.starts);
        let mut operator = match &self.kubeconfig {
            Some(kubeconfig) => Operator::start_with_kubeconfig(&name, kubeconfig, &args),
            None => Operator::start_with(&name, &args),
        };
        operator.ready().await;
        self.operator = Some(operator);
        self.wait_answering().await;
    }

    async fn wait_answering(&self) {
        let bad = image("probe", "{source: {blank: {}}}");
        wait_for("the webhook to deny through the API server", LONG, async || {
            let denied = self.denied(&bad, true)?;
            assert!(denied.contains("spec.size is required for a blank image"), "{denied}");
            Some(())
        })
        .await;
    }

    /// Applies `yaml` in the test namespace; the error output if the API server refused it.
    fn denied(&self, yaml: &str, dry_run: bool) -> Option<String> {
        let mut args = vec!["apply", "-n", &self.ns.name, "-f", "-"];
        if dry_run {
            args.push("--dry-run=server");
        }
        let out = kubectl(&args, Some(yaml));
        (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Asserts that applying `yaml` is denied by the webhook with `message`.
    fn deny(&self, yaml: &str, message: &str) {
        let denied = self.denied(yaml, false).unwrap_or_else(|| panic!("admitted:\n{yaml}"));
        assert!(denied.contains("admission webhook \"validate.vmkeep.io\" denied the request"), "{denied}");
        assert!(denied.contains(message), "expected {message:?} in:\n{denied}");
    }

    fn admit(&self, yaml: &str) {
        if let Some(denied) = self.denied(yaml, false) {
            panic!("denied:\n{yaml}\n{denied}");
        }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    async fn wait_image_ready(&self, name: &str) {
        wait_for(&format!("Image {name} to be Ready"), LONG, async || {
            let status = self.api::<Image>().get_opt(name).await.expect("get image")?.status?;
            (status.phase == Some(ImagePhase::Ready) && status.capacity.is_some()).then_some(())
        })
        .await;
    }

    /// Persistent image `db`, template `t` of it, and VM `vm-a` holding it.
    async fn hold_db(&self) {
        self.admit(
            &(image("db", "{persistent: true, size: 1Gi, source: {blank: {}}}")
                + &template("t", "[{name: data, image: db}]")),
        );
        self.wait_image_ready("db").await;
        self.admit(&vm("vm-a", "t", ""));
        self.wait_vm("vm-a", VirtualMachinePhase::Starting).await;
    }

    async fn wait_vm(&self, name: &str, phase: VirtualMachinePhase) -> VirtualMachine {
        wait_for(&format!("VirtualMachine {name} to be {phase:?}"), LONG, async || {
            let vm = self.api::<VirtualMachine>().get_opt(name).await.expect("get vm")?;
            reached(vm.status.as_ref()?.phase, phase).then_some(vm)
        })
        .await
    }

    async fn bundle(&self) -> Option<Bundle> {
        Bundle::from_secret(&self.api::<Secret>().get_opt(&self.secret).await.expect("get secret")?)
    }

    async fn ca_bundle(&self) -> Option<String> {
        let api: Api<ValidatingWebhookConfiguration> = Api::all(self.client.clone());
        let config = api.get(&self.config).await.expect("get webhook configuration");
        let bundle = config.webhooks?.first()?.client_config.ca_bundle.clone()?;
        String::from_utf8(bundle.0).ok()
    }

    /// Sends an AdmissionReview for `object` straight to the webhook, trusting `ca` only (for
    /// objects the API server's schema refuses before any webhook sees them); the response.
    fn review(&self, ca: &str, object: Value) -> Option<Value> {
        let ca_file = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-ca.crt", self.ns.name));
        std::fs::write(&ca_file, ca).expect("write ca");
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let review = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "test", "kind": {"group": "vmkeep.io", "version": "v1alpha1", "kind": kind},
                "resource": {"group": "vmkeep.io", "version": "v1alpha1", "resource": "whatever"},
                "name": object["metadata"]["name"], "namespace": self.ns.name, "operation": "CREATE",
                "userInfo": {}, "object": object,
            },
        });
        let mut curl = Command::new("curl")
            .args(["-sS", "--max-time", "5", "--cacert", ca_file.to_str().unwrap()])
            .args(["-H", "Content-Type: application/json", "--data-binary", "@-"])
            .arg(format!("https://127.0.0.1:{}/validate", self.port))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("curl");
        std::io::Write::write_all(&mut curl.stdin.take().unwrap(), review.to_string().as_bytes()).unwrap();
        let out = curl.wait_with_output().expect("curl");
        out.status.success().then(|| serde_json::from_slice::<Value>(&out.stdout).expect("json")["response"].clone())
    }
}

fn denial(response: &Value) -> Option<&str> {
    (response["allowed"] == false).then(|| response["status"]["message"].as_str().unwrap_or_default())
}

#[tokio::test]
async fn every_rule_denies_with_the_controllers_words_and_admits_its_twin() {
    let env = Env::new("webhook-rules").await;

    // Image: size required for blank.
    env.deny(&image("blank", "{source: {blank: {}}}"), "spec.size is required for a blank image");
    env.admit(&image("blank", "{size: 1Gi, source: {blank: {}}}"));

    // Image: exactly one source kind. The CRD schema refuses this before any webhook, so ask
    // the webhook directly (over TLS, trusting the CA vmkeep published).
    let ca = env.bundle().await.expect("the webhook Secret").ca;
    let source = |source: Value| {
        let object = json!({"apiVersion": "vmkeep.io/v1alpha1", "kind": "Image", "metadata": {"name": "two"},
                            "spec": {"size": "1Gi", "source": source}});
        env.review(&ca, object).expect("the webhook answers")
    };
    assert_eq!(
        denial(&source(json!({"blank": {}, "pvc": {"name": "p"}}))),
        Some("spec.source must name exactly one of blank, pvc, image, http, virtualMachineDisk")
    );
    assert_eq!(denial(&source(json!({"pvc": {"name": "p"}}))), None);

    // Image: immutable fields; persistence and disabled may change.
    for (spec, message) in [
        ("{size: 1Gi, source: {pvc: {name: p}}}", "spec.source is immutable"),
        ("{size: 1Gi, type: CDROM, source: {blank: {}}}", "spec.type is immutable"),
        ("{size: 1Gi, volumeMode: Block, source: {blank: {}}}", "spec.volumeMode is immutable"),
        ("{size: 1Gi, storageClassName: other, source: {blank: {}}}", "spec.storageClassName is immutable"),
    ] {
        env.deny(&image("blank", spec), message);
    }
    env.admit(&image("blank", "{size: 1Gi, persistent: true, disabled: true, source: {blank: {}}}"));

    // Template: unique disk names (also refused by the schema: ask the webhook directly).
    let disks = |second: &str| {
        let object = json!({"apiVersion": "vmkeep.io/v1alpha1", "kind": "Template", "metadata": {"name": "dup"},
                            "spec": {"cpu": 1, "memory": "1Gi", "disks": [
                                {"name": "root", "blank": {"size": "1Gi"}}, {"name": second, "blank": {"size": "1Gi"}}]}});
        env.review(&ca, object).expect("the webhook answers")
    };
    assert_eq!(denial(&disks("root")), Some("spec.disks[1].name: disk root appears twice; disk names are unique"));
    assert_eq!(denial(&disks("data")), None);

    // Template: image references are valid names; one that does not exist yet is fine.
    env.deny(
        &template("bad-ref", "[{name: root, image: Bad_Name}]"),
        "spec.disks[0].image: \"Bad_Name\" is not a valid Image name",
    );
    env.admit(&template("bad-ref", "[{name: root, image: not-yet}]"));

    // Template: at most one CDROM disk and no disk below its image's capacity, once the images
    // exist.
    env.admit(
        &(image("iso-a", "{type: CDROM, size: 1Gi, source: {blank: {}}}")
            + &image("iso-b", "{type: CDROM, size: 1Gi, source: {blank: {}}}")
            + &image("base", "{size: 2Gi, source: {blank: {}}}")),
    );
    for name in ["iso-a", "iso-b", "base"] {
        env.wait_image_ready(name).await;
    }
    env.deny(
        &template("cdroms", "[{name: a, image: iso-a}, {name: b, image: iso-b}]"),
        "disks a, b all use CDROM images; a template may have one",
    );
    env.admit(&template("cdroms", "[{name: a, image: iso-a}, {name: b, image: iso-c}]"));
    env.admit(&template("cdroms", "[{name: a, image: iso-a}, {name: b, blank: {size: 1Gi}}]"));
    env.deny(
        &template("small", "[{name: root, image: base, size: 1Gi}]"),
        "disk root asks for 1Gi but image base holds 2Gi",
    );
    env.admit(&template("small", "[{name: root, image: base, size: 3Gi}]"));

    // VirtualMachine: a persistent image held by another VM, unless the new VM waits; a VM whose
    // template does not exist yet is fine.
    env.hold_db().await;
    env.deny(&vm("vm-b", "t", ""), &in_use_message("db", "vm-a"));
    env.deny(
        &vm("vm-b", "t", ", onImageConflict: Reject"),
        "image db is persistent and already in use by VirtualMachine vm-a",
    );
    env.admit(&vm("vm-c", "t", ", onImageConflict: Wait"));
    env.wait_vm("vm-c", VirtualMachinePhase::Pending).await;
    env.admit(&vm("vm-d", "later", ""));

    // VirtualMachine: the template reference is immutable; the run strategy is not.
    env.deny(&vm("vm-d", "other", ""), "spec.templateRef is immutable");
    env.admit(&vm("vm-d", "later", ", runStrategy: Halted"));

    // A namespace labelled vmkeep.io/webhook=disabled is never sent to the webhook.
    let off = TestNamespace::new("webhook-off");
    scope(&off, &env.config, &["vmkeep.io/webhook=disabled"]);
    kubectl_ok(&["apply", "-n", &off.name, "-f", "-"], Some(&image("blank", "{source: {blank: {}}}")));
}

#[tokio::test]
async fn with_the_operator_down_creation_goes_on_and_the_controller_rejects_later() {
    let mut env = Env::new("webhook-down").await;
    env.hold_db().await;
    env.deny(&vm("vm-b", "t", ""), &in_use_message("db", "vm-a"));

    // failurePolicy Ignore: without an answer the API server admits.
    let mut operator = env.operator.take().expect("operator");
    operator.terminate();
    wait_for("the operator to exit", LONG, async || operator.exited()).await;
    env.admit(&vm("vm-b", "t", ""));

    // The controller, back, is the source of truth.
    env.start("webhook-down").await;
    let rejected = env.wait_vm("vm-b", VirtualMachinePhase::Rejected).await;
    let claimed = rejected.status.unwrap().conditions.into_iter().find(|c| c.r#type == "ImagesClaimed").unwrap();
    assert_eq!(claimed.reason, "ImageInUse");
    assert_eq!(claimed.message, in_use_message("db", "vm-a"));
}

#[tokio::test]
async fn a_deleted_broken_or_expired_secret_is_renewed_and_the_webhook_keeps_answering() {
    let env = Env::new("webhook-certs").await;
    let first = env.bundle().await.expect("the webhook Secret");
    assert_eq!(env.ca_bundle().await.as_deref(), Some(first.ca.as_str()), "caBundle patched");

    // Deleted: a new CA and certificate; the caBundle trusts the new CA and still the old one.
    env.api::<Secret>().delete(&env.secret, &Default::default()).await.expect("delete secret");
    let second = renewed(&env, &first).await;
    assert!(second.ca.contains(first.own_ca().unwrap().trim()), "the previous CA stays trusted");

    // Broken: a certificate that does not parse.
    let broken = json!({"data": {"tls.crt": "Z2FyYmFnZQ=="}});
    env.api::<Secret>().patch(&env.secret, &PatchParams::default(), &Patch::Merge(&broken)).await.expect("patch");
    let third = renewed(&env, &second).await;

    // Expired: a certificate that ended yesterday.
    let past = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24 * 366);
    let expired = certs::issue(&["127.0.0.1".to_owned()], past, &[]).expect("issue");
    let data = json!({"data": expired.to_data()});
    env.api::<Secret>().patch(&env.secret, &PatchParams::default(), &Patch::Merge(&data)).await.expect("patch");
    renewed(&env, &Bundle { cert: expired.cert, ..third }).await;
}

/// Waits until the Secret holds a certificate other than `before`'s, the caBundle holds its CA
/// bundle, the webhook serves it (trusting the new CA alone), and denies through the API server.
async fn renewed(env: &Env, before: &Bundle) -> Bundle {
    let bundle = wait_for("a renewed webhook Secret", LONG, async || {
        let bundle = env.bundle().await?;
        (bundle.cert != before.cert
            && certs::renewal_reason(Some(&bundle), &["127.0.0.1".into()], jiff::Timestamp::now()).is_none())
        .then_some(bundle)
    })
    .await;
    wait_for("the caBundle to follow the Secret", LONG, async || (env.ca_bundle().await? == bundle.ca).then_some(()))
        .await;
    let own = bundle.own_ca().expect("own CA");
    let object = json!({"apiVersion": "vmkeep.io/v1alpha1", "kind": "Image", "metadata": {"name": "x"},
                        "spec": {"source": {"blank": {}}}});
    wait_for("the webhook to serve the new certificate", LONG, async || env.review(&own, object.clone())).await;
    env.wait_answering().await;
    bundle
}

#[tokio::test]
async fn the_charts_rbac_lets_the_operator_keep_its_certificate_and_no_more() {
    let mut env = Env::prepare("webhook-rbac").await;
    // The chart's release is named like the namespace, so its webhook configuration is the
    // test's (and the chart's Secret <release>-webhook-tls).
    let release = env.ns.name.clone();
    let only =
        ["serviceaccount", "clusterrole", "clusterrolebinding", "webhook-role"].map(|t| format!("templates/{t}.yaml"));
    let mut args =
        vec!["template", &release, "charts/vmkeep", "--namespace", &release, "--set", "webhook.enabled=true"];
    args.extend(only.iter().flat_map(|t| ["--show-only", t.as_str()]));
    let out = Command::new(helm_path()).current_dir(repo()).args(&args).output().expect("helm");
    assert!(out.status.success(), "helm template failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let rbac = String::from_utf8(out.stdout).expect("utf-8");
    let _cluster_rbac = ClusterScoped(vec![format!("clusterrole/{release}"), format!("clusterrolebinding/{release}")]);
    kubectl_ok(&["apply", "-n", &release, "-f", "-"], Some(&rbac));

    // The operator as the chart's ServiceAccount (impersonated by the admin).
    let user = format!("system:serviceaccount:{release}:{release}");
    let admin = kubectl_ok(&["config", "view", "--raw", "--minify", "--flatten", "-o", "json"], None);
    let mut kubeconfig: Value = serde_json::from_str(&admin).expect("kubeconfig");
    kubeconfig["users"][0]["user"]["as"] = json!(user);
    kubeconfig["users"][0]["user"]["as-groups"] = json!(["system:serviceaccounts", "system:authenticated"]);
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{release}.kubeconfig"));
    std::fs::write(&path, kubeconfig.to_string()).expect("write kubeconfig");
    env.secret = format!("{release}-webhook-tls");
    env.kubeconfig = Some(path);
    env.start("webhook-rbac").await;

    // Create (above), update and read the Secret, patch the caBundle: all allowed.
    let first = env.bundle().await.expect("the webhook Secret");
    let broken = json!({"data": {"tls.crt": "Z2FyYmFnZQ=="}});
    env.api::<Secret>().patch(&env.secret, &PatchParams::default(), &Patch::Merge(&broken)).await.expect("patch");
    renewed(&env, &first).await;
    let log = env.operator.as_ref().expect("operator").log_text();
    assert!(!log.to_lowercase().contains("forbidden"), "the operator was refused:\n{log}");

    // Nothing more: other Secrets, listing, other webhook configurations.
    let ns = release.as_str();
    for (allowed, verb, resource) in [
        (true, "get", format!("secrets/{}", env.secret)),
        (true, "update", format!("secrets/{}", env.secret)),
        (true, "create", "secrets".to_owned()),
        (true, "patch", format!("validatingwebhookconfigurations/{release}")),
        (false, "get", "secrets/other".to_owned()),
        (false, "update", "secrets/other".to_owned()),
        (false, "list", "secrets".to_owned()),
        (false, "delete", format!("secrets/{}", env.secret)),
        (false, "patch", "validatingwebhookconfigurations/other".to_owned()),
        (false, "create", "validatingwebhookconfigurations".to_owned()),
    ] {
        let out = kubectl(&["auth", "can-i", verb, &resource, "-n", ns, "--as", &user], None);
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(answer == "yes", allowed, "{user} {verb} {resource}: {answer}");
    }
}

/// Cluster-scoped objects (`kind/name`) deleted when dropped.
struct ClusterScoped(Vec<String>);

impl Drop for ClusterScoped {
    fn drop(&mut self) {
        for object in &self.0 {
            let _ = kubectl(&["delete", object, "--ignore-not-found"], None);
        }
    }
}
