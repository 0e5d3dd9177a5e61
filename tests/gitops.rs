//! GitOps health (docs/gitops.md): how Flux (kstatus) and Argo CD (the Lua health check of
//! `docs/argocd/health.lua`) read vmkeep's objects.
//!
//! - Without a cluster: the health check's rules on hand-made objects, under Lua 5.1 with only
//!   the libraries Argo CD opens, and `docs/argocd/argocd-cm.yaml` embedding that script
//!   unchanged for each kind.
//! - Against a real API server: objects brought into each state the table of docs/gitops.md
//!   names, read back as the API server serves them (JSON), then judged by kstatus's generic
//!   rules (written out below) and by the health check.

mod support;

use std::time::Duration;

use kube::{
    Api,
    api::{ApiResource, DynamicObject},
};
use mlua::{Lua, LuaOptions, StdLib};
use serde_json::{Value, json};
use support::{env::*, *};
use vmkeep::api::{Image, Template, VirtualMachine};

/// The Argo CD health check, shared by the three kinds.
fn health_script() -> String {
    std::fs::read_to_string(repo().join("docs/argocd/health.lua")).expect("read docs/argocd/health.lua")
}

/// What kstatus (sigs.k8s.io/cli-utils/pkg/kstatus, which Flux's `wait` and `healthChecks` use)
/// computes for a custom resource: its generic rules, the only ones it has for kinds it does not
/// know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KStatus {
    InProgress,
    Failed,
    Current,
    Terminating,
}

/// kstatus's `checkGenericProperties`, then its default for unknown kinds: `Current`.
fn kstatus(obj: &Value) -> KStatus {
    if obj["metadata"]["deletionTimestamp"].as_str().is_some_and(|t| !t.is_empty()) {
        return KStatus::Terminating;
    }
    // Compared only when both are there: an object without `observedGeneration` skips this.
    if let (Some(generation), Some(observed)) =
        (obj["metadata"]["generation"].as_i64(), obj["status"]["observedGeneration"].as_i64())
        && generation != observed
    {
        return KStatus::InProgress;
    }
    // The first of the two standard conditions that is True, in the list's order.
    for c in obj["status"]["conditions"].as_array().into_iter().flatten() {
        match (c["type"].as_str(), c["status"].as_str()) {
            (Some("Reconciling"), Some("True")) => return KStatus::InProgress,
            (Some("Stalled"), Some("True")) => return KStatus::Failed,
            _ => {}
        }
    }
    KStatus::Current
}

/// What Argo CD's health check says: `hs.status` and `hs.message`.
#[derive(Debug, PartialEq, Eq)]
struct Argo {
    status: String,
    message: String,
}

/// A Lua 5.1 state as Argo CD opens one for a custom health check: the base, package and table
/// libraries (and a restricted `os`, which the script does not use); no `string`, `math`, `io`.
fn argo_lua() -> Lua {
    let lua = Lua::new_with(StdLib::TABLE | StdLib::PACKAGE, LuaOptions::new()).expect("a Lua state");
    let string: mlua::Value = lua.globals().get("string").expect("globals");
    assert!(string.is_nil(), "the string library is open: the test would not catch a script that uses it");
    lua
}

/// JSON as Argo CD hands it to Lua (`decodeValue` in argo-cd util/lua): objects and arrays as
/// tables (arrays from 1), numbers as Lua numbers, `null` as nil.
fn to_lua(lua: &Lua, value: &Value) -> mlua::Value {
    match value {
        Value::Null => mlua::Value::Nil,
        Value::Bool(b) => mlua::Value::Boolean(*b),
        Value::Number(n) => mlua::Value::Number(n.as_f64().expect("a number")),
        Value::String(s) => mlua::Value::String(lua.create_string(s).expect("a string")),
        Value::Array(items) => {
            let table = lua.create_table().expect("a table");
            for (i, item) in items.iter().enumerate() {
                table.raw_set(i + 1, to_lua(lua, item)).expect("set");
            }
            mlua::Value::Table(table)
        }
        Value::Object(fields) => {
            let table = lua.create_table().expect("a table");
            for (key, item) in fields {
                table.raw_set(key.as_str(), to_lua(lua, item)).expect("set");
            }
            mlua::Value::Table(table)
        }
    }
}

