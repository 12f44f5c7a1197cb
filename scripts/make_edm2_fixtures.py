#!/usr/bin/env python3
"""Writes tests/fixtures/edm2_pkl/: EDM2's own snapshot files, made by EDM2's own code.

Usage:
    git -C /path/to/edm2-mirror archive HEAD | tar -x -C /tmp/edm2src
    python scripts/make_edm2_fixtures.py --edm2 /tmp/edm2src [--out tests/fixtures/edm2_pkl]

Needs torch, numpy and what EDM2 imports (click, tqdm, requests, psutil); CI needs none of
this, only the committed outputs. Nothing of EDM2 is copied: its modules are imported from the
checkout given by --edm2 (NVlabs/edm2: training/training_loop.py, training/phema.py,
training/networks_edm2.py, torch_utils/distributed.py, reconstruct_phema.py).

What it does, as EDM2's training loop (training/training_loop.py) does it:
- a tiny `Precond` (8x8, 1 channel, model_channels 8, channel_mult [1], one block, no
  attention, logvar_channels 8) trained with `EDM2Loss` and Adam on random images, batch 1024,
  with `phema.PowerFunctionEMA(stds=[0.050, 0.100])` updated after every step;
- every 4 steps (4096 images), into `run/`, `network-snapshot-<kimg:07d>-<std:.3f>.pkl` per std: an
  `EasyDict(encoder, dataset_kwargs, loss_fn, ema)` with `ema` deep-copied to fp16, written by
  `pickle.dump` (EDM2's persistent classes pickle their module source and state);
- at the last time `run/training-state-<kimg:07d>.pt` as `CheckpointIO.save` writes it;
- then `reconstruct_phema.reconstruct_phema` at the last time for OUT_STDS; the outputs' `ema`
  state dicts (fp16, names as `state_dict()` gives them) go to `reference.safetensors` as
  `<std>/<name>`, and `reference.json` lists the inputs (nimg, std), the output stds, EDM2's
  coefficients (`training.phema.solve_posthoc_coefficients`, [input][output]), the buffer names
  and the torch version. `reference_fp32_ema.safetensors` holds the fp32 EMA state dicts of the
  training state (`<std>/<name>`), to compare the `.pt` import with.

Also writes `malicious/`: pickles named like EDM2 snapshots that call `os.system`,
`builtins.exec` (GLOBAL + REDUCE), `posix.system` (STACK_GLOBAL + REDUCE), an unknown class
rebuilt through `copyreg._reconstructor` and one built by NEWOBJ + BUILD, each of which would create the file named in `malicious/README`. They are written
byte by byte here; nothing of them runs.
"""

import argparse
import copy
import json
import os
import pickle
import struct
import sys

KIMG_STEP = 4  # snapshot interval in steps of 1024 images
STEPS = 12
BATCH = 1024
STDS = [0.050, 0.100]
OUT_STDS = [0.040, 0.070, 0.130]
SIDE_EFFECT = "/tmp/hindsight-edm2-malicious-pickle-ran"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edm2", required=True, help="a checkout of NVlabs/edm2")
    here = os.path.dirname(os.path.abspath(__file__))
    default_out = os.path.join(here, "..", "tests", "fixtures", "edm2_pkl")
    parser.add_argument("--out", default=default_out)
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.edm2))
    os.makedirs(args.out, exist_ok=True)
    train_and_snapshot(args.out, os.path.join(args.out, "run"))
    write_malicious(os.path.join(args.out, "malicious"))


