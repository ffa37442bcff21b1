"""SAT end to end: a random-weight tiny SAT (the parity fixture) as a registry model, run on
small synthetic CTs through the API and the CLI; masks must come back in the input's geometry.

The tiny model's window is 64 x 64 x 32 (x, y, z) instead of 288 x 288 x 96; everything else
(preprocessing, engine, restore, writers, embeddings cache) is the real code path.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_affine, save_nifti, use_registry

from unisegcli.errors import UsageError

pytest.importorskip("transformers")  # the tiny model's tokenizer (extra "sat")

DATA = Path(__file__).parent / "data"
TINY = DATA / "sat_tiny"


@pytest.fixture
def tiny_sat(tmp_path, monkeypatch) -> str:
    """A registry model 'sat-tiny' made of the tiny SAT fixture (random weights), cached."""
    from unisegcli.weights import cache
    from unisegcli.weights.cards import REGISTRY_PATH
    from unisegcli.weights.resolver import get_model

    folder = tmp_path / "files"
    folder.mkdir()
    shutil.copy(TINY / "sat_checkpoint.pth", folder / "nano.pth")
    shutil.copy(TINY / "text_encoder.pth", folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json"):
        shutil.copy(TINY / "text_tower" / name, folder)
    from transformers import AutoTokenizer  # tokenizer.json, as the registry downloads it

    AutoTokenizer.from_pretrained(str(TINY / "text_tower")).backend_tokenizer.save(str(folder / "tokenizer.json"))
    shipped = json.loads(REGISTRY_PATH.read_text())
    model = copy.deepcopy(shipped["models"]["sat-nano"])
    for f in model["files"]:
        blob = (folder / f["name"]).read_bytes()
        f.update(urls=[], sha256=hashlib.sha256(blob).hexdigest(), size_bytes=len(blob))
    window = json.loads((TINY / "manifest.json").read_text())["config"]["image_size"]
    model.update(version="test", network={"window": window, "max_queries": 2})
    use_registry(monkeypatch, tmp_path, {"sat-vocabulary": []}, {"sat-tiny": model})
    cache.import_model(get_model("sat-tiny"), folder)
    return "sat-tiny"


def body_ct(shape=(44, 40, 14), organ=(slice(7, 24), slice(19, 35), slice(2, 9))) -> np.ndarray:
    """[i, j, k] CT: air (-1000 HU) around a 40 HU body with a 300 HU "organ" box."""
    data = np.full(shape, -1000.0, dtype=np.float32)
    data[3:-3, 3:-3, 1:-1] = 40.0
    data[organ] = 300.0
    return data


class Warnings:
    def __init__(self):
        from unisegcli.api import Events

        class Recorder(Events):
            messages: list[str] = []

            def warning(self, case_id, message):
                self.messages.append(message)

        self.events = Recorder()
        self.events.messages = []


def test_tiny_sat_writes_masks_in_input_geometry(tiny_sat, tmp_path, single_thread):
    import nibabel as nib

    from unisegcli.api import segment

    affine = make_affine("oblique")
    scan = save_nifti(tmp_path / "ct.nii.gz", body_ct(), affine)
    recorder = Warnings()
    result = segment([scan], "liver, Kidney_Left, L1", output=tmp_path / "out", model=tiny_sat,
                     events=recorder.events)
    case = result.cases[0]
    assert set(case.masks) == {"liver", "left_kidney", "lumbar_vertebrae_1_l1"}
    reference = nib.load(str(scan))
    for path in case.masks.values():
        img = nib.load(str(path))
        assert img.shape == reference.shape
        np.testing.assert_allclose(img.affine, reference.affine, atol=1e-5)
        assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1}
    assert any("guessed 'ct'" in m for m in recorder.events.messages)  # no --modality given
    assert set(case.volumes_ml) == set(case.masks)


def test_masks_land_on_the_structure(tiny_sat, tmp_path, monkeypatch, single_thread):
    """With window logits = +/-10 by the normalised intensity (threshold halfway between body
    and organ; the volume fits one window), the whole chain
    (resample to 1x1x3 mm, crop, normalise, windows, restore) must find the bright box in the
    input's own oblique, anisotropic grid."""
    import nibabel as nib

    from unisegcli.api import segment
    from unisegcli.models.sat import family

    def by_intensity(self, x):
        n = sum(len(g) for g in self.groups)
        middle = (x.max() + x.min()) / 2
        return ((x > middle).float() * 20 - 10).expand(-1, n, -1, -1, -1)

    monkeypatch.setattr(family.WindowPredictor, "__call__", by_intensity)
    volume = body_ct()
    scan = save_nifti(tmp_path / "ct.nii.gz", volume, make_affine("oblique"))
    result = segment([scan], "liver,spleen", output=tmp_path / "out", model=tiny_sat, modality="ct")
    truth = volume == 300.0
    for path in result.cases[0].masks.values():
        mask = np.asarray(nib.load(str(path)).dataobj) > 0
        dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
        assert dice > 0.9, dice


