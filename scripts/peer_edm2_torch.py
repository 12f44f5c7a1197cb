#!/usr/bin/env python3
"""Peer timing for `hindsight bench train`: the EDM2 network in PyTorch.

Usage: peer_edm2_torch.py [--fixture F] [--fixture-json J] [--batch 64] [--iterations 5]
                          [--threads 2] [--device cpu|cuda] [--sample-steps N]

The network is EDM2's config-G U-Net with the preconditioning and the learned log-variance
head, written here in plain PyTorch after the facts of NVlabs/edm2 `training/networks_edm2.py`
(the same structure hindsight's `model` module has), with PyTorch's own conv2d, matmul and
Adam. Before timing anything it loads the reference fixture's formula weights and checks its
denoised output and log-variance against the fixture (≤ 1e-5 relative to the largest value),
so the network timed is the reference network.

Timed, after one warm-up round, as medians:
- forward: one eval-mode forward pass under torch.no_grad (what a sampler runs);
- training step: forced weight normalisation, noise levels and noise drawn, the EDM2 loss,
  backward, non-finite gradients zeroed, Adam(β = (0.9, 0.99), ε = 1e-8) — one step of EDM2's
  training loop.
Prints one JSON line: {"forward_s": …, "step_s": …, "parity": …, "device": …, "threads": …}.

With --sample-steps N, times EDM's deterministic Heun sampler instead (EDM, Karras et al. 2022,
Algorithm 1 with S_churn = 0, as EDM2's generate_images.py runs it: σ 0.002…80, ρ 7, 2N − 1
network evaluations) on `batch` images, and prints {"sample_s": …} with the same fields.
"""

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
from safetensors.numpy import load_file

MASK = (1 << 64) - 1


def fnv1a64(s):
    h = 0xCBF29CE484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001B3) & MASK
    return h


def formula_tensor(name, spec):
    """The fixture's formula weights (its JSON states the formula), float64 → float32 once."""
    n = int(np.prod(spec["shape"])) if spec["shape"] else 1
    with np.errstate(over="ignore"):
        x = np.uint64(fnv1a64(name)) + np.arange(n, dtype=np.uint64)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        z = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)
    if spec["kind"] == "sym":
        v = (2.0 * u - 1.0) * spec["scale"]
    else:
        v = spec["offset"] + u * spec["scale"]
    return torch.from_numpy(v.astype(np.float32).reshape(spec["shape"]))


# Magnitude-preserving primitives.
def normalize(x, dim=None, eps=1e-4):
    dims = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True)
    return x / (eps + norm * math.sqrt(norm.numel() / x.numel()))


def mp_silu(x):
    return torch.nn.functional.silu(x) / 0.596


def mp_sum(a, b, t):
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a, b, t):
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat(
        [a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=1
    )


def resample(x, mode):
    if mode == "down":
        return torch.nn.functional.avg_pool2d(x, 2)
    if mode == "up":
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    return x


class MPFourier(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.register_buffer("freqs", torch.zeros(channels))
        self.register_buffer("phases", torch.zeros(channels))

    def forward(self, x):
        return torch.cos(x[:, None] * self.freqs[None] + self.phases[None]) * math.sqrt(
            2
        )


class MPConv(torch.nn.Module):
    def __init__(self, cin, cout, kernel):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(cout, cin, *kernel))

    def forward(self, x, gain=1):
        w = self.weight
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))  # forced weight normalisation
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(torch.nn.Module):
    def __init__(self, cfg, cin, cout, cemb, flavor, mode, attention):
        super().__init__()
        self.flavor, self.mode, self.cfg = flavor, mode, cfg
        self.heads = cout // cfg["channels_per_head"] if attention else 0
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(cout if flavor == "enc" else cin, cout, [3, 3])
        self.emb_linear = MPConv(cemb, cout, [])
        self.conv_res1 = MPConv(cout, cout, [3, 3])
        self.conv_skip = MPConv(cin, cout, [1, 1]) if cin != cout else None
        if self.heads:
            self.attn_qkv = MPConv(cout, cout * 3, [1, 1])
            self.attn_proj = MPConv(cout, cout, [1, 1])

    def forward(self, x, emb):
        x = resample(x, self.mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=[1])
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None])
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.cfg["res_balance"])
        if self.heads:
            n, ch, h, w = x.shape
            y = self.attn_qkv(x).reshape(n, self.heads, -1, 3, h * w)
            q, k, v = normalize(y, dim=[2]).unbind(3)
            a = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(
                dim=3
            )
            y = torch.einsum("nhqk,nhck->nhcq", a, v)
            x = mp_sum(
                x, self.attn_proj(y.reshape(n, ch, h, w)), self.cfg["attn_balance"]
            )
        return x.clip(-self.cfg["clip_act"], self.cfg["clip_act"])


