"""Sweeps and reference statistics as the server describes them, and the bookkeeping that
turns a sweep's event stream (or polled states) into one sequence of events.

A sweep (``POST /sweeps``) samples images from reconstructions of one run at several EMA
widths (and training times) and scores them with FID and KID against stored reference
statistics; a worker of the server records one point per (σ_rel, nimg). See
:meth:`~hindsight_client.Client.start_sweep` and :meth:`~hindsight_client.Client.wait_sweep`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

SweepMetric = Literal["fid", "kid"]

#: Statuses a sweep or a point does not leave.
TERMINAL = frozenset({"done", "failed", "cancelled"})

#: ``on_progress(event, data)``: see :meth:`~hindsight_client.Client.wait_sweep`.
ProgressCallback = Callable[[str, dict[str, Any]], object]


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


@dataclass(frozen=True)
class MetricSummary:
    """One metric of a point over its seed sets.

    Attributes:
        mean: the mean over seed sets (the point's value).
        std: sample standard deviation over seed sets (``None`` with one set).
        values: one value per seed set.
        std_errors: KID only: each set's standard error over its random subsets.
    """

    mean: float
    std: float | None
    values: list[float]
    std_errors: list[float] | None

    @classmethod
    def from_json(cls, m: dict[str, Any]) -> MetricSummary:
        errors = m.get("std_errors")
        return cls(
            mean=float(m["mean"]),
            std=_opt_float(m.get("std")),
            values=[float(v) for v in m.get("values", [])],
            std_errors=None if errors is None else [float(v) for v in errors],
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
        fid, kid: the metric's mean over seed sets, once the point is done (``None`` before,
            or when the sweep does not compute it).
        fid_std, kid_std: standard deviation over seed sets (``None`` with one set; KID's
            per-set standard errors over subsets are in :meth:`metric`).
        result: the server's record of the finished point: ``fid``/``kid`` summaries,
            ``num_images``, ``seed_sets``, ``reconstruction``, ``timings`` (seconds).
        error: why the point failed (or why its last attempt did).
        grid_url: path of a PNG grid of its first images, once its first batch is recorded
            (:meth:`~hindsight_client.Client.point_grid`).
        reconstruction_id: the reconstruction sampled, once known.
    """

    idx: int
    sigma_rel: float
    nimg: int
    status: str
    images_done: int
    images_total: int
    attempts: int
    fid: float | None
    fid_std: float | None
    kid: float | None
    kid_std: float | None
    result: dict[str, Any] | None = field(repr=False)
    error: str | None
    grid_url: str | None
    reconstruction_id: str | None = field(repr=False)
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, p: dict[str, Any]) -> SweepPoint:
        result = p.get("result")
        result = result if isinstance(result, dict) else None

        def summary(name: str) -> tuple[float | None, float | None]:
            m = (result or {}).get(name)
            if not isinstance(m, dict):
                return None, None
            return _opt_float(m.get("mean")), _opt_float(m.get("std"))

        fid, fid_std = summary("fid")
        kid, kid_std = summary("kid")
        return cls(
            idx=int(p["idx"]),
            sigma_rel=float(p["sigma_rel"]),
            nimg=int(p["nimg"]),
            status=str(p["status"]),
            images_done=int(p.get("images_done", 0)),
            images_total=int(p.get("images_total", 0)),
            attempts=int(p.get("attempts", 0)),
            fid=fid,
            fid_std=fid_std,
            kid=kid,
            kid_std=kid_std,
            result=result,
            error=p.get("error"),
            grid_url=p.get("grid_url"),
            reconstruction_id=p.get("reconstruction_id"),
            raw=p,
        )

    @property
    def done(self) -> bool:
        """Whether the point is recorded with its result."""
        return self.status == "done"

    def value(self, metric: SweepMetric = "fid") -> float | None:
        """The metric's mean over seed sets (``None`` until done, or when not computed)."""
        if metric not in ("fid", "kid"):
            raise ValueError(f"metric {metric!r} is not one of 'fid', 'kid'")
        return self.fid if metric == "fid" else self.kid

    def metric(self, metric: SweepMetric = "fid") -> MetricSummary | None:
        """The metric's per-seed-set values, spread and (KID) standard errors."""
        if metric not in ("fid", "kid"):
            raise ValueError(f"metric {metric!r} is not one of 'fid', 'kid'")
        m = (self.result or {}).get(metric)
        return MetricSummary.from_json(m) if isinstance(m, dict) else None

    @property
    def timings(self) -> dict[str, float]:
        """Seconds spent: ``reconstruct_s``, ``batches_s`` (of which ``sample_s``,
        ``features_s``), ``metrics_s``, and ``images_per_s``; empty until done."""
        t = (self.result or {}).get("timings")
        return {k: float(v) for k, v in t.items()} if isinstance(t, dict) else {}


