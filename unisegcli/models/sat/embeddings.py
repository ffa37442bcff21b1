"""Precomputed text embeddings of SAT's whole vocabulary, so runs need no text tower.

A query depends only on the prompt text, its modality and the paired ``text_encoder.pth``
(SAT ``model/knowledge_encoder.py``), so ``uniseg weights prepare <model>`` runs the text tower once over the 498
terms and stores a [498, d] float32 table (~1.5 MB for d = 768) next to the model's files::

    <cache>/models/<model>/<version>/text_embeddings.safetensors

with metadata naming the terms (in row order) and the text encoder it came from (file name,
size and, when the cache manifest has it, sha256). A table whose source does not match the
cached text encoder is ignored. Upstream computes embeddings under fp16 autocast on a GPU;
ours are float32, so they differ from upstream's at the fp16 rounding level.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from unisegcli.models.sat.vocabulary import all_terms

if TYPE_CHECKING:
    import torch

    from unisegcli.weights.cards import ModelCard
    from unisegcli.models.sat.loader import SatModel

TABLE_NAME = "text_embeddings.safetensors"
FORMAT = "uniseg-sat-text-embeddings-1"
GROUP = 32  # prompts per text-tower forward while preparing


@dataclass
class EmbeddingTable:
    """Rows of ``embeddings`` [N, d] float32 belong to ``terms`` [(modality, name)]."""

    terms: list[tuple[str, str]]
    embeddings: "torch.Tensor"
    source: dict[str, Any]

    def __post_init__(self) -> None:
        self._row = {term: i for i, term in enumerate(self.terms)}

    def lookup(self, modality: str, name: str) -> "torch.Tensor | None":
        row = self._row.get((modality, name))
        return None if row is None else self.embeddings[row]


def compute_table(model: "SatModel", terms: Sequence[tuple[str, str]] | None = None,
                  source: Mapping[str, Any] | None = None, progress: Any = None) -> EmbeddingTable:
    """Run the live text tower over ``terms`` (default: the whole vocabulary), by modality."""
    import torch

    terms = list(terms if terms is not None else all_terms())
    rows: dict[tuple[str, str], torch.Tensor] = {}
    by_modality: dict[str, list[str]] = {}
    for modality, name in terms:
        by_modality.setdefault(modality, []).append(name)
    done = 0
    for modality, names in by_modality.items():
        for start in range(0, len(names), GROUP):
            chunk = names[start : start + GROUP]
            out = model.embed_prompts(chunk, modality)
            for name, row in zip(chunk, out):
                rows[(modality, name)] = row.float().cpu()
            done += len(chunk)
            if progress is not None:
                progress(done, len(terms))
    table = torch.stack([rows[t] for t in terms]).contiguous()
    return EmbeddingTable(terms, table, dict(source or {}))


def save_table(table: EmbeddingTable, path: Path) -> Path:
    """Write the table atomically (safetensors; terms and source in the metadata)."""
    from safetensors.torch import save_file

    from unisegcli.io.atomic import staged_files

    path = Path(path)
    metadata = {"format": FORMAT, "terms": json.dumps([list(t) for t in table.terms]),
                "source": json.dumps(table.source, sort_keys=True)}
    with staged_files(path.parent) as stage:
        save_file({"embeddings": table.embeddings.float().contiguous()}, str(stage(path.name)), metadata=metadata)
    return path


def load_table(path: Path, expected_source: Mapping[str, Any] | None = None) -> EmbeddingTable | None:
    """The table at ``path``, or None when absent, unreadable, or made from another encoder."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            embeddings = f.get_tensor("embeddings")
        if metadata.get("format") != FORMAT:
            return None
        terms = [tuple(t) for t in json.loads(metadata["terms"])]
        source = json.loads(metadata.get("source", "{}"))
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    if embeddings.ndim != 2 or embeddings.shape[0] != len(terms):
        return None
    if expected_source is not None and any(source.get(k) != v for k, v in expected_source.items()):
        return None
    return EmbeddingTable(terms, embeddings, source)  # type: ignore[arg-type]


def table_path(card: "ModelCard") -> Path:
    from unisegcli.weights import cache

    return cache.model_dir(card) / TABLE_NAME


def encoder_source(card: "ModelCard") -> dict[str, Any] | None:
    """What identifies the cached text encoder (name, size, sha256 if recorded); None if absent."""
    from unisegcli.weights import cache

    file = card.file("text_encoder")
    if file is None:
        return None
    path = cache.model_dir(card) / file.name
    if not path.is_file():
        return None
    entry = cache.read_manifest(card).get(file.name, {})
    return {"text_encoder": file.name, "size_bytes": path.stat().st_size, "sha256": entry.get("sha256") or file.sha256}


def cached_table(card: "ModelCard") -> EmbeddingTable | None:
    """The prepared table of a cached model, if it exists and fits its text encoder."""
    source = encoder_source(card)
    path = table_path(card)
    if source is None:  # no encoder cached: a table prepared elsewhere is still usable
        return load_table(path)
    return load_table(path, source)
