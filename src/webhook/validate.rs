//! The admission rules: pure functions of the objects in a request and of what the API server
//! holds (Images, claims), read by the caller. Every decision the controllers also make comes
//! from [`crate::plan`], with the same words, so `kubectl apply` and the object's status agree.
//!
//! A rule that needs an object that does not exist yet (a Template, an Image) admits: GitOps
//! tools apply objects in any order, and the controller decides once everything is there.
//! Updates that leave `spec` alone (finalizers, labels) are always admitted, so the webhook never
//! stands between the controller and its own writes.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    api::{
        Image, Template, VirtualMachine,
        image::ImageSpec,
        template::TemplateSpec,
        virtual_machine::{OnImageConflict, VirtualMachinePhase},
    },
    plan::{
        self,
        claim::{ClaimPlan, ClaimState, in_use_message, plan_claims},
        quantity,
        virtual_machine::check_template,
    },
};

/// `Ok` admits; `Err` denies with the message the user sees.
pub type Verdict = Result<(), String>;

/// A field that may not change after creation.
fn immutable<T: PartialEq>(field: &str, old: &T, new: &T) -> Verdict {
    if old == new { Ok(()) } else { Err(format!("{field} is immutable")) }
}

/// An Image, created (`old` is `None`) or updated: its source, type, volume mode and storage
/// class are fixed once its PVC may exist, and its spec must be able to work
/// ([`plan::image::spec_error`]).
pub fn image(old: Option<&Image>, new: &Image) -> Verdict {
    if let Some(old) = old {
        if old.spec == new.spec {
            return Ok(());
        }
        image_immutable(&old.spec, &new.spec)?;
        size_only_grows(old, new)?;
    }
    match plan::image::spec_error(&new.spec) {
        Some((_, message)) => Err(message),
        None => Ok(()),
    }
}

/// Volumes grow (the controller expands the image's PVC), never shrink: `spec.size` may not go
/// below the capacity the image has (`status.capacity`: what storage gave its PVC, or what the
/// PVC asks for before it binds), or below the old `spec.size` while that is unknown. Going back
/// down from a size storage never gave (an adopted PVC too small, a class that cannot expand, a
/// typo on an unbound PVC) is allowed; the controller checks the PVC itself.
fn size_only_grows(old: &Image, new: &Image) -> Verdict {
    let floor = old.status.as_ref().and_then(|s| s.capacity.as_ref()).or(old.spec.size.as_ref());
    match (floor, &new.spec.size) {
        (Some(floor), Some(now)) if new.spec.size != old.spec.size && quantity::bytes(now) < quantity::bytes(floor) => {
            Err(format!(
                "spec.size may not go below the image's capacity ({} -> {}): volumes do not shrink",
                floor.0, now.0
            ))
        }
        _ => Ok(()),
    }
}

fn image_immutable(old: &ImageSpec, new: &ImageSpec) -> Verdict {
    immutable("spec.source", &old.source, &new.source)?;
    immutable("spec.type", &old.r#type, &new.r#type)?;
    immutable("spec.volumeMode", &old.volume_mode, &new.volume_mode)?;
    immutable("spec.storageClassName", &old.storage_class_name, &new.storage_class_name)
}

/// A Template, created or updated: unique disk names, image references that are valid names,
/// and nothing [`check_template`] calls `Failed` (two CDROM disks, a disk smaller than its image,
/// ...) against the images that exist and are usable now. `images` answers for the names of
/// [`images_of`] only.
pub fn template<'a>(old: Option<&Template>, new: &Template, images: impl Fn(&str) -> Option<&'a Image>) -> Verdict {
    if old.is_some_and(|old| old.spec == new.spec) {
        return Ok(());
    }
    let mut names = BTreeSet::new();
    for (i, disk) in new.spec.disks.iter().enumerate() {
        if !names.insert(disk.name.as_str()) {
            return Err(format!("spec.disks[{i}].name: disk {} appears twice; disk names are unique", disk.name));
        }
        if let Some(image) = &disk.image
            && let Err(why) = dns1123_subdomain(image)
        {
            return Err(format!("spec.disks[{i}].image: {image:?} is not a valid Image name: {why}"));
        }
    }
    match check_template(&new.spec, images) {
        Err(blocker) if blocker.phase == VirtualMachinePhase::Failed => Err(blocker.message),
        _ => Ok(()),
    }
}

