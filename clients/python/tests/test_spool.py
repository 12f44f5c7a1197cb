"""The durable upload spool and the client's run/snapshot API, against real ``hindsight
serve`` processes: refusals never raise inside ``upload``, a full spool is a clear error, a
dead server holds nobody, what one process leaves the next sends, and a server killed for
60 s while the training process itself crashes and resumes loses no snapshot and stores
none twice."""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pytest
import safetensors.torch
import torch
from conftest import Server

from hindsight_client import (
    Client,
    Conflict,
    DigestMismatch,
    HindsightError,
    InvalidInput,
    NotFound,
    PowerEMA,
    Snapshot,
    SpoolFull,
    Unauthorized,
)
from hindsight_client.spool import SpoolEntry

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def snapshots_at(model: torch.nn.Module, *nimgs: int) -> list[Snapshot]:
    """Snapshots of ``model`` (σ_rel 0.05 and 0.10) at each of ``nimgs``."""
    ema = PowerEMA(model, (0.05, 0.10))
    out: list[Snapshot] = []
    for nimg in nimgs:
        ema.update(nimg)
        out += ema.snapshot()
    return out


def dead_url() -> str:
    """A URL where nothing listens (a port just freed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def spooled(spool: Path) -> list[str]:
    return sorted(p.name for p in (spool / "entries").iterdir())


def rows_of(client: Client, run: str) -> list[tuple[int, float, str]]:
    return sorted((r.nimg, r.sigma_rel, r.digest) for r in client.snapshots(run))


def test_upload_takes_only_snapshots(tmp_path: Path) -> None:
    with Client(dead_url(), spool_dir=tmp_path / "spool") as client:
        with pytest.raises(TypeError, match="not bytes"):
            client.upload("r", b"\x00" * 100)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="not dict"):
            client.upload("r", {"w": torch.zeros(2)})  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="item 1 is a int"):
            client.upload("r", [snapshots_at(tiny_model(), 64)[0], 3])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="run must be a non-empty str"):
            client.upload(None, [])  # type: ignore[arg-type]
        assert spooled(client.spool_dir) == []


def test_a_tracker_snapshot_is_released_once_spooled_for_every_run(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()
    ema = PowerEMA(tiny_model(), (0.05,))
    ema.update(64)
    (snap,) = ema.snapshot()
    with Client(server.url) as client:
        # Queued twice in one go: written twice, released after the second.
        client.upload("a", [snap, snap], durable=True)
        first, second = (r.status for r in client.flush())
        assert (first, second in ("skipped", "already_stored")) == ("stored", True)
        assert len(client.snapshots("a")) == 1
        with pytest.raises(HindsightError, match=r"was released.*Snapshot\.from_bytes"):
            client.upload("b", snap)  # at call time, not on the spooler thread
        assert client.flush() == []


def test_an_unusable_spool_fails_uploads_not_the_client(
    start_server: Callable[..., Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default location (here from the environment, as a read-only cache would be) is not
    # the caller's choice: the Client works for everything else and uploads say why they
    # cannot. (An unusable `spool_dir=` given explicitly fails the construction instead:
    # test_newcomer_mistakes_fail_at_once_with_their_reason.)
    server = start_server()
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("HINDSIGHT_SPOOL_DIR", str(tmp_path / "file" / "spool"))
    with Client(server.url) as client:
        snap = snapshots_at(tiny_model(), 64)[0]
        with pytest.raises(HindsightError, match=r"cannot create the upload spool .*file/spool"):
            client.upload("r", snap)
        assert client.upload_now("r", snap).status == "stored"  # no spool needed
        assert client.flush() == []


def test_refusals_go_to_on_error_and_flush_never_upload(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = start_server()
    seen: list[tuple[str, SpoolEntry, BaseException]] = []
    spool = tmp_path / "spool"
    with Client(server.url, spool_dir=spool, on_error=lambda *a: seen.append(a)) as client:
        first = snapshots_at(tiny_model(0), 64)
        assert [r.status for r in (client.upload_now("r", s) for s in first)] == ["stored"] * 2
        # Other values at the same (nimg, σ_rel): 409. Neither upload() raises.
        changed = snapshots_at(tiny_model(1), 64)[0]
        client.upload("r", changed)
        wider = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.Tanh(), torch.nn.Linear(9, 1))
        (fut,) = client.upload("r", snapshots_at(wider, 128)[:1])  # another tensor set: 400
        assert isinstance(fut.exception(timeout=30), InvalidInput)
        with pytest.raises(Conflict) as conflict:
            client.flush()
        assert "1 further upload(s) failed" in "".join(conflict.value.__notes__)
        assert client.flush() == []  # each failure is raised once
        assert [(run, type(e)) for run, _, e in seen] == [("r", Conflict), ("r", InvalidInput)]
        entry = seen[0][1]
        assert (entry.nimg, entry.sigma_rel) == (64, 0.05)
        assert entry.path.parent == spool / "rejected"
        kept = entry.path / entry.file
        assert blake3.blake3(kept.read_bytes()).hexdigest() == entry.digest == changed.digest
        error = json.loads((entry.path / "error.json").read_text())
        assert (error["status"], error["code"]) == (409, "conflict")
        assert spooled(spool) == []
        assert rows_of(client, "r") == sorted((s.nimg, s.sigma_rel, s.digest) for s in first)
        # A refusal at close() is raised by close().
        client.upload("r", snapshots_at(tiny_model(2), 64)[1])
        with pytest.raises(Conflict):
            client.close()
    assert len(seen) == 3


def test_a_full_spool_refuses_before_losing_anything_and_the_next_client_sends(
    start_server: Callable[..., Server], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool"
    snaps = snapshots_at(tiny_model(), 64, 128, 192, 256)
    size = snaps[0].nbytes
    produced = sorted((s.nimg, s.sigma_rel, s.digest) for s in snaps)
    # Nothing listens: the sender fails and backs off, the files stay.
    client = Client(dead_url(), spool_dir=spool, spool_max_bytes=5 * size, max_backoff=1.0)
    with caplog.at_level(logging.WARNING, logger="hindsight_client"):
        client.upload("full", snaps[:2], durable=True)
        client.upload("full", snaps[2:4], durable=True)
        with pytest.raises(SpoolFull) as full:
            client.upload("full", snaps[4:6])
        message = str(full.value)
        assert str(spool) in message
        assert f"bound of {5 * size} bytes" in message
        assert "Client(spool_max_bytes=...)" in message
        assert full.value.used == 4 * size
        assert len(spooled(spool)) == 4
        with pytest.raises(TimeoutError, match="4 snapshot"):
            client.flush(timeout=1.0)
        started = time.monotonic()
        client.close()  # durable already: a dead server does not hold it
        assert time.monotonic() - started < 5
    assert any("are failing" in r.message and str(spool) in r.message for r in caplog.records)
    assert any("stay in the upload spool" in r.message for r in caplog.records)
    assert len(spooled(spool)) == 4

    # A new client on the same spool, a live server: it sends what the first one left.
    server = start_server()
    with Client(server.url, spool_dir=spool) as resumed:
        results = resumed.flush(timeout=60)
        assert sorted(r.status for r in results) == ["stored"] * 4
        assert rows_of(resumed, "full") == produced[:4]
    assert spooled(spool) == []


def test_a_process_that_dies_leaves_its_spool_to_the_next(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    url = dead_url()
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(TESTS)!r})
from test_spool import snapshots_at, tiny_model
from hindsight_client import Client
client = Client({url!r}, spool_dir={str(spool)!r})
client.upload("crash", snapshots_at(tiny_model(), 64, 128), durable=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert out.returncode == -9, out.stderr.decode()
    assert len(spooled(spool)) == 4
    server = start_server()
    with Client(server.url, spool_dir=spool) as client:
        assert sorted(r.status for r in client.flush(timeout=60)) == ["stored"] * 4
        expected = sorted(
            (s.nimg, s.sigma_rel, s.digest) for s in snapshots_at(tiny_model(), 64, 128)
        )
        assert rows_of(client, "crash") == expected
    assert spooled(spool) == []
    assert list((spool / "owners").iterdir()) == []  # the dead owner's lock was swept


def test_two_live_clients_on_one_spool_each_send_their_own(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = start_server()
    spool = tmp_path / "spool"
    snaps = snapshots_at(tiny_model(), *(64 * k for k in range(1, 9)))
    with Client(server.url, spool_dir=spool) as a, Client(server.url, spool_dir=spool) as b:
        fa = a.upload("two", snaps[:8])
        fb = b.upload("two", snaps[8:])
        assert {f.result(timeout=60).status for f in fa + fb} == {"stored"}
        assert len(a.flush(timeout=60)) == 8
        assert len(b.flush(timeout=60)) == 8
        assert len(a.snapshots("two")) == 16


def test_resumed_run_reuploads_without_error_or_new_rows(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = start_server()

    def train(
        model: torch.nn.Module, ema: PowerEMA, opt: Any, g: torch.Generator, steps: range
    ) -> list[Snapshot]:
        snaps = []
        for step in steps:
            x = torch.randn(8, 4, generator=g)
            loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True).sin())
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema.update(step * 8)
            if step % 10 == 0:
                snaps += ema.snapshot()
        return snaps

    model = tiny_model()
    ema = PowerEMA(model, (0.05, 0.10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    first = train(model, ema, opt, g, range(1, 21))
    checkpoint = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "g": g.get_state(),
            "ema": ema.state_dict(),
        },
        checkpoint,
    )
    first += train(model, ema, opt, g, range(21, 41))
    digests = [s.digest for s in first]
    with Client(server.url) as client:
        client.upload("resumed", first)
        assert {r.status for r in client.flush()} == {"stored"}
        before = client.snapshots("resumed")
        assert len(before) == 8

        # "Resume" from step 20, older than the last upload, and redo the same updates.
        ckpt = torch.load(checkpoint, weights_only=False)
        model = tiny_model(5)
        model.load_state_dict(ckpt["model"])
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        opt.load_state_dict(ckpt["opt"])
        g = torch.Generator()
        g.set_state(ckpt["g"])
        ema = PowerEMA(model, (0.05, 0.10))
        ema.load_state_dict(ckpt["ema"])
        again = train(model, ema, opt, g, range(21, 41))
        assert [s.digest for s in again] == digests[4:]  # byte-identical snapshots
        client.upload("resumed", again)
        assert {r.status for r in client.flush()} <= {"skipped", "already_stored"}
        assert client.snapshots("resumed") == before

        # Equal tensors in other bytes (another writer's metadata): a no-op on the server,
        # answered with the stored digest.
        stored = Snapshot.from_bytes(client.download_snapshot("resumed", before[-1]).data)
        tensors = safetensors.torch.load(stored.data)
        other = safetensors.torch.save(
            dict(reversed(tensors.items())),
            metadata={"sigma_rel": repr(stored.sigma_rel), "nimg": str(stored.nimg), "x": "y"},
        )
        assert blake3.blake3(other).hexdigest() != stored.digest
        (fut,) = client.upload("resumed", Snapshot.from_bytes(other))
        result = fut.result(timeout=30)
        assert (result.status, result.digest) == ("already_stored", stored.digest)
        assert client.snapshots("resumed") == before


def test_runs_snapshots_preview_delete_and_download(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = start_server()
    snaps = snapshots_at(tiny_model(), 1000, 2000, 3000)
    with Client(server.url) as client:
        for s in snaps:
            client.upload_now("api", s)
        (run,) = client.runs()
        assert (run.name, run.snapshots, run.last_nimg, run["name"]) == ("api", 6, 3000, "api")
        rows = client.snapshots("api")
        assert [(r.nimg, r.sigma_rel, r.digest) for r in rows] == [
            (s.nimg, s.sigma_rel, s.digest) for s in snaps
        ]
        assert rows[0]["nimg"] == rows[0].nimg == 1000
        assert rows[0].byte_size == snaps[0].nbytes

        report = client.preview("api", sigma_rel=0.07)
        assert (report.sigma_rel, report.nimg) == (0.07, 3000)
        assert sum(i.weight for i in report.inputs) == pytest.approx(1.0)
        assert client.preview("api", gamma=report.gamma, nimg=2000).nimg == 2000
        with pytest.raises(InvalidInput, match="sigma_rel"):
            client.preview("api", sigma_rel=0.5)
        with pytest.raises(NotFound):
            client.preview("nobody", sigma_rel=0.1)
        with pytest.raises(ValueError, match="exactly one"):
            client.preview("api")

        # Download: to a directory (EDM2's name), to a file, into memory.
        path = client.download_snapshot("api", rows[1], tmp_path)
        assert path == tmp_path / snaps[1].file_name()
        assert isinstance(path, Path)
        assert path.read_bytes() == snaps[1].data
        named = client.download_snapshot("api", rows[2].id, tmp_path / "x.safetensors")
        assert named == tmp_path / "x.safetensors"
        assert named.read_bytes() == snaps[2].data  # type: ignore[union-attr]
        snap = client.download_snapshot("api", rows[3].id)
        assert isinstance(snap, Snapshot)
        assert (snap.nimg, snap.sigma_rel, snap.digest) == (2000, 0.10, snaps[3].digest)
        with pytest.raises(NotFound):
            client.download_snapshot("api", 10_000)

        deleted = client.delete_snapshot("api", rows[0])
        assert (deleted.deleted.id, deleted.deleted.digest) == (rows[0].id, rows[0].digest)
        assert deleted.blob_removed
        assert [r.id for r in client.snapshots("api")] == [r.id for r in rows[1:]]
        with pytest.raises(NotFound):
            client.delete_snapshot("api", rows[0].id)


def test_download_refuses_damaged_bytes(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    # --no-verify: the server sends the blob as it is; the client's own check must catch it.
    server = start_server("--no-verify")
    (snap,) = snapshots_at(tiny_model(), 64)[:1]
    with Client(server.url, retries=0) as client:
        client.upload_now("dmg", snap)
        (row,) = client.snapshots("dmg")
        blob = next(p for p in (server.data_dir / "store" / "blobs").rglob(row.digest))
        blob.chmod(0o644)
        data = bytearray(blob.read_bytes())
        data[-1] ^= 0x01
        blob.write_bytes(bytes(data))
        out = tmp_path / "out"
        out.mkdir()
        with pytest.raises(DigestMismatch) as mismatch:
            client.download_snapshot("dmg", row, out)
        assert mismatch.value.expected == row.digest
        assert list(out.iterdir()) == []  # neither the file nor its partial download
        with pytest.raises(DigestMismatch):
            client.download_snapshot("dmg", row)


def test_newcomer_mistakes_fail_at_once_with_their_reason(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    # A URL without a scheme is not a network outage to retry.
    with pytest.raises(ValueError, match="http://"):
        Client("localhost:8080")
    # A spool directory the caller chose and that cannot be used: said on construction.
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    server = start_server()
    with pytest.raises(HindsightError, match="spool"):
        Client(server.url, spool_dir=not_a_dir / "spool")
    (snap,) = snapshots_at(tiny_model(), 64)[:1]
    with Client(server.url, retries=0) as client:
        # Run names a URL path cannot carry are refused by the client, naming the field.
        for name in ("..", ".", ""):
            with pytest.raises(ValueError, match="run"):
                client.upload_now(name, snap)
        client.upload_now("ok", snap)
        (row,) = client.snapshots("ok")
        # A path ending in a separator is a directory, made if missing.
        path = client.download_snapshot("ok", row, f"{tmp_path / 'new-dir'}/")
        assert path.parent == tmp_path / "new-dir"
        assert path.name.endswith(".safetensors")
        assert path.read_bytes() == snap.data


def test_check_reports_the_token(
    start_server: Callable[..., Server], token_file: tuple[Path, str]
) -> None:
    path, token = token_file
    server = start_server("--token-file", str(path))
    with Client(server.url, token, check=True) as good:
        status = good.check()
        assert (status.tokens_required, status.token, status.can_write) == (True, "valid", True)
    for bad in ("not-the-token", None):
        with pytest.raises(Unauthorized, match="token") as refused:
            Client(server.url, bad, check=True)
        assert refused.value.status == 401
    open_server = start_server()
    with Client(open_server.url) as anyone:
        assert anyone.check().can_write
    with pytest.raises(HindsightError):  # TransportError: nobody answers
        Client(dead_url(), retries=0, check=True)


def test_server_killed_for_60_s_while_training_crashes_and_resumes(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = start_server()
    spool = tmp_path / "spool"
    produced = tmp_path / "produced.jsonl"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def trainer(phase: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable,
                str(TESTS / "spool_trainer.py"),
                "--url",
                server.url,
                "--spool",
                str(spool),
                "--checkpoint",
                str(tmp_path / "ckpt.pt"),
                "--produced",
                str(produced),
                "--phase",
                phase,
            ],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / f"{phase}.log", "w"),
            text=True,
        )

    first = trainer("first")
    assert first.stdout is not None
    assert first.stdin is not None
    assert first.stdout.readline().strip() == "SENT", (tmp_path / "first.log").read_text()
    assert len(server.snapshot_rows("outage")) == 4
    server.kill()
    killed_at = time.monotonic()
    first.stdin.write("go\n")
    first.stdin.flush()
    assert first.stdout.readline().strip() == "SPOOLED"
    assert first.wait(timeout=60) == -9  # the training process crashed (SIGKILL)
    left = spooled(spool)
    assert len(left) == 4  # the 3rd and 4th snapshots of both widths, none sent

    second = trainer("second")
    time.sleep(max(0.0, 60.0 - (time.monotonic() - killed_at)))
    assert second.poll() is None  # still waiting for the server
    server.start()  # same port, same data directory
    out, _ = second.communicate(timeout=120)
    log = (tmp_path / "second.log").read_text()
    assert second.returncode == 0, log
    assert out.startswith("DONE")

    keys = [json.loads(line) for line in produced.read_text().splitlines()]
    # The 4th interval was produced twice (before the crash and after the resume), with
    # the same bytes; every snapshot is stored once.
    unique = {(k["nimg"], k["sigma_rel"], k["digest"]) for k in keys}
    assert len(keys) == 14
    assert len(unique) == 12
    assert len({(n, s) for n, s, _ in unique}) == 12
    rows = server.snapshot_rows("outage")
    assert sorted((r["nimg"], r["sigma_rel"], r["digest"]) for r in rows) == sorted(unique)
    assert spooled(spool) == []
    assert list((spool / "rejected").iterdir()) == []
    assert log.count("are failing") == 1, log
    assert "work again after" in log, log


def test_retry_after_and_the_backoff_schedule(tmp_path: Path) -> None:
    import email.utils

    import httpx

    from hindsight_client.transport import retry_after

    def answer(value: str | None) -> httpx.Response:
        headers = {} if value is None else {"Retry-After": value}
        return httpx.Response(503, headers=headers)

    assert retry_after(answer("7")) == 7.0
    assert retry_after(answer(None)) is None
    assert retry_after(answer("soon")) is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < (retry_after(answer(later)) or 0) <= 30
    with Client(dead_url(), spool_dir=tmp_path / "s", backoff=0.5, max_backoff=8.0) as client:
        uploads = client._uploads
        for attempt, cap in [(1, 0.5), (2, 1.0), (4, 4.0), (5, 8.0), (50, 8.0)]:
            waits = [uploads._delay(attempt, None) for _ in range(200)]
            assert cap / 2 <= min(waits), attempt  # jittered ...
            assert max(waits) <= cap, attempt  # ... and capped
        assert uploads._delay(1, 20.0) == 20.0  # Retry-After is honoured
        assert uploads._delay(1, 1e6) == 600.0  # within reason


def test_busy_answers_are_retried_after_their_retry_after(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    import http.server

    import httpx

    server = start_server()
    posts: list[tuple[float, int]] = []  # (time, status answered)
    busy = [503, 429]  # the first two uploads are turned away

    class Proxy(http.server.BaseHTTPRequestHandler):
        """Forwards to the real server, except that it answers the first uploads 503/429
        with ``Retry-After: 1``."""

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.command == "POST" and busy:
                status = busy.pop(0)
                posts.append((time.monotonic(), status))
                self.send_response(status)
                self.send_header("Retry-After", "1")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.command == "POST":
                posts.append((time.monotonic(), 0))
            headers = {
                k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")
            }
            answer = httpx.request(
                self.command, server.url + self.path, content=body, headers=headers, timeout=30
            )
            self.send_response(answer.status_code)
            for k in ("Content-Type",):
                if k in answer.headers:
                    self.send_header(k, answer.headers[k])
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        do_GET = do_POST = do_HEAD = _forward  # noqa: N815

        def log_message(self, *args: Any) -> None:
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{proxy.server_address[1]}"
        with Client(url, spool_dir=tmp_path / "s", backoff=0.05, max_backoff=0.1) as client:
            (snap,) = snapshots_at(tiny_model(), 64)[:1]
            (future,) = client.upload("busy", snap)
            assert future.result(timeout=30).status == "stored"
    finally:
        proxy.shutdown()
    assert [s for _, s in posts] == [503, 429, 0]
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(posts)]
    assert all(gap >= 0.95 for gap in gaps), gaps  # Retry-After, not the 0.1 s backoff


def test_reconstruct_copies_declared_buffers_when_asked(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    ema = PowerEMA(model, (0.05, 0.10))
    snaps: list[Snapshot] = []
    for k in range(1, 5):
        model.train()
        model(torch.randn(16, 4))  # moves the BatchNorm statistics
        ema.update(k * 1000)
        snaps += [Snapshot.from_bytes(s.data) for s in ema.snapshot()]
    with Client(server.url) as client:
        for s in snaps:
            client.upload_now("bn", s)
        copied = client.reconstruct("bn", sigma_rel=0.07, dtype="f32", buffers="copy")
        averaged = client.reconstruct("bn", sigma_rel=0.07, dtype="f32")
        last = max(i.nimg for i in copied.report.inputs)
        newest = [
            s.arrays()["1.running_mean"]
            for s in snaps
            if s.nimg == last and s.digest in {i.digest for i in copied.report.inputs}
        ]
        got, avg = copied.arrays(), averaged.arrays()
        assert any((got["1.running_mean"] == m).all() for m in newest), (got, newest)
        assert not any((avg["1.running_mean"] == m).all() for m in newest)
        assert (got["0.weight"] == avg["0.weight"]).all()  # parameters are averaged either way
        with pytest.raises(ValueError, match="buffers"):
            client.reconstruct("bn", sigma_rel=0.07, buffers="last")  # type: ignore[arg-type]
