//! The hack/ scripts' safety rules, without a cluster: nothing here touches the running local
//! cluster, its state folder, its ports or its processes. Every script runs with HOME,
//! VMKEEP_CACHE and VMKEEP_CLUSTER_DIR in a temporary folder of its own, with no node.
//!
//! - pid files (hack/lib.sh `proc_start`, `proc_check`, `proc_stop`): a process is signalled
//!   only when it is verifiably the one a script started (boot, start time, command line); a pid
//!   file written by hand, a reused pid, a process of another cluster are left alone and named;
//!   an older script's pid file (no identity) is accepted only for the very binary that script
//!   launched with this cluster's state folder;
//! - ports (`ports_free`, `hack/cluster.sh up`): a port in use stops `up` before it starts
//!   anything, naming the holder and the variable that moves the port;
//! - `hack/cluster.sh down` stops and keeps the data, `reset` forgets it but never the cache
//!   (the Kubernetes build, the tools, the images), `hack/run.sh stop` never wipes and stops only
//!   a cluster it started;
//! - where cargo builds (`cargo_target_dir`, `cargo_bin`): CARGO_TARGET_DIR is honoured, and no
//!   script names a fixed `target/` folder.

use std::{
    ffi::OsString,
    net::TcpListener,
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread::sleep,
    time::{Duration, Instant},
};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A temporary folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vmkeep-scripts-{}-{}-{what}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a temporary folder");
        Self(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A local cluster's folders, all inside a temporary folder: HOME, the cache (with a fake
/// Kubernetes build, so that no step can ever build or start the real thing) and the state.
struct Sandbox {
    tmp: TempDir,
}

impl Sandbox {
    fn new(what: &str) -> Self {
        let tmp = TempDir::new(what);
        let sandbox = Self { tmp };
        for dir in [
            sandbox.home(),
            sandbox.state(),
            sandbox.bin(),
            sandbox.cache().join("images"),
            sandbox.cache().join("tools/bin"),
        ] {
            std::fs::create_dir_all(dir).expect("mkdir");
        }
        // `built` in hack/cluster.sh: every binary there, and the patches' checksum.
        for name in ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy"] {
            write_exec(&sandbox.bin().join(name), "#!/bin/sh\nexit 1\n");
        }
        let sum = run(Command::new("bash")
            .arg("-c")
            .arg("cat \"$REPO\"/hack/k8s-patches/*.patch | sha256sum | cut -d' ' -f1")
            .env("REPO", repo()));
        assert!(sum.status.success(), "patches checksum: {}", show(&sum));
        std::fs::write(sandbox.bin().join("patches.sha256"), &sum.stdout).expect("write patches.sha256");
        std::fs::write(sandbox.cache().join("images/layout"), "an image layout").expect("write");
        std::fs::write(sandbox.cache().join("tools/bin/kubectl"), "a tool").expect("write");
        sandbox
    }
    fn home(&self) -> PathBuf {
        self.tmp.path().join("home")
    }
    fn cache(&self) -> PathBuf {
        self.tmp.path().join("cache")
    }
    fn state(&self) -> PathBuf {
        self.cache().join("cluster")
    }
    /// `$CACHE/k8s-<version>/bin` as hack/cluster.sh names it.
    fn bin(&self) -> PathBuf {
        let script = std::fs::read_to_string(repo().join("hack/cluster.sh")).expect("read hack/cluster.sh");
        let version = script
            .lines()
            .find_map(|l| l.strip_prefix("K8S_VERSION="))
            .expect("K8S_VERSION= in hack/cluster.sh")
            .trim();
        self.cache().join(format!("k8s-{version}/bin"))
    }
    /// A hack/ script (or `bash -c` with hack/lib.sh sourced) in this sandbox only.
    fn command(&self, args: &[&str]) -> Command {
        for dir in [self.cache(), self.state()] {
            assert!(dir.starts_with(self.tmp.path()), "{} is outside the sandbox", dir.display());
        }
        let mut cmd = Command::new("bash");
        cmd.args(args)
            .current_dir(repo())
            .env("HOME", self.home())
            .env("VMKEEP_CACHE", self.cache())
            .env("VMKEEP_CLUSTER_DIR", self.state())
            .env("VMKEEP_CLUSTER_NODE", "0")
            .env("VMKEEP_BRIDGE", "vmkeep-none")
            .env("STATE", self.state())
            .env("LIB", repo().join("hack/lib.sh"))
            .env_remove("KUBECONFIG")
            .env_remove("VMKEEP_HTTP_ADDR")
            .stdin(Stdio::null());
        cmd
    }
    /// `bash -c SCRIPT` with hack/lib.sh sourced (LOG_PREFIX=test).
    fn lib(&self, script: &str) -> Command {
        self.command(&["-c", &format!("set -euo pipefail; LOG_PREFIX=test; source \"$LIB\"\n{script}")])
    }
}

