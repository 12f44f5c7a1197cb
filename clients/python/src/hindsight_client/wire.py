"""The server's JSON as dataclasses: every class here mirrors one component schema of the
server's ``GET /openapi.json`` and names it in ``__schema__``; nothing outside this module
reads a field of the server's answers.

How a class mirrors its schema (``tests/test_contract.py`` checks it against a running
server):

- each field is the schema's property of the same name, unless its ``metadata`` says
  otherwise: :func:`wire_name` for a field named differently, :data:`LOCAL` for a field the
  client adds (``raw``, values derived from others);
- a field whose property is optional or nullable in the schema is ``Optional``, unless
  :func:`present` says why the client always has it (e.g. a ready reconstruction's digest);
- every property the schema requires has a field, unless ``__omits__`` names it with the
  reason, or the class sets ``__partial__`` (it reads a few fields of a payload another
  class mirrors in full, or that the client hands on as a dict).

Values keep the server's units (KID raw, not ×10³); :class:`MetricInfo` says how to show them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import numpy as np
import safetensors.numpy

if TYPE_CHECKING:
    import torch

#: A metric's name: ``"fid"``, ``"kid"``, or a user metric's (``"val_loss"``).
SweepMetric = str

#: The image metrics, which the server computes from Inception features.
IMAGE_METRICS = ("fid", "kid")

#: Statuses a sweep or a point does not leave.
TERMINAL = frozenset({"done", "failed", "cancelled"})


#: ``field(metadata=LOCAL)``: a field the client adds, not a property of the class's schema.
LOCAL: dict[str, Any] = {"wire": None}


def wire_name(name: str) -> dict[str, Any]:
    """``field(metadata=wire_name(name))``: the field mirrors the schema's property ``name``."""
    return {"wire": name}


def present(why: str) -> dict[str, Any]:
    """``field(metadata=present(why))``: the client always has this field although the
    schema's property is optional, because ``why``."""
    return {"present": why}


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _object(v: Any) -> dict[str, Any]:
    """A JSON value the schema leaves open (the user's sampler settings), as the object the
    server stores it as (anything else: empty)."""
    return dict(v) if isinstance(v, dict) else {}


# -- errors ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorDetail:
    """The ``error`` of an error answer, ``{"error": {"code", "message"}}``."""

    __schema__ = "ErrorDetail"

    code: str
    message: str

    @classmethod
    def from_body(cls, body: Any) -> ErrorDetail | None:
        """The error an answer's JSON body (an ``ErrorBody``) carries; ``None`` when it is
        not one."""
        try:
            e = body["error"]
            return cls(code=str(e["code"]), message=str(e["message"]))
        except (KeyError, TypeError):
            return None


# -- snapshots ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotKey:
    """What the client compares of a stored snapshot (``GET /runs/{run}/snapshots``, whose
    rows :meth:`~hindsight_client.Client.snapshots` returns as dicts)."""

    __schema__ = "SnapshotRow"
    __partial__ = True

    digest: str
    nimg: int
    sigma_rel: float

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> SnapshotKey:
        return cls(
            digest=str(row["digest"]), nimg=int(row["nimg"]), sigma_rel=float(row["sigma_rel"])
        )


@dataclass(frozen=True)
class Ingested:
    """What an upload did: the stored file's digest, and whether it was new."""

    __schema__ = "Ingested"
    __partial__ = True

    digest: str
    inserted: bool

    @classmethod
    def from_json(cls, view: dict[str, Any]) -> Ingested:
        return cls(digest=str(view["digest"]), inserted=bool(view["inserted"]))


class _Row:
    """Read-only ``row["key"]`` access to the server's JSON (:attr:`raw`), for code written
    when :meth:`~hindsight_client.Client.runs` and
    :meth:`~hindsight_client.Client.snapshots` returned dicts."""

    raw: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)


@dataclass(frozen=True)
class StoredSnapshot(_Row):
    """One snapshot a run stores (``GET /runs/{run}/snapshots``).

    Attributes:
        id: the row's id (for :meth:`~hindsight_client.Client.delete_snapshot` and
            :meth:`~hindsight_client.Client.download_snapshot`).
        nimg: training time in images.
        sigma_rel: EMA width; ``gamma`` the same as a power-function exponent.
        digest: BLAKE3 of the file (hex).
        byte_size: the file's size in bytes.
        tensor_count: number of tensors.
        dtypes: elements per safetensors dtype, e.g. ``{"F32": 1024}``.
        metadata: the file's ``__metadata__`` as the trainer wrote it.
        created_at: when it was stored (RFC 3339 UTC).
        raw: the row as the server sent it (``row["nimg"]`` reads it too).
    """

    __schema__ = "SnapshotRow"

    id: int
    nimg: int
    sigma_rel: float
    gamma: float
    digest: str
    byte_size: int
    tensor_count: int
    dtypes: dict[str, int]
    metadata: dict[str, Any]
    created_at: str
    raw: dict[str, Any] = field(metadata=LOCAL, repr=False)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> StoredSnapshot:
        return cls(
            id=int(row["id"]),
            nimg=int(row["nimg"]),
            sigma_rel=float(row["sigma_rel"]),
            gamma=float(row["gamma"]),
            digest=str(row["digest"]),
            byte_size=int(row["byte_size"]),
            tensor_count=int(row["tensor_count"]),
            dtypes={str(k): int(v) for k, v in dict(row["dtypes"]).items()},
            metadata=_object(row["metadata"]),
            created_at=str(row["created_at"]),
            raw=row,
        )


@dataclass(frozen=True)
class DeletedSnapshot:
    """What ``DELETE /runs/{run}/snapshots/{id}`` did: the row that went, and whether its
    file left the store (``False`` when other rows still refer to it)."""

    __schema__ = "DeletedSnapshot"

    deleted: StoredSnapshot
    blob_removed: bool

    @classmethod
    def from_json(cls, view: dict[str, Any]) -> DeletedSnapshot:
        return cls(
            deleted=StoredSnapshot.from_json(view["deleted"]),
            blob_removed=bool(view["blob_removed"]),
        )


