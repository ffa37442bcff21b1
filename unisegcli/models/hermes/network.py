"""``HermesUNet``: our own implementation of Hermes' ``Hermes_UNet`` (the Hermes-R backbone).

Written from facts read from yhygao/universal-medical-image-segmentation (@
033e16ae, ``model/dim3/hermes_unet.py``, ``hermes_unet_utils.py``, ``hermes_utils.py``,
``conv_layers.py``, ``trans_layers.py``). Module and parameter names follow the upstream
state dict so the released checkpoint loads with ``strict=True``:

* pre-activation residual U-Net: InstanceNorm3d(eps 1e-4, no affine) -> ReLU -> Conv3d (no
  bias) everywhere; a width-changing block's shortcut is a full k^3 conv unit;
* five context-prior fusion layers; each owns a task prior table [tn + 1, d] and a modality
  prior table [mn, 10, d]. Per batch item, the task rows of ``task_indices`` and the 10
  modality tokens of ``modality_index`` are updated by cross-attention to the feature map,
  and the feature map attends to all of them;
* segmentation head: the task tokens of the five layers, concatenated, become one 1x1x1
  kernel per task applied to the last decoder features (no bias, no background channel);
  modality head: the averaged modality tokens -> mn logits.

Call: ``seg_logits, modality_logits = net(x, task_indices, modality_index)`` with x float32
[B, 1, z, y, x], task_indices int64 [B, T], modality_index int64 [B, 1]; returns
[B, T, z, y, x] logits (channel t <-> task_indices[:, t], independent sigmoids) and [B, mn]
logits. Indices use plain PyTorch indexing, so -1 is the last row (the null task token,
modality row 5 "unknown MR sequence"), as upstream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unisegcli.models.hermes.config import DIM_HEAD, FUSION_LAYERS, MODALITY_TOKENS, HermesConfig

INSTANCE_NORM_EPS = 1e-4  # ConvNormAct norm (spec: "InstanceNorm3d ... eps 1e-4")
ATTENTION_NORM_EPS = 1e-5  # nn.LayerNorm default: pre-norms of both cross-attentions, both heads
MLP_NORM_EPS = 1e-4  # PreNorm in front of each attention block's MLP


class ConvUnit(nn.Module):
    """InstanceNorm -> ReLU -> Conv3d (pre-activation); keys ``conv.weight``."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int, int]) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm3d(in_ch, eps=INSTANCE_NORM_EPS, affine=False, track_running_stats=False)
        self.conv = nn.Conv3d(in_ch, out_ch, kernel, padding=tuple(k // 2 for k in kernel), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(self.norm(x)))


class ResBlock(nn.Module):
    """Upstream ``BasicBlock``: two conv units plus a shortcut (identity, or a conv unit when
    the width changes)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int, int]) -> None:
        super().__init__()
        self.conv1 = ConvUnit(in_ch, out_ch, kernel)
        self.conv2 = ConvUnit(out_ch, out_ch, kernel)
        self.shortcut = ConvUnit(in_ch, out_ch, kernel) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x)) + self.shortcut(x)


class InputStage(nn.Module):
    """``inc``: a plain conv (no norm, no bias) then one block of the same width."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, kernel, padding=tuple(k // 2 for k in kernel), bias=False)
        self.conv2 = ResBlock(out_ch, out_ch, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class DownStage(nn.Module):
    """Max-pool then blocks; the pool is element 0 so blocks are keyed ``conv.1``, ``conv.2``."""

    def __init__(self, in_ch: int, out_ch: int, blocks: int, kernel: tuple[int, int, int],
                 scale: tuple[int, int, int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.MaxPool3d(scale)]
        layers += [ResBlock(in_ch if i == 0 else out_ch, out_ch, kernel) for i in range(blocks)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpStage(nn.Module):
    """Resize the deeper map to the skip's exact size (trilinear, align_corners=True),
    concatenate [skip, upsampled], then blocks keyed ``conv.0``, ``conv.1``."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, blocks: int, kernel: tuple[int, int, int]) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            *[ResBlock(in_ch + skip_ch if i == 0 else out_ch, out_ch, kernel) for i in range(blocks)]
        )

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # upstream casts to float32 around the interpolation (it has no half kernel on some GPUs)
        up = F.interpolate(deep.float(), size=skip.shape[2:], mode="trilinear", align_corners=True)
        return self.conv(torch.cat([skip, up.to(skip.dtype)], dim=1))


class CrossAttention(nn.Module):
    """Queries from one token set, keys/values from another; heads of 32 channels.

    Keys: ``norm1`` (query side), ``norm2`` (key/value side), ``fn.to_q``, ``fn.to_kv``
    ([K | V] halves), ``fn.to_out``.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ATTENTION_NORM_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=ATTENTION_NORM_EPS)
        self.fn = _AttentionProjections(dim, heads)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm1(queries), self.norm2(context))


class _AttentionProjections(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        inner = heads * DIM_HEAD
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, _ = queries.shape
        q = self.to_q(queries)
        k, v = self.to_kv(context).chunk(2, dim=-1)

        def split(t: torch.Tensor) -> torch.Tensor:  # [B, N, h*32] -> [B, h, N, 32]; head = c // 32
            return t.reshape(t.shape[0], t.shape[1], self.heads, DIM_HEAD).transpose(1, 2)

        scores = torch.matmul(split(q), split(k).transpose(-1, -2)) * DIM_HEAD ** -0.5
        out = torch.matmul(scores.softmax(dim=-1), split(v))
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * DIM_HEAD))


class Mlp(nn.Module):
    """Linear -> exact (erf) GELU -> Linear; keys ``fc1``, ``fc2``."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden)
        self.fc2 = nn.Linear(hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class PreNormMlp(nn.Module):
    """``norm`` (LayerNorm eps 1e-4) then ``fn`` (Mlp d -> 4d -> d)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=MLP_NORM_EPS)
        self.fn = Mlp(dim, 4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class PriorAttentionBlock(nn.Module):
    """Priors read the features, then the features read the priors (each with an MLP)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.prior_aggregate_block = CrossAttention(dim, heads)
        self.prior_ffn = PreNormMlp(dim)
        self.feat_aggregate_block = CrossAttention(dim, heads)
        self.feat_ffn = PreNormMlp(dim)

    def forward(self, feat: torch.Tensor, priors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        priors = priors + self.prior_aggregate_block(priors, feat)
        priors = priors + self.prior_ffn(priors)
        feat = feat + self.feat_aggregate_block(feat, priors)
        feat = feat + self.feat_ffn(feat)
        return feat, priors


class PriorFusion(nn.Module):
    """One context-prior fusion layer (upstream ``PriorInitFusionLayer``) with its own priors."""

    def __init__(self, dim: int, blocks: int, num_tasks: int, num_modalities: int) -> None:
        super().__init__()
        self.task_prior = nn.Parameter(torch.zeros(num_tasks + 1, dim))
        self.modality_prior = nn.Parameter(torch.zeros(num_modalities, MODALITY_TOKENS, dim))
        self.attn_layers = nn.ModuleList([PriorAttentionBlock(dim, dim // DIM_HEAD) for _ in range(blocks)])

    def forward(self, x: torch.Tensor, task_indices: torch.Tensor, modality_index: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, d, z, y, x]; returns (x updated, priors [B, T + 10, d]: task tokens first)."""
        b, d = x.shape[:2]
        spatial = x.shape[2:]
        tasks = self.task_prior[task_indices]  # [B, T, d]; -1 -> the null row
        modality = self.modality_prior[modality_index[:, 0]]  # [B, 10, d]
        priors = torch.cat([tasks, modality], dim=1)
        feat = x.flatten(2).transpose(1, 2)  # [B, z*y*x, d], C order over (z, y, x)
        for block in self.attn_layers:
            feat, priors = block(feat, priors)
        return feat.transpose(1, 2).reshape(b, d, *spatial), priors


class TaskHead(nn.Module):
    """Upstream ``HierarchyPriorClassifier``: task tokens -> one 1x1x1 kernel per task."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim_in, eps=ATTENTION_NORM_EPS)
        self.classifier_pred = nn.Sequential(Mlp(dim_in, dim_in, dim_out), Mlp(dim_out, dim_out, dim_out))

    def forward(self, features: torch.Tensor, task_tokens: torch.Tensor) -> torch.Tensor:
        kernels = self.classifier_pred(self.norm(task_tokens))  # [B, T, C]
        return torch.einsum("bczyx,btc->btzyx", features, kernels)


class ModalityHead(nn.Module):
    """Averaged (normalised) modality tokens -> modality logits."""

    def __init__(self, dim_in: int, num_modalities: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim_in, eps=ATTENTION_NORM_EPS)
        self.classifier = Mlp(dim_in, dim_in, num_modalities)

    def forward(self, modality_tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(modality_tokens).mean(dim=1))


class HermesUNet(nn.Module):
    """Hermes-R: residual U-Net with five context-prior fusion layers (see module docstring)."""

    def __init__(self, config: HermesConfig) -> None:
        super().__init__()
        self.config = config
        c, k, blocks = config.widths, config.kernel_sizes, config.fusion_blocks
        fuse = {name: PriorFusion(c[level], n, config.num_tasks, config.num_modalities)
                for (name, level), n in zip(FUSION_LAYERS, blocks)}
        # Attribute order = upstream state-dict order (inc, down1, down2, fuse_2, down3, ...).
        self.inc = InputStage(config.in_channels, c[0], k[0])
        self.down1 = DownStage(c[0], c[1], config.down_blocks[0], k[1], config.down_scales[0])
        self.down2 = DownStage(c[1], c[2], config.down_blocks[1], k[2], config.down_scales[1])
        self.prior_init_fuse_2 = fuse["prior_init_fuse_2"]
        self.down3 = DownStage(c[2], c[3], config.down_blocks[2], k[3], config.down_scales[2])
        self.prior_init_fuse_3 = fuse["prior_init_fuse_3"]
        self.down4 = DownStage(c[3], c[4], config.down_blocks[3], k[4], config.down_scales[3])
        self.prior_init_fuse_4 = fuse["prior_init_fuse_4"]
        self.up1 = UpStage(c[4], c[3], c[3], config.up_blocks[0], k[3])
        self.prior_fuse_5 = fuse["prior_fuse_5"]
        self.up2 = UpStage(c[3], c[2], c[2], config.up_blocks[1], k[2])
        self.prior_fuse_6 = fuse["prior_fuse_6"]
        self.up3 = UpStage(c[2], c[1], c[1], config.up_blocks[2], k[1])
        self.up4 = UpStage(c[1], c[0], c[0], config.up_blocks[3], k[0])
        self.out = TaskHead(config.classifier_width, c[0])
        self.mod_out = ModalityHead(config.classifier_width, config.num_modalities)

    def forward(self, x: torch.Tensor, task_indices: torch.Tensor, modality_index: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, 1, z, y, x]; task_indices int64 [B, T]; modality_index int64 [B, 1].

        Returns (seg logits [B, T, z, y, x], modality logits [B, mn]).
        """
        if modality_index.ndim != 2 or modality_index.shape[1] != 1:
            raise ValueError(f"modality_index must be [B, 1], got {tuple(modality_index.shape)}")
        if task_indices.ndim != 2 or task_indices.shape[0] != x.shape[0]:
            raise ValueError(f"task_indices must be [B, T] with B = {x.shape[0]}, got {tuple(task_indices.shape)}")
        t, m = task_indices, modality_index
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3, p2 = self.prior_init_fuse_2(self.down2(x2), t, m)
        x4, p3 = self.prior_init_fuse_3(self.down3(x3), t, m)
        x5, p4 = self.prior_init_fuse_4(self.down4(x4), t, m)
        out, p5 = self.prior_fuse_5(self.up1(x5, x4), t, m)
        out, p6 = self.prior_fuse_6(self.up2(out, x3), t, m)
        out = self.up4(self.up3(out, x2), x1)
        priors = (p2, p3, p4, p5, p6)
        n = t.shape[1]
        task_tokens = torch.cat([p[:, :n] for p in priors], dim=-1)  # [B, T, sum d]
        modality_tokens = torch.cat([p[:, n:] for p in priors], dim=-1)  # [B, 10, sum d]
        return self.out(out, task_tokens), self.mod_out(modality_tokens)
