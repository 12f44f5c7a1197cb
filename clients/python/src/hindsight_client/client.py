"""The HTTP client for ``hindsight serve``: upload snapshots, reconstruct, download weights,
and run FID/KID sweeps over EMA widths.

The API is described in the repository's top-level README ("Serving") and, generated from
the server's handlers, at ``GET /openapi.json``. Writes (uploads, ``POST /reconstruct``)
need ``Authorization: Bearer <token>`` when the server has a token file; reads do not.

Sweeps are followed through their server-sent events on a reader thread (so a deadline holds
however quiet the stream is); a stream that drops is replaced by polling ``GET /sweeps/{id}``
and reopened, and the caller sees one sequence of events either way.

Uploads run on one background thread fed by a bounded queue, so the training loop only pays
for serialising the snapshot: ``upload`` returns futures at once (it waits only while
``max_pending`` snapshots are already queued, which bounds the memory they hold), and
``flush``/``close`` wait for the queue to drain and raise the first failure.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, TypeVar
from urllib.parse import quote

import blake3
import httpx
import numpy as np
import safetensors.numpy

from .errors import (
    ApiError,
    DigestMismatch,
    HindsightError,
    ReconstructionTimeout,
    SweepCancelled,
    SweepFailed,
    SweepTimeout,
    TransportError,
    api_error,
)
from .snapshot import Snapshot
from .sweeps import (
    ProgressCallback,
    Reference,
    Sweep,
    SweepMetric,
    SweepPoint,
    SweepWatch,
    parse_sse,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger("hindsight_client")

T = TypeVar("T")

Dtype = Literal["f32", "f16", "bf16"]
UploadStatus = Literal["stored", "already_stored", "skipped"]

# Statuses worth another try: the server or a proxy in front of it is busy or restarting.
# 500 is not among them: the server uses it for failures that another try does not fix.
_RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
# For requests that are not idempotent (creating a sweep or reference statistics): only the
# answers that say the request was not acted on. A proxy's 502/504 does not say that.
_UNSENT_STATUSES = frozenset({408, 429, 503})


@dataclass(frozen=True)
class UploadResult:
    """What became of one uploaded snapshot.

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


@dataclass(frozen=True)
class ReportInput:
    """One stored snapshot a reconstruction used, with its coefficient."""

    digest: str
    nimg: int
    sigma_rel: float
    weight: float


