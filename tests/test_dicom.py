"""DICOM input (folder/.zip, compressed syntaxes, checks, privacy) and DICOM SEG/RTSTRUCT output.

The series are built here with pydicom from a crop of the example CT, so the NIfTI and DICOM
paths can be compared voxel for voxel and in world geometry.
"""

from __future__ import annotations

import logging
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")  # the 'dicom' extra; CI installs it
pytest.importorskip("highdicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from conftest import DATA, save_nifti  # noqa: E402
from unisegcli.errors import InputError, UsageError  # noqa: E402
from unisegcli.io.dicom import (  # noqa: E402
    DicomArchiveError,
    DicomSeriesError,
    MissingSlicesError,
    is_dicom_input,
    read_dicom,
)
from unisegcli.io.nifti import read_scan  # noqa: E402
from unisegcli.outputs.writer import OutputOptions, write_case_outputs  # noqa: E402

SENTINEL = "ZZSENTINEL^QQPRIVATE"
SENTINEL_PARTS = ("ZZSENTINEL", "QQPRIVATE", "SENTINELID77", "19231231")
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def ct_nifti(tmp_path_factory) -> Path:
    """A 40×36×10 crop of the example CT stored LPS (as DICOM exports are), int16 HU."""
    image = nib.load(str(DATA / "example_ct.nii.gz"))
    crop = np.asarray(image.dataobj)[40:80, 30:66, 8:18].astype(np.int16)
    affine = image.affine @ np.array([[1, 0, 0, 40], [0, 1, 0, 30], [0, 0, 1, 8], [0, 0, 0, 1.0]])
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = (crop.shape[0] - 1, crop.shape[1] - 1)
    path = tmp_path_factory.mktemp("nifti") / "ct.nii.gz"
    return save_nifti(path, crop[::-1, ::-1, :].copy(), affine @ flip)


def write_series(
    folder: Path, nifti: Path, *, syntax: str | None = None, skip: tuple[int, ...] = (),
    description: str = "AX 3mm", patient_name: str = SENTINEL,
) -> str:  # fmt: skip
    """One CT file per slice k of the NIfTI (rows = j, columns = i); returns the series UID."""
    image = nib.load(str(nifti))
    volume = np.asarray(image.dataobj).astype(np.int16)
    lps = LPS @ image.affine
    row_cos, col_cos = lps[:3, 0] / np.linalg.norm(lps[:3, 0]), lps[:3, 1] / np.linalg.norm(lps[:3, 1])
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(0).permutation(volume.shape[2])  # file names do not follow position
    for number, k in enumerate(order):
        if k in skip:
            continue
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, "SENTINELID77", "19231231", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20240101", "101010", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = "CT", 3, number + 1, description
        ds.Manufacturer = "test"
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_cos, *col_cos)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in (lps @ np.array([0, 0, k, 1.0]))[:3]]
        ds.PixelSpacing = [f"{np.linalg.norm(lps[:3, 1]):.6f}", f"{np.linalg.norm(lps[:3, 0]):.6f}"]
        ds.SliceThickness = f"{np.linalg.norm(lps[:3, 2]):.4f}"
        stored = (volume[:, :, k].T + 1024).astype(np.int16)  # stored values, rescaled back below
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = stored.tobytes()
        if syntax is not None:
            ds.compress(syntax, stored)
        ds.save_as(folder / f"IM{number:04d}.dcm", enforce_file_format=True)
    return series


def _assert_same_scan(dicom_scan, nifti_scan) -> None:
    assert dicom_scan.data.shape == nifti_scan.data.shape
    np.testing.assert_allclose(dicom_scan.data, nifti_scan.data, atol=1e-3)
    np.testing.assert_allclose(
        dicom_scan.reorientation.internal_affine, nifti_scan.reorientation.internal_affine, atol=1e-3
    )
    assert dicom_scan.spacing_mm == pytest.approx(nifti_scan.spacing_mm, abs=1e-4)


