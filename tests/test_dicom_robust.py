"""DICOM robustness (issue 23, item 2): compressed transfer syntaxes through reading, DICOM SEG
and RTSTRUCT; an enhanced multi-frame CT; series with empty UIDs; the stored voxel order of
masks for a DICOM input (dcm2niix's, checked against dicom2nifti's conversion)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")  # the 'dicom' extra; CI installs it
hd = pytest.importorskip("highdicom")

from pydicom.uid import (  # noqa: E402
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from dicom_build import gdcm_recompress, make_series  # noqa: E402
from unisegcli.io.dicom import read_dicom  # noqa: E402
from unisegcli.outputs.dicom_out import DicomReferenceError  # noqa: E402
from unisegcli.outputs.writer import OutputOptions, write_case_outputs  # noqa: E402

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
SHAPE = (32, 32, 5)  # JPEG 2000's default 6 resolution levels need 32 pixels


def _masks(scan) -> dict[str, np.ndarray]:
    """An off-centre box (so a flip shows) and an empty structure, internal [Z, Y, X]."""
    box = np.zeros(scan.data.shape[1:], bool)
    box[1:3, 4:11, 20:27] = True
    return {"liver": box, "spleen": np.zeros_like(box)}


def _world_centroid_lps(mask_ijk: np.ndarray, affine_ras: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask_ijk).mean(axis=0)
    return (LPS @ affine_ras @ np.append(ijk, 1.0))[:3]


def _seg_volume_check(seg_path: Path, mask_zyx: np.ndarray, scan) -> None:
    """The SEG's frames, placed by highdicom in patient space, hold the mask where it is."""
    seg = hd.seg.segread(seg_path)
    volume = seg.get_volume(segment_numbers=[1], combine_segments=False)
    frames = np.asarray(volume.array)[..., 0] > 0  # (slice, row, column) in volume.affine's LPS
    assert frames.sum() == mask_zyx.sum()
    expected = _world_centroid_lps(scan.reorientation.to_file(mask_zyx), np.asarray(scan.image.affine))
    got = (np.asarray(volume.affine) @ np.append(np.argwhere(frames).mean(axis=0), 1.0))[:3]
    np.testing.assert_allclose(got, expected, atol=1e-3)


def _compress(folder: Path, syntax: str) -> None:
    if syntax == "jpeg-lossless":
        pytest.importorskip("gdcm")  # pydicom has no JPEG lossless encoder; GDCM has
        make_series(folder, shape=SHAPE)
        gdcm_recompress(folder)
    else:
        make_series(folder, shape=SHAPE, syntax=syntax)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian,
                                    "jpeg-lossless"], ids=["rle", "jpeg-ls", "jpeg2000", "deflate", "jpeg-lossless"])
def test_compressed_series_read_seg_and_rtstruct(tmp_path: Path, syntax: str) -> None:
    _compress(tmp_path / "series", syntax)
    first = pydicom.dcmread(next((tmp_path / "series").iterdir()), stop_before_pixels=True)
    assert first.file_meta.TransferSyntaxUID != "1.2.840.10008.1.2.1"  # really not plain explicit VR
    scan, source = read_dicom(tmp_path / "series")
    expected = make_series(tmp_path / "plain", shape=SHAPE)[1]
    np.testing.assert_array_equal(scan.reorientation.to_file(scan.data[0]), expected[:, ::-1].astype(np.float32))
    masks = _masks(scan)
    seg = write_case_outputs(scan, masks, tmp_path / "seg", OutputOptions(output_type="dicom-seg"),
                             task_of={n: "t" for n in masks}, dicom_source=source)
    _seg_volume_check(seg.dicom, masks["liver"], scan)
    rt = write_case_outputs(scan, masks, tmp_path / "rt", OutputOptions(output_type="rtstruct"),
                            task_of={n: "t" for n in masks}, dicom_source=source)
    ds = pydicom.dcmread(rt.dicom)
    contours = ds.ROIContourSequence[0].ContourSequence
    assert len(contours) == 2  # the box spans two slices
    points = np.concatenate([np.array(c.ContourData, float).reshape(-1, 3) for c in contours])
    centre = _world_centroid_lps(scan.reorientation.to_file(masks["liver"]), np.asarray(scan.image.affine))
    np.testing.assert_allclose(points[:, :2].min(0) + points[:, :2].max(0), 2 * centre[:2], atol=1e-2)


