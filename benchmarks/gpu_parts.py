"""The measuring parts of ``gpu.py``: a clock inside the network's forward, one measurement
(seconds, peak GPU memory, forward share), rotating rounds under the budget, agreement of two
outputs, the shared network and volume (``prepare``), and the printed tables and headline.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

import common


class ForwardClock:
    """Time spent inside ``net.encode`` and ``net.decode`` (the whole forward of a UniSeg
    network, whichever engine calls it) and how many windows went through ``encode``.

    While active, the two methods are replaced on the instance by wrappers (removed on exit).
    On CUDA each call is bracketed by CUDA events, so nothing waits for the GPU; ``take()``
    synchronises once and sums the spans on the GPU's clock. On the CPU the wall clock.
    """

    def __init__(self, net: Any, device: Any) -> None:
        self.net, self.device = net, device
        self.spans: list[tuple[Any, Any]] = []
        self.windows = 0
        self.batches = 0

    def __enter__(self) -> "ForwardClock":
        for name in ("encode", "decode"):
            setattr(self.net, name, self._wrap(getattr(self.net, name), count=name == "encode"))
        return self

    def __exit__(self, *exc: object) -> None:
        for name in ("encode", "decode"):
            delattr(self.net, name)  # the class's methods again

    def _mark(self) -> Any:
        if self.device.type == "cuda":
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _wrap(self, fn: Callable[..., Any], count: bool) -> Callable[..., Any]:
        def clocked(x: Any, *args: Any, **kwargs: Any) -> Any:
            start = self._mark()
            try:
                return fn(x, *args, **kwargs)
            finally:
                self.spans.append((start, self._mark()))
                if count:
                    self.windows += int(x.shape[0])
                    self.batches += 1

        return clocked

    def take(self) -> tuple[float, int, int]:
        """(seconds inside the forward, windows encoded, batches encoded) since the last take;
        resets all three."""
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            seconds = sum(start.elapsed_time(end) for start, end in self.spans) / 1000.0
        else:
            seconds = sum(end - start for start, end in self.spans)
        counts = self.windows, self.batches
        self.spans, self.windows, self.batches = [], 0, 0
        return seconds, *counts


def measure(fn: Callable[[], Any], device: Any, clock: ForwardClock) -> tuple[dict[str, Any], Any]:
    """Run fn once: wall seconds (synchronised), peak GPU memory (reset first), forward share."""
    import torch

    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    clock.take()  # drop anything before this run
    seconds, result = common.timed(fn, device)
    forward_s, windows, batches = clock.take()
    return {
        "seconds": seconds,
        "forward_s": forward_s,
        "forward_share": forward_s / seconds if seconds > 0 else None,
        "windows_through_network": windows,
        "windows_per_forward": windows / batches if batches else None,
        "peak_gpu_bytes": int(torch.cuda.max_memory_allocated(device)) if gpu else None,
    }, result


def rotate(runs: Mapping[str, Callable[[], Any]], bench: Any, per_run_windows: int,
           part: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """A warm-up of every run (excluded), then up to ``bench.repeat`` rounds in rotating order,
    each only if the budget allows its estimate (the runs' last times).

    Returns ({name: measurements and medians}, {name: last output, float32 on the CPU}).
    """
    import torch

    names = list(runs)
    part = part or ", ".join(names)
    estimate = len(names) * per_run_windows * bench.window_s
    if not bench.budget.allows(f"{part}: warm-up", estimate):
        return {}, {}
    raw: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    warm: dict[str, float] = {}
    last: dict[str, float] = {}  # each run's latest seconds: the next round's estimate
    outputs: dict[str, Any] = {}
    resident = int(torch.cuda.memory_allocated(bench.device)) if bench.gpu else None
    with ForwardClock(bench.net, bench.device) as clock:
        for name in names:
            stats, out = measure(runs[name], bench.device, clock)
            warm[name] = last[name] = stats["seconds"]
            outputs[name] = out.float().cpu()
            del out
        for r in range(bench.repeat):
            if not bench.budget.allows(f"{part}: round {r + 1} of {bench.repeat}", sum(last.values())):
                break
            for name in names[r % len(names):] + names[: r % len(names)]:
                stats, out = measure(runs[name], bench.device, clock)
                raw[name].append(stats)
                last[name] = stats["seconds"]
                outputs[name] = out.float().cpu()
                del out
    return {name: summarise(raw[name], warm[name], resident) for name in names}, outputs


def summarise(runs: Sequence[Mapping[str, Any]], warmup_s: float, resident: int | None) -> dict[str, Any]:
    """Medians of the timed runs (None when the budget left none), all values, the warm-up."""

    def med(key: str) -> float | None:
        values = [r[key] for r in runs if r[key] is not None]
        return common.median(values) if values else None

    peaks = [r["peak_gpu_bytes"] for r in runs if r["peak_gpu_bytes"] is not None]
    return {
        "median_s": med("seconds"),
        "forward_share": med("forward_share"),
        "peak_gpu_bytes": max(peaks) if peaks else None,
        "gpu_resident_before_bytes": resident,
        "windows_through_network": runs[-1]["windows_through_network"] if runs else None,
        "windows_per_forward": runs[-1]["windows_per_forward"] if runs else None,
        "warmup_s": warmup_s,
        "timed_runs": list(runs),
    }


def agreement(ours: Any, theirs: Any, patch: Sequence[int]) -> dict[str, float]:
    """Max |difference| and argmax agreement of two [K, Z, Y, X] logits, overall and where the
    summed Gaussian weight is >= 1e-3 (outside it nnU-Net's float16 sums are coarse)."""
    import torch

    from unisegcli.inference.gaussian import summed_weight_numpy

    solid = torch.from_numpy(summed_weight_numpy(tuple(ours.shape[1:]), patch, 0.5) >= 1e-3)
    diff = (ours - theirs).abs()
    agree = ours.argmax(0) == theirs.argmax(0)
    return {
        "max_abs_logit_diff": float(diff.max()),
        "max_abs_logit_diff_where_w_ge_1e-3": float(diff[:, solid].max()),
        "argmax_agreement": float(agree.float().mean()),
        "argmax_agreement_where_w_ge_1e-3": float(agree[solid].float().mean()),
        "solid_fraction": float(solid.float().mean()),
    }


def prepare(bench_type: Any, sizes: Any, device: Any, repeat: int, batch: int, budget: Any) -> Any:
    """The shared network and volume, and one window's forward time (the estimates' unit);
    None when the budget does not allow even that."""
    import torch

    from unisegcli.inference.tiling import padding_for_patch, window_slices

    if not budget.allows("all parts (set-up)", 0.0):
        return None
    config = common.network_config(sizes.network)
    patch = tuple(config.patch_size)
    net = common.optimised_layout(common.random_network(config).to(device), device)
    hu = torch.from_numpy(common.synthetic_ct(sizes.volume_zyx).astype(np.float32))[None]
    volume = ((hu.clamp(-325.0, 325.0) + 325.0) / 650.0).to(device)
    size = tuple(volume.shape[1:])
    padded = [n + lo + hi for n, (lo, hi) in zip(size, padding_for_patch(size, patch))]
    windows = len(window_slices(padded, patch, 0.5))
    window = torch.zeros(1, 1, *patch, device=device)
    gpu = device.type == "cuda"

    def forward() -> Any:
        with torch.inference_mode(), torch.autocast("cuda", enabled=gpu) if gpu else _nothing():
            return net(window, 0)

    forward()  # warm-up: CUDA context, cuDNN, allocator
    window_s, _ = common.timed(forward, device)
    return bench_type(device=device, net=net, patch=patch, volume=volume, windows=windows, sizes=sizes,
                      repeat=repeat, batch=batch, budget=budget, window_s=window_s)


def _nothing() -> Any:
    import contextlib

    return contextlib.nullcontext()


# ---------------------------------------------------------------- report


def _gb(value: int | None) -> str:
    return f"{value / 1e9:.2f}" if value is not None else "-"


def _pct(value: float | None) -> str:
    return f"{100 * value:.0f} %" if value is not None else "-"


def print_tables(machine: Mapping[str, Any], parts: Mapping[str, Any], budget: Any) -> None:
    """One table of every timed run of parts 1-3, the 7-task run, and the skips."""
    print(f"\n{common.machine_line(machine)}")
    rows = []
    for part in ("engine", "batch_sizes", "accumulators"):
        for name, run in parts.get(part, {}).get("runs", {}).items():
            rows.append([part, name, run["median_s"] if run["median_s"] is not None else "-",
                         _pct(run["forward_share"]), _gb(run["peak_gpu_bytes"]), run["warmup_s"]])
    if rows:
        common.print_table(["part", "run", "median s", "forward", "peak GPU GB", "warm-up s"], rows,
                           "parts 1-3 (medians of the timed rounds; forward = share of the wall time)")
    engine = parts.get("engine", {})
    if "argmax_agreement" in engine:
        print(f"engine vs nnU-Net: argmax equal {100 * engine['argmax_agreement']:.3f} % "
              f"({100 * engine['argmax_agreement_where_w_ge_1e-3']:.3f} % where the summed weight >= 1e-3), "
              f"max |dlogit| {engine['max_abs_logit_diff_where_w_ge_1e-3']:.4f} there")
    seven = parts.get("seven_tasks", {})
    if seven.get("seconds") is not None:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in seven["stages_s"].items())
        print(f"\n7 CT tasks, {'x'.join(map(str, seven['ct_xyz']))} CT, file in -> masks out: "
              f"{seven['seconds']:.2f} s ({stages}); forward {_pct(seven['forward_share'])}, "
              f"{seven['windows_through_network']} windows, peak GPU {_gb(seven['peak_gpu_bytes'])} GB")
    for skip in budget.skipped:
        print(f"skipped: {skip['what']} (estimate {skip['estimate_s']} s, {skip['left_s']} s left)")


def headline_text(machine: Mapping[str, Any], parts: Mapping[str, Any], budget: Any) -> str:
    """``ours X s vs nnU-Net Y s = Zx, argmax equal A %; 7 CT tasks ... ; <device>``."""
    where = machine.get("gpu") or f"{machine['cpu']} (CPU)"
    pieces = []
    engine = parts.get("engine", {})
    if "speedup_vs_nnunet" in engine:
        ours, theirs = (run["median_s"] for run in engine["runs"].values())
        pieces.append(f"engine {ours:.2f} s vs nnU-Net {theirs:.2f} s = {engine['speedup_vs_nnunet']:.2f}x, "
                      f"argmax equal {100 * engine['argmax_agreement']:.2f} %")
    else:
        pieces.append("engine vs nnU-Net not measured (budget)")
    batches = parts.get("batch_sizes", {}).get("runs", {})
    timed = {name: run["median_s"] for name, run in batches.items() if run["median_s"] is not None}
    if timed:
        best = min(timed, key=timed.__getitem__)
        pieces.append(f"fastest {best}")
    seven = parts.get("seven_tasks", {})
    if seven.get("seconds") is not None:
        memory = f", peak GPU {_gb(seven['peak_gpu_bytes'])} GB" if seven["peak_gpu_bytes"] is not None else ""
        pieces.append(f"7 CT tasks on {'x'.join(map(str, seven['ct_xyz']))} in {seven['seconds']:.1f} s, "
                      f"forward {_pct(seven['forward_share'])}{memory}")
    if budget.skipped:
        pieces.append(f"{len(budget.skipped)} skipped (budget)")
    return "; ".join(pieces) + f" [{where}]"
