//! Where a VM's time to `Starting` goes, stage by stage, from the API server's audit log (the
//! issue 14 ask: "show where the time went").
//!
//! For each VM the harness created, the audit log has the time the API server received and
//! answered each write about it ([`Write::at`], [`Write::done`]); the harness's watch gives
//! the moment it saw the VM `Starting`. The stages, each a duration in seconds:
//!
//! - `create`: the harness's create of the VM, received to answered;
//! - `to_first_write`: the VM created (answered) to the operator's first write about it
//!   (received): the watch event reaching the operator, the work queue and its reconcile;
//! - `disks`: the first write to the last PVC create answered (for a persistent VM first its
//!   finalizer and claim Lease, then its PVCs, created concurrently);
//! - `pod`: the last PVC answered to the launcher Pod's create answered (the same reconcile
//!   creates the Pod once its PVCs' creates returned);
//! - `status`: the Pod answered to the last status write before `Starting` was seen answered
//!   (the one that made it `Starting`);
//! - `seen`: that status write answered to the harness's watch seeing `Starting`.
//!
//! The audit log's times are the API server's clock and "seen" is the harness's: one clock on
//! the local cluster; against a remote control plane, skew shows in `seen` (negative spans
//! count as 0).
//!
//! Each stage is reported as p50 / p95 / max over the VMs that have it (a VM whose Pod and
//! status were written by one reconcile has both).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::{
    audit::{Actor, Write},
    operator::round3,
    report,
};

/// The times of one VM's writes, from the audit log.
#[derive(Default)]
struct Times {
    created: Option<(jiff::Timestamp, jiff::Timestamp)>,
    first_write: Option<jiff::Timestamp>,
    last_pvc: Option<jiff::Timestamp>,
    pod: Option<jiff::Timestamp>,
    status: Option<jiff::Timestamp>,
}

/// The stages of every VM in `starting_at` (name -> seen `Starting`), from `writes` (every
/// actor's, in the order of the log) and `vm_of` (which VM a write concerns alone).
pub fn stages(
    writes: &[Write],
    vm_of: impl Fn(&Write) -> Option<String>,
    starting_at: &BTreeMap<String, jiff::Timestamp>,
) -> Value {
    let mut times: BTreeMap<String, Times> = BTreeMap::new();
    for w in writes.iter().filter(|w| w.code < 300) {
        let (Some(at), Some(done)) = (w.at, w.done) else { continue };
        let Some(vm) = vm_of(w) else { continue };
        let Some(starting) = starting_at.get(&vm) else { continue };
        if at > *starting {
            continue;
        }
        let t = times.entry(vm).or_default();
        match (w.actor, w.verb.as_str(), w.resource.as_str()) {
            (Actor::Bench, "create", "virtualmachines") => t.created = Some((at, done)),
            (Actor::Operator, verb, resource) => {
                t.first_write = Some(t.first_write.map_or(at, |f| f.min(at)));
                match (verb, resource) {
                    ("create", "persistentvolumeclaims") => t.last_pvc = Some(t.last_pvc.map_or(done, |l| l.max(done))),
                    ("create", "pods") => t.pod = Some(done),
                    // The write that made it Starting: the last one before the bench saw it
                    // (earlier ones said Pending, waiting for a copy, ...).
                    ("patch", "virtualmachines/status") => t.status = Some(t.status.map_or(done, |s| s.max(done))),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    let secs = |from: jiff::Timestamp, to: jiff::Timestamp| {
        let d = (to - from).total(jiff::Unit::Second).unwrap_or(0.0);
        std::time::Duration::from_secs_f64(d.max(0.0))
    };
    let mut samples: BTreeMap<&str, Vec<std::time::Duration>> = BTreeMap::new();
    let mut push = |stage: &'static str, d: Option<std::time::Duration>| {
        if let Some(d) = d {
            samples.entry(stage).or_default().push(d);
        }
    };
    for (vm, t) in &times {
        let created = t.created.map(|(_, done)| done);
        push("create", t.created.map(|(at, done)| secs(at, done)));
        push("to_first_write", created.zip(t.first_write).map(|(c, f)| secs(c, f)));
        push("disks", t.first_write.zip(t.last_pvc).map(|(f, l)| secs(f, l)));
        push("pod", t.last_pvc.zip(t.pod).map(|(l, p)| secs(l, p)));
        push("status", t.pod.zip(t.status).map(|(p, s)| secs(p, s)));
        push("seen", t.status.zip(starting_at.get(vm).copied()).map(|(s, seen)| secs(s, seen)));
    }
    let out: serde_json::Map<String, Value> = samples
        .into_iter()
        .map(|(stage, s)| {
            let vms = s.len();
            let p = report::percentiles(s);
            (stage.to_owned(), json!({"vms": vms, "p50": round3(p.p50), "p95": round3(p.p95), "max": round3(p.max)}))
        })
        .collect();
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(actor: Actor, verb: &str, resource: &str, name: &str, at_ms: i64, done_ms: i64) -> Write {
        let t = |ms: i64| Some(jiff::Timestamp::from_millisecond(ms).unwrap());
        Write {
            actor,
            user_agent: String::new(),
            verb: verb.into(),
            resource: resource.into(),
            name: name.into(),
            code: 201,
            at: t(at_ms),
            done: t(done_ms),
        }
    }

    #[test]
    fn the_stages_of_a_vm_come_from_its_writes() {
        let writes = vec![
            write(Actor::Bench, "create", "virtualmachines", "a", 0, 10),
            // An earlier status (e.g. waiting for a copy) does not count as the Starting one.
            write(Actor::Operator, "patch", "virtualmachines/status", "a", 105, 108),
            write(Actor::Operator, "create", "persistentvolumeclaims", "a-root", 110, 130),
            write(Actor::Operator, "create", "persistentvolumeclaims", "a-scratch", 112, 150),
            write(Actor::Operator, "create", "pods", "a-launcher", 400, 420),
            write(Actor::Operator, "patch", "virtualmachines/status", "a", 425, 460),
            // After Starting: not counted.
            write(Actor::Operator, "patch", "virtualmachines/status", "a", 900, 950),
        ];
        let seen = BTreeMap::from([("a".to_owned(), jiff::Timestamp::from_millisecond(500).unwrap())]);
        let vm_of = |w: &Write| Some(w.name.split('-').next().unwrap().to_owned());
        let s = stages(&writes, vm_of, &seen);
        let p50 = |stage: &str| s[stage]["p50"].as_f64().unwrap();
        assert_eq!(
            [p50("create"), p50("to_first_write"), p50("disks"), p50("pod"), p50("status"), p50("seen")],
            [0.01, 0.095, 0.045, 0.27, 0.04, 0.04]
        );
    }
}
