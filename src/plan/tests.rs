//! Unit tests of the pure decisions in `plan` (no API server, no clock): objects come from inline
//! YAML, and every decision is checked to the exact phase, reason and message that DESIGN.md
//! ("The two persistence modes", "Behaviour" 1-10) promises. Statuses are recomputed from
//! themselves with a later `now` to show that a converged object computes what it already has.
//!
//! Tests marked `#[ignore = "BUG: ..."]` describe behaviour the contract asks for and the plan
//! code does not have yet; they fail on purpose.

use std::collections::BTreeMap;

use kube::ResourceExt;

use k8s_openapi::apimachinery::pkg::{
    api::resource::Quantity,
    apis::meta::v1::{MicroTime, Time},
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{
    build::{self, LauncherDisk, LauncherInputs},
    claim::{self as claim_plan, ClaimPlan, ClaimState},
    clone::{Chosen, CloneStrategy},
    conditions::{Cond, find},
    image::{
        self as image_plan, Finalizer, ImageObservation, ImagePlan, ImagePvc, ObservedMover, PvcRequest, Record, Role,
        SnapshotView, SourceDisk, SourceVm,
    },
    mover::MoverState,
    names,
    runtime::Choice,
    template as template_plan,
    virtual_machine::{
        self as vm_plan, Blocker, CheckedDisk, Child, CloneView, LauncherView, PodAction, Resolved, UsableImage,
        Verdict,
    },
};
use crate::api::{
    Condition, ConditionStatus, Image, Template, TemplateStatus, VirtualMachine,
    image::{ClaimHolder, ImagePhase, ImageType, VolumeMode},
    template::{LauncherSpec, Runtime},
    virtual_machine::{
        OnImageConflict, RunStrategy, VirtualMachineDiskStatus, VirtualMachinePhase as P, VirtualMachineStatus,
    },
};
use crate::mover::import::Progress;

// ---------------------------------------------------------------------------------------------
// Helpers: objects from YAML, fixed clocks, and "compute twice" checks.
// ---------------------------------------------------------------------------------------------

fn parse<T: DeserializeOwned>(yaml: &str) -> T {
    serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}:\n{yaml}"))
}

fn at(secs: i64) -> Time {
    Time(jiff::Timestamp::from_second(secs).unwrap())
}

fn q(s: &str) -> Quantity {
    Quantity(s.to_owned())
}

/// An Image in namespace `ns` (uid `uid-<name>`, generation 1); `rest` is the YAML after
/// `metadata` (spec and maybe status).
fn image(name: &str, rest: &str) -> Image {
    parse(&format!("metadata: {{name: {name}, namespace: ns, uid: uid-{name}, generation: 1}}\n{rest}"))
}

/// A blank Image a VM can use now: phase Ready, mode in force `persistent`, PVC `<name>-image`.
fn usable(name: &str, persistent: bool, kind: &str, capacity: &str) -> Image {
    image(
        name,
        &format!(
            "spec: {{persistent: {persistent}, type: {kind}, size: {capacity}, source: {{blank: {{}}}}}}\n\
             status: {{phase: Ready, persistent: {persistent}, pvcName: {name}-image, capacity: {capacity}}}"
        ),
    )
}

/// The Image lookup the plan functions take.
fn lookup<'a>(images: &'a [Image]) -> impl Fn(&str) -> Option<&'a Image> {
    move |name| images.iter().find(|i| i.metadata.name.as_deref() == Some(name))
}

/// Template `small` (cpu 2, memory 4Gi, generation 3) with `disks`, a YAML flow sequence.
fn template(disks: &str) -> Template {
    parse(&format!(
        "metadata: {{name: small, namespace: ns, uid: uid-small, generation: 3}}\n\
         spec: {{cpu: 2, memory: 4Gi, disks: {disks}}}"
    ))
}

/// VirtualMachine `name` from Template `small`, in namespace `ns`, uid `uid-<name>`, generation 1.
fn vm(name: &str) -> VirtualMachine {
    parse(&format!(
        "metadata: {{name: {name}, namespace: ns, uid: uid-{name}, generation: 1, \
         creationTimestamp: '2024-01-01T00:00:00Z'}}\nspec: {{templateRef: {{name: small}}}}"
    ))
}

fn with_status(mut vm: VirtualMachine, yaml: &str) -> VirtualMachine {
    vm.status = Some(parse(yaml));
    vm
}

fn disks(yaml: &str) -> Vec<VirtualMachineDiskStatus> {
    parse(yaml)
}

/// What a VM resolved: `disks` (YAML), cpu 2, memory 4Gi, no clone sources.
fn resolved(yaml: &str) -> Resolved {
    Resolved { disks: disks(yaml), cpu: 2, memory: q("4Gi"), clone_sources: BTreeMap::new() }
}

fn map<V: Clone>(pairs: &[(&str, V)]) -> BTreeMap<String, V> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
}

fn ours(phase: &str) -> Child {
    Child::Ours { phase: Some(phase.to_owned()), deleting: false }
}

