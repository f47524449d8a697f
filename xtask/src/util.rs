//! Helpers for running child commands from inside `cargo run`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{Context, Result, bail};

/// Workspace root: the parent of the xtask crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives inside the workspace").to_path_buf()
}

/// The target directory cargo uses for this workspace.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() { dir } else { workspace_root().join(dir) }
        }
        _ => workspace_root().join("target"),
    }
}

pub fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from)
}

/// `$CARGO_HOME`, defaulting to `~/.cargo`.
pub fn cargo_home() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CARGO_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    home_dir().map(|h| h.join(".cargo")).context("neither CARGO_HOME nor HOME is set")
}

/// Effective uid of this process, read from /proc/self/status.
pub fn effective_uid() -> Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    parse_effective_uid(&status).context("no Uid line in /proc/self/status")
}

pub fn parse_effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    // Uid:	real	effective	saved	fs
    line.split_whitespace().nth(2)?.parse().ok()
}

pub fn is_root() -> bool {
    effective_uid().map(|u| u == 0).unwrap_or(false)
}

/// Variables that `cargo run` (and the rustup proxy in front of it) set for the running
/// xtask binary. Left in place they would pin child cargo/rustc invocations to the outer
/// toolchain (so `+nightly` would be ignored) or pretend to be a different package.
const LEAKED_VARS: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTUP_TOOLCHAIN_SOURCE",
    "RUSTC",
    "RUSTDOC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_MANIFEST_LINKS",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_BIN_NAME",
    "CARGO_CRATE_NAME",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
    "OUT_DIR",
];

const LEAKED_PREFIXES: &[&str] = &["CARGO_PKG_", "CARGO_BIN_EXE_"];

pub fn is_leaked_var(name: &str) -> bool {
    LEAKED_VARS.contains(&name) || LEAKED_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// A command with the outer cargo's environment removed, `$CARGO_HOME/bin` (and
/// `~/.cargo/bin`) on PATH, and the workspace root as working directory.
pub fn command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root());
    for (name, _) in std::env::vars_os() {
        if let Some(name) = name.to_str()
            && is_leaked_var(name)
        {
            cmd.env_remove(name);
        }
    }
    // cargo run prepends the target dir and the toolchain's lib dirs to LD_LIBRARY_PATH;
    // drop those so a nightly rustc (or bpf-linker) does not pick up stable's libraries.
    if let Some(ldp) = std::env::var_os("LD_LIBRARY_PATH") {
        let rustup_toolchains = rustup_home().map(|h| h.join("toolchains"));
        let target = target_dir();
        let kept: Vec<PathBuf> = std::env::split_paths(&ldp)
            .filter(|p| !p.starts_with(&target) && !rustup_toolchains.as_ref().is_some_and(|t| p.starts_with(t)))
            .collect();
        if kept.is_empty() {
            cmd.env_remove("LD_LIBRARY_PATH");
        } else if let Ok(joined) = std::env::join_paths(kept) {
            cmd.env("LD_LIBRARY_PATH", joined);
        }
    }
    if let Ok(path) = child_path() {
        cmd.env("PATH", path);
    }
    cmd
}

fn rustup_home() -> Option<PathBuf> {
    std::env::var_os("RUSTUP_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| home_dir().map(|h| h.join(".rustup")))
}

/// Directories where `cargo install` puts binaries, most preferred first.
pub fn cargo_bin_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(home) = cargo_home() {
        dirs.push(home.join("bin"));
    }
    if let Some(home) = home_dir() {
        let d = home.join(".cargo").join("bin");
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs
}

/// PATH for children: cargo's bin dirs first, then the inherited PATH.
fn child_path() -> Result<OsString> {
    let mut paths = cargo_bin_dirs();
    if let Some(path) = std::env::var_os("PATH") {
        for p in std::env::split_paths(&path) {
            if !paths.contains(&p) {
                paths.push(p);
            }
        }
    }
    Ok(std::env::join_paths(paths)?)
}

/// Human-readable rendering of a command line (env overrides, program, args).
pub fn display(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (k, v) in cmd.get_envs() {
        let k = k.to_string_lossy();
        if k == "PATH" || k == "LD_LIBRARY_PATH" {
            continue;
        }
        if let Some(v) = v {
            parts.push(format!("{k}={}", quote(&v.to_string_lossy())));
        }
    }
    parts.push(quote(&cmd.get_program().to_string_lossy()));
    parts.extend(cmd.get_args().map(|a| quote(&a.to_string_lossy())));
    parts.join(" ")
}

fn quote(s: &str) -> String {
    let plain = !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=+:,@%".contains(c));
    if plain { s.to_string() } else { format!("'{}'", s.replace('\'', r"'\''")) }
}

/// Print and run a command with inherited stdio; return its exit status.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    let line = display(cmd);
    eprintln!("xtask: {line}");
    cmd.stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .with_context(|| format!("failed to start `{line}`"))
}

/// Print and run a command with inherited stdio; fail if it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<()> {
    let st = status(cmd)?;
    if !st.success() {
        bail!("`{}` failed ({st})", display(cmd));
    }
    Ok(())
}

/// Run a probing command quietly and return its stdout; fail (with its stderr) if it
/// cannot start or exits non-zero.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("failed to start `{line}`"))?;
    if !out.status.success() {
        bail!("`{line}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_from_status() {
        let status = "Name:\txtask\nUmask:\t0022\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(parse_effective_uid(status), Some(0));
        assert_eq!(parse_effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn leaked_vars() {
        for v in ["RUSTUP_TOOLCHAIN", "RUSTC", "CARGO", "CARGO_PKG_NAME", "CARGO_MANIFEST_DIR", "CARGO_PRIMARY_PACKAGE"]
        {
            assert!(is_leaked_var(v), "{v}");
        }
        for v in ["CARGO_HOME", "CARGO_TARGET_DIR", "RUSTUP_HOME", "PATH", "HOME"] {
            assert!(!is_leaked_var(v), "{v}");
        }
    }

    #[test]
    fn command_display_quotes() {
        let mut cmd = Command::new("cargo");
        cmd.args(["+nightly", "build", "a b"]).env("LLVM_PREFIX", "/x");
        assert_eq!(display(&cmd), "LLVM_PREFIX=/x cargo +nightly build 'a b'");
    }
}
