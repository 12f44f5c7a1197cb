"""Client-side Inception features agree with the features the Rust server reproduces
(``tests/fixtures/inception_real.safetensors``: 32 Fashion-MNIST test images, 28×28 padded
to 32×32, and their features from ``scripts/inception_reference.py``), whatever the layout,
channels and batching; a resize without NVIDIA's half-pixel offset does not; and per-seed
noise does not depend on the batch.

Needs NVIDIA's weights (``HINDSIGHT_FID_WEIGHTS``): skipped without them, failed under
``HINDSIGHT_REQUIRE_FID_WEIGHTS=1``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, fid_weights
from safetensors.numpy import load_file

from hindsight_client import HindsightError, InceptionFeatures, seed_generators, seeded_randn
from hindsight_client.inception import as_nchw

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "inception_real.safetensors"


def relative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image ``‖a − b‖₂ / ‖b‖₂`` (the server's audit measure)."""
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def fixture() -> dict[str, np.ndarray]:
    return load_file(str(FIXTURE))


@pytest.fixture(scope="module")
def extractor() -> InceptionFeatures:
    return InceptionFeatures(fid_weights(), batch=16)


def test_features_match_the_reference_pipeline(
    extractor: InceptionFeatures, fixture: dict[str, np.ndarray]
) -> None:
    images, expected = fixture["images_u8"], fixture["features"]
    assert images.shape == (32, 1, 32, 32)
    features = extractor(images[:16])
    assert features.shape == (16, 2048)
    assert features.dtype == np.float32
    assert relative(features, expected[:16]).max() <= 1e-4
    # Another layout, grey replicated by the caller, another batching: the same features.
    nhwc = np.repeat(images[16:20], 3, axis=1).transpose(0, 2, 3, 1)
    assert relative(extractor(torch.from_numpy(nhwc)), expected[16:20]).max() <= 1e-4
    one = InceptionFeatures(fid_weights(), batch=3)
    assert relative(one(images[20:25]), expected[20:25]).max() <= 1e-4


def test_a_resize_without_the_half_pixel_offset_differs(
    extractor: InceptionFeatures, fixture: dict[str, np.ndarray]
) -> None:
    class Plain(InceptionFeatures):
        def resize(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.interpolate(
                x, size=(299, 299), mode="bilinear", align_corners=False
            )

    plain = Plain(fid_weights())
    assert plain.digest == extractor.digest
    # More than the server's audit tolerance (1e-3) on every image.
    assert relative(plain(fixture["images_u8"][:4]), fixture["features"][:4]).min() > 1e-3


def test_the_digest_is_the_weights_blake3(extractor: InceptionFeatures) -> None:
    import blake3

    assert extractor.digest == blake3.blake3(fid_weights().read_bytes()).hexdigest()


def test_missing_weights_say_where_they_were_looked_for(tmp_path: object) -> None:
    with pytest.raises(HindsightError, match=r"no Inception weights \(looked at .*nothing\.pt\)"):
        InceptionFeatures(f"{tmp_path}/nothing.pt")


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((2, 1, 8, 8), dtype=np.float32), "dtype float32 is not uint8"),
        (np.zeros((2, 2, 8, 8), dtype=np.uint8), "channels must be 1 or 3"),
        (np.zeros((8, 8), dtype=np.uint8), r"shape \[8, 8\] is not \[B, C, H, W\]"),
        ([[1, 2]], "expected a uint8 tensor or array, not list"),
    ],
)
def test_images_of_another_kind_are_refused(images: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        as_nchw(images)


def test_layouts_are_read_as_the_server_reads_them() -> None:
    assert as_nchw(np.zeros((2, 3, 5, 7), dtype=np.uint8)).shape == (2, 3, 5, 7)
    assert as_nchw(np.zeros((2, 5, 7, 3), dtype=np.uint8)).shape == (2, 3, 5, 7)
    assert as_nchw(np.zeros((2, 5, 7), dtype=np.uint8)).shape == (2, 1, 5, 7)


def test_image_i_gets_the_noise_of_seed_i_whatever_the_batch() -> None:
    seeds = list(range(10, 20))
    whole = seeded_randn(seeds, (1, 4, 4))
    assert whole.shape == (10, 1, 4, 4)
    parts = torch.cat([seeded_randn(seeds[:3], (1, 4, 4)), seeded_randn(seeds[3:], (1, 4, 4))])
    assert torch.equal(whole, parts)
    assert torch.equal(whole[5], seeded_randn([15], (1, 4, 4))[0])
    assert not torch.equal(whole[0], whole[1])
    # Generators continue their streams: a second draw differs from the first, per seed.
    generators = seed_generators(seeds[:2])
    first = seeded_randn(generators, (3,))
    second = seeded_randn(generators, (3,))
    assert torch.equal(first, seeded_randn(seeds[:2], (3,)))
    assert not torch.equal(first, second)
    assert seeded_randn([], (3,)).shape == (0, 3)
