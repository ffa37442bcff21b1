"""Where the sliding windows go: padding for small volumes and window start positions.

The default placement follows nnU-Net exactly (v2 nnunetv2/inference/sliding_window_prediction.py
``compute_steps_for_sliding_window`` and ``predict_sliding_window_return_logits`` with
acvl_utils ``pad_nd_image``; v1 ``_compute_steps_for_sliding_window`` is the same), so window
for window our engine sees what nnU-Net's sees. A family whose upstream code tiles otherwise
passes its own ``Placement`` (SAT: ``models.sat.placement``). Sizes are (z, y, x) voxels.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, NamedTuple, Sequence

Slices3 = tuple[slice, slice, slice]


class Placement(NamedTuple):
    """A tiling convention for the engine.

    axis_starts(size, patch, step): window starts along one axis already padded to at least
    the patch. pad_at_end: a volume smaller than the patch is padded at the high end only
    (else split low/high as nnU-Net). visit_order: axes from outermost to innermost loop
    (fixes the float32 summation order of overlapping windows).
    """

    name: str
    axis_starts: Callable[[int, int, float], list[int]]
    pad_at_end: bool = False
    visit_order: tuple[int, int, int] = (0, 1, 2)


def padding_for_patch(image_size: Sequence[int], patch_size: Sequence[int],
                      placement: Placement | None = None) -> list[tuple[int, int]]:
    """(low, high) zero padding per axis that makes the volume at least the patch size.

    acvl_utils ``pad_nd_image``: difference d = patch - size where positive; low side d // 2,
    high side the rest (``placement.pad_at_end``: all of it on the high side). Axes already
    large enough get (0, 0).
    """
    at_end = placement is not None and placement.pad_at_end
    pads = []
    for size, patch in zip(image_size, patch_size):
        d = max(int(patch) - int(size), 0)
        pads.append((0, d) if at_end else (d // 2, d - d // 2))
    return pads


def compute_steps(image_size: Sequence[int], patch_size: Sequence[int], step: float = 0.5) -> list[list[int]]:
    """Window start positions per axis, for a volume at least as large as the patch.

    n = ceil((size - patch) / (patch * step)) + 1 windows per axis, spread evenly from 0 to
    size - patch: start_j = round(j * (size - patch) / (n - 1)) with round half to even
    (numpy's np.round; Python's round is the same). step is the target overlap fraction in
    (0, 1]; 0.5 = half-window steps at most.
    """
    return _steps(image_size, patch_size, step, nnunet_axis_starts)


def nnunet_axis_starts(size: int, patch: int, step: float = 0.5) -> list[int]:
    """``compute_steps`` along one axis (size >= patch)."""
    target = patch * step
    n = int(math.ceil((size - patch) / target)) + 1
    if n == 1:
        return [0]
    actual = (size - patch) / (n - 1)
    return [int(round(actual * j)) for j in range(n)]


NNUNET = Placement("nnunet", nnunet_axis_starts)


def _steps(image_size: Sequence[int], patch_size: Sequence[int], step: float,
           axis_starts: Callable[[int, int, float], list[int]]) -> list[list[int]]:
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    if any(int(s) < int(p) for s, p in zip(image_size, patch_size)):
        raise ValueError(f"image size {tuple(image_size)} is smaller than patch {tuple(patch_size)}; pad first")
    return [axis_starts(int(s), int(p), step) for s, p in zip(image_size, patch_size)]


def window_slices(image_size: Sequence[int], patch_size: Sequence[int], step: float = 0.5,
                  placement: Placement | None = None) -> list[Slices3]:
    """Spatial slices of every window, visited in ``placement.visit_order`` (default nnU-Net's:
    axis 0 outermost) at ``placement.axis_starts`` positions (default ``compute_steps``).

    image_size must already be padded to at least the patch size.
    """
    placement = placement or NNUNET
    steps = _steps(image_size, patch_size, step, placement.axis_starts)
    order = placement.visit_order if len(placement.visit_order) == len(steps) else tuple(range(len(steps)))
    slices = []
    for combo in itertools.product(*(steps[a] for a in order)):
        starts = [0] * len(steps)
        for axis, start in zip(order, combo):
            starts[axis] = start
        slices.append(tuple(slice(s, s + int(p)) for s, p in zip(starts, patch_size)))
    return slices  # type: ignore[return-value]
