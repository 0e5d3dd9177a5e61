//! The foundation against a real API server: the CRDs install, the examples are accepted,
//! listed and explained, the schema refuses what it can, and `vmkeep run` waits for its CRDs,
//! serves health and metrics, and stops on SIGTERM.

mod support;

use std::time::{Duration, Instant};

use kube::Api;
use support::*;
use vmkeep::api::{
    Image,
    image::{ImageType, VolumeMode},
    virtual_machine::{OnImageConflict, RunStrategy, VirtualMachine},
};

/// The lifecycle test removes the CRDs; the others need them. Tests of one binary run in
/// parallel, so they coordinate here.
static CRDS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Removes the vmkeep CRDs when that harms nobody: always on the local control plane, and on
/// another cluster only when no vmkeep object lives outside the tests' namespaces. Returns
/// whether the CRDs are now absent.
fn remove_crds_if_harmless() -> bool {
    let out = kubectl(
        &["get", "vmkeep", "--all-namespaces", "-o", r#"jsonpath={range .items[*]}{.metadata.namespace}{"\n"}{end}"#],
        None,
    );
    if !out.status.success() {
        return true; // no vmkeep resource types: the CRDs are absent already
    }
    let foreign =
        String::from_utf8_lossy(&out.stdout).lines().any(|ns| !ns.is_empty() && !ns.starts_with("vmkeep-test-"));
    if foreign && !is_local_cluster() {
        eprintln!("vmkeep objects exist outside the test namespaces: keeping the CRDs");
        return false;
    }
    // Objects left behind by interrupted test runs keep finalizers no operator will remove.
    let leftovers = kubectl(
        &[
            "get",
            "virtualmachines.vmkeep.io,images.vmkeep.io",
            "--all-namespaces",
            "-o",
            r#"jsonpath={range .items[*]}{.kind}{" "}{.metadata.namespace}{" "}{.metadata.name}{"\n"}{end}"#,
        ],
        None,
    );
    for line in String::from_utf8_lossy(&leftovers.stdout).lines() {
        if let [kind, ns, name] = line.split(' ').collect::<Vec<_>>()[..]
            && (ns.starts_with("vmkeep-test-") || is_local_cluster())
        {
            let resource = format!("{}.vmkeep.io", kind.to_lowercase());
            let unblock = r#"{"metadata":{"finalizers":null}}"#;
            kubectl(&["patch", &resource, name, "-n", ns, "--type=merge", "-p", unblock], None);
        }
    }
    let crds = repo().join("crds");
    kubectl_ok(&["delete", "-f", crds.to_str().unwrap(), "--wait=true", "--timeout=120s"], None);
    true
}

#[tokio::test]
async fn operator_waits_for_its_crds_serves_health_and_stops_on_sigterm() {
    let _exclusive = CRDS.write().await;
    let crds_absent = remove_crds_if_harmless();
    let mut operator = Operator::start("lifecycle");
    let http = operator.http;

    wait_for("/healthz to answer 200", Duration::from_secs(30), async || {
        (http_get(http, "/healthz")?.0 == 200).then_some(())
    })
    .await;

    if crds_absent {
        // Without its CRDs the operator stays up and not ready, instead of crash-looping.
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            assert!(operator.exited().is_none(), "vmkeep exited without its CRDs:\n{}", operator.log_text());
            let (status, body) = http_get(http, "/readyz").expect("/readyz answers");
            assert_eq!(status, 503, "ready without CRDs: {body}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(
            operator.log_text().contains("waiting for the CRD"),
            "the log does not say what the operator waits for:\n{}",
            operator.log_text()
        );
        install_crds();
    }

    wait_for("/readyz to answer 200", Duration::from_secs(60), async || {
        (http_get(http, "/readyz")?.0 == 200).then_some(())
    })
    .await;
    let (status, metrics) = http_get(http, "/metrics").expect("/metrics answers");
    assert_eq!(status, 200);
    assert!(metrics.contains("vmkeep_ready 1"), "metrics:\n{metrics}");

    operator.terminate();
    let exit = wait_for("vmkeep to exit after SIGTERM", Duration::from_secs(20), async || operator.exited()).await;
    assert!(exit.success(), "vmkeep exited with {exit} after SIGTERM:\n{}", operator.log_text());
}

#[tokio::test]
async fn examples_are_accepted_listed_and_explained() {
    let _shared = CRDS.read().await;
    install_crds();
    let ns = TestNamespace::new("examples");
    let examples = repo().join("examples");
    kubectl_ok(&["apply", "-n", &ns.name, "-f", examples.to_str().unwrap()], None);

    let listed = kubectl_ok(&["get", "vmkeep", "-n", &ns.name, "-o", "name"], None);
    let mut names: Vec<&str> = listed.lines().collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "image.vmkeep.io/shared-data",
            "image.vmkeep.io/ubuntu-24",
            "template.vmkeep.io/small",
            "virtualmachine.vmkeep.io/vm-a",
            "virtualmachine.vmkeep.io/vm-b",
        ]
    );

    // The API server publishes the CRD's OpenAPI a moment after it is established.
    let explained = wait_for("kubectl explain to show the field's doc", Duration::from_secs(60), async || {
        let out = kubectl(&["explain", "images.spec.persistent"], None);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("at most one VirtualMachine").then_some(text)
    })
    .await;
    assert!(explained.contains("<boolean>"), "{explained}");
}

