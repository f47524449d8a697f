//! `cargo xtask setup`: install what a bare Debian 12 machine lacks, idempotently.

use std::fs;
use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::util::{cargo_bin_dirs, cargo_home, command, is_root, output, run};

const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "iperf3",
    "sockperf",
    "iptables",
    "nftables",
    "bpftool",
    "tcpdump",
    "socat",
    "conntrack",
    "iputils-ping",
    "netcat-openbsd",
    // The XDP tests make the lab's client send full checksums (`ethtool -K eth0 tx off`).
    "ethtool",
    // The UDP clients of the end-to-end tests.
    "python3",
    // The DNS tests: dig in containers, dnsmasq as the lab's upstream resolver (the -base
    // package: the binary only, no system service).
    "dnsutils",
    "dnsmasq-base",
    // The cluster store of multi-host (overlay) networks: the overlay tests start a real etcd
    // inside their lab; protoc builds the etcd-client crate's gRPC stubs.
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
];

/// Only the benchmarks need these: the baselines netpath is measured against (podman's
/// netavark and aardvark-dns, the CNI bridge + portmap plugins) and the tools that drive them.
pub const BENCH_APT_PACKAGES: &[&str] = &["netavark", "containernetworking-plugins", "aardvark-dns"];

const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Installs what tests, demo and lint need, plus `extra_packages` (e.g. the bench's).
pub fn setup(extra_packages: &[&str]) -> Result<()> {
    apt_packages(&APT_PACKAGES.iter().chain(extra_packages).copied().collect::<Vec<_>>())?;
    nightly_rust_src()?;
    bpf_linker()?;
    eprintln!("xtask: setup complete");
    Ok(())
}

fn apt_packages(packages: &[&str]) -> Result<()> {
    let mut missing = Vec::new();
    for pkg in packages {
        let installed = command("dpkg-query")
            .args(["-W", "-f=${Status}", pkg])
            .output()
            .context("running dpkg-query (is this a Debian machine?)")
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))?;
        if !installed {
            missing.push(*pkg);
        }
    }
    if missing.is_empty() {
        eprintln!("xtask: apt packages: all {} present ({})", packages.len(), packages.join(" "));
        return Ok(());
    }
    eprintln!("xtask: apt packages: missing {}", missing.join(" "));
    if !is_root() {
        bail!(
            "setup must run as root to install Debian packages ({}); \
             run `sudo -E cargo xtask setup` or install them yourself",
            missing.join(" ")
        );
    }
    run(command("apt-get").arg("update")).context("apt-get update")?;
    run(command("apt-get").env("DEBIAN_FRONTEND", "noninteractive").args(["install", "-y"]).args(&missing))
        .context("installing Debian packages")?;
    eprintln!("xtask: apt packages: installed {}", missing.join(" "));
    Ok(())
}