@pytest.mark.parametrize("syntax", [None, JPEG2000Lossless], ids=["uncompressed", "jpeg2000"])
def test_series_reads_like_the_nifti(tmp_path: Path, ct_nifti: Path, syntax) -> None:
    uid = write_series(tmp_path / "series", ct_nifti, syntax=syntax)
    if syntax is not None:
        first = pydicom.dcmread(next((tmp_path / "series").glob("*.dcm")), stop_before_pixels=True)
        assert first.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert is_dicom_input(tmp_path / "series")
    scan, source = read_dicom(tmp_path / "series")
    _assert_same_scan(scan, read_scan(ct_nifti))
    assert source.series_instance_uid == uid and len(source.datasets) == 10
    positions = [float(ds.ImagePositionPatient[2]) for ds in source.datasets]
    assert positions == sorted(positions)  # k order, whatever the file names
    assert scan.path == tmp_path / "series"
    assert SENTINEL not in repr(source)


def test_zip_input_and_unsafe_archives(tmp_path: Path, ct_nifti: Path) -> None:
    write_series(tmp_path / "series", ct_nifti)
    archive = tmp_path / "case.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tmp_path / "series").iterdir()):
            zf.write(path, f"export/{path.name}")
    assert is_dicom_input(archive)
    scan, _ = read_dicom(archive)
    _assert_same_scan(scan, read_scan(ct_nifti))
    for bad in ("../evil.dcm", "/abs/evil.dcm", "a/../../evil.dcm"):
        evil = tmp_path / "evil.zip"
        with zipfile.ZipFile(evil, "w") as zf:
            zf.writestr("ok.txt", "x")
            zf.writestr(bad, "x")
        with pytest.raises(DicomArchiveError, match="unsafe entry"):
            read_dicom(evil)
    link = zipfile.ZipInfo("link.dcm")
    link.external_attr = (0o120777 << 16)  # a symbolic link entry
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(DicomArchiveError, match="link"):
        read_dicom(tmp_path / "link.zip")
    assert not (tmp_path / "evil.dcm").exists()


def test_is_dicom_input(tmp_path: Path, ct_nifti: Path) -> None:
    (tmp_path / "nifti").mkdir()
    shutil.copy(ct_nifti, tmp_path / "nifti" / "a.nii.gz")
    assert not is_dicom_input(tmp_path / "nifti")
    assert not is_dicom_input(ct_nifti)
    assert not is_dicom_input(tmp_path / "missing")
    write_series(tmp_path / "deep" / "study" / "series", ct_nifti)
    assert is_dicom_input(tmp_path / "deep")


def _all_text(exc: BaseException) -> str:
    parts = [str(exc), repr(exc)]
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        parts += [str(cause), repr(cause)]
        cause = cause.__cause__ or cause.__context__
    return "\n".join(parts)


def _assert_private(text: str) -> None:
    for part in SENTINEL_PARTS:
        assert part.lower() not in text.lower(), f"patient data in: {text!r}"


