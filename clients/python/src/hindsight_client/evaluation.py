"""External evaluation: the points of external sweeps, evaluated by the user's own model,
sampler and metrics (``docs/EVALUATORS.md`` in the repository has the protocol).

:class:`Evaluator` is what :meth:`~hindsight_client.Client.evaluate` runs. For each point it
claims (``POST /evaluations/claim``, a lease on one point) it

1. downloads the point's reconstruction into a cache on disk, keyed by its BLAKE3 digest
   (checked as the bytes arrive, and again when a cached file is reused);
2. builds the model (``load(state_dict)``);
3. for each batch not yet recorded, makes its images (``generate(model, seeds, sampler)``,
   one seed per image) and sends either the images (the server computes their Inception
   features) or the features computed here, with audit images the server checks them on;
4. measures the user metrics (``metrics(model, lease)``) and sends them;
5. finishes the point, which the server then scores (FID and KID from the recorded
   features).

A heartbeat thread keeps the lease while the point is worked on. A failure in the user's
code (or a batch the server refuses) is reported with ``fail`` — the point goes back to the
queue, and after three failed attempts it is marked failed — and the evaluator goes on with
the next point; Ctrl-C reports ``fail`` with ``interrupted`` and re-raises.

Needs PyTorch.
"""

from __future__ import annotations

import io
import logging
import math
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import blake3
import httpx
import numpy as np
import torch

from .errors import (
    ApiError,
    EvaluatorMisconfigured,
    HindsightError,
    LeaseLost,
    TransportError,
)
from .inception import InceptionFeatures, as_nchw, locate
from .transport import Transport, raise_for_status
from .wire import BatchRecorded, FailRecorded, Lease, MetricsRecorded, Sweep, SweepPage, SweepPoint

log = logging.getLogger("hindsight_client")

FeatureMode = Literal["auto", "client", "server"]

#: Audit images sent with batch 0's features: the server makes the point's grid picture of
#: them.
GRID_IMAGES = 16

#: The most characters of a failure message the server keeps.
MESSAGE_CHARS = 4000

LoadFn = Callable[[dict[str, torch.Tensor]], Any]
GenerateFn = Callable[[Any, list[int], dict[str, Any]], Any]
MetricsFn = Callable[[Any, Lease], Mapping[str, Any]]


# -- what the caller is told -------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    """The evaluator holds ``lease`` and starts on its point."""

    lease: Lease


@dataclass(frozen=True)
class BatchUploaded:
    """Batch ``batch`` of the lease's point is recorded: ``images`` images, their features
    computed by ``features`` (``client`` or ``server``), in ``seconds`` here and there;
    ``recorded`` is the server's answer (its audit of client features included)."""

    lease: Lease
    batch: int
    images: int
    features: str
    seconds: float
    recorded: BatchRecorded


@dataclass(frozen=True)
class PointFinished:
    """The lease's point is recorded; ``point`` has its result."""

    lease: Lease
    point: SweepPoint


@dataclass(frozen=True)
class PointFailed:
    """The attempt on the lease's point ended without a result: ``message`` says why (as
    reported to the server, or why the lease was lost)."""

    lease: Lease
    message: str


EvaluationEvent = Claimed | BatchUploaded | PointFinished | PointFailed


@dataclass
class EvaluationSummary:
    """What one :meth:`~hindsight_client.Client.evaluate` call did.

    Attributes:
        worker: the name it claimed points under.
        points_evaluated: points it finished.
        points_failed: attempts that ended without a result (reported failures and lost
            leases).
        batches, images: batches and images it recorded.
        seconds: wall-clock time of the call.
        points: the finished points, with their results.
    """

    worker: str
    points_evaluated: int = 0
    points_failed: int = 0
    batches: int = 0
    images: int = 0
    seconds: float = 0.0
    points: list[SweepPoint] = field(default_factory=list, repr=False)


