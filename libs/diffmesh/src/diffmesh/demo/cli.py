"""``diffmesh demo-models DIR [--force]``: write the tiny demo models and ``catalog.json``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``demo-models`` sub-command on ``subparsers``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo-models",
        help="write random-weight tiny demo models and a catalog manifest",
        description=(
            "Write random-weight SD1.5-shaped tiny models (3 bases, 6 LoRAs, 1 ControlNet) as "
            "safetensors under DIR, plus DIR/catalog.json. Up-to-date models are kept unless --force."
        ),
    )
    parser.add_argument("dir", type=Path, metavar="DIR", help="output folder (created when missing)")
    parser.add_argument("--force", action="store_true", help="rewrite even when the catalog is up to date")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the demo models; prints one progress line per artifact and the catalog path."""
    started = time.monotonic()
    from diffmesh.demo.models import write_demo_models

    print(f"demo-models: {args.dir.resolve()}", flush=True)
    catalog = write_demo_models(args.dir, force=args.force, progress=lambda line: print(line, flush=True))
    print(f"demo-models: {catalog} ready in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return 0
