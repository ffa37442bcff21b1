"""Build small DICOM series for tests: a few 16x16 slices with chosen tags, geometry and
transfer syntax (pydicom's encoders compress them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    PositronEmissionTomographyImageStorage,
    generate_uid,
)

SOP_CLASSES = {"CT": CTImageStorage, "PT": PositronEmissionTomographyImageStorage}


def pattern(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """int16 [column, row, slice] values with no symmetry, so any flip or swap shows."""
    i, j, k = np.indices(shape)
    return ((i * 7 + j * 13 + k * 29 + seed * 31) % 400 - 150).astype(np.int16)


def make_series(
    folder: Path,
    *,
    shape: tuple[int, int, int] = (16, 16, 6),
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 3.0),
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    origin_lps: tuple[float, float, float] = (-8.0, -8.0, 0.0),
    modality: str = "CT",
    description: str = "AX",
    number: int | None = 3,
    image_type: str = "ORIGINAL\\PRIMARY\\AXIAL",
    sop_class: str | None = None,
    syntax: str | None = None,
    values: np.ndarray | None = None,
    study_uid: str | None = None,
    frame_uid: str | None = None,
    blank: tuple[str, ...] = (),
    blank_meta: bool = False,
    extra: dict[str, Any] | None = None,
) -> tuple[str, np.ndarray]:
    """Write one file per slice into ``folder``; returns (SeriesInstanceUID, values [i, j, k]).

    spacing_mm: (between columns, between rows, between slices); orientation: the row then
    column direction cosines (LPS). blank: attributes written as empty strings (as some
    anonymisers leave them); blank_meta: also blank the file meta's SOP class/instance UIDs.
    Files are written in shuffled order under names that do not follow the position. No
    PatientSex and no StudyDate: anonymised exports lack such Type 2 attributes.
    """
    volume = pattern(shape) if values is None else values.astype(np.int16)
    row_cos, col_cos = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row_cos, col_cos)
    series, study = generate_uid(), study_uid or generate_uid()
    frame = frame_uid or generate_uid()
    sop = sop_class or SOP_CLASSES.get(modality, CTImageStorage)
    folder.mkdir(parents=True, exist_ok=True)
    for number_in_file, k in enumerate(np.random.default_rng(shape[2]).permutation(shape[2])):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = instance = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = sop, instance
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "ZZSENTINEL^QQPRIVATE", "SENTINELID77", "19231231"
        ds.Modality, ds.SeriesDescription, ds.ImageType = modality, description, image_type.split("\\")
        if number is not None:
            ds.SeriesNumber = number
        ds.InstanceNumber = int(k) + 1  # instance numbers follow position, file names do not
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        position = np.array(origin_lps) + k * spacing_mm[2] * normal
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.PixelSpacing = [f"{spacing_mm[1]:g}", f"{spacing_mm[0]:g}"]  # (between rows, between columns)
        ds.SliceThickness = f"{spacing_mm[2]:g}"
        stored = np.ascontiguousarray(volume[:, :, k].T + 1024).astype(np.uint16)  # [row, column]
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = stored.tobytes()
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        if syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax  # the whole data set is deflated on save
        elif syntax is not None:
            ds.compress(syntax, stored, generate_instance_uid=False)
        for keyword in blank:  # after compress(), which would write UIDs back
            setattr(ds, keyword, "")
        if blank_meta:
            ds.file_meta.MediaStorageSOPClassUID = ds.file_meta.MediaStorageSOPInstanceUID = ""
        ds.preamble = b"\0" * 128
        # pydicom refuses blank meta UIDs in a conformant file; write it as found in the wild.
        ds.save_as(folder / f"F{number_in_file:03d}_{k}", enforce_file_format=not blank_meta)
    return series, volume


def gdcm_recompress(folder: Path, syntax_name: str = "JPEGLosslessProcess14_1") -> None:
    """Re-encode every file of ``folder`` with GDCM (pydicom has no JPEG lossless encoder)."""
    import gdcm

    for path in sorted(folder.iterdir()):
        reader = gdcm.ImageReader()
        reader.SetFileName(str(path))
        if not reader.Read():
            raise RuntimeError(f"gdcm cannot read {path}")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax_name)))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError(f"gdcm cannot encode {path}")
        writer = gdcm.ImageWriter()
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        writer.SetFileName(str(path))
        if not writer.Write():
            raise RuntimeError(f"gdcm cannot write {path}")