def failure_message(e: BaseException) -> str:
    """``Type: message (at file:line in function)`` for an exception from the user's code;
    a refusal of the server is its own message (status, code, the server's sentence)."""
    where = ""
    frames = traceback.extract_tb(e.__traceback__)
    if frames and not isinstance(e, ApiError):
        last = frames[-1]
        where = f" (at {Path(last.filename).name}:{last.lineno} in {last.name})"
    text = f"{type(e).__name__}: {e}{where}"
    return text[:MESSAGE_CHARS]


def default_worker() -> str:
    """``host-pid``: a name that tells evaluators apart in the sweep's workers table."""
    return f"{socket.gethostname()}-{os.getpid()}"[:100]


def default_cache_dir() -> Path:
    """Where reconstructions are kept: ``$HINDSIGHT_CACHE_DIR/reconstructions``, else
    ``$XDG_CACHE_HOME/hindsight/reconstructions``, else ``~/.cache/hindsight/reconstructions``."""
    given = os.environ.get("HINDSIGHT_CACHE_DIR")
    if given:
        return Path(given) / "reconstructions"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "hindsight" / "reconstructions"


def audit_positions(size: int, minimum: int, first: bool) -> list[int]:
    """The positions in a batch of ``size`` images whose images go with its features: batch
    0's first :data:`GRID_IMAGES` (the point's grid picture), else ``minimum`` spread over
    the batch; never fewer than ``minimum`` (nor more than the batch)."""
    count = min(size, max(minimum, GRID_IMAGES if first else 0))
    if first or count >= size:
        return list(range(count))
    spread = np.linspace(0, size - 1, count).round().astype(int)
    return sorted({int(i) for i in spread})


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """An uncompressed NPZ of ``arrays``."""
    out = io.BytesIO()
    np.savez(out, **arrays)  # type: ignore[arg-type]
    return out.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


# -- the heartbeat ---------------------------------------------------------------------------


