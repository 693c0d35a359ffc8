# Installs what building and testing Rebound needs, when it is missing: the wasm32-wasip2
# Rust target (plugins) and, with `redis`, redis-server (tests). Sourced by the other scripts.

install_wasm_target() {
  if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    echo "==> installing the wasm32-wasip2 Rust target"
    rustup target add wasm32-wasip2
  fi
}

install_redis() {
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "==> installing redis-server"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq redis-server
  fi
}
