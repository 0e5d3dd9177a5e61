//! vmkeep's Pods and PVCs as its caches keep them: decoded straight from the API server's JSON
//! into the fields the decisions read, and nothing else.
//!
//! With 10,000 VMs the operator caches 10,000 launcher Pods and 21,000 PVCs. As `k8s-openapi`
//! structs a Pod is 2,176 bytes before any string (its `PodSpec` is inline even when absent) and
//! a PVC 1,008, and every label, annotation and resource map is a B-tree of at least 544 bytes:
//! about 4 KiB per cached Pod or PVC (`tests/cache.rs` measures it, docs/performance.md has the
//! figures). These types keep the same field names and shapes where the decisions read them
//! (`pod.status.phase`, `pvc.spec.resources.requests.get("storage")`, ...), so reading one reads
//! like reading the full object; the fields they do not have are the ones vmkeep never reads.
//!
//! Each type is a `k8s_openapi::Resource` of its kind, so kube's `Api`, watcher, reflector
//! store and controller work with it directly; it is read-only (vmkeep writes full objects).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{ContainerState, PersistentVolumeClaimCondition, PodCondition},
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
};
use serde::{Deserialize, Deserializer};

use super::names;

/// A Pod vmkeep made (launcher, copier, importer, size probe, binder), as cached.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct CachedPod {
    /// See [`cache_meta`] for what is kept.
    #[serde(deserialize_with = "cache_meta")]
    pub metadata: ObjectMeta,
    pub spec: Option<CachedPodSpec>,
    pub status: Option<CachedPodStatus>,
}

/// Of a Pod's spec: the node it was scheduled to.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedPodSpec {
    pub node_name: Option<String>,
}

/// Of a Pod's status: its phase, its `Ready` and `PodScheduled` conditions, and its containers'
/// states (every Pod vmkeep makes has one container).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedPodStatus {
    pub phase: Option<String>,
    #[serde(default, deserialize_with = "pod_conditions")]
    pub conditions: Option<Vec<PodCondition>>,
    #[serde(default, deserialize_with = "exact")]
    pub container_statuses: Option<Vec<CachedContainerStatus>>,
}

/// Of a container's status: its name, restarts, and current and last state (a terminated
/// state's message is how vmkeep's helpers report).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedContainerStatus {
    pub name: String,
    #[serde(default)]
    pub restart_count: i32,
    pub state: Option<Box<ContainerState>>,
    pub last_state: Option<Box<ContainerState>>,
}

/// A PVC vmkeep made (a VM's disk, an Image's PVC), as cached.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct CachedPvc {
    /// See [`cache_meta`] for what is kept.
    #[serde(deserialize_with = "cache_meta")]
    pub metadata: ObjectMeta,
    pub spec: Option<CachedPvcSpec>,
    pub status: Option<CachedPvcStatus>,
}

/// Of a PVC's spec: its request, class and volume mode.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedPvcSpec {
    pub resources: Option<CachedResources>,
    pub storage_class_name: Option<String>,
    pub volume_mode: Option<String>,
}

/// Of a PVC's resources: its requests.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct CachedResources {
    pub requests: Option<Storage>,
}

/// Of a PVC's status: its phase, capacity and a `FileSystemResizePending` condition (the only
/// one read: an expansion waiting for a Pod to mount the volume).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct CachedPvcStatus {
    pub phase: Option<String>,
    pub capacity: Option<Storage>,
    #[serde(default, deserialize_with = "pvc_conditions")]
    pub conditions: Option<Vec<PersistentVolumeClaimCondition>>,
}

/// A KubeVirt `kubevirt.io/v1` VirtualMachineInstance vmkeep made (the `kubevirt` runtime), as
/// cached: its metadata ([`cache_meta`]) and the status fields a VM's status is made from.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct CachedVmi {
    #[serde(deserialize_with = "cache_meta")]
    pub metadata: ObjectMeta,
    pub status: Option<CachedVmiStatus>,
}

/// Of a VirtualMachineInstance's status: its phase (`Pending`, `Scheduling`, `Scheduled`,
/// `Running`, `Succeeded`, `Failed`, `Unknown`), why it is in it, its node and its `Ready`
/// condition.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedVmiStatus {
    pub phase: Option<String>,
    pub reason: Option<String>,
    pub node_name: Option<String>,
    #[serde(default, deserialize_with = "vmi_conditions")]
    pub conditions: Option<Vec<VmiCondition>>,
}

