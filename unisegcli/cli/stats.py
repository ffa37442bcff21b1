"""`uniseg stats`: the statistics (and QC flags) of existing masks, as `uniseg segment` writes them.

    uniseg stats --image scan.nii.gz out/scan/ -o again/ --model uniseg
    uniseg stats --image ct.nii.gz ts_multilabel.nii.gz -o stats/          # TotalSegmentator --ml
    uniseg stats --image ct.nii.gz labels.nii.gz --labels dataset.json -o stats/

Which masks are accepted is described in ``unisegcli.outputs.mask_files``; the numbers come
from the same ``case_statistics`` as a segmentation run, so on our own outputs (with the run's
``--model``) they are the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional, Sequence

import typer

from unisegcli.cli import console
from unisegcli.errors import UsageError

if TYPE_CHECKING:
    from unisegcli.outputs.mask_files import MaskFiles
    from unisegcli.weights.cards import ModelCard


def _model_facts(card: "ModelCard", structures: Sequence[str], channel_count: int) -> tuple[list[str], dict[str, str], tuple[str, ...] | None]:
    """(structure order, structure -> task, channel names) a run of this model would use."""
    order: list[str] = []
    task_of: dict[str, str] = {}
    for task in card.tasks:
        for index in sorted(task.labels):
            name = task.labels[index]
            if name not in task_of:
                order.append(name)
                task_of[name] = task.name
    used = [t for t in card.tasks if any(n in structures for n in t.labels.values())]
    channels = next((tuple(t.channels) for t in used if len(t.channels) == channel_count), None)
    return order, task_of, channels


def _channel_names(option: str | None, model_channels: tuple[str, ...] | None, count: int) -> tuple[str, ...] | None:
    if option is None:
        return model_channels
    names = tuple(n.strip() for n in option.split(",") if n.strip())
    if len(names) != count:
        raise UsageError(f"--channels names {len(names)} channel(s) ({', '.join(names)}) but the image has "
                         f"{count}; expected one name per channel, e.g. --channels ct.")
    return names


def _print_summary(statistics: dict, json_path: Path) -> None:
    out = console.stdout()
    flagged = statistics.get("flagged", {})
    for name, rec in statistics["structures"].items():
        flags = ", ".join(flagged.get(name, [])) or "-"
        out.print(f"{name}\t{rec['volume_ml']:.2f} ml\tflags: {flags}", highlight=False, markup=False, soft_wrap=True)
    console.stderr().print(f"wrote {json_path} and {json_path.with_suffix('.csv').name}", highlight=False,
                           markup=False, soft_wrap=True)


def stats_command(
    masks: Annotated[list[Path], typer.Argument(
        help="Masks: per-structure .nii/.nii.gz files, a label map with its names (labels.json, "
             "--labels, or TotalSegmentator's embedded table), or folders of them.")],
    image: Annotated[Path, typer.Option("--image", "-i", help="The scan the masks were drawn on (same voxel grid).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for statistics.json and statistics.csv.")],
    labels: Annotated[Optional[Path], typer.Option(
        "--labels", help="Label table of the one label map given: labels.json, {\"1\": \"liver\"} or "
                         "an nnU-Net dataset.json.")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="Take task names, structure order and channel names from this model "
                              "(the one that made the masks).")] = None,
    channels: Annotated[Optional[str], typer.Option(
        "--channels", help="Names of the image's channels, comma-separated (default: the model's, or 'image').")] = None,
    case_id: Annotated[Optional[str], typer.Option(
        "--case-id", help="Case id in the statistics (default: the image's file name without .nii.gz).")] = None,
    cohort: Annotated[Optional[Path], typer.Option(
        "--cohort", help="Also merge the rows into COHORT/statistics.csv and COHORT/qc.csv.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
) -> None:
    """Statistics and QC flags of existing masks (ours, TotalSegmentator's, any label map)."""
    from unisegcli.io.nifti import read_scan
    from unisegcli.outputs.mask_files import collect_mask_files, order_like
    from unisegcli.outputs.statistics import case_statistics, merge_cohort_qc, merge_cohort_statistics, write_statistics

    scan = read_scan(image)
    found: MaskFiles = collect_mask_files(scan, masks, labels)
    task_of = dict(found.task_of)
    model_channels = None
    if model is not None:
        from unisegcli.weights.resolver import get_model

        order, model_tasks, model_channels = _model_facts(get_model(model), list(found), scan.data.shape[0])
        found = order_like(found, list(dict.fromkeys([*found.run_order, *order])))  # a run's own order first
        task_of = {**model_tasks, **task_of}  # a label table's own tasks win over the registry's
    names = _channel_names(channels, model_channels, scan.data.shape[0])
    statistics = case_statistics(scan, found, case_id=case_id, task_of=task_of, channel_names=names,
                                 model_of=dict(found.model_of) or None)
    json_path, _ = write_statistics(statistics, output)
    if cohort is not None:
        from unisegcli.io.nifti import check_output_dir

        check_output_dir(Path(cohort))
        merge_cohort_statistics(Path(cohort) / "statistics.csv", statistics)
        merge_cohort_qc(Path(cohort), statistics)
    if not quiet:
        _print_summary(statistics, json_path)


def register(app: typer.Typer) -> None:
    """Add `stats` to the app."""
    app.command("stats")(stats_command)
