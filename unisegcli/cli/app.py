"""The `uniseg` command: routing, global error handling and the small info commands.

``uniseg scan.nii.gz -o out --tasks liver`` works without a subcommand word: anything that
is not a known command name is handed to ``segment``. Domain errors become one red line and
the exit code from ``unisegcli.errors.ExitCode``; tracebacks only with ``--debug``.
Heavy libraries (torch, nibabel) are imported inside commands so `uniseg --help` is instant.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from unisegcli.version import __version__
from unisegcli.cli import console
from unisegcli.errors import ExitCode, UnisegError

HELP = (
    "Segment CT, MR and PET scans with universal models (one network, many tasks).\n\n"
    "Main form: [bold]uniseg SCAN... -o OUT --tasks liver,kidney[/] "
    "(the same as [bold]uniseg segment ...[/])."
)


_SCAN_SUFFIXES = (".nii", ".nii.gz", ".zip")


def dash_hint(args: list[str]) -> str:
    """A hint when a token before ``--`` looks like a file whose name starts with '-'.

    Click reads such a token as an option (``-dash.nii.gz`` is ``-d ash.nii.gz``, or an
    unknown option); only a ``--`` before it makes it a path.
    """
    for token in args:
        if token == "--":
            return ""
        if token.startswith("-") and token not in ("-", "--") and not token.startswith("--") and (
            token.lower().endswith(_SCAN_SUFFIXES) or Path(token).is_file()
        ):
            return (f" A file whose name starts with '-' must follow `--`: "
                    f"uniseg -o OUT --tasks T -- {token}")
    return ""


class UnisegGroup(TyperGroup):
    """A group whose default command is `segment`, and which maps errors to exit codes."""

    default_command = "segment"

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        """Run the command; usage errors become one red line (not a box) and exit code 2."""
        from typer._click.exceptions import NoArgsIsHelpError

        self._raw_args = list(sys.argv[1:] if args is None else args)
        try:
            returned = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = returned if isinstance(returned, int) else 0
        except NoArgsIsHelpError as exc:
            typer.echo(exc.ctx.get_help() if exc.ctx is not None else HELP)
            code = int(ExitCode.OK)
        except typer.TyperException as exc:  # click usage errors: bad option, missing value
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else "uniseg"
            hint = dash_hint(self._raw_args)
            console.error_line(f"{exc.format_message()} (see `{where} --help`){'.' if hint else ''}{hint}")
            code = int(getattr(exc, "exit_code", ExitCode.USAGE))
        except typer.Abort:
            console.error_line("aborted.")
            code = int(ExitCode.INTERNAL)
        if standalone_mode:
            sys.exit(code)
        return code

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except UnisegError as exc:
            if console.state.debug:
                traceback.print_exc()
            hint = dash_hint(getattr(self, "_raw_args", [])) if exc.exit_code == ExitCode.USAGE else ""
            console.error_line(f"{exc}{'' if not hint or str(exc).endswith('.') else '.'}{hint}")
            raise typer.Exit(int(exc.exit_code)) from None
        except KeyboardInterrupt:
            console.error_line("interrupted; no partial outputs were left behind.")
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
        except Exception as exc:  # a bug: say so in one line, traceback only on request
            if console.state.debug:
                traceback.print_exc()
            console.error_line(
                f"internal error: {type(exc).__name__}: {exc}. Re-run with --debug for the "
                "traceback and report it."
            )
            raise typer.Exit(int(ExitCode.INTERNAL)) from None


app = typer.Typer(
    cls=UnisegGroup,
    help=HELP,
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
)


@app.callback()
def _root() -> None:
    console.reset()


@app.command("version")
def version_command() -> None:
    """Print the versions of uniseg, Python, torch and the device torch sees."""
    import platform

    import torch

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    typer.echo(f"uniseg {__version__}")
    typer.echo(f"python {platform.python_version()} ({platform.machine()}, {platform.system()})")
    typer.echo(f"torch {torch.__version__} (cuda: {cuda}, threads: {torch.get_num_threads()})")


def _register_subcommands() -> None:
    from unisegcli.cli.segment import segment_command

    from unisegcli.cli import listings, stats
    from unisegcli.cli.weights import weights_app

    app.command("segment")(segment_command)
    listings.register(app)
    stats.register(app)
    app.add_typer(weights_app, name="weights", help="Download, import, verify and locate model weights.")


_register_subcommands()


def main() -> None:
    """Console-script entry point."""
    app(prog_name="uniseg")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
