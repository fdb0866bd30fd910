"""Entry point: ``diffmesh-coordinator`` / ``python -m diffmesh_coordinator``."""

from __future__ import annotations

import asyncio

from diffmesh.server import serve

from diffmesh_coordinator.app import CoordinatorApp
from diffmesh_coordinator.settings import CoordinatorSettings


def main() -> None:
    """Runs the coordinator until SIGTERM/SIGINT, with settings from the environment."""
    asyncio.run(serve(CoordinatorApp(s := CoordinatorSettings()), s))  # type: ignore[call-arg]


if __name__ == "__main__":
    main()
