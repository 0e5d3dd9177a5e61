//! `vmkeep run`: the operator process.
//!
//! Order of events: bind the HTTP endpoints (so liveness answers at once), connect to the
//! cluster with the usual kubeconfig rules, wait until every vmkeep CRD is established (not a
//! crash loop when they are missing), report ready, run the controllers, and on SIGTERM or
//! SIGINT stop them and exit 0. The admission webhook, when enabled, runs beside all of this
//! from the moment the client exists: it neither waits for nor delays readiness.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client, ResourceExt,
    runtime::wait::{Condition as _, await_condition, conditions::is_crd_established},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{api, controller, health, leader::Election, metrics::Metrics, webhook};

/// How long in-flight reconciles may run after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Settings of `vmkeep run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub http_addr: SocketAddr,
    pub settings: controller::Settings,
    /// Leader election, for more than one replica.
    pub election: Option<Election>,
    /// The validating admission webhook (served by every replica, leader or not).
    pub webhook: Option<webhook::Options>,
}

/// Runs the operator until SIGTERM or SIGINT.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));

    let metrics = Arc::new(Metrics::default());
    let health = health::HealthState::new(metrics.clone());
    let (addr, server) = health::serve(opts.http_addr, health.clone(), shutdown.clone().cancelled_owned())
        .await
        .with_context(|| format!("cannot listen on {}", opts.http_addr))?;
    info!(%addr, "serving /healthz, /readyz and /metrics");
    let server = tokio::spawn(server);

    let client = client().await?;
    let webhook = match opts.webhook.clone() {
        Some(webhook) => {
            let wanted = webhook.addr;
            let (addr, task) = webhook::start(webhook, client.clone(), metrics.clone(), shutdown.clone())
                .await
                .with_context(|| format!("cannot listen on {wanted}"))?;
            info!(%addr, "serving the admission webhook at /validate");
            Some(task)
        }
        None => None,
    };

    let established = tokio::select! {
        () = wait_for_crds(&client) => true,
        () = shutdown.cancelled() => false,
    };
    let mut outcome = Ok(());
    if established {
        health.set_ready(true);
        info!("vmkeep is ready");
        outcome = lead_and_run(client, metrics, opts, &shutdown).await;
    }
    health.set_ready(false);
    shutdown.cancel();
    server.await.context("the HTTP server task failed")?.context("the HTTP server failed")?;
    if let Some(webhook) = webhook {
        webhook.await.context("the webhook task failed")?;
    }
    info!("stopped");
    outcome
}

/// Runs the controllers, as the leader when an election is configured. Losing the lead stops
/// the controllers and ends the process with an error, so it restarts as a standby.
async fn lead_and_run(
    client: Client,
    metrics: Arc<Metrics>,
    opts: RunOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let stop = shutdown.child_token();
    let lost = CancellationToken::new();
    if let Some(election) = &opts.election {
        if !election.acquire(&client, shutdown).await {
            return Ok(());
        }
        metrics.leader.set(1);
        tokio::spawn({
            let (election, client, shutdown, lost, stop) =
                (election.clone(), client.clone(), shutdown.clone(), lost.clone(), stop.clone());
            async move {
                election.hold(&client, shutdown, lost.clone()).await;
                if lost.is_cancelled() {
                    stop.cancel();
                }
            }
        });
    } else {
        metrics.leader.set(1);
    }
    let controllers = controller::run(client.clone(), metrics.clone(), opts.settings, stop.clone());
    // In-flight reconciles finish after SIGTERM, but never hold the exit for long.
    let deadline = async {
        stop.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        () = controllers => {}
        () = deadline => warn!("reconciles still running after {SHUTDOWN_GRACE:?}; exiting anyway"),
    }
    metrics.leader.set(0);
    if lost.is_cancelled() {
        anyhow::bail!("lost the leader Lease");
    }
    if let Some(election) = &opts.election {
        election.release(&client).await;
    }
    Ok(())
}

/// The user agent of every request (how the API server's audit log tells vmkeep's writes).
pub const USER_AGENT: &str = concat!("vmkeep/", env!("CARGO_PKG_VERSION"));

/// A client by the usual kubeconfig rules, sending [`USER_AGENT`].
pub async fn client() -> anyhow::Result<Client> {
    let mut config = kube::Config::infer()
        .await
        .context("cannot build a Kubernetes client (KUBECONFIG, ~/.kube/config or in-cluster)")?;
    config.headers.push((http::header::USER_AGENT, http::HeaderValue::from_static(USER_AGENT)));
    info!(server = %config.cluster_url, credentials = %credentials(&config), "connecting to the API server");
    Ok(Client::try_from(config)?)
}

/// The token file of in-cluster credentials (kube's in-cluster config reads it).
const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// Which credentials the client uses, for the start-up log: `ServiceAccount <namespace>/<name>`
/// in a Pod (the name from `VMKEEP_SERVICE_ACCOUNT`, which the chart sets from the Pod's
/// `spec.serviceAccountName`), else `kubeconfig`.
fn credentials(config: &kube::Config) -> String {
    if config.auth_info.token_file.as_deref() != Some(SERVICE_ACCOUNT_TOKEN) {
        return "kubeconfig".into();
    }
    let namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| config.default_namespace.clone());
    let name = std::env::var("VMKEEP_SERVICE_ACCOUNT").unwrap_or_else(|_| "(name unknown)".into());
    format!("ServiceAccount {namespace}/{name} (in-cluster token)")
}

/// Waits until every CRD of [`api::crds`] exists and is established, saying what it waits for
/// at once and then every 15 seconds.
async fn wait_for_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in api::crds() {
        let name = crd.name_any();
        let established = |crd: Option<&CustomResourceDefinition>| is_crd_established().matches_object(crd);
        if let Ok(current) = crds.get_opt(&name).await
            && established(current.as_ref())
        {
            continue;
        }
        loop {
            info!(crd = %name, "waiting for the CRD to be established (install: kubectl apply --server-side -f crds/)");
            let wait = await_condition(crds.clone(), &name, is_crd_established());
            match tokio::time::timeout(Duration::from_secs(15), wait).await {
                Ok(Ok(_)) => break,
                Ok(Err(error)) => {
                    warn!(crd = %name, %error, "cannot watch the CRD; retrying");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                Err(_) => {}
            }
        }
        info!(crd = %name, "CRD established");
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the operator");
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}
