"""The README's training-loop example runs as written against a real server; its sweep
example calls the real API."""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import Server

from hindsight_client import Client, HindsightError

README = Path(__file__).resolve().parents[1] / "README.md"


def examples() -> list[str]:
    """The README's Python blocks: the training loop, then the sweep."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) == 2
    return blocks


def test_readme_training_loop_runs(
    start_server: Callable[..., Server], token_file: tuple[Path, str]
) -> None:
    example = examples()[0]
    assert len(example.strip().splitlines()) <= 20
    path, token = token_file
    server = start_server("--token-file", str(path))
    example = example.replace('"http://127.0.0.1:8080"', repr(server.url))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    g = torch.Generator().manual_seed(0)
    loader = []
    for _ in range(300):
        x = torch.randn(16, 4, generator=g)
        loader.append((x, x.sum(dim=1, keepdim=True).sin()))
    scope = {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.05),
        "loader": loader,
        "loss_fn": torch.nn.functional.mse_loss,
        "TOKEN": token,
    }
    exec(compile(example, str(README), "exec"), scope)

    rec = scope["rec"]
    assert (rec.sigma_rel, rec.nimg, rec.dtype) == (0.13, 300 * 16, "f16")
    assert len(rec.report.inputs) >= 2
    with pytest.raises(HindsightError, match="closed"):
        rec.state_dict()  # the example closed its client
    # The model now holds the reconstruction (f16 values, loaded into float32 parameters).
    with Client(server.url, token) as client:
        weights = client.reconstruct("my-run", sigma_rel=0.13).state_dict()
    for name, value in weights.items():
        assert torch.equal(model.state_dict()[name], value.float()), name
    rows = server.snapshot_rows("my-run")
    assert sorted({r["nimg"] for r in rows}) == [100 * 16, 200 * 16, 300 * 16]
    assert len(rows) == 6


def test_readme_sweep_example_uses_the_real_api() -> None:
    # Its calls run for real in tests/test_sweeps.py (at the README's sizes a sweep takes
    # hours on a CPU); here, every method it calls exists and takes the keywords it passes.
    calls = {
        (node.func.attr, frozenset(str(k.arg) for k in node.keywords))
        for node in ast.walk(ast.parse(examples()[1]))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and hasattr(Client, node.func.attr)
    }
    assert {name for name, _ in calls} >= {"start_sweep", "wait_sweep", "sweep", "reconstruct"}
    for name, keywords in calls:
        assert keywords <= set(inspect.signature(getattr(Client, name)).parameters), name
