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
resamples (and clips) each channel independently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from unisegcli.preprocessing.crop import insert_into_bbox
from unisegcli.preprocessing.resample import resample_to_shape
from unisegcli.preprocessing.trace import CropStep, ResampleStep, Trace

if TYPE_CHECKING:
    import torch

EXPORT_ORDER = 1  # resampling_fn_probabilities_kwargs order (nnU-Net v1 and v2)
EXPORT_ORDER_Z = 0


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
                labels = _argmax_resampled(scores, pending, compute_dtype).cpu().numpy()
            full = np.zeros(step.shape_before, dtype=np.uint8)
            labels = insert_into_bbox(full, labels, step.bbox)
    if labels is None:
        labels = _argmax_resampled(scores, pending, compute_dtype).cpu().numpy()
    return labels


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
