"""Preprocessing (crop, resample, normalise, trace) and its undoing (postprocessing.restore).

Resampling is checked against nnU-Net's own ``resample_data_or_seg_to_shape``: always against
outputs stored in ``data/resample_nnunet_reference.npz`` (made by nnunetv2 2.8.1 with scipy
1.17.1 / scikit-image 0.26.0, see ``_nnunet_resample``), and live on the example CT when
nnunetv2 is installed (marker ``nnunet``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from unisegcli.errors import ChannelError, DeviceError
from unisegcli.weights.cards import TaskCard
from unisegcli.postprocessing.restore import restore_label_map, restore_probabilities
from unisegcli.preprocessing import preprocess, preprocess_volume
from unisegcli.preprocessing.crop import crop_to_bbox, nonzero_bbox
from unisegcli.preprocessing.normalize import normalize
from unisegcli.preprocessing.resample import compute_new_shape, resample_to_shape, separate_z_axis
from unisegcli.preprocessing.trace import CropStep, NormalizeStep, ResampleStep, Trace

DATA = Path(__file__).parent / "data"
REFERENCE_CASES = ["iso_cubic", "sepz_cubic", "sepx_cubic", "target_aniso_linear", "sepz_linear"]
TISSUE_EDGES_HU = [-500, -100, 100, 300]  # air | fat | soft tissue | contrast | bone


pytestmark = pytest.mark.usefixtures("single_thread")


def card(spacing=(2.0, 1.0, 1.0), channels=("ct",), norm=None) -> TaskCard:
    norm = norm or {ch: {"scheme": "ct_clip_scale", "clip_hu": [-325, 325]} for ch in channels}
    return TaskCard(
        name="organ",
        index=0,
        modality="CT",
        channels=tuple(channels),
        labels={1: "organ"},
        spacing_mm=tuple(spacing),
        normalization=norm,
    )


def load_example_ct() -> np.ndarray:
    import nibabel as nib

    img = nib.load(str(DATA / "example_ct.nii.gz"))  # RAS, 3 mm isotropic, int16 HU
    return np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0)[None]  # [1, Z, Y, X]


def require_nnunet(module: str) -> None:
    """Skip (marker ``nnunet``) unless nnunetv2's ``module`` imports."""
    try:
        __import__(module)
    except ImportError as exc:  # absent, or present but broken (e.g. its torchvision)
        pytest.skip(f"nnunetv2 is not importable: {exc}")


def _nnunet_resample(x: np.ndarray, spacing: np.ndarray, order: int) -> np.ndarray:
    """How the stored reference was made: nnU-Net v2's export/preprocessing resampler."""
    from nnunetv2.preprocessing.resampling.default_resampling import (
        compute_new_shape as nn_shape,
    )
    from nnunetv2.preprocessing.resampling.default_resampling import (
        resample_data_or_seg_to_shape,
    )

    new_shape = nn_shape(x.shape[1:], spacing[0], spacing[1])
    return resample_data_or_seg_to_shape(
        x, new_shape, spacing[0], spacing[1], is_seg=False, order=order, order_z=0, force_separate_z=None
    )


# ---------------------------------------------------------------- crop


def test_nonzero_bbox_is_half_open_over_all_channels() -> None:
    img = np.zeros((2, 10, 12, 14), dtype=np.float32)
    img[0, 2:5, 3:4, 6:9] = 1.0
    img[1, 7, 10, 1] = -3.0  # only in channel 1: must widen the box
    img[0, 3, 3, 7] = 0.0  # a hole inside does not matter
    assert nonzero_bbox(img) == ((2, 8), (3, 11), (1, 9))
    assert crop_to_bbox(img, nonzero_bbox(img)).shape == (2, 6, 8, 8)


def test_nonzero_bbox_counts_only_exact_zeros() -> None:
    img = np.full((1, 6, 6, 6), -1000.0, dtype=np.float32)  # air is not cropped
    assert nonzero_bbox(img) == ((0, 6), (0, 6), (0, 6))
    img[:, :, :, 4:] = 0.0
    assert nonzero_bbox(img) == ((0, 6), (0, 6), (0, 4))
    assert nonzero_bbox(np.zeros((1, 3, 4, 5))) == ((0, 3), (0, 4), (0, 5))  # blank scan: keep all


# ---------------------------------------------------------------- resample rules


