"""The sliding-window engine: blend overlapping patch predictions into whole-volume outputs.

Follows nnU-Net v2 ``nnUNetPredictor.predict_sliding_window_return_logits`` and
``_internal_maybe_mirror_and_predict`` (nnunetv2/inference/predict_from_raw_data.py): pad
with zeros to at least the patch, visit windows at ``compute_steps`` positions (axis 0
outermost; a family may pass its upstream's ``tiling.Placement`` instead), optionally
average the predictions of all flips of the 3 spatial axes, weight each window by the
Gaussian importance map, divide by the summed weights, crop the padding.

Two things go beyond nnU-Net:

* several tasks in one pass: with a network that has ``encode(x)`` and
  ``decode(features, task_index)`` (UniSeg), each batch of windows is encoded once and
  decoded once per task, and each task accumulates only its first n_k output channels;
* several windows per forward (``batch_size``).

Accumulation is float32 by default. ``accumulation="fp16"`` reproduces nnU-Net v2 exactly:
it accumulates in float16 even on CPU (``acc = fp16(fp32(acc) + pred * g)``,
``w = fp16(w + g)``, then ``fp16(acc / w)``), which loses precision at the volume's rim;
it is meant for parity tests.

Layouts: the volume is a float tensor [C, Z, Y, X] (z, y, x = numpy order of the resampled
array) on the device that runs the network; outputs are float32 [n_k, Z, Y, X].
"""

from __future__ import annotations

import contextlib
import itertools
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence

from unisegcli.errors import DeviceError, UsageError
from unisegcli.inference.gaussian import gaussian_importance
from unisegcli.inference.tiling import padding_for_patch, window_slices
from unisegcli.settings import PRECISIONS

if TYPE_CHECKING:
    import torch

    from unisegcli.inference.tiling import Placement

ACCUMULATIONS = ("fp32", "fp16")
ACTIVATIONS = (None, "softmax", "sigmoid")
Progress = Callable[[int, int], None]


class Head(NamedTuple):
    """One output of the engine: a task prompt index (None for a plain predictor) and how many
    leading output channels to keep (None = all)."""

    task_index: int | None
    channels: int | None = None


def resolve_device(spec: "str | torch.device | None" = "auto") -> "torch.device":
    """Turn "auto", "cpu", "cuda", "cuda:N" or "mps" into a torch.device that exists.

    "auto" picks CUDA when available, else CPU. A device that is not available raises
    DeviceError saying what was asked, what this machine has and what to do instead.
    """
    import torch

    if spec is None:
        spec = "auto"
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device '{spec}'; expected auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = (
                "this PyTorch build has no CUDA support"
                if torch.version.cuda is None
                else "no CUDA GPU is visible"
            )
            raise DeviceError(
                f"device '{spec}' was requested but {build} (torch {torch.__version__}). "
                "Use --device cpu (or auto), or install a CUDA build of PyTorch on a machine "
                "with an NVIDIA GPU."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device '{spec}' was requested but only {torch.cuda.device_count()} CUDA GPU(s) exist "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})."
            )
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError(
                f"device '{spec}' was requested but Apple MPS is not available; use --device cpu."
            )
    elif device.type != "cpu":
        raise UsageError(f"unsupported device '{spec}'; expected auto, cpu, cuda, cuda:N or mps.")
    return device


def autocast_dtype(precision: str, device: "torch.device") -> "torch.dtype | None":
    """The autocast dtype for ``precision`` on ``device``, or None for plain float32.

    Mixed precision only on CUDA (as nnU-Net: CPU autocast is slow or unsupported): "auto"
    means fp16 there; on CPU/MPS every precision runs in float32.
    """
    import torch

    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}'; expected one of {', '.join(PRECISIONS)}.")
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "bf16":
        if not torch.cuda.is_bf16_supported():
            raise DeviceError("--precision bf16 needs a GPU with bfloat16 support; use fp16 or fp32.")
        return torch.bfloat16
    return torch.float16


def mirror_combinations(axes: Sequence[int] = (0, 1, 2)) -> list[tuple[int, ...]]:
    """Flip sets for test-time augmentation: () first, then every non-empty subset of the
    spatial ``axes`` in ``itertools.combinations`` order (nnU-Net v2's order, which fixes the
    float32 summation order). Three axes give 8 sets."""
    axes = tuple(axes)
    return [()] + [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]


