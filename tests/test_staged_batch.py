"""The staged batch (``unisegcli.staged_batch``): prepare / network / finish+write overlap across
cases, with the same files, failures and events as one case after the other.

Ordering is shown with threading events and counters, never with timing: a stand-in network
blocks until the test has seen what it waits for (with a generous failsafe timeout, so a
broken pipeline fails the test instead of hanging it).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from conftest import ThresholdNet, phantom_ct, save_nifti
from unisegcli.errors import ChannelError, OutputError
from unisegcli.events import Events
from unisegcli.models.uniseg.family import UniSegFamily
from unisegcli.session import Segmenter

AFFINE = np.diag([-1.5, -1.5, 3.0, 1.0])
FAILSAFE_S = 120.0  # only reached when the pipeline is broken


def make_cohort(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        box = (slice(4 + k % 5, 14 + k % 5), slice(6, 16), slice(2, 6))
        save_nifti(folder / f"case{k:02d}.nii.gz", phantom_ct(shape=(24 + 2 * k, 22, 8), box=box), AFFINE)
    return sorted(folder.iterdir())


class Recorder(Events):
    """Events as a list of (kind, case id), from whichever thread sent them."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.threads: set[str] = set()

    def _add(self, kind: str, case_id: str) -> None:
        self.seen.append((kind, case_id))
        self.threads.add(threading.current_thread().name)

    def case_started(self, case, number, total, worker=None) -> None:
        self._add("started", case.case_id)

    def case_done(self, result) -> None:
        self._add("done", result.case_id)

    def case_failed(self, failure) -> None:
        self._add("failed", failure.case_id)


class Hooked(UniSegFamily):
    """The UniSeg family with test hooks around each stage; ``prepare_case`` tags its output with
    the case id so later stages know the case."""

    def __init__(self) -> None:
        self.prepared: list[str] = []
        self.network_done = 0
        self.changed = threading.Condition()
        self.on_prepare: Any = None  # (case_id) -> None, before preparing
        self.on_infer: Any = None  # (case_id) -> None, before the network
        self.fail_finish: set[str] = set()

    def prepare_case(self, loaded, tasks, net, **kwargs):
        case_id = loaded.case.case_id
        if self.on_prepare is not None:
            self.on_prepare(case_id)
        inner = super().prepare_case(loaded, tasks, net, **kwargs)
        with self.changed:
            self.prepared.append(case_id)
            self.changed.notify_all()
        return case_id, inner

    def infer_case(self, prepared, net, **kwargs):
        case_id, inner = prepared
        if self.on_infer is not None:
            self.on_infer(case_id)
        raw = super().infer_case(inner, net, **kwargs)
        with self.changed:
            self.network_done += 1
        return raw

    def finish_case(self, prepared, raw):
        case_id, inner = prepared
        if case_id in self.fail_finish:
            raise OutputError(f"test: finishing '{case_id}' failed")
        return super().finish_case(inner, raw)


def segmenter(events: Events | None = None, family: UniSegFamily | None = None) -> Segmenter:
    seg = Segmenter("uniseg", "liver", device="cpu", network=ThresholdNet(), events=events)
    if family is not None:
        seg.family = family
    return seg


def outputs(folder: Path) -> dict[str, Any]:
    """Every file under ``folder``: NIfTI as (data, affine), JSON as parsed, others as bytes."""
    found: dict[str, Any] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = str(path.relative_to(folder))
        if path.name.endswith(".nii.gz"):
            image = nib.load(path)
            found[key] = (np.asarray(image.dataobj), image.affine)
        elif path.suffix in (".json", ".jsonl"):
            document = json.loads(path.read_text()) if path.suffix == ".json" else path.read_text()
            found[key] = _without_times(document)
        else:
            found[key] = path.read_bytes()
    return found


def _without_times(document: Any) -> Any:
    if isinstance(document, dict):
        return {k: _without_times(v) for k, v in document.items() if k not in ("seconds", "created", "finished")}
    return document


