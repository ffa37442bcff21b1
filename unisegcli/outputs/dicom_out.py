"""DICOM outputs for DICOM inputs: a SEG (``--output-type dicom-seg``) or an RT Structure Set
(``--output-type rtstruct``), both referencing the source series' instances.

Masks arrive as bool [Z, Y, X] in internal order; they are turned back into the source's
(column, row, slice) order with the scan's reorientation and the row flip of the stored
order undone, so frame k of the output lies on source slice k (``DicomSource.datasets`` are
in that order).

Both refuse, before any work (``check_dicom_output``), a source whose Study/Series/
FrameOfReference/SOP Class/SOP Instance UIDs are empty or missing (anonymisers leave such
series; highdicom would fail deep inside with a KeyError): a reference to an empty UID
references nothing, and inventing UIDs would reference instances that do not exist.
``io.dicom.repair_sop_uids`` first fills SOP Class/Instance UIDs from the same files' meta
headers where those still hold them.

- DICOM SEG: highdicom, BINARY, one segment per structure (empty frames omitted; an empty
  structure stays a segment without frames). Segment codes: SNOMED CT codes found in
  pydicom's code dictionary by the structure's name ("liver" -> Liver), tumours and lesions
  as "Morphologically Altered Structure", anything else as generic "Tissue".
- RTSTRUCT: highdicom has no writer and rt-utils needs OpenCV, so it is built here with
  pydicom: per slice, closed planar contours from marching squares (scikit-image) at the
  0.5 level, i.e. along the voxel borders of the mask; holes are separate contours (viewers
  combine contours of a slice by XOR).

Both copy the patient and study modules of the source (a DICOM object must belong to its
patient); nothing of them is ever printed.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from unisegcli.errors import InputError, UsageError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from unisegcli.io.dicom import DicomSource
    from unisegcli.io.nifti import Scan

DICOM_OUTPUT_TYPES = ("dicom-seg", "rtstruct")
OUTPUT_FILE_NAMES = {"dicom-seg": "segmentation.dcm", "rtstruct": "rtstruct.dcm"}
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
_STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"  # what RT systems expect in RTReferencedStudySequence
_ALTERED_WORDS = ("tumor", "tumour", "lesion", "edema", "oedema", "metastasis", "cancer", "core")
_TYPE2_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
    "StudyTime", "ReferringPhysicianName",
)  # fmt: skip
_COPIED_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
)  # fmt: skip


class DicomReferenceError(InputError):
    """A DICOM output was asked for but the source series lacks the UIDs it must reference."""


REFERENCED_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPClassUID", "SOPInstanceUID")


def check_dicom_output(output_type: str, source: "DicomSource | None") -> None:
    """Raise unless ``output_type`` can be written for this input; cheap, so callers run it
    before any work (right after reading the case)."""
    if output_type not in DICOM_OUTPUT_TYPES:
        return
    if source is None:
        raise UsageError(
            f"--output-type {output_type} needs a DICOM input (the output references the source "
            "series); this input is NIfTI. Pass the DICOM series folder (or .zip), or use "
            "--output-type nifti."
        )
    missing = missing_references(source.datasets)
    if missing:
        raise DicomReferenceError(
            f"--output-type {output_type} references the source series by its UIDs, but the series in "
            f"'{source.path}' has empty or missing {', '.join(missing)} (an anonymiser may have blanked "
            "them); expected a series with its UIDs. Re-export it with UIDs kept or newly generated, or "
            "use --output-type nifti."
        )


def missing_references(datasets: Sequence["Dataset"]) -> list[str]:
    """The UID attributes a SEG/RTSTRUCT must reference that are empty, missing or (instance
    UIDs) repeated in ``datasets``, in words; [] when the series can be referenced."""
    missing = []
    for keyword in REFERENCED_KEYWORDS:
        empty = sum(1 for ds in datasets if not str(ds.get(keyword, "") or "").strip())
        if empty:
            missing.append(keyword if empty == len(datasets) else f"{keyword} ({empty} of {len(datasets)} files)")
    instances = [str(ds.get("SOPInstanceUID", "") or "").strip() for ds in datasets]
    if all(instances) and len(set(instances)) < len(instances):
        missing.append(f"unique SOPInstanceUID ({len(instances) - len(set(instances))} repeated)")
    return missing


def _frames(mask_zyx: np.ndarray, scan: "Scan") -> np.ndarray:
    """bool [Z, Y, X] internal -> bool [k, j, i] = (slice, row, column) of the source series.

    The scan's stored order has the rows reversed (``io.dicom_series.flip_rows``): undone here.
    """
    mask_ijk = scan.reorientation.to_file(np.asarray(mask_zyx, dtype=bool))[:, ::-1]
    return np.transpose(mask_ijk, (2, 1, 0))


def _property_codes(name: str) -> tuple[object, object]:
    """(category, type) codes of a structure: dictionary lookup by name, generic otherwise."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    def lookup(key: str) -> object | None:
        return getattr(codes.SCT, key, None) if key else None

    words = name.lower().split("_")
    if any(w in _ALTERED_WORDS for w in words):
        category = Code("49755003", "SCT", "Morphologically Altered Structure")
        # "liver_tumor" -> Tumor, "edema" -> Edema, "non_enhancing_core" -> Neoplasm.
        kind = next((c for c in map(lookup, (w.capitalize() for w in reversed(words))) if c), None)
        return category, kind or codes.SCT.Neoplasm
    kind = lookup("".join(w.capitalize() for w in words))
    return (codes.SCT.AnatomicalStructure, kind) if kind else (codes.SCT.Tissue, codes.SCT.Tissue)