/// Conditions without their timestamps, for exact comparison.
/// The conditions as decisions, without `Reconciling` and `Stalled` (which follow `Ready`;
/// [`health_follows_ready_on_every_kind`] checks them).
fn decided(conditions: &[Condition]) -> Vec<Cond> {
    conditions.iter().filter(|c| !["Reconciling", "Stalled"].contains(&c.r#type.as_str())).map(Cond::from).collect()
}

/// `(Reconciling, Stalled)` as `(status, reason)` pairs.
fn health(conditions: &[Condition]) -> [(ConditionStatus, String); 2] {
    ["Reconciling", "Stalled"].map(|t| {
        let c = find(conditions, t).unwrap_or_else(|| panic!("no condition {t}"));
        (c.status, c.reason.clone())
    })
}

/// When the condition `kind` last changed.
fn since(conditions: &[Condition], kind: &str) -> Time {
    find(conditions, kind).unwrap_or_else(|| panic!("no condition {kind}")).last_transition_time.clone()
}

/// The VM's status at t=1000, after checking that recomputing it at t=2000 from itself gives the
/// same status (a converged VM writes nothing).
fn settle(vm: &VirtualMachine, resolved: Option<&Resolved>, verdict: &Verdict) -> VirtualMachineStatus {
    let first = vm_plan::status(vm, resolved, verdict, &at(1000));
    let mut again = vm.clone();
    again.status = Some(first.clone());
    assert_eq!(vm_plan::status(&again, resolved, verdict, &at(2000)), first, "a converged VM recomputes its status");
    first
}

/// The VM's phase and conditions after `settle`.
fn outcome(vm: &VirtualMachine, resolved: Option<&Resolved>, verdict: &Verdict) -> (Option<P>, Vec<Cond>) {
    let status = settle(vm, resolved, verdict);
    (status.phase, decided(&status.conditions))
}

/// The same three conditions (ImagesClaimed, DisksReady, Ready), all False for one reason.
fn all_false(reason: &str, message: &str) -> Vec<Cond> {
    ["ImagesClaimed", "DisksReady", "Ready"].map(|t| Cond::new(t, false, reason, message)).to_vec()
}

fn claimed_and_created(claimed_reason: &str, claimed_message: &str) -> [Cond; 2] {
    [
        Cond::new("ImagesClaimed", true, claimed_reason, claimed_message),
        Cond::new("DisksReady", true, "DisksCreated", "every disk's PVC exists"),
    ]
}

/// A VM created at `created` that waits (onImageConflict: Wait) for persistent `image` held by
/// vm-h, with the status the plan gives such a VM.
fn waiting(name: &str, created: i64, image: &str) -> VirtualMachine {
    let mut vm = vm(name);
    vm.spec.on_image_conflict = OnImageConflict::Wait;
    vm.metadata.creation_timestamp = Some(at(created));
    let r = resolved(&format!("[{{name: data, image: {image}, persistent: true, pvcName: {image}-image}}]"));
    let verdict = Verdict::Waiting { image: image.to_owned(), holder: "vm-h".into() };
    vm.status = Some(vm_plan::status(&vm, Some(&r), &verdict, &at(created)));
    vm
}

fn holder(name: &str) -> ClaimHolder {
    ClaimHolder { name: name.to_owned(), uid: format!("uid-{name}"), since: at(50) }
}

fn deleting(mut img: Image) -> Image {
    img.metadata.deletion_timestamp = Some(at(500));
    img
}

fn finalized(mut image: Image) -> Image {
    image.metadata.finalizers = Some(vec![names::IMAGE_FINALIZER.to_owned()]);
    image
}

fn observe(image: &Image, pvc: ImagePvc) -> ImageObservation<'_> {
    ImageObservation {
        image,
        pvc,
        source_image: None,
        consumers: Vec::new(),
        claim: None,
        source_writer: None,
        source_vm: None,
        clone_choice: None,
        movers: Vec::new(),
        progress: None,
        snapshot_class: None,
        snapshot: None,
        binds_late: false,
        allows_expansion: None,
        wanted_by_clones: false,
        cloning_now: Vec::new(),
        launcher_image: "vmkeep-launcher:test",
    }
}

fn present(ours: bool, phase: &str, capacity: Option<&str>) -> ImagePvc {
    ImagePvc::Present {
        ours,
        vmkeep_disk: false,
        phase: Some(phase.to_owned()),
        capacity: capacity.map(q),
        requested: capacity.map(q),
        resize_pending: false,
        storage_class: None,
        volume_mode: None,
        fill: Box::default(),
    }
}

/// The Image plan at t=1000, after checking that planning again at t=2000 with that status gives
/// the same plan.
fn settle_image(obs: &ImageObservation) -> ImagePlan {
    let first = image_plan::plan(obs, &at(1000));
    let mut image = obs.image.clone();
    image.status = Some(first.status.clone());
    let again = image_plan::plan(&ImageObservation { image: &image, ..obs.clone() }, &at(2000));
    assert_eq!(again.event, None, "an Event is published once");
    assert_eq!(ImagePlan { event: first.event.clone(), ..again }, first, "a converged Image plans the same again");
    first
}

/// The Image's phase and Ready condition.
fn image_ready(plan: &ImagePlan) -> (Option<ImagePhase>, Cond) {
    (plan.status.phase, Cond::from(find(&plan.status.conditions, "Ready").expect("a Ready condition")))
}

fn blocked(phase: P, reason: &'static str, message: &str) -> Blocker {
    Blocker { phase, reason, message: message.to_owned() }
}

fn owner(kind: &str, name: &str, controller: bool) -> Value {
    json!({"apiVersion": "vmkeep.io/v1alpha1", "kind": kind, "name": name, "uid": format!("uid-{name}"),
           "controller": controller})
}

fn managed(vm: Option<&str>) -> Value {
    let mut labels = json!({"app.kubernetes.io/managed-by": "vmkeep"});
    if let Some(vm) = vm {
        labels["vmkeep.io/virtual-machine"] = vm.into();
    }
    labels
}

/// The labels of a launcher Pod: managed, and the VM's name and uid (its recorded identity).
fn launcher_labels(vm: &str) -> Value {
    let mut labels = managed(Some(vm));
    labels["vmkeep.io/virtual-machine-uid"] = format!("uid-{vm}").into();
    labels
}

fn to_json<T: serde::Serialize>(object: &T) -> Value {
    serde_json::to_value(object).unwrap()
}

// ---------------------------------------------------------------------------------------------
// virtual_machine::usable_image
// ---------------------------------------------------------------------------------------------

#[test]
fn usable_image_waits_for_a_missing_deleted_disabled_or_unready_image() {
    let pending = |reason, message: &str| Err(blocked(P::Pending, reason, message));
    assert_eq!(vm_plan::usable_image("ubuntu", None), pending("ImageNotFound", "image ubuntu does not exist"));
    let gone = deleting(usable("ubuntu", false, "OS", "10Gi"));
    assert_eq!(vm_plan::usable_image("ubuntu", Some(&gone)), pending("ImageNotReady", "image ubuntu is being deleted"));
    let mut disabled = usable("ubuntu", false, "OS", "10Gi");
    disabled.spec.disabled = true;
    assert_eq!(vm_plan::usable_image("ubuntu", Some(&disabled)), pending("ImageDisabled", "image ubuntu is disabled"));
    let fresh = image("ubuntu", "spec: {source: {http: {url: 'https://x/u.img'}}}");
    assert_eq!(
        vm_plan::usable_image("ubuntu", Some(&fresh)),
        pending("ImageNotReady", "image ubuntu is not ready (not provisioned yet)")
    );
    let importing = image("ubuntu", "spec: {source: {http: {url: 'https://x/u.img'}}}\nstatus: {phase: Importing}");
    assert_eq!(
        vm_plan::usable_image("ubuntu", Some(&importing)),
        pending("ImageNotReady", "image ubuntu is not ready (Importing)")
    );
    // Ready but without the mode in force or the PVC name: not usable yet.
    let half = image("ubuntu", "spec: {source: {blank: {}}, size: 1Gi}\nstatus: {phase: Ready, persistent: false}");
    assert_eq!(
        vm_plan::usable_image("ubuntu", Some(&half)),
        pending("ImageNotReady", "image ubuntu is not ready (Ready)")
    );
}

#[test]
fn a_disk_smaller_than_its_image_stays_failed_while_the_image_waits() {
    // db had 2Gi and now waits (a persistence change pending): a 1Gi disk is still Failed.
    let img = image(
        "db",
        "spec: {persistent: true, type: DATABLOCK, source: {blank: {}}, size: 1Gi}\n\
         status: {phase: Used, persistent: false, pvcName: db-image, capacity: 2Gi}",
    );
    let t = template("[{name: data, image: db, size: 1Gi}]");
    let blocker = vm_plan::check_template(&t.spec, |_| Some(&img)).unwrap_err();
    assert_eq!((blocker.phase, blocker.reason), (P::Failed, "InvalidDiskSize"));
}

#[test]
fn usable_image_waits_while_a_persistence_change_is_pending() {
    for phase in ["Ready", "Used", "UsedPersistent"] {
        // spec says persistent, the old mode is still in force: a new user would keep it in force
        // for as long as it lives, so it waits until the change applies (DESIGN 9).
        let img = image(
            "db",
            &format!(
                "spec: {{persistent: true, type: DATABLOCK, source: {{blank: {{}}}}, size: 1Gi}}\n\
                 status: {{phase: {phase}, persistent: false, pvcName: db-image, capacity: 2Gi}}"
            ),
        );
        assert_eq!(
            vm_plan::usable_image("db", Some(&img)),
            Err(blocked(
                P::Pending,
                "ImageNotReady",
                "image db changes to persistent: true; that applies once no VirtualMachine uses it"
            )),
            "{phase}"
        );
        let mut applied = img.clone();
        applied.status.as_mut().unwrap().persistent = Some(true);
        assert_eq!(
            vm_plan::usable_image("db", Some(&applied)),
            Ok(UsableImage {
                persistent: true,
                pvc_name: "db-image".into(),
                capacity: Some(q("2Gi")),
                grown: None,
                r#type: ImageType::Datablock
            }),
            "{phase}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// virtual_machine::check_template
// ---------------------------------------------------------------------------------------------

fn checked(name: &str, image: Option<&str>, persistent: bool, size: Option<&str>, read_only: bool) -> CheckedDisk {
    CheckedDisk {
        name: name.into(),
        image: image.map(str::to_owned),
        persistent,
        image_pvc: image.map(names::image_pvc),
        size: size.map(q),
        read_only,
    }
}

fn images() -> Vec<Image> {
    vec![
        usable("ubuntu", false, "OS", "10Gi"),
        usable("db", true, "DATABLOCK", "50Gi"),
        usable("iso", false, "CDROM", "1Gi"),
        usable("iso2", false, "CDROM", "1Gi"),
        image("importing", "spec: {source: {http: {url: 'https://x/i.img'}}}\nstatus: {phase: Importing}"),
    ]
}

fn check(disks: &str) -> Result<Vec<CheckedDisk>, Blocker> {
    let images = images();
    vm_plan::check_template(&template(disks).spec, lookup(&images))
}

#[test]
fn check_template_resolves_images_clones_and_volatile_disks() {
    assert_eq!(
        check(
            "[{name: root, image: ubuntu}, {name: data, image: db}, {name: cd, image: iso}, {name: tmp, blank: {size: 5Gi}}]"
        ),
        Ok(vec![
            checked("root", Some("ubuntu"), false, Some("10Gi"), false),
            checked("data", Some("db"), true, None, false),
            checked("cd", Some("iso"), false, Some("1Gi"), true),
            checked("tmp", None, false, Some("5Gi"), false),
        ])
    );
    assert_eq!(check("[]"), Ok(vec![]));
}

#[test]
fn check_template_sizes_a_clone_to_the_larger_of_disk_size_and_image_capacity() {
    assert_eq!(
        check("[{name: root, image: ubuntu, size: 20Gi}]"),
        Ok(vec![checked("root", Some("ubuntu"), false, Some("20Gi"), false)])
    );
    // The same size in other units keeps the image's capacity.
    assert_eq!(
        check("[{name: root, image: ubuntu, size: 10240Mi}]"),
        Ok(vec![checked("root", Some("ubuntu"), false, Some("10Gi"), false)])
    );
    // A persistent image may be named with exactly its size; the VM has no own PVC size.
    assert_eq!(
        check("[{name: data, image: db, size: 50Gi}]"),
        Ok(vec![checked("data", Some("db"), true, None, false)])
    );
    // Two clones of one non-persistent image are fine.
    assert_eq!(check("[{name: a, image: ubuntu}, {name: b, image: ubuntu}]").map(|d| d.len()), Ok(2));
}

#[test]
fn check_template_fails_specs_that_can_never_work() {
    let failed = |reason, message: &str| Err(blocked(P::Failed, reason, message));
    assert_eq!(
        check("[{name: root, image: ubuntu, size: 5Gi}]"),
        failed("InvalidDiskSize", "disk root asks for 5Gi but image ubuntu holds 10Gi")
    );
    assert_eq!(
        check("[{name: data, image: db, size: 60Gi}]"),
        failed("InvalidDiskSize", "disk data cannot grow persistent image db (60Gi > 50Gi): resize the image instead")
    );
    assert_eq!(
        check("[{name: a, image: db}, {name: b, image: db}]"),
        failed("InvalidTemplate", "disks a and b both use persistent image db; it can back one disk")
    );
    assert_eq!(
        check("[{name: cd1, image: iso}, {name: root, image: ubuntu}, {name: cd2, image: iso2}]"),
        failed("InvalidTemplate", "disks cd1, cd2 all use CDROM images; a template may have one")
    );
    for both_or_neither in ["[{name: x, image: ubuntu, blank: {size: 1Gi}}]", "[{name: x}]"] {
        assert_eq!(
            check(both_or_neither),
            failed("InvalidTemplate", "disk x must name exactly one of image or blank"),
            "{both_or_neither}"
        );
    }
}

#[test]
fn check_template_waits_for_the_first_missing_image_but_failure_wins() {
    assert_eq!(
        check("[{name: a, image: nope}, {name: b, image: importing}]"),
        Err(blocked(P::Pending, "ImageNotFound", "image nope does not exist"))
    );
    assert_eq!(
        check("[{name: b, image: importing}, {name: a, image: nope}]"),
        Err(blocked(P::Pending, "ImageNotReady", "image importing is not ready (Importing)"))
    );
    // A spec that can never work is Failed even while another image is missing.
    assert_eq!(check("[{name: a, image: nope}, {name: root, image: ubuntu, size: 1Gi}]").unwrap_err().phase, P::Failed);
    assert_eq!(
        check("[{name: cd1, image: iso}, {name: a, image: nope}, {name: cd2, image: iso2}]").unwrap_err().reason,
        "InvalidTemplate"
    );
}

// ---------------------------------------------------------------------------------------------
// virtual_machine::resolve_disks and stays_rejected
// ---------------------------------------------------------------------------------------------

const TEMPLATE_DISKS: &str =
    "[{name: root, image: ubuntu, size: 20Gi}, {name: data, image: db}, {name: scratch, blank: {size: 5Gi}}]";

#[test]
fn resolve_disks_from_the_template_names_clones_claims_and_volatile_disks() {
    let images = images();
    let t = template(TEMPLATE_DISKS);
    let r = vm_plan::resolve_disks(&vm("vm-a"), Some(&t.spec), lookup(&images));
    assert_eq!(
        r,
        Ok(Resolved {
            disks: disks(
                "[{name: root, image: ubuntu, persistent: false, pvcName: vm-a-root, size: 20Gi},
                  {name: data, image: db, persistent: true, pvcName: db-image},
                  {name: scratch, pvcName: vm-a-scratch, size: 5Gi}]"
            ),
            cpu: 2,
            memory: q("4Gi"),
            clone_sources: map(&[("root", "ubuntu-image".to_owned())]),
        })
    );
}

#[test]
fn resolve_disks_waits_for_the_template_and_passes_on_its_blockers() {
    let images = images();
    assert_eq!(
        vm_plan::resolve_disks(&vm("vm-a"), None, lookup(&images)),
        Err(blocked(P::Pending, "TemplateNotFound", "template small does not exist"))
    );
    let t = template("[{name: root, image: nope}]");
    assert_eq!(
        vm_plan::resolve_disks(&vm("vm-a"), Some(&t.spec), lookup(&images)),
        Err(blocked(P::Pending, "ImageNotFound", "image nope does not exist"))
    );
}

const RECORDED: &str = "phase: Stopped\ncpu: 4\nmemory: 8Gi
conditions:
  - {type: ImagesClaimed, status: 'True', reason: Claimed, message: m, lastTransitionTime: '2026-01-01T00:00:00Z'}
disks:
  - {name: root, image: ubuntu, pvcName: vm-a-root, phase: Bound, size: 10Gi}
  - {name: data, image: db, persistent: true, pvcName: db-image, phase: Attached}
  - {name: old, image: gone, pvcName: vm-a-old, phase: Bound, size: 1Gi}";

#[test]
fn resolve_disks_keeps_what_the_vm_recorded_whatever_the_template_says_now() {
    let images = images();
    let recorded = with_status(vm("vm-a"), RECORDED);
    let edited = template("[{name: other, blank: {size: 1Gi}}]");
    for t in [None, Some(&edited.spec)] {
        let r = vm_plan::resolve_disks(&recorded, t, lookup(&images)).unwrap();
        assert_eq!(r.disks, recorded.status.as_ref().unwrap().disks);
        assert_eq!((r.cpu, r.memory.clone()), (4, q("8Gi")));
        // Clone sources only for non-persistent disks whose image is usable now.
        assert_eq!(r.clone_sources, map(&[("root", "ubuntu-image".to_owned())]));
    }
}

#[test]
fn resolve_disks_resolves_afresh_after_a_rejection_or_a_lost_status() {
    let images = images();
    let t = template(TEMPLATE_DISKS);
    let fresh = vm_plan::resolve_disks(&vm("vm-a"), Some(&t.spec), lookup(&images)).unwrap();
    let rejected = with_status(vm("vm-a"), &RECORDED.replace("phase: Stopped", "phase: Rejected"));
    assert_eq!(vm_plan::resolve_disks(&rejected, Some(&t.spec), lookup(&images)), Ok(fresh.clone()));
    let restored = with_status(vm("vm-a"), "phase: Running\ndisks: [{name: root, image: ubuntu}]");
    assert_eq!(vm_plan::resolve_disks(&restored, Some(&t.spec), lookup(&images)), Ok(fresh));
}

#[test]
fn persistent_images_are_the_claims_a_vm_needs_in_disk_order() {
    let r = disks(
        "[{name: a, image: web, persistent: true}, {name: b, image: ubuntu}, {name: c, image: db, persistent: true}, {name: d}]",
    );
    assert_eq!(vm_plan::persistent_images(&r), ["web", "db"]);
}

#[test]
fn a_waiting_vm_follows_the_mode_in_force_when_it_gets_the_image() {
    let images = images();
    // vm-w queued for persistent `ubuntu`; the user made ubuntu non-persistent and that applied.
    let w = waiting("vm-w", 100, "ubuntu");
    let t = template("[{name: data, image: ubuntu}]");
    let r = vm_plan::resolve_disks(&w, Some(&t.spec), lookup(&images)).unwrap();
    assert_eq!(vm_plan::persistent_images(&r.disks), Vec::<String>::new());
}

#[test]
fn a_rejected_vm_stays_rejected_until_its_spec_changes() {
    let rejected = with_status(vm("vm-a"), "phase: Rejected\nobservedGeneration: 1");
    assert!(claim_plan::stays_rejected(&rejected));
    let mut edited = rejected.clone();
    edited.metadata.generation = Some(2);
    assert!(!claim_plan::stays_rejected(&edited));
    assert!(!claim_plan::stays_rejected(&with_status(vm("vm-a"), "phase: Pending\nobservedGeneration: 1")));
    assert!(!claim_plan::stays_rejected(&vm("vm-a")));
}

// ---------------------------------------------------------------------------------------------
// claim::plan_claims, waits_for, first_in_line
// ---------------------------------------------------------------------------------------------

fn claims(on_conflict: OnImageConflict, states: &[(&str, ClaimState)], earlier: &[&str]) -> ClaimPlan {
    claim_plan::plan_claims(on_conflict, &map(states), |image| earlier.contains(&image).then(|| "vm-e".to_owned()))
}

#[test]
fn plan_claims_holds_takes_or_conflicts() {
    use ClaimState::{Free, Mine};
    use OnImageConflict::{Reject, Wait};
    let other = || ClaimState::Other { holder: "vm-a".into() };
    assert_eq!(claims(Reject, &[], &[]), ClaimPlan::Held);
    assert_eq!(claims(Reject, &[("db", Mine), ("logs", Mine)], &[]), ClaimPlan::Held);
    assert_eq!(
        claims(Reject, &[("db", Free), ("logs", Mine), ("web", Free)], &[]),
        ClaimPlan::Take(vec!["db".into(), "web".into()])
    );
    for (strategy, wait) in [(Reject, false), (Wait, true)] {
        // Another holder wins over free images and images this VM holds (it lets them go).
        assert_eq!(
            claims(strategy, &[("db", Mine), ("logs", other()), ("web", Free)], &[]),
            ClaimPlan::Conflict { image: "logs".into(), holder: "vm-a".into(), wait }
        );
    }
    // First come, first served: a VM queues behind the VM that goes first for a free image.
    for strategy in [Reject, Wait] {
        assert_eq!(
            claims(strategy, &[("db", Free), ("logs", Free)], &["logs"]),
            ClaimPlan::Queued { image: "logs".into(), first: "vm-e".into() }
        );
        assert_eq!(claims(strategy, &[("db", Free)], &["logs"]), ClaimPlan::Take(vec!["db".into()]));
    }
}

#[test]
fn the_conflict_message_names_image_and_holder() {
    assert_eq!(
        claim_plan::in_use_message("ubuntu-24", "vm-a"),
        "image ubuntu-24 is persistent and already in use by VirtualMachine vm-a"
    );
}

#[test]
fn waits_for_needs_the_waiting_reason_and_a_recorded_persistent_disk() {
    let w = waiting("vm-w", 100, "db");
    assert!(claim_plan::waits_for(&w, "db"));
    assert!(!claim_plan::waits_for(&w, "logs"));
    assert!(!claim_plan::waits_for(&vm("vm-w"), "db"), "no status");
    let mut gone = w.clone();
    gone.metadata.deletion_timestamp = Some(at(500));
    assert!(!claim_plan::waits_for(&gone, "db"), "a deleted VM waits for nothing");
    let r = resolved("[{name: data, image: db, persistent: true, pvcName: db-image}]");
    let mut rejected = vm("vm-r");
    rejected.status = Some(vm_plan::status(
        &rejected,
        Some(&r),
        &Verdict::Rejected { image: "db".into(), holder: "vm-h".into() },
        &at(1),
    ));
    assert!(!claim_plan::waits_for(&rejected, "db"), "a rejected VM does not wait");
    let mut clone = w.clone();
    clone.status.as_mut().unwrap().disks[0].persistent = false;
    assert!(!claim_plan::waits_for(&clone, "db"), "a clone of the image is no claim");
}

#[test]
fn first_in_line_orders_waiters_by_creation_time_then_name_in_one_namespace() {
    let me = waiting("vm-m", 200, "db");
    let never = |_: &VirtualMachine, _: &str| false;
    let first = |o: &VirtualMachine, image| claim_plan::first_in_line(&me, [o], image, never);
    assert_eq!(first(&waiting("vm-z", 100, "db"), "db").as_deref(), Some("vm-z"));
    assert_eq!(first(&waiting("vm-a", 300, "db"), "db"), None);
    assert_eq!(first(&waiting("vm-z", 100, "logs"), "db"), None);
    assert_eq!(first(&waiting("vm-a", 200, "db"), "db").as_deref(), Some("vm-a"), "same second: the name decides");
    assert_eq!(first(&waiting("vm-z", 200, "db"), "db"), None, "same second: the name decides");
    let mut elsewhere = waiting("vm-z", 100, "db");
    elsewhere.metadata.namespace = Some("other".into());
    assert_eq!(first(&elsewhere, "db"), None, "other namespaces do not count");
    let mut myself = me.clone();
    myself.metadata.creation_timestamp = Some(at(1));
    assert_eq!(first(&myself, "db"), None, "a VM never waits behind itself");
    let mut holder = with_status(
        vm("vm-h"),
        "phase: Running\nobservedGeneration: 1\nconditions: [{type: ImagesClaimed, status: 'True', reason: Claimed, message: m, lastTransitionTime: '1970-01-01T00:00:01Z'}]",
    );
    holder.metadata.creation_timestamp = Some(at(1));
    assert_eq!(first(&holder, "db"), None, "a VM that decided and does not wait does not queue");
    // Only a VM that waits queues behind waiters: a Reject VM takes what is free.
    let mut rejecting = me.clone();
    rejecting.spec.on_image_conflict = OnImageConflict::Reject;
    assert_eq!(claim_plan::first_in_line(&rejecting, [&waiting("vm-z", 100, "db")], "db", never), None);
    assert_eq!(claim_plan::first_in_line(&me, [], "db", never), None);
}

#[test]
fn first_in_line_lets_an_earlier_undecided_vm_that_needs_the_image_go_first() {
    // Applied together: vm-a and vm-b were created in the same second; whoever is reconciled
    // first, vm-a (by name) goes first, whatever either's onImageConflict.
    let created = |name: &str, secs: i64| {
        let mut v = vm(name);
        v.metadata.creation_timestamp = Some(at(secs));
        v
    };
    let (a, b) = (created("vm-a", 100), created("vm-b", 100));
    let needs_db = |_: &VirtualMachine, image: &str| image == "db";
    // Both waited for an Image to be ready (a GitOps apply): that is no decision about claims.
    let (a, b) = (
        with_status(
            a,
            "phase: Pending\nobservedGeneration: 1\nconditions: [{type: ImagesClaimed, status: 'False', reason: ImageNotReady, message: m, lastTransitionTime: '1970-01-01T00:00:01Z'}]",
        ),
        with_status(
            b,
            "phase: Pending\nobservedGeneration: 1\nconditions: [{type: ImagesClaimed, status: 'False', reason: ImageNotReady, message: m, lastTransitionTime: '1970-01-01T00:00:01Z'}]",
        ),
    );
    assert_eq!(claim_plan::first_in_line(&b, [&a], "db", needs_db).as_deref(), Some("vm-a"));
    assert_eq!(claim_plan::first_in_line(&a, [&b], "db", needs_db), None, "the later one never goes first");
    assert_eq!(claim_plan::first_in_line(&b, [&a], "db", |_, _| false), None, "only a VM that would claim it now");
    // Once vm-a came to its claims (it holds, lost or waits), the queue rules decide.
    let lost = with_status(
        a.clone(),
        "phase: Rejected\nobservedGeneration: 1\nconditions: [{type: ImagesClaimed, status: 'False', reason: ImageInUse, message: m, lastTransitionTime: '1970-01-01T00:00:01Z'}]",
    );
    assert!(!claim_plan::before_claims(&lost));
    assert_eq!(claim_plan::first_in_line(&b, [&lost], "db", needs_db), None);
    // A deleted or sticky-Rejected VM never goes first.
    let mut gone = a.clone();
    gone.metadata.deletion_timestamp = Some(at(500));
    assert_eq!(claim_plan::first_in_line(&b, [&gone], "db", needs_db), None);
}

// ---------------------------------------------------------------------------------------------
// virtual_machine::plan_children
// ---------------------------------------------------------------------------------------------

const CHILD_DISKS: &str = "[{name: root, image: ubuntu, pvcName: vm-a-root},
  {name: data, image: db, persistent: true, pvcName: db-image}, {name: scratch, pvcName: vm-a-scratch}]";

fn children(run: RunStrategy, pvcs: &[(&str, Child)], pod: Child) -> vm_plan::ChildrenPlan {
    vm_plan::plan_children(run, &disks(CHILD_DISKS), &map(pvcs), "vm-a-launcher", &pod)
}

#[test]
fn plan_children_creates_missing_pvcs_and_the_pod_of_a_running_vm() {
    // The persistent image's PVC is not the VM's child: whoever owns it, it is no conflict.
    let plan = children(RunStrategy::Always, &[("db-image", Child::Foreign)], Child::Missing);
    assert_eq!(
        plan,
        vm_plan::ChildrenPlan {
            create_pvcs: vec!["root".into(), "scratch".into()],
            pod: PodAction::Create,
            conflict: None
        }
    );
    let all = [("vm-a-root", ours("Bound")), ("vm-a-scratch", ours("Pending"))];
    let converged = children(RunStrategy::Always, &all, ours("Running"));
    assert_eq!((converged.create_pvcs.len(), converged.pod, converged.conflict), (0, PodAction::Nothing, None));
    // A Pod on its way out is waited for, then created again.
    let leaving = Child::Ours { phase: Some("Running".into()), deleting: true };
    assert_eq!(children(RunStrategy::Always, &all, leaving).pod, PodAction::Nothing);
}

#[test]
fn plan_children_deletes_the_pod_of_a_halted_vm_and_keeps_its_disks() {
    let all = [("vm-a-root", ours("Bound")), ("vm-a-scratch", ours("Bound"))];
    assert_eq!(children(RunStrategy::Halted, &all, ours("Running")).pod, PodAction::Delete);
    let leaving = Child::Ours { phase: None, deleting: true };
    assert_eq!(children(RunStrategy::Halted, &all, leaving).pod, PodAction::Nothing);
    let plan = children(RunStrategy::Halted, &[], Child::Missing);
    assert_eq!((plan.create_pvcs, plan.pod), (vec!["root".to_owned(), "scratch".to_owned()], PodAction::Nothing));
}

#[test]
fn plan_children_never_touches_what_is_not_ours() {
    let plan = children(RunStrategy::Always, &[("vm-a-scratch", Child::Foreign)], Child::Missing);
    assert_eq!(
        plan,
        vm_plan::ChildrenPlan {
            create_pvcs: vec![],
            pod: PodAction::Nothing,
            conflict: Some(("PersistentVolumeClaim", "vm-a-scratch".into()))
        }
    );
    let plan = children(RunStrategy::Always, &[("vm-a-root", ours("Bound"))], Child::Foreign);
    assert_eq!(
        plan,
        vm_plan::ChildrenPlan {
            create_pvcs: vec!["scratch".into()],
            pod: PodAction::Nothing,
            conflict: Some(("Pod", "vm-a-launcher".into()))
        }
    );
}

// ---------------------------------------------------------------------------------------------
// virtual_machine::status
// ---------------------------------------------------------------------------------------------

const RUNNING_DISKS: &str = "[{name: root, image: ubuntu, pvcName: vm-a-root, phase: Bound, size: 20Gi},
  {name: data, image: db, persistent: true, pvcName: db-image, phase: Attached}]";

/// A provisioned VM whose launcher Pod is `pod`; the guest runs (Pod Ready) when it is Running.
fn provisioned(pod: Child) -> Verdict {
    let ready = matches!(&pod, Child::Ours { phase: Some(p), .. } if p == "Running");
    Verdict::Provisioned { pod, launcher: Box::new(LauncherView { ready, ..Default::default() }) }
}

#[test]
fn status_of_a_running_vm() {
    let r = resolved(RUNNING_DISKS);
    let s = settle(&vm("vm-a"), Some(&r), &provisioned(ours("Running")));
    let [claimed, created] = claimed_and_created("Claimed", "every persistent image is held by this VM");
    assert_eq!(
        (s.phase, decided(&s.conditions)),
        (Some(P::Running), vec![claimed, created, Cond::new("Ready", true, "Running", "QEMU runs the guest")])
    );
    assert_eq!(s.disks, r.disks);
    assert_eq!((s.cpu, s.memory), (Some(2), Some(q("4Gi"))));
    assert_eq!(s.launcher_pod.as_deref(), Some("vm-a-launcher"));
    assert_eq!(s.observed_generation, Some(1));
    for c in &s.conditions {
        assert_eq!((c.observed_generation, &c.last_transition_time), (Some(1), &at(1000)), "{}", c.r#type);
    }
}

#[test]
fn status_follows_the_launcher_pod_and_the_run_strategy() {
    let r = resolved("[{name: scratch, pvcName: vm-a-scratch, phase: Bound, size: 1Gi}]");
    let deleting = |phase: &str| Child::Ours { phase: Some(phase.into()), deleting: true };
    let cases = [
        (RunStrategy::Always, ours("Pending"), P::Starting, "Starting", "QEMU does not run the guest yet"),
        (
            RunStrategy::Always,
            deleting("Running"),
            P::Starting,
            "Starting",
            "the launcher Pod is stopping; a new one starts once it is gone",
        ),
        (RunStrategy::Always, Child::Missing, P::Provisioning, "Provisioning", "creating the launcher Pod"),
        (RunStrategy::Halted, Child::Missing, P::Stopped, "Halted", "runStrategy is Halted: the VM is stopped"),
        (RunStrategy::Halted, ours("Running"), P::Stopped, "Stopping", "removing the launcher Pod"),
        (RunStrategy::Halted, deleting("Running"), P::Stopped, "Stopping", "removing the launcher Pod"),
    ];
    for (run, pod, phase, reason, message) in cases {
        let mut v = vm("vm-a");
        v.spec.run_strategy = run;
        let has_pod = pod != Child::Missing;
        let s = settle(&v, Some(&r), &provisioned(pod.clone()));
        let [claimed, created] = claimed_and_created("NoPersistentImages", "no persistent image to claim");
        // Halted and stopped is what the spec asks for: Ready, not Reconciling (GitOps health).
        let converged = reason == "Halted";
        let wanted = vec![claimed, created, Cond::new("Ready", converged, reason, message)];
        assert_eq!((s.phase, decided(&s.conditions)), (Some(phase), wanted), "{run:?} {pod:?}");
        let reconciling = if converged { ConditionStatus::False } else { ConditionStatus::True };
        assert_eq!(health(&s.conditions)[0].0, reconciling, "{run:?} {pod:?}");
        assert_eq!(s.launcher_pod.is_some(), has_pod, "{run:?} {pod:?}");
        assert_eq!(s.disks, r.disks, "disks are kept while halted");
    }
}

#[test]
fn status_of_a_blocked_vm_names_the_blocker() {
    let blocker = blocked(P::Pending, "TemplateNotFound", "template small does not exist");
    let v = vm("vm-a");
    let r = resolved(RUNNING_DISKS);
    let s = settle(&v, Some(&r), &Verdict::Blocked { blocker: blocker.clone(), claimed: false });
    assert_eq!((s.phase, decided(&s.conditions)), (Some(P::Pending), all_false("TemplateNotFound", &blocker.message)));
    assert_eq!((s.disks.len(), s.cpu, s.launcher_pod), (0, None, None), "nothing recorded before the claims");
    let failed = blocked(P::Failed, "InvalidTemplate", "disk x must name exactly one of image or blank");
    assert_eq!(
        outcome(&v, None, &Verdict::Blocked { blocker: failed.clone(), claimed: false }),
        (Some(P::Failed), all_false("InvalidTemplate", &failed.message))
    );
    // After the claims (e.g. a name conflict) the claims stand and the disks are recorded.
    let conflict = blocked(P::Pending, "NameConflict", "PersistentVolumeClaim vm-a-root exists and ...");
    let s = settle(&v, Some(&r), &Verdict::Blocked { blocker: conflict.clone(), claimed: true });
    let mut wanted = all_false("NameConflict", &conflict.message);
    wanted[0] = Cond::new("ImagesClaimed", true, "Claimed", "every persistent image is held by this VM");
    assert_eq!((s.phase, decided(&s.conditions)), (Some(P::Pending), wanted));
    assert_eq!((s.disks, s.cpu), (r.disks, Some(2)));
}

#[test]
fn status_of_a_rejected_vm_names_image_and_holder() {
    let r = resolved(RUNNING_DISKS);
    let verdict = Verdict::Rejected { image: "db".into(), holder: "vm-b".into() };
    let s = settle(&vm("vm-a"), Some(&r), &verdict);
    let message = "image db is persistent and already in use by VirtualMachine vm-b; this VM stays Rejected: to \
                   retry once the image is free, change its spec (e.g. onImageConflict: Wait) or delete and recreate it";
    let mut wanted = all_false("ImageInUse", message);
    wanted[0].message = "image db is persistent and already in use by VirtualMachine vm-b".into();
    assert_eq!((s.phase, decided(&s.conditions)), (Some(P::Rejected), wanted));
    // Rejected cannot work without a spec change: Stalled, not Reconciling for ever.
    assert_eq!(
        health(&s.conditions),
        [(ConditionStatus::False, "Stalled".into()), (ConditionStatus::True, "ImageInUse".into())]
    );
    assert_eq!(s.launcher_pod, None);
}

#[test]
fn status_of_a_waiting_vm_says_for_what_and_whom() {
    let r = resolved(RUNNING_DISKS);
    let mut v = vm("vm-a");
    v.spec.on_image_conflict = OnImageConflict::Wait;
    let held = Verdict::Waiting { image: "db".into(), holder: "vm-b".into() };
    assert_eq!(
        outcome(&v, Some(&r), &held),
        (Some(P::Pending), all_false("WaitingForImage", "waiting for image db, held by VirtualMachine vm-b"))
    );
    let queued = Verdict::Queued { image: "db".into(), first: "vm-c".into() };
    let message = "waiting for image db: VirtualMachine vm-c, created earlier, is first in line";
    assert_eq!(outcome(&v, Some(&r), &queued), (Some(P::Pending), all_false("WaitingForImage", message)));
    // A waiting VM records its disks: that is how others see it in the queue.
    assert_eq!(settle(&v, Some(&r), &queued).disks, r.disks);
}

#[test]
fn status_of_a_terminating_vm_keeps_its_claims_until_they_are_released() {
    let r = resolved(RUNNING_DISKS);
    let mut v = vm("vm-a");
    let running = vm_plan::status(&v, Some(&r), &provisioned(ours("Running")), &at(100));
    v.status = Some(running.clone());
    let s = settle(&v, None, &Verdict::Terminating);
    let [claimed, created] = claimed_and_created("Claimed", "every persistent image is held by this VM");
    let ready = Cond::new("Ready", false, "Terminating", "releasing the launcher Pod and claims");
    assert_eq!((s.phase, decided(&s.conditions)), (Some(P::Terminating), vec![claimed, created, ready]));
    assert_eq!((since(&s.conditions, "ImagesClaimed"), since(&s.conditions, "Ready")), (at(100), at(1000)));
    assert_eq!((&s.disks, &s.launcher_pod, s.cpu), (&running.disks, &running.launcher_pod, running.cpu));
}

#[test]
fn transition_times_move_only_when_a_condition_status_changes() {
    let r = resolved(RUNNING_DISKS);
    let mut v = vm("vm-a");
    let template_missing = blocked(P::Pending, "TemplateNotFound", "template small does not exist");
    v.status =
        Some(vm_plan::status(&v, None, &Verdict::Blocked { blocker: template_missing, claimed: false }, &at(100)));
    // Another reason with the same status keeps the time.
    let image_missing = blocked(P::Pending, "ImageNotFound", "image db does not exist");
    v.status = Some(vm_plan::status(&v, None, &Verdict::Blocked { blocker: image_missing, claimed: false }, &at(200)));
    let s = v.status.as_ref().unwrap();
    assert_eq!((s.conditions[0].reason.as_str(), since(&s.conditions, "Ready")), ("ImageNotFound", at(100)));
    // Claims and disks done, Pod starting: ImagesClaimed and DisksReady flip, Ready does not.
    v.status = Some(vm_plan::status(&v, Some(&r), &provisioned(ours("Pending")), &at(300)));
    let s = v.status.as_ref().unwrap();
    assert_eq!(["ImagesClaimed", "DisksReady", "Ready"].map(|t| since(&s.conditions, t)), [at(300), at(300), at(100)]);
    // The Pod runs: only Ready flips.
    let s = vm_plan::status(&v, Some(&r), &provisioned(ours("Running")), &at(400));
    assert_eq!(["ImagesClaimed", "DisksReady", "Ready"].map(|t| since(&s.conditions, t)), [at(300), at(300), at(400)]);
    // A spec change moves observedGeneration, not the transition times.
    let mut edited = v.clone();
    edited.status = Some(s.clone());
    edited.metadata.generation = Some(2);
    let again = vm_plan::status(&edited, Some(&r), &provisioned(ours("Running")), &at(500));
    assert_eq!(again.observed_generation, Some(2));
    assert!(again.conditions.iter().all(|c| c.observed_generation == Some(2)));
    assert_eq!(
        again.conditions.iter().map(|c| &c.last_transition_time).collect::<Vec<_>>(),
        [&at(300), &at(300), &at(400), &at(400), &at(100)]
    );
}

// ---------------------------------------------------------------------------------------------
// image::plan
// ---------------------------------------------------------------------------------------------

const BLANK: &str = "spec: {size: 10Gi, storageClassName: fast, volumeMode: Block, source: {blank: {}}}";

#[test]
fn a_new_blank_image_asks_for_its_finalizer_and_its_pvc() {
    let img = image("disk", BLANK);
    let plan = settle_image(&observe(&img, ImagePvc::Missing));
    assert_eq!(plan.finalizer, Finalizer::Add);
    assert_eq!(
        plan.create_pvc,
        Some(PvcRequest {
            name: "disk-image".into(),
            size: q("10Gi"),
            storage_class: Some("fast".into()),
            volume_mode: VolumeMode::Block,
            clone_from: None,
            from_snapshot: None,
            annotations: Default::default(),
        })
    );
    let s = &plan.status;
    assert_eq!(
        (s.phase, s.persistent, s.pvc_name.as_deref(), s.capacity.clone()),
        (Some(ImagePhase::Pending), Some(false), Some("disk-image"), Some(q("10Gi")))
    );
    assert_eq!(
        (s.running_vms, s.consumers.len(), &s.claimed_by, &s.progress, s.observed_generation),
        (Some(0), 0, &None, &None, Some(1))
    );
    assert_eq!(
        decided(&s.conditions),
        vec![
            Cond::new("Ready", false, "Provisioning", "creating the image's PVC"),
            Cond::new("InUse", false, "Unused", "no VirtualMachine uses this image"),
            Cond::new("PersistenceChangePending", false, "Applied", "spec.persistent is in force"),
        ]
    );
}

#[test]
fn an_image_is_ready_once_its_pvc_exists_bound_or_not() {
    let mut img = finalized(image("disk", BLANK));
    // Non-persistent: clones are sized from what storage gives the PVC, so it must be bound.
    let plan = settle_image(&observe(&img, present(true, "Pending", None)));
    assert_eq!(image_ready(&plan).1.reason, "PvcNotBound");
    assert_eq!(plan.status.phase, Some(ImagePhase::Pending));
    // Persistent, WaitForFirstConsumer: the PVC binds with the first Pod, so Pending is ready enough.
    img.spec.persistent = true;
    let plan = settle_image(&observe(&img, present(true, "Pending", None)));
    let ready = Cond::new("Ready", true, "PvcReady", "PersistentVolumeClaim disk-image");
    assert_eq!(image_ready(&plan), (Some(ImagePhase::Ready), ready));
    assert_eq!((plan.finalizer, &plan.create_pvc), (Finalizer::Keep, &None));
    assert_eq!(plan.status.capacity, Some(q("10Gi")), "the requested size until the PVC reports its own");
    // Storage gave more than asked (10Gi): the capacity is what it gave.
    let mut bigger = present(true, "Bound", Some("12Gi"));
    if let ImagePvc::Present { requested, .. } = &mut bigger {
        *requested = Some(q("10Gi"));
    }
    let plan = settle_image(&observe(&img, bigger));
    assert_eq!((plan.status.phase, plan.status.capacity), (Some(ImagePhase::Ready), Some(q("12Gi"))));
    // A spec.size below what the PVC asks for is refused: volumes do not shrink.
    let mut shrunk = img.clone();
    shrunk.spec.size = Some(q("5Gi"));
    let plan = settle_image(&observe(&shrunk, present(true, "Bound", Some("10Gi"))));
    // The image stays usable at the size it has; the refusal is Stalled, with a Warning.
    assert_eq!(plan.status.phase, Some(ImagePhase::Ready));
    assert_eq!(find(&plan.status.conditions, "Resized").unwrap().reason, "InvalidSize");
    assert_eq!(health(&plan.status.conditions)[1], (ConditionStatus::True, "InvalidSize".into()));
    assert_eq!(plan.event.as_ref().map(|e| (e.warning, e.reason.as_str())), Some((true, "InvalidSize")));
    let lost = settle_image(&observe(&img, present(true, "Lost", Some("12Gi"))));
    let message = "PersistentVolumeClaim disk-image lost its volume";
    assert_eq!(image_ready(&lost), (Some(ImagePhase::Error), Cond::new("Ready", false, "PvcLost", message)));
}

#[test]
fn an_image_spec_that_cannot_work_is_an_error() {
    let cases = [
        ("spec: {source: {blank: {}}}", "MissingSize", "spec.size is required for a blank image"),
        ("spec: {size: '0', source: {blank: {}}}", "InvalidSize", "spec.size 0 is not a positive size"),
        ("spec: {size: ten, source: {blank: {}}}", "InvalidSize", "spec.size ten is not a positive size"),
        (
            "spec: {size: 1Gi, source: {}}",
            "InvalidSource",
            "spec.source must name exactly one of blank, pvc, image, http, virtualMachineDisk",
        ),
        (
            "spec: {size: 1Gi, source: {blank: {}, pvc: {name: data}}}",
            "InvalidSource",
            "spec.source must name exactly one of blank, pvc, image, http, virtualMachineDisk",
        ),
    ];
    for (spec, reason, message) in cases {
        let img = finalized(image("disk", spec));
        let plan = settle_image(&observe(&img, ImagePvc::Missing));
        assert_eq!(image_ready(&plan), (Some(ImagePhase::Error), Cond::new("Ready", false, reason, message)), "{spec}");
        assert_eq!((&plan.create_pvc, &plan.status.pvc_name), (&None, &None), "{spec}");
    }
}

#[test]
fn a_pvc_with_the_image_pvc_name_that_is_not_ours_is_a_name_conflict() {
    let img = finalized(image("disk", BLANK));
    let plan = settle_image(&observe(&img, present(false, "Bound", Some("10Gi"))));
    let message = "PersistentVolumeClaim disk-image exists and is not this image's; vmkeep leaves it alone";
    assert_eq!(image_ready(&plan), (Some(ImagePhase::Error), Cond::new("Ready", false, "NameConflict", message)));
    assert_eq!((&plan.create_pvc, &plan.status.pvc_name, &plan.status.capacity), (&None, &None, &None));
}

#[test]
fn an_adopted_pvc_is_waited_for_and_never_created() {
    let img = finalized(image("adopted", "spec: {size: 1Gi, source: {pvc: {name: data}}}"));
    let missing = settle_image(&observe(&img, ImagePvc::Missing));
    let message = "PersistentVolumeClaim data does not exist";
    assert_eq!(image_ready(&missing), (Some(ImagePhase::Pending), Cond::new("Ready", false, "PvcNotFound", message)));
    assert_eq!((&missing.create_pvc, &missing.status.pvc_name), (&None, &None));
    // Not ours, and that is the point: adopted, not a conflict.
    let there = settle_image(&observe(&img, present(false, "Bound", Some("5Gi"))));
    assert_eq!(
        image_ready(&there),
        (Some(ImagePhase::Ready), Cond::new("Ready", true, "PvcReady", "PersistentVolumeClaim data"))
    );
    assert_eq!((there.status.pvc_name.as_deref(), there.status.capacity), (Some("data"), Some(q("5Gi"))));
}

#[test]
fn a_disk_vmkeep_made_is_never_adopted() {
    // Found by a breaker: an Image adopting another Image's PVC (or a VM's disk) would hold its
    // own claim on the same PVC, so two VMs could mount it.
    let img = finalized(image("alias", "spec: {persistent: true, source: {pvc: {name: data-image}}}"));
    let mut theirs = present(false, "Bound", Some("1Gi"));
    if let ImagePvc::Present { vmkeep_disk, .. } = &mut theirs {
        *vmkeep_disk = true;
    }
    let plan = settle_image(&observe(&img, theirs));
    let (phase, ready) = image_ready(&plan);
    assert_eq!((phase, ready.reason.as_str()), (Some(ImagePhase::Error), "PvcManagedByVmkeep"));
    assert!(ready.message.contains("data-image") && ready.message.contains("source.image"), "{}", ready.message);
    assert_eq!((&plan.create_pvc, &plan.status.pvc_name), (&None, &None));
}

fn golden(status: &str) -> Image {
    image("golden", &format!("spec: {{size: 10Gi, storageClassName: fast, source: {{blank: {{}}}}}}\nstatus: {status}"))
}

const COPY: &str = "spec: {source: {image: {name: golden}}}";

/// The status of a persistent source image that vm-a holds.
const HELD: &str = "{phase: UsedPersistent, persistent: true, pvcName: golden-image, capacity: 10Gi,
  claimedBy: {name: vm-a, uid: uid-vm-a, since: '2024-01-01T00:00:00Z'}}";

#[test]
fn a_clone_waits_for_its_source_image() {
    let copy = finalized(image("copy", COPY));
    let held = golden(HELD);
    let importing = golden("{phase: Importing}");
    let no_capacity = golden("{phase: Ready, persistent: false, pvcName: golden-image}");
    let cases = [
        (None, "SourceNotFound", "source image golden does not exist"),
        (
            Some(&held),
            "SourceInUse",
            "source image golden is persistent and VirtualMachine vm-a runs with it; it is cloned once that VM is \
             Halted or gone (a disk a guest writes is never copied)",
        ),
        (Some(&importing), "SourceNotReady", "source image golden is not ready"),
        (Some(&no_capacity), "SourceNotReady", "source image golden has no capacity yet"),
    ];
    for (source, reason, message) in cases {
        let writer = (reason == "SourceInUse").then(|| "vm-a".to_owned());
        let obs = ImageObservation { source_image: source, source_writer: writer, ..observe(&copy, ImagePvc::Missing) };
        let plan = settle_image(&obs);
        assert_eq!(image_ready(&plan), (Some(ImagePhase::Pending), Cond::new("Ready", false, reason, message)));
        assert_eq!(plan.create_pvc, None, "{reason}");
    }
}

#[test]
fn a_clone_copies_its_source_pvc_at_the_larger_size_in_the_source_class() {
    let source = golden("{phase: Used, persistent: false, pvcName: golden-image, capacity: 10Gi}");
    let request = |spec: &str| {
        let copy = finalized(image("copy", spec));
        let plan = settle_image(&ImageObservation { source_image: Some(&source), ..observe(&copy, ImagePvc::Missing) });
        let cloning = Cond::new("Ready", false, "Cloning", "cloning the source image");
        assert_eq!(image_ready(&plan), (Some(ImagePhase::Cloning), cloning), "{spec}");
        plan.create_pvc.expect("a PVC to create")
    };
    assert_eq!(
        request(COPY),
        PvcRequest {
            name: "copy-image".into(),
            size: q("10Gi"),
            storage_class: Some("fast".into()),
            volume_mode: VolumeMode::Filesystem,
            clone_from: Some("golden-image".into()),
            from_snapshot: None,
            annotations: BTreeMap::from([("vmkeep.io/clone-strategy".into(), "csi-clone".into())]),
        }
    );
    let grown = request("spec: {size: 20Gi, storageClassName: slow, source: {image: {name: golden}}}");
    assert_eq!((grown.size, grown.storage_class), (q("20Gi"), Some("slow".into())));
    assert_eq!(request("spec: {size: 5Gi, source: {image: {name: golden}}}").size, q("10Gi"));
    // A disabled source can still be cloned.
    let disabled = golden("{phase: Disabled, persistent: false, pvcName: golden-image, capacity: 10Gi}");
    let copy = finalized(image("copy", COPY));
    let plan = image_plan::plan(
        &ImageObservation { source_image: Some(&disabled), ..observe(&copy, ImagePvc::Missing) },
        &at(1),
    );
    assert_eq!(plan.status.phase, Some(ImagePhase::Cloning));
    // The clone is done when its PVC is bound.
    for (pvc_phase, phase) in [("Pending", ImagePhase::Cloning), ("Bound", ImagePhase::Ready)] {
        let obs =
            ImageObservation { source_image: Some(&source), ..observe(&copy, present(true, pvc_phase, Some("10Gi"))) };
        let plan = settle_image(&obs);
        assert_eq!((plan.status.phase, &plan.create_pvc), (Some(phase), &None), "{pvc_phase}");
        assert_eq!(plan.status.capacity, Some(q("10Gi")));
    }
}

/// A helper Pod of image PVC `pvc` in `state`, made for generation `generation`.
fn mover(pvc: &str, role: Role, state: MoverState, generation: i64) -> ObservedMover {
    let name = Role::pods("ns", pvc).into_iter().find(|(r, _)| *r == role).map(|(_, n)| n).unwrap();
    ObservedMover { name, role, state, phase: Some("Running".into()), generation: Some(generation) }
}

/// An image PVC of ours, bound, whose annotations say `fill`.
fn filling(fill: CloneView) -> ImagePvc {
    let mut pvc = present(true, "Bound", Some("24Mi"));
    if let ImagePvc::Present { fill: f, .. } = &mut pvc {
        **f = fill;
    }
    pvc
}

#[test]
fn an_http_image_is_sized_by_a_probe_then_imported_then_recorded() {
    let mut img = finalized(image("os", "spec: {source: {http: {url: 'http://h/os.qcow2', format: qcow2}}}"));
    img.metadata.generation = Some(1);
    // No spec.size: a probe Pod first.
    let plan = settle_image(&observe(&img, ImagePvc::Missing));
    let (phase, ready) = image_ready(&plan);
    assert_eq!((phase, ready.reason.as_str()), (Some(ImagePhase::Importing), "Sizing"));
    let probe = &plan.create_pods[0];
    assert_eq!(probe.name_any(), "os-image-size");
    let args = probe.spec.as_ref().unwrap().containers[0].args.clone().unwrap();
    assert!(args.contains(&"--probe".to_owned()) && args.contains(&"--format=qcow2".to_owned()), "{args:?}");
    assert_eq!(probe.spec.as_ref().unwrap().automount_service_account_token, Some(false), "no API credentials");
    assert_eq!(plan.status.transfer_pod.as_ref().map(|t| t.role.as_str()), Some("Probe"));
    // A probe that failed for an older spec (a URL fixed since) is made again.
    let stale = mover("os-image", Role::Probe, MoverState::Failed("ImportFailed: HTTP 404".into()), 0);
    let plan = image_plan::plan(&ImageObservation { movers: vec![stale], ..observe(&img, ImagePvc::Missing) }, &at(1));
    assert_eq!(
        (plan.status.phase, plan.delete_pods.clone()),
        (Some(ImagePhase::Importing), vec!["os-image-size".to_owned()])
    );
    // Its size makes the PVC (rounded up to MiB), marked as waiting for an import.
    let sized = mover("os-image", Role::Probe, MoverState::Done("Size: 25165825".into()), 1);
    let plan =
        image_plan::plan(&ImageObservation { movers: vec![sized.clone()], ..observe(&img, ImagePvc::Missing) }, &at(1));
    let request = plan.create_pvc.expect("the PVC");
    assert_eq!(request.size, q("25Mi"));
    assert_eq!(request.annotations.get("vmkeep.io/import-source").map(String::as_str), Some("http://h/os.qcow2"));
    // The PVC exists: the probe goes, the importer comes.
    let pending = CloneView { import_source: Some("http://h/os.qcow2".into()), ..Default::default() };
    let plan = settle_image(&ImageObservation { movers: vec![sized], ..observe(&img, filling(pending.clone())) });
    assert_eq!(plan.delete_pods, vec!["os-image-size".to_owned()]);
    assert_eq!(plan.create_pods.iter().map(|p| p.name_any()).collect::<Vec<_>>(), vec!["os-image-import".to_owned()]);
    let args = plan.create_pods[0].spec.as_ref().unwrap().containers[0].args.clone().unwrap();
    assert!(args.contains(&"--target=/var/lib/vmkeep/target".to_owned()), "{args:?}");
    // Running: Importing with its progress, read again every few seconds.
    let running = mover("os-image", Role::Import, MoverState::Running { note: None }, 1);
    let progress = Progress { downloaded: 42, total: Some(100), retries: 1, last_error: Some("HTTP 500".into()) };
    let obs =
        ImageObservation { movers: vec![running], progress: Some(progress), ..observe(&img, filling(pending.clone())) };
    let plan = settle_image(&obs);
    assert_eq!(plan.status.phase, Some(ImagePhase::Importing));
    assert_eq!((plan.status.progress.as_deref(), plan.status.import_retries), (Some("42%"), Some(1)));
    assert!(image_ready(&plan).1.message.ends_with("; retrying after: HTTP 500"), "{:?}", image_ready(&plan));
    assert_eq!(plan.requeue, Some(image_plan::PROGRESS_PERIOD));
    assert!(plan.create_pods.is_empty());
    // Done: the digest and retries are recorded on the PVC, the importer goes.
    let digest = format!("sha256:{}", "ab".repeat(32));
    let message = format!("Imported: {digest} 25165824 bytes (downloaded 9 bytes, 2 retries, 1.0 s)");
    let done = mover("os-image", Role::Import, MoverState::Done(message), 1);
    let plan =
        image_plan::plan(&ImageObservation { movers: vec![done], ..observe(&img, filling(pending.clone())) }, &at(1));
    assert_eq!(plan.record, Some(Record { pvc: "os-image".into(), digest: digest.clone(), retries: Some(2) }));
    assert_eq!(plan.delete_pods, vec!["os-image-import".to_owned()]);
    assert_eq!(plan.status.phase, Some(ImagePhase::Ready));
    // Recorded: Ready with its digest; nothing more to do.
    let recorded = CloneView { digest: Some(digest.clone()), import_retries: Some(2), ..pending.clone() };
    let plan = settle_image(&observe(&img, filling(recorded)));
    let s = &plan.status;
    assert_eq!(
        (s.phase, s.digest.as_deref(), s.progress.as_deref(), s.import_retries),
        (Some(ImagePhase::Ready), Some(digest.as_str()), Some("100%"), Some(2))
    );
    assert!(plan.create_pods.is_empty() && plan.delete_pods.is_empty() && s.transfer_pod.is_none());
    // An importer left behind after its record (its deletion failed) goes.
    let left = mover("os-image", Role::Import, MoverState::Done("Imported: ...".into()), 1);
    let recorded = CloneView { digest: Some(digest.clone()), ..pending };
    let plan = settle_image(&ImageObservation { movers: vec![left], ..observe(&img, filling(recorded)) });
    assert_eq!((plan.delete_pods.clone(), plan.record.clone()), (vec!["os-image-import".to_owned()], None));
}

#[test]
fn a_failed_import_is_terminal_until_the_spec_changes() {
    let mut img = finalized(image("os", "spec: {size: 16Mi, source: {http: {url: 'http://h/os.img', sha256: '00'}}}"));
    img.metadata.generation = Some(2);
    let pending = CloneView { import_source: Some("http://h/os.img".into()), ..Default::default() };
    let failed = |generation| {
        let why = "ChecksumMismatch: expected 00, downloaded ab".to_owned();
        mover("os-image", Role::Import, MoverState::Failed(why), generation)
    };
    let plan = settle_image(&ImageObservation { movers: vec![failed(2)], ..observe(&img, filling(pending.clone())) });
    let (phase, ready) = image_ready(&plan);
    assert_eq!(
        (phase, ready.reason.as_str(), ready.message.as_str()),
        (Some(ImagePhase::Error), "ChecksumMismatch", "expected 00, downloaded ab")
    );
    assert!(plan.delete_pods.is_empty() && plan.create_pods.is_empty(), "kept for its logs, not retried");
    // The spec changed since: the failed Pod goes and the import runs again.
    let plan = image_plan::plan(
        &ImageObservation { movers: vec![failed(1)], ..observe(&img, filling(pending.clone())) },
        &at(1),
    );
    assert_eq!(
        (plan.status.phase, plan.delete_pods.clone()),
        (Some(ImagePhase::Importing), vec!["os-image-import".to_owned()])
    );
    // A Pod that died without a word (evicted, out of memory) is replaced.
    let died = mover("os-image", Role::Import, MoverState::Failed("the Pod failed".into()), 2);
    let plan = image_plan::plan(&ImageObservation { movers: vec![died], ..observe(&img, filling(pending)) }, &at(1));
    assert_eq!(
        (plan.status.phase, plan.delete_pods.clone()),
        (Some(ImagePhase::Importing), vec!["os-image-import".to_owned()])
    );
}

#[test]
fn an_image_pvc_that_binds_late_is_bound_by_a_pod_when_it_must_be_cloned() {
    let img = finalized(image("os", "spec: {size: 1Gi, source: {blank: {}}}"));
    let pending = present(true, "Pending", Some("1Gi"));
    let binder_of = |plan: &ImagePlan| plan.create_pods.iter().map(|p| p.name_any()).collect::<Vec<_>>();
    // Persistent and nothing clones it: the scheduler binds it with its first VM.
    let mut persistent = img.clone();
    persistent.spec.persistent = true;
    let alone = ImageObservation { binds_late: true, ..observe(&persistent, pending.clone()) };
    assert!(settle_image(&alone).create_pods.is_empty());
    // Non-persistent (VMs clone it), or an Image waits to clone it: a binder Pod mounts it
    // (read-only) once.
    for obs in [
        ImageObservation { binds_late: true, ..observe(&img, pending.clone()) },
        ImageObservation { wanted_by_clones: true, ..alone.clone() },
    ] {
        let plan = settle_image(&obs);
        assert_eq!(binder_of(&plan), ["os-image-bind"]);
        let pod = to_json(&plan.create_pods[0]);
        assert_eq!(
            pod["spec"]["volumes"][0]["persistentVolumeClaim"],
            json!({"claimName": "os-image", "readOnly": true})
        );
        assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
        assert_eq!(plan.status.transfer_pod.as_ref().map(|t| t.role.as_str()), Some("Bind"));
    }
    // In a class that binds at once, never.
    let immediate = ImageObservation { consumers: vec!["vm-a".into()], ..observe(&img, pending) };
    assert!(settle_image(&immediate).create_pods.is_empty());
    // Deleted while an Image clones it: kept until that clone has its data, and says which.
    let gone = deleting(img.clone());
    let cloning = vec!["copy".to_owned()];
    let held = ImageObservation {
        wanted_by_clones: true,
        cloning_now: cloning,
        ..observe(&gone, present(true, "Bound", Some("1Gi")))
    };
    let plan = settle_image(&held);
    assert_eq!(plan.finalizer, Finalizer::Keep);
    assert_eq!(image_ready(&plan).1.message, "deleted: waits until no longer used by Image copy (cloning it)");
    // One that only waits (Pending) does not hold it: it gives up with it (no deadlock).
    let waiting = ImageObservation { cloning_now: Vec::new(), ..held };
    assert_eq!(settle_image(&waiting).finalizer, Finalizer::Remove);
    // Bound: the binder goes.
    let done = mover("os-image", Role::Bind, MoverState::Done(String::new()), 0);
    let bound = ImageObservation {
        movers: vec![done],
        binds_late: false,
        ..observe(&img, present(true, "Bound", Some("1Gi")))
    };
    assert_eq!(settle_image(&bound).delete_pods, ["os-image-bind"]);
}

#[test]
fn a_snapshot_clone_takes_a_volume_snapshot_restores_it_and_deletes_it() {
    let source = golden(HELD);
    let copy = finalized(image("copy", COPY));
    let snapshot = Chosen { strategy: CloneStrategy::Snapshot, fallback: None };
    let obs = ImageObservation {
        source_image: Some(&source),
        // A snapshot is taken while vm-a runs with the source: crash-consistent, never SourceInUse.
        source_writer: Some("vm-a".into()),
        clone_choice: Some(snapshot),
        snapshot_class: Some("csi-snaps".into()),
        ..observe(&copy, ImagePvc::Missing)
    };
    let plan = settle_image(&obs);
    let taken = to_json(plan.create_snapshot.as_ref().expect("a VolumeSnapshot to take"));
    assert_eq!(taken["metadata"]["name"], "copy-image-snapshot");
    assert_eq!(
        taken["spec"],
        json!({"volumeSnapshotClassName": "csi-snaps", "source": {"persistentVolumeClaimName": "golden-image"}})
    );
    assert_eq!(
        (plan.status.phase, plan.create_pvc.clone(), plan.requeue),
        (Some(ImagePhase::Cloning), None, Some(image_plan::PROGRESS_PERIOD))
    );
    // Not ready yet: wait, saying why.
    let waiting = SnapshotView { ours: true, ready: false, error: Some("driver busy".into()) };
    let plan = settle_image(&ImageObservation { snapshot: Some(waiting), ..obs.clone() });
    assert!(image_ready(&plan).1.message.ends_with("to be ready to use: driver busy"), "{:?}", image_ready(&plan));
    assert_eq!((plan.create_snapshot.is_none(), plan.create_pvc.is_none()), (true, true));
    // Ready: the PVC restores it.
    let ready = SnapshotView { ours: true, ready: true, error: None };
    let plan = settle_image(&ImageObservation { snapshot: Some(ready.clone()), ..obs.clone() });
    let request = plan.create_pvc.clone().expect("the PVC");
    assert_eq!((request.from_snapshot.as_deref(), request.clone_from.as_deref()), (Some("copy-image-snapshot"), None));
    let pvc = to_json(&build::image_pvc(&copy, &request, "ReadWriteOnce"));
    assert_eq!(
        pvc["spec"]["dataSource"],
        json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "copy-image-snapshot"})
    );
    assert_eq!(pvc["metadata"]["annotations"]["vmkeep.io/clone-strategy"], "snapshot");
    // Bound: the VolumeSnapshot goes.
    let made = CloneView { strategy: Some("snapshot".into()), ..Default::default() };
    let bound = ImageObservation { snapshot: Some(ready), clone_choice: None, ..observe(&copy, filling(made)) };
    let plan = settle_image(&ImageObservation { source_image: Some(&source), ..bound });
    assert_eq!(
        (plan.status.phase, plan.delete_snapshot.as_deref()),
        (Some(ImagePhase::Ready), Some("copy-image-snapshot"))
    );
    // Someone else's VolumeSnapshot of that name is left alone.
    let foreign = SnapshotView { ours: false, ready: true, error: None };
    let plan = settle_image(&ImageObservation { snapshot: Some(foreign), ..obs });
    assert_eq!((plan.status.phase, image_ready(&plan).1.reason.as_str()), (Some(ImagePhase::Error), "NameConflict"));
}

