#!/usr/bin/env bash
# Rebound's benchmarks, as BENCHMARKS.md reports them.
#
#   bash scripts/bench.sh                 # every scenario, 3 runs each (about 30 minutes)
#   bash scripts/bench.sh --peers         # then the replaced framework and arq on the same
#                                         # workload, with the ratios Rebound / peer
#   bash scripts/bench.sh --scenarios pickup,retry --runs 5    # any flags of the bench binary
#
# Figures go to stdout and to $RESULTS_DIR (default target/bench): rebound.md, rebound.json,
# and with --peers the peers' JSON and ratios.md. The peers' scripts live in
# $PEERS_DIR (default ../shared/bench/peers, beside this repository).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prerequisites.sh
install_wasm_target
install_test_tools

peers=0
if [ "${1:-}" = "--peers" ]; then
  peers=1
  shift
fi
results=${RESULTS_DIR:-target/bench}
mkdir -p "$results"
results=$(cd "$results" && pwd)

echo "==> building the bench binary and the plugins (release)"
cargo build --release -p rebound-tests --bin bench
bench=target/release/bench

"$bench" --json "$results/rebound.json" "$@" | tee "$results/rebound.md"

[ "$peers" = 1 ] || exit 0

peers_dir=${PEERS_DIR:-../shared/bench/peers}
if [ ! -f "$peers_dir/run_seed.sh" ]; then
  echo "error: no peer benchmarks at $peers_dir (set PEERS_DIR)" >&2
  exit 1
fi
echo "==> the replaced framework (seed) and arq: N=1000 no-op tasks"
RESULTS_DIR="$results" bash "$peers_dir/run_seed.sh" --scenarios throughput --n 1000 --reps 3
RESULTS_DIR="$results" bash "$peers_dir/run_arq.sh" --n 1000 --reps 3
echo "==> Rebound on the same workload: N=1000 enqueued first, 10 at once, Redis"
"$bench" --scenarios throughput --n 1000 --concurrency 10 --stores redis \
  --json "$results/rebound-peers.json" | tee "$results/rebound-peers.md"

python3 - "$results" <<'PY' | tee "$results/ratios.md"
import json, sys, os
d = sys.argv[1]
ours = json.load(open(os.path.join(d, "rebound-peers.json")))[0]["tasks_per_s"]["median"]
rows = []
def seed(name, label):
    path = os.path.join(d, name)
    if os.path.exists(path):
        rows.append((label, json.load(open(path))["throughput"]["1000"]["tasks_per_s"]["median"]))
seed("seed.json", "seed, batch 100, interval 1 s (its defaults)")
seed("seed-warning.json", "seed, logging at WARNING")
seed("seed-batch1000.json", "seed, batch 1000")
for cfg in json.load(open(os.path.join(d, "arq.json")))["configs"]:
    rows.append((f"arq, poll_delay {cfg['poll_delay']}, max_jobs {cfg['max_jobs']}",
                 cfg["tasks_per_s"]["median"]))
print("\n## Rebound / peer: N=1000 no-op tasks, enqueued first, Redis, 10 at once\n")
print(f"Rebound: {ours:.0f} tasks/s (median of 3)\n")
print("| peer | peer tasks/s | Rebound / peer |")
print("|---|---|---|")
for label, theirs in rows:
    print(f"| {label} | {theirs:.0f} | {ours / theirs:.1f}× |")
PY
