//! Events about vmkeep's objects: kube's [`Recorder`] (events.k8s.io/v1, repeats patched as a
//! series), except for objects whose names are too long for the Event names it derives.

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event as K8sEvent},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};

/// The longest object name kube's Recorder can name an Event after: it names Events
/// `<object>.<nanoseconds in hex>` (16 digits), and a name has at most 253 characters
/// (a DNS subdomain, the rule of the API server's validation).
const LONGEST_RECORDED_NAME: usize = 253 - 1 - 16;

/// Publishes Events as `reporter`.
#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
    client: Client,
    reporter: Reporter,
}

impl Events {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self { recorder: Recorder::new(client.clone(), reporter.clone()), client, reporter }
    }

    /// Publishes `event` about `regarding`. Errors: the API server's (e.g. no RBAC for
    /// `events.k8s.io` `create`).
    pub async fn publish(&self, event: &Event, regarding: &ObjectReference) -> Result<(), kube::Error> {
        let name = regarding.name.as_deref().unwrap_or_default();
        if name.len() <= LONGEST_RECORDED_NAME {
            return self.recorder.publish(event, regarding).await;
        }
        // A name of 237-253 characters: the Event gets a name that fits, without a series
        // (vmkeep publishes once per transition, so repeats are rare).
        let now = k8s_openapi::jiff::Timestamp::now();
        let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".into());
        let instance = self.reporter.instance.clone().unwrap_or_else(|| self.reporter.controller.clone());
        let k8s = K8sEvent {
            metadata: ObjectMeta { name: Some(event_name(name, now.as_nanosecond())), ..Default::default() },
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            note: event.note.clone(),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: event.secondary.clone(),
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(instance),
            type_: Some(match event.type_ {
                EventType::Normal => "Normal".into(),
                EventType::Warning => "Warning".into(),
            }),
            ..Default::default()
        };
        Api::<K8sEvent>::namespaced(self.client.clone(), &namespace).create(&PostParams::default(), &k8s).await?;
        Ok(())
    }
}

/// `<object>.<nanos in hex>` with the object part cut to fit 253 characters, ending with a
/// letter or digit (as a DNS subdomain must before the dot).
pub fn event_name(object: &str, nanos: i128) -> String {
    let mut cut = &object[..object.len().min(LONGEST_RECORDED_NAME)];
    cut = cut.trim_end_matches(['-', '.']);
    format!("{cut}.{nanos:x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_of_long_objects_fit_and_stay_valid() {
        let nanos = 1_800_000_000_000_000_000_i128;
        assert_eq!(event_name("vm-a", nanos), format!("vm-a.{nanos:x}"));
        for len in [236, 237, 240, 253] {
            let object = format!("{}-{}", "a".repeat(235), "b".repeat(len - 236));
            let name = event_name(&object, nanos);
            assert!(name.len() <= 253, "{len}: {}", name.len());
            assert!(!name.contains("-."), "{name}");
        }
        // A cut that ends at a dash drops it.
        let object = format!("{}-{}", "a".repeat(235), "b".repeat(10));
        assert!(event_name(&object, nanos).starts_with(&format!("{}.", "a".repeat(235))));
    }
}
