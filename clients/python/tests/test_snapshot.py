"""Snapshots: the module's state-dict names, nimg and σ_rel in ``__metadata__``, EDM2's file
names, and ``hindsight import`` (the real binary) reading a folder of them; deterministic
bytes (across calls, threads and processes), the safetensors layout, the lazy cast and its
range check, and the host-buffer pool behind ``release()``."""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import httpx
import pytest
import safetensors.torch
import torch
from conftest import Server, run_cli

import hindsight_client
from hindsight_client import (
    Client,
    HindsightError,
    PowerEMA,
    Snapshot,
    TrackerError,
    save_snapshots,
)


def header(data: bytes) -> dict:
    """A safetensors file's JSON header (8-byte little-endian length, then the JSON)."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])


def tracked(steps: int = 5, batch: int = 1000) -> tuple[torch.nn.Module, PowerEMA]:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    ema = PowerEMA(module, (0.05, 0.10))
    for k in range(1, steps + 1):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.1 * k)
        module(torch.randn(2, 1, 5, 5))
        ema.update(k * batch)
    return module, ema


def test_snapshot_holds_the_ema_under_state_dict_names() -> None:
    module, ema = tracked()
    snaps = ema.snapshot()
    assert [s.sigma_rel for s in snaps] == [0.05, 0.10]
    for snap in snaps:
        assert snap.nimg == 5000
        assert snap.digest == blake3.blake3(snap.data).hexdigest()
        loaded = safetensors.torch.load(snap.data)
        assert set(loaded) == set(module.state_dict())
        for name, value in ema.averaged(snap.sigma_rel).items():
            assert torch.equal(loaded[name], value), name
        assert header(snap.data)["__metadata__"] == {
            "hindsight.buffers": '["1.num_batches_tracked","1.running_mean","1.running_var"]',
            "nimg": "5000",
            "sigma_rel": repr(snap.sigma_rel),
        }


def test_half_precision_snapshots_and_overflow(tmp_path: Path) -> None:
    module, ema = tracked()
    (snap, _) = ema.snapshot(dtype=torch.float16)
    loaded = safetensors.torch.load(snap.data)
    assert loaded["0.weight"].dtype == torch.float16
    assert loaded["1.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(loaded["0.weight"], ema.averaged(0.05)["0.weight"].half())
    with torch.no_grad():
        module[0].weight.fill_(1e6)
    ema.update(10_000)
    # The cast happens where the snapshot is written (the upload thread), and raises there.
    snaps = ema.snapshot(dtype=torch.float16)
    assert snaps[0].nbytes == len(snap.data)
    for write in (
        lambda s: s.write_to(io.BytesIO()),
        lambda s: s.digest,
        lambda s: s.data,
        lambda s: s.save(tmp_path),
    ):
        with pytest.raises(TrackerError, match=r"0\.weight: values beyond torch\.float16's range"):
            write(snaps[0])
    assert not list(tmp_path.iterdir())  # save() left no partial file
    (bf16, _) = ema.snapshot(dtype=torch.bfloat16)
    assert safetensors.torch.load(bf16.data)["0.weight"].dtype == torch.bfloat16
    assert ema.snapshot(dtype=torch.float32)[0].nimg == 10_000
    # Just above float16's largest value rounds to it (no error); NaN passes through.
    with torch.no_grad():
        module[0].weight.fill_(65510.0)
        module[0].bias.fill_(float("nan"))
    ema.update(1_000_000)
    loaded = safetensors.torch.load(ema.snapshot(dtype=torch.float16)[1].data)
    assert bool((loaded["0.weight"] == 65504.0).all())
    assert bool(loaded["0.bias"].isnan().all())


def test_saved_with_edm2_names_and_imported_by_hindsight(
    hindsight_bin: Path, tmp_path: Path
) -> None:
    _, ema = tracked(steps=3, batch=4_194_304)
    first = ema.snapshot()
    ema.update(4 * 4_194_304)
    second = ema.snapshot()
    paths = save_snapshots(first + second, tmp_path / "snaps")
    assert sorted(p.name for p in paths) == [
        "network-snapshot-0012582-0.050.safetensors",
        "network-snapshot-0012582-0.100.safetensors",
        "network-snapshot-0016777-0.050.safetensors",
        "network-snapshot-0016777-0.100.safetensors",
    ]
    assert [p.read_bytes() for p in paths] == [s.data for s in first + second]
    assert not list((tmp_path / "snaps").glob(".*"))  # no temporary file left

    data = tmp_path / "data"
    out = run_cli(hindsight_bin, "import", str(tmp_path / "snaps"), "--run", "py", data_dir=data)
    assert out.returncode == 0, out.stderr
    out = run_cli(hindsight_bin, "snapshots", "py", "--json", data_dir=data)
    assert out.returncode == 0, out.stderr
    rows = {(r["nimg"], r["sigma_rel"]): r["digest"] for r in json.loads(out.stdout)}
    # nimg comes from __metadata__ exactly (the names' kimg would round it).
    assert rows == {(s.nimg, s.sigma_rel): s.digest for s in first + second}


def test_names_that_would_collide_are_refused_before_writing(tmp_path: Path) -> None:
    a = Snapshot(nimg=1000, sigma_rel=0.05, data=b"a")
    b = Snapshot(nimg=1999, sigma_rel=0.0501, data=b"b")
    with pytest.raises(ValueError, match=re.escape("network-snapshot-0000001-0.050.safetensors")):
        save_snapshots([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_snapshots_are_byte_identical_across_calls_threads_and_processes(tmp_path: Path) -> None:
    _, ema = tracked()
    by_width: dict[float, set[str]] = {0.05: set(), 0.10: set()}
    for _ in range(20):
        for snap in ema.snapshot():
            by_width[snap.sigma_rel].add(snap.digest)
    assert [len(d) for d in by_width.values()] == [1, 1]
    # Serialised on another thread (as the upload thread does): the same bytes.
    snap = ema.snapshot()[0]
    out = io.BytesIO()
    with ThreadPoolExecutor(1) as pool:
        digest = pool.submit(snap.write_to, out).result()
    assert digest == blake3.blake3(out.getvalue()).hexdigest() == snap.digest
    assert out.getvalue() == snap.data
    assert [snap.digest] == list(by_width[0.05])

    # Another process (another hash seed) resumes the tracker's state and writes its files.
    torch.save(ema.state_dict(), tmp_path / "state.pt")
    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(hindsight_client.__file__).parents[1])!r})
from hindsight_client import PowerEMA, save_snapshots
module = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
ema = PowerEMA(module, (0.05, 0.10))
ema.load_state_dict(torch.load(sys.argv[1], weights_only=True))
save_snapshots(ema.snapshot(), sys.argv[2])
"""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "state.pt"), str(tmp_path / "other")],
        check=True,
        env=env,
        timeout=120,
    )
    ours = save_snapshots(ema.snapshot(), tmp_path / "ours")
    for path in ours:
        assert (tmp_path / "other" / path.name).read_bytes() == path.read_bytes(), path.name


