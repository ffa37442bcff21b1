"""Several models per run (``--model a,b``) and ``--compare``: which model gives which structure,
options shared out by family, each model loaded once and run once per case, merged files,
statistics, labels and markers, and Dice / volume differences between models."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

import unisegcli.session
from conftest import DATA, ThresholdNet, phantom_ct, save_nifti
from test_workers import outputs_of, worker_hook  # noqa: F401  (the spawned workers' stand-in network)
from unisegcli.assignment import assign, split_models
from unisegcli.cli.app import app
from unisegcli.combination import Combination, segmenter_for
from unisegcli.errors import ExitCode, UnknownModelError, UnknownTaskError, UsageError
from unisegcli.outputs.comparison import compare_structure, dice
from unisegcli.outputs.writer import OutputOptions
from unisegcli.session import Segmenter
from unisegcli.weights.resolver import get_model

runner = CliRunner()
DEMO = "uniseg-demo"
NNUNET = "nnunet:" + str(DATA / "nnunetv2_tiny" / "Dataset999_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres")
AFFINE = np.diag([-1.5, -1.5, 3.0, 1.0])


def cards(*names: str) -> dict:
    return {name: get_model(name) for name in names}


def events_of(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


class DimNet(ThresholdNet):
    """Like ThresholdNet, but class 1 only where the normalised CT is > 0.85 (above ~228 HU): a
    smaller mask of the same phantom, so two models disagree by a known part of the scan."""

    def decode(self, features, task_index):
        import torch

        self.decode_calls += 1
        score = (features[:, :1] - 0.85) * 20.0
        return torch.cat([-score, score, -score - 10.0, -score - 10.0], dim=1)


@pytest.fixture
def two_nets(monkeypatch) -> dict[str, int]:
    """uniseg gets a ThresholdNet, uniseg-demo a DimNet; returns loads counted per model."""
    loads: dict[str, int] = {}

    def load(segmenter):
        loads[segmenter.card.name] = loads.get(segmenter.card.name, 0) + 1
        return DimNet() if segmenter.card.name == DEMO else ThresholdNet()

    monkeypatch.setattr(unisegcli.session, "load_network", load)
    return loads


def two_level_ct(shape=(40, 36, 12)) -> np.ndarray:
    """A bright 300 HU box inside a dimmer 150 HU slab on -500 HU: the models see different extents."""
    data = np.full(shape, -500.0, dtype=np.float32)
    data[8:30, 6:24, 2:10] = 150.0
    data[12:24, 10:20, 3:8] = 300.0
    return data


# -- who gives which structure ------------------------------------------------------------------


def test_each_task_comes_from_the_first_model_that_has_it() -> None:
    picks = assign(cards("uniseg", DEMO), "spleen,liver,lung").picks
    assert [(p.model, p.task.name) for p in picks] == [("uniseg", "spleen"), ("uniseg", "liver"),
                                                       ("uniseg", "lung_tumor")]
    picks = assign(cards(DEMO, "uniseg"), "spleen,liver,lung").picks
    assert [(p.model, p.task.name) for p in picks] == [(DEMO, "spleen"), (DEMO, "liver"), ("uniseg", "lung_tumor")]


def test_model_colon_task_picks_the_model_also_for_nnunet_paths() -> None:
    found = assign(cards(DEMO, NNUNET), f"pancreas,{NNUNET}:liver,uniseg-demo:kidney").picks
    assert [(p.model, p.task.name) for p in found] == [(DEMO, "pancreas"), (NNUNET, "liver"), (DEMO, "kidney")]
    hermes = assign(cards("uniseg", "hermes"), "hermes:bcv:liver,bcv:spleen").picks  # Hermes' own colon
    assert [(p.model, p.task.extra.get("dataset"), p.task.structures) for p in hermes] == [
        ("hermes", "bcv", ("bcv_liver",)), ("hermes", "bcv", ("bcv_spleen",))]


def test_a_task_no_model_has_lists_what_each_model_offers() -> None:
    with pytest.raises(UnknownTaskError) as caught:
        assign(cards(DEMO, NNUNET), "liver,pancreaz")
    message = str(caught.value)
    assert "'pancreaz'" in message and "did you mean 'pancreas'" in message and "\n" not in message
    assert "uniseg-demo offers liver, kidney, pancreas, spleen" in message
    assert f"{NNUNET} offers liver, spleen, kidney" in message


def test_an_unknown_model_before_a_colon_is_a_usage_error() -> None:
    with pytest.raises(UnknownModelError, match=r"'unisge' in --tasks 'unisge:liver' is not one of the models.*"
                                                r"did you mean 'uniseg'"):
        assign(cards("uniseg", DEMO), "unisge:liver")


def test_one_structure_from_two_models_is_refused_with_the_compare_hint() -> None:
    with pytest.raises(UsageError, match=r"structure 'liver' would come from both 'uniseg' \(task liver\) and "
                                         r"'uniseg-demo' \(task liver\).*--compare liver"):
        assign(cards("uniseg", DEMO), "liver,uniseg-demo:liver")


def test_compare_runs_the_structure_on_every_model_that_has_it() -> None:
    found = assign(cards(DEMO, "uniseg", NNUNET), "spleen", compare=["liver"])
    assert [(p.model, p.task.name, p.written) for p in found.picks] == [
        (DEMO, "spleen", True), (DEMO, "liver", True), ("uniseg", "liver", False), (NNUNET, "liver", False)]
    assert found.compared[0].sources == ((DEMO, "liver", "liver"), ("uniseg", "liver", "liver"),
                                         (NNUNET, "liver", "liver"))
    with pytest.raises(UsageError, match="--compare pancreas: only 'uniseg-demo' of the models"):
        assign(cards(DEMO, NNUNET), "liver", compare=["pancreas"])


def test_model_lists_and_compare_need_sense() -> None:
    assert split_models(" uniseg , uniseg-demo ") == ["uniseg", "uniseg-demo"]
    with pytest.raises(UsageError, match="names 'uniseg' twice"):
        split_models("uniseg,uniseg")
    with pytest.raises(UsageError, match="--compare needs two or more models"):
        segmenter_for("uniseg", "liver", compare="liver")
    assert isinstance(segmenter_for(DEMO, "liver"), Segmenter)


# -- options -------------------------------------------------------------------------------------


def test_an_option_goes_to_the_models_that_declare_it() -> None:
    with Combination([DEMO, NNUNET], f"pancreas,{NNUNET}:liver", options={"folds": (0,), "gaussian": False}) as combo:
        demo, nnunet = combo.members[DEMO], combo.members[NNUNET]
        assert "folds" not in demo.settings.options and "gaussian" not in demo.settings.options
        assert nnunet.settings.options["folds"] == (0,) and nnunet.settings.options["gaussian"] is False
        assert combo.loads == 0  # nothing loads before the first case


def test_an_option_no_model_of_the_run_takes_is_one_usage_error(tmp_path: Path) -> None:
    path = save_nifti(tmp_path / "ct.nii.gz", phantom_ct(), AFFINE)
    out = tmp_path / "out"
    result = runner.invoke(app, [str(path), "-o", str(out), "--model", f"uniseg,{DEMO},{NNUNET}", "--tasks",
                                 "liver,spleen", "--folds", "0"])
    assert result.exit_code == ExitCode.USAGE
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--folds does not apply to any model of this run (uniseg)" in lines[0]
    assert f"no structure comes from {DEMO}, {NNUNET}" in lines[0]
    assert not out.exists()


# -- Dice and volumes ----------------------------------------------------------------------------


def test_dice_and_volume_difference_of_masks_with_a_known_overlap() -> None:
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros((10, 10, 10), bool)
    a[0:4] = True  # 400 voxels
    b[2:8] = True  # 600 voxels, 200 shared
    assert dice(a, b) == pytest.approx(2 * 200 / 1000)
    record = compare_structure({"m1": a, "m2": b}, {"m1": "liver", "m2": "liver"}, voxel_ml=0.5)
    pair = record["pairs"][0]
    assert (pair["voxels_a"], pair["voxels_b"], pair["voxels_both"]) == (400, 600, 200)
    assert pair["volume_difference_ml"] == pytest.approx(100.0)
    assert pair["volume_difference_percent"] == pytest.approx(50.0)
    empty = np.zeros_like(a)
    assert dice(empty, empty) is None and dice(a, empty) == 0.0
    assert compare_structure({"m1": empty, "m2": b}, {}, 1.0)["pairs"][0]["volume_difference_percent"] is None


def test_compare_reports_the_dice_of_the_models_own_masks(two_nets) -> None:
    image = nib.Nifti1Image(two_level_ct(), AFFINE)
    with Segmenter("uniseg", "liver") as alone_a, Segmenter(DEMO, "liver") as alone_b:
        mask_a = alone_a.predict(image).masks["liver"].astype(bool)
        mask_b = alone_b.predict(image).masks["liver"].astype(bool)
    assert mask_a.sum() > mask_b.sum() > 0 and dice(mask_a, mask_b) < 0.9  # the models disagree
    with Combination(["uniseg", DEMO], "spleen", compare="liver") as combo:
        result = combo.predict(image)
    pair = result.comparison["structures"]["liver"]["pairs"][0]
    assert (pair["model_a"], pair["model_b"]) == ("uniseg", DEMO)
    assert pair["dice"] == pytest.approx(dice(mask_a, mask_b), abs=1e-12)
    assert (pair["voxels_a"], pair["voxels_b"]) == (int(mask_a.sum()), int(mask_b.sum()))
    np.testing.assert_array_equal(result.masks["liver"], mask_a)  # written from the first model
    assert result.model_of == {"spleen": "uniseg", "liver": "uniseg", "liver_tumor": "uniseg"}


# -- a batch through the command line -----------------------------------------------------------


def cohort(folder: Path, count: int = 2) -> Path:
    folder.mkdir(parents=True)
    for k in range(count):
        data = two_level_ct()
        data[2 + k:8 + k, 26:34, 2:10] = 300.0  # a second bright piece (moves per case): "fragmented"
        save_nifti(folder / f"case{k:02d}.nii.gz", data, AFFINE)
    return folder


def test_a_batch_merges_files_statistics_labels_and_compare_per_model(tmp_path: Path, two_nets) -> None:
    inputs, out = cohort(tmp_path / "in"), tmp_path / "out"
    args = [str(inputs), "-o", str(out), "--model", f"uniseg,{DEMO}", "--tasks", f"liver,{DEMO}:spleen",
            "--compare", "liver", "--multilabel", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert two_nets == {"uniseg": 1, DEMO: 1}  # each model loaded once for the two cases
    events = events_of(result.stdout)
    started = next(e for e in events if e["event"] == "run_started")
    versions = f"{get_model('uniseg').version},{get_model(DEMO).version}"  # each model's own, in --model order
    assert (started["model"], started["version"]) == (f"uniseg,{DEMO}", versions)
    done = [e for e in events if e["event"] == "case_done"]
    assert len(done) == 2
    for event in done:
        case = out / event["case_id"]
        assert sorted(p.name for p in case.iterdir() if not p.name.startswith(".")) == sorted([
            "liver.nii.gz", "liver_tumor.nii.gz", "spleen.nii.gz", "segmentation.nii.gz", "labels.json",
            "statistics.json", "statistics.csv", "compare.json", "compare.csv"])
        statistics = json.loads((case / "statistics.json").read_text())
        assert {n: (s["task"], s["model"]) for n, s in statistics["structures"].items()} == {
            "liver": ("liver", "uniseg"), "liver_tumor": ("liver", "uniseg"), "spleen": ("spleen", DEMO)}
        rows = list(csv.DictReader(io.StringIO((case / "statistics.csv").read_text())))
        assert [(r["structure"], r["model"]) for r in rows] == [("liver", "uniseg"), ("liver_tumor", "uniseg"),
                                                                ("spleen", DEMO)]
        labels = json.loads((case / "labels.json").read_text())["labels"]
        assert {i: (e["name"], e["model"]) for i, e in labels.items()} == {
            "1": ("liver", "uniseg"), "2": ("liver_tumor", "uniseg"), "3": ("spleen", DEMO)}
        compare = json.loads((case / "compare.json").read_text())["structures"]["liver"]
        assert event["compare"] == {"liver": compare["pairs"]}
        liver = np.asarray(nib.load(str(case / "liver.nii.gz")).dataobj).astype(bool)
        assert compare["models"]["uniseg"]["voxel_count"] == int(liver.sum())
        with Segmenter(DEMO, "liver,spleen") as alone:  # the other model's own masks, for the expected numbers
            own = alone.predict(inputs / f"{event['case_id']}.nii.gz").masks
        spleen = np.asarray(nib.load(str(case / "spleen.nii.gz")).dataobj)
        np.testing.assert_array_equal(spleen, own["spleen"])
        assert compare["pairs"][0]["dice"] == pytest.approx(dice(liver, own["liver"].astype(bool)), abs=1e-12)
        assert 0.0 < compare["pairs"][0]["dice"] < 1.0
    cohort_rows = list(csv.DictReader(io.StringIO((out / "compare.csv").read_text())))
    assert [(r["case_id"], r["structure"], r["model_a"], r["model_b"]) for r in cohort_rows] == [
        ("case00", "liver", "uniseg", DEMO), ("case01", "liver", "uniseg", DEMO)]
    assert {r["case_id"]: float(r["dice"]) for r in cohort_rows} == {
        e["case_id"]: e["compare"]["liver"][0]["dice"] for e in done}
    assert "model" in next(csv.DictReader(io.StringIO((out / "statistics.csv").read_text())))
    flagged = list(csv.DictReader(io.StringIO((out / "qc.csv").read_text())))
    fragmented = {(r["case_id"], r["structure"], r["model"]) for r in flagged if "fragmented" in r["flags"]}
    assert fragmented >= {("case00", "liver", "uniseg"), ("case00", "spleen", DEMO)}
    marker = json.loads((out / "case00" / ".uniseg-done.json").read_text())
    assert [(m["model"], m["version"], m["tasks"], m["written"]) for m in marker["options"]["models"]] == [
        ("uniseg", get_model("uniseg").version, ["liver"], ["liver"]),
        (DEMO, get_model(DEMO).version, ["spleen", "liver"], ["spleen"])]
    again = runner.invoke(app, args)
    assert [e["event"] for e in events_of(again.stdout)].count("case_skipped") == 2
    swapped = runner.invoke(app, [*args[:4], f"{DEMO},uniseg", *args[5:]])  # other order: other liver
    assert swapped.exit_code == 0, swapped.output
    assert [e["event"] for e in events_of(swapped.stdout)].count("case_done") == 2
    statistics = json.loads((out / "case00" / "statistics.json").read_text())
    assert statistics["structures"]["liver"]["model"] == DEMO


def test_compare_with_one_model_is_a_usage_error_and_writes_nothing(tmp_path: Path) -> None:
    path = save_nifti(tmp_path / "ct.nii.gz", phantom_ct(), AFFINE)
    out = tmp_path / "out"
    result = runner.invoke(app, [str(path), "-o", str(out), "--model", DEMO, "--tasks", "liver", "--compare", "liver"])
    assert result.exit_code == ExitCode.USAGE
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--compare needs two or more models" in lines[0]
    assert not out.exists()


# -- two families with their real weights ---------------------------------------------------------


@pytest.fixture(scope="module")
def demo_crop(tmp_path_factory) -> Path:
    """A crop of the example CT (the demo model's training scan)."""
    image = nib.load(str(DATA / "example_ct.nii.gz"))
    crop = np.asarray(image.dataobj)[30:94, 24:88, 4:20].astype(np.int16)
    return save_nifti(tmp_path_factory.mktemp("crop") / "crop.nii.gz", crop, image.affine)


def test_an_nnunet_folder_and_the_demo_model_combine(tmp_path: Path, demo_crop: Path, single_thread) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, [str(demo_crop), "-o", str(out), "--model", f"{NNUNET},{DEMO}", "--tasks",
                                 "liver,pancreas", "--compare", "liver", "--folds", "0", "-q"])
    assert result.exit_code == 0, result.output
    with Segmenter(NNUNET, "liver", options={"folds": (0,)}) as nnunet, Segmenter(DEMO, "pancreas,liver") as demo:
        own_nnunet, own_demo = nnunet.predict(demo_crop).masks, demo.predict(demo_crop).masks
    for name, expected in (("liver", own_nnunet["liver"]), ("pancreas", own_demo["pancreas"])):
        np.testing.assert_array_equal(np.asarray(nib.load(str(out / f"{name}.nii.gz")).dataobj), expected)
    statistics = json.loads((out / "statistics.json").read_text())["structures"]
    assert {n: s["model"] for n, s in statistics.items()} == {"liver": NNUNET, "pancreas": DEMO}
    pair = json.loads((out / "compare.json").read_text())["structures"]["liver"]["pairs"][0]
    assert (pair["model_a"], pair["model_b"]) == (NNUNET, DEMO)
    expected = dice(own_nnunet["liver"].astype(bool), own_demo["liver"].astype(bool))
    assert pair["dice"] == pytest.approx(expected, abs=1e-12)
    assert pair["voxels_b"] == int(own_demo["liver"].sum()) > 0


