"""Read one DICOM image series (a folder, or a .zip of one) into a ``Scan``.

Needs the ``dicom`` extra (pydicom, highdicom and the pylibjpeg decoders for JPEG 2000 /
JPEG lossless / JPEG-LS), imported lazily; without it a clear error says
``pip install 'unisegcli[dicom]'``.

A study folder with several series: one is chosen per task channel by the documented rules
of ``io.dicom_select`` (``--series UID`` overrides); the choice and why are kept in
``DicomSource.choices`` for the run's events and statistics.

Classic single-frame series (one file per slice: almost every CT/MR/PET export) are stacked
here with pydicom: slices sorted along the slice normal, checked for one orientation, one
size, and evenly spaced positions (a gap = missing slices is an error, never silently
interpolated). These checks (and their one-line, patient-data-free messages) are ours;
highdicom's volume API would stack the same but raise its own messages, so it reads only
enhanced multi-frame files. The stacked volume is written to a temporary NIfTI and read back
with ``nifti.read_scan``, so a DICOM scan gets exactly the internal orientation, checks and
geometry of the NIfTI path.

Voxel order (what the NIfTI masks of a DICOM input are stored in): dcm2niix's, i.e.
(i, j, k) = (column, row counted from the last row, slice along the normal row x column);
see ``dicom_series.flip_rows`` and docs/dicom.md. ``DicomSource.datasets`` are in that k
order.

Privacy: patient fields (name, id, birth date, ...) never appear in logs or messages.
Messages are built from geometry, UIDs and descriptions only; anything quoted from
elsewhere (file names, decoder errors) goes through a redactor that masks the series'
patient values; pydicom's own warnings (which can quote element values) are silenced.
"""

from __future__ import annotations

import logging
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from unisegcli.errors import (
    ImageFormatError,
    ImageShapeError,
    ImageValueError,
    InputError,
    InputNotFoundError,
    UnisegError,
    UsageError,
)
from unisegcli.io.archive import extract_zip
from unisegcli.io.dicom_privacy import Redactor, quiet_pydicom
from unisegcli.io.dicom_select import NoUsableSeries, SeriesChoice, choose_series, describe_series
from unisegcli.io.dicom_series import (  # noqa: F401  (the geometry errors are re-exported)
    DicomGeometryError,
    MissingSlicesError,
    SeriesInfo,
    channel_volume,
    flip_rows,
    number_of_frames,
    read_multiframe,
    repair_sop_uids,
    rescale_value,
    sort_slices,
)
from unisegcli.io.nifti import Scan, read_scan
from unisegcli.io.nifti_header import MAX_VOXELS_ENV, max_voxels, require_regular_file

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

DICOM_EXTRA_HINT = "pip install 'unisegcli[dicom]'"
MAX_ARCHIVE_BYTES = 32 * 1024**3  # refuse zip bombs: no CT series comes near 32 GiB
MAX_ARCHIVE_FILES = 200_000
ARCHIVE_FIX = "Re-create the archive from the series folder, or pass the unpacked folder."
_PROBE_FILES = 256  # is_dicom_input looks at this many files at most


class DicomExtraMissingError(UsageError):
    """A DICOM input or output was asked for but the ``dicom`` extra is not installed."""


class DicomSeriesError(InputError):
    """The input holds several series (or not the one asked for); ``series`` lists them."""

    def __init__(self, message: str, series: Sequence[SeriesInfo] = ()) -> None:
        super().__init__(message)
        self.series = tuple(series)


class DicomArchiveError(InputError):
    """A .zip input is unsafe (absolute paths, '..', links, too big) or unreadable."""


@dataclass(frozen=True)
class DicomSource:
    """What the DICOM writers need from the input series.

    datasets: the series' headers (no pixel data) in the scan's k order; they hold patient
    data, so they are kept out of repr and must never be logged. file_names: the slice files
    relative to the series folder (or inside the .zip), same order. multiframe: the series
    is one enhanced multi-frame file. choices: how the series was chosen from a study, one
    per channel (empty when the input held one series or ``--series`` named it);
    channel_names: the channels of Scan.data when chosen by channel. repairs: what
    ``repair_sop_uids`` filled in.
    """

    path: Path
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str | None
    modality: str
    file_names: tuple[str, ...]
    datasets: tuple["Dataset", ...] = field(repr=False)
    multiframe: bool = False
    choices: tuple[SeriesChoice, ...] = ()
    channel_names: tuple[str, ...] | None = None
    repairs: tuple[str, ...] = ()


