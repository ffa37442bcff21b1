"""Model and task cards: the registry (``weights_registry.json``) as frozen dataclasses.

Everything about a model that is data (tasks, labels, channels, spacing, normalisation,
file URLs and checksums) lives in the registry; code reads the cards. The registry is
checked against a small schema when it is loaded, so a broken entry fails with a message
naming the entry instead of a KeyError deep in the pipeline.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from unisegcli.errors import UnknownTaskError, UsageError, suggest

REGISTRY_PATH = Path(__file__).resolve().parent.parent / "weights_registry.json"
REGISTRY_ENV = "UNISEG_REGISTRY"  # a site's own registry file replaces the shipped one
SCHEMA_VERSION = 1
MODALITIES = ("CT", "MR", "PET", "CT+PET")
# Family schemes: nnunet_plans (read from the model's plans.json), sat (models/sat/pipeline.py),
# hermes_ct and hermes_percentile (models/hermes/preprocessing.py).
NORMALIZATION_SCHEMES = ("ct_clip_scale", "zscore", "nnunet_plans", "sat", "hermes_ct", "hermes_percentile")


class RegistryError(UsageError):
    """The registry file does not follow the schema (a packaging bug or a bad custom file)."""


@dataclass(frozen=True)
class TaskCard:
    """One task of a universal model.

    labels maps the network's class index (1..n, 0 is background) to the output structure
    name. spacing_mm is the training spacing as (z, y, x). normalization maps each channel
    name to its scheme (``{"scheme": "ct_clip_scale", "clip_hu": [-325, 325]}`` or
    ``{"scheme": "zscore"}``).
    """

    name: str
    index: int
    modality: str
    channels: tuple[str, ...]
    labels: Mapping[int, str]
    spacing_mm: tuple[float, float, float]
    normalization: Mapping[str, Mapping[str, Any]]
    aliases: tuple[str, ...] = ()
    source: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)  # family-specific facts (see its module)

    @property
    def num_classes(self) -> int:
        """Classes the task uses, background included (the first n network outputs)."""
        return len(self.labels) + 1

    @property
    def structures(self) -> tuple[str, ...]:
        return tuple(self.labels[k] for k in sorted(self.labels))


@dataclass(frozen=True)
class FileCard:
    """A file of a model: where to get it and how to check it (sha256/size may be unknown)."""

    name: str
    role: str
    urls: tuple[str, ...]
    sha256: str | None
    size_bytes: int | None


@dataclass(frozen=True)
class ModelCard:
    """A model in the registry: its files, its tasks and how to build its network."""

    name: str
    family: str
    version: str
    description: str
    license: str
    citation: str
    tasks: tuple[TaskCard, ...]
    files: tuple[FileCard, ...]
    note: str | None = None  # what a user must know at every run (printed when a run starts)
    evaluation: str | None = None  # how the model was measured (`uniseg models NAME`, not printed per run)
    network: Mapping[str, Any] | None = None
    source: str | None = None
    packaged: bool = False  # files ship inside the package (unisegcli/data/models/...)
    license_id: str | None = None  # short identifier ("Apache-2.0", "unspecified") for tables

    def file(self, role: str) -> FileCard | None:
        """The first file with this role ("checkpoint", "plans", ...), or None."""
        return next((f for f in self.files if f.role == role), None)

    def task(self, name: str) -> TaskCard:
        """Look a task up by name or alias (case-insensitive); raise with a suggestion."""
        key = name.strip().lower().replace("-", "_")
        for card in self.tasks:
            if key == card.name or key in card.aliases:
                return card
        names = [c.name for c in self.tasks] + [a for c in self.tasks for a in c.aliases]
        raise UnknownTaskError(
            f"unknown task '{name}'{suggest(key, names)} "
            f"Run `uniseg tasks --model {self.name}` to list the {len(self.tasks)} tasks "
            f"of model '{self.name}'."
        )

    def resolve_tasks(self, names: str | list[str]) -> tuple[TaskCard, ...]:
        """Turn "liver,kidney" (or a list) into task cards, keeping order, dropping repeats."""
        if isinstance(names, str):
            names = [n for n in names.split(",")]
        names = [n.strip() for n in names if n.strip()]
        if not names:
            raise UsageError(
                "no task given; expected --tasks with one or more names such as "
                f"'{self.tasks[0].name}'. Run `uniseg tasks` to list them."
            )
        cards: list[TaskCard] = []
        for n in names:
            card = self.task(n)
            if card not in cards:
                cards.append(card)
        return tuple(cards)


_FIX = "fix the registry file (weights_registry.json, or the file $UNISEG_REGISTRY names)"


def _object(value: Any, where: str) -> Mapping[str, Any]:
    """A JSON object, or a RegistryError naming the entry."""
    if not isinstance(value, Mapping):
        raise RegistryError(f"registry: {where} is {type(value).__name__}, expected an object ({{...}}); {_FIX}")
    return value


def _require(entry: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    _object(entry, where)
    if key not in entry:
        raise RegistryError(f"registry: {where} has no '{key}'; add it to weights_registry.json")
    value = entry[key]
    if not isinstance(value, kind):
        raise RegistryError(
            f"registry: {where}.{key} is {type(value).__name__}, expected "
            f"{getattr(kind, '__name__', kind)}"
        )
    return value


def _task_card(entry: Mapping[str, Any], where: str) -> TaskCard:
    name = _require(entry, "name", str, where)
    where = f"{where}[{name}]"
    channels = tuple(_require(entry, "channels", list, where))
    modality = _require(entry, "modality", str, where)
    if modality not in MODALITIES:
        raise RegistryError(f"registry: {where}.modality is '{modality}', expected one of {MODALITIES}")
    labels = {int(k): str(v) for k, v in _require(entry, "labels", dict, where).items()}
    if not labels or sorted(labels) != list(range(1, len(labels) + 1)):
        raise RegistryError(f"registry: {where}.labels must be numbered 1..n, got {sorted(labels)}")
    spacing = tuple(float(s) for s in _require(entry, "spacing_mm", list, where))
    if len(spacing) != 3 or min(spacing) <= 0:
        raise RegistryError(f"registry: {where}.spacing_mm must be 3 positive numbers (z, y, x)")
    norm = _require(entry, "normalization", dict, where)
    if set(norm) != set(channels):
        raise RegistryError(f"registry: {where}.normalization must name each channel {channels}")
    for ch, scheme in norm.items():
        if not isinstance(scheme, Mapping) or scheme.get("scheme") not in NORMALIZATION_SCHEMES:
            raise RegistryError(
                f"registry: {where}.normalization[{ch}] scheme must be one of {NORMALIZATION_SCHEMES}"
            )
    return TaskCard(
        name=name,
        index=_require(entry, "index", int, where),
        modality=modality,
        channels=channels,
        labels=labels,
        spacing_mm=spacing,  # type: ignore[arg-type]
        normalization=norm,
        aliases=tuple(a.lower() for a in entry.get("aliases", [])),
        source=entry.get("source", ""),
        extra=dict(entry.get("extra", {})),
    )


def _file_card(entry: Mapping[str, Any], where: str) -> FileCard:
    name = _require(entry, "name", str, where)
    where = f"{where}[{name}]"
    if Path(name).name != name or name in ("", ".", ".."):
        raise RegistryError(f"registry: {where}.name must be a plain file name")
    sha = entry.get("sha256")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        raise RegistryError(f"registry: {where}.sha256 must be 64 lowercase hex digits or null")
    size = entry.get("size_bytes")
    if size is not None and (not isinstance(size, int) or size < 0):
        raise RegistryError(f"registry: {where}.size_bytes must be a non-negative integer or null")
    return FileCard(
        name=name,
        role=_require(entry, "role", str, where),
        urls=tuple(_require(entry, "urls", list, where)),
        sha256=sha,
        size_bytes=size,
    )


def parse_registry(data: Mapping[str, Any]) -> dict[str, ModelCard]:
    """Check a registry document against the schema and build its model cards."""
    _object(data, "the document")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise RegistryError(
            f"registry: schema_version is {data.get('schema_version')!r}, expected {SCHEMA_VERSION}"
        )
    task_sets = _require(data, "task_sets", dict, "registry")
    models: dict[str, ModelCard] = {}
    for name, entry in _require(data, "models", dict, "registry").items():
        where = f"models[{name}]"
        try:
            models[name] = _model_card(name, entry, task_sets, where)
        except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a shape no check above foresaw
            raise RegistryError(
                f"registry: {where} does not follow the schema ({type(exc).__name__}: {exc}); {_FIX}"
            ) from None
    return models


def _model_card(name: str, entry: Any, task_sets: Mapping[str, Any], where: str) -> ModelCard:
    """One model entry as a card (its task set and files checked)."""
    set_name = _require(entry, "task_set", str, where)
    if set_name not in task_sets:
        raise RegistryError(f"registry: {where}.task_set '{set_name}' is not in task_sets")
    if not isinstance(task_sets[set_name], list):
        raise RegistryError(f"registry: task_sets[{set_name}] is {type(task_sets[set_name]).__name__}, "
                            f"expected a list of task objects; {_FIX}")
    tasks = tuple(_task_card(t, f"task_sets[{set_name}]") for t in task_sets[set_name])
    subset = entry.get("tasks")
    if subset is not None and not (isinstance(subset, list) and all(isinstance(t, str) for t in subset)):
        raise RegistryError(f"registry: {where}.tasks is {type(subset).__name__}, expected a list of task "
                            f"names; {_FIX}")
    if subset is not None:
        tasks = tuple(t for t in tasks if t.name in subset)
        if len(tasks) != len(subset):
            raise RegistryError(f"registry: {where}.tasks names tasks not in '{set_name}'")
    return ModelCard(
        name=name,
        family=_require(entry, "family", str, where),
        version=_require(entry, "version", str, where),
        description=_require(entry, "description", str, where),
        license=_require(entry, "license", str, where),
        citation=entry.get("citation", ""),
        tasks=tasks,
        files=tuple(_file_card(f, f"{where}.files") for f in _require(entry, "files", list, where)),
        note=entry.get("note"),
        evaluation=entry.get("evaluation"),
        network=entry.get("network"),
        source=entry.get("source"),
        packaged=bool(entry.get("packaged", False)),
        license_id=entry.get("license_id"),
    )


def registry_path() -> Path:
    """The registry in use: ``$UNISEG_REGISTRY`` if set, else the one shipped in the package."""
    return Path(os.environ.get(REGISTRY_ENV) or REGISTRY_PATH)


def load_registry(path: Path | None = None) -> dict[str, ModelCard]:
    """Read and check the registry file (``registry_path()`` by default; cached per path)."""
    return _load_registry(Path(path) if path is not None else registry_path())


@lru_cache(maxsize=8)
def _load_registry(path: Path) -> dict[str, ModelCard]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RegistryError(f"registry: cannot read {path}: {exc}") from exc
    return parse_registry(data)
