//! The `rebound` command; everything it does lives in [`rebound::cli`].

fn main() -> std::process::ExitCode {
    rebound::cli::main()
}
