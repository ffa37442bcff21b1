"""Read a discovered case (one file, several channel files, or a DICOM series) into a Scan."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np

from unisegcli.errors import ChannelError
from unisegcli.io.discovery import CaseInput
from unisegcli.io.nifti import Scan, read_scan

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
        return self.case.channel_names


def read_case(case: CaseInput, series_uid: str | None = None) -> LoadedCase:
    """Read every file of a case; channel files must share one grid (shape and affine)."""
    if case.dicom:
        from unisegcli.io.dicom import read_dicom

        scan, source = read_dicom(case.path, series_uid)
        return LoadedCase(case, scan, source)
    scans = [read_scan(p) for p in case.paths]
    first = scans[0]
    for other in scans[1:]:
        same_shape = other.data.shape[1:] == first.data.shape[1:]
        same_grid = same_shape and np.allclose(other.image.affine, first.image.affine, atol=1e-3)
        if not same_grid:
            raise ChannelError(
                f"channel file '{other.path}' (shape {other.file_shape}) is not on the grid of "
                f"'{first.path}' (shape {first.file_shape}); expected all channels of a case with "
                "the same shape and affine. Resample them to one grid first."
            )
    if len(scans) == 1:
        return LoadedCase(case, first)
    data = np.concatenate([s.data for s in scans], axis=0)
    return LoadedCase(case, replace(first, data=data))


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
