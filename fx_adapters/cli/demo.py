"""Compile RoAd on a tiny Llama built in the package (no downloads), show the matched layers, run a mixed
batch, fold, export a .pt2, reload it and check that the outputs match. Under 30 s on a laptop CPU."""

from __future__ import annotations

HELP = "the five-minute tour on a tiny built-in Llama (no downloads)"


def add_arguments(parser) -> None:
    parser.add_argument("--out", metavar="DIR", help="write demo.pt2 here (default: a temporary directory)")


def run(args, ui) -> int:
    from ..demo import run as tour

    return tour(ui, args.out)
