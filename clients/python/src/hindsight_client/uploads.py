"""Uploads: snapshots into a run through a durable on-disk spool, and reference statistics.

:meth:`Uploader.upload` hands snapshots to a *spooler* thread, which writes each into the
spool directory (:mod:`~hindsight_client.spool`: a temporary file, fsynced, committed by a
rename) and then releases the snapshot's buffers. A *sender* thread sends the spooled files
oldest first and retries for as long as it takes (capped exponential backoff with jitter;
``Retry-After`` honoured); a file is deleted only once the server has stored it. A refusal
(a 4xx other than 408/429) moves the file to ``rejected/`` and is reported to ``on_error``,
the log, the snapshot's future and the next :meth:`Uploader.flush` / :meth:`Uploader.close`
— never to :meth:`Uploader.upload`.

So the training thread pays only for queueing (or, with ``durable=True``, for the write and
fsync); a server that is down loses nothing, and a process that exits or dies leaves its
spooled snapshots to the next Client on the same spool.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal
from urllib.parse import quote

import httpx

from .errors import ApiError, DigestMismatch, HindsightError, SpoolFull, TransportError
from .snapshot import Snapshot
from .spool import Claim, Spool, SpoolEntry
from .transport import (
    RETRY_STATUSES,
    Transport,
    _RetryableError,
    error_from,
    raise_for_status,
    retry_after,
)
from .wire import Ingested, SnapshotKey

log = logging.getLogger("hindsight_client")

UploadStatus = Literal["stored", "already_stored", "skipped"]

#: ``on_error(run, entry, error)``: called on the sender thread for each refused snapshot;
#: ``entry.path`` is where the refused file is kept (under the spool's ``rejected/``).
ErrorCallback = Callable[[str, SpoolEntry, BaseException], object]

# How often the "still failing" line is logged during an outage, in seconds.
_LOG_EVERY = 60.0
# An idle sender looks at the spool this often, for entries that processes which ended left.
_IDLE_SCAN = 5.0
# The longest Retry-After honoured, in seconds.
_MAX_RETRY_AFTER = 600.0


@dataclass(frozen=True)
class UploadResult:
    """What became of one uploaded snapshot (made by the client, not a server schema).

    ``status`` is ``"stored"`` (new on the server, HTTP 201), ``"already_stored"`` (the server
    had this snapshot, HTTP 200: the same bytes, or tensors equal to the stored ones — then
    ``digest`` is the stored file's), or ``"skipped"`` (the run already lists this content
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
    """The path of ``run``'s resource. Raises ``ValueError`` for a name no URL path can carry
    (empty, ``.`` or ``..``: HTTP clients and servers normalise those segments away); the
    server refuses other unusable names itself, naming the rule."""
    if not isinstance(run, str) or run in ("", ".", ".."):
        raise ValueError(f"run: {run!r} is not usable as a run name")
    return f"/runs/{quote(run, safe='')}"


def snapshots_of(snapshots: object) -> list[Snapshot]:
    """``snapshots`` (one :class:`Snapshot` or an iterable of them) as a list; a
    ``TypeError`` naming the type of anything else (raw bytes, a dict, a state dict)."""
    if isinstance(snapshots, Snapshot):
        return [snapshots]
    if isinstance(snapshots, (bytes, bytearray, memoryview, str, Mapping)) or not isinstance(
        snapshots, Iterable
    ):
        raise TypeError(
            "upload() takes a Snapshot or a list of them (PowerEMA.snapshot(), "
            f"Snapshot.from_bytes(data)), not {type(snapshots).__name__}"
        )
    items = list(snapshots)
    for i, item in enumerate(items):
        if not isinstance(item, Snapshot):
            raise TypeError(
                f"upload(): item {i} is a {type(item).__name__}, not a Snapshot "
                "(PowerEMA.snapshot(), Snapshot.from_bytes(data))"
            )
    return items


def _nbytes(snap: Snapshot) -> int:
    """The file size of ``snap`` (its ``nbytes`` where the Snapshot knows it unserialised)."""
    n = getattr(snap, "nbytes", None)
    return int(n) if n is not None else len(snap.data)


def _write_snapshot(snap: Snapshot, f: BinaryIO) -> str:
    """Writes ``snap``'s file to ``f``; its BLAKE3 digest."""
    write_to = getattr(snap, "write_to", None)
    if write_to is not None:
        return str(write_to(f))
    f.write(snap.data)
    return snap.digest


def _release(snap: Snapshot) -> None:
    release = getattr(snap, "release", None)
    if release is not None:
        release()


def _released(snap: Snapshot) -> bool:
    """Whether ``snap`` can no longer be written: it gave its tensors back (a tracker's
    snapshot, once spooled) and its bytes were never built (``.data``)."""
    # Snapshot (snapshot.py) has no public flag for this; both attributes are its own.
    gone = bool(getattr(snap, "_was_released", False))
    return gone and getattr(snap, "_data", None) is None


class _Retry(Exception):
    """An attempt failed in a way a later attempt may not; ``wait``: ``Retry-After``."""

    def __init__(self, failure: Exception, wait: float | None = None) -> None:
        super().__init__(str(failure))
        self.failure = failure
        self.wait = wait


@dataclass
class _Queued:
    future: Future[UploadResult]
    run: str
    snap: Snapshot
    check_finite: bool
    nbytes: int
    spooled: threading.Event
    error: BaseException | None = None


class Uploader:
    """The spool of one Client, its spooler and sender threads (started on the first upload,
    or at once when the spool holds what an earlier process left).

    Args:
        transport: the server.
        spool_dir: the spool directory (created if missing).
        spool_max_bytes: bound on the spool's files plus the snapshots queued for it.
        max_pending: snapshots that may wait to be spooled; ``upload`` blocks while more do.
        bytes_per_second: cap on the upload rate (``None``: as fast as the network goes).
        backoff: the first wait after a failed attempt, in seconds.
        max_backoff: the longest wait between attempts, in seconds.
        on_error: called for each refused snapshot (see :data:`ErrorCallback`).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        spool_dir: Path,
        spool_max_bytes: int,
        max_pending: int,
        bytes_per_second: float | None,
        backoff: float,
        max_backoff: float,
        on_error: ErrorCallback | None,
    ) -> None:
        self._transport = transport
        self._rate = bytes_per_second
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._on_error = on_error
        self._max_pending = max_pending
        self._max_bytes = spool_max_bytes
        self._spool_dir = Path(spool_dir)
        self._cond = threading.Condition()
        self._commit_lock = threading.Lock()  # a spool commit, or a scan of the spool's size
        self._queue: deque[_Queued] = deque()
        self._uses: dict[int, int] = {}  # queued uploads per snapshot object, by id()
        self._writing = 0  # snapshots taken off the queue, not yet committed
        self._queued_bytes = 0
        self._disk_bytes = 0
        self._futures: dict[str, Future[UploadResult]] = {}  # own entries' futures, by id
        self._results: list[UploadResult] = []  # not reported yet
        self._failures: list[BaseException] = []  # not raised yet
        self._written = 0  # entries committed by this Client (a generation count)
        self._scanned = -1  # the generation the sender's last look at the spool covered
        self._sendable = 0  # entries that look was left with
        self._failing_since: float | None = None
        self._stop = threading.Event()
        self._closed = False
        self._spooler: threading.Thread | None = None
        self._sender: threading.Thread | None = None
        # A spool that cannot be made (an unwritable cache directory) fails the uploads,
        # not the Client: it may be used for everything else.
        self._unusable: HindsightError | None = None
        try:
            self.spool = Spool(spool_dir)
            self.spool.clean()
            self._owner = self.spool.register_owner()
            self._disk_bytes = self.spool.used_bytes()
            left = any(self._mine_or_orphan(e, {}) for e in self.spool.entries())
        except (HindsightError, OSError) as e:
            self._unusable = (
                e
                if isinstance(e, HindsightError)
                else HindsightError(f"the upload spool {spool_dir} is unusable: {e}")
            )
            log.warning("%s; uploads through the spool will fail", self._unusable)
            return
        if left:
            with self._cond:
                self._start_sender()

    @property
    def spool_dir(self) -> Path:
        return self._spool_dir

    @property
    def unusable(self) -> HindsightError | None:
        """Why the spool cannot be used (``None`` when it can)."""
        return self._unusable

    # -- the training thread's side -----------------------------------------------------------

    def upload(
        self,
        run: str,
        snapshots: Snapshot | Iterable[Snapshot],
        *,
        check_finite: bool,
        durable: bool,
    ) -> list[Future[UploadResult]]:
        """Queues snapshots for the spool; one future per snapshot (see
        :meth:`Client.upload`)."""
        if not isinstance(run, str) or not run:
            raise TypeError(f"upload(): run must be a non-empty str, not {run!r}")
        items = snapshots_of(snapshots)
        for snap in items:
            if _released(snap):
                raise HindsightError(
                    f"snapshot at nimg {snap.nimg} sigma_rel {snap.sigma_rel} was released: a "
                    "tracker's snapshot gives its tensors back once it is in the spool. To "
                    "upload one more than once (to other runs), read s.data before the first "
                    "upload (kept after release), or upload Snapshot.from_bytes(s.data) copies"
                )
        if self._unusable is not None:
            raise HindsightError(str(self._unusable)) from self._unusable
        sizes = [_nbytes(s) for s in items]
        queued: list[_Queued] = []
        with self._cond:
            if self._closed:
                raise HindsightError("this Client is closed")
            used = self._disk_bytes + self._queued_bytes
            if used + sum(sizes) > self._max_bytes:
                raise SpoolFull(
                    f"the upload spool {self.spool.root} holds {used} bytes and would exceed "
                    f"its bound of {self._max_bytes} bytes with these {len(items)} snapshot(s) "
                    f"({sum(sizes)} bytes); nothing was queued. The server is probably "
                    "unreachable or slow (see the log); raise the bound with "
                    "Client(spool_max_bytes=...) or free disk space",
                    str(self.spool.root),
                    self._max_bytes,
                    used,
                )
            while self._queue and len(self._queue) + len(items) > self._max_pending:
                self._cond.wait()
            for snap, size in zip(items, sizes, strict=True):
                q = _Queued(Future(), run, snap, check_finite, size, threading.Event())
                q.future.set_running_or_notify_cancel()
                queued.append(q)
                self._queue.append(q)
                self._queued_bytes += size
                self._uses[id(snap)] = self._uses.get(id(snap), 0) + 1
            if self._spooler is None:
                self._spooler = threading.Thread(
                    target=self._spool_loop, name="hindsight-spool", daemon=True
                )
                self._spooler.start()
            self._start_sender()
            self._cond.notify_all()
        if durable:
            for q in queued:
                q.spooled.wait()
            failed = [q.error for q in queued if q.error is not None]
            if failed:
                with self._cond:  # raised here, so not again by flush()
                    self._failures = [e for e in self._failures if e not in failed]
                raise failed[0]
        return [q.future for q in queued]

    def _start_sender(self) -> None:
        if self._sender is None:
            self._sender = threading.Thread(
                target=self._send_loop, name="hindsight-upload", daemon=True
            )
            self._sender.start()

    # -- the spooler thread -------------------------------------------------------------------

    def _spool_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    if self._closed:
                        return
                    self._cond.wait()
                q = self._queue.popleft()
                self._writing += 1
                self._cond.notify_all()
                # Known before the entry exists: the sender may send it at once.
                entry_id = self.spool.new_id()
                self._futures[entry_id] = q.future
            entry: SpoolEntry | None = None
            try:
                entry = self.spool.write(
                    q.run,
                    q.snap.nimg,
                    q.snap.sigma_rel,
                    q.snap.file_name(),
                    lambda f, snap=q.snap: _write_snapshot(snap, f),  # type: ignore[misc]
                    q.check_finite,
                    self._owner.token,
                    entry_id,
                    lambda e, q=q: self._committing(e, q),  # type: ignore[misc]
                )
            except BaseException as e:
                q.error = e
                log.error(
                    "could not spool snapshot nimg %s sigma_rel %s of run %s into %s: %s",
                    q.snap.nimg,
                    q.snap.sigma_rel,
                    q.run,
                    self.spool.root,
                    e,
                )
            with self._cond:
                self._uses[id(q.snap)] -= 1
                last = self._uses[id(q.snap)] == 0
                if last:
                    del self._uses[id(q.snap)]
            # Its buffers go back once its last queued upload (another run's) is spooled.
            if entry is not None and last:
                try:
                    _release(q.snap)
                except Exception as e:
                    log.warning("releasing snapshot nimg %s failed: %s", q.snap.nimg, e)
            with self._cond:
                self._writing -= 1
                if entry is not None:
                    self._written += 1
                else:
                    assert q.error is not None
                    self._queued_bytes -= q.nbytes
                    self._futures.pop(entry_id, None)
                    self._failures.append(q.error)
                    q.future.set_exception(q.error)
                q.spooled.set()
                self._cond.notify_all()

    @contextlib.contextmanager
    def _committing(self, entry: SpoolEntry, q: _Queued) -> Iterator[None]:
        """Around the rename that commits ``entry``: its bytes move from queued to on disk,
        atomically with the rename as the sender's scans see it."""
        with self._commit_lock:
            yield
            with self._cond:
                self._queued_bytes -= q.nbytes
                self._disk_bytes += entry.bytes

    # -- the sender thread --------------------------------------------------------------------

    def _mine_or_orphan(self, entry: SpoolEntry, alive: dict[str, bool]) -> bool:
        """Whether this Client sends ``entry``: it spooled it, or its owner is gone."""
        if entry.owner == self._owner.token:
            return True
        if entry.owner not in alive:
            alive[entry.owner] = self.spool.owner_alive(entry.owner)
        return not alive[entry.owner]

    def _send_loop(self) -> None:
        http = self._transport.new_http()
        attempt = 0
        last_log = 0.0
        try:
            while not self._stop.is_set():
                with self._cond:
                    generation = self._written
                alive: dict[str, bool] = {}
                todo = [e for e in self.spool.entries() if self._mine_or_orphan(e, alive)]
                with self._commit_lock:  # no commit counted twice (by the scan and the spooler)
                    disk = self.spool.used_bytes()
                    with self._cond:
                        self._disk_bytes = disk
                with self._cond:
                    self._scanned = generation
                    self._sendable = len(todo)
                    self._cond.notify_all()
                    if not todo:
                        if self._written == generation:
                            self._cond.wait(_IDLE_SCAN)
                        continue
                for entry in todo:
                    if self._stop.is_set():
                        return
                    claim = self.spool.claim(entry)
                    if claim is None:  # another sender holds it, or it is gone
                        self._done_with(entry, None, None)
                        continue
                    try:
                        result = self._send(http, entry)
                    except _Retry as r:
                        claim.release()
                        attempt += 1
                        now = time.monotonic()
                        if self._failing_since is None:
                            self._failing_since = now
                            last_log = now
                            log.warning(
                                "uploads to %s are failing (%s); %d snapshot(s) wait in the "
                                "spool %s, retried until the server takes them",
                                self._transport.url,
                                r.failure,
                                len(todo),
                                self.spool.root,
                            )
                        elif now - last_log >= _LOG_EVERY:
                            last_log = now
                            log.warning(
                                "uploads to %s still failing after %.0f s (%s); %d snapshot(s) "
                                "wait in the spool %s",
                                self._transport.url,
                                now - self._failing_since,
                                r.failure,
                                len(todo),
                                self.spool.root,
                            )
                        with self._cond:
                            self._cond.notify_all()  # close() stops waiting for a failing sender
                        self._stop.wait(self._delay(attempt, r.wait))
                        break
                    except Exception as e:  # a refusal: kept aside, reported
                        self._refused(claim, e)
                    else:
                        self.spool.remove(claim)
                        self._done_with(entry, result, None)
                    if self._failing_since is not None:
                        log.warning(
                            "uploads to %s work again after %.0f s; sending the spooled snapshots",
                            self._transport.url,
                            time.monotonic() - self._failing_since,
                        )
                        self._failing_since = None
                    attempt = 0
        except BaseException as e:  # a bug: say so rather than hang flush()
            log.exception("the upload thread stopped")
            with self._cond:
                self._failures.append(HindsightError(f"the upload thread stopped: {e!r}"))
                self._stop.set()
                self._cond.notify_all()
        finally:
            http.close()

    def _delay(self, attempt: int, wait: float | None) -> float:
        """The pause before attempt ``attempt + 1``: ``backoff`` doubled per failure, at most
        ``max_backoff``, times a random factor in [0.5, 1) (so many clients spread out);
        at least the server's ``Retry-After``."""
        cap = min(self._max_backoff, self._backoff * 2.0 ** min(attempt - 1, 60))
        delay = cap * random.uniform(0.5, 1.0)
        if wait is not None:
            delay = max(delay, min(wait, _MAX_RETRY_AFTER))
        return delay

    def _done_with(
        self, entry: SpoolEntry, result: UploadResult | None, error: BaseException | None
    ) -> None:
        with self._cond:
            self._sendable = max(0, self._sendable - 1)
            future = self._futures.pop(entry.id, None) if result or error else None
            if result is not None:
                self._disk_bytes = max(0, self._disk_bytes - entry.bytes)
                self._results.append(result)
                if future is not None:
                    future.set_result(result)
            if error is not None:
                self._disk_bytes = max(0, self._disk_bytes - entry.bytes)
                self._failures.append(error)
                if future is not None:
                    future.set_exception(error)
            self._cond.notify_all()

    def _refused(self, claim: Claim, error: Exception) -> None:
        entry = claim.entry
        try:
            moved = self.spool.reject(claim, error)
        except OSError as e:
            log.error("could not move the refused entry %s aside: %s", entry.path, e)
            moved = entry
        error.add_note(f"(the refused snapshot is kept in {moved.path})")
        log.error(
            "the server refused snapshot nimg %d sigma_rel %s of run %s: %s; kept in %s",
            entry.nimg,
            entry.sigma_rel,
            entry.run,
            error,
            moved.path,
        )
        if self._on_error is not None:
            try:
                self._on_error(entry.run, moved, error)
            except Exception:
                log.exception("on_error raised")
        self._done_with(entry, None, error)

    def _listed(self, http: httpx.Client, run: str, digest: str, nimg: int, sr: float) -> bool:
        """Whether ``run`` already holds content ``digest`` at (``nimg``, ``sr``)."""
        head = _attempt(lambda: http.head(f"/blobs/{digest}"))
        if head.status_code == 404:
            return False
        raise_for_status(head)
        listing = _attempt(lambda: http.get(f"{run_path(run)}/snapshots"))
        if listing.status_code == 404:
            return False
        rows = [SnapshotKey.from_json(row) for row in raise_for_status(listing).json()]
        return any(
            row.digest == digest
            and row.nimg == nimg
            and math.isclose(row.sigma_rel, sr, rel_tol=1e-12)
            for row in rows
        )

    def _send(self, http: httpx.Client, entry: SpoolEntry) -> UploadResult:
        """One attempt at ``entry``: its result, :class:`_Retry`, or the refusal."""

        def result(status: UploadStatus, digest: str) -> UploadResult:
            return UploadResult(entry.run, entry.nimg, entry.sigma_rel, digest, entry.bytes, status)

        if self._listed(http, entry.run, entry.digest, entry.nimg, entry.sigma_rel):
            return result("skipped", entry.digest)
        size = entry.data_path.stat().st_size
        if size != entry.bytes:
            raise HindsightError(
                f"the spooled file {entry.data_path} has {size} bytes, its entry says "
                f"{entry.bytes}: damaged on disk"
            )
        params = post_params(entry.nimg, entry.sigma_rel, entry.file, entry.check_finite)
        with open(entry.data_path, "rb") as f:
            response = _attempt(
                lambda: http.post(
                    f"{run_path(entry.run)}/snapshots",
                    params=params,
                    content=self._file_body(f),
                    headers={
                        "Content-Length": str(size),
                        "Content-Type": "application/octet-stream",
                    },
                )
            )
        return result(*ingested(entry.run, entry.digest, raise_for_status(response)))

    def _file_body(self, f: BinaryIO) -> Iterator[bytes]:
        chunk = self._transport.chunk
        start = time.monotonic()
        sent = 0
        while True:
            if self._rate is not None:
                pause = start + sent / self._rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            piece = f.read(chunk)
            if not piece:
                return
            sent += len(piece)
            yield piece

    # -- synchronous uploads --------------------------------------------------------------------

    def upload_one(
        self, http: httpx.Client, run: str, snap: Snapshot, check_finite: bool
    ) -> UploadResult:
        """Uploads ``snap`` on ``http`` now, unless the run lists it already (no spool; the
        transport's retries; errors raised here)."""
        if not isinstance(snap, Snapshot):
            raise TypeError(f"upload_now() takes a Snapshot, not {type(snap).__name__}")
        data = snap.data

        def result(status: UploadStatus, digest: str) -> UploadResult:
            return UploadResult(run, snap.nimg, snap.sigma_rel, digest, len(data), status)

        def listed() -> bool:
            try:
                return self._listed(http, run, snap.digest, snap.nimg, snap.sigma_rel)
            except _Retry as r:
                raise r.failure from None

        if self._transport.with_retries(f"HEAD /blobs/{snap.digest}", _retryable(listed)):
            return result("skipped", snap.digest)
        response = self._transport.send(
            "POST",
            f"{run_path(run)}/snapshots",
            http=http,
            params=post_params(snap.nimg, snap.sigma_rel, snap.file_name(), check_finite),
            body=lambda: self._bytes_body(data),
            headers={"Content-Length": str(len(data)), "Content-Type": "application/octet-stream"},
        )
        return result(*ingested(run, snap.digest, raise_for_status(response)))

    def _bytes_body(self, data: bytes) -> Iterator[bytes]:
        view = memoryview(data)
        chunk = self._transport.chunk
        start = time.monotonic()
        for offset in range(0, len(view), chunk):
            if self._rate is not None:
                pause = start + offset / self._rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            yield bytes(view[offset : offset + chunk])

    # -- waiting --------------------------------------------------------------------------------

    def _busy(self) -> bool:
        """Whether anything is queued, being spooled, or waiting in the spool for this
        Client's sender (caller holds the lock)."""
        if self._queue or self._writing:
            return True
        return self._sender is not None and (self._scanned != self._written or self._sendable > 0)

    def _report(self) -> list[UploadResult]:
        """The results not reported before, or the first failure not raised before (caller
        holds the lock)."""
        failed, self._failures = self._failures, []
        if failed:
            first = failed[0]
            if len(failed) > 1:
                first.add_note(f"({len(failed) - 1} further upload(s) failed as well)")
            raise first
        results, self._results = self._results, []
        return results

    def flush(self, timeout: float | None = None) -> list[UploadResult]:
        """Waits until the queue and the spool are drained (this Client's snapshots and those
        earlier processes left) or ``timeout`` seconds pass (``TimeoutError``); returns the
        results not reported before, or raises the first refusal not raised before."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._unusable is not None:
                return self._report()
            self._start_sender()
            self._cond.notify_all()
            while self._busy() and not self._stop.is_set():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    waiting = len(self._queue) + self._writing + self._sendable
                    if self._failures:
                        return self._report()
                    raise TimeoutError(
                        f"{waiting} snapshot(s) still waiting after {timeout} s (spool "
                        f"{self.spool.root}); they stay spooled and are sent later"
                    )
                self._cond.wait(1.0 if left is None else min(left, 1.0))
            return self._report()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        with self._cond:
            return self._closed

    def close(self) -> None:
        """Waits until every queued snapshot is in the spool (durable), then for the sender
        only while it makes progress: with the server unreachable it returns at once and the
        spooled files wait for the next Client on this spool. Stops the threads, and raises
        the first refusal not raised before. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            if self._unusable is not None:
                return
            self._cond.notify_all()
            while self._queue or self._writing:
                self._cond.wait()
            while self._busy() and self._failing_since is None and not self._stop.is_set():
                self._cond.wait(1.0)
            self._stop.set()
            self._cond.notify_all()
        left = [e for e in self.spool.entries() if self._mine_or_orphan(e, {})]
        if left:
            log.warning(
                "%d snapshot(s) stay in the upload spool %s; the next Client on this spool "
                "sends them",
                len(left),
                self.spool.root,
            )
        self._owner.release()
        with self._cond:
            self._report()


def _attempt(request: Callable[[], httpx.Response]) -> httpx.Response:
    """One request of the sender: the response, or :class:`_Retry` for a broken connection,
    5xx, 408 or 429 (with the ``Retry-After`` it asks for)."""
    try:
        response = request()
    except httpx.TransportError as e:
        raise _Retry(TransportError(f"{type(e).__name__}: {e}")) from e
    if response.status_code >= 500 or response.status_code in (408, 429):
        raise _Retry(error_from(response), retry_after(response))
    return response


def _retryable(fn: Callable[[], bool]) -> Callable[[], bool]:
    """``fn`` for :meth:`Transport.with_retries`: its retryable failures marked so."""

    def attempt() -> bool:
        try:
            return fn()
        except (TransportError, ApiError) as e:
            if isinstance(e, TransportError) or e.status in RETRY_STATUSES:
                raise _RetryableError(e) from e
            raise

    return attempt


def post_params(nimg: int, sigma_rel: float, file: str, check_finite: bool) -> dict[str, Any]:
    """The query of ``POST /runs/{run}/snapshots``."""
    params: dict[str, Any] = {"nimg": nimg, "sigma_rel": repr(sigma_rel), "filename": file}
    if check_finite:
        params["check_finite"] = "true"
    return params


def ingested(run: str, digest: str, response: httpx.Response) -> tuple[UploadStatus, str]:
    """The status and stored digest an upload's answer gives. A new row (201) must hold our
    bytes; a no-op (200) may name the stored file's digest (equal tensors, other bytes)."""
    stored = Ingested.from_json(response.json())
    if stored.inserted and stored.digest != digest:
        raise DigestMismatch(f"upload to {run}", digest, stored.digest)
    return ("stored" if stored.inserted else "already_stored"), stored.digest


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
