"""SAT's segmentation network: U-Net, memory tokens, text-query decoder, mask head.

Our implementation of upstream ``Maskformer`` (github.com/zhaoziheng/SAT ``model/maskformer.py``
and ``model/transformer_decoder.py``):

1. the U-Net gives the encoder stage outputs and a full-resolution per-pixel embedding
   (features[0] channels);
2. memory tokens: encoder stages 0-4 average-pooled to the /32 grid (kernel = stride
   32/16/8/4/2), stage 5 as is, concatenated on channels, channels-last through
   ``Linear - GELU - Linear - GELU``, flattened in (h, w, d) order (d fastest) -> [T, B, d];
3. a fixed 3-D sinusoidal positional encoding (``positional_encoding_3d``) added to the keys
   only;
4. six pre-norm cross-attention layers (no self-attention: queries never see each other) and
   a final LayerNorm; the queries are the text embeddings, broadcast over the batch;
5. mask head ``Linear - GELU - Linear - GELU`` to features[0] channels, and
   ``logits[b, n] = sum_c perpixel[b, c] * maskemb[n, b, c]``.

Layout: image [B, C, H, W, D] with (H, W, D) = (x, y, z) of a RAS volume at 1 x 1 x 3 mm and
exactly ``config.window``; logits [B, N, H, W, D].
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from unisegcli.models.sat.config import SatConfig
from unisegcli.models.sat.unet import UNetBackbone


def positional_encoding_3d(grid: Sequence[int], channels: int) -> Tensor:
    """[h, w, d, channels] float32 sinusoidal encoding of a 3-D token grid.

    As the ``positional_encodings`` package (6.0.1, ``PositionalEncoding3D``) that SAT uses:
    each axis gets c = 2 * ceil(channels / 6) channels with frequencies
    ``10000 ** (-2k / c)``, interleaved ``[sin(p f0), cos(p f0), sin(p f1), ...]``; a token
    (h, w, d) is ``concat(e(h), e(w), e(d))`` cut to ``channels``.
    """
    per_axis = int(math.ceil(channels / 6) * 2)
    if per_axis % 2:
        per_axis += 1
    inv_freq = 1.0 / (10000 ** (torch.arange(0, per_axis, 2).float() / per_axis))
    parts = []
    for size in grid:
        angles = torch.outer(torch.arange(size, dtype=torch.float32), inv_freq)
        parts.append(torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2))  # [size, c]
    h, w, d = (int(s) for s in grid)
    enc = torch.zeros(h, w, d, 3 * per_axis)
    enc[..., :per_axis] = parts[0][:, None, None, :]
    enc[..., per_axis : 2 * per_axis] = parts[1][None, :, None, :]
    enc[..., 2 * per_axis :] = parts[2][None, None, :, :]
    return enc[..., :channels]


class QueryLayer(nn.Module):
    """Pre-norm cross-attention + feed-forward; ``norm1`` is stored upstream but never used."""

    def __init__(self, dim: int, heads: int, ff_dim: int) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, heads)
        self.linear1 = nn.Linear(dim, ff_dim)
        self.linear2 = nn.Linear(ff_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, queries: Tensor, memory: Tensor, pos: Tensor) -> Tensor:
        """queries [N, B, d]; memory [T, B, d]; pos [T, 1, d] (keys only)."""
        attended = self.multihead_attn(self.norm2(queries), memory + pos, memory, need_weights=False)[0]
        queries = queries + attended
        return queries + self.linear2(torch.relu(self.linear1(self.norm3(queries))))


class QueryDecoder(nn.Module):
    def __init__(self, dim: int, heads: int, ff_dim: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(QueryLayer(dim, heads, ff_dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, queries: Tensor, memory: Tensor, pos: Tensor) -> Tensor:
        for layer in self.layers:
            queries = layer(queries, memory, pos)
        return self.norm(queries)


class SatSegmenter(nn.Module):
    """The SAT segmentation network (state-dict keys as the released checkpoints, no ``module.``)."""

    def __init__(self, config: SatConfig) -> None:
        super().__init__()
        self.config = config
        f = config.features
        self.backbone = UNetBackbone(config.in_channels, f, config.n_conv)
        self.projection_layer = nn.Sequential(
            nn.Linear(sum(f), config.proj_hidden), nn.GELU(),
            nn.Linear(config.proj_hidden, config.query_dim), nn.GELU(),
        )
        self.transformer_decoder = QueryDecoder(config.query_dim, config.heads, config.ff_dim, config.decoder_layers)
        self.mask_embed_proj = nn.Sequential(
            nn.Linear(config.query_dim, config.mask_mid), nn.GELU(),
            nn.Linear(config.mask_mid, f[0]), nn.GELU(),
        )
        grid = config.memory_grid
        pos = positional_encoding_3d(grid, config.query_dim).reshape(-1, 1, config.query_dim)
        # [T, 1, d] for the configured window; not in the state dict (upstream computes it in
        # __init__ too). Other windows get theirs computed on the fly (see ``_positions``).
        self.register_buffer("pos_embedding", pos, persistent=False)

    def memory_tokens(self, skips: Sequence[Tensor]) -> Tensor:
        """[T, B, d] tokens from the encoder stages (T = product of ``memory_grid``)."""
        last = len(skips) - 1
        pooled = [
            nn.functional.avg_pool3d(s, kernel_size=2 ** (last - i), stride=2 ** (last - i)) if i < last else s
            for i, s in enumerate(skips)
        ]
        tokens = torch.cat(pooled, dim=1).permute(0, 2, 3, 4, 1)  # [B, h, w, d, C]
        tokens = self.projection_layer(tokens)
        return tokens.flatten(1, 3).transpose(0, 1)  # [(h w d), B, d], d fastest

    def _positions(self, window: Sequence[int], like: Tensor) -> Tensor:
        """[T, 1, d] positional encoding of the memory grid of ``window`` (H, W, D)."""
        if tuple(window) == tuple(self.config.window):
            return self.pos_embedding.to(like.dtype)
        grid = [w // 32 for w in window]
        return positional_encoding_3d(grid, self.config.query_dim).reshape(-1, 1, self.config.query_dim).to(like)

    def forward(self, queries: "Tensor | Sequence[Tensor]", image: Tensor) -> Tensor:
        """Logits [B, N, H, W, D] for text queries ([N, d], or a list of [N_k, d] groups run
        one after another) and an image window [B, C, H, W, D] (C = 1 is repeated to 3).

        The released models were trained on ``config.window`` (288 x 288 x 96); any window
        whose sides are multiples of 32 runs, with the positional encoding of its own grid."""
        if image.ndim != 5 or any(s % 32 for s in image.shape[2:]):
            raise ValueError(
                f"SAT expects windows [B, C, H, W, D] with sides divisible by 32 (released: "
                f"{', '.join(map(str, self.config.window))}), got {tuple(image.shape)}"
            )
        if image.shape[1] == 1 and self.config.in_channels != 1:
            image = image.expand(-1, self.config.in_channels, -1, -1, -1)
        skips, perpixel = self.backbone(image)
        memory = self.memory_tokens(skips)
        pos = self._positions(image.shape[2:], memory)
        groups = [queries] if isinstance(queries, Tensor) else list(queries)
        batch = image.shape[0]
        outputs = []
        for group in groups:
            q = group.to(memory.dtype)[:, None, :].expand(-1, batch, -1)
            decoded = self.transformer_decoder(q, memory, pos)
            embed = self.mask_embed_proj(decoded)  # [N, B, f0]
            outputs.append(torch.einsum("bchwd,nbc->bnhwd", perpixel, embed.to(perpixel.dtype)))
        return torch.cat(outputs, dim=1)
