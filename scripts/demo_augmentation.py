"""Patch sampling with data augmentation for ``scripts/train_demo.py`` (the demo model).

The demo model is trained on one scan, so every variation it must survive at inference has to
be made from that scan: other fields of view (patches reaching past the scan's border, where
the sliding window pads with zeros = air after ``ct_clip_scale``), other patient sizes and
voxel spacings (scaling), other positioning (small rotations) and other scanners/protocols
(intensity). Augmentation works on the preprocessed volume — the network grid, normalised to
[0, 1] — because that is what inference feeds the network; a rescaled or cropped input reaches
the network as exactly such a resampled or cut volume.

Ranges and probabilities follow nnU-Net v2's defaults
(MIC-DKFZ/nnUNet ``nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py``,
``get_training_transforms`` and ``configure_rotation_dummyDA_mirroring_and_inital_patch_size``):
scaling 0.7-1.4, Gaussian noise, Gaussian blur sigma 0.5-1, multiplicative brightness
0.75-1.25, contrast 0.75-1.25, simulated low resolution 0.5-1, gamma 0.7-1.5 (also inverted).
Deviations, and why:

* Spatial probabilities are higher (0.5 scaling, 0.3 rotation instead of 0.2/0.2): with one
  scan, an unaugmented patch is always a patch the model has already seen.
* Rotation is in-plane only (about z), as nnU-Net's "dummy 2D" augmentation for patches whose
  z extent is over 3x smaller than in-plane (16 vs 64 here), but within +-15 degrees instead
  of +-180: there is no mirroring either, because on one scan the left/right position is
  what tells liver from spleen.
* Noise standard deviation up to 0.05 (the data are in [0, 1], 650 HU wide, not z-scored),
  and an additive brightness shift of +-0.06 (about +-40 HU: calibration differs between
  scanners) that nnU-Net does not have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentationRanges:
    """Probabilities and ranges of each augmentation (see the module docstring for sources)."""

    p_scale: float = 0.5
    scale: tuple[float, float] = (0.7, 1.4)
    p_rotate: float = 0.3
    rotate_deg: float = 15.0
    p_noise: float = 0.15
    noise_std: tuple[float, float] = (0.0, 0.05)
    p_blur: float = 0.2
    blur_sigma_vox: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_shift: float = 0.3
    shift: float = 0.06
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_low_res: float = 0.25
    low_res: tuple[float, float] = (0.5, 1.0)
    p_gamma: float = 0.3
    p_gamma_inverted: float = 0.1
    gamma: tuple[float, float] = (0.7, 1.5)
    border_fraction: float = 0.5  # uniform patch centres may lie this far (x patch) past the border


NO_AUGMENTATION = AugmentationRanges(
    p_scale=0.0, p_rotate=0.0, p_noise=0.0, p_blur=0.0, p_brightness=0.0, p_shift=0.0,
    p_contrast=0.0, p_low_res=0.0, p_gamma=0.0, p_gamma_inverted=0.0, border_fraction=0.0,
)


def sample_grid(centre_zyx: Sequence[float], patch: Sequence[int], volume_shape: Sequence[int],
                scale: float, angle_rad: float) -> torch.Tensor:
    """The ``grid_sample`` grid [1, *patch, 3] of a patch centred at ``centre_zyx`` (voxels).

    A patch voxel at offset p (z, y, x voxels from the patch centre) reads the volume at
    centre + R(angle) * scale * p, R rotating (y, x) about z. scale > 1 shows more anatomy in
    the patch (organs look smaller), < 1 less (organs look larger).
    """
    axes = [torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in patch]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    cos, sin = math.cos(angle_rad), math.sin(angle_rad)
    source = (
        centre_zyx[0] + scale * z,
        centre_zyx[1] + scale * (cos * y - sin * x),
        centre_zyx[2] + scale * (sin * y + cos * x),
    )
    # align_corners=True: -1 and 1 are the centres of the first and last voxel
    normalised = [2 * s / max(n - 1, 1) - 1 for s, n in zip(source, volume_shape)]
    return torch.stack(normalised[::-1], dim=-1)[None].to(torch.float32)  # grid lists x, y, z


def _blur(x: torch.Tensor, sigma_vox: float) -> torch.Tensor:
    """Separable Gaussian blur of [1, Z, Y, X] in-plane (y, x), edges replicated."""
    radius = max(1, int(math.ceil(3 * sigma_vox)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma_vox) ** 2)
    kernel = kernel / kernel.sum()
    out = x[None]  # [1, 1, Z, Y, X]
    for dim in (3, 4):
        shape = [1, 1, 1, 1, 1]
        shape[dim] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (4 - dim)], pad[2 * (4 - dim) + 1] = radius, radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out[0]


def intensity(x: torch.Tensor, rng: np.random.Generator, ranges: AugmentationRanges) -> torch.Tensor:
    """nnU-Net-style intensity augmentation of one normalised [1, *patch] patch (same order)."""
    if rng.random() < ranges.p_noise:
        std = float(rng.uniform(*ranges.noise_std))
        x = x + torch.from_numpy(rng.normal(0.0, std, size=x.shape).astype(np.float32))
    if rng.random() < ranges.p_blur:
        x = _blur(x, float(rng.uniform(*ranges.blur_sigma_vox)))
    if rng.random() < ranges.p_brightness:
        x = x * float(rng.uniform(*ranges.brightness))
    if rng.random() < ranges.p_shift:
        x = x + float(rng.uniform(-ranges.shift, ranges.shift))
    if rng.random() < ranges.p_contrast:
        lo, hi, mean = float(x.min()), float(x.max()), x.mean()
        x = ((x - mean) * float(rng.uniform(*ranges.contrast)) + mean).clamp(lo, hi)
    if rng.random() < ranges.p_low_res:
        size = x.shape[1:]
        factor = float(rng.uniform(*ranges.low_res))
        small = [max(1, round(n * factor)) for n in size]
        x = F.interpolate(F.interpolate(x[None], size=small, mode="nearest"), size=size, mode="trilinear")[0]
    for p, inverted in ((ranges.p_gamma_inverted, True), (ranges.p_gamma, False)):
        if rng.random() < p:
            x = _gamma(x, float(rng.uniform(*ranges.gamma)), inverted)
    return x


def _gamma(x: torch.Tensor, gamma: float, inverted: bool) -> torch.Tensor:
    """batchgenerators' gamma: on the min-max rescaled patch, mean and std kept."""
    if inverted:
        x = -x
    mean, std = x.mean(), x.std()
    lo, span = x.min(), (x.max() - x.min()).clamp_min(1e-7)
    y = ((x - lo) / span) ** gamma * span + lo
    y = (y - y.mean()) / y.std().clamp_min(1e-7) * std + mean
    return -y if inverted else y


