"""Hermes' sliding window, on top of the engine's batched window predictor.

Upstream (yhygao/universal-medical-image-segmentation, ``inference/inference3d.py``
``inference_sliding_window`` and ``split_idx``; chunking in ``training/validation.py``; checked
window for window against a transcription of that loop and against the ``hermes_tiny``
fixture) tiles differently from nnU-Net, so the window positions live here while the forward
passes, activation, optional mirroring and autocast go through
``inference.engine.predict_windows``:

* an axis shorter than the window is zero-padded at its **end** (cropped afterwards);
* with h = window // 2, windows i = 0 .. size // h - 1 start at h·i, and a window that would
  pass the end is moved to end exactly at the border (so duplicates happen);
* every window's logits go through a sigmoid and the probabilities are averaged uniformly
  (``gaussian=True`` weights them by the engine's Gaussian instead, our option). A window
  that upstream visits k times is predicted once and counted k times: the same mean, fewer
  forwards (a 128-voxel axis alone doubles the work upstream);
* volumes deeper than ``MAX_DEPTH`` slices are cut along z into ceil(D / 600) consecutive
  chunks of ceil(D / n) slices, predicted separately and concatenated.

Layouts: volumes are float32 tensors [1, Z, Y, X] (z, y, x); outputs float32 [T, Z, Y, X]
probabilities, one channel per token of ``task_indices``.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    import torch

MAX_DEPTH = 600  # inference3d.py: volumes deeper than this are split along z
WINDOW = (128, 128, 128)  # hermes_resunet_3d.yaml window_size (z, y, x)


def axis_starts(size: int, window: int) -> list[int]:
    """Window starts along one axis already padded to at least ``window`` (duplicates kept)."""
    half = window // 2
    return [min(half * i, size - window) for i in range(size // half)]


def hermes_windows(size: Sequence[int], window: Sequence[int]) -> tuple[tuple[int, ...], list[tuple[slice, ...]]]:
    """(padded size, window slices with axis 0 outermost) for a (z, y, x) volume."""
    padded = tuple(max(int(s), int(w)) for s, w in zip(size, window))
    starts = [axis_starts(s, int(w)) for s, w in zip(padded, window)]
    return padded, [tuple(slice(a, a + int(w)) for a, w in zip(combo, window))
                    for combo in itertools.product(*starts)]


def count_windows(size: Sequence[int], window: Sequence[int] = WINDOW) -> int:
    """Forward passes ``predict_volume`` makes for a volume of this (z, y, x) size (distinct
    windows only)."""
    depth = int(size[0])
    chunks = _chunks(depth)
    return sum(len(unique_windows(hermes_windows((hi - lo, *size[1:]), window)[1])) for lo, hi in chunks)


def unique_windows(slices: Sequence[tuple[slice, ...]]) -> list[tuple[tuple[slice, ...], int]]:
    """Distinct windows in first-visit order, each with how many times upstream visits it."""
    counts: dict[tuple[tuple[int, int], ...], int] = {}
    first: dict[tuple[tuple[int, int], ...], tuple[slice, ...]] = {}
    for sl in slices:
        key = tuple((s.start, s.stop) for s in sl)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, sl)
    return [(first[key], n) for key, n in counts.items()]


def _chunks(depth: int) -> list[tuple[int, int]]:
    n = max(1, math.ceil(depth / MAX_DEPTH))
    step = math.ceil(depth / n)
    return [(lo, min(lo + step, depth)) for lo in range(0, depth, step)]


class TokenBoundNet:
    """``net(x) -> seg logits`` for the engine: the Hermes network with its token list fixed.

    task_indices: the full token list (dataset indices + null token); modality_index: the
    dataset's modality id. Every window of a batch gets the same lists.
    """

    def __init__(self, net: Any, task_indices: Sequence[int], modality_index: int) -> None:
        import torch

        self.net = net
        self.task_indices = torch.tensor([list(task_indices)], dtype=torch.int64)
        self.modality_index = torch.tensor([[int(modality_index)]], dtype=torch.int64)

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        b = x.shape[0]
        tasks = self.task_indices.to(x.device).expand(b, -1)
        modality = self.modality_index.to(x.device).expand(b, -1)
        return self.net(x, tasks, modality)[0]


def predict_volume(
    volume: "torch.Tensor",
    net: Any,
    task_indices: Sequence[int],
    modality_index: int,
    *,
    window: Sequence[int] = WINDOW,
    batch_size: int = 1,
    gaussian: bool = False,
    tta: bool = False,
    precision: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    keep: Sequence[int] | None = None,
    accumulator_device: "str | torch.device | None" = None,
) -> "torch.Tensor":
    """Mean sigmoid probabilities [T, Z, Y, X] of a [1, Z, Y, X] volume (see module docstring).

    keep: output channels to accumulate and return (positions in ``task_indices``); every
    forward still carries the whole token list. None keeps all. accumulator_device: where the
    sums live (None: the volume's device; "cpu" after a CUDA out-of-memory).
    """
    import torch

    if volume.ndim != 4:
        raise ValueError(f"expected a [C, Z, Y, X] volume, got shape {tuple(volume.shape)}")
    total = count_windows(tuple(volume.shape[1:]), window)
    done = [0]

    def report(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    parts = [
        _predict_chunk(volume[:, lo:hi], net, task_indices, modality_index, window=window,
                       batch_size=batch_size, gaussian=gaussian, tta=tta, precision=precision, report=report,
                       keep=keep, store=accumulator_device)
        for lo, hi in _chunks(int(volume.shape[1]))
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _predict_chunk(volume: "torch.Tensor", net: Any, task_indices: Sequence[int], modality_index: int, *,
                   window: Sequence[int], batch_size: int, gaussian: bool, tta: bool, precision: str,
                   report: Callable[[int], None], keep: Sequence[int] | None = None,
                   store: "str | torch.device | None" = None) -> "torch.Tensor":
    import torch

    from unisegcli.inference.engine import autocast_dtype, mirror_combinations, predict_windows
    from unisegcli.inference.gaussian import gaussian_importance

    patch = tuple(int(w) for w in window)
    size = tuple(volume.shape[1:])
    padded, slices = hermes_windows(size, patch)
    windows = unique_windows(slices)
    if padded != size:  # zeros at the end of each short axis (inference3d.py F.pad)
        pads = [p for s, q in reversed(list(zip(size, padded))) for p in (0, q - s)]
        volume = torch.nn.functional.pad(volume, pads, mode="constant", value=0.0)
    device = volume.device
    store = torch.device(store) if store is not None else device
    bound = TokenBoundNet(net, task_indices, modality_index)
    weight = gaussian_importance(patch, dtype=torch.float32, device=store) if gaussian else None
    autocast = autocast_dtype(precision, device)
    flips = mirror_combinations() if tta else [()]
    acc: torch.Tensor | None = None
    counts = torch.zeros(padded, dtype=torch.float32, device=store)
    with torch.inference_mode():
        for start in range(0, len(windows), max(1, int(batch_size))):
            batch = windows[start:start + max(1, int(batch_size))]
            x = torch.stack([volume[(slice(None),) + sl] for sl, _ in batch])
            (probs,) = predict_windows(bound, x, [_plain_head()], flips=flips, autocast=autocast,
                                       activation="sigmoid")
            if keep is not None:
                probs = probs[:, list(keep)]
            probs = probs.to(store)
            if acc is None:
                acc = torch.zeros((probs.shape[1], *padded), dtype=torch.float32, device=store)
            for j, (sl, times) in enumerate(batch):
                if weight is None:
                    acc[(slice(None),) + sl] += probs[j] * times
                    counts[sl] += float(times)
                else:
                    acc[(slice(None),) + sl] += probs[j] * (weight * times)
                    counts[sl] += weight * times
            report(len(batch))
        assert acc is not None
        acc /= counts
    crop = tuple(slice(0, s) for s in size)
    return acc[(slice(None),) + crop].contiguous()


def _plain_head() -> Any:
    from unisegcli.inference.engine import Head

    return Head(None, None)
