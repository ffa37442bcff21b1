"""Batch runs: failure isolation, JSON events, shards, resume, parallel shards in one folder."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import phantom_ct, save_nifti
from unisegcli.cli.app import app
from unisegcli.errors import ExitCode, UsageError
from unisegcli.io.sharding import parse_shard, select_shard

runner = CliRunner()
AFFINE = np.diag([-1.5, -1.5, 3.0, 1.0])


def make_cohort(folder: Path, count: int = 12, corrupt: tuple[int, ...] = ()) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        path = folder / f"case{k:02d}.nii.gz"
        if k in corrupt:
            path.write_bytes(b"\x1f\x8b" + os.urandom(64))  # gzip magic, then garbage
        else:
            box = (slice(4 + k % 5, 14 + k % 5), slice(6, 16), slice(2, 6))
            save_nifti(path, phantom_ct(shape=(24, 22, 8), box=box), AFFINE)
        paths.append(path)
    return paths


def events_of(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_twelve_cases_two_corrupt(tmp_path: Path, threshold_net) -> None:
    make_cohort(tmp_path / "in", corrupt=(3, 7))
    out = tmp_path / "out"
    result = runner.invoke(app, [str(tmp_path / "in"), "-o", str(out), "--tasks", "liver", "--json"])
    assert result.exit_code == ExitCode.PARTIAL, result.output
    done = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(done) == 10 and "case03" not in done and "case07" not in done
    for name in done:
        assert (out / name / "liver.nii.gz").exists() and (out / name / ".uniseg-done.json").exists()
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["case_id"] for f in failures) == ["case03", "case07"]
    assert all(f["error"] == "ImageFormatError" and "\n" not in f["message"] for f in failures)
    events = events_of(result.stdout)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert kinds.count("case_started") == 12 and kinds.count("case_done") == 10 and kinds.count("case_failed") == 2
    assert events[-1]["done"] == 10 and events[-1]["failed"] == 2 and events[-1]["exit_code"] == ExitCode.PARTIAL
    # the cohort table has every successful case exactly once
    rows = list(csv.DictReader((out / "statistics.csv").open()))
    per_case = {r["case_id"] for r in rows}
    assert per_case == set(done) and len(rows) == 10 * 2  # liver and liver_tumor


def test_all_cases_failing(tmp_path: Path, threshold_net) -> None:
    make_cohort(tmp_path / "in", count=2, corrupt=(0, 1))
    result = runner.invoke(app, [str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--tasks", "liver", "-q"])
    assert result.exit_code == ExitCode.ALL_FAILED


@pytest.mark.parametrize("count", [3, 5])
def test_shards_are_disjoint_and_complete(count: int) -> None:
    items = [f"c{k:03d}" for k in range(23)]
    parts = [select_shard(items, (i, count)) for i in range(1, count + 1)]
    assert sorted(sum(parts, [])) == items
    assert sum(len(p) for p in parts) == len(items)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_slurm_variables_define_the_shard() -> None:
    env = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "2"}
    assert parse_shard(None, env) == (3, 3)
    assert parse_shard("1/3", env) == (1, 3)  # an explicit --shard wins
    assert parse_shard(None, {}) is None
    for bad in ("0/3", "4/3", "x", "1-3"):
        with pytest.raises(UsageError, match="--shard"):
            parse_shard(bad, {})


def test_shard_option_and_slurm_env_through_the_cli(tmp_path: Path, threshold_net, monkeypatch) -> None:
    make_cohort(tmp_path / "in", count=7)
    out = tmp_path / "out"
    seen: list[str] = []
    for index in (1, 2, 3):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(index - 1))
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
        monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
        result = runner.invoke(app, [str(tmp_path / "in"), "-o", str(out), "--tasks", "liver", "--json"])
        assert result.exit_code == 0, result.output
        seen += [e["case_id"] for e in events_of(result.stdout) if e["event"] == "case_done"]
    assert sorted(seen) == [f"case{k:02d}" for k in range(7)]


def test_resume_skips_done_cases_and_redoes_a_deleted_marker(tmp_path: Path, threshold_net) -> None:
    make_cohort(tmp_path / "in", count=4)
    out = tmp_path / "out"
    args = [str(tmp_path / "in"), "-o", str(out), "--tasks", "liver", "--json"]
    assert runner.invoke(app, args).exit_code == 0
    calls = threshold_net.encode_calls
    again = runner.invoke(app, args)
    assert again.exit_code == 0
    assert [e["event"] for e in events_of(again.stdout)].count("case_skipped") == 4
    assert threshold_net.encode_calls == calls  # no model work at all
    (out / "case02" / ".uniseg-done.json").unlink()
    third = runner.invoke(app, args)
    assert [e["case_id"] for e in events_of(third.stdout) if e["event"] == "case_done"] == ["case02"]
    # --overwrite redoes everything; other tasks are a different run, not "done"
    assert [e["event"] for e in events_of(runner.invoke(app, [*args, "--overwrite"]).stdout)].count("case_done") == 4
    other = runner.invoke(app, [str(tmp_path / "in"), "-o", str(out), "--tasks", "spleen", "--json"])
    assert [e["event"] for e in events_of(other.stdout)].count("case_done") == 4
    # so is the same task with another engine setting (test-time augmentation switched on)
    tta = runner.invoke(app, [*args, "--tta"])
    assert [e["event"] for e in events_of(tta.stdout)].count("case_done") == 4
    assert [e["event"] for e in events_of(runner.invoke(app, [*args, "--tta"]).stdout)].count(
        "case_skipped") == 4
    # an option UniSeg does not have is refused before any work, not silently recorded
    gaussian = runner.invoke(app, [*args, "--gaussian"])
    assert gaussian.exit_code == 2 and "--gaussian does not apply to uniseg models" in gaussian.stderr


def test_input_list_from_stdin_and_csv(tmp_path: Path, threshold_net) -> None:
    paths = make_cohort(tmp_path / "in", count=3)
    out = tmp_path / "out"
    result = runner.invoke(app, ["--input-list", "-", "-o", str(out), "--tasks", "liver", "--json"],
                           input="\n".join(str(p) for p in paths) + "\n")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["case00", "case01", "case02"]
    listing = tmp_path / "list.csv"
    listing.write_text("case_id,path\nalpha,in/case00.nii.gz\nbeta,in/case01.nii.gz\n")
    result = runner.invoke(app, ["--input-list", str(listing), "-o", str(tmp_path / "o2"), "--tasks", "liver", "-q"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "o2").iterdir() if p.is_dir()) == ["alpha", "beta"]


def test_duplicate_case_ids_are_refused(tmp_path: Path, threshold_net) -> None:
    make_cohort(tmp_path / "a", count=1)
    make_cohort(tmp_path / "b", count=1)
    result = runner.invoke(app, [str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "o"), "--tasks", "liver"])
    assert result.exit_code == ExitCode.USAGE
    assert "two inputs have the case id 'case00'" in result.output


def test_nnunet_style_channel_files_form_one_case(tmp_path: Path, threshold_net) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for c in range(2):
        save_nifti(folder / f"pat_{c:04d}.nii.gz", phantom_ct(shape=(24, 22, 8)), AFFINE)
    result = runner.invoke(app, [str(folder), "-o", str(tmp_path / "o"), "--tasks", "autopet", "--json"])
    assert result.exit_code == 0, result.output
    assert [e["case_id"] for e in events_of(result.stdout) if e["event"] == "case_done"] == ["pat"]


def test_two_processes_with_different_shards_share_one_folder(tmp_path: Path) -> None:
    """Real processes (the stand-in network via a sitecustomize hook) writing into one OUT/."""
    make_cohort(tmp_path / "in", count=6)
    out = tmp_path / "out"
    hook = tmp_path / "hook"
    hook.mkdir()
    tests_dir = Path(__file__).parent
    (hook / "sitecustomize.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(tests_dir)!r})\n"
        "import unisegcli.session, conftest\n"
        "unisegcli.session.load_network = lambda segmenter: conftest.ThresholdNet()\n"
    )
    repo = tests_dir.resolve().parent  # the tree under test, not the installed (editable) copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(repo)])}
    script = str(Path(sys.executable).with_name("uniseg"))
    procs = [
        subprocess.Popen([script, str(tmp_path / "in"), "-o", str(out), "--tasks", "liver", "--shard", f"{i}/2",
                          "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in (1, 2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outputs]
    done = [e["case_id"] for stdout, _ in outputs for e in events_of(stdout) if e["event"] == "case_done"]
    assert sorted(done) == [f"case{k:02d}" for k in range(6)]
    rows = list(csv.DictReader(io.StringIO((out / "statistics.csv").read_text())))
    keys = [(r["case_id"], r["structure"]) for r in rows]
    assert len(keys) == len(set(keys)) == 12


def test_out_of_memory_is_one_failed_case_not_a_crash(tmp_path: Path, threshold_net, monkeypatch) -> None:
    """A case that runs out of memory is recorded (exit code 5 in its entry); the others finish.
    (On the CPU with one window per forward there is no lighter setting to retry with.)"""
    import torch

    make_cohort(tmp_path / "in", count=3)
    real_decode = threshold_net.decode
    seen = {"cases": 0}

    def decode(features, task_index):
        if features.shape[2:] and float(features[0, 0].max()) > 0.9 and seen["cases"] == 0:
            seen["cases"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_decode(features, task_index)

    monkeypatch.setattr(threshold_net, "decode", decode)
    out = tmp_path / "out"
    result = runner.invoke(app, [str(tmp_path / "in"), "-o", str(out), "--tasks", "liver", "--json"])
    assert result.exit_code == ExitCode.PARTIAL, result.output
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 1 and failures[0]["error"] == "DeviceError"
    assert failures[0]["exit_code"] == ExitCode.RUNTIME and "out of memory" in failures[0]["message"]
