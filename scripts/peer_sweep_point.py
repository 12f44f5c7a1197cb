#!/usr/bin/env python3
"""Peer of `hindsight bench sweep-point`: one point of an EMA-length sweep, done the way an
EDM2 user does it today, with the peers' own code paths, in one process.

Usage: peer_sweep_point.py SNAPSHOT_DIR NETWORK_JSON SIGMA_REL NIMG REFERENCE_NPZ WEIGHTS
                           NUM_IMAGES BATCH STEPS THREADS [DEVICE]

1. reconstruct: EDM2's post-hoc EMA solve (Algorithm 3, float64 NumPy; peer_phema_solve.py)
   over the snapshots in SNAPSHOT_DIR (safetensors with `nimg`, `sigma_rel` metadata), then
   the weighted sum of the snapshots in float32, as `reconstruct_phema.py` accumulates;
2. sample: the EDM2 network in PyTorch (peer_edm2_torch.py) with EDM's Heun sampler, image i
   from seed i, converted to uint8 as EDM2's generate_images.py does;
3. features: NVIDIA's inception-2015-12-05 TorchScript (torch.jit.load of WEIGHTS) with
   NVIDIA's resize, as EDM2's calculate_metrics.py runs it;
4. FID: mean and covariance (NumPy), then pytorch-fid's calculate_frechet_distance
   (scipy.linalg.sqrtm) against REFERENCE_NPZ.

Prints one JSON line: {"seconds": total, "reconstruct_s", "sample_s", "features_s",
"fid_s", "fid", "torch", "device"}.
"""

import glob
import importlib.util
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from peer_fid import nvidia_resize
from peer_phema_solve import solve_vectorised


def load_module(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(HERE, name + ".py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    (
        snap_dir,
        network_json,
        sigma_rel,
        nimg,
        reference,
        weights,
        num_images,
        batch,
        steps,
        threads,
    ) = sys.argv[1:11]
    device = sys.argv[11] if len(sys.argv) > 11 else "cpu"
    import torch
    from pytorch_fid.fid_score import calculate_frechet_distance
    from safetensors import safe_open

    torch.set_num_threads(int(threads))
    dev = torch.device(device)
    edm2 = load_module("peer_edm2_torch")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    started = time.perf_counter()

    # 1. Reconstruct.
    files = sorted(glob.glob(os.path.join(snap_dir, "*.safetensors")))
    metas = []
    for f in files:
        with safe_open(f, "np") as s:
            m = s.metadata()
            metas.append((float(m["nimg"]), float(m["sigma_rel"])))
    t_in = np.array([m[0] for m in metas])
    s_in = np.array([m[1] for m in metas])
    coef = solve_vectorised(
        t_in, s_in, np.array([float(nimg)]), np.array([float(sigma_rel)])
    )[:, 0]
    state = {}
    for f, c in zip(files, coef):
        with safe_open(f, "pt") as s:
            for k in s:
                v = s.get_tensor(k).float() * float(c)
                state[k] = state[k] + v if k in state else v
    reconstruct_s = time.perf_counter() - started

    # 2. Sample.
    t0 = time.perf_counter()
    with open(network_json) as f:
        cfg = edm2.full_config(json.load(f), 0.5)
    net = edm2.Precond(cfg)
    net.load_state_dict(state, strict=False)
    net = net.to(dev).eval()
    res, ch, classes = cfg["img_resolution"], cfg["img_channels"], cfg["label_dim"]
    n, b = int(num_images), int(batch)
    images = []
    with torch.no_grad():
        for start in range(0, n, b):
            seeds = range(start, min(start + b, n))
            noise = torch.stack(
                [
                    torch.randn(
                        ch, res, res, generator=torch.Generator().manual_seed(s)
                    )
                    for s in seeds
                ]
            ).to(dev)
            labels = None
            if classes:
                idx = torch.tensor([s % classes for s in seeds])
                labels = torch.eye(classes)[idx].to(dev)
            x = edm2.edm_sampler(net, noise, labels, int(steps))
            images.append((x * 127.5 + 128).clip(0, 255).to(torch.uint8))
    sync()
    sample_s = time.perf_counter() - t0

    # 3. Features.
    t0 = time.perf_counter()
    inception = torch.jit.load(weights).eval().to(dev)
    feats = []
    with torch.no_grad():
        for x in images:
            x = x.float()
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            feats.append(
                inception((nvidia_resize(x) - 128) / 128).reshape(-1, 2048).cpu()
            )
    feats = torch.cat(feats).double().numpy()
    features_s = time.perf_counter() - t0

    # 4. FID.
    t0 = time.perf_counter()
    mu, sigma = feats.mean(axis=0), np.cov(feats, rowvar=False)
    ref = np.load(reference)
    fid = calculate_frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
    fid_s = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - started,
                "reconstruct_s": reconstruct_s,
                "sample_s": sample_s,
                "features_s": features_s,
                "fid_s": fid_s,
                "fid": float(fid),
                "torch": torch.__version__,
                "device": str(dev),
            }
        )
    )


if __name__ == "__main__":
    main()
