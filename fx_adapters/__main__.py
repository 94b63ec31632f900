"""``python -m fx_adapters demo``: the command-line entry point."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fx-adapters", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="compile RoAd on a tiny built-in Llama and check a mixed batch")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        return 0 if run() < 1e-5 else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
