//! The webhook's serving certificate, without extra software.
//!
//! Self-managed (the default): vmkeep keeps a CA and a serving certificate in one Secret
//! (`ca.crt`, `tls.crt`, `tls.key`; the CA's key is never stored: a new CA is made with every
//! new serving certificate), patches `ca.crt` into the `caBundle` of its
//! ValidatingWebhookConfiguration, and checks both every `--webhook-cert-check-seconds`. It
//! issues a new pair when the Secret is missing, unreadable, not valid for the DNS names, or
//! valid for less than [`RENEW_BEFORE`]; replicas that race to do so settle on one Secret
//! (create and update are conflict-checked, and a caBundle written from a Secret that changed
//! meanwhile is written again at once). The previous CA stays in `ca.crt`, so a replica
//! still serving the previous certificate stays trusted until it reloads; a new certificate is
//! served [`CA_PROPAGATION`] after the caBundle that trusts it was written.
//!
//! External (`--webhook-cert-dir`, e.g. cert-manager): vmkeep only reads `tls.crt` and
//! `tls.key` from the folder and serves them, reloading when they change.
//!
//! Either way the certificate is swapped in place ([`Served`]): no restart, no dropped listener.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1::ValidatingWebhookConfiguration, core::v1::Secret},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::{
    RootCertStore,
    client::{WebPkiServerVerifier, danger::ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::plan::names;

/// A certificate with less than this left is renewed.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long a new CA and serving certificate are valid.
pub const VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long a new certificate waits, after its CA reached the caBundle, before it is served
/// instead of a still-valid one (the API server picks up webhook configurations from a watch).
pub const CA_PROPAGATION: Duration = Duration::from_secs(5);
/// How soon a failed check is retried (capped by the check interval).
const RETRY: Duration = Duration::from_secs(10);

pub const CA_CRT: &str = "ca.crt";
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";

/// Where the serving certificate comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// vmkeep makes and renews it, keeps it in Secret `namespace/name`, and patches its CA into
    /// the ValidatingWebhookConfiguration `config` (if named).
    Managed { namespace: String, name: String, config: Option<String>, dns_names: Vec<String> },
    /// `tls.crt` and `tls.key` in this folder, provided by someone else (cert-manager).
    Files { dir: PathBuf },
}

/// The PEM texts of the Secret: the CA bundle (the CA of `cert` first), the serving
/// certificate and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl Bundle {
    /// The bundle in a Secret, if it has the three keys as UTF-8.
    pub fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let text = |key: &str| String::from_utf8(data.get(key)?.0.clone()).ok();
        Some(Self { ca: text(CA_CRT)?, cert: text(TLS_CRT)?, key: text(TLS_KEY)? })
    }

    pub fn to_data(&self) -> BTreeMap<String, ByteString> {
        [(CA_CRT, &self.ca), (TLS_CRT, &self.cert), (TLS_KEY, &self.key)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), ByteString(v.clone().into_bytes())))
            .collect()
    }

    /// The CA that signed the serving certificate (the first of the bundle), as PEM.
    pub fn own_ca(&self) -> Option<String> {
        const END: &str = "-----END CERTIFICATE-----";
        let first = &self.ca[..self.ca.find(END)? + END.len()];
        CertificateDer::from_pem_slice(first.as_bytes()).ok()?;
        Some(format!("{}\n", first.trim_start()))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The serving certificate and key of PEM texts, checked to belong together.
pub fn certified_key(cert: &str, key: &str) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls.crt: {e}"))?;
    if chain.is_empty() {
        return Err("tls.crt holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| format!("tls.key: {e}"))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| format!("tls.key does not fit tls.crt: {e}"))
}

fn unix(t: Timestamp) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(t.as_second()).unwrap_or(0)))
}

