"""Read an nnU-Net v2 results folder: dataset.json, plans.json, folds; unpack zipped folders.

Facts from nnU-Net v2.8.1 (MIC-DKFZ/nnUNet):

* folder name ``<trainer>__<plans>__<configuration>`` (``utilities/file_path_utilities.py``
  ``get_output_folder``); folds live in ``fold_<n>/checkpoint_final.pth`` (or
  ``checkpoint_best.pth``);
* ``plans.json`` ``configurations[name]`` may name a parent in ``inherits_from``: the parent
  dict updated with the child's keys (``plans_handler.PlansManager._internal_resolve_
  configuration_inheritance``);
* plans written before nnU-Net 2.4 have no ``architecture`` but ``UNet_class_name``,
  ``UNet_base_num_features``, ``unet_max_num_features``, ``n_conv_per_stage_encoder/decoder``,
  ``pool_op_kernel_sizes``, ``conv_kernel_sizes``; nnU-Net rebuilds the architecture from them
  (``plans_handler.ConfigurationManager.__init__``), and so does ``legacy_architecture``
  (TotalSegmentator's v2.0.0 weights predate 2.4);
* ``dataset.json`` ``labels`` maps name -> int, or name -> list of ints for region training
  (then ``regions_class_order`` gives the label each region paints, in order;
  ``utilities/label_handling/label_handling.py``); ``channel_names`` one entry per input file.

Everything is read as JSON: nothing from a downloaded folder is executed.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from unisegcli.errors import CheckpointError
from unisegcli.io.archive import extract_zip as archive_extract

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")
_FOLD = re.compile(r"^fold_(\d+|all)$")
_UNPACKED = ".unpacked"  # suffix of the folder a cached zip is extracted into
ZIP_FIX = "Extract the files you trust by hand and use the folder."


@dataclass(frozen=True)
class Label:
    """One output structure of the dataset: its name and label value (or region labels)."""

    name: str
    value: int  # the integer written in nnU-Net's segmentation file
    region: tuple[int, ...] | None = None  # region training: the labels the region covers


@dataclass(frozen=True)
class ResultsFolder:
    """A checked nnU-Net v2 results folder.

    configuration: the resolved ``plans["configurations"][name]`` (inheritance applied).
    folds: fold name ("0", "1", ..., "all") -> checkpoint path, sorted.
    """

    path: Path
    dataset: Mapping[str, Any]
    plans: Mapping[str, Any]
    configuration_name: str
    configuration: Mapping[str, Any]
    trainer: str
    folds: Mapping[str, Path]

    @property
    def channel_names(self) -> tuple[str, ...]:
        names = self.dataset["channel_names"]
        return tuple(str(names[k]) for k in sorted(names, key=int))

    @property
    def _label_items(self) -> list[tuple[str, Any]]:
        # an "ignore" label (sparse annotations) is no network output (LabelManager)
        return [(n, v) for n, v in self.dataset["labels"].items() if n != "ignore"]

    @property
    def is_regions(self) -> bool:
        return any(isinstance(v, (list, tuple)) for _, v in self._label_items)

    @property
    def num_outputs(self) -> int:
        """Output channels of the network: labels with background, or one per region."""
        count = len(self._label_items)
        return count - 1 if self.is_regions else count

    def labels(self) -> tuple[Label, ...]:
        """The foreground structures, in network output order (background left out)."""
        items = self._label_items
        if not self.is_regions:
            return tuple(Label(str(n), int(v)) for n, v in sorted(items, key=lambda kv: int(kv[1])) if int(v) != 0)
        order = list(self.dataset.get("regions_class_order") or [])
        regions = [(n, tuple(v) if isinstance(v, (list, tuple)) else (int(v),)) for n, v in items]
        regions = [(n, r) for n, r in regions if r != (0,)]
        if len(order) != len(regions):
            raise CheckpointError(
                f"{self.path / 'dataset.json'} declares {len(regions)} regions but "
                f"regions_class_order has {len(order)} entries; expected one per region. "
                "Fix dataset.json (nnU-Net region training needs both)."
            )
        return tuple(Label(str(n), int(c), tuple(int(x) for x in r)) for (n, r), c in zip(regions, order))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path.parent} has no {path.name}; expected an nnU-Net v2 results folder "
            "(<trainer>__<plans>__<configuration>/ with dataset.json, plans.json and fold_*/)."
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}; expected the JSON file nnU-Net v2 writes.") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, expected a JSON object.")
    return data


def resolve_configuration(plans: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``plans["configurations"][name]`` with ``inherits_from`` applied (parent updated by child)."""
    configs = plans.get("configurations") or {}
    seen: list[str] = []
    chain: list[dict[str, Any]] = []
    current: str | None = name
    while current is not None:
        if current in seen or current not in configs:
            known = ", ".join(sorted(configs)) or "none"
            raise CheckpointError(
                f"plans.json has no usable configuration '{current}' (chain {' -> '.join(seen + [current])}); "
                f"it has {known}. Pass the results folder of a configuration the plans define."
            )
        seen.append(current)
        chain.append(dict(configs[current]))
        current = chain[-1].get("inherits_from")
    resolved: dict[str, Any] = {}
    for entry in reversed(chain):
        resolved.update(entry)
    resolved.pop("inherits_from", None)
    if "architecture" not in resolved and "UNet_class_name" in resolved:
        resolved["architecture"] = legacy_architecture(resolved)
    return resolved


