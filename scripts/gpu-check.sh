#!/usr/bin/env bash
# The GPU gate against a real NVIDIA GPU, for a machine with the driver installed: the host
# reads the GPUs through NVML, a task needing 1 GiB is admitted (and sees GPU 0), and a task
# needing more memory than any card has is held back, pending with no attempt spent.
#
# Prints the readings (`rebound stats`), both tasks and the host's GPU log lines; exits 0
# when the gate behaved, 1 when it did not, 2 when this machine has no usable GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prerequisites.sh
install_wasm_target

cargo build --quiet -p rebound
cargo build --quiet --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml

work="$(mktemp -d)"
mkdir -p "$work/plugins"
cp plugins/target/wasm32-wasip2/release/sleepy.wasm "$work/plugins/"
rebound=(target/debug/rebound --data "$work/tasks.db")

"${rebound[@]}" run --plugins "$work/plugins" --gpu-probe nvml --gpu-interval-ms 500 \
  2>"$work/host.log" &
host=$!
trap 'kill -INT "$host" 2>/dev/null || true; wait "$host" 2>/dev/null || true' EXIT

fits=$("${rebound[@]}" submit sleepy --params '{"ms":300,"sleep":true}' --min-gpu-memory-gb 1)
too_big=$("${rebound[@]}" submit sleepy --params '{"ms":300,"sleep":true}' \
  --min-gpu-memory-gb 100000)

state() { "${rebound[@]}" get "$1" --json | python3 -c 'import json,sys; t=json.load(sys.stdin); print(t["state"], t["attempt"], t.get("result"))'; }
for _ in $(seq 1 100); do
  case "$(state "$fits")" in completed*) break ;; esac
  sleep 0.1
done
sleep 2

echo "== rebound stats"
"${rebound[@]}" stats
echo "== task needing 1 GiB";        "${rebound[@]}" get "$fits"
echo "== task needing 100000 GiB";   "${rebound[@]}" get "$too_big"
echo "== host log (GPU lines)"
grep -i 'gpu' "$work/host.log" || true

if grep -q 'no GPU present' "$work/host.log"; then
  echo "no usable GPU on this machine (see the log above)"
  exit 2
fi
read -r fits_state _ fits_result <<<"$(state "$fits")"
read -r big_state big_attempt _ <<<"$(state "$too_big")"
if [[ "$fits_state" == completed && "$fits_result" == *'"gpu":0'* \
      && "$big_state" == pending && "$big_attempt" == 0 ]]; then
  echo "PASS: admitted the 1 GiB task to GPU 0, held back the 100000 GiB one uncharged"
else
  echo "FAIL: 1 GiB task: $fits_state $fits_result; 100000 GiB task: $big_state, attempt $big_attempt"
  exit 1
fi
