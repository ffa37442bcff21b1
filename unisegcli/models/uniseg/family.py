"""The UniSeg family (``models.families``): load the prompt-driven network, predict label maps.

No family options: UniSeg blends Gaussian-weighted softmax probabilities as nnU-Net v1 does.

Tasks that share channels run in one predictor pass (``inference.predictor.predict_case``:
one preprocessing per channel group, one encoder pass per window for all its tasks).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from unisegcli.io.cases import LoadedCase, channel_groups, task_channels
from unisegcli.models.families import ModelFamily, RunSettings, share_progress, warn_about_input

if TYPE_CHECKING:
    import torch

    from unisegcli.weights.cards import ModelCard, TaskCard


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


def predict(
    loaded: LoadedCase,
    tasks: Sequence["TaskCard"],
    net: Any,
    *,
    settings: RunSettings,
    device: "torch.device",
    progress: Any = None,
    warn: Any = None,
) -> dict[str, np.ndarray]:
    """{task name: uint8 [Z, Y, X] label map} for one case, one predictor pass per channel group."""
    from unisegcli.models.uniseg.predictor import network_patch_size, predict_case

    prefer_channels_last(net, device)
    groups = channel_groups(tasks)
    label_maps: dict[str, np.ndarray] = {}
    for number, group in enumerate(groups):
        image = task_channels(loaded, group[0])
        warn_about_input(warn, loaded, image, group, network_patch_size(net))
        label_maps.update(predict_case(
            image,
            loaded.scan.spacing_mm,
            group,
            net,
            device=device,
            batch_size=settings.batch_size,
            step=settings.step_or_default,
            tta=settings.tta,
            precision=settings.precision,
            accumulator_device=settings.accumulator_device,
            progress=share_progress(progress, number, len(groups)),
        ))
    return label_maps


class UniSegFamily(ModelFamily):
    """UniSeg: every engine option, no options of its own."""

    name = "uniseg"

    load = staticmethod(load)  # type: ignore[assignment]
    predict = staticmethod(predict)  # type: ignore[assignment]


FAMILY = UniSegFamily()
