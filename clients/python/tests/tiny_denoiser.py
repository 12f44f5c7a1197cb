"""A model that is not hindsight's EDM2 network, for the external-evaluator tests: a tiny
convolutional denoiser of 28×28 Fashion-MNIST images with EDM's preconditioning (Karras et
al. 2022, arXiv 2206.00364, table 1), its training loop, a deterministic Euler sampler, and a
validation loss. Used by ``test_evaluate.py``, ``test_readme.py`` and by the evaluator
processes they start (``evaluate_worker.py``), so every process makes the same images from
the same weights and seeds.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/``).
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hindsight_client import PowerEMA, Snapshot, seeded_randn

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

#: The data's standard deviation in [−1, 1] units (EDM's σ_data).
SIGMA_DATA = 0.5

#: The sampler settings the tests' sweeps carry (the evaluator receives them untouched).
SAMPLER: dict[str, Any] = {"steps": 6, "sigma_min": 0.02, "sigma_max": 20.0, "rho": 7.0}


def fashion_mnist(split: str = "t10k", count: int | None = None) -> np.ndarray:
    """The first ``count`` images of a split (``train`` or ``t10k``) as uint8 ``[N, 1, 28,
    28]``."""
    path = FASHION_MNIST / f"{split}-images-idx3-ubyte.gz"
    with gzip.open(path) as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    return raw[:count].copy()


class Denoiser(nn.Module):
    """``D(x, σ)``: a few 3×3 convolutions, σ given as a constant input channel."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, 1, 1, 1)
        c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
        c_out = s * SIGMA_DATA / (s**2 + SIGMA_DATA**2).sqrt()
        c_in = 1 / (s**2 + SIGMA_DATA**2).sqrt()
        c_noise = (s.log() / 4).expand(-1, 1, *x.shape[2:])
        return c_skip * x + c_out * self.net(torch.cat([c_in * x, c_noise], dim=1))


def to_unit(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 images to float in [−1, 1]."""
    x = torch.as_tensor(images)
    return x.to(torch.float32) / 127.5 - 1


def edm_loss(model: Denoiser, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """EDM's weighted denoising loss with log-normal σ (P_mean −1.2, P_std 1.2)."""
    n = x0.shape[0]
    sigma = (torch.randn(n, generator=generator) * 1.2 - 1.2).exp()
    noise = torch.randn(x0.shape, generator=generator) * sigma.reshape(-1, 1, 1, 1)
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    err = (model(x0 + noise, sigma) - x0) ** 2
    return (weight.reshape(-1, 1, 1, 1) * err).mean()


def validation_loss(model: Denoiser, images: np.ndarray) -> float:
    """EDM's loss on ``images`` with fixed noise (seed 0): the same number for the same
    weights, in any process."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return float(edm_loss(model, to_unit(images), g))


def train(steps: int = 200, batch: int = 64, snapshot_every: int = 50) -> list[Snapshot]:
    """Trains a :class:`Denoiser` on 4096 training images (seeded), tracking σ_rel 0.05 and
    0.10; the snapshots of both every ``snapshot_every`` steps (``nimg`` = images seen)."""
    torch.manual_seed(0)
    data = to_unit(fashion_mnist("train", 4096))
    model = Denoiser()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    ema = PowerEMA(model, sigma_rels=(0.05, 0.10))
    g = torch.Generator().manual_seed(1)
    snapshots: list[Snapshot] = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        loss = edm_loss(model, data[idx], g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(step * batch)
        if step % snapshot_every == 0:
            # Made from bytes: uploaded by several tests, and a tracker's snapshot gives its
            # buffers back once spooled.
            snapshots += [Snapshot.from_bytes(s.data) for s in ema.snapshot()]
    return snapshots


def load(state_dict: dict[str, torch.Tensor]) -> Denoiser:
    model = Denoiser()
    model.load_state_dict(state_dict)
    return model.eval()


def euler(
    model: Denoiser,
    noise: torch.Tensor,
    steps: int,
    sigma_min: float = 0.02,
    sigma_max: float = 20.0,
    rho: float = 7.0,
) -> torch.Tensor:
    """Euler steps along Karras' σ schedule from ``sigma_max`` to ``sigma_min``, then one
    last denoising, starting from unit ``noise`` ``[B, 1, 28, 28]``; floats in [−1, 1]."""
    ramp = [i / (steps - 1) for i in range(steps)]
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = [(hi + r * (lo - hi)) ** rho for r in ramp]
    x = noise * sigmas[0]
    with torch.no_grad():
        for s, s_next in zip(sigmas, [*sigmas[1:], 0.0], strict=True):
            denoised = model(x, torch.full((x.shape[0],), s))
            x = denoised + (x - denoised) * (s_next / s)
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Floats in [−1, 1] to uint8 pixels."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def sample(model: Denoiser, seeds: list[int], sampler: dict[str, Any]) -> torch.Tensor:
    """:func:`euler` with the sweep's ``sampler`` settings; uint8 ``[B, 1, 28, 28]``, image
    ``i`` from seed ``seeds[i]``."""
    return to_uint8(euler(model, seeded_randn(seeds, (1, 28, 28)), **sampler))


def png(image: np.ndarray) -> bytes:
    """A grey 8-bit PNG of ``image`` (``[H, W]`` uint8), written without an image library."""
    import struct
    import zlib

    h, w = image.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + image[y].tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def write_pngs(images: torch.Tensor | np.ndarray, folder: Path) -> Path:
    """One PNG per image of uint8 ``[B, 1, H, W]``, named by index, into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    array = np.asarray(images)
    width = max(1, math.ceil(math.log10(len(array) + 1)))
    for i, image in enumerate(array):
        (folder / f"{i:0{width}d}.png").write_bytes(png(image[0]))
    return folder
