"""Following a sweep: the bookkeeping that turns a sweep's event stream (or polled states)
into one sequence of events, and the reader of the stream.

A sweep (``POST /sweeps``) samples images from reconstructions of one run at several EMA
widths (and training times) and scores them with FID and KID against stored reference
statistics; a worker of the server records one point per (σ_rel, nimg). See
:meth:`~hindsight_client.Client.start_sweep` and :meth:`~hindsight_client.Client.wait_sweep`.
The sweep's payloads are the dataclasses of :mod:`hindsight_client.wire`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from queue import Empty
from typing import Any

from .errors import ApiError
from .transport import RETRY_STATUSES, Transport, parse_sse
from .wire import SWEEP_EVENTS, TERMINAL, Sweep, SweepMetric, SweepPoint, SweepProgress

__all__ = ["TERMINAL", "ProgressCallback", "SweepMetric", "SweepWatch", "follow", "parse_sse"]

log = logging.getLogger("hindsight_client")

#: ``on_progress(event, data)``: see :meth:`~hindsight_client.Client.wait_sweep`.
ProgressCallback = Callable[[str, dict[str, Any]], object]


class SweepWatch:
    """What a waiter has told its caller about one sweep, so that events from a stream,
    from a stream reopened after a drop, and from polling make one sequence: ``sweep`` once,
    then ``progress`` and ``point`` as points move, then ``end`` once. The caller is told the
    server's JSON (a polled change as the stream would have sent it)."""

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
        sweep = Sweep.from_json(view)
        if self._points is None:
            self._points = {p.idx: (p.status, p.images_done) for p in sweep.points}
            self._tell("sweep", view)
        else:
            for p in sweep.points:
                self._point_changed(p, sweep)
        if sweep.finished:
            self.final = sweep
            self._tell("end", view)

    def _point_changed(self, p: SweepPoint, sweep: Sweep) -> None:
        assert self._points is not None
        now = (p.status, p.images_done)
        before = self._points.get(p.idx)
        if before == now:
            return
        self._points[p.idx] = now
        if (before is None or before[0] != now[0]) and now[0] in TERMINAL:
            self._tell("point", p.raw)
        else:
            progress = SweepProgress(
                idx=p.idx,
                sigma_rel=p.sigma_rel,
                nimg=p.nimg,
                status=p.status,
                images_done=p.images_done,
                images_total=p.images_total,
                sweep_images_done=sweep.images_done,
            )
            self._tell("progress", dataclasses.asdict(progress))

    def event(self, name: str, data: Any) -> None:
        """One event from the stream."""
        if self.final is not None:
            return
        if name in ("sweep", "end") and isinstance(data, dict):
            self.state(data)
            return
        if name in ("progress", "point") and isinstance(data, dict) and "idx" in data:
            if self._points is not None:
                p = SWEEP_EVENTS[name].from_json(data)
                self._points[p.idx] = (p.status, p.images_done)
            self._tell(name, data)
            return
        self._tell(name, data if isinstance(data, dict) else {"data": data})


def follow(
    transport: Transport, sid: int, watch: SweepWatch, remaining: Callable[[], float | None]
) -> bool:
    """Feeds sweep ``sid``'s event stream to ``watch`` until the sweep ends or the stream
    drops; returns whether any event but the opening ``sweep`` arrived. ``remaining()`` is
    the time left (``None``: no deadline); it raises when none is."""
    stream = transport.events(f"/sweeps/{sid}/events")
    learnt = False
    try:
        while watch.final is None:
            try:
                item = stream.get(remaining())
            except Empty:
                remaining()  # raises SweepTimeout
                continue
            if item is None:
                log.info("the event stream of sweep %s closed early; polling", sid)
                return learnt
            if isinstance(item, ApiError) and item.status not in RETRY_STATUSES:
                raise item
            if isinstance(item, Exception):
                log.warning("the event stream of sweep %s broke (%s); polling", sid, item)
                return learnt
            name, data = item
            if name == "error":
                log.warning("the event stream of sweep %s reported %s; polling", sid, data)
                return learnt
            learnt = learnt or name != "sweep"
            watch.event(name, data)
        return True
    finally:
        stream.close()
