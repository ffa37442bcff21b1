"""Gaussian importance map that weights each window's voxels by distance from its centre.

nnU-Net v2 ``compute_gaussian`` (nnunetv2/inference/sliding_window_prediction.py): a delta at
``patch // 2`` (per axis) blurred by ``scipy.ndimage.gaussian_filter(sigma = patch / 8,
mode='constant', cval=0)``, divided by its maximum and multiplied by ``value_scaling_factor``
(10 in the predictor), cast to the accumulation dtype (float16 there), and every exact zero
(underflow) replaced by the smallest non-zero value so that no voxel gets weight 0 (nnU-Net
v1 ``_get_gaussian``: the same with maximum 1 and float32). The scale cancels in the weighted
average; it only matters for float16 rounding, so we keep 10.

Casting to float16: nnU-Net v2 casts the float64 map with torch (``.to(dtype)``), which rounds
float64 -> float32 -> float16, twice; ``gaussian_importance`` does the same, so nnU-Net's
float16 map is reproduced bit for bit. SAT (zhaoziheng/SAT ``evaluate/inference_engine.py``
``compute_gaussian``) casts once with numpy ``astype(np.float16)``; the two roundings differ by
one float16 step where the float64 value lies just past a float16 midpoint (1,008 of the
7,962,624 weights of SAT's 288 x 288 x 96 map), so SAT's map is ``float16_map_numpy``.

gaussian_filter of a delta is separable: the product of three 1-D kernels, each
``exp(-x^2 / (2 sigma^2))`` normalised to sum 1 on ``|x| <= int(4 sigma + 0.5)`` (scipy
``_gaussian_kernel1d``, truncate=4) and zero beyond. We build exactly that in float64 and
need no scipy.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

SIGMA_SCALE = 1.0 / 8.0
VALUE_SCALING = 10.0
TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter default


def _kernel_profile(size: int, sigma_scale: float) -> np.ndarray:
    """The 1-D factor along one axis of the blurred delta, [size] float64."""
    sigma = size * sigma_scale
    radius = int(TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    phi = phi / phi.sum()
    offsets = np.arange(size) - size // 2  # delta at patch // 2, as nnU-Net
    inside = np.abs(offsets) <= radius
    out = np.zeros(size, dtype=np.float64)
    out[inside] = phi[offsets[inside] + radius]
    return out


@lru_cache(maxsize=8)
def gaussian_map_numpy(
    patch_size: tuple[int, ...], sigma_scale: float = SIGMA_SCALE, value_scaling: float = VALUE_SCALING
) -> np.ndarray:
    """float64 importance map of shape ``patch_size`` (z, y, x), maximum ``value_scaling``."""
    g = np.ones((), dtype=np.float64)
    for size in patch_size:
        g = np.multiply.outer(g, _kernel_profile(int(size), sigma_scale))
    g = g / (g.max() / value_scaling)
    g.setflags(write=False)
    return g


@lru_cache(maxsize=4)
def float16_map_numpy(
    patch_size: tuple[int, ...], sigma_scale: float = SIGMA_SCALE, value_scaling: float = VALUE_SCALING
) -> np.ndarray:
    """float16 map of shape ``patch_size`` rounded once from float64 by numpy, zeros replaced by
    the smallest non-zero value: SAT's ``compute_gaussian`` (zhaoziheng/SAT
    ``evaluate/inference_engine.py``: ``astype(np.float16)``, then ``np.min`` of the non-zeros).
    The map is separable, so its (z, y, x) layout is upstream's (H, W, D) map transposed."""
    g = gaussian_map_numpy(tuple(int(s) for s in patch_size), sigma_scale, value_scaling).astype(np.float16)
    zero = g == 0
    if zero.any():
        g[zero] = g[~zero].min()
    g.setflags(write=False)
    return g


_CACHE: dict[tuple, "torch.Tensor"] = {}


def gaussian_importance(
    patch_size: Sequence[int],
    *,
    dtype: "torch.dtype | None" = None,
    device: "str | torch.device" = "cpu",
    sigma_scale: float = SIGMA_SCALE,
    value_scaling: float = VALUE_SCALING,
) -> "torch.Tensor":
    """The [Z, Y, X] importance map for windows of ``patch_size``, cached per patch/dtype/device.

    Zeros left after the cast to ``dtype`` (float32 default) become the smallest non-zero
    value, as nnU-Net does, so sums of weights never vanish. Treat the result as read-only.
    """
    import torch

    dtype = dtype or torch.float32
    key = (tuple(int(s) for s in patch_size), dtype, str(torch.device(device)), sigma_scale, value_scaling)
    cached = _CACHE.get(key)
    if cached is None:
        g = torch.from_numpy(gaussian_map_numpy(key[0], sigma_scale, value_scaling).copy())
        g = g.to(device=device, dtype=dtype)
        zero = g == 0
        if bool(zero.any()):
            g[zero] = g[~zero].min()
        if len(_CACHE) > 8:
            _CACHE.clear()
        _CACHE[key] = cached = g
    return cached


def summed_weight_numpy(shape: Sequence[int], patch_size: Sequence[int], step: float = 0.5) -> np.ndarray:
    """float64 sum of the Gaussian weights of every window covering each voxel of a volume of
    ``shape`` (z, y, x), tiled as the engine tiles it (padding to the patch, then cropped back).
    Small sums (below ~1e-3) mark the rim, where nnU-Net's float16 accumulation is coarse."""
    from unisegcli.inference.tiling import padding_for_patch, window_slices

    pads = padding_for_patch(shape, patch_size)
    padded = [n + lo + hi for n, (lo, hi) in zip(shape, pads)]
    w = np.zeros(padded)
    for sl in window_slices(padded, patch_size, step):
        w[sl] += gaussian_map_numpy(tuple(patch_size))
    return w[tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, shape))]
