"""SAT's sliding-window conventions against upstream's code (issue 24 items 1-3).

The references here are written from upstream's functions (zhaoziheng/SAT, commit 5676be5a):
``evaluate/inference_engine.py`` ``compute_gaussian`` and ``inference`` (the blending loop),
``data/inference_dataset.py`` ``split_3d``, ``Inference_Dataset._pad_if_necessary`` and
``Inference_Dataset._split_labels``, transcribed as closely as possible and independent of
our implementation (scipy's gaussian_filter instead of our separable kernel; upstream's
(H, W, D) = (x, y, z) layout instead of our (z, y, x)). They are checked against the helper
outputs that upstream's own code produced for tests/data/sat_tiny.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from unisegcli.inference.engine import sliding_window
from unisegcli.inference.gaussian import float16_map_numpy, gaussian_importance
from unisegcli.inference.tiling import compute_steps, window_slices
from unisegcli.models.sat.grouping import query_ranges, split_queries
from unisegcli.models.sat.placement import SAT_PLACEMENT, blending_weights, sat_axis_starts

TINY = Path(__file__).parent / "data" / "sat_tiny"
HELPERS = json.loads((TINY / "manifest.json").read_text())["helpers"]
SAT_WINDOW_HWD = (288, 288, 96)

pytestmark = pytest.mark.usefixtures("single_thread")


# -- upstream, transcribed -------------------------------------------------------------------


def upstream_compute_gaussian(tile_size, sigma_scale=1.0 / 8, value_scaling_factor=10, dtype=np.float16):
    """evaluate/inference_engine.py compute_gaussian, line for line."""
    from scipy.ndimage import gaussian_filter

    tmp = np.zeros(tile_size)
    center_coords = [i // 2 for i in tile_size]
    sigmas = [i * sigma_scale for i in tile_size]
    tmp[tuple(center_coords)] = 1
    gaussian_importance_map = gaussian_filter(tmp, sigmas, 0, mode="constant", cval=0)
    gaussian_importance_map = gaussian_importance_map / np.max(gaussian_importance_map) * value_scaling_factor
    gaussian_importance_map = gaussian_importance_map.astype(dtype)
    gaussian_importance_map[gaussian_importance_map == 0] = np.min(
        gaussian_importance_map[gaussian_importance_map != 0])
    return gaussian_importance_map


def upstream_split_3d(chwd, crop_size=(288, 288, 96)):
    """data/inference_dataset.py split_3d, returning only split_idx."""
    interval_h, interval_w, interval_d = crop_size[0] // 2, crop_size[1] // 2, crop_size[2] // 2
    split_idx = []
    c, h, w, d = chwd
    h_crop = max(math.ceil(h / interval_h) - 1, 1)
    w_crop = max(math.ceil(w / interval_w) - 1, 1)
    d_crop = max(math.ceil(d / interval_d) - 1, 1)
    for i in range(h_crop):
        h_s = i * interval_h
        h_e = h_s + crop_size[0]
        if h_e > h:
            h_s = h - crop_size[0]
            h_e = h
            if h_s < 0:
                h_s = 0
        for j in range(w_crop):
            w_s = j * interval_w
            w_e = w_s + crop_size[1]
            if w_e > w:
                w_s = w - crop_size[1]
                w_e = w
                if w_s < 0:
                    w_s = 0
            for k in range(d_crop):
                d_s = k * interval_d
                d_e = d_s + crop_size[2]
                if d_e > d:
                    d_s = d - crop_size[2]
                    d_e = d
                    if d_s < 0:
                        d_s = 0
                split_idx.append([h_s, h_e, w_s, w_e, d_s, d_e])
    return split_idx


def upstream_split_labels(label_list, max_queries):
    """data/inference_dataset.py Inference_Dataset._split_labels."""
    if len(label_list) < max_queries:
        return [label_list], [[0, len(label_list)]]
    split_idx = []
    split_label = []
    query_num = len(label_list)
    n_crop = (query_num // max_queries + 1) if (query_num % max_queries != 0) else (query_num // max_queries)
    for n in range(n_crop):
        n_s = n * max_queries
        n_f = min((n + 1) * max_queries, query_num)
        split_label.append(label_list[n_s:n_f])
        split_idx.append([n_s, n_f])
    return split_label, split_idx


def upstream_blend(image_hwd: torch.Tensor, model, crop_size) -> torch.Tensor:
    """The whole-volume probabilities of evaluate/inference_engine.py ``inference`` (float32,
    no autocast): split_3d windows padded at the high end (``_pad_if_necessary``), sigmoid,
    the low corner of the float16 Gaussian, sum(w * p) / sum(w). image_hwd: [C, H, W, D]."""
    c, h, w, d = image_hwd.shape
    gaussian = torch.tensor(upstream_compute_gaussian(tuple(crop_size)))
    prediction = accumulation = None
    for y1, y2, x1, x2, z1, z2 in upstream_split_3d((c, h, w, d), crop_size):
        patch = image_hwd[None, :, y1:y2, x1:x2, z1:z2]
        pad = [crop_size[2] - patch.shape[4], crop_size[1] - patch.shape[3], crop_size[0] - patch.shape[2]]
        patch = nn.functional.pad(patch, (0, max(pad[0], 0), 0, max(pad[1], 0), 0, max(pad[2], 0)))
        prediction_patch = torch.sigmoid(model(patch))
        if prediction is None:
            n = prediction_patch.shape[1]
            prediction, accumulation = torch.zeros((n, h, w, d)), torch.zeros((n, h, w, d))
        tmp = prediction_patch[0, :, :y2 - y1, :x2 - x1, :z2 - z1] * gaussian[:y2 - y1, :x2 - x1, :z2 - z1]
        prediction[:, y1:y2, x1:x2, z1:z2] += tmp
        accumulation[:, y1:y2, x1:x2, z1:z2] += gaussian[:y2 - y1, :x2 - x1, :z2 - z1]
    return prediction / accumulation


# -- item 1: the Gaussian -------------------------------------------------------------------


def test_released_window_gaussian_is_upstreams_bit_for_bit() -> None:
    """288 x 288 x 96: one numpy rounding float64 -> float16 as upstream. The map nnU-Net's
    torch cast gives (kept for nnU-Net) differs from it in 1,008 weights: this test would
    catch a return to that cast, which small tiles do not."""
    upstream = upstream_compute_gaussian(SAT_WINDOW_HWD)  # (H, W, D) = (x, y, z)
    record = HELPERS["gaussian_288x288x96"]
    assert hashlib.sha256(np.ascontiguousarray(upstream).tobytes()).hexdigest() == record["sha256_of_C_order_bytes"]
    ours = float16_map_numpy(tuple(reversed(SAT_WINDOW_HWD))).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    assert ours.dtype == np.float16
    assert int((ours != upstream).sum()) == 0
    weights = blending_weights(tuple(reversed(SAT_WINDOW_HWD)))
    assert weights.dtype == torch.float32
    np.testing.assert_array_equal(weights.numpy().transpose(2, 1, 0), upstream.astype(np.float32))
    via_torch = gaussian_importance(tuple(reversed(SAT_WINDOW_HWD)), dtype=torch.float16).numpy().transpose(2, 1, 0)
    assert int((via_torch != upstream).sum()) == 1008  # nnU-Net's double rounding, documented


@pytest.mark.parametrize("shape", [(20, 16, 12), (64, 64, 32), (37, 50, 9)])
def test_small_gaussians_match_upstream(shape) -> None:
    ours = float16_map_numpy(tuple(reversed(shape))).transpose(2, 1, 0)
    np.testing.assert_array_equal(ours, upstream_compute_gaussian(shape))
    if shape == (20, 16, 12):  # upstream's own output
        np.testing.assert_array_equal(ours, np.load(TINY / HELPERS["gaussian_tile"]["file"]))


# -- item 2: window placement ---------------------------------------------------------------


SIZES_HWD = [(512, 512, 120), (500, 300, 97), (288, 288, 96), (289, 433, 191), (100, 700, 40), (1000, 144, 300),
             (630, 431, 47)]


def our_windows_hwd(size_hwd, crop_hwd):
    """Our SAT placement in (z, y, x), reported as upstream's [h1, h2, w1, w2, d1, d2] list in
    the engine's visiting order, cropped to the volume as upstream's windows are."""
    padded = [max(s, c) for s, c in zip(reversed(size_hwd), reversed(crop_hwd))]
    boxes = []
    for sl in window_slices(padded, tuple(reversed(crop_hwd)), 0.5, SAT_PLACEMENT):
        z, y, x = sl
        box = []
        for s, n in ((x, size_hwd[0]), (y, size_hwd[1]), (z, size_hwd[2])):
            box += [s.start, min(s.stop, n)]
        boxes.append(box)
    return boxes


@pytest.mark.parametrize("size", SIZES_HWD)
def test_sat_windows_are_split_3d_in_upstreams_order(size) -> None:
    assert our_windows_hwd(size, SAT_WINDOW_HWD) == upstream_split_3d((1, *size), SAT_WINDOW_HWD)


def test_sat_windows_match_upstreams_recorded_output() -> None:
    cases = json.loads((TINY / HELPERS["split_3d"]["file"]).read_text())
    assert len(cases) >= 3
    for case in cases:
        assert our_windows_hwd(case["chwd"][1:], case["crop_size"]) == case["windows_h1h2_w1w2_d1d2"]


def test_sat_and_nnunet_placements_differ_inside() -> None:
    """What the change is about: same count and ends, other interior starts."""
    assert sat_axis_starts(500, 288) == [0, 144, 212]
    assert compute_steps([500], [288], 0.5) == [[0, 106, 212]]
    assert sat_axis_starts(720, 288) == [0, 144, 288, 432]
    assert compute_steps([720], [288], 0.5) == [[0, 144, 288, 432]]  # multiples of the step agree
    assert sat_axis_starts(900, 288) == [0, 144, 288, 432, 576, 612]
    assert compute_steps([900], [288], 0.5) == [[0, 122, 245, 367, 490, 612]]
    with pytest.raises(ValueError):
        sat_axis_starts(100, 288)


class HwdNet(nn.Module):
    """A fixed convolution written for upstream's (x, y, z) windows; ``zyx`` runs the same
    network on our (z, y, x) windows (both see contiguous tensors)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x_hwd: torch.Tensor) -> torch.Tensor:
        return self.conv(x_hwd) * 3.0 + 0.5

    def zyx(self, x_zyx: torch.Tensor) -> torch.Tensor:
        return self(x_zyx.permute(0, 1, 4, 3, 2).contiguous()).permute(0, 1, 4, 3, 2).contiguous()


