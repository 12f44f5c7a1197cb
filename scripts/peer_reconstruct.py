#!/usr/bin/env python3
"""Peer timing for `hindsight bench reconstruct`: EDM2's reconstruction loop in NumPy.

Usage: peer_reconstruct.py INPUT_DIR SIGMA_LIST OUTDIR

Structured as `reconstruct_phema.py` of NVlabs/edm2 does its work: the coefficients for a
batch of at most 8 output profiles are solved (Algorithm 3, float64; see
peer_phema_solve.py), then every input snapshot is loaded whole, in turn, and added into
float32 accumulators for every output of the batch, parameter by parameter; finally each
output is written. Inputs are the `<name>-<kimg:07d>-<sigma:.3f>.safetensors` files that
`hindsight bench reconstruct` generates (fp16); outputs are fp16 safetensors. Prints
`peak_rss_kib N` on stderr (ru_maxrss) so the benchmark can report memory side by side.
"""

import json
import os
import re
import resource
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_phema_solve import solve_vectorised

NAME = re.compile(r"^.*-(\d+)-(\d+\.\d+)\.safetensors$")
BATCH = 8


def load(path):
    """Reads a whole safetensors file (as EDM2 unpickles a whole snapshot)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        assert info["dtype"] == "F16"
        out[name] = np.frombuffer(
            data, dtype=np.float16, count=(end - start) // 2, offset=base + start
        )
    return out


def save(path, tensors):
    header = {}
    offset = 0
    for name, arr in tensors.items():
        header[name] = {
            "dtype": "F16",
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for arr in tensors.values():
            f.write(arr.tobytes())


def main():
    indir, sigma_list, outdir = sys.argv[1], sys.argv[2], sys.argv[3]
    os.makedirs(outdir, exist_ok=True)
    files = []
    for name in sorted(os.listdir(indir)):
        m = NAME.match(name)
        if m:
            files.append(
                (os.path.join(indir, name), int(m.group(1)) * 1000, float(m.group(2)))
            )
    t_in = [f[1] for f in files]
    s_in = [f[2] for f in files]
    out_sigmas = [float(s) for s in sigma_list.split(",")]
    t_out = max(t_in)
    for b in range(0, len(out_sigmas), BATCH):
        batch = out_sigmas[b : b + BATCH]
        coefs = solve_vectorised(t_in, s_in, [t_out] * len(batch), batch)
        outs = None
        for i, (path, _, _) in enumerate(files):
            snapshot = load(path)
            if outs is None:
                outs = [
                    {k: np.zeros(v.shape, np.float32) for k, v in snapshot.items()}
                    for _ in batch
                ]
            for j, out in enumerate(outs):
                c = np.float32(coefs[i, j])
                for k, v in snapshot.items():
                    out[k] += v.astype(np.float32) * c
            del snapshot
        for j, out in enumerate(outs):
            save(
                os.path.join(outdir, f"peer-{t_out:010d}-{batch[j]:.3f}.safetensors"),
                {k: v.astype(np.float16) for k, v in out.items()},
            )
    print(
        f"peak_rss_kib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