/// Runs `script` on `obj` as Argo CD does: `obj` a global, the chunk's result the `hs` table.
fn argo_with(script: &str, obj: &Value) -> Argo {
    let lua = argo_lua();
    lua.globals().set("obj", to_lua(&lua, obj)).expect("set obj");
    let hs: mlua::Table =
        lua.load(script).set_name("health.lua").eval().unwrap_or_else(|e| panic!("health.lua failed on {obj}: {e}"));
    let status: String = hs.get("status").expect("hs.status is a string");
    let message: String = hs.get("message").expect("hs.message is a string");
    // What Argo CD accepts; anything else it shows as Unknown, "Lua returned an invalid health status".
    assert!(
        ["Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"].contains(&status.as_str()),
        "an invalid health status {status:?}"
    );
    Argo { status, message }
}

fn argo(obj: &Value) -> Argo {
    argo_with(&health_script(), obj)
}

// --- Without a cluster -------------------------------------------------------------------------

/// A VirtualMachine of `generation` whose status is of `observed`, with these conditions
/// (`(type, status, reason, message)`).
fn object(generation: i64, observed: i64, conditions: &[(&str, &str, &str, &str)]) -> Value {
    let conditions: Vec<Value> = conditions
        .iter()
        .map(|(t, s, r, m)| json!({"type": t, "status": s, "reason": r, "message": m, "observedGeneration": observed}))
        .collect();
    json!({
        "apiVersion": "vmkeep.io/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": "vm", "namespace": "ns", "generation": generation, "uid": "0"},
        "spec": {"templateRef": {"name": "t"}},
        "status": {"phase": "Running", "observedGeneration": observed, "conditions": conditions},
    })
}

const CONVERGED: &[(&str, &str, &str, &str)] = &[
    ("Ready", "True", "Running", "QEMU runs the guest"),
    ("Reconciling", "False", "Converged", "the spec is in force"),
    ("Stalled", "False", "Converged", "the spec is in force"),
];