def require_pydicom() -> Any:
    """Import pydicom, or explain how to install the extra."""
    try:
        import pydicom
    except ImportError as exc:
        raise DicomExtraMissingError(
            f"DICOM support is not installed (no module '{exc.name}'); expected the 'dicom' "
            f"extra for DICOM inputs and outputs. Install it: {DICOM_EXTRA_HINT}"
        ) from exc
    return pydicom


def _has_dicm_preamble(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _candidate_files(folder: Path) -> Iterator[Path]:
    """Regular files under ``folder``, hidden files and DICOMDIR indexes left out."""
    for path in sorted(folder.rglob("*")):
        if path.name.startswith(".") or path.name.upper() == "DICOMDIR":
            continue
        if path.is_file():
            yield path


def is_dicom_input(path: Path) -> bool:
    """True for a .zip file, or a folder with a DICOM file (``DICM`` at byte 128) among its
    first files (checked recursively, NIfTI files skipped; cheap enough for discovery)."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".zip" and zipfile.is_zipfile(path)
    if not path.is_dir():
        return False
    for count, candidate in enumerate(_candidate_files(path)):
        if count >= _PROBE_FILES:
            break
        if not candidate.name.lower().endswith((".nii", ".nii.gz")) and _has_dicm_preamble(candidate):
            return True
    return False


def _read_headers(folder: Path) -> tuple[list[tuple[str, "Dataset"]], int]:
    """(relative name, header) of every DICOM image file under ``folder``; and how many
    files with a DICOM preamble could not be parsed."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    images: list[tuple[str, Dataset]] = []
    unreadable = 0
    with quiet_pydicom():
        for path in _candidate_files(folder):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except InvalidDicomError:
                continue  # not DICOM (no preamble): notes, checksums, NIfTI exports
            except Exception:  # truncated/corrupt files raise many types
                unreadable += 1
                continue
            if "Rows" in ds and "Columns" in ds:  # a missing SeriesInstanceUID groups as ''
                images.append((path.relative_to(folder).as_posix(), ds))
    return images, unreadable


def _series_table(images: list[tuple[str, "Dataset"]]) -> dict[str, list[tuple[str, "Dataset"]]]:
    series: dict[str, list[tuple[str, Dataset]]] = {}
    for name, ds in images:
        series.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), []).append((name, ds))
    return series


def _choose_series(
    series: dict[str, list[tuple[str, "Dataset"]]], series_uid: str | None, path: Path, redact: Redactor,
    channels: Sequence[str],
) -> list[tuple[SeriesChoice | None, list[tuple[str, "Dataset"]]]]:  # fmt: skip
    """(choice, members) per channel: ``--series`` first, the only series, else the rules of
    ``io.dicom_select`` (one series per channel of a multi-channel task)."""
    if series_uid is not None:
        if series_uid not in series:
            infos = sorted((describe_series(uid, m) for uid, m in series.items()),
                           key=lambda s: (s.number is None, s.number or 0, s.uid))
            listing = "; ".join(redact(info.line()) for info in infos)  # one line: errors are one line
            raise DicomSeriesError(
                f"'{path}' has no series with SeriesInstanceUID '{series_uid}'; it holds "
                f"{len(infos)} series: {listing}. Pass one of these UIDs.",
                infos,
            )
        return [(None, series[series_uid])]
    if len(series) == 1 and len(channels) < 2:
        return [(None, next(iter(series.values())))]
    try:
        return list(choose_series(series, channels, redact))
    except NoUsableSeries as exc:
        wanted = f" for channel '{exc.channel}'" if exc.channel else ""
        raise DicomSeriesError(
            f"'{path}' holds no usable DICOM series{wanted} among {len(series)}: {exc.seen}. Pass a folder "
            "with a cross-sectional series of the task's modality, or choose one with --series UID.",
            [describe_series(uid, m) for uid, m in series.items()],
        ) from None


def _stack(folder: Path, members: list[tuple[str, "Dataset"]], path: Path, redact: Redactor,
           unreadable: int) -> tuple[np.ndarray, np.ndarray, list[tuple[str, "Dataset"]], bool]:
    """(volume, RAS affine, members in k order, multiframe) of one series, in the stored
    voxel order of ``dicom_series.flip_rows`` (dcm2niix's)."""
    if any(number_of_frames(ds) > 1 for _, ds in members):
        volume_ijk, affine = read_multiframe(folder, members, path, redact)
        multiframe = True
    else:
        members, affine = sort_slices(members, path, redact, unreadable)
        volume_ijk = _read_slices(folder, members, path, redact)
        multiframe = False
    volume_ijk, affine = flip_rows(volume_ijk, affine)
    return volume_ijk, affine, members, multiframe


