"""Cases per hour over a cohort: one `uniseg` call, one call per case, and nnU-Net v2's own
``predict_from_files``, on the same nnU-Net v2 results folder; and how busy the network is.

The cohort: crops of the example CT (3 mm) of different sizes. The results folder: the test
fixture's (tests/data/nnunetv2_tiny) with a larger PlainConvUNet (5 stages, 16-128 features,
patch 32x96x96, spacing 3x2x2 mm so every case is resampled on the way in and out) and random
weights; ``--small``: the fixture's own 4-stage network, patch 16x48x48, 4 small cases.

Contestants, each a real subprocess (start-up and model load included), in rotating order:

* `uniseg COHORT -o OUT --model nnunet:FOLDER --json`: one call; its staged batch overlaps
  reading, preprocessing, export and writing with the network (unisegcli/staged_batch.py);
* the same call with the stages run one after the other (``Segmenter.staged`` forced off):
  what the overlap is worth;
* `for f in COHORT/*; do uniseg $f ...; done`: one call per case;
* nnU-Net v2's ``nnUNetPredictor.predict_from_files`` with its default worker processes (3
  preprocessing, 3 export; nnunetv2/inference/predict_from_raw_data.py), same folder, fold 0,
  step 0.5, Gaussian, no mirroring (uniseg's defaults too).

Network busy = the sum of the network-stage seconds (``timings.network`` of every case_done
event) / the call's wall time. Voxel agreement: uniseg's masks against nnU-Net's label maps.

    .venv/bin/python benchmarks/cohort.py [--small] [--cases 20] [--repeat 1]

Prints a table and, last, the headline; writes benchmarks/results/cohort[_small].json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import common

FIXTURE_FOLDER = common.NNUNET_FIXTURE / "Dataset999_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
LABELS = {"liver": 1, "spleen": 2, "kidney": 3}
TASKS = ",".join(LABELS)
UNISEG = str(Path(sys.executable).with_name("uniseg"))
UNSTAGED = ("import sys, unisegcli.session as s; s.Segmenter.staged = property(lambda self: False); "
            "from unisegcli.cli.app import main; sys.argv[0] = 'uniseg'; main()")
NNUNET = """\
import sys, torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                            perform_everything_on_device=False, device=torch.device("cpu"),
                            verbose=False, verbose_preprocessing=False, allow_tqdm=False)