#[test]
fn the_health_check_follows_kstatus_on_hand_made_objects() {
    let check = |obj: &Value, kstatus_wants: KStatus, argo_wants: &str, message: &str| {
        let got = (kstatus(obj), argo(obj));
        let want = (kstatus_wants, Argo { status: argo_wants.to_owned(), message: message.to_owned() });
        assert_eq!(got, want, "for {obj:#}");
    };

    let converged = object(2, 2, CONVERGED);
    check(&converged, KStatus::Current, "Healthy", "QEMU runs the guest");

    // A spec edit vmkeep has not seen yet: whatever the conditions say is about the old spec.
    check(
        &object(3, 2, CONVERGED),
        KStatus::InProgress,
        "Progressing",
        "generation 3 not yet observed (status is of generation 2)",
    );
    // A status from a later generation than the object (the object was recreated): not ours.
    check(
        &object(1, 4, CONVERGED),
        KStatus::InProgress,
        "Progressing",
        "generation 1 not yet observed (status is of generation 4)",
    );

    // Deleted: terminating, whatever the status says.
    let mut deleted = converged.clone();
    deleted["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
    check(&deleted, KStatus::Terminating, "Progressing", "terminating");
    let mut deleted_stalled = object(2, 2, &[("Stalled", "True", "ImageInUse", "held")]);
    deleted_stalled["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
    check(&deleted_stalled, KStatus::Terminating, "Progressing", "terminating");

    // No status yet (vmkeep has not seen the object): Argo CD waits, kstatus cannot tell and
    // calls any custom resource without its conditions Current (docs/gitops.md says so).
    let mut fresh = converged.clone();
    fresh.as_object_mut().unwrap().remove("status");
    check(&fresh, KStatus::Current, "Progressing", "waiting for vmkeep to report a status");
    let mut null_status = converged.clone();
    null_status["status"] = Value::Null;
    check(&null_status, KStatus::Current, "Progressing", "waiting for vmkeep to report a status");

    // Stalled: Degraded with the Stalled condition's message.
    let stalled = object(
        1,
        1,
        &[
            ("Ready", "False", "InvalidTemplate", "disks a, b all use CDROM images; a template may have one"),
            ("Reconciling", "False", "Stalled", "it cannot get there without a change of its spec (see Stalled)"),
            ("Stalled", "True", "InvalidTemplate", "disks a, b all use CDROM images; a template may have one"),
        ],
    );
    check(&stalled, KStatus::Failed, "Degraded", "disks a, b all use CDROM images; a template may have one");
    // A Stalled condition without a message: its reason.
    check(&object(1, 1, &[("Stalled", "True", "MissingSize", "")]), KStatus::Failed, "Degraded", "MissingSize");

    // On its way.
    let reconciling = object(
        1,
        1,
        &[
            ("Ready", "False", "TemplateNotFound", "Template t not found"),
            ("Reconciling", "True", "TemplateNotFound", "Template t not found"),
            ("Stalled", "False", "Reconciling", "on its way to what the spec asks for (see Reconciling)"),
        ],
    );
    check(&reconciling, KStatus::InProgress, "Progressing", "Template t not found");
    // Ready, and yet on its way (an Image whose persistence change waits for its VMs): not Healthy.
    let pending_change = object(
        1,
        1,
        &[
            ("Ready", "True", "PvcReady", "the image's PVC exists"),
            ("Reconciling", "True", "InUse", "waiting for vm to let go"),
            ("Stalled", "False", "Reconciling", "on its way to what the spec asks for (see Reconciling)"),
        ],
    );
    check(&pending_change, KStatus::InProgress, "Progressing", "waiting for vm to let go");

    // Not Ready and neither standard condition True (not what vmkeep writes: it always sets
    // Reconciling then): kstatus only reads the abnormal-true conditions, Argo CD waits for Ready.
    let not_ready = object(1, 1, &[("Ready", "False", "Starting", "the launcher Pod starts")]);
    check(&not_ready, KStatus::Current, "Progressing", "the launcher Pod starts");
    check(&object(1, 1, &[]), KStatus::Current, "Progressing", "waiting for the Ready condition");
    // A status without observedGeneration: both skip the generation rule, as kstatus does.
    let mut unobserved = converged.clone();
    unobserved["status"].as_object_mut().unwrap().remove("observedGeneration");
    check(&unobserved, KStatus::Current, "Healthy", "QEMU runs the guest");
}

#[test]
fn the_argocd_configmap_embeds_the_health_check_for_each_kind() {
    let path = repo().join("docs/argocd/argocd-cm.yaml");
    let text = std::fs::read_to_string(&path).expect("read docs/argocd/argocd-cm.yaml");
    let cm: Value = serde_yaml::from_str(&text).expect("argocd-cm.yaml is YAML");
    assert_eq!((cm["apiVersion"].as_str(), cm["kind"].as_str()), (Some("v1"), Some("ConfigMap")));
    assert_eq!(cm["metadata"]["name"].as_str(), Some("argocd-cm"), "Argo CD reads the ConfigMap argocd-cm");
    let data = cm["data"].as_object().expect("data");
    let mut keys: Vec<&str> = data.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "resource.customizations.health.vmkeep.io_Image",
            "resource.customizations.health.vmkeep.io_Template",
            "resource.customizations.health.vmkeep.io_VirtualMachine",
        ]
    );
    let script = health_script();
    for (key, value) in data {
        assert_eq!(value.as_str(), Some(script.as_str()), "{key} differs from docs/argocd/health.lua");
        // And what the ConfigMap holds runs.
        let healthy = argo_with(value.as_str().unwrap(), &object(1, 1, CONVERGED));
        assert_eq!(healthy.status, "Healthy", "{key}");
    }
}

// --- Against the API server ---------------------------------------------------------------------

/// The object as the API server serves it (every field, as JSON).
async fn fetch(env: &Env, resource: &ApiResource, name: &str) -> Option<Value> {
    let api: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), &env.ns.name, resource);
    let obj = api.get_opt(name).await.expect("get")?;
    Some(serde_json::to_value(obj).expect("to JSON"))
}

