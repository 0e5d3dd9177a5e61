//! `VirtualMachine`: one VM instantiated from a Template.

use k8s_openapi::apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::{Condition, conditions_schema};

/// A virtual machine made from a Template in the same namespace: its disks become PVCs (a
/// clone per VM, or the persistent image's own PVC under an exclusive claim) and, while it runs,
/// a launcher Pod mounts them.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "vmkeep.io",
    version = "v1alpha1",
    kind = "VirtualMachine",
    namespaced,
    status = "VirtualMachineStatus",
    shortname = "vmkvm",
    category = "vmkeep",
    derive = "PartialEq",
    doc = "A virtual machine made from a Template: per-VM clones of non-persistent images, an exclusive claim on persistent ones, and a launcher Pod while it runs.",
    printcolumn(name = "Template", type_ = "string", json_path = ".spec.templateRef.name"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineSpec {
    /// The Template this VM is made from, in the same namespace. Read once, when the VM is
    /// first provisioned.
    pub template_ref: TemplateRef,
    /// `Always` (default): the launcher Pod runs. `Halted`: powered off; the launcher Pod is
    /// removed, disks and persistent-image claims are kept.
    #[serde(default)]
    pub run_strategy: RunStrategy,
    /// What to do when a persistent image of the Template is held by another VM: `Reject`
    /// (default; phase `Rejected`, reason `ImageInUse`) or `Wait` (stay `Pending` and take the
    /// image, first come first served, once it is free).
    #[serde(default)]
    pub on_image_conflict: OnImageConflict,
}

/// A reference to a Template in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct TemplateRef {
    /// The Template's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Whether the VM runs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RunStrategy {
    /// The launcher Pod runs.
    #[default]
    Always,
    /// Powered off: no launcher Pod; disks and claims are kept.
    Halted,
}

/// What a VM does when a persistent image it needs is held by another VM.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum OnImageConflict {
    /// Give up: phase `Rejected` until the spec changes or the VM is recreated.
    #[default]
    Reject,
    /// Queue for the image, in creation order.
    Wait,
}

/// The lifecycle phase of a VirtualMachine.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum VirtualMachinePhase {
    /// Waiting for its Template, an Image, or a busy persistent image (see the conditions).
    #[default]
    Pending,
    /// Creating its disks and claims.
    Provisioning,
    /// Disks ready; the launcher Pod is not running yet.
    Starting,
    /// The launcher Pod runs.
    Running,
    /// `runStrategy: Halted`: no launcher Pod, disks and claims kept.
    Stopped,
    /// A persistent image it needs is held by another VM (`onImageConflict: Reject`).
    Rejected,
    /// The spec can never work (see the conditions).
    Failed,
    /// Deleted; releasing its launcher Pod and claims.
    Terminating,
}

/// One disk of a VM as resolved from its Template.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineDiskStatus {
    /// The disk's name in the Template.
    pub name: String,
    /// The Image it comes from; absent for a volatile blank disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Whether the disk is the persistent image's own PVC (held under a claim).
    #[serde(default)]
    pub persistent: bool,
    /// The PVC that backs the disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc_name: Option<String>,
    /// The PVC's phase (`Pending`, `Bound`, `Lost`), or `Missing` before it exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The size of the VM's own PVC (a clone or a volatile disk); absent for a persistent image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
    /// Whether the disk is attached read-only (CDROM images).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// How the clone was made: `csi-clone` (the storage's own clone) or `copy` (a copier Pod
    /// filled it, for storage that cannot clone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_strategy: Option<String>,
    /// Why `copy` replaced the strategy the StorageClass or the operator asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_fallback: Option<String>,
    /// The sha256 of the content copied into a `copy` clone (`sha256:<hex>`): what its image held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// The observed state of a VirtualMachine.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStatus {
    /// `Pending`, `Provisioning`, `Starting`, `Running`, `Stopped`, `Rejected`, `Failed` or
    /// `Terminating`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VirtualMachinePhase>,
    /// The disks, resolved from the Template when the VM was first provisioned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<VirtualMachineDiskStatus>,
    /// Virtual CPU cores, copied from the Template when the VM was first provisioned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<i32>,
    /// Memory, copied from the Template when the VM was first provisioned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// What runs the guest: `launcher` (a launcher Pod) or `kubevirt` (a KubeVirt
    /// VirtualMachineInstance with the VM's name), once chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<crate::api::template::Runtime>,
    /// The name of the launcher Pod while it exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launcher_pod: Option<String>,
    /// The node the launcher Pod (or the VirtualMachineInstance) runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// How QEMU runs the guest: `KVM` (hardware virtualization) or `TCG` (software emulation,
    /// when `/dev/kvm` does not work in the launcher), as the launcher found at its start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
    /// How often the guest was started again in the current launcher Pod (it powered off or
    /// QEMU ended, and `runStrategy` is `Always`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts: Option<i32>,
    /// How the guest last ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<LastExit>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `ImagesClaimed`, `DisksReady` and `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// How a VM's guest last ended, from its launcher's termination message.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastExit {
    /// `GuestPowerOff` (the guest powered itself off), `Stopped` (it powered off after the
    /// power button), `Killed` (it did not, by the deadline), `QemuExited` (QEMU failed; its
    /// exit code is in the message), `DiskUnavailable`, `LaunchFailed`, or the container's
    /// reason from the kubelet (e.g. `OOMKilled`).
    pub reason: String,
    /// What happened, e.g. `QEMU exited with code 1: ...`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The launcher container's exit code.
    pub exit_code: i32,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
}
