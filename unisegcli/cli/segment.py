"""`uniseg segment` (the default command): parse options, call `unisegcli.api.segment`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from unisegcli.cli import console

DEVICE_HELP = "Where to run: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."


def segment_command(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Scans to segment: .nii/.nii.gz files or folders holding them.",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Folder for the masks (created if missing).", show_default=False),
    ],
    tasks: Annotated[
        str,
        typer.Option(
            "--tasks", "-t", help="Comma-separated task names, e.g. liver,kidney (see `uniseg tasks`).",
            show_default=False,
        ),
    ],
    model: Annotated[str, typer.Option("--model", "-m", help="Model from the registry (see `uniseg models`).")] = "uniseg",
    device: Annotated[str, typer.Option("--device", "-d", help=DEVICE_HELP)] = "auto",
    batch_size: Annotated[
        Optional[int],
        typer.Option("--batch-size", min=1, help="Windows per forward pass (default: 1 on CPU, from free memory on GPU)."),
    ] = None,
    step: Annotated[
        float,
        typer.Option("--step", min=0.1, max=1.0, help="Sliding-window step as a fraction of the patch (smaller: more overlap, slower)."),
    ] = 0.5,
    tta: Annotated[bool, typer.Option("--tta/--no-tta", help="8-way flip test-time augmentation (8× slower).")] = False,
    precision: Annotated[
        str,
        typer.Option("--precision", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16 (CUDA only)."),
    ] = "auto",
    threads: Annotated[
        Optional[int], typer.Option("--threads", min=1, help="CPU threads for torch (default: all cores).")
    ] = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="Never download; use only weights already in the cache (also UNISEG_OFFLINE=1).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables; errors only.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also print each step's timing and settings.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    json_events: Annotated[
        bool, typer.Option("--json", help="Print JSON-lines events on stdout (human output stays on stderr).")
    ] = False,
) -> None:
    """Segment scans: one mask per structure, in each scan's original geometry."""
    console.state.quiet, console.state.verbose = quiet, verbose
    console.state.debug, console.state.json = debug, json_events
    from unisegcli.api import segment
    from unisegcli.cli.reporting import RunReporter

    reporter = RunReporter()
    result = segment(
        inputs,
        tasks,
        output=output,
        model=model,
        device=device,
        batch_size=batch_size,
        step=step,
        tta=tta,
        precision=precision,
        threads=threads,
        offline=offline,
        events=reporter,
    )
    reporter.summary(result)
