//! Builds the plugins in `plugins/` for `wasm32-wasip2`, so the tests run real components
//! compiled from source (never committed `.wasm` files).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("tests/ sits in the workspace root");
    let plugins = root.join("plugins");
    // Watch sources only: plugins/target changes with every build of the plugins.
    let mut watched = vec![
        root.join("sdk/src"),
        root.join("sdk/Cargo.toml"),
        root.join("wit"),
        plugins.join("Cargo.toml"),
    ];
    for entry in std::fs::read_dir(&plugins)
        .expect("plugins/ is readable")
        .flatten()
    {
        let crate_dir = entry.path();
        if crate_dir.join("Cargo.toml").is_file() {
            watched.push(crate_dir.join("Cargo.toml"));
            watched.push(crate_dir.join("src"));
        }
    }
    for path in watched {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    // The plugins share one target folder with a manual build from the README.
    let target_dir = plugins.join("target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .arg("build")
        .arg("--release")
        .arg("--target=wasm32-wasip2")
        .arg("--manifest-path")
        .arg(plugins.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // Settings meant for the outer (native) build must not reach the guest build.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        build.env_remove(var);
    }
    let status = build
        .status()
        .expect("cannot run cargo to build the test plugins");
    assert!(
        status.success(),
        "building the plugins in {} failed; is the wasm32-wasip2 target installed \
         (rustup target add wasm32-wasip2)?",
        plugins.display()
    );

    let out = target_dir.join("wasm32-wasip2").join("release");
    println!("cargo:rustc-env=TESTS_PLUGIN_DIR={}", out.display());
}
