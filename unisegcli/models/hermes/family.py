"""The Hermes family (``models.families``): structures by name, one forward per dataset.

Hermes' outputs depend on the whole token list (features attend to every task and modality
token; upstream ``inference/inference3d.py``), so we run what upstream validated: for
every dataset that a requested structure belongs to, one sliding-window pass whose every
forward carries the dataset's full index list plus the null token (-1) and the dataset's
modality id; the requested channels are then kept. Requesting one structure therefore gives
the same mask as requesting its whole dataset.

Task cards (registry task set ``hermes71``, one per dataset structure) carry in ``extra``:
``dataset``, ``structure``, ``modality_id``, ``dataset_indices`` (the token list without the
null token), ``default`` (this dataset answers the bare structure name), ``resampling``
(see ``preprocessing``) and for CHAOS ``modality_ids`` ({"t1": 2, "t2": 3}, picked with
``--modality``).

Blending: plain mean of sigmoid probabilities over windows (``--gaussian`` switches to the
engine's Gaussian); threshold 0.5 per structure; ``--step`` does not apply (Hermes' windows
always overlap by half). Runs in three stages (``prepare_case``, ``infer_case``, ``finish_case``)
that a batch overlaps across cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from unisegcli.errors import UsageError
from unisegcli.models.families import FamilyOption, ModelFamily, RunSettings

if TYPE_CHECKING:
    import torch

    from unisegcli.io.cases import LoadedCase
    from unisegcli.weights.cards import ModelCard, TaskCard

NULL_TOKEN = -1  # upstream appends one null token; -1 selects the task prior's last row
THRESHOLD = 0.5  # upstream: sigmoid >= 0.5 per channel
DEFAULT_WINDOW = (128, 128, 128)


def load(card: "ModelCard", files: Mapping[str, Path], *, settings: RunSettings | None = None,
         tasks: Sequence["TaskCard"] = ()) -> Any:
    """The Hermes network (EMA weights) from the cached checkpoint, with the card's window."""
    from unisegcli.models.hermes import load_hermes

    if settings is not None:
        check(card, tasks, settings)
    net = load_hermes(files["checkpoint"])
    net.window_zyx = window_of(card)  # type: ignore[assignment]
    return net


def window_of(card: "ModelCard") -> tuple[int, int, int]:
    window = (card.network or {}).get("window_zyx", DEFAULT_WINDOW)
    return tuple(int(w) for w in window)  # type: ignore[return-value]


def resolve_tasks(card: "ModelCard", names: str | Sequence[str]) -> tuple["TaskCard", ...]:
    """--tasks for Hermes: a structure name (its default dataset), ``<dataset>_<structure>``,
    ``<dataset>:<structure>``, or a dataset name for all of its structures."""
    if isinstance(names, str):
        names = names.split(",")
    wanted = [n.strip() for n in names if n.strip()]
    datasets: dict[str, list[TaskCard]] = {}
    for task in card.tasks:
        datasets.setdefault(str(task.extra.get("dataset", "")).lower(), []).append(task)
    cards: list[TaskCard] = []
    for name in wanted:
        key = name.lower().replace("-", "_")
        found = datasets.get(key) or list(card.resolve_tasks([key.replace(":", "_")]))
        cards.extend(t for t in found if t not in cards)
    if not cards:
        return card.resolve_tasks(wanted)  # raises the generic "no task given" message
    return tuple(cards)


def task_table(card: "ModelCard") -> tuple[list[str], list[list[str]]]:
    """Every dataset structure, with the name that selects it and whether it is the default."""
    columns = ["task", "structure (default: *)", "dataset", "modality (id)", "index", "aliases"]
    rows = []
    for task in card.tasks:
        extra = task.extra
        star = " *" if extra.get("default") else ""
        ids = extra.get("modality_ids")
        modality = f"{task.modality} ({', '.join(f'{k} {v}' for k, v in ids.items()) if ids else extra.get('modality_id')})"
        rows.append([task.name, f"{extra.get('structure', task.name)}{star}", str(extra.get("dataset", "")),
                     modality, str(task.index), ", ".join(task.aliases)])
    return columns, rows


def modality_id(task: "TaskCard", settings: RunSettings) -> int:
    """The dataset's modality id; CHAOS takes ``--modality t1|t2`` (default t1)."""
    ids = task.extra.get("modality_ids")
    chosen = (settings.option("modality") or "").strip().lower()
    if ids and chosen:
        if chosen not in ids:
            raise UsageError(
                f"--modality {settings.option('modality')} does not apply to '{task.name}'; expected one of "
                f"{', '.join(sorted(ids))} for dataset {task.extra.get('dataset')}. Leave it out for {next(iter(ids))}."
            )
        return int(ids[chosen])
    return int(task.extra["modality_id"])


def check(card: "ModelCard", tasks: Sequence["TaskCard"], settings: RunSettings) -> None:
    """A wrong --modality fails before the weights are read."""
    for task in tasks:
        modality_id(task, settings)


def dataset_groups(tasks: Sequence["TaskCard"]) -> list[list["TaskCard"]]:
    """Requested tasks grouped by dataset (one token list each), in request order."""
    groups: dict[str, list[TaskCard]] = {}
    for task in tasks:
        groups.setdefault(str(task.extra["dataset"]), []).append(task)
    return list(groups.values())


def token_list(task: "TaskCard") -> list[int]:
    """The forward's task indices: the dataset's whole list, then the null token."""
    return [int(i) for i in task.extra["dataset_indices"]] + [NULL_TOKEN]


