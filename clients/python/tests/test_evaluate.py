"""External sweeps evaluated by the user's own PyTorch code (``Client.evaluate``,
``docs/EVALUATORS.md``) against a real ``hindsight serve``: a tiny convolutional denoiser of
Fashion-MNIST (:mod:`tiny_denoiser`, not the EDM2 network) is trained here, uploaded with
``PowerEMA``, and swept over σ_rel with FID, KID and a user metric (its validation loss).

- two evaluator processes share a sweep; one is SIGKILLed mid-point, the other resumes that
  point from its recorded batches and finishes the sweep; every point is recorded once;
- each point's FID equals ``hindsight fid`` on the point's images written to a folder
  (server-computed features: ≤ 1e-6 relative; client-computed: ≤ 1e-3);
- client-side features pass the server's audit; an evaluator whose resize skips NVIDIA's
  half-pixel offset is refused (422) with a message naming the audit;
- malformed writes get a 4xx naming what is wrong and record nothing;
- failures in user code and Ctrl-C release the lease with their message.

The reference statistics are made here from 32 Fashion-MNIST test images with
``Client.reference_from_images``. Needs NVIDIA's weights (``HINDSIGHT_FID_WEIGHTS``) and
Debian's Fashion-MNIST: skipped without them, failed under ``HINDSIGHT_REQUIRE_FID_WEIGHTS=1``.
Sizes are small (32 images a point, batches of 16, 6 sampler steps) for two CPU cores.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue
from typing import Any

import httpx
import numpy as np
import pytest
import tiny_denoiser as td
import torch
from conftest import Server, fid_weights, run_cli

from hindsight_client import (
    BatchUploaded,
    Claimed,
    Client,
    EvaluationEvent,
    InceptionFeatures,
    Lease,
    PointFailed,
    PointFinished,
    Reconstruction,
    Reference,
    Sweep,
    SweepFailure,
    SweepPoint,
)

#: The server's lease (``--evaluation-lease-secs``): short, so a killed evaluator's point comes
#: back within seconds.
LEASE_SECONDS = 3
RUN = "fm-denoiser"
REFERENCE = "fm-test-32"
WORKER = Path(__file__).with_name("evaluate_worker.py")
METRICS: list[Any] = ["fid", "kid", {"name": "val_loss", "goal": "min", "label": "validation loss"}]
NUM_IMAGES = 32
BATCH = 16


@dataclass
class Setup:
    """A server with the trained run and the reference statistics, and a client of it."""

    server: Server
    token: str
    client: Client
    weights: Path
    reference: Reference
    root: Path

    def http(self) -> httpx.Client:
        """A bare HTTP session with the token, for writes the client would not make."""
        return httpx.Client(
            base_url=self.server.url, headers={"Authorization": f"Bearer {self.token}"}
        )

    def sweep(self, sigma_rels: list[float], **kwargs: Any) -> Sweep:
        args: dict[str, Any] = {
            "reference": REFERENCE,
            "evaluator": "external",
            "metrics": METRICS,
            "num_images": NUM_IMAGES,
            "batch": BATCH,
            "sampler": td.SAMPLER,
        }
        args.update(kwargs)
        return self.client.start_sweep(RUN, sigma_rels, **args)


@pytest.fixture(scope="module")
def setup(
    hindsight_bin: Path,
    tmp_path_factory: pytest.TempPathFactory,
    denoiser_snapshots: list[Any],
) -> Iterator[Setup]:
    weights = fid_weights()
    root = tmp_path_factory.mktemp("evaluate")
    tokens = root / "tokens"
    out = run_cli(hindsight_bin, "token", "new", "--token-file", str(tokens))
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    server = Server(
        hindsight_bin,
        root / "data",
        (
            "--token-file",
            str(tokens),
            "--fid-weights",
            str(weights),
            "--evaluation-lease-secs",
            str(LEASE_SECONDS),
        ),
    ).start()
    client = Client(server.url, token)
    try:
        client.upload(RUN, denoiser_snapshots)
        client.flush()
        reference = client.reference_from_images(
            REFERENCE, td.fashion_mnist("t10k", 32), fid_weights=weights, batch=32
        )
        yield Setup(server, token, client, weights, reference, root)
    finally:
        client.close()
        server.kill()


def point_images(setup: Setup, point: SweepPoint, sampler: dict[str, Any]) -> torch.Tensor:
    """The point's images made again here from its reconstruction and seeds, batch by batch
    as the evaluators made them."""
    assert point.reconstruction_id is not None
    view = setup.client._transport.get_json(f"/reconstructions/{point.reconstruction_id}")
    model = td.load(Reconstruction.from_json(view, setup.client, waited=False).state_dict())
    seeds = list(range(NUM_IMAGES))
    return torch.cat(
        [td.sample(model, seeds[k : k + BATCH], sampler) for k in range(0, NUM_IMAGES, BATCH)]
    )


def cli_fid(setup: Setup, images: torch.Tensor, folder: Path) -> float:
    """``hindsight fid FOLDER REFERENCE`` on ``images`` written as PNGs."""
    td.write_pngs(images, folder)
    out = setup.server.cli(
        "fid",
        str(folder),
        REFERENCE,
        "--weights",
        str(setup.weights),
        "--batch",
        str(BATCH),
        "--kid-subsets",
        "2",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    return float(json.loads(out.stdout.strip().splitlines()[-1])["fid"])


def validation_loss(setup: Setup, point: SweepPoint) -> float:
    assert point.reconstruction_id is not None
    view = setup.client._transport.get_json(f"/reconstructions/{point.reconstruction_id}")
    model = td.load(Reconstruction.from_json(view, setup.client, waited=False).state_dict())
    return td.validation_loss(model, td.fashion_mnist("t10k", 256))


def said(failure: SweepFailure) -> str:
    """What the evaluator reported (the server shows it after the worker's name)."""
    message = failure.message or ""
    return message.removeprefix(f"{failure.worker}: ")


# -- reference statistics from the client ---------------------------------------------------


def test_reference_statistics_from_the_clients_features(setup: Setup) -> None:
    ref = setup.reference
    assert (ref.name, ref.count, ref.dims, ref.has_features) == (REFERENCE, 32, 2048, True)
    assert (ref.resolution, ref.channels) == (28, 1)
    assert ref.weights_digest == InceptionFeatures(setup.weights).digest
    # The stored mean is the mean of the features computed here.
    stats = np.load(io.BytesIO(httpx.get(setup.server.url + ref.stats_url).content))
    features = InceptionFeatures(setup.weights, batch=32)(td.fashion_mnist("t10k", 32))
    np.testing.assert_allclose(stats["mu"], features.astype(np.float64).mean(0), rtol=0, atol=1e-6)


def test_reference_statistics_from_batches(setup: Setup) -> None:
    images = td.fashion_mnist("t10k", 6)
    batches = iter([images[:2], torch.from_numpy(images[2:6]).permute(0, 2, 3, 1)])
    ref = setup.client.reference_from_images("fm-batches", batches, audit_images=3, batch=4)
    assert (ref.count, ref.resolution, ref.channels) == (6, 28, 1)
    with pytest.raises(ValueError, match=r"images\[1\]: images of \[1, 32, 32\] after images"):
        setup.client.reference_from_images(
            "fm-mixed", [images[:2], np.zeros((2, 1, 32, 32), np.uint8)]
        )
    assert "fm-mixed" not in {r.name for r in setup.client.references()}


# -- two evaluator processes, one killed mid-point -------------------------------------------


class WorkerProcess:
    """``evaluate_worker.py`` in a process of its own; its JSON lines land in a queue."""

    def __init__(self, setup: Setup, sweep: Sweep, name: str, *extra: str) -> None:
        self.name = name
        self.events: list[dict[str, Any]] = []
        self._lines: Queue[dict[str, Any] | None] = Queue()
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                setup.server.url,
                setup.token,
                str(sweep.id),
                name,
                "--cache",
                str(setup.root / f"cache-{name}"),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                self._lines.put(json.loads(line))
        self._lines.put(None)

    def _drain(self) -> None:
        assert self.process.stderr is not None
        self.stderr.extend(self.process.stderr)

    def wait_for(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except Empty:
                pytest.fail(f"{self.name}: no {event!r} in {timeout} s; saw {self.events}")
            if item is None:
                pytest.fail(
                    f"{self.name} ended without {event!r}; saw {self.events}\n"
                    + "".join(self.stderr[-30:])
                )
            self.events.append(item)
            if item["event"] == event:
                return item

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


@dataclass
class SharedSweep:
    sweep: Sweep
    killed: WorkerProcess
    survivor: WorkerProcess
    summary: dict[str, Any]
    killed_idx: int


@pytest.fixture(scope="module")
def shared_sweep(setup: Setup) -> Iterator[SharedSweep]:
    """A sweep of four widths worked by two evaluator processes that send images (the server
    computes their features): ``a`` stalls on its second batch and is SIGKILLed once ``b``
    has claimed a point; ``b`` finishes the sweep."""
    sweep = setup.sweep([0.05, 0.08, 0.11, 0.14])
    a = WorkerProcess(setup, sweep, "a", "--features", "server", "--stall-after-batches", "1")
    b: WorkerProcess | None = None
    try:
        first = a.wait_for("batch", 90)
        a.wait_for("stalled", 30)
        b = WorkerProcess(setup, sweep, "b", "--features", "server")
        b.wait_for("claimed", 60)
        a.kill()
        summary = b.wait_for("summary", 180)
        assert b.process.wait(timeout=30) == 0, "".join(b.stderr)
        yield SharedSweep(setup.client.sweep(sweep), a, b, summary, int(first["idx"]))
    finally:
        a.kill()
        if b is not None:
            b.kill()


def test_two_evaluators_one_killed_mid_point(shared_sweep: SharedSweep) -> None:
    s = shared_sweep
    sweep = s.sweep
    assert sweep.status == "done", sweep.failures
    assert sweep.evaluator == "external"
    assert (sweep.points_done, sweep.points_total, sweep.points_failed) == (4, 4, 0)
    assert sweep.workers == []
    # The killed evaluator's point was claimed twice and resumed after its first batch: the
    # survivor made only the second.
    killed = next(p for p in sweep.points if p.idx == s.killed_idx)
    assert killed.attempts == 2
    assert [p.attempts for p in sweep.points if p.idx != s.killed_idx] == [1, 1, 1]
    resumed = [e for e in s.survivor.events if e["event"] == "claimed" and e["idx"] == s.killed_idx]
    assert [e["batches_done"] for e in resumed] == [[0]]
    [failure] = sweep.failures
    assert (failure.worker, failure.idx) == ("a", s.killed_idx)
    assert failure.outcome == "expired"  # nobody reported it
    # Each point recorded once, by the survivor: 4 points, 2 batches each but the one the
    # killed evaluator recorded.
    assert s.summary["points_evaluated"] == 4
    assert s.summary["points_failed"] == 0
    assert s.summary["batches"] == 7
    assert s.summary["images"] == 7 * BATCH
    finished = [e["idx"] for e in s.survivor.events if e["event"] == "finished"]
    assert sorted(finished) == [0, 1, 2, 3]
    assert not [e for e in s.killed.events if e["event"] == "finished"]
    for p in sweep.points:
        assert p.images_done == p.images_total == NUM_IMAGES
        assert p.measured is not None
        assert p.measured.features == "server"
        assert set(p.measured.metrics) == {"fid", "kid", "val_loss"}
        assert p.fid is not None
        assert p.fid > 0
        assert p.kid is not None
    # The user metric: its presentation, its goal, and the best point by it.
    info = sweep.metric_info("val_loss")
    assert info is not None
    assert (info.kind, info.label, info.lower_is_better) == ("user", "validation loss", True)
    assert [m.kind for m in sweep.metrics] == ["fid", "kid", "user"]
    best = sweep.best("val_loss")
    assert best is not None
    assert best.value("val_loss") == min(p.value("val_loss") or math.inf for p in sweep.points)
    with pytest.raises(ValueError, match="'accuracy' is not one of this sweep's"):
        sweep.best("accuracy")


def test_each_points_fid_is_the_clis_on_its_images(
    setup: Setup, shared_sweep: SharedSweep, tmp_path: Path
) -> None:
    for p in shared_sweep.sweep.points:
        images = point_images(setup, p, td.SAMPLER)
        fid = cli_fid(setup, images, tmp_path / f"point{p.idx}")
        assert p.fid is not None
        assert abs(p.fid - fid) <= 1e-6 * fid, (p.idx, p.fid, fid)
        # The user metric is the number metrics() measured on the point's weights.
        assert p.value("val_loss") == pytest.approx(validation_loss(setup, p), rel=1e-6)


# -- client-side features --------------------------------------------------------------------


def test_client_features_pass_the_audit_and_give_the_same_fid(setup: Setup, tmp_path: Path) -> None:
    sweep = setup.sweep([0.09])
    events: list[EvaluationEvent] = []
    summary = setup.client.evaluate(
        sweep,
        load=td.load,
        generate=td.sample,
        metrics=lambda model, lease: {
            "val_loss": td.validation_loss(model, td.fashion_mnist("t10k", 256))
        },
        features="client",
        fid_weights=setup.weights,
        cache_dir=tmp_path / "cache",
        worker="client-features",
        on_progress=events.append,
    )
    assert (summary.points_evaluated, summary.points_failed, summary.batches) == (1, 0, 2)
    assert summary.images == NUM_IMAGES
    assert summary.seconds > 0
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Claimed", "BatchUploaded", "BatchUploaded", "PointFinished"]
    uploads = [e for e in events if isinstance(e, BatchUploaded)]
    assert {e.features for e in uploads} == {"client"}
    # The server ran the audit images (16 of batch 0, its minimum of batch 1) through its own
    # network: the client's features agree with its to 1e-4.
    audits = [e.recorded.audit for e in uploads]
    assert [a.images if a else None for a in audits] == [16, 2]
    assert max(a.max_relative_difference for a in audits if a) <= 1e-4
    [point] = setup.client.sweep(sweep).points
    assert point.measured is not None
    assert point.measured.features == "client"
    assert summary.points[0].idx == point.idx
    # The reconstruction was downloaded once, into the cache, under its digest.
    lease = next(e.lease for e in events if isinstance(e, Claimed))
    cached = tmp_path / "cache" / f"{lease.reconstruction.digest}.safetensors"
    assert cached.is_file()
    assert cached.stat().st_size == lease.reconstruction.byte_size
    fid = cli_fid(setup, point_images(setup, point, td.SAMPLER), tmp_path / "images")
    assert point.fid is not None
    assert abs(point.fid - fid) <= 1e-3 * fid, (point.fid, fid)


def test_a_resize_without_the_half_pixel_offset_fails_the_audit(
    setup: Setup, tmp_path: Path
) -> None:
    class NoHalfPixel(InceptionFeatures):
        def resize(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.interpolate(
                x, size=(299, 299), mode="bilinear", align_corners=False
            )

    sweep = setup.sweep([0.07], metrics=["fid"], num_images=8, batch=8)
    events: list[EvaluationEvent] = []
    summary = setup.client.evaluate(
        sweep,
        load=td.load,
        generate=td.sample,
        features=NoHalfPixel(setup.weights),
        cache_dir=tmp_path / "cache",
        worker="no-half-pixel",
        on_progress=events.append,
    )
    # Refused on every attempt until the point failed; nothing recorded.
    failed = [e for e in events if isinstance(e, PointFailed)]
    assert summary.points_evaluated == 0
    assert summary.batches == 0
    assert len(failed) == summary.points_failed == 3
    for e in failed:
        assert "HTTP 422 audit_failed" in e.message, e.message
        assert "relative" in e.message.lower() or "differ" in e.message.lower(), e.message
    after = setup.client.sweep(sweep)
    assert after.status == "failed"
    assert [p.images_done for p in after.points] == [0]
    assert [f.worker for f in after.failures] == ["no-half-pixel"] * 3
    assert all("audit" in (f.message or "") for f in after.failures)


# -- malformed writes: a 4xx naming what is wrong, nothing recorded ---------------------------


def claim(http: httpx.Client, sweep: Sweep) -> dict[str, Any]:
    response = http.post("/evaluations/claim", json={"worker": "raw", "sweep": sweep.id})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    Lease.from_json(body)  # the client reads it
    return body


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def refused(response: httpx.Response, status: int | tuple[int, ...], *names: str) -> str:
    """The message of an error answer of ``status`` that names each of ``names``."""
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text)
    message = str(response.json()["error"]["message"])
    for name in names:
        assert name in message, (name, message)
    return message


def test_malformed_writes_are_refused_and_record_nothing(setup: Setup) -> None:
    sweep = setup.sweep([0.10])
    u8 = np.zeros((BATCH, 1, 28, 28), dtype=np.uint8)
    with setup.http() as http:
        expired = claim(http, sweep)
        unknown = "/evaluations/ls_no_such_lease/heartbeat"
        refused(http.post(unknown), 404, "ls_no_such_lease")
        time.sleep(LEASE_SECONDS + 1.5)
        refused(http.post(expired["urls"]["heartbeat"]), 409)
        refused(http.post(expired["urls"]["batch"].replace("{k}", "0"), content=npy(u8)), 409)

        lease = claim(http, sweep)
        assert lease["point"]["attempts"] == 2
        assert lease["batches"] == 2
        batch = lease["urls"]["batch"]
        metrics = lease["urls"]["metrics"]

        def upload(k: int | str, body: bytes) -> httpx.Response:
            return http.post(
                batch.replace("{k}", str(k)),
                content=body,
                headers={"Content-Type": "application/octet-stream"},
            )

        def send_metrics(text: str) -> httpx.Response:
            return http.post(metrics, content=text, headers={"Content-Type": "application/json"})

        cases: list[tuple[str, httpx.Response, int | tuple[int, ...], tuple[str, ...]]] = [
            ("a short batch", upload(0, npy(u8[:-1])), 400, ("16",)),
            ("float images", upload(0, npy(u8.astype(np.float32))), 400, ("uint8",)),
            ("another size", upload(0, npy(np.zeros((BATCH, 1, 32, 32), np.uint8))), 400, ("28",)),
            ("two channels", upload(0, npy(np.zeros((BATCH, 2, 28, 28), np.uint8))), 400, ()),
            ("a batch out of range", upload(2, npy(u8)), 400, ("batch",)),
            ("garbage", upload(1, os.urandom(10 << 20)), (400, 413), ()),
            ("NaN", send_metrics('{"val_loss": NaN}'), 400, ("metrics.val_loss",)),
            # JSON has no infinity: 1e999 overflows the parser, which says so.
            ("infinity", send_metrics('{"val_loss": 1e999}'), 400, ("JSON",)),
            ("a list of another length", send_metrics('{"val_loss": [1, 2]}'), 400, ("val_loss",)),
            ("a metric not declared", send_metrics('{"accuracy": 0.5}'), 400, ("accuracy",)),
            ("features of another width", upload(0, _npz(u8, dims=16)), 400, ("features",)),
            ("too few audit images", upload(0, _npz(u8, audit=1)), 400, ("audit",)),
            ("finish before the batches", http.post(lease["urls"]["finish"]), 409, ()),
        ]
        problems = []
        for what, response, status, names in cases:
            try:
                refused(response, status, *names)
            except AssertionError as e:
                problems.append(f"{what}: {e}")
        assert problems == []

        again = http.post(lease["urls"]["fail"], json={"message": "giving up"})
        assert again.status_code == 200, again.text
    after = setup.client.sweep(sweep)
    [point] = after.points
    assert point.images_done == 0
    assert point.status == "queued"
    assert [said(f) for f in after.failures][-1] == "giving up"
    with setup.http() as http:
        third = claim(http, sweep)
        assert third["batches_done"] == []
        assert third["metrics_recorded"] == {}
        http.post(third["urls"]["fail"], json={"message": "done checking"})
    setup.client.cancel_sweep(sweep)


def _npz(images: np.ndarray, *, dims: int = 2048, audit: int = 2) -> bytes:
    out = io.BytesIO()
    np.savez(
        out,
        features=np.zeros((len(images), dims), dtype=np.float32),
        audit_images=images[:audit],
    )
    return out.getvalue()


# -- user metrics only: failures in user code, Ctrl-C ---------------------------------------


def test_failures_in_user_code_release_the_lease(setup: Setup, tmp_path: Path) -> None:
    sweep = setup.client.start_sweep(
        RUN, [0.06, 0.12], metrics=[{"name": "val_loss", "goal": "min"}], sampler={"any": [1]}
    )
    assert sweep.settings.reference_id is None
    assert sweep.evaluator == "external"
    assert sweep.settings.sampler_json == {"any": [1]}
    validation = td.fashion_mnist("t10k", 256)

    def interrupted(model: td.Denoiser, lease: Lease) -> dict[str, float]:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        setup.client.evaluate(sweep, load=td.load, metrics=interrupted, cache_dir=tmp_path)
    state = setup.client.sweep(sweep)
    assert [said(f) for f in state.failures] == ["interrupted"]
    assert [p.status for p in state.points] == ["queued", "queued"]

    calls = []

    def flaky(model: td.Denoiser, lease: Lease) -> dict[str, float]:
        calls.append(lease.point.idx)
        if len(calls) == 1:
            raise ValueError("boom")
        assert lease.sampler == {"any": [1]}
        return {"val_loss": td.validation_loss(model, validation)}

    events: list[EvaluationEvent] = []
    summary = setup.client.evaluate(
        sweep,
        load=td.load,
        metrics=flaky,
        cache_dir=tmp_path,
        worker="flaky",
        on_progress=events.append,
    )
    assert (summary.points_evaluated, summary.points_failed, summary.batches) == (2, 1, 0)
    [failed] = [e for e in events if isinstance(e, PointFailed)]
    assert failed.message.startswith("ValueError: boom (at test_evaluate.py:")
    assert failed.message.endswith(" in flaky)")
    state = setup.client.sweep(sweep)
    assert state.status == "done"
    assert [said(f) for f in state.failures] == ["interrupted", failed.message]
    assert [f.worker for f in state.failures][1] == "flaky"
    finished = {e.point.idx: e.point for e in events if isinstance(e, PointFinished)}
    for p in state.points:
        assert p.value("val_loss") == pytest.approx(validation_loss(setup, p), rel=1e-6)
        assert finished[p.idx].value("val_loss") == p.value("val_loss")
        assert p.fid is None
        assert p.kid is None
    best = state.best("val_loss")
    assert best is not None
    assert best.value("val_loss") == min(p.value("val_loss") or math.inf for p in state.points)