@dataclass(frozen=True)
class RunSummary(_Row):
    """A run with its totals (``GET /runs``).

    Attributes:
        name: the run's unique name.
        description: free text.
        created_at, last_activity: RFC 3339 UTC.
        snapshots: number of snapshots; ``bytes`` their files' total size.
        first_nimg, last_nimg: earliest and latest snapshot time (``None`` without any).
        raw: the row as the server sent it (``run["name"]`` reads it too).
    """

    __schema__ = "RunSummary"

    name: str
    description: str
    created_at: str
    snapshots: int
    bytes: int
    last_activity: str
    first_nimg: int | None
    last_nimg: int | None
    raw: dict[str, Any] = field(metadata=LOCAL, repr=False)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> RunSummary:
        return cls(
            name=str(row["name"]),
            description=str(row["description"]),
            created_at=str(row["created_at"]),
            snapshots=int(row["snapshots"]),
            bytes=int(row["bytes"]),
            last_activity=str(row["last_activity"]),
            first_nimg=_opt_int(row.get("first_nimg")),
            last_nimg=_opt_int(row.get("last_nimg")),
            raw=row,
        )


@dataclass(frozen=True)
class AuthStatus:
    """What ``GET /auth`` says of the client's token.

    Attributes:
        tokens_required: whether the server has a token file (writes need a token).
        token: ``"none"`` (no token sent), ``"valid"`` or ``"invalid"``.
        can_write: whether this client may upload, reconstruct and start sweeps.
    """

    __schema__ = "AuthStatus"

    tokens_required: bool
    token: str
    can_write: bool

    @classmethod
    def from_json(cls, view: dict[str, Any]) -> AuthStatus:
        return cls(
            tokens_required=bool(view["tokens_required"]),
            token=str(view["token"]),
            can_write=bool(view["can_write"]),
        )


# -- reconstructions -----------------------------------------------------------------------


@dataclass(frozen=True)
class ReconstructionPending:
    """A reconstruction still being computed (a 202 answer): poll ``status_url``. The 202 of
    ``POST /reconstruct`` is a whole ``ReconstructionView`` with these same fields."""

    __schema__ = "ReconstructionPending"

    id: str
    status: str
    status_url: str
    weights_url: str

    @classmethod
    def from_json(cls, view: dict[str, Any]) -> ReconstructionPending:
        return cls(
            id=str(view["id"]),
            status=str(view["status"]),
            status_url=str(view["status_url"]),
            weights_url=str(view["weights_url"]),
        )


@dataclass(frozen=True)
class ReportInput:
    """One stored snapshot a reconstruction used, with its coefficient."""

    __schema__ = "ReportInput"

    digest: str
    nimg: int
    sigma_rel: float
    weight: float


@dataclass(frozen=True)
class ReportWarning:
    """A reason to look twice: ``large_profile_error``, ``large_noise_gain``,
    ``ill_conditioned``, ``dependent_snapshots`` or ``clamped_out_of_range``."""

    __schema__ = "QualityWarning"

    code: str
    message: str


@dataclass(frozen=True)
class ClampedTensor:
    """A tensor whose values were clamped to the output type's range: ``elements`` values
    beyond it, the largest magnitude among them ``max_abs`` (before clamping)."""

    __schema__ = "ClampedTensor"

    tensor: str
    elements: int
    max_abs: float

    @classmethod
    def from_json(cls, c: dict[str, Any]) -> ClampedTensor:
        return cls(
            tensor=str(c["tensor"]), elements=int(c["elements"]), max_abs=float(c["max_abs"])
        )


@dataclass(frozen=True)
class Report:
    """The solver's quality report for one reconstruction (top-level README, "Usage").

    Attributes:
        relative_error: L2 distance of the reconstructed profile from the requested one,
            relative to the requested one's norm (0.01 is 1%).
        coefficient_l1: Σ|w_k| (1 for a plain average; larger when weights cancel).
        noise_gain: sqrt(Σ w_k²): amplification of independent per-snapshot noise.
        condition_number: 2-norm condition number of the used snapshots' Gram matrix.
        inputs: every snapshot with a non-zero weight; the weights sum to 1.
        clamped: the tensors whose values were clamped to the output type's range
            (``tensor``, ``elements``, ``max_abs``) as the server sent them; empty unless
            ``clamp_out_of_range``.
        clamped_tensors: the same, decoded.
        raw: the report as the server sent it.
    """

    __schema__ = "QualityReport"

    sigma_rel: float
    gamma: float
    nimg: int
    used_snapshots: int
    relative_error: float
    coefficient_l1: float
    noise_gain: float
    condition_number: float
    dependent_snapshots: list[str]
    warnings: list[ReportWarning]
    inputs: list[ReportInput]
    clamped: list[dict[str, Any]] = field(
        metadata=present("an empty list when the server sends none")
    )
    clamped_tensors: list[ClampedTensor] = field(metadata=LOCAL, repr=False, compare=False)
    raw: dict[str, Any] = field(metadata=LOCAL, repr=False)

    @classmethod
    def from_json(cls, r: dict[str, Any]) -> Report:
        clamped = list(r.get("clamped") or [])
        return cls(
            sigma_rel=float(r["sigma_rel"]),
            gamma=float(r["gamma"]),
            nimg=int(r["nimg"]),
            used_snapshots=int(r["used_snapshots"]),
            relative_error=float(r["relative_error"]),
            coefficient_l1=float(r["coefficient_l1"]),
            noise_gain=float(r["noise_gain"]),
            condition_number=float(r["condition_number"]),
            dependent_snapshots=[str(d) for d in r["dependent_snapshots"]],
            warnings=[ReportWarning(w["code"], w["message"]) for w in r["warnings"]],
            inputs=[
                ReportInput(i["digest"], int(i["nimg"]), float(i["sigma_rel"]), float(i["weight"]))
                for i in r["inputs"]
            ],
            clamped=clamped,
            clamped_tensors=[ClampedTensor.from_json(c) for c in clamped],
            raw=r,
        )


class _Fetcher(Protocol):
    """What a :class:`Reconstruction` downloads its weights with (the client)."""

    def _fetch(
        self, path: str, digest: str, restart: Callable[[], Callable[[bytes], object]]
    ) -> None: ...


