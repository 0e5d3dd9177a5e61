//! One watch per kind, shared by every controller: the watch feeds one cache (a reflector
//! store) and forwards every object it touches (created, changed, deleted) to each subscriber.
//!
//! The watch reads every object through kube's `DeserializeGuard`: one that cannot be read as
//! its kind (a field the CRD schema lets through but vmkeep's types reject, an object written
//! for another version of vmkeep) is left out of the cache and reported, as a Warning Event
//! with reason `Malformed` on it, a log line and `vmkeep_malformed_objects_total`, instead of
//! stalling the whole watch; the objects around it keep flowing.
//!
//! Why not kube's own sharing: its shared streams do not forward deletions (a deleted launcher
//! Pod must wake its VM, that is the fencing), and a store fed through a controller's trigger
//! stream only advances while that controller has room to reconcile, so reconciles that wait for
//! every cache to be ready could wait for ever. Here each watch runs as its own task.

use futures::{Stream, StreamExt};
use kube::{
    Api, Resource,
    core::{DeserializeGuard, error_boundary::InvalidObject},
    runtime::{
        WatchStreamExt,
        events::{Event as KubeEvent, EventType},
        reflector::{self, ObjectRef, Store},
        watcher::{self, Event},
    },
};
use serde::de::DeserializeOwned;
use std::{collections::HashMap, sync::Arc};

use tokio::sync::{mpsc, watch};

use crate::{
    metrics::{MalformedLabels, Metrics},
    plan::{
        cached::{CachedPod, CachedPvc},
        reason, virtual_machine as plan,
    },
    write::Writes,
};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// A cache of `K` and the streams of touched objects for its subscribers. Its first complete
/// list counts it in as synced (see [`super::Stores::ready`]).
pub struct Informer<K: Resource<DynamicType = ()> + 'static> {
    pub store: Store<K>,
    subscribers: Vec<Subscriber<K>>,
    api: Api<DeserializeGuard<K>>,
    config: watcher::Config,
}

/// Where an unreadable object is reported: a Warning Event on it, and a metric.
#[derive(Clone)]
pub struct Malformed {
    pub recorder: super::events::Events,
    pub metrics: Arc<Metrics>,
    pub writes: Writes,
}

impl Malformed {
    fn report<K: Resource<DynamicType = ()>>(&self, invalid: &InvalidObject) {
        let kind = match K::kind(&()).as_ref() {
            "Image" => "Image",
            "Template" => "Template",
            "VirtualMachine" => "VirtualMachine",
            "PersistentVolumeClaim" => "PersistentVolumeClaim",
            "Pod" => "Pod",
            "Lease" => "Lease",
            _ => "Other",
        };
        self.metrics.malformed.get_or_create(&MalformedLabels { kind }).inc();
        let meta = &invalid.metadata;
        warn!(kind, name = ?meta.name, namespace = ?meta.namespace, reason = reason::MALFORMED, error = %invalid.error,
            "cannot read the object as its kind; it is skipped until it is fixed");
        let (Some(name), Some(uid)) = (meta.name.clone(), meta.uid.clone()) else { return };
        let regarding = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(K::api_version(&()).into_owned()),
            kind: Some(kind.to_owned()),
            name: Some(name),
            namespace: meta.namespace.clone(),
            uid: Some(uid),
            ..Default::default()
        };
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: reason::MALFORMED.into(),
            note: Some(format!("vmkeep cannot read this {kind} and skips it until it is fixed: {}", invalid.error)),
            action: "Watch".into(),
            secondary: None,
        };
        let (recorder, writes) = (self.recorder.clone(), self.writes.clone());
        tokio::spawn(async move {
            if let Err(error) = writes.send("Event", "create", recorder.publish(&event, &regarding)).await {
                warn!(%error, "cannot publish an Event");
            }
        });
    }
}