def dicom_seg_dataset(
    masks_zyx: Mapping[str, np.ndarray],
    scan: "Scan",
    source: "DicomSource",
    *,
    colors: Mapping[str, Sequence[int]] | None = None,
    series_description: str = "uniseg segmentation",
    model_of: Mapping[str, str] | None = None,
) -> "Dataset":
    """A DICOM SEG (highdicom Segmentation) with one segment per structure, in masks' order.
    model_of: structure -> model (several-model runs): each segment's algorithm identification
    names its model as the parameter "model"."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from unisegcli.version import __version__

    check_dicom_output("dicom-seg", source)
    names = list(masks_zyx)
    if not names:
        raise UsageError("no structures to write into the DICOM SEG; expected at least one.")
    pixel_array = _seg_pixels(np.stack([_frames(masks_zyx[n], scan) for n in names], axis=-1), scan, source)
    def algorithm(name: str) -> "hd.AlgorithmIdentificationSequence":
        model = (model_of or {}).get(name)
        return hd.AlgorithmIdentificationSequence(name="uniseg", version=__version__,
                                                  family=codes.DCM.ArtificialIntelligence,
                                                  parameters={"model": model} if model else None)

    descriptions = []
    for number, name in enumerate(names, start=1):
        category, kind = _property_codes(name)
        color = (colors or {}).get(name)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name[:64],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm(name),
                display_color=hd.color.CIELabColor.from_rgb(*color) if color else None,
            )
        )
    seg = _segmentation(source, pixel_array, descriptions)
    seg.SeriesDescription = series_description[:64]
    return seg


def _with_type2_attributes(datasets: Sequence["Dataset"]) -> list["Dataset"]:
    """The source headers, the first (whose patient/study modules the SEG copies) with the
    Type 2 attributes highdicom reads added empty where the source lacks them (anonymised
    exports drop PatientSex, StudyDate...; DICOM allows them empty). Inputs are untouched."""
    import copy

    first = datasets[0]
    absent = [k for k in _TYPE2_PATIENT_STUDY if k not in first]
    if not absent:
        return list(datasets)
    first = copy.deepcopy(first)
    for keyword in absent:
        setattr(first, keyword, "")
    return [first, *datasets[1:]]


def _segmentation(source: "DicomSource", pixel_array: Any, descriptions: list) -> "Dataset":
    """highdicom's Segmentation of ``pixel_array``; a header it cannot use (an unknown SOP
    class...) is a one-line input error, not a traceback."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    from unisegcli.io.dicom_privacy import Redactor, quiet_pydicom
    from unisegcli.version import __version__

    try:
        with quiet_pydicom():
            return hd.seg.Segmentation(
                source_images=_with_type2_attributes(source.datasets),
                pixel_array=pixel_array,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=generate_uid(),
                series_number=901,
                sop_instance_uid=generate_uid(),
                instance_number=1,
                manufacturer="uniseg",
                manufacturer_model_name="uniseg",
                software_versions=__version__,
                device_serial_number="0",
                content_label="UNISEG",
            )
    except (KeyError, AttributeError) as exc:  # header content highdicom cannot map
        redact = Redactor.from_datasets(source.datasets[:1])
        raise DicomReferenceError(redact(
            f"cannot build a DICOM SEG referencing the series in '{source.path}' (highdicom: "
            f"{type(exc).__name__}: {exc}); expected a standard CT/MR/PET image series (SOP class "
            f"{source.datasets[0].get('SOPClassUID', '')}). Use --output-type nifti."
        )) from None


