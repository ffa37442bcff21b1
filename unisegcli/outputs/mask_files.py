"""Masks read back from files, for statistics of existing segmentations (`uniseg stats`).

Accepted, in any mix (all on the scan's voxel grid — same shape and affine):

- one binary mask per structure: ``liver.nii.gz`` -> structure "liver" (any non-zero voxel
  is inside);
- a label map with its label table, the table found in this order:
  1. ``--labels FILE`` (JSON): ours (``labels.json``: {"labels": {"1": {"name", "task"}}}),
     a flat {"1": "liver", ...} map, or nnU-Net's ``dataset.json`` ({"labels": {"liver": 1}});
  2. names embedded in the NIfTI header extension, as TotalSegmentator's ``--ml`` output
     writes them (a CaretExtension XML ``<LabelTable>`` of ``<Label Key="1">name</Label>``);
  3. ``labels.json`` beside a file named ``segmentation.nii.gz`` (our ``--multilabel``);
  every label of the table is a structure, labels absent from the map are empty;
- a folder: its .nii/.nii.gz files as above. In our own output folder the per-structure
  masks are used and ``segmentation.nii.gz`` skipped (it loses overlaps); its ``labels.json``
  still gives each structure's task, model (several-model runs) and the run's order.

The masks are read one at a time when statistics ask for them (``MaskFiles`` is a lazy
mapping), so a case with 100+ structures never holds them all in memory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from unisegcli.errors import ImageShapeError, ImageValueError, InputError, InputNotFoundError, UsageError

if TYPE_CHECKING:
    import nibabel as nib

    from unisegcli.io.nifti import Scan

OUR_MULTILABEL = "segmentation.nii.gz"
OUR_LABELS = "labels.json"
AFFINE_TOLERANCE_MM = 1e-3  # float32 sforms of the same grid agree far better than this


@dataclass
class _Source:
    path: Path
    label: int | None = None  # None: binary mask (non-zero = inside)


@dataclass
class MaskFiles(Mapping):
    """structure -> bool [Z, Y, X] in the scan's internal order, read lazily from files."""

    scan: "Scan"
    sources: dict[str, _Source] = field(default_factory=dict)
    task_of: dict[str, str] = field(default_factory=dict)
    model_of: dict[str, str] = field(default_factory=dict)  # several-model runs: structure -> model
    run_order: list[str] = field(default_factory=list)  # structures in the order our labels.json lists them
    _cached: tuple[Path, np.ndarray] | None = None  # the last label map read

    def __getitem__(self, name: str) -> np.ndarray:
        source = self.sources[name]
        volume = self._volume(source.path)
        if source.label is None:
            check_binary(source.path, volume)
        mask = volume != 0 if source.label is None else volume == source.label
        return np.ascontiguousarray(self.scan.reorientation.to_internal(mask))

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)

    def _volume(self, path: Path) -> np.ndarray:
        if self._cached is not None and self._cached[0] == path:
            return self._cached[1]
        image = check_grid(path, self.scan)
        volume = np.asanyarray(image.dataobj)
        volume = volume.reshape(volume.shape[:3]) if volume.ndim > 3 and volume.size == np.prod(volume.shape[:3]) else volume
        self._cached = (path, volume)
        return volume


def check_grid(path: Path, scan: "Scan") -> "nib.Nifti1Image":
    """Open a mask and check it lies on the scan's grid (shape and affine); InputError if not."""
    from unisegcli.io.nifti import load_nifti

    image = load_nifti(path)
    shape = tuple(int(s) for s in image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    expected = tuple(scan.file_shape)
    if shape != expected:
        raise ImageShapeError(
            f"mask '{path}' has shape {shape}, the image '{scan.path}' has shape {expected}; expected "
            "masks on the image's voxel grid. Pass the scan the masks were made from, or resample them."
        )
    difference = float(np.max(np.abs(np.asarray(image.affine) - np.asarray(scan.image.affine))))
    if difference > AFFINE_TOLERANCE_MM:
        raise ImageValueError(
            f"mask '{path}' (shape {shape}) and the image '{scan.path}' (shape {expected}) have different "
            f"affines (up to {difference:.3g} mm apart); expected masks on the image's voxel grid. Pass "
            "the scan the masks were made from, or resample the masks onto it."
        )
    return image


@dataclass(frozen=True)
class LabelTable:
    """A label map's names: {label: structure}, and where known {structure: task / model}."""

    names: dict[int, str]
    tasks: dict[str, str] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)


