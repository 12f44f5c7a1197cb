"""PowerEMA against the Rust tracker (``hindsight ema-track``) and the closed form.

Setting: a module's values change every training step (a seeded random walk, batch 64
images); the tracker is updated every k-th step with the true image count. After every update
the EMA of width γ must equal

    Σ_j x_j ((t_j/T)^(γ+1) − (t_{j−1}/T)^(γ+1)),   T the update's time,

where x_j is the state at update j (held over (t_{j−1}, t_j]) and the initial state stands for
(0, t_0] — and must match what ``hindsight::phema::PowerEma`` computes from the same values.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from hindsight_client import PowerEMA, TrackerError, sigma_rel_to_gamma

BATCH = 64
SIGMA_RELS = (0.05, 0.10)


def make_module(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))


def trajectory(module: torch.nn.Module, steps: int, seed: int = 1) -> list[torch.Tensor]:
    """The flat parameter vector after each of ``steps`` steps of a seeded random walk."""
    g = torch.Generator().manual_seed(seed)
    start = torch.nn.utils.parameters_to_vector(module.parameters()).detach()
    walk = torch.cumsum(torch.randn(steps, start.numel(), generator=g) * 0.1, dim=0)
    return [start + walk[k] for k in range(steps)]


def set_params(module: torch.nn.Module, flat: torch.Tensor) -> None:
    torch.nn.utils.vector_to_parameters(flat.to(torch.float32), module.parameters())


def flat_ema(ema: PowerEMA, sigma_rel: float) -> np.ndarray:
    sd = ema.averaged(sigma_rel)
    return torch.cat([t.reshape(-1) for t in sd.values()]).numpy().astype(np.float64)


def rust_track(binary: Path, nimg0: int, initial: np.ndarray, updates: list) -> dict:
    request = {
        "sigma_rels": list(SIGMA_RELS),
        "nimg0": nimg0,
        "initial": [float(v) for v in initial],
        "updates": [[n, [float(v) for v in x]] for n, x in updates],
    }
    out = run_cli(binary, "ema-track", stdin=json.dumps(request))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def closed_form(gamma: float, nimg0: int, initial: np.ndarray, updates: list) -> np.ndarray:
    """The exact power-function EMA at the last update's time, in float64."""
    t_end = float(updates[-1][0])
    total = initial.astype(np.float64) * (nimg0 / t_end) ** (gamma + 1)
    prev = float(nimg0)
    for t, x in updates:
        mass = (t / t_end) ** (gamma + 1) - (prev / t_end) ** (gamma + 1)
        total = total + x.astype(np.float64) * mass
        prev = float(t)
    return total


@pytest.mark.parametrize("every", [1, 7, 100])
@pytest.mark.parametrize("nimg0", [0, 5000])
def test_matches_rust_tracker_and_closed_form(hindsight_bin: Path, every: int, nimg0: int) -> None:
    steps = 700
    module = make_module()
    initial = torch.nn.utils.parameters_to_vector(module.parameters()).detach().numpy().copy()
    ema = PowerEMA(module, SIGMA_RELS, nimg=nimg0)
    updates, ours = [], []
    for k, flat in enumerate(trajectory(module, steps), start=1):
        set_params(module, flat)
        if k % every == 0:
            nimg = nimg0 + k * BATCH
            ema.update(nimg)
            updates.append((nimg, flat.numpy().copy()))
            ours.append([flat_ema(ema, s) for s in SIGMA_RELS])
    assert len(updates) == steps // every

    rust = rust_track(hindsight_bin, nimg0, initial, updates)
    assert rust["gammas"] == pytest.approx(ema.gammas, rel=1e-15)
    scale = max(np.abs(x).max() for _, x in updates)
    for i, step in enumerate(rust["updates"]):
        assert step["nimg"] == updates[i][0]
        for w in range(len(SIGMA_RELS)):
            np.testing.assert_allclose(
                ours[i][w], np.array(step["emas"][w]), rtol=0, atol=4e-7 * scale
            )
            # The closed form at this update's time, every tenth update (and the last).
            if i % 10 == 0 or i == len(updates) - 1:
                expect = closed_form(ema.gammas[w], nimg0, initial, updates[: i + 1])
                np.testing.assert_allclose(ours[i][w], expect, rtol=0, atol=2e-6 * scale)


