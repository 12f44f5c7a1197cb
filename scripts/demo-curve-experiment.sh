#!/bin/bash
# How the demo's training settings were chosen (BENCHMARKS.md, "The demo's curve has its
# minimum inside the range"): train one run on Fashion-MNIST with the given settings, then
# sweep σ_rel with FID and KID as the demo does (16 Heun steps, the first 500 test images as
# reference statistics, computed once per data directory).
#
# usage: scripts/demo-curve-experiment.sh NAME CHANNELS MULT BATCH LR KIMG SNAPSHOT_KIMG \
#            RAMPUP_MIMG SIGMA_RELS [SEED_SETS [IMAGES_PER_SET]]
#   e.g. scripts/demo-curve-experiment.sh e4 32 "[1,2,2]" 32 0.05 20 1 0.002 \
#            "0.025,0.035,0.05,0.07,0.10,0.14,0.19"
# env: HINDSIGHT (the binary; default target/release/hindsight), DATA (data directory;
#      default ./demo-experiments), HINDSIGHT_FID_WEIGHTS (NVIDIA's Inception weights).
set -euo pipefail
bin=${HINDSIGHT:-target/release/hindsight}
data=${DATA:-./demo-experiments}
name=$1 channels=$2 mult=$3 batch=$4 lr=$5 kimg=$6 snapshot=$7 rampup=$8 sigmas=$9
sets=${10:-1} images=${11:-128}
mkdir -p "$data"
network="$data/$name.network.json"
printf '{"img_resolution": 32, "img_channels": 1, "label_dim": 10, "model_channels": %s, "channel_mult": %s, "num_blocks": 1, "attn_resolutions": [], "logvar_channels": 16}\n' \
    "$channels" "$mult" > "$network"
if [ ! -f "$data/$name.trained" ]; then
    started=$(date +%s)
    "$bin" --data-dir "$data" train --run "$name" --dataset fashion-mnist --network "$network" \
        --batch "$batch" --lr "$lr" --total-kimg "$kimg" --snapshot-kimg "$snapshot" \
        --rampup-mimg "$rampup" --ref-batches 1000000
    echo "train_secs $(($(date +%s) - started))" > "$data/$name.trained"
fi
if ! "$bin" --data-dir "$data" references | grep -q fashion-mnist-test-500; then
    "$bin" --data-dir "$data" ref-stats fashion-mnist-test --max-images 500 \
        --name fashion-mnist-test-500
fi
"$bin" --data-dir "$data" sweep --run "$name" --sigma-rel "$sigmas" --metric fid,kid \
    --num-images "$images" --seed-sets "$sets" --reference fashion-mnist-test-500 --steps 16 \
    --batch 64 --plot "$data/$name.svg"
