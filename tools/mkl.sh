#!/usr/bin/env bash
# Assemble Intel MKL (static) and its OpenMP runtime from PyPI wheels, for the optional `mkl` cargo
# feature, which routes candle's CPU matmuls (and so every MLP/CNN step, HVP and λmax solve) through
# MKL instead of the `gemm` crate. Prints the environment to build and run with:
#
#   eval "$(bash tools/mkl.sh)"
#   cargo build --release --features mkl     # the binary needs libiomp5.so: LD_LIBRARY_PATH is set
#
# Knobs: MKL_DIR (default /tmp/mkl). Needs python3 with pip and unzip; downloads about 250 MB.
set -euo pipefail
MKL_DIR=${MKL_DIR:-/tmp/mkl}
log() { echo "mkl: $*" >&2; }
if [ ! -e "$MKL_DIR/lib/libmkl_core.a" ]; then
  wheels=$(mktemp -d)
  log "downloading mkl-static and intel-openmp wheels into $wheels"
  python3 -m pip download -q --no-deps --disable-pip-version-check -d "$wheels" \
    mkl-static==2026.2.0 mkl-include==2026.2.0 intel-openmp==2026.2.0 >&2
  unpacked=$(mktemp -d)
  for w in "$wheels"/*.whl; do unzip -q -o "$w" -d "$unpacked"; done
  mkdir -p "$MKL_DIR/lib" "$MKL_DIR/include"
  # intel-mkl-src accepts a folder once it holds mkl.h and the libraries.
  cp "$(find "$unpacked" -name mkl.h | head -1)" "$MKL_DIR/include/"
  # intel-mkl-src links mkl_intel_lp64 + mkl_intel_thread + mkl_core and iomp5.
  for lib in libmkl_core.a libmkl_intel_lp64.a libmkl_intel_thread.a libmkl_sequential.a \
             libiomp5.so libiomp5.a; do
    cp "$(find "$unpacked" -name "$lib" | head -1)" "$MKL_DIR/lib/"
  done
  rm -rf "$wheels" "$unpacked"
fi
echo "export MKLROOT=$MKL_DIR"
echo "export LD_LIBRARY_PATH=$MKL_DIR/lib:\${LD_LIBRARY_PATH:-}"
