"""The SAT family (``models.families``): text prompts over SAT's vocabulary, one mask each.

* ``resolve_tasks``: each --tasks entry becomes one task card (labels ``{1: file name}``)
  through ``vocabulary.match`` (exact, normalised, synonym, else a did-you-mean error);
  ``text:<prompt>`` asks for free text (needs the text encoder).
* ``needed_roles``: with a prepared embedding table and only vocabulary prompts, the run
  needs the segmentation checkpoint alone (no text encoder, no transformers).
* ``predict`` (in stages: ``prepare_case``, ``infer_case``, ``finish_case``, which a batch
  overlaps across cases): modality from --modality (else guessed from the intensities, with a warning),
  SAT's preprocessing (``pipeline``), our sliding-window engine with SAT's conventions
  (window 288 x 288 x 96 in (x, y, z), SAT's window positions and float16 Gaussian from
  ``placement``, prompt groups from ``grouping``, sigmoid), and each structure's
  probabilities mapped back to the scan's grid before the 0.5 threshold.
  Overlapping structures stay in separate files: every prompt is its own task.

The family option ``placement="nnunet"`` selects nnU-Net's evenly spread windows instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from unisegcli.errors import UnknownTaskError, UsageError
from unisegcli.models.families import FamilyOption, ModelFamily, RunSettings
from unisegcli.models.sat import vocabulary

if TYPE_CHECKING:
    import torch

    from unisegcli.io.cases import LoadedCase
    from unisegcli.weights.cards import ModelCard, TaskCard

DEFAULT_WINDOW = (288, 288, 96)
DEFAULT_MAX_QUERIES = 256  # SAT's max_queries: prompts per decoder group
MODALITY_NAMES = {"ct": "CT", "mri": "MR", "pet": "PET"}
TEXT_ROLES = ("text_encoder", "tokenizer", "tokenizer_config", "tokenizer_special_tokens", "text_config")


def file_name(prompt: str) -> str:
    """A file-system friendly structure name: "lumbar vertebrae 1 (l1)" -> "lumbar_vertebrae_1_l1"."""
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9+.\-]+", "_", prompt.lower())).strip("_.") or "prompt"


def resolve_tasks(card: "ModelCard", names: str | Sequence[str]) -> tuple["TaskCard", ...]:
    """One task card per distinct prompt, in the order given."""
    from unisegcli.weights.cards import TaskCard

    items = names.split(",") if isinstance(names, str) else list(names)
    items = [n.strip() for n in items if n.strip()]
    if not items:
        raise UsageError(
            f"no prompt given; expected --tasks with one or more of SAT's terms such as 'liver'. "
            f"Run `uniseg tasks --model {card.name}` to list them."
        )
    cards: list[TaskCard] = []
    seen: set[str] = set()
    for requested in items:
        m = vocabulary.match(requested, card.name)
        if m.name in seen:
            continue
        seen.add(m.name)
        structure = file_name(m.name)
        if any(structure in c.labels.values() for c in cards):
            structure = f"{structure}_{len(cards) + 1}"
        first = m.modalities[0] if m.modalities else "ct"
        cards.append(TaskCard(
            name=m.name, index=len(cards), modality=MODALITY_NAMES.get(first, "CT"), channels=("image",),
            labels={1: structure}, spacing_mm=(3.0, 1.0, 1.0), normalization={"image": {"scheme": "sat"}},
            source="SAT vocabulary" if m.modalities else "free text",
            extra={"prompt": m.name, "modalities": list(m.modalities), "free_text": not m.modalities,
                   "matched_by": m.how},
        ))
    return tuple(cards)


def task_table(card: "ModelCard") -> tuple[list[str], list[list[str]]]:
    """Every vocabulary term by modality, with its body region (SAT-DS groupings)."""
    import json

    data = json.loads(vocabulary.VOCABULARY_PATH.read_text(encoding="utf-8"))
    region: dict[str, list[str]] = {}
    for name, terms in data.get("region_based", {}).items():
        for term in terms:
            region.setdefault(term, []).append(name)
    lesions = set(data.get("abnormal", []))
    rows = [
        [modality, name, ", ".join(region.get(f"{modality}_{name}", [])),
         "lesion" if f"{modality}_{name}" in lesions else ""]
        for modality, name in vocabulary.all_terms()
    ]
    return ["modality", "prompt (--tasks)", "region", "kind"], rows


def _needs_text_tower(card: "ModelCard", tasks: Sequence["TaskCard"]) -> bool:
    if any(t.extra.get("free_text") for t in tasks):
        return True
    from unisegcli.models.sat.embeddings import cached_table

    table = cached_table(card)
    if table is None:
        return True
    return any(all(table.lookup(m, t.name) is None for m in t.extra.get("modalities", [])) for t in tasks)


def needed_roles(card: "ModelCard", tasks: Sequence["TaskCard"]) -> set[str]:
    roles = {f.role for f in card.files}
    return roles if _needs_text_tower(card, tasks) else roles - set(TEXT_ROLES)


def load(card: "ModelCard", files: Mapping[str, Path], *, settings: RunSettings | None = None,
         tasks: Sequence["TaskCard"] = ()) -> Any:
    """SAT on the CPU: the segmentation network, the prepared embedding table if there is one,
    and the text encoder only when some prompt is not in the table."""
    from unisegcli.models.sat.embeddings import cached_table
    from unisegcli.models.sat.loader import load_sat

    if settings is not None:
        check(card, tasks, settings)
    network = dict(card.network or {})
    window = tuple(network.get("window", DEFAULT_WINDOW))
    text = files.get("text_encoder") if (not tasks or _needs_text_tower(card, tasks)) else None
    tokenizer = files.get("tokenizer")
    net = load_sat(files["checkpoint"], text, tokenizer_dir=tokenizer.parent if tokenizer else None, window=window)
    net.embedding_table = cached_table(card)
    net.max_queries = int(network.get("max_queries", DEFAULT_MAX_QUERIES))
    net.model_name = card.name
    return net


def check(card: "ModelCard", tasks: Sequence["TaskCard"], settings: RunSettings) -> None:
    """A bad --modality, or a prompt of another modality, fails before the weights load."""
    if not settings.option("modality"):
        return
    modality = checked_modality(settings.option("modality"))
    for task in tasks:
        problem = None if task.extra.get("free_text") else vocabulary.modality_problem(
            task.name, task.extra.get("modalities", ()), modality, card.name)
        if problem:
            raise UnknownTaskError(problem)


def checked_modality(value: str) -> str:
    """--modality merged as SAT merges it (e.g. "MR", "t1" -> mri); ct, mri or pet, else an error."""
    from unisegcli.models.sat.text import merge_modality

    modality = merge_modality(value)
    if modality not in ("ct", "mri", "pet"):
        raise UsageError(f"--modality is '{value}'; expected ct, mri or pet for SAT models.")
    return modality


def run_modality(loaded: "LoadedCase", image: np.ndarray, settings: RunSettings, warn: Any) -> str:
    """--modality (merged as SAT does), else a guess from the intensities with a warning."""
    from unisegcli.models.sat.pipeline import guess_modality

    if settings.option("modality"):
        return checked_modality(settings.option("modality"))
    modality = guess_modality(image)
    if warn is not None:
        warn(loaded.case.case_id, f"no --modality given; guessed '{modality}' from the intensity range "
                                  "(pass --modality ct|mri|pet to be sure; PET is never guessed)")
    return modality


def queries_for(net: Any, tasks: Sequence["TaskCard"], modality: str, model: str) -> "torch.Tensor":
    """[N, d] query embeddings: from the prepared table when possible, else the live tower."""
    import torch

    table = getattr(net, "embedding_table", None)
    rows: list[torch.Tensor | None] = []
    live: list[int] = []
    for i, task in enumerate(tasks):
        free = bool(task.extra.get("free_text"))
        problem = None if free else vocabulary.modality_problem(task.name, task.extra.get("modalities", ()),
                                                                modality, model)
        if problem:
            raise UnknownTaskError(problem)
        row = table.lookup(modality, task.name) if table is not None and not free else None
        rows.append(row)
        if row is None:
            live.append(i)
    if live:
        computed = net.embed_prompts([tasks[i].extra.get("prompt", tasks[i].name) for i in live], modality)
        for i, row in zip(live, computed):
            rows[i] = row
    return torch.stack([r.float().cpu() for r in rows])  # type: ignore[union-attr]


def cpu_warning(device: "torch.device", window: Sequence[int], n_windows: int, n_prompts: int) -> str | None:
    """The run-time warning for a released-size SAT on the CPU (None on a GPU or for small test
    models): every 288 x 288 x 96 window costs minutes there."""
    if device.type != "cpu" or int(np.prod(window)) < 288 * 288 * 96:
        return None
    return (f"SAT on the CPU: {n_windows} window(s) of {' x '.join(map(str, window))} voxels with "
            f"{n_prompts} prompt(s); expect several minutes per window (a GPU takes seconds per window)")


class WindowPredictor:
    """Adapter for the engine: [B, 1, z, y, x] windows -> [B, N, z, y, x] logits.

    SAT's own axis order is (H, W, D) = (x, y, z); the query groups are fixed per case."""

    def __init__(self, net: Any, groups: Sequence["torch.Tensor"]) -> None:
        self.net = net
        self.groups = list(groups)

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        return self.net.segmenter(self.groups, x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)


