"""The bad-input matrix: every case through the real CLI ends in one clear line on stderr,
its documented exit code (docs/errors.md), and an output folder without partial files.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import DATA, phantom_ct, save_nifti
from unisegcli.cli.app import app
from unisegcli.errors import ExitCode

runner = CliRunner()
AFFINE = np.diag([-1.5, -1.5, 3.0, 1.0])
Builder = Callable[[Path], list[str]]


def ct(tmp: Path, name: str = "ct.nii.gz", data: np.ndarray | None = None, affine=AFFINE) -> Path:
    return save_nifti(tmp / name, phantom_ct() if data is None else data, affine)


def scan_args(path: Path | str, *extra: str, tasks: str = "liver") -> list[str]:
    return [str(path), "--tasks", tasks, *extra]


def with_header(tmp: Path, edit: Callable[[nib.Nifti1Header], None]) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape((20, 20, 8))
    header.set_sform(AFFINE, code=2)
    header.set_qform(AFFINE, code=1)
    edit(header)
    path = tmp / "edited.nii.gz"
    nib.save(nib.Nifti1Image(phantom_ct((20, 20, 8)), None, header=header), str(path))
    return path


def raw_pixdim(value: float) -> Callable[[Path], Path]:
    """A file whose header says pixdim[1] = value (nibabel would fix it on save, so patch bytes)."""

    def make(tmp: Path) -> Path:
        plain = tmp / "plain.nii"
        nib.save(nib.Nifti1Image(phantom_ct((20, 20, 8)), AFFINE), str(plain))
        blob = bytearray(plain.read_bytes())
        blob[80:84] = struct.pack("<f", value)  # pixdim[1]: float32 at byte 80 of a NIfTI-1 header
        plain.unlink()
        (tmp / "spacing.nii.gz").write_bytes(gzip.compress(bytes(blob)))
        return tmp / "spacing.nii.gz"

    return make


def singular(header: nib.Nifti1Header) -> None:
    header["qform_code"] = 0
    header["srow_z"] = [0.0, 0.0, 0.0, 0.0]


def truncated(tmp: Path) -> Path:
    full = ct(tmp, "full.nii.gz", np.random.default_rng(0).normal(size=(30, 30, 20)).astype(np.float32))
    blob = full.read_bytes()
    (tmp / "trunc.nii.gz").write_bytes(blob[: len(blob) // 2])
    full.unlink()
    return tmp / "trunc.nii.gz"


def file_with(text: bytes, name: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(text)
        return tmp / name

    return make


def nan_volume(tmp: Path) -> Path:
    data = phantom_ct()
    data[3, 3, 3], data[4, 4, 4] = np.nan, np.inf
    return ct(tmp, data=data)


def channel_files_of_different_shapes(tmp: Path) -> list[str]:
    a = ct(tmp, "a.nii.gz")
    b = ct(tmp, "b.nii.gz", phantom_ct(shape=(20, 20, 8), box=(slice(2, 5),) * 3))
    return ["--channel", f"ct={a}", "--channel", f"pet={b}", "--tasks", "autopet"]


def output_is_a_file(tmp: Path) -> list[str]:
    (tmp / "taken").write_text("not a folder")
    return [str(ct(tmp)), "--tasks", "liver", "-o", str(tmp / "taken")]


def output_below_a_file(tmp: Path) -> list[str]:
    (tmp / "taken").write_text("not a folder")
    return [str(ct(tmp)), "--tasks", "liver", "-o", str(tmp / "taken" / "out")]


# (id, builder, exit code, fragment of the message, needs the stand-in network)
CASES: list[tuple[str, Builder, ExitCode, str]] = [
    ("missing file", lambda t: scan_args(t / "nope.nii.gz"), ExitCode.INPUT, "does not exist"),
    ("empty file", lambda t: scan_args(file_with(b"", "e.nii")(t)), ExitCode.INPUT, "is an empty file"),
    ("not a NIfTI", lambda t: scan_args(file_with(b"%PDF-1.4 hello", "x.nii.gz")(t)), ExitCode.INPUT, "not a NIfTI"),
    ("truncated gz", lambda t: scan_args(truncated(t)), ExitCode.INPUT, "truncated or corrupt"),
    ("2D image", lambda t: scan_args(ct(t, data=np.zeros((16, 16), np.float32))), ExitCode.INPUT, "2D image"),
    ("5D image", lambda t: scan_args(ct(t, data=np.zeros((4, 4, 4, 2, 2), np.float32))), ExitCode.INPUT, "5D image"),
    ("zero-size axis", lambda t: scan_args(ct(t, data=np.zeros((4, 0, 4), np.float32))), ExitCode.INPUT, "empty axis"),
    ("NaN/Inf voxels", lambda t: scan_args(nan_volume(t)), ExitCode.INPUT, "2 NaN/Inf voxels"),
    ("zero spacing", lambda t: scan_args(raw_pixdim(0.0)(t)), ExitCode.INPUT, "voxel spacing"),
    ("negative spacing", lambda t: scan_args(raw_pixdim(-2.0)(t)), ExitCode.INPUT, "voxel spacing"),
    ("absurd spacing", lambda t: scan_args(raw_pixdim(1e6)(t)), ExitCode.INPUT, "voxel spacing"),
    ("non-invertible affine", lambda t: scan_args(with_header(t, singular)), ExitCode.INPUT, "non-invertible"),
    ("4D with wrong channel count",
     lambda t: scan_args(ct(t, data=np.stack([phantom_ct()] * 3, -1)), tasks="brats"), ExitCode.INPUT,
     "has 3 channel(s); task 'brain_tumor' expects 4"),
    ("channel files of different shapes", channel_files_of_different_shapes, ExitCode.INPUT, "is not on the grid"),
    ("unknown task", lambda t: scan_args(ct(t), tasks="livr"), ExitCode.USAGE, "did you mean 'liver'"),
    ("tasks of different modalities without channels",
     lambda t: scan_args(ct(t), tasks="liver,brain_tumor"), ExitCode.INPUT, "expects 4: t1, t1ce, t2, flair"),
    ("unknown model", lambda t: scan_args(ct(t), "--model", "unisge"), ExitCode.USAGE, "did you mean 'uniseg'"),
    ("output folder is a file", output_is_a_file, ExitCode.OUTPUT, "is a file"),
    ("unwritable output folder", output_below_a_file, ExitCode.OUTPUT, "not writable"),
    ("cuda without a GPU", lambda t: scan_args(ct(t), "--device", "cuda"), ExitCode.RUNTIME, "cuda"),
    ("bad --shard", lambda t: scan_args(ct(t), "--shard", "3/2"), ExitCode.USAGE, "--shard"),
    ("bad --step", lambda t: scan_args(ct(t), "--step", "7"), ExitCode.USAGE, "--step"),
    ("missing -o", lambda t: [str(ct(t)), "--tasks", "liver", "--no-output-folder"], ExitCode.USAGE, "--output"),
    ("empty input list", lambda t: ["--input-list", str(file_with(b"\n# none\n", "list.txt")(t)), "--tasks", "liver"],
     ExitCode.INPUT, "is empty"),
    ("unknown structure", lambda t: scan_args(ct(t), "--structures", "livr"), ExitCode.USAGE, "did you mean"),
    ("dicom output for a NIfTI input", lambda t: scan_args(ct(t), "--output-type", "dicom-seg"), ExitCode.USAGE,
     "DICOM"),
]


def assert_one_line(result, code: int, fragment: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert fragment.lower() in lines[0].lower()
    assert "Traceback" not in result.output and result.stdout.strip() == ""


def assert_no_partial_files(out: Path) -> None:
    if out.is_dir():
        leftovers = [p.name for p in out.rglob("*")]
        assert leftovers == [], leftovers


@pytest.mark.parametrize(("name", "build", "code", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(tmp_path: Path, threshold_net, name: str, build: Builder, code: ExitCode, fragment: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    args = build(src)
    out = tmp_path / "out"
    if "--no-output-folder" in args:
        args.remove("--no-output-folder")
    elif "-o" not in args:
        args += ["-o", str(out)]
    if name == "cuda without a GPU":
        import torch

        if torch.cuda.is_available():
            pytest.skip("needs a machine without a GPU")
    assert_one_line(runner.invoke(app, args), code, fragment)
    assert_no_partial_files(out)


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, [*scan_args(tmp_path / "nope.nii.gz"), "-o", str(tmp_path / "o"), "--debug"])
    assert result.exit_code == ExitCode.INPUT and "Traceback" in result.output


def test_disk_full_while_writing(tmp_path: Path, threshold_net, monkeypatch) -> None:
    """A writer failing with ENOSPC mid-case: exit code 7, no mask of the case left behind."""
    calls = {"n": 0}
    real_save = nib.save

    def save_then_fail(image, path):
        calls["n"] += 1
        if calls["n"] == 2:  # the first mask was staged already
            raise OSError(28, "No space left on device")
        return real_save(image, path)

    monkeypatch.setattr(nib, "save", save_then_fail)
    out = tmp_path / "out"
    result = runner.invoke(app, [*scan_args(ct(tmp_path)), "-o", str(out)])
    assert_one_line(result, ExitCode.OUTPUT, "No space left on device")
    assert_no_partial_files(out)


def test_all_zero_and_constant_volumes_give_empty_masks_and_a_warning(tmp_path: Path, threshold_net) -> None:
    for value in (0.0, -100.0):
        out = tmp_path / f"out{value}"
        src = ct(tmp_path, f"c{value}.nii.gz", np.full((20, 20, 8), value, np.float32))
        result = runner.invoke(app, [*scan_args(src), "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert "is constant" in result.stderr
        assert not np.asarray(nib.load(str(out / "liver.nii.gz")).dataobj).any()


def test_mr_given_to_a_ct_task_warns(tmp_path: Path, threshold_net) -> None:
    mr = np.random.default_rng(0).uniform(0, 1500, (20, 20, 8)).astype(np.float32)
    result = runner.invoke(app, [*scan_args(ct(tmp_path, data=mr)), "-o", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0
    warnings = [json.loads(x) for x in result.stdout.splitlines() if '"warning"' in x]
    assert warnings and "does not look like a CT in Hounsfield units" in warnings[0]["message"]


def test_tiny_field_of_view_warns(tmp_path: Path, threshold_net) -> None:
    small = ct(tmp_path, data=phantom_ct(shape=(6, 6, 3), box=(slice(1, 3),) * 3))
    result = runner.invoke(app, [*scan_args(small), "-o", str(tmp_path / "o")])
    assert result.exit_code == 0 and "far less than" in result.stderr


# -- DICOM, weights -------------------------------------------------------------------------


@pytest.fixture
def dicom_ct(tmp_path: Path) -> Path:
    pytest.importorskip("pydicom")  # the 'dicom' extra; CI installs it
    image = nib.load(str(DATA / "example_ct.nii.gz"))
    crop = np.asarray(image.dataobj)[40:72, 30:62, 8:16].astype(np.int16)
    return save_nifti(tmp_path / "crop.nii.gz", crop, AFFINE)


def test_dicom_study_folder_takes_one_series_and_says_why(tmp_path: Path, dicom_ct: Path, threshold_net) -> None:
    from test_dicom import write_series

    folder = tmp_path / "study"
    folder.mkdir()
    uids = {}
    for name, skip in (("a", (7,)), ("b", ())):  # two series, their files side by side in one folder
        uids[name] = write_series(tmp_path / name, dicom_ct, description=f"AX {name}", skip=skip)
        for file in (tmp_path / name).iterdir():
            file.rename(folder / f"{name}_{file.name}")
    result = runner.invoke(app, [*scan_args(folder), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "series:" in line]
    assert len(lines) == 1 and f"took series {uids['b']}" in lines[0], result.stderr
    assert "most slices (8; #3 has 7)" in lines[0] and "ZZSENTINEL" not in result.output
    recorded = json.loads((tmp_path / "out" / "statistics.json").read_text())["input_series"]
    assert [r["series_instance_uid"] for r in recorded] == [uids["b"]] and recorded[0]["channel"] == "ct"
    result = runner.invoke(app, [*scan_args(folder), "-o", str(tmp_path / "out2"), "--json"])
    events = [json.loads(line) for line in result.stdout.splitlines()]
    done = next(e for e in events if e["event"] == "case_done")
    assert done["input_series"][0]["series_instance_uid"] == uids["b"]
    assert "most slices" in done["input_series"][0]["reason"]


def test_dicom_folder_without_usable_series(tmp_path: Path, threshold_net) -> None:
    pytest.importorskip("pydicom")
    from dicom_build import make_series

    make_series(tmp_path / "study" / "1", number=1, description="Scout", image_type="ORIGINAL\\PRIMARY\\LOCALIZER",
                study_uid="1.2.3")
    make_series(tmp_path / "study" / "2", number=2, modality="MR", description="T2", study_uid="1.2.3")
    result = runner.invoke(app, [*scan_args(tmp_path / "study"), "-o", str(tmp_path / "out")])
    assert_one_line(result, ExitCode.INPUT, "no usable DICOM series for channel 'ct' among 2")
    assert "(localizer)" in result.stderr and "(modality MR, expected CT)" in result.stderr
    assert_no_partial_files(tmp_path / "out")


@pytest.mark.parametrize("output_type", ["dicom-seg", "rtstruct"])
def test_dicom_output_for_blank_uids_stops_before_any_work(tmp_path: Path, threshold_net, output_type: str) -> None:
    pytest.importorskip("pydicom")
    from dicom_build import make_series

    blank = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
    make_series(tmp_path / "anon", shape=(32, 32, 6), blank=blank, blank_meta=True)
    result = runner.invoke(app, [*scan_args(tmp_path / "anon"), "-o", str(tmp_path / "out"),
                                 "--output-type", output_type])
    assert_one_line(result, ExitCode.INPUT, "StudyInstanceUID, SeriesInstanceUID, SOPClassUID, SOPInstanceUID")
    assert "internal error" not in result.output and "KeyError" not in result.output
    assert threshold_net.encode_calls == 0  # stopped before the network ran
    assert_no_partial_files(tmp_path / "out")
    result = runner.invoke(app, [*scan_args(tmp_path / "anon"), "-o", str(tmp_path / "nifti")])
    assert result.exit_code == 0, result.output  # the same series segments fine to NIfTI


def test_dicom_folder_with_missing_slices(tmp_path: Path, dicom_ct: Path, threshold_net) -> None:
    from test_dicom import write_series

    folder = tmp_path / "series"
    write_series(folder, dicom_ct, skip=(3,))
    result = runner.invoke(app, [*scan_args(folder), "-o", str(tmp_path / "out")])
    assert_one_line(result, ExitCode.INPUT, "missing")
    assert_no_partial_files(tmp_path / "out")


def test_corrupted_weights_in_the_cache(tmp_path: Path, tiny_model: str) -> None:
    cached = Path(os.environ["UNISEG_HOME"]) / "models" / tiny_model / "test" / "model_final_checkpoint.model"
    cached.write_bytes(cached.read_bytes()[:1000])
    result = runner.invoke(app, [*scan_args(ct(tmp_path)), "-o", str(tmp_path / "out"), "--model", tiny_model])
    assert_one_line(result, ExitCode.WEIGHTS, "model_final_checkpoint.model")
    assert_no_partial_files(tmp_path / "out")


def test_weights_missing_in_offline_mode(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("UNISEG_HOME", str(tmp_path / "empty-cache"))
    result = runner.invoke(app, [*scan_args(ct(tmp_path)), "-o", str(tmp_path / "out"), "--offline"])
    assert_one_line(result, ExitCode.WEIGHTS, "uniseg weights import uniseg")
    assert_no_partial_files(tmp_path / "out")


# -- Ctrl-C during a batch ------------------------------------------------------------------


GATED_NETWORK = """\
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import conftest
import unisegcli.session