def test_workers_run_a_combination_and_write_what_one_process_writes(tmp_path: Path, threshold_net,
                                                                       worker_hook) -> None:
    inputs = cohort(tmp_path / "in", count=3)
    args = ["--model", f"uniseg,{DEMO}", "--tasks", "liver,spleen", "--compare", "liver"]
    serial = runner.invoke(app, [str(inputs), "-o", str(tmp_path / "serial"), *args, "-q"])
    assert serial.exit_code == 0, serial.output
    parallel = runner.invoke(app, [str(inputs), "-o", str(tmp_path / "par"), *args, "--workers", "2", "--json"])
    assert parallel.exit_code == 0, parallel.output
    done = [e for e in events_of(parallel.stdout) if e["event"] == "case_done"]
    assert sorted(e["case_id"] for e in done) == ["case00", "case01", "case02"] and all("compare" in e for e in done)
    a, b = outputs_of(tmp_path / "serial"), outputs_of(tmp_path / "par")
    assert a.keys() == b.keys() and "compare.csv" in a and "case00/compare.json" in a
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


def test_the_one_call_api_takes_several_models_and_compare(tmp_path: Path, two_nets) -> None:
    from unisegcli.api import segment

    path = save_nifti(tmp_path / "ct.nii.gz", two_level_ct(), AFFINE)
    result = segment([path], "spleen", model=f"uniseg,{DEMO}", compare=["liver"], output=tmp_path / "out")
    assert result.exit_code == 0 and result.model.name == f"uniseg,{DEMO}"
    assert set(result.cases[0].compare) == {"liver"} and (tmp_path / "out" / "compare.json").exists()
    assert len((tmp_path / "out" / "compare.csv").read_text().splitlines()) == 2  # header and one row


