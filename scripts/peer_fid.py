#!/usr/bin/env python3
"""The peers of `hindsight bench fid`, timed on the same inputs.

  peer_fid.py frechet A.npz B.npz ROUNDS
      pytorch-fid's calculate_frechet_distance (scipy.linalg.sqrtm) on two statistics files;
      prints {"fd": ..., "seconds": [...], "pytorch_fid": version}.
  peer_fid.py inception WEIGHTS IMAGES.npy BATCH THREADS ROUNDS [DEVICE]
      NVIDIA's inception-2015-12-05 TorchScript (torch.jit.load) on uint8 images [N, 3, H, W]
      with NVIDIA's resize and scaling, as EDM2 runs it; prints {"images_per_second": [...],
      "features_mean": ..., "torch": version}.

Needs numpy, scipy, torch and pytorch-fid.
"""

import json
import sys
import time

import numpy as np


def frechet(a, b, rounds):
    from pytorch_fid import __version__ as version
    from pytorch_fid.fid_score import calculate_frechet_distance

    sa, sb = np.load(a), np.load(b)
    times, fd = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        fd = calculate_frechet_distance(sa["mu"], sa["sigma"], sb["mu"], sb["sigma"])
        times.append(time.perf_counter() - start)
    print(json.dumps({"fd": float(fd), "seconds": times, "pytorch_fid": version}))


def nvidia_resize(x, size=299):
    import torch

    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=torch.float32)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.unsqueeze(0).repeat([n, 1, 1]).to(x.device)
    grid = torch.nn.functional.affine_grid(
        theta, [n, c, size, size], align_corners=False
    )
    return torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def inception(weights, images, batch, threads, rounds, device="cpu"):
    import torch

    torch.set_num_threads(threads)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    net = torch.jit.load(weights).eval().to(dev)
    data = torch.from_numpy(np.load(images)).to(dev)
    rates, mean = [], None
    with torch.no_grad():
        # One warm-up batch.
        net((nvidia_resize(data[:batch].float()) - 128) / 128)
        for _ in range(rounds):
            sync()
            start = time.perf_counter()
            feats = []
            for i in range(0, len(data), batch):
                x = (nvidia_resize(data[i : i + batch].float()) - 128) / 128
                feats.append(net(x).reshape(-1, 2048))
            sync()
            rates.append(len(data) / (time.perf_counter() - start))
            mean = float(torch.cat(feats).mean())
    print(
        json.dumps(
            {
                "images_per_second": rates,
                "features_mean": mean,
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    if sys.argv[1] == "frechet":
        frechet(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        device = sys.argv[7] if len(sys.argv) > 7 else "cpu"
        inception(
            sys.argv[2],
            sys.argv[3],
            int(sys.argv[4]),
            int(sys.argv[5]),
            int(sys.argv[6]),
            device,
        )
