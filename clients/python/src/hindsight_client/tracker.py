"""Power-function EMAs of a PyTorch module during training (EDM2, arXiv 2312.02696, eq. 127).

:class:`PowerEMA` keeps one float32 copy of the module's floating-point state (parameters
and float buffers) per tracked width σ_rel. ``update(nimg)`` folds the current values in with
``β = (1 − Δt/t)^(γ+1)``, where ``t = nimg`` is the number of training images seen so far and
``Δt`` the images since the previous update. Because β is computed from images, not from the
number of calls, the EMA is exactly the declared power-function profile evaluated on the
update grid however often ``update`` is called: every step, every 10th step, or irregularly.

Counting calls instead of images is what ema-pytorch's ``PostHocEMA`` does when
``update_every > 1``: each call applies the one-step decay of its call count, so with
``update_every=10`` an EMA declared as σ_rel 0.05 realises a profile of width ≈ 0.25
(measured in this repository's ``tests/tracker.rs``). Here ``update_every`` does not exist:
call ``update`` when you like and pass the true image count.

Integer and boolean state (step counters, ``num_batches_tracked``) is not averaged: the EMA
holds a copy of its value at the last update.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from typing import Any

import safetensors.torch
import torch

from .errors import TrackerError
from .profile import beta, sigma_rel_to_gamma
from .snapshot import Snapshot

_STATE_FORMAT = "hindsight_client.PowerEMA"
_STATE_VERSION = 1
_SNAPSHOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class PowerEMA:
    """Power-function EMAs of ``module``'s state at the widths ``sigma_rels``.

    Args:
        module: the network being trained. Its ``state_dict()`` names are the names of the
            tracked tensors (and of every snapshot's tensors).
        sigma_rels: EMA widths, each in ``(0, sqrt(1/12))``; EDM2 tracks 0.05 and 0.10 and
            reconstructs any other width after training from their snapshots.
        nimg: training time in images at which tracking starts (0 for a new run). The
            current values stand for the interval ``(0, nimg]``.
        device: where the EMAs live. ``None`` keeps each EMA tensor on its source tensor's
            device (fastest on a GPU); ``"cpu"`` keeps them in host memory (saves GPU memory;
            each update then copies the parameters to the host).

    The EMAs are float32 whatever the module's dtype (bf16/fp16 training included).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        sigma_rels: Iterable[float] = (0.05, 0.10),
        *,
        nimg: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        self._module = module
        self._sigma_rels = [float(s) for s in sigma_rels]
        if not self._sigma_rels:
            raise TrackerError("sigma_rels: at least one EMA width is needed")
        self._gammas: list[float] = []
        for i, s in enumerate(self._sigma_rels):
            try:
                g = sigma_rel_to_gamma(s)
            except ValueError as e:
                raise TrackerError(f"sigma_rels[{i}]: {e}") from None
            if g in self._gammas:
                raise TrackerError(f"sigma_rels[{i}]: the width {s} is listed twice")
            self._gammas.append(g)
        self._nimg = operator.index(nimg)
        if self._nimg < 0:
            raise TrackerError(f"nimg: {nimg} is negative")
        self._device = None if device is None else torch.device(device)
        state = module.state_dict(keep_vars=True)
        self._names = list(state)
        self._shapes = {name: tuple(t.shape) for name, t in state.items()}
        self._float_names: list[str] = []
        self._copied_names: list[str] = []
        for name, t in state.items():
            if t.is_complex():
                raise TrackerError(f"{name}: complex tensors are not supported")
            (self._float_names if t.is_floating_point() else self._copied_names).append(name)
        with torch.no_grad():
            self._emas = [
                [self._place(state[n], torch.float32, copy=True) for n in self._float_names]
                for _ in self._sigma_rels
            ]
            self._copied = [self._place(state[n], None, copy=True) for n in self._copied_names]

    def _place(self, t: torch.Tensor, dtype: torch.dtype | None, copy: bool) -> torch.Tensor:
        device = t.device if self._device is None else self._device
        return t.detach().to(device=device, dtype=dtype or t.dtype, copy=copy)

    @property
    def sigma_rels(self) -> list[float]:
        """The tracked widths, in the order given."""
        return list(self._sigma_rels)

    @property
    def gammas(self) -> list[float]:
        """Their power-function exponents (EDM2 eq. 126)."""
        return list(self._gammas)

    @property
    def nimg(self) -> int:
        """Training time (images) of the last update."""
        return self._nimg

    def _current(self) -> dict[str, torch.Tensor]:
        state = self._module.state_dict(keep_vars=True)
        if list(state) != self._names:
            added = sorted(set(state) - set(self._names))
            missing = sorted(set(self._names) - set(state))
            raise TrackerError(
                f"the module's tensors changed since tracking began (added {added}, "
                f"missing {missing}); make a new PowerEMA for a new module"
            )
        for name, t in state.items():
            if tuple(t.shape) != self._shapes[name]:
                raise TrackerError(
                    f"{name}: shape {tuple(t.shape)}, tracked as {self._shapes[name]}"
                )
        return state

    @torch.no_grad()
    def update(self, nimg: int) -> None:
        """Folds the module's current state in at training time ``nimg``: the number of
        training images seen so far, including the batch just trained on. Call it after the
        optimizer step, every step or every k-th step; ``nimg`` must increase."""
        nimg = operator.index(nimg)
        if nimg <= self._nimg:
            raise TrackerError(
                f"nimg: {nimg} does not advance past the last update at {self._nimg}; "
                "pass the number of training images seen so far"
            )
        state = self._current()
        if self._float_names:
            reference = self._emas[0]
            values = [
                state[n].detach().to(device=e.device, dtype=torch.float32)
                for n, e in zip(self._float_names, reference, strict=True)
            ]
            for gamma, ema in zip(self._gammas, self._emas, strict=True):
                weight = 1.0 - beta(gamma, float(nimg), float(nimg - self._nimg))
                torch._foreach_lerp_(ema, values, weight)
        for dst, name in zip(self._copied, self._copied_names, strict=True):
            dst.copy_(state[name].detach())
        self._nimg = nimg

    def _width_index(self, sigma_rel: float) -> int:
        gamma = sigma_rel_to_gamma(sigma_rel)
        for i, g in enumerate(self._gammas):
            if abs(g - gamma) <= 1e-12 * g:
                return i
        raise TrackerError(f"sigma_rel {sigma_rel} is not tracked (tracked: {self._sigma_rels})")

    def averaged(self, sigma_rel: float) -> dict[str, torch.Tensor]:
        """The EMA of width ``sigma_rel`` as a state dict in the module's key order (float
        tensors in float32, integer ones as copied), ready for ``module.load_state_dict``.
        The tensors are the tracker's own buffers: clone them to keep a copy."""
        i = self._width_index(sigma_rel)
        by_name = dict(zip(self._float_names, self._emas[i], strict=True))
        by_name.update(zip(self._copied_names, self._copied, strict=True))
        return {name: by_name[name] for name in self._names}

    @torch.no_grad()
    def snapshot(self, dtype: torch.dtype = torch.float32) -> list[Snapshot]:
        """One :class:`Snapshot` per width at the current time: safetensors bytes with the
        module's state-dict names and ``nimg``, ``sigma_rel`` in ``__metadata__``.

        ``dtype`` is the element type of the float tensors in the file: float32 (exact,
        default), or float16 / bfloat16 (half the size; EDM2 stores float16). Values that do
        not fit float16 (|x| > 65504) raise :class:`TrackerError` instead of becoming ∞.
        """
        if dtype not in _SNAPSHOT_DTYPES:
            raise TrackerError(f"dtype: {dtype} is not one of {_SNAPSHOT_DTYPES}")
        if self._nimg <= 0:
            raise TrackerError("no training time yet: call update(nimg) before snapshot()")
        copied = {
            n: t.to("cpu").contiguous()
            for n, t in zip(self._copied_names, self._copied, strict=True)
        }
        snapshots = []
        for sigma_rel, ema in zip(self._sigma_rels, self._emas, strict=True):
            tensors: dict[str, torch.Tensor] = {}
            for name, t in zip(self._float_names, ema, strict=True):
                out = t.to(device="cpu", dtype=dtype, copy=True).contiguous()
                overflowed = dtype != torch.float32 and not bool(torch.isfinite(out).all())
                if overflowed and bool(torch.isfinite(t).all()):
                    raise TrackerError(
                        f"{name}: values beyond {dtype}'s range; snapshot in float32"
                    )
                tensors[name] = out
            tensors.update(copied)
            ordered = {name: tensors[name] for name in self._names}
            metadata = {"nimg": str(self._nimg), "sigma_rel": repr(sigma_rel)}
            data = safetensors.torch.save(ordered, metadata=metadata)
            snapshots.append(Snapshot(nimg=self._nimg, sigma_rel=sigma_rel, data=data))
        return snapshots

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume tracking (save it with the training checkpoint, e.g.
        ``torch.save``). Like ``Module.state_dict``, the tensors are shared, not copied."""
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "sigma_rels": list(self._sigma_rels),
            "nimg": self._nimg,
            "emas": [dict(zip(self._float_names, ema, strict=True)) for ema in self._emas],
            "copied": dict(zip(self._copied_names, self._copied, strict=True)),
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a state saved by :meth:`state_dict` (tensors may come from another device,
        e.g. ``torch.load(..., map_location="cpu")``). The widths and the tensors' names and
        shapes must be this tracker's; anything else raises :class:`TrackerError` and changes
        nothing."""
        if state.get("format") != _STATE_FORMAT or state.get("version") != _STATE_VERSION:
            raise TrackerError(
                f"not a PowerEMA state (format {state.get('format')!r}, "
                f"version {state.get('version')!r})"
            )
        widths = [float(s) for s in state["sigma_rels"]]
        if len(widths) != len(self._sigma_rels) or any(
            abs(a - b) > 1e-12 * b for a, b in zip(widths, self._sigma_rels, strict=True)
        ):
            raise TrackerError(f"the state tracks widths {widths}, this tracker {self._sigma_rels}")
        emas, copied = list(state["emas"]), state["copied"]
        if len(emas) != len(self._emas):
            raise TrackerError(f"the state holds {len(emas)} EMAs for {len(widths)} widths")
        expected = [(self._float_names, e) for e in emas] + [(self._copied_names, copied)]
        for names, tensors in expected:
            if sorted(tensors) != sorted(names):
                raise TrackerError(
                    "the state's tensors differ from the module's: "
                    f"{sorted(set(tensors) ^ set(names))}"
                )
            for n in names:
                if tuple(tensors[n].shape) != self._shapes[n]:
                    raise TrackerError(
                        f"{n}: shape {tuple(tensors[n].shape)} in the state, {self._shapes[n]} here"
                    )
        for ema, saved in zip(self._emas, emas, strict=True):
            for t, name in zip(ema, self._float_names, strict=True):
                t.copy_(saved[name])
        for t, name in zip(self._copied, self._copied_names, strict=True):
            t.copy_(copied[name])
        self._nimg = operator.index(state["nimg"])