@dataclass(frozen=True)
class ReportWarning:
    """A reason to look twice: ``large_profile_error``, ``large_noise_gain``,
    ``ill_conditioned``, ``dependent_snapshots`` or ``clamped_out_of_range``."""

    code: str
    message: str


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
        raw: the report as the server sent it.
    """

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
    clamped: list[dict[str, Any]]
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, r: dict[str, Any]) -> Report:
        return cls(
            sigma_rel=float(r["sigma_rel"]),
            gamma=float(r["gamma"]),
            nimg=int(r["nimg"]),
            used_snapshots=int(r["used_snapshots"]),
            relative_error=float(r["relative_error"]),
            coefficient_l1=float(r["coefficient_l1"]),
            noise_gain=float(r["noise_gain"]),
            condition_number=float(r["condition_number"]),
            dependent_snapshots=list(r.get("dependent_snapshots", [])),
            warnings=[ReportWarning(w["code"], w["message"]) for w in r.get("warnings", [])],
            inputs=[
                ReportInput(i["digest"], int(i["nimg"]), float(i["sigma_rel"]), float(i["weight"]))
                for i in r.get("inputs", [])
            ],
            clamped=list(r.get("clamped", [])),
            raw=r,
        )


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

    id: str
    run: str
    nimg: int
    sigma_rel: float
    gamma: float
    dtype: str
    digest: str
    byte_size: int
    file_name: str
    cached: bool
    report: Report
    weights_url: str = field(repr=False)
    _client: Client = field(repr=False, compare=False)

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


def _is_limit_reached(response: httpx.Response) -> bool:
    """Whether a 429 says a configured bound is reached (``limit_reached``: e.g. too many
    unfinished sweeps), which waiting a few seconds does not change: not retried."""
    if response.status_code != 429:
        return False
    try:
        return response.json()["error"]["code"] == "limit_reached"
    except (ValueError, KeyError, TypeError):
        return False


class _RetryableError(Exception):
    """One attempt failed in a way another attempt may not (carries the failure)."""

    def __init__(self, failure: Exception) -> None:
        super().__init__(str(failure))
        self.failure = failure


def _error_from(response: httpx.Response) -> ApiError:
    code, message = "http_error", response.reason_phrase or ""
    try:
        body = response.json()
        code = str(body["error"]["code"])
        message = str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()
        if text:
            message = text[:500]
    return api_error(
        response.status_code, code, message, response.request.method, str(response.request.url)
    )


def _raise_for_status(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise _error_from(response)
    return response


def _check_open(http: httpx.Client) -> None:
    if http.is_closed:
        raise HindsightError("this Client is closed; make a new one")


def _run_path(run: str) -> str:
    return f"/runs/{quote(run, safe='')}"


def _sweep_id(sweep: Sweep | int) -> int:
    if isinstance(sweep, Sweep):
        return sweep.id
    if isinstance(sweep, bool) or not isinstance(sweep, int) or sweep <= 0:
        raise ValueError(f"a sweep is a Sweep or its id (a positive int), not {sweep!r}")
    return sweep


def _shutdown(response: httpx.Response) -> None:
    """Shuts the response's socket down, which wakes a thread blocked reading it (closing the
    socket alone does not)."""
    try:
        stream = response.extensions["network_stream"]
        sock = stream.get_extra_info("socket")
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except (KeyError, AttributeError, OSError):
        pass


_StreamItem = tuple[str, Any] | Exception | None


class _EventStream:
    """The server-sent events of ``path``, read on a daemon thread into a queue: ``(name,
    data)`` per event, then ``None`` when the server closes the stream, or the exception
    that ended it (an :class:`ApiError` for an error answer)."""

    def __init__(self, http: httpx.Client, path: str) -> None:
        self._http = http
        self._items: Queue[_StreamItem] = Queue()
        self._response: httpx.Response | None = None
        self._closed = threading.Event()
        threading.Thread(
            target=self._read, args=(path,), name="hindsight-sweep-events", daemon=True
        ).start()

    def _read(self, path: str) -> None:
        try:
            with self._http.stream(
                "GET", path, headers={"Accept": "text/event-stream"}
            ) as response:
                self._response = response
                if self._closed.is_set():
                    return
                if response.status_code >= 400:
                    response.read()
                    self._items.put(_error_from(response))
                    return
                for item in parse_sse(response.iter_lines()):
                    if self._closed.is_set():
                        return
                    self._items.put(item)
            self._items.put(None)
        except Exception as e:
            self._items.put(e)

    def get(self, timeout: float | None) -> _StreamItem:
        """The next item; raises :class:`queue.Empty` after ``timeout`` seconds."""
        return self._items.get(timeout=timeout)

    def close(self) -> None:
        self._closed.set()
        response = self._response
        if response is not None:
            _shutdown(response)
        self._http.close()


class Client:
    """A client for one ``hindsight serve``.

    Args:
        url: the server, e.g. ``"http://127.0.0.1:8080"``.
        token: bearer token for writes (from ``hindsight token new``); ``None`` for a server
            without tokens.
        timeout: seconds a connection, read or write may stall before the attempt fails.
        retries: further attempts after a connection failure or a 408/429/502/503/504
            answer, waiting ``backoff``, then twice as long each time (at most 30 s).
            Uploads and reconstructions are idempotent, so retrying them is safe.
        backoff: the first wait between attempts, in seconds.
        max_pending: snapshots that may wait in the upload queue; ``upload`` blocks only
            while the queue is full (each queued snapshot holds its bytes in memory).
        upload_bytes_per_second: cap on the upload rate (``None``: as fast as the network
            goes), to leave bandwidth to the training job.
        chunk_bytes: size of the pieces an upload body is streamed in.

    Use it as a context manager, or call :meth:`close`, so queued uploads finish.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_pending: int = 8,
        upload_bytes_per_second: float | None = None,
        chunk_bytes: int = 1 << 20,
    ) -> None:
        if retries < 0 or backoff < 0 or max_pending < 1 or chunk_bytes < 1:
            raise ValueError("retries, backoff must be ≥ 0; max_pending, chunk_bytes ≥ 1")
        if upload_bytes_per_second is not None and not upload_bytes_per_second > 0:
            raise ValueError("upload_bytes_per_second must be positive")
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._retries = retries
        self._backoff = backoff
        self._rate = upload_bytes_per_second
        self._chunk = chunk_bytes
        self._http = self._new_http()
        self._queue: Queue[tuple[Future[UploadResult], str, Snapshot, bool] | None] = Queue(
            maxsize=max_pending
        )
        self._pending: list[Future[UploadResult]] = []
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._closed = False
        # Queued uploads still finish when the interpreter exits without close().
        ref = weakref.ref(self)

        def at_exit() -> None:
            client = ref()
            if client is not None:
                client._close_quietly()

        self._atexit = at_exit
        atexit.register(at_exit)

    def _new_http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self._headers, timeout=self._timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests with retries ------------------------------------------------------------

    def _with_retries(self, what: str, attempt: Callable[[], T]) -> T:
        """Runs ``attempt`` until it returns, retrying on :class:`_RetryableError` with exponential
        backoff; raises the last failure (as :class:`TransportError` for broken connections)."""
        delay = self._backoff
        for n in range(self._retries + 1):
            try:
                return attempt()
            except _RetryableError as r:
                failure = r.failure
            if n == self._retries:
                break
            log.warning("%s failed (%s); retrying in %.1f s", what, failure, delay)
            time.sleep(delay)
            delay = min(2 * delay, 30.0)
        if isinstance(failure, ApiError):
            raise failure
        raise TransportError(f"{what}: {failure} (after {self._retries + 1} attempts)") from failure

    def _send(
        self,
        http: httpx.Client,
        method: str,
        path: str,
        *,
        body: Callable[[], Iterator[bytes]] | None = None,
        idempotent: bool = True,
        **kwargs: Any,
    ) -> httpx.Response:
        """One request with retries; the response of any status but the retried ones.
        ``body`` makes a fresh body iterator for each attempt. A request that is not
        ``idempotent`` is retried only when it cannot have reached the server (no
        connection) or the server says it did not act on it (408, 429, 503)."""
        _check_open(http)
        statuses = _RETRY_STATUSES if idempotent else _UNSENT_STATUSES

        def attempt() -> httpx.Response:
            try:
                content = body() if body is not None else None
                response = http.request(method, path, content=content, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                raise _RetryableError(e) from e
            except httpx.TransportError as e:
                if idempotent:
                    raise _RetryableError(e) from e
                raise TransportError(
                    f"{method} {path}: {e}; the server may have acted on it, so it is not "
                    "sent again"
                ) from e
            if response.status_code in statuses and not _is_limit_reached(response):
                raise _RetryableError(_error_from(response))
            return response

        return self._with_retries(f"{method} {path}", attempt)

    def _fetch(
        self, path: str, digest: str, restart: Callable[[], Callable[[bytes], object]]
    ) -> None:
        """Streams the GET of ``path`` into the sink ``restart()`` returns (called afresh for
        each attempt), hashing as it goes; raises :class:`DigestMismatch` unless the bytes
        hash to ``digest``."""
        _check_open(self._http)

        def attempt() -> str:
            hasher = blake3.blake3()
            try:
                with self._http.stream("GET", path) as response:
                    if response.status_code in _RETRY_STATUSES:
                        response.read()
                        raise _RetryableError(_error_from(response))
                    if response.status_code >= 400:
                        response.read()
                        raise _error_from(response)
                    write = restart()
                    for chunk in response.iter_bytes(self._chunk):
                        hasher.update(chunk)
                        write(chunk)
            except httpx.TransportError as e:
                raise _RetryableError(e) from e
            return hasher.hexdigest()

        actual = self._with_retries(f"GET {path}", attempt)
        if actual != digest:
            raise DigestMismatch(f"GET {path}", digest, actual)

    # -- uploads ----------------------------------------------------------------------------

    def upload(
        self, run: str, snapshots: Snapshot | Iterable[Snapshot], *, check_finite: bool = False
    ) -> list[Future[UploadResult]]:
        """Queues snapshots for upload into ``run`` (created on its first snapshot) and
        returns one future per snapshot at once.

        On the background thread, each snapshot is skipped if the run already lists its
        content at its (nimg, σ_rel) (``HEAD /blobs/{digest}`` first, so new content costs one
        small request), else streamed as the body of ``POST /runs/{run}/snapshots``, retried
        on connection failures. ``check_finite`` asks the server to refuse NaN/Inf.

        A failure (e.g. :class:`~hindsight_client.errors.Unauthorized`,
        :class:`~hindsight_client.errors.Conflict`) is raised by its future, by the next
        ``upload`` call, and by :meth:`flush` / :meth:`close` — each failure once.
        """
        items = [snapshots] if isinstance(snapshots, Snapshot) else list(snapshots)
        self._raise_failures(wait=False)
        futures: list[Future[UploadResult]]
        with self._lock:
            if self._closed:
                raise HindsightError("this Client is closed")
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._upload_loop, name="hindsight-upload", daemon=True
                )
                self._worker.start()
            futures = [Future() for _ in items]
            self._pending += futures
        for future, snap in zip(futures, items, strict=True):
            self._queue.put((future, run, snap, check_finite))
        return futures

    def upload_now(
        self, run: str, snapshot: Snapshot, *, check_finite: bool = False
    ) -> UploadResult:
        """Uploads one snapshot on the calling thread (what the background thread does for
        each queued snapshot)."""
        return self._upload_one(self._http, run, snapshot, check_finite)

    def _upload_loop(self) -> None:
        with self._new_http() as http:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                future, run, snap, check_finite = item
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(self._upload_one(http, run, snap, check_finite))
                except Exception as e:
                    future.set_exception(e)

    def _listed(self, http: httpx.Client, run: str, snap: Snapshot) -> bool:
        """Whether ``run`` already holds ``snap``'s content at its time and width."""
        head = self._send(http, "HEAD", f"/blobs/{snap.digest}")
        if head.status_code == 404:
            return False
        _raise_for_status(head)
        listing = self._send(http, "GET", f"{_run_path(run)}/snapshots")
        if listing.status_code == 404:
            return False
        return any(
            row["digest"] == snap.digest
            and row["nimg"] == snap.nimg
            and math.isclose(row["sigma_rel"], snap.sigma_rel, rel_tol=1e-12)
            for row in _raise_for_status(listing).json()
        )

    def _body(self, data: bytes) -> Iterator[bytes]:
        view = memoryview(data)
        start = time.monotonic()
        for offset in range(0, len(view), self._chunk):
            if self._rate is not None:
                due = start + offset / self._rate
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            yield bytes(view[offset : offset + self._chunk])

    def _upload_one(
        self, http: httpx.Client, run: str, snap: Snapshot, check_finite: bool
    ) -> UploadResult:
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
        response = self._send(
            http,
            "POST",
            f"{_run_path(run)}/snapshots",
            params=params,
            body=lambda: self._body(snap.data),
            headers={
                "Content-Length": str(len(snap.data)),
                "Content-Type": "application/octet-stream",
            },
        )
        view = _raise_for_status(response).json()
        if view["digest"] != snap.digest:
            raise DigestMismatch(f"upload to {run}", snap.digest, view["digest"])
        return result("stored" if view["inserted"] else "already_stored", view["digest"])

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
        """Waits for every queued upload; returns the results not reported before, or
        raises the first failure among them."""
        return self._raise_failures(wait=True, timeout=timeout)

    def close(self) -> None:
        """Finishes the queued uploads (raising the first failure), stops the upload thread
        and closes the connections. Idempotent."""
        with self._lock:
            already, self._closed = self._closed, True
            worker = self._worker
        if already:
            return
        atexit.unregister(self._atexit)
        try:
            self._raise_failures(wait=True)
        finally:
            if worker is not None:
                self._queue.put(None)
                worker.join()
            self._http.close()

    def _close_quietly(self) -> None:
        try:
            self.close()
        except Exception as e:  # at exit there is no caller left to raise to
            log.error("uploads failed at exit: %s", e)

    # -- reading and reconstructing --------------------------------------------------------

    def _get_json(self, path: str) -> Any:
        return _raise_for_status(self._send(self._http, "GET", path)).json()

    def runs(self) -> list[dict[str, Any]]:
        """``GET /runs``: every run with its totals."""
        runs: list[dict[str, Any]] = self._get_json("/runs")
        return runs

    def snapshots(self, run: str) -> list[dict[str, Any]]:
        """``GET /runs/{run}/snapshots``: the run's snapshots (nimg, sigma_rel, digest, ...)."""
        rows: list[dict[str, Any]] = self._get_json(f"{_run_path(run)}/snapshots")
        return rows

    def has_blob(self, digest: str) -> bool:
        """``HEAD /blobs/{digest}``: whether the server stores this content."""
        response = self._send(self._http, "HEAD", f"/blobs/{digest}")
        if response.status_code == 404:
            return False
        _raise_for_status(response)
        return True

    def reconstruct(
        self,
        run: str,
        *,
        sigma_rel: float | None = None,
        gamma: float | None = None,
        nimg: int | None = None,
        dtype: Dtype = "f16",
        clamp_out_of_range: bool = False,
        wait_secs: float | None = None,
        timeout: float | None = None,
    ) -> Reconstruction:
        """Reconstructs the EMA of width ``sigma_rel`` (or exponent ``gamma``) of ``run`` at
        training time ``nimg`` (default: the run's last snapshot) from its stored snapshots.

        Returns when the weights are stored on the server: a 202 answer (work still running
        after ``wait_secs``, default the server's) is polled at ``status_url`` until ready or
        ``timeout`` seconds have passed (:class:`ReconstructionTimeout`; ``None`` waits as
        long as it takes). ``dtype`` is the element type of the float tensors; with ``f16``,
        values beyond ±65504 fail the request unless ``clamp_out_of_range``.
        """
        if (sigma_rel is None) == (gamma is None):
            raise ValueError("give exactly one of sigma_rel and gamma")
        if dtype not in ("f32", "f16", "bf16"):
            raise ValueError(f"dtype {dtype!r} is not one of 'f32', 'f16', 'bf16'")
        request: dict[str, Any] = {"run": run, "dtype": dtype}
        if sigma_rel is not None:
            request["sigma_rel"] = float(sigma_rel)
        else:
            request["gamma"] = float(gamma)  # type: ignore[arg-type]
        if nimg is not None:
            request["nimg"] = int(nimg)
        if clamp_out_of_range:
            request["clamp_out_of_range"] = True
        if wait_secs is not None:
            request["wait_secs"] = float(wait_secs)
        deadline = None if timeout is None else time.monotonic() + timeout
        response = _raise_for_status(self._send(self._http, "POST", "/reconstruct", json=request))
        view = response.json()
        # Whether the server had it before this request (a polled status says "cached" too).
        cached = response.status_code == 200 and bool(view["cached"])
        delay = 0.1
        while response.status_code == 202:
            log.info("reconstruction %s of run %s is being computed; polling", view["id"], run)
            if deadline is not None and time.monotonic() + delay > deadline:
                raise ReconstructionTimeout(
                    f"reconstruction {view['id']} of run {run} not ready after {timeout} s"
                )
            time.sleep(delay)
            delay = min(1.5 * delay, 5.0)
            response = _raise_for_status(self._send(self._http, "GET", view["status_url"]))
            view = response.json()
        return Reconstruction(
            id=view["id"],
            run=view["run"],
            nimg=int(view["nimg"]),
            sigma_rel=float(view["sigma_rel"]),
            gamma=float(view["gamma"]),
            dtype=view["dtype"],
            digest=view["digest"],
            byte_size=int(view["byte_size"]),
            file_name=view["file_name"],
            cached=cached,
            report=Report.from_json(view["report"]),
            weights_url=view["weights_url"],
            _client=self,
        )

    # -- sweeps: FID/KID of reconstructions over EMA widths ----------------------------------

    def start_sweep(
        self,
        run: str,
        sigma_rels: float | Sequence[float] | str,
        *,
        reference: str | int,
        nimgs: int | Sequence[int] | None = None,
        metrics: Sequence[SweepMetric] | None = None,
        num_images: int | None = None,
        seed_sets: int | None = None,
        steps: int | None = None,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        rho: float | None = None,
        batch: int | None = None,
        kid_subsets: int | None = None,
        kid_subset_size: int | None = None,
    ) -> Sweep:
        """Queues a sweep (``POST /sweeps``): for each EMA width in ``sigma_rels`` (and each
        training time in ``nimgs``), the server reconstructs the EMA of ``run``, samples
        ``num_images`` images per seed set with EDM's Heun sampler, and scores them against
        the ``reference`` statistics (a name or id, see :meth:`references`). Returns at once;
        follow it with :meth:`wait_sweep`.

        Args:
            sigma_rels: one width, a list, or EDM2's list syntax (``"0.05,0.10,...,0.25"``).
            nimgs: training times to reconstruct at (a 2-D sweep); default the run's last
                snapshot.
            metrics: ``"fid"``, ``"kid"``; default FID, and KID when the reference keeps its
                features.
            num_images: images per seed set; default 50 000 (or the server's cap). FID is
                biased upwards at few images: compare a sweep's points with each other.
            seed_sets: independent image sets (default 1); metrics are mean ± std over them.
            steps, sigma_min, sigma_max, rho: the sampler (defaults 32, 0.002, 80, 7).
            batch: images per batch (default 32): the unit of progress and resumption.
            kid_subsets, kid_subset_size: KID's random subsets (defaults 100, 1000).

        Raises :class:`~hindsight_client.errors.InvalidInput` (400) or
        :class:`~hindsight_client.errors.NotFound` (404: no such run or reference) with the
        server's message naming the field (``sigma_rels[1]``, ``reference``, ...), and
        :class:`~hindsight_client.errors.Unauthorized` without the right token. Creating a
        sweep is not idempotent, so it is retried only when the request cannot have reached
        the server; after a :class:`~hindsight_client.errors.TransportError`, see
        :meth:`sweeps` for whether it was made.
        """
        widths: float | list[float] | str
        if isinstance(sigma_rels, str):
            widths = sigma_rels
        elif isinstance(sigma_rels, (int, float)):
            widths = float(sigma_rels)
        else:
            widths = [float(v) for v in sigma_rels]
        if isinstance(reference, bool) or not isinstance(reference, (str, int)):
            raise ValueError(f"reference must be a name or an id, not {reference!r}")
        request: dict[str, Any] = {"run": run, "sigma_rels": widths, "reference": reference}
        if nimgs is not None:
            request["nimgs"] = int(nimgs) if isinstance(nimgs, int) else [int(n) for n in nimgs]
        if metrics is not None:
            request["metrics"] = [str(m) for m in metrics]
        sampler = {"steps": steps, "sigma_min": sigma_min, "sigma_max": sigma_max, "rho": rho}
        if any(v is not None for v in sampler.values()):
            request["sampler"] = {k: v for k, v in sampler.items() if v is not None}
        for key, value in (
            ("num_images", num_images),
            ("seed_sets", seed_sets),
            ("batch", batch),
            ("kid_subsets", kid_subsets),
            ("kid_subset_size", kid_subset_size),
        ):
            if value is not None:
                request[key] = int(value)
        response = self._send(self._http, "POST", "/sweeps", json=request, idempotent=False)
        return Sweep.from_json(_raise_for_status(response).json())

    def sweep(self, sweep: Sweep | int) -> Sweep:
        """``GET /sweeps/{id}``: the sweep's current state with every point."""
        return Sweep.from_json(self._get_json(f"/sweeps/{_sweep_id(sweep)}"))

    def sweeps(self, run: str | None = None) -> list[Sweep]:
        """``GET /sweeps``: every sweep (of ``run``, if given), newest first, without their
        points. The server answers a page at a time; this follows ``next_before`` to the end."""
        sweeps: list[Sweep] = []
        params: dict[str, str] = {"limit": "500"}
        if run is not None:
            params["run"] = run
        while True:
            response = self._send(self._http, "GET", "/sweeps", params=params)
            page = _raise_for_status(response).json()
            sweeps.extend(Sweep.from_json(s) for s in page["sweeps"])
            if page.get("next_before") is None:
                return sweeps
            params["before"] = str(page["next_before"])

    def cancel_sweep(self, sweep: Sweep | int) -> Sweep:
        """``DELETE /sweeps/{id}``: stops the sweep's unfinished points (a worker stops at its
        next batch; finished points keep their results). Returns the sweep after cancelling;
        a sweep that has ended already is left as it is. Needs the token."""
        response = self._send(self._http, "DELETE", f"/sweeps/{_sweep_id(sweep)}")
        return Sweep.from_json(_raise_for_status(response).json())

    def wait_sweep(
        self,
        sweep: Sweep | int,
        *,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        poll_interval: float = 2.0,
    ) -> list[SweepPoint]:
        """Waits for the sweep to end and returns its points with their results (``fid``,
        ``fid_std``, ``kid``, ``kid_std``, ``result``), in sweep order.

        Follows ``GET /sweeps/{id}/events``. If the stream drops (a restarting server, a
        proxy), it polls ``GET /sweeps/{id}`` and reopens the stream; after three drops in a
        row with nothing learnt it polls every ``poll_interval`` seconds instead.

        ``on_progress(event, data)`` is called on this thread with the server's JSON:
        ``"sweep"`` once first (the whole sweep, as ``GET /sweeps/{id}``), ``"progress"`` as
        a point records images (``idx``, ``sigma_rel``, ``nimg``, ``status``,
        ``images_done``, ``images_total``, ``sweep_images_done``), ``"point"`` when a point
        ends (the point, with ``result`` or ``error``), and ``"end"`` once last (the whole
        sweep). Across a dropped stream, changes seen by polling are told the same way; an
        exception it raises ends the wait.

        Raises:
            SweepFailed: some point failed; the message names each with its error, and
                ``.sweep`` holds the final state (the other points' results included).
            SweepCancelled: the sweep was cancelled (``.sweep`` as above).
            SweepTimeout: ``timeout`` seconds passed first; the sweep goes on on the server.
            NotFound: no such sweep.
            TransportError: the server stayed unreachable through the client's retries
                while the stream was down.
        """
        sid = _sweep_id(sweep)
        if not poll_interval > 0:
            raise ValueError("poll_interval must be positive")
        _check_open(self._http)
        deadline = None if timeout is None else time.monotonic() + timeout
        watch = SweepWatch(on_progress)

        def remaining() -> float | None:
            if deadline is None:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                last = Sweep.from_json(watch.last) if watch.last is not None else None
                where = (
                    f"still {last.status}: {last.points_done} of {last.points_total} points "
                    f"done, {last.images_done} of {last.images_total} images"
                    if last is not None
                    else "not seen"
                )
                raise SweepTimeout(f"sweep {sid} {where} after {timeout} s", last)
            return left

        drops = 0
        while watch.final is None:
            if drops < 3:
                learnt = self._follow_sweep(sid, watch, remaining)
                if watch.final is not None:
                    break
                drops = 0 if learnt else drops + 1
                if drops == 3:
                    log.warning(
                        "the event stream of sweep %s keeps dropping; polling every %.1f s",
                        sid,
                        poll_interval,
                    )
            remaining()
            watch.state(self._get_json(f"/sweeps/{sid}"))
            if watch.final is not None:
                break
            left = remaining()
            time.sleep(poll_interval if left is None else min(poll_interval, left))
        return self._finished(watch.final)

    def _follow_sweep(
        self, sid: int, watch: SweepWatch, remaining: Callable[[], float | None]
    ) -> bool:
        """Feeds the sweep's event stream to ``watch`` until the sweep ends or the stream
        drops; returns whether any event but the opening ``sweep`` arrived."""
        http = httpx.Client(
            base_url=self.url,
            headers=self._headers,
            # The server sends a keep-alive every 15 s.
            timeout=httpx.Timeout(self._timeout, read=max(self._timeout, 45.0)),
        )
        stream = _EventStream(http, f"/sweeps/{sid}/events")
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
                if isinstance(item, ApiError) and item.status not in _RETRY_STATUSES:
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

    @staticmethod
    def _finished(sweep: Sweep | None) -> list[SweepPoint]:
        assert sweep is not None
        if sweep.status == "done":
            return sweep.points
        if sweep.status == "cancelled":
            raise SweepCancelled(
                f"sweep {sweep.id} of run {sweep.run} was cancelled with {sweep.points_done} "
                f"of {sweep.points_total} points done",
                sweep,
            )
        failed = "; ".join(
            f"point {p.idx} (sigma_rel {p.sigma_rel:g}, nimg {p.nimg}): "
            f"{(p.error or 'no reason recorded')[:500]}"
            for p in sweep.failed_points
        )
        raise SweepFailed(
            f"sweep {sweep.id} of run {sweep.run} failed: {sweep.points_failed} of "
            f"{sweep.points_total} points failed: {failed}",
            sweep,
        )

    def sweep_plot(self, sweep: Sweep | int, metric: SweepMetric = "fid") -> str:
        """``GET /sweeps/{id}/plot.svg``: the metric against σ_rel (± std over seed sets, the
        best point ringed; a heat map for 2-D sweeps), as SVG text. ``NotFound`` until a
        point has finished."""
        response = self._send(
            self._http, "GET", f"/sweeps/{_sweep_id(sweep)}/plot.svg", params={"metric": metric}
        )
        return _raise_for_status(response).text

    def point_grid(self, sweep: Sweep | int, idx: int) -> bytes:
        """``GET /sweeps/{id}/points/{idx}/grid.png``: a PNG grid of the point's first
        images. ``NotFound`` until its first batch is recorded."""
        path = f"/sweeps/{_sweep_id(sweep)}/points/{int(idx)}/grid.png"
        return _raise_for_status(self._send(self._http, "GET", path)).content

    def references(self) -> list[Reference]:
        """``GET /references``: the reference statistics sweeps can score against."""
        return [Reference.from_json(r) for r in self._get_json("/references")["references"]]

    def import_reference(self, name: str, stats: bytes | str | os.PathLike[str]) -> Reference:
        """``POST /references?name=``: stores reference statistics under ``name`` (unique):
        a pytorch-fid ``.npz`` (``mu``, ``sigma``) or an EDM2 reference ``.pkl``, as bytes or
        a path. They hold no features, so sweeps against them compute FID only. Needs the
        token; :class:`~hindsight_client.errors.Conflict` if the name is taken."""
        data = stats if isinstance(stats, bytes) else Path(stats).read_bytes()
        response = self._send(
            self._http,
            "POST",
            "/references",
            params={"name": name},
            body=lambda: iter([data]),
            headers={"Content-Type": "application/octet-stream"},
            idempotent=False,
        )
        return Reference.from_json(_raise_for_status(response).json())
