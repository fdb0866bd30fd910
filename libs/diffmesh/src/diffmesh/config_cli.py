"""``diffmesh config``: the configuration reference, generated from the settings classes.

``diffmesh config --markdown`` prints every table; ``--service NAME`` one service's own
settings; ``--update FILE…`` rewrites the blocks between ``<!-- config-table:start … -->``
and ``<!-- config-table:end -->`` in those files (``make config-doc``); ``--check FILE…``
only reports the files whose blocks are stale (exit status 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from diffmesh import config_doc


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers ``diffmesh config``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "config",
        help="print the configuration reference (environment variables) as markdown",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--markdown", action="store_true", help="markdown tables (the only format; the default)")
    parser.add_argument("--service", choices=[d.name for d in config_doc.SERVICES], help="only this service's own settings")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--update", nargs="+", type=Path, metavar="FILE", help="rewrite the generated blocks in these files")
    group.add_argument("--check", nargs="+", type=Path, metavar="FILE", help="exit 1 when a file's generated blocks are stale")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Prints, updates or checks; returns the exit status."""
    files: list[Path] = args.update or args.check or []
    if not files:
        print(config_doc.service_markdown(args.service) if args.service else config_doc.markdown(), end="")
        return 0
    stale = []
    for path in files:
        text = path.read_text()
        if not config_doc.has_blocks(text):
            print(f"{path}: no <!-- config-table:start --> block", file=sys.stderr)
            return 2
        new = config_doc.update_markdown(text)
        if new != text:
            stale.append(path)
            if args.update:
                path.write_text(new)
    for path in stale:
        print(f"{path}: {'updated' if args.update else 'stale: run `make config-doc`'}", file=sys.stderr)
    return 1 if stale and args.check else 0
