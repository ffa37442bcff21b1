"""`uniseg weights ...`: list, download, verify, import, locate and remove model weights.

A thin shell over `unisegcli.weights.cache` and `unisegcli.weights.download`. Errors are raised
as domain exceptions (UnisegError); the main app maps them to exit codes and messages.
Tables go to stdout; progress, license lines and notes go to stderr.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from unisegcli.errors import ChecksumError, WeightsError
from unisegcli.weights import cards, resolver

weights_app = typer.Typer(
    name="weights",
    help="Manage model weights: list, download, verify, import, locate and remove them.",
    no_args_is_help=True,
)

ModelArg = Annotated[str, typer.Argument(help="Model name from the registry (see `uniseg weights list`).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print no progress bar and no notes.")]


def _models() -> dict[str, cards.ModelCard]:
    # The registry in use ($UNISEG_REGISTRY or the shipped one), read at call time.
    return cards.load_registry()


def _card(name: str) -> cards.ModelCard:
    return resolver.get_model(name)


def _stderr(quiet: bool = False):  # -> rich Console
    from rich.console import Console

    return Console(stderr=True, quiet=quiet)


def _stdout():
    from rich.console import Console

    return Console()


def _model_dir(card: cards.ModelCard) -> Path:
    from unisegcli.weights import cache

    return cache.model_dir(card)


def _human(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "?"
    size = float(size_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size_bytes} B"


def _status(card: cards.ModelCard, check: bool) -> tuple[str, str, int | None]:
    """(installed, verified, size_bytes) of a model as shown by `list`."""
    from unisegcli.weights import cache

    present = len(card.files) - len(cache.missing_files(card))
    installed = "yes" if present == len(card.files) else ("no" if present == 0 else
                                                          f"partial ({present}/{len(card.files)})")
    manifest = cache.read_manifest(card)
    sizes = [cache.expected_size(f, manifest) for f in card.files]
    size_bytes = None if None in sizes else sum(s for s in sizes if s is not None)
    if present == 0:
        return installed, "-", size_bytes
    if check:
        states = {c.status for c in cache.verify_model(card) if c.status != "missing"}
        verified = "MISMATCH" if "mismatch" in states else ("no hash" if "unknown" in states else "yes")
        return installed, verified, size_bytes
    # Without --check: compare recorded hashes only (no reading of large files).
    directory = cache.model_dir(card)
    present_files = [f for f in card.files if (directory / f.name).is_file()]
    seen = {f.name: manifest.get(f.name, {}).get("sha256") for f in present_files}
    if any(f.sha256 and seen[f.name] and f.sha256 != seen[f.name] for f in present_files):
        verified = "MISMATCH"
    elif all(seen.values()):
        verified = "at download" if all(f.sha256 for f in present_files) else "hash recorded"
    else:
        verified = "no record"
    return installed, verified, size_bytes


@weights_app.command("list")
def list_models(
    check: Annotated[bool, typer.Option(
        "--check", help="Hash the installed files now (slow for large files) instead of "
                        "reporting what was checked when they entered the cache.")] = False,
) -> None:
    """List the models of the registry with their size, install and verification state."""
    from rich.table import Table

    table = Table(title="Model weights")
    for column in ("model", "version", "size", "installed", "verified", "license"):
        table.add_column(column, overflow="fold")
    for name, card in sorted(_models().items()):
        installed, verified, size_bytes = _status(card, check)
        table.add_row(name, card.version, _human(size_bytes), installed, verified, card.license)
    _stdout().print(table)


@weights_app.command("download")
def download(
    names: Annotated[list[str], typer.Argument(help="One or more model names to download.")],
    offline: Annotated[bool, typer.Option(
        "--offline", help="Do not use the network: only check that the files are already "
                          "cached (also set by UNISEG_OFFLINE=1).")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Download the files of one or more models into the cache (resumes partial downloads)."""
    from unisegcli.weights.download import UnverifiedFileWarning, ensure_model

    selected = [_card(n) for n in names]  # fail on a typo before downloading anything
    console, loud = _stderr(quiet), _stderr()
    for card in selected:
        # The license and warnings show even with --quiet: they are about trust, not progress.
        loud.print(f"[bold]{card.name}[/bold] {card.version} - license: {card.license}",
                   highlight=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnverifiedFileWarning)
            from unisegcli.cli.console import DownloadBar

            with DownloadBar(console, quiet) as bar:
                files = ensure_model(card, offline=offline, progress=bar,
                                     on_wait=None if quiet else lambda m: console.print(m, highlight=False))
        for warning in caught:
            if issubclass(warning.category, UnverifiedFileWarning):
                loud.print(f"[yellow]warning:[/yellow] {warning.message}", highlight=False)
            else:  # not ours: hand it back to the normal machinery
                warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                       warning.lineno)
        console.print(f"{card.name}: {len(files)} file(s) ready in {_model_dir(card)}",
                      highlight=False)


