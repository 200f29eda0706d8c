//! The checked-in CRD YAML must be exactly what `crdgen` writes from the Rust types.

#[test]
fn checked_in_crds_match_the_types() {
    let dir =
        std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo"));
    for (file, generated) in blocksmith_crds::crd_manifests() {
        let checked_in = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        assert!(
            checked_in == generated,
            "crds/{file} is stale: run `cargo run -p blocksmith-crds --bin crdgen` and commit the result"
        );
    }
}
