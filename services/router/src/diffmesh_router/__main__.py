"""Entry point: ``diffmesh-router`` / ``python -m diffmesh_router``."""

from __future__ import annotations

import asyncio

from diffmesh.server import serve

from diffmesh_router.app import RouterApp
from diffmesh_router.settings import RouterSettings


def main() -> None:
    """Runs the router until SIGTERM."""
    asyncio.run(serve(RouterApp(s := RouterSettings()), s))


if __name__ == "__main__":
    main()
