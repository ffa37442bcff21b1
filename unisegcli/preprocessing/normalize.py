"""Intensity normalisation per channel, as the task card (or an nnU-Net plan) says.

Schemes (the dicts of ``TaskCard.normalization``):

* ``{"scheme": "ct_clip_scale", "clip_hu": [lo, hi]}`` — UniSeg's CT scheme: clip to
  [lo, hi] HU, then ``(x - lo) / (hi - lo)`` into [0, 1] (UniSeg
  ``Upstream/nnunet/preprocessing/DoDNetPreprocessor.py``, scheme "CT", -325..325).
* ``{"scheme": "zscore"}`` — ``(x - mean) / (std + 1e-8)`` over the whole cropped volume
  (same file, the non-CT branch without the non-zero mask; population std).
* ``{"scheme": "ct_clip_zscore", "clip": [p00_5, p99_5], "mean": m, "std": s}`` — nnU-Net
  v2 ``CTNormalization`` (nnunetv2/preprocessing/normalization/default_normalization_schemes.py):
  clip to the training foreground percentiles, subtract the foreground mean, divide by
  ``max(std, 1e-8)``; for nnU-Net v2 model folders (TotalSegmentator and friends).

Tensors are [C, Z, Y, X] float32; channel c uses ``schemes[c]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    import torch

ZSCORE_EPS = 1e-8  # v1 adds it to std; v2 uses max(std, eps): same for any real std


def normalize_channel(
    x: "torch.Tensor", scheme: Mapping[str, Any]
) -> tuple["torch.Tensor", dict[str, float]]:
    """Normalise one [Z, Y, X] channel; returns the new tensor and the statistics it used."""
    import torch

    name = scheme.get("scheme")
    if name == "ct_clip_scale":
        lo, hi = (float(v) for v in scheme["clip_hu"])
        if not hi > lo:
            raise ValueError(f"ct_clip_scale needs clip_hu [lo, hi] with lo < hi, got {scheme['clip_hu']}")
        return (x.clamp(lo, hi) - lo) / (hi - lo), {"clip_lo": lo, "clip_hi": hi}
    if name == "zscore":
        # statistics in float64: a 500-slice CT has 1e8 voxels, too many for a float32 sum
        x64 = x.to(torch.float64)
        mean = float(x64.mean())
        std = float(x64.std(correction=0))
        return ((x64 - mean) / (std + ZSCORE_EPS)).to(x.dtype), {"mean": mean, "std": std}
    if name == "ct_clip_zscore":
        lo, hi = (float(v) for v in scheme["clip"])
        mean, std = float(scheme["mean"]), float(scheme["std"])
        # same float32 operations, in the same order, as CTNormalization.run
        y = x.clamp(lo, hi)
        y = y - mean
        return y / max(std, ZSCORE_EPS), {"clip_lo": lo, "clip_hi": hi, "mean": mean, "std": std}
    raise ValueError(
        f"unknown normalisation scheme {name!r}; expected ct_clip_scale, zscore or ct_clip_zscore"
    )


def normalize(
    image: "torch.Tensor", schemes: Sequence[Mapping[str, Any]]
) -> tuple["torch.Tensor", list[dict[str, float]]]:
    """Normalise a [C, Z, Y, X] tensor channel by channel; returns it and per-channel statistics."""
    import torch

    if image.shape[0] != len(schemes):
        raise ValueError(f"{image.shape[0]} channels but {len(schemes)} normalisation schemes")
    channels, stats = [], []
    for c, scheme in enumerate(schemes):
        y, s = normalize_channel(image[c], scheme)
        channels.append(y)
        stats.append(s)
    return torch.stack(channels), stats
