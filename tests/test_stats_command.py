"""`uniseg stats`: statistics of existing masks — ours reproduced exactly, label maps, grid checks."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_affine, phantom_ct, save_nifti
from unisegcli.cli.app import app
from unisegcli.errors import ExitCode

runner = CliRunner()
AFFINE = np.diag([-1.5, -1.5, 3.0, 1.0])
AFFINE[:3, 3] = (80.0, 60.0, -30.0)


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], prog_name="uniseg")


def _segment(tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    src = save_nifti(tmp_path / "ct.nii.gz", phantom_ct(), AFFINE)
    out = tmp_path / "out"
    result = invoke(src, "-o", out, "--tasks", "liver,spleen", "--quiet", *extra)
    assert result.exit_code == 0, result.output
    return src, out


@pytest.mark.parametrize("extra", [(), ("--multilabel",), ("--largest-component",)])
def test_stats_reproduces_our_own_statistics_byte_for_byte(tmp_path: Path, threshold_net, extra) -> None:
    src, out = _segment(tmp_path, *extra)
    result = invoke("stats", "--image", src, out, "-o", tmp_path / "again", "--model", "uniseg", "--quiet")
    assert result.exit_code == 0, result.output
    for name in ("statistics.json", "statistics.csv"):
        assert (tmp_path / "again" / name).read_text() == (out / name).read_text(), name
    stats = json.loads((out / "statistics.json").read_text())
    assert set(stats["structures"]) == {"liver", "liver_tumor", "spleen"} and stats["flagged"]["liver_tumor"] == ["empty"]


def test_stats_without_model_gives_the_same_numbers(tmp_path: Path, threshold_net) -> None:
    src, out = _segment(tmp_path)
    result = invoke("stats", "--image", src, out / "liver.nii.gz", out / "spleen.nii.gz", "-o", tmp_path / "s")
    assert result.exit_code == 0, result.output
    ours = json.loads((out / "statistics.json").read_text())
    theirs = json.loads((tmp_path / "s" / "statistics.json").read_text())
    assert list(theirs["structures"]) == ["liver", "spleen"] and theirs["channels"] == ["image"]
    for name in ("liver", "spleen"):
        a, b = ours["structures"][name], theirs["structures"][name]
        assert b["task"] is None and a["task"] == name
        assert b["intensity"]["image"] == a["intensity"]["ct"]
        for key in set(a) - {"task", "intensity"}:
            assert b[key] == a[key], (name, key)
    assert "liver" in result.stdout and "ml" in result.stdout


def test_our_multilabel_map_alone_is_read_with_its_labels_json(tmp_path: Path, threshold_net) -> None:
    src, out = _segment(tmp_path, "--multilabel")
    result = invoke("stats", "--image", src, out / "segmentation.nii.gz", "-o", tmp_path / "s", "--quiet")
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "s" / "statistics.json").read_text())
    assert list(stats["structures"]) == ["liver", "liver_tumor", "spleen"]
    assert stats["structures"]["liver"]["task"] == "liver"  # from labels.json
    ours = json.loads((out / "statistics.json").read_text())
    assert stats["structures"]["liver"]["volume_ml"] == ours["structures"]["liver"]["volume_ml"]
    assert stats["structures"]["spleen"]["voxel_count"] == 0  # lost to the overlap: first listed wins


def _label_map(tmp_path: Path, name: str = "seg.nii.gz") -> tuple[Path, nib.Nifti1Image]:
    scan = save_nifti(tmp_path / "ct.nii.gz", phantom_ct(shape=(20, 18, 10)), make_affine("ras"))
    labels = np.zeros((20, 18, 10), np.uint8)
    labels[2:6, 2:6, 2:6] = 1
    labels[10:14, 10:16, 2:8] = 3
    image = nib.Nifti1Image(labels, make_affine("ras"))
    return scan, image


def test_totalsegmentator_multilabel_with_names_in_the_header(tmp_path: Path) -> None:
    """TotalSegmentator --ml writes a CaretExtension XML label table as a NIfTI extension."""
    scan, image = _label_map(tmp_path)
    xml = ('<?xml version="1.0" encoding="UTF-8"?> <CaretExtension> <VolumeInformation Index="0"> <LabelTable>\n'
           '<Label Key="1" Red="1" Green="0" Blue="0" Alpha="1"><![CDATA[spleen]]></Label>\n'
           '<Label Key="2" Red="0" Green="1" Blue="0" Alpha="1"><![CDATA[kidney_right]]></Label>\n'
           '<Label Key="3" Red="0" Green="0" Blue="1" Alpha="1"><![CDATA[kidney_left]]></Label>\n'
           '</LabelTable> </VolumeInformation></CaretExtension>')
    image.header.extensions.append(nib.nifti1.Nifti1Extension(0, xml.encode()))
    nib.save(image, str(tmp_path / "ts.nii.gz"))
    result = invoke("stats", "--image", scan, tmp_path / "ts.nii.gz", "-o", tmp_path / "s", "--quiet")
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "s" / "statistics.json").read_text())
    rec = stats["structures"]
    assert list(rec) == ["spleen", "kidney_right", "kidney_left"]
    assert (rec["spleen"]["voxel_count"], rec["kidney_right"]["voxel_count"], rec["kidney_left"]["voxel_count"]) == (64, 0, 144)
    assert rec["kidney_left"]["qc"]["laterality"] is True  # i = 10..13 of 20 in RAS: the right side


@pytest.mark.parametrize("table", [{"1": "liver", "3": "spleen"},
                                   {"labels": {"background": 0, "liver": 1, "spleen": 3}}])
def test_label_map_with_a_labels_file(tmp_path: Path, table: dict) -> None:
    scan, image = _label_map(tmp_path)
    nib.save(image, str(tmp_path / "seg.nii.gz"))
    (tmp_path / "labels.json").write_text(json.dumps(table))
    result = invoke("stats", "--image", scan, tmp_path / "seg.nii.gz", "--labels", tmp_path / "labels.json",
                    "-o", tmp_path / "s", "--quiet")
    assert result.exit_code == 0, result.output
    rec = json.loads((tmp_path / "s" / "statistics.json").read_text())["structures"]
    assert {n: r["voxel_count"] for n, r in rec.items()} == {"liver": 64, "spleen": 144}


def test_label_map_without_names_is_refused(tmp_path: Path) -> None:
    scan, image = _label_map(tmp_path)
    nib.save(image, str(tmp_path / "seg.nii.gz"))
    result = invoke("stats", "--image", scan, tmp_path / "seg.nii.gz", "-o", tmp_path / "s")
    assert result.exit_code == ExitCode.INPUT
    assert "--labels" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "s" / "statistics.json").exists()


def test_mask_on_another_grid_is_one_line_exit_3(tmp_path: Path) -> None:
    scan = save_nifti(tmp_path / "ct.nii.gz", phantom_ct(shape=(20, 18, 10)), make_affine("ras"))
    save_nifti(tmp_path / "liver.nii.gz", np.zeros((20, 18, 12), np.uint8), make_affine("ras"))
    result = invoke("stats", "--image", scan, tmp_path / "liver.nii.gz", "-o", tmp_path / "s")
    assert result.exit_code == ExitCode.INPUT
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "(20, 18, 12)" in result.output and "(20, 18, 10)" in result.output
    save_nifti(tmp_path / "liver.nii.gz", np.zeros((20, 18, 10), np.uint8), make_affine("lps"))
    result = invoke("stats", "--image", scan, tmp_path / "liver.nii.gz", "-o", tmp_path / "s")
    assert result.exit_code == ExitCode.INPUT and "different affines" in result.output
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


def test_a_structure_given_twice_is_a_usage_error(tmp_path: Path, threshold_net) -> None:
    src, out = _segment(tmp_path)
    result = invoke("stats", "--image", src, out, out / "liver.nii.gz", "-o", tmp_path / "s")
    assert result.exit_code == ExitCode.USAGE and "'liver'" in result.output


def test_cohort_option_merges_both_tables(tmp_path: Path, threshold_net) -> None:
    src, out = _segment(tmp_path)
    result = invoke("stats", "--image", src, out, "-o", tmp_path / "s", "--cohort", tmp_path / "cohort",
                    "--case-id", "patient7", "--quiet")
    assert result.exit_code == 0, result.output
    assert "patient7,liver_tumor" in (tmp_path / "cohort" / "qc.csv").read_text()
    assert (tmp_path / "cohort" / "statistics.csv").read_text().count("patient7,") == 3
