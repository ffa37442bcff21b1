"""`python -m unisegcli` is the same as the `uniseg` command."""

from __future__ import annotations

from unisegcli.cli.app import main

if __name__ == "__main__":
    main()
