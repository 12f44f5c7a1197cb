"""Snapshots: one EMA at one training time, as the safetensors bytes the server stores.

A snapshot's tensors carry the tracked module's state-dict names (for an EDM2 network, EDM2's
names), and its ``__metadata__`` holds ``nimg`` (training images) and ``sigma_rel`` — what
``hindsight import`` and ``POST /runs/{run}/snapshots`` read. Files are named the way EDM2's
training loop names its snapshots, ``<prefix>-<nimg // 1000:07d>-<sigma_rel:.3f>``, with
``.safetensors`` for ``.pkl`` (``training/training_loop.py`` in NVlabs/edm2).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np
import safetensors.numpy

from .profile import sigma_rel_to_gamma

EDM2_PREFIX = "network-snapshot"
"""The file-name prefix EDM2's training loop uses."""


def digest_of(data: bytes | memoryview) -> str:
    """BLAKE3 of ``data`` as 64 lower-case hex digits: the name the server's store gives it."""
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """One EMA of a training run at one time.

    Attributes:
        nimg: training time in images.
        sigma_rel: the EMA's width (relative standard deviation of its profile).
        data: the safetensors file, ``nimg`` and ``sigma_rel`` in its ``__metadata__``.
    """

    nimg: int
    sigma_rel: float
    data: bytes

    @property
    def gamma(self) -> float:
        """The EMA's power-function exponent (EDM2 eq. 126)."""
        return sigma_rel_to_gamma(self.sigma_rel)

    @functools.cached_property
    def digest(self) -> str:
        """BLAKE3 of :attr:`data` (hex), computed once."""
        return digest_of(self.data)

    def file_name(self, prefix: str = EDM2_PREFIX) -> str:
        """EDM2's name for this snapshot, e.g. ``network-snapshot-0008388-0.050.safetensors``
        (thousands of images, σ_rel to three decimals)."""
        return f"{prefix}-{self.nimg // 1000:07d}-{self.sigma_rel:.3f}.safetensors"

    def save(self, folder: str | os.PathLike[str], prefix: str = EDM2_PREFIX) -> Path:
        """Writes the file into ``folder`` (created if missing) under :meth:`file_name`,
        atomically (a temporary file, fsynced, then renamed). Returns its path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.file_name(prefix)
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(self.data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def arrays(self) -> dict[str, np.ndarray]:
        """The tensors as NumPy arrays (NumPy has no bfloat16: for snapshots written in
        float32, float16 or integer types)."""
        return safetensors.numpy.load(self.data)


def save_snapshots(
    snapshots: Iterable[Snapshot], folder: str | os.PathLike[str], prefix: str = EDM2_PREFIX
) -> list[Path]:
    """Writes several snapshots into ``folder`` with EDM2's file names, for
    ``hindsight import FOLDER --run NAME``. Raises ``ValueError`` before writing anything if
    two of them would get the same name (widths equal to three decimals at the same kimg)."""
    snapshots = list(snapshots)
    names = [s.file_name(prefix) for s in snapshots]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"snapshots would share the file names {dup}; use distinct widths")
    return [s.save(folder, prefix) for s in snapshots]