@dataclass(frozen=True)
class Reconstruction:
    """A reconstructed EMA stored on the server: its identity, its quality report, and the
    means to fetch its weights. Every download is checked against :attr:`digest` (BLAKE3).

    Attributes:
        id: the reconstruction's id (its cache key, 64 hex digits).
        nimg: training time (images) it is reconstructed at.
        dtype: element type of its float tensors (``f32``, ``f16``, ``bf16``).
        digest: BLAKE3 of the safetensors file.
        byte_size: the file's size.
        file_name: the server's name for it, ``<run>-<nimg:010>-<sigma_rel:.3f>.safetensors``.
        cached: whether the server had it before this request.
    """

    __schema__ = "ReconstructionView"
    __omits__ = {  # noqa: RUF012 (read by the contract test only)
        "status": "a Reconstruction is made once the server says `ready`",
        "status_url": "polled by Client.reconstruct until ready",
    }

    id: str
    run: str
    nimg: int
    sigma_rel: float
    gamma: float
    dtype: str
    digest: str = field(metadata=present("a Reconstruction is made once ready"))
    byte_size: int = field(metadata=present("a Reconstruction is made once ready"))
    file_name: str
    cached: bool
    report: Report
    weights_url: str = field(repr=False)
    _client: _Fetcher = field(metadata=LOCAL, repr=False, compare=False)

    @classmethod
    def from_json(cls, view: dict[str, Any], client: _Fetcher, *, waited: bool) -> Reconstruction:
        """A ready reconstruction; ``waited``: the client polled for it (then the server did
        not have it before, whatever the polled answer's ``cached`` says)."""
        return cls(
            id=view["id"],
            run=view["run"],
            nimg=int(view["nimg"]),
            sigma_rel=float(view["sigma_rel"]),
            gamma=float(view["gamma"]),
            dtype=view["dtype"],
            digest=view["digest"],
            byte_size=int(view["byte_size"]),
            file_name=view["file_name"],
            cached=not waited and bool(view["cached"]),
            report=Report.from_json(view["report"]),
            weights_url=view["weights_url"],
            _client=client,
        )

    @property
    def warnings(self) -> list[ReportWarning]:
        """The report's warnings."""
        return self.report.warnings

    def read_bytes(self) -> bytes:
        """The safetensors file, in memory, checked against :attr:`digest`."""
        chunks: list[bytes] = []

        def restart() -> Callable[[bytes], object]:
            chunks.clear()
            return chunks.append

        self._client._fetch(self.weights_url, self.digest, restart)
        return b"".join(chunks)

    def download(self, path: str | os.PathLike[str] = ".") -> Path:
        """Writes the weights to ``path`` (a file, or a directory to put :attr:`file_name`
        in) and returns the file's path. The bytes go to a temporary file beside it that is
        renamed only once their digest checks out; on :class:`DigestMismatch` nothing is
        left behind."""
        target = Path(path)
        if target.is_dir():
            target = target / self.file_name
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        handle: list[BinaryIO] = []

        def restart() -> Callable[[bytes], object]:
            for f in handle:
                f.close()
            handle[:] = [open(tmp, "wb")]  # noqa: SIM115 (closed in `finally` below)
            return handle[0].write

        try:
            self._client._fetch(self.weights_url, self.digest, restart)
            handle[0].flush()
            os.fsync(handle[0].fileno())
            handle[0].close()
            os.replace(tmp, target)
        finally:
            for f in handle:
                f.close()
            tmp.unlink(missing_ok=True)
        return target

    def state_dict(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The weights as a state dict (needs PyTorch): ``module.load_state_dict(r.state_dict())``
        loads them, converting to the module's dtypes."""
        import safetensors.torch

        tensors = safetensors.torch.load(self.read_bytes())
        return {name: t.to(device) for name, t in tensors.items()}

    def arrays(self) -> dict[str, np.ndarray]:
        """The weights as NumPy arrays (not for ``bf16``, which NumPy lacks)."""
        return safetensors.numpy.load(self.read_bytes())


# -- sweeps ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricInfo:
    """How the server names and shows one metric of a sweep (decided there, for every
    client alike).

    Attributes:
        metric: the metric's name: ``fid``, ``kid``, or a user metric's (``val_loss``).
        kind: ``fid``, ``kid`` or ``user`` (a number the evaluator measures itself).
        label: its name for people: ``FID``, ``KID``, the fallback feature network's
            ``FD (pixel projection, not FID)``, ``KID (pixel projection, not Inception)``,
            or a user metric's label (default its name).
        short_label: for narrow places: ``FID``, ``KID``, ``FD-pixels``, ``KID-pixels``.
        scale: shown value = raw value × scale (1 for FID, 1000 for KID); values in the API
            stay raw.
        axis_label: the label of a plot's value axis, e.g. ``KID ×10³``.
        lower_is_better: whether a lower value is better (a user metric's ``goal``).
        fallback: whether the sweep's features come from the pixel projection (no Inception
            weights on the server): then the numbers are not FID and KID proper.
    """

    __schema__ = "MetricInfo"

    metric: str
    kind: str
    label: str
    short_label: str
    scale: float
    axis_label: str
    lower_is_better: bool
    fallback: bool

    @classmethod
    def from_json(cls, m: dict[str, Any]) -> MetricInfo:
        return cls(
            metric=str(m["metric"]),
            kind=str(m["kind"]),
            label=str(m["label"]),
            short_label=str(m["short_label"]),
            scale=float(m["scale"]),
            axis_label=str(m["axis_label"]),
            lower_is_better=bool(m["lower_is_better"]),
            fallback=bool(m["fallback"]),
        )

    def shown(self, value: float) -> float:
        """A raw value as people read it (KID ×10³)."""
        return value * self.scale

    @property
    def user(self) -> bool:
        """Whether the evaluator measures it (a user metric), not the server."""
        return self.kind == "user"


@dataclass(frozen=True)
class MetricSummary:
    """One metric of a point over its seed sets (raw units).

    Attributes:
        mean: the mean over seed sets.
        std: sample standard deviation over seed sets (``None`` with one set).
        values: one value per seed set.
        std_errors: KID only: each set's standard error over its random subsets.
        value: the point's value, the number to plot and rank (the mean).
        error_bar: half the height of the error bar to draw (``None``: none), as the server
            decides it.
    """

    __schema__ = "MetricResult"

    mean: float
    std: float | None
    values: list[float]
    std_errors: list[float] | None
    value: float
    error_bar: float | None

    @classmethod
    def from_json(cls, m: dict[str, Any]) -> MetricSummary:
        errors = m.get("std_errors")
        return cls(
            mean=float(m["mean"]),
            std=_opt_float(m.get("std")),
            values=[float(v) for v in m["values"]],
            std_errors=None if errors is None else [float(v) for v in errors],
            value=float(m["value"]),
            error_bar=_opt_float(m.get("error_bar")),
        )


@dataclass(frozen=True)
class Timings:
    """Seconds a finished point spent: ``batches_s`` over every batch (of which
    ``sample_s`` sampling, ``features_s`` features), ``reconstruct_s``, ``metrics_s``, and
    ``images_per_s`` over the batches."""

    __schema__ = "Timings"

    reconstruct_s: float
    batches_s: float
    sample_s: float
    features_s: float
    metrics_s: float
    images_per_s: float

    @classmethod
    def from_json(cls, t: dict[str, Any]) -> Timings:
        return cls(
            reconstruct_s=float(t["reconstruct_s"]),
            batches_s=float(t["batches_s"]),
            sample_s=float(t["sample_s"]),
            features_s=float(t["features_s"]),
            metrics_s=float(t["metrics_s"]),
            images_per_s=float(t["images_per_s"]),
        )


@dataclass(frozen=True)
class PointResult:
    """What a finished point measured (:attr:`SweepPoint.result`, decoded).

    Attributes:
        fid, kid: the metric over the point's seed sets (``None``: not computed).
        metrics: every metric the point measured, by name (``fid``, ``kid`` and user
            metrics such as ``val_loss``).
        features: who computed the Inception features: ``server``, ``client`` (an external
            evaluator, audited) or ``mixed`` (``None``: no image metric).
        kid_subsets: KID's subsets averaged and features per subset.
        num_images: images per seed set.
        seed_sets: seed sets.
        reconstruction: the id of the reconstruction sampled.
        timings: where the time went.
    """

    __schema__ = "PointResult"

    fid: MetricSummary | None
    kid: MetricSummary | None
    metrics: dict[str, MetricSummary]
    features: str | None
    kid_subsets: list[int] | None
    num_images: int
    seed_sets: int
    reconstruction: str
    timings: Timings

    @classmethod
    def from_json(cls, r: dict[str, Any]) -> PointResult:
        def summary(name: str) -> MetricSummary | None:
            m = r.get(name)
            return MetricSummary.from_json(m) if isinstance(m, dict) else None

        fid, kid = summary("fid"), summary("kid")
        metrics = {str(k): MetricSummary.from_json(v) for k, v in r["metrics"].items()}
        subsets = r.get("kid_subsets")
        return cls(
            fid=fid,
            kid=kid,
            metrics=metrics,
            features=r.get("features"),
            kid_subsets=None if subsets is None else [int(k) for k in subsets],
            num_images=int(r["num_images"]),
            seed_sets=int(r["seed_sets"]),
            reconstruction=str(r["reconstruction"]),
            timings=Timings.from_json(r["timings"]),
        )


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep: the reconstruction at (``sigma_rel``, ``nimg``) and its scores.

    Attributes:
        idx: position in the sweep (σ_rel fastest, then nimg).
        status: ``queued``, ``running``, ``done``, ``failed`` or ``cancelled``.
        images_done, images_total: images whose features are recorded, of
            ``num_images × seed_sets``.
        attempts: claims by workers (more than one: the point was resumed).
        fid, kid: the metric's value (mean over seed sets), once the point is done
            (``None`` before, or when the sweep does not compute it).
        fid_std, kid_std: standard deviation over seed sets (``None`` with one set; KID's
            per-set standard errors over subsets are in :meth:`metric`).
        result: the server's record of the finished point as it sent it: ``fid``/``kid``
            summaries, ``metrics`` (every metric by name, user metrics included),
            ``features`` (who computed them), ``num_images``, ``seed_sets``,
            ``reconstruction``, ``timings`` (seconds).
        measured: the same, decoded (``None`` until done).
        error: why the point failed (or why its last attempt did).
        grid_url: path of a PNG grid of its first images, once its first batch is recorded
            (:meth:`~hindsight_client.Client.point_grid`).
        reconstruction_id: the reconstruction sampled, once known.
    """

    __schema__ = "SweepPoint"

    idx: int
    sigma_rel: float
    nimg: int
    status: str
    images_done: int
    images_total: int
    attempts: int
    fid: float | None = field(metadata=LOCAL)
    fid_std: float | None = field(metadata=LOCAL)
    kid: float | None = field(metadata=LOCAL)
    kid_std: float | None = field(metadata=LOCAL)
    result: dict[str, Any] | None = field(repr=False)
    error: str | None
    grid_url: str | None
    reconstruction_id: str | None = field(repr=False)
    measured: PointResult | None = field(metadata=LOCAL, repr=False, compare=False)
    raw: dict[str, Any] = field(metadata=LOCAL, repr=False, compare=False)

    @classmethod
    def from_json(cls, p: dict[str, Any]) -> SweepPoint:
        result = p.get("result")
        result = result if isinstance(result, dict) else None
        measured = None if result is None else PointResult.from_json(result)
        fid = None if measured is None else measured.fid
        kid = None if measured is None else measured.kid
        return cls(
            idx=int(p["idx"]),
            sigma_rel=float(p["sigma_rel"]),
            nimg=int(p["nimg"]),
            status=str(p["status"]),
            images_done=int(p["images_done"]),
            images_total=int(p["images_total"]),
            attempts=int(p["attempts"]),
            fid=None if fid is None else fid.value,
            fid_std=None if fid is None else fid.std,
            kid=None if kid is None else kid.value,
            kid_std=None if kid is None else kid.std,
            result=result,
            error=p.get("error"),
            grid_url=p.get("grid_url"),
            reconstruction_id=p.get("reconstruction_id"),
            measured=measured,
            raw=p,
        )

    @property
    def done(self) -> bool:
        """Whether the point is recorded with its result."""
        return self.status == "done"

    def value(self, metric: SweepMetric = "fid") -> float | None:
        """The metric's value (``fid``, ``kid`` or a user metric's name), its mean over seed
        sets (``None`` until done, or when not measured)."""
        summary = self.metric(metric)
        return None if summary is None else summary.value

    def metric(self, metric: SweepMetric = "fid") -> MetricSummary | None:
        """The metric's per-seed-set values, spread, (KID) standard errors and error bar
        (``None`` until done, or when not measured)."""
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"a metric is named by a string, not {metric!r}")
        if self.measured is None:
            return None
        return self.measured.metrics.get(metric)

    @property
    def timings(self) -> dict[str, float]:
        """Seconds spent: ``reconstruct_s``, ``batches_s`` (of which ``sample_s``,
        ``features_s``), ``metrics_s``, and ``images_per_s``; empty until done."""
        return {} if self.measured is None else dataclasses.asdict(self.measured.timings)


@dataclass(frozen=True)
class BestPoint:
    """The server's best finished point by one metric (``fid``, ``kid`` or a user metric's
    name; by its goal), in raw units (``error_bar`` is half the height of the bar to draw,
    ``None``: none)."""

    __schema__ = "BestPoint"

    metric: str
    idx: int
    sigma_rel: float
    nimg: int
    value: float
    std: float | None
    error_bar: float | None

    @classmethod
    def from_json(cls, b: dict[str, Any]) -> BestPoint:
        return cls(
            metric=str(b["metric"]),
            idx=int(b["idx"]),
            sigma_rel=float(b["sigma_rel"]),
            nimg=int(b["nimg"]),
            value=float(b["value"]),
            std=_opt_float(b.get("std")),
            error_bar=_opt_float(b.get("error_bar")),
        )


@dataclass(frozen=True)
class SamplerSettings:
    """The sampler a sweep uses: ``steps`` steps from ``sigma_max`` to ``sigma_min`` with
    Karras' ``rho``."""

    __schema__ = "SamplerSettings"

    steps: int
    sigma_min: float
    sigma_max: float
    rho: float

    @classmethod
    def from_json(cls, s: dict[str, Any]) -> SamplerSettings:
        return cls(
            steps=int(s["steps"]),
            sigma_min=float(s["sigma_min"]),
            sigma_max=float(s["sigma_max"]),
            rho=float(s["rho"]),
        )