def train_and_snapshot(out, run):
    import dnnlib
    import numpy as np
    import reconstruct_phema
    import torch
    import training.phema
    from torch_utils import distributed as dist
    from training.encoders import StandardRGBEncoder
    from training.networks_edm2 import Precond
    from training.training_loop import EDM2Loss

    os.makedirs(run, exist_ok=True)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    net = Precond(
        img_resolution=8,
        img_channels=1,
        label_dim=0,
        model_channels=8,
        channel_mult=[1],
        num_blocks=1,
        attn_resolutions=[],
        logvar_channels=8,
    )
    net.train().requires_grad_(True)
    encoder = StandardRGBEncoder()
    loss_fn = EDM2Loss()
    dataset_kwargs = dnnlib.EasyDict(
        class_name="training.dataset.ImageFolderDataset", path="random-8x8"
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.9, 0.99))
    ema = training.phema.PowerFunctionEMA(net=net, stds=STDS)
    state = dnnlib.EasyDict(cur_nimg=0, total_elapsed_time=0)
    checkpoint = dist.CheckpointIO(
        state=state, net=net, loss_fn=loss_fn, optimizer=optimizer, ema=ema
    )
    for step in range(STEPS):
        images = torch.randint(0, 256, [8, 1, 8, 8]).to(torch.float32) / 127.5 - 1
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net=net, images=images).mean().backward()
        optimizer.step()
        state.cur_nimg += BATCH
        ema.update(cur_nimg=state.cur_nimg, batch_size=BATCH)
        if (step + 1) % KIMG_STEP == 0:
            # As training_loop.py's "Save network snapshot".
            for ema_net, ema_suffix in ema.get():
                data = dnnlib.EasyDict(
                    encoder=encoder, dataset_kwargs=dataset_kwargs, loss_fn=loss_fn
                )
                data.ema = (
                    copy.deepcopy(ema_net)
                    .cpu()
                    .eval()
                    .requires_grad_(False)
                    .to(torch.float16)
                )
                fname = f"network-snapshot-{state.cur_nimg // 1000:07d}{ema_suffix}.pkl"
                with open(os.path.join(run, fname), "wb") as f:
                    pickle.dump(data, f)
    checkpoint.save(
        os.path.join(run, f"training-state-{state.cur_nimg // 1000:07d}.pt"),
        verbose=False,
    )
    fp32 = {}
    for std, ema_net in zip(STDS, ema.emas):
        for name, t in ema_net.state_dict().items():
            fp32[f"{std:.3f}/{name}"] = t.detach().to(torch.float32).contiguous()
    write_safetensors(os.path.join(out, "reference_fp32_ema.safetensors"), fp32)

    in_pkls = reconstruct_phema.list_input_pickles(run, in_prefix="network-snapshot")
    results = None
    for r in reconstruct_phema.reconstruct_phema(
        in_pkls, out_std=OUT_STDS, verbose=False
    ):
        results = r.out
    in_nimg = [p.nimg for p in in_pkls]
    in_std = [p.std for p in in_pkls]
    out_nimg = max(in_nimg)
    coefs = training.phema.solve_posthoc_coefficients(
        in_nimg, in_std, out_nimg, OUT_STDS
    )
    ref = {}
    buffers = None
    for r in results:
        net_out = r.net
        for name, t in net_out.state_dict().items():
            ref[f"{r.std:.3f}/{name}"] = t.detach().contiguous()
        buffers = sorted(name for name, _ in net_out.named_buffers())
    write_safetensors(os.path.join(out, "reference.safetensors"), ref)
    meta = {
        "inputs": [
            {"file": os.path.basename(p.path), "nimg": p.nimg, "std": p.std}
            for p in in_pkls
        ],
        "out_nimg": out_nimg,
        "out_stds": OUT_STDS,
        "coefficients": np.asarray(coefs).tolist(),
        "buffers": buffers,
        "training_state": f"training-state-{out_nimg // 1000:07d}.pt",
        "training_state_stds": STDS,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


def write_safetensors(path, tensors):
    """A deterministic safetensors file (sorted names, no metadata) without the safetensors
    package: header JSON, then the raw little-endian bytes in name order."""
    import torch

    names = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        data = t.numpy().tobytes()
        header[name] = {
            "dtype": names[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.writelines(chunks)


def short_str(s):
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def write_malicious(out):
    """Pickles that would run code if unpickled by Python; written opcode by opcode."""
    os.makedirs(out, exist_ok=True)
    cmd = f"touch {SIDE_EFFECT}"
    proto = b"\x80\x04"
    cases = {
        # GLOBAL 'os system', (cmd,), REDUCE
        "network-snapshot-0000004-0.050.pkl": proto
        + b"cos\nsystem\n"
        + short_str(cmd)
        + b"\x85R.",
        # GLOBAL 'builtins exec', ("open(...).close()",), REDUCE
        "network-snapshot-0000004-0.100.pkl": proto
        + b"cbuiltins\nexec\n"
        + short_str(f"open({SIDE_EFFECT!r}, 'w').close()")
        + b"\x85R.",
        # STACK_GLOBAL 'posix' 'system', (cmd,), REDUCE, inside an EasyDict as EDM2 writes it
        "network-snapshot-0000008-0.050.pkl": proto
        + b"\x8c\x0bdnnlib.util\x94\x8c\x08EasyDict\x94\x93\x94)\x81\x94"
        + short_str("ema")
        + short_str("posix")
        + short_str("system")
        + b"\x93"
        + short_str(cmd)
        + b"\x85Rs.",
        # An unknown class rebuilt by its __reduce__: copyreg._reconstructor of a class of
        # the file's choosing.
        "network-snapshot-0000008-0.100.pkl": proto
        + b"ccopyreg\n_reconstructor\n"
        + b"cevil_module\nPayload\ncbuiltins\nobject\nN\x87R.",
        # An unknown class as pickle writes a plain instance: NEWOBJ, then BUILD of its state.
        "network-snapshot-0000012-0.050.pkl": proto
        + b"cevil_module\nPayload\n)\x81}b.",
    }
    for name, data in cases.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    with open(os.path.join(out, "README"), "w") as f:
        f.write(f"Pickles that would create {SIDE_EFFECT} if Python unpickled them.\n")
        f.write(
            "Made by scripts/make_edm2_fixtures.py; hindsight must refuse each by name.\n"
        )


if __name__ == "__main__":
    main()
