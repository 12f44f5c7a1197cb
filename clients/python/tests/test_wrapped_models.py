"""PowerEMA on wrapped models: ``torch.compile`` (``_orig_mod.``), DDP / ``DataParallel``
(``module.``) and their nesting share names — and runs — with the plain model; FSDP and
DTensor parameters are refused with a message that says what to do, and what it says works.

DDP and FSDP2 run for real on CPU in a one-process gloo group. ``torch.compile`` runs for real
with the ``aot_eager`` backend (Dynamo and AOTAutograd, about 4 s here): inductor's code
generation (about 30 s on a 2-core machine) produces the same ``OptimizedModule`` wrapper and
names.
"""

from __future__ import annotations

import io
import logging
import socket
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.distributed as dist
from conftest import Server
from torch.nn.parallel import DistributedDataParallel

from hindsight_client import Client, PowerEMA, TrackerError

BATCH = 16
SIGMA_RELS = (0.05, 0.10)


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    )


@pytest.fixture(scope="module")
def process_group() -> Iterator[None]:
    """A one-process gloo group on a free local port (what DDP and FSDP need)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", world_size=1, rank=0, init_method=f"tcp://127.0.0.1:{port}")
    yield
    dist.destroy_process_group()


def resumed(ema: PowerEMA, module: torch.nn.Module) -> PowerEMA:
    """A tracker of ``module`` restored from ``ema``'s state through ``torch.save``, as a
    resumed process makes it."""
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    other = PowerEMA(module, SIGMA_RELS)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    return other


def test_wrapper_prefixes_are_stripped_once_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = make_model()
    plain_names = list(model.state_dict())
    wrappers = {
        "": model,
        "module.": torch.nn.DataParallel(model),  # no GPU: it calls the module
        "_orig_mod.": torch.compile(model),  # compiles lazily: never called here
        "_orig_mod.module.": torch.compile(torch.nn.DataParallel(model)),
        "module._orig_mod.": torch.nn.DataParallel(torch.compile(model)),
    }
    for prefix, wrapped in wrappers.items():
        assert all(n.startswith(prefix) for n in wrapped.state_dict())
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hindsight_client"):
            ema = PowerEMA(wrapped, SIGMA_RELS)
            for k in range(1, 4):
                ema.update(k * BATCH)
                snaps = ema.snapshot()
        assert ema.stripped_prefix == prefix
        assert list(ema.averaged(0.05)) == plain_names
        assert sorted(snaps[0].arrays()) == sorted(plain_names)
        logged = [r.getMessage() for r in caplog.records]
        assert len(logged) == (1 if prefix else 0), logged
        if prefix:
            assert repr(prefix) in logged[0]
    kept = PowerEMA(wrappers["module."], SIGMA_RELS, strip_prefixes=())
    assert kept.stripped_prefix == ""
    assert list(kept.averaged(0.05)) == ["module." + n for n in plain_names]


def test_a_submodule_called_module_is_not_a_wrapper() -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = torch.nn.Linear(2, 2)
            self.head = torch.nn.Linear(2, 1)

    ema = PowerEMA(Net(), SIGMA_RELS)
    assert ema.stripped_prefix == ""
    assert list(ema.averaged(0.05)) == ["module.weight", "module.bias", "head.weight", "head.bias"]


def test_tracker_state_resumes_across_wrapped_and_plain_models() -> None:
    model = make_model()
    wrapped = torch.nn.DataParallel(torch.compile(model))
    ema = PowerEMA(wrapped, SIGMA_RELS)
    for k in range(1, 6):
        with torch.no_grad():
            model[0].weight.add_(0.1)
        model(torch.randn(BATCH, 4))
        ema.update(k * BATCH)
    plain = resumed(ema, model)
    back = resumed(plain, torch.compile(model))
    for other in (plain, back):
        assert other.nimg == 5 * BATCH
        for name, value in ema.averaged(0.10).items():
            assert torch.equal(other.averaged(0.10)[name], value), name
    # A state saved with prefixed names (before they were stripped) is read without them.
    state = ema.state_dict()
    state["emas"] = [{"module." + n: t for n, t in e.items()} for e in state["emas"]]
    state["copied"] = {"module." + n: t for n, t in state["copied"].items()}
    old = PowerEMA(model, SIGMA_RELS)
    old.load_state_dict(state)
    assert torch.equal(old.averaged(0.05)["0.weight"], ema.averaged(0.05)["0.weight"])


def test_compiled_and_ddp_models_upload_into_the_run_of_the_plain_one(
    start_server: Callable[..., Server], process_group: None
) -> None:
    """Training starts plain, resumes compiled, then resumes under DDP, all into one run;
    a resumed process re-uploads a snapshot it made before (same bytes: no conflict, no new
    row); reconstructions load into the plain model with ``strict=True``."""
    server = start_server()
    model = make_model()
    g = torch.Generator().manual_seed(1)
    w_true = torch.randn(4, 1, generator=g)
    ema = PowerEMA(model, SIGMA_RELS)
    checkpoint = None
    step = 0
    phases = [
        ("", model),
        ("_orig_mod.", torch.compile(model, backend="aot_eager")),
        ("module.", DistributedDataParallel(model)),
    ]
    with Client(server.url) as client:
        for prefix, wrapped in phases:
            if prefix:
                ema = resumed(ema, wrapped)
            assert ema.stripped_prefix == prefix
            optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.05)
            for _ in range(20):
                step += 1
                x = torch.randn(BATCH, 4, generator=g)
                loss = torch.nn.functional.mse_loss(wrapped(x), torch.sin(x @ w_true))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                ema.update(step * BATCH)
            if checkpoint is None:
                checkpoint = io.BytesIO()
                torch.save(ema.state_dict(), checkpoint)
            client.upload("mixed", ema.snapshot())
        client.flush()
        rows = server.snapshot_rows("mixed")
        assert sorted(r["nimg"] for r in rows) == [n * BATCH for n in (20, 20, 40, 40, 60, 60)]

        # A process resumed from the first checkpoint uploads its snapshot again.
        assert checkpoint is not None
        checkpoint.seek(0)
        again = PowerEMA(make_model(), SIGMA_RELS)
        again.load_state_dict(torch.load(checkpoint, weights_only=True))
        client.upload("mixed", again.snapshot())
        client.flush()
        assert server.snapshot_rows("mixed") == rows

        exact = client.reconstruct("mixed", sigma_rel=0.05, dtype="f32").state_dict()
        for name, value in ema.averaged(0.05).items():
            assert torch.equal(exact[name], value), name
        plain = make_model(seed=1)
        weights = client.reconstruct("mixed", sigma_rel=0.08, dtype="f32").state_dict()
        plain.load_state_dict(weights, strict=True)
        assert torch.equal(plain[0].weight, weights["0.weight"])


def test_fsdp_and_dtensor_parameters_are_refused_with_what_to_do(process_group: None) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    sharded = make_model()
    fully_shard(sharded, mesh=mesh)
    with pytest.raises(TrackerError, match=r"the module is sharded by FSDP .*get_model_state_dict"):
        PowerEMA(sharded, SIGMA_RELS)

    tensor_parallel = make_model()
    weight = tensor_parallel[0].weight.detach()
    tensor_parallel[0].weight = torch.nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
    with pytest.raises(TrackerError, match=r"parameter 0\.weight is a DTensor .*Shard\(dim=0\)"):
        PowerEMA(tensor_parallel, SIGMA_RELS)

    flat = make_model()
    flat[3].weight._is_flat_param = True  # what FSDP1 marks its FlatParameter with
    with pytest.raises(TrackerError, match=r"parameter 3\.weight is an FSDP flat parameter"):
        PowerEMA(flat, SIGMA_RELS)

    # What the message advises: a plain replica loaded from the gathered state, tracked.
    replica = make_model(seed=1)
    ema = PowerEMA(replica, SIGMA_RELS)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    for k in range(1, 4):
        sharded(torch.randn(BATCH, 4)).sum().backward()
        with torch.no_grad():
            for p in sharded.parameters():
                p.add_(p.grad, alpha=-0.1)
                p.grad = None
        replica.load_state_dict(get_model_state_dict(sharded, options=options))
        ema.update(k * BATCH)
    full = get_model_state_dict(sharded, options=options)
    assert torch.equal(replica[0].weight, full["0.weight"])
    assert sorted(ema.snapshot()[0].arrays()) == sorted(make_model().state_dict())