@dataclass(frozen=True)
class UserMetric:
    """A metric an external evaluator measures itself (``val_loss``): its ``name``, its
    ``goal`` (``min`` or ``max``) and its ``label`` for people."""

    __schema__ = "UserMetric"

    name: str
    goal: str
    label: str

    @classmethod
    def from_json(cls, m: dict[str, Any]) -> UserMetric:
        return cls(name=str(m["name"]), goal=str(m["goal"]), label=str(m["label"]))


@dataclass(frozen=True)
class SweepSpec:
    """The validated request of a sweep (:attr:`Sweep.spec`, decoded): its grid, metrics,
    images, sampler, reference statistics and feature network, and the warnings it drew.

    Attributes:
        evaluator: ``builtin`` (the server's workers sample the EDM2 network) or
            ``external`` (evaluators run the user's model: :meth:`Client.evaluate`).
        metrics: the image metrics (``fid``, ``kid``); ``user_metrics`` the others.
        sampler: a builtin sweep's EDM sampler settings (``None`` for an external sweep).
        sampler_json: the sampler as the server sent it: for an external sweep, the
            user's own settings, handed to every evaluator untouched.
        reference_id, reference_name: the reference statistics (``None``: an external
            sweep with only user metrics).
    """

    __schema__ = "SweepSpec"

    run: str
    sigma_rels: list[float]
    nimgs: list[int]
    evaluator: str
    metrics: list[str]
    user_metrics: list[UserMetric]
    num_images: int
    seed_sets: int
    sampler: SamplerSettings | None
    sampler_json: dict[str, Any] = field(metadata=wire_name("sampler"), repr=False)
    reference_id: int | None
    reference_name: str | None
    feature_network: str
    batch: int
    kid_subsets: int
    kid_subset_size: int
    warnings: list[str]

    @classmethod
    def from_json(cls, s: dict[str, Any]) -> SweepSpec:
        evaluator = str(s["evaluator"])
        sampler = dict(s["sampler"])
        return cls(
            run=str(s["run"]),
            sigma_rels=[float(v) for v in s["sigma_rels"]],
            nimgs=[int(n) for n in s["nimgs"]],
            evaluator=evaluator,
            metrics=[str(m) for m in s["metrics"]],
            user_metrics=[UserMetric.from_json(m) for m in s["user_metrics"]],
            num_images=int(s["num_images"]),
            seed_sets=int(s["seed_sets"]),
            sampler=SamplerSettings.from_json(sampler) if evaluator == "builtin" else None,
            sampler_json=sampler,
            reference_id=_opt_int(s.get("reference_id")),
            reference_name=s.get("reference_name"),
            feature_network=str(s["feature_network"]),
            batch=int(s["batch"]),
            kid_subsets=int(s["kid_subsets"]),
            kid_subset_size=int(s["kid_subset_size"]),
            warnings=[str(w) for w in s["warnings"]],
        )