impl<K> Informer<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    /// The watch of `api` with `config`; what the cache keeps of each object is [`for_cache`].
    pub fn new(api: Api<DeserializeGuard<K>>, config: watcher::Config) -> (Self, reflector::store::Writer<K>) {
        let (store, writer) = reflector::store();
        (Self { store, subscribers: Vec::new(), api, config }, writer)
    }

    /// A stream of every object the watch touches from now on (as controller triggers want it).
    pub fn subscribe(&mut self) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static {
        self.subscribe_with(None)
    }

    /// Like [`Self::subscribe`], but a changed object is only passed on when `view` of it changed
    /// (deletions always are): for a controller that reads a few fields of a busy object, e.g.
    /// VMs, which must not all be woken each time an Image's count of running VMs moves.
    pub fn subscribe_view(
        &mut self,
        view: fn(&K) -> u64,
    ) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static {
        self.subscribe_with(Some(view))
    }

    fn subscribe_with(
        &mut self,
        view: Option<fn(&K) -> u64>,
    ) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers.push(Subscriber { tx, view, seen: HashMap::new() });
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|k| (Ok(k), rx)) })
    }

    /// Runs the watch until `shutdown`: updates the cache ([`for_cache`]), then tells every
    /// subscriber.
    pub async fn run(
        mut self,
        mut writer: reflector::store::Writer<K>,
        synced: Arc<watch::Sender<usize>>,
        malformed: Malformed,
        shutdown: CancellationToken,
    ) {
        let mut listed = false;
        let store = self.store.clone();
        let mut events = watcher::watcher(self.api, self.config)
            .default_backoff()
            .modify(move |o| {
                if let Ok(o) = &mut o.0 {
                    for_cache(o);
                }
            })
            .filter_map(move |event| {
                let event = match event {
                    Ok(e) => readable(e, &store, |invalid| malformed.report::<K>(invalid)).map(Ok),
                    Err(e) => Some(Err(e)),
                };
                futures::future::ready(event)
            })
            .boxed();
        loop {
            let event = tokio::select! {
                event = events.next() => event,
                () = shutdown.cancelled() => return,
            };
            match event {
                None => return,
                Some(Err(error)) => warn!(kind = %K::kind(&()), %error, "watch failed; retrying"),
                Some(Ok(event)) => {
                    writer.apply_watcher_event(&event);
                    if matches!(event, Event::InitDone) && !listed {
                        listed = true;
                        synced.send_modify(|n| *n += 1);
                    }
                    match &event {
                        Event::Apply(obj) | Event::InitApply(obj) => {
                            for subscriber in &mut self.subscribers {
                                subscriber.changed(obj);
                            }
                        }
                        Event::Delete(obj) => {
                            for subscriber in &mut self.subscribers {
                                subscriber.deleted(obj);
                            }
                        }
                        Event::Init | Event::InitDone => {}
                    }
                }
            }
        }
    }
}

/// The event with only objects that could be read as `K` (`None`: nothing left of it). An
/// unreadable object is reported; a version of it in the cache goes, as if deleted (no decision
/// is made from a stale copy).
fn readable<K>(event: Event<DeserializeGuard<K>>, store: &Store<K>, report: impl Fn(&InvalidObject)) -> Option<Event<K>>
where
    K: Resource<DynamicType = ()> + Clone,
{
    let unreadable = |guard: DeserializeGuard<K>| -> Result<K, Option<K>> {
        guard.0.map_err(|invalid| {
            report(&invalid);
            let key = ObjectRef::<K>::new(invalid.metadata.name.as_deref().unwrap_or_default());
            let key = match &invalid.metadata.namespace {
                Some(ns) => key.within(ns),
                None => key,
            };
            store.get(&key).map(|k| k.as_ref().clone())
        })
    };
    match event {
        Event::Apply(guard) => match unreadable(guard) {
            Ok(k) => Some(Event::Apply(k)),
            Err(stale) => stale.map(Event::Delete),
        },
        Event::Delete(guard) => match unreadable(guard) {
            Ok(k) => Some(Event::Delete(k)),
            Err(stale) => stale.map(Event::Delete),
        },
        // A relist: leaving it out of the new list leaves it out of the cache.
        Event::InitApply(guard) => unreadable(guard).ok().map(Event::InitApply),
        Event::Init => Some(Event::Init),
        Event::InitDone => Some(Event::InitDone),
    }
}

/// One subscriber: its channel, and with a `view`, the last view passed on per object (keyed
/// by a hash of its uid: 16 bytes an object, for tens of thousands of PVCs).
struct Subscriber<K: Resource<DynamicType = ()> + 'static> {
    tx: mpsc::UnboundedSender<K>,
    view: Option<fn(&K) -> u64>,
    seen: HashMap<u64, u64>,
}