def read_dicom(
    path: Path, series_uid: str | None = None, channels: Sequence[str] = ()
) -> tuple[Scan, DicomSource]:
    """Read one DICOM series (one per channel) from a folder or a .zip into a ``Scan`` plus
    the ``DicomSource`` of the first channel's series.

    series_uid picks the series (``--series``); otherwise a folder of one series is read as
    it is, and a study of several is chosen from by ``io.dicom_select``'s rules, one series
    per channel name in ``channels`` (task card channels: ("ct",), ("ct", "pet")). Several
    channels must share one grid. Scan.data is float32 [C, Z, Y, X] internal RAS order with
    the modality rescale (HU for CT) applied; Scan.path is the input path; Scan.image is an
    in-memory NIfTI (no patient data in its header) in dcm2niix's voxel order
    (``dicom_series.flip_rows``), to use as the output template.
    """
    require_pydicom()
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"input '{path}' does not exist; expected a DICOM series folder or a .zip of one.")
    require_regular_file(path, "DICOM input")  # a FIFO would block the zip reader
    with tempfile.TemporaryDirectory(prefix="uniseg-dicom-") as tmp:
        tmp_dir = Path(tmp)
        folder = _unpacked(path, tmp_dir)
        images, unreadable = _read_headers(folder)
        if not images:
            extra = f" ({unreadable} DICOM files could not be parsed)" if unreadable else ""
            raise InputNotFoundError(
                f"'{path}' holds no DICOM images{extra}; expected the files of one series (with "
                "'DICM' at byte 128). Pass the folder that holds the slice files."
            )
        redact = Redactor.from_datasets([ds for _, ds in images])
        chosen = _choose_series(_series_table(images), series_uid, path, redact, channels)
        stacks = [_stack(folder, members, path, redact, unreadable) for _, members in chosen]
        volume_ijk, affine = channel_volume(stacks, [c for c, _ in chosen], path)
        scan = _to_scan(volume_ijk, affine, path, tmp_dir)
    _, _, members, multiframe = stacks[0]
    first = members[0][1]
    datasets = tuple(ds for _, ds in members)
    source = DicomSource(
        path=path,
        series_instance_uid=str(first.get("SeriesInstanceUID", "") or ""),
        study_instance_uid=str(first.get("StudyInstanceUID", "") or ""),
        frame_of_reference_uid=str(first.FrameOfReferenceUID) if first.get("FrameOfReferenceUID") else None,
        modality=str(getattr(first, "Modality", "") or ""),
        file_names=tuple(name for name, _ in members),
        datasets=datasets,
        multiframe=multiframe,
        choices=tuple(c for c, _ in chosen if c is not None),
        channel_names=tuple(c.channel for c, _ in chosen if c is not None and c.channel) or None,
        repairs=repair_sop_uids(datasets),
    )
    log.debug("read DICOM series: %d slices, shape %s", len(members), scan.file_shape)
    return scan, source


def _unpacked(path: Path, tmp_dir: Path) -> Path:
    """The folder to read: ``path`` itself, or a .zip unpacked (safely) into ``tmp_dir``."""
    if not path.is_file():
        return path
    if not (path.suffix.lower() == ".zip" and zipfile.is_zipfile(path)):
        raise ImageFormatError(
            f"'{path}' is neither a folder nor a .zip; expected a DICOM series folder or a "
            ".zip of one. Pass the folder holding the slice files."
        )
    return extract_zip(path, tmp_dir / "unpacked", error=DicomArchiveError, max_bytes=MAX_ARCHIVE_BYTES,
                       max_files=MAX_ARCHIVE_FILES, fix=ARCHIVE_FIX)


def _pixels(ds: "Dataset", name: str, path: Path, redact: Redactor) -> np.ndarray:
    """Decoded stored values of one file; decoder problems name the transfer syntax."""
    syntax = ds.file_meta.get("TransferSyntaxUID", None) if hasattr(ds, "file_meta") else None
    syntax_name = getattr(syntax, "name", str(syntax))
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # decoders raise RuntimeError, NotImplementedError, ValueError...
        raise ImageFormatError(
            redact(
                f"cannot decode the pixels of '{name}' in '{path}' (transfer syntax {syntax_name}: "
                f"{type(exc).__name__}: {' '.join(str(exc).split())}); expected a decodable image. "
                f"Re-copy the file if it is damaged; for compressed series install the decoders "
                f"({DICOM_EXTRA_HINT})."
            )
        ) from None  # no chained exception: its text may quote header values


