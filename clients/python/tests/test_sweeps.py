"""Sweeps through the client against a real ``hindsight serve``: validation errors naming the
field, waiting (server-sent events, a dropped stream, a timeout, a cancel, a failed point),
and — with NVIDIA's Inception weights — a real FID/KID sweep of a tiny trained run.

The sweeps that score images need the weights: ``HINDSIGHT_FID_WEIGHTS`` names them
(``.ci/run`` fetches them and exports it). Without them those tests skip with the reason,
unless ``HINDSIGHT_REQUIRE_FID_WEIGHTS=1``, where they fail. The other tests run anywhere:
their server has no worker, or one that fails on purpose.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Server, fid_weights, run_cli

from hindsight_client import (
    Client,
    Conflict,
    InvalidInput,
    NotFound,
    SweepCancelled,
    SweepFailed,
    SweepTimeout,
    Unauthorized,
)
from hindsight_client.sweeps import SweepWatch, parse_sse

# A tiny EDM2 network on 8×8 RGB: trained for 2 kimg in about a second.
NETWORK = {
    "img_resolution": 8,
    "img_channels": 3,
    "label_dim": 0,
    "model_channels": 8,
    "channel_mult": [1, 2],
    "num_blocks": 1,
    "attn_resolutions": [],
    "logvar_channels": 8,
}

Events = list[tuple[str, dict[str, Any]]]


@pytest.fixture(scope="module")
def trained(hindsight_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory with run ``t``: the tiny network trained on procedural images for
    2 kimg, snapshots of σ_rel 0.05 and 0.10 at 1 and 2 kimg."""
    root = tmp_path_factory.mktemp("sweep-run")
    network = root / "net.json"
    network.write_text(json.dumps(NETWORK))
    data = root / "data"
    out = run_cli(
        hindsight_bin,
        *("train", "--run", "t", "--dataset", "procedural", "--resolution", "8"),
        *("--network", str(network), "--total-kimg", "2", "--snapshot-kimg", "1"),
        *("--batch", "16"),
        data_dir=data,
    )
    assert out.returncode == 0, out.stderr
    return data


@pytest.fixture(scope="module")
def referenced(
    hindsight_bin: Path, trained: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """``trained`` plus reference statistics ``ref`` of 8 procedural images (features kept,
    so KID too); returns (data directory, Inception weights)."""
    weights = fid_weights()
    data = tmp_path_factory.mktemp("sweep-ref") / "data"
    shutil.copytree(trained, data)
    out = run_cli(
        hindsight_bin,
        *("ref-stats", "procedural", "--max-images", "8", "--name", "ref"),
        *("--weights", str(weights)),
        data_dir=data,
    )
    assert out.returncode == 0, out.stderr
    return data, weights


def copy_of(data: Path, tmp_path: Path) -> Path:
    """A data directory of this test's own (a server's sweeps stay in it)."""
    dest = tmp_path / "data"
    shutil.copytree(data, dest)
    return dest


def npz_statistics() -> bytes:
    """pytorch-fid-shaped statistics (2048-d ``mu``, ``sigma``) to import: FID only."""
    buffer = io.BytesIO()
    np.savez(buffer, mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32))
    return buffer.getvalue()


def recorder() -> tuple[Events, Callable[[str, dict[str, Any]], None]]:
    events: Events = []
    return events, lambda name, data: events.append((name, data))


def names(events: Events) -> list[str]:
    return [name for name, _ in events]


# -- the event bookkeeping, without a server ---------------------------------------------------


def test_server_sent_events_are_parsed() -> None:
    stream = [
        ": keep-alive",
        "event: sweep",
        'data: {"id": 1,',
        'data:  "status": "queued"}',
        "",
        "",
        "event: end",
        "id: 7",
        "data: not json",
        "",
        "data: {}",
        "",
    ]
    assert list(parse_sse(stream)) == [
        ("sweep", {"id": 1, "status": "queued"}),
        ("end", "not json"),
        ("message", {}),
    ]


