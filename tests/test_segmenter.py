"""The ``Segmenter`` session: in-memory prediction, load once, the family contract for every
family, the CUDA out-of-memory ladder, and torch settings restored on close."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import DATA, ThresholdNet, make_affine, phantom_ct, save_nifti
from test_hermes_end_to_end import hermes_tiny  # noqa: F401  (fixtures shared with the family tests)
from test_sat_end_to_end import body_ct, tiny_sat  # noqa: F401
from unisegcli import EngineOptions, OutputOptions, Segmenter
from unisegcli.cli.app import app
from unisegcli.errors import DeviceError, ExitCode, UsageError
from unisegcli.events import Events
from unisegcli.models.families import RunSettings
from unisegcli.session import fallback_settings

runner = CliRunner()
DEMO = "uniseg-demo"
NNUNET = "nnunet:" + str(DATA / "nnunetv2_tiny" / "Dataset999_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres")


@pytest.fixture(scope="module")
def demo_scan(tmp_path_factory) -> Path:
    """A crop of the example CT (the demo model's training scan), stored LPS-oblique-free."""
    image = nib.load(str(DATA / "example_ct.nii.gz"))
    crop = np.asarray(image.dataobj)[30:94, 24:88, 4:20].astype(np.int16)
    folder = tmp_path_factory.mktemp("demo")
    return save_nifti(folder / "crop.nii.gz", crop, image.affine)


# -- in memory, load once, same as the CLI ----------------------------------------------------


def test_predict_in_memory_equals_the_cli_files_and_loads_once(tmp_path: Path, demo_scan: Path,
                                                                 monkeypatch) -> None:
    from unisegcli.models.uniseg.family import FAMILY

    loads = []
    real_load = FAMILY.load
    monkeypatch.setattr(FAMILY, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    image = nib.load(str(demo_scan))
    with Segmenter(DEMO, "liver,spleen") as seg:
        from_image = seg.predict(image)
        from_array = seg.predict(np.asarray(image.dataobj), image.affine)
        for _ in range(8):
            seg.predict(image)
    assert len(loads) == 1 and seg.loads == 1  # ten predictions, one load
    cli = runner.invoke(app, [str(demo_scan), "-o", str(tmp_path / "out"), "--model", DEMO, "--tasks",
                              "liver,spleen", "-q"])
    assert cli.exit_code == 0, cli.output
    assert set(from_image.masks) == {"liver", "spleen"}
    for name in ("liver", "spleen"):
        written = nib.load(str(tmp_path / "out" / f"{name}.nii.gz"))
        for result in (from_image, from_array):
            mask = result.masks[name]
            assert mask.dtype == np.uint8 and mask.shape == image.shape
            np.testing.assert_array_equal(mask, np.asarray(written.dataobj))  # bit for bit
            np.testing.assert_array_equal(result.affine, written.affine)
    assert from_image.masks["liver"].any()
    assert from_image.statistics["structures"]["liver"]["volume_ml"] > 0
    assert from_image.label_map.shape == image.shape and from_image.labels == {1: "liver", 2: "spleen"}
    # uniseg runs in stages: their seconds, and predict = their sum
    assert set(from_image.timings) == {"read", "prepare", "network", "finish", "predict"}
    stages = from_image.timings["prepare"] + from_image.timings["network"] + from_image.timings["finish"]
    assert from_image.timings["predict"] == stages


def test_segmentation_save_writes_what_the_cli_writes(tmp_path: Path, threshold_net) -> None:
    path = save_nifti(tmp_path / "ct.nii.gz", phantom_ct(), make_affine("oblique"))
    outputs = OutputOptions(multilabel=True)
    with Segmenter("uniseg", "liver", outputs=outputs, network=threshold_net) as seg:
        written = seg.predict(path).save(tmp_path / "api")
    cli = runner.invoke(app, [str(path), "-o", str(tmp_path / "cli"), "--tasks", "liver", "--multilabel", "-q"])
    assert cli.exit_code == 0, cli.output
    cli_files = sorted(p.name for p in (tmp_path / "cli").iterdir() if not p.name.startswith("."))
    assert sorted(p.name for p in written.files) == cli_files
    for name in ("liver.nii.gz", "liver_tumor.nii.gz", "segmentation.nii.gz"):
        a, b = nib.load(str(tmp_path / "api" / name)), nib.load(str(tmp_path / "cli" / name))
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    assert json.loads((tmp_path / "api" / "labels.json").read_text()) == \
        json.loads((tmp_path / "cli" / "labels.json").read_text())


def test_an_injected_network_is_used_and_nothing_is_loaded(threshold_net) -> None:
    with Segmenter("uniseg", "liver", network=threshold_net) as seg:
        result = seg.predict(phantom_ct(), np.diag([1.5, 1.5, 3.0, 1.0]))
    assert seg.loads == 0 and threshold_net.encode_calls > 0
    assert result.masks["liver"].shape == (40, 36, 12) and result.masks["liver"].any()


def test_numpy_input_without_an_affine_is_a_clear_error(threshold_net) -> None:
    with Segmenter("uniseg", "liver", network=threshold_net) as seg:
        with pytest.raises(Exception, match="without its affine"):
            seg.predict(phantom_ct())


# -- the family contract ------------------------------------------------------------------------


def test_gaussian_on_the_uniseg_demo_is_a_usage_error_with_no_output(tmp_path: Path, demo_scan: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, [str(demo_scan), "-o", str(out), "--model", DEMO, "--tasks", "liver", "--gaussian"])
    assert result.exit_code == ExitCode.USAGE
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--gaussian does not apply to uniseg models" in lines[0]
    assert not out.exists() or list(out.rglob("*")) == []  # no output, no marker


def test_step_does_not_apply_to_hermes(hermes_tiny) -> None:  # noqa: F811
    with pytest.raises(UsageError, match="--step does not apply to hermes"):
        Segmenter(hermes_tiny, "liver", engine=EngineOptions(step=0.3))
    with pytest.raises(UsageError, match="--folds does not apply to hermes"):
        Segmenter(hermes_tiny, "liver", options={"folds": (0,)})


def family_models(request) -> tuple[str, str, dict]:
    """(model, tasks, family options) of a tiny model of each family."""
    kind = request.param
    if kind == "uniseg":
        return request.getfixturevalue("tiny_model"), "liver", {}
    if kind == "demo":
        return DEMO, "liver,kidney", {}
    if kind == "hermes":
        return request.getfixturevalue("hermes_tiny"), "liver,spleen", {"gaussian": True}
    if kind == "sat":
        return request.getfixturevalue("tiny_sat"), "liver", {"modality": "ct"}
    return NNUNET, "liver,kidney", {"nnunet_exact": True}


@pytest.fixture(params=["uniseg", "demo", "hermes", "sat", "nnunet"])
def each_family(request) -> tuple[str, str, dict]:
    return family_models(request)


def test_every_family_passes_the_same_contract_checks(each_family, single_thread) -> None:
    model, tasks, options = each_family
    data = body_ct((40, 36, 14)) if "sat" in model else phantom_ct((40, 36, 14))
    affine = make_affine("oblique")
    with Segmenter(model, tasks, options=options) as seg:
        declared = {o.name for o in seg.family.options}
        assert set(seg.settings.options) == declared  # every declared option, defaults filled
        assert all(seg.settings.option(k) == v for k, v in options.items())
        result = seg.predict(data, affine)
        marker = seg.marker_options()
    structures = [s for t in seg.tasks for s in t.structures]
    assert list(result.masks) == structures
    for mask in result.masks.values():
        assert mask.dtype == np.uint8 and mask.shape == data.shape and set(np.unique(mask)) <= {0, 1}
    np.testing.assert_allclose(result.affine, affine, atol=1e-6)  # the header stores float32
    assert set(declared) <= set(marker)  # markers record the values actually used
    undeclared = next(n for n in ("gaussian", "folds", "nnunet_exact", "modality") if n not in declared)
    with pytest.raises(UsageError, match=f"does not apply to {seg.family.name} models"):
        Segmenter(model, tasks, options={undeclared: (0,) if undeclared == "folds" else True})


# -- out of memory ------------------------------------------------------------------------------


class Recorder(Events):
    def __init__(self) -> None:
        self.retries: list[tuple[str, str]] = []

    def case_retry(self, case_id: str, reason: str, message: str) -> None:
        self.retries.append((reason, message))


class OomWhenBatched(ThresholdNet):
    """Raises CUDA's out-of-memory error whenever a forward gets more than ``limit`` windows."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.refused = 0

    def encode(self, x):
        if x.shape[0] > self.limit:
            self.refused += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().encode(x)


def test_out_of_memory_retries_with_one_window_per_forward() -> None:
    events = Recorder()
    net = OomWhenBatched(limit=1)
    data, affine = phantom_ct((40, 36, 12)), np.diag([3.0, 3.0, 3.0, 1.0])  # several windows
    with Segmenter("uniseg", "liver", engine=EngineOptions(batch_size=4), network=net, events=events) as seg:
        result = seg.predict(data, affine)
        reference = Segmenter("uniseg", "liver", engine=EngineOptions(batch_size=1),
                              network=ThresholdNet()).predict(data, affine)
    assert net.refused == 1 and [r for r, _ in events.retries] == ["out_of_memory"]
    assert "retrying with batch size 1" in events.retries[0][1]
    np.testing.assert_array_equal(result.masks["liver"], reference.masks["liver"])


def test_out_of_memory_on_every_setting_fails_the_case_naming_device_cpu(tmp_path: Path) -> None:
    net = OomWhenBatched(limit=0)
    with Segmenter("uniseg", "liver", engine=EngineOptions(batch_size=2), network=net) as seg:
        with pytest.raises(DeviceError, match="--device cpu") as info:
            seg.predict(phantom_ct(), np.eye(4))
    assert info.value.exit_code == ExitCode.RUNTIME and "batch size 1" in str(info.value)
    assert net.refused == 2


def test_the_cuda_ladder_moves_accumulators_to_the_host_first() -> None:
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    ladder = fallback_settings(RunSettings(batch_size=None), cuda)
    assert [r for r, _ in ladder] == [None, "accumulators on the CPU", "batch size 1"]
    assert [s.accumulator_device for _, s in ladder] == [None, "cpu", "cpu"]
    assert [s.batch_size for _, s in ladder] == [None, None, 1]
    assert [r for r, _ in fallback_settings(RunSettings(batch_size=1), cuda)] == [None, "accumulators on the CPU"]
    assert [r for r, _ in fallback_settings(RunSettings(), torch.device("cpu"))] == [None]


def test_out_of_memory_in_a_batch_is_reported_as_events(tmp_path: Path, monkeypatch) -> None:
    import unisegcli.session

    monkeypatch.setattr(unisegcli.session, "load_network", lambda segmenter: OomWhenBatched(limit=1))
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(2):
        save_nifti(folder / f"c{k}.nii.gz", phantom_ct((40, 36, 12)), np.diag([3.0, 3.0, 3.0, 1.0]))
    result = runner.invoke(app, [str(folder), "-o", str(tmp_path / "out"), "--tasks", "liver", "--batch-size", "3",
                                 "--json"])
    assert result.exit_code == 0, result.output
    events = [json.loads(x) for x in result.stdout.splitlines()]
    retries = [e for e in events if e["event"] == "case_retry"]
    assert [e["case_id"] for e in retries] == ["c0", "c1"] and retries[0]["reason"] == "out_of_memory"
    assert [e["event"] for e in events].count("case_done") == 2


# -- torch globals ------------------------------------------------------------------------------


def test_threads_are_restored_when_the_segmenter_closes(threshold_net) -> None:
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    with Segmenter("uniseg", "liver", engine=EngineOptions(threads=wanted), network=threshold_net):
        assert torch.get_num_threads() == wanted
    assert torch.get_num_threads() == before
