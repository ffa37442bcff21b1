"""--multilabel: one label map 1..N + labels.json; overlapping structures: first listed wins."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import make_affine, save_nifti
from unisegcli.io.nifti import read_scan
from unisegcli.outputs.multilabel import build_multilabel, multilabel_image
from unisegcli.outputs.writer import OutputOptions, write_case_outputs


def _overlapping() -> dict[str, np.ndarray]:
    organ = np.zeros((10, 12, 14), bool)
    organ[2:8, 2:8, 2:8] = True  # task "organs", listed first
    tumor = np.zeros_like(organ)
    tumor[6:9, 6:9, 6:9] = True  # task "tumors": 2×2×2 of its 27 voxels overlap the organ
    other = np.zeros_like(organ)
    other[0, 0, 0] = True
    return {"organ": organ, "tumor": tumor, "spot": other}


TASK_OF = {"organ": "organs", "tumor": "tumors", "spot": "tumors"}


def test_ids_follow_order_and_first_listed_wins() -> None:
    masks = _overlapping()
    ml = build_multilabel(masks, TASK_OF)
    assert ml.labels_zyx.dtype == np.uint8
    assert {i: e["name"] for i, e in ml.table.items()} == {1: "organ", 2: "tumor", 3: "spot"}
    assert ml.table[2]["task"] == "tumors"
    overlap = masks["organ"] & masks["tumor"]
    assert overlap.sum() == 8
    assert (ml.labels_zyx[overlap] == 1).all()  # the structure listed first keeps the voxel
    assert (ml.labels_zyx[masks["tumor"] & ~overlap] == 2).all()
    assert ml.table[2]["voxels_lost_to_overlap"] == 8 and ml.table[1]["voxels_lost_to_overlap"] == 0
    assert (ml.labels_zyx[masks["spot"]] == 3).all()
    assert int((ml.labels_zyx > 0).sum()) == int((masks["organ"] | masks["tumor"] | masks["spot"]).sum())

    # Listing the tumour first makes it win instead.
    swapped = build_multilabel({"tumor": masks["tumor"], "organ": masks["organ"]}, TASK_OF)
    assert (swapped.labels_zyx[overlap] == 1).all() and swapped.table[1]["name"] == "tumor"


def test_more_than_255_structures_widen_the_dtype() -> None:
    masks = {f"s{i}": np.zeros((2, 2, 70), bool) for i in range(300)}
    for i, mask in enumerate(masks.values()):
        mask.flat[i % mask.size] = True
    ml = build_multilabel(masks)
    assert ml.labels_zyx.dtype == np.uint16 and int(ml.labels_zyx.max()) == 280


def test_written_map_keeps_geometry_and_per_structure_files_keep_overlaps(tmp_path: Path) -> None:
    data = np.zeros((14, 12, 10), np.float32)  # file order for an 'aniso' (slice-first) affine
    src = save_nifti(tmp_path / "in.nii.gz", data, make_affine("aniso"))
    scan = read_scan(src)
    masks = {n: np.zeros(scan.data.shape[1:], bool) for n in ("organ", "tumor")}
    masks["organ"][2:6, 2:8, 2:8] = True
    masks["tumor"][4:8, 6:10, 6:10] = True
    out = write_case_outputs(scan, masks, tmp_path / "out", OutputOptions(multilabel=True), task_of=TASK_OF)
    assert out.multilabel == tmp_path / "out" / "segmentation.nii.gz"
    seg = nib.load(str(out.multilabel))
    src_img = nib.load(str(src))
    assert seg.shape == src_img.shape
    np.testing.assert_array_equal(seg.affine, src_img.affine)
    assert seg.get_data_dtype() == np.uint8
    labels = np.asarray(seg.dataobj)
    expected = build_multilabel(masks, TASK_OF).labels_zyx
    np.testing.assert_array_equal(labels, scan.reorientation.to_file(expected))
    table = json.loads(out.labels_json.read_text())
    assert table["labels"]["1"] == {"name": "organ", "task": "organs", "voxels_lost_to_overlap": 0}
    assert table["labels"]["2"]["name"] == "tumor" and table["labels"]["2"]["voxels_lost_to_overlap"] > 0
    assert "first listed wins" in table["overlap_rule"]
    tumor_file = np.asarray(nib.load(str(out.masks["tumor"])).dataobj).astype(bool)
    np.testing.assert_array_equal(tumor_file, scan.reorientation.to_file(masks["tumor"]))  # overlap kept


def test_uint16_map_keeps_geometry(tmp_path: Path) -> None:
    scan = read_scan(save_nifti(tmp_path / "in.nii.gz", np.zeros((4, 5, 30), np.float32), make_affine("lps")))
    masks = {f"s{i}": np.zeros(scan.data.shape[1:], bool) for i in range(260)}
    for i, mask in enumerate(masks.values()):
        mask.flat[i] = True
    path = tmp_path / "seg.nii.gz"
    nib.save(multilabel_image(build_multilabel(masks), scan), str(path))
    image = nib.load(str(path))
    assert image.get_data_dtype() == np.uint16 and int(np.asarray(image.dataobj).max()) == 260
    np.testing.assert_array_equal(image.affine, scan.image.affine)


def test_empty_input_is_refused() -> None:
    with pytest.raises(ValueError):
        build_multilabel({})
