"""The demo model's training augmentation (scripts/demo_augmentation.py) and the held-back
views of scripts/evaluate_demo.py, on tiny synthetic volumes (no training, no network)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import demo_augmentation as aug  # noqa: E402
import evaluate_demo as ev  # noqa: E402

F = torch.nn.functional
PATCH = (4, 8, 8)


def read(volume: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """volume [C, Z, Y, X] sampled as the sampler samples it -> [C, *patch]."""
    return F.grid_sample(volume[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]


def test_an_unaugmented_patch_reads_the_voxels_exactly() -> None:
    volume = torch.rand(1, 9, 20, 21)
    start = (3, 5, 7)
    centre = [s + (p - 1) / 2 for s, p in zip(start, PATCH)]
    patch = read(volume, aug.sample_grid(centre, PATCH, volume.shape[1:], 1.0, 0.0))
    expected = volume[:, 3:7, 5:13, 7:15]
    torch.testing.assert_close(patch, expected, atol=1e-5, rtol=0)


def test_scale_and_rotation_move_sample_points_as_documented() -> None:
    """On linear ramps (exact under linear interpolation) patch offset p reads the volume at
    centre + scale * R(angle) p, R rotating (y, x) about z."""
    shape = (12, 40, 40)
    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    volume = torch.stack([z, y, x])
    centre, scale, angle = (5.5, 19.5, 20.5), 1.3, math.radians(12.0)
    patch = read(volume, aug.sample_grid(centre, PATCH, shape, scale, angle))
    offsets = [torch.arange(n, dtype=torch.float32) - (n - 1) / 2 for n in PATCH]
    oz, oy, ox = torch.meshgrid(*offsets, indexing="ij")
    cos, sin = math.cos(angle), math.sin(angle)
    expected = torch.stack([
        centre[0] + scale * oz,
        centre[1] + scale * (cos * oy - sin * ox),
        centre[2] + scale * (sin * oy + cos * ox),
    ])
    torch.testing.assert_close(patch, expected, atol=1e-3, rtol=0)


def test_targets_follow_the_image_through_scaling_and_rotation() -> None:
    """The image is the first target map itself: after any spatial augmentation the sampled
    target must be the thresholded sampled image, i.e. both used the same grid."""
    rng = np.random.default_rng(1)
    targets = torch.zeros(2, 10, 30, 30, dtype=torch.uint8)
    targets[0, 2:8, 5:20, 8:25] = 1
    targets[1, 3:6, 12:16, 3:9] = 1
    image = targets[:1].to(torch.float32)
    only_spatial = aug.AugmentationRanges(p_scale=1.0, p_rotate=1.0, p_noise=0.0, p_blur=0.0, p_brightness=0.0,
                                          p_shift=0.0, p_contrast=0.0, p_low_res=0.0, p_gamma=0.0,
                                          p_gamma_inverted=0.0)
    sampler = aug.AugmentingPatchSampler(image, targets, PATCH, rng, [1.0, 1.0], ranges=only_spatial)
    x, y = sampler.sample(16)
    assert x.shape == (16, 1, *PATCH) and y.shape == (16, 2, *PATCH) and y.dtype == torch.long
    assert torch.equal((x[:, 0] > 0.5).long(), y[:, 0])
    assert 0 < int(y[:, 0].sum()) < y[:, 0].numel(), "foreground oversampling must hit the structure"


def test_outside_the_volume_is_air_and_background() -> None:
    image, targets = torch.ones(1, 6, 10, 10), torch.ones(1, 6, 10, 10, dtype=torch.uint8)
    grid = aug.sample_grid((3.0, 40.0, 40.0), PATCH, image.shape[1:], 1.0, 0.0)
    assert float(read(image, grid).abs().max()) == 0.0
    assert float(read(targets.float(), grid).max()) == 0.0


def test_uniform_patches_reach_past_the_border() -> None:
    """Patches that are not foreground-centred may start up to border_fraction x patch outside."""
    image, targets = torch.ones(1, 8, 16, 16), torch.zeros(1, 8, 16, 16, dtype=torch.uint8)
    targets[0, 4, 8, 8] = 1
    ranges = aug.AugmentationRanges(p_scale=0.0, p_rotate=0.0, p_noise=0.0, p_blur=0.0, p_brightness=0.0,
                                    p_shift=0.0, p_contrast=0.0, p_low_res=0.0, p_gamma=0.0,
                                    p_gamma_inverted=0.0, border_fraction=0.5)
    sampler = aug.AugmentingPatchSampler(image, targets, PATCH, np.random.default_rng(0), [1.0], fg_fraction=0.0,
                                         ranges=ranges)
    x, _ = sampler.sample(64)
    inside = x.mean(dim=(1, 2, 3, 4))
    assert float(inside.min()) < 1.0, "some patches must cover air outside the scan"
    assert float(inside.max()) == 1.0, "and some lie wholly inside"
    no_border = aug.AugmentingPatchSampler(image, targets, PATCH, np.random.default_rng(0), [1.0],
                                           fg_fraction=0.0, ranges=aug.NO_AUGMENTATION)
    assert float(no_border.sample(64)[0].min()) == 1.0


def test_intensity_augmentation_is_seeded_and_off_when_disabled() -> None:
    x = torch.rand(1, *PATCH)
    assert torch.equal(aug.intensity(x, np.random.default_rng(0), aug.NO_AUGMENTATION), x)
    always = aug.AugmentationRanges(p_noise=1.0, p_blur=1.0, p_brightness=1.0, p_shift=1.0, p_contrast=1.0,
                                    p_low_res=1.0, p_gamma=1.0, p_gamma_inverted=1.0)
    a = aug.intensity(x, np.random.default_rng(7), always)
    b = aug.intensity(x, np.random.default_rng(7), always)
    assert torch.equal(a, b) and a.shape == x.shape and bool(torch.isfinite(a).all())
    assert not torch.allclose(a, x, atol=1e-3)


def test_gamma_keeps_mean_and_std() -> None:
    x = torch.rand(1, *PATCH)
    for inverted in (False, True):
        y = aug._gamma(x, 1.4, inverted)
        assert not torch.allclose(y, x, atol=1e-3)
        torch.testing.assert_close(y.mean(), x.mean(), atol=1e-5, rtol=0)
        torch.testing.assert_close(y.std(), x.std(), atol=1e-5, rtol=0)


# -- evaluation views ---------------------------------------------------------------------


@pytest.fixture()
def case() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    rng = np.random.default_rng(0)
    image = rng.normal(40.0, 10.0, (10, 24, 26)).astype(np.float32)
    labels = np.zeros(image.shape, dtype=np.int16)
    labels[3:7, 6:14, 8:20] = 5
    labels[4:6, 15:20, 4:9] = 2
    return image, labels, (3.0, 3.0, 3.0)


def test_every_view_keeps_labels_on_the_image(case) -> None:
    image, labels, spacing = case
    for name, view in ev.views(seed=0).items():
        out_image, out_labels, out_spacing = view(image, labels, spacing)
        assert out_image.shape == out_labels.shape, name
        assert out_image.dtype == np.float32 and len(out_spacing) == 3, name
        assert set(np.unique(out_labels)) <= {0, 2, 5}, name
    assert np.array_equal(ev.views(0)["training scan"](image, labels, spacing)[0], image)


def test_field_of_view_views_move_image_and_labels_together(case) -> None:
    image, labels, spacing = case
    padded, padded_labels, _ = ev.pad_view(1, 2, 3)(image, labels, spacing)
    assert padded.shape == (12, 28, 32) and padded[0].max() == ev.AIR_HU
    assert np.array_equal(padded_labels[1:-1, 2:-2, 3:-3], labels)
    shifted, shifted_labels, _ = ev.shift_view(2, 3)(image, labels, spacing)
    assert shifted.shape == image.shape and np.array_equal(shifted[:, :-2, :-3], image[:, 2:, 3:])
    assert np.array_equal(shifted_labels[:, :-2, :-3], labels[:, 2:, 3:]) and shifted[:, -1].max() == ev.AIR_HU
    rotated, rotated_labels, _ = ev.rotate_view(0.0)(image, labels, spacing)
    assert np.allclose(rotated, image) and np.array_equal(rotated_labels, labels)


def test_spacing_views(case) -> None:
    image, labels, spacing = case
    resampled, resampled_labels, new_spacing = ev.resample_view(1.25)(image, labels, spacing)
    assert new_spacing == (3.75, 3.75, 3.75)
    assert resampled.shape == (8, 19, 21)  # round(n / 1.25)
    volume_ml = (labels == 5).sum() * 27.0
    assert abs((resampled_labels == 5).sum() * 3.75 ** 3 - volume_ml) / volume_ml < 0.35
    same, same_labels, smaller = ev.size_view(0.8)(image, labels, spacing)
    assert same is image and same_labels is labels and smaller == pytest.approx((2.4, 2.4, 2.4))
    shifted = ev.intensity_view(offset_hu=50.0)(image, labels, spacing)[0]
    assert np.allclose(shifted - image, 50.0)