@dataclass
class PreparedSat:
    """One case ready for SAT's network: its preprocessed volume and the prompts' queries."""

    tasks: list["TaskCard"]
    prep: Any  # models.sat.pipeline.Prepared: volume [1, z, y, x] and what restore_mask undoes
    queries: "torch.Tensor"  # [N, d] query embeddings, in task order, on the CPU


def prepare_case(loaded: "LoadedCase", tasks: Sequence["TaskCard"], net: Any, *, settings: RunSettings,
                 device: "torch.device", warn: Any = None) -> PreparedSat:
    """CPU stage: modality, the prompts' queries and SAT's preprocessing (``pipeline.prepare``)."""
    from unisegcli.inference.tiling import window_slices
    from unisegcli.io.cases import task_channels
    from unisegcli.models.sat.pipeline import prepare as preprocess
    from unisegcli.models.sat.placement import placement_named

    image = task_channels(loaded, tasks[0])
    modality = run_modality(loaded, image, settings, warn)
    queries = queries_for(net, tasks, modality, getattr(net, "model_name", "sat-nano"))
    prep = preprocess(image, loaded.scan.spacing_mm, modality)
    patch = tuple(reversed(net.config.window))  # (z, y, x)
    padded = [max(s, p) for s, p in zip(prep.volume.shape[1:], patch)]
    placement = placement_named(settings.option("placement"))
    n_windows = len(window_slices(padded, patch, settings.step_or_default, placement))
    message = cpu_warning(device, net.config.window, n_windows, len(tasks))
    if message and warn is not None:
        warn(loaded.case.case_id, message)
    return PreparedSat(list(tasks), prep, queries)


