#!/usr/bin/env python3
"""External evaluators against the builtin worker: one sweep point end to end, the server's
CPU time per uploaded batch (images against features), and points/hour with 1, 2 and 4
evaluator processes (docs/EVALUATORS.md, BENCHMARKS.md).

Usage:
    bench_external.py --hindsight target/release/hindsight --peer-python PY [--dir DIR]
        [--num-images 32] [--batch 16] [--steps 16]
        [--sweep-points 8] [--sweep-images 16] [--sweep-batch 8] [--sweep-steps 8]
        [--workers 1,2,4] [--worker-threads T] [--only-throughput]

DIR (default a temporary directory) must not hold an earlier run's data.

1. ``hindsight bench sweep-point --dir DIR/sp`` at ``--num-images/--batch/--steps``: the
   builtin worker and its Python peer (scripts/peer_sweep_point.py) on one point; it leaves
   the data directory (run ``bench``: the EDM2 16×16 network's snapshots) in DIR/sp/data.
2. ``hindsight serve`` over that directory (a write token); reference statistics
   ``bench-client`` of 32 random 16×16 images by ``Client.reference_from_images`` (statistics
   imported from an NPZ, as ``bench sweep-point``'s, record no Inception weights, and the
   client then sends images: timing needs any 2048-d statistics). The same point (σ_rel
   0.08 at nimg 4·2²⁰) as an external sweep with FID, evaluated here by
   ``Client.evaluate``: ``load`` builds scripts/peer_edm2_torch.py's network from the state
   dict, ``generate`` runs its Heun sampler, image i from seed i (as the peer does). With
   the Inception features computed here (``features="client"``, audited by the server:
   batch 0 sends 16 of its images for the grid picture, later batches 2), first with the
   client's Inception not yet loaded ("client-cold"), then warm; and uploading the images
   (``features="server"``). The server's CPU time (utime + stime of its process, from
   /proc/PID/stat) is read at each claim and batch answer: a batch's CPU time is the
   difference from the previous event (between uploads the server only answers
   heartbeats).
3. A sweep of ``--sweep-points`` points (σ_rel 0.05 … 0.12) for each worker count: that many
   evaluator processes of this script (``_worker``), each with cores/N PyTorch threads,
   started and made ready (torch imported) before the clock starts; points/hour = points /
   wall time from "go" to the last process's exit.

Prints each measurement, then one JSON line with all of them. Needs NVIDIA's Inception
weights ($HINDSIGHT_FID_WEIGHTS) and the client installed in the running Python.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from queue import Empty, Queue
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RUN = "bench"
#: Reference statistics made by the client (its features carry the weights' digest, which
#: client-computed features must match; `bench sweep-point`'s imported statistics have none).
REFERENCE = "bench-client"
#: The point of ``bench sweep-point``.
SIGMA_REL, NIMG = 0.08, 4 << 20


def load_edm2() -> Any:
    spec = importlib.util.spec_from_file_location(
        "peer_edm2_torch", HERE / "peer_edm2_torch.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class UserModel:
    """The "user's model": the EDM2 network in PyTorch (peer_edm2_torch.py) and EDM's Heun
    sampler, with load() and generate() as Client.evaluate takes them."""

    def __init__(self, network_json: Path) -> None:
        self.edm2 = load_edm2()
        self.cfg = self.edm2.full_config(json.loads(network_json.read_text()), 0.5)

    def load(self, state: dict[str, Any]) -> Any:
        net = self.edm2.Precond(self.cfg)
        missing, _ = net.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"the reconstruction lacks {missing[:3]}")
        return net.eval()

    def generate(self, net: Any, seeds: list[int], sampler: dict[str, Any]) -> Any:
        import torch

        res, ch, classes = (
            self.cfg[k] for k in ("img_resolution", "img_channels", "label_dim")
        )
        noise = torch.stack(
            [
                torch.randn(ch, res, res, generator=torch.Generator().manual_seed(s))
                for s in seeds
            ]
        )
        labels = None
        if classes:
            labels = torch.eye(classes)[torch.tensor([s % classes for s in seeds])]
        x = self.edm2.edm_sampler(net, noise, labels, int(sampler["steps"]))
        return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def start_server(
    binary: str, data: Path, tokens: Path, weights: str
) -> tuple[Any, str]:
    """``hindsight serve`` on a free loopback port; (process, url) once it listens."""
    proc = subprocess.Popen(
        [binary, "--data-dir", str(data), "serve", "--addr", "127.0.0.1:0"]
        + ["--token-file", str(tokens), "--fid-weights", weights],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: Queue[str] = Queue()
    assert proc.stderr is not None
    stderr = proc.stderr
    threading.Thread(
        target=lambda: [lines.put(line) for line in stderr], daemon=True
    ).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", lines.get(timeout=0.2))
        except Empty:
            if proc.poll() is not None:
                break
            continue
        if found:
            return proc, found.group(1)
    proc.kill()
    raise RuntimeError("hindsight serve did not start")


def one_point(
    client: Any, model: UserModel, server_pid: int, args: Any, mode: str
) -> dict:
    """The point of ``bench sweep-point`` as an external sweep, evaluated here."""
    from hindsight_client import BatchUploaded, Claimed

    sweep = client.start_sweep(
        RUN,
        [SIGMA_REL],
        nimgs=[NIMG],
        reference=REFERENCE,
        evaluator="external",
        metrics=["fid"],
        num_images=args.num_images,
        batch=args.batch,
        sampler={"steps": args.steps},
    )
    batches: list[dict] = []
    last = [cpu_seconds(server_pid)]

    def progress(event: Any) -> None:
        now = cpu_seconds(server_pid)
        if isinstance(event, BatchUploaded):
            batches.append(
                {
                    "images": event.images,
                    "features_by": event.recorded.features_by,
                    "client_s": event.seconds,
                    "server_s": event.recorded.server_seconds,
                    "server_cpu_s": now - last[0],
                }
            )
        if isinstance(event, (Claimed, BatchUploaded)):
            last[0] = now

    cpu0, t0 = cpu_seconds(server_pid), time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        summary = client.evaluate(
            sweep,
            load=model.load,
            generate=model.generate,
            features=mode,
            feature_batch=args.batch,
            worker=f"bench-{mode}",
            cache_dir=cache,
            on_progress=progress,
        )
    seconds = time.perf_counter() - t0
    point = summary.points[0]
    return {
        "features": mode,
        "seconds": seconds,
        "server_cpu_s": cpu_seconds(server_pid) - cpu0,
        "fid": point.fid,
        "features_by": point.result.get("features")
        if isinstance(point.result, dict)
        else None,
        "batches": batches,
    }


def throughput(
    url: str, token: str, network_json: Path, args: Any, workers: int
) -> dict:
    """Points/hour of ``workers`` evaluator processes on one sweep of ``--sweep-points``."""
    from hindsight_client import Client

    step = 0.07 / max(1, args.sweep_points - 1)
    sigma_rels = [round(0.05 + i * step, 4) for i in range(args.sweep_points)]
    with Client(url, token) as client:
        sweep = client.start_sweep(
            RUN,
            sigma_rels,
            nimgs=[NIMG],
            reference=REFERENCE,
            evaluator="external",
            metrics=["fid"],
            num_images=args.sweep_images,
            batch=args.sweep_batch,
            sampler={"steps": args.sweep_steps},
        )
    threads = args.worker_threads or max(1, (os.cpu_count() or 1) // workers)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "_worker",
                url,
                token,
                str(sweep.id),
                str(network_json),
            ]
            + [str(threads), f"w{workers}-{i}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(workers)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    done = [json.loads(p.communicate()[0]) for p in procs]
    seconds = time.perf_counter() - t0
    points = sum(d["points"] for d in done)
    return {
        "workers": workers,
        "threads_each": threads,
        "points": points,
        "failed": sum(d["failed"] for d in done),
        "seconds": seconds,
        "points_per_hour": points / seconds * 3600,
        "per_worker": [d["points"] for d in done],
    }


def worker_main(argv: list[str]) -> None:
    """``_worker URL TOKEN SWEEP NETWORK_JSON THREADS NAME``: one evaluator process."""
    import torch
    from hindsight_client import Client

    url, token, sweep, network_json, threads, name = argv
    torch.set_num_threads(int(threads))
    model = UserModel(Path(network_json))
    print("ready", flush=True)
    sys.stdin.readline()
    with Client(url, token) as client, tempfile.TemporaryDirectory() as cache:
        summary = client.evaluate(
            int(sweep),
            load=model.load,
            generate=model.generate,
            worker=name,
            cache_dir=cache,
            poll_interval=0.2,
        )
    print(
        json.dumps(
            {"points": summary.points_evaluated, "failed": summary.points_failed}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hindsight", default=str(HERE.parent / "target/release/hindsight")
    )
    parser.add_argument("--peer-python", default=sys.executable)
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--sweep-points", type=int, default=8)
    parser.add_argument("--sweep-images", type=int, default=16)
    parser.add_argument("--sweep-batch", type=int, default=8)
    parser.add_argument("--sweep-steps", type=int, default=8)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument(
        "--worker-threads", type=int, help="PyTorch threads of each evaluator"
    )
    parser.add_argument(
        "--only-throughput",
        action="store_true",
        help="skip the peer and the one-point runs",
    )
    args = parser.parse_args()
    weights = os.environ.get("HINDSIGHT_FID_WEIGHTS")
    if not weights:
        sys.exit(
            "set HINDSIGHT_FID_WEIGHTS to NVIDIA's inception-2015-12-05 TorchScript"
        )
    import torch
    from hindsight_client import Client

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    temp = tempfile.TemporaryDirectory()
    root = args.dir or Path(temp.name)
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"loadavg_start": loadavg(), "threads": threads}
    print(
        f"load average {out['loadavg_start']}, {threads} threads, torch {torch.__version__}"
    )

    # 1. The builtin worker and the Python pipeline, same point and settings.
    sp = root / "sp"
    builtin = subprocess.run(
        [args.hindsight, "bench", "sweep-point", "--dir", str(sp)]
        + ["--num-images", str(args.num_images), "--batch", str(args.batch)]
        + ["--steps", str(args.steps)]
        + ([] if args.only_throughput else ["--peer-python", args.peer_python]),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    print(builtin, end="")
    out["sweep_point"] = builtin

    # 2. The same point, external.
    tokens = root / "tokens"
    tokens.unlink(missing_ok=True)
    token = subprocess.run(
        [args.hindsight, "token", "new", "--token-file", str(tokens)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    server, url = start_server(args.hindsight, sp / "data", tokens, weights)
    try:
        model = UserModel(sp / "network.json")
        with Client(url, token) as client:
            rng = np.random.default_rng(0)
            client.reference_from_images(
                REFERENCE,
                rng.integers(0, 256, (32, 3, 16, 16), dtype=np.uint8),
                batch=32,
            )
            # The first point loads the client's Inception (TorchScript's first calls
            # optimise the graph): "client-cold"; "client" is the same point made again.
            modes = [
                ("client-cold", "client"),
                ("server", "server"),
                ("client", "client"),
            ]
            for name, mode in [] if args.only_throughput else modes:
                r = one_point(client, model, server.pid, args, mode)
                out[f"point_{name}"] = r
                b = r["batches"]
                print(
                    f"  external, features by the {name}: {r['seconds']:.2f} s, "
                    f"FID {r['fid']:.4f}; server CPU {r['server_cpu_s']:.2f} s for the point; "
                    f"per batch of {b[0]['images']}: server CPU "
                    + ", ".join(f"{x['server_cpu_s']:.2f}" for x in b)
                    + " s, server_seconds "
                    + ", ".join(f"{x['server_s']:.3f}" for x in b)
                    + " s, evaluator "
                    + ", ".join(f"{x['client_s']:.2f}" for x in b)
                    + " s"
                )
        # 3. Points/hour.
        out["throughput"] = []
        for n in (int(w) for w in args.workers.split(",")):
            r = throughput(url, token, sp / "network.json", args, n)
            out["throughput"].append(r)
            print(
                f"  {n} evaluator(s) × {r['threads_each']} threads, {r['points']} points × "
                f"{args.sweep_images} images (batch {args.sweep_batch}), {args.sweep_steps} steps: {r['seconds']:.1f} s, "
                f"{r['points_per_hour']:.0f} points/hour (points per worker {r['per_worker']}, "
                f"failed {r['failed']})"
            )
    finally:
        server.kill()
        server.wait()
    out["loadavg_end"] = loadavg()
    print(f"load average {out['loadavg_end']}")
    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker_main(sys.argv[2:])
    else:
        main()
