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

Names: the prefixes ``torch.compile`` (``_orig_mod.``) and DDP / ``DataParallel``
(``module.``) put before every state-dict name are stripped, so compiled, DDP-wrapped and
plain models share runs and resume each other's tracker state. FSDP-sharded modules and
DTensor parameters are refused (:class:`~hindsight_client.TrackerError` says what to do).

Snapshots cost the training thread almost nothing: host EMAs are lent to the snapshot (copy
on write at the next update), GPU EMAs copied asynchronously into pinned, reused host buffers
on a side CUDA stream; the cast, serialisation and hashing happen where the snapshot is
written (see :mod:`hindsight_client.snapshot`).
"""

from __future__ import annotations

import json
import logging
import operator
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .errors import TrackerError
from .profile import beta, sigma_rel_to_gamma
from .snapshot import BUFFERS_KEY, Snapshot, TensorPart

log = logging.getLogger("hindsight_client")

_STATE_FORMAT = "hindsight_client.PowerEMA"
_STATE_VERSION = 1
_SNAPSHOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_STRIP_PREFIXES = ("_orig_mod.", "module.")
"""Wrapper prefixes :class:`PowerEMA` strips by default: ``torch.compile``'s
``OptimizedModule`` (``_orig_mod.``) and ``DistributedDataParallel`` / ``DataParallel``
(``module.``)."""

# safetensors dtype codes of the tensors a snapshot may hold.
_DTYPE_CODES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _DTYPE_CODES[getattr(torch, _name)] = _code


def strip_wrapper_prefixes(names: Sequence[str], prefixes: Iterable[str]) -> str:
    """The wrapper prefix shared by every name in ``names``: the longest chain of
    ``prefixes`` (in any order, each any number of times, e.g. ``module._orig_mod.``) that
    starts **every** name and leaves none empty. ``""`` when there is none (or no names). A
    submodule that happens to be called ``module`` is not stripped unless it holds the whole
    state."""
    prefixes = [p for p in prefixes if p]
    stripped = ""
    rest = list(names)
    while rest:
        for p in prefixes:
            if all(n.startswith(p) and len(n) > len(p) for n in rest):
                stripped += p
                rest = [n[len(p) :] for n in rest]
                break
        else:
            break
    return stripped


def _refuse_sharded(module: torch.nn.Module) -> None:
    """Raises :class:`TrackerError` for FSDP-wrapped modules and DTensor / flat parameters,
    before ``state_dict()`` is called (on FSDP it is a collective)."""
    if not torch.distributed.is_available():
        return
    advice = (
        "PowerEMA averages whole tensors and does not gather shards. Track an unsharded "
        "replica on one rank instead: before each update, every rank calls "
        "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
        "options=StateDictOptions(full_state_dict=True, cpu_offload=True)), and rank 0 "
        "loads the result into a plain copy of the model that PowerEMA tracks; or train "
        "with DDP (see the README, 'FSDP')"
    )
    from torch.distributed.fsdp import FullyShardedDataParallel

    sharded_modules: tuple[type, ...] = (FullyShardedDataParallel,)
    try:
        from torch.distributed.fsdp import FSDPModule

        sharded_modules += (FSDPModule,)
    except ImportError:  # torch < 2.6: fully_shard lives in torch.distributed._composable
        pass
    for name, m in module.named_modules():
        if isinstance(m, sharded_modules):
            where = f"submodule {name!r}" if name else "the module"
            raise TrackerError(f"{where} is sharded by FSDP ({type(m).__name__}). {advice}")
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.4
        from torch.distributed._tensor import DTensor  # type: ignore[no-redef]
    for kind, named in (
        ("parameter", module.named_parameters()),
        ("buffer", module.named_buffers()),
    ):
        for name, t in named:
            if isinstance(t, DTensor):
                raise TrackerError(
                    f"{kind} {name} is a DTensor (sharded: FSDP2 or tensor parallelism, "
                    f"placements {list(t.placements)}). {advice}"
                )
            if getattr(t, "_is_flat_param", False):
                raise TrackerError(f"{kind} {name} is an FSDP flat parameter. {advice}")


class _HostPool:
    """Sets of host tensors reused across snapshots: staging buffers (one per CUDA EMA tensor
    and copied tensor; pinned when the source is on a CUDA device) or spare storage for the
    host EMAs (float32). ``take``
    never blocks: with no idle set it allocates one. ``give_back`` keeps at most ``keep`` idle
    sets and lets the others be freed.
    """

    def __init__(self, specs: list[tuple[tuple[int, ...], torch.dtype, bool]], keep: int) -> None:
        self._specs = specs
        self._keep = keep
        self._idle: list[list[torch.Tensor]] = []
        self._lock = threading.Lock()
        self.allocated = 0
        """Sets allocated so far (for tests and the benchmark)."""

    def take(self) -> list[torch.Tensor]:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            self.allocated += 1
        return [
            torch.empty(shape, dtype=dtype, pin_memory=pinned)
            for shape, dtype, pinned in self._specs
        ]

    def give_back(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            if len(self._idle) < self._keep:
                self._idle.append(buffers)

    @property
    def idle(self) -> int:
        """Sets waiting for reuse."""
        with self._lock:
            return len(self._idle)


class _Loan:
    """The storage of one width's host EMA tensors while snapshots read it (copy on write).

    ``snapshot()`` lends the storage instead of copying it: each snapshot holds ``aliases``
    (tensors over the same storage) and counts as a reader. The next write to the EMA
    (``update``, ``load_state_dict``) asks :meth:`retire_if_read`: with readers left, the
    tracker moves its tensors to fresh storage (``Tensor.set_``, so every reference to them
    stays live) and the aliases go to ``spares`` once the last reader is released; with none,
    the EMA keeps its storage and the loan is dropped.
    """

    def __init__(self, aliases: list[torch.Tensor], spares: _HostPool) -> None:
        self.aliases = aliases
        self._spares = spares
        self._readers = 0
        self._retired = False
        self._lock = threading.Lock()

    def lend(self) -> None:
        with self._lock:
            self._readers += 1

    def give_back(self) -> None:
        with self._lock:
            self._readers -= 1
            free = self._retired and self._readers == 0
        if free:
            self._spares.give_back(self.aliases)

    def retire_if_read(self) -> bool:
        """Whether snapshots still read the storage; if so the EMA must leave it."""
        with self._lock:
            self._retired = self._readers > 0
            return self._retired


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A new tensor object over ``t``'s storage (unaffected when ``t`` moves elsewhere)."""
    return torch.empty(0, dtype=t.dtype).set_(
        t.untyped_storage(), t.storage_offset(), t.shape, t.stride()
    )


