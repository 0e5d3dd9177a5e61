//! `kubectl vmkeep`: the verbs `virtctl` users expect, for vmkeep VirtualMachines.
//!
//! - `console <vm>`: the VM's serial console, interactive, through the Kubernetes exec stream
//!   into its launcher (`vmkeep console`); the last 64 KiB of output first; detach with Ctrl+].
//! - `start <vm>`, `stop <vm>`: set `spec.runStrategy` to `Always` or `Halted`.
//! - `restart <vm>`: delete the launcher Pod; its guest gets the ACPI power button, and the
//!   operator starts a new launcher (the claims stay with the VM).
//! - `completion <shell>`: a completion script.
//!
//! Installed as `kubectl-vmkeep` on the PATH, kubectl runs it as `kubectl vmkeep`. It reads the
//! usual kubeconfig (`KUBECONFIG`, `~/.kube/config`, or `--kubeconfig`). The user needs `get`
//! and `patch` on `virtualmachines.vmkeep.io`, `delete` on `pods` (restart) and `create` on
//! `pods/exec` (console).

use std::{io::IsTerminal, path::PathBuf};

use anyhow::{Context as _, bail};
use clap::{CommandFactory, Parser, Subcommand};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, Config, ResourceExt,
    api::{AttachParams, DeleteParams, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmkeep::{
    api::{
        VirtualMachine,
        virtual_machine::{RunStrategy, VirtualMachinePhase},
    },
    plan::{build::LAUNCHER_CONTAINER, names},
};

/// The key that detaches from the console: Ctrl+] (as telnet and `virtctl console`).
const DETACH: u8 = 0x1d;

#[derive(Parser)]
#[command(
    name = "kubectl-vmkeep",
    bin_name = "kubectl vmkeep",
    version,
    about = "Console, start, stop and restart for vmkeep VirtualMachines"
)]
struct Cli {
    /// The namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// The kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: the current one).
    #[arg(long, global = true)]
    context: Option<String>,
    #[command(subcommand)]
    command: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Attach to the VM's serial console (the last 64 KiB of output first); detach with Ctrl+].
    Console {
        /// The VirtualMachine.
        vm: String,
    },
    /// Power the VM on: `spec.runStrategy: Always`.
    Start {
        /// The VirtualMachine.
        vm: String,
    },
    /// Power the VM off (ACPI power button, then forced at the launcher's deadline):
    /// `spec.runStrategy: Halted`. Disks and claims are kept.
    Stop {
        /// The VirtualMachine.
        vm: String,
    },
    /// Restart the VM: its launcher Pod stops the guest (power button) and a new one boots it.
    Restart {
        /// The VirtualMachine.
        vm: String,
    },
    /// Print a completion script, e.g. `kubectl vmkeep completion bash > /etc/bash_completion.d/kubectl-vmkeep`.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Verb::Completion { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "kubectl-vmkeep", &mut std::io::stdout());
        return Ok(());
    }
    let options = KubeConfigOptions { context: cli.context.clone(), ..Default::default() };
    let config = match &cli.kubeconfig {
        Some(path) => Config::from_custom_kubeconfig(Kubeconfig::read_from(path)?, &options).await?,
        None => Config::from_kubeconfig(&options).await.context("cannot load the kubeconfig")?,
    };
    let namespace = cli.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config)?;
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), &namespace);
    let pods: Api<Pod> = Api::namespaced(client, &namespace);
    match cli.command {
        Verb::Console { vm } => console(&vms, &pods, &vm).await,
        Verb::Start { vm } => run_strategy(&vms, &vm, RunStrategy::Always).await,
        Verb::Stop { vm } => run_strategy(&vms, &vm, RunStrategy::Halted).await,
        Verb::Restart { vm } => restart(&vms, &pods, &vm).await,
        Verb::Completion { .. } => unreachable!("handled above"),
    }
}

async fn get(vms: &Api<VirtualMachine>, name: &str) -> anyhow::Result<VirtualMachine> {
    vms.get_opt(name).await?.with_context(|| format!("VirtualMachine {name} not found"))
}

fn phase(vm: &VirtualMachine) -> String {
    vm.status.as_ref().and_then(|s| s.phase).map_or_else(|| "unknown".into(), |p| format!("{p:?}"))
}

async fn run_strategy(vms: &Api<VirtualMachine>, name: &str, wanted: RunStrategy) -> anyhow::Result<()> {
    let vm = get(vms, name).await?;
    if vm.spec.run_strategy == wanted {
        println!("VirtualMachine {name} already has runStrategy {wanted:?} (phase {})", phase(&vm));
        return Ok(());
    }
    let patch = serde_json::json!({ "spec": { "runStrategy": wanted } });
    vms.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    println!("VirtualMachine {name}: runStrategy {wanted:?} (was {:?})", vm.spec.run_strategy);
    Ok(())
}

