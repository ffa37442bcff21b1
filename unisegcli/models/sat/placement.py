"""SAT's sliding-window conventions: where its windows go and how they are weighted.

Upstream (zhaoziheng/SAT ``data/inference_dataset.py`` ``split_3d`` and
``Inference_Dataset._pad_if_necessary``; ``evaluate/inference_engine.py`` ``inference`` and
``compute_gaussian``), per axis of the (H, W, D) = (x, y, z) volume, crop c, step h = c // 2:

* n = max(ceil(size / h) - 1, 1) windows start at i * h; a window that passes the end is
  moved to end at the border (start clamped at 0). Interior starts therefore sit on a fixed
  grid, unlike nnU-Net's even spread (``inference.tiling.compute_steps``): for a 500-voxel
  axis SAT starts at 0, 144, 212 and nnU-Net at 0, 106, 212;
* a window smaller than the crop (a short axis) is zero-padded at its high end, and only its
  unpadded part is blended, with the low corner of the Gaussian;
* windows are visited H outermost, D innermost, and blended as sum(w * sigmoid) / sum(w) in
  float32 with the float16 Gaussian of ``inference.gaussian.float16_map_numpy``.

In our (z, y, x) layout that is ``SAT_PLACEMENT`` (x outermost, padding at the high end) plus
``blending_weights``; with them the engine's whole-volume output equals upstream's loop.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

from unisegcli.inference.tiling import Placement

if TYPE_CHECKING:
    import torch


def sat_axis_starts(size: int, patch: int, step: float = 0.5) -> list[int]:
    """Window starts along one axis already padded to at least ``patch``: a fixed interval
    int(patch * step) (``split_3d``: crop // 2), the last window ending at the border.

    n = ceil((size - patch) / interval) + 1 equals split_3d's max(ceil(size / h) - 1, 1) for
    h = patch / 2 (even patches; SAT's are multiples of 32); other steps keep the rule
    "fixed interval, last window at the border" without visiting a window twice.
    """
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    if size < patch:
        raise ValueError(f"axis of {size} voxels is smaller than the window ({patch}); pad first")
    interval = max(1, int(patch * step))
    n = math.ceil((size - patch) / interval) + 1
    return [min(i * interval, size - patch) for i in range(n)]


# (z, y, x): split_3d loops over H = x outermost, then W = y, then D = z
SAT_PLACEMENT = Placement("sat", sat_axis_starts, pad_at_end=True, visit_order=(2, 1, 0))


PLACEMENTS = {"sat": SAT_PLACEMENT, "nnunet": None}  # None: the engine's default (nnU-Net's)


def placement_named(name: str) -> Placement | None:
    """The placement the family option ``placement`` names: "sat" (default) or "nnunet"."""
    if name not in PLACEMENTS:
        raise ValueError(f"unknown SAT window placement {name!r}; expected one of {', '.join(PLACEMENTS)}")
    return PLACEMENTS[name]


def blending_weights(patch_size: Sequence[int], device: "str | torch.device" = "cpu") -> "torch.Tensor":
    """float32 [Z, Y, X] tensor holding SAT's float16 Gaussian (exact in float32): upstream
    multiplies by the float16 map and accumulates into float32 tensors."""
    import torch

    from unisegcli.inference.gaussian import float16_map_numpy

    g = float16_map_numpy(tuple(int(p) for p in patch_size))
    return torch.from_numpy(g.astype("float32")).to(device)