def test_polled_states_are_told_as_the_streams_events() -> None:
    def point(idx: int, status: str, done: int) -> dict[str, Any]:
        return {"idx": idx, "sigma_rel": 0.05 * (idx + 1), "nimg": 64, "status": status,
                "images_done": done, "images_total": 4, "attempts": 1}  # fmt: skip

    spec = {"run": "r", "sigma_rels": [0.05, 0.1], "nimgs": [64], "evaluator": "builtin",
            "metrics": ["fid"], "user_metrics": [], "num_images": 4, "seed_sets": 1,
            "sampler": {"steps": 3, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0},
            "reference_id": 1, "reference_name": "ref", "feature_network": "inception",
            "batch": 4, "kid_subsets": 0, "kid_subset_size": 0, "warnings": []}  # fmt: skip

    def view(status: str, *points: dict[str, Any]) -> dict[str, Any]:
        return {"id": 3, "run": "r", "status": status, "spec": spec, "metrics": [],
                "points": list(points), "points_total": 2, "points_done": 0, "points_failed": 0,
                "images_done": 0, "images_total": 8, "best": [], "created_at": "",
                "url": "/sweeps/3", "events_url": "/sweeps/3/events",
                "plot_url": "/sweeps/3/plot.svg"}  # fmt: skip

    events, record = recorder()
    watch = SweepWatch(record)
    watch.state(view("queued", point(0, "queued", 0), point(1, "queued", 0)))
    watch.state(view("running", point(0, "running", 2), point(1, "queued", 0)))
    watch.state(view("running", point(0, "running", 2), point(1, "queued", 0)))  # no change
    watch.event("point", point(0, "done", 4))  # from a stream: not told twice below
    watch.state(view("cancelled", point(0, "done", 4), point(1, "cancelled", 0)))
    watch.state(view("cancelled", point(0, "done", 4), point(1, "cancelled", 0)))  # ended
    assert names(events) == ["sweep", "progress", "point", "point", "end"]
    assert events[1][1]["images_done"] == 2
    assert events[3][1]["idx"] == 1
    assert watch.final is not None
    assert watch.final.status == "cancelled"
    assert watch.final.best("fid") is None


# -- requests and waiting, against a server without a working sweep worker -------------------


def test_sweep_requests_are_checked_and_errors_name_the_field(
    start_server: Callable[..., Server],
    token_file: tuple[Path, str],
    trained: Path,
    tmp_path: Path,
) -> None:
    path, token = token_file
    server = start_server(
        "--token-file", str(path), "--no-sweep-worker", data_dir=copy_of(trained, tmp_path)
    )
    with Client(server.url, token) as client:
        assert client.references() == []
        args: dict[str, Any] = {"reference": "ref", "num_images": 4, "steps": 3}
        cases: list[tuple[Callable[[], object], type[Exception], str]] = [
            (lambda: client.start_sweep("t", [0.05, 0.3], **args), InvalidInput,
             r"sigma_rels\[1\]"),
            (lambda: client.start_sweep("t", 0.0, **args), InvalidInput, r"sigma_rels\[0\]"),
            (lambda: client.start_sweep("t", "0.05,0.04,...,0.1", **args), InvalidInput,
             "sigma_rels"),
            (lambda: client.start_sweep("nobody", 0.1, **args), NotFound, "run"),
            (lambda: client.start_sweep("t", 0.1, nimgs=[10**9], **args), InvalidInput,
             r"nimgs\[0\]"),
            (lambda: client.start_sweep("t", 0.1, reference="ref", num_images=1), InvalidInput,
             "num_images"),
            (lambda: client.start_sweep("t", 0.1, reference="ref", steps=1), InvalidInput,
             "sampler.steps"),
            (lambda: client.start_sweep("t", 0.1, metrics=["fid", "is"], **args),  # type: ignore[list-item]
             InvalidInput, r"metrics\[1\]"),
            (lambda: client.start_sweep("t", 0.1, **args), NotFound, "reference"),
            (lambda: client.start_sweep("t", 0.1, reference=999, num_images=4), NotFound,
             "reference"),
        ]  # fmt: skip
        for call, error, field in cases:
            with pytest.raises(error, match=field) as raised:
                call()
            assert raised.value.status in (400, 404)  # type: ignore[attr-defined]
        with pytest.raises(NotFound, match="999"):
            client.sweep(999)
        with pytest.raises(NotFound, match="999"):
            client.wait_sweep(999, timeout=10)
        with pytest.raises(ValueError, match="positive int"):
            client.wait_sweep(0)
        # A string is not a yes: "false" must not force a sweep across datasets.
        with pytest.raises(ValueError, match="allow_dataset_mismatch"):
            client.start_sweep("t", 0.1, allow_dataset_mismatch="false", **args)  # type: ignore[arg-type]
        assert client.sweeps() == []  # nothing was queued by the refused requests

        # Imported statistics: FID only.
        for bad in ("wrong", None):
            with Client(server.url, bad) as intruder, pytest.raises(Unauthorized):
                intruder.import_reference("imported", npz_statistics())
        ref = client.import_reference("imported", npz_statistics())
        assert (ref.name, ref.dims, ref.has_features) == ("imported", 2048, False)
        assert [r.name for r in client.references()] == ["imported"]
        with pytest.raises(Conflict, match="imported"):
            client.import_reference("imported", npz_statistics())
        with pytest.raises(InvalidInput, match="metrics"):
            client.start_sweep("t", 0.1, reference="imported", metrics=["fid", "kid"])

        # A wrong token creates and cancels nothing.
        for bad in ("wrong", None):
            with Client(server.url, bad) as intruder, pytest.raises(Unauthorized) as refused:
                intruder.start_sweep("t", [0.05, 0.1], reference="imported", num_images=4)
            assert refused.value.status == 401
        assert client.sweeps() == []
        sweep = client.start_sweep(
            "t", "0.05,0.10,...,0.20", reference=ref.id, num_images=4, batch=2, steps=3
        )
        assert sweep.status == "queued"
        assert [p.sigma_rel for p in sweep.points] == pytest.approx([0.05, 0.10, 0.15, 0.20])
        assert sweep.spec["metrics"] == ["fid"]
        assert sweep.spec["sampler"]["steps"] == 3
        assert any("biased" in w for w in sweep.warnings)
        assert [s.id for s in client.sweeps("t")] == [sweep.id]
        with Client(server.url, "wrong") as intruder, pytest.raises(Unauthorized):
            intruder.cancel_sweep(sweep)
        assert client.sweep(sweep.id).status == "queued"
        cancelled = client.cancel_sweep(sweep)
        assert cancelled.status == "cancelled"
        assert {p.status for p in cancelled.points} == {"cancelled"}
        assert client.cancel_sweep(sweep.id).status == "cancelled"  # again: unchanged


