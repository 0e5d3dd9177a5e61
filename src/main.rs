//! The `vmkeep` binary: command-line parsing and wiring only.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use vmkeep::{api, controller, launcher, leader, mover, operator, telemetry, webhook};

#[derive(Parser)]
#[command(name = "vmkeep", version, about = "VM disk images on Kubernetes, persistent or cloned per VM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator against the cluster of the usual kubeconfig rules.
    Run {
        /// Address of `/healthz`, `/readyz` and `/metrics`.
        #[arg(long, env = "VMKEEP_HTTP_ADDR", default_value = "0.0.0.0:8080")]
        http_addr: SocketAddr,
        /// Log format.
        #[arg(long, env = "VMKEEP_LOG_FORMAT", value_enum, default_value_t)]
        log_format: telemetry::LogFormat,
        /// The container image of launcher Pods (runs `vmkeep launch`; holds QEMU and qemu-img).
        #[arg(long, env = "VMKEEP_LAUNCHER_IMAGE", default_value = concat!("vmkeep-launcher:", env!("CARGO_PKG_VERSION")))]
        launcher_image: String,
        /// The access mode of the PVCs vmkeep creates; ReadWriteOncePod needs Kubernetes >= 1.27.
        #[arg(long, env = "VMKEEP_PVC_ACCESS_MODE", default_value = "ReadWriteOnce",
              value_parser = ["ReadWriteOnce", "ReadWriteOncePod"])]
        pvc_access_mode: String,
        /// How clones are made when their StorageClass has no `vmkeep.io/clone-strategy`
        /// annotation: `auto` (`csi-clone` where the provisioner can clone, else `copy`),
        /// `csi-clone`, `copy` or `snapshot`.
        #[arg(long, env = "VMKEEP_CLONE_STRATEGY", default_value = "auto",
              value_parser = ["auto", "csi-clone", "copy", "snapshot"])]
        clone_strategy: String,
        /// What runs VMs whose Template names no runtime: `launcher` (vmkeep's launcher Pod with
        /// QEMU), `kubevirt` (a KubeVirt VirtualMachineInstance), or `auto` (`kubevirt` where
        /// the cluster serves KubeVirt's API).
        #[arg(long, env = "VMKEEP_RUNTIME", default_value = "launcher", value_parser = ["launcher", "kubevirt", "auto"])]
        runtime: String,
        /// How many objects of each kind are reconciled at once.
        #[arg(long, env = "VMKEEP_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
        concurrency: u16,
        /// vCPUs per requested CPU, as KubeVirt's `cpuAllocationRatio`: a launcher Pod requests
        /// ceil(cpu × 1000 / N) millicores for its Template's `cpu` vCPUs (QEMU still gets `cpu`
        /// vCPUs; no CPU limit). 1: a whole CPU per vCPU; 10 (KubeVirt's default) fits ten
        /// one-vCPU VMs in one CPU's requests.
        #[arg(long, env = "VMKEEP_CPU_ALLOCATION_RATIO", default_value_t = 1, value_parser = parse_cpu_allocation_ratio)]
        cpu_allocation_ratio: u32,
        /// Serve one namespace only (default: all namespaces).
        #[arg(long, env = "VMKEEP_NAMESPACE")]
        namespace: Option<String>,
        /// Run the controllers only while holding the leader Lease (for more than one replica).
        #[arg(long, env = "VMKEEP_LEADER_ELECT")]
        leader_elect: bool,
        /// The namespace of the leader Lease.
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        leader_election_namespace: String,
        /// The name of the leader Lease.
        #[arg(long, default_value = "vmkeep-leader")]
        leader_election_lease: String,
        /// This replica's identity in the election (default: the Pod name, else host and pid).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Seconds a leader Lease stays valid without renewal; a standby takes over after it.
        #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..))]
        leader_election_seconds: u64,
        #[command(flatten)]
        webhook: Box<WebhookArgs>,
    },
    /// Inside a launcher Pod (PID 1): run the VM under QEMU until SIGTERM, then stop it
    /// gracefully (ACPI power button, `quit`, kill at the deadline).
    Launch {
        /// The VirtualMachine's name (QEMU's name, the guest's SMBIOS serial number).
        #[arg(long)]
        vm: String,
        /// Virtual CPUs.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=255))]
        cpu: u32,
        /// Guest memory in MiB.
        #[arg(long, value_parser = clap::value_parser!(u64).range(16..))]
        memory_mib: u64,
        /// A disk, in boot order: `name=..,path=..,volumeMode=Filesystem|Block,capacity=BYTES`
        /// and the flags `readOnly`, `cdrom`, `blank`; repeat per disk.
        #[arg(long = "disk")]
        disks: Vec<launcher::spec::LaunchDisk>,
        /// Seconds from SIGTERM until QEMU is killed (less than the Pod's grace period).
        #[arg(long, default_value_t = 55)]
        stop_timeout_seconds: u64,
        /// The QEMU system emulator.
        #[arg(long, default_value = "qemu-system-x86_64")]
        qemu: PathBuf,
        /// The KVM device checked at start.
        #[arg(long, default_value = "/dev/kvm")]
        kvm_device: PathBuf,
        /// Where the QMP and console sockets go.
        #[arg(long, default_value = launcher::RUN_DIR)]
        run_dir: PathBuf,
        /// Where the termination message goes.
        #[arg(long, default_value = "/dev/termination-log")]
        termination_log: PathBuf,
    },
    /// Inside an importer Pod: download a disk image (raw or qcow2, gzip or xz compressed)
    /// into a PVC, or only find the size it needs (`--probe`).
    Import {
        /// The `http://` or `https://` URL.
        #[arg(long)]
        url: String,
        /// A mounted folder (`disk.img` is written) or a block device; not with `--probe`.
        #[arg(long, required_unless_present = "probe")]
        target: Option<PathBuf>,
        /// `raw` or `qcow2`, once decompressed.
        #[arg(long, default_value = "raw")]
        format: mover::import::Format,
        /// The expected sha256 of the downloaded file (64 hex digits).
        #[arg(long)]
        sha256: Option<String>,
        /// The PVC's size, bytes (0: unknown); a larger image is refused.
        #[arg(long, default_value_t = 0)]
        capacity: u64,
        /// A writable folder for qcow2 downloads.
        #[arg(long, default_value = "/var/lib/vmkeep/scratch")]
        scratch: PathBuf,
        /// A folder of HTTP headers (a mounted Secret: file name = header, content = value).
        #[arg(long)]
        headers_dir: Option<PathBuf>,
        /// A folder of PEM CA bundles trusted besides the system's (a mounted ConfigMap).
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        /// Only find the size the PVC needs (`Size: <bytes>`), writing nothing.
        #[arg(long)]
        probe: bool,
        /// Where the termination message goes.
        #[arg(long, default_value = "/dev/termination-log")]
        termination_log: PathBuf,
    },
    /// Inside a copier Pod: copy a disk into a clone sparsely and report its sha256.
    Copy {
        /// The source: a mounted folder holding `disk.img`, or a block device.
        #[arg(long)]
        source: PathBuf,
        /// The target, likewise.
        #[arg(long)]
        target: PathBuf,
        /// The source is a blank image: a folder without `disk.img` copies nothing.
        #[arg(long)]
        allow_missing_source: bool,
        /// The size the target should have, bytes (the clone's PVC request; rounded down to
        /// 1 MiB); at least the source's.
        #[arg(long, default_value_t = 0)]
        capacity: u64,
        /// Where the termination message goes.
        #[arg(long, default_value = "/dev/termination-log")]
        termination_log: PathBuf,
    },
    /// Inside a launcher Pod: exit 0 when QEMU runs the guest (the readiness probe).
    Probe {
        #[arg(long, default_value = launcher::RUN_DIR)]
        run_dir: PathBuf,
    },
    /// Inside a launcher Pod: attach stdin and stdout to the VM's serial console (what
    /// `kubectl vmkeep console` runs over an exec stream).
    Console {
        #[arg(long, default_value = launcher::RUN_DIR)]
        run_dir: PathBuf,
    },
    /// Print every CRD as YAML (or write one file per CRD into a folder).
    Crd {
        /// Write `<plural>.<group>.yaml` files into this folder instead of printing.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run {
            http_addr,
            log_format,
            launcher_image,
            pvc_access_mode,
            clone_strategy,
            runtime,
            concurrency,
            cpu_allocation_ratio,
            namespace,
            leader_elect,
            leader_election_namespace,
            leader_election_lease,
            identity,
            leader_election_seconds,
            webhook,
        } => {
            telemetry::init(log_format);
            let settings = controller::Settings {
                launcher_image,
                access_mode: pvc_access_mode,
                concurrency,
                namespace,
                clone_strategy: vmkeep::plan::clone::CloneStrategy::parse(&clone_strategy),
                runtime: match runtime.as_str() {
                    "kubevirt" => api::template::Runtime::Kubevirt,
                    "auto" => api::template::Runtime::Auto,
                    _ => api::template::Runtime::Launcher,
                },
                cpu_allocation_ratio,
            };
            let election = leader_elect.then(|| {
                let duration = Duration::from_secs(leader_election_seconds);
                leader::Election {
                    namespace: leader_election_namespace,
                    name: leader_election_lease,
                    identity: identity.unwrap_or_else(default_identity),
                    duration,
                    renew: duration / 3,
                }
            });
            let webhook = webhook.options()?;
            operator::run(operator::RunOptions { http_addr, settings, election, webhook }).await
        }
        Command::Launch {
            vm,
            cpu,
            memory_mib,
            disks,
            stop_timeout_seconds,
            qemu,
            kvm_device,
            run_dir,
            termination_log,
        } => {
            telemetry::init(telemetry::LogFormat::Text);
            let options = launcher::Options {
                vm,
                cpu,
                memory_mib,
                disks,
                stop_timeout: Duration::from_secs(stop_timeout_seconds),
                qemu,
                kvm_device,
                run_dir,
                termination_log,
            };
            std::process::exit(launcher::run(options).await)
        }
        Command::Import {
            url,
            target,
            format,
            sha256,
            capacity,
            scratch,
            headers_dir,
            ca_dir,
            probe,
            termination_log,
        } => {
            telemetry::init(telemetry::LogFormat::Text);
            let args = mover::import::ImportArgs {
                url,
                target: target.unwrap_or_default(),
                format,
                sha256,
                capacity,
                scratch,
                headers_dir,
                ca_dir,
                probe,
            };
            // Blocking I/O (the HTTP client, qemu-img) off the async workers.
            let code = tokio::task::spawn_blocking(move || mover::import::run(&args, &termination_log)).await;
            std::process::exit(code.unwrap_or(1))
        }
        Command::Copy { source, target, allow_missing_source, capacity, termination_log } => {
            telemetry::init(telemetry::LogFormat::Text);
            std::process::exit(mover::copy::run(&source, &target, allow_missing_source, capacity, &termination_log))
        }
        Command::Probe { run_dir } => launcher::probe(&run_dir).await,
        Command::Console { run_dir } => launcher::console::attach(&launcher::console_socket(&run_dir)).await,
        Command::Crd { dir } => write_crds(dir),
    }
}

