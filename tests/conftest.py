"""Shared fixtures: small synthetic NIfTI volumes in various geometries, and the CLI runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"


def make_affine(kind: str) -> np.ndarray:
    """Voxel-to-world matrices for the geometries users feed us."""
    if kind == "ras":
        return np.diag([1.0, 1.0, 1.0, 1.0])
    if kind == "lps":  # DICOM-like: x and y flipped
        return np.diag([-1.0, -1.0, 1.0, 1.0])
    if kind == "aniso":  # 3 mm slices, 0.8 mm in-plane, stored slice-first
        aff = np.zeros((4, 4))
        aff[0, 2], aff[1, 1], aff[2, 0], aff[3, 3] = 0.8, -0.8, 3.0, 1.0
        aff[:3, 3] = (-40.0, 25.0, 7.5)
        return aff
    if kind == "oblique":  # 20° about z and 10° about x, anisotropic zooms
        a, b = np.deg2rad(20.0), np.deg2rad(10.0)
        rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        aff = np.eye(4)
        aff[:3, :3] = rz @ rx @ np.diag([0.9, 1.1, 2.5])
        aff[:3, 3] = (12.0, -30.0, 55.0)
        return aff
    raise ValueError(kind)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, qcode: int = 1, scode: int = 2) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    nib.save(img, str(path))
    return path


@pytest.fixture
def labelled_volume() -> np.ndarray:
    """A [x, y, z] = 11×9×7 uint8 volume with a distinct value at almost every voxel."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 6, size=(11, 9, 7), dtype=np.uint8)


@pytest.fixture
def ct_path(tmp_path: Path) -> Path:
    """A small CT-like float volume with an oblique, anisotropic geometry."""
    rng = np.random.default_rng(1)
    data = rng.normal(0, 100, size=(20, 18, 8)).astype(np.float32)
    return save_nifti(tmp_path / "scan.nii.gz", data, make_affine("oblique"))
