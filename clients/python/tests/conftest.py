"""Fixtures: the real ``hindsight`` binary and real ``hindsight serve`` processes.

The binary comes from ``HINDSIGHT_BIN`` (``.ci/run`` sets it), else the repository's
``target/release/hindsight``; without one the tests fail, they are never skipped. Servers bind
127.0.0.1 on a free port, keep their data in the test's temporary directory, and are killed
when the test ends, whatever happened.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from queue import Empty, Queue
from typing import Any

import pytest
import torch

# The models here are tiny: one thread avoids contention with the servers the tests start.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own cache directory, so its clients' upload spools (under
    ``$XDG_CACHE_HOME/hindsight/spool``) are its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HINDSIGHT_SPOOL_DIR", raising=False)


@pytest.fixture(scope="session")
def hindsight_bin() -> Path:
    given = os.environ.get("HINDSIGHT_BIN")
    path = Path(given) if given else REPO_ROOT / "target" / "release" / "hindsight"
    if not path.is_file():
        pytest.fail(
            f"no hindsight binary at {path}: run `cargo build --release` or set HINDSIGHT_BIN"
        )
    return path.resolve()


def run_cli(
    binary: Path, *args: str, data_dir: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs ``hindsight ARGS`` (with ``--data-dir``), capturing its output."""
    cmd = [str(binary)]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    return subprocess.run(
        [*cmd, *args], input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


class Server:
    """One ``hindsight serve`` process over ``data_dir``."""

    def __init__(self, binary: Path, data_dir: Path, args: tuple[str, ...]) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.args = args
        self.process: subprocess.Popen[str] | None = None
        self.port = 0
        self.log: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        """Starts serving (on the port it had before, if any) and waits until it listens."""
        assert self.process is None or self.process.poll() is not None
        self.process = subprocess.Popen(
            [
                str(self.binary),
                "--data-dir",
                str(self.data_dir),
                "serve",
                "--addr",
                f"127.0.0.1:{self.port}",
                *self.args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: Queue[str] = Queue()
        stderr = self.process.stderr
        assert stderr is not None

        def drain() -> None:
            for line in stderr:
                self.log.append(line)
                lines.put(line)

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.1)
            except Empty:
                if self.process.poll() is not None:
                    break
                continue
            found = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                return self
        self.kill()
        raise RuntimeError("hindsight serve did not start:\n" + "".join(self.log))

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, as a crash or an OOM kill would end it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``hindsight ARGS`` on this server's data directory."""
        return run_cli(self.binary, *args, data_dir=self.data_dir)

    def snapshot_rows(self, run: str) -> list[dict[str, object]]:
        """``hindsight snapshots RUN --json``, read from the data directory."""
        out = self.cli("snapshots", run, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def stored_blobs(self) -> set[str]:
        """Names (digests) of the files in the store's blob tree."""
        return {p.name for p in (self.data_dir / "store" / "blobs").rglob("*") if p.is_file()}

    def temporary_files(self) -> list[Path]:
        """Files in the store's staging directory."""
        tmp = self.data_dir / "store" / "tmp"
        return [p for p in tmp.rglob("*") if p.is_file()] if tmp.exists() else []


@pytest.fixture
def start_server(hindsight_bin: Path, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``start_server(*serve_args, data_dir=None)`` starts a server; all are killed at the end."""
    servers: list[Server] = []

    def start(*args: str, data_dir: Path | None = None) -> Server:
        server = Server(hindsight_bin, data_dir or tmp_path / f"data{len(servers)}", args)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def token_file(hindsight_bin: Path, tmp_path: Path) -> tuple[Path, str]:
    """A token file with one token (``hindsight token new``); returns (file, token)."""
    path = tmp_path / "tokens"
    out = run_cli(hindsight_bin, "token", "new", "--token-file", str(path))
    assert out.returncode == 0, out.stderr
    return path, out.stdout.strip()


def fid_weights() -> Path:
    """NVIDIA's Inception weights from ``HINDSIGHT_FID_WEIGHTS``, else skip (or fail, under
    ``HINDSIGHT_REQUIRE_FID_WEIGHTS=1``)."""
    given = os.environ.get("HINDSIGHT_FID_WEIGHTS")
    if given and Path(given).is_file():
        return Path(given).resolve()
    reason = (
        f"HINDSIGHT_FID_WEIGHTS={given} is not a file" if given else "HINDSIGHT_FID_WEIGHTS unset"
    ) + ": sweeps need NVIDIA's Inception weights (.ci/run fetches them)"
    if os.environ.get("HINDSIGHT_REQUIRE_FID_WEIGHTS") == "1":
        pytest.fail(reason + ", and HINDSIGHT_REQUIRE_FID_WEIGHTS=1 requires them")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def denoiser_snapshots() -> list[Any]:
    """Snapshots (σ_rel 0.05 and 0.10, four times each) of :mod:`tiny_denoiser`'s model
    trained for 200 steps on Fashion-MNIST: a model that is not the EDM2 network, for the
    external evaluators. Fails without Debian's dataset under
    ``HINDSIGHT_REQUIRE_FID_WEIGHTS=1`` (as ``.ci/run`` sets), else skips."""
    import tiny_denoiser

    if not (tiny_denoiser.FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        reason = f"no Fashion-MNIST in {tiny_denoiser.FASHION_MNIST} (dataset-fashion-mnist)"
        if os.environ.get("HINDSIGHT_REQUIRE_FID_WEIGHTS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return tiny_denoiser.train()