class UNet(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        mc = cfg["model_channels"]
        cblock = [mc * m for m in cfg["channel_mult"]]
        cnoise = (
            mc * cfg["channel_mult_noise"]
            if cfg.get("channel_mult_noise")
            else cblock[0]
        )
        cemb = (
            mc * cfg["channel_mult_emb"] if cfg.get("channel_mult_emb") else max(cblock)
        )
        self.out_gain = torch.nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, [])
        self.emb_label = (
            MPConv(cfg["label_dim"], cemb, []) if cfg["label_dim"] else None
        )
        self.enc = torch.nn.ModuleDict()
        cout = cfg["img_channels"] + 1
        for level, ch in enumerate(cblock):
            res = cfg["img_resolution"] >> level
            if level == 0:
                cin, cout = cout, ch
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, [3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(
                    cfg, cout, cout, cemb, "enc", "down", False
                )
            for idx in range(cfg["num_blocks"]):
                cin, cout = cout, ch
                att = res in cfg["attn_resolutions"]
                self.enc[f"{res}x{res}_block{idx}"] = Block(
                    cfg, cin, cout, cemb, "enc", "keep", att
                )
        skips = [
            m.weight.shape[0] if isinstance(m, MPConv) else m.conv_res1.weight.shape[0]
            for m in self.enc.values()
        ]
        self.dec = torch.nn.ModuleDict()
        for level, ch in reversed(list(enumerate(cblock))):
            res = cfg["img_resolution"] >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(
                    cfg, cout, cout, cemb, "dec", "keep", True
                )
                self.dec[f"{res}x{res}_in1"] = Block(
                    cfg, cout, cout, cemb, "dec", "keep", False
                )
            else:
                self.dec[f"{res}x{res}_up"] = Block(
                    cfg, cout, cout, cemb, "dec", "up", False
                )
            for idx in range(cfg["num_blocks"] + 1):
                cin, cout = cout + skips.pop(), ch
                att = res in cfg["attn_resolutions"]
                self.dec[f"{res}x{res}_block{idx}"] = Block(
                    cfg, cin, cout, cemb, "dec", "keep", att
                )
        self.out_conv = MPConv(cout, cfg["img_channels"], [3, 3])

    def forward(self, x, noise_labels, class_labels):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            scaled = class_labels * math.sqrt(class_labels.shape[1])
            emb = mp_sum(emb, self.emb_label(scaled), self.cfg["label_balance"])
        emb = mp_silu(emb)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, layer in self.enc.items():
            x = layer(x) if "conv" in name else layer(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), self.cfg["concat_balance"])
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class Precond(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.sigma_data = cfg["sigma_data"]
        self.unet = UNet(cfg)
        self.logvar_fourier = MPFourier(cfg["logvar_channels"])
        self.logvar_linear = MPConv(cfg["logvar_channels"], 1, [])

    def forward(self, x, sigma, class_labels):
        sd = self.sigma_data
        s = sigma.reshape(-1, 1, 1, 1)
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + s**2).sqrt()
        c_noise = sigma.log() / 4
        f_x = self.unet(x * c_in, c_noise, class_labels)
        logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
        return c_skip * x + c_out * f_x, logvar


def edm2_loss(net, images, labels, p_mean=-0.4, p_std=1.0):
    sd = net.sigma_data
    sigma = (torch.randn(images.shape[0], device=images.device) * p_std + p_mean).exp()
    s = sigma.reshape(-1, 1, 1, 1)
    weight = (s**2 + sd**2) / (s * sd) ** 2
    noise = torch.randn_like(images) * s
    denoised, logvar = net(images + noise, sigma, labels)
    return (weight / logvar.exp()) * (denoised - images) ** 2 + logvar