def infer_case(prepared: PreparedSat, net: Any, *, settings: RunSettings, device: "torch.device",
               progress: Any = None) -> "torch.Tensor":
    """Network stage: SAT's sliding window -> [N, z, y, x] probabilities on the crop box."""
    import torch

    from unisegcli.inference.engine import sliding_window
    from unisegcli.models.sat.grouping import split_queries
    from unisegcli.models.sat.placement import blending_weights, placement_named

    patch = tuple(reversed(net.config.window))  # (z, y, x)
    net.segmenter.to(device)
    max_q = int(getattr(net, "max_queries", DEFAULT_MAX_QUERIES))
    groups = [g.to(device) for g in split_queries(prepared.queries, max_q)]
    volume = torch.from_numpy(prepared.prep.volume).to(device)
    with torch.inference_mode():
        return sliding_window(
            volume, WindowPredictor(net, groups), patch, step=settings.step_or_default,
            batch_size=settings.batch_size, tta=settings.tta, precision=settings.precision, activation="sigmoid",
            gaussian=blending_weights(patch) if settings.option("gaussian") else False, progress=progress,
            accumulator_device=settings.accumulator_device, placement=placement_named(settings.option("placement")),
        )[0]


def finish_case(prepared: PreparedSat, raw: "torch.Tensor") -> dict[str, np.ndarray]:
    """Restore stage: {task name: uint8 [Z, Y, X] 0/1 map} in the scan's (RAS) grid."""
    import torch

    from unisegcli.models.sat.pipeline import restore_mask

    with torch.inference_mode():  # raw is an inference tensor
        return {task.name: restore_mask(raw[i], prepared.prep) for i, task in enumerate(prepared.tasks)}