def test_gamma_matches_the_server_side_conversion(hindsight_bin: Path) -> None:
    widths = [1e-6, 0.01, 0.05, 0.1, 0.13, 0.25, 0.2886]
    request = {"sigma_rels": widths, "initial": [0.0], "updates": []}
    out = run_cli(hindsight_bin, "ema-track", stdin=json.dumps(request))
    assert out.returncode == 0, out.stderr
    rust = json.loads(out.stdout)["gammas"]
    assert [sigma_rel_to_gamma(s) for s in widths] == pytest.approx(rust, rel=4e-16)


def test_bf16_module_is_tracked_in_float32() -> None:
    module = make_module().to(torch.bfloat16)
    ema = PowerEMA(module, SIGMA_RELS)
    flats = trajectory(module, 50)
    for k, flat in enumerate(flats, start=1):
        torch.nn.utils.vector_to_parameters(flat.to(torch.bfloat16), module.parameters())
        ema.update(k * BATCH)
    assert all(t.dtype == torch.float32 for t in ema.averaged(0.05).values())
    held = [(k * BATCH, f.to(torch.bfloat16).float().numpy()) for k, f in enumerate(flats, 1)]
    initial = np.zeros_like(held[0][1])  # nimg0 = 0: the initial state has no weight
    for w, s in enumerate(SIGMA_RELS):
        expect = closed_form(ema.gammas[w], 0, initial, held)
        # Far finer than bf16's resolution (2^-8 relative): the average is not rounded to it.
        np.testing.assert_allclose(flat_ema(ema, s), expect, rtol=0, atol=1e-6)


def test_float_buffers_averaged_integer_buffers_copied() -> None:
    torch.manual_seed(0)
    module = torch.nn.BatchNorm1d(4)
    ema = PowerEMA(module, SIGMA_RELS, device="cpu")
    means = []
    for k in range(1, 21):
        module(torch.randn(8, 4) + k)  # training mode: updates running stats and the counter
        ema.update(k * 32)
        means.append((k * 32, module.running_mean.detach().numpy().copy()))
    for w, s in enumerate(SIGMA_RELS):
        averaged = ema.averaged(s)
        assert averaged["num_batches_tracked"].dtype == torch.int64
        assert int(averaged["num_batches_tracked"]) == 20
        expect = closed_form(ema.gammas[w], 0, np.zeros(4), means)
        np.testing.assert_allclose(averaged["running_mean"].numpy(), expect, atol=2e-6)
        assert not torch.equal(averaged["running_mean"], module.running_mean)


def test_resume_from_state_dict_continues_identically() -> None:
    def run(split: int | None) -> PowerEMA:
        module = make_module()
        ema = PowerEMA(module, SIGMA_RELS)
        for k, flat in enumerate(trajectory(module, 60), start=1):
            set_params(module, flat)
            ema.update(k * BATCH)
            if k == split:
                buffer = io.BytesIO()
                torch.save(ema.state_dict(), buffer)
                buffer.seek(0)
                ema = PowerEMA(module, SIGMA_RELS)  # as a resumed process makes it
                ema.load_state_dict(torch.load(buffer, weights_only=True))
                assert ema.nimg == k * BATCH
        return ema

    whole, resumed = run(None), run(25)
    for s in SIGMA_RELS:
        for name, t in whole.averaged(s).items():
            assert torch.equal(t, resumed.averaged(s)[name]), name


def test_state_of_another_tracker_is_refused_and_changes_nothing() -> None:
    module = make_module()
    ema = PowerEMA(module, SIGMA_RELS)
    ema.update(64)
    before = {k: v.clone() for k, v in ema.averaged(0.05).items()}
    other = PowerEMA(module, (0.05, 0.2))
    with pytest.raises(TrackerError, match="widths"):
        ema.load_state_dict(other.state_dict())
    smaller = PowerEMA(torch.nn.Sequential(torch.nn.Linear(3, 2)), SIGMA_RELS)
    with pytest.raises(TrackerError, match="differ"):
        ema.load_state_dict(smaller.state_dict())
    with pytest.raises(TrackerError, match="not a PowerEMA state"):
        ema.load_state_dict({"emas": []})
    for k, v in ema.averaged(0.05).items():
        assert torch.equal(v, before[k])
    assert ema.nimg == 64


