"""UniSeg: a prompt-driven nnU-Net v1 generic U-Net, written for inference.

An independent implementation of ``UniSeg_model`` (yeerwen/UniSeg, commit e3ae40de,
``Upstream/nnunet/network_architecture/Prompt_generic_UNet.py`` on nnU-Net v1's
``generic_UNet.py``). Module attribute names follow upstream exactly, so the official
``state_dict`` loads with ``strict=True`` and no renaming:

    intermedia_prompt           [1, T, *patch // (16, 32, 32)] learned task prompts
    fusion_layer.blocks.{0,1,2} (C+T) -> (C+T)//4 -> (C+T)//4 -> T, on the bottleneck
    conv_blocks_context.{d}     encoder stage d (stage 0 has conv_1/conv_2/conv_4 variants);
                                the last entry is the bottleneck, two stacks .0 and .1
    tu.{u}                      transposed convs (no bias), coarsest first
    conv_blocks_localization.{u}.{0,1}  decoder stacks after the skip concatenation
    seg_outputs.{u}             1x1x1 heads (no bias); only the last (full resolution) is used

The encoder, the fusion module and therefore all T task prompts do not depend on the task:
``encode`` runs them once, ``decode`` picks one task's prompt and runs the decoder, so several
tasks on the same window share one encoder pass.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from unisegcli.errors import ChannelError, ImageShapeError, UnknownTaskError
from unisegcli.models.uniseg.config import Triple, UniSegConfig


class InputChannelsError(ImageShapeError, ChannelError, ValueError):
    """The window has a channel count the network has no first conv for (UniSeg: 1, 2, 4)."""


class PatchSizeError(ImageShapeError, ValueError):
    """The window is not [B, C, *patch_size]: UniSeg's prompt has a fixed spatial size."""


def _norm_act(y: Tensor, norm: nn.InstanceNorm3d, nonlin: nn.LeakyReLU) -> Tensor:
    """InstanceNorm3d (affine) then LeakyReLU on a conv's fresh output ``y``.

    Without autograd and in float32 this is computed in place: a two-pass ``var_mean`` over
    (z, y, x), one scale/shift, ``leaky_relu_``. That saves two activation-sized temporaries
    per block and runs fast on channels_last_3d tensors, where ``F.instance_norm`` is 3-5x
    slower. Equal to the module path up to float32 rounding (tested). Other dtypes (autocast
    on a GPU) and training use the modules, which compute the statistics in float32.
    """
    if torch.is_grad_enabled() or y.dtype != torch.float32:
        return nonlin(norm(y))
    var, mean = torch.var_mean(y, dim=(2, 3, 4), keepdim=True, correction=0)
    scale = norm.weight.view(1, -1, 1, 1, 1) * torch.rsqrt(var + norm.eps)
    y.mul_(scale).add_(norm.bias.view(1, -1, 1, 1, 1) - mean * scale)
    return torch.nn.functional.leaky_relu_(y, nonlin.negative_slope)


def _padding(kernel: Triple) -> Triple:
    # nnU-Net v1: pad 1 where the kernel is 3, else 0 (config only allows 1 and 3)
    return tuple(1 if k == 3 else 0 for k in kernel)  # type: ignore[return-value]


