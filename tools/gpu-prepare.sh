#!/usr/bin/env bash
# Prepares `.gpu/` (ignored through .git/info/exclude) for one run of tools/gpu-check.sh on a lent
# GPU machine, which has the NVIDIA driver and PyTorch but no Rust, no network and none of our data:
#   - the `cuda` binary, built here with ../shared/tools/cuda-toolchain.sh (../shared/docs/gpu.md),
#     stripped and compressed, with the shared libraries it needs beyond glibc and CUDA's (fonts);
#   - a sparse CIFAR-10: every label byte, but only the pixels of the records that the checked
#     pipelines select (the others zeroed), compressed. Selection depends on n and seed alone, so the
#     dataset artifacts made from it are bit-identical to those of the real files (checked below).
# Run from the repository root: `bash tools/gpu-prepare.sh` (20 minutes the first time, candle's CUDA
# kernels included; a minute or two after). Then, with the device tool:
#   run(command: "bash tools/gpu-check.sh", carry: [".gpu"], timeout_s: 540)
set -euo pipefail
DIR=.gpu
DATA=${EOSS_DATA:-../shared/data}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
log() { echo "gpu-prepare: $*" >&2; }

grep -qxF "/$DIR/" .git/info/exclude 2>/dev/null || echo "/$DIR/" >>.git/info/exclude
rm -rf "$DIR" && mkdir -p "$DIR/lib" "$DIR/data/cifar10"

log "dataset stages of pipelines/paper-cadence.yaml and pipelines/gpu-check.yaml (CPU build)"
cargo build --release -q
cat >"$WORK/data.yaml" <<'EOF'
name: gpu-data
stages:
  cadence: {kind: dataset, params: {source: cifar10, n: 8192, seed: 0}}
  check: {kind: dataset, params: {source: cifar10, n: 256, seed: 0}}
EOF
run_data() { # $1: data root, $2: store
  EOSS_DATA=$1 ./target/release/eoss run "$WORK/data.yaml" --artifacts "$2" --report "$2.json" >&2
}
run_data "$DATA" "$WORK/real"

log "sparse CIFAR-10 in $DIR/data/cifar10"
python3 - "$WORK/real" "$DATA/cifar10" "$DIR/data/cifar10" <<'EOF'
import json, struct, sys
from array import array
from pathlib import Path
store, source, target = map(Path, sys.argv[1:])
keep = set()
for stage in json.loads(Path(f"{store}.json").read_text())["stages"]:
    path = store / "dataset" / stage["key"] / "dataset.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    info = json.loads(raw[8:8 + n])["source_indices"]
    assert info["dtype"] == "I64", info
    start, end = info["data_offsets"]
    keep.update(array("q", raw[8 + n + start:8 + n + end]))
record, per_file = 3073, 10_000
for f in range(5):
    data = bytearray((source / f"data_batch_{f + 1}.bin").read_bytes())
    for r in range(per_file):
        if f * per_file + r not in keep:
            data[r * record + 1:(r + 1) * record] = bytes(record - 1)
    (target / f"data_batch_{f + 1}.bin").write_bytes(data)
print(f"gpu-prepare: kept the pixels of {len(keep)} records", file=sys.stderr)
EOF
run_data "$DIR/data" "$WORK/sparse"
python3 - "$WORK" <<'EOF'
import sys
from pathlib import Path
work = Path(sys.argv[1])
sparse = {p.read_bytes() for p in (work / "sparse" / "dataset").glob("*/dataset.safetensors")}
for p in (work / "real" / "dataset").glob("*/dataset.safetensors"):
    if p.read_bytes() not in sparse:
        sys.exit(f"gpu-prepare: the sparse copy gives another dataset than {p.parent.name[:12]}")
EOF
log "dataset artifacts from the sparse copy are bit-identical"
xz -T0 -6 "$DIR"/data/cifar10/*.bin

log "cuda binary (target-cuda)"
cargo fetch -q
eval "$(bash ../shared/tools/cuda-toolchain.sh)"
CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda
cp target-cuda/release/eoss "$DIR/eoss"
strip "$DIR/eoss"
ldd "$DIR/eoss" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r name path; do
  case $name in
    libc.so* | libm.so* | libdl.so* | librt.so* | libpthread.so* | libgcc_s.so* | libstdc++.so*) ;;
    *) cp -L "$path" "$DIR/lib/$name" ;;
  esac
done
xz -T0 -6 "$DIR/eoss"
du -sh "$DIR" "$DIR"/* >&2
log "ready: run(command: \"bash tools/gpu-check.sh\", carry: [\"$DIR\"], timeout_s: 540)"
