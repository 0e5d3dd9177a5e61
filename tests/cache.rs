//! The bytes the operator's caches hold per object, measured with a counting allocator on real
//! objects (`tests/fixtures/cache/`, read from the API server during a `vmkeep-bench` run: a
//! bench VM, its clone and volatile PVCs, its launcher Pod, a claim Lease, the Image and
//! Template). Each is decoded as the watch decodes it and kept as the cache keeps it; the bytes
//! are what stays allocated (the object in its `Arc`, and every string, map and list it owns).
//! No cluster is needed. docs/performance.md publishes the figures; the test fails when a VM
//! with its children grows past [`BUDGET`].

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::{
        Arc,
        atomic::{AtomicIsize, Ordering},
    },
};

use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::reflector::ObjectRef;
use serde::de::DeserializeOwned;
use vmkeep::{
    api::{Image, Template, VirtualMachine},
    controller::informer::for_cache,
    plan::cached::{CachedPod, CachedPvc},
};

/// Counts the bytes allocated and not yet freed, by every thread (this file has one test).
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
/// What the same live allocations take in glibc malloc's chunks: the size plus an 8-byte
/// header, rounded up to 16, at least 32 (malloc/malloc.c `request2size`, x86-64).
static CHUNKS: AtomicIsize = AtomicIsize::new(0);
/// The live allocations.
static COUNT: AtomicIsize = AtomicIsize::new(0);

fn chunk(size: usize) -> isize {
    ((size + 8).div_ceil(16) * 16).max(32) as isize
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        CHUNKS.fetch_add(chunk(layout.size()), Ordering::Relaxed);
        COUNT.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        CHUNKS.fetch_sub(chunk(layout.size()), Ordering::Relaxed);
        COUNT.fetch_sub(1, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        CHUNKS.fetch_add(chunk(new_size) - chunk(layout.size()), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const COPIES: usize = 200;

/// The bytes a VM with its children may hold in the caches: what they held when the compact
/// Pod and PVC caches came (8,940, docs/performance.md) and a little room, so that a change that
/// caches more shows here. The 64 MiB target at 10,000 VMs needs about 4,700.
const BUDGET: usize = 9_500;

/// What one cached `K` decoded from `file` holds (the mean of [`COPIES`]): the object in its
/// `Arc` and all it owns, and the same plus the store's key (kube's reflector store keeps each
/// object under an `ObjectRef`: name, namespace, resourceVersion and uid, copied), as requested
/// bytes, as glibc chunks, and as a count of allocations.
#[derive(Clone, Copy, Default)]
struct Held {
    object: usize,
    with_key: usize,
    chunks: usize,
    allocations: usize,
}

fn cached<K: kube::Resource<DynamicType = ()> + DeserializeOwned>(file: &str) -> Held {
    let path = format!("{}/tests/fixtures/cache/{file}", env!("CARGO_MANIFEST_DIR"));
    let json = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let decode = || {
        let mut obj: K = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{path}: {e}"));
        for_cache(&mut obj);
        Arc::new(obj)
    };
    let mut kept: Vec<Arc<K>> = Vec::with_capacity(COPIES);
    let before = LIVE.load(Ordering::Relaxed);
    for _ in 0..COPIES {
        kept.push(decode());
    }
    let object = (LIVE.load(Ordering::Relaxed) - before) as usize / COPIES;
    drop(kept);
    let mut keyed: Vec<(ObjectRef<K>, Arc<K>)> = Vec::with_capacity(COPIES);
    let (before, chunks, count) =
        (LIVE.load(Ordering::Relaxed), CHUNKS.load(Ordering::Relaxed), COUNT.load(Ordering::Relaxed));
    for _ in 0..COPIES {
        let obj = decode();
        keyed.push((ObjectRef::from_obj(obj.as_ref()), obj));
    }
    let per = |now: isize, then: isize| (now - then) as usize / COPIES;
    // The key and the object's pointer sit in the store's hash table (one allocation for all;
    // approximate: its spare capacity and control bytes are not counted).
    let slot = std::mem::size_of::<(ObjectRef<K>, Arc<K>)>();
    let held = Held {
        object,
        with_key: per(LIVE.load(Ordering::Relaxed), before) + slot,
        chunks: per(CHUNKS.load(Ordering::Relaxed), chunks) + slot,
        allocations: per(COUNT.load(Ordering::Relaxed), count),
    };
    drop(keyed);
    held
}

#[test]
fn a_cached_vm_with_its_children_stays_within_the_memory_budget() {
    let vm = cached::<VirtualMachine>("vm.json");
    let root = cached::<CachedPvc>("pvc-root.json");
    let scratch = cached::<CachedPvc>("pvc-scratch.json");
    let pod = cached::<CachedPod>("pod.json");
    let lease = cached::<Lease>("lease.json");
    let image = cached::<Image>("image.json");
    let template = cached::<Template>("template.json");
    // The bench's mix (docs/performance.md): per VM its two PVCs and launcher Pod; every 10th
    // VM also a persistent image with its PVC, Template and claim Lease.
    let mix = |f: fn(&Held) -> usize| {
        f(&vm) + f(&root) + f(&scratch) + f(&pod) + (f(&lease) + f(&image) + f(&template) + f(&root)) / 10
    };
    let per_vm = mix(|h| h.object);
    let mib = |bytes: usize| bytes as f64 * 10000.0 / 1048576.0;
    eprintln!(
        "bytes cached: VirtualMachine {}, clone PVC {}, volatile PVC {}, launcher Pod {}, Lease {}, Image {}, \
         Template {}; per VM with its children {per_vm} ({:.1} MiB for 10000 VMs)",
        vm.object,
        root.object,
        scratch.object,
        pod.object,
        lease.object,
        image.object,
        template.object,
        mib(per_vm)
    );
    for (kind, h) in [
        ("VirtualMachine", vm),
        ("clone PVC", root),
        ("volatile PVC", scratch),
        ("launcher Pod", pod),
        ("Lease", lease),
        ("Image", image),
        ("Template", template),
    ] {
        eprintln!(
            "  {kind}: {} bytes with its key, {} allocations, {} as glibc chunks",
            h.with_key, h.allocations, h.chunks
        );
    }
    let (with_key, chunks, allocations) = (mix(|h| h.with_key), mix(|h| h.chunks), mix(|h| h.allocations));
    eprintln!(
        "with the stores' keys: {with_key} bytes per VM in {allocations} allocations, {chunks} bytes as glibc \
         chunks ({:.1} MiB for 10000 VMs)",
        mib(chunks)
    );
    assert!(per_vm > 1000, "the measurement counts nothing: {per_vm}");
    assert!(with_key > per_vm && chunks > with_key, "the keys and chunks count nothing: {with_key}, {chunks}");
    assert!(per_vm <= BUDGET, "a VM with its children caches {per_vm} bytes, over the budget of {BUDGET}");
}