#[test]
fn an_image_is_not_cloned_from_itself_and_a_grown_size_remakes_an_unfinished_import() {
    let own = finalized(image("a", "spec: {source: {image: {name: a}}}"));
    assert_eq!(image_ready(&settle_image(&observe(&own, ImagePvc::Missing))).1.reason, "InvalidSource");
    let b = image("b", "spec: {source: {image: {name: a}}}\nstatus: {phase: Pending}");
    let a = finalized(image("a", "spec: {source: {image: {name: b}}}"));
    let plan = settle_image(&ImageObservation { source_image: Some(&b), ..observe(&a, ImagePvc::Missing) });
    assert_eq!((plan.status.phase, image_ready(&plan).1.reason.as_str()), (Some(ImagePhase::Error), "InvalidSource"));
    // TooSmall, then spec.size raised to 1Gi: the 24Mi PVC, which holds no image, is made again.
    let mut grown = finalized(image("os", "spec: {size: 1Gi, source: {http: {url: 'http://h/os.img'}}}"));
    grown.metadata.generation = Some(2);
    let pending = CloneView { import_source: Some("http://h/os.img".into()), ..Default::default() };
    let failed = mover("os-image", Role::Import, MoverState::Failed("TooSmall: the image holds...".into()), 1);
    let plan =
        image_plan::plan(&ImageObservation { movers: vec![failed], ..observe(&grown, filling(pending)) }, &at(1));
    assert_eq!(
        (plan.delete_pvc.as_deref(), plan.delete_pods.clone()),
        (Some("os-image"), vec!["os-image-import".to_owned()])
    );
    assert_eq!(plan.status.phase, Some(ImagePhase::Importing));
    // A finished import is never remade: too small is an error to fix by hand.
    let done = CloneView {
        import_source: Some("http://h/os.img".into()),
        digest: Some("sha256:ab".into()),
        ..Default::default()
    };
    let obs = ImageObservation { allows_expansion: Some(true), ..observe(&grown, filling(done)) };
    let plan = settle_image(&obs);
    assert_eq!((plan.delete_pvc, plan.status.phase), (None, Some(ImagePhase::Ready)), "its PVC is expanded instead");
    assert_eq!(plan.expand_pvc, Some(("os-image".to_owned(), grown.spec.size.clone().unwrap())));
}

