"""SAT's prompt vocabulary: 498 ``<modality>_<name>`` terms, and matching --tasks to them.

The list is SAT-DS ``data/terminology_list.json`` (github.com/zhaoziheng/SAT-DS, commit
492df0e8; shipped unchanged as ``unisegcli/data/sat_vocabulary.json``): ``all`` holds 498
lowercase terms (ct 306, mri 189, pet 3); a term splits at its first ``_`` into the modality
and the prompt text (SAT ``data/inference_dataset.py``). Upstream accepts any text; we match each requested name to
the vocabulary so that typos fail with a suggestion instead of a silently meaningless prompt:

1. exact: the name is a vocabulary name;
2. normalised: the same after lowercasing, treating ``_``, ``-`` and runs of spaces as one
   space, ignoring parentheses, and ignoring word order ("kidney_left" = "left kidney");
3. synonym: British spellings and plurals (``WORD_SYNONYMS``), common short names
   (``PHRASE_SYNONYMS``), and the abbreviation in parentheses ("L1" = "lumbar vertebrae 1 (l1)",
   also "vertebrae_L1" as TotalSegmentator names it) when it is unique;
4. otherwise ``UnknownTaskError`` with the closest names.

Prompts outside the vocabulary are written ``text:<prompt>`` and need the text encoder.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from unisegcli.errors import UnknownTaskError

VOCABULARY_PATH = Path(__file__).resolve().parents[2] / "data" / "sat_vocabulary.json"
MODALITIES = ("ct", "mri", "pet")
FREE_TEXT_PREFIX = "text:"

WORD_SYNONYMS = {
    "tumour": "tumor", "tumours": "tumor", "tumors": "tumor", "oesophagus": "esophagus",
    "haemorrhage": "hemorrhage", "oedema": "edema", "lungs": "lung", "kidneys": "kidney",
    "grey": "grey", "gray": "grey", "vertebra": "vertebrae", "ribs": "rib",
}
PHRASE_SYNONYMS = {
    "bladder": "urinary bladder", "gall bladder": "gallbladder", "ivc": "inferior vena cava",
    "svc": "superior vena cava", "small intestine": "small bowel", "adrenal": "adrenal gland",
    "adrenal left": "left adrenal gland", "adrenal right": "right adrenal gland",
    "left adrenal": "left adrenal gland", "right adrenal": "right adrenal gland",
    "hepatic tumor": "liver tumor", "renal tumor": "kidney tumor", "renal cyst": "kidney cyst",
    "spine": "vertebrae", "cord": "spinal cord", "lesion": "tumor",
}


@dataclass(frozen=True)
class Match:
    """A requested name resolved to a vocabulary name (or free text)."""

    requested: str
    name: str  # the prompt text (vocabulary name without the modality prefix)
    how: str  # "exact", "normalized", "synonym" or "free text"
    modalities: tuple[str, ...]  # where the vocabulary has this name; () for free text


@lru_cache(maxsize=1)
def load_vocabulary(path: Path = VOCABULARY_PATH) -> dict[str, tuple[str, ...]]:
    """{modality: names} from the terminology list, in its order."""
    terms = json.loads(Path(path).read_text(encoding="utf-8"))["all"]
    by_modality: dict[str, list[str]] = {}
    for term in terms:
        modality, _, name = term.partition("_")
        by_modality.setdefault(modality, []).append(name)
    return {m: tuple(names) for m, names in by_modality.items()}


def all_terms() -> list[tuple[str, str]]:
    """(modality, name) for every term, in the vocabulary's order."""
    return [(m, n) for m, names in load_vocabulary().items() for n in names]


def normalize(text: str) -> str:
    """Lowercase; ``_``/``-``/spaces to one space; no parentheses; synonyms word by word."""
    words = re.sub(r"[_\-\s]+", " ", text.lower().replace("(", " ").replace(")", " ")).split()
    return " ".join(WORD_SYNONYMS.get(w, w) for w in words)


def _order_free(text: str) -> str:
    return " ".join(sorted(normalize(text).split()))


@lru_cache(maxsize=1)
def _indexes() -> tuple[dict[str, tuple[str, ...]], dict[str, str], dict[str, str], dict[str, set[str]]]:
    modalities: dict[str, list[str]] = {}
    for modality, name in all_terms():
        modalities.setdefault(name, []).append(modality)
    names = list(modalities)
    normalized: dict[str, str] = {}
    for name in names:
        normalized.setdefault(normalize(name), name)
        normalized.setdefault(_order_free(name), name)
    abbreviations: dict[str, set[str]] = {}
    for name in names:
        found = re.fullmatch(r"[a-z ]*vertebrae \d+ \(([a-z]\d+)\)", name)
        if found:  # "lumbar vertebrae 1 (l1)", not the discs between two vertebrae
            abbreviations.setdefault(found.group(1), set()).add(name)
    return {n: tuple(m) for n, m in modalities.items()}, normalized, dict(PHRASE_SYNONYMS), abbreviations


def match(requested: str, model: str = "sat-nano") -> Match:
    """The vocabulary name for one --tasks entry (see the module docstring for the rules)."""
    text = requested.strip()
    if text.lower().startswith(FREE_TEXT_PREFIX):
        prompt = text[len(FREE_TEXT_PREFIX):].strip().lower()
        if not prompt:
            raise UnknownTaskError(f"empty free-text prompt '{requested}'; expected e.g. 'text:left renal cyst'.")
        return Match(requested, prompt, "free text", ())
    modalities, normalized, phrases, abbreviations = _indexes()
    if text in modalities:
        return Match(requested, text, "exact", modalities[text])
    for key in (normalize(text), _order_free(text)):
        if key in normalized:
            name = normalized[key]
            return Match(requested, name, "normalized", modalities[name])
    key = normalize(text)
    candidates = [phrases.get(key), phrases.get(_order_free(text))]
    abbr = re.sub(r"^vertebrae\s+", "", key).replace(" ", "")
    if len(abbreviations.get(abbr, ())) == 1:
        candidates.append(next(iter(abbreviations[abbr])))
    for name in candidates:
        if name and name in modalities:
            return Match(requested, name, "synonym", modalities[name])
    close = difflib.get_close_matches(key, list(modalities), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
    raise UnknownTaskError(
        f"unknown SAT prompt '{requested}'{hint} Expected one of the {len(all_terms())} vocabulary "
        f"terms (run `uniseg tasks --model {model}`), or free text as 'text:<prompt>'."
    )


def check_modality(m: Match, modality: str, model: str = "sat-nano") -> str | None:
    """None when the vocabulary has ``m`` for ``modality``; else a one-line explanation with the
    closest names of that modality (free text is never in the vocabulary)."""
    return modality_problem(m.name, m.modalities, modality, model)


def modality_problem(name: str, modalities: Iterable[str], modality: str, model: str = "sat-nano") -> str | None:
    """``check_modality`` for a name whose vocabulary modalities are known (() = free text)."""
    modalities = tuple(modalities)
    if not modalities or modality in modalities:
        return None
    names = load_vocabulary().get(modality, ())
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    hint = f" Closest {modality} terms: {', '.join(repr(c) for c in close)}." if close else ""
    return (f"'{name}' is in SAT's vocabulary for {', '.join(modalities)}, not for {modality}.{hint} "
            f"See `uniseg tasks --model {model}`.")


def vocabulary_rows(modalities: Iterable[str] = MODALITIES) -> list[list[str]]:
    """[modality, number of terms, names] rows for `uniseg tasks`."""
    vocab = load_vocabulary()
    return [[m, str(len(vocab.get(m, ()))), ", ".join(vocab.get(m, ()))] for m in modalities]