@dataclass(frozen=True)
class SweepWorker:
    """A lease held now on a point of a sweep: which worker (an external evaluator's name,
    or a builtin worker's id; ``evaluator`` says which kind) is on point ``idx``, since
    ``claimed_at``, last heard from at ``heartbeat_at``, until ``expires_at`` unless it
    reports again (times are RFC 3339); ``expired``: the lease has run out (the worker is
    presumably dead, and the next claim takes the point)."""

    __schema__ = "SweepWorker"

    worker: str
    evaluator: str
    idx: int
    sigma_rel: float
    nimg: int
    claimed_at: str
    heartbeat_at: str
    expires_at: str
    expired: bool

    @classmethod
    def from_json(cls, w: dict[str, Any]) -> SweepWorker:
        return cls(
            worker=str(w["worker"]),
            evaluator=str(w["evaluator"]),
            idx=int(w["idx"]),
            sigma_rel=float(w["sigma_rel"]),
            nimg=int(w["nimg"]),
            claimed_at=str(w["claimed_at"]),
            heartbeat_at=str(w["heartbeat_at"]),
            expires_at=str(w["expires_at"]),
            expired=bool(w["expired"]),
        )


@dataclass(frozen=True)
class SweepFailure:
    """An attempt on a point that did not finish it: ``outcome`` says how it ended
    (``failed``: the worker reported a failure; ``expired``: its lease ran out and another
    worker took the point; ``released``: the worker gave the point back), ``message`` what
    the worker said."""

    __schema__ = "SweepFailure"

    worker: str
    evaluator: str
    idx: int
    sigma_rel: float
    nimg: int
    claimed_at: str
    ended_at: str | None
    outcome: str
    message: str | None

    @classmethod
    def from_json(cls, f: dict[str, Any]) -> SweepFailure:
        return cls(
            worker=str(f["worker"]),
            evaluator=str(f["evaluator"]),
            idx=int(f["idx"]),
            sigma_rel=float(f["sigma_rel"]),
            nimg=int(f["nimg"]),
            claimed_at=str(f["claimed_at"]),
            ended_at=f.get("ended_at"),
            outcome=str(f["outcome"]),
            message=f.get("message"),
        )


