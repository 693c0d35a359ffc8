# Installs what building and testing Rebound needs, when it is missing: the wasm32-wasip2
# Rust target (plugins) and, for the tests, redis-server and redis-cli (their own servers and
# clusters), openssl (certificates for the TLS test) and prometheus (promtool checks a scrape;
# a private Prometheus server scrapes a host). Sourced by the other scripts.

install_wasm_target() {
  if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    echo "==> installing the wasm32-wasip2 Rust target"
    rustup target add wasm32-wasip2
  fi
}

install_test_tools() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq "${missing[@]}"
  fi
}

# The Python SDK (sdk/python, installed editable) and componentize-py, in a virtual
# environment of the repository's own, target/python-sdk, for building Python plugins. Run
# from the repository root.
install_python_sdk() {
  local venv=target/python-sdk
  if "$venv/bin/python" -c "import rebound_sdk, componentize_py" >/dev/null 2>&1; then
    return
  fi
  if ! python3 -c "import venv, ensurepip" >/dev/null 2>&1; then
    echo "==> installing python3-venv"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq python3 python3-venv
  fi
  echo "==> installing the Python SDK and componentize-py into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --editable sdk/python
}