#[test]
fn a_vm_disk_is_saved_once_the_vm_is_stopped_by_a_copier() {
    let img = finalized(image("saved", "spec: {source: {virtualMachineDisk: {virtualMachine: vm-a, disk: root}}}"));
    let disk = SourceDisk {
        pvc: "vm-a-root".into(),
        capacity: Some(q("24Mi")),
        storage_class: Some("standard".into()),
        volume_mode: VolumeMode::Filesystem,
        blank: false,
        digest: None,
    };
    let reason = |obs: &ImageObservation| image_ready(&settle_image(obs)).1.reason;
    assert_eq!(reason(&observe(&img, ImagePvc::Missing)), "SourceNotFound");
    let running = SourceVm { running: true, disk: Some(disk.clone()) };
    assert_eq!(
        reason(&ImageObservation { source_vm: Some(running), ..observe(&img, ImagePvc::Missing) }),
        "SourceInUse"
    );
    let stopped = SourceVm { running: false, disk: Some(disk) };
    let copy = Chosen { strategy: CloneStrategy::Copy, fallback: Some("provisioner x cannot clone".into()) };
    let obs = ImageObservation {
        source_vm: Some(stopped.clone()),
        clone_choice: Some(copy),
        ..observe(&img, ImagePvc::Missing)
    };
    let request = settle_image(&obs).create_pvc.expect("the PVC");
    assert_eq!(
        (request.size, request.clone_from, request.storage_class.as_deref()),
        (q("24Mi"), None, Some("standard"))
    );
    assert_eq!(request.annotations.get("vmkeep.io/copy-source").map(String::as_str), Some("vm-a-root"));
    // The PVC exists: a copier fills it, marked with its source (the VM's launcher waits).
    let pending =
        CloneView { strategy: Some("copy".into()), copy_source: Some("vm-a-root".into()), ..Default::default() };
    let plan =
        settle_image(&ImageObservation { source_vm: Some(stopped.clone()), ..observe(&img, filling(pending.clone())) });
    assert_eq!(plan.status.phase, Some(ImagePhase::Cloning));
    let copier = &plan.create_pods[0];
    assert_eq!(copier.name_any(), "saved-image-copy");
    assert_eq!(copier.annotations().get("vmkeep.io/copy-source").map(String::as_str), Some("vm-a-root"));
    assert_eq!(copier.labels().get("vmkeep.io/transfer-for").map(String::as_str), Some("saved"));
    // Started again before the copy began: it waits.
    let restarted = SourceVm { running: true, ..stopped };
    let plan = settle_image(&ImageObservation { source_vm: Some(restarted), ..observe(&img, filling(pending)) });
    assert_eq!((plan.status.phase, image_ready(&plan).1.reason.as_str()), (Some(ImagePhase::Pending), "SourceInUse"));
    assert!(plan.create_pods.is_empty());
    // Deleted before its copy: its disk went with it.
    let pending =
        CloneView { strategy: Some("copy".into()), copy_source: Some("vm-a-root".into()), ..Default::default() };
    let plan = settle_image(&observe(&img, filling(pending)));
    assert_eq!((plan.status.phase, image_ready(&plan).1.reason.as_str()), (Some(ImagePhase::Error), "SourceNotFound"));
}

