//! Which runtime runs a VM's guest, and what a KubeVirt VirtualMachineInstance shows of it.
//!
//! Two runtimes (DESIGN "Running VMs", docs/kubevirt.md): `launcher`, vmkeep's own launcher Pod
//! with QEMU, and `kubevirt`, a KubeVirt `kubevirt.io/v1` VirtualMachineInstance named after
//! the VM on the same PVCs. Claims, clones, fencing and the persistence rules are vmkeep's with
//! either. The Template's `spec.runtime` wins over the operator's `--runtime`; `auto` is
//! `kubevirt` where the cluster serves KubeVirt's API. A VM keeps the runtime of the workload it
//! has (a launcher Pod or a VirtualMachineInstance) until that is gone: a change applies at its
//! next start.

use crate::api::virtual_machine::LastExit;
use crate::{
    api::template::Runtime,
    plan::{
        cached::CachedVmi,
        claim as rules,
        virtual_machine::{Child, LauncherView},
    },
};

/// What the operator knows of KubeVirt's VirtualMachineInstance API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KubevirtApi {
    /// Not looked at yet (the operator just started, or nothing asked for it yet).
    Unknown,
    /// The cluster serves no `kubevirt.io/v1` `virtualmachineinstances` (KubeVirt is not
    /// installed).
    NotServed,
    /// Served, but vmkeep may not watch it (the message says why, e.g. RBAC).
    Unusable(String),
    /// Served; the cache of vmkeep's VirtualMachineInstances has not listed yet.
    Syncing,
    /// Served and cached.
    Ready,
}

impl KubevirtApi {
    /// Whether this operator uses KubeVirt's API now (something asked for it, and it is, or
    /// may be, served): only then is it asked about VirtualMachineInstances.
    pub fn in_use(&self) -> bool {
        !matches!(self, KubevirtApi::Unknown | KubevirtApi::NotServed)
    }
}

/// The runtime a VM that has no workload starts with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Start it with this runtime.
    Run(Runtime),
    /// The choice depends on KubeVirt's API, not known yet: decide in a moment.
    Wait,
    /// `kubevirt` is asked for and cannot be used: the VM is Pending with reason
    /// `RuntimeNotAvailable` and this message.
    NotAvailable(String),
}

/// The runtime for a new workload: the Template's `runtime`, else the operator's `setting`;
/// `auto` resolved against `api`.
pub fn choose(setting: Runtime, template: Option<Runtime>, api: &KubevirtApi) -> Choice {
    let asked = template.unwrap_or(setting);
    match (asked, api) {
        (Runtime::Launcher, _) => Choice::Run(Runtime::Launcher),
        (_, KubevirtApi::Ready) => Choice::Run(Runtime::Kubevirt),
        (_, KubevirtApi::Unknown | KubevirtApi::Syncing) => Choice::Wait,
        (Runtime::Auto, KubevirtApi::NotServed) => Choice::Run(Runtime::Launcher),
        (_, KubevirtApi::NotServed) => Choice::NotAvailable(
            "the runtime is kubevirt and the cluster serves no kubevirt.io/v1 VirtualMachineInstance API \
             (is KubeVirt installed?)"
                .into(),
        ),
        (_, KubevirtApi::Unusable(why)) => {
            Choice::NotAvailable(format!("the runtime is {} and KubeVirt's API cannot be used: {why}", asked.as_str()))
        }
    }
}

/// The runtime in force: the one whose workload the VM has (a launcher Pod first), else the
/// choice for a new one.
pub fn in_force(pod: &Child, vmi: &Child, choice: Choice) -> Choice {
    match (pod, vmi) {
        (Child::Ours { .. }, _) => Choice::Run(Runtime::Launcher),
        (_, Child::Ours { .. }) => Choice::Run(Runtime::Kubevirt),
        _ => choice,
    }
}