/// A condition of a VirtualMachineInstance (KubeVirt's shape: no observedGeneration).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct VmiCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: Option<String>,
    pub message: Option<String>,
}

/// A resource list (`requests`, `capacity`) of which only `storage` is kept; read as the map
/// it comes from, `get("storage")`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Storage(Option<Quantity>);

impl Storage {
    /// The quantity of `resource`: only `storage` is kept.
    pub fn get(&self, resource: &str) -> Option<&Quantity> {
        (resource == "storage").then_some(self.0.as_ref()).flatten()
    }
}

impl<'de> Deserialize<'de> for Storage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut all = BTreeMap::<String, Quantity>::deserialize(d)?;
        Ok(Storage(all.remove("storage")))
    }
}

/// The metadata the caches keep: name, namespace, uid, resourceVersion, generation, creation
/// and deletion times, owner references, and only vmkeep's own labels and annotations
/// (`vmkeep.io/...`: which VM or Image a child is for, a clone's strategy and digest; and the
/// `managed-by` label). Not kept: `managedFields`, finalizers, and what others add (the
/// binder's and provisioner's annotations, Pod Security's, users' labels).
pub fn cache_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let meta = ObjectMeta::deserialize(d)?;
    let ours = |map: Option<BTreeMap<String, String>>| {
        let kept = |k: &String| k.starts_with(names::VMKEEP_PREFIX) || k == names::MANAGED_BY;
        map.map(|m| m.into_iter().filter(|(k, _)| kept(k)).collect::<BTreeMap<_, _>>()).filter(|m| !m.is_empty())
    };
    Ok(ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        generation: meta.generation,
        creation_timestamp: meta.creation_timestamp,
        deletion_timestamp: meta.deletion_timestamp,
        owner_references: meta.owner_references.map(shrink),
        labels: ours(meta.labels),
        annotations: ours(meta.annotations),
        ..ObjectMeta::default()
    })
}

/// A list without spare capacity (decoders grow lists by doubling).
fn shrink<T>(mut list: Vec<T>) -> Vec<T> {
    list.shrink_to_fit();
    list
}

fn exact<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Vec<T>>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(d)?.map(shrink))
}

fn pod_conditions<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<PodCondition>>, D::Error> {
    let all = Option::<Vec<PodCondition>>::deserialize(d)?;
    Ok(all.map(|cs| cs.into_iter().filter(|c| c.type_ == "Ready" || c.type_ == "PodScheduled").collect()).map(shrink))
}

fn pvc_conditions<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<PersistentVolumeClaimCondition>>, D::Error> {
    let all = Option::<Vec<PersistentVolumeClaimCondition>>::deserialize(d)?;
    let kept: Option<Vec<_>> = all.map(|cs| cs.into_iter().filter(|c| c.type_ == "FileSystemResizePending").collect());
    Ok(kept.filter(|cs| !cs.is_empty()).map(shrink))
}

fn vmi_conditions<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<VmiCondition>>, D::Error> {
    let all = Option::<Vec<VmiCondition>>::deserialize(d)?;
    Ok(all.map(|cs| cs.into_iter().filter(|c| c.type_ == "Ready").collect()).map(shrink))
}

macro_rules! cached_resource {
    ($ty:ty, $kind:literal, $plural:literal) => {
        cached_resource!($ty, "", "v1", $kind, $plural);
    };
    ($ty:ty, $group:literal, $api_version:literal, $kind:literal, $plural:literal) => {
        impl k8s_openapi::Resource for $ty {
            const API_VERSION: &'static str = $api_version;
            const GROUP: &'static str = $group;
            const KIND: &'static str = $kind;
            const VERSION: &'static str = "v1";
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = k8s_openapi::NamespaceResourceScope;
        }

        impl k8s_openapi::Metadata for $ty {
            type Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
            fn metadata(&self) -> &Self::Ty {
                &self.metadata
            }
            fn metadata_mut(&mut self) -> &mut Self::Ty {
                &mut self.metadata
            }
        }
    };
}

cached_resource!(CachedPod, "Pod", "pods");
cached_resource!(CachedPvc, "PersistentVolumeClaim", "persistentvolumeclaims");
cached_resource!(CachedVmi, "kubevirt.io", "kubevirt.io/v1", "VirtualMachineInstance", "virtualmachineinstances");

