"""Client against a real ``hindsight serve`` (started per test on a temporary data dir)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import Server

from hindsight_client import (
    Client,
    Conflict,
    DigestMismatch,
    InvalidInput,
    NotFound,
    PowerEMA,
    ReconstructionTimeout,
    Snapshot,
    Unauthorized,
)

BATCH = 32
F32_EPS = 2.0**-24


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32), torch.nn.SiLU(), torch.nn.Linear(32, 1)
    )


def train_and_upload(
    client: Client, run: str, steps: int = 300, every: int = 50
) -> tuple[torch.nn.Module, list[Snapshot]]:
    """Trains a tiny regression with PowerEMA updated every step and a snapshot of both
    widths uploaded every ``every`` steps; returns the model and the snapshots."""
    model = tiny_model()
    ema = PowerEMA(model, (0.05, 0.10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    w_true = torch.randn(8, 1, generator=g)
    sent: list[Snapshot] = []
    for step in range(1, steps + 1):
        x = torch.randn(BATCH, 8, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), torch.tanh(x @ w_true))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(step * BATCH)
        if step % every == 0:
            snaps = ema.snapshot()
            # Copies: once spooled, the tracker's snapshots give their buffers back.
            sent += [Snapshot.from_bytes(s.data) for s in snaps]
            client.upload(run, snaps)
    assert all(r.status == "stored" for r in client.flush())
    return model, sent


def weighted_sum(
    report_inputs: list, by_digest: dict[str, Snapshot]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Σ w_k x_k over the report's inputs in float64, and Σ |w_k x_k| (the rounding scale)."""
    total: dict[str, np.ndarray] = {}
    scale: dict[str, np.ndarray] = {}
    for inp in report_inputs:
        for name, value in by_digest[inp.digest].arrays().items():
            if value.dtype.kind != "f":
                continue
            term = inp.weight * value.astype(np.float64)
            total[name] = total.get(name, 0.0) + term
            scale[name] = scale.get(name, 0.0) + np.abs(term)
    return total, scale