def _forward(net: Any, x: "torch.Tensor", heads: Sequence[Head]) -> Iterator["torch.Tensor"]:
    """Network outputs for each head on one batch, one head at a time; the encoder runs once
    for all heads. Lazy, so that only one head's full output exists at a time (seven UniSeg
    heads would otherwise hold seven [B, 4, *patch] outputs at once)."""
    indices = [h.task_index for h in heads]
    if all(i is None for i in indices):
        out = net(x)
        for _ in heads:
            yield out
        return
    if hasattr(net, "encode") and hasattr(net, "decode"):
        features = net.encode(x)
        for i in indices:
            yield net.decode(features, i)
        return
    for i in indices:
        yield net(x, i)


def _check_output(out: "torch.Tensor", batch: int, patch: tuple[int, ...]) -> None:
    if out.ndim != 5 or out.shape[0] != batch or tuple(out.shape[2:]) != patch:
        raise ValueError(
            f"the network returned {tuple(out.shape)}; expected [{batch}, K, {', '.join(map(str, patch))}]"
        )


def predict_windows(
    net: Any,
    x: "torch.Tensor",
    heads: Sequence[Head],
    *,
    flips: Sequence[tuple[int, ...]] = ((),),
    autocast: "torch.dtype | None" = None,
    activation: str | None = None,
) -> list["torch.Tensor"]:
    """Predict one batch of windows x [B, C, *patch]; returns float32 [B, n_k, *patch] per head.

    Each flip set is applied to the input and undone on the output; the results are summed in
    ``flips`` order and divided by their number (nnU-Net ``_internal_maybe_mirror_and_predict``).
    ``activation="softmax"`` applies a softmax over all output channels to every flipped
    prediction before averaging (nnU-Net v1, which UniSeg uses, averages probabilities), and
    each head then keeps its first n_k channels (yeerwen/UniSeg ``inference/predict.py``).
    """
    import torch

    patch = tuple(x.shape[2:])
    sums: list[torch.Tensor | None] = [None] * len(heads)
    for axes in flips:
        dims = [a + 2 for a in axes]
        inp = torch.flip(x, dims) if dims else x
        ctx = (
            torch.autocast(x.device.type, dtype=autocast)
            if autocast is not None
            else contextlib.nullcontext()
        )
        with ctx:
            for h, (head, out) in enumerate(zip(heads, _forward(net, inp, heads))):
                _check_output(out, x.shape[0], patch)
                _accumulate(sums, h, head, out, dims=dims, activation=activation)
                del out  # before the next head is decoded
    if len(flips) > 1:
        for s in sums:
            s /= len(flips)  # type: ignore[operator]
    return sums  # type: ignore[return-value]


def _accumulate(sums: list[Any], h: int, head: Head, out: "torch.Tensor", *, dims: list[int],
                activation: str | None) -> None:
    """Add one head's (flipped) output, activated and cut to its channels, to ``sums[h]``."""
    import torch

    if head.channels is not None and out.shape[1] < head.channels:
        raise ValueError(f"the network returned {out.shape[1]} channels; task needs {head.channels}")
    out = out.float()
    if activation == "softmax":
        # Over ALL output channels, then keep the task's first n_k: UniSeg's
        # inference_apply_nonlin is softmax_helper over the 4 shared channels, and
        # predict.py crops `softmax[:now_class_number]` after blending.
        out = torch.softmax(out, dim=1)
    elif activation == "sigmoid":
        out = torch.sigmoid(out)
    if head.channels is not None:
        out = out[:, : head.channels]
    if dims:
        out = torch.flip(out, dims)
    if sums[h] is None:
        # a copy: the output may alias the input or another head's output
        sums[h] = out.clone()
    else:
        sums[h] += out


MAX_AUTO_BATCH = 16
GPU_MEMORY_SHARE = 0.6  # of the free memory after one probe window; leaves room for the rest