def predict(loaded: "LoadedCase", tasks: Sequence["TaskCard"], net: Any, *, settings: RunSettings,
            device: "torch.device", progress: Any = None, warn: Any = None) -> dict[str, np.ndarray]:
    """{task name: uint8 [Z, Y, X] 0/1 map} in the scan's (RAS) grid; see the module docstring
    (the three stages in turn)."""
    prepared = prepare_case(loaded, tasks, net, settings=settings, device=device, warn=warn)
    return finish_case(prepared, infer_case(prepared, net, settings=settings, device=device, progress=progress))


def prepare(card: "ModelCard", *, offline: bool = False, download_progress: Any = None,
            progress: Any = None) -> Path:
    """`uniseg weights prepare`: embed the whole vocabulary once with the paired text encoder
    and cache the table next to the model's files (see ``embeddings``). Returns its path."""
    from unisegcli.weights import cache
    from unisegcli.weights.download import ensure_model
    from unisegcli.models.sat.embeddings import compute_table, encoder_source, save_table, table_path
    from unisegcli.models.sat.loader import SatModel, load_text_encoder

    files = ensure_model(card, offline=offline, progress=download_progress,
                         roles={f.role for f in card.files if f.role in TEXT_ROLES})
    encoder = load_text_encoder(files["text_encoder"])
    model = SatModel(None, encoder, files["tokenizer"].parent)  # type: ignore[arg-type]
    import torch

    with torch.inference_mode():
        table = compute_table(model, source=encoder_source(card), progress=progress)
    with cache.model_lock(card):
        return save_table(table, table_path(card))


class SatFamily(ModelFamily):
    """SAT: text prompts over SAT's vocabulary, one mask each."""

    name = "sat"
    options = (
        FamilyOption("modality", str, None, "ct, mri or pet: the scan's modality (default: guessed from the "
                                            "intensities, with a warning)."),
        FamilyOption("gaussian", bool, True, "Gaussian weighting of overlapping windows (SAT's default)."),
        FamilyOption("placement", str, "sat", "Window positions: sat (upstream's split_3d, the default) or "
                                              "nnunet (evenly spread).", choices=("sat", "nnunet")),
    )

    load = staticmethod(load)  # type: ignore[assignment]
    predict = staticmethod(predict)  # type: ignore[assignment]
    prepare_case = staticmethod(prepare_case)  # type: ignore[assignment]
    infer_case = staticmethod(infer_case)  # type: ignore[assignment]
    finish_case = staticmethod(finish_case)  # type: ignore[assignment]
    resolve_tasks = staticmethod(resolve_tasks)  # type: ignore[assignment]
    task_table = staticmethod(task_table)  # type: ignore[assignment]
    needed_roles = staticmethod(needed_roles)  # type: ignore[assignment]
    check = staticmethod(check)  # type: ignore[assignment]
    prepare = staticmethod(prepare)  # type: ignore[assignment]


FAMILY = SatFamily()