/// The Image names of a Template worth looking up (the valid ones).
pub fn images_of(template: &TemplateSpec) -> BTreeSet<&str> {
    template.disks.iter().filter_map(|d| d.image.as_deref()).filter(|i| dns1123_subdomain(i).is_ok()).collect()
}

/// An updated VirtualMachine: its Template is resolved once, so the reference is fixed.
pub fn virtual_machine_update(old: &VirtualMachine, new: &VirtualMachine) -> Verdict {
    immutable("spec.templateRef", &old.spec.template_ref, &new.spec.template_ref)
}

/// The persistent images a new VirtualMachine made from `template` would claim, as the
/// controller resolves them ([`check_template`]). None while the Template waits for an Image
/// or can never work: the controller reports those on the VM.
pub fn claims_needed<'a>(template: &TemplateSpec, images: impl Fn(&str) -> Option<&'a Image>) -> Vec<String> {
    match check_template(template, images) {
        Ok(disks) => disks.into_iter().filter(|d| d.persistent).filter_map(|d| d.image).collect(),
        Err(_) => Vec::new(),
    }
}

/// A new VirtualMachine, given who holds each image of [`claims_needed`]: denied when another
/// VM holds one and the new VM would be Rejected ([`plan_claims`]); a VM that waits is admitted.
pub fn virtual_machine_create(on_conflict: OnImageConflict, claims: &BTreeMap<String, ClaimState>) -> Verdict {
    match plan_claims(on_conflict, claims, |_| None) {
        ClaimPlan::Conflict { image, holder, wait: false } => Err(in_use_message(&image, &holder)),
        _ => Ok(()),
    }
}

