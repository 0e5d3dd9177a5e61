//! `Image`: a disk image, persistent (one VM at a time) or not (cloned per VM).

use k8s_openapi::apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::{Condition, conditions_schema};

/// A disk image, as OpenNebula's images: either persistent (one VirtualMachine at a time
/// holds its PVC, changes survive) or not (every VM gets its own clone, changes die with it).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "vmkeep.io",
    version = "v1alpha1",
    kind = "Image",
    namespaced,
    status = "ImageStatus",
    shortname = "vmkimage",
    category = "vmkeep",
    derive = "PartialEq",
    doc = "A disk image that VirtualMachines use through Templates: persistent (one VM at a time holds it, changes survive) or not (each VM gets its own clone).",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Persistent", type_ = "boolean", json_path = ".status.persistent"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "VMs", type_ = "integer", json_path = ".status.runningVMs"),
    printcolumn(name = "Holder", type_ = "string", json_path = ".status.claimedBy.name"),
    printcolumn(
        name = "Pending",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"PersistenceChangePending\")].status"
    ),
    printcolumn(name = "Capacity", type_ = "string", json_path = ".status.capacity"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    /// `true`: the image is one ReadWriteOnce PVC that at most one VirtualMachine holds at a time
    /// and changes survive the VM. `false` (default): every VM gets its own clone and changes die
    /// with the VM. May be changed later; while VMs use the image the change waits until the
    /// last one lets go (condition `PersistenceChangePending`).
    #[serde(default)]
    pub persistent: bool,

    /// What the image holds: `OS` (a bootable disk, default), `CDROM` (always attached
    /// read-only) or `DATABLOCK` (a data disk).
    #[serde(default)]
    pub r#type: ImageType,

    /// For a `blank` source, the size of the new disk (required); for other sources the minimum
    /// capacity of the image's PVC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,

    /// The StorageClass of the image's PVC (and of the per-VM clones). The cluster's default
    /// StorageClass when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub storage_class_name: Option<String>,

    /// `Filesystem` (default) or `Block`: how the PVC is presented to the VM's launcher Pod.
    #[serde(default)]
    pub volume_mode: VolumeMode,

    /// `true` stops new VirtualMachines from starting with this image (OpenNebula's DISABLED);
    /// VMs that already use it keep it.
    #[serde(default)]
    pub disabled: bool,

    /// Where the image's content comes from. Exactly one of its fields must be set.
    pub source: ImageSource,
}

/// What an image holds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum ImageType {
    /// A bootable operating-system disk.
    #[default]
    #[serde(rename = "OS")]
    Os,
    /// A read-only optical disk; at most one per Template.
    #[serde(rename = "CDROM")]
    Cdrom,
    /// A data disk.
    #[serde(rename = "DATABLOCK")]
    Datablock,
}

/// How a PVC is presented to a Pod.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum VolumeMode {
    /// Mounted as a filesystem (`volumeMounts`).
    #[default]
    Filesystem,
    /// Attached as a raw block device (`volumeDevices`).
    Block,
}

/// Where an image's content comes from: exactly one field is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [
    {"required": ["blank"]},
    {"required": ["pvc"]},
    {"required": ["image"]},
    {"required": ["http"]},
    {"required": ["virtualMachineDisk"]},
]))]
pub struct ImageSource {
    /// An empty disk of `spec.size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blank: Option<BlankSource>,
    /// Adopt an existing PVC in the same namespace; vmkeep never deletes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,
    /// A clone of another Image in the same namespace (OpenNebula's `oneimage clone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRef>,
    /// Import from a URL (a marketplace appliance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSource>,
    /// Save a disk of a VirtualMachine in the same namespace as a new image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_machine_disk: Option<VirtualMachineDiskSource>,
}

/// An empty disk; its size is `spec.size`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct BlankSource {}

/// An existing PersistentVolumeClaim.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct PvcSource {
    /// The PVC's name, in the Image's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A reference to an Image in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ImageRef {
    /// The Image's name, in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A disk image to download.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpSource {
    /// The `http://` or `https://` URL of the image file.
    #[schemars(regex(pattern = r"^https?://"))]
    pub url: String,
    /// The expected SHA-256 of the downloaded file, as 64 hex digits; the import fails on a
    /// mismatch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-fA-F]{64}$"))]
    pub sha256: Option<String>,
    /// The file's format: `raw` (default) or `qcow2` (converted to raw on import). Either may
    /// be gzip or xz compressed (detected from the file's first bytes).
    #[serde(default)]
    pub format: DiskFormat,
    /// A Secret in the Image's namespace whose keys are HTTP header names and values their
    /// values (e.g. `Authorization: Bearer ...`), sent with every request. The importer Pod
    /// mounts it; vmkeep itself never reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<LocalObjectReference>,
    /// A ConfigMap in the Image's namespace whose every key is a PEM bundle of CA certificates
    /// trusted for `https://` in addition to the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_config_map: Option<LocalObjectReference>,
}

