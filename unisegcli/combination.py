"""Several models in one run (``--model uniseg,totalsegmentator``) and ``--compare``.

    from unisegcli.combination import Combination
    with Combination(["uniseg", "totalsegmentator"], "liver,spleen,aorta", compare=["liver"]) as seg:
        result = seg.predict("scan.nii.gz")
        result.model_of["aorta"]                                          # "totalsegmentator"
        result.comparison["structures"]["liver"]["pairs"][0]["dice"]     # uniseg vs totalsegmentator
        seg.run(["scans/"], "out/")

A Combination holds one ``Segmenter`` per model that gives a structure (``unisegcli.assignment``
says which model gives which), each built with its own tasks: every model loads once per run
and predicts once per case (all its tasks in one pass). It has the part of the Segmenter's
surface that the batch and the worker processes use (``card``, ``tasks``, ``structures``,
``outputs``, ``events``, ``device``, ``started``, ``config``, ``load``, ``segment_case``,
``marker_options``, ``run``, ``predict``, ``close``), so ``unisegcli.batch`` runs it unchanged.

Options: a family option (``--folds``, ``--modality``, ``--gaussian``, ...) or engine option
(``--step``, ``--tta``, ...) goes to each model whose family declares it; one that no model of
the run declares is a usage error. ``--threads`` is the process's (set by the first member,
restored on close). A listed model that no structure comes from is not loaded.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, TextIO

from unisegcli.assignment import Assignment, Compared, Pick, assign, split_models
from unisegcli.errors import UsageError
from unisegcli.events import Events
from unisegcli.models.families import ENGINE_OPTIONS, family
from unisegcli.outputs.writer import OutputOptions, select_structures, selected_masks
from unisegcli.results import Result, Segmentation
from unisegcli.session import Segmenter
from unisegcli.settings import EngineOptions
from unisegcli.weights.cards import ModelCard
from unisegcli.weights.resolver import get_model

if TYPE_CHECKING:
    import torch

    from unisegcli.io.cases import LoadedCase
    from unisegcli.workers import WorkerSpec

_DEFAULT_ENGINE = EngineOptions()


def _map_key(model: str, task: str) -> str:
    """Key of a task's label map in a combined case (task names repeat across models)."""
    return f"{model}\n{task}"


@dataclass
class CombinedSegmentation(Segmentation):
    """One scan's result from several models: ``Segmentation`` whose structures each name
    their model (``model_of``), plus ``comparison`` (the ``compare.json`` document) when the
    run compares structures. label_maps: ``_map_key(model, task)`` -> uint8 [Z, Y, X]."""

    picks: tuple[Pick, ...] = ()
    compared: tuple[Compared, ...] = ()

    def _written(self) -> Iterable[Pick]:
        return (p for p in self.picks if p.written)

    @cached_property
    def masks_zyx(self) -> Mapping[str, Any]:
        """structure -> bool [Z, Y, X], in --tasks order whatever the model, as written."""
        where = {s: (_map_key(p.model, p.task.name), i) for p in self._written() for i, s in p.task.labels.items()}
        return selected_masks(self.label_maps, where, self.outputs, self.loaded.scan)

    @property
    def task_of(self) -> dict[str, str]:
        return {s: p.task.name for p in self._written() for s in p.task.structures}

    @property
    def model_of(self) -> dict[str, str] | None:
        return {s: p.model for p in self._written() for s in p.task.structures}

    @cached_property
    def comparison(self) -> dict[str, Any] | None:
        """The ``compare.json`` document (``outputs.comparison``), None without --compare."""
        if not self.compared:
            return None
        from unisegcli.outputs.comparison import compare_document, compare_structure, compared_masks
        from unisegcli.outputs.statistics import voxel_volume_ml

        voxel_ml = voxel_volume_ml(self.loaded.scan.image.affine)
        labels = {(p.model, p.task.name): {s: i for i, s in p.task.labels.items()} for p in self.picks}
        records = {}
        for entry in self.compared:
            raw = {m: self.label_maps[_map_key(m, t)] == labels[(m, t)][s] for m, t, s in entry.sources}
            records[entry.structure] = compare_structure(compared_masks(raw, self.outputs, voxel_ml),
                                                         {m: t for m, t, _ in entry.sources}, voxel_ml)
        return compare_document(self.case_id, records)

    def _extra_files(self) -> dict[str, str]:
        if self.comparison is None:
            return {}
        from unisegcli.outputs.comparison import render_compare

        json_text, csv_text = render_compare(self.comparison)
        return {"compare.json": json_text, "compare.csv": csv_text}

    def save(self, folder: str | Path, *, cohort_folder: Path | None = None) -> Any:
        """Write the files of one model's run plus ``compare.json/.csv``; merge the comparison
        rows into ``cohort_folder/compare.csv`` as the statistics are."""
        written = super().save(folder, cohort_folder=cohort_folder)
        if self.comparison is not None:
            from unisegcli.outputs.comparison import event_summary, merge_cohort_compare

            written.compare = event_summary(self.comparison)
            if cohort_folder is not None and Path(cohort_folder).resolve() != Path(folder).resolve():
                merge_cohort_compare(Path(cohort_folder), self.comparison)
        return written