/// Whether `name` is a DNS-1123 subdomain, the rule for the names of most Kubernetes objects.
pub fn dns1123_subdomain(name: &str) -> Result<(), &'static str> {
    const RULE: &str = "lower-case letters, digits, '-' and '.', starting and ending with a letter or digit";
    if name.is_empty() || name.len() > 253 {
        return Err("a name has 1 to 253 characters");
    }
    let label_ok = |label: &str| {
        let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        label.starts_with(alnum) && label.ends_with(alnum) && label.chars().all(|c| alnum(c) || c == '-')
    };
    if name.split('.').all(label_ok) { Ok(()) } else { Err(RULE) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;

    fn parse<T: DeserializeOwned>(yaml: &str) -> T {
        serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}:\n{yaml}"))
    }

    fn image_spec(spec: &str) -> Image {
        parse(&format!("metadata: {{name: disk, namespace: ns}}\nspec: {spec}"))
    }

    /// An Image a VM can use now, with `capacity` and the mode in force `persistent`.
    fn usable(name: &str, persistent: bool, kind: &str, capacity: &str) -> Image {
        parse(&format!(
            "metadata: {{name: {name}, namespace: ns}}\n\
             spec: {{persistent: {persistent}, type: {kind}, size: {capacity}, source: {{blank: {{}}}}}}\n\
             status: {{phase: Ready, persistent: {persistent}, pvcName: {name}-image, capacity: {capacity}}}"
        ))
    }

    fn template_of(disks: &str) -> Template {
        parse(&format!("metadata: {{name: t, namespace: ns}}\nspec: {{cpu: 1, memory: 1Gi, disks: {disks}}}"))
    }

    fn lookup<'a>(images: &'a [Image]) -> impl Fn(&str) -> Option<&'a Image> {
        move |name| images.iter().find(|i| i.metadata.name.as_deref() == Some(name))
    }

    fn vm(template: &str, on_conflict: &str) -> VirtualMachine {
        parse(&format!(
            "metadata: {{name: vm, namespace: ns}}\n\
             spec: {{templateRef: {{name: {template}}}, onImageConflict: {on_conflict}}}"
        ))
    }

    #[test]
    fn an_image_source_names_exactly_one_kind() {
        let two = image_spec("{size: 1Gi, source: {blank: {}, pvc: {name: p}}}");
        let none = image_spec("{size: 1Gi, source: {}}");
        let message = "spec.source must name exactly one of blank, pvc, image, http, virtualMachineDisk";
        assert_eq!(image(None, &two), Err(message.into()));
        assert_eq!(image(None, &none), Err(message.into()));
        assert_eq!(image(None, &image_spec("{source: {pvc: {name: p}}}")), Ok(()));
        assert_eq!(image(None, &image_spec("{source: {image: {name: other}}}")), Ok(()));
    }

    #[test]
    fn a_blank_image_needs_a_positive_size() {
        let message = "spec.size is required for a blank image";
        assert_eq!(image(None, &image_spec("{source: {blank: {}}}")), Err(message.into()));
        assert_eq!(
            image(None, &image_spec("{size: '0', source: {blank: {}}}")),
            Err("spec.size 0 is not a positive size".into())
        );
        assert_eq!(image(None, &image_spec("{size: 1Gi, source: {blank: {}}}")), Ok(()));
    }

    #[test]
    fn source_type_volume_mode_and_storage_class_are_immutable() {
        let old = image_spec("{size: 1Gi, storageClassName: fast, source: {blank: {}}}");
        let cases = [
            ("{size: 1Gi, storageClassName: fast, source: {pvc: {name: p}}}", "spec.source is immutable"),
            ("{size: 1Gi, storageClassName: fast, type: CDROM, source: {blank: {}}}", "spec.type is immutable"),
            (
                "{size: 1Gi, storageClassName: fast, volumeMode: Block, source: {blank: {}}}",
                "spec.volumeMode is immutable",
            ),
            ("{size: 1Gi, storageClassName: slow, source: {blank: {}}}", "spec.storageClassName is immutable"),
            ("{size: 1Gi, source: {blank: {}}}", "spec.storageClassName is immutable"),
        ];
        for (spec, message) in cases {
            assert_eq!(image(Some(&old), &image_spec(spec)), Err(message.into()), "{spec}");
        }
        // What may change: persistence, disabled, size.
        let changed =
            image_spec("{size: 2Gi, persistent: true, disabled: true, storageClassName: fast, source: {blank: {}}}");
        assert_eq!(image(Some(&old), &changed), Ok(()));
    }

    #[test]
    fn an_image_size_may_grow_and_never_shrink() {
        let old = image_spec("{source: {blank: {}}, size: 2Gi}");
        let grown = image_spec("{source: {blank: {}}, size: 3Gi}");
        assert_eq!(image(Some(&old), &grown), Ok(()));
        let shrunk = image_spec("{source: {blank: {}}, size: 1Gi}");
        assert_eq!(
            image(Some(&old), &shrunk),
            Err("spec.size may not go below the image's capacity (2Gi -> 1Gi): volumes do not shrink".into())
        );
        // Back from a size storage never gave (its capacity is still 2Gi): allowed.
        let mut stuck = grown.clone();
        stuck.status = Some(parse("capacity: 2Gi"));
        assert_eq!(image(Some(&stuck), &old), Ok(()));
        assert!(image(Some(&stuck), &shrunk).is_err(), "below what storage gave");
    }

    #[test]
    fn an_update_that_leaves_the_spec_alone_is_admitted_even_if_the_spec_is_invalid() {
        // An Image created while no webhook ran: the controller's finalizer writes must pass.
        let old = image_spec("{source: {blank: {}}}");
        let mut new = old.clone();
        new.metadata.finalizers = Some(vec!["vmkeep.io/image-in-use".into()]);
        assert_eq!(image(Some(&old), &new), Ok(()));
        let template = template_of("[{name: a, image: Bad_Name}]");
        assert_eq!(super::template(Some(&template), &template, |_| None), Ok(()));
    }

    #[test]
    fn the_template_reference_of_a_vm_is_immutable() {
        let old = vm("small", "Reject");
        assert_eq!(virtual_machine_update(&old, &vm("large", "Reject")), Err("spec.templateRef is immutable".into()));
        assert_eq!(virtual_machine_update(&old, &vm("small", "Wait")), Ok(()));
    }

    #[test]
    fn disk_names_are_unique() {
        let t = template_of("[{name: root, blank: {size: 1Gi}}, {name: root, image: base}]");
        assert_eq!(
            template(None, &t, |_| None),
            Err("spec.disks[1].name: disk root appears twice; disk names are unique".into())
        );
        let t = template_of("[{name: root, blank: {size: 1Gi}}, {name: data, image: base}]");
        assert_eq!(template(None, &t, |_| None), Ok(()));
    }

    #[test]
    fn image_references_are_valid_names() {
        for bad in ["Bad_Name", "-a", "a-", "a..b", "UPPER", &"a".repeat(254)] {
            let t = template_of(&format!("[{{name: root, image: {bad:?}}}]"));
            let denied = template(None, &t, |_| None).expect_err(bad);
            assert!(denied.starts_with(&format!("spec.disks[0].image: {bad:?} is not a valid Image name")), "{denied}");
        }
        for good in ["ubuntu-24", "a", "img.v1.2", "0"] {
            let t = template_of(&format!("[{{name: root, image: {good:?}}}]"));
            assert_eq!(template(None, &t, |_| None), Ok(()), "{good}");
        }
        let t = template_of("[{name: a, image: ok}, {name: b, image: Not_Ok}, {name: c, blank: {size: 1Gi}}]");
        assert_eq!(images_of(&t.spec), BTreeSet::from(["ok"]));
    }

    #[test]
    fn at_most_one_cdrom_disk_when_the_images_exist() {
        let images = [usable("iso-a", false, "CDROM", "1Gi"), usable("iso-b", false, "CDROM", "1Gi")];
        let t = template_of("[{name: a, image: iso-a}, {name: b, image: iso-b}]");
        assert_eq!(
            template(None, &t, lookup(&images)),
            Err("disks a, b all use CDROM images; a template may have one".into())
        );
        // One of them does not exist yet: nothing to decide now.
        assert_eq!(template(None, &t, lookup(&images[..1])), Ok(()));
        let t = template_of("[{name: a, image: iso-a}, {name: b, blank: {size: 1Gi}}]");
        assert_eq!(template(None, &t, lookup(&images)), Ok(()));
    }

    #[test]
    fn a_disk_is_never_smaller_than_its_image() {
        let images = [usable("base", false, "OS", "2Gi")];
        let t = template_of("[{name: root, image: base, size: 1Gi}]");
        assert_eq!(template(None, &t, lookup(&images)), Err("disk root asks for 1Gi but image base holds 2Gi".into()));
        assert_eq!(template(None, &t, |_| None), Ok(()), "the image does not exist yet");
        let t = template_of("[{name: root, image: base, size: 3Gi}]");
        assert_eq!(template(None, &t, lookup(&images)), Ok(()));
    }

    #[test]
    fn a_template_update_is_checked_like_a_create() {
        let images = [usable("base", false, "OS", "2Gi")];
        let old = template_of("[{name: root, image: base, size: 3Gi}]");
        let new = template_of("[{name: root, image: base, size: 1Gi}]");
        assert!(template(Some(&old), &new, lookup(&images)).is_err());
        assert_eq!(template(Some(&new), &old, lookup(&images)), Ok(()));
    }

    #[test]
    fn a_new_vm_needs_the_persistent_images_its_template_resolves_to() {
        let images = [usable("db", true, "DATABLOCK", "1Gi"), usable("base", false, "OS", "1Gi")];
        let t = template_of("[{name: root, image: base}, {name: data, image: db}, {name: tmp, blank: {size: 1Gi}}]");
        assert_eq!(claims_needed(&t.spec, lookup(&images)), ["db"]);
        // The template waits for an image: the controller decides later.
        assert!(claims_needed(&t.spec, lookup(&images[..1])).is_empty());
    }

    #[test]
    fn a_new_vm_is_denied_a_persistent_image_another_vm_holds_unless_it_waits() {
        let held = BTreeMap::from([("db".to_owned(), ClaimState::Other { holder: "vm-a".into() })]);
        assert_eq!(
            virtual_machine_create(OnImageConflict::Reject, &held),
            Err("image db is persistent and already in use by VirtualMachine vm-a".into())
        );
        assert_eq!(virtual_machine_create(OnImageConflict::Wait, &held), Ok(()));
        let free = BTreeMap::from([("db".to_owned(), ClaimState::Free)]);
        assert_eq!(virtual_machine_create(OnImageConflict::Reject, &free), Ok(()));
        assert_eq!(virtual_machine_create(OnImageConflict::Reject, &BTreeMap::new()), Ok(()));
    }
}
