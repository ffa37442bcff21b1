"""QC flags in statistics: known answers on synthetic masks, the cohort qc.csv, the registry ranges."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_affine, phantom_ct, save_nifti, use_registry
from unisegcli.io.nifti import Scan, read_scan
from unisegcli.outputs.qc import counting_pieces, edge_faces, reference_ranges, side_of
from unisegcli.outputs.statistics import case_statistics, merge_cohort_qc, render_statistics

# A range made up for the tests only: not a published reference.
TEST_RANGES = {"organ": {"min": 0.05, "max": 0.1, "source": "test range, not a published reference"}}


def _scan(tmp_path: Path, kind: str = "ras", shape=(20, 16, 12), name: str = "case.nii.gz") -> Scan:
    return read_scan(save_nifti(tmp_path / name, np.zeros(shape, np.float32), make_affine(kind)))


def _stats(scan: Scan, masks_ijk: dict[str, np.ndarray], **kwargs) -> dict:
    masks = {n: np.ascontiguousarray(scan.reorientation.to_internal(m)) for n, m in masks_ijk.items()}
    return case_statistics(scan, masks, reference_ranges=kwargs.pop("ranges", {}), **kwargs)


def _box(shape, *slices) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[slices] = True
    return mask


@pytest.mark.parametrize(("kind", "expected"), [("ras", ["left", "superior"]), ("lps", ["right", "superior"])])
def test_touches_edge_in_patient_terms(tmp_path: Path, kind: str, expected: list[str]) -> None:
    """File voxel i = 0 is the patient's left in RAS files and the patient's right in LPS ones."""
    scan = _scan(tmp_path, kind)
    mask = _box(scan.file_shape, slice(0, 5), slice(4, 8), slice(6, 12))  # i = 0 and k = last
    rec = _stats(scan, {"organ": mask})["structures"]["organ"]
    assert rec["qc"]["touches_edge"] == expected
    inner = _box(scan.file_shape, slice(3, 5), slice(4, 8), slice(3, 6))
    assert _stats(scan, {"organ": inner})["structures"]["organ"]["qc"]["touches_edge"] == []


def test_edge_faces_of_each_axis() -> None:
    assert edge_faces((0, 0, 0), (9, 9, 9), (10, 10, 10)) == [
        "left", "right", "posterior", "anterior", "inferior", "superior"]  # fmt: skip
    assert edge_faces((1, 1, 1), (8, 8, 8), (10, 10, 10)) == []


def test_fragmented_means_a_second_sizeable_piece(tmp_path: Path) -> None:
    scan = _scan(tmp_path, shape=(24, 24, 24))
    two = _box(scan.file_shape, slice(2, 8), slice(2, 8), slice(2, 8)) | _box(scan.file_shape, *[slice(14, 18)] * 3)
    stray = _box(scan.file_shape, slice(2, 8), slice(2, 8), slice(2, 8))
    stray[20, 20, 20] = True  # 1 voxel of 217: below 5 %
    stats = _stats(scan, {"two": two, "stray": stray})
    assert stats["structures"]["two"]["qc"]["fragmented"] is True
    assert stats["structures"]["stray"]["components"] == 2
    assert stats["structures"]["stray"]["qc"]["fragmented"] is False
    assert counting_pieces(np.array([100, 6, 4])) == 2 and counting_pieces(np.array([100, 4])) == 1


@pytest.mark.parametrize("kind", ["ras", "lps"])
def test_laterality_against_the_field_of_view_centre(tmp_path: Path, kind: str) -> None:
    scan = _scan(tmp_path, kind)
    affine = scan.image.affine
    # The half of the file's i axis whose world x is larger is the patient's right (RAS +x).
    right_half = slice(12, 18) if affine[0, 0] > 0 else slice(2, 8)
    left_half = slice(2, 8) if affine[0, 0] > 0 else slice(12, 18)
    masks = {
        "kidney_left": _box(scan.file_shape, right_half, slice(4, 8), slice(4, 8)),  # wrong side
        "kidney_right": _box(scan.file_shape, right_half, slice(4, 8), slice(4, 8)),
        "left kidney": _box(scan.file_shape, left_half, slice(4, 8), slice(4, 8)),
        "liver": _box(scan.file_shape, right_half, slice(4, 8), slice(4, 8)),
    }
    stats = _stats(scan, masks)
    flags = {n: r["qc"]["laterality"] for n, r in stats["structures"].items()}
    assert flags == {"kidney_left": True, "kidney_right": False, "left kidney": False, "liver": None}
    assert stats["midline_from"] == "field_of_view_centre"
    assert stats["flagged"] == {"kidney_left": ["laterality"]}


def test_a_body_mask_sets_the_midline(tmp_path: Path) -> None:
    scan = _scan(tmp_path, "ras")
    body = _box(scan.file_shape, slice(12, 20), slice(0, 16), slice(0, 12))  # patient shifted right
    kidney = _box(scan.file_shape, slice(12, 14), slice(4, 8), slice(4, 8))  # right of the FOV centre
    stats = _stats(scan, {"body": body, "kidney_right": kidney})
    assert stats["midline_from"] == "body"
    assert stats["structures"]["kidney_right"]["qc"]["laterality"] is True  # left of the body's midline


def test_side_words() -> None:
    assert side_of("kidney_left") == "left" and side_of("right_kidney") == "right"
    assert side_of("Left Kidney") == "left" and side_of("heart_atrium_left") == "left"
    assert side_of("leftover") is None and side_of("liver") is None and side_of("left_right") is None


def test_volume_range_flag_from_given_ranges(tmp_path: Path) -> None:
    scan = _scan(tmp_path)  # 1 mm voxels: 1000 voxels = 1 ml
    small = _box(scan.file_shape, slice(2, 6), slice(2, 6), slice(2, 6))  # 0.064 ml: inside
    big = _box(scan.file_shape, slice(2, 12), slice(2, 12), slice(2, 10))  # 0.8 ml: above
    inside = _stats(scan, {"organ": small}, ranges=TEST_RANGES)["structures"]["organ"]["qc"]
    assert inside["volume_outside_range"] is False
    assert inside["reference_volume_ml"] == {"min": 0.05, "max": 0.1, "source": TEST_RANGES["organ"]["source"]}
    above = _stats(scan, {"organ": big, "other": big}, ranges=TEST_RANGES)
    assert above["structures"]["organ"]["qc"]["volume_outside_range"] is True
    assert above["structures"]["other"]["qc"]["volume_outside_range"] is None  # no range: no flag
    assert above["flagged"] == {"organ": ["volume_outside_range"]}
    empty = _stats(scan, {"organ": np.zeros(scan.file_shape, bool)}, ranges=TEST_RANGES)
    assert empty["structures"]["organ"]["qc"]["volume_outside_range"] is None
    assert empty["flagged"] == {"organ": ["empty"]}


def test_ranges_come_from_the_registry_in_use(tmp_path: Path, monkeypatch) -> None:
    shipped = reference_ranges()
    assert shipped, "the shipped registry holds at least one published range"
    for name, entry in shipped.items():
        assert 0 < entry["min"] < entry["max"], name
        assert len(entry["source"]) > 40 and entry["population"], name  # a citable source
    registry = json.loads((Path(__file__).parents[1] / "unisegcli" / "weights_registry.json").read_text())
    registry["reference_ranges"] = {"volume_ml": TEST_RANGES}
    path = tmp_path / "site.json"
    path.write_text(json.dumps(registry))
    monkeypatch.setenv("UNISEG_REGISTRY", str(path))
    assert reference_ranges() == TEST_RANGES
    scan = _scan(tmp_path)
    big = _box(scan.file_shape, slice(2, 12), slice(2, 12), slice(2, 10))
    stats = case_statistics(scan, {"organ": np.ascontiguousarray(scan.reorientation.to_internal(big))})
    assert stats["structures"]["organ"]["qc"]["volume_outside_range"] is True


def test_flags_in_json_and_csv(tmp_path: Path) -> None:
    scan = _scan(tmp_path)
    edge = _box(scan.file_shape, slice(0, 4), slice(2, 6), slice(2, 6))
    stats = _stats(scan, {"organ": edge, "tumor": np.zeros(scan.file_shape, bool)})
    json_text, csv_text = render_statistics(stats)
    assert json.loads(json_text)["flagged"] == {"organ": ["touches_edge"], "tumor": ["empty"]}
    rows = {r["structure"]: r for r in csv.DictReader(csv_text.splitlines())}
    assert rows["organ"]["qc_touches_edge"] == "left" and rows["organ"]["flags"] == "touches_edge"
    assert rows["organ"]["qc_empty"] == "false" and rows["tumor"]["qc_empty"] == "true"
    assert rows["tumor"]["qc_laterality"] == "" and rows["tumor"]["flags"] == "empty"


def test_cohort_qc_lists_flagged_structures_and_replaces_a_rerun(tmp_path: Path) -> None:
    scan = _scan(tmp_path)
    inner = _box(scan.file_shape, slice(3, 6), slice(3, 6), slice(3, 6))
    flagged = _stats(scan, {"organ": inner, "tumor": np.zeros(scan.file_shape, bool)}, case_id="b")
    clean = _stats(scan, {"organ": inner}, case_id="a")
    merge_cohort_qc(tmp_path, flagged)
    table = merge_cohort_qc(tmp_path, clean)
    rows = list(csv.DictReader(table.open(newline="")))
    assert [(r["case_id"], r["structure"], r["flags"]) for r in rows] == [("b", "tumor", "empty")]
    merge_cohort_qc(tmp_path, dict(clean, case_id="b"))  # case b re-run: nothing flagged now
    assert list(csv.DictReader(table.open(newline=""))) == []
    assert table.read_text().startswith("case_id,structure,task,flags")


def test_segmentation_run_writes_the_cohort_qc_table(tmp_path: Path, threshold_net) -> None:
    from unisegcli.cli.app import app

    (tmp_path / "in").mkdir()
    for k in range(2):
        box = (slice(0, 14), slice(6, 16), slice(2, 6)) if k == 0 else (slice(4, 14), slice(6, 16), slice(2, 6))
        save_nifti(tmp_path / "in" / f"case{k}.nii.gz", phantom_ct(shape=(24, 22, 8), box=box),
                   np.diag([-1.5, -1.5, 3.0, 1.0]))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [str(tmp_path / "in"), "-o", str(out), "--tasks", "liver", "--quiet"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "qc.csv").open(newline="")))
    assert {(r["case_id"], r["structure"], r["flags"]) for r in rows} == {
        ("case0", "liver", "touches_edge"), ("case0", "liver_tumor", "empty"), ("case1", "liver_tumor", "empty")}
    edge = next(r for r in rows if r["structure"] == "liver")
    assert edge["touches_edge"] == "right"  # file i = 0 of an LPS file is the patient's right
    stats = json.loads((out / "case0" / "statistics.json").read_text())
    assert stats["flagged"]["liver"] == ["touches_edge"]


def test_write_case_outputs_returns_the_flags_and_merges_qc(tmp_path: Path) -> None:
    """CaseOutputs.flagged (for the case_done event) is the statistics' "flagged" summary."""
    from unisegcli.outputs.writer import OutputOptions, write_case_outputs

    scan = _scan(tmp_path)
    edge = np.ascontiguousarray(scan.reorientation.to_internal(_box(scan.file_shape, slice(0, 4), slice(2, 6), slice(2, 6))))
    outputs = write_case_outputs(scan, {"organ": edge, "tumor": np.zeros_like(edge)}, tmp_path / "cohort" / "case",
                                 OutputOptions(), task_of={"organ": "organ", "tumor": "organ"},
                                 cohort_folder=tmp_path / "cohort")
    assert outputs.flagged == {"organ": ["touches_edge"], "tumor": ["empty"]}
    assert outputs.cohort_qc == tmp_path / "cohort" / "qc.csv"
    assert len(list(csv.DictReader(outputs.cohort_qc.open(newline="")))) == 2
    none = write_case_outputs(scan, {"organ": edge}, tmp_path / "solo", OutputOptions(statistics=False),
                              task_of={"organ": "organ"})
    assert none.flagged == {} and none.cohort_qc is None
