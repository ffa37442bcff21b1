"""Crop a scan to the bounding box of its non-zero voxels, as nnU-Net does before resampling.

nnU-Net (v1 ``nnunet/preprocessing/cropping.py`` and v2
``nnunetv2/preprocessing/cropping/cropping.py``, ``create_nonzero_mask`` + ``crop_to_nonzero``)
builds the mask ``any channel != 0``, fills its holes (``scipy.ndimage.binary_fill_holes``) and
crops to the mask's bounding box (half-open: ``max index + 1``; acvl_utils
``get_bbox_from_mask``). Filling holes only adds voxels inside the mask's outline, so it never
moves the box: the box of the raw non-zero mask is the same, and we skip scipy here. Only exact
zeros count as outside (air at -1000 HU is kept).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from unisegcli.preprocessing.trace import Box3

if TYPE_CHECKING:
    import torch


def nonzero_bbox(image_czyx: np.ndarray) -> Box3:
    """Half-open (z, y, x) bounding box of the voxels that are non-zero in any channel.

    image_czyx: [C, Z, Y, X] array (any dtype). NaN counts as non-zero, as ``!= 0`` does in
    nnU-Net. An image with no non-zero voxel gives the full box (nnU-Net would fail on the
    empty mask; keeping the whole image lets the network see the blank scan and answer
    background).
    """
    if image_czyx.ndim != 4:
        raise ValueError(f"expected a [C, Z, Y, X] array, got {image_czyx.ndim} dimensions")
    return mask_bbox(np.any(image_czyx != 0, axis=0))


def mask_bbox(mask: np.ndarray) -> Box3:
    """Half-open (z, y, x) bounding box of a 3-D boolean mask; the full box when it is empty."""
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=other))
        if hits.size == 0:
            return tuple((0, n) for n in mask.shape)  # type: ignore[return-value]
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def crop_to_bbox(image_czyx: "np.ndarray | torch.Tensor", bbox: Box3) -> "np.ndarray | torch.Tensor":
    """The [C, z0:z1, y0:y1, x0:x1] view of a [C, Z, Y, X] array or tensor (no copy)."""
    return image_czyx[(slice(None),) + tuple(slice(lo, hi) for lo, hi in bbox)]


def insert_into_bbox(full: np.ndarray, part: np.ndarray, bbox: Box3) -> np.ndarray:
    """Write ``part`` ([..., z, y, x], the box's shape) into ``full`` at ``bbox``; returns full.

    The inverse of :func:`crop_to_bbox` (acvl_utils ``insert_crop_into_image`` in nnU-Net v2's
    export); everything outside the box keeps ``full``'s values (background).
    """
    full[(Ellipsis,) + tuple(slice(lo, hi) for lo, hi in bbox)] = part
    return full
