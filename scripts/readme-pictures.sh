#!/usr/bin/env bash
# Remakes the README's pictures from a data directory the demo filled:
#   docs/demo-samples.png  the demo's sample grid at the best EMA length
#   docs/demo-curve.png    the demo's FID curve (its SVG, rendered by headless Chromium)
#   docs/ui-sweep.png      the web UI's sweep page (headless Chromium, 1280×900)
# Usage: scripts/readme-pictures.sh [DATA_DIR (default ./hindsight-data)] [RUN (default demo)]
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-hindsight-data}
run=${2:-demo}
bin=target/release/hindsight
test -x "$bin" || cargo build --release
cp "$data/demo/$run-samples/grid.png" docs/demo-samples.png
chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=640,440 \
  --screenshot=docs/demo-curve.png "file://$(realpath "$data/demo/$run-sweep.svg")" 2>/dev/null
sweep=$("$bin" --data-dir "$data" sweeps --run "$run" --json \
  | python3 -c 'import json, sys; print(max(json.loads(l)["id"] for l in sys.stdin if l.strip()))')
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin" --data-dir "$data" serve --addr "127.0.0.1:$port" --no-sweep-worker >/dev/null 2>&1 &
server=$!
trap 'kill $server' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.2; done
chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,900 \
  --force-device-scale-factor=1 --virtual-time-budget=8000 \
  --screenshot=docs/ui-sweep.png "http://127.0.0.1:$port/#/sweeps/$sweep" 2>/dev/null
echo "wrote docs/demo-samples.png, docs/demo-curve.png and docs/ui-sweep.png (sweep $sweep of run $run)"
