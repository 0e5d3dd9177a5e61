//! Image data that really moves, on the local node: imports over HTTP (raw, qcow2, gzip) from a
//! server inside the test, copies of images, saving a VM disk as an image, and the seed's
//! promise end to end with a real guest: changes to a non-persistent image die with the VM,
//! changes to a persistent one survive it.
//!
//! The server listens on the node's address (the bridge of `hack/cluster.sh`), which the
//! importer Pods reach; nothing leaves this machine. Local cluster only (skipped, saying so,
//! elsewhere), one test at a time (the node has 2 CPUs; each VM asks for 1).

mod support;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use support::{env::*, node::*, *};
use vmkeep::{
    api::{
        Image,
        image::{ImagePhase, ImageStatus},
        virtual_machine::VirtualMachinePhase as P,
    },
    plan::names,
};

/// How long an import of a few MiB may take (the importer Pod starts, downloads, converts).
const IMPORT: Duration = Duration::from_secs(120);

static NODE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What the test server answers for one path.
#[derive(Clone)]
enum Reply {
    /// The body, at most `rate` bytes per second when set.
    Body { data: Arc<Vec<u8>>, rate: Option<usize> },
    /// `500 Internal Server Error` this many more times, then the body.
    FailThen { failures: Arc<AtomicU32>, data: Arc<Vec<u8>> },
}

/// An HTTP/1.1 server on the node's address, in a thread; unknown paths answer 404.
struct Server {
    base: String,
}

impl Server {
    fn start(routes: BTreeMap<String, Reply>) -> Self {
        let node = node_address();
        let listener = TcpListener::bind((node.as_str(), 0)).expect("bind the test server on the node's address");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let routes = Arc::new(routes);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let routes = routes.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &routes);
                });
            }
        });
        Server { base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base)
    }
}

