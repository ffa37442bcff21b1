"""Which model gives which structure when one run names several models (``--model a,b``).

    assignment = assign({"uniseg": uniseg_card, "totalsegmentator": ts_card}, "liver,spleen,aorta")
    [(p.model, p.task.name) for p in assignment.picks]
    # [("uniseg", "liver"), ("uniseg", "spleen"), ("totalsegmentator", "aorta")]

Rules (README, "Several models per run"):

- Each ``--tasks`` name goes to the FIRST listed model whose family resolves it (its own
  matching: UniSeg task names and aliases, nnU-Net labels, Hermes datasets, SAT prompts);
  ``MODEL:TASK`` picks the model (the longest listed model name that prefixes the text, so
  ``nnunet:/path/folder:liver`` and ``hermes:bcv:liver`` work).
- A structure that two models would write is a usage error: one file per structure name
  (``--compare`` is the way to run it on both).
- ``--compare S`` finds structure S on every listed model: the model that writes S (from
  ``--tasks``, else the first that has it, whose task is then added to the run) and every
  other model that has a structure of that name (or a task of that name with a single
  structure). At least two models must have it.
- Picks keep the ``--tasks`` order (compare-only picks last): that order sets the structure
  order, so multilabel ids and overlap precedence are those of a one-model run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from unisegcli.errors import UnknownModelError, UnknownTaskError, UsageError, suggest
from unisegcli.models.families import family

if TYPE_CHECKING:
    from unisegcli.weights.cards import ModelCard, TaskCard

LISTED = 8  # task names shown per model in an error line


@dataclass(frozen=True)
class Pick:
    """One task of the run and the model that runs it (``written``: False when the task runs
    only so that ``--compare`` has this model's mask)."""

    model: str
    task: "TaskCard"
    written: bool = True


@dataclass(frozen=True)
class Compared:
    """A ``--compare`` structure: (model, task name, structure name in that model), the model
    that writes it first, then the others in ``--model`` order."""

    structure: str
    sources: tuple[tuple[str, str, str], ...]


@dataclass(frozen=True)
class Assignment:
    picks: tuple[Pick, ...]
    compared: tuple[Compared, ...] = ()

    @property
    def models(self) -> tuple[str, ...]:
        """The models that run (a listed model no structure comes from is left out), in order."""
        return tuple(dict.fromkeys(p.model for p in self.picks))

    def tasks_of(self, model: str) -> tuple["TaskCard", ...]:
        return tuple(p.task for p in self.picks if p.model == model)


def split_models(text: str) -> list[str]:
    """``--model a,b`` -> ["a", "b"] (blanks dropped; a repeated model is a usage error)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError(f"--model is '{text}'; expected one or more model names such as 'uniseg'.")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"--model names '{twice[0]}' twice; expected each model once. Remove the repeat.")
    return names


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def resolve_on(card: "ModelCard", name: str) -> tuple["TaskCard", ...] | None:
    """The tasks ``name`` means for this model, or None when the model does not have it."""
    try:
        return family(card.family).resolve_tasks(card, [name])
    except UsageError:
        return None


def _offers(cards: Mapping[str, "ModelCard"]) -> str:
    parts = []
    for name, card in cards.items():
        tasks = [t.name for t in card.tasks]
        if not tasks:
            parts.append(f"{name} takes text prompts (`uniseg tasks --model {name}`)")
            continue
        shown = ", ".join(tasks[:LISTED]) + (f", … ({len(tasks)} in all)" if len(tasks) > LISTED else "")
        parts.append(f"{name} offers {shown}")
    return "; ".join(parts)


def _no_model_has(name: str, cards: Mapping[str, "ModelCard"], what: str = "--tasks") -> UsageError:
    prefix, sep, _ = name.partition(":")
    if sep and prefix not in cards and resolve_on_any(cards, name) is None:
        return UnknownModelError(
            f"'{prefix}' in {what} '{name}' is not one of the models of --model "
            f"({', '.join(cards)}){suggest(prefix, cards)} Expected MODEL:TASK with a listed model.")
    every = [t.name for c in cards.values() for t in c.tasks] + [a for c in cards.values() for t in c.tasks
                                                                 for a in t.aliases]
    hint = suggest(_key(name), every)
    return UnknownTaskError(
        f"no model of --model has {'task' if what == '--tasks' else 'structure'} '{name}' ({what})"
        f"{hint if hint != '.' else ';'} expected a name one of them offers: {_offers(cards)}.")


def resolve_on_any(cards: Mapping[str, "ModelCard"], name: str) -> tuple[str, tuple["TaskCard", ...]] | None:
    for model, card in cards.items():
        found = resolve_on(card, name)
        if found:
            return model, found
    return None


def _pinned(cards: Mapping[str, "ModelCard"], name: str) -> tuple[str, str] | None:
    """(model, task) for ``MODEL:TASK`` with a listed model (the longest that fits), else None."""
    for model in sorted(cards, key=len, reverse=True):
        if name.startswith(model + ":") and name[len(model) + 1:].strip():
            return model, name[len(model) + 1:].strip()
    return None


def assign(cards: Mapping[str, "ModelCard"], tasks: str | Sequence[str], compare: Sequence[str] = ()) -> Assignment:
    """The picks of ``--tasks`` (and ``--compare``) over ``cards`` (model as listed -> card, in
    ``--model`` order); see the module for the rules. Raises UsageError."""
    names = [n.strip() for n in (tasks.split(",") if isinstance(tasks, str) else tasks) if n.strip()]
    if not names:
        raise UsageError("no task given; expected --tasks with one or more names such as 'liver'. "
                         "Run `uniseg tasks --model NAME` to list a model's tasks.")
    picks: list[Pick] = []
    for name in names:
        pinned = _pinned(cards, name)
        if pinned is not None:
            model, task_name = pinned
            found: tuple[TaskCard, ...] = family(cards[model].family).resolve_tasks(cards[model], [task_name])
        else:
            hit = resolve_on_any(cards, name)
            if hit is None:
                raise _no_model_has(name, cards)
            model, found = hit
        picks += [Pick(model, t) for t in found if Pick(model, t) not in picks]
    _check_one_model_per_structure(picks)
    compared = []
    for structure in dict.fromkeys(s.strip() for s in compare if s.strip()):
        entry, extra = _compared(cards, picks, structure)
        compared.append(entry)
        picks += [p for p in extra if p not in picks and Pick(p.model, p.task) not in picks]
    _check_one_model_per_structure(picks)
    return Assignment(tuple(picks), tuple(compared))


def _check_one_model_per_structure(picks: Sequence[Pick]) -> None:
    source: dict[str, Pick] = {}
    for pick in (p for p in picks if p.written):
        for structure in pick.task.structures:
            other = source.setdefault(structure, pick)
            if other.model != pick.model:
                raise UsageError(
                    f"structure '{structure}' would come from both '{other.model}' (task {other.task.name}) and "
                    f"'{pick.model}' (task {pick.task.name}); expected each structure from one model. Keep one "
                    f"in --tasks, or add --compare {structure} to run it on both and compare them.")


def structure_on(card: "ModelCard", structure: str) -> tuple["TaskCard", str] | None:
    """(task, structure name) of ``card`` for a compared structure: a structure of that name in
    the tasks the name resolves to, else the only structure of the only such task."""
    found = resolve_on(card, structure)
    if not found:
        return None
    for task in found:
        for name in task.structures:
            if _key(name) == _key(structure):
                return task, name
    if len(found) == 1 and len(found[0].structures) == 1:
        return found[0], found[0].structures[0]
    return None


def _compared(cards: Mapping[str, "ModelCard"], picks: Sequence[Pick],
              structure: str) -> tuple[Compared, list[Pick]]:
    """The models that have ``structure`` (the writing one first) and the picks to add."""
    written = next(((p, s) for p in picks if p.written for s in p.task.structures if _key(s) == _key(structure)),
                   None)
    sources: list[tuple[str, str, str]] = []
    extra: list[Pick] = []
    if written is not None:
        sources.append((written[0].model, written[0].task.name, written[1]))
    for model, card in cards.items():
        if written is not None and model == written[0].model:
            continue
        hit = structure_on(card, structure)
        if hit is None:
            continue
        task, name = hit
        first = not sources
        sources.append((model, task.name, name))
        extra.append(Pick(model, task, written=first))
    if not sources:
        raise _no_model_has(structure, cards, what="--compare")
    if len(sources) < 2:
        raise UsageError(
            f"--compare {structure}: only '{sources[0][0]}' of the models of --model ({', '.join(cards)}) has it; "
            "expected two or more models that have the structure. Add a model that has it, or leave --compare out.")
    return Compared(sources[0][2], tuple(sources)), extra
