//! Embeds the eBPF object built by `cargo xtask build-ebpf` (one way to build it: the xtask).
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let target_dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| manifest.parent().unwrap().join("target"));
    let profile = if std::env::var("PROFILE").as_deref() == Ok("release") { "release" } else { "debug" };
    let obj = target_dir.join("bpfel-unknown-none").join(profile).join("netpath-ebpf");
    println!("cargo:rerun-if-changed={}", obj.display());
    if !obj.exists() {
        panic!(
            "eBPF object {} is missing: build it with `cargo xtask build-ebpf{}` (or use `cargo xtask build`)",
            obj.display(),
            if profile == "release" { " --release" } else { "" }
        );
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("netpath-ebpf.o");
    std::fs::copy(&obj, &out).expect("copying eBPF object");
}
