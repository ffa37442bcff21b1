"""`uniseg tasks` and `uniseg models`: tables a person can read, JSON/TSV a script can parse.

Tables fit the terminal without ever cutting a name a user must type (task names, prompts,
aliases, structures): those columns keep each name whole (they wrap between names only), and
when the terminal is too narrow for all columns the least important ones are left out with a
note saying which (``--json``/``--tsv`` always hold everything). Licenses show as short
identifiers (``license_id`` in the registry, derived from the license text when absent); the
full text is in ``uniseg models NAME``.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Annotated, Any, Optional, Sequence

import typer

from unisegcli.cli import console
from unisegcli.errors import UsageError

if TYPE_CHECKING:
    from rich.console import Console

    from unisegcli.weights.cards import ModelCard

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table (for scripts).")]
TsvOption = Annotated[bool, typer.Option(
    "--tsv", help="Print tab-separated values with a header line instead of a table (for scripts).")]
_WHOLE_HEADERS = ("task", "prompt", "model")  # one name per cell: never wrapped
_NAME_HEADERS = ("aliases", "structure", "license")  # names (lists of): wrapped between names only
_FREE_TEXT_MIN = 10  # free-text columns may fold long words down to this width
# Columns left out first when the terminal is too narrow (by column key); a column holding
# the names to type (task, prompt) is never left out.
_DROP_ORDER = ("spacing_mm", "index", "label", "part", "kind", "note", "aliases", "dataset", "region",
               "version", "verified", "size", "installed", "family", "tasks", "channels", "modality", "structure", "structures", "license")


def license_id(card: "ModelCard") -> str:
    """A short license identifier: the registry's ``license_id``, else derived from the text."""
    if card.license_id:
        return card.license_id
    text = card.license.strip()
    lowered = text.lower()
    if not text or "not specified" in lowered or "unspecified" in lowered or "unknown" in lowered:
        return "unspecified"
    first = re.split(r"[\s,;(]", text, maxsplit=1)[0].rstrip(".:")
    if re.fullmatch(r"[A-Za-z][A-Za-z0-9.+-]*-\d[\w.+-]*|MIT|BSD|CC0|Unlicense", first):
        return first  # an SPDX-like identifier leads the text: "Apache-2.0 (weights ...)"
    if "non-commercial" in lowered or "noncommercial" in lowered:
        return "custom-noncommercial"
    return "custom"


def check_format(as_json: bool, as_tsv: bool) -> None:
    """Refuse --json together with --tsv."""
    if as_json and as_tsv:
        raise UsageError("--json and --tsv were both given; expected at most one output format.")


def column_key(header: str) -> str:
    """A header as a JSON/TSV key: "spacing mm (z, y, x)" -> "spacing_mm"."""
    return re.sub(r"\s*\(.*?\)", "", header).strip().lower().replace(" ", "_")


def print_tsv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Header line, then one line per row; tabs/newlines inside cells become spaces."""
    def cell(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        text = "" if value is None else str(value)
        return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")

    lines = ["\t".join(cell(c) for c in columns)] + ["\t".join(cell(v) for v in row) for row in rows]
    typer.echo("\n".join(lines))


def print_json(document: Any) -> None:
    typer.echo(json.dumps(document, indent=2, ensure_ascii=False, default=str))


def _need(header: str, cells: Sequence[str]) -> tuple[int, str]:
    """(minimum width, kind) of a column: whole names, lists of names, or free text."""
    head = header.lower()
    longest_word = max((len(w) for c in cells for w in c.split()), default=0)
    header_word = max((len(w) for w in header.split()), default=1)
    if head.startswith(_WHOLE_HEADERS) or head == "prompt (--tasks)":
        return max(max((len(c) for c in cells), default=0), header_word), "whole"
    if head.startswith(_NAME_HEADERS):
        return max(longest_word, header_word), "names"
    return max(min(longest_word, _FREE_TEXT_MIN), min(header_word, _FREE_TEXT_MIN)), "text"


def _drop_order(columns: Sequence[str]) -> list[int]:
    """Column indices in the order they are left out: unknown columns (rightmost first), then
    ``_DROP_ORDER``."""
    keys = [column_key(c) for c in columns]
    rank = {k: i for i, k in enumerate(_DROP_ORDER)}
    return sorted(range(len(columns)), key=lambda i: (rank.get(keys[i], -1), -i))


def fit_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], out: "Console",
              *, caption: str | None = None) -> None:
    """Print a rich table within ``out.width`` without cutting a name (see module docstring).

    Columns are left out (``_DROP_ORDER``; never the name to type) until the minimum widths
    fit; a name longer than the whole terminal (a long SAT prompt) wraps between its words.
    """
    from rich.table import Table

    needs = [_need(h, [r[i] for r in rows]) for i, h in enumerate(columns)]
    room = max(out.width - 4, 8)  # one column: "│ x │"
    # A name longer than the terminal wraps between its words, in about half the width.
    needs = [(room // 2 + 10, "long names") if kind == "whole" and w > room else (w, kind) for w, kind in needs]
    shown = list(range(len(columns)))

    def total() -> int:
        return sum(needs[i][0] for i in shown) + 3 * len(shown) + 1  # "│ x " per column + edge

    for index in _drop_order(columns):
        if total() <= out.width:
            break
        if needs[index][1] not in ("whole", "long names"):
            shown.remove(index)
    table = Table(title=title, caption=caption)
    for i in shown:
        width, kind = needs[i]
        table.add_column(columns[i], min_width=width, no_wrap=kind == "whole",
                         overflow="ellipsis" if kind == "whole" else "fold")
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    out.print(table)
    hidden = [columns[i] for i in range(len(columns)) if i not in shown]
    if hidden:
        out.print(f"(not shown at {out.width} columns: {', '.join(hidden)}; widen the terminal or "
                  "use --json / --tsv)", highlight=False, markup=False)


ModelOption = Annotated[
    str, typer.Option("--model", "-m", help="Model name from the registry (see `uniseg models`).")
]


def _task_records(card: "ModelCard", columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[dict]:
    """JSON records: the table's cells by column key, typed from the task card where known."""
    keys = [column_key(c) for c in columns]
    records = [dict(zip(keys, row)) for row in rows]
    if len(card.tasks) != len(rows):
        return records  # SAT: rows are vocabulary terms, not task cards
    for record, task in zip(records, card.tasks):
        record.update(task=task.name, index=task.index, modality=task.modality, aliases=list(task.aliases),
                      channels=list(task.channels), structures=list(task.structures),
                      labels={str(k): v for k, v in sorted(task.labels.items())},
                      spacing_mm=list(task.spacing_mm))
    return records