@dataclass(frozen=True)
class BestPoint:
    """The server's best finished point by one metric (lowest mean)."""

    metric: str
    idx: int
    sigma_rel: float
    nimg: int
    value: float
    std: float | None


@dataclass(frozen=True)
class Sweep:
    """A sweep: what it computes, how far it is, and its points.

    Attributes:
        id: the sweep's id.
        run: the run it samples.
        status: ``queued``, ``running``, ``done`` (every point recorded), ``failed`` (some
            point failed) or ``cancelled``.
        spec: the validated request: ``sigma_rels``, ``nimgs``, ``metrics``, ``num_images``,
            ``seed_sets``, ``sampler``, ``reference_id``, ``reference_name``, ``batch``,
            ``kid_subsets``, ``kid_subset_size``, ``warnings``.
        points: every point (empty in :meth:`~hindsight_client.Client.sweeps`' listing).
        best_points: the server's best point per metric computed so far.
        url, events_url, plot_url: the sweep's resource, its server-sent events, and its
            curve as SVG.
    """

    id: int
    run: str
    status: str
    spec: dict[str, Any] = field(repr=False)
    points: list[SweepPoint]
    best_points: dict[str, BestPoint]
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
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, s: dict[str, Any]) -> Sweep:
        best = {
            str(b["metric"]): BestPoint(
                metric=str(b["metric"]),
                idx=int(b["idx"]),
                sigma_rel=float(b["sigma_rel"]),
                nimg=int(b["nimg"]),
                value=float(b["value"]),
                std=_opt_float(b.get("std")),
            )
            for b in s.get("best", [])
        }
        sid = int(s["id"])
        return cls(
            id=sid,
            run=str(s["run"]),
            status=str(s["status"]),
            spec=dict(s.get("spec", {})),
            points=[SweepPoint.from_json(p) for p in s.get("points") or []],
            best_points=best,
            points_total=int(s.get("points_total", 0)),
            points_done=int(s.get("points_done", 0)),
            points_failed=int(s.get("points_failed", 0)),
            images_done=int(s.get("images_done", 0)),
            images_total=int(s.get("images_total", 0)),
            created_at=str(s.get("created_at", "")),
            finished_at=s.get("finished_at"),
            url=str(s.get("url", f"/sweeps/{sid}")),
            events_url=str(s.get("events_url", f"/sweeps/{sid}/events")),
            plot_url=str(s.get("plot_url", f"/sweeps/{sid}/plot.svg")),
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
        return [str(w) for w in self.spec.get("warnings", [])]

    @property
    def failed_points(self) -> list[SweepPoint]:
        """The points that failed."""
        return [p for p in self.points if p.status == "failed"]

    def best(self, metric: SweepMetric = "fid") -> SweepPoint | None:
        """The finished point with the lowest mean of ``metric`` (``None`` while none is
        finished)."""
        if metric not in ("fid", "kid"):
            raise ValueError(f"metric {metric!r} is not one of 'fid', 'kid'")
        reported = self.best_points.get(metric)
        if reported is not None:
            for p in self.points:
                if p.idx == reported.idx:
                    return p
        scored = [
            (v, p) for p in self.points if (v := p.value(metric)) is not None and math.isfinite(v)
        ]
        return min(scored, key=lambda vp: vp[0])[1] if scored else None


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
        def opt_int(v: Any) -> int | None:
            return None if v is None else int(v)

        return cls(
            id=int(r["id"]),
            name=str(r["name"]),
            source=str(r.get("source", "")),
            feature_network=str(r.get("feature_network", "")),
            weights_digest=r.get("weights_digest"),
            preprocess=r.get("preprocess"),
            dims=int(r.get("dims", 0)),
            count=int(r.get("count", 0)),
            has_features=bool(r.get("has_features", False)),
            resolution=opt_int(r.get("resolution")),
            channels=opt_int(r.get("channels")),
            created_at=str(r.get("created_at", "")),
            stats_url=str(r.get("stats_url", "")),
        )


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """Server-sent events (``event:`` / ``data:`` fields, a blank line ends each) as
    ``(name, data)``, with ``data`` decoded as JSON where it is JSON. Comments (keep-alives)
    and other fields are skipped; an event without a name is a ``message``."""
    name = ""
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    value: Any = json.loads(text)
                except ValueError:
                    value = text
                yield name or "message", value
            name, data = "", []
            continue
        if line.startswith(":"):
            continue
        key, _, value_text = line.partition(":")
        value_text = value_text.removeprefix(" ")
        if key == "event":
            name = value_text
        elif key == "data":
            data.append(value_text)


class SweepWatch:
    """What a waiter has told its caller about one sweep, so that events from a stream,
    from a stream reopened after a drop, and from polling make one sequence: ``sweep`` once,
    then ``progress`` and ``point`` as points move, then ``end`` once."""

    def __init__(self, on_progress: ProgressCallback | None) -> None:
        self._emit = on_progress
        self._points: dict[int, tuple[str, int]] | None = None
        self.last: dict[str, Any] | None = None
        self.final: Sweep | None = None

    def _tell(self, name: str, data: dict[str, Any]) -> None:
        if self._emit is not None:
            self._emit(name, data)

    def state(self, view: dict[str, Any]) -> None:
        """A whole sweep (the stream's ``sweep`` or ``end`` event, or a polled state):
        told as ``sweep`` the first time, afterwards as the point changes since the last
        state seen; then ``end`` if the sweep has ended."""
        if self.final is not None:
            return
        self.last = view
        points = view.get("points") or []
        if self._points is None:
            self._points = {
                int(p["idx"]): (str(p["status"]), int(p["images_done"])) for p in points
            }
            self._tell("sweep", view)
        else:
            for p in points:
                self._point_changed(p, view)
        if str(view.get("status")) in TERMINAL:
            self.final = Sweep.from_json(view)
            self._tell("end", view)

    def _point_changed(self, p: dict[str, Any], view: dict[str, Any]) -> None:
        assert self._points is not None
        idx, now = int(p["idx"]), (str(p["status"]), int(p["images_done"]))
        before = self._points.get(idx)
        if before == now:
            return
        self._points[idx] = now
        if (before is None or before[0] != now[0]) and now[0] in TERMINAL:
            self._tell("point", p)
        else:
            self._tell(
                "progress",
                {
                    "idx": idx,
                    "sigma_rel": p["sigma_rel"],
                    "nimg": p["nimg"],
                    "status": now[0],
                    "images_done": now[1],
                    "images_total": p.get("images_total"),
                    "sweep_images_done": view.get("images_done"),
                },
            )

    def event(self, name: str, data: Any) -> None:
        """One event from the stream."""
        if self.final is not None:
            return
        if name in ("sweep", "end") and isinstance(data, dict):
            self.state(data)
            return
        if name in ("progress", "point") and isinstance(data, dict) and "idx" in data:
            if self._points is not None:
                self._points[int(data["idx"])] = (str(data["status"]), int(data["images_done"]))
            self._tell(name, data)
            return
        self._tell(name, data if isinstance(data, dict) else {"data": data})
