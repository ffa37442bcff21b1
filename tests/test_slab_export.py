"""The many-class export in slabs: the same label maps as class-by-class whole volumes, bit for
bit, with no float buffer larger than one slab (issue 22: TotalSegmentator-size models)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from unisegcli.models.nnunet.folder import Label
from unisegcli.models.nnunet.pipeline import (
    Layout, Prepared, StructureMaps, _export_whole_channels, export_segmentation, structure_mask,
)
from unisegcli.postprocessing import restore
from unisegcli.preprocessing.resample import resample_to_shape
from unisegcli.preprocessing.trace import CropStep, ResampleStep, Trace

pytestmark = pytest.mark.usefixtures("single_thread")

# (network shape, shape before, spacing before, spacing after): isotropic (no separate axis),
# separate z along axis 0, and a separate axis that is not the row axis
GEOMETRIES = {
    "isotropic": ((9, 11, 10), (21, 34, 30), (1.5, 0.8, 0.8), (3.0, 3.0, 3.0)),
    "separate-axis-0": ((7, 12, 13), (17, 25, 27), (4.0, 0.9, 0.9), (5.0, 1.8, 1.8)),
    "separate-axis-2": ((12, 13, 6), (25, 27, 14), (0.9, 0.9, 4.0), (1.8, 1.8, 5.0)),
}


def trace_for(geometry: str, crop: bool = False) -> tuple[Trace, ResampleStep]:
    network, before, spacing_before, spacing_after = GEOMETRIES[geometry]
    full = tuple(s + (3 if crop else 0) for s in before)
    trace = Trace(original_shape=full, original_spacing_mm=spacing_before)  # type: ignore[arg-type]
    box = tuple((1, 1 + s) if crop else (0, s) for s in before)
    trace.record(CropStep(shape_before=full, bbox=box))  # type: ignore[arg-type]
    step = ResampleStep(shape_before=before, shape_after=network, spacing_before_mm=spacing_before,
                        spacing_after_mm=spacing_after, separate_z_axis=None, order=3, order_z=0)
    trace.record(step)
    return trace, step


def logits(classes: int, shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((classes, *shape), generator=g).to(dtype)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_window_of_rows_is_those_rows_of_the_whole_result(geometry: str, order: int, dtype: torch.dtype) -> None:
    network, before, spacing_before, spacing_after = GEOMETRIES[geometry]
    x = logits(2, network, seed=1)
    whole = resample_to_shape(x, before, spacing_after, spacing_before, order=order, order_z=0, compute_dtype=dtype)
    assert not torch.equal(whole[:, :3], whole[:, 3:6])  # a real resampling, not a constant
    for lo, hi in [(0, 1), (0, 5), (4, 9), (before[0] - 2, before[0])]:
        part = resample_to_shape(x, before, spacing_after, spacing_before, order=order, order_z=0,
                                 compute_dtype=dtype, rows=(lo, hi))
        assert torch.equal(part, whole[:, lo:hi]), (lo, hi)


def test_rows_need_a_linear_or_nearest_row_axis() -> None:
    x = logits(1, (6, 8, 8))
    with pytest.raises(ValueError, match="order 0 or 1"):
        resample_to_shape(x, (12, 16, 16), (2, 2, 2), (1, 1, 1), order=3, rows=(0, 4))


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_slab_label_map_equals_the_whole_channel_argmax(geometry: str) -> None:
    trace, step = trace_for(geometry, crop=True)
    scores = logits(40, step.shape_after, seed=2)
    expected = restore._argmax_resampled(scores, [step], None).numpy()
    labels = restore.restore_label_map(scores, trace)
    box = tuple(slice(lo, hi) for lo, hi in trace.crop.bbox)  # type: ignore[union-attr]
    np.testing.assert_array_equal(labels[box], expected)
    assert len(np.unique(expected)) > 20  # many classes really compete
    assert labels.sum() - labels[box].sum() == 0  # background outside the crop box


def test_slabs_bound_the_largest_buffer() -> None:
    _, step = trace_for("isotropic")
    scores = logits(40, step.shape_after, seed=3)
    plane = step.shape_before[1] * step.shape_before[2]
    seen: list[int] = []
    rows_of = restore.rows_resampler(scores, step)
    labels = restore.label_map_in_slabs(40, step.shape_before, rows_of, slab_voxels=3 * plane,
                                        observe=lambda t: seen.append(t.numel()))
    expected = restore._argmax_resampled(scores, [step], None)
    assert torch.equal(labels, expected)
    assert max(seen) <= 3 * plane < int(np.prod(step.shape_before))  # never a whole channel
    assert len(seen) == 40 * len(restore.slab_rows(step.shape_before[0], plane, 3 * plane))


@dataclass
class FakeFolder:
    """What the export reads of a results folder."""

    labels_: tuple[Label, ...]
    is_regions: bool = False
    configuration: dict = field(default_factory=lambda: {
        "resampling_fn_probabilities_kwargs": {"order": 1, "order_z": 0, "force_separate_z": None}})

    def labels(self) -> tuple[Label, ...]:
        return self.labels_


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16-exact"])
@pytest.mark.parametrize("regions", [False, True])
def test_nnunet_export_in_slabs_equals_whole_channels(geometry: str, half: bool, regions: bool) -> None:
    trace, step = trace_for(geometry, crop=True)
    classes = 6 if regions else 40
    scores = logits(classes, step.shape_after, seed=4, dtype=torch.float16 if half else torch.float32)
    folder = FakeFolder(tuple(Label(f"s{i}", i, (i,) if regions else None) for i in range(1, classes + 1)),
                        is_regions=regions)
    prepared = Prepared(torch.zeros(1), trace, Layout(False, (0, 1, 2)))
    seen: list[torch.Tensor] = []
    ours = export_segmentation(scores, prepared, folder, None, slab_voxels=64, observe=seen.append)  # type: ignore[arg-type]
    whole = _export_whole_channels(scores, prepared, folder, [i for i in range(1, classes + 1)] if regions else None)  # type: ignore[arg-type]
    box = tuple(slice(lo, hi) for lo, hi in trace.crop.bbox)  # type: ignore[union-attr]
    np.testing.assert_array_equal(ours[box], whole)
    assert len(np.unique(whole)) > (3 if regions else 20)
    assert max(t.shape[0] for t in seen) == 1  # 64 voxels < one row: a row at a time
    assert {t.dtype for t in seen} == {torch.float16 if half else torch.float32}


def test_structure_maps_are_made_on_access() -> None:
    labels = np.array([[[0, 1, 2, 2]]], dtype=np.uint8)
    maps = StructureMaps()
    maps.add("one", labels, Label("one", 1, None))
    maps.add("both", labels, Label("both", 9, (1, 2)))
    assert list(maps) == ["one", "both"] and len(maps) == 2
    np.testing.assert_array_equal(maps["one"], structure_mask(labels, Label("one", 1, None)))
    np.testing.assert_array_equal(maps["both"], [[[0, 1, 1, 1]]])
    assert maps["one"] is not maps["one"]  # computed each time, never kept
    assert SimpleNamespace(**dict(maps)).one.dtype == np.uint8
