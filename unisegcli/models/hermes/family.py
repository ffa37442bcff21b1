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
always overlap by half).
"""

from __future__ import annotations

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


def predict(
    loaded: "LoadedCase",
    tasks: Sequence["TaskCard"],
    net: Any,
    *,
    settings: RunSettings,
    device: "torch.device",
    progress: Any = None,
    warn: Any = None,
) -> dict[str, np.ndarray]:
    """{task name: uint8 [Z, Y, X] 0/1 map} for one case, one sliding-window pass per dataset."""
    import torch

    from unisegcli.io.cases import task_channels
    from unisegcli.models.hermes.inference import predict_volume
    from unisegcli.models.hermes.preprocessing import preprocess, restore
    from unisegcli.models.families import share_progress, warn_about_input

    window = tuple(getattr(net, "window_zyx", DEFAULT_WINDOW))
    if isinstance(net, torch.nn.Module):
        net.to(device).eval()
    groups = dataset_groups(tasks)
    label_maps: dict[str, np.ndarray] = {}
    for number, group in enumerate(groups):
        first = group[0]
        image = task_channels(loaded, first)
        warn_about_input(warn, loaded, image, [first], window)
        volume, grid = preprocess(image[0], loaded.scan.spacing_mm, first, device, min_size=window)
        tokens = token_list(first)
        keep = [tokens.index(int(task.index)) for task in group]
        modality = modality_id(first, settings)
        probabilities = predict_volume(
            volume, net, tokens, modality,
            window=window,
            batch_size=_batch_size(net, tokens, modality, window, settings, device),
            gaussian=bool(settings.option("gaussian")),
            tta=settings.tta,
            precision=settings.precision,
            progress=share_progress(progress, number, len(groups)),
            keep=keep,
            accumulator_device=settings.accumulator_device,
        )
        del volume
        for channel, task in enumerate(group):
            probs = restore(probabilities[channel:channel + 1], grid)[0]
            label_maps[task.name] = (probs >= THRESHOLD).to(torch.uint8).cpu().numpy()
        del probabilities
    return {task.name: label_maps[task.name] for task in tasks}


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
    predict = staticmethod(predict)  # type: ignore[assignment]
    resolve_tasks = staticmethod(resolve_tasks)  # type: ignore[assignment]
    task_table = staticmethod(task_table)  # type: ignore[assignment]
    check = staticmethod(check)  # type: ignore[assignment]


FAMILY = HermesFamily()
