"""Hermes' preprocessing of a scan, and the way back to the scan's grid.

Facts (yhygao/universal-medical-image-segmentation ``dataset_conversion/*_3d.py``, ``utils.py``
``ResampleXYZAxis`` and ``nii2npy.py`` @ f4c84e1/033e16ae):

* orientation: images were resampled to an identity-direction ITK image, i.e. a (z, y, x)
  array whose x and y run towards Left and Posterior. Our internal arrays are RAS (x, y towards
  Right and Anterior), so x and y are flipped (oblique scans: upstream rotates, we take the
  nearest axis-aligned orientation as the rest of uniseg does);
* spacing 1.5 mm in two steps: x and y with a cubic B-spline (z kept), then z with nearest
  neighbour (``xy_bspline_z_nearest``); brain_structure one cubic B-spline step
  (``bspline_3d``); autoPET in-plane only (``xy_bspline_keep_z``). New size per axis
  round(n · spacing / 1.5). ITK's resampler keeps the origin, so output voxel i samples input
  index i · 1.5 / spacing (first voxel centres aligned), and points past the last voxel
  (beyond index n - 0.5) get 0;
* intensities: CT clipped to [-991, 500] HU, MR/PET to the volume's own 2nd/98th
  percentiles; then z-score with the volume's mean and std (whole volume, after clipping);
* axes shorter than 128 voxels (the window) are zero-padded on both sides by ceil((128 - n) / 2).

Back to the scan (upstream evaluates in the resampled space and has no such step; ours):
probabilities are resampled linearly to the scan's voxel centres, then thresholded.

Arrays are (z, y, x); tensors [C, Z, Y, X] float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

TARGET_SPACING_MM = 1.5
MIN_SIZE = 128  # nii2npy.py pads every axis to at least the 128^3 training crop
RESAMPLING_AXES = {  # scheme -> {axis: order}, applied in this order (z = axis 0)
    "xy_bspline_z_nearest": ((2, 3), (1, 3), (0, 0)),
    "bspline_3d": ((2, 3), (1, 3), (0, 3)),
    "xy_bspline_keep_z": ((2, 3), (1, 3)),
}


@dataclass(frozen=True)
class HermesGrid:
    """What preprocessing did, so predictions can be brought back: sizes (z, y, x) of the scan,
    after resampling, and the zero padding (low, high) per axis."""

    scan_shape: tuple[int, int, int]
    scan_spacing_mm: tuple[float, float, float]
    resampled_shape: tuple[int, int, int]
    resampled_spacing_mm: tuple[float, float, float]
    padding: tuple[tuple[int, int], ...]


def target_spacing(spacing_mm: Sequence[float], resampling: str) -> tuple[float, float, float]:
    z, y, x = (float(s) for s in spacing_mm)
    if resampling not in RESAMPLING_AXES:
        raise ValueError(f"unknown Hermes resampling {resampling!r}; expected one of {sorted(RESAMPLING_AXES)}")
    t = TARGET_SPACING_MM
    return (z if resampling == "xy_bspline_keep_z" else t, t, t)


def sample_axis(x: "torch.Tensor", axis: int, coords: np.ndarray, order: int, outside: float | None) -> "torch.Tensor":
    """Sample ``x`` along ``axis`` at continuous voxel ``coords`` (0 = first voxel centre).

    order 3: cubic B-spline (coefficients as scipy/ITK with edge padding), 1: linear, 0: nearest
    (index floor(c + 0.5)). outside: value for coords beyond [-0.5, n - 0.5] (ITK's default
    pixel 0), or None to clamp to the edge.
    """
    import torch

    from unisegcli.preprocessing.resample import _spline_coefficients, apply_taps, taps_at

    n = x.shape[axis]
    moved = x.movedim(axis, 0)
    rest = moved.shape[1:]
    lines = moved.reshape(n, -1)
    c = np.asarray(coords, dtype=np.float64)
    if outside is None:
        c = np.clip(c, 0.0, n - 1.0)
    if order == 3:
        lines = _spline_coefficients(lines)
    idx, w = taps_at(c, n, order)
    index = torch.as_tensor(idx, device=x.device)
    weight = torch.as_tensor(w, dtype=x.dtype, device=x.device)
    out = apply_taps(lines, index, weight)
    if outside is not None:
        beyond = torch.as_tensor((c < -0.5) | (c > n - 0.5), device=x.device)
        out[beyond] = outside
    return out.reshape(len(c), *rest).movedim(0, axis)


def normalize(x: "torch.Tensor", scheme: Mapping[str, Any]) -> "torch.Tensor":
    """Clip (HU window or the volume's percentiles) then z-score over the whole volume."""
    import torch

    from unisegcli.preprocessing.normalize import normalize_channel

    name = scheme.get("scheme")
    x64 = x.to(torch.float64)
    if name == "hermes_ct":
        lo, hi = (float(v) for v in scheme["clip_hu"])
    elif name == "hermes_percentile":
        q = torch.tensor([float(p) / 100.0 for p in scheme["percentiles"]], dtype=torch.float64, device=x.device)
        flat = x64.flatten()
        if flat.numel() > 16_000_000:  # torch.quantile's input limit; np.percentile is the same rule
            lo, hi = (float(v) for v in np.percentile(flat.cpu().numpy(), [float(p) for p in scheme["percentiles"]]))
        else:
            lo, hi = (float(v) for v in torch.quantile(flat, q))  # linear, as np.percentile
    else:
        raise ValueError(f"unknown Hermes normalisation {name!r}; expected hermes_ct or hermes_percentile")
    # z-score over the whole volume in float64 (std + eps guards a constant volume; upstream
    # divides by the plain std)
    zscored, _ = normalize_channel(x64.clamp(lo, hi), {"scheme": "zscore"})
    return zscored.to(torch.float32)


def preprocess(image_zyx: np.ndarray, spacing_mm: Sequence[float], task: Any, device: "torch.device",
               min_size: Sequence[int] = (MIN_SIZE,) * 3) -> tuple["torch.Tensor", HermesGrid]:
    """[1, Z', Y', X'] network input and its grid, for one [Z, Y, X] channel in RAS order.

    min_size: (z, y, x) size each axis is padded up to (the window; 128 for Hermes-R).
    """
    import torch

    resampling = task.extra.get("resampling", "xy_bspline_z_nearest")
    spacing = tuple(float(s) for s in spacing_mm)
    new_spacing = target_spacing(spacing, resampling)
    x = torch.as_tensor(np.ascontiguousarray(image_zyx[:, ::-1, ::-1]), dtype=torch.float32, device=device)[None]
    shape = tuple(int(n) for n in x.shape[1:])
    new_shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))
    for axis, order in RESAMPLING_AXES[resampling]:
        if new_shape[axis] != shape[axis] or spacing[axis] != new_spacing[axis]:
            coords = np.arange(new_shape[axis], dtype=np.float64) * (new_spacing[axis] / spacing[axis])
            x = sample_axis(x, axis + 1, coords, order, outside=0.0)
    x = normalize(x, task.normalization[task.channels[0]])  # [1, Z', Y', X']
    padding = tuple((math.ceil((int(m) - n) / 2),) * 2 if n < int(m) else (0, 0) for n, m in zip(new_shape, min_size))
    if any(lo for lo, _ in padding):
        flat = [p for lo_hi in reversed(padding) for p in lo_hi]
        x = torch.nn.functional.pad(x, flat, mode="constant", value=0.0)
    grid = HermesGrid(shape, spacing, new_shape, new_spacing, padding)  # type: ignore[arg-type]
    return x, grid


def restore(probabilities: "torch.Tensor", grid: HermesGrid) -> "torch.Tensor":
    """[T, Z', Y', X'] probabilities on the padded network grid -> [T, Z, Y, X] on the scan's
    RAS grid (padding cropped, linear resampling to the scan's voxel centres, flips undone)."""
    crop = tuple(slice(lo, lo + n) for (lo, _), n in zip(grid.padding, grid.resampled_shape))
    p = probabilities[(slice(None),) + crop]
    for axis in range(3):
        if grid.resampled_shape[axis] != grid.scan_shape[axis] or grid.scan_spacing_mm[axis] != grid.resampled_spacing_mm[axis]:
            coords = np.arange(grid.scan_shape[axis], dtype=np.float64) * (
                grid.scan_spacing_mm[axis] / grid.resampled_spacing_mm[axis])
            p = sample_axis(p, axis + 1, coords, 1, outside=None)
    return p.flip(2, 3)
