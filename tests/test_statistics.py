"""Per-structure statistics: known answers on synthetic label maps, strict JSON, CSV = JSON."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import make_affine, save_nifti
from unisegcli.errors import OutputError
from unisegcli.io.nifti import Scan, read_scan
from unisegcli.outputs.statistics import (
    INTENSITY_KEYS,
    case_statistics,
    flatten_rows,
    merge_cohort_statistics,
    write_statistics,
)


def _scan(tmp_path: Path, data: np.ndarray, affine: np.ndarray, name: str = "case.nii.gz") -> Scan:
    return read_scan(save_nifti(tmp_path / name, data, affine))


def _mask_from_file_order(scan: Scan, mask_ijk: np.ndarray) -> np.ndarray:
    """A mask drawn in the file's (i, j, k) order, as the pipeline holds it: [Z, Y, X]."""
    return np.ascontiguousarray(scan.reorientation.to_internal(mask_ijk))


def _strict_loads(text: str) -> dict:
    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


def test_cube_at_2x1x1_mm_is_exactly_2_ml(tmp_path: Path) -> None:
    scan = _scan(tmp_path, np.zeros((20, 20, 20), np.float32), np.diag([2.0, 1.0, 1.0, 1.0]))
    cube = np.zeros((20, 20, 20), bool)
    cube[3:13, 4:14, 5:15] = True
    stats = case_statistics(scan, {"cube": _mask_from_file_order(scan, cube)})
    rec = stats["structures"]["cube"]
    assert rec["voxel_count"] == 1000
    assert rec["volume_ml"] == 2.0
    assert rec["largest_component_ml"] == 2.0
    assert rec["components"] == 1


@pytest.mark.parametrize("kind", ["oblique", "aniso", "lps"])
def test_centroid_and_boxes_in_world_and_file_order(tmp_path: Path, kind: str) -> None:
    """Known centroid in world mm for non-trivial affines; boxes in the FILE's (i, j, k) order."""
    scan = _scan(tmp_path, np.zeros((20, 18, 16), np.float32), make_affine(kind))
    affine = scan.image.affine  # as stored (float32 sform), not the float64 we asked for
    cube = np.zeros((20, 18, 16), bool)
    cube[3:13, 4:10, 5:8] = True
    rec = case_statistics(scan, {"cube": _mask_from_file_order(scan, cube)})["structures"]["cube"]
    expected_centroid = (affine @ np.array([7.5, 6.5, 6.0, 1.0]))[:3]
    np.testing.assert_allclose(rec["centroid_world_mm"], expected_centroid, atol=1e-9)
    assert rec["bbox_ijk"] == {"min": [3, 4, 5], "max": [12, 9, 7]}
    corners = np.array([[i, j, k, 1.0] for i in (3, 12) for j in (4, 9) for k in (5, 7)])
    world = (affine @ corners.T)[:3]
    np.testing.assert_allclose(rec["bbox_world_mm"]["min"], world.min(axis=1), atol=1e-9)
    np.testing.assert_allclose(rec["bbox_world_mm"]["max"], world.max(axis=1), atol=1e-9)
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    assert rec["volume_ml"] == pytest.approx(10 * 6 * 3 * voxel_ml, rel=1e-12)