def test_the_file_layout_is_the_safetensors_format() -> None:
    module, ema = tracked()
    for snap in ema.snapshot(dtype=torch.float16):
        data = snap.data
        assert snap.nbytes == len(data)
        (length,) = struct.unpack("<Q", data[:8])
        assert length % 8 == 0  # the tensors start 8-byte aligned
        text = data[8 : 8 + length].decode()
        assert text == text.rstrip() + " " * (len(text) - len(text.rstrip()))
        parsed = json.loads(text)
        # Keys sorted (the metadata's too), tensors' bytes in sorted-name order, no holes.
        assert list(parsed) == sorted(parsed)
        assert list(parsed["__metadata__"]) == sorted(parsed["__metadata__"])
        names = sorted(n for n in parsed if n != "__metadata__")
        offsets = [parsed[n]["data_offsets"] for n in names]
        assert offsets[0][0] == 0
        assert all(a[1] == b[0] for a, b in itertools.pairwise(offsets))
        assert offsets[-1][1] == len(data) - 8 - length
        # Read back exactly by safetensors itself, and equal to what safetensors writes.
        loaded = safetensors.torch.load(data)
        theirs = safetensors.torch.load(
            safetensors.torch.save(loaded, metadata=parsed["__metadata__"])
        )
        for name, value in ema.averaged(snap.sigma_rel).items():
            expect = value.half() if value.is_floating_point() else value
            assert torch.equal(loaded[name], expect), name
            assert torch.equal(theirs[name], expect), name
        assert json.loads(parsed["__metadata__"]["hindsight.buffers"]) == sorted(
            n for n, _ in module.named_buffers()
        )


def test_a_snapshot_keeps_its_values_while_training_goes_on() -> None:
    module, ema = tracked()
    before = {k: v.clone() for k, v in ema.averaged(0.05).items()}
    (snap, _) = ema.snapshot()
    with torch.no_grad():
        module[0].weight.add_(1.0)
    ema.update(6000)
    ema.load_state_dict(ema.state_dict())
    loaded = safetensors.torch.load(snap.data)
    assert all(torch.equal(loaded[k], v) for k, v in before.items())
    assert not torch.equal(loaded["0.weight"], ema.averaged(0.05)["0.weight"])