/// The same `k8s_openapi` impls for what vmkeep writes of a kind (`build::Instance`).
pub(super) use cached_resource as resource;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_pod_keeps_what_the_controllers_read() {
        let pod: CachedPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "vm-a-launcher", "namespace": "ns", "uid": "p1",
                "labels": {"app.kubernetes.io/managed-by": "vmkeep", "vmkeep.io/virtual-machine": "vm-a", "team": "x"},
                "annotations": {"seccomp.security.alpha.kubernetes.io/pod": "runtime/default"},
                "managedFields": [{"manager": "vmkeep", "operation": "Update"}],
                "ownerReferences": [
                    {"apiVersion": "vmkeep.io/v1alpha1", "kind": "VirtualMachine", "name": "vm-a", "uid": "u1"}]},
            "spec": {"nodeName": "n1", "containers": [{"name": "launcher", "image": "launcher:1"}]},
            "status": {"phase": "Running", "conditions": [
                {"type": "Initialized", "status": "True"}, {"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "launcher", "restartCount": 2, "ready": true, "image": "i",
                    "imageID": "x", "lastState": {"terminated": {"exitCode": 1, "message": "m"}}}]},
        }))
        .unwrap();
        let meta = &pod.metadata;
        assert_eq!(meta.owner_references.as_ref().map(Vec::len), Some(1));
        let labels: Vec<&str> = meta.labels.iter().flatten().map(|(k, _)| k.as_str()).collect();
        assert_eq!(labels, ["app.kubernetes.io/managed-by", "vmkeep.io/virtual-machine"]);
        assert!(meta.annotations.is_none() && meta.managed_fields.is_none());
        assert_eq!(pod.spec.and_then(|s| s.node_name).as_deref(), Some("n1"));
        let status = pod.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.conditions.map(|c| c.len()), Some(1), "Ready is kept");
        let container = &status.container_statuses.unwrap()[0];
        assert_eq!(container.restart_count, 2);
        let last = container.last_state.as_ref().and_then(|s| s.terminated.as_ref()).unwrap();
        assert_eq!((last.exit_code, last.message.as_deref()), (1, Some("m")));
    }

    #[test]
    fn a_cached_pvc_keeps_what_the_controllers_read() {
        let pvc: CachedPvc = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "vm-a-root", "annotations": {"pv.kubernetes.io/bind-completed": "yes",
                    "vmkeep.io/clone-strategy": "copy"},
                "finalizers": ["kubernetes.io/pvc-protection"],
                "ownerReferences": [{"apiVersion": "v1", "kind": "VirtualMachine", "name": "vm-a", "uid": "u1"}]},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "standard", "volumeMode": "Block",
                "resources": {"requests": {"storage": "1Gi", "other": "1"}}, "volumeName": "pv-1"},
            "status": {"phase": "Bound", "capacity": {"storage": "2Gi"}, "accessModes": ["ReadWriteOnce"],
                "conditions": [{"type": "Resizing", "status": "True"},
                    {"type": "FileSystemResizePending", "status": "True"}]},
        }))
        .unwrap();
        let annotations: Vec<&str> = pvc.metadata.annotations.iter().flatten().map(|(k, _)| k.as_str()).collect();
        assert_eq!(annotations, ["vmkeep.io/clone-strategy"], "only vmkeep's annotations are kept");
        assert!(pvc.metadata.finalizers.is_none());
        assert_eq!(pvc.metadata.owner_references.as_ref().map(Vec::len), Some(1));
        let spec = pvc.spec.unwrap();
        assert_eq!(
            (spec.storage_class_name.as_deref(), spec.volume_mode.as_deref()),
            (Some("standard"), Some("Block"))
        );
        let requests = spec.resources.and_then(|r| r.requests).unwrap();
        assert_eq!((requests.get("storage").map(|q| q.0.as_str()), requests.get("other")), (Some("1Gi"), None));
        let status = pvc.status.unwrap();
        assert_eq!(status.capacity.and_then(|c| c.get("storage").cloned()).map(|q| q.0), Some("2Gi".into()));
        assert_eq!(status.conditions.map(|c| c.len()), Some(1), "only FileSystemResizePending is kept");
    }
}
