"""Connected-component cleanup (26-connectivity) gives known results on small synthetic masks."""

from __future__ import annotations

import numpy as np
import pytest

from unisegcli.postprocessing.components import (
    component_sizes,
    count_components,
    largest_component,
    remove_small_components,
)


@pytest.fixture
def two_blobs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 3×3×3 blob (27 voxels) and a separate 2×2×2 blob (8 voxels) in a [Z, Y, X] volume."""
    big = np.zeros((16, 16, 16), dtype=bool)
    big[2:5, 2:5, 2:5] = True
    small = np.zeros_like(big)
    small[10:12, 10:12, 10:12] = True
    return big | small, big, small


def test_counts_and_sizes(two_blobs) -> None:
    mask, _, _ = two_blobs
    assert count_components(mask) == 2
    assert component_sizes(mask).tolist() == [27, 8]


def test_corner_touching_voxels_are_one_component() -> None:
    mask = np.zeros((4, 4, 4), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # only corners touch
    assert count_components(mask) == 1


def test_largest_component_keeps_only_the_big_blob(two_blobs) -> None:
    mask, big, _ = two_blobs
    before = mask.copy()
    out = largest_component(mask)
    assert out.dtype == bool
    np.testing.assert_array_equal(out, big)
    np.testing.assert_array_equal(mask, before)  # input untouched


def test_remove_small_components_by_volume(two_blobs) -> None:
    mask, big, _ = two_blobs
    voxel_ml = 0.001  # 1 mm³
    np.testing.assert_array_equal(remove_small_components(mask, 0.01, voxel_ml), big)  # 8 µl < 10 µl
    # A component of exactly the threshold (27 voxels = 0.027 ml) is kept, despite rounding.
    np.testing.assert_array_equal(remove_small_components(mask, 0.027, voxel_ml), big)
    assert not remove_small_components(mask, 0.0271, voxel_ml).any()
    np.testing.assert_array_equal(remove_small_components(mask, 0.0, voxel_ml), mask)


def test_anisotropic_voxels_count_in_ml(two_blobs) -> None:
    mask, big, _ = two_blobs
    # 3 mm³ voxels: the small blob is 0.024 ml, the big one 0.081 ml.
    np.testing.assert_array_equal(remove_small_components(mask, 0.05, 0.003), big)
    np.testing.assert_array_equal(remove_small_components(mask, 0.024, 0.003), mask)


def test_empty_masks_stay_empty() -> None:
    empty = np.zeros((5, 5, 5), dtype=bool)
    assert count_components(empty) == 0
    assert component_sizes(empty).size == 0
    assert not largest_component(empty).any()
    assert not remove_small_components(empty, 1.0, 0.001).any()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        remove_small_components(np.ones((2, 2, 2), bool), -1.0, 0.001)
    with pytest.raises(ValueError):
        remove_small_components(np.ones((2, 2, 2), bool), 1.0, 0.0)
