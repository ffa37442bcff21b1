"""SAT network and text tower against the upstream reference (tests/data/sat_tiny).

The fixture (copied from the shared fixtures; its README says how it was made) holds the
original SAT classes' tiny checkpoints with random weights, token ids, text embeddings and
window logits; ``sat_{nano,pro}_full_keys.json`` list the released layouts. Tolerances from
the fixture's README: 1e-5 for text embeddings, 5e-5 for logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unisegcli.errors import CheckpointError
from unisegcli.models.sat import NANO, PRO, SatConfig, TextConfig, load_sat
from unisegcli.models.sat.loader import load_segmenter, load_text_encoder
from unisegcli.models.sat.network import SatSegmenter, positional_encoding_3d
from unisegcli.models.sat.text import SatTextEncoder, merge_modality, relative_position_bucket, tokenize

DATA = Path(__file__).parent / "data"
TINY = DATA / "sat_tiny"
MANIFEST = json.loads((TINY / "manifest.json").read_text())
WINDOW = tuple(MANIFEST["config"]["image_size"])

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny convolutions: 1 thread is fastest


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("transformers")  # the tokenizer (extra "sat")
    return load_sat(TINY / "sat_checkpoint.pth", TINY / "text_encoder.pth",
                    tokenizer_dir=TINY / "text_tower", window=WINDOW)


def _load(name: str) -> np.ndarray:
    return np.load(TINY / name)


@pytest.mark.parametrize("case", MANIFEST["text_cases"], ids=lambda c: c["id"])
def test_text_embeddings_match_upstream(tiny, case):
    ids, mask = tokenize(case["labels"], tiny.tokenizer())
    assert ids.tolist() == case["tokens"]["input_ids"]  # [CLS] ... [SEP], padded with 0
    assert mask.tolist() == case["tokens"]["attention_mask"]
    with torch.no_grad():
        got = tiny.encode_text(ids, mask, case["modality"]).numpy()
        pooled = tiny.text.pooled(ids, mask).numpy()
    np.testing.assert_allclose(pooled, _load(case["debug"]["text_pooled"]["file"]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got, _load(case["expected_text_embeddings"]["file"]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", MANIFEST["seg_cases"], ids=lambda c: c["id"])
def test_logits_match_upstream(tiny, case):
    groups = []
    for labels, tokens in zip(case["query_groups"], case["tokens_per_group"]):
        ids, mask = tokenize(labels, tiny.tokenizer())
        assert ids.tolist() == tokens["input_ids"]
        with torch.no_grad():
            groups.append(tiny.encode_text(ids, mask, case["modality"]))
    np.testing.assert_allclose(torch.cat(groups).numpy(), _load(case["expected_text_embeddings"]["file"]),
                               atol=1e-5, rtol=0)
    image = torch.from_numpy(_load(case["input"]["file"]))  # [B, 1, H, W, D], repeated to 3 inside
    with torch.no_grad():
        logits = tiny(groups, image)
        one_group = tiny(torch.cat(groups), image)  # queries never interact
    expected = _load(case["expected_logits"]["file"])
    assert logits.shape == expected.shape
    np.testing.assert_allclose(logits.numpy(), expected, atol=5e-5, rtol=0)
    np.testing.assert_allclose(one_group.numpy(), expected, atol=5e-5, rtol=0)


def test_intermediates_match_upstream(tiny):
    """Memory tokens and positional encoding: the weakest signals in the logits."""
    case = MANIFEST["seg_cases"][0]
    image = torch.from_numpy(_load(case["input"]["file"])).expand(-1, 3, -1, -1, -1)
    with torch.no_grad():
        skips, _ = tiny.segmenter.backbone(image)
        tokens = tiny.segmenter.memory_tokens(skips)
    np.testing.assert_allclose(skips[-1].numpy(), _load(case["debug"]["bottleneck"]["file"]), atol=5e-5)
    expected_tokens = _load(case["debug"]["image_tokens"]["file"])  # [B, h, w, d, C]
    b, c = expected_tokens.shape[0], expected_tokens.shape[-1]
    np.testing.assert_allclose(tokens.numpy(), expected_tokens.reshape(b, -1, c).transpose(1, 0, 2), atol=5e-5)
    np.testing.assert_allclose(tiny.segmenter.pos_embedding.numpy(), _load(case["debug"]["pos_embedding"]["file"]),
                               atol=1e-6)


def test_positional_encoding_matches_package():
    grid, dim = MANIFEST["config"]["pe_grid"], MANIFEST["config"]["query_dim"]
    expected = _load(MANIFEST["files"]["pe3d"]["file"]).reshape(*grid, dim)
    np.testing.assert_allclose(positional_encoding_3d(grid, dim).numpy(), expected, atol=1e-6)


def _keys(module: torch.nn.Module) -> list[list]:
    return [["module." + k, list(v.shape)] for k, v in module.state_dict().items()]


@pytest.mark.parametrize("variant,config", [("nano", NANO), ("pro", PRO)])
def test_full_size_key_lists(variant, config):
    reference = json.loads((DATA / f"sat_{variant}_full_keys.json").read_text())
    with torch.device("meta"):
        seg = SatSegmenter(config)
        text = SatTextEncoder(TextConfig())
    seg_ref = reference["segmentation_model"]
    assert _keys(seg) == [[k, list(s)] for k, s in seg_ref["keys"]]
    distinct = {id(p): p.numel() for p in seg.parameters()}
    assert sum(distinct.values()) == seg_ref["unique_params"]
    assert tuple(seg.pos_embedding.shape) == tuple(seg_ref["non_state_tensors"]["pos_embedding"])
    text_ref = reference["text_encoder"]
    assert _keys(text) == [[k, list(s)] for k, s in text_ref["keys"]]
    assert sum(p.numel() for p in text.parameters()) == text_ref["unique_params"]


def test_tiny_keys_and_dropped_extras(caplog):
    keys = json.loads((TINY / "keys.json").read_text())
    with caplog.at_level("INFO", logger="unisegcli.models.sat.loader"):
        seg = load_segmenter(TINY / "sat_checkpoint.pth", WINDOW)
        text = load_text_encoder(TINY / "text_encoder.pth")
    stored = [k for k, _ in keys["sat_checkpoint"]["keys"]]
    assert [k for k, _ in _keys(seg)] == [k for k in stored if ".mid_mask_embed_proj." not in k]
    assert "mid_mask_embed_proj.0.0.weight" in caplog.text and "position_ids" in caplog.text
    assert len(text.state_dict()) == keys["text_encoder"]["num_keys"] - 1
    assert seg.config.features == tuple(MANIFEST["config"]["features"])


def _resave(tmp_path: Path, source: Path, change) -> Path:
    state = torch.load(source, weights_only=True)
    change(state["model_state_dict"])
    path = tmp_path / source.name
    torch.save(state, path)
    return path


def test_strict_loading_rejects_wrong_files(tmp_path):
    def five_modalities(sd):
        sd["module.modality_embed.weight"] = torch.zeros(5, sd["module.modality_embed.weight"].shape[1])

    with pytest.raises(CheckpointError, match="modality_embed"):
        load_text_encoder(_resave(tmp_path, TINY / "text_encoder.pth", five_modalities))

    def unknown_key(sd):
        sd["module.something_new.weight"] = torch.zeros(3)

    with pytest.raises(CheckpointError, match="something_new"):
        load_segmenter(_resave(tmp_path, TINY / "sat_checkpoint.pth", unknown_key), WINDOW)

    def broken_alias(sd):
        key = "module.backbone.encoder.stages.0.0.convs.0.all_modules.0.weight"
        sd[key] = sd[key] + 1

    with pytest.raises(CheckpointError, match="same tensor"):
        load_segmenter(_resave(tmp_path, TINY / "sat_checkpoint.pth", broken_alias), WINDOW)

    def missing(sd):
        del sd["module.transformer_decoder.layers.0.norm1.weight"]

    with pytest.raises(CheckpointError, match="missing"):
        load_segmenter(_resave(tmp_path, TINY / "sat_checkpoint.pth", missing), WINDOW)


def test_other_windows():
    """A window other than the configured one uses its own grid's positional encoding: loading
    with the default (released) window gives the fixture's logits on its 64 x 64 x 32 window."""
    case = MANIFEST["seg_cases"][0]
    default = load_sat(TINY / "sat_checkpoint.pth")  # window 288 x 288 x 96, no text encoder
    queries = torch.from_numpy(_load(case["expected_text_embeddings"]["file"]))
    with torch.no_grad():
        logits = default(queries, torch.from_numpy(_load(case["input"]["file"])))
    np.testing.assert_allclose(logits.numpy(), _load(case["expected_logits"]["file"]), atol=5e-5, rtol=0)
    with pytest.raises(ValueError, match="divisible by 32"):
        default(queries, torch.zeros(1, 1, 32, 32, 48))
    with pytest.raises(CheckpointError, match="text encoder"):
        default.encode_text(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), "ct")


