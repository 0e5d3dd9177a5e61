//! `crds/` must be exactly what the API types generate.

use std::collections::BTreeSet;

#[test]
fn committed_crds_match_the_api_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let fix = "crds/ is out of date: run `cargo run -- crd --dir crds` and commit the result";
    let mut expected = BTreeSet::new();
    for crd in vmkeep::api::crds() {
        let file = vmkeep::api::crd_file_name(&crd);
        let generated = vmkeep::api::crd_yaml(&crd).expect("serialize the CRD");
        let committed = std::fs::read_to_string(dir.join(&file)).unwrap_or_default();
        assert!(committed == generated, "{fix} ({file} differs)");
        expected.insert(file);
    }
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("crds/ exists")
        .map(|entry| entry.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(present, expected, "{fix} (stray or missing files)");
}
