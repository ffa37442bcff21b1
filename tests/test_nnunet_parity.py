"""Parity with nnU-Net v2 on the ``nnunetv2_tiny`` fixture (copied to data/nnunetv2_tiny).

The fixture (see data/nnunetv2_tiny/README.md) holds what nnU-Net v2.8.1's ``nnUNetPredictor``
made of two CT inputs with a tiny random-weight PlainConvUNet: preprocessed arrays, float16
sliding-window logits (mirroring off and on) and segmentation files. Each of our stages is
checked on its own and end to end. Tolerances are the fixture README's:

* logits, float16-accumulation mode: |d| <= 0.004 + 0.002 |ref| where the summed Gaussian
  weight w >= 1e-3 (bit-exact on the machine that made the fixture);
* logits, float32 accumulation: |d| <= 0.05 where w >= 1e-3 (nnU-Net's float16 sums are
  coarse on the rim where w < 1e-3);
* segmentations: >= 99.9 % equal voxels.

Tests marked ``nnunet`` run nnunetv2 itself and skip when it is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from unisegcli.inference.engine import sliding_window
from unisegcli.inference.gaussian import gaussian_importance, summed_weight_numpy
from unisegcli.inference.tiling import compute_steps
from unisegcli.postprocessing.restore import restore_label_map
from unisegcli.preprocessing import preprocess_volume

FIXTURE = Path(__file__).parent / "data" / "nnunetv2_tiny"
CASES = ["synth_lps", "realct"]
RECORDS = {"nomirror": False, "mirror": True}


pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- the fixture's network


class ConvNormAct(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel, stride) -> None:
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride, padding=[(k - 1) // 2 for k in kernel])
        self.norm = nn.InstanceNorm3d(c_out, eps=1e-5, affine=True)
        self.nonlin = nn.LeakyReLU(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlin(self.norm(self.conv(x)))


class Stack(nn.Module):
    def __init__(self, n: int, c_in: int, c_out: int, kernel, stride) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *[
                ConvNormAct(c_in if i == 0 else c_out, c_out, kernel, stride if i == 0 else 1)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class PlainConvUNet(nn.Module):
    """dynamic_network_architectures' PlainConvUNet as the fixture README describes it, with
    the same parameter names (minus the aliases), so the stored weights load strictly."""

    def __init__(self, arch: dict, c_in: int, num_classes: int) -> None:
        super().__init__()
        f, n = arch["features_per_stage"], arch["n_stages"]
        k, s = arch["kernel_sizes"], arch["strides"]
        self.encoder = nn.Module()
        self.encoder.stages = nn.Sequential(
            *[
                nn.Sequential(
                    Stack(arch["n_conv_per_stage"][i], c_in if i == 0 else f[i - 1], f[i], k[i], s[i])
                )
                for i in range(n)
            ]
        )
        self.decoder = nn.Module()
        self.decoder.transpconvs = nn.ModuleList(
            nn.ConvTranspose3d(f[-d], f[-d - 1], s[-d], s[-d]) for d in range(1, n)
        )
        self.decoder.stages = nn.ModuleList(
            Stack(arch["n_conv_per_stage_decoder"][d - 1], 2 * f[-d - 1], f[-d - 1], k[-d - 1], 1)
            for d in range(1, n)
        )
        self.decoder.seg_layers = nn.ModuleList(nn.Conv3d(f[-d - 1], num_classes, 1) for d in range(1, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for stage in self.encoder.stages:
            x = stage(x)
            skips.append(x)
        x = skips[-1]
        for i, (up, stage) in enumerate(zip(self.decoder.transpconvs, self.decoder.stages)):
            x = stage(torch.cat((up(x), skips[-(i + 2)]), 1))
        return self.decoder.seg_layers[-1](x)


@pytest.fixture(scope="module")
def plans() -> dict:
    return json.loads((FIXTURE / "plans.json").read_text())


@pytest.fixture(scope="module")
def config(plans) -> dict:
    return plans["configurations"]["3d_fullres"]


@pytest.fixture(scope="module")
def network(config) -> nn.Module:
    net = PlainConvUNet(config["architecture"]["arch_kwargs"], 1, 4)
    net.load_state_dict(torch.load(FIXTURE / "network_weights.pt", weights_only=True), strict=True)
    return net.eval()


def read_reoriented(path: Path) -> tuple[np.ndarray, list[float]]:
    """nnU-Net's NibabelIOWithReorient: RAS by flips/permutations, array (S, A, R), zooms reversed."""
    import nibabel as nib

    img = nib.load(str(path))
    ras = img.as_reoriented(nib.orientations.io_orientation(img.affine))
    return ras.get_fdata().transpose(2, 1, 0).astype(np.float32), [
        float(z) for z in ras.header.get_zooms()[::-1]
    ]