/// A blank 10Gi image `disk` with our finalizer; `persistent` in spec.
fn bound(persistent: bool) -> Image {
    finalized(image("disk", &format!("spec: {{persistent: {persistent}, size: 10Gi, source: {{blank: {{}}}}}}")))
}

fn use_by(image: &Image, consumers: &[&str], claim: Option<ClaimHolder>) -> ImagePlan {
    let obs = ImageObservation {
        consumers: consumers.iter().map(|c| (*c).to_owned()).collect(),
        claim,
        ..observe(image, present(true, "Bound", Some("10Gi")))
    };
    settle_image(&obs)
}

#[test]
fn image_phases_follow_its_use() {
    let shared = use_by(&bound(false), &["vm-a", "vm-b"], None);
    let s = &shared.status;
    assert_eq!(
        (s.phase, s.running_vms, s.consumers.clone()),
        (Some(ImagePhase::Used), Some(2), vec!["vm-a".into(), "vm-b".into()])
    );
    assert_eq!(
        Cond::from(find(&s.conditions, "InUse").unwrap()),
        Cond::new("InUse", true, "InUse", "used by VirtualMachine vm-a, vm-b")
    );
    assert_eq!(s.claimed_by, None);
    let held = use_by(&bound(true), &["vm-a"], Some(holder("vm-a")));
    assert_eq!((held.status.phase, held.status.persistent), (Some(ImagePhase::UsedPersistent), Some(true)));
    assert_eq!(held.status.claimed_by, Some(holder("vm-a")));
    let mut disabled = bound(true);
    disabled.spec.disabled = true;
    assert_eq!(use_by(&disabled, &[], None).status.phase, Some(ImagePhase::Disabled));
    assert_eq!(use_by(&disabled, &["vm-a"], Some(holder("vm-a"))).status.phase, Some(ImagePhase::Disabled));
    assert_eq!(use_by(&bound(true), &[], None).status.phase, Some(ImagePhase::Ready));
}

#[test]
fn an_image_held_only_by_a_claim_names_the_holder() {
    let plan = use_by(&bound(true), &[], Some(holder("vm-a")));
    assert_eq!(
        Cond::from(find(&plan.status.conditions, "InUse").unwrap()),
        Cond::new("InUse", true, "InUse", "used by VirtualMachine vm-a")
    );
}

#[test]
fn a_persistence_change_waits_until_no_vm_uses_the_image() {
    // Converged, non-persistent, used by vm-a since t=1000.
    let mut img = bound(false);
    img.status = Some(use_by(&img, &["vm-a"], None).status);
    // The user flips it to persistent while vm-a uses it: deferred.
    img.spec.persistent = true;
    img.metadata.generation = Some(2);
    let flipped = img.clone();
    let obs =
        ImageObservation { consumers: vec!["vm-a".into()], ..observe(&flipped, present(true, "Bound", Some("10Gi"))) };
    let deferred = image_plan::plan(&obs, &at(3000));
    let s = &deferred.status;
    assert_eq!((s.persistent, s.phase, s.observed_generation), (Some(false), Some(ImagePhase::Used), Some(2)));
    let pending = Cond::new(
        "PersistenceChangePending",
        true,
        "InUse",
        "persistent: true applies once no VirtualMachine uses the image",
    );
    assert_eq!(Cond::from(find(&s.conditions, "PersistenceChangePending").unwrap()), pending);
    assert_eq!(
        ["Ready", "InUse", "PersistenceChangePending"].map(|t| since(&s.conditions, t)),
        [at(1000), at(1000), at(3000)]
    );
    // Re-planned while still used: nothing moves.
    img.status = Some(deferred.status.clone());
    let replanned = image_plan::plan(&ImageObservation { image: &img, ..obs.clone() }, &at(4000));
    assert_eq!(replanned, ImagePlan { event: None, ..deferred.clone() });
    // The change waiting for its users is told once, and is on its way (Reconciling).
    assert_eq!(deferred.event.as_ref().map(|e| e.reason.as_str()), Some("PersistenceChangePending"));
    assert_eq!(health(&deferred.status.conditions)[0], (ConditionStatus::True, "InUse".into()));
    // vm-a lets go: the change applies.
    let applied = image_plan::plan(&observe(&img, present(true, "Bound", Some("10Gi"))), &at(5000));
    let s = &applied.status;
    assert_eq!((s.persistent, s.phase), (Some(true), Some(ImagePhase::Ready)));
    assert_eq!(
        Cond::from(find(&s.conditions, "PersistenceChangePending").unwrap()),
        Cond::new("PersistenceChangePending", false, "Applied", "spec.persistent is in force")
    );
    assert_eq!(
        ["Ready", "InUse", "PersistenceChangePending"].map(|t| since(&s.conditions, t)),
        [at(1000), at(5000), at(5000)]
    );
}

#[test]
fn a_persistent_image_held_by_a_halted_vm_keeps_its_mode() {
    let mut img = bound(true);
    img.status = Some(use_by(&img, &["vm-a"], Some(holder("vm-a"))).status);
    img.spec.persistent = false;
    let plan = use_by(&img, &[], Some(holder("vm-a")));
    assert_eq!((plan.status.persistent, plan.status.phase), (Some(true), Some(ImagePhase::UsedPersistent)));
    // Unused, a change applies at once.
    let mut free = bound(false);
    free.status = Some(use_by(&free, &[], None).status);
    free.spec.persistent = true;
    let plan = use_by(&free, &[], None);
    assert_eq!(plan.status.persistent, Some(true));
    assert_eq!(find(&plan.status.conditions, "PersistenceChangePending").unwrap().reason, "Applied");
}

#[test]
fn the_mode_in_force_comes_from_the_claim_when_the_status_is_lost() {
    // Persistent, held by vm-a, changed to non-persistent (pending), then the status is lost
    // (restored from a backup): the held claim says persistent is still in force.
    let mut img = bound(true);
    img.spec.persistent = false;
    img.status = None;
    let plan = use_by(&img, &[], Some(holder("vm-a")));
    assert_eq!((plan.status.persistent, plan.status.phase), (Some(true), Some(ImagePhase::UsedPersistent)));
    assert_eq!(find(&plan.status.conditions, "PersistenceChangePending").unwrap().status, ConditionStatus::True);
    // The other way round: clones in use say non-persistent is in force.
    let mut img = bound(false);
    img.spec.persistent = true;
    img.status = None;
    let plan = use_by(&img, &["vm-a"], None);
    assert_eq!((plan.status.persistent, plan.status.phase), (Some(false), Some(ImagePhase::Used)));
}

#[test]
fn a_grown_image_in_use_expands_its_pvc_and_stays_usable() {
    let mut img = bound(true);
    img.spec.size = Some(q("20Gi"));
    let held = |allows: Option<bool>| ImageObservation {
        claim: Some(holder("vm-a")),
        allows_expansion: allows,
        ..observe(&img, present(true, "Bound", Some("10Gi")))
    };
    // The class expands: the PVC's request is raised, the image stays in use.
    let plan = settle_image(&held(Some(true)));
    assert_eq!(plan.expand_pvc, Some(("disk-image".to_owned(), q("20Gi"))));
    assert_eq!(plan.status.phase, Some(ImagePhase::UsedPersistent));
    assert_eq!(find(&plan.status.conditions, "Resized").unwrap().reason, "Expanding");
    assert_eq!(health(&plan.status.conditions)[0], (ConditionStatus::True, "Expanding".into()));
    // It cannot: said once with a Warning; a persistent image is stalled (its VMs never see it).
    let plan = settle_image(&held(Some(false)));
    assert_eq!((plan.expand_pvc.clone(), plan.status.phase), (None, Some(ImagePhase::UsedPersistent)));
    assert_eq!(plan.event.as_ref().map(|e| (e.warning, e.reason.as_str())), Some((true, "ExpansionNotSupported")));
    assert_eq!(health(&plan.status.conditions)[1], (ConditionStatus::True, "ExpansionNotSupported".into()));
    // Asked and not yet given: waits for storage.
    let mut asked = present(true, "Bound", Some("10Gi"));
    if let ImagePvc::Present { requested, .. } = &mut asked {
        *requested = Some(q("20Gi"));
    }
    let plan = settle_image(&ImageObservation { claim: Some(holder("vm-a")), ..observe(&img, asked) });
    assert_eq!(plan.expand_pvc, None);
    assert!(find(&plan.status.conditions, "Resized").unwrap().message.starts_with("waiting for storage"));
    // Storage expanded the volume, its filesystem grows at the next mount: converged.
    let mut pending = present(true, "Bound", Some("10Gi"));
    if let ImagePvc::Present { requested, resize_pending, .. } = &mut pending {
        *requested = Some(q("20Gi"));
        *resize_pending = true;
    }
    let plan = settle_image(&ImageObservation { claim: Some(holder("vm-a")), ..observe(&img, pending) });
    assert_eq!(find(&plan.status.conditions, "Resized").unwrap().reason, "FileSystemResizePending");
    assert_eq!(health(&plan.status.conditions)[0].0, ConditionStatus::False);
    // Given: no Resized condition, converged.
    let plan = settle_image(&ImageObservation {
        claim: Some(holder("vm-a")),
        ..observe(&img, present(true, "Bound", Some("20Gi")))
    });
    assert!(find(&plan.status.conditions, "Resized").is_none());
    assert_eq!(health(&plan.status.conditions)[0].0, ConditionStatus::False);
    // New clones of a non-persistent image get the new size even before its PVC has it.
    let mut os = usable("os", false, "OS", "10Gi");
    os.spec.size = Some(q("20Gi"));
    let usable = vm_plan::usable_image("os", Some(&os)).unwrap();
    assert_eq!((usable.capacity, usable.grown), (Some(q("10Gi")), Some(q("20Gi"))));
    // A Template disk may still ask for the size the image's PVC has; its clone gets the new one.
    let t = template("[{name: root, image: os, size: 10Gi}]");
    let disks = vm_plan::check_template(&t.spec, |_| Some(&os)).expect("not Failed");
    assert_eq!(disks[0].size, Some(q("20Gi")));
}

#[test]
fn a_size_back_from_an_expansion_storage_never_made_is_not_refused() {
    // The PVC asks for 20Gi (an expansion storage never made) and has 10Gi: 10Gi is fine.
    let img = bound(true);
    let mut asked = present(true, "Bound", Some("10Gi"));
    if let ImagePvc::Present { requested, .. } = &mut asked {
        *requested = Some(q("20Gi"));
    }
    let plan = settle_image(&observe(&img, asked));
    let resized = find(&plan.status.conditions, "Resized").unwrap();
    assert_eq!(resized.reason, "Expanding", "not InvalidSize");
}

#[test]
fn consumers_are_bounded_and_counted() {
    let img = bound(false);
    let names: Vec<String> = (0..150).map(|i| format!("vm-{i:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let plan = use_by(&img, &refs, None);
    assert_eq!(plan.status.consumers.len(), 100);
    assert_eq!(plan.status.consumers.last().map(String::as_str), Some("vm-099"));
    assert!(plan.status.consumers_truncated);
    assert_eq!(plan.status.running_vms, Some(150));
    let in_use = find(&plan.status.conditions, "InUse").unwrap();
    assert!(in_use.message.ends_with("vm-009 and 140 more"), "{}", in_use.message);
    let few = use_by(&img, &["vm-a"], None);
    assert!(!few.status.consumers_truncated);
}

#[test]
fn a_deleted_image_says_who_holds_it_up_and_an_error_is_stalled() {
    let gone = deleting(bound(true));
    let plan = use_by(&gone, &["vm-a", "vm-b"], None);
    let ready = find(&plan.status.conditions, "Ready").unwrap();
    assert_eq!(ready.message, "deleted: waits until no longer used by VirtualMachine vm-a, vm-b");
    assert_eq!(plan.event.as_ref().map(|e| (e.warning, e.reason.as_str())), Some((false, "InUse")));
    assert_eq!(health(&plan.status.conditions)[0], (ConditionStatus::True, "InUse".into()));
    // An Error cannot go away without a spec change: Stalled, with a Warning Event once.
    let blank = finalized(image("disk", "spec: {source: {blank: {}}}"));
    let plan = settle_image(&observe(&blank, ImagePvc::Missing));
    assert_eq!(plan.event.as_ref().map(|e| (e.warning, e.reason.as_str())), Some((true, "MissingSize")));
    assert_eq!(plan.status.phase, Some(ImagePhase::Error));
    assert_eq!(health(&plan.status.conditions)[1], (ConditionStatus::True, "MissingSize".into()));
}

#[test]
fn deleting_an_image_waits_for_the_last_vm_then_lets_it_go() {
    let gone = deleting(bound(true));
    let cases = [
        (vec!["vm-a"], None, Finalizer::Keep),
        (vec![], Some(holder("vm-a")), Finalizer::Keep),
        (vec![], None, Finalizer::Remove),
    ];
    for (consumers, claim, finalizer) in cases {
        let plan = use_by(&gone, &consumers, claim.clone());
        assert_eq!(
            (plan.finalizer, plan.status.phase),
            (finalizer, Some(ImagePhase::Deleting)),
            "{consumers:?} {claim:?}"
        );
    }
    // Without our finalizer there is nothing to remove (and none is added to a deleted image).
    let mut bare = gone.clone();
    bare.metadata.finalizers = None;
    assert_eq!(use_by(&bare, &[], None).finalizer, Finalizer::Keep);
    // A deleted image gets no new PVC.
    let plan = settle_image(&observe(&deleting(finalized(image("disk", BLANK))), ImagePvc::Missing));
    assert_eq!(
        (plan.create_pvc, plan.finalizer, plan.status.phase),
        (None, Finalizer::Remove, Some(ImagePhase::Deleting))
    );
}

#[test]
fn a_finished_clone_no_longer_depends_on_its_source() {
    let copy = finalized(image("copy", COPY));
    let held = golden(HELD);
    for source in [None, Some(&held)] {
        let obs = ImageObservation { source_image: source, ..observe(&copy, present(true, "Bound", Some("10Gi"))) };
        let plan = image_plan::plan(&obs, &at(1));
        assert_eq!((plan.status.phase, plan.status.pvc_name.as_deref()), (Some(ImagePhase::Ready), Some("copy-image")));
    }
}

#[test]
fn a_clone_of_a_block_image_keeps_block_mode_or_refuses() {
    let source = image(
        "golden",
        "spec: {size: 10Gi, volumeMode: Block, source: {blank: {}}}\n\
         status: {phase: Ready, persistent: false, pvcName: golden-image, capacity: 10Gi}",
    );
    let copy = finalized(image("copy", COPY));
    let plan = image_plan::plan(
        &ImageObservation { source_image: Some(&source), ..observe(&copy, ImagePvc::Missing) },
        &at(1),
    );
    assert!(plan.create_pvc.as_ref().is_none_or(|r| r.volume_mode == VolumeMode::Block), "{:?}", plan.create_pvc);
}

// ---------------------------------------------------------------------------------------------
// template::status
// ---------------------------------------------------------------------------------------------

fn template_status(t: &Template, instances: usize, images: &[Image], now: i64) -> TemplateStatus {
    template_plan::status(t, instances, lookup(images), &at(now))
}

#[test]
fn a_template_is_ready_when_every_image_is_usable() {
    let images = images();
    let mut t = template("[{name: root, image: ubuntu}, {name: data, image: db}, {name: tmp, blank: {size: 1Gi}}]");
    let s = template_status(&t, 2, &images, 1000);
    assert_eq!((s.instances, s.observed_generation), (Some(2), Some(3)));
    assert_eq!(
        decided(&s.conditions),
        vec![Cond::new("Ready", true, "ImagesReady", "every image exists and is usable")]
    );
    t.status = Some(s.clone());
    assert_eq!(template_status(&t, 2, &images, 2000), s, "a converged Template recomputes its status");
    assert_eq!(template_status(&t, 0, &images, 2000).instances, Some(0));
}

#[test]
fn a_template_says_what_blocks_it_and_when_that_changed() {
    let mut images = images();
    let mut t = template("[{name: root, image: later}]");
    let s = template_status(&t, 0, &images, 1000);
    assert_eq!(decided(&s.conditions), vec![Cond::new("Ready", false, "ImageNotFound", "image later does not exist")]);
    t.status = Some(s);
    images.push(image("later", "spec: {source: {http: {url: 'https://x/l.img'}}}\nstatus: {phase: Importing}"));
    let s = template_status(&t, 0, &images, 2000);
    assert_eq!(
        decided(&s.conditions),
        vec![Cond::new("Ready", false, "ImageNotReady", "image later is not ready (Importing)")]
    );
    assert_eq!(since(&s.conditions, "Ready"), at(1000), "same status, same time");
    t.status = Some(s);
    *images.last_mut().unwrap() = usable("later", false, "OS", "1Gi");
    let s = template_status(&t, 0, &images, 3000);
    assert_eq!((s.conditions[0].status, since(&s.conditions, "Ready")), (ConditionStatus::True, at(3000)));
    let cdroms = template("[{name: a, image: iso}, {name: b, image: iso2}]");
    let s = template_status(&cdroms, 0, &images, 1000);
    let message = "disks a, b all use CDROM images; a template may have one";
    assert_eq!(decided(&s.conditions), vec![Cond::new("Ready", false, "InvalidTemplate", message)]);
}

// ---------------------------------------------------------------------------------------------
// build: launcher Pod, PVCs, claim Lease
// ---------------------------------------------------------------------------------------------

const POD_DISKS: &str = "[{name: root, image: ubuntu, pvcName: vm-a-root},
  {name: data, image: db, persistent: true, pvcName: db-image},
  {name: cd, image: iso, pvcName: vm-a-cd, readOnly: true},
  {name: raw, image: rawiso, pvcName: vm-a-raw, readOnly: true}]";

fn launcher(vm: &VirtualMachine, disks: &[VirtualMachineDiskStatus], settings: Option<&LauncherSpec>) -> Value {
    let modes = map(&[("data", VolumeMode::Block), ("raw", VolumeMode::Block), ("cd", VolumeMode::Filesystem)]);
    let disks: Vec<LauncherDisk> = disks
        .iter()
        .map(|disk| LauncherDisk {
            disk,
            volume_mode: modes.get(&disk.name).copied().unwrap_or_default(),
            capacity: 1 << 30,
            blank: disk.name == "data",
        })
        .collect();
    let memory = q("4Gi");
    let inputs = LauncherInputs {
        image: "vmkeep:test",
        cpu: 2,
        cpu_allocation_ratio: 1,
        memory: &memory,
        disks: &disks,
        settings,
    };
    to_json(&build::launcher_pod(vm, &inputs))
}

#[test]
fn the_launcher_pod_mounts_every_disk_and_requests_the_vm_size() {
    let settings: LauncherSpec = parse(
        "{nodeSelector: {kvm: 'true'}, tolerations: [{key: kvm, operator: Exists}], priorityClassName: vms,
               terminationGracePeriodSeconds: 30}",
    );
    let pod = launcher(&vm("vm-a"), &disks(POD_DISKS), Some(&settings));
    assert_eq!(
        pod,
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "vm-a-launcher",
                "namespace": "ns",
                "labels": launcher_labels("vm-a"),
                "ownerReferences": [owner("VirtualMachine", "vm-a", true)],
            },
            "spec": {
                "automountServiceAccountToken": false,
                "enableServiceLinks": false,
                "restartPolicy": "Always",
                "terminationGracePeriodSeconds": 30,
                "nodeSelector": {"kvm": "true"},
                "tolerations": [{"key": "kvm", "operator": "Exists"}],
                "priorityClassName": "vms",
                "securityContext": {
                    "runAsNonRoot": true,
                    "runAsUser": 65532,
                    "runAsGroup": 65532,
                    "fsGroup": 65532,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [{
                    "name": "launcher",
                    "image": "vmkeep:test",
                    "args": ["launch", "--vm=vm-a", "--cpu=2", "--memory-mib=4096", "--stop-timeout-seconds=25",
                             "--disk=name=root,path=/var/lib/vmkeep/disks/root,volumeMode=Filesystem,capacity=1073741824",
                             "--disk=name=data,path=/dev/vmkeep/data,volumeMode=Block,capacity=1073741824,blank",
                             "--disk=name=cd,path=/var/lib/vmkeep/disks/cd,volumeMode=Filesystem,capacity=1073741824,readOnly,cdrom",
                             "--disk=name=raw,path=/dev/vmkeep/raw,volumeMode=Block,capacity=1073741824,readOnly,cdrom"],
                    // 4096 MiB and the launcher's overhead: 160 + 8 per vCPU + 4096/512.
                    "resources": {"requests": {"cpu": "2", "memory": "4280Mi"}, "limits": {"memory": "4280Mi"}},
                    "readinessProbe": {
                        "exec": {"command": ["/vmkeep", "probe"]},
                        "periodSeconds": 2,
                        "timeoutSeconds": 3,
                        "failureThreshold": 1,
                    },
                    "terminationMessagePolicy": "File",
                    "securityContext": {
                        "allowPrivilegeEscalation": false,
                        "readOnlyRootFilesystem": true,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [
                        {"name": "run", "mountPath": "/var/run/vmkeep"},
                        {"name": "disk-root", "mountPath": "/var/lib/vmkeep/disks/root"},
                        {"name": "disk-cd", "mountPath": "/var/lib/vmkeep/disks/cd", "readOnly": true},
                    ],
                    "volumeDevices": [
                        {"name": "disk-data", "devicePath": "/dev/vmkeep/data"},
                        {"name": "disk-raw", "devicePath": "/dev/vmkeep/raw"},
                    ],
                }],
                "volumes": [
                    {"name": "run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
                    {"name": "disk-root", "persistentVolumeClaim": {"claimName": "vm-a-root"}},
                    {"name": "disk-data", "persistentVolumeClaim": {"claimName": "db-image"}},
                    {"name": "disk-cd", "persistentVolumeClaim": {"claimName": "vm-a-cd", "readOnly": true}},
                    {"name": "disk-raw", "persistentVolumeClaim": {"claimName": "vm-a-raw", "readOnly": true}},
                ],
            },
        })
    );
}