/// Waits until `name` satisfies `check` (read as JSON), and returns it.
async fn wait_json(
    env: &Env,
    resource: &ApiResource,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&Value) -> bool,
) -> Value {
    wait_for(&format!("{} {name}: {what}", resource.kind), timeout, async || {
        fetch(env, resource, name).await.filter(|o| check(o))
    })
    .await
}

/// The condition of `type` of a JSON object, if present.
fn cond<'a>(obj: &'a Value, r#type: &str) -> Option<&'a Value> {
    obj["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == r#type)
}

/// Whether the object is in `phase` with its `Ready` condition of `reason`, computed for its
/// current generation.
fn at(obj: &Value, phase: &str, reason: &str) -> bool {
    obj["status"]["phase"] == phase
        && cond(obj, "Ready").is_some_and(|c| c["reason"] == reason)
        && obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
}

/// A VirtualMachine powered off from the start.
fn halted_vm(name: &str, template: &str) -> String {
    format!(
        "apiVersion: vmkeep.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\n\
         spec: {{templateRef: {{name: {template}}}, runStrategy: Halted}}\n---\n"
    )
}

/// A test finalizer on a VirtualMachine, removed when dropped (also when the test fails), so
/// the namespace can go.
struct Hold {
    ns: String,
    name: String,
}

const HOLD: &str = "test.vmkeep.io/hold";

impl Hold {
    fn release(&self) {
        for _ in 0..10 {
            let out = kubectl(&["get", "virtualmachine", &self.name, "-n", &self.ns, "-o", "json"], None);
            if !out.status.success() {
                return; // gone
            }
            let Ok(vm) = serde_json::from_slice::<Value>(&out.stdout) else { return };
            let Some(index) = vm["metadata"]["finalizers"].as_array().and_then(|f| f.iter().position(|f| f == HOLD))
            else {
                return;
            };
            // Remove exactly ours, only if it is still at that index (the operator may edit the list).
            let patch = json!([
                {"op": "test", "path": format!("/metadata/finalizers/{index}"), "value": HOLD},
                {"op": "remove", "path": format!("/metadata/finalizers/{index}")},
            ])
            .to_string();
            let args = ["patch", "virtualmachine", &self.name, "-n", &self.ns, "--type", "json", "-p", &patch];
            if kubectl(&args, None).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        eprintln!("could not remove the finalizer {HOLD} of VirtualMachine {}", self.name);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.release();
    }
}

/// One object as both tools see it.
struct Seen {
    what: String,
    kstatus: KStatus,
    argo: Argo,
    obj: Value,
}

fn judge(what: &str, obj: Value) -> Seen {
    Seen { what: what.to_owned(), kstatus: kstatus(&obj), argo: argo(&obj), obj }
}

#[tokio::test]
async fn every_state_reads_the_same_to_kstatus_and_argo_cd() {
    let started = std::time::Instant::now();
    let env = Env::new("gitops").await;
    let vms = ApiResource::erase::<VirtualMachine>(&());
    let images = ApiResource::erase::<Image>(&());
    let templates = ApiResource::erase::<Template>(&());
    let slow = Duration::from_secs(150);

    // A non-persistent and a persistent image, a Template of both, and a VM that is powered off
    // from the start: it takes the persistent image's claim and keeps it while Stopped.
    let nosize = "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {name: nosize}\n\
                  spec: {source: {blank: {}}}\n---\n";
    apply(
        &env.ns,
        &(image("os", false)
            + &image("disk", true)
            + nosize
            + &template("t", &[("root", Some("os")), ("data", Some("disk"))])
            // A disk smaller than its image: can never work.
            + &template_with_sized("small", "os", "100Mi")
            + &template("waiting", &[("root", Some("absent"))])
            + &halted_vm("halted", "t")
            + &vm("failed", "small", "Reject")
            + &vm("pending", "missing", "Reject")),
    );
    // A VM with a finalizer of the test's, to read it once deleted.
    let doomed = "apiVersion: vmkeep.io/v1alpha1\nkind: VirtualMachine\n\
                  metadata: {name: doomed, finalizers: [test.vmkeep.io/hold]}\n\
                  spec: {templateRef: {name: missing}}\n---\n";
    apply(&env.ns, doomed);
    let hold = Hold { ns: env.ns.name.clone(), name: "doomed".to_owned() };

    let halted = wait_json(&env, &vms, "halted", "Stopped, Ready (Halted)", slow, |o| {
        at(o, "Stopped", "Halted") && cond(o, "Ready").is_some_and(|c| c["status"] == "True")
    })
    .await;
    let disk = wait_json(&env, &images, "disk", "UsedPersistent by halted", Duration::from_secs(60), |o| {
        o["status"]["phase"] == "UsedPersistent" && o["status"]["claimedBy"]["name"] == "halted"
    })
    .await;
    // Only now: the claim is halted's, so this one is refused.
    apply(&env.ns, &vm("rejected", "t", "Reject"));

    let mut seen =
        vec![judge("VirtualMachine Stopped, runStrategy Halted", halted), judge("Image UsedPersistent", disk)];
    let long = Duration::from_secs(60);
    seen.push(judge(
        "VirtualMachine Rejected",
        wait_json(&env, &vms, "rejected", "Rejected", long, |o| at(o, "Rejected", "ImageInUse")).await,
    ));
    seen.push(judge(
        "VirtualMachine Failed (InvalidDiskSize)",
        wait_json(&env, &vms, "failed", "Failed", long, |o| at(o, "Failed", "InvalidDiskSize")).await,
    ));
    seen.push(judge(
        "VirtualMachine Pending (TemplateNotFound)",
        wait_json(&env, &vms, "pending", "Pending", long, |o| at(o, "Pending", "TemplateNotFound")).await,
    ));
    seen.push(judge(
        "Image Used",
        wait_json(&env, &images, "os", "Used", long, |o| o["status"]["phase"] == "Used").await,
    ));
    seen.push(judge(
        "Image Error (MissingSize)",
        wait_json(&env, &images, "nosize", "Error", long, |o| at(o, "Error", "MissingSize")).await,
    ));
    let template_ready = |reason: &'static str| {
        move |o: &Value| {
            cond(o, "Ready").is_some_and(|c| c["reason"] == reason)
                && o["status"]["observedGeneration"] == o["metadata"]["generation"]
        }
    };
    seen.push(judge(
        "Template usable",
        wait_json(&env, &templates, "t", "ImagesReady", long, template_ready("ImagesReady")).await,
    ));
    seen.push(judge(
        "Template waiting for an image",
        wait_json(&env, &templates, "waiting", "ImageNotFound", long, template_ready("ImageNotFound")).await,
    ));
    seen.push(judge(
        "Template that can never work",
        wait_json(&env, &templates, "small", "InvalidDiskSize", long, template_ready("InvalidDiskSize")).await,
    ));

