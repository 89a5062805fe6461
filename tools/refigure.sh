#!/usr/bin/env bash
# Reruns figures' smoke profiles, in the order given, on one artifact store, and says for each its
# wall time and whether the PNG it draws is byte-identical to the committed figures/figNN.png: a
# change that moves a figure's bits shows here, and the times are those of the README's table (a
# figure listed after another reuses the runs they share).
#   bash tools/refigure.sh 13 15 12      # or no numbers: every pipelines/fig*.yaml, in make's order
# Environment: EOSS (default target/release/eoss), STORE (default a new temporary store; name one to
# reuse runs across calls), OUT (default a new temporary folder: figNN.{png,svg,csv} and figNN.log),
# JOBS (default 2), EOSS_DATA (default ../shared/data). Copy a PNG from OUT into figures/ to accept
# it. Exits 1 when a figure failed or differs from the committed one.
set -uo pipefail
EOSS=${EOSS:-target/release/eoss}
STORE=${STORE:-$(mktemp -d)}
OUT=${OUT:-$(mktemp -d)}
export EOSS_DATA=${EOSS_DATA:-../shared/data}
if [ ! -x "$EOSS" ]; then
  echo "refigure: no $EOSS: run \`cargo build --release\` or set EOSS" >&2
  exit 2
fi
mkdir -p "$OUT"
figures=("$@")
if [ ${#figures[@]} -eq 0 ]; then
  for pipeline in pipelines/fig*.yaml; do
    name=${pipeline#pipelines/fig}
    figures+=("${name%.yaml}")
  done
fi
echo "store $STORE, figures to $OUT"
status=0
for figure in "${figures[@]}"; do
  nn=$(printf '%02d' "$((10#$figure))")
  start=$(date +%s%N)
  "$EOSS" run "pipelines/fig$nn.yaml" --profile smoke --jobs "${JOBS:-2}" --artifacts "$STORE" \
    --export "$OUT" >"$OUT/fig$nn.log" 2>&1
  rc=$?
  elapsed=$((($(date +%s%N) - start) / 100000000))
  if [ "$rc" -ne 0 ]; then
    verdict="failed (exit $rc, see $OUT/fig$nn.log)"
    status=1
  elif [ ! -e "figures/fig$nn.png" ]; then
    verdict="new (no figures/fig$nn.png)"
  elif cmp -s "$OUT/fig$nn.png" "figures/fig$nn.png"; then
    verdict="same as figures/fig$nn.png"
  else
    verdict="differs from figures/fig$nn.png"
    status=1
  fi
  printf 'fig%s  %6d.%d s  %s\n' "$nn" "$((elapsed / 10))" "$((elapsed % 10))" "$verdict"
done
exit "$status"
