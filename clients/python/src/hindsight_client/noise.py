"""Noise per seed: image *i* of a sweep's point comes from seed *i*, whatever the batch it
falls in and however many images a batch holds, so two evaluators (or one resumed) make the
same images, and a point's images can be made again from their seeds alone.

Each seed gets its own ``torch.Generator``; a batch's noise is the stack of each
generator's draw. A sampler that draws noise more than once (a stochastic sampler's churn)
keeps the generators and passes them again: each call continues every seed's own stream.

Needs PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def seed_generators(
    seeds: Sequence[int], device: str | torch.device = "cpu"
) -> list[torch.Generator]:
    """One generator per seed, on ``device``, seeded with it."""
    device = torch.device(device)
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def seeded_randn(
    seeds: Sequence[int] | Sequence[torch.Generator],
    shape: Sequence[int],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise ``[len(seeds), *shape]``: row *i* drawn from seed ``seeds[i]``'s
    own generator (or from the generator ``seeds[i]``, continuing its stream).

    For a sweep's ``generate(model, seeds, sampler)``, ``seeded_randn(seeds, (C, H, W),
    device)`` gives the starting noise of each image independent of the batching."""
    if len(seeds) == 0:
        return torch.empty((0, *shape), device=device, dtype=dtype)
    generators = (
        list(seeds)
        if isinstance(seeds[0], torch.Generator)
        else seed_generators([int(s) for s in seeds], device)  # type: ignore[arg-type]
    )
    return torch.stack(
        [
            torch.randn(tuple(shape), generator=g, device=g.device, dtype=dtype)
            for g in generators  # type: ignore[union-attr]
        ]
    ).to(device)
