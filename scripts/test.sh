#!/usr/bin/env bash
# Runs every check of the repository: formatting, lints, and all tests (unit, doc and
# integration; the integration tests build the plugins, Rust and Python, and start their own
# redis-server, Redis Cluster and TLS server), and the Python SDK's own tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prerequisites.sh
install_wasm_target
install_test_tools
install_python_sdk

echo "==> formatting"
cargo fmt --all -- --check
cargo fmt --all --manifest-path plugins/Cargo.toml -- --check

echo "==> lints"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release -- -D warnings

echo "==> tests"
target/python-sdk/bin/python -m unittest discover --start-directory sdk/python/tests
# The Python plugins first, on their own: building them and compiling each (seconds of both
# cores) would otherwise run beside the timed cases of the other tests.
cargo test -p rebound-tests --test python
cargo test --workspace
