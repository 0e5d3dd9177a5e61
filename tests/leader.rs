//! Leader election against a real API server: of two replicas one runs the controllers, the
//! other stands by; when the leader dies the standby takes over and converges new objects.

mod support;

use std::time::Duration;

use kube::Api;
use support::*;
use vmkeep::api::{VirtualMachine, virtual_machine::VirtualMachinePhase};

fn elected(name: &str, ns: &str) -> Operator {
    let args = [
        "--namespace",
        ns,
        "--leader-elect",
        "--leader-election-namespace",
        ns,
        "--leader-election-seconds",
        "3",
        "--identity",
        name,
    ];
    Operator::start_with(name, &args)
}

async fn wait_started(api: &Api<VirtualMachine>, name: &str) {
    wait_for(&format!("VirtualMachine {name} to start"), Duration::from_secs(60), async || {
        let vm = api.get_opt(name).await.expect("get vm")?;
        reached(vm.status?.phase, VirtualMachinePhase::Starting).then_some(())
    })
    .await;
}

fn vm(name: &str) -> String {
    format!(
        "apiVersion: vmkeep.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\n\
         spec: {{templateRef: {{name: t}}}}\n"
    )
}

#[tokio::test]
async fn a_standby_takes_over_when_the_leader_dies() {
    install_crds();
    let ns = TestNamespace::new("leader");
    let mut first = elected("replica-a", &ns.name);
    first.ready().await;
    wait_for("replica-a to lead", Duration::from_secs(30), async || (first.gauge("leader") == Some(1)).then_some(()))
        .await;
    let mut second = elected("replica-b", &ns.name);
    second.ready().await;
    // The standby is ready (healthy) but does not reconcile.
    let setup = "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {name: disk}\n\
                 spec: {persistent: false, size: 1Gi, source: {blank: {}}}\n---\n\
                 apiVersion: vmkeep.io/v1alpha1\nkind: Template\nmetadata: {name: t}\n\
                 spec: {cpu: 1, memory: 128Mi, disks: [{name: data, image: disk}]}\n";
    kubectl_ok(&["apply", "-n", &ns.name, "-f", "-"], Some(setup));
    kubectl_ok(&["apply", "-n", &ns.name, "-f", "-"], Some(&vm("before")));
    let api: Api<VirtualMachine> = Api::namespaced(client().await, &ns.name);
    wait_started(&api, "before").await;
    assert_eq!(second.gauge("leader"), Some(0), "two leaders");
    assert_eq!(second.counter("reconciliations", ""), 0, "the standby reconciled");

    // The leader dies without a goodbye: the standby waits for the Lease to expire.
    drop(first);
    wait_for("replica-b to lead", Duration::from_secs(30), async || (second.gauge("leader") == Some(1)).then_some(()))
        .await;
    kubectl_ok(&["apply", "-n", &ns.name, "-f", "-"], Some(&vm("after")));
    wait_started(&api, "after").await;
    kubectl_ok(&["delete", "virtualmachines,images,templates", "--all", "-n", &ns.name, "--wait=true"], None);
    assert!(second.exited().is_none(), "{}", second.log_text());
}
