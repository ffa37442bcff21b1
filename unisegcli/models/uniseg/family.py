"""The UniSeg family (``models.families``): load the prompt-driven network, predict label maps.

No family options: UniSeg blends Gaussian-weighted softmax probabilities as nnU-Net v1 does.

Tasks that share channels run in one predictor pass (``models.uniseg.predictor``: one
preprocessing per task group, one encoder pass per window for all its tasks), in three stages
(``prepare_case``, ``infer_case``, ``finish_case``) that a batch overlaps across cases.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from unisegcli.io.cases import LoadedCase, channel_groups, task_channels
from unisegcli.models.families import ModelFamily, RunSettings, share_progress, warn_about_input

if TYPE_CHECKING:
    import torch

    from unisegcli.models.uniseg.predictor import PreparedGroup
    from unisegcli.weights.cards import ModelCard, TaskCard

    Prepared = list[tuple[list[TaskCard], list[PreparedGroup]]]  # per channel group: its tasks, task groups
    Raw = list[list[list[torch.Tensor]]]  # per channel group, task group, task: probabilities [n, z, y, x]


FULL_SIZE_FEATURES = 32  # the released network's first-stage width


def prefer_channels_last(net: Any, device: "torch.device") -> None:
    """channels_last_3d for full-size UniSeg networks on the CPU, where it is faster; small
    networks and other devices keep the default layout (measured slower or not measured)."""
    config = getattr(net, "config", None)
    if not hasattr(net, "use_channels_last") or config is None:
        return  # a stand-in network
    wanted = device.type == "cpu" and config.base_num_features >= FULL_SIZE_FEATURES
    if net.channels_last != wanted:
        net.use_channels_last(wanted)


def load(card: "ModelCard", files: Mapping[str, Path], *, settings: RunSettings | None = None,
         tasks: Sequence["TaskCard"] = ()) -> Any:
    """The UniSeg network from the cached checkpoint (and plans, for v1 checkpoints)."""
    from unisegcli.models import load_uniseg

    return load_uniseg(files["checkpoint"], files.get("plans"))


def prepare_case(loaded: LoadedCase, tasks: Sequence["TaskCard"], net: Any, *, settings: RunSettings,
                 device: "torch.device", warn: Any = None) -> "Prepared":
    """CPU stage: per channel group, its tasks and the scan preprocessed once per task group."""
    from unisegcli.models.uniseg.predictor import network_patch_size, prepare_groups

    patch = network_patch_size(net)
    prepared = []
    for group in channel_groups(tasks):
        image = task_channels(loaded, group[0])
        warn_about_input(warn, loaded, image, group, patch)
        prepared.append((group, prepare_groups(image, loaded.scan.spacing_mm, group, patch, device=device,
                                               step=settings.step_or_default)))
    return prepared


def infer_case(prepared: "Prepared", net: Any, *, settings: RunSettings, device: "torch.device",
               progress: Any = None) -> "Raw":
    """Network stage: blended probabilities per channel group, task group and task."""
    from unisegcli.models.uniseg.predictor import infer_groups, network_patch_size

    prefer_channels_last(net, device)
    patch = network_patch_size(net)
    return [infer_groups(groups, net, patch, device=device, batch_size=settings.batch_size,
                         step=settings.step_or_default, tta=settings.tta, precision=settings.precision,
                         accumulator_device=settings.accumulator_device,
                         progress=share_progress(progress, number, len(prepared)))
            for number, (_, groups) in enumerate(prepared)]


def finish_case(prepared: "Prepared", raw: "Raw") -> dict[str, np.ndarray]:
    """Restore stage: {task name: uint8 [Z, Y, X] label map}, channel groups in order."""
    from unisegcli.models.uniseg.predictor import finish_groups

    label_maps: dict[str, np.ndarray] = {}
    for (tasks, groups), probabilities in zip(prepared, raw):
        restored = finish_groups(groups, probabilities)
        label_maps.update((t.name, restored[t.name]) for t in tasks)
    return label_maps


class UniSegFamily(ModelFamily):
    """UniSeg: every engine option, no options of its own."""

    name = "uniseg"

    load = staticmethod(load)  # type: ignore[assignment]
    prepare_case = staticmethod(prepare_case)  # type: ignore[assignment]
    infer_case = staticmethod(infer_case)  # type: ignore[assignment]
    finish_case = staticmethod(finish_case)  # type: ignore[assignment]


FAMILY = UniSegFamily()