@pytest.mark.parametrize("size_hwd", [(50, 37, 23), (33, 70, 12), (16, 16, 8), (10, 41, 30)])
def test_engine_with_sat_placement_equals_upstreams_blending(size_hwd) -> None:
    """Whole-volume probabilities, bit for bit (float32 on the CPU), incl. axes shorter than
    the window; nnU-Net's placement gives other numbers on the same volumes."""
    crop_hwd = (16, 16, 8)
    net = HwdNet().eval()
    image = torch.from_numpy(np.random.default_rng(7).normal(size=(1, *size_hwd)).astype(np.float32))
    with torch.inference_mode():
        expected = upstream_blend(image, net, crop_hwd)
    volume = image.permute(0, 3, 2, 1).contiguous()  # (z, y, x)
    patch = tuple(reversed(crop_hwd))
    (ours,) = sliding_window(volume, net.zyx, patch, activation="sigmoid", gaussian=blending_weights(patch),
                             placement=SAT_PLACEMENT)
    assert torch.equal(ours.permute(0, 3, 2, 1), expected)
    (nnunet,) = sliding_window(volume, net.zyx, patch, activation="sigmoid", gaussian=blending_weights(patch))
    if size_hwd != crop_hwd:
        assert float((nnunet.permute(0, 3, 2, 1) - expected).abs().max()) > 1e-4