def _seg_pixels(frames_kjis: np.ndarray, scan: "Scan", source: "DicomSource") -> Any:
    """bool [k, j, i, S] frames of the source as highdicom takes them: the array itself for
    a classic series (frame k on source file k); for an enhanced multi-frame source, whose
    frames highdicom's volume reader re-ordered, a highdicom Volume in patient space, so
    highdicom places each frame by its position."""
    if not source.multiframe:
        return frames_kjis
    import highdicom as hd

    from unisegcli.io.dicom_series import LPS_TO_RAS, flip_rows

    unflipped = flip_rows(np.zeros((1, frames_kjis.shape[1], 1)), np.asarray(scan.image.affine))[1]
    lps_kji = (LPS_TO_RAS @ unflipped)[:, [2, 1, 0, 3]]  # LPS_TO_RAS is its own inverse
    return hd.Volume(frames_kjis.astype(np.uint8), lps_kji, "PATIENT", source.frame_of_reference_uid,
                     channels={"SegmentNumber": list(range(1, frames_kjis.shape[-1] + 1))})


def _contours(mask_rc: np.ndarray) -> list[np.ndarray]:
    """Closed contours [(row, column), ...] of a 2D mask along its voxel borders."""
    from skimage.measure import find_contours

    # Pad so structures touching the border still give closed contours.
    padded = np.pad(mask_rc.astype(np.float32), 1)
    return [c[:-1] - 1.0 for c in find_contours(padded, 0.5) if len(c) > 3]


