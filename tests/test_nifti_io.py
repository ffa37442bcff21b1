"""NIfTI reading, internal orientation and writing keep geometry exactly."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import assert_same_geometry, make_affine, save_nifti
from unisegcli.errors import (
    ImageFormatError,
    ImageShapeError,
    ImageValueError,
    InputNotFoundError,
    OutputError,
)
from unisegcli.io.nifti import read_scan, write_labels


@pytest.mark.parametrize("kind", ["ras", "lps", "oblique", "aniso"])
@pytest.mark.parametrize("codes", [(1, 1), (2, 0), (0, 2)])
def test_round_trip_keeps_data_and_geometry(tmp_path: Path, labelled_volume: np.ndarray, kind: str, codes) -> None:
    src = save_nifti(tmp_path / "in.nii.gz", labelled_volume, make_affine(kind), *codes)
    scan = read_scan(src)
    internal = scan.data[0].astype(np.uint8)
    out = write_labels(internal, scan, tmp_path / "out.nii.gz")
    a, b = nib.load(str(src)), nib.load(str(out))
    assert b.shape == a.shape
    np.testing.assert_array_equal(np.asarray(b.dataobj), labelled_volume)
    assert_same_geometry(b, a)


def test_internal_orientation_is_ras_zyx(tmp_path: Path) -> None:
    """An object placed in the file lands where its world coordinates say, in (z, y, x) order."""
    data = np.zeros((8, 6, 4), dtype=np.float32)
    data[1, 2, 3] = 1.0
    affine = make_affine("aniso")
    scan = read_scan(save_nifti(tmp_path / "a.nii.gz", data, affine))
    (z, y, x), = np.argwhere(scan.data[0] > 0)
    world_from_file = affine @ np.array([1, 2, 3, 1.0])
    world_from_internal = scan.reorientation.internal_affine @ np.array([z, y, x, 1.0])
    np.testing.assert_allclose(world_from_internal, world_from_file)
    # Internal axes are increasing S, A, R: spacing follows the axes, z is the 3 mm one.
    assert scan.spacing_mm == pytest.approx((3.0, 0.8, 0.8))
    assert nib.aff2axcodes(scan.reorientation.internal_affine[:, [2, 1, 0, 3]]) == ("R", "A", "S")


def test_the_image_keeps_no_second_copy_of_the_voxels(tmp_path: Path) -> None:
    """The Scan keeps its nibabel image for the header; the voxels must not be cached there
    too (an LPS file would otherwise be held twice: the cache and the reoriented array)."""
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    scan = read_scan(save_nifti(tmp_path / "lps.nii.gz", data, np.diag([-1.0, -1.0, 2.0, 1.0])))
    assert not scan.image.in_memory
    assert scan.data[0].sum() == data.sum()


def test_4d_channels_become_first_axis(tmp_path: Path) -> None:
    data = np.stack([np.full((5, 4, 3), c, np.float32) for c in range(4)], axis=-1)
    scan = read_scan(save_nifti(tmp_path / "b.nii.gz", data, make_affine("lps")))
    assert scan.data.shape == (4, 3, 4, 5)
    assert [float(scan.data[c].mean()) for c in range(4)] == [0.0, 1.0, 2.0, 3.0]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="does not exist"):
        read_scan(tmp_path / "nope.nii.gz")


def test_not_nifti(tmp_path: Path) -> None:
    p = tmp_path / "x.nii.gz"
    p.write_text("hello, I am a text file")
    with pytest.raises(ImageFormatError, match="not a NIfTI"):
        read_scan(p)


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "x.nii"
    p.write_bytes(b"")
    with pytest.raises(ImageFormatError, match="empty file"):
        read_scan(p)


def test_truncated_gz(tmp_path: Path, ct_path: Path) -> None:
    raw = gzip.decompress(ct_path.read_bytes())
    p = tmp_path / "t.nii.gz"
    p.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    with pytest.raises(ImageFormatError, match="truncated or corrupt|cannot read"):
        read_scan(p)


@pytest.mark.parametrize(
    ("shape", "message"),
    [((10, 10), "2D image"), ((4, 4, 4, 2, 2), "5D image"), ((4, 0, 4), "empty axis")],
)
def test_bad_dimensions(tmp_path: Path, shape, message: str) -> None:
    p = save_nifti(tmp_path / "d.nii.gz", np.zeros(shape, np.float32), np.eye(4))
    with pytest.raises(ImageShapeError, match=message):
        read_scan(p)


def test_nan_voxels(tmp_path: Path) -> None:
    data = np.zeros((4, 4, 4), np.float32)
    data[0, 0, 0] = np.nan
    data[1, 0, 0] = np.inf
    with pytest.raises(ImageValueError, match="2 NaN/Inf voxels"):
        read_scan(save_nifti(tmp_path / "n.nii.gz", data, np.eye(4)))


def test_singular_affine(tmp_path: Path) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((4, 4, 4))
    header.set_sform(np.eye(4), code=2)
    header["srow_z"] = [0.0, 0.0, 0.0, 0.0]  # the sform has a zero row: not invertible
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), None, header=header)
    p = tmp_path / "s.nii.gz"
    nib.save(img, str(p))
    with pytest.raises(ImageValueError, match="non-invertible"):
        read_scan(p)


def test_output_dir_is_a_file(tmp_path: Path, ct_path: Path) -> None:
    scan = read_scan(ct_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        write_labels(np.zeros(scan.data.shape[1:], np.uint8), scan, blocker / "m.nii.gz")


def test_failed_write_leaves_no_partial_file(tmp_path: Path, ct_path: Path, monkeypatch) -> None:
    """Disk full while writing: no file under the final name, no temp file left behind."""
    scan = read_scan(ct_path)
    out = tmp_path / "out"
    out.mkdir()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", disk_full)
    with pytest.raises(OutputError, match="No space left"):
        write_labels(np.zeros(scan.data.shape[1:], np.uint8), scan, out / "m.nii.gz")
    assert list(out.iterdir()) == []


def test_written_files_get_normal_permissions(tmp_path: Path, ct_path: Path) -> None:
    """Staged temp files are 0600; the final files must honour the umask like open() does."""
    import os

    scan = read_scan(ct_path)
    old = os.umask(0o022)
    try:
        out = write_labels(np.zeros(scan.data.shape[1:], np.uint8), scan, tmp_path / "m.nii.gz")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644