/// Fails for a VM that KubeVirt runs (`status.runtime: kubevirt`): it has no launcher Pod;
/// `instead` says what does `what` for its VirtualMachineInstance (named after the VM).
fn not_kubevirt(vm: &VirtualMachine, what: &str, instead: &str) -> anyhow::Result<()> {
    if vm.status.as_ref().and_then(|s| s.runtime) == Some(vmkeep::api::template::Runtime::Kubevirt) {
        let name = vm.name_any();
        let instead = instead.replace("NAME", &name);
        bail!(
            "VirtualMachine {name} runs under KubeVirt (status.runtime: kubevirt), not in a launcher Pod; to {what} it: {instead}"
        );
    }
    Ok(())
}

/// The launcher Pod of `vm`: the one its status names, else the name vmkeep gives it.
fn launcher_pod(vm: &VirtualMachine) -> String {
    let status = vm.status.as_ref().and_then(|s| s.launcher_pod.clone());
    status.unwrap_or_else(|| names::launcher_pod(&vm.namespace().unwrap_or_default(), &vm.name_any()))
}

async fn restart(vms: &Api<VirtualMachine>, pods: &Api<Pod>, name: &str) -> anyhow::Result<()> {
    let vm = get(vms, name).await?;
    if vm.spec.run_strategy == RunStrategy::Halted {
        bail!("VirtualMachine {name} is halted; power it on with: kubectl vmkeep start {name}");
    }
    not_kubevirt(&vm, "restart", "kubectl delete virtualmachineinstance NAME (vmkeep starts a new one)")?;
    let pod = launcher_pod(&vm);
    match pods.delete(&pod, &DeleteParams::default()).await {
        Ok(_) => println!("VirtualMachine {name}: launcher Pod {pod} stops the guest; a new one will boot it"),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            bail!("VirtualMachine {name} has no launcher Pod to restart (phase {})", phase(&vm))
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

async fn console(vms: &Api<VirtualMachine>, pods: &Api<Pod>, name: &str) -> anyhow::Result<()> {
    let vm = get(vms, name).await?;
    let running = matches!(vm.status.as_ref().and_then(|s| s.phase), Some(VirtualMachinePhase::Running));
    if !running {
        bail!(
            "VirtualMachine {name} is not running (phase {}){}",
            phase(&vm),
            if vm.spec.run_strategy == RunStrategy::Halted {
                format!("; power it on with: kubectl vmkeep start {name}")
            } else {
                String::new()
            }
        );
    }
    not_kubevirt(&vm, "attach to its console", "virtctl console NAME")?;
    let params = AttachParams::default().container(LAUNCHER_CONTAINER).stdin(true).stdout(true).stderr(true);
    let mut attached = pods
        .exec(&launcher_pod(&vm), ["/vmkeep", "console"], &params)
        .await
        .with_context(|| format!("cannot attach to the launcher of VirtualMachine {name}"))?;
    let (Some(mut remote_in), Some(mut remote_out), Some(mut remote_err)) =
        (attached.stdin(), attached.stdout(), attached.stderr())
    else {
        bail!("the exec stream has no stdin, stdout or stderr");
    };
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("Connected to the console of VirtualMachine {name}; detach with Ctrl+]\r");
    } else {
        eprintln!("Connected to the console of VirtualMachine {name} (no terminal: streaming until interrupted)");
    }
    let _raw = interactive.then(RawMode::enable).transpose()?;
    let to_vm = async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            let n = stdin.read(&mut buf).await?;
            if n == 0 {
                // Input ended (a pipe, /dev/null): the console still streams until interrupted.
                drop(remote_in);
                std::future::pending::<()>().await;
                return Ok::<_, std::io::Error>(());
            }
            let chunk = &buf[..n];
            if interactive && let Some(at) = chunk.iter().position(|b| *b == DETACH) {
                remote_in.write_all(&chunk[..at]).await?;
                return Ok(());
            }
            remote_in.write_all(chunk).await?;
        }
    };
    let from_vm = async move {
        let mut stdout = tokio::io::stdout();
        tokio::io::copy(&mut remote_out, &mut stdout).await?;
        Ok::<_, std::io::Error>(())
    };
    let errors = async move {
        let mut stderr = tokio::io::stderr();
        tokio::io::copy(&mut remote_err, &mut stderr).await?;
        Ok::<_, std::io::Error>(())
    };
    tokio::select! {
        r = to_vm => r?,
        r = from_vm => r?,
        _ = errors => {}
    }
    if interactive {
        drop(_raw);
        eprintln!("\r\nDetached from the console of VirtualMachine {name}");
    }
    // Do not wait for the remote side: the stream closes with the process.
    std::process::exit(0)
}

/// The terminal in raw mode (every key to the guest, no local echo) until dropped.
struct RawMode(libc::termios);

impl RawMode {
    fn enable() -> anyhow::Result<Self> {
        let mut saved = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: fd 0 is a terminal (checked by the caller); tcgetattr fills `saved` on success.
        if unsafe { libc::tcgetattr(0, saved.as_mut_ptr()) } != 0 {
            bail!("cannot read the terminal's mode: {}", std::io::Error::last_os_error());
        }
        // SAFETY: tcgetattr returned 0, so `saved` is initialized.
        let saved = unsafe { saved.assume_init() };
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct; tcsetattr on fd 0 with a valid termios.
        unsafe {
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(0, libc::TCSANOW, &raw);
        }
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the mode read in `enable` on the same terminal.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.0) };
    }
}
