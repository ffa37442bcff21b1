"""What a DICOM series is made of: its listing line, its slice order and its voxel geometry.

Single-frame series: pure numpy on pydicom headers (``sort_slices``). Enhanced multi-frame
files: highdicom's volume reader (``read_multiframe``). ``flip_rows`` puts both in the
stored (dcm2niix) voxel order. Geometry follows the
DICOM standard (C.7.6.2): ImageOrientationPatient holds the row direction (along which the
column index grows) then the column direction; PixelSpacing is (between rows, between
columns); positions are LPS mm. Voxel order is (i, j, k) = (column, row, slice), slices
sorted by increasing position along the normal row x column.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from unisegcli.errors import ChannelError, ImageFormatError, ImageShapeError, ImageValueError
from unisegcli.io.nifti_header import MAX_SPACING_MM, MIN_SPACING_MM

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Slices may deviate this much (relative) from the median spacing; scanners jitter a little.
SPACING_TOLERANCE = 0.1
MAX_POSITION_MM = 1e6  # 1 km from the scanner's origin: anything farther is a damaged header


class DicomGeometryError(ImageValueError):
    """Slices do not form one regular volume (mixed orientations/sizes, uneven spacing)."""


class MissingSlicesError(DicomGeometryError):
    """Slice positions have a gap: slices are missing from the series."""


@dataclass(frozen=True)
class SeriesInfo:
    """One series of an input, as listed to users choosing between several (no patient data).

    image_type: ImageType values joined by "\\" ("ORIGINAL\\PRIMARY\\AXIAL"); plane: "axial",
    "coronal" or "sagittal" by the slice normal (None without orientation); thickness_mm:
    the spacing of the slices along the normal (SliceThickness when positions do not tell).
    """

    uid: str
    description: str
    number: int | None
    modality: str
    slice_count: int
    subfolder: str | None
    image_type: str = ""
    sop_class_uid: str = ""
    plane: str | None = None
    thickness_mm: float | None = None
    has_geometry: bool = True
    attenuation_corrected: bool | None = None  # PET: CorrectedImage holds ATTN (None: not PET)

    def line(self) -> str:
        where = f", folder '{self.subfolder}'" if self.subfolder not in (None, ".") else ""
        number = f"#{self.number} " if self.number is not None else ""
        spacing = f", {self.thickness_mm:g} mm" if self.thickness_mm is not None else ""
        plane = f" {self.plane}" if self.plane else ""
        return (
            f"{self.uid or '(no UID)'}: {number}'{self.description}' {self.modality}{plane}, "
            f"{self.slice_count} slice(s){spacing}{where}"
        )


def dicom_affine_ras(
    row_cosine: np.ndarray, column_cosine: np.ndarray, pixel_spacing: tuple[float, float],
    origin_lps: np.ndarray, slice_vector_lps: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """4x4 affine from (i=column, j=row, k=slice) indices to RAS mm.

    pixel_spacing: (between rows, between columns) as in the DICOM element. slice_vector_lps:
    the step between consecutive sorted slices (not necessarily along the normal: gantry
    tilt gives a sheared, still exact, affine).
    """
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(row_cosine, float) * float(pixel_spacing[1])
    lps[:3, 1] = np.asarray(column_cosine, float) * float(pixel_spacing[0])
    lps[:3, 2] = np.asarray(slice_vector_lps, float)
    lps[:3, 3] = np.asarray(origin_lps, float)
    return LPS_TO_RAS @ lps


def _geometry_value(ds: "Dataset", keyword: str, count: int, where: str, redact: Callable[[str], str]) -> np.ndarray:
    """``count`` finite numbers from a geometry element, or a one-line DicomGeometryError."""
    value = ds.get(keyword)
    if value is None:
        items: list = []
    elif isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        items = [value]
    else:
        items = list(value)
    try:
        numbers = np.array([float(v) for v in items], dtype=float)
    except (TypeError, ValueError):
        numbers = np.array([np.nan])
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        shown = " ".join(str(v) for v in items)[:80]
        raise DicomGeometryError(redact(
            f"{where} has {keyword} '{shown}'; expected {count} finite numbers. The file's geometry is "
            "damaged: re-export the series from the scanner or PACS."
        ))
    return numbers


def _checked_geometry(
    ds: "Dataset", where: str, redact: Callable[[str], str]
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(ImageOrientationPatient, PixelSpacing, (Rows, Columns)) of one file, validated."""
    iop = _geometry_value(ds, "ImageOrientationPatient", 6, where, redact)
    in_range = bool(np.abs(iop).max() <= 1.01)  # direction cosines: no overflow in the norms below
    norms = (np.linalg.norm(iop[:3]), np.linalg.norm(iop[3:])) if in_range else (0.0, 0.0)
    if not all(abs(n - 1.0) < 0.01 for n in norms) or abs(float(iop[:3] @ iop[3:])) > 0.01:
        raise DicomGeometryError(redact(
            f"{where} has ImageOrientationPatient {[round(float(v), 4) for v in iop]}; expected two "
            "perpendicular unit vectors (row, column direction). Re-export the series."
        ))
    spacing = _geometry_value(ds, "PixelSpacing", 2, where, redact)
    if not all(MIN_SPACING_MM <= v < MAX_SPACING_MM for v in spacing):
        raise DicomGeometryError(redact(
            f"{where} has PixelSpacing {[float(v) for v in spacing]} mm; expected two spacings from "
            f"{MIN_SPACING_MM:g} mm to {MAX_SPACING_MM / 1000:g} m. Re-export the series."
        ))
    try:
        shape = (int(ds.Rows), int(ds.Columns))
    except (TypeError, ValueError):
        shape = (0, 0)
    if min(shape) < 1:
        raise DicomGeometryError(redact(
            f"{where} has Rows x Columns {ds.get('Rows')} x {ds.get('Columns')}; expected positive sizes. "
            "Re-export the series."
        ))
    return iop, spacing, shape


