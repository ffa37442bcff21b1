"""Connected components of binary masks: counting, keeping the largest, removing small ones.

All functions take a bool (or 0/1) mask of any 3D layout — in the pipeline [Z, Y, X]
internal order — and return a new bool mask of the same shape; the input is never changed.
Connectivity is 26 (faces, edges and corners), the usual choice for organ masks: two voxels
touching only at a corner are one structure, so a thin oblique vessel is not cut into
pieces. cc3d is imported lazily (it is a core dependency, but unused by `uniseg --help`).
"""

from __future__ import annotations

import numpy as np

CONNECTIVITY = 26


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 26-connected components of ``mask``.

    Returns (labels, n): labels has the mask's shape, 0 for background and 1..n for the
    components (in cc3d's scan order, not by size); n = 0 for an empty mask.
    """
    import cc3d

    binary = np.ascontiguousarray(mask, dtype=bool)
    labels, count = cc3d.connected_components(binary, connectivity=CONNECTIVITY, return_N=True)
    return labels, int(count)


def component_sizes(mask: np.ndarray) -> np.ndarray:
    """Voxel counts of the 26-connected components, largest first (int64 [n]; empty for n = 0)."""
    labels, count = label_components(mask)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return np.sort(sizes.astype(np.int64))[::-1]


def count_components(mask: np.ndarray) -> int:
    """Number of 26-connected components (0 for an empty mask)."""
    return label_components(mask)[1]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep only the largest 26-connected component (ties: the one cc3d labels first).

    Returns a bool mask of the same shape; an empty mask stays empty.
    """
    labels, count = label_components(mask)
    if count <= 1:
        return np.asarray(mask, dtype=bool).copy()
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0  # background never wins
    return labels == int(np.argmax(sizes))


def remove_small_components(mask: np.ndarray, min_ml: float, voxel_ml: float) -> np.ndarray:
    """Drop every 26-connected component whose volume is below ``min_ml`` millilitres.

    voxel_ml: the volume of one voxel in ml (|det(affine[:3, :3])| / 1000). A component of
    exactly ``min_ml`` is kept. ``min_ml <= 0`` returns a copy unchanged.
    """
    if min_ml < 0 or not np.isfinite(min_ml):
        raise ValueError(f"min_ml must be a finite number >= 0, got {min_ml}")
    if voxel_ml <= 0 or not np.isfinite(voxel_ml):
        raise ValueError(f"voxel_ml must be a finite positive number, got {voxel_ml}")
    if min_ml == 0:
        return np.asarray(mask, dtype=bool).copy()
    labels, count = label_components(mask)
    if count == 0:
        return np.zeros(np.shape(mask), dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    # A relative tolerance so that a component of exactly min_ml (e.g. 1000 voxels of
    # 0.001 ml vs 1.0 ml) is not dropped by floating-point rounding.
    keep = sizes * voxel_ml >= min_ml * (1.0 - 1e-9)
    keep[0] = False
    return keep[labels]
