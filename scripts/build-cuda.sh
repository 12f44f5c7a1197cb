#!/usr/bin/env bash
# Build `hindsight` with the `cuda` feature on a machine that has neither a GPU nor a system CUDA
# toolkit (the recipe of ../shared/GPU.md, kept here so anyone can repeat it).
#
#   scripts/build-cuda.sh            # → target/cuda/release/hindsight (stripped)
#                                    #   and target/gpu/hindsight.gz to carry
#
# What it does:
# 1. Installs NVIDIA's CUDA 13.0 compiler and libraries from PyPI wheels into $HINDSIGHT_CUDA_TK
#    (default target/cuda-toolkit), pinned to 13.0.x so the PTX that candle-kernels compiles loads
#    on the 580 driver. The wheels already share one tree (bin/, include/, lib/, nvvm/); nvcc's
#    profile wants targets/x86_64-linux/{include,lib} too, so those are links.
# 2. Gives every library the linker is asked for (`-lcuda -lcublas -lcublasLt -lcurand -lnvrtc
#    -lcudart`) an unversioned name. libcuda.so.1 belongs to the driver and is in no wheel: a stub
#    with the right soname that exports every driver function cudarc declares stands in for it at
#    link time only. At run time the GPU machine's real libraries are found by soname.
# 3. Builds with CUDA_COMPUTE_CAP=90 (H100/H200) into target/cuda, beside the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."

TK=${HINDSIGHT_CUDA_TK:-$PWD/target/cuda-toolkit}
PKGS=$TK/pkgs
CU=$PKGS/nvidia/cu13
PY=${PYTHON:-python3}

if [ ! -x "$CU/bin/nvcc" ] || [ ! -e "$CU/lib/libcublas.so.13" ]; then
  echo "== installing the CUDA 13.0 wheels into $PKGS"
  "$PY" -m pip install -q --no-deps --disable-pip-version-check --target "$PKGS" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.0.0.19 nvidia-curand==10.4.0.35
fi

mkdir -p "$CU/targets/x86_64-linux" "$TK/link"
ln -sfn ../../include "$CU/targets/x86_64-linux/include"
ln -sfn ../../lib "$CU/targets/x86_64-linux/lib"

# Unversioned names for the linker, in a folder of their own (only on the link path).
for lib in cublas cublasLt curand nvrtc cudart; do
  real=$(ls "$CU"/lib/lib$lib.so.* 2>/dev/null | grep -E "lib$lib\.so\.[0-9]+$" | head -1)
  [ -n "$real" ] || { echo "missing lib$lib in $CU/lib" >&2; exit 1; }
  ln -sfn "$real" "$TK/link/lib$lib.so"
done

# The driver stub: every cuXxx function cudarc's driver bindings declare, as an empty function.
CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 2>/dev/null | head -1)
if [ -z "$CUDARC" ]; then
  cargo fetch -q
  CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 | head -1)
fi
grep -o "fn cu[A-Za-z0-9_]*(" "$CUDARC/src/driver/sys/mod.rs" | sort -u |
  sed -e 's/^fn \(.*\)(/void \1(void) {}/' > "$TK/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$TK/link/libcuda.so" "$TK/libcuda_stub.c"

echo "== building (about 10 minutes on 2 cores the first time)"
PATH="$CU/bin:$PATH" CUDA_HOME="$CU" CUDA_PATH="$CU" CUDA_COMPUTE_CAP=90 \
  RUSTFLAGS="-L native=$TK/link ${RUSTFLAGS:-}" CARGO_TARGET_DIR=target/cuda \
  cargo build --release --features cuda --bin hindsight "$@"
strip target/cuda/release/hindsight
# A compressed copy to carry to the GPU machine (the device tool carries at most 64 MiB).
mkdir -p target/gpu
gzip -6 -c target/cuda/release/hindsight > target/gpu/hindsight.gz
ls -la target/cuda/release/hindsight target/gpu/hindsight.gz
echo "needs at run time:"
readelf -d target/cuda/release/hindsight | grep NEEDED