def test_time_must_advance_and_widths_must_be_valid() -> None:
    module = make_module()
    ema = PowerEMA(module)
    assert ema.sigma_rels == [0.05, 0.10]
    with pytest.raises(TrackerError, match="no training time yet"):
        ema.snapshot()
    ema.update(128)
    with pytest.raises(TrackerError, match="does not advance past the last update at 128"):
        ema.update(128)
    with pytest.raises(TrackerError, match=r"sigma_rels\[1\].*out of range"):
        PowerEMA(module, (0.05, 0.3))
    with pytest.raises(TrackerError, match="listed twice"):
        PowerEMA(module, (0.05, 0.05))
    with pytest.raises(TrackerError, match="not tracked"):
        ema.averaged(0.2)


def test_a_module_whose_tensors_changed_is_refused() -> None:
    module = make_module()
    ema = PowerEMA(module)
    module.add_module("extra", torch.nn.Linear(1, 1))
    with pytest.raises(TrackerError, match=r"added \['extra.bias', 'extra.weight'\]"):
        ema.update(64)


def test_snapshots_held_across_updates_change_nothing() -> None:
    """Unreleased snapshots make ``update`` write the host EMAs into spare storage (copy on
    write): the EMAs are bit-identical to a tracker that never snapshots, and each snapshot
    keeps the values of its time."""
    plain, lending = make_module(), make_module()
    quiet, busy = PowerEMA(plain, SIGMA_RELS), PowerEMA(lending, SIGMA_RELS)
    held = []
    for k, flat in enumerate(trajectory(plain, 40), start=1):
        set_params(plain, flat)
        set_params(lending, flat)
        quiet.update(k * BATCH)
        busy.update(k * BATCH)
        if k % 3 == 0:
            held.append((busy.snapshot(), {n: t.clone() for n, t in busy.averaged(0.10).items()}))
        if k % 9 == 0:
            busy.load_state_dict(busy.state_dict())
    for s in SIGMA_RELS:
        for name, t in quiet.averaged(s).items():
            assert torch.equal(busy.averaged(s)[name], t), name
    for snaps, values in held:
        arrays = snaps[1].arrays()
        assert all(np.array_equal(arrays[n], v.numpy()) for n, v in values.items())


class CopyingEMA(PowerEMA):
    """Snapshots copy host EMAs into staging buffers, as they copy GPU EMAs (no lending)."""

    _lend_host_emas = False


@pytest.mark.parametrize("tracker", [PowerEMA, CopyingEMA])
def test_snapshots_keep_their_time_whether_lent_or_copied(tracker: type[PowerEMA]) -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = tracker(module, SIGMA_RELS)
    assert (len(ema._host), len(ema._staged)) == ((6, 0) if tracker is PowerEMA else (0, 6))
    taken = []
    for k in range(1, 13):
        module(torch.randn(8, 3) + k)
        with torch.no_grad():
            module[0].weight.add_(0.1)
        ema.update(k * BATCH)
        if k % 4 == 0:
            snaps = ema.snapshot()
            expect = [{n: t.clone() for n, t in ema.averaged(s).items()} for s in SIGMA_RELS]
            taken.append((snaps, expect))
    for snaps, expect in taken:
        for snap, values in zip(snaps, expect, strict=True):
            arrays = snap.arrays()
            assert all(np.array_equal(arrays[n], v.numpy()) for n, v in values.items())
    assert ema._staging.idle == 0
    taken.clear()  # released by collection: one call's worth of staging sets is kept
    assert ema._staging.idle == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (the GPU path)")
def test_cuda_emas_are_copied_asynchronously_into_pinned_buffers() -> None:
    """On a GPU: ``snapshot()`` queues device-to-host copies on a side stream; the training
    thread may update at once, and each snapshot still holds the EMA of its time."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)]).cuda()
    ema = PowerEMA(module, SIGMA_RELS)
    assert (len(ema._host), len(ema._staged)) == (0, 8)
    taken = []
    for k in range(1, 7):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.01 * k)
        ema.update(k * BATCH)  # queued right behind the previous snapshot's copies
        expect = [{n: t.cpu() for n, t in ema.averaged(s).items()} for s in SIGMA_RELS]
        taken.append((ema.snapshot(), expect))
    for snaps, expect in taken:
        for snap, values in zip(snaps, expect, strict=True):
            arrays = snap.arrays()
            assert all(np.array_equal(arrays[n], v.numpy()) for n, v in values.items())
    assert {s.digest for _ in range(5) for s in ema.snapshot()[:1]} == {taken[-1][0][0].digest}
    assert all(b.is_pinned() for b in ema._staging.take())
