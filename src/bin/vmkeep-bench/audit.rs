//! The API server's audit log (JSON lines, one per request at `ResponseComplete`), read
//! incrementally from a byte offset: which writes were made in the bench's namespaces, and by
//! whom.
//!
//! Who is who: the bench and the operator use the same kubeconfig, so the same user (`admin` on
//! the local control plane); the user agent tells them apart. The operator sends
//! [`vmkeep::operator::USER_AGENT`] (`vmkeep/<version>`), the bench's own clients
//! `vmkeep-bench/...` and `vmkeep-bench-floor/...`. Every other write in a bench namespace is
//! Kubernetes' (the controller-manager binding PVCs, the garbage collector, namespace deletion).

use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde_json::Value;

pub const BENCH_AGENT: &str = concat!("vmkeep-bench/", env!("CARGO_PKG_VERSION"));
pub const FLOOR_AGENT: &str = concat!("vmkeep-bench-floor/", env!("CARGO_PKG_VERSION"));

/// Who sent a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Actor {
    /// The vmkeep operator under test.
    Operator,
    /// The bench creating Images, Templates and VirtualMachines (the "user").
    Bench,
    /// The bench's minimal client that makes the floor.
    Floor,
    /// Kubernetes itself (controller-manager: PVC binding, garbage collection, ...).
    System,
}

/// One write request.
#[derive(Clone, Debug)]
pub struct Write {
    pub actor: Actor,
    pub user_agent: String,
    pub verb: String,
    /// `persistentvolumeclaims`, `virtualmachines/status`, ...
    pub resource: String,
    pub name: String,
    pub code: u16,
    /// When the API server received the request.
    pub at: Option<jiff::Timestamp>,
    /// When it answered (`stageTimestamp` of `ResponseComplete`).
    pub done: Option<jiff::Timestamp>,
}

impl Write {
    /// `verb resource[/subresource]`, the key of the tallies.
    pub fn key(&self) -> String {
        format!("{} {}", self.verb, self.resource)
    }
}

const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

/// Parses one audit line; `None` for what is not a completed write in one of `namespaces`.
pub fn parse(line: &str, namespaces: &[String]) -> Option<Write> {
    let event: Value = serde_json::from_str(line).ok()?;
    if event.get("stage")?.as_str()? != "ResponseComplete" {
        return None;
    }
    let verb = event.get("verb")?.as_str()?;
    if !WRITE_VERBS.contains(&verb) {
        return None;
    }
    let object = event.get("objectRef")?;
    let namespace = object.get("namespace")?.as_str()?;
    if !namespaces.iter().any(|n| n == namespace) {
        return None;
    }
    let user_agent = event.get("userAgent").and_then(Value::as_str).unwrap_or_default();
    let actor = if user_agent.starts_with(FLOOR_AGENT) {
        Actor::Floor
    } else if user_agent.starts_with(BENCH_AGENT) {
        Actor::Bench
    } else if user_agent.starts_with(vmkeep::operator::USER_AGENT) {
        Actor::Operator
    } else {
        Actor::System
    };
    let mut resource = object.get("resource").and_then(Value::as_str).unwrap_or_default().to_owned();
    if let Some(sub) = object.get("subresource").and_then(Value::as_str) {
        resource = format!("{resource}/{sub}");
    }
    Some(Write {
        actor,
        user_agent: user_agent.to_owned(),
        verb: verb.to_owned(),
        resource,
        name: object.get("name").and_then(Value::as_str).unwrap_or_default().to_owned(),
        code: event.pointer("/responseStatus/code").and_then(Value::as_u64).unwrap_or_default() as u16,
        at: event.get("requestReceivedTimestamp").and_then(Value::as_str).and_then(|t| t.parse().ok()),
        done: event.get("stageTimestamp").and_then(Value::as_str).and_then(|t| t.parse().ok()),
    })
}

/// The audit log from some point on.
pub struct AuditLog {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl AuditLog {
    /// Opens the log at its current end: only what is written from now on is read.
    pub fn at_end(path: &Path) -> anyhow::Result<Self> {
        let offset = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
        Ok(Self { path: path.to_owned(), offset, partial: Vec::new() })
    }

    /// Everything written since the last call (or since opening) in `namespaces`.
    pub fn read_new(&mut self, namespaces: &[String]) -> anyhow::Result<Vec<Write>> {
        let mut file = File::open(&self.path).with_context(|| format!("cannot open {}", self.path.display()))?;
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = std::mem::take(&mut self.partial);
        let read = file.read_to_end(&mut bytes)?;
        self.offset += read as u64;
        // Keep an unfinished last line for the next call.
        let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        self.partial = bytes.split_off(complete);
        let text = String::from_utf8_lossy(&bytes);
        Ok(text.lines().filter_map(|l| parse(l, namespaces)).collect())
    }
}

/// Counts of writes by `verb resource`.
pub fn tally<'a>(writes: impl IntoIterator<Item = &'a Write>) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for w in writes {
        *counts.entry(w.key()).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_writes() {
        let ns = vec!["b".to_owned()];
        let op = r#"{"stage":"ResponseComplete","verb":"patch","userAgent":"vmkeep/0.1.0","user":{"username":"admin"},"objectRef":{"resource":"virtualmachines","namespace":"b","name":"vm-1","subresource":"status"},"responseStatus":{"code":200},"requestReceivedTimestamp":"2026-11-27T19:10:00.123456Z"}"#;
        let w = parse(op, &ns).unwrap();
        assert_eq!((w.actor, w.key().as_str(), w.code), (Actor::Operator, "patch virtualmachines/status", 200));
        assert_eq!(w.at.map(|t| t.as_microsecond() % 1_000_000), Some(123_456));
        let bench = op.replace("vmkeep/0.1.0", BENCH_AGENT);
        assert_eq!(parse(&bench, &ns).unwrap().actor, Actor::Bench);
        assert_eq!(parse(&op.replace("vmkeep/0.1.0", FLOOR_AGENT), &ns).unwrap().actor, Actor::Floor);
        let kcm = op.replace("vmkeep/0.1.0", "kube-controller-manager/v1.20.2 (linux/amd64)");
        assert_eq!(parse(&kcm, &ns).unwrap().actor, Actor::System);
        assert!(parse(&op.replace(r#""namespace":"b""#, r#""namespace":"c""#), &ns).is_none());
        assert!(parse(&op.replace("\"patch\"", "\"get\""), &ns).is_none());
    }
}
