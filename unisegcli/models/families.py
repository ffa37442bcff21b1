"""The model-family contract: one typed interface between the core (inputs, batch, outputs) and
a family's network code, and the table of registered families.

A family is a folder under ``models/`` whose ``family.py`` defines ``FAMILY``, an instance of a
``ModelFamily`` subclass; registering it is one line in ``FAMILY_MODULES``. The class declares

* ``options``: the family's own settings (name, type, default, help, allowed values), e.g.
  SAT's ``modality`` or nnU-Net's ``folds``. The core refuses an option the family does not
  declare (``UsageError`` naming the family and the option) before any weights load, and fills
  the defaults, so resume markers record the values actually used;
* ``engine_options``: which engine settings it honours (``step``, ``tta``, ``batch_size``,
  ``precision``); asking for another one is the same usage error;

and implements ``load`` (build the network on the CPU, eval mode) and ``predict`` (one case in,
one uint8 [Z, Y, X] label map per task out, in the scan's own grid). ``resolve_tasks``,
``task_table``, ``needed_roles``, ``card_from_spec``, ``check`` and ``prepare`` have defaults.

A family may also split ``predict`` into three stages, so a batch overlaps the CPU work of
other cases with the network (``unisegcli.staged_batch``): ``prepare_case`` (CPU: channels,
input warnings, crop, resample, normalise; must not change the network), ``infer_case`` (the
network, on the main thread; the out-of-memory ladder retries only this stage) and
``finish_case`` (CPU: restore to the scan's grid). Such a family need not implement
``predict``: the default composes the stages. ``staged`` says whether a family has them.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

from unisegcli.errors import UsageError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from unisegcli.io.cases import LoadedCase
    from unisegcli.weights.cards import ModelCard, TaskCard

FAMILY_MODULES = {
    "uniseg": "unisegcli.models.uniseg.family",
    "hermes": "unisegcli.models.hermes.family",
    "sat": "unisegcli.models.sat.family",
    "nnunet": "unisegcli.models.nnunet.family",
}
ENGINE_OPTIONS = ("step", "tta", "batch_size", "precision")
DEFAULT_STEP = 0.5  # nnU-Net's half-window overlap
Progress = Callable[[int, int], None]
Warn = Callable[[str, str], None]


@dataclass(frozen=True)
class FamilyOption:
    """One setting a family declares: ``--<name with dashes>`` on the command line."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class RunSettings:
    """What a family's ``predict`` receives: the engine settings and the family's options.

    step: window overlap (None: the family's own). batch_size: windows per forward (None: the
    engine's policy, ``inference.engine.batch_size_for``). accumulator_device: where blended
    outputs live (None: the network's device; "cpu" keeps them in host memory, the fallback
    after a CUDA out-of-memory). options: every declared family option, defaults filled.
    """

    batch_size: int | None = None
    step: float | None = None
    tta: bool = False
    precision: str = "auto"
    accumulator_device: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def option(self, name: str) -> Any:
        """A family option's value (KeyError for an option the family did not declare)."""
        return self.options[name]

    @property
    def step_or_default(self) -> float:
        return DEFAULT_STEP if self.step is None else float(self.step)