@dataclass
class PreparedDataset:
    """One dataset's tasks and the scan in the network grid (``preprocessing.preprocess``)."""

    tasks: list["TaskCard"]
    volume: "torch.Tensor"  # float32 [Z, Y, X] on the device
    grid: Any  # what ``restore`` undoes


def prepare_case(loaded: "LoadedCase", tasks: Sequence["TaskCard"], net: Any, *, settings: RunSettings,
                 device: "torch.device", warn: Any = None) -> tuple[list[str], list[PreparedDataset]]:
    """CPU stage: the task names in request order and, per dataset, the preprocessed scan."""
    from unisegcli.io.cases import task_channels
    from unisegcli.models.families import warn_about_input
    from unisegcli.models.hermes.preprocessing import preprocess

    window = tuple(getattr(net, "window_zyx", DEFAULT_WINDOW))
    prepared = []
    for group in dataset_groups(tasks):
        first = group[0]
        image = task_channels(loaded, first)
        warn_about_input(warn, loaded, image, [first], window)
        volume, grid = preprocess(image[0], loaded.scan.spacing_mm, first, device, min_size=window)
        prepared.append(PreparedDataset(group, volume, grid))
    return [t.name for t in tasks], prepared


def infer_case(prepared: tuple[list[str], list[PreparedDataset]], net: Any, *, settings: RunSettings,
               device: "torch.device", progress: Any = None) -> list["torch.Tensor"]:
    """Network stage: one sliding-window pass per dataset -> its kept channels' probabilities."""
    import torch

    from unisegcli.models.families import share_progress
    from unisegcli.models.hermes.inference import predict_volume

    window = tuple(getattr(net, "window_zyx", DEFAULT_WINDOW))
    if isinstance(net, torch.nn.Module):
        net.to(device).eval()
    datasets = prepared[1]
    outputs = []
    for number, dataset in enumerate(datasets):
        first = dataset.tasks[0]
        tokens = token_list(first)
        modality = modality_id(first, settings)
        outputs.append(predict_volume(
            dataset.volume, net, tokens, modality,
            window=window,
            batch_size=_batch_size(net, tokens, modality, window, settings, device),
            gaussian=bool(settings.option("gaussian")),
            tta=settings.tta,
            precision=settings.precision,
            progress=share_progress(progress, number, len(datasets)),
            keep=[tokens.index(int(task.index)) for task in dataset.tasks],
            accumulator_device=settings.accumulator_device,
        ))
    return outputs


def finish_case(prepared: tuple[list[str], list[PreparedDataset]], raw: list["torch.Tensor"]
                ) -> dict[str, np.ndarray]:
    """Restore stage: {task name: uint8 [Z, Y, X] 0/1 map} (sigmoid >= 0.5), in request order."""
    import torch

    from unisegcli.models.hermes.preprocessing import restore

    names, datasets = prepared
    label_maps: dict[str, np.ndarray] = {}
    for dataset, probabilities in zip(datasets, raw):
        for channel, task in enumerate(dataset.tasks):
            probs = restore(probabilities[channel:channel + 1], dataset.grid)[0]
            label_maps[task.name] = (probs >= THRESHOLD).to(torch.uint8).cpu().numpy()
    return {name: label_maps[name] for name in names}


def predict(loaded: "LoadedCase", tasks: Sequence["TaskCard"], net: Any, *, settings: RunSettings,
            device: "torch.device", progress: Any = None, warn: Any = None) -> dict[str, np.ndarray]:
    """{task name: uint8 [Z, Y, X] 0/1 map} for one case, one sliding-window pass per dataset
    (the three stages in turn)."""
    prepared = prepare_case(loaded, tasks, net, settings=settings, device=device, warn=warn)
    return finish_case(prepared, infer_case(prepared, net, settings=settings, device=device, progress=progress))


def _batch_size(net: Any, tokens: Sequence[int], modality: int, window: Sequence[int],
                settings: RunSettings, device: "torch.device") -> int:
    """The engine's batch-size policy for a token-bound Hermes forward."""
    from unisegcli.inference.engine import Head, batch_size_for
    from unisegcli.models.hermes.inference import TokenBoundNet

    return batch_size_for(TokenBoundNet(net, tokens, modality), window, 1, [Head(None, None)], device,
                          precision=settings.precision, requested=settings.batch_size)


class HermesFamily(ModelFamily):
    """Hermes: structures by name, one forward per dataset; ``--step`` does not apply."""

    name = "hermes"
    options = (
        FamilyOption("gaussian", bool, False, "Gaussian weighting of overlapping windows (Hermes averages "
                                              "plainly by default)."),
        FamilyOption("modality", str, None, "CHAOS MR structures: t1 (default) or t2."),
    )
    engine_options = frozenset({"tta", "batch_size", "precision"})

    load = staticmethod(load)  # type: ignore[assignment]
    prepare_case = staticmethod(prepare_case)  # type: ignore[assignment]
    infer_case = staticmethod(infer_case)  # type: ignore[assignment]
    finish_case = staticmethod(finish_case)  # type: ignore[assignment]
    resolve_tasks = staticmethod(resolve_tasks)  # type: ignore[assignment]
    task_table = staticmethod(task_table)  # type: ignore[assignment]
    check = staticmethod(check)  # type: ignore[assignment]


FAMILY = HermesFamily()
