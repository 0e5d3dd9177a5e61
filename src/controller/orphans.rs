//! What a deleted VM leaves behind: its disk PVCs, copier and launcher Pods once an orphaning
//! deletion (`--cascade=orphan`) stripped their owner references. The garbage collector will
//! not take them, and a VM without persistent disks has no finalizer to do it, so this sweep
//! does, decided by [`plan::virtual_machine::left_behind`]: a child labelled with a VM's uid,
//! owned by no controller, whose VM is gone or going, is deleted (with its uid as a
//! precondition). Found by the fault suite (docs/reliability.md). It reads the shared caches
//! and writes only for such children: a converged cluster costs it nothing.

use std::{sync::Arc, time::Duration};

use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Preconditions},
    runtime::controller::Action,
};
use serde::de::DeserializeOwned;
use tracing::info;

use super::{Context, Error};
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
    // "No such VM" is only true of a complete cache.
    ctx.stores.ready().await;
    let ns = child.namespace().ok_or(Error::MissingNamespace)?;
    let uid = meta.labels.as_ref().and_then(|l| l.get(names::VM_UID_LABEL)).cloned().unwrap_or_default();
    let vms = ctx.stores.vms.state();
    let vm = vms.iter().find(|v| v.namespace().as_deref() == Some(ns.as_str()) && v.uid().as_deref() == Some(&uid));
    match left_behind(meta, vm.map(|v| v.as_ref())) {
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