def test_staged_batch_writes_the_same_files_as_one_case_after_another(tmp_path: Path, monkeypatch) -> None:
    make_cohort(tmp_path / "in", 4)
    staged = segmenter()
    assert staged.staged
    result = staged.run(tmp_path / "in", tmp_path / "staged")
    assert len(result.cases) == 4 and not result.failures
    assert all({"prepare", "network", "finish", "write"} <= set(c.timings) for c in result.cases)
    monkeypatch.setattr(Segmenter, "staged", property(lambda self: False))  # e.g. a composite Segmenter
    serial = segmenter()
    assert len(serial.run(tmp_path / "in", tmp_path / "serial").cases) == 4
    one, other = outputs(tmp_path / "staged"), outputs(tmp_path / "serial")
    assert sorted(one) == sorted(other) and len(one) >= 8
    for key in one:
        if isinstance(one[key], tuple):
            np.testing.assert_array_equal(one[key][0], other[key][0], err_msg=key)
            np.testing.assert_array_equal(one[key][1], other[key][1], err_msg=key)
        else:
            assert one[key] == other[key], key


def test_a_failing_stage_fails_its_case_only(tmp_path: Path, monkeypatch) -> None:
    """case01 fails preparing, case02 finishing, case03 writing; case00 and case04 are done."""
    make_cohort(tmp_path / "in", 5)
    family = Hooked()
    family.fail_finish = {"case02"}

    def prepare(case_id: str) -> None:
        if case_id == "case01":
            raise ChannelError("test: case01 has the wrong channels")

    family.on_prepare = prepare
    from unisegcli.results import Segmentation

    save = Segmentation.save

    def failing_save(self, folder, **kwargs):
        if self.case_id == "case03":
            raise OutputError("test: writing case03 failed")
        return save(self, folder, **kwargs)

    monkeypatch.setattr(Segmentation, "save", failing_save)
    events = Recorder()
    out = tmp_path / "out"
    result = segmenter(events, family).run(tmp_path / "in", out)
    assert [c.case_id for c in result.cases] == ["case00", "case04"]
    assert [f.case_id for f in result.failures] == ["case01", "case02", "case03"]
    logged = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["case_id"], f["error"]) for f in logged] == [
        ("case01", "ChannelError"), ("case02", "OutputError"), ("case03", "OutputError")]
    assert sorted(p.parent.name for p in out.glob("*/.uniseg-done.json")) == ["case00", "case04"]
    for name in ("case01", "case02", "case03"):
        assert not (out / name).exists() or not any((out / name).iterdir()), name
    # every case starts once and ends once, both in case order; each starts before it ends
    started = [c for kind, c in events.seen if kind == "started"]
    ended = [c for kind, c in events.seen if kind in ("done", "failed")]
    assert started == ended == [f"case{k:02d}" for k in range(5)]
    end_at = {c: i for i, (kind, c) in enumerate(events.seen) if kind in ("done", "failed")}
    assert all(events.seen.index(("started", c)) < end_at[c] for c in started)
    assert events.threads == {threading.main_thread().name}


def test_next_case_is_prepared_while_one_is_in_the_network(tmp_path: Path) -> None:
    make_cohort(tmp_path / "in", 3)
    family = Hooked()
    overlapped = threading.Event()

    def infer(case_id: str) -> None:
        if case_id == "case00":  # stay in the network until case01 has been prepared
            with family.changed:
                seen = family.changed.wait_for(lambda: "case01" in family.prepared, timeout=FAILSAFE_S)
            if seen:
                overlapped.set()

    family.on_infer = infer
    result = segmenter(Recorder(), family).run(tmp_path / "in", tmp_path / "out")
    assert overlapped.is_set(), "case01 was not prepared while case00 was in the network"
    assert len(result.cases) == 3


