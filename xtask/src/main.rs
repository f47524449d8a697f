//! Developer tasks for netpath: `cargo xtask <command>`.

mod setup;
mod util;

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use util::{command, is_root, run, status, target_dir, workspace_root};

#[derive(Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about = "netpath developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks (Debian packages, nightly rust-src, bpf-linker).
    Setup,
    /// Build the eBPF object (target/bpfel-unknown-none/<profile>/netpath-ebpf).
    BuildEbpf {
        #[arg(long)]
        release: bool,
    },
    /// Build the eBPF object, then the userspace crates.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Setup, build the eBPF object, run `cargo test` (needs root).
    ///
    /// `cargo xtask test -- --nocapture` runs `cargo test -- --nocapture`;
    /// `cargo xtask test -p netpath foo -- --nocapture` forwards everything as written.
    Test {
        /// Arguments for `cargo test`.
        #[arg(allow_hyphen_values = true)]
        cargo_args: Vec<String>,
        /// Arguments for the test binaries (after `--`).
        #[arg(last = true)]
        test_args: Vec<String>,
    },
    /// Setup, build, and run the netpath demo.
    Demo,
    /// `cargo fmt --check` and `cargo clippy -D warnings`.
    Lint,
    /// Run the benchmark harness (netpath-bench), if there is one.
    Bench {
        /// Arguments for the benchmark binary.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<ExitCode> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::setup(&[])?,
        Cmd::BuildEbpf { release } => build_ebpf(release)?,
        Cmd::Build { release } => build(release)?,
        Cmd::Test { cargo_args, test_args } => test(&cargo_args, &test_args)?,
        Cmd::Demo => return demo(),
        Cmd::Lint => lint()?,
        Cmd::Bench { args } => return bench(&args),
    }
    Ok(ExitCode::SUCCESS)
}

fn profile_args(release: bool) -> &'static [&'static str] {
    if release { &["--release"] } else { &[] }
}

fn build_ebpf(release: bool) -> Result<()> {
    run(command("cargo")
        .args(["+nightly", "build", "-p", "netpath-ebpf"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(profile_args(release)))
    .context("building the eBPF object (is `cargo xtask setup` done?)")?;
    let obj =
        target_dir().join("bpfel-unknown-none").join(if release { "release" } else { "debug" }).join("netpath-ebpf");
    if !obj.is_file() {
        bail!("the eBPF build succeeded but {} is missing", obj.display());
    }
    eprintln!("xtask: eBPF object: {}", obj.display());
    Ok(())
}

/// Where the upgrade tests' second build of the programs goes (its own target dir, so the
/// feature switch never rebuilds the embedded object).
fn variant_object() -> std::path::PathBuf {
    target_dir().join("ebpf-upgrade-test").join("bpfel-unknown-none").join("debug").join("netpath-ebpf")
}

/// Builds the `upgrade-test` variant of the eBPF object (programs and map layouts differ).
fn build_ebpf_variant() -> Result<()> {
    run(command("cargo")
        .args(["+nightly", "build", "-p", "netpath-ebpf", "--features", "upgrade-test"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir().join("ebpf-upgrade-test")))
    .context("building the upgrade-test eBPF object")?;
    let obj = variant_object();
    if !obj.is_file() {
        bail!("the eBPF build succeeded but {} is missing", obj.display());
    }
    eprintln!("xtask: upgrade-test eBPF object: {}", obj.display());
    Ok(())
}

fn build(release: bool) -> Result<()> {
    build_ebpf(release)?;
    if !release {
        // The tests upgrade the datapath to it and back.
        build_ebpf_variant()?;
    }
    run(command("cargo").arg("build").args(profile_args(release))).context("cargo build")
}

fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} must run as root (they create network namespaces and load eBPF); try `sudo -E cargo xtask ...`");
    }
    Ok(())
}

fn test(cargo_args: &[String], test_args: &[String]) -> Result<()> {
    require_root("the end-to-end tests")?;
    setup::setup(&[])?;
    // The end-to-end tests run the `netpath` binary itself, which `cargo test` does not build.
    build(false)?;
    let mut cmd = command("cargo");
    cmd.arg("test").args(cargo_args).env("NETPATH_TEST_EBPF_VARIANT", variant_object());
    if !test_args.is_empty() {
        cmd.arg("--").args(test_args);
    }
    run(&mut cmd).context("tests failed")
}

fn demo() -> Result<ExitCode> {
    setup::setup(&[])?;
    build(false)?;
    let st = status(command("cargo").args(["run", "--quiet", "-p", "netpath-tests", "--bin", "netpath-demo"]))?;
    exit_code(st, "the demo")
}

fn lint() -> Result<()> {
    run(command("cargo").args(["fmt", "--all", "--", "--check"]))
        .context("formatting check failed (run `cargo fmt --all`)")?;
    build_ebpf(false)?;
    run(command("cargo").args(["clippy", "--all-targets", "--", "-D", "warnings"])).context("clippy found problems")
}

fn bench(args: &[String]) -> Result<ExitCode> {
    if !workspace_root().join("bench").join("Cargo.toml").is_file() {
        eprintln!("xtask: no benchmark harness exists yet (bench/Cargo.toml, package netpath-bench)");
        return Ok(ExitCode::FAILURE);
    }
    setup::setup(setup::BENCH_APT_PACKAGES)?;
    // The bench drives the release `netpath` binary, which `cargo run -p netpath-bench` does not build.
    build(true)?;
    let mut cmd = command("cargo");
    cmd.args(["run", "--release", "-p", "netpath-bench"]);
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    let st = status(&mut cmd)?;
    exit_code(st, "the benchmarks")
}

/// Propagate a child's exit code (signals become 128+n like a shell would report).
fn exit_code(st: std::process::ExitStatus, what: &str) -> Result<ExitCode> {
    use std::os::unix::process::ExitStatusExt;
    if st.success() {
        return Ok(ExitCode::SUCCESS);
    }
    let code = match (st.code(), st.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    };
    eprintln!("xtask: {what} exited with {st}");
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1).max(1)))
}