/// Whether a VirtualMachineInstance phase is final: the guest ended (`Succeeded`: it powered
/// off; `Failed`), and KubeVirt does not start it again.
pub fn finished(phase: Option<&str>) -> bool {
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// A VM's VirtualMachineInstance as its status shows it: the child (ours by the same labels
/// as a launcher Pod, [`rules::launcher_of`]) with the VMI's phase, and what it says of the
/// guest. `vmi` is `None` when there is none; `launchers` says whether virt-launcher Pods of a
/// VirtualMachineInstance of the VM still exist (the VMI goes before its Pod does: until the
/// Pod is gone too, the workload is still going).
pub fn instance(vmi: Option<&CachedVmi>, launchers: bool, vm_name: &str, vm_uid: &str) -> (Child, LauncherView) {
    let view = LauncherView { runtime: Runtime::Kubevirt, ..LauncherView::default() };
    let Some(vmi) = vmi else {
        let child = if launchers { Child::Ours { phase: None, deleting: true } } else { Child::Missing };
        return (child, view);
    };
    if !rules::launcher_of(&vmi.metadata, vm_name, vm_uid) {
        return (Child::Foreign, view);
    }
    let status = vmi.status.as_ref();
    let phase = status.and_then(|s| s.phase.clone());
    let ready = status.and_then(|s| s.conditions.as_ref()).and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    let why = ready
        .filter(|c| c.status != "True")
        .map(|c| [c.reason.as_deref(), c.message.as_deref()].into_iter().flatten().collect::<Vec<_>>().join(": "))
        .filter(|w| !w.is_empty())
        .or_else(|| status.and_then(|s| s.reason.clone()));
    let last_exit = finished(phase.as_deref()).then(|| LastExit {
        reason: format!("VirtualMachineInstance{}", phase.as_deref().unwrap_or_default()),
        message: why.clone().unwrap_or_else(|| "the guest ended".into()),
        exit_code: i32::from(phase.as_deref() == Some("Failed")),
        finished_at: None,
    });
    let view = LauncherView {
        ready: ready.is_some_and(|c| c.status == "True"),
        node_name: status.and_then(|s| s.node_name.clone()),
        // No phase yet: KubeVirt has not seen it (the message of a VMI just made, unchanged).
        waiting: phase.as_ref().map(|phase| match &why {
            Some(why) => format!("{phase} ({why})"),
            None => phase.clone(),
        }),
        last_exit,
        created: vmi.metadata.creation_timestamp.clone(),
        ..view
    };
    let child = Child::Ours { phase, deleting: vmi.metadata.deletion_timestamp.is_some() };
    (child, view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_wins_and_auto_follows_the_api() {
        use KubevirtApi as A;
        use Runtime::*;
        assert_eq!(choose(Launcher, None, &A::Unknown), Choice::Run(Launcher));
        assert_eq!(choose(Kubevirt, Some(Launcher), &A::Ready), Choice::Run(Launcher));
        assert_eq!(choose(Launcher, Some(Kubevirt), &A::Ready), Choice::Run(Kubevirt));
        assert_eq!(choose(Auto, None, &A::Ready), Choice::Run(Kubevirt));
        assert_eq!(choose(Auto, None, &A::NotServed), Choice::Run(Launcher));
        assert_eq!(choose(Auto, None, &A::Syncing), Choice::Wait);
        assert_eq!(choose(Kubevirt, None, &A::Unknown), Choice::Wait);
        assert!(matches!(choose(Kubevirt, None, &A::NotServed), Choice::NotAvailable(m) if m.contains("serves no")));
        assert!(matches!(choose(Auto, None, &A::Unusable("403".into())), Choice::NotAvailable(m) if m.contains("403")));
    }

    #[test]
    fn a_workload_keeps_its_runtime() {
        let ours = Child::Ours { phase: None, deleting: false };
        let wanted = Choice::Run(Runtime::Kubevirt);
        assert_eq!(in_force(&ours, &Child::Missing, wanted.clone()), Choice::Run(Runtime::Launcher));
        assert_eq!(in_force(&Child::Missing, &ours, Choice::Run(Runtime::Launcher)), Choice::Run(Runtime::Kubevirt));
        assert_eq!(in_force(&Child::Missing, &Child::Missing, wanted.clone()), wanted);
    }

    fn vmi(json: serde_json::Value) -> CachedVmi {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_running_instance_is_ready_and_a_gone_one_waits_for_its_pods() {
        let labels =
            serde_json::json!({"app.kubernetes.io/managed-by": "vmkeep", "vmkeep.io/virtual-machine-uid": "u1"});
        let running = vmi(serde_json::json!({
            "metadata": {"name": "vm-a", "labels": labels, "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": "Running", "nodeName": "n1", "conditions": [
                {"type": "LiveMigratable", "status": "False"}, {"type": "Ready", "status": "True"}]},
        }));
        let (child, view) = instance(Some(&running), false, "vm-a", "u1");
        assert_eq!(child, Child::Ours { phase: Some("Running".into()), deleting: false });
        assert!(view.ready);
        assert_eq!(view.node_name.as_deref(), Some("n1"));
        assert_eq!(view.runtime, Runtime::Kubevirt);
        let (other, _) = instance(Some(&running), false, "vm-a", "u2");
        assert_eq!(other, Child::Foreign, "another VM of that name's instance is not ours");

        let scheduling = vmi(serde_json::json!({
            "metadata": {"name": "vm-a", "labels": labels},
            "status": {"phase": "Scheduling", "conditions": [
                {"type": "Ready", "status": "False", "reason": "PodNotExists", "message": "no pod yet"}]},
        }));
        let (_, view) = instance(Some(&scheduling), false, "vm-a", "u1");
        assert!(!view.ready);
        assert_eq!(view.waiting.as_deref(), Some("Scheduling (PodNotExists: no pod yet)"));

        let ended = vmi(serde_json::json!({"metadata": {"name": "vm-a", "labels": labels},
            "status": {"phase": "Succeeded"}}));
        let (_, view) = instance(Some(&ended), false, "vm-a", "u1");
        assert_eq!(view.last_exit.map(|e| e.reason).as_deref(), Some("VirtualMachineInstanceSucceeded"));

        assert_eq!(instance(None, true, "vm-a", "u1").0, Child::Ours { phase: None, deleting: true });
        assert_eq!(instance(None, false, "vm-a", "u1").0, Child::Missing);
    }
}