@pytest.mark.parametrize("multilabel", [True, False])
def test_stats_reproduces_a_several_model_case(tmp_path: Path, two_nets, multilabel: bool) -> None:
    """`uniseg stats` on a several-model output folder gives its statistics back byte for byte:
    the model of each structure (and the run's order) come from the folder's labels.json; without
    --multilabel there is no such record, so the numbers match but no structure names a model."""
    scan = save_nifti(tmp_path / "ct.nii.gz", two_level_ct(), AFFINE)
    out = tmp_path / "out"
    args = [str(scan), "-o", str(out), "--model", f"uniseg,{DEMO}", "--tasks", f"spleen,{DEMO}:liver", "--quiet"]
    assert runner.invoke(app, args + (["--multilabel"] if multilabel else [])).exit_code == 0
    again = tmp_path / "again"
    result = runner.invoke(app, ["stats", "--image", str(scan), str(out), "-o", str(again), "--channels", "ct", "--quiet"])
    assert result.exit_code == 0, result.output
    ours, theirs = (json.loads((folder / "statistics.json").read_text()) for folder in (out, again))
    assert {s: v.get("model") for s, v in ours["structures"].items()} == {"spleen": "uniseg", "liver": DEMO}
    if multilabel:
        for name in ("statistics.json", "statistics.csv"):
            assert (again / name).read_text() == (out / name).read_text(), name
    else:
        assert all("model" not in v for v in theirs["structures"].values())
        assert {s: v["voxel_count"] for s, v in theirs["structures"].items()} == {
            s: v["voxel_count"] for s, v in ours["structures"].items()}
