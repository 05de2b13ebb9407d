use std::process::ExitCode;

fn main() -> ExitCode {
    kedit::cli::main()
}