class AugmentingPatchSampler:
    """Random patches [B, 1, *patch] and targets [B, T, *patch], augmented.

    image: float32 [1, Z, Y, X] network-grid volume; targets: uint8 [T, Z, Y, X] one binary
    map per task. With probability ``fg_fraction`` a patch is centred on a random voxel of one
    task's structure (task drawn with ``task_weights``), else anywhere in the volume widened
    by ``border_fraction`` x patch on each side (so patches reach past the border, as the
    sliding window's do on a larger field of view). Outside the volume the image reads 0 (air
    after ``ct_clip_scale``) and targets read background.
    """

    def __init__(self, image: torch.Tensor, targets: torch.Tensor, patch: Sequence[int],
                 rng: np.random.Generator, task_weights: Sequence[float], fg_fraction: float = 0.75,
                 ranges: AugmentationRanges = AugmentationRanges()) -> None:
        self.image, self.targets, self.patch = image, targets.to(torch.float32), tuple(patch)
        self.rng, self.fg_fraction, self.ranges = rng, fg_fraction, ranges
        self.task_p = np.asarray(task_weights, dtype=float) / float(np.sum(task_weights))
        self.foreground = [np.argwhere(t.numpy() > 0) for t in targets]

    def _centre(self) -> list[float]:
        """The patch centre in voxels: a whole-voxel start + (patch - 1) / 2, so that an
        unscaled, unrotated patch reads the volume's voxels exactly (no interpolation)."""
        if self.rng.random() < self.fg_fraction:
            voxels = self.foreground[self.rng.choice(len(self.foreground), p=self.task_p)]
            starts = [int(c) - p // 2 for c, p in zip(voxels[self.rng.integers(len(voxels))], self.patch)]
        else:
            margins = [int(self.ranges.border_fraction * p) for p in self.patch]
            starts = [int(self.rng.integers(-m, n - p + m + 1))
                      for n, p, m in zip(self.image.shape[1:], self.patch, margins)]
        return [s + (p - 1) / 2 for s, p in zip(starts, self.patch)]

    def _one(self) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.ranges
        centre = self._centre()
        scale = 1.0
        if self.rng.random() < r.p_scale:  # log-uniform: zooming in and out equally likely
            scale = float(np.exp(self.rng.uniform(np.log(r.scale[0]), np.log(r.scale[1]))))
        angle = 0.0
        if self.rng.random() < r.p_rotate:
            angle = math.radians(float(self.rng.uniform(-r.rotate_deg, r.rotate_deg)))
        grid = sample_grid(centre, self.patch, self.image.shape[1:], scale, angle)
        x = F.grid_sample(self.image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        # binary maps: linear interpolation, threshold 0.5 (as the training targets are resampled)
        y = F.grid_sample(self.targets[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        return intensity(x, self.rng, r), (y > 0.5).to(torch.uint8)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(self._one() for _ in range(batch_size)))
        return torch.stack(xs), torch.stack(ys).long()
