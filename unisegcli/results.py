"""What a Segmenter returns: ``Segmentation`` for one scan in memory, ``Result`` for a batch run.

    seg = segmenter.predict(nib.load("scan.nii.gz"))
    seg.masks["liver"]            # uint8 [i, j, k], the input's own voxel order and shape
    seg.affine                    # the input's affine
    seg.save("out/")              # exactly the files `uniseg scan.nii.gz -o out/` writes
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from unisegcli.errors import ExitCode

if TYPE_CHECKING:
    from unisegcli.io.cases import LoadedCase
    from unisegcli.outputs.writer import CaseOutputs, OutputOptions
    from unisegcli.weights.cards import ModelCard, TaskCard


@dataclass
class Segmentation:
    """One scan's result, in memory. Nothing is on disk until ``save``.

    label_maps: task -> uint8 [Z, Y, X] label map in the scan's internal (RAS, z, y, x)
    orientation, as the family predicted it. The masks, label map and statistics are derived
    from them with the Segmenter's output options (``--structures``, cleanup), so they equal
    what ``save`` writes.
    """

    loaded: "LoadedCase"
    tasks: tuple["TaskCard", ...]
    label_maps: dict[str, np.ndarray]
    outputs: "OutputOptions"
    warnings: list[str] = field(default_factory=list)
    # seconds: read, predict (= prepare + network + finish for a family that runs in stages)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def case_id(self) -> str:
        return self.loaded.case.case_id

    @property
    def affine(self) -> np.ndarray:
        """The input's 4x4 voxel-to-world matrix (the masks' affine)."""
        return np.asarray(self.loaded.scan.image.affine)

    @property
    def task_of(self) -> dict[str, str]:
        """structure -> task."""
        return {s: t.name for t in self.tasks for s in t.structures}

    @cached_property
    def masks_zyx(self) -> Mapping[str, np.ndarray]:
        """structure -> bool [Z, Y, X] in internal orientation, selected and cleaned as written."""
        from unisegcli.outputs.writer import selected_masks

        where = {s: (t.name, i) for t in self.tasks for i, s in t.labels.items()}
        return selected_masks(self.label_maps, where, self.outputs, self.loaded.scan)

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """structure -> uint8 0/1 mask with the input's exact shape and voxel order."""
        to_file = self.loaded.scan.reorientation.to_file
        return {name: np.ascontiguousarray(to_file(np.asarray(m, dtype=np.uint8)))
                for name, m in self.masks_zyx.items()}

    @property
    def label_map(self) -> np.ndarray:
        """All structures in one map in the input's voxel order (ids as ``labels``; where
        structures overlap the task listed first wins), as ``--multilabel`` writes it."""
        from unisegcli.outputs.multilabel import build_multilabel

        labels = build_multilabel(self.masks_zyx, self.task_of, self.model_of).labels_zyx
        return np.ascontiguousarray(self.loaded.scan.reorientation.to_file(labels))

    @property
    def model_of(self) -> dict[str, str] | None:
        """structure -> model; None for one model (a run of several: ``unisegcli.combination``)."""
        return None

    @property
    def labels(self) -> dict[int, str]:
        """label_map id -> structure name."""
        return {i: name for i, name in enumerate(self.masks_zyx, start=1)}

    @cached_property
    def statistics(self) -> dict[str, Any]:
        """The ``statistics.json`` document of the masks (volumes, intensities, components)."""
        from unisegcli.outputs.statistics import case_statistics

        return case_statistics(self.loaded.scan, self.masks_zyx, case_id=self.case_id, task_of=self.task_of,
                               channel_names=self.channel_names, model_of=self.model_of)

    @property
    def channel_names(self) -> tuple[str, ...] | None:
        """Names of the scan's channels: as given, else those of the task whose count matches."""
        if self.loaded.channel_names:
            return self.loaded.channel_names
        count = self.loaded.scan.data.shape[0]
        return next((tuple(t.channels) for t in self.tasks if len(t.channels) == count), None)

    def save(self, folder: str | Path, *, cohort_folder: Path | None = None) -> "CaseOutputs":
        """Write every output file into ``folder`` (all-or-nothing), exactly as the CLI does."""
        from unisegcli.outputs.writer import write_case_outputs

        return write_case_outputs(
            self.loaded.scan, self.masks_zyx, Path(folder), self.outputs,
            task_of=self.task_of,
            dicom_source=self.loaded.dicom,
            case_id=self.case_id,
            channel_names=self.channel_names,
            modality=self.tasks[0].modality.split("+")[0],
            cohort_folder=cohort_folder,
            selected=True,
            statistics=self.__dict__.get("statistics"),
            model_of=self.model_of,
            extra_files=self._extra_files(),
        )

    def _extra_files(self) -> dict[str, str]:
        """Further files of the case, name -> text (a run of several models adds compare.json)."""
        return {}


@dataclass
class CaseResult:
    """What one case of a batch produced: output files, volumes per structure, and timings."""

    case_id: str
    input_path: Path
    output_dir: Path
    masks: dict[str, Path]
    volumes_ml: dict[str, float]
    seconds: float
    files: list[Path] = field(default_factory=list)  # every file written for the case
    worker: str | None = None  # "w1@cuda:1" when worker processes ran the batch
    flags: dict[str, list[str]] = field(default_factory=dict)  # structure -> QC flags raised (outputs.qc)
    compare: dict[str, Any] = field(default_factory=dict)  # --compare: structure -> model pairs (Dice, volumes)
    input_series: list[dict[str, Any]] = field(default_factory=list)  # DICOM series chosen from a study, and why
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage: read, prepare, network, finish, write


@dataclass
class CaseFailure:
    """A case that failed in a batch: what went wrong, in one line."""

    case_id: str
    input_path: Path
    error: str
    message: str
    exit_code: int
    worker: str | None = None


@dataclass
class Result:
    """The outcome of a batch run: each case done, skipped (already done) or failed."""

    model: "ModelCard"
    tasks: tuple["TaskCard", ...]
    device: str
    output: Path
    cases: list[CaseResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[CaseFailure] = field(default_factory=list)
    interrupted: bool = False

    @property
    def exit_code(self) -> ExitCode:
        """OK; INTERRUPTED; ALL_FAILED when nothing succeeded; PARTIAL when some cases failed."""
        if self.interrupted:
            return ExitCode.INTERRUPTED
        if not self.failures:
            return ExitCode.OK
        return ExitCode.PARTIAL if (self.cases or self.skipped) else ExitCode.ALL_FAILED