#[tokio::test]
async fn api_server_fills_the_schema_defaults() {
    let _shared = CRDS.read().await;
    install_crds();
    let ns = TestNamespace::new("defaults");
    let minimal = r#"
apiVersion: vmkeep.io/v1alpha1
kind: Image
metadata: {name: minimal}
spec: {size: 1Gi, source: {blank: {}}}
---
apiVersion: vmkeep.io/v1alpha1
kind: VirtualMachine
metadata: {name: minimal}
spec: {templateRef: {name: small}}
"#;
    kubectl_ok(&["apply", "-n", &ns.name, "-f", "-"], Some(minimal));

    let client = client().await;
    let image = Api::<Image>::namespaced(client.clone(), &ns.name).get("minimal").await.expect("get image");
    assert!(!image.spec.persistent);
    assert!(!image.spec.disabled);
    assert_eq!(image.spec.r#type, ImageType::Os);
    assert_eq!(image.spec.volume_mode, VolumeMode::Filesystem);
    let vm = Api::<VirtualMachine>::namespaced(client, &ns.name).get("minimal").await.expect("get vm");
    assert_eq!(vm.spec.run_strategy, RunStrategy::Always);
    assert_eq!(vm.spec.on_image_conflict, OnImageConflict::Reject);
    // The defaults are written into the stored object, as GitOps diffs expect.
    let stored = kubectl_ok(&["get", "image", "minimal", "-n", &ns.name, "-o", "jsonpath={.spec.type}"], None);
    assert_eq!(stored, "OS");
}

/// Wrong objects, each with the API server's message, and a valid twin that is accepted.
const SCHEMA_CASES: &[(&str, &str, &str)] = &[
    (
        "kind: Image\nmetadata: {name: wrong-type}\nspec: {type: FLOPPY, size: 1Gi, source: {blank: {}}}",
        r#"spec.type: Unsupported value: "FLOPPY": supported values: "OS", "CDROM", "DATABLOCK""#,
        "kind: Image\nmetadata: {name: wrong-type}\nspec: {type: CDROM, size: 1Gi, source: {blank: {}}}",
    ),
    (
        "kind: Template\nmetadata: {name: negative-cpu}\nspec: {cpu: -1, memory: 1Gi}",
        "spec.cpu in body should be greater than or equal to 1",
        "kind: Template\nmetadata: {name: negative-cpu}\nspec: {cpu: 1, memory: 1Gi}",
    ),
    (
        "kind: Template\nmetadata: {name: bad-disk-name}\nspec: {cpu: 1, memory: 1Gi, disks: [{name: Root_Disk, blank: {size: 1Gi}}]}",
        "spec.disks.name in body should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'",
        "kind: Template\nmetadata: {name: bad-disk-name}\nspec: {cpu: 1, memory: 1Gi, disks: [{name: root-disk, blank: {size: 1Gi}}]}",
    ),
    (
        "kind: Template\nmetadata: {name: duplicate-disks}\nspec: {cpu: 1, memory: 1Gi, disks: [{name: a, blank: {size: 1Gi}}, {name: a, image: x}]}",
        "spec.disks[1]: Duplicate value",
        "kind: Template\nmetadata: {name: duplicate-disks}\nspec: {cpu: 1, memory: 1Gi, disks: [{name: a, blank: {size: 1Gi}}, {name: b, image: x}]}",
    ),
    (
        "kind: Template\nmetadata: {name: disk-without-source}\nspec: {cpu: 1, memory: 1Gi, disks: [{name: a}]}",
        r#""spec.disks" must validate one and only one schema (oneOf)"#,
        "kind: Template\nmetadata: {name: disk-without-source}\nspec: {cpu: 1, memory: 1Gi, disks: [{name: a, image: x}]}",
    ),
    (
        "kind: Image\nmetadata: {name: two-sources}\nspec: {size: 1Gi, source: {blank: {}, pvc: {name: x}}}",
        r#""spec.source" must validate one and only one schema (oneOf). Found 2 valid alternatives"#,
        "kind: Image\nmetadata: {name: two-sources}\nspec: {size: 1Gi, source: {pvc: {name: x}}}",
    ),
    (
        "kind: VirtualMachine\nmetadata: {name: paused}\nspec: {templateRef: {name: x}, runStrategy: Paused}",
        r#"spec.runStrategy: Unsupported value: "Paused": supported values: "Always", "Halted""#,
        "kind: VirtualMachine\nmetadata: {name: paused}\nspec: {templateRef: {name: x}, runStrategy: Halted}",
    ),
    (
        "kind: VirtualMachine\nmetadata: {name: no-template}\nspec: {templateRef: {name: \"\"}}",
        "spec.templateRef.name in body should be at least 1 chars long",
        "kind: VirtualMachine\nmetadata: {name: no-template}\nspec: {templateRef: {name: small}}",
    ),
];

#[tokio::test]
async fn schema_rejects_invalid_objects_with_its_message() {
    let _shared = CRDS.read().await;
    install_crds();
    let ns = TestNamespace::new("schema");
    for (wrong, message, right) in SCHEMA_CASES {
        let wrong = format!("apiVersion: vmkeep.io/v1alpha1\n{wrong}\n");
        let out = kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&wrong));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted:\n{wrong}");
        assert!(stderr.contains(message), "for\n{wrong}expected {message:?}, got:\n{stderr}");

        let right = format!("apiVersion: vmkeep.io/v1alpha1\n{right}\n");
        kubectl_ok(&["apply", "-n", &ns.name, "-f", "-"], Some(&right));
    }
}