@weights_app.command("verify")
def verify(
    name: Annotated[Optional[str], typer.Argument(
        help="Model to verify; all installed models when left out.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Hash the cached files and compare them with the registry (or the manifest's record)."""
    from rich.table import Table

    from unisegcli.weights import cache

    if name is not None:
        selected = [_card(name)]
    else:
        selected = [c for c in _models().values() if len(cache.missing_files(c)) < len(c.files)]
        if not selected:
            raise WeightsError(f"no model is installed in {cache.cache_root()}; nothing to verify. "
                               f"Run `uniseg weights download NAME` first.")
    table = Table(title="Weights verification")
    for column in ("model", "file", "status", "checked against", "sha256"):
        table.add_column(column, overflow="fold")
    bad: list[str] = []
    missing: list[str] = []
    for card in selected:
        for c in cache.verify_model(card):
            table.add_row(card.name, c.name, c.status, c.reference or "-", c.actual_sha256 or "-")
            if c.status == "mismatch":
                bad.append(f"{c.path} (sha256 {c.actual_sha256}, expected {c.expected_sha256} "
                           f"from the {c.reference})")
            elif c.status == "missing":
                missing.append(f"{card.name}: {c.path}")
    if not quiet:
        _stdout().print(table)
    if bad:
        raise ChecksumError(
            f"{len(bad)} corrupt file(s): {'; '.join(bad)}. Run `uniseg weights remove NAME --yes` "
            f"and `uniseg weights download NAME` (or import a good copy)."
        )
    if missing:
        raise WeightsError(f"missing file(s): {'; '.join(missing)}. Run `uniseg weights download "
                           f"NAME` or `uniseg weights import NAME PATH`.")


@weights_app.command("import")
def import_(
    name: ModelArg,
    path: Annotated[Path, typer.Argument(
        help="A downloaded file, a folder holding the files, or a .zip of them.")],
    quiet: QuietOpt = False,
    as_name: Annotated[Optional[str], typer.Option(
        "--name", help="With MODEL 'nnunet': register the nnU-Net v2 results folder (or .zip) PATH "
                       "under this name, usable as --model NAME.")] = None,
) -> None:
    """Copy files downloaded elsewhere (a browser, another machine) into the cache, checked.

    `uniseg weights import nnunet PATH --name NAME` imports an nnU-Net v2 results folder.
    """
    from unisegcli.weights import cache

    if name == "nnunet" or as_name is not None:
        if name != "nnunet" or not as_name:
            from unisegcli.errors import UsageError

            raise UsageError(f"`uniseg weights import {name} PATH{' --name ' + as_name if as_name else ''}`: "
                               "--name goes with MODEL 'nnunet' only; expected `uniseg weights import "
                               "nnunet PATH --name NAME`.")
        from unisegcli.models.nnunet.importing import import_folder

        folder = import_folder(path, as_name)
        _stderr(quiet).print(f"imported nnU-Net model '{as_name}': {folder} (use --model {as_name})",
                             highlight=False)
        return
    card = _card(name)
    imported = cache.import_model(card, path)
    console = _stderr(quiet)
    for role, file_path in imported.items():
        console.print(f"imported {role}: {file_path}")
    still = cache.missing_files(card)
    if still:
        console.print(f"[yellow]still missing for '{card.name}':[/yellow] "
                      f"{', '.join(f.name for f in still)}")


@weights_app.command("path")
def path(name: ModelArg) -> None:
    """Print the cache folder of a model (for scripts: `cd "$(uniseg weights path uniseg)"`)."""
    card = _card(name)
    typer.echo(str(_model_dir(card)))


@weights_app.command("remove")
def remove(
    name: ModelArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking for confirmation.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Delete a model's cached files (and partial downloads) from the cache."""
    from unisegcli.weights import cache

    card = _card(name)
    directory = _model_dir(card)
    if not yes:
        typer.confirm(f"Remove the files of model '{card.name}' from {directory}?", abort=True)
    removed = cache.remove_model(card)
    console = _stderr(quiet)
    if removed:
        console.print(f"removed {len(removed)} file(s) from {directory}")
    else:
        console.print(f"nothing to remove: model '{card.name}' is not in {directory}")


@weights_app.command("convert")
def convert(
    checkpoint: Annotated[Path, typer.Argument(help="nnU-Net v1 checkpoint (model_final_checkpoint.model).")],
    out_dir: Annotated[Path, typer.Argument(help="Folder for model.safetensors and config.json.")],
    plans: Annotated[Optional[Path], typer.Option(
        "--plans", help="plans.pkl of the checkpoint (default: <checkpoint>.pkl beside it).")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Convert a UniSeg v1 checkpoint to safetensors + JSON config (no pickle needed to load it)."""
    from unisegcli.models.uniseg.convert import convert_checkpoint

    weights = convert_checkpoint(checkpoint, plans, out_dir)
    _stderr(quiet).print(f"wrote {weights} and {weights.with_name('config.json')}")


@weights_app.command("prepare")
def prepare(
    name: ModelArg,
    offline: Annotated[bool, typer.Option(
        "--offline", help="Use only files already in the cache; never download.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Precompute what a model needs at every run (SAT: the text embeddings of its whole
    vocabulary, ~1.5 MB), so later runs load neither the text encoder nor transformers."""
    from unisegcli.models.families import family

    card = _card(name)
    hook = family(card.family).prepare
    if hook is None:
        raise WeightsError(
            f"model '{card.name}' (family {card.family}) has nothing to prepare; expected a SAT model "
            "such as sat-nano. Its weights are used as downloaded."
        )
    from unisegcli.weights import cache

    if not offline and cache.missing_files(card):
        _stderr(quiet).print(f"downloading model '{card.name}' {card.version} (first use) · license: "
                             f"{card.license}", soft_wrap=True, highlight=False, markup=False)
    from unisegcli.cli.console import DownloadBar

    with DownloadBar(_stderr(quiet), quiet) as bar:
        out = hook(card, offline=offline, download_progress=bar)
    _stderr(quiet).print(f"prepared model '{card.name}': {out}", soft_wrap=True, highlight=False, markup=False)
