//! The validating admission webhook, served by `vmkeep run` over HTTPS on `--webhook-addr`
//! at `/validate`: it gives the controller's verdicts at `kubectl apply` time.
//!
//! - [`validate`]: the rules, pure functions (what is denied, with which words).
//! - [`certs`]: the serving certificate: self-managed in a Secret, or from a folder.
//! - here: the HTTPS server, and the reads a rule needs (Template, Images, claim Leases),
//!   straight from the API server: the webhook also runs on standby replicas, which hold no
//!   caches.
//!
//! The webhook is an early answer, not the source of truth: anything it cannot decide in time
//! (an API error, a timeout) is admitted with a warning, and the controller's atomic claim still
//! decides. The API server's `failurePolicy` says what happens when the webhook does not answer.

pub mod certs;
pub mod validate;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::header,
    response::IntoResponse,
    routing::post,
};
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use kube::{
    Api, Client, ResourceExt,
    core::{
        DynamicObject,
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    },
};
use serde::de::DeserializeOwned;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    api::{Image, Template, VirtualMachine},
    claim,
    metrics::{Metrics, ReviewLabels},
};

/// How long the reads of one review may take; the API server's `timeoutSeconds` is 5 by default.
const DECIDE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Admission reviews carry the object twice (old and new); objects are at most about 1.5 MiB.
const BODY_LIMIT: usize = 8 << 20;

/// Settings of the webhook.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where `/validate` is served over HTTPS.
    pub addr: SocketAddr,
    pub certs: certs::Source,
    /// How often the certificate is checked (and renewed or reloaded when needed).
    pub check_every: Duration,
}

/// Binds `opts.addr` (so a port conflict fails at start) and spawns the certificate keeper and
/// the server; both stop when `shutdown` is cancelled. Returns the bound address and a handle
/// that resolves once both stopped.
pub async fn start(
    opts: Options,
    client: Client,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(opts.addr).await?;
    let addr = listener.local_addr()?;
    let served = Arc::new(certs::Served::default());
    let keeper =
        tokio::spawn(certs::keep(client.clone(), opts.certs, served.clone(), opts.check_every, shutdown.clone()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_no_client_auth()
        .with_cert_resolver(served);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let app = Router::new()
        .route("/validate", post(review))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(Arc::new(Reviewer { client, metrics }));
    let server = tokio::spawn(serve(listener, TlsAcceptor::from(Arc::new(tls)), app, shutdown));
    let handle = tokio::spawn(async move {
        let _ = tokio::join!(keeper, server);
    });
    Ok((addr, handle))
}

/// Accepts connections until `shutdown`; each connection finishes its request in flight.
async fn serve(listener: TcpListener, tls: TlsAcceptor, app: Router, shutdown: CancellationToken) {
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "cannot accept a webhook connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let (tls, app, shutdown) = (tls.clone(), app.clone(), shutdown.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => return debug!(%peer, %error, "webhook TLS handshake failed"),
                Err(_) => return debug!(%peer, "webhook TLS handshake timed out"),
            };
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                debug!(%peer, %error, "webhook connection ended with an error");
            }
        });
    }
    info!("webhook server stopped");
}

struct Reviewer {
    client: Client,
    metrics: Arc<Metrics>,
}

async fn review(State(reviewer): State<Arc<Reviewer>>, body: Bytes) -> impl IntoResponse {
    let response = match serde_json::from_slice::<AdmissionReview<DynamicObject>>(&body)
        .map_err(|e| e.to_string())
        .and_then(|r| TryInto::<AdmissionRequest<DynamicObject>>::try_into(r).map_err(|e| e.to_string()))
    {
        Ok(request) => reviewer.respond(&request).await,
        Err(error) => AdmissionResponse::invalid(format!("not an AdmissionReview: {error}")),
    };
    let body = serde_json::to_vec(&response.into_review()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], body)
}

