"""Undo preprocessing: bring network-grid predictions back to the input's voxel grid.

Walks a :class:`~unisegcli.preprocessing.trace.Trace` backwards, as nnU-Net's export does
(v2 ``convert_predicted_logits_to_segmentation_with_correct_shape`` in
nnunetv2/inference/export_prediction.py; v1 ``save_segmentation_nifti_from_softmax``):

1. resample the class scores (probabilities or logits, [K, z, y, x]) from the network spacing
   back to the cropped input shape with linear interpolation (``order=1``) and nearest
   neighbour along a separate anisotropic axis (``order_z=0``);
2. argmax over classes (first index wins ties, as ``torch.argmax``/``np.argmax``);
3. paste the label map into a zero (background) volume of the input's shape at the crop box.

The scores are resampled one class at a time with a running argmax, so the full-resolution
[K, Z, Y, X] array never exists; per-class resampling gives the same numbers because nnU-Net
resamples (and clips) each channel independently. With one resampling step (every family's
trace) the output is made in slabs of rows along z (``label_map_in_slabs``): each slab of
every class is resampled and compared while it is still in the CPU's cache, and no float
array larger than one slab is allocated (``resample_to_shape(rows=...)`` gives those rows
bit for bit as the whole volume would). A 118-class export to 512 x 512 x 300 voxels then
needs its uint8 label map plus a few MB instead of three full float32 volumes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from unisegcli.preprocessing.crop import insert_into_bbox
from unisegcli.preprocessing.resample import clip_bounds, resample_to_shape
from unisegcli.preprocessing.trace import CropStep, ResampleStep, Trace

if TYPE_CHECKING:
    import torch

EXPORT_ORDER = 1  # resampling_fn_probabilities_kwargs order (nnU-Net v1 and v2)
EXPORT_ORDER_Z = 0
SLAB_VOXELS = 1 << 20  # output voxels per slab on the CPU: 4 MB float32 per class, cache-sized
DEVICE_SLAB_VOXELS = 1 << 25  # on a GPU: few large kernels rather than many small launches

RowsOf = Callable[[int, int, int], "torch.Tensor"]
"""rows_of(k, lo, hi): class k's resampled scores for output rows lo:hi, [hi - lo, Y, X]."""


def undo_resample(
    scores: "torch.Tensor",
    step: ResampleStep,
    *,
    order: int = EXPORT_ORDER,
    order_z: int = EXPORT_ORDER_Z,
    compute_dtype: "torch.dtype | None" = None,
) -> "torch.Tensor":
    """Resample [K, z, y, x] scores from ``step.shape_after`` back to ``step.shape_before``.

    As nnU-Net v2's export: current spacing = the network spacing, new spacing = the input's;
    the separate-z rule looks at the current spacing first (nnU-Net v1 looks at the original
    spacing first; the two differ only when both spacings are anisotropic along different
    axes, which no UniSeg task spacing is).
    """
    return resample_to_shape(
        scores,
        step.shape_before,
        step.spacing_after_mm,
        step.spacing_before_mm,
        order=order,
        order_z=order_z,
        compute_dtype=compute_dtype,
    )


def _argmax_resampled(
    scores: "torch.Tensor", steps: Sequence[ResampleStep], compute_dtype: "torch.dtype | None"
) -> "torch.Tensor":
    import torch

    best_value: torch.Tensor | None = None
    best_label: torch.Tensor | None = None
    for k in range(scores.shape[0]):
        channel = scores[k : k + 1]
        for step in steps:
            channel = undo_resample(channel, step, compute_dtype=compute_dtype)
        channel = channel[0]
        if best_value is None:
            shared = channel.untyped_storage().data_ptr() == scores.untyped_storage().data_ptr()
            best_value = channel.clone() if shared else channel  # updated in place below
            best_label = torch.zeros(channel.shape, dtype=torch.uint8, device=channel.device)
        else:
            better = channel > best_value  # strict: the lower label keeps ties, like argmax
            best_label.masked_fill_(better, k)  # type: ignore[union-attr]
            torch.maximum(best_value, channel, out=best_value)
            del better, channel
    assert best_label is not None
    return best_label