/// Why `bundle` must be replaced at `now`, or `None` when its serving certificate chains to its
/// CA bundle, fits its key, and is valid for every name in `dns_names` now and for at least
/// [`RENEW_BEFORE`] more.
pub fn renewal_reason(bundle: Option<&Bundle>, dns_names: &[String], now: Timestamp) -> Option<String> {
    let Some(bundle) = bundle else { return Some("the Secret is missing or incomplete".into()) };
    let key = match certified_key(&bundle.cert, &bundle.key) {
        Ok(key) => key,
        Err(why) => return Some(why),
    };
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(bundle.ca.as_bytes()) {
        let added = ca.map_err(|e| e.to_string()).and_then(|ca| roots.add(ca).map_err(|e| e.to_string()));
        if let Err(why) = added {
            return Some(format!("ca.crt: {why}"));
        }
    }
    let verifier = match WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider()).build() {
        Ok(verifier) => verifier,
        Err(why) => return Some(format!("ca.crt: {why}")),
    };
    let soon = now + SignedDuration::try_from(RENEW_BEFORE).unwrap_or(SignedDuration::ZERO);
    for name in dns_names {
        let Ok(server_name) = ServerName::try_from(name.as_str()) else {
            return Some(format!("{name} is not a DNS name or IP address"));
        };
        let verify = |at| verifier.verify_server_cert(&key.cert[0], &key.cert[1..], &server_name, &[], unix(at));
        if let Err(why) = verify(now) {
            return Some(format!("tls.crt is not valid for {name}: {why}"));
        }
        if verify(soon).is_err() {
            return Some(format!("tls.crt expires within {} days", RENEW_BEFORE.as_secs() / 86400));
        }
    }
    None
}

/// A new CA and a serving certificate it signed for `dns_names` (DNS names or IP addresses),
/// both valid from an hour before `now` for [`VALIDITY`]. `keep` are earlier CAs (PEM) that
/// stay in the bundle after the new one.
pub fn issue(dns_names: &[String], now: Timestamp, keep: &[String]) -> Result<Bundle, rcgen::Error> {
    let at = |t: Timestamp| rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(t.as_second().max(0) as u64);
    let (not_before, not_after) = (at(now - SignedDuration::from_hours(1)), at(now + VALIDITY));

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = rcgen::DistinguishedName::new();
    ca.distinguished_name.push(DnType::CommonName, format!("vmkeep webhook CA {}", now.as_second()));
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    (ca.not_before, ca.not_after) = (not_before, not_after);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(dns_names.to_vec())?;
    leaf.distinguished_name = rcgen::DistinguishedName::new();
    leaf.distinguished_name.push(DnType::CommonName, dns_names.first().map_or("vmkeep-webhook", String::as_str));
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    (leaf.not_before, leaf.not_after) = (not_before, not_after);
    let cert = leaf.signed_by(&key, &issuer)?;

    let mut ca = ca_cert.pem();
    for old in keep {
        if !ca.contains(old.trim()) {
            ca.push_str(old);
        }
    }
    Ok(Bundle { ca, cert: cert.pem(), key: key.serialize_pem() })
}

/// What is served now: swapped in place, read by every TLS handshake.
#[derive(Debug, Default)]
pub struct Served {
    current: RwLock<Option<Current>>,
}

#[derive(Debug, Clone)]
struct Current {
    cert_pem: String,
    /// The CA (PEM) that signed it, when known.
    ca: Option<String>,
    key: Arc<CertifiedKey>,
}

impl Served {
    fn get(&self) -> Option<Current> {
        self.current.read().ok()?.clone()
    }

    fn set(&self, current: Current) {
        if let Ok(mut slot) = self.current.write() {
            *slot = Some(current);
        }
    }

    /// Whether a certificate is served.
    pub fn is_loaded(&self) -> bool {
        self.get().is_some()
    }
}

impl ResolvesServerCert for Served {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get().map(|c| c.key)
    }
}

