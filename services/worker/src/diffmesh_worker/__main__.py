"""``diffmesh-worker``: run one worker until SIGTERM.

A standby worker (``DIFFMESH_WORKER_STANDBY=true``) is also activated by SIGUSR1, for
orchestrators that can only signal; the handler is installed only then, so a normal
worker keeps SIGUSR1's default action. Signal once the standby is up (its ``Status``
answers, or ``PORT_FILE`` is written): before its event loop runs, SIGUSR1 still ends the
process.
"""

from __future__ import annotations

import asyncio
import signal

from diffmesh.server import serve

from diffmesh_worker.app import WorkerApp
from diffmesh_worker.settings import WorkerSettings


async def run(app: WorkerApp, settings: WorkerSettings) -> None:
    """Serves ``app`` until SIGTERM or SIGINT; on standby, SIGUSR1 activates it."""
    if settings.standby:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, app.activate_on_signal)
    await serve(app, settings)


def main() -> None:
    """Entry point of the ``diffmesh-worker`` console script."""
    settings = WorkerSettings()
    asyncio.run(run(WorkerApp(settings), settings))


if __name__ == "__main__":
    main()