#[test]
fn a_launcher_pod_without_disks_or_settings_leaves_those_fields_out() {
    let pod = launcher(&vm("vm-b"), &[], None);
    let spec = pod["spec"].as_object().unwrap();
    for absent in ["nodeSelector", "tolerations", "priorityClassName"] {
        assert!(!spec.contains_key(absent), "{absent}: {pod}");
    }
    assert_eq!(spec["terminationGracePeriodSeconds"], json!(60), "the default grace period");
    let container = &pod["spec"]["containers"][0];
    assert_eq!(
        container["args"],
        json!(["launch", "--vm=vm-b", "--cpu=2", "--memory-mib=4096", "--stop-timeout-seconds=55"])
    );
    assert!(container.get("volumeDevices").is_none(), "{container}");
}

#[test]
fn disk_paths_depend_on_the_volume_mode() {
    assert_eq!(build::disk_path("root", VolumeMode::Filesystem), "/var/lib/vmkeep/disks/root");
    assert_eq!(build::disk_path("root", VolumeMode::Block), "/dev/vmkeep/root");
}

/// A PVC manifest: `name` in `ns` with vmkeep's labels (and the VM label for `vm`), the image
/// annotation for `image`, one owner; asking for `size` with `access`, plus the `spec` entries.
fn pvc_json(
    name: &str,
    owner: Value,
    vm: Option<&str>,
    image: Option<&str>,
    access: &str,
    size: &str,
    spec: Value,
) -> Value {
    let mut metadata = json!({"name": name, "namespace": "ns", "labels": managed(vm)});
    match owner {
        // An image PVC: no owner, the Image's uid as a label.
        Value::String(image_uid) => metadata["labels"]["vmkeep.io/image-uid"] = image_uid.into(),
        // A VM's disk: owned by the VM, and labelled with its uid (found after an orphaning).
        owner => {
            metadata["labels"]["vmkeep.io/virtual-machine-uid"] = owner["uid"].clone();
            metadata["ownerReferences"] = json!([owner]);
        }
    }
    if let Some(image) = image {
        metadata["annotations"] = json!({"vmkeep.io/image": image});
    }
    let mut full = json!({"accessModes": [access], "resources": {"requests": {"storage": size}}});
    full.as_object_mut().unwrap().extend(spec.as_object().unwrap().clone());
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": metadata, "spec": full})
}

fn clone_of(pvc: &str) -> Value {
    json!({"kind": "PersistentVolumeClaim", "name": pvc})
}

#[test]
fn a_vm_clone_pvc_copies_the_image_pvc_in_its_class_and_mode() {
    let img = image(
        "ubuntu",
        "spec: {size: 10Gi, storageClassName: fast, volumeMode: Block, source: {blank: {}}}\n\
         status: {storageClassName: fast}",
    );
    let disk = &disks("[{name: root, image: ubuntu, pvcName: vm-a-root, size: 20Gi}]")[0];
    let csi = Chosen { strategy: CloneStrategy::CsiClone, fallback: None };
    let clone = build::CloneOf { source: "ubuntu-image", chosen: &csi };
    let pvc = build::vm_disk_pvc(&vm("vm-a"), disk, Some(&img), Some(clone), "ReadWriteOnce");
    let spec = json!({"storageClassName": "fast", "volumeMode": "Block", "dataSource": clone_of("ubuntu-image")});
    let owner = owner("VirtualMachine", "vm-a", true);
    let mut want = pvc_json("vm-a-root", owner, Some("vm-a"), Some("ubuntu"), "ReadWriteOnce", "20Gi", spec);
    want["metadata"]["annotations"]["vmkeep.io/clone-strategy"] = "csi-clone".into();
    assert_eq!(to_json(&pvc), want);

    // A copy: no dataSource; the strategy, why, and the source in annotations.
    let copy = Chosen { strategy: CloneStrategy::Copy, fallback: Some("provisioner p cannot clone volumes".into()) };
    let clone = build::CloneOf { source: "ubuntu-image", chosen: &copy };
    let pvc = to_json(&build::vm_disk_pvc(&vm("vm-a"), disk, Some(&img), Some(clone), "ReadWriteOnce"));
    assert!(pvc["spec"].get("dataSource").is_none(), "{pvc}");
    assert_eq!(
        pvc["metadata"]["annotations"],
        json!({"vmkeep.io/image": "ubuntu", "vmkeep.io/clone-strategy": "copy",
               "vmkeep.io/clone-fallback": "provisioner p cannot clone volumes", "vmkeep.io/copy-source": "ubuntu-image"})
    );
}

#[test]
fn a_copy_clone_is_filled_by_a_copier_before_the_launcher_starts() {
    let images = vec![image(
        "os",
        "spec: {source: {blank: {}}}\nstatus: {phase: Ready, persistent: false, pvcName: os-image, capacity: 1Gi}",
    )];
    let t = template("[{name: root, image: os}]");
    let v = vm("vm-a");
    let copy = Chosen { strategy: CloneStrategy::Copy, fallback: Some("no clones here".into()) };
    // First: the PVC (no dataSource) and its copier; no launcher; Provisioning, Copying.
    let mut obs = observed(&v, &t, &images, &[]);
    obs.clone_choices = map(&[("root", copy.clone())]);
    let plan = vm_plan::decide(&obs);
    assert_eq!(plan.create_pvcs.len(), 1);
    assert_eq!(plan.create_copiers.len(), 1);
    let copier = to_json(&plan.create_copiers[0]);
    assert_eq!(copier["metadata"]["name"], "vm-a-root-copy");
    assert_eq!(copier["metadata"]["labels"]["vmkeep.io/copy-for"], "vm-a");
    assert!(copier["metadata"]["labels"].get("vmkeep.io/virtual-machine").is_none(), "a copier never fences");
    // os is a blank image: a source without disk.img is one never written, nothing to copy.
    assert_eq!(
        copier["spec"]["containers"][0]["args"],
        json!([
            "copy",
            "--source=/var/lib/vmkeep/source",
            "--target=/var/lib/vmkeep/target",
            "--capacity=1073741824",
            "--allow-missing-source"
        ])
    );
    assert_eq!(
        copier["spec"]["volumes"][0]["persistentVolumeClaim"],
        json!({"claimName": "os-image", "readOnly": true})
    );
    assert_eq!(copier["spec"]["automountServiceAccountToken"], false);
    assert_eq!(plan.pod, None, "the launcher waits for the copy");
    let status = plan.status.clone().unwrap();
    assert_eq!(status.phase, Some(P::Provisioning));
    let ready = find(&status.conditions, "Ready").unwrap();
    assert_eq!(
        (ready.reason.as_str(), ready.message.as_str()),
        ("Copying", "copying disk root from image os (copier Pod vm-a-root-copy)")
    );
    assert_eq!(status.disks[0].clone_strategy.as_deref(), Some("copy"));
    assert_eq!(status.disks[0].clone_fallback.as_deref(), Some("no clones here"));

    // The copier succeeded: record the digest, delete the copier, start the launcher.
    let mut v = v;
    v.status = Some(status);
    let pvc = plan.create_pvcs[0].clone();
    let mut obs = observed(&v, &t, &images, &[]);
    obs.pvcs = map(&[("vm-a-root", ours("Bound"))]);
    obs.clones = map(&[("vm-a-root", CloneView::of(&pvc.metadata))]);
    obs.copiers = map(&[("vm-a-root", MoverState::Done("sha256:ab".into()))]);
    let plan = vm_plan::decide(&obs);
    assert_eq!(plan.record_digests, vec![("vm-a-root".to_owned(), "sha256:ab".to_owned())]);
    assert_eq!(plan.delete_copiers, vec!["vm-a-root-copy".to_owned()]);
    assert!(matches!(plan.pod, Some(vm_plan::PodChange::Create(_))), "{:?}", plan.pod);
    assert_eq!(plan.status.unwrap().disks[0].digest.as_deref(), Some("sha256:ab"));

    // A copier whose attempts fail says why, and the launcher still waits.
    obs.copiers = map(&[("vm-a-root", MoverState::Running { note: Some("cannot open the source".into()) })]);
    let plan = vm_plan::decide(&obs);
    assert!(plan.pod.is_none() && plan.create_copiers.is_empty());
    let message = find(&plan.status.unwrap().conditions, "Ready").unwrap().message.clone();
    assert!(message.ends_with("its last attempt failed: cannot open the source"), "{message}");
}

#[test]
fn a_volatile_disk_pvc_is_empty_and_owned_by_the_vm() {
    let disk = &disks("[{name: scratch, size: 5Gi}]")[0];
    let pvc = build::vm_disk_pvc(&vm("vm-a"), disk, None, None, "ReadWriteOncePod");
    let owner = owner("VirtualMachine", "vm-a", true);
    let spec = json!({"volumeMode": "Filesystem"});
    assert_eq!(to_json(&pvc), pvc_json("vm-a-scratch", owner, Some("vm-a"), None, "ReadWriteOncePod", "5Gi", spec));
}

#[test]
fn an_image_pvc_is_labelled_with_its_image_and_owned_by_nothing() {
    let img = image("golden", "spec: {source: {image: {name: base}}}");
    let request = PvcRequest {
        name: "golden-image".into(),
        size: q("10Gi"),
        storage_class: Some("fast".into()),
        volume_mode: VolumeMode::Filesystem,
        clone_from: Some("base-image".into()),
        from_snapshot: None,
        annotations: Default::default(),
    };
    let pvc = build::image_pvc(&img, &request, "ReadWriteOnce");
    let spec = json!({"storageClassName": "fast", "volumeMode": "Filesystem", "dataSource": clone_of("base-image")});
    let image_uid = json!("uid-golden");
    assert_eq!(to_json(&pvc), pvc_json("golden-image", image_uid, None, Some("golden"), "ReadWriteOnce", "10Gi", spec));
}

#[test]
fn a_claim_lease_names_image_and_holder() {
    let now = MicroTime(jiff::Timestamp::from_second(1000).unwrap());
    let lease = build::claim_lease("ns", "db", "vm-a", "uid-vm-a", now.clone());
    assert_eq!(
        to_json(&lease),
        json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": "vmkeep-claim-db",
                "namespace": "ns",
                "labels": managed(None),
                // No owner: no deletion propagation policy can remove a claim.
                "annotations": {"vmkeep.io/image": "db", "vmkeep.io/virtual-machine": "vm-a"},
            },
            "spec": {"holderIdentity": "uid-vm-a", "acquireTime": to_json(&now)},
        })
    );
}

#[test]
fn a_vm_clone_is_in_the_storage_class_of_the_image_pvc() {
    let source = golden("{phase: Ready, persistent: false, pvcName: golden-image, capacity: 10Gi}");
    let mut copy = finalized(image("copy", COPY));
    let plan = image_plan::plan(
        &ImageObservation { source_image: Some(&source), ..observe(&copy, ImagePvc::Missing) },
        &at(1),
    );
    let request = plan.create_pvc.unwrap();
    copy.status = Some(plan.status);
    let disk = &disks("[{name: root, image: copy, pvcName: vm-a-root, size: 10Gi}]")[0];
    let csi = Chosen { strategy: CloneStrategy::CsiClone, fallback: None };
    let clone = build::CloneOf { source: "copy-image", chosen: &csi };
    let pvc = build::vm_disk_pvc(&vm("vm-a"), disk, Some(&copy), Some(clone), "ReadWriteOnce");
    assert_eq!(pvc.spec.unwrap().storage_class_name, request.storage_class);
}

#[test]
fn children_of_a_vm_with_a_long_name_have_valid_labels() {
    let name = "a".repeat(64);
    let v = vm(&name);
    let disk = &disks("[{name: scratch, size: 5Gi}]")[0];
    let pvc = to_json(&build::vm_disk_pvc(&v, disk, None, None, "ReadWriteOnce"));
    let pod = launcher(&v, &[], None);
    for labels in [&pvc["metadata"]["labels"], &pod["metadata"]["labels"]] {
        for value in labels.as_object().unwrap().values() {
            assert!(value.as_str().unwrap().len() <= 63, "label value {value} is longer than 63");
        }
    }
}

#[test]
fn launcher_volume_names_fit_a_dns_label() {
    let name = "d".repeat(63);
    let pod = launcher(&vm("vm-a"), &disks(&format!("[{{name: {name}, pvcName: p}}]")), None);
    let volume = pod["spec"]["volumes"][0]["name"].as_str().unwrap().to_owned();
    assert!(volume.len() <= 63, "volume name {volume} has {} characters", volume.len());
}

#[test]
fn vms_see_an_image_change_only_when_what_they_read_changes() {
    let base = usable("base", false, "OS", "1Gi");
    let view = vm_plan::image_view(&base);
    let mut busier = base.clone();
    let status = busier.status.as_mut().unwrap();
    status.running_vms = Some(7);
    status.consumers = vec!["vm-a".into(), "vm-b".into()];
    assert_eq!(vm_plan::image_view(&busier), view, "counts of users are not read by VMs");
    for change in [
        |i: &mut Image| i.status.as_mut().unwrap().phase = Some(ImagePhase::Used),
        |i: &mut Image| i.status.as_mut().unwrap().persistent = Some(true),
        |i: &mut Image| i.status.as_mut().unwrap().capacity = Some(q("2Gi")),
        |i: &mut Image| i.metadata.generation = Some(2),
        |i: &mut Image| i.metadata.deletion_timestamp = Some(at(1)),
    ] {
        let mut changed = base.clone();
        change(&mut changed);
        assert_ne!(vm_plan::image_view(&changed), view, "{changed:?}");
    }
    let t = template("[{name: root, image: base}]");
    let mut counted = t.clone();
    counted.status = Some(parse("instances: 3"));
    assert_eq!(vm_plan::template_view(&counted), vm_plan::template_view(&t));
    counted.metadata.generation = Some(counted.metadata.generation.unwrap_or(1) + 1);
    assert_ne!(vm_plan::template_view(&counted), vm_plan::template_view(&t));
}

// ---------------------------------------------------------------------------------------------
// virtual_machine::decide: the whole reconcile, from an observation to a plan
// ---------------------------------------------------------------------------------------------

/// Images `os` (non-persistent, for a clone) and `db` (persistent).
fn decide_images() -> Vec<Image> {
    vec![usable("os", false, "OS", "1Gi"), usable("db", true, "DATABLOCK", "1Gi")]
}

/// An observation of `vm` made from `small` = [root: os, data: db], with `claims` on db.
fn observed<'a>(
    vm: &'a VirtualMachine,
    template: &'a Template,
    images: &'a [Image],
    claims: &[(&str, ClaimState)],
) -> vm_plan::Observed<'a> {
    vm_plan::Observed {
        vm,
        template: Some(template),
        images: images.iter().map(|i| (i.metadata.name.clone().unwrap(), i)).collect(),
        claims: map(claims),
        others: Vec::new(),
        pvcs: BTreeMap::new(),
        pod: Child::Missing,
        launcher: Default::default(),
        runtime: Choice::Run(Runtime::Launcher),
        instance_unseen: false,
        instance_gone: false,
        clone_choices: Default::default(),
        clones: Default::default(),
        copiers: Default::default(),
        saving: Vec::new(),
        taken: Default::default(),
        launcher_image: "vmkeep:test",
        cpu_allocation_ratio: 1,
        access_mode: "ReadWriteOnce",
        now: at(1000),
    }
}

