"""Property-based fuzzing (Hypothesis) of what a scan file can claim: NIfTI headers and DICOM tags.

Property: reading a generated file either gives a usable Scan (finite float32 voxels,
positive finite spacing) or raises a ``UnisegError`` (which the CLI turns into one line and a
documented exit code); any other exception is a bug. Reading never allocates much more than
the file holds (the voxel budget is checked from the header before any allocation:
tracemalloc's peak stays small), and never warns (a warning would be a second line on
stderr). A handful of generated files also go through the CLI (CliRunner).

``test_nifti_headers_fast`` / ``test_dicom_tags_fast`` run in the default suite (300
examples each, derandomized); the ``slow``-marked twins run 10,000 random examples each.
"""

from __future__ import annotations

import gzip
import struct
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from unisegcli.errors import ExitCode, UnisegError  # noqa: E402

PEAK_BYTES = 64 * 1024**2  # generated files hold at most ~200 KB of voxels
SECONDS = 60.0  # per file; generous for a loaded 2-core runner, a hang or a bomb takes far longer
FAST = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=10_000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- NIfTI ----------------------------------------------------------------------------------------

WEIRD_FLOATS = st.sampled_from([0.0, -0.0, -1.0, 1e-30, 1e-3, 1e30, 3e38, float("nan"), float("inf"),
                                -float("inf"), 2.5, 1.0])
FLOATS = st.one_of(WEIRD_FLOATS, st.floats(width=32, allow_nan=True, allow_infinity=True))
DATATYPES = st.one_of(st.sampled_from([2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280, 0, 1, 32, 128, 1536, 1792,
                                       2048, 2304]), st.integers(-32768, 32767))
