"""How long `uniseg --help` takes, as a ratio to a bare `python -c pass` in the same run.

Goal: `uniseg --help` under 0.5 s (heavy imports such as torch and nibabel are lazy).
Prints a small table and writes benchmarks/results/startup.json.

    .venv/bin/python benchmarks/startup.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def wall_seconds(cmd: list[str], repeat: int) -> float:
    """Median wall time of ``cmd`` over ``repeat`` runs (after one warm-up run)."""
    subprocess.run(cmd, capture_output=True, check=True)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per command")
    args = parser.parse_args()
    script = str(Path(sys.executable).with_name("uniseg"))
    baseline = wall_seconds([sys.executable, "-c", "pass"], args.repeat)
    rows = {
        "python -c pass": baseline,
        "uniseg --help": wall_seconds([script, "--help"], args.repeat),
        "uniseg tasks": wall_seconds([script, "tasks"], args.repeat),
    }
    print(f"{'command':<18} {'median s':>9} {'ratio':>7}")
    for name, seconds in rows.items():
        print(f"{name:<18} {seconds:>9.3f} {seconds / baseline:>7.1f}")
    verdict = "meets" if rows["uniseg --help"] < 0.5 else "MISSES"
    print(f"`uniseg --help` {verdict} the 0.5 s goal")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "seconds": rows,
        "ratio_help_to_python": rows["uniseg --help"] / baseline,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