def _series_geometry(
    members: list[tuple[str, "Dataset"]], path: Path, redact: Callable[[str], str], hint: str
) -> tuple[np.ndarray, np.ndarray]:
    """(ImageOrientationPatient, PixelSpacing) shared by every slice of a series of ≥ 2 slices."""
    for name, ds in members:
        absent = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
        if absent:
            raise DicomGeometryError(
                redact(
                    f"'{name}' in '{path}' has no {', '.join(absent)}; expected cross-sectional slices "
                    "with position and orientation (not a localizer, screenshot or report)."
                )
            )
    if len(members) == 1:
        raise ImageShapeError(redact(
            f"'{path}' holds a single DICOM slice ('{members[0][0]}'); expected a 3D series of several "
            f"slices{hint}. Pass the folder of the whole series, not a single slice."
        ))
    geometry = [_checked_geometry(ds, f"'{name}' in '{path}'", redact) for name, ds in members]
    iop, spacing, shape = geometry[0]
    for other_iop, other_spacing, other_shape in geometry[1:]:
        if not np.allclose(other_iop, iop, atol=1e-4):
            raise DicomGeometryError(
                f"the series in '{path}' mixes slice orientations; expected one stack of parallel "
                "slices (a localizer or a second plane in the same series?). Export the axial "
                "stack alone."
            )
        if other_shape != shape or not np.allclose(other_spacing, spacing, rtol=1e-4):
            raise DicomGeometryError(
                f"the series in '{path}' mixes slice sizes or pixel spacings (first {shape[0]}x{shape[1]} "
                f"at {spacing.tolist()} mm); expected identical slices. Export one reconstruction."
            )
    return iop, spacing


