"""The embedded demo model ``uniseg-demo``: registry entry, shipped files, loader, end to end.

The end-to-end tests segment tests/data/example_ct.nii.gz, which is THE scan the demo model
was trained on (scripts/train_demo.py). High Dice and matching volumes there prove that the
pipeline is right — reorientation, crop, resampling, normalisation, sliding window and the
restore to the input's geometry, each of which would cost Dice if it were off by a voxel, a
flip or an intensity scale — not that the model generalises: it has seen one scan. Views of
that scan that training never saw (scripts/evaluate_demo.py: a larger field of view, the
anatomy at 1.25x its size) check that the augmented training made it robust to acquisition.

The reference segmentation (example_ct_seg.nii.gz) is a TotalSegmentator output, Apache-2.0
(tests/data/LICENSE-NOTE.md); label ids follow TotalSegmentator's ``class_map["total"]``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_same_geometry
from unisegcli.weights.resolver import get_model

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
CT = DATA / "example_ct.nii.gz"
EXAMPLE_CT = ROOT / "examples" / "example_ct.nii.gz"  # what `make demo` segments
SEG = DATA / "example_ct_seg.nii.gz"
DEMO = "uniseg-demo"
NOTE = "demo only — trained on one scan, not for research or clinical use"
# example_ct_seg.nii.gz label ids (TotalSegmentator class_map["total"]) per demo structure
REFERENCE_LABELS = {"liver": (5,), "spleen": (1,), "kidney": (2, 3), "pancreas": (7,)}
# Dice floors on the training scan: model 1.1 reaches 0.954 / 0.948 / 0.841 / 0.963 (1.0, trained
# without augmentation: 0.975 / 0.974 / 0.947 / 0.979; the floor was 0.80 for every structure).
MIN_DICE = {"liver": 0.90, "kidney": 0.90, "pancreas": 0.80, "spleen": 0.90}
MAX_VOLUME_ERROR = 0.10  # 1.1: +1.7 / +4.7 / +3.6 / +3.9 %
# Dice floors on held-back views (scripts/evaluate_demo.py): what model 1.0 (trained with
# augmentation) reaches on this machine, minus about 0.05 (other CPUs, torch builds).
HELD_BACK_MIN_DICE = {
    # 1.1 reaches 0.957 / 0.948 / 0.840 / 0.962 here (1.0: 0.797 / 0.611 / 0.460 / 0.411)
    "larger FOV (+24 vox air in-plane, +6 slices)": {"liver": 0.90, "kidney": 0.90, "pancreas": 0.78, "spleen": 0.90},
    # 1.1: 0.933 / 0.933 / 0.759 / 0.959 (1.0: 0.876 / 0.728 / 0.224 / 0.649)
    "anatomy 1.25x (spacing 3.75 mm, same voxels)": {"liver": 0.88, "kidney": 0.88, "pancreas": 0.70, "spleen": 0.90},
}


def load_script(name: str = "train_demo"):
    """scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def reference() -> tuple[dict[str, np.ndarray], float]:
    """{structure: bool [Z, Y, X]} in internal orientation, and the voxel volume in ml."""
    from unisegcli.io.nifti import read_scan

    seg = read_scan(SEG)
    voxel_ml = abs(float(np.linalg.det(seg.image.affine[:3, :3]))) / 1000.0
    return {name: np.isin(seg.data[0], ids) for name, ids in REFERENCE_LABELS.items()}, voxel_ml


