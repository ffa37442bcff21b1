"""DICOM studies: choosing one series per channel from a folder of several (issue 23, item 1).

Each rule of ``io.dicom_select`` is checked alone on listing facts, then on study folders the
tests build (a few 16x16 slices): localizer + thick + thin + reformat + dose screenshot picks
the thin axial series; ``--series`` overrides; no usable series is a one-line error; a CT+PET
task takes one series per modality.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")  # the 'dicom' extra; CI installs it
pytest.importorskip("highdicom")

from dicom_build import make_series  # noqa: E402
from unisegcli.errors import ChannelError  # noqa: E402
from unisegcli.io.dicom import DicomSeriesError, read_dicom  # noqa: E402
from unisegcli.io.dicom_select import exclusion, _rank  # noqa: E402
from unisegcli.io.dicom_series import SeriesInfo  # noqa: E402

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BASE = SeriesInfo(uid="1.1", description="AX 1mm", number=3, modality="CT", slice_count=300, subfolder=None,
                  image_type="ORIGINAL\\PRIMARY\\AXIAL", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                  plane="axial", thickness_mm=1.0)


@pytest.mark.parametrize(("change", "channel", "expected"), [
    ({}, "ct", None),
    ({"modality": "MR"}, "ct", "modality MR, expected CT"),
    ({"modality": "PT"}, "pet", None),
    ({"modality": "CT"}, "pet", "modality CT, expected PT"),
    ({"modality": "SEG"}, None, "modality SEG is not an image"),
    ({"image_type": "ORIGINAL\\PRIMARY\\LOCALIZER"}, "ct", "localizer"),
    ({"description": "Topogram 0.6 T20f"}, "ct", "localizer"),
    ({"sop_class_uid": SECONDARY_CAPTURE}, "ct", "secondary capture"),
    ({"slice_count": 2}, "ct", "2 slice(s), expected at least 3"),
    ({"has_geometry": False}, "ct", "no slice position/orientation"),
])  # fmt: skip
def test_each_exclusion_rule(change: dict, channel: str | None, expected: str | None) -> None:
    assert exclusion(replace(BASE, **change), channel) == expected


@pytest.mark.parametrize(("worse", "why"), [
    ({"image_type": "DERIVED\\SECONDARY\\REFORMATTED", "slice_count": 900}, "derived before more slices"),
    ({"plane": "coronal", "slice_count": 900}, "coronal before more slices"),
    ({"slice_count": 60, "thickness_mm": 0.5}, "fewer slices before thinner ones"),
    ({"thickness_mm": 2.0}, "thicker at the same count"),
    ({"number": 4, "uid": "0.9"}, "higher series number"),
    ({"modality": "PT", "attenuation_corrected": False, "slice_count": 900}, "PET without attenuation correction"),
])  # fmt: skip
def test_each_preference_rule_in_order(worse: dict, why: str) -> None:
    assert _rank(BASE) < _rank(replace(BASE, **worse)), why


def _study(root: Path) -> dict[str, str]:
    """A CT study: localizer, thick axial, thin axial, coronal reformat, dose screenshot."""
    common = {"study_uid": "1.2.826.0.1.3680043.8.498.1", "frame_uid": "1.2.826.0.1.3680043.8.498.2"}
    uids = {
        "localizer": make_series(root / "1", shape=(16, 16, 1), number=1, description="Topogram",
                                 image_type="ORIGINAL\\PRIMARY\\LOCALIZER", **common)[0],
        "thick": make_series(root / "2", shape=(16, 16, 4), spacing_mm=(1, 1, 6.0), number=2,
                             description="AX 6mm", **common)[0],
        "thin": make_series(root / "3", shape=(16, 16, 12), spacing_mm=(1, 1, 2.0), number=5,
                            description="AX 2mm", **common)[0],
        "coronal": make_series(root / "4", shape=(16, 24, 16), orientation=(1, 0, 0, 0, 0, -1), number=4,
                               description="COR MPR", image_type="DERIVED\\SECONDARY\\REFORMATTED", **common)[0],
        "dose": make_series(root / "5", shape=(16, 16, 3), number=6, description="Dose report",
                            sop_class=SECONDARY_CAPTURE, modality="CT", **common)[0],
    }
    return uids


def test_study_folder_takes_the_thin_axial_series(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    uids = _study(tmp_path / "study")
    scan, source = read_dicom(tmp_path / "study", channels=("ct",))
    assert source.series_instance_uid == uids["thin"]
    assert scan.file_shape == (16, 16, 12)
    (choice,) = source.choices
    assert choice.info.uid == uids["thin"] and choice.seen == 5 and choice.channel == "ct"
    line = choice.line()
    assert "\n" not in line and "'AX 2mm'" in line and "of 5 series" in line
    assert "most slices (12; #2 has 4)" in line  # the rule that decided against the runner-up
    assert "#1 (localizer)" in line and "#6 (secondary capture)" in line
    record = choice.as_dict()
    assert record["series_instance_uid"] == uids["thin"] and record["slices"] == 12
    assert record["slice_spacing_mm"] == pytest.approx(2.0) and record["plane"] == "axial"
    for text in (line, str(record), caplog.text):
        assert "ZZSENTINEL" not in text and "SENTINELID77" not in text
    # The choice does not depend on the task's channel being known.
    assert read_dicom(tmp_path / "study")[1].series_instance_uid == uids["thin"]


def test_series_option_overrides_the_rules(tmp_path: Path) -> None:
    uids = _study(tmp_path / "study")
    scan, source = read_dicom(tmp_path / "study", series_uid=uids["thick"], channels=("ct",))
    assert source.series_instance_uid == uids["thick"] and scan.file_shape == (16, 16, 4)
    assert source.choices == ()  # nothing was chosen: the user named the series


def test_no_usable_series_is_one_line_listing_what_was_seen(tmp_path: Path) -> None:
    root = tmp_path / "study"
    scout = make_series(root / "1", shape=(16, 16, 2), number=1, description="Scout",
                        image_type="ORIGINAL\\PRIMARY\\LOCALIZER")[0]
    mr = make_series(root / "2", number=2, modality="MR", description="T2 AX")[0]
    with pytest.raises(DicomSeriesError) as info:
        read_dicom(root, channels=("ct",))
    message = str(info.value)
    assert "\n" not in message and "no usable DICOM series for channel 'ct' among 2" in message
    assert f"{scout}: #1 'Scout' CT axial, 2 slice(s)" in message and "(localizer)" in message
    assert f"{mr}: #2 'T2 AX' MR" in message and "(modality MR, expected CT)" in message
    assert "--series UID" in message and "ZZSENTINEL" not in message
    assert {s.uid for s in info.value.series} == {scout, mr}


def test_ct_pet_task_takes_one_series_per_modality(tmp_path: Path) -> None:
    root = tmp_path / "petct"
    common = {"study_uid": "1.2.3.4", "frame_uid": "1.2.3.5"}
    ct, ct_values = make_series(root / "ct", modality="CT", description="CT AC", number=2, **common)
    pet, pet_values = make_series(root / "pet", modality="PT", description="PET AC", number=3,
                                  values=np.flip(make_series(tmp_path / "scratch")[1], 0),
                                  extra={"CorrectedImage": ["DECY", "ATTN"]}, **common)
    make_series(root / "nac", modality="PT", description="PET NAC", number=1, extra={"CorrectedImage": ["DECY"]},
                **common)
    make_series(root / "loc", modality="CT", description="Topogram", number=1, shape=(16, 16, 1), **common)
    scan, source = read_dicom(root, channels=("ct", "pet"))
    assert [c.info.uid for c in source.choices] == [ct, pet]
    assert source.choices[1].reason.startswith("attenuation-corrected PET (#1 is not)")
    assert source.channel_names == ("ct", "pet") and source.series_instance_uid == ct
    assert scan.data.shape[0] == 2
    for channel, values in enumerate((ct_values, pet_values)):
        stored = scan.reorientation.to_file(scan.data[channel])
        np.testing.assert_array_equal(stored, values[:, ::-1].astype(np.float32))
    # A PET on another grid is not silently resampled.
    make_series(tmp_path / "other" / "ct", modality="CT", number=2)
    make_series(tmp_path / "other" / "pet", modality="PT", number=3, spacing_mm=(2.0, 2.0, 3.0))
    with pytest.raises(ChannelError, match="not on the grid"):
        read_dicom(tmp_path / "other", channels=("ct", "pet"))
    with pytest.raises(DicomSeriesError, match="for channel 'pet'"):
        read_dicom(root / "ct", channels=("ct", "pet"))  # one CT series: no PET to take


def test_predict_inputs_choose_series_by_channel(tmp_path: Path) -> None:
    """``Segmenter.predict`` takes a study path (series per task channel) or a channel mapping."""
    from unisegcli.io.cases import case_in_memory

    root = tmp_path / "petct"
    ct, ct_values = make_series(root / "ct", modality="CT", number=2)
    pet, pet_values = make_series(root / "pet", modality="PT", number=3, values=make_series(tmp_path / "x")[1] * 2)
    loaded = case_in_memory(root, channels=("ct", "pet"))
    assert loaded.channel_names == ("ct", "pet") and loaded.scan.data.shape[0] == 2
    loaded = case_in_memory({"pet": root, "ct": root})  # each part chooses for its own channel
    assert loaded.channel_names == ("pet", "ct") and loaded.dicom.series_instance_uid == pet
    for channel, values in enumerate((pet_values, ct_values)):
        stored = loaded.scan.reorientation.to_file(loaded.scan.data[channel])
        np.testing.assert_array_equal(stored, values[:, ::-1].astype(np.float32))


@pytest.mark.parametrize(("tags", "plane", "spacing"), [
    ({"ImageOrientationPatient": ["0"] * 6, "SliceThickness": "2"}, None, None),
    ({"ImageOrientationPatient": ["1", "0", "0", "0", "1e300", "0"]}, None, None),
    ({"ImageOrientationPatient": ["1", "0", "0", "0", "0", "1"], "SliceThickness": "nan"}, "coronal", None),
    ({"ImageOrientationPatient": ["0", "1", "0", "0", "0", "-1"], "SliceThickness": "1e400"}, "sagittal", None),
    ({"ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"], "SliceThickness": "abc"}, "axial", None),
    ({"ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"], "SliceThickness": "1.25"}, "axial", 1.25),
])  # fmt: skip
def test_garbled_geometry_tags_describe_without_failing(tags: dict, plane, spacing) -> None:
    """Selection reads only headers and must survive any of them; its record is valid JSON."""
    import json

    from pydicom.dataset import Dataset

    from unisegcli.io.dicom_select import SeriesChoice, describe_series

    ds = Dataset()
    ds.Modality, ds.SeriesNumber, ds.Rows, ds.Columns = "CT", 4, 8, 8
    for keyword, value in tags.items():
        ds.add_new(keyword, "LO", "\\".join(value) if isinstance(value, list) else value)
    info = describe_series("1.2", [("a", ds), ("b", ds), ("c", ds)])
    assert (info.plane, info.thickness_mm) == (plane, spacing)
    assert info.has_geometry is False  # no ImagePositionPatient
    json.dumps(SeriesChoice("ct", info, "r", 1).as_dict(), allow_nan=False)


def test_a_cohort_folder_gives_one_case_per_study(tmp_path: Path) -> None:
    """cohort/<patient>/<study>/<series>: one case per study, ids unique, series chosen later."""
    from unisegcli.io.discovery import discover

    cohort = tmp_path / "cohort"
    make_series(cohort / "p1" / "CT" / "thin", study_uid="1.1", number=2, shape=(16, 16, 8))
    make_series(cohort / "p1" / "CT" / "scout", study_uid="1.1", number=1, shape=(16, 16, 1),
                image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    make_series(cohort / "p2" / "CT" / "a", study_uid="2.1", number=2)  # p2 had two studies
    make_series(cohort / "p2" / "CT2" / "a", study_uid="2.2", number=2)
    make_series(cohort / "p3" / "series", study_uid="3.1", number=2)
    (cohort / "p4").mkdir()  # a patient folder without images
    (cohort / "notes.txt").write_text("not DICOM")
    (cohort / "p3" / "loop").symlink_to(cohort, target_is_directory=True)  # never followed
    cases = discover([cohort])
    assert [(c.case_id, c.path.relative_to(cohort).as_posix(), c.dicom) for c in cases] == [
        ("p1", "p1", True), ("p2_CT", "p2/CT", True), ("p2_CT2", "p2/CT2", True), ("p3", "p3", True)]
    scan, source = read_dicom(cohort / "p1", channels=("ct",))
    assert scan.file_shape == (16, 16, 8) and source.choices[0].seen == 2
    # One study given directly stays one case, named after its folder.
    assert [c.case_id for c in discover([cohort / "p1"])] == ["p1"]


def test_cohort_of_studies_through_the_cli(tmp_path: Path, threshold_net) -> None:
    """A batch of study folders runs: series chosen per study; a study with blank UIDs fails
    alone, before its network work, with the attributes named."""
    import json

    from typer.testing import CliRunner

    from unisegcli.cli.app import app

    cohort = tmp_path / "cohort"
    thin = make_series(cohort / "p1" / "thin", study_uid="1.1", number=2, shape=(32, 32, 8))[0]
    make_series(cohort / "p1" / "scout", study_uid="1.1", number=1, shape=(32, 32, 1),
                image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    make_series(cohort / "p2" / "anon", shape=(32, 32, 6), blank=("StudyInstanceUID", "SOPClassUID"),
                blank_meta=True)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [str(cohort), "-o", str(out), "--tasks", "liver", "--output-type", "dicom-seg",
                                      "--json"])
    assert result.exit_code == 6, result.output  # PARTIAL: p2 failed, p1 written
    events = [json.loads(line) for line in result.stdout.splitlines()]
    done = [e for e in events if e["event"] == "case_done"]
    assert [e["case_id"] for e in done] == ["p1"] and done[0]["input_series"][0]["series_instance_uid"] == thin
    assert (out / "p1" / "segmentation.dcm").is_file()
    failed = [e for e in events if e["event"] == "case_failed"]
    assert [e["case_id"] for e in failed] == ["p2"] and failed[0]["exit_code"] == 3
    assert "StudyInstanceUID, SOPClassUID" in failed[0]["message"]
    assert not (out / "p2").exists() or list((out / "p2").iterdir()) == []
    statistics = json.loads((out / "p1" / "statistics.json").read_text())
    assert statistics["input_series"][0]["reason"].startswith("the only usable series; excluded #1 (localizer)")


def test_the_choice_line_never_carries_patient_data(tmp_path: Path) -> None:
    """Exports sometimes put the patient's name into descriptions: the line masks it."""
    root = tmp_path / "study"
    make_series(root / "a", study_uid="1.9", number=2, shape=(16, 16, 8), description="QQPRIVATE thin")
    make_series(root / "b", study_uid="1.9", number=3, description="ZZSENTINEL thick")
    _, source = read_dicom(root, channels=("ct",))
    record = source.choices[0].as_dict()
    for text in (source.choices[0].line(), str(record)):
        assert "<redacted> thin" in text and "QQPRIVATE" not in text and "ZZSENTINEL" not in text