GATE = Path({gate!r})


class Gated(conftest.ThresholdNet):
    \"\"\"Blocks in the first decode after case0's done marker exists: case1 is then mid-network.\"\"\"

    def decode(self, features, task_index):
        if Path({marker!r}).exists():
            (GATE / "inside").touch()
            while not (GATE / "release").exists():  # SIGINT interrupts this wait
                time.sleep(0.01)
        return super().decode(features, task_index)


unisegcli.session.load_network = lambda segmenter: Gated()
"""


def wait_for(path: Path, proc: subprocess.Popen, limit_s: float = 300.0) -> None:
    """Until ``path`` exists; fails (instead of hanging) if the process ends first."""
    deadline = time.monotonic() + limit_s
    while not path.exists():
        assert proc.poll() is None, f"uniseg ended ({proc.returncode}) before {path.name} appeared"
        assert time.monotonic() < deadline, f"{path.name} did not appear in {limit_s} s"
        time.sleep(0.01)


def test_sigint_during_a_batch_stops_cleanly(tmp_path: Path) -> None:
    """SIGINT mid-batch: exit 130, finished cases intact with markers, the one in the network absent.

    Ordered by events, not by timing: the stand-in network blocks inside case1 (the first
    decode after case0's done marker was written) until the test has sent SIGINT.
    """
    inputs = tmp_path / "in"
    inputs.mkdir()
    for k in range(4):
        ct(inputs, f"case{k}.nii.gz")
    out, gate, hook = tmp_path / "out", tmp_path / "gate", tmp_path / "hook"
    gate.mkdir()
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(GATED_NETWORK.format(
        tests=str(Path(__file__).parent), gate=str(gate), marker=str(out / "case0" / ".uniseg-done.json")))
    repo = Path(__file__).resolve().parent.parent  # the tree under test, not an installed copy
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("uniseg")), str(inputs), "-o", str(out), "--tasks", "liver", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(repo)])},
    )
    try:
        wait_for(gate / "inside", proc)
        proc.send_signal(signal.SIGINT)
    finally:
        (gate / "release").touch()
    rest, stderr = proc.communicate(timeout=300)
    assert proc.returncode == ExitCode.INTERRUPTED, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert json.loads(rest.splitlines()[-1])["interrupted"] is True
    done = sorted(p.parent.name for p in out.glob("*/.uniseg-done.json"))
    # the staged batch writes case n-1 while case n is in the network: the case in the network
    # (the last one started) is absent, the cases before it may have been finished
    started = [e["case_id"] for e in map(json.loads, rest.splitlines()) if e["event"] == "case_started"]
    in_network = started[-1]
    assert in_network != "case0" and done == [f"case{k}" for k in range(len(done))] and in_network not in done
    for folder in (p for p in out.iterdir() if p.is_dir()):
        files = sorted(p.name for p in folder.iterdir())
        if folder.name in done:
            assert "liver.nii.gz" in files
        else:
            assert files == [], files  # nothing partial, not even hidden temp files
