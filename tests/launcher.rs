//! The launcher boots real guests on the local node: the test guest of `hack/guest.sh` (a raw
//! disk the BIOS boots, which prints its name and each disk's markers on the serial console and
//! appends its own name to every writable data disk) runs under QEMU in launcher Pods.
//!
//! The guest's disk reaches the cluster as a host-path PersistentVolume of this machine, adopted
//! by a persistent Image (`source.pvc`): until vmkeep imports images itself, that is how data
//! gets onto a PVC here. So these tests run on the local cluster only (skipped, saying so, on
//! another), one at a time (the node has 2 CPUs; each VM asks for 1).

mod support;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::{Api, ResourceExt};
use support::{env::*, host, node::*, *};
use vmkeep::{
    api::{Image, virtual_machine::VirtualMachinePhase as P},
    plan::names,
};

/// The local cluster's StorageClass (`hack/cluster.sh`): the guest's volume is in it, so clones of
/// a non-persistent guest image are made by its provisioner.
const STORAGE_CLASS: &str = "standard";

/// One test on the node at a time.
static NODE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A test on the node: its Env, its guest disks, and the node to itself. Bind them in the
/// reverse order (`OnNode { _node, disks, env }`): they are dropped env first (its VMs go),
/// then the disks, then the node is free.
struct OnNode {
    env: Env,
    disks: HostDisks,
    _node: tokio::sync::MutexGuard<'static, ()>,
}

/// Waits for the node and sets up `test`, or says why it is skipped.
async fn on_node(test: &str) -> Option<OnNode> {
    if let Some(reason) = skip_reason() {
        eprintln!("skipped: {reason}");
        return None;
    }
    let node = NODE.lock().await;
    Some(OnNode { env: Env::new(test).await, disks: HostDisks::default(), _node: node })
}

/// Host-path volumes holding guest disks, removed (with their PersistentVolumes) when dropped.
#[derive(Default)]
struct HostDisks {
    dirs: std::sync::Mutex<Vec<(String, PathBuf)>>,
}

impl HostDisks {
    /// A persistent Image `name` whose adopted PVC holds `variant` (a file beside
    /// [`guest_image`]) as its `disk.img`, on a host-path PersistentVolume of this machine;
    /// returns once the Image knows its capacity.
    async fn guest(&self, env: &Env, name: &str, variant: &str) {
        self.guest_image(env, name, variant, true).await
    }

    /// [`HostDisks::guest`], persistent or not.
    async fn guest_image(&self, env: &Env, name: &str, variant: &str, persistent: bool) {
        let pv = format!("{}-{name}", env.ns.name);
        let dir = std::env::temp_dir().join("vmkeep-e2e").join(&pv);
        let source = guest_image().parent().expect("the guest's folder").join(variant);
        host::stage_guest_disk(&source, &dir).unwrap_or_else(|e| panic!("{e}"));
        self.dirs.lock().unwrap().push((pv.clone(), dir.clone()));
        let (volume, claim_and_image) =
            host::guest_volume_manifests(&pv, &dir, &env.ns.name, name, persistent, STORAGE_CLASS);
        kubectl_ok(&["apply", "-f", "-"], Some(&volume));
        apply(&env.ns, &claim_and_image);
        env.wait_image(name, "Ready", |i| i.status.as_ref().and_then(|s| s.capacity.as_ref()).is_some()).await;
    }
}

