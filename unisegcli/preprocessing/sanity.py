"""Warnings (not errors) for scans that are legal but suspicious for the task they are given to.

A warning never stops a run; it tells the user why masks may come out empty or wrong:
- a constant channel (all zeros, a failed export);
- a CT channel whose intensities do not look like Hounsfield units (no air or fat below
  -200 HU, or values far above bone): often an MR given to a CT task, or a CT exported
  without its rescale slope/intercept;
- an MR/PET channel with many voxels below -500: looks like a CT in HU given to an MR task;
- a scan whose physical extent is under half of the network's field of view on every axis.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from unisegcli.weights.cards import TaskCard

AIR_FAT_HU = -200.0  # a CT in HU has air (-1000) or fat (-100 .. -50) somewhere below this
MAX_PLAUSIBLE_HU = 4000.0  # dense metal reaches ~3000 HU; beyond this the data is not in HU
FOV_FRACTION = 0.5


def _sample(channel: np.ndarray, limit: int = 2_000_000) -> np.ndarray:
    """A strided subsample: percentiles of a 500-million-voxel CT stay cheap."""
    flat = channel.reshape(-1)
    return flat[:: max(1, flat.size // limit)]


def input_warnings(
    image_czyx: np.ndarray,
    spacing_mm: Sequence[float],
    task: TaskCard,
    patch_size: Sequence[int] | None = None,
) -> list[str]:
    """Human-readable warnings for one task's input [C, Z, Y, X] (channels in the card's order)."""
    warnings: list[str] = []
    for name, channel in zip(task.channels, image_czyx):
        values = _sample(channel)
        low, high = (float(v) for v in np.percentile(values, [1, 99.9]))
        if float(values.min()) == float(values.max()):
            warnings.append(
                f"channel '{name}' for task '{task.name}' is constant ({float(values.min()):g} everywhere): "
                "the scan holds no image, so every mask will be empty."
            )
            continue
        scheme = task.normalization[name]["scheme"]
        if scheme == "ct_clip_scale" and (low > AIR_FAT_HU or high > MAX_PLAUSIBLE_HU):
            warnings.append(
                f"channel '{name}' for task '{task.name}' does not look like a CT in Hounsfield units "
                f"(1st-99.9th percentile {low:.0f} to {high:.0f}; expected air/fat below {AIR_FAT_HU:.0f}); "
                "is it an MR, or a CT exported without rescale slope/intercept? Masks may be empty or wrong."
            )
        elif scheme == "zscore" and task.modality != "CT" and float(np.mean(values < -500)) > 0.05:
            warnings.append(
                f"channel '{name}' for {task.modality} task '{task.name}' has many values below -500, "
                "like a CT in Hounsfield units; expected an MR/PET image."
            )
    if patch_size is not None:
        extent_mm = np.array(image_czyx.shape[1:]) * np.asarray(spacing_mm, dtype=float)
        fov_mm = np.array(patch_size) * np.asarray(task.spacing_mm, dtype=float)
        if np.all(extent_mm < FOV_FRACTION * fov_mm):
            warnings.append(
                f"the scan covers {' x '.join(f'{e:.0f}' for e in extent_mm)} mm (z, y, x), far less "
                f"than the {' x '.join(f'{f:.0f}' for f in fov_mm)} mm the network sees at once for task "
                f"'{task.name}'; check that the spacing in the header is right."
            )
    return warnings