def batch_size_for(
    net: Any,
    patch_size: Sequence[int],
    in_channels: int,
    heads: Sequence[Head],
    device: "torch.device",
    *,
    precision: str = "auto",
    requested: int | None = None,
) -> int:
    """The one batch-size policy: windows per forward for every family.

    ``requested`` (--batch-size) wins. Otherwise CPU (and MPS): 1 — larger batches do not make
    CPU convolutions faster, only use memory. CUDA: one probe window measures the peak memory a
    window needs (at the run's precision), then as many windows as fit in GPU_MEMORY_SHARE of
    the free memory, at most MAX_AUTO_BATCH. The probe is measured once per (network, patch,
    heads, device, precision) and reused for later cases.
    """
    if requested is not None:
        if int(requested) < 1:
            raise UsageError(f"batch size must be at least 1, got {requested}.")
        return int(requested)
    if device.type != "cuda":
        return 1
    key = (tuple(int(p) for p in patch_size), in_channels, tuple(heads), str(device), precision)
    measured = getattr(net, "_uniseg_batch_sizes", None)
    if isinstance(measured, dict) and key in measured:
        return int(measured[key])
    size = _probe_batch_size(net, patch_size, in_channels, heads, device, precision)
    try:
        if not isinstance(measured, dict):
            measured = {}
            setattr(net, "_uniseg_batch_sizes", measured)
        measured[key] = size
    except AttributeError:  # a network that takes no attributes: measure again next time
        pass
    return size


