"""Outputs stay inside OUT, never replace an input, and are never read back as inputs
(reliability round 2, bugs 1-3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import phantom_ct, save_nifti
from unisegcli.cli.app import app
from unisegcli.errors import ExitCode

runner = CliRunner()
AFFINE = np.diag([-1.5, -1.5, 3.0, 1.0])


def scan(folder: Path, name: str = "scan.nii.gz") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return save_nifti(folder / name, phantom_ct(shape=(24, 22, 8)), AFFINE)


def files_below(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("case_id", ["../escaped", "/tmp/uniseg-abs-escape", "a/b", "..", ".hidden", "a\\b"])
def test_a_case_id_cannot_leave_the_output_folder(tmp_path: Path, threshold_net, case_id: str) -> None:
    good = scan(tmp_path / "in")
    listing = tmp_path / "list.csv"
    listing.write_text(f"case_id,path\nok,{good}\n{json.dumps(case_id)},{good}\n")
    out = tmp_path / "work" / "out"
    result = runner.invoke(app, ["--input-list", str(listing), "-o", str(out), "--tasks", "liver"])
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "is not a plain folder name" in result.stderr and "line 3" in result.stderr
    assert len([ln for ln in result.stderr.splitlines() if ln.strip()]) == 1
    assert not (tmp_path / "work" / "escaped").exists() and not Path("/tmp/uniseg-abs-escape").exists()
    assert not out.exists() or files_below(out) == []


def test_a_mask_never_replaces_the_input_scan(tmp_path: Path, threshold_net) -> None:
    folder = tmp_path / "d"
    source = scan(folder, "liver.nii.gz")
    before = source.read_bytes()
    result = runner.invoke(app, [str(source), "-o", str(folder), "--tasks", "liver,spleen"])
    assert result.exit_code == ExitCode.OUTPUT, result.output
    assert "would overwrite the input scan" in result.stderr
    assert source.read_bytes() == before
    assert files_below(folder) == ["liver.nii.gz"]  # nothing written, nothing partial


def test_in_a_batch_only_the_colliding_case_fails(tmp_path: Path, threshold_net) -> None:
    folder = tmp_path / "in"
    scan(folder, "a.nii.gz")
    (folder / "b").mkdir()
    b_scan = scan(folder / "b", "liver.nii.gz")  # case id 'liver' ... written to OUT/liver/
    shutil.move(str(b_scan), folder / "liver.nii.gz")
    out = tmp_path / "out"
    (out / "liver").mkdir(parents=True)
    victim = shutil.copy(folder / "liver.nii.gz", out / "liver" / "liver.nii.gz")
    listing = tmp_path / "list.csv"
    listing.write_text(f"case_id,path\na,{folder / 'a.nii.gz'}\nliver,{victim}\n")
    before = Path(victim).read_bytes()
    result = runner.invoke(app, ["--input-list", str(listing), "-o", str(out), "--tasks", "liver", "--json"])
    assert result.exit_code == ExitCode.PARTIAL, result.output
    events = [json.loads(x) for x in result.stdout.splitlines()]
    assert [e["event"] for e in events][0] == "run_started"
    failed = [e for e in events if e["event"] == "case_failed"]
    assert [f["case_id"] for f in failed] == ["liver"] and failed[0]["exit_code"] == ExitCode.OUTPUT
    assert Path(victim).read_bytes() == before
    assert (out / "a" / "liver.nii.gz").exists()


def test_a_batch_written_into_its_input_folder_does_not_read_its_outputs(tmp_path: Path, threshold_net) -> None:
    folder = tmp_path / "d"
    scan(folder, "case1.nii.gz")
    scan(folder, "case2.nii.gz")
    args = [str(folder), "-o", str(folder), "--tasks", "liver", "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert (folder / "case1" / "liver.nii.gz").exists()
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    events = [json.loads(x) for x in again.stdout.splitlines()]
    assert [e["cases"] for e in events if e["event"] == "run_started"] == [2], again.stdout
    assert sorted(e["case_id"] for e in events if e["event"] == "case_skipped") == ["case1", "case2"]


def test_a_single_scan_run_into_its_own_folder_is_not_rediscovered(tmp_path: Path, threshold_net) -> None:
    folder = tmp_path / "d"
    scan(folder, "scan.nii.gz")
    assert runner.invoke(app, [str(folder / "scan.nii.gz"), "-o", str(folder), "--tasks", "liver"]).exit_code == 0
    marker = json.loads((folder / ".uniseg-done.json").read_text())
    assert "liver.nii.gz" in marker["files"] and "scan.nii.gz" not in marker["files"]
    # the folder as input: only the scan is a case (its masks are outputs of the earlier run)
    result = runner.invoke(app, [str(folder), "-o", str(tmp_path / "o2"), "--tasks", "liver", "--json"])
    assert result.exit_code == 0, result.output
    done = [json.loads(x)["case_id"] for x in result.stdout.splitlines() if '"case_done"' in x]
    assert done == ["scan"]
    assert nib.load(str(tmp_path / "o2" / "liver.nii.gz")).shape == (24, 22, 8)


# -- stale state and per-case failures (reliability round 2) ------------------------------------


def test_a_listed_file_that_does_not_exist_fails_only_its_case(tmp_path: Path, threshold_net) -> None:
    good = scan(tmp_path / "in", "good.nii.gz")
    listing = tmp_path / "list.csv"
    listing.write_text(f"case_id,path\ngood,{good}\nghost,{tmp_path / 'in' / 'missing.nii.gz'}\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["--input-list", str(listing), "-o", str(out), "--tasks", "liver", "--json"])
    assert result.exit_code == ExitCode.PARTIAL, result.output
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["case_id"], f["exit_code"]) for f in failures] == [("ghost", ExitCode.INPUT)]
    assert (out / "good" / "liver.nii.gz").exists()


def test_a_rerun_removes_its_own_stale_temp_files_and_the_masks_of_dropped_tasks(tmp_path: Path,
                                                                                 threshold_net) -> None:
    import os
    import time

    source = scan(tmp_path / "in", "ct.nii.gz")
    out = tmp_path / "out"
    assert runner.invoke(app, [str(source), "-o", str(out), "--tasks", "liver,spleen", "-q"]).exit_code == 0
    assert (out / "spleen.nii.gz").exists()
    stale = out / ".liver.nii.gz.abc123.tmp.nii.gz"  # what a run killed with -9 mid-write leaves
    stale.write_bytes(b"half a file")
    os.utime(stale, (1_000_000_000, 1_000_000_000))
    fresh = out / ".spleen.nii.gz.xyz789.tmp.nii.gz"  # changed after this run started: kept
    fresh.write_bytes(b"being written")
    later = time.time() + 3600
    os.utime(fresh, (later, later))
    assert runner.invoke(app, [str(source), "-o", str(out), "--tasks", "liver", "-q"]).exit_code == 0
    names = sorted(p.name for p in out.iterdir())
    assert not stale.exists() and fresh.exists()
    assert "spleen.nii.gz" not in names and "liver.nii.gz" in names  # the dropped task's mask is gone
    marker = json.loads((out / ".uniseg-done.json").read_text())
    assert "spleen.nii.gz" not in marker["files"]


def test_a_marker_that_cannot_be_written_takes_the_case_files_with_it(tmp_path: Path, threshold_net,
                                                                      monkeypatch) -> None:
    from unisegcli.errors import OutputError
    from unisegcli.outputs import markers

    def full_disk(*args, **kwargs):
        raise OutputError("cannot write into 'out': No space left on device; expected a writable folder.")

    monkeypatch.setattr(markers, "write_marker", full_disk)
    source = scan(tmp_path / "in", "ct.nii.gz")
    out = tmp_path / "out"
    result = runner.invoke(app, [str(source), "-o", str(out), "--tasks", "liver"])
    assert result.exit_code == ExitCode.OUTPUT, result.output
    assert files_below(out) == []  # nothing partial: no masks without a marker
