"""``--compare``: how well several models agree on one structure (a model-agreement QC).

For each compared structure and each pair of models (a, b) — the model that writes the
structure first, the others in ``--model`` order:

    dice                        2 |A ∩ B| / (|A| + |B|); null when both masks are empty
    volume_difference_ml        volume(b) - volume(a)
    volume_difference_percent   100 * (volume(b) - volume(a)) / volume(a); null when A is empty

Masks are compared as they would be written: after the same cleanup (``--min-component-ml``,
``--largest-component``). Files: ``compare.json`` (the document below) and ``compare.csv``
(one row per structure × pair, ``COMPARE_COLUMNS``) in the case folder; the cohort table
``OUT/compare.csv`` holds the rows of every case (merged like ``statistics.csv``).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

COMPARE_COLUMNS = (
    "case_id", "structure", "model_a", "model_b", "dice", "volume_a_ml", "volume_b_ml",
    "volume_difference_ml", "volume_difference_percent", "voxels_a", "voxels_b", "voxels_both",
)  # fmt: skip
CONVENTIONS = {
    "dice": "2|A∩B| / (|A|+|B|) of the masks as written (after cleanup); null when both are empty",
    "volume_difference_ml": "volume of model_b minus volume of model_a",
    "volume_difference_percent": "100 * (volume_b - volume_a) / volume_a; null when model_a's mask is empty",
    "model_a": "the model that writes the structure's files; model_b: each other model that has it",
}


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice overlap of two boolean masks of one shape; None when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return None
    return 2.0 * int(np.count_nonzero(a & b)) / total


def compare_structure(masks: Mapping[str, np.ndarray], tasks: Mapping[str, str], voxel_ml: float) -> dict[str, Any]:
    """One structure on several models. masks: model -> bool [Z, Y, X] (the writing model
    first); tasks: model -> its task name. Returns {"models": {...}, "pairs": [...]}."""
    models = list(masks)
    counts = {m: int(np.count_nonzero(masks[m])) for m in models}
    record: dict[str, Any] = {
        "written_from": models[0],
        "models": {m: {"task": tasks.get(m), "voxel_count": counts[m], "volume_ml": counts[m] * voxel_ml}
                   for m in models},
        "pairs": [],
    }
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            both = int(np.count_nonzero(np.asarray(masks[a], bool) & np.asarray(masks[b], bool)))
            volume_a, volume_b = counts[a] * voxel_ml, counts[b] * voxel_ml
            record["pairs"].append({
                "model_a": a, "model_b": b, "dice": dice(masks[a], masks[b]),
                "volume_a_ml": volume_a, "volume_b_ml": volume_b,
                "volume_difference_ml": volume_b - volume_a,
                "volume_difference_percent": 100.0 * (volume_b - volume_a) / volume_a if counts[a] else None,
                "voxels_a": counts[a], "voxels_b": counts[b], "voxels_both": both,
            })  # fmt: skip
    return record


def compare_document(case_id: str, structures: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ``compare.json`` document: structure -> ``compare_structure`` record."""
    return {"schema_version": 1, "case_id": case_id, "conventions": CONVENTIONS, "structures": dict(structures)}


def compare_rows(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per structure × pair of models (``COMPARE_COLUMNS``)."""
    return [{"case_id": document["case_id"], "structure": name, **pair}
            for name, record in document["structures"].items() for pair in record["pairs"]]


def event_summary(document: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """What the ``case_done`` event carries: structure -> its pairs (Dice, volumes)."""
    return {name: [dict(pair) for pair in record["pairs"]] for name, record in document["structures"].items()}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def render_compare(document: Mapping[str, Any]) -> tuple[str, str]:
    """(compare.json text, compare.csv text)."""
    json_text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COMPARE_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in compare_rows(document):
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return json_text, buffer.getvalue()


def merge_cohort_compare(folder: Path, document: Mapping[str, Any]) -> Path:
    """Put one case's rows into ``folder/compare.csv`` (its earlier rows replaced)."""
    from unisegcli.outputs.statistics import merge_cohort_rows

    return merge_cohort_rows(Path(folder) / "compare.csv", str(document["case_id"]), compare_rows(document),
                             list(COMPARE_COLUMNS), "compare")


def compared_masks(masks_by_model: Mapping[str, np.ndarray], options: Any, voxel_ml: float) -> dict[str, np.ndarray]:
    """The masks cleaned as written (``OutputOptions`` cleanup), model -> bool [Z, Y, X]."""
    from unisegcli.outputs.writer import clean_masks

    return clean_masks(masks_by_model, options, voxel_ml)