def test_modality_merging_and_buckets():
    merged = MANIFEST["helpers"]["merge_modality"]  # upstream's own results
    assert len(merged) > 10
    for raw, out in merged.items():
        assert merge_modality(raw) == out, raw
    assert merge_modality("T2-FLAIR") == "mri" and merge_modality("PET-CT") == "ct" and merge_modality("pet") == "pet"
    rel = torch.arange(-200, 201)
    buckets = relative_position_bucket(rel)
    assert buckets.min() >= 0 and buckets.max() <= 31
    assert buckets[200].item() == 0  # distance 0
    assert buckets[199].item() != buckets[201].item()  # direction matters


def test_other_configuration_round_trips_through_the_released_format(tmp_path):
    """A Pro-like small config (3 convs per stage, wider projection) saved as SAT's trainer saves
    it (module. prefix, deep-supervision heads, optimizer state) loads back with the widths read
    from the tensors, and computes the same logits."""
    config = SatConfig(features=(4, 8, 8, 12, 16, 20), n_conv=3, query_dim=24, proj_hidden=40, ff_dim=16,
                       mask_mid=12, window=(64, 64, 32))
    text_config = TextConfig(vocab_size=50, hidden=24, layers=3, heads=6, intermediate=20, max_positions=30)
    torch.manual_seed(3)
    seg, text = SatSegmenter(config).eval(), SatTextEncoder(text_config).eval()
    seg_state = {"module." + k: v for k, v in seg.state_dict().items()}
    seg_state["module.mid_mask_embed_proj.0.0.weight"] = torch.zeros(3, 24)
    torch.save({"step": 7, "model_state_dict": seg_state, "optimizer_state_dict": {"state": {}, "param_groups": []}},
               tmp_path / "seg.pth")
    text_state = {"module." + k: v for k, v in text.state_dict().items()}
    text_state["module.text_tower.biolord.embeddings.position_ids"] = torch.arange(30)[None]
    torch.save({"step": 7, "model_state_dict": text_state}, tmp_path / "text.pth")

    loaded = load_sat(tmp_path / "seg.pth", tmp_path / "text.pth", window=(64, 64, 32))
    assert loaded.config == config
    assert loaded.text.config.layers == 3 and loaded.text.config.heads == 6
    ids = torch.tensor([[6, 11, 12, 7, 0], [6, 13, 7, 0, 0]])
    image = torch.randn(1, 1, 64, 64, 32)
    with torch.no_grad():
        queries = text(ids, (ids > 0).long(), "mri")
        torch.testing.assert_close(loaded.encode_text(ids, (ids > 0).long(), "mri"), queries)
        torch.testing.assert_close(loaded(queries, image), seg(queries, image))
