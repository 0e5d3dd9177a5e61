//! The writes every controller makes, in one place: status (server-side apply, only when it
//! changed), finalizers (optimistic, resourceVersion-checked), children (create, telling ours
//! from someone else's), and Events. Each write goes through [`crate::write::Writes`]: bounded
//! by a timeout and counted in `vmkeep_api_writes` by outcome.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::events::{Event, EventType},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;
use tracing::warn;

use super::{Context, Error};
use crate::plan::{names, virtual_machine::Child};

/// Whether `obj` is controlled by the owner with `owner_uid`.
pub fn owned_by(meta: &kube::api::ObjectMeta, owner_uid: &str) -> bool {
    meta.owner_references.iter().flatten().any(|o| o.controller == Some(true) && o.uid == owner_uid)
}

/// Whether a VM's child (disk PVC, copier Pod) is the VM's (uid `vm_uid`): controlled by it,
/// or without any controller and labelled with its uid, as an orphaning deletion leaves it
/// (the garbage collector strips the owner references, the label stays).
pub fn vm_child(meta: &kube::api::ObjectMeta, vm_uid: &str) -> bool {
    let controlled = meta.owner_references.iter().flatten().any(|o| o.controller == Some(true));
    owned_by(meta, vm_uid)
        || (!controlled
            && meta.labels.as_ref().and_then(|l| l.get(names::VM_UID_LABEL)) == Some(&names::label_value(vm_uid)))
}

/// A child of the VM with `vm_uid` as its plan sees it ([`vm_child`]).
pub fn child_state<K: Resource>(obj: Option<&K>, vm_uid: &str, phase: impl Fn(&K) -> Option<String>) -> Child {
    match obj {
        None => Child::Missing,
        Some(o) if vm_child(o.meta(), vm_uid) => {
            Child::Ours { phase: phase(o), deleting: o.meta().deletion_timestamp.is_some() }
        }
        Some(_) => Child::Foreign,
    }
}

/// Writes `status` with server-side apply when it differs from `current`.
pub async fn status<K, S>(ctx: &Context, obj: &K, current: Option<&S>, status: &S) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
    S: Serialize + PartialEq,
{
    if current == Some(status) {
        return Ok(());
    }
    let namespace = obj.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let body = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let (name, params, patch) = (obj.name_any(), PatchParams::apply(names::FIELD_MANAGER).force(), Patch::Apply(&body));
    ctx.writes.send(leak_kind::<K>(), "patch-status", api.patch_status(&name, &params, &patch)).await?;
    Ok(())
}

/// Patches the finalizers of `obj` after testing that they are still what was read, so a
/// finalizer list changed by someone else in the meantime is never overwritten (409 instead).
async fn patch_finalizers<K>(ctx: &Context, obj: &K, ops: Vec<serde_json::Value>) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
{
    let namespace = obj.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let current = obj.meta().finalizers.as_ref();
    let mut patch = vec![json!({"op": "test", "path": "/metadata/finalizers", "value": current})];
    patch.extend(ops);
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(patch))?;
    let (name, params, patch) = (obj.name_any(), PatchParams::default(), Patch::<()>::Json(patch));
    match ctx.writes.send(leak_kind::<K>(), "patch-finalizers", api.patch(&name, &params, &patch)).await {
        Ok(_) => Ok(()),
        Err(e) => match e.code() {
            // Already gone: nothing left to finalize.
            Some(404) => Ok(()),
            // The test failed: the finalizers changed; retry from a fresh read.
            Some(422) => Err(Error::Conflict(e.to_string())),
            _ => Err(e.into()),
        },
    }
}

/// Adds `finalizer` to `obj` unless it has it (resourceVersion-safe: see [`patch_finalizers`]).
pub async fn add_finalizer<K>(ctx: &Context, obj: &K, finalizer: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
{
    if obj.finalizers().iter().any(|f| f == finalizer) {
        return Ok(());
    }
    let op = if obj.finalizers().is_empty() {
        json!({"op": "add", "path": "/metadata/finalizers", "value": [finalizer]})
    } else {
        json!({"op": "add", "path": "/metadata/finalizers/-", "value": finalizer})
    };
    patch_finalizers(ctx, obj, vec![op]).await
}

/// Removes `finalizer` from `obj` if it has it (resourceVersion-safe).
pub async fn remove_finalizer<K>(ctx: &Context, obj: &K, finalizer: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
{
    let Some(index) = obj.finalizers().iter().position(|f| f == finalizer) else { return Ok(()) };
    patch_finalizers(ctx, obj, vec![json!({"op": "remove", "path": format!("/metadata/finalizers/{index}")})]).await
}

/// Creates a child; when its name is taken, reads what is there and says whose it is.
pub async fn create_child<K>(ctx: &Context, api: &Api<K>, child: &K, owner_uid: &str) -> Result<bool, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug,
{
    let params = PostParams { field_manager: Some(names::FIELD_MANAGER.into()), ..Default::default() };
    match ctx.writes.send(leak_kind::<K>(), "create", api.create(&params, child)).await {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Some(409) => {
            let existing = api.get_opt(&child.name_any()).await?;
            Ok(existing.is_some_and(|o| owned_by(o.meta(), owner_uid)))
        }
        Err(e) => Err(e.into()),
    }
}

/// Deletes a child, if it is still there.
pub async fn delete_child<K>(ctx: &Context, api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let params = DeleteParams::background();
    match ctx.writes.send(leak_kind::<K>(), "delete", api.delete(name, &params)).await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(404) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Publishes an Event about `obj` (logged, not fatal, when it fails).
pub async fn event<K: Resource<DynamicType = ()>>(ctx: &Context, obj: &K, warning: bool, reason: &str, note: String) {
    let event = Event {
        type_: if warning { EventType::Warning } else { EventType::Normal },
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    let regarding = obj.object_ref(&());
    if let Err(error) = ctx.writes.send("Event", "create", ctx.recorder.publish(&event, &regarding)).await {
        warn!(%error, reason, "cannot publish an Event");
    }
}

/// The kind as a `'static` label for metrics.
pub fn leak_kind<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "VirtualMachine" => "VirtualMachine",
        "Image" => "Image",
        "Template" => "Template",
        "PersistentVolumeClaim" => "PersistentVolumeClaim",
        "Pod" => "Pod",
        "Lease" => "Lease",
        "VirtualMachineInstance" => "VirtualMachineInstance",
        _ => "Other",
    }
}
