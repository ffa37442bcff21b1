"""Hostile inputs (issue 21, reliability round 2): files and options crafted or damaged so that
they used to hang, exhaust memory, or end as "internal error". Each ends in one line on
stderr with its documented exit code (docs/errors.md) and leaves nothing in OUT.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import phantom_ct
from test_bad_inputs import AFFINE, assert_no_partial_files, assert_one_line, ct, scan_args
from unisegcli.cli.app import app
from unisegcli.errors import ExitCode, InputError

runner = CliRunner()


def run(args: list[str], out: Path):
    return runner.invoke(app, [*args, "-o", str(out)])


def plain_bytes(shape=(20, 20, 8), dtype=np.int16) -> bytearray:
    """An uncompressed NIfTI-1 file's bytes (header at 0, voxels from byte 352)."""
    image = nib.Nifti1Image(np.zeros(shape, dtype), AFFINE)
    image.header["vox_offset"] = 352
    return bytearray(image.header.binaryblock + b"\0" * 4 + np.zeros(shape, dtype).tobytes(order="F"))


def patched(tmp: Path, name: str, edits: dict[int, bytes], gz: bool = False, tail: bytes = b"") -> Path:
    blob = plain_bytes()
    for offset, value in edits.items():
        blob[offset : offset + len(value)] = value
    data = bytes(blob) + tail
    (tmp / name).write_bytes(gzip.compress(data, 6) if gz else data)
    return tmp / name


def cut_header(tmp: Path) -> Path:
    (tmp / "cut.nii.gz").write_bytes(gzip.compress(bytes(plain_bytes())[:200]))
    return tmp / "cut.nii.gz"


# -- NIfTI headers ------------------------------------------------------------------------------

HEADER_CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    ("32000 cubed in a 1 KB file",
     lambda t: patched(t, "huge.nii", {42: struct.pack("<3h", 32000, 32000, 32000)}), "UNISEG_MAX_VOXELS"),
    ("negative dim", lambda t: patched(t, "neg.nii", {42: struct.pack("<h", -20)}), "negative size"),
    ("vox_offset past the end", lambda t: patched(t, "off.nii", {108: struct.pack("<f", 1e9)}), "truncated"),
    ("vox_offset past the end, gz", lambda t: patched(t, "off.nii.gz", {108: struct.pack("<f", 1e9)}, gz=True),
     "truncated"),
    ("vox_offset inside the header", lambda t: patched(t, "in.nii", {108: struct.pack("<f", 12.0)}), "vox_offset"),
    ("RGB24", lambda t: patched(t, "rgb.nii.gz", {70: struct.pack("<hh", 128, 24)}, gz=True), "RGB24"),
    ("complex64", lambda t: patched(t, "cx.nii.gz", {70: struct.pack("<hh", 32, 64)}, gz=True), "complex64"),
    ("bad magic", lambda t: patched(t, "magic.nii", {344: b"zz1\0"}), "magic"),
    ("dim[0] = 9", lambda t: patched(t, "d9.nii", {40: struct.pack("<h", 9)}), "dimensions"),
    ("header cut short", lambda t: cut_header(t), "header"),
    ("decompresses past its header (gzip bomb)",
     lambda t: patched(t, "long.nii.gz", {}, gz=True, tail=b"\0" * 4_000_000), "more data than its header"),
    ("voxel size 0, qform and sform codes 0",
     lambda t: patched(t, "zero.nii.gz", {80: struct.pack("<3f", 0, 0, 0), 252: struct.pack("<hh", 0, 0)},
                       gz=True), "voxel spacing"),
    ("voxel size 1e-30", lambda t: patched(t, "tiny.nii", {80: struct.pack("<f", 1e-30)}), "voxel spacing"),
]