fn small() -> Template {
    template("[{name: root, image: os}, {name: data, image: db}]")
}

fn with_finalizer(mut vm: VirtualMachine) -> VirtualMachine {
    vm.metadata.finalizers = Some(vec![names::VM_FINALIZER.into()]);
    vm
}

fn phase_and_reason(plan: &vm_plan::VmPlan) -> (Option<P>, String) {
    let status = plan.status.as_ref().expect("a status");
    (status.phase, find(&status.conditions, "Ready").unwrap().reason.clone())
}

#[test]
fn decide_takes_a_free_image_then_creates_disks_and_the_pod() {
    let (images, t, v) = (decide_images(), small(), vm("vm-a"));
    let plan = vm_plan::decide(&observed(&v, &t, &images, &[("db", ClaimState::Free)]));
    assert!(plan.add_finalizer);
    assert_eq!(plan.take, ["db"]);
    assert!(plan.release.is_empty());
    assert_eq!(plan.create_pvcs.iter().map(|p| p.metadata.name.clone().unwrap()).collect::<Vec<_>>(), ["vm-a-root"]);
    assert!(matches!(plan.pod, Some(vm_plan::PodChange::Create(_))));
    assert_eq!(phase_and_reason(&plan), (Some(P::Starting), "Starting".into()));
    assert_eq!(plan.warning, None);
}

#[test]
fn a_vm_whose_disk_is_being_copied_waits_to_start() {
    let (images, t, v) = (decide_images(), small(), vm("vm-a"));
    let mut obs = observed(&v, &t, &images, &[("db", ClaimState::Free)]);
    obs.saving = vec!["PersistentVolumeClaim db-image is being copied by Pod db-copy-image-copy".into()];
    let plan = vm_plan::decide(&obs);
    assert_eq!(plan.take, ["db"], "it claims, then waits");
    assert_eq!(plan.pod, None, "no launcher while a disk of it is copied");
    assert_eq!(phase_and_reason(&plan), (Some(P::Provisioning), "DiskBeingCopied".into()));
    let status = plan.status.as_ref().unwrap();
    assert!(find(&status.conditions, "Ready").unwrap().message.contains("db-copy-image-copy"));
    assert!(plan.requeue.is_some(), "it looks again");
}

#[test]
fn decide_lets_an_earlier_vm_applied_together_go_first() {
    // vm-b is reconciled first; vm-a, created in the same second, has not decided yet.
    let (images, t) = (decide_images(), small());
    let (a, b) = (vm("vm-a"), vm("vm-b"));
    let mut obs = observed(&b, &t, &images, &[("db", ClaimState::Free)]);
    obs.others = vec![vm_plan::OtherVm { vm: &a, claims_now: ["db".into()].into() }];
    let plan = vm_plan::decide(&obs);
    assert!(plan.take.is_empty() && plan.create_pvcs.is_empty() && plan.pod.is_none(), "{plan:?}");
    assert_eq!(phase_and_reason(&plan), (Some(P::Pending), "WaitingForImage".into()));
    assert!(plan.requeue.is_some(), "it looks again in case vm-a never takes the image");
    // vm-a, seeing vm-b, takes it.
    let mut obs = observed(&a, &t, &images, &[("db", ClaimState::Free)]);
    obs.others = vec![vm_plan::OtherVm { vm: &b, claims_now: ["db".into()].into() }];
    assert_eq!(vm_plan::decide(&obs).take, ["db"]);
}

#[test]
fn decide_takes_images_in_one_order_and_is_rejected_only_holding_nothing() {
    let images = [decide_images(), vec![usable("logs", true, "DATABLOCK", "1Gi")]].concat();
    let t = template("[{name: data, image: db}, {name: log, image: logs}]");
    let v = vm("vm-b");
    let plan = vm_plan::decide(&observed(&v, &t, &images, &[("db", ClaimState::Free), ("logs", ClaimState::Free)]));
    assert_eq!(plan.take, ["db", "logs"], "name order: two VMs never hold one each");
    let other = || ClaimState::Other { holder: "vm-a".into() };
    // Holding nothing: Rejected, with a Warning naming the holder.
    let plan = vm_plan::decide(&observed(&v, &t, &images, &[("db", other()), ("logs", ClaimState::Free)]));
    assert_eq!(phase_and_reason(&plan), (Some(P::Rejected), "ImageInUse".into()));
    let message = "image db is persistent and already in use by VirtualMachine vm-a";
    assert_eq!(plan.warning, Some(("ImageInUse", message.into())));
    assert!(plan.take.is_empty() && plan.release.is_empty());
    // Holding one: let go first (Rejected is final, so not while holding anything).
    let plan = vm_plan::decide(&observed(&v, &t, &images, &[("db", ClaimState::Mine), ("logs", other())]));
    assert_eq!(plan.release, ["db"]);
    assert_eq!(phase_and_reason(&plan), (Some(P::Pending), "WaitingForImage".into()));
    // ... and never while its launcher Pod may use the disk: the Pod goes first.
    let mut obs = observed(&v, &t, &images, &[("db", ClaimState::Mine), ("logs", other())]);
    obs.pod = ours("Running");
    let plan = vm_plan::decide(&obs);
    assert!(plan.release.is_empty());
    assert_eq!(plan.pod, Some(vm_plan::PodChange::Delete));
}

#[test]
fn decide_stops_the_launcher_of_a_vm_whose_claim_was_lost() {
    // Found by a breaker: the claim Lease deleted or handed over by hand while vm-a runs.
    let (images, t) = (decide_images(), small());
    let v = with_finalizer(vm("vm-a"));
    let mut obs = observed(&v, &t, &images, &[("db", ClaimState::Other { holder: "vm-b".into() })]);
    obs.pod = ours("Running");
    let plan = vm_plan::decide(&obs);
    assert_eq!(plan.pod, Some(vm_plan::PodChange::Delete));
    assert!(plan.take.is_empty() && plan.release.is_empty());
}

#[test]
fn decide_releases_a_claim_a_rejected_vm_still_holds() {
    let (images, t) = (decide_images(), small());
    let v = with_status(vm("vm-b"), "phase: Rejected\nobservedGeneration: 1");
    let plan = vm_plan::decide(&observed(&v, &t, &images, &[("db", ClaimState::Mine)]));
    assert_eq!(plan.release, vec!["db".to_owned()]);
    assert_eq!(plan.status.and_then(|s| s.phase), Some(P::Rejected));
    let plan = vm_plan::decide(&observed(&v, &t, &images, &[("db", ClaimState::Other { holder: "x".into() })]));
    assert_eq!(
        vm_plan::VmPlan { status: None, ..plan },
        vm_plan::VmPlan::default(),
        "a Rejected VM that holds nothing only keeps its status"
    );
}

#[test]
fn decide_does_not_take_an_image_whose_persistence_change_is_pending() {
    let mut images = decide_images();
    images[1].spec.persistent = false; // pending: status.persistent is still true
    let (t, v) = (small(), vm("vm-b"));
    let plan = vm_plan::decide(&observed(&v, &t, &images, &[("db", ClaimState::Free)]));
    assert!(plan.take.is_empty() && plan.pod.is_none());
    assert_eq!(phase_and_reason(&plan), (Some(P::Pending), "ImageNotReady".into()));
    // Applied: the VM gets its own clone.
    images[1].status.as_mut().unwrap().persistent = Some(false);
    let plan = vm_plan::decide(&observed(&v, &t, &images, &[]));
    assert!(plan.take.is_empty() && !plan.add_finalizer);
    assert_eq!(plan.create_pvcs.len(), 2, "two clones");
}

#[test]
fn decide_rejects_a_reject_vm_when_a_pending_change_leaves_the_image_held() {
    // db is still persistent (a change to non-persistent waits) and held by vm-a.
    let mut images = decide_images();
    images[1].spec.persistent = false;
    images[1].status.as_mut().unwrap().claimed_by = Some(holder("vm-a"));
    let t = small();
    let v = vm("vm-b");
    let plan = vm_plan::decide(&observed(&v, &t, &images, &[("db", ClaimState::Free)]));
    assert_eq!(phase_and_reason(&plan), (Some(P::Rejected), "ImageInUse".into()));
    assert!(plan.take.is_empty() && plan.create_pvcs.is_empty(), "no claim and no clone of the held PVC");
    // A Wait VM waits for the change instead.
    let mut w = vm("vm-w");
    w.spec.on_image_conflict = OnImageConflict::Wait;
    let plan = vm_plan::decide(&observed(&w, &t, &images, &[("db", ClaimState::Free)]));
    assert_eq!(phase_and_reason(&plan), (Some(P::Pending), "ImageNotReady".into()));
    assert!(plan.create_pvcs.is_empty());
}

#[test]
fn a_rejected_vm_names_the_holder_now_or_says_the_image_is_free() {
    let images = decide_images();
    let t = small();
    let v = vm("vm-b");
    let first = vm_plan::decide(&observed(&v, &t, &images, &[("db", ClaimState::Other { holder: "vm-a".into() })]));
    let mut rejected = v.clone();
    rejected.status = first.status.clone();
    let ready =
        |plan: &vm_plan::VmPlan| find(&plan.status.as_ref().unwrap().conditions, "Ready").unwrap().message.clone();
    // Still held by vm-a: nothing changes.
    let again =
        vm_plan::decide(&observed(&rejected, &t, &images, &[("db", ClaimState::Other { holder: "vm-a".into() })]));
    assert_eq!(again.status, first.status);
    // Held by another now: named.
    let moved =
        vm_plan::decide(&observed(&rejected, &t, &images, &[("db", ClaimState::Other { holder: "vm-c".into() })]));
    assert!(ready(&moved).contains("in use by VirtualMachine vm-c"), "{}", ready(&moved));
    // Free: says so and how to retry; still Rejected, with its recorded disks.
    let free = vm_plan::decide(&observed(&rejected, &t, &images, &[("db", ClaimState::Free)]));
    assert!(ready(&free).starts_with("the persistent images this VM needs are free now"), "{}", ready(&free));
    let status = free.status.unwrap();
    assert_eq!(status.phase, Some(P::Rejected));
    assert_eq!(status.disks, first.status.unwrap().disks);
    assert!(free.take.is_empty());
}

#[test]
fn a_vm_whose_status_is_lost_keeps_the_image_it_holds_despite_a_pending_change() {
    // db: persistent in force, changing to non-persistent; vm-h holds it and lost its status.
    let mut images = decide_images();
    images[1].spec.persistent = false;
    let (t, v) = (small(), vm("vm-h"));
    let plan = vm_plan::decide(&observed(&v, &t, &images, &[("db", ClaimState::Mine)]));
    assert!(plan.release.is_empty(), "it keeps its claim");
    let status = plan.status.unwrap();
    assert_ne!(status.phase, Some(P::Pending), "{status:?}");
    let data = status.disks.iter().find(|d| d.name == "data").unwrap();
    assert!(data.persistent, "the image it holds, in place");
}

#[test]
fn decide_keeps_a_held_image_that_is_being_deleted() {
    let mut images = decide_images();
    let (t, mut v) = (small(), with_finalizer(vm("vm-a")));
    let first = vm_plan::decide(&observed(&v, &t, &images, &[("db", ClaimState::Free)]));
    v.status = first.status;
    images[1].metadata.deletion_timestamp = Some(at(2000));
    let mut obs = observed(&v, &t, &images, &[("db", ClaimState::Mine)]);
    obs.pvcs = map(&[("vm-a-root", ours("Bound"))]);
    obs.pod = ours("Running");
    obs.launcher.ready = true;
    let plan = vm_plan::decide(&obs);
    assert_eq!(phase_and_reason(&plan), (Some(P::Running), "Running".into()));
    assert!(plan.release.is_empty() && plan.pod.is_none() && plan.take.is_empty());
}

#[test]
fn decide_on_deletion_stops_the_pod_then_releases_then_lets_go() {
    let (images, t) = (decide_images(), small());
    let mut v = with_finalizer(vm("vm-a"));
    v.metadata.deletion_timestamp = Some(at(3000));
    let mut obs = observed(&v, &t, &images, &[("db", ClaimState::Mine)]);
    obs.pod = ours("Running");
    let plan = vm_plan::decide(&obs);
    assert_eq!(plan.pod, Some(vm_plan::PodChange::Delete));
    assert!(plan.release.is_empty() && !plan.remove_finalizer);
    assert_eq!(phase_and_reason(&plan), (Some(P::Terminating), "Terminating".into()));
    obs.pod = Child::Ours { phase: Some("Running".into()), deleting: true };
    let plan = vm_plan::decide(&obs);
    assert!(plan.pod.is_none() && plan.release.is_empty() && !plan.remove_finalizer && plan.requeue.is_some());
    obs.pod = Child::Missing;
    let plan = vm_plan::decide(&obs);
    assert_eq!((plan.release, plan.remove_finalizer), (vec!["db".to_owned()], true));
    let mut gone = v.clone();
    gone.metadata.finalizers = None;
    // Without vmkeep's finalizer (foreground deletion, another finalizer): only the status says so.
    let plan = vm_plan::decide(&observed(&gone, &t, &images, &[]));
    assert_eq!(phase_and_reason(&plan), (Some(P::Terminating), "Terminating".into()));
    assert_eq!(vm_plan::VmPlan { status: None, ..plan }, vm_plan::VmPlan::default());
}

#[test]
fn decide_on_deletion_deletes_the_vms_own_disks_and_copiers_whatever_the_propagation() {
    // Found by the fault suite: an orphaning deletion (`--cascade=orphan`) left clones and copier
    // Pods without an owner for ever. The cleanup deletes what is the VM's own (its controller
    // reference, or its uid label once the garbage collector stripped that), never another's.
    let (images, t) = (decide_images(), small());
    let mut v = with_finalizer(vm("vm-a"));
    v.metadata.deletion_timestamp = Some(at(3000));
    let mut obs = observed(&v, &t, &images, &[("db", ClaimState::Mine)]);
    obs.pod = ours("Running");
    obs.pvcs = map(&[
        ("vm-a-root", ours("Bound")),
        ("vm-a-scratch", Child::Ours { phase: Some("Bound".into()), deleting: true }),
        ("vm-a-other", Child::Foreign),
    ]);
    obs.copiers =
        [("vm-a-root".to_owned(), MoverState::Running { note: None }), ("vm-a-other".to_owned(), MoverState::Foreign)]
            .into();
    let plan = vm_plan::decide(&obs);
    assert_eq!(plan.delete_pvcs, vec!["vm-a-root".to_owned()]);
    assert_eq!(plan.delete_copiers, vec![names::copier_pod("ns", "vm-a-root")]);
    assert!(!plan.remove_finalizer, "the launcher Pod still fences");
    obs.pod = Child::Missing;
    let plan = vm_plan::decide(&obs);
    assert_eq!(plan.delete_pvcs, vec!["vm-a-root".to_owned()]);
    assert!(plan.remove_finalizer);
}

#[test]
fn a_child_left_behind_by_an_orphaning_deletion_goes_with_its_vm() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::Resource;
    use vm_plan::{LeftBehind, left_behind};
    let v = vm("vm-a");
    let uid = v.uid().unwrap();
    let labelled = |owned: bool| ObjectMeta {
        labels: Some([(names::VM_UID_LABEL.to_owned(), uid.clone())].into()),
        owner_references: owned.then(|| vec![v.controller_owner_ref(&()).unwrap()]),
        ..ObjectMeta::default()
    };
    // Owned: the garbage collector's. Not a VM's child: never touched.
    assert_eq!(left_behind(&labelled(true), None), LeftBehind::No);
    assert_eq!(left_behind(&ObjectMeta::default(), None), LeftBehind::No);
    // Orphaned: deleted once its VM is gone or going; looked at again while it is not.
    assert_eq!(left_behind(&labelled(false), None), LeftBehind::Delete);
    assert_eq!(left_behind(&labelled(false), Some(&v.metadata)), LeftBehind::Recheck);
    let mut going = v.metadata.clone();
    going.deletion_timestamp = Some(at(3000));
    assert_eq!(left_behind(&labelled(false), Some(&going)), LeftBehind::Delete);
    let mut deleting = labelled(false);
    deleting.deletion_timestamp = Some(at(3000));
    assert_eq!(left_behind(&deleting, None), LeftBehind::No);
}

#[test]
fn a_clone_and_a_copier_carry_the_vms_uid_label() {
    let v = vm("vm-a");
    let disk = &disks("[{name: scratch, size: 5Gi}]")[0];
    let pvc = build::vm_disk_pvc(&v, disk, None, None, "ReadWriteOnce");
    let uid = names::label_value(&v.uid().unwrap_or_default());
    assert_eq!(pvc.labels().get(names::VM_UID_LABEL), Some(&uid));
}

#[test]
fn decide_reports_a_child_name_taken_by_someone_else() {
    let (images, t, v) = (decide_images(), small(), vm("vm-a"));
    let mut obs = observed(&v, &t, &images, &[("db", ClaimState::Mine)]);
    obs.taken = [("PersistentVolumeClaim", "vm-a-root".to_owned())].into();
    let plan = vm_plan::decide(&obs);
    assert!(plan.create_pvcs.is_empty() && plan.pod.is_none());
    assert_eq!(phase_and_reason(&plan), (Some(P::Pending), "NameConflict".into()));
    assert_eq!(plan.warning.map(|w| w.0), Some("NameConflict"));
}

// ---------------------------------------------------------------------------------------------
// claim: which Pods fence a holder
// ---------------------------------------------------------------------------------------------

#[test]
fn a_holder_is_fenced_by_its_launcher_pods_found_by_label_and_recorded_uid() {
    let holder = ClaimHolder { name: "vm-a".into(), uid: "uid-vm-a".into(), since: at(1) };
    let pod = |labels: Value, owners: Value| -> k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        serde_json::from_value(json!({"name": "vm-a-launcher", "labels": labels, "ownerReferences": owners})).unwrap()
    };
    let owned = json!([owner("VirtualMachine", "vm-a", true)]);
    let recorded = json!({"app.kubernetes.io/managed-by": "vmkeep", "vmkeep.io/virtual-machine": "vm-a",
        "vmkeep.io/virtual-machine-uid": "uid-vm-a"});
    // Orphaned (no owner reference left): still the holder's by its labels.
    assert!(claim_plan::fenced([&pod(recorded.clone(), json!([]))], &holder));
    assert!(claim_plan::fenced([&pod(recorded, owned.clone())], &holder));
    // A Pod of a recreated VM with the same name is not the old holder's.
    let recreated = json!({"app.kubernetes.io/managed-by": "vmkeep", "vmkeep.io/virtual-machine": "vm-a",
        "vmkeep.io/virtual-machine-uid": "uid-other"});
    assert!(!claim_plan::fenced([&pod(recreated, json!([]))], &holder));
    // Made before uids were recorded: the name label counts (fencing errs on the safe side).
    assert!(claim_plan::fenced([&pod(managed(Some("vm-a")), json!([]))], &holder));
    assert!(!claim_plan::fenced([&pod(managed(Some("vm-b")), json!([]))], &holder));
    assert!(!claim_plan::fenced(std::iter::empty(), &holder));
    // A user removed vmkeep's managed-by label (and an orphaning deletion the owner): the
    // recorded uid still makes it the holder's.
    let unmanaged = json!({"vmkeep.io/virtual-machine": "vm-a", "vmkeep.io/virtual-machine-uid": "uid-vm-a"});
    assert!(claim_plan::fenced([&pod(unmanaged, json!([]))], &holder));
    assert!(claim_plan::fenced([&pod(json!({}), owned)], &holder));
}