def edm_sampler(
    net, noise, labels, num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0
):
    """EDM's Heun sampler without stochasticity; the state in float32 as hindsight keeps it."""
    i = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (
        sigma_max ** (1 / rho)
        + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    t_steps = torch.cat([t_steps, torch.zeros(1, dtype=torch.float64)]).float().tolist()
    n = noise.shape[0]

    def denoise(x, sigma):
        return net(x, torch.full((n,), sigma, device=x.device), labels)[0]

    x = noise * t_steps[0]
    for k, (t_cur, t_next) in enumerate(itertools.pairwise(t_steps)):
        d_cur = (x - denoise(x, t_cur)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if k < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x


def full_config(cfg, sigma_data):
    out = {
        "label_balance": 0.5,
        "concat_balance": 0.5,
        "res_balance": 0.3,
        "attn_balance": 0.3,
        "clip_act": 256.0,
        "channels_per_head": 64,
        "logvar_channels": 128,
        "sigma_data": sigma_data,
    }
    out.update(cfg)
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    fixtures = os.path.join(here, "..", "tests", "fixtures")
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--fixture",
        default=os.environ.get(
            "HINDSIGHT_EDM2_FIXTURE", os.path.join(fixtures, "edm2_unet.safetensors")
        ),
    )
    ap.add_argument(
        "--fixture-json",
        default=os.environ.get(
            "HINDSIGHT_EDM2_FIXTURE_JSON", os.path.join(fixtures, "edm2_unet.json")
        ),
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sample-steps", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    # Full float32 on the GPU as hindsight computes (no TF32), cuDNN autotuning as EDM2's
    # training loop enables it (the warm-up round absorbs it).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    with open(args.fixture_json) as f:
        desc = json.load(f)["edm2_unet"]
    cfg = full_config(desc["config"], desc.get("sigma_data", 0.5))
    net = Precond(cfg)
    state = {k: formula_tensor(k, spec) for k, spec in desc["weight_spec"].items()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        sys.exit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    net = net.to(dev)

    # Parity with the reference before timing anything.
    fx = {
        k: torch.from_numpy(v).to(dev)
        for k, v in load_file(args.fixture).items()
        if k.startswith(("input/", "output/"))
    }
    net.eval()
    with torch.no_grad():
        d, lv = net(fx["input/x"], fx["input/sigma"], fx["input/class_labels"])
    parity = max(
        (
            (d - fx["output/denoised"]).abs().max() / fx["output/denoised"].abs().max()
        ).item(),
        (
            (lv - fx["output/logvar"]).abs().max() / fx["output/logvar"].abs().max()
        ).item(),
    )
    if not parity <= 1e-5:
        sys.exit(
            f"the PyTorch network does not reproduce the fixture: relative error {parity:.3g}"
        )

    gen = torch.Generator().manual_seed(0)
    n, res, ch, classes = (
        args.batch,
        cfg["img_resolution"],
        cfg["img_channels"],
        cfg["label_dim"],
    )
    images = (torch.rand(n, ch, res, res, generator=gen) * 2 - 1).to(dev)
    labels = (
        torch.eye(classes)[torch.randint(classes, (n,), generator=gen)].to(dev)
        if classes
        else None
    )
    sigma = torch.ones(n, device=dev)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8)

    if args.sample_steps > 0:
        noise = torch.randn(n, ch, res, res, generator=gen).to(dev)
        times = []
        net.eval()
        for _ in range(args.iterations + 1):
            sync()
            t = time.perf_counter()
            with torch.no_grad():
                edm_sampler(net, noise, labels, args.sample_steps).sum().item()
            sync()
            times.append(time.perf_counter() - t)
        print(
            json.dumps(
                {
                    "sample_s": statistics.median(times[1:]),
                    "parity": parity,
                    "device": str(dev),
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                }
            )
        )
        return

    forward, step = [], []
    for _ in range(args.iterations + 1):
        net.eval()
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            net(images, sigma, labels)[0].sum().item()
        forward.append(time.perf_counter() - t)
        net.train()
        sync()
        t = time.perf_counter()
        loss = edm2_loss(net, images, labels)
        opt.zero_grad(set_to_none=True)
        loss.sum().mul(1 / n).backward()
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
        opt.step()
        sync()
        step.append(time.perf_counter() - t)
    print(
        json.dumps(
            {
                "forward_s": statistics.median(forward[1:]),
                "step_s": statistics.median(step[1:]),
                "parity": parity,
                "device": str(dev),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