# -- item 3: prompt groups ------------------------------------------------------------------


@pytest.mark.parametrize(("n_labels", "max_queries"), [(0, 256), (1, 256), (3, 2), (4, 2), (2, 2), (5, 256),
                                                        (255, 256), (256, 256), (257, 256), (300, 256), (512, 256),
                                                        (513, 256), (7, 1), (10, 3)])
def test_prompt_groups_are_upstreams(n_labels: int, max_queries: int) -> None:
    labels = [f"label {i}" for i in range(n_labels)]
    groups, n1n2 = upstream_split_labels(labels, max_queries)
    assert split_queries(labels, max_queries) == groups
    assert [list(r) for r in query_ranges(n_labels, max_queries)] == n1n2
    embeddings = torch.arange(n_labels * 2, dtype=torch.float32).view(n_labels, 2)
    assert [g.shape[0] for g in split_queries(embeddings, max_queries)] == [len(g) for g in groups]


def test_prompt_groups_match_upstreams_recorded_output() -> None:
    for case in HELPERS["split_labels"]:
        ranges = query_ranges(case["n_labels"], case["max_queries"])
        assert [list(r) for r in ranges] == case["n1n2"]
        assert [b - a for a, b in ranges] == case["group_sizes"]
    with pytest.raises(ValueError):
        query_ranges(3, 0)
