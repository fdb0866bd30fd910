"""``diffmesh-worker``: run one worker until SIGTERM."""

from __future__ import annotations

import asyncio

from diffmesh.server import serve

from diffmesh_worker.app import WorkerApp
from diffmesh_worker.settings import WorkerSettings


def main() -> None:
    """Entry point of the ``diffmesh-worker`` console script."""
    asyncio.run(serve(WorkerApp(s := WorkerSettings()), s))


if __name__ == "__main__":
    main()
