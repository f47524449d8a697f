fn main() -> std::process::ExitCode {
    netpath::cli::main()
}
