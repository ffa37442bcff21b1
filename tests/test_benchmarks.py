"""The benchmark scripts keep working: ``benchmarks/gpu.py`` end to end at toy sizes on the CPU
(on CUDA under the ``gpu`` marker), its budget guard, and every script's ``--small`` and
headline. Correctness and structure only, never times: the scripts measure speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = ["startup", "engine_vs_nnunet", "end_to_end", "multitask_scaling", "memory", "workers", "gpu"]
CT_TASKS = ["liver", "kidney", "hepatic_vessel", "pancreas", "colon_tumor", "lung_tumor", "spleen"]


def run_script(name: str, *args: str, results: Path, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """``python benchmarks/<name>.py ARGS`` with its JSON written into ``results``."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", UNISEG_BENCH_RESULTS=str(results),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_offers_small(name: str, tmp_path: Path) -> None:
    proc = run_script(name, "--help", results=tmp_path, timeout_s=120)
    assert proc.returncode == 0, proc.stderr
    assert "--small" in proc.stdout
    assert not list(tmp_path.iterdir())  # --help measures and writes nothing


def test_startup_small_ends_with_its_headline(tmp_path: Path) -> None:
    proc = run_script("startup", "--small", results=tmp_path, timeout_s=300)
    assert proc.returncode == 0, proc.stderr
    assert last_line(proc).startswith("startup: uniseg --help ")
    result = json.loads((tmp_path / "startup_small.json").read_text())
    assert set(result["seconds"]) == {"python -c pass", "uniseg --help", "uniseg tasks"}
    assert all(len(runs) == 3 for runs in result["all_seconds"].values())
    assert result["machine"]["git_commit"]


def check_gpu_result(result: dict, device: str) -> None:
    """What every run of gpu.py must hold, whatever the speed."""
    parts = result["parts"]
    assert result["skipped"] == []
    assert set(parts) == {"engine", "batch_sizes", "accumulators", "seven_tasks"}
    on_gpu = device == "cuda"

    engine = parts["engine"]
    assert engine["nnunet_perform_everything_on_device"] is on_gpu
    assert len(engine["runs"]) == 2
    for run in engine["runs"].values():
        assert run["windows_through_network"] == engine["windows"]  # both engines ran every window
        assert 0 < run["forward_share"] <= 1.0
        assert (run["peak_gpu_bytes"] > 0) if on_gpu else run["peak_gpu_bytes"] is None
    # same network, same volume: the same answer up to nnU-Net's float16 sums (coarse at the rim)
    assert engine["argmax_agreement_where_w_ge_1e-3"] >= 0.999
    assert engine["argmax_agreement"] >= 0.98
    assert engine["max_abs_logit_diff_where_w_ge_1e-3"] < 0.1
    assert engine["speedup_vs_nnunet"] > 0

    batches = parts["batch_sizes"]["runs"]
    assert list(batches) == ["batch 1", "batch 2", "batch 4", "batch 8"]
    for name, run in batches.items():
        size = int(name.split()[1])
        assert run["windows_through_network"] == parts["batch_sizes"]["windows"]
        assert run["windows_per_forward"] <= size
        assert run["argmax_equal_vs_first"] >= 0.999  # the batch changes no answer
        if not on_gpu:  # float32 throughout: equal up to rounding
            assert run["max_abs_diff_vs_first"] < 1e-4
    assert batches["batch 1"]["windows_per_forward"] == 1

    accumulators = parts["accumulators"]
    assert len(accumulators["runs"]) == 2
    assert accumulators["max_abs_diff"] <= 1e-5  # where the sums live changes nothing

    seven = parts["seven_tasks"]
    assert seven["tasks"] == CT_TASKS
    assert seven["seconds"] > 0 and 0 < seven["forward_share"] <= 1.0
    assert seven["windows_through_network"] >= 1
    assert seven["masks_written"] >= len(CT_TASKS)
    assert set(seven["stages_s"]) == {"read", "preprocess", "windows", "export", "write"}


def test_gpu_benchmark_runs_on_the_cpu_at_toy_sizes(tmp_path: Path) -> None:
    pytest.importorskip("nnunetv2")
    proc = run_script("gpu", "--device", "cpu", "--small", "--repeat", "1", "--budget-s", "3000",
                      results=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_line(proc).startswith("gpu: engine ")
    result = json.loads((tmp_path / "gpu_small.json").read_text())
    assert result["machine"]["device"] == "cpu" and result["machine"]["gpu"] is None
    assert result["settings"]["network"] == "toy"
    check_gpu_result(result, "cpu")
    assert result["parts"]["accumulators"]["same_device"] is True


def test_gpu_benchmark_budget_guard_skips_and_still_reports(tmp_path: Path) -> None:
    proc = run_script("gpu", "--device", "cpu", "--small", "--budget-s", "0", results=tmp_path, timeout_s=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped (budget)" in last_line(proc)
    result = json.loads((tmp_path / "gpu_small.json").read_text())
    assert result["parts"] == {}
    assert [s["what"] for s in result["skipped"]] == ["all parts (set-up)"]
    assert result["skipped"][0]["left_s"] < 0


@pytest.mark.gpu
def test_gpu_benchmark_on_cuda_at_toy_sizes(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("nnunetv2")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    proc = run_script("gpu", "--device", "cuda", "--small", "--repeat", "1", results=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_small_cuda.json").read_text())
    assert result["machine"]["gpu"] and result["machine"]["cuda"]
    check_gpu_result(result, "cuda")
    assert result["parts"]["accumulators"]["same_device"] is False
