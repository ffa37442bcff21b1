"""Shared parts of the benchmark scripts: machine record, alternating timing, tables, JSON,
the synthetic CT, the benchmark networks and nnU-Net v2's predictor around our network.

Every script records the machine with its numbers (``machine_record``) and times the runs it
compares in rotating order inside one process (``alternate``), so that the load of a shared
machine hits every contestant alike; it reports medians. Results go to
``benchmarks/results/<name>.json`` (``write_result``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

    from unisegcli.models.uniseg import UniSegConfig, UniSegNet

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
EXAMPLE_CT = ROOT / "examples" / "example_ct.nii.gz"
NNUNET_FIXTURE = ROOT / "tests" / "data" / "nnunetv2_tiny"

# A lone large conv3d as the machine's reference throughput: the network's own full-resolution
# decoder conv (32 -> 32, 3x3x3, on one 64x192x192 window; 130.5 GFLOP).
LONE_CONV = {"channels": 32, "kernel": 3, "shape_zyx": (64, 192, 192)}


# ---------------------------------------------------------------- machine and arguments


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_record(device: "torch.device | str | None" = None) -> dict[str, Any]:
    """Where and with what the numbers were taken: CPU, threads, torch, GPU, git commit.

    ``load_avg_1m`` is taken now; on a shared machine it says how busy the CPUs were.
    """
    import torch

    record: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": _memory_gib(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        # libgomp's spin-waiting (the default, ACTIVE-ish) makes 2-thread timings erratic when
        # another process holds a core; the environment says which policy was in force
        "omp_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
                    if k in os.environ},
        "nnunetv2": _version("nnunetv2"),
        "device": str(device) if device is not None else "cpu",
        "gpu": None,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    if device is not None and torch.device(device).type == "cuda":
        record.update(gpu_record(torch.device(device)))
    return record


def gpu_record(device: "torch.device") -> dict[str, Any]:
    """The GPU that ran the numbers: name and memory, compute capability, driver, CUDA, cuDNN."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {
        "gpu": f"{props.name}, {props.total_memory / 2**30:.0f} GiB",
        "gpu_compute_capability": f"{props.major}.{props.minor}",
        "gpu_driver": _nvidia_driver(index),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def _nvidia_driver(index: int) -> str | None:
    """The NVIDIA driver version from nvidia-smi (torch does not report it); None without it."""
    try:
        out = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def finish_record(record: dict[str, Any]) -> dict[str, Any]:
    """Add the load average at the end of the run (how noisy the timings may be)."""
    record["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return record


def machine_line(record: Mapping[str, Any]) -> str:
    """One line for tables and RESULTS.md."""
    where = record.get("gpu") or f"{record['cpu']}, {record['cpus_usable']} cores"
    policy = record.get("omp_env", {}).get("OMP_WAIT_POLICY", "default")
    return (
        f"{record['date']} | {where} | torch {record['torch']} | {record['torch_threads']} threads "
        f"(OMP_WAIT_POLICY {policy}) | "
        f"load {record['load_avg_1m_at_start']} -> {record.get('load_avg_1m_at_end', '?')}"
    )


def base_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every script takes: --device, --threads, --repeat."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per contestant (median reported)")
    parser.add_argument("--tag", default=None, help="suffix of the result file name (results/<name>_<tag>.json)")
    return parser


def add_small(parser: Any, what: str) -> None:
    """``--small`` on a parser or argument group: the same comparison at toy sizes, under 3
    minutes on a 2-core CPU. ``what`` says what it shrinks to (the help text)."""
    parser.add_argument("--small", action="store_true", help=f"toy sizes, under 3 minutes: {what}")


def headline(name: str, text: str) -> None:
    """Print the script's one-line result as its last line: ``<name>: <text>``."""
    print(f"{name}: {text}", flush=True)


def result_name(base: str, args: argparse.Namespace, *variants: str | None) -> str:
    """``base[_variant...][_cuda][_tag]``: full-size and GPU runs do not overwrite the default."""
    parts = [base, *(v for v in variants if v)]
    if str(getattr(args, "device", "cpu")).startswith("cuda"):
        parts.append("cuda")
    if getattr(args, "tag", None):
        parts.append(args.tag)
    return "_".join(parts)


def setup(args: argparse.Namespace) -> "torch.device":
    """Apply --threads and resolve --device (a missing GPU raises uniseg's DeviceError)."""
    import torch

    from unisegcli.inference.engine import resolve_device

    from unisegcli.errors import DeviceError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return resolve_device(args.device)
    except DeviceError as exc:
        raise SystemExit(f"error: {exc}") from None


def on_gpu(device: "torch.device") -> bool:
    return device.type == "cuda"


# ---------------------------------------------------------------- timing


