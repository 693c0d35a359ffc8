#!/usr/bin/env bash
# The quick start: builds the example plugins and the host, starts the host on the embedded
# store, submits a mixed batch of tasks, waits until every one has ended, and prints how.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prerequisites.sh
install_wasm_target

echo "==> building the example plugins (wasm32-wasip2)"
cargo build --quiet --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
echo "==> building the host"
cargo build --quiet -p rebound

work=target/demo
rm -rf "$work"
mkdir -p "$work/plugins"
cp plugins/target/wasm32-wasip2/release/{echo,flaky,sleepy}.wasm "$work/plugins/"
export REBOUND_DATA="$work/tasks.db"
rebound=target/debug/rebound

echo "==> starting the host (log: $work/host.log)"
"$rebound" run --plugins "$work/plugins" --exec-timeout-ms 2000 --concurrency 4 \
  >"$work/host.log" 2>&1 &
host=$!
trap 'kill -INT $host 2>/dev/null || true' EXIT

echo "==> submitting tasks"
ids=()
submit() { ids+=("$("$rebound" submit "$@")"); }
for n in 1 2 3; do submit echo --params "{\"greeting\":\"hello $n\"}"; done
submit echo --params '{"urgent":true}' --priority 10
submit flaky --params '{"succeed_at":3}' --max-retries 5 --backoff fixed --backoff-interval-ms 200
submit flaky --params '{"succeed_at":2,"retry_after_ms":500}' --max-retries 2
submit flaky --params '{"succeed_at":10}' --max-retries 2 --backoff exponential --backoff-interval-ms 100
submit flaky --params '{"fatal":true}'
submit sleepy --params '{"ms":300}'
submit sleepy --params '{"ms":60000}' --max-retries 0
echo "    ${#ids[@]} tasks submitted"

echo "==> waiting for every task to end"
unfinished() {
  for id in "${ids[@]}"; do
    if "$rebound" get "$id" --json | grep -Eq '"state": "(pending|running|retrying)"'; then
      return 0
    fi
  done
  return 1
}
for _ in $(seq 1 300); do
  unfinished || break
  sleep 0.2
done

echo
printf '%-38s %-7s %-10s %-9s %s\n' TASK QUEUE STATE ATTEMPTS "RESULT / ERROR"
for id in "${ids[@]}"; do
  "$rebound" get "$id" | awk -v id="$id" '
    $1 == "queue"    { queue = $2 }
    $1 == "state"    { state = $2 }
    $1 == "attempts" { attempts = $2 (NF > 2 ? "/" $4 : "") }
    $1 == "result"   { $1 = ""; result = substr($0, 2) }
    $1 == "error"    { $1 = ""; error = substr($0, 2) }
    END { detail = (state == "completed") ? result : error
          if (length(detail) > 70) detail = substr(detail, 1, 67) "..."
          printf "%-38s %-7s %-10s %-9s %s\n", id, queue, state, attempts, detail }'
done
echo
"$rebound" stats

kill -INT $host
wait $host
trap - EXIT
echo
echo "Host stopped. Its log is in $work/host.log; the tasks stay in $REBOUND_DATA."
