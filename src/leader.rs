//! Leader election for `replicas > 1`: only the holder of a `coordination.k8s.io/v1` Lease runs
//! the controllers; a standby takes over within one lease duration when the leader dies. The
//! leader renews every `renew` period; expiry is judged on the standby's own monotonic clock
//! (how long the Lease has not changed), as client-go does, so clock skew between nodes cannot
//! make two leaders. Even if two leaders overlapped briefly, persistent-image claims stay
//! exclusive: they are atomic creates on the API server (see `claim.rs`).

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Where the leader Lease lives and who this replica is.
#[derive(Clone, Debug)]
pub struct Election {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    pub renew: Duration,
}

/// What a replica saw of the Lease, to judge expiry on its own clock.
struct Seen {
    version: Option<String>,
    since: Instant,
}

fn now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

impl Election {
    fn lease(&self, previous: Option<&Lease>) -> Lease {
        let spec = previous.and_then(|l| l.spec.clone()).unwrap_or_default();
        let changed = spec.holder_identity.as_deref() != Some(self.identity.as_str());
        Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                resource_version: previous.and_then(|l| l.resource_version()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(i32::try_from(self.duration.as_secs()).unwrap_or(15)),
                acquire_time: if changed { Some(now()) } else { spec.acquire_time },
                renew_time: Some(now()),
                lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(changed && previous.is_some())),
                ..Default::default()
            }),
        }
    }

    /// One attempt to become (or stay) leader. `Ok(true)`: this replica leads now.
    async fn try_lead(&self, api: &Api<Lease>, seen: &mut Seen) -> Result<bool, kube::Error> {
        let params = PostParams::default();
        let Some(current) = api.get_opt(&self.name).await? else {
            return match api.create(&params, &self.lease(None)).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let holder = current.spec.as_ref().and_then(|s| s.holder_identity.clone()).unwrap_or_default();
        if current.resource_version() != seen.version {
            seen.version = current.resource_version();
            seen.since = Instant::now();
        }
        let expired = seen.since.elapsed() > self.duration;
        if holder != self.identity && !holder.is_empty() && !expired {
            return Ok(false);
        }
        // Replace with the resourceVersion read: of two replicas, one wins, one gets 409.
        match api.replace(&self.name, &params, &self.lease(Some(&current))).await {
            Ok(updated) => {
                seen.version = updated.resource_version();
                seen.since = Instant::now();
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica leads (or `shutdown`). Returns whether it leads.
    pub async fn acquire(&self, client: &Client, shutdown: &CancellationToken) -> bool {
        let api: Api<Lease> = Api::namespaced(client.clone(), &self.namespace);
        let mut seen = Seen { version: None, since: Instant::now() };
        let mut announced = false;
        loop {
            match self.try_lead(&api, &mut seen).await {
                Ok(true) => {
                    info!(identity = %self.identity, lease = %self.name, "leading");
                    return true;
                }
                Ok(false) if !announced => {
                    info!(lease = %self.name, "another replica leads; standing by");
                    announced = true;
                }
                Ok(false) => {}
                Err(error) => warn!(%error, "leader election failed; retrying"),
            }
            tokio::select! {
                () = tokio::time::sleep(self.renew) => {}
                () = shutdown.cancelled() => return false,
            }
        }
    }

    /// Renews the Lease until `shutdown`, or until it cannot be renewed before it expires:
    /// then `lost` is cancelled, so the controllers stop before another replica may start.
    /// Call [`Election::release`] once the controllers have stopped.
    pub async fn hold(&self, client: &Client, shutdown: CancellationToken, lost: CancellationToken) {
        let api: Api<Lease> = Api::namespaced(client.clone(), &self.namespace);
        let mut seen = Seen { version: None, since: Instant::now() };
        let mut renewed = Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.renew) => {}
                () = shutdown.cancelled() => return,
            }
            match self.try_lead(&api, &mut seen).await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => {
                    warn!("another replica took the leader Lease; stopping");
                    lost.cancel();
                    return;
                }
                Err(error) => warn!(%error, "cannot renew the leader Lease"),
            }
            // Stop in time: before the Lease can expire for the others.
            if renewed.elapsed() + self.renew >= self.duration {
                warn!("could not renew the leader Lease in time; stopping");
                lost.cancel();
                return;
            }
        }
    }

    /// Hands the Lease over at once after a clean shutdown (no holder), so a standby need not
    /// wait for it to expire.
    pub async fn release(&self, client: &Client) {
        let api: Api<Lease> = Api::namespaced(client.clone(), &self.namespace);
        let Ok(Some(current)) = api.get_opt(&self.name).await else { return };
        if current.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) != Some(self.identity.as_str()) {
            return;
        }
        let mut lease = current.clone();
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
        }
        match api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => info!("released the leader Lease"),
            Err(error) => warn!(%error, "cannot release the leader Lease"),
        }
    }
}