def test_two_series_one_is_taken_and_series_chooses(tmp_path: Path, ct_nifti: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    first = write_series(tmp_path / "study" / "s1", ct_nifti, description="AX soft")
    second = write_series(tmp_path / "study" / "s2", ct_nifti, skip=(9,), description="AX bone")
    scan, source = read_dicom(tmp_path / "study")  # io.dicom_select's rules: most slices
    assert source.series_instance_uid == first and scan.data.shape[1] == 10
    assert source.choices[0].info.uid == first and "most slices (10; #3 has 9)" in source.choices[0].reason
    scan, source = read_dicom(tmp_path / "study", series_uid=second)
    assert source.series_instance_uid == second and scan.data.shape[1] == 9 and source.choices == ()
    with pytest.raises(DicomSeriesError, match="no series with") as info:
        read_dicom(tmp_path / "study", series_uid="1.2.3")
    message = str(info.value)
    assert first in message and second in message and "'AX soft'" in message and "'s1'" in message
    assert "10 slice(s)" in message and "9 slice(s)" in message
    assert {s.uid for s in info.value.series} == {first, second}
    _assert_private(_all_text(info.value) + caplog.text)


def test_missing_slice_is_an_error(tmp_path: Path, ct_nifti: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    write_series(tmp_path / "gap", ct_nifti, skip=(4,))
    with pytest.raises(MissingSlicesError, match="1 slice\\(s\\) are missing") as info:
        read_dicom(tmp_path / "gap")
    assert isinstance(info.value, InputError)
    assert "6.00 mm" in str(info.value) and "expected 3.00 mm" in str(info.value)
    _assert_private(_all_text(info.value) + caplog.text)


def _rename_after_patient(folder: Path) -> None:
    """Exports often name files after the patient: the redactor must mask those names."""
    for path in sorted(folder.iterdir()):
        path.rename(folder / f"ZZSENTINEL_QQPRIVATE_{path.name}")


def test_patient_data_never_in_messages(tmp_path: Path, ct_nifti: Path, caplog, recwarn, capfd) -> None:
    """Every input error we can provoke, with patient names in the file names too."""
    caplog.set_level(logging.DEBUG)
    write_series(tmp_path / "gap", ct_nifti, skip=(3,))
    write_series(tmp_path / "two" / "a", ct_nifti, description="first scout")  # no usable series
    write_series(tmp_path / "two" / "b", ct_nifti, description="second scout")
    for name in ("cut", "corrupt"):
        write_series(tmp_path / name, ct_nifti, syntax=JPEG2000Lossless)
        _rename_after_patient(tmp_path / name)
    cut = sorted((tmp_path / "cut").iterdir())[0]
    cut.write_bytes(cut.read_bytes()[:-200])  # truncated copy: the pixel data is gone
    corrupt = sorted((tmp_path / "corrupt").iterdir())[0]
    raw = bytearray(corrupt.read_bytes())
    start = raw.find(b"\xff\x4f\xff\x51")  # JPEG 2000 SOC + SIZ markers
    raw[start + 4 : start + 40] = bytes(36)  # a broken header: the decoders fail
    corrupt.write_bytes(bytes(raw))
    texts = []
    for folder, series in (("gap", None), ("two", None), ("two", "9.9"), ("cut", None), ("corrupt", None)):
        with pytest.raises(InputError) as info:
            read_dicom(tmp_path / folder, series_uid=series)
        texts.append(_all_text(info.value))
    assert "missing" in texts[0] and "first" in texts[1] and "no pixel data" in texts[3]
    assert "cannot decode" in texts[4] and "JPEG 2000" in texts[4]
    assert "<redacted>_QQ" not in texts[4] and "<redacted>_<redacted>_IM" in texts[4]  # names masked
    out, err = capfd.readouterr()
    texts += [str(w.message) for w in recwarn] + [caplog.text, out, err]
    for text in texts:
        _assert_private(text)


def test_no_dicom_images(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="no DICOM images"):
        read_dicom(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="neither a folder nor a .zip"):
        read_dicom(tmp_path / "file.txt")


def _organ_masks(scan) -> dict[str, np.ndarray]:
    shape = scan.data.shape[1:]
    organ = np.zeros(shape, bool)
    organ[2:6, 10:20, 8:18] = True
    tumor = np.zeros(shape, bool)
    tumor[3:5, 12:15, 10:13] = True
    return {"liver": organ, "liver_tumor": tumor, "spleen": np.zeros(shape, bool)}


def test_dicom_seg_round_trip(tmp_path: Path, ct_nifti: Path) -> None:
    import highdicom as hd

    uid = write_series(tmp_path / "series", ct_nifti)
    scan, source = read_dicom(tmp_path / "series")
    masks = _organ_masks(scan)
    out = write_case_outputs(
        scan, masks, tmp_path / "out", OutputOptions(output_type="dicom-seg"),
        task_of={n: "liver" for n in masks}, dicom_source=source, case_id="series",
    )  # fmt: skip
    assert out.dicom == tmp_path / "out" / "segmentation.dcm" and out.masks == {}
    seg = hd.seg.segread(out.dicom)
    assert seg.number_of_segments == 3
    assert [seg.get_segment_description(i).segment_label for i in (1, 2, 3)] == list(masks)
    # One frame per (slice, non-empty segment): the organ spans 4 slices, the tumour 2.
    assert int(seg.NumberOfFrames) == 4 + 2
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in source.datasets}
    # Frames sit on the right source slices, in the right place.
    frames = seg.get_volume()  # (slice, row, column) in the SEG's geometry, LPS
    assert frames is not None
    for number, name in enumerate(masks, start=1):
        # The stored order has the rows reversed (dcm2niix's); the source's frames do not.
        expected = np.transpose(scan.reorientation.to_file(masks[name])[:, ::-1], (2, 1, 0))
        got = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[ds.SOPInstanceUID for ds in source.datasets],
            segment_numbers=[number], combine_segments=False, ignore_spatial_locations=True,
            assert_missing_frames_are_empty=True,
        )[..., 0].astype(bool)  # fmt: skip
        np.testing.assert_array_equal(got, expected)