LEGACY_CLASSES = {  # dynamic_network_architectures >= 0.3 keeps both in architectures.unet
    "PlainConvUNet": ("dynamic_network_architectures.architectures.unet.PlainConvUNet", "n_conv_per_stage"),
    "ResidualEncoderUNet": ("dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                            "n_blocks_per_stage"),
}


def legacy_architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``architecture`` entry of an old (< 2.4) plans configuration, as nnU-Net rebuilds it:
    features ``min(base * 2**s, max)``, bias, InstanceNorm(eps 1e-5, affine), LeakyReLU."""
    name = config["UNet_class_name"]
    if name not in LEGACY_CLASSES:
        raise CheckpointError(
            f"plans.json (old format) names UNet_class_name '{name}'; expected one of "
            f"{', '.join(LEGACY_CLASSES)}. Re-plan the dataset with nnU-Net >= 2.4."
        )
    class_name, blocks_key = LEGACY_CLASSES[name]
    stages = len(config["n_conv_per_stage_encoder"])
    dim = len(config["patch_size"])
    base, top = int(config["UNet_base_num_features"]), int(config["unet_max_num_features"])
    return {
        "network_class_name": class_name,
        "arch_kwargs": {
            "n_stages": stages,
            "features_per_stage": [min(base * 2 ** s, top) for s in range(stages)],
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": [list(k) for k in config["conv_kernel_sizes"]],
            "strides": [list(k) for k in config["pool_op_kernel_sizes"]],
            blocks_key: list(config["n_conv_per_stage_encoder"]),
            "n_conv_per_stage_decoder": list(config["n_conv_per_stage_decoder"]),
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _fold_checkpoints(path: Path) -> dict[str, Path]:
    folds: dict[str, Path] = {}
    for sub in sorted(path.iterdir()) if path.is_dir() else []:
        match = _FOLD.match(sub.name)
        if not match or not sub.is_dir():
            continue
        for name in CHECKPOINT_NAMES:
            if (sub / name).is_file():
                folds[match.group(1)] = sub / name
                break
    return dict(sorted(folds.items(), key=lambda kv: (kv[0] == "all", int(kv[0]) if kv[0].isdigit() else 0)))


def read_results_folder(path: str | Path) -> ResultsFolder:
    """Read and check a results folder (or a folder holding exactly one, e.g. DatasetXXX_Name/)."""
    path = find_results_folder(Path(path).expanduser())
    dataset = _read_json(path / "dataset.json")
    plans = _read_json(path / "plans.json")
    for key, doc, where in (("labels", dataset, "dataset.json"), ("channel_names", dataset, "dataset.json"),
                            ("configurations", plans, "plans.json")):
        if not isinstance(doc.get(key), dict) or not doc[key]:
            raise CheckpointError(f"{path / where} has no '{key}' object; expected nnU-Net v2's {where}.")
    trainer, _, rest = path.name.partition("__")
    _plans_name, _, configuration = rest.partition("__")
    if not configuration:
        # an unusual folder name: the single 3d configuration the plans define, if any
        configuration = "3d_fullres" if "3d_fullres" in plans["configurations"] else next(iter(plans["configurations"]))
    config = resolve_configuration(plans, configuration)
    for key in ("patch_size", "spacing", "normalization_schemes", "architecture"):
        if key not in config:
            raise CheckpointError(
                f"{path / 'plans.json'}: configuration '{configuration}' has no '{key}'; expected an "
                "nnU-Net v2 (>= 2.4, with 'architecture') plans file."
            )
    folds = _fold_checkpoints(path)
    if not folds:
        raise CheckpointError(
            f"{path} has no fold_*/checkpoint_final.pth (or checkpoint_best.pth); expected at least "
            "one trained fold. Copy the fold folders along with plans.json and dataset.json."
        )
    return ResultsFolder(path, dataset, plans, configuration, config, trainer or "nnUNetTrainer", folds)


def find_results_folder(path: Path, hint: str | None = None) -> Path:
    """The results folder at or below ``path`` (the one holding plans.json and dataset.json).

    hint: a folder name (``<trainer>__<plans>__<configuration>``) to pick when there are several.
    """
    if not path.exists():
        raise CheckpointError(f"nnU-Net model folder {path} does not exist; expected a results folder "
                              "(<trainer>__<plans>__<configuration>/) or a folder holding one.")
    if (path / "plans.json").is_file() and (path / "dataset.json").is_file():
        return path
    found = sorted(p.parent for p in path.rglob("plans.json") if (p.parent / "dataset.json").is_file())
    if hint is not None:
        found = [p for p in found if p.name == hint] or found
    if len(found) != 1:
        what = "none" if not found else ", ".join(str(p) for p in found[:4])
        raise CheckpointError(
            f"{path} holds {len(found)} nnU-Net results folders ({what}); expected exactly one folder "
            "with plans.json and dataset.json. Pass that folder itself."
        )
    return found[0]


def extract_zip(source: Path, target: Path) -> Path:
    """Extract a checked zip into the new folder ``target`` (all-or-nothing: ``io.archive``)."""
    return archive_extract(source, target, fix=ZIP_FIX)


def unpacked_zip(source: Path) -> Path:
    """A cached zip's extracted folder: next to it when the cache is writable, else in a temp folder."""
    target = source.with_name(source.name + _UNPACKED)
    if target.is_dir():  # extraction renames a complete folder into place, so it is complete
        return target
    try:
        return extract_zip(source, target)
    except OSError:  # a read-only shared cache: unpack for this process only
        return extract_zip(source, Path(tempfile.mkdtemp(prefix="uniseg-nnunet-")) / "model")
