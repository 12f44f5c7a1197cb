"""Snapshots: one EMA at one training time, as the safetensors bytes the server stores.

A snapshot's tensors carry the tracked module's state-dict names (for an EDM2 network, EDM2's
names), and its ``__metadata__`` holds ``nimg`` (training images) and ``sigma_rel`` — what
``hindsight import`` and ``POST /runs/{run}/snapshots`` read. Files are named the way EDM2's
training loop names its snapshots, ``<prefix>-<nimg // 1000:07d>-<sigma_rel:.3f>``, with
``.safetensors`` for ``.pkl`` (``training/training_loop.py`` in NVlabs/edm2).

**Deterministic bytes.** This module writes the safetensors format itself: an 8-byte
little-endian header length, the JSON header (keys sorted, no spaces, ``__metadata__`` sorted),
spaces up to a multiple of 8 bytes, then the tensors' little-endian bytes in sorted-name order.
The same tensors and metadata therefore give the same file, hence the same BLAKE3 digest, in
every call and every process.

**Lazy serialisation.** A snapshot made by :class:`~hindsight_client.PowerEMA` holds host
copies of the EMA tensors (:class:`TensorPart`); the cast to the file's dtype, the
serialisation and the hashing happen in :meth:`Snapshot.write_to` (or :attr:`~Snapshot.digest`,
:attr:`~Snapshot.data`), on whichever thread calls them first — an upload thread, not the
training loop. :meth:`Snapshot.release` hands the host buffers back for reuse.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import blake3
import numpy as np
import safetensors.numpy

from .errors import HindsightError
from .profile import sigma_rel_to_gamma

EDM2_PREFIX = "network-snapshot"
"""The file-name prefix EDM2's training loop uses."""

BUFFERS_KEY = "hindsight.buffers"
"""``__metadata__`` key naming the snapshot's buffers (not parameters): a JSON array of tensor
names, sorted. ``POST /reconstruct`` with ``"buffers": "copy"`` takes them from the newest
input instead of averaging them."""

DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
"""Bytes per element of each safetensors dtype code."""


def digest_of(data: bytes | memoryview) -> str:
    """BLAKE3 of ``data`` as 64 lower-case hex digits: the name the server's store gives it."""
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()