@pytest.mark.parametrize(("name", "build", "fragment"), HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_hostile_header(tmp_path: Path, threshold_net, name: str, build, fragment: str) -> None:
    result = run(scan_args(build(tmp_path)), tmp_path / "out")
    assert_one_line(result, ExitCode.INPUT, fragment)
    assert "Warning" not in result.stderr
    assert_no_partial_files(tmp_path / "out")


def test_complex_data_is_refused_without_a_numpy_warning(tmp_path: Path, threshold_net) -> None:
    data = (phantom_ct((20, 20, 8)) + 1j).astype(np.complex64)
    path = tmp_path / "c.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    result = run(scan_args(path), tmp_path / "out")
    assert_one_line(result, ExitCode.INPUT, "complex64")
    assert "ComplexWarning" not in result.output


def test_voxel_budget_refuses_before_decompressing(tmp_path: Path, threshold_net, monkeypatch) -> None:
    """UNISEG_MAX_VOXELS is checked from the header: not one voxel is decompressed."""
    import unisegcli.io.nifti_header as nh

    monkeypatch.setenv("UNISEG_MAX_VOXELS", "1000")
    monkeypatch.setattr(nh, "read_gz_voxels", lambda *a: pytest.fail("decompressed voxels"))
    result = run(scan_args(ct(tmp_path)), tmp_path / "out")
    assert_one_line(result, ExitCode.INPUT, "expected at most 1,000 (UNISEG_MAX_VOXELS)")


def test_a_gzip_bomb_is_not_decompressed_past_its_header(tmp_path: Path, monkeypatch) -> None:
    import unisegcli.io.nifti_header as nh
    from unisegcli.io.nifti import read_scan

    path = patched(tmp_path, "bomb.nii.gz", {}, gz=True, tail=b"\0" * 64_000_000)
    read_bytes = []
    real_open = gzip.open

    class Counting(gzip.GzipFile):
        def read(self, size=-1):
            chunk = super().read(size)
            read_bytes.append(len(chunk))
            return chunk

    monkeypatch.setattr(nh.gzip, "open", lambda p, mode="rb": Counting(p, mode) if mode == "rb" else real_open(p, mode))
    with pytest.raises(InputError, match="more data than its header"):
        read_scan(path)
    assert sum(read_bytes) < 2 * nh.GZIP_CHUNK_BYTES  # 64 MB of trailing zeros never decompressed


def test_out_of_memory_while_reading_is_exit_5(tmp_path: Path, threshold_net, monkeypatch) -> None:
    import unisegcli.io.nifti as nifti

    def no_memory(*args):
        raise MemoryError

    monkeypatch.setattr(nifti, "read_gz_voxels", no_memory)
    result = run(scan_args(ct(tmp_path)), tmp_path / "out")
    assert_one_line(result, ExitCode.RUNTIME, "not enough memory to read")
    assert "UNISEG_MAX_VOXELS" in result.stderr


@pytest.mark.slow
def test_real_gzip_bomb_under_a_memory_cap(tmp_path: Path) -> None:
    """A 2 MB .nii.gz expanding to 1024^3 int16 under a 3 GiB address-space cap: one line,
    exit 3 (budget lowered) or 5 (default budget: out of memory), never "internal error"."""
    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 1024))
    header.set_data_dtype(np.int16)
    header.set_zooms((1.0, 1.0, 1.0))
    header["vox_offset"] = 352
    bomb = tmp_path / "bomb.nii.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as fh:
        fh.write(header.binaryblock + b"\0" * 4)
        zeros = b"\0" * 2**24
        for _ in range(2**31 // len(zeros)):
            fh.write(zeros)
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))\n"
        "from unisegcli.errors import UnisegError\n"
        "from unisegcli.io.nifti import read_scan\n"
        "try:\n"
        f"    read_scan({str(bomb)!r})\n"
        "except UnisegError as exc:\n"
        "    print(int(exc.exit_code), exc)\n"
    )
    repo = str(Path(__file__).resolve().parent.parent)
    for budget, expected in ((None, 5), ("100000000", 3)):
        env = {**os.environ, "PYTHONPATH": repo}
        env.pop("UNISEG_MAX_VOXELS", None)
        if budget:
            env["UNISEG_MAX_VOXELS"] = budget
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        assert done.stdout.startswith(f"{expected} "), done.stdout


