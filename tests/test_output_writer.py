"""write_case_outputs: selection, cleanup, exact geometry, all-or-nothing writes, cohort table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import assert_same_geometry, save_nifti
from unisegcli.errors import OutputError, UsageError
from unisegcli.io.nifti import Scan, read_scan
from unisegcli.outputs.writer import OutputOptions, select_structures, write_case_outputs

TASK_OF = {"liver": "liver", "liver_tumor": "liver", "spleen": "spleen"}


def _lps_aniso_affine() -> np.ndarray:
    """LPS-stored (x and y flipped), anisotropic, slice axis first, slightly oblique."""
    a = np.deg2rad(7.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.array([[0, -0.75, 0], [0, 0, -0.75], [2.5, 0, 0]], dtype=float)
    aff[:3, 3] = (30.0, 20.0, -40.0)
    return aff


@pytest.fixture
def case(tmp_path: Path) -> tuple[Path, Scan, dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    data = rng.normal(50, 40, size=(9, 22, 20)).astype(np.float32)
    src = save_nifti(tmp_path / "case01.nii.gz", data, _lps_aniso_affine(), qcode=1, scode=1)
    scan = read_scan(src)
    shape = scan.data.shape[1:]
    liver = np.zeros(shape, bool)
    liver[2:7, 3:12, 4:15] = True
    liver[0, 0, 0] = True  # a stray voxel: a second component
    tumor = np.zeros(shape, bool)
    tumor[3:5, 5:8, 6:9] = True
    spleen = np.zeros(shape, bool)
    return src, scan, {"liver": liver, "liver_tumor": tumor, "spleen": spleen}


def test_masks_keep_the_input_geometry_exactly(tmp_path: Path, case) -> None:
    src, scan, masks = case
    out = write_case_outputs(scan, masks, tmp_path / "out", OutputOptions(), task_of=TASK_OF)
    original = nib.load(str(src))
    assert set(out.masks) == set(masks)
    for name, path in out.masks.items():
        written = nib.load(str(path))
        assert written.shape == original.shape
        assert_same_geometry(written, original)
        expected = scan.reorientation.to_file(masks[name]).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
    voxel_ml = abs(np.linalg.det(original.affine[:3, :3])) / 1000
    assert out.volumes_ml["liver"] == pytest.approx((5 * 9 * 11 + 1) * voxel_ml)
    assert out.volumes_ml["spleen"] == 0.0
    stats = json.loads(out.statistics_json.read_text())
    assert stats["case_id"] == "case01"
    assert stats["structures"]["liver"]["components"] == 2
    assert out.preview is None and out.multilabel is None and out.dicom is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in out.files)


def test_structures_filter_and_did_you_mean(tmp_path: Path, case) -> None:
    _, scan, masks = case
    out = write_case_outputs(scan, masks, tmp_path / "out", OutputOptions(structures=("Liver-Tumor",)), task_of=TASK_OF)
    assert list(out.masks) == ["liver_tumor"]
    assert not (tmp_path / "out" / "liver.nii.gz").exists()
    with pytest.raises(UsageError, match="did you mean 'liver_tumor'"):
        write_case_outputs(scan, masks, tmp_path / "bad", OutputOptions(structures=("liver_tumour",)), task_of=TASK_OF)
    assert not (tmp_path / "bad").exists()
    assert select_structures(("spleen", "liver"), list(masks)) == ("liver", "spleen")  # pipeline order
    with pytest.raises(UsageError, match="empty"):
        OutputOptions(structures=()).check()


def test_cleanup_changes_masks_and_volumes(tmp_path: Path, case) -> None:
    _, scan, masks = case
    out = write_case_outputs(scan, masks, tmp_path / "out", OutputOptions(largest_component=True), task_of=TASK_OF)
    liver = np.asarray(nib.load(str(out.masks["liver"])).dataobj)
    assert liver.sum() == 5 * 9 * 11  # the stray voxel is gone
    voxel_ml = abs(np.linalg.det(scan.image.affine[:3, :3])) / 1000
    small = OutputOptions(min_component_ml=(3 * 3 * 2 + 1) * voxel_ml)  # drops the 18-voxel tumour
    out = write_case_outputs(scan, masks, tmp_path / "out2", small, task_of=TASK_OF)
    assert out.volumes_ml["liver_tumor"] == 0.0
    assert out.volumes_ml["liver"] == pytest.approx(5 * 9 * 11 * voxel_ml)
    assert json.loads(out.statistics_json.read_text())["structures"]["liver"]["components"] == 1


def test_everything_or_nothing(tmp_path: Path, case, monkeypatch) -> None:
    """A failure while writing the last file (the preview) leaves no file of the case."""
    from PIL import Image

    _, scan, masks = case

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    folder = tmp_path / "out"
    options = OutputOptions(preview=True, multilabel=True)
    with pytest.raises(OutputError, match="No space left"):
        write_case_outputs(scan, masks, folder, options, task_of=TASK_OF)
    assert list(folder.iterdir()) == []  # no masks, no statistics, no temp files


def test_all_outputs_together(tmp_path: Path, case) -> None:
    _, scan, masks = case
    options = OutputOptions(preview=True, multilabel=True)
    out = write_case_outputs(scan, masks, tmp_path / "out", options, task_of=TASK_OF, modality="CT")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(
        ["liver.nii.gz", "liver_tumor.nii.gz", "spleen.nii.gz", "segmentation.nii.gz", "labels.json",
         "statistics.json", "statistics.csv", "preview.png"]
    )  # fmt: skip
    assert out.preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_statistics(tmp_path: Path, case) -> None:
    _, scan, masks = case
    out = write_case_outputs(scan, masks, tmp_path / "out", OutputOptions(statistics=False), task_of=TASK_OF)
    assert out.statistics_json is None and not (tmp_path / "out" / "statistics.json").exists()
    assert out.volumes_ml["liver"] > 0


def test_bad_options_are_usage_errors(tmp_path: Path, case) -> None:
    _, scan, masks = case
    with pytest.raises(UsageError, match="did you mean 'dicom-seg'"):
        write_case_outputs(scan, masks, tmp_path / "o", OutputOptions(output_type="dicom_seg"), task_of=TASK_OF)
    with pytest.raises(UsageError, match="needs a DICOM input"):
        write_case_outputs(scan, masks, tmp_path / "o", OutputOptions(output_type="dicom-seg"), task_of=TASK_OF)
    with pytest.raises(UsageError, match="min-component-ml"):
        write_case_outputs(scan, masks, tmp_path / "o", OutputOptions(min_component_ml=-1), task_of=TASK_OF)
    with pytest.raises(OutputError, match="segmentation.nii.gz"):
        write_case_outputs(
            scan, {"segmentation": masks["liver"]}, tmp_path / "o", OutputOptions(multilabel=True), task_of={}
        )
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_cohort_table_in_the_output_root(tmp_path: Path, case) -> None:
    _, scan, masks = case
    root = tmp_path / "out"
    for case_id in ("b", "a", "b"):
        write_case_outputs(
            scan, masks, root / case_id, OutputOptions(), task_of=TASK_OF, case_id=case_id, cohort_folder=root
        )
    with (root / "statistics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["case_id"], r["structure"]) for r in rows] == [
        (c, s) for c in ("a", "b") for s in ("liver", "liver_tumor", "spleen")
    ]
    with (root / "a" / "statistics.csv").open(newline="") as fh:
        case_rows = list(csv.DictReader(fh))
    assert case_rows == [r for r in rows if r["case_id"] == "a"]


@pytest.mark.parametrize("largest", [False, True])
def test_masks_from_label_maps_write_the_same_files(tmp_path: Path, case, largest) -> None:
    """run_case hands the writer lazy masks (label_map == label); the outputs must not change."""
    from unisegcli.outputs.masks import LabelMasks

    _, scan, masks = case
    liver_map = masks["liver"].astype(np.uint8) + masks["liver_tumor"]  # 1 liver, 2 tumour
    lazy = LabelMasks({"liver": liver_map, "spleen": masks["spleen"].astype(np.uint8)},
                      {"liver": ("liver", 1), "liver_tumor": ("liver", 2), "spleen": ("spleen", 1)})
    eager = {"liver": liver_map == 1, "liver_tumor": liver_map == 2, "spleen": masks["spleen"]}
    assert list(lazy) == list(eager) and all(np.array_equal(lazy[n], eager[n]) for n in eager)
    options = OutputOptions(multilabel=True, largest_component=largest)
    a = write_case_outputs(scan, eager, tmp_path / "a", options, task_of=TASK_OF)
    b = write_case_outputs(scan, lazy, tmp_path / "b", options, task_of=TASK_OF)
    assert a.volumes_ml == b.volumes_ml
    for name in ["liver.nii.gz", "liver_tumor.nii.gz", "spleen.nii.gz", "segmentation.nii.gz",
                 "statistics.json"]:
        left, right = (tmp_path / d / name for d in "ab")
        if name.endswith(".json"):
            assert json.loads(left.read_text())["structures"] == json.loads(right.read_text())["structures"]
        else:
            assert np.array_equal(np.asarray(nib.load(left).dataobj), np.asarray(nib.load(right).dataobj))