fn nightly_rust_src() -> Result<()> {
    let host = rustc_verbose_field(&output(command("rustc").arg("-vV"))?, "host")
        .context("no `host:` line in `rustc -vV` output")?;
    let toolchains = output(command("rustup").args(["toolchain", "list"]))
        .context("listing rustup toolchains (is rustup installed?)")?;
    if !has_toolchain(&toolchains, NIGHTLY, &host) {
        bail!(
            "the rustup toolchain `{NIGHTLY}` is not installed (found: {}); \
             it cannot be downloaded on this machine, so install `{NIGHTLY}-{host}` by other means",
            toolchains.lines().collect::<Vec<_>>().join(", ")
        );
    }
    let components = output(command("rustup").args(["component", "list", "--toolchain", NIGHTLY, "--installed"]))?;
    if has_component(&components, "rust-src") {
        eprintln!("xtask: rust-src: present for toolchain {NIGHTLY}");
        return Ok(());
    }
    eprintln!("xtask: rust-src: missing for toolchain {NIGHTLY}, adding it");
    run(command("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
        .context("adding rust-src to the nightly toolchain (download refused?)")?;
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let mut checked = Vec::new();
    for candidate in bpf_linker_candidates() {
        match output(command(&candidate.to_string_lossy()).arg("--version")) {
            Ok(out) if is_version(&out, BPF_LINKER_VERSION) => {
                eprintln!("xtask: bpf-linker: {} at {}", out.trim(), candidate.display());
                return Ok(());
            }
            Ok(out) => checked.push(format!("{} reports `{}`", candidate.display(), out.trim())),
            Err(e) => checked.push(format!("{} does not run: {e:#}", candidate.display())),
        }
    }
    if checked.is_empty() {
        eprintln!("xtask: bpf-linker: not found, building {BPF_LINKER_VERSION}");
    } else {
        eprintln!("xtask: bpf-linker: no working {BPF_LINKER_VERSION} ({}), building it", checked.join("; "));
    }
    build_bpf_linker()
}

/// Every `bpf-linker` on PATH, in `$CARGO_HOME/bin` and in `~/.cargo/bin`.
fn bpf_linker_candidates() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(cargo_bin_dirs());
    let mut found: Vec<PathBuf> = Vec::new();
    for dir in dirs {
        let exe = dir.join("bpf-linker");
        if exe.is_file() {
            let key = exe.canonicalize().unwrap_or_else(|_| exe.clone());
            if !found.iter().any(|f| f.canonicalize().unwrap_or_else(|_| f.clone()) == key) {
                found.push(exe);
            }
        }
    }
    found
}

fn build_bpf_linker() -> Result<()> {
    let prefix = cargo_home()?.join("netpath-llvm");
    let lib_dir = prefix.join("lib");

    let sysroot = PathBuf::from(output(command("rustc").args(["--print", "sysroot"]))?.trim());
    let vv = output(command("rustc").arg("-vV"))?;
    let major = parse_llvm_major(&vv).context("no `LLVM version:` line in `rustc -vV`")?;
    let sys_lib = sysroot.join("lib");
    let real = find_real_libllvm(&sys_lib, major)?;
    let real_name = real.file_name().context("libLLVM path has no file name")?.to_owned();
    eprintln!(
        "xtask: bpf-linker: LLVM {major}, using {} as LLVM_PREFIX (library {})",
        prefix.display(),
        real.display()
    );

    fs::create_dir_all(&lib_dir).with_context(|| format!("creating {}", lib_dir.display()))?;
    for name in [Path::new("libLLVM.so"), Path::new(&real_name)] {
        ensure_symlink(&lib_dir.join(name), &real)?;
    }

    run(command("cargo")
        .env("LLVM_PREFIX", &prefix)
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        // --force: a broken install of the same version (e.g. its libLLVM dir was
        // removed) would otherwise be reported as "already installed" and kept.
        .args(["--locked", "--force", "--no-default-features", "--features"])
        .arg(format!("llvm-{major}")))
    .context("building bpf-linker")?;

    let installed = cargo_home()?.join("bin").join("bpf-linker");
    let out = output(command(&installed.to_string_lossy()).arg("--version"))
        .context("the freshly built bpf-linker does not run")?;
    if !is_version(&out, BPF_LINKER_VERSION) {
        bail!("the freshly built bpf-linker reports `{}`", out.trim());
    }
    eprintln!("xtask: bpf-linker: installed {} (keep {}: its runpath points there)", out.trim(), lib_dir.display());
    Ok(())
}

/// Pick the real (ELF) `libLLVM.so.<major>.*` in the sysroot's lib dir.
fn find_real_libllvm(sys_lib: &Path, major: u32) -> Result<PathBuf> {
    let names: Vec<String> = fs::read_dir(sys_lib)
        .with_context(|| format!("reading {}", sys_lib.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    for name in libllvm_candidates(&names, major) {
        let path = sys_lib.join(&name);
        let Ok(real) = path.canonicalize() else {
            continue;
        };
        if is_elf(&real) {
            return Ok(real);
        }
    }
    bail!("no shared library libLLVM.so.{major}.* in {} (entries: {})", sys_lib.display(), names.join(", "))
}

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == *b"\x7fELF"
}

/// Make `link` a symlink to `target`, replacing whatever stale thing is there.
fn ensure_symlink(link: &Path, target: &Path) -> Result<()> {
    if let Ok(meta) = fs::symlink_metadata(link) {
        if meta.file_type().is_symlink() && fs::read_link(link).is_ok_and(|t| t.as_path() == target) {
            eprintln!("xtask: bpf-linker: {} already points to the library", link.display());
            return Ok(());
        }
        if meta.is_dir() { fs::remove_dir_all(link) } else { fs::remove_file(link) }
            .with_context(|| format!("removing stale {}", link.display()))?;
    }
    symlink(target, link).with_context(|| format!("linking {} -> {}", link.display(), target.display()))?;
    eprintln!("xtask: bpf-linker: linked {} -> {}", link.display(), target.display());
    Ok(())
}

/// Value of a `key: value` line in `rustc -vV` output.
fn rustc_verbose_field(vv: &str, key: &str) -> Option<String> {
    vv.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

/// LLVM major version from `rustc -vV` ("LLVM version: 22.1.2" -> 22).
pub fn parse_llvm_major(vv: &str) -> Option<u32> {
    rustc_verbose_field(vv, "LLVM version")?.split('.').next()?.parse().ok()
}

/// Names that look like the real LLVM shared library of the given major version:
/// `libLLVM.so.<major>` optionally followed by `.<anything>`. The
/// `libLLVM-<major>-rust-*.so` linker script does not match. Sorted, longest
/// (most specific) first.
pub fn libllvm_candidates(names: &[String], major: u32) -> Vec<String> {
    let stem = format!("libLLVM.so.{major}");
    let mut out: Vec<String> = names
        .iter()
        .filter(|n| n.strip_prefix(&stem).is_some_and(|rest| rest.is_empty() || rest.starts_with('.')))
        .cloned()
        .collect();
    out.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    out
}

/// Whether a `--version` output names exactly this version.
pub fn is_version(out: &str, version: &str) -> bool {
    out.split_whitespace().any(|w| w == version)
}

/// Whether `rustup toolchain list` output contains the toolchain `name` (bare or
/// with the host triple appended, as rustup spells it).
pub fn has_toolchain(list: &str, name: &str, host: &str) -> bool {
    let full = format!("{name}-{host}");
    list.lines().filter_map(|l| l.split_whitespace().next()).any(|t| t == name || t == full)
}

/// Whether `rustup component list --installed` output contains the component.
pub fn has_component(list: &str, component: &str) -> bool {
    list.lines()
        .any(|l| l.split_whitespace().next().is_some_and(|c| c == component || c.starts_with(&format!("{component}-"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUSTC_VV: &str = "rustc 1.95.0 (59807616e 2026-04-14)
binary: rustc
commit-hash: 59807616e1fa2540724bfbac14d7976d7e4a3860
commit-date: 2026-04-14
host: x86_64-unknown-linux-gnu
release: 1.95.0
LLVM version: 22.1.2
";

    #[test]
    fn llvm_major_from_rustc_vv() {
        assert_eq!(parse_llvm_major(RUSTC_VV), Some(22));
        assert_eq!(parse_llvm_major("LLVM version: 19.1.7\n"), Some(19));
        assert_eq!(parse_llvm_major("rustc 1.0.0\nhost: x\n"), None);
        assert_eq!(rustc_verbose_field(RUSTC_VV, "host").as_deref(), Some("x86_64-unknown-linux-gnu"));
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn picks_real_libllvm_not_linker_script() {
        let dir = names(&[
            "libLLVM-22-rust-1.95.0-stable.so",
            "libLLVM.so.22.1-rust-1.95.0-stable",
            "librustc_driver-6108105cd7e839cf.so",
            "rustlib",
        ]);
        assert_eq!(libllvm_candidates(&dir, 22), names(&["libLLVM.so.22.1-rust-1.95.0-stable"]));
        assert!(libllvm_candidates(&dir, 2).is_empty());
        assert!(libllvm_candidates(&dir, 21).is_empty());
        assert!(libllvm_candidates(&names(&["libLLVM-22-rust-1.95.0-stable.so"]), 22).is_empty());
    }

    #[test]
    fn libllvm_major_boundary_and_order() {
        let dir = names(&["libLLVM.so.220.1", "libLLVM.so.22", "libLLVM.so.22.1-rust-x"]);
        assert_eq!(libllvm_candidates(&dir, 22), names(&["libLLVM.so.22.1-rust-x", "libLLVM.so.22"]));
    }

    #[test]
    fn real_libllvm_on_disk_skips_non_elf() {
        let dir = std::env::temp_dir().join(format!("xtask-libllvm-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("libLLVM.so.22.1-script"), "INPUT(libLLVM.so.22.1)\n").unwrap();
        fs::write(dir.join("libLLVM.so.22.1"), b"\x7fELF\x02\x01\x01").unwrap();
        fs::write(dir.join("libLLVM-22-rust.so"), b"\x7fELF\x02\x01\x01").unwrap();
        let real = find_real_libllvm(&dir, 22).unwrap();
        assert_eq!(real.file_name().unwrap(), "libLLVM.so.22.1");

        // Symlinks are created, then a stale one is replaced.
        let lib = dir.join("prefix");
        fs::create_dir_all(&lib).unwrap();
        ensure_symlink(&lib.join("libLLVM.so"), &dir.join("libLLVM-22-rust.so")).unwrap();
        ensure_symlink(&lib.join("libLLVM.so"), &real).unwrap();
        ensure_symlink(&lib.join("libLLVM.so"), &real).unwrap();
        assert_eq!(fs::read_link(lib.join("libLLVM.so")).unwrap(), real);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn version_and_toolchain_checks() {
        assert!(is_version("bpf-linker 0.13.0\n", "0.13.0"));
        assert!(!is_version("bpf-linker 0.13.1\n", "0.13.0"));
        assert!(!is_version("bpf-linker 0.9.13.0\n", "0.13.0"));

        let host = "x86_64-unknown-linux-gnu";
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-x86_64-unknown-linux-gnu\n1.95.0-x86_64-unknown-linux-gnu\n";
        assert!(has_toolchain(list, "nightly", host));
        assert!(!has_toolchain(
            "stable-x86_64-unknown-linux-gnu (default)\nnightly-2025-01-01-x86_64-unknown-linux-gnu\n",
            "nightly",
            host
        ));

        assert!(has_component("cargo-x86_64-unknown-linux-gnu\nrust-src\n", "rust-src"));
        assert!(!has_component("rust-std-x86_64-unknown-linux-gnu\n", "rust-src"));
    }
}
