"""A training process for the spool's outage test (``test_spool.py``): trains a tiny
regression with :class:`~hindsight_client.PowerEMA`, uploads both widths every ``EVERY``
steps, and writes each produced snapshot's key as a JSON line to ``--produced``.

``--phase first``: steps 1..4·EVERY. After the second upload it waits until the server holds
both (``flush``) and prints ``SENT``; the test then kills the server. It uploads the third
snapshot, saves a checkpoint (model, optimizer, data generator, PowerEMA state), uploads the
fourth with ``durable=True``, prints ``SPOOLED`` and dies by SIGKILL — a crash.

``--phase second``: resumes from that checkpoint (older than the last upload), redoes the
fourth interval (the same snapshots again) and trains to 6·EVERY, then ``flush()``es — which
waits for the server to come back and sends what the first process left — and exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

import torch

from hindsight_client import Client, PowerEMA

BATCH = 16
EVERY = 10
RUN = "outage"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--spool", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--produced", required=True)
    parser.add_argument("--phase", choices=("first", "second"), required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    ema = PowerEMA(model, (0.05, 0.10))
    step = 0
    if args.phase == "second":
        ckpt = torch.load(args.checkpoint, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        g.set_state(ckpt["generator"])
        ema.load_state_dict(ckpt["ema"])
        step = ckpt["step"]
    last = 4 * EVERY if args.phase == "first" else 6 * EVERY
    client = Client(args.url, spool_dir=args.spool, backoff=0.2, max_backoff=2.0)
    produced = open(args.produced, "a")  # noqa: SIM115 (this process dies holding it)
    while step < last:
        step += 1
        x = torch.randn(BATCH, 4, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True).sin())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(step * BATCH)
        if step % EVERY:
            continue
        snaps = ema.snapshot()
        for s in snaps:
            key = {"nimg": s.nimg, "sigma_rel": s.sigma_rel, "digest": s.digest, "pid": os.getpid()}
            produced.write(json.dumps(key) + "\n")
        produced.flush()
        os.fsync(produced.fileno())
        k = step // EVERY
        if args.phase == "first" and k == 4:
            client.upload(RUN, snaps, durable=True)
            print("SPOOLED", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        client.upload(RUN, snaps)
        if args.phase == "first" and k == 2:
            client.flush()
            print("SENT", flush=True)
            sys.stdin.readline()  # the test kills the server, then says go on
        if args.phase == "first" and k == 3:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": g.get_state(),
                    "ema": ema.state_dict(),
                    "step": step,
                },
                args.checkpoint,
            )
    results = client.flush()
    client.close()
    print("DONE", json.dumps(sorted(r.status for r in results)), flush=True)


if __name__ == "__main__":
    main()