def test_rtstruct_contours_follow_the_mask(tmp_path: Path, ct_nifti: Path) -> None:
    pytest.importorskip("skimage")
    write_series(tmp_path / "series", ct_nifti)
    scan, source = read_dicom(tmp_path / "series")
    masks = _organ_masks(scan)
    out = write_case_outputs(
        scan, masks, tmp_path / "out", OutputOptions(output_type="rtstruct"),
        task_of={n: "liver" for n in masks}, dicom_source=source,
    )  # fmt: skip
    ds = pydicom.dcmread(out.dicom)
    assert ds.Modality == "RTSTRUCT" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
    assert [r.ROIName for r in ds.StructureSetROISequence] == list(masks)
    refs = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert refs.SeriesInstanceUID == source.series_instance_uid
    liver = ds.ROIContourSequence[0].ContourSequence
    assert len(liver) == 4  # one closed contour on each of the 4 slices
    assert "ContourSequence" not in ds.ROIContourSequence[2]  # empty spleen: an ROI without contours
    # Contour points lie on the voxel borders of the mask, in LPS world mm.
    lps_from_internal = LPS @ scan.reorientation.internal_affine
    inside = np.argwhere(masks["liver"])
    corners = np.array([inside.min(axis=0) - 0.5, inside.max(axis=0) + 0.5])
    box = (lps_from_internal[:3, :3] @ corners.T).T + lps_from_internal[:3, 3]
    points = np.concatenate([np.array(c.ContourData, float).reshape(-1, 3) for c in liver])
    for axis in (0, 1):  # in-plane axes: borders at ±half a voxel
        assert points[:, axis].min() == pytest.approx(box[:, axis].min(), abs=1e-2)
        assert points[:, axis].max() == pytest.approx(box[:, axis].max(), abs=1e-2)
    slice_ids = {c.ContourImageSequence[0].ReferencedSOPInstanceUID for c in liver}
    assert slice_ids <= {d.SOPInstanceUID for d in source.datasets}


