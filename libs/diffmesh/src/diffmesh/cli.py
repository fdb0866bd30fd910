"""The ``diffmesh`` command line.

Sub-commands live in their own modules and are imported only when used, so that
``diffmesh --help`` works without torch installed. Each module provides
``add_parser(subparsers)`` (registering its parser and setting ``func``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help); the module registers the sub-command's arguments.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("diffmesh.launcher.cli", "run the whole mesh locally and send demo requests"),
    "demo-models": ("diffmesh.demo.cli", "write random-weight tiny demo models and a catalog manifest"),
    "sim": ("diffmesh.sim.cli", "replay a trace through the simulator and compare systems"),
    "replay": ("diffmesh.replay.cli", "replay a trace through a local mesh per policy and compare"),
    "trace": ("diffmesh.trace.cli", "workload facts of a trace (`diffmesh trace stats`)"),
    "config": ("diffmesh.config_cli", "print the configuration reference (environment variables) as markdown"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The top-level parser; only the chosen sub-command's module is imported."""
    parser = argparse.ArgumentParser(prog="diffmesh", description="diffmesh: diffusion pipelines served as a gRPC mesh")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        if name == chosen:
            importlib.import_module(module).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffmesh`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
