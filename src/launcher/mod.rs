//! `vmkeep launch`: PID 1 of a launcher Pod's container, with QEMU as its child (no libvirt).
//!
//! 1. [`disk::prepare`]: every disk is where the controller said and opens as it will be
//!    attached (a blank one is created); else the start fails naming the disk.
//! 2. [`qemu::detect`] picks KVM or TCG and the choice is printed to the log
//!    ([`spec::ACCELERATOR_LINE`]), where the controller reads it for the VM's status.
//! 3. QEMU runs ([`qemu::args`]); its serial console is relayed to the log and to the console
//!    socket ([`console`]); the launcher holds a QMP connection ([`qmp`]); the readiness probe
//!    (`vmkeep probe`) asks QEMU `query-status` on a second QMP socket.
//! 4. On SIGTERM (Halted, VM deletion, eviction, drain): the ACPI power button
//!    (`system_powerdown`) every [`POWER_BUTTON_EVERY`] until the guest powers off; at the stop
//!    deadline less [`QUIT_GRACE`], `quit`; at the deadline, SIGKILL. The Pod's grace period is
//!    longer than the deadline ([`crate::plan::build`]).
//! 5. When QEMU ends by itself (the guest powered off, or a crash) the launcher ends too, and the
//!    kubelet starts the container again with its back-off (`restartPolicy: Always`).
//!
//! Every end writes the termination message `<Reason>: <text>` ([`spec::ExitReason`]), which the
//! controller shows as `status.lastExit`.

pub mod console;
pub mod disk;
pub mod qemu;
pub mod qmp;
pub mod spec;

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tracing::{error, info, warn};

use self::{qmp::Qmp, spec::ExitReason};

/// Where the launcher keeps its sockets (an `emptyDir`: the container's root is read-only).
pub const RUN_DIR: &str = "/var/run/vmkeep";
/// How often the power button is pressed again while the guest does not power off.
pub const POWER_BUTTON_EVERY: Duration = Duration::from_secs(5);
/// Time between QMP `quit` and SIGKILL at the end of the stop deadline.
pub const QUIT_GRACE: Duration = Duration::from_secs(3);

/// The QMP socket the launcher holds, under `run_dir`.
pub fn qmp_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("qmp.sock")
}
/// The QMP socket of the readiness probe.
pub fn probe_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("probe.sock")
}
/// The console socket.
pub fn console_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("console.sock")
}

/// What `vmkeep launch` runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// The VirtualMachine's name.
    pub vm: String,
    /// Virtual CPUs.
    pub cpu: u32,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// The disks, in boot order.
    pub disks: Vec<spec::LaunchDisk>,
    /// From SIGTERM to SIGKILL of QEMU.
    pub stop_timeout: Duration,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The KVM device to check.
    pub kvm_device: PathBuf,
    /// Where the sockets go.
    pub run_dir: PathBuf,
    /// Where the termination message goes (`/dev/termination-log` in a Pod).
    pub termination_log: PathBuf,
}

/// How the launcher ended: the container's termination message and exit code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub reason: ExitReason,
    pub message: String,
}

impl Outcome {
    fn new(reason: ExitReason, message: impl Into<String>) -> Self {
        Outcome { reason, message: message.into() }
    }

    /// The container's exit code: 0 when the guest powered off or was stopped, 1 otherwise
    /// (QEMU's own code is in the message).
    pub fn exit_code(&self) -> i32 {
        match self.reason {
            ExitReason::GuestPowerOff | ExitReason::Stopped => 0,
            _ => 1,
        }
    }
}

/// Runs the VM until it ends (see the module); returns the container's exit code.
pub async fn run(opts: Options) -> i32 {
    let outcome = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => launch(&opts, term).await,
        Err(e) => Outcome::new(ExitReason::LaunchFailed, format!("cannot handle SIGTERM: {e}")),
    };
    match outcome.reason {
        ExitReason::GuestPowerOff | ExitReason::Stopped => info!(vm = %opts.vm, "{}", outcome.message),
        _ => error!(vm = %opts.vm, reason = outcome.reason.as_str(), "{}", outcome.message),
    }
    let text = format!("{}: {}\n", outcome.reason.as_str(), outcome.message);
    if let Err(e) = std::fs::write(&opts.termination_log, text) {
        warn!(path = %opts.termination_log.display(), "cannot write the termination message: {e}");
    }
    outcome.exit_code()
}

