//! The Helm chart ships the CRDs in `charts/blocksmith/crds/` (Helm installs those first and
//! never deletes them); they must be exactly what `crdgen` writes, like `crds/*.yaml`.

#[test]
fn chart_crds_match_the_types() {
    let chart_crds =
        std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo"))
            .join("../charts/blocksmith/crds");
    let fix = "run `cargo run -p blocksmith-crds --bin crdgen` and copy crds/*.yaml to \
               charts/blocksmith/crds/ (or `cargo run -p blocksmith-crds --bin crdgen -- \
               charts/blocksmith/crds`)";
    let expected: Vec<(&str, String)> = blocksmith_crds::crd_manifests();
    for (file, generated) in &expected {
        let path = chart_crds.join(file);
        let shipped = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{} unreadable ({e}): {fix}", path.display()));
        assert!(
            &shipped == generated,
            "charts/blocksmith/crds/{file} differs from what crdgen writes: {fix}"
        );
    }
    // Nothing else in there: a stale CRD the types no longer produce would be installed too.
    let mut extra: Vec<String> = std::fs::read_dir(&chart_crds)
        .unwrap_or_else(|e| panic!("{} unreadable ({e}): {fix}", chart_crds.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| !expected.iter().any(|(file, _)| file == name))
        .collect();
    extra.sort();
    assert!(
        extra.is_empty(),
        "charts/blocksmith/crds/ has files crdgen does not write: {extra:?}; remove them"
    );
}