@dataclass(frozen=True)
class CombinationConfig:
    """What builds a Combination (picklable: worker processes build their own from it)."""

    models: tuple[str, ...]
    tasks: str | tuple[str, ...]
    compare: tuple[str, ...]
    engine: EngineOptions
    options: dict[str, Any]
    outputs: OutputOptions
    offline: bool

    def build(self, *, device: str | None = None, threads: int | None = None,
              events: Events | None = None) -> "Combination":
        engine = self.engine if threads is None else replace(self.engine, threads=threads)
        return Combination(self.models, self.tasks, compare=self.compare, device=device, engine=engine,
                           options=self.options, outputs=self.outputs, offline=self.offline, events=events)


class Combination:
    """Several models, each structure from one of them, loaded once, for many scans."""

    def __init__(
        self,
        models: str | Sequence[str],
        tasks: str | Sequence[str],
        *,
        compare: str | Sequence[str] = (),
        device: str | None = None,
        engine: EngineOptions | None = None,
        options: Mapping[str, Any] | None = None,
        outputs: OutputOptions | None = None,
        offline: bool = False,
        events: Events | None = None,
        networks: Mapping[str, Any] | None = None,
    ) -> None:
        """models: "uniseg,totalsegmentator" or a list (as ``Segmenter``'s model names). tasks:
        "liver,spleen" or a list; ``MODEL:TASK`` picks the model. compare: structures to run on
        every model that has them. networks: model -> an already built network (no load)."""
        names = split_models(models if isinstance(models, str) else ",".join(models))
        compared = tuple(s.strip() for s in (compare.split(",") if isinstance(compare, str) else compare) if s.strip())
        engine = engine or EngineOptions()
        if device is not None:
            engine = replace(engine, device=device)
        engine.check()
        self.outputs = outputs or OutputOptions()
        self.outputs.check()
        self.events = events or Events()
        self.config = CombinationConfig(tuple(names), tasks if isinstance(tasks, str) else tuple(tasks), compared,
                                        engine, dict(options or {}), self.outputs, offline)
        cards = {name: get_model(name) for name in names}
        self.assignment: Assignment = assign(cards, tasks, compared)
        running = {m: cards[m] for m in self.assignment.models}
        shared = share_options(running, dict(options or {}), engine, unused=[m for m in names if m not in running])
        self.members: dict[str, Segmenter] = {}
        try:
            for model, (model_options, model_engine) in shared.items():
                self.members[model] = Segmenter(
                    model, [t.name for t in self.assignment.tasks_of(model)], engine=model_engine,
                    options=model_options, offline=offline, events=self.events, network=(networks or {}).get(model))
        except BaseException:
            self.close()
            raise
        self.picks = self._member_picks()
        self.tasks = tuple(p.task for p in self.picks)
        written = [s for p in self.picks if p.written for s in p.task.structures]
        self.structures = select_structures(self.outputs.structures, written)
        self.card = combined_card(running, self.tasks)
        self.device: "torch.device" = next(iter(self.members.values())).device
        self.started = time.time()  # a batch removes temp files older than this (casework)

    def _member_picks(self) -> tuple[Pick, ...]:
        """The picks with each member's own task cards (the ones it resolved and runs)."""
        cards = {(m, t.name): t for m, seg in self.members.items() for t in seg.tasks}
        return tuple(replace(p, task=cards[(p.model, p.task.name)]) for p in self.assignment.picks)

    @property
    def loads(self) -> int:
        """Weights loads so far, all models together (one per model once loaded)."""
        return sum(member.loads for member in self.members.values())

    def load(self) -> dict[str, Any]:
        """Every model's network (each loads its weights on first use)."""
        return {model: member.load() for model, member in self.members.items()}

    def close(self) -> None:
        """Close the members in reverse order, so the first one restores torch's threads last."""
        for member in reversed(list(getattr(self, "members", {}).values())):
            member.close()

    def __enter__(self) -> "Combination":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def predict(self, image: Any, affine: Any = None, *, case_id: str = "case") -> CombinedSegmentation:
        """Segment one scan in memory with every model (see ``Segmenter.predict``)."""
        from unisegcli.io.cases import case_in_memory

        started = time.perf_counter()
        loaded = case_in_memory(image, affine, case_id=case_id)
        return self.segment_case(loaded, timings={"read": time.perf_counter() - started})

    def segment_case(self, loaded: "LoadedCase", *, timings: dict[str, float] | None = None) -> CombinedSegmentation:
        """Run each model once on an already read case and combine their label maps."""
        timings = dict(timings or {})
        label_maps, warnings = {}, []
        started = time.perf_counter()
        for model, member in self.members.items():
            part = member.segment_case(loaded)
            warnings += part.warnings
            label_maps.update({_map_key(model, task): labels for task, labels in part.label_maps.items()})
            timings[f"predict:{model}"] = part.timings["predict"]
        timings["predict"] = time.perf_counter() - started
        tasks = tuple(p.task for p in self.picks if p.written)
        return CombinedSegmentation(loaded, tasks, label_maps, self.outputs, warnings, timings,
                                    picks=self.picks, compared=self.assignment.compared)

    def run(self, inputs: Iterable[str | Path] | str | Path, output: str | Path, *,
            input_list: str | Path | None = None, channels: Sequence[str] = (), series_uid: str | None = None,
            shard: str | None = None, overwrite: bool = False, stdin: TextIO | None = None,
            workers: Sequence["WorkerSpec"] = ()) -> Result:
        """Segment files into ``output``, as ``Segmenter.run`` (``unisegcli.batch``)."""
        from unisegcli.batch import BatchRequest, run_batch

        request = BatchRequest([inputs] if isinstance(inputs, (str, Path)) else list(inputs), Path(output),
                               input_list=input_list, channels=tuple(channels), series_uid=series_uid,
                               shard=shard, overwrite=overwrite, stdin=stdin, workers=tuple(workers))
        return run_batch(self, request)  # type: ignore[arg-type]  (the Segmenter surface the batch uses)

    def marker_options(self) -> dict[str, Any]:
        """What a done marker records: output options, then every model with its version,
        tasks (those run only for --compare included) and settings, and the compared structures."""
        models = []
        for model, member in self.members.items():
            settings = {k: v for k, v in member.marker_options().items() if k != "outputs"}
            written = [p.task.name for p in self.picks if p.model == model and p.written]
            models.append({"model": model, "version": member.card.version, "tasks": [t.name for t in member.tasks],
                           "written": written, "settings": settings})
        return {"outputs": asdict(self.outputs), "models": models,
                "compare": [c.structure for c in self.assignment.compared]}


