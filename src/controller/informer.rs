//! One watch per kind, shared by every controller: the watch feeds one cache (a reflector
//! store) and forwards every object it touches (created, changed, deleted) to each subscriber.
//!
//! Why not kube's own sharing: its shared streams do not forward deletions (a deleted launcher
//! Pod must wake its VM, that is the fencing), and a store fed through a controller's trigger
//! stream only advances while that controller has room to reconcile, so reconciles that wait for
//! every cache to be ready could wait for ever. Here each watch runs as its own task.

use futures::{Stream, StreamExt};
use kube::{
    Api, Resource, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher::{self, Event},
    },
};
use serde::de::DeserializeOwned;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// A cache of `K` and the streams of touched objects for its subscribers. Its first complete
/// list counts it in as synced (see [`super::Stores::ready`]).
pub struct Informer<K: Resource<DynamicType = ()> + 'static> {
    pub store: Store<K>,
    subscribers: Vec<mpsc::UnboundedSender<K>>,
    api: Api<K>,
    config: watcher::Config,
}

impl<K> Informer<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    pub fn new(api: Api<K>, config: watcher::Config) -> (Self, reflector::store::Writer<K>) {
        let (store, writer) = reflector::store();
        (Self { store, subscribers: Vec::new(), api, config }, writer)
    }

    /// A stream of every object the watch touches from now on (as controller triggers want it).
    pub fn subscribe(&mut self) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers.push(tx);
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|k| (Ok(k), rx)) })
    }

    /// Runs the watch until `shutdown`: updates the cache, then tells every subscriber.
    /// `managedFields` are dropped first: vmkeep never reads them and they are most of an
    /// object's size.
    pub async fn run(
        self,
        mut writer: reflector::store::Writer<K>,
        synced: Arc<watch::Sender<usize>>,
        shutdown: CancellationToken,
    ) {
        let mut listed = false;
        let mut events = watcher::watcher(self.api, self.config)
            .default_backoff()
            .modify(|o| o.managed_fields_mut().clear())
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
                    if let Event::Apply(obj) | Event::Delete(obj) | Event::InitApply(obj) = &event {
                        for subscriber in &self.subscribers {
                            let _ = subscriber.send(obj.clone());
                        }
                    }
                }
            }
        }
    }
}