@dataclass(frozen=True)
class Sweep:
    """A sweep: what it computes, how far it is, and its points.

    Attributes:
        id: the sweep's id.
        run: the run it samples.
        status: ``queued``, ``running``, ``done`` (every point recorded), ``failed`` (some
            point failed) or ``cancelled``.
        spec: the validated request as the server sent it: ``evaluator``, ``sigma_rels``,
            ``nimgs``, ``metrics``, ``user_metrics``, ``num_images``, ``seed_sets``,
            ``sampler``, ``reference_id``, ``reference_name``, ``feature_network``,
            ``batch``, ``kid_subsets``, ``kid_subset_size``, ``warnings``.
        settings: the same, decoded.
        points: every point (empty in :meth:`~hindsight_client.Client.sweeps`' listing).
        best_points: the server's best point per metric computed so far.
        metrics: what it computes, in order (image metrics and user metrics), with how the
            server names and shows each.
        workers: the leases external evaluators hold now (empty for builtin sweeps and in
            listings).
        failures: the attempts of external evaluators that failed or whose lease expired,
            with their messages.
        url, events_url, plot_url: the sweep's resource, its server-sent events, and its
            curve as SVG.
    """

    __schema__ = "Sweep"
    __omits__ = {  # noqa: RUF012 (read by the contract test only)
        "comparison_key": "the web UI's rule for overlays (in `raw`); not read, so the client "
        "also works with servers older than the key",
    }

    id: int
    run: str
    status: str
    spec: dict[str, Any] = field(repr=False)
    points: list[SweepPoint] = field(
        metadata=present("an empty list when the server leaves them out")
    )
    best_points: dict[str, BestPoint] = field(metadata=wire_name("best"))
    points_total: int
    points_done: int
    points_failed: int
    images_done: int
    images_total: int
    created_at: str
    finished_at: str | None
    url: str
    events_url: str
    plot_url: str
    metrics: list[MetricInfo]
    workers: list[SweepWorker] = field(
        metadata=present("an empty list when the server leaves them out"), repr=False
    )
    failures: list[SweepFailure] = field(
        metadata=present("an empty list when the server leaves them out"), repr=False
    )
    settings: SweepSpec = field(metadata=LOCAL, repr=False, compare=False)
    raw: dict[str, Any] = field(metadata=LOCAL, repr=False, compare=False)

    @classmethod
    def from_json(cls, s: dict[str, Any]) -> Sweep:
        best = {str(b["metric"]): BestPoint.from_json(b) for b in s["best"]}
        spec = dict(s["spec"])
        return cls(
            id=int(s["id"]),
            run=str(s["run"]),
            status=str(s["status"]),
            spec=spec,
            points=[SweepPoint.from_json(p) for p in s.get("points") or []],
            best_points=best,
            points_total=int(s["points_total"]),
            points_done=int(s["points_done"]),
            points_failed=int(s["points_failed"]),
            images_done=int(s["images_done"]),
            images_total=int(s["images_total"]),
            created_at=str(s["created_at"]),
            finished_at=s.get("finished_at"),
            url=str(s["url"]),
            events_url=str(s["events_url"]),
            plot_url=str(s["plot_url"]),
            metrics=[MetricInfo.from_json(m) for m in s["metrics"]],
            workers=[SweepWorker.from_json(w) for w in s.get("workers") or []],
            failures=[SweepFailure.from_json(f) for f in s.get("failures") or []],
            settings=SweepSpec.from_json(spec),
            raw=s,
        )

    @property
    def finished(self) -> bool:
        """Whether the sweep has ended (``done``, ``failed`` or ``cancelled``)."""
        return self.status in TERMINAL

    @property
    def warnings(self) -> list[str]:
        """What the server wants the caller to know about the request (e.g. FID's bias at
        few images)."""
        return list(self.settings.warnings)

    @property
    def failed_points(self) -> list[SweepPoint]:
        """The points that failed."""
        return [p for p in self.points if p.status == "failed"]

    @property
    def evaluator(self) -> str:
        """``builtin`` (the server's workers) or ``external`` (:meth:`Client.evaluate`)."""
        return self.settings.evaluator

    def metric_info(self, metric: SweepMetric = "fid") -> MetricInfo | None:
        """How the server names and shows ``metric`` (``None``: the sweep does not compute
        it)."""
        return next((m for m in self.metrics if m.metric == metric), None)

    def best(self, metric: SweepMetric = "fid") -> SweepPoint | None:
        """The finished point with the best value of ``metric`` — ``fid``, ``kid`` or a user
        metric's name — by its goal (the lowest when ``lower_is_better``, else the highest),
        as the server reports it; ``None`` while none is finished.

        Raises ``ValueError`` for a metric the sweep does not measure (FID and KID excepted:
        ``None``, as before user metrics existed)."""
        info = self.metric_info(metric)
        if info is None and metric not in IMAGE_METRICS:
            known = ", ".join(repr(m.metric) for m in self.metrics)
            raise ValueError(f"metric {metric!r} is not one of this sweep's: {known}")
        reported = self.best_points.get(metric)
        if reported is not None:
            return next((p for p in self.points if p.idx == reported.idx), None)
        if info is None:
            return None
        # Not (yet) reported by the server: the same choice, from the points at hand.
        scored = [(p.value(metric), p) for p in self.points if p.done]
        ranked = [(v, p.idx, p) for v, p in scored if v is not None]
        if not ranked:
            return None
        sign = 1.0 if info.lower_is_better else -1.0
        return min(ranked, key=lambda t: (sign * t[0], t[1]))[2]


@dataclass(frozen=True)
class SweepProgress:
    """The data of a ``progress`` event: a point's images so far (``sweep_images_done``:
    the sweep's, over all points)."""

    __schema__ = "SweepProgress"

    idx: int
    sigma_rel: float
    nimg: int
    status: str
    images_done: int
    images_total: int
    sweep_images_done: int

    @classmethod
    def from_json(cls, e: dict[str, Any]) -> SweepProgress:
        return cls(
            idx=int(e["idx"]),
            sigma_rel=float(e["sigma_rel"]),
            nimg=int(e["nimg"]),
            status=str(e["status"]),
            images_done=int(e["images_done"]),
            images_total=int(e["images_total"]),
            sweep_images_done=int(e["sweep_images_done"]),
        )