def test_snapshots_borrow_the_host_emas_and_release_gives_them_back() -> None:
    """On the CPU a snapshot reads the EMA's own storage (no copy on the training thread);
    an update while it is unreleased moves the EMA to spare storage, and the released
    storage becomes the next spare. References to the tracker's tensors stay live."""
    module, ema = tracked()
    spares, staging = ema._spares, ema._staging
    held = ema.averaged(0.05)
    before = {k: v.clone() for k, v in held.items()}
    first = ema.snapshot()
    assert (spares.allocated, spares.idle) == (0, 0)
    assert staging.allocated == 2  # the integer counter is copied (one set per width)

    def train(nimg: int) -> None:
        with torch.no_grad():
            module[0].weight.add_(0.5)
        ema.update(nimg)

    train(6000)  # first is unreleased: the EMAs move, one spare set per width
    assert (spares.allocated, spares.idle) == (2, 0)
    assert all(held[k] is v for k, v in ema.averaged(0.05).items())  # still the tracker's
    assert not torch.equal(held["0.weight"], before["0.weight"])
    loaded = safetensors.torch.load(first[0].data)
    assert all(torch.equal(loaded[k], v) for k, v in before.items())
    digest, nbytes = first[0].digest, first[0].nbytes
    for snap in first:
        snap.release()
        snap.release()  # idempotent
    assert (spares.allocated, spares.idle) == (2, 2)
    # Afterwards: time, width, size, the digest and the bytes built before remain (first[0]);
    # bytes never built are gone (first[1]).
    assert (first[0].nimg, first[0].sigma_rel, first[0].nbytes) == (5000, 0.05, nbytes)
    assert first[0].digest == digest
    assert safetensors.torch.load(first[0].data).keys() == loaded.keys()
    with pytest.raises(HindsightError, match="released"):
        first[1].write_to(io.BytesIO())
    with pytest.raises(HindsightError, match="released"):
        _ = first[1].digest
    with pytest.raises(HindsightError, match="released"):
        _ = first[1].data
    # Bytes built before the release stay (and need no buffer).
    built = ema.snapshot()[0]
    data = built.data
    built.release()
    assert built.data is data
    assert built.write_to(io.BytesIO()) == built.digest
    del built

    # Released before the next update: the EMA stays where it is.
    for snap in ema.snapshot():
        snap.write_to(io.BytesIO())
        snap.release()
    train(7000)
    assert (spares.allocated, spares.idle) == (2, 2)
    # Two calls share the storage; it is free once both are released (or collected).
    a, b = ema.snapshot(), ema.snapshot()
    assert a[0].digest == b[0].digest
    for snap in a:
        snap.release()
    train(8000)  # b still reads: the EMAs move to the two spare sets
    assert (spares.allocated, spares.idle) == (2, 0)
    del b
    assert (spares.allocated, spares.idle) == (2, 2)
    # Unreleased snapshots never make anyone wait: more storage is allocated.
    kept = [ema.snapshot() for _ in range(3)]
    for k in range(3):
        kept.append(ema.snapshot())
        train(9000 + k)
    assert spares.allocated == 2 + 2 * 3 - 2
    del kept
    assert spares.idle == 2  # the pool keeps one call's worth


def test_snapshots_from_bytes_and_keyword_construction() -> None:
    _, ema = tracked()
    (snap, _) = ema.snapshot()
    wrapped = Snapshot.from_bytes(snap.data)
    assert (wrapped.nimg, wrapped.sigma_rel, wrapped.nbytes) == (5000, 0.05, snap.nbytes)
    assert wrapped.digest == snap.digest
    assert Snapshot.from_bytes(snap.data, nimg=7, sigma_rel=0.2).nimg == 7
    made = Snapshot(nimg=5000, sigma_rel=0.05, data=snap.data)
    made.release()  # bytes given by the caller stay
    assert made.data == snap.data
    assert made.arrays()["0.weight"].shape == (2, 1, 3, 3)
    out = io.BytesIO()
    assert made.write_to(out) == snap.digest
    assert out.getvalue() == snap.data
    bare = safetensors.torch.save({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="no nimg"):
        Snapshot.from_bytes(bare)
    with pytest.raises(ValueError, match="not a safetensors file"):
        Snapshot.from_bytes(b"\xff" * 16)


def test_declared_buffers_are_copied_from_the_newest_snapshot_on_request(
    start_server: Callable[..., Server],
) -> None:
    """``hindsight.buffers`` names the BatchNorm statistics; ``"buffers": "copy"`` makes the
    server take them from the newest snapshot (as EDM2's reconstruct_phema.py does) and
    average everything else; the default averages them."""
    server = start_server()
    module, ema = tracked(steps=2)
    with Client(server.url) as client:
        for k in range(3, 7):
            with torch.no_grad():
                module[0].weight.add_(0.1)
            module(torch.randn(2, 1, 5, 5) * k)
            ema.update(k * 1000)
            client.upload("bn", ema.snapshot())
        client.flush()
    newest = [{n: t.clone() for n, t in ema.averaged(s).items()} for s in (0.05, 0.10)]

    def weights(**extra: object) -> dict[str, torch.Tensor]:
        body = {"run": "bn", "sigma_rel": 0.07, "dtype": "f32", "wait_secs": 60, **extra}
        answer = httpx.post(f"{server.url}/reconstruct", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        url = server.url + answer.json()["weights_url"]
        return safetensors.torch.load(httpx.get(url, timeout=120).content)

    copied, averaged = weights(buffers="copy"), weights()
    for name in ("1.running_mean", "1.running_var"):
        assert any(torch.equal(copied[name], n[name]) for n in newest), name
        assert not any(torch.equal(averaged[name], n[name]) for n in newest), name
    for name in ("0.weight", "1.weight"):
        assert torch.equal(copied[name], averaged[name]), name
    assert int(copied["1.num_batches_tracked"]) == int(newest[0]["1.num_batches_tracked"])