    // Deleted, and held by another finalizer (the test's): terminating for both tools, whatever
    // its status says (vmkeep gave this VM no finalizer of its own: it never got a disk).
    wait_json(&env, &vms, "doomed", "Pending", long, |o| at(o, "Pending", "TemplateNotFound")).await;
    kubectl_ok(&["delete", "virtualmachine", "doomed", "-n", &env.ns.name, "--wait=false"], None);
    seen.push(judge(
        "VirtualMachine deleted, held by a finalizer",
        wait_json(&env, &vms, "doomed", "deleted", long, |o| o["metadata"]["deletionTimestamp"].is_string()).await,
    ));
    hold.release();

    // A persistence change that waits for the VM using the image: Ready, and yet on its way.
    // (It makes `os` unusable to new VMs: `t` and `small` wait meanwhile, so it comes after them.)
    apply(&env.ns, &image("os", true));
    seen.push(judge(
        "Image with a persistence change pending",
        wait_json(&env, &images, "os", "PersistenceChangePending", long, |o| {
            cond(o, "PersistenceChangePending").is_some_and(|c| c["status"] == "True")
                && o["status"]["observedGeneration"] == o["metadata"]["generation"]
        })
        .await,
    ));

    // Last: the Halted VM deleted (it has vmkeep's finalizer: it holds a persistent image), held
    // by the test's finalizer once vmkeep is done, so its Terminating status stays to be read.
    let held = Hold { ns: env.ns.name.clone(), name: "halted".to_owned() };
    let add = json!([{"op": "add", "path": "/metadata/finalizers/-", "value": HOLD}]).to_string();
    kubectl_ok(&["patch", "virtualmachine", "halted", "-n", &env.ns.name, "--type", "json", "-p", &add], None);
    kubectl_ok(&["delete", "virtualmachine", "halted", "-n", &env.ns.name, "--wait=false"], None);
    seen.push(judge(
        "VirtualMachine Terminating",
        wait_json(&env, &vms, "halted", "Terminating", long, |o| {
            o["metadata"]["deletionTimestamp"].is_string() && o["status"]["phase"] == "Terminating"
        })
        .await,
    ));
    held.release();