def test_two_blobs_count_and_largest_component(tmp_path: Path) -> None:
    scan = _scan(tmp_path, np.zeros((16, 16, 16), np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    mask = np.zeros((16, 16, 16), bool)
    mask[1:4, 1:4, 1:4] = True  # 27 voxels
    mask[9:11, 9:11, 9:11] = True  # 8 voxels
    rec = case_statistics(scan, {"blobs": _mask_from_file_order(scan, mask)})["structures"]["blobs"]
    assert rec["components"] == 2
    assert rec["volume_ml"] == pytest.approx(35 * 0.002)
    assert rec["largest_component_ml"] == pytest.approx(27 * 0.002)


def test_intensities_equal_numpy_on_original_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    data = rng.normal(40, 90, size=(14, 12, 10)).astype(np.float32)
    path = save_nifti(tmp_path / "ct.nii.gz", data, make_affine("aniso"))
    scan = read_scan(path)
    mask_ijk = np.zeros(data.shape, bool)
    mask_ijk[2:9, 3:11, 1:6] = True
    mask_ijk[4, 4, 4] = False
    rec = case_statistics(scan, {"organ": _mask_from_file_order(scan, mask_ijk)})["structures"]["organ"]
    values = np.asarray(nib.load(str(path)).get_fdata(), dtype=np.float64)[mask_ijk]
    got = rec["intensity"]["image"]
    expected = {
        "mean": values.mean(), "std": values.std(), "min": values.min(), "max": values.max(),
        "median": np.median(values), "p5": np.percentile(values, 5), "p95": np.percentile(values, 95),
    }  # fmt: skip
    assert set(got) == set(INTENSITY_KEYS)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


def test_multichannel_intensities_keyed_by_channel(tmp_path: Path) -> None:
    data = np.stack([np.full((6, 6, 6), 10.0, np.float32), np.full((6, 6, 6), -3.0, np.float32)], axis=-1)
    scan = _scan(tmp_path, data, make_affine("ras"))
    mask = np.zeros((6, 6, 6), bool)
    mask[1:3, 1:3, 1:3] = True
    stats = case_statistics(scan, {"x": mask}, channel_names=("t1", "t2"))
    assert stats["channels"] == ["t1", "t2"]
    assert stats["structures"]["x"]["intensity"]["t1"]["mean"] == 10.0
    assert stats["structures"]["x"]["intensity"]["t2"]["max"] == -3.0
    with pytest.raises(ValueError):
        case_statistics(scan, {"x": mask}, channel_names=("t1",))


def test_empty_structure_is_reported_explicitly(tmp_path: Path) -> None:
    scan = _scan(tmp_path, np.zeros((8, 8, 8), np.float32), make_affine("ras"))
    stats = case_statistics(scan, {"none": np.zeros((8, 8, 8), bool)}, task_of={"none": "liver"})
    rec = stats["structures"]["none"]
    assert rec["task"] == "liver"
    assert (rec["voxel_count"], rec["volume_ml"], rec["components"], rec["largest_component_ml"]) == (0, 0.0, 0, 0.0)
    assert rec["centroid_world_mm"] is None and rec["bbox_ijk"] is None and rec["bbox_world_mm"] is None
    assert all(v is None for v in rec["intensity"]["image"].values())


def _case(tmp_path: Path, case_id: str = "case") -> dict:
    rng = np.random.default_rng(0)
    data = rng.normal(0, 50, (12, 10, 8)).astype(np.float32)
    scan = _scan(tmp_path, data, make_affine("oblique"), f"{case_id}.nii.gz")
    liver = np.zeros(scan.data.shape[1:], bool)
    liver[2:6, 3:7, 1:5] = True
    liver[7, 8, 7] = True
    return case_statistics(
        scan, {"liver": liver, "liver_tumor": np.zeros_like(liver)}, task_of={"liver": "liver", "liver_tumor": "liver"}
    )


def test_files_are_strict_json_and_csv_agrees_with_json(tmp_path: Path) -> None:
    stats = _case(tmp_path)
    json_path, csv_path = write_statistics(stats, tmp_path / "out")
    loaded = _strict_loads(json_path.read_text())
    assert "NaN" not in json_path.read_text()
    assert loaded["structures"]["liver_tumor"]["volume_ml"] == 0.0
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    expected_rows = flatten_rows(loaded)
    assert [r["structure"] for r in rows] == ["liver", "liver_tumor"]
    assert len(rows) == len(expected_rows)
    for row, expected in zip(rows, expected_rows):
        assert set(row) == set(expected)
        for column, value in expected.items():
            if value is None:
                assert row[column] == "", column
            elif isinstance(value, bool):
                assert row[column] == ("true" if value else "false"), column
            elif isinstance(value, (int, float)):
                assert float(row[column]) == value, column  # same float, full precision
            else:
                assert row[column] == value, column
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_nan_can_never_reach_the_json(tmp_path: Path) -> None:
    stats = _case(tmp_path)
    stats["structures"]["liver"]["volume_ml"] = float("nan")
    with pytest.raises(ValueError):
        write_statistics(stats, tmp_path / "bad")
    assert not (tmp_path / "bad" / "statistics.json").exists()


def test_cohort_table_keeps_each_case_once(tmp_path: Path) -> None:
    table = tmp_path / "statistics.csv"
    a, b = _case(tmp_path, "a"), _case(tmp_path, "b")
    merge_cohort_statistics(table, b)
    merge_cohort_statistics(table, a)
    a["structures"]["liver"]["voxel_count"] = 999  # a re-run of case a replaces its rows
    merge_cohort_statistics(table, a)
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["case_id"], r["structure"]) for r in rows] == [
        ("a", "liver"), ("a", "liver_tumor"), ("b", "liver"), ("b", "liver_tumor"),
    ]  # fmt: skip
    assert rows[0]["voxel_count"] == "999"


def test_cohort_table_with_concurrent_writers(tmp_path: Path) -> None:
    table = tmp_path / "statistics.csv"
    base = _case(tmp_path)
    cases = [dict(base, case_id=f"case{i:02d}") for i in range(8)]
    errors: list[BaseException] = []

    def run(stats: dict) -> None:
        try:
            merge_cohort_statistics(table, stats)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted({r["case_id"] for r in rows}) == [f"case{i:02d}" for i in range(8)]
    assert len(rows) == 16


def test_cohort_refuses_a_foreign_table(tmp_path: Path) -> None:
    table = tmp_path / "statistics.csv"
    table.write_text("name,value\nx,1\n")
    with pytest.raises(OutputError, match="not a uniseg statistics table"):
        merge_cohort_statistics(table, _case(tmp_path))
