"""SAT's text path: tokenisation, an MPNet text tower, mean pooling, projection, modality.

SAT (github.com/zhaoziheng/SAT ``model/text_encoder.py``, ``knowledge_encoder.py``,
``text_tower.py``, ``tokenizer.py``) encodes a prompt as:

* ids = ``[CLS] + wordpiece(lowercased text) + [SEP]`` with the literal BERT tokens (ordinary
  entries of BioLORD's MPNet vocabulary, not ``<s>``/``</s>``), right-padded with id 0 to the
  longest prompt of the group, at most 256 tokens, ``attention_mask = ids > 0``;
* the last hidden state of an MPNet (BioLORD-2023-C weights fine-tuned by SAT), averaged over
  the attention mask (denominator clamped at 1e-9);
* ``q = Linear(GELU(Linear(pooled))) + modality_embed[code]`` (ct 0, mri 1, us 2, pet 3).

The MPNet encoder is our own torch module with Hugging Face's parameter names (so the
``text_tower.biolord.*`` keys load strictly); it follows transformers ``modeling_mpnet.py``:
position ids from the non-pad tokens (``padding_idx`` 1, positions 2, 3, ...), post-norm layers
with a shared T5-style relative-position bias (32 buckets, max distance 128), exact GELU.
Importing ``transformers.MPNetModel`` pulls torchvision through its image utilities in recent
versions, which is why the tower is built here; ``transformers`` is needed only for the
WordPiece tokenizer (optional extra ``sat``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from unisegcli.models.sat.config import MODALITY_CODES, TextConfig


# -- tokens ---------------------------------------------------------------------------------


def load_tokenizer(folder: Path):  # -> transformers.MPNetTokenizer
    """The WordPiece tokenizer of a text tower folder (``tokenizer.json`` or ``vocab.txt``, and
    ``tokenizer_config.json``). The registry fetches ``tokenizer.json``: MPNet's ``vocab.txt``
    starts with ``<s>``, which the downloader's HTML-page check refuses."""
    from unisegcli.errors import UsageError

    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UsageError(
            "SAT free-text prompts need the optional package 'transformers' (not installed); "
            "expected it for the text encoder. Install it with `pip install \"unisegcli[sat]\"`, "
            "or use vocabulary terms after `uniseg weights prepare <model>`."
        ) from None
    # Only tokenize() and convert_tokens_to_ids() are used (SAT adds [CLS]/[SEP] itself).
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def tokenize(texts: Sequence[str], tokenizer, max_tokens: int = 256) -> tuple[Tensor, Tensor]:
    """SAT's token ids and attention mask for a group of prompts: int64 [N, L] each."""
    rows = []
    for text in texts:
        pieces = tokenizer.tokenize(text.lower())
        tokens = ["[CLS]"] + pieces[: max_tokens - 2] + ["[SEP]"]
        rows.append(tokenizer.convert_tokens_to_ids(tokens))
    length = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), length), dtype=torch.long)  # padding id 0, as SAT
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids, (ids > 0).long()


def merge_modality(modality: str) -> str:
    """SAT's modality merging: t1/t2/mri/mr/flair/dwi -> mri, else ct, else pet (substrings)."""
    m = modality.lower()
    if any(k in m for k in ("t1", "t2", "mri", "mr", "flair", "dwi")):
        return "mri"
    if "ct" in m:
        return "ct"
    if "pet" in m:
        return "pet"
    return m


def modality_code(modality: str) -> int:
    from unisegcli.errors import UsageError

    merged = merge_modality(modality)
    if merged not in MODALITY_CODES:
        raise UsageError(f"modality '{modality}' is not one SAT knows; expected ct, mri or pet (--modality).")
    return MODALITY_CODES[merged]


# -- MPNet ----------------------------------------------------------------------------------