def _read_slices(folder: Path, members: list[tuple[str, "Dataset"]], path: Path, redact: Redactor) -> np.ndarray:
    """float32 [i, j, k] = (column, row, slice) with each slice's rescale slope/intercept."""
    import pydicom

    first = members[0][1]
    shape = (int(first.Columns), int(first.Rows), len(members))
    budget = max_voxels()
    if shape[0] * shape[1] * shape[2] > budget:
        raise ImageShapeError(
            f"the series in '{path}' has {shape[2]} slices of {shape[1]}x{shape[0]} = "
            f"{shape[0] * shape[1] * shape[2]:,} voxels; expected at most {budget:,} ({MAX_VOXELS_ENV}). "
            f"Crop or resample the series, or raise {MAX_VOXELS_ENV}."
        )
    volume = np.empty(shape, dtype=np.float32)
    with quiet_pydicom():
        for k, (name, _) in enumerate(members):
            try:
                ds = pydicom.dcmread(folder / name)
            except Exception:
                raise ImageFormatError(
                    redact(f"cannot read '{name}' in '{path}' (truncated or corrupt); re-copy the series.")
                ) from None
            if str(getattr(ds, "SamplesPerPixel", 1)).strip() not in ("1", ""):
                raise ImageShapeError(
                    redact(f"'{name}' in '{path}' is a colour image; expected greyscale CT/MR/PET slices.")
                )
            if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                raise ImageFormatError(
                    redact(f"'{name}' in '{path}' has no pixel data (truncated?); expected an image. Re-copy it.")
                )
            pixels = _pixels(ds, name, path, redact)
            if pixels.shape != volume.shape[1::-1]:
                raise ImageFormatError(redact(
                    f"'{name}' in '{path}' decodes to {pixels.shape} pixels but its header says Rows x "
                    f"Columns {volume.shape[1]} x {volume.shape[0]}; the file is damaged. Re-export the series."
                ))
            slope = rescale_value(ds, "RescaleSlope", 1.0, name, path, redact)
            intercept = rescale_value(ds, "RescaleIntercept", 0.0, name, path, redact)
            # pixel_array is [rows, columns] = [j, i]; the volume is stored (i, j, k).
            with np.errstate(over="ignore", invalid="ignore"):  # checked just below
                scaled = (pixels.astype(np.float64) * slope + intercept).astype(np.float32)
            if not np.isfinite(scaled).all():
                raise ImageValueError(redact(
                    f"'{name}' in '{path}' has pixels that are not finite after RescaleSlope {slope:g} and "
                    f"RescaleIntercept {intercept:g}; expected finite intensities. Re-export the series."
                ))
            volume[:, :, k] = scaled.T
    return volume


def _to_scan(volume_ijk: np.ndarray, affine_ras: np.ndarray, path: Path, tmp_dir: Path) -> Scan:
    """Go through a temporary NIfTI so the Scan is built exactly like the NIfTI path's."""
    import nibabel as nib

    try:
        image = nib.Nifti1Image(volume_ijk, affine_ras)
        image.set_sform(affine_ras, code=1)  # 1 = scanner coordinates, as DICOM positions are
        image.set_qform(affine_ras, code=1)
    except (ValueError, nib.spatialimages.HeaderDataError):
        raise DicomGeometryError(
            f"the slices of '{path}' do not span a 3D volume (their orientation and positions give a "
            "degenerate voxel-to-world matrix); expected parallel slices along the normal. Re-export the series."
        ) from None
    image.header.set_xyzt_units("mm", "sec")
    tmp_file = tmp_dir / "series.nii"  # uncompressed: written and read once, speed matters
    nib.save(image, str(tmp_file))
    del image
    try:
        scan = read_scan(tmp_file)
    except UnisegError as exc:  # name the DICOM input, not the temporary file
        raise type(exc)(str(exc).replace(str(tmp_file), str(path))) from None
    # The template must outlive the temp file: keep its header, and as data a view of
    # scan.data in file order (no second copy of the volume in memory).
    header = scan.image.header
    template = nib.Nifti1Image(scan.reorientation.to_file(scan.data[0]), scan.image.affine, header=header)
    return Scan(path=path, data=scan.data, spacing_mm=scan.spacing_mm, reorientation=scan.reorientation, image=template)

