"""The one entry the pipeline calls to write a case: select, clean up, then write everything.

    options = OutputOptions(structures=("liver",), multilabel=True, preview=True)
    outputs = write_case_outputs(scan, masks_zyx, folder, options, task_of={"liver": "liver"})
    outputs.volumes_ml["liver"]

Order of work: ``--structures`` picks masks (unknown names fail with a suggestion), cleanup
(``--min-component-ml`` first, then ``--largest-component``) changes them, statistics are
computed on the cleaned masks — the numbers describe the files written — and then every
file of the case (masks or the DICOM object, segmentation + labels, statistics, preview) is
staged and renamed in one block: all files of a case appear together or none does. The
cohort tables ``<cohort_folder>/statistics.csv`` and ``<cohort_folder>/qc.csv`` (flagged
structures, see ``outputs.qc``) are merged afterwards, under their file locks.

Files in ``folder``:
    <structure>.nii.gz           output_type "nifti": uint8 0/1, the input's exact geometry
    segmentation.dcm             output_type "dicom-seg" (DICOM inputs only)
    rtstruct.dcm                 output_type "rtstruct" (DICOM inputs only)
    segmentation.nii.gz + labels.json    --multilabel
    statistics.json + statistics.csv     unless --no-statistics
    preview.png                  --preview
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from unisegcli.errors import OutputError, UsageError, suggest
from unisegcli.io.atomic import staged_files
from unisegcli.io.nifti import Scan, check_output_dir, label_image
from unisegcli.outputs.masks import LabelMasks
from unisegcli.outputs.statistics import voxel_volume_ml

if TYPE_CHECKING:
    from unisegcli.io.dicom import DicomSource

OUTPUT_TYPES = ("nifti", "dicom-seg", "rtstruct")


@dataclass(frozen=True)
class OutputOptions:
    """What to write for each case (the CLI's output options, one field each)."""

    structures: tuple[str, ...] | None = None  # None: every structure of the tasks
    multilabel: bool = False
    largest_component: bool = False
    min_component_ml: float = 0.0
    preview: bool = False
    statistics: bool = True
    output_type: str = "nifti"

    def check(self) -> None:
        """Raise UsageError for values no case could use (call it before loading weights)."""
        if self.output_type not in OUTPUT_TYPES:
            raise UsageError(
                f"unknown --output-type '{self.output_type}'{suggest(self.output_type, OUTPUT_TYPES)} "
                f"Expected one of: {', '.join(OUTPUT_TYPES)}."
            )
        if not (math.isfinite(self.min_component_ml) and self.min_component_ml >= 0):
            raise UsageError(
                f"--min-component-ml is {self.min_component_ml}; expected a number of ml >= 0 "
                "(0 keeps every component)."
            )
        if self.structures is not None and not self.structures:
            raise UsageError("--structures is empty; expected one or more structure names, e.g. 'liver'.")


@dataclass
class CaseOutputs:
    """Paths written for one case (None where that output was not asked for) and volumes."""

    folder: Path
    masks: dict[str, Path]
    volumes_ml: dict[str, float]
    statistics_json: Path | None = None
    statistics_csv: Path | None = None
    preview: Path | None = None
    multilabel: Path | None = None
    labels_json: Path | None = None
    dicom: Path | None = None
    cohort_statistics: Path | None = None
    cohort_qc: Path | None = None
    files: list[Path] = field(default_factory=list)
    flagged: dict[str, list[str]] = field(default_factory=dict)  # structure -> QC flags raised
    compare: dict[str, Any] = field(default_factory=dict)  # --compare: structure -> model pairs


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def select_structures(requested: Sequence[str] | None, available: Sequence[str]) -> tuple[str, ...]:
    """The structures to write, in ``available`` (pipeline) order.

    requested: names as typed (case and '-'/'_' ignored), None for all. An unknown name
    raises UsageError with a did-you-mean suggestion; call this with the tasks' structures
    before inference to fail early.
    """
    if requested is None:
        return tuple(available)
    by_key = {_key(a): a for a in available}
    wanted = set()
    for name in requested:
        if _key(name) not in by_key:
            raise UsageError(
                f"unknown structure '{name}' in --structures{suggest(_key(name), list(by_key))} "
                f"The chosen tasks have {len(available)} structures: {', '.join(available)}."
            )
        wanted.add(by_key[_key(name)])
    return tuple(a for a in available if a in wanted)


def clean_masks(masks_zyx: Mapping[str, np.ndarray], options: OutputOptions, voxel_ml: float) -> dict[str, np.ndarray]:
    """Apply --min-component-ml, then --largest-component (26-connectivity) to every mask."""
    from unisegcli.postprocessing.components import largest_component, remove_small_components

    cleaned = {}
    for name, mask in masks_zyx.items():
        mask = np.asarray(mask, dtype=bool)
        if options.min_component_ml > 0:
            mask = remove_small_components(mask, options.min_component_ml, voxel_ml)
        if options.largest_component:
            mask = largest_component(mask)
        cleaned[name] = mask
    return cleaned


def select_and_clean(masks_zyx: Mapping[str, np.ndarray], options: OutputOptions,
                     voxel_ml: float) -> Mapping[str, np.ndarray]:
    """The masks to write: ``--structures`` picks (pipeline order kept), then the cleanup.
    Label-map masks stay lazy (computed on access) when there is no cleanup."""
    selected = select_structures(options.structures, list(masks_zyx))
    if isinstance(masks_zyx, LabelMasks) and not (options.min_component_ml > 0 or options.largest_component):
        return masks_zyx.subset(selected)  # no copies held
    return clean_masks({n: masks_zyx[n] for n in selected}, options, voxel_ml)


def selected_masks(label_maps: Mapping[str, np.ndarray], where: Mapping[str, tuple[str, int]],
                   options: OutputOptions, scan: Scan) -> Mapping[str, np.ndarray]:
    """structure -> bool [Z, Y, X] masks of task label maps as written. where: structure ->
    (task, label value), in output order."""
    return select_and_clean(LabelMasks(label_maps, where), options, voxel_volume_ml(scan.image.affine))


def _check_file_names(names: Sequence[str]) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise OutputError(
                f"two outputs of a case would be named '{name}' (a structure named like a fixed "
                "output file?); expected distinct names. Rename the structure in the registry."
            )
        seen.add(name)
        if "/" in name or "\\" in name or name.startswith("."):
            raise OutputError(f"output name '{name}' is not a plain file name; expected no '/' or leading '.'.")


def output_names(structures: Sequence[str], options: OutputOptions, extra: Sequence[str] = ()) -> dict[str, str]:
    """{role: file name} of every file a case writes for these (selected) structures; extra:
    names of further files (role ``extra:<name>``, e.g. ``compare.json``)."""
    from unisegcli.outputs.dicom_out import OUTPUT_FILE_NAMES

    names: dict[str, str] = {}
    if options.output_type == "nifti":
        names.update({f"mask:{n}": f"{n}.nii.gz" for n in structures})
    else:
        names["dicom"] = OUTPUT_FILE_NAMES[options.output_type]
    if options.multilabel and structures:
        names.update(multilabel="segmentation.nii.gz", labels_json="labels.json")
    if options.statistics:
        names.update(statistics_json="statistics.json", statistics_csv="statistics.csv")
    if options.preview:
        names["preview"] = "preview.png"
    names.update({f"extra:{name}": name for name in extra})
    _check_file_names(list(names.values()))
    return names


def check_inputs_spared(folder: Path, names: Sequence[str], inputs: Sequence[Path]) -> None:
    """Refuse outputs that would replace an input file of the run (e.g. ``-o`` the scan's own
    folder with a scan named ``liver.nii.gz``): OutputError before anything is written."""
    taken = {Path(p).resolve() for p in inputs}
    for name in names:
        target = (Path(folder) / name).resolve()
        if target in taken:
            raise OutputError(
                f"output '{Path(folder) / name}' would overwrite the input scan of the same name; "
                "expected outputs apart from the inputs. Pass another -o folder."
            )


def _dicom_dataset(output_type: str, masks: Mapping[str, np.ndarray], scan: Scan,
                   source: "DicomSource | None", colors: Mapping[str, tuple[int, int, int]],
                   model_of: Mapping[str, str] | None = None) -> Any:
    """The DICOM SEG / RTSTRUCT dataset of the masks, or None for NIfTI outputs."""
    if output_type == "dicom-seg":
        from unisegcli.outputs.dicom_out import dicom_seg_dataset

        return dicom_seg_dataset(masks, scan, source, colors=colors, model_of=model_of)  # type: ignore[arg-type]
    if output_type == "rtstruct":
        from unisegcli.outputs.dicom_out import rtstruct_dataset

        return rtstruct_dataset(masks, scan, source, colors=colors, model_of=model_of)  # type: ignore[arg-type]
    return None


def _with_input_series(statistics: Mapping[str, Any], source: "DicomSource | None") -> Mapping[str, Any]:
    """statistics.json records which DICOM series was chosen from a study, and why."""
    if source is None or not source.choices:
        return statistics
    return {**statistics, "input_series": [choice.as_dict() for choice in source.choices]}


def _volumes_ml(masks: Mapping[str, np.ndarray], statistics: Mapping[str, Any] | None,
                voxel_ml: float) -> dict[str, float]:
    if statistics is not None:
        return {n: float(statistics["structures"][n]["volume_ml"]) for n in masks}
    return {n: float(np.count_nonzero(m)) * voxel_ml for n, m in masks.items()}


def write_case_outputs(
    scan: Scan,
    masks_zyx: Mapping[str, np.ndarray],
    folder: Path,
    options: OutputOptions,
    *,
    task_of: Mapping[str, str],
    dicom_source: "DicomSource | None" = None,
    case_id: str | None = None,
    channel_names: Sequence[str] | None = None,
    modality: str | None = None,
    cohort_folder: Path | None = None,
    selected: bool = False,
    statistics: Mapping[str, Any] | None = None,
    model_of: Mapping[str, str] | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> CaseOutputs:
    """Write every output of one case into ``folder``, all-or-nothing.

    masks_zyx: structure -> bool [Z, Y, X] in the scan's internal orientation, in pipeline
    order (tasks as listed, then label index): that order sets multilabel ids and overlap
    precedence (first listed wins, see ``outputs.multilabel``). task_of: structure -> task.
    dicom_source: from ``io.dicom.read_dicom``; required for output types dicom-seg/rtstruct.
    channel_names: names of scan.data's channels for the statistics (e.g. the task card's
    channels). modality: "CT"/"MR"/"PET" for the preview window (guessed when None).
    cohort_folder: if given (and not ``folder`` itself), the case's statistics rows are
    merged into ``cohort_folder/statistics.csv`` and its flagged structures into
    ``cohort_folder/qc.csv``. selected: ``masks_zyx`` already went through
    ``select_and_clean``. statistics: their ``case_statistics`` when already computed.
    model_of: structure -> model (runs of several models: recorded in statistics and labels.json).
    extra_files: file name -> text, staged with the case's other files (``compare.json``).
    """
    import nibabel as nib

    options.check()
    from unisegcli.outputs.dicom_out import check_dicom_output

    check_dicom_output(options.output_type, dicom_source)
    folder = Path(folder)
    voxel_ml = voxel_volume_ml(scan.image.affine)
    masks = masks_zyx if selected else select_and_clean(masks_zyx, options, voxel_ml)
    case = case_id if case_id is not None else scan.case_id

    extra_files = dict(extra_files or {})
    names = output_names(list(masks), options, list(extra_files))

    # Everything that can fail on content is computed before any file is staged.
    if not options.statistics:
        statistics = None
    elif statistics is None:
        from unisegcli.outputs.statistics import case_statistics

        statistics = case_statistics(scan, masks, case_id=case, task_of=task_of, channel_names=channel_names,
                                     model_of=model_of)
    if statistics is not None:
        from unisegcli.outputs.statistics import render_statistics

        json_text, csv_text = render_statistics(_with_input_series(statistics, dicom_source))
    from unisegcli.outputs.preview import render_preview, structure_colors

    colors = structure_colors(list(masks))
    dicom_dataset = _dicom_dataset(options.output_type, masks, scan, dicom_source, colors, model_of)
    preview = render_preview(scan.data, masks, scan.spacing_mm, modality=modality) if options.preview else None
    multilabel = None
    if "multilabel" in names:
        from unisegcli.outputs.multilabel import build_multilabel

        multilabel = build_multilabel(masks, task_of, model_of)

    check_output_dir(folder)
    with staged_files(folder) as stage:
        for name, mask in masks.items():
            if f"mask:{name}" in names:
                volume_ijk = scan.reorientation.to_file(mask.astype(np.uint8))
                nib.save(label_image(volume_ijk, scan.image), str(stage(names[f"mask:{name}"])))
        if dicom_dataset is not None:
            from unisegcli.io.dicom_privacy import quiet_pydicom

            with quiet_pydicom():  # write-validation warnings may quote patient fields
                dicom_dataset.save_as(stage(names["dicom"]), enforce_file_format=True)
        if multilabel is not None:
            from unisegcli.outputs.multilabel import multilabel_image

            nib.save(multilabel_image(multilabel, scan), str(stage(names["multilabel"])))
            labels_text = json.dumps(multilabel.labels_json(), indent=2, allow_nan=False) + "\n"
            stage(names["labels_json"]).write_text(labels_text, encoding="utf-8")
        if statistics is not None:
            stage(names["statistics_json"]).write_text(json_text, encoding="utf-8")
            stage(names["statistics_csv"]).write_text(csv_text, encoding="utf-8")
        if preview is not None:
            preview.image.save(stage(names["preview"]), format="PNG")
        for name, text in extra_files.items():
            stage(name).write_text(text, encoding="utf-8")

    def path(role: str) -> Path | None:
        return folder / names[role] if role in names else None
    outputs = CaseOutputs(
        folder=folder,
        masks={n: folder / names[f"mask:{n}"] for n in masks if f"mask:{n}" in names},
        volumes_ml=_volumes_ml(masks, statistics, voxel_ml),
        statistics_json=path("statistics_json"),
        statistics_csv=path("statistics_csv"),
        preview=path("preview"),
        multilabel=path("multilabel"),
        labels_json=path("labels_json"),
        dicom=path("dicom"),
        files=[folder / n for n in names.values()],
        flagged=dict(statistics["flagged"]) if statistics is not None else {},
    )
    if statistics is not None and cohort_folder is not None and Path(cohort_folder).resolve() != folder.resolve():
        _merge_cohort(outputs, statistics, Path(cohort_folder))
    return outputs


def _merge_cohort(outputs: CaseOutputs, statistics: Mapping[str, Any], cohort_folder: Path) -> None:
    """Merge a written case into the cohort tables ``statistics.csv`` and ``qc.csv``."""
    from unisegcli.outputs.statistics import merge_cohort_qc, merge_cohort_statistics

    outputs.cohort_statistics = merge_cohort_statistics(cohort_folder / "statistics.csv", statistics)
    outputs.cohort_qc = merge_cohort_qc(cohort_folder, statistics)