def test_compute_new_shape_rounds_like_nnunet() -> None:
    # the fixture's real CT: (8, 60, 70) at (4, 1.2, 1.2) mm -> (11, 48, 56) at (3, 1.5, 1.5)
    assert compute_new_shape((8, 60, 70), (4.0, 1.2000000476837158, 1.2000000476837158), (3.0, 1.5, 1.5)) == (
        11,
        48,
        56,
    )
    assert compute_new_shape((5, 3, 7), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0)) == (
        2,
        2,
        4,
    )  # 2.5 -> 2, 1.5 -> 2, 3.5 -> 4
    assert compute_new_shape((1, 1, 1), (1.0, 1.0, 1.0), (9.0, 9.0, 9.0)) == (1, 1, 1)


@pytest.mark.parametrize(
    ("current", "new", "force", "axis"),
    [
        ((5.0, 1.0, 1.0), (3.0, 1.5, 1.5), None, 0),  # current spacing anisotropic
        ((1.0, 1.0, 1.0), (4.0, 1.0, 1.0), None, 0),  # only the target is
        ((1.0, 1.1, 3.4), (1.5, 1.5, 1.5), None, 2),  # coarse axis need not be z
        ((3.0, 1.0, 1.0), (3.0, 1.5, 1.5), None, None),  # ratio exactly 3: not > 3
        ((0.24, 1.25, 1.25), (1.0, 1.0, 1.0), None, None),  # two coarse axes: no separate z
        ((3.0, 1.0, 1.0), (3.0, 1.5, 1.5), True, 0),
        ((5.0, 1.0, 1.0), (3.0, 1.5, 1.5), False, None),
    ],
)
def test_separate_z_rule(current, new, force, axis) -> None:
    assert separate_z_axis(current, new, force) == axis


# ---------------------------------------------------------------- resample vs nnU-Net


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_resample_matches_stored_nnunet_output(case: str) -> None:
    ref = np.load(DATA / "resample_nnunet_reference.npz")
    x, expected = ref[f"{case}/input"], ref[f"{case}/output"]
    spacing, order = ref[f"{case}/spacing"], int(ref[f"{case}/order"])
    new_shape = compute_new_shape(x.shape[1:], spacing[0], spacing[1])
    assert new_shape == expected.shape[1:]
    exact = resample_to_shape(torch.from_numpy(x), new_shape, spacing[0], spacing[1], order=order)
    np.testing.assert_allclose(exact.numpy(), expected, rtol=0, atol=1e-9 * np.abs(expected).max())
    fast = resample_to_shape(
        torch.from_numpy(x.astype(np.float32)), new_shape, spacing[0], spacing[1], order=order
    )
    assert fast.dtype == torch.float32
    np.testing.assert_allclose(fast.numpy(), expected, rtol=0, atol=2e-6 * np.abs(expected).max())


def test_resample_keeps_unchanged_shape_and_clips_cubic_overshoot() -> None:
    x = torch.zeros(1, 4, 8, 8)
    x[:, :, :, 4:] = 1.0  # a step edge: the cubic spline overshoots, nnU-Net clips
    assert resample_to_shape(x, (4, 8, 8), (1, 1, 1), (2, 2, 2)) is x
    y = resample_to_shape(x, (4, 19, 19), (1.0, 1.0, 1.0), (1.0, 0.42, 0.42))
    assert float(y.min()) == 0.0 and float(y.max()) == 1.0
    assert 0.0 < float(y[0, 0, 0, 9]) < 1.0  # interpolated, not nearest


@pytest.mark.nnunet
@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_stored_reference_is_what_nnunet_computes(case: str) -> None:
    require_nnunet("nnunetv2.preprocessing.resampling.default_resampling")
    ref = np.load(DATA / "resample_nnunet_reference.npz")
    again = _nnunet_resample(ref[f"{case}/input"], ref[f"{case}/spacing"], int(ref[f"{case}/order"]))
    np.testing.assert_allclose(again, ref[f"{case}/output"], rtol=0, atol=1e-12)


