//! A test's world against a real API server: its namespace, an operator serving it, manifests
//! of vmkeep objects, and the reads and waits the tests share.

use std::time::Duration;

use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{PersistentVolumeClaim, Pod},
    events::v1::Event,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams},
};
use vmkeep::{
    api::{Image, VirtualMachine, virtual_machine::VirtualMachinePhase},
    plan::names,
};

use super::*;

/// How long a test waits for the operator to converge.
pub const LONG: Duration = Duration::from_secs(60);
/// Garbage collection of children of a custom resource waits for the collector's resync; a
/// deleted VM whose launcher Pod runs on a node goes once the kubelet confirms the Pod gone
/// (seconds, but more than a minute for a Pod deleted while it starts on a busy node).
pub const GC: Duration = Duration::from_secs(150);

/// A blank 1Gi Image.
pub fn image(name: &str, persistent: bool) -> String {
    format!(
        "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {{name: {name}}}\n\
         spec: {{persistent: {persistent}, size: 1Gi, source: {{blank: {{}}}}}}\n---\n"
    )
}

/// A template with one disk per `(disk, image)`; `None` is a volatile blank disk. Its disks are
/// blank, so no guest OS answers the ACPI power button: a grace period of 10 s makes the
/// launcher stop QEMU after 5 s instead of the default 55.
pub fn template(name: &str, disks: &[(&str, Option<&str>)]) -> String {
    template_with(name, disks, "launcher: {terminationGracePeriodSeconds: 10}, ")
}

/// [`template`] with more fields of its spec, e.g. `launcher: {nodeSelector: {a: b}}, `
/// (ending in a comma and a space).
pub fn template_with(name: &str, disks: &[(&str, Option<&str>)], extra: &str) -> String {
    let disks: Vec<String> = disks
        .iter()
        .map(|(disk, image)| match image {
            Some(image) => format!("{{name: {disk}, image: {image}}}"),
            None => format!("{{name: {disk}, blank: {{size: 1Gi}}}}"),
        })
        .collect();
    format!(
        "apiVersion: vmkeep.io/v1alpha1\nkind: Template\nmetadata: {{name: {name}}}\n\
         spec: {{{extra}cpu: 1, memory: 256Mi, disks: [{}]}}\n---\n",
        disks.join(", ")
    )
}

/// A VirtualMachine from `template`.
pub fn vm(name: &str, template: &str, on_conflict: &str) -> String {
    format!(
        "apiVersion: vmkeep.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\n\
         spec: {{templateRef: {{name: {template}}}, onImageConflict: {on_conflict}}}\n---\n"
    )
}

/// `kubectl apply` of `yaml` in the test's namespace.
pub fn apply(ns: &TestNamespace, yaml: &str) {
    kubectl_ok(&["apply", "-n", &ns.name, "-f", "-"], Some(yaml));
}

/// The cluster, its CRDs, a namespace and an operator serving it. Dropping it deletes the
/// test's vmkeep objects while the operator still runs (their finalizers need it), then the
/// namespace.
pub struct Env {
    pub ns: TestNamespace,
    pub client: Client,
    pub operator: Operator,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = kubectl(
            &[
                "delete",
                "virtualmachines,images,templates",
                "--all",
                "-n",
                &self.ns.name,
                "--wait=true",
                "--timeout=90s",
            ],
            None,
        );
    }
}

impl Env {
    /// A namespace for `test` and one operator serving it.
    pub async fn new(test: &str) -> Self {
        Self::with_args(test, &[]).await
    }

    /// Like [`Env::new`], the operator started with `args` too.
    pub async fn with_args(test: &str, args: &[&str]) -> Self {
        install_crds();
        let ns = TestNamespace::new(test);
        let mut all = vec!["--namespace", ns.name.as_str()];
        all.extend_from_slice(args);
        let mut operator = Operator::start_with(test, &all);
        operator.ready().await;
        Self { client: client().await, ns, operator }
    }

    /// The API of `K` in the test's namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    pub async fn vm(&self, name: &str) -> Option<VirtualMachine> {
        self.api::<VirtualMachine>().get_opt(name).await.expect("get vm")
    }

    pub async fn vm_phase(&self, name: &str) -> Option<VirtualMachinePhase> {
        self.vm(name).await?.status?.phase
    }

    pub async fn wait_vm(&self, name: &str, phase: VirtualMachinePhase) -> VirtualMachine {
        self.wait_vm_within(name, phase, LONG).await
    }

    /// [`Env::wait_vm`] with its own deadline: for waits that include a launcher's stop, which
    /// takes up to its grace period (60 s by default) when the guest ignores the power button.
    pub async fn wait_vm_within(&self, name: &str, phase: VirtualMachinePhase, deadline: Duration) -> VirtualMachine {
        wait_for(&format!("VirtualMachine {name} to be {phase:?}"), deadline, async || {
            let vm = self.vm(name).await?;
            reached(vm.status.as_ref()?.phase, phase).then_some(vm)
        })
        .await
    }

    pub async fn wait_image(&self, name: &str, what: &str, check: impl Fn(&Image) -> bool) -> Image {
        wait_for(&format!("Image {name}: {what}"), LONG, async || {
            let image = self.api::<Image>().get_opt(name).await.expect("get image")?;
            check(&image).then_some(image)
        })
        .await
    }

    pub async fn pvc(&self, name: &str) -> Option<PersistentVolumeClaim> {
        self.api::<PersistentVolumeClaim>().get_opt(name).await.expect("get pvc")
    }

    pub async fn pod(&self, name: &str) -> Option<Pod> {
        self.api::<Pod>().get_opt(name).await.expect("get pod")
    }

    /// The claim Lease on `image`, if any.
    pub async fn claim(&self, image: &str) -> Option<Lease> {
        self.api::<Lease>().get_opt(&names::claim_lease(image)).await.expect("get lease")
    }

    /// The name of the VM holding `image`, if any.
    pub async fn claim_holder(&self, image: &str) -> Option<String> {
        self.claim(image).await?.annotations().get(names::HOLDER_ANNOTATION).cloned()
    }

    /// Waits for an Event with `reason` about the object named `regarding`.
    pub async fn wait_event(&self, reason: &str, regarding: &str) -> Event {
        wait_for(&format!("an Event {reason} about {regarding}"), LONG, async || {
            let events = self.api::<Event>().list(&ListParams::default()).await.expect("events").items;
            events.into_iter().find(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(regarding)
            })
        })
        .await
    }

    pub async fn delete_vm(&self, name: &str) {
        self.api::<VirtualMachine>().delete(name, &DeleteParams::default()).await.expect("delete vm");
    }

    pub async fn wait_gone<K>(&self, name: &str, timeout: Duration)
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        wait_for(&format!("{} {name} to be gone", K::kind(&())), timeout, async || {
            self.api::<K>().get_opt(name).await.expect("get").is_none().then_some(())
        })
        .await
    }
}
