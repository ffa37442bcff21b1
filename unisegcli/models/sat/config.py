"""SAT network shapes: the released SAT-Nano and SAT-Pro, and small ones for tests.

Facts read from github.com/zhaoziheng/SAT (commit 5676be5a,
``model/maskformer.py`` and ``model/build_model.py``): Nano is ``vision_backbone='UNET'``, Pro
``'UNET-L'``; both use 768-d text queries, a 288 x 288 x 96 window (H, W, D = x, y, z in RAS)
and a 6-layer query decoder with 8 heads and a 2048-wide feed-forward layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

# Modality codes of the text encoder's ``modality_embed`` (SAT model/knowledge_encoder.py):
# "us" = 2 exists in the table but no released prompt uses it.
MODALITY_CODES = {"ct": 0, "mri": 1, "us": 2, "pet": 3}


@dataclass(frozen=True)
class SatConfig:
    """Widths of a SAT segmentation network (U-Net, memory projection, decoder, mask head).

    window: (H, W, D) voxels = (x, y, z) of the RAS-oriented, 1 x 1 x 3 mm volume; the
    positional encoding is built for exactly this size, so every window must have it.
    """

    features: tuple[int, ...] = (64, 64, 128, 256, 512, 768)
    n_conv: int = 2
    query_dim: int = 768
    proj_hidden: int = 768
    ff_dim: int = 2048
    mask_mid: int = 256
    heads: int = 8
    decoder_layers: int = 6
    window: tuple[int, int, int] = (288, 288, 96)
    in_channels: int = 3  # upstream repeats a 1-channel image 3 times

    @property
    def memory_grid(self) -> tuple[int, int, int]:
        """Token grid of the deepest stage (/32 per axis): 9 x 9 x 3 for the released window."""
        return tuple(w // 32 for w in self.window)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SatConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("features", "window"):
            if key in known:
                known[key] = tuple(int(v) for v in known[key])
        return cls(**known)


@dataclass(frozen=True)
class TextConfig:
    """The MPNet text tower (BioLORD-2023-C's config.json, as SAT's ``model/text_encoder.py`` loads it)."""

    vocab_size: int = 30527
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 514
    relative_buckets: int = 32
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    max_tokens: int = 256  # SAT's tokenizer caps every prompt at 256 tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TextConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def from_hf_config(cls, data: Mapping[str, Any]) -> "TextConfig":
        """From a Hugging Face MPNet ``config.json`` (e.g. the fixtures' tiny tower)."""
        return cls(
            vocab_size=int(data["vocab_size"]),
            hidden=int(data["hidden_size"]),
            layers=int(data["num_hidden_layers"]),
            heads=int(data["num_attention_heads"]),
            intermediate=int(data["intermediate_size"]),
            max_positions=int(data["max_position_embeddings"]),
            relative_buckets=int(data.get("relative_attention_num_buckets", 32)),
            layer_norm_eps=float(data.get("layer_norm_eps", 1e-5)),
            pad_token_id=int(data.get("pad_token_id", 1)),
        )


NANO = SatConfig()
PRO = SatConfig(features=(128, 128, 256, 512, 1024, 1536), n_conv=3, proj_hidden=1536, mask_mid=384)
VARIANTS = {"nano": NANO, "pro": PRO}