@pytest.mark.nnunet
@pytest.mark.parametrize(
    ("spacing", "target"),
    [((3.0, 3.0, 3.0), (3.0, 1.5, 1.5)), ((5.0, 1.2, 1.2), (3.0, 1.5, 1.5))],  # isotropic; separate z
    ids=["iso", "separate_z"],
)
def test_resample_example_ct_agrees_with_nnunet(spacing, target) -> None:
    """Example CT to UniSeg spacing (cubic) and probabilities back (linear), ours vs nnU-Net.

    Measured: max |diff| 3.7e-4 HU (iso) / 2.4e-4 HU (separate z) on values up to 1207 HU,
    tissue classes and argmax 100 % equal. torch's bicubic instead: 111 HU, 98.6 %.
    """
    require_nnunet("nnunetv2.preprocessing.resampling.default_resampling")
    from scipy.ndimage import gaussian_filter

    ct = load_example_ct()
    new_shape = compute_new_shape(ct.shape[1:], spacing, target)
    expected = _nnunet_resample(ct, np.array([spacing, target]), 3)
    ours = resample_to_shape(torch.from_numpy(ct), new_shape, spacing, target, order=3).numpy()
    assert np.abs(ours - expected).max() <= 1e-6 * np.abs(expected).max()
    agree = (np.digitize(ours, TISSUE_EDGES_HU) == np.digitize(expected, TISSUE_EDGES_HU)).mean()
    assert agree >= 0.999

    # export direction: smooth class probabilities at the target spacing back to the input grid
    classes = np.digitize(expected[0], TISSUE_EDGES_HU)
    logits = np.stack([gaussian_filter((classes == k).astype(np.float64) * 4.0, 1.0) for k in range(5)])
    probs = torch.softmax(torch.from_numpy(logits), 0).numpy().astype(np.float32)
    expected_back = _nnunet_resample(probs, np.array([target, spacing]), 1)
    assert expected_back.shape[1:] == ct.shape[1:]
    ours_back = resample_to_shape(torch.from_numpy(probs), ct.shape[1:], target, spacing, order=1).numpy()
    assert np.abs(ours_back - expected_back).max() < 1e-6
    assert (ours_back.argmax(0) == expected_back.argmax(0)).mean() >= 0.999


# ---------------------------------------------------------------- normalise


@pytest.mark.parametrize("order", [1, 3])
def test_resampling_in_slabs_gives_the_same_numbers(monkeypatch, order) -> None:
    """The taps are gathered in slabs to save memory; the numbers must not change at all."""
    from unisegcli.preprocessing import resample

    data = torch.randn(2, 7, 9, 11, generator=torch.Generator().manual_seed(0))
    whole = resample_to_shape(data, (12, 5, 17), (1.0, 1.0, 1.0), (0.6, 1.8, 0.65), order=order)
    monkeypatch.setattr(resample, "SLAB_ELEMENTS", 50)  # many slabs of a few output rows
    slabs = resample_to_shape(data, (12, 5, 17), (1.0, 1.0, 1.0), (0.6, 1.8, 0.65), order=order)
    torch.testing.assert_close(slabs, whole, rtol=0, atol=0)


def test_restore_leaves_the_scores_untouched() -> None:
    """The running argmax updates its maximum in place; it must never write into the input."""
    scores = torch.rand(3, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    before = scores.clone()
    shape = tuple(scores.shape[1:])
    trace = Trace(original_shape=shape, original_spacing_mm=(1.0, 1.0, 1.0))
    # a resample step that keeps the shape: resampling returns the input itself there
    trace.record(ResampleStep(shape, shape, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), None, 3, 0))
    labels = restore_label_map(scores, trace)
    torch.testing.assert_close(scores, before, rtol=0, atol=0)
    assert np.array_equal(labels, scores.argmax(0).numpy())


def test_normalization_schemes() -> None:
    x = torch.tensor([[[[-1000.0, -325.0, 0.0, 325.0, 2000.0]]]])
    y, _ = normalize(x, [{"scheme": "ct_clip_scale", "clip_hu": [-325, 325]}])
    torch.testing.assert_close(y, torch.tensor([[[[0.0, 0.0, 0.5, 1.0, 1.0]]]]))
    z, stats = normalize(x, [{"scheme": "zscore"}])
    assert abs(float(z.mean())) < 1e-6 and abs(float(z.std(correction=0)) - 1.0) < 1e-5
    assert stats[0]["mean"] == pytest.approx(200.0)
    c, _ = normalize(x, [{"scheme": "ct_clip_zscore", "clip": [-958, 1198], "mean": 97.29, "std": 211.74}])
    torch.testing.assert_close(c, (x.clamp(-958, 1198) - 97.29) / 211.74)
    with pytest.raises(ValueError, match="scheme"):
        normalize(x, [{"scheme": "minmax"}])


