"""Resampling in torch, on any device, that reproduces nnU-Net's scipy/skimage resampling.

nnU-Net (v1 ``nnunet/preprocessing/preprocessing.py`` and v2
``nnunetv2/preprocessing/resampling/default_resampling.py``, ``resample_data_or_seg``) resizes
each channel with ``skimage.transform.resize(order, mode='edge', anti_aliasing=False)``. For
order > 0 that is ``scipy.ndimage.zoom(x, n_new / n_old, order, mode='nearest',
grid_mode=True)`` followed by clipping to the input's [min, max]. We rebuild the same operator:

* output voxel i of an axis samples the input at ``(i + 0.5) * n_old / n_new - 0.5``
  (``grid_mode=True``: voxel edges align, like ``align_corners=False``);
* order 3 is an interpolating cubic B-spline. scipy (``_prepad_for_spline_filter`` in
  scipy/ndimage/_interpolation.py) first pads 12 voxels by edge replication for
  ``mode='nearest'``, then computes B-spline coefficients with mirror boundary conditions
  (``spline_filter``; recursive filter with pole sqrt(3) - 2, ni_splines.c) and evaluates 4
  taps per output voxel. We do the same, one axis at a time (the tensor-product spline is
  separable), so the result equals scipy's up to float rounding;
* order 1 is linear interpolation between the two neighbours, clamped at the edges; order 0
  takes the voxel at ``floor(c + 0.5)`` (scipy map_coordinates, ni_interpolation.c).

Anisotropic data ("separate z", ``determine_do_sep_z_and_axis``): when max/min of the current
spacing exceeds 3 (``ANISO_THRESHOLD``, nnunetv2/configuration.py), or else of the new spacing,
the single coarsest axis is resampled on its own with ``order_z`` (0 = nearest neighbour in
nnU-Net v1 and v2 for images and probabilities) after an in-plane resize of every slice with
``order``; two axes tied for the coarsest spacing mean no separate axis.

Arrays are [C, Z, Y, X] tensors; spacings are (z, y, x) in mm.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING, Sequence

import numpy as np

from unisegcli.preprocessing.trace import Shape3

if TYPE_CHECKING:
    import torch

ANISO_THRESHOLD = 3.0  # nnunetv2/configuration.py ANISO_THRESHOLD (v1: RESAMPLING_SEPARATE_Z_ANISO_THRESHOLD)
SPLINE_PAD = 12  # scipy _prepad_for_spline_filter pads this much for mode='nearest'
_POLE = math.sqrt(3.0) - 2.0  # the cubic B-spline's single pole (scipy ni_splines.c get_filter_poles)
SLAB_ELEMENTS = 16 << 20  # zoom_axis gathers its taps this many elements at a time


def compute_new_shape(
    shape: Sequence[int], spacing_mm: Sequence[float], new_spacing_mm: Sequence[float]
) -> Shape3:
    """(z, y, x) voxels after resampling: ``int(round(spacing / new_spacing * n))`` per axis.

    Same float order and Python round (half to even) as nnU-Net v2 ``compute_new_shape``
    (v1 ``resample_patient`` computes the same with np.round). Never below 1 voxel.
    """
    return tuple(
        max(1, int(round(float(s) / float(t) * int(n)))) for n, s, t in zip(shape, spacing_mm, new_spacing_mm)
    )  # type: ignore[return-value]


def separate_z_axis(
    current_spacing_mm: Sequence[float],
    new_spacing_mm: Sequence[float],
    force_separate_z: bool | None = None,
    threshold: float = ANISO_THRESHOLD,
) -> int | None:
    """The axis to resample on its own (nnU-Net ``determine_do_sep_z_and_axis``), or None.

    The current spacing decides first, then the new one; the axis is the one whose spacing
    equals the maximum. When two or three axes share the maximum there is no separate axis.
    ``force_separate_z`` True/False overrides the rule (True takes the current spacing's axis).
    """

    def lowres_axes(spacing: Sequence[float]) -> list[int]:
        biggest = max(spacing)
        return [i for i, s in enumerate(spacing) if biggest / s == 1]

    def anisotropic(spacing: Sequence[float]) -> bool:
        return max(spacing) / min(spacing) > threshold

    if force_separate_z is not None:
        axes = lowres_axes(current_spacing_mm) if force_separate_z else []
    elif anisotropic(current_spacing_mm):
        axes = lowres_axes(current_spacing_mm)
    elif anisotropic(new_spacing_mm):
        axes = lowres_axes(new_spacing_mm)
    else:
        axes = []
    return axes[0] if len(axes) == 1 else None


@lru_cache(maxsize=64)
def _taps(n_in: int, n_out: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Input indices and weights, [n_out, order + 1], of the 1-D zoom n_in -> n_out.

    For order 3 the indices point into the coefficient array padded by SPLINE_PAD.
    Computed in float64 with the same expressions as scipy so the taps agree bit for bit.
    """
    coords = (np.arange(n_out, dtype=np.float64) + 0.5) * (float(n_in) / float(n_out)) - 0.5
    return taps_at(coords, n_in, order)


def taps_at(coords: np.ndarray, n_in: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Input indices and weights, [len(coords), order + 1], that sample a line of ``n_in``
    voxels at continuous voxel ``coords`` (0 = the first voxel's centre): order 0 nearest
    (index floor(c + 0.5)), 1 linear, 3 cubic B-spline (indices into the coefficients padded
    by SPLINE_PAD). Indices are clipped to the line, so edges repeat (mode 'nearest')."""
    if order == 0:
        idx = np.clip(np.floor(coords + 0.5).astype(np.int64), 0, n_in - 1)[:, None]
        return idx, np.ones_like(idx, dtype=np.float64)
    if order == 1:
        lo = np.floor(coords)
        t = coords - lo
        lo = lo.astype(np.int64)
        idx = np.clip(np.stack([lo, lo + 1], axis=1), 0, n_in - 1)
        return idx, np.stack([1.0 - t, t], axis=1)
    if order == 3:
        coords = coords + SPLINE_PAD
        start = np.floor(coords).astype(np.int64) - 1
        idx = start[:, None] + np.arange(4)[None, :]
        d = np.abs(coords[:, None] - idx)
        w = np.where(d < 1.0, 2.0 / 3.0 - d * d + 0.5 * d**3, np.where(d < 2.0, (2.0 - d) ** 3 / 6.0, 0.0))
        return np.clip(idx, 0, n_in + 2 * SPLINE_PAD - 1), w
    raise ValueError(f"interpolation order must be 0, 1 or 3, got {order}")


@lru_cache(maxsize=64)
def _causal_init_weights(n: int) -> np.ndarray:
    """Weights of the first causal coefficient under mirror boundaries (scipy
    ``_init_causal_mirror``): c[0] = sum_i w[i] s[i], exact for the infinite mirror extension."""
    z = _POLE
    z_n_1 = z ** (n - 1)
    w = np.zeros(n, dtype=np.float64)
    w[0] += 1.0
    w[n - 1] += z_n_1
    powers = z ** np.arange(1, n - 1, dtype=np.float64)
    w[1 : n - 1] += powers
    w[n - 2 : 0 : -1] += powers * z_n_1
    return w / (1.0 - z_n_1 * z_n_1)


def _spline_coefficients(lines: "torch.Tensor") -> "torch.Tensor":
    """Cubic B-spline coefficients of [n, L] signals (axis 0), padded by SPLINE_PAD.

    Edge-replicate SPLINE_PAD samples on both ends (mode='nearest'), then the recursive
    mirror-boundary filter of scipy ``spline_filter1d``: gain 6, a causal and an anti-causal
    pass. Each step works on a whole [L] row, so the loop is over n + 24 rows only.
    """
    import torch

    n = lines.shape[0]
    pad_index = torch.arange(-SPLINE_PAD, n + SPLINE_PAD, device=lines.device).clamp_(0, n - 1)
    c = lines.index_select(0, pad_index)  # a fresh [m, L] copy we may filter in place
    m = c.shape[0]
    z = _POLE
    c.mul_((1.0 - z) * (1.0 - 1.0 / z))
    init = torch.as_tensor(_causal_init_weights(m), dtype=c.dtype, device=c.device)
    c[0] = init @ c
    for i in range(1, m):
        c[i].add_(c[i - 1], alpha=z)
    c[m - 1] = (c[m - 2] * z + c[m - 1]) * (z / (z * z - 1.0))
    for i in range(m - 2, -1, -1):
        c[i].sub_(c[i + 1]).mul_(-z)  # c[i] = z * (c[i + 1] - c[i])
    return c


def zoom_axis(x: "torch.Tensor", axis: int, size: int, order: int,
              taps: "tuple[np.ndarray, np.ndarray] | None" = None) -> "torch.Tensor":
    """Resize one axis of a floating tensor to ``size`` voxels like
    ``scipy.ndimage.zoom(order, mode='nearest', grid_mode=True)`` (no clipping).

    taps: (indices, weights) [n_out, T] to use instead of the zoom's own (a window of its
    rows, indices relative to ``x``; order 0 or 1 only). ``size`` is then ignored.
    """
    import torch

    n = x.shape[axis]
    moved = x.movedim(axis, 0)
    rest = moved.shape[1:]
    lines = moved.reshape(n, -1)
    if order == 3:
        if taps is not None:
            raise ValueError("a window of rows needs interpolation order 0 or 1 along that axis")
        lines = _spline_coefficients(lines)
    idx_np, w_np = taps if taps is not None else _taps(n, size, order)
    idx = torch.as_tensor(idx_np, device=x.device)
    w = torch.as_tensor(w_np, dtype=x.dtype, device=x.device)
    return apply_taps(lines, idx, w).reshape(idx.shape[0], *rest).movedim(0, axis)


def apply_taps(lines: "torch.Tensor", idx: "torch.Tensor", w: "torch.Tensor") -> "torch.Tensor":
    """out[i] = sum over t of w[i, t] * lines[idx[i, t]] for [n, m] ``lines`` and [size, T] taps.

    The first tap is gathered whole (it becomes the output); each further tap is gathered in
    slabs of output rows (~64 MB of float32), so no second output-sized temporary exists: at
    export a full-resolution channel is ~420 MB. A single tap of weight 1 (nearest neighbour)
    is a plain gather.
    """
    out = lines.index_select(0, idx[:, 0])
    if idx.shape[1] > 1 or not bool((w[:, 0] == 1).all()):
        out.mul_(w[:, :1])
    size = idx.shape[0]
    rows = max(1, SLAB_ELEMENTS // max(1, lines.shape[1]))
    for t in range(1, idx.shape[1]):
        for lo in range(0, size, rows):
            hi = min(size, lo + rows)
            out[lo:hi].addcmul_(lines.index_select(0, idx[lo:hi, t]), w[lo:hi, t : t + 1])
    return out


Bounds = tuple["torch.Tensor", "torch.Tensor"]


def clip_bounds(
    data: "torch.Tensor",
    current_spacing_mm: Sequence[float],
    new_spacing_mm: Sequence[float],
    *,
    force_separate_z: bool | None = None,
    compute_dtype: "torch.dtype | None" = None,
) -> Bounds:
    """The (min, max) that ``resample_to_shape`` clips its result of ``data`` to.

    skimage.transform.resize clips its output to the input's range (_clip_warp_output): per
    2-D slice in nnU-Net's separate-z path (min/max over the in-plane axes, kept per slice),
    per channel volume otherwise ([C, 1, 1, 1]). Computed once per channel, they let
    ``resample_to_shape(rows=...)`` resample a window of rows to the same numbers.
    """
    x = data.to(_compute_dtype(data, compute_dtype))
    axis = separate_z_axis(current_spacing_mm, new_spacing_mm, force_separate_z)
    dims = tuple(a + 1 for a in range(3) if a != axis) if axis is not None else (1, 2, 3)
    return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)


def _clip(out: "torch.Tensor", bounds: Bounds) -> "torch.Tensor":
    # ``out`` is always a fresh result of zoom_axis: clamped in place (one volume less)
    return out.clamp_(min=bounds[0], max=bounds[1])


def _compute_dtype(data: "torch.Tensor", compute_dtype: "torch.dtype | None") -> "torch.dtype":
    import torch

    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if data.dtype == torch.float64 else torch.float32


def _row_window(
    data: "torch.Tensor", n_out: int, order: int, rows: tuple[int, int], bounds: Bounds | None, per_row: bool
) -> tuple["torch.Tensor", "tuple[np.ndarray, np.ndarray] | None", Bounds | None]:
    """The input rows (axis 0) that output rows ``rows`` interpolate from, their taps (indices
    relative to the window; None when axis 0 keeps its size) and the bounds of those rows
    (``per_row``: the bounds vary along axis 0, as in a separate-z resampling along it)."""
    lo, hi = rows
    if data.shape[1] == n_out:
        window = (lo, hi)
        taps = None
    else:
        if order > 1:  # a spline's coefficients depend on the whole line
            raise ValueError("a window of rows needs interpolation order 0 or 1 along that axis")
        idx, w = _taps(int(data.shape[1]), n_out, order)
        idx, w = idx[lo:hi], w[lo:hi]
        window = (int(idx.min()), int(idx.max()) + 1)
        taps = (idx - window[0], w)
    if bounds is not None and per_row:
        bounds = (bounds[0][:, window[0]:window[1]], bounds[1][:, window[0]:window[1]])
    return data[:, window[0]:window[1]], taps, bounds


def resample_to_shape(
    data: "torch.Tensor",
    new_shape: Sequence[int],
    current_spacing_mm: Sequence[float],
    new_spacing_mm: Sequence[float],
    *,
    order: int = 3,
    order_z: int = 0,
    force_separate_z: bool | None = None,
    compute_dtype: "torch.dtype | None" = None,
    rows: tuple[int, int] | None = None,
    bounds: Bounds | None = None,
    out_dtype: "torch.dtype | None" = None,
) -> "torch.Tensor":
    """Resample [C, Z, Y, X] ``data`` to spatial ``new_shape`` (z, y, x), on data's device.

    nnU-Net ``resample_data_or_seg_to_shape``: order 3 for images (preprocessing), order 1
    for probabilities/logits (export), ``order_z`` (0: nearest) along a separate anisotropic
    axis chosen by :func:`separate_z_axis` from the two (z, y, x) spacings in mm. An unchanged
    shape returns ``data`` untouched. Computes in ``compute_dtype`` (default float32, float64
    if data is float64; float64 gives scipy's numbers to ~1e-12) and returns ``out_dtype``
    (default data's dtype; float32 for integer input).

    rows: (lo, hi) -- only output rows lo:hi of axis 0 (z), bit for bit the same numbers as
    those rows of the whole result, from only the input rows they need (axis 0 must be
    resampled with order 0 or 1). ``bounds``: ``clip_bounds(data, ...)``, computed once when
    many windows of the same data are resampled (else each call computes them).
    """
    import torch

    new_shape = tuple(int(s) for s in new_shape)
    shape = tuple(data.shape[1:])
    if data.ndim != 4 or len(new_shape) != 3:
        raise ValueError(
            f"expected [C, Z, Y, X] data and a (z, y, x) shape, got {tuple(data.shape)} -> {new_shape}"
        )
    if shape == new_shape:
        return data if rows is None else data[:, rows[0]:rows[1]]
    if out_dtype is None:
        out_dtype = data.dtype if data.is_floating_point() else torch.float32
    compute_dtype = _compute_dtype(data, compute_dtype)
    axis = separate_z_axis(current_spacing_mm, new_spacing_mm, force_separate_z)
    if bounds is None and order > 0:
        bounds = clip_bounds(data, current_spacing_mm, new_spacing_mm, force_separate_z=force_separate_z,
                             compute_dtype=compute_dtype)
    row_taps = None
    if rows is not None:
        data, row_taps, bounds = _row_window(data, new_shape[0], order_z if axis == 0 else order, rows, bounds,
                                             per_row=axis == 0)
    x = data.to(compute_dtype)

    def zoom(y: "torch.Tensor", a: int, a_order: int) -> "torch.Tensor":
        return zoom_axis(y, a + 1, new_shape[a], a_order, row_taps if a == 0 else None)

    if axis is not None:
        inplane = [a for a in range(3) if a != axis]
        y = x
        for a in inplane:
            if shape[a] != new_shape[a]:
                y = zoom(y, a, order)
        if order > 0 and y is not x:
            y = _clip(y, bounds)  # type: ignore[arg-type]
        if shape[axis] != new_shape[axis]:
            # map_coordinates along the coarse axis: no clipping in nnU-Net here
            y = zoom(y, axis, order_z)
    else:
        # most shrinking axis first keeps the intermediate arrays small
        axes = sorted(
            (a for a in range(3) if shape[a] != new_shape[a]), key=lambda a: new_shape[a] / shape[a]
        )
        y = x
        for a in axes:
            y = zoom(y, a, order)
        if order > 0:
            y = _clip(y, bounds)  # type: ignore[arg-type]
    return y.to(out_dtype)
