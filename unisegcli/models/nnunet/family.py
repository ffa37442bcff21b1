"""The nnU-Net v2 family (``models.families``): results folders and multi-part models.

Cards:

* ``--model nnunet:<path>`` (``card_from_spec``): a results folder; one TaskCard per
  structure of its dataset.json (``extra["label"]`` = the label value, ``extra["region"]`` for
  region-trained models), so ``--tasks liver,spleen`` works and outputs stay one file per
  structure;
* registry models (TotalSegmentator ``total``): each file is one part (role ``part:<id>``,
  a zip of a results folder); each task card's ``extra`` names its ``part`` and ``label``.
  ``needed_roles`` lists the parts holding the requested tasks: only those are downloaded,
  loaded and run;
* imported folders (``uniseg weights import nnunet PATH --name NAME``): ``importing``.

Running: per part, nnU-Net v2 preprocessing (``pipeline``), our sliding window on the
logits (``--folds`` averaged; ``--nnunet-exact``: float16 accumulation, nnU-Net bit for bit;
default float32), nnU-Net's export, then one 0/1 map per requested structure; as three stages
(``prepare_case``, ``infer_case``, ``finish_case``) that a batch overlaps across cases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from unisegcli.errors import UsageError
from unisegcli.models.families import FamilyOption, ModelFamily, RunSettings, share_progress

if TYPE_CHECKING:
    import torch

    from unisegcli.io.cases import LoadedCase
    from unisegcli.weights.cards import ModelCard, TaskCard
    from unisegcli.models.nnunet.folder import ResultsFolder
    from unisegcli.models.nnunet.network import Fold
    from unisegcli.models.nnunet.pipeline import Prepared

SPEC_PREFIX = "nnunet:"
PART_ROLE = "part:"
_ONE_PART = ""  # the part key of a single-folder model


def structure_name(name: str) -> str:
    """A dataset.json label name as a task name: lower case, runs of other characters -> '_'."""
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_") or "label"


def modality_of(channel_names: Sequence[str]) -> str:
    upper = {c.upper() for c in channel_names}
    if upper <= {"CT"}:
        return "CT"
    if "PET" in upper:
        return "CT+PET" if "CT" in upper else "PET"
    return "MR"


def cards_from_folder(folder: "ResultsFolder", *, name: str, source: str) -> "ModelCard":
    """A model card for a results folder: one task per structure."""
    from unisegcli.weights.cards import ModelCard, TaskCard

    channels = tuple(structure_name(c) for c in folder.channel_names)
    spacing = tuple(float(s) for s in folder.configuration["spacing"])
    if len(spacing) == 2:
        spacing = (0.0, *spacing)  # 2D: axis 0 keeps the input spacing
    tasks = []
    for index, label in enumerate(folder.labels()):
        extra: dict[str, Any] = {"label": label.value}
        if label.region is not None:
            extra["region"] = list(label.region)
        task_name = structure_name(label.name)
        if any(t.name == task_name for t in tasks):  # two labels that differ only in punctuation
            task_name = f"{task_name}_{label.value}"
        tasks.append(TaskCard(
            name=task_name, index=index, modality=modality_of(folder.channel_names), channels=channels,
            labels={1: task_name}, spacing_mm=spacing,  # type: ignore[arg-type]
            normalization={c: {"scheme": "nnunet_plans"} for c in channels},
            source=f"{folder.path.parent.name} label {label.value}", extra=extra,
        ))
    dataset = folder.dataset
    return ModelCard(
        name=name, family="nnunet", version=folder.path.name,
        description=str(dataset.get("description") or dataset.get("name") or folder.path.parent.name),
        license=str(dataset.get("licence") or dataset.get("license") or "unknown (see the model folder)"),
        citation=str(dataset.get("reference") or ""), tasks=tuple(tasks), files=(),
        note=f"nnU-Net v2 results folder {folder.path}", network={"folder": str(folder.path)},
        source=source,
    )


def card_from_spec(spec: str) -> "ModelCard":
    """``nnunet:<results folder>`` -> a card (reads only the JSON files)."""
    from unisegcli.models.nnunet.folder import read_results_folder

    path = spec[len(SPEC_PREFIX):] if spec.startswith(SPEC_PREFIX) else spec
    if not path:
        raise UsageError("--model nnunet: needs a folder, e.g. --model nnunet:Dataset123_Liver/"
                         "nnUNetTrainer__nnUNetPlans__3d_fullres; got nothing after 'nnunet:'.")
    folder = read_results_folder(Path(path))
    return cards_from_folder(folder, name=spec, source=str(folder.path))


def _part(task: "TaskCard") -> str:
    return str(task.extra.get("part", _ONE_PART))


def needed_roles(card: "ModelCard", tasks: Sequence["TaskCard"]) -> set[str]:
    """Only the parts that hold a requested structure (all files for single-folder models)."""
    parts = {_part(t) for t in tasks}
    if parts == {_ONE_PART}:
        return {f.role for f in card.files}
    return {PART_ROLE + p for p in parts}


def task_table(card: "ModelCard") -> tuple[list[str], list[list[str]]]:
    columns = ["task", "aliases", "modality", "channels", "label", "part", "spacing mm"]
    rows = [[t.name, ", ".join(t.aliases), t.modality, ", ".join(t.channels), str(t.extra.get("label", "")),
             _part(t) or "-", " × ".join(f"{s:g}" for s in t.spacing_mm)] for t in card.tasks]
    return columns, rows


@dataclass
class PartModel:
    """One results folder ready to run: its folds and the device they sit on."""

    folder: "ResultsFolder"
    folds: list["Fold"]
    device: str = "cpu"

    @property
    def mirror_axes(self) -> tuple[int, ...] | None:
        """Axes every fold may be mirrored along (None: mirroring not allowed)."""
        axes = [f.mirror_axes for f in self.folds]
        if any(a is None for a in axes):
            return None
        return tuple(sorted(set.intersection(*(set(a) for a in axes))))  # type: ignore[arg-type]


@dataclass
class NnunetModel:
    """What ``load`` returns: a PartModel per part key ("" for a single results folder)."""

    parts: dict[str, PartModel] = field(default_factory=dict)


def _part_folder(card: "ModelCard", files: Mapping[str, Path], part: str) -> "ResultsFolder":
    from unisegcli.models.nnunet.folder import find_results_folder, read_results_folder, unpacked_zip

    if card.network and card.network.get("folder"):
        return read_results_folder(Path(card.network["folder"]))
    role = PART_ROLE + part if part else next(iter(files), "")
    if role not in files:
        raise UsageError(f"model '{card.name}' has no file with role '{role}'; expected one per part "
                         "(part:<id>). The registry entry is incomplete.")
    path = files[role]
    root = unpacked_zip(path) if path.is_file() else path
    hints = (card.network or {}).get("results_folders") or {}
    return read_results_folder(find_results_folder(root, hints.get(part)))


def load(card: "ModelCard", files: Mapping[str, Path], *, settings: "RunSettings | None" = None,
         tasks: Sequence["TaskCard"] = ()) -> NnunetModel:
    """Read the needed parts, build their networks and load the selected folds (CPU, eval)."""
    from unisegcli.models.nnunet.network import load_fold, select_folds

    wanted = sorted({_part(t) for t in tasks} or {_part(t) for t in card.tasks})
    model = NnunetModel()
    for part in wanted:
        folder = _part_folder(card, files, part)
        folds = select_folds(folder, settings.option("folds") if settings is not None else None)
        model.parts[part] = PartModel(folder, [load_fold(folder, f) for f in folds])
    return model


def _blend(volume: "torch.Tensor", net: Any, patch: Sequence[int], two_d: bool, *, progress: Any = None,
           **options: Any) -> "torch.Tensor":
    """Sliding-window logits [K, Z, Y, X]; a 2D configuration runs slice by slice along axis 0,
    as nnU-Net's 2D predictor does (so windows never span or repeat slices)."""
    import torch

    from unisegcli.inference.engine import sliding_window

    if not two_d:
        return sliding_window(volume, net, patch, progress=progress, **options)[0]
    depth = volume.shape[1]
    slices = []
    for z in range(depth):
        slices.append(sliding_window(volume[:, z:z + 1], net, patch,
                                     progress=share_progress(progress, z, depth), **options)[0])
    return torch.cat(slices, dim=1)