def ct_scheme(plans: dict) -> dict:
    """The plans' CTNormalization as our ct_clip_zscore scheme."""
    p = plans["foreground_intensity_properties_per_channel"]["0"]
    return {
        "scheme": "ct_clip_zscore",
        "clip": [p["percentile_00_5"], p["percentile_99_5"]],
        "mean": p["mean"],
        "std": p["std"],
    }




def require_nnunet(module: str) -> None:
    """Skip (marker ``nnunet``) unless nnunetv2's ``module`` imports."""
    try:
        __import__(module)
    except ImportError as exc:  # absent, or present but broken (e.g. its torchvision)
        pytest.skip(f"nnunetv2 is not importable: {exc}")


# ---------------------------------------------------------------- stage by stage


@pytest.mark.parametrize("case", CASES)
def test_preprocessing_matches_nnunet(case: str, plans: dict, config: dict) -> None:
    image, spacing = read_reoriented(FIXTURE / "inputs" / f"{case}_0000.nii.gz")
    expected = np.load(FIXTURE / "preprocessed" / f"{case}.npy")
    for dtype, atol in ((torch.float64, 1e-6), (None, 1e-5)):
        ours, trace = preprocess_volume(
            image[None],
            spacing,
            config["spacing"],
            [ct_scheme(plans)],
            "cpu",
            normalize_first=True,
            compute_dtype=dtype,
        )
        assert tuple(ours.shape) == expected.shape
        np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=atol)
    assert trace.resample.separate_z_axis == (0 if case == "realct" else None)


@pytest.mark.parametrize("record", list(RECORDS))
@pytest.mark.parametrize("case", CASES)
def test_sliding_window_reproduces_nnunet_logits(
    case: str, record: str, config: dict, network: nn.Module
) -> None:
    x = torch.from_numpy(np.load(FIXTURE / "preprocessed" / f"{case}.npy"))
    ref = np.load(FIXTURE / "logits" / f"{case}_{record}.npy").astype(np.float32)
    patch = config["patch_size"]
    solid = summed_weight_numpy(x.shape[1:], patch) >= 1e-3

    (half,) = sliding_window(x, network, patch, tta=RECORDS[record], accumulation="fp16", batch_size=1)
    d = np.abs(half.numpy() - ref)
    assert (d[:, solid] <= 0.004 + 0.002 * np.abs(ref[:, solid])).all()
    assert (d == 0).mean() >= 0.99  # measured: bit-exact everywhere on the fixture's CPU

    (full,) = sliding_window(x, network, patch, tta=RECORDS[record], batch_size=2)
    d = np.abs(full.numpy() - ref)
    assert d[:, solid].max() <= 0.05  # measured: 0.027 / 0.009 (synth), 0.040 / 0.0074 (realct)
    assert (full.numpy().argmax(0) == ref.argmax(0)).mean() >= 0.999


