"""The HTTP client for ``hindsight serve``: upload snapshots, reconstruct, download weights,
and run FID/KID sweeps over EMA widths.

The API is described in the repository's top-level README ("Serving") and, generated from
the server's handlers, at ``GET /openapi.json``. Writes (uploads, ``POST /reconstruct``)
need ``Authorization: Bearer <token>`` when the server has a token file; reads do not.

:class:`Client` is the public face; the work is done by :mod:`~hindsight_client.transport`
(the HTTP session, retries, error answers), :mod:`~hindsight_client.uploads` (the upload
queue and its thread) and :mod:`~hindsight_client.sweeps` (following a sweep's events). What
the server answers is read into the dataclasses of :mod:`~hindsight_client.wire`.

Sweeps are followed through their server-sent events on a reader thread (so a deadline holds
however quiet the stream is); a stream that drops is replaced by polling ``GET /sweeps/{id}``
and reopened, and the caller sees one sequence of events either way.

Uploads go through a durable spool on local disk (:mod:`~hindsight_client.uploads`): ``upload``
queues snapshots and returns at once, a spooler thread writes and fsyncs each into the spool
directory, and a sender thread sends them oldest first, retrying for as long as the server
takes to answer. A refusal never raises inside ``upload``: it goes to ``on_error``, the log,
and ``flush``/``close``. What a process leaves in the spool, the next Client on it sends.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .errors import (
    HindsightError,
    NotFound,
    ReconstructionTimeout,
    SweepCancelled,
    SweepFailed,
    SweepTimeout,
    Unauthorized,
)
from .snapshot import Snapshot
from .spool import default_spool_dir, fsync_dir
from .sweeps import ProgressCallback, SweepWatch, follow
from .transport import Transport, check_open, raise_for_status
from .uploads import ErrorCallback, Uploader, UploadResult, post_reference, run_path
from .wire import (
    AuthStatus,
    DeletedSnapshot,
    Lease,
    Reconstruction,
    ReconstructionPending,
    Reference,
    ReferenceList,
    Report,
    RunSummary,
    StoredSnapshot,
    Sweep,
    SweepMetric,
    SweepPage,
    SweepPoint,
)

if TYPE_CHECKING:
    import torch

    from .evaluation import EvaluationEvent, EvaluationSummary, FeatureMode
    from .inception import InceptionFeatures

log = logging.getLogger("hindsight_client")

Dtype = Literal["f32", "f16", "bf16"]

#: The default bound on the upload spool: 16 GiB (files waiting plus snapshots queued).
DEFAULT_SPOOL_MAX_BYTES = 16 << 30


def _snapshot_id(snapshot: StoredSnapshot | int) -> int:
    if isinstance(snapshot, StoredSnapshot):
        return snapshot.id
    if isinstance(snapshot, bool) or not isinstance(snapshot, int):
        raise TypeError(f"a snapshot is a StoredSnapshot or its id (an int), not {snapshot!r}")
    return snapshot


def _sweep_id(sweep: Sweep | int) -> int:
    if isinstance(sweep, Sweep):
        return sweep.id
    if isinstance(sweep, bool) or not isinstance(sweep, int) or sweep <= 0:
        raise ValueError(f"a sweep is a Sweep or its id (a positive int), not {sweep!r}")
    return sweep


class Client:
    """A client for one ``hindsight serve``.

    Args:
        url: the server, e.g. ``"http://127.0.0.1:8080"``.
        token: bearer token for writes (from ``hindsight token new``); ``None`` for a server
            without tokens.
        timeout: seconds a connection, read or write may stall before the attempt fails.
        retries: further attempts of a request made on the caller's thread (``upload_now``,
            ``reconstruct``, listings, downloads) after a connection failure or a
            408/429/502/503/504 answer, waiting ``backoff``, then twice as long each time (at
            most 30 s). Spooled uploads are retried without limit (see ``max_backoff``).
        backoff: the first wait between attempts, in seconds.
        max_pending: snapshots that may wait to be written into the spool; ``upload`` blocks
            only while more do (each holds its tensors in memory until it is written).
        upload_bytes_per_second: cap on the upload rate (``None``: as fast as the network
            goes), to leave bandwidth to the training job.
        chunk_bytes: size of the pieces an upload body is streamed in.
        spool_dir: the directory spooled snapshots wait in (created if missing); default
            ``$HINDSIGHT_SPOOL_DIR``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``)
            ``/hindsight/spool/<host>_<port>-<hash of the URL>``: one per server, shared by
            every process that uploads to it.
        spool_max_bytes: bound on the spool's files plus the snapshots queued for it, in
            bytes (default 16 GiB); an ``upload`` that would pass it raises
            :class:`~hindsight_client.errors.SpoolFull` and queues nothing. Refused files
            kept under ``rejected/`` do not count.
        max_backoff: the longest wait between two attempts of a spooled upload, in seconds
            (the waits double from ``backoff``, with random jitter; a ``Retry-After`` is
            honoured).
        on_error: ``on_error(run, entry, error)``, called on the sender thread for each
            snapshot the server refuses (a 4xx other than 408/429: a conflict, a bad file, a
            wrong token); ``entry`` (a :class:`~hindsight_client.spool.SpoolEntry`) has
            ``nimg``, ``sigma_rel``, ``digest`` and ``path``, where the refused file is kept.
            The error is also logged and raised by the next ``flush``/``close``.
        check: call :meth:`check` now (server reachable, token valid for writes).

    Use it as a context manager, or call :meth:`close`, so queued snapshots reach the spool.
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
        spool_dir: str | os.PathLike[str] | None = None,
        spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES,
        max_backoff: float = 30.0,
        on_error: ErrorCallback | None = None,
        check: bool = False,
    ) -> None:
        if retries < 0 or backoff < 0 or max_pending < 1 or chunk_bytes < 1:
            raise ValueError("retries, backoff must be ≥ 0; max_pending, chunk_bytes ≥ 1")
        if upload_bytes_per_second is not None and not upload_bytes_per_second > 0:
            raise ValueError("upload_bytes_per_second must be positive")
        if spool_max_bytes < 1 or not max_backoff > 0:
            raise ValueError("spool_max_bytes must be ≥ 1 and max_backoff positive")
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme not in ("http", "https"):
            raise ValueError(
                f"url: {url!r} is not an http:// or https:// URL (e.g. 'http://127.0.0.1:8000')"
            )
        self.url = url.rstrip("/")
        self._token = token
        self._transport = Transport(
            self.url,
            {"Authorization": f"Bearer {token}"} if token else {},
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            chunk_bytes=chunk_bytes,
        )
        if check:
            try:
                self.check()
            except BaseException:
                self._transport.http.close()
                raise
        explicit_spool = spool_dir is not None
        self._uploads = Uploader(
            self._transport,
            spool_dir=Path(spool_dir) if spool_dir is not None else default_spool_dir(self.url),
            spool_max_bytes=spool_max_bytes,
            max_pending=max_pending,
            bytes_per_second=upload_bytes_per_second,
            backoff=max(backoff, 0.05),
            max_backoff=max_backoff,
            on_error=on_error,
        )
        if explicit_spool and self._uploads.unusable is not None:
            # A spool directory the caller chose and that cannot be used is a configuration
            # error: said now, not at the first upload in the middle of training.
            self._transport.http.close()
            raise self._uploads.unusable
        # Queued snapshots still reach the spool when the interpreter exits without close().
        ref = weakref.ref(self)

        def at_exit() -> None:
            client = ref()
            if client is not None:
                client._close_quietly()

        self._atexit = at_exit
        atexit.register(at_exit)

    @property
    def spool_dir(self) -> Path:
        """The directory spooled snapshots wait in."""
        return self._uploads.spool_dir

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fetch(
        self, path: str, digest: str, restart: Callable[[], Callable[[bytes], object]]
    ) -> None:
        """Streams ``GET path`` into ``restart()``'s sink, checked against ``digest`` (for
        :class:`Reconstruction`'s downloads)."""
        self._transport.fetch(path, digest, restart)

    # -- uploads ----------------------------------------------------------------------------

    def upload(
        self,
        run: str,
        snapshots: Snapshot | Iterable[Snapshot],
        *,
        check_finite: bool = False,
        durable: bool = False,
    ) -> list[Future[UploadResult]]:
        """Queues snapshots for upload into ``run`` (created on its first snapshot) and
        returns one future per snapshot.

        By default it returns as soon as the snapshots are queued: a spooler thread writes
        each into the spool directory (fsynced, then the snapshot's buffers are released),
        so the training thread does not pay for the write. With ``durable=True`` it returns
        only once they are fsynced in the spool (and raises the ``OSError`` of a failed
        write). A sender thread then sends the spooled files oldest first: each is skipped
        if the run already lists its content at its (nimg, σ_rel) (``HEAD /blobs/{digest}``
        first), else streamed as the body of ``POST /runs/{run}/snapshots``, retried for as
        long as the server is unreachable or answers 5xx/408/429. ``check_finite`` asks the
        server to refuse NaN/Inf.

        Raises ``TypeError`` (naming the type) for anything but a
        :class:`~hindsight_client.Snapshot` or an iterable of them, and
        :class:`~hindsight_client.errors.SpoolFull` when the spool would pass
        ``spool_max_bytes`` (nothing is queued then). Never raises a server's refusal: a
        refused snapshot (e.g. :class:`~hindsight_client.errors.Conflict`,
        :class:`~hindsight_client.errors.InvalidInput`,
        :class:`~hindsight_client.errors.Unauthorized`) is kept under the spool's
        ``rejected/``, given to ``on_error``, logged, set on its future and raised by the
        next :meth:`flush` / :meth:`close` — each failure once.
        """
        return self._uploads.upload(run, snapshots, check_finite=check_finite, durable=durable)

    def upload_now(
        self, run: str, snapshot: Snapshot, *, check_finite: bool = False
    ) -> UploadResult:
        """Uploads one snapshot on the calling thread, without the spool: skipped if the run
        lists it already, else sent with the client's ``retries``; a refusal or a server
        that stays unreachable raises here."""
        return self._uploads.upload_one(self._transport.http, run, snapshot, check_finite)

    def flush(self, timeout: float | None = None) -> list[UploadResult]:
        """Waits until the spool is drained: every snapshot queued by this Client, and every
        file earlier processes left in the spool, is stored on the server or refused. With
        the server down it waits for as long as that takes, or ``timeout`` seconds
        (``TimeoutError``; the files stay spooled). Returns the results not reported before,
        or raises the first refusal not raised before."""
        return self._uploads.flush(timeout)

    def close(self) -> None:
        """Waits until every queued snapshot is written and fsynced into the spool, then for
        the sender only while uploads succeed: a server that is down does not hold the
        process, and what is left in the spool is sent by the next Client on it (logged).
        Stops the threads, closes the connections, and raises the first refusal not raised
        before. Idempotent; also run at interpreter exit (errors logged then)."""
        if self._uploads.closed:
            return
        atexit.unregister(self._atexit)
        try:
            self._uploads.close()
        finally:
            self._transport.http.close()

    def _close_quietly(self) -> None:
        try:
            self.close()
        except Exception as e:  # at exit there is no caller left to raise to
            log.error("uploads failed at exit: %s", e)

    # -- the server, its runs and their snapshots ---------------------------------------------

    def check(self) -> AuthStatus:
        """``GET /auth``: checks that the server answers and that the token may write.
        Returns the server's :class:`~hindsight_client.wire.AuthStatus`.

        Raises :class:`~hindsight_client.errors.TransportError` when the server cannot be
        reached (after the client's retries), and
        :class:`~hindsight_client.errors.Unauthorized` when writes would be refused: a
        token was given and is not valid, or the server requires one and none was given.
        """
        response = self._transport.send("GET", "/auth")
        if response.status_code == 404:
            raise HindsightError(
                f"{self.url} answers but has no GET /auth (a hindsight serve older than the "
                "client): cannot check the token"
            )
        status = AuthStatus.from_json(raise_for_status(response).json())
        if not status.can_write and (self._token is not None or status.tokens_required):
            why = (
                "the token is not valid"
                if status.token == "invalid"
                else "the server requires a token and none was given"
                if self._token is None
                else f"the token is {status.token} and may not write"
            )
            raise Unauthorized(401, "unauthorized", why, "GET", f"{self.url}/auth")
        return status

    def runs(self) -> list[RunSummary]:
        """``GET /runs``: every run with its totals (``run.name``, ``run.snapshots``,
        ``run.bytes``, ...; ``run["name"]`` reads the server's JSON as before)."""
        return [RunSummary.from_json(r) for r in self._transport.get_json("/runs")]

    def snapshots(self, run: str) -> list[StoredSnapshot]:
        """``GET /runs/{run}/snapshots``: the run's stored snapshots by time and width
        (``id``, ``nimg``, ``sigma_rel``, ``digest``, ``byte_size``, ...; ``row["nimg"]``
        reads the server's JSON as before). :class:`~hindsight_client.errors.NotFound` for
        an unknown run."""
        rows = self._transport.get_json(f"{run_path(run)}/snapshots")
        return [StoredSnapshot.from_json(r) for r in rows]

    def _snapshot_row(self, run: str, snapshot: StoredSnapshot | int) -> StoredSnapshot:
        sid = _snapshot_id(snapshot)
        for row in self.snapshots(run):
            if row.id == sid:
                return row
        raise NotFound(
            404,
            "not_found",
            f"run {run} has no snapshot {sid}",
            "GET",
            f"{self.url}{run_path(run)}/snapshots",
        )

    def delete_snapshot(self, run: str, snapshot: StoredSnapshot | int) -> DeletedSnapshot:
        """``DELETE /runs/{run}/snapshots/{id}`` (``snapshot``: a row of :meth:`snapshots`
        or its ``id``): the way out of a run with a bad snapshot. Needs the token;
        :class:`~hindsight_client.errors.NotFound` for an unknown run or id."""
        path = f"{run_path(run)}/snapshots/{_snapshot_id(snapshot)}"
        return DeletedSnapshot.from_json(
            raise_for_status(self._transport.send("DELETE", path)).json()
        )

    def download_snapshot(
        self,
        run: str,
        snapshot: StoredSnapshot | int,
        path: str | os.PathLike[str] | None = None,
    ) -> Path | Snapshot:
        """``GET /runs/{run}/snapshots/{id}/file``: a stored snapshot's file, its BLAKE3
        digest checked against the run's listing.

        With ``path`` (a file, or a directory to put the snapshot's EDM2-style name in),
        the bytes go to a temporary file beside it, fsynced and renamed only once the digest
        checks out; returns the path. Without, returns a
        :class:`~hindsight_client.Snapshot` made from the bytes.

        Raises :class:`~hindsight_client.errors.NotFound` (unknown run or id) and
        :class:`~hindsight_client.errors.DigestMismatch` (nothing is kept then).
        """
        row = self._snapshot_row(run, snapshot)
        url = f"{run_path(run)}/snapshots/{row.id}/file"
        if path is None:
            chunks: list[bytes] = []

            def into_memory() -> Callable[[bytes], object]:
                chunks.clear()
                return chunks.append

            self._transport.fetch(url, row.digest, into_memory)
            data = b"".join(chunks)
            from_bytes = getattr(Snapshot, "from_bytes", None)
            if from_bytes is not None:
                snap: Snapshot = from_bytes(data, nimg=row.nimg, sigma_rel=row.sigma_rel)
                return snap
            return Snapshot(nimg=row.nimg, sigma_rel=row.sigma_rel, data=data)
        target = Path(path)
        if target.is_dir() or str(path).endswith(("/", os.sep)):
            target.mkdir(parents=True, exist_ok=True)
            name = Snapshot(nimg=row.nimg, sigma_rel=row.sigma_rel, data=b"").file_name()
            target = target / name
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        handle: list[Any] = []

        def into_file() -> Callable[[bytes], object]:
            for f in handle:
                f.close()
            handle[:] = [open(tmp, "wb")]  # noqa: SIM115 (closed in `finally` below)
            return handle[0].write

        try:
            self._transport.fetch(url, row.digest, into_file)
            handle[0].flush()
            os.fsync(handle[0].fileno())
            handle[0].close()
            os.replace(tmp, target)
            fsync_dir(target.parent)
        finally:
            for f in handle:
                f.close()
            tmp.unlink(missing_ok=True)
        return target

    def preview(
        self,
        run: str,
        *,
        sigma_rel: float | None = None,
        gamma: float | None = None,
        nimg: int | None = None,
    ) -> Report:
        """``GET /runs/{run}/preview``: the quality report a reconstruction of width
        ``sigma_rel`` (or exponent ``gamma``) at training time ``nimg`` (default the run's
        last snapshot) would have, without reconstructing (a millisecond solve): relative
        profile error, Σ|w|, noise gain, condition number, the weighted snapshots and
        warnings. :class:`~hindsight_client.errors.InvalidInput` for a width out of range,
        :class:`~hindsight_client.errors.NotFound` for an unknown run."""
        if (sigma_rel is None) == (gamma is None):
            raise ValueError("give exactly one of sigma_rel and gamma")
        params: dict[str, Any] = (
            {"sigma_rel": repr(float(sigma_rel))}
            if sigma_rel is not None
            else {"gamma": repr(float(gamma))}  # type: ignore[arg-type]
        )
        if nimg is not None:
            params["nimg"] = int(nimg)
        return Report.from_json(self._transport.get_json(f"{run_path(run)}/preview", params=params))

    def has_blob(self, digest: str) -> bool:
        """``HEAD /blobs/{digest}``: whether the server stores this content."""
        response = self._transport.send("HEAD", f"/blobs/{digest}")
        if response.status_code == 404:
            return False
        raise_for_status(response)
        return True

    # -- reconstructing --------------------------------------------------------------------

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
        buffers: Literal["average", "copy"] | None = None,
    ) -> Reconstruction:
        """Reconstructs the EMA of width ``sigma_rel`` (or exponent ``gamma``) of ``run`` at
        training time ``nimg`` (default: the run's last snapshot) from its stored snapshots.

        Returns when the weights are stored on the server: a 202 answer (work still running
        after ``wait_secs``, default the server's) is polled at ``status_url`` until ready or
        ``timeout`` seconds have passed (:class:`ReconstructionTimeout`; ``None`` waits as
        long as it takes). ``dtype`` is the element type of the float tensors: **float16
        unless told** (``"f32"``, ``"bf16"``), whatever the snapshots' dtype; with ``f16``,
        values beyond ±65504 fail the request unless ``clamp_out_of_range``. ``buffers``:
        ``"average"`` (the server's default: every float tensor averaged) or ``"copy"`` (the
        tensors the snapshots declare as buffers, e.g. BatchNorm statistics, copied from the
        newest snapshot with a weight, as EDM2's ``reconstruct_phema.py`` does); integer
        tensors are always copied.
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
        if buffers is not None:
            if buffers not in ("average", "copy"):
                raise ValueError(f"buffers {buffers!r} is not 'average' or 'copy'")
            request["buffers"] = buffers
        if wait_secs is not None:
            request["wait_secs"] = float(wait_secs)
        deadline = None if timeout is None else time.monotonic() + timeout
        response = raise_for_status(self._transport.send("POST", "/reconstruct", json=request))
        waited = response.status_code == 202
        delay = 0.1
        while response.status_code == 202:
            pending = ReconstructionPending.from_json(response.json())
            log.info("reconstruction %s of run %s is being computed; polling", pending.id, run)
            if deadline is not None and time.monotonic() + delay > deadline:
                raise ReconstructionTimeout(
                    f"reconstruction {pending.id} of run {run} not ready after {timeout} s"
                )
            time.sleep(delay)
            delay = min(1.5 * delay, 5.0)
            response = raise_for_status(self._transport.send("GET", pending.status_url))
        return Reconstruction.from_json(response.json(), self, waited=waited)

    # -- sweeps: FID/KID of reconstructions over EMA widths ----------------------------------

    def start_sweep(
        self,
        run: str,
        sigma_rels: float | Sequence[float] | str,
        *,
        reference: str | int | None = None,
        evaluator: Literal["builtin", "external"] | None = None,
        nimgs: int | Sequence[int] | None = None,
        metrics: Sequence[SweepMetric | Mapping[str, Any]] | None = None,
        num_images: int | None = None,
        seed_sets: int | None = None,
        sampler: Mapping[str, Any] | None = None,
        steps: int | None = None,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        rho: float | None = None,
        batch: int | None = None,
        kid_subsets: int | None = None,
        kid_subset_size: int | None = None,
        allow_dataset_mismatch: bool = False,
    ) -> Sweep:
        """Queues a sweep (``POST /sweeps``): for each EMA width in ``sigma_rels`` (and each
        training time in ``nimgs``), the server reconstructs the EMA of ``run``; then its
        own workers (a ``builtin`` sweep: the EDM2 network of runs that record
        ``metadata.network``) or external evaluators (an ``external`` sweep: your model,
        sampler and metrics, see :meth:`evaluate`) make ``num_images`` images per seed set,
        which are scored against the ``reference`` statistics (a name or id, see
        :meth:`references`). Returns at once; follow it with :meth:`wait_sweep`.

        Args:
            sigma_rels: one width, a list, or EDM2's list syntax (``"0.05,0.10,...,0.25"``).
            reference: the reference statistics; needed when FID or KID is measured.
            evaluator: ``"builtin"`` or ``"external"``; default builtin when the run
                records a network configuration, else external.
            nimgs: training times to reconstruct at (a 2-D sweep); default the run's last
                snapshot.
            metrics: ``"fid"``, ``"kid"``, and (external sweeps) user metrics that the
                evaluators measure, ``{"name": "val_loss", "goal": "min", "label": ...}``
                (``goal`` ``"min"`` or ``"max"``; ``label`` optional). Default FID, and KID
                when the reference keeps its features.
            num_images: images per seed set when FID or KID is measured; default 50 000 (or
                the server's cap). FID is biased upwards at few images: compare a sweep's
                points with each other.
            seed_sets: independent image sets (default 1); metrics are mean ± std over them.
                Image ``i`` of a point comes from seed ``i``.
            sampler: the sampler settings as a dict: for an external sweep any JSON object,
                handed to every evaluator untouched (your own sampler's settings); for a
                builtin sweep EDM's ``steps``, ``sigma_min``, ``sigma_max``, ``rho``.
            steps, sigma_min, sigma_max, rho: a builtin sweep's sampler, one keyword each
                (defaults 32, 0.002, 80, 7); not with ``sampler``.
            batch: images per batch (default 32): the unit of progress and resumption.
            kid_subsets, kid_subset_size: KID's random subsets (defaults 100, 1000).
            allow_dataset_mismatch: sweep even when the reference statistics come from
                another dataset than the run records it was trained on (the server refuses
                that with a 400 naming ``reference`` otherwise).

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
        request: dict[str, Any] = {"run": run, "sigma_rels": widths}
        if reference is not None:
            if isinstance(reference, bool) or not isinstance(reference, (str, int)):
                raise ValueError(f"reference must be a name or an id, not {reference!r}")
            request["reference"] = reference
        if evaluator is not None:
            if evaluator not in ("builtin", "external"):
                raise ValueError(f"evaluator {evaluator!r} is not 'builtin' or 'external'")
            request["evaluator"] = evaluator
        if nimgs is not None:
            request["nimgs"] = int(nimgs) if isinstance(nimgs, int) else [int(n) for n in nimgs]
        if metrics is not None:
            request["metrics"] = [dict(m) if isinstance(m, Mapping) else str(m) for m in metrics]
        heun = {"steps": steps, "sigma_min": sigma_min, "sigma_max": sigma_max, "rho": rho}
        if sampler is not None:
            if any(v is not None for v in heun.values()):
                raise ValueError("give the sampler as sampler= or steps=/sigma_min=/..., not both")
            if not isinstance(sampler, Mapping):
                raise ValueError(f"sampler must be a dict, not {type(sampler).__name__}")
            request["sampler"] = dict(sampler)
        elif any(v is not None for v in heun.values()):
            request["sampler"] = {k: v for k, v in heun.items() if v is not None}
        for key, value in (
            ("num_images", num_images),
            ("seed_sets", seed_sets),
            ("batch", batch),
            ("kid_subsets", kid_subsets),
            ("kid_subset_size", kid_subset_size),
        ):
            if value is not None:
                request[key] = int(value)
        if not isinstance(allow_dataset_mismatch, bool):
            raise ValueError(
                f"allow_dataset_mismatch must be True or False, not {allow_dataset_mismatch!r}"
            )
        if allow_dataset_mismatch:
            request["allow_dataset_mismatch"] = True
        response = self._transport.send("POST", "/sweeps", json=request, idempotent=False)
        return Sweep.from_json(raise_for_status(response).json())

    def sweep(self, sweep: Sweep | int) -> Sweep:
        """``GET /sweeps/{id}``: the sweep's current state with every point."""
        return Sweep.from_json(self._transport.get_json(f"/sweeps/{_sweep_id(sweep)}"))

    def sweeps(self, run: str | None = None) -> list[Sweep]:
        """``GET /sweeps``: every sweep (of ``run``, if given), newest first, without their
        points. The server answers a page at a time; this follows ``next_before`` to the end."""
        sweeps: list[Sweep] = []
        params: dict[str, str] = {"limit": "500"}
        if run is not None:
            params["run"] = run
        while True:
            page = SweepPage.from_json(self._transport.get_json("/sweeps", params=params))
            sweeps.extend(page.sweeps)
            if page.next_before is None:
                return sweeps
            params["before"] = str(page.next_before)

    def cancel_sweep(self, sweep: Sweep | int) -> Sweep:
        """``DELETE /sweeps/{id}``: stops the sweep's unfinished points (a worker stops at its
        next batch; finished points keep their results). Returns the sweep after cancelling;
        a sweep that has ended already is left as it is. Needs the token."""
        response = self._transport.send("DELETE", f"/sweeps/{_sweep_id(sweep)}")
        return Sweep.from_json(raise_for_status(response).json())

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
        check_open(self._transport.http)
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
            watch.state(self._transport.get_json(f"/sweeps/{sid}"))
            if watch.final is not None:
                break
            left = remaining()
            time.sleep(poll_interval if left is None else min(poll_interval, left))
        return self._finished(watch.final)

    def _follow_sweep(
        self, sid: int, watch: SweepWatch, remaining: Callable[[], float | None]
    ) -> bool:
        """One pass over the sweep's event stream (:func:`~hindsight_client.sweeps.follow`);
        whether any event but the opening ``sweep`` arrived."""
        return follow(self._transport, sid, watch, remaining)

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
        response = self._transport.send(
            "GET", f"/sweeps/{_sweep_id(sweep)}/plot.svg", params={"metric": metric}
        )
        return raise_for_status(response).text

    def point_grid(self, sweep: Sweep | int, idx: int) -> bytes:
        """``GET /sweeps/{id}/points/{idx}/grid.png``: a PNG grid of the point's first
        images. ``NotFound`` until its first batch is recorded."""
        path = f"/sweeps/{_sweep_id(sweep)}/points/{int(idx)}/grid.png"
        return raise_for_status(self._transport.send("GET", path)).content

    # -- external evaluators: your model, your sampler, your metrics ----------------------------

    def evaluate(
        self,
        sweep: Sweep | int | None = None,
        run: str | None = None,
        *,
        load: Callable[[dict[str, torch.Tensor]], Any],
        generate: Callable[[Any, list[int], dict[str, Any]], Any] | None = None,
        metrics: Callable[[Any, Lease], Mapping[str, Any]] | None = None,
        device: str | torch.device = "cpu",
        features: FeatureMode | InceptionFeatures = "auto",
        fid_weights: str | os.PathLike[str] | None = None,
        feature_batch: int = 64,
        worker: str | None = None,
        stop_when_idle: bool = True,
        poll_interval: float = 2.0,
        cache_dir: str | os.PathLike[str] | None = None,
        on_progress: Callable[[EvaluationEvent], object] | None = None,
    ) -> EvaluationSummary:
        """Evaluates points of external sweeps with your own model (needs PyTorch and the
        token): claims one point at a time (of ``sweep``, of ``run``'s sweeps, or of any
        external sweep), evaluates it, and claims the next, until none is left.

        For each point: the reconstruction is downloaded (BLAKE3 checked) into ``cache_dir``
        (default ``~/.cache/hindsight/reconstructions``, by digest), then

        - ``load(state_dict) -> model``: your module with the point's weights (the state
          dict is on the CPU, float32);
        - ``generate(model, seeds, sampler) -> images``: uint8 ``[B, C, H, W]`` (a tensor or
          array, on any device), image ``i`` from ``seeds[i]`` whatever the batch — draw
          its noise with :func:`~hindsight_client.seeded_randn`; ``sampler`` is the sweep's
          ``sampler`` dict as given to :meth:`start_sweep`. Called once per batch (under
          ``torch.no_grad()``) for the batches not recorded yet, when the sweep measures
          FID or KID;
        - ``metrics(model, lease) -> {name: value}``: the sweep's user metrics, each a number
          or one per seed set (``lease.seed_sets``); ``lease.point`` has the point's
          ``sigma_rel`` and ``nimg``. Under ``torch.no_grad()``.

        Images go to the server, which computes their Inception features — or, with
        NVIDIA's weights here, the features are computed on ``device`` and sent with a few
        of the images for the server to audit (it refuses features that differ from its own
        by more than its tolerance). ``features``: ``"auto"`` computes them here when the
        weights are found (``fid_weights``, else ``$HINDSIGHT_FID_WEIGHTS``, else
        ``~/.cache/hindsight/default_1.pt``) and are the server's; ``"client"`` requires
        it; ``"server"`` always sends images; an
        :class:`~hindsight_client.InceptionFeatures` is the network to use (``"client"``).

        A heartbeat thread keeps each lease. An exception in your code (or a batch the
        server refuses) reports the attempt failed with its type, message and line — the
        point goes back to the queue; after 3 failed attempts it is marked failed — and the
        evaluator moves on; Ctrl-C reports ``interrupted`` and re-raises. A point claimed
        again after its evaluator died resumes: only the batches not recorded are made.

        Args:
            worker: the name shown in the sweep's workers (default ``host-pid``).
            stop_when_idle: return once nothing is left to claim and no external sweep in
                scope is unfinished (points leased by other evaluators come back when
                their leases expire, so this evaluator waits for them); ``False``: keep
                polling every ``poll_interval`` seconds for new sweeps.
            feature_batch: images per forward pass of the Inception network.
            on_progress: called on this thread with a :class:`~hindsight_client.Claimed`,
                :class:`~hindsight_client.BatchUploaded`,
                :class:`~hindsight_client.PointFinished` or
                :class:`~hindsight_client.PointFailed` event.

        Returns an :class:`~hindsight_client.EvaluationSummary` (points evaluated and
        failed, batches, images, seconds). Raises :class:`~hindsight_client.TransportError`
        when the server stays unreachable, and
        :class:`~hindsight_client.HindsightError` when ``features="client"`` finds no
        weights; :class:`~hindsight_client.EvaluatorMisconfigured` (after releasing the
        lease) when a point needs what was not given (``generate`` for images, ``metrics``
        for user metrics) or ``features="client"`` meets a server that takes no features
        from it.
        """
        from .evaluation import Evaluator

        check_open(self._transport.http)
        evaluator = Evaluator(
            self._transport,
            load=load,
            generate=generate,
            metrics=metrics,
            device=device,
            features=features,
            fid_weights=fid_weights,
            feature_batch=feature_batch,
            worker=worker,
            cache_dir=cache_dir,
            poll_interval=poll_interval,
            on_progress=on_progress,
        )
        sid = None if sweep is None else _sweep_id(sweep)
        return evaluator.run(sid, run, stop_when_idle)

    def reference_from_images(
        self,
        name: str,
        images: Any,
        *,
        device: str | torch.device = "cpu",
        batch: int = 64,
        fid_weights: str | os.PathLike[str] | None = None,
        audit_images: int = 8,
    ) -> Reference:
        """Stores reference statistics of your own images under ``name``
        (``POST /references/features``; needs PyTorch, NVIDIA's weights and the token):
        their Inception features are computed here on ``device``, and the server, after
        checking the first ``audit_images`` images against its own network, keeps their mean
        and covariance and the features (so sweeps against them measure KID too).

        ``images``: uint8 ``[N, C, H, W]`` (or ``[N, H, W, C]``), C 1 or 3, square, as a
        tensor or array — or an iterable of such batches (a data loader's). Sweeps against
        the statistics take images of this size.

        Raises :class:`~hindsight_client.errors.Conflict` when the name is taken,
        :class:`~hindsight_client.errors.Unprocessable` when the audit fails (other
        weights or another resize), ``ValueError`` for images of another dtype or shape.
        """
        import torch

        from .evaluation import npz_bytes
        from .inception import InceptionFeatures, as_nchw

        if audit_images < 2:
            raise ValueError("audit_images must be ≥ 2 (the server's minimum)")
        extractor = InceptionFeatures(fid_weights, device=device, batch=batch)
        whole = isinstance(images, (np.ndarray, torch.Tensor))
        chunks = [images] if whole else images
        features: list[np.ndarray] = []
        audit: list[np.ndarray] = []
        shape: tuple[int, ...] | None = None
        kept = 0
        for i, chunk in enumerate(chunks):
            x = as_nchw(chunk, "images" if whole else f"images[{i}]").cpu()
            if shape is None:
                shape = tuple(x.shape[1:])
                if shape[1] != shape[2]:
                    raise ValueError(f"images: {shape[1]}×{shape[2]} images are not square")
            elif tuple(x.shape[1:]) != shape:
                raise ValueError(
                    f"images[{i}]: images of {list(x.shape[1:])} after images of {list(shape)}"
                )
            features.append(extractor(x))
            if kept < audit_images:
                audit.append(x[: audit_images - kept].numpy())
                kept += len(audit[-1])
        if shape is None or kept < 2:
            raise ValueError("images: at least 2 images are needed")
        body = npz_bytes(
            features=np.concatenate(features),
            audit_images=np.concatenate(audit),
        )
        response = self._transport.send(
            "POST",
            "/references/features",
            params={"name": name},
            body=lambda: iter([body]),
            headers={"Content-Type": "application/octet-stream"},
            idempotent=False,
        )
        return Reference.from_json(raise_for_status(response).json())

    def references(self) -> list[Reference]:
        """``GET /references``: the reference statistics sweeps can score against."""
        return ReferenceList.from_json(self._transport.get_json("/references")).references

    def import_reference(self, name: str, stats: bytes | str | os.PathLike[str]) -> Reference:
        """``POST /references?name=``: stores reference statistics under ``name`` (unique):
        a pytorch-fid ``.npz`` (``mu``, ``sigma``) or an EDM2 reference ``.pkl``, as bytes or
        a path. They hold no features, so sweeps against them compute FID only. Needs the
        token; :class:`~hindsight_client.errors.Conflict` if the name is taken."""
        data = stats if isinstance(stats, bytes) else Path(stats).read_bytes()
        return Reference.from_json(post_reference(self._transport, name, data))
