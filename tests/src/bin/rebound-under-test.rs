//! The `rebound` command, built inside the test package so that tests can run it as a
//! process (`CARGO_BIN_EXE_rebound-under-test`); it is the same code as `host/src/main.rs`.

fn main() -> std::process::ExitCode {
    rebound::cli::main()
}
