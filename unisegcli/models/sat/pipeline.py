"""SAT's preprocessing and the way back to the scan's grid.

Upstream (SAT ``data/inference_dataset.py``, ``evaluate/inference_engine.py``): orient to RAS,
resample to 1 x 1 x 3 mm (x, y, z) with linear interpolation, crop to the bounding box of the
voxels > 0 of the raw intensities, then normalise the cropped volume: CT clipped to
[-500, 1000] HU, any other modality clipped to its 0.5th / 99.5th percentiles, then
``(x - mean) / std``. Our scans are already RAS in (z, y, x) order, so the target spacing is
(3, 1, 1) mm in (z, y, x).

Upstream writes its masks in that processed space with an identity affine. We record the
resampled shape and the crop box instead and bring each structure's *probabilities* back:
paste into the resampled grid (0 outside the crop), resample linearly to the scan's grid, and
threshold at 0.5 there, so masks overlay the input exactly (the writers then undo the RAS
reorientation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from unisegcli.preprocessing.crop import mask_bbox
from unisegcli.preprocessing.resample import compute_new_shape, resample_to_shape
from unisegcli.preprocessing.trace import Box3, Shape3

if TYPE_CHECKING:
    import torch

SPACING_MM = (3.0, 1.0, 1.0)  # (z, y, x): SAT's Spacingd(pixdim=(1, 1, 3)) on RAS (x, y, z)
CT_CLIP_HU = (-500.0, 1000.0)
PERCENTILES = (0.5, 99.5)
THRESHOLD = 0.5
CT_GUESS_HU = -300.0  # a 1st percentile below this means air in HU: a CT


@dataclass
class Prepared:
    """The network-ready volume and what is needed to map results back."""

    volume: np.ndarray  # float32 [1, z, y, x], resampled, cropped, normalised
    resampled_shape: Shape3
    bbox: Box3  # crop box in the resampled grid, half-open (z, y, x)
    scan_shape: Shape3
    scan_spacing_mm: tuple[float, float, float]


def guess_modality(image: np.ndarray) -> str:
    """"ct" when the scan holds air-like values in HU, else "mri" (PET cannot be told apart)."""
    flat = image.reshape(-1)
    sample = flat[:: max(1, flat.size // 1_000_000)]
    return "ct" if float(np.percentile(sample, 1.0)) < CT_GUESS_HU else "mri"


def foreground_bbox(image_czyx: np.ndarray) -> Box3:
    """Half-open box of the voxels > 0 (any channel); the whole volume when there are none."""
    return mask_bbox(np.any(image_czyx > 0, axis=0))


def normalize(volume: np.ndarray, modality: str) -> np.ndarray:
    """SAT's normalisation of the whole (cropped) volume, float32 numpy as upstream."""
    x = volume.astype(np.float32, copy=False)
    if modality == "ct":
        x = np.clip(x, *CT_CLIP_HU)
    else:
        lo, hi = np.percentile(x, PERCENTILES)
        x = np.clip(x, lo, hi)
    std = x.std()
    return ((x - x.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def prepare(image: np.ndarray, spacing_mm: tuple[float, float, float], modality: str) -> Prepared:
    """image: float32 [1, Z, Y, X] in RAS (z, y, x) with ``spacing_mm``; see the module docstring."""
    import torch

    shape = tuple(int(s) for s in image.shape[1:])
    new_shape = compute_new_shape(shape, spacing_mm, SPACING_MM)
    resampled = resample_to_shape(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), new_shape,
                                  spacing_mm, SPACING_MM, order=1, order_z=1, force_separate_z=False).numpy()
    bbox = foreground_bbox(resampled)
    cropped = resampled[(slice(None),) + tuple(slice(lo, hi) for lo, hi in bbox)]
    return Prepared(normalize(cropped, modality), new_shape, bbox, shape, tuple(spacing_mm))  # type: ignore[arg-type]


def restore_mask(probability: "torch.Tensor", prep: Prepared) -> np.ndarray:
    """uint8 [Z, Y, X] 0/1 mask in the scan's grid from one structure's probabilities
    [z, y, x] on the crop box of the resampled grid."""
    import torch

    full = torch.zeros(prep.resampled_shape, dtype=torch.float32, device=probability.device)
    full[tuple(slice(lo, hi) for lo, hi in prep.bbox)] = probability.float()
    back = resample_to_shape(full[None], prep.scan_shape, SPACING_MM, prep.scan_spacing_mm,
                             order=1, order_z=1, force_separate_z=False)[0]
    return (back > THRESHOLD).to(torch.uint8).cpu().numpy()