def rtstruct_dataset(
    masks_zyx: Mapping[str, np.ndarray],
    scan: "Scan",
    source: "DicomSource",
    *,
    colors: Mapping[str, Sequence[int]] | None = None,
    series_description: str = "uniseg structures",
    model_of: Mapping[str, str] | None = None,
) -> "Dataset":
    """An RT Structure Set with one ROI per structure (masks' order), contours per slice.
    model_of: structure -> model (several-model runs), written as each ROI's description."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from unisegcli.version import __version__

    check_dicom_output("rtstruct", source)
    try:
        import skimage.measure  # noqa: F401  (fail before any work)
    except ImportError as exc:
        from unisegcli.io.dicom import DICOM_EXTRA_HINT, DicomExtraMissingError

        raise DicomExtraMissingError(
            f"--output-type rtstruct needs scikit-image for contouring; install it: {DICOM_EXTRA_HINT}"
        ) from exc
    first = source.datasets[0]
    now = datetime.datetime.now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = first.get("SpecificCharacterSet", "ISO_IR 192")
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for keyword in _COPIED_KEYWORDS:
        setattr(ds, keyword, first.get(keyword, ""))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 902
    ds.SeriesDescription = series_description[:64]
    ds.InstanceNumber = 1
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "uniseg", "uniseg", __version__
    ds.StructureSetLabel = "UNISEG"
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.ContentDate, ds.ContentTime = ds.StructureSetDate, ds.StructureSetTime

    planes = _planes(scan, source)
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = source.series_instance_uid
    series_ref.ContourImageSequence = [plane.ref() for plane in planes]
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = _STUDY_COMPONENT_SOP_CLASS
    study_ref.ReferencedSOPInstanceUID = source.study_instance_uid
    study_ref.RTReferencedSeriesSequence = [series_ref]
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = source.frame_of_reference_uid or ""
    frame_ref.RTReferencedStudySequence = [study_ref]
    ds.ReferencedFrameOfReferenceSequence = [frame_ref]

    rois, contours, observations = [], [], []
    for number, name in enumerate(masks_zyx, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_ref.FrameOfReferenceUID
        roi.ROIName = name[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        if (model_of or {}).get(name):
            roi.ROIDescription = f"uniseg model {model_of[name]}"[:64]  # type: ignore[index]
        rois.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ROIDisplayColor = list((colors or {}).get(name, (255, 0, 0)))
        slice_contours = _slice_contours(_frames(masks_zyx[name], scan), planes)
        if slice_contours:  # an empty structure stays an ROI without contours (Type 3)
            item.ContourSequence = slice_contours
        contours.append(item)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = "ORGAN"
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = rois
    ds.ROIContourSequence = contours
    ds.RTROIObservationsSequence = observations
    return ds


@dataclass(frozen=True)
class _Plane:
    """Source slice k: where pixel (row 0, column 0) lies, the LPS mm step per column and per
    row, and the instance (and frame, for a multi-frame source) that holds it."""

    origin_lps: np.ndarray
    column_step_lps: np.ndarray
    row_step_lps: np.ndarray
    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None = None

    def ref(self) -> "Dataset":
        from pydicom.dataset import Dataset

        ref = Dataset()
        ref.ReferencedSOPClassUID = self.sop_class_uid
        ref.ReferencedSOPInstanceUID = self.sop_instance_uid
        if self.frame_number is not None:
            ref.ReferencedFrameNumber = self.frame_number
        return ref


def _planes(scan: "Scan", source: "DicomSource") -> list[_Plane]:
    """One _Plane per source slice k: from each file's header (DICOM C.7.6.2.1.1) for a classic
    series; from the volume's geometry and the frames' positions for a multi-frame one."""
    if source.multiframe:
        return _multiframe_planes(scan, source)
    planes = []
    for ds in source.datasets:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        planes.append(_Plane(np.array([float(v) for v in ds.ImagePositionPatient]), iop[:3] * column_spacing,
                             iop[3:] * row_spacing, str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return planes


def _multiframe_planes(scan: "Scan", source: "DicomSource") -> list[_Plane]:
    """Slice k of the stored order is the frame k-th along the normal (``read_multiframe``)."""
    from unisegcli.io.dicom_series import LPS_TO_RAS, flip_rows

    ds = source.datasets[0]
    shape = scan.file_shape
    lps = LPS_TO_RAS @ flip_rows(np.zeros((1, shape[1], 1)), np.asarray(scan.image.affine))[1]
    normal = np.cross(lps[:3, 0], lps[:3, 1])
    try:
        positions = np.array([[float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
                              for item in ds.PerFrameFunctionalGroupsSequence])
    except (AttributeError, IndexError, TypeError, ValueError):
        positions = np.zeros((0, 3))
    if positions.shape != (shape[2], 3):
        raise DicomReferenceError(
            f"--output-type rtstruct needs one frame per slice in '{source.path}', found {len(positions)} frame "
            f"positions for {shape[2]} slices; expected a single-volume enhanced image. Use --output-type dicom-seg."
        )
    order = np.argsort(positions @ normal, kind="stable")
    return [_Plane((lps @ np.array([0.0, 0.0, k, 1.0]))[:3], lps[:3, 0], lps[:3, 1], str(ds.SOPClassUID),
                   str(ds.SOPInstanceUID), int(order[k]) + 1) for k in range(shape[2])]


def _slice_contours(frames_kji: np.ndarray, planes: Sequence[_Plane]) -> list["Dataset"]:
    """Contour items of one structure: LPS mm points on each source slice that holds it."""
    from pydicom.dataset import Dataset

    items = []
    for k in np.flatnonzero(frames_kji.any(axis=(1, 2))):
        plane = planes[int(k)]
        for contour in _contours(frames_kji[k]):
            # contour: (row, column) pixel coordinates, mapped to LPS mm.
            points = (plane.origin_lps[None, :] + contour[:, 1:2] * plane.column_step_lps[None, :]
                      + contour[:, 0:1] * plane.row_step_lps[None, :])
            item = Dataset()
            item.ContourImageSequence = [plane.ref()]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(points)
            item.ContourData = [f"{v:.3f}" for v in points.ravel()]
            items.append(item)
    return items