def _probe_batch_size(net: Any, patch_size: Sequence[int], in_channels: int, heads: Sequence[Head],
                      device: "torch.device", precision: str) -> int:
    import torch

    autocast = autocast_dtype(precision, device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    probe = torch.zeros((1, in_channels, *patch_size), device=device)
    with torch.inference_mode():
        predict_windows(net, probe, heads, autocast=autocast)
    per_window = max(torch.cuda.max_memory_allocated(device) - before, 1)
    del probe
    torch.cuda.empty_cache()
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(MAX_AUTO_BATCH, (free_bytes * GPU_MEMORY_SHARE) // per_window)))


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _to_store(weighted: "torch.Tensor", store: "torch.device", staging: dict) -> "torch.Tensor":
    """Move one batch's weighted outputs to the accumulators' device. From a GPU to the host
    they go through a reused pinned buffer with a non-blocking copy, then the stream is
    synchronised so the buffer is complete before it is added."""
    import torch

    if weighted.device == store:
        return weighted
    if weighted.device.type != "cuda" or store.type != "cpu":
        return weighted.to(store)
    key = tuple(weighted.shape) + (weighted.dtype.itemsize,)
    if key not in staging:
        staging[key] = torch.empty(weighted.shape, dtype=weighted.dtype, pin_memory=True)
    buffer = staging[key]
    buffer.copy_(weighted, non_blocking=True)
    torch.cuda.current_stream(weighted.device).synchronize()
    return buffer


def _padded(volume: "torch.Tensor", patch: tuple[int, ...],
            placement: "Placement | None") -> tuple["torch.Tensor", list[tuple[int, int]]]:
    """The [C, Z, Y, X] volume zero-padded to at least the patch, and the (low, high) pads."""
    import torch

    pads = padding_for_patch(tuple(volume.shape[1:]), patch, placement)
    if any(lo or hi for lo, hi in pads):
        # F.pad lists the last axis first; zeros as nnU-Net (pad_nd_image 'constant', value 0)
        flat = [p for lo_hi in reversed(pads) for p in lo_hi]
        volume = torch.nn.functional.pad(volume, flat, mode="constant", value=0.0)
    return volume, pads


def _window_weights(gaussian: "bool | torch.Tensor", patch: tuple[int, ...], dtype: "torch.dtype",
                    device: "torch.device") -> "torch.Tensor":
    """The [*patch] weights of every window: a given map, the Gaussian, or ones."""
    import torch

    if isinstance(gaussian, torch.Tensor):
        return gaussian.to(device=device, dtype=dtype)
    if gaussian:
        return gaussian_importance(patch, dtype=dtype, device=device)
    return torch.ones(patch, dtype=dtype, device=device)


def sliding_window(
    volume: "torch.Tensor",
    net: Any,
    patch_size: Sequence[int],
    *,
    heads: Sequence[Head] | None = None,
    step: float = 0.5,
    batch_size: int | None = 1,
    tta: bool = False,
    mirror_axes: Sequence[int] = (0, 1, 2),
    precision: str = "auto",
    accumulation: str = "fp32",
    activation: str | None = None,
    progress: Progress | None = None,
    gaussian: "bool | torch.Tensor" = True,
    accumulator_device: "str | torch.device | None" = None,
    placement: "Placement | None" = None,
) -> list["torch.Tensor"]:
    """Predict a whole volume by blending overlapping, Gaussian-weighted windows.

    volume: float tensor [C, Z, Y, X], already normalised; the network runs on its device.
    net: a callable [B, C, *patch] -> [B, K, *patch] (``heads`` None or task_index None), or
    a UniSeg-like module with ``encode``/``decode(features, task_index)`` (or
    ``net(x, task_index)``); every window has exactly ``patch_size`` (z, y, x).
    heads: what to return; default one head with all channels of a plain predictor.
    step: window overlap as a fraction of the patch (0.5 = nnU-Net). batch_size: windows per
    forward (None: ``batch_size_for``'s policy). tta: average all flips of ``mirror_axes``
    (8 for 3 axes). precision: autocast on CUDA only (see ``autocast_dtype``). accumulation:
    "fp32", or "fp16" to match nnU-Net v2 bit for bit. activation: None (blend logits, nnU-Net
    v2), "softmax" (blend probabilities, nnU-Net v1) or "sigmoid" (independent per-channel
    probabilities, for multi-label models such as Hermes and SAT). gaussian: False weights
    every voxel of a window equally (a plain mean of the overlapping windows); a [*patch]
    tensor is used as the weights as given (SAT's float16 map). placement: where windows go
    and how short axes are padded (``inference.tiling.Placement``; default nnU-Net's).
    accumulator_device: where the blended outputs and the weight sum live (None: the volume's
    device; "cpu" holds them in host memory, as MONAI's ``device`` beside ``sw_device``, so a
    large output fits when the GPU's memory does not). progress(done, total) is called after
    every batch with window counts.

    Returns one float32 [n_k, Z, Y, X] tensor per head, on the accumulator device.
    """
    import torch

    if volume.ndim != 4:
        raise ValueError(f"expected a [C, Z, Y, X] volume, got shape {tuple(volume.shape)}")
    if accumulation not in ACCUMULATIONS:
        raise ValueError(f"accumulation must be one of {ACCUMULATIONS}, got {accumulation!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    patch = tuple(int(p) for p in patch_size)
    heads = list(heads) if heads is not None else [Head(None, None)]
    device = volume.device
    store = torch.device(accumulator_device) if accumulator_device is not None else device
    batch_size = batch_size_for(net, patch, volume.shape[0], heads, device, precision=precision,
                                requested=batch_size)
    autocast = autocast_dtype(precision, device)
    acc_dtype = torch.float16 if accumulation == "fp16" else torch.float32
    flips = mirror_combinations(mirror_axes) if tta else [()]

    with torch.inference_mode():
        size = tuple(volume.shape[1:])
        volume, pads = _padded(volume, patch, placement)
        padded = tuple(volume.shape[1:])
        windows = window_slices(padded, patch, step, placement)
        gauss = _window_weights(gaussian, patch, acc_dtype, device)
        gauss_store = gauss if store == device else gauss.to(store)
        weights = torch.zeros(padded, dtype=acc_dtype, device=store)
        accs: list[torch.Tensor | None] = [None] * len(heads)
        staging: dict[tuple[int, ...], torch.Tensor] = {}  # pinned host buffers, reused per batch
        done = 0
        for batch in _batches(windows, batch_size):
            x = torch.stack([volume[(slice(None),) + sl] for sl in batch])
            preds = predict_windows(net, x, heads, flips=flips, autocast=autocast, activation=activation)
            for h, pred in enumerate(preds):
                if accs[h] is None:
                    accs[h] = torch.zeros((pred.shape[1], *padded), dtype=acc_dtype, device=store)
                weighted = _to_store(pred * gauss, store, staging)
                for j, sl in enumerate(batch):
                    accs[h][(slice(None),) + sl] += weighted[j]  # type: ignore[index]
                del weighted
            for sl in batch:
                weights[sl] += gauss_store
            done += len(batch)
            if progress is not None:
                progress(done, len(windows))
        crop = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, size))
        results = []
        for acc in accs:
            assert acc is not None
            torch.div(acc, weights, out=acc)
            results.append(acc[(slice(None),) + crop].float().contiguous())
    return results
