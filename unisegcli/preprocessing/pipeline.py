"""The preprocessing entry point: crop, resample, normalise — each step recorded in a Trace.

UniSeg was trained with nnU-Net v1, whose ``GenericPreprocessor.resample_and_normalize``
(UniSeg: ``Upstream/nnunet/preprocessing/DoDNetPreprocessor.py``) crops to the non-zero box,
sets NaN to 0, resamples to the task spacing (order 3, separate-z order 0) and only then
normalises. nnU-Net v2 (``DefaultPreprocessor.run_case_npy``) normalises *before* resampling;
``normalize_first=True`` selects that order for v2 model folders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from unisegcli.errors import ChannelError, ImageShapeError
from unisegcli.preprocessing.crop import crop_to_bbox, nonzero_bbox
from unisegcli.preprocessing.normalize import normalize
from unisegcli.preprocessing.resample import compute_new_shape, resample_to_shape, separate_z_axis
from unisegcli.preprocessing.trace import Box3, CropStep, NormalizeStep, ResampleStep, Trace

if TYPE_CHECKING:
    import torch

    from unisegcli.weights.cards import TaskCard

IMAGE_ORDER = 3  # cubic spline in-plane (nnU-Net resampling_fn_data_kwargs order)
IMAGE_ORDER_Z = 0  # nearest along a separate anisotropic axis (order_z)


def check_channels(image_czyx: np.ndarray, card: "TaskCard") -> None:
    """Raise ChannelError unless the image has exactly the card's channels (in card order)."""
    if image_czyx.ndim != 4:
        raise ImageShapeError(
            f"expected a [C, Z, Y, X] image, got {image_czyx.ndim} dimensions {tuple(image_czyx.shape)}"
        )
    if image_czyx.shape[0] != len(card.channels):
        raise ChannelError(
            f"task '{card.name}' expects {len(card.channels)} channel(s): "
            f"{', '.join(card.channels)} (in this order); got {image_czyx.shape[0]}. "
            "Pass one image per channel in the order listed."
        )


def preprocess(
    image_czyx: np.ndarray,
    spacing_mm: Sequence[float],
    task_card: "TaskCard",
    device: "str | torch.device" = "cpu",
    *,
    bbox: Box3 | None = None,
    compute_dtype: "torch.dtype | None" = None,
) -> tuple["torch.Tensor", Trace]:
    """Prepare one scan for a UniSeg task, the way UniSeg (nnU-Net v1) was trained.

    image_czyx: [C, Z, Y, X] array with the card's channels in card order, intensities in
    scanner units (HU for CT). spacing_mm: (z, y, x). Returns a float32 [C, z, y, x] tensor on
    ``device`` at ``task_card.spacing_mm`` and the Trace that postprocessing undoes.
    """
    check_channels(image_czyx, task_card)
    schemes = [task_card.normalization[ch] for ch in task_card.channels]
    tensor, trace = preprocess_volume(
        image_czyx,
        spacing_mm,
        task_card.spacing_mm,
        schemes,
        device,
        normalize_first=False,
        bbox=bbox,
        compute_dtype=compute_dtype,
        channel_names=task_card.channels,
    )
    return tensor, trace


def preprocess_volume(
    image_czyx: np.ndarray,
    spacing_mm: Sequence[float],
    target_spacing_mm: Sequence[float],
    schemes: Sequence[Mapping[str, Any]],
    device: "str | torch.device" = "cpu",
    *,
    normalize_first: bool = False,
    bbox: Box3 | None = None,
    compute_dtype: "torch.dtype | None" = None,
    channel_names: Sequence[str] | None = None,
) -> tuple["torch.Tensor", Trace]:
    """Crop to the non-zero box, resample to ``target_spacing_mm`` and normalise.

    image_czyx: [C, Z, Y, X]; spacings (z, y, x) in mm; ``schemes[c]`` normalises channel c
    (see ``normalize.py``). ``normalize_first`` = nnU-Net v2 order, else v1 (UniSeg) order.
    ``bbox`` skips the box search when the caller already has it. Returns float32
    [C, z, y, x] on ``device`` and the Trace (crop, resample, normalise).
    """
    import torch

    from unisegcli.inference.engine import resolve_device

    device = resolve_device(device)
    if image_czyx.ndim != 4 or min(image_czyx.shape) < 1:
        raise ImageShapeError(f"expected a non-empty [C, Z, Y, X] image, got shape {tuple(image_czyx.shape)}")
    spacing = tuple(float(s) for s in spacing_mm)
    target = tuple(float(s) for s in target_spacing_mm)
    if len(spacing) != 3 or len(target) != 3 or min(spacing + target) <= 0:
        raise ValueError(f"spacings must be 3 positive (z, y, x) numbers in mm, got {spacing} -> {target}")
    names = tuple(channel_names) if channel_names is not None else tuple(str(c) for c in range(len(schemes)))

    trace = Trace(original_shape=tuple(image_czyx.shape[1:]), original_spacing_mm=spacing)  # type: ignore[arg-type]
    if bbox is None:
        bbox = nonzero_bbox(image_czyx)
    trace.record(CropStep(shape_before=trace.original_shape, bbox=bbox))
    cropped = np.asarray(crop_to_bbox(image_czyx, bbox), dtype=np.float32)
    # nnU-Net v1 resample_and_normalize: "remove nans" (data[np.isnan(data)] = 0)
    cropped = np.nan_to_num(cropped, nan=0.0, posinf=0.0, neginf=0.0)
    x = torch.from_numpy(np.ascontiguousarray(cropped)).to(device)

    def normalise(t: "torch.Tensor") -> "torch.Tensor":
        t, stats = normalize(t, schemes)
        trace.record(NormalizeStep(schemes=dict(zip(names, schemes)), statistics=dict(zip(names, stats))))
        return t

    if normalize_first:
        x = normalise(x)
    shape_before = tuple(x.shape[1:])
    new_shape = compute_new_shape(shape_before, spacing, target)
    x = resample_to_shape(
        x, new_shape, spacing, target, order=IMAGE_ORDER, order_z=IMAGE_ORDER_Z, compute_dtype=compute_dtype
    )
    trace.record(
        ResampleStep(
            shape_before=shape_before,  # type: ignore[arg-type]
            shape_after=new_shape,
            spacing_before_mm=spacing,  # type: ignore[arg-type]
            spacing_after_mm=target,  # type: ignore[arg-type]
            separate_z_axis=separate_z_axis(spacing, target),
            order=IMAGE_ORDER,
            order_z=IMAGE_ORDER_Z,
        )
    )
    if not normalize_first:
        x = normalise(x)
    return x.contiguous(), trace
