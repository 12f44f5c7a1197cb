"""An external evaluator in a process of its own, for ``test_evaluate.py``: evaluates the
points of one sweep with :mod:`tiny_denoiser`'s model, sampler and validation loss through
``Client.evaluate``, printing one JSON line per event (and the summary last) on stdout.

Usage: python evaluate_worker.py URL TOKEN SWEEP WORKER --features MODE --cache DIR
       [--stall-after-batches N] [--poll SECONDS]

``--stall-after-batches N``: after N batches, ``generate`` sleeps for good (a worker that the
test kills mid-point, whose heartbeats go on until then).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import tiny_denoiser as td
import torch

from hindsight_client import (
    BatchUploaded,
    Claimed,
    Client,
    EvaluationEvent,
    Lease,
    PointFailed,
    PointFinished,
)


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("token")
    parser.add_argument("sweep", type=int)
    parser.add_argument("worker")
    parser.add_argument("--features", default="auto")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--stall-after-batches", type=int, default=None)
    parser.add_argument("--poll", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    validation = td.fashion_mnist("t10k", 256)
    batches = 0

    def generate(model: td.Denoiser, seeds: list[int], sampler: dict[str, Any]) -> torch.Tensor:
        nonlocal batches
        if args.stall_after_batches is not None and batches >= args.stall_after_batches:
            say(event="stalled", seeds=seeds[:1])
            time.sleep(3600)
        batches += 1
        return td.sample(model, seeds, sampler)

    def metrics(model: td.Denoiser, lease: Lease) -> dict[str, float]:
        return {"val_loss": td.validation_loss(model, validation)}

    def progress(e: EvaluationEvent) -> None:
        point = {"idx": e.lease.point.idx, "attempts": e.lease.point.attempts}
        if isinstance(e, Claimed):
            say(event="claimed", batches_done=e.lease.batches_done, **point)
        elif isinstance(e, BatchUploaded):
            say(event="batch", batch=e.batch, images=e.images, features=e.features, **point)
        elif isinstance(e, PointFinished):
            say(event="finished", **point)
        elif isinstance(e, PointFailed):
            say(event="failed", message=e.message, **point)

    with Client(args.url, args.token) as client:
        summary = client.evaluate(
            args.sweep,
            load=td.load,
            generate=generate,
            metrics=metrics,
            features=args.features,
            worker=args.worker,
            poll_interval=args.poll,
            cache_dir=args.cache,
            on_progress=progress,
        )
    say(
        event="summary",
        worker=summary.worker,
        points_evaluated=summary.points_evaluated,
        points_failed=summary.points_failed,
        batches=summary.batches,
        images=summary.images,
        seconds=summary.seconds,
    )


if __name__ == "__main__":
    sys.exit(main())