def sort_slices(
    members: list[tuple[str, "Dataset"]], path: Path, redact: Callable[[str], str], unreadable: int = 0
) -> tuple[list[tuple[str, "Dataset"]], np.ndarray]:
    """Sort a single-frame series along its normal and check it is one regular volume.

    members: (file name, header) pairs of one series. Returns the sorted pairs and the RAS
    affine of the (column, row, slice) volume. Raises DicomGeometryError for missing
    geometry, mixed orientations, sizes or spacings, duplicate or uneven positions, and
    MissingSlicesError for gaps.
    """
    hint = f" ({unreadable} file(s) could not be parsed and may be the missing ones)" if unreadable else ""
    iop, spacing = _series_geometry(members, path, redact, hint)
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    positions = np.array([
        _geometry_value(ds, "ImagePositionPatient", 3, f"'{name}' in '{path}'", redact) for name, ds in members
    ])
    if np.abs(positions).max() > MAX_POSITION_MM:
        raise DicomGeometryError(
            f"the series in '{path}' has an ImagePositionPatient {np.abs(positions).max():.4g} mm from the "
            f"origin; expected positions within {MAX_POSITION_MM / 1e6:g} km. The geometry is damaged: "
            "re-export the series."
        )
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    members = [members[i] for i in order]
    positions, along = positions[order], along[order]
    steps = np.diff(along)
    duplicates = int(np.count_nonzero(steps < 1e-3))
    if duplicates:
        raise DicomGeometryError(
            f"the series in '{path}' has {duplicates} slice(s) at the same position as another; "
            "expected one slice per position (several echoes, phases or time points in one "
            "series?). Export a single volume."
        )
    step = float(np.median(steps))
    if not MIN_SPACING_MM <= step < MAX_SPACING_MM:
        raise DicomGeometryError(
            f"the series in '{path}' has slices {step:.4g} mm apart (ImagePositionPatient along the "
            f"normal); expected {MIN_SPACING_MM:g} mm to {MAX_SPACING_MM / 1000:g} m. The geometry is "
            "damaged: re-export the series."
        )
    worst = int(np.argmax(np.abs(steps - step)))
    if steps[worst] >= 1.5 * step:
        missing = int(round(steps[worst] / step)) - 1
        raise MissingSlicesError(
            f"the series in '{path}' has a gap: slice positions jump by {steps[worst]:.2f} mm between "
            f"slices {worst + 1} and {worst + 2} of {len(members)} (at {along[worst]:.2f} and "
            f"{along[worst + 1]:.2f} mm along the normal), expected {step:.2f} mm; about {missing} "
            f"slice(s) are missing{hint}. Re-export or re-copy the complete series."
        )
    if abs(steps[worst] - step) > SPACING_TOLERANCE * step:
        raise DicomGeometryError(
            f"the series in '{path}' has uneven slice spacing (from {steps.min():.2f} to "
            f"{steps.max():.2f} mm, median {step:.2f} mm); expected evenly spaced slices. Export "
            "a reconstruction with constant spacing."
        )
    slice_vector = (positions[-1] - positions[0]) / (len(members) - 1)
    return members, dicom_affine_ras(row_cos, col_cos, tuple(spacing), positions[0], slice_vector)  # type: ignore[arg-type]