@dataclass
class PreparedPart:
    """One part's share of a case, preprocessed: its tasks and the case in its network grid."""

    key: str
    tasks: list["TaskCard"]
    folder: "ResultsFolder"
    case: "Prepared"
    scan: Any  # the case's Scan (export goes back to its grid)


def prepare_part(part: PartModel, image: np.ndarray, loaded: "LoadedCase", *, settings: "RunSettings",
                 device: "torch.device") -> "Prepared":
    """nnU-Net v2 preprocessing of one part's input channels (CPU stage)."""
    import torch

    from unisegcli.models.nnunet.pipeline import preprocess_case

    exact = bool(settings.option("nnunet_exact"))
    # float64 resampling = scipy's numbers (nnU-Net resamples in float64); float32 is within 1e-5
    return preprocess_case(image, loaded.scan.spacing_mm, loaded.scan, part.folder, device,
                           compute_dtype=torch.float64 if exact else None)


def infer_part(part: PartModel, prepared: "Prepared", *, settings: "RunSettings", device: "torch.device",
               progress: Any = None) -> "torch.Tensor":
    """Sliding window (folds averaged) on a prepared case -> logits [K, z, y, x] (network stage)."""
    from unisegcli.models.nnunet.network import FoldAverage, SliceNetwork

    if part.device != str(device):
        for fold in part.folds:
            fold.network.to(device)
        part.device = str(device)
    exact = bool(settings.option("nnunet_exact"))
    patch = [int(p) for p in part.folder.configuration["patch_size"]]
    predictors = [f.network for f in part.folds]
    two_d = len(patch) == 2
    if two_d:
        patch = [1, *patch]
        predictors = [SliceNetwork(n) for n in predictors]
    axes = part.mirror_axes
    if two_d and axes is not None:
        axes = tuple(a + 1 for a in axes)  # 2D mirroring axes count in the slice
    tta = bool(settings.tta) and bool(axes)
    options = dict(step=settings.step_or_default, tta=tta, mirror_axes=axes or (0, 1, 2),
                   precision=settings.precision, accumulation="fp16" if exact else "fp32",
                   gaussian=bool(settings.option("gaussian")), accumulator_device=settings.accumulator_device)
    runs = [[p] for p in predictors] if exact else [predictors]  # exact: fold by fold, as nnU-Net
    # exact: nnU-Net predicts window by window; batched convolutions round differently
    batch = 1 if exact else settings.batch_size
    logits = None
    for number, group in enumerate(runs):
        net = group[0] if len(group) == 1 else FoldAverage(group)
        out = _blend(prepared.tensor, net, patch, two_d, batch_size=batch,
                     progress=share_progress(progress, number, len(runs)), **options)
        if exact:
            out = out.half()  # nnU-Net sums the folds' float16 logits in float16
        logits = out if logits is None else logits + out
    assert logits is not None
    if len(runs) > 1:
        logits = logits / len(runs)
    if not exact:
        logits = logits.float()
    return logits


