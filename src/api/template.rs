//! `Template`: the shape of VirtualMachines (cpu, memory, disks), as OpenNebula's templates.

use std::collections::BTreeMap;

use k8s_openapi::{api::core::v1::Toleration, apimachinery::pkg::api::resource::Quantity};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::{Condition, conditions_schema};

/// What VirtualMachines are made of. A VM copies its Template when it is first provisioned;
/// later edits to the Template do not change existing VMs.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "vmkeep.io",
    version = "v1alpha1",
    kind = "Template",
    namespaced,
    status = "TemplateStatus",
    shortname = "vmktemplate",
    category = "vmkeep",
    derive = "PartialEq",
    doc = "The shape of VirtualMachines: cpu, memory and disks made from Images in the same namespace.",
    printcolumn(name = "CPU", type_ = "integer", json_path = ".spec.cpu"),
    printcolumn(name = "Memory", type_ = "string", json_path = ".spec.memory"),
    printcolumn(name = "Instances", type_ = "integer", json_path = ".status.instances"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct TemplateSpec {
    /// Virtual CPU cores of each VM (requested by its launcher Pod).
    #[schemars(range(min = 1))]
    pub cpu: i32,
    /// Memory of each VM, e.g. `4Gi` (requested by its launcher Pod).
    pub memory: Quantity,
    /// The VM's disks, in boot order. Names are unique; at most one disk may use a CDROM image.
    #[serde(default)]
    #[schemars(schema_with = "disks_schema")]
    pub disks: Vec<TemplateDisk>,
    /// Pod-level settings for the VMs' launcher Pods (with the `kubevirt` runtime: the same
    /// fields of the VirtualMachineInstance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launcher: Option<LauncherSpec>,
    /// What runs the VMs made from this Template, instead of the operator's `--runtime`:
    /// `launcher` (vmkeep's launcher Pod with QEMU), `kubevirt` (a KubeVirt
    /// VirtualMachineInstance) or `auto` (`kubevirt` where the cluster serves KubeVirt's API).
    /// A VM keeps the runtime it runs with until it stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
}

/// What runs a VM's guest (DESIGN "Running VMs"; docs/kubevirt.md).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// vmkeep's launcher Pod: `vmkeep launch` with QEMU as its child.
    #[default]
    Launcher,
    /// A KubeVirt `kubevirt.io/v1` VirtualMachineInstance named after the VM, on the same PVCs.
    Kubevirt,
    /// `kubevirt` when the cluster serves KubeVirt's VirtualMachineInstance API, else
    /// `launcher` (looked at when the VM starts).
    Auto,
}

impl Runtime {
    /// The name used in the API, flags and status (`launcher`, `kubevirt`, `auto`).
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Launcher => "launcher",
            Runtime::Kubevirt => "kubevirt",
            Runtime::Auto => "auto",
        }
    }
}

/// One disk of a Template: either an Image or a volatile blank disk.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [{"required": ["image"]}, {"required": ["blank"]}]))]
pub struct TemplateDisk {
    /// The disk's name: a DNS label (lower-case letters, digits and `-`), unique within the
    /// Template. The VM's PVC for it is `<vm>-<name>`.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// The name of an Image in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub image: Option<String>,
    /// Grow each VM's copy of a non-persistent image to this size (at least the image's
    /// capacity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
    /// A volatile disk: a new empty PVC per VM, deleted with the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blank: Option<BlankDisk>,
}

/// A volatile, empty disk.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct BlankDisk {
    /// The size of the empty disk, e.g. `5Gi`.
    pub size: Quantity,
}

/// Pod-level settings for launcher Pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LauncherSpec {
    /// Node labels the launcher Pod must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the launcher Pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// The PriorityClass of the launcher Pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Seconds a stopping launcher Pod is given (default 60): the guest gets the ACPI power
    /// button until 5 s before this, then QEMU is told to quit and, at the end, killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 3600))]
    pub termination_grace_period_seconds: Option<i64>,
}

/// The observed state of a Template.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateStatus {
    /// How many VirtualMachines made from this Template exist now, not counting Rejected or
    /// Failed ones (they hold and run nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<i32>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: every referenced Image exists and is usable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// Disks form a list keyed by name, so the API server refuses two disks with one name and
/// server-side apply merges them by name.
fn disks_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<TemplateDisk>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert("x-kubernetes-list-map-keys".into(), serde_json::json!(["name"]));
    schema
}
