"""The Python API: ``segment(...)``. The CLI is a thin shell over it.

    from unisegcli.api import segment
    result = segment(["scan.nii.gz"], "liver,kidney", output="out/")
    result.cases[0].volumes_ml["liver"]

Order of work: everything cheap that can be wrong (model, tasks, inputs, output folder) is
checked before the weights are loaded; then the network is loaded once and every case runs
through read -> preprocess -> sliding window (all tasks of a case in one pass) -> restore ->
write. Masks of a case are written all-or-nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from unisegcli.errors import ChannelError, UsageError
from unisegcli.io.discovery import CaseInput, discover
from unisegcli.io.nifti import Scan, check_header, check_output_dir, read_scan
from unisegcli.models.cards import ModelCard, TaskCard, get_model

if TYPE_CHECKING:
    import torch


@dataclass
class CaseResult:
    """What one case produced: mask files and volumes per structure, and timings."""

    case_id: str
    input_path: Path
    output_dir: Path
    masks: dict[str, Path]
    volumes_ml: dict[str, float]
    seconds: float


@dataclass
class Result:
    """The outcome of a run: the model and tasks used, and each case's result."""

    model: ModelCard
    tasks: tuple[TaskCard, ...]
    device: str
    cases: list[CaseResult] = field(default_factory=list)


class Events:
    """Progress hooks the API calls; the CLI subclasses this for bars and JSON events."""

    def run_started(self, model: ModelCard, tasks: Sequence[TaskCard], cases: Sequence[CaseInput], device: str) -> None:
        """Before the first case."""

    def case_started(self, case: CaseInput, number: int, total: int) -> None:
        """Before a case is read."""

    def windows(self, done: int, total: int) -> None:
        """Sliding-window progress inside the current case."""

    def case_done(self, result: CaseResult) -> None:
        """After a case's masks were written."""

    def run_finished(self, result: Result) -> None:
        """After the last case."""


def segment(
    inputs: Iterable[str | Path] | str | Path,
    tasks: str | Sequence[str],
    *,
    output: str | Path,
    model: str = "uniseg",
    device: str = "auto",
    batch_size: int | None = None,
    step: float = 0.5,
    tta: bool = False,
    precision: str = "auto",
    threads: int | None = None,
    offline: bool = False,
    events: Events | None = None,
) -> Result:
    """Segment scans with a registry model and write one mask per structure.

    inputs: NIfTI files or folders of them. tasks: "liver,kidney" or a list of names/aliases.
    A single input writes into ``output`` directly; several inputs into ``output/<case_id>/``.
    Raises the domain errors of ``unisegcli.errors``.
    """
    events = events or Events()
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    card = get_model(model)
    task_cards = card.resolve_tasks(list(tasks) if not isinstance(tasks, str) else tasks)
    cases = discover(Path(p) for p in inputs)
    # Fail on bad inputs before the (slow) weights load: headers of all cases, and the whole
    # first scan, which is kept for its run.
    for case in cases[1:]:
        check_header(case.path)
    first_scan = read_scan(cases[0].path)
    check_channels(first_scan, task_cards)
    out_root = check_output_dir(Path(output))
    torch_device = resolve_device(device)
    if threads:
        import torch

        torch.set_num_threads(threads)
    net = load_network(card, offline=offline)
    result = Result(model=card, tasks=task_cards, device=str(torch_device))
    events.run_started(card, task_cards, cases, str(torch_device))
    for number, case in enumerate(cases, start=1):
        events.case_started(case, number, len(cases))
        folder = out_root if len(cases) == 1 else out_root / case.case_id
        case_result = run_case(
            case,
            first_scan if number == 1 else read_scan(case.path),
            task_cards,
            net,
            folder,
            device=torch_device,
            batch_size=batch_size,
            step=step,
            tta=tta,
            precision=precision,
            progress=events.windows,
        )
        result.cases.append(case_result)
        events.case_done(case_result)
    events.run_finished(result)
    return result


def resolve_device(spec: str) -> "torch.device":
    """Turn --device into a torch device; the device module raises DeviceError when absent."""
    from unisegcli.inference.device import resolve_device as _resolve

    return _resolve(spec)


def load_network(card: ModelCard, *, offline: bool = False) -> Any:
    """Fetch (or find) the model's files and build its network in eval mode on the CPU."""
    from unisegcli.models.download import ensure_model

    files = ensure_model(card, offline=offline, quiet=True)
    if card.family == "uniseg":
        from unisegcli.models import load_uniseg

        return load_uniseg(files["checkpoint"], files.get("plans"))
    raise UsageError(
        f"model '{card.name}' is of family '{card.family}', which this version cannot run; "
        "expected family 'uniseg'. Upgrade uniseg or pick another model (`uniseg models`)."
    )


def check_channels(scan: Scan, tasks: Sequence[TaskCard]) -> None:
    """Every task must get exactly the channels its card lists."""
    for task in tasks:
        if scan.data.shape[0] != len(task.channels):
            raise ChannelError(
                f"'{scan.path}' has {scan.data.shape[0]} channel(s); task '{task.name}' expects "
                f"{len(task.channels)}: {', '.join(task.channels)} (in this order). Pass a 4D image "
                "with these channels, or one file per channel."
            )


def run_case(
    case: CaseInput,
    scan: Scan,
    tasks: Sequence[TaskCard],
    net: Any,
    folder: Path,
    *,
    device: "torch.device",
    batch_size: int | None,
    step: float,
    tta: bool,
    precision: str,
    progress: Any = None,
) -> CaseResult:
    """Predict all tasks of one scan in one pass and write its structure masks."""
    from unisegcli.inference.predictor import predict_case
    from unisegcli.outputs.masks import write_case_masks

    started = time.perf_counter()
    check_channels(scan, tasks)
    label_maps = predict_case(
        scan.data,
        scan.spacing_mm,
        list(tasks),
        net,
        device=device,
        batch_size=batch_size,
        step=step,
        tta=tta,
        precision=precision,
        progress=progress,
    )
    masks: dict[str, np.ndarray] = {}
    for task in tasks:
        labels = label_maps[task.name]
        for index, structure in task.labels.items():
            masks[structure] = labels == index
    paths = write_case_masks(masks, scan, folder)
    voxel_ml = abs(float(np.linalg.det(scan.image.affine[:3, :3]))) / 1000.0
    volumes = {name: float(np.count_nonzero(mask)) * voxel_ml for name, mask in masks.items()}
    return CaseResult(
        case_id=case.case_id,
        input_path=case.path,
        output_dir=folder,
        masks=paths,
        volumes_ml=volumes,
        seconds=time.perf_counter() - started,
    )
