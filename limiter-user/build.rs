//! Builds the XDP program (the `limiter-ebpf` crate) with the nightly toolchain and
//! bpf-linker, and leaves the object in `OUT_DIR/limiter` for `include_bytes_aligned!`.
//!
//! Without them (a new contributor's `cargo check` or `cargo test`), or with
//! `LIMITER_EBPF_STUB=1`, it leaves empty objects instead and says so: the host tests and
//! `cargo check` work, and a binary built that way refuses to load the program with a message
//! saying how to build it for real (`cargo xtask build`).

use std::process::{Command, Stdio};

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// Why the real program cannot be built here, if it cannot.
fn missing_toolchain() -> Option<String> {
    if std::env::var_os("LIMITER_EBPF_STUB").is_some() {
        return Some("LIMITER_EBPF_STUB is set".into());
    }
    let works = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !works("bpf-linker", &["--version"]) {
        return Some("bpf-linker is not installed".into());
    }
    if !works("rustup", &["run", "nightly", "rustc", "--version"]) {
        return Some("the nightly toolchain is not installed".into());
    }
    None
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=LIMITER_EBPF_STUB");
    if let Some(reason) = missing_toolchain() {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
        for object in ["limiter", "baselines"] {
            std::fs::write(out.join(object), [])?;
        }
        println!(
            "cargo:warning=the XDP program is not built ({reason}): this build checks and runs \
             host tests, but cannot load the program; `cargo xtask setup` installs what it needs"
        );
        // A watched path that does not exist makes cargo rerun this script on every build,
        // so the real program is built as soon as bpf-linker is installed there.
        let cargo_home = std::env::var("CARGO_HOME")
            .or_else(|_| std::env::var("HOME").map(|h| format!("{h}/.cargo")))
            .unwrap_or_default();
        println!("cargo:rerun-if-changed={cargo_home}/bin/bpf-linker");
        println!("cargo:rerun-if-changed=../limiter-ebpf/src");
        return Ok(());
    }
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
