//! The operator under test: `vmkeep run` as a child process, its `/metrics`, and what the
//! kernel says about its memory and CPU.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// A running `vmkeep run`.
pub struct Operator {
    child: Child,
    pub http: SocketAddr,
    pub log: PathBuf,
}

/// What the kernel accounted to the process.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// Peak resident set size (VmHWM), KiB.
    pub peak_rss_kib: u64,
    /// Resident set size now (VmRSS), KiB.
    pub rss_kib: u64,
    /// User + system CPU time, seconds.
    pub cpu_seconds: f64,
}

impl Usage {
    pub fn json(&self) -> Value {
        json!({
            "peak_rss_kib": self.peak_rss_kib,
            "peak_rss_mib": mib(self.peak_rss_kib),
            "rss_kib": self.rss_kib,
            "cpu_seconds": round3(self.cpu_seconds),
        })
    }
}

pub fn mib(kib: u64) -> f64 {
    round3(kib as f64 / 1024.0)
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The operator's counters and gauges, by full sample name (`name{labels}`).
#[derive(Clone, Debug, Default)]
pub struct Metrics(pub BTreeMap<String, f64>);

impl Metrics {
    /// The sum of the samples of `family` whose labels contain `filter`.
    pub fn sum(&self, family: &str, filter: &str) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| (k.as_str() == family || k.starts_with(&format!("{family}{{"))) && k.contains(filter))
            .fold(0.0, |sum, (_, v)| sum + v)
    }

    /// `self - before` for every counter, zeros left out.
    pub fn since(&self, before: &Metrics) -> BTreeMap<String, f64> {
        self.0
            .iter()
            .filter(|(k, _)| k.contains("_total") && !k.contains("_bucket"))
            .map(|(k, v)| (k.clone(), v - before.0.get(k).copied().unwrap_or_default()))
            .filter(|(_, v)| *v != 0.0)
            .collect()
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Operator {
    /// Starts `vmkeep run` for `namespace` with the given kubeconfig; its output goes to `log`.
    /// The figures are those of the csi-clone path (most CSI storage); where storage cannot
    /// clone, a copy adds four writes per clone (docs/clones.md).
    pub fn start(
        binary: &Path,
        kubeconfig: &Path,
        namespace: &str,
        concurrency: u16,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        Self::start_with(binary, kubeconfig, namespace, concurrency, &["--clone-strategy", "csi-clone"], log)
    }

    /// [`Operator::start`] with the operator's other settings `args` (e.g. `--cpu-allocation-ratio`).
    pub fn start_with(
        binary: &Path,
        kubeconfig: &Path,
        namespace: &str,
        concurrency: u16,
        args: &[&str],
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new(binary)
            .args(["run", "--http-addr", &http.to_string(), "--namespace", namespace])
            .args(["--concurrency", &concurrency.to_string()])
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .env_remove("VMKEEP_LEADER_ELECT")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {} (build it: cargo build --release)", binary.display()))?;
        Ok(Self { child, http, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `/readyz` answers 200 (CRDs established, controllers starting).
    pub async fn ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("vmkeep exited with {status}; see {}", self.log.display());
            }
            if http_get(self.http, "/readyz").await.is_some_and(|(code, _)| code == 200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("vmkeep not ready after {timeout:?}; see {}", self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The operator's `/metrics`, if it answers.
    pub async fn metrics(&self) -> Option<Metrics> {
        let (code, body) = http_get(self.http, "/metrics").await?;
        if code != 200 {
            return None;
        }
        let samples = body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect();
        Some(Metrics(samples))
    }

    /// Memory and CPU of the process now (from `/proc`).
    pub fn usage(&self) -> anyhow::Result<Usage> {
        usage(self.pid())
    }

    /// Reads the usage, then stops the process (SIGTERM, SIGKILL after 30 s).
    pub async fn stop(mut self) -> anyhow::Result<Usage> {
        let usage = self.usage()?;
        let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(usage)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// VmHWM, VmRSS (`/proc/<pid>/status`) and utime + stime (`/proc/<pid>/stat`).
pub fn usage(pid: u32) -> anyhow::Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("read /proc/<pid>/status")?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse().ok())
            .unwrap_or_default()
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).context("read /proc/<pid>/stat")?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After ")": state is field 3, so utime (14) and stime (15) are at indices 11 and 12.
    let ticks: u64 = fields.get(11..13).into_iter().flatten().filter_map(|f| f.parse::<u64>().ok()).sum();
    Ok(Usage {
        peak_rss_kib: field("VmHWM:"),
        rss_kib: field("VmRSS:"),
        cpu_seconds: ticks as f64 / clock_ticks() as f64,
    })
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// [`vmkeep::health::probe`] off the async threads.
async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || vmkeep::health::probe(addr, &path)).await.ok().flatten()
}
