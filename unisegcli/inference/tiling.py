"""Where the sliding windows go: padding for small volumes and window start positions.

Both follow nnU-Net exactly (v2 nnunetv2/inference/sliding_window_prediction.py
``compute_steps_for_sliding_window`` and ``predict_sliding_window_return_logits`` with
acvl_utils ``pad_nd_image``; v1 ``_compute_steps_for_sliding_window`` is the same), so window
for window our engine sees what nnU-Net's sees. Sizes are (z, y, x) voxels.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

Slices3 = tuple[slice, slice, slice]


def padding_for_patch(image_size: Sequence[int], patch_size: Sequence[int]) -> list[tuple[int, int]]:
    """(low, high) zero padding per axis that makes the volume at least the patch size.

    acvl_utils ``pad_nd_image``: difference d = patch - size where positive; low side d // 2,
    high side the rest. Axes already large enough get (0, 0).
    """
    pads = []
    for size, patch in zip(image_size, patch_size):
        d = max(int(patch) - int(size), 0)
        pads.append((d // 2, d - d // 2))
    return pads


def compute_steps(image_size: Sequence[int], patch_size: Sequence[int], step: float = 0.5) -> list[list[int]]:
    """Window start positions per axis, for a volume at least as large as the patch.

    n = ceil((size - patch) / (patch * step)) + 1 windows per axis, spread evenly from 0 to
    size - patch: start_j = round(j * (size - patch) / (n - 1)) with round half to even
    (numpy's np.round; Python's round is the same). step is the target overlap fraction in
    (0, 1]; 0.5 = half-window steps at most.
    """
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    steps = []
    for size, patch in zip(image_size, patch_size):
        if size < patch:
            raise ValueError(
                f"image size {tuple(image_size)} is smaller than patch {tuple(patch_size)}; pad first"
            )
        target = patch * step
        n = int(math.ceil((size - patch) / target)) + 1
        if n > 1:
            actual = (size - patch) / (n - 1)
            steps.append([int(round(actual * j)) for j in range(n)])
        else:
            steps.append([0])
    return steps


def window_slices(image_size: Sequence[int], patch_size: Sequence[int], step: float = 0.5) -> list[Slices3]:
    """Spatial slices of every window, axis 0 outermost (nnU-Net's visiting order).

    image_size must already be padded to at least the patch size.
    """
    steps = compute_steps(image_size, patch_size, step)
    return [
        tuple(slice(s, s + p) for s, p in zip(starts, patch_size))  # type: ignore[misc]
        for starts in itertools.product(*steps)
    ]