    eprintln!("{:<45} {:<12} {:<12} message", "object", "kstatus", "Argo CD");
    for s in &seen {
        eprintln!("{:<45} {:<12} {:<12} {}", s.what, format!("{:?}", s.kstatus), s.argo.status, s.argo.message);
    }

    let expected: &[(&str, KStatus, &str)] = &[
        ("VirtualMachine Stopped, runStrategy Halted", KStatus::Current, "Healthy"),
        ("Image UsedPersistent", KStatus::Current, "Healthy"),
        ("VirtualMachine Rejected", KStatus::Failed, "Degraded"),
        ("VirtualMachine Failed (InvalidDiskSize)", KStatus::Failed, "Degraded"),
        ("VirtualMachine Pending (TemplateNotFound)", KStatus::InProgress, "Progressing"),
        ("Image Used", KStatus::Current, "Healthy"),
        ("Image Error (MissingSize)", KStatus::Failed, "Degraded"),
        ("Template usable", KStatus::Current, "Healthy"),
        ("Template waiting for an image", KStatus::InProgress, "Progressing"),
        ("Template that can never work", KStatus::Failed, "Degraded"),
        ("VirtualMachine deleted, held by a finalizer", KStatus::Terminating, "Progressing"),
        ("Image with a persistence change pending", KStatus::InProgress, "Progressing"),
        ("VirtualMachine Terminating", KStatus::Terminating, "Progressing"),
    ];
    let got: Vec<(&str, KStatus, &str)> =
        seen.iter().map(|s| (s.what.as_str(), s.kstatus, s.argo.status.as_str())).collect();
    assert_eq!(got, expected);

    // The messages say why: Degraded carries the Stalled condition's message, Progressing the
    // Reconciling one's, Healthy the Ready one's.
    for s in &seen {
        let message = |t: &str| cond(&s.obj, t).and_then(|c| c["message"].as_str()).unwrap_or_default().to_owned();
        let want = match (s.argo.status.as_str(), s.kstatus) {
            ("Degraded", _) => message("Stalled"),
            (_, KStatus::Terminating) => "terminating".to_owned(),
            ("Progressing", _) => message("Reconciling"),
            _ => message("Ready"),
        };
        assert!(!want.is_empty(), "{}: no message to show: {:#}", s.what, s.obj);
        assert_eq!(s.argo.message, want, "{}", s.what);
    }
    let rejected = &seen[2].argo.message;
    assert!(rejected.contains("already in use by VirtualMachine halted"), "{rejected}");
    // Every vmkeep status has both standard conditions (kstatus reads nothing else).
    for s in &seen {
        for t in ["Ready", "Reconciling", "Stalled"] {
            assert!(cond(&s.obj, t).is_some(), "{}: no {t} condition: {:#}", s.what, s.obj["status"]);
        }
    }
    drop((hold, held));
    eprintln!("done in {:?}", started.elapsed());
}

/// A Template whose one disk asks for less than its image holds: `Failed`, `InvalidDiskSize`.
fn template_with_sized(name: &str, image: &str, size: &str) -> String {
    format!(
        "apiVersion: vmkeep.io/v1alpha1\nkind: Template\nmetadata: {{name: {name}}}\n\
         spec: {{cpu: 1, memory: 256Mi, disks: [{{name: root, image: {image}, size: {size}}}]}}\n---\n"
    )
}
