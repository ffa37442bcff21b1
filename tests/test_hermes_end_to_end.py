"""The Hermes family end to end: registry cards, task resolution, preprocessing geometry,
the token-list rule, and a full run (random-weight network) writing masks and statistics.

The network is the ``hermes_tiny`` parity fixture (original Hermes code, random weights) run
with 16x32x32 windows, so its masks mean nothing anatomically: the tests check geometry,
files and the conventions, not segmentation quality.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import DATA, make_affine, phantom_ct, save_nifti, use_registry
from unisegcli.api import segment
from unisegcli.models.hermes.family import FAMILY
from unisegcli.errors import UnknownTaskError, UsageError
from unisegcli.weights.cards import REGISTRY_PATH, load_registry
from unisegcli.weights.resolver import get_model
from unisegcli.models.families import resolve_tasks, task_table

TINY = DATA / "hermes_tiny"
WINDOW = [16, 32, 32]
RAW = json.loads(REGISTRY_PATH.read_text())


@pytest.fixture
def hermes_tiny(tmp_path, monkeypatch, single_thread) -> str:
    """Registry model 'hermes-tiny': the shipped Hermes cards + the tiny fixture checkpoint, cached."""
    from unisegcli.weights import cache

    blob = (TINY / "best.pth").read_bytes()
    model = copy.deepcopy(RAW["models"]["hermes"])
    model.update(version="test", network={"window_zyx": WINDOW},
                 files=[{"name": "best.pth", "role": "checkpoint", "urls": [],
                         "sha256": hashlib.sha256(blob).hexdigest(), "size_bytes": len(blob)}])
    use_registry(monkeypatch, tmp_path, {"hermes71": RAW["task_sets"]["hermes71"]}, {"hermes-tiny": model})
    cache.import_model(get_model("hermes-tiny"), TINY)
    return "hermes-tiny"


# -- registry and task names ---------------------------------------------------------------


def test_registry_cards_cover_all_71_task_indices():
    card = load_registry(REGISTRY_PATH)["hermes"]
    assert card.family == "hermes"
    assert sorted({t.index for t in card.tasks}) == list(range(71))
    names = [t.name for t in card.tasks]
    assert len(names) == len(set(names))
    by_dataset: dict[str, list] = {}
    for task in card.tasks:
        by_dataset.setdefault(task.extra["dataset"], []).append(task)
        assert task.extra["structure"] in task.name
        assert task.index in task.extra["dataset_indices"]
    assert {d: [t.index for t in ts] for d, ts in by_dataset.items()} == {
        d: ts[0].extra["dataset_indices"] for d, ts in by_dataset.items()}
    # facts from the spec's index table
    assert [t.index for t in by_dataset["amos_mr"]] == list(range(4, 17))
    assert by_dataset["amos_mr"][0].extra["modality_id"] == -1
    assert by_dataset["autopet"][0].index == 70 and by_dataset["autopet"][0].modality == "PET"
    assert [t.extra["structure"] for t in by_dataset["mnm"]] == [
        "left_ventricle", "left_ventricular_myocardium", "right_ventricle"]
    assert len(by_dataset["structseg_head_oar"]) == 22
    # one default per structure name, and output names never collide
    defaults = [t.extra["structure"] for t in card.tasks if t.extra["default"]]
    assert len(defaults) == len(set(defaults)) == len({t.extra["structure"] for t in card.tasks})
    outputs = [s for t in card.tasks for s in t.structures]
    assert len(outputs) == len(set(outputs))


def test_model_entry_license_source_and_note():
    card = load_registry(REGISTRY_PATH)["hermes"]
    assert card.license.startswith("license: not specified by the authors")
    assert "not against the published Dice table" in card.note
    checkpoint = card.file("checkpoint")
    assert checkpoint.sha256 is None and checkpoint.size_bytes is None
    assert checkpoint.urls == ("https://drive.google.com/uc?export=download&id=1s3Rc5zpgNz9FA2eqKBExaXQ_nsbAPMT8",)
    assert not card.packaged


def test_models_and_tasks_commands_show_hermes(monkeypatch):
    from typer.testing import CliRunner

    from unisegcli.cli.app import app

    monkeypatch.setenv("COLUMNS", "400")
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0
    assert "hermes" in result.stdout and "not specified by the authors" in result.stdout
    assert "published Dice table" in result.stdout
    result = CliRunner().invoke(app, ["tasks", "--model", "hermes"])
    assert result.exit_code == 0
    for name in ("lits_liver", "amos_ct_liver", "amos_mr_liver", "bcv_liver", "chaos_liver"):
        assert name in result.stdout


def test_structure_names_resolve_to_their_default_dataset():
    card = load_registry(REGISTRY_PATH)["hermes"]
    assert [t.name for t in resolve_tasks(card, "liver,spleen")] == ["amos_ct_liver", "amos_ct_spleen"]
    assert [t.name for t in resolve_tasks(card, "bcv:liver, chaos_liver")] == ["bcv_liver", "chaos_liver"]
    assert [t.name for t in resolve_tasks(card, "kidney,ivc")] == ["kits_kidney", "amos_ct_inferior_vena_cava"]
    assert [t.name for t in resolve_tasks(card, "mnm")] == [
        "mnm_left_ventricle", "mnm_left_ventricular_myocardium", "mnm_right_ventricle"]
    with pytest.raises(UnknownTaskError, match="did you mean 'liver'"):
        resolve_tasks(card, "livr")
    columns, rows = task_table(card)
    assert len(rows) == len(card.tasks) == 84
    livers = [r for r in rows if r[1].rstrip(" *") == "liver"]
    assert sorted(r[2] for r in livers) == ["amos_ct", "amos_mr", "bcv", "chaos", "lits"]
    assert [r[2] for r in livers if r[1].endswith("*")] == ["amos_ct"]


def test_chaos_modality_option():
    from unisegcli.models.hermes.family import modality_id

    card = load_registry(REGISTRY_PATH)["hermes"]
    chaos = card.task("chaos_liver")
    assert modality_id(chaos, FAMILY.settings()) == 2
    assert modality_id(chaos, FAMILY.settings({"modality": "t2"})) == 3
    assert modality_id(card.task("amos_mr_liver"), FAMILY.settings()) == -1
    with pytest.raises(UsageError, match="t1, t2"):
        modality_id(chaos, FAMILY.settings({"modality": "pet"}))


# -- preprocessing -------------------------------------------------------------------------


def test_preprocessing_sizes_intensities_and_padding():
    from unisegcli.models.hermes.preprocessing import normalize, preprocess

    card = load_registry(REGISTRY_PATH)["hermes"]
    rng = np.random.default_rng(1)
    image = rng.uniform(-2000, 2000, size=(20, 50, 60)).astype(np.float32)  # (z, y, x)
    volume, grid = preprocess(image, (3.0, 0.9, 0.75), card.task("liver"), torch.device("cpu"))
    assert grid.resampled_shape == (40, 30, 30)  # round(n * spacing / 1.5)
    # every axis < 128 is padded on both sides by ceil((128 - n) / 2)
    assert grid.padding == ((44, 44), (49, 49), (49, 49))
    assert tuple(volume.shape) == (1, 128, 128, 128)
    inner = volume[0, 44:84, 49:79, 49:79].double()
    assert abs(float(inner.mean())) < 1e-5 and abs(float(inner.std(correction=0)) - 1) < 1e-5
    assert float(volume[0, :44].abs().max()) == 0.0
    # CT clip [-991, 500] before the z-score: the extremes map to the clip values' z-scores
    x = torch.tensor([-3000.0, -991.0, 0.0, 500.0, 3000.0])
    z = normalize(x, {"scheme": "hermes_ct", "clip_hu": [-991, 500]})
    assert z[0] == z[1] and z[3] == z[4]
    # MR/PET: the volume's own 2nd and 98th percentiles (linear, as numpy)
    values = torch.from_numpy(rng.gamma(2.0, 50.0, size=5000))
    lo, hi = np.percentile(values.numpy(), [2, 98])
    clipped = np.clip(values.numpy(), lo, hi)
    expected = (clipped - clipped.mean()) / clipped.std()
    np.testing.assert_allclose(normalize(values, {"scheme": "hermes_percentile", "percentiles": [2, 98]}).numpy(),
                               expected, atol=1e-5)
    # autoPET keeps z: only x and y go to 1.5 mm
    _, pet_grid = preprocess(image, (3.0, 0.9, 0.75), card.task("fdg_avid_lesion"), torch.device("cpu"))
    assert pet_grid.resampled_shape == (20, 30, 30)


def test_resampling_keeps_the_origin_like_itk():
    from unisegcli.models.hermes.preprocessing import sample_axis

    x = torch.arange(10, dtype=torch.float64)[None, :, None, None] * 2.0 + 1.0
    # 1 mm -> 1.5 mm: output voxel i sits at input index 1.5 i (first centres aligned)
    out = sample_axis(x, 1, np.arange(7) * 1.5, 3, outside=0.0)[0, :, 0, 0]
    ramp = 1.0 + 2.0 * 1.5 * np.arange(6)
    np.testing.assert_allclose(out[2:5].numpy(), ramp[2:5], atol=1e-9)  # a spline reproduces a ramp
    np.testing.assert_allclose(out[:6].numpy(), ramp, atol=0.1)  # ... up to the edge padding
    assert float(out[6]) == pytest.approx(19.0)  # index 9.0: the last voxel centre
    edge = sample_axis(x, 1, np.array([9.4, 9.6]), 3, outside=0.0)[0, :, 0, 0]
    assert float(edge[0]) > 18.0 and float(edge[1]) == 0.0  # beyond n - 0.5: ITK's default 0
    near = sample_axis(x, 1, np.array([0.0, 1.4, 1.6, 9.6]), 0, outside=0.0)[0, :, 0, 0]
    assert near.tolist() == [1.0, 3.0, 5.0, 0.0]


@pytest.mark.parametrize("kind", ["lps", "aniso"])
def test_restore_brings_an_object_back_to_its_voxels(kind):
    """A box pushed through preprocessing and back lands on its own voxels (orientation flips,
    resampling and padding undone); only the box surface may differ by interpolation."""
    from unisegcli.models.hermes.preprocessing import preprocess, restore

    card = load_registry(REGISTRY_PATH)["hermes"]
    data = np.full((30, 36, 40), -500.0, dtype=np.float32)
    data[6:20, 9:25, 22:33] = 300.0  # off-centre, so a missing flip would move it
    spacing = (2.4, 1.2, 0.9) if kind == "aniso" else (1.5, 1.5, 1.5)
    volume, grid = preprocess(data, spacing, card.task("liver"), torch.device("cpu"))
    threshold = float(volume[0][volume[0] != 0].max() + volume[0][volume[0] != 0].min()) / 2
    probs = torch.sigmoid((volume - threshold) * 20.0)
    back = restore(probs, grid)[0] >= 0.5
    truth = torch.from_numpy(data > 0)
    assert back.shape == truth.shape
    wrong = (back != truth).sum().item()
    assert wrong <= 0.2 * truth.sum().item()
    interior = torch.zeros_like(truth)
    interior[8:18, 11:23, 24:31] = True
    assert bool(back[interior].all())
    assert not bool(back[:, :, :15].any())


# -- the token-list rule --------------------------------------------------------------------


class SpyNet:
    """Wraps a network and records the token lists of every forward."""

    def __init__(self, net):
        self.net, self.calls = net, []
        self.window_zyx = tuple(WINDOW)

    def __call__(self, x, tasks, modality):
        self.calls.append((tasks.tolist(), modality.tolist()))
        return self.net(x, tasks, modality)


def loaded_case(tmp_path, kind="lps"):
    from unisegcli.io.cases import read_case
    from unisegcli.io.discovery import discover

    data = phantom_ct((40, 36, 12))
    path = save_nifti(tmp_path / "ct.nii.gz", data, make_affine(kind))
    return read_case(discover([path])[0], None)


def test_one_task_equals_its_dataset_run_and_every_forward_has_the_full_list(tmp_path, hermes_tiny):
    from unisegcli.models.hermes import family, load_hermes

    card = get_model(hermes_tiny)
    net = load_hermes(TINY / "best.pth")
    case = loaded_case(tmp_path)
    spy = SpyNet(net)
    alone = family.predict(case, resolve_tasks(card, "spleen"), spy, settings=FAMILY.settings(),
                           device=torch.device("cpu"))
    amos = card.task("spleen").extra["dataset_indices"]
    assert spy.calls and all(t == [amos + [-1]] and m == [[0]] for t, m in spy.calls)
    whole = family.predict(case, resolve_tasks(card, "amos_ct"), SpyNet(net), settings=FAMILY.settings(),
                           device=torch.device("cpu"))
    assert len(whole) == 15
    assert np.array_equal(alone["amos_ct_spleen"], whole["amos_ct_spleen"])
    assert alone["amos_ct_spleen"].dtype == np.uint8 and set(np.unique(alone["amos_ct_spleen"])) <= {0, 1}
    # the rule matters: a forward with only [spleen, null] gives other probabilities
    from unisegcli.models.hermes.inference import predict_volume

    x = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    full = predict_volume(x, net, amos + [-1], 0, window=WINDOW)[amos.index(4)]
    short = predict_volume(x, net, [4, -1], 0, window=WINDOW)[0]
    assert (full - short).abs().max() > 0.05


def test_tasks_of_two_datasets_run_one_pass_each(tmp_path, hermes_tiny):
    from unisegcli.models.hermes import family, load_hermes

    card = get_model(hermes_tiny)
    spy = SpyNet(load_hermes(TINY / "best.pth"))
    maps = family.predict(loaded_case(tmp_path), resolve_tasks(card, "liver_tumor,liver,lits_liver"), spy,
                          settings=FAMILY.settings(), device=torch.device("cpu"))
    assert list(maps) == ["lits_liver_tumor", "amos_ct_liver", "lits_liver"]
    lists = {tuple(t[0]) for t, _ in spy.calls}
    assert lists == {(0, 1, -1), tuple(card.task("liver").extra["dataset_indices"] + [-1])}


# -- a whole run -----------------------------------------------------------------------------


def test_segment_writes_masks_in_input_geometry_and_statistics(tmp_path, hermes_tiny):
    affine = make_affine("aniso")  # slice-first storage, 3 mm x 0.8 mm x 0.8 mm
    data = phantom_ct((12, 20, 8), box=(slice(3, 8), slice(5, 15), slice(2, 6)))
    path = save_nifti(tmp_path / "ct.nii.gz", data, affine)
    out = tmp_path / "out"
    result = segment(path, "liver,bcv_liver", output=out, model=hermes_tiny, device="cpu")
    assert [t.name for t in result.tasks] == ["amos_ct_liver", "bcv_liver"]
    source = nib.load(str(path))
    for name in ("liver", "bcv_liver"):
        mask = nib.load(str(out / f"{name}.nii.gz"))
        assert mask.shape == source.shape
        np.testing.assert_allclose(mask.affine, source.affine, atol=1e-6)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    stats = json.loads((out / "statistics.json").read_text())
    text = json.dumps(stats)
    for name in ("liver", "bcv_liver"):
        assert f'"{name}"' in text
    assert (out / "statistics.csv").is_file()
    # the mask written equals the family's own label map, brought back to the file's axes
    from unisegcli.models.hermes import family, load_hermes

    case = loaded_case_from(path)
    direct = family.predict(case, resolve_tasks(get_model(hermes_tiny), "bcv_liver"),
                            SpyNet(load_hermes(TINY / "best.pth")), settings=FAMILY.settings(), device=torch.device("cpu"))
    written = np.asarray(nib.load(str(out / "bcv_liver.nii.gz")).dataobj)
    assert 0 < written.mean() < 1  # random weights, but not an empty or full mask: the check bites
    assert np.array_equal(case.scan.reorientation.to_file(direct["bcv_liver"]), written)


def loaded_case_from(path: Path):
    from unisegcli.io.cases import read_case
    from unisegcli.io.discovery import discover

    return read_case(discover([path])[0], None)


def test_download_shows_the_license_line_first(tmp_path, monkeypatch, httpserver):
    """The shipped Hermes entry (sha256 unknown) served from loopback: the license line comes
    before the download, and the unknown hash gives one warning."""
    from typer.testing import CliRunner

    from unisegcli.cli.app import app

    for var in ("UNISEG_OFFLINE", "UNISEG_MIRROR", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    model = copy.deepcopy(RAW["models"]["hermes"])
    model["files"][0]["urls"] = [httpserver.url_for("/hermes_r.pth")]
    use_registry(monkeypatch, tmp_path, {"hermes71": RAW["task_sets"]["hermes71"]}, {"hermes": model})
    httpserver.expect_request("/hermes_r.pth").respond_with_data((TINY / "best.pth").read_bytes(),
                                                                 content_type="application/octet-stream")
    result = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["weights", "download", "hermes"])
    assert result.exit_code == 0, result.output
    license_at = result.stderr.index("license: not specified by the authors")
    assert result.stderr.count("warning:") == 1 and result.stderr.index("warning:") > license_at
    from unisegcli.weights import cache

    assert cache.missing_files(get_model("hermes")) == []


def test_cli_main_form_runs_hermes_with_gaussian_blending(tmp_path, hermes_tiny):
    from typer.testing import CliRunner

    from unisegcli.cli.app import app

    path = save_nifti(tmp_path / "ct.nii.gz", phantom_ct((12, 20, 8), box=(slice(3, 8), slice(5, 15), slice(2, 6))),
                      make_affine("aniso"))
    runner = CliRunner(env={"COLUMNS": "250"})
    plain = runner.invoke(app, [str(path), "-o", str(tmp_path / "plain"), "--tasks", "spleen", "--model", hermes_tiny,
                                "--device", "cpu", "--quiet"])
    assert plain.exit_code == 0, plain.output
    weighted = runner.invoke(app, [str(path), "-o", str(tmp_path / "gauss"), "--tasks", "spleen", "--model",
                                   hermes_tiny, "--device", "cpu", "--quiet", "--gaussian"])
    assert weighted.exit_code == 0, weighted.output
    for folder in ("plain", "gauss"):
        mask = nib.load(str(tmp_path / folder / "spleen.nii.gz"))
        assert mask.shape == (12, 20, 8)
    bad = runner.invoke(app, [str(path), "-o", str(tmp_path / "bad"), "--tasks", "chaos_liver", "--model", hermes_tiny,
                              "--device", "cpu", "--modality", "pet"])
    assert bad.exit_code == 2 and "t1, t2" in bad.output