def slab_rows(depth: int, plane_voxels: int, slab_voxels: int = SLAB_VOXELS) -> list[tuple[int, int]]:
    """(lo, hi) row ranges along z that cover ``depth`` rows with about ``slab_voxels`` each
    (at least one row)."""
    step = max(1, slab_voxels // max(1, plane_voxels))
    return [(lo, min(depth, lo + step)) for lo in range(0, depth, step)]


def label_map_in_slabs(
    classes: int,
    shape_zyx: Sequence[int],
    rows_of: RowsOf,
    *,
    device: "torch.device | str" = "cpu",
    region_values: Sequence[int] | None = None,
    slab_voxels: int | None = None,
    observe: Callable[["torch.Tensor"], None] | None = None,
) -> "torch.Tensor":
    """uint8 [Z, Y, X] label map built slab by slab from ``rows_of`` (see ``RowsOf``).

    Labels: a running argmax over the classes (strict ``>``: the lower class keeps ties, as
    ``argmax``). ``region_values``: sigmoid regions instead -- class k paints
    ``region_values[k]`` where its score is > 0, in order (nnU-Net ``regions_class_order``).
    ``observe`` sees every slab ``rows_of`` returns (tests check the largest buffer with it).
    ``slab_voxels``: default SLAB_VOXELS on the CPU, DEVICE_SLAB_VOXELS elsewhere.
    """
    import torch

    if slab_voxels is None:
        slab_voxels = SLAB_VOXELS if torch.device(device).type == "cpu" else DEVICE_SLAB_VOXELS
    depth, height, width = (int(s) for s in shape_zyx)
    labels = torch.zeros((depth, height, width), dtype=torch.uint8, device=device)
    for lo, hi in slab_rows(depth, height * width, slab_voxels):
        seg = labels[lo:hi]
        best: torch.Tensor | None = None
        for k in range(classes):
            scores = rows_of(k, lo, hi)
            if observe is not None:
                observe(scores)
            if region_values is not None:
                seg[scores > 0] = region_values[k]
            elif best is None:
                best = scores.clone()  # may be a view of the caller's scores; updated in place
            else:
                better = scores > best
                seg.masked_fill_(better, k)
                torch.maximum(best, scores, out=best)
    return labels


def rows_resampler(scores: "torch.Tensor", step: ResampleStep, *, order: int = EXPORT_ORDER,
                   order_z: int = EXPORT_ORDER_Z, force_separate_z: bool | None = None,
                   compute_dtype: "torch.dtype | None" = None,
                   out_dtype: "torch.dtype | None" = None) -> RowsOf:
    """``RowsOf`` for [K, z, y, x] ``scores`` resampled back by ``step`` (``undo_resample``
    for a window of rows; each class's clip bounds are computed once, on first use)."""
    bounds: dict[int, tuple["torch.Tensor", "torch.Tensor"]] = {}
    spacing = (step.spacing_after_mm, step.spacing_before_mm)

    def rows_of(k: int, lo: int, hi: int) -> "torch.Tensor":
        channel = scores[k : k + 1]
        if k not in bounds:
            bounds[k] = clip_bounds(channel, *spacing, force_separate_z=force_separate_z,
                                    compute_dtype=compute_dtype)
        return resample_to_shape(channel, step.shape_before, *spacing, order=order, order_z=order_z,
                                 force_separate_z=force_separate_z, compute_dtype=compute_dtype,
                                 rows=(lo, hi), bounds=bounds[k], out_dtype=out_dtype)[0]

    return rows_of


def restore_label_map(
    scores: "torch.Tensor", trace: Trace, *, compute_dtype: "torch.dtype | None" = None
) -> np.ndarray:
    """Label map in the input grid from class scores in the network grid.

    scores: [K, z, y, x] probabilities or logits (K <= 255) on any device, shaped like
    ``trace.network_shape``. Returns uint8 [Z, Y, X] with ``trace.original_shape``; voxels
    outside the crop box are 0 (background).
    """
    if scores.ndim != 4 or tuple(scores.shape[1:]) != tuple(trace.network_shape):
        raise ValueError(f"scores {tuple(scores.shape)} do not match the trace's grid {trace.network_shape}")
    if scores.shape[0] > 255:
        raise ValueError(f"{scores.shape[0]} classes do not fit a uint8 label map")
    pending: list[ResampleStep] = []
    labels: np.ndarray | None = None
    for step in reversed(trace.steps):
        if isinstance(step, ResampleStep):
            if labels is not None:
                raise ValueError("the trace resamples before cropping; cannot undo it on a label map")
            pending.append(step)
        elif isinstance(step, CropStep):
            if labels is None:
                labels = _label_map(scores, pending, compute_dtype)
            full = np.zeros(step.shape_before, dtype=np.uint8)
            labels = insert_into_bbox(full, labels, step.bbox)
    if labels is None:
        labels = _label_map(scores, pending, compute_dtype)
    return labels


def _label_map(scores: "torch.Tensor", steps: Sequence[ResampleStep],
               compute_dtype: "torch.dtype | None") -> np.ndarray:
    if len(steps) != 1:  # none, or several in a row (no family records that): class by class
        return _argmax_resampled(scores, steps, compute_dtype).cpu().numpy()
    rows_of = rows_resampler(scores, steps[0], compute_dtype=compute_dtype)
    return label_map_in_slabs(scores.shape[0], steps[0].shape_before, rows_of,
                              device=scores.device).cpu().numpy()


def restore_probabilities(
    probabilities: "torch.Tensor", trace: Trace, *, compute_dtype: "torch.dtype | None" = None
) -> np.ndarray:
    """Probabilities [K, Z, Y, X] float32 in the input grid (for saving soft outputs).

    Resampled back linearly; outside the crop box the background has probability 1 and
    every other class 0 (nnU-Net ``revert_cropping_on_probabilities``).
    """
    x = probabilities
    result: np.ndarray | None = None
    for step in reversed(trace.steps):
        if isinstance(step, ResampleStep):
            if result is not None:
                raise ValueError("the trace resamples before cropping; cannot undo it here")
            x = undo_resample(x, step, compute_dtype=compute_dtype)
        elif isinstance(step, CropStep):
            part = x.float().cpu().numpy() if result is None else result
            full = np.zeros((part.shape[0], *step.shape_before), dtype=np.float32)
            full[0] = 1.0
            result = insert_into_bbox(full, part, step.bbox)
    return result if result is not None else x.float().cpu().numpy()