@pytest.mark.parametrize("syntax", [None, RLELossless], ids=["uncompressed", "rle"])
def test_enhanced_multiframe_ct_reads_and_writes_seg_and_rtstruct(tmp_path: Path, caplog, syntax) -> None:
    caplog.set_level("CRITICAL")  # highdicom's conversion notes, not ours
    _, values = make_series(tmp_path / "classic", shape=(16, 16, 6))
    legacy = [pydicom.dcmread(p) for p in sorted((tmp_path / "classic").iterdir())]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(legacy, generate_uid(), 7, generate_uid(), 1)
    if syntax is not None:
        enhanced.compress(syntax, generate_instance_uid=False)
    (tmp_path / "mf").mkdir()
    enhanced.save_as(tmp_path / "mf" / "enhanced.dcm", enforce_file_format=True)
    scan, source = read_dicom(tmp_path / "mf")
    assert source.multiframe
    assert source.datasets[0].file_meta.TransferSyntaxUID == (syntax or enhanced.file_meta.TransferSyntaxUID)
    np.testing.assert_array_equal(scan.reorientation.to_file(scan.data[0]), values[:, ::-1].astype(np.float32))
    box = np.zeros(scan.data.shape[1:], bool)
    box[1:4, 2:6, 9:14] = True
    masks = {"liver": box}
    out = write_case_outputs(scan, masks, tmp_path / "seg", OutputOptions(output_type="dicom-seg"),
                             task_of={"liver": "t"}, dicom_source=source)
    _seg_volume_check(out.dicom, box, scan)
    seg = hd.seg.segread(out.dicom)
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        enhanced.SOPInstanceUID
    rt = write_case_outputs(scan, masks, tmp_path / "rt", OutputOptions(output_type="rtstruct"),
                            task_of={"liver": "t"}, dicom_source=source)
    contours = pydicom.dcmread(rt.dicom).ROIContourSequence[0].ContourSequence
    assert len(contours) == 3  # the box spans three slices, one contour each
    normal = np.cross(*(np.array(enhanced.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                                 .ImageOrientationPatient, float).reshape(2, 3)))
    frame_positions = [np.array(f.PlanePositionSequence[0].ImagePositionPatient, float) @ normal
                       for f in enhanced.PerFrameFunctionalGroupsSequence]
    for contour in contours:  # each contour lies on the frame it references
        ref = contour.ContourImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
        points = np.array(contour.ContourData, float).reshape(-1, 3)
        np.testing.assert_allclose(points @ normal, frame_positions[int(ref.ReferencedFrameNumber) - 1], atol=1e-2)
    points = np.concatenate([np.array(c.ContourData, float).reshape(-1, 3) for c in contours])
    centre = _world_centroid_lps(scan.reorientation.to_file(box), np.asarray(scan.image.affine))
    np.testing.assert_allclose(points.min(0) + points.max(0), 2 * centre, atol=1e-2)


BLANKED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def test_empty_uids_read_but_dicom_outputs_refuse_naming_them(tmp_path: Path) -> None:
    """The anonymised JPEG 2000 series of issue 23: reading works; SEG/RTSTRUCT stop with an
    input error naming the blank attributes, never highdicom's KeyError: ''."""
    make_series(tmp_path / "anon", shape=SHAPE, syntax=JPEG2000Lossless, blank=BLANKED, blank_meta=True)
    scan, source = read_dicom(tmp_path / "anon")
    assert scan.file_shape == SHAPE and source.series_instance_uid == "" and source.repairs == ()
    for output_type in ("dicom-seg", "rtstruct"):
        with pytest.raises(DicomReferenceError) as info:
            write_case_outputs(scan, _masks(scan), tmp_path / output_type, OutputOptions(output_type=output_type),
                               task_of={}, dicom_source=source)
        message = str(info.value)
        assert "\n" not in message and "--output-type nifti" in message
        for keyword in BLANKED:
            assert keyword in message
        assert "FrameOfReferenceUID" not in message  # it was kept
        assert not (tmp_path / output_type).exists()


def test_blank_sop_uids_are_repaired_from_the_file_meta(tmp_path: Path) -> None:
    make_series(tmp_path / "anon", shape=SHAPE, blank=("SOPInstanceUID", "SOPClassUID"))
    scan, source = read_dicom(tmp_path / "anon")
    assert source.repairs == ("SOPClassUID from the file meta's MediaStorageSOPClassUID",
                              "SOPInstanceUID from the file meta's MediaStorageSOPInstanceUID")
    metas = {ds.file_meta.MediaStorageSOPInstanceUID for ds in source.datasets}
    out = write_case_outputs(scan, _masks(scan), tmp_path / "seg", OutputOptions(output_type="dicom-seg"),
                             task_of={}, dicom_source=source)
    seg = hd.seg.segread(out.dicom)
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == metas and "" not in referenced
    on_disk = pydicom.dcmread(next((tmp_path / "anon").iterdir()), stop_before_pixels=True)
    assert on_disk.SOPInstanceUID == ""  # the input is never touched


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 1, 0), (1, 0, 0, 0, 0.8, -0.6)], ids=["axial", "oblique"])
def test_stored_order_is_dcm2niix_and_dicom2nifti(tmp_path: Path, orientation) -> None:
    """The NIfTI masks of a DICOM input have the voxel order and affine of dcm2niix: columns,
    rows from the last, slices along row x column; dicom2nifti's LAS output agrees for axial."""
    _, values = make_series(tmp_path / "series", shape=(16, 12, 5), spacing_mm=(0.8, 0.7, 2.5),
                            orientation=orientation, origin_lps=(10.0, -20.0, 30.0))
    scan, source = read_dicom(tmp_path / "series")
    masks = {"liver": np.zeros(scan.data.shape[1:], bool)}
    masks["liver"][1:3, 2:5, 3:9] = True
    out = write_case_outputs(scan, masks, tmp_path / "out", OutputOptions(), task_of={"liver": "t"},
                             dicom_source=source)
    written = nib.load(str(out.masks["liver"]))
    # The documented rule, from the headers the test wrote.
    row, col = np.array(orientation[:3], float), np.array(orientation[3:], float)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * 0.8, -col * 0.7, np.cross(row, col) * 2.5
    lps[:3, 3] = np.array([10.0, -20.0, 30.0]) + 11 * 0.7 * col  # the last row comes first
    np.testing.assert_allclose(written.affine, LPS @ lps, atol=1e-3)
    assert written.shape == (16, 12, 5)
    np.testing.assert_array_equal(scan.reorientation.to_file(scan.data[0]), values[:, ::-1].astype(np.float32))
    if orientation != (1, 0, 0, 0, 1, 0):
        return
    dicom2nifti = pytest.importorskip("dicom2nifti")
    converted = dicom2nifti.convert_dicom.dicom_series_to_nifti(
        str(tmp_path / "series"), str(tmp_path / "d2n.nii.gz"), reorient_nifti=True)["NII"]
    np.testing.assert_allclose(written.affine, converted.affine, atol=1e-3)
    np.testing.assert_array_equal(scan.reorientation.to_file(scan.data[0]), np.asarray(converted.dataobj))