impl Drop for HostDisks {
    fn drop(&mut self) {
        for (pv, dir) in self.dirs.lock().unwrap().drain(..) {
            let _ = kubectl(&["delete", "pv", &pv, "--wait=false"], None);
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A blank image of 64 MiB.
fn blank_image(name: &str, persistent: bool) -> String {
    format!(
        "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {{name: {name}}}\n\
         spec: {{persistent: {persistent}, size: 64Mi, source: {{blank: {{}}}}}}\n---\n"
    )
}

/// A template (1 CPU, 256 MiB) with the disks `(name, image)` (`None`: a volatile disk) and a
/// grace period of `grace` seconds.
fn template(name: &str, disks: &[(&str, Option<&str>)], grace: u32) -> String {
    template_with(name, disks, &format!("launcher: {{terminationGracePeriodSeconds: {grace}}}, "))
}

/// `kubectl logs -f` of a launcher into a file, until dropped: what a launcher printed while it
/// stopped, once its Pod is gone.
struct Follow {
    child: Child,
    file: PathBuf,
}

impl Follow {
    fn start(env: &Env, vm: &str) -> Self {
        let file = std::env::temp_dir().join(format!("vmkeep-follow-{}-{vm}.log", env.ns.name));
        let out = std::fs::File::create(&file).expect("follow file");
        let child = Command::new(kubectl_path())
            .args(["--kubeconfig"])
            .arg(kubeconfig())
            .args([
                "logs",
                "-f",
                "-n",
                &env.ns.name,
                &names::launcher_pod(&env.ns.name, vm),
                "-c",
                "launcher",
                "--tail=5",
            ])
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .expect("kubectl logs -f");
        Follow { child, file }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.file).unwrap_or_default()
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Runs the kubectl plugin (the crate's `kubectl-vmkeep`) in the test's namespace.
fn plugin(env: &Env, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kubectl-vmkeep"));
    command.env("KUBECONFIG", kubeconfig()).args(["-n", &env.ns.name]).args(args);
    command
}

fn plugin_ok(env: &Env, args: &[&str]) -> String {
    let out = plugin(env, args).output().expect("kubectl-vmkeep");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubectl vmkeep {args:?} failed: {text}");
    text
}

/// Attaches `kubectl vmkeep console` to `vm` (stdin kept open) until its output shows `line`.
fn console_until(env: &Env, vm: &str, line: &str, timeout: Duration) -> String {
    let mut child = plugin(env, &["console", vm])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl vmkeep console");
    let mut stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains(line) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => seen.extend(chunk),
            Err(_) => {
                let _ = child.kill();
                let err = child.wait_with_output().map(|o| String::from_utf8_lossy(&o.stderr).into_owned());
                panic!("no '{line}' on the console within {timeout:?}:\n{}\n{err:?}", String::from_utf8_lossy(&seen));
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    String::from_utf8_lossy(&seen).into_owned()
}

/// The host folder of a dynamically provisioned (host-path) PVC.
async fn host_path(env: &Env, pvc: &str) -> PathBuf {
    let claim: PersistentVolumeClaim = env.api().get(pvc).await.expect("pvc");
    let volume = claim.spec.and_then(|s| s.volume_name).expect("a bound PVC");
    let pv = Api::<PersistentVolume>::all(env.client.clone()).get(&volume).await.expect("pv");
    PathBuf::from(pv.spec.and_then(|s| s.host_path).expect("a host-path volume").path)
}

/// The marker text at the start of a disk (what the guest wrote there).
fn markers(disk: &Path) -> String {
    let bytes = std::fs::read(disk).unwrap_or_default();
    String::from_utf8_lossy(&bytes[..bytes.len().min(4096)])
        .trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_owned()
}

#[tokio::test]
async fn a_vm_boots_its_guest_powers_off_on_halted_and_boots_again_with_its_disk() {
    let Some(OnNode { _node, disks, env }) = on_node("launcher-boot").await else { return };
    let ns = &env.ns;
    disks.guest(&env, "os", "guest.img").await;
    apply(ns, &(blank_image("data", true) + &template("t", &[("root", Some("os")), ("data", Some("data"))], 20)));
    let created = Instant::now();
    apply(ns, &vm("a", "t", "Reject"));

    // Running: QEMU runs the guest (the Pod is Ready); the console shows it within 60 s.
    let running = wait_for("VirtualMachine a to run", BOOT, async || {
        let vm = env.vm("a").await?;
        (vm.status.as_ref()?.phase == Some(P::Running)).then_some(vm)
    })
    .await;
    let to_running = created.elapsed();
    let log = wait_log(&env, "a", "vmkeep-guest: ready", Duration::from_secs(60)).await;
    let to_ready = created.elapsed();
    for line in
        ["vmkeep-launcher: accelerator=", "vmkeep-guest: up as a", "disk vdb markers: none", "disk vdb marked a"]
    {
        assert!(log.contains(line), "no '{line}' in the launcher's log:\n{log}");
    }
    let status = running.status.clone().expect("status");
    assert!(matches!(status.accelerator.as_deref(), Some("TCG" | "KVM")), "{status:?}");
    assert_eq!(status.node_name, schedulable_node(), "status.nodeName");
    assert_eq!(status.restarts, Some(0));
    let event = env.wait_event("Accelerator", "a").await;
    assert!(event.note.as_deref().unwrap_or_default().starts_with("QEMU runs the guest with"), "{event:?}");
    let console = console_until(&env, "a", "vmkeep-guest: ready", Duration::from_secs(30));
    assert!(console.contains("vmkeep-guest: up as a"), "kubectl vmkeep console:\n{console}");
    let pod: Pod = env.api().get(&names::launcher_pod(&env.ns.name, "a")).await.expect("launcher");
    let memory = host::launcher_memory(&pod.uid().expect("uid"), 256);

    // Halted: the power button; the guest flushes and powers off; disks and claim stay.
    let follow = Follow::start(&env, "a");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pressed = Instant::now();
    plugin_ok(&env, &["stop", "a"]);
    env.wait_gone::<Pod>(&names::launcher_pod(&env.ns.name, "a"), Duration::from_secs(60)).await;
    let to_gone = pressed.elapsed();
    env.wait_vm("a", P::Stopped).await;
    let stopped = follow.text();
    assert!(stopped.contains("vmkeep-guest: power button, shutting down"), "the guest's shutdown:\n{stopped}");
    assert!(stopped.contains("the guest powered off"), "the launcher's stop:\n{stopped}");
    drop(follow);
    assert!(env.operator.gauge("launcher_start_seconds_count") >= Some(1), "vmkeep_launcher_start_seconds");
    wait_for("vmkeep_launcher_stop_seconds to count the stop", LONG, async || {
        (env.operator.gauge("launcher_stop_seconds_count") >= Some(1)).then_some(())
    })
    .await;
    assert_eq!(env.claim_holder("data").await.as_deref(), Some("a"), "the claim stays while Halted");
    let data_pvc = env.api::<Image>().get("data").await.expect("image").status.and_then(|s| s.pvc_name).expect("pvc");
    let data_disk = host_path(&env, &data_pvc).await.join("disk.img");
    assert_eq!(markers(&data_disk), "a", "the data disk holds what the guest flushed");

    // Always: it boots again and the guest finds its own marker on the persistent disk.
    plugin_ok(&env, &["start", "a"]);
    env.wait_vm("a", P::Running).await;
    let log = wait_log(&env, "a", "vmkeep-guest: ready", BOOT).await;
    assert!(log.contains("disk vdb markers: a"), "the second boot did not see the first's marker:\n{log}");
    eprintln!(
        "created -> Running {:.1} s, -> guest ready {:.1} s; Halted -> launcher Pod gone {:.1} s; \
         launcher memory (MiB): {memory:?}",
        to_running.as_secs_f64(),
        to_ready.as_secs_f64(),
        to_gone.as_secs_f64()
    );
}

#[tokio::test]
async fn a_guest_that_powers_off_is_restarted_and_one_that_ignores_the_button_is_killed() {
    let Some(OnNode { _node, disks, env }) = on_node("launcher-restart").await else { return };
    let ns = &env.ns;
    disks.guest(&env, "quitter", "guest-poweroff.img").await;
    disks.guest(&env, "stubborn", "guest-ignore-button.img").await;
    apply(ns, &(template("q", &[("root", Some("quitter"))], 20) + &template("s", &[("root", Some("stubborn"))], 15)));

    // A guest that powers itself off is started again (runStrategy Always), and says why.
    apply(ns, &vm("q", "q", "Reject"));
    let restarted = wait_for("VirtualMachine q to be restarted", Duration::from_secs(180), async || {
        let status = env.vm("q").await?.status?;
        (status.restarts >= Some(1)).then_some(status)
    })
    .await;
    let exit = restarted.last_exit.clone().expect("status.lastExit");
    assert_eq!((exit.reason.as_str(), exit.exit_code), ("GuestPowerOff", 0), "{exit:?}");
    assert_eq!(exit.message, "the guest powered off");
    assert!(env.operator.counter("launcher_restarts", "") >= 1, "vmkeep_launcher_restarts_total");
    env.delete_vm("q").await;
    env.wait_gone::<Pod>(&names::launcher_pod(&env.ns.name, "q"), Duration::from_secs(60)).await;

    // A guest that ignores the power button: QEMU is told to quit at the launcher's deadline
    // (grace 15 s - 5 s margin) and the VM still stops.
    apply(ns, &vm("s", "s", "Reject"));
    env.wait_vm("s", P::Running).await;
    wait_log(&env, "s", "vmkeep-guest: ready", BOOT).await;
    let follow = Follow::start(&env, "s");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pressed = Instant::now();
    plugin_ok(&env, &["stop", "s"]);
    env.wait_gone::<Pod>(&names::launcher_pod(&env.ns.name, "s"), Duration::from_secs(60)).await;
    let to_gone = pressed.elapsed();
    env.wait_vm("s", P::Stopped).await;
    let stopped = follow.text();
    assert!(stopped.contains("vmkeep-guest: power button ignored"), "{stopped}");
    assert!(stopped.contains("did not power off within 10 s"), "the launcher's deadline:\n{stopped}");
    assert!(to_gone >= Duration::from_secs(9), "the Pod went after {to_gone:?}, before the deadline");
    eprintln!("a guest ignoring the power button: Halted -> launcher Pod gone {:.1} s", to_gone.as_secs_f64());
}

#[tokio::test]
async fn a_persistent_disk_passes_to_the_next_vm_and_a_volatile_disk_starts_empty() {
    let Some(OnNode { _node, disks, env }) = on_node("launcher-handover").await else { return };
    let ns = &env.ns;
    disks.guest(&env, "os", "guest.img").await;
    apply(
        ns,
        &(blank_image("data", true)
            + &template("t", &[("root", Some("os")), ("data", Some("data")), ("scratch", None)], 20)),
    );
    apply(ns, &vm("a", "t", "Reject"));
    env.wait_vm("a", P::Running).await;
    let log = wait_log(&env, "a", "vmkeep-guest: ready", BOOT).await;
    for line in ["disk vdb markers: none", "disk vdb marked a", "disk vdc markers: none", "disk vdc marked a"] {
        assert!(log.contains(line), "no '{line}' in a's log:\n{log}");
    }
    apply(ns, &vm("b", "t", "Wait"));
    env.wait_vm("b", P::Pending).await;
    env.delete_vm("a").await;
    env.wait_vm("b", P::Running).await;
    let log = wait_log(&env, "b", "vmkeep-guest: ready", BOOT).await;
    assert!(log.contains("vmkeep-guest: up as b"), "{log}");
    assert!(log.contains("disk vdb markers: a"), "b's guest did not find a's marker on the persistent disk:\n{log}");
    assert!(log.contains("disk vdc markers: none"), "b's volatile disk is not empty:\n{log}");
}

#[tokio::test]
async fn two_vms_of_one_template_run_at_once_each_on_its_own_copy() {
    let Some(OnNode { _node, disks, env }) = on_node("launcher-pair").await else { return };
    let ns = &env.ns;
    // One template: a clone of a non-persistent guest image and a volatile disk per VM. This
    // cluster's host-path provisioner cannot clone: vmkeep copies (a copier Pod per clone).
    disks.guest_image(&env, "os", "guest.img", false).await;
    apply(ns, &template("t", &[("root", Some("os")), ("scratch", None)], 20));
    let created = Instant::now();
    apply(ns, &(vm("a", "t", "Reject") + &vm("b", "t", "Reject")));
    let content = std::fs::read(guest_image()).expect("the guest image");
    let digest = ring::digest::digest(&ring::digest::SHA256, &content);
    let want = format!("sha256:{}", digest.as_ref().iter().map(|b| format!("{b:02x}")).collect::<String>());
    for name in ["a", "b"] {
        let vm = wait_for(&format!("VirtualMachine {name} to run"), BOOT, async || {
            let vm = env.vm(name).await?;
            (vm.status.as_ref()?.phase == Some(P::Running)).then_some(vm)
        })
        .await;
        let root = vm.status.expect("status").disks.into_iter().find(|d| d.name == "root").expect("root");
        assert_eq!(root.clone_strategy.as_deref(), Some("copy"), "{root:?}");
        assert!(root.clone_fallback.as_deref().unwrap_or_default().contains("cannot clone"), "{root:?}");
        assert_eq!(root.digest.as_deref(), Some(want.as_str()), "the clone holds what its image held");
    }
    let to_running = created.elapsed();
    for name in ["a", "b"] {
        let log = wait_log(&env, name, "vmkeep-guest: ready", BOOT).await;
        assert!(log.contains(&format!("up as {name}")), "{log}");
        assert!(log.contains("disk vdb markers: none"), "{name}'s volatile disk is its own:\n{log}");
        assert!(
            env.pod(&names::copier_pod(&env.ns.name, &names::vm_disk_pvc(name, "root"))).await.is_none(),
            "the copier Pod is gone once the copy is recorded"
        );
    }
    for name in ["a", "b"] {
        assert_eq!(env.vm_phase(name).await, Some(P::Running), "{name} runs beside the other");
    }
    eprintln!(
        "two VMs from one template, each a copy of a 64 MiB guest: created -> both Running {:.1} s",
        to_running.as_secs_f64()
    );
}
