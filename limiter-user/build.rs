//! Builds the XDP program (the `limiter-ebpf` crate) with the nightly toolchain and
//! bpf-linker, and leaves the object in `OUT_DIR/limiter` for `include_bytes_aligned!`.

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    // The program also compiles limiter-common; aya-build only watches the eBPF crate itself.
    println!("cargo:rerun-if-changed=../limiter-common/src");
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "limiter-ebpf")
        .ok_or_else(|| anyhow!("limiter-ebpf package not found"))?;
    let cargo_metadata::Package {
        name,
        manifest_path,
        ..
    } = ebpf_package;
    let root_dir = manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {manifest_path}"))?
        .as_str();
    let package = aya_build::Package {
        name: name.as_str(),
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default())
}
