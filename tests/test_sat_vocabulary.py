"""SAT prompts: vocabulary matching, `uniseg tasks`, task cards, and SAT's pre/post helpers
against the upstream results in tests/data/sat_tiny (normalisation, Gaussian, windows)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from unisegcli.errors import UnknownTaskError, UsageError
from unisegcli.models.sat import vocabulary
from unisegcli.models.sat.vocabulary import check_modality, load_vocabulary, match

TINY = Path(__file__).parent / "data" / "sat_tiny"
MANIFEST = json.loads((TINY / "manifest.json").read_text())


def test_vocabulary_is_the_terminology_list():
    shipped = json.loads(vocabulary.VOCABULARY_PATH.read_text())  # SAT-DS terminology_list.json
    vocab = load_vocabulary()
    assert {m: len(n) for m, n in vocab.items()} == {"ct": 306, "mri": 189, "pet": 3}
    assert sum(len(n) for n in vocab.values()) == len(shipped["all"]) == 498


@pytest.mark.parametrize("requested,name,how", [
    ("liver", "liver", "exact"),
    ("lumbar vertebrae 1 (l1)", "lumbar vertebrae 1 (l1)", "exact"),
    ("Left Kidney", "left kidney", "normalized"),
    ("left   kidney ", "left kidney", "normalized"),
    ("kidney_left", "left kidney", "normalized"),  # TotalSegmentator-style order and underscores
    ("COVID 19 infection", "covid-19 infection", "normalized"),
    ("lumbar vertebrae 1 l1", "lumbar vertebrae 1 (l1)", "normalized"),
    ("Kidney Tumour", "kidney tumor", "normalized"),  # word synonym
    ("gall bladder", "gallbladder", "synonym"),
    ("IVC", "inferior vena cava", "synonym"),
    ("L1", "lumbar vertebrae 1 (l1)", "synonym"),
    ("vertebrae_T12", "thoracic vertebrae 12 (t12)", "synonym"),
    ("bladder", "urinary bladder", "synonym"),
])
def test_matching(requested, name, how):
    m = match(requested)
    assert (m.name, m.how) == (name, how)
    assert m.modalities  # a vocabulary term knows its modalities


@pytest.mark.parametrize("requested,suggestion", [("livr", "liver"), ("left kidny", "left kidney"),
                                                  ("aortta", "aorta")])
def test_unknown_prompt_suggests(requested, suggestion):
    with pytest.raises(UnknownTaskError) as info:
        match(requested, "sat-pro")
    message = str(info.value)
    assert f"'{suggestion}'" in message and "uniseg tasks --model sat-pro" in message
    assert "\n" not in message


def test_unknown_without_close_match_and_free_text():
    with pytest.raises(UnknownTaskError, match="text:<prompt>"):
        match("qwertyuiop")
    m = match("text: Left Renal Cyst")
    assert (m.name, m.how, m.modalities) == ("left renal cyst", "free text", ())
    with pytest.raises(UnknownTaskError, match="empty"):
        match("text:  ")


def test_modality_check():
    assert check_modality(match("liver"), "ct") is None
    assert check_modality(match("liver"), "mri") is None
    problem = check_modality(match("covid-19 infection"), "mri")
    assert problem and "ct" in problem and "not for mri" in problem
    assert check_modality(match("text:anything"), "pet") is None
    assert "tumor" in check_modality(match("liver tumor"), "pet")  # closest pet terms


def test_resolve_tasks_builds_one_card_per_prompt():
    from unisegcli.weights.resolver import get_model
    from unisegcli.models.families import needed_roles, resolve_tasks

    card = get_model("sat-nano")
    tasks = resolve_tasks(card, "liver, Liver ,left kidney,L1,text:renal cyst")
    assert [t.name for t in tasks] == ["liver", "left kidney", "lumbar vertebrae 1 (l1)", "renal cyst"]
    assert [t.labels for t in tasks] == [{1: "liver"}, {1: "left_kidney"}, {1: "lumbar_vertebrae_1_l1"},
                                         {1: "renal_cyst"}]
    assert [t.index for t in tasks] == [0, 1, 2, 3]
    assert tasks[3].extra["free_text"] and not tasks[0].extra["free_text"]
    with pytest.raises(UsageError, match="no prompt"):
        resolve_tasks(card, " , ")
    assert "text_encoder" in needed_roles(card, tasks)  # nothing prepared in this cache


def test_registry_entries():
    from unisegcli.weights.resolver import get_model

    for name, checkpoint in (("sat-nano", "nano.pth"), ("sat-pro", "SAT_Pro.pth")):
        card = get_model(name)
        assert card.family == "sat" and card.license.startswith("not specified by the authors")
        assert card.file("checkpoint").name == checkpoint
        assert all(f.sha256 is None and f.size_bytes is None for f in card.files)
        assert card.file("text_encoder").urls[0].startswith("https://huggingface.co/zzh99/SAT/")
        assert "GB" in card.note  # GPU memory needs shown by `uniseg models`


def test_cli_tasks_lists_the_vocabulary():
    from typer.testing import CliRunner

    from unisegcli.cli.app import app

    res = CliRunner().invoke(app, ["tasks", "--model", "sat-nano"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for term in ("left hippocampus", "covid-19 infection", "head and neck tumor"):
        assert term in res.output
    res = CliRunner().invoke(app, ["weights", "prepare", "uniseg-demo"])
    assert res.exit_code != 0 and "nothing to prepare" in res.output


def test_task_table_rows():
    from unisegcli.weights.resolver import get_model
    from unisegcli.models.families import task_table

    columns, rows = task_table(get_model("sat-pro"))
    assert len(rows) == 498 and columns[0] == "modality"
    assert [r[0] for r in rows].count("pet") == 3
    assert ["ct", "liver tumor"] in [r[:2] for r in rows if r[3] == "lesion"]


# -- SAT's pre/post conventions against upstream results -------------------------------------


@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_normalisation_matches_upstream(modality):
    from unisegcli.models.sat.pipeline import normalize

    files = MANIFEST["helpers"]["normalization"][modality]
    x = np.load(TINY / files["input"]["file"])
    np.testing.assert_allclose(normalize(x, modality), np.load(TINY / files["expected"]["file"]),
                               atol=1e-5, rtol=0)


def test_gaussian_matches_upstream():
    """SAT's compute_gaussian (float16) is SAT's blending map, in (x, y, z) order (the released
    288 x 288 x 96 map: tests/test_sat_fidelity.py)."""
    from unisegcli.models.sat.placement import blending_weights

    tile = MANIFEST["helpers"]["gaussian_tile"]
    expected = np.load(TINY / tile["file"])  # (H, W, D) = (x, y, z)
    ours = blending_weights(tuple(reversed(tile["shape"]))).numpy()  # (z, y, x)
    np.testing.assert_array_equal(ours.transpose(2, 1, 0), expected.astype(np.float32))


def test_engine_windows_cover_like_split_3d():
    """nnU-Net's placement (a card's ``placement: nnunet``): the same number of windows per axis
    as SAT's split_3d, first at 0, last ending at the border (SAT's own placement reproduces
    split_3d exactly: tests/test_sat_fidelity.py)."""
    from unisegcli.inference.tiling import compute_steps

    cases = json.loads((TINY / MANIFEST["helpers"]["split_3d"]["file"]).read_text())
    for case in cases:
        size = case["chwd"][1:]
        crop = case["crop_size"]
        boxes = np.array(case["windows_h1h2_w1w2_d1d2"])
        for axis in range(3):
            starts = sorted(set(boxes[:, 2 * axis]))
            ends = sorted(set(boxes[:, 2 * axis + 1]))
            padded, patch = max(size[axis], crop[axis]), crop[axis]
            ours = compute_steps([padded], [patch], 0.5)[0]
            assert len(ours) == len(starts), (case["chwd"], axis)
            assert ours[0] == starts[0] == 0
            assert ours[-1] + patch == max(ends) + max(0, patch - size[axis])
    n_windows = [math.prod(len(set(np.array(c["windows_h1h2_w1w2_d1d2"])[:, 2 * a])) for a in range(3))
                 for c in cases]
    assert n_windows == [len(c["windows_h1h2_w1w2_d1d2"]) for c in cases]


def test_modality_guess():
    from unisegcli.models.sat.pipeline import guess_modality

    ct = np.full((1, 20, 20, 20), -1000.0, dtype=np.float32)
    ct[:, 5:15, 5:15, 5:15] = 40.0
    mri = np.abs(np.random.default_rng(0).normal(300, 100, (1, 20, 20, 20))).astype(np.float32)
    assert guess_modality(ct) == "ct" and guess_modality(mri) == "mri"


def test_cpu_warning_for_released_windows_only():
    import torch

    from unisegcli.models.sat.family import cpu_warning

    message = cpu_warning(torch.device("cpu"), (288, 288, 96), 8, 3)
    assert message and "8 window(s)" in message and "3 prompt(s)" in message
    assert cpu_warning(torch.device("cuda"), (288, 288, 96), 8, 3) is None
    assert cpu_warning(torch.device("cpu"), (64, 64, 32), 8, 3) is None


def test_listing_the_vocabulary_does_not_import_torch():
    """`uniseg tasks --model sat-nano` stays light: no torch, no transformers (own process)."""
    import subprocess
    import sys

    code = ("import sys; from unisegcli.weights.resolver import get_model; "
            "from unisegcli.models.families import task_table, resolve_tasks; "
            "card = get_model('sat-nano'); task_table(card); resolve_tasks(card, 'liver,L1'); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