BITPIX = {2: 8, 4: 16, 8: 32, 16: 32, 64: 64, 256: 8, 512: 16, 768: 32, 1024: 64, 1280: 64, 32: 64, 128: 24}
DIM = st.one_of(st.integers(1, 12), st.integers(-3, 0), st.sampled_from([32000, 32767, 4096, 65535 // 2]))


def often(valid: Any, weird: Any, weird_percent: int = 12) -> Any:
    """Mostly ``valid``, sometimes ``weird``: most files get deep into the reader, each field
    still goes wrong on its own often enough (several fields at once now and then)."""
    return st.integers(0, 99).flatmap(lambda roll: weird if roll < weird_percent else valid)


@st.composite
def nifti_files(draw: Any) -> tuple[bytes, bool]:
    """(file bytes, gzip?) of a NIfTI-1 file whose header fields are drawn independently."""
    endian = draw(st.sampled_from("<<<>"))
    ndim = draw(often(st.integers(3, 4), st.integers(-1, 9)))
    dims = [draw(often(st.integers(1, 12), DIM)) for _ in range(7)]
    dtype_code = draw(often(st.sampled_from([2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280]), DATATYPES))
    header = bytearray(348)
    sizeof_hdr = draw(often(st.just(348), st.integers(-(2**31), 2**31 - 1), 4))
    struct.pack_into(endian + "i", header, 0, sizeof_hdr)
    struct.pack_into(endian + "8h", header, 40, ndim, *dims)
    bitpix = BITPIX.get(dtype_code, 8)
    struct.pack_into(endian + "hh", header, 70, dtype_code, draw(often(st.just(bitpix), st.integers(0, 128))))
    spacing = often(st.floats(0.25, 5.0, width=32), FLOATS)
    pixdim = [draw(st.sampled_from([1.0, -1.0, 0.0]))] + [draw(spacing) for _ in range(7)]
    struct.pack_into(endian + "8f", header, 76, *pixdim)
    struct.pack_into(endian + "f", header, 108, draw(often(st.just(352.0), FLOATS, 6)))
    slope_inter = (draw(often(st.sampled_from([0.0, 1.0, 2.0]), FLOATS)), draw(often(st.just(0.0), FLOATS)))
    struct.pack_into(endian + "ff", header, 112, *slope_inter)
    struct.pack_into(endian + "hh", header, 252, draw(often(st.integers(0, 2), st.integers(-1, 5))),
                     draw(often(st.integers(0, 2), st.integers(-1, 5))))
    struct.pack_into(endian + "6f", header, 256, *[draw(often(st.just(0.0), FLOATS)) for _ in range(6)])
    rows = ([pixdim[1], 0, 0, 0], [0, pixdim[2], 0, 0], [0, 0, pixdim[3], 0])
    srow = [draw(often(st.just(float(v)), FLOATS, 5)) for row in rows for v in row]
    struct.pack_into(endian + "12f", header, 280, *srow)  # srow_x/y/z
    header[344:348] = draw(often(st.just(b"n+1\0"), st.sampled_from([b"ni1\0", b"\0\0\0\0", b"n+2\0"]), 4))
    itemsize = max(bitpix // 8, 1)
    claimed = int(np.prod([max(d, 0) for d in dims[: max(min(ndim, 7), 0)]], dtype=object)) * itemsize
    wanted = min(claimed, 96_000)
    length = draw(often(st.just(wanted), st.sampled_from([max(wanted - 7, 0), wanted + 5, 0, wanted + 70_000])))
    data = draw(st.binary(min_size=min(length, 64), max_size=min(length, 64))) * (length // 64 + 1)
    blob = bytes(header) + b"\0" * 4 + data[:length]
    cut = draw(often(st.none(), st.integers(0, 352), 4))
    return (blob[:cut] if cut is not None else blob), draw(st.booleans())


def read_checked(reader, path: Path) -> None:
    """Run a reader as the CLI would; only UnisegError may escape, with a one-line message."""
    started = time.monotonic()
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning would print a second line on stderr
            scan = reader(path)
    except UnisegError as exc:
        assert "\n" not in str(exc), str(exc)
        assert exc.exit_code in (ExitCode.USAGE, ExitCode.INPUT, ExitCode.RUNTIME), exc
    else:
        scan = scan[0] if isinstance(scan, tuple) else scan
        assert scan.data.dtype == np.float32 and np.isfinite(scan.data).all()
        assert all(np.isfinite(s) and s > 0 for s in scan.spacing_mm)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"reading took {peak / 1024**2:.0f} MiB"
    assert time.monotonic() - started < SECONDS, "reading a file of < 200 KB took too long"


def _check_nifti(case: tuple[bytes, bool]) -> None:
    from unisegcli.io.nifti import read_scan

    blob, gz = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("scan.nii.gz" if gz else "scan.nii")
        path.write_bytes(gzip.compress(blob, 1) if gz else blob)
        read_checked(read_scan, path)


@FAST
@given(nifti_files())
def test_nifti_headers_fast(case: tuple[bytes, bool]) -> None:
    _check_nifti(case)


@pytest.mark.slow
@SLOW
@given(nifti_files())
def test_nifti_headers_slow(case: tuple[bytes, bool]) -> None:
    _check_nifti(case)


# -- DICOM ----------------------------------------------------------------------------------------

NUMBER_TEXT = st.one_of(
    st.sampled_from(["0", "-1", "1", "0.7", "1e30", "nan", "inf", "abc", "", "1,5", " 2 "]),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda v: f"{v:.6g}"[:16]),
)
MISSING = None


def multi(count: int) -> Any:
    """A backslash-separated DS value of ``count`` numbers (sometimes a wrong count or absent)."""
    good = st.lists(NUMBER_TEXT, min_size=count, max_size=count)
    return st.one_of(good, st.lists(NUMBER_TEXT, min_size=0, max_size=count + 2), st.just(MISSING))


@st.composite
def dicom_series(draw: Any) -> list[dict[str, Any]]:
    """1..3 slices' tags, mostly valid; each slice may differ from the others."""
    slices = draw(often(st.integers(2, 3), st.just(1), 15))
    base_iop = draw(often(st.sampled_from([["1", "0", "0", "0", "1", "0"], ["0", "1", "0", "0", "0", "-1"],
                                           ["0.8660254", "0.5", "0", "-0.5", "0.8660254", "0"]]), multi(6)))
    rows, columns = draw(often(st.integers(1, 12), st.integers(0, 65535))), draw(often(st.integers(1, 12),
                                                                                       st.just(0)))
    bits = draw(often(st.sampled_from([16, 8]), st.sampled_from([32, 1, 12, 0])))
    out = []
    for k in range(slices):
        out.append({
            "Rows": draw(often(st.just(rows), st.integers(0, 65535), 5)),
            "Columns": columns,
            "PixelSpacing": draw(often(st.just(["0.8", "0.8"]), multi(2), 8)),
            "ImageOrientationPatient": draw(often(st.just(base_iop), multi(6), 5)),
            "ImagePositionPatient": draw(often(st.just(["0", "0", str(2.5 * k)]), multi(3), 8)),
            "SliceThickness": draw(often(st.just("2.5"), st.one_of(NUMBER_TEXT, st.just(MISSING)))),
            "BitsAllocated": bits,
            "PixelRepresentation": draw(often(st.sampled_from([0, 1]), st.just(2), 5)),
            "RescaleSlope": draw(often(st.just("1"), st.one_of(NUMBER_TEXT, st.just(MISSING)), 8)),
            "RescaleIntercept": draw(often(st.just("-1024"), st.one_of(NUMBER_TEXT, st.just(MISSING)), 8)),
            "pixel_bytes": draw(often(st.just(1.0), st.sampled_from([0.5, 0.0, 2.0]), 8)),
        })
    return out


def write_dicom_series(folder: Path, slices: list[dict[str, Any]]) -> None:
    """Write the slices as they are, garbled values included (as LO strings: no validation)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    series, study = generate_uid(), generate_uid()
    for k, tags in enumerate(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.Modality = CTImageStorage, "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Rows, ds.Columns = tags["Rows"], tags["Columns"]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = tags["BitsAllocated"]
        ds.HighBit = max(tags["BitsAllocated"] - 1, 0)
        ds.PixelRepresentation = tags["PixelRepresentation"]
        for keyword, tag in (("PixelSpacing", 0x00280030), ("ImageOrientationPatient", 0x00200037),
                             ("ImagePositionPatient", 0x00200032), ("SliceThickness", 0x00180050),
                             ("RescaleSlope", 0x00281053), ("RescaleIntercept", 0x00281052)):
            value = tags[keyword]
            if value is not None:
                ds.add_new(tag, "LO", "\\".join(value) if isinstance(value, list) else value)
        size = int(tags["Rows"] * tags["Columns"] * max(tags["BitsAllocated"], 8) // 8 * tags["pixel_bytes"])
        ds.PixelData = bytes(np.random.default_rng(k).integers(0, 256, min(size, 200_000), dtype=np.uint8))
        ds.save_as(folder / f"IM{k}.dcm", enforce_file_format=True)


def _check_dicom(slices: list[dict[str, Any]]) -> None:
    from unisegcli.io.dicom import read_dicom

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "series"
        folder.mkdir()
        write_dicom_series(folder, slices)
        read_checked(read_dicom, folder)


@FAST
@given(dicom_series())
def test_dicom_tags_fast(slices: list[dict[str, Any]]) -> None:
    pytest.importorskip("pydicom")
    _check_dicom(slices)


@pytest.mark.slow
@SLOW
@given(dicom_series())
def test_dicom_tags_slow(slices: list[dict[str, Any]]) -> None:
    pytest.importorskip("pydicom")
    _check_dicom(slices)


# -- through the CLI ------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(nifti_files())
def test_cli_maps_generated_files_to_documented_codes(tmp_path: Path, threshold_net, case) -> None:
    from typer.testing import CliRunner

    from unisegcli.cli.app import app

    blob, gz = case
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        path = Path(tmp) / ("scan.nii.gz" if gz else "scan.nii")
        path.write_bytes(gzip.compress(blob, 1) if gz else blob)
        out = Path(tmp) / "out"
        result = CliRunner().invoke(app, [str(path), "--tasks", "liver", "-o", str(out)])
        assert result.exit_code in (ExitCode.OK, ExitCode.INPUT), result.output
        assert "Traceback" not in result.output
        if result.exit_code != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
            assert not out.exists() or list(out.rglob("*")) == []