class ModelFamily(ABC):
    """The contract every model family satisfies (see the module docstring)."""

    name: ClassVar[str]
    options: ClassVar[tuple[FamilyOption, ...]] = ()
    engine_options: ClassVar[frozenset[str]] = frozenset(ENGINE_OPTIONS)

    @abstractmethod
    def load(self, card: "ModelCard", files: Mapping[str, Path], *, settings: RunSettings,
             tasks: Sequence["TaskCard"]) -> Any:
        """Build the network on the CPU in eval mode. files: {role: cached path}."""

    def predict(self, loaded: "LoadedCase", tasks: Sequence["TaskCard"], net: Any, *, settings: RunSettings,
                device: "torch.device", progress: Progress | None = None,
                warn: Warn | None = None) -> dict[str, "np.ndarray"]:
        """{task name: uint8 [Z, Y, X] label map} of one case in the scan's grid (0 background,
        1..n the card's labels). progress(done, total) counts windows; warn(case_id, message)
        receives input warnings. Default: the three stages in turn (a family without them
        must implement ``predict``)."""
        if not self.staged:
            raise NotImplementedError(f"model family '{self.name}' implements neither predict nor its stages")
        prepared = self.prepare_case(loaded, tasks, net, settings=settings, device=device, warn=warn)
        raw = self.infer_case(prepared, net, settings=settings, device=device, progress=progress)
        return self.finish_case(prepared, raw)

    # -- optional stages (see the module docstring) ------------------------------------------

    @property
    def staged(self) -> bool:
        """Whether this family implements ``prepare_case``, ``infer_case`` and ``finish_case``."""
        stages = ("prepare_case", "infer_case", "finish_case")
        return all(getattr(type(self), n) is not getattr(ModelFamily, n) for n in stages)

    def prepare_case(self, loaded: "LoadedCase", tasks: Sequence["TaskCard"], net: Any, *, settings: RunSettings,
                     device: "torch.device", warn: Warn | None = None) -> Any:
        """CPU work before the network: the case in the network's grid (family-defined). Runs on
        a background thread in a batch: reads ``net`` (its patch size) but never changes it."""
        raise NotImplementedError

    def infer_case(self, prepared: Any, net: Any, *, settings: RunSettings, device: "torch.device",
                   progress: Progress | None = None) -> Any:
        """The network on ``prepare_case``'s output -> raw outputs (family-defined), e.g.
        blended probabilities in the network grid. Must leave ``prepared`` reusable (a retry)."""
        raise NotImplementedError

    def finish_case(self, prepared: Any, raw: Any) -> dict[str, "np.ndarray"]:
        """Raw outputs -> {task name: uint8 [Z, Y, X] label map} in the scan's grid (CPU work)."""
        raise NotImplementedError

    def resolve_tasks(self, card: "ModelCard", names: str | Sequence[str]) -> tuple["TaskCard", ...]:
        """Map the user's --tasks to cards."""
        return card.resolve_tasks(names if isinstance(names, str) else list(names))

    def task_table(self, card: "ModelCard") -> tuple[list[str], list[list[str]]]:
        """(columns, rows) of `uniseg tasks --model NAME`."""
        columns = ["task", "aliases", "modality", "channels (in order)", "structures", "spacing mm (z, y, x)"]
        rows = [
            [task.name, ", ".join(task.aliases), task.modality, ", ".join(task.channels),
             ", ".join(task.structures), " × ".join(f"{s:g}" for s in task.spacing_mm)]
            for task in card.tasks
        ]
        return columns, rows

    def needed_roles(self, card: "ModelCard", tasks: Sequence["TaskCard"]) -> set[str] | None:
        """The file roles a run of these tasks needs (None: all of the card's files)."""
        return None

    def card_from_spec(self, spec: str) -> "ModelCard":
        """A card for ``<family>:<argument>`` model names."""
        prefix = spec.partition(":")[0]
        raise UsageError(f"model '{spec}': family '{prefix}' cannot be used as '{prefix}:<path>'; "
                         "expected a registry model name. Run `uniseg models` to list them.")

    def check(self, card: "ModelCard", tasks: Sequence["TaskCard"], settings: RunSettings) -> None:
        """Cheap checks of the options against the tasks, before any weights load."""

    prepare: Callable[..., Path] | None = None  # `uniseg weights prepare` (SAT only so far)

    def settings(self, given: Mapping[str, Any] | None = None, **engine: Any) -> RunSettings:
        """RunSettings for this family: ``given`` family options checked against the declared
        ones (an undeclared option is a UsageError) and defaults filled; ``engine``: the
        RunSettings engine fields (a non-default one the family does not honour is refused)."""
        given = {k: v for k, v in (given or {}).items() if v is not None}
        declared = {o.name: o for o in self.options}
        for name in given:
            if name not in declared:
                self._refuse("--" + name.replace("_", "-"))
        for name, value in engine.items():
            if name in ENGINE_OPTIONS and name not in self.engine_options and value != _ENGINE_DEFAULTS[name]:
                self._refuse("--" + name.replace("_", "-"))
        values = {}
        for name, option in declared.items():
            value = given.get(name, option.default)
            if value is not None and option.choices and str(value).lower() not in option.choices:
                raise UsageError(f"{option.flag} is '{value}'; expected one of {', '.join(option.choices)} for "
                                 f"{self.name} models.")
            values[name] = value
        return RunSettings(options=values, **engine)

    def _refuse(self, flag: str) -> None:
        supported = [o.flag for o in self.options] + ["--" + n.replace("_", "-") for n in sorted(self.engine_options)]
        raise UsageError(f"{flag} does not apply to {self.name} models; expected only options this family "
                         f"supports ({', '.join(supported) or 'none'}). Leave {flag} out.")


_ENGINE_DEFAULTS = {f: getattr(RunSettings(), f) for f in ENGINE_OPTIONS}


def family(name: str) -> ModelFamily:
    """The registered family ``name``; an unknown family is a usage error."""
    if name not in FAMILY_MODULES:
        raise UsageError(
            f"model family '{name}' is not supported by this version; expected one of "
            f"{', '.join(sorted(FAMILY_MODULES))}. Upgrade uniseg or pick another model (`uniseg models`)."
        )
    return importlib.import_module(FAMILY_MODULES[name]).FAMILY  # type: ignore[no-any-return]


def resolve_tasks(card: "ModelCard", names: str | Sequence[str]) -> tuple["TaskCard", ...]:
    """The task cards for --tasks, through the family's own matching."""
    return family(card.family).resolve_tasks(card, names)


def needed_roles(card: "ModelCard", tasks: Sequence["TaskCard"]) -> set[str] | None:
    """File roles a run of ``tasks`` needs (None: all files)."""
    roles = family(card.family).needed_roles(card, tasks)
    return set(roles) if roles is not None else None


def task_table(card: "ModelCard") -> tuple[list[str], list[list[str]]]:
    """(columns, rows) describing the model's tasks for `uniseg tasks`."""
    return family(card.family).task_table(card)


def card_from_spec(spec: str) -> "ModelCard | None":
    """A card for ``<family>:<argument>`` model names, or None when ``spec`` has no such prefix."""
    prefix, sep, _ = spec.partition(":")
    if not sep or prefix not in FAMILY_MODULES:
        return None
    return family(prefix).card_from_spec(spec)


def share_progress(progress: Progress | None, number: int, count: int) -> Progress | None:
    """progress(done, total) for part ``number`` of ``count`` equal shares of a case's bar
    (a family's channel groups or datasets); None stays None."""
    if progress is None:
        return None

    def report(done: int, total: int) -> None:
        progress(number * total + done, total * count)

    return report


def warn_about_input(warn: Warn | None, loaded: Any, image: Any, tasks: Sequence["TaskCard"],
                     window: Sequence[int]) -> None:
    """Send the input sanity warnings (``preprocessing.sanity``) of ``image`` for each task."""
    if warn is None:
        return
    from unisegcli.preprocessing.sanity import input_warnings

    for task in tasks:
        for message in input_warnings(image, loaded.scan.spacing_mm, task, window):
            warn(loaded.case.case_id, message)