/// The validating admission webhook (off unless `--webhook-addr` is given).
#[derive(Args)]
struct WebhookArgs {
    /// Serve the validating admission webhook over HTTPS here (`/validate`), e.g. 0.0.0.0:8443.
    #[arg(long, env = "VMKEEP_WEBHOOK_ADDR")]
    webhook_addr: Option<SocketAddr>,
    /// NAMESPACE/NAME of the Secret where vmkeep keeps the webhook's CA and serving certificate
    /// [default: $POD_NAMESPACE/vmkeep-webhook-tls].
    #[arg(long, value_parser = parse_namespaced, conflicts_with = "webhook_cert_dir")]
    webhook_secret: Option<(String, String)>,
    /// The ValidatingWebhookConfiguration whose caBundle vmkeep keeps up to date.
    #[arg(long, conflicts_with = "webhook_cert_dir")]
    webhook_config: Option<String>,
    /// The names the serving certificate is valid for (DNS names or IP addresses, comma
    /// separated): the webhook Service's `<service>.<namespace>.svc` names.
    #[arg(long, value_delimiter = ',', conflicts_with = "webhook_cert_dir")]
    webhook_dns_names: Vec<String>,
    /// Serve `tls.crt` and `tls.key` from this folder (e.g. a cert-manager Secret) instead of
    /// managing a certificate; they are reloaded when they change.
    #[arg(long)]
    webhook_cert_dir: Option<PathBuf>,
    /// Seconds between checks of the certificate (renewal, reload, caBundle).
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    webhook_cert_check_seconds: u64,
}