def test_prepared_cases_waiting_are_bounded(tmp_path: Path) -> None:
    """With the network held on case00, the preparer fills the queue (depth 1) and holds one more;
    so case k is prepared only once the network has finished k - 1 - DEPTH cases."""
    from unisegcli.staged_batch import DEPTH

    make_cohort(tmp_path / "in", 6)
    family = Hooked()
    release = threading.Event()
    too_early: list[str] = []

    def prepare(case_id: str) -> None:
        k = int(case_id[-2:])
        with family.changed:
            if family.network_done < k - 1 - DEPTH:
                too_early.append(f"{case_id} prepared after {family.network_done} network passes")

    def infer(case_id: str) -> None:
        if case_id == "case00":
            with family.changed:  # wait until the queue is full and the preparer holds one more
                family.changed.wait_for(lambda: len(family.prepared) >= DEPTH + 2, timeout=FAILSAFE_S)
            release.set()

    family.on_prepare, family.on_infer = prepare, infer
    result = segmenter(Recorder(), family).run(tmp_path / "in", tmp_path / "out")
    assert release.is_set() and not too_early, too_early
    assert len(result.cases) == 6


def test_interrupt_stops_every_stage_and_leaves_no_partial_case(tmp_path: Path) -> None:
    make_cohort(tmp_path / "in", 5)
    family = Hooked()

    def infer(case_id: str) -> None:
        if case_id == "case02":
            raise KeyboardInterrupt

    family.on_infer = infer
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        segmenter(Recorder(), family).run(tmp_path / "in", out)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("uniseg-")]
    done = sorted(p.parent.name for p in out.glob("*/.uniseg-done.json"))
    assert set(done) <= {"case00", "case01"}
    for folder in (p for p in out.iterdir() if p.is_dir()):
        assert folder.name in done or not any(folder.iterdir()), folder.name


def test_nnunet_folder_batch_is_the_same_staged_or_not(tmp_path: Path, monkeypatch) -> None:
    """nnU-Net v2 folders run in stages too: a batch of the fixture's two scans gives the same
    masks through the staged batch as one case after the other (exact and default mode)."""
    fixture = Path(__file__).parent / "data" / "nnunetv2_tiny"
    folder = fixture / "Dataset999_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    inputs = tmp_path / "in"
    inputs.mkdir()
    for scan in sorted((fixture / "inputs").glob("*.nii.gz")):
        (inputs / scan.name).write_bytes(scan.read_bytes())
    runs = {}
    for staged in (True, False):
        monkeypatch.setattr(Segmenter, "staged", property(lambda self, on=staged: on and self.family.staged))
        for exact in (True, False):
            seg = Segmenter(f"nnunet:{folder}", "liver,spleen,kidney", device="cpu", options={"nnunet_exact": exact})
            assert seg.family.staged
            out = tmp_path / f"out-{staged}-{exact}"
            assert len(seg.run(inputs, out).cases) == 2
            runs[staged, exact] = outputs(out)
    for exact in (True, False):
        one, other = runs[True, exact], runs[False, exact]
        assert sorted(one) == sorted(other)
        masks = [k for k in one if isinstance(one[k], tuple)]
        assert len(masks) == 6 and any(one[k][0].any() for k in masks)
        for key in masks:
            np.testing.assert_array_equal(one[key][0], other[key][0], err_msg=key)


def test_out_of_memory_while_restoring_restores_on_the_host(tmp_path: Path) -> None:
    """A device out-of-memory in the finish stage (the GPU also holds the next case) retries
    that case's restore with the network outputs on the CPU instead of failing the run."""
    import torch

    make_cohort(tmp_path / "in", 2)
    refused: list[str] = []

    class OomOnce(Hooked):
        def finish_case(self, prepared, raw):
            if prepared[0] == "case01" and not refused:
                refused.append(prepared[0])
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().finish_case(prepared, raw)

    result = segmenter(Recorder(), OomOnce()).run(tmp_path / "in", tmp_path / "out")
    assert refused == ["case01"] and [c.case_id for c in result.cases] == ["case00", "case01"]
    assert not result.failures


def test_out_of_memory_while_preparing_fails_that_case(tmp_path: Path) -> None:
    import torch

    make_cohort(tmp_path / "in", 3)
    family = Hooked()

    def prepare(case_id: str) -> None:
        if case_id == "case01":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    family.on_prepare = prepare
    result = segmenter(Recorder(), family).run(tmp_path / "in", tmp_path / "out")
    assert [c.case_id for c in result.cases] == ["case00", "case02"]
    assert [(f.case_id, f.error) for f in result.failures] == [("case01", "DeviceError")]
    assert "--device cpu" in result.failures[0].message and "\n" not in result.failures[0].message