/// A reference to an object by name, in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct LocalObjectReference {
    /// The object's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The format of a downloaded disk image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A plain disk image.
    #[default]
    Raw,
    /// A QEMU copy-on-write image.
    Qcow2,
}

impl std::str::FromStr for DiskFormat {
    type Err = String;

    /// `raw` or `qcow2` (any case).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "raw" => Ok(DiskFormat::Raw),
            "qcow2" => Ok(DiskFormat::Qcow2),
            other => Err(format!("unknown disk image format {other:?}: raw or qcow2")),
        }
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl DiskFormat {
    /// The name in the spec and on `vmkeep import --format`: `raw`, `qcow2`.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// A disk of a VirtualMachine.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineDiskSource {
    /// The VirtualMachine's name, in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub virtual_machine: String,
    /// The disk's name in that VirtualMachine.
    #[schemars(length(min = 1, max = 63))]
    pub disk: String,
}

/// The lifecycle phase of an Image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ImagePhase {
    /// Waiting for something (a source, a StorageClass, a supported source kind).
    #[default]
    Pending,
    /// Downloading from `source.http`.
    Importing,
    /// Cloning from another Image or a VM disk.
    Cloning,
    /// Usable, and no VirtualMachine uses it.
    Ready,
    /// Used by one or more VirtualMachines (non-persistent).
    Used,
    /// Held by one VirtualMachine (persistent).
    UsedPersistent,
    /// `spec.disabled` is true.
    Disabled,
    /// Something failed that needs a change to the spec.
    Error,
    /// Deleted, and waiting until no VirtualMachine uses it.
    Deleting,
}

/// The VirtualMachine that holds a persistent image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ClaimHolder {
    /// The VirtualMachine's name.
    pub name: String,
    /// The VirtualMachine's UID (a recreated VM with the same name is another holder).
    pub uid: String,
    /// When the claim was taken.
    pub since: Time,
}

/// A helper Pod that moves an image's data.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct TransferPod {
    /// The Pod's name, in the Image's namespace.
    pub name: String,
    /// What it does: `Import`, `Probe` (finds the size of an import without `spec.size`) or `Copy`.
    pub role: String,
    /// The Pod's phase (`Pending`, `Running`, `Succeeded`, `Failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

/// The observed state of an Image.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageStatus {
    /// `Pending`, `Importing`, `Cloning`, `Ready`, `Used`, `UsedPersistent`, `Disabled`, `Error`
    /// or `Deleting`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ImagePhase>,
    /// The persistence mode in force; lags `spec.persistent` while a change is pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
    /// The name of the image's own PVC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc_name: Option<String>,
    /// The capacity of the image's PVC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Quantity>,
    /// The StorageClass of the image's PVC (per-VM clones are made in the same class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// How many VirtualMachines use this image now.
    #[serde(default, rename = "runningVMs", skip_serializing_if = "Option::is_none")]
    pub running_vms: Option<i32>,
    /// The sorted names of the VirtualMachines that use this image: at most the first 100
    /// (`consumersTruncated` says when there are more; `runningVMs` counts them all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<String>,
    /// True when more VirtualMachines use the image than `consumers` lists (100).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub consumers_truncated: bool,
    /// For a persistent image, the VirtualMachine that holds it; absent when free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<ClaimHolder>,
    /// The progress of an import, e.g. `42%` (`1.2 GiB` when the server gives no size);
    /// refreshed at most every 5 s while the phase is `Importing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// How many times the importer retried after a server or network error (it resumes where
    /// the server allows Range requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_retries: Option<u32>,
    /// `sha256:<hex>` of the image's raw content, recorded by its import or copy (a
    /// `csi-clone` inherits its source's): a clone holds what its source held when both agree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// For an image cloned from another Image or a VM disk: `csi-clone`, `copy` or `snapshot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_strategy: Option<String>,
    /// Why `copy` replaced the clone strategy asked for (a provisioner that cannot clone, a
    /// clone into another StorageClass, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_fallback: Option<String>,
    /// The helper Pod moving the image's data now (importer, size probe or copier) and its
    /// phase; absent when none runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_pod: Option<TransferPod>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `InUse` and `PersistenceChangePending`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}