@dataclass(frozen=True)
class SweepPage:
    """One page of ``GET /sweeps``: sweeps without their points, newest first;
    ``next_before`` is the ``before`` of the next page (``None`` on the last)."""

    __schema__ = "SweepList"

    sweeps: list[Sweep]
    next_before: int | None

    @classmethod
    def from_json(cls, page: dict[str, Any]) -> SweepPage:
        return cls(
            sweeps=[Sweep.from_json(s) for s in page["sweeps"]],
            next_before=_opt_int(page.get("next_before")),
        )


#: The events of ``GET /sweeps/{id}/events`` (``SweepEvent``) whose ``data`` the client reads,
#: with the class that reads it. ``error`` and ``shutdown`` end the stream; the client then
#: polls.
SWEEP_EVENTS: dict[str, Any] = {
    "sweep": Sweep,
    "progress": SweepProgress,
    "point": SweepPoint,
    "end": Sweep,
}


# -- external evaluators: leases ------------------------------------------------------------


@dataclass(frozen=True)
class LeaseSweep:
    """The sweep a leased point belongs to."""

    __schema__ = "LeaseSweep"

    id: int
    run: str
    url: str

    @classmethod
    def from_json(cls, s: dict[str, Any]) -> LeaseSweep:
        return cls(id=int(s["id"]), run=str(s["run"]), url=str(s["url"]))


@dataclass(frozen=True)
class LeasePoint:
    """The leased point: its position, EMA width, training time, and claims so far
    (``attempts``, this one included)."""

    __schema__ = "LeasePoint"

    idx: int
    sigma_rel: float
    nimg: int
    attempts: int

    @classmethod
    def from_json(cls, p: dict[str, Any]) -> LeasePoint:
        return cls(
            idx=int(p["idx"]),
            sigma_rel=float(p["sigma_rel"]),
            nimg=int(p["nimg"]),
            attempts=int(p["attempts"]),
        )


@dataclass(frozen=True)
class LeaseReconstruction:
    """The point's reconstructed weights (float32 safetensors, stored on the server): fetch
    ``url`` and check the bytes' BLAKE3 against ``digest``."""

    __schema__ = "LeaseReconstruction"

    id: str
    digest: str
    url: str
    dtype: str
    byte_size: int

    @classmethod
    def from_json(cls, r: dict[str, Any]) -> LeaseReconstruction:
        return cls(
            id=str(r["id"]),
            digest=str(r["digest"]),
            url=str(r["url"]),
            dtype=str(r["dtype"]),
            byte_size=int(r["byte_size"]),
        )


@dataclass(frozen=True)
class SeedSet:
    """Seed set ``set``: the images (and seeds) ``first_seed … end_seed − 1``."""

    __schema__ = "SeedSet"

    set: int
    first_seed: int
    end_seed: int

    @classmethod
    def from_json(cls, s: dict[str, Any]) -> SeedSet:
        return cls(set=int(s["set"]), first_seed=int(s["first_seed"]), end_seed=int(s["end_seed"]))


@dataclass(frozen=True)
class ImageGeometry:
    """What uploaded images must be: the reference images' side and channels (``None``: not
    recorded; any square size, grey or RGB)."""

    __schema__ = "ImageGeometry"

    resolution: int | None
    channels: int | None

    @classmethod
    def from_json(cls, i: dict[str, Any]) -> ImageGeometry:
        return cls(resolution=_opt_int(i.get("resolution")), channels=_opt_int(i.get("channels")))


@dataclass(frozen=True)
class FeatureTerms:
    """Whether the server takes Inception features computed by the evaluator, and how it
    audits them.

    Attributes:
        accepted: false when the reference's features are not Inception's: upload images.
        network: the feature network, e.g. ``inception-2015-12-05 pool3 (2048-d)``.
        dims: feature dimension.
        weights_digest: BLAKE3 of the server's weights file: features from other weights
            are refused.
        min_audit_images: images of each batch to send with its features for the audit.
        audit_tolerance: the largest relative difference ``‖f_client − f_server‖₂ /
            ‖f_server‖₂`` the audit lets through.
    """

    __schema__ = "FeatureTerms"

    accepted: bool
    network: str
    dims: int
    weights_digest: str | None
    min_audit_images: int
    audit_tolerance: float

    @classmethod
    def from_json(cls, f: dict[str, Any]) -> FeatureTerms:
        return cls(
            accepted=bool(f["accepted"]),
            network=str(f["network"]),
            dims=int(f["dims"]),
            weights_digest=f.get("weights_digest"),
            min_audit_images=int(f["min_audit_images"]),
            audit_tolerance=float(f["audit_tolerance"]),
        )


@dataclass(frozen=True)
class LeaseUrls:
    """The paths of a lease's writes; ``batch`` has ``{k}`` for the batch index."""

    __schema__ = "LeaseUrls"

    heartbeat: str
    fail: str
    batch: str
    metrics: str
    finish: str

    @classmethod
    def from_json(cls, u: dict[str, Any]) -> LeaseUrls:
        return cls(
            heartbeat=str(u["heartbeat"]),
            fail=str(u["fail"]),
            batch=str(u["batch"]),
            metrics=str(u["metrics"]),
            finish=str(u["finish"]),
        )

    def batch_url(self, k: int) -> str:
        """The path of batch ``k``'s upload."""
        return self.batch.replace("{k}", str(int(k)))


