//! The CNI plugin binary: runtimes exec it with CNI_* variables and the config on stdin.

fn main() -> std::process::ExitCode {
    netpath::cni::main()
}