# -- what the input is --------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_fifo_input_is_refused_before_opening(tmp_path: Path, threshold_net) -> None:
    from unisegcli.io.nifti import load_nifti

    fifo = tmp_path / "scan.nii.gz"
    os.mkfifo(fifo)
    result = run(scan_args(fifo), tmp_path / "out")  # would block forever in open()
    assert_one_line(result, ExitCode.INPUT, "named pipe (FIFO)")
    with pytest.raises(InputError, match="named pipe"):
        load_nifti(fifo)


def test_csv_list_with_a_byte_order_mark(tmp_path: Path, threshold_net) -> None:
    ct(tmp_path, "scan.nii.gz")
    listing = tmp_path / "list.csv"
    listing.write_text("case_id,path\npatient7,scan.nii.gz\n", encoding="utf-8-sig")  # Excel "CSV UTF-8"
    result = runner.invoke(app, ["--input-list", str(listing), "--tasks", "liver", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "liver.nii.gz").exists()  # one case: its masks go straight into OUT
    assert "patient7" in (tmp_path / "out" / "statistics.csv").read_text()


def test_option_like_file_name_gets_the_double_dash_hint(tmp_path: Path, threshold_net, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    ct(tmp_path, "-dash.nii.gz")
    for token in ("-dash.nii.gz", "-xscan.nii.gz"):
        result = runner.invoke(app, ["-o", "out", "--tasks", "liver", token])
        assert_one_line(result, ExitCode.USAGE, f"must follow `--`: uniseg -o OUT --tasks T -- {token}")
    result = runner.invoke(app, ["-o", "out", "--tasks", "liver", "--", "-dash.nii.gz"])
    assert result.exit_code == 0, result.output


# -- DICOM ---------------------------------------------------------------------------------------


@pytest.fixture
def dicom_series(tmp_path: Path, monkeypatch):
    """Build a series from a small CT, then edit every file's header (or raw bytes)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom import config

    from test_dicom import write_series

    monkeypatch.setattr(config.settings, "writing_validation_mode", config.IGNORE)
    nifti = ct(tmp_path, "src.nii.gz", phantom_ct((20, 20, 6)).astype(np.int16))

    def make(edit: Callable | None = None, keep: int | None = None, raw: tuple[bytes, bytes] | None = None) -> Path:
        folder = tmp_path / "series"
        write_series(folder, nifti)
        for i, file in enumerate(sorted(folder.glob("*.dcm"))):
            if keep is not None and i >= keep:
                file.unlink()
                continue
            if edit is not None:
                ds = pydicom.dcmread(file)
                edit(ds)
                ds.save_as(file)
            if raw is not None:
                file.write_bytes(file.read_bytes().replace(*raw))
        return folder

    return make


def _set(keyword: str, value):
    return lambda ds: setattr(ds, keyword, value)


DICOM_CASES = [
    ("single slice", dict(keep=1), "single DICOM slice"),
    ("unparsable orientation", dict(edit=_set("ImageOrientationPatient", ["1", "0", "9.87654", "0", "1", "0"]),
                                    raw=(b"9.87654", b"abcdefg")), "ImageOrientationPatient"),
    ("zero orientation", dict(edit=_set("ImageOrientationPatient", ["0"] * 6)), "unit vectors"),
    ("zero pixel spacing", dict(edit=_set("PixelSpacing", ["0", "0"])), "PixelSpacing"),
    ("five orientation values", dict(edit=_set("ImageOrientationPatient", ["1", "0", "0", "0", "1"])),
     "6 finite numbers"),
    ("orientation that overflows a norm (fuzzer)",
     dict(edit=_set("ImageOrientationPatient", ["0", "0", "0", "0", "0", "1.34079e+154"])), "unit vectors"),
    ("rescale slope that overflows float32", dict(edit=_set("RescaleSlope", "1e300")), "not finite after RescaleSlope"),
    ("garbled rescale slope", dict(edit=_set("RescaleSlope", "7.5"), raw=(b"7.5", b"x-y")), "RescaleSlope"),
]


@pytest.mark.parametrize(("name", "how", "fragment"), DICOM_CASES, ids=[c[0] for c in DICOM_CASES])
def test_hostile_dicom(tmp_path: Path, threshold_net, dicom_series, name: str, how: dict, fragment: str) -> None:
    result = run(scan_args(dicom_series(**how)), tmp_path / "out")
    assert_one_line(result, ExitCode.INPUT, fragment)
    assert "Warning" not in result.stderr
    assert_no_partial_files(tmp_path / "out")


# -- weights: registry, manifest, imports --------------------------------------------------------


@pytest.mark.parametrize("document", [
    [], {"schema_version": 1, "task_sets": {}, "models": []},
    {"schema_version": 1, "task_sets": {"t": [5]}, "models": {"x": {"task_set": "t"}}},
    {"schema_version": 1, "task_sets": {"t": 5}, "models": {"x": {"task_set": "t"}}},
    {"schema_version": 1, "task_sets": {}, "models": {"x": 3}},
], ids=["a list", "models a list", "task not an object", "task set not a list", "model not an object"])
def test_registry_of_the_wrong_shape_is_exit_2(tmp_path: Path, monkeypatch, document) -> None:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(document))
    monkeypatch.setenv("UNISEG_REGISTRY", str(path))
    assert_one_line(runner.invoke(app, ["models"]), ExitCode.USAGE, "registry:")


def test_manifest_entry_that_is_not_an_object_is_exit_4(tmp_path: Path, monkeypatch) -> None:
    from unisegcli.weights import cache
    from unisegcli.weights.resolver import get_model

    monkeypatch.setenv("UNISEG_HOME", str(tmp_path / "home"))
    folder = cache.model_dir(get_model("uniseg"))
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"files": {"plans.pkl": "oops"}}))
    result = runner.invoke(app, ["weights", "verify", "uniseg"])
    assert_one_line(result, ExitCode.WEIGHTS, "manifest")
    assert "uniseg weights remove uniseg --yes" in result.stderr


def test_imported_model_entry_that_is_not_an_object_is_exit_4(tmp_path: Path, monkeypatch) -> None:
    from unisegcli.weights.imported import imported_path

    monkeypatch.setenv("UNISEG_HOME", str(tmp_path / "home"))
    imported_path().parent.mkdir(parents=True)
    imported_path().write_text(json.dumps({"models": {"mine": ["nnunet:/x"]}}))
    assert_one_line(runner.invoke(app, ["tasks", "--model", "mine"]), ExitCode.WEIGHTS, "imported model 'mine'")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_weights_import_refuses_a_pickle_a_run_would_refuse(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("UNISEG_HOME", str(tmp_path / "home"))
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("UniSeg/plans.pkl", pickle.dumps(_Evil()))  # plans.pkl has no sha256 in the registry
    result = runner.invoke(app, ["weights", "import", "uniseg", str(archive)])
    assert_one_line(result, ExitCode.WEIGHTS, "refused to load global 'posix.system'")
    assert "Nothing was imported" in result.stderr
    assert [p.name for p in (tmp_path / "home").rglob("*") if p.is_file() and p.suffix != ".lock"] == []


@pytest.mark.timeout(120)
def test_piped_input_list_resolves_paths_from_the_current_folder(tmp_path: Path, monkeypatch) -> None:
    """`--input-list <(ls *.nii.gz)` passes a pipe: it is read (no hang: a writer is there),
    and its relative paths are taken from the current folder, not from /dev/fd."""
    import threading

    from unisegcli.io.discovery import read_input_list

    monkeypatch.chdir(tmp_path)
    pipe = tmp_path / "list.pipe"
    os.mkfifo(pipe)
    writer = threading.Thread(target=lambda: pipe.write_text("\ufeffa.nii.gz\nsub/b.nii.gz\n"))
    writer.start()
    cases = read_input_list(pipe)
    writer.join()
    assert [c.path for c in cases] == [tmp_path / "a.nii.gz", tmp_path / "sub" / "b.nii.gz"]