@dataclass(frozen=True)
class Lease:
    """One point of an external sweep, claimed by one evaluator (``POST
    /evaluations/claim``; ``docs/EVALUATORS.md``): what to evaluate and where to send it.

    Attributes:
        lease_id: the lease (``ls_…``): the capability for the writes that follow.
        worker: the evaluator's name.
        expires_at, lease_seconds: the lease ends at ``expires_at`` (RFC 3339) unless a
            heartbeat or a write extends it by ``lease_seconds``.
        sweep, point: the sweep and the point.
        reconstruction: the weights to evaluate.
        num_images: images per seed set (0: no image metric).
        batch, batches: images per batch and batches of the point; batch ``k`` holds seeds
            ``k·batch …`` of the concatenated seed sets.
        batches_done: batches already recorded (by an earlier lease): not sent again.
        seed_sets: the seed sets (image ``i`` comes from seed ``i``).
        images: the size uploaded images must have.
        features: whether and how the server takes client-side Inception features.
        sampler: the sweep's sampler settings, as the user gave them.
        metrics: every metric of the sweep (the user metrics have ``kind == "user"``).
        metrics_recorded: user metrics already recorded for the point (one value per seed
            set, or one for the point).
        urls: where to send heartbeats, batches, metrics, the end.
    """

    __schema__ = "Lease"

    lease_id: str
    worker: str
    expires_at: str
    lease_seconds: float
    sweep: LeaseSweep
    point: LeasePoint
    reconstruction: LeaseReconstruction
    num_images: int
    batch: int
    batches: int
    batches_done: list[int]
    seed_sets: list[SeedSet]
    images: ImageGeometry
    features: FeatureTerms
    sampler: dict[str, Any]
    metrics: list[MetricInfo]
    metrics_recorded: dict[str, list[float]]
    urls: LeaseUrls

    @classmethod
    def from_json(cls, lease: dict[str, Any]) -> Lease:
        return cls(
            lease_id=str(lease["lease_id"]),
            worker=str(lease["worker"]),
            expires_at=str(lease["expires_at"]),
            lease_seconds=float(lease["lease_seconds"]),
            sweep=LeaseSweep.from_json(lease["sweep"]),
            point=LeasePoint.from_json(lease["point"]),
            reconstruction=LeaseReconstruction.from_json(lease["reconstruction"]),
            num_images=int(lease["num_images"]),
            batch=int(lease["batch"]),
            batches=int(lease["batches"]),
            batches_done=[int(k) for k in lease["batches_done"]],
            seed_sets=[SeedSet.from_json(s) for s in lease["seed_sets"]],
            images=ImageGeometry.from_json(lease["images"]),
            features=FeatureTerms.from_json(lease["features"]),
            sampler=_object(lease["sampler"]),
            metrics=[MetricInfo.from_json(m) for m in lease["metrics"]],
            metrics_recorded={
                str(k): [float(x) for x in v] for k, v in lease["metrics_recorded"].items()
            },
            urls=LeaseUrls.from_json(lease["urls"]),
        )

    @property
    def seeds(self) -> list[int]:
        """Every seed of the point, in image order (the seed sets one after the other)."""
        return [seed for s in self.seed_sets for seed in range(s.first_seed, s.end_seed)]

    def batch_seeds(self, k: int) -> list[int]:
        """The seeds of batch ``k``."""
        return self.seeds[k * self.batch : (k + 1) * self.batch]

    @property
    def user_metrics(self) -> list[MetricInfo]:
        """The metrics the evaluator measures itself."""
        return [m for m in self.metrics if m.user]


@dataclass(frozen=True)
class AuditResult:
    """The server's audit of uploaded features: ``images`` audit images run through its own
    network, the largest relative difference found."""

    __schema__ = "AuditResult"

    images: int
    max_relative_difference: float

    @classmethod
    def from_json(cls, a: dict[str, Any]) -> AuditResult:
        return cls(
            images=int(a["images"]), max_relative_difference=float(a["max_relative_difference"])
        )


@dataclass(frozen=True)
class BatchRecorded:
    """The answer to a batch upload: ``recorded`` false when the same upload was recorded
    before; ``features_by`` ``server`` (images) or ``client`` (features, with the
    ``audit``); ``server_seconds`` the server's time on it."""

    __schema__ = "BatchRecorded"

    batch: int
    images: int
    recorded: bool
    features_by: str
    audit: AuditResult | None
    server_seconds: float

    @classmethod
    def from_json(cls, b: dict[str, Any]) -> BatchRecorded:
        audit = b.get("audit")
        return cls(
            batch=int(b["batch"]),
            images=int(b["images"]),
            recorded=bool(b["recorded"]),
            features_by=str(b["features_by"]),
            audit=None if audit is None else AuditResult.from_json(audit),
            server_seconds=float(b["server_seconds"]),
        )


@dataclass(frozen=True)
class MetricsRecorded:
    """The answer to a metrics report: every user metric recorded under the lease so far,
    and those still ``missing``."""

    __schema__ = "MetricsRecorded"

    metrics_recorded: dict[str, list[float]]
    missing: list[str]

    @classmethod
    def from_json(cls, m: dict[str, Any]) -> MetricsRecorded:
        return cls(
            metrics_recorded={
                str(k): [float(x) for x in v] for k, v in m["metrics_recorded"].items()
            },
            missing=[str(n) for n in m["missing"]],
        )


@dataclass(frozen=True)
class FailRecorded:
    """The answer to a failure report: ``retry`` false when the point failed for good
    (after its attempts)."""

    __schema__ = "FailRecorded"

    lease_id: str
    retry: bool

    @classmethod
    def from_json(cls, f: dict[str, Any]) -> FailRecorded:
        return cls(lease_id=str(f["lease_id"]), retry=bool(f["retry"]))


# -- reference statistics --------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """Reference statistics stored on the server (``GET /references``).

    Attributes:
        id, name: how sweeps name them (``reference=``).
        source: the dataset or imported file.
        dims: feature dimension (2048 for the Inception features sweeps use).
        count: images summarised (0: not recorded in an imported file).
        has_features: whether the features are kept (KID needs them; imported statistics
            keep only mean and covariance, so sweeps against them compute FID only).
        weights_digest: BLAKE3 of the Inception weights that made them (``None``: imported).
        stats_url: the statistics as a pytorch-fid ``.npz``.
    """

    __schema__ = "Reference"

    id: int
    name: str
    source: str
    feature_network: str
    weights_digest: str | None
    preprocess: str | None
    dims: int
    count: int
    has_features: bool
    resolution: int | None
    channels: int | None
    created_at: str
    stats_url: str

    @classmethod
    def from_json(cls, r: dict[str, Any]) -> Reference:
        return cls(
            id=int(r["id"]),
            name=str(r["name"]),
            source=str(r["source"]),
            feature_network=str(r["feature_network"]),
            weights_digest=r.get("weights_digest"),
            preprocess=r.get("preprocess"),
            dims=int(r["dims"]),
            count=int(r["count"]),
            has_features=bool(r["has_features"]),
            resolution=_opt_int(r.get("resolution")),
            channels=_opt_int(r.get("channels")),
            created_at=str(r["created_at"]),
            stats_url=str(r["stats_url"]),
        )


@dataclass(frozen=True)
class ReferenceList:
    """``GET /references``: every stored set of reference statistics, by name."""

    __schema__ = "ReferenceList"

    references: list[Reference]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ReferenceList:
        return cls(references=[Reference.from_json(r) for r in body["references"]])