#[test]
fn the_launcher_view_reads_readiness_restarts_and_the_last_exit_from_the_pod() {
    let pod: crate::plan::cached::CachedPod = parse(
        "{metadata: {name: vm-a-launcher, creationTimestamp: '2026-12-01T00:00:00Z'},
          spec: {nodeName: node-1, containers: [{name: launcher}]},
          status: {phase: Running, conditions: [{type: Ready, status: 'False'}],
            containerStatuses: [{name: launcher, ready: false, restartCount: 2, image: i, imageID: i,
              state: {waiting: {reason: CrashLoopBackOff}},
              lastState: {terminated: {exitCode: 0, reason: Completed,
                message: \"GuestPowerOff: the guest powered off\\n\", finishedAt: '2026-12-01T00:01:00Z'}}}]}}",
    );
    let view = LauncherView::of(&pod);
    assert!(!view.ready);
    assert_eq!(
        (view.node_name.as_deref(), view.restarts, view.waiting.as_deref()),
        (Some("node-1"), 2, Some("CrashLoopBackOff"))
    );
    let exit = view.last_exit.clone().unwrap();
    assert_eq!(
        (exit.reason.as_str(), exit.message.as_str(), exit.exit_code),
        ("GuestPowerOff", "the guest powered off", 0)
    );

    // The VM shows it, Starting with why; then Running once Ready, with the accelerator, once.
    let r = resolved("[{name: scratch, pvcName: vm-a-scratch, phase: Bound, size: 1Gi}]");
    let s =
        settle(&vm("vm-a"), Some(&r), &Verdict::Provisioned { pod: ours("Running"), launcher: Box::new(view.clone()) });
    assert_eq!((s.phase, s.restarts, s.node_name.as_deref()), (Some(P::Starting), Some(2), Some("node-1")));
    assert_eq!(s.last_exit, Some(exit.clone()));
    let ready = find(&s.conditions, "Ready").unwrap();
    assert_eq!(
        ready.message,
        "the launcher starts the guest again (restart 2, CrashLoopBackOff); it last ended: GuestPowerOff: the guest powered off"
    );
    let running = LauncherView { ready: true, waiting: None, ..view };
    let s = settle(&vm("vm-a"), Some(&r), &Verdict::Provisioned { pod: ours("Running"), launcher: Box::new(running) });
    assert_eq!((s.phase, &s.last_exit), (Some(P::Running), &Some(exit.clone())), "the last exit stays shown");
    // Stopped: no node or restarts, the last exit kept.
    let mut halted = vm("vm-a");
    halted.spec.run_strategy = RunStrategy::Halted;
    halted.status = Some(s);
    let s = vm_plan::status(&halted, Some(&r), &provisioned(Child::Missing), &at(2000));
    assert_eq!((s.phase, s.node_name, s.restarts, s.accelerator), (Some(P::Stopped), None, None, None));
    assert_eq!(s.last_exit, Some(exit));
}

#[test]
fn the_accelerator_is_recorded_with_one_event() {
    let images = decide_images();
    let (t, v) = (small(), with_finalizer(vm("vm-a")));
    let first = vm_plan::decide(&observed(&v, &t, &images, &[("db", ClaimState::Free)]));
    let mut v = v;
    v.status = first.status;
    let mut obs = observed(&v, &t, &images, &[("db", ClaimState::Mine)]);
    obs.pvcs = map(&[("vm-a-root", ours("Bound"))]);
    obs.pod = ours("Running");
    obs.launcher.ready = true;
    obs.launcher.accelerator = Some(("TCG".into(), "/dev/kvm: No such file or directory".into()));
    let plan = vm_plan::decide(&obs);
    assert_eq!(plan.status.as_ref().unwrap().accelerator.as_deref(), Some("TCG"));
    assert_eq!(
        plan.notice,
        Some(("Accelerator", "QEMU runs the guest with TCG (/dev/kvm: No such file or directory)".into()))
    );
    v.status = plan.status;
    let mut obs = observed(&v, &t, &images, &[("db", ClaimState::Mine)]);
    obs.pvcs = map(&[("vm-a-root", ours("Bound"))]);
    obs.pod = ours("Running");
    obs.launcher.ready = true;
    let again = vm_plan::decide(&obs);
    assert_eq!(again.notice, None);
    assert_eq!(again.status.unwrap().accelerator.as_deref(), Some("TCG"), "kept while the Pod runs");
}

#[test]
fn a_copier_pod_tells_its_copy_its_failures_and_its_waits() {
    let pod = |status: &str| -> crate::plan::cached::CachedPod {
        parse(&format!(
            "{{metadata: {{name: vm-a-root-copy}}, spec: {{containers: [{{name: copier}}]}}, status: {status}}}"
        ))
    };
    let copied = pod(
        "{phase: Succeeded, containerStatuses: [{name: copier, ready: false, restartCount: 0, image: i, imageID: i,
          state: {terminated: {exitCode: 0, message: 'Copied: sha256:ab 5 bytes in 0.1 s'}}}]}",
    );
    assert_eq!(MoverState::of_copier(&copied, true), MoverState::Done("sha256:ab".into()));
    assert_eq!(MoverState::of_copier(&copied, false), MoverState::Foreign);
    let failing =
        pod("{phase: Running, containerStatuses: [{name: copier, ready: false, restartCount: 2, image: i, imageID: i,
          state: {waiting: {reason: CrashLoopBackOff}},
          lastState: {terminated: {exitCode: 1, message: 'CopyFailed: cannot open the source'}}}]}");
    assert_eq!(
        MoverState::of_copier(&failing, true),
        MoverState::Running { note: Some("cannot open the source; CrashLoopBackOff".into()) }
    );
    let crashed =
        pod("{phase: Running, containerStatuses: [{name: copier, ready: false, restartCount: 1, image: i, imageID: i,
          state: {running: {}}, lastState: {terminated: {exitCode: 2, reason: Error}}}]}");
    assert_eq!(MoverState::of_copier(&crashed, true), MoverState::Running { note: Some("exit code 2 (Error)".into()) });
}

#[test]
fn an_unschedulable_launcher_or_copier_says_why() {
    let pod: crate::plan::cached::CachedPod = parse(
        "{metadata: {name: vm-a-launcher}, spec: {containers: [{name: launcher}]},
          status: {phase: Pending, conditions: [{type: PodScheduled, status: 'False', reason: Unschedulable,
            message: '0/1 nodes are available: 1 Insufficient cpu.'}]}}",
    );
    let view = LauncherView::of(&pod);
    let r = resolved("[{name: scratch, pvcName: vm-a-scratch, phase: Bound, size: 1Gi}]");
    let s = settle(&vm("vm-a"), Some(&r), &Verdict::Provisioned { pod: ours("Pending"), launcher: Box::new(view) });
    assert_eq!(
        find(&s.conditions, "Ready").unwrap().message,
        "the launcher Pod cannot be scheduled: Unschedulable: 0/1 nodes are available: 1 Insufficient cpu."
    );
    assert_eq!(
        MoverState::of_copier(&pod, true),
        MoverState::Running {
            note: Some(
                "the Pod cannot be scheduled (Unschedulable: 0/1 nodes are available: 1 Insufficient cpu.)".into()
            )
        }
    );
}

#[test]
fn a_foreign_pod_with_a_copiers_name_blocks_that_copy_and_not_the_launcher() {
    let images = vec![image(
        "os",
        "spec: {source: {pvc: {name: os-disk}}}\nstatus: {phase: Ready, persistent: false, pvcName: os-disk, capacity: 1Gi}",
    )];
    let t = template("[{name: root, image: os}]");
    let v = vm("vm-a");
    let copy = Chosen { strategy: CloneStrategy::Copy, fallback: None };
    let mut obs = observed(&v, &t, &images, &[]);
    obs.clone_choices = map(&[("root", copy)]);
    obs.taken.insert(("Pod", "vm-a-root-copy".into()));
    let plan = vm_plan::decide(&obs);
    assert!(plan.create_copiers.is_empty() && plan.pod.is_none(), "{plan:?}");
    let status = plan.status.unwrap();
    let ready = find(&status.conditions, "Ready").unwrap();
    assert_eq!(ready.reason, "Copying");
    assert_eq!(
        ready.message,
        "Pod vm-a-root-copy exists and does not belong to VirtualMachine vm-a; vmkeep leaves it alone"
    );
}

// ---------------------------------------------------------------------------------------------
// The kubevirt runtime (plan::runtime, docs/kubevirt.md)
// ---------------------------------------------------------------------------------------------

fn kubevirt<'a>(obs: vm_plan::Observed<'a>) -> vm_plan::Observed<'a> {
    vm_plan::Observed {
        runtime: Choice::Run(Runtime::Kubevirt),
        launcher: vm_plan::LauncherView { runtime: Runtime::Kubevirt, ..Default::default() },
        ..obs
    }
}

#[test]
fn a_vm_whose_runtime_is_not_available_waits_and_claims_nothing() {
    let (images, t, v) = (decide_images(), small(), vm("vm-a"));
    let mut obs = observed(&v, &t, &images, &[("db", ClaimState::Free)]);
    obs.runtime = Choice::NotAvailable("no KubeVirt".into());
    let plan = vm_plan::decide(&obs);
    assert!(plan.take.is_empty() && plan.create_pvcs.is_empty() && plan.pod.is_none(), "{plan:?}");
    assert_eq!(phase_and_reason(&plan), (Some(P::Pending), "RuntimeNotAvailable".into()));
    assert!(plan.requeue.is_some(), "it looks again (KubeVirt may be installed)");
    let status = plan.status.unwrap();
    assert_eq!(find(&status.conditions, "Ready").unwrap().message, "no KubeVirt");
    assert_eq!(status.runtime, None);
    // A Halted VM needs no runtime: it is Stopped, as asked.
    let mut halted = vm("vm-a");
    halted.spec.run_strategy = RunStrategy::Halted;
    let mut obs = observed(&halted, &t, &images, &[("db", ClaimState::Free)]);
    obs.runtime = Choice::NotAvailable("no KubeVirt".into());
    assert_eq!(phase_and_reason(&vm_plan::decide(&obs)), (Some(P::Stopped), "Halted".into()));
}

#[test]
fn the_kubevirt_runtime_makes_a_virtual_machine_instance_on_the_vms_pvcs() {
    let images = [decide_images(), vec![usable("iso", false, "CDROM", "1Gi")]].concat();
    let t = template(
        "[{name: root, image: os}, {name: data, image: db}, {name: cd, image: iso}, \
         {name: scratch, blank: {size: 1Gi}}]",
    );
    let v = with_finalizer(vm("vm-a"));
    let first = vm_plan::decide(&kubevirt(observed(&v, &t, &images, &[("db", ClaimState::Free)])));
    let mut v = v;
    v.status = first.status;
    let mut obs = kubevirt(observed(&v, &t, &images, &[("db", ClaimState::Mine)]));
    obs.pvcs = map(&[("vm-a-root", ours("Bound")), ("vm-a-cd", ours("Bound")), ("vm-a-scratch", ours("Bound"))]);
    let plan = vm_plan::decide(&obs);
    let Some(vm_plan::PodChange::CreateInstance(vmi)) = &plan.pod else { panic!("a VMI: {plan:?}") };
    assert_eq!(vmi.metadata.name.as_deref(), Some("vm-a"));
    assert_eq!(vmi.metadata.labels.as_ref().unwrap()["vmkeep.io/virtual-machine-uid"], "uid-vm-a");
    assert_eq!(vmi.metadata.owner_references.as_ref().unwrap()[0].uid, "uid-vm-a");
    let json = serde_json::to_value(vmi.as_ref()).unwrap();
    assert_eq!(json["apiVersion"], "kubevirt.io/v1");
    assert_eq!(json["kind"], "VirtualMachineInstance");
    let spec = &json["spec"];
    assert_eq!(spec["domain"]["cpu"]["cores"], 2);
    let claims: Vec<&str> = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["persistentVolumeClaim"]["claimName"].as_str().unwrap())
        .collect();
    assert_eq!(claims, ["vm-a-root", "db-image", "vm-a-cd", "vm-a-scratch"]);
    let disks = spec["domain"]["devices"]["disks"].as_array().unwrap();
    assert_eq!(disks[0]["disk"]["bus"], "virtio");
    assert_eq!(disks[0]["bootOrder"], 1);
    assert_eq!(disks[2]["cdrom"], serde_json::json!({"bus": "sata", "readonly": true}));
    assert_eq!(spec["volumes"][2]["persistentVolumeClaim"]["readOnly"], true);
    let status = plan.status.unwrap();
    assert_eq!(status.runtime, Some(Runtime::Kubevirt));
    assert_eq!(status.launcher_pod, None, "no launcher Pod with KubeVirt");
}

#[test]
fn a_virtual_machine_instance_runs_stops_and_is_replaced_when_its_guest_ends() {
    let images = decide_images();
    let (t, v) = (small(), with_finalizer(vm("vm-a")));
    let first = vm_plan::decide(&kubevirt(observed(&v, &t, &images, &[("db", ClaimState::Free)])));
    let mut v = v;
    v.status = first.status;
    let running = |v: &VirtualMachine| {
        let mut obs = kubevirt(observed(v, &t, &images, &[("db", ClaimState::Mine)]));
        obs.pvcs = map(&[("vm-a-root", ours("Bound"))]);
        obs.pod = ours("Running");
        obs.launcher.ready = true;
        obs.launcher.node_name = Some("n1".into());
        vm_plan::decide(&obs)
    };
    let plan = running(&v);
    assert_eq!(phase_and_reason(&plan), (Some(P::Running), "Running".into()));
    assert_eq!(plan.pod, None);
    assert_eq!(plan.status.as_ref().unwrap().node_name.as_deref(), Some("n1"));
    // Halted: the VMI goes (not a launcher Pod).
    let mut halted = v.clone();
    halted.spec.run_strategy = RunStrategy::Halted;
    assert_eq!(running(&halted).pod, Some(vm_plan::PodChange::DeleteInstance));
    // Its guest ended (KubeVirt does not start it again): replaced.
    let mut obs = kubevirt(observed(&v, &t, &images, &[("db", ClaimState::Mine)]));
    obs.pvcs = map(&[("vm-a-root", ours("Bound"))]);
    obs.pod = ours("Succeeded");
    assert_eq!(vm_plan::decide(&obs).pod, Some(vm_plan::PodChange::DeleteInstance));
    // Deleted: the VMI goes first, the claim stays until it (and its Pods) are gone.
    let mut deleted = v.clone();
    deleted.metadata.deletion_timestamp = Some(at(2000));
    let mut obs = kubevirt(observed(&deleted, &t, &images, &[("db", ClaimState::Mine)]));
    obs.pod = Child::Ours { phase: None, deleting: true };
    let plan = vm_plan::decide(&obs);
    assert!(plan.release.is_empty() && !plan.remove_finalizer && plan.pod.is_none());
    obs.pod = Child::Missing;
    assert_eq!(vm_plan::decide(&obs).release, ["db"]);
}

#[test]
fn a_vm_whose_instance_vmkeep_cannot_see_keeps_its_claims_and_its_record() {
    let images = decide_images();
    let t = small();
    let mut v = with_finalizer(vm("vm-a"));
    v.status = Some(VirtualMachineStatus { runtime: Some(Runtime::Kubevirt), ..Default::default() });
    // KubeVirt's API unusable (e.g. its RBAC rule removed): nothing released, no launcher.
    let mut obs = observed(&v, &t, &images, &[("db", ClaimState::Mine)]);
    obs.runtime = Choice::NotAvailable("403".into());
    obs.instance_unseen = true;
    let plan = vm_plan::decide(&obs);
    assert!(plan.release.is_empty() && plan.pod.is_none(), "{plan:?}");
    assert_eq!(phase_and_reason(&plan), (Some(P::Pending), "RuntimeNotAvailable".into()));
    assert_eq!(plan.status.as_ref().unwrap().runtime, Some(Runtime::Kubevirt), "the record stays");
    // Halted: not called Stopped while its VMI may run.
    let mut halted = v.clone();
    halted.spec.run_strategy = RunStrategy::Halted;
    let mut obs = observed(&halted, &t, &images, &[("db", ClaimState::Mine)]);
    obs.runtime = Choice::NotAvailable("403".into());
    obs.instance_unseen = true;
    assert_ne!(vm_plan::decide(&obs).status.unwrap().phase, Some(P::Stopped));
    // Deleted: waits, releases nothing, keeps its finalizer.
    let mut deleted = v.clone();
    deleted.metadata.deletion_timestamp = Some(at(2000));
    let mut obs = observed(&deleted, &t, &images, &[("db", ClaimState::Mine)]);
    obs.runtime = Choice::NotAvailable("403".into());
    obs.instance_unseen = true;
    let plan = vm_plan::decide(&obs);
    assert!(plan.release.is_empty() && !plan.remove_finalizer && plan.requeue.is_some());
    // Seen gone (Halted, Pods gone too): the record goes.
    let mut obs = kubevirt(observed(&halted, &t, &images, &[("db", ClaimState::Mine)]));
    obs.instance_gone = true;
    assert_eq!(vm_plan::decide(&obs).status.unwrap().runtime, None);
}

#[test]
fn a_virtual_machine_instance_that_failed_young_is_replaced_after_a_while() {
    let images = decide_images();
    let (t, v) = (small(), with_finalizer(vm("vm-a")));
    let first = vm_plan::decide(&kubevirt(observed(&v, &t, &images, &[("db", ClaimState::Free)])));
    let mut v = v;
    v.status = first.status;
    let mut obs = kubevirt(observed(&v, &t, &images, &[("db", ClaimState::Mine)]));
    obs.pvcs = map(&[("vm-a-root", ours("Bound"))]);
    obs.pod = ours("Failed");
    obs.launcher.created = Some(at(990));
    let plan = vm_plan::decide(&obs);
    assert_eq!(plan.pod, None, "10 s old: not yet");
    assert_eq!(plan.requeue, Some(std::time::Duration::from_secs(20)));
    obs.launcher.created = Some(at(960));
    assert_eq!(vm_plan::decide(&obs).pod, Some(vm_plan::PodChange::DeleteInstance));
}