def flip_rows(volume_ijk: np.ndarray, affine_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stored voxel order of a DICOM scan: dcm2niix's, rows reversed.

    volume_ijk: [column, row, slice(, channel)] with ``affine_ras`` from those indices.
    Returns [column, rows - 1 - row, slice(, channel)] (a view) and its affine: the same
    world grid, so masks overlay array for array the NIfTI that dcm2niix (and dicom2nifti
    for an axial series) writes. dcm2niix flips rows by default (``opts.isFlipY``,
    ``nii_flipY``) and orders slices along the normal row x column (``nii_flipZ`` when
    acquired the other way): rordenlab/dcm2niix console/nii_dicom_batch.cpp, nii_dicom.cpp.
    dicom2nifti reorients to LAS (dicom2nifti/image_reorientation.py), the same order for an
    axial series whose rows run to the patient's left and columns to posterior.
    """
    rows = volume_ijk.shape[1]
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1.0, rows - 1
    return volume_ijk[:, ::-1], affine_ras @ flip


def channel_volume(stacks: Sequence[tuple], choices: Sequence, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One series: its volume [i, j, k]; several (one per channel): [i, j, k, C] when they
    share one grid, else a ChannelError naming both series."""
    volume, affine = stacks[0][0], stacks[0][1]
    if len(stacks) == 1:
        return volume, affine
    for (other, other_affine, _, _), choice in zip(stacks[1:], choices[1:]):
        if other.shape != volume.shape or not np.allclose(other_affine, affine, atol=1e-3):
            raise ChannelError(
                f"in '{path}', the series for channel '{choice.channel}' ({choice.info.uid}, {other.shape}) "
                f"is not on the grid of the series for channel '{choices[0].channel}' ({choices[0].info.uid}, "
                f"{volume.shape}); expected all channels on one grid. Resample them to one grid and pass "
                "NIfTI files with --channel NAME=PATH."
            )
    return np.stack([s[0] for s in stacks], axis=-1), affine


def repair_sop_uids(datasets: Sequence["Dataset"]) -> tuple[str, ...]:
    """Fill an empty or missing SOPClassUID / SOPInstanceUID from the same file's meta header
    (MediaStorageSOPClassUID / MediaStorageSOPInstanceUID), as some anonymisers blank only
    the data set; returns what was repaired (in words). Nothing is invented: without a meta
    value the attribute stays empty and DICOM outputs refuse the series (dicom_out)."""
    repaired: set[str] = set()
    for ds in datasets:
        meta = getattr(ds, "file_meta", None)
        for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                      ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            value = str(meta.get(meta_keyword, "") or "").strip() if meta is not None else ""
            if not str(ds.get(keyword, "") or "").strip() and value:
                setattr(ds, keyword, value)
                repaired.add(f"{keyword} from the file meta's {meta_keyword}")
    return tuple(sorted(repaired))


def number_of_frames(ds: "Dataset") -> int:
    """NumberOfFrames (1 when absent); a garbled value is an ImageFormatError."""
    value = getattr(ds, "NumberOfFrames", 1)
    try:
        return max(int(value or 1), 1)
    except (TypeError, ValueError):
        raise ImageFormatError(
            f"a DICOM file has NumberOfFrames {str(value)[:20]!r}; expected a whole number. The "
            "file is damaged: re-export the series."
        ) from None


def rescale_value(
    ds: "Dataset", keyword: str, default: float, name: str, path: Path, redact: Callable[[str], str]
) -> float:
    """RescaleSlope / RescaleIntercept as a finite float (default when absent or empty)."""
    value = getattr(ds, keyword, None)
    try:
        number = float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        number = float("nan")
    if keyword == "RescaleSlope" and number == 0:
        number = default  # a zero slope means "not set" in practice, as nibabel reads scl_slope
    if not np.isfinite(number):
        raise ImageFormatError(redact(
            f"'{name}' in '{path}' has {keyword} {str(value)[:20]!r}; expected a finite number. "
            "The file is damaged: re-export the series."
        ))
    return number


def read_multiframe(
    folder: Path, members: list[tuple[str, "Dataset"]], path: Path, redact: Callable[[str], str]
) -> tuple[np.ndarray, np.ndarray]:
    """float32 [i, j, k] volume and its RAS affine from one enhanced multi-frame file.

    highdicom sorts the frames by position and checks they form one regular volume.
    """
    import highdicom as hd
    import pydicom

    from unisegcli.io.dicom_privacy import quiet_pydicom

    if len(members) != 1:
        raise DicomGeometryError(
            f"the series in '{path}' has {len(members)} multi-frame files; expected one. "
            "Pass a folder holding one enhanced image."
        )
    name = members[0][0]
    with quiet_pydicom():
        try:
            ds = pydicom.dcmread(folder / name)
            volume = hd.Image.from_dataset(ds, copy=False).get_volume(dtype=np.float32)
        except Exception as exc:
            raise DicomGeometryError(
                redact(
                    f"cannot stack the frames of '{name}' in '{path}' into one volume "
                    f"({type(exc).__name__}: {exc}); expected parallel, evenly spaced frames."
                )
            ) from None
    # highdicom: array (slice, row, column), affine from those indices to LPS mm.
    array = np.asarray(volume.array, dtype=np.float32)
    lps = np.asarray(volume.affine, dtype=float)
    volume_ijk = np.ascontiguousarray(np.transpose(array, (2, 1, 0)))  # (column, row, slice)
    lps_ijk = lps[:, [2, 1, 0, 3]]
    if float(np.cross(lps_ijk[:3, 0], lps_ijk[:3, 1]) @ lps_ijk[:3, 2]) < 0:
        # Slices along the normal row x column, as for single-frame series (sort_slices).
        volume_ijk = volume_ijk[:, :, ::-1]
        lps_ijk = lps_ijk @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, volume_ijk.shape[2] - 1], [0, 0, 0, 1.0]])
    return volume_ijk, LPS_TO_RAS @ lps_ijk
