"""Uploads: snapshots into a run (on one background thread fed by a bounded queue) and
reference statistics.

The training loop only pays for serialising a snapshot: :meth:`Uploader.upload` returns
futures at once (it waits only while ``max_pending`` snapshots are already queued, which
bounds the memory they hold), and :meth:`Uploader.flush` / :meth:`Uploader.close` wait for
the queue to drain and raise the first failure.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from queue import Queue
from typing import Any, Literal
from urllib.parse import quote

import httpx

from .errors import DigestMismatch, HindsightError
from .snapshot import Snapshot
from .transport import Transport, raise_for_status
from .wire import Ingested, SnapshotKey

UploadStatus = Literal["stored", "already_stored", "skipped"]


@dataclass(frozen=True)
class UploadResult:
    """What became of one uploaded snapshot (made by the client, not a server schema).

    ``status`` is ``"stored"`` (new on the server, HTTP 201), ``"already_stored"`` (the server
    had this exact snapshot, HTTP 200), or ``"skipped"`` (the run already lists this content
    at this time and width — ``HEAD /blobs/{digest}`` then the run's snapshot list — so no
    byte was sent).
    """

    run: str
    nimg: int
    sigma_rel: float
    digest: str
    bytes: int
    status: UploadStatus


def run_path(run: str) -> str:
    """The path of ``run``'s resource."""
    return f"/runs/{quote(run, safe='')}"


class Uploader:
    """The upload queue and its thread (started on the first upload).

    Args:
        transport: the server.
        max_pending: snapshots that may wait in the queue.
        bytes_per_second: cap on the upload rate (``None``: as fast as the network goes).
    """

    def __init__(
        self, transport: Transport, *, max_pending: int, bytes_per_second: float | None
    ) -> None:
        self._transport = transport
        self._rate = bytes_per_second
        self._queue: Queue[tuple[Future[UploadResult], str, Snapshot, bool] | None] = Queue(
            maxsize=max_pending
        )
        self._pending: list[Future[UploadResult]] = []
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._closed = False

    def upload(
        self, run: str, snapshots: Snapshot | Iterable[Snapshot], *, check_finite: bool
    ) -> list[Future[UploadResult]]:
        """Queues snapshots; one future per snapshot (see :meth:`Client.upload`)."""
        items = [snapshots] if isinstance(snapshots, Snapshot) else list(snapshots)
        self._raise_failures(wait=False)
        futures: list[Future[UploadResult]]
        with self._lock:
            if self._closed:
                raise HindsightError("this Client is closed")
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._loop, name="hindsight-upload", daemon=True
                )
                self._worker.start()
            futures = [Future() for _ in items]
            self._pending += futures
        for future, snap in zip(futures, items, strict=True):
            self._queue.put((future, run, snap, check_finite))
        return futures

    def _loop(self) -> None:
        with self._transport.new_http() as http:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                future, run, snap, check_finite = item
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(self.upload_one(http, run, snap, check_finite))
                except Exception as e:
                    future.set_exception(e)

    def _listed(self, http: httpx.Client, run: str, snap: Snapshot) -> bool:
        """Whether ``run`` already holds ``snap``'s content at its time and width."""
        head = self._transport.send("HEAD", f"/blobs/{snap.digest}", http=http)
        if head.status_code == 404:
            return False
        raise_for_status(head)
        listing = self._transport.send("GET", f"{run_path(run)}/snapshots", http=http)
        if listing.status_code == 404:
            return False
        rows = [SnapshotKey.from_json(row) for row in raise_for_status(listing).json()]
        return any(
            row.digest == snap.digest
            and row.nimg == snap.nimg
            and math.isclose(row.sigma_rel, snap.sigma_rel, rel_tol=1e-12)
            for row in rows
        )

    def _body(self, data: bytes) -> Iterator[bytes]:
        view = memoryview(data)
        chunk = self._transport.chunk
        start = time.monotonic()
        for offset in range(0, len(view), chunk):
            if self._rate is not None:
                due = start + offset / self._rate
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            yield bytes(view[offset : offset + chunk])

    def upload_one(
        self, http: httpx.Client, run: str, snap: Snapshot, check_finite: bool
    ) -> UploadResult:
        """Uploads ``snap`` on ``http`` unless the run lists it already."""

        def result(status: UploadStatus, digest: str) -> UploadResult:
            return UploadResult(run, snap.nimg, snap.sigma_rel, digest, len(snap.data), status)

        if self._listed(http, run, snap):
            return result("skipped", snap.digest)
        params: dict[str, str | int] = {
            "nimg": snap.nimg,
            "sigma_rel": repr(snap.sigma_rel),
            "filename": snap.file_name(),
        }
        if check_finite:
            params["check_finite"] = "true"
        response = self._transport.send(
            "POST",
            f"{run_path(run)}/snapshots",
            http=http,
            params=params,
            body=lambda: self._body(snap.data),
            headers={
                "Content-Length": str(len(snap.data)),
                "Content-Type": "application/octet-stream",
            },
        )
        stored = Ingested.from_json(raise_for_status(response).json())
        if stored.digest != snap.digest:
            raise DigestMismatch(f"upload to {run}", snap.digest, stored.digest)
        return result("stored" if stored.inserted else "already_stored", stored.digest)

    def _raise_failures(self, wait: bool, timeout: float | None = None) -> list[UploadResult]:
        with self._lock:
            pending = list(self._pending)
        if wait:
            _, not_done = wait_futures(pending, timeout=timeout)
            if not_done:
                raise TimeoutError(f"{len(not_done)} upload(s) still running after {timeout} s")
        done = [f for f in pending if f.done()]
        with self._lock:
            self._pending = [f for f in self._pending if f not in done]
        # Futures the caller cancelled before they started are theirs to account for.
        finished = [f for f in done if not f.cancelled()]
        failed = [e for e in (f.exception() for f in finished) if e is not None]
        if failed:
            first = failed[0]
            if len(failed) > 1:
                first.add_note(f"({len(failed) - 1} further upload(s) failed as well)")
            raise first
        return [f.result() for f in finished]

    def flush(self, timeout: float | None = None) -> list[UploadResult]:
        """Waits for every queued upload; the results not reported before, or the first
        failure among them."""
        return self._raise_failures(wait=True, timeout=timeout)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        with self._lock:
            return self._closed

    def close(self) -> None:
        """Finishes the queued uploads (raising the first failure) and stops the thread.
        Idempotent."""
        with self._lock:
            already, self._closed = self._closed, True
            worker = self._worker
        if already:
            return
        try:
            self._raise_failures(wait=True)
        finally:
            if worker is not None:
                self._queue.put(None)
                worker.join()


def post_reference(transport: Transport, name: str, data: bytes) -> dict[str, Any]:
    """``POST /references?name=``: stores reference statistics (a pytorch-fid ``.npz`` or an
    EDM2 ``.pkl``) under ``name``; the server's JSON of them. Not idempotent: sent again only
    when it cannot have reached the server."""
    response = transport.send(
        "POST",
        "/references",
        params={"name": name},
        body=lambda: iter([data]),
        headers={"Content-Type": "application/octet-stream"},
        idempotent=False,
    )
    body: dict[str, Any] = raise_for_status(response).json()
    return body