class Heartbeat:
    """Extends a lease every third of its length on a thread of its own, until stopped or
    until the server says the lease is gone (:attr:`lost`)."""

    def __init__(self, transport: Transport, lease: Lease) -> None:
        self._transport = transport
        self._path = lease.urls.heartbeat
        self._interval = max(0.2, lease.lease_seconds / 3)
        self._stop = threading.Event()
        #: Set when the server answers that the lease no longer exists or has ended.
        self.lost = threading.Event()
        self.reason = ""
        self._thread = threading.Thread(
            target=self._run, name=f"hindsight-heartbeat-{lease.lease_id}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        with self._transport.new_http() as http:
            while not self._stop.wait(self._interval):
                try:
                    response = http.post(self._path)
                except httpx.TransportError as e:
                    log.warning("heartbeat failed (%s); trying again", e)
                    continue
                if response.status_code in (404, 409):
                    try:
                        raise_for_status(response)
                    except ApiError as e:
                        self.reason = e.message
                    self.lost.set()
                    return
                if response.status_code >= 400:
                    log.warning("heartbeat answered HTTP %s", response.status_code)

    def check(self) -> None:
        """Raises :class:`LeaseLost` if the lease is gone."""
        if self.lost.is_set():
            raise LeaseLost(f"the lease ended: {self.reason}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# -- the loop --------------------------------------------------------------------------------


class Evaluator:
    """Claims and evaluates points (see :meth:`~hindsight_client.Client.evaluate`, whose
    arguments these are)."""

    def __init__(
        self,
        transport: Transport,
        *,
        load: LoadFn,
        generate: GenerateFn | None,
        metrics: MetricsFn | None,
        device: str | torch.device,
        features: FeatureMode | InceptionFeatures,
        fid_weights: str | os.PathLike[str] | None,
        feature_batch: int,
        worker: str | None,
        cache_dir: str | os.PathLike[str] | None,
        poll_interval: float,
        on_progress: Callable[[EvaluationEvent], object] | None,
    ) -> None:
        extractor = features if isinstance(features, InceptionFeatures) else None
        if extractor is not None:
            features = "client"
        elif features not in ("auto", "client", "server"):
            raise ValueError(f"features {features!r} is not one of 'auto', 'client', 'server'")
        if not poll_interval > 0:
            raise ValueError("poll_interval must be positive")
        self._transport = transport
        self._load = load
        self._generate = generate
        self._metrics = metrics
        self._device = torch.device(device)
        self._mode = features
        self._worker = worker if worker is not None else default_worker()
        self._cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._poll = poll_interval
        self._on_progress = on_progress
        self._extractor = extractor
        self._weights = fid_weights
        self._feature_batch = feature_batch
        if extractor is None and features == "client":
            # Loaded before anything is claimed: a missing file fails here, not on a lease.
            self._extractor = InceptionFeatures(
                fid_weights, device=self._device, batch=feature_batch
            )
        self.summary = EvaluationSummary(worker=self._worker)

    def _tell(self, event: EvaluationEvent) -> None:
        if self._on_progress is not None:
            self._on_progress(event)

    # -- claiming ---------------------------------------------------------------------------

    def claim(self, sweep: int | None, run: str | None) -> Lease | None:
        """``POST /evaluations/claim``: a lease, or ``None`` when nothing is claimable (204)."""
        body: dict[str, Any] = {"worker": self._worker}
        if sweep is not None:
            body["sweep"] = sweep
        if run is not None:
            body["run"] = run
        response = raise_for_status(
            self._transport.send("POST", "/evaluations/claim", json=body, idempotent=False)
        )
        if response.status_code == 204:
            return None
        return Lease.from_json(response.json())

    def _work_left(self, sweep: int | None, run: str | None) -> bool:
        """Whether an external sweep in scope is unfinished (its points are leased by other
        evaluators, which may die and leave them to this one)."""
        if sweep is not None:
            s = Sweep.from_json(self._transport.get_json(f"/sweeps/{sweep}"))
            return s.evaluator == "external" and not s.finished
        params = {"limit": "500"}
        if run is not None:
            params["run"] = run
        while True:
            page = SweepPage.from_json(self._transport.get_json("/sweeps", params=params))
            if any(s.evaluator == "external" and not s.finished for s in page.sweeps):
                return True
            if page.next_before is None:
                return False
            params["before"] = str(page.next_before)

    def run(self, sweep: int | None, run: str | None, stop_when_idle: bool) -> EvaluationSummary:
        started = time.monotonic()
        try:
            while True:
                lease = self.claim(sweep, run)
                if lease is None:
                    if stop_when_idle and not self._work_left(sweep, run):
                        return self.summary
                    time.sleep(self._poll)
                    continue
                self.evaluate(lease)
        finally:
            self.summary.seconds = time.monotonic() - started

    # -- one point ----------------------------------------------------------------------------

    def evaluate(self, lease: Lease) -> None:
        """Works ``lease``'s point to its end: finished, or failed (reported) and left."""
        self._tell(Claimed(lease))
        log.info(
            "evaluating point %s of sweep %s (sigma_rel %g, nimg %s, attempt %s)",
            lease.point.idx,
            lease.sweep.id,
            lease.point.sigma_rel,
            lease.point.nimg,
            lease.point.attempts,
        )
        heartbeat = Heartbeat(self._transport, lease)
        try:
            point = self._work(lease, heartbeat)
        except KeyboardInterrupt:
            self._fail(lease, "interrupted")
            raise
        except EvaluatorMisconfigured as e:
            self._fail(lease, str(e))
            raise
        except LeaseLost as e:
            log.warning("point %s of sweep %s: %s", lease.point.idx, lease.sweep.id, e)
            self._failed(lease, str(e))
        except TransportError:
            raise
        except Exception as e:
            message = failure_message(e)
            log.error("point %s of sweep %s failed: %s", lease.point.idx, lease.sweep.id, message)
            if heartbeat.lost.is_set() or (isinstance(e, ApiError) and e.code == "lease_expired"):
                self._failed(lease, message)
            else:
                self._fail(lease, message)
        else:
            self.summary.points_evaluated += 1
            self.summary.points.append(point)
            self._tell(PointFinished(lease, point))
        finally:
            heartbeat.stop()

    def _failed(self, lease: Lease, message: str) -> None:
        self.summary.points_failed += 1
        self._tell(PointFailed(lease, message))

    def _fail(self, lease: Lease, message: str) -> None:
        """Reports the attempt failed (the point goes back to the queue); a lease already
        gone needs no report."""
        try:
            response = self._transport.send(
                "POST", lease.urls.fail, json={"message": message[:MESSAGE_CHARS]}
            )
            if response.status_code not in (404, 409):
                ended = FailRecorded.from_json(raise_for_status(response).json())
                if not ended.retry:
                    log.warning(
                        "point %s of sweep %s failed for good (its attempts are spent)",
                        lease.point.idx,
                        lease.sweep.id,
                    )
        except HindsightError as e:
            log.warning("could not report the failure of lease %s: %s", lease.lease_id, e)
        self._failed(lease, message)

    def _work(self, lease: Lease, heartbeat: Heartbeat) -> SweepPoint:
        state = self._reconstruction(lease)
        heartbeat.check()
        model = self._load(state)
        del state
        todo = [k for k in range(lease.batches) if k not in set(lease.batches_done)]
        if todo:
            if self._generate is None:
                raise EvaluatorMisconfigured(
                    f"the sweep measures {', '.join(self._image_metrics(lease))}, which needs "
                    "images: pass generate= to evaluate()"
                )
            extractor = self._extractor_for(lease)
            for k in todo:
                heartbeat.check()
                self._batch(lease, model, k, extractor)
        self._send_metrics(lease, model)
        heartbeat.check()
        response = self._transport.send("POST", lease.urls.finish, idempotent=False)
        return SweepPoint.from_json(raise_for_status(response).json())

    @staticmethod
    def _image_metrics(lease: Lease) -> list[str]:
        return [m.metric for m in lease.metrics if not m.user]

    def _extractor_for(self, lease: Lease) -> InceptionFeatures | None:
        """The feature network to use on this point's images (``None``: send images)."""
        if self._mode == "server":
            return None
        if self._extractor is None and locate(self._weights) is not None:
            # "auto": loaded when a point first has images.
            self._extractor = InceptionFeatures(
                self._weights, device=self._device, batch=self._feature_batch
            )
        accepted = lease.features.accepted
        same = self._extractor is not None and self._extractor.digest == (
            lease.features.weights_digest
        )
        if accepted and same:
            return self._extractor
        why = (
            "the reference's features are not Inception's"
            if not accepted
            else "the server uses other Inception weights "
            f"(BLAKE3 {lease.features.weights_digest}, not {self._extractor.digest})"
            if self._extractor is not None
            else "no Inception weights here"
        )
        if self._mode == "client":
            raise EvaluatorMisconfigured(
                f"features='client', but the server takes no features from here: {why}"
            )
        log.info("point %s: sending images (%s)", lease.point.idx, why)
        return None

    def _reconstruction(self, lease: Lease) -> dict[str, torch.Tensor]:
        """The point's weights (on the CPU), from the cache or downloaded into it."""
        import safetensors.torch

        rec = lease.reconstruction
        self._cache.mkdir(parents=True, exist_ok=True)
        path = self._cache / f"{rec.digest}.safetensors"
        if path.is_file() and _file_digest(path) != rec.digest:
            log.warning("cached %s does not hash to its name; downloading it again", path)
            path.unlink()
        if not path.is_file():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
            handle: list[Any] = []

            def restart() -> Callable[[bytes], object]:
                for f in handle:
                    f.close()
                handle[:] = [open(tmp, "wb")]  # noqa: SIM115 (closed in `finally` below)
                return handle[0].write

            try:
                self._transport.fetch(rec.url, rec.digest, restart)
                handle[0].flush()
                os.fsync(handle[0].fileno())
                handle[0].close()
                os.replace(tmp, path)
            finally:
                for f in handle:
                    f.close()
                tmp.unlink(missing_ok=True)
        return safetensors.torch.load_file(str(path), device="cpu")

    def _images(self, lease: Lease, model: Any, seeds: list[int]) -> torch.Tensor:
        """The images of ``seeds``, checked: uint8 ``[B, C, H, W]`` of the reference's size."""
        assert self._generate is not None
        with torch.no_grad():
            made = self._generate(model, seeds, lease.sampler)
        images = as_nchw(made, "generate()").cpu()
        if images.shape[0] != len(seeds):
            raise ValueError(f"generate() returned {images.shape[0]} images for {len(seeds)} seeds")
        want = lease.images
        c, h, w = images.shape[1:]
        if (want.channels is not None and c != want.channels) or (
            want.resolution is not None and (h, w) != (want.resolution, want.resolution)
        ):
            side = want.resolution if want.resolution is not None else "any"
            raise ValueError(
                f"generate() returned images of [C, H, W] = {[c, h, w]}; the reference's are "
                f"{want.channels if want.channels is not None else '1 or 3'} × {side} × {side}"
            )
        return images

    def _batch(self, lease: Lease, model: Any, k: int, extractor: InceptionFeatures | None) -> None:
        started = time.monotonic()
        seeds = lease.batch_seeds(k)
        images = self._images(lease, model, seeds)
        array = images.numpy()
        if extractor is None:
            body = npy_bytes(array)
            content_type = "application/x-npy"
            computed = "server"
        else:
            positions = audit_positions(len(seeds), lease.features.min_audit_images, k == 0)
            body = npz_bytes(
                features=extractor(images),
                audit_images=array[positions],
                audit_index=np.asarray(positions, dtype=np.int64),
            )
            content_type = "application/octet-stream"
            computed = "client"
        response = self._transport.send(
            "POST",
            lease.urls.batch_url(k),
            body=lambda: iter([body]),
            headers={"Content-Type": content_type},
        )
        recorded = BatchRecorded.from_json(raise_for_status(response).json())
        self.summary.batches += 1
        self.summary.images += len(seeds)
        seconds = time.monotonic() - started
        self._tell(BatchUploaded(lease, k, len(seeds), computed, seconds, recorded))

    def _send_metrics(self, lease: Lease, model: Any) -> None:
        """Measures and sends the user metrics not recorded yet."""
        wanted = [m.metric for m in lease.user_metrics if m.metric not in lease.metrics_recorded]
        if not wanted:
            return
        if self._metrics is None:
            raise EvaluatorMisconfigured(
                f"the sweep measures {', '.join(wanted)}: pass metrics= to evaluate()"
            )
        with torch.no_grad():
            measured = dict(self._metrics(model, lease))
        declared = {m.metric for m in lease.user_metrics}
        unknown = sorted(set(measured) - declared)
        if unknown:
            raise ValueError(
                f"metrics() returned {', '.join(unknown)}, which the sweep does not declare "
                f"(it declares {', '.join(sorted(declared)) or 'none'})"
            )
        missing = [name for name in wanted if name not in measured]
        if missing:
            raise ValueError(f"metrics() returned no value for {', '.join(missing)}")
        body = {name: _metric_value(name, measured[name], len(lease.seed_sets)) for name in wanted}
        response = self._transport.send("POST", lease.urls.metrics, json=body)
        MetricsRecorded.from_json(raise_for_status(response).json())


def _metric_value(name: str, value: Any, seed_sets: int) -> float | list[float]:
    """A user metric's value as sent: one finite number, or one per seed set."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else None
    numbers = [float(v) for v in values] if values is not None else [float(value)]
    bad = [v for v in numbers if not math.isfinite(v)]
    if bad:
        raise ValueError(f"metrics() returned {bad[0]} for {name}: values must be finite")
    if values is None:
        return numbers[0]
    if len(numbers) != seed_sets:
        raise ValueError(
            f"metrics() returned {len(numbers)} values for {name}: one number, or one per "
            f"seed set ({seed_sets})"
        )
    return numbers


def _file_digest(path: Path) -> str:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            hasher.update(chunk)
    return hasher.hexdigest()