def test_round_trip_train_upload_reconstruct_load(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = start_server()
    with Client(server.url) as client:
        model, sent = train_and_upload(client, "tiny")
        by_digest = {s.digest: s for s in sent}
        assert [(r["name"], r["snapshots"]) for r in client.runs()] == [("tiny", len(sent))]
        rows = client.snapshots("tiny")
        assert sorted((r["nimg"], r["sigma_rel"], r["digest"]) for r in rows) == sorted(
            (s.nimg, s.sigma_rel, s.digest) for s in sent
        )

        rec = client.reconstruct("tiny", sigma_rel=0.13, dtype="f32")
        assert (rec.nimg, rec.sigma_rel, rec.dtype) == (300 * BATCH, 0.13, "f32")
        report = rec.report
        assert report.inputs
        assert {i.digest for i in report.inputs} <= set(by_digest)
        assert sum(i.weight for i in report.inputs) == pytest.approx(1.0, abs=1e-9)
        assert report.used_snapshots == len(report.inputs)
        assert 0 <= report.relative_error < 0.05
        assert report.noise_gain > 0
        assert report.coefficient_l1 >= 1 - 1e-12

        model.load_state_dict(rec.state_dict())  # strict: every name and shape matches
        got = model.state_dict()
        expect, scale = weighted_sum(report.inputs, by_digest)
        assert set(expect) == {n for n, t in got.items() if t.is_floating_point()}
        for name, value in expect.items():
            # f32 accumulation: a few roundings of each term's size, no more.
            err = np.abs(got[name].numpy().astype(np.float64) - value)
            assert (err <= 8 * F32_EPS * scale[name] + 1e-30).all(), name
        # The integer counter is copied from the newest snapshot with a weight.
        newest = max(report.inputs, key=lambda i: i.nimg)
        counter = by_digest[newest.digest].arrays()["1.num_batches_tracked"]
        assert int(got["1.num_batches_tracked"]) == int(counter) == newest.nimg // BATCH

        # The default output is f16: the same values rounded once.
        half = client.reconstruct("tiny", sigma_rel=0.13)
        assert half.dtype == "f16"
        assert half.id != rec.id
        f16 = half.state_dict()
        f32 = rec.state_dict()
        for name, t in f16.items():
            if t.is_floating_point():
                assert t.dtype == torch.float16
                torch.testing.assert_close(t, f32[name].half(), rtol=2.0**-10, atol=0)
        path = half.download(tmp_path)
        assert path == tmp_path / half.file_name
        assert blake3.blake3(path.read_bytes()).hexdigest() == half.digest
        assert not list(tmp_path.glob(".*.part"))

        # Asking again is a cache hit with the same content.
        again = client.reconstruct("tiny", sigma_rel=0.13, dtype="f32")
        assert again.cached
        assert again.digest == rec.digest

        # The same snapshots again: skipped by digest, nothing sent, nothing added.
        results = [f.result() for f in client.upload("tiny", sent[-2:])]
        assert [r.status for r in results] == ["skipped", "skipped"]
        assert [r.digest for r in results] == [s.digest for s in sent[-2:]]
        assert len(client.snapshots("tiny")) == len(sent)


def test_same_content_in_another_run_is_sent_not_skipped(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()
    with Client(server.url) as client:
        model = tiny_model()
        ema = PowerEMA(model)
        ema.update(64)
        snaps = ema.snapshot()
        assert [r.status for r in (client.upload_now("a", s) for s in snaps)] == ["stored"] * 2
        assert all(client.has_blob(s.digest) for s in snaps)
        # The store has the bytes, but run "b" does not list them: they must be recorded.
        assert [r.status for r in (client.upload_now("b", s) for s in snaps)] == ["stored"] * 2
        assert len(client.snapshots("b")) == 2
        # Uploading straight away (no skip check) an exact duplicate is idempotent.
        assert client.upload_now("b", snaps[0]).status in ("already_stored", "skipped")


def test_wrong_or_missing_token_is_a_typed_error(
    start_server: Callable[..., Server], token_file: tuple[Path, str]
) -> None:
    path, token = token_file
    server = start_server("--token-file", str(path))
    model = tiny_model()
    ema = PowerEMA(model)
    ema.update(64)
    # Copies made from bytes: a tracker's snapshot is released once spooled, and these are
    # uploaded several times.
    snaps = [Snapshot.from_bytes(s.data) for s in ema.snapshot()]
    for bad in ("not-the-token", None):
        client = Client(server.url, bad)
        futures = client.upload("guarded", snaps[0])
        error = futures[0].exception(timeout=30)
        assert isinstance(error, Unauthorized)
        assert error.status == 401
        assert error.code == "unauthorized"
        assert error.message  # the server's own sentence
        with pytest.raises(Unauthorized):
            client.reconstruct("guarded", sigma_rel=0.1)
        with pytest.raises(Unauthorized):
            client.close()  # close() reports the queued upload's failure too
    with Client(server.url, token) as client:
        assert client.upload_now("guarded", snaps[0]).status == "stored"
    with pytest.raises(Unauthorized, match="401"), Client(server.url, "wrong") as client:
        client.upload("guarded", snaps[1])


def test_api_errors_carry_the_servers_message(start_server: Callable[..., Server]) -> None:
    server = start_server()
    with Client(server.url) as client:
        with pytest.raises(NotFound) as missing:
            client.reconstruct("nobody", sigma_rel=0.1)
        assert "nobody" in missing.value.message
        model = tiny_model()
        ema = PowerEMA(model, (0.05,))
        ema.update(64)
        (snap,) = ema.snapshot()
        client.upload_now("r", snap)
        with pytest.raises(InvalidInput, match="sigma_rel"):
            client.reconstruct("r", sigma_rel=0.3)
        # Different content at the same (nimg, σ_rel): a conflict, raised by flush().
        with torch.no_grad():
            model[0].weight.add_(1.0)
        other = PowerEMA(model, (0.05,))
        other.update(64)
        (changed,) = other.snapshot()
        client.upload("r", changed)
        with pytest.raises(Conflict) as conflict:
            client.flush()
        assert conflict.value.status == 409
        assert client.flush() == []  # each failure is raised once
        # check_finite: the server scans the floats and names what it found.
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
        ema.update(10_000)
        with pytest.raises(InvalidInput, match=r"tensor 0\.weight holds a non-finite value"):
            client.upload_now("r", ema.snapshot()[0], check_finite=True)
        assert [row["nimg"] for row in client.snapshots("r")] == [64]


def test_reconstruction_that_takes_longer_is_polled(
    start_server: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server()
    with Client(server.url) as client:
        train_and_upload(client, "poll", steps=100, every=25)
        with caplog.at_level(logging.INFO, logger="hindsight_client"):
            rec = client.reconstruct("poll", sigma_rel=0.07, dtype="f32", wait_secs=0)
        assert any("being computed; polling" in r.message for r in caplog.records)
        assert not rec.cached
        assert len(rec.digest) == 64
        assert blake3.blake3(rec.read_bytes()).hexdigest() == rec.digest
        assert set(rec.arrays()) == set(tiny_model().state_dict())
        # Out of time: a typed error, while the server goes on computing.
        with pytest.raises(ReconstructionTimeout, match="not ready after 0"):
            client.reconstruct("poll", sigma_rel=0.2, wait_secs=0, timeout=0)
        assert client.reconstruct("poll", sigma_rel=0.2, timeout=60).sigma_rel == 0.2


def test_damaged_download_is_refused_and_nothing_kept(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    # --no-verify: the server sends the blob as it is; the client's own check must catch it.
    server = start_server("--no-verify")
    with Client(server.url, retries=0) as client:
        train_and_upload(client, "dmg", steps=50, every=25)
        rec = client.reconstruct("dmg", sigma_rel=0.1, dtype="f32")
        blob = next(p for p in (server.data_dir / "store" / "blobs").rglob(rec.digest))
        blob.chmod(0o644)
        data = bytearray(blob.read_bytes())
        data[-1] ^= 0x01
        blob.write_bytes(bytes(data))
        out = tmp_path / "out"
        out.mkdir()
        with pytest.raises(DigestMismatch) as mismatch:
            rec.download(out / "weights.safetensors")
        assert mismatch.value.expected == rec.digest
        assert list(out.iterdir()) == []  # neither the file nor its partial download
        with pytest.raises(DigestMismatch):
            rec.state_dict()


def test_server_killed_mid_upload_stores_nothing_and_the_retry_completes(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1024)  # 4 MiB of float32 weights
    ema = PowerEMA(model, (0.05,))
    ema.update(1000)
    (first,) = ema.snapshot()
    with torch.no_grad():
        model.weight.mul_(0.5)
    ema.update(2000)
    (big,) = ema.snapshot()
    with Client(server.url) as client:
        assert client.upload_now("kill", first).status == "stored"

    # 4 MiB at 2 MiB/s: the upload takes about two seconds, killed well before the end.
    slow = Client(
        server.url, retries=10, backoff=0.25, upload_bytes_per_second=2 << 20, chunk_bytes=64 << 10
    )
    (future,) = slow.upload("kill", big)
    deadline = time.monotonic() + 20
    while not server.temporary_files():
        assert time.monotonic() < deadline, "the upload never started streaming"
        assert not future.done(), future.exception()
        time.sleep(0.02)
    assert not future.done()
    server.kill()

    # Nothing half-stored: the index lists the first snapshot only, the blob tree holds its
    # blob only, and every stored blob verifies.
    assert [r["digest"] for r in server.snapshot_rows("kill")] == [first.digest]
    assert big.digest not in server.stored_blobs()
    verify = server.cli("verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "0 problem(s)" in verify.stdout
    # The cut-off write's staging file, not a blob. Start-up recovery removes staging files
    # that no live writer holds locked once they are a second old.
    time.sleep(1.1)
    server.start()  # same port, same data dir; the client is retrying meanwhile
    result = future.result(timeout=120)
    slow.close()
    assert result.status == "stored"
    assert result.digest == big.digest
    rows = server.snapshot_rows("kill")
    assert sorted(r["digest"] for r in rows) == sorted([first.digest, big.digest])
    assert big.digest in server.stored_blobs()
    # The retry's own staging file became the blob; the orphan went at start-up.
    assert server.temporary_files() == []
    gc = server.cli("gc", "--grace-secs", "0")
    assert gc.returncode == 0, gc.stderr
    assert server.temporary_files() == []
    stored = safetensors.torch.load(
        next((server.data_dir / "store" / "blobs").rglob(big.digest)).read_bytes()
    )
    assert torch.equal(stored["weight"], ema.averaged(0.05)["weight"])


def test_the_client_alone_does_not_import_torch() -> None:
    code = (
        "import sys, hindsight_client\n"
        "assert hindsight_client.Client and hindsight_client.Snapshot\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"