@dataclass(frozen=True)
class TensorPart:
    """One tensor of a snapshot that is not serialised yet.

    Attributes:
        name: its name in the file.
        dtype: safetensors dtype code of the bytes in the file (``"F32"``, ``"F16"``,
            ``"BF16"``, ``"I64"``, …; see :data:`DTYPE_SIZES`).
        shape: its shape (row-major in the file; ``()`` for a scalar).
        payload: returns its bytes, little-endian, row-major, exactly
            ``prod(shape) × DTYPE_SIZES[dtype]`` of them (any object with the buffer protocol).
            Called on the thread that serialises, each time the snapshot is written; it may
            raise (e.g. :class:`~hindsight_client.TrackerError` for values that do not fit
            the dtype).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    payload: Callable[[], bytes | bytearray | memoryview | np.ndarray]

    @property
    def nbytes(self) -> int:
        """Size of its bytes in the file."""
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def safetensors_header(parts: Iterable[TensorPart], metadata: Mapping[str, str]) -> bytes:
    """The first bytes of the file holding ``parts`` (in sorted-name order) and ``metadata``:
    the 8-byte little-endian length, then the JSON header with sorted keys and no spaces,
    padded with spaces to a multiple of 8 bytes (so the tensors' bytes start 8-aligned).
    Raises ``ValueError`` for a repeated name, an unknown dtype or a metadata value that is
    not a string."""
    entries: dict[str, object] = {}
    offset = 0
    for part in sorted(parts, key=lambda p: p.name):
        if part.name in entries or part.name == "__metadata__":
            raise ValueError(f"tensor name {part.name!r} is used twice or reserved")
        if part.dtype not in DTYPE_SIZES:
            raise ValueError(f"{part.name}: unknown safetensors dtype {part.dtype!r}")
        end = offset + part.nbytes
        entries[part.name] = {
            "data_offsets": [offset, end],
            "dtype": part.dtype,
            "shape": list(part.shape),
        }
        offset = end
    if metadata:
        for key, value in metadata.items():
            if not isinstance(value, str):
                raise ValueError(f"__metadata__[{key!r}]: {value!r} is not a string")
        entries["__metadata__"] = dict(sorted(metadata.items()))
    text = json.dumps(entries, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    header = text.encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def read_metadata(data: bytes | memoryview) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (``{}`` when it has none). Raises
    ``ValueError`` when ``data`` does not start with a safetensors header."""
    if len(data) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", bytes(data[:8]))
    if length > len(data) - 8:
        raise ValueError(f"not a safetensors file: header of {length} bytes in {len(data)}")
    try:
        header = json.loads(bytes(data[8 : 8 + length]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not a safetensors file: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file: header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}


class _Discard:
    """A file that forgets what it is given (for hashing without writing)."""

    def write(self, data: object) -> int:
        return len(memoryview(data))  # type: ignore[arg-type]


class _Collect:
    """A file that keeps views of what it is given, joined once at the end."""

    def __init__(self) -> None:
        self.chunks: list[memoryview] = []

    def write(self, data: object) -> int:
        view = memoryview(data)  # type: ignore[arg-type]
        self.chunks.append(view)
        return view.nbytes


class Snapshot:
    """One EMA of a training run at one time: a safetensors file, built on demand.

    ``Snapshot(nimg=…, sigma_rel=…, data=…)`` wraps finished file bytes (as
    :meth:`from_bytes` does); :class:`~hindsight_client.PowerEMA` makes snapshots from
    :class:`TensorPart`\\ s (:meth:`from_parts`), serialised only when first written.

    Attributes:
        nimg: training time in images.
        sigma_rel: the EMA's width (relative standard deviation of its profile).

    Thread safety: every method may be called from any thread; serialisation and
    :meth:`release` exclude each other.
    """

    def __init__(self, nimg: int, sigma_rel: float, data: bytes | None = None) -> None:
        self.nimg = int(nimg)
        self.sigma_rel = float(sigma_rel)
        self._lock = threading.RLock()
        self._data: bytes | None = None if data is None else bytes(data)
        self._nbytes = 0 if data is None else len(self._data)  # type: ignore[arg-type]
        self._digest: str | None = None
        self._header = b""
        self._parts: list[TensorPart] | None = None
        self._ready: Callable[[], None] | None = None
        self._released: weakref.finalize | None = None
        self._was_released = False

    @classmethod
    def from_bytes(
        cls, data: bytes, nimg: int | None = None, sigma_rel: float | None = None
    ) -> Snapshot:
        """Wraps an existing safetensors file. ``nimg`` and ``sigma_rel`` default to the
        file's ``__metadata__`` values; raises ``ValueError`` when neither gives them."""
        if nimg is None or sigma_rel is None:
            metadata = read_metadata(data)
            try:
                if nimg is None:
                    nimg = int(metadata["nimg"])
                if sigma_rel is None:
                    sigma_rel = float(metadata["sigma_rel"])
            except KeyError as e:
                raise ValueError(
                    f"the file's __metadata__ has no {e.args[0]}; pass {e.args[0]}="
                ) from None
        return cls(nimg=nimg, sigma_rel=sigma_rel, data=data)

    @classmethod
    def from_parts(
        cls,
        nimg: int,
        sigma_rel: float,
        parts: Iterable[TensorPart],
        metadata: Mapping[str, str],
        *,
        ready: Callable[[], None] | None = None,
        on_release: Callable[[], None] | None = None,
    ) -> Snapshot:
        """A snapshot whose file is built when first needed.

        Args:
            nimg, sigma_rel: its training time (images) and width.
            parts: its tensors, written in sorted-name order whatever the order given.
            metadata: its ``__metadata__`` (string values), written with sorted keys.
            ready: called (on the serialising thread) before the first payload is read,
                e.g. to wait for device-to-host copies.
            on_release: called once when the snapshot is released or garbage-collected,
                whichever comes first (to return its buffers to a pool); the parts are never
                read afterwards.

        Raises ``ValueError`` for repeated names, unknown dtypes or non-string metadata.
        """
        snap = cls(nimg=nimg, sigma_rel=sigma_rel)
        snap._parts = sorted(parts, key=lambda p: p.name)
        snap._header = safetensors_header(snap._parts, metadata)
        snap._nbytes = len(snap._header) + sum(p.nbytes for p in snap._parts)
        snap._ready = ready
        if on_release is not None:
            snap._released = weakref.finalize(snap, on_release)
            snap._released.atexit = False
        return snap

    def __repr__(self) -> str:
        return f"Snapshot(nimg={self.nimg}, sigma_rel={self.sigma_rel!r}, nbytes={self.nbytes})"

    @property
    def gamma(self) -> float:
        """The EMA's power-function exponent (EDM2 eq. 126)."""
        return sigma_rel_to_gamma(self.sigma_rel)

    @property
    def nbytes(self) -> int:
        """Size of the file in bytes (known without serialising)."""
        return self._nbytes

    def write_to(self, f: BinaryIO) -> str:
        """Writes the file to ``f`` (anything with ``write(bytes-like)``), hashing as it
        goes, and returns its BLAKE3 digest (hex), which :attr:`digest` then caches. May be
        called on any thread and more than once, until :meth:`release`. Raises
        :class:`~hindsight_client.HindsightError` after :meth:`release` (unless the snapshot
        wraps finished bytes), and whatever a part raises (e.g.
        :class:`~hindsight_client.TrackerError` for values beyond float16's range);
        ``f`` may then hold part of the file."""
        with self._lock:
            if self._data is not None:
                f.write(self._data)
                if self._digest is None:
                    self._digest = digest_of(self._data)
                return self._digest
            parts = self._live_parts()
            if self._ready is not None:
                self._ready()
                self._ready = None
            hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
            hasher.update(self._header)
            f.write(self._header)
            for part in parts:
                view = memoryview(part.payload()).cast("B")  # type: ignore[arg-type]
                if view.nbytes != part.nbytes:
                    raise ValueError(
                        f"{part.name}: {view.nbytes} bytes for {part.nbytes} "
                        f"({part.dtype} {list(part.shape)})"
                    )
                hasher.update(view)
                f.write(view)
            self._digest = hasher.hexdigest()
            return self._digest

    def _live_parts(self) -> list[TensorPart]:
        if self._parts is None:
            what = "released" if self._was_released else "empty"
            raise HindsightError(
                f"snapshot at nimg {self.nimg} sigma_rel {self.sigma_rel} was {what}: "
                "its tensors are gone (write or hash it before release())"
            )
        return self._parts

    @property
    def digest(self) -> str:
        """BLAKE3 of the file (hex), computed once (serialising without keeping the bytes
        if they were not built yet); still known after :meth:`release` if it was computed
        before."""
        with self._lock:
            if self._digest is None:
                self.write_to(_Discard())  # type: ignore[arg-type]
            assert self._digest is not None
            return self._digest

    @property
    def data(self) -> bytes:
        """The whole file, built once and kept (``nbytes`` of memory; prefer
        :meth:`write_to` for large snapshots)."""
        with self._lock:
            if self._data is None:
                out = _Collect()
                self.write_to(out)  # type: ignore[arg-type]
                self._data = b"".join(out.chunks)
            return self._data

    def release(self) -> None:
        """Gives the host buffers back (to the tracker's pool). Afterwards ``nimg``,
        ``sigma_rel``, ``nbytes``, ``digest`` (if computed) and the bytes (if built by
        :attr:`data`, or given: a snapshot made from bytes keeps them) remain; writing a
        snapshot whose bytes were never built raises. Idempotent."""
        with self._lock:
            if self._parts is None and self._released is None:
                return
            self._parts = None
            self._ready = None
            self._was_released = True
            if self._released is not None:
                self._released()
                self._released = None

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
                self.write_to(f)
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
