"""``fx-adapters COMMAND`` / ``python -m fx_adapters COMMAND``: the command line (commands in ``fx_adapters/cli/``)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
