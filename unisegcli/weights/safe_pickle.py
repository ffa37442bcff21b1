"""A restricted unpickler for nnU-Net v1 ``.pkl`` files (plans, ``.model.pkl`` trainer info).

Unpickling can call any importable function (``__reduce__``), so a downloaded ``.pkl`` is
read with an allow-list: builtin containers and scalars, ``collections.OrderedDict`` and the
few numpy callables that rebuild arrays, dtypes and scalars, under the names numpy 1.x
(``numpy.core.*``) and numpy 2 (``numpy._core.*``) write. Any other global raises
``UnsafePickleError`` naming it, before anything is called.

``torch_numpy_globals`` gives ``torch.load(weights_only=True)`` the same numpy allow-list,
for nnU-Net v1 checkpoints whose plot/best-epoch entries hold numpy scalars.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from unisegcli.errors import CheckpointError, UnsafePickleError

# numpy 2 moved numpy.core to numpy._core; importing numpy.core there warns.
try:
    from numpy._core import multiarray as _multiarray, numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray, numeric as _numeric  # type: ignore[no-redef]

# Builtins that rebuild plain data (protocol 2 pickles sets and complex numbers by name).
_BUILTINS: dict[str, Any] = {
    "set": set,
    "frozenset": frozenset,
    "bytearray": bytearray,
    "complex": complex,
    "slice": slice,
    "range": range,
}


def _codecs_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol 2 uses it for bytes (latin1 only: nothing else needed)."""
    if encoding.replace("-", "").lower() != "latin1" or not isinstance(text, str):
        raise UnsafePickleError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1", errors)


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's array rebuilder, limited to plain ndarrays (no subclasses)."""
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"refused numpy array subclass {subtype!r}")
    return _multiarray._reconstruct(subtype, shape, dtype)


def _numpy_callables() -> dict[str, Any]:
    """Objects numpy pickles refer to, keyed by every name numpy 1.x / 2.x writes."""
    table: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for prefix in ("numpy.core", "numpy._core"):
        table[f"{prefix}.multiarray._reconstruct"] = _reconstruct
        table[f"{prefix}.multiarray.scalar"] = _multiarray.scalar
        table[f"{prefix}.numeric._frombuffer"] = _numeric._frombuffer  # protocol 5 arrays
    return table


def _allowed() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {("builtins", k): v for k, v in _BUILTINS.items()}
    table[("collections", "OrderedDict")] = collections.OrderedDict
    table[("_codecs", "encode")] = _codecs_encode
    for full, obj in _numpy_callables().items():
        module, _, name = full.rpartition(".")
        table[(module, name)] = obj
    return table


_ALLOWED = _allowed()


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only allow-listed globals (see module doc)."""

    def find_class(self, module: str, name: str) -> Any:
        # protocol 0-2 pickles name Python 2 modules (``__builtin__.set``); map them the way
        # pickle's own find_class does (those names do not exist in Python 3 otherwise)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refused to load global '{module}.{name}': this pickle may only hold dicts, "
                "lists, numbers, strings and numpy arrays; nothing in it was executed"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused a persistent reference: plans pickles have none")


def loads(data: bytes, *, source: str = "pickle") -> Any:
    """Unpickle bytes with the allow-list; errors name ``source`` and say what to do."""
    if looks_like_html(data[:512]):
        raise CheckpointError(html_message(source))
    if not data:
        raise CheckpointError(f"{source} is empty (0 bytes); download it again")
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{source}: {exc}. Download it again from the registry URL.") from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, MemoryError, UnicodeDecodeError) as exc:
        # a cut download ends mid-stream; garbage fails on an unknown opcode or bad argument
        raise CheckpointError(
            f"{source} is truncated or not a pickle ({type(exc).__name__}: {exc}); download it again"
        ) from None


def load(path: str | Path) -> Any:
    """Read and unpickle a ``.pkl`` file with the allow-list."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return loads(data, source=path.name)


def torch_numpy_globals(names: Iterable[str] | None = None) -> list[Callable[..., Any] | tuple[Any, str]]:
    """Entries for ``torch.serialization.safe_globals`` allowing numpy arrays and scalars.

    names: the numpy globals a checkpoint uses (``get_unsafe_globals_in_checkpoint``); None
    allows the whole numpy set. Each is given with its pickled name so numpy 1.x checkpoints
    (``numpy.core.multiarray.scalar``) load under numpy 2. When ``numpy.dtype`` is allowed, the
    numeric dtype classes are added too: torch rebuilds a dtype and then checks its class
    (``numpy.dtypes.Float64DType``), which never appears as a name in the pickle.
    """
    table = _numpy_callables()
    wanted = table if names is None else {n: table[n] for n in names if n in table}
    entries: list[Callable[..., Any] | tuple[Any, str]] = [(obj, n) for n, obj in wanted.items()]
    if "numpy.dtype" in wanted:
        entries.extend(numeric_dtype_classes())
    return entries


def numeric_dtype_classes() -> list[type]:
    """Classes of bool, integer, float, complex, bytes and str dtypes (never object/void)."""
    codes = "?bBhHiIlLqQefdgFDGSU"
    return sorted({type(np.dtype(c)) for c in codes}, key=lambda t: t.__name__)


def is_numpy_global(name: str) -> bool:
    """Whether a pickled global name is one of the allow-listed numpy callables."""
    return name in _numpy_callables()


HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<!--", b"<meta", b"<title", b"<script")


def looks_like_html(head: bytes) -> bool:
    """True for a web page (error, login or virus-scan page) saved in place of a model file.

    Only the openings of an HTML document count: a plain text file that merely starts with
    '<' (MPNet's ``vocab.txt`` begins with the token ``<s>``) is not a page.
    """
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith(HTML_STARTS)


def html_message(source: str) -> str:
    return (
        f"{source} looks like an HTML page (e.g. a Google Drive 'can't scan for viruses' "
        "warning page), not model data; delete it and download it again"
    )