/// Keeps `served` up to date from `source` until `shutdown`.
pub async fn keep(client: Client, source: Source, served: Arc<Served>, every: Duration, shutdown: CancellationToken) {
    loop {
        let check = async {
            match &source {
                Source::Managed { namespace, name, config, dns_names } => {
                    let secret = SecretRef { client: &client, namespace, name };
                    check_managed(&secret, config.as_deref(), dns_names, &served, &shutdown).await
                }
                Source::Files { dir } => check_files(dir, &served).await,
            }
        };
        let outcome = tokio::select! {
            outcome = check => outcome,
            () = shutdown.cancelled() => return,
        };
        let wait = match outcome {
            Ok(()) => every,
            Err(error) => {
                warn!(error = format!("{error:#}"), "webhook certificate check failed; retrying");
                RETRY.min(every)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

struct SecretRef<'a> {
    client: &'a Client,
    namespace: &'a str,
    name: &'a str,
}

async fn check_managed(
    secret: &SecretRef<'_>,
    config: Option<&str>,
    dns_names: &[String],
    served: &Served,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(secret.client.clone(), secret.namespace);
    let existing = secrets.get_opt(secret.name).await.context("cannot read the webhook Secret")?;
    // The configuration owns the Secret, so removing the webhook (helm uninstall) removes it too.
    let configuration = match config {
        Some(config) => Some(read_configuration(secret.client, config).await?),
        None => None,
    };
    let owner = configuration.as_ref().and_then(|c| c.controller_owner_ref(&()));
    let existing = match (existing, &owner) {
        (Some(found), Some(owner)) if !found.owner_references().iter().any(|o| o.uid == owner.uid) => {
            Some(adopt(&secrets, found, owner.clone()).await?)
        }
        (existing, _) => existing,
    };
    let stored = existing.as_ref().and_then(Bundle::from_secret);
    let mut version = existing.as_ref().and_then(|s| s.metadata.resource_version.clone());
    let bundle = match (renewal_reason(stored.as_ref(), dns_names, Timestamp::now()), stored) {
        (None, Some(bundle)) => bundle,
        (reason, stored) => {
            let reason = reason.unwrap_or_default();
            info!(secret = %format!("{}/{}", secret.namespace, secret.name), %reason, "issuing a webhook certificate");
            // Keep trusting what is served now and what the Secret held, until they are replaced.
            let keep: Vec<String> =
                [stored.and_then(|b| b.own_ca()), served.get().and_then(|c| c.ca)].into_iter().flatten().collect();
            let fresh = issue(dns_names, Timestamp::now(), &keep).context("cannot issue a certificate")?;
            version = write_secret(&secrets, secret.name, existing, owner, &fresh).await?;
            fresh
        }
    };
    let patched = match configuration {
        Some(configuration) => patch_ca_bundle(secret.client, configuration, &bundle.ca).await,
        None => Ok(false),
    };
    if matches!(patched, Ok(true)) {
        // Another replica may have renewed the Secret (and written its caBundle) between our read
        // and our patch: then ours is stale, and the next check, soon, writes the current one.
        let now = secrets.get_opt(secret.name).await.context("cannot read the webhook Secret")?;
        anyhow::ensure!(
            now.and_then(|s| s.metadata.resource_version) == version,
            "the Secret changed while the caBundle was written; checking again"
        );
    }
    let current = served.get();
    if current.as_ref().is_none_or(|c| c.cert_pem != bundle.cert) {
        let key = certified_key(&bundle.cert, &bundle.key).map_err(anyhow::Error::msg)?;
        if current.is_some() {
            // The served certificate is still valid: let the new CA reach the API server first.
            tokio::select! {
                () = tokio::time::sleep(CA_PROPAGATION) => {}
                () = shutdown.cancelled() => return Ok(()),
            }
        }
        served.set(Current { cert_pem: bundle.cert.clone(), ca: bundle.own_ca(), key: Arc::new(key) });
        info!("serving the webhook certificate of the Secret");
    }
    patched.map(|_| ())
}

/// The ValidatingWebhookConfiguration named `config`; an error when it does not exist.
async fn read_configuration(client: &Client, config: &str) -> anyhow::Result<ValidatingWebhookConfiguration> {
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    api.get_opt(config)
        .await
        .context("cannot read the ValidatingWebhookConfiguration")?
        .with_context(|| format!("ValidatingWebhookConfiguration {config} does not exist"))
}

/// Adds `owner` (the webhook configuration, not as controller) to the Secret's owners, at the
/// resourceVersion read: a Secret of an earlier vmkeep, or one a user made, goes with the webhook.
async fn adopt(secrets: &Api<Secret>, mut secret: Secret, owner: OwnerReference) -> anyhow::Result<Secret> {
    secret.metadata.owner_references.get_or_insert_default().push(owner_of_secret(owner));
    let params = PostParams { field_manager: Some(names::FIELD_MANAGER.into()), ..Default::default() };
    let name = secret.name_any();
    secrets.replace(&name, &params, &secret).await.context("cannot set the webhook Secret's owner")
}

/// The configuration as the Secret's owner: not its controller, and it does not block the
/// configuration's deletion (which would need the finalizers right on the configuration).
fn owner_of_secret(mut owner: OwnerReference) -> OwnerReference {
    owner.controller = None;
    owner.block_owner_deletion = None;
    owner
}

/// Creates the Secret (owned by `owner`, the webhook configuration, when given), or replaces its
/// data at the resourceVersion read; a conflict (another replica was quicker) is an error, and
/// the next check reads the winner's Secret. Returns the resourceVersion written.
async fn write_secret(
    secrets: &Api<Secret>,
    name: &str,
    existing: Option<Secret>,
    owner: Option<OwnerReference>,
    bundle: &Bundle,
) -> anyhow::Result<Option<String>> {
    let params = PostParams { field_manager: Some(names::FIELD_MANAGER.into()), ..Default::default() };
    match existing {
        Some(mut secret) => {
            secret.data = Some(bundle.to_data());
            secret.string_data = None;
            let written = secrets.replace(name, &params, &secret).await.context("cannot update the webhook Secret")?;
            Ok(written.metadata.resource_version)
        }
        None => {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    labels: Some(BTreeMap::from([
                        (names::MANAGED_BY.to_owned(), names::MANAGER.to_owned()),
                        ("app.kubernetes.io/component".to_owned(), "webhook".to_owned()),
                    ])),
                    owner_references: owner.map(|o| vec![owner_of_secret(o)]),
                    ..Default::default()
                },
                type_: Some("kubernetes.io/tls".into()),
                data: Some(bundle.to_data()),
                ..Default::default()
            };
            let written = secrets.create(&params, &secret).await.context("cannot create the webhook Secret")?;
            Ok(written.metadata.resource_version)
        }
    }
}

/// Sets the caBundle of every webhook of the configuration `current` to `ca`, if any differs.
/// Returns whether it wrote.
async fn patch_ca_bundle(client: &Client, current: ValidatingWebhookConfiguration, ca: &str) -> anyhow::Result<bool> {
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let config = current.name_any();
    let bundle = ByteString(ca.as_bytes().to_vec());
    let stale: Vec<serde_json::Value> = current
        .webhooks
        .unwrap_or_default()
        .into_iter()
        .filter(|w| w.client_config.ca_bundle.as_ref() != Some(&bundle))
        .map(|w| serde_json::json!({"name": w.name, "clientConfig": {"caBundle": bundle}}))
        .collect();
    if stale.is_empty() {
        return Ok(false);
    }
    let patch = Patch::Strategic(serde_json::json!({"webhooks": stale}));
    let params = PatchParams { field_manager: Some(names::FIELD_MANAGER.into()), ..Default::default() };
    api.patch(&config, &params, &patch).await.context("cannot patch the caBundle")?;
    info!(%config, "patched the webhook caBundle");
    Ok(true)
}

async fn check_files(dir: &std::path::Path, served: &Served) -> anyhow::Result<()> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
    };
    let (cert, key) = (read(TLS_CRT)?, read(TLS_KEY)?);
    if served.get().is_some_and(|c| c.cert_pem == cert) {
        return Ok(());
    }
    let certified = certified_key(&cert, &key).map_err(anyhow::Error::msg)?;
    served.set(Current { cert_pem: cert, ca: None, key: Arc::new(certified) });
    info!(dir = %dir.display(), "serving the webhook certificate of the folder");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["vmkeep-webhook.vmkeep.svc".into(), "127.0.0.1".into()]
    }

    fn now() -> Timestamp {
        "2030-01-01T00:00:00Z".parse().unwrap()
    }

    fn days(n: i64) -> SignedDuration {
        SignedDuration::from_hours(24 * n)
    }

    #[test]
    fn a_fresh_bundle_needs_nothing_until_thirty_days_before_it_expires() {
        let bundle = issue(&names(), now(), &[]).unwrap();
        assert_eq!(renewal_reason(Some(&bundle), &names(), now()), None);
        assert_eq!(renewal_reason(Some(&bundle), &names(), now() + days(334)), None);
        assert_eq!(
            renewal_reason(Some(&bundle), &names(), now() + days(336)).as_deref(),
            Some("tls.crt expires within 30 days")
        );
        let expired = renewal_reason(Some(&bundle), &names(), now() + days(400)).unwrap();
        assert!(expired.starts_with("tls.crt is not valid for vmkeep-webhook.vmkeep.svc"), "{expired}");
        let early = renewal_reason(Some(&bundle), &names(), now() - days(1)).unwrap();
        assert!(early.starts_with("tls.crt is not valid"), "{early}");
    }

    #[test]
    fn a_missing_broken_or_foreign_bundle_is_replaced() {
        let bundle = issue(&names(), now(), &[]).unwrap();
        let other = issue(&names(), now(), &[]).unwrap();
        assert!(renewal_reason(None, &names(), now()).is_some());
        let garbage = Bundle { cert: "garbage".into(), ..bundle.clone() };
        assert_eq!(renewal_reason(Some(&garbage), &names(), now()).as_deref(), Some("tls.crt holds no certificate"));
        let wrong_key = Bundle { key: other.key.clone(), ..bundle.clone() };
        assert!(renewal_reason(Some(&wrong_key), &names(), now()).unwrap().starts_with("tls.key does not fit"));
        let wrong_ca = Bundle { ca: other.ca.clone(), ..bundle.clone() };
        assert!(renewal_reason(Some(&wrong_ca), &names(), now()).unwrap().starts_with("tls.crt is not valid"));
        let empty_ca = Bundle { ca: String::new(), ..bundle.clone() };
        assert!(renewal_reason(Some(&empty_ca), &names(), now()).is_some());
    }

    #[test]
    fn new_dns_names_need_a_new_certificate() {
        let bundle = issue(&names(), now(), &[]).unwrap();
        let more = [names(), vec!["vmkeep-webhook.vmkeep.svc.cluster.local".into()]].concat();
        let reason = renewal_reason(Some(&bundle), &more, now()).unwrap();
        assert!(reason.starts_with("tls.crt is not valid for vmkeep-webhook.vmkeep.svc.cluster.local"), "{reason}");
    }

    #[test]
    fn the_previous_ca_stays_trusted_after_a_renewal() {
        let old = issue(&names(), now(), &[]).unwrap();
        let new = issue(&names(), now() + days(340), &[old.own_ca().unwrap()]).unwrap();
        assert_eq!(new.ca.matches("BEGIN CERTIFICATE").count(), 2);
        assert_ne!(new.own_ca(), old.own_ca());
        assert!(new.ca.starts_with(&new.own_ca().unwrap()));
        // The old serving certificate still verifies against the new bundle.
        let mixed = Bundle { ca: new.ca.clone(), ..old.clone() };
        assert_eq!(renewal_reason(Some(&mixed), &names(), now()), None);
        // Keeping a CA twice does not repeat it.
        let again = issue(&names(), now(), &[old.own_ca().unwrap(), old.own_ca().unwrap()]).unwrap();
        assert_eq!(again.ca.matches("BEGIN CERTIFICATE").count(), 2);
    }

    #[test]
    fn a_secret_round_trips_the_bundle() {
        let bundle = issue(&names(), now(), &[]).unwrap();
        let secret = Secret { data: Some(bundle.to_data()), ..Default::default() };
        assert_eq!(Bundle::from_secret(&secret), Some(bundle));
        assert_eq!(Bundle::from_secret(&Secret::default()), None);
    }

    #[test]
    fn the_own_ca_is_the_first_of_the_bundle() {
        let old = issue(&names(), now(), &[]).unwrap();
        assert_eq!(old.own_ca().as_deref(), Some(old.ca.as_str()));
        let new = issue(&names(), now(), &[old.own_ca().unwrap()]).unwrap();
        assert!(new.ca.ends_with(&old.ca));
        assert_eq!(Bundle { ca: "junk".into(), ..old }.own_ca(), None);
    }
}