class ConvNormAct(nn.Module):
    """Conv3d(bias) -> InstanceNorm3d(affine, eps 1e-5) -> LeakyReLU(0.01).

    Upstream ``ConvDropoutNormNonlin`` with dropout p = 0 (no dropout module is created).
    [B, C_in, Z, Y, X] -> [B, C_out, Z', Y', X'].
    """

    def __init__(self, c_in: int, c_out: int, kernel: Triple, stride: Triple = (1, 1, 1)) -> None:
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=_padding(kernel), bias=True)
        self.instnorm = nn.InstanceNorm3d(c_out, eps=1e-5, affine=True)
        # in place on the norm's fresh output only, never on a caller's tensor
        self.nonlin = nn.LeakyReLU(negative_slope=1e-2, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return _norm_act(self.conv(x), self.instnorm, self.nonlin)


class MultiInputConvNormAct(nn.Module):
    """First encoder block: one conv per input-channel option, one shared norm.

    Upstream ``ConvDropoutNormNonlin_multi_channel``: the conv is picked by the number of
    input channels (``conv_1``, ``conv_2``, ``conv_4``), not by the task.
    """

    def __init__(self, channel_options: Sequence[int], c_out: int, kernel: Triple) -> None:
        super().__init__()
        self.channel_options = tuple(channel_options)
        for c in self.channel_options:
            self.add_module(f"conv_{c}", nn.Conv3d(c, c_out, kernel, padding=_padding(kernel), bias=True))
        self.instnorm = nn.InstanceNorm3d(c_out, eps=1e-5, affine=True)
        self.nonlin = nn.LeakyReLU(negative_slope=1e-2, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        conv = getattr(self, f"conv_{x.shape[1]}")  # the caller checked the channel count
        return _norm_act(conv(x), self.instnorm, self.nonlin)


class ConvStack(nn.Module):
    """``blocks``: a first block, then ConvNormAct repeats (upstream ``StackedConvLayers``)."""

    def __init__(self, first: nn.Module, c_out: int, num_convs: int, kernel: Triple) -> None:
        super().__init__()
        # upstream always builds the first block, even when asked for 0 convs
        rest = [ConvNormAct(c_out, c_out, kernel) for _ in range(num_convs - 1)]
        self.blocks = nn.Sequential(first, *rest)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


def _stack(c_in: int, c_out: int, num_convs: int, kernel: Triple, stride: Triple = (1, 1, 1)) -> ConvStack:
    """num_convs ConvNormAct blocks; only the first one strides (convolutional pooling)."""
    return ConvStack(ConvNormAct(c_in, c_out, kernel, stride), c_out, num_convs, kernel)


class FusionStack(nn.Module):
    """``blocks``: three ConvNormAct, (C+T) -> (C+T)//4 -> (C+T)//4 -> T.

    Upstream ``StackedFusionConvLayers``; its kernel is the bottleneck's conv kernel.
    [B, C+T, *bottleneck] -> [B, T, *bottleneck] task-specific prompts.
    """

    def __init__(self, c_in: int, c_mid: int, c_out: int, kernel: Triple) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            ConvNormAct(c_in, c_mid, kernel),
            ConvNormAct(c_mid, c_mid, kernel),
            ConvNormAct(c_mid, c_out, kernel),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


@dataclass(frozen=True)
class UniSegFeatures:
    """Task-independent encoder output, input of ``UniSegNet.decode``.

    skips: encoder stage outputs, full resolution first, each [B, F_d, *stage shape].
    bottleneck: [B, C, *bottleneck shape]. task_prompts: [B, T, *bottleneck shape], the fusion
    module's output for every task. ``decode`` never modifies them.
    """

    skips: tuple[Tensor, ...]
    bottleneck: Tensor
    task_prompts: Tensor


class UniSegNet(nn.Module):
    """The UniSeg network; ``forward(x, task_index)`` -> full-resolution logits.

    x: float32 [B, C, Z, Y, X] with C in ``config.input_channel_options`` and (Z, Y, X) equal
    to ``config.patch_size``. Returns [B, num_classes, Z, Y, X] logits (no softmax). Task k
    uses the first n_k output channels; the caller slices them (see the task cards).
    """

    def __init__(self, config: UniSegConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        feats = cfg.stage_features
        pools, convs, n_conv = cfg.pool_op_kernel_sizes, cfg.conv_kernel_sizes, cfg.conv_per_stage
        n_pool = cfg.num_pool
        # Attribute order follows upstream so state_dict() lists keys in the same order.
        self.intermedia_prompt = nn.Parameter(torch.randn(1, cfg.num_tasks, *cfg.prompt_shape))
        c_fuse, c_mid, _, _ = cfg.fusion_channels
        self.fusion_layer = FusionStack(c_fuse, c_mid, cfg.num_tasks, convs[n_pool])

        context: list[nn.Module] = []
        for d in range(n_pool):
            if d == 0:
                first = MultiInputConvNormAct(cfg.input_channel_options, feats[0], convs[0])
                context.append(ConvStack(first, feats[0], n_conv, convs[0]))
            else:
                context.append(_stack(feats[d - 1], feats[d], n_conv, convs[d], pools[d - 1]))
        bottleneck = feats[n_pool]
        context.append(
            nn.Sequential(
                _stack(feats[n_pool - 1], bottleneck, n_conv - 1, convs[n_pool], pools[-1]),
                _stack(bottleneck, bottleneck, 1, convs[n_pool]),
            )
        )

        localization: list[nn.Module] = []
        transposed: list[nn.Module] = []
        heads: list[nn.Module] = []
        c_down = bottleneck + 1  # the bottleneck plus the chosen task's prompt channel
        for u in range(n_pool):
            c_skip = feats[n_pool - 1 - u]
            pool = pools[-(u + 1)]
            transposed.append(nn.ConvTranspose3d(c_down, c_skip, pool, stride=pool, bias=False))
            # Upstream indexes conv kernels from the end (-(u+1)), so the full-resolution
            # decoder stage gets conv_kernel_sizes[1] (3x3x3), not the encoder's [0] (1x3x3).
            kernel = convs[-(u + 1)]
            localization.append(
                nn.Sequential(
                    _stack(2 * c_skip, c_skip, n_conv - 1, kernel),
                    _stack(c_skip, c_skip, 1, kernel),
                )
            )
            heads.append(nn.Conv3d(c_skip, cfg.num_classes, 1, bias=False))
            c_down = c_skip
        self.conv_blocks_localization = nn.ModuleList(localization)
        self.conv_blocks_context = nn.ModuleList(context)
        self.tu = nn.ModuleList(transposed)
        # Deep-supervision heads 0..n-2 are kept only so the trained state dict loads.
        self.seg_outputs = nn.ModuleList(heads)

    # -- inference -----------------------------------------------------------------------

    channels_last = False

    def use_channels_last(self, enabled: bool = True) -> "UniSegNet":
        """Keep weights and windows in channels_last_3d (NDHWC) memory format.

        On a CPU this lets oneDNN skip its layout reorders: the full-size network ran 1.12x
        faster on one 64x192x192 window (benchmarks/RESULTS.md); the tiny and small
        configurations got slower, so the family enables it only for full-size networks.
        """
        self.channels_last = enabled
        return self.to(memory_format=torch.channels_last_3d if enabled else torch.contiguous_format)

    def check_input(self, x: Tensor) -> None:
        """Raise a domain error unless x is [B, C, *patch_size] with an allowed C."""
        cfg = self.config
        if x.ndim != 5:
            raise ImageShapeError(
                f"UniSeg expects a 5-D window [batch, channels, z, y, x], got shape {tuple(x.shape)}"
            )
        if x.shape[1] not in cfg.input_channel_options:
            options = ", ".join(str(c) for c in cfg.input_channel_options)
            hint = " (1: CT or MR, 2: CT + PET, 4: BraTS MR)" if options == "1, 2, 4" else ""
            raise InputChannelsError(
                f"input has {x.shape[1]} channels; UniSeg accepts {options} channels{hint}; "
                "give the channels the task lists"
            )
        if tuple(x.shape[2:]) != cfg.patch_size:
            got = "x".join(str(s) for s in x.shape[2:])
            want = "x".join(str(s) for s in cfg.patch_size)
            raise PatchSizeError(
                f"window is {got} (z, y, x) but this UniSeg network only accepts its patch size "
                f"{want}: the task prompt has a fixed spatial size; tile the volume into windows "
                "of exactly the patch size (pad smaller volumes)"
            )

    def resolve_task_index(self, task_index: Any) -> int:
        """Normalise an int, numpy or LongTensor task index (element 0, as upstream) to int."""
        if isinstance(task_index, (Tensor, np.ndarray)):
            flat = task_index.reshape(-1)
            if len(flat) == 0:
                raise UnknownTaskError("task index tensor is empty; expected one task index")
            task_index = flat[0].item()
        try:
            if isinstance(task_index, bool):
                raise TypeError
            index = operator.index(task_index)
        except TypeError:
            raise UnknownTaskError(f"task index must be an integer, got {task_index!r}") from None
        if not 0 <= index < self.config.num_tasks:
            raise UnknownTaskError(
                f"task index {index} is out of range; this UniSeg network has tasks "
                f"0..{self.config.num_tasks - 1}. Run `uniseg tasks` to list them."
            )
        return index

    def encode(self, x: Tensor) -> UniSegFeatures:
        """Run the task-independent part: encoder, bottleneck and the fusion of all prompts.

        x: float32 [B, C, *patch_size]. Returns the features ``decode`` needs.
        """
        self.check_input(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        skips = []
        for stage in self.conv_blocks_context[:-1]:
            x = stage(x)
            skips.append(x)
        bottleneck = self.conv_blocks_context[-1](x)
        prompt = self.intermedia_prompt.expand(bottleneck.shape[0], -1, -1, -1, -1)
        task_prompts = self.fusion_layer(torch.cat([bottleneck, prompt], dim=1))
        return UniSegFeatures(tuple(skips), bottleneck, task_prompts)

    def decode(self, features: UniSegFeatures, task_index: int | Tensor) -> Tensor:
        """Decode one task: [B, num_classes, *patch_size] full-resolution logits.

        task_index: int, or a LongTensor whose element 0 is used for the whole batch
        (upstream's convention). Can be called again on the same features for another task.
        """
        k = self.resolve_task_index(task_index)
        prompts = features.task_prompts
        x = torch.cat([features.bottleneck, prompts[:, k : k + 1]], dim=1)
        for u, (up, stage) in enumerate(zip(self.tu, self.conv_blocks_localization)):
            x = torch.cat([up(x), features.skips[-(u + 1)]], dim=1)
            x = stage(x)
        return self.seg_outputs[-1](x)

    def forward(self, x: Tensor, task_index: int | Tensor) -> Tensor:
        """``decode(encode(x), task_index)``: [B, C, *patch] -> [B, num_classes, *patch]."""
        return self.decode(self.encode(x), task_index)