def test_wait_sweep_times_out_then_sees_the_cancel(
    start_server: Callable[..., Server],
    token_file: tuple[Path, str],
    trained: Path,
    tmp_path: Path,
) -> None:
    path, token = token_file
    # No worker: the sweep stays queued until cancelled.
    server = start_server(
        "--token-file", str(path), "--no-sweep-worker", data_dir=copy_of(trained, tmp_path)
    )
    with Client(server.url, token) as client:
        client.import_reference("imported", npz_statistics())
        sweep = client.start_sweep("t", [0.05, 0.1], reference="imported", num_images=4)
        events, record = recorder()
        started = time.monotonic()
        with pytest.raises(SweepTimeout, match="still queued: 0 of 2 points done") as late:
            client.wait_sweep(sweep, timeout=1.0, on_progress=record)
        assert 1.0 <= time.monotonic() - started < 5.0
        assert late.value.sweep is not None
        assert late.value.sweep.status == "queued"
        assert names(events) == ["sweep"]

        def cancel() -> None:
            with Client(server.url, token) as other:
                other.cancel_sweep(sweep.id)

        timer = threading.Timer(1.0, cancel)
        timer.start()
        events, record = recorder()
        with pytest.raises(SweepCancelled, match="cancelled with 0 of 2 points done") as stop:
            client.wait_sweep(sweep.id, timeout=30, on_progress=record)
        timer.join()
        assert names(events) == ["sweep", "point", "point", "end"]
        assert [d["status"] for _, d in events[1:3]] == ["cancelled", "cancelled"]
        assert stop.value.sweep.status == "cancelled"
        assert stop.value.sweep.points_done == 0


