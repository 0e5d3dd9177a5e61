//! The test guest of `hack/guest.sh` (what the launcher tests will boot) boots by itself under
//! QEMU on this machine, reports its name and each disk's markers on the serial console, writes
//! its marker, and powers off on the ACPI power button pressed through QMP. No cluster needed.

mod support;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use support::{guest_image, repo};

fn root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// QEMU, killed if the test fails while it runs (it would keep the disks locked).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots `image` with a data disk, as the VM `name`; returns the console once the guest is ready
/// and after the power button (and how long each took).
fn boot(image: &Path, data: &Path, name: &str, dir: &Path) -> (String, Duration, Duration) {
    let console = dir.join(format!("{name}.console"));
    let qmp = dir.join(format!("{name}.qmp"));
    // Left from an earlier run, these would be read before QEMU opens them anew.
    let _ = std::fs::remove_file(&qmp);
    let _ = std::fs::remove_file(&console);
    let drive = |path: &Path, id: &str| format!("file={},format=raw,if=none,id={id}", path.display());
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", "-m", "256"])
        .args(["-smbios", &format!("type=1,serial={name}")])
        .args(["-serial", &format!("file:{}", console.display())])
        .args(["-qmp", &format!("unix:{},server=on,wait=off", qmp.display())])
        .args(["-drive", &drive(image, "d0"), "-device", "virtio-blk-pci,drive=d0,bootindex=1"])
        .args(["-drive", &drive(data, "d1"), "-device", "virtio-blk-pci,drive=d1"])
        .stdin(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .expect("cannot start qemu-system-x86_64");
    let started = Instant::now();
    let read = || String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).into_owned();
    while !read().contains("vmkeep-guest: ready") {
        assert!(qemu.0.try_wait().expect("wait").is_none(), "QEMU exited:\n{}", read());
        assert!(started.elapsed() < Duration::from_secs(120), "the guest was not ready in 120 s:\n{}", read());
        std::thread::sleep(Duration::from_millis(200));
    }
    let booted = started.elapsed();
    let stream = UnixStream::connect(&qmp).expect("QMP socket");
    let mut replies = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    replies.read_line(&mut line).expect("QMP greeting");
    let send = |command: &str| writeln!(&stream, "{{\"execute\": \"{command}\"}}").expect("QMP write");
    send("qmp_capabilities");
    let pressed = Instant::now();
    send("system_powerdown");
    // Pressed again every 5 s, as the launcher does: a press right at "ready" can come before
    // the guest listens for the button (seen once in CI).
    let mut last_press = Instant::now();
    let status = loop {
        if let Some(status) = qemu.0.try_wait().expect("wait") {
            break status;
        }
        assert!(pressed.elapsed() < Duration::from_secs(30), "the guest ignored the power button:\n{}", read());
        if last_press.elapsed() >= Duration::from_secs(5) {
            send("system_powerdown");
            last_press = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "QEMU exited with {status}");
    (read(), booted, pressed.elapsed())
}

#[test]
fn the_test_guest_boots_marks_its_disks_and_powers_off_on_the_button() {
    if !root() {
        eprintln!("skipped: hack/guest.sh installs Debian packages (needs root)");
        return;
    }
    let built = guest_image();
    let dir = repo().join("target/e2e-guest");
    std::fs::create_dir_all(&dir).expect("folder");
    // A copy: the boot disk is writable for the guest, and the cached image stays as built.
    let image = dir.join("guest.img");
    std::fs::copy(built, &image).expect("copy the guest image");
    let data = dir.join("data.img");
    std::fs::write(&data, vec![0u8; 16 << 20]).expect("a blank data disk");

    let (console, booted, stopped) = boot(&image, &data, "vm-a", &dir);
    eprintln!(
        "vm-a: ready after {:.1} s, off {:.2} s after the power button",
        booted.as_secs_f64(),
        stopped.as_secs_f64()
    );
    for line in
        ["vmkeep-guest: up as vm-a", "disk vdb markers: none", "disk vdb marked vm-a", "power button, shutting down"]
    {
        assert!(console.contains(line), "no '{line}' on the console:\n{console}");
    }
    // The marker is on the disk, and the next guest sees it (what a persistent disk keeps).
    let (console, _, _) = boot(&image, &data, "vm-b", &dir);
    assert!(console.contains("disk vdb markers: vm-a"), "vm-b did not see vm-a's marker:\n{console}");
    assert!(console.contains("disk vdb marked vm-b"), "{console}");
}
