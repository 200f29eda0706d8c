//! Writes the CRD manifests generated from the Rust types to `crds/` (or the given directory).

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("CARGO_MANIFEST_DIR").ok())
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    for (file, yaml) in blocksmith_crds::crd_manifests() {
        let path = dir.join(file);
        std::fs::write(&path, yaml)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
