#!/usr/bin/env python3
"""What a snapshot costs the training thread: ``PowerEMA.snapshot()`` of a ~100M-parameter
model against ``torch.save`` of the same EMA state (what ema-pytorch's ``PostHocEMA`` does at
each checkpoint) and against the previous ``snapshot()`` (cast and ``safetensors.torch.save``
on the training thread), and what serialising and hashing (``Snapshot.write_to``) then cost
the thread that writes (BENCHMARKS.md, issue 25).

Usage:
    bench_snapshot.py [--layers 6] [--width 4096] [--repeats 5] [--dir DIR] [--threads T]
        [--device cpu|cuda] [--url URL [--client-src DIR]]

The model is a stack of ``--layers`` ``Linear(width, width)`` (fp32; 6 × 4096² + biases =
100.7M parameters, 403 MB), tracked by ``PowerEMA`` at σ_rel 0.05 and 0.10 (EMAs on the
model's device, ``--device``: on a GPU, ``snapshot()`` queues device-to-host copies into
pinned buffers, and ``write_to`` waits for them). Each measurement is the median of ``--repeats`` runs (after
one warm-up run, which also fills the pools of spare storage), with an ``update`` between runs so
every snapshot is of new values:

- ``update``: ``ema.update(nimg)`` (both widths), for scale.
- ``update, a snapshot unreleased``: the same while the previous ``snapshot()`` is not
  released yet (still being written by the sender): the update then writes the new EMA into
  spare storage (copy on write) instead of in place.
- ``snapshot``: ``ema.snapshot()`` on the training thread (float32 and float16 snapshots):
  the host EMAs are lent, only the integer tensors copied. Each snapshot is then written and
  released (not timed here), as the client's spool does, so the pools are reused.
- ``write_to file`` / ``write_to hash only``: the sender side, per call of both widths:
  cast, serialise, BLAKE3 into a file in DIR (not fsynced: the page cache), or into nothing.
- with ``--url``: ``client.upload(run, ema.snapshot())`` on the training thread, then
  ``client.flush()`` (untimed in the table; its median printed after it) — with the client
  in ``--client-src`` (default: this checkout's), whose spool (if it has one) goes to DIR.
- ``torch.save``: ``torch.save(state_dict, file)`` of each width's EMA (ema-pytorch keeps one
  EMA module per width and saves each), on the training thread.
- ``old snapshot()``: the code ``snapshot()`` ran before issue 25, per width: every tensor
  copied to the host in the snapshot dtype, then ``safetensors.torch.save`` into bytes.

Prints a table and one JSON line. Peak memory ≈ model + 2 EMAs + 2 pooled buffer sets +
one ``torch.save`` / old-snapshot width ≈ 2.5 GB at the defaults.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

CLIENT_SRC = Path(__file__).resolve().parents[1] / "clients" / "python" / "src"

BATCH = 256


class Discard:
    """A file that forgets what it is given (hashing without writing)."""

    def write(self, data: object) -> int:
        return memoryview(data).nbytes  # type: ignore[arg-type]


def median_seconds(
    repeats: int,
    step: Callable[[], None],
    run: Callable[[], object],
    after: Callable[[object], None],
) -> tuple[float, list[float]]:
    """Median wall time of ``run()`` over ``repeats`` runs after one warm-up; ``step()``
    before each run (untimed, then the device synchronised), ``after(result)`` after it
    (untimed). The time is what the calling thread spends: work ``run()`` leaves queued on
    a GPU is not in it."""
    times = []
    for i in range(repeats + 1):
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the run starts with the device idle
        start = time.perf_counter()
        result = run()
        elapsed = time.perf_counter() - start
        after(result)
        if i > 0:
            times.append(elapsed)
    return statistics.median(times), times


def old_snapshot(ema: Any, dtype: torch.dtype) -> list[bytes]:
    """What ``PowerEMA.snapshot()`` did before issue 25 (training thread)."""
    out = []
    for sigma_rel in ema.sigma_rels:
        tensors = {
            name: t.to(
                device="cpu",
                dtype=dtype if t.is_floating_point() else t.dtype,
                copy=True,
            )
            for name, t in ema.averaged(sigma_rel).items()
        }
        metadata = {"nimg": str(ema.nimg), "sigma_rel": repr(sigma_rel)}
        out.append(safetensors.torch.save(tensors, metadata=metadata))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="where the model and EMAs live")
    parser.add_argument(
        "--url",
        default=None,
        help="a hindsight serve: also time client.upload(ema.snapshot())",
    )
    parser.add_argument("--client-src", type=Path, default=CLIENT_SRC)
    args = parser.parse_args()
    sys.path.insert(0, str(args.client_src))

    from hindsight_client import Client, PowerEMA

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="bench-snapshot-"))
    folder.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)]
    ).to(args.device)
    params = sum(p.numel() for p in model.parameters())
    ema = PowerEMA(model, (0.05, 0.10))
    nimg = [0]

    def step() -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.999)
        nimg[0] += BATCH
        ema.update(nimg[0])

    results: dict[str, float] = {}

    def measure(
        label: str,
        run: Callable[[], object],
        after: Callable[[object], None],
        before: Callable[[], None] = step,
    ) -> None:
        med, times = median_seconds(args.repeats, before, run, after)
        results[label] = med
        print(f"{label:<48} {med * 1e3:9.1f} ms  {[round(t * 1e3, 1) for t in times]}")

    print(
        f"{params / 1e6:.1f}M parameters ({params * 4 / 1e6:.0f} MB fp32), 2 widths, "
        f"on {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, load {os.getloadavg()}"
    )

    def nothing(_: object) -> None:
        pass

    def train() -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.999)
        nimg[0] += BATCH

    measure("update (both widths)", lambda: ema.update(nimg[0]), nothing, before=train)
    unreleased: list = []

    def train_and_snapshot() -> None:
        train()
        unreleased[:] = ema.snapshot()

    def release(_: object) -> None:
        for s in unreleased:
            s.release()

    measure(
        "update, a snapshot unreleased (copy on write)",
        lambda: ema.update(nimg[0]),
        release,
        before=train_and_snapshot,
    )

    def write_and_release(snaps: object) -> None:
        for s in snaps:  # type: ignore[attr-defined]
            s.write_to(Discard())
            s.release()

    for dtype, name in ((torch.float32, "f32"), (torch.float16, "f16")):
        measure(
            f"snapshot() {name}, training thread",
            lambda d=dtype: ema.snapshot(d),
            write_and_release,
        )
    for dtype, name in ((torch.float32, "f32"), (torch.float16, "f16")):
        snaps: list = []

        def take(d: torch.dtype = dtype, snaps: list = snaps) -> None:
            step()
            snaps[:] = ema.snapshot(d)

        def write_file(snaps: list = snaps) -> str:
            digests = []
            for s in snaps:
                with open(folder / f"{s.sigma_rel}.safetensors", "wb") as f:
                    digests.append(s.write_to(f))
            return ",".join(digests)

        def hash_only(snaps: list = snaps) -> str:
            return ",".join(s.write_to(Discard()) for s in snaps)

        measure(
            f"write_to file {name}, sender thread", write_file, nothing, before=take
        )
        measure(
            f"write_to hash only {name}, sender thread", hash_only, nothing, before=take
        )
        for s in snaps:
            s.release()

    if args.url:
        kwargs: dict[str, Any] = {}
        if "spool_dir" in inspect.signature(Client).parameters:
            kwargs["spool_dir"] = folder / "spool"
        flushes: list[float] = []
        with Client(args.url, **kwargs) as client:

            def flush(_: object) -> None:
                start = time.perf_counter()
                client.flush()
                flushes.append(time.perf_counter() - start)

            measure(
                "snapshot() + client.upload(), training thread",
                lambda: client.upload(f"bench-snapshot-{os.getpid()}", ema.snapshot()),
                flush,
            )
        results["flush after upload"] = statistics.median(flushes[1:])
        print(
            f"{'flush after upload (spool, send, store)':<48} {results['flush after upload'] * 1e3:9.1f} ms"
        )

    def torch_save() -> None:
        for i, sigma_rel in enumerate(ema.sigma_rels):
            torch.save(ema.averaged(sigma_rel), folder / f"ema-{i}.pt")

    measure("torch.save f32 (ema-pytorch), training thread", torch_save, nothing)
    for dtype, name in ((torch.float32, "f32"), (torch.float16, "f16")):
        measure(
            f"old snapshot() {name}, training thread",
            lambda d=dtype: old_snapshot(ema, d),
            nothing,
        )

    print(
        json.dumps(
            {"params": params, "threads": torch.get_num_threads(), "seconds": results}
        )
    )


if __name__ == "__main__":
    main()
