//! `vmkeep launch`: what runs in a launcher Pod. It checks that every disk the controller
//! attached is present and holds them (the Pod's existence is what fences a persistent image)
//! until SIGTERM. Booting the disks with a hypervisor is later work; the Pod's contract (disks
//! at [`crate::plan::build::disk_path`], cpu and memory requests) is what it will build on.

use std::path::PathBuf;

use anyhow::bail;
use tracing::info;

pub async fn run(vm: &str, disks: &[(String, PathBuf)]) -> anyhow::Result<()> {
    // First of all: as PID 1 of its container, a signal without a handler is ignored, and a Pod
    // deleted while it starts would wait its whole grace period.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    for (name, path) in disks {
        if !path.exists() {
            bail!("disk {name} of VirtualMachine {vm} is not at {}", path.display());
        }
        info!(vm, disk = %name, path = %path.display(), "disk attached");
    }
    info!(vm, disks = disks.len(), "holding the VM's disks until SIGTERM");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    info!(vm, "stopped");
    Ok(())
}