def _host_bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a contiguous host tensor, as a flat uint8 array (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy()


class PowerEMA:
    """Power-function EMAs of ``module``'s state at the widths ``sigma_rels``.

    Args:
        module: the network being trained, plain, compiled (``torch.compile``) or wrapped in
            DDP / ``DataParallel``. Its ``state_dict()`` names, less the wrapper prefixes,
            are the names of the tracked tensors (and of every snapshot's tensors).
        sigma_rels: EMA widths, each in ``(0, sqrt(1/12))``; EDM2 tracks 0.05 and 0.10 and
            reconstructs any other width after training from their snapshots.
        nimg: training time in images at which tracking starts (0 for a new run). The
            current values stand for the interval ``(0, nimg]``.
        device: where the EMAs live. ``None`` keeps each EMA tensor on its source tensor's
            device (fastest on a GPU); ``"cpu"`` keeps them in host memory (saves GPU memory;
            each update then copies the parameters to the host).
        strip_prefixes: wrapper prefixes removed from the state-dict names when **every**
            name starts with one (repeatedly, so ``module._orig_mod.`` goes too); logged once
            when it happens. ``()`` keeps the names as they are.

    The EMAs are float32 whatever the module's dtype (bf16/fp16 training included).

    Raises :class:`TrackerError` for invalid widths or time, complex tensors, and modules
    sharded by FSDP (FSDP1 or ``fully_shard``) or holding DTensor parameters: the message
    says how to track an unsharded replica instead.
    """

    _lend_host_emas = True
    """Whether snapshots borrow host EMAs (copy on write) rather than copy them as they copy
    GPU EMAs; tests turn it off to run the copying path on a CPU."""

    def __init__(
        self,
        module: torch.nn.Module,
        sigma_rels: Iterable[float] = (0.05, 0.10),
        *,
        nimg: int = 0,
        device: str | torch.device | None = None,
        strip_prefixes: Iterable[str] = DEFAULT_STRIP_PREFIXES,
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
        self._strip_prefixes = tuple(strip_prefixes)
        _refuse_sharded(module)
        raw = module.state_dict(keep_vars=True)
        self._raw_names = list(raw)
        self._prefix = strip_wrapper_prefixes(self._raw_names, self._strip_prefixes)
        if self._prefix:
            log.info(
                "PowerEMA: stripping the wrapper prefix %r from the %d state-dict names "
                "(torch.compile / DDP); snapshots carry the plain model's names",
                self._prefix,
                len(self._raw_names),
            )
        state = self._strip(raw)
        self._names = list(state)
        self._shapes = {name: tuple(t.shape) for name, t in state.items()}
        self._float_names: list[str] = []
        self._copied_names: list[str] = []
        for name, t in state.items():
            if t.is_complex():
                raise TrackerError(f"{name}: complex tensors are not supported")
            if t.is_floating_point():
                self._float_names.append(name)
            elif t.dtype in _DTYPE_CODES:
                self._copied_names.append(name)
            else:
                raise TrackerError(f"{name}: dtype {t.dtype} cannot be stored in a snapshot")
        buffers = {n for n, _ in module.named_buffers(remove_duplicate=False)}
        cut = len(self._prefix)
        self._buffer_names = sorted(n[cut:] for n in self._raw_names if n in buffers)
        with torch.no_grad():
            self._emas = [
                [self._place(state[n], torch.float32, copy=True) for n in self._float_names]
                for _ in self._sigma_rels
            ]
            self._copied = [self._place(state[n], None, copy=True) for n in self._copied_names]
        # Snapshot machinery. Host EMAs are lent to snapshots (copy on write, _Loan); the
        # others (CUDA EMAs, and the small copied tensors) are copied into staging buffers.
        first = self._emas[0]
        lend = self._lend_host_emas
        self._host = [j for j, t in enumerate(first) if lend and t.device.type == "cpu"]
        self._staged = [j for j in range(len(first)) if j not in set(self._host)]
        staged = [first[j] for j in self._staged] + self._copied
        self._staging = _HostPool(
            [(tuple(t.shape), t.dtype, t.device.type == "cuda") for t in staged],
            keep=len(self._sigma_rels),
        )
        self._spares = _HostPool(
            [(tuple(first[j].shape), torch.float32, False) for j in self._host],
            keep=len(self._sigma_rels),
        )
        self._loans: list[_Loan | None] = [None] * len(self._sigma_rels)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def _place(self, t: torch.Tensor, dtype: torch.dtype | None, copy: bool) -> torch.Tensor:
        device = t.device if self._device is None else self._device
        return t.detach().to(device=device, dtype=dtype or t.dtype, copy=copy)

    def _strip(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cut = len(self._prefix)
        return {name[cut:]: t for name, t in state.items()}

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

    @property
    def stripped_prefix(self) -> str:
        """The wrapper prefix removed from the module's state-dict names (``""``: none)."""
        return self._prefix

    def _current(self) -> dict[str, torch.Tensor]:
        raw = self._module.state_dict(keep_vars=True)
        if list(raw) != self._raw_names:
            added = sorted(set(raw) - set(self._raw_names))
            missing = sorted(set(self._raw_names) - set(raw))
            raise TrackerError(
                f"the module's tensors changed since tracking began (added {added}, "
                f"missing {missing}); make a new PowerEMA for a new module"
            )
        state = self._strip(raw)
        for name, t in state.items():
            if tuple(t.shape) != self._shapes[name]:
                raise TrackerError(
                    f"{name}: shape {tuple(t.shape)}, tracked as {self._shapes[name]}"
                )
        return state

    def _await_snapshot_copies(self) -> None:
        """Makes the current CUDA streams wait (on the device, not the host) for snapshot
        copies still reading the EMAs, before anything writes them."""
        for device, stream in self._streams.items():
            torch.cuda.current_stream(device).wait_stream(stream)

    def _leave_lent_storage(self, i: int) -> bool:
        """Before width ``i``'s EMAs are written: whether unreleased snapshots read its host
        storage (then the caller gives the tensors fresh storage)."""
        loan, self._loans[i] = self._loans[i], None
        return loan is not None and loan.retire_if_read()

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
        self._await_snapshot_copies()
        if self._float_names:
            reference = self._emas[0]
            values = [
                state[n].detach().to(device=e.device, dtype=torch.float32)
                for n, e in zip(self._float_names, reference, strict=True)
            ]
            for i, (gamma, ema) in enumerate(zip(self._gammas, self._emas, strict=True)):
                weight = 1.0 - beta(gamma, float(nimg), float(nimg - self._nimg))
                if not self._leave_lent_storage(i):
                    torch._foreach_lerp_(ema, values, weight)
                    continue
                # Snapshots read the host EMAs' storage: write the new values elsewhere.
                fresh = self._spares.take()
                for j, out in zip(self._host, fresh, strict=True):
                    torch.lerp(ema[j], values[j], weight, out=out)
                    ema[j].set_(out)
                if self._staged:
                    torch._foreach_lerp_(
                        [ema[j] for j in self._staged], [values[j] for j in self._staged], weight
                    )
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
        tensors in float32, integer ones as copied), with the plain model's names (wrapper
        prefixes stripped: load it into ``model.module`` / ``model._orig_mod``, or into the
        unwrapped model). The tensors are the tracker's own buffers: clone them to keep a
        copy."""
        i = self._width_index(sigma_rel)
        by_name = dict(zip(self._float_names, self._emas[i], strict=True))
        by_name.update(zip(self._copied_names, self._copied, strict=True))
        return {name: by_name[name] for name in self._names}

    def _copy_to_host(self, sources: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        """Copies ``sources`` into a buffer set from the staging pool. Host sources (and those
        of accelerators other than CUDA) are copied now; CUDA sources asynchronously on a
        side stream per device (after the work queued on the current stream). Returns the
        buffers and a callable that waits for the copies (``None`` when nothing is in
        flight)."""
        buffers = self._staging.take()
        on_host = [(b, s) for b, s in zip(buffers, sources, strict=True) if s.device.type == "cpu"]
        if on_host:
            torch._foreach_copy_([b for b, _ in on_host], [s for _, s in on_host])
        events = []
        by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for b, s in zip(buffers, sources, strict=True):
            if s.device.type == "cuda":
                by_device.setdefault(s.device, []).append((b, s))
            elif s.device.type != "cpu":  # other accelerators: a plain, blocking copy
                b.copy_(s)
        for device, pairs in by_device.items():
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for b, s in pairs:
                    b.copy_(s, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            events.append(event)
        if not events:
            return buffers, None

        def wait() -> None:
            for event in events:
                event.synchronize()

        return buffers, wait

    @torch.no_grad()
    def snapshot(self, dtype: torch.dtype = torch.float32) -> list[Snapshot]:
        """One :class:`Snapshot` per width at the current time: the EMA under the plain
        model's state-dict names, with ``nimg``, ``sigma_rel`` and ``hindsight.buffers``
        (a JSON array, sorted, of the names that are module buffers) in ``__metadata__``.

        ``dtype`` is the element type of the float tensors in the file: float32 (exact,
        default), or float16 / bfloat16 (half the size; EDM2 stores float16).

        The training thread pays almost nothing. EMAs in host memory are not copied: the
        snapshot reads their storage, and the next :meth:`update` (or
        :meth:`load_state_dict`) while it is unreleased writes the new EMA into spare
        storage instead of in place (same work as in place; every reference to the
        tracker's tensors stays live). EMAs on a GPU are copied into pinned host buffers,
        asynchronously on a side CUDA stream (an event tells the writer when they are
        there; the next update waits on the device, not the host). The cast to ``dtype``,
        the serialisation and the BLAKE3 hash happen when the snapshot is first written
        (:meth:`Snapshot.write_to`, ``.digest``, ``.data``), on the thread that writes it;
        values that do not fit float16 (|x| > 65504) raise :class:`TrackerError` there
        instead of becoming ∞. The same state always gives the same bytes.

        Call :meth:`Snapshot.release` (the client's spool does) once it is written: its
        storage and buffers become the spares of later calls (a garbage-collected snapshot
        gives them back too). Nothing ever waits for a release: while snapshots are
        unreleased, updates and snapshots allocate more, and the pools keep one call's worth
        (one set per width) when they come back. Host memory beyond the EMAs is thus at
        most (calls with unreleased snapshots + 1) × the size of all widths' EMAs in
        float32.
        """
        if dtype not in _SNAPSHOT_DTYPES:
            raise TrackerError(f"dtype: {dtype} is not one of {_SNAPSHOT_DTYPES}")
        if self._nimg <= 0:
            raise TrackerError("no training time yet: call update(nimg) before snapshot()")
        metadata_base = {
            "nimg": str(self._nimg),
            BUFFERS_KEY: json.dumps(self._buffer_names, separators=(",", ":"), ensure_ascii=False),
        }
        float_code = _DTYPE_CODES[dtype]
        snapshots = []
        for i, (sigma_rel, ema) in enumerate(zip(self._sigma_rels, self._emas, strict=True)):
            loan = self._loans[i]
            if loan is None and self._host:
                loan = self._loans[i] = _Loan([_alias(ema[j]) for j in self._host], self._spares)
            if loan is not None:
                loan.lend()
            staging, ready = self._copy_to_host([ema[j] for j in self._staged] + self._copied)
            floats: list[torch.Tensor] = [torch.empty(0)] * len(self._float_names)
            for j, alias in zip(self._host, loan.aliases if loan else [], strict=True):
                floats[j] = alias
            for j, buf in zip(self._staged, staging, strict=False):
                floats[j] = buf
            copied = staging[len(self._staged) :]
            parts = [
                TensorPart(name, float_code, self._shapes[name], self._cast(name, buf, dtype))
                for name, buf in zip(self._float_names, floats, strict=True)
            ]
            parts += [
                TensorPart(name, _DTYPE_CODES[buf.dtype], self._shapes[name], _raw(buf))
                for name, buf in zip(self._copied_names, copied, strict=True)
            ]

            def on_release(
                staging: list[torch.Tensor] = staging,
                loan: _Loan | None = loan,
                pool: _HostPool = self._staging,
            ) -> None:
                pool.give_back(staging)
                if loan is not None:
                    loan.give_back()

            snapshots.append(
                Snapshot.from_parts(
                    self._nimg,
                    sigma_rel,
                    parts,
                    {**metadata_base, "sigma_rel": repr(sigma_rel)},
                    ready=ready,
                    on_release=on_release,
                )
            )
        return snapshots

    @staticmethod
    def _cast(name: str, buf: torch.Tensor, dtype: torch.dtype) -> Callable[[], np.ndarray]:
        """The payload of a float tensor: ``buf`` (float32, host) in ``dtype``, checked."""
        if dtype == torch.float32:
            return _raw(buf)

        largest = torch.finfo(dtype).max

        def payload() -> np.ndarray:
            out = buf.to(dtype)
            # Fast path: every value within ±max (NaN fails the comparison) cannot round to ∞.
            if buf.numel() > 0:
                lo, hi = torch.aminmax(buf)
                in_range = -largest <= float(lo) and float(hi) <= largest
                if (
                    not in_range
                    and not bool(torch.isfinite(out).all())
                    and bool(torch.isfinite(buf).all())
                ):
                    raise TrackerError(
                        f"{name}: values beyond {dtype}'s range; snapshot in float32"
                    )
            return _host_bytes(out)

        return payload

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume tracking (save it with the training checkpoint, e.g.
        ``torch.save``), under the plain model's names, so a compiled or DDP-wrapped model
        resumes it too. Like ``Module.state_dict``, the tensors are shared, not copied."""
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
        e.g. ``torch.load(..., map_location="cpu")``). A state whose names all carry a
        wrapper prefix (saved before prefixes were stripped) is read without it. The widths
        and the tensors' names and shapes must be this tracker's; anything else raises
        :class:`TrackerError` and changes nothing."""
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
        emas, copied = list(state["emas"]), dict(state["copied"])
        if len(emas) != len(self._emas):
            raise TrackerError(f"the state holds {len(emas)} EMAs for {len(widths)} widths")
        names = [*emas[0], *copied] if emas else list(copied)
        cut = len(strip_wrapper_prefixes(names, self._strip_prefixes))
        emas = [{n[cut:]: t for n, t in e.items()} for e in emas]
        copied = {n[cut:]: t for n, t in copied.items()}
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
        self._await_snapshot_copies()
        for i, (ema, saved) in enumerate(zip(self._emas, emas, strict=True)):
            # Snapshots read the host EMAs' storage: copy into spare storage, then move there
            # (``saved`` may hold the EMA tensors themselves).
            moved = {}
            if self._leave_lent_storage(i):
                for j, fresh in zip(self._host, self._spares.take(), strict=True):
                    moved[j] = fresh.copy_(saved[self._float_names[j]])
            for j, (t, name) in enumerate(zip(ema, self._float_names, strict=True)):
                if j in moved:
                    t.set_(moved[j])
                else:
                    t.copy_(saved[name])
        for t, name in zip(self._copied, self._copied_names, strict=True):
            t.copy_(copied[name])
        self._nimg = operator.index(state["nimg"])


def _raw(buf: torch.Tensor) -> Callable[[], np.ndarray]:
    """The payload of a host tensor written as it is."""
    return lambda: _host_bytes(buf)