def share_options(cards: Mapping[str, ModelCard], options: Mapping[str, Any], engine: EngineOptions, *,
                  unused: Sequence[str] = ()) -> dict[str, tuple[dict[str, Any], EngineOptions]]:
    """model -> (its family options, its engine options): each option goes to the models whose
    family declares it (engine options outside a family's ``engine_options`` fall back to their
    defaults for it); an option no model takes is a UsageError. --threads: the first model only."""
    given = {k: v for k, v in options.items() if v is not None}
    engine_given = [n for n in ENGINE_OPTIONS if getattr(engine, n) != getattr(_DEFAULT_ENGINE, n)]
    taken: set[str] = set()
    shared: dict[str, tuple[dict[str, Any], EngineOptions]] = {}
    for number, (model, card) in enumerate(cards.items()):
        kind = family(card.family)
        declared = {o.name for o in kind.options}
        resets = {n: getattr(_DEFAULT_ENGINE, n) for n in engine_given if n not in kind.engine_options}
        own = {k: v for k, v in given.items() if k in declared}
        shared[model] = (own, replace(engine, **resets, threads=engine.threads if number == 0 else None))
        taken |= set(own) | (set(engine_given) - set(resets))
    for name in [*given, *engine_given]:
        if name not in taken:
            flag = "--" + name.replace("_", "-")
            idle = f" (no structure comes from {', '.join(unused)})" if unused else ""
            raise UsageError(f"{flag} does not apply to any model of this run ({', '.join(cards)}){idle}; expected "
                             f"an option at least one of their families supports. Leave {flag} out.")
    return shared


def combined_card(cards: Mapping[str, ModelCard], tasks: Sequence[Any]) -> ModelCard:
    """A card naming the run's models for reports and markers: name "a,b", version "1.0,2.0.0"."""
    notes = [f"{name}: {card.note}" for name, card in cards.items() if card.note]
    return ModelCard(
        name=",".join(cards), family="combination", version=",".join(c.version for c in cards.values()),
        description="several models: " + ", ".join(cards),
        license="; ".join(f"{name}: {card.license_id or card.license}" for name, card in cards.items()),
        citation="", tasks=tuple(tasks), files=(), note=" · ".join(notes) or None)


def segmenter_for(model: str, tasks: str | Sequence[str], *, compare: str | None = None,
                  **settings: Any) -> Segmenter | Combination:
    """A ``Segmenter`` for one model, a ``Combination`` for "a,b" or with ``compare``."""
    models = split_models(model)
    compared = [s.strip() for s in (compare or "").split(",") if s.strip()]
    if compare is not None and not compared:
        raise UsageError("--compare is empty; expected one or more structure names, e.g. --compare liver.")
    if len(models) == 1 and not compared:
        return Segmenter(models[0], tasks, **settings)
    if len(models) == 1:
        raise UsageError(f"--compare needs two or more models; got --model {models[0]}. List them, e.g. "
                         f"--model {models[0]},totalsegmentator --compare {compared[0]}.")
    return Combination(models, tasks, compare=compared, **settings)