def test_cached_embeddings_equal_live_tower(tiny_sat, single_thread):
    from unisegcli.session import Segmenter
    from unisegcli.weights.resolver import get_model
    from unisegcli.models.families import needed_roles, resolve_tasks
    from unisegcli.models.sat import family
    from unisegcli.models.sat.embeddings import cached_table, table_path

    card = get_model(tiny_sat)
    tasks = resolve_tasks(card, "liver,right kidney,brain tumor")
    assert "text_encoder" in needed_roles(card, tasks)  # nothing prepared yet
    live = Segmenter(tiny_sat, "liver,right kidney,brain tumor").load()
    live_q = family.queries_for(live, tasks[:2], "ct", card.name)

    path = family.prepare(card)
    dim = live.text.config.hidden
    assert path == table_path(card) and path.stat().st_size < 498 * dim * 4 + 40_000
    table = cached_table(card)
    assert table is not None and len(table.terms) == 498
    assert "text_encoder" not in needed_roles(card, tasks)
    cached = Segmenter(tiny_sat, "liver,right kidney,brain tumor").load()
    assert cached.text is None  # no text tower, no tokenizer
    cached_q = family.queries_for(cached, tasks[:2], "ct", card.name)
    torch.testing.assert_close(cached_q, live_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(family.queries_for(cached, tasks[2:], "mri", card.name),
                               live.embed_prompts(["brain tumor"], "mri"), atol=1e-5, rtol=0)

    # free text outside the vocabulary needs the tower again
    free = resolve_tasks(card, "text:left renal cyst")
    assert "text_encoder" in needed_roles(card, free)
    with pytest.raises(Exception, match="text encoder"):
        family.queries_for(cached, free, "ct", card.name)
    torch.testing.assert_close(family.queries_for(live, free, "ct", card.name),
                               live.embed_prompts(["left renal cyst"], "ct"))


def test_term_of_another_modality_is_refused(tiny_sat, tmp_path, single_thread):
    from unisegcli.api import segment
    from unisegcli.errors import UnknownTaskError

    from unisegcli.errors import UsageError
    from unisegcli.models.sat import family

    scan = save_nifti(tmp_path / "ct.nii.gz", body_ct(), make_affine("ras"))
    with pytest.raises(UnknownTaskError, match="not for pet"):
        segment([scan], "left kidney", output=tmp_path / "out", model=tiny_sat, modality="pet")
    with pytest.raises(UsageError, match="expected ct, mri or pet"):
        segment([scan], "left kidney", output=tmp_path / "out", model=tiny_sat, modality="xray")
    assert family.checked_modality("MR") == family.checked_modality("T1") == "mri"


def test_cli_prepare_and_segment(tiny_sat, tmp_path, single_thread):
    from typer.testing import CliRunner

    from unisegcli.cli.app import app
    from unisegcli.weights.resolver import get_model
    from unisegcli.models.sat.embeddings import table_path

    runner = CliRunner()
    res = runner.invoke(app, ["weights", "prepare", tiny_sat, "--offline"])
    assert res.exit_code == 0, res.output
    assert table_path(get_model(tiny_sat)).is_file()
    scan = save_nifti(tmp_path / "ct.nii.gz", body_ct(), make_affine("lps"))
    res = runner.invoke(app, [str(scan), "-o", str(tmp_path / "out"), "--model", tiny_sat,
                              "--tasks", "aorta", "--modality", "ct", "--verbose"])
    assert res.exit_code == 0, res.output
    assert "ignored 12 known extra keys" in res.output  # mid_mask_embed_proj.*, at --verbose
    assert (tmp_path / "out" / "aorta.nii.gz").is_file()


def test_sat_runs_with_upstreams_windows_and_gaussian_unless_told_otherwise(tiny_sat, tmp_path, monkeypatch,
                                                                           single_thread):
    """Issue 24: SAT's own window placement and float16 Gaussian are the family's defaults;
    the ``placement`` option "nnunet" gives nnU-Net's even spread; prompts go in upstream's
    groups of max_queries (2 here)."""
    from unisegcli import Segmenter
    from unisegcli.inference import engine
    from unisegcli.models.sat.placement import SAT_PLACEMENT, blending_weights

    seen = []
    original = engine.sliding_window

    def recording(volume, net, patch, **kwargs):
        seen.append((kwargs.get("placement"), kwargs.get("gaussian"), [g.shape[0] for g in net.groups]))
        return original(volume, net, patch, **kwargs)

    monkeypatch.setattr(engine, "sliding_window", recording)
    scan = save_nifti(tmp_path / "ct.nii.gz", body_ct(), make_affine("ras"))
    for options in ({"modality": "ct"}, {"modality": "ct", "placement": "nnunet"}):
        with Segmenter(tiny_sat, "liver,spleen,aorta", device="cpu", options=options) as seg:
            assert seg.settings.option("placement") == options.get("placement", "sat")
            seg.predict(scan)
    (default_placement, weights, groups), (other_placement, _, _) = seen
    assert default_placement is SAT_PLACEMENT and other_placement is None
    assert isinstance(weights, torch.Tensor) and torch.equal(weights, blending_weights(tuple(weights.shape)))
    assert groups == [2, 1]
    with pytest.raises(UsageError, match="placement"):
        Segmenter(tiny_sat, "liver", device="cpu", options={"placement": "even"})


def test_sat_batch_is_the_same_staged_or_not(tiny_sat, tmp_path, monkeypatch, single_thread):
    """SAT runs in stages too: a batch through the staged pipeline writes the same masks as the
    same cases one after the other, and warnings (the guessed modality) still reach the events."""
    import nibabel as nib

    from unisegcli.session import Segmenter

    inputs = tmp_path / "in"
    inputs.mkdir()
    for k in range(3):
        organ = (slice(7 + k, 24 + k), slice(19, 35), slice(2, 9))
        save_nifti(inputs / f"case{k}.nii.gz", body_ct(organ=organ), make_affine("oblique"))
    masks = {}
    for staged in (True, False):
        monkeypatch.setattr(Segmenter, "staged", property(lambda self, on=staged: on and self.family.staged))
        recorder = Warnings()
        with Segmenter(tiny_sat, "liver,Kidney_Left", device="cpu", events=recorder.events) as seg:
            assert seg.family.staged
            result = seg.run(inputs, tmp_path / f"out-{staged}")
        assert len(result.cases) == 3 and not result.failures
        assert sum("guessed 'ct'" in m for m in recorder.events.messages) == 3
        masks[staged] = {(c.case_id, s): np.asarray(nib.load(str(p)).dataobj)
                         for c in result.cases for s, p in c.masks.items()}
    assert sorted(masks[True]) == sorted(masks[False]) and len(masks[True]) == 6
    assert all(m.any() for m in masks[True].values())  # not a comparison of empty masks
    for key, mask in masks[True].items():
        np.testing.assert_array_equal(mask, masks[False][key], err_msg=str(key))
