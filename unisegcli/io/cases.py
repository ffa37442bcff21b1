"""Read a discovered case (one file, several channel files, or a DICOM series) into a Scan."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from unisegcli.errors import ChannelError, ImageFormatError, ImageValueError
from unisegcli.io.discovery import CaseInput
from unisegcli.io.nifti import Scan, case_id as nifti_case_id, read_scan, scan_from_image

if TYPE_CHECKING:
    from unisegcli.io.dicom import DicomSource
    from unisegcli.weights.cards import TaskCard


@dataclass
class LoadedCase:
    """A case ready for the pipeline: the scan (all channels stacked), names and DICOM source."""

    case: CaseInput
    scan: Scan
    dicom: "DicomSource | None" = None

    @property
    def channel_names(self) -> tuple[str, ...] | None:
        if self.case.channel_names is None and self.dicom is not None and self.dicom.channel_names:
            return self.dicom.channel_names  # series chosen per channel from a DICOM study
        return self.case.channel_names


def dicom_channels(tasks: Sequence["TaskCard"]) -> tuple[str, ...]:
    """The channels to choose DICOM series for: those of the task that takes the most."""
    return max((tuple(t.channels) for t in tasks), key=len, default=())


def read_case(case: CaseInput, series_uid: str | None = None, channels: Sequence[str] = ()) -> LoadedCase:
    """Read every file of a case; channel files must share one grid (shape and affine).

    channels: the task channels ("ct", "pet"...), used to choose one series per channel when
    a DICOM input holds several (``io.dicom_select``); see ``dicom_channels``.
    """
    if case.dicom:
        from unisegcli.io.dicom import read_dicom

        scan, source = read_dicom(case.path, series_uid, channels)
        return LoadedCase(case, scan, source)
    scans = [read_scan(p) for p in case.paths]
    first = scans[0]
    _check_same_grid(scans)
    if len(scans) == 1:
        return LoadedCase(case, first)
    data = np.concatenate([s.data for s in scans], axis=0)
    return LoadedCase(case, replace(first, data=data))


def case_in_memory(image: Any, affine: Any = None, *, case_id: str = "case",
                   channels: Sequence[str] = ()) -> LoadedCase:
    """A LoadedCase from what ``Segmenter.predict`` takes: a path (NIfTI file, DICOM folder or
    .zip), a nibabel image, a numpy array [i, j, k] (or [i, j, k, C]) with its 4x4 ``affine``,
    or a mapping channel name -> any of these (multi-channel tasks; one grid for all).
    channels: the task channels, to choose series from a DICOM study (``read_case``)."""
    if isinstance(image, Mapping):
        parts = {str(name).lower(): case_in_memory(value, affine, case_id=case_id, channels=(str(name).lower(),))
                 for name, value in image.items()}
        if not parts:
            raise ChannelError("no channel given; expected a mapping such as {'ct': ..., 'pet': ...}.")
        first = next(iter(parts.values()))
        _check_same_grid([p.scan for p in parts.values()])
        data = np.concatenate([p.scan.data for p in parts.values()], axis=0)
        case = CaseInput(case_id, first.case.paths, tuple(parts))
        return LoadedCase(case, replace(first.scan, data=data), first.dicom)
    if isinstance(image, (str, Path)):
        path = Path(image)
        dicom = path.is_dir() or path.suffix.lower() == ".zip"
        cid = case_id if case_id != "case" else nifti_case_id(path)
        return read_case(CaseInput(cid, (path,), dicom=dicom), channels=channels)
    import nibabel as nib

    label = Path(f"<{case_id}>")
    if isinstance(image, np.ndarray):
        if affine is None:
            raise ImageValueError(f"a numpy array of shape {image.shape} was given without its affine; expected "
                                  "predict(array, affine) with the 4x4 voxel-to-world matrix (mm).")
        matrix = np.asarray(affine, dtype=float)
        if matrix.shape != (4, 4):
            raise ImageValueError(f"the affine has shape {matrix.shape}; expected a 4x4 voxel-to-world matrix.")
        image = nib.Nifti1Image(np.asarray(image), matrix)
        image.set_qform(matrix, code=1)
        image.set_sform(matrix, code=1)
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageFormatError(f"predict() got {type(image).__name__}; expected a path, a nibabel NIfTI image, "
                               "or a numpy array with its affine.")
    return LoadedCase(CaseInput(case_id, (label,)), scan_from_image(image, label))


def _check_same_grid(scans: Sequence[Scan]) -> None:
    first = scans[0]
    for other in scans[1:]:
        same_shape = other.data.shape[1:] == first.data.shape[1:]
        if not (same_shape and np.allclose(other.image.affine, first.image.affine, atol=1e-3)):
            raise ChannelError(
                f"channel file '{other.path}' (shape {other.file_shape}) is not on the grid of "
                f"'{first.path}' (shape {first.file_shape}); expected all channels of a case with "
                "the same shape and affine. Resample them to one grid first."
            )


def task_channels(loaded: LoadedCase, task: "TaskCard") -> np.ndarray:
    """The [C, Z, Y, X] channels a task needs, in the task card's order.

    Named channels (``--channel``, CSV columns) are picked by name; unnamed ones are taken in
    order and must be exactly as many as the task needs.
    """
    data, names = loaded.scan.data, loaded.channel_names
    if names is not None:
        missing = [c for c in task.channels if c not in names]
        if missing:
            raise ChannelError(
                f"case '{loaded.case.case_id}' has channels {', '.join(names)}; task '{task.name}' "
                f"needs {', '.join(task.channels)} (missing {', '.join(missing)}). Add "
                f"--channel {missing[0]}=PATH (or a '{missing[0]}' column in the input list)."
            )
        return data[[names.index(c) for c in task.channels]]
    if data.shape[0] != len(task.channels):
        raise ChannelError(
            f"'{loaded.case.path}' has {data.shape[0]} channel(s); task '{task.name}' expects "
            f"{len(task.channels)}: {', '.join(task.channels)} (in this order). Pass a 4D image with "
            "these channels, one file per channel (case_0000.nii.gz, case_0001.nii.gz, ...), or "
            "--channel NAME=PATH for each."
        )
    return data


def channel_groups(tasks: Sequence["TaskCard"]) -> list[list["TaskCard"]]:
    """Tasks grouped by the channels they take (each group is one input for the predictor)."""
    groups: dict[tuple[str, ...], list[TaskCard]] = {}
    for task in tasks:
        groups.setdefault(tuple(task.channels), []).append(task)
    return list(groups.values())
