//! What a deleted VM leaves behind: its disk PVCs, copier and launcher Pods (and, with the
//! KubeVirt runtime, its VirtualMachineInstance) once an orphaning
//! deletion (`--cascade=orphan`) stripped their owner references. The garbage collector will
//! not take them, and a VM without persistent disks has no finalizer to do it, so this sweep
//! does, decided by [`crate::plan::virtual_machine::left_behind`]: a child labelled with a VM's
//! uid, owned by no controller, whose VM is gone or going (asked of the API server), is deleted
//! (with its uid as a precondition). Found by the fault suite (docs/reliability.md). Owned
//! children cost it no request: a converged cluster costs it nothing.

use std::{sync::Arc, time::Duration};

use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Preconditions},
    runtime::controller::Action,
};
use serde::de::DeserializeOwned;
use tracing::info;

use super::{Context, Error};
use crate::api::VirtualMachine;
use crate::plan::{
    names,
    virtual_machine::{LeftBehind, left_behind},
};

/// How soon a child whose VM still exists (not deleting) is looked at again.
const RECHECK: Duration = Duration::from_secs(5);

/// Sweeps one PVC or Pod of vmkeep's (the watch is label-selected).
pub async fn reconcile<K>(child: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let meta = child.meta();
    // Most children are owned: decided without looking for the VM.
    if left_behind(meta, None) == LeftBehind::No {
        return Ok(Action::await_change());
    }
    // "No such VM" asked of the API server, not the cache: a VM vmkeep cannot read (Malformed)
    // is left out of the cache but exists, and its children must stay (found by a breaker).
    // Metadata only, so an unreadable VM is listed too; orphans are rare, so is this list.
    let ns = child.namespace().ok_or(Error::MissingNamespace)?;
    let uid = meta.labels.as_ref().and_then(|l| l.get(names::VM_UID_LABEL)).cloned().unwrap_or_default();
    let vms: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
    let listed = vms.list_metadata(&ListParams::default()).await?;
    let vm = listed.items.iter().find(|v| v.metadata.uid.as_deref() == Some(uid.as_str()));
    match left_behind(meta, vm.map(|v| &v.metadata)) {
        LeftBehind::No => Ok(Action::await_change()),
        LeftBehind::Recheck => Ok(Action::requeue(RECHECK)),
        LeftBehind::Delete => {
            let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
            let params = DeleteParams {
                preconditions: Some(Preconditions { uid: child.uid(), resource_version: None }),
                ..DeleteParams::background()
            };
            let kind = super::apply::leak_kind::<K>();
            match ctx.writes.send(kind, "delete", api.delete(&child.name_any(), &params)).await {
                Ok(_) => info!(kind, name = %child.name_any(), vm_uid = %uid, "deleted what a deleted VM left behind"),
                // Gone already, or replaced by another object of that name.
                Err(e) if matches!(e.code(), Some(404 | 409)) => {}
                Err(e) => return Err(e.into()),
            }
            Ok(Action::await_change())
        }
    }
}