def sync(device: "torch.device | None") -> None:
    """Wait for queued GPU work so wall times are real."""
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: "torch.device | None" = None) -> tuple[float, Any]:
    """(wall seconds, result) of fn(), synchronising a GPU before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def alternate(
    runs: Mapping[str, Callable[[], Any]],
    repeat: int,
    device: "torch.device | None" = None,
    keep: Callable[[str, Any], None] | None = None,
    log: bool = True,
) -> dict[str, list[float]]:
    """Time each run ``repeat`` times in rotating order (ABC, BCA, CAB, ...).

    Warm-up is the caller's job. keep(name, result) sees every result (e.g. to keep the last
    output for an agreement check). Returns {name: [seconds, ...]}.
    """
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeat):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            seconds, result = timed(runs[name], device)
            times[name].append(seconds)
            if keep is not None:
                keep(name, result)
            del result
            if log:
                print(f"  [{r + 1}/{repeat}] {name}: {seconds:.2f} s", flush=True)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow stdout (nnU-Net prints notices from its constructors)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# ---------------------------------------------------------------- output


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    """A plain fixed-width table; floats with 3 significant decimals."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if title:
        print(f"\n{title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    for row in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def write_result(name: str, payload: Mapping[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` and say where. The environment variable
    ``UNISEG_BENCH_RESULTS`` names another folder (the tests use it to keep the checkout clean)."""
    folder = Path(os.environ.get("UNISEG_BENCH_RESULTS") or RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    print(f"\nwrote {path}")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (tuple, set, Path)):
        return list(value) if not isinstance(value, Path) else str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def verdict(met: bool) -> str:
    return "MET" if met else "MISSED"


# ---------------------------------------------------------------- data


def synthetic_ct(shape_zyx: Sequence[int], seed: int = 0) -> np.ndarray:
    """A CT-like int16 volume [Z, Y, X] in HU: air, a body of fat (-100) and soft tissue (40),
    a contrast-enhanced liver (120), spleen (50), kidneys (30), spine (650) and, in the upper
    third, lungs (-850), plus Gaussian noise (sd 15 HU). The liver fills ~4 % of the volume.

    Built slice block by slice block so 512x512x400 needs little more than its own 200 MB.
    """
    z_n, y_n, x_n = (int(s) for s in shape_zyx)
    rng = np.random.default_rng(seed)
    out = np.empty((z_n, y_n, x_n), dtype=np.int16)
    v = (np.arange(y_n, dtype=np.float32) + 0.5) / y_n * 2 - 1  # anterior -1 .. posterior +1
    u = (np.arange(x_n, dtype=np.float32) + 0.5) / x_n * 2 - 1  # right -1 .. left +1
    vv, uu = np.meshgrid(v, u, indexing="ij")

    def ellipsoid(ww: np.ndarray, c: tuple[float, float, float], r: tuple[float, float, float]) -> np.ndarray:
        return ((uu - c[0]) / r[0]) ** 2 + ((vv - c[1]) / r[1]) ** 2 + ((ww - c[2]) / r[2]) ** 2 <= 1

    block = 16
    for z0 in range(0, z_n, block):
        z1 = min(z_n, z0 + block)
        w = ((np.arange(z0, z1, dtype=np.float32) + 0.5) / z_n * 2 - 1)[:, None, None]  # feet -1 .. head +1
        ww = np.broadcast_to(w, (z1 - z0, y_n, x_n))
        hu = np.full((z1 - z0, y_n, x_n), -1000.0, dtype=np.float32)
        hu[np.broadcast_to((uu / 0.85) ** 2 + (vv / 0.65) ** 2 <= 1, hu.shape)] = -100.0  # fat
        hu[np.broadcast_to((uu / 0.78) ** 2 + (vv / 0.58) ** 2 <= 1, hu.shape)] = 40.0  # soft tissue
        lungs = (ww > 0.35) & (
            (((uu - 0.35) / 0.28) ** 2 + ((vv + 0.05) / 0.38) ** 2 <= 1)
            | (((uu + 0.35) / 0.28) ** 2 + ((vv + 0.05) / 0.38) ** 2 <= 1)
        )
        hu[lungs] = -850.0
        hu[ellipsoid(ww, (-0.35, -0.05, 0.15), (0.32, 0.32, 0.3))] = 120.0  # liver, contrast-enhanced
        hu[ellipsoid(ww, (0.45, 0.1, 0.2), (0.12, 0.16, 0.18))] = 50.0  # spleen
        for side in (-0.3, 0.3):
            hu[ellipsoid(ww, (side, 0.3, -0.1), (0.1, 0.12, 0.18))] = 30.0  # kidneys
        spine = np.broadcast_to(uu**2 + (vv - 0.42) ** 2 <= 0.1**2, hu.shape)
        hu[spine] = 650.0
        hu += rng.normal(0.0, 15.0, size=hu.shape).astype(np.float32)
        out[z0:z1] = np.clip(hu, -1024, 3071).astype(np.int16)
    return out


def write_nifti(path: Path, volume_zyx: np.ndarray, spacing_zyx: Sequence[float], lps: bool = False) -> Path:
    """Save a [Z, Y, X] volume as NIfTI (file order x, y, z) with the given spacing: RAS, or
    with ``lps`` the x and y axes pointing left and posterior, as dcm2niix writes most CTs."""
    import nibabel as nib

    z, y, x = (float(s) for s in spacing_zyx)
    affine = np.diag([-x, -y, z, 1.0] if lps else [x, y, z, 1.0])
    img = nib.Nifti1Image(np.ascontiguousarray(volume_zyx.transpose(2, 1, 0)), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


# ---------------------------------------------------------------- networks


def network_config(size: str) -> "UniSegConfig":
    """The benchmark networks, all with UniSeg's architecture (11 prompts, 4 outputs):

    full:    the released model's config (patch 64x192x192, 32..320 features; 1,523 GFLOP/window)
    small:   patch 32x96x96, 16..160 features (about 1/30 of the FLOPs; for quick runs)
    standin: patch 64x192x192, 2..16 features (full window size, almost no compute: for memory)
    toy:     patch 16x64x64, 4..32 features (the smallest useful UniSeg; for --small and tests)
    """
    from unisegcli.models.uniseg import UniSegConfig

    full = UniSegConfig.default()
    if size == "full":
        return full
    # (patch, first features, most features); the released pooling and kernels
    scaled = {"small": ((32, 96, 96), 16, 160), "standin": (full.patch_size, 2, 16), "toy": ((16, 64, 64), 4, 32)}
    if size in scaled:
        patch, base, most = scaled[size]
        return UniSegConfig(patch_size=patch, base_num_features=base, max_num_features=most,
                            pool_op_kernel_sizes=full.pool_op_kernel_sizes, conv_kernel_sizes=full.conv_kernel_sizes)
    raise ValueError(f"unknown network size {size!r}; expected full, small, standin or toy")


def random_network(config: "UniSegConfig", seed: int = 0) -> "UniSegNet":
    """A UniSegNet with PyTorch's default random initialisation (seeded), eval mode, CPU."""
    import torch

    from unisegcli.models.uniseg import UniSegNet

    torch.manual_seed(seed)
    return UniSegNet(config).eval()


def count_flops(net: "UniSegNet", x: "torch.Tensor", task_indices: Sequence[int]) -> dict[str, float]:
    """FLOPs (torch.utils.flop_counter) of one batch: the encoder once, the decoder per task.

    Also runs the network, so it doubles as the warm-up. Returns {"encoder", "decoder"} per
    decode, in FLOPs.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            features = net.encode(x)
        encoder = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter:
            for k in task_indices:
                net.decode(features, k)
        decoder = counter.get_total_flops() / max(1, len(task_indices))
    return {"encoder": float(encoder), "decoder": float(decoder)}


def lone_conv(device: "torch.device") -> tuple[Callable[[], Any], float]:
    """(run, FLOPs) of the reference conv3d (``LONE_CONV``), fp32 (autocast fp16 on GPU)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    c, k, shape = LONE_CONV["channels"], LONE_CONV["kernel"], LONE_CONV["shape_zyx"]
    torch.manual_seed(1)
    conv = torch.nn.Conv3d(c, c, k, padding=k // 2).eval().to(device)
    x = torch.randn(1, c, *shape, device=device)
    gpu = device.type == "cuda"

    def run() -> None:
        with torch.inference_mode(), torch.autocast("cuda", enabled=gpu) if gpu else contextlib.nullcontext():
            conv(x)

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        conv(x)
    return run, float(counter.get_total_flops())


# ---------------------------------------------------------------- network optimisations


def optimised_layout(net: "UniSegNet", device: "torch.device") -> "UniSegNet":
    """The memory layout the product uses for this network on this device (channels_last_3d
    for full-size networks on the CPU; see ``models.uniseg.family.prefer_channels_last``)."""
    from unisegcli.models.uniseg.family import prefer_channels_last

    prefer_channels_last(net, device)
    return net


def baseline_network(net: "UniSegNet") -> "UniSegNet":
    """A copy of ``net`` as it ran before the network optimisations, to measure what they
    bought: contiguous (NCDHW) layout, and every block through ``InstanceNorm3d`` and
    ``LeakyReLU`` modules instead of the in-place norm (``network._norm_act``). The original
    is untouched; outputs are equal up to float32 rounding.
    """
    import copy
    import types

    from unisegcli.models.uniseg import network as uniseg_network

    plain = copy.deepcopy(net).use_channels_last(False)

    def forward(self: Any, x: "torch.Tensor") -> "torch.Tensor":
        conv = self.conv if hasattr(self, "conv") else getattr(self, f"conv_{x.shape[1]}")
        return self.nonlin(self.instnorm(conv(x)))

    for module in plain.modules():
        if isinstance(module, (uniseg_network.ConvNormAct, uniseg_network.MultiInputConvNormAct)):
            module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
    return plain


# ---------------------------------------------------------------- nnU-Net v2 around our network


def single_task_module(net: "UniSegNet", task_index: int, channels: int) -> "nn.Module":
    """The UniSeg network for one task as nnU-Net's predictor calls a network: x -> logits.

    x [B, C, *patch] -> the task's first ``channels`` logits [B, channels, *patch]: the same
    network, the same encode + decode as our engine runs for one head.
    """
    from torch import nn

    class SingleTask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            return self.net(x, task_index)[:, :channels]

    return SingleTask().eval()


def nnunet_plans(
    patch_size: Sequence[int],
    spacing_zyx: Sequence[float],
    clip_hu: Sequence[float] = (-325.0, 325.0),
) -> tuple[dict, dict]:
    """nnU-Net v2 plans and the 3d_fullres configuration name for one UniSeg CT task.

    The test fixture's plans (tests/data/nnunetv2_tiny/plans.json) with our patch size,
    the task's spacing, and ``CTNormalization`` statistics chosen so that it computes exactly
    UniSeg's ``ct_clip_scale``: clip to clip_hu, subtract lo, divide by (hi - lo). Resampling
    kwargs are nnU-Net's defaults (data order 3, probabilities order 1, separate z order 0).
    Returns (plans, 3d_fullres configuration dict).
    """
    plans = json.loads((NNUNET_FIXTURE / "plans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    config["patch_size"] = [int(p) for p in patch_size]
    config["spacing"] = [float(s) for s in spacing_zyx]
    config["normalization_schemes"] = ["CTNormalization"]
    config["use_mask_for_norm"] = [False]
    lo, hi = (float(v) for v in clip_hu)
    plans["foreground_intensity_properties_per_channel"] = {
        "0": {"percentile_00_5": lo, "percentile_99_5": hi, "mean": lo, "std": hi - lo,
              "min": lo, "max": hi, "median": (lo + hi) / 2}
    }
    plans["image_reader_writer"] = "NibabelIOWithReorient"
    return plans, config


def nnunet_dataset_json(labels: Sequence[str]) -> dict:
    """dataset.json for labels[0] = background, labels[i] = class i."""
    return {
        "channel_names": {"0": "CT"},
        "labels": {name: i for i, name in enumerate(labels)},
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "NibabelIOWithReorient",
    }


def nnunet_predictor(
    module: "nn.Module",
    plans: dict,
    dataset_json: dict,
    device: "torch.device",
    step: float = 0.5,
) -> tuple[Any, bool]:
    """nnU-Net v2's ``nnUNetPredictor`` around ``module``: Gaussian on, mirroring off.

    perform_everything_on_device: True on CUDA (nnU-Net's default and its fast path; it falls
    back to the CPU itself when out of memory); nnU-Net forces False on the CPU.
    Returns (predictor, perform_everything_on_device).
    """
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    on_device = device.type == "cuda"
    with quiet():
        predictor = nnUNetPredictor(
            tile_step_size=step,
            use_gaussian=True,
            use_mirroring=False,
            perform_everything_on_device=on_device,
            device=device,
            verbose=False,
            allow_tqdm=False,
        )
        manager = PlansManager(plans)
        predictor.manual_initialization(
            module.to(device), manager, manager.get_configuration("3d_fullres"), None, dataset_json,
            "nnUNetTrainer", (0, 1, 2),
        )
    return predictor, predictor.perform_everything_on_device


def ensure_importable() -> None:
    """Let ``python benchmarks/x.py`` import ``unisegcli`` from the checkout without install."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


ensure_importable()


def run_case(loaded: Any, tasks: Sequence[Any], net: Any, folder: Path, *, device: "torch.device | str",
             batch_size: int | None, step: float, precision: str, outputs: Any) -> Any:
    """One case through a Segmenter holding ``net`` (registry model 'uniseg', these tasks):
    predict, then write every output into ``folder``. Returns the written CaseOutputs."""
    from unisegcli.session import Segmenter
    from unisegcli.settings import EngineOptions

    engine = EngineOptions(device=str(device), batch_size=batch_size, step=step, precision=precision)
    with Segmenter("uniseg", [t.name for t in tasks], engine=engine, outputs=outputs, network=net) as segmenter:
        return segmenter.segment_case(loaded).save(folder)
