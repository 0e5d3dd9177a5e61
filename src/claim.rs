//! The exclusive claim on a persistent image: the one place that reads, takes and releases
//! claims. The rules (who holds, who may take, which Pods fence a holder) are pure and live in
//! [`crate::plan::claim`]; here is the IO, with its own error type and no dependency on the
//! controllers, so the VM controller, the Image controller and the admission webhook share it.
//!
//! A claim is a `coordination.k8s.io/v1` Lease named after the image
//! ([`names::claim_lease`]), whose `holderIdentity` is the holding VirtualMachine's uid. Taking a
//! claim is a **create**: the API server lets exactly one create of a name succeed and answers
//! every other with 409 AlreadyExists, however many reconciles, workers or operator replicas
//! race. Releasing is **fenced**: only once no launcher Pod of the holder exists (asked of the
//! API server, found by label and recorded uid, not by owner reference), and a **delete with
//! preconditions** (the Lease's uid and resourceVersion), so a release can never remove a claim
//! that another VM took in the meantime. The Lease has no owner reference: no deletion
//! propagation policy can remove a claim; only its holder's release (or the orphan release
//! below) does. Reads go to the API server, not a cache: a stale cache may make a VM try a
//! create that fails, never hold a claim it does not have.

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, PostParams, Preconditions},
};
use tracing::{info, warn};

use crate::{
    api::{VirtualMachine, image::ClaimHolder},
    plan::{
        build,
        claim::{self as rules, ClaimState},
        names,
    },
    write::{self, Writes},
};

/// Why a claim could not be read, taken or released.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A read of a Lease, Pod or VirtualMachine failed.
    #[error("reading {what}: {source}")]
    Read {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    /// A write (create or delete of a Lease) failed.
    #[error(transparent)]
    Write(#[from] write::Error),
    /// The Lease has no namespace (it always has one when read from the API server).
    #[error("the claim Lease has no namespace")]
    MissingNamespace,
}

fn read(what: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Read { what, source }
}

/// The label KubeVirt puts on a VirtualMachineInstance's virt-launcher Pods (the VMI's uid).
pub const KUBEVIRT_CREATED_BY: &str = "kubevirt.io/created-by";

/// What a release did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// The claim is gone.
    Released,
    /// The claim is not (or no longer) the holder's: nothing to do.
    NotHeld,
    /// A launcher Pod of the holder still exists: the claim stays until it is gone.
    Fenced,
}

/// Who holds `lease`'s image (for `Image.status.claimedBy` and every decision): the one decoder
/// of a claim Lease.
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

/// The image a claim Lease is about.
pub fn image_of(lease: &Lease) -> Option<&String> {
    lease.annotations().get(names::IMAGE_ANNOTATION)
}

/// Reads, takes and releases claims.
#[derive(Clone)]
pub struct Claims {
    client: Client,
    writes: Option<Writes>,
    /// The KubeVirt runtime's view of its API, when this process may run VMs with it.
    kubevirt: Option<crate::kubevirt::Instances>,
}

impl Claims {
    /// Claims through `client`; `writes` bounds and counts the writes (read-only users, like
    /// the admission webhook, pass `None` and never write).
    pub fn new(client: Client, writes: Option<Writes>) -> Self {
        Self { client, writes, kubevirt: None }
    }

    /// Also fences on the VirtualMachineInstances and virt-launcher Pods of the KubeVirt runtime
    /// whenever `kubevirt` says its API is in use (see `kubevirt_fenced`).
    pub fn with_kubevirt(self, kubevirt: crate::kubevirt::Instances) -> Self {
        Self { kubevirt: Some(kubevirt), ..self }
    }

    fn leases(&self, namespace: &str) -> Api<Lease> {
        Api::namespaced(self.client.clone(), namespace)
    }

    async fn write<T>(
        &self,
        verb: &'static str,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, write::Error> {
        match &self.writes {
            Some(writes) => writes.send("Lease", verb, request).await,
            None => request.await.map_err(|source| write::Error::Api { resource: "Lease", verb, source }),
        }
    }

    /// Who holds `image`, read from the API server: the one holder reader.
    pub async fn holder(&self, namespace: &str, image: &str) -> Result<Option<ClaimHolder>, Error> {
        let lease = self.leases(namespace).get_opt(&names::claim_lease(image)).await.map_err(read("a claim"))?;
        Ok(lease.as_ref().and_then(holder))
    }

    /// Who holds `image` as the VM with `vm_uid` sees it.
    pub async fn state(&self, namespace: &str, image: &str, vm_uid: &str) -> Result<ClaimState, Error> {
        Ok(rules::state_of(self.holder(namespace, image).await?.as_ref(), vm_uid))
    }

    /// Tries to take the claim on `image` for `vm`: exactly one of any number of concurrent
    /// callers gets `Mine`; the others learn who holds it.
    pub async fn take(&self, image: &str, vm: &VirtualMachine) -> Result<ClaimState, Error> {
        let namespace = vm.namespace().ok_or(Error::MissingNamespace)?;
        let uid = vm.uid().unwrap_or_default();
        let lease = build::claim_lease(&namespace, image, &vm.name_any(), &uid, MicroTime(jiff::Timestamp::now()));
        let params = PostParams { field_manager: Some(names::FIELD_MANAGER.into()), ..Default::default() };
        match self.write("create", self.leases(&namespace).create(&params, &lease)).await {
            Ok(_) => {
                info!(%image, vm = %vm.name_any(), "claimed persistent image");
                Ok(ClaimState::Mine)
            }
            Err(e) if e.code() == Some(409) => self.state(&namespace, image, &uid).await,
            Err(e) => Err(e.into()),
        }
    }

