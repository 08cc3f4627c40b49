#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    pingate::cli::main()
}
