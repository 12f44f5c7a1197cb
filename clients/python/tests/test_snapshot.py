"""Snapshots: the module's state-dict names, nimg and σ_rel in ``__metadata__``, EDM2's file
names, and ``hindsight import`` (the real binary) reading a folder of them."""

from __future__ import annotations

import io
import json
import re
import struct
from pathlib import Path

import blake3
import pytest
import safetensors.torch
import torch
from conftest import run_cli

from hindsight_client import PowerEMA, Snapshot, TrackerError, save_snapshots


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
