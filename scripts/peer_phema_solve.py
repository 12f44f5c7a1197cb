#!/usr/bin/env python3
"""Peer timing for `hindsight bench solve`: EDM2's post-hoc EMA solve in NumPy.

Reads a hindsight solve request (JSON) on stdin and the number of timed repetitions as the
first argument; prints JSON with timings and the coefficients (one list per target, one
weight per input snapshot, in input order).

Two variants are timed, both float64 and both solving the same Gram system as
`training/phema.py` of NVlabs/edm2 (Algorithm 3 of arXiv 2312.02696):
  edm2     -- structured as EDM2 does it: the sigma_rel -> gamma conversion (largest real root
              of the cubic of eq. 126, via np.roots) is evaluated for every entry of the
              broadcast operands, the Gram matrix and right-hand side are built by
              broadcasting, then np.linalg.solve and column normalisation.
  vectorised -- the same, but each distinct sigma_rel is converted once; the fastest plain
              NumPy version of the same algorithm, so the comparison is not flattered by
              EDM2's per-element root finding.
Neither reports profile errors or condition numbers (EDM2 has no such report).
"""

import json
import statistics
import sys
import time

import numpy as np


def gamma_of(sigma_rel):
    s = sigma_rel**-2
    return np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max()


def gammas_each(sigmas):
    # One root-finding per element, as EDM2's conversion does for its broadcast operands.
    flat = np.asarray(sigmas, dtype=np.float64).ravel()
    return np.array([gamma_of(v) for v in flat]).reshape(np.shape(sigmas))


def gram(t_a, g_a, t_b, g_b):
    ratio = t_a / t_b
    exponent = np.where(t_a < t_b, g_b, -g_a)
    return (
        (g_a + 1)
        * (g_b + 1)
        * ratio**exponent
        / ((g_a + g_b + 1) * np.maximum(t_a, t_b))
    )


def solve_edm2(t_in, s_in, t_out, s_out):
    col = lambda x: np.asarray(x, dtype=np.float64).reshape(-1, 1)
    row = lambda x: np.asarray(x, dtype=np.float64).reshape(1, -1)
    a = gram(col(t_in), gammas_each(col(s_in)), row(t_in), gammas_each(row(s_in)))
    b = gram(col(t_in), gammas_each(col(s_in)), row(t_out), gammas_each(row(s_out)))
    x = np.linalg.solve(a, b)
    return x / x.sum(axis=0)


def solve_vectorised(t_in, s_in, t_out, s_out):
    table = {v: gamma_of(v) for v in set(s_in) | set(s_out)}
    g_in = np.array([table[v] for v in s_in])
    g_out = np.array([table[v] for v in s_out])
    t_in = np.asarray(t_in, dtype=np.float64)
    t_out = np.asarray(t_out, dtype=np.float64)
    a = gram(t_in[:, None], g_in[:, None], t_in[None, :], g_in[None, :])
    b = gram(t_in[:, None], g_in[:, None], t_out[None, :], g_out[None, :])
    x = np.linalg.solve(a, b)
    return x / x.sum(axis=0)


def timed(fn, args, repetitions):
    samples = []
    result = fn(*args)
    for _ in range(repetitions):
        start = time.perf_counter()
        fn(*args)
        samples.append(time.perf_counter() - start)
    samples.sort()
    return {
        "median_s": statistics.median(samples),
        "min_s": samples[0],
        "p90_s": samples[round((len(samples) - 1) * 0.9)],
    }, result


def main():
    repetitions = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    request = json.load(sys.stdin)
    snaps = request["snapshots"]
    last = max(s["nimg"] for s in snaps)
    targets = request["targets"]
    t_out_all = [t.get("nimg", last) for t in targets]
    if len(set(t_out_all)) != 1:
        raise SystemExit("the peer script handles one target time per request")
    t_out = t_out_all[0]
    used = [i for i, s in enumerate(snaps) if 0 < s["nimg"] <= t_out]
    t_in = [snaps[i]["nimg"] for i in used]
    s_in = [snaps[i]["sigma_rel"] for i in used]
    s_out = [t["sigma_rel"] for t in targets]
    args = (t_in, s_in, [t_out] * len(s_out), s_out)
    edm2, x = timed(solve_edm2, args, repetitions)
    vectorised, _ = timed(solve_vectorised, args, repetitions)
    coefficients = []
    for j in range(len(s_out)):
        full = [0.0] * len(snaps)
        for k, i in enumerate(used):
            full[i] = float(x[k, j])
        coefficients.append(full)
    json.dump(
        {
            **edm2,
            "vectorised": vectorised,
            "numpy": np.__version__,
            "coefficients": coefficients,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
