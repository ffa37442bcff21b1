"""Load SAT's released files strictly: ``load_sat(checkpoint, text_encoder=None)``.

Both files are ``torch.save`` dicts written by SAT's trainer, ``{'step', 'model_state_dict',
['optimizer_state_dict']}``, with the DDP prefix ``module.`` on every key (as SAT's trainer saves them). Only
``model_state_dict`` is read, through ``checkpoint.load_torch_file`` (weights_only=True).
Upstream loads with ``partial_load=True`` and silently skips absent or mis-shaped keys; we
strip ``module.``, drop the keys the spec names as known extras, and then load strictly:

* segmentation: ``mid_mask_embed_proj.*`` (deep-supervision heads, training only);
* text encoder: ``text_tower.biolord.embeddings.position_ids`` (a buffer transformers <= 4.30
  saved) and keys containing ``atlas_tower`` or ``temperature`` (knowledge pre-training).

The widths (Nano, Pro or a test size) are read from the tensors' shapes; only the window size
cannot be, so it is an argument (288 x 288 x 96 for the released models).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from unisegcli.errors import CheckpointError
from unisegcli.weights.checkpoint import check_state_dict, load_torch_file
from unisegcli.models.sat.config import SatConfig, TextConfig
from unisegcli.models.sat.network import SatSegmenter
from unisegcli.models.sat.text import SatTextEncoder, load_tokenizer, tokenize

log = logging.getLogger(__name__)

SEG_TRAINING_ONLY = re.compile(r"^mid_mask_embed_proj\.")
TEXT_LEGACY = re.compile(r"^text_tower\.biolord\.embeddings\.position_ids$|atlas_tower|temperature")


def read_sat_state(path: Path, what: str) -> dict[str, Tensor]:
    """``model_state_dict`` of a SAT file without the ``module.`` prefix."""
    # mmap: the released segmentation file may still hold the optimizer state (SAT's trainer saves both)
    obj = load_torch_file(path, mmap=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("model_state_dict"), Mapping):
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{Path(path).name} holds no SAT {what} weights; expected a dict with 'model_state_dict' "
            "as SAT's trainer saves it. Download the file again (`uniseg weights download`)."
        )
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def drop_known_extras(state: dict[str, Tensor], pattern: re.Pattern[str], source: str) -> list[str]:
    """Remove the keys matching ``pattern``; log them (shown with --verbose); return them."""
    dropped = [k for k in state if pattern.search(k)]
    for key in dropped:
        del state[key]
    if dropped:
        log.info("%s: ignored %d known extra keys (%s)", source, len(dropped), ", ".join(dropped))
    return dropped


def _aliases_equal(state: Mapping[str, Tensor], source: str) -> None:
    """The two names of each conv/norm tensor must hold the same values."""
    for key, value in state.items():
        if ".all_modules." not in key:
            continue
        twin = key.replace(".all_modules.0.", ".conv.").replace(".all_modules.1.", ".norm.")
        other = state.get(twin)
        if other is not None and (other.shape != value.shape or not torch.equal(other, value)):
            raise CheckpointError(
                f"{source}: '{key}' and '{twin}' should be the same tensor but differ; the file is "
                "corrupt or not a SAT checkpoint. Download it again."
            )


def infer_config(state: Mapping[str, Tensor], window: Sequence[int] = (288, 288, 96)) -> SatConfig:
    """The network widths of a segmentation state dict (module. already stripped)."""
    try:
        features, stage = [], 0
        while f"backbone.encoder.stages.{stage}.0.convs.0.conv.weight" in state:
            features.append(int(state[f"backbone.encoder.stages.{stage}.0.convs.0.conv.weight"].shape[0]))
            stage += 1
        n_conv = 0
        while f"backbone.encoder.stages.0.0.convs.{n_conv}.conv.weight" in state:
            n_conv += 1
        layers = 0
        while f"transformer_decoder.layers.{layers}.linear1.weight" in state:
            layers += 1
        return SatConfig(
            features=tuple(features),
            n_conv=n_conv,
            query_dim=int(state["transformer_decoder.norm.weight"].shape[0]),
            proj_hidden=int(state["projection_layer.0.weight"].shape[0]),
            ff_dim=int(state["transformer_decoder.layers.0.linear1.weight"].shape[0]),
            mask_mid=int(state["mask_embed_proj.0.weight"].shape[0]),
            decoder_layers=layers,
            window=tuple(int(w) for w in window),  # type: ignore[arg-type]
            in_channels=int(state["backbone.encoder.stages.0.0.convs.0.conv.weight"].shape[1]),
        )
    except KeyError as exc:
        raise CheckpointError(
            f"not a SAT segmentation checkpoint: key {exc} is missing; expected the keys of "
            "SAT-Nano or SAT-Pro (backbone.*, transformer_decoder.*, mask_embed_proj.*)."
        ) from None


def infer_text_config(state: Mapping[str, Tensor]) -> TextConfig:
    """The MPNet widths of a text-encoder state dict (module. stripped, extras dropped)."""
    prefix = "text_tower.biolord."
    try:
        words = state[prefix + "embeddings.word_embeddings.weight"]
        layers = 0
        while f"{prefix}encoder.layer.{layers}.attention.attn.q.weight" in state:
            layers += 1
        buckets = state[prefix + "encoder.relative_attention_bias.weight"]
        return TextConfig(
            vocab_size=int(words.shape[0]),
            hidden=int(words.shape[1]),
            layers=layers,
            heads=int(buckets.shape[1]),
            intermediate=int(state[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0]),
            max_positions=int(state[prefix + "embeddings.position_embeddings.weight"].shape[0]),
            relative_buckets=int(buckets.shape[0]),
        )
    except KeyError as exc:
        raise CheckpointError(
            f"not a SAT text encoder: key {exc} is missing; expected text_tower.biolord.*, "
            "projection_layer.* and modality_embed.weight (the paired text_encoder.pth)."
        ) from None


def _load_strict(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    expected = module.state_dict()
    check_state_dict(state, expected, source)
    module.load_state_dict({k: state[k] for k in expected}, strict=True)  # copies out of the mmap


class SatModel(nn.Module):
    """The segmentation network plus (optionally) its paired text encoder and tokenizer.

    ``encode_text(ids, mask, modality) -> [N, d]``, ``forward(queries, image) -> logits``
    (see ``SatSegmenter.forward``); ``embed_prompts(texts, modality)`` tokenises first.
    """

    def __init__(self, segmenter: SatSegmenter, text: SatTextEncoder | None = None,
                 tokenizer_dir: Path | None = None) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.text = text
        self.tokenizer_dir = tokenizer_dir
        self._tokenizer: Any = None
        self.embedding_table: Any = None  # vocabulary embeddings (``embeddings.EmbeddingTable``)

    @property
    def config(self) -> SatConfig:
        return self.segmenter.config

    def encode_text(self, token_ids: Tensor, attention_mask: Tensor, modality: "str | int") -> Tensor:
        if self.text is None:
            raise CheckpointError(
                "this SAT model was loaded without its text encoder; expected text_encoder.pth for "
                "prompts outside the precomputed vocabulary. Run `uniseg weights download` for the model."
            )
        return self.text(token_ids, attention_mask, modality)

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.tokenizer_dir is None:
                raise CheckpointError(
                    "no tokenizer for SAT's text encoder; expected the text tower's tokenizer.json next "
                    "to text_encoder.pth. Run `uniseg weights download` for the model."
                )
            self._tokenizer = load_tokenizer(self.tokenizer_dir)
        return self._tokenizer

    def embed_prompts(self, texts: Sequence[str], modality: str) -> Tensor:
        """[N, d] query embeddings of free-text prompts (lowercased), with the live text tower."""
        max_tokens = self.text.config.max_tokens if self.text is not None else 256
        ids, mask = tokenize(texts, self.tokenizer(), max_tokens)
        device = next(self.text.parameters()).device if self.text is not None else None
        with torch.inference_mode():
            return self.encode_text(ids.to(device), mask.to(device), modality).float()

    def forward(self, queries: "Tensor | Sequence[Tensor]", image: Tensor) -> Tensor:
        return self.segmenter(queries, image)


def load_segmenter(checkpoint: str | Path, window: Sequence[int] = (288, 288, 96)) -> SatSegmenter:
    path = Path(checkpoint)
    state = read_sat_state(path, "segmentation")
    drop_known_extras(state, SEG_TRAINING_ONLY, path.name)
    _aliases_equal(state, path.name)
    net = SatSegmenter(infer_config(state, window))
    _load_strict(net, state, path.name)
    return net.eval()


def load_text_encoder(path: str | Path) -> SatTextEncoder:
    path = Path(path)
    state = read_sat_state(path, "text encoder")
    drop_known_extras(state, TEXT_LEGACY, path.name)
    encoder = SatTextEncoder(infer_text_config(state))
    _load_strict(encoder, state, path.name)
    return encoder.eval()


def load_sat(
    checkpoint: str | Path,
    text_encoder: str | Path | None = None,
    *,
    tokenizer_dir: str | Path | None = None,
    window: Sequence[int] = (288, 288, 96),
) -> SatModel:
    """SAT on the CPU in eval mode from the released segmentation checkpoint and (optionally)
    its paired ``text_encoder.pth``; ``tokenizer_dir`` holds the text tower's tokenizer files
    (default: the text encoder's folder)."""
    segmenter = load_segmenter(checkpoint, window)
    text = load_text_encoder(text_encoder) if text_encoder is not None else None
    if tokenizer_dir is None and text_encoder is not None:
        folder = Path(text_encoder).parent
        if (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file():
            tokenizer_dir = folder
    if text is not None and text.config.hidden != segmenter.config.query_dim:
        raise CheckpointError(
            f"text encoder width {text.config.hidden} does not match the segmentation model's query "
            f"width {segmenter.config.query_dim}; expected the paired text_encoder.pth of the same model."
        )
    return SatModel(segmenter, text, Path(tokenizer_dir) if tokenizer_dir else None).eval()
