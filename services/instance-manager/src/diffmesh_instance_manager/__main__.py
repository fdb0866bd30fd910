"""Entry point: ``diffmesh-instance-manager`` (settings from ``DIFFMESH_IM_*``)."""

from __future__ import annotations

import asyncio

from diffmesh.server import serve

from diffmesh_instance_manager.app import InstanceManagerApp
from diffmesh_instance_manager.settings import InstanceManagerSettings


def main() -> None:
    """Runs the instance manager until SIGTERM."""
    asyncio.run(serve(InstanceManagerApp(s := InstanceManagerSettings()), s))  # type: ignore[call-arg]


if __name__ == "__main__":
    main()