async fn launch(opts: &Options, mut term: tokio::signal::unix::Signal) -> Outcome {
    let disks = match disk::prepare(&opts.disks) {
        Ok(disks) => disks,
        Err(e) => return Outcome::new(ExitReason::DiskUnavailable, e),
    };
    for d in &disks {
        info!(vm = %opts.vm, disk = %d.name, file = %d.file.display(), read_only = d.read_only, "disk attached");
    }
    let (accelerator, why) = qemu::detect(&opts.kvm_device);
    // On stdout, in the log: the controller reads this line back (status.accelerator).
    println!("{}{} {why}", spec::ACCELERATOR_LINE, accelerator.as_str());
    let (qmp_path, probe_path) = (qmp_socket(&opts.run_dir), probe_socket(&opts.run_dir));
    for socket in [&qmp_path, &probe_path] {
        let _ = std::fs::remove_file(socket);
    }
    let args = qemu::args(&qemu::Machine {
        name: &opts.vm,
        cpu: opts.cpu,
        memory_mib: opts.memory_mib,
        accelerator,
        disks: &disks,
        qmp_socket: &qmp_path,
        probe_socket: &probe_path,
    });
    info!(vm = %opts.vm, qemu = %opts.qemu.display(), "starting: {}", args.join(" "));
    let started = Instant::now();
    let mut child = match Command::new(&opts.qemu)
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return Outcome::new(ExitReason::LaunchFailed, format!("cannot run {}: {e}", opts.qemu.display())),
    };
    let stderr_tail = Arc::new(Mutex::new(VecDeque::<String>::new()));
    if let Some(stderr) = child.stderr.take() {
        let tail = stderr_tail.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                warn!("qemu: {line}");
                let mut t = tail.lock().expect("stderr tail");
                t.push_back(line);
                if t.len() > 5 {
                    t.pop_front();
                }
            }
        });
    }
    let console = match (child.stdout.take(), child.stdin.take()) {
        (Some(out), Some(inp)) => console::relay(out, inp, &console_socket(&opts.run_dir)).await,
        _ => Err(anyhow::anyhow!("QEMU's stdio is not piped")),
    };
    let console = match console {
        Ok(console) => console,
        Err(e) => return Outcome::new(ExitReason::LaunchFailed, format!("cannot serve the console: {e}")),
    };
    let tail = || stderr_tail.lock().expect("stderr tail").iter().cloned().collect::<Vec<_>>().join("; ");
    // A SIGTERM while QMP connects is kept: the stop needs QMP for its power button.
    let connect = Qmp::connect(&qmp_path, Duration::from_secs(30));
    tokio::pin!(connect);
    let mut terminated = false;
    let mut qmp = loop {
        tokio::select! {
            qmp = &mut connect => match qmp {
                Ok(qmp) => break qmp,
                Err(e) => {
                    let _ = child.start_kill();
                    return Outcome::new(ExitReason::LaunchFailed, format!("{e}; QEMU said: {}", tail()));
                }
            },
            status = child.wait() => {
                let _ = console.await;
                return exited(status, tail());
            }
            _ = term.recv(), if !terminated => terminated = true,
        }
    };
    info!(vm = %opts.vm, accelerator = accelerator.as_str(), after_ms = started.elapsed().as_millis() as u64, "QEMU runs the guest");
    let outcome = if terminated {
        stop(&mut child, &mut qmp, opts.stop_timeout).await
    } else {
        tokio::select! {
            status = child.wait() => exited(status, tail()),
            _ = term.recv() => stop(&mut child, &mut qmp, opts.stop_timeout).await,
        }
    };
    // The console's last bytes (the guest's shutdown lines) reach the log before we exit.
    let _ = tokio::time::timeout(Duration::from_secs(2), console).await;
    outcome
}

/// QEMU ended by itself.
fn exited(status: std::io::Result<ExitStatus>, stderr: String) -> Outcome {
    match status {
        Ok(s) if s.success() => Outcome::new(ExitReason::GuestPowerOff, "the guest powered off"),
        Ok(s) => Outcome::new(
            ExitReason::QemuExited,
            format!(
                "QEMU exited with {}{}",
                describe(s),
                if stderr.is_empty() { String::new() } else { format!(": {stderr}") }
            ),
        ),
        Err(e) => Outcome::new(ExitReason::LaunchFailed, format!("cannot wait for QEMU: {e}")),
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        _ => status.to_string(),
    }
}

/// The graceful stop (see the module): power button every 5 s, `quit`, SIGKILL at the deadline.
async fn stop(child: &mut Child, qmp: &mut Qmp, timeout: Duration) -> Outcome {
    let begun = Instant::now();
    let deadline = begun + timeout;
    let quit_at = deadline.checked_sub(QUIT_GRACE).unwrap_or(begun);
    let mut presses = 0;
    while Instant::now() < quit_at {
        // A QEMU that does not answer must not hold the stop past its deadline.
        match tokio::time::timeout(Duration::from_secs(2), qmp.execute("system_powerdown")).await {
            Ok(Ok(_)) => presses += 1,
            Ok(Err(e)) => warn!("power button: {e}"),
            Err(_) => warn!("power button: QMP did not answer in 2 s"),
        }
        let wait = POWER_BUTTON_EVERY.min(quit_at.saturating_duration_since(Instant::now()));
        if let Ok(status) = tokio::time::timeout(wait, child.wait()).await {
            let secs = begun.elapsed().as_secs_f64();
            return match status {
                Ok(s) if s.success() => Outcome::new(
                    ExitReason::Stopped,
                    format!("the guest powered off {secs:.1} s after the power button ({presses} presses)"),
                ),
                Ok(s) => {
                    Outcome::new(ExitReason::QemuExited, format!("QEMU exited with {} while stopping", describe(s)))
                }
                Err(e) => Outcome::new(ExitReason::LaunchFailed, format!("cannot wait for QEMU: {e}")),
            };
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), qmp.execute("quit")).await;
    let quit = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), child.wait()).await.is_ok();
    if !quit {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    Outcome::new(
        ExitReason::Killed,
        format!(
            "the guest did not power off within {} s of the power button ({presses} presses); QEMU was {}",
            timeout.as_secs(),
            if quit { "told to quit" } else { "killed" }
        ),
    )
}

/// `vmkeep probe`: exits 0 when QEMU says the guest's CPUs run (QMP `query-status` on the probe
/// socket), for the launcher container's readiness probe.
pub async fn probe(run_dir: &Path) -> anyhow::Result<()> {
    let check = async {
        let mut qmp = Qmp::connect(&probe_socket(run_dir), Duration::ZERO).await?;
        anyhow::ensure!(qmp.running().await?, "the guest is not running");
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(3), check)
        .await
        .map_err(|_| anyhow::anyhow!("QMP did not answer in 3 s"))?
}