def read_label_json(path: Path) -> LabelTable:
    """The label table of a labels JSON (see module docstring)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the label table '{path}': {exc}; expected a JSON file.") from exc
    table = data.get("labels", data) if isinstance(data, dict) else None
    names: dict[int, str] = {}
    tasks: dict[str, str] = {}
    models: dict[str, str] = {}
    for key, value in (table or {}).items():
        if isinstance(value, dict) and str(key).isdigit() and "name" in value:  # ours
            names[int(key)] = str(value["name"])
            if value.get("task"):
                tasks[str(value["name"])] = str(value["task"])
            if value.get("model"):
                models[str(value["name"])] = str(value["model"])
        elif isinstance(value, str) and str(key).strip().isdigit():  # {"1": "liver"}
            names[int(key)] = value
        elif isinstance(value, int) and not isinstance(value, bool) and not str(key).isdigit():  # nnU-Net
            names[value] = str(key)
    names.pop(0, None)  # background
    if not names:
        raise InputError(
            f"'{path}' holds no label table; expected {{\"1\": \"liver\", ...}}, our labels.json or an "
            "nnU-Net dataset.json ({\"labels\": {\"background\": 0, \"liver\": 1}})."
        )
    return LabelTable(names, tasks, models)


def embedded_labels(image: "nib.Nifti1Image") -> dict[int, str] | None:
    """Label names from a NIfTI extension holding a CaretExtension <LabelTable> (TotalSegmentator)."""
    import xml.etree.ElementTree as ElementTree

    for extension in getattr(image.header, "extensions", []):
        content = extension.get_content()
        text = content.decode("utf-8", "replace") if isinstance(content, bytes) else str(content)
        if "<LabelTable" not in text:
            continue
        try:
            root = ElementTree.fromstring(text.strip())
        except ElementTree.ParseError:
            continue
        names = {int(e.get("Key", "-1")): (e.text or "").strip() for e in root.iter("Label")}
        names = {k: v for k, v in names.items() if k > 0 and v}
        if names:
            return names
    return None


def _nifti_files(folder: Path) -> list[Path]:
    from unisegcli.io.nifti import is_nifti_name

    files = sorted(p for p in folder.iterdir() if p.is_file() and is_nifti_name(p) and not p.name.startswith("."))
    names = {p.name for p in files}
    if OUR_MULTILABEL in names and (folder / OUR_LABELS).is_file() and len(files) > 1:
        files = [p for p in files if p.name != OUR_MULTILABEL]  # per-structure files keep overlaps
    return files


def _label_table(path: Path, image: "nib.Nifti1Image", labels_json: Path | None) -> LabelTable | None:
    if labels_json is not None:
        return read_label_json(labels_json)
    embedded = embedded_labels(image)
    if embedded:
        return LabelTable(embedded)
    if path.name == OUR_MULTILABEL and (path.parent / OUR_LABELS).is_file():
        return read_label_json(path.parent / OUR_LABELS)
    return None


def _add(masks: MaskFiles, name: str, source: _Source) -> None:
    if name in masks.sources:
        raise UsageError(
            f"structure '{name}' comes from both '{masks.sources[name].path}' and '{source.path}'; "
            "expected each structure once. Pass one of them."
        )
    masks.sources[name] = source


def collect_mask_files(scan: "Scan", inputs: Sequence[Path], labels_json: Path | None = None) -> MaskFiles:
    """The structures of mask files/folders, checked against the scan's grid (headers only).

    labels_json: the label table of the one label map given (``--labels``). Raises
    InputNotFoundError for missing paths or folders without masks, ImageShapeError /
    ImageValueError for masks off the scan's grid, UsageError for repeated structures.
    """
    from unisegcli.io.nifti import case_id

    files: list[Path] = []
    for path in map(Path, inputs):
        if not path.exists():
            raise InputNotFoundError(f"mask '{path}' does not exist; expected a .nii/.nii.gz mask or a folder of them.")
        found = _nifti_files(path) if path.is_dir() else [path]
        if not found:
            raise InputNotFoundError(f"folder '{path}' holds no .nii/.nii.gz masks; expected mask files in it.")
        files += found
    files = [f for f in files if f.resolve() != Path(scan.path).resolve()]  # the scan beside its masks
    if labels_json is not None and len(files) != 1:
        raise UsageError(f"--labels names the table of one label map, but {len(files)} mask files were "
                         "given; expected exactly one label map with --labels.")
    masks = MaskFiles(scan)
    for path in files:
        image = check_grid(path, scan)
        table = _label_table(path, image, labels_json)
        if table is None:
            _add(masks, case_id(path), _Source(path))
            continue
        for label in sorted(table.names):
            _add(masks, table.names[label], _Source(path, label))
        masks.task_of.update(table.tasks)
        masks.model_of.update(table.models)
    for folder in dict.fromkeys(Path(p) for p in inputs if Path(p).is_dir()):
        _take_run_facts(masks, folder)
    return masks


def _take_run_facts(masks: MaskFiles, folder: Path) -> None:
    """Tasks, models and order from our ``labels.json`` in ``folder`` (written with
    --multilabel) for the structures found there; a table that cannot be read adds nothing."""
    if not (folder / OUR_LABELS).is_file():
        return
    try:
        table = read_label_json(folder / OUR_LABELS)
    except InputError:
        return
    known = [name for _, name in sorted(table.names.items()) if name in masks.sources]
    masks.task_of.update({n: table.tasks[n] for n in known if n in table.tasks})
    masks.model_of.update({n: table.models[n] for n in known if n in table.models})
    masks.run_order += [n for n in known if n not in masks.run_order]
    masks.sources = order_like(masks, masks.run_order).sources


def check_binary(path: Path, volume: np.ndarray) -> None:
    """A per-structure mask must hold 0/1 (or a probability 0..1); more means a label map."""
    if volume.size and (volume.max() > 1 or volume.min() < 0):
        values = np.unique(volume)
        raise InputError(
            f"mask '{path}' holds {values.size} different values ({', '.join(f'{v:g}' for v in values[:6])}"
            f"{', ...' if values.size > 6 else ''}) but no label table; expected a 0/1 mask, or a label map "
            "with its names: pass --labels LABELS.json (or use a labels.json / TotalSegmentator --ml file)."
        )


def order_like(masks: MaskFiles, order: Sequence[str]) -> MaskFiles:
    """The same masks with the structures named in ``order`` first, in that order."""
    rank = {name: i for i, name in enumerate(order)}
    names = sorted(masks.sources, key=lambda n: (rank.get(n, len(rank)), list(masks.sources).index(n)))
    return MaskFiles(masks.scan, {n: masks.sources[n] for n in names}, dict(masks.task_of), dict(masks.model_of),
                     list(masks.run_order))