@pytest.mark.parametrize("record", list(RECORDS))
@pytest.mark.parametrize("case", CASES)
def test_pipeline_segmentation_matches_nnunet_files(
    case: str, record: str, plans: dict, config: dict, network
) -> None:
    image, spacing = read_reoriented(FIXTURE / "inputs" / f"{case}_0000.nii.gz")
    expected, _ = read_reoriented(FIXTURE / f"expected_{record}" / f"{case}.nii.gz")
    x, trace = preprocess_volume(
        image[None], spacing, config["spacing"], [ct_scheme(plans)], "cpu", normalize_first=True
    )
    # nnU-Net v2 blends logits (no per-window softmax) and resamples the logits for export
    (logits,) = sliding_window(x, network, config["patch_size"], tta=RECORDS[record], batch_size=2)
    seg = restore_label_map(logits, trace)
    assert seg.shape == expected.shape and seg.dtype == np.uint8
    assert (seg == expected).mean() >= 0.999  # measured 99.93-99.97 % (15-45 voxels differ)

    # export alone: nnU-Net's own float16 logits through our restore give its file exactly
    ref = torch.from_numpy(np.load(FIXTURE / "logits" / f"{case}_{record}.npy"))
    np.testing.assert_array_equal(restore_label_map(ref, trace), expected)


# ---------------------------------------------------------------- against nnunetv2 itself


class TinyNet(nn.Module):
    """A small translation-variant network (conv, instance norm, conv) for live comparisons."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(
            nn.Conv3d(1, 6, 3, padding=1),
            nn.InstanceNorm3d(6, affine=True),
            nn.LeakyReLU(0.01),
            nn.Conv3d(6, 4, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.nnunet
def test_gaussian_and_steps_match_nnunet() -> None:
    require_nnunet("nnunetv2.inference.sliding_window_prediction")
    from nnunetv2.inference.sliding_window_prediction import (
        compute_gaussian,
        compute_steps_for_sliding_window,
    )

    for patch in [(12, 32, 24), (64, 192, 192), (5, 7, 9)]:
        for dtype in (torch.float16, torch.float32):
            theirs = compute_gaussian(patch, 1.0 / 8, 10, dtype=dtype, device=torch.device("cpu"))
            torch.testing.assert_close(gaussian_importance(patch, dtype=dtype), theirs, rtol=0, atol=0)
    for size, patch, step in [
        ((18, 34, 41), (12, 32, 24), 0.5),
        ((110, 73, 200), (64, 64, 64), 0.5),
        ((40, 41, 97), (17, 16, 32), 0.33),
    ]:
        assert compute_steps(size, patch, step) == compute_steps_for_sliding_window(size, patch, step)


@pytest.mark.nnunet
@pytest.mark.parametrize("mirror", [False, True], ids=["nomirror", "mirror"])
@pytest.mark.parametrize("shape", [(17, 29, 23), (5, 40, 9)], ids=["odd", "smaller_than_patch"])
def test_engine_matches_nnunet_predictor(mirror: bool, shape, plans: dict) -> None:
    require_nnunet("nnunetv2.inference.predict_from_raw_data")
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads(json.dumps(plans))
    patch = [8, 16, 12]
    plans["configurations"]["3d_fullres"]["patch_size"] = patch
    manager = PlansManager(plans)
    dataset = json.loads((FIXTURE / "dataset.json").read_text())
    net = TinyNet().eval()
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=mirror,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        net, manager, manager.get_configuration("3d_fullres"), None, dataset, "nnUNetTrainer", (0, 1, 2)
    )
    x = torch.from_numpy(np.random.default_rng(7).normal(size=(1, *shape)).astype(np.float32))
    theirs = predictor.predict_sliding_window_return_logits(x).float().numpy()

    (half,) = sliding_window(x, net, patch, tta=mirror, accumulation="fp16")
    np.testing.assert_array_equal(half.numpy(), theirs)
    (full,) = sliding_window(x, net, patch, tta=mirror, batch_size=3)
    solid = summed_weight_numpy(shape, patch) >= 1e-3
    assert np.abs(full.numpy() - theirs)[:, solid].max() <= 0.05