@pytest.mark.parametrize("output_type", ["dicom-seg", "rtstruct"])
def test_dicom_outputs_name_the_model_of_each_structure(tmp_path: Path, ct_nifti: Path, output_type: str) -> None:
    """Several-model runs: each segment (SEG algorithm parameter) or ROI (description) names
    the model it came from; a one-model run writes no model."""
    if output_type == "rtstruct":
        pytest.importorskip("skimage")
    write_series(tmp_path / "series", ct_nifti)
    scan, source = read_dicom(tmp_path / "series")
    masks = _organ_masks(scan)
    model_of = {"liver": "uniseg", "liver_tumor": "uniseg", "spleen": "totalsegmentator"}
    named: dict[str, list[str | None]] = {}
    for folder, models in (("several", model_of), ("one", None)):
        out = write_case_outputs(scan, masks, tmp_path / folder, OutputOptions(output_type=output_type),
                                 task_of={n: "liver" for n in masks}, dicom_source=source, model_of=models)
        ds = pydicom.dcmread(out.dicom)
        if output_type == "rtstruct":
            named[folder] = [r.get("ROIDescription") for r in ds.StructureSetROISequence]
        else:
            algorithms = [s.SegmentationAlgorithmIdentificationSequence[0] for s in ds.SegmentSequence]
            named[folder] = [a.AlgorithmParameters if "AlgorithmParameters" in a else None for a in algorithms]
    assert named["one"] == [None, None, None]
    assert [m is not None and model_of[n] in m for n, m in zip(masks, named["several"])] == [True] * 3


def test_dicom_outputs_need_a_dicom_input(tmp_path: Path, ct_nifti: Path) -> None:
    scan = read_scan(ct_nifti)
    with pytest.raises(UsageError, match="needs a DICOM input"):
        write_case_outputs(scan, _organ_masks(scan), tmp_path / "o", OutputOptions(output_type="rtstruct"), task_of={})


def test_enhanced_multiframe_reads_like_the_nifti(tmp_path: Path, ct_nifti: Path, caplog) -> None:
    import highdicom as hd

    caplog.set_level(logging.CRITICAL)  # highdicom's conversion notes, not ours
    write_series(tmp_path / "series", ct_nifti)
    legacy = [pydicom.dcmread(p) for p in sorted((tmp_path / "series").iterdir())]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(legacy, generate_uid(), 7, generate_uid(), 1)
    (tmp_path / "mf").mkdir()
    enhanced.save_as(tmp_path / "mf" / "enhanced.dcm", enforce_file_format=True)
    scan, source = read_dicom(tmp_path / "mf")
    _assert_same_scan(scan, read_scan(ct_nifti))
    assert source.multiframe  # its SEG and RTSTRUCT: tests/test_dicom_robust.py


def test_missing_extra_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if the extra were not installed
    (tmp_path / "series").mkdir()
    with pytest.raises(UsageError, match=r"pip install 'unisegcli\[dicom\]'"):
        read_dicom(tmp_path / "series")


def test_zip_members_that_are_devices_fifos_or_sockets_are_refused(tmp_path: Path) -> None:
    """One extractor (io.archive) serves DICOM zips and model zips: special files never land."""
    import stat

    from unisegcli.errors import ArchiveError
    from unisegcli.io.archive import extract_zip

    for mode in (stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK):
        member = zipfile.ZipInfo("special")
        member.external_attr = (mode | 0o644) << 16
        archive = tmp_path / f"special{mode}.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("ok.dcm", "x")
            zf.writestr(member, "")
        with pytest.raises(DicomArchiveError, match="unsafe entry 'special'"):
            read_dicom(archive)
        with pytest.raises(ArchiveError, match="unsafe entry"):
            extract_zip(archive, tmp_path / "out", fix="Use trusted files.")
        assert not (tmp_path / "out").exists()
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w") as zf:
        for k in range(3):
            zf.writestr(f"f{k}.dcm", b"\0" * 1000)
    with pytest.raises(ArchiveError, match="entries"):
        extract_zip(big, tmp_path / "out", fix="x", max_files=2)
    with pytest.raises(ArchiveError, match="unpacks to more than"):
        extract_zip(big, tmp_path / "out", fix="x", max_bytes=2000)
    assert extract_zip(big, tmp_path / "out", fix="x") == tmp_path / "out"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f0.dcm", "f1.dcm", "f2.dcm"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no staging left