/// Why a review could not be decided; the request is admitted with a warning.
#[derive(Debug, thiserror::Error)]
enum Undecided {
    #[error("cannot read the {0}: {1}")]
    Unreadable(&'static str, String),
    #[error("cannot read from the API server: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot read a claim: {0}")]
    Claim(#[from] claim::Error),
    #[error("the API server did not answer within {DECIDE_TIMEOUT:?}")]
    Timeout,
}

impl Reviewer {
    async fn respond(&self, request: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        let response = AdmissionResponse::from(request);
        let kind = match request.kind.kind.as_str() {
            "Image" => "Image",
            "Template" => "Template",
            "VirtualMachine" => "VirtualMachine",
            _ => "other",
        };
        let decided =
            tokio::time::timeout(DECIDE_TIMEOUT, self.decide(request)).await.unwrap_or(Err(Undecided::Timeout));
        let (verdict, response) = match decided {
            Ok(Ok(())) => ("allowed", response),
            Ok(Err(message)) => {
                info!(kind, name = %request.name, namespace = ?request.namespace, %message, "admission denied");
                ("denied", response.deny(message))
            }
            Err(error) => {
                warn!(kind, name = %request.name, namespace = ?request.namespace, %error, "admitted unchecked");
                let mut response = response;
                response.warnings = Some(vec![format!("vmkeep admitted this unchecked: {error}")]);
                ("unchecked", response)
            }
        };
        self.metrics.webhook_reviews.get_or_create(&ReviewLabels { kind, verdict }).inc();
        response
    }

    async fn decide(&self, request: &AdmissionRequest<DynamicObject>) -> Result<validate::Verdict, Undecided> {
        let update = match request.operation {
            Operation::Create => false,
            Operation::Update => true,
            _ => return Ok(Ok(())),
        };
        let namespace = request.namespace.clone().unwrap_or_default();
        match request.kind.kind.as_str() {
            "Image" => {
                let (old, new) = objects::<Image>(request, "Image")?;
                Ok(validate::image(old.as_ref(), &new))
            }
            "Template" => {
                let (old, new) = objects::<Template>(request, "Template")?;
                if old.as_ref().is_some_and(|o| o.spec == new.spec) {
                    return Ok(Ok(()));
                }
                let images = self.images(&namespace, validate::images_of(&new.spec)).await?;
                Ok(validate::template(old.as_ref(), &new, |name| images.get(name)))
            }
            "VirtualMachine" if update => {
                let (old, new) = objects::<VirtualMachine>(request, "VirtualMachine")?;
                Ok(old.map_or(Ok(()), |old| validate::virtual_machine_update(&old, &new)))
            }
            "VirtualMachine" => {
                let (_, vm) = objects::<VirtualMachine>(request, "VirtualMachine")?;
                self.virtual_machine_create(&namespace, &vm).await
            }
            _ => Ok(Ok(())),
        }
    }

    /// The Images of these names that exist.
    async fn images(&self, namespace: &str, names: BTreeSet<&str>) -> Result<BTreeMap<String, Image>, Undecided> {
        let api: Api<Image> = Api::namespaced(self.client.clone(), namespace);
        let mut images = BTreeMap::new();
        for name in names {
            if let Some(image) = api.get_opt(name).await? {
                images.insert(name.to_owned(), image);
            }
        }
        Ok(images)
    }

    async fn virtual_machine_create(
        &self,
        namespace: &str,
        vm: &VirtualMachine,
    ) -> Result<validate::Verdict, Undecided> {
        let templates: Api<Template> = Api::namespaced(self.client.clone(), namespace);
        let Some(template) = templates.get_opt(&vm.spec.template_ref.name).await? else {
            return Ok(Ok(()));
        };
        let images = self.images(namespace, validate::images_of(&template.spec)).await?;
        let uid = vm.uid().unwrap_or_default();
        let claims_api = claim::Claims::new(self.client.clone(), None);
        let mut claims = BTreeMap::new();
        for image in validate::claims_needed(&template.spec, |name| images.get(name)) {
            let state = claims_api.state(namespace, &image, &uid).await?;
            claims.insert(image, state);
        }
        Ok(validate::virtual_machine_create(vm.spec.on_image_conflict, &claims))
    }
}

/// The request's old (on update) and new object as `K`.
fn objects<K: DeserializeOwned>(
    request: &AdmissionRequest<DynamicObject>,
    kind: &'static str,
) -> Result<(Option<K>, K), Undecided> {
    let parse = |object: &DynamicObject| {
        serde_json::to_value(object)
            .and_then(serde_json::from_value::<K>)
            .map_err(|e| Undecided::Unreadable(kind, e.to_string()))
    };
    let new = request.object.as_ref().ok_or_else(|| Undecided::Unreadable(kind, "no object".into()))?;
    let old = request.old_object.as_ref().map(parse).transpose()?;
    Ok((old, parse(new)?))
}
