"""Predict every requested task of one scan: preprocess, sliding window, restore.

Tasks that share channels, spacing and normalisation form a group: the scan is preprocessed
once per group and the group's tasks share one sliding-window pass, with the UniSeg encoder
run once per batch of windows. Per task, as UniSeg (nnU-Net v1) predicts: softmax over all
output channels for every window (and every flip with TTA), the task's first n_k channels kept,
Gaussian-weighted average of those probabilities, then export (linear resampling back to the cropped input
grid, argmax, paste into the full volume; nnU-Net v1 ``save_segmentation_nifti_from_softmax``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from unisegcli.errors import UsageError
from unisegcli.inference.engine import Head, Progress, resolve_device, sliding_window
from unisegcli.inference.tiling import compute_steps, padding_for_patch
from unisegcli.postprocessing.restore import restore_label_map
from unisegcli.preprocessing.crop import nonzero_bbox
from unisegcli.preprocessing.pipeline import check_channels, preprocess
from unisegcli.preprocessing.trace import Trace

if TYPE_CHECKING:
    import torch

    from unisegcli.weights.cards import TaskCard


def network_patch_size(net: Any, patch_size: Sequence[int] | None = None) -> tuple[int, int, int]:
    """The window size (z, y, x): given, or ``net.patch_size``, or ``net.config.patch_size``."""
    if patch_size is None:
        patch_size = getattr(net, "patch_size", None) or getattr(
            getattr(net, "config", None), "patch_size", None
        )
    if patch_size is None or len(patch_size) != 3:
        raise ValueError("the network does not say its patch size; pass patch_size=(z, y, x)")
    return tuple(int(p) for p in patch_size)  # type: ignore[return-value]


def group_tasks(tasks: Sequence["TaskCard"]) -> list[list["TaskCard"]]:
    """Tasks grouped by (channels, spacing, normalisation), groups and members in input order."""
    groups: dict[tuple, list[TaskCard]] = {}
    for task in tasks:
        key = (tuple(task.channels), tuple(task.spacing_mm), json.dumps(task.normalization, sort_keys=True))
        groups.setdefault(key, []).append(task)
    return list(groups.values())


def _count_windows(shape: Sequence[int], patch: Sequence[int], step: float) -> int:
    padded = [n + lo + hi for n, (lo, hi) in zip(shape, padding_for_patch(shape, patch))]
    return math.prod(len(s) for s in compute_steps(padded, patch, step))


@dataclass
class PreparedGroup:
    """Tasks that share one preprocessing and one sliding-window pass, ready for the network."""

    tasks: list["TaskCard"]
    volume: "torch.Tensor"  # float32 [C, z, y, x], normalised, at the tasks' spacing, on the device
    trace: Trace  # what ``restore_label_map`` undoes
    windows: int  # sliding-window positions (without TTA)


def prepare_groups(image_czyx: np.ndarray, spacing_mm: Sequence[float], tasks: Sequence["TaskCard"],
                   patch: Sequence[int], *, device: "str | torch.device" = "cpu",
                   step: float = 0.5) -> list[PreparedGroup]:
    """Preprocess a scan once per task group (``group_tasks``): the CPU stage of ``predict_case``.

    image_czyx: [C, Z, Y, X], channels in the task cards' order, scanner units; spacing_mm:
    (z, y, x). Raises UsageError without tasks, ChannelError on a channel mismatch.
    """
    if not tasks:
        raise UsageError("no task given; pass at least one task card.")
    for task in tasks:
        check_channels(image_czyx, task)
    torch_device = resolve_device(device)
    bbox = nonzero_bbox(image_czyx)
    groups = []
    for group in group_tasks(tasks):
        volume, trace = preprocess(image_czyx, spacing_mm, group[0], torch_device, bbox=bbox)
        groups.append(PreparedGroup(group, volume, trace, _count_windows(tuple(volume.shape[1:]), patch, step)))
    return groups


def infer_groups(groups: Sequence[PreparedGroup], net: Any, patch: Sequence[int], *,
                 device: "str | torch.device" = "auto", batch_size: int | None = None, step: float = 0.5,
                 tta: bool = False, precision: str = "auto", progress: Progress | None = None,
                 accumulator_device: "str | torch.device | None" = None) -> list[list["torch.Tensor"]]:
    """The network stage of ``predict_case``: per group, per task, blended softmax
    probabilities [n_k, z, y, x] in the group's grid. ``groups`` stay as they were."""
    import torch

    torch_device = resolve_device(device)
    if isinstance(net, torch.nn.Module):
        net.to(torch_device).eval()
    total = sum(g.windows for g in groups)
    outputs = []
    offset = 0
    for group in groups:

        def report(done: int, _n: int, _offset: int = offset) -> None:
            if progress is not None:
                progress(_offset + done, total)

        outputs.append(sliding_window(
            group.volume, net, patch, heads=[Head(t.index, t.num_classes) for t in group.tasks], step=step,
            batch_size=batch_size, tta=tta, precision=precision, activation="softmax", progress=report,
            accumulator_device=accumulator_device,
        ))
        offset += group.windows
    return outputs


def finish_groups(groups: Sequence[PreparedGroup], probabilities: Sequence[Sequence["torch.Tensor"]]
                  ) -> dict[str, np.ndarray]:
    """The restore stage of ``predict_case``: {task name: uint8 [Z, Y, X] label map}."""
    results = {}
    for group, group_probs in zip(groups, probabilities):
        for task, probs in zip(group.tasks, group_probs):
            results[task.name] = restore_label_map(probs, group.trace)
    return results


def predict_case(
    image_czyx: np.ndarray,
    spacing_mm: Sequence[float],
    tasks: Sequence["TaskCard"],
    net: Any,
    *,
    device: "str | torch.device" = "auto",
    batch_size: int | None = None,
    step: float = 0.5,
    tta: bool = False,
    precision: str = "auto",
    progress: Progress | None = None,
    patch_size: Sequence[int] | None = None,
    accumulator_device: "str | torch.device | None" = None,
) -> dict[str, np.ndarray]:
    """Label maps of every task for one scan, in the scan's own grid.

    image_czyx: [C, Z, Y, X] array, channels in the task cards' order, intensities in
    scanner units; spacing_mm: (z, y, x). net: UniSeg-like (``encode``/``decode``) or
    ``net(x, task_index)``; moved to ``device`` and put in eval mode. batch_size: windows
    per forward (None: the engine's policy, ``engine.batch_size_for``). accumulator_device:
    where the blended probabilities live (None: ``device``). progress(done, total) counts
    windows over all groups.

    Returns {task name: uint8 [Z, Y, X] label map (0 = background, 1..n_k-1 = the card's
    labels)}. A channel mismatch raises ChannelError; an unavailable device DeviceError.
    The three stages (``prepare_groups``, ``infer_groups``, ``finish_groups``) in turn.
    """
    patch = network_patch_size(net, patch_size)
    groups = prepare_groups(image_czyx, spacing_mm, tasks, patch, device=device, step=step)
    probabilities = infer_groups(groups, net, patch, device=device, batch_size=batch_size, step=step, tta=tta,
                                 precision=precision, progress=progress, accumulator_device=accumulator_device)
    labels = finish_groups(groups, probabilities)
    return {task.name: labels[task.name] for task in tasks}
