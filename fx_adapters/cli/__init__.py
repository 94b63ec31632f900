"""The ``fx-adapters`` command line: one module per command in this package.

A command module (any module here whose name does not start with ``_``) has a docstring (its help text), a
``HELP`` line for the command list, ``add_arguments(parser)`` and ``run(args, ui) -> int``; it is found by
name, so adding a command is adding a file. Exit status: 0 success, 1 a comparison failed, 2 bad input
(``CLIError``, ``OSError`` or a missing optional dependency: one line on stderr), 3 an unexpected error (one
line too; ``--debug``: traceback).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ..figures import MissingDependency
from ._ui import UI, CLIError, first_line, quiet_libraries

EXIT_BAD_INPUT, EXIT_UNEXPECTED = 2, 3


def commands() -> dict:
    """Command name -> its module."""
    return {name: importlib.import_module(f"{__name__}.{name}")
            for _, name, _ in pkgutil.iter_modules(__path__) if not name.startswith("_")}


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        prog="fx-adapters", description="PEFT adapters compiled into torch.fx graphs. New here? Run: fx-adapters demo",
        epilog="Exit status: 0 success, 1 a comparison failed, 2 bad input, 3 unexpected error.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--debug", action="store_true", help="tracebacks and third-party warnings")
    sub = main.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in commands().items():
        command = sub.add_parser(name, parents=[common], help=module.HELP, description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with quiet_libraries(args.debug):
        try:
            return args.run(args, UI(args.quiet))
        except Exception as e:
            if args.debug:
                raise
            # OSError: a path that cannot be read or written; MissingDependency: an optional one a picture needs
            bad_input = isinstance(e, (CLIError, OSError, MissingDependency))
            hint = "" if bad_input else f" ({type(e).__name__}; run with --debug for the traceback)"
            print(f"fx-adapters: error: {first_line(e)}{hint}", file=sys.stderr)
            return EXIT_BAD_INPUT if bad_input else EXIT_UNEXPECTED