    /// Releases the claim on `image` if the VM with `holder_uid` holds it, fenced: only once no
    /// launcher Pod of the holder exists. Every release goes through here.
    pub async fn release(&self, namespace: &str, image: &str, holder_uid: &str) -> Result<Release, Error> {
        let leases = self.leases(namespace);
        let Some(lease) = leases.get_opt(&names::claim_lease(image)).await.map_err(read("a claim"))? else {
            return Ok(Release::NotHeld);
        };
        match holder(&lease) {
            Some(h) if h.uid == holder_uid => self.release_fenced(namespace, &lease, &h).await,
            _ => Ok(Release::NotHeld),
        }
    }

    /// Releases a claim whose holder no longer exists (its VM was removed without its finalizer
    /// running), fenced like every release. Checks the API server, not caches.
    pub async fn release_orphaned(&self, lease: &Lease) -> Result<Release, Error> {
        let Some(h) = holder(lease) else { return Ok(Release::NotHeld) };
        let namespace = lease.namespace().ok_or(Error::MissingNamespace)?;
        let vms: Api<VirtualMachine> = Api::namespaced(self.client.clone(), &namespace);
        if let Some(vm) = vms.get_opt(&h.name).await.map_err(read("the holder VirtualMachine"))?
            && vm.uid().as_deref() == Some(h.uid.as_str())
        {
            return Ok(Release::NotHeld);
        }
        let released = self.release_fenced(&namespace, lease, &h).await?;
        if released == Release::Released {
            info!(lease = %lease.name_any(), holder = %h.name, "released the claim of a VirtualMachine that no longer exists");
        }
        Ok(released)
    }

    /// Whether the KubeVirt runtime still runs `h` (the `kubevirt` runtime, docs/kubevirt.md):
    /// its VirtualMachineInstance (named after the VM, labelled with its uid) exists, or a
    /// virt-launcher Pod of it does (KubeVirt labels it `kubevirt.io/created-by=<vmi uid>` and
    /// copies the VMI's labels onto it, vmkeep's among them; it may outlive the VMI while the
    /// guest stops). Asked only once this process uses KubeVirt's API (a VM, the Template or
    /// `--runtime` asked for it, and discovery shows it; a VM that ran with KubeVirt asks for it
    /// at its first reconcile): the launcher runtime alone costs no request more. An operator
    /// not allowed to read VMIs (403: the chart's KubeVirt rule is off) is fenced by the
    /// virt-launcher Pods alone: a VMI it cannot read is one it could not have made, unless its
    /// RBAC was taken away while VMIs of its existed (docs/kubevirt.md).
    async fn kubevirt_fenced(&self, namespace: &str, h: &ClaimHolder) -> Result<bool, Error> {
        if !self.kubevirt.as_ref().is_some_and(|k| k.state().in_use()) {
            return Ok(false);
        }
        let vmis: Api<build::Instance> = Api::namespaced(self.client.clone(), namespace);
        match vmis.get_metadata_opt(&h.name).await {
            Ok(Some(vmi)) if rules::launcher_of(&vmi.metadata, &h.name, &h.uid) => return Ok(true),
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(kube::Error::Api(e)) if e.code == 403 => {
                warn!(vm = %h.name, "may not read VirtualMachineInstances: fencing on virt-launcher Pods only");
            }
            Err(source) => return Err(Error::Read { what: "a VirtualMachineInstance", source }),
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let params = ListParams::default().labels(KUBEVIRT_CREATED_BY);
        let launchers = pods.list_metadata(&params).await.map_err(read("virt-launcher Pods"))?.items;
        Ok(rules::fenced(launchers.iter().map(|p| &p.metadata), h))
    }

    /// Deletes this very Lease (uid and resourceVersion preconditions) once no launcher Pod of
    /// `h` exists; a Lease that is gone or was replaced in the meantime is left alone.
    async fn release_fenced(&self, namespace: &str, lease: &Lease, h: &ClaimHolder) -> Result<Release, Error> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        // The holder's launcher Pods from the API server: by its VM label, and by the launcher's
        // name, so a Pod whose labels a user edited (e.g. removed managed-by to take it out of
        // vmkeep's watch) still fences the claim.
        let selector = format!("{}={}", names::VM_LABEL, names::label_value(&h.name));
        let mut launchers =
            pods.list_metadata(&ListParams::default().labels(&selector)).await.map_err(read("Pods"))?.items;
        let by_name =
            pods.get_metadata_opt(&names::launcher_pod(namespace, &h.name)).await.map_err(read("a launcher Pod"))?;
        launchers.extend(by_name);
        if rules::fenced(launchers.iter().map(|p| &p.metadata), h) || self.kubevirt_fenced(namespace, h).await? {
            return Ok(Release::Fenced);
        }
        let params = DeleteParams {
            preconditions: Some(Preconditions { uid: lease.uid(), resource_version: lease.resource_version() }),
            ..Default::default()
        };
        match self.write("delete", self.leases(namespace).delete(&lease.name_any(), &params)).await {
            Ok(_) => {
                info!(image = ?image_of(lease), holder = %h.name, "released persistent image");
                Ok(Release::Released)
            }
            Err(e) if e.code() == Some(404) => Ok(Release::NotHeld),
            // 409: the Lease changed or was replaced since it was read: the caller retries from a
            // fresh read (and then finds it held by another VM, or releases it).
            Err(e) => Err(e.into()),
        }
    }
}