fn serve(stream: TcpStream, routes: &BTreeMap<String, Reply>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_owned();
    let mut out = stream;
    let (status, data, rate) = match routes.get(&path) {
        None => ("404 Not Found", Arc::new(b"not found\n".to_vec()), None),
        Some(Reply::Body { data, rate }) => ("200 OK", data.clone(), *rate),
        Some(Reply::FailThen { failures, data }) => {
            if failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                ("500 Internal Server Error", Arc::new(b"try again\n".to_vec()), None)
            } else {
                ("200 OK", data.clone(), None)
            }
        }
    };
    write!(out, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", data.len())?;
    match rate {
        None => out.write_all(&data)?,
        Some(rate) => {
            for chunk in data.chunks(rate / 10) {
                out.write_all(chunk)?;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    out.flush()
}

/// The node's InternalIP (on the local cluster, its bridge address): reachable from Pods.
fn node_address() -> String {
    let jsonpath = "jsonpath={.items[0].status.addresses[?(@.type==\"InternalIP\")].address}";
    let address = kubectl_ok(&["get", "nodes", "-o", jsonpath], None);
    assert!(!address.trim().is_empty(), "the node has no InternalIP");
    address.trim().to_owned()
}

/// A disk of `mib` MiB: pseudo-random data in every other MiB, zeros between (a sparse disk).
fn fixture(mib: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; mib << 20];
    let mut x = seed | 1;
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        if i % 2 == 0 {
            for b in chunk.iter_mut().take(64 << 10) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
    }
    data
}

fn sha256(data: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// `data` through `command` (e.g. `gzip -c`, `qemu-img convert`), via files.
fn convert(data: &[u8], args: &[&str]) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("vmkeep-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (input, output) = (dir.join("in"), dir.join("out"));
    std::fs::write(&input, data).expect("write fixture");
    let args: Vec<String> = args
        .iter()
        .map(|a| a.replace("{in}", &input.display().to_string()).replace("{out}", &output.display().to_string()))
        .collect();
    let status = std::process::Command::new("sh").arg("-c").arg(args.join(" ")).status().expect("sh");
    assert!(status.success(), "{args:?} failed");
    let out = std::fs::read(&output).expect("converted");
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// An Image imported from `url`; `spec` and `http` add fields (ending in `, ` / starting with `, `).
fn http_image(name: &str, url: &str, spec: &str, http: &str) -> String {
    format!(
        "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {{name: {name}}}\n\
         spec: {{{spec}source: {{http: {{url: '{url}'{http}}}}}}}\n---\n"
    )
}

fn status(image: &Image) -> ImageStatus {
    image.status.clone().unwrap_or_default()
}

async fn wait_phase(env: &Env, name: &str, phase: ImagePhase) -> ImageStatus {
    let deadline = Instant::now() + IMPORT;
    let mut last = None;
    while Instant::now() < deadline {
        last = env.api::<Image>().get(name).await.ok().map(|i| status(&i));
        if let Some(s) = &last
            && s.phase == Some(phase)
        {
            return s.clone();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let pods = kubectl(&["get", "pods", "-n", &env.ns.name, "-o", "wide"], None);
    panic!(
        "Image {name} is not {phase:?} after {IMPORT:?}: {last:#?}\n{}\noperator log:\n{}",
        String::from_utf8_lossy(&pods.stdout),
        env.operator.log_text().lines().rev().take(40).collect::<Vec<_>>().join("\n")
    );
}

fn ready_reason(status: &ImageStatus) -> (String, String) {
    let ready = status.conditions.iter().find(|c| c.r#type == "Ready").expect("a Ready condition");
    (ready.reason.clone(), ready.message.clone())
}

/// Waits for the node and sets up `test`, or says why it is skipped.
async fn on_node(test: &str) -> Option<(tokio::sync::MutexGuard<'static, ()>, Env)> {
    if let Some(reason) = skip_reason() {
        eprintln!("skipped: {reason}");
        return None;
    }
    let node = NODE.lock().await;
    Some((node, Env::new(test).await))
}

#[tokio::test]
async fn images_import_over_http_as_raw_qcow2_and_gzip_and_copies_hold_the_same_digest() {
    let Some((_node, env)) = on_node("data-import").await else { return };
    let ns = &env.ns;
    let raw = fixture(24, 7);
    // The digest is the disk's: its content and the zeros up to its size (spec.size 32Mi).
    let padded = |mib: usize| {
        let mut disk = raw.clone();
        disk.resize(mib << 20, 0);
        format!("sha256:{}", sha256(&disk))
    };
    let (digest, digest_24) = (padded(32), padded(24));
    let qcow2 = convert(&raw, &["qemu-img convert -f raw -O qcow2 {in} {out}"]);
    let gz = convert(&raw, &["gzip -c {in} > {out}"]);
    let server = Server::start(BTreeMap::from([
        // 24 MiB at 2 MiB/s: about 12 s, so the import shows its progress (read every 5 s).
        ("slow.raw".to_owned(), Reply::Body { data: Arc::new(raw.clone()), rate: Some(2 << 20) }),
        ("disk.qcow2".to_owned(), Reply::Body { data: Arc::new(qcow2), rate: None }),
        ("disk.raw.gz".to_owned(), Reply::Body { data: Arc::new(gz), rate: None }),
    ]));
    let started = Instant::now();
    let writes_before = env.operator.counter("api_writes", "");
    apply(
        ns,
        &(http_image("raw", &server.url("slow.raw"), "size: 32Mi, ", &format!(", sha256: '{}'", sha256(&raw)))
            + &http_image("qcow", &server.url("disk.qcow2"), "", ", format: qcow2")
            + &http_image("gz", &server.url("disk.raw.gz"), "size: 32Mi, ", "")),
    );

    // Progress while the slow one imports, from its importer's log.
    let mut progress = Vec::new();
    let imported = wait_for("image raw to import", IMPORT, async || {
        let s = status(&env.api::<Image>().get("raw").await.ok()?);
        if s.phase == Some(ImagePhase::Importing)
            && let Some(p) = &s.progress
            && progress.last() != Some(p)
        {
            progress.push(p.clone());
        }
        (s.phase == Some(ImagePhase::Ready)).then_some(s)
    })
    .await;
    let raw_secs = started.elapsed().as_secs_f64();
    assert_eq!(imported.digest.as_deref(), Some(digest.as_str()), "{imported:?}");
    assert_eq!(imported.capacity.as_ref().map(|q| q.0.as_str()), Some("32Mi"));
    assert!(!progress.is_empty(), "no progress was shown while importing: {imported:?}");
    assert_eq!(imported.progress.as_deref(), Some("100%"));
    for (name, want) in [("qcow", &digest_24), ("gz", &digest)] {
        let s = wait_phase(&env, name, ImagePhase::Ready).await;
        assert_eq!(s.digest.as_deref(), Some(want.as_str()), "{name}: {s:?}");
        assert!(s.transfer_pod.is_none(), "{name}: {s:?}");
    }
    // Without spec.size, the PVC is sized from the image (qcow2's virtual size: 24 MiB).
    let qcow = status(&env.api::<Image>().get("qcow").await.expect("qcow"));
    assert_eq!(qcow.capacity.as_ref().map(|q| q.0.as_str()), Some("24Mi"), "{qcow:?}");
    // Writes per imported image (finalizer, PVC, helper Pods, digest record, status with its
    // progress): a few, never a storm.
    let writes = wait_for("the writes to settle", Duration::from_secs(30), async || {
        let now = env.operator.counter("api_writes", "");
        tokio::time::sleep(Duration::from_secs(3)).await;
        (env.operator.counter("api_writes", "") == now).then_some(now - writes_before)
    })
    .await;
    let per_image = writes as f64 / 3.0;
    assert!(per_image <= 16.0, "{writes} API writes for 3 imported images");
    for name in ["raw", "qcow", "gz"] {
        let pvc = names::image_pvc(name);
        assert!(env.pod(&names::importer_pod(&env.ns.name, &pvc)).await.is_none(), "the importer of {name} is gone");
        assert!(
            env.pod(&names::size_probe_pod(&env.ns.name, &pvc)).await.is_none(),
            "the size probe of {name} is gone"
        );
    }

    // A copy clone holds the same digest; a clone into another class falls back to copy, saying why.
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {{name: {ns}-other, annotations: \
             {{vmkeep.io/clone-strategy: csi-clone}}}}\nprovisioner: kubernetes.io/host-path\n",
            ns = ns.name
        )),
    );
    let copied = Instant::now();
    apply(
        ns,
        &format!(
            "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {{name: copy}}\n\
             spec: {{source: {{image: {{name: raw}}}}}}\n---\n\
             apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {{name: across}}\n\
             spec: {{storageClassName: {}-other, source: {{image: {{name: gz}}}}}}\n",
            ns.name
        ),
    );
    let copy = wait_phase(&env, "copy", ImagePhase::Ready).await;
    let copy_secs = copied.elapsed().as_secs_f64();
    assert_eq!(copy.clone_strategy.as_deref(), Some("copy"), "{copy:?}");
    assert!(copy.clone_fallback.as_deref().unwrap_or_default().contains("cannot clone"), "{copy:?}");
    assert_eq!(copy.digest.as_deref(), Some(digest.as_str()), "the copy holds what its source held");
    let across = wait_phase(&env, "across", ImagePhase::Ready).await;
    assert_eq!(across.clone_strategy.as_deref(), Some("copy"), "{across:?}");
    assert!(
        across.clone_fallback.as_deref().unwrap_or_default().contains("CSI clones stay within one class"),
        "{across:?}"
    );
    assert_eq!(across.digest.as_deref(), Some(digest.as_str()));
    let _ = kubectl(&["delete", "storageclass", &format!("{}-other", ns.name)], None);
    eprintln!(
        "import of 24 MiB raw at 4 MiB/s: Ready after {raw_secs:.1} s, progress shown {progress:?}; \
         {per_image:.1} API writes per imported image; copy clone of 32 MiB: Ready after {copy_secs:.1} s"
    );
}

#[tokio::test]
async fn a_bad_checksum_a_404_and_a_flaky_server_end_as_they_should() {
    let Some((_node, env)) = on_node("data-failures").await else { return };
    let raw = fixture(4, 11);
    let server = Server::start(BTreeMap::from([
        ("disk.raw".to_owned(), Reply::Body { data: Arc::new(raw.clone()), rate: None }),
        (
            "flaky.raw".to_owned(),
            Reply::FailThen { failures: Arc::new(AtomicU32::new(2)), data: Arc::new(raw.clone()) },
        ),
        ("disk.qcow2".to_owned(), Reply::Body { data: Arc::new(raw.clone()), rate: None }),
    ]));
    let wrong = "0".repeat(64);
    apply(
        &env.ns,
        &(http_image("bad-sum", &server.url("disk.raw"), "size: 8Mi, ", &format!(", sha256: '{wrong}'"))
            + &http_image("missing", &server.url("nothing.raw"), "size: 8Mi, ", "")
            + &http_image("flaky", &server.url("flaky.raw"), "size: 8Mi, ", "")
            + &http_image("not-qcow", &server.url("disk.qcow2"), "size: 8Mi, ", ", format: qcow2")),
    );
    let bad = wait_phase(&env, "bad-sum", ImagePhase::Error).await;
    let (reason, message) = ready_reason(&bad);
    assert_eq!(reason, "ChecksumMismatch", "{bad:?}");
    assert!(message.contains(&wrong) && message.contains(&sha256(&raw)), "{message}");
    let missing = wait_phase(&env, "missing", ImagePhase::Error).await;
    let (reason, message) = ready_reason(&missing);
    assert_eq!(reason, "ImportFailed", "{missing:?}");
    assert!(message.contains("404"), "{message}");
    // What the flaky importer saw (its progress lines), while it runs.
    let flaky_log = std::thread::spawn({
        let ns = env.ns.name.clone();
        move || {
            let pod = names::importer_pod(&ns, &names::image_pvc("flaky"));
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..120 {
                let out = kubectl(&["logs", "-n", &ns, &pod], None);
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                seen.extend(text.lines().filter_map(|l| Some(l.split("\"lastError\":").nth(1)?.to_owned())));
                if text.contains("imported") {
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            seen
        }
    });
    let flaky = wait_phase(&env, "flaky", ImagePhase::Ready).await;
    eprintln!("flaky importer's errors: {:?}", flaky_log.join().unwrap_or_default());
    // Its two 500s were retried (more when a fresh Pod's first connections fail, before they
    // reach the server: the retries count every failed attempt).
    assert!(flaky.import_retries >= Some(2), "{flaky:?}");
    eprintln!("flaky: {:?} retries shown", flaky.import_retries);
    let mut disk = raw.clone();
    disk.resize(8 << 20, 0);
    assert_eq!(flaky.digest, Some(format!("sha256:{}", sha256(&disk))), "the disk: its content and zeros up to 8Mi");
    let not_qcow = wait_phase(&env, "not-qcow", ImagePhase::Error).await;
    assert_eq!(ready_reason(&not_qcow).0, "UnsupportedFormat", "{not_qcow:?}");
    // A terminal failure stays until the spec changes (its Pod ended, kept for its log): no
    // retry storm.
    let pod = env
        .pod(&names::importer_pod(&env.ns.name, &names::image_pvc("missing")))
        .await
        .expect("the failed importer stays");
    assert_eq!(pod.status.and_then(|s| s.phase).as_deref(), Some("Succeeded"), "it ended for good");
}

/// The seed's promise, end to end: a non-persistent OS image imported over HTTP (qcow2) and a
/// persistent data disk; what the guest writes to the first dies with its VM, what it writes
/// to the second survives it; a second concurrent claim is rejected; a disk saved as an image
/// boots with what its VM wrote.
#[tokio::test]
async fn the_seed_changes_are_lost_on_a_clone_and_survive_on_a_persistent_image_and_a_saved_disk_keeps_them() {
    let Some((_node, env)) = on_node("data-seed").await else { return };
    let ns = &env.ns;
    let guest = std::fs::read(guest_image()).expect("the guest image");
    let qcow2 = convert(&guest, &["qemu-img convert -f raw -O qcow2 {in} {out}"]);
    let server =
        Server::start(BTreeMap::from([("guest.qcow2".to_owned(), Reply::Body { data: Arc::new(qcow2), rate: None })]));
    apply(
        ns,
        &(http_image("golden", &server.url("guest.qcow2"), "", ", format: qcow2")
            + "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {name: data}\n\
               spec: {persistent: true, type: DATABLOCK, size: 64Mi, source: {blank: {}}}\n---\n"
            + &template_with(
                "t",
                &[("root", Some("golden")), ("data", Some("data"))],
                "launcher: {terminationGracePeriodSeconds: 20}, ",
            )),
    );
    let golden = wait_phase(&env, "golden", ImagePhase::Ready).await;
    assert_eq!(golden.digest, Some(format!("sha256:{}", sha256(&guest))), "golden holds the guest");

    // VM a writes its marker on both disks.
    apply(ns, &vm("a", "t", "Reject"));
    env.wait_vm("a", P::Running).await;
    let log_a = wait_log(&env, "a", "vmkeep-guest: ready", BOOT).await;
    for line in ["disk vda markers: none", "disk vda marked a", "disk vdb markers: none", "disk vdb marked a"] {
        assert!(log_a.contains(line), "no '{line}' in a's console:\n{log_a}");
    }
    env.delete_vm("a").await;
    env.wait_gone::<vmkeep::api::VirtualMachine>("a", GC).await;

    // VM b: golden's content without a's marker (lost), a's marker on the data disk (survives).
    apply(ns, &vm("b", "t", "Reject"));
    env.wait_vm("b", P::Running).await;
    let log_b = wait_log(&env, "b", "vmkeep-guest: ready", BOOT).await;
    assert!(log_b.contains("disk vda markers: none"), "a's change to its clone survived:\n{log_b}");
    assert!(log_b.contains("disk vdb markers: a"), "a's change to the persistent disk was lost:\n{log_b}");

    // VM c meanwhile: rejected. A clone of the held persistent image waits.
    apply(ns, &vm("c", "t", "Reject"));
    let c = env.wait_vm("c", P::Rejected).await;
    let reason = c.status.iter().flat_map(|s| &s.conditions).find(|c| c.r#type == "Ready").map(|c| c.reason.clone());
    assert_eq!(reason.as_deref(), Some("ImageInUse"), "{c:?}");
    apply(
        ns,
        "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {name: data-copy}\n\
         spec: {type: DATABLOCK, source: {image: {name: data}}}\n---\n\
         apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {name: saved}\n\
         spec: {source: {virtualMachineDisk: {virtualMachine: b, disk: root}}}\n",
    );
    for name in ["data-copy", "saved"] {
        let pending = wait_phase(&env, name, ImagePhase::Pending).await;
        assert_eq!(ready_reason(&pending).0, "SourceInUse", "{name}: {pending:?}");
    }
    env.delete_vm("c").await;

    // b is Halted: the clone and the saved disk proceed.
    kubectl_ok(
        &[
            "patch",
            "virtualmachines.vmkeep.io",
            "b",
            "-n",
            &ns.name,
            "--type=merge",
            "-p",
            r#"{"spec":{"runStrategy":"Halted"}}"#,
        ],
        None,
    );
    env.wait_vm("b", P::Stopped).await;
    let copy = wait_phase(&env, "data-copy", ImagePhase::Ready).await;
    assert!(copy.digest.is_some(), "{copy:?}");
    let saved = wait_phase(&env, "saved", ImagePhase::Ready).await;
    assert!(saved.digest.is_some(), "{saved:?}");
    assert_ne!(saved.digest, golden.digest, "b's root holds b's marker, unlike golden");

    // VM d boots from the saved disk: b's marker is there.
    apply(ns, &template_with("t2", &[("root", Some("saved"))], "launcher: {terminationGracePeriodSeconds: 20}, "));
    apply(ns, &vm("d", "t2", "Reject"));
    env.wait_vm("d", P::Running).await;
    let log_d = wait_log(&env, "d", "vmkeep-guest: ready", BOOT).await;
    assert!(log_d.contains("disk vda markers: b"), "the saved disk lost b's marker:\n{log_d}");
}

/// A `WaitForFirstConsumer` class binds a PVC only when a Pod mounts it: an image that must be
/// cloned there is bound by vmkeep's binder Pod (the source, and the csi-clone, non-persistent,
/// whose clones need its bound capacity).
#[tokio::test]
async fn an_image_in_a_class_that_binds_late_is_bound_when_it_must_be_cloned() {
    let Some((_node, env)) = on_node("data-late").await else { return };
    let ns = &env.ns;
    let class = format!("{}-late", ns.name);
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {{name: {class}, annotations: \
             {{vmkeep.io/clone-strategy: csi-clone}}}}\nprovisioner: kubernetes.io/host-path\n\
             volumeBindingMode: WaitForFirstConsumer\n"
        )),
    );
    apply(
        ns,
        &format!(
            "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {{name: base}}\n\
             spec: {{persistent: true, size: 16Mi, storageClassName: {class}, source: {{blank: {{}}}}}}\n"
        ),
    );
    // Persistent and alone, it stays unbound (its first VM will bind it) and is Ready. (A
    // non-persistent image is bound at once: its clones are sized from its bound capacity.)
    wait_phase(&env, "base", ImagePhase::Ready).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let phase = |pvc: &str| {
        let pvc = pvc.to_owned();
        let env = &env;
        async move { env.pvc(&pvc).await.and_then(|p| p.status?.phase) }
    };
    assert_eq!(phase("base-image").await.as_deref(), Some("Pending"), "nothing mounted it yet");
    apply(
        ns,
        "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {name: copy}\nspec: {source: {image: {name: base}}}\n",
    );
    let copy = wait_phase(&env, "copy", ImagePhase::Ready).await;
    assert_eq!(copy.clone_strategy.as_deref(), Some("csi-clone"), "{copy:?}");
    for pvc in ["base-image", "copy-image"] {
        wait_for(&format!("{pvc} to be bound"), Duration::from_secs(60), async || {
            (phase(pvc).await.as_deref() == Some("Bound")).then_some(())
        })
        .await;
        wait_for(&format!("the binder of {pvc} to go"), Duration::from_secs(30), async || {
            env.pod(&names::binder_pod(&env.ns.name, pvc)).await.is_none().then_some(())
        })
        .await;
    }
    let _ = kubectl(&["delete", "storageclass", &class], None);
}

/// The `snapshot` strategy, as far as this cluster allows: it serves no snapshot API (the
/// fallback to `copy` says so); then the test installs the `snapshot.storage.k8s.io/v1` CRDs and
/// plays the CSI snapshot controller (it marks the VolumeSnapshot ready to use). The host-path
/// provisioner binds the restored PVC without copying any data, so this checks the objects
/// vmkeep makes and their order, not the bytes.
#[tokio::test]
async fn a_snapshot_clone_takes_restores_and_deletes_a_volume_snapshot() {
    let Some((_node, env)) = on_node("data-snapshot").await else { return };
    let ns = &env.ns;
    let class = format!("{}-snap", ns.name);
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {{name: {class}, annotations: \
             {{vmkeep.io/clone-strategy: snapshot}}}}\nprovisioner: kubernetes.io/host-path\n"
        )),
    );
    let _class = OnDrop(|| drop(kubectl(&["delete", "storageclass", &class, "--wait=false"], None)));
    let served = kubectl(&["api-resources", "--api-group=snapshot.storage.k8s.io", "-o", "name"], None);
    let served = !String::from_utf8_lossy(&served.stdout).trim().is_empty();
    apply(
        ns,
        &format!(
            "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {{name: base}}\n\
             spec: {{size: 16Mi, storageClassName: {class}, source: {{blank: {{}}}}}}\n"
        ),
    );
    wait_phase(&env, "base", ImagePhase::Ready).await;
    if !served {
        // No snapshot API: copy, saying why.
        apply(
            ns,
            "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {name: early}\nspec: {source: {image: {name: base}}}\n",
        );
        let early = wait_phase(&env, "early", ImagePhase::Ready).await;
        assert_eq!(early.clone_strategy.as_deref(), Some("copy"), "{early:?}");
        assert!(
            early.clone_fallback.as_deref().unwrap_or_default().contains("serves no snapshot.storage.k8s.io/v1"),
            "{early:?}"
        );
    }
    // The snapshot API (CRDs only), a class for the host-path driver.
    let crds = ["volumesnapshots", "volumesnapshotclasses"];
    let crd = |plural: &str, kind: &str, scope: &str| {
        format!(
            "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {{name: {plural}.snapshot.storage.k8s.io, \
             annotations: {{api-approved.kubernetes.io: 'https://github.com/kubernetes-csi/external-snapshotter/pull/419'}}}}\n\
             spec: {{group: snapshot.storage.k8s.io, scope: {scope}, names: {{plural: {plural}, kind: {kind}}},\n\
             versions: [{{name: v1, served: true, storage: true, schema: {{openAPIV3Schema: {{type: object, \
             x-kubernetes-preserve-unknown-fields: true}}}}}}]}}\n---\n"
        )
    };
    if !served {
        kubectl_ok(
            &["apply", "-f", "-"],
            Some(&(crd(crds[0], "VolumeSnapshot", "Namespaced") + &crd(crds[1], "VolumeSnapshotClass", "Cluster"))),
        );
        for plural in crds {
            kubectl_ok(
                &["wait", "--for=condition=Established", &format!("crd/{plural}.snapshot.storage.k8s.io")],
                None,
            );
        }
    }
    let _crds = OnDrop(|| {
        if !served {
            for plural in crds {
                let _ = kubectl(&["delete", "crd", &format!("{plural}.snapshot.storage.k8s.io"), "--wait=false"], None);
            }
        }
    });
    let snapshot_class = format!("{}-snaps", ns.name);
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshotClass\nmetadata: {{name: {snapshot_class}}}\n\
             driver: kubernetes.io/host-path\ndeletionPolicy: Delete\n"
        )),
    );
    apply(
        ns,
        "apiVersion: vmkeep.io/v1alpha1\nkind: Image\nmetadata: {name: snap}\nspec: {source: {image: {name: base}}}\n",
    );
    let name = names::snapshot(&names::image_pvc("snap"));
    let get = |path: &str| {
        let out = kubectl(
            &[
                "get",
                "volumesnapshots.snapshot.storage.k8s.io",
                &name,
                "-n",
                &ns.name,
                "-o",
                &format!("jsonpath={path}"),
            ],
            None,
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_for("the VolumeSnapshot", Duration::from_secs(60), async || {
        (!get("{.metadata.name}").is_empty()).then_some(())
    })
    .await;
    assert_eq!(get("{.spec.source.persistentVolumeClaimName}"), "base-image");
    assert_eq!(get("{.spec.volumeSnapshotClassName}"), snapshot_class);
    let cloning = status(&env.api::<Image>().get("snap").await.expect("snap"));
    assert_eq!(cloning.phase, Some(ImagePhase::Cloning), "waits for the snapshot: {cloning:?}");
    assert!(env.pvc("snap-image").await.is_none(), "no PVC before the snapshot is ready");
    // The snapshot controller's part: ready to use.
    kubectl_ok(
        &[
            "patch",
            "volumesnapshots.snapshot.storage.k8s.io",
            &name,
            "-n",
            &ns.name,
            "--type=merge",
            "-p",
            r#"{"status":{"readyToUse":true}}"#,
        ],
        None,
    );
    let snap = wait_phase(&env, "snap", ImagePhase::Ready).await;
    assert_eq!((snap.clone_strategy.as_deref(), snap.clone_fallback.as_deref()), (Some("snapshot"), None), "{snap:?}");
    let pvc = env.pvc("snap-image").await.expect("the restored PVC");
    let source = pvc.spec.and_then(|s| s.data_source).expect("a dataSource");
    assert_eq!(
        (source.kind.as_str(), source.name.as_str(), source.api_group.as_deref()),
        ("VolumeSnapshot", name.as_str(), Some("snapshot.storage.k8s.io"))
    );
    wait_for("the VolumeSnapshot to go once the clone is bound", Duration::from_secs(60), async || {
        get("{.metadata.name}").is_empty().then_some(())
    })
    .await;
    let _ = kubectl(&["delete", "volumesnapshotclass", &snapshot_class], None);
}
