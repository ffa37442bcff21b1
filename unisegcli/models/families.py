"""Model families: the seam between the generic run (inputs, batch, outputs) and one family's
network code.

A family is a module (imported only when a model of that family is used) that defines:

    load(card, files, *, settings, tasks) -> net
        Build the network on the CPU in eval mode. files: {role: cached path}; settings:
        ``api.RunSettings``; tasks: the requested task cards (a family may load only what they
        need).
    predict(loaded, tasks, net, *, settings, device, progress, warn) -> {task name: label map}
        One case (``io.cases.LoadedCase``) in, one uint8 [Z, Y, X] label map per task out, in
        the scan's own grid (0 background, 1..n the card's labels). progress(done, total)
        counts windows; warn(case_id, message) receives input warnings.

and may define:

    resolve_tasks(card, names) -> tuple[TaskCard, ...]
        Map the user's --tasks to cards (default: ``card.resolve_tasks``).
    task_table(card) -> (columns, rows)
        What `uniseg tasks --model NAME` prints (default: the generic task table).
    needed_roles(card, tasks) -> set of file roles
        The files a run of these tasks needs (default: all of the card's files).
    card_from_spec(spec) -> ModelCard
        Build a card for a model named ``<family>:<argument>`` (e.g. ``nnunet:<folder>``).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any, Sequence

from unisegcli.errors import UsageError

if TYPE_CHECKING:
    from unisegcli.weights.cards import ModelCard, TaskCard

FAMILY_MODULES = {
    "uniseg": "unisegcli.models.uniseg.family",
    "hermes": "unisegcli.models.hermes.family",
    "sat": "unisegcli.models.sat.family",
    "nnunet": "unisegcli.models.nnunet.family",
}


def family_module(name: str) -> ModuleType:
    """The module implementing family ``name``; an unknown family is a usage error."""
    if name not in FAMILY_MODULES:
        raise UsageError(
            f"model family '{name}' is not supported by this version; expected one of "
            f"{', '.join(sorted(FAMILY_MODULES))}. Upgrade uniseg or pick another model (`uniseg models`)."
        )
    return importlib.import_module(FAMILY_MODULES[name])


def resolve_tasks(card: "ModelCard", names: str | Sequence[str]) -> tuple["TaskCard", ...]:
    """The task cards for --tasks, through the family's own matching when it has one."""
    hook = getattr(family_module(card.family), "resolve_tasks", None)
    return hook(card, names) if hook else card.resolve_tasks(list(names) if not isinstance(names, str) else names)


def needed_roles(card: "ModelCard", tasks: Sequence["TaskCard"]) -> set[str] | None:
    """File roles a run of ``tasks`` needs (None: all files)."""
    hook = getattr(family_module(card.family), "needed_roles", None)
    return set(hook(card, tasks)) if hook else None


def task_table(card: "ModelCard") -> tuple[list[str], list[list[str]]]:
    """(columns, rows) describing the model's tasks for `uniseg tasks`."""
    hook = getattr(family_module(card.family), "task_table", None)
    if hook:
        return hook(card)
    columns = ["task", "aliases", "modality", "channels (in order)", "structures", "spacing mm (z, y, x)"]
    rows = [
        [task.name, ", ".join(task.aliases), task.modality, ", ".join(task.channels),
         ", ".join(task.structures), " × ".join(f"{s:g}" for s in task.spacing_mm)]
        for task in card.tasks
    ]
    return columns, rows


def card_from_spec(spec: str) -> "ModelCard | None":
    """A card for ``<family>:<argument>`` model names, or None when ``spec`` has no such prefix."""
    prefix, sep, _ = spec.partition(":")
    if not sep or prefix not in FAMILY_MODULES:
        return None
    hook: Any = getattr(family_module(prefix), "card_from_spec", None)
    if hook is None:
        raise UsageError(f"model '{spec}': family '{prefix}' cannot be used as '{prefix}:<path>'; "
                         "expected a registry model name. Run `uniseg models` to list them.")
    return hook(spec)


def share_progress(progress: Any, number: int, count: int) -> Any:
    """progress(done, total) for part ``number`` of ``count`` equal shares of a case's bar
    (a family's channel groups or datasets); None stays None."""
    if progress is None:
        return None

    def report(done: int, total: int) -> None:
        progress(number * total + done, total * count)

    return report


def warn_about_input(warn: Any, loaded: Any, image: Any, tasks: Sequence["TaskCard"], window: Sequence[int]) -> None:
    """Send the input sanity warnings (``preprocessing.sanity``) of ``image`` for each task."""
    if warn is None:
        return
    from unisegcli.preprocessing.sanity import input_warnings

    for task in tasks:
        for message in input_warnings(image, loaded.scan.spacing_mm, task, window):
            warn(loaded.case.case_id, message)