class _Embeddings(nn.Module):
    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.padding_idx = c.pad_token_id
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_positions, c.hidden, padding_idx=c.pad_token_id)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.layer_norm_eps)

    def forward(self, ids: Tensor) -> Tensor:
        not_pad = ids.ne(self.padding_idx).long()
        positions = torch.cumsum(not_pad, dim=1) * not_pad + self.padding_idx
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions))


class _SelfAttention(nn.Module):
    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.q = nn.Linear(c.hidden, c.hidden)
        self.k = nn.Linear(c.hidden, c.hidden)
        self.v = nn.Linear(c.hidden, c.hidden)
        self.o = nn.Linear(c.hidden, c.hidden)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + bias
        context = torch.softmax(scores, dim=-1) @ v
        return self.o(context.transpose(1, 2).reshape(b, n, d))


class _Attention(nn.Module):
    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.attn = _SelfAttention(c)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.layer_norm_eps)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return self.LayerNorm(self.attn(x, bias) + x)


class _Dense(nn.Module):
    def __init__(self, n_in: int, n_out: int, eps: float | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(n_out, eps=eps)


class _Layer(nn.Module):
    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Dense(c.hidden, c.intermediate)
        self.output = _Dense(c.intermediate, c.hidden, c.layer_norm_eps)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = self.attention(x, bias)
        h = nn.functional.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(self.output.dense(h) + x)


def relative_position_bucket(relative: Tensor, buckets: int = 32, max_distance: int = 128) -> Tensor:
    """T5/MPNet bucket of ``key position - query position``: half the buckets per direction,
    exact below buckets/4, logarithmic up to ``max_distance``."""
    half = buckets // 2
    n = -relative
    ret = (n < 0).long() * half
    n = n.abs()
    exact = half // 2
    large = exact + (
        torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (half - exact)
    ).long()
    large = large.clamp(max=half - 1)
    return ret + torch.where(n < exact, n, large)


class _Encoder(nn.Module):
    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.buckets = c.relative_buckets
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.layers))
        self.relative_attention_bias = nn.Embedding(c.relative_buckets, c.heads)

    def forward(self, x: Tensor, mask_bias: Tensor) -> Tensor:
        n = x.shape[1]
        pos = torch.arange(n, device=x.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.buckets)
        bias = self.relative_attention_bias(buckets).permute(2, 0, 1)[None] + mask_bias  # [B, H, n, n]
        for layer in self.layer:
            x = layer(x, bias)
        return x


class _Pooler(nn.Module):
    """Stored in the checkpoint, never used by SAT (it mean-pools instead)."""

    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden, c.hidden)


class MPNetEncoder(nn.Module):
    """An MPNet text encoder: ids [N, L], mask [N, L] -> last hidden state [N, L, hidden]."""

    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.embeddings = _Embeddings(c)
        self.encoder = _Encoder(c)
        self.pooler = _Pooler(c)

    def forward(self, ids: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.embeddings(ids)
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        return self.encoder(x, mask_bias)


class _Tower(nn.Module):
    def __init__(self, c: TextConfig) -> None:
        super().__init__()
        self.biolord = MPNetEncoder(c)


class SatTextEncoder(nn.Module):
    """SAT's text encoder (keys as the released ``text_encoder.pth``, no ``module.``)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.text_tower = _Tower(config)
        self.projection_layer = nn.Sequential(
            nn.Linear(config.hidden, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.hidden)
        )
        self.modality_embed = nn.Embedding(4, config.hidden)

    def pooled(self, ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean of the last hidden state over the attention mask: [N, hidden]."""
        hidden = self.text_tower.biolord(ids, attention_mask)
        mask = attention_mask[..., None].to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def forward(self, ids: Tensor, attention_mask: Tensor, modality: "str | int | Tensor") -> Tensor:
        """Query embeddings [N, hidden] for token ids/mask [N, L] of one modality."""
        code = modality_code(modality) if isinstance(modality, str) else modality
        code_t = torch.as_tensor(code, dtype=torch.long, device=ids.device)
        return self.projection_layer(self.pooled(ids, attention_mask)) + self.modality_embed(code_t)
