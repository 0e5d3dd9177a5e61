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
use serde::de::DeserializeOwned;
use vmkeep::{
    api::{Image, Template, VirtualMachine},
    controller::informer::for_cache,
    plan::cached::{CachedPod, CachedPvc},
};

/// Counts the bytes allocated and not yet freed, by every thread (this file has one test).
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
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

/// The bytes one cached `K` decoded from `file` holds (the mean of [`COPIES`]).
fn cached<K: kube::Resource<DynamicType = ()> + DeserializeOwned>(file: &str) -> usize {
    let path = format!("{}/tests/fixtures/cache/{file}", env!("CARGO_MANIFEST_DIR"));
    let json = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut kept: Vec<Arc<K>> = Vec::with_capacity(COPIES);
    let before = LIVE.load(Ordering::Relaxed);
    for _ in 0..COPIES {
        let mut obj: K = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{path}: {e}"));
        for_cache(&mut obj);
        kept.push(Arc::new(obj));
    }
    let bytes = (LIVE.load(Ordering::Relaxed) - before) as usize / COPIES;
    drop(kept);
    bytes
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
    let per_vm = vm + root + scratch + pod + (lease + image + template + root) / 10;
    eprintln!(
        "bytes cached: VirtualMachine {vm}, clone PVC {root}, volatile PVC {scratch}, launcher Pod {pod}, \
         Lease {lease}, Image {image}, Template {template}; per VM with its children {per_vm} \
         ({:.1} MiB for 10000 VMs)",
        per_vm as f64 * 10000.0 / 1048576.0
    );
    assert!(per_vm > 1000, "the measurement counts nothing: {per_vm}");
    assert!(per_vm <= BUDGET, "a VM with its children caches {per_vm} bytes, over the budget of {BUDGET}");
}