def tasks_command(model: ModelOption = "uniseg", as_json: JsonOption = False, as_tsv: TsvOption = False) -> None:
    """List the tasks of a model: name, aliases, modality, input channels, output structures."""
    from unisegcli.models.families import task_table
    from unisegcli.weights.resolver import get_model

    check_format(as_json, as_tsv)
    card = get_model(model)
    columns, rows = task_table(card)
    if as_json:
        print_json({"model": card.name, "version": card.version, "family": card.family,
                    "tasks": _task_records(card, columns, rows)})
    elif as_tsv:
        print_tsv([column_key(c) for c in columns], rows)
    else:
        fit_table(f"Tasks of model '{card.name}' ({card.version})", columns, rows, console.stdout())


def _all_cards() -> list[tuple["ModelCard", bool]]:
    """(card, imported) for the registry's models, then those imported by the user."""
    from unisegcli.weights.cards import load_registry
    from unisegcli.weights.imported import imported_card, read_imported

    cards = [(card, False) for card in load_registry().values()]
    for name in sorted(read_imported()):  # `uniseg weights import nnunet PATH --name NAME`
        card = imported_card(name)
        if card is not None:
            cards.append((card, True))
    return cards


MODEL_KEYS = ["model", "family", "version", "tasks", "license_id", "license", "description", "citation",
              "note", "source", "imported", "evaluation"]


def model_record(card: "ModelCard", imported: bool = False) -> dict[str, Any]:
    """Everything `uniseg models` knows about a model, JSON-ready."""
    return {
        "model": card.name, "family": card.family, "version": card.version, "tasks": len(card.tasks),
        "license_id": license_id(card), "license": card.license, "description": card.description,
        "citation": card.citation, "note": (f"imported from {card.source}" if imported else card.note) or "",
        "source": card.source or "", "imported": imported, "evaluation": card.evaluation or "",
    }  # fmt: skip


def _print_model(card: "ModelCard", imported: bool) -> None:
    """One model in full: description, full license text, citation, notes, evaluation, task names."""
    from rich.text import Text

    record = model_record(card, imported)
    record["tasks"] = ", ".join(t.name for t in card.tasks) or f"see `uniseg tasks --model {card.name}`"
    out = console.stdout()
    for key in ("model", "family", "version", "license_id", "license", "description", "citation", "note",
                "evaluation", "source", "tasks"):
        if record[key]:
            out.print(Text.assemble((f"{key}: ", "bold"), str(record[key])), highlight=False)


def models_command(
    name: Annotated[Optional[str], typer.Argument(
        help="A model to show in full (description, full license text, citation, notes).")] = None,
    as_json: JsonOption = False,
    as_tsv: TsvOption = False,
) -> None:
    """List the models in the registry with their version, tasks and license."""
    check_format(as_json, as_tsv)
    if name is not None:
        from unisegcli.weights.resolver import get_model

        card = get_model(name)
        imported = any(c.name == card.name and flag for c, flag in _all_cards())
        if as_json:
            print_json({**model_record(card, imported), "task_names": [t.name for t in card.tasks]})
        elif as_tsv:
            record = model_record(card, imported)
            print_tsv(list(record), [list(record.values())])
        else:
            _print_model(card, imported)
        return
    records = [model_record(card, imported) for card, imported in _all_cards()]
    if as_json:
        print_json(records)
        return
    if as_tsv:
        print_tsv(MODEL_KEYS, [[r[k] for k in MODEL_KEYS] for r in records])
        return
    columns = ["model", "family", "version", "tasks", "license", "note"]
    rows = [[r["model"], r["family"], r["version"], str(r["tasks"]), r["license_id"], r["note"]] for r in records]
    fit_table("Models", columns, rows, console.stdout(),
              caption="`uniseg models NAME`: description, full license text, citation, notes")


def register(app: typer.Typer) -> None:
    """Add `tasks` and `models` to the app."""
    app.command("tasks")(tasks_command)
    app.command("models")(models_command)