def test_preprocess_resamples_before_normalising_like_uniseg() -> None:
    # nnU-Net v1 (UniSeg) normalises after resampling: the z-score is exact on the output
    rng = np.random.default_rng(0)
    img = rng.normal(100, 50, size=(1, 9, 14, 11)).astype(np.float32)
    mr = card(spacing=(1.5, 1.7, 0.9), channels=("t2",), norm={"t2": {"scheme": "zscore"}})
    x, trace = preprocess(img, (1.0, 1.0, 1.0), mr, "cpu")
    assert tuple(x.shape) == (1, 6, 8, 12) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(correction=0)) - 1.0) < 1e-4
    assert [type(s) for s in trace.steps] == [CropStep, ResampleStep, NormalizeStep]
    v2, trace2 = preprocess_volume(
        img, (1.0, 1.0, 1.0), mr.spacing_mm, [{"scheme": "zscore"}], normalize_first=True
    )
    assert [type(s) for s in trace2.steps] == [CropStep, NormalizeStep, ResampleStep]
    assert abs(float(v2.mean())) > 1e-4  # normalised first, then cubic resampling moved the mean


def test_preprocess_sets_nan_to_zero_like_nnunet_v1() -> None:
    img = np.full((1, 6, 6, 6), 100.0, np.float32)
    img[0, 2, 3, 3] = np.nan  # nnU-Net v1 resample_and_normalize: data[np.isnan(data)] = 0
    x, _ = preprocess(img, (2.0, 1.0, 1.0), card(spacing=(2.0, 1.0, 1.0)), "cpu")
    assert bool(torch.isfinite(x).all())
    assert float(x[0, 2, 3, 3]) == pytest.approx(0.5)  # 0 HU in [-325, 325] -> 0.5


def test_preprocess_rejects_wrong_channels_naming_them() -> None:
    pet = card(channels=("ct", "pet"))
    with pytest.raises(ChannelError, match="ct, pet"):
        preprocess(np.zeros((1, 4, 4, 4), np.float32), (1, 1, 1), pet, "cpu")


def test_preprocess_on_cuda_without_gpu_raises_device_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="cuda"):
        preprocess(np.ones((1, 4, 4, 4), np.float32), (1, 1, 1), card(), "cuda")


# ---------------------------------------------------------------- trace round trip


def _object_volume() -> tuple[np.ndarray, np.ndarray]:
    """A CT-like scan with a zero border (to be cropped) and a bright box-shaped "organ"."""
    img = np.zeros((1, 20, 30, 26), dtype=np.float32)
    img[0, 2:19, 4:27, 1:22] = -200.0  # body, off-centre so a wrong crop offset shows
    organ = np.zeros((20, 30, 26), dtype=bool)
    organ[6:14, 9:21, 5:13] = True
    img[0][organ] = 200.0
    return img, organ


def _scores_from_intensity(x: torch.Tensor) -> torch.Tensor:
    """Two-class scores in the network grid: class 1 where the normalised CT is bright."""
    fg = x[0] - 0.5  # ct_clip_scale maps -200 HU -> 0.19, 200 HU -> 0.81
    return torch.stack([-fg, fg])


def test_trace_round_trip_without_resampling_is_voxel_exact() -> None:
    img, organ = _object_volume()
    x, trace = preprocess(img, (2.0, 1.0, 1.0), card(spacing=(2.0, 1.0, 1.0)), "cpu")
    assert trace.crop.bbox == ((2, 19), (4, 27), (1, 22))
    assert tuple(x.shape[1:]) == trace.network_shape == (17, 23, 21)
    labels = restore_label_map(_scores_from_intensity(x), trace)
    assert labels.shape == img.shape[1:] and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels == 1, organ)


def test_trace_round_trip_with_anisotropic_resampling_lands_on_the_same_voxels() -> None:
    img, organ = _object_volume()
    spacing = (5.0, 0.8, 1.1)  # separate z on the way in and out
    x, trace = preprocess(img, spacing, card(spacing=(3.0, 1.5, 1.5)), "cpu")
    assert trace.resample.separate_z_axis == 0
    assert trace.network_shape == (28, 12, 15) == tuple(x.shape[1:])
    labels = restore_label_map(_scores_from_intensity(x), trace)
    assert labels.shape == organ.shape
    got = labels == 1
    dice = 2 * (got & organ).sum() / (got.sum() + organ.sum())
    assert dice > 0.95
    np.testing.assert_allclose(np.argwhere(got).mean(0), np.argwhere(organ).mean(0), atol=0.5)
    outside = np.ones(organ.shape, bool)
    outside[2:19, 4:27, 1:22] = False
    assert not labels[outside].any()

    probs = restore_probabilities(torch.softmax(_scores_from_intensity(x), 0), trace)
    assert probs.shape == (2, *organ.shape)
    assert (probs[0][outside] == 1).all() and (probs[1][outside] == 0).all()
    np.testing.assert_array_equal(probs.argmax(0), labels)
