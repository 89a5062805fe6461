#!/usr/bin/env bash
# Every GPU check of issues 3-5 in one run on a lent GPU machine, from `.gpu/` as made by
# tools/gpu-prepare.sh (the device tool: run(command: "bash tools/gpu-check.sh", carry: [".gpu"],
# timeout_s: 540)). In order, each step under its own time limit, logs under $OUT:
#   1. `eoss bench --suite train` against PyTorch in the same run (issue 3: MLP step at b = 16 vs 0.73 ms);
#   2. pipelines/paper-cadence.yaml on CUDA (issue 4: the reference code took 57.7 s on an H100);
#   3. pipelines/gpu-check.yaml on the CPU and on CUDA, compared step by step (tools/compare_metrics.py);
#   4. `eoss bench --suite curvature` against PyTorch.
# $OUT/summary.txt gets one line per step and the tables; the rest goes to $OUT/log.txt.
# DEVICE=cpu EOSS=target/release/eoss runs the same on a machine without a GPU (to test this script).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check-out}
DEVICE=${DEVICE:-cuda}
TORCH=${TORCH:-/opt/torch/.venv/bin/python}
ROOT=$PWD
WORK=$(mktemp -d)
STORE=$WORK/store
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
LOG=$OUT/log.txt
: >"$SUMMARY"
: >"$LOG"
say() { echo "$*" | tee -a "$SUMMARY"; }
# section NAME: what the last step NAME printed.
section() { awk -v h="== $1:" 'index($0, h) == 1 {found = 1; buf = ""; next} found {buf = buf $0 "\n"} END {printf "%s", buf}' "$LOG"; }

# step NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`, its output into the log.
step() {
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name: $*" >>"$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  say "$name: exit $rc after $(($(date +%s) - start)) s"
  return $rc
}

cp -r "$ROOT/.gpu/data" "$WORK/data"
xz -d "$WORK"/data/cifar10/*.xz
if [ -z "${EOSS:-}" ]; then
  xz -dc "$ROOT/.gpu/eoss.xz" >"$WORK/eoss" && chmod +x "$WORK/eoss"
  EOSS=$WORK/eoss
fi
export EOSS_DATA=$WORK/data
CUDA_LIBS=$(dirname "$(dirname "$TORCH")")/lib/python3.12/site-packages/nvidia/cu13/lib
if [ ! -e "$CUDA_LIBS/libcublas.so.13" ] && [ "$DEVICE" = cuda ]; then
  found=$(find / -name libcublas.so.13 -not -path '/proc/*' 2>/dev/null | head -n 1)
  [ -n "$found" ] && CUDA_LIBS=$(dirname "$found")
fi
export LD_LIBRARY_PATH="$ROOT/.gpu/lib:$CUDA_LIBS:${LD_LIBRARY_PATH:-}"
torch_arg=()
[ -x "$TORCH" ] && torch_arg=(--torch "$TORCH")

say "gpu-check on $(hostname), device $DEVICE, $(date -u +%FT%TZ)"
command -v nvidia-smi >/dev/null &&
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$SUMMARY"

step bench-train 150 "$EOSS" bench --device "$DEVICE" --suite train "${torch_arg[@]}" \
  --json "$OUT/bench-train.json" && section bench-train | sed -n '/^case/,$p' >>"$SUMMARY"

step paper-cadence 180 "$EOSS" run pipelines/paper-cadence.yaml --artifacts "$STORE" \
  --set "train*.device=$DEVICE" --report "$WORK/cadence.json"
for key in $(python3 -c 'import json,sys; print(" ".join(s["key"] for s in json.load(open(sys.argv[1]))["stages"] if s["kind"] == "train"))' "$WORK/cadence.json" 2>/dev/null); do
  grep -h "measured\|done in" "$STORE/train/$key/log.txt" | sed "s/^/  ${key:0:12} /" >>"$SUMMARY"
done

step check-cpu 200 "$EOSS" run pipelines/gpu-check.yaml --artifacts "$STORE" -j 3 \
  --set 'train*.device=cpu' --report "$WORK/check-cpu.json"
step check-device 120 "$EOSS" run pipelines/gpu-check.yaml --artifacts "$STORE" \
  --set "train*.device=$DEVICE" --report "$WORK/check-device.json"
step compare 30 python3 tools/compare_metrics.py "$STORE" "$WORK/check-cpu.json" \
  "$WORK/check-device.json" && section compare >>"$SUMMARY"

step bench-curvature 150 "$EOSS" bench --device "$DEVICE" --suite curvature "${torch_arg[@]}" \
  --json "$OUT/bench-curvature.json" && section bench-curvature | sed -n '/^case/,$p' >>"$SUMMARY"
rm -rf "$WORK"
cat "$SUMMARY"