fn key<K: Resource>(obj: &K) -> u64 {
    use std::hash::{Hash, Hasher};
    let meta = obj.meta();
    let mut hasher = std::hash::DefaultHasher::new(); // fixed keys: the same object, the same key
    (&meta.uid, &meta.namespace, &meta.name).hash(&mut hasher);
    hasher.finish()
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Subscriber<K> {
    fn changed(&mut self, obj: &K) {
        if let Some(view) = self.view {
            let now = view(obj);
            if self.seen.insert(key(obj), now) == Some(now) {
                return;
            }
        }
        let _ = self.tx.send(obj.clone());
    }

    fn deleted(&mut self, obj: &K) {
        self.seen.remove(&key(obj));
        let _ = self.tx.send(obj.clone());
    }
}

/// [`plan::pvc_view`] of a PVC.
pub fn pvc_view(pvc: &CachedPvc) -> u64 {
    plan::pvc_view(pvc)
}

/// [`plan::pod_view`] of a Pod.
pub fn pod_view(pod: &CachedPod) -> u64 {
    plan::pod_view(pod)
}

/// What the cache keeps of `obj`: all but its `managedFields` (vmkeep never reads them and they
/// are most of an object's size), and for vmkeep's own kinds (Image, Template, VirtualMachine:
/// users' objects) also not their labels and annotations, which vmkeep never reads and GitOps
/// tools fill (`kubectl.kubernetes.io/last-applied-configuration` is a copy of the whole
/// object). Pods and PVCs are cached in the compact forms of [`crate::plan::cached`].
pub fn for_cache<K: Resource<DynamicType = ()>>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if K::group(&()) == crate::api::GROUP {
        meta.labels = None;
        meta.annotations = None;
    }
}

#[cfg(test)]
mod malformed_tests {
    use super::*;
    use crate::api::Template;

    fn guard(cpu: serde_json::Value) -> DeserializeGuard<Template> {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "vmkeep.io/v1alpha1", "kind": "Template",
            "metadata": {"name": "t", "namespace": "ns", "uid": "u1"},
            "spec": {"cpu": cpu, "memory": "1Gi", "disks": []},
        }))
        .unwrap()
    }

    #[test]
    fn an_unreadable_object_is_reported_skipped_and_its_stale_copy_dropped() {
        let (store, mut writer) = reflector::store::<Template>();
        let reported = std::sync::Mutex::new(Vec::new());
        let report = |i: &InvalidObject| reported.lock().unwrap().push(i.metadata.name.clone());
        // Readable: passed on as it is.
        let event = readable(Event::Apply(guard(2.into())), &store, report).unwrap();
        assert!(matches!(&event, Event::Apply(t) if t.spec.cpu == 2));
        writer.apply_watcher_event(&event);
        // Unreadable (cpu beyond i32, which the API server accepts): the cached copy goes.
        let too_big = guard(3_000_000_000_i64.into());
        assert!(too_big.0.is_err());
        let event = readable(Event::Apply(too_big.clone()), &store, report).unwrap();
        assert!(matches!(&event, Event::Delete(t) if t.spec.cpu == 2), "{event:?}");
        writer.apply_watcher_event(&event);
        // Nothing cached any more: nothing to pass on, but still reported.
        assert!(readable(Event::Apply(too_big.clone()), &store, report).is_none());
        assert!(readable(Event::InitApply(too_big), &store, report).is_none());
        assert!(matches!(readable::<Template>(Event::InitDone, &store, report), Some(Event::InitDone)));
        assert_eq!(reported.lock().unwrap().len(), 3);
    }
}

#[cfg(test)]
mod subscriber_tests {
    use super::*;

    fn pvc(rv: &str, phase: &str, annotation: &str) -> CachedPvc {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "vm-a-root", "namespace": "ns", "uid": "u1", "resourceVersion": rv,
                "annotations": {"pv.kubernetes.io/bind-completed": annotation}},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    #[test]
    fn a_view_subscriber_hears_of_changes_it_reads_and_of_every_deletion() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut subscriber = Subscriber { tx, view: Some(pvc_view), seen: HashMap::new() };
        subscriber.changed(&pvc("1", "Pending", "no"));
        subscriber.changed(&pvc("2", "Pending", "yes")); // the binder's annotation: not read
        subscriber.changed(&pvc("3", "Bound", "yes"));
        subscriber.deleted(&pvc("4", "Bound", "yes"));
        subscriber.changed(&pvc("5", "Bound", "yes")); // made again after its deletion
        let mut heard = Vec::new();
        while let Ok(p) = rx.try_recv() {
            heard.push(p.metadata.resource_version.unwrap());
        }
        assert_eq!(heard, ["1", "3", "4", "5"]);
    }
}