predictor.initialize_from_trained_model_folder(sys.argv[1], use_folds=(0,))
predictor.predict_from_files(sys.argv[2], sys.argv[3], save_probabilities=False, overwrite=True)
"""
# The default network: nnU-Net's PlainConvUNet, 5 stages (z pooled twice), random weights.
FULL_ARCH = {"n_stages": 5, "features_per_stage": [16, 32, 64, 128, 128],
             "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
             "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
             "n_conv_per_stage": [2, 2, 2, 2, 2], "n_conv_per_stage_decoder": [2, 2, 2, 2]}


def make_folder(root: Path, small: bool) -> Path:
    """The fixture results folder with the benchmark's plans and random weights (seed 0)."""
    import torch

    from unisegcli.models.nnunet.network import build_network

    folder = root / "Dataset998_Cohort" / FIXTURE_FOLDER.name
    shutil.copytree(FIXTURE_FOLDER, folder)
    plans = json.loads((folder / "plans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    config["spacing"] = [3.0, 2.0, 2.0]
    config["patch_size"] = [16, 48, 48] if small else [32, 96, 96]
    if not small:
        config["architecture"]["arch_kwargs"].update(FULL_ARCH)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    torch.manual_seed(0)
    net = build_network(config["architecture"], 1, len(LABELS) + 1)
    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["network_weights"] = net.state_dict()
    torch.save(checkpoint, path)
    return folder


def make_cohort(folder: Path, nnunet_inputs: Path, count: int, small: bool) -> list[tuple[int, int, int]]:
    """``count`` crops of the example CT, sizes varying case by case; nnU-Net's copies are named
    ``<case>_0000.nii.gz``. Returns the crop sizes (i, j, k voxels)."""
    import nibabel as nib

    image = nib.load(str(common.EXAMPLE_CT))
    data = np.asarray(image.dataobj)
    folder.mkdir(parents=True)
    nnunet_inputs.mkdir(parents=True)
    sizes = []
    for k in range(count):
        fraction = 0.45 + 0.55 * ((k * 7) % count) / max(1, count - 1)  # 45-100 % of each axis
        if small:
            fraction *= 0.6
        size = [max(16, int(n * fraction)) for n in data.shape]
        start = [(n - s) // 2 for n, s in zip(data.shape, size)]
        crop = data[tuple(slice(a, a + s) for a, s in zip(start, size))]
        path = folder / f"case{k:03d}.nii.gz"
        nib.save(nib.Nifti1Image(crop, image.affine, image.header), str(path))
        os.link(path, nnunet_inputs / f"case{k:03d}_0000.nii.gz")
        sizes.append(tuple(size))
    return sizes


def call(command: list[str]) -> str:
    """Run ``command`` with this checkout first on the path; its stdout (stderr on failure)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(common.ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"error: {command[0]} ... failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def events_of(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def network_seconds(events: list[dict[str, Any]]) -> float | None:
    """The sum of the network-stage seconds of every case_done event (None: not recorded)."""
    done = [e for e in events if e["event"] == "case_done"]
    if not done or any("network" not in e.get("timings", {}) for e in done):
        return None
    return sum(e["timings"]["network"] for e in done)


def stage_seconds(events: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds per stage summed over every case_done event (read, prepare, network, finish, write)."""
    sums: dict[str, float] = {}
    for event in events:
        for stage, seconds in event.get("timings", {}).items() if event["event"] == "case_done" else ():
            sums[stage] = sums.get(stage, 0.0) + seconds
    return {stage: round(seconds, 2) for stage, seconds in sums.items()}


def contestants(folder: Path, cohort: Path, nnunet_inputs: Path, out: Path,
                seen: dict[str, list[dict[str, Any]]]) -> dict[str, Callable[[], None]]:
    """name -> one timed run into a fresh output folder; uniseg's JSON events go to ``seen``."""
    common_args = ["--model", f"nnunet:{folder}", "--tasks", TASKS, "--offline", "--json"]

    def uniseg(name: str, command: list[str]) -> Callable[[], None]:
        def run() -> None:
            shutil.rmtree(out / name, ignore_errors=True)
            seen[name] = events_of(call([*command, str(cohort), "-o", str(out / name), *common_args]))
        return run

    def loop() -> None:
        shutil.rmtree(out / "loop", ignore_errors=True)
        script = ('for f in "$1"/*.nii.gz; do n=$(basename "$f" .nii.gz); '
                  '"$2" "$f" -o "$3/$n" --model "$4" --tasks "$5" --offline --json || exit 1; done')
        seen["loop"] = events_of(call(["bash", "-c", script, "loop", str(cohort), UNISEG, str(out / "loop"),
                                       f"nnunet:{folder}", TASKS]))

    def nnunet() -> None:
        shutil.rmtree(out / "nnunet", ignore_errors=True)
        call([sys.executable, "-c", NNUNET, str(folder), str(nnunet_inputs), str(out / "nnunet")])

    return {"uniseg, one call": uniseg("one", [UNISEG]),
            "uniseg, one call, stages in turn": uniseg("unstaged", [sys.executable, "-c", UNSTAGED]),
            "uniseg, one call per case": loop,
            "nnU-Net predict_from_files": nnunet}


def agreement(ours: Path, theirs: Path) -> float:
    """Share of voxels (all cases) where uniseg's masks give nnU-Net's label."""
    import nibabel as nib

    equal = total = 0
    for reference in sorted(theirs.glob("case*.nii.gz")):
        expected = np.asarray(nib.load(str(reference)).dataobj)
        labels = np.zeros(expected.shape, dtype=np.uint8)
        for name, value in LABELS.items():
            labels[np.asarray(nib.load(str(ours / reference.name[:-7] / f"{name}.nii.gz")).dataobj) > 0] = value
        equal += int((labels == expected).sum())
        total += expected.size
    return equal / total


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.set_defaults(repeat=1)
    parser.add_argument("--cases", type=int, default=20, help="cases in the cohort (default 20)")
    parser.add_argument("--small", action="store_true", help="4 small cases, the fixture network (under 3 minutes)")
    args = parser.parse_args()
    if args.device != "cpu":
        raise SystemExit("error: cohort.py measures the CPU (its nnU-Net contestant runs on the CPU)")
    machine = common.machine_record(common.setup(args))
    count = 4 if args.small else args.cases
    seen: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="uniseg-bench-cohort-") as tmp:
        root = Path(tmp)
        folder = make_folder(root / "model", args.small)
        sizes = make_cohort(root / "cohort", root / "nnunet_in", count, args.small)
        runs = contestants(folder, root / "cohort", root / "nnunet_in", root / "out", seen)
        started = time.time()
        times = common.alternate(runs, args.repeat)
        common.finish_record(machine)
        equal = agreement(root / "out" / "one", root / "out" / "nnunet")
    report(args, machine, count, sizes, times, seen, equal, time.time() - started)


def report(args: Any, machine: dict[str, Any], count: int, sizes: list[tuple[int, int, int]],
           times: dict[str, list[float]], seen: dict[str, list[dict[str, Any]]], equal: float,
           total_s: float) -> None:
    seconds = {name: common.median(t) for name, t in times.items()}
    per_hour = {name: count * 3600.0 / s for name, s in seconds.items()}
    keys = {"uniseg, one call": "one", "uniseg, one call, stages in turn": "unstaged",
            "uniseg, one call per case": "loop"}
    network = {name: network_seconds(seen[key]) for name, key in keys.items()}  # None: not recorded
    busy = {name: s / seconds[name] for name, s in network.items() if s is not None}
    in_run = {name: network[name] / seen[key][-1]["seconds"] for name, key in keys.items()  # type: ignore[operator]
              if name in busy and key != "loop"}
    nnunet = per_hour["nnU-Net predict_from_files"]
    one = "uniseg, one call"
    print(common.machine_line(machine))
    common.print_table(["contestant", "wall s", "cases/hour", "vs nnU-Net", "network busy"],
                       [[name, seconds[name], per_hour[name], per_hour[name] / nnunet,
                         f"{100 * busy[name]:.0f} %" if name in busy else "-"] for name in seconds])
    print(f"network busy inside the run (from run_started to run_finished): "
          + ", ".join(f"{name} {100 * share:.0f} %" for name, share in in_run.items()))
    print(f"seconds per stage, all cases, one call: {stage_seconds(seen['one'])}")
    print(f"voxels equal to nnU-Net's (default float32 mode): {100 * equal:.2f} %")
    ratio = per_hour[one] / nnunet
    common.write_result(common.result_name("cohort", args, "small" if args.small else None), {
        "machine": machine, "cases": count, "crop_voxels": sizes, "repeat": args.repeat, "seconds": times,
        "cases_per_hour": per_hour, "network_busy": busy, "network_busy_in_run": in_run,
        "stage_seconds": {name: stage_seconds(seen[key]) for name, key in keys.items()},
        "ratio_vs_nnunet": ratio, "voxels_equal": equal, "benchmark_seconds": total_s,
        "targets": {"throughput_vs_nnunet >= 1": common.verdict(ratio >= 1.0),
                    "network_busy >= 0.9": common.verdict(busy[one] >= 0.9)}})
    print(f"cohort: uniseg {per_hour[one]:.0f} cases/h vs nnU-Net {nnunet:.0f} cases/h = {ratio:.2f}x, "
          f"loop {per_hour['uniseg, one call per case']:.0f} cases/h, network busy {100 * busy[one]:.0f} %")


if __name__ == "__main__":
    main()
