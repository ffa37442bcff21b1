"""How SAT splits a case's prompts into query groups for its decoder.

Upstream (zhaoziheng/SAT ``data/inference_dataset.py`` ``Inference_Dataset._split_labels``):
fewer than ``max_queries`` labels make one group; otherwise consecutive groups of
``max_queries``, the last one shorter. Every window is run with all groups one after another
(``evaluate/inference_engine.py``), and queries never interact in the decoder (only
cross-attention to the image; its self-attention is commented out in
``model/transformer_decoder.py``), so the grouping bounds memory and does not change results.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")


def query_ranges(n_queries: int, max_queries: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] of each group: upstream's ``split_n1n2``.

    Zero queries give one empty group [(0, 0)], as upstream's ``[label_list]``.
    """
    if max_queries < 1:
        raise ValueError(f"max_queries must be at least 1, got {max_queries}")
    if n_queries < max_queries:
        return [(0, n_queries)]
    return [(start, min(start + max_queries, n_queries)) for start in range(0, n_queries, max_queries)]


def split_queries(queries: Sequence[T], max_queries: int) -> list[Sequence[T]]:
    """``queries`` (prompts, or a [N, d] tensor of embeddings) cut into upstream's groups."""
    return [queries[start:stop] for start, stop in query_ranges(len(queries), max_queries)]
