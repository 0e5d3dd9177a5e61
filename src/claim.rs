//! The exclusive claim on a persistent image: the one place that decides who holds an image.
//!
//! A claim is a `coordination.k8s.io/v1` Lease named after the image
//! ([`names::claim_lease`]), whose `holderIdentity` is the holding VirtualMachine's uid. Taking a
//! claim is a **create**: the API server lets exactly one create of a name succeed and answers
//! every other with 409 AlreadyExists, however many reconciles, workers or operator replicas
//! race. Releasing is a **delete with preconditions** (the Lease's uid and resourceVersion), so
//! a release can never remove a claim that another VM took in the meantime. Reads go to the API
//! server, not a cache: a stale cache may make a VM try a create that fails, never hold a claim
//! it does not have.

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, PostParams, Preconditions},
};
use tracing::info;

use crate::{
    api::{Image, VirtualMachine, image::ClaimHolder},
    controller::{Context, Error},
    plan::{build, names, virtual_machine::ClaimState},
};

/// Who holds `lease`'s image, as ClaimHolder (for `Image.status.claimedBy`).
pub fn holder(lease: &Lease) -> Option<ClaimHolder> {
    let spec = lease.spec.as_ref()?;
    let uid = spec.holder_identity.clone()?;
    let name = lease.annotations().get(names::HOLDER_ANNOTATION).cloned().unwrap_or_default();
    // Status times have second precision; truncating keeps a re-read status identical.
    let since = spec
        .acquire_time
        .as_ref()
        .and_then(|t| jiff::Timestamp::from_second(t.0.as_second()).ok())
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    Some(ClaimHolder { name, uid, since: Time(since) })
}

fn state_of(lease: Option<&Lease>, vm_uid: &str) -> ClaimState {
    match lease.and_then(holder) {
        None => ClaimState::Free,
        Some(h) if h.uid == vm_uid => ClaimState::Mine,
        Some(h) => ClaimState::Other { holder: h.name },
    }
}

/// Who holds the claim on `image`, read from the API server.
pub async fn state(ctx: &Context, namespace: &str, image: &str, vm_uid: &str) -> Result<ClaimState, Error> {
    Ok(read_state(&ctx.client, namespace, image, vm_uid).await?)
}

/// [`state`] with a bare client: the admission webhook reads claims without a controller.
pub async fn read_state(
    client: &Client,
    namespace: &str,
    image: &str,
    vm_uid: &str,
) -> Result<ClaimState, kube::Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let lease = leases.get_opt(&names::claim_lease(image)).await?;
    Ok(state_of(lease.as_ref(), vm_uid))
}

/// Tries to take the claim on `image` for `vm`: exactly one of any number of concurrent
/// callers gets `Mine`.
pub async fn take(ctx: &Context, image: &Image, vm: &VirtualMachine) -> Result<ClaimState, Error> {
    let namespace = image.namespace().ok_or(Error::MissingNamespace)?;
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &namespace);
    let lease =
        build::claim_lease(image, &vm.name_any(), &vm.uid().unwrap_or_default(), MicroTime(jiff::Timestamp::now()));
    ctx.wrote("Lease", "create");
    match leases
        .create(&PostParams { field_manager: Some(names::FIELD_MANAGER.into()), ..Default::default() }, &lease)
        .await
    {
        Ok(_) => {
            info!(image = %image.name_any(), vm = %vm.name_any(), "claimed persistent image");
            Ok(ClaimState::Mine)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            state(ctx, &namespace, &image.name_any(), &vm.uid().unwrap_or_default()).await
        }
        Err(e) => Err(e.into()),
    }
}

/// Releases `vm_uid`'s claim on `image`, if it holds it. Idempotent.
pub async fn release(ctx: &Context, namespace: &str, image: &str, vm_uid: &str) -> Result<(), Error> {
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), namespace);
    let name = names::claim_lease(image);
    let Some(lease) = leases.get_opt(&name).await? else { return Ok(()) };
    if state_of(Some(&lease), vm_uid) != ClaimState::Mine {
        return Ok(());
    }
    delete_exactly(ctx, &leases, &lease).await?;
    info!(%image, %vm_uid, "released persistent image");
    Ok(())
}

/// Deletes this very Lease (uid and resourceVersion preconditions); a Lease that is gone or
/// was replaced in the meantime is left alone.
async fn delete_exactly(ctx: &Context, leases: &Api<Lease>, lease: &Lease) -> Result<(), Error> {
    let params = DeleteParams {
        preconditions: Some(Preconditions { uid: lease.uid(), resource_version: lease.resource_version() }),
        ..Default::default()
    };
    ctx.wrote("Lease", "delete");
    match leases.delete(&lease.name_any(), &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Releases a claim whose holder no longer exists (its VM was removed without its finalizer
/// running). Fenced like a normal release: only once no launcher Pod of that VM exists. Checks
/// the API server, not caches. Returns whether it released the claim.
pub async fn release_if_orphaned(ctx: &Context, lease: &Lease) -> Result<bool, Error> {
    let Some(holder) = holder(lease) else { return Ok(false) };
    let namespace = lease.namespace().ok_or(Error::MissingNamespace)?;
    let vms: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Some(vm) = vms.get_opt(&holder.name).await?
        && vm.uid().as_deref() == Some(holder.uid.as_str())
    {
        return Ok(false);
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let selector = format!("{},{}={}", names::MANAGED_SELECTOR, names::VM_LABEL, names::label_value(&holder.name));
    let running = pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .iter()
        .any(|p| p.owner_references().iter().any(|o| o.uid == holder.uid));
    if running {
        return Ok(false);
    }
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &namespace);
    delete_exactly(ctx, &leases, lease).await?;
    info!(lease = %lease.name_any(), holder = %holder.name, "released the claim of a VirtualMachine that no longer exists");
    Ok(true)
}