fn write_exec(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn run(cmd: &mut Command) -> Output {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    wait_output(child, Duration::from_secs(120))
}

/// Waits for a command, killing it after `limit` (a test must not hang on a script).
fn wait_output(mut child: Child, limit: Duration) -> Output {
    let end = Instant::now() + limit;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!("command ran for more than {limit:?}: {}", show(&out));
        }
        sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("wait")
}

fn show(out: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Field 22 of /proc/PID/stat (its start time), None when the process is gone or a zombie.
fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    fields.get(19).map(|s| (*s).to_owned())
}

fn running(pid: u32) -> bool {
    start_time(pid).is_some()
}

fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        sleep(Duration::from_millis(50));
    }
}

/// A process the test started itself (a child), killed on drop.
struct Proc(Child);

impl Proc {
    fn spawn(program: impl AsRef<std::ffi::OsStr>, args: &[&std::ffi::OsStr]) -> Self {
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let proc = Self(child);
        // Until it has exec'd, its command line is the test's.
        let me = std::fs::read(format!("/proc/{}/cmdline", std::process::id())).expect("own cmdline");
        assert!(
            eventually(Duration::from_secs(5), || std::fs::read(format!("/proc/{}/cmdline", proc.pid()))
                .is_ok_and(|c| c != me)),
            "the child never exec'd"
        );
        proc
    }
    fn sleep() -> Self {
        Self::spawn("sleep", &["300".as_ref()])
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
    /// Still running after a while (not signalled).
    fn still_running(&mut self) -> bool {
        sleep(Duration::from_millis(300));
        self.0.try_wait().expect("try_wait").is_none()
    }
    /// Ended by SIGTERM within a few seconds.
    fn terminated(&mut self) -> bool {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status.signal() == Some(libc::SIGTERM);
            }
            if Instant::now() > end {
                return false;
            }
            sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process started through `proc_start` (detached: not our child), killed on drop if it is
/// still that process.
struct Detached {
    pid: u32,
    start: Option<String>,
}

impl Detached {
    fn new(pid: u32) -> Self {
        Self { pid, start: start_time(pid) }
    }
    fn gone_within(&self, limit: Duration) -> bool {
        eventually(limit, || start_time(self.pid) != self.start)
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if self.start.is_some() && start_time(self.pid) == self.start {
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
    }
}

fn parse_pid(out: &Output) -> u32 {
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid printed: {}", show(out)))
}

/// `proc_start` in the sandbox: starts COMMAND (bash words) as PIDFILE; returns its pid.
fn proc_start(sandbox: &Sandbox, pidfile: &str, command: &str) -> Detached {
    let out = run(&mut sandbox
        .lib(&format!("proc_start \"$STATE/{pidfile}\" \"$STATE/{pidfile}.log\" {command}\ncat \"$STATE/{pidfile}\"")));
    assert!(out.status.success(), "proc_start: {}", show(&out));
    let proc = Detached::new(parse_pid(&out));
    assert!(running(proc.pid), "{command} does not run");
    proc
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

#[test]
fn a_pid_file_written_by_hand_does_not_get_its_process_signalled() {
    let sandbox = Sandbox::new("foreign");
    let mut victim = Proc::sleep();
    std::fs::write(sandbox.state().join("etcd.pid"), format!("{}\n", victim.pid())).expect("write pid file");

    let out = run(&mut sandbox.lib("proc_stop \"$STATE/etcd.pid\""));
    assert!(out.status.success(), "{}", show(&out));
    assert!(victim.still_running(), "proc_stop signalled pid {} that it did not start", victim.pid());
    let said = stderr(&out);
    assert!(said.contains(&format!("not signalling pid {}", victim.pid())), "proc_stop did not say so: {said}");
    assert!(said.contains("records no identity"), "no reason given: {said}");
}

#[test]
fn a_pid_file_is_trusted_only_while_its_identity_matches() {
    let sandbox = Sandbox::new("identity");
    // A pid file naming the test's `sleep`, its identity forged with one field off.
    let forge = |victim: &Proc, start_offset: i64, cmdline: &str| {
        sandbox.lib(&format!(
            "pid={pid}; start=$(proc_starttime $pid)\n\
             sum={cmdline}\n\
             printf 'boot=%s\\nstart=%s\\ncmdline=%s\\n' \"$(proc_boot)\" $((start + {start_offset})) \"$sum\" >\"$STATE/x.pid.id\"\n\
             echo $pid >\"$STATE/x.pid\"\n\
             proc_stop \"$STATE/x.pid\"",
            pid = victim.pid()
        ))
    };
    // Another start time: the pid was reused by another process.
    let mut victim = Proc::sleep();
    let out = run(&mut forge(&victim, 1, "$(proc_cmdline_sum $pid)"));
    assert!(out.status.success(), "{}", show(&out));
    assert!(victim.still_running(), "signalled a process that started after the one recorded");
    assert!(stderr(&out).contains("the pid was reused"), "{}", show(&out));
    // Another command line.
    let out = run(&mut forge(&victim, 0, "$(argv_sum sleep 301)"));
    assert!(out.status.success(), "{}", show(&out));
    assert!(victim.still_running(), "signalled a process whose command line is not the recorded one");
    assert!(stderr(&out).contains("command line is not the one recorded"), "{}", show(&out));
    // The true identity: signalled.
    let out = run(&mut forge(&victim, 0, "$(proc_cmdline_sum $pid)"));
    assert!(out.status.success(), "{}", show(&out));
    assert!(victim.terminated(), "did not stop the process its identity names: {}", show(&out));
    assert!(!sandbox.state().join("x.pid").exists() && !sandbox.state().join("x.pid.id").exists(), "pid files left");
}

#[test]
fn a_process_started_through_the_helper_is_stopped_and_killed_when_it_ignores_sigterm() {
    let sandbox = Sandbox::new("started");
    let proc = proc_start(&sandbox, "a.pid", "sleep 300");
    let id = std::fs::read_to_string(sandbox.state().join("a.pid.id")).expect("a.pid.id");
    assert!(
        id.contains(&format!("start={}", proc.start.as_deref().unwrap_or("?"))),
        "identity without its start time: {id}"
    );

    let out = run(&mut sandbox.lib("proc_alive \"$STATE/a.pid\" && echo alive"));
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("alive"), "not ours: {}", show(&out));
    let out = run(&mut sandbox.lib("proc_stop \"$STATE/a.pid\""));
    assert!(out.status.success(), "{}", show(&out));
    assert!(proc.gone_within(Duration::from_secs(10)), "proc_stop left pid {} running: {}", proc.pid, show(&out));
    assert!(!stderr(&out).contains("not signalling"), "{}", show(&out));

    // One that ignores SIGTERM: SIGKILL after PROC_STOP_TIMEOUT.
    write_exec(&sandbox.state().join("stubborn.sh"), "trap '' TERM\nwhile :; do sleep 0.2; done\n");
    let stubborn = proc_start(&sandbox, "b.pid", "bash \"$STATE/stubborn.sh\"");
    let out = run(&mut sandbox.lib("PROC_STOP_TIMEOUT=1 proc_stop \"$STATE/b.pid\""));
    assert!(out.status.success(), "{}", show(&out));
    assert!(stubborn.gone_within(Duration::from_secs(5)), "still running after SIGKILL: {}", show(&out));
    assert!(stderr(&out).contains("SIGKILL"), "{}", show(&out));
}

#[test]
fn a_busy_port_is_refused_naming_the_variable_that_moves_it() {
    let sandbox = Sandbox::new("port");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let check = format!("ports_free VMKEEP_ETCD_PORT={port}");

    let out = run(&mut sandbox.lib(&check));
    assert!(!out.status.success(), "port {port} is taken, yet ports_free passed: {}", show(&out));
    let said = stderr(&out);
    assert!(said.contains(&format!("port {port} is in use by pid {}", std::process::id())), "holder not named: {said}");
    assert!(said.contains("set VMKEEP_ETCD_PORT to a free port"), "variable not named: {said}");

    drop(listener);
    let out = run(&mut sandbox.lib(&check));
    assert!(out.status.success(), "port {port} is free, yet ports_free failed: {}", show(&out));
}

#[test]
fn cluster_up_stops_at_a_busy_port_before_starting_anything() {
    let sandbox = Sandbox::new("up");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut up = sandbox.command(&["hack/cluster.sh", "up"]);
    up.env("VMKEEP_ETCD_PORT", port.to_string())
        .env("VMKEEP_ETCD_PEER_PORT", free_port().to_string())
        .env("VMKEEP_API_PORT", free_port().to_string());
    let out = run(&mut up);
    drop(listener);
    assert!(!out.status.success(), "up went on with its etcd port taken: {}", show(&out));
    let said = stderr(&out);
    assert!(said.contains(&format!("port {port} is in use")), "{}", show(&out));
    assert!(said.contains("set VMKEEP_ETCD_PORT to a free port"), "{}", show(&out));
    assert!(!said.contains("starting etcd"), "started etcd anyway: {}", show(&out));
    assert!(!sandbox.state().join("etcd.pid").exists(), "an etcd pid file exists");
}

#[test]
fn down_stops_and_keeps_the_data_and_reset_forgets_it_but_not_the_cache() {
    let sandbox = Sandbox::new("down");
    let state = sandbox.state();
    std::fs::create_dir_all(state.join("etcd/member")).expect("mkdir");
    std::fs::write(state.join("etcd/member/db"), "the cluster's objects").expect("write");
    std::fs::write(state.join("ready"), "").expect("write");

    let etcd = proc_start(&sandbox, "etcd.pid", "sleep 300");
    let out = run(&mut sandbox.command(&["hack/cluster.sh", "down"]));
    assert!(out.status.success(), "down: {}", show(&out));
    assert!(etcd.gone_within(Duration::from_secs(10)), "down left its etcd running: {}", show(&out));
    assert!(state.join("etcd/member/db").exists(), "down forgot the data: {}", show(&out));
    assert!(!state.join("ready").exists(), "down left the ready mark");

    let api = proc_start(&sandbox, "kube-apiserver.pid", "sleep 300");
    // Of the volumes recorded for it, reset removes those of the host-path provisioner only.
    let precious = sandbox.tmp.path().join("precious");
    std::fs::create_dir_all(&precious).expect("mkdir");
    std::fs::write(
        state.join("hostpath-volumes"),
        format!("{}\n/tmp/hostpath_pv/../../{}\n", precious.display(), precious.display()),
    )
    .expect("write");
    let out = run(&mut sandbox.command(&["hack/cluster.sh", "reset"]));
    assert!(out.status.success(), "reset: {}", show(&out));
    assert!(api.gone_within(Duration::from_secs(10)), "reset left the API server running: {}", show(&out));
    assert!(!state.exists(), "reset kept {}", state.display());
    assert!(precious.exists(), "reset removed {}, which is no host-path volume", precious.display());
    for kept in [
        sandbox.bin().join("kube-apiserver"),
        sandbox.bin().join("patches.sha256"),
        sandbox.cache().join("images/layout"),
        sandbox.cache().join("tools/bin/kubectl"),
    ] {
        assert!(kept.exists(), "reset removed {} from the cache", kept.display());
    }
}

#[test]
fn reset_refuses_to_wipe_the_cache_or_a_folder_another_process_uses() {
    let sandbox = Sandbox::new("reset");
    // The cluster's folder set to the cache itself.
    let out = run(sandbox.command(&["hack/cluster.sh", "reset"]).env("VMKEEP_CLUSTER_DIR", sandbox.cache()));
    assert!(!out.status.success(), "reset wiped the cache: {}", show(&out));
    assert!(stderr(&out).contains("refusing to wipe"), "{}", show(&out));
    assert!(
        sandbox.bin().join("kube-apiserver").exists() && sandbox.cache().join("images/layout").exists(),
        "the cache was touched"
    );
    // A folder that holds the cache.
    let out = run(sandbox.command(&["hack/cluster.sh", "reset"]).env("VMKEEP_CLUSTER_DIR", sandbox.tmp.path()));
    assert!(!out.status.success(), "reset wiped a folder holding the cache: {}", show(&out));
    assert!(stderr(&out).contains("the cache"), "{}", show(&out));
    assert!(
        sandbox.bin().join("kube-apiserver").exists() && sandbox.cache().join("images/layout").exists(),
        "the cache was touched"
    );

    // A process this script did not start uses the state folder.
    std::fs::write(sandbox.state().join("etcd.log"), "").expect("write");
    let mut user = Proc::spawn("tail", &["-f".as_ref(), sandbox.state().join("etcd.log").as_os_str()]);
    let out = run(&mut sandbox.command(&["hack/cluster.sh", "reset"]));
    assert!(!out.status.success(), "reset wiped a folder pid {} uses: {}", user.pid(), show(&out));
    assert!(stderr(&out).contains(&format!("pid {} still uses", user.pid())), "{}", show(&out));
    assert!(sandbox.state().join("etcd.log").exists(), "the state was wiped");
    assert!(user.still_running(), "reset signalled a process it did not start");
}

#[test]
fn an_older_scripts_pid_file_is_accepted_only_for_this_clusters_own_binary() {
    let sandbox = Sandbox::new("legacy");
    let state = sandbox.state();
    let other = sandbox.tmp.path().join("other-cluster");
    std::fs::create_dir_all(&other).expect("mkdir");
    let tail = ["/usr/bin/tail", "/bin/tail"].into_iter().find(|p| Path::new(p).exists()).expect("tail");
    for name in ["kube-apiserver", "kube-controller-manager"] {
        std::fs::copy(tail, sandbox.bin().join(name)).expect("copy tail");
    }
    std::fs::write(state.join("kube-apiserver.log"), "").expect("write");
    std::fs::write(other.join("kcm.log"), "").expect("write");

    // What an older hack/cluster.sh left: pid files with the pid alone.
    let mut ours = Proc::spawn(
        sandbox.bin().join("kube-apiserver"),
        &["-f".as_ref(), state.join("kube-apiserver.log").as_os_str()],
    );
    let mut other_clusters =
        Proc::spawn(sandbox.bin().join("kube-controller-manager"), &["-f".as_ref(), other.join("kcm.log").as_os_str()]);
    let mut stranger = Proc::sleep();
    for (name, proc) in [("kube-apiserver", &ours), ("kube-controller-manager", &other_clusters), ("etcd", &stranger)] {
        std::fs::write(state.join(format!("{name}.pid")), format!("{}\n", proc.pid())).expect("write pid file");
    }

    let out = run(&mut sandbox.command(&["hack/cluster.sh", "down"]));
    assert!(out.status.success(), "down: {}", show(&out));
    assert!(ours.terminated(), "the cluster's own API server (older pid file) was not stopped: {}", show(&out));
    assert!(other_clusters.still_running(), "stopped another cluster's process: {}", show(&out));
    assert!(stranger.still_running(), "stopped a process that is not the cluster's: {}", show(&out));
    let said = stderr(&out);
    for proc in [&other_clusters, &stranger] {
        assert!(said.contains(&format!("not signalling pid {}", proc.pid())), "pid {} not named: {said}", proc.pid());
    }
}

#[test]
fn run_stop_stops_only_what_it_started_and_never_wipes() {
    let sandbox = Sandbox::new("run");
    let state = sandbox.state();
    let run_dir = sandbox.cache().join("run");
    std::fs::create_dir_all(&run_dir).expect("mkdir");
    std::fs::create_dir_all(state.join("etcd/member")).expect("mkdir");
    std::fs::write(state.join("etcd/member/db"), "the cluster's objects").expect("write");
    std::fs::write(state.join("ready"), "").expect("write");

    // A cluster it did not start, and a vmkeep.pid naming someone else's process.
    let etcd = proc_start(&sandbox, "etcd.pid", "sleep 300");
    let api = proc_start(&sandbox, "kube-apiserver.pid", "sleep 300");
    let mut stranger = Proc::sleep();
    std::fs::write(run_dir.join("vmkeep.pid"), format!("{}\n", stranger.pid())).expect("write");
    let out = run(&mut sandbox.command(&["hack/run.sh", "stop"]));
    assert!(out.status.success(), "{}", show(&out));
    assert!(stranger.still_running(), "run.sh stop signalled a process it did not start");
    let said = stderr(&out);
    assert!(said.contains(&format!("not signalling pid {}", stranger.pid())), "{said}");
    assert!(said.contains("left the local cluster running"), "{said}");
    assert!(running(etcd.pid) && running(api.pid), "run.sh stop stopped a cluster it did not start");

    // The cluster it started (its API server is the one recorded): stopped, data kept.
    std::fs::copy(state.join("kube-apiserver.pid.id"), run_dir.join("cluster.started")).expect("copy");
    let out = run(&mut sandbox.command(&["hack/run.sh", "stop"]));
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        etcd.gone_within(Duration::from_secs(10)) && api.gone_within(Duration::from_secs(10)),
        "cluster left running: {}",
        show(&out)
    );
    assert!(state.join("etcd/member/db").exists(), "run.sh stop wiped the cluster's data: {}", show(&out));
}

#[test]
fn cargo_target_dir_is_where_cargo_builds() {
    let tmp = TempDir::new("target");
    let cargo_dir = Path::new(env!("CARGO")).parent().expect("cargo's folder").to_owned();
    let path = std::env::join_paths(
        std::iter::once(cargo_dir).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .expect("PATH");
    let resolve = |target_dir: Option<&std::ffi::OsStr>, path: &OsString| -> String {
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg("set -euo pipefail; LOG_PREFIX=test; source hack/lib.sh; cargo_target_dir; cargo_bin debug vmkeep")
            .current_dir(repo())
            .env("PATH", path)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET");
        if let Some(dir) = target_dir {
            cmd.env("CARGO_TARGET_DIR", dir);
        }
        let out = run(&mut cmd);
        assert!(out.status.success(), "{}", show(&out));
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let elsewhere = tmp.path().join("elsewhere");
    assert_eq!(
        resolve(Some(elsewhere.as_os_str()), &path),
        format!("{0}\n{0}/debug/vmkeep\n", elsewhere.display()),
        "CARGO_TARGET_DIR not honoured"
    );
    assert_eq!(
        resolve(Some("relative/t".as_ref()), &path),
        format!("{0}/relative/t\n{0}/relative/t/debug/vmkeep\n", repo().display()),
        "a relative CARGO_TARGET_DIR is the workspace's"
    );
    assert_eq!(resolve(None, &path), format!("{0}/target\n{0}/target/debug/vmkeep\n", repo().display()));
    // Without cargo on PATH: CARGO_TARGET_DIR still.
    assert_eq!(
        resolve(Some(elsewhere.as_os_str()), &OsString::from("/usr/bin:/bin")),
        format!("{0}\n{0}/debug/vmkeep\n", elsewhere.display())
    );
}

#[test]
fn no_script_names_a_fixed_target_folder() {
    let mut found = Vec::new();
    let mut users = Vec::new();
    for entry in std::fs::read_dir(repo().join("hack")).expect("read hack/") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "sh") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let name = path.file_name().expect("name").to_string_lossy().into_owned();
        if text.contains("cargo_bin ") || text.contains("cargo_target_dir") {
            users.push(name.clone());
        }
        for (i, line) in text.lines().enumerate() {
            let code = line.trim_start();
            // Comments, and the older scripts' paths the pid checks recognise.
            if code.starts_with('#') || code.contains("legacy") {
                continue;
            }
            if ["target/debug", "target/release", "target/bench", "PWD/target"].iter().any(|t| code.contains(t)) {
                found.push(format!("hack/{name}:{}: {line}", i + 1));
            }
        }
    }
    assert!(found.is_empty(), "use cargo_bin / cargo_target_dir (hack/lib.sh) instead:\n{}", found.join("\n"));
    for script in ["run.sh", "images.sh", "image.sh", "bench-data.sh", "test.sh"] {
        assert!(users.iter().any(|u| u == script), "hack/{script} no longer asks cargo where it builds");
    }
}
