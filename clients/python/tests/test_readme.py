"""The README's training-loop example runs as written against a real server."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import Server

from hindsight_client import Client, HindsightError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_training_loop_runs(
    start_server: Callable[..., Server], token_file: tuple[Path, str]
) -> None:
    (example,) = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
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