def test_wait_sweep_outlives_a_dropped_stream(
    start_server: Callable[..., Server],
    token_file: tuple[Path, str],
    trained: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path, token = token_file
    server = start_server(
        "--token-file", str(path), "--no-sweep-worker", data_dir=copy_of(trained, tmp_path)
    )
    with Client(server.url, token, backoff=0.2) as client:
        client.import_reference("imported", npz_statistics())
        sweep = client.start_sweep("t", [0.05, 0.1], reference="imported", num_images=4)
        events, record = recorder()

        def streams_opened() -> int:
            return sum(f"GET {server.url}/sweeps/{sweep.id}/events" in r.getMessage()
                       for r in caplog.records)  # fmt: skip

        def wait_for(what: str, condition: Callable[[], bool]) -> None:
            deadline = time.monotonic() + 20
            while not condition():
                assert time.monotonic() < deadline, what
                time.sleep(0.05)

        with ThreadPoolExecutor(1) as pool, caplog.at_level(logging.INFO):
            waiting = pool.submit(
                client.wait_sweep, sweep, timeout=60, on_progress=record, poll_interval=0.5
            )
            wait_for("the event stream never opened", lambda: len(events) == 1)
            server.kill()  # SIGKILL: the stream breaks mid-wait
            server.start()  # same port and data; the waiter polls, then reopens the stream
            wait_for("the stream was not reopened", lambda: streams_opened() == 2)
            with Client(server.url, token) as other:
                other.cancel_sweep(sweep.id)
            with pytest.raises(SweepCancelled):
                waiting.result(timeout=60)
        assert any("event stream of sweep 1 broke" in r.getMessage() for r in caplog.records)
        # One sequence of events across the two connections: the sweep once (the reopened
        # stream's opening state is compared, not told again), then the cancel.
        assert names(events) == ["sweep", "point", "point", "end"]


def test_wait_sweep_polls_when_the_stream_keeps_dropping(
    start_server: Callable[..., Server],
    token_file: tuple[Path, str],
    trained: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path, token = token_file
    server = start_server(
        "--token-file", str(path), "--no-sweep-worker", data_dir=copy_of(trained, tmp_path)
    )
    # A stream that drops at once, every time (as behind a proxy that cuts it).
    opened: list[int] = []

    def dropping(self: Client, sid: int, *args: object) -> bool:
        opened.append(sid)
        return False

    monkeypatch.setattr(Client, "_follow_sweep", dropping)
    with Client(server.url, token) as client:
        client.import_reference("imported", npz_statistics())
        sweep = client.start_sweep("t", [0.05, 0.1], reference="imported", num_images=4)
        timer = threading.Timer(1.5, lambda: client.cancel_sweep(sweep))
        timer.start()
        events, record = recorder()
        with caplog.at_level(logging.WARNING, "hindsight_client"), pytest.raises(SweepCancelled):
            client.wait_sweep(sweep, timeout=30, on_progress=record, poll_interval=0.2)
        timer.join()
    assert opened == [sweep.id] * 3  # then it gave up on the stream
    assert any("keeps dropping; polling" in r.getMessage() for r in caplog.records)
    # Polled states are told as the stream would have told them.
    assert names(events) == ["sweep", "point", "point", "end"]
    assert events[1][1]["status"] == "cancelled"


def test_a_failing_point_raises_sweep_failed_naming_it(
    start_server: Callable[..., Server],
    token_file: tuple[Path, str],
    trained: Path,
    tmp_path: Path,
) -> None:
    path, token = token_file
    bogus = tmp_path / "not-inception.pt"
    bogus.write_bytes(b"these are not Inception weights")
    server = start_server(
        "--token-file", str(path), "--fid-weights", str(bogus), data_dir=copy_of(trained, tmp_path)
    )
    with Client(server.url, token) as client:
        client.import_reference("imported", npz_statistics())
        sweep = client.start_sweep(
            "t", [0.05, 0.1], reference="imported", num_images=2, batch=2, steps=2
        )
        events, record = recorder()
        with pytest.raises(SweepFailed) as failed:
            client.wait_sweep(sweep, timeout=60, on_progress=record)
        message = str(failed.value)
        assert f"sweep {sweep.id} of run t failed: 2 of 2 points failed" in message
        assert "point 0 (sigma_rel 0.05, nimg 2000)" in message
        assert "point 1 (sigma_rel 0.1, nimg 2000)" in message
        assert "not-inception.pt" in message  # the worker's own reason
        final = failed.value.sweep
        assert final.status == "failed"
        assert [p.idx for p in final.failed_points] == [0, 1]
        assert all(p.error and p.fid is None for p in final.points)
        assert names(events)[0] == "sweep"
        assert names(events)[-1] == "end"
        assert names(events).count("point") == 2


# -- real sweeps: NVIDIA's Inception weights ------------------------------------------------


def test_a_sweep_end_to_end_with_events_and_the_best_point(
    start_server: Callable[..., Server],
    token_file: tuple[Path, str],
    referenced: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    data, weights = referenced
    path, token = token_file
    server = start_server(
        "--token-file", str(path), "--fid-weights", str(weights), data_dir=copy_of(data, tmp_path)
    )
    with Client(server.url, token) as client:
        (ref,) = client.references()
        assert (ref.name, ref.dims, ref.count, ref.has_features) == ("ref", 2048, 8, True)
        sweep = client.start_sweep(
            "t",
            [0.05, 0.15],
            reference="ref",
            metrics=["fid", "kid"],
            num_images=4,
            seed_sets=2,
            batch=2,
            steps=3,
            kid_subsets=10,
        )
        assert (sweep.status, sweep.points_total, sweep.images_total) == ("queued", 2, 16)
        events, record = recorder()
        points = client.wait_sweep(sweep, timeout=120, on_progress=record)

        seen = names(events)
        assert seen[0] == "sweep"
        assert seen[-1] == "end"
        assert seen.count("point") == 2
        assert "progress" in seen
        for idx in (0, 1):
            done = [d["images_done"] for n, d in events if n == "progress" and d["idx"] == idx]
            assert done == sorted(done), done
            assert max(done) in (6, 8)  # per batch; the last may come with the point
        assert events[-1][1]["status"] == "done"

        assert [(p.idx, p.sigma_rel, p.nimg) for p in points] == [(0, 0.05, 2000), (1, 0.15, 2000)]
        for p in points:
            assert (p.status, p.images_done, p.images_total) == ("done", 8, 8)
            # Two seed sets: a spread over them; KID also has each set's standard error.
            values = [p.fid, p.fid_std, p.kid, p.kid_std]
            assert all(v is not None and math.isfinite(v) for v in values), values
            assert p.fid is not None
            assert p.fid > 0
            fid, kid = p.metric("fid"), p.metric("kid")
            assert fid is not None
            assert len(fid.values) == 2
            assert fid.mean == pytest.approx(sum(fid.values) / 2)
            assert kid is not None
            assert kid.std_errors is not None
            assert len(kid.std_errors) == 2
            assert p.timings["features_s"] > 0
            assert p.grid_url == f"/sweeps/{sweep.id}/points/{p.idx}/grid.png"

        final = client.sweep(sweep)
        assert final.status == "done"
        assert final.images_done == 16
        for metric in ("fid", "kid"):
            best = final.best(metric)
            assert best is not None
            lowest = min(v for p in points if (v := p.value(metric)) is not None)
            assert best.value(metric) == lowest
            assert final.best_points[metric].idx == best.idx
            assert final.best_points[metric].value == lowest
        assert client.sweep_plot(final).startswith("<svg")
        assert client.sweep_plot(final, "kid").startswith("<svg")
        assert client.point_grid(final, 1).startswith(b"\x89PNG\r\n\x1a\n")

        # Waiting on a finished sweep answers at once, with the same points.
        events, record = recorder()
        assert client.wait_sweep(sweep.id, timeout=10, on_progress=record) == points
        assert names(events) == ["sweep", "end"]


def test_cancelling_a_running_sweep_ends_the_wait(
    start_server: Callable[..., Server],
    token_file: tuple[Path, str],
    referenced: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    data, weights = referenced
    path, token = token_file
    server = start_server(
        "--token-file", str(path), "--fid-weights", str(weights), data_dir=copy_of(data, tmp_path)
    )
    with Client(server.url, token) as client:
        # 3 × 400 images: minutes of work, cancelled once its first batch is recorded.
        sweep = client.start_sweep(
            "t", [0.05, 0.1, 0.15], reference="ref", metrics=["fid"], num_images=400, batch=2,
            steps=3,
        )  # fmt: skip
        events: Events = []

        def on_progress(name: str, data: dict[str, Any]) -> None:
            if name == "progress" and data["images_done"] >= 2 and "cancel" not in names(events):
                events.append(("cancel", client.cancel_sweep(sweep).raw))
            events.append((name, data))

        with pytest.raises(SweepCancelled, match="cancelled with 0 of 3 points done") as stop:
            client.wait_sweep(sweep, timeout=120, on_progress=on_progress)
        final = stop.value.sweep
        assert final.status == "cancelled"
        assert {p.status for p in final.points} == {"cancelled"}
        assert 2 <= final.images_done < final.images_total
        (answer,) = [data for name, data in events if name == "cancel"]
        assert answer["status"] == "cancelled"
        assert names(events)[-4:] == ["point", "point", "point", "end"]