def check_scores(predicted: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Assert Dice and volume per structure; return {structure: (dice, relative volume error)}."""
    truth, _ = reference()
    scores = {}
    for name, mask in truth.items():
        d = dice(predicted[name], mask)
        error = (predicted[name].sum() - mask.sum()) / mask.sum()
        scores[name] = (d, error)
    failed = {n: s for n, s in scores.items() if s[0] < MIN_DICE[n] or abs(s[1]) > MAX_VOLUME_ERROR}
    assert not failed, f"(Dice, volume error) below the bar: {failed}; all: {scores}"
    return scores


# -- registry and files -------------------------------------------------------------------


def test_registry_entry_describes_the_demo_model() -> None:
    card = get_model(DEMO)
    assert card.family == "uniseg" and card.version == "1.1" and card.packaged
    # the note (printed at every run) stays the warning; the evaluation quotes the held-back
    # views' Dice (checked against a rerun by the slow test below)
    assert card.note == NOTE
    assert card.evaluation and "scripts/evaluate_demo.py" in card.evaluation
    assert card.source == "trained by scripts/train_demo.py"
    assert "Apache-2.0" in card.license
    # Same prompts as the released model: each demo task uses the released task's index.
    released = get_model("uniseg")
    assert {t.name: t.index for t in card.tasks} == {"liver": 0, "kidney": 1, "pancreas": 3, "spleen": 6}
    for task in card.tasks:
        assert task.index == released.task(task.name).index
        assert task.labels == {1: task.name} and task.num_classes == 2
        assert task.channels == ("ct",) and task.spacing_mm == (3.0, 3.0, 3.0)
        assert task.normalization == released.task(task.name).normalization
    assert card.task("kidneys").name == "kidney"
    for f in card.files:
        assert f.urls == () and f.sha256 is not None and f.size_bytes is not None, f.name
    assert {f.role: f.name for f in card.files} == {"checkpoint": "model.safetensors", "config": "config.json"}


def test_registry_network_is_the_script_plans_and_the_shipped_config() -> None:
    from unisegcli.weights.cache import model_dir
    from unisegcli.models.uniseg import UniSegConfig

    card = get_model(DEMO)
    config = UniSegConfig.from_dict(card.network)
    assert config == load_script().DEMO_CONFIG
    shipped = json.loads((model_dir(card) / "config.json").read_text(encoding="utf-8"))
    assert UniSegConfig.from_dict(shipped) == config
    released = UniSegConfig.default()
    assert (config.num_tasks, config.num_classes) == (released.num_tasks, released.num_classes)
    assert config.input_channel_options == released.input_channel_options


def test_shipped_files_match_the_registry() -> None:
    from unisegcli.weights.cache import find_model_files, verify_model

    card = get_model(DEMO)
    checks = verify_model(card)
    assert [(c.name, c.status, c.reference) for c in checks] == [
        ("model.safetensors", "ok", "registry"),
        ("config.json", "ok", "registry"),
    ]
    files = find_model_files(card, offline=True)
    assert files["checkpoint"].stat().st_size <= 5 * 1024 * 1024


def test_shipped_weights_load_with_the_official_loader() -> None:
    from safetensors import safe_open

    from unisegcli.weights.download import ensure_model
    from unisegcli.models.uniseg import UniSegConfig, UniSegNet, load_uniseg

    card = get_model(DEMO)
    files = ensure_model(card, offline=True)  # packaged: found, never downloaded
    net = load_uniseg(files["checkpoint"])  # the loader of the released checkpoint
    assert isinstance(net, UniSegNet) and not net.training
    assert net.config == UniSegConfig.from_dict(card.network)
    with safe_open(str(files["checkpoint"]), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["model"] == DEMO and metadata["note"] == NOTE


# -- end to end ---------------------------------------------------------------------------


def test_demo_example_is_the_training_scan() -> None:
    """`make demo` segments the very scan the demo model was trained on (see the docstring)."""
    assert EXAMPLE_CT.read_bytes() == CT.read_bytes()


def test_predictor_segments_the_training_scan() -> None:
    """Library path: predict_case with the shipped network (same as the CLI, minus writing)."""
    import torch

    from unisegcli.models.uniseg.predictor import predict_case
    from unisegcli.io.nifti import read_scan
    from unisegcli.weights.cache import find_model_files
    from unisegcli.models.uniseg import load_uniseg

    card = get_model(DEMO)
    net = load_uniseg(find_model_files(card)["checkpoint"])
    scan = read_scan(CT)
    threads = torch.get_num_threads()
    # One thread: pytest's process cannot switch OpenMP to passive waiting any more, and
    # busy-waiting threads crawl when another process holds a core.
    torch.set_num_threads(1)
    try:
        labels = predict_case(scan.data, scan.spacing_mm, card.tasks, net, device="cpu", batch_size=2)
    finally:
        torch.set_num_threads(threads)
    check_scores({name: labels[name] == 1 for name in REFERENCE_LABELS})


def test_predictor_segments_views_training_never_saw() -> None:
    """The issue-24 failure: model 1.0 without augmentation kept kidney 0.61 and spleen 0.41 on
    the larger field of view and pancreas 0.22 at 1.25x size. Floors: HELD_BACK_MIN_DICE."""
    import torch

    from unisegcli.io.nifti import read_scan
    from unisegcli.models.uniseg import load_uniseg
    from unisegcli.models.uniseg.predictor import predict_case
    from unisegcli.weights.cache import find_model_files

    views = load_script("evaluate_demo").views(seed=0)
    card = get_model(DEMO)
    net = load_uniseg(find_model_files(card)["checkpoint"])
    scan, labels = read_scan(CT), np.rint(read_scan(SEG).data[0]).astype(np.int16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_predictor_segments_the_training_scan
    scores = {}
    try:
        for name in HELD_BACK_MIN_DICE:
            image, truth, spacing = views[name](scan.data[0], labels, scan.spacing_mm)
            predicted = predict_case(image[None], spacing, card.tasks, net, device="cpu", batch_size=2)
            scores[name] = {s: dice(predicted[s] == 1, np.isin(truth, ids)) for s, ids in REFERENCE_LABELS.items()}
    finally:
        torch.set_num_threads(threads)
    failed = {(v, s): round(d, 3) for v, floors in HELD_BACK_MIN_DICE.items() for s, d in scores[v].items()
              if d < floors[s]}
    assert not failed, f"Dice below the floor: {failed}; all: {scores}"


def test_cli_segments_the_training_scan_offline(tmp_path: Path) -> None:
    """`make demo`'s command as a real subprocess, offline, with an empty weights cache: the
    demo needs no download. Masks match the reference and carry the input's exact geometry."""
    import nibabel as nib

    from unisegcli.io.nifti import read_scan

    out = tmp_path / "out"
    env = {**os.environ, "UNISEG_HOME": str(tmp_path / "home"), "UNISEG_OFFLINE": "1", "COLUMNS": "250"}
    done = subprocess.run(
        [sys.executable, "-m", "unisegcli", str(EXAMPLE_CT), "-o", str(out), "--model", DEMO,
         "--tasks", "liver,spleen,kidney,pancreas", "--preview"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert NOTE in re.sub(r"\s+", " ", done.stderr), "the run must show the demo note"
    assert not (tmp_path / "home" / "models").exists(), "a packaged model must not touch the cache"
    assert (out / "preview.png").stat().st_size > 0

    source = nib.load(str(EXAMPLE_CT))
    predicted = {}
    for name in REFERENCE_LABELS:
        mask_file = out / f"{name}.nii.gz"
        image = nib.load(str(mask_file))
        assert image.shape == source.shape
        assert_same_geometry(image, source)
        predicted[name] = read_scan(mask_file).data[0] > 0  # same internal orientation as the reference
    check_scores(predicted)


def test_models_command_shows_the_demo_note() -> None:
    from typer.testing import CliRunner

    from unisegcli.cli.app import app

    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert DEMO in result.output and NOTE in result.output


def test_models_name_shows_the_evaluation_and_runs_do_not() -> None:
    """`uniseg models uniseg-demo` shows the held-back Dice; the note printed per run is short."""
    from typer.testing import CliRunner

    from unisegcli.cli.app import app

    card = get_model(DEMO)
    shown = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["models", DEMO])
    assert shown.exit_code == 0, shown.output
    assert "evaluation:" in shown.output and "Mean (worst) Dice" in re.sub(r"\s+", " ", shown.output)
    listed = CliRunner().invoke(app, ["models", "--json"])
    record = next(r for r in json.loads(listed.stdout) if r["model"] == DEMO)
    assert record["evaluation"] == card.evaluation and record["note"] == NOTE


# -- retraining ---------------------------------------------------------------------------


@pytest.mark.slow
def test_card_note_quotes_the_evaluation_script() -> None:
    """The numbers in the card's note are scripts/evaluate_demo.py's for the shipped model.

    Slow: 13 views (1-3 min on 2 CPU cores). Same machine and torch build give the same
    numbers; other CPUs may differ in the last bits, hence 0.01.
    """
    import torch

    evaluate_demo = load_script("evaluate_demo")
    card = get_model(DEMO)
    quoted = re.search(r"this model: (liver [^;]*)", card.evaluation or "")
    assert quoted, card.evaluation
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from unisegcli.weights.cache import find_model_files

        scores = evaluate_demo.evaluate(find_model_files(card)["checkpoint"], seed=0)
    finally:
        torch.set_num_threads(threads)
    pattern = r"(\w+) (\d\.\d+) \((\d\.\d+)\)"
    expected = {m[0]: (float(m[1]), float(m[2])) for m in re.findall(pattern, quoted.group(1))}
    measured = {m[0]: (float(m[1]), float(m[2])) for m in re.findall(pattern, evaluate_demo.summary(scores))}
    assert set(expected) == set(REFERENCE_LABELS) and set(measured) == set(expected)
    for name in expected:
        assert np.allclose(measured[name], expected[name], atol=0.01), (name, measured, expected)


@pytest.mark.slow
def test_retraining_reproduces_the_shipped_dice(tmp_path: Path) -> None:
    """scripts/train_demo.py with its defaults gives the shipped model's Dice within 0.02.

    Slow: the whole training (1800 steps, 25-50 min on one CPU core), so `make test` and CI
    exclude it; run it with `.venv/bin/pytest -m slow tests/test_demo.py`. The same CPU type,
    thread count (1) and torch build give identical tensors; other CPUs may differ in the last
    bits and then train a slightly different network, hence the Dice tolerance.
    """
    import torch

    from unisegcli.models.uniseg.predictor import predict_case
    from unisegcli.io.nifti import read_scan
    from unisegcli.weights.cache import find_model_files
    from unisegcli.models.uniseg import load_uniseg

    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_demo.py"), "--out", str(tmp_path), "--threads", "1"],
        capture_output=True, text=True, timeout=3600,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    card = get_model(DEMO)
    shipped = find_model_files(card)["checkpoint"]
    retrained = tmp_path / "model.safetensors"
    same_bytes = shipped.read_bytes() == retrained.read_bytes()
    scan = read_scan(CT)
    truth, _ = reference()
    scores = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_predictor_segments_the_training_scan
    try:
        for which, path in (("shipped", shipped), ("retrained", retrained)):
            labels = predict_case(scan.data, scan.spacing_mm, card.tasks, load_uniseg(path), device="cpu", batch_size=2)
            scores[which] = {name: dice(labels[name] == 1, truth[name]) for name in REFERENCE_LABELS}
    finally:
        torch.set_num_threads(threads)
    for name in REFERENCE_LABELS:
        assert abs(scores["retrained"][name] - scores["shipped"][name]) <= 0.02, (scores, f"same bytes: {same_bytes}")
