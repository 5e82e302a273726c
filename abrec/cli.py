"""The `abrec` command line: one parser, each package registers its own subcommands.

Every package's `cli` module must be light to import (no torch, no flask at module level);
the heavy work is imported inside the command function, so `abrec assign` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from abrec.errors import UsageError

__all__ = ["UsageError", "build_parser", "main"]

# Modules that expose `register(subparsers)`. Missing ones are skipped so that the CLI keeps
# working while a package is being built.
COMMAND_MODULES = [
    "abrec.models.cli",
    "abrec.models.server_cli",
    "abrec.assignment.cli",
    "abrec.experiments.cli",
    "abrec.experiments.api_cli",
    "abrec.experiments.models_admin",
    "abrec.experiments.simulate",
    "abrec.analysis.cli",
    "abrec.analysis.report_cli",
    "abrec.dashboard.cli",
    "abrec.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abrec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"abrec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
