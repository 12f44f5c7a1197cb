"""The README's training-loop example runs as written against a real server; its sweep
example calls the real API; its external-sweep example ("Sweeping your own model") runs
against a real server with a small denoiser of Fashion-MNIST as the user's model, and the
top-level README shows the same block."""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import tiny_denoiser as td
import torch
from conftest import REPO_ROOT, Server, fid_weights

from hindsight_client import Client, HindsightError

README = Path(__file__).resolve().parents[1] / "README.md"


def examples() -> list[str]:
    """The README's Python blocks: the training loop, the sweep, the external sweep."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) == 3
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


def test_readme_external_sweep_runs(
    start_server: Callable[..., Server],
    token_file: tuple[Path, str],
    denoiser_snapshots: list[Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    example = examples()[2]
    weights = fid_weights()
    path, token = token_file
    server = start_server("--token-file", str(path), "--fid-weights", str(weights))
    with Client(server.url, token) as client:
        client.upload("my-run", denoiser_snapshots)
        client.flush()
    # The README's sizes, made small for a CPU: one width, 32 images, 6 sampler steps.
    for old, new in [
        ('"http://127.0.0.1:8080"', repr(server.url)),
        ("[0.05, 0.10, 0.15, 0.20]", "[0.10]"),
        ("num_images=10_000", "num_images=32"),
        ('{"steps": 32, "sigma_max": 80.0}', '{"steps": 6, "sigma_max": 20.0}'),
    ]:
        assert example.count(old) == 1, old
        example = example.replace(old, new)
    monkeypatch.setenv("HINDSIGHT_FID_WEIGHTS", str(weights))
    monkeypatch.setenv("HINDSIGHT_CACHE_DIR", str(tmp_path / "cache"))
    validation = td.fashion_mnist("t10k", 256)
    scope: dict[str, Any] = {
        "TOKEN": token,
        "real_images": td.fashion_mnist("t10k", 32),
        "MyModel": td.Denoiser,
        "my_sampler": td.euler,
        "my_validation_loss": lambda model: td.validation_loss(model, validation),
    }
    exec(compile(example, str(README), "exec"), scope)

    summary, best = scope["summary"], scope["best"]
    assert (summary.points_evaluated, summary.points_failed, summary.images) == (1, 0, 32)
    assert best.sigma_rel == pytest.approx(0.10)
    assert best.fid > 0
    assert best.kid is not None
    assert best.value("val_loss") == pytest.approx(
        td.validation_loss(td.load(_weights(server, best.reconstruction_id)), validation),
        rel=1e-6,
    )
    [reference] = [r for r in scope["client"].references() if r.name == "my-data"]
    assert (reference.count, reference.resolution, reference.channels) == (32, 28, 1)
    assert list((tmp_path / "cache" / "reconstructions").glob("*.safetensors"))


def _weights(server: Server, reconstruction: str) -> dict[str, torch.Tensor]:
    import safetensors.torch

    response = httpx.get(f"{server.url}/reconstructions/{reconstruction}/weights", timeout=60)
    response.raise_for_status()
    return safetensors.torch.load(response.content)


def test_the_top_level_readme_shows_the_same_external_sweep() -> None:
    top = (REPO_ROOT / "README.md").read_text()
    assert f"```python\n{examples()[2]}```" in top