impl WebhookArgs {
    fn options(self) -> anyhow::Result<Option<webhook::Options>> {
        let Some(addr) = self.webhook_addr else { return Ok(None) };
        let certs = match self.webhook_cert_dir {
            Some(dir) => webhook::certs::Source::Files { dir },
            None => {
                anyhow::ensure!(
                    !self.webhook_dns_names.is_empty(),
                    "--webhook-dns-names is required with --webhook-addr (or give --webhook-cert-dir)"
                );
                let (namespace, name) = self.webhook_secret.unwrap_or_else(|| {
                    let namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".into());
                    (namespace, "vmkeep-webhook-tls".into())
                });
                webhook::certs::Source::Managed {
                    namespace,
                    name,
                    config: self.webhook_config,
                    dns_names: self.webhook_dns_names,
                }
            }
        };
        let check_every = Duration::from_secs(self.webhook_cert_check_seconds);
        Ok(Some(webhook::Options { addr, certs, check_every }))
    }
}

/// `--cpu-allocation-ratio`: a whole number of at least 1 (at most `u32::MAX`).
fn parse_cpu_allocation_ratio(arg: &str) -> Result<u32, String> {
    use std::num::IntErrorKind;
    match arg.trim().parse::<u32>() {
        Ok(0) => Err("must be at least 1 (vCPUs per requested CPU; 1 requests a whole CPU per vCPU)".into()),
        Ok(ratio) => Ok(ratio),
        Err(e) if *e.kind() == IntErrorKind::PosOverflow => Err(format!("'{arg}' is too large (at most {})", u32::MAX)),
        Err(_) => Err(format!(
            "'{arg}' is not a whole number of vCPUs per requested CPU (at least 1; KubeVirt's default is 10)"
        )),
    }
}

fn parse_namespaced(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('/') {
        Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((namespace.to_owned(), name.to_owned()))
        }
        _ => Err("expected NAMESPACE/NAME".into()),
    }
}

fn write_crds(dir: Option<PathBuf>) -> anyhow::Result<()> {
    for crd in api::crds() {
        let yaml = api::crd_yaml(&crd)?;
        match &dir {
            Some(dir) => {
                let path = dir.join(api::crd_file_name(&crd));
                std::fs::write(&path, yaml).with_context(|| format!("cannot write {}", path.display()))?;
            }
            None => print!("---\n{yaml}"),
        }
    }
    Ok(())
}

/// Outside a Pod: the host name and process id.
fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}