def run_part(part: PartModel, image: np.ndarray, loaded: "LoadedCase", *, settings: "RunSettings",
             device: "torch.device", progress: Any = None) -> tuple["torch.Tensor", "Prepared"]:
    """Preprocess, sliding window (folds averaged) -> (logits [K, z, y, x], Prepared)."""
    prepared = prepare_part(part, image, loaded, settings=settings, device=device)
    return infer_part(part, prepared, settings=settings, device=device, progress=progress), prepared


def prepare_case(loaded: "LoadedCase", tasks: Sequence["TaskCard"], net: NnunetModel, *, settings: "RunSettings",
                 device: "torch.device", warn: Any = None) -> list[PreparedPart]:
    """CPU stage: each needed part's input preprocessed (parts in key order)."""
    from unisegcli.io.cases import task_channels

    by_part: dict[str, list["TaskCard"]] = {}
    for task in tasks:
        by_part.setdefault(_part(task), []).append(task)
    prepared = []
    for key, group in sorted(by_part.items()):
        part = net.parts[key]
        case = prepare_part(part, task_channels(loaded, group[0]), loaded, settings=settings, device=device)
        prepared.append(PreparedPart(key, group, part.folder, case, loaded.scan))
    return prepared


def infer_case(prepared: list[PreparedPart], net: NnunetModel, *, settings: "RunSettings", device: "torch.device",
               progress: Any = None) -> list["torch.Tensor"]:
    """Network stage: each part's logits [K, z, y, x], in ``prepared``'s order."""
    return [infer_part(net.parts[p.key], p.case, settings=settings, device=device,
                       progress=share_progress(progress, number, len(prepared)))
            for number, p in enumerate(prepared)]


def finish_case(prepared: list[PreparedPart], raw: list["torch.Tensor"]) -> Mapping[str, np.ndarray]:
    """Export stage: nnU-Net's export per part, then {task name: uint8 [Z, Y, X] 0/1 map}
    (``StructureMaps``: each map is made when it is read, never all at once)."""
    from unisegcli.models.nnunet.folder import Label
    from unisegcli.models.nnunet.pipeline import StructureMaps, export_segmentation

    maps = StructureMaps()
    for part, logits in zip(prepared, raw):
        labels = export_segmentation(logits, part.case, part.folder, part.scan)
        for task in part.tasks:
            region = task.extra.get("region")
            label = Label(task.name, int(task.extra["label"]), tuple(region) if region else None)
            maps.add(task.name, labels, label)
    return maps


class NnunetFamily(ModelFamily):
    """nnU-Net v2 results folders (``nnunet:<folder>``, imported models, TotalSegmentator)."""

    name = "nnunet"
    options = (
        FamilyOption("folds", tuple, None, "Folds to average (default: every trained fold)."),
        FamilyOption("nnunet_exact", bool, False, "Accumulate windows in float16 exactly as nnU-Net does."),
        FamilyOption("gaussian", bool, True, "Gaussian weighting of overlapping windows (nnU-Net's default)."),
    )

    load = staticmethod(load)  # type: ignore[assignment]
    prepare_case = staticmethod(prepare_case)  # type: ignore[assignment]
    infer_case = staticmethod(infer_case)  # type: ignore[assignment]
    finish_case = staticmethod(finish_case)  # type: ignore[assignment]
    task_table = staticmethod(task_table)  # type: ignore[assignment]
    needed_roles = staticmethod(needed_roles)  # type: ignore[assignment]
    card_from_spec = staticmethod(card_from_spec)  # type: ignore[assignment]


FAMILY = NnunetFamily()
